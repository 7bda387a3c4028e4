#include "pipeline/purchase.h"

#include <errno.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include <mbedtls/sha256.h>

#include "base/log.h"
#include "base/metrics.h"
#include "base/utf8.h"
#include "billing/billconf.h"
#include "billing/billing.h"
#include "billing/reconcile.h"
#include "catalog/offer.h"
#include "catalog/rsl.h"
#include "ledger/idem.h"
#include "ledger/record.h"
#include "ledger/v1/ledger.pb-c.h"
#include "ledger/wal.h"
#include "net/target.h"
#include "pipeline/owed.h"
#include "pipeline/quote.h"
#include "pipeline/usage.h"
#include "pipeline/view.h"
#include "signer/signer.h"

#define POLL_MS 1        /* local table: another worker's call, on this machine */
#define POLL_REDIS_MS 10 /* Redis: a round trip per poll */

typedef struct item {
  tg_offer_t offer;        /* verified */
  size_t tenant;           /* index in the configuration */
  int64_t estimated_tokens;
  const char *offer_id;    /* the request's, valid until the call finishes */
  int64_t charge;          /* what it costs: the offer's amount, or per 1,000 estimated tokens */
  bool reporting;          /* its license asks for usage reports */
  char *url;               /* signed retrieval URL (malloc) */
  int64_t url_expires;
} item_t;

typedef struct held {
  size_t tenant;
  size_t first;            /* its first item */
  tg_snapshot_pin_t pin;
  tg_policy_state_t *st;
} held_t;

typedef struct purchase {
  tg_app_worker_t *aw;
  tg_connect_call_t *call;
  const Ramp__V1__ExecuteTransactionRequest *req;
  char request_id[64];
  uint8_t scope[32], req_hash[32];
  bool owns_key;           /* the idempotency key is ours: finish or abort it */
  bool timer_open;
  uv_timer_t timer;        /* polls a key another call holds */
  uint64_t wait_until;
  int pending;             /* rate-limit decisions still out, plus one while issuing */
  bool limited, failed;
  uint32_t retry_ms;
  size_t nitems, nheld;
  item_t *items;
  held_t *held;
  char currency[TG_POLICY_CURRENCY_MAX + 1];
  int64_t total;
  char hold[TG_BILLING_HOLD_MAX];
  bool has_hold;
  tg_billing_t *billing;   /* the adapter that bills this call (the tenants' own) */
  bool remote;             /* billing is the tenant's service (billing/reconcile.h book) */
  bool deferred;           /* billing failed and the policy said serve now, bill later */
  bool booked;             /* the charge is in the billing book */
  int64_t report_due;      /* unix seconds a usage report is due by; 0: none owed */
  uint64_t auth_started;
  char txid[40];
  char req_ref[257];       /* the billing reference */
  uint8_t *resp;           /* the packed answer */
  size_t resp_len;
  tg_span_ref_t trace;     /* the call's server span (outlives it: the capture comes after the answer) */
  tg_span_t *sp_auth, *sp_log, *sp_cap; /* open child spans (base/trace.h); NULL: not traced */
} purchase_t;

static tg_metric_t *m_tx, *m_auth;

int tg_purchase_metrics_init(void) {
  static const char *const tl[] = {"tenant_id", "status", NULL};
  static const char *const al[] = {"tenant_id", "approved", NULL};
  m_tx = tg_metric_new(TG_METRIC_COUNTER, "exchange_transaction_total",
                       "ExecuteTransaction outcomes per tenant of the call: approved, deferred (served, billed "
                       "later), denied (with a DenialReason, or billing unavailable), replayed (an idempotent "
                       "retry), or error (unavailable, internal).",
                       tl, NULL, 0);
  m_auth = tg_metric_new(TG_METRIC_HISTOGRAM, "billing_authorize_duration_seconds",
                         "Time the billing adapter took to authorize a purchase (hold), by tenant and "
                         "whether it approved.",
                         al, tg_billing_auth_buckets, tg_billing_auth_nbuckets);
  return m_tx && m_auth ? 0 : -ENOMEM;
}

static const char *tenant_name(const purchase_t *p, size_t ti) { return p->aw->app->cfg->tenants[ti].name; }

/* The tenant a call names before its offers are verified: the one its first
 * offer id claims, when that is one of ours (the label set stays bounded). */
static const char *claimed_tenant(const purchase_t *p) {
  const char *id = p->req->items[0]->offer_id;
  tg_offer_t *o = malloc(sizeof *o);
  const char *name = "";
  if (o && tg_offer_decode(&p->aw->app->offer_keys, id, strlen(id), 0, NULL, o) == 0) {
    const tg_config_t *cfg = p->aw->app->cfg;
    for (size_t i = 0; i < cfg->ntenants; i++)
      if (strcmp(cfg->tenants[i].name, o->tenant) == 0)
        name = cfg->tenants[i].name;
  }
  free(o);
  return name;
}

static void count(const purchase_t *p, const char *status) {
  /* Every outcome is counted just before its answer: the access log's note. */
  tg_http_req_t *http = p->call ? tg_connect_call_http(p->call) : NULL;
  if (http && p->req_ref[0])
    tg_redact_ref(p->req_ref, http->note.payer, sizeof http->note.payer);
  if (http && (strcmp(status, "approved") == 0 || strcmp(status, "deferred") == 0)) {
    http->note.priced = true;
    http->note.price = p->total;
    snprintf(http->note.currency, sizeof http->note.currency, "%s", p->currency);
  }
  if (p->nheld == 0) {
    const char *labels[] = {claimed_tenant(p), status};
    tg_counter_add(m_tx, labels, 1);
  }
  for (size_t k = 0; k < p->nheld; k++) {
    const char *labels[] = {tenant_name(p, p->held[k].tenant), status};
    tg_counter_add(m_tx, labels, 1);
  }
}

static void on_timer_closed(uv_handle_t *h) {
  purchase_t *p = h->data;
  free(p);
}

static void purchase_free(purchase_t *p) {
  tg_span_finish(&p->sp_auth, "abandoned");
  tg_span_finish(&p->sp_log, "abandoned");
  tg_span_finish(&p->sp_cap, "abandoned");
  for (size_t k = 0; k < p->nheld; k++) {
    tg_snapshot_release(p->aw->catalog_readers[p->held[k].tenant], p->held[k].pin);
    if (p->held[k].st)
      tg_policy_release(p->held[k].st);
  }
  for (size_t i = 0; i < p->nitems; i++)
    free(p->items[i].url);
  free(p->items);
  free(p->held);
  free(p->resp);
  if (p->timer_open) {
    p->timer.data = p;
    uv_close((uv_handle_t *)&p->timer, on_timer_closed);
  } else {
    free(p);
  }
}

static void on_redis_done(void *arg, int st, const void *resp, size_t len) {
  (void)arg, (void)resp, (void)len;
  if (st != 0)
    tg_log(TG_LOG_WARN, "idempotency: Redis did not take the key's update", "error", strerror(st < 0 ? -st : EIO),
           NULL);
}

/* The call was refused: the key may be used again. */
static void give_back_key(purchase_t *p) {
  if (!p->owns_key)
    return;
  p->owns_key = false;
  if (p->aw->idem_redis)
    tg_idem_redis_abort(p->aw->idem_redis, p->scope, p->req_hash, on_redis_done, NULL);
  else
    tg_idem_abort(p->aw->app->idem, p->scope);
}

/* arg: NULL (the purchase may be gone by now: a remote release answers later). */
static void on_released(void *arg, const tg_billing_result_t *r) {
  (void)arg;
  if (r->status != TG_BILLING_APPROVED)
    tg_log(TG_LOG_WARN, "billing release failed (the hold expires by itself)", "detail", r->detail, NULL);
}

static void release_hold(purchase_t *p) {
  if (p->has_hold) {
    p->has_hold = false;
    p->billing->ops->release(p->billing, p->hold, on_released, NULL);
  }
}

/* The charge is out of the billing book (the purchase was not logged). */
static void unbook(purchase_t *p) {
  if (p->booked) {
    p->booked = false;
    tg_billing_book_done(p->aw->app->billing_book, p->txid);
  }
}

/* Refuses the call with a Connect error; nothing was charged. Frees p. */
static void fail(purchase_t *p, tg_connect_code_t code, const char *status, const char *msg) {
  unbook(p);
  release_hold(p);
  give_back_key(p);
  count(p, status);
  tg_connect_fail(p->call, code, "%s", msg);
  purchase_free(p);
}

/* Answers DENIED with reason and detail; nothing was charged, nothing is
 * remembered. Frees p. */
static void deny(purchase_t *p, Ramp__V1__DenialReason reason, const char *detail) {
  release_hold(p);
  give_back_key(p);
  count(p, "denied");
  Ramp__V1__ExecuteTransactionResponse resp = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  resp.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DENIED;
  resp.denial_reason = reason;
  resp.denial_detail = (char *)detail;
  tg_connect_reply(p->call, &resp.base);
  purchase_free(p);
}

/* ---- The answer, from its packed form (so a replay is the same bytes) */

static void reply_packed(tg_connect_call_t *call, const uint8_t *data, size_t len) {
  Ramp__V1__ExecuteTransactionResponse *r = ramp__v1__execute_transaction_response__unpack(NULL, len, data);
  if (r == NULL) {
    tg_connect_fail(call, TG_CONNECT_INTERNAL, "the stored answer does not decode");
    return;
  }
  tg_connect_reply(call, &r->base);
  ramp__v1__execute_transaction_response__free_unpacked(r, NULL);
}

/* ---- Step 8: durable, answered, captured */

/* Redis mode: the charge is owed to Redis until captured (pipeline/owed.h). */
static bool shared_ledger(const purchase_t *p) { return strcmp(p->billing->ops->name, "redis") == 0; }

typedef struct logged {
  tg_billing_book_t *book; /* remote billing: the charge leaves the book once its CAPTURE record is durable */
  char txid[];
} logged_t;

static void on_capture_logged(void *arg, int status, uint64_t seq) {
  logged_t *l = arg;
  (void)seq;
  if (status != 0)
    tg_log(TG_LOG_WARN, "capture record not logged (the capture is repeated, charging once)", "transaction",
           l->txid, NULL);
  if (l->book && status != 0)
    tg_billing_book_retry(l->book, l->txid, 1000);
  else if (l->book)
    tg_billing_book_done(l->book, l->txid);
  free(l);
}

static void on_captured(void *arg, const tg_billing_result_t *r) {
  purchase_t *p = arg;
  tg_span_finish(&p->sp_cap, r->status == TG_BILLING_APPROVED ? NULL : r->detail);
  tg_billing_book_t *book = p->remote ? p->aw->app->billing_book : NULL;
  if (r->status != TG_BILLING_APPROVED) {
    /* Owed: captured again later (once per transaction id): by the main
     * loop in Redis mode, by the reconciler for a billing service. */
    tg_log_req(TG_LOG_ERROR, p->request_id, "billing capture failed (retried)", "transaction", p->txid, "detail",
               r->detail, NULL);
    if (book)
      tg_billing_book_retry(book, p->txid, 1000);
  } else if (shared_ledger(p) || book) {
    /* The charge went through: the log says so, and it is owed no more. */
    size_t len, tl = strlen(p->txid);
    uint8_t *rec = tg_record_ledger_change(LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE, p->req_ref,
                                           p->currency, p->total, p->txid, NULL, p->aw->app->cfg->instance, &len);
    logged_t *l = malloc(sizeof *l + tl + 1);
    if (l) {
      l->book = book;
      memcpy(l->txid, p->txid, tl + 1);
    }
    if (rec && l && tg_wal_append(p->aw->wal, rec, len, on_capture_logged, l, NULL) == 0)
      l = NULL;
    else if (book)
      tg_billing_book_retry(book, p->txid, 1000); /* captured again (already done), then recorded */
    free(l);
    free(rec);
    if (shared_ledger(p))
      tg_owed_remove(p->aw->app->owed, p->txid);
  }
  purchase_free(p);
}

static void answer(purchase_t *p);

static void on_shared(void *arg, int st, const void *resp, size_t len) {
  purchase_t *p = arg;
  (void)resp, (void)len;
  if (st != 0)
    tg_log_req(TG_LOG_WARN, p->request_id, "idempotency: Redis did not take the answer", "error",
               strerror(st < 0 ? -st : EIO), NULL);
  answer(p);
}

static void on_durable(void *arg, int status, uint64_t seq) {
  purchase_t *p = arg;
  tg_span_finish(&p->sp_log, status != 0 ? strerror(-status) : NULL);
  if (status != 0) {
    char msg[160];
    tg_log_req(TG_LOG_ERROR, p->request_id, "transaction log append failed", "transaction", p->txid, "error",
               strerror(-status), NULL);
    /* The log is failed until a restart, which replays whatever of the batch
     * did reach the disk: a retry with the same key then gets that answer. */
    snprintf(msg, sizeof msg, "the transaction log failed (%s): retry later with the same idempotency key",
             strerror(-status));
    fail(p, TG_CONNECT_UNAVAILABLE, "error", msg);
    return;
  }
  if (p->booked) {
    tg_billing_book_t *book = p->aw->app->billing_book;
    tg_billing_book_set_seq(book, p->txid, seq);
    if (p->deferred) /* the reconciler's from now on */
      tg_billing_book_retry(book, p->txid, p->aw->app->billconf[p->held[0].tenant].reconcile_backoff_ms);
  }
  /* On disk: the answer is now the key's, whatever happens to this call. In
   * Redis mode the answer waits for the shared store to hold it, so that a
   * retry on another instance replays it rather than waiting. */
  if (p->owns_key && p->aw->idem_redis) {
    p->owns_key = false;
    if (tg_idem_redis_finish(p->aw->idem_redis, p->scope, p->req_hash, p->resp, p->resp_len, on_shared, p) == 0)
      return;
    tg_log_req(TG_LOG_WARN, p->request_id, "idempotency: the answer could not be shared", NULL);
  } else if (p->owns_key) {
    tg_idem_finish(p->aw->app->idem, p->scope, p->resp, p->resp_len, tg_idem_now_ms());
    p->owns_key = false;
  }
  answer(p);
}

/* The answer of a durable purchase, then the capture. */
static void answer(purchase_t *p) {
  count(p, p->deferred ? "deferred" : "approved");
  reply_packed(p->call, p->resp, p->resp_len);
  if (p->has_hold) {
    p->has_hold = false;
    if (shared_ledger(p))
      tg_owed_add(p->aw->app->owed, p->txid, p->req_ref, p->currency, p->total, p->hold);
    p->sp_cap = tg_span_start_ref("billing.capture", &p->trace, TG_SPAN_CLIENT);
    tg_span_set_str(p->sp_cap, "billing.adapter", p->billing->ops->name);
    p->billing->ops->capture(p->billing, p->hold, on_captured, p);
    return;
  }
  purchase_free(p);
}

/* ---- Step 7: the record */

/* "tx_" + 10 digits of milliseconds (ids sort by time) + 16 digits of a
 * per-thread sequence that starts at a random 80-bit value (getrandom once
 * per thread): unique within the process without a syscall per id, and
 * across processes and restarts by the random start. */
static void new_txid(char out[40]) {
  static const char digits[] = "0123456789abcdefghjkmnpqrstvwxyz"; /* Crockford base32, lower case */
  static _Thread_local uint64_t hi, lo; /* 80 bits: 16 in hi, 64 in lo */
  static _Thread_local bool seeded;
  if (!seeded) {
    uint8_t rnd[10] = {0};
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
      uint64_t t = uv_hrtime() ^ (uint64_t)(uintptr_t)&hi;
      memcpy(rnd, &t, 8);
    }
    hi = (uint64_t)rnd[0] << 8 | rnd[1];
    memcpy(&lo, rnd + 2, 8);
    seeded = true;
  }
  if (++lo == 0)
    hi = (hi + 1) & 0xffff;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  uint64_t ms = (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
  char *o = out;
  *o++ = 't', *o++ = 'x', *o++ = '_';
  for (int i = 9; i >= 0; i--)
    *o++ = digits[(ms >> (5 * i)) & 31];
  /* 80 bits as 16 digits: the top 16 bits, then the low 64 */
  uint64_t top = hi << 24 | lo >> 40, bottom = lo & ((UINT64_C(1) << 40) - 1);
  for (int i = 7; i >= 0; i--)
    *o++ = digits[(top >> (5 * i)) & 31];
  for (int i = 7; i >= 0; i--)
    *o++ = digits[(bottom >> (5 * i)) & 31];
  *o = '\0';
}

/* The answer packed into p->resp. 0 or -ENOMEM. */
static int pack_answer(purchase_t *p) {
  Ramp__V1__ExecuteTransactionResponse resp = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  Ramp__V1__Money total = RAMP__V1__MONEY__INIT;
  Ramp__V1__SignedItem *items = calloc(p->nitems, sizeof *items);
  Ramp__V1__SignedItem **ptrs = calloc(p->nitems, sizeof *ptrs);
  Ramp__V1__Money *costs = calloc(p->nitems, sizeof *costs);
  int rc = -ENOMEM;
  if (items == NULL || ptrs == NULL || costs == NULL)
    goto done;
  resp.transaction_id = p->txid;
  resp.status = p->deferred ? RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DEFERRED
                            : RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_APPROVED;
  total.currency = p->currency;
  total.amount = p->total;
  resp.total_cost = &total;
  for (size_t i = 0; i < p->nitems; i++) {
    item_t *it = &p->items[i];
    ramp__v1__signed_item__init(&items[i]);
    ramp__v1__money__init(&costs[i]);
    costs[i].currency = it->offer.currency;
    costs[i].amount = it->charge;
    items[i].offer_id = (char *)it->offer_id;
    items[i].uri = it->offer.uri;
    items[i].retrieval_url = it->url;
    items[i].expires_at_unix = it->url_expires;
    items[i].cost = &costs[i];
    ptrs[i] = &items[i];
  }
  resp.n_items = p->nitems;
  resp.items = ptrs;
  Ramp__V1__ReportingObligation ob = RAMP__V1__REPORTING_OBLIGATION__INIT;
  if (p->report_due > 0) {
    ob.required = true;
    ob.due_at_unix = p->report_due;
    ob.endpoint = ""; /* ReportUsage on this exchange */
    resp.reporting = &ob;
  }
  p->resp_len = ramp__v1__execute_transaction_response__get_packed_size(&resp);
  if ((p->resp = malloc(p->resp_len ? p->resp_len : 1)) == NULL)
    goto done;
  ramp__v1__execute_transaction_response__pack(&resp, p->resp);
  rc = 0;
done:
  free(items);
  free(ptrs);
  free(costs);
  return rc;
}

/* The Transaction record of p, packed (malloc), or NULL. */
static uint8_t *pack_record(purchase_t *p, Ledger__V1__TransactionOutcome outcome, const char *detail,
                            size_t *len) {
  const tg_app_t *app = p->aw->app;
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__Transaction tx = LEDGER__V1__TRANSACTION__INIT;
  Ledger__V1__Amount total = LEDGER__V1__AMOUNT__INIT;
  Ledger__V1__Amount *totals[1] = {&total};
  Ledger__V1__TransactionItem *items = calloc(p->nitems, sizeof *items);
  Ledger__V1__TransactionItem **ptrs = calloc(p->nitems, sizeof *ptrs);
  uint8_t *out = NULL;
  if (items == NULL || ptrs == NULL)
    goto done;
  rec.at_unix_ms = tg_record_now_ms();
  rec.instance = app->cfg->instance ? app->cfg->instance : (char *)"";
  rec.kind_case = LEDGER__V1__RECORD__KIND_TRANSACTION;
  rec.transaction = &tx;
  tx.id = p->txid;
  tx.outcome = outcome;
  tx.idempotency_key = p->req->idempotency_key;
  tx.request_hash.data = p->req_hash;
  tx.request_hash.len = sizeof p->req_hash;
  tx.billing_reference = p->req->ai_system->billing_reference;
  tx.billing_type = (char *)p->billing->ops->name;
  tx.ai_system_id = p->req->ai_system->id;
  tx.request_id = p->request_id;
  tx.detail = (char *)(detail ? detail : "");
  tx.report_due_at_unix = p->report_due;
  total.currency = p->currency;
  total.amount = p->total;
  tx.n_totals = 1;
  tx.totals = totals;
  for (size_t i = 0; i < p->nitems; i++) {
    item_t *it = &p->items[i];
    ledger__v1__transaction_item__init(&items[i]);
    items[i].tenant = it->offer.tenant;
    items[i].offer_id = (char *)it->offer_id;
    items[i].uri = it->offer.uri;
    items[i].amount = it->offer.amount;
    items[i].currency = it->offer.currency;
    items[i].payment_type = it->offer.payment_type;
    items[i].estimated_tokens = it->estimated_tokens;
    items[i].url_expires_at_unix = it->url_expires;
    ptrs[i] = &items[i];
  }
  tx.n_items = p->nitems;
  tx.items = ptrs;
  if (outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED ||
      outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED) {
    tx.response.data = p->resp;
    tx.response.len = p->resp_len;
  }
  *len = ledger__v1__record__get_packed_size(&rec);
  if ((out = malloc(*len)) != NULL)
    ledger__v1__record__pack(&rec, out);
done:
  free(items);
  free(ptrs);
  return out;
}

static void on_sign_failed_logged(void *arg, int status, uint64_t seq) {
  (void)seq;
  if (status != 0)
    tg_log(TG_LOG_ERROR, "sign_failed record not logged", "error", strerror(-status), NULL);
  free(arg);
}

/* A URL could not be signed: the hold goes back, the log says so, the call fails. */
static void sign_failed(purchase_t *p, size_t i, const char *why) {
  size_t len;
  char detail[512];
  snprintf(detail, sizeof detail, "items[%zu]: tenant %s could not sign the retrieval URL: %s", i,
           tenant_name(p, p->items[i].tenant), why);
  tg_log_req(TG_LOG_ERROR, p->request_id, "sign_failed", "transaction", p->txid, "tenant",
             tenant_name(p, p->items[i].tenant), "reason", why, NULL);
  uint8_t *rec = pack_record(p, LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_SIGN_FAILED, detail, &len);
  if (rec && tg_wal_append(p->aw->wal, rec, len, on_sign_failed_logged, NULL, NULL) != 0)
    tg_log_req(TG_LOG_ERROR, p->request_id, "sign_failed record not logged", NULL);
  free(rec);
  char msg[640];
  snprintf(msg, sizeof msg, "%s; nothing was charged (request %s)", detail, p->request_id);
  fail(p, TG_CONNECT_INTERNAL, "error", msg);
}

/* Steps 6 and 7. */
static void sign_and_log(purchase_t *p) {
  const tg_app_t *app = p->aw->app;
  int64_t now = (int64_t)time(NULL);
  tg_span_t *sp = tg_span_start_ref("signer.sign", &p->trace, TG_SPAN_INTERNAL);
  tg_span_set_int(sp, "items", (int64_t)p->nitems);
  for (size_t i = 0; i < p->nitems; i++) {
    item_t *it = &p->items[i];
    const tg_signer_t *s = &app->signers[it->tenant];
    char why[256] = "";
    tg_buf_t url = {0};
    if (s->type == TG_SIGNER_NONE) {
      tg_span_finish(&sp, "no signer");
      sign_failed(p, i, "no signer is configured for the tenant");
      return;
    }
    if (tg_signer_resource(s, it->offer.uri, now, &url, &it->url_expires, why, sizeof why) != 0) {
      tg_buf_free(&url);
      tg_span_finish(&sp, why[0] ? why : "out of memory");
      sign_failed(p, i, why[0] ? why : "out of memory");
      return;
    }
    it->url = url.data; /* the buffer's memory is the string */
    int64_t due;
    if (tg_usage_due(&app->cfg->tenants[it->tenant], it->reporting, now, &due) == 1 &&
        (p->report_due == 0 || due < p->report_due))
      p->report_due = due;
  }
  tg_span_finish(&sp, NULL);
  size_t len;
  uint8_t *rec = NULL;
  Ledger__V1__TransactionOutcome outcome = p->deferred ? LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED
                                                       : LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED;
  if (pack_answer(p) != 0 ||
      (rec = pack_record(p, outcome, p->deferred ? "billing deferred: served now, billed by reconciliation" : NULL,
                         &len)) == NULL) {
    fail(p, TG_CONNECT_RESOURCE_EXHAUSTED, "error", "out of memory");
    return;
  }
  /* A billing service's charge is in the book before its record can be
   * durable: a crash from here on leaves the record for replay to find, and
   * retention sees the charge (billing/reconcile.h). A deferred one is there
   * already (the cap was taken). */
  if (p->remote && !p->deferred) {
    const char *ai = p->req->ai_system->id;
    int brc = tg_billing_book_owe_capture(p->aw->app->billing_book, p->held[0].tenant, p->txid, p->req_ref,
                                          p->currency, p->total, ai, p->hold);
    if (brc != 0) {
      free(rec);
      fail(p, TG_CONNECT_RESOURCE_EXHAUSTED, "error", "out of memory");
      return;
    }
    p->booked = true;
  }
  p->sp_log = tg_span_start_ref("wal.append", &p->trace, TG_SPAN_INTERNAL);
  tg_span_set_int(p->sp_log, "bytes", (int64_t)len);
  int rc = tg_wal_append(p->aw->wal, rec, len, on_durable, p, NULL);
  free(rec);
  if (rc == 0)
    return;
  tg_span_finish(&p->sp_log, strerror(-rc));
  char msg[200];
  if (rc == -ENOSPC)
    snprintf(msg, sizeof msg, "the transaction log is full: nothing was charged; purchases resume once the "
                              "operator raises ledger.wal.capacity_bytes or retention frees room "
                              "(DiscoverResources still works)");
  else if (rc == -EAGAIN)
    snprintf(msg, sizeof msg, "the transaction log is behind: retry in a second; nothing was charged");
  else
    snprintf(msg, sizeof msg, "the transaction log cannot take records (%s); nothing was charged", strerror(-rc));
  /* One line a second at most: a full log refuses every purchase. */
  static _Atomic uint64_t last_warn_s;
  uint64_t now_s = uv_hrtime() / 1000000000u, prev = last_warn_s;
  if (now_s != prev && atomic_compare_exchange_strong(&last_warn_s, &prev, now_s))
    tg_log_req(TG_LOG_WARN, p->request_id, "purchases refused: transaction log", "error", strerror(-rc), NULL);
  if (rc == -EAGAIN || rc == -ENOSPC)
    tg_connect_call_add_header(p->call, "Retry-After", rc == -EAGAIN ? "1" : "60");
  fail(p, TG_CONNECT_UNAVAILABLE, "error", msg);
}

/* ---- Step 5: authorize */

/* Billing failed and the policy rejects: `unavailable`, with the DENIED
 * answer as the error's detail (DENIAL_REASON_BILLING_UNAVAILABLE); nothing
 * charged, nothing remembered. Frees p. */
static void reject_billing(purchase_t *p, const char *why) {
  char msg[400];
  snprintf(msg, sizeof msg,
           "DENIAL_REASON_BILLING_UNAVAILABLE: billing is unavailable (%s): nothing was charged; retry later "
           "(request %s)",
           why, p->request_id);
  unbook(p);
  release_hold(p);
  give_back_key(p);
  count(p, "denied");
  Ramp__V1__ExecuteTransactionResponse resp = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  resp.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DENIED;
  resp.denial_reason = RAMP__V1__DENIAL_REASON__DENIAL_REASON_BILLING_UNAVAILABLE;
  resp.denial_detail = msg;
  tg_connect_call_add_header(p->call, "Retry-After", "1");
  tg_connect_fail_detail(p->call, TG_CONNECT_UNAVAILABLE, &resp.base, msg);
  purchase_free(p);
}

/* Billing timed out, failed or its circuit is open: the tenant's
 * on_billing_timeout hook decides, for this transaction, between reject and
 * deferred (served now, billed by the reconciler; only for a billing
 * service, within the tenant's cap). A hook that fails rejects. */
static void billing_failed(purchase_t *p, const tg_billing_result_t *r) {
  size_t ti = p->held[0].tenant;
  tg_app_t *app = p->aw->app;
  tg_billing_book_t *book = app->billing_book;
  const char *reason = r->status == TG_BILLING_TIMEOUT                 ? "timeout"
                       : strcmp(r->detail, "circuit open") == 0 ? "circuit_open"
                                                                       : "error";
  uint64_t failing = book ? tg_billing_book_failed(book, ti, uv_hrtime() / 1000000u) : 0;
  tg_policy_txn_t txn = {0};
  txn.id = p->txid;
  txn.tenant = tenant_name(p, ti);
  txn.amount = p->total;
  txn.currency = p->currency;
  txn.ai_id = p->req->ai_system->id;
  txn.billing_ref = p->req_ref;
  txn.items = (uint32_t)p->nitems;
  txn.reason = reason;
  txn.failing_ms = failing;
  txn.request_id = p->request_id;
  tg_policy_billing_t decision = TG_POLICY_BILLING_REJECT;
  tg_policy_error_t err;
  tg_span_t *sp = tg_span_start_ref("policy.on_billing_timeout", &p->trace, TG_SPAN_INTERNAL);
  int rc = tg_policy_on_billing_timeout(p->held[0].st, &txn, &decision, &err);
  tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK)
    decision = TG_POLICY_BILLING_REJECT; /* logged by the policy module */
  if (book)
    tg_billing_book_decided(book, ti, decision == TG_POLICY_BILLING_REJECT);
  if (decision == TG_POLICY_BILLING_REJECT) {
    reject_billing(p, r->detail);
    return;
  }
  if (!p->remote) {
    char why[320];
    snprintf(why, sizeof why, "%s; the policy said deferred, which needs billing type \"connect\"", r->detail);
    reject_billing(p, why);
    return;
  }
  int64_t cap = app->billconf[ti].deferred_cap;
  int brc = tg_billing_book_defer(book, ti, p->txid, p->req_ref, p->currency, p->total, p->req->ai_system->id, cap);
  if (brc != 0) {
    char why[320];
    if (brc == -ENOSPC)
      snprintf(why, sizeof why, "%s; deferred billing is at the tenant's cap of %" PRId64 " %s outstanding",
               r->detail, cap, p->currency);
    else
      snprintf(why, sizeof why, "%s; the deferred charge could not be kept (%s)", r->detail, strerror(-brc));
    reject_billing(p, why);
    return;
  }
  p->booked = true;
  p->deferred = true;
  tg_log_req(TG_LOG_WARN, p->request_id, "billing deferred: served now, billed by reconciliation", "tenant",
             tenant_name(p, ti), "transaction", p->txid, "reason", reason, NULL);
  sign_and_log(p);
}

static void on_authorized(void *arg, const tg_billing_result_t *r) {
  purchase_t *p = arg;
  tg_span_set_str(p->sp_auth, "billing.result", r->status == TG_BILLING_APPROVED   ? "approved"
                                                : r->status == TG_BILLING_DECLINED ? "declined"
                                                                                   : "failed");
  tg_span_finish(&p->sp_auth,
                 r->status == TG_BILLING_APPROVED || r->status == TG_BILLING_DECLINED ? NULL : r->detail);
  uint64_t took = uv_hrtime() - p->auth_started;
  if (!p->remote) /* a billing service's adapter counts its own */
    for (size_t k = 0; k < p->nheld; k++) {
      const char *labels[] = {tenant_name(p, p->held[k].tenant),
                              r->status == TG_BILLING_APPROVED ? "true" : "false"};
      tg_histogram_observe(m_auth, labels, (double)took / 1e9);
    }
  if ((r->status == TG_BILLING_APPROVED || r->status == TG_BILLING_DECLINED) && p->aw->app->billing_book)
    tg_billing_book_ok(p->aw->app->billing_book, p->held[0].tenant);
  switch (r->status) {
  case TG_BILLING_APPROVED:
    memcpy(p->hold, r->hold, sizeof p->hold);
    p->has_hold = true;
    sign_and_log(p);
    return;
  case TG_BILLING_DECLINED:
    deny(p, RAMP__V1__DENIAL_REASON__DENIAL_REASON_INSUFFICIENT_FUNDS, r->detail);
    return;
  default:
    billing_failed(p, r);
  }
}

static void authorize(purchase_t *p) {
  tg_billing_auth_t a = {0};
  a.tenant = tenant_name(p, p->held[0].tenant);
  a.billing_ref = p->req->ai_system->billing_reference;
  a.currency = p->currency;
  a.amount = p->total;
  a.transaction_id = p->txid;
  a.ai_system_id = p->req->ai_system->id;
  a.request_id = p->request_id;
  /* A billing service has its tenant's deadline; the ledgers 30 ms. */
  a.deadline_ms = p->remote ? 0 : uv_now(p->aw->worker->loop) + 30;
  size_t tl;
  const char *tp = tg_view_call_header(p->call, "traceparent", 11, &tl);
  char trace[64];
  p->sp_auth = tg_span_start_ref("billing.authorize", &p->trace, TG_SPAN_CLIENT);
  tg_span_set_str(p->sp_auth, "billing.adapter", p->billing->ops->name);
  tg_span_set_int(p->sp_auth, "amount", p->total);
  tg_span_set_str(p->sp_auth, "currency", p->currency);
  if (tg_span_traceparent(p->sp_auth, trace) == 0) { /* traced: billing's call is this span's child */
    a.traceparent = trace;
  } else if (tp && tl == 55) { /* version-traceid-parentid-flags, as W3C Trace Context sizes it */
    memcpy(trace, tp, tl);
    trace[tl] = '\0';
    a.traceparent = trace;
  }
  p->auth_started = uv_hrtime();
  p->billing->ops->authorize(p->billing, &a, on_authorized, p);
}

/* ---- Step 4: the policy's decision, item by item */

static held_t *held_of(purchase_t *p, size_t tenant) {
  for (size_t k = 0; k < p->nheld; k++)
    if (p->held[k].tenant == tenant)
      return &p->held[k];
  return NULL;
}

/* 1: still offered; 0: not; -1: a policy failed (logged). */
static int still_offered(purchase_t *p, size_t i) {
  item_t *it = &p->items[i];
  held_t *h = held_of(p, it->tenant);
  const tg_config_tenant_t *t = &p->aw->app->cfg->tenants[it->tenant];
  tg_view_t v;
  tg_policy_error_t err;
  bool skip = false;
  if (tg_view_connect(&v, "ExecuteTransaction", it->offer.uri, tg_connect_call_http(p->call), t->name,
                      tg_view_call_header, p->call, p->req->ai_system) != 0)
    return 0;
  tg_span_t *sp = tg_span_start_ref("policy.skip", &p->trace, TG_SPAN_INTERNAL);
  int rc = tg_policy_skip(h->st, &v.req, &skip, &err);
  tg_span_set_str(sp, "tenant", t->name);
  tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK)
    return -1;
  if (skip)
    return 1; /* free now: the offer the agent accepted stands */
  tg_quote_t quote, *q = &quote;
  sp = tg_span_start_ref("catalog.quote", &p->trace, TG_SPAN_INTERNAL);
  tg_span_set_str(sp, "tenant", t->name);
  rc = tg_quote(t, h->pin.data, h->st, &v, q, &err);
  tg_span_finish(&sp, rc != 0 ? "quote failed" : NULL);
  int found = rc == 0 ? 0 : -1;
  for (size_t k = 0; rc == 0 && k < q->n && !found; k++) {
    const tg_quote_offer_t *o = &q->offers[k];
    found = o->content == it->offer.content && o->license == it->offer.license &&
            o->payment == it->offer.payment && (uint32_t)o->type == it->offer.payment_type;
    if (found)
      it->reporting = o->reporting;
  }
  return found;
}

static void decide(purchase_t *p) {
  for (size_t i = 0; i < p->nitems; i++) {
    int rc = still_offered(p, i);
    if (rc < 0) {
      char msg[160];
      snprintf(msg, sizeof msg, "policy error, see the gateway log (request %s)", p->request_id);
      fail(p, TG_CONNECT_INTERNAL, "error", msg);
      return;
    }
    if (rc == 0) {
      char detail[256];
      snprintf(detail, sizeof detail,
               "items[%zu]: tenant %s no longer offers this for this AI system (catalog or policy changed): "
               "discover it again",
               i, tenant_name(p, p->items[i].tenant));
      deny(p, RAMP__V1__DENIAL_REASON__DENIAL_REASON_POLICY, detail);
      return;
    }
  }
  authorize(p);
}

/* ---- Step 3: rate limits */

static void limits_done(purchase_t *p) {
  if (--p->pending > 0)
    return;
  if (p->failed) {
    char msg[160];
    snprintf(msg, sizeof msg, "policy error, see the gateway log (request %s)", p->request_id);
    fail(p, TG_CONNECT_INTERNAL, "error", msg);
  } else if (p->limited) {
    char secs[16], detail[96];
    snprintf(secs, sizeof secs, "%u", tg_app_retry_after_s(p->retry_ms));
    tg_connect_call_add_header(p->call, "Retry-After", secs);
    snprintf(detail, sizeof detail, "rate limited: retry after %u ms", p->retry_ms);
    deny(p, RAMP__V1__DENIAL_REASON__DENIAL_REASON_RATE_LIMITED, detail);
  } else if (tg_connect_call_expired(p->call)) {
    fail(p, TG_CONNECT_DEADLINE_EXCEEDED, "error", "deadline exceeded");
  } else {
    decide(p);
  }
}

static void on_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  purchase_t *p = ud;
  if (!allowed) {
    p->limited = true;
    if (retry_after_ms > p->retry_ms)
      p->retry_ms = retry_after_ms;
  }
  limits_done(p);
}

static void limit(purchase_t *p) {
  p->pending = 1;
  for (size_t k = 0; k < p->nheld && !p->failed; k++) {
    held_t *h = &p->held[k];
    item_t *it = &p->items[h->first];
    const char *tn = tenant_name(p, h->tenant);
    tg_view_t v;
    tg_policy_error_t err;
    tg_policy_rate_t rate;
    if (tg_view_connect(&v, "ExecuteTransaction", it->offer.uri, tg_connect_call_http(p->call), tn, tg_view_call_header,
                        p->call, p->req->ai_system) != 0) {
      p->failed = true; /* no view, no limit decided: refuse rather than sell unlimited */
      break;
    }
    tg_span_t *sp = tg_span_start_ref("policy.rate_limit", &p->trace, TG_SPAN_INTERNAL);
    tg_span_set_str(sp, "tenant", tn);
    int rc = tg_policy_rate_limit(h->st, &v.req, &rate, &err);
    tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
    if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
      p->failed = true;
      break;
    }
    if (!rate.limited)
      continue;
    p->pending++;
    tg_app_take(p->aw, tn, &rate, on_taken, p);
  }
  limits_done(p);
}

/* ---- Step 2: idempotency */

static void begin(purchase_t *p);

static void on_poll(uv_timer_t *t) {
  purchase_t *p = t->data;
  begin(p);
}

static void start(purchase_t *p);

/* What the idempotency table said about the key (local or Redis). */
static void on_key(purchase_t *p, int st, const void *resp, size_t len) {
  tg_app_t *app = p->aw->app;
  uv_loop_t *loop = p->aw->worker->loop;
  switch (st) {
  case TG_IDEM_NEW:
    p->owns_key = true;
    start(p);
    return;
  case TG_IDEM_DONE:
    count(p, "replayed");
    reply_packed(p->call, resp, len);
    purchase_free(p);
    return;
  case TG_IDEM_CONFLICT:
    fail(p, TG_CONNECT_ALREADY_EXISTS, "error",
         "idempotency_key: already used for a different request (other items, AI system or billing "
         "reference); use a new key for a new purchase");
    return;
  case TG_IDEM_PENDING:
    if (p->wait_until == 0)
      p->wait_until = uv_now(loop) + app->cfg->ledger.idem_wait_ms;
    if (uv_now(loop) >= p->wait_until || tg_connect_call_expired(p->call)) {
      fail(p, TG_CONNECT_ABORTED, "error",
           "idempotency_key: a call with this key is still in progress; retry to get its answer");
      return;
    }
    if (!p->timer_open) {
      if (uv_timer_init(loop, &p->timer) != 0) {
        fail(p, TG_CONNECT_RESOURCE_EXHAUSTED, "error", "cannot wait for the call in progress");
        return;
      }
      p->timer_open = true;
      p->timer.data = p;
    }
    uv_timer_start(&p->timer, on_poll, p->aw->idem_redis ? POLL_REDIS_MS : POLL_MS, 0);
    return;
  case -EBUSY:
    fail(p, TG_CONNECT_UNAVAILABLE, "error", "idempotency table full of calls in progress: retry in a moment");
    return;
  default: {
    char msg[160];
    snprintf(msg, sizeof msg, "the shared idempotency store is unavailable (%s): nothing was charged; retry",
             strerror(st < 0 ? -st : EIO));
    fail(p, TG_CONNECT_UNAVAILABLE, "error", msg);
  }
  }
}

static void on_redis_key(void *arg, int st, const void *resp, size_t len) {
  on_key(arg, st, resp, len);
}

static void begin(purchase_t *p) {
  if (p->aw->idem_redis) {
    int rc = tg_idem_redis_begin(p->aw->idem_redis, p->scope, p->req_hash, on_redis_key, p);
    if (rc != 0)
      on_key(p, rc, NULL, 0);
    return;
  }
  tg_idem_result_t r = {0};
  int st = tg_idem_begin(p->aw->app->idem, p->scope, p->req_hash, tg_idem_now_ms(), &r);
  on_key(p, st, r.response, r.response_len);
  free(r.response);
}

/* ---- Step 1: the request */

/* SHA-256 of the request's own encoding (fields in number order, the same
 * for a JSON and a binary request of the same content), and of the scope
 * (billing reference, NUL, key). */
static int hashes(purchase_t *p) {
  const Ramp__V1__ExecuteTransactionRequest *req = p->req;
  size_t n = ramp__v1__execute_transaction_request__get_packed_size(req);
  uint8_t *buf = malloc(n ? n : 1);
  if (buf == NULL)
    return -ENOMEM;
  ramp__v1__execute_transaction_request__pack(req, buf);
  int rc = mbedtls_sha256_ret(buf, n, p->req_hash, 0);
  free(buf);
  mbedtls_sha256_context c;
  mbedtls_sha256_init(&c);
  const char *ref = req->ai_system->billing_reference;
  rc = rc || mbedtls_sha256_starts_ret(&c, 0) ||
       mbedtls_sha256_update_ret(&c, (const uint8_t *)ref, strlen(ref) + 1) ||
       mbedtls_sha256_update_ret(&c, (const uint8_t *)req->idempotency_key, strlen(req->idempotency_key)) ||
       mbedtls_sha256_finish_ret(&c, p->scope);
  mbedtls_sha256_free(&c);
  return rc ? -EIO : 0;
}

/* Verifies item i's offer. 0, or a denial (reason and detail). */
static int verify_item(purchase_t *p, size_t i, Ramp__V1__DenialReason *reason, char *detail, size_t dlen) {
  const tg_app_t *app = p->aw->app;
  const Ramp__V1__TransactionItem *ti = p->req->items[i];
  item_t *it = &p->items[i];
  it->offer_id = ti->offer_id;
  it->estimated_tokens = ti->estimated_tokens;
  int rc = tg_offer_decode(&app->offer_keys, ti->offer_id, strlen(ti->offer_id), (int64_t)time(NULL), NULL,
                           &it->offer);
  *reason = rc == -ETIMEDOUT ? RAMP__V1__DENIAL_REASON__DENIAL_REASON_OFFER_EXPIRED
                             : RAMP__V1__DENIAL_REASON__DENIAL_REASON_OFFER_INVALID;
  if (rc != 0) {
    snprintf(detail, dlen, "items[%zu].offer_id: %s: use an offer id exactly as DiscoverResources gave it, "
             "or discover the resource again for a fresh one", i, tg_offer_strerror(rc));
    return -1;
  }
  /* The tenant that made the offer must still serve its host. */
  const char *host;
  size_t host_len;
  const tg_config_tenant_t *t = tg_uri_host(it->offer.uri, &host, &host_len) == 0
                                    ? tg_tenants_by_host(app->tenants, host, host_len)
                                    : NULL;
  if (t == NULL || strcmp(t->name, it->offer.tenant) != 0) {
    snprintf(detail, dlen, "items[%zu].offer_id: tenant %s no longer serves this resource", i, it->offer.tenant);
    return -1;
  }
  it->tenant = tg_app_tenant_index(app, t);
  for (size_t j = 0; j < i; j++)
    if (strcmp(p->items[j].offer_id, ti->offer_id) == 0) {
      snprintf(detail, dlen, "items[%zu]: the same offer as items[%zu]; an offer is bought once per call", i, j);
      return -1;
    }
  if (i == 0) {
    memcpy(p->currency, it->offer.currency, sizeof p->currency);
  } else if (strcmp(p->currency, it->offer.currency) != 0) {
    snprintf(detail, dlen, "items[%zu]: priced in %s, items[0] in %s: buy each currency in its own call", i,
             it->offer.currency, p->currency);
    return -1;
  }
  if (tg_usage_item_charge(t, it->offer.amount, it->offer.payment_type, it->estimated_tokens, &it->charge) != 0 ||
      it->charge > INT64_MAX / 2 - p->total) {
    snprintf(detail, dlen, "items[%zu]: the total overflows (price times estimated_tokens)", i);
    return -1;
  }
  p->total += it->charge;
  return 0;
}

/* Pins the catalog and policy state of every tenant of the call. */
static int hold_tenants(purchase_t *p) {
  for (size_t i = 0; i < p->nitems; i++) {
    if (held_of(p, p->items[i].tenant))
      continue;
    held_t *h = &p->held[p->nheld++];
    h->tenant = p->items[i].tenant;
    h->first = i;
    h->pin = tg_snapshot_acquire(p->aw->catalog_readers[h->tenant]);
    h->st = tg_policy_acquire(p->aw->policy, tenant_name(p, h->tenant));
    if (h->st == NULL)
      return -1;
  }
  tg_connect_call_set_tenant(p->call, tenant_name(p, p->held[0].tenant));
  return 0;
}

void tg_purchase_execute(tg_app_worker_t *aw, tg_connect_call_t *call,
                         const Ramp__V1__ExecuteTransactionRequest *req) {
  const tg_app_t *app = aw->app;
  uint32_t max = app->cfg->idempotency_key_max ? app->cfg->idempotency_key_max : TG_CONFIG_DEFAULT_IDEMPOTENCY_KEY_MAX;
  size_t klen = strnlen(req->idempotency_key, (size_t)max + 1);
  if (klen == 0 || klen > max || !tg_utf8_valid(req->idempotency_key, klen)) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "idempotency_key: required, 1 to %u bytes of UTF-8", max);
    return;
  }
  if (req->n_items == 0 || req->n_items > TG_PURCHASE_MAX_ITEMS) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "items: %zu offers; a purchase takes 1 to %d",
                    req->n_items, TG_PURCHASE_MAX_ITEMS);
    return;
  }
  if (req->ai_system == NULL || req->ai_system->billing_reference[0] == '\0') {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                    "ai_system.billing_reference: required (the prepaid account the purchase is charged to)");
    return;
  }
  if (strlen(req->ai_system->billing_reference) > 256) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "ai_system.billing_reference: at most 256 bytes");
    return;
  }
  for (size_t i = 0; i < req->n_items; i++)
    if (req->items[i]->estimated_tokens < 0) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "items[%zu].estimated_tokens: must not be negative", i);
      return;
    }
  if (app->wal == NULL || aw->wal == NULL || aw->billing == NULL) {
    tg_connect_fail(call, TG_CONNECT_UNAVAILABLE, "purchases are not available on this gateway (no ledger)");
    return;
  }
  purchase_t *p = calloc(1, sizeof *p);
  if (p == NULL || (p->items = calloc(req->n_items, sizeof *p->items)) == NULL ||
      (p->held = calloc(req->n_items, sizeof *p->held)) == NULL) {
    if (p) {
      free(p->items);
      free(p);
    }
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  p->aw = aw;
  p->call = call;
  p->req = req;
  p->nitems = req->n_items;
  tg_span_ref(tg_connect_call_span(call), &p->trace);
  snprintf(p->request_id, sizeof p->request_id, "%s", tg_connect_call_http(call)->request_id);
  snprintf(p->req_ref, sizeof p->req_ref, "%s", req->ai_system->billing_reference);
  new_txid(p->txid);
  if (hashes(p) != 0) {
    fail(p, TG_CONNECT_RESOURCE_EXHAUSTED, "error", "out of memory");
    return;
  }
  /* The key first: a retry of a purchase already answered gets its answer,
   * also once its offers have expired or the configuration has changed. */
  begin(p);
}

/* The key is ours: the offers, then the tenants' limits. */
static void start(purchase_t *p) {
  for (size_t i = 0; i < p->nitems; i++) {
    Ramp__V1__DenialReason reason;
    char detail[256];
    if (verify_item(p, i, &reason, detail, sizeof detail) != 0) {
      deny(p, reason, detail);
      return;
    }
  }
  if (hold_tenants(p) != 0) {
    tg_log_req(TG_LOG_ERROR, p->request_id, "no policy state", NULL);
    fail(p, TG_CONNECT_INTERNAL, "error", "policy error, see the gateway log");
    return;
  }
  /* One bill per call: tenants billed by their own services are bought
   * one tenant per call. */
  p->billing = tg_app_billing(p->aw, p->held[0].tenant);
  for (size_t k = 1; k < p->nheld; k++)
    if (tg_app_billing(p->aw, p->held[k].tenant) != p->billing) {
      char msg[256];
      snprintf(msg, sizeof msg, "items: tenants %s and %s bill separately: buy each tenant's offers in its own call",
               tenant_name(p, p->held[0].tenant), tenant_name(p, p->held[k].tenant));
      fail(p, TG_CONNECT_INVALID_ARGUMENT, "error", msg);
      return;
    }
  p->remote = p->billing != p->aw->billing;
  /* An AI system with too many usage reports overdue buys nothing more. */
  for (size_t k = 0; k < p->nheld; k++) {
    const tg_config_tenant_t *t = &p->aw->app->cfg->tenants[p->held[k].tenant];
    char detail[256];
    if (t->usage.overdue_limit > 0 &&
        tg_usage_overdue(p->aw->app->usage, p->req->ai_system->id, p->req_ref, t->usage.overdue_limit, detail,
                         sizeof detail) == 1) {
      deny(p, RAMP__V1__DENIAL_REASON__DENIAL_REASON_USAGE_REPORT_OVERDUE, detail);
      return;
    }
  }
  limit(p);
}

/* ---- Replay */

int tg_purchase_replay(tg_app_t *app, uint64_t seq, const void *payload, size_t len) {
  (void)seq;
  Ledger__V1__Record *rec = ledger__v1__record__unpack(NULL, len, payload);
  if (rec == NULL)
    return -EBADMSG;
  const Ledger__V1__Transaction *tx = rec->transaction;
  /* Redis mode: a charge is owed until its CAPTURE record. */
  if (app->owed && rec->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION &&
      tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED &&
      strcmp(tx->billing_type, "redis") == 0 && tx->n_totals == 1)
    tg_owed_add(app->owed, tx->id, tx->billing_reference, tx->totals[0]->currency, tx->totals[0]->amount, NULL);
  if (app->owed && rec->kind_case == LEDGER__V1__RECORD__KIND_LEDGER_CHANGE &&
      rec->ledger_change->kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE)
    tg_owed_remove(app->owed, rec->ledger_change->transaction_id);
  if (rec->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION && tx->response.len > 0 &&
      (tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED ||
       tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED) &&
      tx->request_hash.len == 32 && app->idem) {
    uint8_t scope[32];
    mbedtls_sha256_context c;
    mbedtls_sha256_init(&c);
    int bad = mbedtls_sha256_starts_ret(&c, 0) ||
              mbedtls_sha256_update_ret(&c, (const uint8_t *)tx->billing_reference,
                                        strlen(tx->billing_reference) + 1) ||
              mbedtls_sha256_update_ret(&c, (const uint8_t *)tx->idempotency_key, strlen(tx->idempotency_key)) ||
              mbedtls_sha256_finish_ret(&c, scope);
    mbedtls_sha256_free(&c);
    if (!bad && rec->at_unix_ms > 0)
      tg_idem_restore(app->idem, scope, tx->request_hash.data, tx->response.data, tx->response.len,
                      (uint64_t)rec->at_unix_ms, tg_idem_now_ms());
  }
  ledger__v1__record__free_unpacked(rec, NULL);
  return 0;
}
