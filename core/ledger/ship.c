#include "ledger/ship.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/file.h"
#include "base/log.h"
#include "base/metrics.h"
#include "base/redisconn.h"
#include "ledger/wal.h"

#define MAX_INSTANCE 128
#define KEY_PREFIX "tg:txlog:"
#define CHUNK (TG_REDISCONN_MAX_ARGS - 3) /* key, first seq, need, then payloads */
#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define POLL_MS 1000
#define NMARKS 64

/* KEYS[1] the stream; ARGV[1] the first record's sequence, ARGV[2] the
 * sequence the stream must already hold (0: none; a later chunk of a round
 * names the end of the chunk before it), ARGV[3..] the payloads in order.
 * Ids at or below the stream's top are skipped (already shipped), and so is
 * an XADD Redis refuses as "equal or smaller" (a top that was trimmed).
 * Returns {last id's sequence as a string, records added}. */
static const char ship_script[] =
    "local key = KEYS[1]\n"
    "local first, need = tonumber(ARGV[1]), tonumber(ARGV[2])\n"
    "local last = 0\n"
    "local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)\n"
    "if #top > 0 then last = tonumber(string.match(top[1][1], '^(%d+)-')) end\n"
    "if last < need then return redis.error_reply('ERR tollgate ship: gap before ' .. ARGV[1]) end\n"
    "local added = 0\n"
    "for i = 3, #ARGV do\n"
    "  local seq = first + i - 3\n"
    "  if seq > last then\n"
    "    local r = redis.pcall('XADD', key, string.format('%d-1', seq), 'rec', ARGV[i])\n"
    "    if type(r) == 'table' and r.err then\n"
    "      if not string.find(r.err, 'equal or smaller', 1, true) then return r end\n"
    "    else\n"
    "      added = added + 1\n"
    "    end\n"
    "    last = seq\n"
    "  end\n"
    "end\n"
    "return {string.format('%d', last), added}\n";

/* KEYS[1] the stream: the sequence of its last entry as a string, "0" when none. */
static const char top_script[] =
    "local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)\n"
    "if #top == 0 then return '0' end\n"
    "return string.match(top[1][1], '^(%d+)-')\n";

enum { SCRIPT_SHIP, SCRIPT_TOP };

static tg_metric_t *m_errors, *m_shipped, *m_lag, *m_pending;
static const char *const redis_label[] = {"redis"};

typedef struct chunk {
  struct round *round;
  int status; /* 0 ok, else failed */
  uint64_t last;
  uint64_t added;
} chunk_t;

/* One round in flight: its chunks answer in order on the one connection. */
typedef struct round {
  tg_ship_t *s;
  size_t nchunks, pending;
  uint64_t end; /* sequence of its last record */
  chunk_t chunks[];
} round_t;

/* Records up to seq were known durable at t_ns: the lag's reference. */
typedef struct mark {
  uint64_t seq;
  uint64_t t_ns;
} mark_t;

/* Records read for a round (owned copies). */
typedef struct reading {
  size_t n, cap, limit;
  uint64_t first;
  char **data;
  size_t *lens;
} reading_t;

struct tg_ship {
  uv_loop_t *loop;
  tg_redisconn_t *conn;
  char *wal_dir, *ckpt_path, *key;
  size_t key_len;
  uint32_t batch;
  uint64_t durable0;        /* opts.durable_seq */
  _Atomic uint64_t shipped; /* highest sequence the stream holds, as far as known */
  _Atomic uint64_t kicked;  /* highest durable sequence told by tg_ship_kick */
  uint64_t ckpt_written;    /* what ship.ckpt holds */
  uint64_t ckpt_at_ns;      /* when it was last written */
  bool synced;              /* the stream's top was read once */
  bool busy;                /* a call or round in flight */
  bool retrying;            /* retry timer armed */
  bool closing;
  bool more;                /* the last round was full: go again at once */
  uint32_t backoff_ms;
  mark_t marks[NMARKS];
  size_t nmarks;
  _Atomic uint64_t oldest_ns; /* marks[0].t_ns, 0 when none: the lag for other threads */
  uv_async_t async;
  uv_timer_t poll, retry;
  int handles; /* still open, the memory goes with the last */
};

int tg_ship_metrics_init(void) {
  static const char *const store[] = {"store", NULL};
  m_errors = tg_metric_new(TG_METRIC_COUNTER, "txlog_store_errors_total",
                           "Failed calls to the store the log is shipped to.", store, NULL, 0);
  m_shipped = tg_metric_new(TG_METRIC_COUNTER, "txlog_shipped_records_total",
                            "Log records added to the shared store.", NULL, NULL, 0);
  m_lag = tg_metric_new(TG_METRIC_GAUGE, "txlog_ship_lag_seconds",
                        "Age of the oldest log record not yet shipped (0: none pending); it grows while the "
                        "store is down, and the log keeps the records until they are shipped.",
                        NULL, NULL, 0);
  m_pending = tg_metric_new(TG_METRIC_GAUGE, "txlog_ship_pending_records",
                            "Durable log records not yet in the shared store (they hold their segments: a "
                            "long outage fills the log).",
                            NULL, NULL, 0);
  return m_errors && m_shipped && m_lag && m_pending ? 0 : -ENOMEM;
}

static void round_start(tg_ship_t *s);

/* Records up to here may be shipped: never one the log could still lose. */
static uint64_t durable_bound(tg_ship_t *s) {
  uint64_t k = atomic_load(&s->kicked);
  return k > s->durable0 ? k : s->durable0;
}

static uint64_t store_seq(const char *p, size_t len, bool *ok) {
  uint64_t v = 0;
  *ok = len > 0 && len < 21;
  for (size_t i = 0; *ok && i < len; i++) {
    if (p[i] < '0' || p[i] > '9')
      *ok = false;
    else
      v = v * 10 + (uint64_t)(p[i] - '0');
  }
  return v;
}

/* ---- checkpoint and lag ---- */

static int ckpt_write(tg_ship_t *s) {
  uint64_t v = atomic_load(&s->shipped);
  if (v == s->ckpt_written)
    return 0;
  char buf[32];
  int n = snprintf(buf, sizeof buf, "%" PRIu64 "\n", v);
  int r = tg_file_write_atomic(s->ckpt_path, buf, (size_t)n, 0644);
  if (r != 0) {
    tg_log(TG_LOG_WARN, "log shipping: cannot write the checkpoint", "path", s->ckpt_path, "error",
           strerror(-r), NULL);
    return r;
  }
  s->ckpt_written = v;
  s->ckpt_at_ns = uv_hrtime();
  return 0;
}

static int ckpt_read(const char *path, uint64_t *out, char *err, size_t errlen) {
  uint8_t *data = NULL;
  size_t size = 0;
  int shrank = 0;
  *out = 0;
  int r = tg_file_read(path, &data, &size, &shrank);
  if (r == -ENOENT)
    return 0;
  if (r != 0) {
    snprintf(err, errlen, "log shipping: %s: %s", path, strerror(-r));
    return r;
  }
  size_t len = size;
  while (len > 0 && (data[len - 1] == '\n' || data[len - 1] == '\r'))
    len--;
  bool ok;
  *out = store_seq((const char *)data, len, &ok);
  free(data);
  if (!ok) {
    snprintf(err, errlen, "log shipping: %s: not a sequence number", path);
    return -EBADMSG;
  }
  return 0;
}

static void mark(tg_ship_t *s, uint64_t seq) {
  if (s->nmarks > 0 && s->marks[s->nmarks - 1].seq >= seq)
    return;
  if (s->nmarks == NMARKS) /* the newest mark takes the later records: their lag reads high, never low */
    s->marks[NMARKS - 1].seq = seq;
  else
    s->marks[s->nmarks++] = (mark_t){seq, uv_hrtime()};
  if (s->nmarks == 1)
    atomic_store(&s->oldest_ns, s->marks[0].t_ns);
}

static void lag_update(tg_ship_t *s) {
  uint64_t shipped = atomic_load(&s->shipped);
  size_t i = 0;
  while (i < s->nmarks && s->marks[i].seq <= shipped)
    i++;
  if (i > 0) {
    memmove(s->marks, s->marks + i, (s->nmarks - i) * sizeof s->marks[0]);
    s->nmarks -= i;
  }
  atomic_store(&s->oldest_ns, s->nmarks ? s->marks[0].t_ns : 0);
  double lag = s->nmarks ? (double)(uv_hrtime() - s->marks[0].t_ns) / 1e9 : 0;
  tg_gauge_set(m_lag, NULL, lag);
  uint64_t durable = tg_ship_durable_seq(s);
  tg_gauge_set(m_pending, NULL, durable > shipped ? (double)(durable - shipped) : 0);
}

static void advance(tg_ship_t *s, uint64_t seq) {
  if (seq > atomic_load(&s->shipped))
    atomic_store(&s->shipped, seq);
}

/* ---- failure and backoff ---- */

static void on_retry(uv_timer_t *t) {
  tg_ship_t *s = t->data;
  s->retrying = false;
  round_start(s);
}

/* Counts one error per failed round or call (not what tg_ship_free cancels). */
static void failed(tg_ship_t *s, int status, const redisReply *rep) {
  if (s->closing)
    return;
  tg_counter_add(m_errors, redis_label, 1);
  if (rep != NULL && rep->type == REDIS_REPLY_ERROR)
    tg_redisconn_set_error(s->conn, "error reply", rep->str);
  else if (rep != NULL)
    tg_redisconn_set_error(s->conn, "unexpected reply", NULL);
  tg_redisconn_log_down(s->conn, status == -ETIMEDOUT ? "timeout" : status == -ECONNREFUSED ? "unavailable" : "error");
  if (s->retrying)
    return;
  uint32_t d = s->backoff_ms;
  uint32_t delay = d / 2 + (uint32_t)(rand() % (int)(d / 2 + 1));
  s->backoff_ms = d * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : d * 2;
  s->retrying = true;
  uv_timer_start(&s->retry, on_retry, delay, 0);
}

/* ---- the stream's top, once at start ---- */

static void top_cb(void *arg, int status, const redisReply *rep) {
  tg_ship_t *s = arg;
  s->busy = false;
  bool ok = false;
  uint64_t top = 0;
  if (status == 0 && rep->type == REDIS_REPLY_STRING)
    top = store_seq(rep->str, rep->len, &ok);
  if (!ok) {
    failed(s, status, status == 0 ? rep : NULL);
    return;
  }
  advance(s, top);
  s->synced = true;
  s->backoff_ms = BACKOFF_MIN_MS;
  if (!s->closing)
    round_start(s);
}

/* ---- a round ---- */

static int collect(void *arg, uint64_t seq, const void *payload, size_t len) {
  reading_t *rd = arg;
  if (rd->n == 0)
    rd->first = seq;
  char *copy = malloc(len ? len : 1);
  if (copy == NULL)
    return -ENOMEM;
  memcpy(copy, payload, len);
  rd->data[rd->n] = copy;
  rd->lens[rd->n] = len;
  rd->n++;
  return rd->n == rd->limit ? 1 : 0; /* 1: full, stop */
}

static void round_done(round_t *rd) {
  tg_ship_t *s = rd->s;
  s->busy = false;
  int status = 0;
  for (size_t i = 0; i < rd->nchunks; i++) {
    chunk_t *c = &rd->chunks[i];
    if (c->status != 0) {
      status = c->status;
      break;
    }
    advance(s, c->last);
    tg_counter_add(m_shipped, NULL, c->added);
  }
  free(rd);
  lag_update(s);
  if (s->closing)
    return;
  if (status != 0) {
    failed(s, status, NULL);
    return;
  }
  s->backoff_ms = BACKOFF_MIN_MS;
  if (s->more || atomic_load(&s->kicked) > atomic_load(&s->shipped))
    round_start(s);
}

static void chunk_cb(void *arg, int status, const redisReply *rep) {
  chunk_t *c = arg;
  round_t *rd = c->round;
  bool ok = false;
  if (status == 0 && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
      rep->element[0]->type == REDIS_REPLY_STRING && rep->element[1]->type == REDIS_REPLY_INTEGER) {
    c->last = store_seq(rep->element[0]->str, rep->element[0]->len, &ok);
    c->added = (uint64_t)rep->element[1]->integer;
  }
  if (!ok) {
    c->status = status != 0 ? status : -EIO;
    if (status == 0) {
      tg_redisconn_set_error(rd->s->conn, "unexpected reply", rep->type == REDIS_REPLY_ERROR ? rep->str : NULL);
    }
  }
  if (--rd->pending == 0)
    round_done(rd);
}

static void reading_free(reading_t *r) {
  for (size_t i = 0; i < r->n; i++)
    free(r->data[i]);
  free(r->data);
  free(r->lens);
}

static void round_start(tg_ship_t *s) {
  if (s->busy || s->closing || s->retrying)
    return;
  s->more = false;
  if (!s->synced) {
    /* Whatever the log holds beyond the checkpoint counts for the lag from now,
     * Redis answering or not. */
    uint64_t bound = durable_bound(s);
    if (bound != UINT64_MAX && bound > atomic_load(&s->shipped))
      mark(s, bound);
    reading_t peek = {.limit = bound == UINT64_MAX ? 1 : 0};
    char *d1[1];
    size_t l1[1];
    peek.data = d1;
    peek.lens = l1;
    if (peek.limit && tg_wal_read_from(s->wal_dir, atomic_load(&s->shipped) + 1, collect, &peek, NULL, NULL, 0) >= 0 &&
        peek.n == 1) {
      mark(s, peek.first);
      free(d1[0]);
    }
    const char *argv[] = {s->key};
    size_t lens[] = {s->key_len};
    tg_redisconn_eval_t e = {.script = SCRIPT_TOP, .nkeys = 1, .argc = 1, .argv = argv, .lens = lens};
    if (tg_redisconn_call(s->conn, &e, NULL, top_cb, s) == 0)
      s->busy = true;
    else
      failed(s, -ENOMEM, NULL);
    return;
  }
  uint64_t from = atomic_load(&s->shipped) + 1, bound = durable_bound(s);
  if (bound < from) {
    lag_update(s);
    return;
  }
  reading_t rd = {.limit = bound - from + 1 < s->batch ? (size_t)(bound - from + 1) : s->batch};
  rd.data = calloc(s->batch, sizeof *rd.data);
  rd.lens = calloc(s->batch, sizeof *rd.lens);
  if (rd.data == NULL || rd.lens == NULL) {
    reading_free(&rd);
    failed(s, -ENOMEM, NULL);
    return;
  }
  char err[256] = "";
  uint64_t next = from;
  int r = tg_wal_read_from(s->wal_dir, from, collect, &rd, &next, err, sizeof err);
  if (r < 0) {
    tg_log(TG_LOG_ERROR, "log shipping: cannot read the log", "error", err, NULL);
    reading_free(&rd);
    lag_update(s);
    if (!s->retrying) {
      s->retrying = true;
      uv_timer_start(&s->retry, on_retry, BACKOFF_MAX_MS, 0);
    }
    return;
  }
  s->more = r == 1 && rd.n == s->batch;
  if (rd.n == 0) {
    reading_free(&rd);
    lag_update(s);
    return;
  }
  mark(s, rd.first + rd.n - 1);
  size_t nchunks = (rd.n + CHUNK - 1) / CHUNK;
  round_t *round = calloc(1, sizeof *round + nchunks * sizeof(chunk_t));
  if (round == NULL) {
    reading_free(&rd);
    failed(s, -ENOMEM, NULL);
    return;
  }
  round->s = s;
  round->end = rd.first + rd.n - 1;
  s->busy = true;
  for (size_t i = 0; i < nchunks; i++) {
    size_t lo = i * CHUNK, n = rd.n - lo < CHUNK ? rd.n - lo : CHUNK;
    char first[24], need[24];
    uint64_t fseq = rd.first + lo;
    snprintf(first, sizeof first, "%" PRIu64, fseq);
    snprintf(need, sizeof need, "%" PRIu64, i == 0 ? 0 : fseq - 1);
    const char *argv[TG_REDISCONN_MAX_ARGS] = {s->key, first, need};
    size_t lens[TG_REDISCONN_MAX_ARGS] = {s->key_len, strlen(first), strlen(need)};
    for (size_t j = 0; j < n; j++) {
      argv[3 + j] = rd.data[lo + j];
      lens[3 + j] = rd.lens[lo + j];
    }
    tg_redisconn_eval_t e = {.script = SCRIPT_SHIP, .nkeys = 1, .argc = (int)(3 + n), .argv = argv, .lens = lens};
    round->chunks[i].round = round;
    round->pending++;
    round->nchunks++;
    if (tg_redisconn_call(s->conn, &e, NULL, chunk_cb, &round->chunks[i]) != 0) {
      round->pending--;
      round->chunks[i].status = -ENOMEM;
      break; /* the chunks after it would fail their gap check anyway */
    }
  }
  reading_free(&rd);
  if (round->pending == 0)
    round_done(round);
}

/* ---- handles ---- */

static void on_async(uv_async_t *a) {
  tg_ship_t *s = a->data;
  uint64_t k = atomic_load(&s->kicked);
  if (k > atomic_load(&s->shipped))
    mark(s, k);
  round_start(s);
}

static void on_poll(uv_timer_t *t) {
  tg_ship_t *s = t->data;
  lag_update(s);
  if (uv_hrtime() - s->ckpt_at_ns >= (uint64_t)POLL_MS * 1000000)
    ckpt_write(s);
  round_start(s);
}

static void on_closed(uv_handle_t *h) {
  tg_ship_t *s = h->data;
  if (--s->handles == 0) {
    free(s->wal_dir);
    free(s->ckpt_path);
    free(s->key);
    free(s);
  }
}

int tg_ship_new(uv_loop_t *loop, const tg_ship_opts_t *o, tg_ship_t **out, char *err, size_t errlen) {
  static const tg_redisconn_script_t scripts[] = {{ship_script, sizeof(ship_script) - 1},
                                                  {top_script, sizeof(top_script) - 1}};
  if (out)
    *out = NULL;
  if (out == NULL || loop == NULL || o == NULL || o->wal_dir == NULL || o->data_dir == NULL ||
      o->instance == NULL || o->instance[0] == '\0' || o->host == NULL) {
    snprintf(err, errlen, "log shipping: missing loop, wal_dir, data_dir, instance or host");
    return -EINVAL;
  }
  if (strlen(o->instance) > MAX_INSTANCE) {
    snprintf(err, errlen, "log shipping: instance id longer than %d bytes", MAX_INSTANCE);
    return -EINVAL;
  }
  tg_ship_t *s = calloc(1, sizeof *s);
  int r = -ENOMEM;
  if (s == NULL)
    goto nomem;
  s->loop = loop;
  s->batch = o->batch ? o->batch : 512;
  s->durable0 = o->durable_seq;
  s->backoff_ms = BACKOFF_MIN_MS;
  s->key_len = strlen(KEY_PREFIX) + strlen(o->instance);
  s->wal_dir = strdup(o->wal_dir);
  s->key = malloc(s->key_len + 1);
  s->ckpt_path = malloc(strlen(o->data_dir) + sizeof("/ship.ckpt"));
  if (s->wal_dir == NULL || s->key == NULL || s->ckpt_path == NULL)
    goto nomem;
  snprintf(s->key, s->key_len + 1, "%s%s", KEY_PREFIX, o->instance);
  sprintf(s->ckpt_path, "%s/ship.ckpt", o->data_dir);
  uint64_t ckpt;
  if ((r = ckpt_read(s->ckpt_path, &ckpt, err, errlen)) != 0)
    goto fail;
  atomic_store(&s->shipped, ckpt);
  s->ckpt_written = ckpt;
  s->ckpt_at_ns = uv_hrtime();
  tg_redisconn_opts_t co = {.host = o->host,
                            .port = o->port,
                            .password = o->password,
                            .db = o->db,
                            .timeout_ms = o->timeout_ms ? o->timeout_ms : 1000,
                            .scripts = scripts,
                            .nscripts = 2,
                            .what = "redis log shipping",
                            .down_msg = "log shipping: redis unavailable, the log keeps the records",
                            .up_msg = "log shipping: redis reachable again",
                            .instance = o->instance};
  if ((r = tg_redisconn_new(loop, &co, &s->conn, err, errlen)) != 0)
    goto fail;
  s->async.data = s->poll.data = s->retry.data = s;
  if ((r = uv_async_init(loop, &s->async, on_async)) != 0) {
    snprintf(err, errlen, "log shipping: %s", uv_strerror(r));
    tg_redisconn_free(s->conn);
    goto fail;
  }
  s->handles = 3;
  uv_timer_init(loop, &s->poll);
  uv_timer_init(loop, &s->retry);
  uv_timer_start(&s->poll, on_poll, POLL_MS, POLL_MS);
  /* The first round once the connection had a chance to come up. */
  s->retrying = true;
  uv_timer_start(&s->retry, on_retry, 0, 0);
  *out = s;
  return 0;
nomem:
  snprintf(err, errlen, "log shipping: out of memory");
  r = -ENOMEM;
fail:
  if (s) {
    free(s->wal_dir);
    free(s->key);
    free(s->ckpt_path);
    free(s);
  }
  return r;
}

void tg_ship_kick(tg_ship_t *s, uint64_t durable_seq) {
  uint64_t k = atomic_load(&s->kicked);
  while (durable_seq > k && !atomic_compare_exchange_weak(&s->kicked, &k, durable_seq))
    ;
  uv_async_send(&s->async);
}

uint64_t tg_ship_shipped_seq(const tg_ship_t *s) {
  return atomic_load(&((tg_ship_t *)s)->shipped);
}

uint64_t tg_ship_durable_seq(const tg_ship_t *s) {
  uint64_t k = atomic_load(&((tg_ship_t *)s)->kicked);
  return k > s->durable0 ? k : s->durable0;
}

double tg_ship_lag_seconds(const tg_ship_t *s) {
  uint64_t t = atomic_load(&((tg_ship_t *)s)->oldest_ns), now = uv_hrtime();
  return t != 0 && now > t ? (double)(now - t) / 1e9 : 0;
}

void tg_ship_free(tg_ship_t *s) {
  if (s == NULL)
    return;
  s->closing = true;
  tg_redisconn_free(s->conn); /* a round in flight completes with -ECANCELED */
  ckpt_write(s);
  uv_close((uv_handle_t *)&s->async, on_closed);
  uv_close((uv_handle_t *)&s->poll, on_closed);
  uv_close((uv_handle_t *)&s->retry, on_closed);
}
