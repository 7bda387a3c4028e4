#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <sys/time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <mbedtls/sha256.h>
#include <uv.h>

#include "base/log.h"
#include "pay/nonce.h"
#include "redis_fixture.h"
#include "test.h"

/* The local store's tests come first and run everywhere; the Redis ones need
 * a real redis-server and exit 77 (skipped) at the first of them when it is
 * not installed, after the local ones printed their results. */

__attribute__((constructor)) static void log_to_stderr(void) {
  tg_log_set_fd(2); /* the warnings the Redis tests provoke go to stderr, the results to stdout */
}

static void k(uint8_t out[32], unsigned n, uint8_t tag) {
  memset(out, tag, 32);
  memcpy(out, &n, sizeof(n));
}

TEST(key_is_sha256_of_length_prefixed_parts) {
  uint8_t asset[20], payer[20], nonce[32], got[32], want[32];
  memset(asset, 0xa1, 20);
  memset(payer, 0xb2, 20);
  memset(nonce, 0xc3, 32);
  tg_nonce_key("eip155:84532", asset, payer, nonce, got);
  uint8_t buf[1 + 12 + 1 + 20 + 1 + 20 + 1 + 32], *p = buf;
  *p++ = 12;
  memcpy(p, "eip155:84532", 12), p += 12;
  *p++ = 20;
  memcpy(p, asset, 20), p += 20;
  *p++ = 20;
  memcpy(p, payer, 20), p += 20;
  *p++ = 32;
  memcpy(p, nonce, 32), p += 32;
  CHECK_INT(p - buf, sizeof buf);
  CHECK_INT(mbedtls_sha256_ret(buf, sizeof buf, want, 0), 0);
  CHECK(memcmp(got, want, 32) == 0);
  /* Each part matters; the length prefix keeps the network from running into the asset. */
  uint8_t other[32];
  tg_nonce_key("eip155:8453", asset, payer, nonce, other);
  CHECK(memcmp(got, other, 32) != 0);
  payer[19] ^= 1;
  tg_nonce_key("eip155:84532", asset, payer, nonce, other);
  CHECK(memcmp(got, other, 32) != 0);
  payer[19] ^= 1;
  nonce[0] ^= 1;
  tg_nonce_key("eip155:84532", asset, payer, nonce, other);
  CHECK(memcmp(got, other, 32) != 0);
  nonce[0] ^= 1;
  asset[5] ^= 1;
  tg_nonce_key("eip155:84532", asset, payer, nonce, other);
  CHECK(memcmp(got, other, 32) != 0);
  asset[5] ^= 1;
  tg_nonce_key("eip155:84532", asset, payer, nonce, other);
  CHECK(memcmp(got, other, 32) == 0);
}

TEST(claim_replay_expiry_release) {
  tg_nonce_store_t *s = tg_nonce_store_new(1000);
  CHECK(s != NULL);
  uint8_t a[32], b[32];
  k(a, 1, 0x11);
  k(b, 2, 0x11);
  CHECK_INT(tg_nonce_claim(s, a, 1060, 1000), 0);
  CHECK_INT(tg_nonce_claim(s, a, 1060, 1000), -EEXIST);
  CHECK_INT(tg_nonce_claim(s, a, 5000, 1059), -EEXIST); /* live until validBefore */
  CHECK_INT(tg_nonce_claim(s, b, 1060, 1000), 0);
  CHECK_INT(tg_nonce_store_count(s), 2);
  /* At validBefore the entry is gone: the authorization is refused elsewhere by then. */
  CHECK_INT(tg_nonce_claim(s, a, 1200, 1060), 0);
  CHECK_INT(tg_nonce_claim(s, a, 1200, 1100), -EEXIST);
  tg_nonce_release(s, a);
  CHECK_INT(tg_nonce_store_count(s), 1);
  CHECK_INT(tg_nonce_claim(s, a, 1200, 1100), 0);
  tg_nonce_release(s, a);
  tg_nonce_release(s, a); /* absent: nothing */
  CHECK_INT(tg_nonce_claim(s, b, 1200, 1100), 0);
  /* Bad arguments. */
  CHECK_INT(tg_nonce_claim(s, a, 1000, 1000), -EINVAL);
  CHECK_INT(tg_nonce_claim(s, a, 999, 1000), -EINVAL);
  CHECK_INT(tg_nonce_claim(NULL, a, 2000, 1000), -EINVAL);
  CHECK_INT(tg_nonce_claim(s, NULL, 2000, 1000), -EINVAL);
  /* A validBefore far off is kept (no cap). */
  CHECK_INT(tg_nonce_claim(s, a, 32503680000, 1100), 0); /* year 3000 */
  CHECK_INT(tg_nonce_claim(s, a, 32503680000, 32503679999), -EEXIST);
  tg_nonce_store_free(s);
}

TEST(full_fails_closed_then_reclaims_expired) {
  tg_nonce_store_t *s = tg_nonce_store_new(64); /* one entry per shard */
  CHECK(s != NULL);
  int won = 0, full = 0;
  uint8_t key[32];
  static int st[2000];
  for (unsigned i = 0; i < 2000; i++) {
    k(key, i, 0x22);
    st[i] = tg_nonce_claim(s, key, 100, 0);
    CHECK(st[i] == 0 || st[i] == -ENOSPC);
    won += st[i] == 0;
    full += st[i] == -ENOSPC;
  }
  CHECK(won <= 64 && won > 32);
  CHECK(full == 2000 - won);
  CHECK_INT(tg_nonce_store_count(s), won);
  for (unsigned i = 0; i < 2000; i++) {
    k(key, i, 0x22);
    CHECK_INT(tg_nonce_claim(s, key, 100, 50), st[i] == 0 ? -EEXIST : -ENOSPC);
  }
  /* Expired: a full shard sweeps itself; the refused keys get in now. */
  int won2 = 0;
  for (unsigned i = 0; i < 2000; i++) {
    if (st[i] == 0)
      continue;
    k(key, i, 0x22);
    int rc = tg_nonce_claim(s, key, 300, 100);
    CHECK(rc == 0 || rc == -ENOSPC);
    won2 += rc == 0;
  }
  CHECK(won2 > 32 && won2 <= 64);
  CHECK(tg_nonce_store_count(s) <= 64);
  /* A sweep drops what expired at 100 and was not reclaimed yet, then the rest at 300. */
  size_t before = tg_nonce_store_count(s);
  CHECK_INT(tg_nonce_store_sweep(s, 299), before - (size_t)won2);
  CHECK_INT(tg_nonce_store_count(s), won2);
  CHECK_INT(tg_nonce_store_sweep(s, 300), won2);
  CHECK_INT(tg_nonce_store_count(s), 0);
  tg_nonce_store_free(s);
}

TEST(many_keys_release_and_sweep_keep_the_table_consistent) {
  enum { N = 40000 };
  tg_nonce_store_t *s = tg_nonce_store_new(100000);
  CHECK(s != NULL);
  uint8_t key[32];
  for (unsigned i = 0; i < N; i++) {
    k(key, i, 0x33);
    CHECK_INT(tg_nonce_claim(s, key, i % 2 ? 20 : 10, 0), 0);
  }
  CHECK_INT(tg_nonce_store_count(s), N);
  /* Release every third key: the rest must still be found (backward-shift deletion). */
  for (unsigned i = 0; i < N; i += 3) {
    k(key, i, 0x33);
    tg_nonce_release(s, key);
  }
  for (unsigned i = 0; i < N; i++) {
    k(key, i, 0x33);
    if (i % 3 == 0) {
      CHECK_INT(tg_nonce_claim(s, key, i % 2 ? 20 : 10, 1), 0);
    } else {
      CHECK_INT(tg_nonce_claim(s, key, 50, 1), -EEXIST);
    }
  }
  /* The even keys expire at 10. */
  CHECK_INT(tg_nonce_store_sweep(s, 10), N / 2);
  CHECK_INT(tg_nonce_store_count(s), N / 2);
  for (unsigned i = 0; i < N; i++) {
    k(key, i, 0x33);
    CHECK_INT(tg_nonce_claim(s, key, 30, 10), i % 2 ? -EEXIST : 0);
  }
  CHECK_INT(tg_nonce_store_count(s), N);
  tg_nonce_store_free(s);
}

/* ---- threads ---- */

enum { THREADS = 8, KEYS = 20000, ROUNDS = 2000 };

typedef struct race {
  tg_nonce_store_t *s;
  atomic_int winners[KEYS];
  atomic_int holders[KEYS];
  atomic_int overlap; /* two holders of one key at once: must stay 0 */
  atomic_int go;
} race_t;

typedef struct worker_arg {
  race_t *r;
  unsigned id;
} worker_arg_t;

static void *claim_all(void *arg) {
  worker_arg_t *w = arg;
  while (!atomic_load(&w->r->go))
    ;
  uint8_t key[32];
  for (unsigned j = 0; j < KEYS; j++) {
    unsigned i = w->id % 2 ? j : KEYS - 1 - j; /* two orders: threads meet on the same key at once */
    k(key, i, 0x44);
    int rc = tg_nonce_claim(w->r->s, key, 1000, 1);
    if (rc == 0)
      atomic_fetch_add(&w->r->winners[i], 1);
    else if (rc != -EEXIST)
      atomic_fetch_add(&w->r->overlap, 1000);
  }
  return NULL;
}

static void *claim_release(void *arg) {
  worker_arg_t *w = arg;
  while (!atomic_load(&w->r->go))
    ;
  uint8_t key[32];
  for (unsigned round = 0; round < ROUNDS; round++)
    for (unsigned i = 0; i < 16; i++) {
      k(key, i, 0x55);
      if (tg_nonce_claim(w->r->s, key, 1000, 1) != 0)
        continue;
      if (atomic_fetch_add(&w->r->holders[i], 1) != 0)
        atomic_fetch_add(&w->r->overlap, 1);
      atomic_fetch_add(&w->r->winners[i], 1);
      atomic_fetch_sub(&w->r->holders[i], 1);
      tg_nonce_release(w->r->s, key);
    }
  return NULL;
}

static int run_threads(race_t *r, void *(*fn)(void *)) {
  pthread_t t[THREADS];
  worker_arg_t a[THREADS];
  atomic_store(&r->go, 0);
  for (unsigned i = 0; i < THREADS; i++) {
    a[i] = (worker_arg_t){r, i};
    if (pthread_create(&t[i], NULL, fn, &a[i]) != 0)
      return -1;
  }
  atomic_store(&r->go, 1);
  for (unsigned i = 0; i < THREADS; i++)
    pthread_join(t[i], NULL);
  return 0;
}

TEST(threads_one_winner_per_key) {
  static race_t r;
  memset(&r, 0, sizeof r);
  r.s = tg_nonce_store_new(100000);
  CHECK(r.s != NULL);
  CHECK_INT(run_threads(&r, claim_all), 0);
  CHECK_INT(atomic_load(&r.overlap), 0);
  for (unsigned i = 0; i < KEYS; i++)
    CHECK_INT(atomic_load(&r.winners[i]), 1);
  CHECK_INT(tg_nonce_store_count(r.s), KEYS);
  tg_nonce_store_free(r.s);
}

TEST(threads_claim_release_never_two_holders) {
  static race_t r;
  memset(&r, 0, sizeof r);
  r.s = tg_nonce_store_new(1000);
  CHECK(r.s != NULL);
  CHECK_INT(run_threads(&r, claim_release), 0);
  CHECK_INT(atomic_load(&r.overlap), 0);
  int total = 0;
  for (unsigned i = 0; i < 16; i++)
    total += atomic_load(&r.winners[i]);
  CHECK(total >= ROUNDS); /* the claims went through, not only refusals */
  CHECK_INT(tg_nonce_store_count(r.s), 0);
  tg_nonce_store_free(r.s);
}

/* ---- redis ---- */

typedef struct world {
  uv_loop_t loop;
  uv_timer_t tick;
  tg_nonce_redis_t *a, *b; /* two instances */
} world_t;

typedef struct call {
  bool done;
  int calls, status;
} call_t;

static bool in_call;
static int callbacks_inside;

static void call_cb(int status, void *ud) {
  call_t *c = ud;
  if (in_call)
    callbacks_inside++;
  c->calls++;
  c->done = true;
  c->status = status;
}

static bool call_done(void *arg) { return ((call_t *)arg)->done; }
static bool never(void *arg) {
  (void)arg;
  return false;
}
static bool both_ready(void *arg) {
  world_t *w = arg;
  return tg_nonce_redis_ready(w->a) && tg_nonce_redis_ready(w->b);
}

static int world_open(world_t *w, const redis_server_t *p, uint32_t timeout_ms) {
  memset(w, 0, sizeof(*w));
  char err[200];
  redis_loop_open(&w->loop, &w->tick);
  tg_nonce_redis_opts_t o = {
      .host = "127.0.0.1", .port = p->port, .timeout_ms = timeout_ms, .instance = "gw-a"};
  int rc = tg_nonce_redis_new(&w->loop, &o, &w->a, err, sizeof err);
  o.instance = "gw-b";
  if (rc == 0)
    rc = tg_nonce_redis_new(&w->loop, &o, &w->b, err, sizeof err);
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  return rc;
}

static int world_close(world_t *w) {
  tg_nonce_redis_free(w->a);
  tg_nonce_redis_free(w->b);
  return redis_loop_close(&w->loop, &w->tick);
}

#define RUN(w, c, expr)                                                                                      \
  do {                                                                                                       \
    memset(&(c), 0, sizeof(c));                                                                              \
    in_call = true;                                                                                          \
    int rc_ = (expr);                                                                                        \
    in_call = false;                                                                                         \
    CHECK_INT(rc_, 0);                                                                                       \
    CHECK(redis_run_until(&(w)->loop, call_done, &(c), 3000));                                               \
    CHECK_INT((c).calls, 1);                                                                                 \
  } while (0)

static int64_t now_ms(void) {
  struct timeval tv;
  gettimeofday(&tv, NULL);
  return (int64_t)tv.tv_sec * 1000 + tv.tv_usec / 1000;
}

static void key_name(char out[80], const uint8_t key[32]) {
  static const char digits[] = "0123456789abcdef";
  memcpy(out, "tg:nonce:", 9);
  for (int i = 0; i < 32; i++) {
    out[9 + 2 * i] = digits[key[i] >> 4];
    out[10 + 2 * i] = digits[key[i] & 15];
  }
  out[73] = '\0';
}

/* A command on a direct connection: its integer reply, or its string's first
 * bytes into out; -1000 on error. */
static long long direct(const redis_server_t *p, const char *cmd, const char *key, char *out, size_t cap) {
  redisContext *c = redis_direct(p);
  if (c == NULL)
    return -1000;
  redisReply *r = redisCommand(c, "%s %s", cmd, key);
  long long v = -1000;
  if (r && r->type == REDIS_REPLY_INTEGER)
    v = r->integer;
  else if (r && r->type == REDIS_REPLY_STRING && out) {
    snprintf(out, cap, "%.*s", (int)r->len, r->str);
    v = (long long)r->len;
  } else if (r && r->type == REDIS_REPLY_NIL)
    v = -1;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return v;
}

TEST(redis_two_instances_race_one_winner) {
  redis_require_server("nonce_test");
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  world_t w;
  CHECK_INT(world_open(&w, &p, 500), 0);
  CHECK(redis_run_until(&w.loop, both_ready, &w, 3000));
  int64_t exp = now_ms() + 60000;
  enum { N = 200 };
  static call_t ca[N], cb[N];
  memset(ca, 0, sizeof ca);
  memset(cb, 0, sizeof cb);
  uint8_t key[32];
  in_call = true;
  for (unsigned i = 0; i < N; i++) { /* both connections at once, first one then the other in front */
    k(key, i, 0x66);
    if (i % 2) {
      CHECK_INT(tg_nonce_redis_claim(w.a, key, exp, call_cb, &ca[i]), 0);
      CHECK_INT(tg_nonce_redis_claim(w.b, key, exp, call_cb, &cb[i]), 0);
    } else {
      CHECK_INT(tg_nonce_redis_claim(w.b, key, exp, call_cb, &cb[i]), 0);
      CHECK_INT(tg_nonce_redis_claim(w.a, key, exp, call_cb, &ca[i]), 0);
    }
  }
  in_call = false;
  CHECK(redis_run_until(&w.loop, call_done, &ca[N - 1], 3000));
  CHECK(redis_run_until(&w.loop, call_done, &cb[N - 1], 3000));
  CHECK_INT(callbacks_inside, 0);
  int a_won = 0;
  for (unsigned i = 0; i < N; i++) {
    CHECK(ca[i].calls == 1 && cb[i].calls == 1);
    CHECK((ca[i].status == 0 && cb[i].status == -EEXIST) || (ca[i].status == -EEXIST && cb[i].status == 0));
    a_won += ca[i].status == 0;
  }
  (void)a_won; /* one connection's writes may all land first: who wins is not the point */

  /* The key, its value (the winner's instance) and its expiry (PXAT validBefore). */
  char name[80], val[256];
  k(key, 0, 0x66);
  key_name(name, key);
  CHECK(direct(&p, "GET", name, val, sizeof val) > 0);
  CHECK(strncmp(val, ca[0].status == 0 ? "gw-a#" : "gw-b#", 5) == 0);
  CHECK_INT(direct(&p, "PEXPIRETIME", name, NULL, 0), exp);

  /* Release by the winner: claimable again; a second release finds nothing. */
  call_t c;
  RUN(&w, c, tg_nonce_redis_release(w.a, key, call_cb, &c));
  CHECK_INT(c.status, 0);
  RUN(&w, c, tg_nonce_redis_release(w.a, key, call_cb, &c));
  CHECK_INT(c.status, -ENOENT);
  RUN(&w, c, tg_nonce_redis_claim(w.b, key, exp, call_cb, &c));
  CHECK_INT(c.status, 0);
  RUN(&w, c, tg_nonce_redis_claim(w.a, key, exp, call_cb, &c));
  CHECK_INT(c.status, -EEXIST);

  /* Expiry: gone at validBefore. */
  k(key, 1000, 0x66);
  RUN(&w, c, tg_nonce_redis_claim(w.a, key, now_ms() + 200, call_cb, &c));
  CHECK_INT(c.status, 0);
  RUN(&w, c, tg_nonce_redis_claim(w.b, key, now_ms() + 60000, call_cb, &c));
  CHECK_INT(c.status, -EEXIST);
  redis_run_until(&w.loop, never, NULL, 300);
  RUN(&w, c, tg_nonce_redis_claim(w.b, key, now_ms() + 60000, call_cb, &c));
  CHECK_INT(c.status, 0);

  /* Bad arguments: refused at once, no callback. */
  memset(&c, 0, sizeof c);
  CHECK_INT(tg_nonce_redis_claim(w.a, key, 0, call_cb, &c), -EINVAL);
  CHECK_INT(tg_nonce_redis_claim(w.a, NULL, exp, call_cb, &c), -EINVAL);
  CHECK_INT(tg_nonce_redis_claim(NULL, key, exp, call_cb, &c), -EINVAL);
  CHECK_INT(c.calls, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

/* Two instances as two threads, each with its own loop and connection,
 * claiming the same keys at the same moment: each key has one winner. */
enum { RACE_KEYS = 500 };

typedef struct racer {
  int port;
  const char *instance;
  atomic_int *go;
  int64_t expires;
  call_t calls[RACE_KEYS];
  int failed;
} racer_t;

static bool all_done(void *arg) {
  racer_t *r = arg;
  for (unsigned i = 0; i < RACE_KEYS; i++)
    if (!r->calls[i].done)
      return false;
  return true;
}

static bool racer_ready(void *arg) { return tg_nonce_redis_ready(arg); }

static void *racer_main(void *arg) {
  racer_t *r = arg;
  uv_loop_t loop;
  uv_timer_t tick;
  char err[200];
  tg_nonce_redis_t *n = NULL;
  redis_loop_open(&loop, &tick);
  tg_nonce_redis_opts_t o = {
      .host = "127.0.0.1", .port = r->port, .timeout_ms = 2000, .instance = r->instance};
  if (tg_nonce_redis_new(&loop, &o, &n, err, sizeof err) != 0 ||
      !redis_run_until(&loop, racer_ready, n, 3000)) {
    r->failed = 1;
    atomic_fetch_add(r->go, 1);
  } else {
    atomic_fetch_add(r->go, 1);
    while (atomic_load(r->go) < 2)
      ;
    uint8_t key[32];
    for (unsigned i = 0; i < RACE_KEYS; i++) {
      k(key, i, 0x88);
      if (tg_nonce_redis_claim(n, key, r->expires, call_cb, &r->calls[i]) != 0)
        r->failed = 1;
      uv_run(&loop, UV_RUN_NOWAIT); /* sent now: the two streams interleave at the server */
    }
    if (!redis_run_until(&loop, all_done, r, 5000))
      r->failed = 1;
  }
  tg_nonce_redis_free(n);
  if (redis_loop_close(&loop, &tick) != 0)
    r->failed = 1;
  return NULL;
}

TEST(redis_two_threads_race_one_winner) {
  redis_require_server("nonce_test");
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  atomic_int go = 0;
  static racer_t a, b;
  memset(&a, 0, sizeof a);
  memset(&b, 0, sizeof b);
  a = (racer_t){.port = p.port, .instance = "gw-a", .go = &go, .expires = now_ms() + 60000};
  b = a;
  b.instance = "gw-b";
  pthread_t ta, tb;
  CHECK_INT(pthread_create(&ta, NULL, racer_main, &a), 0);
  CHECK_INT(pthread_create(&tb, NULL, racer_main, &b), 0);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  CHECK_INT(a.failed, 0);
  CHECK_INT(b.failed, 0);
  int a_won = 0;
  for (unsigned i = 0; i < RACE_KEYS; i++) {
    CHECK(a.calls[i].calls == 1 && b.calls[i].calls == 1);
    CHECK((a.calls[i].status == 0 && b.calls[i].status == -EEXIST) ||
          (a.calls[i].status == -EEXIST && b.calls[i].status == 0));
    a_won += a.calls[i].status == 0;
  }
  fprintf(stderr, "  instance a won %d of %d keys\n", a_won, RACE_KEYS);
  redis_stop(&p);
}

TEST(redis_slow_late_claim_undone_and_down_fails_closed) {
  redis_require_server("nonce_test");
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  world_t w;
  CHECK_INT(world_open(&w, &p, 100), 0);
  CHECK(redis_run_until(&w.loop, both_ready, &w, 3000));
  uint8_t key[32];
  k(key, 7, 0x77);
  call_t c;
  /* Hung: the claim times out (fail closed); its late SET is undone, so the payer may retry. */
  kill(p.pid, SIGSTOP);
  RUN(&w, c, tg_nonce_redis_claim(w.a, key, now_ms() + 60000, call_cb, &c));
  CHECK_INT(c.status, -ETIMEDOUT);
  kill(p.pid, SIGCONT);
  redis_run_until(&w.loop, never, NULL, 300);
  char name[80];
  key_name(name, key);
  CHECK_INT(direct(&p, "EXISTS", name, NULL, 0), 0);
  RUN(&w, c, tg_nonce_redis_claim(w.b, key, now_ms() + 60000, call_cb, &c));
  CHECK_INT(c.status, 0);
  /* The undo deletes only its own claim: b's stays. */
  CHECK_INT(direct(&p, "EXISTS", name, NULL, 0), 1);

  /* Down: every claim fails with an error, never 0. */
  redis_stop(&p);
  for (int i = 0; i < 5; i++) {
    k(key, 100 + (unsigned)i, 0x77);
    RUN(&w, c, tg_nonce_redis_claim(i % 2 ? w.a : w.b, key, now_ms() + 60000, call_cb, &c));
    CHECK(c.status == -ECONNREFUSED || c.status == -EIO || c.status == -ETIMEDOUT);
  }
  /* Freed with a call waiting: -ECANCELED before free returns. */
  call_t waiting = {0};
  int rc = tg_nonce_redis_claim(w.a, key, now_ms() + 60000, call_cb, &waiting);
  CHECK(rc == 0 || rc == -ECANCELED);
  tg_nonce_redis_free(w.a);
  w.a = NULL;
  if (rc == 0) {
    CHECK_INT(waiting.calls, 1);
    CHECK(waiting.status < 0);
  }
  CHECK_INT(world_close(&w), 0);
}
