#include "base/trace.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "base/metrics.h"

/* One recording thread's ring: it writes head, the exporter writes tail.
 * Ended spans are copied in by value, so each span's memory is freed by
 * the thread that allocated it (no cross-thread free, no allocator lock
 * shared with the exporter). */
typedef struct ring {
  _Atomic size_t head, tail;
  size_t mask;
  struct ring *next;
  tg_span_t *slots;
} ring_t;

struct tg_tracer {
  uint64_t gen;             /* tells a thread its cached ring belongs to an older tracer */
  uint64_t sample_below;    /* keep a new trace when the first 8 bytes of its id are below this */
  bool sample_all;
  size_t ring_size;
  pthread_mutex_t mu;       /* registration of rings only */
  _Atomic(ring_t *) rings;
  _Atomic uint64_t dropped;
};

static _Atomic(tg_tracer_t *) g_tracer;
static _Atomic uint64_t g_gen;
static tg_metric_t *m_dropped;

static _Thread_local ring_t *tl_ring;
static _Thread_local uint64_t tl_gen;
static _Thread_local uint64_t rng[4];
static _Thread_local bool rng_seeded;

/* xoshiro256**, seeded per thread from the kernel's CSPRNG: ids need to be
 * unique and unguessable enough for correlation, not secret. */
static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t next_u64(void) {
  if (!rng_seeded) {
    if (getrandom(rng, sizeof rng, 0) != (ssize_t)sizeof rng) {
      struct timespec ts;
      clock_gettime(CLOCK_MONOTONIC, &ts);
      rng[0] = (uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)&rng;
      rng[1] = (uint64_t)ts.tv_sec * 0x9e3779b97f4a7c15ull;
      rng[2] = (uint64_t)(uintptr_t)&tl_ring;
      rng[3] = 0x853c49e6748fea9bull;
    }
    rng_seeded = true;
  }
  uint64_t r = rotl(rng[1] * 5, 7) * 9, t = rng[1] << 17;
  rng[2] ^= rng[0];
  rng[3] ^= rng[1];
  rng[1] ^= rng[2];
  rng[0] ^= rng[3];
  rng[2] ^= t;
  rng[3] = rotl(rng[3], 45);
  return r;
}

/* n bytes, never all zero (an all-zero id is invalid in W3C Trace Context). */
static void random_id(uint8_t *out, size_t n) {
  for (;;) {
    for (size_t i = 0; i < n; i += 8) {
      uint64_t v = next_u64();
      memcpy(out + i, &v, n - i < 8 ? n - i : 8);
    }
    for (size_t i = 0; i < n; i++)
      if (out[i])
        return;
  }
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  return -1;
}

static int unhex(const char *s, uint8_t *out, size_t n) {
  bool nonzero = false;
  for (size_t i = 0; i < n; i++) {
    int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
    if (hi < 0 || lo < 0)
      return -1;
    out[i] = (uint8_t)(hi << 4 | lo);
    nonzero |= out[i] != 0;
  }
  return nonzero ? 0 : 1;
}

int tg_traceparent_parse(const char *s, size_t len, tg_trace_ctx_t *out) {
  if (s == NULL)
    return -EINVAL;
  while (len > 0 && (*s == ' ' || *s == '\t'))
    s++, len--;
  while (len > 0 && (s[len - 1] == ' ' || s[len - 1] == '\t'))
    len--;
  if (len < TG_TRACEPARENT_LEN)
    return -EINVAL;
  uint8_t version;
  if (unhex(s, &version, 1) < 0 || version == 0xff || s[2] != '-' || s[35] != '-' || s[52] != '-')
    return -EINVAL;
  /* Version 00 is exactly 55 characters; a later version may append fields after a '-'. */
  if (version == 0 ? len != TG_TRACEPARENT_LEN : (len > TG_TRACEPARENT_LEN && s[TG_TRACEPARENT_LEN] != '-'))
    return -EINVAL;
  tg_trace_ctx_t c;
  if (unhex(s + 3, c.trace_id, 16) != 0 || unhex(s + 36, c.span_id, 8) != 0 || unhex(s + 53, &c.flags, 1) < 0)
    return -EINVAL;
  *out = c;
  return 0;
}

void tg_traceparent_format(const uint8_t trace_id[16], const uint8_t span_id[8], uint8_t flags, char *out) {
  static const char hx[] = "0123456789abcdef";
  char *p = out;
  *p++ = '0', *p++ = '0', *p++ = '-';
  for (int i = 0; i < 16; i++)
    *p++ = hx[trace_id[i] >> 4], *p++ = hx[trace_id[i] & 15];
  *p++ = '-';
  for (int i = 0; i < 8; i++)
    *p++ = hx[span_id[i] >> 4], *p++ = hx[span_id[i] & 15];
  *p++ = '-';
  *p++ = hx[flags >> 4], *p++ = hx[flags & 15];
  *p = '\0';
}

tg_tracer_t *tg_tracer_new(const tg_tracer_opts_t *opts) {
  static const char *const labels[] = {"reason", NULL};
  m_dropped = tg_metric_new(TG_METRIC_COUNTER, "trace_spans_dropped_total",
                            "Spans not exported: queue_full (the exporter fell behind: raise tracing.queue or "
                            "check the collector), export_failed (the collector refused or was unreachable "
                            "after retries).",
                            labels, NULL, 0);
  tg_tracer_t *t = calloc(1, sizeof *t);
  if (t == NULL)
    return NULL;
  double sample = opts && opts->sample_set ? opts->sample : 1.0;
  uint32_t q = opts && opts->queue ? opts->queue : 8192;
  t->sample_all = sample >= 1.0;
  /* 2^64 * sample, computed where it fits (a double of 2^64 does not convert) */
  t->sample_below = sample <= 0 ? 0 : sample >= 1.0 ? UINT64_MAX : (uint64_t)(sample * 0x1.0p63) << 1;
  t->ring_size = 16;
  while (t->ring_size < q)
    t->ring_size <<= 1;
  t->gen = atomic_fetch_add(&g_gen, 1) + 1;
  pthread_mutex_init(&t->mu, NULL);
  return t;
}

void tg_tracer_free(tg_tracer_t *t) {
  if (t == NULL)
    return;
  ring_t *r = atomic_load(&t->rings);
  while (r) {
    ring_t *next = r->next;
    free(r->slots);
    free(r);
    r = next;
  }
  pthread_mutex_destroy(&t->mu);
  free(t);
}

void tg_trace_set_global(tg_tracer_t *t) { atomic_store_explicit(&g_tracer, t, memory_order_release); }

tg_tracer_t *tg_trace_global(void) { return atomic_load_explicit(&g_tracer, memory_order_acquire); }

static tg_span_t *span_new(tg_tracer_t *t, const char *name, tg_span_kind_t kind) {
  tg_span_t *s = malloc(sizeof *s);
  if (s == NULL)
    return NULL;
  s->tracer = t;
  s->name = name;
  s->kind = kind;
  s->has_parent = false;
  s->status = TG_SPAN_UNSET;
  s->status_msg[0] = '\0';
  s->nattrs = 0;
  s->end_ns = 0;
  random_id(s->span_id, 8);
  s->start_ns = now_ns();
  return s;
}

tg_span_t *tg_tracer_start_server(tg_tracer_t *t, const char *name, const char *traceparent, size_t len) {
  if (t == NULL)
    return NULL;
  tg_trace_ctx_t c;
  bool remote = traceparent && tg_traceparent_parse(traceparent, len, &c) == 0;
  if (remote && !(c.flags & 1))
    return NULL; /* the caller did not sample it */
  if (!remote) {
    random_id(c.trace_id, 16);
    uint64_t head;
    memcpy(&head, c.trace_id, 8);
    if (!t->sample_all && head >= t->sample_below)
      return NULL;
    c.flags = 1;
  }
  tg_span_t *s = span_new(t, name, TG_SPAN_SERVER);
  if (s == NULL)
    return NULL;
  memcpy(s->trace_id, c.trace_id, 16);
  s->flags = 1;
  if (remote) {
    memcpy(s->parent_id, c.span_id, 8);
    s->has_parent = true;
  }
  return s;
}

tg_span_t *tg_span_start_server(const char *name, const char *traceparent, size_t len) {
  tg_tracer_t *t = atomic_load_explicit(&g_tracer, memory_order_acquire);
  if (t == NULL)
    return NULL;
  return tg_tracer_start_server(t, name, traceparent, len);
}

tg_span_t *tg_span_start_root(const char *name, tg_span_kind_t kind) {
  tg_span_t *s = tg_span_start_server(name, NULL, 0);
  if (s)
    s->kind = kind;
  return s;
}

tg_span_t *tg_span_start(const char *name, const tg_span_t *parent, tg_span_kind_t kind) {
  if (parent == NULL)
    return NULL;
  tg_span_t *s = span_new(parent->tracer, name, kind);
  if (s == NULL)
    return NULL;
  memcpy(s->trace_id, parent->trace_id, 16);
  memcpy(s->parent_id, parent->span_id, 8);
  s->has_parent = true;
  s->flags = parent->flags;
  return s;
}

void tg_span_ref(const tg_span_t *s, tg_span_ref_t *ref) {
  if (s == NULL) {
    ref->tracer = NULL;
    return;
  }
  ref->tracer = s->tracer;
  memcpy(ref->trace_id, s->trace_id, 16);
  memcpy(ref->span_id, s->span_id, 8);
  ref->flags = s->flags;
}

tg_span_t *tg_span_start_ref(const char *name, const tg_span_ref_t *ref, tg_span_kind_t kind) {
  if (ref->tracer == NULL)
    return NULL;
  tg_span_t *s = span_new(ref->tracer, name, kind);
  if (s == NULL)
    return NULL;
  memcpy(s->trace_id, ref->trace_id, 16);
  memcpy(s->parent_id, ref->span_id, 8);
  s->has_parent = true;
  s->flags = ref->flags;
  return s;
}

static tg_span_attr_t *attr(tg_span_t *s, const char *key) {
  if (s->nattrs >= TG_SPAN_MAX_ATTRS)
    return NULL;
  tg_span_attr_t *a = &s->attrs[s->nattrs++];
  a->key = key;
  return a;
}

void tg_span_set_str(tg_span_t *s, const char *key, const char *value) {
  tg_span_attr_t *a;
  if (s == NULL || (a = attr(s, key)) == NULL)
    return;
  a->is_int = false;
  snprintf(a->s, sizeof a->s, "%s", value ? value : "");
}

void tg_span_set_int(tg_span_t *s, const char *key, int64_t value) {
  tg_span_attr_t *a;
  if (s == NULL || (a = attr(s, key)) == NULL)
    return;
  a->is_int = true;
  a->i = value;
}

void tg_span_set_error(tg_span_t *s, const char *msg) {
  if (s == NULL)
    return;
  s->status = TG_SPAN_ERROR;
  snprintf(s->status_msg, sizeof s->status_msg, "%s", msg ? msg : "");
}

void tg_span_set_ok(tg_span_t *s) {
  if (s)
    s->status = TG_SPAN_OK;
}

static ring_t *my_ring(tg_tracer_t *t) {
  if (tl_ring && tl_gen == t->gen)
    return tl_ring;
  ring_t *r = calloc(1, sizeof *r);
  if (r == NULL || (r->slots = calloc(t->ring_size, sizeof *r->slots)) == NULL) {
    free(r);
    return NULL;
  }
  r->mask = t->ring_size - 1;
  pthread_mutex_lock(&t->mu);
  r->next = atomic_load(&t->rings);
  atomic_store_explicit(&t->rings, r, memory_order_release);
  pthread_mutex_unlock(&t->mu);
  tl_ring = r;
  tl_gen = t->gen;
  return r;
}

void tg_span_end(tg_span_t *s) {
  if (s == NULL)
    return;
  tg_tracer_t *t = s->tracer;
  s->end_ns = now_ns();
  ring_t *r = my_ring(t);
  if (r) {
    size_t head = atomic_load_explicit(&r->head, memory_order_relaxed);
    if (head - atomic_load_explicit(&r->tail, memory_order_acquire) <= r->mask) {
      tg_span_t *slot = &r->slots[head & r->mask];
      memcpy(slot, s, offsetof(tg_span_t, attrs) + s->nattrs * sizeof s->attrs[0]);
      atomic_store_explicit(&r->head, head + 1, memory_order_release);
      free(s);
      return;
    }
  }
  free(s);
  tg_trace_count_dropped(t, "queue_full", 1);
}

void tg_span_finish(tg_span_t **sp, const char *error) {
  if (*sp == NULL)
    return;
  if (error)
    tg_span_set_error(*sp, error);
  tg_span_end(*sp);
  *sp = NULL;
}

int tg_span_traceparent(const tg_span_t *s, char *out) {
  if (s == NULL)
    return -1;
  tg_traceparent_format(s->trace_id, s->span_id, s->flags, out);
  return 0;
}

size_t tg_trace_drain(tg_tracer_t *t, tg_span_t *out, size_t max) {
  size_t n = 0;
  for (ring_t *r = atomic_load_explicit(&t->rings, memory_order_acquire); r && n < max; r = r->next) {
    size_t tail = atomic_load_explicit(&r->tail, memory_order_relaxed);
    size_t head = atomic_load_explicit(&r->head, memory_order_acquire);
    while (tail != head && n < max) {
      const tg_span_t *s = &r->slots[tail++ & r->mask];
      memcpy(&out[n++], s, offsetof(tg_span_t, attrs) + s->nattrs * sizeof s->attrs[0]);
    }
    atomic_store_explicit(&r->tail, tail, memory_order_release);
  }
  return n;
}

size_t tg_trace_pending(tg_tracer_t *t) {
  size_t n = 0;
  for (ring_t *r = atomic_load_explicit(&t->rings, memory_order_acquire); r; r = r->next)
    n += atomic_load_explicit(&r->head, memory_order_acquire) - atomic_load_explicit(&r->tail, memory_order_acquire);
  return n;
}

void tg_span_free(tg_span_t *s) { free(s); }

void tg_trace_count_dropped(tg_tracer_t *t, const char *reason, uint64_t n) {
  const char *labels[] = {reason};
  atomic_fetch_add_explicit(&t->dropped, n, memory_order_relaxed);
  if (m_dropped)
    tg_counter_add(m_dropped, labels, n);
}

uint64_t tg_trace_dropped(const tg_tracer_t *t) { return atomic_load_explicit(&t->dropped, memory_order_relaxed); }
