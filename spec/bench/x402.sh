#!/usr/bin/env bash
# Benchmark: tollgate's HTTP 402 paywall (x402 v2) against nginx + Lua and @x402/express, and
# paid requests with local verification against facilitator verification.
# A separate command, not a test suite: it prints figures, it passes or fails nothing.
#
# Usage: spec/bench/x402.sh [--quick]
#   --quick  one run of 5 s per server and setting, 1000 payments per paid run
#            (default: three alternating runs of 10 s, medians; 2000 payments per paid run)
# Environment: BENCH_THREADS (2), BENCH_CONNS (64), BENCH_DURATION (s), BENCH_RUNS,
#   BENCH_WORKERS ("1 all": the unpaid settings, in order; "" skips the unpaid part),
#   BENCH_PAID (payments per paid run),
#   BENCH_PAID_WORKERS (1: tollgate workers for the paid part), BENCH_DRAIN_TIMEOUT (900 s),
#   BENCH_BUILD_DIR (build-bench), BENCH_TOLLGATE_BIN (use this binary instead of building).
#
# Starts the interop kit's chain (spec/interop/lib/chain.js --demo on free ports: anvil, an
# EIP-3009 test token "USDC" v2 with 6 decimals, funded buyers, the real @x402/evm
# facilitator), then:
#  1. Unpaid challenges. A tenant (bench.example) whose RSL catalog prices /articles/* at
#     0.001 USD (1000 atomic units of the token), with a `payments` section for the chain and
#     serve = "redirect" (nginx_secure_link signer). Its 402 to GET /articles/bench-1 is
#     captured; nginx answers the same status, PAYMENT-REQUIRED, Cache-Control, Content-Type
#     and body bytes from Lua (content_by_lua_file); x402_express.mjs is express 5 with
#     @x402/express's paymentMiddleware for the same route and price, on the kit's
#     facilitator. wrk (x402_wrk.lua) on each, alternating, per setting: one worker
#     (workers = 1, worker_processes 1, one node process) and all cores (workers = 0,
#     worker_processes auto, node:cluster with one process per core).
#  2. Paid requests. One tollgate (workers BENCH_PAID_WORKERS) with two tenants priced the
#     same, both settle = "async" through the facilitator: local.example verify = "local"
#     (the JSON-RPC provider is anvil), facil.example verify = "facilitator". Per run and
#     tenant, BENCH_PAID fresh payments pre-signed by x402_presign.mjs, each sent exactly
#     once by wrk (x402_wrk.lua, paid mode); 302 = served, anything else is counted and shown.
#     After each run the script waits for the settlement queue to drain (the admin /metrics:
#     t402_unsettled_amount of the tenant back to 0, t402_settlements_total{status="settled"}
#     up by the served count) and checks on chain that payTo's balance rose by exactly
#     served x 1000. Runs alternate local and facilitator.
# Prints tables; writes <build>/x402-bench.json and each run's raw output to <build>/x402-logs/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"

usage() { sed -n '6,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
quick=0
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
threads="${BENCH_THREADS:-2}"
conns="${BENCH_CONNS:-64}"
settings="${BENCH_WORKERS-1 all}"
paid_workers="${BENCH_PAID_WORKERS:-1}"
drain_timeout="${BENCH_DRAIN_TIMEOUT:-900}"
if [ "$quick" -eq 1 ]; then
  duration="${BENCH_DURATION:-5}"; runs="${BENCH_RUNS:-1}"; paid_k="${BENCH_PAID:-1000}"; warmup=1
else
  duration="${BENCH_DURATION:-10}"; runs="${BENCH_RUNS:-3}"; paid_k="${BENCH_PAID:-2000}"; warmup=2
fi
ncores="$(nproc)"
clk_tck="$(getconf CLK_TCK)"
price_usd="0.001"
amount=1000 # atomic units of the 6-decimal token for price_usd
path="/articles/bench-1"

say() { printf '%s\n' "$*" >&2; }
die() { say "x402 bench: $*"; exit 1; }
for tool in wrk nginx curl node cmake; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ -d "$root/spec/interop/node_modules/@x402/express" ] || die "spec/interop/node_modules is missing: npm ci in spec/interop"
find_module() {
  local f
  for f in "/usr/lib/nginx/modules/$1" "/usr/share/nginx/modules/$1"; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  return 1
}
ndk_so="$(find_module ndk_http_module.so)" || die "nginx NDK module not found (libnginx-mod-http-ndk)"
lua_so="$(find_module ngx_http_lua_module.so)" || die "nginx Lua module not found (libnginx-mod-http-lua)"
ulimit -n 65536 2>/dev/null || true

# Release build of the binary under test (incremental); BENCH_TOLLGATE_BIN measures a given one.
bin="${BENCH_TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  if ! grep -qs '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
    say "x402 bench: configuring $build (Release)"
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  say "x402 bench: building tollgate in $build"
  cmake --build "$build" -j2 --target tollgate >/dev/null || die "build failed: cmake --build $build --target tollgate"
  bin="$build/tollgate"
fi
[ -x "$bin" ] || die "$bin is not executable"
mkdir -p "$build"

tmp="$(mktemp -d /tmp/tollgate-x402-bench.XXXXXX)"
logs="$build/x402-logs"
pids=()

stop_pid() { # SIGTERM, then SIGKILL after 5 s; reaps our own child
  local pid="$1" i st
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    st="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [ -z "$st" ] || [ "${st#Z}" != "$st" ] && break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
forget_pid() {
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}
cleanup() {
  local i
  # Newest first: servers, then the chain (its node process stops anvil and the facilitator).
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do stop_pid "${pids[$i]}"; done
  pids=()
  rm -rf "$logs"
  mkdir -p "$logs"
  cp "$tmp"/*.txt "$tmp"/*.log "$tmp"/*.jsonl "$tmp"/*.prom "$logs"/ 2>/dev/null || true
  local d
  for d in "$tmp"/nginx-*/; do
    [ -f "$d/error.log" ] && cp "$d/error.log" "$logs/$(basename "$d")-error.log"
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}
alive() { local st; st="$(ps -o stat= -p "$1" 2>/dev/null || true)"; [ -n "$st" ] && [ "${st#Z}" = "$st" ]; }
wait_http() { # wait_http URL PID WHAT LOG [SECONDS]: until URL answers anything
  local i
  for i in $(seq 1 $((${5:-30} * 10))); do
    alive "$2" || { tail -n 30 "$4" >&2 2>/dev/null; die "$3 exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null)" != 000 ] && return 0
    sleep 0.1
  done
  tail -n 30 "$4" >&2 2>/dev/null
  die "$3 did not answer within ${5:-30} s"
}

# ---------------------------------------------------------------- the chain

rpc_port="$(free_port)"; fac_port="$(free_port)"
say "x402 bench: starting the interop kit's chain and facilitator (anvil :$rpc_port, facilitator :$fac_port)"
node "$root/spec/interop/lib/chain.js" --demo --port "$rpc_port" --facilitator-port "$fac_port" >"$tmp/chain.log" 2>&1 &
chain_pid=$!
pids+=("$chain_pid")
for i in $(seq 1 600); do
  grep -q '^facilitator ' "$tmp/chain.log" && grep -q 'Ctrl-C' "$tmp/chain.log" && break
  alive "$chain_pid" || { cat "$tmp/chain.log" >&2; die "the chain did not start"; }
  sleep 0.1
done
grep -q 'Ctrl-C' "$tmp/chain.log" || { cat "$tmp/chain.log" >&2; die "the chain did not start within 60 s"; }
rpc="http://127.0.0.1:$rpc_port"
fac_url="http://127.0.0.1:$fac_port"
asset="$(sed -n 's/^token *\(0x[0-9a-fA-F]*\) .*/\1/p' "$tmp/chain.log")"
pay_to="$(sed -n 's/^payTo *\(0x[0-9a-fA-F]*\).*/\1/p' "$tmp/chain.log")"
[ -n "$asset" ] && [ -n "$pay_to" ] || { cat "$tmp/chain.log" >&2; die "cannot read the token and payTo addresses"; }

balance_of() { # balance_of ADDRESS: the token balance (decimal), read with eth_call
  local a="${1#0x}" out
  out="$(curl -sS --max-time 10 -H 'Content-Type: application/json' "$rpc" \
    -d "{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"eth_call\",\"params\":[{\"to\":\"$asset\",\"data\":\"0x70a08231000000000000000000000000${a,,}\"},\"latest\"]}")"
  node -e 'const r = JSON.parse(process.argv[1]); if (!r.result) process.exit(1); console.log(BigInt(r.result).toString())' "$out" ||
    die "balanceOf failed: $out"
}

# ---------------------------------------------------------------- tollgate

cat >"$tmp/pay.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/articles/*">
    <license>
      <permits type="usage">all</permits>
      <payment type="purchase"><amount currency="USD">$price_usd</amount></payment>
    </license>
  </content>
</rsl>
EOF
token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$token" >"$tmp/admin.token"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/cdn.key"
chmod 600 "$tmp/admin.token" "$tmp/cdn.key"

# tenant_lua NAME HOST MAX_TIMEOUT_S EXTRA: one paywalled tenant (Lua source)
tenant_lua() {
  cat <<EOF
    { name = "$1", hosts = { "$2" },
      catalog = { source = "pay.xml", refresh_s = 86400 },
      signer = { type = "nginx_secure_link", base_url = "http://cdn.bench.example", key_file = "cdn.key" },
      payments = {
        accepts = { { network = "eip155:84532", network_v1 = "base-sepolia", asset = "$asset",
                      name = "USDC", version = "2", pay_to = "$pay_to", decimals = 6, max_timeout_s = $3 } },
        facilitators = { "$fac_url" },
        settle = "async", serve = "redirect",$4
      } },
EOF
}

tg_pid=""; tg_port=""; tg_admin=""; tg_tag=""
start_tollgate() { # start_tollgate TAG WORKERS TENANTS_LUA
  tg_tag="$1"; tg_port="$(free_port)"; tg_admin="$(free_port)"
  mkdir -p "$tmp/data-$1"
  cat >"$tmp/tollgate-$1.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $tg_port } },
  admin = { host = "127.0.0.1", port = $tg_admin, token_file = "admin.token" },
  workers = $2,
  data_dir = "data-$1",
  log_level = "warn",
  limits = { max_connections = 20000, idle_timeout_ms = 600000, shutdown_grace_ms = 1000 },
  tenants = {
$3
  },
}
EOF
  (cd "$tmp" && exec "$bin" run -c "tollgate-$1.lua") >"$tmp/tollgate-$1.log" 2>&1 &
  tg_pid=$!
  pids+=("$tg_pid")
  local i
  for i in $(seq 1 300); do
    alive "$tg_pid" || { tail -n 20 "$tmp/tollgate-$1.log" >&2; die "tollgate ($1) exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$tg_port/readyz")" = 200 ] && return 0
    sleep 0.1
  done
  tail -n 20 "$tmp/tollgate-$1.log" >&2
  die "tollgate ($1) not ready within 30 s"
}
stop_tollgate() {
  alive "$tg_pid" || say "x402 bench: WARNING: tollgate ($tg_tag) had already exited: $(tail -n 3 "$tmp/tollgate-$tg_tag.log")"
  stop_pid "$tg_pid"; forget_pid "$tg_pid"
}
metrics() { # metrics OUT
  curl -sS -o "$1" --max-time 10 -H "Authorization: Bearer $token" "http://127.0.0.1:$tg_admin/metrics" ||
    die "GET /metrics failed"
}
metric() { # metric FILE NAME [LABEL_SUBSTRING]: the sum of the samples (0 when none)
  awk -v n="$1" -v l="${3:-}" 'BEGIN { s = 0 } $0 !~ /^#/ {
      name = $1; sub(/\{.*/, "", name)
      if (name == n && (l == "" || index($1, l) > 0)) s += $NF
    } END { printf "%.6f\n", s }' "$2"
}

# ---------------------------------------------------------------- unpaid: capture and the others

capture() { # capture PORT OUT_PREFIX: GET the path (Host bench.example); prints the status
  curl -sS -o "$2.body" -D "$2.headers" -w '%{http_code}' --max-time 10 -H 'Host: bench.example' \
    "http://127.0.0.1:$1$path" 2>/dev/null || true
}
header_of() { # header_of FILE NAME: the value of a header of a curl -D dump
  awk -v n="$2" 'BEGIN { n = tolower(n) } { sub(/\r$/, "") } index(tolower($0), n ": ") == 1 {
      print substr($0, length(n) + 3); exit }' "$1"
}

tenant_bench="$(tenant_lua bench bench.example 60 "")"
start_tollgate probe 1 "$tenant_bench"
st="$(capture "$tg_port" "$tmp/tg")"
[ "$st" = 402 ] || { cat "$tmp/tg.headers" "$tmp/tg.body" >&2; die "tollgate answered $st to GET $path (want 402)"; }
ch_required="$(header_of "$tmp/tg.headers" PAYMENT-REQUIRED)"
ch_cache="$(header_of "$tmp/tg.headers" Cache-Control)"
ch_type="$(header_of "$tmp/tg.headers" Content-Type)"
[ -n "$ch_required" ] && [ -n "$ch_cache" ] && [ -n "$ch_type" ] || { cat "$tmp/tg.headers" >&2; die "tollgate's 402 lacks a header"; }
ch_len="$(wc -c <"$tmp/tg.body")"
printf '%s' "$ch_required" | base64 -d >"$tmp/challenge.json" || die "PAYMENT-REQUIRED is not base64"
stop_tollgate

lua_bytes() { od -An -v -tu1 "$1" | awk '{ for (i = 1; i <= NF; i++) printf "\\%d", $i }'; }
ng_pid=""; ng_port=""
start_nginx() { # start_nginx WORKERS(1|auto) TAG
  ng_port="$(free_port)"
  local p="$tmp/nginx-$2"
  mkdir -p "$p/tmp"
  # The answer from a file (nginx refuses a *_by_lua_block over 4 KiB); compiled once and
  # cached. nginx's workers run as nobody when started as root: they read it through the
  # private temporary folder.
  cat >"$p/answer.lua" <<EOF
ngx.status = 402
ngx.header["Content-Type"] = "$ch_type"
ngx.header["Cache-Control"] = "$ch_cache"
ngx.header["PAYMENT-REQUIRED"] = "$ch_required"
ngx.header["Content-Length"] = $ch_len
ngx.print("$(lua_bytes "$tmp/tg.body")")
EOF
  chmod 711 "$tmp" "$p"
  chmod 644 "$p/answer.lua"
  cat >"$p/nginx.conf" <<EOF
load_module $ndk_so;
load_module $lua_so;
worker_processes $1;
worker_rlimit_nofile 65536;
error_log $p/error.log warn;
pid $p/nginx.pid;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $p/tmp/body;
  proxy_temp_path $p/tmp/proxy;
  fastcgi_temp_path $p/tmp/fastcgi;
  uwsgi_temp_path $p/tmp/uwsgi;
  scgi_temp_path $p/tmp/scgi;
  keepalive_timeout 600s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ng_port reuseport;
    server_name bench.example;
    location /articles/ {
      content_by_lua_file $p/answer.lua;
    }
    location = /healthz { return 200 "ok\n"; }
  }
}
EOF
  nginx -p "$p" -c "$p/nginx.conf" -g 'daemon off;' >"$tmp/nginx-$2.log" 2>&1 &
  ng_pid=$!
  pids+=("$ng_pid")
  wait_http "http://127.0.0.1:$ng_port/healthz" "$ng_pid" nginx "$p/error.log" 10
}

ex_pid=""; ex_port=""
start_express() { # start_express PROCESSES TAG
  ex_port="$(free_port)"
  node "$here/x402_express.mjs" --port "$ex_port" --workers "$1" --facilitator "$fac_url" \
    --network eip155:84532 --asset "$asset" --amount "$amount" --name USDC --version 2 --pay-to "$pay_to" \
    --max-timeout 60 --route "/articles/*" >"$tmp/express-$2.log" 2>&1 &
  ex_pid=$!
  pids+=("$ex_pid")
  local i
  for i in $(seq 1 300); do
    grep -q "^ready $ex_pid\$" "$tmp/express-$2.log" && return 0
    alive "$ex_pid" || { cat "$tmp/express-$2.log" >&2; die "the express server exited at start"; }
    sleep 0.1
  done
  cat "$tmp/express-$2.log" >&2
  die "the express server was not ready within 30 s"
}

server_pids() { # the processes whose CPU time is the server's
  case "$1" in
    tollgate) echo "$tg_pid" ;;
    nginx_lua) ps -o pid= --ppid "$ng_pid" ;;          # the workers
    express) echo "$ex_pid"; ps -o pid= --ppid "$ex_pid" ;; # the process, or primary + workers
  esac
}
cpu_ticks() {
  local t=0 p v
  for p in $(server_pids "$1"); do
    v="$(awk '{ printf "%.0f", $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)"
    t=$((t + ${v:-0}))
  done
  echo "$t"
}
steal_total() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; printf "%.0f %.0f", $9, t }' /proc/stat; }

: >"$tmp/results.jsonl"
record() { # record WRK_OUTPUT EXTRA_JSON_MEMBERS
  local line
  line="$(sed -n 's/^BENCHJSON //p' "$1")"
  [ -n "$line" ] || { cat "$1" >&2; die "no result in $1"; }
  node -e 'const r = JSON.parse(process.argv[1]); Object.assign(r, JSON.parse("{" + process.argv[2] + "}"));
    console.log(JSON.stringify(r))' "$line" "$2" >>"$tmp/results.jsonl"
}

# run_unpaid KIND SERVER WORKERS RUN PORT SECONDS
run_unpaid() {
  local kind="$1" server="$2" w="$3" run="$4" port="$5" secs="$6"
  local out="$tmp/wrk-$kind-$server-w$w-$run.txt" load1 c0 c1 s0 t0 s1 t1
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  c0="$(cpu_ticks "$server")"; read -r s0 t0 <<<"$(steal_total)"
  BENCH_MODE=unpaid BENCH_PATH="$path" BENCH_HOST=bench.example \
    BENCH_LABEL="\"part\":\"unpaid\",\"kind\":\"$kind\",\"server\":\"$server\",\"workers\":\"$w\",\"run\":\"$run\",\"load1_before\":$load1" \
    wrk -t"$threads" -c"$conns" -d"${secs}s" -s "$here/x402_wrk.lua" "http://127.0.0.1:$port" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed"; }
  c1="$(cpu_ticks "$server")"; read -r s1 t1 <<<"$(steal_total)"
  local pid; for pid in $(server_pids "$server"); do alive "$pid" || die "$server died during a run"; done
  [ "$kind" = warmup ] && return 0
  record "$out" "\"server_cpu_s\":$(((c1 - c0) * 1000 / clk_tck))e-3,\"steal_pct\":$(((s1 - s0) * 1000 / (t1 - t0 > 0 ? t1 - t0 : 1)))e-1"
  say "  $(sed -n 's/^BENCHJSON //p' "$out" | node -e 'const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    console.log(`${r.server.padEnd(9)} w${r.workers} run ${r.run}: ${Math.round(r.rps)} req/s, p50 ${(r.p50_us / 1000).toFixed(2)} ms, p99 ${(r.p99_us / 1000).toFixed(2)} ms, ${r.status_4xx5xx} of ${r.requests} answers >= 400`)')"
}

load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
say "x402 bench: $ncores cores, load average $load_start; wrk -t$threads -c$conns -d${duration}s, $runs run(s) each"
if awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }'; then
  say "x402 bench: WARNING: the machine is busy (load $load_start): figures will be noisy"
fi

for w in $settings; do
  if [ "$w" = 1 ]; then tgw=1; ngw=1; exw=1; else tgw=0; ngw=auto; exw="$ncores"; fi
  start_tollgate "w$w" "$tgw" "$tenant_bench"
  start_nginx "$ngw" "w$w"
  start_express "$exw" "w$w"
  # The same answer from nginx (status, the three headers, body bytes); @x402/express answers
  # for the same route and price (its own resource fields and body).
  st="$(capture "$ng_port" "$tmp/ng")"
  [ "$st" = 402 ] && [ "$(header_of "$tmp/ng.headers" PAYMENT-REQUIRED)" = "$ch_required" ] &&
    [ "$(header_of "$tmp/ng.headers" Cache-Control)" = "$ch_cache" ] &&
    [ "$(header_of "$tmp/ng.headers" Content-Type)" = "$ch_type" ] && cmp -s "$tmp/tg.body" "$tmp/ng.body" ||
    { cat "$tmp/ng.headers" "$tmp/ng.body" >&2; die "nginx's answer differs from tollgate's"; }
  st="$(capture "$ex_port" "$tmp/ex")"
  [ "$st" = 402 ] || { cat "$tmp/ex.headers" "$tmp/ex.body" >&2; die "express answered $st (want 402)"; }
  header_of "$tmp/ex.headers" PAYMENT-REQUIRED | base64 -d >"$tmp/ex-challenge.json" || die "express: PAYMENT-REQUIRED is not base64"
  node -e 'const fs = require("fs"); const [a, b] = process.argv.slice(1).map((f) => JSON.parse(fs.readFileSync(f, "utf8")));
    if (JSON.stringify(a.accepts) !== JSON.stringify(b.accepts)) { console.error(JSON.stringify(a.accepts), JSON.stringify(b.accepts)); process.exit(1); }' \
    "$tmp/challenge.json" "$tmp/ex-challenge.json" || die "express offers other requirements than tollgate"
  say "x402 bench: workers=$w: tollgate pid $tg_pid :$tg_port, nginx pid $ng_pid :$ng_port, express pid $ex_pid :$ex_port ($exw process(es))"
  run_unpaid warmup tollgate "$w" 0 "$tg_port" "$warmup"
  run_unpaid warmup nginx_lua "$w" 0 "$ng_port" "$warmup"
  run_unpaid warmup express "$w" 0 "$ex_port" "$warmup"
  for r in $(seq 1 "$runs"); do
    run_unpaid peak tollgate "$w" "$r" "$tg_port" "$duration"
    run_unpaid peak nginx_lua "$w" "$r" "$ng_port" "$duration"
    run_unpaid peak express "$w" "$r" "$ex_port" "$duration"
  done
  stop_pid "$ex_pid"; forget_pid "$ex_pid"
  stop_pid "$ng_pid"; forget_pid "$ng_pid"
  stop_tollgate
done
cp "$tmp/tg.headers" "$tmp/tollgate-402-headers.txt"; cp "$tmp/tg.body" "$tmp/tollgate-402-body.txt"
cp "$tmp/challenge.json" "$tmp/tollgate-payment-required.txt"
if [ -f "$tmp/ex.headers" ]; then # BENCH_WORKERS="" skips the unpaid part
  cp "$tmp/ex.headers" "$tmp/express-402-headers.txt"; cp "$tmp/ex.body" "$tmp/express-402-body.txt"
  cp "$tmp/ex-challenge.json" "$tmp/express-payment-required.txt"
else
  : >"$tmp/express-402-headers.txt"; : >"$tmp/express-402-body.txt"
fi

# ---------------------------------------------------------------- paid

# One instance, two tenants priced the same: verify local (anvil as the JSON-RPC provider)
# and verify through the facilitator; both settle = "async" through the facilitator, and both
# have anvil as their JSON-RPC provider (with verify = "facilitator" it is only asked whether an
# earlier attempt of a settlement already settled: without it a retried settlement that the
# facilitator refuses ends as failed).
# max_timeout_s = 3600: validBefore must outlast the whole paid part (payments are signed
# first, and the facilitator refuses to settle one within 6 s of its validBefore).
tenants_paid="$(tenant_lua local local.example 3600 "
        verify = \"local\", rpc = { \"$rpc\" },")
$(tenant_lua facil facil.example 3600 "
        verify = \"facilitator\", rpc = { \"$rpc\" },")"
start_tollgate paid "$paid_workers" "$tenants_paid"
say "x402 bench: paid: tollgate pid $tg_pid :$tg_port (workers $paid_workers), admin :$tg_admin"

host_of() { if [ "$1" = local ]; then echo local.example; else echo facil.example; fi; }
for mode in local facil; do
  curl -sS -o /dev/null -D "$tmp/paid-$mode.headers" --max-time 10 -H "Host: $(host_of "$mode")" "http://127.0.0.1:$tg_port$path" ||
    die "GET $path (tenant $mode) failed"
  req="$(header_of "$tmp/paid-$mode.headers" PAYMENT-REQUIRED)"
  [ -n "$req" ] || die "no PAYMENT-REQUIRED from the $mode tenant"
  say "x402 bench: signing $((paid_k * runs)) payments for the $mode tenant"
  node "$here/x402_presign.mjs" --required "$req" --count "$((paid_k * runs))" --out "$tmp/pay-$mode.all" 2>&1 |
    sed 's/^/  /' >&2
  [ "${PIPESTATUS[0]}" -eq 0 ] || die "pre-signing failed"
  [ "$(wc -l <"$tmp/pay-$mode.all")" -eq $((paid_k * runs)) ] || die "pre-signing wrote too few payments"
  for r in $(seq 1 "$runs"); do
    sed -n "$(((r - 1) * paid_k + 1)),$((r * paid_k))p" "$tmp/pay-$mode.all" >"$tmp/pay-$mode-$r.txt"
  done
done

now_ms() { date +%s%3N; }

# run_paid MODE RUN: one run of paid_k payments, then the drain of their settlements.
run_paid() {
  local mode="$1" run="$2" host tenant out dd
  host="$(host_of "$mode")"; tenant="$mode"
  out="$tmp/wrk-paid-$mode-$run.txt"; dd="$tmp/paid-$mode-$run"
  rm -rf "$dd"; mkdir -p "$dd"
  local load1 bal0 c0 c1 t0 t1 t2 s0 st0 s1 st1
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  bal0="$(balance_of "$pay_to")"
  metrics "$tmp/paid-$mode-$run-before.prom"
  c0="$(cpu_ticks tollgate)"; read -r s0 st0 <<<"$(steal_total)"
  t0="$(now_ms)"
  BENCH_MODE=paid BENCH_PATH="$path" BENCH_HOST="$host" BENCH_THREADS="$threads" \
    BENCH_PAYMENTS="$tmp/pay-$mode-$run.txt" BENCH_DONE_DIR="$dd" \
    BENCH_LABEL="\"part\":\"paid\",\"mode\":\"$mode\",\"run\":\"$run\",\"k\":$paid_k,\"load1_before\":$load1" \
    wrk -t"$threads" -c"$conns" -d"$((120 + paid_k / 20))s" -s "$here/x402_wrk.lua" "http://127.0.0.1:$tg_port" >"$out" 2>&1 &
  local wrk_pid=$!
  pids+=("$wrk_pid")
  while alive "$wrk_pid" && [ "$(find "$dd" -name 'done-*' | wc -l)" -lt "$threads" ]; do sleep 0.05; done
  t1="$(now_ms)"
  c1="$(cpu_ticks tollgate)"; read -r s1 st1 <<<"$(steal_total)"
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" || { cat "$out" >&2; die "wrk failed"; }
  forget_pid "$wrk_pid"
  metrics "$tmp/paid-$mode-$run-end.prom"
  local served
  served="$(sed -n 's/^BENCHJSON .*"served_302":\([0-9]*\).*/\1/p' "$out")"
  [ -n "$served" ] || { cat "$out" >&2; die "no result in $out"; }
  # The drain: the tenant's unsettled amount back to 0 and as many settlements ended (settled
  # or failed) as payments served.
  local settled0 failed0 settled failed_now unsettled m="$tmp/paid-$mode-$run-drain.prom" drained=false
  settled0="$(metric t402_settlements_total "$tmp/paid-$mode-$run-before.prom" 'status="settled"')"
  failed0="$(metric t402_settlements_total "$tmp/paid-$mode-$run-before.prom" 'status="failed"')"
  while :; do
    metrics "$m"
    unsettled="$(metric t402_unsettled_amount "$m" "tenant_id=\"$tenant\"")"
    settled="$(metric t402_settlements_total "$m" 'status="settled"')"
    failed_now="$(metric t402_settlements_total "$m" 'status="failed"')"
    if awk -v u="$unsettled" -v a="$settled" -v b="$settled0" -v f="$failed_now" -v g="$failed0" -v n="$served" \
      'BEGIN { exit !(u == 0 && (a - b) + (f - g) >= n) }'; then
      drained=true; break
    fi
    [ $(( $(now_ms) - t1 )) -lt $((drain_timeout * 1000)) ] || break
    sleep 0.2
  done
  t2="$(now_ms)"
  cp "$m" "$tmp/paid-$mode-$run-after.prom"
  local bal1 b="$tmp/paid-$mode-$run-before.prom" a="$tmp/paid-$mode-$run-after.prom" e="$tmp/paid-$mode-$run-end.prom"
  bal1="$(balance_of "$pay_to")"
  local vs vc rs rc ss sc
  vs="$(metric t402_verification_duration_seconds_sum "$e")"; vs="$(awk -v a="$vs" -v b="$(metric t402_verification_duration_seconds_sum "$b")" 'BEGIN { print a - b }')"
  vc="$(metric t402_verification_duration_seconds_count "$e")"; vc="$(awk -v a="$vc" -v b="$(metric t402_verification_duration_seconds_count "$b")" 'BEGIN { print a - b }')"
  rs="$(metric t402_rpc_latency_seconds_sum "$e")"; rs="$(awk -v a="$rs" -v b="$(metric t402_rpc_latency_seconds_sum "$b")" 'BEGIN { print (a - b) * 1000 }')"
  rc="$(metric t402_rpc_latency_seconds_count "$e")"; rc="$(awk -v a="$rc" -v b="$(metric t402_rpc_latency_seconds_count "$b")" 'BEGIN { print a - b }')"
  ss="$(metric t402_settlement_duration_seconds_sum "$a")"; ss="$(awk -v a="$ss" -v b="$(metric t402_settlement_duration_seconds_sum "$b")" 'BEGIN { print a - b }')"
  sc="$(metric t402_settlement_duration_seconds_count "$a")"; sc="$(awk -v a="$sc" -v b="$(metric t402_settlement_duration_seconds_count "$b")" 'BEGIN { print a - b }')"
  local failed retry queued_end
  failed="$(awk -v a="$(metric t402_settlements_total "$a" 'status="failed"')" -v b="$(metric t402_settlements_total "$b" 'status="failed"')" 'BEGIN { print a - b }')"
  retry="$(awk -v a="$(metric t402_settlements_total "$a" 'status="retry"')" -v b="$(metric t402_settlements_total "$b" 'status="retry"')" 'BEGIN { print a - b }')"
  queued_end="$(metric t402_unsettled_amount "$e" "tenant_id=\"$tenant\"")"
  local bad=""
  bad="$(for f in "$dd"/bad-*.txt; do [ -f "$f" ] && printf '%s: %s\n' "$(basename "$f" .txt)" "$(head -c 300 "$f")"; done || true)"
  [ -z "$bad" ] || say "  refused answers (first of each status per wrk thread):"$'\n'"$(printf '%s\n' "$bad" | sed 's/^/    /')"
  record "$out" "\"load_ms\":$((t1 - t0)),\"drain_ms\":$((t2 - t1)),\"drained\":$drained,\"settled\":$(awk -v a="$settled" -v b="$settled0" 'BEGIN { printf "%d", a - b }'),\"failed\":$failed,\"retry\":$retry,\"unsettled_at_end_of_load\":$queued_end,\"unsettled_after\":$unsettled,\"balance_before\":\"$bal0\",\"balance_after\":\"$bal1\",\"amount\":$amount,\"verify_s_sum\":$vs,\"verify_count\":$vc,\"rpc_ms_sum\":$rs,\"rpc_count\":$rc,\"settle_s_sum\":$ss,\"settle_count\":$sc,\"server_cpu_s\":$(((c1 - c0) * 1000 / clk_tck))e-3,\"steal_pct\":$(((s1 - s0) * 1000 / (st1 - st0 > 0 ? st1 - st0 : 1)))e-1"
  tail -n 1 "$tmp/results.jsonl" | node -e 'const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    const delta = BigInt(r.balance_after) - BigInt(r.balance_before), want = BigInt(r.served_302) * BigInt(r.amount);
    console.error(`  paid ${r.mode.padEnd(5)} run ${r.run}: ${r.served_302} of ${r.k} served (302) in ${(r.load_ms / 1000).toFixed(1)} s: ${Math.round(r.rps)} req/s,` +
      ` p50 ${(r.p50_us / 1000).toFixed(1)} ms, p99 ${(r.p99_us / 1000).toFixed(1)} ms; ${r.other} other answers${r.other_statuses ? " (" + r.other_statuses + ")" : ""};` +
      ` drained ${r.drained ? "in" : "NOT within"} ${(r.drain_ms / 1000).toFixed(1)} s after the load (${r.settled} settled, ${r.failed} failed, ${r.retry} retries);` +
      ` payTo +${delta} (${delta === want ? "exactly served x " + r.amount : "MISMATCH: want " + want})`)'
}

for r in $(seq 1 "$runs"); do
  run_paid local "$r"
  run_paid facil "$r"
done
metrics "$tmp/metrics-paid-final.prom"
stop_tollgate

# ---------------------------------------------------------------- the report

load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
X_CPU="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)" X_CORES="$ncores" X_KERNEL="$(uname -r)" \
X_LOAD_START="$load_start" X_LOAD_END="$load_end" X_QUICK="$quick" X_THREADS="$threads" X_CONNS="$conns" \
X_DURATION="$duration" X_RUNS="$runs" X_K="$paid_k" X_PAID_WORKERS="$paid_workers" X_PATH="$path" \
X_NGINX="$(nginx -v 2>&1 | sed 's/^nginx version: //')" X_WRK="$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)" \
X_NODE="$(node -v)" X_TG="$("$bin" version 2>/dev/null || echo unknown)" \
X_CH_HEADER_LEN="${#ch_required}" X_CH_BODY_LEN="$ch_len" X_CH_TYPE="$ch_type" X_CH_CACHE="$ch_cache" \
X_EX_HEADER_LEN="$(header_of "$tmp/express-402-headers.txt" PAYMENT-REQUIRED | wc -c)" X_EX_BODY_LEN="$(wc -c <"$tmp/express-402-body.txt")" \
X_EX_TYPE="$(header_of "$tmp/express-402-headers.txt" Content-Type)" X_PRICE="$price_usd" X_AMOUNT="$amount" \
node - "$tmp/results.jsonl" "$build/x402-bench.json" <<'EOF'
const fs = require("fs");
const e = process.env;
const rows = fs.readFileSync(process.argv[2], "utf8").split("\n").filter(Boolean).map(JSON.parse);
const med = (xs) => { xs = xs.filter((x) => x != null && !Number.isNaN(x)).sort((a, b) => a - b); if (!xs.length) return null;
  const m = xs.length >> 1; return xs.length % 2 ? xs[m] : (xs[m - 1] + xs[m]) / 2; };
const int = (x) => x == null ? "-" : Math.round(x).toLocaleString("en-US");
const ms = (us) => us == null ? "-" : (us / 1000).toFixed(us < 10000 ? 2 : 1) + " ms";
const ratio = (a, b) => a && b ? (a / b).toFixed(a / b >= 10 ? 1 : 2) + "x" : "-";
const out = [];
const p = (s = "") => out.push(s);
const names = { tollgate: "tollgate", nginx_lua: "nginx + Lua", express: "@x402/express" };
const when = new Date().toISOString().replace("T", " ").slice(0, 16) + " UTC";
p(`x402 benchmark, ${when}: ${e.X_CPU}, ${e.X_CORES} shared cores (nothing pinned; wrk, the chain and the servers share them),`);
p(`load average ${e.X_LOAD_START} at start, ${e.X_LOAD_END} at end; medians of ${e.X_RUNS} run(s)${e.X_QUICK === "1" ? " (--quick)" : ""}.`);
p(`${e.X_TG} (Release, log_level warn), ${e.X_NGINX} + lua, @x402/express 2.27.0 on express 5.3.0 / node ${e.X_NODE}, ${e.X_WRK}.`);
p();
const unpaid = {};
if (rows.some((r) => r.part === "unpaid")) {
  p(`Unpaid: GET ${e.X_PATH} (a catalog price of ${e.X_PRICE} USD = ${e.X_AMOUNT} atomic units of the chain's test USDC),`);
  p(`wrk -t${e.X_THREADS} -c${e.X_CONNS} -d${e.X_DURATION}s per run, servers alternated. tollgate and nginx answer the same bytes: 402, ` +
    `PAYMENT-REQUIRED (${e.X_CH_HEADER_LEN} B), Cache-Control: ${e.X_CH_CACHE}, Content-Type: ${e.X_CH_TYPE}, a ${e.X_CH_BODY_LEN} B body (the v1 JSON);`);
  p(`@x402/express offers the same requirement (PAYMENT-REQUIRED ${Number(e.X_EX_HEADER_LEN) - 1} B, body ${e.X_EX_BODY_LEN} B, ${e.X_EX_TYPE}).`);
  p();
  p("| workers | server | req/s | p50 | p99 | CPU/req | tollgate / server |");
  p("|---|---|---|---|---|---|---|");
  for (const w of [...new Set(rows.filter((r) => r.part === "unpaid").map((r) => r.workers))]) {
    unpaid[w] = {};
    for (const s of ["tollgate", "nginx_lua", "express"]) {
      const rs = rows.filter((r) => r.part === "unpaid" && r.workers === w && r.server === s);
      if (!rs.length) continue;
      unpaid[w][s] = { runs: rs.length, rps: med(rs.map((r) => r.rps)), p50_us: med(rs.map((r) => r.p50_us)),
        p99_us: med(rs.map((r) => r.p99_us)), cpu_us_per_req: med(rs.map((r) => r.server_cpu_s * 1e6 / r.requests)),
        non_4xx: rs.reduce((a, r) => a + (r.requests - r.status_4xx5xx), 0), steal_pct_max: Math.max(...rs.map((r) => r.steal_pct)),
        load1: med(rs.map((r) => r.load1_before)) };
    }
    const t = unpaid[w].tollgate;
    for (const s of ["tollgate", "nginx_lua", "express"]) {
      const x = unpaid[w][s];
      if (!x) continue;
      const goal = s === "nginx_lua" ? " (goal >= 1.0x)" : s === "express" ? " (goal >= 20x)" : "";
      p(`| ${w === "1" ? "1" : "all (" + e.X_CORES + ")"} | ${names[s]} | ${int(x.rps)} | ${ms(x.p50_us)} | ${ms(x.p99_us)} | ` +
        `${x.cpu_us_per_req == null ? "-" : x.cpu_us_per_req.toFixed(1) + " us"} | ${s === "tollgate" ? "" : ratio(t?.rps, x.rps) + goal} |`);
    }
  }
  const anyBadUnpaid = Object.values(unpaid).flatMap((o) => Object.entries(o)).filter(([, x]) => x.non_4xx > 0);
  for (const [s, x] of anyBadUnpaid) p(`WARNING: ${names[s]} answered ${x.non_4xx} requests with a status below 400`);
  p();
}
const paid = {};
const prs = rows.filter((r) => r.part === "paid");
if (prs.length) {
  p(`Paid: ${e.X_K} fresh payments per run and tenant, each sent once (wrk -t${e.X_THREADS} -c${e.X_CONNS}, x402_wrk.lua), ` +
    `tollgate workers ${e.X_PAID_WORKERS}, settle = "async" through the facilitator in both;`);
  p("runs alternate the two tenants, and each waits for the settlement queue to drain before the next. req/s = answers over the time");
  p("from the first request to the last answer; 302 = served; drain = from the last answer until every settlement has settled.");
  p();
  p("| verify | req/s | p50 | p99 | served (302) | other answers | CPU/req | mean verify | drain after load | settled / s (whole run) | on chain |");
  p("|---|---|---|---|---|---|---|---|---|---|---|");
  for (const mode of ["local", "facil"]) {
    const rs = prs.filter((r) => r.mode === mode);
    if (!rs.length) continue;
    const chainOk = rs.every((r) => BigInt(r.balance_after) - BigInt(r.balance_before) === BigInt(r.served_302) * BigInt(r.amount));
    const x = paid[mode] = {
      runs: rs.length, rps: med(rs.map((r) => r.rps)), p50_us: med(rs.map((r) => r.p50_us)), p99_us: med(rs.map((r) => r.p99_us)),
      served: rs.reduce((a, r) => a + r.served_302, 0), sent: rs.reduce((a, r) => a + r.k, 0),
      other: rs.reduce((a, r) => a + r.other, 0), other_statuses: rs.map((r) => r.other_statuses).filter(Boolean).join(","),
      cpu_us_per_req: med(rs.map((r) => r.server_cpu_s * 1e6 / Math.max(1, r.answered))),
      verify_ms: med(rs.map((r) => r.verify_count > 0 ? r.verify_s_sum / r.verify_count * 1000 : null)),
      rpc_ms: med(rs.map((r) => r.rpc_count > 0 ? r.rpc_ms_sum / r.rpc_count : null)),
      settle_ms: med(rs.map((r) => r.settle_count > 0 ? r.settle_s_sum / r.settle_count * 1000 : null)),
      drain_s: med(rs.map((r) => r.drain_ms / 1000)), all_drained: rs.every((r) => r.drained),
      settle_rate: med(rs.map((r) => r.settled / ((r.load_ms + r.drain_ms) / 1000))),
      failed: rs.reduce((a, r) => a + r.failed, 0), retry: rs.reduce((a, r) => a + r.retry, 0),
      chain_exact: chainOk,
      balance_delta: rs.reduce((a, r) => a + (BigInt(r.balance_after) - BigInt(r.balance_before)), 0n).toString(),
    };
    p(`| ${mode === "local" ? "local (anvil JSON-RPC)" : "facilitator"} | ${int(x.rps)} | ${ms(x.p50_us)} | ${ms(x.p99_us)} | ` +
      `${x.served} of ${x.sent} | ${x.other}${x.other_statuses ? " (" + x.other_statuses + ")" : ""} | ${x.cpu_us_per_req.toFixed(0)} us | ` +
      `${x.verify_ms == null ? "-" : x.verify_ms.toFixed(1) + " ms"} | ${x.drain_s.toFixed(1)} s${x.all_drained ? "" : " (NOT drained)"} | ` +
      `${x.settle_rate.toFixed(1)} | ${x.chain_exact ? "+" + x.balance_delta + " = served x " + e.X_AMOUNT : "MISMATCH (+" + x.balance_delta + ")"} |`);
  }
  if (paid.local && paid.facil) p(`\nlocal / facilitator: ${ratio(paid.local.rps, paid.facil.rps)} req/s` +
    (paid.local.rpc_ms != null ? `; local verification's JSON-RPC check (anvil) took ${paid.local.rpc_ms.toFixed(1)} ms on average` : "") +
    (paid.facil.settle_ms != null ? `; one settlement (facilitator /settle, mined by anvil) ${paid.facil.settle_ms.toFixed(0)} ms on average` : "") + ".");
  for (const [m, x] of Object.entries(paid)) if (x.failed || x.retry) p(`${m}: ${x.failed} settlements failed, ${x.retry} retried`);
}
p();
p("Machine note: 2 shared cores; nothing pinned; wrk, anvil, the facilitator (node) and the server under test share them, so");
p("req/s moves with whatever else runs (see the load averages); CPU/req is the server's own utime+stime per answer.");
console.log(out.join("\n"));
fs.writeFileSync(process.argv[3], JSON.stringify({
  mode: e.X_QUICK === "1" ? "quick" : "full", machine: { cpu: e.X_CPU, cores: +e.X_CORES, kernel: e.X_KERNEL,
    load_average_start: e.X_LOAD_START, load_average_end: e.X_LOAD_END },
  settings: { threads: +e.X_THREADS, connections: +e.X_CONNS, duration_s: +e.X_DURATION, runs: +e.X_RUNS,
    paid_per_run: +e.X_K, paid_workers: +e.X_PAID_WORKERS },
  unpaid, paid, runs: rows, report: out.join("\n") }, null, 1));
EOF
echo ""
echo "JSON result: $build/x402-bench.json   (raw output: $logs/)"
