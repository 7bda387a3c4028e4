#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
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
  o.capacity_bytes = TG_WAL_HEADER_SIZE + 5 * 108;
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
