#ifndef TG_BILLING_H
#define TG_BILLING_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "ledger/prepaid.h"
#include "net/client.h"

/* Billing adapters: who is asked whether an AI system may spend, and told
 * when it did. The pipeline speaks to every adapter through tg_billing_ops_t:
 *
 *   authorize  reserve amount on the account (a hold) or refuse;
 *   capture    turn a hold into a charge, once the purchase was answered;
 *   release    give a hold back (the purchase did not happen);
 *   health     whether the adapter can answer now (readiness).
 *
 * Contract shared by every adapter:
 *  - Threads: one tg_billing_t per worker loop (tg_billing_*_new on that
 *    loop's thread); its calls run on that thread only. Adapters that share
 *    state across workers (the built-in ledger) lock it themselves.
 *  - Asynchronous: each call takes a callback that runs exactly once, with
 *    the result; it may run before the call returns (the built-in ledger
 *    decides in memory) or later on the loop (a remote service). The caller
 *    must cope with both. arg stays valid until the callback.
 *  - Deadline: deadline_ms is a uv_now() instant of the caller's loop; an
 *    adapter that has not decided by then answers TG_BILLING_TIMEOUT (the
 *    policy's on_billing_timeout hook then decides, in a later issue).
 *  - Idempotency: capture and release are keyed by the hold: a second
 *    capture of the same hold charges nothing more (-ENOENT from the
 *    built-in ledger, "already captured" from a remote one).
 *  - Secrets: a billing reference is the customer's account id; adapters log
 *    it redacted only (tg_billing_redact). */

typedef enum {
  TG_BILLING_APPROVED = 0,  /* held (authorize) or done (capture, release) */
  TG_BILLING_DECLINED,      /* insufficient funds or an account that may not spend */
  TG_BILLING_UNAVAILABLE,   /* the billing system failed or is unreachable */
  TG_BILLING_TIMEOUT,       /* no answer by the deadline */
} tg_billing_status_t;

#define TG_BILLING_HOLD_MAX 64

typedef struct tg_billing_auth {
  const char *tenant;
  const char *billing_ref;     /* the account (AISystem.billing_reference) */
  const char *currency;
  int64_t amount;              /* atomic units, >= 0 */
  const char *transaction_id;
  const char *ai_system_id;    /* may be "" */
  const char *request_id;      /* for logs */
  uint64_t deadline_ms;        /* uv_now() of the caller's loop */
  const char *traceparent;     /* W3C trace context passed along by remote adapters; NULL: none */
} tg_billing_auth_t;

typedef struct tg_billing_result {
  tg_billing_status_t status;
  char hold[TG_BILLING_HOLD_MAX]; /* approved authorize: the hold to capture or release */
  int64_t available;           /* declined: what the account could spend, or -1 when unknown */
  char detail[192];            /* for a person: why (never the full billing reference) */
} tg_billing_result_t;

typedef void (*tg_billing_cb)(void *arg, const tg_billing_result_t *r);

typedef struct tg_billing tg_billing_t;

typedef struct tg_billing_ops {
  const char *name; /* "builtin", ... (Transaction.billing_type in the log) */
  void (*authorize)(tg_billing_t *b, const tg_billing_auth_t *a, tg_billing_cb cb, void *arg);
  void (*capture)(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg);
  void (*release)(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg);
  int (*health)(tg_billing_t *b); /* 0: can answer; negative errno otherwise */
  void (*free)(tg_billing_t *b);
} tg_billing_ops_t;

struct tg_billing {
  const tg_billing_ops_t *ops;
  uv_loop_t *loop;
};

/* The built-in prepaid ledger (ledger/prepaid.h) as an adapter: holds and
 * releases in memory, decided before the call returns; the charge itself is
 * the durable Transaction record (the ledger applies it when it is on
 * disk), so capture only drops the hold. NULL when out of memory. */
tg_billing_t *tg_billing_builtin_new(uv_loop_t *loop, tg_prepaid_t *ledger);

void tg_billing_free(tg_billing_t *b);

/* The buckets of billing_authorize_duration_seconds (10 us .. 1 s), one
 * declaration for the pipeline (built-in and Redis ledgers) and the remote
 * adapter, which count in the same family. */
extern const double tg_billing_auth_buckets[];
extern const size_t tg_billing_auth_nbuckets;

/* "****" and the last 4 bytes of ref (just "****" for 4 bytes or fewer):
 * the only form in which a billing reference reaches a log or an answer. */
void tg_billing_redact(const char *ref, char out[16]);

/* Prepaid balances in Redis (ledger/prepaid_redis.h) as an adapter, name
 * "redis": authorize holds in Redis (DECLINED on insufficient funds,
 * UNAVAILABLE when Redis fails, TIMEOUT at the deadline, a late hold then
 * released), capture debits once per transaction id, release gives the hold
 * back. The hold string is the ledger's hold id; the account, currency,
 * amount and transaction id stay in the adapter (core/billing/redis.c), so
 * capture and release go to the adapter that authorized. ledger is borrowed,
 * on the same loop: free the adapter before it. NULL on out of memory. */
struct tg_prepaid_redis;
tg_billing_t *tg_billing_redis_new(uv_loop_t *loop, struct tg_prepaid_redis *ledger);

/* A billing service of the publisher's, reached over Connect (unary,
 * binary protobuf, HTTP/1.1 via the pooled client) as proto/billing/v1
 * describes; name "connect". One adapter per tenant per worker loop.
 *
 * authorize: POST base_url/billing.v1.BillingService/Authorize with
 * Connect-Timeout-Ms from the deadline (a->deadline_ms, or now + deadline_ms
 * when 0) and the bearer token. 200 and a message: APPROVED or DECLINED
 * (available from the answer); a Connect error or a bad body: UNAVAILABLE;
 * no answer by the deadline: TIMEOUT, and an approval that comes later (up
 * to 2 s later; after that, or once the adapter was freed, the service must
 * expire the hold) is released at once. capture and release send the hold id and the
 * transaction id (billing_id, the service's idempotency key); the adapter
 * does not dedupe them: a capture sent twice reaches the service twice, and
 * the service charges once. Capture and release go to the adapter that
 * authorized (it keeps the transaction id and amount of its holds).
 *
 * Circuit breaker: after breaker_failures consecutive failures (UNAVAILABLE
 * or TIMEOUT) calls fail fast with UNAVAILABLE "circuit open" for
 * breaker_cooldown_ms; then one call goes through (half-open): its success
 * closes the circuit, its failure opens it again. health() is 0 unless the
 * circuit is open (-EAGAIN).
 *
 * Metrics: billing_authorize_total{tenant_id,result},
 * billing_authorize_duration_seconds{tenant_id,approved},
 * billing_timeout_total{tenant_id}, billing_circuit_state{tenant_id}
 * (0 closed, 1 open, 2 half-open).
 *
 * http is borrowed (same loop; free the adapter first, then the client).
 * Everything in o is copied. The token is never logged; billing references
 * reach logs redacted only. NULL on a missing tenant, base_url or token, or
 * out of memory. */
typedef struct tg_billing_connect_opts {
  const char *tenant;            /* label of the metrics and the tenant field of Authorize */
  const char *base_url;          /* "https://billing.example:8443" (a path prefix is kept) */
  const char *bearer_token;      /* sent as Authorization: Bearer <token> */
  uint32_t deadline_ms;          /* authorize deadline when the caller gives none; default 30 */
  uint32_t call_timeout_ms;      /* capture, release and late-hold release; default 5000 */
  uint32_t breaker_failures;     /* consecutive failures that open the circuit; default 5 */
  uint32_t breaker_cooldown_ms;  /* how long it stays open before a probe; default 5000 */
} tg_billing_connect_opts_t;

tg_billing_t *tg_billing_connect_new(uv_loop_t *loop, tg_httpc_t *http, const tg_billing_connect_opts_t *o);

/* Capture by transaction (the reconciler's: after a restart the adapter
 * knows no hold): Capture{hold_id = hold or "", billing_id = txid, amount}
 * through the breaker. The service resolves an empty hold_id by billing_id
 * (the transaction id its Authorize was keyed by). APPROVED: charged (now or
 * before); DECLINED: the service knows no such hold (expired: authorize
 * again); UNAVAILABLE: failed. b must be a connect adapter. */
void tg_billing_connect_capture(tg_billing_t *b, const char *txid, const char *hold, int64_t amount,
                                tg_billing_cb cb, void *arg);

/* One Health call (outside the breaker: it is how the gateway learns the
 * service is back): APPROVED serving, DECLINED not serving, UNAVAILABLE no
 * usable answer within call_timeout_ms. b must be a connect adapter. */
void tg_billing_connect_health(tg_billing_t *b, tg_billing_cb cb, void *arg);

#endif
