#include "policy/policy.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/buf.h"
#include "base/log.h"
#include "base/metrics.h"
#include "test.h"
#include "tmpfiles.h"

/* ---- helpers */


/* TMPDIR/<name>.lua */
static const char *policy_path_(const char *name) {
  char file[300];
  snprintf(file, sizeof file, "%s.lua", name);
  return tmp_path(file);
}

static const char *write_policy(const char *name, const char *src) {
  char file[300];
  snprintf(file, sizeof file, "%s.lua", name);
  return tmp_write(file, src);
}

/* A registry and a runtime for up to two tenants. */
typedef struct fix {
  tg_config_tenant_t tenants[2];
  tg_config_t cfg;
  tg_policy_registry_t *r;
  tg_policy_runtime_t *rt;
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
  int rc = tg_policy_registry_new(&f->cfg, opt, &f->r, f->err, sizeof f->err);
  if (rc != 0)
    return rc;
  f->rt = tg_policy_runtime_new(f->r, f->err, sizeof f->err);
  return f->rt ? 0 : -1;
}

static void fix_close(fix_t *f) {
  tg_policy_runtime_free(f->rt);
  tg_policy_registry_free(f->r);
}

static const char *hdr_lookup(void *ud, const char *name, size_t len, size_t *vlen) {
  (void)ud;
  if (len == 6 && strncasecmp(name, "x-free", 6) == 0) {
    *vlen = 3;
    return "yes";
  }
  return NULL;
}

static const char *const purposes2[] = {"ai-input", "ai-train"};

static tg_policy_req_t sample_req(void) {
  tg_policy_req_t req = {.method = "GET",
                         .path = "/articles/1",
                         .host = "news.example",
                         .tenant = "news",
                         .ip = "192.0.2.1",
                         .purposes = purposes2,
                         .npurposes = 2,
                         .ai_id = "bot-7",
                         .kind = TG_POLICY_KIND_HTTP,
                         .request_id = "req-1"};
  return req;
}

static tg_policy_offer_t sample_offer(void) {
  tg_policy_offer_t o = {.uri = "https://news.example/a", .model = "purchase",
                         .amount = 15000, .currency = "USD"};
  return o;
}

/* Text of every metric, NUL-terminated (the caller frees). */
static char *metrics_text(void) {
  tg_buf_t b = {0};
  tg_metrics_render(&b);
  tg_buf_append(&b, "", 1);
  return b.data;
}

static bool metrics_has(const char *line) {
  char *t = metrics_text();
  bool found = t && strstr(t, line) != NULL;
  free(t);
  return found;
}

/* ---- a good policy */

static const char *const good_src =
    "local money = require('tollgate.money')\n"
    "local P = {}\n"
    "function P.skip(req)\n"
    "  return req.path == '/robots.txt' or req.path:find('^/free/') ~= nil\n"
    "      or req:header('X-Free') == 'yes' and req.header('x-free') == 'yes'\n"
    "end\n"
    "function P.rate_limit(req) return 'ai:' .. (req.ai_id or req.ip), 2.5, 10 end\n"
    "function P.price(offer, req)\n"
    "  assert(offer.lastmod == nil and req.query == nil and #req.purposes == 2)\n"
    "  if req.purposes[2] == 'ai-train' and req.kind == 'http' then\n"
    "    return money.percent(offer.amount, 1000), offer.currency end\n"
    "  return offer.amount, offer.currency\n"
    "end\n"
    "function P.on_billing_timeout(txn)\n"
    "  if txn.billing_ref == '****5678' and txn.amount <= 50000 then return 'deferred' end\n"
    "  return 'reject'\n"
    "end\n"
    "function P.on_settle_failure(txn) tollgate.log('warn', 'settlement failed for ' .. txn.id) end\n"
    "function P.settle(req, sale) return sale.amount <= 10000 and 'async' or 'sync' end\n"
    "P.fixtures = {\n"
    "  { hook = 'price', offer = { amount = 15000, currency = 'USD' },\n"
    "    req = { purposes = { 'ai-input', 'search' } }, expect = { 15000, 'USD' } },\n"
    "  { hook = 'skip', req = { path = '/robots.txt' }, expect = { true } },\n"
    "}\n"
    "return P\n";

TEST(good_policy_hooks) {
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", write_policy("good", good_src), NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  CHECK(st != NULL);
  CHECK(tg_policy_acquire(f.rt, "nobody") == NULL);
  char version[TG_POLICY_VERSION_LEN];
  CHECK_INT(tg_policy_version(f.r, "news", version), 0);
  CHECK_STR(tg_policy_state_version(st), version);
  CHECK_INT(strlen(version), 64);

  tg_policy_error_t e;
  tg_policy_req_t req = sample_req();
  bool skip = true;
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
  CHECK(!skip);
  req.path = "/free/x";
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
  CHECK(skip);
  req.path = "/paid";
  req.header = hdr_lookup;
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
  CHECK(skip);

  tg_policy_rate_t rl;
  CHECK_INT(tg_policy_rate_limit(st, &req, &rl, &e), 0);
  CHECK(rl.limited);
  CHECK_STR(rl.key, "ai:bot-7");
  CHECK_INT(rl.keylen, 8);
  CHECK(rl.rate == 2.5);
  CHECK_INT(rl.burst, 10);

  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(pr.for_sale);
  CHECK_INT(pr.amount, 150000);
  CHECK_STR(pr.currency, "USD");
  req.kind = TG_POLICY_KIND_CONNECT;
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK_INT(pr.amount, 15000);

  tg_policy_txn_t txn = {.id = "t1", .tenant = "news", .amount = 40000, .currency = "USD",
                         .billing_ref = "acct-12345678", .reason = "timeout"};
  tg_policy_billing_t bill;
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), 0);
  CHECK_INT(bill, TG_POLICY_BILLING_DEFERRED);
  txn.amount = 60000;
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), 0);
  CHECK_INT(bill, TG_POLICY_BILLING_REJECT);
  CHECK_INT(tg_policy_on_settle_failure(st, &txn, &e), 0);
  tg_policy_sale_t sale = {.amount = 2000, .currency = "USD", .network = "eip155:84532",
                           .asset = "0xA", .payer = "0xP", .scheme = "exact"};
  tg_policy_settle_t mode = TG_POLICY_SETTLE_SYNC;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, &e), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  for (int h = 0; h < TG_POLICY_NHOOKS; h++)
    CHECK(tg_policy_has_hook(st, (tg_policy_hook_t)h));
  tg_policy_release(st);
  fix_close(&f);
}

TEST(default_policy_and_missing_hooks) {
  fix_t f;
  const char *partial = write_policy("partial", "return { skip = function() return true end }");
  CHECK_INT(fix_open(&f, NULL, "plain", NULL, "partial", partial), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "plain");
  CHECK(st != NULL);
  tg_policy_error_t e;
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0); /* the default's Lua hook */
  CHECK(pr.for_sale);
  CHECK_INT(pr.amount, 15000);
  offer.model = "free";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK_INT(pr.amount, 0);
  offer.currency = NULL;
  offer.model = "purchase";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(!pr.for_sale);
  bool skip = true;
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), TG_POLICY_ERR_NOHOOK);
  CHECK_INT(e.code, TG_POLICY_ERR_NOHOOK);
  CHECK(!skip);
  tg_policy_rate_t rl;
  CHECK_INT(tg_policy_rate_limit(st, &req, &rl, &e), TG_POLICY_ERR_NOHOOK);
  CHECK(!rl.limited);
  tg_policy_txn_t txn = {.id = "t", .amount = 1};
  tg_policy_billing_t bill = TG_POLICY_BILLING_DEFERRED;
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), 0);
  CHECK_INT(bill, TG_POLICY_BILLING_REJECT);
  tg_policy_release(st);

  /* A policy without price: the C default answers, flagged NOHOOK. */
  st = tg_policy_acquire(f.rt, "partial");
  offer = sample_offer();
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), TG_POLICY_ERR_NOHOOK);
  CHECK(pr.for_sale);
  CHECK_INT(pr.amount, 15000);
  CHECK_STR(pr.currency, "USD");
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), TG_POLICY_ERR_NOHOOK);
  CHECK_INT(bill, TG_POLICY_BILLING_REJECT);
  CHECK(!tg_policy_has_hook(st, TG_POLICY_HOOK_PRICE));
  CHECK(tg_policy_has_hook(st, TG_POLICY_HOOK_SKIP));
  tg_policy_release(st);
  fix_close(&f);
}

/* An offer without a price shows the policy a nil amount: a policy that
 * passes offer.amount on with its own currency must not make it free. */
TEST(unpriced_offer_has_nil_amount) {
  fix_t f;
  const char *pass = write_policy("pass_on", "return { price = function(offer)\n"
                                             "  return offer.amount, 'USD'\nend }");
  CHECK_INT(fix_open(&f, NULL, "pass_on", pass, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "pass_on");
  CHECK(st != NULL);
  tg_policy_error_t e;
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  offer.currency = NULL; /* no price configured, none in the catalog */
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(!pr.for_sale);
  offer = sample_offer();
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(pr.for_sale);
  CHECK_INT(pr.amount, 15000);
  tg_policy_release(st);
  fix_close(&f);
}

/* ---- limits */

/* A policy whose price runs body and whose skip answers true. */
static const char *hook_policy(const char *name, const char *body) {
  static char src[4096];
  snprintf(src, sizeof src,
           "local P = {}\n"
           "function P.skip() return true end\n"
           "function P.price(offer, req)\n%s\nend\n"
           "return P\n",
           body);
  return write_policy(name, src);
}

static const char *const timeout_bodies[] = {
    "while true do end",
    "while true do pcall(function() while true do end end) end",
    "while true do local ok = pcall(error, 'x') end",
    "while true do local s = string.rep('x', 1000) end",
    "for i = 1, 1e12 do local s = ('ab'):rep(10):upper() end",
    "return string.find(string.rep('a', 1e5), '.-.-.-.-b')",
    "return (('a'):rep(1e5)):match('.-.-.-.-b')",
    "return (('a'):rep(1e5)):gsub('.-.-.-b', 'x')",
    "for w in (('a'):rep(1e5)):gmatch('.-.-.-b') do end",
    "return string.find(string.rep('a', 1e6), string.rep('a', 1e5) .. 'b', 1, true)",
    "xpcall(function() error('x') end, function() while true do end end) while true do end",
    "local function f() local ok, e = xpcall(f, f) error(e, 0) end f()",
    "local function f() pcall(f) pcall(f) end f()",
    "local e = setmetatable({}, { __tostring = function() while true do end end })\n"
    "  pcall(function() return tostring(e) end) return 1, 'USD'",
    "local t = {} for i = 1, 1e5 do t[i] = i end\n"
    "  while true do table.sort(t, function(a, b) return a > b end) end",
    NULL};

TEST(timeouts_stop_and_state_recovers) {
  tg_policy_options_t opt = {.time_limit_ms = 50};
  for (int i = 0; timeout_bodies[i]; i++) {
    fix_t f;
    char name[32];
    snprintf(name, sizeof name, "loop%d", i);
    CHECK_INT(fix_open(&f, &opt, "news", hook_policy(name, timeout_bodies[i]), NULL, NULL), 0);
    tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
    tg_policy_req_t req = sample_req();
    tg_policy_offer_t offer = sample_offer();
    tg_policy_price_t pr;
    tg_policy_error_t e;
    for (int round = 0; round < 2; round++) {
      double t0 = now_s();
      int rc = tg_policy_price(st, &offer, &req, &pr, &e);
      double took = now_s() - t0;
      if (rc != TG_POLICY_ERR_TIMEOUT)
        fprintf(stderr, "  body %d: rc %d: %s\n", i, rc, e.msg);
      CHECK_INT(rc, TG_POLICY_ERR_TIMEOUT);
      CHECK(!pr.for_sale);
      CHECK_STR(e.msg, "policy news: price: exceeded its time limit (50 ms)");
      CHECK(took >= 0.045);
      if (took > 0.5)
        fprintf(stderr, "  body %d took %.3f s\n", i, took);
      CHECK(took < 0.5);
      /* The same state answers the next call. */
      bool skip = false;
      CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
      CHECK(skip);
    }
    tg_policy_release(st);
    fix_close(&f);
  }
  CHECK(metrics_has("policy_errors_total{tenant_id=\"news\",hook=\"price\",kind=\"timeout\"}"));
}

TEST(error_object_with_looping_tostring_is_not_converted) {
  fix_t f;
  const char *p = hook_policy(
      "errobj", "error(setmetatable({}, { __tostring = function() while true do end end }))");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  double t0 = now_s();
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), TG_POLICY_ERR_RUNTIME);
  CHECK(now_s() - t0 < 0.04);
  CHECK_STR(e.msg, "policy news: price: (error object is a table value)");
  tg_policy_release(st);
  fix_close(&f);

  /* The same at load time. */
  char err[TG_POLICY_MSG_LEN];
  p = write_policy("errobj2", "error(setmetatable({}, { __tostring = function() while true do end end }))");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "(error object is a table value)") != NULL);
}

TEST(memory_bomb_fails_that_state_only) {
  tg_policy_options_t opt = {.time_limit_ms = 5000, .memory_limit = 16u << 20};
  static const char *const bodies[] = {
      "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end",
      "return string.rep('x', 1e9), 'USD'",
      "local ok = pcall(string.rep, 'x', 1e9) return 1, 'USD'",
      "local t = {} while true do t[#t + 1] = {} end",
      "local s = 'x' while true do s = s .. s end",
      NULL};
  for (int i = 0; bodies[i]; i++) {
    fix_t f;
    char name[32];
    snprintf(name, sizeof name, "bomb%d", i);
    CHECK_INT(fix_open(&f, &opt, "news", hook_policy(name, bodies[i]), "other",
                       write_policy("good", good_src)),
              0);
    tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
    tg_policy_state_t *other = tg_policy_acquire(f.rt, "other");
    tg_policy_req_t req = sample_req();
    tg_policy_offer_t offer = sample_offer();
    tg_policy_price_t pr;
    tg_policy_error_t e;
    int rc = tg_policy_price(st, &offer, &req, &pr, &e);
    if (rc != TG_POLICY_ERR_MEMORY)
      fprintf(stderr, "  body %d: rc %d: %s\n", i, rc, e.msg);
    CHECK_INT(rc, TG_POLICY_ERR_MEMORY);
    CHECK(strstr(e.msg, "policy news: price: exceeded its memory limit") == e.msg);
    bool skip = false;
    CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
    CHECK(skip);
    CHECK_INT(tg_policy_price(other, &offer, &req, &pr, &e), 0);
    CHECK_INT(pr.amount, 150000);
    tg_policy_release(other);
    tg_policy_release(st);
    fix_close(&f);
  }
  CHECK(metrics_has("policy_errors_total{tenant_id=\"news\",hook=\"price\",kind=\"memory\"}"));
}

TEST(state_kept_near_the_memory_cap_is_rebuilt) {
  tg_policy_options_t opt = {.time_limit_ms = 5000, .memory_limit = 16u << 20};
  const char *p = hook_policy("hoard", "HOARD = HOARD or {}\n"
                                       "HOARD[#HOARD + 1] = string.rep('x', 1e6) .. #HOARD\n"
                                       "return #HOARD, 'USD'");
  fix_t f;
  CHECK_INT(fix_open(&f, &opt, "news", p, NULL, NULL), 0);
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  int rc = 0, calls = 0;
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  while (rc == 0 && calls < 100) {
    rc = tg_policy_price(st, &offer, &req, &pr, &e);
    calls++;
  }
  CHECK_INT(rc, TG_POLICY_ERR_MEMORY);
  CHECK(calls > 5);
  tg_policy_release(st);
  /* The next request gets a fresh state of the same version. */
  st = tg_policy_acquire(f.rt, "news");
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK_INT(pr.amount, 1);
  tg_policy_release(st);
  fix_close(&f);
}

TEST(runtime_error_has_file_and_line) {
  fix_t f;
  const char *p = hook_policy("rterr", "local x = nil\nreturn x.y");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), TG_POLICY_ERR_RUNTIME);
  CHECK_INT(e.code, TG_POLICY_ERR_RUNTIME);
  char want[700];
  snprintf(want, sizeof want, "policy news: price: %s:5: attempt to index local 'x' (a nil value)",
           p);
  CHECK_STR(e.msg, want);
  tg_policy_release(st);
  fix_close(&f);
  CHECK(metrics_has("policy_errors_total{tenant_id=\"news\",hook=\"price\",kind=\"error\"}"));
}

TEST(load_errors_fail_start_with_file_and_line) {
  char err[TG_POLICY_MSG_LEN], want[700];
  fix_t f;
  const char *p = write_policy("syntax", "local P = {}\nfunction P.price(\nreturn P\n");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), -EINVAL);
  snprintf(want, sizeof want, "%s:3:", p);
  CHECK(strncmp(f.err, want, strlen(want)) == 0);
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  CHECK_STR(err, f.err);

  p = write_policy("toperr", "local P = {}\n\nerror('boom')\nreturn P\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s:3: boom", p);
  CHECK_STR(err, want);

  p = write_policy("notable", "return 42");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: the policy must return a table of hooks, got number", p);
  CHECK_STR(err, want);

  p = write_policy("badhook", "return { price = 5 }");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "hook 'price' must be a function, got number") != NULL);

  p = write_policy("typo", "return { prcie = function() end }");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "unknown field 'prcie'") != NULL);

  tg_policy_options_t opt = {.load_time_limit_ms = 100};
  p = write_policy("toploop", "while true do end");
  double t0 = now_s();
  CHECK_INT(tg_policy_check_file(p, "news", &opt, err, sizeof err), -EINVAL);
  CHECK(now_s() - t0 < 1.0);
  snprintf(want, sizeof want, "%s: loading ran past its time limit (100 ms)", p);
  CHECK_STR(err, want);

  p = write_policy("badfixture", "return { skip = function() return false end,\n"
                                 "  fixtures = { { hook = 'skip', expect = { true } } } }");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: fixture 1 (skip): expected {true}, got {false}", p);
  CHECK_STR(err, want);

  CHECK(tg_policy_check_file("/nonexistent/p.lua", "news", NULL, err, sizeof err) == -ENOENT);
  CHECK(strstr(err, "/nonexistent/p.lua: cannot open") == err);
  CHECK_INT(tg_policy_check_file(NULL, "news", NULL, err, sizeof err), 0);

  /* tollgate check over a configuration: stops at the broken tenant. */
  tg_config_tenant_t t[2] = {{.name = "a", .policy_file = NULL},
                             {.name = "b", .policy_file = (char *)p}};
  tg_config_t cfg = {.tenants = t, .ntenants = 2};
  CHECK_INT(tg_policy_check_config(&cfg, NULL, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "fixture 1 (skip)") != NULL);
}

/* ---- return types */

static void expect_type_error(int *tg_failed_, tg_policy_hook_t hook, const char *ret,
                              const char *reason) {
  char src[1024], want[700];
  snprintf(src, sizeof src, "return { %s = function() return %s end }", tg_policy_hook_name(hook),
           ret);
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", write_policy("types", src), NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_txn_t txn = {.id = "t", .amount = 1};
  tg_policy_sale_t sale = {.amount = 1, .currency = "USD", .scheme = "exact"};
  tg_policy_error_t e;
  int rc = 0;
  bool skip;
  tg_policy_rate_t rl;
  tg_policy_price_t pr;
  tg_policy_billing_t bill;
  tg_policy_settle_t mode = TG_POLICY_SETTLE_ASYNC;
  switch (hook) {
  case TG_POLICY_HOOK_SKIP: rc = tg_policy_skip(st, &req, &skip, &e); break;
  case TG_POLICY_HOOK_RATE_LIMIT: rc = tg_policy_rate_limit(st, &req, &rl, &e); break;
  case TG_POLICY_HOOK_PRICE: rc = tg_policy_price(st, &offer, &req, &pr, &e); break;
  case TG_POLICY_HOOK_ON_BILLING_TIMEOUT:
    rc = tg_policy_on_billing_timeout(st, &txn, &bill, &e);
    break;
  case TG_POLICY_HOOK_SETTLE:
    /* The default asked for is ASYNC: a failure must still answer SYNC. */
    rc = tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e);
    break;
  default: break;
  }
  tg_policy_release(st);
  fix_close(&f);
  CHECK_INT(rc, TG_POLICY_ERR_TYPE);
  CHECK_INT(mode, hook == TG_POLICY_HOOK_SETTLE ? TG_POLICY_SETTLE_SYNC : TG_POLICY_SETTLE_ASYNC);
  snprintf(want, sizeof want, "policy news: %s: %s", tg_policy_hook_name(hook), reason);
  CHECK_STR(e.msg, want);
}

#define TYPE_ERROR(hook, ret, reason)                                                          \
  do {                                                                                         \
    expect_type_error(tg_failed_, hook, ret, reason);                                          \
    if (*tg_failed_) {                                                                         \
      fprintf(stderr, "  for %s returning %s\n", #hook, ret);                                  \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

TEST(garbage_return_types) {
  TYPE_ERROR(TG_POLICY_HOOK_SKIP, "'yes'", "expected boolean, got \"yes\"");
  TYPE_ERROR(TG_POLICY_HOOK_SKIP, "1", "expected boolean, got 1");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "5", "expected key string (1-256 bytes), got 5");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "''", "expected key string (1-256 bytes), got \"\"");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "string.rep('k', 257), 1, 1",
             "expected key string (1-256 bytes), got \"" /* truncated below */
             "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
             "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
             "kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"
             "kkkkkkkk\"");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', 0, 1", "expected rate number > 0, got 0");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', 0/0, 1", "expected rate number > 0, got nan");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', math.huge, 1", "expected rate number > 0, got inf");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', '5', 1", "expected rate number > 0, got \"5\"");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', 1, 0.5", "expected integer burst >= 1, got 0.5");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', 1, 0", "expected integer burst >= 1, got 0");
  TYPE_ERROR(TG_POLICY_HOOK_RATE_LIMIT, "'k', 1", "expected integer burst >= 1, got nil");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "0.5, 'USD'", "expected integer amount, got 0.5");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "-1, 'USD'", "expected integer amount, got -1");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "2^60, 'USD'", "expected integer amount, got 1.1529215046068e+18");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "'100', 'USD'", "expected integer amount, got \"100\"");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "{}", "expected integer amount, got table");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "100", "expected currency code, got nil");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "100, 5", "expected currency code, got 5");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "100, 'US D'", "expected currency code, got \"US D\"");
  TYPE_ERROR(TG_POLICY_HOOK_PRICE, "100, string.rep('A', 17)",
             "expected currency code, got \"AAAAAAAAAAAAAAAAA\"");
  TYPE_ERROR(TG_POLICY_HOOK_ON_BILLING_TIMEOUT, "'maybe'",
             "expected \"reject\" or \"deferred\", got \"maybe\"");
  TYPE_ERROR(TG_POLICY_HOOK_ON_BILLING_TIMEOUT, "nil",
             "expected \"reject\" or \"deferred\", got nil");
  TYPE_ERROR(TG_POLICY_HOOK_ON_BILLING_TIMEOUT, "true",
             "expected \"reject\" or \"deferred\", got true");
  TYPE_ERROR(TG_POLICY_HOOK_SETTLE, "1", "expected \"sync\" or \"async\", got 1");
  TYPE_ERROR(TG_POLICY_HOOK_SETTLE, "'later'", "expected \"sync\" or \"async\", got \"later\"");
  TYPE_ERROR(TG_POLICY_HOOK_SETTLE, "{}", "expected \"sync\" or \"async\", got table");
  TYPE_ERROR(TG_POLICY_HOOK_SETTLE, "nil", "expected \"sync\" or \"async\", got nil");
  TYPE_ERROR(TG_POLICY_HOOK_SETTLE, "'SYNC'", "expected \"sync\" or \"async\", got \"SYNC\"");
  CHECK(metrics_has("policy_errors_total{tenant_id=\"news\",hook=\"settle\",kind=\"type\"}"));
  CHECK(metrics_has("policy_errors_total{tenant_id=\"news\",hook=\"price\",kind=\"type\"}"));
}

/* The edges the rules admit, checked in C since the result check moved out
 * of Lua: each must come back as the value it is, never as a type error. */
TEST(edge_results_are_accepted) {
  static const char src[] =
      "local P = {}\n"
      "function P.skip(req) if req.path == '/nil' then return nil end return req.path == '/t' end\n"
      "function P.rate_limit(req)\n"
      "  if req.path == '/long' then return string.rep('k', 256), 1e-9, 2147483647 end\n"
      "  return nil\n"
      "end\n"
      "function P.price(offer, req)\n"
      "  if req.path == '/max' then return 2^53, 'Zz9999999999999Q' end\n"
      "  if req.path == '/nil' then return nil end\n"
      "  return 0, 'a'\n"
      "end\n"
      "function P.on_billing_timeout(txn) return 'deferred' end\n"
      "return P\n";
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", write_policy("edges", src), NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_error_t e;
  bool skip = true;
  req.path = "/nil";
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
  CHECK(!skip);
  req.path = "/t";
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
  CHECK(skip);
  tg_policy_rate_t rl;
  req.path = "/long";
  CHECK_INT(tg_policy_rate_limit(st, &req, &rl, &e), 0);
  CHECK(rl.limited);
  CHECK_INT(rl.keylen, 256);
  CHECK(rl.rate == 1e-9);
  CHECK_INT(rl.burst, 2147483647);
  req.path = "/x";
  CHECK_INT(tg_policy_rate_limit(st, &req, &rl, &e), 0);
  CHECK(!rl.limited);
  tg_policy_price_t pr;
  req.path = "/max";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(pr.for_sale);
  CHECK(pr.amount == 9007199254740992LL);
  CHECK_STR(pr.currency, "Zz9999999999999Q");
  req.path = "/nil";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(!pr.for_sale);
  req.path = "/zero";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(pr.for_sale && pr.amount == 0);
  CHECK_STR(pr.currency, "a");
  tg_policy_txn_t txn = {.id = "t", .amount = 1};
  tg_policy_billing_t bill;
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), 0);
  CHECK(bill == TG_POLICY_BILLING_DEFERRED);
  tg_policy_release(st);
  fix_close(&f);
}

/* ---- settle: x402/t402 settlement before or after serving */

static const char *const settle_src =
    "local P = {}\n"
    "function P.settle(req, sale)\n"
    "  if req.path == '/nilpayer' then return sale.payer == nil and 'async' or 'sync' end\n"
    "  assert(tostring(sale) == 'sale' and getmetatable(sale) == nil and sale.nope == nil)\n"
    "  assert(sale.currency == 'USD' and sale.network == 'eip155:84532' and sale.scheme == 'exact')\n"
    "  assert(sale.asset == '0xA' and sale.payer == '0xP' and req.tenant == 'news')\n"
    "  if req.path == '/raise' then error('boom') end\n"
    "  if req.path == '/loop' then while true do end end\n"
    "  if req.path == '/write' then sale.amount = 0 end\n"
    "  if sale.amount <= 10000 then return 'async' end\n"
    "  return 'sync'\n"
    "end\n"
    "return P\n";

static tg_policy_sale_t sample_sale(int64_t amount) {
  tg_policy_sale_t s = {.amount = amount, .currency = "USD", .network = "eip155:84532",
                        .asset = "0xA", .payer = "0xP", .scheme = "exact"};
  return s;
}

TEST(settle_hook_chooses_when_to_settle) {
  tg_policy_options_t opt = {.time_limit_ms = 50};
  fix_t f;
  CHECK_INT(fix_open(&f, &opt, "stl", write_policy("settle", settle_src), NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "stl");
  CHECK(st != NULL);
  CHECK(tg_policy_has_hook(st, TG_POLICY_HOOK_SETTLE));
  CHECK_STR(tg_policy_hook_name(TG_POLICY_HOOK_SETTLE), "settle");
  tg_policy_req_t req = sample_req();
  tg_policy_sale_t sale = sample_sale(2000);
  tg_policy_settle_t mode = TG_POLICY_SETTLE_SYNC;
  tg_policy_error_t e;

  /* The answer is the policy's, whatever the default. */
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, &e), 0);
  CHECK_INT(e.code, 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  sale.amount = 10000;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, &e), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  sale.amount = 10001;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_SYNC);
  /* NULL fields are nil. */
  req.path = "/nilpayer";
  sale.payer = NULL;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, &e), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  sale = sample_sale(2000);

  /* Failures answer SYNC (settle first), even with ASYNC as the default. */
  req.path = "/raise";
  mode = TG_POLICY_SETTLE_ASYNC;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e),
            TG_POLICY_ERR_RUNTIME);
  CHECK_INT(e.code, TG_POLICY_ERR_RUNTIME);
  CHECK_INT(mode, TG_POLICY_SETTLE_SYNC);
  char want[700];
  snprintf(want, sizeof want, "policy stl: settle: %s:7: boom", policy_path_("settle"));
  CHECK_STR(e.msg, want);
  req.path = "/write";
  mode = TG_POLICY_SETTLE_ASYNC;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e),
            TG_POLICY_ERR_RUNTIME);
  CHECK(strstr(e.msg, "attempt to modify read-only view 'sale' (field 'amount')") != NULL);
  CHECK_INT(mode, TG_POLICY_SETTLE_SYNC);
  req.path = "/loop";
  mode = TG_POLICY_SETTLE_ASYNC;
  double t0 = now_s();
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e),
            TG_POLICY_ERR_TIMEOUT);
  double took = now_s() - t0;
  CHECK(took >= 0.045 && took < 0.5);
  CHECK_STR(e.msg, "policy stl: settle: exceeded its time limit (50 ms)");
  CHECK_INT(mode, TG_POLICY_SETTLE_SYNC);
  /* The state answers the next call. */
  req.path = "/articles/1";
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, &e), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  tg_policy_release(st);
  fix_close(&f);

  /* Every call is timed; failures are counted by kind, under hook "settle". */
  CHECK(metrics_has("policy_hook_duration_seconds_count{tenant_id=\"stl\",hook=\"settle\"} 8\n"));
  CHECK(metrics_has("policy_errors_total{tenant_id=\"stl\",hook=\"settle\",kind=\"error\"} 2\n"));
  CHECK(metrics_has("policy_errors_total{tenant_id=\"stl\",hook=\"settle\",kind=\"timeout\"} 1\n"));
}

TEST(settle_without_the_hook_answers_the_callers_default) {
  fix_t f;
  const char *partial = write_policy("nosettle", "return { skip = function() return true end }");
  CHECK_INT(fix_open(&f, NULL, "plain", NULL, "nosettle", partial), 0);
  const char *const tenants[] = {"plain", "nosettle"};
  for (int i = 0; i < 2; i++) {
    tg_policy_state_t *st = tg_policy_acquire(f.rt, tenants[i]);
    CHECK(st != NULL);
    CHECK(!tg_policy_has_hook(st, TG_POLICY_HOOK_SETTLE)); /* the default policy has none */
    tg_policy_req_t req = sample_req();
    tg_policy_sale_t sale = sample_sale(2000);
    tg_policy_settle_t mode = TG_POLICY_SETTLE_SYNC;
    tg_policy_error_t e;
    CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_ASYNC, &mode, &e),
              TG_POLICY_ERR_NOHOOK);
    CHECK_INT(e.code, TG_POLICY_ERR_NOHOOK);
    CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
    CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, NULL),
              TG_POLICY_ERR_NOHOOK);
    CHECK_INT(mode, TG_POLICY_SETTLE_SYNC);
    tg_policy_release(st);
  }
  fix_close(&f);
  /* No call ran: nothing timed. */
  CHECK(!metrics_has("policy_hook_duration_seconds_count{tenant_id=\"plain\",hook=\"settle\"}"));
}

/* on_settle_failure serves an x402 settlement too: its fields are there,
 * and nil on the Connect path, which does not set them. */
TEST(on_settle_failure_sees_x402_fields) {
  fix_t f;
  const char *p = write_policy(
      "x402fail", "return { on_settle_failure = function(txn)\n"
                  "  if txn.id == 'x402' then\n"
                  "    assert(txn.network == 'eip155:84532' and txn.payer == '0xP')\n"
                  "    assert(txn.transaction == '0xT' and txn.error == 'insufficient_funds')\n"
                  "    assert(txn.amount == 2000 and txn.currency == 'USD' and txn.reason == 'error')\n"
                  "  else\n"
                  "    assert(txn.network == nil and txn.payer == nil and txn.transaction == nil)\n"
                  "    assert(txn.error == nil and txn.billing_ref == '****5678')\n"
                  "  end\n"
                  "end }\n");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_error_t e;
  tg_policy_txn_t x402 = {.id = "x402", .tenant = "news", .amount = 2000, .currency = "USD",
                          .reason = "error", .network = "eip155:84532", .payer = "0xP",
                          .transaction = "0xT", .error = "insufficient_funds"};
  CHECK_INT(tg_policy_on_settle_failure(st, &x402, &e), 0);
  tg_policy_txn_t connect = {.id = "c1", .tenant = "news", .amount = 1, .currency = "USD",
                             .billing_ref = "acct-12345678", .reason = "error"};
  CHECK_INT(tg_policy_on_settle_failure(st, &connect, &e), 0);
  x402.transaction = "0xOther";
  CHECK_INT(tg_policy_on_settle_failure(st, &x402, &e), TG_POLICY_ERR_RUNTIME);
  tg_policy_release(st);
  fix_close(&f);
}

/* ---- sandbox escapes: each snippet runs as a policy's top level and must
 * fail with the given message (validation refuses the policy). */

static const struct {
  const char *code, *error;
} escapes[] = {
    {"io.open('/etc/passwd')", "attempt to index global 'io' (a nil value)"},
    {"os.execute('true')", "attempt to call field 'execute' (a nil value)"},
    {"os.exit(1)", "attempt to call field 'exit' (a nil value)"},
    {"return os.getenv('HOME')", "attempt to call field 'getenv' (a nil value)"},
    {"os.remove('/tmp/x')", "attempt to call field 'remove' (a nil value)"},
    {"require('ffi')", "module 'ffi' is not allowed in a policy"},
    {"require('jit')", "module 'jit' is not allowed in a policy"},
    {"require('debug')", "module 'debug' is not allowed in a policy"},
    {"require('io')", "module 'io' is not allowed in a policy"},
    {"require('tollgate.sandbox')", "module 'tollgate.sandbox' is not allowed in a policy"},
    {"load('return 1')", "attempt to call global 'load' (a nil value)"},
    {"loadstring('return 1')", "attempt to call global 'loadstring' (a nil value)"},
    {"dofile('/etc/passwd')", "attempt to call global 'dofile' (a nil value)"},
    {"loadfile('/etc/passwd')", "attempt to call global 'loadfile' (a nil value)"},
    {"string.dump(print)", "attempt to call field 'dump' (a nil value)"},
    {"return ('').dump(function() end)", "attempt to call field 'dump' (a nil value)"},
    {"getfenv(1)", "attempt to call global 'getfenv' (a nil value)"},
    {"setfenv(1, {})", "attempt to call global 'setfenv' (a nil value)"},
    {"rawset(string, 'x', 1)", "attempt to call global 'rawset' (a nil value)"},
    {"rawget(string, 'x')", "attempt to call global 'rawget' (a nil value)"},
    {"string.upper = nil", "attempt to modify read-only table 'string' (field 'upper')"},
    {"table.insert = print", "attempt to modify read-only table 'table' (field 'insert')"},
    {"math.pi = 3", "attempt to modify read-only table 'math' (field 'pi')"},
    {"os.time = nil", "attempt to modify read-only table 'os' (field 'time')"},
    {"tollgate.tenant = 'other'", "attempt to modify read-only table 'tollgate' (field 'tenant')"},
    {"require('tollgate.money').percent = nil",
     "attempt to modify read-only table 'tollgate.money' (field 'percent')"},
    {"getmetatable('').__index.upper = nil", "attempt to index a nil value"},
    {"setmetatable(string, {})", "cannot change a protected metatable"},
    {"return getmetatable(string).x", "attempt to index a boolean value"},
    {"collectgarbage()", "attempt to call global 'collectgarbage' (a nil value)"},
    {"newproxy(true)", "attempt to call global 'newproxy' (a nil value)"},
    {"coroutine.wrap(function() end)", "attempt to index global 'coroutine' (a nil value)"},
    {"debug.sethook()", "attempt to index global 'debug' (a nil value)"},
    {"jit.on()", "attempt to index global 'jit' (a nil value)"},
    {"return package.loaded", "attempt to index global 'package' (a nil value)"},
    {"return _G.io.open", "attempt to index field 'io' (a nil value)"},
    {"gcinfo()", "attempt to call global 'gcinfo' (a nil value)"},
    {"module('x')", "attempt to call global 'module' (a nil value)"},
    {"print('x')", "attempt to call global 'print' (a nil value)"},
    {"setmetatable('', {})", "bad argument #1 to 'setmetatable' (table expected, got string)"},
    {NULL, NULL}};

TEST(sandbox_escapes_are_closed) {
  char err[TG_POLICY_MSG_LEN], src[512];
  for (int i = 0; escapes[i].code; i++) {
    snprintf(src, sizeof src, "do %s end\nreturn {}\n", escapes[i].code);
    const char *p = write_policy("escape", src);
    int rc = tg_policy_check_file(p, "news", NULL, err, sizeof err);
    if (rc != -EINVAL || strstr(err, escapes[i].error) == NULL)
      fprintf(stderr, "  escape '%s': rc %d: %s\n", escapes[i].code, rc, err);
    CHECK_INT(rc, -EINVAL);
    CHECK(strstr(err, escapes[i].error) != NULL);
  }
  /* Bytecode is refused before it is parsed. */
  const char *p = write_policy("bytecode", "\033LJ\002\012\000garbage");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "bytecode chunks are not allowed") != NULL);
  /* A failed mutation leaves the tables working; the string metatable is
   * hidden; what the allowlist grants works. */
  p = write_policy("intact",
                   "pcall(function() string.upper = nil end)\n"
                   "pcall(function() getmetatable('').__index.upper = nil end)\n"
                   "assert(('a'):upper() == 'A' and string.upper('b') == 'B')\n"
                   "assert(getmetatable('') == nil and getmetatable(string) == false)\n"
                   "local mt = setmetatable({}, { __index = function() return 7 end })\n"
                   "assert(mt.anything == 7)\n"
                   "local n = 0 for k in pairs(string) do n = n + 1 end assert(n > 10)\n"
                   "assert(string.dump == nil and os.execute == nil)\n"
                   "assert(type(tollgate.now()) == 'number' and tollgate.tenant == 'news')\n"
                   "assert(require('tollgate.money').from_decimal('0.015', 6) == 15000)\n"
                   "assert(select('#', pcall(error)) == 2)\n"
                   "return {}\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), 0);
}

TEST(views_are_read_only_and_scoped_to_the_call) {
  fix_t f;
  const char *p = write_policy(
      "views", "local saved\n"
               "return {\n"
               "  skip = function(req) saved = req; req.path = '/x' end,\n"
               "  rate_limit = function(req) return saved.path, 1, 1 end,\n"
               "  price = function(offer, req) offer.amount = 0 end,\n"
               "  on_billing_timeout = function(txn)\n"
               "    assert(getmetatable(txn) == nil and tostring(txn) == 'txn')\n"
               "    assert(txn.billing_ref == '****5678' and txn.items == 3 and txn.nope == nil)\n"
               "    txn.amount = 1 end,\n"
               "}\n");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_txn_t txn = {.id = "t", .amount = 1, .billing_ref = "acct-12345678", .items = 3};
  tg_policy_error_t e;
  bool skip;
  tg_policy_price_t pr;
  tg_policy_rate_t rl;
  tg_policy_billing_t bill;
  CHECK_INT(tg_policy_skip(st, &req, &skip, &e), TG_POLICY_ERR_RUNTIME);
  CHECK(strstr(e.msg, "attempt to modify read-only view 'req' (field 'path')") != NULL);
  /* A view kept past its call reads the current call's data, never stale memory. */
  req.path = "/now";
  CHECK_INT(tg_policy_rate_limit(st, &req, &rl, &e), 0);
  CHECK_STR(rl.key, "/now");
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), TG_POLICY_ERR_RUNTIME);
  CHECK(strstr(e.msg, "attempt to modify read-only view 'offer' (field 'amount')") != NULL);
  CHECK_INT(tg_policy_on_billing_timeout(st, &txn, &bill, &e), TG_POLICY_ERR_RUNTIME);
  CHECK(strstr(e.msg, "attempt to modify read-only view 'txn' (field 'amount')") != NULL);
  tg_policy_release(st);
  fix_close(&f);
}

/* ---- reload */

static const char *price_policy(int amount, const char *extra) {
  static char src[1024];
  snprintf(src, sizeof src,
           "return { price = function(offer) return %d, 'USD' end%s%s }\n", amount,
           extra ? ", " : "", extra ? extra : "");
  return src;
}

static int64_t price_of(tg_policy_state_t *st) {
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  if (tg_policy_price(st, &offer, &req, &pr, &e) != 0) {
    fprintf(stderr, "  price failed: %s\n", e.msg); /* unexpected: say why */
    return -1;
  }
  return pr.amount;
}

static atomic_int publishes;
static void on_publish(void *ud, uint64_t gen) {
  (void)ud;
  (void)gen;
  atomic_fetch_add(&publishes, 1);
}

TEST(reload_swaps_versions_and_keeps_pinned_state) {
  tg_policy_options_t opt = {.on_publish = on_publish};
  const char *p = write_policy("reload", price_policy(100, NULL));
  fix_t f;
  CHECK_INT(fix_open(&f, &opt, "rl", p, "dflt", NULL), 0);
  char v1[TG_POLICY_VERSION_LEN], v2[TG_POLICY_VERSION_LEN], v[TG_POLICY_VERSION_LEN];
  CHECK_INT(tg_policy_version(f.r, "rl", v1), 0);
  uint64_t gen = tg_policy_generation(f.r);
  tg_policy_state_t *old = tg_policy_acquire(f.rt, "rl");
  CHECK_INT(price_of(old), 100);
  atomic_store(&publishes, 0);

  /* Unchanged file: nothing published. */
  tg_policy_reload_result_t *res = NULL;
  size_t n = 0;
  CHECK_INT(tg_policy_reload(f.r, NULL, &res, &n), 0);
  CHECK_INT(n, 2);
  CHECK_INT(res[0].status, TG_POLICY_RELOAD_UNCHANGED);
  CHECK_INT(res[1].status, TG_POLICY_RELOAD_UNCHANGED);
  free(res);
  CHECK(tg_policy_generation(f.r) == gen);

  /* A good change: new version, new behaviour; the pinned state keeps the old. */
  write_policy("reload", price_policy(200, NULL));
  CHECK_INT(tg_policy_reload(f.r, "rl", &res, &n), 0);
  CHECK_INT(n, 1);
  CHECK_STR(res[0].tenant, "rl");
  CHECK_INT(res[0].status, TG_POLICY_RELOAD_UPDATED);
  CHECK_INT(tg_policy_version(f.r, "rl", v2), 0);
  CHECK_STR(res[0].version, v2);
  CHECK(strcmp(v1, v2) != 0);
  free(res);
  CHECK(tg_policy_generation(f.r) == gen + 1);
  CHECK_INT(atomic_load(&publishes), 1);
  tg_policy_state_t *cur = tg_policy_acquire(f.rt, "rl");
  CHECK(cur != old);
  CHECK_INT(price_of(cur), 200);
  CHECK_STR(tg_policy_state_version(cur), v2);
  CHECK_INT(price_of(old), 100);
  CHECK_STR(tg_policy_state_version(old), v1);
  tg_policy_release(old);
  tg_policy_release(cur);

  /* A broken change: refused, old version stays, error counted. */
  write_policy("reload", "return { price = function(offer) return 300, 'USD' end\n");
  CHECK_INT(tg_policy_reload(f.r, NULL, &res, &n), -EINVAL);
  CHECK_INT(res[0].status, TG_POLICY_RELOAD_FAILED);
  char want[700];
  snprintf(want, sizeof want, "%s:2:", p);
  CHECK(strncmp(res[0].error, want, strlen(want)) == 0);
  CHECK_STR(res[0].version, v2);
  free(res);
  CHECK_INT(tg_policy_version(f.r, "rl", v), 0);
  CHECK_STR(v, v2);
  cur = tg_policy_acquire(f.rt, "rl");
  CHECK_INT(price_of(cur), 200);
  tg_policy_release(cur);
  CHECK(metrics_has("policy_reload_errors_total{tenant_id=\"rl\"} 1\n"));
  CHECK(metrics_has("policy_reloads_total{tenant_id=\"rl\",result=\"error\"} 1\n"));
  CHECK(metrics_has("policy_reloads_total{tenant_id=\"rl\",result=\"ok\"} 1\n"));

  /* A failing fixture refuses the reload too. */
  write_policy("reload", price_policy(400, "fixtures = { { hook = 'price', expect = { 401, 'USD' } } }"));
  CHECK_INT(tg_policy_reload(f.r, "rl", &res, &n), -EINVAL);
  CHECK(strstr(res[0].error, "fixture 1 (price): expected {401, \"USD\"}, got {400, \"USD\"}") !=
        NULL);
  free(res);
  cur = tg_policy_acquire(f.rt, "rl");
  CHECK_INT(price_of(cur), 200);
  tg_policy_release(cur);
  CHECK(tg_policy_generation(f.r) == gen + 1);
  CHECK_INT(atomic_load(&publishes), 1);

  /* Version gauge: one series per tenant, the active version at 1 (the
   * replaced one is gone); the label is the version as shown everywhere (12
   * characters). */
  snprintf(want, sizeof want, "policy_version_info{tenant_id=\"rl\",version=\"%.12s\"} 1\n", v2);
  CHECK(metrics_has(want));
  snprintf(want, sizeof want, "policy_version_info{tenant_id=\"rl\",version=\"%.12s\"}", v1);
  CHECK(!metrics_has(want));

  CHECK_INT(tg_policy_reload(f.r, "nobody", &res, &n), -ENOENT);
  CHECK(res == NULL);

  tg_policy_info_t info;
  CHECK_INT(tg_policy_count(f.r), 2);
  CHECK_INT(tg_policy_info(f.r, 0, &info), 0);
  CHECK_STR(info.tenant, "rl");
  CHECK_STR(info.path, p);
  CHECK_STR(info.version, v2);
  CHECK_INT(tg_policy_info(f.r, 1, &info), 0);
  CHECK_STR(info.path, "");
  CHECK_INT(tg_policy_info(f.r, 2, &info), -ENOENT);

  /* sync rebuilds proactively; acquire finds nothing left to do. */
  write_policy("reload", price_policy(500, NULL));
  CHECK_INT(tg_policy_reload(f.r, "rl", NULL, NULL), 0);
  CHECK_INT(tg_policy_runtime_sync(f.rt), 1);
  CHECK_INT(tg_policy_runtime_sync(f.rt), 0);
  cur = tg_policy_acquire(f.rt, "rl");
  CHECK_INT(price_of(cur), 500);
  tg_policy_release(cur);
  fix_close(&f);
}

/* Workers call hooks while the main thread reloads good and broken versions
 * and another thread reloads concurrently: no call may fail. */
typedef struct worker_arg {
  tg_policy_registry_t *r;
  atomic_int *stop;
  long calls, failures, bad_values;
} worker_arg_t;

static void *worker_main(void *p) {
  worker_arg_t *a = p;
  char err[TG_POLICY_MSG_LEN];
  tg_policy_runtime_t *rt = tg_policy_runtime_new(a->r, err, sizeof err);
  if (rt == NULL) {
    a->failures++;
    return NULL;
  }
  while (!atomic_load(a->stop)) {
    tg_policy_state_t *st = tg_policy_acquire(rt, "news");
    if (st == NULL) {
      a->failures++;
      continue;
    }
    int64_t v1 = price_of(st), v2 = price_of(st);
    if (v1 < 0)
      a->failures++;
    else if (v1 != v2 || (v1 != 100 && v1 != 200))
      a->bad_values++; /* a pinned state must not change under the request */
    tg_policy_release(st);
    a->calls++;
  }
  tg_policy_runtime_free(rt);
  return NULL;
}

static void *reloader_main(void *p) {
  worker_arg_t *a = p;
  while (!atomic_load(a->stop)) {
    tg_policy_reload(a->r, NULL, NULL, NULL);
    a->calls++;
  }
  return NULL;
}

TEST(reload_storm_with_concurrent_workers) {
  const char *p = write_policy("storm", price_policy(100, NULL));
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  atomic_int stop = 0;
  worker_arg_t w[2] = {{f.r, &stop, 0, 0, 0}, {f.r, &stop, 0, 0, 0}};
  worker_arg_t rl = {f.r, &stop, 0, 0, 0};
  pthread_t th[3];
  for (int i = 0; i < 2; i++)
    pthread_create(&th[i], NULL, worker_main, &w[i]);
  pthread_create(&th[2], NULL, reloader_main, &rl);
  int ok = 0, refused = 0;
  for (int i = 0; i < 40; i++) {
    if (i % 2)
      write_policy("storm", "return { price = ");
    else
      write_policy("storm", price_policy(i % 4 ? 100 : 200, NULL));
    int rc = tg_policy_reload(f.r, "news", NULL, NULL);
    if (rc == 0)
      ok++;
    else
      refused++;
  }
  atomic_store(&stop, 1);
  for (int i = 0; i < 3; i++)
    pthread_join(th[i], NULL);
  printf("  storm: %d reloads accepted, %d refused, %ld + %ld calls, %ld concurrent reloads\n",
         ok, refused, w[0].calls, w[1].calls, rl.calls);
  CHECK_INT(w[0].failures + w[1].failures, 0);
  CHECK_INT(w[0].bad_values + w[1].bad_values, 0);
  CHECK(w[0].calls > 0 && w[1].calls > 0);
  CHECK(refused >= 1);
  fix_close(&f);
}

TEST(money_module) {
  char err[TG_POLICY_MSG_LEN];
  const char *p = write_policy(
      "money", "local m = require('tollgate.money')\n"
               "assert(m.from_decimal('0.015', 6) == 15000)\n"
               "assert(m.from_decimal('12', 2) == 1200)\n"
               "assert(m.to_decimal(15000, 6) == '0.015')\n"
               "assert(m.to_decimal(1000000, 6) == '1')\n"
               "assert(m.to_decimal(-5, 2) == '-0.05')\n"
               "assert(m.percent(15000, 12.5) == 1875)\n"
               "assert(m.percent(5, 50) == 3)\n"
               "assert(m.percent(333, 15) == 50)\n"
               "assert(not pcall(m.from_decimal, '0.0000001', 6))\n"
               "assert(not pcall(m.from_decimal, 0.5, 6))\n"
               "assert(not pcall(m.to_decimal, 0.5, 6))\n"
               "return {}\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), 0);
}

TEST(embedded_runtime_is_present) {
  size_t len = 0;
  const char *s = tg_policy_embedded("tollgate/sandbox.lua", &len);
  CHECK(s != NULL && len > 1000);
  CHECK(strstr(s, "sandbox.load") != NULL);
  CHECK(tg_policy_embedded("default_policy.lua", &len) != NULL);
  CHECK(tg_policy_embedded("tollgate/money.lua", &len) != NULL);
  CHECK(tg_policy_embedded("nope.lua", &len) == NULL);
}

TEST(deep_recursion_is_a_runtime_error) {
  static const char *const bodies[] = {
      "local function f(n) return 1 + f(n + 1) end return f(1)",
      "local function f() local ok = pcall(f) return ok end f() error('unwound')",
      "local t = setmetatable({}, {}) getmetatable(t).__index = t return t.x",
      NULL};
  for (int i = 0; bodies[i]; i++) {
    fix_t f;
    CHECK_INT(fix_open(&f, NULL, "news", hook_policy("recurse", bodies[i]), NULL, NULL), 0);
    tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
    tg_policy_req_t req = sample_req();
    tg_policy_offer_t offer = sample_offer();
    tg_policy_price_t pr;
    tg_policy_error_t e;
    int rc = tg_policy_price(st, &offer, &req, &pr, &e);
    if (rc != TG_POLICY_ERR_RUNTIME)
      fprintf(stderr, "  body %d: rc %d: %s\n", i, rc, e.msg);
    CHECK_INT(rc, TG_POLICY_ERR_RUNTIME);
    bool skip = false;
    CHECK_INT(tg_policy_skip(st, &req, &skip, &e), 0);
    CHECK(skip);
    tg_policy_release(st);
    fix_close(&f);
  }
}

/* ---- The C stack and time spent inside C functions */

/* A policy with a top level (prelude) and a price hook running body. */
static const char *body_policy(const char *name, const char *prelude, const char *body) {
  static char src[4096];
  snprintf(src, sizeof src,
           "%s\n"
           "local P = {}\n"
           "function P.skip() return true end\n"
           "function P.price(offer, req)\n%s\nend\n"
           "return P\n",
           prelude, body);
  return write_policy(name, src);
}

/* Calls price once on a fresh runtime; rc, the time it took and e. */
static int price_call(const tg_policy_options_t *opt, const char *path, tg_policy_price_t *pr,
                      tg_policy_error_t *e, double *took, bool *still_answers) {
  fix_t f;
  int rc = fix_open(&f, opt, "news", path, NULL, NULL);
  if (rc != 0) {
    snprintf(e->msg, sizeof e->msg, "%s", f.err);
    return rc;
  }
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  double t0 = now_s();
  rc = tg_policy_price(st, &offer, &req, pr, e);
  *took = now_s() - t0;
  tg_policy_error_t e2;
  bool skip = false;
  *still_answers = tg_policy_skip(st, &req, &skip, &e2) == 0 && skip;
  tg_policy_release(st);
  fix_close(&f);
  return rc;
}

/* Recursion through library functions that call back into Lua from C. LuaJIT
 * bounds only its Lua stack, so each of these used to crash the process with
 * SIGSEGV (gsub: 9 KiB of C stack a level) or, unwinding thousands of C
 * frames, to overrun the time limit (sort, format). */
static const char *const nested_bodies[] = {
    "local function f(s) return (s:gsub('.', f)) end return f('x')",
    "local t\n"
    "t = setmetatable({}, { __index = function(_, k) return (('x'):gsub('x', t)) end })\n"
    "return ('x'):gsub('x', t)",
    "local o = setmetatable({}, { __tostring = function(o) return string.format('%s', o) end })\n"
    "return string.format('%s', o)",
    "local function f(a, b) table.sort({ 3, 2, 1 }, f) return a < b end table.sort({ 3, 2, 1 }, f)",
    "local mt = {}\n"
    "mt.__lt = function() table.sort({ setmetatable({}, mt), setmetatable({}, mt) }) return false end\n"
    "table.sort({ setmetatable({}, mt), setmetatable({}, mt) })",
    "local function f(s)\n"
    "  local o = setmetatable({}, { __tostring = function() return (s:gsub('.', f)) end })\n"
    "  return string.format('%s', o)\n"
    "end\n"
    "return f('x')",
    "local function f(s)\n"
    "  local ok, r = pcall(string.gsub, s, '.', f)\n"
    "  if not ok then error(r, 0) end\n"
    "  return r\n"
    "end\n"
    "return f('x')",
    NULL};

TEST(callbacks_nested_in_c_fail_instead_of_crashing) {
  tg_policy_options_t opt = {.time_limit_ms = 50};
  for (int i = 0; nested_bodies[i]; i++) {
    tg_policy_price_t pr;
    tg_policy_error_t e;
    double took;
    bool answers = false;
    int rc = price_call(&opt, body_policy("nested", "", nested_bodies[i]), &pr, &e, &took,
                        &answers);
    if (rc != TG_POLICY_ERR_RUNTIME || strstr(e.msg, "C stack overflow") == NULL)
      fprintf(stderr, "  body %d: rc %d: %s\n", i, rc, e.msg);
    CHECK_INT(rc, TG_POLICY_ERR_RUNTIME);
    CHECK(strstr(e.msg, "C stack overflow (library functions calling back into Lua nested too "
                        "deeply)") != NULL);
    CHECK(took < 0.5);
    CHECK(answers);
  }
  /* os.time reads its table in Lua now: a recursive __index ends on the Lua stack. */
  tg_policy_price_t pr;
  tg_policy_error_t e;
  double took;
  bool answers = false;
  const char *p = body_policy(
      "ostime", "",
      "local t\n"
      "t = setmetatable({}, { __index = function(_, k) if k == 'day' then return os.time(t) end end })\n"
      "return os.time(t)");
  CHECK_INT(price_call(&opt, p, &pr, &e, &took, &answers), TG_POLICY_ERR_RUNTIME);
  CHECK(strstr(e.msg, "stack overflow") != NULL);
  CHECK(answers);

  /* At load, as `tollgate check` and a reload run it. */
  char err[TG_POLICY_MSG_LEN];
  p = write_policy("nested_load", "local function f(s) return (s:gsub('.', f)) end\n"
                                  "f('x')\n"
                                  "return {}\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  char want[700];
  snprintf(want, sizeof want,
           "%s:1: C stack overflow (library functions calling back into Lua nested too deeply)", p);
  CHECK_STR(err, want);

  /* A policy may still nest them a little. */
  p = body_policy("nested_ok", "",
                  "local function f(s, d)\n"
                  "  if d == 0 then return s end\n"
                  "  return (s:gsub('.', function(c) return f(c, d - 1) end))\n"
                  "end\n"
                  "assert(f('ab', 40) == 'ab')\n"
                  "local t = { 3, 1, 2 }\n"
                  "table.sort(t, function(a, b) return string.format('%s', a) < f(tostring(b), 5) end)\n"
                  "assert(t[1] == 1 and t[3] == 3)\n"
                  "return 7, 'USD'");
  CHECK_INT(price_call(&opt, p, &pr, &e, &took, &answers), 0);
  CHECK_INT(pr.amount, 7);
}

typedef struct small_stack_arg {
  tg_policy_registry_t *r;
  int rc[2];
  char msg[2][TG_POLICY_MSG_LEN];
} small_stack_arg_t;

static void *small_stack_main(void *p) {
  small_stack_arg_t *a = p;
  char err[TG_POLICY_MSG_LEN];
  tg_policy_runtime_t *rt = tg_policy_runtime_new(a->r, err, sizeof err);
  if (rt == NULL) {
    a->rc[0] = a->rc[1] = -1;
    snprintf(a->msg[0], sizeof a->msg[0], "%s", err);
    return NULL;
  }
  tg_policy_state_t *st = tg_policy_acquire(rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  a->rc[0] = tg_policy_price(st, &offer, &req, &pr, &e);
  snprintf(a->msg[0], sizeof a->msg[0], "%s", e.msg);
  bool skip = false;
  a->rc[1] = tg_policy_skip(st, &req, &skip, &e);
  tg_policy_release(st);
  tg_policy_runtime_free(rt);
  return NULL;
}

/* A thread with a small stack gets the error sooner, never a crash. */
TEST(small_thread_stacks_get_errors_not_crashes) {
  static const size_t sizes[] = {256u << 10, 512u << 10};
  for (int b = 0; b < 3; b++) {
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
      fix_t f;
      CHECK_INT(fix_open(&f, NULL, "news", body_policy("small", "", nested_bodies[b]), NULL, NULL),
                0);
      small_stack_arg_t a = {.r = f.r};
      pthread_attr_t attr;
      pthread_attr_init(&attr);
      pthread_attr_setstacksize(&attr, sizes[k]);
      pthread_t th;
      CHECK_INT(pthread_create(&th, &attr, small_stack_main, &a), 0);
      pthread_join(th, NULL);
      pthread_attr_destroy(&attr);
      if (a.rc[0] != TG_POLICY_ERR_RUNTIME)
        fprintf(stderr, "  body %d, stack %zu: rc %d: %s\n", b, sizes[k], a.rc[0], a.msg[0]);
      CHECK_INT(a.rc[0], TG_POLICY_ERR_RUNTIME);
      CHECK(strstr(a.msg[0], "C stack overflow") != NULL);
      CHECK_INT(a.rc[1], 0);
      fix_close(&f);
    }
  }
}

/* Calls whose cost in C follows an argument, or that take long in C on data
 * kept from the top level: the count hook cannot fire inside them, so they
 * used to overrun the 50 ms limit 8x to 60x. Now an argument past its cost
 * bound is an error, long work runs in steps the limit can stop between, and
 * the watchdog stops the first instruction after a long C call. */
static const struct {
  const char *prelude, *body;
} c_time_attacks[] = {
    {"", "local t = { 1, 2, 3 } table.insert(t, -3e8, 0) return 1, 'USD'"},
    {"", "for i = 1, 1e9 do local s = string.rep('ab', 5e6) end"},
    {"local big = string.rep('a', 8e6)", "while true do local u = big:upper() end"},
    {"local big = string.rep('a', 8e6)", "while true do local q = string.format('%q', big) end"},
    {"local a, b = ('a'):rep(6e6) .. 'b', ('a'):rep(6e6) .. 'c'",
     "local n = 0 while true do if a < b then n = n + 1 end end"},
    {"local t = {} for i = 1, 2e6 do t[i] = i end", "while true do local s = table.concat(t) end"},
    {"local t = {} for i = 1, 1e5 do t[i] = tostring(i * 7919 % 100003) end",
     "while true do table.sort(t) end"},
    {"local s = ('a'):rep(2e6)", "while true do local r = s:gsub('.', '%0%0') end"},
    {"local s = ('a'):rep(1e5)", "while true do local r = s:gsub('.', ('%0'):rep(100)) end"},
    {"", "local function f(a, b) table.sort({ 3, 2, 1 }, f) return a < b end\n"
         "while true do pcall(table.sort, { 3, 2, 1 }, f) end"},
    {"", "local o = setmetatable({}, { __tostring = function(o) return string.format('%s', o) end })\n"
         "while true do pcall(string.format, '%s', o) end"},
    {"", "return string.find(string.rep('a', 1e5), '.-.-.-.-.-b')"},
    {NULL, NULL}};

TEST(c_calls_stay_within_the_time_limit) {
  tg_policy_options_t opt = {.time_limit_ms = 50};
  for (int i = 0; c_time_attacks[i].prelude; i++) {
    char name[32];
    snprintf(name, sizeof name, "ctime%d", i);
    const char *p = body_policy(name, c_time_attacks[i].prelude, c_time_attacks[i].body);
    for (int round = 0; round < 2; round++) {
      tg_policy_price_t pr;
      tg_policy_error_t e;
      double took;
      bool answers = false;
      int rc = price_call(&opt, p, &pr, &e, &took, &answers);
      printf("  attack %d: %.1f ms (%.1fx the limit): %s\n", i, took * 1e3, took / 0.05,
             rc ? e.msg : "ok");
      if (i == 0) {
        CHECK_INT(rc, TG_POLICY_ERR_RUNTIME);
        CHECK(strstr(e.msg, "bad argument #2 to 'insert' (position out of bounds)") != NULL);
      } else {
        /* A call that filled the heap may stop on memory first: either way, fast. */
        CHECK(rc == TG_POLICY_ERR_TIMEOUT || rc == TG_POLICY_ERR_MEMORY);
      }
      CHECK(!pr.for_sale);
      CHECK(took < 0.5); /* 10x: a bound a loaded machine cannot break */
      CHECK(answers);
    }
  }
}

/* A single C call that outlasts the limit and returns is a timeout too (fail
 * closed), even if no instruction of the policy ran after it. */
TEST(a_long_c_call_that_returns_is_a_timeout) {
  tg_policy_options_t opt = {.time_limit_ms = 5};
  const char *p = body_policy("longc", "local big = string.rep('a', 8e6)",
                              "return #string.format('%q', big) > 0 and 1, 'USD'");
  tg_policy_price_t pr;
  tg_policy_error_t e;
  double took;
  bool answers = false;
  CHECK_INT(price_call(&opt, p, &pr, &e, &took, &answers), TG_POLICY_ERR_TIMEOUT);
  CHECK_STR(e.msg, "policy news: price: exceeded its time limit (5 ms)");
  CHECK(!pr.for_sale);
}

/* os.clock() counts this state's own time: never the process's CPU time,
 * which would show a tenant how busy the others keep the gateway. */
TEST(os_clock_counts_only_this_state) {
  clock_t c0 = clock();
  volatile unsigned long spin = 0;
  while ((double)(clock() - c0) / CLOCKS_PER_SEC < 0.3) /* the process is busy elsewhere */
    spin++;
  fix_t f;
  const char *p = body_policy("clock", "local seen = os.clock()\n",
                              "local t0 = os.clock()\n"
                              "assert(seen >= 0 and seen < 0.05)\n"
                              "if req.path == '/spin' then while os.clock() - t0 < 0.01 do end end\n"
                              "return math.floor(os.clock() * 1e6), 'USD'");
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_offer_t offer = sample_offer();
  tg_policy_price_t pr;
  tg_policy_error_t e;
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  int64_t first = pr.amount;
  CHECK(first >= 0 && first < 50000); /* microseconds of this one call, not 0.3 s */
  req.path = "/spin";
  CHECK_INT(tg_policy_price(st, &offer, &req, &pr, &e), 0);
  CHECK(pr.amount >= first + 10000 && pr.amount < first + 60000);
  tg_policy_release(st);
  fix_close(&f);
}

/* A fixture that hits the hook time limit is named, with that limit. */
TEST(fixture_limits_name_the_fixture) {
  char err[TG_POLICY_MSG_LEN], want[700];
  const char *p = write_policy(
      "slow_fixture", "local P = {}\n"
                      "function P.skip() return false end\n"
                      "function P.price() while true do end end\n"
                      "P.fixtures = {\n"
                      "  { hook = 'skip', expect = { false } },\n"
                      "  { name = 'slow', hook = 'price', offer = { amount = 1, currency = 'USD' } },\n"
                      "}\n"
                      "return P\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: fixture 2 'slow' (price): exceeded its time limit (50 ms)", p);
  CHECK_STR(err, want);

  /* Also when the time goes by inside one C call. */
  tg_policy_options_t opt = {.time_limit_ms = 5};
  p = write_policy("slow_c_fixture", "local big = string.rep('a', 8e6)\n"
                                     "local P = {}\n"
                                     "function P.skip() return #string.format('%q', big) == 0 end\n"
                                     "P.fixtures = { { hook = 'skip', expect = { false } } }\n"
                                     "return P\n");
  CHECK_INT(tg_policy_check_file(p, "news", &opt, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: fixture 1 (skip): exceeded its time limit (5 ms)", p);
  CHECK_STR(err, want);

  tg_policy_options_t mopt = {.memory_limit = 16u << 20, .time_limit_ms = 5000};
  p = write_policy("fat_fixture", "local P = {}\n"
                                  "function P.skip()\n"
                                  "  local t = {} for i = 1, 1e3 do t[i] = string.rep('x', 2 ^ 20 + i) end\n"
                                  "end\n"
                                  "P.fixtures = { { hook = 'skip', expect = { false } } }\n"
                                  "return P\n");
  CHECK_INT(tg_policy_check_file(p, "news", &mopt, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: fixture 1 (skip): exceeded its memory limit (16777216 bytes)",
           p);
  CHECK_STR(err, want);

  /* The top level keeps the load limit and its message. */
  tg_policy_options_t lopt = {.load_time_limit_ms = 100};
  p = write_policy("slow_top", "while true do end\nreturn {}\n");
  CHECK_INT(tg_policy_check_file(p, "news", &lopt, err, sizeof err), -EINVAL);
  snprintf(want, sizeof want, "%s: loading ran past its time limit (100 ms)", p);
  CHECK_STR(err, want);
}

/* The tollgate binary next to this test (both are built into one folder). */
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

static const char *write_script(const char *name, const char *body) {
  const char *p = policy_path_(name);
  FILE *f = fopen(p, "w");
  if (f == NULL)
    abort();
  fputs(body, f);
  fclose(f);
  chmod(p, 0755);
  return p;
}

static tg_policy_reload_status_t reload_one_tenant(fix_t *f, char *err, size_t errlen) {
  tg_policy_reload_result_t *res = NULL;
  size_t n = 0;
  tg_policy_reload(f->r, "news", &res, &n);
  tg_policy_reload_status_t s = n == 1 ? res[0].status : TG_POLICY_RELOAD_FAILED;
  snprintf(err, errlen, "%s", n == 1 ? res[0].error : "no result");
  free(res);
  return s;
}

/* Reloads validate in a child process: what crashes or hangs there is
 * refused, and the active version keeps answering. */
TEST(reload_validates_in_a_child_process) {
  const char *exe = tollgate_exe();
  CHECK(exe != NULL);
  const char *p = write_policy("child", price_policy(100, NULL));
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  char err[TG_POLICY_MSG_LEN], want[700];

  tg_policy_set_validator(exe, 0);
  write_policy("child", price_policy(200, NULL));
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_UPDATED);
  write_policy("child", "local P = {}\nfunction P.price(o)\n  return o.amount +\nend\nreturn P\n");
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  snprintf(want, sizeof want, "%s:4: unexpected symbol near 'end'", p);
  CHECK_STR(err, want);
  write_policy("child", "local function f(s) return (s:gsub('.', f)) end\nf('x')\nreturn {}\n");
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  CHECK(strstr(err, ":1: C stack overflow") != NULL);
  write_policy("child", price_policy(300, "fixtures = { { hook = 'price', offer = { amount = 1, "
                                          "currency = 'USD' }, expect = { 300, 'USD' } } }"));
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_UPDATED);

  /* Stand-ins for a validator that crashes, hangs or is missing. */
  tg_policy_set_validator(write_script("crash.sh", "#!/bin/sh\nkill -SEGV $$\n"), 0);
  write_policy("child", price_policy(400, NULL));
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  snprintf(want, sizeof want, "%s: the policy crashed its validation (signal 11, SIGSEGV)", p);
  CHECK_STR(err, want);
  tg_policy_set_validator(write_script("hang.sh", "#!/bin/sh\nexec sleep 30\n"), 300);
  write_policy("child", price_policy(500, NULL));
  double t0 = now_s();
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  CHECK(now_s() - t0 < 5);
  snprintf(want, sizeof want, "%s: validation did not finish within 300 ms", p);
  CHECK_STR(err, want);
  tg_policy_set_validator(policy_path_("no-such-validator"), 0);
  write_policy("child", price_policy(600, NULL));
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  CHECK(strstr(err, "cannot start its validator") != NULL);
  tg_policy_set_validator(NULL, 0);

  /* Each refusal kept the version validated last. */
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  CHECK_INT(price_of(st), 300);
  tg_policy_release(st);
  fix_close(&f);
}

/* Validation (tollgate check, start-up, a reload in the validator process)
 * knows the hook, its view and its rules. */
TEST(validation_knows_the_settle_hook) {
  char err[TG_POLICY_MSG_LEN], want[700];
  const char *p = write_policy(
      "settle_ok", "return { settle = function(req, sale)\n"
                   "    return sale.amount < 100 and 'async' or 'sync' end,\n"
                   "  fixtures = {\n"
                   "    { hook = 'settle', sale = { amount = 1, scheme = 'exact' }, expect = { 'async' } },\n"
                   "    { hook = 'settle', req = { path = '/a' }, sale = { amount = 100 }, expect = { 'sync' } },\n"
                   "  } }\n");
  CHECK_INT(tg_policy_check_file(p, "news", NULL, err, sizeof err), 0);
  tg_policy_summary_t sum;
  CHECK_INT(tg_policy_check_file_summary(p, "news", NULL, &sum, err, sizeof err), 0);
  CHECK(sum.hooks[TG_POLICY_HOOK_SETTLE]);
  CHECK_INT(sum.fixtures, 2);

  static const struct {
    const char *src, *error;
  } bad[] = {
      {"return { settle = 'sync' }", "hook 'settle' must be a function, got string"},
      {"return { settle = function() return 'later' end,\n"
       "  fixtures = { { hook = 'settle', expect = { 'sync' } } } }",
       "fixture 1 (settle): expected \"sync\" or \"async\", got \"later\""},
      {"return { settle = function() return 'async' end,\n"
       "  fixtures = { { hook = 'settle', expect = { 'sync' } } } }",
       "fixture 1 (settle): expected {\"sync\"}, got {\"async\"}"},
      {"return { settle = function() return 'sync' end,\n"
       "  fixtures = { { hook = 'settle', sale = { amt = 1 }, expect = { 'sync' } } } }",
       "fixture 1 (settle): sale: unknown field 'amt'"},
      {"return { settle = function() return 'sync' end,\n"
       "  fixtures = { { hook = 'settle', sale = { amount = 0.5 }, expect = { 'sync' } } } }",
       "fixture 1 (settle): sale.amount: expected integer, got 0.5"},
      {"return { settle = function() return 'sync' end, fixtures = { { hook = 'settle', sale = 5 } } }",
       "fixture 1: sale must be a table, got number"},
      {NULL, NULL}};
  for (int i = 0; bad[i].src; i++) {
    p = write_policy("settle_bad", bad[i].src);
    int rc = tg_policy_check_file(p, "news", NULL, err, sizeof err);
    if (rc != -EINVAL || strstr(err, bad[i].error) == NULL)
      fprintf(stderr, "  bad %d: rc %d: %s\n", i, rc, err);
    CHECK_INT(rc, -EINVAL);
    CHECK(strstr(err, bad[i].error) != NULL);
  }

  /* A reload validated in the child process: refused, then published. */
  const char *exe = tollgate_exe();
  CHECK(exe != NULL);
  p = write_policy("settle_child", "return { settle = function() return 'sync' end }");
  fix_t f;
  CHECK_INT(fix_open(&f, NULL, "news", p, NULL, NULL), 0);
  tg_policy_set_validator(exe, 0);
  write_policy("settle_child", "return { settle = 5 }");
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_FAILED);
  snprintf(want, sizeof want, "%s: hook 'settle' must be a function, got number", p);
  CHECK_STR(err, want);
  write_policy("settle_child", "return { settle = function() return 'async' end,\n"
                               "  fixtures = { { hook = 'settle', expect = { 'async' } } } }");
  CHECK_INT(reload_one_tenant(&f, err, sizeof err), TG_POLICY_RELOAD_UPDATED);
  tg_policy_set_validator(NULL, 0);
  tg_policy_state_t *st = tg_policy_acquire(f.rt, "news");
  tg_policy_req_t req = sample_req();
  tg_policy_sale_t sale = sample_sale(1);
  tg_policy_settle_t mode = TG_POLICY_SETTLE_SYNC;
  CHECK_INT(tg_policy_settle(st, &req, &sale, TG_POLICY_SETTLE_SYNC, &mode, NULL), 0);
  CHECK_INT(mode, TG_POLICY_SETTLE_ASYNC);
  tg_policy_release(st);
  fix_close(&f);
}
