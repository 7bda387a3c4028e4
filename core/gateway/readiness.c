#include "gateway/readiness.h"

#include <jansson.h>

void tg_readiness_set_serving(tg_readiness_t *r, int serving) {
  atomic_store_explicit(&r->serving, serving, memory_order_release);
}

int tg_readiness_serving(const tg_readiness_t *r) {
  return atomic_load_explicit(&r->serving, memory_order_acquire);
}

void tg_readiness_respond(tg_readiness_t *r, tg_http_req_t *req) {
  json_t *reasons = json_array();
  int ready = tg_readiness_serving(r);
  if (!ready)
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
                           reasons);
  tg_http_respond_json(req, ready ? 200 : 503, body);
}
