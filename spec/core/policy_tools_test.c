/* The policy registry's tools for operators: dry runs and comparisons of two
 * versions (bounded, in-process and in the validator process), the last
 * reload attempt and the file on disk for /status, the per-tenant metrics,
 * versions shown by 12 characters in logs, and the summary behind
 * `tollgate policy test`. */
#include "policy/policy.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/buf.h"
#include "base/log.h"
#include "base/metrics.h"
#include "test.h"
#include "tmpfiles.h"

typedef struct fix {
  tg_config_tenant_t tenants[2];
  tg_config_t cfg;
  tg_policy_registry_t *r;
  char err[TG_POLICY_MSG_LEN];
} fix_t;

static int fix_open(fix_t *f, const tg_policy_options_t *opt, const char *name1,
                    const char *path1, const char *name2, const char *path2) {
  quiet_logs();
  memset(f, 0, sizeof *f);
  f->tenants[0].name = (char *)name1;
  f->tenants[0].policy_file = (char *)path1;
  f->tenants[1].name = (char *)name2;
  f->tenants[1].policy_file = (char *)path2;
  f->cfg.tenants = f->tenants;
  f->cfg.ntenants = name2 ? 2 : 1;
  return tg_policy_registry_new(&f->cfg, opt, &f->r, f->err, sizeof f->err);
}

static char *metrics_text(void) {
  tg_buf_t b = {0};
  tg_metrics_render(&b);
  tg_buf_append(&b, "", 1);
  return b.data;
}

static bool metrics_has(const char *text) {
  char *t = metrics_text();
  bool found = t && strstr(t, text) != NULL;
  free(t);
  return found;
}

static int count_lines_with(const char *text, const char *needle) {
  int n = 0;
  for (const char *p = text; (p = strstr(p, needle)) != NULL; p++)
    n++;
  return n;
}

static int64_t price_once(tg_policy_runtime_t *rt, const char *tenant) {
  tg_policy_state_t *st = tg_policy_acquire(rt, tenant);
  if (st == NULL)
    return -1;
  tg_policy_req_t req = {.method = "GET", .path = "/a", .host = "x", .tenant = tenant,
                         .kind = TG_POLICY_KIND_HTTP};
  tg_policy_offer_t offer = {.uri = "https://x/a", .model = "purchase", .amount = 1,
                             .currency = "USD"};
  tg_policy_price_t pr;
  int rc = tg_policy_price(st, &offer, &req, &pr, NULL);
  tg_policy_release(st);
  return rc == 0 ? pr.amount : -1;
}

static const char *tollgate_exe(void) {
  static char path[1024];
  ssize_t n = readlink("/proc/self/exe", path, sizeof path - 16);
  if (n <= 0)
    return NULL;
  path[n] = '\0';
  char *slash = strrchr(path, '/');
  if (slash == NULL)
    return NULL;
  strcpy(slash + 1, "tollgate");
  return access(path, X_OK) == 0 ? path : NULL;
}

/* ---- policies */

static const char *const V1 =
    "local P = {}\n"
    "function P.skip(req) return req.path == '/free' end\n"
    "function P.price(offer, req) return 100, 'USD' end\n"
    "P.fixtures = {\n"
    "  { name = 'flat', hook = 'price', offer = { amount = 1, currency = 'USD' },\n"
    "    expect = { 100, 'USD' } },\n"
    "  { hook = 'skip', req = { path = '/free' }, expect = { true } },\n"
    "}\n"
    "return P\n";

/* Price and rate limit change; the free path stays; a billing answer is new. */
static const char *const V2 =
    "local P = {}\n"
    "function P.skip(req) return req.path == '/free' end\n"
    "function P.price(offer, req) return 200, 'USD' end\n"
    "function P.rate_limit(req) return 'k\\0' .. (req.ip or '-'), 2.5, 10 end\n"
    "function P.on_billing_timeout(txn) return 'deferred' end\n"
    "P.fixtures = {\n"
    "  { name = 'flat', hook = 'price', offer = { amount = 1, currency = 'USD' },\n"
    "    expect = { 200, 'USD' } },\n"
    "  { hook = 'rate_limit', req = { ip = '192.0.2.1' }, expect = { 'k\\000192.0.2.1', 2.5, 10 } },\n"
    "  { hook = 'on_billing_timeout', txn = { amount = 1 }, expect = { 'deferred' } },\n"
    "}\n"
    "return P\n";

static const char *const BROKEN = "local P = {}\nfunction P.price(o)\n  return o.amount +\nend\nreturn P\n";

/* The difference for hook in the array, or NULL. */
static json_t *difference(json_t *diffs, const char *hook) {
  size_t i;
  json_t *d;
  json_array_foreach(diffs, i, d) {
    if (strcmp(json_string_value(json_object_get(d, "hook")), hook) == 0)
      return d;
  }
  return NULL;
}

static bool json_is(json_t *v, const char *text) {
  char *t = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
  bool same = t && strcmp(t, text) == 0;
  if (!same)
    fprintf(stderr, "  got %s, expected %s\n", t ? t : "(null)", text);
  free(t);
  return same;
}

/* The dry run of one changed tenant (and one on the default policy). */
static void check_dry_run(fix_t *f, const char *p, int *tg_failed_) {
  char v1[TG_POLICY_VERSION_LEN];
  CHECK_INT(tg_policy_version(f->r, "news", v1), 0);
  uint64_t gen = tg_policy_generation(f->r);
  tmp_write("news.lua", V2);

  tg_policy_comparison_t *c = NULL;
  size_t n = 0;
  CHECK_INT(tg_policy_dry_run(f->r, NULL, &c, &n), 0);
  CHECK_INT(n, 2);
  CHECK_STR(c[0].tenant, "news");
  CHECK_INT(c[0].status, TG_POLICY_DRY_VALID);
  CHECK_STR(c[0].live_version, v1);
  CHECK(strcmp(c[0].candidate_version, v1) != 0 && strlen(c[0].candidate_version) == 64);
  CHECK_STR(c[0].error, "");
  CHECK_STR(c[0].compare_error, "");
  /* Inputs: live price (the candidate's is the same input), live skip,
   * candidate rate_limit and on_billing_timeout. */
  CHECK_INT(c[0].compared, 4);
  CHECK_INT(c[0].differing, 3);
  CHECK_INT(json_array_size(c[0].differences), 3);
  json_t *d = difference(c[0].differences, "price");
  CHECK(d != NULL);
  CHECK(json_is(json_object_get(d, "fixture"), "{\"of\":\"live\",\"index\":1,\"name\":\"flat\"}"));
  CHECK(json_is(json_object_get(d, "live"), "[100,\"USD\"]"));
  CHECK(json_is(json_object_get(d, "candidate"), "[200,\"USD\"]"));
  d = difference(c[0].differences, "rate_limit");
  CHECK(d != NULL);
  CHECK(json_is(json_object_get(d, "fixture"), "{\"of\":\"candidate\",\"index\":2}"));
  CHECK(json_is(json_object_get(d, "live"), "[]"));
  CHECK(json_is(json_object_get(d, "candidate"), "[\"k\\u0000192.0.2.1\",2.5,10]"));
  d = difference(c[0].differences, "on_billing_timeout");
  CHECK(d != NULL && json_is(json_object_get(d, "live"), "[\"reject\"]"));
  CHECK(difference(c[0].differences, "skip") == NULL); /* the same answer in both */
  CHECK_STR(c[1].tenant, "dflt");
  CHECK_INT(c[1].status, TG_POLICY_DRY_UNCHANGED);
  CHECK_STR(c[1].live_version, c[1].candidate_version);
  tg_policy_comparisons_free(c, n, true);

  /* Nothing published, nothing recorded as a reload attempt. */
  char v[TG_POLICY_VERSION_LEN];
  CHECK_INT(tg_policy_version(f->r, "news", v), 0);
  CHECK_STR(v, v1);
  CHECK(tg_policy_generation(f->r) == gen);
  tg_policy_info_t info;
  CHECK_INT(tg_policy_info(f->r, 0, &info), 0);
  CHECK(!info.reloaded);
  CHECK(!metrics_has("policy_reloads_total{tenant_id=\"news\""));

  /* A candidate a reload would refuse: FILE:LINE, nothing compared. */
  tmp_write("news.lua", BROKEN);
  CHECK_INT(tg_policy_dry_run(f->r, "news", &c, &n), -EINVAL);
  CHECK_INT(n, 1);
  CHECK_INT(c[0].status, TG_POLICY_DRY_INVALID);
  char want[700];
  snprintf(want, sizeof want, "%s:4: unexpected symbol near 'end'", p);
  CHECK_STR(c[0].error, want);
  CHECK_STR(c[0].compare_error, "");
  CHECK(c[0].differences == NULL);
  tg_policy_comparisons_free(c, n, true);

  /* A price changed without its fixture: refused, and the difference says why. */
  tmp_write("news.lua", "return { price = function() return 300, 'USD' end, fixtures = {\n"
                         "  { hook = 'price', offer = { amount = 1, currency = 'USD' },\n"
                         "    expect = { 100, 'USD' } } } }\n");
  CHECK_INT(tg_policy_dry_run(f->r, "news", &c, &n), -EINVAL);
  CHECK_INT(c[0].status, TG_POLICY_DRY_INVALID);
  CHECK(strstr(c[0].error, "fixture 1 (price): expected {100, \"USD\"}, got {300, \"USD\"}"));
  d = difference(c[0].differences, "price");
  CHECK(d != NULL && json_is(json_object_get(d, "candidate"), "[300,\"USD\"]"));
  tg_policy_comparisons_free(c, n, true);

  /* An unreadable file: invalid, with the reason. */
  unlink(p);
  CHECK_INT(tg_policy_dry_run(f->r, "news", &c, &n), -EINVAL);
  CHECK_INT(c[0].status, TG_POLICY_DRY_INVALID);
  CHECK(strstr(c[0].error, "cannot open") != NULL);
  CHECK_STR(c[0].candidate_version, "");
  tg_policy_comparisons_free(c, n, true);

  CHECK_INT(tg_policy_dry_run(f->r, "nobody", &c, &n), -ENOENT);
  CHECK(c == NULL && n == 0);
  tmp_write("news.lua", V1);
}

TEST(dry_run_compares_and_publishes_nothing) {
  const char *p = tmp_write("news.lua", V1);
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", p, "dflt", NULL), 0);
  check_dry_run(&f, p, tg_failed_);
  if (*tg_failed_)
    return;
  CHECK(metrics_has("policy_dry_runs_total{tenant_id=\"news\",result=\"valid\"} 1\n"));
  CHECK(metrics_has("policy_dry_runs_total{tenant_id=\"news\",result=\"invalid\"} 3\n"));
  CHECK(metrics_has("policy_dry_runs_total{tenant_id=\"dflt\",result=\"unchanged\"} 1\n"));
  tg_policy_registry_free(f.r);
}

/* The same answers when the comparison runs in the validator process (as
 * the gateway runs it), and a validator that crashes refuses the candidate. */
TEST(dry_run_in_the_validator_process) {
  const char *exe = tollgate_exe();
  CHECK(exe != NULL);
  const char *p = tmp_write("news.lua", V1);
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", p, "dflt", NULL), 0);
  tg_policy_set_validator(exe, 0);
  check_dry_run(&f, p, tg_failed_);
  if (*tg_failed_)
    return;

  const char *crash = tmp_write("crash.sh", "#!/bin/sh\nkill -SEGV $$\n");
  chmod(crash, 0755);
  tg_policy_set_validator(crash, 0);
  tmp_write("news.lua", V2);
  tg_policy_comparison_t *c = NULL;
  size_t n = 0;
  CHECK_INT(tg_policy_dry_run(f.r, "news", &c, &n), -EINVAL);
  CHECK_INT(c[0].status, TG_POLICY_DRY_INVALID);
  CHECK(strstr(c[0].error, "crashed its validation (signal 11, SIGSEGV)") != NULL);
  tg_policy_comparisons_free(c, n, true);
  tg_policy_set_validator(NULL, 0);
  tg_policy_registry_free(f.r);
}

/* A candidate that loops on an input only the live version's fixtures hold
 * passes validation; the comparison stops at the hook time limit and says
 * which call. */
TEST(comparison_is_bounded_like_a_hook_call) {
  const char *live = tmp_write("bounded_live.lua",
                                "return { price = function(o) return o.amount, 'USD' end,\n"
                                "  fixtures = { { name = 'seven', hook = 'price',\n"
                                "    offer = { amount = 7, currency = 'USD' }, expect = { 7, 'USD' } } } }\n");
  const char *cand = tmp_write("bounded_cand.lua",
                                "return { price = function(o)\n"
                                "  if o.amount == 7 then while true do end end\n"
                                "  return o.amount, 'USD' end }\n");
  tg_policy_options_t opt = {.time_limit_ms = 20};
  tg_policy_comparison_t c;
  double t0 = now_s();
  CHECK_INT(tg_policy_compare_files(live, cand, "news", &opt, &c), 0);
  CHECK(now_s() - t0 < 2);
  CHECK_INT(c.status, TG_POLICY_DRY_VALID);
  char want[700];
  snprintf(want, sizeof want,
           "%s: live fixture 1 'seven' (price) on the candidate: exceeded its time limit (20 ms)",
           cand);
  CHECK_STR(c.compare_error, want);
  CHECK(c.differences == NULL);
  tg_policy_comparisons_free(&c, 1, false);

  /* The live side must load; the same bytes are unchanged. */
  CHECK_INT(tg_policy_compare_files(tmp_path("no-such.lua"), cand, NULL, NULL, &c), -ENOENT);
  CHECK(strstr(c.error, "cannot open") != NULL);
  const char *broken = tmp_write("broken.lua", BROKEN);
  CHECK_INT(tg_policy_compare_files(broken, cand, NULL, NULL, &c), -EINVAL);
  snprintf(want, sizeof want, "%s:4: unexpected symbol near 'end'", broken);
  CHECK_STR(c.error, want);
  CHECK_INT(tg_policy_compare_files(cand, cand, NULL, NULL, &c), 0);
  CHECK_INT(c.status, TG_POLICY_DRY_UNCHANGED);
  CHECK_STR(c.live_version, c.candidate_version);
  tg_policy_comparisons_free(&c, 1, false);
}

TEST(info_has_the_last_attempt_and_the_file_on_disk) {
  const char *p = tmp_write("status.lua", V1);
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "st", p, "stdflt", NULL), 0);
  tg_policy_info_t info;
  bool differs = true;
  char v[TG_POLICY_VERSION_LEN], live[TG_POLICY_VERSION_LEN], err[TG_POLICY_MSG_LEN];
  CHECK_INT(tg_policy_info(f.r, 0, &info), 0);
  CHECK(!info.reloaded);
  memcpy(live, info.version, sizeof live);
  CHECK_INT(tg_policy_file_state(f.r, 0, &differs, v, err, sizeof err), 0);
  CHECK(!differs);
  CHECK_STR(v, live);

  CHECK_INT(tg_policy_reload(f.r, NULL, NULL, NULL), 0);
  CHECK_INT(tg_policy_info(f.r, 0, &info), 0);
  CHECK(info.reloaded);
  CHECK_INT(info.last_status, TG_POLICY_RELOAD_UNCHANGED);
  CHECK_STR(info.last_version, live);
  CHECK(info.last_at > 1e9);
  CHECK_INT(tg_policy_info(f.r, 1, &info), 0);
  CHECK(info.reloaded && info.last_status == TG_POLICY_RELOAD_UNCHANGED);

  /* Refused: the error with its line, and the version of the refused file. */
  tmp_write("status.lua", BROKEN);
  CHECK_INT(tg_policy_reload(f.r, "st", NULL, NULL), -EINVAL);
  CHECK_INT(tg_policy_info(f.r, 0, &info), 0);
  CHECK_INT(info.last_status, TG_POLICY_RELOAD_FAILED);
  char want[700];
  snprintf(want, sizeof want, "%s:4: unexpected symbol near 'end'", p);
  CHECK_STR(info.last_error, want);
  CHECK_STR(info.version, live);
  CHECK_INT(tg_policy_file_state(f.r, 0, &differs, v, err, sizeof err), 0);
  CHECK(differs);
  CHECK_STR(info.last_version, v);
  CHECK(strcmp(v, live) != 0);

  tmp_write("status.lua", V2);
  CHECK_INT(tg_policy_reload(f.r, "st", NULL, NULL), 0);
  CHECK_INT(tg_policy_info(f.r, 0, &info), 0);
  CHECK_INT(info.last_status, TG_POLICY_RELOAD_UPDATED);
  CHECK_STR(info.last_error, "");
  CHECK_STR(info.last_version, info.version);
  CHECK_INT(tg_policy_file_state(f.r, 0, &differs, v, err, sizeof err), 0);
  CHECK(!differs);

  /* Gone from disk: it differs, and says why; the default policy never does. */
  unlink(p);
  CHECK_INT(tg_policy_file_state(f.r, 0, &differs, v, err, sizeof err), 0);
  CHECK(differs);
  CHECK_STR(v, "");
  CHECK(strstr(err, "cannot open") != NULL);
  CHECK_INT(tg_policy_file_state(f.r, 1, &differs, v, err, sizeof err), 0);
  CHECK(!differs);
  CHECK_INT(tg_policy_file_state(f.r, 2, &differs, v, err, sizeof err), -ENOENT);
  tg_policy_registry_free(f.r);
}

/* One policy_version_info series per tenant through updates and a rollback,
 * and hook durations by tenant. */
TEST(metrics_per_tenant) {
  const char *p = tmp_write("vi.lua", V1);
  const char *q = tmp_write("vj.lua", V1);
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "vi", p, "vj", q), 0);
  tmp_write("vi.lua", V2);
  CHECK_INT(tg_policy_reload(f.r, NULL, NULL, NULL), 0);
  tmp_write("vi.lua", V1);
  CHECK_INT(tg_policy_reload(f.r, NULL, NULL, NULL), 0);
  tmp_write("vi.lua", V2);
  CHECK_INT(tg_policy_reload(f.r, NULL, NULL, NULL), 0);
  char v[TG_POLICY_VERSION_LEN], want[200];
  CHECK_INT(tg_policy_version(f.r, "vi", v), 0);
  char *t = metrics_text();
  CHECK(t != NULL);
  int vi = count_lines_with(t, "policy_version_info{tenant_id=\"vi\"");
  int vj = count_lines_with(t, "policy_version_info{tenant_id=\"vj\"");
  snprintf(want, sizeof want, "policy_version_info{tenant_id=\"vi\",version=\"%.12s\"} 1\n", v);
  bool live_shown = strstr(t, want) != NULL;
  free(t);
  CHECK_INT(vi, 1);
  CHECK_INT(vj, 1);
  CHECK(live_shown);

  tg_policy_runtime_t *rt = tg_policy_runtime_new(f.r, f.err, sizeof f.err);
  CHECK(rt != NULL);
  for (int i = 0; i < 3; i++)
    CHECK_INT(price_once(rt, "vi"), 200);
  for (int i = 0; i < 2; i++)
    CHECK_INT(price_once(rt, "vj"), 100);
  tg_policy_runtime_free(rt);
  CHECK(metrics_has("policy_hook_duration_seconds_count{tenant_id=\"vi\",hook=\"price\"} 3\n"));
  CHECK(metrics_has("policy_hook_duration_seconds_count{tenant_id=\"vj\",hook=\"price\"} 2\n"));
  tg_policy_registry_free(f.r);
}

/* Log lines carry a version by its 12 characters, like answers and metrics. */
TEST(log_lines_show_versions_by_12_characters) {
  const char *p = tmp_write("logs.lua", "return { price = function(o)\n"
                                         "  tollgate.log('info', 'pricing')\n"
                                         "  error('boom') end }\n");
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "lg", p, NULL, NULL), 0);
  char v[TG_POLICY_VERSION_LEN];
  CHECK_INT(tg_policy_version(f.r, "lg", v), 0);
  tg_policy_runtime_t *rt = tg_policy_runtime_new(f.r, f.err, sizeof f.err);
  CHECK(rt != NULL);
  char path[] = "/tmp/tg_policy_tools_log_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  unlink(path);
  tg_log_set_fd(fd);
  CHECK_INT(price_once(rt, "lg"), -1);
  quiet_logs();
  tg_policy_runtime_free(rt);
  tg_policy_registry_free(f.r);
  char buf[8192];
  ssize_t n = pread(fd, buf, sizeof buf - 1, 0);
  close(fd);
  CHECK(n > 0);
  buf[n] = '\0';
  char want[64];
  snprintf(want, sizeof want, "\"version\":\"%.12s\"", v);
  CHECK_INT(count_lines_with(buf, want), 2); /* tollgate.log's line and the failure's */
  CHECK(strstr(buf, v) == NULL);             /* never the whole hash */
}

TEST(check_file_summary) {
  const char *p = tmp_write("summary.lua", V2);
  tg_policy_summary_t sum;
  char err[TG_POLICY_MSG_LEN];
  CHECK_INT(tg_policy_check_file_summary(p, "news", NULL, &sum, err, sizeof err), 0);
  CHECK_INT(sum.fixtures, 3);
  CHECK(sum.hooks[TG_POLICY_HOOK_PRICE] && sum.hooks[TG_POLICY_HOOK_RATE_LIMIT] &&
        sum.hooks[TG_POLICY_HOOK_SKIP] && sum.hooks[TG_POLICY_HOOK_ON_BILLING_TIMEOUT]);
  CHECK(!sum.hooks[TG_POLICY_HOOK_ON_SETTLE_FAILURE]);
  CHECK_INT(strlen(sum.version), 64);
  CHECK_INT(tg_policy_check_file_summary(NULL, "news", NULL, &sum, err, sizeof err), 0);
  CHECK_INT(sum.fixtures, 4); /* the embedded default policy's */
  p = tmp_write("summary_bad.lua", BROKEN);
  CHECK_INT(tg_policy_check_file_summary(p, "news", NULL, &sum, err, sizeof err), -EINVAL);
  CHECK(strstr(err, ":4: unexpected symbol") != NULL);
}

/* settle is compared like the other hooks; a version without it answers
 * "default" (the tenant's configured mode), so adding the hook shows. */
TEST(comparison_and_summary_know_settle) {
  const char *live = tmp_write("settle_live.lua", V1);
  const char *cand = tmp_write(
      "settle_cand.lua",
      "local P = {}\n"
      "function P.skip(req) return req.path == '/free' end\n"
      "function P.price(offer, req) return 100, 'USD' end\n"
      "function P.settle(req, sale) return sale.amount <= 10000 and 'async' or 'sync' end\n"
      "P.fixtures = {\n"
      "  { name = 'flat', hook = 'price', offer = { amount = 1, currency = 'USD' },\n"
      "    expect = { 100, 'USD' } },\n"
      "  { name = 'small', hook = 'settle', sale = { amount = 2000, currency = 'USD' },\n"
      "    expect = { 'async' } },\n"
      "  { name = 'large', hook = 'settle', sale = { amount = 20000, currency = 'USD' },\n"
      "    expect = { 'sync' } },\n"
      "}\n"
      "return P\n");
  tg_policy_comparison_t c;
  CHECK_INT(tg_policy_compare_files(live, cand, "news", NULL, &c), 0);
  CHECK_INT(c.status, TG_POLICY_DRY_VALID);
  CHECK_STR(c.compare_error, "");
  CHECK_INT(c.compared, 4); /* price (both), skip (live), the two settle inputs */
  CHECK_INT(c.differing, 2);
  json_t *d = difference(c.differences, "settle");
  CHECK(d != NULL);
  CHECK(json_is(json_object_get(d, "fixture"), "{\"of\":\"candidate\",\"index\":2,\"name\":\"small\"}"));
  CHECK(json_is(json_object_get(d, "live"), "[\"default\"]"));
  CHECK(json_is(json_object_get(d, "candidate"), "[\"async\"]"));
  tg_policy_comparisons_free(&c, 1, false);

  /* A candidate whose settle fails: an error, as the gateway would fail closed. */
  const char *bad = tmp_write("settle_bad.lua",
                              "return { settle = function(req, sale) return sale.amount end }\n");
  CHECK_INT(tg_policy_compare_files(cand, bad, "news", NULL, &c), 0);
  CHECK_INT(c.status, TG_POLICY_DRY_VALID); /* no fixture of its own catches it */
  d = difference(c.differences, "settle");
  CHECK(d != NULL);
  CHECK(json_is(json_object_get(d, "live"), "[\"async\"]"));
  CHECK(json_is(json_object_get(d, "candidate"), "{\"error\":\"expected \\\"sync\\\" or \\\"async\\\", got 2000\"}"));
  tg_policy_comparisons_free(&c, 1, false);

  tg_policy_summary_t sum;
  char err[TG_POLICY_MSG_LEN];
  CHECK_INT(tg_policy_check_file_summary(cand, "news", NULL, &sum, err, sizeof err), 0);
  CHECK(sum.hooks[TG_POLICY_HOOK_SETTLE]);
  CHECK_INT(sum.fixtures, 3);
  CHECK_INT(tg_policy_check_file_summary(NULL, "news", NULL, &sum, err, sizeof err), 0);
  CHECK(!sum.hooks[TG_POLICY_HOOK_SETTLE]); /* the default policy leaves it to the configuration */
}
