#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <unistd.h>

#include <hiredis/hiredis.h>
#include <uv.h>

#include "base/log.h"
#include "billing/billing.h"
#include "ledger/prepaid_redis.h"
#include "redis_fixture.h"
#include "test.h"

/* Needs a real redis-server (Debian: redis-server); without it: exit 77. */
__attribute__((constructor)) static void need_redis_server(void) {
  redis_require_server("prepaid_redis_test");
  tg_log_set_fd(2);
}

/* An integer reply of a direct command (HGET as a decimal string, EXISTS...),
 * or LLONG_MIN when absent or failed. */
static long long direct_int(const redis_server_t *s, const char *fmt, const char *a, const char *b) {
  redisContext *c = redis_direct(s);
  if (c == NULL)
    return LLONG_MIN;
  redisReply *r = b ? redisCommand(c, fmt, a, b) : a ? redisCommand(c, fmt, a) : redisCommand(c, fmt);
  long long v = LLONG_MIN;
  if (r && r->type == REDIS_REPLY_INTEGER)
    v = r->integer;
  else if (r && r->type == REDIS_REPLY_STRING)
    v = strtoll(r->str, NULL, 10);
  if (r)
    freeReplyObject(r);
  redisFree(c);
  return v;
}

/* ---- a loop with one or two clients ---- */

typedef struct world {
  uv_loop_t loop;
  uv_timer_t tick; /* bounds how long uv_run(UV_RUN_ONCE) blocks */
  tg_prepaid_redis_t *a, *b;
} world_t;

static void opts_for(tg_prepaid_redis_opts_t *o, const redis_server_t *s, const char *instance) {
  *o = (tg_prepaid_redis_opts_t){
      .host = "127.0.0.1", .port = s->port, .timeout_ms = 500, .hold_ttl_ms = 60000, .instance = instance};
}

static int world_open(world_t *w, const tg_prepaid_redis_opts_t *oa, const tg_prepaid_redis_opts_t *ob) {
  memset(w, 0, sizeof(*w));
  char err[200];
  redis_loop_open(&w->loop, &w->tick);
  int rc = tg_prepaid_redis_new(&w->loop, oa, &w->a, err, sizeof(err));
  if (rc == 0 && ob)
    rc = tg_prepaid_redis_new(&w->loop, ob, &w->b, err, sizeof(err));
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  return rc;
}

static int world_close(world_t *w) {
  tg_prepaid_redis_free(w->a);
  tg_prepaid_redis_free(w->b);
  return redis_loop_close(&w->loop, &w->tick);
}

static bool ready(void *arg) {
  world_t *w = arg;
  return tg_prepaid_redis_ready(w->a) && (w->b == NULL || tg_prepaid_redis_ready(w->b));
}

static bool never(void *arg) {
  (void)arg;
  return false;
}

static void pause_ms(uv_loop_t *loop, int ms) {
  redis_run_until(loop, never, NULL, ms);
}

/* What one call got. */
typedef struct res {
  bool done;
  int calls;
  int status;
  int64_t a, b; /* available / balance, held */
  char hold[64];
} res_t;

static bool in_call; /* set around the calls: a callback then breaks the contract */
static int callbacks_inside;

static void seen(res_t *r) {
  if (in_call)
    callbacks_inside++;
  r->calls++;
  r->done = true;
}

static void hold_cb(void *arg, int status, const char *hold_id, int64_t available) {
  res_t *r = arg;
  seen(r);
  r->status = status;
  r->a = available;
  snprintf(r->hold, sizeof(r->hold), "%s", hold_id ? hold_id : "");
}

static void done_cb(void *arg, int status, int64_t balance) {
  res_t *r = arg;
  seen(r);
  r->status = status;
  r->a = balance;
}

static void balance_cb(void *arg, int status, int64_t balance, int64_t held) {
  res_t *r = arg;
  seen(r);
  r->status = status;
  r->a = balance;
  r->b = held;
}

static bool res_done(void *arg) {
  return ((res_t *)arg)->done;
}

#define RUN(loop, r, expr)                                                                                  \
  do {                                                                                                      \
    memset(&(r), 0, sizeof(r));                                                                             \
    in_call = true;                                                                                         \
    int rc_ = (expr);                                                                                       \
    in_call = false;                                                                                        \
    CHECK_INT(rc_, 0);                                                                                      \
    CHECK(!(r).done);                                                                                       \
    CHECK(redis_run_until((loop), res_done, &(r), 5000));                                                   \
    CHECK_INT((r).calls, 1);                                                                                \
  } while (0)

#define USD "USD"

TEST(credit_is_idempotent) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  res_t r;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", USD, 1000, "topup-1", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 1000);
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", USD, 1000, "topup-1", done_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 1000);
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", USD, 500, "topup-2", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 1500);
  /* Without a reference, every credit counts. */
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", USD, 1, NULL, done_cb, &r));
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", USD, 1, "", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 1502);
  /* Another currency is another account. */
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-1", "EUR", 7, "topup-3", done_cb, &r));
  CHECK_INT(r.a, 7);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-1", USD, balance_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 1502);
  CHECK_INT(r.b, 0);
  CHECK_INT(direct_int(&s, "HGET %s balance", "tg:acct:{acct-1}:USD", NULL), 1502);
  CHECK_INT(direct_int(&s, "EXISTS %s", "tg:credit:topup-1", NULL), 1);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "nobody", USD, balance_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 0);
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}

TEST(hold_release_capture) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  res_t r, h1, h2;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-2", USD, 1000, "t2", done_cb, &r));
  RUN(&w.loop, h1, tg_prepaid_redis_hold(w.a, "acct-2", USD, 600, hold_cb, &h1));
  CHECK_INT(h1.status, 0);
  CHECK_INT(h1.a, 400);
  CHECK_INT(strlen(h1.hold), TG_PREPAID_REDIS_HOLD_ID_LEN);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-2", USD, 401, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  CHECK_INT(r.a, 400);
  CHECK_STR(r.hold, "");
  /* A hold of 0 always succeeds, even on an account that does not exist. */
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-2", USD, 0, hold_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 400);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "ghost", USD, 0, hold_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK(strcmp(r.hold, h1.hold) != 0);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "ghost", USD, 1, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  CHECK_INT(r.a, 0);
  CHECK_INT(direct_int(&s, "EXISTS %s", "tg:acct:{ghost}:USD", NULL), 0);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-2", USD, balance_cb, &r));
  CHECK_INT(r.a, 1000);
  CHECK_INT(r.b, 600);
  /* Release gives it back, once. */
  RUN(&w.loop, r, tg_prepaid_redis_release(w.a, "acct-2", USD, h1.hold, done_cb, &r));
  CHECK_INT(r.status, 1);
  RUN(&w.loop, r, tg_prepaid_redis_release(w.a, "acct-2", USD, h1.hold, done_cb, &r));
  CHECK_INT(r.status, 0);
  RUN(&w.loop, h2, tg_prepaid_redis_hold(w.a, "acct-2", USD, 1000, hold_cb, &h2));
  CHECK_INT(h2.status, 0);
  CHECK_INT(h2.a, 0);
  /* Capture: the balance goes down, the hold goes; the same txid again charges nothing. */
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "acct-2", USD, 700, h2.hold, "tx_1", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 300);
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "acct-2", USD, 700, h2.hold, "tx_1", done_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 300);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-2", USD, balance_cb, &r));
  CHECK_INT(r.a, 300);
  CHECK_INT(r.b, 0);
  long long pttl = direct_int(&s, "PTTL %s", "tg:captured:tx_1", NULL);
  CHECK(pttl > 6LL * 24 * 3600 * 1000 && pttl <= 7LL * 24 * 3600 * 1000);
  /* The hold was dropped with the capture: releasing it finds nothing. */
  RUN(&w.loop, r, tg_prepaid_redis_release(w.a, "acct-2", USD, h2.hold, done_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}

/* An instance that died between hold and capture: its hold goes after the
 * TTL, and a capture that comes late still debits, once. */
TEST(expired_hold_is_freed) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  o.hold_ttl_ms = 200;
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  res_t r, h1, h2;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-3", USD, 100, "t3", done_cb, &r));
  RUN(&w.loop, h1, tg_prepaid_redis_hold(w.a, "acct-3", USD, 100, hold_cb, &h1));
  CHECK_INT(h1.status, 0);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-3", USD, 1, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  pause_ms(&w.loop, 300);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-3", USD, balance_cb, &r));
  CHECK_INT(r.a, 100);
  CHECK_INT(r.b, 0);
  RUN(&w.loop, h2, tg_prepaid_redis_hold(w.a, "acct-3", USD, 60, hold_cb, &h2));
  CHECK_INT(h2.status, 0);
  CHECK_INT(h2.a, 40);
  /* The late capture of the expired hold: owed, so debited (the balance may go below what is held). */
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "acct-3", USD, 100, h1.hold, "tx_late", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 0);
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "acct-3", USD, 100, h1.hold, "tx_late", done_cb, &r));
  CHECK_INT(r.status, 0);
  CHECK_INT(r.a, 0);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-3", USD, balance_cb, &r));
  CHECK_INT(r.a, 0);
  CHECK_INT(r.b, 60);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-3", USD, 1, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  CHECK_INT(r.a, -60);
  /* Nobody touches the account again: its hold keys go by themselves. */
  pause_ms(&w.loop, 300);
  CHECK_INT(direct_int(&s, "EXISTS %s", "tg:holds:{acct-3}:USD", NULL), 0);
  CHECK_INT(direct_int(&s, "EXISTS %s", "tg:hold:{acct-3}:USD", NULL), 0);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-3", USD, balance_cb, &r));
  CHECK_INT(r.a, 0);
  CHECK_INT(r.b, 0);
  CHECK_INT(direct_int(&s, "HGET %s held", "tg:acct:{acct-3}:USD", NULL), 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}

TEST(amounts_near_2_pow_53) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  const int64_t max = INT64_C(1) << 53;
  res_t r, h;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "big", USD, max - 1, "b1", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, max - 1);
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "big", USD, 2, "b2", done_cb, &r));
  CHECK_INT(r.status, -EOVERFLOW);
  /* A refused credit does not use its reference up. */
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "big", USD, 1, "b2", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, max);
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "big", USD, 1, "b3", done_cb, &r));
  CHECK_INT(r.status, -EOVERFLOW);
  CHECK_INT(direct_int(&s, "HGET %s balance", "tg:acct:{big}:USD", NULL), max);
  RUN(&w.loop, h, tg_prepaid_redis_hold(w.a, "big", USD, max - 1, hold_cb, &h));
  CHECK_INT(h.status, 0);
  CHECK_INT(h.a, 1);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "big", USD, 2, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  CHECK_INT(r.a, 1);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "big", USD, balance_cb, &r));
  CHECK_INT(r.a, max);
  CHECK_INT(r.b, max - 1);
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "big", USD, max - 3, h.hold, "tx_big", done_cb, &r));
  CHECK_INT(r.status, 1);
  CHECK_INT(r.a, 3);
  CHECK_INT(direct_int(&s, "HGET %s balance", "tg:acct:{big}:USD", NULL), 3);
  CHECK_INT(direct_int(&s, "HGET %s held", "tg:acct:{big}:USD", NULL), 0);
  /* Odd values just below 2^53 (not representable as float: must stay exact). */
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "big2", USD, max - 7, NULL, done_cb, &r));
  RUN(&w.loop, h, tg_prepaid_redis_hold(w.a, "big2", USD, max - 8, hold_cb, &h));
  CHECK_INT(h.status, 0);
  CHECK_INT(h.a, 1);
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "big2", USD, max - 9, h.hold, "tx_big2", done_cb, &r));
  CHECK_INT(r.a, 2);
  /* Out of range: refused before Redis. */
  CHECK_INT(tg_prepaid_redis_hold(w.a, "big", USD, max + 1, hold_cb, &r), -EINVAL);
  CHECK_INT(tg_prepaid_redis_credit(w.a, "big", USD, max + 1, NULL, done_cb, &r), -EINVAL);
  CHECK_INT(tg_prepaid_redis_hold(w.a, "big", USD, -1, hold_cb, &r), -EINVAL);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}

/* Two instances (each its own loop and thread) hold on one account at once:
 * what they hold never passes the balance, and after the captures the
 * balance is exact. */
enum { RACE_HOLDS = 300, RACE_BALANCE = 10000 };

typedef struct racer {
  const redis_server_t *s;
  const char *instance;
  pthread_barrier_t *start;
  res_t holds[RACE_HOLDS];
  res_t captures[RACE_HOLDS];
  int64_t held; /* sum of the successful holds */
  int upto;     /* holds sent so far */
  int ok;
} racer_t;

static int64_t race_amount(int i) {
  return 7 + (i * 37) % 91; /* 7..97 */
}

static bool holds_done(void *arg) {
  racer_t *r = arg;
  for (int i = 0; i < RACE_HOLDS; i++)
    if (!r->holds[i].done)
      return false;
  return true;
}

static bool batch_done(void *arg) {
  racer_t *r = arg;
  for (int i = 0; i < r->upto; i++)
    if (!r->holds[i].done)
      return false;
  return true;
}

static bool captures_done(void *arg) {
  racer_t *r = arg;
  for (int i = 0; i < RACE_HOLDS; i++)
    if (r->holds[i].status == 0 && !r->captures[i].done)
      return false;
  return true;
}

static void *race_thread(void *arg) {
  racer_t *r = arg;
  tg_prepaid_redis_opts_t o;
  opts_for(&o, r->s, r->instance);
  o.timeout_ms = 5000;
  world_t w;
  int opened = world_open(&w, &o, NULL);
  bool ok = opened == 0 && redis_run_until(&w.loop, ready, &w, 3000);
  pthread_barrier_wait(r->start);
  for (int i = 0; ok && i < RACE_HOLDS; i++) {
    if (tg_prepaid_redis_hold(w.a, "shared", USD, race_amount(i), hold_cb, &r->holds[i]) != 0)
      ok = false;
    /* Batches of 10, each answered before the next: both instances keep
     * asking while the money runs out, their calls interleaved at the server. */
    if (i % 10 == 9) {
      r->upto = i + 1;
      ok = redis_run_until(&w.loop, batch_done, r, 10000);
    }
  }
  ok = ok && redis_run_until(&w.loop, holds_done, r, 10000);
  /* Captures on the first barrier pass: the other instance may still be holding. */
  pthread_barrier_wait(r->start);
  for (int i = 0; ok && i < RACE_HOLDS; i++) {
    if (r->holds[i].status != 0)
      continue;
    r->held += race_amount(i);
    char tx[64];
    snprintf(tx, sizeof(tx), "tx_%s_%d", r->instance, i);
    if (tg_prepaid_redis_capture(w.a, "shared", USD, race_amount(i), r->holds[i].hold, tx, done_cb,
                                 &r->captures[i]) != 0)
      ok = false;
  }
  r->ok = ok && redis_run_until(&w.loop, captures_done, r, 10000);
  if (opened == 0)
    world_close(&w);
  return NULL;
}

TEST(two_instances_never_overspend) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  {
    tg_prepaid_redis_opts_t o;
    opts_for(&o, &s, "setup");
    world_t w;
    CHECK_INT(world_open(&w, &o, NULL), 0);
    CHECK(redis_run_until(&w.loop, ready, &w, 3000));
    res_t r;
    RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "shared", USD, RACE_BALANCE, "race", done_cb, &r));
    CHECK_INT(world_close(&w), 0);
  }
  static racer_t ra, rb;
  pthread_barrier_t start;
  pthread_barrier_init(&start, NULL, 2);
  ra = (racer_t){.s = &s, .instance = "gw-a", .start = &start};
  rb = (racer_t){.s = &s, .instance = "gw-b", .start = &start};
  pthread_t ta, tb;
  CHECK_INT(pthread_create(&ta, NULL, race_thread, &ra), 0);
  CHECK_INT(pthread_create(&tb, NULL, race_thread, &rb), 0);
  pthread_join(ta, NULL);
  pthread_join(tb, NULL);
  pthread_barrier_destroy(&start);
  CHECK(ra.ok && rb.ok);
  int64_t held = ra.held + rb.held, refused_min = INT64_MAX;
  int won_a = 0, won_b = 0;
  for (int i = 0; i < RACE_HOLDS; i++) {
    const racer_t *both[2] = {&ra, &rb};
    for (int k = 0; k < 2; k++) {
      const res_t *h = &both[k]->holds[i];
      CHECK_INT(h->calls, 1);
      CHECK(h->status == 0 || h->status == -ENOSPC);
      if (h->status == 0) {
        CHECK_INT(both[k]->captures[i].status, 1);
        k ? won_b++ : won_a++;
      } else if (race_amount(i) < refused_min) {
        refused_min = race_amount(i);
      }
    }
  }
  printf("  race: a held %d times (%" PRId64 "), b %d times (%" PRId64 ")\n", won_a, ra.held, won_b, rb.held);
  CHECK(held <= RACE_BALANCE);
  /* Both asked for far more than there was: what is left is less than the smallest refused hold. */
  CHECK(refused_min != INT64_MAX);
  CHECK(RACE_BALANCE - held < 97);
  CHECK(won_a > 0 && won_b > 0);
  CHECK_INT(direct_int(&s, "HGET %s balance", "tg:acct:{shared}:USD", NULL), RACE_BALANCE - held);
  CHECK_INT(direct_int(&s, "HGET %s held", "tg:acct:{shared}:USD", NULL), 0);
  redis_stop(&s);
}

/* Redis slow or down: an error, never "held". */
TEST(redis_down_never_holds) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  o.timeout_ms = 100;
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  res_t r;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-d", USD, 500, "td", done_cb, &r));
  /* Slow: -ETIMEDOUT; the hold made after all is released by the client. */
  kill(s.pid, SIGSTOP);
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-d", USD, 200, hold_cb, &r));
  CHECK_INT(r.status, -ETIMEDOUT);
  CHECK_STR(r.hold, "");
  kill(s.pid, SIGCONT);
  pause_ms(&w.loop, 300);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-d", USD, balance_cb, &r));
  CHECK_INT(r.a, 500);
  CHECK_INT(r.b, 0);
  /* The server forgot its scripts: EVAL loads them again. */
  redisContext *c = redis_direct(&s);
  CHECK(c != NULL);
  freeReplyObject(redisCommand(c, "SCRIPT FLUSH"));
  redisFree(c);
  res_t h;
  RUN(&w.loop, h, tg_prepaid_redis_hold(w.a, "acct-d", USD, 200, hold_cb, &h));
  CHECK_INT(h.status, 0);
  RUN(&w.loop, r, tg_prepaid_redis_release(w.a, "acct-d", USD, h.hold, done_cb, &r));
  CHECK_INT(r.status, 1);
  /* Gone. */
  redis_stop(&s);
  for (int i = 0; i < 4; i++) {
    RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-d", USD, 1, hold_cb, &r));
    CHECK(r.status == -ECONNREFUSED || r.status == -EIO || r.status == -ETIMEDOUT);
    CHECK_STR(r.hold, "");
    RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, "acct-d", USD, 1, NULL, "tx_d", done_cb, &r));
    CHECK(r.status < 0);
    pause_ms(&w.loop, 50);
  }
  CHECK(!tg_prepaid_redis_ready(w.a));
  /* Back on the same port (empty: no persistence): the client reconnects. */
  CHECK_INT(redis_start(&s), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 5000));
  RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "acct-d", USD, 1, hold_cb, &r));
  CHECK_INT(r.status, -ENOSPC);
  CHECK_INT(callbacks_inside, 0);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}

TEST(nothing_listening) {
  redis_server_t s = {.port = redis_free_port()};
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  res_t r;
  for (int i = 0; i < 3; i++) {
    RUN(&w.loop, r, tg_prepaid_redis_hold(w.a, "x", USD, 0, hold_cb, &r));
    CHECK(r.status == -ECONNREFUSED || r.status == -EIO);
    pause_ms(&w.loop, 30);
  }
  CHECK_INT(world_close(&w), 0);
}

TEST(free_cancels_waiting_calls) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  o.timeout_ms = 5000;
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  kill(s.pid, SIGSTOP);
  res_t a = {0}, b = {0};
  CHECK_INT(tg_prepaid_redis_hold(w.a, "x", USD, 1, hold_cb, &a), 0);
  CHECK_INT(tg_prepaid_redis_balance(w.a, "x", USD, balance_cb, &b), 0);
  pause_ms(&w.loop, 20);
  CHECK(!a.done && !b.done);
  tg_prepaid_redis_free(w.a);
  w.a = NULL;
  CHECK(a.calls == 1 && b.calls == 1);
  CHECK_INT(a.status, -ECANCELED);
  CHECK_INT(b.status, -ECANCELED);
  kill(s.pid, SIGCONT);
  CHECK_INT(world_close(&w), 0);
  CHECK(a.calls == 1 && b.calls == 1);
  redis_stop(&s);
}

TEST(bad_arguments) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  char err[200] = "";
  tg_prepaid_redis_t *r = (tg_prepaid_redis_t *)1;
  tg_prepaid_redis_opts_t o = {.host = NULL, .port = 1};
  CHECK_INT(tg_prepaid_redis_new(&loop, &o, &r, err, sizeof(err)), -EINVAL);
  CHECK(r == NULL);
  CHECK(err[0] != '\0');
  o.host = "127.0.0.1";
  o.port = redis_free_port();
  CHECK_INT(tg_prepaid_redis_new(&loop, &o, &r, err, sizeof(err)), 0);
  res_t c = {0};
  char long_ref[TG_PREPAID_REDIS_MAX_REF + 2];
  memset(long_ref, 'a', sizeof(long_ref) - 1);
  long_ref[sizeof(long_ref) - 1] = '\0';
  CHECK_INT(tg_prepaid_redis_hold(r, "", USD, 1, hold_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_hold(r, long_ref, USD, 1, hold_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_hold(r, "a", "US-D", 1, hold_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_hold(r, "a", "ABCDEFGHIJKLMNOPQ", 1, hold_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_hold(r, "a", USD, 1, NULL, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_capture(r, "a", USD, 1, "h", NULL, done_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_capture(r, "a", USD, 1, "h", "", done_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_release(r, "a", USD, "", done_cb, &c), -EINVAL);
  CHECK_INT(tg_prepaid_redis_credit(r, "a", USD, 0, "x", done_cb, &c), -EINVAL);
  tg_prepaid_redis_free(r);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  CHECK_INT(c.calls, 0);
}

/* ---- the billing adapter ---- */

typedef struct bres {
  bool done;
  int calls;
  tg_billing_result_t r;
} bres_t;

static void billing_cb(void *arg, const tg_billing_result_t *r) {
  bres_t *b = arg;
  b->calls++;
  b->done = true;
  b->r = *r;
}

static bool bres_done(void *arg) {
  return ((bres_t *)arg)->done;
}

static tg_billing_auth_t auth(const char *ref, int64_t amount, const char *txid, uint64_t deadline_ms) {
  return (tg_billing_auth_t){.tenant = "t",
                             .billing_ref = ref,
                             .currency = USD,
                             .amount = amount,
                             .transaction_id = txid,
                             .ai_system_id = "",
                             .request_id = "req",
                             .deadline_ms = deadline_ms};
}

#define BRUN(loop, b, expr)                                                                                 \
  do {                                                                                                      \
    memset(&(b), 0, sizeof(b));                                                                             \
    expr;                                                                                                   \
    CHECK(redis_run_until((loop), bres_done, &(b), 5000));                                                  \
    CHECK_INT((b).calls, 1);                                                                                \
  } while (0)

TEST(billing_adapter_end_to_end) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  o.timeout_ms = 2000;
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  tg_billing_t *b = tg_billing_redis_new(&w.loop, w.a);
  CHECK(b != NULL);
  CHECK_STR(b->ops->name, "redis");
  CHECK_INT(b->ops->health(b), 0);
  const char *ref = "customer-account-4242";
  res_t r;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, ref, USD, 1000, "e2e", done_cb, &r));

  /* authorize -> capture */
  bres_t x, y;
  tg_billing_auth_t a = auth(ref, 300, "tx_e2e_1", 0);
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_APPROVED);
  CHECK_INT(strlen(x.r.hold), TG_PREPAID_REDIS_HOLD_ID_LEN);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 1000);
  CHECK_INT(r.b, 300);
  BRUN(&w.loop, y, b->ops->capture(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_APPROVED);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 700);
  CHECK_INT(r.b, 0);
  CHECK_INT(direct_int(&s, "EXISTS %s", "tg:captured:tx_e2e_1", NULL), 1);
  /* A second capture of the same hold charges nothing. */
  BRUN(&w.loop, y, b->ops->capture(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_DECLINED);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 700);

  /* declined: the detail names the account redacted, and the amounts */
  a = auth(ref, 800, "tx_e2e_2", 0);
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_DECLINED);
  CHECK_INT(x.r.available, 700);
  CHECK(strstr(x.r.detail, "****4242") != NULL);
  CHECK(strstr(x.r.detail, "customer") == NULL);
  CHECK(strstr(x.r.detail, "700") != NULL && strstr(x.r.detail, "800") != NULL);

  /* authorize -> release */
  a = auth(ref, 100, "tx_e2e_3", uv_now(&w.loop) + 5000);
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_APPROVED);
  BRUN(&w.loop, y, b->ops->release(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_APPROVED);
  BRUN(&w.loop, y, b->ops->release(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_DECLINED);
  BRUN(&w.loop, y, b->ops->capture(b, "not-a-hold", billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_DECLINED);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 700);
  CHECK_INT(r.b, 0);

  /* The deadline passes before Redis answers: TIMEOUT, and the late hold is given back. */
  kill(s.pid, SIGSTOP);
  a = auth(ref, 50, "tx_e2e_4", uv_now(&w.loop) + 50);
  uint64_t t0 = uv_hrtime();
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_TIMEOUT);
  CHECK((uv_hrtime() - t0) / 1000000 < 1000);
  kill(s.pid, SIGCONT);
  pause_ms(&w.loop, 200);
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 700);
  CHECK_INT(r.b, 0);
  CHECK_INT(x.calls, 1);

  /* A capture that cannot reach Redis is owed: the adapter forgets the hold
   * (the pipeline pays it from its owed set, by txid), and paying it once
   * Redis is back charges once, whether the first try landed or not. */
  a = auth(ref, 200, "tx_e2e_5", 0);
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_APPROVED);
  kill(s.pid, SIGSTOP);
  BRUN(&w.loop, y, b->ops->capture(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_UNAVAILABLE);
  kill(s.pid, SIGCONT);
  CHECK(redis_run_until(&w.loop, ready, &w, 5000));
  BRUN(&w.loop, y, b->ops->capture(b, x.r.hold, billing_cb, &y));
  CHECK_INT(y.r.status, TG_BILLING_DECLINED); /* no such hold: not kept after a failed capture */
  RUN(&w.loop, r, tg_prepaid_redis_capture(w.a, ref, USD, 200, x.r.hold, "tx_e2e_5", done_cb, &r));
  CHECK(r.status == 0 || r.status == 1); /* applied by the first try or by this one: once */
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, ref, USD, balance_cb, &r));
  CHECK_INT(r.a, 500);
  CHECK_INT(r.b, 0);

  /* Redis gone: UNAVAILABLE, never approved; health says so. */
  redis_stop(&s);
  pause_ms(&w.loop, 50);
  a = auth(ref, 1, "tx_e2e_6", 0);
  BRUN(&w.loop, x, b->ops->authorize(b, &a, billing_cb, &x));
  CHECK_INT(x.r.status, TG_BILLING_UNAVAILABLE);
  CHECK(b->ops->health(b) != 0);
  tg_billing_free(b);
  CHECK_INT(world_close(&w), 0);
}

/* The adapter freed with an authorize in flight: the caller hears once, nothing leaks. */
TEST(billing_adapter_free_with_calls_waiting) {
  redis_server_t s = {0};
  CHECK_INT(redis_start(&s), 0);
  tg_prepaid_redis_opts_t o;
  opts_for(&o, &s, "gw-a");
  o.timeout_ms = 5000;
  world_t w;
  CHECK_INT(world_open(&w, &o, NULL), 0);
  CHECK(redis_run_until(&w.loop, ready, &w, 3000));
  res_t r;
  RUN(&w.loop, r, tg_prepaid_redis_credit(w.a, "acct-f", USD, 100, NULL, done_cb, &r));
  tg_billing_t *b = tg_billing_redis_new(&w.loop, w.a);
  CHECK(b != NULL);
  kill(s.pid, SIGSTOP);
  bres_t x = {0};
  tg_billing_auth_t a = auth("acct-f", 40, "tx_f", uv_now(&w.loop) + 3000);
  b->ops->authorize(b, &a, billing_cb, &x);
  pause_ms(&w.loop, 20);
  CHECK(!x.done);
  tg_billing_free(b);
  CHECK_INT(x.calls, 1);
  CHECK_INT(x.r.status, TG_BILLING_UNAVAILABLE);
  kill(s.pid, SIGCONT);
  pause_ms(&w.loop, 300); /* the hold is made, then released: the adapter is gone */
  RUN(&w.loop, r, tg_prepaid_redis_balance(w.a, "acct-f", USD, balance_cb, &r));
  CHECK_INT(r.a, 100);
  CHECK_INT(r.b, 0);
  CHECK_INT(x.calls, 1);
  CHECK_INT(world_close(&w), 0);
  redis_stop(&s);
}
