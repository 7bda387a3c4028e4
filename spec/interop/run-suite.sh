#!/usr/bin/env bash
# Interop suite: the real tollgate binary against Node Connect clients.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints node's TAP output, then one line "N passed, N failed". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../../build/tollgate}"
build_dir="${2:-$here/../../build}"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

fail_setup() {
  echo "interop: $*" >&2
  echo "0 passed, 1 failed"
  exit 1
}

[ -x "$bin" ] || fail_setup "no tollgate binary at $bin"
command -v node >/dev/null || fail_setup "node is not installed"
command -v protoc >/dev/null || fail_setup "protoc is not installed"

cd "$here"
# npm ci only when the installed tree is missing or older than the lock file.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error >&2 || fail_setup "npm ci failed"
fi

# Code is generated at test time from proto/, never committed.
rm -rf gen && mkdir -p gen
protoc --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
  --es_out=gen --es_opt=target=js,import_extension=js \
  -I ../../proto ramp/v1/exchange.proto comp/v1/ai_system.proto \
  || fail_setup "protoc-gen-es failed"

mkdir -p "$build_dir"
log="$build_dir/interop.tap"
rm -rf "$build_dir/interop-logs"
TOLLGATE_BIN="$bin" TOLLGATE_LOG_DIR="$build_dir/interop-logs" node --test --test-reporter=tap connect.test.js tls.test.js 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

pass=$(sed -n 's/^# pass \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)
fail=$(sed -n 's/^# fail \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)
cancelled=$(sed -n 's/^# cancelled \([0-9][0-9]*\)$/\1/p' "$log" | tail -n1)
pass=${pass:-0}
fail=$(( ${fail:-0} + ${cancelled:-0} ))
# A run that died before its summary, or failed without counting it, still failed.
if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
if [ "$pass" -eq 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
