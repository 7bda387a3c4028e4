#!/usr/bin/env bash
# Benchmark: DiscoverResources (one URI, protobuf) against a tenant whose catalog holds
# 1,000,000 RSL contents, as a ratio of the trivial Connect call (a URI of an unknown tenant,
# answered TENANT_UNKNOWN without any catalog lookup); memory per catalog entry (RSS), and
# the time to load and to rebuild the million-entry catalog.
# A separate command, not a test suite: it prints figures and writes JSON, it passes nothing.
#
# Usage: spec/bench/discover.sh [--quick]
#   --quick  one run of 3 s per call (default: three alternating runs of 10 s, medians)
# Environment: BENCH_THREADS (2), BENCH_CONNS (64), BENCH_WORKERS (1), BENCH_ENTRIES
#   (1000000), BENCH_BUILD_DIR (build-bench), BENCH_TOLLGATE_BIN (use this binary),
#   BENCH_PERF=1 (perf record the gateway during one extra discover run; top symbols printed,
#   report in <build>/discover-perf.txt).
#
# The document: <content url="/articles/YYYY/MM/slug-N"> for N = 1..entries, ten years of
# twelve months. A document is capped at TG_INGEST_MAX_BYTES (256 MiB since this script was written; it was 64 MiB), and
# a million contents take ~46 MB with no licence at all, so only one content in eight
# (N % 8 == 1, slug-777777 among them) carries one of four licence blocks; the others have no
# <license> ("not for sale"). The catalog interns licence sets (a 32-bit index per content),
# so this changes the parse time, not the per-entry memory of the built catalog.
# Memory: RSS of the gateway after the catalog is loaded, minus RSS of an identical gateway
# whose tenant has no catalog source, both after the same warm-up; divided by entries.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"
quick=0
case "${1:-}" in
  --quick) quick=1 ;;
  "") ;;
  *) sed -n '8,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
threads="${BENCH_THREADS:-2}"
conns="${BENCH_CONNS:-64}"
workers="${BENCH_WORKERS:-1}"
entries="${BENCH_ENTRIES:-1000000}"
if [ "$quick" -eq 1 ]; then duration=3; runs=1; else duration=10; runs=3; fi

say() { printf '%s\n' "$*" >&2; }
die() { say "discover bench: $*"; exit 1; }
for tool in wrk curl cmake protoc python3 awk; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

bin="${BENCH_TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j2 --target tollgate >/dev/null || die "build failed"
  bin="$build/tollgate"
fi
[ -x "$bin" ] || die "$bin is not executable"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-discover-bench-XXXXXX")"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# The document. Months round-robin inside a year, so slug-777777 is /articles/2024/05/ and
# holds licence 2 (ai-input, USD 0.015 per use).
say "discover bench: generating $entries RSL contents"
t0="$(date +%s%N)"
awk -v n="$entries" 'BEGIN {
  lic[0] = "<license><permits type=\"usage\">ai-input search</permits><payment type=\"use\"><amount currency=\"USD\">0.010</amount></payment></license>"
  lic[1] = "<license><permits type=\"usage\">ai-train</permits><prohibits type=\"user\">government</prohibits><payment type=\"training\"><amount currency=\"USD\">1.50</amount></payment></license>"
  lic[2] = "<license><permits type=\"usage\">ai-input</permits><payment type=\"use\"><amount currency=\"USD\">0.015</amount></payment></license>"
  lic[3] = "<license><permits type=\"usage\">search</permits></license>"
  print "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
  print "<rsl xmlns=\"https://rslstandard.org/rsl\">"
  for (i = 1; i <= n; i++) {
    y = 2017 + int((i - 1) / 100000); m = 1 + ((i - 1) % 100000) % 12
    if (i % 8 == 1) printf "<content url=\"/articles/%d/%02d/slug-%d\">%s</content>\n", y, m, i, lic[int(i / 8) % 4]
    else printf "<content url=\"/articles/%d/%02d/slug-%d\"/>\n", y, m, i
  }
  print "</rsl>"
}' >"$tmp/big.xml"
gen_ms=$((($(date +%s%N) - t0) / 1000000))
doc_bytes="$(wc -c <"$tmp/big.xml")"
say "discover bench: document $doc_bytes bytes in $gen_ms ms"
[ "$doc_bytes" -le $((64 << 20)) ] || die "document is $doc_bytes bytes, over the 64 MiB ingestion cap"

target="/articles/2024/05/slug-777777"
grep -q "url=\"$target\"><license>" "$tmp/big.xml" || die "$target is not a licensed entry of the document"

# Requests: the same message, one URI each.
encode() { # encode URI OUT
  cat >"$tmp/req.txtpb" <<EOF
ai_system {
  name: "Bench Research Assistant"
  user_agent: "BenchBot/1.0"
  id: "sys-bench-01"
  usage_purposes: USAGE_PURPOSE_AI_INPUT
  user_type: USER_TYPE_COMMERCIAL
  country: "US"
}
resources { uri: "$1" }
EOF
  protoc --encode=ramp.v1.DiscoverResourcesRequest -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" \
    <"$tmp/req.txtpb" >"$2" || die "protoc --encode failed"
}
encode "https://big.example$target" "$tmp/big.bin"
encode "https://unknown.example/x" "$tmp/trivial.bin"

token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$token" >"$tmp/admin.token"
chmod 600 "$tmp/admin.token"

# start_gw TAG CATALOG_LINE: sets gw_pid, gw_port, gw_admin
start_gw() {
  gw_port="$(free_port)"; gw_admin="$(free_port)"
  mkdir -p "$tmp/data-$1"
  cat >"$tmp/$1.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $gw_port } },
  admin = { host = "127.0.0.1", port = $gw_admin, token_file = "admin.token" },
  workers = $workers,
  data_dir = "data-$1",
  log_level = "info",
  limits = { max_connections = 20000 },
  tenants = {
    { name = "big", hosts = { "big.example" }$2 },
  },
}
EOF
  "$bin" run -c "$tmp/$1.lua" >"$tmp/$1.log" 2>&1 &
  gw_pid=$!
  pids+=("$gw_pid")
  local i
  for i in $(seq 1200); do
    kill -0 "$gw_pid" 2>/dev/null || { tail -n 20 "$tmp/$1.log" >&2; die "tollgate ($1) exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$gw_port/readyz")" = 200 ] && return 0
    sleep 0.1
  done
  tail -n 20 "$tmp/$1.log" >&2
  die "tollgate ($1) not ready within 120 s"
}
stop_gw() {
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

call() { # call BODY OUT: prints the status
  curl -sS -o "$2" -w '%{http_code}' --max-time 10 -H 'Host: big.example' \
    -H 'Content-Type: application/proto' -H 'Connect-Protocol-Version: 1' \
    --data-binary @"$1" "http://127.0.0.1:$gw_port/ramp.v1.ExchangeService/DiscoverResources"
}
warm() { # a short identical warm-up, so both RSS figures are of processes that served traffic
  BENCH_BODY="$tmp/big.bin" BENCH_HOST=big.example \
    wrk -t"$threads" -c"$conns" -d1s -s "$here/connect.lua" "http://127.0.0.1:$gw_port" >/dev/null 2>&1
  BENCH_BODY="$tmp/trivial.bin" BENCH_HOST=big.example \
    wrk -t"$threads" -c"$conns" -d1s -s "$here/connect.lua" "http://127.0.0.1:$gw_port" >/dev/null 2>&1
  sleep 1
}

# Baseline: the same gateway, the tenant without a catalog source.
say "discover bench: baseline gateway (no catalog)"
start_gw base ""
warm
rss_without="$(rss_kb "$gw_pid")"
stop_gw "$gw_pid"

# log_ms LOG SKIP: the "ms" of the first catalog line of tenant big after line SKIP
log_field() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
for n, line in enumerate(open(sys.argv[1], errors="replace")):
    if n < int(sys.argv[2]) or not line.startswith("{"):
        continue
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("tenant") == "big" and str(r.get("msg", "")).startswith("catalog"):
        print(r["msg"].replace(" ", "_"), r.get("entries", "-"), r.get("ms", "-"))
        break
EOF
}

say "discover bench: gateway with the $entries-entry catalog"
t0="$(date +%s%N)"
start_gw big ", catalog = { source = \"big.xml\", refresh_s = 86400 }"
ready_ms=$((($(date +%s%N) - t0) / 1000000))
read -r msg loaded_entries load_ms <<<"$(log_field "$tmp/big.log" 0)"
[ "$msg" = catalog_loaded ] || { tail -n 20 "$tmp/big.log" >&2; die "no \"catalog loaded\" line for tenant big"; }

big_code="$(call "$tmp/big.bin" "$tmp/big.resp")"
triv_code="$(call "$tmp/trivial.bin" "$tmp/trivial.resp")"
[ "$big_code" = 200 ] || die "the big-tenant call answered $big_code"
[ "$triv_code" = 200 ] || die "the trivial call answered $triv_code"
decode() {
  protoc --decode=ramp.v1.DiscoverResourcesResponse -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" <"$1"
}
decode "$tmp/big.resp" >"$tmp/big.txt" || die "cannot decode the big-tenant answer"
decode "$tmp/trivial.resp" >"$tmp/trivial.txt" || die "cannot decode the trivial answer"
grep -q 'offers' "$tmp/big.txt" || { cat "$tmp/big.txt" >&2; die "the big-tenant answer holds no offer"; }
big_len="$(wc -c <"$tmp/big.resp")"; triv_len="$(wc -c <"$tmp/trivial.resp")"
say "discover bench: big-tenant answer $big_len bytes with an offer; trivial answer $triv_len bytes"
say "  offer: $(grep -E 'status|currency|amount|units|nanos' "$tmp/big.txt" | tr -s ' \n' ' ')"
say "  trivial: $(tr -s ' \n' ' ' <"$tmp/trivial.txt")"

warm
rss_with="$(rss_kb "$gw_pid")"

# Rebuild, twice: a new mtime makes each refresh rebuild instead of answering "unchanged".
# RSS after the second shows whether the first retired catalog was given back (steady) or kept.
rebuild_ms_list=(); rss_rebuilt=()
for k in 1 2; do
  skip="$(wc -l <"$tmp/big.log")"
  touch -m -d "@$(($(date +%s) + 5 * k))" "$tmp/big.xml"
  rc="$(curl -s -o /dev/null -w '%{http_code}' -X POST -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$gw_admin/catalog/refresh?tenant=big")"
  [ "$rc" = 202 ] || die "POST /catalog/refresh answered $rc"
  rebuild=""
  for _ in $(seq 1200); do
    rebuild="$(log_field "$tmp/big.log" "$skip")"
    [ -n "$rebuild" ] && break
    sleep 0.1
  done
  read -r rmsg _ r_ms <<<"$rebuild"
  [ "$rmsg" = catalog_loaded ] || die "the refresh did not rebuild: ${rebuild:-no log line within 120 s}"
  # One request on the worker, then the ingestion thread's once-a-second collection.
  call "$tmp/big.bin" "$tmp/big.resp" >/dev/null
  sleep 2
  rebuild_ms_list+=("$r_ms"); rss_rebuilt+=("$(rss_kb "$gw_pid")")
done
rebuild_ms="${rebuild_ms_list[0]}"; rebuild2_ms="${rebuild_ms_list[1]}"
rss_after_rebuild="${rss_rebuilt[0]}"; rss_after_rebuild2="${rss_rebuilt[1]}"

# wrk_run BODY -> "rps p50_us p99_us errors"
wrk_run() {
  BENCH_BODY="$1" BENCH_HOST=big.example BENCH_LABEL='"kind":"x"' \
    wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$here/connect.lua" \
    "http://127.0.0.1:$gw_port" >"$tmp/wrk.out" 2>&1 || { cat "$tmp/wrk.out" >&2; die "wrk failed"; }
  sed -n 's/^BENCHJSON //p' "$tmp/wrk.out" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(r["rps"], r["p50_us"], r["p99_us"], sum(r["errors"].values()))'
}
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

say "discover bench: $runs run(s) of ${duration}s each, wrk -t$threads -c$conns, gateway workers = $workers"
: >"$tmp/big.runs"; : >"$tmp/trivial.runs"
for i in $(seq "$runs"); do
  wrk_run "$tmp/trivial.bin" | tee -a "$tmp/trivial.runs" | sed "s/^/  trivial run $i: /" >&2
  wrk_run "$tmp/big.bin" | tee -a "$tmp/big.runs" | sed "s/^/  discover run $i: /" >&2
done
if [ "${BENCH_PERF:-0}" = 1 ]; then
  perf record -q -F 1999 -p "$gw_pid" -o "$tmp/perf.data" -- sleep "$duration" >/dev/null 2>&1 &
  perf_pid=$!
  wrk_run "$tmp/big.bin" >/dev/null
  wait "$perf_pid" || true
  perf report -i "$tmp/perf.data" --stdio --no-children --sort symbol 2>/dev/null |
    grep -E '^ +[0-9]' | head -40 >"$build/discover-perf.txt" || true
  say "discover bench: profile of one discover run (top symbols; $build/discover-perf.txt):"
  head -15 "$build/discover-perf.txt" >&2
fi
kill -0 "$gw_pid" 2>/dev/null || die "tollgate died during the runs"
rss_end="$(rss_kb "$gw_pid")"
stop_gw "$gw_pid"

col() { awk -v c="$1" '{ print $c }' "$2" | median; }
b_rps="$(col 1 "$tmp/big.runs")"; b_p50="$(col 2 "$tmp/big.runs")"; b_p99="$(col 3 "$tmp/big.runs")"
t_rps="$(col 1 "$tmp/trivial.runs")"; t_p50="$(col 2 "$tmp/trivial.runs")"; t_p99="$(col 3 "$tmp/trivial.runs")"
errs="$(awk '{ s += $4 } END { print s + 0 }' "$tmp/big.runs" "$tmp/trivial.runs")"
ratio="$(awk -v a="$b_rps" -v b="$t_rps" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }')"
bpe="$(awk -v w="$rss_with" -v o="$rss_without" -v n="$entries" 'BEGIN { printf "%.1f", (w - o) * 1024 / n }')"
bpe_rb="$(awk -v w="$rss_after_rebuild" -v o="$rss_without" -v n="$entries" 'BEGIN { printf "%.1f", (w - o) * 1024 / n }')"

printf '\n%-40s %12s %10s %10s\n' "call (medians of $runs)" "req/s" "p50 us" "p99 us"
printf '%-40s %12s %10s %10s\n' "trivial (TENANT_UNKNOWN)" "$t_rps" "$t_p50" "$t_p99"
printf '%-40s %12s %10s %10s\n' "discover, $entries-entry catalog" "$b_rps" "$b_p50" "$b_p99"
printf '%-40s %s\n' "discover / trivial" "${ratio}x (goal >= 0.8x; $errs wrk errors)"
printf '%-40s %s\n' "RSS without / with catalog" "$rss_without / $rss_with KiB (after rebuild 1: $rss_after_rebuild, after rebuild 2: $rss_after_rebuild2, after the runs: $rss_end KiB)"
printf '%-40s %s\n' "bytes per entry" "$bpe (goal <= 256; $bpe_rb after the rebuild)"
printf '%-40s %s\n' "catalog load" "$load_ms ms ($loaded_entries entries, $doc_bytes-byte document; ready after $ready_ms ms)"
printf '%-40s %s\n' "catalog rebuild" "$rebuild_ms ms (second: $rebuild2_ms ms)"

mkdir -p "$build"
cat >"$build/discover-bench.json" <<EOF
{"runs": $runs, "duration_s": $duration, "wrk_threads": $threads, "wrk_connections": $conns,
 "workers": $workers, "entries": $entries, "loaded_entries": $loaded_entries, "document_bytes": $doc_bytes,
 "licensed_fraction": 0.125,
 "trivial": {"rps": $t_rps, "p50_us": $t_p50, "p99_us": $t_p99},
 "discover": {"rps": $b_rps, "p50_us": $b_p50, "p99_us": $b_p99, "uri": "https://big.example$target"},
 "ratio": $ratio, "wrk_errors": $errs,
 "rss_kb": {"without_catalog": $rss_without, "with_catalog": $rss_with, "after_rebuild": $rss_after_rebuild, "after_rebuild2": $rss_after_rebuild2, "after_runs": $rss_end},
 "bytes_per_entry": $bpe, "bytes_per_entry_after_rebuild": $bpe_rb,
 "load_ms": $load_ms, "rebuild_ms": $rebuild_ms, "rebuild2_ms": $rebuild2_ms, "ready_ms": $ready_ms}
EOF
say "discover bench: JSON in $build/discover-bench.json"
