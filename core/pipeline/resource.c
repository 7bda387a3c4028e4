#include "pipeline/resource.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/buf.h"
#include "base/log.h"
#include "base/money.h"
#include "base/utf8.h"
#include "pipeline/view.h"

/* One request going through the pipeline; lives until it is answered, since
 * a Redis rate-limit decision arrives later on the loop. */
typedef struct pass {
  tg_app_worker_t *aw;
  const tg_config_tenant_t *tenant;
  tg_http_req_t *http;
  tg_policy_state_t *st;
  tg_view_t view;
  tg_buf_t uri; /* the offer's URI, as long as the request made it */
} pass_t;

static const char *header_cb(void *ud, const char *name, size_t namelen, size_t *vlen) {
  const tg_http_header_t *h = tg_http_req_header_n(ud, name, namelen);
  if (h == NULL)
    return NULL;
  *vlen = h->value_len;
  return h->value;
}

/* Answers with body as JSON (its reference is taken; NULL, a failed json_*
 * call, answers 500) plus at most one extra header, and ends the pass. Every
 * body is built with jansson: paths and ids come from the client. */
static void finish(pass_t *p, int status, const tg_http_header_t *extra, json_t *body) {
  if (extra == NULL) {
    tg_http_respond_json(p->http, status, body);
  } else {
    char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (text == NULL) {
      tg_http_respond_json(p->http, 500, NULL);
    } else {
      tg_http_header_t h[2] = {{"Content-Type", 12, "application/json", 16}, *extra};
      tg_http_respond(p->http, status, h, 2, text, strlen(text));
      free(text);
    }
  }
  if (p->st)
    tg_policy_release(p->st);
  tg_buf_free(&p->uri);
  free(p);
}

static void fail_policy(pass_t *p, const tg_policy_error_t *err) {
  (void)err; /* logged and counted by the policy module, never sent to the client */
  finish(p, 500, NULL,
         json_pack("{s:s, s:s, s:o}", "code", "T402-2001", "message", "policy error, see the gateway log",
                   "request_id", tg_utf8_json_string(p->http->request_id)));
}

static void answer_free(pass_t *p) {
  finish(p, 200, NULL, json_pack("{s:s, s:s}", "tenant", p->tenant->name, "access", "free"));
}

/* The resource's offer until the catalog issue lands: the tenant's
 * configured x402 price (parsed at load), in the asset's atomic units. No
 * price leaves the currency NULL: not for sale unless the policy prices it.
 * -1 when out of memory. */
static int default_offer(pass_t *p, tg_policy_offer_t *o) {
  memset(o, 0, sizeof *o);
  if (tg_buf_printf(&p->uri, "%s://%s%s", p->http->tls ? "https" : "http", p->view.req.host ? p->view.req.host : "",
                    p->http->path) != 0)
    return -1;
  o->uri = p->uri.data;
  o->model = "purchase";
  if (p->tenant->x402_priced) {
    o->amount = p->tenant->x402_price;
    o->currency = "USDC";
  }
  return 0;
}

static void priced(pass_t *p) {
  tg_policy_offer_t offer;
  if (default_offer(p, &offer) != 0) {
    finish(p, 503, NULL, json_pack("{s:s}", "error", "out of memory"));
    return;
  }
  tg_policy_price_t price;
  tg_policy_error_t err;
  int rc = tg_policy_price(p->st, &offer, &p->view.req, &price, &err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (!price.for_sale) {
    finish(p, 403, NULL, json_pack("{s:s}", "error", "not for sale"));
    return;
  }
  /* The sandbox bounds a hook's amount already; an amount out of range here
   * is a defect, and it must not be served as free. */
  if (price.amount < 0 || price.amount > TG_MONEY_MAX) {
    tg_log_req(TG_LOG_ERROR, p->http->request_id, "price out of range", "tenant", p->tenant->name, NULL);
    fail_policy(p, &err);
    return;
  }
  if (price.amount == 0) { /* priced at nothing (configured 0, or the hook's 0): served like a skipped path */
    answer_free(p);
    return;
  }
  char amount[24];
  const char *version = tg_policy_state_version(p->st);
  snprintf(amount, sizeof amount, "%lld", (long long)price.amount);
  finish(p, 402, NULL,
         json_pack("{s:s, s:o, s:{s:s, s:o}, s:s#}", "error", "payment required", "resource",
                   tg_utf8_json_string(p->http->path), "price", "amount", amount, "currency",
                   tg_utf8_json_string(price.currency), "policy_version", version,
                   (int)strnlen(version, 12)));
}

static void on_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  pass_t *p = ud;
  if (!allowed) {
    char secs[16];
    snprintf(secs, sizeof secs, "%u", tg_app_retry_after_s(retry_after_ms));
    tg_http_header_t h = {"Retry-After", 11, secs, strlen(secs)};
    finish(p, 429, &h,
           json_pack("{s:s, s:s, s:{s:I}}", "code", "T402-2005", "message", "rate limited", "retry",
                     "after_ms", (json_int_t)retry_after_ms));
    return;
  }
  priced(p);
}

void tg_resource_handle(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req) {
  pass_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    static const char oom[] = "{\"error\":\"out of memory\"}"; /* a constant: no allocation left to build one */
    tg_http_respond_simple(req, 503, "application/json", oom, sizeof oom - 1);
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
  tg_view_build(&p->view, TG_POLICY_KIND_HTTP, req, tenant->name, header_cb, req, NULL);
  const tg_policy_req_t *v = &p->view.req;

  tg_policy_error_t err;
  bool skip = false;
  int rc = tg_policy_skip(p->st, v, &skip, &err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (skip) {
    answer_free(p);
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
