#include "pipeline/exchange.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "pipeline/app.h"
#include "pipeline/purchase.h"
#include "pipeline/quote.h"
#include "pipeline/usage.h"
#include "pipeline/view.h"
#include "catalog/catalog.h"
#include "catalog/offer.h"
#include "catalog/rsl.h"
#include "base/log.h"
#include "base/metrics.h"
#include "net/target.h"
#include "ramp/v1/exchange.pb-c.h"

#define MAX_URI TG_OFFER_URI_MAX

/* True when the path of a URI (up to '?' or '#') is its own normal form,
 * as the server normalizes request targets (net/target.h). */
static bool normal_path(const char *path) {
  char norm[MAX_URI + 1];
  size_t len = strcspn(path, "?#"), n;
  const char *why;
  if (len == 0)
    return true; /* no path: "/" */
  if (len > MAX_URI || tg_target_path(path, len, norm, &n, &why) != 0)
    return false;
  return n == len && memcmp(norm, path, len) == 0;
}

/* The view of resource uri of a Discover call, for tenant. */
static int uri_view(tg_view_t *v, tg_connect_call_t *call, const char *uri, const Comp__V1__AISystem *ai,
                    const char *tenant) {
  return tg_view_connect(v, "DiscoverResources", uri, tg_connect_call_http(call), tenant, tg_view_call_header, call,
                         ai);
}

/* What one call holds of a tenant it names: the catalog snapshot and the
 * policy state it started with, so that every URI of that tenant is
 * skipped, limited and priced by one policy version from one catalog. */
typedef struct held {
  struct disc *d;
  size_t tenant;         /* index in the configuration */
  tg_snapshot_pin_t pin;
  tg_policy_state_t *st; /* NULL: no usable state (the call fails closed) */
  bool limit_checked;    /* the rate_limit hook ran (on the first URI not skipped) */
} held_t;

/* One DiscoverResources call from its first hook to its answer: the rate
 * limits of the tenants it touches are decided together (in redis mode the
 * decisions arrive later, on the loop). */
typedef struct disc {
  const tg_exchange_t *ex;
  tg_app_worker_t *aw;
  tg_connect_call_t *call;
  const Ramp__V1__DiscoverResourcesRequest *req;
  int pending;       /* decisions still out, plus one while they are being issued */
  int denied;
  int failed;        /* a policy failed: the call fails closed */
  uint32_t retry_ms;
  size_t nheld;
  held_t *held;      /* distinct tenants, at most one per URI */
  int32_t *who;      /* per URI: index in held, or -1 (no tenant serves its host) */
  bool *skipped;     /* per URI: the skip hook let it through */
} disc_t;

static void discover_answer(disc_t *d);

static void disc_free(disc_t *d) {
  for (size_t k = 0; k < d->nheld; k++) {
    tg_snapshot_release(d->aw->catalog_readers[d->held[k].tenant], d->held[k].pin);
    if (d->held[k].st)
      tg_policy_release(d->held[k].st);
  }
  free(d);
}

static const char *held_name(const disc_t *d, const held_t *h) { return d->ex->app->cfg->tenants[h->tenant].name; }

static void gate_done(disc_t *d) {
  if (--d->pending > 0)
    return;
  tg_http_req_t *http = tg_connect_call_http(d->call);
  if (http == NULL) {
    /* The deadline passed while Redis decided: answered already, only finish. */
    tg_connect_fail(d->call, TG_CONNECT_DEADLINE_EXCEEDED, NULL);
  } else if (d->failed) {
    tg_connect_fail(d->call, TG_CONNECT_INTERNAL, "policy error, see the gateway log (request %s)",
                    http->request_id);
  } else if (d->denied) {
    /* Clients back off on the header; the message keeps the exact wait. A
     * header that cannot be added still leaves the message. */
    char secs[16];
    snprintf(secs, sizeof secs, "%u", tg_app_retry_after_s(d->retry_ms));
    tg_connect_call_add_header(d->call, "Retry-After", secs);
    tg_connect_fail(d->call, TG_CONNECT_RESOURCE_EXHAUSTED, "rate limited: retry after %u ms",
                    d->retry_ms);
  } else {
    discover_answer(d);
  }
  disc_free(d);
}

static void on_gate_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  held_t *h = ud;
  disc_t *d = h->d;
  if (!allowed) {
    tg_app_decision(held_name(d, h), true, TG_DECISION_LIMITED);
    d->denied = 1;
    if (retry_after_ms > d->retry_ms)
      d->retry_ms = retry_after_ms;
  }
  gate_done(d);
}

/* held has room for one entry per URI of the call: never full. A call names
 * at most TG_EXCHANGE_MAX_RESOURCES URIs, so a linear search stays cheap. */
static held_t *hold(disc_t *d, size_t ti) {
  for (size_t k = 0; k < d->nheld; k++)
    if (d->held[k].tenant == ti)
      return &d->held[k];
  held_t *h = &d->held[d->nheld++];
  h->d = d;
  h->tenant = ti;
  h->pin = tg_snapshot_acquire(d->aw->catalog_readers[ti]);
  h->st = tg_policy_acquire(d->aw->policy, d->ex->app->cfg->tenants[ti].name);
  h->limit_checked = false;
  return h;
}

/* Runs the skip hook of every URI and, for each tenant, its rate_limit hook
 * once, on the view of its first URI that was not skipped (a tenant whose
 * URIs are all skipped is not limited, as a skipped HTTP request is not);
 * takes from the buckets named; answers when all decided. */
static void discover_gate(const tg_exchange_t *ex, tg_connect_call_t *call,
                          const Ramp__V1__DiscoverResourcesRequest *req) {
  size_t n = req->n_resources;
  tg_app_worker_t *aw = tg_app_worker(ex->app, tg_connect_call_http(call)->worker);
  disc_t *d = calloc(1, sizeof *d + n * (sizeof *d->held + sizeof *d->who + sizeof *d->skipped));
  if (d == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  d->ex = ex;
  d->aw = aw;
  d->call = call;
  d->req = req;
  d->pending = 1;
  d->held = (held_t *)(d + 1);
  d->who = (int32_t *)(d->held + n);
  d->skipped = (bool *)(d->who + n);
  for (size_t i = 0; i < n && !d->failed; i++) {
    const char *uri = req->resources[i]->uri, *host;
    size_t host_len;
    d->who[i] = -1;
    if (tg_uri_host(uri, &host, &host_len) != 0)
      continue; /* refused with its index when the answer is built */
    const tg_config_tenant_t *t = tg_tenants_by_host(ex->app->tenants, host, host_len);
    if (t == NULL)
      continue;
    held_t *h = hold(d, tg_app_tenant_index(ex->app, t));
    d->who[i] = (int32_t)(h - d->held);
    if (d->nheld == 1 && h == d->held)
      tg_connect_call_set_tenant(call, t->name);
    if (h->st == NULL) {
      tg_log_req(TG_LOG_ERROR, tg_connect_call_http(call)->request_id, "no policy state", "tenant", t->name,
                 NULL);
      d->failed = 1;
      break;
    }
    tg_view_t v;
    if (uri_view(&v, call, uri, req->ai_system, t->name) != 0)
      continue; /* refused with its index when the answer is built */
    tg_policy_error_t err;
    tg_span_t *sp = tg_span_start("policy.skip", tg_connect_call_span(call), TG_SPAN_INTERNAL);
    int rc = tg_policy_skip(h->st, &v.req, &d->skipped[i], &err);
    tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
    if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) { /* logged and counted by the policy module */
      tg_app_decision(t->name, true, TG_DECISION_ERROR);
      d->failed = 1;
      break;
    }
    if (d->skipped[i] || h->limit_checked)
      continue;
    h->limit_checked = true;
    tg_policy_rate_t rate;
    sp = tg_span_start("policy.rate_limit", tg_connect_call_span(call), TG_SPAN_INTERNAL);
    rc = tg_policy_rate_limit(h->st, &v.req, &rate, &err);
    tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
    if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
      tg_app_decision(t->name, true, TG_DECISION_ERROR);
      d->failed = 1;
      break;
    }
    if (!rate.limited)
      continue;
    d->pending++;
    tg_app_take(aw, t->name, &rate, on_gate_taken, h);
  }
  gate_done(d);
}

static void discover(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  const tg_exchange_t *ex = ud;
  const Ramp__V1__DiscoverResourcesRequest *req = (const Ramp__V1__DiscoverResourcesRequest *)msg;
  if (req->n_resources == 0) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "resources: at least one URI is required");
    return;
  }
  if (req->n_resources > TG_EXCHANGE_MAX_RESOURCES) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "resources: %zu URIs, at most %d per call",
                    req->n_resources, TG_EXCHANGE_MAX_RESOURCES);
    return;
  }
  for (size_t i = 0; i < req->n_resources; i++) {
    const char *uri = req->resources[i]->uri;
    /* An offer id carries its URI: a longer one cannot be offered. */
    if (strnlen(uri, MAX_URI + 1) > MAX_URI) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "resources[%zu].uri: longer than %zu bytes", i,
                      (size_t)MAX_URI);
      return;
    }
    const char *host;
    size_t host_len;
    if (tg_uri_host(uri, &host, &host_len) != 0) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "resources[%zu].uri: not an absolute http(s) URL", i);
      return;
    }
    /* "https://user@news.example/" names the same resource to a browser and
     * another to a policy comparing URIs: credentials have no place in an offer. */
    if (memchr(uri, '@', (size_t)(host - uri)) != NULL) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "resources[%zu].uri: carries userinfo (user@host): name the resource without it", i);
      return;
    }
    /* The catalog is matched on the path as written, the origin serves it
     * normalized: "/free/../paid" must not be priced as "/free/". */
    if (!normal_path(host + host_len)) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "resources[%zu].uri: the path is not in normal form (dot segments, '//', "
                      "%%XX of an unreserved character, lower-case hex or a byte to escape)",
                      i);
      return;
    }
  }
  discover_gate(ex, call, req);
}

static const struct {
  Ramp__V1__AbsenceReason reason;
} absence[] = {
    [TG_QUOTE_NO_CATALOG] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG},
    [TG_QUOTE_NOT_IN_CATALOG] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG},
    [TG_QUOTE_PROHIBITED] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_PROHIBITED},
    [TG_QUOTE_FILTERED] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_FILTERED_BY_RESTRICTIONS},
    [TG_QUOTE_NO_LICENSE] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_FOR_SALE},
    [TG_QUOTE_DECLINED] = {RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_FOR_SALE},
};

/* One quoted offer as the answer's Offer, its id signed. NULL when out of memory. */
static Ramp__V1__Offer *answer_offer(tg_app_worker_t *aw, tg_connect_call_t *call, const char *tenant,
                                     const char *uri, const tg_quote_offer_t *o, int64_t now) {
  const tg_app_t *app = aw->app;
  tg_offer_t tok = {0}; /* tok.uri stays empty: the URI goes in apart */
  char idbuf[TG_OFFER_TOKEN_MAX];
  snprintf(tok.tenant, sizeof tok.tenant, "%s", tenant);
  tok.content = o->content;
  tok.license = o->license;
  tok.payment = o->payment;
  tok.amount = o->amount;
  snprintf(tok.currency, sizeof tok.currency, "%s", o->currency);
  tok.payment_type = (uint32_t)o->type;
  tok.usage_bits = o->usage;
  tok.expires_at = now + app->offer_ttl_s;
  if (tg_offer_encode_uri(&app->offer_keys, &tok, uri, idbuf, sizeof idbuf) != 0)
    return NULL;
  size_t idlen = strlen(idbuf) + 1;
  char *id = tg_connect_call_alloc(call, idlen);
  Ramp__V1__Offer *of = tg_connect_call_alloc(call, sizeof *of);
  Ramp__V1__Pricing *pr = tg_connect_call_alloc(call, sizeof *pr);
  Ramp__V1__Money *m = tg_connect_call_alloc(call, sizeof *m);
  Ramp__V1__Terms *te = tg_connect_call_alloc(call, sizeof *te);
  Comp__V1__UsagePurpose *pp = tg_connect_call_alloc(call, TG_VIEW_NPURPOSES * sizeof *pp);
  char *cur = tg_connect_call_alloc(call, sizeof tok.currency);
  if (!id || !of || !pr || !m || !te || !pp || !cur)
    return NULL;
  memcpy(id, idbuf, idlen);
  memcpy(cur, tok.currency, sizeof tok.currency);
  ramp__v1__offer__init(of);
  ramp__v1__pricing__init(pr);
  ramp__v1__money__init(m);
  ramp__v1__terms__init(te);
  m->currency = cur;
  m->amount = o->amount;
  pr->model = (Ramp__V1__PaymentModel)(o->type + 1); /* same order as RSL's payment types */
  pr->price = m;
  pr->unit = RAMP__V1__PRICING_UNIT__PRICING_UNIT_REQUEST;
  size_t np = 0;
  for (size_t u = 0; u < TG_VIEW_NPURPOSES; u++)
    if (o->usage & tg_view_purposes[u].bit)
      pp[np++] = tg_view_purposes[u].value;
  te->n_permitted_purposes = np;
  te->permitted_purposes = pp;
  /* Lives in the catalog, pinned until the answer is written. */
  if (o->license_url)
    te->license_url = (char *)o->license_url;
  of->id = id;
  of->uri = (char *)uri;
  of->pricing = pr;
  of->terms = te;
  of->expires_at_unix = tok.expires_at;
  return of;
}

/* Fills r for URI i from its quote. Returns 0, or -1 when a policy failed
 * or memory ran out (the call fails). */
static int discover_one(disc_t *d, size_t i, Ramp__V1__ResourceResult *r, int64_t now) {
  const char *uri = d->req->resources[i]->uri;
  held_t *h = &d->held[d->who[i]];
  const tg_config_tenant_t *t = &d->ex->app->cfg->tenants[h->tenant];
  tg_quote_t q;
  if (d->skipped[i]) {
    tg_quote_skipped(&q);
  } else {
    tg_view_t v;
    tg_policy_error_t err;
    if (uri_view(&v, d->call, uri, d->req->ai_system, t->name) != 0)
      return -1;
    tg_span_t *sp = tg_span_start("catalog.quote", tg_connect_call_span(d->call), TG_SPAN_INTERNAL);
    tg_span_set_str(sp, "tenant", t->name);
    int rc = tg_quote(t, h->pin.data, h->st, &v, &q, &err);
    tg_span_finish(&sp, rc != 0 ? "quote failed" : NULL);
    if (rc != 0) {
      tg_app_decision(t->name, true, TG_DECISION_ERROR);
      return -1;
    }
  }
  if (q.n == 0) {
    tg_app_decision(t->name, true, TG_DECISION_NOT_FOR_SALE);
    r->absence_reason = absence[q.status].reason;
    r->absence_detail = (char *)q.detail;
    return 0;
  }
  Ramp__V1__Offer **offers = tg_connect_call_alloc(d->call, q.n * sizeof *offers);
  if (offers == NULL)
    return -1;
  bool paid = false;
  for (size_t k = 0; k < q.n; k++) {
    if ((offers[k] = answer_offer(d->aw, d->call, t->name, uri, &q.offers[k], now)) == NULL)
      return -1;
    paid = paid || q.offers[k].amount > 0;
  }
  if (q.status == TG_QUOTE_SKIPPED)
    r->absence_detail = (char *)q.detail; /* offered, and why it is free */
  tg_app_decision(t->name, true, q.status == TG_QUOTE_SKIPPED ? TG_DECISION_SKIP : paid ? TG_DECISION_PRICED
                                                                                      : TG_DECISION_FREE);
  r->n_offers = q.n;
  r->offers = offers;
  return 0;
}

static tg_metric_t *m_offers_returned;

/* Called by the gate once the rate limits allowed the call, which is then
 * not answered yet (its HTTP request is there). */
static void discover_answer(disc_t *d) {
  size_t n = d->req->n_resources;
  tg_connect_call_t *call = d->call;
  /* The answer is built and freed in this call. */
  Ramp__V1__ResourceResult *results = calloc(n, sizeof *results);
  Ramp__V1__ResourceResult **ptrs = calloc(n, sizeof *ptrs);
  if (results == NULL || ptrs == NULL) {
    free(results);
    free(ptrs);
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  int64_t built_at = 0, now = (int64_t)time(NULL);
  int failed = 0;
  const char *tenant_label = NULL;
  for (size_t i = 0; i < n && !failed; i++) {
    ramp__v1__resource_result__init(&results[i]);
    ptrs[i] = &results[i];
    results[i].uri = d->req->resources[i]->uri;
    if (d->who[i] < 0) {
      results[i].absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_TENANT_UNKNOWN;
      results[i].absence_detail = "no tenant serves this host";
      continue;
    }
    held_t *h = &d->held[d->who[i]];
    if (tenant_label == NULL)
      tenant_label = held_name(d, h);
    if (built_at == 0 && h->pin.data)
      built_at = tg_catalog_built_at(h->pin.data);
    failed = discover_one(d, i, &results[i], now) != 0;
  }
  if (failed) {
    tg_connect_fail(call, TG_CONNECT_INTERNAL, "policy error, see the gateway log (request %s)",
                    tg_connect_call_http(call)->request_id);
  } else {
    Ramp__V1__DiscoverResourcesResponse resp = RAMP__V1__DISCOVER_RESOURCES_RESPONSE__INIT;
    resp.n_results = n;
    resp.results = ptrs;
    resp.catalog_built_at_unix = built_at;
    size_t offers = 0;
    for (size_t i = 0; i < n; i++)
      offers += results[i].n_offers;
    const char *labels[] = {tenant_label ? tenant_label : ""};
    tg_histogram_observe(m_offers_returned, labels, (double)offers);
    tg_connect_reply(call, &resp.base);
  }
  free(results);
  free(ptrs);
}

static void execute(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  const tg_exchange_t *ex = ud;
  tg_purchase_execute(tg_app_worker(ex->app, tg_connect_call_http(call)->worker), call,
                      (const Ramp__V1__ExecuteTransactionRequest *)msg);
}

static void report(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  const tg_exchange_t *ex = ud;
  tg_usage_report(tg_app_worker(ex->app, tg_connect_call_http(call)->worker), call,
                  (const Ramp__V1__ReportUsageRequest *)msg);
}

int tg_exchange_register(tg_exchange_t *ex, tg_connect_router_t *r) {
  static const char *const labels[] = {"tenant_id", NULL};
  static const double buckets[] = {0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048};
  m_offers_returned = tg_metric_new(TG_METRIC_HISTOGRAM, "exchange_offers_returned",
                                    "Offers in each DiscoverResources answer, by tenant (the first URI's).",
                                    labels, buckets, sizeof buckets / sizeof buckets[0]);
  if (m_offers_returned == NULL)
    return -ENOMEM;
  const tg_connect_method_t methods[] = {
      {"/ramp.v1.ExchangeService/DiscoverResources", "DiscoverResources",
       &ramp__v1__discover_resources_request__descriptor,
       &ramp__v1__discover_resources_response__descriptor, 1, discover, ex},
      {"/ramp.v1.ExchangeService/ExecuteTransaction", "ExecuteTransaction",
       &ramp__v1__execute_transaction_request__descriptor,
       &ramp__v1__execute_transaction_response__descriptor, 0, execute, ex},
      {"/ramp.v1.ExchangeService/ReportUsage", "ReportUsage",
       &ramp__v1__report_usage_request__descriptor, &ramp__v1__report_usage_response__descriptor, 0,
       report, ex},
  };
  for (size_t i = 0; i < sizeof methods / sizeof methods[0]; i++) {
    int rc = tg_connect_router_add(r, &methods[i]);
    if (rc != 0)
      return rc;
  }
  return 0;
}
