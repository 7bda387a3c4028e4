#include "billing/billing.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "base/log.h"
#include "ledger/prepaid_redis.h"

/* The hold string handed to the pipeline is the ledger's hold id (32 hex
 * digits) and nothing more: capture also needs the account, the currency,
 * the amount and the transaction id, which do not fit in 64 bytes (a ref is
 * up to 256). The adapter keeps them in a map from hold id, filled when
 * authorize succeeds and emptied by capture or release. So capture and
 * release must come to the adapter that authorized (the pipeline keeps a
 * purchase on one worker), and a hold whose adapter is gone (restart) is no
 * longer known here: Redis drops it after the hold TTL. */

#define BUCKETS 1024

typedef struct entry entry_t;
struct entry {
  entry_t *next; /* in its bucket */
  char hold[TG_PREPAID_REDIS_HOLD_ID_LEN + 1];
  char currency[TG_PREPAID_REDIS_MAX_CURRENCY + 1];
  int64_t amount;
  char *ref;  /* into text */
  char *txid; /* into text */
  char text[];
};

enum { CALL_AUTHORIZE, CALL_CAPTURE, CALL_RELEASE };

typedef struct redis_billing redis_billing_t;

/* One call waiting for the ledger. It outlives the adapter when the adapter
 * is freed first (rb NULL): the ledger's callback then only cleans up. */
typedef struct call call_t;
struct call {
  call_t *prev, *next; /* in rb->calls */
  redis_billing_t *rb;
  tg_prepaid_redis_t *ledger;
  int kind;
  tg_billing_cb cb;
  void *arg;
  bool answered;        /* the caller has its result (a deadline passed, or the adapter was freed) */
  uint64_t deadline_ms; /* authorize: uv_now() instant, 0 for none */
  entry_t *e;           /* authorize: to file under the hold id; capture, release: taken from the map */
};

struct redis_billing {
  tg_billing_t base;
  tg_prepaid_redis_t *ledger;
  uv_timer_t deadline_timer; /* the first deadline of an unanswered authorize */
  call_t *calls;
  entry_t *map[BUCKETS];
};

static size_t bucket(const char *hold) { return (size_t)(tg_fnv1a_str(hold) % BUCKETS); }

static void map_put(redis_billing_t *rb, entry_t *e) {
  size_t b = bucket(e->hold);
  e->next = rb->map[b];
  rb->map[b] = e;
}

static entry_t *map_take(redis_billing_t *rb, const char *hold) {
  if (hold == NULL)
    return NULL;
  for (entry_t **p = &rb->map[bucket(hold)]; *p; p = &(*p)->next)
    if (strcmp((*p)->hold, hold) == 0) {
      entry_t *e = *p;
      *p = e->next;
      e->next = NULL;
      return e;
    }
  return NULL;
}

static entry_t *entry_new(const char *ref, const char *currency, int64_t amount, const char *txid) {
  size_t rl = strlen(ref), tl = strlen(txid), cl = strlen(currency); /* cl checked by authorize */
  entry_t *e = calloc(1, sizeof(*e) + rl + tl + 2);
  if (e == NULL)
    return NULL;
  memcpy(e->currency, currency, cl + 1);
  e->amount = amount;
  e->ref = e->text;
  memcpy(e->ref, ref, rl + 1);
  e->txid = e->text + rl + 1;
  memcpy(e->txid, txid, tl + 1);
  return e;
}

static call_t *call_new(redis_billing_t *rb, int kind, tg_billing_cb cb, void *arg, entry_t *e) {
  call_t *c = calloc(1, sizeof(*c));
  if (c == NULL)
    return NULL;
  c->rb = rb;
  c->ledger = rb->ledger;
  c->kind = kind;
  c->cb = cb;
  c->arg = arg;
  c->e = e;
  c->next = rb->calls;
  if (rb->calls)
    rb->calls->prev = c;
  rb->calls = c;
  return c;
}

static void call_unlink(call_t *c) {
  if (c->rb == NULL)
    return;
  if (c->prev)
    c->prev->next = c->next;
  else
    c->rb->calls = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void call_answer(call_t *c, const tg_billing_result_t *r) {
  if (c->answered)
    return;
  c->answered = true;
  c->cb(c->arg, r);
}

static void answer_now(tg_billing_cb cb, void *arg, tg_billing_status_t st, const char *fmt, const char *what) {
  tg_billing_result_t r = {.status = st, .available = -1};
  snprintf(r.detail, sizeof r.detail, fmt, what);
  cb(arg, &r);
}

static const char *why(int status) {
  switch (status) {
  case -ETIMEDOUT:
    return "redis did not answer in time";
  case -ECONNREFUSED:
    return "redis is not reachable";
  case -ECANCELED:
    return "the redis ledger is closing";
  default:
    return "redis failed";
  }
}

static void deadline_timer_cb(uv_timer_t *t);

static void arm_deadline(redis_billing_t *rb) {
  uint64_t first = 0;
  for (call_t *c = rb->calls; c; c = c->next)
    if (c->kind == CALL_AUTHORIZE && !c->answered && c->deadline_ms != 0 && (first == 0 || c->deadline_ms < first))
      first = c->deadline_ms;
  if (first == 0) {
    uv_timer_stop(&rb->deadline_timer);
    return;
  }
  uint64_t now = uv_now(rb->base.loop);
  uv_timer_start(&rb->deadline_timer, deadline_timer_cb, first > now ? first - now : 0, 0);
}

/* The caller hears TIMEOUT; the hold, if Redis still makes it, is released
 * when its answer comes (on_hold). */
static void deadline_timer_cb(uv_timer_t *t) {
  redis_billing_t *rb = t->data;
  uint64_t now = uv_now(rb->base.loop);
  for (call_t *c = rb->calls; c; c = c->next)
    if (c->kind == CALL_AUTHORIZE && !c->answered && c->deadline_ms != 0 && c->deadline_ms <= now) {
      tg_billing_result_t r = {.status = TG_BILLING_TIMEOUT, .available = -1};
      snprintf(r.detail, sizeof r.detail, "the redis ledger did not answer by the deadline");
      call_answer(c, &r);
    }
  arm_deadline(rb);
}

static void ignore_done(void *arg, int status, int64_t balance) {
  (void)arg, (void)status, (void)balance;
}

static void on_hold(void *arg, int status, const char *hold_id, int64_t available) {
  call_t *c = arg;
  redis_billing_t *rb = c->rb;
  entry_t *e = c->e;
  call_unlink(c);
  if (c->answered || rb == NULL) {
    /* Nobody will capture it: give it back now rather than after the TTL. */
    if (status == 0 && tg_prepaid_redis_release(c->ledger, e->ref, e->currency, hold_id, ignore_done, NULL) != 0)
      tg_log(TG_LOG_WARN, "billing redis: a late hold could not be released (it expires by itself)", NULL);
    free(e);
    free(c);
    if (rb)
      arm_deadline(rb);
    return;
  }
  tg_billing_result_t r = {.status = TG_BILLING_APPROVED, .available = -1};
  if (status == 0) {
    snprintf(e->hold, sizeof e->hold, "%s", hold_id);
    snprintf(r.hold, sizeof r.hold, "%s", hold_id);
    map_put(rb, e);
    e = NULL;
  } else if (status == -ENOSPC) {
    char red[16];
    tg_billing_redact(e->ref, red);
    r.status = TG_BILLING_DECLINED;
    r.available = available;
    snprintf(r.detail, sizeof r.detail,
             "account %s has %" PRId64 " %s available, %" PRId64 " needed: top it up", red, available,
             e->currency, e->amount);
  } else {
    r.status = TG_BILLING_UNAVAILABLE;
    snprintf(r.detail, sizeof r.detail, "the redis ledger could not hold (%s)", why(status));
  }
  tg_billing_cb cb = c->cb;
  void *cb_arg = c->arg;
  free(e);
  free(c);
  arm_deadline(rb);
  cb(cb_arg, &r);
}

static void authorize(tg_billing_t *b, const tg_billing_auth_t *a, tg_billing_cb cb, void *arg) {
  redis_billing_t *rb = (redis_billing_t *)b;
  if (a->transaction_id == NULL || a->transaction_id[0] == '\0' || a->billing_ref == NULL || a->currency == NULL ||
      strlen(a->currency) > TG_PREPAID_REDIS_MAX_CURRENCY) {
    answer_now(cb, arg, TG_BILLING_UNAVAILABLE, "the redis ledger refused the hold (%s)",
               "no transaction id, account, or a bad currency");
    return;
  }
  if (a->deadline_ms != 0 && uv_now(b->loop) >= a->deadline_ms) {
    answer_now(cb, arg, TG_BILLING_TIMEOUT, "%s", "the deadline passed before the hold was asked");
    return;
  }
  entry_t *e = entry_new(a->billing_ref, a->currency, a->amount, a->transaction_id);
  call_t *c = e ? call_new(rb, CALL_AUTHORIZE, cb, arg, e) : NULL;
  int rc = c ? tg_prepaid_redis_hold(rb->ledger, a->billing_ref, a->currency, a->amount, on_hold, c) : -ENOMEM;
  if (rc != 0) {
    if (c) {
      call_unlink(c);
      free(c);
    }
    free(e);
    answer_now(cb, arg, TG_BILLING_UNAVAILABLE, "the redis ledger refused the hold (%s)", strerror(-rc));
    return;
  }
  c->deadline_ms = a->deadline_ms;
  if (c->deadline_ms != 0)
    arm_deadline(rb);
}

/* capture and release: when Redis failed, a release's entry goes back into
 * the map so that the caller may try again; a failed capture is owed and
 * paid by the pipeline (capture is idempotent on txid). */
static void on_done(void *arg, int status, int64_t balance) {
  call_t *c = arg;
  redis_billing_t *rb = c->rb;
  entry_t *e = c->e;
  (void)balance;
  call_unlink(c);
  tg_billing_result_t r = {.status = TG_BILLING_APPROVED, .available = -1};
  if (status == 0)
    snprintf(r.detail, sizeof r.detail, "%s",
             c->kind == CALL_CAPTURE ? "already captured (a retry)" : "the hold had expired already");
  if (status < 0) {
    r.status = TG_BILLING_UNAVAILABLE;
    snprintf(r.detail, sizeof r.detail, "the redis ledger could not %s (%s)",
             c->kind == CALL_CAPTURE ? "capture" : "release", why(status));
    if (c->kind == CALL_CAPTURE) {
      char red[16];
      tg_billing_redact(e->ref, red);
      tg_log(TG_LOG_ERROR, "billing redis: capture failed, the amount is owed but not yet debited", "account", red,
             "transaction", e->txid, "error", why(status), NULL);
    }
    /* A release is tried again by the caller; a failed capture is owed:
     * the pipeline pays it from its owed set (pipeline/owed.h), by
     * transaction id and hold id, not through this map. */
    if (rb && c->kind != CALL_CAPTURE) {
      map_put(rb, e);
      e = NULL;
    }
  }
  free(e);
  tg_billing_cb cb = c->cb;
  void *cb_arg = c->arg;
  bool answered = c->answered;
  free(c);
  if (!answered)
    cb(cb_arg, &r);
}

static void finish(tg_billing_t *b, const char *hold, int kind, tg_billing_cb cb, void *arg) {
  redis_billing_t *rb = (redis_billing_t *)b;
  entry_t *e = map_take(rb, hold);
  if (e == NULL) {
    answer_now(cb, arg, TG_BILLING_DECLINED, "no such hold (already %s?)",
               kind == CALL_CAPTURE ? "captured" : "released");
    return;
  }
  call_t *c = call_new(rb, kind, cb, arg, e);
  int rc = -ENOMEM;
  if (c != NULL)
    rc = kind == CALL_CAPTURE
             ? tg_prepaid_redis_capture(rb->ledger, e->ref, e->currency, e->amount, e->hold, e->txid, on_done, c)
             : tg_prepaid_redis_release(rb->ledger, e->ref, e->currency, e->hold, on_done, c);
  if (rc != 0) {
    if (c) {
      call_unlink(c);
      free(c);
    }
    map_put(rb, e);
    answer_now(cb, arg, TG_BILLING_UNAVAILABLE, "the redis ledger refused the call (%s)", strerror(-rc));
  }
}

static void capture(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) {
  finish(b, hold, CALL_CAPTURE, cb, arg);
}

static void release(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) {
  finish(b, hold, CALL_RELEASE, cb, arg);
}

static int health(tg_billing_t *b) {
  return tg_prepaid_redis_ready(((redis_billing_t *)b)->ledger) ? 0 : -ENOTCONN;
}

static void timer_closed(uv_handle_t *h) {
  free(h->data);
}

/* Calls still waiting are answered UNAVAILABLE now and finish on their own
 * when the ledger answers (or cancels them at its free). Known holds are
 * forgotten: Redis drops them after the hold TTL. */
static void redis_free(tg_billing_t *b) {
  redis_billing_t *rb = (redis_billing_t *)b;
  call_t *c;
  while ((c = rb->calls) != NULL) {
    call_unlink(c);
    c->rb = NULL;
    tg_billing_result_t r = {.status = TG_BILLING_UNAVAILABLE, .available = -1};
    snprintf(r.detail, sizeof r.detail, "the billing adapter is closing");
    call_answer(c, &r);
  }
  for (size_t i = 0; i < BUCKETS; i++)
    while (rb->map[i]) {
      entry_t *e = rb->map[i];
      rb->map[i] = e->next;
      free(e);
    }
  uv_close((uv_handle_t *)&rb->deadline_timer, timer_closed);
}

static const tg_billing_ops_t redis_ops = {"redis", authorize, capture, release, health, redis_free};

tg_billing_t *tg_billing_redis_new(uv_loop_t *loop, tg_prepaid_redis_t *ledger) {
  if (loop == NULL || ledger == NULL)
    return NULL;
  redis_billing_t *rb = calloc(1, sizeof(*rb));
  if (rb == NULL)
    return NULL;
  rb->base.ops = &redis_ops;
  rb->base.loop = loop;
  rb->ledger = ledger;
  if (uv_timer_init(loop, &rb->deadline_timer) != 0) {
    free(rb);
    return NULL;
  }
  rb->deadline_timer.data = rb;
  return &rb->base;
}
