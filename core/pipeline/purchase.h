#ifndef TG_PURCHASE_H
#define TG_PURCHASE_H

#include "pipeline/app.h"
#include "rpc/connect.h"
#include "ramp/v1/exchange.pb-c.h"

/* ExecuteTransaction: an agent buys the offers DiscoverResources gave it.
 *
 * Order, per call (each step refuses the whole call; nothing is half done):
 *  1. the request: idempotency key 1..idempotency_key_max bytes of UTF-8,
 *     1..TG_PURCHASE_MAX_ITEMS items, estimated tokens >= 0, a billing
 *     reference (invalid_argument otherwise).
 *  2. idempotency: the key, scoped by billing reference, with a hash of the
 *     request. A key already answered replays that answer byte for byte
 *     (also once its offers have expired or the configuration changed); the
 *     same key with another request is already_exists; a key whose first call
 *     is still running waits up to ledger.idempotency.wait_ms for it, then
 *     aborted (retry).
 *  2b. each offer id verified (signature, key id, expiry, and the tenant
 *     that made it still serving the offer's host): the price, currency and
 *     URI come from the verified offer, never from the request. One currency
 *     per call, each offer once.
 *  3. each tenant's rate_limit hook (once per tenant, on its first item).
 *  4. the policy's decision: each item is quoted again for this caller (skip,
 *     catalog, price hook); an offer the tenant no longer sells (withdrawn
 *     from the catalog, refused by the price hook, not for this AI system's
 *     purposes) is denied, DENIAL_REASON_POLICY. The price charged is the
 *     offer's: a quote is honoured until it expires.
 *  5. billing authorize: one hold for the total on the billing reference.
 *  6. each item's retrieval URL signed by its tenant's signer.
 *  7. the Transaction record appended to the write-ahead log; the answer
 *     waits until it is durable (the built-in ledger charges when it is).
 *  8. the answer, then capture.
 * A denial (offer invalid or expired, rate limited, policy, insufficient
 * funds) is an APPROVED/DENIED answer with its DenialReason and a detail a
 * person can act on; it charges nothing and is not remembered (the key may be
 * used again). The log full or behind is `unavailable`; a signing failure
 * releases the hold, logs a sign_failed record and answers `internal`.
 *
 * Redis mode (ledger.mode = "redis"): the key is claimed in Redis (the
 * claim lives ledger.idempotency.pending_ttl_ms should its owner die), a
 * duplicate on another instance polls every 10 ms for the answer, and the
 * answer is stored in Redis before it is sent. A claim that cannot be given
 * back (Redis down when the call was refused) blocks its key until
 * pending_ttl_ms; a retry meanwhile is `aborted`. Balances are Redis'
 * (billing/billing.h "redis"); a capture that fails is owed and paid from
 * the main loop (pipeline/owed.h).
 *
 * Threads: the worker the call arrived on, throughout. */

#define TG_PURCHASE_MAX_ITEMS 100

void tg_purchase_execute(tg_app_worker_t *aw, tg_connect_call_t *call,
                         const Ramp__V1__ExecuteTransactionRequest *req);

/* exchange_transaction_total{tenant_id,status}, billing_authorize_duration_seconds{tenant_id,approved}.
 * Start-up. 0 or -ENOMEM. */
int tg_purchase_metrics_init(void);

/* Rebuilds what the log says about purchases (idempotency answers within
 * their TTL) from one replayed record: the wal's replay callback calls it
 * next to the ledger's. 0, or -EBADMSG for a payload that is not a Record. */
int tg_purchase_replay(tg_app_t *app, uint64_t seq, const void *payload, size_t len);

#endif
