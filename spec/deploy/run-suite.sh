#!/usr/bin/env bash
# Deploy suite: checks deploy/ (Kubernetes manifests against the API schemas and kubectl's strict
# field rules, compose.yaml against the Compose schema, their tollgate.lua with `tollgate check`,
# alerts.yml with promtool check/test rules, the Grafana dashboard's metrics against the code),
# policy hot reload through a ConfigMap volume's ..data symlink swap, and `promtool check metrics`
# on a live /metrics.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints node's TAP output, then one line "N passed, N failed, N skipped". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../../build/tollgate}"
build_dir="${2:-$here/../../build}"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

fail_setup() {
  echo "deploy: $*" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
}

[ -x "$bin" ] || fail_setup "no tollgate binary at $bin"
command -v node >/dev/null || fail_setup "node is not installed (Debian package nodejs, Node 20 or later)"
command -v npm >/dev/null || fail_setup "npm is not installed (Debian package npm)"
command -v promtool >/dev/null || fail_setup "promtool is not installed (Debian package prometheus)"

cd "$here" || fail_setup "cannot enter $here"
# npm ci only when the installed tree is missing or older than the lock file.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --engine-strict --no-audit --no-fund --loglevel=error >&2 ||
    fail_setup "npm ci failed (registry $(npm config get registry 2>/dev/null); check the proxy, its CA certificate and node --version)"
fi

mkdir -p "$build_dir"
log="$build_dir/deploy.tap"
rm -rf "$build_dir/deploy-logs"
TOLLGATE_BIN="$bin" TOLLGATE_LOG_DIR="$build_dir/deploy-logs" node --test --test-reporter=tap deploy.test.js 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

count() { sed -n "s/^# $1 \([0-9][0-9]*\)\$/\1/p" "$log" | tail -n1; }
pass=$(count pass); fail=$(count fail); cancelled=$(count cancelled)
skipped=$(count skipped); todo=$(count todo)
pass=${pass:-0}
fail=$(( ${fail:-0} + ${cancelled:-0} ))
skipped=$(( ${skipped:-0} + ${todo:-0} ))
if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
if [ "$pass" -eq 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi

echo "$pass passed, $fail failed, $skipped skipped"
[ "$fail" -eq 0 ]
