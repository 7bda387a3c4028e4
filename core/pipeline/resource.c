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
#include "pipeline/paywall.h"
#include "pipeline/quote.h"
#include "pipeline/view.h"

/* One request going through the pipeline; lives until it is answered, since
 * a Redis rate-limit decision arrives later on the loop. */
typedef struct pass {
  tg_app_worker_t *aw;
  const tg_config_tenant_t *tenant;
  tg_http_req_t *http;
  tg_policy_state_t *st;
  tg_snapshot_pin_t catalog; /* pinned while the rate limit decides */
  size_t ti;                 /* the tenant's index */
  tg_view_t view;
  tg_span_t *span;           /* the request's server span (base/trace.h); NULL: not traced */
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
/* Ends the pass without answering (someone else answers). */
static void release(pass_t *p) {
  tg_span_finish(&p->span, NULL);
  if (p->st)
    tg_policy_release(p->st);
  if (p->catalog.handle)
    tg_snapshot_release(p->aw->catalog_readers[p->ti], p->catalog);
  free(p);
}

static void finish(pass_t *p, int status, const tg_http_header_t *extra, json_t *body) {
  tg_span_set_int(p->span, "http.response.status_code", status);
  if (status >= 500)
    tg_span_set_error(p->span, "server error");
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
  release(p);
}

static void fail_policy(pass_t *p, const tg_policy_error_t *err) {
  (void)err; /* logged and counted by the policy module, never sent to the client */
  tg_app_decision(p->tenant->name, false, TG_DECISION_ERROR);
  finish(p, 500, NULL,
         json_pack("{s:s, s:s, s:o}", "code", "T402-2001", "message", "policy error, see the gateway log",
                   "request_id", tg_utf8_json_string(p->http->request_id)));
}

static void answer_free(pass_t *p, tg_decision_t why) {
  tg_app_decision(p->tenant->name, false, why);
  finish(p, 200, NULL, json_pack("{s:s, s:s}", "tenant", p->tenant->name, "access", "free"));
}

static json_t *money(const tg_quote_offer_t *o) {
  char amount[24];
  snprintf(amount, sizeof amount, "%lld", (long long)o->amount);
  return json_pack("{s:s, s:o}", "amount", amount, "currency", tg_utf8_json_string(o->currency));
}

/* An offer as the 402 body lists it: what Discover's Offer says, in JSON. */
static json_t *offer_json(const tg_quote_offer_t *o) {
  json_t *purposes = json_array();
  for (size_t u = 0; purposes && u < TG_VIEW_NPURPOSES; u++)
    if (o->usage & tg_view_purposes[u].bit)
      json_array_append_new(purposes, json_string(tg_view_purposes[u].token));
  json_t *terms = json_pack("{s:o*}", "permitted_purposes", purposes);
  if (terms && o->license_url)
    json_object_set_new(terms, "license_url", tg_utf8_json_string(o->license_url));
  return json_pack("{s:s, s:o*, s:o*}", "model", tg_quote_model(o), "price", money(o), "terms", terms);
}

static const char *reason_name(tg_quote_status_t s) {
  switch (s) {
  case TG_QUOTE_NOT_IN_CATALOG: return "not_in_catalog";
  case TG_QUOTE_PROHIBITED: return "prohibited";
  case TG_QUOTE_FILTERED: return "filtered_by_restrictions";
  default: return "not_for_sale";
  }
}

static void priced(pass_t *p) {
  tg_quote_t q;
  tg_policy_error_t err;
  tg_span_t *sp = tg_span_start("catalog.quote", p->span, TG_SPAN_INTERNAL);
  int rc = tg_quote(p->tenant, p->catalog.data, p->st, &p->view, &q, &err);
  tg_span_finish(&sp, rc != 0 ? "quote failed" : NULL);
  if (rc != 0) {
    fail_policy(p, &err);
    return;
  }
  if (q.status == TG_QUOTE_NO_CATALOG) {
    tg_app_decision(p->tenant->name, false, TG_DECISION_NOT_FOR_SALE);
    tg_http_header_t h = {"Retry-After", 11, "5", 1};
    finish(p, 503, &h, json_pack("{s:s, s:s}", "error", "catalog not loaded", "detail", q.detail));
    return;
  }
  if (q.status != TG_QUOTE_OFFERS) {
    tg_app_decision(p->tenant->name, false, TG_DECISION_NOT_FOR_SALE);
    finish(p, 403, NULL,
           json_pack("{s:s, s:s, s:s}", "error", "not for sale", "reason", reason_name(q.status), "detail",
                     q.detail));
    return;
  }
  const tg_quote_offer_t *first = NULL;
  for (size_t i = 0; i < q.n && first == NULL; i++)
    if (q.offers[i].amount > 0)
      first = &q.offers[i];
  if (first == NULL) { /* every offer at nothing (a free license, or the hook's 0) */
    answer_free(p, TG_DECISION_FREE);
    return;
  }
  if (tg_paywall_enabled(p->aw->app->pay, p->ti)) {
    tg_paywall_priced(p->aw, p->tenant, p->http, p->st, &p->view, first, p->span);
    p->span = NULL; /* the paywall's now */
    release(p);
    return;
  }
  json_t *offers = json_array();
  for (size_t i = 0; offers && i < q.n; i++)
    if (json_array_append_new(offers, offer_json(&q.offers[i])) != 0) {
      json_decref(offers);
      offers = NULL;
    }
  const char *version = tg_policy_state_version(p->st);
  tg_app_decision(p->tenant->name, false, TG_DECISION_PRICED);
  finish(p, 402, NULL,
         json_pack("{s:s, s:o, s:o, s:o*, s:o*, s:s#}", "error", "payment required", "resource",
                   tg_utf8_json_string(p->http->path), "uri", tg_utf8_json_string(p->view.uri), "price",
                   money(first), "offers", offers, "policy_version", version, (int)strnlen(version, 12)));
}

static void on_taken(void *ud, int allowed, uint32_t retry_after_ms) {
  pass_t *p = ud;
  if (!allowed) {
    tg_app_decision(p->tenant->name, false, TG_DECISION_LIMITED);
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
  if (tg_trace_global()) {
    const tg_http_header_t *tp = tg_http_req_header(req, "traceparent");
    p->span = tg_span_start_server("HTTP resource", tp ? tp->value : NULL, tp ? tp->value_len : 0);
    tg_span_set_str(p->span, "tenant", tenant->name);
    tg_span_set_str(p->span, "url.path", req->path);
  }
  p->st = tg_policy_acquire(aw->policy, tenant->name);
  if (p->st == NULL) {
    tg_policy_error_t err = {TG_POLICY_ERR_RUNTIME, "no usable policy state"};
    tg_log_req(TG_LOG_ERROR, req->request_id, "no policy state", "tenant", tenant->name, NULL);
    fail_policy(p, &err);
    return;
  }
  if (tg_view_http(&p->view, req, tenant->name, header_cb, req) != 0) {
    finish(p, 414, NULL, json_pack("{s:s}", "error", "request target too long"));
    return;
  }
  const tg_policy_req_t *v = &p->view.req;

  tg_policy_error_t err;
  bool skip = false;
  tg_span_t *sp = tg_span_start("policy.skip", p->span, TG_SPAN_INTERNAL);
  int rc = tg_policy_skip(p->st, v, &skip, &err);
  tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  if (skip) {
    answer_free(p, TG_DECISION_SKIP);
    return;
  }
  tg_policy_rate_t rate;
  sp = tg_span_start("policy.rate_limit", p->span, TG_SPAN_INTERNAL);
  rc = tg_policy_rate_limit(p->st, v, &rate, &err);
  tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) {
    fail_policy(p, &err);
    return;
  }
  /* Pinned before the rate limit decides, as Discover pins before its gate. */
  p->ti = tg_app_tenant_index(aw->app, tenant);
  p->catalog = tg_snapshot_acquire(aw->catalog_readers[p->ti]);
  if (!rate.limited) {
    priced(p);
    return;
  }
  tg_app_take(aw, tenant->name, &rate, on_taken, p);
}
