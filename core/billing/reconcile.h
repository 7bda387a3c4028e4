#ifndef TG_RECONCILE_H
#define TG_RECONCILE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "billing/billing.h"
#include "ledger/wal.h"

/* What the gateway owes remote billing services (billing type "connect"),
 * and the reconciler that pays it.
 *
 * The book (tg_billing_book_t, one per process, a mutex) holds a charge per
 * transaction that billing has not confirmed:
 *   AUTHORIZE  a DEFERRED purchase (billing failed, the tenant's policy said
 *              serve now, bill later): to authorize, then capture;
 *   CAPTURE    an APPROVED purchase whose capture is not yet confirmed (its
 *              capture is under way, or failed): to capture.
 * It is rebuilt at start from the log (tg_billing_book_replay): a DEFERRED
 * Transaction record, or an APPROVED one billed by "connect", is owed until
 * a LedgerChange CAPTURE record (charged) or REFUSED record (billing refused
 * the deferred charge) names its transaction. At run time the purchase path
 * enters them (defer, owe_capture) and removes them once the CAPTURE record
 * is durable (done).
 *
 * Never captured twice: billing's Authorize is idempotent by transaction id
 * and Capture by billing id (the transaction id), so a charge retried after
 * a crash (the capture went through, its CAPTURE record did not reach the
 * disk) is answered already_done and charges nothing more. The book only
 * decides when to ask again.
 *
 * Deferred cap: the money outstanding in deferred state per tenant and
 * currency (DEFERRED, not yet captured) never exceeds the tenant's cap:
 * tg_billing_book_defer refuses a transaction that would pass it.
 *
 * Tenant health, for the policy and for /readyz: since when billing has
 * been failing (authorize failures with no success since), the last Health
 * probe's answer and how many probes failed in a row, and whether the
 * tenant's policy last decided to reject on a billing failure.
 *
 * Metrics (tg_billing_book_metrics_init):
 *   billing_deferred_outstanding{tenant_id,currency}  gauge, atomic units
 *   billing_deferred_total{tenant_id,result}          counter: deferred (a
 *     purchase served unbilled), over_cap (refused: the cap was reached),
 *     captured (a deferred charge captured), refused (billing refused it)
 *   billing_owed_charges{tenant_id}                    gauge: charges in the book
 *   billing_health_up{tenant_id}                       gauge: the last Health probe said serving
 *
 * Threads: the book's functions from any thread; the runner's on its loop. */

typedef struct tg_billing_book tg_billing_book_t;
typedef struct tg_billing_runner tg_billing_runner_t;

/* names: the tenants in configuration order (the array is copied, the
 * strings borrowed: they outlive the book); remote[i]: tenant i is billed by
 * a remote service (copied). instance names
 * the records' writer (copied). NULL on out of memory. */
tg_billing_book_t *tg_billing_book_new(size_t ntenants, const char *const *names, const bool *remote,
                                       const char *instance);
void tg_billing_book_free(tg_billing_book_t *b);
int tg_billing_book_metrics_init(void);

/* ---- Tenant health (any thread) */

/* Billing answered (approved or declined): it is not failing. */
void tg_billing_book_ok(tg_billing_book_t *b, size_t ti);
/* Billing failed now (now_ms: a monotonic millisecond clock, uv_hrtime()/1e6):
 * how long it has been failing, 0 for the first failure. */
uint64_t tg_billing_book_failed(tg_billing_book_t *b, size_t ti, uint64_t now_ms);
/* The policy decided reject (true) or deferred (false) on a billing failure
 * (its last decision stands until the next). */
void tg_billing_book_decided(tg_billing_book_t *b, size_t ti, bool rejects);
void tg_billing_book_health(tg_billing_book_t *b, size_t ti, bool serving);

typedef struct tg_billing_book_health {
  bool remote;                   /* the tenant is billed by a remote service */
  bool probed;                   /* a Health probe has answered or failed */
  bool serving;                  /* the last probe answered serving */
  uint32_t consecutive_failures; /* probes failed or answered not serving in a row */
  bool decided;                  /* the policy has decided on a billing failure */
  bool rejects;                  /* its last decision (reject until one was made) */
} tg_billing_book_health_t;
void tg_billing_book_health_get(tg_billing_book_t *b, size_t ti, tg_billing_book_health_t *out);

/* ---- Charges (any thread). Strings are copied: txid 1..127 bytes, ref
 * 1..256, currency 1..16, ai_system_id 0..256, hold 0..63. */

/* A deferred purchase: owed AUTHORIZE, counted against cap (atomic units of
 * currency outstanding for the tenant). 0; -ENOSPC over the cap (nothing
 * entered); -EEXIST already owed; -EINVAL a string too long; -ENOMEM. */
int tg_billing_book_defer(tg_billing_book_t *b, size_t ti, const char *txid, const char *ref, const char *currency,
                          int64_t amount, const char *ai_system_id, int64_t cap);

/* An approved purchase whose capture the caller starts now: owed CAPTURE of
 * hold, claimed by the caller (the reconciler leaves it alone until
 * tg_billing_book_retry). 0, -EEXIST, -EINVAL or -ENOMEM. */
int tg_billing_book_owe_capture(tg_billing_book_t *b, size_t ti, const char *txid, const char *ref,
                                const char *currency, int64_t amount, const char *ai_system_id, const char *hold);

/* The log sequence of the transaction's record (bounds retention). */
void tg_billing_book_set_seq(tg_billing_book_t *b, const char *txid, uint64_t seq);

/* The caller's claim ends: the reconciler takes the charge after delay_ms
 * (a deferred purchase once its record is durable; a capture that failed). */
void tg_billing_book_retry(tg_billing_book_t *b, const char *txid, uint32_t delay_ms);

/* Charged or given up (its CAPTURE or REFUSED record is durable), or the
 * purchase that entered it was not logged: out of the book. */
void tg_billing_book_done(tg_billing_book_t *b, const char *txid);

size_t tg_billing_book_count(tg_billing_book_t *b);

/* The lowest log sequence a charge in the book was entered from (0: none;
 * 1 while a charge's sequence is not known yet): retention keeps the
 * segments from it on, the book being rebuilt from them. */
uint64_t tg_billing_book_oldest_seq(tg_billing_book_t *b);

/* One replayed record (the log's replay callback, in order). 0, or -EBADMSG
 * for a payload that is not a Record. Records of tenants the book does not
 * know as remote are ignored (a tenant removed from the configuration: its
 * charges are logged with a warning at the end of replay, never guessed). */
int tg_billing_book_replay(tg_billing_book_t *b, uint64_t seq, const void *payload, size_t len);

/* ---- The reconciler (one loop) */

typedef struct tg_billing_owed {
  size_t tenant;
  const char *txid, *ref, *currency, *ai_system_id;
  int64_t amount;
  uint32_t attempts;
  bool deferred;
} tg_billing_owed_t;

typedef struct tg_billing_runner_hooks {
  /* Tenant ti's remote adapter on the runner's loop, or NULL. */
  tg_billing_t *(*adapter)(void *ud, size_t ti);
  /* Billing refused a deferred charge for good (its REFUSED record is
   * durable): the tenant's policy is told (on_settle_failure). May be NULL. */
  void (*refused)(void *ud, const tg_billing_owed_t *o, const char *why);
  /* A Health probe of tenant ti failed and its policy has not decided on a
   * billing failure yet: whether it would reject (asked once, so that
   * readiness knows before the first purchase). May be NULL (reject). */
  bool (*rejects)(void *ud, size_t ti);
  void *ud;
} tg_billing_runner_hooks_t;

typedef struct tg_billing_runner_opts {
  uint32_t tick_ms;             /* how often due charges are looked for; default 100 */
  uint32_t max_in_flight;       /* charges worked on at once (a slot freed is refilled at once); default 64 */
  const uint32_t *backoff_ms;   /* per tenant: first retry delay (NULL: 200 each) */
  const uint32_t *max_backoff_ms; /* per tenant: the delay doubles up to it (NULL: 60000) */
  const uint32_t *health_ms;    /* per tenant: Health probe period, 0: none (NULL: none) */
  uint32_t call_timeout_ms;     /* the deadline of a reconciling Authorize; default 5000 */
} tg_billing_runner_opts_t;

/* Starts reconciling on loop: due charges are authorized (deferred) and
 * captured through hooks.adapter, each followed by its CAPTURE (or REFUSED)
 * record appended through w, then removed from the book; a failed call is
 * retried with jittered exponential backoff. Health probes per tenant too.
 * The arrays of o are copied. 0 or a negative errno. Loop thread. */
int tg_billing_runner_new(tg_billing_book_t *b, uv_loop_t *loop, tg_wal_client_t *w,
                          const tg_billing_runner_hooks_t *hooks, const tg_billing_runner_opts_t *o, size_t ntenants,
                          tg_billing_runner_t **out);

/* Stops starting work; calls in flight finish through their adapters (free
 * the adapters after: they answer what is pending) and the runner's memory
 * goes once they have and its timer closed: run the loop after. Loop thread. */
void tg_billing_runner_free(tg_billing_runner_t *r);

#endif
