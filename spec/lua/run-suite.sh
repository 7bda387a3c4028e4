#!/usr/bin/env bash
# Busted specs of the Lua runtime (lua/tollgate: sandbox, money, default
# policy) under LuaJIT, the interpreter the gateway embeds.
# Usage: spec/lua/run-suite.sh <tollgate-bin> <build-dir>
# (both unused for now: these specs load lua/ directly, as the operator
# harness does). Prints busted's report, then "N passed, N failed".
set -u
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 2

if ! command -v busted >/dev/null; then
  echo "busted not found (apt-get install lua-busted)"
  echo "0 passed, 1 failed"
  exit 1
fi

out="$(mktemp)"
trap 'rm -f "$out"' EXIT
busted --lua=luajit --lpath='./lua/?.lua' --pattern='_spec' spec/lua 2>&1 | tee "$out"

summary="$(grep -E '[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$out" | tail -n 1)"
if [ -z "$summary" ]; then
  echo "no busted summary found"
  echo "0 passed, 1 failed"
  exit 1
fi
count() { echo "$summary" | grep -oE "[0-9]+ $1" | grep -oE '^[0-9]+'; }
successes="$(count success)"
failures="$(count failure)"
errors="$(count error)"
failed=$((failures + errors))
echo "$successes passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$successes" -gt 0 ]
