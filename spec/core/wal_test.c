#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "base/buf.h"
#include "base/metrics.h"
#include "ledger/wal.h"
#include "test.h"

/* One private folder per run, removed at exit; tmp_path(name) is a folder in it. */
static char tmpdir_[64];
static void tmpdir_remove(void) {
  char cmd[128];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir_);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", tmpdir_);
}
static const char *tmp_path(const char *name) {
  static char paths[8][256];
  static int next;
  if (tmpdir_[0] == '\0') {
    snprintf(tmpdir_, sizeof tmpdir_, "/tmp/tg_wal_test.XXXXXX");
    if (mkdtemp(tmpdir_) == NULL)
      abort();
    atexit(tmpdir_remove);
  }
  char *p = paths[next++ % 8];
  snprintf(p, sizeof paths[0], "%s/%s", tmpdir_, name);
  return p;
}

#define SEG1 "00000000000000000001.wal"

static void opts_for(tg_wal_opts_t *o, const char *dir) {
  tg_wal_opts_init(o);
  o->dir = dir;
}

static void payload_of(char *out, size_t size, int tag, int i) {
  memset(out, 'a' + (i % 26), size);
  snprintf(out, size, "t%d-%06d", tag, i);
}

/* Appends on one loop, counting completions. */
typedef struct {
  uv_thread_t thread;
  int done, errors;
  int wrong_thread;
  uint64_t *seqs; /* by append index */
} sink_t;

typedef struct {
  sink_t *s;
  int i;
} slot_t;

static void on_done(void *arg, int status, uint64_t seq) {
  slot_t *sl = arg;
  uv_thread_t self = uv_thread_self();
  if (!uv_thread_equal(&self, &sl->s->thread))
    sl->s->wrong_thread++;
  if (status != 0)
    sl->s->errors++;
  else if (sl->s->seqs)
    sl->s->seqs[sl->i] = seq;
  sl->s->done++;
}

/* Appends n records of size bytes (tag, index i0..) through a new client on
 * loop, runs the loop until every callback ran, frees the client. */
static int append_n(tg_wal_t *w, uv_loop_t *loop, int tag, int i0, int n, size_t size, sink_t *s,
                    slot_t *slots) {
  tg_wal_client_t *c;
  if (tg_wal_client_new(w, loop, &c) != 0)
    return -1;
  char buf[4096];
  s->thread = uv_thread_self();
  int want = s->done + n;
  for (int i = 0; i < n; i++) {
    payload_of(buf, size, tag, i0 + i);
    slots[i].s = s;
    slots[i].i = i0 + i;
    int r;
    while ((r = tg_wal_append(c, buf, size, on_done, &slots[i], NULL)) == -EAGAIN)
      uv_run(loop, UV_RUN_ONCE);
    if (r != 0)
      return r;
  }
  while (s->done < want)
    uv_run(loop, UV_RUN_ONCE);
  if (tg_wal_client_free(c) != 0)
    return -2;
  uv_run(loop, UV_RUN_DEFAULT);
  return 0;
}

/* Replay into an array. */
typedef struct {
  int n;
  uint64_t seq[4096];
  char payload[4096][16];
  size_t len[4096];
} replay_t;

static int on_replay(void *arg, uint64_t seq, const void *p, size_t len) {
  replay_t *r = arg;
  if (r->n >= 4096)
    return -1;
  r->seq[r->n] = seq;
  r->len[r->n] = len;
  memcpy(r->payload[r->n], p, len < 15 ? len : 15);
  r->payload[r->n][len < 15 ? len : 15] = '\0';
  r->n++;
  return 0;
}

static int reopen(const char *dir, replay_t *rp, tg_wal_recovery_t *rec, char *err) {
  tg_wal_opts_t o;
  opts_for(&o, dir);
  memset(rp, 0, sizeof *rp);
  o.replay = on_replay;
  o.replay_arg = rp;
  tg_wal_t *w;
  int r = tg_wal_open(&o, &w, rec, err, 256);
  if (r == 0)
    tg_wal_close(w);
  return r;
}

static off_t file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? st.st_size : -1;
}

static int count_segments(const char *dir) {
  DIR *d = opendir(dir);
  int n = 0;
  struct dirent *de;
  while (d && (de = readdir(d)) != NULL)
    n += strstr(de->d_name, ".wal") != NULL;
  if (d)
    closedir(d);
  return n;
}

TEST(round_trip_across_restart) {
  CHECK_INT(tg_wal_metrics_init(), 0);
  const char *dir = tmp_path("rt");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  tg_wal_t *w;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, &rec, err, sizeof err), 0);
  CHECK_INT(rec.records, 0);
  CHECK_INT(rec.next_seq, 1);
  uv_loop_t loop;
  uv_loop_init(&loop);
  sink_t s = {0};
  uint64_t seqs[25];
  s.seqs = seqs;
  slot_t slots[25];
  CHECK_INT(append_n(w, &loop, 0, 0, 20, 40, &s, slots), 0);
  CHECK_INT(s.done, 20);
  CHECK_INT(s.errors, 0);
  CHECK_INT(s.wrong_thread, 0);
  for (int i = 0; i < 20; i++)
    CHECK_INT(seqs[i], i + 1);
  tg_wal_stats_t st;
  tg_wal_stats(w, &st);
  CHECK_INT(st.records, 20);
  tg_buf_t out = {0};
  CHECK_INT(tg_metrics_render(&out), 0);
  tg_buf_append(&out, "", 1);
  CHECK(strstr((char *)out.data, "txlog_wal_pending_records 0") != NULL);
  CHECK(strstr((char *)out.data, "txlog_fsync_batch_records_count") != NULL);
  CHECK(strstr((char *)out.data, "txlog_flush_duration_seconds_bucket") != NULL);
  tg_buf_free(&out);
  tg_wal_close(w);

  static replay_t rp;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 20);
  CHECK_INT(rec.dropped_bytes, 0);
  CHECK_INT(rec.next_seq, 21);
  char want[128];
  for (int i = 0; i < 20; i++) {
    CHECK_INT(rp.seq[i], i + 1);
    CHECK_INT(rp.len[i], 40);
    payload_of(want, 40, 0, i);
    want[15] = '\0';
    CHECK_STR(rp.payload[i], want);
  }
  /* Appends after a restart continue the sequence in the same segment. */
  CHECK_INT(tg_wal_open(&o, &w, &rec, err, sizeof err), 0);
  s = (sink_t){0};
  s.seqs = seqs;
  CHECK_INT(append_n(w, &loop, 0, 20, 5, 40, &s, slots), 0);
  CHECK_INT(seqs[20], 21);
  tg_wal_close(w);
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 25);
  CHECK_INT(count_segments(dir), 1);
  CHECK_INT(uv_loop_close(&loop), 0);
}

/* Two loops on two threads appending at once. */
typedef struct {
  tg_wal_t *w;
  int tag, n, rc;
  sink_t s;
  slot_t *slots;
  uint64_t *seqs;
} worker_t;

static void worker_main(void *arg) {
  worker_t *k = arg;
  uv_loop_t loop;
  uv_loop_init(&loop);
  k->s.seqs = k->seqs;
  /* Rounds of 50, each waited for: batches of both threads interleave. */
  for (int i0 = 0; i0 < k->n && k->rc == 0; i0 += 50)
    k->rc = append_n(k->w, &loop, k->tag, i0, 50, 32, &k->s, k->slots + i0);
  if (uv_loop_close(&loop) != 0)
    k->rc = -3;
}

TEST(concurrent_appends_group_commit) {
  const char *dir = tmp_path("conc");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.batch_bytes = 4096; /* many batches, so the order is checked across them */
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  enum { N = 2000 };
  static worker_t k[2];
  static slot_t slots[2][N];
  static uint64_t seqs[2][N];
  uv_thread_t th[2];
  for (int t = 0; t < 2; t++) {
    k[t] = (worker_t){.w = w, .tag = t, .n = N, .slots = slots[t], .seqs = seqs[t]};
    CHECK_INT(uv_thread_create(&th[t], worker_main, &k[t]), 0);
  }
  for (int t = 0; t < 2; t++)
    uv_thread_join(&th[t]);
  tg_wal_stats_t st;
  tg_wal_stats(w, &st);
  tg_wal_close(w);
  for (int t = 0; t < 2; t++) {
    CHECK_INT(k[t].rc, 0);
    CHECK_INT(k[t].s.done, N);
    CHECK_INT(k[t].s.errors, 0);
    CHECK_INT(k[t].s.wrong_thread, 0);
  }
  CHECK_INT(st.records, 2 * N);
  fprintf(stderr, "  %d records, %" PRIu64 " batches, %" PRIu64 " fsyncs\n", 2 * N, st.batches, st.fsyncs);
  CHECK(st.fsyncs * 10 <= st.records); /* far fewer syncs than records */

  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 2 * N);
  int next[2] = {0, 0};
  for (int i = 0; i < rp.n; i++) {
    CHECK_INT(rp.seq[i], i + 1);
    int t = -1, j = -1;
    CHECK_INT(sscanf(rp.payload[i], "t%d-%d", &t, &j), 2);
    CHECK(t == 0 || t == 1);
    CHECK_INT(j, next[t]); /* once each, in each thread's order */
    CHECK_INT(seqs[t][j], rp.seq[i]); /* the sequence the callback reported */
    next[t]++;
  }
  CHECK_INT(next[0], N);
  CHECK_INT(next[1], N);
}

static void write_records(const char *dir, tg_wal_opts_t *o, int n, size_t size, int i0) {
  tg_wal_t *w;
  char err[256];
  if (tg_wal_open(o, &w, NULL, err, sizeof err) != 0)
    abort();
  uv_loop_t loop;
  uv_loop_init(&loop);
  sink_t s = {0};
  slot_t *slots = calloc((size_t)n, sizeof *slots);
  if (append_n(w, &loop, 0, i0, n, size, &s, slots) != 0 || s.errors)
    abort();
  free(slots);
  tg_wal_close(w);
  uv_loop_close(&loop);
  (void)dir;
}

TEST(torn_tail_truncated) {
  const char *dir = tmp_path("torn");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  write_records(dir, &o, 10, 100, 0);
  char path[1100];
  snprintf(path, sizeof path, "%s/" SEG1, dir);
  off_t full = file_size(path);
  CHECK_INT(full, TG_WAL_HEADER_SIZE + 10 * 108);
  CHECK_INT(truncate(path, full - 3), 0); /* mid-record */

  static replay_t rp;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 9);
  CHECK_INT(rec.dropped_bytes, 105);
  CHECK_INT(rec.dropped_records, 1);
  CHECK_INT(rec.next_seq, 10);
  CHECK_INT(file_size(path), full - 108);

  /* Garbage after the last good record. */
  int fd = open(path, O_WRONLY | O_APPEND);
  CHECK(fd >= 0);
  CHECK_INT(write(fd, "garbage!garbage!\0\0\0\0", 20), 20);
  close(fd);
  CHECK(tg_wal_scan(dir, NULL, NULL, NULL, err, sizeof err) == -EBADMSG); /* read-only scan refuses */
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 9);
  CHECK_INT(rec.dropped_bytes, 20);
  CHECK_INT(rec.dropped_records, 1);

  /* A frame with a good length and a bad CRC at the tail. */
  uint8_t frame[8 + 5] = {5, 0, 0, 0, 1, 2, 3, 4, 'h', 'e', 'l', 'l', 'o'};
  fd = open(path, O_WRONLY | O_APPEND);
  CHECK_INT(write(fd, frame, sizeof frame), (long long)sizeof frame);
  close(fd);
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 9);
  CHECK_INT(rec.dropped_bytes, 13);

  /* The log goes on from the last good record. */
  write_records(dir, &o, 1, 100, 9);
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 10);
  CHECK_INT(rp.seq[9], 10);
  CHECK_INT(rec.dropped_bytes, 0);
  CHECK_INT(tg_wal_scan(dir, NULL, NULL, &rec, err, sizeof err), 0);
  CHECK_INT(rec.records, 10);
}

TEST(rotation_and_recovery_across_segments) {
  const char *dir = tmp_path("rot");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.segment_bytes = 1024; /* 9 records of 108 bytes after the header */
  write_records(dir, &o, 50, 100, 0);
  CHECK_INT(count_segments(dir), 6);
  static replay_t rp;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.segments, 6);
  CHECK_INT(rp.n, 50);
  char want[128];
  for (int i = 0; i < 50; i++) {
    CHECK_INT(rp.seq[i], i + 1);
    payload_of(want, 100, 0, i);
    want[15] = '\0';
    CHECK_STR(rp.payload[i], want);
  }
  char path[1100];
  snprintf(path, sizeof path, "%s/00000000000000000010.wal", dir);
  CHECK(file_size(path) > 0); /* the second segment starts at record 10 */
  write_records(dir, &o, 10, 100, 50);
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 60);
  CHECK_INT(rp.seq[59], 60);
}

TEST(corruption_in_earlier_segment_is_reported) {
  const char *dir = tmp_path("corrupt");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.segment_bytes = 1024;
  write_records(dir, &o, 30, 100, 0);
  CHECK_INT(count_segments(dir), 4);
  char path[1100];
  snprintf(path, sizeof path, "%s/" SEG1, dir);
  off_t before = file_size(path);
  off_t at = TG_WAL_HEADER_SIZE + 3 * 108 + 8 + 5; /* inside the payload of record 4 */
  int fd = open(path, O_RDWR);
  CHECK(fd >= 0);
  uint8_t b;
  CHECK_INT(pread(fd, &b, 1, at), 1);
  b ^= 0x10;
  CHECK_INT(pwrite(fd, &b, 1, at), 1);
  close(fd);

  static replay_t rp;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(reopen(dir, &rp, &rec, err), -EBADMSG);
  CHECK(strstr(err, SEG1) != NULL);
  CHECK(strstr(err, "offset 348") != NULL);
  CHECK(strstr(err, "CRC") != NULL);
  CHECK_INT(rp.n, 3); /* replayed up to the damage */
  CHECK_INT(file_size(path), before); /* nothing truncated */
  CHECK_INT(count_segments(dir), 4);
  err[0] = '\0';
  CHECK_INT(tg_wal_scan(dir, NULL, NULL, NULL, err, sizeof err), -EBADMSG);
  CHECK(strstr(err, "offset 348") != NULL);
}

TEST(capacity_limit_refuses) {
  const char *dir = tmp_path("cap");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.capacity_bytes = 2 * TG_WAL_HEADER_SIZE + 5 * 108; /* five records, and room kept for a header */
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  sink_t s = {0};
  s.thread = uv_thread_self();
  slot_t sl[6];
  char buf[100];
  for (int i = 0; i < 5; i++) {
    payload_of(buf, 100, 0, i);
    sl[i] = (slot_t){&s, i};
    CHECK_INT(tg_wal_append(c, buf, 100, on_done, &sl[i], NULL), 0);
  }
  sl[5] = (slot_t){&s, 5};
  CHECK_INT(tg_wal_append(c, buf, 100, on_done, &sl[5], NULL), -ENOSPC);
  CHECK_INT(tg_wal_append(c, buf, 0, on_done, &sl[5], NULL), -EINVAL);
  while (s.done < 5)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_INT(s.done, 5); /* the refused append never calls back */
  CHECK_INT(s.errors, 0);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  /* Still full after a restart. */
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  CHECK_INT(tg_wal_append(c, buf, 1, on_done, &sl[5], NULL), -ENOSPC);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}

TEST(full_queue_refuses_at_once) {
  const char *dir = tmp_path("queue");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.queue_records = 2;
  o.batch_interval_us = 10 * 1000 * 1000; /* the writer holds the batch open */
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  sink_t s = {0};
  s.thread = uv_thread_self();
  slot_t sl[3] = {{&s, 0}, {&s, 1}, {&s, 2}};
  uint64_t seq = 0;
  CHECK_INT(tg_wal_append(c, "a", 1, on_done, &sl[0], &seq), 0);
  CHECK_INT(seq, 1);
  CHECK_INT(tg_wal_append(c, "b", 1, on_done, &sl[1], &seq), 0);
  CHECK_INT(seq, 2);
  CHECK_INT(tg_wal_append(c, "c", 1, on_done, &sl[2], NULL), -EAGAIN);
  CHECK_INT(tg_wal_client_free(c), -EBUSY);
  tg_wal_close(w); /* flushes what is queued without waiting out the interval */
  while (s.done < 2)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_INT(s.errors, 0);
  CHECK_INT(tg_wal_client_free(c), 0);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rp.n, 2);
}

/* A flipped bit in the last segment with good records after it is damage,
 * not a torn tail: truncating there would drop acknowledged records. */
TEST(corruption_mid_last_segment_is_not_truncated) {
  const char *dir = tmp_path("midlast");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  write_records(dir, &o, 10, 100, 0);
  char path[1100];
  snprintf(path, sizeof path, "%s/" SEG1, dir);
  off_t before = file_size(path);
  off_t at = TG_WAL_HEADER_SIZE + 2 * 108 + 8 + 50;
  int fd = open(path, O_RDWR);
  CHECK(fd >= 0);
  uint8_t b;
  CHECK_INT(pread(fd, &b, 1, at), 1);
  b ^= 0x01;
  CHECK_INT(pwrite(fd, &b, 1, at), 1);
  close(fd);
  static replay_t rp;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(reopen(dir, &rp, &rec, err), -EBADMSG);
  CHECK(strstr(err, SEG1) != NULL);
  CHECK(strstr(err, "offset 240") != NULL);
  CHECK_INT(file_size(path), before);
}

/* on_durable: what the writer thread saw, checked against the completions. */
typedef struct {
  uv_thread_t loop_thread;
  _Atomic uint64_t last;  /* highest sequence seen by on_durable */
  _Atomic int bad;        /* out of order, wrong payload, or on the loop thread */
  _Atomic int calls;
  int done, errors, early; /* completions (loop thread): early = before on_durable saw it */
} durable_t;

static int on_durable_rec(void *arg, uint64_t seq, const void *payload, size_t len) {
  durable_t *d = arg;
  uv_thread_t self = uv_thread_self();
  char want[128];
  payload_of(want, len < sizeof want ? len : sizeof want, 0, (int)seq - 1);
  if (uv_thread_equal(&self, &d->loop_thread) || seq != atomic_load(&d->last) + 1 || len != 40 ||
      memcmp(payload, want, 15) != 0)
    atomic_fetch_add(&d->bad, 1);
  atomic_fetch_add(&d->calls, 1);
  atomic_store(&d->last, seq);
  return 0;
}

static void on_done_durable(void *arg, int status, uint64_t seq) {
  durable_t *d = arg;
  if (status != 0)
    d->errors++;
  else if (atomic_load(&d->last) < seq)
    d->early++;
  d->done++;
}

/* Appends n records of 40 bytes (payload index = sequence - 1) and waits for them. */
static int append_durable(tg_wal_client_t *c, uv_loop_t *loop, durable_t *d, int i0, int n) {
  char buf[40];
  int want = d->done + n;
  for (int i = 0; i < n; i++) {
    payload_of(buf, sizeof buf, 0, i0 + i);
    int r;
    while ((r = tg_wal_append(c, buf, sizeof buf, on_done_durable, d, NULL)) == -EAGAIN)
      uv_run(loop, UV_RUN_ONCE);
    if (r != 0)
      return r;
  }
  while (d->done < want)
    uv_run(loop, UV_RUN_ONCE);
  return 0;
}

TEST(on_durable_in_order_before_completion) {
  const char *dir = tmp_path("durable");
  static durable_t d;
  d.loop_thread = uv_thread_self();
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.on_durable = on_durable_rec;
  o.on_durable_arg = &d;
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  for (int i0 = 0; i0 < 300; i0 += 30) /* rounds, so there are several batches */
    CHECK_INT(append_durable(c, &loop, &d, i0, 30), 0);
  tg_wal_stats_t st;
  tg_wal_stats(w, &st);
  CHECK(st.batches >= 10);
  CHECK_INT(d.done, 300);
  CHECK_INT(d.errors, 0);
  CHECK_INT(d.early, 0);
  CHECK_INT(atomic_load(&d.calls), 300);
  CHECK_INT(atomic_load(&d.bad), 0);
  CHECK_INT(atomic_load(&d.last), 300);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  /* Not called for records replayed at open, and the sequence goes on. */
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  CHECK_INT(atomic_load(&d.calls), 300);
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  CHECK_INT(append_durable(c, &loop, &d, 300, 10), 0);
  CHECK_INT(atomic_load(&d.calls), 310);
  CHECK_INT(atomic_load(&d.bad), 0);
  CHECK_INT(d.early, 0);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}

TEST(on_durable_not_called_for_failed_batch) {
  const char *dir = tmp_path("durable_fail");
  static durable_t d;
  d.loop_thread = uv_thread_self();
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.segment_bytes = TG_WAL_HEADER_SIZE + 2 * 48; /* two records of 40 bytes per segment */
  o.on_durable = on_durable_rec;
  o.on_durable_arg = &d;
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  CHECK_INT(append_durable(c, &loop, &d, 0, 2), 0);
  CHECK_INT(atomic_load(&d.calls), 2);
  /* The segment that record 3 would open exists already: the rotation fails. */
  char path[1100];
  snprintf(path, sizeof path, "%s/00000000000000000003.wal", dir);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0640);
  CHECK(fd >= 0);
  close(fd);
  CHECK_INT(append_durable(c, &loop, &d, 2, 1), 0);
  CHECK_INT(d.done, 3);
  CHECK_INT(d.errors, 1);
  CHECK_INT(atomic_load(&d.calls), 2); /* the failed record was never reported durable */
  CHECK_INT(atomic_load(&d.last), 2);
  CHECK_INT(atomic_load(&d.bad), 0);
  char buf[40] = "x";
  CHECK(tg_wal_append(c, buf, sizeof buf, on_done_durable, &d, NULL) < 0); /* failed for good */
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  CHECK_INT(atomic_load(&d.calls), 2);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}

/* ---- retention ---- */

/* The value of an unlabelled counter or gauge in the exposition (-1: none). */
static double metric_value(const char *name) {
  tg_buf_t out = {0};
  double v = -1;
  if (tg_metrics_render(&out) != 0)
    return -1;
  tg_buf_append(&out, "", 1);
  char key[128];
  snprintf(key, sizeof key, "\n%s ", name);
  const char *at = strstr((char *)out.data, key);
  if (at)
    v = strtod(at + strlen(key), NULL);
  tg_buf_free(&out);
  return v;
}

static int seg_exists(const char *dir, uint64_t first) {
  char path[1100];
  snprintf(path, sizeof path, "%s/%020" PRIu64 ".wal", dir, first);
  return access(path, F_OK) == 0;
}

/* Sets a segment's mtime (and atime) to age_s seconds ago. */
static int age_segment(const char *dir, uint64_t first, long age_s) {
  char path[1100];
  snprintf(path, sizeof path, "%s/%020" PRIu64 ".wal", dir, first);
  struct timespec ts[2];
  clock_gettime(CLOCK_REALTIME, &ts[0]);
  ts[0].tv_sec -= age_s;
  ts[1] = ts[0];
  return utimensat(AT_FDCWD, path, ts, 0);
}

/* 50 records of 100 bytes, 9 a segment: segments at 1, 10, 19, 28, 37 (996
 * bytes each) and 46 (5 records, 564 bytes), 5544 bytes in all. */
#define RET_TOTAL (5 * 996 + 564)
static void six_segments(const char *dir, tg_wal_opts_t *o) {
  opts_for(o, dir);
  o->segment_bytes = 1024;
  write_records(dir, o, 50, 100, 0);
}

TEST(retention_by_size) {
  CHECK_INT(tg_wal_metrics_init(), 0);
  const char *dir = tmp_path("ret_size");
  tg_wal_opts_t o;
  six_segments(dir, &o);
  CHECK_INT(count_segments(dir), 6);
  tg_wal_t *w;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, &rec, err, sizeof err), 0);
  CHECK_INT(rec.first_seq, 1);
  CHECK_INT(tg_wal_bytes(w), RET_TOTAL);
  CHECK_INT(tg_wal_used_bytes(w), RET_TOTAL);
  CHECK_INT(tg_wal_capacity(w), o.capacity_bytes);
  double before = metric_value("txlog_retention_removed_segments_total");
  if (before < 0)
    before = 0; /* no series until the first removal */
  tg_wal_retain_stats_t st;
  /* Under the bound, or no bound: nothing goes. */
  CHECK_INT(tg_wal_retain(w, 50, RET_TOTAL, 0, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(st.first_seq, 1);
  /* A floor of age: segments written in the last hour stay above the size. */
  CHECK_INT(tg_wal_retain_keep(w, 50, 1, 0, 3600, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(age_segment(dir, 1, 7200), 0);
  CHECK_INT(tg_wal_retain_keep(w, 50, 1, 0, 3600, &st), 0);
  CHECK_INT(st.removed_segments, 1); /* the old one; 10 is young and stops it */
  CHECK_INT(st.first_seq, 10);
  CHECK_INT(tg_wal_bytes(w), RET_TOTAL - 996);
  CHECK_INT(tg_wal_retain(w, 50, 0, 0, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(count_segments(dir), 5);
  /* Oldest first until the log is at most 3000 bytes: 4548 -> 3552 -> 2556. */
  CHECK_INT(tg_wal_retain(w, 50, 3000, 0, &st), 0);
  CHECK_INT(st.removed_segments, 2);
  CHECK_INT(st.removed_bytes, 2 * 996);
  CHECK_INT(st.first_seq, 28);
  CHECK_INT(st.bytes, RET_TOTAL - 3 * 996);
  CHECK_INT(tg_wal_bytes(w), RET_TOTAL - 3 * 996);
  CHECK_INT(count_segments(dir), 3);
  CHECK(!seg_exists(dir, 1) && !seg_exists(dir, 10) && !seg_exists(dir, 19) && seg_exists(dir, 28));
  CHECK(metric_value("txlog_retention_removed_segments_total") == before + 3);
  /* Appends go on in the same (last) segment. */
  uv_loop_t loop;
  uv_loop_init(&loop);
  sink_t s = {0};
  uint64_t seqs[60]; /* by append index */
  s.seqs = seqs;
  slot_t slots[4];
  CHECK_INT(append_n(w, &loop, 0, 50, 3, 100, &s, slots), 0);
  CHECK_INT(s.errors, 0);
  CHECK_INT(seqs[52], 53);
  tg_wal_close(w);
  CHECK_INT(uv_loop_close(&loop), 0);

  /* A restart replays only what is left, from sequence 28. */
  static replay_t rp;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.first_seq, 28);
  CHECK_INT(rec.next_seq, 54);
  CHECK_INT(rec.segments, 3);
  CHECK_INT(rec.bytes, RET_TOTAL - 3 * 996 + 3 * 108);
  CHECK_INT(rp.n, 26);
  char want[128];
  for (int i = 0; i < rp.n; i++) {
    CHECK_INT(rp.seq[i], 28 + i);
    payload_of(want, 100, 0, 27 + i);
    want[15] = '\0';
    CHECK_STR(rp.payload[i], want);
  }
  CHECK_INT(tg_wal_scan(dir, NULL, NULL, &rec, err, sizeof err), 0);
  CHECK_INT(rec.first_seq, 28);
  CHECK_INT(rec.records, 26);
}

TEST(retention_by_age_removes_a_prefix_only) {
  const char *dir = tmp_path("ret_age");
  tg_wal_opts_t o;
  six_segments(dir, &o);
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  tg_wal_retain_stats_t st;
  /* Fresh segments are not old. */
  CHECK_INT(tg_wal_retain(w, 50, 0, 600, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  /* An old segment after a young one stays: no gap. */
  CHECK_INT(age_segment(dir, 10, 3600), 0);
  CHECK_INT(tg_wal_retain(w, 50, 0, 600, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(count_segments(dir), 6);
  /* The first two old: both go, the third (young) stops it. */
  CHECK_INT(age_segment(dir, 1, 3600), 0);
  CHECK_INT(age_segment(dir, 28, 3600), 0);
  CHECK_INT(tg_wal_retain(w, 50, 0, 600, &st), 0);
  CHECK_INT(st.removed_segments, 2);
  CHECK_INT(st.first_seq, 19);
  CHECK_INT(st.bytes, RET_TOTAL - 2 * 996);
  CHECK(!seg_exists(dir, 1) && !seg_exists(dir, 10) && seg_exists(dir, 19));
  /* Old but not covered by the snapshot: stays. */
  CHECK_INT(age_segment(dir, 19, 3600), 0);
  CHECK_INT(tg_wal_retain(w, 26, 0, 600, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(tg_wal_retain(w, 27, 0, 600, &st), 0);
  CHECK_INT(st.removed_segments, 1); /* 19..27; 28..36 is old but not covered */
  CHECK_INT(st.first_seq, 28);
  /* Either bound removes: 28 is old, 37 young but the log is above 1 byte. */
  CHECK_INT(tg_wal_retain(w, 50, 1, 600, &st), 0);
  CHECK_INT(st.removed_segments, 2);
  CHECK_INT(st.first_seq, 46);
  tg_wal_close(w);
  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.first_seq, 46);
  CHECK_INT(rp.n, 5);
  CHECK_INT(rp.seq[0], 46);
}

TEST(retention_never_beyond_covered_nor_the_active_segment) {
  const char *dir = tmp_path("ret_cover");
  tg_wal_opts_t o;
  six_segments(dir, &o);
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  for (uint64_t f = 1; f <= 46; f += 9)
    CHECK_INT(age_segment(dir, f, 86400), 0); /* every bound says remove */
  tg_wal_retain_stats_t st;
  CHECK_INT(tg_wal_retain(w, 0, 1, 1, &st), 0); /* no snapshot: nothing is covered */
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(tg_wal_retain(w, 8, 1, 1, &st), 0); /* 1..9: record 9 is not covered */
  CHECK_INT(st.removed_segments, 0);
  CHECK_INT(tg_wal_retain(w, 20, 1, 1, &st), 0); /* 1..9 and 10..18, not 19..27 */
  CHECK_INT(st.removed_segments, 2);
  CHECK_INT(st.first_seq, 19);
  CHECK(seg_exists(dir, 19));
  /* Everything covered, every bound exceeded: the segment being written stays,
   * even when the snapshot covers all of it. */
  CHECK_INT(tg_wal_retain(w, UINT64_MAX, 1, 1, &st), 0);
  CHECK_INT(st.removed_segments, 3);
  CHECK_INT(st.first_seq, 46);
  CHECK_INT(count_segments(dir), 1);
  CHECK(seg_exists(dir, 46));
  CHECK_INT(st.bytes, 564);
  CHECK_INT(tg_wal_retain(w, UINT64_MAX, 1, 1, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  tg_wal_close(w);

  /* A log of one segment, reopened: that segment is the one being written. */
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  CHECK_INT(tg_wal_retain(w, UINT64_MAX, 1, 1, &st), 0);
  CHECK_INT(st.removed_segments, 0);
  tg_wal_close(w);
  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.first_seq, 46);
  CHECK_INT(rec.next_seq, 51);
  CHECK_INT(rp.n, 5);
}

TEST(retention_frees_capacity) {
  const char *dir = tmp_path("ret_cap");
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.segment_bytes = TG_WAL_HEADER_SIZE + 2 * 108; /* two records of 100 bytes a segment */
  o.capacity_bytes = 1000;
  tg_wal_t *w;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &w, NULL, err, sizeof err), 0);
  uv_loop_t loop;
  uv_loop_init(&loop);
  tg_wal_client_t *c;
  CHECK_INT(tg_wal_client_new(w, &loop, &c), 0);
  sink_t s = {0};
  s.thread = uv_thread_self();
  static slot_t sl[64];
  char buf[100];
  int n = 0, r = 0;
  /* One at a time, each durable before the next: the rotations are counted. */
  for (; n < 60; n++) {
    payload_of(buf, 100, 0, n);
    sl[n] = (slot_t){&s, n};
    if ((r = tg_wal_append(c, buf, 100, on_done, &sl[n], NULL)) != 0)
      break;
    while (s.done < n + 1)
      uv_run(&loop, UV_RUN_ONCE);
  }
  CHECK_INT(r, -ENOSPC);
  CHECK_INT(s.errors, 0);
  CHECK(n >= 6);
  CHECK(tg_wal_used_bytes(w) + 108 > 1000);
  tg_wal_retain_stats_t st;
  CHECK_INT(tg_wal_retain(w, (uint64_t)n, 500, 0, &st), 0);
  CHECK(st.removed_segments >= 2);
  CHECK(tg_wal_bytes(w) <= 500);
  /* The refused append now goes through. */
  sl[n] = (slot_t){&s, n};
  uint64_t seq = 0;
  CHECK_INT(tg_wal_append(c, buf, 100, on_done, &sl[n], &seq), 0);
  CHECK_INT(seq, n + 1);
  while (s.done < n + 1)
    uv_run(&loop, UV_RUN_ONCE);
  CHECK_INT(s.errors, 0);
  CHECK_INT(tg_wal_client_free(c), 0);
  tg_wal_close(w);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.first_seq, st.first_seq);
  CHECK_INT(rec.next_seq, n + 2);
  CHECK_INT(rp.n, n + 2 - (int)st.first_seq);
  CHECK_INT(rp.seq[rp.n - 1], n + 1);
}

/* A log whose first segment starts above 1 recovers; a missing segment in
 * the middle is still a gap. */
TEST(recovery_from_a_later_first_segment) {
  const char *dir = tmp_path("ret_first");
  tg_wal_opts_t o;
  six_segments(dir, &o);
  char path[1100];
  snprintf(path, sizeof path, "%s/" SEG1, dir);
  CHECK_INT(unlink(path), 0);
  static replay_t rp;
  tg_wal_recovery_t rec;
  char err[256] = "";
  CHECK_INT(tg_wal_scan(dir, NULL, NULL, &rec, err, sizeof err), 0);
  CHECK_INT(rec.first_seq, 10);
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.first_seq, 10);
  CHECK_INT(rec.next_seq, 51);
  CHECK_INT(rp.n, 41);
  CHECK_INT(rp.seq[0], 10);
  snprintf(path, sizeof path, "%s/00000000000000000028.wal", dir);
  CHECK_INT(unlink(path), 0);
  CHECK_INT(reopen(dir, &rp, &rec, err), -EBADMSG);
  CHECK(strstr(err, "expected 28") != NULL);
}

/* Retention while a worker appends across rotations: the log left is always
 * whole (contiguous, every acknowledged record after the covered one). */
typedef struct {
  tg_wal_t *w;
  _Atomic uint64_t durable; /* highest sequence on_durable saw */
  _Atomic int stop;
  uint64_t removed;
  int rc;
} race_t;

static int race_durable(void *arg, uint64_t seq, const void *p, size_t len) {
  (void)p;
  (void)len;
  atomic_store(&((race_t *)arg)->durable, seq);
  return 0;
}

static void race_retainer(void *arg) {
  race_t *x = arg;
  while (!atomic_load(&x->stop) && x->rc == 0) {
    tg_wal_retain_stats_t st;
    /* Cover up to what is durable less a few: those must stay. */
    uint64_t d = atomic_load(&x->durable);
    x->rc = tg_wal_retain(x->w, d > 5 ? d - 5 : 0, 1, 0, &st);
    x->removed += st.removed_segments;
    if (st.first_seq > (d > 5 ? d - 5 : 0) + 1 && st.removed_segments > 0)
      x->rc = -1000; /* removed a record the "snapshot" did not cover */
  }
}

TEST(retention_while_appending) {
  const char *dir = tmp_path("ret_race");
  static race_t x;
  tg_wal_opts_t o;
  opts_for(&o, dir);
  o.segment_bytes = TG_WAL_HEADER_SIZE + 3 * 40; /* three records of 32 bytes a segment */
  o.batch_bytes = 256;
  o.on_durable = race_durable;
  o.on_durable_arg = &x;
  char err[256] = "";
  CHECK_INT(tg_wal_open(&o, &x.w, NULL, err, sizeof err), 0);
  uv_thread_t th;
  CHECK_INT(uv_thread_create(&th, race_retainer, &x), 0);
  static worker_t k;
  enum { N = 3000 };
  static slot_t slots[N];
  static uint64_t seqs[N];
  k = (worker_t){.w = x.w, .tag = 0, .n = N, .slots = slots, .seqs = seqs};
  worker_main(&k);
  atomic_store(&x.stop, 1);
  uv_thread_join(&th);
  CHECK_INT(k.rc, 0);
  CHECK_INT(k.s.errors, 0);
  CHECK_INT(x.rc, 0);
  CHECK(x.removed > 100);
  tg_wal_close(x.w);
  static replay_t rp;
  tg_wal_recovery_t rec;
  CHECK_INT(reopen(dir, &rp, &rec, err), 0);
  CHECK_INT(rec.next_seq, N + 1);
  CHECK(rec.first_seq <= N - 5 + 1);
  CHECK_INT(rp.n, N + 1 - rec.first_seq);
}
