#include "catalog/ingest.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "base/buf.h"
#include "catalog/catalog.h"
#include "base/log.h"
#include "base/metrics.h"
#include "test.h"
#include "child.h"

#define NS "https://rslstandard.org/rsl"
#define DOC_V1                                                                                     \
  "<rsl xmlns=\"" NS "\"><content url=\"/a/*\"><license><payment type=\"use\">"                    \
  "<amount currency=\"USD\">0.01</amount></payment></license></content></rsl>"
#define DOC_V2                                                                                     \
  "<rsl xmlns=\"" NS "\"><content url=\"/a/*\"><license><payment type=\"use\">"                    \
  "<amount currency=\"USD\">0.02</amount></payment></license></content>"                           \
  "<content url=\"/b/*\"></content></rsl>"

static void destroy_catalog(void *p) { tg_catalog_free(p); }

static void quiet_logs(void) {
  static int fd = -1;
  if (fd < 0) {
    fd = open("/dev/null", O_WRONLY | O_CLOEXEC);
    tg_log_set_fd(fd);
  }
}

/* Waits until the tenant has finished more than `after` attempts. */
static int wait_attempts(tg_ingest_t *ing, size_t idx, uint64_t after, tg_ingest_status_t *st) {
  for (int i = 0; i < 500; i++) {
    if (tg_ingest_status(ing, idx, st) != 0)
      return -1;
    if (st->attempts > after)
      return 0;
    usleep(10000);
  }
  return -1;
}

/* The current catalog as a reader sees it, pinned only for the checks. */
typedef struct seen {
  const void *ptr;
  size_t entries;
  tg_catalog_result_t a, b;
} seen_t;

static seen_t look(tg_snapshot_reader_t *r) {
  seen_t s = {0};
  tg_snapshot_pin_t pin = tg_snapshot_acquire(r);
  s.ptr = pin.data;
  if (pin.data) {
    s.entries = tg_catalog_entries(pin.data);
    tg_catalog_lookup(pin.data, "/a/x", 4, NULL, &s.a);
    tg_catalog_lookup(pin.data, "/b/x", 4, NULL, &s.b);
  }
  tg_snapshot_release(r, pin);
  return s;
}

/* Value of one rendered series, -1 when absent. */
static long long metric(const char *series) {
  tg_buf_t b = {0};
  long long v = -1;
  if (tg_metrics_render(&b) == 0 && b.data) {
    size_t n = strlen(series);
    for (const char *p = b.data; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
      if (strncmp(p, series, n) == 0 && p[n] == ' ') {
        v = atoll(p + n + 1);
        break;
      }
    }
  }
  tg_buf_free(&b);
  return v;
}

static int write_file(const char *path, const char *text) {
  FILE *f = fopen(path, "w");
  if (!f)
    return -1;
  fputs(text, f);
  return fclose(f);
}

TEST(file_source) {
  quiet_logs();
  char dir[] = "/tmp/tg_ingest_XXXXXX";
  CHECK(mkdtemp(dir));
  char path[128];
  snprintf(path, sizeof path, "%s/news.xml", dir);
  CHECK_INT(write_file(path, DOC_V1), 0);

  char *hosts[] = {"news.example"};
  tg_config_tenant_t tenants[2] = {
      {.name = "plain", .hosts = hosts, .nhosts = 1}, /* no source: ignored */
      {.name = "files",
       .hosts = hosts,
       .nhosts = 1,
       .catalog_source = path,
       .catalog_refresh_s = 3600},
  };
  tg_config_t cfg = {.tenants = tenants, .ntenants = 2};
  tg_snapshot_t *snap = tg_snapshot_new(destroy_catalog);
  tg_snapshot_t *snaps[2] = {NULL, snap};
  tg_snapshot_reader_t *r = tg_snapshot_reader_register(snap);
  char err[256] = "";
  tg_ingest_t *ing = tg_ingest_start(&cfg, snaps, err, sizeof err);
  CHECK(ing);
  CHECK_INT(tg_ingest_wait_initial(ing, 5000), 0);

  tg_ingest_status_t st;
  CHECK_INT(tg_ingest_status(ing, 0, &st), 0);
  CHECK(!st.has_source);
  CHECK_INT(tg_ingest_status(ing, 1, &st), 0);
  CHECK(st.loaded && !st.failing);
  CHECK_INT(st.loads, 1);
  CHECK_INT(st.entries, 1);
  CHECK(st.last_success > 0);
  seen_t s1 = look(r);
  CHECK(s1.ptr);
  CHECK_INT(s1.entries, 1);
  CHECK_INT(s1.a.status, TG_CATALOG_OFFERS);
  CHECK_INT(s1.a.offers[0].amount, 10000);
  CHECK_INT(s1.b.status, TG_CATALOG_NOT_IN_CATALOG);
  CHECK_INT(metric("catalog_entries{tenant_id=\"files\"}"), 1);
  CHECK(metric("catalog_last_refresh_timestamp{tenant_id=\"files\"}") >= st.last_success);

  /* Unchanged file: success, not rebuilt, same catalog. */
  CHECK_INT(tg_ingest_refresh(ing, "files"), 0);
  CHECK_INT(wait_attempts(ing, 1, 1, &st), 0);
  CHECK(!st.failing);
  CHECK_INT(st.loads, 1);
  CHECK(look(r).ptr == s1.ptr);

  /* Changed file: rebuilt and published. A reader still holding the old
   * catalog keeps it alive; the collector frees it soon after the release. */
  tg_snapshot_pin_t held = tg_snapshot_acquire(r);
  CHECK(held.data == s1.ptr);
  CHECK_INT(write_file(path, DOC_V2), 0);
  struct timeval tv[2] = {{.tv_sec = 2000000000}, {.tv_sec = 2000000000}};
  CHECK_INT(utimes(path, tv), 0);
  CHECK_INT(tg_ingest_refresh(ing, NULL), 0);
  CHECK_INT(wait_attempts(ing, 1, 2, &st), 0);
  CHECK(!st.failing);
  CHECK_INT(st.loads, 2);
  CHECK_INT(st.entries, 2);
  seen_t s2 = look(r);
  CHECK(s2.ptr && s2.ptr != s1.ptr);
  CHECK_INT(s2.entries, 2);
  CHECK_INT(s2.a.offers[0].amount, 20000);
  CHECK_INT(s2.b.status, TG_CATALOG_NOT_FOR_SALE);
  CHECK_INT(tg_snapshot_retired(snap), 1);
  tg_catalog_result_t old;
  CHECK_INT(tg_catalog_lookup(held.data, "/a/x", 4, NULL, &old), 0);
  CHECK_INT(old.offers[0].amount, 10000);
  tg_snapshot_release(r, held);
  for (int i = 0; i < 300 && tg_snapshot_retired(snap) > 0; i++)
    usleep(10000);
  CHECK_INT(tg_snapshot_retired(snap), 0);

  /* Broken file: counted as "parse", the previous catalog keeps serving. */
  CHECK_INT(write_file(path, "<rsl xmlns=\"" NS "\"><content url="), 0);
  CHECK_INT(tg_ingest_refresh(ing, "files"), 0);
  CHECK_INT(wait_attempts(ing, 1, 3, &st), 0);
  CHECK(st.failing && st.loaded);
  CHECK_STR(st.last_reason, "parse");
  CHECK(strncmp(st.last_error, "parse: ", 7) == 0);
  CHECK_INT(st.loads, 2);
  CHECK_INT(st.entries, 2);
  CHECK(look(r).ptr == s2.ptr);
  CHECK_INT(metric("catalog_refresh_errors_total{tenant_id=\"files\",reason=\"parse\"}"), 1);
  CHECK_INT(metric("catalog_entries{tenant_id=\"files\"}"), 2);

  /* Still broken and unchanged: parsed again, not taken for "unchanged". */
  CHECK_INT(tg_ingest_refresh(ing, "files"), 0);
  CHECK_INT(wait_attempts(ing, 1, 4, &st), 0);
  CHECK(st.failing);
  CHECK_INT(metric("catalog_refresh_errors_total{tenant_id=\"files\",reason=\"parse\"}"), 2);

  /* A missing file is a "fetch" failure. */
  CHECK_INT(unlink(path), 0);
  CHECK_INT(tg_ingest_refresh(ing, "files"), 0);
  CHECK_INT(wait_attempts(ing, 1, 5, &st), 0);
  CHECK_STR(st.last_reason, "fetch");
  CHECK(look(r).ptr == s2.ptr);

  CHECK_INT(tg_ingest_refresh(ing, "nope"), -ENOENT);
  CHECK_INT(tg_ingest_refresh(ing, "plain"), -ENOENT);
  CHECK_INT(tg_ingest_status(ing, 2, &st), -EINVAL);
  tg_ingest_stop(ing);
  CHECK_INT(tg_snapshot_reader_unregister(r), 0);
  tg_snapshot_free(snap);
  rmdir(dir);
  tg_metrics_reset();
}

/* A draft usage token ("tdm"): lenient mode maps it to ai-train with a
 * warning; strict mode refuses the document. */
#define DOC_NONCONFORMANT                                                                          \
  "<rsl xmlns=\"" NS "\"><content url=\"/a/*\"><license><permits type=\"usage\">tdm</permits>"      \
  "<payment type=\"use\"><amount currency=\"USD\">0.03</amount></payment></license></content></rsl>"

TEST(strict_catalog_refuses_a_nonconformant_document) {
  quiet_logs();
  char dir[] = "/tmp/tg_ingest_XXXXXX";
  CHECK(mkdtemp(dir));
  char strict_path[128], lenient_path[128];
  snprintf(strict_path, sizeof strict_path, "%s/strict.xml", dir);
  snprintf(lenient_path, sizeof lenient_path, "%s/lenient.xml", dir);
  CHECK_INT(write_file(strict_path, DOC_V1), 0);
  CHECK_INT(write_file(lenient_path, DOC_NONCONFORMANT), 0);
  char *hosts[] = {"news.example"};
  tg_config_tenant_t tenants[2] = {
      {.name = "strict", .hosts = hosts, .nhosts = 1, .catalog_source = strict_path,
       .catalog_refresh_s = 3600, .catalog_strict = true},
      {.name = "lenient", .hosts = hosts, .nhosts = 1, .catalog_source = lenient_path,
       .catalog_refresh_s = 3600},
  };
  tg_config_t cfg = {.tenants = tenants, .ntenants = 2};
  tg_snapshot_t *snaps[2] = {tg_snapshot_new(destroy_catalog), tg_snapshot_new(destroy_catalog)};
  tg_snapshot_reader_t *rs = tg_snapshot_reader_register(snaps[0]);
  tg_snapshot_reader_t *rl = tg_snapshot_reader_register(snaps[1]);
  char err[256] = "";
  tg_ingest_t *ing = tg_ingest_start(&cfg, snaps, err, sizeof err);
  CHECK(ing);
  CHECK_INT(tg_ingest_wait_initial(ing, 5000), 0);
  tg_ingest_status_t st;
  /* Lenient: loaded, with a warning. */
  CHECK_INT(tg_ingest_status(ing, 1, &st), 0);
  CHECK(st.loaded && !st.failing);
  CHECK_INT(st.warnings, 1);
  CHECK_INT(look(rl).a.offers[0].amount, 30000);
  /* Strict, conformant: loaded. */
  CHECK_INT(tg_ingest_status(ing, 0, &st), 0);
  CHECK(st.loaded && !st.failing);
  seen_t before = look(rs);
  CHECK_INT(before.a.offers[0].amount, 10000);

  /* Strict, non-conformant: a failed refresh, the old catalog serves on. */
  CHECK_INT(write_file(strict_path, DOC_NONCONFORMANT), 0);
  struct timeval tv[2] = {{.tv_sec = 2000000000}, {.tv_sec = 2000000000}};
  CHECK_INT(utimes(strict_path, tv), 0);
  CHECK_INT(tg_ingest_refresh(ing, "strict"), 0);
  CHECK_INT(wait_attempts(ing, 0, 1, &st), 0);
  CHECK(st.failing && st.loaded);
  CHECK_STR(st.last_reason, "parse");
  CHECK(strstr(st.last_error, "tdm") != NULL);
  CHECK_INT(st.loads, 1);
  seen_t after = look(rs);
  CHECK(after.ptr == before.ptr);
  CHECK_INT(after.a.offers[0].amount, 10000);
  CHECK_INT(metric("catalog_refresh_errors_total{tenant_id=\"strict\",reason=\"parse\"}"), 1);

  tg_ingest_stop(ing);
  CHECK_INT(tg_snapshot_reader_unregister(rs), 0);
  CHECK_INT(tg_snapshot_reader_unregister(rl), 0);
  tg_snapshot_free(snaps[0]);
  tg_snapshot_free(snaps[1]);
  unlink(strict_path);
  unlink(lenient_path);
  rmdir(dir);
  tg_metrics_reset();
}

/* The node fixture: spec/core/fixtures/rsl_httpd.js. */
static child_t node = {0, -1, -1};

static void stop_node(void) { child_stop(&node); }

static int read_line(char *line, size_t cap) { return child_read_line(&node, line, cap, 10000); }

static int start_node(void) {
  char *argv[] = {"node", TG_SOURCE_DIR "/spec/core/fixtures/rsl_httpd.js", NULL};
  if (child_start(&node, argv) != 0)
    return -1;
  atexit(stop_node);
  char line[128];
  int port = 0;
  if (read_line(line, sizeof line) != 0 || sscanf(line, "{\"port\":%d}", &port) != 1 || port <= 0) {
    fprintf(stderr, "  fixture server did not start: '%s'\n", line);
    stop_node();
    return -1;
  }
  return port;
}

static int node_write(const char *cmd) {
  size_t n = strlen(cmd);
  return write(node.in, cmd, n) == (ssize_t)n ? 0 : -1;
}

static int node_not_modified(void) {
  char line[128];
  int ok = -1, nm = -1;
  if (node_write("count\n") != 0 || read_line(line, sizeof line) != 0 ||
      sscanf(line, "{\"ok\":%d,\"not_modified\":%d}", &ok, &nm) != 2)
    return -1;
  return nm;
}

/* Sends a command and waits until the fixture has applied it (it answers
 * "count" in order), so the next fetch sees the new behaviour. */
static int node_cmd(const char *cmd) {
  return node_write(cmd) == 0 && node_not_modified() >= 0 ? 0 : -1;
}

enum { T_OK, T_500, T_SLOW, T_BIG, T_HTML, NT };

TEST(http_sources) {
  quiet_logs();
  signal(SIGPIPE, SIG_IGN);
  int port = start_node();
  CHECK(port > 0);
  static const char *names[NT] = {"t_ok", "t_500", "t_slow", "t_big", "t_html"};
  static const char *paths[NT] = {"/ok", "/error500", "/slow", "/big", "/html"};
  char urls[NT][64];
  char *hosts[NT][1] = {{"a.example"}, {"b.example"}, {"c.example"}, {"d.example"}, {"e.example"}};
  tg_config_tenant_t tenants[NT];
  tg_snapshot_t *snaps[NT];
  tg_snapshot_reader_t *rd[NT];
  memset(tenants, 0, sizeof tenants);
  for (int i = 0; i < NT; i++) {
    snprintf(urls[i], sizeof urls[i], "http://127.0.0.1:%d%s", port, paths[i]);
    tenants[i] = (tg_config_tenant_t){.name = (char *)names[i],
                                      .hosts = hosts[i],
                                      .nhosts = 1,
                                      .catalog_source = urls[i],
                                      .catalog_refresh_s = 3600};
    snaps[i] = tg_snapshot_new(destroy_catalog);
    rd[i] = tg_snapshot_reader_register(snaps[i]);
  }
  tg_config_t cfg = {.tenants = tenants, .ntenants = NT};
  tg_ingest_opts_t opts = {.max_bytes = 64 * 1024, .timeout_ms = 300};
  char err[256] = "";
  tg_ingest_t *ing = tg_ingest_start_opts(&cfg, snaps, &opts, err, sizeof err);
  CHECK(ing);
  CHECK_INT(tg_ingest_wait_initial(ing, 5000), 0);

  tg_ingest_status_t st;
  CHECK_INT(tg_ingest_status(ing, T_OK, &st), 0);
  CHECK_STR(st.last_error, "");
  CHECK(st.loaded && !st.failing);
  CHECK_INT(st.entries, 1);
  seen_t s1 = look(rd[T_OK]);
  CHECK(s1.ptr);
  CHECK_INT(s1.a.status, TG_CATALOG_OFFERS);
  CHECK_INT(s1.a.offers[0].amount, 10000);

  static const char *reasons[NT] = {NULL, "http_status", "timeout", "too_large", "content_type"};
  for (int i = T_500; i < NT; i++) {
    CHECK_INT(tg_ingest_status(ing, (size_t)i, &st), 0);
    CHECK(st.attempted && st.failing && !st.loaded);
    CHECK_STR(st.last_reason, reasons[i]);
    CHECK(look(rd[i]).ptr == NULL);
    char series[128];
    snprintf(series, sizeof series, "catalog_refresh_errors_total{tenant_id=\"%s\",reason=\"%s\"}",
             names[i], reasons[i]);
    CHECK_INT(metric(series), 1);
  }
  CHECK_INT(metric("catalog_refresh_duration_seconds_count{tenant_id=\"t_slow\"}"), 1);

  /* Same ETag: 304, a success that keeps the very same catalog. */
  CHECK_INT(node_not_modified(), 0);
  CHECK_INT(tg_ingest_refresh(ing, "t_ok"), 0);
  CHECK_INT(wait_attempts(ing, T_OK, 1, &st), 0);
  CHECK(!st.failing);
  CHECK_INT(st.loads, 1);
  CHECK_INT(node_not_modified(), 1);
  CHECK(look(rd[T_OK]).ptr == s1.ptr);

  /* A new version: 200, rebuilt and published. */
  CHECK_INT(node_cmd("v2\n"), 0);
  CHECK_INT(tg_ingest_refresh(ing, "t_ok"), 0);
  CHECK_INT(wait_attempts(ing, T_OK, 2, &st), 0);
  CHECK(!st.failing);
  CHECK_INT(st.loads, 2);
  CHECK_INT(st.entries, 2);
  seen_t s2 = look(rd[T_OK]);
  CHECK(s2.ptr && s2.ptr != s1.ptr);
  CHECK_INT(s2.a.offers[0].amount, 20000);
  CHECK_INT(s2.b.status, TG_CATALOG_NOT_FOR_SALE);
  CHECK_INT(metric("catalog_entries{tenant_id=\"t_ok\"}"), 2);

  /* The source fails: the v2 catalog keeps serving. */
  CHECK_INT(node_cmd("fail\n"), 0);
  CHECK_INT(tg_ingest_refresh(ing, "t_ok"), 0);
  CHECK_INT(wait_attempts(ing, T_OK, 3, &st), 0);
  CHECK(st.failing && st.loaded);
  CHECK_STR(st.last_reason, "http_status");
  CHECK(look(rd[T_OK]).ptr == s2.ptr);
  CHECK_INT(metric("catalog_refresh_errors_total{tenant_id=\"t_ok\",reason="
                   "\"http_status\"}"),
            1);

  /* Back up with the same version: 304 again against the v2 ETag. */
  CHECK_INT(node_cmd("ok\n"), 0);
  CHECK_INT(tg_ingest_refresh(ing, "t_ok"), 0);
  CHECK_INT(wait_attempts(ing, T_OK, 4, &st), 0);
  CHECK(!st.failing);
  CHECK_INT(st.loads, 2);
  CHECK_INT(node_not_modified(), 2);
  CHECK(look(rd[T_OK]).ptr == s2.ptr);

  /* Asked again while a slow (300 ms) fetch runs: the request is not lost but
   * runs after the first one finishes; nothing more after that. */
  CHECK_INT(tg_ingest_status(ing, T_SLOW, &st), 0);
  uint64_t before = st.attempts;
  CHECK_INT(tg_ingest_refresh(ing, "t_slow"), 0);
  usleep(100000);
  CHECK_INT(tg_ingest_refresh(ing, "t_slow"), 0);
  CHECK_INT(wait_attempts(ing, T_SLOW, before + 1, &st), 0);
  CHECK_STR(st.last_reason, "timeout");
  usleep(400000);
  CHECK_INT(tg_ingest_status(ing, T_SLOW, &st), 0);
  CHECK_INT(st.attempts, before + 2);
  CHECK_INT(metric("catalog_refresh_errors_total{tenant_id=\"t_slow\",reason="
                   "\"timeout\"}"),
            (long long)before + 2);

  /* A refresh of everything while a slow fetch may still be in flight, then
   * stop: the in-flight request is cancelled cleanly. */
  CHECK_INT(tg_ingest_refresh(ing, NULL), 0);
  tg_ingest_stop(ing);
  for (int i = 0; i < NT; i++) {
    CHECK_INT(tg_snapshot_reader_unregister(rd[i]), 0);
    tg_snapshot_free(snaps[i]);
  }
  stop_node();
  tg_metrics_reset();
}
