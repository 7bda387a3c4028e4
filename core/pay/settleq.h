#ifndef TG_SETTLEQ_H
#define TG_SETTLEQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "ledger/wal.h"

/* Asynchronous settlement (payments settle = "async": serve, then settle),
 * with the write-ahead log as a durable retry queue. A settlement is a run of
 * ledger.v1 Settlement records sharing one id (proto/ledger/v1/ledger.proto):
 *   PENDING  accepted: holds the facilitator /settle body; the request is
 *            served only once this record is durable ("never lost");
 *   ATTEMPT  durable before every send ("about to send": a send may follow);
 *   RETRY    the send failed in a way worth another attempt, or the
 *            facilitator answered pending (not terminal);
 *   SETTLED  terminal: settled (the transaction hash when known);
 *   FAILED   terminal: refused, or the authorization expired (validBefore
 *            passed) first: on_failure was called and it was counted.
 *
 * The book (tg_settleq_t, one per process, a mutex) holds every settlement
 * without a terminal record: rebuilt at start by tg_settleq_replay over the
 * log, entered by tg_settleq_enqueue at run time, paid off by the runner
 * (tg_settleq_runner_t, on one loop). Its oldest PENDING record bounds what
 * retention may remove (tg_settleq_covered).
 *
 * Never sent twice: a send happens only after its ATTEMPT record is durable,
 * so a settlement whose last record is PENDING or RETRY was not sent since;
 * one whose last record is ATTEMPT may have been (a crash or a timeout right
 * after the send). Such an item is asked about first, when a probe hook is
 * there: the chain says whether the authorization's nonce is used (SETTLED
 * without a send) or not (send). Without a probe it is sent again, which
 * cannot pay twice: an EIP-3009 nonce is used once by the token contract, so
 * a second settle of an authorization that went through is refused (no
 * second transfer) -- it is then recorded FAILED although the money came:
 * a probe hook is what tells these apart, and a refusal of an item that may
 * have been sent earlier is probed before it is called a failure.
 *
 * A gateway killed between PENDING and serving settles a request it did not
 * serve (the buyer signed for it; the alternative loses the seller's money).
 *
 * Metrics (tg_settleq_metrics_init):
 *   t402_unsettled_amount{tenant_id,network,asset}  gauge: atomic units of
 *     asset served and not yet settled (the book's sum per key; a double:
 *     exact to 2^53 atomic units, about 9e9 USDC; approximate above);
 *   t402_settlements_total{network,scheme,status}   counter: status pending
 *     (an async settlement was queued), retry (an attempt to be repeated,
 *     facilitator pending included), settled, failed. tg_settle_count
 *     counts a synchronous settlement in the same family.
 *
 * Threads: the book's functions are safe from any thread; the runner's on
 * its loop's thread only, except tg_settleq_kick. */

typedef struct tg_settleq tg_settleq_t;
typedef struct tg_settleq_runner tg_settleq_runner_t;

#define TG_SETTLEQ_ID_LEN 36   /* "st_" + 32 hex digits + NUL */
#define TG_SETTLEQ_MAX_STR 256 /* longest tenant, network, asset, payer, request id */

/* One settlement. Given to tg_settleq_enqueue (copied), and to the hooks
 * (the book's copy: valid until the hook's done callback has been called). */
typedef struct tg_settle_item {
  const char *id; /* "st_..."; tg_settleq_enqueue ignores it and makes one */
  const char *tenant;
  const char *network;    /* CAIP-2 */
  const char *scheme;     /* "exact" */
  const char *asset;      /* 0x token contract */
  const char *payer;      /* 0x authorization from */
  const char *amount;     /* atomic units of asset, decimal digits (up to 78) */
  const char *request_id; /* may be NULL */
  uint8_t nonce[32];      /* the EIP-3009 nonce */
  int64_t valid_before;   /* unix seconds */
  const char *request;    /* the facilitator /settle body (JSON), sent byte for byte */
  size_t request_len;
  /* Enqueue only: a transaction already submitted for it (a synchronous
   * settle that answered pending), NULL: none. The queue then takes it as
   * possibly sent (probed before a send, and a refusal probed). */
  const char *transaction;
  /* Hooks: sends so far, this one counted; and whether an earlier attempt
   * may have reached the facilitator (before a restart, a send that timed
   * out, a pending answer). Enqueue: maybe_sent true says a send was made
   * outside the queue (as transaction does). */
  uint32_t attempts;
  bool maybe_sent;
} tg_settle_item_t;

/* Book */

/* Declares the two metrics (start-up, before workers run). 0 or -ENOMEM.
 * Without it the queue works and counts nothing. */
int tg_settleq_metrics_init(void);

/* Counts one settlement outcome in t402_settlements_total (status: "settled",
 * "failed", "retry", "pending"): for the synchronous path. Any thread. */
void tg_settle_count(const char *network, const char *scheme, const char *status);

/* A new, empty book. instance names the writer of its records (copied; NULL:
 * ""). NULL when out of memory. */
tg_settleq_t *tg_settleq_new(const char *instance);

/* Frees the book: after its runner is freed and its loop has run its last
 * callbacks, and with no enqueue waiting (the workers stopped). NULL: no-op. */
void tg_settleq_free(tg_settleq_t *q);

/* One record of the log at open (call it from the tg_wal_opts_t replay
 * callback for every record, in order, before any enqueue or runner):
 * a Settlement record updates the book; anything else (another kind, a
 * payload that does not decode) is not its business and returns 0.
 * Returns 0, or -ENOMEM (the open must fail: a settlement would be lost). */
int tg_settleq_replay(tg_settleq_t *q, uint64_t seq, const void *payload, size_t len);

/* Settlements in the book (queued, being tried, waiting to be retried). */
size_t tg_settleq_count(tg_settleq_t *q);

/* The sequence of the oldest PENDING record the book still needs, 0 when it
 * needs none. tg_settleq_covered(q, s) is min(s, that - 1) (s when none):
 * the covered_seq to give tg_wal_retain. Read s (the snapshot's sequence)
 * before calling it: an enqueue enters the book before its record can be
 * durable, so a record covered by s is in the book by then. */
uint64_t tg_settleq_oldest_seq(tg_settleq_t *q);
uint64_t tg_settleq_covered(tg_settleq_t *q, uint64_t covered_seq);

/* What the book knows of settlement id (tests, tools): 0 and the fields, or
 * -ENOENT (settled, failed or never queued). Any pointer may be NULL. */
int tg_settleq_info(tg_settleq_t *q, const char *id, uint32_t *attempts, bool *maybe_sent, bool *queued);

/* Enqueue */

/* status 0: the PENDING record is durable and the settlement is in the book:
 * serve the request now. Negative errno (the log failed): not queued, do not
 * serve. id: the settlement's id (valid during the call). Runs on w's loop. */
typedef void (*tg_settleq_enqueue_cb)(void *arg, int status, const char *id);

/* Queues item: appends its PENDING record through w (the calling worker's
 * client) and calls cb(arg, ...) on w's loop once it is durable (exactly
 * once, never from inside this call); the runner is then woken. The item's
 * strings are copied. id_out (may be NULL) gets the new id at once.
 * Returns 0, or without calling cb: -EINVAL (a field missing, too long, an
 * amount that is not decimal digits, an empty request, NULL cb), -ENOMEM, or
 * what tg_wal_append answered (-EAGAIN, -ENOSPC, -EMSGSIZE, -EIO ...).
 * Thread of w's loop; arg must stay valid until cb. */
int tg_settleq_enqueue(tg_settleq_t *q, tg_wal_client_t *w, const tg_settle_item_t *item, tg_settleq_enqueue_cb cb,
                       void *arg, char id_out[TG_SETTLEQ_ID_LEN]);

/* Wakes the runner for an early pass (no-op without a runner). Any thread. */
void tg_settleq_kick(tg_settleq_t *q);

/* Runner */

typedef enum {
  TG_SETTLE_OK = 0,  /* settled: transaction is the hash */
  TG_SETTLE_PENDING, /* the facilitator said settlement_pending (transaction:
                        the hash): retried later */
  TG_SETTLE_REFUSED, /* refused for good (success false, invalid): terminal
                        failure */
  TG_SETTLE_RETRY,   /* unavailable, timed out, a bad reply: retried later */
} tg_settle_status_t;

typedef struct tg_settle_result {
  tg_settle_status_t status;
  const char *transaction; /* OK, PENDING; may be NULL */
  const char *reason;      /* REFUSED, RETRY; may be NULL */
  const char *facilitator; /* who answered; may be NULL */
} tg_settle_result_t;      /* strings copied by done */

typedef void (*tg_settle_done_cb)(void *arg, const tg_settle_result_t *r);
/* status 0 and whether the nonce is used on chain, or a negative errno (the
 * chain could not be asked: treated as no probe). */
typedef void (*tg_settle_probe_cb)(void *arg, int status, bool nonce_used);

/* The lead's side: each hook runs on the runner's loop and calls its done
 * exactly once (from inside the call too), also when what it uses is freed
 * (a canceled settle is TG_SETTLE_RETRY). */
typedef struct tg_settleq_hooks {
  /* Sends item->request to a facilitator's /settle. */
  void (*send)(void *ud, const tg_settle_item_t *item, tg_settle_done_cb done, void *arg);
  /* Optional (NULL: none): is item's authorization used on chain? */
  void (*probe)(void *ud, const tg_settle_item_t *item, tg_settle_probe_cb done, void *arg);
  /* Optional: a FAILED record of item is durable (reason: why). Called once
   * per failure, never for a FAILED record made durable after the runner was
   * freed. The item is valid during the call. */
  void (*on_failure)(void *ud, const tg_settle_item_t *item, const char *reason);
  void *ud;
} tg_settleq_hooks_t;

typedef struct tg_settleq_runner_opts {
  size_t max_inflight;     /* settlements being tried at once; 16 */
  uint32_t backoff_min_ms; /* first retry after about this (jitter: half to all
                              of it); 1000 */
  uint32_t backoff_max_ms; /* doubling up to this; 300000 */
  uint32_t tick_ms;        /* how often the book is looked at; 1000 */
} tg_settleq_runner_opts_t;

void tg_settleq_runner_opts_init(tg_settleq_runner_opts_t *o);

/* Starts paying the book from loop: every tick (and tg_settleq_kick) it takes
 * the due settlements, oldest first, up to max_inflight at a time; for each,
 * when it expired (now > valid_before): FAILED (probed first when it may have
 * been sent); when it may have been sent and there is a probe: the probe;
 * else an ATTEMPT record, then once durable, send; then SETTLED (leaves the
 * book once durable), FAILED + on_failure, or RETRY after a backoff
 * (backoff_min_ms doubling per attempt up to backoff_max_ms, jittered). A
 * record that cannot be appended is tried again at a later pass; nothing is
 * sent without its ATTEMPT durable. w: a client on loop (kept; it must
 * outlive the runner's appends: see tg_settleq_runner_free); hooks copied;
 * o NULL: defaults. One runner per book. Returns 0 and *out, or -EINVAL (no
 * send hook), -EBUSY (the book has a runner), -ENOMEM, a libuv error.
 * Loop thread. */
int tg_settleq_runner_new(tg_settleq_t *q, uv_loop_t *loop, tg_wal_client_t *w, const tg_settleq_hooks_t *hooks,
                          const tg_settleq_runner_opts_t *o, tg_settleq_runner_t **out);

/* Stops the runner at once, waiting for nothing: no new record is appended,
 * no hook called (so w may be released right after); what is in flight is in
 * the log and tried again after a restart. Results still to come are
 * dropped; the memory goes when the last callback has run (run the loop
 * after, as for tg_wal_client_release). Loop thread. NULL: no-op. */
void tg_settleq_runner_free(tg_settleq_runner_t *r);

/* Settlements the runner is working on (tests). Loop thread. */
size_t tg_settleq_runner_busy(const tg_settleq_runner_t *r);

/* A Record holding one Settlement in state (a Ledger__V1__SettlementState)
 * for item (its id, or "" when NULL), packed into a new buffer (free it), its
 * size in *len; request and nonce are written for PENDING only (a PENDING
 * record with attempts > 0 or a transaction says a send was made before it).
 * tx, error, facilitator may be NULL. NULL when out of memory. Pure, any
 * thread. */
uint8_t *tg_settleq_record(const tg_settle_item_t *item, uint32_t state, uint32_t attempts, const char *tx,
                           const char *error, const char *facilitator, int64_t next_attempt_unix_ms,
                           const char *instance, size_t *len);

#endif
