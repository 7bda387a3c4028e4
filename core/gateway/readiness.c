#include "gateway/readiness.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>

#include "ledger/ship.h"
#include "pipeline/app.h"

void tg_readiness_set_serving(tg_readiness_t *r, int serving) {
  atomic_store_explicit(&r->serving, serving && !atomic_load(&r->draining), memory_order_release);
}

int tg_readiness_serving(const tg_readiness_t *r) {
  return atomic_load_explicit(&r->serving, memory_order_acquire);
}

int tg_readiness_start_drain(tg_readiness_t *r) {
  int first = atomic_exchange(&r->draining, 1) == 0;
  tg_readiness_set_serving(r, 0);
  return first;
}

int tg_readiness_draining(const tg_readiness_t *r) { return atomic_load(&r->draining); }

/* The log's fill, the shipper's lag and each remote billing service's
 * health into body; 0 when one of them makes the gateway not ready (the
 * reason appended to reasons). */
static int money_path(const tg_app_t *app, json_t *body, json_t *reasons) {
  int ready = 1;
  if (app->wal != NULL) {
    uint64_t used = tg_wal_used_bytes(app->wal), cap = tg_wal_capacity(app->wal);
    double u = cap ? (double)used / (double)cap : 0;
    json_object_set_new(body, "log", json_pack("{s:I, s:I, s:f}", "used_bytes", (json_int_t)used, "capacity_bytes",
                                               (json_int_t)cap, "utilization", round(u * 1e4) / 1e4));
    if (u > TG_READINESS_LOG_FULL) {
      char why[96];
      snprintf(why, sizeof why, "transaction log %.0f%% full (above %.0f%%)", floor(u * 100),
               TG_READINESS_LOG_FULL * 100);
      json_array_append_new(reasons, json_string(why));
      ready = 0;
    }
  }
  if (app->ship != NULL) {
    uint64_t shipped = tg_ship_shipped_seq(app->ship), durable = tg_ship_durable_seq(app->ship);
    json_object_set_new(body, "ship",
                        json_pack("{s:f, s:I, s:I}", "lag_seconds", round(tg_ship_lag_seconds(app->ship) * 1e3) / 1e3,
                                  "shipped_seq", (json_int_t)shipped, "pending",
                                  (json_int_t)(durable > shipped ? durable - shipped : 0)));
  }
  json_t *billing = json_array();
  for (size_t i = 0; app->cfg && i < app->cfg->ntenants; i++) {
    tg_app_billing_health_t h;
    tg_app_billing_health(app, i, &h);
    if (!h.configured)
      continue;
    const char *name = app->cfg->tenants[i].name;
    json_array_append_new(billing, json_pack("{s:s, s:b, s:I, s:b}", "tenant", name, "serving", h.serving,
                                             "consecutive_failures", (json_int_t)h.consecutive_failures,
                                             "rejects", h.rejects));
    if (h.consecutive_failures >= TG_READINESS_BILLING_FAILURES && h.rejects) {
      char why[96];
      snprintf(why, sizeof why, "%u consecutive health checks failed", h.consecutive_failures);
      json_array_append_new(reasons, json_pack("{s:s, s:s}", "tenant", name, "billing", why));
      ready = 0;
    }
  }
  if (json_array_size(billing) > 0)
    json_object_set_new(body, "billing", billing);
  else
    json_decref(billing);
  return ready;
}

void tg_readiness_respond(tg_readiness_t *r, tg_http_req_t *req) {
  json_t *reasons = json_array();
  int ready = tg_readiness_serving(r);
  if (tg_readiness_draining(r))
    json_array_append_new(reasons, json_string("draining"));
  else if (!ready)
    json_array_append_new(reasons, json_string("not serving: starting or draining"));
  /* A tenant whose catalog never loaded has no inventory: say which and why. */
  for (size_t i = 0; r->ingest && i < r->cfg->ntenants; i++) {
    tg_ingest_status_t st;
    if (tg_ingest_status(r->ingest, i, &st) != 0 || !st.has_source || st.loaded)
      continue;
    json_array_append_new(reasons, json_pack("{s:s, s:s}", "tenant", r->cfg->tenants[i].name, "catalog",
                                             st.attempted ? st.last_reason : "first load not finished"));
    ready = 0;
  }
  json_t *body = json_pack("{s:b, s:I, s:I, s:o}", "ready", ready, "tenants", (json_int_t)r->cfg->ntenants,
                           "connections",
                           (json_int_t)(tg_readiness_serving(r) && r->server
                                            ? tg_server_connections(r->server) : 0), "reasons",
                           json_incref(reasons));
  if (r->app != NULL && !money_path(r->app, body, reasons))
    ready = 0;
  json_object_set_new(body, "ready", json_boolean(ready));
  json_decref(reasons);
  tg_http_respond_json(req, ready ? 200 : 503, body);
}
