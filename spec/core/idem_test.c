#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>

#include "base/buf.h"
#include "base/metrics.h"
#include "ledger/idem.h"
#include "test.h"

/* A distinct 32-byte value per n (the tests do not need real SHA-256s). */
static void key(uint8_t out[32], unsigned n, uint8_t tag) {
  memset(out, tag, 32);
  memcpy(out, &n, sizeof(n));
}

#define T0 UINT64_C(1700000000000) /* a wall-clock ms, as tg_idem_now_ms gives */

/* A response with NUL bytes inside, as an encoded protobuf has. */
static const uint8_t RESP[] = {0x0a, 0x00, 0x03, 'a', 0x00, 'b', 0x12, 0xff, 0x00};

/* The metrics are declared once for the whole run (families outlive tables,
 * and tg_metrics_reset would leave the module's pointers dangling). */
static void metrics_once(void) {
  static int done;
  if (!done && tg_idem_metrics_init() == 0)
    done = 1;
}

/* The value of one series ("name" or "name{labels}") in the exposition; -1 when absent. */
static double metric(const char *series) {
  tg_buf_t b = {0};
  double v = -1;
  size_t n = strlen(series);
  if (tg_metrics_render(&b) == 0 && b.len > 0)
    for (const char *line = b.data; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL)
      if (strncmp(line, series, n) == 0 && line[n] == ' ') {
        v = strtod(line + n + 1, NULL);
        break;
      }
  tg_buf_free(&b);
  return v;
}

TEST(new_pending_done_conflict) {
  metrics_once();
  double entries = metric("idempotency_entries"), replays = metric("idempotency_hits_total{result=\"replay\"}"),
         conflicts = metric("idempotency_hits_total{result=\"conflict\"}"),
         pendings = metric("idempotency_hits_total{result=\"pending\"}");
  CHECK(entries >= 0);
  if (replays < 0) /* no series before the first hit of its kind */
    replays = conflicts = pendings = 0;
  tg_idem_t *t = tg_idem_new(1000, 60000);
  CHECK(t != NULL);
  uint8_t s[32], h[32], h2[32];
  key(s, 1, 0xa1);
  key(h, 1, 0xb1);
  key(h2, 2, 0xb1);
  tg_idem_result_t out = {0};
  CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_NEW);
  CHECK(out.response == NULL);
  CHECK_INT(tg_idem_begin(t, s, h, T0 + 1, &out), TG_IDEM_PENDING);
  CHECK_INT(tg_idem_begin(t, s, h2, T0 + 1, &out), TG_IDEM_CONFLICT);
  CHECK(metric("idempotency_entries") == entries + 1);
  CHECK_INT(tg_idem_finish(t, s, RESP, sizeof(RESP), T0 + 2), 0);
  CHECK_INT(tg_idem_finish(t, s, RESP, sizeof(RESP), T0 + 2), -EINVAL); /* once */
  CHECK_INT(tg_idem_abort(t, s), -EINVAL);                              /* done: kept */
  for (int i = 0; i < 3; i++) {
    memset(&out, 0, sizeof(out));
    CHECK_INT(tg_idem_begin(t, s, h, T0 + 3, &out), TG_IDEM_DONE);
    CHECK(out.response != NULL);
    CHECK_INT(out.response_len, sizeof(RESP));
    CHECK(memcmp(out.response, RESP, sizeof(RESP)) == 0);
    free(out.response);
  }
  memset(&out, 0, sizeof(out));
  CHECK_INT(tg_idem_begin(t, s, h2, T0 + 3, &out), TG_IDEM_CONFLICT);
  CHECK(out.response == NULL);
  uint8_t other[32];
  key(other, 99, 0xa1);
  CHECK_INT(tg_idem_finish(t, other, "x", 1, T0), -ENOENT);
  CHECK_INT(tg_idem_abort(t, other), -ENOENT);
  CHECK(metric("idempotency_hits_total{result=\"replay\"}") == replays + 3);
  CHECK(metric("idempotency_hits_total{result=\"conflict\"}") == conflicts + 2);
  CHECK(metric("idempotency_hits_total{result=\"pending\"}") == pendings + 1);
  tg_idem_free(t);
  CHECK(metric("idempotency_entries") == entries);
}

TEST(empty_response) {
  tg_idem_t *t = tg_idem_new(10, 1000);
  uint8_t s[32], h[32];
  key(s, 1, 1);
  key(h, 1, 2);
  tg_idem_result_t out = {0};
  CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_finish(t, s, NULL, 0, T0), 0);
  CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_DONE);
  CHECK(out.response != NULL);
  CHECK_INT(out.response_len, 0);
  free(out.response);
  tg_idem_free(t);
}

TEST(bad_arguments) {
  CHECK(tg_idem_new(0, 1000) == NULL);
  CHECK(tg_idem_new(10, 0) == NULL);
  tg_idem_t *t = tg_idem_new(10, 1000);
  uint8_t s[32] = {0}, h[32] = {0};
  tg_idem_result_t out;
  CHECK_INT(tg_idem_begin(t, NULL, h, T0, &out), -EINVAL);
  CHECK_INT(tg_idem_begin(t, s, NULL, T0, &out), -EINVAL);
  CHECK_INT(tg_idem_begin(t, s, h, T0, NULL), -EINVAL);
  CHECK_INT(tg_idem_finish(t, s, NULL, 3, T0), -EINVAL);
  tg_idem_free(t);
}

TEST(abort_frees_the_key) {
  tg_idem_t *t = tg_idem_new(100, 1000);
  uint8_t s[32], h[32], h2[32];
  key(s, 7, 1);
  key(h, 7, 2);
  key(h2, 8, 2);
  tg_idem_result_t out;
  CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_abort(t, s), 0);
  CHECK_INT(tg_idem_abort(t, s), -ENOENT);
  /* A denial is not remembered: the same key, even with another body, is new. */
  CHECK_INT(tg_idem_begin(t, s, h2, T0, &out), TG_IDEM_NEW);
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.pending, 1);
  tg_idem_free(t);
}

TEST(ttl_expiry) {
  tg_idem_t *t = tg_idem_new(100, 1000);
  uint8_t s[32], h[32], h2[32];
  key(s, 1, 1);
  key(h, 1, 2);
  key(h2, 2, 2);
  tg_idem_result_t out;
  CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_NEW);
  /* A PENDING entry has no TTL. */
  CHECK_INT(tg_idem_begin(t, s, h, T0 + 5000, &out), TG_IDEM_PENDING);
  CHECK_INT(tg_idem_finish(t, s, "r", 1, T0 + 5000), 0);
  CHECK_INT(tg_idem_begin(t, s, h2, T0 + 5999, &out), TG_IDEM_CONFLICT);
  CHECK_INT(tg_idem_begin(t, s, h, T0 + 5999, &out), TG_IDEM_DONE);
  free(out.response);
  /* Expired at finish + ttl: absent, so new (with any body). */
  CHECK_INT(tg_idem_begin(t, s, h2, T0 + 6000, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_finish(t, s, "q", 1, T0 + 6000), 0);
  /* tg_idem_expire sweeps what nobody asks for again. */
  for (unsigned i = 10; i < 20; i++) {
    uint8_t k[32];
    key(k, i, 3);
    CHECK_INT(tg_idem_begin(t, k, h, T0 + 6000, &out), TG_IDEM_NEW);
    CHECK_INT(tg_idem_finish(t, k, "z", 1, T0 + 6000 + i), 0);
  }
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 11);
  CHECK_INT(tg_idem_expire(t, T0 + 7000 + 14), 6); /* s (at 7000) and i = 10..14 (at 7000 + i) */
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 5);
  CHECK_INT(tg_idem_expire(t, T0 + 8000), 5);
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 0);
  CHECK_INT(st.evictions, 0);
  tg_idem_free(t);
}

TEST(lru_eviction_spares_pending) {
  metrics_once();
  double evictions = metric("idempotency_evictions_total");
  CHECK(evictions >= 0);
  /* 4 entries: one shard, so the order is exact. */
  tg_idem_t *t = tg_idem_new(4, 60000);
  uint8_t k[8][32], h[32];
  key(h, 0, 9);
  for (unsigned i = 0; i < 8; i++)
    key(k[i], i, 5);
  tg_idem_result_t out;
  /* k0 pending; k1, k2, k3 done. */
  CHECK_INT(tg_idem_begin(t, k[0], h, T0, &out), TG_IDEM_NEW);
  for (int i = 1; i <= 3; i++) {
    CHECK_INT(tg_idem_begin(t, k[i], h, T0, &out), TG_IDEM_NEW);
    CHECK_INT(tg_idem_finish(t, k[i], "d", 1, T0 + (uint64_t)i), 0);
  }
  /* k1 used again: k2 is now the least recently used. */
  CHECK_INT(tg_idem_begin(t, k[1], h, T0 + 10, &out), TG_IDEM_DONE);
  free(out.response);
  CHECK_INT(tg_idem_begin(t, k[4], h, T0 + 11, &out), TG_IDEM_NEW); /* evicts k2 */
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 4);
  CHECK_INT(st.evictions, 1);
  CHECK_INT(tg_idem_begin(t, k[0], h, T0 + 12, &out), TG_IDEM_PENDING);
  CHECK_INT(tg_idem_begin(t, k[1], h, T0 + 12, &out), TG_IDEM_DONE);
  free(out.response);
  CHECK_INT(tg_idem_begin(t, k[3], h, T0 + 12, &out), TG_IDEM_DONE);
  free(out.response);
  /* k2 was evicted: new again (the double charge the sizing note warns of). Evicts k1. */
  CHECK_INT(tg_idem_begin(t, k[2], h, T0 + 13, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_begin(t, k[5], h, T0 + 14, &out), TG_IDEM_NEW); /* evicts k3 */
  /* Now k0, k4, k2, k5 all pending: nothing may be evicted. */
  CHECK_INT(tg_idem_begin(t, k[6], h, T0 + 15, &out), -EBUSY);
  CHECK_INT(tg_idem_restore(t, k[6], h, "r", 1, T0 + 15, T0 + 15), -EBUSY);
  for (int i = 0; i <= 5; i++)
    if (i != 1 && i != 3) {
      CHECK_INT(tg_idem_begin(t, k[i], h, T0 + 16, &out), TG_IDEM_PENDING);
    }
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 4);
  CHECK_INT(st.pending, 4);
  CHECK_INT(st.evictions, 3);
  CHECK(metric("idempotency_evictions_total") == evictions + 3);
  /* One finishes: the next new key evicts it, never a pending one. */
  CHECK_INT(tg_idem_finish(t, k[4], "d", 1, T0 + 17), 0);
  CHECK_INT(tg_idem_begin(t, k[6], h, T0 + 18, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_begin(t, k[4], h, T0 + 19, &out), -EBUSY);
  CHECK_INT(tg_idem_abort(t, k[6]), 0);
  CHECK_INT(tg_idem_begin(t, k[4], h, T0 + 19, &out), TG_IDEM_NEW);
  tg_idem_free(t);
}

TEST(eviction_prefers_expired_entries) {
  tg_idem_t *t = tg_idem_new(3, 100);
  uint8_t k[4][32], h[32];
  key(h, 0, 9);
  for (unsigned i = 0; i < 4; i++)
    key(k[i], i, 6);
  tg_idem_result_t out;
  for (int i = 0; i < 3; i++) {
    CHECK_INT(tg_idem_begin(t, k[i], h, T0, &out), TG_IDEM_NEW);
    CHECK_INT(tg_idem_finish(t, k[i], "d", 1, T0 + (uint64_t)i * 1000), 0);
  }
  /* k0 expired (T0 + 100), k1 and k2 are live: the new key takes k0's room, no eviction counted. */
  CHECK_INT(tg_idem_begin(t, k[3], h, T0 + 1050, &out), TG_IDEM_NEW);
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.evictions, 0);
  CHECK_INT(tg_idem_begin(t, k[1], h, T0 + 1050, &out), TG_IDEM_DONE);
  free(out.response);
  tg_idem_free(t);
}

TEST(restore) {
  tg_idem_t *t = tg_idem_new(100, 1000);
  uint8_t s[32], h[32], h2[32], s2[32];
  key(s, 1, 1);
  key(s2, 2, 1);
  key(h, 1, 2);
  key(h2, 2, 2);
  tg_idem_result_t out;
  CHECK_INT(tg_idem_restore(t, s, h, RESP, sizeof(RESP), T0, T0 + 500), 0);
  CHECK_INT(tg_idem_restore(t, s2, h, "x", 1, T0, T0 + 1000), 0); /* expired: ignored */
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 1);
  CHECK_INT(st.pending, 0);
  CHECK_INT(tg_idem_begin(t, s, h2, T0 + 600, &out), TG_IDEM_CONFLICT);
  CHECK_INT(tg_idem_begin(t, s, h, T0 + 600, &out), TG_IDEM_DONE);
  CHECK_INT(out.response_len, sizeof(RESP));
  CHECK(memcmp(out.response, RESP, sizeof(RESP)) == 0);
  free(out.response);
  /* Expires at done_at + ttl, not at restore + ttl. */
  CHECK_INT(tg_idem_begin(t, s, h, T0 + 1000, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_restore(t, s, h, "y", 1, T0 + 900, T0 + 1000), -EEXIST); /* pending: kept */
  CHECK_INT(tg_idem_begin(t, s2, h, T0 + 1000, &out), TG_IDEM_NEW);
  CHECK_INT(tg_idem_finish(t, s2, "old", 3, T0 + 1000), 0);
  /* A later record replaces a DONE entry. */
  CHECK_INT(tg_idem_restore(t, s2, h2, "new", 3, T0 + 1500, T0 + 1600), 0);
  CHECK_INT(tg_idem_begin(t, s2, h2, T0 + 1600, &out), TG_IDEM_DONE);
  CHECK_INT(out.response_len, 3);
  CHECK(memcmp(out.response, "new", 3) == 0);
  free(out.response);
  CHECK_INT(tg_idem_begin(t, s2, h2, T0 + 2500, &out), TG_IDEM_NEW);
  tg_idem_free(t);
}

/* Many keys over many shards: every key stays findable. */
TEST(many_keys_over_shards) {
  tg_idem_t *t = tg_idem_new(100000, 60000);
  uint8_t h[32];
  key(h, 0, 1);
  tg_idem_result_t out;
  for (unsigned i = 0; i < 20000; i++) {
    uint8_t s[32];
    key(s, i, 7);
    CHECK_INT(tg_idem_begin(t, s, h, T0, &out), TG_IDEM_NEW);
    CHECK_INT(tg_idem_finish(t, s, &i, sizeof(i), T0), 0);
  }
  for (unsigned i = 0; i < 20000; i++) {
    uint8_t s[32];
    key(s, i, 7);
    CHECK_INT(tg_idem_begin(t, s, h, T0 + 1, &out), TG_IDEM_DONE);
    unsigned v;
    CHECK_INT(out.response_len, sizeof(v));
    memcpy(&v, out.response, sizeof(v));
    free(out.response);
    CHECK_INT(v, i);
  }
  tg_idem_stats_t st;
  tg_idem_stats(t, &st);
  CHECK_INT(st.entries, 20000);
  CHECK_INT(st.evictions, 0);
  tg_idem_free(t);
}

#define RACERS 4
#define ROUNDS 2000

typedef struct race {
  tg_idem_t *t;
  atomic_int go;
  atomic_int news[ROUNDS];
  atomic_int done[ROUNDS]; /* replays with the right bytes */
  atomic_int bad;          /* anything else: wrong bytes, errors, conflicts */
} race_t;

static void *racer(void *arg) {
  race_t *r = arg;
  uint8_t h[32];
  key(h, 0, 4);
  while (!atomic_load(&r->go))
    ;
  for (unsigned round = 0; round < ROUNDS; round++) {
    uint8_t s[32];
    key(s, round, 8);
    for (;;) {
      tg_idem_result_t out;
      int rc = tg_idem_begin(r->t, s, h, T0, &out);
      if (rc == TG_IDEM_NEW) {
        atomic_fetch_add(&r->news[round], 1);
        uint8_t resp[40];
        memset(resp, 0, sizeof(resp));
        memcpy(resp + 3, &round, sizeof(round));
        if (tg_idem_finish(r->t, s, resp, sizeof(resp), T0) != 0)
          atomic_fetch_add(&r->bad, 1);
        break;
      }
      if (rc == TG_IDEM_DONE) {
        uint8_t want[40];
        memset(want, 0, sizeof(want));
        memcpy(want + 3, &round, sizeof(round));
        if (out.response_len == sizeof(want) && memcmp(out.response, want, sizeof(want)) == 0)
          atomic_fetch_add(&r->done[round], 1);
        else
          atomic_fetch_add(&r->bad, 1);
        free(out.response);
        break;
      }
      if (rc != TG_IDEM_PENDING) {
        atomic_fetch_add(&r->bad, 1);
        break;
      }
    }
  }
  return NULL;
}

TEST(threads_race_one_key) {
  race_t *r = calloc(1, sizeof(*r));
  CHECK(r != NULL);
  r->t = tg_idem_new(ROUNDS * 2, 60000);
  pthread_t th[RACERS];
  for (int i = 0; i < RACERS; i++)
    CHECK_INT(pthread_create(&th[i], NULL, racer, r), 0);
  atomic_store(&r->go, 1);
  for (int i = 0; i < RACERS; i++)
    pthread_join(th[i], NULL);
  int bad = atomic_load(&r->bad);
  for (unsigned round = 0; round < ROUNDS && bad == 0; round++)
    if (atomic_load(&r->news[round]) != 1 || atomic_load(&r->done[round]) != RACERS - 1) {
      fprintf(stderr, "  round %u: %d new, %d done\n", round, atomic_load(&r->news[round]),
              atomic_load(&r->done[round]));
      bad++;
    }
  tg_idem_free(r->t);
  free(r);
  CHECK_INT(bad, 0);
}
