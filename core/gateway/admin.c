#include "gateway/admin.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <jansson.h>
#include <llhttp.h>

#include "base/log.h"
#include "base/metrics.h"
#include "base/utf8.h"
#include "gateway/reload.h"

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

void tg_admin_handle(tg_http_req_t *req, void *ud) {
  const tg_admin_t *a = ud;
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
  } else if (strcmp(req->path, "/catalog/refresh") == 0) {
    if (req->method != HTTP_POST)
      only_post(req);
    else
      refresh(a, req);
  } else {
    error_json(req, 404, "not found");
  }
}
