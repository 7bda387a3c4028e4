#include "net/proxy.h"
#include "net/url.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include <llhttp.h>

#include "base/buf.h"

#define READ_BUF_SIZE 65536
#define MAX_RESP_HEADERS 128 /* more is a hostile or broken origin: 502 */
#define DNS_TTL_MS 10000     /* resolved addresses are reused this long */
#define MAX_ADDRS 4          /* addresses kept per origin, tried in order */

typedef struct origin origin_t;
typedef struct upconn upconn_t;
typedef struct exchange exchange_t;

TAILQ_HEAD(conn_list, upconn);
TAILQ_HEAD(ex_list, exchange);

enum conn_state {
  UC_RESOLVING,  /* getaddrinfo in flight */
  UC_CONNECTING, /* TCP connect in flight */
  UC_ACTIVE,     /* serving ex */
  UC_IDLE,       /* in its origin's pool */
  UC_CLOSING,    /* handles closing; freed when both are closed */
};

struct origin {
  origin_t *next;
  char *url;       /* as given to tg_proxy_forward: the lookup key */
  char *host;      /* without brackets */
  char *authority; /* the Host field: host[:port], brackets for IPv6 */
  char *base;      /* base path without a trailing '/', "" when none */
  uint16_t port;
  struct sockaddr_storage addrs[MAX_ADDRS];
  size_t naddrs;
  size_t addr_next;    /* the address new connections dial first */
  uint64_t addr_until; /* uv_now() expiry; 0: an IP literal (never) */
  struct conn_list idle; /* most recently used first */
  size_t nidle;
};

struct upconn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* connect, first byte, read gap, pooled lifetime */
  uv_connect_t connect;
  uv_getaddrinfo_t gai;
  tg_proxy_t *p;
  origin_t *o;
  exchange_t *ex;
  size_t addr_idx; /* which of o->addrs it dialed */
  TAILQ_ENTRY(upconn) link;      /* p->conns */
  TAILQ_ENTRY(upconn) idle_link; /* o->idle */
  enum conn_state state;
  int open_handles;
  unsigned reused : 1;  /* a response was completed on it before */
  unsigned reading : 1; /* uv_read_start in effect */
  unsigned writes;      /* uv_write requests in flight */
};

enum ex_state {
  EX_CONNECTING, /* waiting for its connection */
  EX_SENT,       /* request written, the response head not complete */
  EX_STREAMING,  /* answer started on the client */
};

typedef struct header_ref {
  size_t name_off, name_len, value_off, value_len;
} header_ref_t;

struct exchange {
  tg_proxy_t *p;
  TAILQ_ENTRY(exchange) link; /* p->exchanges */
  tg_http_req_t *req;         /* NULL once answered or gone */
  origin_t *o;
  upconn_t *conn;
  enum ex_state state;
  tg_proxy_done_fn done;
  void *ud;
  tg_http_header_t *extra; /* copies, in extra_mem */
  size_t nextra;
  char *extra_mem;
  /* Response head being parsed. */
  llhttp_t parser;
  tg_buf_t text; /* names and values, each NUL-terminated */
  tg_buf_t refs; /* header_ref_t */
  header_ref_t cur;
  int in_field;
  size_t head_bytes;
  int status;      /* final status from the origin */
  int sent_status; /* what the client was answered */
  uint64_t resp_bytes; /* response bytes read from the origin */
  int parse_err;       /* set by parser callbacks */
  unsigned head : 1;
  unsigned idempotent : 1;
  unsigned retried : 1;
  unsigned complete : 1;    /* final response parsed to its end */
  unsigned keep_alive : 1;  /* ... and the origin keeps the connection */
  unsigned client_gone : 1; /* a stream write failed */
  unsigned paused : 1;      /* the client is slow: the origin is not read */
};

struct tg_proxy {
  uv_loop_t *loop;
  tg_proxy_opts_t opts;
  origin_t *origins;
  struct conn_list conns;
  struct ex_list exchanges;
  size_t pending; /* open handles and resolutions: freed at 0 once closing */
  uint64_t opened;
  int closing;
  char rbuf[READ_BUF_SIZE];
};

static void conn_close(upconn_t *uc);
static void conn_broke(upconn_t *uc, int err);
static void ex_fail(exchange_t *ex, int err, const char *detail);
static void ex_dispatch(exchange_t *ex);
static const llhttp_settings_t parser_settings;

/* ---- small helpers ---- */

static int name_eq(const char *name, size_t n, const char *want) {
  return strlen(want) == n && strncasecmp(name, want, n) == 0;
}

/* n bytes of list is a comma-separated token list holding name. */
static int list_has(const char *list, size_t list_len, const char *name, size_t n) {
  const char *e = list, *end = list + list_len;
  while (e < end) {
    while (e < end && (*e == ' ' || *e == '\t' || *e == ','))
      e++;
    const char *s = e;
    while (e < end && *e != ',')
      e++;
    const char *t = e;
    while (t > s && (t[-1] == ' ' || t[-1] == '\t'))
      t--;
    if ((size_t)(t - s) == n && strncasecmp(s, name, n) == 0)
      return 1;
  }
  return 0;
}

/* Fields that end at this hop, or that payments own, in either direction. */
static int is_hop_or_payment(const char *name, size_t n) {
  static const char *const names[] = {
      "connection",        "keep-alive", "proxy-authenticate", "proxy-authorization",
      "te",                "trailer",    "transfer-encoding",  "upgrade",
      "proxy-connection",  "content-length",
      "payment-signature", "x-payment",  "payment-response",   "x-payment-response",
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (name_eq(name, n, names[i]))
      return 1;
  return 0;
}

static int is_idempotent(int method) {
  return method == HTTP_GET || method == HTTP_HEAD || method == HTTP_PUT || method == HTTP_DELETE ||
         method == HTTP_OPTIONS || method == HTTP_TRACE;
}

/* ---- origins ---- */

static void origin_free(origin_t *o) {
  free(o->url);
  free(o->host);
  free(o->authority);
  free(o->base);
  free(o);
}

/* "http://host[:port][/base]": no user info, query or fragment. */
static origin_t *origin_parse(const char *url) {
  tg_url_t u;
  if (tg_url_parse(url, &u) != 0 || u.tls || strpbrk(url, "?#") != NULL)
    return NULL;
  const char *host = u.host, *auth_end = u.target;
  size_t host_len = u.host_len;
  int bracketed = u.bracketed;
  unsigned long port = u.port;
  origin_t *o = calloc(1, sizeof *o);
  if (o == NULL)
    return NULL;
  o->port = (uint16_t)port;
  TAILQ_INIT(&o->idle);
  size_t base_len = strlen(auth_end);
  while (base_len && auth_end[base_len - 1] == '/')
    base_len--;
  o->url = strdup(url);
  o->host = strndup(host, host_len);
  o->base = strndup(auth_end, base_len);
  tg_buf_t a = {0};
  int rc = tg_buf_printf(&a, "%s%.*s%s", bracketed ? "[" : "", (int)host_len, host,
                         bracketed ? "]" : "");
  if (rc == 0 && port != 80)
    rc = tg_buf_printf(&a, ":%lu", port);
  o->authority = rc == 0 ? a.data : NULL;
  if (rc != 0)
    tg_buf_free(&a);
  if (!o->url || !o->host || !o->base || !o->authority) {
    origin_free(o);
    return NULL;
  }
  struct sockaddr_in *sin = (struct sockaddr_in *)&o->addrs[0];
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&o->addrs[0];
  if (inet_pton(AF_INET, o->host, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons(o->port);
    o->naddrs = 1;
  } else if (inet_pton(AF_INET6, o->host, &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(o->port);
    o->naddrs = 1;
  } else if (bracketed) {
    origin_free(o);
    return NULL;
  }
  return o;
}

static origin_t *origin_get(tg_proxy_t *p, const char *url) {
  for (origin_t *o = p->origins; o; o = o->next)
    if (strcmp(o->url, url) == 0)
      return o;
  origin_t *o = origin_parse(url);
  if (o == NULL)
    return NULL;
  o->next = p->origins;
  p->origins = o;
  return o;
}

/* ---- the proxy ---- */

tg_proxy_t *tg_proxy_new(uv_loop_t *loop, const tg_proxy_opts_t *o) {
  tg_proxy_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return NULL;
  p->loop = loop;
  if (o)
    p->opts = *o;
  if (p->opts.max_idle_per_origin == 0)
    p->opts.max_idle_per_origin = 32;
  if (p->opts.connect_timeout_ms == 0)
    p->opts.connect_timeout_ms = 2000;
  if (p->opts.first_byte_timeout_ms == 0)
    p->opts.first_byte_timeout_ms = 30000;
  if (p->opts.idle_timeout_ms == 0)
    p->opts.idle_timeout_ms = 30000;
  if (p->opts.pool_idle_timeout_ms == 0)
    p->opts.pool_idle_timeout_ms = 4000;
  if (p->opts.max_header_bytes == 0)
    p->opts.max_header_bytes = 16384;
  TAILQ_INIT(&p->conns);
  TAILQ_INIT(&p->exchanges);
  return p;
}

static void proxy_destroy(tg_proxy_t *p) {
  while (p->origins) {
    origin_t *o = p->origins;
    p->origins = o->next;
    origin_free(o);
  }
  free(p);
}

static void proxy_unref(tg_proxy_t *p) {
  if (--p->pending == 0 && p->closing)
    proxy_destroy(p);
}

uint64_t tg_proxy_connections_opened(const tg_proxy_t *p) { return p->opened; }

size_t tg_proxy_idle_connections(const tg_proxy_t *p) {
  size_t n = 0;
  for (const origin_t *o = p->origins; o; o = o->next)
    n += o->nidle;
  return n;
}

/* ---- upstream connections ---- */

static void on_conn_closed(uv_handle_t *h) {
  upconn_t *uc = h->data;
  tg_proxy_t *p = uc->p;
  if (--uc->open_handles == 0)
    free(uc);
  proxy_unref(p);
}

static void conn_close(upconn_t *uc) {
  if (uc->state == UC_CLOSING)
    return;
  if (uc->state == UC_IDLE) {
    TAILQ_REMOVE(&uc->o->idle, uc, idle_link);
    uc->o->nidle--;
  }
  if (uc->state == UC_RESOLVING)
    uv_cancel((uv_req_t *)&uc->gai); /* on_resolved still runs and sees UC_CLOSING */
  TAILQ_REMOVE(&uc->p->conns, uc, link);
  if (uc->ex)
    uc->ex->conn = NULL;
  uc->ex = NULL;
  uc->state = UC_CLOSING;
  uv_close((uv_handle_t *)&uc->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&uc->timer, on_conn_closed);
}

static void on_conn_timer(uv_timer_t *t);

static void conn_timer(upconn_t *uc, uint32_t ms) {
  uv_timer_start(&uc->timer, on_conn_timer, ms, 0);
}

static void conn_pool(upconn_t *uc) {
  origin_t *o = uc->o;
  uc->ex = NULL;
  if (o->nidle >= uc->p->opts.max_idle_per_origin || uc->p->closing) {
    conn_close(uc);
    return;
  }
  uc->reused = 1;
  uc->state = UC_IDLE;
  TAILQ_INSERT_HEAD(&o->idle, uc, idle_link);
  o->nidle++;
  conn_timer(uc, uc->p->opts.pool_idle_timeout_ms);
}

typedef struct write_req {
  uv_write_t w;
  tg_buf_t buf; /* owned by the write, whatever happens to the exchange */
  upconn_t *uc;
} write_req_t;

static void on_write(uv_write_t *w, int status) {
  write_req_t *wr = (write_req_t *)w;
  upconn_t *uc = wr->uc;
  tg_buf_free(&wr->buf);
  free(wr);
  uc->writes--;
  /* The origin may have answered and closed before reading it all: then the
   * read side says what happened. */
  if (status < 0 && uc->state == UC_ACTIVE && uc->ex && uc->ex->resp_bytes == 0)
    conn_broke(uc, status);
}

/* ---- one exchange ---- */

static void ex_finish(exchange_t *ex, int err) {
  tg_proxy_t *p = ex->p;
  if (ex->conn) {
    upconn_t *uc = ex->conn;
    ex->conn = NULL;
    uc->ex = NULL;
    conn_close(uc);
  }
  TAILQ_REMOVE(&p->exchanges, ex, link);
  tg_buf_free(&ex->text);
  tg_buf_free(&ex->refs);
  tg_proxy_done_fn done = ex->done;
  void *ud = ex->ud;
  int status = ex->sent_status;
  free(ex->extra_mem);
  free(ex);
  done(ud, err, status);
}

/* Answers the client 502/504 (before the response started) or cuts it
 * (after), then ends the exchange. */
static void ex_fail(exchange_t *ex, int err, const char *detail) {
  tg_http_req_t *req = ex->req;
  ex->req = NULL;
  if (req && ex->state == EX_STREAMING) {
    tg_http_stream_end(req, false);
  } else if (req) {
    int status = err == UV_ETIMEDOUT ? 504 : 502;
    json_t *body = json_pack("{s:s, s:s}", "error", status == 504 ? "gateway timeout" : "bad gateway",
                             "detail", detail ? detail : uv_strerror(err));
    tg_http_stream_on_abort(req, NULL, NULL);
    tg_http_respond_json(req, status, body);
    ex->sent_status = status;
  }
  ex_finish(ex, err);
}

static void on_client_abort(void *ud) {
  exchange_t *ex = ud;
  ex->req = NULL; /* freed by the server */
  ex_finish(ex, -ECONNABORTED);
}

static void conn_read(upconn_t *uc, int on);

static void on_client_drain(void *ud) {
  exchange_t *ex = ud;
  ex->paused = 0;
  upconn_t *uc = ex->conn;
  if (uc == NULL || uc->state != UC_ACTIVE)
    return;
  conn_read(uc, 1);
  conn_timer(uc, ex->p->opts.idle_timeout_ms);
}

/* Builds the upstream request from ex->req into b. */
static int build_request(exchange_t *ex, tg_buf_t *b) {
  const tg_http_req_t *req = ex->req;
  const origin_t *o = ex->o;
  int rc = tg_buf_printf(b, "%s ", req->method_name);
  if (rc == 0 && req->path[0] == '*' && o->base[0] == '\0')
    rc = tg_buf_puts(b, "*");
  else if (rc == 0)
    rc = tg_buf_printf(b, "%s%s", o->base, req->path[0] == '*' ? "/" : req->path);
  if (rc == 0 && req->query)
    rc = tg_buf_printf(b, "?%s", req->query);
  if (rc == 0)
    rc = tg_buf_printf(b, " HTTP/1.1\r\nHost: %s\r\n", o->authority);
  const tg_http_header_t *conn_hdr = tg_http_req_header(req, "connection");
  const char *xff = NULL, *via = NULL;
  size_t xff_len = 0, via_len = 0;
  int framed = 0;
  for (size_t i = 0; rc == 0 && i < req->nheaders; i++) {
    const tg_http_header_t *h = &req->headers[i];
    if (name_eq(h->name, h->name_len, "content-length") ||
        name_eq(h->name, h->name_len, "transfer-encoding"))
      framed = 1;
    if (is_hop_or_payment(h->name, h->name_len) || name_eq(h->name, h->name_len, "host") ||
        name_eq(h->name, h->name_len, "expect") ||
        name_eq(h->name, h->name_len, "x-forwarded-host") ||
        name_eq(h->name, h->name_len, "x-forwarded-proto") ||
        (conn_hdr && list_has(conn_hdr->value, conn_hdr->value_len, h->name, h->name_len)))
      continue;
    if (name_eq(h->name, h->name_len, "x-forwarded-for")) {
      if (xff == NULL) {
        xff = h->value;
        xff_len = h->value_len;
      }
      continue;
    }
    if (name_eq(h->name, h->name_len, "via")) {
      if (via == NULL) {
        via = h->value;
        via_len = h->value_len;
      }
      continue;
    }
    rc = tg_buf_append(b, h->name, h->name_len);
    if (rc == 0)
      rc = tg_buf_append(b, ": ", 2);
    if (rc == 0)
      rc = tg_buf_append(b, h->value, h->value_len);
    if (rc == 0)
      rc = tg_buf_append(b, "\r\n", 2);
  }
  char ip[64];
  tg_http_peer_ip(req, ip, sizeof ip);
  /* RFC 7239 leaves brackets to Forwarded; X-Forwarded-For carries the bare address. */
  const char *bare = ip;
  size_t bare_len = strlen(ip);
  if (bare_len >= 2 && ip[0] == '[' && ip[bare_len - 1] == ']') {
    bare++;
    bare_len -= 2;
  }
  if (rc == 0 && xff_len)
    rc = tg_buf_printf(b, "X-Forwarded-For: %.*s, %.*s\r\n", (int)xff_len, xff, (int)bare_len, bare);
  else if (rc == 0)
    rc = tg_buf_printf(b, "X-Forwarded-For: %.*s\r\n", (int)bare_len, bare);
  if (rc == 0 && req->host)
    rc = tg_buf_printf(b, "X-Forwarded-Host: %.*s\r\n", (int)req->host_len, req->host);
  if (rc == 0)
    rc = tg_buf_printf(b, "X-Forwarded-Proto: %s\r\n", req->tls ? "https" : "http");
  if (rc == 0 && via_len)
    rc = tg_buf_printf(b, "Via: %.*s, 1.1 tollgate\r\n", (int)via_len, via);
  else if (rc == 0)
    rc = tg_buf_puts(b, "Via: 1.1 tollgate\r\n");
  if (rc == 0 && (framed || req->body_len || req->method == HTTP_POST || req->method == HTTP_PUT ||
                  req->method == HTTP_PATCH))
    rc = tg_buf_printf(b, "Content-Length: %zu\r\n", req->body_len);
  if (rc == 0)
    rc = tg_buf_puts(b, "\r\n");
  if (rc == 0 && req->body_len)
    rc = tg_buf_append(b, req->body, req->body_len);
  return rc;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  upconn_t *uc = h->data;
  /* One loop thread, and every read is consumed before its callback returns. */
  *buf = uv_buf_init(uc->p->rbuf, sizeof uc->p->rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);

static void conn_read(upconn_t *uc, int on) {
  if (on && !uc->reading) {
    if (uv_read_start((uv_stream_t *)&uc->tcp, on_alloc, on_read) == 0)
      uc->reading = 1;
  } else if (!on && uc->reading) {
    uv_read_stop((uv_stream_t *)&uc->tcp);
    uc->reading = 0;
  }
}

/* Sends ex's request on uc (connected or pooled). */
static void conn_start(upconn_t *uc, exchange_t *ex) {
  uc->state = UC_ACTIVE;
  uc->ex = ex;
  ex->conn = uc;
  ex->state = EX_SENT;
  ex->resp_bytes = 0;
  ex->head_bytes = 0;
  ex->status = 0;
  ex->complete = 0;
  ex->parse_err = 0;
  ex->in_field = 0;
  tg_buf_reset(&ex->text);
  tg_buf_reset(&ex->refs);
  llhttp_init(&ex->parser, HTTP_RESPONSE, &parser_settings);
  ex->parser.data = ex;
  conn_timer(uc, ex->p->opts.first_byte_timeout_ms);
  write_req_t *wr = calloc(1, sizeof *wr);
  int rc = wr ? build_request(ex, &wr->buf) : -ENOMEM;
  if (rc == 0 && wr->buf.len > UINT_MAX)
    rc = -E2BIG;
  if (rc == 0) {
    wr->uc = uc;
    uv_buf_t b = uv_buf_init(wr->buf.data, (unsigned int)wr->buf.len);
    rc = uv_write(&wr->w, (uv_stream_t *)&uc->tcp, &b, 1, on_write);
  }
  if (rc != 0) {
    if (wr)
      tg_buf_free(&wr->buf);
    free(wr);
    ex_fail(ex, rc, "cannot send the request");
    return;
  }
  uc->writes++;
  conn_read(uc, 1);
}

static int conn_dial(exchange_t *ex);

static void on_connect(uv_connect_t *creq, int status) {
  upconn_t *uc = creq->data;
  if (uc->state == UC_CLOSING)
    return;
  exchange_t *ex = uc->ex;
  if (status < 0) {
    origin_t *o = uc->o;
    /* Another address of the name may work ("localhost" gives ::1 first
     * while the origin listens on 127.0.0.1). */
    int addr_error = status == UV_ECONNREFUSED || status == UV_ENETUNREACH ||
                     status == UV_EHOSTUNREACH || status == UV_EADDRNOTAVAIL ||
                     status == UV_EAFNOSUPPORT;
    if (ex && addr_error && uc->addr_idx + 1 < o->naddrs) {
      if (o->addr_next <= uc->addr_idx)
        o->addr_next = uc->addr_idx + 1;
      conn_close(uc);
      int rc = conn_dial(ex);
      if (rc != 0)
        ex_fail(ex, rc, NULL);
      return;
    }
    o->addr_next = 0;
    if (ex)
      ex_fail(ex, status, NULL);
    else
      conn_close(uc);
    return;
  }
  uv_tcp_nodelay(&uc->tcp, 1);
  if (ex == NULL) { /* its exchange ended meanwhile */
    conn_close(uc);
    return;
  }
  conn_start(uc, ex);
}

static void conn_connect(upconn_t *uc) {
  origin_t *o = uc->o;
  uc->state = UC_CONNECTING;
  uc->addr_idx = o->addr_next < o->naddrs ? o->addr_next : 0;
  int rc = uv_tcp_connect(&uc->connect, &uc->tcp, (const struct sockaddr *)&o->addrs[uc->addr_idx],
                          on_connect);
  if (rc != 0) {
    /* Reported from the timer: never inside tg_proxy_forward. */
    uc->connect.data = NULL;
    conn_timer(uc, 0);
    uc->ex->parse_err = rc;
  }
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  upconn_t *uc = gai->data;
  tg_proxy_t *p = uc->p;
  /* The lookup holds the connection like its handles do: a cancelled one
   * still calls back, possibly after the handles closed. */
  uc->open_handles--;
  if (uc->state == UC_CLOSING) {
    uv_freeaddrinfo(res);
    if (uc->open_handles == 0)
      free(uc);
    proxy_unref(p);
    return;
  }
  proxy_unref(p);
  origin_t *o = uc->o;
  size_t n = 0;
  for (struct addrinfo *ai = res; status == 0 && ai && n < MAX_ADDRS; ai = ai->ai_next) {
    if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
        ai->ai_addrlen <= sizeof o->addrs[0])
      memcpy(&o->addrs[n++], ai->ai_addr, ai->ai_addrlen);
  }
  uv_freeaddrinfo(res);
  if (n == 0) {
    o->naddrs = 0;
    ex_fail(uc->ex, status ? status : UV_EAI_NONAME, "cannot resolve the origin");
    return;
  }
  o->naddrs = n;
  o->addr_next = 0;
  o->addr_until = uv_now(p->loop) + DNS_TTL_MS;
  conn_connect(uc);
}

static int conn_dial(exchange_t *ex) {
  tg_proxy_t *p = ex->p;
  origin_t *o = ex->o;
  upconn_t *uc = calloc(1, sizeof *uc);
  if (uc == NULL)
    return -ENOMEM;
  uc->p = p;
  uc->o = o;
  uv_tcp_init(p->loop, &uc->tcp);
  uv_timer_init(p->loop, &uc->timer);
  uc->tcp.data = uc->timer.data = uc->connect.data = uc->gai.data = uc;
  uc->open_handles = 2;
  p->pending += 2;
  p->opened++;
  TAILQ_INSERT_TAIL(&p->conns, uc, link);
  uc->ex = ex;
  ex->conn = uc;
  ex->state = EX_CONNECTING;
  conn_timer(uc, p->opts.connect_timeout_ms);
  if (o->naddrs > 0 && (o->addr_until == 0 || uv_now(p->loop) < o->addr_until)) {
    conn_connect(uc);
    return 0;
  }
  uc->state = UC_RESOLVING;
  char port[8];
  snprintf(port, sizeof port, "%u", o->port);
  struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
  int rc = uv_getaddrinfo(p->loop, &uc->gai, on_resolved, o->host, port, &hints);
  if (rc != 0) {
    uc->state = UC_CONNECTING; /* nothing to cancel */
    uc->connect.data = NULL;
    conn_timer(uc, 0);
    ex->parse_err = rc;
    return 0;
  }
  p->pending++;
  uc->open_handles++;
  return 0;
}

static void on_conn_timer(uv_timer_t *t) {
  upconn_t *uc = t->data;
  exchange_t *ex = uc->ex;
  if (uc->state == UC_IDLE || ex == NULL) {
    conn_close(uc);
    return;
  }
  if ((uc->state == UC_CONNECTING || uc->state == UC_RESOLVING) && uc->connect.data == NULL) {
    ex_fail(ex, ex->parse_err, "cannot connect to the origin"); /* a synchronous failure */
    return;
  }
  const char *what = uc->state != UC_ACTIVE        ? "connecting to the origin timed out"
                     : ex->resp_bytes == 0         ? "the origin did not answer in time"
                                                   : "the origin stalled";
  ex_fail(ex, UV_ETIMEDOUT, what);
}

/* Takes a pooled connection, or dials a new one. */
static void ex_dispatch(exchange_t *ex) {
  origin_t *o = ex->o;
  upconn_t *uc = ex->retried ? NULL : TAILQ_FIRST(&o->idle);
  if (uc) {
    TAILQ_REMOVE(&o->idle, uc, idle_link);
    o->nidle--;
    conn_start(uc, ex);
    return;
  }
  int rc = conn_dial(ex);
  if (rc != 0)
    ex_fail(ex, rc, NULL);
}

/* ---- the response ---- */

static int on_message_begin(llhttp_t *pr) {
  exchange_t *ex = pr->data;
  tg_buf_reset(&ex->text);
  tg_buf_reset(&ex->refs);
  ex->in_field = 0;
  ex->head_bytes = 0;
  return 0;
}

static int head_bytes(exchange_t *ex, size_t n) {
  ex->head_bytes += n;
  if (ex->head_bytes > ex->p->opts.max_header_bytes) {
    ex->parse_err = -EFBIG;
    return -1;
  }
  return 0;
}

static int on_status(llhttp_t *pr, const char *at, size_t len) {
  (void)at;
  return head_bytes(pr->data, len);
}

static int on_header_field(llhttp_t *pr, const char *at, size_t len) {
  exchange_t *ex = pr->data;
  if (head_bytes(ex, len) != 0)
    return -1;
  if (!ex->in_field) {
    ex->in_field = 1;
    ex->cur.name_off = ex->text.len;
  }
  if (tg_buf_append(&ex->text, at, len) != 0) {
    ex->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_header_field_complete(llhttp_t *pr) {
  exchange_t *ex = pr->data;
  if (!ex->in_field) {
    ex->parse_err = -EPROTO;
    return -1;
  }
  ex->in_field = 0;
  ex->cur.name_len = ex->text.len - ex->cur.name_off;
  if (head_bytes(ex, 4) != 0)
    return -1;
  if (tg_buf_append(&ex->text, "", 1) != 0) {
    ex->parse_err = -ENOMEM;
    return -1;
  }
  ex->cur.value_off = ex->text.len;
  return 0;
}

static int on_header_value(llhttp_t *pr, const char *at, size_t len) {
  exchange_t *ex = pr->data;
  if (head_bytes(ex, len) != 0)
    return -1;
  if (tg_buf_append(&ex->text, at, len) != 0) {
    ex->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_header_value_complete(llhttp_t *pr) {
  exchange_t *ex = pr->data;
  ex->cur.value_len = ex->text.len - ex->cur.value_off;
  /* Trailing whitespace is not part of the value (RFC 9110 5.5). */
  while (ex->cur.value_len &&
         (ex->text.data[ex->cur.value_off + ex->cur.value_len - 1] == ' ' ||
          ex->text.data[ex->cur.value_off + ex->cur.value_len - 1] == '\t'))
    ex->cur.value_len--;
  ex->text.len = ex->cur.value_off + ex->cur.value_len;
  if (ex->refs.len / sizeof(header_ref_t) >= MAX_RESP_HEADERS) {
    ex->parse_err = -EPROTO;
    return -1;
  }
  if (tg_buf_append(&ex->text, "", 1) != 0 || tg_buf_append(&ex->refs, &ex->cur, sizeof ex->cur) != 0) {
    ex->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

/* The response head is in: the client's answer starts. */
static int on_headers_complete(llhttp_t *pr) {
  exchange_t *ex = pr->data;
  int status = pr->status_code;
  if (status == 101 || status < 100 || status > 599) { /* we never ask to switch protocols */
    ex->parse_err = -EPROTO;
    return -1;
  }
  if (status < 200) /* informational: the real response follows */
    return 0;
  ex->status = status;
  size_t n = ex->refs.len / sizeof(header_ref_t);
  const header_ref_t *refs = (const header_ref_t *)ex->refs.data;
  tg_http_header_t *out = calloc(n + ex->nextra + 1, sizeof *out);
  if (out == NULL) {
    ex->parse_err = -ENOMEM;
    return -1;
  }
  const char *conn_list = NULL;
  size_t conn_list_len = 0, k = 0;
  for (size_t i = 0; i < n; i++)
    if (name_eq(ex->text.data + refs[i].name_off, refs[i].name_len, "connection")) {
      conn_list = ex->text.data + refs[i].value_off;
      conn_list_len = refs[i].value_len;
    }
  const char *via = NULL;
  size_t via_len = 0;
  for (size_t i = 0; i < n; i++) {
    const char *name = ex->text.data + refs[i].name_off;
    size_t nl = refs[i].name_len;
    if (is_hop_or_payment(name, nl) || name_eq(name, nl, "date") || name_eq(name, nl, "server") ||
        (conn_list && list_has(conn_list, conn_list_len, name, nl)))
      continue;
    if (name_eq(name, nl, "via")) {
      via = ex->text.data + refs[i].value_off;
      via_len = refs[i].value_len;
      continue;
    }
    out[k++] = (tg_http_header_t){name, nl, ex->text.data + refs[i].value_off, refs[i].value_len};
  }
  for (size_t i = 0; i < ex->nextra; i++)
    out[k++] = ex->extra[i];
  tg_buf_t via_buf = {0};
  if (tg_buf_printf(&via_buf, "%.*s%s1.1 tollgate", (int)via_len, via ? via : "", via ? ", " : "") ==
      0)
    out[k++] = (tg_http_header_t){"Via", 3, via_buf.data, via_buf.len};
  int64_t length = -1;
  if ((pr->flags & F_CONTENT_LENGTH) && !(pr->flags & F_CHUNKED))
    length = (int64_t)pr->content_length;
  tg_http_req_t *req = ex->req;
  ex->state = EX_STREAMING;
  ex->sent_status = status;
  tg_http_stream_on_drain(req, on_client_drain, ex);
  int rc = tg_http_stream_start(req, status, out, k, length);
  tg_buf_free(&via_buf);
  free(out);
  if (rc != 0) {
    ex->req = NULL; /* finished by the server */
    ex->client_gone = 1;
    ex->sent_status = rc == -EINVAL ? 500 : 0; /* a field the server refused: it sent a 500 */
    ex->parse_err = rc == -EINVAL ? -EPROTO : -ECONNABORTED;
    return -1;
  }
  /* A HEAD response announces a body it does not carry. */
  return ex->head ? 1 : 0;
}

static int on_body(llhttp_t *pr, const char *at, size_t len) {
  exchange_t *ex = pr->data;
  if (ex->req == NULL)
    return -1;
  int rc = tg_http_stream_write(ex->req, at, len);
  if (rc < 0) {
    ex->client_gone = 1;
    return -1;
  }
  if (rc == 1 && !ex->paused) {
    /* The rest of this read is still taken (at most one read buffer more). */
    ex->paused = 1;
    if (ex->conn) {
      conn_read(ex->conn, 0);
      uv_timer_stop(&ex->conn->timer); /* the client's slowness is the server's to time */
    }
  }
  return 0;
}

static int on_message_complete(llhttp_t *pr) {
  exchange_t *ex = pr->data;
  if (pr->status_code < 200)
    return 0;
  ex->complete = 1;
  ex->keep_alive = llhttp_should_keep_alive(pr);
  return HPE_PAUSED; /* stop at the end of this response */
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_status = on_status,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* The response is complete: end the client's answer, pool or close. */
static void ex_complete(exchange_t *ex, int extra_bytes) {
  upconn_t *uc = ex->conn;
  tg_http_req_t *req = ex->req;
  ex->req = NULL;
  ex->conn = NULL;
  uc->ex = NULL;
  /* Reuse only a connection in a known state: nothing unread, nothing unsent. */
  if (ex->keep_alive && !extra_bytes && uc->writes == 0) {
    conn_read(uc, 1); /* an idle connection is read to see the origin close it */
    conn_pool(uc);
  } else {
    conn_close(uc);
  }
  tg_http_stream_end(req, true);
  ex_finish(ex, 0);
}

/* A broken connection before or during the response. */
static void conn_broke(upconn_t *uc, int err) {
  exchange_t *ex = uc->ex;
  if (ex == NULL) {
    conn_close(uc);
    return;
  }
  int closed = err == UV_EOF || err == UV_ECONNRESET || err == UV_EPIPE;
  if (closed && uc->reused && ex->resp_bytes == 0 && !ex->retried && ex->idempotent &&
      ex->state == EX_SENT) {
    /* The keep-alive race: the origin closed a pooled connection as we sent
     * on it. Nothing came back, and the method is safe to send twice. */
    ex->retried = 1;
    conn_close(uc);
    ex_dispatch(ex);
    return;
  }
  if (err == UV_EOF)
    err = UV_ECONNRESET;
  ex_fail(ex, err,
          closed ? (ex->state == EX_STREAMING ? "the origin closed mid-response"
                                              : "the origin closed the connection")
                 : NULL);
}

static void conn_on_data(upconn_t *uc, const char *data, size_t len) {
  exchange_t *ex = uc->ex;
  if (uc->state != UC_ACTIVE || ex == NULL) {
    conn_close(uc); /* bytes while nothing was asked: the state is unknown */
    return;
  }
  ex->resp_bytes += len;
  if (!ex->paused)
    conn_timer(uc, ex->p->opts.idle_timeout_ms);
  llhttp_errno_t rc = llhttp_execute(&ex->parser, data, len);
  if (rc == HPE_OK)
    return;
  if (rc == HPE_PAUSED && ex->complete) {
    const char *end = llhttp_get_error_pos(&ex->parser);
    ex_complete(ex, end != NULL && end < data + len);
    return;
  }
  if (ex->client_gone) {
    /* A write found the client gone: ending the answer frees the request
     * (and no abort callback follows). A failed start finished it already. */
    tg_http_req_t *req = ex->req;
    ex->req = NULL;
    if (req)
      tg_http_stream_end(req, false);
    ex_finish(ex, ex->parse_err ? ex->parse_err : -ECONNABORTED);
    return;
  }
  int err = ex->parse_err ? ex->parse_err : -EPROTO;
  const char *detail = err == -EFBIG ? "response head too large" : "bad HTTP response from the origin";
  if (err == -EFBIG)
    err = -EPROTO;
  ex_fail(ex, err, detail);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  upconn_t *uc = s->data;
  if (uc->state == UC_CLOSING || nread == 0)
    return;
  if (nread > 0) {
    conn_on_data(uc, buf->base, (size_t)nread);
    return;
  }
  if (uc->state != UC_ACTIVE || uc->ex == NULL) {
    conn_close(uc);
    return;
  }
  exchange_t *ex = uc->ex;
  if (nread == UV_EOF && ex->resp_bytes > 0 && ex->state == EX_STREAMING) {
    llhttp_finish(&ex->parser); /* HPE_PAUSED from on_message_complete when it completes */
  }
  if (ex->complete) {
    /* A body delimited by the end of the connection ends here. */
    ex->keep_alive = 0;
    ex_complete(ex, 0);
    return;
  }
  conn_broke(uc, (int)nread);
}

/* ---- entry points ---- */

int tg_proxy_forward(tg_proxy_t *p, tg_http_req_t *req, const char *origin,
                     const tg_http_header_t *extra_resp, size_t nextra, tg_proxy_done_fn done,
                     void *ud) {
  if (p->closing)
    return -ECANCELED;
  if (origin == NULL || done == NULL || (nextra && extra_resp == NULL))
    return -EINVAL;
  size_t mem = 0;
  for (size_t i = 0; i < nextra; i++) {
    const tg_http_header_t *h = &extra_resp[i];
    if (h->name == NULL || h->name_len == 0 || (h->value == NULL && h->value_len))
      return -EINVAL;
    for (size_t k = 0; k < h->value_len; k++)
      if ((unsigned char)h->value[k] < 0x20 && h->value[k] != '\t')
        return -EINVAL;
    mem += h->name_len + h->value_len + 2;
  }
  origin_t *o = origin_get(p, origin);
  if (o == NULL) /* not an http URL (https origins are not supported), or out of memory */
    return -EINVAL;
  exchange_t *ex = calloc(1, sizeof *ex);
  if (ex == NULL)
    return -ENOMEM;
  if (nextra) {
    ex->extra_mem = malloc(mem + nextra * sizeof *ex->extra);
    if (ex->extra_mem == NULL) {
      free(ex);
      return -ENOMEM;
    }
    ex->extra = (tg_http_header_t *)ex->extra_mem;
    char *w = ex->extra_mem + nextra * sizeof *ex->extra;
    for (size_t i = 0; i < nextra; i++) {
      const tg_http_header_t *h = &extra_resp[i];
      memcpy(w, h->name, h->name_len);
      w[h->name_len] = '\0';
      ex->extra[i].name = w;
      ex->extra[i].name_len = h->name_len;
      w += h->name_len + 1;
      if (h->value_len)
        memcpy(w, h->value, h->value_len);
      w[h->value_len] = '\0';
      ex->extra[i].value = w;
      ex->extra[i].value_len = h->value_len;
      w += h->value_len + 1;
    }
    ex->nextra = nextra;
  }
  ex->p = p;
  ex->req = req;
  ex->o = o;
  ex->done = done;
  ex->ud = ud;
  ex->head = req->method == HTTP_HEAD;
  ex->idempotent = is_idempotent(req->method);
  TAILQ_INSERT_TAIL(&p->exchanges, ex, link);
  tg_http_stream_on_abort(req, on_client_abort, ex);
  ex_dispatch(ex);
  return 0;
}

void tg_proxy_free(tg_proxy_t *p) {
  if (p == NULL || p->closing)
    return;
  p->closing = 1;
  exchange_t *ex;
  while ((ex = TAILQ_FIRST(&p->exchanges)) != NULL) {
    tg_http_req_t *req = ex->req;
    ex->req = NULL;
    if (req && ex->state == EX_STREAMING) {
      tg_http_stream_end(req, false);
    } else if (req) {
      tg_http_stream_on_abort(req, NULL, NULL);
      tg_http_respond_json(req, 502, json_pack("{s:s, s:s}", "error", "bad gateway", "detail",
                                               "the proxy is stopping"));
      ex->sent_status = 502;
    }
    ex_finish(ex, -ECANCELED);
  }
  upconn_t *uc;
  while ((uc = TAILQ_FIRST(&p->conns)) != NULL)
    conn_close(uc);
  if (p->pending == 0)
    proxy_destroy(p);
}
