#include "pipeline/resource.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/buf.h"
#include "base/log.h"

/* One request going through the pipeline; lives until it is answered, since
 * a Redis rate-limit decision arrives later on the loop. */
typedef struct pass {
  tg_app_worker_t *aw;
  const tg_config_tenant_t *tenant;
  tg_http_req_t *http;
  tg_policy_state_t *st;
  tg_policy_req_t view;
  char ip[64];
} pass_t;

static const char *header_cb(void *ud, const char *name, size_t namelen, size_t *vlen) {
  const tg_http_header_t *h = tg_http_req_header_n(ud, name, namelen);
  if (h == NULL)
    return NULL;
  *vlen = h->value_len;
  return h->value;
}

static void finish(pass_t *p, int status, const tg_http_header_t *hdrs, size_t n, const char *body) {
  tg_http_header_t all[4];
  size_t k = 0;
  all[k++] = (tg_http_header_t){"Content-Type", 12, "application/json", 16};
  for (size_t i = 0; i < n && k < 4; i++)
    all[k++] = hdrs[i];
  tg_http_respond(p->http, status, all, k, body, strlen(body));
  if (p->st)
    tg_policy_release(p->st);
  free(p);
}

static void fail_policy(pass_t *p, const tg_policy_error_t *err) {
  char body[256];
  snprintf(body, sizeof body,
           "{\"code\":\"T402-2001\",\"message\":\"policy error, see the gateway log\","
           "\"request_id\":\"%s\"}",
           p->http->request_id);
  (void)err; /* logged and counted by the policy module, never sent to the client */
  finish(p, 500, NULL, 0, body);
}

/* The resource's offer until the catalog issue lands: the tenant's
 * configured x402 price, in the asset's atomic units. */
static void default_offer(const pass_t *p, tg_policy_offer_t *o, char *uri, size_t urilen) {
  memset(o, 0, sizeof *o);
  snprintf(uri, urilen, "%s://%s%s", p->http->tls ? "https" : "http", p->view.host ? p->view.host : "",
           p->http->path);
  o->uri = uri;
  o->model = "purchase";
  const char *price = tg_config_get(&p->tenant->payments, "x402.price");
  if (price) {
    o->amount = strtoll(price, NULL, 10);
    o->currency = "USDC";
  }
}

static void priced(pass_t *p) {
  tg_policy_offer_t offer;
  char uri[2048];
  default_offer(p, &offer, uri, sizeof uri);
  tg_policy_price_t price;
  tg_policy_error_t err;
  int rc = tg_policy_price(p->st, &offer, &p->view, &price, &err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (!price.for_sale) {
    finish(p, 403, NULL, 0, "{\"error\":\"not for sale\"}");
    return;
  }
  if (price.amount == 0) { /* priced at nothing: served like a skipped path */
    char body[160];
    snprintf(body, sizeof body, "{\"tenant\":\"%s\",\"access\":\"free\"}", p->tenant->name);
    finish(p, 200, NULL, 0, body);
    return;
  }
  char body[512];
  snprintf(body, sizeof body,
           "{\"error\":\"payment required\",\"resource\":\"%s\",\"price\":{\"amount\":\"%lld\","
           "\"currency\":\"%s\"},\"policy_version\":\"%.12s\"}",
           p->http->path, (long long)price.amount, price.currency, tg_policy_state_version(p->st));
  finish(p, 402, NULL, 0, body);
}

static void on_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  pass_t *p = ud;
  if (!allowed) {
    char secs[16], body[160];
    snprintf(secs, sizeof secs, "%u", tg_app_retry_after_s(retry_after_ms));
    snprintf(body, sizeof body,
             "{\"code\":\"T402-2005\",\"message\":\"rate limited\",\"retry\":{\"after_ms\":%u}}",
             retry_after_ms);
    tg_http_header_t h = {"Retry-After", 11, secs, strlen(secs)};
    finish(p, 429, &h, 1, body);
    return;
  }
  priced(p);
}

void tg_resource_handle(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req) {
  pass_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    tg_http_respond_simple(req, 503, "application/json", "{\"error\":\"out of memory\"}", 25);
    return;
  }
  p->aw = aw;
  p->tenant = tenant;
  p->http = req;
  p->st = tg_policy_acquire(aw->policy, tenant->name);
  if (p->st == NULL) {
    tg_policy_error_t err = {TG_POLICY_ERR_RUNTIME, "no usable policy state"};
    tg_log_req(TG_LOG_ERROR, req->request_id, "no policy state", "tenant", tenant->name, NULL);
    fail_policy(p, &err);
    return;
  }
  /* The peer without its port: rate-limit keys by address must not vary. */
  tg_http_peer_ip(req, p->ip, sizeof p->ip);
  const tg_http_header_t *host = tg_http_req_header(req, "host");
  const tg_http_header_t *ua = tg_http_req_header(req, "user-agent");
  tg_policy_req_t *v = &p->view;
  v->method = req->method_name;
  v->path = req->path;
  v->query = req->query;
  v->host = host ? host->value : NULL;
  v->tenant = tenant->name;
  v->ip = p->ip;
  v->user_agent = ua ? ua->value : NULL;
  v->header = header_cb;
  v->header_ud = req;
  v->kind = TG_POLICY_KIND_HTTP;
  v->request_id = req->request_id;

  tg_policy_error_t err;
  bool skip = false;
  int rc = tg_policy_skip(p->st, v, &skip, &err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (skip) {
    char body[160];
    snprintf(body, sizeof body, "{\"tenant\":\"%s\",\"access\":\"free\"}", tenant->name);
    finish(p, 200, NULL, 0, body);
    return;
  }
  tg_policy_rate_t rate;
  rc = tg_policy_rate_limit(p->st, v, &rate, &err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (!rate.limited) {
    priced(p);
    return;
  }
  tg_app_take(aw, tenant->name, &rate, on_taken, p);
}
