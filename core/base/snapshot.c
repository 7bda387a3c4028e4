#include "base/snapshot.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#define CACHE_LINE 64

/* One published snapshot. next links the retired list (writer side only). */
typedef struct version {
  void *data;
  struct version *next;
} version_t;

/* "My thread holds count pins on ver." Written by its owner thread only, read
 * by the collector. A record with count 0 protects nothing, whatever its ver.
 * One cache line each so that readers never write a shared line. */
typedef struct record {
  _Atomic(version_t *) ver;
  atomic_ulong count;
  struct record *next; /* set before the record is published, then immutable */
} __attribute__((aligned(CACHE_LINE))) record_t;

struct tg_snapshot_reader {
  tg_snapshot_t *s;
  record_t *last;              /* owner only: the record of the last slow-path pin */
  _Atomic(record_t *) records; /* owner prepends; the collector walks under s->lock */
  tg_snapshot_reader_t *prev, *next; /* under s->lock */
} __attribute__((aligned(CACHE_LINE)));

struct tg_snapshot {
  _Atomic(version_t *) current;
  void (*destroy)(void *data);
  pthread_mutex_t lock;        /* writers, collector, reader list */
  version_t *retired;          /* under lock */
  size_t nretired;             /* under lock */
  tg_snapshot_reader_t *readers; /* under lock */
};

static void *alloc_line(size_t size) {
  size = (size + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE;
  return aligned_alloc(CACHE_LINE, size);
}

tg_snapshot_t *tg_snapshot_new(void (*destroy)(void *data)) {
  tg_snapshot_t *s = alloc_line(sizeof(*s));
  if (!s)
    return NULL;
  atomic_init(&s->current, NULL);
  s->destroy = destroy;
  s->retired = NULL;
  s->nretired = 0;
  s->readers = NULL;
  if (pthread_mutex_init(&s->lock, NULL) != 0) {
    free(s);
    return NULL;
  }
  return s;
}

/* Caller holds s->lock. The count load is seq_cst: it pairs with the reader's
 * seq_cst (count = 1; re-read current) so that one of the two sees the other. */
static int is_pinned(tg_snapshot_t *s, version_t *v) {
  for (tg_snapshot_reader_t *r = s->readers; r; r = r->next)
    for (record_t *rec = atomic_load_explicit(&r->records, memory_order_acquire); rec;
         rec = rec->next)
      if (atomic_load_explicit(&rec->count, memory_order_seq_cst) > 0 &&
          atomic_load_explicit(&rec->ver, memory_order_relaxed) == v)
        return 1;
  return 0;
}

size_t tg_snapshot_collect(tg_snapshot_t *s) {
  version_t *dead = NULL;
  pthread_mutex_lock(&s->lock);
  for (version_t **pv = &s->retired; *pv;) {
    version_t *v = *pv;
    if (is_pinned(s, v)) {
      pv = &v->next;
      continue;
    }
    *pv = v->next;
    v->next = dead;
    dead = v;
    s->nretired--;
  }
  size_t left = s->nretired;
  pthread_mutex_unlock(&s->lock);
  /* Destroy outside the lock: freeing a large catalog must not stall
   * publishers or worker start/stop. */
  while (dead) {
    version_t *next = dead->next;
    s->destroy(dead->data);
    free(dead);
    dead = next;
  }
  return left;
}

size_t tg_snapshot_retired(tg_snapshot_t *s) {
  pthread_mutex_lock(&s->lock);
  size_t n = s->nretired;
  pthread_mutex_unlock(&s->lock);
  return n;
}

int tg_snapshot_publish(tg_snapshot_t *s, void *data) {
  version_t *v = malloc(sizeof(*v));
  if (!v)
    return -ENOMEM;
  v->data = data;
  v->next = NULL;
  pthread_mutex_lock(&s->lock);
  version_t *old = atomic_exchange_explicit(&s->current, v, memory_order_seq_cst);
  if (old) {
    old->next = s->retired;
    s->retired = old;
    s->nretired++;
  }
  pthread_mutex_unlock(&s->lock);
  tg_snapshot_collect(s);
  return 0;
}

tg_snapshot_reader_t *tg_snapshot_reader_register(tg_snapshot_t *s) {
  tg_snapshot_reader_t *r = alloc_line(sizeof(*r));
  if (!r)
    return NULL;
  r->s = s;
  r->last = NULL;
  atomic_init(&r->records, NULL);
  r->prev = NULL;
  pthread_mutex_lock(&s->lock);
  r->next = s->readers;
  if (s->readers)
    s->readers->prev = r;
  s->readers = r;
  pthread_mutex_unlock(&s->lock);
  return r;
}

static size_t pins_held(tg_snapshot_reader_t *r) {
  size_t n = 0;
  for (record_t *rec = atomic_load_explicit(&r->records, memory_order_relaxed); rec;
       rec = rec->next)
    n += atomic_load_explicit(&rec->count, memory_order_acquire);
  return n;
}

static void free_reader(tg_snapshot_reader_t *r) {
  record_t *rec = atomic_load_explicit(&r->records, memory_order_relaxed);
  while (rec) {
    record_t *next = rec->next;
    free(rec);
    rec = next;
  }
  free(r);
}

size_t tg_snapshot_reader_unregister(tg_snapshot_reader_t *r) {
  if (!r)
    return 0;
  /* A pin still out (a request that never finished) keeps its records, and
   * so its snapshots, alive until tg_snapshot_free: a leak, not a crash. */
  size_t held = pins_held(r);
  if (held > 0)
    return held;
  tg_snapshot_t *s = r->s;
  pthread_mutex_lock(&s->lock);
  if (r->prev)
    r->prev->next = r->next;
  else
    s->readers = r->next;
  if (r->next)
    r->next->prev = r->prev;
  pthread_mutex_unlock(&s->lock);
  free_reader(r);
  return 0;
}

/* A record of r holding v, or else a free one (count 0), or else a new one. */
static record_t *find_record(tg_snapshot_reader_t *r, version_t *v, int *holds) {
  record_t *free_rec = NULL;
  for (record_t *rec = atomic_load_explicit(&r->records, memory_order_relaxed); rec;
       rec = rec->next) {
    unsigned long c = atomic_load_explicit(&rec->count, memory_order_relaxed);
    if (c > 0 && atomic_load_explicit(&rec->ver, memory_order_relaxed) == v) {
      *holds = 1;
      return rec;
    }
    if (c == 0 && !free_rec)
      free_rec = rec;
  }
  *holds = 0;
  if (free_rec)
    return free_rec;
  record_t *rec = alloc_line(sizeof(*rec));
  if (!rec)
    return NULL;
  atomic_init(&rec->ver, NULL);
  atomic_init(&rec->count, 0);
  rec->next = atomic_load_explicit(&r->records, memory_order_relaxed);
  atomic_store_explicit(&r->records, rec, memory_order_release);
  return rec;
}

static tg_snapshot_pin_t pin_of(record_t *rec, version_t *v) {
  tg_snapshot_pin_t pin = {v->data, rec};
  return pin;
}

tg_snapshot_pin_t tg_snapshot_acquire(tg_snapshot_reader_t *r) {
  tg_snapshot_pin_t none = {NULL, NULL};
  version_t *v = atomic_load_explicit(&r->s->current, memory_order_acquire);
  if (!v)
    return none;
  /* Fast path: this thread already pins v, so v cannot be freed under us. */
  record_t *rec = r->last;
  if (rec && atomic_load_explicit(&rec->ver, memory_order_relaxed) == v) {
    unsigned long c = atomic_load_explicit(&rec->count, memory_order_relaxed);
    if (c > 0) {
      atomic_store_explicit(&rec->count, c + 1, memory_order_relaxed);
      return pin_of(rec, v);
    }
  }
  for (;;) {
    int holds;
    rec = find_record(r, v, &holds);
    if (!rec)
      return none;
    unsigned long c = atomic_load_explicit(&rec->count, memory_order_relaxed);
    if (holds) {
      atomic_store_explicit(&rec->count, c + 1, memory_order_relaxed);
      break;
    }
    atomic_store_explicit(&rec->ver, v, memory_order_relaxed);
    atomic_store_explicit(&rec->count, 1, memory_order_seq_cst);
    /* Still current after our record became visible: any collector that
     * could retire v from now on will see the record. */
    version_t *now = atomic_load_explicit(&r->s->current, memory_order_seq_cst);
    if (now == v)
      break;
    atomic_store_explicit(&rec->count, 0, memory_order_relaxed);
    if (!now)
      return none;
    v = now;
  }
  r->last = rec;
  return pin_of(rec, v);
}

void tg_snapshot_release(tg_snapshot_reader_t *r, tg_snapshot_pin_t pin) {
  (void)r;
  record_t *rec = pin.handle;
  if (!rec)
    return;
  unsigned long c = atomic_load_explicit(&rec->count, memory_order_relaxed);
  /* release: our reads of the snapshot happen before the collector frees it. */
  atomic_store_explicit(&rec->count, c - 1, memory_order_release);
}

void tg_snapshot_free(tg_snapshot_t *s) {
  if (!s)
    return;
  version_t *v = atomic_load_explicit(&s->current, memory_order_acquire);
  if (v) {
    s->destroy(v->data);
    free(v);
  }
  while (s->retired) {
    v = s->retired;
    s->retired = v->next;
    s->destroy(v->data);
    free(v);
  }
  while (s->readers) {
    tg_snapshot_reader_t *r = s->readers;
    s->readers = r->next;
    free_reader(r);
  }
  pthread_mutex_destroy(&s->lock);
  free(s);
}
