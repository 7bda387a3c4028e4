/* The HTTP server against raw sockets: framing, keep-alive, pipelining,
 * chunked bodies, 100-continue, limits and timeouts, graceful stop, TLS, and
 * what an idle keep-alive connection costs. */
#include <arpa/inet.h>
#include <errno.h>
#include <malloc.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/buf.h"
#include "net/server.h"
#include "net/tls.h"
#include "test.h"
#include "tls_fixture.h"

/* ---- the server under test ---- */

typedef struct delayed {
  uv_timer_t timer;
  tg_http_req_t *req;
} delayed_t;

static _Atomic int handled;

static void on_delay_closed(uv_handle_t *h) { free(h->data); }

static void on_delay(uv_timer_t *t) {
  delayed_t *d = t->data;
  char body[128];
  int n = snprintf(body, sizeof body, "late %s", d->req->path);
  tg_http_respond_simple(d->req, 200, "text/plain", body, (size_t)n);
  uv_close((uv_handle_t *)&d->timer, on_delay_closed);
}

/* /delay/<ms>: answers after ms; /hdr/<name>: the value of a request header;
 * /host: req->host and the raw target; /rid: the request id; /big: 1 KiB;
 * /badhdr/<kind>: an invalid answer header; anything else echoes method,
 * path, query, body length and body. */
static void handler(tg_http_req_t *req, void *ud) {
  (void)ud;
  atomic_fetch_add(&handled, 1);
  if (strncmp(req->path, "/delay/", 7) == 0) {
    delayed_t *d = calloc(1, sizeof *d);
    d->req = req;
    uv_timer_init(req->worker->loop, &d->timer);
    d->timer.data = d;
    uv_timer_start(&d->timer, on_delay, (uint64_t)atoi(req->path + 7), 0);
    return;
  }
  if (strcmp(req->path, "/host") == 0) {
    tg_buf_t b = {0};
    if (tg_buf_printf(&b, "host=%s raw=%s", req->host ? req->host : "-", req->raw_target) != 0)
      tg_http_respond_simple(req, 500, "text/plain", "oom", 3);
    else
      tg_http_respond_simple(req, 200, "text/plain", b.data, b.len);
    tg_buf_free(&b);
    return;
  }
  if (strcmp(req->path, "/peer") == 0) {
    char ip[64], body[160];
    tg_http_peer_ip(req, ip, sizeof ip);
    int n = snprintf(body, sizeof body, "peer=%s ip=%s", req->peer ? req->peer : "-", ip);
    tg_http_respond_simple(req, 200, "text/plain", body, (size_t)n);
    return;
  }
  if (strcmp(req->path, "/rid") == 0) {
    tg_http_respond_simple(req, 200, "text/plain", req->request_id, strlen(req->request_id));
    return;
  }
  if (strcmp(req->path, "/big") == 0) { /* 1 KiB answers fill a client's window fast */
    char body[1024];
    memset(body, 'b', sizeof body);
    tg_http_respond_simple(req, 200, "text/plain", body, sizeof body);
    return;
  }
  if (strncmp(req->path, "/badhdr/", 8) == 0) { /* a handler bug: a header that would split the head */
    const char *kind = req->path + 8;
    tg_http_header_t h = {"X-Ok", 4, "fine", 4};
    int status = 200;
    if (strcmp(kind, "crlf") == 0)
      h = (tg_http_header_t){"X-A", 3, "a\r\nInjected: 1", 16};
    else if (strcmp(kind, "nul") == 0)
      h = (tg_http_header_t){"X-A", 3, "a\0b", 3};
    else if (strcmp(kind, "name") == 0)
      h = (tg_http_header_t){"X-A: b\r\nInjected", 17, "1", 1};
    else if (strcmp(kind, "cl") == 0)
      h = (tg_http_header_t){"Content-Length", 14, "0", 1};
    else if (strcmp(kind, "status") == 0)
      status = 1000;
    tg_http_respond(req, status, &h, 1, "body", 4);
    return;
  }
  if (strncmp(req->path, "/hdr/", 5) == 0) {
    const tg_http_header_t *h = tg_http_req_header(req, req->path + 5);
    tg_http_respond_simple(req, h ? 200 : 404, "text/plain", h ? h->value : "", h ? h->value_len : 0);
    return;
  }
  tg_buf_t b = {0};
  if (tg_buf_printf(&b, "%s %s q=%s n=%zu body=", req->method_name, req->path, req->query ? req->query : "-",
                    req->body_len) != 0 ||
      tg_buf_append(&b, req->body, req->body_len) != 0)
    tg_http_respond_simple(req, 500, "text/plain", "oom", 3); /* a short echo would read as a server bug */
  else
    tg_http_respond_simple(req, 200, "text/plain", b.data, b.len);
  tg_buf_free(&b);
}

static tg_server_t *start(tg_http_limits_t lim, int nworkers) {
  tg_listener_config_t l = {"127.0.0.1", 0, NULL, NULL, 0, handler, NULL};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = nworkers;
  cfg.limits = lim;
  tg_server_t *s = NULL;
  char err[256];
  if (tg_server_start(&s, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "start: %s\n", err);
    return NULL;
  }
  return s;
}

/* ---- a blocking test client ---- */

static int dial(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static void send_all(int fd, const char *s, size_t n) {
  while (n) {
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
    if (w <= 0)
      return;
    s += w;
    n -= (size_t)w;
  }
}

static void send_str(int fd, const char *s) { send_all(fd, s, strlen(s)); }

/* Reads until the peer closes or timeout_ms passes with nothing new. */
static void read_until_quiet(int fd, tg_buf_t *out, int timeout_ms) {
  char tmp[8192];
  for (;;) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0)
      return;
    ssize_t n = recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0)
      return;
    tg_buf_append(out, tmp, (size_t)n);
  }
}

/* Complete responses (Content-Length framed) at the start of b; 100
 * Continue does not count. */
static int count_responses(const tg_buf_t *b) {
  int complete = 0;
  const char *p = b->data;
  const char *end = b->data ? b->data + b->len : NULL;
  while (p && p < end) {
    const char *hend = strstr(p, "\r\n\r\n");
    if (hend == NULL)
      break;
    if (strncmp(p, "HTTP/1.1 100", 12) == 0) {
      p = hend + 4;
      continue;
    }
    const char *cl = strcasestr(p, "Content-Length: ");
    size_t len = (cl && cl < hend) ? strtoul(cl + 16, NULL, 10) : 0;
    if ((size_t)(end - (hend + 4)) < len)
      break;
    p = hend + 4 + len;
    complete++;
  }
  return complete;
}

/* Reads exactly `count` complete responses (Content-Length framed). */
static int read_responses(int fd, tg_buf_t *out, int count, int timeout_ms) {
  char tmp[8192];
  for (;;) {
    int complete = count_responses(out);
    if (complete >= count)
      return complete;
    struct pollfd pf = {fd, POLLIN, 0};
    if (poll(&pf, 1, timeout_ms) <= 0)
      return complete;
    ssize_t n = recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0)
      return complete;
    tg_buf_append(out, tmp, (size_t)n);
  }
}

static int peer_closed(int fd, int timeout_ms) {
  char c;
  struct pollfd p = {fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0)
    return 0;
  return recv(fd, &c, 1, 0) == 0;
}


static tg_http_limits_t small_limits(void) {
  tg_http_limits_t l = {0};
  l.max_header_bytes = 1024;
  l.max_body_bytes = 4096;
  l.header_timeout_ms = 300;
  l.body_timeout_ms = 300;
  l.idle_timeout_ms = 300;
  return l;
}

/* ---- tests ---- */

/* A second server on a port another one listens on must fail to start,
 * not share the port through SO_REUSEPORT and take half its connections. */
TEST(a_taken_port_fails_start) {
  tg_server_t *a = start(small_limits(), 2);
  CHECK(a != NULL);
  tg_listener_config_t l = {"127.0.0.1", tg_server_port(a, 0), NULL, NULL, 0, handler, NULL};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = 1;
  tg_server_t *b = NULL;
  char err[256] = "";
  CHECK_INT(tg_server_start(&b, &cfg, err, sizeof err), -EADDRINUSE);
  CHECK(b == NULL);
  CHECK(strstr(err, "in use") != NULL);
  tg_server_stop(a, 1000);
  /* Free again: a restart on the same port works. */
  CHECK_INT(tg_server_start(&b, &cfg, err, sizeof err), 0);
  tg_server_stop(b, 1000);
}

/* A worker whose application start fails half way (a handle already open on
 * its loop) is stopped through on_worker_stop, so its loop ends and the
 * start fails instead of hanging. */
static _Atomic int stops_called;

static uv_timer_t half_timers[2];

static void half_never(uv_timer_t *t) { (void)t; }

static int half_start(tg_worker_t *w, void *ud) {
  (void)ud;
  if (uv_timer_init(w->loop, &half_timers[w->id]) != 0)
    return -ENOMEM;
  uv_timer_start(&half_timers[w->id], half_never, 3600000, 0); /* it only holds the loop */
  return w->id == 1 ? -EIO : 0;
}

static void half_stop(tg_worker_t *w, void *ud) {
  (void)ud;
  atomic_fetch_add(&stops_called, 1);
  uv_close((uv_handle_t *)&half_timers[w->id], NULL);
}

TEST(a_worker_that_fails_to_start_is_stopped_and_start_fails) {
  tg_listener_config_t l = {"127.0.0.1", 0, NULL, NULL, 0, handler, NULL};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = 2;
  cfg.on_worker_start = half_start;
  cfg.on_worker_stop = half_stop;
  tg_server_t *s = NULL;
  char err[256] = "";
  atomic_store(&stops_called, 0);
  CHECK_INT(tg_server_start(&s, &cfg, err, sizeof err), -EIO);
  CHECK(s == NULL);
  CHECK(strstr(err, "worker 1 failed to start") != NULL);
  CHECK_INT(atomic_load(&stops_called), 2); /* the failed one too */
}

TEST(get_and_keepalive) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  CHECK(fd >= 0);
  send_str(fd, "GET /a?x=1 HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strncmp(b.data, "HTTP/1.1 200 OK\r\n", 17) == 0);
  CHECK(strstr(b.data, "GET /a q=x=1 n=0 body=") != NULL);
  CHECK(strstr(b.data, "Connection: close") == NULL);
  tg_buf_reset(&b);
  send_str(fd, "POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strstr(b.data, "POST /b q=- n=5 body=hello") != NULL);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(pipelined_answers_keep_request_order) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  /* The first answer is the slowest: answers must still come in order. */
  send_str(fd, "GET /delay/150 HTTP/1.1\r\nHost: t\r\n\r\n"
               "GET /delay/10 HTTP/1.1\r\nHost: t\r\n\r\n"
               "GET /now HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 3, 2000), 3);
  const char *a1 = strstr(b.data, "late /delay/150");
  const char *a2 = strstr(b.data, "late /delay/10");
  const char *a3 = strstr(b.data, "GET /now");
  CHECK(a1 && a2 && a3);
  CHECK(a1 < a2 && a2 < a3);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(many_pipelined_requests_pause_and_resume) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  tg_buf_t req = {0};
  for (int i = 0; i < 200; i++)
    CHECK_INT(tg_buf_printf(&req, "GET /r%d HTTP/1.1\r\nHost: t\r\n\r\n", i), 0);
  send_all(fd, req.data, req.len);
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 200, 3000), 200);
  CHECK(strstr(b.data, "GET /r0 ") < strstr(b.data, "GET /r199 "));
  close(fd);
  tg_buf_free(&b);
  tg_buf_free(&req);
  tg_server_stop(s, 1000);
}

TEST(chunked_body_is_dechunked) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strstr(b.data, "n=11 body=hello world") != NULL);
  /* The CRLF after chunk data split over reads is still checked right. */
  tg_buf_reset(&b);
  const char *parts[] = {"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
                         "\r", "\n3\r\nabc\r\n0\r\n\r\n"};
  for (int i = 0; i < 3; i++) {
    send_str(fd, parts[i]);
    usleep(30 * 1000);
  }
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strstr(b.data, "n=8 body=helloabc") != NULL);
  tg_buf_reset(&b);
  const char *bad[] = {"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello",
                       "X", "Y0\r\n\r\n"};
  for (int i = 0; i < 3; i++) {
    send_str(fd, bad[i]);
    usleep(30 * 1000);
  }
  read_until_quiet(fd, &b, 1000);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 400 ", 13) == 0);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(expect_continue) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n");
  tg_buf_t b = {0};
  read_until_quiet(fd, &b, 200);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0);
  send_str(fd, "abc");
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strstr(b.data, "n=3 body=abc") != NULL);
  tg_buf_reset(&b);
  /* Too large: refused before the body is sent. */
  send_str(fd, "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 999999\r\nExpect: 100-continue\r\n\r\n");
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strncmp(b.data, "HTTP/1.1 413 ", 13) == 0);
  CHECK(peer_closed(fd, 1000));
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(limits_answer_with_exact_status) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  struct {
    const char *req;
    const char *status;
  } cases[] = {
      {"GET / HTTP/1.1\r\nHost: t\r\nX-Big: %s\r\n\r\n", "HTTP/1.1 431 "},
      {"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n", "HTTP/1.1 413 "},
      {"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2000\r\n%s", "HTTP/1.1 413 "},
      {"GARBAGE\r\n\r\n", "HTTP/1.1 400 "},
      {"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
       "HTTP/1.1 400 "},
      {"GET / HTTP/9.9\r\nHost: t\r\n\r\n", "HTTP/1.1 505 "},
      {"GET / HTTP/1.1\r\nBad Header\r\n\r\n", "HTTP/1.1 400 "},
      {"POST / HTTP/1.1\r\nHost: t\r\nExpect: something-else\r\nContent-Length: 1\r\n\r\nx",
       "HTTP/1.1 417 "},
      {"GET / HTTP/1.1\r\nX: y\r\n\r\n", "HTTP/1.1 400 "},
      {"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
       "HTTP/1.1 400 "},
      {"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "HTTP/1.1 400 "},
      {"GET / HTTP/1.1\r\nHost : a\r\n\r\n", "HTTP/1.1 400 "},
      {"GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n", "HTTP/1.1 400 "},
      {"GET /\r\n\r\n", "HTTP/1.1 505 "},
      {"GET /%.1100s HTTP/1.1\r\nHost: t\r\n\r\n", "HTTP/1.1 414 "},
  };
  char big[5000];
  memset(big, 'a', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    int fd = dial(port);
    CHECK(fd >= 0);
    char req[12000];
    snprintf(req, sizeof req, cases[i].req, big);
    send_str(fd, req);
    tg_buf_t b = {0};
    read_until_quiet(fd, &b, 1000);
    if (b.data == NULL || strncmp(b.data, cases[i].status, strlen(cases[i].status)) != 0) {
      fprintf(stderr, "  case %zu: got %.40s\n", i, b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    CHECK(strstr(b.data, "Connection: close") != NULL);
    tg_buf_free(&b);
    close(fd);
  }
  /* And the server still answers. */
  int fd = dial(port);
  send_str(fd, "GET /ok HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strncmp(b.data, "HTTP/1.1 200 ", 13) == 0);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(too_many_headers_is_431) {
  tg_http_limits_t lim = small_limits();
  lim.max_header_bytes = 65536;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  tg_buf_t req = {0};
  tg_buf_puts(&req, "GET / HTTP/1.1\r\n");
  for (int i = 0; i < 150; i++)
    CHECK_INT(tg_buf_printf(&req, "X-H%d: v\r\n", i), 0);
  tg_buf_puts(&req, "\r\n");
  send_all(fd, req.data, req.len);
  tg_buf_t b = {0};
  read_until_quiet(fd, &b, 1000);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 431 ", 13) == 0);
  close(fd);
  tg_buf_free(&b);
  tg_buf_free(&req);
  tg_server_stop(s, 1000);
}

TEST(slow_client_gets_408_and_others_are_served) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  int slow = dial(port);
  send_str(slow, "GET / HTTP/1.1\r\nHo");
  /* Meanwhile another client is served at once. */
  int fast = dial(port);
  send_str(fast, "GET /fast HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fast, &b, 1, 200), 1);
  CHECK(strstr(b.data, "GET /fast") != NULL);
  tg_buf_reset(&b);
  /* The slow one keeps trickling, but the head deadline does not move. */
  for (int i = 0; i < 4; i++) {
    usleep(100 * 1000);
    send_str(slow, "s");
  }
  read_until_quiet(slow, &b, 1000);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 408 ", 13) == 0);
  close(slow);
  close(fast);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

/* The client's address as the pipeline sees it: "ip:port" with the port
 * the client really has, and the address alone from tg_http_peer_ip. */
TEST(peer_is_ip_and_port) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  struct sockaddr_in me;
  socklen_t len = sizeof me;
  CHECK_INT(getsockname(fd, (struct sockaddr *)&me, &len), 0);
  send_str(fd, "GET /peer HTTP/1.1\r\nHost: t\r\n\r\nGET /peer HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 2, 1000), 2);
  char want[96];
  snprintf(want, sizeof want, "peer=127.0.0.1:%u ip=127.0.0.1", (unsigned)ntohs(me.sin_port));
  const char *first = b.data ? strstr(b.data, want) : NULL;
  CHECK(first != NULL);
  CHECK(first && strstr(first + 1, want) != NULL); /* the same for the second request */
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(idle_connection_closes) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
  CHECK(peer_closed(fd, 2000));
  close(fd);
  /* A connection that never sends anything goes as well, without an answer. */
  fd = dial(tg_server_port(s, 0));
  tg_buf_reset(&b);
  read_until_quiet(fd, &b, 2000);
  CHECK(b.len == 0);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(http10_and_connection_close) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "GET /old HTTP/1.0\r\n\r\n");
  tg_buf_t b = {0};
  read_until_quiet(fd, &b, 1000);
  CHECK(b.data && strstr(b.data, "Connection: close") && strstr(b.data, "GET /old"));
  close(fd);
  fd = dial(tg_server_port(s, 0));
  tg_buf_reset(&b);
  send_str(fd, "GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
  CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
  CHECK(strstr(b.data, "Connection: keep-alive") != NULL);
  close(fd);
  /* Connection: close in the middle of a pipeline: later requests are ignored. */
  fd = dial(tg_server_port(s, 0));
  tg_buf_reset(&b);
  send_str(fd, "GET /1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n");
  read_until_quiet(fd, &b, 1000);
  CHECK(b.data && strstr(b.data, "GET /1") && !strstr(b.data, "GET /2"));
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(request_id_and_headers) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "GET /hdr/x-custom HTTP/1.1\r\nHost: t\r\nX-CUSTOM: Value 1\r\n\r\n"
               "GET /hdr/missing HTTP/1.1\r\nHost: t\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 2, 1000), 2);
  CHECK(strstr(b.data, "\r\n\r\nValue 1") != NULL);
  CHECK(strstr(b.data, "HTTP/1.1 404 ") != NULL);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(connection_cap) {
  tg_http_limits_t lim = small_limits();
  lim.max_connections = 2;
  lim.idle_timeout_ms = 5000;
  lim.header_timeout_ms = 5000;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  int a = dial(port), b2 = dial(port);
  usleep(100 * 1000);
  int c = dial(port);
  tg_buf_t b = {0};
  read_until_quiet(c, &b, 1000);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 503 ", 13) == 0);
  close(c);
  close(a);
  usleep(100 * 1000);
  /* A slot is free again. */
  int d = dial(port);
  tg_buf_reset(&b);
  send_str(d, "GET / HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK_INT(read_responses(d, &b, 1, 1000), 1);
  CHECK(strncmp(b.data, "HTTP/1.1 200 ", 13) == 0);
  close(d);
  close(b2);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

typedef struct stopper {
  tg_server_t *s;
  uint32_t grace_ms;
} stopper_t;

static void *stop_thread(void *arg) {
  stopper_t *st = arg;
  tg_server_stop(st->s, st->grace_ms);
  return NULL;
}

TEST(graceful_stop_finishes_in_flight) {
  tg_server_t *s = start(small_limits(), 2);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  int fd = dial(port);
  send_str(fd, "GET /delay/300 HTTP/1.1\r\nHost: t\r\n\r\n");
  usleep(50 * 1000);
  pthread_t th;
  stopper_t st = {s, 2000};
  pthread_create(&th, NULL, stop_thread, &st);
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
  CHECK(strstr(b.data, "late /delay/300") != NULL);
  CHECK(strstr(b.data, "Connection: close") != NULL);
  pthread_join(th, NULL);
  close(fd);
  /* Listeners are gone. */
  CHECK(dial(port) < 0);
  tg_buf_free(&b);
}

TEST(grace_deadline_cuts_slow_handlers) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "GET /delay/1500 HTTP/1.1\r\nHost: t\r\n\r\n");
  usleep(50 * 1000);
  pthread_t th;
  stopper_t st = {s, 300};
  uint64_t t0 = uv_hrtime();
  pthread_create(&th, NULL, stop_thread, &st);
  /* The connection is cut when the 300 ms grace ends, not when the handler
   * would have answered. */
  CHECK(peer_closed(fd, 3000));
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  pthread_join(th, NULL);
  CHECK(ms >= 250 && ms < 1200);
  close(fd);
}

/* Sends raw on a fresh connection; returns everything until the server
 * closes (or goes quiet). */
static void exchange(int port, const char *raw, size_t len, tg_buf_t *out) {
  int fd = dial(port);
  send_all(fd, raw, len);
  read_until_quiet(fd, out, 1000);
  close(fd);
}

static int count_str(const char *hay, const char *needle) {
  int n = 0;
  for (const char *p = hay; p && (p = strstr(p, needle)); p++)
    n++;
  return n;
}

TEST(target_is_normalized_before_the_handler) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  struct {
    const char *target;
    const char *seen; /* what the echo handler prints: "<path> q=<query>" */
  } cases[] = {
      {"/a/./b/../c", "GET /a/c q=-"},
      {"/docs/../v1/quotes/ACME", "GET /v1/quotes/ACME q=-"},
      {"/docs/%2e%2E/v1/quotes", "GET /v1/quotes q=-"},
      {"/docs/.%2e/v1", "GET /v1 q=-"},
      {"//v1//quotes/", "GET /v1/quotes/ q=-"},
      {"/a%7e%41%5fb%3a%3A", "GET /a~A_b%3A%3A q=-"},
      {"/a/b/..", "GET /a/ q=-"},
      {"/a/.", "GET /a/ q=-"},
      {"/%252e%252e/x", "GET /%252e%252e/x q=-"}, /* decoded once: "%25" then "2e" */
      {"/a%3a%c3%a9", "GET /a%3A%C3%A9 q=-"},
      {"/x?y=/../z&%2F", "GET /x q=y=/../z&%2F"},
      {"/x?", "GET /x q= "},
      {"http://api.example/p/../q?z", "GET /q q=z"},
      {"HTTPS://api.example", "GET / q=-"},
      {"http://api.example?k", "GET / q=k"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: t\r\n\r\n", cases[i].target);
    tg_buf_t b = {0};
    exchange(port, req, (size_t)n, &b);
    if (b.data == NULL || strncmp(b.data, "HTTP/1.1 200 ", 13) != 0 || strstr(b.data, cases[i].seen) == NULL) {
      fprintf(stderr, "  case %s: got %.300s\n", cases[i].target, b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    tg_buf_free(&b);
  }
  tg_server_stop(s, 1000);
}

TEST(bad_targets_are_400_and_close) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  const char *targets[] = {
      "/../x", "/a/../..", "/%2e%2e/x", "/a%2fb", "/a%2F..%2Fb", "/a%5cb", "/a%00b", "/a%zz", "/a%4",
      "/a#frag", "/a?b#frag", "/a\\b", "/a\x80", "/x/..;/y", "/x/.;/y", "*",
      "ftp://api.example/x", "http://user@api.example/x", "http://user:pw@api.example/x",
      "http:///x", "http:/x", "api.example:443", "http://api.example:99999/", "http://[fe80::1%25eth0]/",
      "http://a b/", "//api.example/../..",
  };
  for (size_t i = 0; i < sizeof targets / sizeof targets[0]; i++) {
    char req[256];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: t\r\n\r\nGET /after HTTP/1.1\r\nHost: t\r\n\r\n",
                     targets[i]);
    tg_buf_t b = {0};
    exchange(port, req, (size_t)n, &b);
    if (b.data == NULL || strncmp(b.data, "HTTP/1.1 400 ", 13) != 0 ||
        strstr(b.data, "Connection: close") == NULL || strstr(b.data, "/after") != NULL) {
      fprintf(stderr, "  target %s: got %.200s\n", targets[i], b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    tg_buf_free(&b);
  }
  /* "*" is for OPTIONS, which gets it as its path. */
  tg_buf_t b = {0};
  exchange(port, "OPTIONS * HTTP/1.1\r\nHost: t\r\n\r\n", 31, &b);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 200 ", 13) == 0 && strstr(b.data, "OPTIONS * q=-"));
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(host_is_validated_and_normalized) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  struct {
    const char *head; /* request line and headers, without the final CRLF */
    const char *seen; /* "host=..." from the /host handler, or a status line */
  } cases[] = {
      {"GET /host HTTP/1.1\r\nHost: API.Example\r\n", "host=api.example raw=/host"},
      {"GET /host HTTP/1.1\r\nHost:api.example \t \r\n", "host=api.example raw=/host"},
      {"GET /host HTTP/1.1\r\nHost: api.example.:00443\r\n", "host=api.example:443 "},
      {"GET /host HTTP/1.1\r\nHost: api.example:\r\n", "host=api.example "},
      {"GET /host HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n", "host=127.0.0.1:8080 "},
      {"GET /host HTTP/1.1\r\nHost: [::1]:80\r\n", "host=[::1]:80 "},
      {"GET /host HTTP/1.1\r\nHost: [2001:DB8::1]\r\n", "host=[2001:db8::1] "},
      {"GET /host HTTP/1.1\r\nHost:\r\n", "host=- "},
      {"GET /host HTTP/1.0\r\n", "host=- "},
      /* RFC 9112 3.2.2: the absolute-form authority wins over Host. */
      {"GET http://Paid.Example:80/./host HTTP/1.1\r\nHost: free.example\r\n",
       "host=paid.example:80 raw=http://Paid.Example:80/./host"},
      {"GET /host HTTP/1.1\r\nHost: exa mple/../x\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: api.example/x\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: user@api.example\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: api.example:65536\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: api.example:000080\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: api.example:80:80\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: api.example:-1\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: [fe80::1%25eth0]\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: [v1.x]\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: [::1\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: a..b\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: .\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: a%62c\r\n", "HTTP/1.1 400 "},
      {"GET /host HTTP/1.1\r\nHost: a\xc3\xa9\r\n", "HTTP/1.1 400 "},
      /* A bad Host is refused even when an absolute-form authority wins. */
      {"GET http://api.example/host HTTP/1.1\r\nHost: a b\r\n", "HTTP/1.1 400 "},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    char req[512];
    int n = snprintf(req, sizeof req, "%s\r\n", cases[i].head);
    tg_buf_t b = {0};
    exchange(port, req, (size_t)n, &b);
    if (b.data == NULL || strstr(b.data, cases[i].seen) == NULL) {
      fprintf(stderr, "  case %zu: got %.300s\n", i, b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    tg_buf_free(&b);
  }
  tg_server_stop(s, 1000);
}

TEST(answer_headers_are_never_split) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  const char *kinds[] = {"crlf", "nul", "name", "cl", "status"};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    char req[128];
    int n = snprintf(req, sizeof req, "GET /badhdr/%s HTTP/1.1\r\nHost: t\r\n\r\n", kinds[i]);
    int fd = dial(port);
    send_all(fd, req, (size_t)n);
    tg_buf_t b = {0};
    CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
    if (strncmp(b.data, "HTTP/1.1 500 ", 13) != 0 || strstr(b.data, "Injected") ||
        count_str(b.data, "Content-Length") != 1) {
      fprintf(stderr, "  kind %s: got %.300s\n", kinds[i], b.data);
      CHECK(0);
    }
    /* The connection goes on: the 500 was framed as usual. */
    tg_buf_reset(&b);
    send_str(fd, "GET /badhdr/ok HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
    CHECK(strncmp(b.data, "HTTP/1.1 200 ", 13) == 0 && strstr(b.data, "X-Ok: fine\r\n"));
    close(fd);
    tg_buf_free(&b);
  }
  tg_server_stop(s, 1000);
}

TEST(obs_fold_is_400_and_trailers_are_dropped) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  const char *folds[] = {
      "GET /hdr/x-a HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n",
      "GET /hdr/x-a HTTP/1.1\r\nHost: t\r\nX-A: a\r\n\tb\r\n\r\n",
      "GET /hdr/x-a HTTP/1.1\r\nHost: t\r\n X-A: b\r\n\r\n",
  };
  for (size_t i = 0; i < sizeof folds / sizeof folds[0]; i++) {
    tg_buf_t b = {0};
    exchange(port, folds[i], strlen(folds[i]), &b);
    CHECK(b.data && strncmp(b.data, "HTTP/1.1 400 ", 13) == 0 && strstr(b.data, "Connection: close"));
    tg_buf_free(&b);
  }
  /* A fold split over two reads, at the LF. */
  int fd = dial(port);
  send_str(fd, "GET /hdr/x-a HTTP/1.1\r\nHost: t\r\nX-A: a\r\n");
  usleep(50 * 1000);
  send_str(fd, " b\r\n\r\n");
  tg_buf_t b = {0};
  read_until_quiet(fd, &b, 1000);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 400 ", 13) == 0);
  close(fd);
  /* A value split over reads elsewhere is still one value. */
  fd = dial(port);
  send_str(fd, "GET /hdr/x-a HTTP/1.1\r\nHost: t\r\nX-A: a");
  usleep(50 * 1000);
  send_str(fd, " b\r\n\r\n");
  tg_buf_reset(&b);
  CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
  CHECK(strstr(b.data, "\r\n\r\na b") != NULL);
  close(fd);
  /* Trailer fields are never merged into the headers (RFC 9110 6.5.1). */
  const char *trailer = "POST /hdr/x-t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                        "1\r\nx\r\n0\r\nX-T: smuggled\r\n\r\n";
  tg_buf_reset(&b);
  exchange(port, trailer, strlen(trailer), &b);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 404 ", 13) == 0 && !strstr(b.data, "smuggled"));
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(connect_and_upgrade_get_exactly_one_answer) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  const char *smuggled = "GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n";
  struct {
    const char *head;
    const char *status;
  } cases[] = {
      {"CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n", "HTTP/1.1 405 "},
      {"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "HTTP/1.1 200 "},
      {"GET /h2c HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
       "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", "HTTP/1.1 200 "},
      /* Upgrade without "Connection: upgrade": llhttp reads on, we still close. */
      {"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\n\r\n", "HTTP/1.1 200 "},
      {"POST /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
       "Content-Length: 3\r\n\r\nabc", "HTTP/1.1 200 "},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tg_buf_t req = {0}, b = {0};
    CHECK_INT(tg_buf_printf(&req, "%s%s", cases[i].head, smuggled), 0);
    int fd = dial(port);
    send_all(fd, req.data, req.len);
    read_until_quiet(fd, &b, 1000);
    if (b.data == NULL || strncmp(b.data, cases[i].status, 13) != 0 || count_str(b.data, "HTTP/1.1") != 1 ||
        strstr(b.data, "Connection: close") == NULL || strstr(b.data, "smuggled")) {
      fprintf(stderr, "  case %zu: got %.400s\n", i, b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    CHECK(peer_closed(fd, 1000) || b.len > 0);
    close(fd);
    tg_buf_free(&b);
    tg_buf_free(&req);
  }
  tg_server_stop(s, 1000);
}

TEST(transfer_encoding_rules) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  struct {
    const char *req;
    const char *status;
  } cases[] = {
      /* RFC 9112 6.1: HTTP/1.0 with Transfer-Encoding has faulty framing. */
      {"POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 "},
      {"POST /te HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 "},
      {"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", "HTTP/1.1 501 "},
      {"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 "},
      {"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 "},
      {"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
       "HTTP/1.1 400 "},
      {"POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n0\r\n\r\n", "HTTP/1.1 400 "},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tg_buf_t req = {0}, b = {0};
    CHECK_INT(tg_buf_printf(&req, "%sGET /after HTTP/1.1\r\nHost: t\r\n\r\n", cases[i].req), 0);
    exchange(port, req.data, req.len, &b);
    if (b.data == NULL || strncmp(b.data, cases[i].status, 13) != 0 || strstr(b.data, "/after") ||
        strstr(b.data, "Connection: close") == NULL) {
      fprintf(stderr, "  case %zu: got %.300s\n", i, b.data ? b.data : "(nothing)");
      CHECK(0);
    }
    tg_buf_free(&b);
    tg_buf_free(&req);
  }
  /* A lone chunked, any case, is fine. */
  tg_buf_t b = {0};
  const char *ok = "POST /te HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: Chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
  int fd = dial(port);
  send_str(fd, ok);
  CHECK_INT(read_responses(fd, &b, 1, 1000), 1);
  CHECK(strstr(b.data, "n=2 body=hi") != NULL);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

TEST(request_id_is_a_short_token) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  send_str(fd, "GET /rid HTTP/1.1\r\nHost: t\r\nX-Request-Id: trace:01.a_b-c\r\n\r\n"
               "GET /rid HTTP/1.1\r\nHost: t\r\nX-Request-Id: a\"b\r\n\r\n"
               "GET /rid HTTP/1.1\r\nHost: t\r\nX-Request-Id: 0123456789012345678901234567890123456789\r\n\r\n"
               "GET /rid HTTP/1.1\r\nHost: t\r\nX-Request-Id: a b\r\n\r\n");
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 4, 1000), 4);
  CHECK(strstr(b.data, "\r\n\r\ntrace:01.a_b-c") != NULL);
  CHECK(strstr(b.data, "a\"b") == NULL && strstr(b.data, "0123456789012345678901234567890123456789") == NULL &&
        strstr(b.data, "a b") == NULL);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

/* A client that pipelines and never reads must stop being read: what it
 * makes us hold is bounded, and it gets every answer once it reads. */
TEST(pipelining_without_reading_is_bounded) {
  tg_http_limits_t lim = small_limits();
  lim.idle_timeout_ms = 10000;
  lim.header_timeout_ms = 10000;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  enum { N = 50000 };
  static const char one[] = "GET /big HTTP/1.1\r\nHost: t\r\n\r\n";
  tg_buf_t req = {0};
  for (int i = 0; i < N; i++)
    tg_buf_append(&req, one, sizeof one - 1);
  atomic_store(&handled, 0);
  size_t off = 0;
  uint64_t quiet_since = uv_hrtime();
  while (off < req.len && uv_hrtime() - quiet_since < 500000000ull) {
    ssize_t n = send(fd, req.data + off, req.len - off, MSG_DONTWAIT | MSG_NOSIGNAL);
    if (n > 0) {
      off += (size_t)n;
      quiet_since = uv_hrtime();
    } else {
      usleep(5000);
    }
  }
  /* 50 MiB of answers if it read everything; the socket buffers hold a few.
   * Wait until the server stops handling (it would not, reading on). */
  int seen = -1;
  for (int i = 0; i < 50 && seen != atomic_load(&handled); i++) {
    seen = atomic_load(&handled);
    usleep(100 * 1000);
  }
  fprintf(stderr, "  sent %zu of %zu bytes, %d requests handled before reading\n", off, req.len, seen);
  CHECK(seen < N / 2);
  /* Now read: every request gets its answer, in order. */
  size_t answers = 0, got = 0;
  char tmp[65536];
  size_t per = 0; /* bytes of one answer, learnt from the first */
  uint64_t t0 = uv_hrtime();
  tg_buf_t first = {0};
  while (answers < N && uv_hrtime() - t0 < 20000000000ull) {
    if (off < req.len) {
      ssize_t n = send(fd, req.data + off, req.len - off, MSG_DONTWAIT | MSG_NOSIGNAL);
      if (n > 0)
        off += (size_t)n;
    }
    struct pollfd pf = {fd, POLLIN, 0};
    if (poll(&pf, 1, 100) <= 0)
      continue;
    ssize_t n = recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0)
      break;
    if (per == 0) {
      tg_buf_append(&first, tmp, (size_t)n);
      const char *end = strstr(first.data, "\r\n\r\n");
      if (end == NULL)
        continue;
      per = (size_t)(end + 4 - first.data) + 1024;
      got = first.len;
    } else {
      got += (size_t)n;
    }
    answers = got / per;
  }
  CHECK_INT(answers, N);
  CHECK_INT(got, (size_t)N * per);
  close(fd);
  tg_buf_free(&first);
  tg_buf_free(&req);
  tg_server_stop(s, 1000);
}

/* A client that stops reading may not hold its connection forever: once no
 * write makes progress for idle_timeout_ms, the connection goes. */
TEST(client_that_never_reads_is_cut_after_the_idle_timeout) {
  tg_server_t *s = start(small_limits(), 1); /* idle_timeout_ms 300 */
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  static const char one[] = "GET /big HTTP/1.1\r\nHost: t\r\n\r\n";
  tg_buf_t req = {0};
  for (int i = 0; i < 20000; i++)
    tg_buf_append(&req, one, sizeof one - 1);
  uint64_t t0 = uv_hrtime(); /* before the first byte: the server's clock starts later */
  send_all(fd, req.data, req.len);
  /* Accepted first (on a loaded machine the accept can come after the send),
   * then cut. */
  while (tg_server_connections(s) == 0 && uv_hrtime() - t0 < 3000000000ull)
    usleep(1000);
  while (tg_server_connections(s) > 0 && uv_hrtime() - t0 < 3000000000ull)
    usleep(20 * 1000);
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  CHECK_INT(tg_server_connections(s), 0);
  CHECK(ms >= 300); /* idle_timeout_ms after the last write that made progress */
  close(fd);
  tg_buf_free(&req);
  tg_server_stop(s, 1000);
}

static uint64_t ms_since(uint64_t t0) { return (uv_hrtime() - t0) / 1000000; }

/* The parse state lasts only while a message is under way: requests split
 * anywhere across reads, with pauses between them, parse as if they had
 * come in one read. */
TEST(requests_split_across_reads_and_pauses) {
  tg_server_t *s = start(small_limits(), 1);
  CHECK(s != NULL);
  int fd = dial(tg_server_port(s, 0));
  CHECK(fd >= 0);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  static const char *parts[] = {
      "GET /one HTTP/1.1\r\nHost: t\r\n\r\n",
      "\r\n", /* a stray CRLF between messages (RFC 9112 2.2) */
      "G",    /* the next method's first byte */
      "ET /two HTTP/1.1\r\nHo",
      "st: t\r\nContent-Length: 4\r\n\r\nab",
      "cdGET /three HTTP/1.1\r\nHost: t\r\n\r\nGET /fo",
      "ur HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r",
      "\n0\r\n\r\n",
  };
  for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
    send_str(fd, parts[i]);
    usleep(30 * 1000); /* each part in a read of its own */
  }
  tg_buf_t b = {0};
  CHECK_INT(read_responses(fd, &b, 4, 2000), 4);
  const char *a1 = strstr(b.data, "GET /one q=- n=0 body=");
  const char *a2 = strstr(b.data, "GET /two q=- n=4 body=abcd");
  const char *a3 = strstr(b.data, "GET /three q=- n=0 body=");
  const char *a4 = strstr(b.data, "GET /four q=- n=2 body=xy");
  CHECK(a1 && a2 && a3 && a4);
  CHECK(a1 < a2 && a2 < a3 && a3 < a4);
  CHECK(strstr(b.data, "Connection: close") == NULL);
  close(fd);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

/* A request that starts on a keep-alive connection after a pause gets head
 * and body deadlines counted from its own start, not what was left of the
 * idle one. */
TEST(a_request_after_a_pause_gets_its_own_deadlines) {
  tg_http_limits_t lim = small_limits(); /* head and body 300 ms */
  lim.idle_timeout_ms = 400;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  static const char *stalls[] = {"GET /x HTTP/1.1\r\nHo",
                                 "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\nabc"};
  for (int i = 0; i < 2; i++) {
    int fd = dial(tg_server_port(s, 0));
    CHECK(fd >= 0);
    send_str(fd, "GET /first HTTP/1.1\r\nHost: t\r\n\r\n");
    tg_buf_t b = {0};
    CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
    tg_buf_reset(&b);
    usleep(250 * 1000); /* the idle deadline is 150 ms away */
    uint64_t t0 = uv_hrtime();
    send_str(fd, stalls[i]);
    read_until_quiet(fd, &b, 2000);
    uint64_t ms = ms_since(t0);
    CHECK(b.data && strncmp(b.data, "HTTP/1.1 408 ", 13) == 0);
    CHECK(ms >= 280);
    close(fd);
    tg_buf_free(&b);
  }
  tg_server_stop(s, 1000);
}

/* Deadlines are kept per connection: with head, body and idle timeouts all
 * different and connections started at different times, each one ends on
 * its own deadline, never earlier, and not much later. */
TEST(each_connection_ends_on_its_own_deadline) {
  tg_http_limits_t lim = small_limits();
  lim.header_timeout_ms = 200;
  lim.body_timeout_ms = 500;
  lim.idle_timeout_ms = 1500;
  static const uint64_t timeout[3] = {1500, 200, 500};
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  enum { N = 24 };
  int fd[N], kind[N];
  uint64_t sent[N], ended[N];
  tg_buf_t out[N];
  memset(out, 0, sizeof out);
  /* Interleaved kinds, 10 ms apart: 0 idle after an answer, 1 part of a
   * head, 2 a head and part of its body. */
  for (int i = 0; i < N; i++) {
    kind[i] = i % 3;
    ended[i] = 0;
    fd[i] = dial(port);
    CHECK(fd[i] >= 0);
    sent[i] = uv_hrtime(); /* the server's clock for it starts later */
    if (kind[i] == 0) {
      send_str(fd[i], "GET /k HTTP/1.1\r\nHost: t\r\n\r\n");
      CHECK_INT(read_responses(fd[i], &out[i], 1, 2000), 1);
      tg_buf_reset(&out[i]);
    } else if (kind[i] == 1) {
      send_str(fd[i], "GET /k HTTP/1.1\r\nHo");
    } else {
      send_str(fd[i], "POST /k HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc");
    }
    /* After the first, the worker's timer waits for its idle deadline: the
     * next, earlier deadlines must bring it forward. */
    usleep(i == 0 ? 300 * 1000 : 10 * 1000);
  }
  uint64_t t0 = uv_hrtime();
  int left = N;
  while (left > 0 && ms_since(t0) < 5000) {
    struct pollfd p[N];
    int idx[N], np = 0;
    for (int i = 0; i < N; i++) {
      if (ended[i] == 0) {
        p[np] = (struct pollfd){fd[i], POLLIN, 0};
        idx[np++] = i;
      }
    }
    if (poll(p, (nfds_t)np, 100) <= 0)
      continue;
    for (int k = 0; k < np; k++) {
      if (p[k].revents == 0)
        continue;
      char tmp[1024];
      ssize_t n = recv(fd[idx[k]], tmp, sizeof tmp, 0);
      if (n > 0) {
        tg_buf_append(&out[idx[k]], tmp, (size_t)n);
      } else {
        ended[idx[k]] = uv_hrtime();
        left--;
      }
    }
  }
  CHECK_INT(left, 0);
  for (int i = 0; i < N; i++) {
    uint64_t ms = (ended[i] - sent[i]) / 1000000;
    if (ms + 20 < timeout[kind[i]] || ms > timeout[kind[i]] + 400)
      fprintf(stderr, "  connection %d (kind %d) ended after %" PRIu64 " ms\n", i, kind[i], ms);
    CHECK(ms + 20 >= timeout[kind[i]]); /* uv_now() is cached per loop turn: a few ms of slack */
    CHECK(ms <= timeout[kind[i]] + 400);
    if (kind[i] == 0)
      CHECK_INT(out[i].len, 0); /* an idle connection just goes */
    else
      CHECK(out[i].data && strncmp(out[i].data, "HTTP/1.1 408 ", 13) == 0);
    close(fd[i]);
    tg_buf_free(&out[i]);
  }
  tg_server_stop(s, 1000);
}

static int sanitized(void) {
  const char *v = getenv("TG_SANITIZED");
  return v && strcmp(v, "1") == 0;
}

/* An idle keep-alive connection holds no parse state, no buffer and no timer
 * of its own: what it costs on the heap (this process's, which the server
 * shares) stays under 1 KiB. */
TEST(idle_keepalive_connections_cost_under_1_kib) {
  enum { N = 400 };
  tg_http_limits_t lim = small_limits();
  lim.header_timeout_ms = lim.idle_timeout_ms = 60000;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  static int fds[N];
  tg_buf_t b = {0};
  CHECK_INT(tg_buf_reserve(&b, 16384), 0);
  /* Warm up: the worker's spare parse state and buffers, the first blocks
   * of its deadline heap and of libuv's descriptor table. */
  for (int i = 0; i < 2; i++) {
    int fd = dial(port);
    CHECK(fd >= 0);
    send_str(fd, "GET /warm HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_INT(read_responses(fd, &b, 1, 2000), 1);
    tg_buf_reset(&b);
    close(fd);
  }
  while (tg_server_connections(s) > 0)
    usleep(1000);
  usleep(50 * 1000);
  size_t before = mallinfo2().uordblks;
  for (int i = 0; i < N; i++) {
    fds[i] = dial(port);
    CHECK(fds[i] >= 0);
    send_str(fds[i], "POST /idle HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    CHECK_INT(read_responses(fds[i], &b, 1, 2000), 1);
    tg_buf_reset(&b);
  }
  usleep(100 * 1000); /* the server gives back its buffers after writing the answer */
  size_t after = mallinfo2().uordblks;
  CHECK_INT(tg_server_connections(s), N);
  long per = ((long)after - (long)before) / N;
  printf("  %d idle keep-alive connections: %ld B of heap each\n", N, per);
  /* ASan's allocator is not glibc's: mallinfo2 does not see it. */
  if (!sanitized())
    CHECK(per < 1024);
  /* Idle, not dead: each still answers. */
  for (int i = 0; i < N; i += 40) {
    send_str(fds[i], "GET /again HTTP/1.1\r\nHost: t\r\n\r\n");
    CHECK_INT(read_responses(fds[i], &b, 1, 2000), 1);
    CHECK(strstr(b.data, "GET /again") != NULL);
    tg_buf_reset(&b);
  }
  for (int i = 0; i < N; i++)
    close(fds[i]);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}

/* ---- TLS: a blocking client over net/tls.h ---- */

static tls_fixture_t fx;
static int fx_state; /* 0 not made, 1 ready, -1 failed */

static void remove_fixture(void) { tls_fixture_remove(&fx); }

static const tls_fixture_t *fixture(void) {
  if (fx_state == 0) {
    fx_state = tls_fixture_make(&fx) == 0 ? 1 : -1;
    if (fx_state == 1)
      atexit(remove_fixture);
  }
  return fx_state == 1 ? &fx : NULL;
}

typedef struct tls_client {
  int fd;
  tg_tls_t *tls;
  tg_buf_t plain; /* what the server sent, decrypted */
} tls_client_t;

static void tls_flush(tls_client_t *c) {
  if (!tg_tls_has_output(c->tls))
    return;
  tg_buf_t wire = {0};
  if (tg_tls_take_output(c->tls, &wire) == 0)
    send_all(c->fd, wire.data, wire.len);
  tg_buf_free(&wire);
}

/* Waits up to timeout_ms for bytes: 1 read some, 0 nothing came, -1 the
 * server closed or the session failed. */
static int tls_recv(tls_client_t *c, int timeout_ms) {
  struct pollfd p = {c->fd, POLLIN, 0};
  if (poll(&p, 1, timeout_ms) <= 0)
    return 0;
  char tmp[16384];
  ssize_t n = recv(c->fd, tmp, sizeof tmp, 0);
  if (n <= 0 || tg_tls_feed(c->tls, tmp, (size_t)n) != 0)
    return -1;
  for (;;) {
    int k = tg_tls_read(c->tls, tmp, sizeof tmp);
    if (k == 0)
      break;
    if (k < 0)
      return -1;
    tg_buf_append(&c->plain, tmp, (size_t)k);
  }
  tls_flush(c);
  return 1;
}

static int tls_dial(tls_client_t *c, tg_tls_ctx_t *ctx, int port) {
  memset(c, 0, sizeof *c);
  c->fd = dial(port);
  c->tls = c->fd >= 0 ? tg_tls_new(ctx, "localhost") : NULL;
  if (c->tls == NULL)
    return -1;
  char none[1];
  tg_tls_read(c->tls, none, sizeof none); /* ClientHello */
  tls_flush(c);
  uint64_t t0 = uv_hrtime();
  while (!tg_tls_handshake_done(c->tls) && ms_since(t0) < 3000)
    if (tls_recv(c, 100) < 0)
      return -1;
  return tg_tls_handshake_done(c->tls) ? 0 : -1;
}

static void tls_send(tls_client_t *c, const char *s) {
  tg_tls_write(c->tls, s, strlen(s));
  tls_flush(c);
}

static int tls_read_responses(tls_client_t *c, int count, int timeout_ms) {
  uint64_t t0 = uv_hrtime();
  while (count_responses(&c->plain) < count && ms_since(t0) < (uint64_t)timeout_ms)
    if (tls_recv(c, 50) < 0)
      break;
  return count_responses(&c->plain);
}

static void tls_client_close(tls_client_t *c) {
  tg_tls_free(c->tls);
  if (c->fd >= 0)
    close(c->fd);
  tg_buf_free(&c->plain);
}

/* Over TLS the server keeps the session between requests and nothing else:
 * keep-alive across a pause, pipelined requests split across records, and
 * the idle timeout all behave as in plain HTTP. */
TEST(tls_keepalive_pipelining_and_idle_close) {
  const tls_fixture_t *f = fixture();
  CHECK(f != NULL);
  tg_listener_config_t l = {"127.0.0.1", 0, f->cert, f->key, 0, handler, NULL};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = 1;
  cfg.limits = small_limits(); /* idle_timeout_ms 300 */
  tg_server_t *s = NULL;
  char err[256];
  CHECK_INT(tg_server_start(&s, &cfg, err, sizeof err), 0);
  tg_tls_ctx_t *ctx = tg_tls_client_ctx_new(f->ca, err, sizeof err);
  CHECK(ctx != NULL);
  tls_client_t c;
  CHECK_INT(tls_dial(&c, ctx, tg_server_port(s, 0)), 0);
  tls_send(&c, "GET /one HTTP/1.1\r\nHost: t\r\n\r\n");
  CHECK_INT(tls_read_responses(&c, 1, 2000), 1);
  usleep(150 * 1000);
  tls_send(&c, "GET /two HTTP/1.1\r\nHost: t\r\n\r\nPOST /three HTTP/1.1\r\nHost: t\r\nContent-Len");
  usleep(30 * 1000);
  tls_send(&c, "gth: 3\r\n\r\nabc");
  CHECK_INT(tls_read_responses(&c, 3, 2000), 3);
  const char *a1 = strstr(c.plain.data, "GET /one q=- n=0");
  const char *a2 = strstr(c.plain.data, "GET /two q=- n=0");
  const char *a3 = strstr(c.plain.data, "POST /three q=- n=3 body=abc");
  CHECK(a1 && a2 && a3);
  CHECK(a1 < a2 && a2 < a3);
  /* Then idle: closed after idle_timeout_ms. */
  uint64_t t0 = uv_hrtime();
  int rc = 0;
  while (rc >= 0 && ms_since(t0) < 3000)
    rc = tls_recv(&c, 100);
  CHECK_INT(rc, -1);
  CHECK(ms_since(t0) >= 250);
  tls_client_close(&c);
  tg_tls_ctx_free(ctx);
  tg_server_stop(s, 1000);
}

/* The earliest deadline moving later (a head completes and its body's longer
 * deadline starts) must not hide the next one: a connection behind it still
 * times out on time. */
TEST(a_deadline_moved_later_does_not_hide_an_earlier_one) {
  tg_http_limits_t lim = small_limits();
  lim.header_timeout_ms = 200;
  lim.body_timeout_ms = 1500;
  tg_server_t *s = start(lim, 1);
  CHECK(s != NULL);
  int port = tg_server_port(s, 0);
  int x = dial(port);
  CHECK(x >= 0);
  send_str(x, "POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n");
  usleep(20 * 1000);
  int y = dial(port);
  CHECK(y >= 0);
  uint64_t ty = uv_hrtime();
  send_str(y, "GET /y HTTP/1.1\r\nHo");
  usleep(20 * 1000);
  uint64_t tx = uv_hrtime();
  send_str(x, "\r\nabc"); /* x's head is complete: its deadline moves 1.3 s later */
  tg_buf_t b = {0};
  read_until_quiet(y, &b, 3000);
  uint64_t ms = ms_since(ty);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 408 ", 13) == 0);
  CHECK(ms + 20 >= 200);
  CHECK(ms <= 600);
  tg_buf_reset(&b);
  read_until_quiet(x, &b, 3000);
  ms = ms_since(tx);
  CHECK(b.data && strncmp(b.data, "HTTP/1.1 408 ", 13) == 0);
  CHECK(ms + 20 >= 1500);
  close(x);
  close(y);
  tg_buf_free(&b);
  tg_server_stop(s, 1000);
}
