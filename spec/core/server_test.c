/* The HTTP server against raw sockets: framing, keep-alive, pipelining,
 * chunked bodies, 100-continue, limits and timeouts, graceful stop. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/buf.h"
#include "net/server.h"
#include "test.h"

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

/* /delay/<ms>: answers after ms; /echo: method, path, query, body length and
 * body; /hdr/<name>: the value of a request header. */
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
  if (strncmp(req->path, "/hdr/", 5) == 0) {
    const tg_http_header_t *h = tg_http_req_header(req, req->path + 5);
    tg_http_respond_simple(req, h ? 200 : 404, "text/plain", h ? h->value : "", h ? h->value_len : 0);
    return;
  }
  tg_buf_t b = {0};
  tg_buf_printf(&b, "%s %s q=%s n=%zu body=", req->method_name, req->path,
                req->query ? req->query : "-", req->body_len);
  tg_buf_append(&b, req->body, req->body_len);
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

/* Reads exactly `count` complete responses (Content-Length framed). */
static int read_responses(int fd, tg_buf_t *out, int count, int timeout_ms) {
  char tmp[8192];
  for (;;) {
    int complete = 0;
    const char *p = out->data;
    const char *end = out->data ? out->data + out->len : NULL;
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
    tg_buf_printf(&req, "GET /r%d HTTP/1.1\r\nHost: t\r\n\r\n", i);
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
    tg_buf_printf(&req, "X-H%d: v\r\n", i);
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
