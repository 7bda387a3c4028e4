#!/usr/bin/env bash
# e2e suite: busted specs (LuaJIT + LuaSocket) against the real tollgate binary
# over raw loopback sockets: bad input, limits, slow clients, admin access.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints busted's report, then one line "N passed, N failed, N skipped". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bin="${1:-$here/../../build/tollgate}"
build_dir="${2:-$here/../../build}"

fail_setup() {
  echo "e2e: $*" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
}

[ -x "$bin" ] || fail_setup "no tollgate binary at $bin"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
command -v busted >/dev/null || fail_setup "busted is not installed (Debian package lua-busted)"
command -v luajit >/dev/null || fail_setup "luajit is not installed (Debian package luajit2)"
luajit -e 'require("socket")' 2>/dev/null || fail_setup "LuaSocket is missing for LuaJIT (Debian package lua-socket)"
# The specs drive load with wrk and share a rate limit through a Redis they start:
# without them a spec would fail late and unclearly, so the suite fails here, by name.
command -v wrk >/dev/null || fail_setup "wrk is not installed (Debian package wrk)"
command -v redis-server >/dev/null || fail_setup "redis-server is not installed (Debian package redis-server)"

mkdir -p "$build_dir"
build_dir="$(cd "$build_dir" && pwd)"
log="$build_dir/e2e.log"
# Every gateway the specs start logs here, and the secrets they hand one are
# listed here (helpers.lua); zz_secrets_spec.lua, last, greps the one for the other.
if [ -z "${TOLLGATE_LOG_DIR:-}" ]; then
  TOLLGATE_LOG_DIR="$build_dir/e2e-logs"
  rm -rf "$TOLLGATE_LOG_DIR"
fi
mkdir -p "$TOLLGATE_LOG_DIR" || fail_setup "cannot create $TOLLGATE_LOG_DIR"
export TOLLGATE_LOG_DIR
cd "$here" || fail_setup "cannot enter $here"
# Specs run in file order; each file starts and stops its own gateway.
TOLLGATE_BIN="$bin" busted --lua=luajit --output=plainTerminal --verbose --no-auto-insulate \
  --pattern=_spec --lpath='./?.lua' . 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# shellcheck source=../busted-summary.sh
. "$here/../busted-summary.sh"
busted_summary e2e "$log" "$status"
