#include "test.h"
#include "child.h"
#include "tls_fixture.h"

#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <uv.h>

#include "net/client.h"

/* The fixture server (spec/core/fixtures/httpd.js under node), started once
 * and stopped at exit; it also exits by itself when our end of its stdin
 * closes, so a crashed test leaves nothing running. */
static child_t node = {0, -1, -1};
static int http_port, https_port;
static tls_fixture_t fx;

static void stop_server(void) {
  child_stop(&node);
  tls_fixture_remove(&fx);
}

static int start_server(void) {
  static int state; /* 0 not started, 1 running, -1 failed */
  if (state)
    return state;
  state = -1;
  if (tls_fixture_make(&fx) != 0)
    return -1;
  atexit(stop_server);
  char *argv[] = {"node", TG_SOURCE_DIR "/spec/core/fixtures/httpd.js", fx.cert, fx.key, NULL};
  if (child_start(&node, argv) != 0)
    return -1;
  char line[128] = "";
  if (child_read_line(&node, line, sizeof line, 10000) != 0 ||
      sscanf(line, "{\"http\":%d,\"https\":%d}", &http_port, &https_port) != 2 || http_port <= 0 ||
      https_port <= 0) {
    fprintf(stderr, "  fixture server did not start: '%s'\n", line);
    return -1;
  }
  state = 1;
  return state;
}

/* What one request ended with. */
typedef struct result {
  int calls;
  int err;
  int status;
  char body[512];
  size_t body_len;
  char port[16];   /* X-Port: the client port the server saw */
  char method[16]; /* X-Method */
  char host[64];   /* X-Host */
  char test[32];   /* X-Test */
  char clen[16];   /* X-Content-Length */
  char ctype[32];  /* Content-Type, looked up in another case */
} result_t;

static void copy_header(const tg_httpc_response_t *resp, const char *name, char *dst, size_t n) {
  const tg_http_header_t *h = tg_httpc_header(resp, name);
  snprintf(dst, n, "%.*s", h ? (int)h->value_len : 0, h ? h->value : "");
}

static void on_done(int err, const tg_httpc_response_t *resp, void *ud) {
  result_t *r = ud;
  r->calls++;
  r->err = err;
  if (resp == NULL)
    return;
  r->status = resp->status;
  r->body_len = resp->body_len;
  snprintf(r->body, sizeof r->body, "%.*s", (int)resp->body_len, resp->body);
  copy_header(resp, "X-Port", r->port, sizeof r->port);
  copy_header(resp, "x-method", r->method, sizeof r->method);
  copy_header(resp, "X-HOST", r->host, sizeof r->host);
  copy_header(resp, "x-test", r->test, sizeof r->test);
  copy_header(resp, "x-content-length", r->clen, sizeof r->clen);
  copy_header(resp, "content-type", r->ctype, sizeof r->ctype);
}

static char *url(char *buf, size_t n, const char *scheme_host, int port, const char *path) {
  snprintf(buf, n, "%s:%d%s", scheme_host, port, path);
  return buf;
}

static void on_noop(uv_timer_t *t) { (void)t; }

/* Turns the loop until *count reaches want or ms pass. */
static int run_until(uv_loop_t *loop, const int *count, int want, uint64_t ms) {
  uint64_t deadline = uv_hrtime() + ms * 1000000u;
  uv_timer_t tick; /* keeps the loop from blocking forever */
  uv_timer_init(loop, &tick);
  uv_timer_start(&tick, on_noop, 10, 10);
  while (*count < want && uv_hrtime() < deadline)
    uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return *count >= want ? 0 : -1;
}

static void on_tick(uv_timer_t *t) { (*(int *)t->data)++; }

/* Lets the loop run for ms (pooled connections stay open meanwhile). */
static void run_for(uv_loop_t *loop, uint64_t ms) {
  int fired = 0;
  uv_timer_t t;
  uv_timer_init(loop, &t);
  t.data = &fired;
  uv_timer_start(&t, on_tick, ms, 0);
  while (!fired)
    uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&t, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
}

/* Sends one request and waits for its callback. */
static int fetch_ex(tg_httpc_t *c, uv_loop_t *loop, const char *method, const char *u,
                    const char *body, uint32_t timeout_ms, int idempotent, result_t *res) {
  memset(res, 0, sizeof *res);
  tg_httpc_request_t req = {.method = method,
                            .url = u,
                            .body = body,
                            .body_len = body ? strlen(body) : 0,
                            .timeout_ms = timeout_ms,
                            .idempotent = idempotent};
  int rc = tg_httpc_send(c, &req, on_done, res);
  if (rc != 0)
    return rc;
  if (res->calls != 0)
    return -1000; /* the callback must never run inside send */
  if (run_until(loop, &res->calls, 1, 10000) != 0)
    return -1001;
  return res->calls == 1 ? 0 : -1002;
}

static int fetch(tg_httpc_t *c, uv_loop_t *loop, const char *method, const char *u,
                 const char *body, uint32_t timeout_ms, result_t *res) {
  return fetch_ex(c, loop, method, u, body, timeout_ms, 0, res);
}

/* Frees the client and checks every handle it had is closed. */
static int close_client(tg_httpc_t *c, uv_loop_t *loop) {
  tg_httpc_free(c);
  uv_run(loop, UV_RUN_DEFAULT);
  return uv_loop_close(loop);
}

#define SETUP(opts)                                                                                \
  CHECK(start_server() == 1);                                                                      \
  uv_loop_t loop;                                                                                  \
  CHECK_INT(uv_loop_init(&loop), 0);                                                               \
  tg_httpc_t *c = tg_httpc_new(&loop, opts);                                                       \
  CHECK(c != NULL);                                                                                \
  char u[256];                                                                                     \
  result_t res = {0}

#define H "http://127.0.0.1"

TEST(get_and_post) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.body, "hello world");
  CHECK_INT(res.body_len, 11);
  CHECK_STR(res.ctype, "text/plain");

  tg_http_header_t hdr = {"X-Test", 6, "yes", 3};
  tg_httpc_request_t req = {.method = "POST",
                            .url = url(u, sizeof u, H, http_port, "/echo?a=1"),
                            .headers = &hdr,
                            .nheaders = 1,
                            .body = "ping",
                            .body_len = 4};
  memset(&res, 0, sizeof res);
  CHECK_INT(tg_httpc_send(c, &req, on_done, &res), 0);
  CHECK_INT(res.calls, 0);
  CHECK_INT(run_until(&loop, &res.calls, 1, 5000), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.body, "ping");
  CHECK_STR(res.method, "POST");
  char host[64];
  snprintf(host, sizeof host, "127.0.0.1:%d", http_port);
  CHECK_STR(res.host, host);
  CHECK_STR(res.test, "yes");
  CHECK_STR(res.clen, "4");

  /* An empty POST still says Content-Length: 0. */
  CHECK_INT(fetch(c, &loop, "POST", url(u, sizeof u, H, http_port, "/echo"), NULL, 0, &res), 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.clen, "0");
  CHECK_INT(res.body_len, 0);
  CHECK_STR(res.body, "");

  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/missing"), NULL, 0, &res), 0);
  CHECK_INT(res.status, 404);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(chunked_and_eof_delimited_bodies) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/chunked"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "chunk-1;chunk-2;end");
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/until-eof"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.body, "body until eof");
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(keep_alive_reuses_connection) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK(first[0] != '\0');
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_STR(res.port, first);
  /* Bodiless answers keep the connection usable too. */
  CHECK_INT(fetch(c, &loop, "HEAD", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_INT(res.body_len, 0);
  CHECK_STR(res.port, first);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/nocontent"), NULL, 0, &res), 0);
  CHECK_INT(res.status, 204);
  CHECK_INT(res.body_len, 0);
  CHECK_STR(res.port, first);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/notmodified"), NULL, 0, &res),
            0);
  CHECK_INT(res.status, 304);
  CHECK_STR(res.port, first);
  /* 102 and 103 are skipped; the final answer is what the callback sees. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/informational"), NULL, 0, &res),
            0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.body, "after 1xx");
  CHECK_STR(res.port, first);
  CHECK_INT(close_client(c, &loop), 0);
}

/* Each callback sends the next request: the connection it just freed serves it. */
typedef struct chain {
  tg_httpc_t *c;
  const char *url;
  int left, calls, errors, sync_calls;
  char ports[4][16];
} chain_t;

static void on_chain(int err, const tg_httpc_response_t *resp, void *ud) {
  chain_t *ch = ud;
  if (err != 0 || resp->status != 200) {
    ch->errors++;
  } else if (ch->calls < 4) {
    const tg_http_header_t *h = tg_httpc_header(resp, "x-port");
    snprintf(ch->ports[ch->calls], sizeof ch->ports[0], "%.*s", h ? (int)h->value_len : 0,
             h ? h->value : "");
  }
  ch->calls++;
  if (--ch->left > 0) {
    tg_httpc_request_t req = {.method = "GET", .url = ch->url};
    int before = ch->calls;
    if (tg_httpc_send(ch->c, &req, on_chain, ch) != 0)
      ch->errors++;
    if (ch->calls != before)
      ch->sync_calls++;
  }
}

TEST(requests_sent_from_callbacks_reuse_the_connection) {
  SETUP(NULL);
  chain_t ch = {.c = c, .url = url(u, sizeof u, H, http_port, "/hello"), .left = 4};
  tg_httpc_request_t req = {.method = "GET", .url = ch.url};
  CHECK_INT(tg_httpc_send(c, &req, on_chain, &ch), 0);
  CHECK_INT(run_until(&loop, &ch.calls, 4, 5000), 0);
  CHECK_INT(ch.errors, 0);
  CHECK_INT(ch.sync_calls, 0);
  for (int i = 1; i < 4; i++)
    CHECK_STR(ch.ports[i], ch.ports[0]);
  (void)res;
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(unrequested_bytes_retire_the_connection) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/extra"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "a");
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "hello world");
  CHECK(strcmp(res.port, first) != 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(connection_close_is_honoured) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/close"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK(strcmp(res.port, first) != 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(pool_bound_is_respected) {
  tg_httpc_opts_t opts = {.max_conns_per_origin = 2};
  SETUP(&opts);
  result_t many[6];
  memset(many, 0, sizeof many);
  int done = 0;
  url(u, sizeof u, H, http_port, "/slow?ms=150");
  for (int i = 0; i < 6; i++) {
    tg_httpc_request_t req = {.method = "GET", .url = u};
    CHECK_INT(tg_httpc_send(c, &req, on_done, &many[i]), 0);
  }
  uint64_t deadline = uv_hrtime() + 10000000000u;
  while (uv_hrtime() < deadline) {
    done = 0;
    for (int i = 0; i < 6; i++)
      done += many[i].calls;
    if (done == 6)
      break;
    uv_run(&loop, UV_RUN_ONCE);
  }
  CHECK_INT(done, 6);
  char ports[6][16];
  int distinct = 0;
  for (int i = 0; i < 6; i++) {
    CHECK_INT(many[i].err, 0);
    CHECK_INT(many[i].status, 200);
    char port[16];
    int active = 0;
    CHECK(sscanf(many[i].body, "%15s %d", port, &active) == 2);
    CHECK(active >= 1 && active <= 2);
    int seen = 0;
    for (int j = 0; j < distinct; j++)
      seen |= strcmp(ports[j], port) == 0;
    if (!seen)
      snprintf(ports[distinct++], sizeof ports[0], "%s", port);
  }
  /* Both connections were used, and never a third. */
  CHECK_INT(distinct, 2);
  (void)res;
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(full_queue_gives_ebusy) {
  tg_httpc_opts_t opts = {.max_conns_per_origin = 1, .max_queue_per_origin = 2};
  SETUP(&opts);
  result_t many[4];
  memset(many, 0, sizeof many);
  url(u, sizeof u, H, http_port, "/slow?ms=50");
  for (int i = 0; i < 4; i++) {
    tg_httpc_request_t req = {.method = "GET", .url = u};
    CHECK_INT(tg_httpc_send(c, &req, on_done, &many[i]), 0);
  }
  for (int i = 0; i < 4; i++)
    CHECK_INT(many[i].calls, 0); /* -EBUSY too arrives from the loop */
  uint64_t deadline = uv_hrtime() + 10000000000u;
  int done = 0;
  while (done < 4 && uv_hrtime() < deadline) {
    uv_run(&loop, UV_RUN_ONCE);
    done = 0;
    for (int i = 0; i < 4; i++)
      done += many[i].calls;
  }
  CHECK_INT(done, 4);
  CHECK_INT(many[0].err, 0);
  CHECK_INT(many[1].err, 0);
  CHECK_INT(many[2].err, -EBUSY);
  CHECK_INT(many[3].err, -EBUSY);
  CHECK(strstr(tg_httpc_strerror(-EBUSY), "waiting") != NULL);
  (void)res;
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(request_timeout) {
  tg_httpc_opts_t opts = {.max_conns_per_origin = 1};
  SETUP(&opts);
  uint64_t t0 = uv_hrtime();
  CHECK_INT(
      fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/slow?ms=3000"), NULL, 200, &res), 0);
  CHECK_INT(res.err, UV_ETIMEDOUT);
  uint64_t ms = (uv_hrtime() - t0) / 1000000u;
  CHECK(ms >= 150 && ms < 2000);

  /* Also while waiting in the queue behind a slow request. */
  result_t slow = {0}, queued = {0};
  tg_httpc_request_t a = {.method = "GET", .url = url(u, sizeof u, H, http_port, "/slow?ms=400")};
  CHECK_INT(tg_httpc_send(c, &a, on_done, &slow), 0);
  char u2[256];
  tg_httpc_request_t b = {
      .method = "GET", .url = url(u2, sizeof u2, H, http_port, "/hello"), .timeout_ms = 100};
  CHECK_INT(tg_httpc_send(c, &b, on_done, &queued), 0);
  CHECK_INT(run_until(&loop, &queued.calls, 1, 5000), 0);
  CHECK_INT(queued.err, UV_ETIMEDOUT);
  CHECK_INT(slow.calls, 0);
  CHECK_INT(run_until(&loop, &slow.calls, 1, 5000), 0);
  CHECK_INT(slow.err, 0);
  CHECK_INT(slow.status, 200);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(connection_refused) {
  SETUP(NULL);
  /* A port that was free a moment ago: nothing listens there. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(fd >= 0);
  struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sin;
  CHECK_INT(bind(fd, (struct sockaddr *)&sin, sizeof sin), 0);
  CHECK_INT(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
  close(fd);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, ntohs(sin.sin_port), "/"), NULL, 0, &res),
            0);
  CHECK_INT(res.err, UV_ECONNREFUSED);
  CHECK(strstr(tg_httpc_last_error(c), "connect") != NULL);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(https_with_the_right_ca) {
  CHECK(start_server() == 1);
  tg_httpc_opts_t opts = {.ca_file = fx.ca};
  SETUP(&opts);
  /* By name (resolved; the name may give ::1 first, the server is on 127.0.0.1). */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, "https://localhost", https_port, "/hello"),
                  NULL, 0, &res),
            0);
  if (res.err)
    fprintf(stderr, "  %s: %s\n", tg_httpc_strerror(res.err), tg_httpc_last_error(c));
  CHECK_INT(res.err, 0);
  CHECK_INT(res.status, 200);
  CHECK_STR(res.body, "hello world");
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK_INT(fetch(c, &loop, "POST", url(u, sizeof u, "https://localhost", https_port, "/echo"),
                  "over tls", 0, &res),
            0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "over tls");
  CHECK_STR(res.port, first);
  /* By address: verified against the certificate's IP SAN. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, "https://127.0.0.1", https_port, "/chunked"),
                  NULL, 0, &res),
            0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "chunk-1;chunk-2;end");
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(https_with_system_bundle_fails_verification) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, "https://localhost", https_port, "/hello"),
                  NULL, 0, &res),
            0);
  CHECK_INT(res.err, -EPROTO);
  const char *why = tg_httpc_last_error(c);
  if (strstr(why, "verification failed") == NULL)
    fprintf(stderr, "  last error: %s\n", why);
  CHECK(strstr(why, "verification failed") != NULL);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(stale_pooled_connection_is_retried) {
  SETUP(NULL);
  /* The server drops the next request on this connection without a word:
   * a request marked idempotent goes again on a fresh connection. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/drop-next"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK_INT(fetch_ex(c, &loop, "POST", url(u, sizeof u, H, http_port, "/echo"), "again", 0, 1, &res),
            0);
  CHECK_INT(res.err, 0);
  CHECK_STR(res.body, "again");
  CHECK(strcmp(res.port, first) != 0);

  /* A plain POST may have been processed: it is not sent twice. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/drop-next"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(fetch(c, &loop, "POST", url(u, sizeof u, H, http_port, "/echo"), "once", 0, &res), 0);
  CHECK(res.err == UV_ECONNRESET || res.err == UV_EOF);

  /* The server closes the idle connection; the next request still works. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/close-idle"), NULL, 0, &res),
            0);
  CHECK_INT(res.err, 0);
  snprintf(first, sizeof first, "%s", res.port);
  run_for(&loop, 150);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK(strcmp(res.port, first) != 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(fresh_connection_drop_is_not_retried_for_post) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "POST", url(u, sizeof u, H, http_port, "/drop"), "x", 0, &res), 0);
  CHECK_INT(res.err, UV_ECONNRESET);
  /* GET is retried once, then the error stands. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/drop"), NULL, 0, &res), 0);
  CHECK_INT(res.err, UV_ECONNRESET);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(response_size_limit) {
  tg_httpc_opts_t opts = {.max_response_bytes = 1000};
  SETUP(&opts);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/big?n=500"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(res.body_len, 500);
  /* Announced by Content-Length, and streamed in chunks. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/big?n=5000"), NULL, 0, &res),
            0);
  CHECK_INT(res.err, -EFBIG);
  CHECK_INT(
      fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/bigstream?n=50000"), NULL, 0, &res),
      0);
  CHECK_INT(res.err, -EFBIG);
  /* The client is fine afterwards. */
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(bad_responses_and_bad_requests) {
  SETUP(NULL);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/garbage"), NULL, 0, &res), 0);
  CHECK_INT(res.err, -EPROTO);

  const char *bad_urls[] = {
      "ftp://127.0.0.1/", "http://",           "http:///x",    "http://a b/",  "http://host:99999/",
      "http://host:0/",   "http://user@host/", "http://[::1/", "http://ho$t/", "127.0.0.1:80/"};
  for (size_t i = 0; i < sizeof bad_urls / sizeof bad_urls[0]; i++) {
    tg_httpc_request_t req = {.method = "GET", .url = bad_urls[i]};
    memset(&res, 0, sizeof res);
    int rc = tg_httpc_send(c, &req, on_done, &res);
    if (rc != -EINVAL)
      fprintf(stderr, "  accepted %s\n", bad_urls[i]);
    CHECK_INT(rc, -EINVAL);
  }
  tg_http_header_t inject = {"X-A", 3, "1\r\nX-B: 2", 9};
  tg_httpc_request_t req = {.method = "GET",
                            .url = url(u, sizeof u, H, http_port, "/"),
                            .headers = &inject,
                            .nheaders = 1};
  CHECK_INT(tg_httpc_send(c, &req, on_done, &res), -EINVAL);
  tg_httpc_request_t bad_method = {.method = "GE T", .url = u};
  CHECK_INT(tg_httpc_send(c, &bad_method, on_done, &res), -EINVAL);
  run_for(&loop, 20);
  CHECK_INT(res.calls, 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(free_cancels_everything_in_flight) {
  tg_httpc_opts_t opts = {.max_conns_per_origin = 2};
  SETUP(&opts);
  result_t many[4];
  memset(many, 0, sizeof many);
  url(u, sizeof u, H, http_port, "/slow?ms=3000");
  for (int i = 0; i < 4; i++) { /* two on connections, two queued */
    tg_httpc_request_t req = {.method = "GET", .url = u};
    CHECK_INT(tg_httpc_send(c, &req, on_done, &many[i]), 0);
  }
  run_for(&loop, 100);
  for (int i = 0; i < 4; i++)
    CHECK_INT(many[i].calls, 0);
  tg_httpc_free(c);
  for (int i = 0; i < 4; i++) {
    CHECK_INT(many[i].calls, 1);
    CHECK_INT(many[i].err, -ECANCELED);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  for (int i = 0; i < 4; i++)
    CHECK_INT(many[i].calls, 1);
  CHECK_INT(uv_loop_close(&loop), 0);
  (void)res;
}

/* Frees the client from inside a callback, then tries to send on it. */
typedef struct freer {
  tg_httpc_t *c;
  int calls, err, send_rc;
} freer_t;

static void on_free_inside(int err, const tg_httpc_response_t *resp, void *ud) {
  freer_t *f = ud;
  (void)resp;
  f->calls++;
  f->err = err;
  tg_httpc_free(f->c);
  tg_httpc_free(f->c); /* a second free while closing is harmless */
  tg_httpc_request_t req = {.method = "GET", .url = "http://127.0.0.1:1/"};
  f->send_rc = tg_httpc_send(f->c, &req, on_done, NULL);
}

TEST(free_inside_a_callback) {
  SETUP(NULL);
  freer_t f = {.c = c};
  result_t other = {0};
  tg_httpc_request_t quick = {.method = "GET", .url = url(u, sizeof u, H, http_port, "/hello")};
  CHECK_INT(tg_httpc_send(c, &quick, on_free_inside, &f), 0);
  char u2[256];
  tg_httpc_request_t slow = {.method = "GET",
                             .url = url(u2, sizeof u2, H, http_port, "/slow?ms=2000")};
  CHECK_INT(tg_httpc_send(c, &slow, on_done, &other), 0);
  CHECK_INT(run_until(&loop, &f.calls, 1, 5000), 0);
  CHECK_INT(f.err, 0);
  CHECK_INT(f.send_rc, -ECANCELED);
  CHECK_INT(other.calls, 1);
  CHECK_INT(other.err, -ECANCELED);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(f.calls, 1);
  CHECK_INT(uv_loop_close(&loop), 0);
  (void)res;
}

TEST(free_while_resolving) {
  SETUP(NULL);
  tg_httpc_request_t req = {.method = "GET",
                            .url = url(u, sizeof u, "http://localhost", http_port, "/hello")};
  CHECK_INT(tg_httpc_send(c, &req, on_done, &res), 0);
  tg_httpc_free(c);
  CHECK_INT(res.calls, 1);
  CHECK_INT(res.err, -ECANCELED);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(res.calls, 1);
  CHECK_INT(uv_loop_close(&loop), 0);
}

TEST(idle_connections_expire) {
  tg_httpc_opts_t opts = {.idle_timeout_ms = 50};
  SETUP(&opts);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  char first[16];
  snprintf(first, sizeof first, "%s", res.port);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_STR(res.port, first);
  run_for(&loop, 150);
  CHECK_INT(fetch(c, &loop, "GET", url(u, sizeof u, H, http_port, "/hello"), NULL, 0, &res), 0);
  CHECK_INT(res.err, 0);
  CHECK(strcmp(res.port, first) != 0);
  CHECK_INT(close_client(c, &loop), 0);
}

TEST(connect_timeout) {
  tg_httpc_opts_t opts = {.connect_timeout_ms = 200};
  SETUP(&opts);
  /* A listener that never accepts, with its backlog filled: further SYNs
   * are dropped, so connecting hangs. */
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  CHECK(lfd >= 0);
  struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sin;
  CHECK_INT(bind(lfd, (struct sockaddr *)&sin, sizeof sin), 0);
  CHECK_INT(getsockname(lfd, (struct sockaddr *)&sin, &sl), 0);
  CHECK_INT(listen(lfd, 0), 0);
  int fillers[4];
  for (int i = 0; i < 4; i++) {
    fillers[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(fillers[i], (struct sockaddr *)&sin, sizeof sin);
  }
  uint64_t t0 = uv_hrtime();
  int rc = fetch(c, &loop, "GET", url(u, sizeof u, H, ntohs(sin.sin_port), "/"), NULL, 5000, &res);
  uint64_t ms = (uv_hrtime() - t0) / 1000000u;
  for (int i = 0; i < 4; i++)
    close(fillers[i]);
  close(lfd);
  CHECK_INT(rc, 0);
  CHECK_INT(res.err, UV_ETIMEDOUT);
  CHECK(ms >= 150 && ms < 2000);
  CHECK(strstr(tg_httpc_last_error(c), "connect timed out") != NULL);
  CHECK_INT(close_client(c, &loop), 0);
}
