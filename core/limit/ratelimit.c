#include "limit/ratelimit.h"

#include <endian.h>
#include <errno.h>
#include <math.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "base/metrics.h"

/* A slot's state word: the top TAG_BITS of the owning key's hash, then its
 * TAT in us. The tag makes a CAS on the state fail when another key took the
 * slot over in between, which a bare TAT could not tell. */
#define TAT_BITS 52
#define TAT_MASK ((UINT64_C(1) << TAT_BITS) - 1)
#define NOW_MAX (UINT64_C(1) << 51) /* now + tau + T stays below 2^52 */
/* Re-probes after losing a slot to a concurrent reuse or eviction. */
#define MAX_ATTEMPTS TG_RATELIMIT_PROBE

typedef struct slot {
  _Atomic uint64_t key_hash; /* 0: never used */
  _Atomic uint64_t state;    /* tag | TAT; 0 for a new slot */
} slot_t;

struct tg_ratelimit {
  slot_t *slots;
  size_t mask;
  uint8_t sipkey[16];
};

static tg_metric_t *metric_decisions, *metric_table_full, *metric_fallback;

int tg_ratelimit_metrics_init(void) {
  static const char *const decision_labels[] = {"tenant_id", "result", "source", NULL};
  static const char *const full_labels[] = {"action", NULL};
  static const char *const fallback_labels[] = {"reason", NULL};
  metric_decisions = tg_metric_new(TG_METRIC_COUNTER, "ratelimit_decisions_total",
                                   "Rate limit decisions, by tenant, result (allowed, limited) and source "
                                   "(local, redis, local-fallback).",
                                   decision_labels, NULL, 0);
  metric_table_full = tg_metric_new(TG_METRIC_COUNTER, "ratelimit_table_full_total",
                                    "New keys that found their neighbourhood of the local table full of live "
                                    "keys: evict (the key closest to full lost its state) or allow (untracked).",
                                    full_labels, NULL, 0);
  metric_fallback = tg_metric_new(TG_METRIC_COUNTER, "ratelimit_redis_fallback_total",
                                  "Redis-mode decisions made by the local table instead, by reason "
                                  "(timeout, error, unavailable).",
                                  fallback_labels, NULL, 0);
  return metric_decisions && metric_table_full && metric_fallback ? 0 : -ENOMEM;
}

void tg_ratelimit_count_fallback(const char *reason) {
  const char *labels[] = {reason};
  tg_counter_add(metric_fallback, labels, 1);
}

int tg_ratelimit_take_fallback(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                               double rate_per_s, uint32_t burst, uint64_t now_us, const char *reason,
                               uint32_t *retry_after_ms) {
  int rc = tg_ratelimit_check(rl, tenant, key, key_len, rate_per_s, burst, now_us, retry_after_ms);
  if (rc >= 0) {
    tg_ratelimit_count(tenant, rc, TG_RATELIMIT_FALLBACK);
    tg_ratelimit_count_fallback(reason);
  }
  return rc;
}

const char *tg_ratelimit_source_name(tg_ratelimit_source_t source) {
  switch (source) {
  case TG_RATELIMIT_REDIS:
    return "redis";
  case TG_RATELIMIT_FALLBACK:
    return "local-fallback";
  default:
    return "local";
  }
}

void tg_ratelimit_count(const char *tenant, int allowed, tg_ratelimit_source_t source) {
  const char *labels[] = {tenant, allowed ? "allowed" : "limited", tg_ratelimit_source_name(source)};
  tg_counter_add(metric_decisions, labels, 1);
}

uint64_t tg_ratelimit_now_us(void) {
  return uv_hrtime() / 1000;
}

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))

typedef struct sip {
  uint64_t v0, v1, v2, v3;
  uint64_t tail; /* pending bytes, little-endian */
  size_t len;    /* total bytes absorbed */
} sip_t;

static uint64_t load_le64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return le64toh(v);
}

static void sip_round(sip_t *s) {
  s->v0 += s->v1;
  s->v1 = ROTL(s->v1, 13);
  s->v1 ^= s->v0;
  s->v0 = ROTL(s->v0, 32);
  s->v2 += s->v3;
  s->v3 = ROTL(s->v3, 16);
  s->v3 ^= s->v2;
  s->v0 += s->v3;
  s->v3 = ROTL(s->v3, 21);
  s->v3 ^= s->v0;
  s->v2 += s->v1;
  s->v1 = ROTL(s->v1, 17);
  s->v1 ^= s->v2;
  s->v2 = ROTL(s->v2, 32);
}

static void sip_block(sip_t *s, uint64_t m) {
  s->v3 ^= m;
  sip_round(s);
  sip_round(s);
  s->v0 ^= m;
}

static void sip_init(sip_t *s, const uint8_t key[16]) {
  uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
  s->v0 = k0 ^ UINT64_C(0x736f6d6570736575);
  s->v1 = k1 ^ UINT64_C(0x646f72616e646f6d);
  s->v2 = k0 ^ UINT64_C(0x6c7967656e657261);
  s->v3 = k1 ^ UINT64_C(0x7465646279746573);
  s->tail = 0;
  s->len = 0;
}

/* Absorbs bytes in any split: the result depends only on their concatenation. */
static void sip_update(sip_t *s, const uint8_t *p, size_t n) {
  size_t fill = s->len & 7;
  s->len += n;
  if (fill) {
    while (n > 0 && fill < 8) {
      s->tail |= (uint64_t)*p++ << (8 * fill++);
      n--;
    }
    if (fill < 8)
      return;
    sip_block(s, s->tail);
    s->tail = 0;
  }
  for (; n >= 8; n -= 8, p += 8)
    sip_block(s, load_le64(p));
  for (size_t i = 0; i < n; i++)
    s->tail |= (uint64_t)p[i] << (8 * i);
}

static uint64_t sip_final(sip_t *s) {
  sip_block(s, s->tail | ((uint64_t)(s->len & 0xff) << 56));
  s->v2 ^= 0xff;
  for (int i = 0; i < 4; i++)
    sip_round(s);
  return s->v0 ^ s->v1 ^ s->v2 ^ s->v3;
}

uint64_t tg_ratelimit_siphash(const uint8_t key[16], const void *data, size_t len) {
  sip_t s;
  sip_init(&s, key);
  sip_update(&s, data, len);
  return sip_final(&s);
}

tg_ratelimit_t *tg_ratelimit_new(size_t slots) {
  size_t n = TG_RATELIMIT_PROBE;
  while (n < slots) {
    if (n > SIZE_MAX / 2 / sizeof(slot_t))
      return NULL;
    n *= 2;
  }
  tg_ratelimit_t *rl = calloc(1, sizeof(*rl));
  if (rl == NULL)
    return NULL;
  /* Cache-line aligned: a neighbourhood spans 4 lines, never 5. */
  rl->slots = aligned_alloc(64, n * sizeof(slot_t));
  if (rl->slots == NULL) {
    free(rl);
    return NULL;
  }
  for (size_t i = 0; i < n; i++) {
    atomic_init(&rl->slots[i].key_hash, 0);
    atomic_init(&rl->slots[i].state, 0);
  }
  rl->mask = n - 1;
  if (getrandom(rl->sipkey, sizeof(rl->sipkey), 0) != (ssize_t)sizeof(rl->sipkey)) {
    /* Only without a usable getrandom: a weaker but still per-process key. */
    uint64_t a = uv_hrtime(), b = (uint64_t)(uintptr_t)rl ^ ((uint64_t)getpid() << 32);
    memcpy(rl->sipkey, &a, 8);
    memcpy(rl->sipkey + 8, &b, 8);
  }
  return rl;
}

void tg_ratelimit_free(tg_ratelimit_t *rl) {
  if (rl == NULL)
    return;
  free(rl->slots);
  free(rl);
}

int tg_ratelimit_params(double rate_per_s, uint32_t burst, uint64_t *interval, uint64_t *tau) {
  if (!(rate_per_s > 0) || !isfinite(rate_per_s) || burst < 1)
    return -EINVAL;
  double t = nearbyint(1e6 / rate_per_s);
  if (t < 1)
    t = 1;
  if (t > (double)TG_RATELIMIT_MAX_US)
    t = (double)TG_RATELIMIT_MAX_US;
  double d = t * (double)(burst - 1);
  *interval = (uint64_t)t;
  *tau = d > (double)TG_RATELIMIT_MAX_US ? TG_RATELIMIT_MAX_US : (uint64_t)d;
  return 0;
}

static uint32_t us_to_retry_ms(uint64_t us) {
  uint64_t ms = (us + 999) / 1000;
  if (ms == 0)
    ms = 1;
  return ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
}

static uint64_t key_hash(const tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len) {
  sip_t s;
  sip_init(&s, rl->sipkey);
  /* The NUL keeps ("ab", "c") and ("a", "bc") apart: tenants hold no NUL. */
  sip_update(&s, (const uint8_t *)tenant, strlen(tenant) + 1);
  sip_update(&s, (const uint8_t *)key, key_len);
  uint64_t h = sip_final(&s);
  return h ? h : 1; /* 0 marks a never-used slot */
}

enum { LOST = -2 };

/* The GCRA step on a slot the key holds. LOST when the slot changed hands
 * before our CAS could land: the caller looks for the key again. */
static int update(slot_t *s, uint64_t h, uint64_t now, uint64_t interval, uint64_t tau, uint32_t *retry_ms) {
  uint64_t tag = h >> TAT_BITS;
  uint64_t st = atomic_load(&s->state);
  for (;;) {
    if (atomic_load(&s->key_hash) != h)
      return LOST;
    /* A foreign tag is the previous owner's state, expired or evicted: start fresh. */
    uint64_t tat = (st >> TAT_BITS) == tag ? st & TAT_MASK : 0;
    if (tat < now)
      tat = now;
    if (tat - now > tau) {
      if (retry_ms)
        *retry_ms = us_to_retry_ms(tat - tau - now);
      return 0;
    }
    if (atomic_compare_exchange_weak(&s->state, &st, (tag << TAT_BITS) | (tat + interval)))
      return 1;
  }
}

static void count_full(const char *action) {
  const char *labels[] = {action};
  tg_counter_add(metric_table_full, labels, 1);
}

/* The slot holding h, or one claimed for it: the first never-used slot, else
 * the first whose TAT has passed, else the live one with the smallest TAT
 * (evicted). NULL when a concurrent claim took the slot we chose: retry.
 *
 * A key is never placed after a never-used slot of its neighbourhood, and
 * slots never return to never-used, so the search stops at the first one. */
static slot_t *find_or_claim(tg_ratelimit_t *rl, uint64_t h, uint64_t now) {
  slot_t *reuse = NULL, *victim = NULL;
  uint64_t reuse_key = 0, victim_key = 0, victim_tat = UINT64_MAX;
  size_t start = (size_t)h & rl->mask;
  for (size_t i = 0; i < TG_RATELIMIT_PROBE; i++) {
    slot_t *s = &rl->slots[(start + i) & rl->mask];
    uint64_t k = atomic_load(&s->key_hash);
    if (k == h)
      return s;
    if (k == 0) {
      if (atomic_compare_exchange_strong(&s->key_hash, &k, h) || k == h)
        return s;
      /* Another key claimed it just now: it is an occupied slot like the rest. */
    }
    uint64_t tat = atomic_load(&s->state) & TAT_MASK;
    if (tat <= now) {
      if (reuse == NULL) {
        reuse = s;
        reuse_key = k;
      }
    } else if (tat < victim_tat) {
      victim = s;
      victim_key = k;
      victim_tat = tat;
    }
  }
  slot_t *s = reuse ? reuse : victim;
  uint64_t expect = reuse ? reuse_key : victim_key;
  if (s == NULL || !atomic_compare_exchange_strong(&s->key_hash, &expect, h))
    return NULL;
  if (s == victim)
    count_full("evict");
  return s;
}

int tg_ratelimit_check(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                       double rate_per_s, uint32_t burst, uint64_t now_us, uint32_t *retry_after_ms) {
  uint64_t interval, tau;
  if (rl == NULL || tenant == NULL || (key == NULL && key_len > 0) ||
      tg_ratelimit_params(rate_per_s, burst, &interval, &tau) != 0)
    return -EINVAL;
  if (now_us > NOW_MAX)
    now_us = NOW_MAX;
  uint64_t h = key_hash(rl, tenant, key ? key : "", key_len);
  for (int attempt = 0; attempt < MAX_ATTEMPTS; attempt++) {
    slot_t *s = find_or_claim(rl, h, now_us);
    if (s == NULL)
      continue;
    int rc = update(s, h, now_us, interval, tau, retry_after_ms);
    if (rc != LOST)
      return rc;
  }
  count_full("allow");
  return 1;
}

int tg_ratelimit_take(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                      double rate_per_s, uint32_t burst, uint64_t now_us, uint32_t *retry_after_ms) {
  int rc = tg_ratelimit_check(rl, tenant, key, key_len, rate_per_s, burst, now_us, retry_after_ms);
  if (rc >= 0)
    tg_ratelimit_count(tenant, rc, TG_RATELIMIT_LOCAL);
  return rc;
}
