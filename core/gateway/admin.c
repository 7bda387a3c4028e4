#include "gateway/admin.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>
#include <llhttp.h>

#include "base/log.h"
#include "base/metrics.h"
#include "base/utf8.h"
#include "gateway/reload.h"
#include "ledger/record.h"
#include "pipeline/paywall.h"

/* Compares in time independent of where the first difference is. */
static int token_equal(const char *a, size_t alen, const char *b, size_t blen) {
  unsigned char d = alen != blen;
  size_t n = alen < blen ? alen : blen;
  for (size_t i = 0; i < n; i++)
    d |= (unsigned char)(a[i] ^ b[i]);
  return d == 0;
}

static int authorized(const tg_admin_t *a, tg_http_req_t *req) {
  const tg_http_header_t *h = tg_http_req_header(req, "authorization");
  if (a->token_len == 0 || h == NULL || h->value_len < 7 || strncasecmp(h->value, "Bearer ", 7) != 0)
    return 0;
  const char *tok = h->value + 7;
  size_t len = h->value_len - 7;
  while (len && *tok == ' ')
    tok++, len--;
  return token_equal(tok, len, a->token, a->token_len);
}

/* The value of ?name= into out: 1 found, 2 given bare (?name, no '='), 0
 * absent, -1 malformed (empty, too long, or other characters than a tenant
 * name's). */
static int query_param(const char *query, const char *name, char *out, size_t outlen) {
  size_t klen = strlen(name);
  for (const char *p = query; p && *p; p += strcspn(p, "&"), p += *p == '&') {
    if (strncmp(p, name, klen) != 0)
      continue;
    if (p[klen] == '\0' || p[klen] == '&')
      return 2;
    if (p[klen] != '=')
      continue;
    const char *v = p + klen + 1;
    size_t n = strcspn(v, "&");
    if (n == 0 || n >= outlen)
      return -1;
    for (size_t i = 0; i < n; i++) {
      char c = v[i];
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
            c == '_' || c == '.'))
        return -1;
    }
    memcpy(out, v, n);
    out[n] = '\0';
    return 1;
  }
  return 0;
}

static int tenant_param(const char *query, char *out, size_t outlen) {
  int has = query_param(query, "tenant", out, outlen);
  return has == 2 ? -1 : has;
}

/* ?dry_run=1|true and a bare ?dry_run (1), absent or 0|false (0), anything
 * else -1: a request that meant to only validate must never swap. */
static int dry_run_param(const char *query) {
  char v[8];
  int has = query_param(query, "dry_run", v, sizeof v);
  if (has == 0)
    return 0;
  if (has == 2)
    return 1;
  if (has > 0 && (strcmp(v, "1") == 0 || strcmp(v, "true") == 0))
    return 1;
  if (has > 0 && (strcmp(v, "0") == 0 || strcmp(v, "false") == 0))
    return 0;
  return -1;
}

/* The first query parameter not named in known (NULL-terminated) into
 * out, or "" when every one is known: /reload refuses a typo such as
 * ?dryrun=1 rather than reloading for real. */
static void unknown_param(const char *query, const char *const *known, char *out, size_t outlen) {
  out[0] = '\0';
  for (const char *p = query; p && *p; p += strcspn(p, "&"), p += *p == '&') {
    size_t n = strcspn(p, "=&");
    bool ok = n == 0; /* an empty piece ("a&&b") names nothing */
    for (size_t k = 0; known[k] && !ok; k++)
      ok = strlen(known[k]) == n && strncmp(p, known[k], n) == 0;
    if (!ok) {
      size_t m = 0;
      for (size_t i = 0; i < n && m + 1 < outlen; i++) /* shown safely: printable ASCII only */
        out[m++] = p[i] >= 0x20 && p[i] < 0x7f && p[i] != '"' && p[i] != '\\' ? p[i] : '?';
      out[m] = '\0';
      if (m == 0 && outlen > 1)
        out[0] = '?', out[1] = '\0';
      return;
    }
  }
}

static void error_json(tg_http_req_t *req, int status, const char *msg) {
  tg_http_respond_json(req, status, json_pack("{s:s}", "error", msg));
}

static void only_post(tg_http_req_t *req) {
  static const char body[] = "{\"error\":\"use POST\"}";
  tg_http_header_t h[2] = {{"Allow", 5, "POST", 4}, {"Content-Type", 12, "application/json", 16}};
  tg_http_respond(req, 405, h, 2, body, sizeof body - 1);
}

static void metrics(tg_http_req_t *req) {
  tg_buf_t b = {0};
  if (tg_metrics_render(&b) != 0) {
    tg_buf_free(&b);
    error_json(req, 500, "metrics unavailable");
    return;
  }
  tg_http_respond_simple(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
  tg_buf_free(&b);
}

/* The tenant's catalog ingestion, with the detail /readyz leaves out. */
static json_t *catalog_status(const tg_admin_t *a, size_t i) {
  tg_ingest_status_t st;
  if (a->ingest == NULL || tg_ingest_status(a->ingest, i, &st) != 0 || !st.has_source)
    return json_null();
  json_t *o = json_pack("{s:b, s:b, s:I, s:I, s:I, s:I}", "loaded", st.loaded, "failing", st.failing,
                        "last_success", (json_int_t)st.last_success, "attempts", (json_int_t)st.attempts,
                        "entries", (json_int_t)st.entries, "warnings", (json_int_t)st.warnings);
  if (o && st.last_error[0])
    json_object_set_new(o, "last_error", tg_utf8_json_string(st.last_error));
  return o ? o : json_null();
}

static json_t *shown_version(const char *version) {
  return version[0] ? json_stringn(version, strnlen(version, TG_POLICY_VERSION_SHOWN)) : json_null();
}

static const char *const attempt_names[] = {"unchanged", "ok", "error"};

/* A tenant's policy in /status: the live version, its last reload attempt,
 * and the file on disk now (hashed here: on the thread pool). */
static json_t *policy_status(tg_policy_registry_t *reg, size_t i, const tg_policy_info_t *info) {
  json_t *last = json_null();
  if (info->reloaded) {
    last = json_pack("{s:s, s:f, s:o}", "result", attempt_names[info->last_status], "at",
                     info->last_at, "version", shown_version(info->last_version));
    if (last && info->last_error[0])
      json_object_set_new(last, "error", tg_utf8_json_string(info->last_error));
  }
  bool differs = false;
  char disk[TG_POLICY_VERSION_LEN] = "", why[TG_POLICY_MSG_LEN] = "";
  tg_policy_file_state(reg, i, &differs, disk, why, sizeof why);
  json_t *o = json_pack("{s:o, s:o, s:f, s:o*, s:o, s:b}", "file",
                        info->path[0] ? tg_utf8_json_string(info->path) : json_null(), "version",
                        shown_version(info->version), "loaded_at", info->loaded_at, "last_reload",
                        last, "file_version", shown_version(disk), "file_differs", differs);
  if (o && why[0])
    json_object_set_new(o, "file_error", tg_utf8_json_string(why));
  return o;
}

typedef struct status_job {
  uv_work_t work;
  const tg_admin_t *admin;
  tg_http_req_t *req;
  json_t *policies;             /* one per tenant, in configuration order */
} status_job_t;

static void status_work(uv_work_t *w) {
  status_job_t *j = w->data;
  tg_policy_registry_t *reg = j->admin->app->policies;
  j->policies = json_array();
  size_t np = tg_policy_count(reg);
  for (size_t i = 0; i < np; i++) {
    tg_policy_info_t info;
    if (tg_policy_info(reg, i, &info) != 0)
      continue;
    json_array_append_new(j->policies, json_pack("{s:s, s:o*}", "name", info.tenant, "policy",
                                                 policy_status(reg, i, &info)));
  }
}

static void status_done(uv_work_t *w, int rc) {
  status_job_t *j = w->data;
  const tg_admin_t *a = j->admin;
  if (rc != 0 || j->policies == NULL) {
    json_decref(j->policies);
    error_json(j->req, 500, "status did not run");
    free(j);
    return;
  }
  size_t i;
  json_t *t;
  json_array_foreach(j->policies, i, t) {
    json_object_set_new(t, "catalog", catalog_status(a, i));
  }
  json_t *body = json_pack("{s:s, s:I, s:b, s:I, s:o}", "version", a->version, "uptime_s",
                           (json_int_t)(time(NULL) - a->started_at), "ready",
                           tg_readiness_serving(a->readiness), "policy_generation",
                           (json_int_t)tg_policy_generation(a->app->policies), "tenants",
                           j->policies);
  tg_http_respond_json(j->req, 200, body);
  free(j);
}

/* Hashing every policy file is disk work: done off the worker's loop. */
static void status(const tg_admin_t *a, tg_http_req_t *req) {
  status_job_t *j = calloc(1, sizeof *j);
  if (j == NULL) {
    error_json(req, 503, "out of memory");
    return;
  }
  j->admin = a;
  j->req = req;
  j->work.data = j;
  if (uv_queue_work(req->worker->loop, &j->work, status_work, status_done) != 0) {
    free(j);
    error_json(req, 503, "cannot schedule the status");
  }
}

static void refresh(const tg_admin_t *a, tg_http_req_t *req) {
  char tenant[65];
  int has = tenant_param(req->query, tenant, sizeof tenant);
  int rc = has < 0 || a->ingest == NULL ? -ENOENT : tg_ingest_refresh(a->ingest, has ? tenant : NULL);
  if (rc == 0)
    tg_http_respond_json(req, 202, json_pack("{s:s}", "refresh", "started"));
  else
    error_json(req, 404, "unknown tenant or no catalog source");
}

/* ---- Tenants: the list, per-tenant reloads, and the drain */

/* Index of the tenant named by the n bytes at name, or -1. */
static long tenant_index(const tg_admin_t *a, const char *name, size_t n) {
  const tg_config_t *cfg = a->app->cfg;
  for (size_t i = 0; i < cfg->ntenants; i++)
    if (strlen(cfg->tenants[i].name) == n && strncmp(cfg->tenants[i].name, name, n) == 0)
      return (long)i;
  return -1;
}

static json_t *tenant_billing(const tg_admin_t *a, size_t i) {
  tg_app_billing_health_t h;
  tg_app_billing_health(a->app, i, &h);
  if (!h.configured)
    return json_pack("{s:s}", "type", "builtin");
  /* The health probes' view: the adapter opens its circuit after
   * breaker_failures failures in a row (billing/billconf.h). */
  const char *bf = tg_config_get(&a->app->cfg->tenants[i].billing, "breaker_failures");
  long limit = bf ? strtol(bf, NULL, 10) : 5;
  if (limit <= 0)
    limit = 5;
  return json_pack("{s:s, s:b, s:I, s:s, s:b}", "type", "remote", "serving", h.serving,
                   "consecutive_failures", (json_int_t)h.consecutive_failures, "circuit",
                   h.consecutive_failures >= (uint32_t)limit ? "open" : "closed", "rejects_on_timeout",
                   h.rejects);
}

static json_t *tenant_catalog(const tg_admin_t *a, size_t i) {
  tg_ingest_status_t st;
  if (a->ingest == NULL || tg_ingest_status(a->ingest, i, &st) != 0 || !st.has_source)
    return json_null();
  json_t *o = json_pack("{s:b, s:b, s:I, s:o}", "loaded", st.loaded, "failing", st.failing, "entries",
                        (json_int_t)st.entries, "age_s",
                        st.last_success ? json_integer((json_int_t)(time(NULL) - st.last_success)) : json_null());
  if (o && st.last_error[0])
    json_object_set_new(o, "last_error", tg_utf8_json_string(st.last_error));
  return o ? o : json_null();
}

/* GET /admin/tenants: what each tenant runs now. No file is read. */
static void tenants_list(const tg_admin_t *a, tg_http_req_t *req) {
  const tg_config_t *cfg = a->app->cfg;
  json_t *list = json_array();
  for (size_t i = 0; list && i < cfg->ntenants; i++) {
    const tg_config_tenant_t *t = &cfg->tenants[i];
    json_t *hosts = json_array();
    for (size_t k = 0; k < t->nhosts; k++)
      json_array_append_new(hosts, json_string(t->hosts[k]));
    json_t *policy = json_null();
    tg_policy_info_t info;
    if (tg_policy_info(a->app->policies, i, &info) == 0) {
      policy = json_pack("{s:o, s:f}", "version", shown_version(info.version), "loaded_at", info.loaded_at);
      if (policy && info.reloaded && info.last_status == TG_POLICY_RELOAD_FAILED && info.last_error[0])
        json_object_set_new(policy, "last_error", tg_utf8_json_string(info.last_error));
    }
    json_array_append_new(list, json_pack("{s:s, s:o, s:o*, s:o, s:o, s:b}", "name", t->name, "hosts", hosts,
                                          "policy", policy, "catalog", tenant_catalog(a, i), "billing",
                                          tenant_billing(a, i), "payments_enabled",
                                          a->app->pay != NULL && tg_paywall_enabled(a->app->pay, i)));
  }
  tg_http_respond_json(req, 200, json_pack("{s:o}", "tenants", list));
}

/* POST /admin/tenants/NAME/reload-policy | reload-catalog: the reload and
 * the catalog refresh that /reload and /catalog/refresh run, for one tenant. */
static void tenant_action(const tg_admin_t *a, tg_http_req_t *req, const char *rest) {
  const char *slash = strchr(rest, '/');
  long i = slash ? tenant_index(a, rest, (size_t)(slash - rest)) : -1;
  if (i < 0) {
    error_json(req, 404, slash ? "unknown tenant" : "not found");
    return;
  }
  const char *name = a->app->cfg->tenants[i].name;
  if (strcmp(slash, "/reload-policy") != 0 && strcmp(slash, "/reload-catalog") != 0) {
    error_json(req, 404, "not found (reload-policy, reload-catalog)");
  } else if (req->method != HTTP_POST) {
    only_post(req);
  } else if (strcmp(slash, "/reload-policy") == 0) {
    tg_reload_respond(a->app->policies, req, name, 0);
  } else if (a->ingest == NULL || tg_ingest_refresh(a->ingest, name) != 0) {
    error_json(req, 409, "the tenant has no catalog source");
  } else {
    tg_http_respond_json(req, 202, json_pack("{s:s, s:s}", "tenant", name, "refresh", "started"));
  }
}

static void drain_timer_close(tg_admin_t *a) {
  if (a->drain_loop == NULL)
    return;
  a->drain_loop = NULL;
  uv_close((uv_handle_t *)&a->drain_timer, NULL); /* its memory is a's */
}

static void on_drain_delay(uv_timer_t *t) {
  tg_admin_t *a = t->data;
  tg_log(TG_LOG_INFO, "drain: public listeners closed", NULL);
  tg_server_close_listeners(a->server, 0, a->npublic);
  drain_timer_close(a);
}

void tg_admin_worker_stop(tg_admin_t *a, tg_worker_t *w) {
  if (a->drain_loop == w->loop)
    drain_timer_close(a);
}

/* POST /admin/drain[?delay_ms=N]: /readyz answers 503 "draining" at once;
 * after delay_ms (0..60000, default 0: a load balancer's time to notice) the
 * public listeners close, and their connections close once the request in
 * flight is answered. The admin listener serves on. A second call changes
 * nothing. GET /admin/drain: the state. */
static void drain(tg_admin_t *a, tg_http_req_t *req) {
  uint64_t conns = a->server ? tg_server_connections(a->server) : 0;
  if (req->method == HTTP_GET) {
    tg_http_respond_json(req, 200, json_pack("{s:b, s:I}", "draining", tg_readiness_draining(a->readiness),
                                             "connections", (json_int_t)conns));
    return;
  }
  if (req->method != HTTP_POST) {
    only_post(req);
    return;
  }
  char v[8];
  long delay = 0;
  int has = query_param(req->query, "delay_ms", v, sizeof v);
  if (has == 1) {
    char *end;
    delay = strtol(v, &end, 10);
    if (*end != '\0' || delay < 0 || delay > 60000)
      has = -1;
  }
  if (has < 0 || has == 2) {
    error_json(req, 400, "delay_ms: 0..60000");
    return;
  }
  if (a->server == NULL) {
    error_json(req, 503, "not serving yet");
    return;
  }
  if (!tg_readiness_start_drain(a->readiness)) {
    tg_http_respond_json(req, 200, json_pack("{s:b, s:b, s:I}", "draining", 1, "already", 1, "connections",
                                             (json_int_t)conns));
    return;
  }
  char ms[16];
  snprintf(ms, sizeof ms, "%ld", delay);
  tg_log_req(TG_LOG_INFO, req->request_id, "drain: readiness 503, public listeners close after delay_ms",
             "delay_ms", ms, NULL);
  /* The timer does not hold the worker's loop open: a stop before it fires
   * stops everything anyway. */
  if (delay == 0 || uv_timer_init(req->worker->loop, &a->drain_timer) != 0) {
    tg_server_close_listeners(a->server, 0, a->npublic);
  } else {
    a->drain_timer.data = a;
    a->drain_loop = req->worker->loop;
    uv_timer_start(&a->drain_timer, on_drain_delay, (uint64_t)delay, 0);
    uv_unref((uv_handle_t *)&a->drain_timer);
  }
  tg_http_respond_json(req, 202, json_pack("{s:b, s:b, s:I, s:I}", "draining", 1, "already", 0, "delay_ms",
                                           (json_int_t)delay, "connections", (json_int_t)conns));
}

/* ---- The built-in ledger: balances and top-ups */

typedef struct each_ctx {
  json_t *list;
  const char *only; /* NULL: every account */
  size_t n;
} each_ctx_t;

static int add_account(void *arg, const char *ref, const char *currency, int64_t balance, int64_t held) {
  each_ctx_t *c = arg;
  if (c->only && strcmp(c->only, ref) != 0)
    return 0;
  if (c->n >= 1000)
    return 1;
  c->n++;
  json_array_append_new(c->list, json_pack("{s:s,s:s,s:I,s:I,s:I}", "account", ref, "currency", currency,
                                           "balance", (json_int_t)balance, "held", (json_int_t)held,
                                           "available", (json_int_t)(balance - held)));
  return 0;
}

/* GET /ledger/balance[?account=REF]: one account's balances (per currency),
 * or the first 1000 accounts. */
typedef struct rbal {
  tg_http_req_t *req;
  char ref[257], currency[17];
} rbal_t;

static void on_redis_balance(void *arg, int status, int64_t balance, int64_t held) {
  rbal_t *b = arg;
  if (status != 0) {
    error_json(b->req, 503, "Redis did not answer: the balances live there in ledger mode redis");
  } else {
    json_t *acct = json_pack("{s:s,s:s,s:I,s:I,s:I}", "account", b->ref, "currency", b->currency, "balance",
                             (json_int_t)balance, "held", (json_int_t)held, "available",
                             (json_int_t)(balance - held));
    tg_http_respond_json(b->req, 200, json_pack("{s:[o]}", "accounts", acct));
  }
  free(b);
}

/* Redis mode: one account in one currency (?currency=, default USD). */
static void balance_redis(tg_app_worker_t *aw, tg_http_req_t *req, const char *ref) {
  rbal_t *b = calloc(1, sizeof *b);
  int has = b ? query_param(req->query, "currency", b->currency, sizeof b->currency) : 0;
  if (b == NULL || has < 0 || has == 2) {
    free(b);
    error_json(req, 400, "currency: a currency code");
    return;
  }
  if (has == 0)
    snprintf(b->currency, sizeof b->currency, "USD");
  b->req = req;
  snprintf(b->ref, sizeof b->ref, "%s", ref);
  if (tg_prepaid_redis_balance(aw->prepaid_redis, b->ref, b->currency, on_redis_balance, b) != 0) {
    free(b);
    error_json(req, 400, "bad account or currency");
  }
}

static void balance(const tg_admin_t *a, tg_http_req_t *req) {
  char ref[257];
  int has = query_param(req->query, "account", ref, sizeof ref);
  tg_app_worker_t *aw = tg_app_worker(a->app, req->worker);
  if (a->app->prepaid == NULL) {
    error_json(req, 503, "no ledger: the gateway runs without a data_dir");
    return;
  }
  if (has < 0 || has == 2) {
    error_json(req, 400, "account: 1 to 256 characters of [A-Za-z0-9._-]");
    return;
  }
  if (aw && aw->prepaid_redis) {
    if (has == 0)
      error_json(req, 400, "account: required in ledger mode redis (the balances live in Redis)");
    else
      balance_redis(aw, req, ref);
    return;
  }
  each_ctx_t c = {json_array(), has == 1 ? ref : NULL, 0};
  tg_prepaid_each(a->app->prepaid, add_account, &c);
  if (has == 1 && c.n == 0) {
    json_decref(c.list);
    error_json(req, 404, "no such account (it has never been credited)");
    return;
  }
  tg_http_respond_json(req, 200, json_pack("{s:o}", "accounts", c.list));
}

typedef struct topup {
  tg_http_req_t *req;
  tg_prepaid_t *ledger;
  char ref[257], currency[17], reference[129];
  struct topup *next;    /* in flight (the admin runs on one worker: no lock) */
  struct topup *waiters; /* the same reference asked again while this one is in flight */
  tg_app_worker_t *aw;   /* redis mode */
  int64_t amount;
  int64_t balance_after; /* redis mode: Redis' answer */
} topup_t;

static topup_t *topups_in_flight;
static const char *admin_instance; /* the configuration's instance id, for records */

static void answer_topup(topup_t *t, int applied, uint64_t seq) {
  int64_t bal = t->balance_after, held = 0;
  if (t->aw == NULL)
    tg_prepaid_balance(t->ledger, t->ref, t->currency, &bal, &held);
  json_t *body = json_pack("{s:s,s:s,s:I,s:I,s:b}", "account", t->ref, "currency", t->currency, "balance",
                           (json_int_t)bal, "available", (json_int_t)(bal - held), "applied", applied);
  if (body && applied)
    json_object_set_new(body, "seq", json_integer((json_int_t)seq));
  tg_http_respond_json(t->req, 200, body);
}

static void on_topup_durable(void *arg, int status, uint64_t seq) {
  topup_t *t = arg;
  for (topup_t **pp = &topups_in_flight; *pp; pp = &(*pp)->next)
    if (*pp == t) {
      *pp = t->next;
      break;
    }
  if (status != 0) {
    char msg[160];
    snprintf(msg, sizeof msg, "the transaction log failed (%s): nothing was credited", strerror(-status));
    error_json(t->req, 503, msg);
  } else {
    tg_log_req(TG_LOG_INFO, t->req->request_id, "ledger credit", "reference", t->reference, NULL);
    answer_topup(t, 1, seq);
  }
  /* The same reference asked meanwhile: credited once, by the first. */
  for (topup_t *w = t->waiters, *next; w; w = next) {
    next = w->waiters;
    w->aw = t->aw;
    w->balance_after = t->balance_after;
    if (status != 0)
      error_json(w->req, 503, "the transaction log failed: nothing was credited");
    else
      answer_topup(w, 0, 0);
    free(w);
  }
  free(t);
}

static uint8_t *credit_record(const topup_t *t, int64_t n, size_t *len);
static void on_topup_durable(void *arg, int status, uint64_t seq);

/* Redis mode: the credit is Redis' (once per reference there); the log
 * keeps an audit record of each credit applied. */
static void on_redis_credit(void *arg, int status, int64_t balance) {
  topup_t *t = arg;
  t->balance_after = balance;
  if (status == 1) {
    size_t len;
    uint8_t *rec = credit_record(t, t->amount, &len);
    if (rec == NULL || tg_app_append(t->aw, rec, len, on_topup_durable, t) != 0) {
      tg_log_req(TG_LOG_WARN, t->req->request_id, "credit applied in Redis, its audit record not logged",
                 "reference", t->reference, NULL);
      on_topup_durable(t, 0, 0);
    }
    free(rec);
    return;
  }
  for (topup_t **pp = &topups_in_flight; *pp; pp = &(*pp)->next)
    if (*pp == t) {
      *pp = t->next;
      break;
    }
  if (status == 0)
    answer_topup(t, 0, 0);
  else
    error_json(t->req, status == -EOVERFLOW ? 400 : 503,
               status == -EOVERFLOW ? "the balance would pass 2^53" : "Redis did not take the credit: retry");
  for (topup_t *w = t->waiters, *next; w; w = next) {
    next = w->waiters;
    w->balance_after = balance;
    if (status == 0)
      answer_topup(w, 0, 0);
    else
      error_json(w->req, 503, "Redis did not take the credit: retry");
    free(w);
  }
  free(t);
}

/* POST /ledger/topup {"account":REF,"amount":N,"currency":"USD","reference":R}:
 * a CREDIT record, answered once durable. The same reference twice credits
 * once (the second answer says applied:false). */
static void topup(const tg_admin_t *a, tg_http_req_t *req) {
  json_error_t jerr;
  json_t *body = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
  const char *ref = NULL, *cur = "USD", *reference = NULL;
  json_t *amount = NULL;
  tg_app_worker_t *aw = tg_app_worker(a->app, req->worker);
  if (a->app->prepaid == NULL || aw == NULL || aw->wal == NULL) {
    json_decref(body);
    error_json(req, 503, "no ledger: the gateway runs without a data_dir");
    return;
  }
  if (body == NULL || json_unpack_ex(body, &jerr, JSON_STRICT, "{s:s,s:o,s?s,s:s}", "account", &ref, "amount",
                                     &amount, "currency", &cur, "reference", &reference) != 0) {
    json_decref(body);
    error_json(req, 400, "expected {\"account\":REF,\"amount\":N,\"currency\":\"USD\",\"reference\":R} "
                         "(reference: your id of this top-up, so a retry credits once)");
    return;
  }
  if (!json_is_integer(amount) || json_integer_value(amount) <= 0 ||
      json_integer_value(amount) > (json_int_t)1 << 53) {
    json_decref(body);
    error_json(req, 400, "amount: an integer of atomic units (micro-USD for USD), 1 .. 2^53");
    return;
  }
  if (strlen(ref) < 1 || strlen(ref) > 256 || strlen(reference) < 1 || strlen(reference) > 128) {
    json_decref(body);
    error_json(req, 400, "account 1..256 bytes, reference 1..128 bytes");
    return;
  }
  topup_t *t = calloc(1, sizeof *t);
  if (t == NULL) {
    json_decref(body);
    error_json(req, 500, "out of memory");
    return;
  }
  t->req = req;
  t->ledger = a->app->prepaid;
  snprintf(t->ref, sizeof t->ref, "%s", ref);
  snprintf(t->currency, sizeof t->currency, "%s", cur);
  snprintf(t->reference, sizeof t->reference, "%s", reference);
  int64_t after = 0;
  int64_t n = (int64_t)json_integer_value(amount);
  json_decref(body);
  /* Redis mode: Redis applies a reference once, atomically, and answers
   * for the account asked about. */
  if (aw->prepaid_redis) {
    t->aw = aw;
    t->amount = n;
    if (tg_prepaid_redis_credit(aw->prepaid_redis, t->ref, t->currency, n, t->reference, on_redis_credit, t) != 0) {
      free(t);
      error_json(req, 400, "bad account or currency");
    }
    return;
  }
  /* Local mode: a reference in flight answers its duplicates once durable. */
  for (topup_t *f = topups_in_flight; f; f = f->next)
    if (strcmp(f->reference, t->reference) == 0) {
      t->waiters = f->waiters; /* answered when f is durable */
      f->waiters = t;
      return;
    }
  int rc = tg_prepaid_credit_check(a->app->prepaid, t->ref, t->currency, n, t->reference, &after);
  if (rc == -EALREADY) {
    answer_topup(t, 0, 0);
    free(t);
    return;
  }
  if (rc != 0) {
    free(t);
    error_json(req, 400, rc == -EOVERFLOW ? "the balance would pass 2^53" : "bad account or currency");
    return;
  }
  size_t len;
  uint8_t *buf = credit_record(t, n, &len);
  if (buf == NULL) {
    free(t);
    error_json(req, 500, "out of memory");
    return;
  }
  rc = tg_app_append(aw, buf, len, on_topup_durable, t);
  free(buf);
  if (rc == 0) {
    t->next = topups_in_flight;
    topups_in_flight = t;
  } else {
    char msg[160];
    snprintf(msg, sizeof msg, "the transaction log refused the credit (%s)", strerror(-rc));
    free(t);
    error_json(req, 503, msg);
  }
}

/* The CREDIT record of a top-up, packed (malloc), or NULL. */
static uint8_t *credit_record(const topup_t *t, int64_t n, size_t *len) {
  return tg_record_ledger_change(LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT, t->ref, t->currency, n,
                                 NULL, t->reference, admin_instance, len);
}

void tg_admin_handle(tg_http_req_t *req, void *ud) {
  tg_admin_t *a = ud;
  admin_instance = a->app->cfg->instance;
  if (!authorized(a, req)) {
    static const char body[] = "{\"error\":\"unauthorized\"}";
    tg_http_header_t h[2] = {{"WWW-Authenticate", 16, "Bearer realm=\"tollgate-admin\"", 29},
                             {"Content-Type", 12, "application/json", 16}};
    tg_log_req(TG_LOG_WARN, req->request_id, "admin request refused", "peer", req->peer, "path",
               req->path, NULL);
    tg_http_respond(req, 401, h, 2, body, sizeof body - 1); /* req is gone after this */
    return;
  }
  if (strcmp(req->path, "/metrics") == 0) {
    metrics(req);
  } else if (strcmp(req->path, "/status") == 0) {
    status(a, req);
  } else if (strcmp(req->path, "/reload") == 0) {
    static const char *const known[] = {"dry_run", "tenant", NULL};
    char tenant[65], unknown[64], msg[128];
    int has = tenant_param(req->query, tenant, sizeof tenant);
    int dry = dry_run_param(req->query);
    unknown_param(req->query, known, unknown, sizeof unknown);
    if (req->method != HTTP_POST) {
      only_post(req);
    } else if (unknown[0]) {
      snprintf(msg, sizeof msg, "unknown parameter '%s' (known: dry_run, tenant)", unknown);
      error_json(req, 400, msg);
    } else if (dry < 0) {
      error_json(req, 400, "dry_run must be 1 or 0");
    } else if (has < 0) {
      error_json(req, 404, "unknown tenant");
    } else {
      tg_reload_respond(a->app->policies, req, has ? tenant : NULL, dry);
    }
  } else if (strcmp(req->path, "/ledger/balance") == 0) {
    balance(a, req);
  } else if (strcmp(req->path, "/ledger/topup") == 0) {
    if (req->method != HTTP_POST)
      only_post(req);
    else
      topup(a, req);
  } else if (strcmp(req->path, "/admin/tenants") == 0) {
    if (req->method != HTTP_GET)
      error_json(req, 405, "use GET");
    else
      tenants_list(a, req);
  } else if (strncmp(req->path, "/admin/tenants/", 15) == 0) {
    tenant_action(a, req, req->path + 15);
  } else if (strcmp(req->path, "/admin/drain") == 0) {
    drain(a, req);
  } else if (strcmp(req->path, "/catalog/refresh") == 0) {
    if (req->method != HTTP_POST)
      only_post(req);
    else
      refresh(a, req);
  } else {
    error_json(req, 404, "not found");
  }
}
