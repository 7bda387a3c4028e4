#!/usr/bin/env bash
# Benchmark: log shipping throughput to a local Redis, in records per second.
# A separate command, not a test suite: it prints figures, it passes nothing.
#
# Usage: spec/bench/ship.sh [--quick]
#   --quick  20,000 records, one run per setting (default: 200,000 records, three runs, median)
# Environment: BENCH_RECORDS, BENCH_RUNS, BENCH_BATCH (ledger.ship.batch, 512),
#   BENCH_RECORD_BYTES (payload of each record, 600: about a purchase's record),
#   BENCH_FSYNC ("everysec always": Redis appendfsync settings, one fresh redis-server each),
#   BENCH_BUILD_DIR (build-bench).
#
# ship_bench.c (built here against the Release build's ledger, config and base libraries)
# writes a log of N records through the write-ahead log's own append path, then, per run,
# deletes the stream and the checkpoint and times a shipper (core/ledger/ship.h) from its
# start until the stream tg:txlog:bench holds the last record (XLEN checked). The log is
# written once and reused: the runs measure reading segments, the Lua script's XADDs and
# Redis's append-only file, not the disk writes of the log.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
build="${BENCH_BUILD_DIR:-$root/build-bench}"

usage() { sed -n '5,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
quick=0
for a in "$@"; do
  case "$a" in
    --quick) quick=1 ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
if [ "$quick" -eq 1 ]; then
  records="${BENCH_RECORDS:-20000}"; runs="${BENCH_RUNS:-1}"
else
  records="${BENCH_RECORDS:-200000}"; runs="${BENCH_RUNS:-3}"
fi
batch="${BENCH_BATCH:-512}"
rbytes="${BENCH_RECORD_BYTES:-600}"
fsyncs="${BENCH_FSYNC:-everysec always}"

say() { printf '%s\n' "$*" >&2; }
die() { say "ship bench: $*"; exit 1; }
for tool in cmake cc pkg-config redis-server redis-cli python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed"
done

if ! grep -qs '^CMAKE_BUILD_TYPE:STRING=Release$' "$build/CMakeCache.txt"; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
fi
cmake --build "$build" -j2 --target tg_ledger tg_config tg_base tgproto >/dev/null \
  || die "build failed: cmake --build $build --target tg_ledger"
mkdir -p "$build/bench"
cc -O2 -Wall -Wextra -Werror -I"$root/core" $(pkg-config --cflags libuv hiredis) \
  -o "$build/bench/ship_bench" "$here/ship_bench.c" \
  "$build/libtg_ledger.a" "$build/libtg_config.a" "$build/libtg_base.a" "$build/libtgproto.a" \
  $(pkg-config --libs libuv hiredis jansson libprotobuf-c luajit) -lmbedcrypto -lm -lpthread \
  || die "ship_bench: compile failed"

tmp="$(mktemp -d "$build/ship-bench-XXXXXX")"
redis_pid=""
cleanup() {
  [ -z "$redis_pid" ] || kill "$redis_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

declare -A median
for fs in $fsyncs; do
  port="$(free_port)"
  mkdir -p "$tmp/redis-$fs"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly yes --appendfsync "$fs" \
    --dir "$tmp/redis-$fs" --daemonize no >"$tmp/redis-$fs.log" 2>&1 &
  redis_pid=$!
  for _ in $(seq 100); do
    redis-cli -p "$port" ping >/dev/null 2>&1 && break
    sleep 0.05
  done
  redis-cli -p "$port" ping >/dev/null 2>&1 || die "redis-server did not start (see $tmp/redis-$fs.log)"
  say "== appendfsync $fs: $records records of $rbytes bytes, batch $batch, $runs run(s)"
  out="$("$build/bench/ship_bench" "$port" "$tmp/data" "$records" "$runs" "$batch" "$rbytes")" \
    || die "ship_bench failed: $out"
  printf '%s\n' "$out" >&2
  median[$fs]="$(printf '%s\n' "$out" | sed -n 's/^median: \([0-9]*\) records\/s$/\1/p')"
  kill "$redis_pid"
  wait "$redis_pid" 2>/dev/null || true
  redis_pid=""
done

printf '\n| redis appendfsync | records | batch | record bytes | ship records/s (median of %s) |\n|---|---|---|---|---|\n' "$runs"
for fs in $fsyncs; do
  printf '| %s | %s | %s | %s | %s |\n' "$fs" "$records" "$batch" "$rbytes" "${median[$fs]}"
done
