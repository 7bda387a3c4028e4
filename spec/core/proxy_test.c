/* The reverse proxy (net/proxy.h) behind the real server, in front of a
 * real upstream: an HTTP/1.1 origin on blocking sockets, one thread per
 * connection, that records what it received. Also the server's streamed
 * answers (net/server.h): framing, order behind pipelined answers, bounded
 * memory under a slow client, cuts. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/socket.h>
#include <unistd.h>

#include "base/buf.h"
#include "net/proxy.h"
#include "net/server.h"
#include "test.h"

/* ---- the upstream ---- */

static int up_port, down_port;
static _Atomic int up_accepts;      /* connections the upstream accepted */
static _Atomic int up_send_failed;  /* responses the proxy stopped taking (its connection closed) */
static pthread_mutex_t up_mu = PTHREAD_MUTEX_INITIALIZER;
static char up_last[16384];         /* head of the last request received */
static _Atomic int up_requests;

static char pat(uint64_t off) { return (char)('a' + off % 26); }

static int up_send(int fd, const void *data, size_t n) {
  const char *p = data;
  while (n) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w <= 0) {
      atomic_fetch_add(&up_send_failed, 1);
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int up_puts(int fd, const char *s) { return up_send(fd, s, strlen(s)); }

/* Body bytes [off, off + n) of the pattern, in 64 KiB writes. */
static int up_pattern(int fd, uint64_t off, uint64_t n) {
  char buf[16384];
  while (n) {
    size_t k = n < sizeof buf ? (size_t)n : sizeof buf;
    for (size_t i = 0; i < k; i++)
      buf[i] = pat(off + i);
    if (up_send(fd, buf, k) != 0)
      return -1;
    off += k;
    n -= k;
  }
  return 0;
}

/* Answers one request; -1 closes the connection. */
static int up_answer(int fd, const char *method, const char *path, const char *body, size_t body_len) {
  int head = strcmp(method, "HEAD") == 0;
  char hdr[512];
  if (strncmp(path, "/cl/", 4) == 0) {
    unsigned long n = strtoul(path + 4, NULL, 10);
    snprintf(hdr, sizeof hdr,
             "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %lu\r\n\r\n", n);
    if (up_puts(fd, hdr) != 0)
      return -1;
    return head ? 0 : up_pattern(fd, 0, n);
  }
  if (strncmp(path, "/big/", 5) == 0) {
    uint64_t n = (uint64_t)strtoul(path + 5, NULL, 10) << 20;
    snprintf(hdr, sizeof hdr, "HTTP/1.1 200 OK\r\nContent-Length: %llu\r\n\r\n", (unsigned long long)n);
    if (up_puts(fd, hdr) != 0)
      return -1;
    return up_pattern(fd, 0, n);
  }
  if (strncmp(path, "/bigchunked/", 12) == 0) {
    uint64_t n = (uint64_t)strtoul(path + 12, NULL, 10) << 20;
    if (up_puts(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") != 0)
      return -1;
    for (uint64_t off = 0; off < n; off += 50000) {
      uint64_t k = n - off < 50000 ? n - off : 50000;
      snprintf(hdr, sizeof hdr, "%llx\r\n", (unsigned long long)k);
      if (up_puts(fd, hdr) != 0 || up_pattern(fd, off, k) != 0 || up_puts(fd, "\r\n") != 0)
        return -1;
    }
    return up_puts(fd, "0\r\n\r\n");
  }
  if (strcmp(path, "/chunked") == 0) {
    static const char *const parts[] = {"5\r\nhello\r\n", "1\r\n \r\n", "5\r\nworld\r\n", "0\r\n\r\n"};
    if (up_puts(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n") != 0)
      return -1;
    for (size_t i = 0; i < 4; i++) {
      usleep(10000);
      if (up_puts(fd, parts[i]) != 0)
        return -1;
    }
    return 0;
  }
  if (strcmp(path, "/slow") == 0) {
    usleep(2000000);
    return up_puts(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
  }
  if (strncmp(path, "/delay/", 7) == 0) {
    usleep((useconds_t)atoi(path + 7) * 1000);
    return up_puts(fd, "HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndelayed");
  }
  if (strcmp(path, "/cut") == 0) {
    up_puts(fd, "HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
    up_pattern(fd, 0, 50000);
    return -1;
  }
  if (strcmp(path, "/cutchunked") == 0) {
    up_puts(fd, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n");
    up_pattern(fd, 0, 1000);
    up_puts(fd, "\r\n");
    return -1;
  }
  if (strcmp(path, "/hop") == 0) {
    return up_puts(fd, "HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                       "PAYMENT-RESPONSE: forged\r\nX-PAYMENT-RESPONSE: forged\r\nServer: upstream\r\n"
                       "Date: Mon, 01 Jan 2001 00:00:00 GMT\r\nProxy-Authenticate: Basic\r\n"
                       "Via: 1.0 cdn\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok");
  }
  if (strcmp(path, "/echo") == 0) {
    snprintf(hdr, sizeof hdr, "HTTP/1.1 201 Created\r\nContent-Length: %zu\r\n\r\n", body_len);
    if (up_puts(fd, hdr) != 0 || up_send(fd, body, body_len) != 0)
      return -1;
    return 0;
  }
  if (strcmp(path, "/closehdr") == 0) /* asks to close, and then does not */
    return up_puts(fd, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok");
  if (strcmp(path, "/eof") == 0) { /* a body delimited by the end of the connection */
    up_puts(fd, "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end");
    return -1;
  }
  if (strcmp(path, "/interim") == 0)
    return up_puts(fd, "HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                       "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
  if (strcmp(path, "/bad") == 0) {
    up_puts(fd, "garbage\r\n\r\n");
    return -1;
  }
  if (strcmp(path, "/notfound") == 0)
    return up_puts(fd, "HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope");
  return up_puts(fd, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n");
}

static void *up_conn(void *arg) {
  int fd = (int)(intptr_t)arg;
  static const size_t cap = 1 << 20;
  char *buf = malloc(cap);
  size_t have = 0;
  int poisoned = 0; /* the next request meets a close: an origin that dropped a kept-alive connection */
  for (;;) {
    char *hend;
    while ((hend = memmem(buf, have, "\r\n\r\n", 4)) == NULL) {
      ssize_t n = have < cap ? recv(fd, buf + have, cap - have, 0) : -1;
      if (n <= 0)
        goto out;
      have += (size_t)n;
    }
    size_t hlen = (size_t)(hend + 4 - buf);
    char method[16] = "", target[1024] = "";
    sscanf(buf, "%15s %1023s", method, target);
    size_t cl = 0;
    const char *c = strcasestr(buf, "\r\ncontent-length:");
    if (c && c < hend)
      cl = strtoul(c + 17, NULL, 10);
    if (hlen + cl > cap)
      goto out;
    while (have < hlen + cl) {
      ssize_t n = recv(fd, buf + have, cap - have, 0);
      if (n <= 0)
        goto out;
      have += (size_t)n;
    }
    pthread_mutex_lock(&up_mu);
    size_t k = hlen < sizeof up_last - 1 ? hlen : sizeof up_last - 1;
    memcpy(up_last, buf, k);
    up_last[k] = '\0';
    pthread_mutex_unlock(&up_mu);
    atomic_fetch_add(&up_requests, 1);
    const char *path = strncmp(target, "/base", 5) == 0 ? target + 5 : target;
    if (strncmp(path, "/byname", 7) == 0)
      path += 7;
    char body[4096];
    size_t blen = cl < sizeof body ? cl : sizeof body;
    memcpy(body, buf + hlen, blen);
    memmove(buf, buf + hlen + cl, have - hlen - cl);
    have -= hlen + cl;
    char pathcopy[1024];
    snprintf(pathcopy, sizeof pathcopy, "%s", path);
    char *q = strchr(pathcopy, '?');
    if (q)
      *q = '\0';
    if (poisoned)
      break;
    if (strcmp(pathcopy, "/poison") == 0) {
      poisoned = 1;
      if (up_puts(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") != 0)
        break;
      continue;
    }
    if (up_answer(fd, method, pathcopy, body, blen) != 0)
      break;
  }
out:
  close(fd);
  free(buf);
  return NULL;
}

static void *up_accept(void *arg) {
  int lfd = (int)(intptr_t)arg;
  for (;;) {
    int fd = accept(lfd, NULL, NULL);
    if (fd < 0)
      continue;
    atomic_fetch_add(&up_accepts, 1);
    pthread_t t;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    if (pthread_create(&t, &attr, up_conn, (void *)(intptr_t)fd) != 0)
      close(fd);
    pthread_attr_destroy(&attr);
  }
  return NULL;
}

static int listen_any(int *port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 || listen(fd, 128) != 0) {
    close(fd);
    return -1;
  }
  socklen_t sl = sizeof a;
  getsockname(fd, (struct sockaddr *)&a, &sl);
  *port = ntohs(a.sin_port);
  return fd;
}

/* ---- the gateway: tg_server with a proxy per worker ---- */

static tg_proxy_t *proxies[4];
static char origin_up[128], origin_down[128], origin_name[128];
static _Atomic int done_count, done_err, done_status;
static _Atomic int forwarded; /* requests handed to the proxy */
static tg_server_t *srv;
static int srv_port;

static void on_done(void *ud, int err, int status) {
  (void)ud;
  atomic_store(&done_err, err);
  atomic_store(&done_status, status);
  atomic_fetch_add(&done_count, 1);
}

static void handler(tg_http_req_t *req, void *ud) {
  (void)ud;
  tg_proxy_t *px = proxies[req->worker->id];
  if (strcmp(req->path, "/stats") == 0) { /* read on the worker's thread, which owns the proxy */
    char body[96];
    int n = snprintf(body, sizeof body, "opened=%llu idle=%zu",
                     (unsigned long long)tg_proxy_connections_opened(px), tg_proxy_idle_connections(px));
    tg_http_respond_simple(req, 200, "text/plain", body, (size_t)n);
    return;
  }
  atomic_fetch_add(&forwarded, 1);
  const char *origin = strncmp(req->path, "/down", 5) == 0     ? origin_down
                       : strncmp(req->path, "/byname", 7) == 0 ? origin_name
                                                               : origin_up;
  tg_http_header_t extra = {"PAYMENT-RESPONSE", 16, "ours", 4};
  int rc = tg_proxy_forward(px, req, origin, &extra, 1, on_done, NULL);
  if (rc != 0)
    tg_http_respond_simple(req, 500, "text/plain", "forward failed", 14);
}

static int worker_start(tg_worker_t *w, void *ud) {
  (void)ud;
  tg_proxy_opts_t o = {.connect_timeout_ms = 1000, .first_byte_timeout_ms = 700, .idle_timeout_ms = 2000};
  proxies[w->id] = tg_proxy_new(w->loop, &o);
  return proxies[w->id] ? 0 : -1;
}

static void worker_stop(tg_worker_t *w, void *ud) {
  (void)ud;
  tg_proxy_free(proxies[w->id]);
  proxies[w->id] = NULL;
}

static int setup(void) {
  static int state;
  if (state)
    return state;
  state = -1;
  int lfd = listen_any(&up_port);
  if (lfd < 0)
    return -1;
  pthread_t t;
  if (pthread_create(&t, NULL, up_accept, (void *)(intptr_t)lfd) != 0)
    return -1;
  pthread_detach(t);
  int dfd = listen_any(&down_port); /* a port nobody listens on */
  if (dfd < 0)
    return -1;
  close(dfd);
  snprintf(origin_up, sizeof origin_up, "http://127.0.0.1:%d/base/", up_port);
  snprintf(origin_down, sizeof origin_down, "http://127.0.0.1:%d", down_port);
  snprintf(origin_name, sizeof origin_name, "http://localhost:%d", up_port);
  tg_listener_config_t l = {"127.0.0.1", 0, NULL, NULL, 0, handler, NULL};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = 1;
  cfg.limits.idle_timeout_ms = 5000;
  cfg.on_worker_start = worker_start;
  cfg.on_worker_stop = worker_stop;
  char err[256];
  if (tg_server_start(&srv, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "  start: %s\n", err);
    return -1;
  }
  srv_port = tg_server_port(srv, 0);
  state = 1;
  return state;
}

/* ---- a blocking client that reads responses by their framing ---- */

static int dial_opt(int port, int rcvbuf) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (rcvbuf)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int dial(void) { return dial_opt(srv_port, 0); }

static void send_str(int fd, const char *s) {
  size_t n = strlen(s);
  while (n) {
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
    if (w <= 0)
      return;
    s += w;
    n -= (size_t)w;
  }
}

typedef struct rd {
  int fd;
  char buf[65536];
  size_t s, e;
} rd_t;

/* More bytes into r; 0 at EOF or error, -1 after ms without any. */
static int rd_fill(rd_t *r, int ms) {
  if (r->s == r->e)
    r->s = r->e = 0;
  if (r->e == sizeof r->buf) {
    memmove(r->buf, r->buf + r->s, r->e - r->s);
    r->e -= r->s;
    r->s = 0;
  }
  struct pollfd p = {r->fd, POLLIN, 0};
  if (poll(&p, 1, ms) <= 0)
    return -1;
  ssize_t n = recv(r->fd, r->buf + r->e, sizeof r->buf - r->e, 0);
  if (n <= 0)
    return 0;
  r->e += (size_t)n;
  return (int)n;
}

/* A line (CRLF stripped) into out; -1 on EOF or timeout. */
static int rd_line(rd_t *r, char *out, size_t cap) {
  for (;;) {
    char *nl = memchr(r->buf + r->s, '\n', r->e - r->s);
    if (nl) {
      size_t n = (size_t)(nl - (r->buf + r->s));
      size_t k = n && nl[-1] == '\r' ? n - 1 : n;
      if (k >= cap)
        k = cap - 1;
      memcpy(out, r->buf + r->s, k);
      out[k] = '\0';
      r->s += n + 1;
      return 0;
    }
    if (rd_fill(r, 5000) <= 0)
      return -1;
  }
}

typedef struct resp {
  int status;
  char head[8192]; /* header lines, each "name: value\r\n" */
  int chunked, close_delim;
  int64_t cl;
  tg_buf_t body;   /* when kept */
  uint64_t nbody;
  int pattern_ok;  /* the body is the upstream's pattern */
  int complete;    /* the body ended by its framing (or EOF when close-delimited) */
} resp_t;

static const char *resp_hdr(const resp_t *rs, const char *name, char *out, size_t cap) {
  char want[128];
  snprintf(want, sizeof want, "\n%s:", name);
  char tmp[8300];
  snprintf(tmp, sizeof tmp, "\n%s", rs->head);
  const char *h = strcasestr(tmp, want);
  if (h == NULL)
    return NULL;
  h += strlen(want);
  while (*h == ' ')
    h++;
  size_t n = strcspn(h, "\r\n");
  if (n >= cap)
    n = cap - 1;
  memcpy(out, h, n);
  out[n] = '\0';
  return out;
}

static void body_take(resp_t *rs, const char *p, size_t n, int keep) {
  for (size_t i = 0; i < n; i++)
    if (p[i] != pat(rs->nbody + i)) {
      rs->pattern_ok = 0;
      break;
    }
  if (keep)
    tg_buf_append(&rs->body, p, n);
  rs->nbody += n;
}

/* Body bytes [0, n) into rs; 0, or -1 on EOF first. */
static int rd_exact(rd_t *r, resp_t *rs, uint64_t n, int keep) {
  while (n) {
    if (r->s == r->e && rd_fill(r, 5000) <= 0)
      return -1;
    size_t k = r->e - r->s;
    if (k > n)
      k = (size_t)n;
    body_take(rs, r->buf + r->s, k, keep);
    r->s += k;
    n -= k;
  }
  return 0;
}

/* Reads one response. no_body: the answer to a HEAD. Returns 0 when a head
 * was read (rs->complete says whether its body ended cleanly), -1 if none. */
static int read_resp(rd_t *r, resp_t *rs, int no_body, int keep) {
  memset(rs, 0, sizeof *rs);
  rs->cl = -1;
  rs->pattern_ok = 1;
  char line[8192];
  if (rd_line(r, line, sizeof line) != 0 || sscanf(line, "HTTP/1.%*d %d", &rs->status) != 1)
    return -1;
  size_t hl = 0;
  for (;;) {
    if (rd_line(r, line, sizeof line) != 0)
      return -1;
    if (line[0] == '\0')
      break;
    hl += (size_t)snprintf(rs->head + hl, sizeof rs->head - hl, "%s\r\n", line);
    if (hl >= sizeof rs->head)
      hl = sizeof rs->head - 1;
  }
  char v[256];
  if (resp_hdr(rs, "Content-Length", v, sizeof v))
    rs->cl = strtoll(v, NULL, 10);
  rs->chunked = resp_hdr(rs, "Transfer-Encoding", v, sizeof v) && strcasecmp(v, "chunked") == 0;
  if (no_body || rs->status == 204 || rs->status == 304) {
    rs->complete = 1;
    return 0;
  }
  if (rs->chunked) {
    for (;;) {
      if (rd_line(r, line, sizeof line) != 0)
        return 0;
      unsigned long long n = strtoull(line, NULL, 16);
      if (n == 0)
        break;
      if (rd_exact(r, rs, n, keep) != 0 || rd_line(r, line, sizeof line) != 0 || line[0] != '\0')
        return 0;
    }
    if (rd_line(r, line, sizeof line) != 0 || line[0] != '\0')
      return 0;
    rs->complete = 1;
    return 0;
  }
  if (rs->cl >= 0) {
    rs->complete = rd_exact(r, rs, (uint64_t)rs->cl, keep) == 0;
    return 0;
  }
  rs->close_delim = 1;
  for (;;) {
    if (r->s < r->e) {
      body_take(rs, r->buf + r->s, r->e - r->s, keep);
      r->s = r->e;
    }
    int n = rd_fill(r, 5000);
    if (n == 0)
      break;
    if (n < 0)
      return 0;
  }
  rs->complete = 1;
  return 0;
}

/* One request on a fresh connection; the connection is closed after. */
static int fetch(const char *request, resp_t *rs, int no_body) {
  rd_t *r = calloc(1, sizeof *r);
  r->fd = dial();
  if (r->fd < 0) {
    free(r);
    return -1;
  }
  send_str(r->fd, request);
  int rc = read_resp(r, rs, no_body, 1);
  close(r->fd);
  free(r);
  return rc;
}

static void last_upstream_request(char *out, size_t cap) {
  pthread_mutex_lock(&up_mu);
  snprintf(out, cap, "%s", up_last);
  pthread_mutex_unlock(&up_mu);
}

/* Waits up to ms for *v to reach want. */
static int wait_for(_Atomic int *v, int want, int ms) {
  for (int i = 0; i < ms / 10; i++) {
    if (atomic_load(v) >= want)
      return 0;
    usleep(10000);
  }
  return atomic_load(v) >= want ? 0 : -1;
}

/* Every forwarded request has called back: the done values are the next one's. */
static int settle(void) {
  for (int i = 0; i < 300; i++) {
    if (atomic_load(&done_count) == atomic_load(&forwarded))
      return atomic_load(&done_count);
    usleep(10000);
  }
  return -1;
}

static long rss_kib(void) {
  FILE *f = fopen("/proc/self/statm", "r");
  long pages = 0, resident = 0;
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
      resident = 0;
    fclose(f);
  }
  return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* ---- tests ---- */

TEST(content_length_body_and_forwarded_request) {
  CHECK(setup() == 1);
  resp_t rs;
  int before = settle();
  CHECK(before >= 0);
  CHECK(fetch("GET /cl/100000?x=1&y=%41 HTTP/1.1\r\nHost: shop.example\r\nUser-Agent: t\r\n\r\n", &rs,
              0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK(rs.complete);
  CHECK_INT(rs.cl, 100000);
  CHECK_INT(rs.nbody, 100000);
  CHECK(rs.pattern_ok);
  tg_buf_free(&rs.body);
  char v[256];
  CHECK_STR(resp_hdr(&rs, "Content-Type", v, sizeof v), "application/octet-stream");
  CHECK_STR(resp_hdr(&rs, "PAYMENT-RESPONSE", v, sizeof v), "ours");
  CHECK_STR(resp_hdr(&rs, "Server", v, sizeof v), "tollgate");
  CHECK(resp_hdr(&rs, "Date", v, sizeof v) != NULL);
  CHECK_STR(resp_hdr(&rs, "Via", v, sizeof v), "1.1 tollgate");
  char up[16384], want[128];
  last_upstream_request(up, sizeof up);
  CHECK(strncmp(up, "GET /base/cl/100000?x=1&y=%41 HTTP/1.1\r\n", 40) == 0);
  snprintf(want, sizeof want, "\r\nHost: 127.0.0.1:%d\r\n", up_port);
  CHECK(strstr(up, want) != NULL);
  CHECK(strstr(up, "\r\nX-Forwarded-For: 127.0.0.1\r\n") != NULL);
  CHECK(strstr(up, "\r\nX-Forwarded-Host: shop.example\r\n") != NULL);
  CHECK(strstr(up, "\r\nX-Forwarded-Proto: http\r\n") != NULL);
  CHECK(strstr(up, "\r\nVia: 1.1 tollgate\r\n") != NULL);
  CHECK(strstr(up, "\r\nUser-Agent: t\r\n") != NULL);
  CHECK(strstr(up, "Content-Length") == NULL); /* a GET without a body announces none */
  CHECK(wait_for(&done_count, before + 1, 2000) == 0);
  CHECK_INT(atomic_load(&done_err), 0);
  CHECK_INT(atomic_load(&done_status), 200);
}

TEST(chunked_upstream_is_dechunked_and_reframed) {
  CHECK(setup() == 1);
  resp_t rs;
  CHECK(fetch("GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK(rs.complete);
  CHECK(rs.chunked);
  CHECK_INT(rs.cl, -1);
  CHECK_INT(rs.body.len, 11);
  CHECK(memcmp(rs.body.data, "hello world", 11) == 0);
  tg_buf_free(&rs.body);
  /* HTTP/1.0 has no chunks: the body ends with the connection. */
  CHECK(fetch("GET /chunked HTTP/1.0\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(rs.close_delim);
  CHECK(rs.complete);
  CHECK_INT(rs.body.len, 11);
  char v[64];
  CHECK_STR(resp_hdr(&rs, "Connection", v, sizeof v), "close");
  tg_buf_free(&rs.body);
  /* A close-delimited upstream body is whole when the origin closes. */
  CHECK(fetch("GET /eof HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(rs.complete);
  CHECK(rs.chunked);
  CHECK_INT(rs.body.len, 13);
  CHECK(memcmp(rs.body.data, "until the end", 13) == 0);
  tg_buf_free(&rs.body);
}

TEST(post_body_is_forwarded) {
  CHECK(setup() == 1);
  resp_t rs;
  CHECK(fetch("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello proxy", &rs, 0) == 0);
  CHECK_INT(rs.status, 201);
  CHECK(rs.complete);
  CHECK_INT(rs.body.len, 11);
  CHECK(memcmp(rs.body.data, "hello proxy", 11) == 0);
  tg_buf_free(&rs.body);
  char up[16384];
  last_upstream_request(up, sizeof up);
  CHECK(strstr(up, "\r\nContent-Length: 11\r\n") != NULL);
  /* A chunked request body goes upstream with a length. */
  CHECK(fetch("POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
              &rs, 0) == 0);
  CHECK_INT(rs.status, 201);
  CHECK_INT(rs.body.len, 3);
  tg_buf_free(&rs.body);
  last_upstream_request(up, sizeof up);
  CHECK(strstr(up, "\r\nContent-Length: 3\r\n") != NULL);
  CHECK(strcasestr(up, "transfer-encoding") == NULL);
}

TEST(interim_responses_are_skipped_and_statuses_pass) {
  CHECK(setup() == 1);
  resp_t rs;
  CHECK(fetch("GET /interim HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK_INT(rs.body.len, 2);
  char v[64];
  CHECK(resp_hdr(&rs, "Link", v, sizeof v) == NULL);
  tg_buf_free(&rs.body);
  CHECK(fetch("GET /notfound HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 404);
  CHECK_INT(rs.body.len, 4);
  tg_buf_free(&rs.body);
}

TEST(head_has_length_and_no_body) {
  CHECK(setup() == 1);
  rd_t *r = calloc(1, sizeof *r);
  r->fd = dial();
  CHECK(r->fd >= 0);
  send_str(r->fd, "HEAD /cl/5000 HTTP/1.1\r\nHost: a\r\n\r\nGET /cl/10 HTTP/1.1\r\nHost: a\r\n\r\n");
  resp_t rs;
  int ok = read_resp(r, &rs, 1, 1) == 0 && rs.status == 200 && rs.cl == 5000;
  /* The next answer follows the head at once: no body bytes were sent. */
  ok = ok && read_resp(r, &rs, 0, 1) == 0 && rs.status == 200 && rs.complete && rs.body.len == 10;
  tg_buf_free(&rs.body);
  close(r->fd);
  free(r);
  CHECK(ok);
}

TEST(upstream_connections_are_reused) {
  CHECK(setup() == 1);
  resp_t rs;
  CHECK(fetch("GET /cl/10 HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0); /* one pooled now */
  tg_buf_free(&rs.body);
  usleep(50000);
  int accepts = atomic_load(&up_accepts);
  for (int i = 0; i < 10; i++) {
    CHECK(fetch("GET /cl/1000 HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
    CHECK(rs.complete && rs.pattern_ok);
    tg_buf_free(&rs.body);
  }
  CHECK_INT(atomic_load(&up_accepts), accepts);
  /* One whose response asks to close is closed, not pooled (even though
   * this origin would go on serving on it). */
  unsigned long long opened0, opened1, opened2;
  size_t idle0, idle1, idle2;
  CHECK(fetch("GET /stats HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(sscanf(rs.body.data, "opened=%llu idle=%zu", &opened0, &idle0) == 2);
  tg_buf_free(&rs.body);
  CHECK(idle0 >= 1);
  CHECK(fetch("GET /closehdr HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  tg_buf_free(&rs.body);
  CHECK(fetch("GET /stats HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(sscanf(rs.body.data, "opened=%llu idle=%zu", &opened1, &idle1) == 2);
  tg_buf_free(&rs.body);
  CHECK_INT(opened1, opened0);   /* a pooled one served it */
  CHECK_INT(idle1 + 1, idle0);   /* and is gone */
  /* A normal one goes back. */
  CHECK(fetch("GET /cl/10 HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  tg_buf_free(&rs.body);
  CHECK(fetch("GET /stats HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(sscanf(rs.body.data, "opened=%llu idle=%zu", &opened2, &idle2) == 2);
  tg_buf_free(&rs.body);
  CHECK_INT(idle2, idle1 + (opened2 - opened1));
}

TEST(a_pooled_connection_found_closed_is_retried_for_idempotent_methods) {
  CHECK(setup() == 1);
  resp_t rs;
  /* The pool hands out the most recently used connection first: the one
   * that just served /poison, which its origin drops at the next request. */
  CHECK(fetch("GET /poison HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  tg_buf_free(&rs.body);
  int accepts = atomic_load(&up_accepts);
  CHECK(fetch("GET /cl/10 HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK(rs.complete && rs.nbody == 10);
  tg_buf_free(&rs.body);
  CHECK_INT(atomic_load(&up_accepts), accepts + 1); /* sent again on a new one */
  /* A POST may have been acted on: not sent twice. */
  CHECK(fetch("GET /poison HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  tg_buf_free(&rs.body);
  int requests = atomic_load(&up_requests);
  CHECK(fetch("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx", &rs, 0) == 0);
  CHECK_INT(rs.status, 502);
  CHECK(strstr(rs.body.data, "bad gateway") != NULL);
  tg_buf_free(&rs.body);
  CHECK_INT(atomic_load(&up_requests), requests + 1);
}

TEST(hop_by_hop_and_payment_fields_are_not_forwarded) {
  CHECK(setup() == 1);
  resp_t rs;
  CHECK(fetch("GET /hop HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: s\r\n"
              "Keep-Alive: timeout=9\r\nTE: trailers\r\nProxy-Authorization: Basic eA==\r\n"
              "Proxy-Connection: keep-alive\r\nPAYMENT-SIGNATURE: sig\r\nX-PAYMENT: pay\r\n"
              "PAYMENT-RESPONSE: r\r\nX-PAYMENT-RESPONSE: r\r\nAuthorization: Bearer tok\r\n"
              "X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: evil\r\nVia: 1.1 edge\r\nX-Other: o\r\n\r\n",
              &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  char up[16384];
  last_upstream_request(up, sizeof up);
  static const char *const gone[] = {"\nConnection:", "\nX-Secret:", "\nKeep-Alive:", "\nTE:",
                                     "\nProxy-Authorization:", "\nProxy-Connection:",
                                     "\nPAYMENT-SIGNATURE:", "\nX-PAYMENT:", "\nPAYMENT-RESPONSE:",
                                     "\nX-PAYMENT-RESPONSE:", "evil"};
  for (size_t i = 0; i < sizeof gone / sizeof gone[0]; i++) {
    if (strcasestr(up, gone[i]) != NULL)
      fprintf(stderr, "  forwarded: %s\n", gone[i]);
    CHECK(strcasestr(up, gone[i]) == NULL);
  }
  CHECK(strstr(up, "\r\nAuthorization: Bearer tok\r\n") != NULL);
  CHECK(strstr(up, "\r\nX-Other: o\r\n") != NULL);
  CHECK(strstr(up, "\r\nX-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n") != NULL);
  CHECK(strstr(up, "\r\nX-Forwarded-Host: a\r\n") != NULL);
  CHECK(strstr(up, "\r\nVia: 1.1 edge, 1.1 tollgate\r\n") != NULL);
  /* And back: the origin's hop-by-hop and payment fields stay behind. */
  char v[256];
  CHECK(resp_hdr(&rs, "X-Hop", v, sizeof v) == NULL);
  CHECK(resp_hdr(&rs, "Keep-Alive", v, sizeof v) == NULL);
  CHECK(resp_hdr(&rs, "X-PAYMENT-RESPONSE", v, sizeof v) == NULL);
  CHECK(resp_hdr(&rs, "Proxy-Authenticate", v, sizeof v) == NULL);
  CHECK_STR(resp_hdr(&rs, "PAYMENT-RESPONSE", v, sizeof v), "ours");
  CHECK(strstr(rs.head, "forged") == NULL);
  CHECK(strstr(rs.head, "upstream") == NULL);
  CHECK(strstr(rs.head, "2001") == NULL);
  CHECK_STR(resp_hdr(&rs, "X-Kept", v, sizeof v), "yes");
  CHECK_STR(resp_hdr(&rs, "Via", v, sizeof v), "1.0 cdn, 1.1 tollgate");
  tg_buf_free(&rs.body);
}

TEST(origin_by_name) {
  CHECK(setup() == 1);
  resp_t rs;
  /* localhost may resolve to ::1 first; the upstream listens on 127.0.0.1 only. */
  CHECK(fetch("GET /byname/cl/10 HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK(rs.complete && rs.pattern_ok && rs.nbody == 10);
  tg_buf_free(&rs.body);
  char up[16384], want[64];
  last_upstream_request(up, sizeof up);
  snprintf(want, sizeof want, "\r\nHost: localhost:%d\r\n", up_port);
  CHECK(strstr(up, want) != NULL);
}

TEST(upstream_down_is_502) {
  CHECK(setup() == 1);
  resp_t rs;
  int before = settle();
  CHECK(before >= 0);
  CHECK(fetch("GET /down/x HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 502);
  char v[128];
  CHECK_STR(resp_hdr(&rs, "Content-Type", v, sizeof v), "application/json");
  CHECK(rs.body.len > 0 && strstr(rs.body.data, "\"error\":\"bad gateway\"") != NULL);
  tg_buf_free(&rs.body);
  CHECK(wait_for(&done_count, before + 1, 2000) == 0);
  CHECK_INT(atomic_load(&done_err), UV_ECONNREFUSED);
  CHECK_INT(atomic_load(&done_status), 502);
  /* Garbage from the origin is a 502 as well. */
  CHECK(fetch("GET /bad HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 502);
  tg_buf_free(&rs.body);
}

TEST(upstream_slow_is_504) {
  CHECK(setup() == 1);
  resp_t rs;
  uint64_t t0 = uv_hrtime();
  CHECK(fetch("GET /slow HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  CHECK_INT(rs.status, 504);
  CHECK(strstr(rs.body.data, "\"error\":\"gateway timeout\"") != NULL);
  CHECK(ms >= 600 && ms < 1900);
  tg_buf_free(&rs.body);
}

TEST(upstream_cut_mid_body_cuts_the_client) {
  CHECK(setup() == 1);
  resp_t rs;
  int before = settle();
  CHECK(before >= 0);
  CHECK(fetch("GET /cut HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK_INT(rs.status, 200);
  CHECK_INT(rs.cl, 100000);
  CHECK(!rs.complete);
  CHECK(rs.nbody <= 50000);
  CHECK(rs.pattern_ok);
  tg_buf_free(&rs.body);
  CHECK(wait_for(&done_count, before + 1, 2000) == 0);
  CHECK_INT(atomic_load(&done_err), UV_ECONNRESET);
  /* Chunked: no last chunk reaches the client. */
  CHECK(fetch("GET /cutchunked HTTP/1.1\r\nHost: a\r\n\r\n", &rs, 0) == 0);
  CHECK(rs.chunked);
  CHECK(!rs.complete);
  tg_buf_free(&rs.body);
}

TEST(client_gone_mid_stream_closes_the_upstream) {
  CHECK(setup() == 1);
  int before = settle();
  CHECK(before >= 0);
  int failed = atomic_load(&up_send_failed);
  rd_t *r = calloc(1, sizeof *r);
  r->fd = dial();
  CHECK(r->fd >= 0);
  send_str(r->fd, "GET /big/1024 HTTP/1.1\r\nHost: a\r\n\r\n");
  resp_t rs;
  memset(&rs, 0, sizeof rs);
  rs.pattern_ok = 1;
  char line[1024];
  int ok = rd_line(r, line, sizeof line) == 0 && strstr(line, " 200 ") != NULL;
  while (ok && rd_line(r, line, sizeof line) == 0 && line[0])
    ;
  ok = ok && rd_exact(r, &rs, 1 << 20, 0) == 0 && rs.pattern_ok;
  close(r->fd);
  free(r);
  CHECK(ok);
  /* The upstream's writes fail: its connection was closed, not pooled. */
  CHECK(wait_for(&up_send_failed, failed + 1, 5000) == 0);
  CHECK(wait_for(&done_count, before + 1, 2000) == 0);
  CHECK_INT(atomic_load(&done_err), -ECONNABORTED);
  CHECK_INT(atomic_load(&done_status), 200);
}

TEST(client_gone_before_the_response_ends_the_exchange) {
  CHECK(setup() == 1);
  int before = settle();
  CHECK(before >= 0);
  int fd = dial();
  CHECK(fd >= 0);
  uint64_t t0 = uv_hrtime();
  send_str(fd, "GET /delay/1500 HTTP/1.1\r\nHost: a\r\n\r\n");
  usleep(100000);
  /* A reset: a plain close reads as a half-close, which the server answers. */
  struct linger lg = {1, 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  close(fd);
  /* Told at once (before the origin answers or the first-byte timeout). */
  CHECK(wait_for(&done_count, before + 1, 1000) == 0);
  CHECK((uv_hrtime() - t0) / 1000000 < 500);
  CHECK_INT(atomic_load(&done_err), -ECONNABORTED);
  CHECK_INT(atomic_load(&done_status), 0);
}

TEST(client_that_stops_reading_is_cut_and_the_upstream_closed) {
  CHECK(setup() == 1);
  int before = settle();
  CHECK(before >= 0);
  int failed = atomic_load(&up_send_failed);
  int fd = dial_opt(srv_port, 16384);
  CHECK(fd >= 0);
  send_str(fd, "GET /big/1024 HTTP/1.1\r\nHost: a\r\n\r\n");
  /* Never read: the server's send deadline (idle_timeout_ms, 5 s here) ends it. */
  int ok = wait_for(&done_count, before + 1, 9000) == 0;
  close(fd);
  CHECK(ok);
  CHECK_INT(atomic_load(&done_err), -ECONNABORTED);
  CHECK(wait_for(&up_send_failed, failed + 1, 5000) == 0);
}

TEST(http10_cut_of_a_close_delimited_body_is_a_reset) {
  CHECK(setup() == 1);
  int fd = dial();
  CHECK(fd >= 0);
  send_str(fd, "GET /cutchunked HTTP/1.0\r\nHost: a\r\n\r\n");
  char buf[65536];
  ssize_t n;
  size_t total = 0;
  int err = 0;
  for (;;) {
    struct pollfd p = {fd, POLLIN, 0};
    if (poll(&p, 1, 5000) <= 0)
      break;
    n = recv(fd, buf, sizeof buf, 0);
    if (n < 0)
      err = errno;
    if (n <= 0)
      break;
    total += (size_t)n;
  }
  close(fd);
  /* Without a length or chunks, only a reset tells the client the body is cut. */
  CHECK_INT(err, ECONNRESET);
  CHECK(total < 1000 + 200);
}

/* 64 MiB through the proxy to a client that starts slow: the server never
 * holds more than its high-water mark and one read, and the process does not
 * grow by the body. */
static void big_body(int *tg_failed_, const char *request) {
  CHECK(setup() == 1);
  long rss0 = rss_kib();
  rd_t *r = calloc(1, sizeof *r);
  r->fd = dial_opt(srv_port, 32768);
  CHECK(r->fd >= 0);
  send_str(r->fd, request);
  usleep(500000); /* the client reads nothing for a while: the proxy must stop reading */
  resp_t rs;
  int rc = read_resp(r, &rs, 0, 0);
  close(r->fd);
  free(r);
  CHECK(rc == 0);
  CHECK_INT(rs.status, 200);
  CHECK(rs.complete);
  CHECK_INT(rs.nbody, 64u << 20);
  CHECK(rs.pattern_ok);
  long grew = rss_kib() - rss0;
  uint64_t peak = tg_server_stream_peak(srv);
  fprintf(stderr, "  64 MiB relayed: stream peak %llu KiB, RSS grew %ld KiB\n",
          (unsigned long long)(peak >> 10), grew);
  CHECK(peak > 0 && peak < (1u << 20));
  CHECK(grew < 16 * 1024);
}

TEST(large_body_streams_with_bounded_memory) {
  big_body(tg_failed_, "GET /big/64 HTTP/1.1\r\nHost: a\r\n\r\n");
}

TEST(large_chunked_body_streams_with_bounded_memory) {
  big_body(tg_failed_, "GET /bigchunked/64 HTTP/1.1\r\nHost: a\r\n\r\n");
}

TEST(pipelined_streams_keep_request_order) {
  CHECK(setup() == 1);
  rd_t *r = calloc(1, sizeof *r);
  r->fd = dial();
  CHECK(r->fd >= 0);
  /* The first answer comes last from the origins: the later ones wait. */
  send_str(r->fd, "GET /delay/300 HTTP/1.1\r\nHost: a\r\n\r\n"
                  "GET /cl/300000 HTTP/1.1\r\nHost: a\r\n\r\n"
                  "GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n"
                  "GET /down/x HTTP/1.1\r\nHost: a\r\n\r\n"
                  "GET /cl/5 HTTP/1.1\r\nHost: a\r\n\r\n");
  resp_t rs;
  int ok = read_resp(r, &rs, 0, 1) == 0 && rs.status == 200 && rs.body.len == 7 &&
           memcmp(rs.body.data, "delayed", 7) == 0;
  tg_buf_free(&rs.body);
  int ok2 = ok && read_resp(r, &rs, 0, 1) == 0 && rs.complete && rs.nbody == 300000 && rs.pattern_ok;
  tg_buf_free(&rs.body);
  int ok3 = ok2 && read_resp(r, &rs, 0, 1) == 0 && rs.complete && rs.body.len == 11;
  tg_buf_free(&rs.body);
  int ok4 = ok3 && read_resp(r, &rs, 0, 1) == 0 && rs.status == 502;
  tg_buf_free(&rs.body);
  int ok5 = ok4 && read_resp(r, &rs, 0, 1) == 0 && rs.complete && rs.body.len == 5;
  tg_buf_free(&rs.body);
  close(r->fd);
  free(r);
  CHECK(ok);
  CHECK(ok2);
  CHECK(ok3);
  CHECK(ok4);
  CHECK(ok5);
}

TEST(stop_with_streams_in_flight) {
  CHECK(setup() == 1);
  int fd = dial();
  CHECK(fd >= 0);
  send_str(fd, "GET /big/1024 HTTP/1.1\r\nHost: a\r\n\r\n");
  int fd2 = dial();
  send_str(fd2, "GET /delay/1500 HTTP/1.1\r\nHost: a\r\n\r\n");
  usleep(200000);
  tg_server_stop(srv, 100); /* cuts both; the proxies are freed after their producers heard */
  srv = NULL;
  char buf[65536];
  ssize_t n;
  uint64_t total = 0;
  while ((n = recv(fd, buf, sizeof buf, 0)) > 0)
    total += (uint64_t)n;
  close(fd);
  close(fd2);
  CHECK(total < (1024u << 20));
}
