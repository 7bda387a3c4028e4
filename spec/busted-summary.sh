# shellcheck shell=bash
# Sourced by the busted suites' run-suite.sh: turns busted's closing summary
# ("N successes / N failures / N errors / N pending", singular forms for 1)
# into the "N passed, N failed, N skipped" line CI counts. Failures and errors
# both count as failed, pending as skipped; a run with no summary, or a non-zero
# exit with nothing failed, or nothing passed, counts as one failure.
# Usage: busted_summary SUITE LOG BUSTED_EXIT_STATUS   (returns 0 when all passed)
busted_summary() {
  local suite="$1" log="$2" status="$3" summary pass failures errors pending fail
  summary="$(sed 's/\x1b\[[0-9;]*m//g' "$log" |
    grep -E '^[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' | tail -n1)"
  if [ -z "$summary" ]; then
    echo "$suite: busted printed no summary (exit $status)" >&2
    echo "0 passed, 1 failed, 0 skipped"
    return 1
  fi
  read -r pass failures errors pending < <(echo "$summary" |
    sed -E 's#^([0-9]+) success(es)? / ([0-9]+) failures? / ([0-9]+) errors? / ([0-9]+) pending.*#\1 \3 \4 \5#')
  fail=$((failures + errors))
  if [ "$status" -ne 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
  if [ "$pass" -eq 0 ] && [ "$fail" -eq 0 ]; then fail=1; fi
  echo "$pass passed, $fail failed, $pending skipped"
  [ "$fail" -eq 0 ]
}
