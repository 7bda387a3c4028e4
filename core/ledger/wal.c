#include "ledger/wal.h"
#include "base/file.h"

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "base/metrics.h"

static const char MAGIC[8] = {'T', 'G', 'W', 'A', 'L', 'S', 'E', 'G'};
#define VERSION 1u

static tg_metric_t *m_pending_bytes, *m_pending_records, *m_flush_seconds, *m_batch_records, *m_retained;
static tg_metric_t *m_used_bytes, *m_capacity_bytes;

/* One appended record: the frame (length, CRC, payload) is written as is. */
typedef struct entry {
  struct entry *next;
  tg_wal_client_t *client;
  tg_wal_append_cb cb;
  void *arg;
  uint64_t seq;
  int status;
  uint32_t frame_len; /* TG_WAL_RECORD_OVERHEAD + payload */
  uint8_t frame[];
} entry_t;

struct tg_wal_client {
  tg_wal_t *wal;
  uv_async_t async;
  pthread_mutex_t mu; /* guards done_head/tail, and the writer's uv_async_send */
  entry_t *done_head, *done_tail;
  size_t inflight; /* loop thread only */
  bool release;    /* loop thread only: free once inflight is back to 0 */
};

struct tg_wal {
  char *dir;
  tg_wal_opts_t o;

  pthread_mutex_t mu; /* guards everything down to `failed` */
  pthread_cond_t cond;
  entry_t *head, *tail;  /* queued, not yet taken by the writer */
  uint64_t queued_bytes; /* in head..tail */
  uint64_t first_ns;     /* when the oldest queued record arrived */
  uint64_t pending_bytes, pending_records; /* appended, not yet durable */
  uint64_t used_bytes;   /* segments on disk + everything appended since */
  uint64_t next_seq;
  uint64_t cur_first; /* first sequence of the segment being written (set once it is durable) */
  int stopping;
  int failed; /* negative errno once the log has failed */

  pthread_mutex_t retain_mu; /* one tg_wal_retain at a time */

  /* Writer thread only. */
  pthread_t thread;
  int fd;           /* current (last) segment */
  uint64_t seg_size; /* its size */
  uint64_t seg_records;
  uint8_t *buf;
  size_t buf_cap;

  _Atomic uint64_t st_batches, st_fsyncs, st_records, st_bytes;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

static void put32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}
static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++)
    p[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t get64(const uint8_t *p) {
  return (uint64_t)get32(p) | (uint64_t)get32(p + 4) << 32;
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The record CRC covers the length too, so a zeroed or shifted frame never verifies. */
static uint32_t frame_crc(const uint8_t len_le[4], const void *payload, size_t len) {
  return tg_crc32c(tg_crc32c(0, len_le, 4), payload, len);
}

static void header_encode(uint8_t h[TG_WAL_HEADER_SIZE], uint64_t first_seq) {
  memcpy(h, MAGIC, 8);
  put32(h + 8, VERSION);
  put64(h + 16, first_seq);
  uint32_t c = tg_crc32c(tg_crc32c(0, h, 12), h + 16, 8);
  put32(h + 12, c);
}

static int header_decode(const uint8_t *h, uint64_t *first_seq) {
  if (memcmp(h, MAGIC, 8) != 0 || get32(h + 8) != VERSION)
    return -1;
  if (get32(h + 12) != tg_crc32c(tg_crc32c(0, h, 12), h + 16, 8))
    return -1;
  *first_seq = get64(h + 16);
  return 0;
}

void tg_wal_opts_init(tg_wal_opts_t *o) {
  memset(o, 0, sizeof *o);
  o->segment_bytes = UINT64_C(64) << 20;
  o->capacity_bytes = UINT64_C(1) << 30;
  o->batch_bytes = 64 << 10;
  o->batch_interval_us = 1000;
  o->queue_bytes = 16 << 20;
  o->queue_records = 65536;
}

int tg_wal_metrics_init(void) {
  static const double sizes[] = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096};
  m_pending_bytes = tg_metric_new(TG_METRIC_GAUGE, "txlog_wal_pending_bytes",
                                  "Bytes appended to the write-ahead log, not yet durable", NULL, NULL, 0);
  m_pending_records = tg_metric_new(TG_METRIC_GAUGE, "txlog_wal_pending_records",
                                    "Records appended to the write-ahead log, not yet durable", NULL, NULL, 0);
  m_flush_seconds = tg_metric_new(TG_METRIC_HISTOGRAM, "txlog_flush_duration_seconds",
                                  "Time to write and fdatasync one write-ahead log batch; a slow disk shows here "
                                  "first (every purchase waits for its batch).",
                                  NULL, NULL, 0);
  m_batch_records = tg_metric_new(TG_METRIC_HISTOGRAM, "txlog_fsync_batch_records",
                                  "Records made durable by one fdatasync", NULL, sizes,
                                  sizeof sizes / sizeof sizes[0]);
  m_used_bytes = tg_metric_new(TG_METRIC_GAUGE, "txlog_wal_used_bytes",
                               "Bytes the write-ahead log takes against its capacity (segments on disk and "
                               "records not yet durable); at txlog_wal_capacity_bytes purchases are refused",
                               NULL, NULL, 0);
  m_capacity_bytes = tg_metric_new(TG_METRIC_GAUGE, "txlog_wal_capacity_bytes",
                                   "The write-ahead log's capacity (ledger.wal.capacity_bytes)", NULL, NULL, 0);
  m_retained = tg_metric_new(TG_METRIC_COUNTER, "txlog_retention_removed_segments_total",
                             "Write-ahead log segments removed by retention (covered by a balance snapshot)",
                             NULL, NULL, 0);
  if (!m_pending_bytes || !m_pending_records || !m_flush_seconds || !m_batch_records || !m_retained ||
      !m_used_bytes || !m_capacity_bytes)
    return -ENOMEM;
  return 0;
}

/* ---- segments on disk ---- */

typedef struct {
  uint64_t first_seq;
  char name[32];
} seg_t;

static int seg_cmp(const void *a, const void *b) {
  uint64_t x = ((const seg_t *)a)->first_seq, y = ((const seg_t *)b)->first_seq;
  return x < y ? -1 : x > y;
}

static void seg_name(char out[32], uint64_t first_seq) {
  snprintf(out, 32, "%020" PRIu64 ".wal", first_seq);
}

/* The segment files of dir, sorted. Other files are ignored. */
static int list_segments(const char *dir, seg_t **out, size_t *n, char *err, size_t errlen) {
  DIR *d = opendir(dir);
  if (d == NULL) {
    int e = -errno;
    set_err(err, errlen, "%s: %s", dir, strerror(errno));
    return e;
  }
  seg_t *v = NULL;
  size_t len = 0, cap = 0;
  struct dirent *de;
  while ((de = readdir(d)) != NULL) {
    const char *s = de->d_name;
    if (strlen(s) != 24 || strcmp(s + 20, ".wal") != 0 || strspn(s, "0123456789") != 20)
      continue;
    if (len == cap) {
      cap = cap ? cap * 2 : 16;
      seg_t *nv = realloc(v, cap * sizeof *v);
      if (nv == NULL) {
        free(v);
        closedir(d);
        set_err(err, errlen, "out of memory");
        return -ENOMEM;
      }
      v = nv;
    }
    v[len].first_seq = strtoull(s, NULL, 10);
    memcpy(v[len].name, s, 25);
    len++;
  }
  closedir(d);
  if (len)
    qsort(v, len, sizeof *v, seg_cmp);
  *out = v;
  *n = len;
  return 0;
}

/* A segment whole; one that shrank while read (another process removed or
 * truncated it) is an I/O error here, with err naming it. */
static int read_segment(const char *path, uint8_t **data, size_t *size, char *err, size_t errlen) {
  int shrank = 0;
  int r = tg_file_read(path, data, size, &shrank);
  if (r == 0 && shrank) {
    free(*data);
    r = -EIO;
  }
  if (r != 0)
    set_err(err, errlen, "%s: %s", path, r == -EIO ? "read: shorter than its size" : strerror(-r));
  return r;
}

/* A whole frame with a good CRC at off. */
static int frame_ok(const uint8_t *data, size_t size, size_t off) {
  if (off > size || size - off < TG_WAL_RECORD_OVERHEAD)
    return 0;
  uint32_t len = get32(data + off);
  return len > 0 && len <= TG_WAL_MAX_RECORD && size - off - TG_WAL_RECORD_OVERHEAD >= len &&
         frame_crc(data + off, data + off + TG_WAL_RECORD_OVERHEAD, len) == get32(data + off + 4);
}

/* Verifies every segment of dir in order. With repair, a damaged tail of
 * the last segment is truncated (and a last segment shorter than a header
 * removed); without, it is an error. Fills rec, and last_name with the name
 * of the last segment left ("" when there is none). */
static int scan(const char *dir, int repair, tg_wal_record_cb cb, void *arg, tg_wal_recovery_t *rec,
                char *last_name, char *err, size_t errlen) {
  memset(rec, 0, sizeof *rec);
  rec->next_seq = 1;
  seg_t *segs = NULL;
  size_t nseg = 0;
  int r = list_segments(dir, &segs, &nseg, err, errlen);
  if (r != 0)
    return r;
  if (last_name)
    last_name[0] = '\0';
  char path[4096];
  for (size_t i = 0; i < nseg; i++) {
    int last = i + 1 == nseg;
    snprintf(path, sizeof path, "%s/%s", dir, segs[i].name);
    uint8_t *data = NULL;
    size_t size = 0;
    if ((r = read_segment(path, &data, &size, err, errlen)) != 0)
      goto out;
    uint64_t first = 0;
    if (size < TG_WAL_HEADER_SIZE && last && repair) {
      /* Crashed while the segment was being made: it never held a record. */
      free(data);
      if (unlink(path) != 0 || tg_file_fsync_dir(dir) != 0) {
        r = -errno;
        set_err(err, errlen, "%s: cannot remove: %s", path, strerror(errno));
        goto out;
      }
      rec->dropped_bytes += size;
      break;
    }
    if (size < TG_WAL_HEADER_SIZE || header_decode(data, &first) != 0 || first != segs[i].first_seq) {
      free(data);
      set_err(err, errlen, "%s: offset 0: bad segment header", path);
      r = -EBADMSG;
      goto out;
    }
    if (rec->segments > 0 && first != rec->next_seq) {
      free(data);
      set_err(err, errlen, "%s: offset 0: starts at sequence %" PRIu64 ", expected %" PRIu64, path, first,
              rec->next_seq);
      r = -EBADMSG;
      goto out;
    }
    if (rec->segments == 0)
      rec->first_seq = first;
    rec->segments++;
    rec->next_seq = first;
    size_t off = TG_WAL_HEADER_SIZE;
    while (off < size) {
      const char *why = NULL;
      uint32_t len = 0;
      if (size - off < TG_WAL_RECORD_OVERHEAD) {
        why = "torn record header";
      } else {
        len = get32(data + off);
        if (len == 0 || len > TG_WAL_MAX_RECORD)
          why = "bad record length";
        else if (size - off - TG_WAL_RECORD_OVERHEAD < len)
          why = "torn record";
        else if (frame_crc(data + off, data + off + TG_WAL_RECORD_OVERHEAD, len) != get32(data + off + 4))
          why = "CRC mismatch";
      }
      /* A bad CRC with a good record right after it is a damaged record in the
       * middle, not a torn tail: truncating would drop acknowledged records. */
      int middle = !last || !repair;
      if (why != NULL && !middle && len > 0 && why[0] == 'C' &&
          frame_ok(data, size, off + TG_WAL_RECORD_OVERHEAD + len)) {
        why = "CRC mismatch before valid records";
        middle = 1;
      }
      if (why != NULL) {
        if (middle) {
          set_err(err, errlen, "%s: offset %zu: %s (record %" PRIu64 ")", path, off, why, rec->next_seq);
          free(data);
          r = -EBADMSG;
          goto out;
        }
        /* The tail: count its frames as best we can, then cut it off. */
        uint64_t frames = 0;
        for (size_t o = off; o < size;) {
          frames++;
          uint32_t l = size - o >= 4 ? get32(data + o) : 0;
          if (l == 0 || l > size - o)
            break;
          o += TG_WAL_RECORD_OVERHEAD + (size_t)l;
        }
        int fd = open(path, O_WRONLY | O_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)off) != 0 || fdatasync(fd) != 0) {
          r = -errno;
          set_err(err, errlen, "%s: cannot truncate at %zu: %s", path, off, strerror(errno));
          if (fd >= 0)
            close(fd);
          free(data);
          goto out;
        }
        close(fd);
        rec->dropped_bytes += size - off;
        rec->dropped_records += frames;
        size = off;
        break;
      }
      if (cb && (r = cb(arg, rec->next_seq, data + off + TG_WAL_RECORD_OVERHEAD, len)) != 0) {
        set_err(err, errlen, "replay stopped at record %" PRIu64 " (%d)", rec->next_seq, r);
        free(data);
        goto out;
      }
      rec->records++;
      rec->next_seq++;
      off += TG_WAL_RECORD_OVERHEAD + (size_t)len;
    }
    rec->bytes += size;
    free(data);
    if (last_name)
      memcpy(last_name, segs[i].name, 25);
  }
  if (rec->segments == 0)
    rec->first_seq = rec->next_seq;
  r = 0;
out:
  free(segs);
  return r;
}

int tg_wal_scan(const char *dir, tg_wal_record_cb cb, void *arg, tg_wal_recovery_t *rec, char *err,
                size_t errlen) {
  tg_wal_recovery_t tmp;
  return scan(dir, 0, cb, arg, rec ? rec : &tmp, NULL, err, errlen);
}

/* Where the last read of this thread stopped: a record boundary verified in
 * that file (same device and inode), so a reader that comes back for the next
 * records (the shipper, round after round) starts there instead of skipping
 * from the header, which made each round cost its offset in the segment. */
typedef struct read_pos {
  dev_t dev;
  ino_t ino;
  uint64_t seq; /* the record at off */
  size_t off;
} read_pos_t;
static _Thread_local read_pos_t last_pos;

/* One segment from its header on, handing records >= from_seq to cb; a bad
 * frame ends the read quietly in the last segment (tail), else -EBADMSG. */
static int read_from_segment(const char *path, uint64_t first, int last, uint64_t from_seq, tg_wal_record_cb cb,
                             void *arg, uint64_t *seq, char *err, size_t errlen) {
  FILE *f = fopen(path, "rbe");
  if (f == NULL) {
    int e = -errno;
    set_err(err, errlen, "%s: %s", path, strerror(errno));
    return e;
  }
  struct stat fst;
  bool known = fstat(fileno(f), &fst) == 0;
  uint8_t h[TG_WAL_HEADER_SIZE], fr[TG_WAL_RECORD_OVERHEAD];
  uint8_t *buf = NULL;
  size_t cap = 0, off = TG_WAL_HEADER_SIZE;
  uint64_t hfirst = 0;
  int r = 0;
  if (fread(h, 1, sizeof h, f) != sizeof h || header_decode(h, &hfirst) != 0 || hfirst != first) {
    if (!last) {
      set_err(err, errlen, "%s: offset 0: bad segment header", path);
      r = -EBADMSG;
    }
    goto out;
  }
  *seq = first;
  if (known && last_pos.dev == fst.st_dev && last_pos.ino == fst.st_ino && last_pos.seq > first &&
      last_pos.seq <= from_seq && fseeko(f, (off_t)last_pos.off, SEEK_SET) == 0) {
    *seq = last_pos.seq;
    off = last_pos.off;
  }
  for (;;) {
    if (known)
      last_pos = (read_pos_t){fst.st_dev, fst.st_ino, *seq, off};
    size_t got = fread(fr, 1, sizeof fr, f);
    if (got == 0 && feof(f))
      break;
    const char *why = NULL;
    uint32_t len = got == sizeof fr ? get32(fr) : 0;
    if (got != sizeof fr)
      why = "torn record header";
    else if (len == 0 || len > TG_WAL_MAX_RECORD)
      why = "bad record length";
    if (why == NULL && *seq < from_seq) {
      if (fseeko(f, (off_t)len, SEEK_CUR) != 0) {
        r = -errno;
        set_err(err, errlen, "%s: %s", path, strerror(errno));
        goto out;
      }
    } else if (why == NULL) {
      if (len > cap) {
        uint8_t *nb = realloc(buf, len);
        if (nb == NULL) {
          set_err(err, errlen, "out of memory");
          r = -ENOMEM;
          goto out;
        }
        buf = nb;
        cap = len;
      }
      if (fread(buf, 1, len, f) != len)
        why = "torn record";
      else if (frame_crc(fr, buf, len) != get32(fr + 4))
        why = "CRC mismatch";
    }
    if (why != NULL) {
      if (!last) {
        set_err(err, errlen, "%s: offset %zu: %s (record %" PRIu64 ")", path, off, why, *seq);
        r = -EBADMSG;
      }
      goto out;
    }
    if (*seq >= from_seq && (r = cb(arg, *seq, buf, len)) != 0) {
      (*seq)++;
      off += TG_WAL_RECORD_OVERHEAD + (size_t)len;
      if (known)
        last_pos = (read_pos_t){fst.st_dev, fst.st_ino, *seq, off};
      goto out;
    }
    (*seq)++;
    off += TG_WAL_RECORD_OVERHEAD + (size_t)len;
  }
  if (ferror(f)) {
    r = -EIO;
    set_err(err, errlen, "%s: read error", path);
  }
out:
  free(buf);
  fclose(f);
  return r;
}

int tg_wal_read_from(const char *dir, uint64_t from_seq, tg_wal_record_cb cb, void *arg, uint64_t *next_seq,
                     char *err, size_t errlen) {
  if (dir == NULL || cb == NULL || from_seq == 0) {
    set_err(err, errlen, "missing dir or callback, or sequence 0");
    return -EINVAL;
  }
  seg_t *segs = NULL;
  size_t nseg = 0;
  uint64_t seq = from_seq;
  int r = list_segments(dir, &segs, &nseg, err, errlen);
  if (r != 0)
    return r;
  if (nseg > 0 && segs[0].first_seq > from_seq) {
    set_err(err, errlen, "%s: sequence %" PRIu64 " is no longer in the log (it starts at %" PRIu64 ")", dir,
            from_seq, segs[0].first_seq);
    r = -ENOENT;
    goto out;
  }
  size_t i = 0;
  while (i + 1 < nseg && segs[i + 1].first_seq <= from_seq)
    i++;
  char path[4096];
  for (; i < nseg; i++) {
    uint64_t s = seq;
    snprintf(path, sizeof path, "%s/%s", dir, segs[i].name);
    r = read_from_segment(path, segs[i].first_seq, i + 1 == nseg, from_seq, cb, arg, &s, err, errlen);
    if (s > seq)
      seq = s;
    if (r != 0)
      break;
    /* A segment that ended short of the next one's first sequence is damaged. */
    if (i + 1 < nseg && s != segs[i + 1].first_seq && segs[i + 1].first_seq > from_seq) {
      set_err(err, errlen, "%s: ends at sequence %" PRIu64 ", the next segment starts at %" PRIu64, path, s,
              segs[i + 1].first_seq);
      r = -EBADMSG;
      break;
    }
  }
out:
  if (next_seq)
    *next_seq = seq;
  free(segs);
  return r;
}

/* ---- the writer ---- */

static int sync_fd(tg_wal_t *w, int fd) {
  atomic_fetch_add_explicit(&w->st_fsyncs, 1, memory_order_relaxed);
  return fdatasync(fd) == 0 ? 0 : -errno;
}

/* A new last segment starting at first_seq, header durable, entry in the dir durable. */
static int segment_create(tg_wal_t *w, uint64_t first_seq) {
  char name[32], path[4096];
  seg_name(name, first_seq);
  snprintf(path, sizeof path, "%s/%s", w->dir, name);
  int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0640);
  if (fd < 0)
    return -errno;
  uint8_t h[TG_WAL_HEADER_SIZE];
  header_encode(h, first_seq);
  int r = tg_file_write_all(fd, h, sizeof h);
  if (r == 0)
    r = sync_fd(w, fd);
  if (r == 0) {
    atomic_fetch_add_explicit(&w->st_fsyncs, 1, memory_order_relaxed);
    r = tg_file_fsync_dir(w->dir);
  }
  if (r != 0) {
    close(fd);
    return r;
  }
  w->fd = fd;
  w->seg_size = TG_WAL_HEADER_SIZE;
  w->seg_records = 0;
  return 0;
}

static int flush_buf(tg_wal_t *w, size_t *used) {
  int r = *used ? tg_file_write_all(w->fd, w->buf, *used) : 0;
  *used = 0;
  return r;
}

/* Writes a batch and makes it durable: 0 or a negative errno. */
static int write_batch(tg_wal_t *w, entry_t *list) {
  size_t used = 0;
  int r;
  for (entry_t *e = list; e; e = e->next) {
    if (w->seg_records > 0 && w->seg_size + e->frame_len > w->o.segment_bytes) {
      if ((r = flush_buf(w, &used)) != 0 || (r = sync_fd(w, w->fd)) != 0)
        return r;
      close(w->fd);
      w->fd = -1;
      pthread_mutex_lock(&w->mu);
      w->used_bytes += TG_WAL_HEADER_SIZE;
      pthread_mutex_unlock(&w->mu);
      if ((r = segment_create(w, e->seq)) != 0)
        return r;
      /* Only now may retention take the closed segment: the new one is durable. */
      pthread_mutex_lock(&w->mu);
      w->cur_first = e->seq;
      pthread_mutex_unlock(&w->mu);
    }
    if (used + e->frame_len > w->buf_cap && (r = flush_buf(w, &used)) != 0)
      return r;
    if (e->frame_len > w->buf_cap) {
      if ((r = tg_file_write_all(w->fd, e->frame, e->frame_len)) != 0)
        return r;
    } else {
      memcpy(w->buf + used, e->frame, e->frame_len);
      used += e->frame_len;
    }
    w->seg_size += e->frame_len;
    w->seg_records++;
  }
  if ((r = flush_buf(w, &used)) != 0)
    return r;
  return sync_fd(w, w->fd);
}

static void deliver(entry_t *list, int status) {
  while (list) {
    entry_t *e = list;
    list = e->next;
    e->next = NULL;
    e->status = status;
    tg_wal_client_t *c = e->client;
    pthread_mutex_lock(&c->mu);
    if (c->done_tail)
      c->done_tail->next = e;
    else
      c->done_head = e;
    c->done_tail = e;
    /* Under the mutex: tg_wal_client_free takes it, so the handle is alive here. */
    uv_async_send(&c->async);
    pthread_mutex_unlock(&c->mu);
  }
}

/* The durable hook, in list (= sequence) order, before any completion is posted. */
static void notify_durable(tg_wal_t *w, const entry_t *list) {
  if (w->o.on_durable == NULL)
    return;
  for (const entry_t *e = list; e; e = e->next)
    w->o.on_durable(w->o.on_durable_arg, e->seq, e->frame + TG_WAL_RECORD_OVERHEAD,
                    e->frame_len - TG_WAL_RECORD_OVERHEAD);
}

static void *writer_main(void *arg) {
  tg_wal_t *w = arg;
  pthread_mutex_lock(&w->mu);
  for (;;) {
    while (w->head == NULL && !w->stopping)
      pthread_cond_wait(&w->cond, &w->mu);
    if (w->head == NULL)
      break;
    if (w->o.batch_interval_us > 0 && !w->stopping && w->failed == 0) {
      uint64_t deadline = w->first_ns + (uint64_t)w->o.batch_interval_us * 1000u;
      struct timespec ts = {(time_t)(deadline / 1000000000u), (long)(deadline % 1000000000u)};
      while (w->queued_bytes < w->o.batch_bytes && !w->stopping && now_ns() < deadline)
        pthread_cond_timedwait(&w->cond, &w->mu, &ts);
    }
    entry_t *list = w->head;
    w->head = w->tail = NULL;
    w->queued_bytes = 0;
    int failed = w->failed;
    pthread_mutex_unlock(&w->mu);

    uint64_t n = 0, bytes = 0;
    for (entry_t *e = list; e; e = e->next) {
      n++;
      bytes += e->frame_len;
    }
    int r = failed;
    if (r == 0) {
      uint64_t t0 = now_ns();
      r = write_batch(w, list);
      if (r == 0) {
        tg_histogram_observe(m_flush_seconds, NULL, (double)(now_ns() - t0) / 1e9);
        tg_histogram_observe(m_batch_records, NULL, (double)n);
        atomic_fetch_add_explicit(&w->st_batches, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&w->st_records, n, memory_order_relaxed);
        atomic_fetch_add_explicit(&w->st_bytes, bytes, memory_order_relaxed);
        notify_durable(w, list);
      }
    }
    pthread_mutex_lock(&w->mu);
    if (r != 0 && w->failed == 0)
      w->failed = r;
    w->pending_bytes -= bytes;
    w->pending_records -= n;
    tg_gauge_set(m_pending_bytes, NULL, (double)w->pending_bytes);
    tg_gauge_set(m_pending_records, NULL, (double)w->pending_records);
    tg_gauge_set(m_used_bytes, NULL, (double)w->used_bytes);
    pthread_mutex_unlock(&w->mu);
    deliver(list, r);
    pthread_mutex_lock(&w->mu);
  }
  pthread_mutex_unlock(&w->mu);
  return NULL;
}

int tg_wal_open(const tg_wal_opts_t *o, tg_wal_t **out, tg_wal_recovery_t *rec, char *err, size_t errlen) {
  tg_wal_recovery_t tmp;
  if (rec == NULL)
    rec = &tmp;
  *out = NULL;
  if (o == NULL || o->dir == NULL || o->segment_bytes < TG_WAL_HEADER_SIZE + TG_WAL_RECORD_OVERHEAD + 1 ||
      o->batch_bytes == 0 || o->queue_records == 0 || o->queue_bytes == 0) {
    set_err(err, errlen, "invalid write-ahead log options");
    return -EINVAL;
  }
  if (mkdir(o->dir, 0750) != 0 && errno != EEXIST) {
    int e = -errno;
    set_err(err, errlen, "%s: %s", o->dir, strerror(errno));
    return e;
  }
  char last[32];
  int r = scan(o->dir, 1, o->replay, o->replay_arg, rec, last, err, errlen);
  if (r != 0)
    return r;

  tg_wal_t *w = calloc(1, sizeof *w);
  if (w == NULL || (w->dir = strdup(o->dir)) == NULL) {
    free(w);
    set_err(err, errlen, "out of memory");
    return -ENOMEM;
  }
  w->o = *o;
  w->o.dir = w->dir;
  w->fd = -1;
  w->next_seq = rec->next_seq;
  w->used_bytes = rec->bytes;
  tg_gauge_set(m_used_bytes, NULL, (double)w->used_bytes);
  tg_gauge_set(m_capacity_bytes, NULL, (double)o->capacity_bytes);
  w->buf_cap = o->batch_bytes < (1u << 20) ? (1u << 20) : o->batch_bytes;
  if ((w->buf = malloc(w->buf_cap)) == NULL) {
    r = -ENOMEM;
    set_err(err, errlen, "out of memory");
    goto fail;
  }
  if (last[0] != '\0') {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", w->dir, last);
    w->fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    struct stat st;
    if (w->fd < 0 || fstat(w->fd, &st) != 0) {
      r = -errno;
      set_err(err, errlen, "%s: %s", path, strerror(errno));
      goto fail;
    }
    w->seg_size = (uint64_t)st.st_size;
    uint64_t first = strtoull(last, NULL, 10);
    w->seg_records = rec->next_seq - first;
    w->cur_first = first;
  } else {
    if ((r = segment_create(w, w->next_seq)) != 0) {
      set_err(err, errlen, "%s: cannot create a segment: %s", w->dir, strerror(-r));
      goto fail;
    }
    w->used_bytes += TG_WAL_HEADER_SIZE;
    w->cur_first = w->next_seq;
    rec->bytes += TG_WAL_HEADER_SIZE;
    rec->segments++;
    rec->first_seq = w->next_seq;
  }
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&w->cond, &ca);
  pthread_condattr_destroy(&ca);
  pthread_mutex_init(&w->mu, NULL);
  pthread_mutex_init(&w->retain_mu, NULL);
  if ((r = pthread_create(&w->thread, NULL, writer_main, w)) != 0) {
    pthread_cond_destroy(&w->cond);
    pthread_mutex_destroy(&w->mu);
    pthread_mutex_destroy(&w->retain_mu);
    r = -r;
    set_err(err, errlen, "cannot start the writer thread: %s", strerror(-r));
    goto fail;
  }
  tg_gauge_set(m_pending_bytes, NULL, 0);
  tg_gauge_set(m_pending_records, NULL, 0);
  *out = w;
  return 0;
fail:
  if (w->fd >= 0)
    close(w->fd);
  free(w->buf);
  free(w->dir);
  free(w);
  return r;
}

void tg_wal_close(tg_wal_t *w) {
  if (w == NULL)
    return;
  pthread_mutex_lock(&w->mu);
  w->stopping = 1;
  pthread_cond_signal(&w->cond);
  pthread_mutex_unlock(&w->mu);
  pthread_join(w->thread, NULL);
  if (w->fd >= 0)
    close(w->fd);
  pthread_cond_destroy(&w->cond);
  pthread_mutex_destroy(&w->mu);
  pthread_mutex_destroy(&w->retain_mu);
  free(w->buf);
  free(w->dir);
  free(w);
}

void tg_wal_stats(tg_wal_t *w, tg_wal_stats_t *out) {
  out->batches = atomic_load_explicit(&w->st_batches, memory_order_relaxed);
  out->fsyncs = atomic_load_explicit(&w->st_fsyncs, memory_order_relaxed);
  out->records = atomic_load_explicit(&w->st_records, memory_order_relaxed);
  out->bytes = atomic_load_explicit(&w->st_bytes, memory_order_relaxed);
}

uint64_t tg_wal_bytes(tg_wal_t *w) {
  pthread_mutex_lock(&w->mu);
  uint64_t b = w->used_bytes - w->pending_bytes;
  pthread_mutex_unlock(&w->mu);
  return b;
}

uint64_t tg_wal_used_bytes(tg_wal_t *w) {
  pthread_mutex_lock(&w->mu);
  uint64_t b = w->used_bytes;
  pthread_mutex_unlock(&w->mu);
  return b;
}

uint64_t tg_wal_capacity(tg_wal_t *w) {
  return w->o.capacity_bytes;
}

/* ---- retention ---- */

int tg_wal_retain(tg_wal_t *w, uint64_t covered_seq, uint64_t max_bytes, uint32_t max_age_s,
                  tg_wal_retain_stats_t *out) {
  return tg_wal_retain_keep(w, covered_seq, max_bytes, max_age_s, 0, out);
}

int tg_wal_retain_keep(tg_wal_t *w, uint64_t covered_seq, uint64_t max_bytes, uint32_t max_age_s,
                       uint32_t keep_age_s, tg_wal_retain_stats_t *out) {
  tg_wal_retain_stats_t st;
  memset(&st, 0, sizeof st);
  pthread_mutex_lock(&w->retain_mu);
  /* The segment being written, and the log's size, as the writer left them:
   * every segment before cur is closed (synced, never written again). */
  pthread_mutex_lock(&w->mu);
  uint64_t cur = w->cur_first;
  uint64_t total = w->used_bytes - w->pending_bytes;
  pthread_mutex_unlock(&w->mu);

  seg_t *segs = NULL;
  size_t n = 0;
  int r = list_segments(w->dir, &segs, &n, NULL, 0);
  if (r != 0)
    goto out;
  struct timespec now;
  clock_gettime(CLOCK_REALTIME, &now);
  char path[4096];
  size_t i = 0;
  /* Oldest first, and only a prefix: removing a later segment and keeping an
   * earlier one would leave a gap that recovery refuses. */
  for (; i + 1 < n && segs[i].first_seq < cur; i++) {
    uint64_t next_first = segs[i + 1].first_seq; /* its last record is next_first - 1 */
    if (next_first > cur || next_first - 1 > covered_seq)
      break; /* not wholly covered by the snapshot (nor is any later one) */
    snprintf(path, sizeof path, "%s/%s", w->dir, segs[i].name);
    struct stat sb;
    if (stat(path, &sb) != 0) {
      r = -errno;
      break;
    }
    uint64_t size = (uint64_t)sb.st_size;
    uint64_t age = now.tv_sec > sb.st_mtim.tv_sec ? (uint64_t)(now.tv_sec - sb.st_mtim.tv_sec) : 0;
    int by_size = max_bytes > 0 && total > max_bytes;
    int by_age = max_age_s > 0 && age > max_age_s;
    if ((!by_size && !by_age) || (keep_age_s > 0 && age <= keep_age_s))
      break;
    if (unlink(path) != 0) {
      r = -errno;
      break;
    }
    total = total > size ? total - size : 0;
    st.removed_segments++;
    st.removed_bytes += size;
  }
  st.first_seq = i < n ? segs[i].first_seq : cur;
  if (st.removed_segments > 0) {
    pthread_mutex_lock(&w->mu);
    w->used_bytes = w->used_bytes > st.removed_bytes ? w->used_bytes - st.removed_bytes : 0;
    tg_gauge_set(m_used_bytes, NULL, (double)w->used_bytes);
    pthread_mutex_unlock(&w->mu);
    tg_counter_add(m_retained, NULL, st.removed_segments);
    atomic_fetch_add_explicit(&w->st_fsyncs, 1, memory_order_relaxed);
    int e = tg_file_fsync_dir(w->dir);
    if (r == 0)
      r = e;
  }
out:
  free(segs);
  st.bytes = tg_wal_bytes(w);
  pthread_mutex_unlock(&w->retain_mu);
  if (out)
    *out = st;
  return r;
}

/* ---- clients ---- */

static void on_async(uv_async_t *a) {
  tg_wal_client_t *c = a->data;
  pthread_mutex_lock(&c->mu);
  entry_t *list = c->done_head;
  c->done_head = c->done_tail = NULL;
  pthread_mutex_unlock(&c->mu);
  while (list) {
    entry_t *e = list;
    list = e->next;
    c->inflight--;
    e->cb(e->arg, e->status, e->seq);
    free(e);
  }
  if (c->release && c->inflight == 0)
    tg_wal_client_free(c);
}

int tg_wal_client_new(tg_wal_t *w, uv_loop_t *loop, tg_wal_client_t **out) {
  *out = NULL;
  tg_wal_client_t *c = calloc(1, sizeof *c);
  if (c == NULL)
    return -ENOMEM;
  c->wal = w;
  int r = uv_async_init(loop, &c->async, on_async);
  if (r != 0) {
    free(c);
    return r;
  }
  c->async.data = c;
  pthread_mutex_init(&c->mu, NULL);
  *out = c;
  return 0;
}

static void on_client_closed(uv_handle_t *h) {
  tg_wal_client_t *c = h->data;
  pthread_mutex_destroy(&c->mu);
  free(c);
}

int tg_wal_client_free(tg_wal_client_t *c) {
  if (c == NULL)
    return 0;
  if (c->inflight > 0)
    return -EBUSY;
  /* Waits out a writer still inside deliver()'s uv_async_send for our last entry. */
  pthread_mutex_lock(&c->mu);
  pthread_mutex_unlock(&c->mu);
  uv_close((uv_handle_t *)&c->async, on_client_closed);
  return 0;
}

void tg_wal_client_release(tg_wal_client_t *c) {
  if (c == NULL || c->release)
    return;
  if (tg_wal_client_free(c) == -EBUSY)
    c->release = true; /* on_async frees it after the last completion */
}

size_t tg_wal_client_inflight(const tg_wal_client_t *c) {
  return c->inflight;
}

int tg_wal_append(tg_wal_client_t *c, const void *payload, size_t len, tg_wal_append_cb cb, void *arg,
                  uint64_t *seq) {
  tg_wal_t *w = c->wal;
  if (len == 0 || cb == NULL || (payload == NULL && len > 0))
    return -EINVAL;
  if (len > TG_WAL_MAX_RECORD || len > w->o.segment_bytes - TG_WAL_HEADER_SIZE - TG_WAL_RECORD_OVERHEAD)
    return -EMSGSIZE;
  uint32_t frame_len = (uint32_t)(TG_WAL_RECORD_OVERHEAD + len);
  entry_t *e = malloc(sizeof *e + frame_len);
  if (e == NULL)
    return -ENOMEM;
  e->next = NULL;
  e->client = c;
  e->cb = cb;
  e->arg = arg;
  e->status = 0;
  e->frame_len = frame_len;
  put32(e->frame, (uint32_t)len);
  memcpy(e->frame + TG_WAL_RECORD_OVERHEAD, payload, len);
  put32(e->frame + 4, frame_crc(e->frame, payload, len));

  int r = 0;
  pthread_mutex_lock(&w->mu);
  if (w->failed != 0)
    r = w->failed;
  else if (w->stopping)
    r = -ESHUTDOWN;
  else if (w->used_bytes + frame_len + TG_WAL_HEADER_SIZE > w->o.capacity_bytes)
    r = -ENOSPC; /* room kept for the header of a segment the record may open */
  else if (w->pending_records + 1 > w->o.queue_records || w->pending_bytes + frame_len > w->o.queue_bytes)
    r = -EAGAIN;
  if (r != 0) {
    pthread_mutex_unlock(&w->mu);
    free(e);
    return r;
  }
  e->seq = w->next_seq++;
  w->used_bytes += frame_len;
  w->pending_bytes += frame_len;
  w->pending_records++;
  int wake = w->head == NULL;
  if (wake) {
    w->head = e;
    w->first_ns = now_ns();
  } else {
    w->tail->next = e;
  }
  w->tail = e;
  w->queued_bytes += frame_len;
  if (w->queued_bytes >= w->o.batch_bytes)
    wake = 1;
  if (wake)
    pthread_cond_signal(&w->cond);
  tg_gauge_set(m_pending_bytes, NULL, (double)w->pending_bytes);
  tg_gauge_set(m_pending_records, NULL, (double)w->pending_records);
  if (seq)
    *seq = e->seq;
  pthread_mutex_unlock(&w->mu);
  c->inflight++;
  return 0;
}
