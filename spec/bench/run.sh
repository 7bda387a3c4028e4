#!/usr/bin/env bash
# Benchmark: tollgate against nginx + Lua answering the same bytes.
# A separate command, not a test suite (it measures, it does not pass or fail).
#
# Usage: spec/bench/run.sh [--quick] [--perf]
#   --quick  one run of 3 s per server, row and setting (default: three runs of 10 s)
#   --perf   also profile tollgate (one worker) with `perf record` during one extra peak run per row
# Environment overrides: BENCH_THREADS (wrk threads, 2), BENCH_CONNS (wrk connections, 64),
#   BENCH_DURATION (s), BENCH_RUNS, BENCH_IDLE_CONNS (10000), BENCH_BUILD_DIR (build-bench),
#   BENCH_TOLLGATE_BIN (benchmark this binary instead of building one).
#
# Two rows, each a Connect unary POST /ramp.v1.ExchangeService/DiscoverResources
# (application/proto) that tollgate answers and that nginx answers from Lua (content_by_lua_*) with
# the exact status, Content-Type and bytes captured from tollgate:
#   empty    the cheapest path: one URI of a tenant with no catalog and no policy of its own
#            (the 101-byte DiscoverResourcesRequest of request.txtpb, Host bench.example)
#   catalog  a loaded catalog: four URIs of a tenant whose RSL file (generated here) holds 10,000
#            <content> entries with three licences each, priced by a Lua policy
#            (catalog_policy.lua: skip, a rate_limit bucket that never denies, a price hook by
#            usage purpose, user type and age) and answered with eight offers whose ids are
#            signed (catalog_request.txtpb, Host catalog.example)
# One tollgate serves both tenants; one nginx serves both answers from two server blocks. For
# one worker (nginx worker_processes 1) and then all cores (workers = 0, worker_processes auto):
# drives both servers on both rows with the same wrk settings, alternating; then, on the empty
# row only, paces both at half of nginx's peak rate to read p99 there. Finally it holds 10,000
# idle keep-alive connections against fresh one-worker instances of each and reads their RSS.
# Prints tables; writes the JSON result to <build>/bench-result.json and wrk's raw output to
# <build>/bench-logs/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"

usage() { sed -n '5,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

quick=0
want_perf=0
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    --perf) want_perf=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done

threads="${BENCH_THREADS:-2}"
conns="${BENCH_CONNS:-64}"
idle_conns="${BENCH_IDLE_CONNS:-10000}"
if [ "$quick" -eq 1 ]; then
  duration="${BENCH_DURATION:-3}"; runs="${BENCH_RUNS:-1}"; warmup=1
else
  duration="${BENCH_DURATION:-10}"; runs="${BENCH_RUNS:-3}"; warmup=2
fi
ncores="$(nproc)"
clk_tck="$(getconf CLK_TCK)"

say() { printf '%s\n' "$*" >&2; }
die() { say "bench: $*"; exit 1; }

for tool in wrk nginx curl protoc node cc cmake; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

# 10,000 idle connections need as many descriptors in each server (and in the client).
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
[ "$(ulimit -n)" = unlimited ] || [ "$(ulimit -n)" -gt $((idle_conns + 1000)) ] ||
  die "ulimit -n is $(ulimit -n): too low for $idle_conns idle connections"

find_module() {
  local f
  for f in "/usr/lib/nginx/modules/$1" "/usr/share/nginx/modules/$1"; do
    [ -f "$f" ] && { echo "$f"; return 0; }
  done
  return 1
}
ndk_so="$(find_module ndk_http_module.so)" || die "nginx NDK module not found (libnginx-mod-http-ndk)"
lua_so="$(find_module ngx_http_lua_module.so)" || die "nginx Lua module not found (libnginx-mod-http-lua)"

# Release build of the binary under test; incremental, so cheap when up to date.
# BENCH_TOLLGATE_BIN benchmarks a given binary instead (e.g. an older build).
if [ -n "${BENCH_TOLLGATE_BIN:-}" ]; then
  bin="$BENCH_TOLLGATE_BIN"
  [ -x "$bin" ] || die "BENCH_TOLLGATE_BIN=$bin is not executable"
  mkdir -p "$build"
elif ! grep -qs '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
  say "bench: configuring $build (Release)"
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
if [ -z "${BENCH_TOLLGATE_BIN:-}" ]; then
  say "bench: building tollgate in $build"
  cmake --build "$build" --target tollgate -j2 >/dev/null || die "build failed: cmake --build $build --target tollgate"
  bin="$build/tollgate"
fi
mkdir -p "$build/bench"
for tool in idle_conns pace; do
  if [ ! -x "$build/bench/$tool" ] || [ "$here/$tool.c" -nt "$build/bench/$tool" ]; then
    cc -O2 -Wall -Wextra -Werror -o "$build/bench/$tool" "$here/$tool.c" || die "$tool: compile failed"
  fi
done

tmp="$(mktemp -d /tmp/tollgate-bench.XXXXXX)"
logs="$build/bench-logs"
pids=()

stop_pid() {
  local pid="$1" i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    # Our own children are reaped by bash; a zombie counts as gone.
    local st
    st="$(ps -o stat= -p "$pid" 2>/dev/null || true)"
    [ -z "$st" ] || [ "${st#Z}" != "$st" ] && break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  local rc=0
  wait "$pid" 2>/dev/null || rc=$?
  return "$rc"
}

stop_tollgate() { # a graceful stop exits 0; anything else is worth a look
  local rc=0
  stop_pid "$tg_pid" 2>/dev/null || rc=$?
  forget_pid "$tg_pid"
  [ "$rc" -eq 0 ] || say "bench: WARNING: tollgate did not stop cleanly on SIGTERM (exit $rc): $(tail -n 2 "$tmp/tollgate-$tag.log" 2>/dev/null | tr '\n' ' ')"
}

cleanup() {
  local pid
  for pid in "${pids[@]}"; do stop_pid "$pid" || true; done
  pids=()
  rm -rf "$logs"
  mkdir -p "$logs"
  cp "$tmp"/*.txt "$tmp"/*.log "$logs"/ 2>/dev/null || true
  local d
  for d in "$tmp"/nginx-*/; do
    [ -f "$d/error.log" ] && cp "$d/error.log" "$logs/$(basename "$d")-error.log"
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

free_port() {
  node -e "const s=require('net').createServer();s.listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})"
}

# The requests: serialized DiscoverResourcesRequests (req.bin: the empty row; req-catalog.bin:
# the catalog row), and the empty row's as a raw HTTP request (for pace and idle_conns).
encode_request() { # encode_request TXTPB OUT
  protoc --encode=ramp.v1.DiscoverResourcesRequest -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" \
    <"$1" >"$2" || die "protoc --encode failed on $1"
}
encode_request "$here/request.txtpb" "$tmp/req.bin"
encode_request "$here/catalog_request.txtpb" "$tmp/req-catalog.bin"
req_len="$(wc -c <"$tmp/req.bin")"
cat_req_len="$(wc -c <"$tmp/req-catalog.bin")"
cat_uris="$(grep -c '^resources' "$here/catalog_request.txtpb")"
path="/ramp.v1.ExchangeService/DiscoverResources"
{
  printf 'POST %s HTTP/1.1\r\nHost: bench.example\r\nContent-Type: application/proto\r\n' "$path"
  printf 'Connect-Protocol-Version: 1\r\nContent-Length: %d\r\n\r\n' "$req_len"
  cat "$tmp/req.bin"
} >"$tmp/req.http"

# Each row's Host header and request body; tollgate finds the tenant by the URIs in the body
# (the Host is only for nginx, which picks the answer by server_name).
row_host() { if [ "$1" = catalog ]; then echo catalog.example; else echo bench.example; fi; }
row_body() { if [ "$1" = catalog ]; then echo "$tmp/req-catalog.bin"; else echo "$tmp/req.bin"; fi; }

call() { # call PORT OUT_PREFIX [ROW]: POSTs the row's request, prints "status content-type"
  local row="${3:-empty}"
  curl -sS -o "$2.bin" -D "$2.headers" -w '%{http_code} %{content_type}' --max-time 5 \
    -H "Host: $(row_host "$row")" -H 'Content-Type: application/proto' -H 'Connect-Protocol-Version: 1' \
    --data-binary @"$(row_body "$row")" "http://127.0.0.1:$1$path" 2>/dev/null || true
}

# The catalog row's tenant: an RSL document of catalog_entries contents, each with three
# licences: "use" for ai-input/ai-index/search by all but government users at 0.00100 to
# 0.00475 USD (by N mod 16), "training" for ai-train at 0.50 USD (never government), and
# "purchase" for all uses at 0.05 to 0.11 USD (by N mod 7); lastmod the 15th of the content's
# month, 2016 to 2024, so every price is in the policy's archive band. The URIs of
# catalog_request.txtpb are among them (checked here).
catalog_entries=10000
awk -v n="$catalog_entries" 'BEGIN {
  print "<?xml version=\"1.0\" encoding=\"UTF-8\"?>"
  print "<rsl xmlns=\"https://rslstandard.org/rsl\">"
  for (i = 1; i <= n; i++) {
    y = 2016 + int((i - 1) / 1200); m = 1 + (i - 1) % 12
    printf "<content url=\"/articles/%d/%02d/story-%d\" lastmod=\"%d-%02d-15T08:00:00Z\">", y, m, i, y, m
    printf "<license><permits type=\"usage\">ai-input ai-index search</permits>"
    printf "<permits type=\"user\">commercial non-commercial education personal</permits>"
    printf "<payment type=\"use\"><amount currency=\"USD\">0.%06d</amount></payment></license>", 1000 + (i % 16) * 250
    printf "<license><permits type=\"usage\">ai-train</permits><prohibits type=\"user\">government</prohibits>"
    printf "<payment type=\"training\"><amount currency=\"USD\">0.50</amount></payment></license>"
    printf "<license><permits type=\"usage\">all</permits>"
    printf "<payment type=\"purchase\"><amount currency=\"USD\">0.%06d</amount></payment></license>", 50000 + (i % 7) * 10000
    printf "<terms>https://catalog.example/terms</terms></content>\n"
  }
  print "</rsl>"
}' >"$tmp/catalog.xml"
catalog_bytes="$(wc -c <"$tmp/catalog.xml")"
for u in $(sed -n 's|^resources { uri: "https://catalog.example\([^"]*\)" }$|\1|p' "$here/catalog_request.txtpb"); do
  grep -q "<content url=\"$u\" " "$tmp/catalog.xml" || die "catalog_request.txtpb names $u, which is not in the generated catalog"
done

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

tg_pid=""; tg_port=""; tag=""
start_tollgate() { # start_tollgate WORKERS(1|0) TAG [nocatalog]: both tenants unless told
  tg_port="$(free_port)"
  tag="$2"
  local catalog_tenant=""
  # refresh_s: no re-read of the file during the benchmark.
  [ "${3:-}" = nocatalog ] || catalog_tenant="
    { name = \"catalog\", hosts = { \"catalog.example\" },
      catalog = { source = \"$tmp/catalog.xml\", refresh_s = 86400 },
      policy = \"$here/catalog_policy.lua\" },"
  mkdir -p "$tmp/tg-$2/data"
  cat >"$tmp/tg-$2/tollgate.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $tg_port } },
  workers = $1,
  data_dir = "data",
  log_level = "warn",
  limits = { max_connections = 20000, idle_timeout_ms = 600000, shutdown_grace_ms = 1000 },
  tenants = {
    { name = "bench", hosts = { "bench.example" } },$catalog_tenant
  },
}
EOF
  "$bin" run -c "$tmp/tg-$2/tollgate.lua" >"$tmp/tollgate-$2.log" 2>&1 &
  tg_pid=$!
  pids+=("$tg_pid")
  local i
  # /readyz: answers 200 once the catalog has loaded.
  for i in $(seq 1 300); do
    kill -0 "$tg_pid" 2>/dev/null || { cat "$tmp/tollgate-$2.log" >&2; die "tollgate exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$tg_port/readyz" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  cat "$tmp/tollgate-$2.log" >&2
  die "tollgate did not answer /readyz within 30 s"
}

ng_pid=""; ng_port=""
start_nginx() { # start_nginx WORKERS(1|auto) TAG [nocatalog]: both rows' answers unless told
  ng_port="$(free_port)"
  local p="$tmp/nginx-$2"
  local catalog_server=""
  mkdir -p "$p/tmp"
  # The catalog row's answer, chosen by server_name (the first server is the default one). The
  # same code as the empty row's content_by_lua_block, from a file: nginx refuses a *_by_lua_block
  # of more than 4 KiB, and the answer's escaped bytes are longer. The file is compiled once and
  # cached (lua_code_cache is on). Run as root, nginx's workers run as nobody: they need to
  # reach the file through the private temporary folder.
  if [ "${3:-}" != nocatalog ]; then
    cat >"$p/catalog_answer.lua" <<EOF
ngx.req.read_body()
ngx.header["Content-Type"] = "$cat_resp_ct"
ngx.header["Content-Length"] = $cat_resp_len
ngx.print("$cat_resp_lua")
EOF
    chmod 711 "$tmp" "$p"
    chmod 644 "$p/catalog_answer.lua"
    catalog_server="
  server {
    listen 127.0.0.1:$ng_port;
    server_name catalog.example;
    location = $path {
      content_by_lua_file $p/catalog_answer.lua;
    }
  }"
  fi
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
  client_body_buffer_size 16k;
  keepalive_timeout 600s;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$ng_port reuseport;
    server_name bench.example;
    location = $path {
      content_by_lua_block {
        ngx.req.read_body()
        ngx.header["Content-Type"] = "$resp_ct"
        ngx.header["Content-Length"] = $resp_len
        ngx.print("$resp_lua")
      }
    }
    location = /healthz { return 200 "ok\n"; }
  }$catalog_server
}
EOF
  nginx -p "$p" -c "$p/nginx.conf" -g 'daemon off;' >"$tmp/nginx-$2.log" 2>&1 &
  ng_pid=$!
  pids+=("$ng_pid")
  local i
  for i in $(seq 1 100); do
    kill -0 "$ng_pid" 2>/dev/null || { cat "$tmp/nginx-$2.log" "$p/error.log" >&2 2>/dev/null; die "nginx exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ng_port/healthz" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  die "nginx did not answer within 10 s"
}

nginx_workers_rss_kb() { # sum over the master's children: the workers hold the connections
  local total=0 c
  for c in $(ps -o pid= --ppid "$ng_pid"); do total=$((total + $(rss_kb "$c"))); done
  echo "$total"
}

stop_servers() {
  alive "$tg_pid" || say "bench: tollgate (pid $tg_pid) had already exited: $(tail -n 3 "$tmp/tollgate-$tag.log" 2>/dev/null)"
  stop_tollgate
  stop_pid "$ng_pid" || true; forget_pid "$ng_pid"
}

# One wrk run; appends its JSON line to results.jsonl and prints a progress line.
# run_wrk KIND ROW(empty|catalog) SERVER WORKERS RUN PORT DURATION [RATE]
run_wrk() {
  local kind="$1" row="$2" server="$3" workers="$4" run="$5" port="$6" secs="$7" rate="${8:-}"
  local out="$tmp/wrk-$kind-$row-$server-w$workers-$run.txt" load1 use0
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  use0="$(usage_of "$server")"
  BENCH_BODY="$(row_body "$row")" BENCH_HOST="$(row_host "$row")" BENCH_RATE="$rate" BENCH_THREADS="$threads" \
    BENCH_LABEL="\"kind\":\"$kind\",\"row\":\"$row\",\"server\":\"$server\",\"workers\":\"$workers\",\"run\":\"$run\",\"load1_before\":$load1" \
    wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s "$here/connect.lua" "http://127.0.0.1:$port" \
    >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
  check_alive "$server" "the $kind run ($row row)"
  [ "$kind" = warmup ] && return 0
  record "$out" "$(usage_delta "$server" "$use0")"
}

# One paced run at RATE req/s with the open-loop generator (pace.c), on the empty row.
# run_pace SERVER WORKERS RUN PORT DURATION RATE
run_pace() {
  local server="$1" workers="$2" run="$3" port="$4" secs="$5" rate="$6"
  local out="$tmp/pace-$server-w$workers-$run.txt" load1 use0
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  use0="$(usage_of "$server")"
  BENCH_LABEL="\"kind\":\"half\",\"row\":\"empty\",\"server\":\"$server\",\"workers\":\"$workers\",\"run\":\"$run\",\"load1_before\":$load1" \
    "$build/bench/pace" 127.0.0.1 "$port" "$rate" "$secs" "$conns" "$tmp/req.http" >"$out" 2>&1 ||
    { cat "$out" >&2; die "pace failed"; }
  check_alive "$server" "the half-load run"
  record "$out" "$(usage_delta "$server" "$use0")"
}

alive() { # alive PID: running, not a zombie
  local st
  st="$(ps -o stat= -p "$1" 2>/dev/null || true)"
  [ -n "$st" ] && [ "${st#Z}" = "$st" ]
}

check_alive() { # check_alive SERVER WHAT: stops the benchmark if the server died during WHAT
  local pid="$tg_pid" log="$tmp/tollgate-$tag.log"
  [ "$1" = tollgate ] || { pid="$ng_pid"; log="$tmp/nginx-$tag/error.log"; }
  alive "$pid" && return 0
  say "bench: $1 (pid $pid) died during $2; the end of its log ($log):"
  tail -n 20 "$log" >&2 2>/dev/null || true
  die "$1 died during $2"
}

record() { # record OUTPUT "CPU_TICKS RUNQ_NS": appends the run's BENCHJSON line, with the server's usage
  local line ticks runq steal total
  line="$(sed -n 's/^BENCHJSON //p' "$1")"
  [ -n "$line" ] || { cat "$1" >&2; die "no result in $1"; }
  read -r ticks runq steal total <<<"$2"
  printf '%s\n' "$line" | node -e '
    const [ticks, hz, file, runq, steal, total] = process.argv.slice(1);
    const r = JSON.parse(require("fs").readFileSync(0, "utf8"));
    // CPU the server spent per answered request: far less sensitive to other
    // load on the machine than req/s.
    r.server_cpu_s = +ticks / +hz;
    // Time the server was ready to run but had no core: a tail latency far
    // above 1 ms with seconds of this is the machine, not the server.
    r.server_runq_wait_ms = Math.round(+runq / 1e6);
    // Share of the machine\u0027s CPU time the hypervisor took away during the run.
    r.steal_pct = +total > 0 ? Math.round(+steal / +total * 1000) / 10 : null;
    r.cpu_us_per_req = r.requests ? Math.round(r.server_cpu_s / r.requests * 1e7) / 10 : null;
    require("fs").appendFileSync(file, JSON.stringify(r) + "\n");
    const e = Object.values(r.errors).reduce((a, b) => a + b, 0);
    console.error(`  ${r.kind.padEnd(8)} ${r.row.padEnd(7)} ${r.server.padEnd(9)} workers=${r.workers.padEnd(3)} run ${r.run}: ` +
      `${Math.round(r.rps)} req/s  p50 ${(r.p50_us / 1000).toFixed(3)} ms  p99 ${(r.p99_us / 1000).toFixed(3)} ms` +
      `  cpu ${r.cpu_us_per_req} us/req  runq wait ${r.server_runq_wait_ms} ms  steal ${r.steal_pct}%` +
      (e ? `  ERRORS ${JSON.stringify(r.errors)}` : ""));' \
    "$ticks" "$clk_tck" "$tmp/results.jsonl" "$runq" "$steal" "$total"
}

server_pids() { # the processes that serve: tollgate's one, or nginx's workers
  if [ "$1" = tollgate ]; then echo "$tg_pid"; else ps -o pid= --ppid "$ng_pid"; fi
}

# usage SERVER: "CPU_TICKS RUNQ_NS": utime+stime of the serving processes in clock ticks, and
# the time their threads spent runnable but waiting for a core (schedstat), in ns.
usage_of() {
  local ticks=0 runq=0 p t cpu
  cpu="$(cpu_stat)"
  for p in $(server_pids "$1"); do
    t="$(awk '{ printf "%.0f", $14 + $15 }' "/proc/$p/stat" 2>/dev/null || echo 0)"
    ticks=$((ticks + ${t:-0}))
    t="$(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{ s += $2 } END { printf "%.0f", s }')"
    runq=$((runq + ${t:-0}))
  done
  echo "$ticks $runq $cpu"
}

# cpu_stat: "STEAL TOTAL" ticks of the whole machine (/proc/stat). Steal is time the
# hypervisor ran something else while this VM had work: invisible to the guest's scheduler.
cpu_stat() {
  awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; printf "%.0f %.0f", $9, t }' /proc/stat
}

usage_delta() { # usage_delta SERVER "BEFORE": "TICKS RUNQ_NS STEAL TOTAL" spent since BEFORE
  local b0 b1 b2 b3 a0 a1 a2 a3
  read -r b0 b1 b2 b3 <<<"$2"
  read -r a0 a1 a2 a3 <<<"$(usage_of "$1")"
  echo "$((a0 - b0)) $((a1 - b1)) $((a2 - b2)) $((a3 - b3))"
}

median_rps() { # median_rps KIND ROW SERVER WORKERS
  node -e '
    const [kind, row, server, workers] = process.argv.slice(1);
    const xs = require("fs").readFileSync(process.argv[5], "utf8").split("\n").filter(Boolean)
      .map(JSON.parse).filter((r) => r.kind === kind && r.row === row && r.server === server && r.workers === workers)
      .map((r) => r.rps).sort((a, b) => a - b);
    const m = xs.length >> 1;
    console.log(Math.round(xs.length % 2 ? xs[m] : (xs[m - 1] + xs[m]) / 2));' "$1" "$2" "$3" "$4" "$tmp/results.jsonl"
}

: >"$tmp/results.jsonl"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
say "bench: $ncores cores, load average $load_start; wrk -t$threads -c$conns -d${duration}s, $runs run(s) each"
say "bench: nothing is pinned: wrk shares the cores with the server under test (and with anything else running)"
if awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }'; then
  say "bench: WARNING: the machine is busy (load $load_start): figures will be noisy"
fi

# Capture tollgate's exact answers; nginx is configured to send the same bytes. (Offer ids and
# expires_at_unix carry the time of the answer: later answers from tollgate differ from the
# captured one in those bytes, never in length.)
lua_bytes() { od -An -v -tu1 "$1" | awk '{ for (i = 1; i <= NF; i++) printf "\\%d", $i }'; }
decode_response() {
  protoc --decode=ramp.v1.DiscoverResourcesResponse -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" <"$1"
}
start_tollgate 1 probe
read -r tg_status resp_ct <<<"$(call "$tg_port" "$tmp/tg-resp" empty)"
[ "$tg_status" = 200 ] || { cat "$tmp/tg-resp.headers" "$tmp/tg-resp.bin" >&2 2>/dev/null; die "tollgate answered $tg_status to DiscoverResources (want 200)"; }
[ -n "$resp_ct" ] || die "tollgate's answer has no Content-Type"
resp_len="$(wc -c <"$tmp/tg-resp.bin")"
resp_lua="$(lua_bytes "$tmp/tg-resp.bin")"
resp_text="$(decode_response "$tmp/tg-resp.bin" 2>/dev/null | tr '\n' ' ' || true)"
read -r tg_status cat_resp_ct <<<"$(call "$tg_port" "$tmp/tg-resp-catalog" catalog)"
[ "$tg_status" = 200 ] || { cat "$tmp/tg-resp-catalog.headers" "$tmp/tg-resp-catalog.bin" >&2 2>/dev/null; die "tollgate answered $tg_status to the catalog row's DiscoverResources (want 200)"; }
[ -n "$cat_resp_ct" ] || die "tollgate's answer to the catalog row has no Content-Type"
cat_resp_len="$(wc -c <"$tmp/tg-resp-catalog.bin")"
cat_resp_lua="$(lua_bytes "$tmp/tg-resp-catalog.bin")"
decode_response "$tmp/tg-resp-catalog.bin" >"$tmp/catalog-answer.txt" || die "cannot decode the catalog row's answer"
cat_resp_text="$(tr '\n' ' ' <"$tmp/catalog-answer.txt" | tr -s ' ')"
# Every URI of the request must be answered with offers (no absence), each id signed.
read -r cat_results cat_with_offers cat_offers cat_ids <<<"$(awk '
  /^results \{/ { r++ }
  /^  offers \{/ { o++; if (!(r in seen)) { seen[r] = 1; w++ } }
  /^    id: "/ { ids++ }
  END { print r + 0, w + 0, o + 0, ids + 0 }' "$tmp/catalog-answer.txt")"
[ "$cat_results" = "$cat_uris" ] && [ "$cat_with_offers" = "$cat_uris" ] && [ "$cat_ids" = "$cat_offers" ] ||
  { cat "$tmp/catalog-answer.txt" >&2; die "the catalog row's answer does not offer every URI ($cat_with_offers of $cat_uris with offers, $cat_ids ids for $cat_offers offers)"; }
cat_amounts="$(sed -n 's/^ *amount: \([0-9]*\)$/\1/p' "$tmp/catalog-answer.txt" | tr '\n' ' ' | sed 's/ $//')"
stop_tollgate
start_nginx 1 probe
read -r ng_status ng_ct <<<"$(call "$ng_port" "$tmp/ng-resp" empty)"
[ "$ng_status" = 200 ] && [ "$ng_ct" = "$resp_ct" ] && cmp -s "$tmp/tg-resp.bin" "$tmp/ng-resp.bin" ||
  die "nginx's answer differs from tollgate's (status $ng_status, type $ng_ct)"
read -r ng_status ng_ct <<<"$(call "$ng_port" "$tmp/ng-resp-catalog" catalog)"
[ "$ng_status" = 200 ] && [ "$ng_ct" = "$cat_resp_ct" ] && cmp -s "$tmp/tg-resp-catalog.bin" "$tmp/ng-resp-catalog.bin" ||
  die "nginx's answer to the catalog row differs from tollgate's (status $ng_status, type $ng_ct)"
stop_pid "$ng_pid" || true; forget_pid "$ng_pid"
say "bench: row empty: request $req_len B protobuf; both answer 200 $resp_ct with the same $resp_len B: $resp_text"
say "bench: row catalog: request $cat_req_len B protobuf ($cat_uris URIs of a catalog of $catalog_entries contents, $catalog_bytes B of RSL);" \
  "both answer 200 $cat_resp_ct with the same $cat_resp_len B: $cat_offers offers with signed ids," \
  "amounts priced by catalog_policy.lua: $cat_amounts (decoded: $logs/catalog-answer.txt)"

perf_note="not requested"
for w in 1 all; do
  if [ "$w" = 1 ]; then tgw=1; ngw=1; else tgw=0; ngw=auto; fi
  start_tollgate "$tgw" "w$w"
  start_nginx "$ngw" "w$w"
  say "bench: workers=$w: tollgate pid $tg_pid port $tg_port, nginx pid $ng_pid port $ng_port"
  for row in empty catalog; do
    run_wrk warmup "$row" tollgate "$w" 0 "$tg_port" "$warmup"
    run_wrk warmup "$row" nginx_lua "$w" 0 "$ng_port" "$warmup"
  done
  for r in $(seq 1 "$runs"); do
    for row in empty catalog; do
      run_wrk peak "$row" tollgate "$w" "$r" "$tg_port" "$duration"
      run_wrk peak "$row" nginx_lua "$w" "$r" "$ng_port" "$duration"
    done
  done
  # "Half that load" (empty row only): half of the rate nginx+Lua sustains with the same
  # worker count.
  half="$(($(median_rps peak empty nginx_lua "$w") / 2))"
  for r in $(seq 1 "$runs"); do
    run_pace tollgate "$w" "$r" "$tg_port" "$duration" "$half"
    run_pace nginx_lua "$w" "$r" "$ng_port" "$duration" "$half"
  done
  # The same rate paced by wrk's delay() hook, as a cross-check (1 ms bursts).
  for r in $(seq 1 "$runs"); do
    run_wrk half_wrk empty tollgate "$w" "$r" "$tg_port" "$duration" "$half"
    run_wrk half_wrk empty nginx_lua "$w" "$r" "$ng_port" "$duration" "$half"
  done
  if [ "$want_perf" -eq 1 ] && [ "$w" = 1 ]; then
    if command -v perf >/dev/null && perf record -q -o "$tmp/perf-probe.data" -- true >/dev/null 2>&1; then
      perf_note=""
      for row in empty catalog; do
        # bench-perf.txt: the empty row; bench-perf-catalog.txt: the catalog row.
        sfx=""; [ "$row" = empty ] || sfx="-$row"
        say "bench: profiling tollgate (perf record, cpu-clock) during one more peak run of the $row row"
        perf record -q -F 1999 -p "$tg_pid" -o "$build/bench-perf$sfx.data" -- sleep "$duration" >/dev/null 2>&1 &
        perf_pid=$!
        run_wrk warmup "$row" tollgate "$w" perf "$tg_port" "$duration"
        wait "$perf_pid" || true
        perf report -i "$build/bench-perf$sfx.data" --stdio --no-children --sort dso,symbol 2>/dev/null |
          grep -v '^#' | grep -v '^$' | sed 's/[[:space:]]*$//' | head -60 >"$build/bench-perf$sfx.txt" || true
        perf_note="${perf_note:+$perf_note }$build/bench-perf$sfx.txt"
        say "bench: profile top entries, $row row (full report: $build/bench-perf$sfx.txt):"
        grep -E '^ +[0-9]' "$build/bench-perf$sfx.txt" | head -15 >&2 || true
      done
    else
      perf_note="perf unavailable"
      say "bench: perf record does not work here; no profile"
    fi
  fi
  stop_servers
done

# Idle keep-alive connections: fresh one-worker instances, warmed with a short wrk run so that
# "before" is a process that has served traffic; RSS from /proc/<pid>/status.
# (Both without the catalog row's tenant and answer: this part is about connections.)
start_tollgate 1 idle nocatalog
start_nginx 1 idle nocatalog
run_wrk warmup empty tollgate idle 0 "$tg_port" 1
run_wrk warmup empty nginx_lua idle 0 "$ng_port" 1
sleep 1
idle_run() { # idle_run SERVER PORT RSS_FN
  local server="$1" port="$2" rssfn="$3" before after closed client open i
  before="$($rssfn)"
  "$build/bench/idle_conns" 127.0.0.1 "$port" "$idle_conns" "$tmp/req.http" >"$tmp/idle-$server.log" 2>&1 &
  client=$!
  pids+=("$client")
  for i in $(seq 1 1200); do
    grep -q '^ready' "$tmp/idle-$server.log" && break
    kill -0 "$client" 2>/dev/null || { cat "$tmp/idle-$server.log" >&2; die "idle_conns failed against $server"; }
    sleep 0.1
  done
  grep -q '^ready' "$tmp/idle-$server.log" || die "idle_conns did not finish against $server"
  after="$($rssfn)"
  open="$(sed -n 's/^ready open=\([0-9]*\).*/\1/p' "$tmp/idle-$server.log")"
  stop_pid "$client" || true; forget_pid "$client"
  sleep 2
  closed="$($rssfn)"
  printf '{"kind":"idle","server":"%s","conns":%d,"open":%d,"rss_before_kb":%d,"rss_after_kb":%d,"rss_closed_kb":%d}\n' \
    "$server" "$idle_conns" "$open" "$before" "$after" "$closed" >>"$tmp/results.jsonl"
  say "  idle  $server: $open of $idle_conns open, RSS $before -> $after KiB ($(((after - before) * 1024 / (open > 0 ? open : 1))) B per connection), $closed KiB after they closed"
}
tg_rss() { rss_kb "$tg_pid"; }
idle_run tollgate "$tg_port" tg_rss
idle_run nginx_lua "$ng_port" nginx_workers_rss_kb
stop_servers

# Metadata, then the report.
load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
BM_CPU="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)" \
BM_CORES="$ncores" BM_KERNEL="$(uname -r)" BM_LOAD_START="$load_start" BM_LOAD_END="$load_end" \
BM_NGINX="$(nginx -v 2>&1 | sed 's/^nginx version: //')" BM_WRK="$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2)" \
BM_TG="$("$bin" version 2>/dev/null || echo unknown)" \
BM_GIT="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD -- core lua 2>/dev/null || echo '+dirty')" \
BM_QUICK="$quick" BM_THREADS="$threads" BM_CONNS="$conns" BM_DURATION="$duration" BM_RUNS="$runs" \
BM_REQ_LEN="$req_len" BM_RESP_LEN="$resp_len" BM_RESP_CT="$resp_ct" BM_RESP_TEXT="$resp_text" BM_PATH="$path" \
BM_TG_HEADERS="$(tr -d '\r' <"$tmp/tg-resp.headers")" BM_NG_HEADERS="$(tr -d '\r' <"$tmp/ng-resp.headers")" \
BM_CAT_REQ_LEN="$cat_req_len" BM_CAT_URIS="$cat_uris" BM_CAT_RESP_LEN="$cat_resp_len" BM_CAT_RESP_CT="$cat_resp_ct" \
BM_CAT_RESP_TEXT="$cat_resp_text" BM_CAT_OFFERS="$cat_offers" BM_CAT_AMOUNTS="$cat_amounts" \
BM_CAT_ENTRIES="$catalog_entries" BM_CAT_BYTES="$catalog_bytes" \
BM_CAT_TG_HEADERS="$(tr -d '\r' <"$tmp/tg-resp-catalog.headers")" BM_CAT_NG_HEADERS="$(tr -d '\r' <"$tmp/ng-resp-catalog.headers")" \
BM_PERF="$perf_note" \
node -e '
  const e = process.env;
  const meta = {
    mode: e.BM_QUICK === "1" ? "quick" : "full",
    machine: { cpu: e.BM_CPU, cores: +e.BM_CORES, kernel: e.BM_KERNEL,
      load_average_start: e.BM_LOAD_START, load_average_end: e.BM_LOAD_END },
    versions: { tollgate: e.BM_TG, git: e.BM_GIT, nginx: e.BM_NGINX, wrk: e.BM_WRK },
    settings: { tool: "wrk", threads: +e.BM_THREADS, connections: +e.BM_CONNS, duration_s: +e.BM_DURATION,
      runs: +e.BM_RUNS, pinned: false,
      notes: [
        "Nothing is pinned: wrk and the server share the machine\u0027s cores, and so does anything else running.",
        "Runs alternate tollgate and nginx, and the empty and catalog rows; each metric is the median over runs on its own.",
        "Rows: empty = one URI of a tenant with no catalog and no policy (the cheapest path); catalog = four URIs of a tenant with a 10,000-content RSL catalog, priced by a Lua policy (skip, rate_limit never denying, price by purpose, user type and age), eight offers with signed ids. One tollgate serves both tenants; one nginx serves both answers (server_name). Half load and idle: empty row only.",
        "runq wait: time the server\u0027s threads were runnable but had no core during the run (/proc/<pid>/task/*/schedstat); tens of ms of it explain a p99 of tens of ms.",
        "steal: share of the machine\u0027s CPU time (/proc/stat) the hypervisor gave to other guests during the run; on a VM with steal, latency tails include the host\u0027s scheduling.",
        "CPU/req: utime+stime of the tollgate process (all threads) or of the nginx worker processes over the run, divided by the requests answered; steadier than req/s when other processes share the machine.",
        "Workers \u00271\u0027: tollgate workers = 1 against nginx worker_processes 1; \u0027all\u0027: workers = 0 against worker_processes auto.",
        "nginx: content_by_lua_block reads the body and prints the same bytes tollgate answers (captured once at start; tollgate\u0027s later answers differ only in the time inside offer ids and expires_at_unix, not in length); access_log off; keepalive_requests 1000000; listen reuseport.",
        "tollgate: log_level warn (no per-request logging), Release build.",
        "Half load: rate = half of nginx+lua\u0027s median peak req/s with the same worker count (the goal\u0027s load is 1.0x nginx+lua). Measured with pace.c, an open-loop generator sending request k at t0 + k/rate (timerfd, 1 ns slack) on a free keep-alive connection and timing from that intended instant (no coordinated omission); sent_p* time from the actual send.",
        "half_wrk: the same rate paced by wrk\u0027s delay() hook (connect.lua); wrk timers have 1 ms granularity, so each millisecond\u0027s requests go out together and queue behind each other: a pessimistic cross-check.",
        "Idle: fresh one-worker processes warmed by a 1 s wrk run; each connection completes one request, then stays idle; RSS (VmRSS) excludes kernel socket buffers.",
        "nginx allocates its connection and event structures for all worker_connections (20000) at start, so part of its per-connection memory is in the before figure; the delta is what an idle connection adds beyond that."
      ] },
    rows: {
      empty: {
        measures: "the cheapest path: DiscoverResources for one URI of a tenant with no catalog and no policy of its own (no catalog lookup; the built-in default policy\u0027s price hook declines the implicit unpriced offer: not for sale)",
        request: { method: "POST", path: e.BM_PATH, host: "bench.example", content_type: "application/proto",
          body: "spec/bench/request.txtpb", body_bytes: +e.BM_REQ_LEN, uris: 1,
          response_status: 200, response_content_type: e.BM_RESP_CT, response_body_bytes: +e.BM_RESP_LEN,
          response_text: e.BM_RESP_TEXT.trim(), tollgate_response_head: e.BM_TG_HEADERS.trim().split("\n"),
          nginx_response_head: e.BM_NG_HEADERS.trim().split("\n") },
      },
      catalog: {
        measures: "DiscoverResources against a loaded catalog: " + e.BM_CAT_URIS + " URIs of a tenant whose RSL catalog holds " +
          (+e.BM_CAT_ENTRIES).toLocaleString("en-US") + " contents (three licences each), priced by a Lua policy (skip; rate_limit, one bucket per AI system, never denying; price by usage purpose, user type and age), answered with " +
          e.BM_CAT_OFFERS + " offers with signed, expiring ids",
        catalog: { contents: +e.BM_CAT_ENTRIES, document_bytes: +e.BM_CAT_BYTES, licences_per_content: 3 },
        policy: "spec/bench/catalog_policy.lua",
        request: { method: "POST", path: e.BM_PATH, host: "catalog.example", content_type: "application/proto",
          body: "spec/bench/catalog_request.txtpb", body_bytes: +e.BM_CAT_REQ_LEN, uris: +e.BM_CAT_URIS,
          response_status: 200, response_content_type: e.BM_CAT_RESP_CT, response_body_bytes: +e.BM_CAT_RESP_LEN,
          offers: +e.BM_CAT_OFFERS, amounts: e.BM_CAT_AMOUNTS.split(" ").filter(Boolean).map(Number),
          response_text: e.BM_CAT_RESP_TEXT.trim(), tollgate_response_head: e.BM_CAT_TG_HEADERS.trim().split("\n"),
          nginx_response_head: e.BM_CAT_NG_HEADERS.trim().split("\n") },
      },
    },
    profile: e.BM_PERF,
  };
  require("fs").writeFileSync(process.argv[1], JSON.stringify(meta));' "$tmp/meta.json"

cp "$tmp/results.jsonl" "$tmp/results.log"
node "$here/report.js" "$tmp/results.jsonl" "$tmp/meta.json" "$build/bench-result.json"
echo ""
echo "JSON result: $build/bench-result.json   (raw wrk output: $logs/)"
