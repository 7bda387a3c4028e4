#include "gateway/admin.h"

#include <errno.h>
#include <stdio.h>
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

/* The value of ?tenant= into out: 1 found, 0 absent, -1 malformed (empty,
 * too long, or not a tenant name's characters). */
static int tenant_param(const char *query, char *out, size_t outlen) {
  for (const char *p = query; p && *p; p += strcspn(p, "&"), p += *p == '&') {
    if (strncmp(p, "tenant=", 7) != 0)
      continue;
    size_t n = strcspn(p + 7, "&");
    if (n == 0 || n >= outlen)
      return -1;
    for (size_t i = 0; i < n; i++) {
      char c = p[7 + i];
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
            c == '_' || c == '.'))
        return -1;
    }
    memcpy(out, p + 7, n);
    out[n] = '\0';
    return 1;
  }
  return 0;
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

static void status(const tg_admin_t *a, tg_http_req_t *req) {
  tg_policy_registry_t *reg = a->app->policies;
  json_t *tenants = json_array();
  size_t np = tg_policy_count(reg);
  for (size_t i = 0; i < np; i++) {
    tg_policy_info_t info;
    if (tg_policy_info(reg, i, &info) != 0)
      continue;
    json_array_append_new(
        tenants, json_pack("{s:s, s:{s:o, s:s#, s:f}, s:o}", "name", info.tenant, "policy", "file",
                           info.path[0] ? tg_utf8_json_string(info.path) : json_null(), "version",
                           info.version, (int)TG_POLICY_VERSION_SHOWN, "loaded_at", info.loaded_at,
                           "catalog", catalog_status(a, i)));
  }
  json_t *body = json_pack("{s:s, s:I, s:b, s:I, s:o}", "version", a->version, "uptime_s",
                           (json_int_t)(time(NULL) - a->started_at), "ready",
                           tg_readiness_serving(a->readiness), "policy_generation",
                           (json_int_t)tg_policy_generation(reg), "tenants", tenants);
  tg_http_respond_json(req, 200, body);
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
    char tenant[65];
    int has = tenant_param(req->query, tenant, sizeof tenant);
    if (req->method != HTTP_POST)
      only_post(req);
    else if (has < 0)
      error_json(req, 404, "unknown tenant");
    else
      tg_reload_respond(a->app->policies, req, has ? tenant : NULL);
  } else if (strcmp(req->path, "/catalog/refresh") == 0) {
    if (req->method != HTTP_POST)
      only_post(req);
    else
      refresh(a, req);
  } else {
    error_json(req, 404, "not found");
  }
}
