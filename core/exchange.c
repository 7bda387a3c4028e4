#include "exchange.h"

#include <stdlib.h>
#include <string.h>

#include "ramp/v1/exchange.pb-c.h"

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
