#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <mbedtls/sha256.h>
#include <uv.h>

#include "base/buf.h"
#include "base/log.h"
#include "base/metrics.h"
#include "limit/ratelimit.h"
#include "redis_fixture.h"

#define S 1000000ull /* us */
#define T0 (1000 * S) /* a start time well clear of 0 */

static void init_metrics(void) {
  static bool done;
  if (!done) {
    tg_ratelimit_metrics_init();
    done = true;
  }
}

/* The value of one rendered series, e.g. metric("ratelimit_table_full_total{action=\"evict\"}"); 0 if absent. */
static uint64_t metric(const char *series) {
  tg_buf_t b = {0};
  uint64_t v = 0;
  if (tg_metrics_render(&b) != 0 || tg_buf_append(&b, "", 1) != 0)
    return UINT64_MAX;
  size_t n = strlen(series);
  for (const char *p = b.data; (p = strstr(p, series)) != NULL; p += n)
    if ((p == b.data || p[-1] == '\n') && p[n] == ' ') {
      v = strtoull(p + n + 1, NULL, 10);
      break;
    }
  tg_buf_free(&b);
  return v;
}

static int take(tg_ratelimit_t *rl, const char *tenant, const char *key, double rate, uint32_t burst, uint64_t now,
                uint32_t *retry) {
  return tg_ratelimit_take(rl, tenant, key, strlen(key), rate, burst, now, retry);
}

TEST(siphash_reference_vectors) {
  uint8_t key[16], msg[16];
  for (int i = 0; i < 16; i++)
    key[i] = msg[i] = (uint8_t)i;
  static const uint64_t want[] = {0x726fdb47dd0e0e31ull, 0x74f839c593dc67fdull, 0x0d6c8009d9a94f5aull,
                                  0x85676696d7fb7e2dull, 0xcf2794e0277187b7ull};
  for (size_t n = 0; n < 5; n++)
    CHECK(tg_ratelimit_siphash(key, msg, n) == want[n]);
  CHECK(tg_ratelimit_siphash(key, msg, 8) == 0x93f5f5799a932462ull);
  CHECK(tg_ratelimit_siphash(key, msg, 15) == 0xa129ca6149be45e5ull);
}

TEST(params) {
  uint64_t t, tau;
  CHECK_INT(tg_ratelimit_params(10, 5, &t, &tau), 0);
  CHECK_INT(t, 100000);
  CHECK_INT(tau, 400000);
  CHECK_INT(tg_ratelimit_params(0.5, 1, &t, &tau), 0);
  CHECK_INT(t, 2000000);
  CHECK_INT(tau, 0);
  CHECK_INT(tg_ratelimit_params(3, 2, &t, &tau), 0);
  CHECK_INT(t, 333333);
  CHECK_INT(tau, 333333);
  CHECK_INT(tg_ratelimit_params(1e9, 1, &t, &tau), 0);
  CHECK_INT(t, 1);
  CHECK_INT(tg_ratelimit_params(1e-12, UINT32_MAX, &t, &tau), 0);
  CHECK(t == TG_RATELIMIT_MAX_US && tau == TG_RATELIMIT_MAX_US);
  CHECK_INT(tg_ratelimit_params(0, 1, &t, &tau), -EINVAL);
  CHECK_INT(tg_ratelimit_params(-1, 1, &t, &tau), -EINVAL);
  CHECK_INT(tg_ratelimit_params(NAN, 1, &t, &tau), -EINVAL);
  CHECK_INT(tg_ratelimit_params(INFINITY, 1, &t, &tau), -EINVAL);
  CHECK_INT(tg_ratelimit_params(1, 0, &t, &tau), -EINVAL);
}

TEST(burst_then_rate) {
  tg_ratelimit_t *rl = tg_ratelimit_new(1024);
  uint32_t retry = 0;
  CHECK(rl != NULL);
  /* 10/s with a burst of 5: five at once, the sixth waits one interval. */
  for (int i = 0; i < 5; i++)
    CHECK_INT(take(rl, "t", "k", 10, 5, T0, &retry), 1);
  CHECK_INT(take(rl, "t", "k", 10, 5, T0, &retry), 0);
  CHECK_INT(retry, 100);
  CHECK_INT(take(rl, "t", "k", 10, 5, T0 + 99999, &retry), 0);
  CHECK_INT(retry, 1); /* 1 us left rounds up to 1 ms */
  CHECK_INT(take(rl, "t", "k", 10, 5, T0 + 100000, &retry), 1);
  CHECK_INT(take(rl, "t", "k", 10, 5, T0 + 100000, &retry), 0);
  CHECK_INT(retry, 100);
  /* Then exactly 10 per second: polled every ms for 10 s. */
  int allowed = 0;
  for (uint64_t t = T0 + 101000; t <= T0 + 100000 + 10 * S; t += 1000)
    allowed += take(rl, "t", "k", 10, 5, t, NULL);
  CHECK_INT(allowed, 100);
  /* Idle long enough and the whole burst is back, not more. */
  uint64_t later = T0 + 100 * S;
  allowed = 0;
  for (int i = 0; i < 20; i++)
    allowed += take(rl, "t", "k", 10, 5, later, NULL);
  CHECK_INT(allowed, 5);
  tg_ratelimit_free(rl);
}

TEST(retry_after_is_exact) {
  tg_ratelimit_t *rl = tg_ratelimit_new(64);
  uint32_t retry = 0;
  /* 2/s, burst 3: T = 500 ms, tau = 1 s. */
  for (int i = 0; i < 3; i++)
    CHECK_INT(take(rl, "t", "k", 2, 3, T0, &retry), 1);
  CHECK_INT(take(rl, "t", "k", 2, 3, T0, &retry), 0);
  CHECK_INT(retry, 500);
  CHECK_INT(take(rl, "t", "k", 2, 3, T0 + 200000, &retry), 0);
  CHECK_INT(retry, 300);
  /* Limited requests do not push the TAT: the answer comes when promised. */
  CHECK_INT(take(rl, "t", "k", 2, 3, T0 + 499999, &retry), 0);
  CHECK_INT(take(rl, "t", "k", 2, 3, T0 + 500000, &retry), 1);
  CHECK_INT(take(rl, "t", "k", 2, 3, T0 + 500000, &retry), 0);
  CHECK_INT(retry, 500);
  /* Across many random start points: retry_after ms later it is allowed. */
  uint64_t now = T0 + 10 * S;
  unsigned seed = 7;
  for (int i = 0; i < 200; i++) {
    now += (uint64_t)(rand_r(&seed) % 700000);
    while (take(rl, "t", "r", 3, 4, now, &retry) == 1)
      ;
    CHECK(retry >= 1 && retry <= 334);
    if (retry > 1)
      CHECK_INT(take(rl, "t", "r", 3, 4, now + (uint64_t)(retry - 1) * 1000 - 1000, NULL), 0);
    CHECK_INT(take(rl, "t", "r", 3, 4, now + (uint64_t)retry * 1000, NULL), 1);
    now += (uint64_t)retry * 1000;
  }
  tg_ratelimit_free(rl);
}

TEST(fractional_rates) {
  tg_ratelimit_t *rl = tg_ratelimit_new(64);
  uint32_t retry = 0;
  /* 0.5/s: one every 2 s. Polled every 100 ms over [0, 10 s]: t = 0, 2, 4, 6, 8, 10. */
  int allowed = 0;
  for (uint64_t t = T0; t <= T0 + 10 * S; t += 100000)
    allowed += take(rl, "t", "half", 0.5, 1, t, NULL);
  CHECK_INT(allowed, 6);
  CHECK_INT(take(rl, "t", "slow", 0.5, 1, T0, &retry), 1);
  CHECK_INT(take(rl, "t", "slow", 0.5, 1, T0, &retry), 0);
  CHECK_INT(retry, 2000);
  /* 1 per minute with a burst of 2. */
  CHECK_INT(take(rl, "t", "min", 1.0 / 60, 2, T0, &retry), 1);
  CHECK_INT(take(rl, "t", "min", 1.0 / 60, 2, T0, &retry), 1);
  CHECK_INT(take(rl, "t", "min", 1.0 / 60, 2, T0, &retry), 0);
  CHECK_INT(retry, 60000);
  /* 2.5/s: 25 in 10 s after the first. */
  allowed = 0;
  for (uint64_t t = T0; t <= T0 + 10 * S; t += 1000)
    allowed += take(rl, "t", "twohalf", 2.5, 1, t, NULL);
  CHECK_INT(allowed, 26);
  tg_ratelimit_free(rl);
}

TEST(bad_arguments) {
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  CHECK_INT(take(rl, "t", "k", 0, 1, T0, NULL), -EINVAL);
  CHECK_INT(take(rl, "t", "k", -3, 1, T0, NULL), -EINVAL);
  CHECK_INT(take(rl, "t", "k", NAN, 1, T0, NULL), -EINVAL);
  CHECK_INT(take(rl, "t", "k", 1, 0, T0, NULL), -EINVAL);
  CHECK_INT(tg_ratelimit_take(rl, NULL, "k", 1, 1, 1, T0, NULL), -EINVAL);
  CHECK_INT(tg_ratelimit_take(NULL, "t", "k", 1, 1, 1, T0, NULL), -EINVAL);
  CHECK_INT(tg_ratelimit_take(rl, "t", NULL, 3, 1, 1, T0, NULL), -EINVAL);
  /* An empty key is a key like any other. */
  CHECK_INT(tg_ratelimit_take(rl, "t", NULL, 0, 1, 1, T0, NULL), 1);
  CHECK_INT(tg_ratelimit_take(rl, "t", "", 0, 1, 1, T0, NULL), 0);
  tg_ratelimit_free(rl);
}

TEST(keys_and_tenants_are_independent) {
  /* 4096 slots for ~510 keys: far below the load where neighbourhoods fill (~40%). */
  tg_ratelimit_t *rl = tg_ratelimit_new(4096);
  uint32_t retry;
  CHECK_INT(take(rl, "news", "ai:1", 1, 1, T0, &retry), 1);
  CHECK_INT(take(rl, "news", "ai:1", 1, 1, T0, &retry), 0);
  CHECK_INT(take(rl, "news", "ai:2", 1, 1, T0, &retry), 1);
  CHECK_INT(take(rl, "api", "ai:1", 1, 1, T0, &retry), 1);
  /* The tenant/key boundary is part of the key: ("ab", "c") is not ("a", "bc"). */
  CHECK_INT(take(rl, "ab", "c", 1, 1, T0, &retry), 1);
  CHECK_INT(take(rl, "a", "bc", 1, 1, T0, &retry), 1);
  CHECK_INT(take(rl, "ab", "c", 1, 1, T0, &retry), 0);
  /* Keys are bytes: an inner NUL is part of them. */
  CHECK_INT(tg_ratelimit_take(rl, "t", "k\0a", 3, 1, 1, T0, NULL), 1);
  CHECK_INT(tg_ratelimit_take(rl, "t", "k\0b", 3, 1, 1, T0, NULL), 1);
  CHECK_INT(tg_ratelimit_take(rl, "t", "k", 1, 1, 1, T0, NULL), 1);
  CHECK_INT(tg_ratelimit_take(rl, "t", "k\0a", 3, 1, 1, T0, NULL), 0);
  /* Many keys in one table keep their own state. */
  char key[32];
  for (int i = 0; i < 500; i++) {
    snprintf(key, sizeof(key), "ip:%d", i);
    CHECK_INT(take(rl, "t", key, 1, 2, T0, NULL), 1);
  }
  for (int i = 0; i < 500; i++) {
    snprintf(key, sizeof(key), "ip:%d", i);
    CHECK_INT(take(rl, "t", key, 1, 2, T0, NULL), 1);
    CHECK_INT(take(rl, "t", key, 1, 2, T0, NULL), 0);
  }
  tg_ratelimit_free(rl);
}

TEST(decisions_are_counted) {
  init_metrics();
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  const char *allowed = "ratelimit_decisions_total{tenant_id=\"counted\",result=\"allowed\",source=\"local\"}";
  const char *limited = "ratelimit_decisions_total{tenant_id=\"counted\",result=\"limited\",source=\"local\"}";
  uint64_t a0 = metric(allowed), l0 = metric(limited);
  for (int i = 0; i < 5; i++)
    take(rl, "counted", "k", 1, 3, T0, NULL);
  CHECK_INT(metric(allowed) - a0, 3);
  CHECK_INT(metric(limited) - l0, 2);
  /* tg_ratelimit_check decides without counting. */
  CHECK_INT(tg_ratelimit_check(rl, "counted", "k", 1, 1, 3, T0, NULL), 0);
  CHECK_INT(metric(limited) - l0, 2);
  tg_ratelimit_free(rl);
}

/* Redis mode when Redis could not even be asked: the local table decides,
 * and the decision says it was a fallback, not local mode. */
TEST(fallback_decisions_are_labelled_as_fallbacks) {
  init_metrics();
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  const char *fb_allowed =
      "ratelimit_decisions_total{tenant_id=\"fell\",result=\"allowed\",source=\"local-fallback\"}";
  const char *fb_limited =
      "ratelimit_decisions_total{tenant_id=\"fell\",result=\"limited\",source=\"local-fallback\"}";
  const char *local_allowed = "ratelimit_decisions_total{tenant_id=\"fell\",result=\"allowed\",source=\"local\"}";
  const char *reason = "ratelimit_redis_fallback_total{reason=\"error\"}";
  uint64_t a0 = metric(fb_allowed), l0 = metric(fb_limited), r0 = metric(reason);
  uint32_t retry = 0;
  CHECK_INT(tg_ratelimit_take_fallback(rl, "fell", "k", 1, 1, 1, T0, "error", &retry), 1);
  CHECK_INT(tg_ratelimit_take_fallback(rl, "fell", "k", 1, 1, 1, T0, "error", &retry), 0);
  CHECK(retry >= 1);
  CHECK_INT(metric(fb_allowed) - a0, 1);
  CHECK_INT(metric(fb_limited) - l0, 1);
  CHECK_INT(metric(reason) - r0, 2);
  CHECK_INT(metric(local_allowed), 0);
  /* Bad arguments decide nothing and count nothing. */
  CHECK_INT(tg_ratelimit_take_fallback(rl, "fell", "k", 1, 0, 1, T0, "error", &retry), -EINVAL);
  CHECK_INT(metric(reason) - r0, 2);
  tg_ratelimit_free(rl);
}

TEST(redis_new_reports_its_reason) {
  uv_loop_t loop;
  CHECK_INT(uv_loop_init(&loop), 0);
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  tg_ratelimit_redis_opts_t o = {.host = NULL, .port = 6379};
  tg_ratelimit_redis_t *r = (tg_ratelimit_redis_t *)&o; /* must be reset to NULL */
  char err[256] = "";
  CHECK_INT(tg_ratelimit_redis_new(&loop, &o, rl, &r, err, sizeof err), -EINVAL);
  CHECK(r == NULL);
  CHECK(strstr(err, "missing loop, host") != NULL);
  CHECK_INT(uv_loop_close(&loop), 0);
  tg_ratelimit_free(rl);
}

typedef struct hammer {
  tg_ratelimit_t *rl;
  const char *key;
  double rate;
  uint32_t burst;
  uint64_t step, duration;
  int allowed, calls;
  atomic_int *go;
} hammer_t;

/* Walks simulated time from T0 to T0 + duration; at each step takes until limited. */
static void *hammer_run(void *p) {
  hammer_t *h = p;
  while (!atomic_load(h->go))
    ;
  for (uint64_t t = T0; t <= T0 + h->duration; t += h->step) {
    int rc;
    do {
      rc = tg_ratelimit_take(h->rl, "t", h->key, strlen(h->key), h->rate, h->burst, t, NULL);
      h->calls++;
      h->allowed += rc == 1;
    } while (rc == 1);
  }
  return NULL;
}

static int hammer(tg_ratelimit_t *rl, int nthreads, const char *const *keys, double rate, uint32_t burst,
                  uint64_t step, uint64_t duration, int *calls) {
  pthread_t th[8];
  hammer_t h[8];
  atomic_int go = 0;
  int total = 0;
  *calls = 0;
  for (int i = 0; i < nthreads; i++) {
    h[i] = (hammer_t){rl, keys[i], rate, burst, step, duration, 0, 0, &go};
    pthread_create(&th[i], NULL, hammer_run, &h[i]);
  }
  atomic_store(&go, 1);
  for (int i = 0; i < nthreads; i++) {
    pthread_join(th[i], NULL);
    total += h[i].allowed;
    *calls += h[i].calls;
  }
  return total;
}

TEST(four_threads_one_key_exact) {
  tg_ratelimit_t *rl = tg_ratelimit_new(1024);
  const char *keys[4] = {"hot", "hot", "hot", "hot"};
  int calls;
  /* 10000/s, burst 20, 1 s in 50 us steps: 20 + 10000 allowed, whatever the interleaving. */
  int allowed = hammer(rl, 4, keys, 10000, 20, 50, S, &calls);
  CHECK_INT(allowed, 20 + 10000);
  CHECK(calls > allowed);
  /* Two keys, two threads each: each key gets its own exact budget. */
  const char *two[4] = {"a", "b", "a", "b"};
  allowed = hammer(rl, 4, two, 1000, 5, 100, S, &calls);
  CHECK_INT(allowed, 2 * (5 + 1000));
  tg_ratelimit_free(rl);
}

TEST(table_full_evicts_the_smallest_tat) {
  init_metrics();
  const char *evict = "ratelimit_table_full_total{action=\"evict\"}";
  uint64_t e0 = metric(evict);
  /* 16 slots: every key's neighbourhood is the whole table. */
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  char key[16];
  /* Key i takes i + 1 of its burst of 20 at 1/s: TAT = T0 + (i + 1) s, all live. */
  for (int i = 0; i < 16; i++) {
    snprintf(key, sizeof(key), "k%d", i);
    for (int j = 0; j <= i; j++)
      CHECK_INT(take(rl, "t", key, 1, 20, T0, NULL), 1);
  }
  CHECK_INT(metric(evict) - e0, 0);
  /* A 17th key evicts k0, the key closest to a full bucket. */
  CHECK_INT(take(rl, "t", "new", 1, 20, T0, NULL), 1);
  CHECK_INT(metric(evict) - e0, 1);
  /* Everyone else kept their state: k15 has 4 left, k1 has 18. */
  int n = 0;
  while (take(rl, "t", "k15", 1, 20, T0, NULL) == 1)
    n++;
  CHECK_INT(n, 4);
  n = 0;
  while (take(rl, "t", "k1", 1, 20, T0, NULL) == 1)
    n++;
  CHECK_INT(n, 18);
  CHECK_INT(metric(evict) - e0, 1);
  /* k0 comes back with a fresh bucket (evicting "new", now the smallest TAT). */
  n = 0;
  while (take(rl, "t", "k0", 1, 20, T0, NULL) == 1)
    n++;
  CHECK_INT(n, 20);
  CHECK_INT(metric(evict) - e0, 2);
  tg_ratelimit_free(rl);
}

TEST(expired_slots_are_reused) {
  init_metrics();
  const char *evict = "ratelimit_table_full_total{action=\"evict\"}";
  uint64_t e0 = metric(evict);
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  char key[16];
  for (int i = 0; i < 16; i++) {
    snprintf(key, sizeof(key), "k%d", i);
    CHECK_INT(take(rl, "t", key, 1, 1, T0, NULL), 1);
    CHECK_INT(take(rl, "t", key, 1, 1, T0, NULL), 0);
  }
  /* One second later every bucket is full again: new keys take expired slots, no eviction. */
  for (int i = 0; i < 16; i++) {
    snprintf(key, sizeof(key), "n%d", i);
    CHECK_INT(take(rl, "t", key, 1, 1, T0 + S, NULL), 1);
    CHECK_INT(take(rl, "t", key, 1, 1, T0 + S, NULL), 0);
  }
  CHECK_INT(metric(evict) - e0, 0);
  /* The new keys hold state; an old key comes back as new, evicting one. */
  CHECK_INT(take(rl, "t", "n3", 1, 1, T0 + S + 500000, NULL), 0);
  CHECK_INT(take(rl, "t", "k3", 1, 1, T0 + S + 500000, NULL), 1);
  CHECK_INT(metric(evict) - e0, 1);
  tg_ratelimit_free(rl);
}

typedef struct churn {
  tg_ratelimit_t *rl;
  int id, bad, allowed;
} churn_t;

static void *churn_run(void *p) {
  churn_t *c = p;
  char key[16];
  for (int i = 0; i < 20000; i++) {
    int len = snprintf(key, sizeof(key), "c%d:%d", c->id, i % 16);
    int rc = tg_ratelimit_take(c->rl, "t", key, (size_t)len, 1, 5, T0 + (uint64_t)(i / 100), NULL);
    c->bad += rc != 0 && rc != 1;
    c->allowed += rc == 1;
  }
  return NULL;
}

/* 64 live keys fighting over 16 slots from 4 threads: reuse, eviction and
 * lost-slot retries all race (for the sanitizers); every call still decides. */
TEST(eviction_under_contention) {
  init_metrics();
  const char *evict = "ratelimit_table_full_total{action=\"evict\"}";
  uint64_t e0 = metric(evict);
  tg_ratelimit_t *rl = tg_ratelimit_new(16);
  pthread_t th[4];
  churn_t c[4];
  for (int i = 0; i < 4; i++) {
    c[i] = (churn_t){rl, i, 0, 0};
    pthread_create(&th[i], NULL, churn_run, &c[i]);
  }
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  for (int i = 0; i < 4; i++) {
    CHECK_INT(c[i].bad, 0);
    CHECK(c[i].allowed >= 5 * 16); /* at least each key's first burst */
  }
  CHECK(metric(evict) - e0 > 100);
  tg_ratelimit_free(rl);
}

/* ---- micro-benchmark: figures only, never a pass/fail on time ---- */

/* Thread CPU time: on a shared machine, wall time would mostly measure the neighbours. */
static double cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

typedef struct bench {
  tg_ratelimit_t *rl;
  int id, n;
  bool same_key, count;
  int allowed;
  double ns_per_take;
} bench_t;

static void *bench_run(void *p) {
  bench_t *b = p;
  static _Thread_local char keys[1024][24];
  for (int i = 0; i < 1024; i++)
    snprintf(keys[i], sizeof(keys[i]), b->same_key ? "ai:hot" : "ai:%d:%d", b->id, i);
  double start = cpu_ns();
  for (int i = 0; i < b->n; i++) {
    const char *key = keys[i & 1023];
    uint64_t now = T0 + (uint64_t)i;
    int rc = b->count ? tg_ratelimit_take(b->rl, "news", key, strlen(key), 1000, 50, now, NULL)
                      : tg_ratelimit_check(b->rl, "news", key, strlen(key), 1000, 50, now, NULL);
    b->allowed += rc == 1;
  }
  b->ns_per_take = (cpu_ns() - start) / b->n;
  return NULL;
}

/* Mean CPU ns per take over nthreads threads taking n each at once. */
static double bench_threads(tg_ratelimit_t *rl, int nthreads, int n, bool same_key, bool count, int *allowed) {
  pthread_t th[2];
  bench_t b[2];
  double sum = 0;
  for (int i = 0; i < nthreads; i++) {
    b[i] = (bench_t){rl, i, n, same_key, count, 0, 0};
    pthread_create(&th[i], NULL, bench_run, &b[i]);
  }
  *allowed = 0;
  for (int i = 0; i < nthreads; i++) {
    pthread_join(th[i], NULL);
    *allowed += b[i].allowed;
    sum += b[i].ns_per_take;
  }
  return sum / nthreads;
}

TEST(benchmark_local_table) {
  init_metrics();
  const int n = 400000;
  tg_ratelimit_t *rl = tg_ratelimit_new(65536);
  int allowed;
  double check = bench_threads(rl, 1, n, false, false, &allowed);
  CHECK(allowed > 0);
  double one = bench_threads(rl, 1, n, false, true, &allowed);
  CHECK(allowed > 0);
  double two = bench_threads(rl, 2, n, false, true, &allowed);
  CHECK(allowed > 0);
  double hot = bench_threads(rl, 2, n, true, true, &allowed);
  CHECK(allowed > 0 && allowed < 2 * n);
  /* Key hashing alone: SipHash-2-4 against SHA-256 (mbedTLS), on a typical key. */
  static const char input[] = "news\0ai:203.0.113.45";
  uint8_t sk[16] = {1, 2, 3};
  unsigned char digest[32];
  uint64_t sink = 0;
  double start = cpu_ns();
  for (int i = 0; i < n; i++)
    sink += tg_ratelimit_siphash(sk, input, sizeof(input) - 1 - (size_t)(i & 1));
  double sip = (cpu_ns() - start) / n;
  start = cpu_ns();
  for (int i = 0; i < n; i++) {
    mbedtls_sha256_ret((const unsigned char *)input, sizeof(input) - 1 - (size_t)(i & 1), digest, 0);
    sink += digest[0];
  }
  double sha = (cpu_ns() - start) / n;
  CHECK(sink != 0);
  printf("  bench (CPU ns per call): take %.0f (1 thread; %.0f without the metric), %.0f (2 threads, own keys), "
         "%.0f (2 threads, one key); key hash: siphash %.0f, sha256 %.0f\n",
         one, check, two, hot, sip, sha);
  tg_ratelimit_free(rl);
}

/* ---- Redis ---- */

static long long redis_int(const redis_server_t *p, const char *cmd) {
  redisContext *c = redis_direct(p);
  if (c == NULL)
    return -1000;
  redisReply *r = redisCommand(c, cmd);
  long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1000;
  if (r && r->type == REDIS_REPLY_STATUS)
    v = 0;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return v;
}

/* One limiter on its own loop, as one gateway worker. */
typedef struct inst {
  uv_loop_t loop;
  uv_timer_t tick; /* keeps uv_run(UV_RUN_ONCE) from blocking for long */
  tg_ratelimit_t *local;
  tg_ratelimit_redis_t *r;
  int takes, callbacks, allowed, by_source[3];
  int last_source;
  uint32_t last_retry;
  /* driver state for the load test */
  int in_flight;
  uint64_t stop_at_ns;
  const char *key;
  double rate;
  uint32_t burst;
} inst_t;

static int inst_open(inst_t *in, const redis_server_t *p, const char *password, int db, uint32_t timeout_ms) {
  memset(in, 0, sizeof(*in));
  char err[256];
  redis_loop_open(&in->loop, &in->tick);
  in->local = tg_ratelimit_new(1024);
  tg_ratelimit_redis_opts_t o = {.host = "127.0.0.1", .port = p->port, .password = (char *)password,
                                 .timeout_ms = timeout_ms, .db = db};
  int rc = tg_ratelimit_redis_new(&in->loop, &o, in->local, &in->r, err, sizeof(err));
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  return rc;
}

/* Frees the limiter and runs the loop until every handle closed; 0 when the loop closes clean. */
static int inst_close(inst_t *in) {
  tg_ratelimit_redis_free(in->r);
  int rc = redis_loop_close(&in->loop, &in->tick);
  tg_ratelimit_free(in->local);
  return rc;
}

static void take_cb(void *arg, int allowed, uint32_t retry_after_ms, tg_ratelimit_source_t source) {
  inst_t *in = arg;
  in->callbacks++;
  in->allowed += allowed;
  in->by_source[source]++;
  in->last_source = (int)source;
  in->last_retry = retry_after_ms;
}

static bool run_until(inst_t *in, bool (*cond)(inst_t *), int timeout_ms) {
  uint64_t end = uv_hrtime() + (uint64_t)timeout_ms * 1000000;
  while (!cond(in)) {
    if (uv_hrtime() > end)
      return false;
    uv_run(&in->loop, UV_RUN_ONCE);
  }
  return true;
}

static bool is_ready(inst_t *in) {
  return tg_ratelimit_redis_ready(in->r);
}

static int want_callbacks;
static bool has_callbacks(inst_t *in) {
  return in->callbacks >= want_callbacks;
}

/* Takes once and runs the loop until its callback; returns the source, or -1. */
static int take_one(inst_t *in, const char *key, double rate, uint32_t burst, int *allowed) {
  int before = in->callbacks;
  if (tg_ratelimit_redis_take(in->r, "t1", key, strlen(key), rate, burst, take_cb, in) != 0)
    return -1;
  in->takes++;
  if (in->callbacks != before)
    return -2; /* ran synchronously: a contract breach */
  want_callbacks = before + 1;
  if (!run_until(in, has_callbacks, 3000))
    return -1;
  if (allowed)
    *allowed = in->allowed;
  return in->last_source;
}

static long long redis_int_db(const redis_server_t *p, int db, const char *cmd) {
  redisContext *c = redis_direct(p);
  if (c == NULL)
    return -1000;
  redisReply *r = redisCommand(c, "SELECT %d", db);
  if (r)
    freeReplyObject(r);
  r = redisCommand(c, cmd);
  long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1000;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return v;
}

static uint64_t fallbacks(const char *reason) {
  char series[96];
  snprintf(series, sizeof(series), "ratelimit_redis_fallback_total{reason=\"%s\"}", reason);
  return metric(series);
}

static uint64_t all_fallbacks(void) {
  return fallbacks("timeout") + fallbacks("error") + fallbacks("unavailable");
}

static void drive_cb(void *arg, int allowed, uint32_t retry_after_ms, tg_ratelimit_source_t source) {
  inst_t *in = arg;
  take_cb(arg, allowed, retry_after_ms, source);
  in->in_flight--;
}

/* Every ms until stop_at: one more take (demand of 1000/s, far above the limit). */
static void drive_tick(uv_timer_t *t) {
  inst_t *in = t->data;
  if (uv_hrtime() >= in->stop_at_ns) {
    uv_timer_stop(t);
    return;
  }
  if (tg_ratelimit_redis_take(in->r, "t1", in->key, strlen(in->key), in->rate, in->burst, drive_cb, in) == 0) {
    in->in_flight++;
    in->takes++;
  }
}

static bool drained(inst_t *in) {
  return uv_hrtime() >= in->stop_at_ns && in->in_flight == 0;
}

static pthread_barrier_t start_line;

static void *drive_thread(void *p) {
  inst_t *in = p;
  uv_timer_t driver;
  bool ready = run_until(in, is_ready, 5000);
  pthread_barrier_wait(&start_line);
  if (!ready)
    return NULL;
  in->stop_at_ns = uv_hrtime() + 2000000000ull;
  uv_timer_init(&in->loop, &driver);
  driver.data = in;
  uv_timer_start(&driver, drive_tick, 0, 1);
  run_until(in, drained, 10000);
  uv_close((uv_handle_t *)&driver, NULL);
  uv_run(&in->loop, UV_RUN_NOWAIT);
  return NULL;
}

TEST(redis_two_instances_share_one_limit) {
  init_metrics();
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  inst_t a, b;
  /* A generous timeout: sanitizer builds on a busy machine must not turn slow answers into local ones. */
  CHECK_INT(inst_open(&a, &p, NULL, 0, 250), 0);
  CHECK_INT(inst_open(&b, &p, NULL, 0, 250), 0);
  a.key = b.key = "shared";
  /* A burst worth 780 ms: a test process starved of CPU that long loses no
   * tokens, so the count depends on the limiter, not on the scheduler. */
  a.rate = b.rate = 50;
  a.burst = b.burst = 40;
  uint64_t f0 = all_fallbacks();
  pthread_barrier_init(&start_line, NULL, 2);
  pthread_t ta, tb;
  pthread_create(&ta, NULL, drive_thread, &a);
  pthread_create(&tb, NULL, drive_thread, &b);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&start_line);
  int allowed = a.allowed + b.allowed, expected = 50 * 2 + 40;
  int by_redis = a.by_source[TG_RATELIMIT_REDIS] + b.by_source[TG_RATELIMIT_REDIS];
  printf("  redis: %d + %d takes, %d + %d allowed (expected %d), redis-decided %d, fallbacks %" PRIu64 "\n",
         a.takes, b.takes, a.allowed, b.allowed, expected, by_redis, all_fallbacks() - f0);
  CHECK_INT(a.callbacks, a.takes);
  CHECK_INT(b.callbacks, b.takes);
  CHECK(a.takes > 500 && b.takes > 500);
  /* Both instances really took from the one bucket. */
  CHECK(a.allowed > 0 && b.allowed > 0);
  CHECK(allowed >= expected - expected / 10 && allowed <= expected + expected / 10);
  CHECK_INT(inst_close(&a), 0);
  CHECK_INT(inst_close(&b), 0);
  redis_stop(&p);
}

static int count_in_file(int fd, const char *needle) {
  char buf[65536];
  ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
  int count = 0;
  if (n <= 0)
    return 0;
  buf[n] = '\0';
  for (const char *p = buf; (p = strstr(p, needle)) != NULL; p += strlen(needle))
    count++;
  return count;
}

TEST(redis_gcra_fallback_and_recovery) {
  init_metrics();
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  inst_t in;
  CHECK_INT(inst_open(&in, &p, NULL, 0, 100), 0);
  CHECK(run_until(&in, is_ready, 3000));

  /* The script's GCRA: 1/s with a burst of 3. */
  for (int i = 0; i < 3; i++)
    CHECK_INT(take_one(&in, "gcra", 1, 3, NULL), TG_RATELIMIT_REDIS);
  CHECK_INT(in.allowed, 3);
  CHECK_INT(take_one(&in, "gcra", 1, 3, NULL), TG_RATELIMIT_REDIS);
  CHECK_INT(in.allowed, 3);
  CHECK(in.last_retry >= 500 && in.last_retry <= 1000); /* 1 s minus the time the four takes took */
  /* The bucket expires when it is full again: TAT - now, at most 3 s. */
  long long pttl = redis_int(&p, "PTTL tg:rl:t1:gcra");
  CHECK(pttl > 1500 && pttl <= 3000);

  /* A server that lost its scripts (SCRIPT FLUSH, restart, failover): EVAL, still decided by Redis. */
  uint64_t f0 = all_fallbacks();
  CHECK_INT(redis_int(&p, "SCRIPT FLUSH"), 0);
  CHECK_INT(take_one(&in, "other", 100, 10, NULL), TG_RATELIMIT_REDIS);
  CHECK_INT(take_one(&in, "other", 100, 10, NULL), TG_RATELIMIT_REDIS);
  CHECK_INT(all_fallbacks() - f0, 0);

  /* Redis dies: every request is still decided, by the local table, and counted; one log line. */
  char logpath[] = "/tmp/tgrl-log-XXXXXX";
  int logfd = mkstemp(logpath);
  CHECK(logfd >= 0);
  unlink(logpath);
  tg_log_set_fd(logfd);
  redis_stop(&p);
  f0 = all_fallbacks();
  uint64_t u0 = fallbacks("unavailable");
  int before = in.allowed;
  for (int i = 0; i < 20; i++)
    CHECK_INT(take_one(&in, "down", 0.1, 5, NULL), TG_RATELIMIT_FALLBACK);
  CHECK_INT(in.allowed - before, 5); /* the local table enforces the same limit */
  CHECK_INT(all_fallbacks() - f0, 20);
  CHECK(fallbacks("unavailable") - u0 > 0);
  CHECK(!tg_ratelimit_redis_ready(in.r));
  CHECK_INT(count_in_file(logfd, "redis unreachable, using local limits"), 1);

  /* Back on the same port: it reconnects by itself and Redis decides again. */
  CHECK_INT(redis_start(&p), 0);
  int src = -1;
  for (int i = 0; i < 120 && src != TG_RATELIMIT_REDIS; i++) {
    src = take_one(&in, "back", 1000, 1000, NULL);
    CHECK(src == TG_RATELIMIT_REDIS || src == TG_RATELIMIT_FALLBACK);
    if (src != TG_RATELIMIT_REDIS)
      usleep(50000);
  }
  CHECK_INT(src, TG_RATELIMIT_REDIS);
  CHECK(tg_ratelimit_redis_ready(in.r));
  CHECK_INT(count_in_file(logfd, "redis reachable again"), 1);
  CHECK_INT(count_in_file(logfd, "redis unreachable, using local limits"), 1);
  tg_log_set_fd(-1);
  close(logfd);

  /* A hung server: the take is decided locally after the timeout (100 ms). */
  uint64_t t0 = fallbacks("timeout");
  kill(p.pid, SIGSTOP);
  uint64_t start = uv_hrtime();
  CHECK_INT(take_one(&in, "hung", 1000, 1000, NULL), TG_RATELIMIT_FALLBACK);
  double ms = (double)(uv_hrtime() - start) / 1e6;
  CHECK(ms >= 95 && ms < 1000);
  CHECK_INT(fallbacks("timeout") - t0, 1);
  kill(p.pid, SIGCONT);
  /* The late answer is dropped: one callback per take, ever. */
  src = -1;
  for (int i = 0; i < 50 && src != TG_RATELIMIT_REDIS; i++)
    src = take_one(&in, "hung", 1000, 1000, NULL);
  CHECK_INT(src, TG_RATELIMIT_REDIS);
  CHECK_INT(in.callbacks, in.takes);

  /* Hung for longer (1.5 s): the silent connection is dropped, requests keep
   * being decided locally meanwhile, and it comes back after SIGCONT. */
  kill(p.pid, SIGSTOP);
  for (int i = 0; i < 15; i++) {
    CHECK_INT(take_one(&in, "hung2", 1000, 1000, NULL), TG_RATELIMIT_FALLBACK);
    usleep(10000);
  }
  CHECK(!tg_ratelimit_redis_ready(in.r));
  kill(p.pid, SIGCONT);
  src = -1;
  for (int i = 0; i < 120 && src != TG_RATELIMIT_REDIS; i++) {
    src = take_one(&in, "hung2", 1000, 1000, NULL);
    if (src != TG_RATELIMIT_REDIS)
      usleep(50000);
  }
  CHECK_INT(src, TG_RATELIMIT_REDIS);
  CHECK_INT(in.callbacks, in.takes);

  /* Freed with takes in flight: their callbacks run (locally decided) before free returns. */
  for (int i = 0; i < 3; i++) {
    CHECK_INT(tg_ratelimit_redis_take(in.r, "t1", "late", 4, 10, 10, take_cb, &in), 0);
    in.takes++;
  }
  CHECK_INT(in.callbacks, in.takes - 3);
  int takes = in.takes;
  CHECK_INT(inst_close(&in), 0);
  CHECK_INT(in.callbacks, takes);
  redis_stop(&p);
}

TEST(redis_auth_and_db) {
  init_metrics();
  redis_server_t p = {.pass = "pw-4711"};
  CHECK_INT(redis_start(&p), 0);
  inst_t in;
  CHECK_INT(inst_open(&in, &p, "pw-4711", 2, 200), 0);
  CHECK(run_until(&in, is_ready, 3000));
  int allowed = 0;
  CHECK_INT(take_one(&in, "k", 1, 1, &allowed), TG_RATELIMIT_REDIS);
  CHECK_INT(allowed, 1);
  CHECK_INT(redis_int_db(&p, 2, "EXISTS tg:rl:t1:k"), 1);
  CHECK_INT(redis_int_db(&p, 0, "EXISTS tg:rl:t1:k"), 0);
  CHECK_INT(inst_close(&in), 0);

  /* A wrong password never gets ready; requests are decided locally; the
   * refusal repeats at each reconnect but is logged once. */
  char logpath[] = "/tmp/tgrl-log-XXXXXX";
  int logfd = mkstemp(logpath);
  CHECK(logfd >= 0);
  unlink(logpath);
  tg_log_set_fd(logfd);
  CHECK_INT(inst_open(&in, &p, "wrong", 0, 200), 0);
  CHECK(!run_until(&in, is_ready, 800));
  CHECK_INT(take_one(&in, "k", 1, 1, &allowed), TG_RATELIMIT_FALLBACK);
  CHECK_INT(allowed, 1);
  CHECK_INT(inst_close(&in), 0);
  tg_log_set_fd(-1);
  CHECK_INT(count_in_file(logfd, "redis refused the connection setup"), 1);
  CHECK_INT(count_in_file(logfd, "WRONGPASS"), 2); /* the refusal, then the fallback line's error */
  close(logfd);
  redis_stop(&p);
}

TEST(redis_down_from_the_start) {
  init_metrics();
  redis_server_t p = {.port = redis_free_port()}; /* nothing listens there */
  inst_t in;
  CHECK_INT(inst_open(&in, &p, NULL, 0, 250), 0);
  uint64_t f0 = all_fallbacks(), u0 = fallbacks("unavailable");
  for (int i = 0; i < 5; i++)
    CHECK_INT(take_one(&in, "k", 0.1, 3, NULL), TG_RATELIMIT_FALLBACK); /* never synchronous either */
  CHECK_INT(in.allowed, 3);
  CHECK_INT(all_fallbacks() - f0, 5);
  CHECK(fallbacks("unavailable") - u0 >= 4); /* a refused connect is seen at once, not by the timeout */
  CHECK(!tg_ratelimit_redis_ready(in.r));
  CHECK_INT(tg_ratelimit_redis_take(in.r, "t1", "k", 1, 0, 1, take_cb, &in), -EINVAL);
  CHECK_INT(tg_ratelimit_redis_take(in.r, "t1", "k", 1, 1, 0, take_cb, &in), -EINVAL);
  CHECK_INT(inst_close(&in), 0);
  CHECK_INT(in.callbacks, 5);
}

TEST(redis_opts_from_config) {
  char dir[] = "/tmp/tgrl-XXXXXX", path[64], err[256];
  CHECK(mkdtemp(dir) != NULL);
  snprintf(path, sizeof(path), "%s/pass", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  fputs("s3cret \n", f);
  fclose(f);
  tg_config_redis_t cfg = {.host = "localhost", .port = 6390, .password_file = path, .timeout_ms = 30, .db = 1};
  tg_ratelimit_redis_opts_t o;
  CHECK_INT(tg_ratelimit_redis_opts_init(&o, &cfg, err, sizeof(err)), 0);
  CHECK(strcmp(o.host, "127.0.0.1") == 0 || strcmp(o.host, "::1") == 0); /* resolved once, here */
  CHECK_INT(o.port, 6390);
  CHECK_STR(o.password, "s3cret");
  CHECK_INT(o.timeout_ms, 30);
  CHECK_INT(o.db, 1);
  tg_ratelimit_redis_opts_clear(&o);
  CHECK(o.host == NULL && o.password == NULL);
  f = fopen(path, "w");
  fclose(f);
  CHECK_INT(tg_ratelimit_redis_opts_init(&o, &cfg, err, sizeof(err)), -1);
  CHECK(strstr(err, "empty") != NULL);
  unlink(path);
  CHECK_INT(tg_ratelimit_redis_opts_init(&o, &cfg, err, sizeof(err)), -1);
  CHECK(strstr(err, "No such file") != NULL);
  cfg.host = NULL;
  CHECK_INT(tg_ratelimit_redis_opts_init(&o, &cfg, err, sizeof(err)), -1);
  rmdir(dir);
}
