#ifndef TG_USAGE_H
#define TG_USAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"
#include "pipeline/app.h"
#include "ramp/v1/exchange.pb-c.h"
#include "rpc/connect.h"

/* Usage reports: after a purchase an AI system tells the publisher how many
 * tokens it consumed (ReportUsage); the tenant's usage section
 * (config/config.h) says when a report is owed and how tokens are priced.
 *
 * The book: the transactions of this instance's log (Transaction records
 * with outcome APPROVED or DEFERRED) and their reports (UsageReport records),
 * rebuilt from the log at start (tg_usage_apply from the replay) and kept
 * current from the writer thread (tg_usage_apply from on_durable). A
 * transaction with report_due_at_unix > 0 is an obligation: pending until
 * then, overdue after it (now > due), reported once its first UsageReport is
 * durable (late when accepted after the due time). One without is still
 * known, so that a voluntary report (and its per-1k adjustment) is accepted.
 *
 * Bounds: at most max_entries transactions (default 1,000,000; about 500
 * bytes each for one item with a 140-byte offer id, so ~500 MB full); over it the oldest closed one (reported, or owing
 * nothing) goes first, else the oldest open one (logged). A report for a
 * transaction the book no longer holds (evicted, another instance's, or one
 * whose segment retention removed before a restart) is NOT_FOUND.
 * Retention: tg_usage_oldest_seq holds the log's segments from the oldest
 * open obligation, except one overdue for more than 30 days (it no longer
 * holds the log: after a restart that removed its segment it is forgotten,
 * and stops counting against its AI system). Reported obligations never hold
 * the log.
 *
 * Per-1k pricing is decided when the Transaction record is read, from the
 * tenant's token_pricing then and the item's payment type (RSL "use"): run a
 * restart with the configuration the purchases were made under, or the
 * adjustment of their reports changes.
 *
 * Metrics (tg_usage_metrics_init), since the start (the log's replay
 * included; eviction lowers only the open gauge):
 *   reporting_obligations_total{tenant_id,state} counter: obligations that became
 *     pending (owed after a purchase), overdue (due time passed unreported) and
 *     reported (on time or late). A counter, for "_total" names one in Prometheus
 *     (promtool refuses a gauge so named); what is owed now is
 *   reporting_obligations_open{tenant_id,state} gauge: pending, overdue;
 *   reporting_compliance_rate{tenant_id} gauge: reports on time / obligations due so
 *     far (on time + late + overdue not reported); 1 while none is due;
 *   reporting_token_deviation{tenant_id} histogram, per report: (consumed - estimated)
 *     / estimated over its items, or consumed when nothing was estimated;
 *   reporting_token_deviation_cumulative{tenant_id,billing_ref} gauge: the same over
 *     every report of the billing reference (redacted, tg_billing_redact: references
 *     with the same last 4 bytes share a series), at most 1000 per tenant, then
 *     billing_ref="other".
 * The tenant is the transaction's first item's.
 *
 * Threads: the book has one mutex; every function may be called from any
 * thread, except tg_usage_free (nothing else running) and tg_usage_report
 * (the worker the call arrived on). */

typedef struct tg_usage tg_usage_t;

#define TG_USAGE_DEFAULT_MAX 1000000
#define TG_USAGE_MAX_TOKENS INT64_C(1000000000000) /* 10^12: a count above is refused */
#define TG_USAGE_OVERDUE_HOLD_S (30 * 86400)        /* past this overdue, an obligation stops holding the log */

/* A book for cfg's tenants (borrowed: it outlives the book). max_entries 0:
 * TG_USAGE_DEFAULT_MAX. NULL when out of memory. */
tg_usage_t *tg_usage_new(const tg_config_t *cfg, size_t max_entries);
void tg_usage_free(tg_usage_t *u);

/* Declares the four metrics (start-up). 0 or -ENOMEM. Without it the book
 * works and counts nothing. */
int tg_usage_metrics_init(void);

/* One log record (a ledger.v1.Record), in sequence order: the replay at open
 * and on_durable (writer thread). Takes Transaction (APPROVED, DEFERRED) and
 * UsageReport records, ignores the others. 0, or -EBADMSG when the payload
 * is not a Record (nothing applied). */
int tg_usage_apply(tg_usage_t *u, uint64_t seq, const void *payload, size_t len);

/* Marks what is overdue at now (unix seconds) and refreshes the gauges: the
 * gateway's maintenance timer. tg_usage_overdue does not wait for it. */
void tg_usage_tick(tg_usage_t *u, int64_t now);

/* The sequence of the oldest open obligation's Transaction record that still
 * holds the log (see above); 0: none. For retention. */
uint64_t tg_usage_oldest_seq(tg_usage_t *u);

/* For ExecuteTransaction (purchase.c), before authorizing: 1 when this AI
 * system (grouped by ai_system_id, or by billing_ref when the id is "") has
 * more than limit overdue reports, with detail "N usage reports overdue since
 * <RFC 3339 of the oldest due time>: report them with ReportUsage"; 0
 * otherwise, and always when limit is 0 or u is NULL. */
int tg_usage_overdue(tg_usage_t *u, const char *ai_system_id, const char *billing_ref, uint32_t limit,
                     char *detail, size_t dlen);

/* Whether a purchase of tenant t at now owes a usage report: 1 and *due_at
 * (now + usage.report_within_s, or now + 86400 when that is 0 and the offer's
 * RSL license has a <reporting> element: license_reporting), else 0 and
 * *due_at = 0. For a call with several items: owed when any item owes, due
 * at the earliest. Pure. */
int tg_usage_due(const tg_config_tenant_t *t, bool license_reporting, int64_t now, int64_t *due_at);

/* What an item of tenant t costs: amount (flat pricing, or a payment type
 * other than TG_RSL_PAY_USE), or ceil(amount * estimated_tokens / 1000)
 * (token_pricing per_1k and payment type "use"). 0 and *charge, or
 * -EOVERFLOW (the charge does not fit an int64) or -EINVAL (a negative
 * amount or token count). Pure. */
int tg_usage_item_charge(const tg_config_tenant_t *t, int64_t amount, uint32_t payment_type, int64_t estimated_tokens,
                         int64_t *charge);

/* ReportUsage, for exchange.c. In order (each refuses the call):
 *  1. the request: ai_system with a billing_reference, transaction_id, 1..100
 *     usage records, each with an offer_id, named once, 0 <= consumed_tokens
 *     <= 10^12 (invalid_argument);
 *  2. the transaction in the book (not_found), the caller's ai_system.id and
 *     billing_reference both the purchase's (permission_denied, naming no
 *     owner), every offer_id one of its items (invalid_argument; an item not
 *     named counts as consumed = estimated);
 *  3. reported already: the same counts answer as the first report did; other
 *     counts are already_exists; while another call's report of it is being
 *     logged the call waits for it (ledger.idempotency.wait_ms), then aborted;
 *  4. the adjustment (per-1k items: ceil(amount * consumed / 1000) -
 *     ceil(amount * estimated / 1000), summed; invalid_argument when it
 *     overflows), applied: on the built-in ledger a LedgerChange DEBIT (> 0)
 *     or CREDIT (< 0) with reference "usage:<txid>" (idempotent) logged before
 *     the report; through another adapter, an extra charge is authorized
 *     (transaction id "<txid>:usage") and captured after the answer (refused
 *     or failed: logged as "unbilled", the publisher collects it), a credit is
 *     logged as "refund_due" for the publisher to pay back (the Connect
 *     billing contract has no refund);
 *  5. the UsageReport record appended; the answer (transaction_id, accepted,
 *     every item with its estimate, the adjustment when an item is per-1k)
 *     once it is durable. The log full or behind: unavailable with
 *     Retry-After, nothing recorded (a retry is safe: should the ledger's
 *     DEBIT/CREDIT have become durable without the report, the retry's is
 *     ignored by its reference, so a retry with other counts keeps the first
 *     amount on the balance).
 * A report after the due time is accepted and marked late. Worker thread. */
void tg_usage_report(tg_app_worker_t *aw, tg_connect_call_t *call, const Ramp__V1__ReportUsageRequest *req);

/* ---- The book's report steps (tg_usage_report uses them; tests too) */

#define TG_USAGE_MAX_ITEMS 100

typedef struct tg_usage_use {
  const char *offer_id;
  int64_t consumed;
} tg_usage_use_t;

typedef struct tg_usage_item {
  const char *offer_id; /* in the claim's strings */
  int64_t amount;       /* the offer's (per 1,000 tokens when per_1k) */
  int64_t estimated, consumed;
  int64_t adjustment;   /* per_1k: ceil(amount*consumed/1000) - ceil(amount*estimated/1000); else 0 */
  bool per_1k;
} tg_usage_item_t;

/* A transaction's report, resolved against the book. */
typedef struct tg_usage_claim {
  char txid[64];
  char tenant[65];        /* "" when the record named none */
  size_t tenant_index;    /* in the configuration; SIZE_MAX when no longer configured */
  char currency[17];
  char ai_system_id[257];
  char billing_ref[257];
  int64_t due_at;         /* 0: no obligation */
  int64_t reported_at;
  bool late;
  bool any_per_1k;
  int64_t adjustment;     /* summed */
  size_t nitems;
  tg_usage_item_t items[TG_USAGE_MAX_ITEMS];
  char *strings;          /* the offer ids (malloc): tg_usage_claim_clear */
} tg_usage_claim_t;

/* Frees what a claim (any outcome of tg_usage_claim) holds. */
void tg_usage_claim_clear(tg_usage_claim_t *c);

#define TG_USAGE_SAME 1   /* reported already with these counts: *out is that report */

/* Resolves a report of txid by (ai_system_id, billing_ref) at now, and marks
 * the transaction as being reported. Returns 0 (claimed: append its record,
 * or tg_usage_unclaim), TG_USAGE_SAME, -ENOENT (unknown), -EPERM (another
 * caller's), -EINVAL (an offer not in it, or the adjustment overflows; why
 * says which), -EEXIST (reported with other counts), -EBUSY (a report of it
 * is being logged). uses: already checked (1..TG_USAGE_MAX_ITEMS, distinct,
 * counts in range). */
int tg_usage_claim(tg_usage_t *u, const char *txid, const char *ai_system_id, const char *billing_ref,
                   const tg_usage_use_t *uses, size_t nuses, int64_t now, tg_usage_claim_t *out, char *why,
                   size_t wlen);

/* Gives a claim back (its record could not be logged). */
void tg_usage_unclaim(tg_usage_t *u, const char *txid);

/* The UsageReport record of a claim, packed (malloc; *len), or NULL. billing
 * and detail: Usagereport.adjustment_billing/_detail. */
uint8_t *tg_usage_record(const tg_usage_claim_t *c, const char *billing, const char *detail, const char *instance,
                         const char *request_id, size_t *len);

/* What the book says of one tenant (tests, status). */
typedef struct tg_usage_stats {
  uint64_t pending, overdue, reported; /* open obligations by state; reported ones */
  uint64_t on_time, late;              /* reports of obligations */
  size_t entries;                      /* transactions in the book (every tenant) */
} tg_usage_stats_t;

void tg_usage_stats(tg_usage_t *u, const char *tenant, tg_usage_stats_t *out);

#endif
