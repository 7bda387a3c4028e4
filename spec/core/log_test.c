#include "base/log.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

#include "base/buf.h"
#include "test.h"

/* Captures log output in a temporary file. */
typedef struct {
  char path[64];
  int fd;
} capture_t;

static int capture_start(capture_t *c) {
  snprintf(c->path, sizeof c->path, "/tmp/tg_log_test_XXXXXX");
  c->fd = mkstemp(c->path);
  if (c->fd < 0)
    return -1;
  unlink(c->path);
  tg_log_set_fd(c->fd);
  return 0;
}

/* Stops capturing and returns everything written (caller frees). */
static char *capture_end(capture_t *c, size_t *len) {
  tg_log_set_fd(-1);
  off_t size = lseek(c->fd, 0, SEEK_END);
  char *data = malloc((size_t)size + 1);
  if (data == NULL || pread(c->fd, data, (size_t)size, 0) != size) {
    free(data);
    close(c->fd);
    return NULL;
  }
  data[size] = '\0';
  close(c->fd);
  if (len)
    *len = (size_t)size;
  return data;
}

/* Splits out into lines (each must end in '\n') and parses each as an object. */
static size_t parse_lines(char *out, json_t **objs, size_t max) {
  size_t n = 0;
  for (char *p = out; *p;) {
    char *eol = strchr(p, '\n');
    if (eol == NULL || n == max)
      return (size_t)-1;
    *eol = '\0';
    json_error_t err;
    objs[n] = json_loads(p, JSON_REJECT_DUPLICATES, &err);
    if (objs[n] == NULL || !json_is_object(objs[n])) {
      fprintf(stderr, "  bad line (%s): %.200s\n", err.text, p);
      return (size_t)-1;
    }
    n++;
    p = eol + 1;
  }
  return n;
}

static const char *str(json_t *o, const char *key) { return json_string_value(json_object_get(o, key)); }

static void free_objs(json_t **objs, size_t n) {
  for (size_t i = 0; i < n && n != (size_t)-1; i++)
    json_decref(objs[i]);
}

TEST(fields_and_format) {
  tg_log_set_level(TG_LOG_INFO);
  capture_t c;
  CHECK(capture_start(&c) == 0);
  time_t before = time(NULL);
  tg_log(TG_LOG_INFO, "listening", "addr", "127.0.0.1:8080", "workers", "2", NULL);
  tg_log_req(TG_LOG_ERROR, "req-42", "upstream failed", "status", "502", NULL);
  tg_log(TG_LOG_WARN, "plain", NULL);
  time_t after = time(NULL);
  char *out = capture_end(&c, NULL);
  CHECK(out != NULL);
  /* Keys in a fixed order, compact. */
  CHECK(strncmp(out, "{\"ts\":\"", 7) == 0);
  CHECK(strstr(out, "Z\",\"level\":\"info\",\"msg\":\"listening\",\"addr\":\"127.0.0.1:8080\","
                    "\"workers\":\"2\"}\n") != NULL);
  CHECK(strstr(out, "\"level\":\"error\",\"msg\":\"upstream failed\",\"request_id\":\"req-42\","
                    "\"status\":\"502\"}\n") != NULL);

  json_t *o[8];
  size_t n = parse_lines(out, o, 8);
  CHECK_INT(n, 3);
  CHECK_STR(str(o[0], "level"), "info");
  CHECK_STR(str(o[0], "msg"), "listening");
  CHECK_STR(str(o[0], "addr"), "127.0.0.1:8080");
  CHECK(json_object_get(o[0], "request_id") == NULL);
  CHECK_INT(json_object_size(o[0]), 5);
  CHECK_STR(str(o[1], "request_id"), "req-42");
  CHECK_STR(str(o[1], "level"), "error");
  CHECK_STR(str(o[2], "level"), "warn");
  CHECK_INT(json_object_size(o[2]), 3);
  for (size_t i = 0; i < n; i++) {
    const char *ts = str(o[i], "ts");
    CHECK(ts != NULL);
    CHECK_INT(strlen(ts), 24);
    struct tm tm = {0};
    const char *rest = strptime(ts, "%Y-%m-%dT%H:%M:%S", &tm);
    CHECK(rest != NULL && rest[0] == '.' && rest[4] == 'Z');
    for (int d = 1; d <= 3; d++)
      CHECK(rest[d] >= '0' && rest[d] <= '9');
    time_t t = timegm(&tm);
    CHECK(t >= before && t <= after);
  }
  free_objs(o, n);
  free(out);
}

TEST(escaping_always_valid_json) {
  static const struct {
    const char *in, *want;
  } cases[] = {
      {"quote \" backslash \\ slash /", "quote \" backslash \\ slash /"},
      {"new\nline\rtab\t", "new\nline\rtab\t"},
      {"ctl \x01\x1f\x7f end", "ctl \x01\x1f\x7f end"},
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"},
      {"bad \xff byte", "bad \xef\xbf\xbd byte"},
      {"cut \xe2\x82", "cut \xef\xbf\xbd"},            /* truncated: one U+FFFD */
      {"overlong \xc0\xaf", "overlong \xef\xbf\xbd\xef\xbf\xbd"},
      {"surrogate \xed\xa0\x80", "surrogate \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
      {"too big \xf4\x90\x80\x80", "too big \xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
      {"lone \x80\xbf cont", "lone \xef\xbf\xbd\xef\xbf\xbd cont"},
      {"\xe2\x82x", "\xef\xbf\xbdx"},
      {"", ""},
  };
  size_t ncases = sizeof cases / sizeof cases[0];
  tg_log_set_level(TG_LOG_DEBUG);
  capture_t c;
  CHECK(capture_start(&c) == 0);
  for (size_t i = 0; i < ncases; i++) {
    tg_log(TG_LOG_DEBUG, cases[i].in, "value", cases[i].in, cases[i].in, "as key", NULL);
    tg_log_req(TG_LOG_DEBUG, cases[i].in, "rid", NULL);
  }
  size_t len;
  char *out = capture_end(&c, &len);
  CHECK(out != NULL);
  CHECK(strstr(out, "\"msg\":\"ctl \\u0001\\u001f\x7f end\"") != NULL);
  CHECK(strstr(out, "\"msg\":\"new\\nline\\rtab\\t\"") != NULL);
  /* No raw control characters: every one was escaped. */
  for (size_t i = 0; i < len; i++)
    CHECK(out[i] == '\n' || (unsigned char)out[i] >= 0x20);
  json_t *o[64];
  size_t n = parse_lines(out, o, 64);
  CHECK_INT(n, 2 * ncases);
  for (size_t i = 0; i < ncases; i++) {
    CHECK_STR(str(o[2 * i], "msg"), cases[i].want);
    CHECK_STR(str(o[2 * i], "value"), cases[i].want);
    CHECK_STR(str(o[2 * i], cases[i].want), "as key");
    CHECK_STR(str(o[2 * i + 1], "request_id"), cases[i].want);
  }
  free_objs(o, n);
  free(out);
  tg_log_set_level(TG_LOG_INFO);
}

TEST(reserved_keys_and_null_values) {
  capture_t c;
  CHECK(capture_start(&c) == 0);
  tg_log_req(TG_LOG_INFO, "r1", "real", "msg", "fake", "level", "debug", "ts", "0",
             "request_id", "r2", "missing", NULL, "after", "x", "after", "y", "fields.msg",
             "dup", NULL);
  tg_log(TG_LOG_INFO, NULL, NULL);
  char *out = capture_end(&c, NULL);
  CHECK(out != NULL);
  json_t *o[4];
  size_t n = parse_lines(out, o, 4);
  CHECK_INT(n, 2);
  CHECK_STR(str(o[0], "msg"), "real");
  CHECK_STR(str(o[0], "level"), "info");
  CHECK_STR(str(o[0], "request_id"), "r1");
  CHECK_STR(str(o[0], "fields.msg"), "fake");
  CHECK_STR(str(o[0], "fields.level"), "debug");
  CHECK_STR(str(o[0], "fields.ts"), "0");
  CHECK_STR(str(o[0], "fields.request_id"), "r2");
  CHECK(json_is_null(json_object_get(o[0], "missing")));
  CHECK_STR(str(o[0], "after"), "x");
  CHECK_STR(str(o[1], "msg"), "");
  free_objs(o, n);
  free(out);
}

TEST(level_filter) {
  CHECK_INT(tg_log_level_parse("debug"), TG_LOG_DEBUG);
  CHECK_INT(tg_log_level_parse("INFO"), TG_LOG_INFO);
  CHECK_INT(tg_log_level_parse("warn"), TG_LOG_WARN);
  CHECK_INT(tg_log_level_parse("error"), TG_LOG_ERROR);
  CHECK_INT(tg_log_level_parse("verbose"), -1);
  CHECK_INT(tg_log_level_parse(""), -1);
  CHECK_INT(tg_log_level_parse(NULL), -1);

  tg_log_set_level(TG_LOG_WARN);
  CHECK_INT(tg_log_get_level(), TG_LOG_WARN);
  tg_log_set_level((tg_log_level_t)9); /* ignored */
  CHECK_INT(tg_log_get_level(), TG_LOG_WARN);
  capture_t c;
  CHECK(capture_start(&c) == 0);
  tg_log(TG_LOG_DEBUG, "d", NULL);
  tg_log(TG_LOG_INFO, "i", NULL);
  tg_log(TG_LOG_WARN, "w", NULL);
  tg_log(TG_LOG_ERROR, "e", NULL);
  tg_log((tg_log_level_t)9, "bogus", NULL);
  tg_log_set_level(TG_LOG_DEBUG);
  tg_log(TG_LOG_DEBUG, "d2", NULL);
  tg_log_set_level(TG_LOG_INFO);
  char *out = capture_end(&c, NULL);
  CHECK(out != NULL);
  json_t *o[8];
  size_t n = parse_lines(out, o, 8);
  CHECK_INT(n, 3);
  CHECK_STR(str(o[0], "msg"), "w");
  CHECK_STR(str(o[1], "msg"), "e");
  CHECK_STR(str(o[2], "msg"), "d2");
  CHECK_STR(str(o[2], "level"), "debug");
  free_objs(o, n);
  free(out);
}

TEST(errno_preserved) {
  capture_t c;
  CHECK(capture_start(&c) == 0);
  errno = EADDRINUSE;
  tg_log(TG_LOG_ERROR, "bind failed", NULL);
  CHECK_INT(errno, EADDRINUSE);
  free(capture_end(&c, NULL));
  /* A dead sink drops the line and still keeps errno. */
  tg_log_set_fd(1000);
  errno = ENOENT;
  tg_log(TG_LOG_ERROR, "nowhere", NULL);
  CHECK_INT(errno, ENOENT);
  tg_log_set_fd(-1);
}

TEST(redaction) {
  char out[TG_REDACT_REF_LEN];
  tg_redact_ref("acct-12345678", out, sizeof out);
  CHECK_STR(out, "****5678");
  tg_redact_ref("12345", out, sizeof out);
  CHECK_STR(out, "****2345");
  tg_redact_ref("1234", out, sizeof out);
  CHECK_STR(out, "****");
  tg_redact_ref("", out, sizeof out);
  CHECK_STR(out, "****");
  tg_redact_ref(NULL, out, sizeof out);
  CHECK_STR(out, "****");
  /* Four characters, not four bytes. */
  tg_redact_ref("x\xe2\x82\xac\xe2\x82\xac\xf0\x9f\x98\x80\xc3\xa9", out, sizeof out);
  CHECK_STR(out, "****\xe2\x82\xac\xe2\x82\xac\xf0\x9f\x98\x80\xc3\xa9");
  tg_redact_ref("\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac", out, sizeof out);
  CHECK_STR(out, "****");
  char small[6];
  tg_redact_ref("acct-12345678", small, sizeof small);
  CHECK_STR(small, "****5");

  CHECK_STR(tg_redact_secret("sk_live_abc"), "[redacted]");
  CHECK_STR(tg_redact_secret(NULL), "[redacted]");

  char url[TG_REDACT_URL_LEN];
  tg_redact_url("abc", url, sizeof url); /* FIPS 180-2 test vector */
  CHECK_STR(url, "sha256:ba7816bf8f01cfea");
  tg_redact_url("", url, sizeof url);
  CHECK_STR(url, "sha256:e3b0c44298fc1c14");
  tg_redact_url(NULL, url, sizeof url);
  CHECK_STR(url, "sha256:e3b0c44298fc1c14");
  tg_redact_url("https://cdn.example/x?sig=SECRET", url, sizeof url);
  CHECK(strstr(url, "SECRET") == NULL && strncmp(url, "sha256:", 7) == 0);
  CHECK_INT(strlen(url), 23);
  char tiny[4];
  tg_redact_url("abc", tiny, sizeof tiny);
  CHECK_STR(tiny, "sha");
}

#define THREADS 4
#define LINES 1000

static char pad[6000];

static void *log_thread(void *arg) {
  int id = (int)(intptr_t)arg;
  /* Sizes both below and above the stack buffer and PIPE_BUF. */
  char tid[8], seq[16];
  snprintf(tid, sizeof tid, "%d", id);
  for (int i = 0; i < LINES; i++) {
    snprintf(seq, sizeof seq, "%d", i);
    size_t padlen = (size_t)(i * 37 % 6000);
    char *p = malloc(padlen + 1);
    memcpy(p, pad, padlen);
    p[padlen] = '\0';
    tg_log_req(TG_LOG_INFO, tid, "tick", "seq", seq, "pad", p, NULL);
    free(p);
  }
  return NULL;
}

TEST(threads_never_interleave) {
  memset(pad, 'a' + 1, sizeof pad);
  capture_t c;
  CHECK(capture_start(&c) == 0);
  pthread_t t[THREADS];
  for (intptr_t i = 0; i < THREADS; i++)
    CHECK(pthread_create(&t[i], NULL, log_thread, (void *)i) == 0);
  for (int i = 0; i < THREADS; i++)
    pthread_join(t[i], NULL);
  char *out = capture_end(&c, NULL);
  CHECK(out != NULL);
  static json_t *o[THREADS * LINES + 1];
  size_t n = parse_lines(out, o, THREADS * LINES + 1);
  CHECK_INT(n, THREADS * LINES);
  int next[THREADS] = {0};
  for (size_t i = 0; i < n; i++) {
    int id = atoi(str(o[i], "request_id"));
    CHECK(id >= 0 && id < THREADS);
    CHECK_INT(atoi(str(o[i], "seq")), next[id]);
    CHECK_INT(strlen(str(o[i], "pad")), next[id] * 37 % 6000);
    next[id]++;
  }
  free_objs(o, n);
  free(out);
}

typedef struct {
  int fd;
  tg_buf_t got;
} drain_t;

static void *drain(void *arg) {
  drain_t *d = arg;
  char chunk[1024];
  for (;;) {
    ssize_t r = read(d->fd, chunk, sizeof chunk);
    if (r <= 0)
      break;
    tg_buf_append(&d->got, chunk, (size_t)r);
    usleep(100); /* a slow reader forces partial writes and EAGAIN */
  }
  return NULL;
}

TEST(partial_writes_on_nonblocking_pipe) {
  int p[2];
  CHECK(pipe(p) == 0);
  CHECK(fcntl(p[1], F_SETFL, O_NONBLOCK) == 0);
  drain_t d = {p[0], {0}};
  pthread_t t;
  CHECK(pthread_create(&t, NULL, drain, &d) == 0);
  size_t big = 300000;
  char *v = malloc(big + 1);
  CHECK(v != NULL);
  for (size_t i = 0; i < big; i++)
    v[i] = (char)('a' + i % 26);
  v[big] = '\0';
  tg_log_set_fd(p[1]);
  tg_log(TG_LOG_INFO, "big", "v", v, NULL);
  tg_log(TG_LOG_INFO, "after", NULL);
  tg_log_set_fd(-1);
  close(p[1]);
  pthread_join(t, NULL);
  close(p[0]);
  CHECK(d.got.data != NULL);
  json_t *o[4];
  size_t n = parse_lines(d.got.data, o, 4);
  CHECK_INT(n, 2);
  CHECK(strcmp(str(o[0], "v"), v) == 0);
  CHECK_STR(str(o[1], "msg"), "after");
  free_objs(o, n);
  free(v);
  tg_buf_free(&d.got);
}

TEST(line_cut_off_by_stalled_sink) {
  /* Nobody reads the pipe: a line larger than its buffer is cut off after the
   * wait; the next line must start on a fresh line, not continue the fragment. */
  int p[2];
  CHECK(pipe(p) == 0);
  CHECK(fcntl(p[1], F_SETFL, O_NONBLOCK) == 0);
  CHECK(fcntl(p[0], F_SETFL, O_NONBLOCK) == 0);
  size_t big = 200000;
  char *v = malloc(big + 1);
  CHECK(v != NULL);
  memset(v, 'z', big);
  v[big] = '\0';
  tg_log_set_fd(p[1]);
  tg_log(TG_LOG_INFO, "too big", "v", v, NULL);
  static char sink[1 << 20];
  ssize_t got = read(p[0], sink, sizeof sink);
  CHECK(got > 0 && (size_t)got < big);
  CHECK(sink[got - 1] != '\n');
  tg_log(TG_LOG_INFO, "next", NULL);
  tg_log_set_fd(-1);
  got = read(p[0], sink, sizeof sink - 1);
  close(p[0]);
  close(p[1]);
  free(v);
  CHECK(got > 2);
  sink[got] = '\0';
  CHECK(sink[0] == '\n');
  json_t *o[2];
  size_t n = parse_lines(sink + 1, o, 2);
  CHECK_INT(n, 1);
  CHECK_STR(str(o[0], "msg"), "next");
  free_objs(o, n);
}
