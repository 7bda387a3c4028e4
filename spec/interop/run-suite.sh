#!/usr/bin/env bash
# Interop suite: the real tollgate binary against Node Connect clients, the CDN signers'
# reference implementations, the x402/t402 clients and facilitators on a local chain, and a
# publisher's billing service (lib/billing_service.js) for the remote billing adapter.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints node's TAP output, then one line "N passed, N failed, N skipped". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../../build/tollgate}"
build_dir="${2:-$here/../../build}"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

fail_setup() {
  echo "interop: $*" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
}

[ -x "$bin" ] || fail_setup "no tollgate binary at $bin"
command -v node >/dev/null || fail_setup "node is not installed (Debian package nodejs)"
command -v npm >/dev/null || fail_setup "npm is not installed (Debian package npm)"
command -v protoc >/dev/null || fail_setup "protoc is not installed (Debian package protobuf-compiler)"
command -v openssl >/dev/null || fail_setup "openssl is not installed (Debian package openssl)"
# The metrics test runs promtool: without it that test fails, so say why up front.
command -v promtool >/dev/null || fail_setup "promtool is not installed (Debian package prometheus)"
# The x402 test shares a Redis between two gateway instances (its own, on a free port).
command -v redis-server >/dev/null || fail_setup "redis-server is not installed (Debian package redis-server)"
# The billing test's service holds its port bound, not listening, with python3 while "down".
command -v python3 >/dev/null || fail_setup "python3 is not installed (Debian package python3)"

cd "$here" || fail_setup "cannot enter $here"
# npm ci only when the installed tree is missing or older than the lock file; a package
# that does not support this node is an install failure (--engine-strict), not a warning.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --engine-strict --no-audit --no-fund --loglevel=error >&2 ||
    fail_setup "npm ci failed (registry $(npm config get registry 2>/dev/null); check the proxy, its CA certificate and node --version)"
fi

# Code is generated at test time from proto/, never committed.
rm -rf gen && mkdir -p gen
protoc --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=gen --es_opt=target=js,import_extension=js \
  -I ../../proto ramp/v1/exchange.proto comp/v1/ai_system.proto billing/v1/billing.proto \
  || fail_setup "protoc-gen-es failed"

mkdir -p "$build_dir"
log="$build_dir/interop.tap"
rm -rf "$build_dir/interop-logs"
TOLLGATE_BIN="$bin" TOLLGATE_LOG_DIR="$build_dir/interop-logs" node --test --test-reporter=tap connect.test.js tls.test.js signers.test.js eip3009.test.js x402.test.js billing.test.js 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# node's closing counts: "# pass N", "# fail N", "# cancelled N", "# skipped N", "# todo N".
count() { sed -n "s/^# $1 \([0-9][0-9]*\)\$/\1/p" "$log" | tail -n1; }
pass=$(count pass); fail=$(count fail); cancelled=$(count cancelled)
skipped=$(count skipped); todo=$(count todo)
pass=${pass:-0}
fail=$(( ${fail:-0} + ${cancelled:-0} ))
skipped=$(( ${skipped:-0} + ${todo:-0} ))
# A run that died before its summary, or failed without counting it, still failed.
if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
if [ "$pass" -eq 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi

echo "$pass passed, $fail failed, $skipped skipped"
[ "$fail" -eq 0 ]
