#include "net/client.h"
#include "net/url.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>

#include <llhttp.h>

#include "base/buf.h"
#include "net/tls.h"

#define DNS_TTL_MS 10000     /* resolved addresses are reused this long */
#define MAX_ADDRS 8          /* addresses kept per origin, tried in order */
#define MAX_RESP_HEADERS 128 /* more is a hostile or broken server: -EPROTO */
#define READ_BUF_SIZE 65536

typedef struct origin origin_t;
typedef struct conn conn_t;
typedef struct req req_t;

TAILQ_HEAD(req_list, req);
TAILQ_HEAD(conn_list, conn);

enum req_state {
  REQ_QUEUED,  /* in its origin's queue, waiting for a connection */
  REQ_ACTIVE,  /* sent (or being sent) on conn */
  REQ_FAILING, /* err decided; the timer delivers it on the next loop turn */
};

struct req {
  tg_httpc_t *c;
  origin_t *o;
  TAILQ_ENTRY(req) link;  /* c->reqs: every request whose callback has not run */
  TAILQ_ENTRY(req) qlink; /* o->queue while REQ_QUEUED */
  conn_t *conn;           /* while REQ_ACTIVE */
  uv_timer_t timer;       /* the whole-request deadline, or 0 ms to report err */
  tg_buf_t wire;          /* the serialized request, kept for a retry */
  tg_httpc_cb cb;
  void *ud;
  enum req_state state;
  int err;
  unsigned head : 1; /* HEAD: the response has no body whatever it says */
  unsigned idempotent : 1;
  unsigned retried : 1;
};

enum conn_state {
  CONN_CONNECTING, /* TCP connect in progress */
  CONN_HANDSHAKE,  /* TLS handshake in progress */
  CONN_IDLE,       /* in the pool */
  CONN_ACTIVE,     /* serving req */
  CONN_CLOSING,    /* handles closing; the memory goes when both are closed */
};

typedef struct header_ref {
  size_t name_off, name_len, value_off, value_len;
} header_ref_t;

/* A response being received; moved out of the connection when complete so
 * the connection can serve the next request while the callback runs. */
typedef struct response_buf {
  tg_buf_t text; /* header names and values, each NUL-terminated */
  tg_buf_t refs; /* header_ref_t array into text */
  tg_buf_t body;
} response_buf_t;

struct conn {
  uv_tcp_t tcp;
  uv_timer_t timer; /* connect + handshake deadline, then the idle lifetime */
  uv_connect_t connect;
  origin_t *o;
  TAILQ_ENTRY(conn) link;      /* o->conns */
  TAILQ_ENTRY(conn) idle_link; /* o->idle while CONN_IDLE */
  enum conn_state state;
  int open_handles;
  size_t addr_idx; /* which of o->addrs this connection dialed */
  tg_tls_t *tls;
  req_t *req;
  unsigned writes;         /* uv_write requests in flight */
  unsigned reused : 1;     /* a response was completed on it before */
  unsigned was_reused : 1; /* reused when the current request started */
  llhttp_t parser;
  response_buf_t resp;
  header_ref_t cur; /* header being parsed */
  int in_field;
  int status;
  size_t resp_bytes; /* bytes of the current response so far */
  int done;          /* the final response is complete */
  int keep_alive;
  int parse_err; /* set by parser callbacks: -EFBIG, -EPROTO, -ENOMEM */
};

struct origin {
  origin_t *next;
  tg_httpc_t *c;
  int tls;
  char *host; /* lower case, without brackets */
  uint16_t port;
  struct req_list queue;
  size_t queued;
  struct conn_list conns;
  struct conn_list idle; /* most recently used first */
  size_t nconns, nconnecting;
  struct sockaddr_storage addrs[MAX_ADDRS];
  size_t naddrs;
  size_t addr_next;     /* the address new connections dial first */
  uint64_t addrs_until; /* uv_now() expiry; 0 for IP literals (never) */
  uv_getaddrinfo_t gai;
  int resolving;
};

struct tg_httpc {
  uv_loop_t *loop;
  tg_httpc_opts_t opts;
  char *ca_file;
  tg_tls_ctx_t *tls; /* made on the first https request */
  origin_t *origins;
  struct req_list reqs;
  size_t pending; /* open handles + resolutions in flight: freed at 0 once closing */
  int closing;
  char last_error[256];
  char rbuf[READ_BUF_SIZE];
};

static void origin_dispatch(origin_t *o);
static void conn_close(conn_t *conn);
static void conn_fail(conn_t *conn, int err);

static void set_last_error(tg_httpc_t *c, const char *what, const char *detail) {
  snprintf(c->last_error, sizeof c->last_error, "%s%s%s", what, detail ? ": " : "",
           detail ? detail : "");
}

tg_httpc_t *tg_httpc_new(uv_loop_t *loop, const tg_httpc_opts_t *opts) {
  tg_httpc_t *c = calloc(1, sizeof *c);
  if (c == NULL)
    return NULL;
  c->loop = loop;
  if (opts)
    c->opts = *opts;
  if (c->opts.max_conns_per_origin == 0)
    c->opts.max_conns_per_origin = 64;
  if (c->opts.max_queue_per_origin == 0)
    c->opts.max_queue_per_origin = 1024;
  if (c->opts.connect_timeout_ms == 0)
    c->opts.connect_timeout_ms = 2000;
  if (c->opts.idle_timeout_ms == 0)
    c->opts.idle_timeout_ms = 60000;
  if (c->opts.max_response_bytes == 0)
    c->opts.max_response_bytes = 8u << 20;
  if (c->opts.ca_file) {
    c->ca_file = strdup(c->opts.ca_file);
    if (c->ca_file == NULL) {
      free(c);
      return NULL;
    }
  }
  c->opts.ca_file = c->ca_file;
  TAILQ_INIT(&c->reqs);
  return c;
}

static void client_destroy(tg_httpc_t *c) {
  origin_t *o = c->origins;
  while (o) {
    origin_t *next = o->next;
    free(o->host);
    free(o);
    o = next;
  }
  tg_tls_ctx_free(c->tls);
  free(c->ca_file);
  free(c);
}

static void client_unref(tg_httpc_t *c) {
  if (--c->pending == 0 && c->closing)
    client_destroy(c);
}

static void on_req_closed(uv_handle_t *h) {
  req_t *r = h->data;
  tg_httpc_t *c = r->c;
  tg_buf_free(&r->wire);
  free(r);
  client_unref(c);
}

static void queue_remove(req_t *r) {
  TAILQ_REMOVE(&r->o->queue, r, qlink);
  r->o->queued--;
}

/* Runs the callback (the request must be detached from queue and conn) and
 * releases the request. */
static void req_complete(req_t *r, int err, const tg_httpc_response_t *resp) {
  TAILQ_REMOVE(&r->c->reqs, r, link);
  uv_timer_stop(&r->timer);
  r->cb(err, resp, r->ud);
  uv_close((uv_handle_t *)&r->timer, on_req_closed);
}

/* Detaches r and reports err from the timer on the next loop turn, so no
 * callback ever runs inside tg_httpc_send or in the middle of our own
 * bookkeeping. The caller deals with r's connection. */
static void on_req_timer(uv_timer_t *t);
static void req_fail(req_t *r, int err) {
  if (r->state == REQ_QUEUED)
    queue_remove(r);
  if (r->conn) {
    r->conn->req = NULL;
    r->conn = NULL;
  }
  r->state = REQ_FAILING;
  r->err = err;
  uv_timer_start(&r->timer, on_req_timer, 0, 0);
}

static void on_req_timer(uv_timer_t *t) {
  req_t *r = t->data;
  if (r->state == REQ_FAILING) {
    req_complete(r, r->err, NULL);
    return;
  }
  origin_t *o = r->o;
  if (r->state == REQ_QUEUED) {
    queue_remove(r);
  } else {
    /* Mid-exchange: the connection's state is unknown, so it cannot be reused. */
    conn_t *conn = r->conn;
    conn->req = NULL;
    r->conn = NULL;
    conn_close(conn);
  }
  set_last_error(r->c, "request timed out", NULL);
  origin_dispatch(o);
  req_complete(r, UV_ETIMEDOUT, NULL);
}

static void fail_queue(origin_t *o, int err) {
  req_t *r;
  while ((r = TAILQ_FIRST(&o->queue)) != NULL)
    req_fail(r, err);
}

static void on_conn_closed(uv_handle_t *h) {
  conn_t *conn = h->data;
  tg_httpc_t *c = conn->o->c;
  if (--conn->open_handles == 0) {
    tg_tls_free(conn->tls);
    tg_buf_free(&conn->resp.text);
    tg_buf_free(&conn->resp.refs);
    tg_buf_free(&conn->resp.body);
    free(conn);
  }
  client_unref(c);
}

static void conn_close(conn_t *conn) {
  if (conn->state == CONN_CLOSING)
    return;
  origin_t *o = conn->o;
  TAILQ_REMOVE(&o->conns, conn, link);
  if (conn->state == CONN_IDLE)
    TAILQ_REMOVE(&o->idle, conn, idle_link);
  if (conn->state == CONN_CONNECTING || conn->state == CONN_HANDSHAKE)
    o->nconnecting--;
  o->nconns--;
  conn->state = CONN_CLOSING;
  uv_close((uv_handle_t *)&conn->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&conn->timer, on_conn_closed);
}

static void on_conn_timer(uv_timer_t *t) {
  conn_t *conn = t->data;
  origin_t *o = conn->o;
  if (conn->state == CONN_IDLE) {
    conn_close(conn);
    return;
  }
  set_last_error(o->c, "connect timed out", o->host);
  conn_fail(conn, UV_ETIMEDOUT);
}

typedef struct write_req {
  uv_write_t w;
  tg_buf_t buf;
  conn_t *conn;
} write_req_t;

static void on_write(uv_write_t *w, int status) {
  write_req_t *wr = (write_req_t *)w;
  conn_t *conn = wr->conn;
  tg_buf_free(&wr->buf);
  free(wr);
  conn->writes--;
  if (status < 0 && conn->state != CONN_CLOSING)
    conn_fail(conn, status);
}

/* Writes plaintext (NULL: only pending TLS output such as handshake
 * records). The buffer is owned by the write, whatever happens to the
 * request meanwhile. */
static int conn_write(conn_t *conn, const char *data, size_t len) {
  write_req_t *wr = calloc(1, sizeof *wr);
  if (wr == NULL)
    return -ENOMEM;
  int rc = 0;
  if (conn->tls) {
    if (data)
      rc = tg_tls_write(conn->tls, data, len);
    if (rc == 0)
      rc = tg_tls_take_output(conn->tls, &wr->buf);
  } else if (data) {
    rc = tg_buf_append(&wr->buf, data, len);
  }
  if (rc != 0 || wr->buf.len == 0) {
    tg_buf_free(&wr->buf);
    free(wr);
    return rc;
  }
  if (wr->buf.len > UINT_MAX) { /* uv_buf_t lengths are unsigned int */
    tg_buf_free(&wr->buf);
    free(wr);
    return -E2BIG;
  }
  wr->conn = conn;
  uv_buf_t b = uv_buf_init(wr->buf.data, (unsigned int)wr->buf.len);
  rc = uv_write(&wr->w, (uv_stream_t *)&conn->tcp, &b, 1, on_write);
  if (rc != 0) {
    tg_buf_free(&wr->buf);
    free(wr);
    return rc;
  }
  conn->writes++;
  return 0;
}

static void response_reset(conn_t *conn) {
  tg_buf_reset(&conn->resp.text);
  tg_buf_reset(&conn->resp.refs);
  tg_buf_reset(&conn->resp.body);
  conn->in_field = 0;
  conn->status = 0;
}

static const llhttp_settings_t parser_settings;

static void conn_start(conn_t *conn, req_t *r) {
  conn->state = CONN_ACTIVE;
  conn->req = r;
  conn->was_reused = conn->reused;
  r->conn = conn;
  r->state = REQ_ACTIVE;
  uv_timer_stop(&conn->timer);
  response_reset(conn);
  conn->resp_bytes = 0;
  conn->done = 0;
  conn->keep_alive = 0;
  conn->parse_err = 0;
  llhttp_init(&conn->parser, HTTP_RESPONSE, &parser_settings);
  conn->parser.data = conn;
  int rc = conn_write(conn, r->wire.data, r->wire.len);
  if (rc != 0)
    conn_fail(conn, rc);
}

static void conn_make_idle(conn_t *conn) {
  origin_t *o = conn->o;
  conn->state = CONN_IDLE;
  TAILQ_INSERT_HEAD(&o->idle, conn, idle_link);
  uv_timer_start(&conn->timer, on_conn_timer, o->c->opts.idle_timeout_ms, 0);
}

/* TCP connected and, for https, the handshake done: the connection joins the pool. */
static void conn_ready(conn_t *conn) {
  conn->o->nconnecting--;
  uv_timer_stop(&conn->timer);
  conn_make_idle(conn);
  origin_dispatch(conn->o);
}

static int addr_error(int err) {
  return err == UV_ECONNREFUSED || err == UV_ENETUNREACH || err == UV_EHOSTUNREACH ||
         err == UV_EADDRNOTAVAIL || err == UV_EAFNOSUPPORT;
}

/* A connection broke (connect, handshake, I/O or protocol error, or the peer
 * closed it): close it and settle its request. */
static void conn_fail(conn_t *conn, int err) {
  origin_t *o = conn->o;
  tg_httpc_t *c = o->c;
  enum conn_state state = conn->state;
  req_t *r = conn->req;
  conn_close(conn);
  if (c->closing)
    return;

  if (state == CONN_CONNECTING || state == CONN_HANDSHAKE) {
    /* Another address of the same name may work (e.g. "localhost" gives ::1
     * first while the server listens on 127.0.0.1). */
    if (state == CONN_CONNECTING && addr_error(err) && conn->addr_idx + 1 < o->naddrs) {
      if (o->addr_next <= conn->addr_idx)
        o->addr_next = conn->addr_idx + 1;
      origin_dispatch(o);
      return;
    }
    o->addr_next = 0;
    if (err == UV_EOF)
      err = UV_ECONNRESET;
    if (err != UV_ETIMEDOUT && err != -EPROTO)
      set_last_error(c, "connect failed", uv_strerror(err));
    /* The request that made us dial takes the error; the others get new
     * connections from dispatch. */
    req_t *head = TAILQ_FIRST(&o->queue);
    if (head)
      req_fail(head, err);
    origin_dispatch(o);
    return;
  }

  if (r == NULL)
    return;
  r->conn = NULL;
  conn->req = NULL;
  int closed = err == UV_EOF || err == UV_ECONNRESET || err == UV_EPIPE;
  /* The classic keep-alive race: the server closed a pooled connection just
   * as we sent on it. Nothing came back, so send once more on another, but
   * only what is safe to send twice: a POST may have been processed (money). */
  if (closed && conn->resp_bytes == 0 && !r->retried && r->idempotent) {
    r->retried = 1;
    /* Connections idle as long as that one are likely closed as well. */
    conn_t *idle;
    while ((idle = TAILQ_FIRST(&o->idle)) != NULL)
      conn_close(idle);
    r->state = REQ_QUEUED;
    TAILQ_INSERT_HEAD(&o->queue, r, qlink);
    o->queued++;
    origin_dispatch(o);
    return;
  }
  if (err == UV_EOF)
    err = UV_ECONNRESET;
  if (closed)
    set_last_error(c, "connection closed before the response was complete", o->host);
  req_fail(r, err);
  origin_dispatch(o);
}

/* The final response is complete: pool or close the connection, then run
 * the callback with the response moved out of the connection. */
static void conn_finish(conn_t *conn, int extra_bytes) {
  origin_t *o = conn->o;
  req_t *r = conn->req;
  response_buf_t resp = conn->resp;
  memset(&conn->resp, 0, sizeof conn->resp);
  int status = conn->status;
  r->conn = NULL;
  conn->req = NULL;
  /* Reuse only a connection in a known state: nothing unread, nothing
   * unsent (a server may answer before reading the whole body). */
  if (conn->keep_alive && !extra_bytes && conn->writes == 0) {
    conn->reused = 1;
    conn_make_idle(conn);
  } else {
    conn_close(conn);
  }
  origin_dispatch(o);

  size_t n = resp.refs.len / sizeof(header_ref_t);
  tg_http_header_t *headers = n ? calloc(n, sizeof *headers) : NULL;
  if (n && headers == NULL) {
    req_complete(r, -ENOMEM, NULL);
    goto out;
  }
  const header_ref_t *refs = (const header_ref_t *)resp.refs.data;
  for (size_t i = 0; i < n; i++) {
    headers[i].name = resp.text.data + refs[i].name_off;
    headers[i].name_len = refs[i].name_len;
    headers[i].value = resp.text.data + refs[i].value_off;
    headers[i].value_len = refs[i].value_len;
  }
  tg_httpc_response_t out = {
      .status = status,
      .headers = headers,
      .nheaders = n,
      .body = resp.body.data ? resp.body.data : "",
      .body_len = resp.body.len,
  };
  req_complete(r, 0, &out);
  free(headers);
out:
  tg_buf_free(&resp.text);
  tg_buf_free(&resp.refs);
  tg_buf_free(&resp.body);
}

static int on_message_begin(llhttp_t *p) {
  response_reset(p->data);
  return 0;
}

static int on_header_field(llhttp_t *p, const char *at, size_t len) {
  conn_t *conn = p->data;
  if (!conn->in_field) {
    conn->in_field = 1;
    conn->cur.name_off = conn->resp.text.len;
  }
  if (tg_buf_append(&conn->resp.text, at, len) != 0) {
    conn->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_header_field_complete(llhttp_t *p) {
  conn_t *conn = p->data;
  if (!conn->in_field) { /* an empty name */
    conn->parse_err = -EPROTO;
    return -1;
  }
  conn->in_field = 0;
  conn->cur.name_len = conn->resp.text.len - conn->cur.name_off;
  if (tg_buf_append(&conn->resp.text, "", 1) != 0) {
    conn->parse_err = -ENOMEM;
    return -1;
  }
  conn->cur.value_off = conn->resp.text.len;
  return 0;
}

static int on_header_value(llhttp_t *p, const char *at, size_t len) {
  conn_t *conn = p->data;
  if (tg_buf_append(&conn->resp.text, at, len) != 0) {
    conn->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_header_value_complete(llhttp_t *p) {
  conn_t *conn = p->data;
  conn->cur.value_len = conn->resp.text.len - conn->cur.value_off;
  if (conn->resp.refs.len / sizeof(header_ref_t) >= MAX_RESP_HEADERS) {
    conn->parse_err = -EPROTO;
    return -1;
  }
  if (tg_buf_append(&conn->resp.text, "", 1) != 0 ||
      tg_buf_append(&conn->resp.refs, &conn->cur, sizeof conn->cur) != 0) {
    conn->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  conn_t *conn = p->data;
  conn->status = p->status_code;
  if (conn->status == 101) { /* we never ask to switch protocols */
    conn->parse_err = -EPROTO;
    return -1;
  }
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > conn->o->c->opts.max_response_bytes) {
    conn->parse_err = -EFBIG;
    return -1;
  }
  /* A HEAD response announces a body it does not send. */
  if (conn->status >= 200 && conn->req && conn->req->head)
    return 1;
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  conn_t *conn = p->data;
  if (tg_buf_append(&conn->resp.body, at, len) != 0) {
    conn->parse_err = -ENOMEM;
    return -1;
  }
  return 0;
}

static int on_message_complete(llhttp_t *p) {
  conn_t *conn = p->data;
  if (conn->status < 200) /* 1xx: informational, the real response follows */
    return 0;
  conn->done = 1;
  conn->keep_alive = llhttp_should_keep_alive(p);
  return HPE_PAUSED; /* stop at the end of this response */
}

static const llhttp_settings_t parser_settings = {
    .on_message_begin = on_message_begin,
    .on_header_field = on_header_field,
    .on_header_field_complete = on_header_field_complete,
    .on_header_value = on_header_value,
    .on_header_value_complete = on_header_value_complete,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

/* Plaintext from the server. */
static void conn_on_data(conn_t *conn, const char *data, size_t len) {
  tg_httpc_t *c = conn->o->c;
  if (conn->state != CONN_ACTIVE) {
    /* Nothing is expected while no request is out: the state is unknown now. */
    if (conn->state == CONN_IDLE)
      conn_close(conn);
    else
      conn_fail(conn, -EPROTO);
    return;
  }
  conn->resp_bytes += len;
  if (conn->resp_bytes > c->opts.max_response_bytes) {
    set_last_error(c, "response too large", NULL);
    conn_fail(conn, -EFBIG);
    return;
  }
  llhttp_errno_t rc = llhttp_execute(&conn->parser, data, len);
  if (rc == HPE_OK)
    return;
  if (rc == HPE_PAUSED && conn->done) {
    const char *end = llhttp_get_error_pos(&conn->parser);
    conn_finish(conn, end != NULL && end < data + len);
    return;
  }
  int err = conn->parse_err ? conn->parse_err : -EPROTO;
  if (err == -EFBIG)
    set_last_error(c, "response too large", NULL);
  else if (err == -EPROTO)
    set_last_error(c, "bad HTTP response", llhttp_get_error_reason(&conn->parser));
  conn_fail(conn, err);
}

/* The server closed (TCP EOF or TLS close_notify). */
static void conn_on_eof(conn_t *conn) {
  if (conn->state == CONN_ACTIVE && conn->resp_bytes > 0) {
    /* A body delimited by the end of the connection ends here. */
    llhttp_finish(&conn->parser);
    if (conn->done) {
      conn->keep_alive = 0;
      conn_finish(conn, 0);
      return;
    }
  }
  if (conn->state == CONN_IDLE)
    conn_close(conn);
  else
    conn_fail(conn, UV_EOF);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  conn_t *conn = h->data;
  (void)suggested;
  /* One loop thread: a single buffer per client serves every read. */
  *buf = uv_buf_init(conn->o->c->rbuf, sizeof conn->o->c->rbuf);
}

static void on_tls_data(conn_t *conn, const char *data, size_t len) {
  tg_httpc_t *c = conn->o->c;
  if (tg_tls_feed(conn->tls, data, len) != 0) {
    conn_fail(conn, -ENOMEM);
    return;
  }
  /* The ciphertext is copied: c->rbuf can take the plaintext. */
  for (;;) {
    int n = tg_tls_read(conn->tls, c->rbuf, sizeof c->rbuf);
    if (n > 0) {
      conn_on_data(conn, c->rbuf, (size_t)n);
      if (conn->state == CONN_CLOSING)
        return;
      continue;
    }
    int rc = conn_write(conn, NULL, 0); /* handshake records, alerts */
    if (n == TG_TLS_CLOSED) {
      conn_on_eof(conn);
      return;
    }
    if (n < 0) {
      set_last_error(c, "TLS", tg_tls_error(conn->tls));
      conn_fail(conn, n == -ENOMEM ? -ENOMEM : -EPROTO);
      return;
    }
    if (rc != 0) {
      conn_fail(conn, rc);
      return;
    }
    break;
  }
  if (conn->state == CONN_HANDSHAKE && tg_tls_handshake_done(conn->tls))
    conn_ready(conn);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn_t *conn = s->data;
  if (conn->state == CONN_CLOSING || nread == 0)
    return;
  if (nread < 0) {
    if (nread == UV_EOF)
      conn_on_eof(conn);
    else
      conn_fail(conn, (int)nread);
    return;
  }
  if (conn->tls)
    on_tls_data(conn, buf->base, (size_t)nread);
  else
    conn_on_data(conn, buf->base, (size_t)nread);
}

static void on_connect(uv_connect_t *creq, int status) {
  conn_t *conn = creq->data;
  if (conn->state == CONN_CLOSING)
    return;
  if (status < 0) {
    conn_fail(conn, status);
    return;
  }
  tg_httpc_t *c = conn->o->c;
  uv_tcp_nodelay(&conn->tcp, 1);
  int rc = uv_read_start((uv_stream_t *)&conn->tcp, on_alloc, on_read);
  if (rc != 0) {
    conn_fail(conn, rc);
    return;
  }
  if (!conn->o->tls) {
    conn_ready(conn);
    return;
  }
  conn->state = CONN_HANDSHAKE;
  conn->tls = tg_tls_new(c->tls, conn->o->host);
  if (conn->tls == NULL) {
    conn_fail(conn, -ENOMEM);
    return;
  }
  on_tls_data(conn, NULL, 0); /* produces the ClientHello */
}

/* Opens a connection to o; it joins the pool once ready. */
static int conn_dial(origin_t *o) {
  tg_httpc_t *c = o->c;
  conn_t *conn = calloc(1, sizeof *conn);
  if (conn == NULL)
    return -ENOMEM;
  conn->o = o;
  conn->addr_idx = o->addr_next < o->naddrs ? o->addr_next : 0;
  uv_tcp_init(c->loop, &conn->tcp);
  uv_timer_init(c->loop, &conn->timer);
  conn->tcp.data = conn->timer.data = conn->connect.data = conn;
  conn->open_handles = 2;
  c->pending += 2;
  conn->state = CONN_CONNECTING;
  TAILQ_INSERT_TAIL(&o->conns, conn, link);
  o->nconns++;
  o->nconnecting++;
  int rc = uv_tcp_connect(&conn->connect, &conn->tcp,
                          (const struct sockaddr *)&o->addrs[conn->addr_idx], on_connect);
  if (rc != 0) {
    conn_close(conn);
    return rc;
  }
  uv_timer_start(&conn->timer, on_conn_timer, c->opts.connect_timeout_ms, 0);
  return 0;
}

static void on_resolved(uv_getaddrinfo_t *gai, int status, struct addrinfo *res) {
  origin_t *o = gai->data;
  tg_httpc_t *c = o->c;
  o->resolving = 0;
  if (c->closing) {
    uv_freeaddrinfo(res);
    client_unref(c);
    return;
  }
  client_unref(c);
  if (status == 0) {
    o->naddrs = 0;
    for (struct addrinfo *ai = res; ai && o->naddrs < MAX_ADDRS; ai = ai->ai_next) {
      if ((ai->ai_family == AF_INET || ai->ai_family == AF_INET6) &&
          ai->ai_addrlen <= sizeof o->addrs[0])
        memcpy(&o->addrs[o->naddrs++], ai->ai_addr, ai->ai_addrlen);
    }
    o->addr_next = 0;
    o->addrs_until = uv_now(c->loop) + DNS_TTL_MS;
    if (o->naddrs == 0)
      status = UV_EAI_NONAME;
  }
  uv_freeaddrinfo(res);
  if (status != 0) {
    o->naddrs = 0;
    set_last_error(c, "resolving host failed", uv_strerror(status));
    fail_queue(o, status);
    return;
  }
  origin_dispatch(o);
}

static int origin_resolve(origin_t *o) {
  tg_httpc_t *c = o->c;
  if (o->resolving)
    return 0;
  char port[8];
  snprintf(port, sizeof port, "%u", o->port);
  struct addrinfo hints = {
      .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
  o->gai.data = o;
  int rc = uv_getaddrinfo(c->loop, &o->gai, on_resolved, o->host, port, &hints);
  if (rc != 0)
    return rc;
  o->resolving = 1;
  c->pending++;
  return 0;
}

static int addrs_fresh(const origin_t *o) {
  return o->naddrs > 0 && (o->addrs_until == 0 || uv_now(o->c->loop) < o->addrs_until);
}

/* Matches waiting requests with pooled connections and opens more
 * connections, up to the limit, for the requests still waiting. */
static void origin_dispatch(origin_t *o) {
  tg_httpc_t *c = o->c;
  if (c->closing)
    return;
  while (!TAILQ_EMPTY(&o->queue) && !TAILQ_EMPTY(&o->idle)) {
    conn_t *conn = TAILQ_FIRST(&o->idle);
    req_t *r = TAILQ_FIRST(&o->queue);
    TAILQ_REMOVE(&o->idle, conn, idle_link);
    queue_remove(r);
    conn_start(conn, r);
  }
  if (o->queued <= o->nconnecting || o->nconns >= c->opts.max_conns_per_origin)
    return;
  if (o->tls && c->tls == NULL) {
    char err[192];
    c->tls = tg_tls_client_ctx_new(c->ca_file, err, sizeof err);
    if (c->tls == NULL) {
      set_last_error(c, "TLS setup failed", err);
      fail_queue(o, -EPROTO);
      return;
    }
  }
  if (!addrs_fresh(o)) {
    int rc = origin_resolve(o);
    if (rc != 0) {
      set_last_error(c, "resolving host failed", uv_strerror(rc));
      fail_queue(o, rc);
    }
    return;
  }
  while (o->queued > o->nconnecting && o->nconns < c->opts.max_conns_per_origin) {
    int rc = conn_dial(o);
    if (rc != 0) {
      set_last_error(c, "connect failed", uv_strerror(rc));
      req_fail(TAILQ_FIRST(&o->queue), rc);
    }
  }
}

static origin_t *origin_get(tg_httpc_t *c, int tls, const char *host, size_t host_len,
                            uint16_t port) {
  for (origin_t *o = c->origins; o; o = o->next)
    if (o->tls == tls && o->port == port && strlen(o->host) == host_len &&
        strncasecmp(o->host, host, host_len) == 0)
      return o;
  origin_t *o = calloc(1, sizeof *o);
  if (o == NULL)
    return NULL;
  o->host = strndup(host, host_len);
  if (o->host == NULL) {
    free(o);
    return NULL;
  }
  for (char *p = o->host; *p; p++)
    if (*p >= 'A' && *p <= 'Z')
      *p = (char)(*p - 'A' + 'a');
  o->c = c;
  o->tls = tls;
  o->port = port;
  TAILQ_INIT(&o->queue);
  TAILQ_INIT(&o->conns);
  TAILQ_INIT(&o->idle);
  /* IP literals need no resolver and never expire. */
  struct sockaddr_in *sin = (struct sockaddr_in *)&o->addrs[0];
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&o->addrs[0];
  if (inet_pton(AF_INET, o->host, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons(port);
    o->naddrs = 1;
  } else if (inet_pton(AF_INET6, o->host, &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons(port);
    o->naddrs = 1;
  }
  o->next = c->origins;
  c->origins = o;
  return o;
}

static int is_token(const char *s, size_t len) {
  if (len == 0)
    return 0;
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch <= 0x20 || ch >= 0x7f || strchr("\"(),/:;<=>?@[\\]{}", ch))
      return 0;
  }
  return 1;
}

static int is_field_value(const char *s, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (s[i] == '\r' || s[i] == '\n' || s[i] == '\0')
      return 0;
  return 1;
}

static int name_is(const tg_http_header_t *h, const char *name) {
  return h->name_len == strlen(name) && strncasecmp(h->name, name, h->name_len) == 0;
}

static int build_request(tg_buf_t *b, const tg_httpc_request_t *req, const tg_url_t *u) {
  int rc = tg_buf_printf(b, "%s ", req->method);
  if (rc == 0 && (u->target_len == 0 || u->target[0] == '?'))
    rc = tg_buf_puts(b, "/");
  if (rc == 0)
    rc = tg_buf_append(b, u->target, u->target_len);
  if (rc == 0)
    rc = tg_buf_puts(b, u->bracketed ? " HTTP/1.1\r\nHost: [" : " HTTP/1.1\r\nHost: ");
  if (rc == 0)
    rc = tg_buf_append(b, u->host, u->host_len);
  if (rc == 0 && u->bracketed)
    rc = tg_buf_puts(b, "]");
  if (rc == 0 && u->port != (u->tls ? 443 : 80))
    rc = tg_buf_printf(b, ":%u", u->port);
  if (rc == 0)
    rc = tg_buf_puts(b, "\r\n");
  int has_ua = 0;
  for (size_t i = 0; rc == 0 && i < req->nheaders; i++) {
    const tg_http_header_t *h = &req->headers[i];
    /* We frame the message ourselves. */
    if (name_is(h, "host") || name_is(h, "content-length") || name_is(h, "transfer-encoding"))
      continue;
    has_ua |= name_is(h, "user-agent");
    /* Appended by length: a printf precision is an int. */
    rc = tg_buf_append(b, h->name, h->name_len);
    if (rc == 0)
      rc = tg_buf_append(b, ": ", 2);
    if (rc == 0)
      rc = tg_buf_append(b, h->value, h->value_len);
    if (rc == 0)
      rc = tg_buf_append(b, "\r\n", 2);
  }
  if (rc == 0 && !has_ua)
    rc = tg_buf_puts(b, "User-Agent: tollgate\r\n");
  int wants_length = req->body_len > 0 || strcmp(req->method, "POST") == 0 ||
                     strcmp(req->method, "PUT") == 0 || strcmp(req->method, "PATCH") == 0;
  if (rc == 0 && wants_length)
    rc = tg_buf_printf(b, "Content-Length: %zu\r\n", req->body_len);
  if (rc == 0)
    rc = tg_buf_puts(b, "\r\n");
  if (rc == 0 && req->body_len)
    rc = tg_buf_append(b, req->body, req->body_len);
  return rc;
}

int tg_httpc_send(tg_httpc_t *c, const tg_httpc_request_t *req, tg_httpc_cb cb, void *ud) {
  if (c->closing)
    return -ECANCELED;
  if (req == NULL || cb == NULL || req->method == NULL || req->url == NULL ||
      !is_token(req->method, strlen(req->method)) || (req->body_len && req->body == NULL) ||
      (req->nheaders && req->headers == NULL))
    return -EINVAL;
  for (size_t i = 0; i < req->nheaders; i++) {
    const tg_http_header_t *h = &req->headers[i];
    if (!is_token(h->name, h->name_len) || !is_field_value(h->value, h->value_len))
      return -EINVAL;
  }
  tg_url_t u;
  int rc = tg_url_parse(req->url, &u);
  if (rc != 0)
    return rc;
  origin_t *o = origin_get(c, u.tls, u.host, u.host_len, u.port);
  if (o == NULL)
    return -ENOMEM;

  req_t *r = calloc(1, sizeof *r);
  if (r == NULL)
    return -ENOMEM;
  rc = build_request(&r->wire, req, &u);
  if (rc != 0) {
    tg_buf_free(&r->wire);
    free(r);
    return rc;
  }
  r->c = c;
  r->o = o;
  r->cb = cb;
  r->ud = ud;
  const char *m = req->method;
  r->head = strcmp(m, "HEAD") == 0;
  r->idempotent = r->head || strcmp(m, "GET") == 0 || strcmp(m, "PUT") == 0 ||
                  strcmp(m, "DELETE") == 0 || strcmp(m, "OPTIONS") == 0 || strcmp(m, "TRACE") == 0 ||
                  req->idempotent;
  uv_timer_init(c->loop, &r->timer);
  r->timer.data = r;
  c->pending++;
  TAILQ_INSERT_TAIL(&c->reqs, r, link);
  r->state = REQ_QUEUED;
  TAILQ_INSERT_TAIL(&o->queue, r, qlink);
  o->queued++;
  if (o->queued > c->opts.max_queue_per_origin) {
    set_last_error(c, "request queue full", o->host);
    req_fail(r, -EBUSY);
    return 0;
  }
  uv_timer_start(&r->timer, on_req_timer, req->timeout_ms ? req->timeout_ms : 30000, 0);
  origin_dispatch(o);
  return 0;
}

void tg_httpc_free(tg_httpc_t *c) {
  if (c == NULL || c->closing)
    return;
  c->closing = 1;
  for (origin_t *o = c->origins; o; o = o->next)
    if (o->resolving)
      uv_cancel((uv_req_t *)&o->gai); /* its callback still runs and drops the ref */
  req_t *r;
  while ((r = TAILQ_FIRST(&c->reqs)) != NULL) {
    if (r->state == REQ_QUEUED)
      queue_remove(r);
    if (r->conn) {
      r->conn->req = NULL;
      r->conn = NULL;
    }
    req_complete(r, r->state == REQ_FAILING ? r->err : -ECANCELED, NULL);
  }
  for (origin_t *o = c->origins; o; o = o->next) {
    conn_t *conn;
    while ((conn = TAILQ_FIRST(&o->conns)) != NULL)
      conn_close(conn);
  }
  if (c->pending == 0)
    client_destroy(c);
}

const char *tg_httpc_strerror(int err) {
  switch (err) {
  case 0:
    return "ok";
  case -EFBIG:
    return "response too large";
  case -EPROTO:
    return "protocol error (bad HTTP response or TLS failure)";
  case -ECANCELED:
    return "request cancelled";
  case -EBUSY:
    return "too many requests waiting for a connection";
  case UV_ETIMEDOUT:
    return "timed out";
  default:
    return uv_strerror(err);
  }
}

const char *tg_httpc_last_error(const tg_httpc_t *c) { return c->last_error; }

const tg_http_header_t *tg_httpc_header(const tg_httpc_response_t *resp, const char *name) {
  for (size_t i = 0; i < resp->nheaders; i++)
    if (name_is(&resp->headers[i], name))
      return &resp->headers[i];
  return NULL;
}
