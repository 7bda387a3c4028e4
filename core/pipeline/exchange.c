#include "pipeline/exchange.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "pipeline/app.h"
#include "pipeline/view.h"
#include "catalog/catalog.h"
#include "catalog/offer.h"
#include "catalog/rsl.h"
#include "base/log.h"
#include "base/metrics.h"
#include "net/target.h"
#include "ramp/v1/exchange.pb-c.h"

#define MAX_URI (sizeof(((tg_offer_t *)0)->uri) - 1)

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

static const char *call_header(void *ud, const char *name, size_t namelen, size_t *vlen) {
  tg_http_req_t *req = tg_connect_call_http(ud);
  const tg_http_header_t *h = req ? tg_http_req_header_n(req, name, namelen) : NULL;
  if (h == NULL)
    return NULL;
  *vlen = h->value_len;
  return h->value;
}

/* The policy's view of a Connect call made for an AI system; it borrows
 * from the call, which must outlive it. */
static void connect_view(tg_view_t *v, tg_connect_call_t *call, const Comp__V1__AISystem *ai,
                         const char *tenant) {
  tg_view_build(v, TG_POLICY_KIND_CONNECT, tg_connect_call_http(call), tenant, call_header, call, ai);
}

static void discover_answer(const tg_exchange_t *ex, tg_app_worker_t *aw, tg_connect_call_t *call,
                            const Ramp__V1__DiscoverResourcesRequest *req);

/* Rate limits of the tenants a call touches, decided together (in redis
 * mode the decisions arrive later, on the loop). */
typedef struct gate {
  const tg_exchange_t *ex;
  tg_app_worker_t *aw;
  tg_connect_call_t *call;
  const Ramp__V1__DiscoverResourcesRequest *req;
  int pending;       /* decisions still out, plus one while they are being issued */
  int denied;
  int failed;        /* a policy failed: the call fails closed */
  uint32_t retry_ms;
  size_t nseen;
  const tg_config_tenant_t *seen[]; /* distinct tenants, one slot per URI of the call */
} gate_t;

static void gate_done(gate_t *g) {
  if (--g->pending > 0)
    return;
  tg_http_req_t *http = tg_connect_call_http(g->call);
  if (http == NULL) {
    /* The deadline passed while Redis decided: answered already, only finish. */
    tg_connect_fail(g->call, TG_CONNECT_DEADLINE_EXCEEDED, NULL);
  } else if (g->failed) {
    tg_connect_fail(g->call, TG_CONNECT_INTERNAL, "policy error, see the gateway log (request %s)",
                    http->request_id);
  } else if (g->denied) {
    /* Clients back off on the header; the message keeps the exact wait. A
     * header that cannot be added still leaves the message. */
    char secs[16];
    snprintf(secs, sizeof secs, "%u", tg_app_retry_after_s(g->retry_ms));
    tg_connect_call_add_header(g->call, "Retry-After", secs);
    tg_connect_fail(g->call, TG_CONNECT_RESOURCE_EXHAUSTED, "rate limited: retry after %u ms",
                    g->retry_ms);
  } else {
    discover_answer(g->ex, g->aw, g->call, g->req);
  }
  free(g);
}

static void on_gate_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  gate_t *g = ud;
  if (!allowed) {
    g->denied = 1;
    if (retry_after_ms > g->retry_ms)
      g->retry_ms = retry_after_ms;
  }
  gate_done(g);
}

/* Runs each touched tenant's rate_limit hook once and takes from the
 * buckets it names; answers the call when all decided. A call names at most
 * TG_EXCHANGE_MAX_RESOURCES URIs, so the distinct tenants are at most that
 * many and a linear search of them stays cheap. */
static void discover_gate(const tg_exchange_t *ex, tg_connect_call_t *call,
                          const Ramp__V1__DiscoverResourcesRequest *req) {
  tg_app_worker_t *aw = tg_app_worker(ex->app, tg_connect_call_http(call)->worker);
  gate_t *g = calloc(1, sizeof *g + req->n_resources * sizeof g->seen[0]);
  if (g == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  g->ex = ex;
  g->aw = aw;
  g->call = call;
  g->req = req;
  g->pending = 1;
  for (size_t i = 0; i < req->n_resources; i++) {
    const char *host;
    size_t host_len;
    if (tg_uri_host(req->resources[i]->uri, &host, &host_len) != 0)
      continue;
    const tg_config_tenant_t *t = tg_tenants_by_host(ex->app->tenants, host, host_len);
    int dup = t == NULL;
    for (size_t k = 0; k < g->nseen && !dup; k++)
      dup = g->seen[k] == t;
    if (dup)
      continue;
    g->seen[g->nseen++] = t;
    if (g->nseen == 1)
      tg_connect_call_set_tenant(call, t->name);
    tg_policy_state_t *st = tg_policy_acquire(aw->policy, t->name);
    if (st == NULL) {
      g->failed = 1;
      break;
    }
    tg_view_t v;
    connect_view(&v, call, req->ai_system, t->name);
    tg_policy_rate_t rate;
    tg_policy_error_t err;
    int rc = tg_policy_rate_limit(st, &v.req, &rate, &err);
    tg_policy_release(st);
    if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) { /* logged and counted by the policy module */
      g->failed = 1;
      break;
    }
    if (!rate.limited)
      continue;
    g->pending++;
    tg_app_take(aw, t->name, &rate, on_gate_taken, g);
  }
  gate_done(g);
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
    /* An offer id binds the hash of its URI: a longer URI would be cut to fit
     * and the offer would be signed for a prefix of it, another resource. */
    if (strnlen(uri, MAX_URI + 1) > MAX_URI) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "resources[%zu].uri: longer than %zu bytes", i,
                      (size_t)MAX_URI);
      return;
    }
    /* The catalog is matched on the path as written, the origin serves it
     * normalized: "/free/../paid" must not be priced as "/free/". */
    const char *host;
    size_t host_len;
    if (tg_uri_host(uri, &host, &host_len) == 0 && !normal_path(host + host_len)) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "resources[%zu].uri: the path is not in normal form (dot segments, '//', "
                      "%%XX of an unreserved character, lower-case hex or a byte to escape)",
                      i);
      return;
    }
  }
  discover_gate(ex, call, req);
}

/* What one call holds of a tenant: the catalog snapshot and the policy
 * state it started with, so that every URI of that tenant in the answer
 * comes from the same catalog. */
typedef struct held {
  size_t tenant;
  tg_snapshot_pin_t pin;
  tg_policy_state_t *st;
} held_t;

/* held has room for one entry per URI of the call: never full. */
static held_t *hold(tg_app_worker_t *aw, held_t *held, size_t *nheld, size_t ti) {
  for (size_t k = 0; k < *nheld; k++)
    if (held[k].tenant == ti)
      return &held[k];
  held_t *h = &held[(*nheld)++];
  h->tenant = ti;
  h->pin = tg_snapshot_acquire(aw->catalog_readers[ti]);
  h->st = tg_policy_acquire(aw->policy, aw->app->cfg->tenants[ti].name);
  return h;
}

static void release_all(tg_app_worker_t *aw, held_t *held, size_t nheld) {
  for (size_t k = 0; k < nheld; k++) {
    tg_snapshot_release(aw->catalog_readers[held[k].tenant], held[k].pin);
    if (held[k].st)
      tg_policy_release(held[k].st);
  }
}

static uint32_t usage_bits(const Comp__V1__AISystem *ai) {
  uint32_t bits = 0;
  for (size_t i = 0; ai && i < ai->n_usage_purposes; i++) {
    const tg_view_purpose_t *p = tg_view_purpose(ai->usage_purposes[i]);
    if (p)
      bits |= p->bit;
  }
  return bits;
}

static uint32_t user_bits(const Comp__V1__AISystem *ai) {
  const tg_view_user_type_t *u = ai ? tg_view_user_type(ai->user_type) : NULL;
  return u ? u->bit : 0;
}

/* Fills r for one URI of tenant ti from its catalog and price hook. Returns
 * 0, or -1 when a policy failed (the call fails closed). */
static int discover_one(tg_app_worker_t *aw, tg_connect_call_t *call, held_t *h, size_t ti,
                        const char *uri, const char *host, size_t host_len,
                        const Ramp__V1__DiscoverResourcesRequest *req, Ramp__V1__ResourceResult *r,
                        int64_t *built_at) {
  const tg_app_t *app = aw->app;
  const tg_catalog_t *cat = h->pin.data;
  if (cat == NULL) {
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG;
    r->absence_detail = "no catalog loaded for this tenant";
    return 0;
  }
  if (*built_at == 0)
    *built_at = tg_catalog_built_at(cat);
  const char *path = host + host_len;
  size_t plen = strcspn(path, "#");
  if (plen == 0 || path[0] != '/')
    path = "/", plen = 1;
  tg_catalog_query_t q = {usage_bits(req->ai_system), user_bits(req->ai_system), ""};
  if (req->ai_system && req->ai_system->country && strlen(req->ai_system->country) == 2)
    memcpy(q.country, req->ai_system->country, 3);
  tg_catalog_result_t res;
  tg_catalog_lookup(cat, path, plen, &q, &res);
  switch (res.status) {
  case TG_CATALOG_NOT_IN_CATALOG:
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG;
    r->absence_detail = "no catalog entry matches this URI";
    return 0;
  case TG_CATALOG_PROHIBITED:
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_PROHIBITED;
    r->absence_detail = "the license prohibits the requested usage";
    return 0;
  case TG_CATALOG_FILTERED:
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_FILTERED_BY_RESTRICTIONS;
    r->absence_detail = "no license admits this usage, user type or country";
    return 0;
  case TG_CATALOG_NOT_FOR_SALE:
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_FOR_SALE;
    r->absence_detail = "the catalog entry carries no license";
    return 0;
  case TG_CATALOG_OFFERS:
    break;
  }
  if (h->st == NULL)
    return -1;
  tg_view_t view;
  connect_view(&view, call, req->ai_system, app->cfg->tenants[ti].name);
  Ramp__V1__Offer **offers = tg_connect_call_alloc(call, res.noffers * sizeof *offers);
  if (offers == NULL)
    return -1;
  int64_t now = (int64_t)time(NULL);
  size_t n = 0;
  for (uint32_t k = 0; k < res.noffers; k++) {
    const tg_catalog_offer_t *o = &res.offers[k];
    /* o->usage holds concrete purposes only: "all" and "ai-all" never match. */
    const char *tokens[TG_VIEW_NPURPOSES];
    size_t ntok = 0;
    for (size_t u = 0; u < TG_VIEW_NPURPOSES; u++)
      if (o->usage & tg_view_purposes[u].bit)
        tokens[ntok++] = tg_view_purposes[u].token;
    tg_policy_offer_t po = {uri, tg_rsl_pay_type_name(o->type), o->amount, o->currency[0] ? o->currency : NULL,
                            tokens, ntok, o->lastmod, o->license_url};
    tg_policy_price_t price;
    tg_policy_error_t err;
    int rc = tg_policy_price(h->st, &po, &view.req, &price, &err);
    if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK)
      return -1;
    if (!price.for_sale)
      continue;
    tg_offer_t tok = {0};
    snprintf(tok.tenant, sizeof tok.tenant, "%s", app->cfg->tenants[ti].name);
    snprintf(tok.uri, sizeof tok.uri, "%s", uri);
    tok.content = o->content;
    tok.license = (uint32_t)((o->key >> 16) & 0xffff);
    tok.payment = (uint32_t)(o->key & 0xffff);
    tok.amount = price.amount;
    snprintf(tok.currency, sizeof tok.currency, "%s", price.currency);
    tok.payment_type = (uint32_t)o->type;
    tok.usage_bits = o->usage;
    tok.expires_at = now + app->offer_ttl_s;
    char *id = tg_connect_call_alloc(call, TG_OFFER_TOKEN_MAX);
    Ramp__V1__Offer *of = tg_connect_call_alloc(call, sizeof *of);
    Ramp__V1__Pricing *pr = tg_connect_call_alloc(call, sizeof *pr);
    Ramp__V1__Money *m = tg_connect_call_alloc(call, sizeof *m);
    Ramp__V1__Terms *te = tg_connect_call_alloc(call, sizeof *te);
    Comp__V1__UsagePurpose *pp = tg_connect_call_alloc(call, TG_VIEW_NPURPOSES * sizeof *pp);
    char *cur = tg_connect_call_alloc(call, sizeof tok.currency);
    if (!id || !of || !pr || !m || !te || !pp || !cur ||
        tg_offer_encode(&app->offer_keys, &tok, id, TG_OFFER_TOKEN_MAX) != 0)
      return -1;
    memcpy(cur, tok.currency, sizeof tok.currency);
    ramp__v1__offer__init(of);
    ramp__v1__pricing__init(pr);
    ramp__v1__money__init(m);
    ramp__v1__terms__init(te);
    m->currency = cur;
    m->amount = price.amount;
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
    offers[n++] = of;
  }
  if (n == 0) {
    r->absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_FOR_SALE;
    r->absence_detail = "the tenant's policy does not sell this usage";
    return 0;
  }
  r->n_offers = n;
  r->offers = offers;
  return 0;
}

static tg_metric_t *m_offers_returned;

/* Called by the gate once the rate limits allowed the call, which is then
 * not answered yet (its HTTP request is there). */
static void discover_answer(const tg_exchange_t *ex, tg_app_worker_t *aw, tg_connect_call_t *call,
                            const Ramp__V1__DiscoverResourcesRequest *req) {
  size_t n = req->n_resources;
  tg_http_req_t *http = tg_connect_call_http(call);
  /* One block each for the results and the tenants held (at most one per
   * URI): the answer is built and freed in this call. */
  Ramp__V1__ResourceResult *results = calloc(n, sizeof *results);
  Ramp__V1__ResourceResult **ptrs = calloc(n, sizeof *ptrs);
  held_t *held = calloc(n, sizeof *held);
  if (results == NULL || ptrs == NULL || held == NULL) {
    free(results);
    free(ptrs);
    free(held);
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  size_t nheld = 0;
  int64_t built_at = 0;
  int failed = 0;
  const char *tenant_label = NULL;
  for (size_t i = 0; i < n && !failed; i++) {
    const char *uri = req->resources[i]->uri;
    const char *host;
    size_t host_len;
    if (tg_uri_host(uri, &host, &host_len) != 0) {
      release_all(aw, held, nheld);
      free(results);
      free(ptrs);
      free(held);
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "resources[%zu].uri: not an absolute http(s) URL", i);
      return;
    }
    ramp__v1__resource_result__init(&results[i]);
    ptrs[i] = &results[i];
    results[i].uri = (char *)uri;
    const tg_config_tenant_t *t = tg_tenants_by_host(ex->app->tenants, host, host_len);
    if (t == NULL) {
      results[i].absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_TENANT_UNKNOWN;
      results[i].absence_detail = "no tenant serves this host";
      continue;
    }
    if (tenant_label == NULL)
      tenant_label = t->name;
    size_t ti = tg_app_tenant_index(aw->app, t);
    held_t *h = hold(aw, held, &nheld, ti);
    failed = discover_one(aw, call, h, ti, uri, host, host_len, req, &results[i], &built_at) != 0;
  }
  if (tenant_label)
    tg_connect_call_set_tenant(call, tenant_label);
  if (failed) {
    tg_connect_fail(call, TG_CONNECT_INTERNAL, "policy error, see the gateway log (request %s)",
                    http->request_id);
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
  release_all(aw, held, nheld);
  free(results);
  free(ptrs);
  free(held);
}

static void execute(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  const tg_exchange_t *ex = ud;
  const Ramp__V1__ExecuteTransactionRequest *req = (const Ramp__V1__ExecuteTransactionRequest *)msg;
  uint32_t max = ex->app->cfg->idempotency_key_max ? ex->app->cfg->idempotency_key_max
                                                   : TG_CONFIG_DEFAULT_IDEMPOTENCY_KEY_MAX;
  size_t klen = strnlen(req->idempotency_key, (size_t)max + 1);
  if (klen == 0 || klen > max) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "idempotency_key: required, 1 to %u characters", max);
    return;
  }
  if (req->n_items == 0) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "items: at least one offer is required");
    return;
  }
  tg_connect_fail(call, TG_CONNECT_UNIMPLEMENTED, "ExecuteTransaction is not available yet");
}

static void report(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  (void)ud;
  const Ramp__V1__ReportUsageRequest *req = (const Ramp__V1__ReportUsageRequest *)msg;
  if (req->transaction_id[0] == '\0') {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "transaction_id: required");
    return;
  }
  tg_connect_fail(call, TG_CONNECT_UNIMPLEMENTED, "ReportUsage is not available yet");
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
