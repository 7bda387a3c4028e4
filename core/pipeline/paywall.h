#ifndef TG_PAYWALL_H
#define TG_PAYWALL_H

#include <stdbool.h>
#include <stddef.h>

#include "base/trace.h"
#include "pipeline/app.h"
#include "pipeline/quote.h"
#include "pipeline/view.h"

/* HTTP 402 payments on a tenant's own resources (x402 v1 and v2, t402): the
 * part of the resource path (pipeline/resource.h) after the quote, for a
 * tenant with a `payments` section (pay/payconf.h).
 *
 *   unpaid      402, PAYMENT-REQUIRED (v2, base64 JSON), the v1 JSON body,
 *               Cache-Control: no-store. Built once per (tenant, resource URL,
 *               policy version, price) and kept in the worker's cache.
 *   paid        PAYMENT-SIGNATURE (v2, t402) or X-PAYMENT (v1), decoded
 *               strictly; its `accepted` must be one of the offered
 *               requirements. Then, in this order: the local checks (EIP-712
 *               signature, payTo, amount, validity window: pay/x402.h), the
 *               nonce claim (network, asset, payer, nonce), kept until
 *               validBefore, in this process and in Redis when configured, so
 *               a second copy of one authorization is refused before anything
 *               settles), verification (the JSON-RPC providers' balance and
 *               authorization state with verify = "local", else the
 *               facilitator pool), the policy's `settle` hook (sync or async),
 *               and then:
 *                 sync   settle, then serve with PAYMENT-RESPONSE; a refused
 *                        settlement answers 402 with success false and serves
 *                        nothing; a pending one is queued durably and served;
 *                 async  the settlement is written to the log (the durable
 *                        retry queue of pay/settleq.h), then served; it settles
 *                        from the queue.
 *   serving     302 to the tenant signer's URL for the resource, or the
 *               tenant's origin through the streaming reverse proxy.
 *   refusals    the t402 error body {code, message, details?} with the status
 *               of its code (pay/x402.h), the PAYMENT-REQUIRED header again,
 *               Cache-Control: no-store. A facilitator answering garbage or a
 *               redirect is 502; one that cannot be reached is T402-2006 and
 *               serves nothing.
 *
 * Threads: tg_paywall_new/free on the main thread before workers start and
 * after they stop; worker parts on their worker's thread. */

typedef struct tg_paywall tg_paywall_t;
typedef struct tg_paywall_worker tg_paywall_worker_t;

/* Parses every tenant's payments section (a bad one fails start-up and
 * `tollgate check` with "tenant T: payments.KEY: why"), checks what serving
 * needs (a signer for serve = "redirect"; a data_dir for settle = "async"),
 * and makes the process-wide parts: the local nonce store and the settlement
 * book. NULL pay when no tenant takes payments. 0 or negative with err. */
int tg_paywall_new(tg_app_t *app, tg_paywall_t **out, char *err, size_t errlen);
void tg_paywall_free(tg_paywall_t *pw);

/* Only the validation of tg_paywall_new, for `tollgate check`. */
int tg_paywall_check_config(const tg_config_t *cfg, char *err, size_t errlen);

/* The log's records that are the paywall's (settlements): replayed at start
 * and applied when durable. 0 for every record (others are ignored). */
int tg_paywall_replay(tg_paywall_t *pw, uint64_t seq, const void *payload, size_t len);

/* Settlements not yet settled: the log keeps their segments. */
size_t tg_paywall_unsettled(const tg_paywall_t *pw);
uint64_t tg_paywall_oldest_seq(const tg_paywall_t *pw);

/* True when tenant i takes payments. */
bool tg_paywall_enabled(const tg_paywall_t *pw, size_t ti);

/* Per worker: pools, caches and, on worker 0, the settlement runner. */
int tg_paywall_worker_start(tg_app_worker_t *aw, char *err, size_t errlen);
void tg_paywall_worker_stop(tg_app_worker_t *aw);

/* The paywall's answer to a priced resource. offer is the quote's first
 * priced offer; st and view are only used during the call. It answers req
 * now or later (exactly once). span (may be NULL) is the request's server
 * span (base/trace.h): taken, and ended once the request is answered. */
void tg_paywall_priced(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req,
                       tg_policy_state_t *st, const tg_view_t *view, const tg_quote_offer_t *offer,
                       tg_span_t *span);

#endif
