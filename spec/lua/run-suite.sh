#!/usr/bin/env bash
# Busted specs of the Lua runtime (lua/tollgate: sandbox, money, default
# policy) under LuaJIT, the interpreter the gateway embeds.
# Usage: spec/lua/run-suite.sh <tollgate-bin> <build-dir>
# (both unused for now: these specs load lua/ directly, as the operator
# harness does). Prints busted's report, then "N passed, N failed, N skipped".
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 2

fail_setup() {
  echo "lua: $*" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
}
command -v busted >/dev/null || fail_setup "busted is not installed (Debian package lua-busted)"
command -v luajit >/dev/null || fail_setup "luajit is not installed (Debian package luajit2)"

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
busted --lua=luajit --lpath='./lua/?.lua' --pattern='_spec' spec/lua 2>&1 | tee "$out"
status=${PIPESTATUS[0]}

# shellcheck source=../busted-summary.sh
. "$(dirname "${BASH_SOURCE[0]}")/../busted-summary.sh"
busted_summary lua "$out" "$status"
