/* Log shipping throughput (spec/bench/ship.sh builds and runs it):
 *
 *   ship_bench REDIS_PORT DIR RECORDS RUNS BATCH RECORD_BYTES
 *
 * Writes a log of RECORDS records of RECORD_BYTES each into DIR/wal (the
 * write-ahead log's own append path, group commit), then RUNS times: deletes
 * the stream and DIR/ship.ckpt, starts a shipper (ledger/ship.h, durable_seq
 * UINT64_MAX: a log no process writes) and times it from tg_ship_new until
 * the stream holds the last record. Prints one line per run, then
 * "median: N records/s". A figure, never a pass or fail. */
#include <errno.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "base/log.h"
#include "ledger/ship.h"
#include "ledger/wal.h"

#define INSTANCE "bench"

typedef struct appender {
  uint64_t done, failed;
} appender_t;

static void on_appended(void *arg, int status, uint64_t seq) {
  appender_t *a = arg;
  (void)seq;
  a->done++;
  if (status != 0)
    a->failed++;
}

static int write_log(const char *waldir, uint64_t n, size_t bytes) {
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = waldir;
  o.capacity_bytes = 1ULL << 40;
  tg_wal_t *w;
  tg_wal_recovery_t rec;
  char err[256];
  if (tg_wal_open(&o, &w, &rec, err, sizeof err) != 0) {
    fprintf(stderr, "ship_bench: %s\n", err);
    return -1;
  }
  if (rec.records >= n) { /* written by an earlier run */
    tg_wal_close(w);
    return 0;
  }
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  if (tg_wal_client_new(w, &loop, &c) != 0)
    return -1;
  char *payload = malloc(bytes);
  for (size_t i = 0; i < bytes; i++)
    payload[i] = (char)('a' + i % 26);
  appender_t a = {0};
  uint64_t sent = 0, want = n - rec.records;
  while (a.done < want) {
    while (sent < want) {
      snprintf(payload, bytes, "record-%012llu", (unsigned long long)sent);
      int r = tg_wal_append(c, payload, bytes, on_appended, &a, NULL);
      if (r == -EAGAIN)
        break;
      if (r != 0) {
        fprintf(stderr, "ship_bench: append: %s\n", strerror(-r));
        return -1;
      }
      sent++;
    }
    uv_run(&loop, UV_RUN_ONCE);
  }
  free(payload);
  tg_wal_client_free(c);
  uv_run(&loop, UV_RUN_DEFAULT);
  tg_wal_close(w);
  uv_loop_close(&loop);
  return a.failed ? -1 : 0;
}

typedef struct run {
  tg_ship_t *ship;
  uint64_t target;
  uint64_t t0, t1;
  uv_timer_t poll;
} run_t;

static void on_poll(uv_timer_t *t) {
  run_t *r = t->data;
  if (tg_ship_shipped_seq(r->ship) < r->target)
    return;
  r->t1 = uv_hrtime();
  tg_ship_free(r->ship);
  uv_close((uv_handle_t *)t, NULL);
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: ship_bench REDIS_PORT DIR RECORDS RUNS BATCH RECORD_BYTES\n");
    return 2;
  }
  int port = atoi(argv[1]);
  const char *dir = argv[2];
  uint64_t n = strtoull(argv[3], NULL, 10);
  int runs = atoi(argv[4]);
  uint32_t batch = (uint32_t)atoi(argv[5]);
  size_t bytes = (size_t)atoi(argv[6]);
  tg_log_set_level(TG_LOG_WARN);
  char waldir[4096], ckpt[4200];
  snprintf(waldir, sizeof waldir, "%s/wal", dir);
  snprintf(ckpt, sizeof ckpt, "%s/ship.ckpt", dir);
  mkdir(dir, 0700);
  if (tg_ship_metrics_init() != 0 || tg_wal_metrics_init() != 0)
    return 1;
  uint64_t t = uv_hrtime();
  if (write_log(waldir, n, bytes) != 0)
    return 1;
  printf("log: %llu records of %zu bytes written in %.1f s\n", (unsigned long long)n, bytes,
         (double)(uv_hrtime() - t) / 1e9);
  redisContext *rc = redisConnect("127.0.0.1", port);
  if (rc == NULL || rc->err) {
    fprintf(stderr, "ship_bench: redis: %s\n", rc ? rc->errstr : "out of memory");
    return 1;
  }
  double *rate = calloc((size_t)runs, sizeof *rate);
  for (int i = 0; i < runs; i++) {
    freeReplyObject(redisCommand(rc, "DEL tg:txlog:" INSTANCE));
    unlink(ckpt);
    uv_loop_t loop;
    uv_loop_init(&loop);
    run_t r = {.target = n};
    tg_ship_opts_t o = {.wal_dir = waldir,
                        .data_dir = dir,
                        .instance = INSTANCE,
                        .host = "127.0.0.1",
                        .port = port,
                        .batch = batch,
                        .timeout_ms = 5000,
                        .durable_seq = UINT64_MAX};
    char err[256];
    r.t0 = uv_hrtime();
    if (tg_ship_new(&loop, &o, &r.ship, err, sizeof err) != 0) {
      fprintf(stderr, "ship_bench: %s\n", err);
      return 1;
    }
    uv_timer_init(&loop, &r.poll);
    r.poll.data = &r;
    uv_timer_start(&r.poll, on_poll, 1, 1);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    redisReply *len = redisCommand(rc, "XLEN tg:txlog:" INSTANCE);
    long long xlen = len && len->type == REDIS_REPLY_INTEGER ? len->integer : -1;
    freeReplyObject(len);
    double s = (double)(r.t1 - r.t0) / 1e9;
    rate[i] = (double)n / s;
    printf("run %d: %llu records in %.2f s: %.0f records/s (XLEN %lld)\n", i + 1, (unsigned long long)n, s,
           rate[i], xlen);
    if (xlen != (long long)n) {
      fprintf(stderr, "ship_bench: the stream holds %lld entries, not %llu\n", xlen, (unsigned long long)n);
      return 1;
    }
  }
  qsort(rate, (size_t)runs, sizeof *rate, cmp);
  printf("median: %.0f records/s\n", rate[runs / 2]);
  free(rate);
  redisFree(rc);
  return 0;
}
