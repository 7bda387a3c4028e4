#include "gateway/reload.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/utf8.h"

static const char *const status_names[] = {"unchanged", "updated", "failed"};

int tg_reload_policies(tg_policy_registry_t *r, const char *tenant, json_t **report) {
  tg_policy_reload_result_t *res = NULL;
  size_t n = 0;
  int rc = tg_policy_reload(r, tenant, &res, &n);
  json_t *list = json_array();
  for (size_t i = 0; i < n; i++) {
    const tg_policy_reload_result_t *x = &res[i];
    char version[TG_POLICY_VERSION_SHOWN + 1];
    snprintf(version, sizeof version, "%.*s", TG_POLICY_VERSION_SHOWN, x->version);
    json_t *o = json_pack("{s:s, s:s, s:s}", "tenant", x->tenant, "status", status_names[x->status],
                          "version", version);
    if (o && x->status == TG_POLICY_RELOAD_FAILED)
      json_object_set_new(o, "error", tg_utf8_json_string(x->error));
    json_array_append_new(list, o); /* logged once, by the registry */
  }
  free(res);
  if (report)
    *report = json_pack("{s:o}", "tenants", list);
  else
    json_decref(list);
  return rc;
}

static json_t *version_json(const char *version) {
  return version[0] ? json_stringn(version, strnlen(version, TG_POLICY_VERSION_SHOWN)) : json_null();
}

int tg_reload_dry_run(tg_policy_registry_t *r, const char *tenant, json_t **report) {
  tg_policy_comparison_t *res = NULL;
  size_t n = 0;
  int rc = tg_policy_dry_run(r, tenant, &res, &n);
  json_t *list = json_array();
  for (size_t i = 0; i < n; i++) {
    const tg_policy_comparison_t *c = &res[i];
    json_t *diffs = c->differences ? json_incref(c->differences) : json_array();
    json_t *o = json_pack("{s:s, s:s, s:o, s:o, s:I, s:I, s:o}", "tenant", c->tenant, "result",
                          tg_policy_dry_status_name(c->status), "live_version",
                          version_json(c->live_version), "candidate_version",
                          version_json(c->candidate_version), "compared",
                          (json_int_t)c->compared, "differing", (json_int_t)c->differing,
                          "differences", diffs);
    if (o && c->error[0])
      json_object_set_new(o, "error", tg_utf8_json_string(c->error));
    if (o && c->compare_error[0])
      json_object_set_new(o, "compare_error", tg_utf8_json_string(c->compare_error));
    json_array_append_new(list, o);
  }
  tg_policy_comparisons_free(res, n, true);
  if (report)
    *report = json_pack("{s:b, s:o}", "dry_run", 1, "tenants", list);
  else
    json_decref(list);
  return rc;
}

typedef struct job {
  uv_work_t work;
  tg_policy_registry_t *registry;
  tg_http_req_t *req;
  char tenant[65];
  int has_tenant;
  int dry_run;
  int rc;
  json_t *report;
} job_t;

static void work(uv_work_t *w) {
  job_t *j = w->data;
  const char *tenant = j->has_tenant ? j->tenant : NULL;
  if (j->dry_run)
    j->rc = tg_reload_dry_run(j->registry, tenant, &j->report);
  else
    j->rc = tg_reload_policies(j->registry, tenant, &j->report);
}

static void done(uv_work_t *w, int status) {
  job_t *j = w->data;
  if (status != 0) {
    json_decref(j->report);
    tg_http_respond_json(j->req, 500, json_pack("{s:s}", "error", "reload did not run"));
  } else if (j->rc == -ENOENT) {
    json_decref(j->report);
    tg_http_respond_json(j->req, 404, json_pack("{s:s}", "error", "unknown tenant"));
  } else {
    tg_http_respond_json(j->req, j->rc == 0 ? 200 : 422, j->report);
  }
  free(j);
}

void tg_reload_respond(tg_policy_registry_t *r, tg_http_req_t *req, const char *tenant,
                       int dry_run) {
  job_t *j = calloc(1, sizeof *j);
  if (j == NULL) {
    tg_http_respond_json(req, 503, json_pack("{s:s}", "error", "out of memory"));
    return;
  }
  j->registry = r;
  j->req = req;
  j->dry_run = dry_run;
  j->work.data = j;
  if (tenant) {
    if (snprintf(j->tenant, sizeof j->tenant, "%s", tenant) >= (int)sizeof j->tenant) {
      free(j);
      tg_http_respond_json(req, 404, json_pack("{s:s}", "error", "unknown tenant"));
      return;
    }
    j->has_tenant = 1;
  }
  if (uv_queue_work(req->worker->loop, &j->work, work, done) != 0) {
    free(j);
    tg_http_respond_json(req, 503, json_pack("{s:s}", "error", "cannot schedule the reload"));
  }
}
