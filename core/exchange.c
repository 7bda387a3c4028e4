#include "exchange.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "app.h"
#include "log.h"
#include "ramp/v1/exchange.pb-c.h"

/* RSL usage tokens by enum value. */
static const char *purpose_token(Comp__V1__UsagePurpose p) {
  switch (p) {
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_ALL: return "all";
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_ALL: return "ai-all";
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_TRAIN: return "ai-train";
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INPUT: return "ai-input";
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INDEX: return "ai-index";
  case COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_SEARCH: return "search";
  default: return NULL;
  }
}

static const char *user_type_token(Comp__V1__UserType t) {
  switch (t) {
  case COMP__V1__USER_TYPE__USER_TYPE_COMMERCIAL: return "commercial";
  case COMP__V1__USER_TYPE__USER_TYPE_NON_COMMERCIAL: return "non-commercial";
  case COMP__V1__USER_TYPE__USER_TYPE_EDUCATION: return "education";
  case COMP__V1__USER_TYPE__USER_TYPE_GOVERNMENT: return "government";
  case COMP__V1__USER_TYPE__USER_TYPE_PERSONAL: return "personal";
  default: return NULL;
  }
}

static const char *nonempty(const char *s) { return s && *s ? s : NULL; }

static const char *call_header(void *ud, const char *name, size_t namelen, size_t *vlen) {
  tg_http_req_t *req = tg_connect_call_http(ud);
  const tg_http_header_t *h = req ? tg_http_req_header_n(req, name, namelen) : NULL;
  if (h == NULL)
    return NULL;
  *vlen = h->value_len;
  return h->value;
}

/* The policy's view of a Connect call made for an AI system. purposes must
 * hold 8 entries; the view borrows from the call and the request. */
static void connect_view(tg_policy_req_t *v, tg_connect_call_t *call, const Comp__V1__AISystem *ai,
                         const char *tenant, const char **purposes, char *ip, size_t iplen) {
  tg_http_req_t *http = tg_connect_call_http(call);
  memset(v, 0, sizeof *v);
  v->kind = TG_POLICY_KIND_CONNECT;
  v->tenant = tenant;
  if (http) {
    v->method = http->method_name;
    v->path = http->path;
    v->query = http->query;
    const tg_http_header_t *h = tg_http_req_header(http, "host");
    v->host = h ? h->value : NULL;
    tg_http_peer_ip(http, ip, iplen);
    v->ip = ip;
    v->request_id = http->request_id;
    v->header = call_header;
    v->header_ud = call;
  }
  if (ai) {
    size_t n = 0;
    for (size_t i = 0; i < ai->n_usage_purposes && n < 8; i++) {
      const char *t = purpose_token(ai->usage_purposes[i]);
      if (t)
        purposes[n++] = t;
    }
    v->purposes = purposes;
    v->npurposes = n;
    v->ai_id = nonempty(ai->id);
    v->ai_name = nonempty(ai->name);
    v->user_agent = nonempty(ai->user_agent);
    v->user_type = user_type_token(ai->user_type);
    v->country = nonempty(ai->country);
  }
}

static void discover_answer(const tg_exchange_t *ex, tg_connect_call_t *call,
                            const Ramp__V1__DiscoverResourcesRequest *req);

/* Rate limits of the tenants a call touches, decided together (in redis
 * mode the decisions arrive later, on the loop). */
typedef struct gate {
  const tg_exchange_t *ex;
  tg_connect_call_t *call;
  const Ramp__V1__DiscoverResourcesRequest *req;
  int pending;       /* decisions still out, plus one while they are being issued */
  int denied;
  int failed;        /* a policy failed: the call fails closed */
  uint32_t retry_ms;
} gate_t;

static void gate_done(gate_t *g) {
  if (--g->pending > 0)
    return;
  tg_http_req_t *http = tg_connect_call_http(g->call);
  if (g->failed)
    tg_connect_fail(g->call, TG_CONNECT_INTERNAL, "policy error, see the gateway log (request %s)",
                    http ? http->request_id : "-");
  else if (g->denied)
    tg_connect_fail(g->call, TG_CONNECT_RESOURCE_EXHAUSTED, "rate limited: retry after %u ms",
                    g->retry_ms);
  else
    discover_answer(g->ex, g->call, g->req);
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
 * buckets it names; answers the call when all decided. */
static void discover_gate(const tg_exchange_t *ex, tg_connect_call_t *call,
                          const Ramp__V1__DiscoverResourcesRequest *req) {
  tg_http_req_t *http = tg_connect_call_http(call);
  tg_app_worker_t *aw = http ? tg_app_worker(http->worker) : NULL;
  if (aw == NULL || aw->policy == NULL) { /* no pipeline (unit tests of the exchange alone) */
    discover_answer(ex, call, req);
    return;
  }
  gate_t *g = calloc(1, sizeof *g);
  if (g == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  *g = (gate_t){ex, call, req, 1, 0, 0, 0};
  const tg_config_tenant_t *seen[16];
  size_t nseen = 0;
  for (size_t i = 0; i < req->n_resources; i++) {
    const char *host;
    size_t host_len;
    if (tg_uri_host(req->resources[i]->uri, &host, &host_len) != 0)
      continue;
    const tg_config_tenant_t *t = tg_tenants_by_host(ex->tenants, host, host_len);
    int dup = t == NULL;
    for (size_t k = 0; k < nseen && !dup; k++)
      dup = seen[k] == t;
    if (dup || nseen == sizeof seen / sizeof seen[0])
      continue;
    seen[nseen++] = t;
    if (nseen == 1)
      tg_connect_call_set_tenant(call, t->name);
    tg_policy_state_t *st = tg_policy_acquire(aw->policy, t->name);
    if (st == NULL) {
      g->failed = 1;
      break;
    }
    const char *purposes[8];
    char ip[64];
    tg_policy_req_t v;
    connect_view(&v, call, req->ai_system, t->name, purposes, ip, sizeof ip);
    tg_policy_rate_t rate;
    tg_policy_error_t err;
    int rc = tg_policy_rate_limit(st, &v, &rate, &err);
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
  discover_gate(ex, call, req);
}

static void discover_answer(const tg_exchange_t *ex, tg_connect_call_t *call,
                            const Ramp__V1__DiscoverResourcesRequest *req) {
  size_t n = req->n_resources;
  /* One block for every result: the answer is built and freed in this call. */
  Ramp__V1__ResourceResult *results = calloc(n, sizeof *results);
  Ramp__V1__ResourceResult **ptrs = calloc(n, sizeof *ptrs);
  if (results == NULL || ptrs == NULL) {
    free(results);
    free(ptrs);
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  const char *tenant_label = NULL;
  for (size_t i = 0; i < n; i++) {
    const char *uri = req->resources[i]->uri;
    const char *host;
    size_t host_len;
    if (tg_uri_host(uri, &host, &host_len) != 0) {
      free(results);
      free(ptrs);
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "resources[%zu].uri: not an absolute http(s) URL", i);
      return;
    }
    ramp__v1__resource_result__init(&results[i]);
    ptrs[i] = &results[i];
    results[i].uri = (char *)uri;
    const tg_config_tenant_t *t = tg_tenants_by_host(ex->tenants, host, host_len);
    if (t == NULL) {
      results[i].absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_TENANT_UNKNOWN;
      results[i].absence_detail = "no tenant serves this host";
    } else {
      if (tenant_label == NULL)
        tenant_label = t->name;
      results[i].absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG;
      results[i].absence_detail = "no catalog loaded for this tenant";
    }
  }
  if (tenant_label)
    tg_connect_call_set_tenant(call, tenant_label);
  Ramp__V1__DiscoverResourcesResponse resp = RAMP__V1__DISCOVER_RESOURCES_RESPONSE__INIT;
  resp.n_results = n;
  resp.results = ptrs;
  tg_connect_reply(call, &resp.base);
  free(results);
  free(ptrs);
}

static void execute(tg_connect_call_t *call, const ProtobufCMessage *msg, void *ud) {
  (void)ud;
  const Ramp__V1__ExecuteTransactionRequest *req = (const Ramp__V1__ExecuteTransactionRequest *)msg;
  size_t klen = strlen(req->idempotency_key);
  if (klen == 0 || klen > 128) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                    "idempotency_key: required, 1 to 128 characters");
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
