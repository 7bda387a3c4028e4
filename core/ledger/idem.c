#include "ledger/idem.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "base/metrics.h"

#define MAX_SHARDS 64
#define MIN_PER_SHARD 16 /* fewer shards than that for small tables, so the LRU stays meaningful */

static tg_metric_t *m_entries, *m_hits, *m_evictions;

int tg_idem_metrics_init(void) {
  static const char *const result[] = {"result", NULL};
  m_entries = tg_metric_new(TG_METRIC_GAUGE, "idempotency_entries",
                            "Idempotency keys held by the local table, pending and done", NULL, NULL, 0);
  m_hits = tg_metric_new(TG_METRIC_COUNTER, "idempotency_hits_total",
                         "ExecuteTransaction calls that found their idempotency key taken, by what they found: "
                         "replay (the first answer again), conflict (another request: already_exists), pending "
                         "(the first call still running).",
                         result,
                         NULL, 0);
  m_evictions = tg_metric_new(TG_METRIC_COUNTER, "idempotency_evictions_total",
                              "Live idempotency keys dropped from a full local table (a retry of one can be "
                              "charged again)",
                              NULL, NULL, 0);
  if (!m_entries || !m_hits || !m_evictions)
    return -ENOMEM;
  return 0;
}

/* Shared with idem_redis.c, which counts the same hits. */
void tg_idem_count_hit(int state);

void tg_idem_count_hit(int state) {
  const char *label = state == TG_IDEM_DONE       ? "replay"
                      : state == TG_IDEM_CONFLICT ? "conflict"
                      : state == TG_IDEM_PENDING  ? "pending"
                                                  : NULL;
  if (label)
    tg_counter_add(m_hits, (const char *const[]){label}, 1);
}

uint64_t tg_idem_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

typedef struct entry entry_t;
struct entry {
  entry_t *chain;       /* next in the bucket */
  entry_t *prev, *next; /* in the shard's LRU list, DONE entries only; head is the most recent */
  uint64_t expires_ms;  /* DONE: finish (or done_at) + ttl */
  uint8_t *resp;        /* DONE: the response, resp_len bytes (NULL when empty) */
  size_t resp_len;
  bool pending;
  uint8_t scope[32];
  uint8_t req_hash[32];
};

typedef struct shard {
  pthread_mutex_t mu;
  entry_t **buckets; /* mask + 1 chains */
  size_t mask;
  size_t count;   /* entries, pending included */
  size_t pending; /* of which PENDING */
  entry_t *lru_head, *lru_tail;
  uint64_t evictions;
} __attribute__((aligned(64))) shard_t; /* one cache line of its own: shards are locked independently */

struct tg_idem {
  uint64_t ttl_ms;
  size_t per_shard; /* capacity of each shard */
  unsigned shard_bits;
  uint64_t seed[2]; /* keys of the shard and bucket hashes */
  shard_t *shards;  /* 1 << shard_bits */
};

static uint64_t load64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v;
}

/* scope is a SHA-256 already; the keyed mix only stops clients from choosing
 * keys that land in one shard or one bucket (they do not know the seed). */
static uint64_t mix(uint64_t x) {
  x ^= x >> 33;
  x *= UINT64_C(0xff51afd7ed558ccd);
  x ^= x >> 33;
  x *= UINT64_C(0xc4ceb9fe1a85ec53);
  x ^= x >> 33;
  return x;
}

static shard_t *shard_of(tg_idem_t *t, const uint8_t scope[32]) {
  if (t->shard_bits == 0)
    return &t->shards[0];
  return &t->shards[mix(load64(scope) ^ t->seed[0]) >> (64 - t->shard_bits)];
}

static entry_t **bucket_of(tg_idem_t *t, shard_t *s, const uint8_t scope[32]) {
  return &s->buckets[mix(load64(scope + 8) ^ t->seed[1]) & s->mask];
}

static void lru_unlink(shard_t *s, entry_t *e) {
  if (e->prev)
    e->prev->next = e->next;
  else
    s->lru_head = e->next;
  if (e->next)
    e->next->prev = e->prev;
  else
    s->lru_tail = e->prev;
  e->prev = e->next = NULL;
}

static void lru_push_head(shard_t *s, entry_t *e) {
  e->prev = NULL;
  e->next = s->lru_head;
  if (s->lru_head)
    s->lru_head->prev = e;
  else
    s->lru_tail = e;
  s->lru_head = e;
}

/* The entry of scope and, in *link, the pointer that points at it (or at
 * where it would go). */
static entry_t *find(tg_idem_t *t, shard_t *s, const uint8_t scope[32], entry_t ***link) {
  entry_t **p = bucket_of(t, s, scope);
  while (*p && memcmp((*p)->scope, scope, 32) != 0)
    p = &(*p)->chain;
  *link = p;
  return *p;
}

/* Unlinks e (from its chain through link, and from the LRU) and frees it. */
static void remove_entry(shard_t *s, entry_t **link, entry_t *e) {
  *link = e->chain;
  if (e->pending)
    s->pending--;
  else
    lru_unlink(s, e);
  s->count--;
  free(e->resp);
  free(e);
  tg_gauge_add(m_entries, NULL, -1);
}

static void remove_scope(tg_idem_t *t, shard_t *s, entry_t *e) {
  entry_t **link;
  find(t, s, e->scope, &link);
  remove_entry(s, link, e);
}

static bool expired(const entry_t *e, uint64_t now_ms) {
  return !e->pending && e->expires_ms <= now_ms;
}

/* Makes room for one more entry in s: drops expired entries from the LRU
 * tail, then the least recently used DONE entry. -EBUSY when only PENDING
 * entries are left. */
static int make_room(tg_idem_t *t, shard_t *s, uint64_t now_ms) {
  while (s->lru_tail && expired(s->lru_tail, now_ms))
    remove_scope(t, s, s->lru_tail);
  if (s->count < t->per_shard)
    return 0;
  if (s->lru_tail == NULL)
    return -EBUSY;
  remove_scope(t, s, s->lru_tail);
  s->evictions++;
  tg_counter_add(m_evictions, NULL, 1);
  return 0;
}

/* A new entry at *link (found by find, still valid: make_room may have
 * changed chains, so callers look up again after it). */
static entry_t *insert(shard_t *s, entry_t **link, const uint8_t scope[32], const uint8_t req_hash[32]) {
  entry_t *e = calloc(1, sizeof(*e));
  if (e == NULL)
    return NULL;
  memcpy(e->scope, scope, 32);
  memcpy(e->req_hash, req_hash, 32);
  e->chain = NULL;
  *link = e;
  s->count++;
  tg_gauge_add(m_entries, NULL, 1);
  return e;
}

static size_t pow2_at_least(size_t n) {
  size_t p = 1;
  while (p < n)
    p <<= 1;
  return p;
}

tg_idem_t *tg_idem_new(size_t max_entries, uint64_t ttl_ms) {
  if (max_entries == 0 || ttl_ms == 0 || max_entries > SIZE_MAX / 4)
    return NULL;
  tg_idem_t *t = calloc(1, sizeof(*t));
  if (t == NULL)
    return NULL;
  t->ttl_ms = ttl_ms;
  while (t->shard_bits < 6 && (max_entries >> (t->shard_bits + 1)) >= MIN_PER_SHARD)
    t->shard_bits++;
  size_t n = (size_t)1 << t->shard_bits;
  t->per_shard = (max_entries + n - 1) / n;
  if (getrandom(t->seed, sizeof(t->seed), 0) != (ssize_t)sizeof(t->seed)) {
    /* Without getrandom: a weaker per-table seed still varies by run. */
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    t->seed[0] = mix((uint64_t)ts.tv_nsec ^ (uint64_t)(uintptr_t)t);
    t->seed[1] = mix(t->seed[0] ^ (uint64_t)ts.tv_sec);
  }
  t->shards = aligned_alloc(64, n * sizeof(shard_t));
  if (t->shards == NULL)
    goto fail;
  memset(t->shards, 0, n * sizeof(shard_t));
  size_t nb = pow2_at_least(t->per_shard);
  for (size_t i = 0; i < n; i++) {
    shard_t *s = &t->shards[i];
    s->mask = nb - 1;
    if ((s->buckets = calloc(nb, sizeof(entry_t *))) == NULL || pthread_mutex_init(&s->mu, NULL) != 0) {
      free(s->buckets);
      for (size_t j = 0; j < i; j++) {
        free(t->shards[j].buckets);
        pthread_mutex_destroy(&t->shards[j].mu);
      }
      goto fail;
    }
  }
  return t;
fail:
  free(t->shards);
  free(t);
  return NULL;
}

void tg_idem_free(tg_idem_t *t) {
  if (t == NULL)
    return;
  size_t n = (size_t)1 << t->shard_bits;
  for (size_t i = 0; i < n; i++) {
    shard_t *s = &t->shards[i];
    for (size_t b = 0; b <= s->mask; b++) {
      entry_t *e = s->buckets[b];
      while (e) {
        entry_t *next = e->chain;
        free(e->resp);
        free(e);
        e = next;
      }
    }
    if (s->count)
      tg_gauge_add(m_entries, NULL, -(double)s->count);
    free(s->buckets);
    pthread_mutex_destroy(&s->mu);
  }
  free(t->shards);
  free(t);
}

int tg_idem_begin(tg_idem_t *t, const uint8_t scope[32], const uint8_t req_hash[32], uint64_t now_ms,
                  tg_idem_result_t *out) {
  if (t == NULL || scope == NULL || req_hash == NULL || out == NULL)
    return -EINVAL;
  shard_t *s = shard_of(t, scope);
  entry_t **link;
  int rc;
  pthread_mutex_lock(&s->mu);
  entry_t *e = find(t, s, scope, &link);
  if (e && expired(e, now_ms)) {
    remove_entry(s, link, e);
    e = NULL;
  }
  if (e) {
    if (memcmp(e->req_hash, req_hash, 32) != 0) {
      rc = TG_IDEM_CONFLICT;
    } else if (e->pending) {
      rc = TG_IDEM_PENDING;
    } else {
      /* Copied under the lock: finish never changes a DONE entry, but eviction may free it. */
      void *copy = malloc(e->resp_len ? e->resp_len : 1);
      if (copy == NULL) {
        rc = -ENOMEM;
        goto out;
      }
      if (e->resp_len)
        memcpy(copy, e->resp, e->resp_len);
      out->response = copy;
      out->response_len = e->resp_len;
      lru_unlink(s, e);
      lru_push_head(s, e);
      rc = TG_IDEM_DONE;
    }
    pthread_mutex_unlock(&s->mu);
    tg_idem_count_hit(rc);
    return rc;
  }
  if ((rc = make_room(t, s, now_ms)) != 0)
    goto out;
  find(t, s, scope, &link); /* make_room may have unlinked the entry link pointed into */
  if ((e = insert(s, link, scope, req_hash)) == NULL) {
    rc = -ENOMEM;
    goto out;
  }
  e->pending = true;
  s->pending++;
  rc = TG_IDEM_NEW;
out:
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int tg_idem_finish(tg_idem_t *t, const uint8_t scope[32], const void *resp, size_t len, uint64_t now_ms) {
  if (t == NULL || scope == NULL || (resp == NULL && len > 0))
    return -EINVAL;
  /* Copied before taking the lock: the shard is held for the list work only. */
  uint8_t *copy = NULL;
  if (len > 0) {
    if ((copy = malloc(len)) == NULL)
      return -ENOMEM;
    memcpy(copy, resp, len);
  }
  shard_t *s = shard_of(t, scope);
  entry_t **link;
  int rc = 0;
  pthread_mutex_lock(&s->mu);
  entry_t *e = find(t, s, scope, &link);
  if (e == NULL) {
    rc = -ENOENT;
  } else if (!e->pending) {
    rc = -EINVAL;
  } else {
    e->pending = false;
    s->pending--;
    e->resp = copy;
    e->resp_len = len;
    e->expires_ms = now_ms + t->ttl_ms;
    lru_push_head(s, e);
    copy = NULL;
  }
  pthread_mutex_unlock(&s->mu);
  free(copy);
  return rc;
}

int tg_idem_abort(tg_idem_t *t, const uint8_t scope[32]) {
  if (t == NULL || scope == NULL)
    return -EINVAL;
  shard_t *s = shard_of(t, scope);
  entry_t **link;
  int rc = 0;
  pthread_mutex_lock(&s->mu);
  entry_t *e = find(t, s, scope, &link);
  if (e == NULL)
    rc = -ENOENT;
  else if (!e->pending)
    rc = -EINVAL;
  else
    remove_entry(s, link, e);
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int tg_idem_restore(tg_idem_t *t, const uint8_t scope[32], const uint8_t req_hash[32], const void *resp,
                    size_t len, uint64_t done_at_ms, uint64_t now_ms) {
  if (t == NULL || scope == NULL || req_hash == NULL || (resp == NULL && len > 0))
    return -EINVAL;
  uint64_t expires = done_at_ms + t->ttl_ms;
  if (expires < done_at_ms)
    expires = UINT64_MAX;
  if (expires <= now_ms)
    return 0;
  uint8_t *copy = NULL;
  if (len > 0) {
    if ((copy = malloc(len)) == NULL)
      return -ENOMEM;
    memcpy(copy, resp, len);
  }
  shard_t *s = shard_of(t, scope);
  entry_t **link;
  int rc = 0;
  pthread_mutex_lock(&s->mu);
  entry_t *e = find(t, s, scope, &link);
  if (e && e->pending) {
    rc = -EEXIST;
    goto out;
  }
  if (e) {
    lru_unlink(s, e);
    free(e->resp);
  } else {
    if ((rc = make_room(t, s, now_ms)) != 0)
      goto out;
    find(t, s, scope, &link);
    if ((e = insert(s, link, scope, req_hash)) == NULL) {
      rc = -ENOMEM;
      goto out;
    }
  }
  memcpy(e->req_hash, req_hash, 32);
  e->resp = copy;
  e->resp_len = len;
  e->expires_ms = expires;
  lru_push_head(s, e);
  copy = NULL;
out:
  pthread_mutex_unlock(&s->mu);
  free(copy);
  return rc;
}

size_t tg_idem_expire(tg_idem_t *t, uint64_t now_ms) {
  if (t == NULL)
    return 0;
  size_t n = (size_t)1 << t->shard_bits, dropped = 0;
  for (size_t i = 0; i < n; i++) {
    shard_t *s = &t->shards[i];
    pthread_mutex_lock(&s->mu);
    /* A replay moves an entry to the head without extending its life, so
     * expired entries can sit anywhere in the list: walk all of it. */
    entry_t *e = s->lru_head;
    while (e) {
      entry_t *next = e->next;
      if (expired(e, now_ms)) {
        remove_scope(t, s, e);
        dropped++;
      }
      e = next;
    }
    pthread_mutex_unlock(&s->mu);
  }
  return dropped;
}

void tg_idem_stats(tg_idem_t *t, tg_idem_stats_t *out) {
  memset(out, 0, sizeof(*out));
  if (t == NULL)
    return;
  size_t n = (size_t)1 << t->shard_bits;
  for (size_t i = 0; i < n; i++) {
    shard_t *s = &t->shards[i];
    pthread_mutex_lock(&s->mu);
    out->entries += s->count;
    out->pending += s->pending;
    out->evictions += s->evictions;
    pthread_mutex_unlock(&s->mu);
  }
}
