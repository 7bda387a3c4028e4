#!/usr/bin/env bash
# Specs of the shipped policies (policies/*.lua, lua/default_policy.lua) and
# of the operators' test harness (lua/tollgate/harness.lua), under LuaJIT with
# busted. The gateway binary checks every shipped policy too (`tollgate
# check`), and must agree with the harness on broken ones.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints busted's report, then one line "N passed, N failed". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/build/tollgate}"
build_dir="${2:-$root/build}"

fail_setup() {
  echo "policies: $*" >&2
  echo "0 passed, 1 failed"
  exit 1
}

[ -x "$bin" ] || fail_setup "no tollgate binary at $bin"
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
command -v busted >/dev/null || fail_setup "busted is not installed (Debian package lua-busted)"
command -v luajit >/dev/null || fail_setup "luajit is not installed (Debian package luajit2)"

mkdir -p "$build_dir"
build_dir="$(cd "$build_dir" && pwd)"
log="$build_dir/policies.log"

# From the repository root: specs name policies by their path in the repo,
# and require("tollgate.harness") must find lua/tollgate/harness.lua.
cd "$root"
TOLLGATE_BIN="$bin" busted --lua=luajit --output=plainTerminal --verbose \
  --lpath='./lua/?.lua' --pattern=_spec spec/policies 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# busted's closing summary: "N successes / N failures / N errors / N pending"
# (singular forms for 1). Failures and errors both count as failed.
summary="$(sed 's/\x1b\[[0-9;]*m//g' "$log" |
  grep -E '^[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' | tail -n1)"
if [ -z "$summary" ]; then
  echo "policies: busted printed no summary (exit $status)" >&2
  echo "0 passed, 1 failed"
  exit 1
fi
read -r pass failures errors < <(echo "$summary" |
  sed -E 's#^([0-9]+) success(es)? / ([0-9]+) failures? / ([0-9]+) errors?.*#\1 \3 \4#')
fail=$((failures + errors))
if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
if [ "$pass" -eq 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
