#include <errno.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "base/buf.h"
#include "base/file.h"
#include "base/metrics.h"
#include "ledger/ship.h"
#include "ledger/wal.h"
#include "redis_fixture.h"
#include "test.h"
#include "tmpfiles.h"

/* tmpfiles.h helpers this file has no use for. */
__attribute__((unused)) static void unused_helpers(void) {
  (void)now_s;
  (void)tmp_write;
}

__attribute__((constructor)) static void need_redis_server(void) {
  redis_require_server("ship_test");
  quiet_logs();
}

/* Record i's payload: 1..300 bytes, zeros among them, its index up front. */
static size_t payload_of(uint8_t *out, uint64_t i) {
  size_t len = 8 + (size_t)(i * 37 % 293);
  for (size_t j = 0; j < len; j++)
    out[j] = (uint8_t)(i * 7 + j);
  memcpy(out, &i, 8);
  return len;
}

/* A log on loop with small segments, so readers cross several. */
typedef struct {
  tg_wal_t *w;
  tg_wal_client_t *c;
  int done, errors;
  uint64_t next; /* index of the next record appended */
} log_t;

static int log_open(log_t *l, uv_loop_t *loop, const char *dir) {
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = dir;
  o.segment_bytes = 8192;
  o.batch_interval_us = 0;
  char err[256];
  tg_wal_recovery_t rec;
  memset(l, 0, sizeof *l);
  int r = tg_wal_open(&o, &l->w, &rec, err, sizeof err);
  if (r != 0)
    return r;
  l->next = rec.next_seq;
  return tg_wal_client_new(l->w, loop, &l->c);
}

static void appended(void *arg, int status, uint64_t seq) {
  log_t *l = arg;
  (void)seq;
  l->done++;
  l->errors += status != 0;
}

static bool appends_done(void *arg) {
  log_t *l = arg;
  return l->done == 0;
}

typedef struct {
  log_t *l;
  int want;
} want_t;

static bool all_appended(void *arg) {
  want_t *w = arg;
  return w->l->done >= w->want;
}

/* Appends n records and waits until they are durable; 0 or -1. */
static int log_append(log_t *l, uv_loop_t *loop, int n) {
  (void)appends_done;
  uint8_t buf[512];
  l->done = 0;
  for (int i = 0; i < n; i++) {
    size_t len = payload_of(buf, l->next);
    uint64_t seq;
    if (tg_wal_append(l->c, buf, len, appended, l, &seq) != 0 || seq != l->next)
      return -1;
    l->next++;
  }
  want_t w = {l, n};
  return redis_run_until(loop, all_appended, &w, 10000) && l->errors == 0 ? 0 : -1;
}

static void log_close(log_t *l) {
  tg_wal_client_release(l->c);
  tg_wal_close(l->w);
}

typedef struct {
  tg_ship_t *s;
  uint64_t want;
} until_t;

static bool shipped_to(void *arg) {
  until_t *u = arg;
  return tg_ship_shipped_seq(u->s) >= u->want;
}

static bool wait_shipped(uv_loop_t *loop, tg_ship_t *s, uint64_t want, int ms) {
  until_t u = {s, want};
  return redis_run_until(loop, shipped_to, &u, ms);
}

static void run_for(uv_loop_t *loop, int ms) {
  uint64_t end = uv_hrtime() + (uint64_t)ms * 1000000;
  while (uv_hrtime() < end)
    uv_run(loop, UV_RUN_ONCE);
}

static void opts_for(tg_ship_opts_t *o, const char *wal, const char *data, const redis_server_t *srv) {
  memset(o, 0, sizeof *o);
  o->wal_dir = wal;
  o->data_dir = data;
  o->instance = "gw-1";
  o->host = "127.0.0.1";
  o->port = srv->port;
  o->timeout_ms = 500;
  o->batch = 100;
}

static long long xlen(const redis_server_t *srv) {
  redisContext *c = redis_direct(srv);
  if (c == NULL)
    return -1;
  redisReply *r = redisCommand(c, "XLEN tg:txlog:gw-1");
  long long n = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return n;
}

/* The stream holds exactly the records 1..n, as entries "<i>-1" with rec = payload, in order. */
static bool stream_is(const redis_server_t *srv, uint64_t n) {
  redisContext *c = redis_direct(srv);
  if (c == NULL)
    return false;
  redisReply *r = redisCommand(c, "XRANGE tg:txlog:gw-1 - +");
  bool ok = r && r->type == REDIS_REPLY_ARRAY && r->elements == n;
  uint8_t want[512];
  for (size_t i = 0; ok && i < n; i++) {
    redisReply *e = r->element[i];
    char id[32];
    snprintf(id, sizeof id, "%zu-1", i + 1);
    size_t len = payload_of(want, i + 1);
    ok = e->type == REDIS_REPLY_ARRAY && e->elements == 2 && strcmp(e->element[0]->str, id) == 0 &&
         e->element[1]->elements == 2 && strcmp(e->element[1]->element[0]->str, "rec") == 0 &&
         e->element[1]->element[1]->len == len && memcmp(e->element[1]->element[1]->str, want, len) == 0;
    if (!ok)
      fprintf(stderr, "  entry %zu differs (id %s)\n", i, e->type == REDIS_REPLY_ARRAY ? e->element[0]->str : "?");
  }
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return ok;
}

/* The value of an unlabelled sample (or the first sample of a family with labels); -1 when absent. */
static double metric(const char *name) {
  tg_buf_t b = {0};
  double v = -1;
  if (tg_metrics_render(&b) == 0) {
    tg_buf_append(&b, "", 1);
    const char *p = b.data;
    size_t n = strlen(name);
    while ((p = strstr(p, name)) != NULL) {
      if ((p == b.data || p[-1] == '\n') && (p[n] == ' ' || p[n] == '{')) {
        const char *sp = strchr(p, ' ');
        v = sp ? strtod(sp + 1, NULL) : -1;
        break;
      }
      p += n;
    }
  }
  tg_buf_free(&b);
  return v;
}

static char *read_ckpt(const char *data_dir) {
  static char out[64];
  char path[1100];
  snprintf(path, sizeof path, "%s/ship.ckpt", data_dir);
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return NULL;
  size_t n = fread(out, 1, sizeof out - 1, f);
  out[n] = '\0';
  fclose(f);
  return out;
}

TEST(ships_every_record_once_and_resumes) {
  CHECK_INT(tg_ship_metrics_init(), 0);
  redis_server_t srv = {0};
  CHECK_INT(redis_start(&srv), 0);
  char wal[1024], data[1024];
  snprintf(wal, sizeof wal, "%s", tmp_path("wal1"));
  snprintf(data, sizeof data, "%s", tmp_path("data1"));
  CHECK_INT(mkdir(data, 0755), 0);
  uv_loop_t loop;
  uv_timer_t tick;
  redis_loop_open(&loop, &tick);
  log_t l;
  CHECK_INT(log_open(&l, &loop, wal), 0);
  CHECK_INT(log_append(&l, &loop, 1000), 0);

  double before = metric("txlog_shipped_records_total");
  tg_ship_opts_t o;
  opts_for(&o, wal, data, &srv);
  char err[256];
  tg_ship_t *s;
  CHECK_INT(tg_ship_new(&loop, &o, &s, err, sizeof err), 0);
  /* Nothing known durable yet (durable_seq 0): nothing goes; then only what a kick covers. */
  run_for(&loop, 300);
  CHECK_INT(tg_ship_shipped_seq(s), 0);
  tg_ship_kick(s, 600);
  CHECK(wait_shipped(&loop, s, 600, 10000));
  run_for(&loop, 300);
  CHECK_INT(tg_ship_shipped_seq(s), 600);
  CHECK_INT(xlen(&srv), 600);
  tg_ship_kick(s, 1000);
  CHECK(wait_shipped(&loop, s, 1000, 10000));
  CHECK_INT(tg_ship_shipped_seq(s), 1000);
  CHECK_INT(xlen(&srv), 1000);
  CHECK(stream_is(&srv, 1000));
  CHECK(metric("txlog_shipped_records_total") - before == 1000);
  run_for(&loop, 50);
  CHECK(metric("txlog_ship_lag_seconds") == 0);
  tg_ship_free(s);
  CHECK_STR(read_ckpt(data), "1000\n");

  /* A stale checkpoint (a crash before it was written): the stream's top wins, nothing twice. */
  char path[1100];
  snprintf(path, sizeof path, "%s/ship.ckpt", data);
  CHECK_INT(tg_file_write_atomic(path, "500\n", 4, 0644), 0);
  o.durable_seq = 1000;
  CHECK_INT(tg_ship_new(&loop, &o, &s, err, sizeof err), 0);
  CHECK(wait_shipped(&loop, s, 1000, 5000));
  CHECK_INT(log_append(&l, &loop, 200), 0);
  tg_ship_kick(s, 1200);
  CHECK(wait_shipped(&loop, s, 1200, 5000));
  CHECK_INT(xlen(&srv), 1200);
  CHECK(stream_is(&srv, 1200));
  tg_ship_free(s);
  CHECK_STR(read_ckpt(data), "1200\n");

  /* Two shippers at once from nothing (a crashed process still sending,
   * checkpoints lost): both send 1201.., the script keeps one of each. */
  CHECK_INT(log_append(&l, &loop, 300), 0);
  CHECK_INT(tg_file_write_atomic(path, "0\n", 2, 0644), 0);
  o.durable_seq = UINT64_MAX;
  tg_ship_t *a, *b;
  CHECK_INT(tg_ship_new(&loop, &o, &a, err, sizeof err), 0);
  CHECK_INT(tg_ship_new(&loop, &o, &b, err, sizeof err), 0);
  CHECK(wait_shipped(&loop, a, 1500, 5000));
  CHECK(wait_shipped(&loop, b, 1500, 5000));
  CHECK_INT(xlen(&srv), 1500);
  CHECK(stream_is(&srv, 1500));
  tg_ship_free(a);
  tg_ship_free(b);

  log_close(&l);
  CHECK_INT(redis_loop_close(&loop, &tick), 0);
  redis_stop(&srv);
}

/* The fixture's server keeps nothing; this one keeps its stream across a kill. */
static int redis_start_aof(redis_server_t *s, const char *dir) {
  if (s->port == 0)
    s->port = redis_free_port();
  char port[16];
  snprintf(port, sizeof port, "%d", s->port);
  pid_t pid = fork();
  if (pid < 0)
    return -1;
  if (pid == 0) {
    int null = open("/dev/null", O_WRONLY);
    dup2(null, 1);
    dup2(null, 2);
    execlp("redis-server", "redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly",
           "yes", "--appendfsync", "always", "--dir", dir, (char *)NULL);
    _exit(127);
  }
  s->pid = pid;
  redis_fixture_track(pid, 0);
  for (int i = 0; i < 250; i++) {
    if (redis_answers_ping(s))
      return 0;
    usleep(20000);
  }
  redis_stop(s);
  return -1;
}

TEST(redis_down_then_up_ships_every_record_once_in_order) {
  CHECK_INT(tg_ship_metrics_init(), 0);
  redis_server_t srv = {0};
  char rdir[1024], wal[1024], data[1024];
  snprintf(rdir, sizeof rdir, "%s", tmp_path("redis2"));
  snprintf(wal, sizeof wal, "%s", tmp_path("wal2"));
  snprintf(data, sizeof data, "%s", tmp_path("data2"));
  CHECK_INT(mkdir(rdir, 0755), 0);
  CHECK_INT(mkdir(data, 0755), 0);
  CHECK_INT(redis_start_aof(&srv, rdir), 0);
  atexit(redis_fixture_kill_all);
  uv_loop_t loop;
  uv_timer_t tick;
  redis_loop_open(&loop, &tick);
  log_t l;
  CHECK_INT(log_open(&l, &loop, wal), 0);
  CHECK_INT(log_append(&l, &loop, 300), 0);
  tg_ship_opts_t o;
  opts_for(&o, wal, data, &srv);
  o.timeout_ms = 100;
  o.durable_seq = 300;
  char err[256];
  tg_ship_t *s;
  CHECK_INT(tg_ship_new(&loop, &o, &s, err, sizeof err), 0);
  CHECK(wait_shipped(&loop, s, 300, 10000));

  redis_stop(&srv);
  double errors = metric("txlog_store_errors_total");
  CHECK_INT(log_append(&l, &loop, 300), 0);
  tg_ship_kick(s, 600);
  run_for(&loop, 1500);
  CHECK_INT(tg_ship_shipped_seq(s), 300);
  CHECK(metric("txlog_store_errors_total") > errors);
  CHECK(metric("txlog_ship_lag_seconds") > 0.5);

  CHECK_INT(redis_start_aof(&srv, rdir), 0);
  CHECK_INT(log_append(&l, &loop, 100), 0);
  tg_ship_kick(s, 700);
  CHECK(wait_shipped(&loop, s, 700, 15000));
  CHECK_INT(xlen(&srv), 700);
  CHECK(stream_is(&srv, 700));
  run_for(&loop, 50);
  CHECK(metric("txlog_ship_lag_seconds") == 0);
  tg_ship_free(s);
  CHECK_STR(read_ckpt(data), "700\n");
  log_close(&l);
  CHECK_INT(redis_loop_close(&loop, &tick), 0);
  redis_stop(&srv);
}

typedef struct {
  uint64_t first, last;
  size_t n;
  bool ok;
} seen_t;

static int seen_cb(void *arg, uint64_t seq, const void *p, size_t len) {
  seen_t *s = arg;
  uint8_t want[512];
  size_t wl = payload_of(want, seq);
  if (s->n == 0)
    s->first = seq;
  else if (seq != s->last + 1)
    s->ok = false;
  if (wl != len || memcmp(want, p, len) != 0)
    s->ok = false;
  s->last = seq;
  s->n++;
  return s->n == 50 ? 7 : 0;
}

TEST(wal_read_from_starts_mid_log_and_stops_on_request) {
  char wal[1024];
  snprintf(wal, sizeof wal, "%s", tmp_path("wal3"));
  uv_loop_t loop;
  uv_timer_t tick;
  redis_loop_open(&loop, &tick);
  log_t l;
  CHECK_INT(log_open(&l, &loop, wal), 0);
  CHECK_INT(log_append(&l, &loop, 400), 0);
  char err[256];
  uint64_t next = 0;
  seen_t s = {.ok = true};
  CHECK_INT(tg_wal_read_from(wal, 333, seen_cb, &s, &next, err, sizeof err), 7); /* cb's value: 50 seen */
  CHECK(s.ok);
  CHECK_INT(s.first, 333);
  CHECK_INT(s.last, 382);
  s = (seen_t){.ok = true};
  CHECK_INT(tg_wal_read_from(wal, 2, seen_cb, &s, &next, err, sizeof err), 7);
  CHECK_INT(next, 52);
  CHECK(s.ok);
  s = (seen_t){.ok = true};
  CHECK_INT(tg_wal_read_from(wal, 390, seen_cb, &s, &next, err, sizeof err), 0);
  CHECK_INT(s.n, 11);
  CHECK_INT(next, 401);
  s = (seen_t){.ok = true};
  CHECK_INT(tg_wal_read_from(wal, 401, seen_cb, &s, &next, err, sizeof err), 0);
  CHECK_INT(s.n, 0);
  log_close(&l);
  CHECK_INT(redis_loop_close(&loop, &tick), 0);

  /* The first segment gone (retention): reading from inside it is -ENOENT. */
  char first[1100];
  snprintf(first, sizeof first, "%s/00000000000000000001.wal", wal);
  CHECK_INT(unlink(first), 0);
  s = (seen_t){.ok = true};
  CHECK_INT(tg_wal_read_from(wal, 1, seen_cb, &s, &next, err, sizeof err), -ENOENT);
  CHECK_INT(s.n, 0);
}

TEST(redis_down_at_start_counts_lag_then_ships) {
  CHECK_INT(tg_ship_metrics_init(), 0);
  redis_server_t srv = {.port = redis_free_port()};
  char wal[1024], data[1024];
  snprintf(wal, sizeof wal, "%s", tmp_path("wal4"));
  snprintf(data, sizeof data, "%s", tmp_path("data4"));
  CHECK_INT(mkdir(data, 0755), 0);
  uv_loop_t loop;
  uv_timer_t tick;
  redis_loop_open(&loop, &tick);
  log_t l;
  CHECK_INT(log_open(&l, &loop, wal), 0);
  CHECK_INT(log_append(&l, &loop, 40), 0);
  tg_ship_opts_t o;
  opts_for(&o, wal, data, &srv);
  o.durable_seq = UINT64_MAX;
  char err[256];
  tg_ship_t *s;
  CHECK_INT(tg_ship_new(&loop, &o, &s, err, sizeof err), 0);
  run_for(&loop, 1200); /* no kick: the records were there before it started */
  CHECK_INT(tg_ship_shipped_seq(s), 0);
  CHECK(metric("txlog_ship_lag_seconds") > 0.5);
  CHECK_INT(redis_start(&srv), 0);
  CHECK(wait_shipped(&loop, s, 40, 15000));
  CHECK(stream_is(&srv, 40));
  tg_ship_free(s);
  CHECK_STR(read_ckpt(data), "40\n");
  log_close(&l);
  CHECK_INT(redis_loop_close(&loop, &tick), 0);
  redis_stop(&srv);
}
