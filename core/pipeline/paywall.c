#include "pipeline/paywall.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>

#include "base/buf.h"
#include "base/log.h"
#include "base/metrics.h"
#include "base/money.h"
#include "net/proxy.h"
#include "pay/chain.h"
#include "pay/eip3009.h"
#include "pay/facil.h"
#include "pay/nonce.h"
#include "pay/payconf.h"
#include "pay/settleq.h"
#include "pay/x402.h"

/* ---- Process-wide parts */

struct tg_paywall {
  tg_app_t *app;
  tg_payconf_t *conf;         /* one per tenant (config order); .enabled false: no payments */
  size_t nconf;
  bool any;
  tg_nonce_store_t *nonces;   /* this instance's claims */
  tg_settleq_t *settle;       /* the durable queue's book */
  tg_ratelimit_redis_opts_t redis; /* the nonce claims' Redis (host NULL: this instance only) */
};

/* ---- Per worker */

#define CACHE_SLOTS 1024u /* challenge cache: open hashing, at most 4 per slot */
#define CACHE_WAYS 4

typedef struct challenge {
  unsigned refs;              /* the cache's and each request's that uses it */
  uint64_t hash;
  /* The key: tenant index, policy version, price, resource URL. */
  size_t ti;
  int64_t amount;
  char version[TG_POLICY_VERSION_LEN];
  char currency[TG_POLICY_CURRENCY_MAX + 1];
  char *uri;
  tg_x402_offer_t offers[TG_PAY_MAX_ACCEPTS];
  tg_x402_challenge_t c;
} challenge_t;

typedef struct pw_tenant {
  tg_facil_pool_t *facil;
  tg_chain_pool_t *chain;
} pw_tenant_t;

struct tg_paywall_worker {
  tg_paywall_t *pw;
  pw_tenant_t *tenants;
  tg_proxy_t *proxy;
  tg_nonce_redis_t *nonce_redis;        /* NULL without a redis section */
  tg_settleq_runner_t *runner;          /* worker 0 only */
  challenge_t *cache[CACHE_SLOTS][CACHE_WAYS];
  unsigned evict;                       /* round robin way to evict */
};

static tg_metric_t *m_cache, *m_verify;

static void challenge_unref(challenge_t *c) {
  if (c == NULL || --c->refs > 0)
    return;
  tg_x402_challenge_free(&c->c);
  free(c->uri);
  free(c);
}

static uint64_t fnv1a(uint64_t h, const char *s, size_t n) {
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)s[i];
    h *= 1099511628211ull;
  }
  return h;
}

/* ---- Configuration */

static int parse_all(const tg_config_t *cfg, tg_payconf_t **out, bool *any, char *err, size_t errlen) {
  tg_payconf_t *conf = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *conf);
  if (conf == NULL) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  *any = false;
  for (size_t i = 0; i < cfg->ntenants; i++) {
    const tg_config_tenant_t *t = &cfg->tenants[i];
    char why[384];
    if (t->payments.nitems == 0)
      continue;
    if (tg_payconf_parse(&t->payments, &conf[i], why, sizeof why) != 0) {
      snprintf(err, errlen, "tenant %s: %s", t->name, why);
      for (size_t j = 0; j <= i; j++)
        tg_payconf_free(&conf[j]);
      free(conf);
      return -EINVAL;
    }
    if (conf[i].enabled)
      *any = true;
    if (conf[i].enabled && conf[i].serve == TG_PAY_SERVE_REDIRECT && t->signer.nitems == 0) {
      snprintf(err, errlen,
               "tenant %s: payments.serve is \"redirect\" (the default) but the tenant has no signer: add a "
               "signer section, or serve = \"proxy\" with an origin",
               t->name);
      for (size_t j = 0; j <= i; j++)
        tg_payconf_free(&conf[j]);
      free(conf);
      return -EINVAL;
    }
    if (conf[i].enabled && conf[i].nfacilitators == 0) {
      snprintf(err, errlen, "tenant %s: payments needs at least one facilitator (settlement goes through one)",
               t->name);
      for (size_t j = 0; j <= i; j++)
        tg_payconf_free(&conf[j]);
      free(conf);
      return -EINVAL;
    }
  }
  *out = conf;
  return 0;
}

int tg_paywall_check_config(const tg_config_t *cfg, char *err, size_t errlen) {
  tg_payconf_t *conf;
  bool any;
  int rc = parse_all(cfg, &conf, &any, err, errlen);
  if (rc != 0)
    return rc;
  for (size_t i = 0; i < cfg->ntenants; i++)
    tg_payconf_free(&conf[i]);
  free(conf);
  return 0;
}

int tg_paywall_new(tg_app_t *app, tg_paywall_t **out, char *err, size_t errlen) {
  *out = NULL;
  const tg_config_t *cfg = app->cfg;
  tg_paywall_t *pw = calloc(1, sizeof *pw);
  if (pw == NULL) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  pw->app = app;
  pw->nconf = cfg->ntenants;
  int rc = parse_all(cfg, &pw->conf, &pw->any, err, errlen);
  if (rc != 0) {
    free(pw);
    return rc;
  }
  static const char *const cl[] = {"result", NULL};
  m_cache = tg_metric_new(TG_METRIC_COUNTER, "t402_requirements_cache_total",
                          "Payment requirements (402 challenges) served from the worker's cache (hit) or built "
                          "(miss).",
                          cl, NULL, 0);
  static const char *const sl[] = {"network", "scheme", "status", NULL};
  m_verify = tg_metric_new(TG_METRIC_HISTOGRAM, "t402_verification_duration_seconds",
                           TG_FACIL_VERIFY_HELP,
                           sl, NULL, 0);
  pw->nonces = tg_nonce_store_new(1u << 20);
  pw->settle = tg_settleq_new(cfg->instance);
  if (pw->nonces == NULL || pw->settle == NULL || m_cache == NULL || m_verify == NULL ||
      tg_settleq_metrics_init() != 0 || tg_chain_metrics_init() != 0) {
    snprintf(err, errlen, "out of memory");
    tg_paywall_free(pw);
    return -ENOMEM;
  }
  if (pw->any && cfg->redis.host && tg_ratelimit_redis_opts_init(&pw->redis, &cfg->redis, err, errlen) != 0) {
    tg_paywall_free(pw);
    return -EINVAL;
  }
  for (size_t i = 0; i < cfg->ntenants; i++)
    if (pw->conf[i].enabled && pw->conf[i].nrpc == 0)
      tg_log(TG_LOG_WARN,
             "payments without rpc: a queued settlement whose answer was lost cannot be checked on chain, so "
             "one the facilitator then refuses is recorded failed even if the earlier attempt paid (add rpc)",
             "tenant", cfg->tenants[i].name, NULL);
  for (size_t i = 0; i < cfg->ntenants; i++)
    if (pw->conf[i].enabled && pw->conf[i].settle == TG_PAY_SETTLE_ASYNC && cfg->data_dir == NULL) {
      snprintf(err, errlen,
               "tenant %s: payments.settle = \"async\" needs a data_dir (settlements are queued in its log)",
               cfg->tenants[i].name);
      tg_paywall_free(pw);
      return -EINVAL;
    }
  *out = pw;
  return 0;
}

void tg_paywall_free(tg_paywall_t *pw) {
  if (pw == NULL)
    return;
  for (size_t i = 0; pw->conf && i < pw->nconf; i++)
    tg_payconf_free(&pw->conf[i]);
  free(pw->conf);
  if (pw->nonces)
    tg_nonce_store_free(pw->nonces);
  if (pw->settle)
    tg_settleq_free(pw->settle);
  tg_ratelimit_redis_opts_clear(&pw->redis);
  free(pw);
}

bool tg_paywall_enabled(const tg_paywall_t *pw, size_t ti) {
  return pw != NULL && ti < pw->nconf && pw->conf[ti].enabled;
}

int tg_paywall_replay(tg_paywall_t *pw, uint64_t seq, const void *payload, size_t len) {
  return pw ? tg_settleq_replay(pw->settle, seq, payload, len) : 0;
}

size_t tg_paywall_unsettled(const tg_paywall_t *pw) { return pw ? tg_settleq_count(pw->settle) : 0; }

uint64_t tg_paywall_oldest_seq(const tg_paywall_t *pw) { return pw ? tg_settleq_oldest_seq(pw->settle) : 0; }

/* ---- One paid request */

typedef struct pay {
  tg_app_worker_t *aw;
  tg_paywall_worker_t *pww;
  const tg_config_tenant_t *tenant;
  size_t ti;
  const tg_payconf_t *conf;
  tg_http_req_t *http;
  challenge_t *ch;
  size_t idx;                 /* the offered requirement paid for */
  const tg_pay_accept_t *accept;
  tg_x402_payment_t pay;
  uint8_t nonce_key[32];
  bool nonce_local, nonce_redis;
  int64_t valid_before;       /* unix s, clamped */
  tg_policy_settle_t mode;
  char *uri;
  char *fbody;                /* the facilitator request body */
  size_t fbody_len;
  int64_t price;              /* catalog units, for the settlement's gauge and hooks */
  char currency[TG_POLICY_CURRENCY_MAX + 1];
  uint64_t t0;
  char *settle_header;        /* PAYMENT-RESPONSE value, or NULL */
  char request_id[40];        /* a copy: the request is gone when the proxy is done */
  tg_span_t *span;            /* the request's server span (base/trace.h), ended with p; NULL: not traced */
  tg_span_t *sp_step;         /* the open verify, settle or log-append span */
} pay_t;

static void pay_free(pay_t *p) {
  tg_span_finish(&p->sp_step, "abandoned");
  tg_span_finish(&p->span, NULL);
  challenge_unref(p->ch);
  tg_x402_payment_free(&p->pay);
  free(p->uri);
  free(p->fbody);
  free(p->settle_header);
  free(p);
}

/* The header list of every paywall answer: Content-Type, Cache-Control,
 * PAYMENT-REQUIRED (refusals and challenges), PAYMENT-RESPONSE (when known). */
static size_t base_headers(const challenge_t *ch, const char *settle_header, bool with_required,
                           tg_http_header_t h[5]) {
  size_t n = 0;
  h[n++] = (tg_http_header_t){"Content-Type", 12, "application/json", 16};
  h[n++] = (tg_http_header_t){"Cache-Control", 13, "no-store", 8};
  if (with_required && ch)
    h[n++] = (tg_http_header_t){"PAYMENT-REQUIRED", 16, ch->c.header, ch->c.header_len};
  if (settle_header)
    h[n++] = (tg_http_header_t){"PAYMENT-RESPONSE", 16, settle_header, strlen(settle_header)};
  if (settle_header)
    h[n++] = (tg_http_header_t){"X-PAYMENT-RESPONSE", 18, settle_header, strlen(settle_header)};
  return n;
}

/* A refusal: the t402 error body with its status (or status when not 0),
 * the challenge again, and PAYMENT-RESPONSE when a settlement failed. */
static void refuse_with(tg_http_req_t *http, const challenge_t *ch, int status, int code, const char *msg,
                        const char *detail, const char *settle_header) {
  json_t *details = detail ? json_pack("{s:s}", "reason", detail) : NULL;
  size_t len = 0;
  char *body = tg_t402_error_body(code, msg, details, &len);
  tg_http_header_t h[5];
  size_t n = base_headers(ch, settle_header, true, h);
  if (body == NULL) {
    static const char oom[] = "{\"code\":\"T402-2001\",\"message\":\"out of memory\"}";
    tg_http_respond(http, 500, h, n, oom, sizeof oom - 1);
    return;
  }
  tg_http_respond(http, status ? status : tg_t402_status(code), h, n, body, len);
  free(body);
}

static void nonce_release(pay_t *p);

/* Ends p with a refusal. The nonce claim is dropped when release: the
 * authorization was not taken (a definitive no), so the payer may use it
 * again once what was wrong is fixed. */
static void refuse(pay_t *p, int status, int code, const char *msg, const char *detail, bool release) {
  tg_span_set_int(p->span, "http.response.status_code", status ? status : tg_t402_status(code));
  tg_span_set_error(p->span, msg);
  if (release)
    nonce_release(p);
  tg_app_decision(p->tenant->name, false, TG_DECISION_PRICED); /* not served: still priced */
  /* A malformed payment (1xxx) is the client's mistake or a probe: debug, so
   * a flood of them does not flood the log. */
  tg_log_req(code < 2000 ? TG_LOG_DEBUG : TG_LOG_INFO, p->http->request_id, "payment refused", "tenant",
             p->tenant->name, "code",
             tg_t402_code_name(code), "reason", detail ? detail : msg, NULL);
  refuse_with(p->http, p->ch, status, code, msg, detail, p->settle_header);
  pay_free(p);
}

static const char *network_of(const pay_t *p) { return p->accept->network; }

static void observe_verify(const pay_t *p, const char *status) {
  const char *l[] = {network_of(p), "exact", status};
  tg_histogram_observe(m_verify, l, (double)(uv_hrtime() - p->t0) / 1e9);
}

static void count_settlement(const pay_t *p, const char *status) { tg_settle_count(network_of(p), "exact", status); }

/* ---- Serving */

static void on_proxied(void *ud, int err, int status) {
  pay_t *p = ud;
  (void)status;
  p->http = NULL; /* answered by the proxy (or the client left): not to be touched */
  if (err == -ECONNABORTED)
    tg_log_req(TG_LOG_INFO, p->request_id, "paid request: the client left before the answer was complete",
               "tenant", p->tenant->name, NULL);
  else if (err != 0)
    tg_log_req(TG_LOG_WARN, p->request_id, "paid request: the origin failed after the payment", "tenant",
               p->tenant->name, "error", uv_strerror(err), NULL);
  pay_free(p);
}

static void serve(pay_t *p) {
  tg_app_decision(p->tenant->name, false, TG_DECISION_PAID);
  if (p->conf->serve == TG_PAY_SERVE_PROXY) {
    tg_http_header_t extra[2];
    size_t n = 0;
    if (p->settle_header) {
      extra[n++] = (tg_http_header_t){"PAYMENT-RESPONSE", 16, p->settle_header, strlen(p->settle_header)};
      extra[n++] = (tg_http_header_t){"X-PAYMENT-RESPONSE", 18, p->settle_header, strlen(p->settle_header)};
    }
    int rc = tg_proxy_forward(p->pww->proxy, p->http, p->conf->origin, extra, n, on_proxied, p);
    if (rc != 0) {
      /* Paid, and not served: said plainly (the settlement stands). */
      refuse_with(p->http, NULL, 502, 2001, "the origin could not be asked", uv_strerror(rc), p->settle_header);
      pay_free(p);
    }
    return;
  }
  const tg_signer_t *s = &p->aw->app->signers[p->ti];
  tg_buf_t url = {0};
  int64_t expires;
  char why[256] = "";
  tg_span_t *sp = tg_span_start("signer.sign", p->span, TG_SPAN_INTERNAL);
  int src = tg_signer_resource(s, p->uri, (int64_t)time(NULL), &url, &expires, why, sizeof why);
  tg_span_finish(&sp, src != 0 ? "not signed" : NULL);
  tg_span_set_int(p->span, "http.response.status_code", src != 0 ? 500 : 302);
  if (src != 0) {
    tg_buf_free(&url);
    tg_log_req(TG_LOG_ERROR, p->http->request_id, "paid request: the URL could not be signed", "tenant",
               p->tenant->name, "reason", why, NULL);
    refuse_with(p->http, NULL, 500, 2001, "the retrieval URL could not be signed", NULL, p->settle_header);
    pay_free(p);
    return;
  }
  tg_http_header_t h[6];
  size_t n = base_headers(NULL, p->settle_header, false, h);
  h[n++] = (tg_http_header_t){"Location", 8, url.data, url.len};
  json_t *body = json_pack("{s:s, s:s%}", "status", "paid", "location", url.data, url.len);
  char *text = body ? json_dumps(body, JSON_COMPACT) : NULL;
  json_decref(body);
  tg_http_respond(p->http, 302, h, n, text ? text : "{}", text ? strlen(text) : 2);
  free(text);
  tg_buf_free(&url);
  pay_free(p);
}

/* ---- Settlement */

static void on_enqueued(void *ud, int status, const char *id) {
  pay_t *p = ud;
  (void)id;
  tg_span_finish(&p->sp_step, status != 0 ? strerror(status < 0 ? -status : status) : NULL);
  if (status != 0) {
    /* Not durable: nothing is served (the settlement would not be owed by
     * anything that survives a crash). The claim stays: the log may hold it. */
    tg_log_req(TG_LOG_ERROR, p->http->request_id, "paid request: the settlement could not be queued", "tenant",
               p->tenant->name, "error", strerror(status < 0 ? -status : status), NULL);
    refuse_with(p->http, p->ch, 500, 2002, "the settlement queue is unavailable", NULL, NULL);
    pay_free(p);
    return;
  }
  serve(p); /* the queue counted it pending and woke its runner */
}

/* Writes the settlement to the log (durable before anything is served),
 * then serves. tx: a transaction already submitted (pending), or NULL. */
static void enqueue(pay_t *p, const char *tx) {
  if (p->aw->wal == NULL) {
    /* Only a settle the facilitator answered pending gets here (async
     * falls back to sync without a log): the payment was submitted, so the
     * buyer gets what it paid for; nothing will ask the facilitator again. */
    tg_log_req(TG_LOG_WARN, p->http->request_id,
               "settlement pending and no transaction log to follow it up (no data_dir): served", "tenant",
               p->tenant->name, "transaction", tx ? tx : "", NULL);
    serve(p);
    return;
  }
  char payer[43];
  tg_eip3009_format_address(p->pay.auth.from, payer);
  tg_settle_item_t it = {0};
  it.tenant = p->tenant->name;
  it.network = network_of(p);
  it.scheme = "exact";
  it.asset = p->accept->asset_hex;
  it.payer = payer;
  it.amount = p->ch->offers[p->idx].amount;
  it.request = p->fbody;
  it.request_len = p->fbody_len;
  memcpy(it.nonce, p->pay.auth.nonce, 32);
  it.valid_before = p->valid_before;
  it.request_id = p->http->request_id;
  p->sp_step = tg_span_start("settleq.append", p->span, TG_SPAN_INTERNAL);
  it.transaction = tx; /* a settle already submitted: the queue asks the chain before sending again */
  int rc = tg_settleq_enqueue(p->pww->pw->settle, p->aw->wal, &it, on_enqueued, p, NULL);
  if (rc != 0)
    on_enqueued(p, rc, NULL);
}

static void on_settled(const tg_facil_result_t *r, void *ud) {
  pay_t *p = ud;
  tg_span_set_str(p->sp_step, "facilitator.status", tg_facil_status_name(r->status));
  tg_span_finish(&p->sp_step, r->status == TG_FACIL_OK || r->status == TG_FACIL_PENDING ? NULL : "not settled");
  char payer[43];
  tg_eip3009_format_address(p->pay.auth.from, payer);
  switch (r->status) {
  case TG_FACIL_OK:
    count_settlement(p, "settled");
    p->settle_header = tg_x402_settle_header(true, r->transaction, network_of(p), payer, NULL);
    serve(p);
    return;
  case TG_FACIL_PENDING:
    /* Submitted, not final: not a failure. It goes to the durable queue,
     * which asks again, and the content is served. */
    p->settle_header = tg_x402_settle_header(true, r->transaction, network_of(p), payer, NULL);
    enqueue(p, r->transaction[0] ? r->transaction : NULL);
    return;
  case TG_FACIL_REFUSED:
    count_settlement(p, "failed");
    p->settle_header = tg_x402_settle_header(false, "", network_of(p), payer, r->reason[0] ? r->reason : "refused");
    refuse(p, 402, 3002, "settlement failed: nothing was served", r->reason, true);
    return;
  case TG_FACIL_BAD_REPLY:
    count_settlement(p, "failed");
    refuse(p, 502, 2001, "the facilitator answered with something that is not a settlement", r->reason, false);
    return;
  default:
    count_settlement(p, "failed");
    refuse(p, 0, 2006, "no facilitator could settle the payment: nothing was served", r->reason, false);
    return;
  }
}

static void settle_or_queue(pay_t *p) {
  if (p->mode == TG_POLICY_SETTLE_ASYNC) {
    enqueue(p, NULL);
    return;
  }
  tg_facil_pool_t *fp = p->pww->tenants[p->ti].facil;
  char tp[TG_TRACEPARENT_LEN + 1];
  p->sp_step = tg_span_start("facilitator.settle", p->span, TG_SPAN_CLIENT);
  tg_facil_set_traceparent(fp, tg_span_traceparent(p->sp_step, tp) == 0 ? tp : NULL);
  if (tg_facil_settle(fp, p->fbody, p->fbody_len, on_settled, p) != 0)
    refuse(p, 0, 2001, "out of memory", NULL, false);
}

/* ---- Verification */

static void on_verified(const tg_facil_result_t *r, void *ud) {
  pay_t *p = ud;
  tg_span_set_str(p->sp_step, "facilitator.status", tg_facil_status_name(r->status));
  tg_span_finish(&p->sp_step, r->status == TG_FACIL_OK ? NULL : "not verified");
  switch (r->status) {
  case TG_FACIL_OK:
    settle_or_queue(p);
    return;
  case TG_FACIL_REFUSED:
    if (strstr(r->reason, "insufficient") != NULL)
      refuse(p, 0, 3003, "the payer's balance does not cover the amount", r->reason, true);
    else
      refuse(p, 0, 3001, "the facilitator refused the payment", r->reason, true);
    return;
  case TG_FACIL_BUSY:
    refuse(p, 0, 2006, "too many payments are being verified: try again", NULL, true);
    return;
  case TG_FACIL_BAD_REPLY:
    refuse(p, 502, 2001, "the facilitator answered with something that is not a verification", r->reason, true);
    return;
  default:
    refuse(p, 0, 2006, "no facilitator could verify the payment: nothing was served", r->reason, true);
    return;
  }
}

static void on_chain(int err, const tg_chain_state_t *st, void *ud) {
  pay_t *p = ud;
  tg_span_finish(&p->sp_step, err != 0 ? "chain unavailable" : NULL);
  if (err != 0) {
    observe_verify(p, "error");
    refuse(p, 0, 2004, "the chain could not be asked about the payment", strerror(err < 0 ? -err : err), true);
    return;
  }
  if (st->nonce_used) {
    observe_verify(p, "invalid");
    refuse(p, 0, 3006, "this authorization was already used", NULL, false);
    return;
  }
  if (tg_u256_cmp(st->balance, p->pay.auth.value) < 0) {
    observe_verify(p, "invalid");
    refuse(p, 0, 3003, "the payer's balance does not cover the amount", NULL, true);
    return;
  }
  observe_verify(p, "valid");
  settle_or_queue(p);
}

static void verify(pay_t *p) {
  pw_tenant_t *t = &p->pww->tenants[p->ti];
  int rc;
  char tp[TG_TRACEPARENT_LEN + 1];
  p->sp_step = tg_span_start(p->conf->verify == TG_PAY_VERIFY_LOCAL ? "chain.check" : "facilitator.verify",
                             p->span, TG_SPAN_CLIENT);
  if (p->conf->verify != TG_PAY_VERIFY_LOCAL)
    tg_facil_set_traceparent(t->facil, tg_span_traceparent(p->sp_step, tp) == 0 ? tp : NULL);
  if (p->conf->verify == TG_PAY_VERIFY_LOCAL)
    rc = tg_chain_check(t->chain, p->accept->chain_id, p->accept->asset, p->pay.auth.from, p->pay.auth.nonce,
                        on_chain, p);
  else
    rc = tg_facil_verify(t->facil, p->pay.hash, p->fbody, p->fbody_len, on_verified, p);
  if (rc != 0)
    refuse(p, 0, 2001, "out of memory", NULL, true);
}

/* ---- Replay protection */

static void released(int status, void *ud) {
  (void)ud;
  if (status != 0 && status != -ENOENT && status != -ECANCELED)
    tg_log(TG_LOG_WARN, "payment: a nonce claim could not be dropped in Redis (it expires at validBefore)",
           "error", strerror(-status), NULL);
}

static void nonce_release(pay_t *p) {
  if (p->nonce_local)
    tg_nonce_release(p->pww->pw->nonces, p->nonce_key);
  p->nonce_local = false;
  if (p->nonce_redis && p->pww->nonce_redis)
    tg_nonce_redis_release(p->pww->nonce_redis, p->nonce_key, released, NULL);
  p->nonce_redis = false;
}

static void on_redis_claim(int status, void *ud) {
  pay_t *p = ud;
  if (status == -EEXIST) {
    /* Another instance holds it: this instance's own claim goes (the
     * shared one is the other's), then the refusal ends p. */
    tg_nonce_release(p->pww->pw->nonces, p->nonce_key);
    p->nonce_local = false;
    refuse(p, 0, 3006, "this authorization was already presented", NULL, false);
    return;
  }
  if (status != 0) {
    /* Fails closed: without the shared claim two instances could each serve
     * the same authorization. */
    refuse(p, 0, 2003, "the replay store (Redis) is unavailable", NULL, true);
    return;
  }
  p->nonce_redis = true;
  verify(p);
}

static void claim(pay_t *p) {
  tg_nonce_key(network_of(p), p->accept->asset, p->pay.auth.from, p->pay.auth.nonce, p->nonce_key);
  int rc = tg_nonce_claim(p->pww->pw->nonces, p->nonce_key, p->valid_before, (int64_t)time(NULL));
  if (rc == -EEXIST) {
    refuse(p, 0, 3006, "this authorization was already presented", NULL, false);
    return;
  }
  if (rc == -EINVAL) {
    refuse(p, 0, 1011, "the authorization has expired", NULL, false);
    return;
  }
  if (rc != 0) {
    refuse(p, 0, 2006, "the replay store is full: try again", NULL, false);
    return;
  }
  p->nonce_local = true;
  if (p->pww->nonce_redis == NULL) {
    verify(p);
    return;
  }
  if (tg_nonce_redis_claim(p->pww->nonce_redis, p->nonce_key, p->valid_before * 1000, on_redis_claim, p) != 0)
    refuse(p, 0, 2003, "the replay store (Redis) is unavailable", NULL, true);
}

/* ---- The challenge cache */

/* The challenge of (tenant, policy version, price, resource URL): from the
 * worker's cache, or built and cached. A new reference; NULL when the price
 * is in no accepted currency (*none set) or out of memory. */
static challenge_t *challenge_get(tg_paywall_worker_t *pww, size_t ti, const tg_payconf_t *conf,
                                  const char *version, const tg_quote_offer_t *offer, const char *uri,
                                  bool *none) {
  *none = false;
  /* Found without allocating: the unpaid 402 is the hottest path. */
  uint64_t h = fnv1a(1469598103934665603ull, uri, strlen(uri));
  h = fnv1a(h, version, strlen(version));
  h = fnv1a(h, offer->currency, strlen(offer->currency));
  h ^= (uint64_t)offer->amount * 0x9e3779b97f4a7c15ull ^ (uint64_t)ti;
  challenge_t **slot = pww->cache[h % CACHE_SLOTS];
  for (unsigned w = 0; w < CACHE_WAYS; w++)
    if (slot[w] && slot[w]->hash == h && slot[w]->ti == ti && slot[w]->amount == offer->amount &&
        strcmp(slot[w]->uri, uri) == 0 && strcmp(slot[w]->version, version) == 0 &&
        strcmp(slot[w]->currency, offer->currency) == 0) {
      static const char *const hit[] = {"hit"};
      tg_counter_add(m_cache, hit, 1);
      slot[w]->refs++;
      return slot[w];
    }
  static const char *const miss[] = {"miss"};
  tg_counter_add(m_cache, miss, 1);
  challenge_t *c = calloc(1, sizeof *c);
  if (c == NULL || (c->uri = strdup(uri)) == NULL) {
    free(c);
    return NULL;
  }
  size_t n = 0;
  for (size_t i = 0; i < conf->naccepts; i++) {
    const tg_pay_accept_t *a = &conf->accepts[i];
    if (tg_pay_amount(a, offer->amount, offer->currency, c->offers[n].amount) == 0)
      c->offers[n++].accept = a;
  }
  if (n == 0) {
    *none = true;
    free(c->uri);
    free(c);
    return NULL;
  }
  tg_x402_resource_t res = {uri, conf->description, conf->mime_type};
  if (tg_x402_challenge_build(&res, c->offers, n, "payment required", &c->c) != 0) {
    free(c->uri);
    free(c);
    return NULL;
  }
  c->hash = h;
  c->ti = ti;
  c->amount = offer->amount;
  snprintf(c->version, sizeof c->version, "%s", version);
  snprintf(c->currency, sizeof c->currency, "%s", offer->currency);
  c->refs = 2; /* the cache's and the caller's */
  unsigned w = 0;
  while (w < CACHE_WAYS && slot[w] != NULL)
    w++;
  if (w == CACHE_WAYS) {
    w = pww->evict++ % CACHE_WAYS;
    challenge_unref(slot[w]);
  }
  slot[w] = c;
  return c;
}

/* ---- The entry */

/* Clock skew and signing delay allowed past maxTimeoutSeconds. */
#define VALID_BEFORE_SLACK_S 300

/* A uint256 of seconds as int64, clamped to year 2^33-ish (never overflows
 * when multiplied by 1000). */
static int64_t u256_to_s(const uint8_t v[32]) {
  for (int i = 0; i < 24; i++)
    if (v[i])
      return INT64_C(1) << 40;
  uint64_t x = 0;
  for (int i = 24; i < 32; i++)
    x = x << 8 | v[i];
  return x > (UINT64_C(1) << 40) ? INT64_C(1) << 40 : (int64_t)x;
}

static const tg_http_header_t *payment_header(tg_http_req_t *req, bool *v1) {
  const tg_http_header_t *h = tg_http_req_header(req, "PAYMENT-SIGNATURE");
  *v1 = false;
  if (h == NULL && (h = tg_http_req_header(req, "X-PAYMENT")) != NULL)
    *v1 = true;
  return h;
}

void tg_paywall_priced(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req,
                       tg_policy_state_t *st, const tg_view_t *view, const tg_quote_offer_t *offer,
                       tg_span_t *span) {
  tg_paywall_worker_t *pww = aw->pay;
  tg_paywall_t *pw = pww->pw;
  size_t ti = tg_app_tenant_index(aw->app, tenant);
  const tg_payconf_t *conf = &pw->conf[ti];
  bool none;
  challenge_t *ch = challenge_get(pww, ti, conf, tg_policy_state_version(st), offer, view->uri, &none);
  if (ch == NULL) {
    if (none) {
      tg_app_decision(tenant->name, false, TG_DECISION_NOT_FOR_SALE);
      tg_log_req(TG_LOG_WARN, req->request_id, "priced in a currency no accepted asset is sold for", "tenant",
                 tenant->name, "currency", offer->currency, NULL);
      refuse_with(req, NULL, 403, 1005, "the price's currency is not one the accepted assets are sold for",
                  offer->currency, NULL);
    } else {
      refuse_with(req, NULL, 500, 2001, "out of memory", NULL, NULL);
    }
    tg_span_finish(&span, none ? "currency not sold" : "out of memory");
    return;
  }
  bool v1;
  const tg_http_header_t *ph = payment_header(req, &v1);
  /* The access log's note (net/server.h): the price quoted or paid. */
  req->note.priced = true;
  req->note.price = offer->amount;
  snprintf(req->note.currency, sizeof req->note.currency, "%s", offer->currency);
  if (ph == NULL) {
    tg_app_decision(tenant->name, false, TG_DECISION_PRICED);
    tg_http_header_t h[5];
    size_t n = base_headers(ch, NULL, true, h);
    tg_http_respond(req, 402, h, n, ch->c.body_v1, ch->c.body_v1_len);
    challenge_unref(ch);
    tg_span_set_int(span, "http.response.status_code", 402);
    tg_span_finish(&span, NULL);
    return;
  }
  pay_t *p = calloc(1, sizeof *p);
  if (p == NULL) {
    refuse_with(req, ch, 500, 2001, "out of memory", NULL, NULL);
    challenge_unref(ch);
    tg_span_finish(&span, "out of memory");
    return;
  }
  p->span = span;
  p->aw = aw;
  p->pww = pww;
  p->tenant = tenant;
  p->ti = ti;
  p->conf = conf;
  p->http = req;
  snprintf(p->request_id, sizeof p->request_id, "%s", req->request_id);
  p->ch = ch;
  p->t0 = uv_hrtime();
  p->price = offer->amount;
  snprintf(p->currency, sizeof p->currency, "%s", offer->currency);
  char why[256] = "";
  int code = tg_x402_payment_decode(ph->value, ph->value_len, v1, &p->pay, why, sizeof why);
  if (code != 0) {
    refuse(p, 0, code, "the payment header is not a valid payment", why, false);
    return;
  }
  {
    char from[43];
    tg_eip3009_format_address(p->pay.auth.from, from); /* logged shortened: 0x1234…abcd */
    snprintf(req->note.payer, sizeof req->note.payer, "%.6s\xe2\x80\xa6%s", from, from + 38);
  }
  if ((code = tg_x402_payment_match(&p->pay, &ch->c, &p->idx)) != 0) {
    refuse(p, 0, code, "the payment is not for a requirement this resource offers", NULL, false);
    return;
  }
  p->accept = ch->offers[p->idx].accept;
  if (tg_x402_check_local(&p->pay, p->accept, ch->offers[p->idx].amount, (int64_t)time(NULL), &code) != 0) {
    observe_verify(p, "invalid");
    refuse(p, 0, code, "the payment does not pay this requirement", NULL, false);
    return;
  }
  /* Clients sign validBefore = now + maxTimeoutSeconds. Much later is
   * refused: the claim is kept until then, and a far-future one would pin
   * the replay store (and Redis) for as long. */
  int64_t now = (int64_t)time(NULL);
  p->valid_before = u256_to_s(p->pay.auth.valid_before);
  if (p->valid_before > now + (int64_t)p->accept->max_timeout_s + VALID_BEFORE_SLACK_S) {
    refuse(p, 0, 1011, "validBefore is further away than the requirement's maxTimeoutSeconds allows", NULL, false);
    return;
  }
  if ((p->uri = strdup(view->uri)) == NULL ||
      (p->fbody = tg_x402_facilitator_body(&p->pay, &ch->c, p->idx, &p->fbody_len)) == NULL) {
    refuse(p, 0, 2001, "out of memory", NULL, false);
    return;
  }
  /* The policy's choice: settle, then serve; or serve, then settle. An error
   * is sync, the choice that never serves unpaid content. */
  char payer[43];
  tg_eip3009_format_address(p->pay.auth.from, payer);
  tg_policy_sale_t sale = {offer->amount, offer->currency, network_of(p), p->accept->asset_hex, payer, "exact"};
  tg_policy_error_t perr;
  tg_policy_settle_t dflt = conf->settle == TG_PAY_SETTLE_ASYNC ? TG_POLICY_SETTLE_ASYNC : TG_POLICY_SETTLE_SYNC;
  tg_span_t *sp = tg_span_start("policy.settle", p->span, TG_SPAN_INTERNAL);
  int rc = tg_policy_settle(st, &view->req, &sale, dflt, &p->mode, &perr);
  tg_span_finish(&sp, rc != 0 && rc != TG_POLICY_ERR_NOHOOK ? "policy error" : NULL);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK)
    p->mode = TG_POLICY_SETTLE_SYNC;
  /* "async" needs the log as its queue: without a data_dir the hook's choice
   * becomes sync (start-up refuses payments.settle = "async" without one). */
  if (p->mode == TG_POLICY_SETTLE_ASYNC && aw->wal == NULL)
    p->mode = TG_POLICY_SETTLE_SYNC;
  claim(p);
}

/* ---- The settlement runner's hooks (worker 0) */

static long tenant_by_name(const tg_app_t *app, const char *name) {
  for (size_t i = 0; i < app->cfg->ntenants; i++)
    if (strcmp(app->cfg->tenants[i].name, name) == 0)
      return (long)i;
  return -1;
}

typedef struct sent {
  tg_settle_done_cb done;
  void *arg;
} sent_t;

static void on_runner_settled(const tg_facil_result_t *r, void *ud) {
  sent_t *s = ud;
  tg_settle_result_t res = {TG_SETTLE_RETRY, r->transaction[0] ? r->transaction : NULL,
                            r->reason[0] ? r->reason : tg_facil_status_name(r->status), r->facilitator};
  if (r->status == TG_FACIL_OK)
    res.status = TG_SETTLE_OK;
  else if (r->status == TG_FACIL_PENDING)
    res.status = TG_SETTLE_PENDING;
  else if (r->status == TG_FACIL_REFUSED)
    res.status = TG_SETTLE_REFUSED;
  s->done(s->arg, &res);
  free(s);
}

/* Sends a queued settlement through its tenant's facilitator pool on this
 * worker. A tenant no longer configured for payments cannot be settled
 * here: retried (it stays owed, and visible, until configured again). */
static void runner_send(void *ud, const tg_settle_item_t *item, tg_settle_done_cb done, void *arg) {
  tg_app_worker_t *aw = ud;
  long ti = tenant_by_name(aw->app, item->tenant);
  tg_settle_result_t retry = {TG_SETTLE_RETRY, NULL, "the tenant takes no payments in this configuration", NULL};
  if (ti < 0 || aw->pay->tenants[ti].facil == NULL) {
    done(arg, &retry);
    return;
  }
  sent_t *s = malloc(sizeof *s);
  if (s == NULL) {
    retry.reason = "out of memory";
    done(arg, &retry);
    return;
  }
  *s = (sent_t){done, arg};
  if (tg_facil_settle(aw->pay->tenants[ti].facil, item->request, item->request_len, on_runner_settled, s) != 0) {
    free(s);
    retry.reason = "the facilitator pool refused the call";
    done(arg, &retry);
  }
}

typedef struct probed {
  tg_settle_probe_cb done;
  void *arg;
} probed_t;

static void on_runner_probed(int err, const tg_chain_state_t *st, void *ud) {
  probed_t *q = ud;
  q->done(q->arg, err, err == 0 && st->nonce_used);
  free(q);
}

/* Asks the tenant's JSON-RPC providers whether the authorization was used
 * (an attempt before a crash may have settled it). */
static void runner_probe(void *ud, const tg_settle_item_t *item, tg_settle_probe_cb done, void *arg) {
  tg_app_worker_t *aw = ud;
  long ti = tenant_by_name(aw->app, item->tenant);
  const tg_payconf_t *c = ti < 0 ? NULL : &aw->app->pay->conf[ti];
  const tg_pay_accept_t *a = NULL;
  for (size_t i = 0; c && i < c->naccepts && a == NULL; i++)
    if (strcmp(c->accepts[i].network, item->network) == 0 && strcasecmp(c->accepts[i].asset_hex, item->asset) == 0)
      a = &c->accepts[i];
  uint8_t from[20];
  probed_t *q = NULL;
  if (a == NULL || aw->pay->tenants[ti].chain == NULL || tg_eip3009_parse_address(item->payer, from) != 0 ||
      (q = malloc(sizeof *q)) == NULL) {
    done(arg, -ENOENT, false);
    return;
  }
  *q = (probed_t){done, arg};
  if (tg_chain_check_fresh(aw->pay->tenants[ti].chain, a->chain_id, a->asset, from, item->nonce, on_runner_probed,
                           q) != 0) {
    free(q);
    done(arg, -ENOMEM, false);
  }
}

/* A settlement failed for good (logged and counted by the queue): the
 * tenant's on_settle_failure hook is told; it cannot change the outcome. */
static void runner_failed(void *ud, const tg_settle_item_t *item, const char *reason) {
  tg_app_worker_t *aw = ud; /* the queue has logged and counted it */
  tg_policy_state_t *st = tg_policy_acquire(aw->policy, item->tenant);
  if (st == NULL)
    return;
  tg_policy_txn_t txn = {0};
  txn.id = item->id;
  txn.tenant = item->tenant;
  int64_t amount = 0; /* the asset's atomic units; an amount past 2^53 is not a Lua integer: 0 */
  if (tg_money_parse(item->amount, strlen(item->amount), &amount, NULL, 0) == 0)
    txn.amount = amount;
  txn.reason = reason ? reason : "refused";
  txn.attempts = item->attempts;
  txn.request_id = item->request_id ? item->request_id : "";
  txn.network = item->network;
  txn.payer = item->payer;
  txn.error = reason;
  tg_policy_error_t perr;
  (void)tg_policy_on_settle_failure(st, &txn, &perr);
  tg_policy_release(st);
}

/* ---- Worker start and stop */

int tg_paywall_worker_start(tg_app_worker_t *aw, char *err, size_t errlen) {
  tg_app_t *app = aw->app;
  tg_paywall_t *pw = app->pay;
  if (pw == NULL || !pw->any)
    return 0;
  tg_paywall_worker_t *pww = calloc(1, sizeof *pww);
  if (pww == NULL || (pww->tenants = calloc(app->cfg->ntenants, sizeof *pww->tenants)) == NULL) {
    free(pww);
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  pww->pw = pw;
  aw->pay = pww;
  uv_loop_t *loop = aw->worker->loop;
  bool proxy = false;
  for (size_t i = 0; i < app->cfg->ntenants; i++) {
    const tg_payconf_t *c = &pw->conf[i];
    if (!c->enabled)
      continue;
    tg_facil_opts_t fo = {0};
    fo.timeout_ms = c->facilitator_timeout_ms;
    fo.max_verifying = c->max_verifying;
    fo.verify_wait_ms = c->verify_wait_ms;
    fo.cache_ttl_ms = c->verify_cache_ttl_ms;
    pww->tenants[i].facil = tg_facil_pool_new(loop, aw->httpc, app->cfg->tenants[i].name,
                                              (const char *const *)c->facilitators, c->nfacilitators, &fo);
    if (pww->tenants[i].facil == NULL) {
      snprintf(err, errlen, "tenant %s: cannot create the facilitator pool", app->cfg->tenants[i].name);
      return -ENOMEM;
    }
    if (c->nrpc > 0) {
      tg_chain_opts_t co = {0};
      pww->tenants[i].chain = tg_chain_pool_new(loop, aw->httpc, (const char *const *)c->rpc, c->nrpc, &co);
      if (pww->tenants[i].chain == NULL) {
        snprintf(err, errlen, "tenant %s: cannot create the JSON-RPC pool", app->cfg->tenants[i].name);
        return -ENOMEM;
      }
    }
    if (c->serve == TG_PAY_SERVE_PROXY)
      proxy = true;
  }
  if (proxy && (pww->proxy = tg_proxy_new(loop, NULL)) == NULL) {
    snprintf(err, errlen, "cannot create the reverse proxy");
    return -ENOMEM;
  }
  if (pw->redis.host) {
    tg_nonce_redis_opts_t no = {pw->redis.host, pw->redis.port, pw->redis.password, pw->redis.db,
                                pw->redis.timeout_ms, app->cfg->instance};
    int rc = tg_nonce_redis_new(loop, &no, &pww->nonce_redis, err, errlen);
    if (rc != 0)
      return rc;
  }
  if (aw->worker->id == 0 && aw->wal) {
    tg_settleq_hooks_t hooks = {runner_send, runner_probe, runner_failed, aw};
    int rc = tg_settleq_runner_new(pw->settle, loop, aw->wal, &hooks, NULL, &pww->runner);
    if (rc != 0) {
      snprintf(err, errlen, "cannot start the settlement queue: %s", strerror(-rc));
      return rc;
    }
  }
  return 0;
}

void tg_paywall_worker_stop(tg_app_worker_t *aw) {
  tg_paywall_worker_t *pww = aw->pay;
  if (pww == NULL)
    return;
  tg_settleq_runner_free(pww->runner);
  if (pww->nonce_redis)
    tg_nonce_redis_free(pww->nonce_redis);
  if (pww->proxy)
    tg_proxy_free(pww->proxy);
  for (size_t i = 0; pww->tenants && i < aw->app->cfg->ntenants; i++) {
    if (pww->tenants[i].facil)
      tg_facil_pool_free(pww->tenants[i].facil);
    if (pww->tenants[i].chain)
      tg_chain_pool_free(pww->tenants[i].chain);
  }
  free(pww->tenants);
  for (unsigned s = 0; s < CACHE_SLOTS; s++)
    for (unsigned w = 0; w < CACHE_WAYS; w++)
      challenge_unref(pww->cache[s][w]);
  free(pww);
  aw->pay = NULL;
}
