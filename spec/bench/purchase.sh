#!/usr/bin/env bash
# Benchmark: durable ExecuteTransaction of one item (built-in ledger, write-ahead log on the
# repository's disk) as a ratio of DiscoverResources of the same offer, in one run.
# A separate command, not a test suite: it prints figures and writes JSON, it passes nothing.
#
# Usage: spec/bench/purchase.sh [--quick] [--perf]
#   --quick  one run of 3 s per call and setting, half load 3 s (default: three alternating
#            runs of 10 s, medians; half load three runs of 10 s)
#   --perf   also `perf record` tollgate (workers 1, default batch interval) during one extra
#            Execute peak run; top symbols printed, report in <build>/purchase-perf.txt
# Environment: BENCH_THREADS (2), BENCH_CONNS (64), BENCH_DURATION (s), BENCH_RUNS,
#   BENCH_WORKERS ("1 0": the worker settings, in order), BENCH_INTERVALS ("0 200 1000":
#   ledger.wal.batch_interval_us, one fresh instance each), BENCH_HALF_SECONDS,
#   BENCH_BUILD_DIR (build-bench), BENCH_TOLLGATE_BIN (use this binary), BENCH_WAL and
#   BENCH_LEDGER (more keys for ledger.wal and ledger, e.g. BENCH_LEDGER='snapshot_every = 10000,').
#
# One tenant (bench.example): an RSL catalog with one content (every path) sold for
# 1 micro-USD, an nginx_secure_link signer, builtin billing; one prepaid account (acct-bench,
# 2^53 micro-USD). Each instance gets a fresh data_dir on the disk of the repository's working
# directory (never tmpfs: the log's fdatasync is what is measured). Per instance: one offer id
# from DiscoverResources; then, alternating, wrk on DiscoverResources of that URI and on
# ExecuteTransaction of that offer (the same ai_system, both application/proto), each Execute
# with a unique idempotency key (purchase.lua), every answer checked APPROVED; the admin
# /metrics before and after each Execute run give fsyncs (txlog_fsync_batch_records_count),
# records (_sum) and the flush time (txlog_flush_duration_seconds); then Execute paced at half
# its own median peak with pace.c (a unique key per request), open loop. Finally a raw disk
# figure: the same small appends + fdatasync from a tiny C program (fsync_probe, built here).
# Prints tables; writes <build>/purchase-bench.json and each run's raw output to
# <build>/purchase-logs/.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"

usage() { sed -n '6,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
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
workers_list="${BENCH_WORKERS:-1 0}"
intervals="${BENCH_INTERVALS:-0 200 1000}"
if [ "$quick" -eq 1 ]; then
  duration="${BENCH_DURATION:-3}"; runs="${BENCH_RUNS:-1}"; half_secs="${BENCH_HALF_SECONDS:-3}"; warmup=1
else
  duration="${BENCH_DURATION:-10}"; runs="${BENCH_RUNS:-3}"; half_secs="${BENCH_HALF_SECONDS:-10}"; warmup=2
fi

say() { printf '%s\n' "$*" >&2; }
die() { say "purchase bench: $*"; exit 1; }
for tool in wrk curl cmake protoc python3 cc findmnt; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done
[ "$want_perf" -eq 0 ] || command -v perf >/dev/null || die "perf is not installed"

bin="${BENCH_TOLLGATE_BIN:-}"
if [ -z "$bin" ]; then
  if ! grep -qs '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
    cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
  fi
  cmake --build "$build" -j2 --target tollgate >/dev/null || die "build failed: cmake --build $build --target tollgate"
  bin="$build/tollgate"
fi
[ -x "$bin" ] || die "$bin is not executable"
mkdir -p "$build/bench"
if [ ! -x "$build/bench/pace" ] || [ "$here/pace.c" -nt "$build/bench/pace" ]; then
  cc -O2 -Wall -Wextra -Werror -o "$build/bench/pace" "$here/pace.c" || die "pace: compile failed"
fi

# The raw disk probe: appends SIZE bytes to a new file and fdatasyncs, for SECONDS; prints
# "count mean_us p50_us p99_us max_us" (the log's own pattern: write(2) at the end of an
# O_APPEND file, then fdatasync).
cat >"$build/bench/fsync_probe.c" <<'EOF'
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static int cmp(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}
int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: fsync_probe FILE SIZE SECONDS\n");
    return 2;
  }
  size_t size = strtoul(argv[2], NULL, 10);
  double secs = atof(argv[3]);
  int fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0640);
  char *buf = malloc(size);
  uint64_t *lat = malloc(sizeof *lat * 2000000);
  if (fd < 0 || buf == NULL || lat == NULL || fdatasync(fd) != 0)
    return 1;
  memset(buf, 'x', size);
  size_t n = 0;
  uint64_t t0 = now_ns(), end = t0 + (uint64_t)(secs * 1e9), sum = 0;
  while (n < 2000000) {
    uint64_t a = now_ns();
    if (a >= end)
      break;
    if (write(fd, buf, size) != (ssize_t)size || fdatasync(fd) != 0)
      return 1;
    lat[n] = now_ns() - a;
    sum += lat[n++];
  }
  close(fd);
  unlink(argv[1]);
  qsort(lat, n, sizeof *lat, cmp);
  printf("%zu %.1f %.1f %.1f %.1f\n", n, n ? (double)sum / (double)n / 1e3 : 0.0, n ? lat[n / 2] / 1e3 : 0.0,
         n ? lat[(size_t)(n * 0.99)] / 1e3 : 0.0, n ? lat[n - 1] / 1e3 : 0.0);
  return 0;
}
EOF
cc -O2 -Wall -Wextra -o "$build/bench/fsync_probe" "$build/bench/fsync_probe.c" || die "fsync_probe: compile failed"

# Data directories on the repository's disk: /tmp when it is the same device, else the build dir.
src_of() { findmnt -n -o SOURCE -T "$1" | head -n1; }
fstype_of() { findmnt -n -o FSTYPE -T "$1" | head -n1; }
if [ "$(src_of /tmp)" = "$(src_of "$root")" ] && [ "$(fstype_of /tmp)" != tmpfs ]; then
  tmp="$(mktemp -d /tmp/tollgate-purchase-bench.XXXXXX)"
else
  tmp="$(mktemp -d "$build/purchase-bench-tmp.XXXXXX")"
fi
[ "$(fstype_of "$tmp")" != tmpfs ] || die "$tmp is on tmpfs"
disk_note="$(findmnt -n -o SOURCE,FSTYPE,OPTIONS -T "$tmp" | head -n1) (repository: $(src_of "$root"))"
logs="$build/purchase-logs"
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do
    kill -TERM "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  rm -rf "$logs"
  mkdir -p "$logs"
  cp "$tmp"/*.txt "$tmp"/*.log "$tmp"/*.jsonl "$logs"/ 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

token="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
printf '%s\n' "$token" >"$tmp/admin.token"
head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$tmp/signer.key"
chmod 600 "$tmp/admin.token" "$tmp/signer.key"
cat >"$tmp/catalog.xml" <<'EOF'
<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl"><content url="/"><license><payment type="purchase"><amount currency="USD">0.000001</amount></payment></license></content></rsl>
EOF
uri="https://bench.example/articles/bench-1"
ai_system='ai_system {
  name: "Bench Purchasing Agent"
  user_agent: "BenchAgent/1.0"
  id: "sys-bench-01"
  usage_purposes: USAGE_PURPOSE_AI_INPUT
  user_type: USER_TYPE_COMMERCIAL
  country: "US"
  billing_reference: "acct-bench"
}'
# 24 bytes, overwritten per request (purchase.lua: prefix, thread, counter; pace: a counter).
placeholder="@@@@@@@@@@@@@@@@@@@@@@@@"
proto_args=(-I "$root/proto" "$root/proto/ramp/v1/exchange.proto")
printf '%s\nresources { uri: "%s" }\n' "$ai_system" "$uri" |
  protoc --encode=ramp.v1.DiscoverResourcesRequest "${proto_args[@]}" >"$tmp/discover.bin" ||
  die "protoc --encode failed (DiscoverResourcesRequest)"
dpath="/ramp.v1.ExchangeService/DiscoverResources"
xpath="/ramp.v1.ExchangeService/ExecuteTransaction"

post() { # post PATH BODY OUT: prints the status
  curl -sS -o "$3" -w '%{http_code}' --max-time 10 -H 'Host: bench.example' \
    -H 'Content-Type: application/proto' -H 'Connect-Protocol-Version: 1' \
    --data-binary @"$2" "http://127.0.0.1:$port$1" 2>/dev/null || true
}
metrics() { # metrics OUT
  curl -sS -o "$1" --max-time 10 -H "Authorization: Bearer $token" "http://127.0.0.1:$admin/metrics" ||
    die "GET /metrics failed"
}
# The figures of one /metrics text, as JSON: batches, records, flush seconds, approved.
metric_json() {
  python3 - "$1" <<'EOF'
import json, re, sys
v = {"batches": 0.0, "records": 0.0, "flush_s": 0.0, "flushes": 0.0, "approved": 0.0, "denied": 0.0}
for line in open(sys.argv[1]):
    if line.startswith("#"):
        continue
    m = re.match(r'^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)', line)
    if not m:
        continue
    name, labels, val = m.group(1), m.group(2) or "", float(m.group(3))
    if name == "txlog_fsync_batch_records_count": v["batches"] += val
    elif name == "txlog_fsync_batch_records_sum": v["records"] += val
    elif name == "txlog_flush_duration_seconds_sum": v["flush_s"] += val
    elif name == "txlog_flush_duration_seconds_count": v["flushes"] += val
    elif name == "exchange_transaction_total":
        if re.search(r'status="approved"', labels): v["approved"] += val
        elif re.search(r'status="denied"', labels): v["denied"] += val
print(json.dumps(v))
EOF
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
steal_total() { awk '/^cpu / { s = 0; for (i = 2; i <= NF; i++) s += $i; print $9, s }' /proc/stat; }

# start_gw WORKERS INTERVAL: sets pid, port, admin
start_gw() {
  port="$(free_port)"; admin="$(free_port)"
  local name="w$1-i$2"
  mkdir -p "$tmp/data-$name"
  cat >"$tmp/$name.lua" <<EOF
return {
  listen = { { host = "127.0.0.1", port = $port } },
  admin = { host = "127.0.0.1", port = $admin, token_file = "admin.token" },
  workers = $1,
  data_dir = "data-$name",
  log_level = "warn",
  limits = { max_connections = 20000 },
  exchange = { offer_ttl_s = 86400 },
  ledger = { wal = { batch_interval_us = $2, ${BENCH_WAL:-} }, ${BENCH_LEDGER:-}
             accounts = { { billing_reference = "acct-bench", amount = 9007199254740992 } } },
  tenants = {
    { name = "bench", hosts = { "bench.example" },
      catalog = { source = "catalog.xml", refresh_s = 86400 },
      signer = { type = "nginx_secure_link", key_file = "signer.key" },
      billing = { type = "builtin" } },
  },
}
EOF
  "$bin" run -c "$tmp/$name.lua" >"$tmp/tollgate-$name.log" 2>&1 &
  pid=$!
  pids+=("$pid")
  local i
  for i in $(seq 300); do
    kill -0 "$pid" 2>/dev/null || { tail -n 20 "$tmp/tollgate-$name.log" >&2; die "tollgate ($name) exited at start"; }
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/readyz")" = 200 ] && return 0
    sleep 0.1
  done
  tail -n 20 "$tmp/tollgate-$name.log" >&2
  die "tollgate ($name) not ready within 30 s"
}
stop_gw() {
  kill -TERM "$1" 2>/dev/null || true
  local rc=0
  wait "$1" 2>/dev/null || rc=$?
  [ "$rc" -eq 0 ] || say "purchase bench: WARNING: tollgate exited $rc on SIGTERM"
  local keep=() p
  for p in "${pids[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  pids=("${keep[@]}")
}

decode() { protoc --decode="ramp.v1.$1" "${proto_args[@]}" <"$2"; }

# wrk_run KIND TAG LABEL_EXTRA: one peak run, its BENCHJSON line (with metrics and CPU) appended
# to results.jsonl. KIND discover|execute; TAG a 2-byte key prefix unique in this instance.
wrk_run() {
  local kind="$1" tag="$2" out="$tmp/wrk-$cur-$1-$2.txt" secs="${4:-$duration}"
  local body path ph="" expect=""
  if [ "$kind" = execute ]; then body="$tmp/execute.bin"; path="$xpath"; ph="$placeholder"; expect=approved
  else body="$tmp/discover.bin"; path="$dpath"; fi
  rm -rf "$tmp/samples"; mkdir -p "$tmp/samples"
  metrics "$tmp/m0.prom"
  local c0 st0 c1 st1
  c0="$(cpu_ticks "$pid")"; st0="$(steal_total)"
  BENCH_BODY="$body" BENCH_PATH="$path" BENCH_PLACEHOLDER="$ph" BENCH_KEY_PREFIX="$tag" \
    BENCH_EXPECT="$expect" BENCH_SAMPLE_DIR="$tmp/samples" \
    BENCH_LABEL="\"set\":\"$cur\",\"kind\":\"$kind\",\"tag\":\"$tag\"$3" \
    wrk -t"$threads" -c"$conns" -d"${secs}s" -s "$here/purchase.lua" "http://127.0.0.1:$port" >"$out" 2>&1 ||
    { cat "$out" >&2; die "wrk failed"; }
  c1="$(cpu_ticks "$pid")"; st1="$(steal_total)"
  metrics "$tmp/m1.prom"
  local bad
  bad="$(ls "$tmp/samples"/bad-*.bin 2>/dev/null | head -n1 || true)"
  if [ -n "$bad" ]; then
    say "  sample refused answer (status $(cat "${bad%.bin}.txt")): $(decode ExecuteTransactionResponse "$bad" 2>/dev/null | tr -s ' \n' ' ' | head -c 400 || head -c 300 "$bad")"
  fi
  python3 - "$out" "$(metric_json "$tmp/m0.prom")" "$(metric_json "$tmp/m1.prom")" "$c0" "$c1" "$st0" "$st1" \
    "$(getconf CLK_TCK)" "$tmp/results.jsonl" <<'EOF'
import json, sys
out, m0, m1, c0, c1, st0, st1, hz, res = sys.argv[1:]
line = [l for l in open(out) if l.startswith("BENCHJSON ")]
if not line:
    sys.stderr.write(open(out).read()); sys.exit(1)
r = json.loads(line[-1][len("BENCHJSON "):])
m0, m1 = json.loads(m0), json.loads(m1)
d = {k: m1[k] - m0[k] for k in m0}
secs = r["duration_s"]
r["fsyncs"] = int(d["batches"]); r["records"] = int(d["records"])
r["fsyncs_per_s"] = round(d["batches"] / secs, 1)
r["records_per_s"] = round(d["records"] / secs, 1)
r["mean_batch"] = round(d["records"] / d["batches"], 2) if d["batches"] else None
r["mean_flush_us"] = round(d["flush_s"] / d["flushes"] * 1e6, 1) if d["flushes"] else None
r["server_approved"] = int(d["approved"]); r["server_denied"] = int(d["denied"])
r["cpu_us_per_req"] = round((int(c1) - int(c0)) / int(hz) * 1e6 / max(r["requests"], 1), 1)
s0, t0 = map(int, st0.split()); s1, t1 = map(int, st1.split())
r["steal_pct"] = round((s1 - s0) / max(t1 - t0, 1) * 100, 1)
r["load1"] = float(open("/proc/loadavg").read().split()[0])
open(res, "a").write(json.dumps(r) + "\n")
e = sum(r["errors"].values())
msg = "  %-8s %-7s %9.0f req/s  p50 %6d us  p99 %7d us  non-200 %d  errors %d  cpu %.1f us/req  steal %.1f%%  load %.1f" % (
    r["kind"], r["tag"], r["rps"], r["p50_us"], r["p99_us"], r["status_other"], e, r["cpu_us_per_req"], r["steal_pct"], r["load1"])
if r["kind"] == "execute" or r.get("pace"):
    msg += "\n           approved %s (server %d), not approved %s; %d fsyncs/s, %d records/s, mean batch %s, mean flush %s us" % (
        r.get("approved", "-"), r["server_approved"], r.get("not_approved", "-"), r["fsyncs_per_s"], r["records_per_s"],
        r["mean_batch"], r["mean_flush_us"])
sys.stderr.write(msg + "\n")
EOF
}

# pace_run RUN RATE: Execute paced at RATE req/s, open loop; its line appended to results.jsonl.
pace_run() {
  local out="$tmp/pace-$cur-$1.txt"
  metrics "$tmp/m0.prom"
  local c0 st0 c1 st1
  c0="$(cpu_ticks "$pid")"; st0="$(steal_total)"
  BENCH_LABEL="\"set\":\"$cur\",\"kind\":\"half\",\"tag\":\"p$1\",\"pace\":true" \
    "$build/bench/pace" 127.0.0.1 "$port" "$2" "$half_secs" "$conns" "$tmp/execute.http" "$placeholder" \
    "$(($1 * 1000000000))" >"$out" 2>&1 || { cat "$out" >&2; die "pace failed"; }
  c1="$(cpu_ticks "$pid")"; st1="$(steal_total)"
  metrics "$tmp/m1.prom"
  python3 - "$out" "$(metric_json "$tmp/m0.prom")" "$(metric_json "$tmp/m1.prom")" "$c0" "$c1" "$st0" "$st1" \
    "$(getconf CLK_TCK)" "$tmp/results.jsonl" <<'EOF'
import json, sys
out, m0, m1, c0, c1, st0, st1, hz, res = sys.argv[1:]
line = [l for l in open(out) if l.startswith("BENCHJSON ")]
if not line:
    sys.stderr.write(open(out).read()); sys.exit(1)
r = json.loads(line[-1][len("BENCHJSON "):])
m0, m1 = json.loads(m0), json.loads(m1)
d = {k: m1[k] - m0[k] for k in m0}
secs = r["duration_s"] or 1
r["fsyncs"] = int(d["batches"]); r["records"] = int(d["records"])
r["fsyncs_per_s"] = round(d["batches"] / secs, 1)
r["records_per_s"] = round(d["records"] / secs, 1)
r["mean_batch"] = round(d["records"] / d["batches"], 2) if d["batches"] else None
r["mean_flush_us"] = round(d["flush_s"] / d["flushes"] * 1e6, 1) if d["flushes"] else None
r["server_approved"] = int(d["approved"]); r["server_denied"] = int(d["denied"])
r["cpu_us_per_req"] = round((int(c1) - int(c0)) / int(hz) * 1e6 / max(r["requests"], 1), 1)
s0, t0 = map(int, st0.split()); s1, t1 = map(int, st1.split())
r["steal_pct"] = round((s1 - s0) / max(t1 - t0, 1) * 100, 1)
r["load1"] = float(open("/proc/loadavg").read().split()[0])
open(res, "a").write(json.dumps(r) + "\n")
sys.stderr.write("  half     p%s  %7.0f of %.0f req/s  p50 %5d us  p99 %6d us  max %7d us  (sent p99 %d us)  errors %d  approved (server) %d  mean batch %s  steal %.1f%%  load %.1f\n" % (
    r["tag"][1:], r["rps"], r["target_rps"], r["p50_us"], r["p99_us"], r["max_us"], r["sent_p99_us"],
    sum(r["errors"].values()), r["server_approved"], r["mean_batch"], r["steal_pct"], r["load1"]))
EOF
}

median_of() { # median_of SET KIND FIELD
  python3 - "$tmp/results.jsonl" "$1" "$2" "$3" <<'EOF'
import json, statistics, sys
f, s, k, field = sys.argv[1:]
v = [json.loads(l) for l in open(f)]
v = [r[field] for r in v if r["set"] == s and r["kind"] == k and r["tag"].startswith(("r", "p"))]
print(statistics.median(v) if v else 0)
EOF
}

: >"$tmp/results.jsonl"
: >"$tmp/instances.jsonl"
perf_note=""
say "purchase bench: data_dir on $disk_note"
say "purchase bench: wrk -t$threads -c$conns, $runs run(s) of ${duration}s per call; workers: $workers_list; batch_interval_us: $intervals"
for workers in $workers_list; do
  for interval in $intervals; do
    cur="w$workers-i$interval"
    say ""
    say "purchase bench: workers $workers, ledger.wal.batch_interval_us $interval"
    start_gw "$workers" "$interval"
    # One offer of the URI.
    code="$(post "$dpath" "$tmp/discover.bin" "$tmp/discover-resp.bin")"
    [ "$code" = 200 ] || die "DiscoverResources answered $code"
    decode DiscoverResourcesResponse "$tmp/discover-resp.bin" >"$tmp/discover-$cur.txt" || die "cannot decode the Discover answer"
    offer="$(sed -n 's/^ *id: "\(.*\)"$/\1/p' "$tmp/discover-$cur.txt" | head -n1)"
    [ -n "$offer" ] || { cat "$tmp/discover-$cur.txt" >&2; die "no offer for $uri"; }
    printf '%s\nidempotency_key: "%s"\nitems { offer_id: "%s" }\n' "$ai_system" "$placeholder" "$offer" |
      protoc --encode=ramp.v1.ExecuteTransactionRequest "${proto_args[@]}" >"$tmp/execute.bin" ||
      die "protoc --encode failed (ExecuteTransactionRequest)"
    {
      printf 'POST %s HTTP/1.1\r\nHost: bench.example\r\nContent-Type: application/proto\r\n' "$xpath"
      printf 'Connect-Protocol-Version: 1\r\nContent-Length: %d\r\n\r\n' "$(wc -c <"$tmp/execute.bin")"
      cat "$tmp/execute.bin"
    } >"$tmp/execute.http"
    # One checked purchase (its own key), decoded.
    sed "s/$placeholder/check-000000000000000000/" "$tmp/execute.bin" >"$tmp/execute-check.bin"
    code="$(post "$xpath" "$tmp/execute-check.bin" "$tmp/execute-resp.bin")"
    decode ExecuteTransactionResponse "$tmp/execute-resp.bin" >"$tmp/execute-$cur.txt" 2>/dev/null || true
    [ "$code" = 200 ] && grep -q 'TRANSACTION_STATUS_APPROVED' "$tmp/execute-$cur.txt" ||
      { cat "$tmp/execute-$cur.txt" "$tmp/execute-resp.bin" >&2; die "ExecuteTransaction answered $code, not APPROVED"; }
    dlen="$(wc -c <"$tmp/discover-resp.bin")"; xlen="$(wc -c <"$tmp/execute-resp.bin")"
    say "  offer $offer"
    say "  Discover answer $dlen bytes; Execute answer $xlen bytes: $(grep -E 'status|amount' "$tmp/execute-$cur.txt" | tr -s ' \n' ' ')"
    # The same offer bought twice with the same key must replay (sanity check of the key's role).
    post "$xpath" "$tmp/execute-check.bin" "$tmp/execute-replay.bin" >/dev/null
    cmp -s "$tmp/execute-resp.bin" "$tmp/execute-replay.bin" && replay=same || replay=different
    say "  same key again: $replay answer (a replay); the runs use a unique key per request"

    wrk_run discover wu "" "$warmup" >/dev/null 2>&1 || true
    wrk_run execute wu "" "$warmup" >/dev/null 2>&1 || true
    for r in $(seq "$runs"); do
      wrk_run discover "r$r" ""
      wrk_run execute "r$r" ""
    done
    ex_rps="$(median_of "$cur" execute rps)"
    half="$(python3 -c "print(round($ex_rps / 2))")"
    for r in $(seq "$runs"); do
      pace_run "$r" "$half"
    done
    if [ "$want_perf" -eq 1 ] && [ "$workers" = "$(echo "$workers_list" | awk '{ print $1 }')" ] &&
      [ "$interval" = "$(echo "$intervals" | awk '{ print $1 }')" ]; then
      perf record -q -F 1999 -g -p "$pid" -o "$tmp/perf.data" -- sleep "$duration" >/dev/null 2>&1 &
      perf_pid=$!
      wrk_run execute zf "" >/dev/null 2>&1
      wait "$perf_pid" || true
      perf report -i "$tmp/perf.data" --stdio --no-children -g none --sort symbol 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -60 >"$build/purchase-perf.txt" || true
      {
        echo "--- by thread (pid: thread id and name) ---"
        perf report -i "$tmp/perf.data" --stdio --no-children -g none --sort pid 2>/dev/null | grep -E '^ +[0-9.]+%' | head -20
        echo "--- by DSO ---"
        perf report -i "$tmp/perf.data" --stdio --no-children -g none --sort dso 2>/dev/null | grep -E '^ +[0-9.]+%' | head -20
      } >>"$build/purchase-perf.txt" || true
      perf_note="$build/purchase-perf.txt"
      say "  profile of one Execute run (top symbols; $build/purchase-perf.txt):"
      head -25 "$build/purchase-perf.txt" >&2
    fi
    kill -0 "$pid" 2>/dev/null || die "tollgate died during the runs"
    wal_bytes="$(du -sb "$tmp/data-$cur/wal" 2>/dev/null | cut -f1 || echo 0)"
    metrics "$tmp/final-$cur.prom"
    printf '{"set":"%s","workers":%s,"interval_us":%s,"offer_id":"%s","discover_bytes":%s,"execute_bytes":%s,"wal_bytes":%s,"final":%s}\n' \
      "$cur" "$workers" "$interval" "$offer" "$dlen" "$xlen" "${wal_bytes:-0}" "$(metric_json "$tmp/final-$cur.prom")" >>"$tmp/instances.jsonl"
    cp "$tmp/final-$cur.prom" "$tmp/metrics-$cur.txt"
    stop_gw "$pid"
    rm -rf "$tmp/data-$cur"
  done
done

# Raw disk: one fdatasync after a small append, at the log's record size and at the mean
# batch's bytes (workers 1, default interval), 2 s each (1 s with --quick).
probe_secs=2; [ "$quick" -eq 1 ] && probe_secs=1
sizes="$(python3 - "$tmp/results.jsonl" "$tmp/instances.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
inst = [json.loads(l) for l in open(sys.argv[2])]
i0 = inst[0]
rec = max(64, round(i0["wal_bytes"] / max(i0["final"]["records"], 1)))
b = [r["mean_batch"] for r in runs if r["set"] == i0["set"] and r["kind"] == "execute" and r["tag"].startswith("r") and r["mean_batch"]]
mb = statistics.median(b) if b else 1
print(rec, max(rec, round(rec * mb)), mb)
EOF
)"
read -r rec_bytes batch_bytes probe_batch <<<"$sizes"
: >"$tmp/probe.txt"
for sz in "$rec_bytes" "$batch_bytes" 4096 65536; do
  line="$("$build/bench/fsync_probe" "$tmp/probe.dat" "$sz" "$probe_secs")" || die "fsync_probe failed"
  echo "$sz $probe_secs $line" >>"$tmp/probe.txt"
done

python3 - "$tmp/results.jsonl" "$tmp/instances.jsonl" "$tmp/probe.txt" "$build/purchase-bench.json" "$probe_batch" <<EOF
import json, statistics, sys
res, inst, probe, out, probe_batch = sys.argv[1:]
runs = [json.loads(l) for l in open(res)]
inst = [json.loads(l) for l in open(inst)]
med = lambda v: statistics.median(v) if v else None
def sel(s, k):
    return [r for r in runs if r["set"] == s and r["kind"] == k and r["tag"][0] in "rp"]
rows = []
print()
print("ExecuteTransaction (1 item, durable) against DiscoverResources of the same offer; medians of $runs run(s), wrk -t$threads -c$conns -d${duration}s")
hdr = "%-16s %10s %10s %7s %8s %8s %9s %9s %7s %9s %8s %9s %9s %9s" % (
    "workers/interval", "disc req/s", "exec req/s", "ratio", "exec p50", "exec p99", "fsyncs/s", "records/s",
    "batch", "flush us", "half r/s", "half p50", "half p99", "half max")
print(hdr)
for i in inst:
    s = i["set"]
    d, x, h = sel(s, "discover"), sel(s, "execute"), sel(s, "half")
    g = lambda rs, f: med([r[f] for r in rs if r.get(f) is not None])
    row = {
        "workers": i["workers"], "batch_interval_us": i["interval_us"], "runs": len(x),
        "discover": {"rps": g(d, "rps"), "p50_us": g(d, "p50_us"), "p99_us": g(d, "p99_us"), "cpu_us_per_req": g(d, "cpu_us_per_req")},
        "execute": {"rps": g(x, "rps"), "p50_us": g(x, "p50_us"), "p99_us": g(x, "p99_us"), "max_us": g(x, "max_us"),
                    "cpu_us_per_req": g(x, "cpu_us_per_req"), "fsyncs_per_s": g(x, "fsyncs_per_s"),
                    "records_per_s": g(x, "records_per_s"), "mean_batch": g(x, "mean_batch"), "mean_flush_us": g(x, "mean_flush_us"),
                    "requests": sum(r["requests"] for r in x), "approved": sum(r.get("approved", 0) for r in x),
                    "not_approved": sum(r.get("not_approved", 0) for r in x), "non_200": sum(r["status_other"] for r in x),
                    "server_approved": sum(r["server_approved"] for r in x),
                    "wrk_errors": sum(sum(r["errors"].values()) for r in x)},
        "half": {"target_rps": g(h, "target_rps"), "rps": g(h, "rps"), "p50_us": g(h, "p50_us"), "p99_us": g(h, "p99_us"),
                 "max_us": g(h, "max_us"), "best_p99_us": min([r["p99_us"] for r in h], default=None),
                 "sent_p99_us": g(h, "sent_p99_us"), "mean_batch": g(h, "mean_batch"), "fsyncs_per_s": g(h, "fsyncs_per_s"),
                 "errors": sum(sum(r["errors"].values()) for r in h), "server_approved": sum(r["server_approved"] for r in h),
                 "requests": sum(r["requests"] for r in h)},
        "offer_id": i["offer_id"], "discover_answer_bytes": i["discover_bytes"], "execute_answer_bytes": i["execute_bytes"],
        "wal_bytes_per_record": round(i["wal_bytes"] / max(i["final"]["records"], 1), 1),
        "steal_pct_max": max([r["steal_pct"] for r in d + x + h], default=None),
        "load1_median": med([r["load1"] for r in d + x + h]),
    }
    dr, xr = row["discover"]["rps"], row["execute"]["rps"]
    row["ratio"] = round(xr / dr, 3) if dr else None
    rows.append(row)
    f = lambda v, fmt="%.0f": (fmt % v) if v is not None else "-"
    print("%-16s %10s %10s %7s %8s %8s %9s %9s %7s %9s %8s %9s %9s %9s" % (
        "%s / %d us" % ("1" if i["workers"] == 1 else ("all" if i["workers"] == 0 else str(i["workers"])), i["interval_us"]),
        f(dr), f(xr), f(row["ratio"], "%.3fx"), f(row["execute"]["p50_us"]), f(row["execute"]["p99_us"]),
        f(row["execute"]["fsyncs_per_s"]), f(row["execute"]["records_per_s"]), f(row["execute"]["mean_batch"], "%.2f"),
        f(row["execute"]["mean_flush_us"]), f(row["half"]["rps"]), f(row["half"]["p50_us"]), f(row["half"]["p99_us"]),
        f(row["half"]["max_us"])))
print()
print("Checks: every Execute answer of the runs read APPROVED by the client, and the server's exchange_transaction_total{status=approved} delta:")
for row in rows:
    x = row["execute"]
    print("  workers %s interval %d us: %d requests, %d approved, %d not approved, %d non-200, %d wrk errors; server approved %d (+%d paced, %d pace errors); load1 median %s, steal max %s%%" % (
        row["workers"], row["batch_interval_us"], x["requests"], x["approved"], x["not_approved"], x["non_200"], x["wrk_errors"],
        x["server_approved"], row["half"]["server_approved"], row["half"]["errors"], row["load1_median"], row["steal_pct_max"]))
probes = []
for l in open(probe):
    sz, secs, n, mean, p50, p99, mx = l.split()
    probes.append({"bytes": int(sz), "seconds": float(secs), "fdatasyncs": int(n), "per_s": round(int(n) / float(secs)),
                   "mean_us": float(mean), "p50_us": float(p50), "p99_us": float(p99), "max_us": float(mx)})
print()
print("Raw disk (fsync_probe: write(2) of N bytes at the end of an O_APPEND file, then fdatasync, back to back):")
for p in probes:
    print("  %6d B: %6d fdatasync/s  mean %6.0f us  p50 %6.0f us  p99 %6.0f us  max %7.0f us" % (
        p["bytes"], p["per_s"], p["mean_us"], p["p50_us"], p["p99_us"], p["max_us"]))
pb = float(probe_batch)
if len(probes) >= 2:
    print("  at the measured mean batch (%.2f records, %d B): %.0f records/s sustained by this disk (%.2f x %d fdatasync/s)" % (
        pb, probes[1]["bytes"], pb * probes[1]["per_s"], pb, probes[1]["per_s"]))
print()
g = rows[0] if rows else None
if g:
    ok_ratio = g["ratio"] is not None and g["ratio"] >= 0.5
    ok_p99 = g["half"]["p99_us"] is not None and g["half"]["p99_us"] < 5000
    print("Goal (workers %s, interval %d us): ratio %sx (goal >= 0.5x: %s); half-load p99 %s us (goal < 5000: %s); mean batch %s at peak (needs >= 5)" % (
        g["workers"], g["batch_interval_us"], g["ratio"], "met" if ok_ratio else "NOT met", g["half"]["p99_us"],
        "met" if ok_p99 else "NOT met", g["execute"]["mean_batch"]))
meta = {"mode": "quick" if "$quick" == "1" else "full", "runs": $runs, "duration_s": $duration, "half_seconds": $half_secs,
        "wrk_threads": $threads, "wrk_connections": $conns, "data_dir_disk": """$disk_note""",
        "request": {"uri": "$uri", "encoding": "application/proto", "items": 1, "price": "1 micro-USD",
                    "unique_idempotency_key_per_request": True},
        "rows": rows, "raw_disk": {"tool": "fsync_probe (spec/bench/purchase.sh): write + fdatasync on an O_APPEND file",
                                   "probes": probes, "measured_mean_batch": pb},
        "profile": """$perf_note""" or None}
json.dump(meta, open(out, "w"), indent=1)
EOF
say ""
say "JSON result: $build/purchase-bench.json   (raw output: $logs/)"
