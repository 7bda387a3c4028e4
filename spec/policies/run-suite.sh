#!/usr/bin/env bash
# Specs of the shipped policies (policies/*.lua, lua/default_policy.lua) and
# of the operators' test harness (lua/tollgate/harness.lua), under LuaJIT with
# busted. The gateway binary checks every shipped policy too (`tollgate
# check`), and must agree with the harness on broken ones.
# Usage: run-suite.sh <tollgate-binary> <build-dir>
# Prints busted's report, then one line "N passed, N failed, N skipped". Exits non-zero on failure.
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${1:-$root/build/tollgate}"
build_dir="${2:-$root/build}"

fail_setup() {
  echo "policies: $*" >&2
  echo "0 passed, 1 failed, 0 skipped"
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
cd "$root" || fail_setup "cannot enter $root"
TOLLGATE_BIN="$bin" busted --lua=luajit --output=plainTerminal --verbose \
  --lpath='./lua/?.lua' --pattern=_spec spec/policies 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

# shellcheck source=../busted-summary.sh
. "$here/../busted-summary.sh"
busted_summary policies "$log" "$status"
