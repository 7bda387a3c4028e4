#ifndef TG_HTTP_STUB_H
#define TG_HTTP_STUB_H

/* A loopback HTTP/1.1 server for unit tests, on the test's own libuv loop:
 * it listens on 127.0.0.1 (port 0: a free one, read back into port), reads
 * requests with Content-Length bodies (no chunked), and hands each to the
 * test's handler, which fills the reply: a status, extra headers, a body, a
 * delay, or an action (close without an answer, hang forever). Keep-alive:
 * one request at a time per connection, the next is read once the answer is
 * out (a hung connection reads no more). Test processes only; header-only,
 * included by one test. */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <netinet/in.h>

#include <uv.h>

#define HTTP_STUB_MAX_HEADERS 32
#define HTTP_STUB_BUF 65536 /* a request larger than this closes the connection */

typedef struct http_stub_header {
  const char *name, *value; /* value trimmed of surrounding blanks */
} http_stub_header_t;

/* Valid only during the handler call. body is NUL-terminated (not counted). */
typedef struct http_stub_req {
  const char *method, *path;
  http_stub_header_t headers[HTTP_STUB_MAX_HEADERS];
  int nheaders;
  const char *body;
  size_t body_len;
} http_stub_req_t;

typedef enum {
  HTTP_STUB_ANSWER = 0, /* send the reply (after delay_ms) */
  HTTP_STUB_CLOSE,      /* close the connection without an answer (after delay_ms) */
  HTTP_STUB_HANG,       /* never answer; the connection stays open */
} http_stub_action_t;

/* Filled by the handler; use the helpers for headers and body (they copy). */
typedef struct http_stub_reply {
  int status; /* 0: 200 */
  uint32_t delay_ms;
  http_stub_action_t action;
  char headers[2048]; /* "Name: value\r\n" lines, Content-Length is added */
  size_t headers_len;
  char *body; /* owned by the stub */
  size_t body_len;
} http_stub_reply_t;

/* ud is the pointer given to http_stub_start. */
typedef void (*http_stub_handler_t)(void *ud, const http_stub_req_t *req, http_stub_reply_t *rep);

typedef struct http_stub_conn http_stub_conn_t;

typedef struct http_stub {
  uv_loop_t *loop;
  uv_tcp_t listener;
  bool running;
  int port;
  int hits; /* complete requests read, whatever their answer */
  http_stub_handler_t handler;
  void *ud;
  http_stub_conn_t *conns;
} http_stub_t;

struct http_stub_conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  http_stub_t *s; /* NULL once the stub is stopped */
  http_stub_conn_t *next;
  int handles;
  bool busy, closing;
  char *out; /* a delayed answer */
  size_t out_len;
  http_stub_action_t out_action;
  size_t len;
  char buf[HTTP_STUB_BUF];
};

/* The value of a request header (case-insensitive name), or NULL. */
static inline const char *http_stub_header(const http_stub_req_t *q, const char *name) {
  for (int i = 0; i < q->nheaders; i++)
    if (strcasecmp(q->headers[i].name, name) == 0)
      return q->headers[i].value;
  return NULL;
}

/* Adds "name: value" to the reply; -1 when it does not fit. */
static inline int http_stub_reply_header(http_stub_reply_t *r, const char *name, const char *value) {
  size_t room = sizeof r->headers - r->headers_len;
  int n = snprintf(r->headers + r->headers_len, room, "%s: %s\r\n", name, value);
  if (n < 0 || (size_t)n >= room) {
    r->headers[r->headers_len] = '\0';
    return -1;
  }
  r->headers_len += (size_t)n;
  return 0;
}

/* Sets the reply body to a copy of len bytes. */
static inline void http_stub_reply_body(http_stub_reply_t *r, const void *data, size_t len) {
  free(r->body);
  r->body = malloc(len + 1);
  if (len)
    memcpy(r->body, data, len);
  r->body[len] = '\0';
  r->body_len = len;
}

static inline void http_stub_reply_text(http_stub_reply_t *r, const char *text) {
  http_stub_reply_body(r, text ? text : "", text ? strlen(text) : 0);
}

static void http_stub__closed(uv_handle_t *h) {
  http_stub_conn_t *c = h->data;
  if (--c->handles > 0)
    return;
  if (c->s)
    for (http_stub_conn_t **q = &c->s->conns; *q; q = &(*q)->next)
      if (*q == c) {
        *q = c->next;
        break;
      }
  free(c->out);
  free(c);
}

static void http_stub__close(http_stub_conn_t *c) {
  if (c->closing)
    return;
  c->closing = true;
  uv_close((uv_handle_t *)&c->tcp, http_stub__closed);
  uv_close((uv_handle_t *)&c->timer, http_stub__closed);
}

static void http_stub__written(uv_write_t *w, int status) {
  (void)status;
  free(w->data);
  free(w);
}

/* Sends (or, for CLOSE, drops) a built answer; takes out. */
static void http_stub__finish(http_stub_conn_t *c, char *out, size_t len, http_stub_action_t action) {
  if (action == HTTP_STUB_CLOSE || c->closing) {
    free(out);
    http_stub__close(c);
    return;
  }
  uv_write_t *w = malloc(sizeof *w);
  w->data = out;
  uv_buf_t b = uv_buf_init(out, (unsigned)len);
  if (uv_write(w, (uv_stream_t *)&c->tcp, &b, 1, http_stub__written) != 0) {
    free(out);
    free(w);
    http_stub__close(c);
  }
}

/* Splits a request head (NUL-terminated, CRLF lines) in place into q. */
static void http_stub__parse_head(char *head, http_stub_req_t *q) {
  char *eol = strstr(head, "\r\n");
  if (eol)
    *eol = '\0';
  q->method = head;
  char *sp = strchr(head, ' ');
  q->path = "";
  if (sp) {
    *sp = '\0';
    q->path = sp + 1;
    char *sp2 = strchr(sp + 1, ' ');
    if (sp2)
      *sp2 = '\0';
  }
  for (char *l = eol ? eol + 2 : NULL; l && *l; l = eol ? eol + 2 : NULL) {
    eol = strstr(l, "\r\n");
    if (eol)
      *eol = '\0';
    char *colon = strchr(l, ':');
    if (colon == NULL || q->nheaders == HTTP_STUB_MAX_HEADERS)
      continue;
    *colon = '\0';
    char *v = colon + 1, *e = v + strlen(v);
    while (*v == ' ' || *v == '\t')
      v++;
    while (e > v && (e[-1] == ' ' || e[-1] == '\t'))
      *--e = '\0';
    q->headers[q->nheaders++] = (http_stub_header_t){l, v};
  }
}

static void http_stub__drain(http_stub_conn_t *c);

static void http_stub__delayed(uv_timer_t *t) {
  http_stub_conn_t *c = t->data;
  char *out = c->out;
  c->out = NULL;
  c->busy = false;
  http_stub__finish(c, out, c->out_len, c->out_action);
  http_stub__drain(c);
}

/* Reads, handles and answers the next complete request. false when there is
 * none yet, or the connection now waits (delay, hang) or is closing. */
static bool http_stub__next(http_stub_conn_t *c) {
  char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
  if (end == NULL)
    return false;
  size_t head = (size_t)(end - c->buf) + 4, clen = 0;
  for (char *l = memchr(c->buf, '\n', head); l && l < end; l = memchr(l + 1, '\n', (size_t)(end - l)))
    if (strncasecmp(l + 1, "content-length:", 15) == 0)
      clen = strtoul(l + 16, NULL, 10);
  if (clen > sizeof c->buf || c->len < head + clen)
    return false;
  http_stub_t *s = c->s;
  char *copy = malloc(head + clen + 1);
  memcpy(copy, c->buf, head + clen);
  copy[head - 2] = '\0'; /* the head ends at its last CRLF */
  copy[head + clen] = '\0';
  memmove(c->buf, c->buf + head + clen, c->len - head - clen);
  c->len -= head + clen;
  http_stub_req_t q = {.body = copy + head, .body_len = clen};
  http_stub__parse_head(copy, &q);
  http_stub_reply_t r = {.action = HTTP_STUB_ANSWER};
  s->hits++;
  if (s->handler)
    s->handler(s->ud, &q, &r);
  else
    r.status = 404;
  free(copy);
  if (r.action == HTTP_STUB_HANG) {
    free(r.body);
    c->busy = true;
    return false;
  }
  char *out = NULL;
  size_t out_len = 0;
  if (r.action == HTTP_STUB_ANSWER) {
    size_t cap = r.headers_len + r.body_len + 128;
    out = malloc(cap);
    int n = snprintf(out, cap, "HTTP/1.1 %d X\r\n%sContent-Length: %zu\r\n\r\n", r.status ? r.status : 200,
                     r.headers_len ? r.headers : "", r.body_len);
    if (r.body_len)
      memcpy(out + n, r.body, r.body_len);
    out_len = (size_t)n + r.body_len;
  }
  free(r.body);
  if (r.delay_ms) {
    c->busy = true;
    c->out = out;
    c->out_len = out_len;
    c->out_action = r.action;
    uv_timer_start(&c->timer, http_stub__delayed, r.delay_ms, 0);
    return false;
  }
  http_stub__finish(c, out, out_len, r.action);
  return !c->closing;
}

static void http_stub__drain(http_stub_conn_t *c) {
  while (!c->busy && !c->closing && c->s && http_stub__next(c))
    ;
}

static void http_stub__alloc(uv_handle_t *h, size_t hint, uv_buf_t *b) {
  http_stub_conn_t *c = h->data;
  (void)hint;
  *b = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len));
}

static void http_stub__read(uv_stream_t *st, ssize_t n, const uv_buf_t *b) {
  http_stub_conn_t *c = st->data;
  (void)b;
  if (n < 0 || c->len + (size_t)n >= sizeof c->buf) {
    http_stub__close(c);
    return;
  }
  c->len += (size_t)n;
  http_stub__drain(c);
}

static void http_stub__accept(uv_stream_t *l, int status) {
  http_stub_t *s = l->data;
  if (status != 0 || !s->running)
    return;
  http_stub_conn_t *c = calloc(1, sizeof *c);
  c->s = s;
  uv_tcp_init(s->loop, &c->tcp);
  uv_timer_init(s->loop, &c->timer);
  c->tcp.data = c->timer.data = c;
  c->handles = 2;
  c->next = s->conns;
  s->conns = c;
  if (uv_accept(l, (uv_stream_t *)&c->tcp) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, http_stub__alloc, http_stub__read) != 0)
    http_stub__close(c);
}

/* Listens on 127.0.0.1 with a free port (s->port). handler may be NULL (all
 * 404). 0, or a libuv error (then run the loop to close what was opened). */
static int http_stub_start(http_stub_t *s, uv_loop_t *loop, http_stub_handler_t handler, void *ud) {
  memset(s, 0, sizeof *s);
  s->loop = loop;
  s->handler = handler;
  s->ud = ud;
  struct sockaddr_in sin;
  uv_ip4_addr("127.0.0.1", 0, &sin);
  int rc = uv_tcp_init(loop, &s->listener);
  if (rc != 0)
    return rc;
  s->listener.data = s;
  if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&sin, 0)) != 0 ||
      (rc = uv_listen((uv_stream_t *)&s->listener, 64, http_stub__accept)) != 0) {
    uv_close((uv_handle_t *)&s->listener, NULL);
    return rc;
  }
  int sl = sizeof sin;
  uv_tcp_getsockname(&s->listener, (struct sockaddr *)&sin, &sl);
  s->port = ntohs(sin.sin_port);
  s->running = true;
  return 0;
}

/* Closes the listener and every connection (answers still delayed are
 * dropped). Safe with connections open, twice, or on a stub never started
 * (zeroed); s must stay valid until the loop has run its close callbacks. */
static void http_stub_stop(http_stub_t *s) {
  if (!s->running)
    return;
  s->running = false;
  uv_close((uv_handle_t *)&s->listener, NULL);
  for (http_stub_conn_t *c = s->conns, *next; c; c = next) {
    next = c->next;
    c->s = NULL;
    http_stub__close(c);
  }
  s->conns = NULL;
}

#endif
