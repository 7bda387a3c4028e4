#!/usr/bin/env bash
# Benchmark: tollgate against nginx + Lua answering the same bytes.
# A separate command, not a test suite (it measures, it does not pass or fail).
#
# Usage: spec/bench/run.sh [--quick] [--perf]
#   --quick  one run of 3 s per server and setting (default: three runs of 10 s)
#   --perf   also profile tollgate (one worker) with `perf record` during one extra peak run
# Environment overrides: BENCH_THREADS (wrk threads, 2), BENCH_CONNS (wrk connections, 64),
#   BENCH_DURATION (s), BENCH_RUNS, BENCH_IDLE_CONNS (10000), BENCH_BUILD_DIR (build-bench),
#   BENCH_TOLLGATE_BIN (benchmark this binary instead of building one).
#
# What it does, for one worker (nginx worker_processes 1) and then all cores (workers = 0,
# worker_processes auto): starts `tollgate run` and an nginx whose content_by_lua_block returns
# the exact status, Content-Type and body tollgate answers to the benchmark's Connect unary call
# (POST /ramp.v1.ExchangeService/DiscoverResources, application/proto, a 101-byte
# DiscoverResourcesRequest from request.txtpb); drives both with the same wrk settings,
# alternating; then paces both at half of nginx's peak rate to read p99 there. Finally it holds
# 10,000 idle keep-alive connections against fresh one-worker instances of each and reads their
# RSS. Prints tables; writes the JSON result to <build>/bench-result.json and wrk's raw output
# to <build>/bench-logs/.
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

# The request: a serialized DiscoverResourcesRequest, and the same as a raw HTTP request.
protoc --encode=ramp.v1.DiscoverResourcesRequest -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" \
  <"$here/request.txtpb" >"$tmp/req.bin" || die "protoc --encode failed"
req_len="$(wc -c <"$tmp/req.bin")"
path="/ramp.v1.ExchangeService/DiscoverResources"
{
  printf 'POST %s HTTP/1.1\r\nHost: bench.example\r\nContent-Type: application/proto\r\n' "$path"
  printf 'Connect-Protocol-Version: 1\r\nContent-Length: %d\r\n\r\n' "$req_len"
  cat "$tmp/req.bin"
} >"$tmp/req.http"

call() { # call PORT OUT_PREFIX: POSTs the request, prints "status content-type"
  curl -sS -o "$2.bin" -D "$2.headers" -w '%{http_code} %{content_type}' --max-time 5 \
    -H 'Host: bench.example' -H 'Content-Type: application/proto' -H 'Connect-Protocol-Version: 1' \
    --data-binary @"$tmp/req.bin" "http://127.0.0.1:$1$path" 2>/dev/null || true
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

tg_pid=""; tg_port=""; tag=""
start_tollgate() { # start_tollgate WORKERS(1|0) TAG
  tg_port="$(free_port)"
  tag="$2"
  mkdir -p "$tmp/tg-$2/data"
  cat >"$tmp/tg-$2/tollgate.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $tg_port } },
  workers = $1,
  data_dir = "data",
  log_level = "warn",
  limits = { max_connections = 20000, idle_timeout_ms = 600000, shutdown_grace_ms = 1000 },
  tenants = { { name = "bench", hosts = { "bench.example" } } },
}
EOF
  "$bin" run -c "$tmp/tg-$2/tollgate.lua" >"$tmp/tollgate-$2.log" 2>&1 &
  tg_pid=$!
  pids+=("$tg_pid")
  local i
  for i in $(seq 1 100); do
    kill -0 "$tg_pid" 2>/dev/null || { cat "$tmp/tollgate-$2.log" >&2; die "tollgate exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$tg_port/healthz" 2>/dev/null)" = 200 ] && return 0
    sleep 0.1
  done
  cat "$tmp/tollgate-$2.log" >&2
  die "tollgate did not answer /healthz within 10 s"
}

ng_pid=""; ng_port=""
start_nginx() { # start_nginx WORKERS(1|auto) TAG
  ng_port="$(free_port)"
  local p="$tmp/nginx-$2"
  mkdir -p "$p/tmp"
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
    location = $path {
      content_by_lua_block {
        ngx.req.read_body()
        ngx.header["Content-Type"] = "$resp_ct"
        ngx.header["Content-Length"] = $resp_len
        ngx.print("$resp_lua")
      }
    }
    location = /healthz { return 200 "ok\n"; }
  }
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
# run_wrk KIND SERVER WORKERS RUN PORT DURATION [RATE]
run_wrk() {
  local kind="$1" server="$2" workers="$3" run="$4" port="$5" secs="$6" rate="${7:-}"
  local out="$tmp/wrk-$kind-$server-w$workers-$run.txt" load1 use0
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  use0="$(usage_of "$server")"
  BENCH_BODY="$tmp/req.bin" BENCH_RATE="$rate" BENCH_THREADS="$threads" \
    BENCH_LABEL="\"kind\":\"$kind\",\"server\":\"$server\",\"workers\":\"$workers\",\"run\":\"$run\",\"load1_before\":$load1" \
    wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s "$here/connect.lua" "http://127.0.0.1:$port" \
    >"$out" 2>&1 || { cat "$out" >&2; die "wrk failed"; }
  check_alive "$server" "the $kind run"
  [ "$kind" = warmup ] && return 0
  record "$out" "$(usage_delta "$server" "$use0")"
}

# One paced run at RATE req/s with the open-loop generator (pace.c).
# run_pace SERVER WORKERS RUN PORT DURATION RATE
run_pace() {
  local server="$1" workers="$2" run="$3" port="$4" secs="$5" rate="$6"
  local out="$tmp/pace-$server-w$workers-$run.txt" load1 use0
  load1="$(cut -d' ' -f1 /proc/loadavg)"
  use0="$(usage_of "$server")"
  BENCH_LABEL="\"kind\":\"half\",\"server\":\"$server\",\"workers\":\"$workers\",\"run\":\"$run\",\"load1_before\":$load1" \
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
    console.error(`  ${r.kind.padEnd(8)} ${r.server.padEnd(9)} workers=${r.workers.padEnd(3)} run ${r.run}: ` +
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

median_rps() { # median_rps KIND SERVER WORKERS
  node -e '
    const [kind, server, workers] = process.argv.slice(1);
    const xs = require("fs").readFileSync(process.argv[4], "utf8").split("\n").filter(Boolean)
      .map(JSON.parse).filter((r) => r.kind === kind && r.server === server && r.workers === workers)
      .map((r) => r.rps).sort((a, b) => a - b);
    const m = xs.length >> 1;
    console.log(Math.round(xs.length % 2 ? xs[m] : (xs[m - 1] + xs[m]) / 2));' "$1" "$2" "$3" "$tmp/results.jsonl"
}

: >"$tmp/results.jsonl"
load_start="$(cut -d' ' -f1-3 /proc/loadavg)"
say "bench: $ncores cores, load average $load_start; wrk -t$threads -c$conns -d${duration}s, $runs run(s) each"
say "bench: nothing is pinned: wrk shares the cores with the server under test (and with anything else running)"
if awk -v l="${load_start%% *}" 'BEGIN { exit !(l > 0.5) }'; then
  say "bench: WARNING: the machine is busy (load $load_start): figures will be noisy"
fi

# Capture tollgate's exact answer; nginx is configured to send the same bytes.
start_tollgate 1 probe
read -r tg_status resp_ct <<<"$(call "$tg_port" "$tmp/tg-resp")"
[ "$tg_status" = 200 ] || { cat "$tmp/tg-resp.headers" "$tmp/tg-resp.bin" >&2 2>/dev/null; die "tollgate answered $tg_status to DiscoverResources (want 200)"; }
[ -n "$resp_ct" ] || die "tollgate's answer has no Content-Type"
resp_len="$(wc -c <"$tmp/tg-resp.bin")"
resp_lua="$(od -An -v -tu1 "$tmp/tg-resp.bin" | awk '{ for (i = 1; i <= NF; i++) printf "\\%d", $i }')"
resp_text="$(protoc --decode=ramp.v1.DiscoverResourcesResponse -I "$root/proto" "$root/proto/ramp/v1/exchange.proto" \
  <"$tmp/tg-resp.bin" 2>/dev/null | tr '\n' ' ' || true)"
stop_tollgate
start_nginx 1 probe
read -r ng_status ng_ct <<<"$(call "$ng_port" "$tmp/ng-resp")"
[ "$ng_status" = 200 ] && [ "$ng_ct" = "$resp_ct" ] && cmp -s "$tmp/tg-resp.bin" "$tmp/ng-resp.bin" ||
  die "nginx's answer differs from tollgate's (status $ng_status, type $ng_ct)"
stop_pid "$ng_pid" || true; forget_pid "$ng_pid"
say "bench: request $req_len B protobuf; both answer 200 $resp_ct with the same $resp_len B: $resp_text"

perf_note="not requested"
for w in 1 all; do
  if [ "$w" = 1 ]; then tgw=1; ngw=1; else tgw=0; ngw=auto; fi
  start_tollgate "$tgw" "w$w"
  start_nginx "$ngw" "w$w"
  say "bench: workers=$w: tollgate pid $tg_pid port $tg_port, nginx pid $ng_pid port $ng_port"
  run_wrk warmup tollgate "$w" 0 "$tg_port" "$warmup"
  run_wrk warmup nginx_lua "$w" 0 "$ng_port" "$warmup"
  for r in $(seq 1 "$runs"); do
    run_wrk peak tollgate "$w" "$r" "$tg_port" "$duration"
    run_wrk peak nginx_lua "$w" "$r" "$ng_port" "$duration"
  done
  # "Half that load": half of the rate nginx+Lua sustains with the same worker count.
  half="$(($(median_rps peak nginx_lua "$w") / 2))"
  for r in $(seq 1 "$runs"); do
    run_pace tollgate "$w" "$r" "$tg_port" "$duration" "$half"
    run_pace nginx_lua "$w" "$r" "$ng_port" "$duration" "$half"
  done
  # The same rate paced by wrk's delay() hook, as a cross-check (1 ms bursts).
  for r in $(seq 1 "$runs"); do
    run_wrk half_wrk tollgate "$w" "$r" "$tg_port" "$duration" "$half"
    run_wrk half_wrk nginx_lua "$w" "$r" "$ng_port" "$duration" "$half"
  done
  if [ "$want_perf" -eq 1 ] && [ "$w" = 1 ]; then
    if command -v perf >/dev/null && perf record -q -o "$tmp/perf-probe.data" -- true >/dev/null 2>&1; then
      say "bench: profiling tollgate (perf record, cpu-clock) during one more peak run"
      perf record -q -F 1999 -p "$tg_pid" -o "$build/bench-perf.data" -- sleep "$duration" >/dev/null 2>&1 &
      perf_pid=$!
      run_wrk warmup tollgate "$w" perf "$tg_port" "$duration"
      wait "$perf_pid" || true
      perf report -i "$build/bench-perf.data" --stdio --no-children --sort dso,symbol 2>/dev/null |
        grep -v '^#' | grep -v '^$' | sed 's/[[:space:]]*$//' | head -60 >"$build/bench-perf.txt" || true
      perf_note="$build/bench-perf.txt"
      say "bench: profile top entries (full report: $perf_note):"
      grep -E '^ +[0-9]' "$build/bench-perf.txt" | head -15 >&2 || true
    else
      perf_note="perf unavailable"
      say "bench: perf record does not work here; no profile"
    fi
  fi
  stop_servers
done

# Idle keep-alive connections: fresh one-worker instances, warmed with a short wrk run so that
# "before" is a process that has served traffic; RSS from /proc/<pid>/status.
start_tollgate 1 idle
start_nginx 1 idle
run_wrk warmup tollgate idle 0 "$tg_port" 1
run_wrk warmup nginx_lua idle 0 "$ng_port" 1
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
BM_GIT="$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD -- core 2>/dev/null || echo '+dirty')" \
BM_QUICK="$quick" BM_THREADS="$threads" BM_CONNS="$conns" BM_DURATION="$duration" BM_RUNS="$runs" \
BM_REQ_LEN="$req_len" BM_RESP_LEN="$resp_len" BM_RESP_CT="$resp_ct" BM_RESP_TEXT="$resp_text" BM_PATH="$path" \
BM_TG_HEADERS="$(tr -d '\r' <"$tmp/tg-resp.headers")" BM_NG_HEADERS="$(tr -d '\r' <"$tmp/ng-resp.headers")" \
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
        "Runs alternate tollgate and nginx; each metric is the median over runs on its own.",
        "runq wait: time the server\u0027s threads were runnable but had no core during the run (/proc/<pid>/task/*/schedstat); tens of ms of it explain a p99 of tens of ms.",
        "steal: share of the machine\u0027s CPU time (/proc/stat) the hypervisor gave to other guests during the run; on a VM with steal, latency tails include the host\u0027s scheduling.",
        "CPU/req: utime+stime of the tollgate process (all threads) or of the nginx worker processes over the run, divided by the requests answered; steadier than req/s when other processes share the machine.",
        "Workers \u00271\u0027: tollgate workers = 1 against nginx worker_processes 1; \u0027all\u0027: workers = 0 against worker_processes auto.",
        "nginx: content_by_lua_block reads the body and prints the same bytes tollgate answers; access_log off; keepalive_requests 1000000; listen reuseport.",
        "tollgate: log_level warn (no per-request logging), Release build.",
        "Half load: rate = half of nginx+lua\u0027s median peak req/s with the same worker count (the goal\u0027s load is 1.0x nginx+lua). Measured with pace.c, an open-loop generator sending request k at t0 + k/rate (timerfd, 1 ns slack) on a free keep-alive connection and timing from that intended instant (no coordinated omission); sent_p* time from the actual send.",
        "half_wrk: the same rate paced by wrk\u0027s delay() hook (connect.lua); wrk timers have 1 ms granularity, so each millisecond\u0027s requests go out together and queue behind each other: a pessimistic cross-check.",
        "Idle: fresh one-worker processes warmed by a 1 s wrk run; each connection completes one request, then stays idle; RSS (VmRSS) excludes kernel socket buffers.",
        "nginx allocates its connection and event structures for all worker_connections (20000) at start, so part of its per-connection memory is in the before figure; the delta is what an idle connection adds beyond that."
      ] },
    request: { method: "POST", path: e.BM_PATH, content_type: "application/proto", body_bytes: +e.BM_REQ_LEN,
      response_status: 200, response_content_type: e.BM_RESP_CT, response_body_bytes: +e.BM_RESP_LEN,
      response_text: e.BM_RESP_TEXT.trim(), tollgate_response_head: e.BM_TG_HEADERS.trim().split("\n"),
      nginx_response_head: e.BM_NG_HEADERS.trim().split("\n") },
    profile: e.BM_PERF,
  };
  require("fs").writeFileSync(process.argv[1], JSON.stringify(meta));' "$tmp/meta.json"

cp "$tmp/results.jsonl" "$tmp/results.log"
node "$here/report.js" "$tmp/results.jsonl" "$tmp/meta.json" "$build/bench-result.json"
echo ""
echo "JSON result: $build/bench-result.json   (raw wrk output: $logs/)"
