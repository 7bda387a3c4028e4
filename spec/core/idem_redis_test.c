#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "base/log.h"
#include "ledger/idem.h"
#include "redis_fixture.h"
#include "test.h"

/* These tests need a real redis-server (Debian: redis-server). Without it the
 * binary says so and exits 77 (the automake "skipped" code; ctest has no
 * SKIP_RETURN_CODE for it, so there it still counts as a failure, as
 * spec/core/test.h wants of a test that cannot run its checks). */
__attribute__((constructor)) static void need_redis_server(void) {
  redis_require_server("idem_redis_test");
  tg_log_set_fd(2); /* the warnings these tests provoke go to stderr, the results to stdout */
}

/* GET key into out (NUL-terminated when it fits); its length, or -1 when absent or on error. */
static long long sync_get(const redis_server_t *p, const char *key, char *out, size_t cap) {
  redisContext *c = redis_direct(p);
  if (c == NULL)
    return -1;
  redisReply *r = redisCommand(c, "GET %s", key);
  long long len = -1;
  if (r && r->type == REDIS_REPLY_STRING) {
    len = (long long)r->len;
    memcpy(out, r->str, r->len < cap ? r->len : cap);
    if (r->len < cap)
      out[r->len] = '\0';
  }
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return len;
}

static int sync_cmd(const redis_server_t *p, const char *cmd) {
  redisContext *c = redis_direct(p);
  if (c == NULL)
    return -1;
  redisReply *r = redisCommand(c, cmd);
  int rc = r && r->type != REDIS_REPLY_ERROR ? 0 : -1;
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return rc;
}

/* ---- clients ---- */

/* One loop with two clients: two gateway instances. */
typedef struct world {
  uv_loop_t loop;
  uv_timer_t tick; /* bounds how long uv_run(UV_RUN_ONCE) blocks */
  tg_idem_redis_t *a, *b;
} world_t;

/* What one call got. */
typedef struct call {
  bool done;
  int calls; /* callbacks run: must end at 1 */
  int state;
  uint8_t resp[256];
  size_t len;
} call_t;

static bool in_call; /* set around tg_idem_redis_* calls: a callback then is a contract breach */
static int callbacks_inside;

static void call_cb(void *arg, int state, const void *resp, size_t len) {
  call_t *c = arg;
  if (in_call)
    callbacks_inside++;
  c->calls++;
  c->done = true;
  c->state = state;
  c->len = len;
  if (resp && len <= sizeof(c->resp))
    memcpy(c->resp, resp, len);
}

static void opts_for(tg_idem_redis_opts_t *o, const redis_server_t *p, const char *instance) {
  *o = (tg_idem_redis_opts_t){.host = "127.0.0.1",
                              .port = p->port,
                              .password = p->pass,
                              .timeout_ms = 200,
                              .ttl_ms = 60000,
                              .pending_ttl_ms = 10000,
                              .instance = instance};
}

static int world_open(world_t *w, const tg_idem_redis_opts_t *oa, const tg_idem_redis_opts_t *ob) {
  memset(w, 0, sizeof(*w));
  char err[200];
  redis_loop_open(&w->loop, &w->tick);
  int rc = tg_idem_redis_new(&w->loop, oa, &w->a, err, sizeof(err));
  if (rc == 0 && ob)
    rc = tg_idem_redis_new(&w->loop, ob, &w->b, err, sizeof(err));
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  return rc;
}

/* Frees the clients and runs the loop until every handle closed: 0 when it closes clean. */
static int world_close(world_t *w) {
  tg_idem_redis_free(w->a);
  tg_idem_redis_free(w->b);
  return redis_loop_close(&w->loop, &w->tick);
}

static bool run_for(world_t *w, bool (*cond)(void *), void *arg, int timeout_ms) {
  return redis_run_until(&w->loop, cond, arg, timeout_ms);
}

static bool both_ready(void *arg) {
  world_t *w = arg;
  return tg_idem_redis_ready(w->a) && (w->b == NULL || tg_idem_redis_ready(w->b));
}

static bool call_done(void *arg) {
  return ((call_t *)arg)->done;
}

static bool never(void *arg) {
  (void)arg;
  return false;
}

static void sleep_loop(world_t *w, int ms) {
  run_for(w, never, NULL, ms);
}

/* Runs one call to its callback; its state (or -1000 when it never came). */
#define RUN(w, c, expr)                                                                                     \
  do {                                                                                                      \
    memset(&(c), 0, sizeof(c));                                                                             \
    in_call = true;                                                                                         \
    int rc_ = (expr);                                                                                       \
    in_call = false;                                                                                        \
    CHECK_INT(rc_, 0);                                                                                      \
    CHECK(run_for((w), call_done, &(c), 3000));                                                             \
    CHECK_INT((c).calls, 1);                                                                                \
  } while (0)

static void k(uint8_t out[32], unsigned n, uint8_t tag) {
  memset(out, tag, 32);
  memcpy(out, &n, sizeof(n));
}

static const uint8_t RESP[] = {0x0a, 0x00, 0x00, 'o', 'k', 0x00, 0xff, 0x10, 0x00};

static void key_name(char out[80], const uint8_t scope[32]) {
  static const char digits[] = "0123456789abcdef";
  memcpy(out, "tg:idem:", 8);
  for (int i = 0; i < 32; i++) {
    out[8 + 2 * i] = digits[scope[i] >> 4];
    out[9 + 2 * i] = digits[scope[i] & 15];
  }
  out[72] = '\0';
}

TEST(race_replay_conflict) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa, ob;
  opts_for(&oa, &p, "gw-a");
  opts_for(&ob, &p, "gw-b");
  world_t w;
  CHECK_INT(world_open(&w, &oa, &ob), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  uint8_t s[32], h[32], h2[32];
  k(s, 1, 0x11);
  k(h, 1, 0x22);
  k(h2, 2, 0x22);
  /* Both instances at once: exactly one owns the key. */
  call_t ca = {0}, cb = {0};
  in_call = true;
  CHECK_INT(tg_idem_redis_begin(w.a, s, h, call_cb, &ca), 0);
  CHECK_INT(tg_idem_redis_begin(w.b, s, h, call_cb, &cb), 0);
  in_call = false;
  CHECK(!ca.done && !cb.done);
  CHECK(run_for(&w, call_done, &ca, 3000));
  CHECK(run_for(&w, call_done, &cb, 3000));
  CHECK((ca.state == TG_IDEM_NEW && cb.state == TG_IDEM_PENDING) ||
        (ca.state == TG_IDEM_PENDING && cb.state == TG_IDEM_NEW));
  tg_idem_redis_t *owner = ca.state == TG_IDEM_NEW ? w.a : w.b;
  tg_idem_redis_t *other = owner == w.a ? w.b : w.a;
  char name[80], val[256];
  key_name(name, s);
  CHECK_INT(sync_get(&p, name, val, sizeof(val)), 1 + 64 + 4);
  CHECK(val[0] == 'P');
  CHECK(memcmp(val + 65, owner == w.a ? "gw-a" : "gw-b", 4) == 0);
  call_t c;
  RUN(&w, c, tg_idem_redis_begin(other, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_CONFLICT);
  RUN(&w, c, tg_idem_redis_begin(other, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_PENDING);
  RUN(&w, c, tg_idem_redis_finish(owner, s, h, RESP, sizeof(RESP), call_cb, &c));
  CHECK_INT(c.state, 0);
  CHECK_INT(sync_get(&p, name, val, sizeof(val)), 1 + 64 + (long long)sizeof(RESP));
  CHECK(val[0] == 'D');
  CHECK(memcmp(val + 65, RESP, sizeof(RESP)) == 0);
  /* The replay, on either instance, is byte for byte the stored answer, NULs included. */
  for (int i = 0; i < 2; i++) {
    RUN(&w, c, tg_idem_redis_begin(i ? owner : other, s, h, call_cb, &c));
    CHECK_INT(c.state, TG_IDEM_DONE);
    CHECK_INT(c.len, sizeof(RESP));
    CHECK(memcmp(c.resp, RESP, sizeof(RESP)) == 0);
  }
  RUN(&w, c, tg_idem_redis_begin(other, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_CONFLICT);
  /* A retried finish (same hash) is stored again; an abort no longer matches. */
  RUN(&w, c, tg_idem_redis_finish(owner, s, h, RESP, sizeof(RESP), call_cb, &c));
  CHECK_INT(c.state, 0);
  RUN(&w, c, tg_idem_redis_abort(owner, s, h, call_cb, &c));
  CHECK_INT(c.state, -ENOENT);
  /* The DONE value lives ttl_ms. */
  redisContext *sc = redis_direct(&p);
  CHECK(sc != NULL);
  redisReply *rep = redisCommand(sc, "PTTL %s", name);
  CHECK(rep && rep->type == REDIS_REPLY_INTEGER && rep->integer > 50000 && rep->integer <= 60000);
  freeReplyObject(rep);
  redisFree(sc);
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

/* Many keys begun by two instances at once, each on its own loop and thread
 * (two gateways): one NEW per key, every time. */
enum { RACE_KEYS = 300 };

typedef struct racer {
  const redis_server_t *p;
  const char *instance;
  pthread_barrier_t *start;
  call_t calls[RACE_KEYS];
  int ok; /* 1 once every callback ran */
} racer_t;

static bool all_done(void *arg) {
  racer_t *r = arg;
  for (int i = 0; i < RACE_KEYS; i++)
    if (!r->calls[i].done)
      return false;
  return true;
}

static void *race_thread(void *arg) {
  racer_t *r = arg;
  tg_idem_redis_opts_t o;
  opts_for(&o, r->p, r->instance);
  o.timeout_ms = 3000;
  world_t w;
  int opened = world_open(&w, &o, NULL);
  bool ready = opened == 0 && run_for(&w, both_ready, &w, 3000);
  pthread_barrier_wait(r->start);
  uint8_t h[32];
  k(h, 0, 0x33);
  for (unsigned i = 0; ready && i < RACE_KEYS; i++) {
    uint8_t s[32];
    k(s, i, 0x44);
    if (tg_idem_redis_begin(w.a, s, h, call_cb, &r->calls[i]) != 0)
      ready = false;
    if (i % 10 == 9) /* in small batches, so the two connections interleave at the server */
      uv_run(&w.loop, UV_RUN_NOWAIT);
  }
  r->ok = ready && run_for(&w, all_done, r, 5000);
  if (opened == 0)
    world_close(&w);
  return NULL;
}

TEST(race_two_threads) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  static racer_t ra, rb;
  pthread_barrier_t start;
  pthread_barrier_init(&start, NULL, 2);
  ra = (racer_t){.p = &p, .instance = "gw-a", .start = &start};
  rb = (racer_t){.p = &p, .instance = "gw-b", .start = &start};
  pthread_t ta, tb;
  CHECK_INT(pthread_create(&ta, NULL, race_thread, &ra), 0);
  CHECK_INT(pthread_create(&tb, NULL, race_thread, &rb), 0);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&start);
  CHECK(ra.ok && rb.ok);
  int a_new = 0, b_new = 0;
  for (unsigned i = 0; i < RACE_KEYS; i++) {
    const call_t *a = &ra.calls[i], *b = &rb.calls[i];
    CHECK(a->calls == 1 && b->calls == 1);
    CHECK((a->state == TG_IDEM_NEW && b->state == TG_IDEM_PENDING) ||
          (a->state == TG_IDEM_PENDING && b->state == TG_IDEM_NEW));
    a_new += a->state == TG_IDEM_NEW;
    b_new += b->state == TG_IDEM_NEW;
  }
  printf("  race: instance a won %d keys, b won %d\n", a_new, b_new);
  redis_stop(&p);
}

TEST(abort_frees_the_key) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa, ob;
  opts_for(&oa, &p, "gw-a");
  opts_for(&ob, &p, "gw-b");
  world_t w;
  CHECK_INT(world_open(&w, &oa, &ob), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  uint8_t s[32], h[32], h2[32];
  k(s, 5, 0x55);
  k(h, 1, 0x66);
  k(h2, 2, 0x66);
  call_t c;
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  /* Only the owner's PENDING value is deleted: not another instance's, nor another hash. */
  RUN(&w, c, tg_idem_redis_abort(w.b, s, h, call_cb, &c));
  CHECK_INT(c.state, -ENOENT);
  RUN(&w, c, tg_idem_redis_abort(w.a, s, h2, call_cb, &c));
  CHECK_INT(c.state, -ENOENT);
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_PENDING);
  RUN(&w, c, tg_idem_redis_abort(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, 0);
  char name[80], val[256];
  key_name(name, s);
  CHECK_INT(sync_get(&p, name, val, sizeof(val)), -1);
  /* Free again: a new request (even with another body) owns it. */
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

TEST(pending_expires) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa, ob;
  opts_for(&oa, &p, "gw-a");
  opts_for(&ob, &p, "gw-b");
  oa.pending_ttl_ms = ob.pending_ttl_ms = 300;
  world_t w;
  CHECK_INT(world_open(&w, &oa, &ob), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  uint8_t s[32], s2[32], h[32], h2[32];
  k(s, 1, 0x77);
  k(s2, 2, 0x77);
  k(h, 1, 0x88);
  k(h2, 2, 0x88);
  call_t c;
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_PENDING);
  sleep_loop(&w, 450); /* instance a "died": its PENDING value goes after pending_ttl_ms */
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  /* a's late finish must not overwrite b's request with another hash. */
  RUN(&w, c, tg_idem_redis_finish(w.a, s, h, RESP, sizeof(RESP), call_cb, &c));
  CHECK_INT(c.state, -ESTALE);
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_PENDING);
  /* A finish whose PENDING value expired with nobody after it is stored anyway. */
  RUN(&w, c, tg_idem_redis_begin(w.a, s2, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  sleep_loop(&w, 450);
  RUN(&w, c, tg_idem_redis_finish(w.a, s2, h, RESP, sizeof(RESP), call_cb, &c));
  CHECK_INT(c.state, 0);
  RUN(&w, c, tg_idem_redis_begin(w.b, s2, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_DONE);
  CHECK_INT(c.len, sizeof(RESP));
  CHECK(memcmp(c.resp, RESP, sizeof(RESP)) == 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

/* The server forgot the script (restart, SCRIPT FLUSH): EVAL reloads it. */
TEST(noscript_falls_back_to_eval) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa;
  opts_for(&oa, &p, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &oa, NULL), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  CHECK_INT(sync_cmd(&p, "SCRIPT FLUSH"), 0);
  uint8_t s[32], h[32];
  k(s, 1, 0x99);
  k(h, 1, 0xaa);
  call_t c;
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  CHECK_INT(sync_cmd(&p, "SCRIPT FLUSH"), 0);
  RUN(&w, c, tg_idem_redis_finish(w.a, s, h, RESP, sizeof(RESP), call_cb, &c));
  CHECK_INT(c.state, 0);
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_DONE);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

TEST(password_and_db) {
  redis_server_t p = {.pass = "s3cret-pass"};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa, ob;
  opts_for(&oa, &p, "gw-a");
  oa.db = 3;
  opts_for(&ob, &p, "gw-b");
  ob.password = "wrong";
  ob.timeout_ms = 100;
  world_t w;
  CHECK_INT(world_open(&w, &oa, &ob), 0);
  CHECK(run_for(&w, both_ready, &w, 500) == false); /* b is refused */
  CHECK(tg_idem_redis_ready(w.a));
  uint8_t s[32], h[32];
  k(s, 1, 0xbb);
  k(h, 1, 0xcc);
  call_t c;
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  char name[80], val[256];
  key_name(name, s);
  CHECK_INT(sync_get(&p, name, val, sizeof(val)), -1); /* db 0 */
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h, call_cb, &c));
  CHECK(c.state < 0); /* refused AUTH: an error, never NEW */
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

/* Redis down, slow or gone: an error, never NEW (fail closed). */
TEST(redis_down_fails_closed) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa, ob;
  opts_for(&oa, &p, "gw-a");
  oa.timeout_ms = 100;
  opts_for(&ob, &p, "gw-b");
  world_t w;
  CHECK_INT(world_open(&w, &oa, &ob), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  uint8_t s[32], h[32], h2[32];
  k(s, 1, 0xdd);
  k(h, 1, 0xee);
  k(h2, 2, 0xee);
  call_t c;

  /* Slow: no answer in timeout_ms. */
  kill(p.pid, SIGSTOP);
  uint64_t t0 = uv_hrtime();
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  uint64_t took_ms = (uv_hrtime() - t0) / 1000000;
  CHECK_INT(c.state, -ETIMEDOUT);
  CHECK(took_ms >= 90 && took_ms < 1000);
  kill(p.pid, SIGCONT);
  /* The SET ran after all: that late NEW was released by itself, so the key is free. */
  sleep_loop(&w, 300);
  RUN(&w, c, tg_idem_redis_begin(w.b, s, h2, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  RUN(&w, c, tg_idem_redis_abort(w.b, s, h2, call_cb, &c));
  CHECK_INT(c.state, 0);

  /* Gone: waiting calls and the ones after get an error. */
  kill(p.pid, SIGSTOP);
  call_t waiting = {0};
  CHECK_INT(tg_idem_redis_begin(w.b, s, h, call_cb, &waiting), 0);
  sleep_loop(&w, 20);
  kill(p.pid, SIGKILL); /* while stopped: it never answers */
  redis_stop(&p);
  CHECK(run_for(&w, call_done, &waiting, 3000));
  CHECK_INT(waiting.calls, 1);
  if (waiting.state >= 0)
    fprintf(stderr, "  waiting got %d\n", waiting.state);
  CHECK(waiting.state == -EIO || waiting.state == -ETIMEDOUT || waiting.state == -ECONNREFUSED);
  for (int i = 0; i < 5; i++) {
    RUN(&w, c, tg_idem_redis_begin(i & 1 ? w.a : w.b, s, h, call_cb, &c));
    CHECK(c.state == -ECONNREFUSED || c.state == -EIO || c.state == -ETIMEDOUT);
    RUN(&w, c, tg_idem_redis_finish(w.a, s, h, RESP, sizeof(RESP), call_cb, &c));
    CHECK(c.state < 0);
    sleep_loop(&w, 50);
  }
  CHECK(!tg_idem_redis_ready(w.a));

  /* Back on the same port: the clients reconnect by themselves. */
  CHECK_INT(redis_start(&p), 0);
  CHECK(run_for(&w, both_ready, &w, 5000));
  RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
  CHECK_INT(c.state, TG_IDEM_NEW);
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&p);
}

TEST(nothing_listening) {
  redis_server_t p = {.port = redis_free_port()};
  tg_idem_redis_opts_t oa;
  opts_for(&oa, &p, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &oa, NULL), 0);
  uint8_t s[32], h[32];
  k(s, 1, 1);
  k(h, 1, 2);
  call_t c;
  for (int i = 0; i < 3; i++) {
    RUN(&w, c, tg_idem_redis_begin(w.a, s, h, call_cb, &c));
    CHECK(c.state == -ECONNREFUSED || c.state == -EIO);
    sleep_loop(&w, 30);
  }
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
}

TEST(free_cancels_waiting_calls) {
  redis_server_t p = {0};
  CHECK_INT(redis_start(&p), 0);
  tg_idem_redis_opts_t oa;
  opts_for(&oa, &p, "gw-a");
  oa.timeout_ms = 5000;
  world_t w;
  CHECK_INT(world_open(&w, &oa, NULL), 0);
  CHECK(run_for(&w, both_ready, &w, 3000));
  uint8_t s[32], h[32];
  k(s, 1, 3);
  k(h, 1, 4);
  kill(p.pid, SIGSTOP);
  call_t c1 = {0}, c2 = {0};
  CHECK_INT(tg_idem_redis_begin(w.a, s, h, call_cb, &c1), 0);
  CHECK_INT(tg_idem_redis_finish(w.a, s, h, RESP, sizeof(RESP), call_cb, &c2), 0);
  sleep_loop(&w, 20);
  CHECK(!c1.done && !c2.done);
  tg_idem_redis_free(w.a);
  CHECK(c1.calls == 1 && c2.calls == 1);
  CHECK_INT(c1.state, -ECANCELED);
  CHECK_INT(c2.state, -ECANCELED);
  w.a = NULL;
  kill(p.pid, SIGCONT);
  CHECK_INT(world_close(&w), 0);
  CHECK(c1.calls == 1 && c2.calls == 1);
  redis_stop(&p);
}

TEST(bad_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[200] = "";
  tg_idem_redis_t *r = (tg_idem_redis_t *)1;
  tg_idem_redis_opts_t o = {.host = "127.0.0.1", .port = 1, .ttl_ms = 0, .pending_ttl_ms = 1000};
  CHECK_INT(tg_idem_redis_new(&loop, &o, &r, err, sizeof(err)), -EINVAL);
  CHECK(r == NULL);
  CHECK(err[0] != '\0');
  o.ttl_ms = 1000;
  o.host = NULL;
  CHECK_INT(tg_idem_redis_new(&loop, &o, &r, err, sizeof(err)), -EINVAL);
  o.host = "127.0.0.1";
  o.port = redis_free_port();
  CHECK_INT(tg_idem_redis_new(&loop, &o, &r, err, sizeof(err)), 0);
  uint8_t s[32] = {0};
  call_t c = {0};
  CHECK_INT(tg_idem_redis_begin(r, NULL, s, call_cb, &c), -EINVAL);
  CHECK_INT(tg_idem_redis_begin(r, s, s, NULL, &c), -EINVAL);
  CHECK_INT(tg_idem_redis_finish(r, s, s, NULL, 4, call_cb, &c), -EINVAL);
  CHECK_INT(tg_idem_redis_finish(r, s, s, RESP, TG_IDEM_REDIS_MAX_RESPONSE + 1, call_cb, &c), -EMSGSIZE);
  tg_idem_redis_free(r);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  CHECK_INT(c.calls, 0);
}
