#include "config/config.h"
#include "base/log.h"
#include "test.h"

#include <fcntl.h>
#include <ftw.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Each test writes its files into a fresh folder under /tmp; the previous
 * folder is removed then, and the last one at exit. */
static char dir[64];
static char cfgpath[128];
static char err[1024];
static tg_config_t cfg;

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

static void cleanup(void) {
  tg_config_free(&cfg);
  if (dir[0])
    nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
  dir[0] = '\0';
}

static void fresh(void) {
  static bool registered;
  if (!registered) {
    atexit(cleanup);
    registered = true;
  }
  cleanup();
  snprintf(dir, sizeof(dir), "/tmp/tgcfg-XXXXXX");
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    exit(1);
  }
  snprintf(cfgpath, sizeof(cfgpath), "%s/tollgate.lua", dir);
  err[0] = '\0';
}

static void put_bytes(const char *name, const char *data, size_t len, mode_t mode) {
  char path[256];
  snprintf(path, sizeof(path), "%s/%s", dir, name);
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
  if (fd < 0 || write(fd, data, len) != (ssize_t)len) {
    perror(path);
    exit(1);
  }
  fchmod(fd, mode);
  close(fd);
}

static void put(const char *name, const char *text) {
  put_bytes(name, text, strlen(text), 0644);
}

/* Writes text as tollgate.lua in a fresh folder and loads it. */
static int load(const char *text) {
  fresh();
  put("tollgate.lua", text);
  return tg_config_load(cfgpath, &cfg, err, sizeof(err));
}

/* Same, keeping the folder (and files the test put there before). */
static int load_here(const char *text) {
  tg_config_free(&cfg);
  put("tollgate.lua", text);
  return tg_config_load(cfgpath, &cfg, err, sizeof(err));
}

/* err is "<cfgpath>:<line>: ..." (line 0: "<cfgpath>: ...") and holds reason. */
static bool err_is(int line, const char *reason) {
  char want[256];
  if (line > 0)
    snprintf(want, sizeof(want), "%s:%d: ", cfgpath, line);
  else
    snprintf(want, sizeof(want), "%s: ", cfgpath);
  bool ok = strncmp(err, want, strlen(want)) == 0 && strstr(err, reason) != NULL;
  if (!ok)
    fprintf(stderr, "  got:  %s\n  want: %s... %s\n", err, want, reason);
  return ok;
}

/* The LINE of "<cfgpath>:<line>: ...", or 0. */
static int err_line(void) {
  size_t n = strlen(cfgpath);
  if (strncmp(err, cfgpath, n) != 0 || err[n] != ':')
    return 0;
  return atoi(err + n + 1);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define LISTEN "  listen = { { host = \"127.0.0.1\", port = 8080 } },\n"

TEST(demo_config_loads) {
  fresh();
  snprintf(cfgpath, sizeof(cfgpath), "%s", TG_SOURCE_DIR "/deploy/demo/tollgate.lua");
  /* Loaded from the source tree: nothing of this test is written there. */
  int rc = tg_config_load(cfgpath, &cfg, err, sizeof(err));
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  CHECK_INT(rc, 0);
  CHECK_INT(cfg.nlisten, 1);
  CHECK_STR(cfg.listen[0].host, "127.0.0.1");
  CHECK_INT(cfg.listen[0].port, 8080);
  CHECK(cfg.listen[0].tls_cert == NULL);
  CHECK_STR(cfg.admin.host, "127.0.0.1");
  CHECK_INT(cfg.admin.port, 9090);
  CHECK_STR(cfg.admin_token_file, TG_SOURCE_DIR "/deploy/demo/admin.token");
  CHECK_STR(cfg.dir, TG_SOURCE_DIR "/deploy/demo");
  CHECK_STR(cfg.data_dir, TG_SOURCE_DIR "/.cache/demo-data");
  CHECK_STR(cfg.log_level, "info");
  CHECK_INT(cfg.workers, 0);
  CHECK_INT(cfg.max_body_bytes, 4194304);
  CHECK_INT(cfg.ntenants, 2);

  const tg_config_tenant_t *news = &cfg.tenants[0], *api = &cfg.tenants[1];
  CHECK_STR(news->name, "news");
  CHECK_INT(news->nhosts, 2);
  CHECK_STR(news->hosts[0], "news.example");
  CHECK_STR(news->hosts[1], "localhost");
  CHECK_STR(news->catalog_source, TG_SOURCE_DIR "/deploy/demo/rsl/news.xml");
  CHECK_INT(news->catalog_refresh_s, 300);
  CHECK_STR(news->policy_file, TG_SOURCE_DIR "/policies/news_publisher.lua");
  CHECK_STR(api->policy_file, TG_SOURCE_DIR "/policies/metered_api.lua");
  /* Each demo tenant has a signer and the built-in billing; the key path is resolved. */
  CHECK_STR(tg_config_get(&news->signer, "type"), "nginx_secure_link");
  CHECK_STR(tg_config_get(&news->signer, "key_file"), TG_SOURCE_DIR "/deploy/demo/keys/news.key");
  CHECK_STR(tg_config_get(&news->billing, "type"), "builtin");
  /* Both demo tenants take HTTP 402 payments in the test token (flattened; pay/payconf.h reads it). */
  CHECK_STR(tg_config_get(&news->payments, "accepts.1.network"), "eip155:84532");
  CHECK_STR(tg_config_get(&news->payments, "facilitators.1"), "http://127.0.0.1:4021");
  CHECK_INT(cfg.ledger.naccounts, 1);
  if (cfg.ledger.naccounts == 1)
    CHECK_STR(cfg.ledger.accounts[0].billing_reference, "acct-demo");

  CHECK_STR(api->name, "api");
  CHECK_STR(api->hosts[0], "api.example");
  CHECK_STR(api->catalog_source, TG_SOURCE_DIR "/deploy/demo/rsl/api.xml");
  CHECK_STR(tg_config_get(&api->signer, "type"), "akamai_edgeauth");
  CHECK_STR(tg_config_get(&api->billing, "type"), "builtin");
  CHECK_STR(tg_config_get(&api->payments, "accepts.1.network"), "eip155:84532");
  CHECK_STR(tg_config_get(&api->payments, "accepts.1.name"), "USDC");
  const char *pay_to = tg_config_get(&api->payments, "accepts.1.pay_to");
  const char *asset = tg_config_get(&api->payments, "accepts.1.asset");
  CHECK(pay_to && strlen(pay_to) == 42 && strncmp(pay_to, "0x", 2) == 0);
  CHECK(asset && strlen(asset) == 42 && strncmp(asset, "0x", 2) == 0);
  CHECK(tg_config_get(&api->payments, "accepts") == NULL);

  /* The demo token reads back as a clean string. */
  char *token = tg_config_read_token(&cfg, err, sizeof(err));
  CHECK(token != NULL);
  CHECK(strlen(token) >= 16 && strchr(token, '\n') == NULL);
  free(token);
}

TEST(defaults) {
  CHECK_INT(load("return {\n" LISTEN "}\n"), 0);
  CHECK_INT(cfg.workers, 0);
  CHECK_STR(cfg.log_level, "info");
  char want[128];
  snprintf(want, sizeof(want), "%s/data", cfg.dir);
  CHECK_STR(cfg.data_dir, want);
  CHECK_STR(cfg.path, cfgpath);
  CHECK(cfg.admin.host == NULL && cfg.admin_token_file == NULL);
  CHECK_INT(cfg.ntenants, 0);
  CHECK_INT(cfg.max_header_bytes, 16384);
  CHECK_INT(cfg.max_body_bytes, 4194304);
  CHECK_INT(cfg.header_timeout_ms, 10000);
  CHECK_INT(cfg.body_timeout_ms, 30000);
  CHECK_INT(cfg.idle_timeout_ms, 60000);
  CHECK_INT(cfg.max_connections, 10000);
  CHECK_INT(cfg.shutdown_grace_ms, 10000);
  CHECK_INT(cfg.offer_ttl_s, 300);
  CHECK_INT(cfg.idempotency_key_max, 128);
  CHECK_INT(cfg.ingest_max_bytes, 256 << 20);
  CHECK_INT(cfg.ingest_timeout_ms, 10000);
  CHECK_INT(cfg.ingest_initial_wait_ms, 5000);
  CHECK_INT(cfg.policy_time_limit_ms, 50);
  CHECK_INT(cfg.policy_load_time_limit_ms, 1000);
  CHECK_INT(cfg.policy_memory_limit, 32 << 20);
  CHECK_INT(cfg.policy_watch_debounce_ms, 200);

  CHECK_INT(load("return {\n" LISTEN "  limits = { max_body_bytes = 1024, idle_timeout_ms = 5 },\n"
                 "  workers = 4, log_level = 'debug',\n"
                 "  tenants = { { name = 'a', hosts = { 'a.example' }, catalog = { source = 'https://x.example/rsl.xml' } } },\n"
                 "}\n"),
            0);
  CHECK_INT(cfg.max_body_bytes, 1024);
  CHECK_INT(cfg.idle_timeout_ms, 5);
  CHECK_INT(cfg.max_header_bytes, 16384);
  CHECK_INT(cfg.workers, 4);
  CHECK_STR(cfg.log_level, "debug");
  CHECK_STR(cfg.tenants[0].catalog_source, "https://x.example/rsl.xml");
  CHECK_INT(cfg.tenants[0].catalog_refresh_s, 300);
  CHECK(!cfg.tenants[0].catalog_strict);
}

TEST(syntax_error_has_line) {
  CHECK_INT(load("return {\n  listen = {\n    { host = \"127.0.0.1\" port = 1 },\n  },\n}\n"), -1);
  CHECK(err_is(3, "'}' expected"));
  CHECK(cfg.path == NULL);
}

TEST(runtime_error_has_line) {
  CHECK_INT(load("local t = nil\nreturn {\n" LISTEN "  workers = t.count,\n}\n"), -1);
  CHECK(err_is(4, "attempt to index"));
  CHECK_INT(load("-- a comment\nerror('no config today')\n"), -1);
  CHECK(err_is(2, "no config today"));
  CHECK_INT(load("error('bare', 0)\n"), -1);
  CHECK(err_is(0, "bare"));
  CHECK_INT(load("error({})\n"), -1);
  CHECK(err_is(0, "not a string"));
}

TEST(non_table_return) {
  CHECK_INT(load("local x = 1\n\nreturn x\n"), -1);
  CHECK(err_is(3, "must return a table, got number"));
  CHECK_INT(load("local x = {}\n"), -1);
  CHECK(err_is(0, "must return a table, got nil"));
}

TEST(unknown_key_top_level) {
  CHECK_INT(load("return {\n" LISTEN "  workers = 1,\n  data_dri = 'd',\n}\n"), -1);
  CHECK(err_is(4, "unknown key 'data_dri' in config (did you mean 'data_dir'?)"));
  CHECK_INT(load("return {\n  listne = { { host = '127.0.0.1', port = 1 } },\n  zzz = 1,\n}\n"), -1);
  CHECK(err_is(2, "unknown key 'listne' in config (did you mean 'listen'?)"));
  /* The first unknown key in the file is reported, whatever the hash order. */
  CHECK_INT(load("return {\n" LISTEN "  bbb = 1,\n  aaa = 2,\n}\n"), -1);
  CHECK(err_is(3, "unknown key 'bbb' in config"));
  CHECK(strstr(err, "did you mean") == NULL);
}

TEST(unknown_key_in_tenant) {
  static const char text[] = "return {\n" LISTEN
                             "  tenants = {\n"
                             "    { name = 'a', hosts = { 'a.example' } },\n"
                             "    { name = 'b',\n"
                             "      hosts = { 'b.example' },\n"
                             "      plicy = 'p.lua' },\n"
                             "  },\n"
                             "}\n";
  CHECK_INT(load(text), -1);
  CHECK(err_is(7, "unknown key 'plicy' in tenants[2] (did you mean 'policy'?)"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = {\n      sorce = 'x.xml' } } },\n}\n"),
            -1);
  CHECK(err_is(5, "unknown key 'sorce' in tenants[1].catalog (did you mean 'source'?)"));
}

TEST(lines_follow_local_variables) {
  static const char text[] = "local function ignored() return { colour = 1 } end\n"
                             "local news = {\n"
                             "  name = 'news',\n"
                             "  hosts = { 'news.example' },\n"
                             "  colour = 'red',\n"
                             "}\n"
                             "local cfg = {\n" LISTEN "  tenants = { news },\n"
                             "}\n"
                             "return cfg\n";
  CHECK_INT(load(text), -1);
  CHECK(err_is(5, "unknown key 'colour' in tenants[1]"));
  /* A table built by code has no literal: the error names the path, no line. */
  CHECK_INT(load("local function t(n) return { name = n, hosts = { n .. '.example' }, x = 1 } end\n"
                 "return {\n" LISTEN "  tenants = { t('a') },\n}\n"),
            -1);
  CHECK(err_is(4, "unknown key 'x' in tenants[1]"));
}

TEST(lines_survive_comments_and_strings) {
  static const char text[] = "--[[ a long comment { with braces,\n"
                             "  catalog = { source = 'decoy' } ]]\n"
                             "local s = [==[\n"
                             "  ]] still a string, tenants = {\n"
                             "]==]\n"
                             "return {\n" LISTEN
                             "  tenants = { { name = 'a', hosts = { string.format('%s', 'b.example', '\\'}{'), 'c.example' },\n"
                             "      -- catalog = { source = 'commented out' },\n"
                             "      [\"catalog\"] = { source = \"x\\\"}.xml\" } } },\n"
                             "}\n";
  CHECK_INT(load(text), -1);
  CHECK(err_is(10, "tenants[1].catalog.source: cannot read '"));
  CHECK(strstr(err, "/x\"}.xml': No such file") != NULL);
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { ('a'):rep(1) .. '.example' },\n"
                 "      payments = { type = 'x', f = function(a, b) return a, b end,\n"
                 "        n = 1.5 } } },\n}\n"),
            -1);
  CHECK(err_is(4, "tenants[1].payments.f: expected a string, number, boolean or table, got function") ||
        err_is(5, "tenants[1].payments.n: 1.5 is not an integer"));
}

TEST(wrong_type) {
  CHECK_INT(load("return {\n" LISTEN "  workers =\n    'four',\n}\n"), -1);
  CHECK(err_is(3, "workers: expected an integer, got string"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a',\n    hosts = 'a.example' } },\n}\n"), -1);
  CHECK(err_is(4, "tenants[1].hosts: expected a list of host names, got string"));
  CHECK_INT(load("return {\n" LISTEN "  log_level = 'loud',\n}\n"), -1);
  CHECK(err_is(3, "log_level: 'loud' is not one of"));
  CHECK_INT(load("return {\n  listen = { host = '127.0.0.1', port = 80 },\n}\n"), -1);
  CHECK(err_is(2, "listen: expected a list of tables"));
  CHECK_INT(load("return {\n" LISTEN "  limits = { max_body_bytes = 0 },\n}\n"), -1);
  CHECK(err_is(3, "limits.max_body_bytes: must be an integer in 1.."));
  CHECK_INT(load("return {\n" LISTEN "  workers = 257,\n}\n"), -1);
  CHECK(err_is(3, "workers: must be an integer in 0..256"));
}

TEST(duplicate_tenant_name) {
  static const char text[] = "return {\n" LISTEN
                             "  tenants = {\n"
                             "    { name = 'news', hosts = { 'a.example' } },\n"
                             "    { hosts = { 'b.example' },\n"
                             "      name = 'news' },\n"
                             "  },\n"
                             "}\n";
  CHECK_INT(load(text), -1);
  CHECK(err_is(6, "tenants[2].name: tenant 'news' is already defined by tenants[1]"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'News', hosts = { 'a.example' } } },\n}\n"), -1);
  CHECK(err_is(3, "'News' is not a valid tenant name"));
}

TEST(duplicate_host) {
  static const char text[] = "return {\n" LISTEN
                             "  tenants = {\n"
                             "    { name = 'a', hosts = { 'a.example', 'shared.example' } },\n"
                             "    { name = 'b', hosts = {\n"
                             "        'b.example',\n"
                             "        'Shared.Example',\n"
                             "      } },\n"
                             "  },\n"
                             "}\n";
  CHECK_INT(load(text), -1);
  CHECK(err_is(7, "tenants[2].hosts[2]: host 'shared.example' is already used by tenant 'a'"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example', 'A.EXAMPLE' } } },\n}\n"),
            -1);
  CHECK(err_is(3, "host 'a.example' is listed twice"));
}

TEST(hosts_are_checked_and_lowercased) {
  CHECK_INT(load("return {\n" LISTEN
                 "  tenants = { { name = 'a', hosts = { 'News.Example:8080', '[::1]:8443', '127.0.0.1', 'api_1.internal' } } },\n"
                 "}\n"),
            0);
  CHECK_STR(cfg.tenants[0].hosts[0], "news.example:8080");
  CHECK_STR(cfg.tenants[0].hosts[1], "[::1]:8443");
  static const char *const bad[] = {"'bad host'", "'-a.example'", "'a..example'", "'a.example:0'",
                                    "'a.example:99999'", "'::1'", "'[::1'", "''"};
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    char text[512];
    snprintf(text, sizeof(text), "return {\n" LISTEN "  tenants = { { name = 'a',\n  hosts = { %s } } },\n}\n",
             bad[i]);
    CHECK_INT(load(text), -1);
    CHECK(err_is(4, "tenants[1].hosts[1]: "));
  }
}

TEST(bad_port) {
  CHECK_INT(load("return {\n  listen = {\n    { host = '127.0.0.1',\n      port = 70000 } },\n}\n"), -1);
  CHECK(err_is(4, "listen[1].port: must be an integer in 0..65535, got 70000"));
  CHECK_INT(load("return {\n  listen = { { host = '127.0.0.1', port = -1 } },\n}\n"), -1);
  CHECK(err_is(2, "got -1"));
  CHECK_INT(load("return {\n  listen = { { host = '127.0.0.1', port = 80.5 } },\n}\n"), -1);
  CHECK(err_is(2, "got 80.5"));
  CHECK_INT(load("return {\n  listen = {\n    { host = '127.0.0.1' } },\n}\n"), -1);
  CHECK(err_is(3, "listen[1]: missing 'port'"));
  CHECK_INT(load("return {\n  listen = { { host = '127.0.0.1', port = 0 } },\n}\n"), 0);
  CHECK_INT(cfg.listen[0].port, 0);
}

TEST(listeners) {
  CHECK_INT(load("return { workers = 1 }\n"), -1);
  CHECK(err_is(1, "missing 'listen': at least one listener is required"));
  CHECK_INT(load("return {\n  listen = {},\n}\n"), -1);
  CHECK(err_is(2, "listen: at least one listener is required"));
  CHECK_INT(load("return {\n  listen = { { host = '127.0.0.1', port = 1 },\n"
                 "    { host = '127.0.0.1', port = 1 } },\n}\n"),
            -1);
  CHECK(err_is(3, "listen[2].port: 127.0.0.1:1 is already listen[1]"));
  CHECK_INT(load("return {\n  listen = { { host = 'not a host!', port = 1 } },\n}\n"), -1);
  CHECK(err_is(2, "listen[1].host: 'not a host!' is not an IP address or host name"));
  CHECK_INT(load("local l = {}\nfor i = 1, 9 do l[i] = { host = '127.0.0.1', port = 1000 + i } end\n"
                 "return { listen = l }\n"),
            -1);
  CHECK(err_is(3, "listen: at most 8 listeners, got 9"));
  fresh();
  put("c.pem", "cert");
  CHECK_INT(load_here("return {\n  listen = { { host = '::1', port = 1,\n    tls_cert = 'c.pem' } },\n}\n"), -1);
  CHECK(err_is(3, "listen[1].tls_cert: tls_cert and tls_key go together"));
  put("k.pem", "key");
  CHECK_INT(load_here("return {\n  listen = { { host = '::1', port = 1, tls_cert = 'c.pem', tls_key = './k.pem' } },\n}\n"),
            0);
  char want[128];
  snprintf(want, sizeof(want), "%s/k.pem", cfg.dir);
  CHECK_STR(cfg.listen[0].tls_key, want);
}

TEST(policy_file) {
  fresh();
  put("p.lua", "return {}\n");
  static const char text[] = "return {\n" LISTEN
                             "  tenants = {\n"
                             "    { name = 'a', hosts = { 'a.example' }, policy = 'p.lua' },\n"
                             "    { name = 'b', hosts = { 'b.example' },\n"
                             "      policy = 'policies/missing.lua' },\n"
                             "  },\n"
                             "}\n";
  CHECK_INT(load_here(text), -1);
  CHECK(err_is(6, "tenants[2].policy: cannot read '"));
  CHECK(strstr(err, "/policies/missing.lua': No such file or directory") != NULL);
  CHECK_INT(load_here("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' }, policy = 'x/../p.lua' } },\n}\n"),
            0);
  char want[128];
  snprintf(want, sizeof(want), "%s/p.lua", cfg.dir);
  CHECK_STR(cfg.tenants[0].policy_file, want);
  CHECK_INT(load_here("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n  policy = '.' } },\n}\n"),
            -1);
  CHECK(err_is(4, "is a directory"));
}

TEST(catalog_strict) {
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { source = 'https://a.example/rsl.xml', strict = true } },\n"
                 "    { name = 'b', hosts = { 'b.example' },\n"
                 "    catalog = { source = 'https://b.example/rsl.xml', strict = false } } },\n}\n"),
            0);
  CHECK(cfg.tenants[0].catalog_strict);
  CHECK(!cfg.tenants[1].catalog_strict);
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { source = 'https://a.example/rsl.xml',\n      strict = 'yes' } } },\n}\n"),
            -1);
  CHECK(err_is(5, "tenants[1].catalog.strict: expected a boolean (true or false), got string"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { source = 'https://a.example/rsl.xml',\n      strct = true } } },\n}\n"),
            -1);
  CHECK(err_is(5, "unknown key 'strct' in tenants[1].catalog (did you mean 'strict'?)"));
}

TEST(operator_settings) {
  CHECK_INT(load("return {\n" LISTEN
                 "  exchange = { offer_ttl_s = 60, idempotency_key_max = 64 },\n"
                 "  ingest = { max_bytes = 1048576, timeout_ms = 2500, initial_wait_ms = 0 },\n"
                 "  policy = { time_limit_ms = 20, load_time_limit_ms = 3000, memory_limit = 8388608,\n"
                 "             watch_debounce_ms = 0 },\n"
                 "}\n"),
            0);
  CHECK_INT(cfg.offer_ttl_s, 60);
  CHECK_INT(cfg.idempotency_key_max, 64);
  CHECK_INT(cfg.ingest_max_bytes, 1048576);
  CHECK_INT(cfg.ingest_timeout_ms, 2500);
  CHECK_INT(cfg.ingest_initial_wait_ms, 0);
  CHECK_INT(cfg.policy_time_limit_ms, 20);
  CHECK_INT(cfg.policy_load_time_limit_ms, 3000);
  CHECK_INT(cfg.policy_memory_limit, 8388608);
  CHECK_INT(cfg.policy_watch_debounce_ms, 0);
  /* Each key out of range, on the line of its value. */
  static const struct {
    const char *section, *key, *value, *why;
  } bad[] = {
      {"exchange", "offer_ttl_s", "0", "exchange.offer_ttl_s: must be an integer in 1..86400, got 0"},
      {"exchange", "offer_ttl_s", "86401", "exchange.offer_ttl_s: must be an integer in 1..86400, got 86401"},
      {"exchange", "offer_ttl_s", "1.5", "exchange.offer_ttl_s: must be an integer in 1..86400, got 1.5"},
      {"exchange", "idempotency_key_max", "15", "exchange.idempotency_key_max: must be an integer in 16..1024"},
      {"exchange", "idempotency_key_max", "1025", "exchange.idempotency_key_max: must be an integer in 16..1024"},
      {"ingest", "max_bytes", "1023", "ingest.max_bytes: must be an integer in 1024..1073741824, got 1023"},
      {"ingest", "max_bytes", "2^30 + 1", "ingest.max_bytes: must be an integer in 1024..1073741824"},
      {"ingest", "timeout_ms", "99", "ingest.timeout_ms: must be an integer in 100..600000, got 99"},
      {"ingest", "timeout_ms", "600001", "ingest.timeout_ms: must be an integer in 100..600000"},
      {"ingest", "initial_wait_ms", "-1", "ingest.initial_wait_ms: must be an integer in 0..600000, got -1"},
      {"ingest", "initial_wait_ms", "'5000'", "ingest.initial_wait_ms: expected an integer, got string"},
      {"policy", "time_limit_ms", "0", "policy.time_limit_ms: must be an integer in 1..10000, got 0"},
      {"policy", "time_limit_ms", "10001", "policy.time_limit_ms: must be an integer in 1..10000"},
      {"policy", "load_time_limit_ms", "0", "policy.load_time_limit_ms: must be an integer in 1..60000"},
      {"policy", "load_time_limit_ms", "60001", "policy.load_time_limit_ms: must be an integer in 1..60000"},
      {"policy", "memory_limit", "1048575", "policy.memory_limit: must be an integer in 1048576..2147483648"},
      {"policy", "memory_limit", "2^31 + 1", "policy.memory_limit: must be an integer in 1048576..2147483648"},
      {"policy", "watch_debounce_ms", "-1", "policy.watch_debounce_ms: must be an integer in 0..60000"},
      {"policy", "watch_debounce_ms", "60001", "policy.watch_debounce_ms: must be an integer in 0..60000"},
  };
  for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
    char text[512];
    snprintf(text, sizeof(text), "return {\n" LISTEN "  %s = {\n    %s = %s },\n}\n", bad[i].section, bad[i].key,
             bad[i].value);
    int rc = load(text);
    if (rc == 0)
      fprintf(stderr, "  %s.%s = %s loaded\n", bad[i].section, bad[i].key, bad[i].value);
    CHECK_INT(rc, -1);
    CHECK(err_is(4, bad[i].why));
  }
  /* Unknown keys and wrong types, as everywhere. */
  CHECK_INT(load("return {\n" LISTEN "  exchange = {\n    offer_ttl = 60 },\n}\n"), -1);
  CHECK(err_is(4, "unknown key 'offer_ttl' in exchange (did you mean 'offer_ttl_s'?)"));
  CHECK_INT(load("return {\n" LISTEN "  ingest = {\n    max_byte = 1 },\n}\n"), -1);
  CHECK(err_is(4, "unknown key 'max_byte' in ingest (did you mean 'max_bytes'?)"));
  CHECK_INT(load("return {\n" LISTEN "  policy = {\n    memory = 1 },\n}\n"), -1);
  CHECK(err_is(4, "unknown key 'memory' in policy"));
  CHECK_INT(load("return {\n" LISTEN "  policy = 'p.lua',\n}\n"), -1);
  CHECK(err_is(3, "policy: expected a table, got string"));
}

TEST(catalog_source) {
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { source = 'rsl/none.xml' } } },\n}\n"),
            -1);
  CHECK(err_is(4, "tenants[1].catalog.source: cannot read"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { refresh_s = 5 } } },\n}\n"),
            -1);
  CHECK(err_is(4, "tenants[1].catalog: missing 'source'"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    catalog = { source = 'https:///x' } } },\n}\n"),
            -1);
  CHECK(err_is(4, "is not a valid URL"));
}

TEST(admin_token_file) {
  CHECK_INT(load("return {\n" LISTEN "  admin = { host = '127.0.0.1', port = 9090,\n"
                 "            token_file = 'admin.token' },\n}\n"),
            -1);
  CHECK(err_is(4, "admin.token_file: cannot read '"));
  CHECK(strstr(err, "admin.token': No such file or directory") != NULL);
  CHECK_INT(load("return {\n" LISTEN "  admin = { host = '127.0.0.1', port = 9090 },\n}\n"), -1);
  CHECK(err_is(3, "admin: missing 'token_file'"));
  put("x", "token");
  CHECK_INT(load_here("return {\n" LISTEN "  admin = { host = '127.0.0.1', port = 8080, token_file = 'x' },\n}\n"), -1);
  CHECK(err_is(3, "admin.port: 127.0.0.1:8080 is already listen[1]"));
}

TEST(read_token) {
  fresh();
  put_bytes("t1", "  s3cret-token\n\n", 16, 0600);
  CHECK_INT(load_here("return {\n" LISTEN "  admin = { host = '127.0.0.1', port = 0, token_file = 't1' } }\n"), 0);
  char *token = tg_config_read_token(&cfg, err, sizeof(err));
  CHECK_STR(token, "s3cret-token");
  free(token);

  /* Readable by others: still read, with a warning in the log. */
  char logpath[128];
  snprintf(logpath, sizeof(logpath), "%s/log", dir);
  int logfd = open(logpath, O_RDWR | O_CREAT | O_TRUNC, 0600);
  CHECK(logfd >= 0);
  chmod(cfg.admin_token_file, 0644);
  tg_log_set_fd(logfd);
  token = tg_config_read_token(&cfg, err, sizeof(err));
  tg_log_set_fd(-1);
  char logged[1024] = "";
  ssize_t n = pread(logfd, logged, sizeof(logged) - 1, 0);
  close(logfd);
  CHECK_STR(token, "s3cret-token");
  free(token);
  CHECK(n > 0 && strstr(logged, "secret file is accessible to group or others") != NULL);

  put_bytes("t1", " \n\t", 3, 0600);
  CHECK(tg_config_read_token(&cfg, err, sizeof(err)) == NULL);
  CHECK(strstr(err, "is empty") != NULL);
  put_bytes("t1", "two words", 9, 0600);
  CHECK(tg_config_read_token(&cfg, err, sizeof(err)) == NULL);
  CHECK(strstr(err, "white space") != NULL);
  unlink(cfg.admin_token_file);
  CHECK(tg_config_read_token(&cfg, err, sizeof(err)) == NULL);
  CHECK(strstr(err, "No such file or directory") != NULL);
  tg_config_t none = {0};
  CHECK(tg_config_read_token(&none, err, sizeof(err)) == NULL);
  CHECK(strstr(err, "no admin token_file") != NULL);
}

TEST(sections_are_flattened) {
  fresh();
  put("news.key", "k");
  static const char text[] = "return {\n" LISTEN
                             "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                             "    payments = { x402 = { max_timeout_s = 1000, networks = { 'eip155:8453', 'eip155:84532' },\n"
                             "                          big = '1000000000000000000', neg = -5,\n"
                             "                          key_file = 'news.key', retry = false } },\n"
                             "  } },\n"
                             "}\n";
  CHECK_INT(load_here(text), 0);
  const tg_config_tenant_t *t = &cfg.tenants[0];
  char want[128];
  snprintf(want, sizeof(want), "%s/news.key", cfg.dir);
  CHECK_STR(tg_config_get(&t->payments, "x402.key_file"), want);
  CHECK_STR(tg_config_get(&t->payments, "x402.retry"), "false");
  CHECK_STR(tg_config_get(&t->payments, "x402.max_timeout_s"), "1000");
  CHECK_STR(tg_config_get(&t->payments, "x402.networks.1"), "eip155:8453");
  CHECK_STR(tg_config_get(&t->payments, "x402.networks.2"), "eip155:84532");
  CHECK_STR(tg_config_get(&t->payments, "x402.big"), "1000000000000000000");
  CHECK_STR(tg_config_get(&t->payments, "x402.neg"), "-5");
  CHECK_INT(t->payments.nitems, 7);
  for (size_t i = 1; i < t->payments.nitems; i++)
    CHECK(strcmp(t->payments.items[i - 1].key, t->payments.items[i].key) < 0);
}

TEST(section_errors) {
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { x402 = {\n      max_timeout_s = 0.5 } } } },\n}\n"),
            -1);
  CHECK(err_is(5, "tenants[1].payments.x402.max_timeout_s: 0.5 is not an integer"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { x402 = { big = 2^60 } } } },\n}\n"),
            -1);
  CHECK(err_is(4, "write it as a string"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    signer = { ttl_s = 1 } } },\n}\n"),
            -1);
  CHECK(err_is(4, "tenants[1].signer: missing 'type'"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { x402 = {\n      key_file = 'gone.key' } } } },\n}\n"),
            -1);
  CHECK(err_is(5, "tenants[1].payments.x402.key_file: cannot read"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { hook = print or tostring } } },\n}\n"),
            -1);
  CHECK(err_is(4, "tenants[1].payments.hook: expected a string, number, boolean or table, got function"));
  CHECK_INT(load("local t = { x = 1 }\nt.self = t\nreturn {\n" LISTEN
                 "  tenants = { { name = 'a', hosts = { 'a.example' }, payments = t } },\n}\n"),
            -1);
  CHECK(err_is(5, "tenants[1].payments.self.self.self.self.self.self.self.self: nested more than 8 levels deep"));
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { ['a.b'] = 1 } } },\n}\n"),
            -1);
  CHECK(err_is(4, "contain no '.'"));
}

/* A tenant with one section on lines 4 and 5 ("    KEY = { ...A,\n      B } }"). */
static int load_kind(const char *key, const char *a, const char *b) {
  char text[512];
  snprintf(text, sizeof(text),
           "return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
           "    %s = { %s,\n      %s } } },\n}\n",
           key, a, b);
  return load(text);
}

TEST(signer_and_billing_are_checked_by_kind) {
  /* The implemented kinds with their keys load, flattened for signer/signer.h. */
  CHECK_INT(load_kind("signer", "type = 'nginx_secure_link', base_url = 'https://cdn.example'", "ttl_s = 300"), 0);
  CHECK_STR(tg_config_get(&cfg.tenants[0].signer, "type"), "nginx_secure_link");
  CHECK_STR(tg_config_get(&cfg.tenants[0].signer, "ttl_s"), "300");
  tg_config_free(&cfg);
  CHECK_INT(load_kind("billing", "ttl = nil", "type = 'builtin'"), 0);
  CHECK_STR(tg_config_get(&cfg.tenants[0].billing, "type"), "builtin");
  tg_config_free(&cfg);
  static const char *const kinds[][3] = {{"signer", "akamai_edgeauth", "algorithm = 'sha256'"},
                                         {"signer", "cloudfront", "key_pair_id = 'K2'"},
                                         {"signer", "gcdn", "key_name = 'k'"}};
  for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++) {
    char a[64];
    snprintf(a, sizeof(a), "type = '%s'", kinds[i][1]);
    CHECK_INT(load_kind(kinds[i][0], a, kinds[i][2]), 0);
    tg_config_free(&cfg);
    /* Another kind's key is refused. */
    CHECK_INT(load_kind(kinds[i][0], a, "expression = '$uri'"), -1);
    CHECK(err_is(5, "unknown key 'expression'"));
  }
  /* The connect kind takes its own keys only (billing/billconf.h reads the values). */
  CHECK_INT(load_kind("billing", "type = 'connect'", "x = 1"), -1);
  CHECK(err_is(5, "unknown key 'x' in tenants[1].billing"));
  CHECK_INT(load_kind("billing", "type = 'connect'", "url = 'http://127.0.0.1:1/b'"), 0);
  CHECK_STR(tg_config_get(&cfg.tenants[0].billing, "url"), "http://127.0.0.1:1/b");
  /* A key the kind does not take: FILE:LINE of the key, with a hint. */
  CHECK_INT(load_kind("signer", "type = 'nginx_secure_link'", "base_ur = 'https://cdn.example'"), -1);
  CHECK(err_is(5, "unknown key 'base_ur' in tenants[1].signer (did you mean 'base_url'?)"));
  CHECK_INT(load_kind("billing", "type = 'builtin'", "url = 'http://127.0.0.1:1/b'"), -1);
  CHECK(err_is(5, "unknown key 'url' in tenants[1].billing"));
  /* A type nobody knows, or none. */
  CHECK_INT(load_kind("signer", "ttl_s = 1", "type = 'nginx'"), -1);
  CHECK(err_is(5, "tenants[1].signer.type: 'nginx' is not a signer type (one of nginx_secure_link, "
                  "akamai_edgeauth, cloudfront, gcdn)"));
  CHECK_INT(load_kind("billing", "type = 'http'", "url = 'x'"), -1);
  CHECK(err_is(4, "tenants[1].billing.type: 'http' is not a billing type (one of builtin, connect)"));
  CHECK_INT(load_kind("signer", "ttl_s = 1", "key = 'k'"), -1);
  CHECK(err_is(4, "tenants[1].signer: missing 'type'"));
  CHECK_INT(load_kind("billing", "type = 1", "x = 1"), -1);
  CHECK(err_is(4, "tenants[1].billing.type: expected a string, got number"));
}

TEST(bytecode_is_refused) {
  fresh();
  static const char chunk[] = "\033LJ\002\nreturn {}";
  put_bytes("tollgate.lua", chunk, sizeof(chunk) - 1, 0644);
  CHECK_INT(tg_config_load(cfgpath, &cfg, err, sizeof(err)), -1);
  CHECK(err_is(0, "precompiled (bytecode) chunks are not accepted"));
}

TEST(endless_loop_stops_at_deadline) {
  double t0 = now_s();
  CHECK_INT(load("local n = 0\nwhile true do\n  n = n + 1\nend\n"), -1);
  double took = now_s() - t0;
  /* The count hook lands on the loop test or its body. */
  CHECK(strstr(err, "took longer than 1000 ms (an endless loop?)") != NULL);
  CHECK(err_line() == 2 || err_line() == 3);
  /* Stopped by the deadline, not before it; the upper bound only tells
   * "stopped" from "hung" (a loaded machine, a sanitizer: not a speed goal). */
  CHECK(took >= 0.9 && took < 30.0);
  /* pcall cannot swallow the deadline. */
  t0 = now_s();
  CHECK_INT(load("while true do\n  pcall(function() while true do end end)\nend\n"), -1);
  took = now_s() - t0;
  CHECK(err_is(2, "took longer than 1000 ms"));
  CHECK(took < 30.0);
}

TEST(memory_bomb_stops_at_cap) {
  double t0 = now_s();
  /* Large unique strings: the cap is reached in ~1000 allocations, long
   * before the time limit even under a sanitizer on a loaded machine. */
  CHECK_INT(load("local t, s = {}, string.rep('x', 65536)\nfor i = 1, 1e9 do t[i] = s .. i end\n"), -1);
  CHECK(err_is(0, "used more than 64 MiB"));
  CHECK_INT(load("local ok = pcall(string.rep, 'x', 2^30)\nreturn { listen = {} }\n"), -1);
  CHECK(err_is(0, "used more than 64 MiB"));
  CHECK_INT(load("local t, s = {}, string.rep('y', 65536)\nwhile true do\n"
                 "  pcall(function() for i = 1, 1e9 do t[#t + 1] = s .. i end end)\nend\n"),
            -1);
  CHECK(err_is(0, "used more than 64 MiB"));
  CHECK(now_s() - t0 < 30.0); /* stopped, not hung: not a speed goal */
}

TEST(sandbox_has_only_the_allowlist) {
  static const char text[] =
      "for name, v in pairs({ os = os, io = io, require = require, load = load, loadstring = loadstring,\n"
      "    dofile = dofile, loadfile = loadfile, debug = debug, jit = jit, ffi = ffi, package = package,\n"
      "    collectgarbage = collectgarbage, setfenv = setfenv, getfenv = getfenv, rawset = rawset,\n"
      "    rawget = rawget, rawequal = rawequal, setmetatable = setmetatable, getmetatable = getmetatable,\n"
      "    module = module, newproxy = newproxy, coroutine = coroutine, print = print, xpcall = xpcall,\n"
      "    gcinfo = gcinfo, _G = _G, dump = string.dump, dump2 = ('').dump }) do\n"
      "  error('leaked ' .. name)\n"
      "end\n"
      "for _, f in ipairs({ pairs, ipairs, next, type, tostring, tonumber, select, error, assert,\n"
      "    pcall, unpack }) do assert(type(f) == 'function') end\n"
      "assert(string.format('%d', 42) == '42' and table.concat({ 'a', 'b' }) == 'ab' and math.floor(1.5) == 1)\n"
      "assert(select('#', pcall(error, 'x')) == 2 and not pcall(error, 'x'))\n"
      "return {\n" LISTEN "}\n";
  int rc = load(text);
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  CHECK_INT(rc, 0);
  CHECK_INT(load("local ok = true\nos.execute('touch /tmp/tg-config-escaped')\n"), -1);
  CHECK(err_is(2, "attempt to index global 'os' (a nil value)"));
  CHECK_INT(load("local f = io.open('/etc/passwd')\n"), -1);
  CHECK(err_is(1, "attempt to index global 'io'"));
  CHECK_INT(load("\nlocal m = require('os')\n"), -1);
  CHECK(err_is(2, "attempt to call global 'require'"));
  CHECK_INT(load("local f = load('return 1')\n"), -1);
  CHECK(err_is(1, "attempt to call global 'load'"));
}

TEST(get_missing_key) {
  tg_config_section_t empty = {0};
  CHECK(tg_config_get(&empty, "type") == NULL);
  tg_config_free(&cfg); /* safe on a zeroed config */
  tg_config_free(&cfg);
}

TEST(missing_config_file) {
  fresh();
  CHECK_INT(tg_config_load(cfgpath, &cfg, err, sizeof(err)), -1);
  CHECK(err_is(0, "cannot open: No such file or directory"));
}

TEST(redis_and_rate_limit_defaults) {
  CHECK_INT(load("return {\n" LISTEN "}\n"), 0);
  CHECK(cfg.redis.host == NULL);
  CHECK_INT(cfg.rate_limit_mode, TG_CONFIG_RATE_LIMIT_LOCAL);
  CHECK_INT(cfg.rate_limit_table_size, 65536);
  /* An empty redis section takes every default; it does not switch the mode. */
  CHECK_INT(load("return {\n" LISTEN "  redis = {},\n}\n"), 0);
  CHECK_STR(cfg.redis.host, "127.0.0.1");
  CHECK_INT(cfg.redis.port, 6379);
  CHECK(cfg.redis.password_file == NULL);
  CHECK_INT(cfg.redis.timeout_ms, 20);
  CHECK_INT(cfg.redis.db, 0);
  CHECK_INT(cfg.rate_limit_mode, TG_CONFIG_RATE_LIMIT_LOCAL);
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = { mode = 'local' },\n}\n"), 0);
  CHECK_INT(cfg.rate_limit_mode, TG_CONFIG_RATE_LIMIT_LOCAL);
  CHECK_INT(cfg.rate_limit_table_size, 65536);
}

TEST(redis_and_rate_limit_values) {
  fresh();
  put("redis.pass", "s3cret\n");
  CHECK_INT(load_here("return {\n" LISTEN
                      "  redis = { host = 'redis.internal', port = 6380, password_file = 'redis.pass',\n"
                      "            timeout_ms = 50, db = 3 },\n"
                      "  rate_limit = { mode = 'redis', table_size = 1024 },\n}\n"),
            0);
  CHECK_STR(cfg.redis.host, "redis.internal");
  CHECK_INT(cfg.redis.port, 6380);
  char want[160];
  snprintf(want, sizeof(want), "%s/redis.pass", cfg.dir);
  CHECK_STR(cfg.redis.password_file, want);
  CHECK_INT(cfg.redis.timeout_ms, 50);
  CHECK_INT(cfg.redis.db, 3);
  CHECK_INT(cfg.rate_limit_mode, TG_CONFIG_RATE_LIMIT_REDIS);
  CHECK_INT(cfg.rate_limit_table_size, 1024);
  CHECK_INT(load_here("return {\n" LISTEN "  redis = { host = '::1' },\n  rate_limit = { mode = 'redis' },\n}\n"), 0);
  CHECK_STR(cfg.redis.host, "::1");
  CHECK_INT(cfg.rate_limit_mode, TG_CONFIG_RATE_LIMIT_REDIS);
}

TEST(ledger_defaults_values_and_errors) {
  CHECK_INT(load("return {\n" LISTEN "}\n"), 0);
  CHECK_INT(cfg.ledger.mode, TG_CONFIG_LEDGER_LOCAL);
  CHECK(cfg.ledger.wal_capacity_bytes == (1ULL << 30));
  CHECK(cfg.ledger.wal_segment_bytes == (64ULL << 20));
  CHECK_INT(cfg.ledger.idem_ttl_s, 86400);
  CHECK_INT(cfg.ledger.naccounts, 0);
  CHECK(cfg.instance != NULL && cfg.instance[0] != '\0');
  tg_config_free(&cfg);
  CHECK_INT(load("return {\n" LISTEN "  instance = 'gw-2',\n"
                 "  ledger = { wal = { capacity_bytes = 4194304, segment_bytes = 1048576, batch_interval_us = 200 },\n"
                 "    idempotency = { ttl_s = 60, wait_ms = 10 }, snapshot_every = 5000,\n"
                 "    accounts = { { billing_reference = 'acct-demo', amount = 5000000 },\n"
                 "                 { billing_reference = 'b', amount = 7, currency = 'EUR', reference = 'r1' } } },\n}\n"),
            0);
  CHECK_STR(cfg.instance, "gw-2");
  CHECK(cfg.ledger.wal_capacity_bytes == 4194304);
  CHECK_INT(cfg.ledger.wal_batch_interval_us, 200);
  CHECK_INT(cfg.ledger.idem_ttl_s, 60);
  CHECK_INT(cfg.ledger.idem_wait_ms, 10);
  CHECK_INT(cfg.ledger.snapshot_every, 5000);
  CHECK_INT(cfg.ledger.naccounts, 2);
  if (cfg.ledger.naccounts == 2) {
    CHECK_STR(cfg.ledger.accounts[0].billing_reference, "acct-demo");
    CHECK_STR(cfg.ledger.accounts[0].currency, "USD");
    CHECK_STR(cfg.ledger.accounts[0].reference, "config:acct-demo:USD");
    CHECK(cfg.ledger.accounts[0].amount == 5000000);
    CHECK_STR(cfg.ledger.accounts[1].currency, "EUR");
    CHECK_STR(cfg.ledger.accounts[1].reference, "r1");
  }
  tg_config_free(&cfg);
  CHECK_INT(load("return {\n" LISTEN "  ledger = {\n    mode = 'redis' },\n}\n"), -1);
  CHECK(err_is(4, "ledger.mode: 'redis' needs a top-level redis"));
  CHECK_INT(load("return {\n" LISTEN "  ledger = { wal = { capacity_bytes = 1048576, segment_bytes = 2097152 } },\n}\n"), -1);
  CHECK(err_is(3, "segment_bytes (2097152) is above capacity_bytes (1048576)"));
  CHECK_INT(load("return {\n" LISTEN "  ledger = { accounts = { { billing_reference = 'a', amount = -1 } } },\n}\n"), -1);
  CHECK(err_is(3, "amount: must be an integer in 1..9007199254740992"));
  CHECK_INT(load("return {\n" LISTEN "  ledger = { accounts = { { billing_reference = 'a', amount = 1.5 } } },\n}\n"), -1);
  CHECK_INT(load("return {\n" LISTEN "  ledger = { accounts = { { billing_reference = 'a', amount = 1, currency = 'U$D' } } },\n}\n"), -1);
  CHECK(err_is(3, "is not a currency code"));
  CHECK_INT(load("return {\n" LISTEN "  ledger = { wal = { capacity = 1 } },\n}\n"), -1);
  CHECK(err_is(3, "unknown key 'capacity' in ledger.wal"));
  CHECK_INT(load("return {\n" LISTEN "  instance = 'has space',\n}\n"), -1);
  CHECK(err_is(3, "instance: must be 1 to 64 printable ASCII characters"));
}

TEST(redis_and_rate_limit_errors) {
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = {\n    mode = 'redis' },\n}\n"), -1);
  CHECK(err_is(4, "rate_limit.mode: 'redis' needs a top-level redis"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = { mode = 'cluster' },\n}\n"), -1);
  CHECK(err_is(3, "rate_limit.mode: 'cluster' is not one of local, redis"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = {\n    table_size = 1000 },\n}\n"), -1);
  CHECK(err_is(4, "rate_limit.table_size: must be a power of two, got 1000"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = { table_size = 8 },\n}\n"), -1);
  CHECK(err_is(3, "rate_limit.table_size: must be an integer in 16..67108864, got 8"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = { mode = 1 },\n}\n"), -1);
  CHECK(err_is(3, "rate_limit.mode: expected a string, got number"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = 'redis',\n}\n"), -1);
  CHECK(err_is(3, "rate_limit: expected a table"));
  CHECK_INT(load("return {\n" LISTEN "  rate_limit = { size = 16 },\n}\n"), -1);
  CHECK(err_is(3, "unknown key 'size' in rate_limit"));
  CHECK_INT(load("return {\n" LISTEN "  redis = {\n    port = 0 },\n}\n"), -1);
  CHECK(err_is(4, "redis.port: must be an integer in 1..65535, got 0"));
  CHECK_INT(load("return {\n" LISTEN "  redis = { timeout_ms = 0 },\n}\n"), -1);
  CHECK(err_is(3, "redis.timeout_ms: must be an integer in 1..60000"));
  CHECK_INT(load("return {\n" LISTEN "  redis = { db = -1 },\n}\n"), -1);
  CHECK(err_is(3, "redis.db: must be an integer in 0..65535"));
  CHECK_INT(load("return {\n" LISTEN "  redis = {\n    timout_ms = 5 },\n}\n"), -1);
  CHECK(err_is(4, "unknown key 'timout_ms' in redis (did you mean 'timeout_ms'?)"));
  CHECK_INT(load("return {\n" LISTEN "  redis = {\n    host = 'bad host!' },\n}\n"), -1);
  CHECK(err_is(4, "redis.host: 'bad host!' is not an IP address or host name"));
  CHECK_INT(load("return {\n" LISTEN "  redis = { host = '' },\n}\n"), -1);
  CHECK(err_is(3, "redis.host: must not be empty"));
  CHECK_INT(load("return {\n" LISTEN "  redis = {\n    password_file = 'none.pass' },\n}\n"), -1);
  CHECK(err_is(4, "redis.password_file: cannot read '"));
  CHECK(strstr(err, "none.pass': No such file or directory") != NULL);
}

/* A tenant whose payments.x402.price is the Lua expression price, on line 5. */
static int load_price(const char *price) {
  char text[512];
  snprintf(text, sizeof(text),
           "return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
           "    payments = { x402 = { pay_to = '0xabc',\n"
           "      price = %s } } } },\n}\n",
           price);
  return load(text);
}

/* The HTTP path quotes from the catalog now: a flat price that nothing
 * reads is refused, in every spelling, on its own line. */
TEST(x402_price_is_refused) {
  static const char *const prices[] = {"1000", "'1000'", "0", "'0.001'", "-5", "{ 1000 }"};
  for (size_t i = 0; i < sizeof(prices) / sizeof(prices[0]); i++) {
    CHECK_INT(load_price(prices[i]), -1);
    CHECK(err_is(5, "prices come from the tenant's catalog (the RSL <amount>) and its policy's price hook"));
    CHECK(strstr(err, "remove payments.x402.price") != NULL);
  }
  /* The rest of the section still loads. */
  CHECK_INT(load("return {\n" LISTEN "  tenants = { { name = 'a', hosts = { 'a.example' },\n"
                 "    payments = { x402 = { pay_to = '0xabc' } } } },\n}\n"),
            0);
  /* The demo configures none. */
  fresh();
  snprintf(cfgpath, sizeof(cfgpath), "%s", TG_SOURCE_DIR "/deploy/demo/tollgate.lua");
  CHECK_INT(tg_config_load(cfgpath, &cfg, err, sizeof(err)), 0);
}
