#!/usr/bin/env bash
# Benchmark: ExecuteTransaction billed by a remote Connect billing service (billing type
# "connect", the test double spec/interop/lib/billing_service.js on loopback) against the
# embedded ledger (builtin), in one gateway; then the cost of deferred mode during a billing
# outage against billing up, and how long the reconciler takes to bill the backlog.
# A separate command, not a test: it prints figures, it passes nothing.
#
# Usage: spec/bench/billing.sh [--quick]
#   --quick  one run of 3 s per row (default: three alternating runs of 8 s, medians)
# Environment: BENCH_THREADS (2), BENCH_CONNS (8), BENCH_DURATION (s), BENCH_RUNS,
#   BENCH_WORKERS (1), BENCH_DEADLINE_MS (30: the Authorize deadline), BENCH_DRAIN_MAX_S (60:
#   the longest wait for the reconciler), BENCH_BUILD_DIR (build-bench), BENCH_TOLLGATE_BIN.
#
# One gateway, two tenants with the same RSL catalog (every path sold for 1 micro-USD) and
# signer: "local" (builtin billing, prepaid account acct-bench of 2^53 micro-USD) and "remote"
# (billing type connect, deferred_cap 2^53, a policy that answers "deferred" when billing
# fails). The billing service runs standalone (node, one process) with acct-bench funded.
# Rows, each wrk with purchase.lua (a unique idempotency key per request):
#   local   ExecuteTransaction on the local tenant
#   remote  the same on the remote tenant, billing up: Authorize before the answer, Capture after
#   outage  the remote tenant with the billing service down (SIGUSR1: its port held bound, not
#           listening): every purchase answered DEFERRED from the policy (the circuit open)
# local and remote alternate; one outage run comes last. Then billing comes back (SIGUSR2) and
# the script waits until the service has charged every remote purchase the gateway answered
# (exchange_transaction_total of the remote tenant), and prints the time that took and the
# service's counters (calls, charges, ids charged twice). CPU per request of tollgate and of
# the service (utime+stime over the run) per row. 8 connections: at 32 the one node process of
# the service answers past the 30 ms deadline, the circuit opens and the "billing up" row is
# mostly DEFERRED answers (spec/bench/README.md).
# Prints the table; raw output in <build>/billing-logs/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
interop="$root/spec/interop"
build="${BENCH_BUILD_DIR:-$root/build-bench}"

usage() { sed -n '8,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
quick=0
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
threads="${BENCH_THREADS:-2}"
conns="${BENCH_CONNS:-8}"
workers="${BENCH_WORKERS:-1}"
deadline_ms="${BENCH_DEADLINE_MS:-30}"
drain_max="${BENCH_DRAIN_MAX_S:-60}"
if [ "$quick" -eq 1 ]; then
  duration="${BENCH_DURATION:-3}"; runs="${BENCH_RUNS:-1}"
else
  duration="${BENCH_DURATION:-8}"; runs="${BENCH_RUNS:-3}"
fi

say() { printf '%s\n' "$*" >&2; }
die() { say "billing bench: $*"; exit 1; }
for tool in wrk curl cmake protoc python3 node; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

bin="${BENCH_TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  if ! grep -qs '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  cmake --build "$build" -j2 --target tollgate >/dev/null || die "build failed: cmake --build $build --target tollgate"
  bin="$build/tollgate"
fi
[ -x "$bin" ] || die "$bin is not executable"
mkdir -p "$build"

# The billing service's generated code (spec/interop/run-suite.sh makes it for the suite).
[ -x "$interop/node_modules/.bin/protoc-gen-es" ] || die "no spec/interop/node_modules: run (cd spec/interop && npm ci)"
if [ ! -f "$interop/gen/billing/v1/billing_pb.js" ]; then
  (cd "$interop" && mkdir -p gen && protoc --plugin=protoc-gen-es=node_modules/.bin/protoc-gen-es \
    --es_out=gen --es_opt=target=js,import_extension=js -I ../../proto billing/v1/billing.proto) ||
    die "protoc-gen-es failed"
fi

tmp="$(mktemp -d /tmp/tollgate-billing-bench.XXXXXX)"
logs="$build/billing-logs"
gw_pid=""; svc_pid=""
cleanup() {
  [ -z "$gw_pid" ] || { kill -TERM "$gw_pid" 2>/dev/null || true; wait "$gw_pid" 2>/dev/null || true; }
  [ -z "$svc_pid" ] || { kill -TERM "$svc_pid" 2>/dev/null || true; wait "$svc_pid" 2>/dev/null || true; }
  rm -rf "$logs"; mkdir -p "$logs"
  cp "$tmp"/*.txt "$tmp"/*.log "$tmp"/*.jsonl "$logs"/ 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
rand_hex() { head -c "$1" /dev/urandom | od -An -tx1 | tr -d ' \n'; }

token="$(rand_hex 16)"; printf '%s\n' "$token" >"$tmp/admin.token"
rand_hex 16 >"$tmp/billing.token"
rand_hex 24 >"$tmp/signer.key"
chmod 600 "$tmp/admin.token" "$tmp/billing.token" "$tmp/signer.key"
cat >"$tmp/catalog.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl"><content url="/"><license><payment type="purchase"><amount currency="USD">0.000001</amount></payment></license></content></rsl>
EOF
cat >"$tmp/deferred.lua" <<'EOF'
local P = {}
function P.on_billing_timeout(txn) return "deferred" end
P.fixtures = { { hook = "on_billing_timeout", txn = { amount = 1 }, expect = { "deferred" } } }
return P
EOF

# The billing service, standalone.
svc_port="$(free_port)"
node "$interop/lib/billing_service.js" --port "$svc_port" --token-file "$tmp/billing.token" \
  --balance acct-bench=4611686018427387904 >"$tmp/billing-service.log" 2>&1 &
svc_pid=$!
for i in $(seq 100); do
  grep -q "listening on" "$tmp/billing-service.log" 2>/dev/null && break
  kill -0 "$svc_pid" 2>/dev/null || { cat "$tmp/billing-service.log" >&2; die "the billing service exited"; }
  sleep 0.1
done
grep -q "listening on" "$tmp/billing-service.log" || die "the billing service did not start"
svc_totals() { # the service's counters as JSON (SIGHUP prints them)
  local n
  n="$(grep -c BILLINGJSON "$tmp/billing-service.log" || true)"
  kill -HUP "$svc_pid"
  for i in $(seq 50); do
    [ "$(grep -c BILLINGJSON "$tmp/billing-service.log" || true)" -gt "$n" ] && break
    sleep 0.05
  done
  grep BILLINGJSON "$tmp/billing-service.log" | tail -n1 | sed 's/^BILLINGJSON //'
}
svc_signal() { # svc_signal USR1|USR2 down|up: and wait for the service to say it is done
  local n
  n="$(grep -c "^$2\$" "$tmp/billing-service.log" || true)"
  kill -"$1" "$svc_pid"
  for i in $(seq 100); do
    [ "$(grep -c "^$2\$" "$tmp/billing-service.log" || true)" -gt "$n" ] && return 0
    sleep 0.05
  done
  die "the billing service did not go $2"
}

port="$(free_port)"; admin="$(free_port)"
mkdir -p "$tmp/data"
cat >"$tmp/tollgate.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $port } },
  admin = { host = "127.0.0.1", port = $admin, token_file = "admin.token" },
  workers = $workers,
  data_dir = "data",
  log_level = "warn",
  limits = { max_connections = 20000 },
  exchange = { offer_ttl_s = 86400 },
  ledger = { accounts = { { billing_reference = "acct-bench", amount = 9007199254740992 } } },
  tenants = {
    { name = "local", hosts = { "local.example" },
      catalog = { source = "catalog.xml", refresh_s = 86400 },
      signer = { type = "nginx_secure_link", key_file = "signer.key" },
      billing = { type = "builtin" } },
    { name = "remote", hosts = { "remote.example" },
      catalog = { source = "catalog.xml", refresh_s = 86400 },
      policy = "deferred.lua",
      signer = { type = "nginx_secure_link", key_file = "signer.key" },
      billing = { type = "connect", url = "http://127.0.0.1:$svc_port", token_file = "billing.token",
                  deadline_ms = $deadline_ms, call_timeout_ms = 5000, breaker_failures = 5,
                  breaker_cooldown_ms = 5000, health_interval_ms = 1000, deferred_cap = 9007199254740992,
                  reconcile_backoff_ms = 200, reconcile_max_backoff_ms = 2000 } },
  },
}
EOF
"$bin" run -c "$tmp/tollgate.lua" >"$tmp/tollgate.log" 2>&1 &
gw_pid=$!
for i in $(seq 300); do
  kill -0 "$gw_pid" 2>/dev/null || { tail -n 20 "$tmp/tollgate.log" >&2; die "tollgate exited at start"; }
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/healthz")" = 200 ] && break
  sleep 0.1
done

ai_system='ai_system {
  name: "Bench Purchasing Agent"
  id: "sys-bench-01"
  usage_purposes: USAGE_PURPOSE_AI_INPUT
  user_type: USER_TYPE_COMMERCIAL
  billing_reference: "acct-bench"
}'
placeholder="@@@@@@@@@@@@@@@@@@@@@@@@"
proto_args=(-I "$root/proto" "$root/proto/ramp/v1/exchange.proto")
xpath="/ramp.v1.ExchangeService/ExecuteTransaction"
post() { # post HOST PATH BODY OUT: prints the status
  curl -sS -o "$4" -w '%{http_code}' --max-time 10 -H "Host: $1" \
    -H 'Content-Type: application/proto' -H 'Connect-Protocol-Version: 1' \
    --data-binary @"$3" "http://127.0.0.1:$port$2" 2>/dev/null || true
}
decode() { protoc --decode="ramp.v1.$1" "${proto_args[@]}" <"$2"; }
metrics() {
  curl -sS --max-time 10 -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics" || die "GET /metrics failed"
}
# exchange_transaction_total of TENANT with STATUS (summed)
tx_count() {
  metrics | python3 -c '
import re, sys
t, s = sys.argv[1], sys.argv[2]
n = 0
for line in sys.stdin:
    m = re.match(r"^exchange_transaction_total\{([^}]*)\}\s+(\S+)", line)
    if m and ("tenant_id=\"%s\"" % t) in m.group(1) and ("status=\"%s\"" % s) in m.group(1):
        n += float(m.group(2))
print(int(n))' "$1" "$2"
}

# One request body per tenant: the tenant's offer for one URI, a placeholder key.
for t in local remote; do
  printf '%s\nresources { uri: "https://%s.example/articles/bench-1" }\n' "$ai_system" "$t" |
    protoc --encode=ramp.v1.DiscoverResourcesRequest "${proto_args[@]}" >"$tmp/discover-$t.bin"
  code="$(post "$t.example" /ramp.v1.ExchangeService/DiscoverResources "$tmp/discover-$t.bin" "$tmp/discover-$t.out")"
  [ "$code" = 200 ] || die "DiscoverResources ($t) answered $code"
  offer="$(decode DiscoverResourcesResponse "$tmp/discover-$t.out" | sed -n 's/^ *id: "\(.*\)"$/\1/p' | head -n1)"
  [ -n "$offer" ] || die "no offer for the $t tenant"
  printf '%s\nidempotency_key: "%s"\nitems { offer_id: "%s" }\n' "$ai_system" "$placeholder" "$offer" |
    protoc --encode=ramp.v1.ExecuteTransactionRequest "${proto_args[@]}" >"$tmp/execute-$t.bin"
  key="check-$t-"; while [ "${#key}" -lt "${#placeholder}" ]; do key="${key}0"; done
  sed "s/$placeholder/$key/" "$tmp/execute-$t.bin" >"$tmp/check-$t.bin"
  code="$(post "$t.example" "$xpath" "$tmp/check-$t.bin" "$tmp/check-$t.out")"
  decode ExecuteTransactionResponse "$tmp/check-$t.out" >"$tmp/check-$t.txt" 2>/dev/null || true
  [ "$code" = 200 ] && grep -q TRANSACTION_STATUS_APPROVED "$tmp/check-$t.txt" ||
    { cat "$tmp/check-$t.txt" "$tmp/check-$t.out" >&2; echo >&2; tail -n 20 "$tmp/tollgate.log" >&2
      die "one $t purchase answered $code, not APPROVED (is billing type connect wired?)"; }
done
sleep 0.5
tot="$(svc_totals)"
python3 -c 'import json,sys; t=json.loads(sys.argv[1]); sys.exit(0 if t["authorize"] >= 1 and t["charged_ids"] >= 1 else 1)' "$tot" ||
  die "the remote tenant's purchase never reached the billing service ($tot): is billing type connect wired?"
say "billing bench: one checked purchase per tenant APPROVED; service $tot"

: >"$tmp/results.jsonl"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# wrk_run ROW TENANT TAG SECONDS: one run; its line (with the CPU per request of tollgate and
# of the billing service) appended to results.jsonl
wrk_run() {
  local row="$1" t="$2" tag="$3" secs="$4" out="$tmp/wrk-$1-$3.txt"
  local g0 s0 g1 s1
  g0="$(cpu_ticks "$gw_pid")"; s0="$(cpu_ticks "$svc_pid")"
  BENCH_BODY="$tmp/execute-$t.bin" BENCH_PATH="$xpath" BENCH_PLACEHOLDER="$placeholder" BENCH_KEY_PREFIX="$tag" \
    BENCH_HOST="$t.example" BENCH_EXPECT=approved BENCH_LABEL="\"row\":\"$row\",\"tag\":\"$tag\"" \
    wrk -t"$threads" -c"$conns" -d"${secs}s" -s "$here/purchase.lua" "http://127.0.0.1:$port" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed"; }
  g1="$(cpu_ticks "$gw_pid")"; s1="$(cpu_ticks "$svc_pid")"
  python3 - "$out" "$g0" "$g1" "$s0" "$s1" "$(getconf CLK_TCK)" "$tmp/results.jsonl" <<'EOF2' >&2
import json, sys
out, g0, g1, s0, s1, hz, res = sys.argv[1:]
r = json.loads([l for l in open(out) if l.startswith("BENCHJSON ")][-1][10:])
n = max(r["requests"], 1)
r["gw_cpu_us"] = round((int(g1) - int(g0)) / int(hz) * 1e6 / n, 1)
r["svc_cpu_us"] = round((int(s1) - int(s0)) / int(hz) * 1e6 / n, 1)
r["load1"] = float(open("/proc/loadavg").read().split()[0])
open(res, "a").write(json.dumps(r) + "\n")
print("  %-7s %-4s %8.0f req/s  p50 %6d us  p99 %7d us  approved %d, other %d, non-200 %d, errors %d; cpu/req tollgate %.1f us, service %.1f us; load %.1f" % (
    r["row"], r["tag"], r["rps"], r["p50_us"], r["p99_us"], r.get("approved", 0), r.get("not_approved", 0),
    r["status_other"], sum(r["errors"].values()), r["gw_cpu_us"], r["svc_cpu_us"], r["load1"]))
EOF2
}

say "billing bench: wrk -t$threads -c$conns, $runs run(s) of ${duration}s per row; workers $workers; deadline ${deadline_ms} ms"
wrk_run local local wl 1 >/dev/null 2>&1
wrk_run remote remote wr 1 >/dev/null 2>&1
for r in $(seq "$runs"); do
  wrk_run local local "l$r" "$duration"
  wrk_run remote remote "r$r" "$duration"
done
svc_signal USR1 down
sleep 1
# One outage run: the backlog it leaves is what the reconciler then bills.
wrk_run outage remote o1 "$duration"
# Remote purchases answered (APPROVED or DEFERRED, whichever status label the gateway counts
# DEFERRED under), and how many of them were deferred.
sold=$(( $(tx_count remote approved) + $(tx_count remote deferred) ))
deferred="$(metrics | python3 -c '
import re, sys
n = 0
for line in sys.stdin:
    m = re.match(r"^billing_deferred_total\{([^}]*)\}\s+(\S+)", line)
    if m and "tenant_id=\"remote\"" in m.group(1) and "result=\"deferred\"" in m.group(1):
        n += float(m.group(2))
print(int(n))')"
n0="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["charged_ids"])' "$(svc_totals)")"
t0="$(date +%s.%N)"
svc_signal USR2 up
say "billing bench: billing back up; waiting (at most ${drain_max}s) for $sold charges ($deferred deferred)"
while :; do
  tot="$(svc_totals)"
  n="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["charged_ids"])' "$tot")"
  [ "$n" -ge "$sold" ] && break
  python3 -c "import sys,time; sys.exit(0 if time.time() - $t0 < $drain_max else 1)" ||
    { say "billing bench: $n of $sold charged after ${drain_max}s; stopping the wait"; break; }
  sleep 1
done
t1="$(date +%s.%N)"
tot="$(svc_totals)"
echo "$tot" >"$tmp/service-totals.txt"
metrics >"$tmp/metrics.txt"

python3 - "$tmp/results.jsonl" "$tot" "$t0" "$t1" "$sold" "$deferred" "$n0" <<EOF
import json, statistics, sys
res, tot, t0, t1, sold, deferred, n0 = sys.argv[1:]
rows = [json.loads(l) for l in open(res)]
tot = json.loads(tot)
med = lambda v: statistics.median(v) if v else None
def row(name):
    rs = [r for r in rows if r["row"] == name and r["tag"][1:].isdigit()]
    return {k: med([r[k] for r in rs]) for k in ("rps", "p50_us", "p99_us", "gw_cpu_us", "svc_cpu_us")} | {
        "approved": sum(r.get("approved", 0) for r in rs), "other": sum(r.get("not_approved", 0) for r in rs),
        "non200": sum(r["status_other"] for r in rs), "runs": len(rs)}
L, R, O = row("local"), row("remote"), row("outage")
print()
print("ExecuteTransaction, one item, wrk -t$threads -c$conns -d${duration}s, workers $workers, deadline ${deadline_ms} ms; medians of %d run(s) (outage: %d)" % (L["runs"], O["runs"]))
print("%-32s %8s %8s %8s %9s %8s %7s %9s %9s" % ("row", "req/s", "p50 us", "p99 us", "approved", "other", "non-200", "gw us/rq", "svc us/rq"))
for name, r in (("local (builtin ledger)", L), ("remote (Connect billing, up)", R), ("remote, billing down (deferred)", O)):
    print("%-32s %8.0f %8d %8d %9d %8d %7d %9.1f %9.1f" % (name, r["rps"], r["p50_us"], r["p99_us"], r["approved"], r["other"],
                                                        r["non200"], r["gw_cpu_us"], r["svc_cpu_us"]))
print("(other: answers not APPROVED; in the remote rows DEFERRED, billing over the deadline or down)")
f = lambda a, b: "%.2fx" % (a / b) if a and b else "-"
print()
print("remote/local: req/s %s, p50 %s, p99 %s, tollgate CPU per request %s" % (
    f(R["rps"], L["rps"]), f(R["p50_us"], L["p50_us"]), f(R["p99_us"], L["p99_us"]), f(R["gw_cpu_us"], L["gw_cpu_us"])))
print("outage/up (deferred during an outage against billing up): req/s %s, p50 %s, p99 %s, tollgate CPU per request %s" % (
    f(O["rps"], R["rps"]), f(O["p50_us"], R["p50_us"]), f(O["p99_us"], R["p99_us"]), f(O["gw_cpu_us"], R["gw_cpu_us"])))
secs = float(t1) - float(t0)
late = tot["charged_ids"] - int(n0)
print("reconciliation: %d of %s remote purchases charged (%s deferred by the gateway); %d charged in the %.1f s after billing came back (%.0f/s)" % (
    tot["charged_ids"], sold, deferred, late, secs, late / secs if secs > 0 else 0))
print("billing service: %d Authorize, %d Capture, %d Release, %d Health calls over %d TCP connections; %d charges, %d ids charged twice, %d unauthenticated" % (
    tot["authorize"], tot["capture"], tot["release"], tot["health"], tot["connections"], tot["charges"], tot["charged_twice"], tot["unauthenticated"]))
EOF
say ""
say "raw output: $logs/"
