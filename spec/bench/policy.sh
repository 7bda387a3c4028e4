#!/usr/bin/env bash
# Benchmark: the per-tenant Lua policy pipeline (skip + rate_limit + price) against the same
# request with no policy hooks, and p99 while policies reload continuously against steady state.
# A separate command, not a test suite: it prints figures and writes JSON, it passes nothing.
# req/s counts the expected answers only (402 with the price); any other answer is reported in
# its own column ("not 402"), never as throughput.
#
# Usage: spec/bench/policy.sh [--quick]
#   --quick  one run of 3 s per setting (default: three alternating runs of 10 s, medians)
# Environment: BENCH_THREADS (2), BENCH_CONNS (64), BENCH_WORKERS (1), BENCH_BUILD_DIR
#   (build-bench), BENCH_TOLLGATE_BIN (use this binary instead of building one).
#
# One gateway serves two tenants on the HTTP resource path (GET, answered 402 with the price):
#   plain.example   a policy that defines no hooks: the pipeline runs no Lua at all
#   policy.example  skip (false), rate_limit (a limit never reached) and price, all in Lua
# Both answers come from the same C path; the difference is the three hook calls. The reload
# storm rewrites the policy and sends SIGHUP every 50 ms, alternating a changed good policy and a
# broken one, while wrk drives policy.example (SIGHUP reloads; the file watcher also sees
# each write, so more reloads are counted than sent).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"
quick=0
[ "${1:-}" = "--quick" ] && quick=1
threads="${BENCH_THREADS:-2}"
conns="${BENCH_CONNS:-64}"
workers="${BENCH_WORKERS:-1}"
if [ "$quick" -eq 1 ]; then duration=3; runs=1; else duration=10; runs=3; fi

say() { printf '%s\n' "$*" >&2; }
for tool in wrk curl cmake python3; do
  command -v "$tool" >/dev/null || { say "policy bench: $tool is not installed"; exit 1; }
done

bin="${BENCH_TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build "$build" -j2 --target tollgate >/dev/null
  bin="$build/tollgate"
fi

tmp="$(mktemp -d "${TMPDIR:-/tmp}/tollgate-policy-bench-XXXXXX")"
gw_pid=""
storm_pid=""
cleanup() {
  [ -n "$storm_pid" ] && kill "$storm_pid" 2>/dev/null || true
  if [ -n "$gw_pid" ]; then
    kill -TERM "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
port="$(free_port)"
admin="$(free_port)"
token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$token" >"$tmp/admin.token"
chmod 600 "$tmp/admin.token"

cat >"$tmp/plain.lua" <<'EOF'
return {}
EOF
# Every path at 0.001 USD (1000 atomic units), from the catalog as in production.
cat >"$tmp/price.xml" <<'EOF'
<rsl xmlns="https://rslstandard.org/rsl"><content url="/"><license>
<payment type="purchase"><amount currency="USD">0.001</amount></payment></license></content></rsl>
EOF
good_policy() { # good_policy PRICE
  cat <<EOF
local P = {}
function P.skip(req) return req.path == "/robots.txt" end
function P.rate_limit(req) return "ip:" .. req.ip, 1000000000, 1000000000 end
function P.price(offer, req)
  if req.purpose == "ai-train" then return offer.amount * 10, offer.currency end
  return offer.amount + $1, offer.currency
end
return P
EOF
}
good_policy 0 >"$tmp/policy.lua"

cat >"$tmp/tollgate.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $port } },
  admin = { host = "127.0.0.1", port = $admin, token_file = "admin.token" },
  workers = $workers,
  log_level = "error",
  limits = { max_connections = 20000 },
  tenants = {
    { name = "plain", hosts = { "plain.example" }, policy = "plain.lua",
      catalog = { source = "price.xml" } },
    { name = "policy", hosts = { "policy.example" }, policy = "policy.lua",
      catalog = { source = "price.xml" } },
  },
}
EOF

"$bin" run -c "$tmp/tollgate.lua" >"$tmp/gateway.log" 2>&1 &
gw_pid=$!
for _ in $(seq 100); do
  curl -s -o /dev/null "http://127.0.0.1:$port/healthz" && break
  sleep 0.05
done
for host in plain.example policy.example; do
  code="$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $host" "http://127.0.0.1:$port/articles/1")"
  [ "$code" = 402 ] || { say "policy bench: $host answered $code, expected 402"; cat "$tmp/gateway.log" >&2; exit 1; }
done

# wrk_run HOST -> "rps p50_us p99_us other"
# rps counts only the expected answers (402 with the price) per second of the run; every
# other answer (a 429, a 500, ...) and every socket error is "other", never throughput.
# wrk's own Requests/sec counts them all alike. Latencies are wrk's, over all answers.
wrk_run() {
  local out="$tmp/wrk.out"
  cat >"$tmp/host.lua" <<EOF
wrk.headers["Host"] = "$1"
local threads = {}
function setup(t) table.insert(threads, t) end
function init() expected, other = 0, 0 end
function response(status) if status == 402 then expected = expected + 1 else other = other + 1 end end
function done(summary)
  local n, o = 0, 0
  for _, t in ipairs(threads) do n = n + t:get("expected"); o = o + t:get("other") end
  local e = summary.errors
  io.write(string.format("COUNTS expected=%d other=%d socket_errors=%d duration_us=%d\n",
    n, o, e.connect + e.read + e.write + e.timeout, summary.duration))
end
EOF
  wrk -t"$threads" -c"$conns" -d"${duration}s" --latency -s "$tmp/host.lua" \
    "http://127.0.0.1:$port/articles/1" >"$out" 2>&1
  awk '
    function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1000000; return v }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    $1 == "COUNTS" {
      for (i = 2; i <= NF; i++) { split($i, kv, "="); c[kv[1]] = kv[2] }
      counted = 1
    }
    END {
      if (!counted || c["duration_us"] <= 0) { print "wrk printed no counts" > "/dev/stderr"; exit 1 }
      printf "%.2f %d %d %d\n", c["expected"] / (c["duration_us"] / 1000000), p50, p99, c["other"] + c["socket_errors"]
    }' "$out" || { cat "$out" >&2; exit 1; }
}

median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

say "policy bench: $runs run(s) of ${duration}s each, wrk -t$threads -c$conns, gateway workers = $workers"
: >"$tmp/plain.runs"
: >"$tmp/policy.runs"
for i in $(seq "$runs"); do
  wrk_run plain.example >>"$tmp/plain.runs"
  wrk_run policy.example >>"$tmp/policy.runs"
done

# Steady state, then the same load during a reload storm.
: >"$tmp/steady.runs"
: >"$tmp/storm.runs"
# The storm uses shell builtins only (printf, kill): forking curl 20 times a second would
# itself take a share of a 2-core machine from the gateway and blur the figure.
good_text() { good_policy "$1"; }
good_a="$(good_text 1)"
good_b="$(good_text 2)"
storm() {
  local n=0
  while :; do
    n=$((n + 1))
    case $((n % 4)) in
      1) printf '%s\n' "$good_a" >"$tmp/policy.lua" ;;
      3) printf '%s\n' "$good_b" >"$tmp/policy.lua" ;;
      *) printf 'return { price = function( end\n' >"$tmp/policy.lua" ;;
    esac
    kill -HUP "$gw_pid"
    sleep 0.05
  done
}
for i in $(seq "$runs"); do
  good_policy 0 >"$tmp/policy.lua"
  curl -s -o /dev/null -X POST -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/reload"
  wrk_run policy.example >>"$tmp/steady.runs"
  storm &
  storm_pid=$!
  wrk_run policy.example >>"$tmp/storm.runs"
  kill "$storm_pid" 2>/dev/null || true
  wait "$storm_pid" 2>/dev/null || true
  storm_pid=""
done
reloads="$(curl -s -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics" |
  awk '/^policy_reloads_total\{tenant_id="policy"/ { s += $2 } END { print s + 0 }')"

col() { awk -v c="$1" '{ print $c }' "$2" | median; }
sum() { awk -v c="$1" '{ s += $c } END { print s + 0 }' "$2"; }
p_rps="$(col 1 "$tmp/plain.runs")"; p_p50="$(col 2 "$tmp/plain.runs")"; p_p99="$(col 3 "$tmp/plain.runs")"
q_rps="$(col 1 "$tmp/policy.runs")"; q_p50="$(col 2 "$tmp/policy.runs")"; q_p99="$(col 3 "$tmp/policy.runs")"
s_rps="$(col 1 "$tmp/steady.runs")"; s_p99="$(col 3 "$tmp/steady.runs")"
r_rps="$(col 1 "$tmp/storm.runs")"; r_p99="$(col 3 "$tmp/storm.runs")"
p_other="$(sum 4 "$tmp/plain.runs")"; q_other="$(sum 4 "$tmp/policy.runs")"
s_other="$(sum 4 "$tmp/steady.runs")"; r_other="$(sum 4 "$tmp/storm.runs")"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "n/a" }'; }
cost="$(awk -v a="$q_rps" -v b="$p_rps" 'BEGIN { if (b > 0) printf "%.1f", (1 - a / b) * 100; else print "n/a" }')"

# req/s: 402 answers only; "not 402": the other answers and socket errors, summed over runs.
printf '\n%-34s %12s %10s %10s %10s\n' "setting (medians of $runs)" "402 req/s" "p50 us" "p99 us" "not 402"
printf '%-34s %12s %10s %10s %10s\n' "no hooks (plain.example)" "$p_rps" "$p_p50" "$p_p99" "$p_other"
printf '%-34s %12s %10s %10s %10s\n' "skip+rate_limit+price (Lua)" "$q_rps" "$q_p50" "$q_p99" "$q_other"
printf '%-34s %12s\n' "pipeline / no hooks" "$(ratio "$q_rps" "$p_rps")x (${cost}% fewer req/s; goal <= 15%)"
printf '%-34s %12s %10s %10s %10s\n' "steady state" "$s_rps" "" "$s_p99" "$s_other"
printf '%-34s %12s %10s %10s %10s\n' "during reload storm" "$r_rps" "" "$r_p99" "$r_other"
printf '%-34s %12s\n' "p99 storm / steady" "$(ratio "$r_p99" "$s_p99")x (goal <= 1.1x; $reloads reloads counted)"
if [ $((p_other + q_other + s_other + r_other)) -gt 0 ]; then
  say "policy bench: some answers were not the expected 402 (column \"not 402\"): left out of req/s"
fi

mkdir -p "$build"
cat >"$build/policy-bench.json" <<EOF
{"runs": $runs, "duration_s": $duration, "wrk_threads": $threads, "wrk_connections": $conns,
 "workers": $workers,
 "no_hooks": {"rps": $p_rps, "p50_us": $p_p50, "p99_us": $p_p99, "not_402": $p_other},
 "pipeline": {"rps": $q_rps, "p50_us": $q_p50, "p99_us": $q_p99, "not_402": $q_other},
 "pipeline_ratio": $(ratio "$q_rps" "$p_rps"),
 "steady": {"rps": $s_rps, "p99_us": $s_p99, "not_402": $s_other},
 "reload_storm": {"rps": $r_rps, "p99_us": $r_p99, "not_402": $r_other, "reloads_counted": $reloads},
 "storm_p99_ratio": $(ratio "$r_p99" "$s_p99")}
EOF
say "policy bench: JSON in $build/policy-bench.json"
