#include "net/server.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <llhttp.h>

#include "base/buf.h"
#include "net/target.h"
#include "net/tls.h"

#define MAX_HEADERS 100
#define READ_BUF_SIZE 65536
#define WORKER_STACK_BYTES (8u << 20)
/* Output a client may leave unread before we stop reading its requests: a
 * few large answers or a few thousand small ones, and a bounded cost for a
 * client that pipelines and never reads. */
#define MAX_UNSENT_BYTES (256 * 1024)
/* One write call's share: uv_buf_t lengths are unsigned int and uv_try_write
 * answers an int. */
#define MAX_WRITE ((size_t)1 << 30)

typedef struct worker_priv worker_priv_t;
typedef struct conn conn_t;

/* What the connection's deadline currently guards. PHASE_SEND: between
 * requests, with output the client is not reading; the connection goes when
 * no write makes progress for idle_timeout_ms (nginx's send_timeout), or a
 * client that never reads would hold its slot forever. */
enum conn_phase { PHASE_IDLE, PHASE_HEAD, PHASE_BODY, PHASE_WAIT, PHASE_SEND };

/* A streamed answer may hold this much output (taken, not yet written to
 * the socket) before tg_http_stream_write asks its producer to pause, and is
 * told to go on once its output is down to the low mark. */
#define STREAM_HIGH_WATER (256 * 1024)
#define STREAM_LOW_WATER (64 * 1024)

typedef struct req_priv {
  tg_http_req_t pub;      /* first: handlers see only this part */
  conn_t *conn;           /* NULL once the connection is gone (answer dropped) */
  struct req_priv *next;  /* answer queue of the connection, in request order */
  tg_buf_t out;           /* serialized answer, while earlier ones are still pending */
  unsigned done : 1;      /* answer serialized */
  unsigned keep_alive : 1;
  unsigned head_method : 1;
  /* A streamed answer (tg_http_stream_start): its head and the body so far
   * go to out while earlier answers are pending, to the connection's write
   * buffer once it is the oldest. */
  unsigned streaming : 1;
  unsigned chunked : 1;     /* body framed as chunks */
  unsigned close_delim : 1; /* body ends with the connection (HTTP/1.0, length unknown) */
  unsigned no_body : 1;     /* HEAD, 204, 304: body bytes are dropped */
  unsigned want_drain : 1;  /* a write answered 1: tell the producer when output is low */
  unsigned in_notify : 1;   /* on the worker's notify list */
  int stream_status;        /* a streamed answer's status, for on_answered */
  uint64_t stream_bytes;    /* and its body bytes so far */
  int64_t cl_left;          /* body bytes still owed under Content-Length; -1 when not framed so */
  void (*on_drain)(void *ud);
  void *drain_ud;
  void (*on_abort)(void *ud);
  void *abort_ud;
  struct req_priv *nprev, *nnext; /* worker's notify list */
} req_priv_t;

typedef struct listener {
  uv_tcp_t handle;
  worker_priv_t *worker;
  const tg_listener_config_t *cfg;
  tg_tls_ctx_t *tls;      /* per worker: mbedTLS RNG state is not shared */
  int fd;
  int opened;             /* handle initialised (owns fd) */
  int closed;             /* handle closed by a drain (tg_server_close_listeners) */
} listener_t;

/* Parse state of the request being read. A connection takes one when bytes
 * arrive and gives it back once parsing stops between two messages with no
 * byte left over, so an idle keep-alive connection holds none; workers keep
 * a few spare ones (with their buffers) for the next request. */
typedef struct conn_rx {
  llhttp_t parser;
  tg_buf_t scratch;       /* url\0 name\0 value\0 ... of the current head */
  uint16_t hoff[MAX_HEADERS * 2 + 1]; /* offsets in scratch (heads are < 64 KiB) */
  uint32_t nhdr;          /* header fields seen (name+value pairs completed) */
  uint32_t span_start;    /* start in scratch of the token being read */
  size_t head_bytes;
  tg_buf_t body;
  uint64_t msg_start_ns;
  int err_status;         /* status to answer when a callback aborts parsing */
  const char *err_msg;    /* and its reason, when not the status' usual one */
  const char *exec_data;  /* start of the bytes llhttp_execute is working on */
  tg_buf_t target;        /* normalized path\0query\0host\0 of the current head */
  tg_target_t tgt;        /* lengths, and which parts exist; pointers into target */
  tg_buf_t pending_in;    /* bytes read but not parsed (parser paused) */
  struct conn_rx *next_spare; /* worker's spare list */
  char tail[2];           /* last two bytes of the previous read */
  unsigned in_message : 1;      /* between on_message_begin and on_message_complete */
  unsigned chunk_has_data : 1;  /* the chunk being read carries data (its CRLF is checked) */
  unsigned check_crlf : 1;      /* paused in on_chunk_complete to check that CRLF */
  unsigned expect_continue : 1;
  unsigned in_trailers : 1;     /* past the head: header callbacks are trailer fields */
  unsigned upgrade : 1;         /* the request carries Upgrade: close after its answer */
} conn_rx_t;

/* One per open connection, and all an idle keep-alive one costs besides its
 * libuv handle's slot in the loop and its place in the deadline heap: parse
 * state lives in conn_rx_t, a write request only while a write is pending,
 * and the output buffers are given back once everything is written. */
struct conn {
  uv_tcp_t handle;
  worker_priv_t *worker;
  listener_t *listener;
  conn_rx_t *rx;          /* NULL between requests */
  tg_tls_t *tls;
  /* Answer queue. */
  req_priv_t *qhead, *qtail;
  uint32_t queued;        /* requests read and not yet answered */
  uint32_t unsent;        /* answers serialized since the output last drained */
  tg_buf_t wbuf;          /* answers waiting to be written */
  tg_buf_t inflight;      /* bytes handed to uv_write */
  size_t wlen;            /* bytes of inflight handed to the pending uv_write */
  uint64_t write_ms;      /* loop time the pending write started */
  /* Deadline, in the worker's heap while the phase has one. */
  uint64_t deadline;      /* loop time in ms */
  uint32_t heap_idx;      /* position in the heap + 1; 0 when not in it */
  uint8_t phase;          /* enum conn_phase */
  unsigned writing : 1;
  unsigned paused : 1;          /* parser paused: too many queued answers */
  unsigned reading : 1;
  unsigned stop_reading : 1;    /* no more requests on this connection */
  unsigned close_when_done : 1; /* close once every queued answer is written */
  unsigned closing : 1;
  unsigned in_execute : 1;
  unsigned resuming : 1;        /* inside conn_resume */
  unsigned resume_again : 1;    /* the output drained meanwhile: resume once more */
  unsigned reset_on_close : 1;  /* a close-delimited stream was cut: RST, not a clean FIN */
  /* The client's address, formatted into each request (req->peer). */
  uint8_t peer_family;    /* AF_INET, AF_INET6, or 0 when unknown */
  uint16_t peer_port;
  uint8_t peer_addr[16];
  struct conn *prev, *nextc;    /* worker's connection list */
};

/* Spare parse states and output buffers a worker keeps for its next
 * requests, so a keep-alive request allocates nothing in the common case. */
#define RX_SPARES 16
#define BUF_SPARES 16
#define SPARE_BUF_MAX 16384     /* larger buffers are freed, not kept */

struct worker_priv {
  tg_worker_t pub;
  tg_server_t *server;
  uv_loop_t loop;
  uv_async_t stop_async;
  uv_timer_t grace_timer;
  uv_timer_t date_timer;
  pthread_t thread;
  listener_t *listeners;
  size_t nlisteners;
  conn_t *conns;
  uint32_t nconns;
  uint32_t max_conns;
  int draining;
  int finished;
  int start_rc;
  int app_started; /* on_worker_start ran (its stop is owed, whatever it returned) */
  char start_err[256];
  char date_hdr[64];          /* "Date: ...\r\n" */
  size_t date_len;
  uint64_t req_counter;
  /* Deadlines of every connection that has one: a binary min-heap on
   * conn.deadline, served by one timer armed for the earliest. */
  conn_t **heap;
  uint32_t heap_len, heap_cap;
  uv_timer_t conn_timer;
  uint64_t timer_due;         /* loop time conn_timer is armed for; 0 when not armed */
  /* Streams whose producer is to be told something (output drained, client
   * gone): told from notify_idle, never inside a call of theirs. */
  uv_idle_t notify_idle;
  req_priv_t *notify_head, *notify_tail;
  uint64_t stream_peak;       /* largest output a stream held (mirrors server->stream_peak) */
  conn_rx_t *rx_spare;
  uint32_t nrx_spare;
  uint32_t nbuf_spare;
  tg_buf_t buf_spare[BUF_SPARES];
  char rbuf[READ_BUF_SIZE];
  char pbuf[READ_BUF_SIZE];   /* TLS plaintext */
};

struct tg_server {
  tg_server_config_t cfg;
  tg_listener_config_t *listeners;
  int *fds;                   /* [worker * nlisteners + listener], -1 where unused */
  int *ports;
  int nworkers;
  worker_priv_t **workers;
  uv_sem_t started;
  uint32_t grace_ms;
  _Atomic int stopping;          /* tg_server_stop: stop_async means stop, not close_mask */
  _Atomic uint64_t close_mask;   /* listeners to stop accepting on (tg_server_close_listeners) */
  _Atomic uint64_t connections;
  _Atomic uint64_t stream_peak;
  uint32_t id_salt;
};

static llhttp_settings_t parser_settings;
static pthread_once_t settings_once = PTHREAD_ONCE_INIT;

static void conn_close(conn_t *c);
static void conn_flush(conn_t *c);
static void conn_read_start(conn_t *c);
static void worker_finish(worker_priv_t *w);
static void conn_resume(conn_t *c);
static void queue_error(conn_t *c, int status, const char *msg);
static void on_write(uv_write_t *wr, int status);
static void notify_remove(worker_priv_t *w, req_priv_t *r);
static void notify_add(worker_priv_t *w, req_priv_t *r);
static void stream_check(conn_t *c);

/* ---- helpers ---- */

const char *tg_http_reason(int status) {
  switch (status) {
  case 100: return "Continue";
  case 200: return "OK";
  case 201: return "Created";
  case 202: return "Accepted";
  case 204: return "No Content";
  case 206: return "Partial Content";
  case 301: return "Moved Permanently";
  case 302: return "Found";
  case 304: return "Not Modified";
  case 400: return "Bad Request";
  case 401: return "Unauthorized";
  case 402: return "Payment Required";
  case 403: return "Forbidden";
  case 404: return "Not Found";
  case 405: return "Method Not Allowed";
  case 408: return "Request Timeout";
  case 409: return "Conflict";
  case 410: return "Gone";
  case 411: return "Length Required";
  case 413: return "Content Too Large";
  case 414: return "URI Too Long";
  case 415: return "Unsupported Media Type";
  case 417: return "Expectation Failed";
  case 422: return "Unprocessable Content";
  case 429: return "Too Many Requests";
  case 431: return "Request Header Fields Too Large";
  case 499: return "Client Closed Request";
  case 500: return "Internal Server Error";
  case 501: return "Not Implemented";
  case 502: return "Bad Gateway";
  case 503: return "Service Unavailable";
  case 504: return "Gateway Timeout";
  case 505: return "HTTP Version Not Supported";
  default: return status < 300 ? "OK" : status < 500 ? "Client Error" : "Server Error";
  }
}

const tg_http_header_t *tg_http_req_header(const tg_http_req_t *req, const char *name) {
  return tg_http_req_header_n(req, name, strlen(name));
}

const tg_http_header_t *tg_http_req_header_n(const tg_http_req_t *req, const char *name, size_t n) {
  for (size_t i = 0; i < req->nheaders; i++) {
    const tg_http_header_t *h = &req->headers[i];
    if (h->name_len == n && strncasecmp(h->name, name, n) == 0)
      return h;
  }
  return NULL;
}

void tg_http_peer_ip(const tg_http_req_t *req, char *out, size_t outlen) {
  size_t n = req->peer ? strlen(req->peer) : 0;
  if (outlen == 0)
    return;
  if (n >= outlen)
    n = outlen - 1;
  memcpy(out, req->peer ? req->peer : "", n);
  out[n] = '\0';
  char *colon = strrchr(out, ':');
  if (colon && (out[0] != '[' || colon[-1] == ']'))
    *colon = '\0';
}

static void update_date(worker_priv_t *w) {
  time_t now = time(NULL);
  struct tm tm;
  gmtime_r(&now, &tm);
  w->date_len = strftime(w->date_hdr, sizeof w->date_hdr, "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", &tm);
}

static void on_date_timer(uv_timer_t *t) { update_date(t->data); }

static size_t u64_to_dec(uint64_t v, char *out) {
  char tmp[24];
  size_t n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  for (size_t i = 0; i < n; i++)
    out[i] = tmp[n - 1 - i];
  return n;
}

/* ---- deadlines: one heap and one timer per worker ----
 *
 * A libuv timer per connection costs 152 bytes; a heap slot costs 8. The
 * heap keeps the exact deadlines (head, body, idle and send timeouts all
 * differ), and the timer is re-armed only when the earliest one moves
 * earlier: one that moved later is found when the timer fires. */

static void on_conn_timer(uv_timer_t *t);

static void heap_place(worker_priv_t *w, uint32_t i, conn_t *c) {
  w->heap[i] = c;
  c->heap_idx = i + 1;
}

static void heap_up(worker_priv_t *w, uint32_t i) {
  conn_t *c = w->heap[i];
  while (i > 0) {
    uint32_t parent = (i - 1) / 2;
    if (w->heap[parent]->deadline <= c->deadline)
      break;
    heap_place(w, i, w->heap[parent]);
    i = parent;
  }
  heap_place(w, i, c);
}

static void heap_down(worker_priv_t *w, uint32_t i) {
  conn_t *c = w->heap[i];
  for (;;) {
    uint32_t m = 2 * i + 1;
    if (m >= w->heap_len)
      break;
    if (m + 1 < w->heap_len && w->heap[m + 1]->deadline < w->heap[m]->deadline)
      m++;
    if (c->deadline <= w->heap[m]->deadline)
      break;
    heap_place(w, i, w->heap[m]);
    i = m;
  }
  heap_place(w, i, c);
}

/* Room for n entries; every connection holds at most one, so reserving at
 * accept time means setting a deadline never fails. 0 or -ENOMEM. */
static int heap_reserve(worker_priv_t *w, uint32_t n) {
  if (n <= w->heap_cap)
    return 0;
  uint32_t cap = w->heap_cap ? w->heap_cap : 64;
  while (cap < n)
    cap *= 2;
  conn_t **h = realloc(w->heap, cap * sizeof *h);
  if (h == NULL)
    return -ENOMEM;
  w->heap = h;
  w->heap_cap = cap;
  return 0;
}

static void heap_remove(worker_priv_t *w, conn_t *c) {
  if (c->heap_idx == 0)
    return;
  uint32_t i = c->heap_idx - 1;
  c->heap_idx = 0;
  conn_t *last = w->heap[--w->heap_len];
  if (i == w->heap_len)
    return;
  heap_place(w, i, last);
  if (i > 0 && w->heap[(i - 1) / 2]->deadline > last->deadline)
    heap_up(w, i);
  else
    heap_down(w, i);
}

static void arm_timer(worker_priv_t *w) {
  if (w->heap_len == 0)
    return;
  uint64_t due = w->heap[0]->deadline;
  if (w->timer_due != 0 && w->timer_due <= due)
    return;
  uint64_t now = uv_now(&w->loop);
  uv_timer_start(&w->conn_timer, on_conn_timer, due > now ? due - now : 0, 0);
  w->timer_due = due > now ? due : now;
}

/* Moves c to phase, with a deadline at loop time `deadline` (none for
 * PHASE_WAIT). */
static void set_deadline(conn_t *c, enum conn_phase phase, uint64_t deadline) {
  worker_priv_t *w = c->worker;
  if (c->closing) /* out of the heap for good: the struct goes soon */
    return;
  c->phase = (uint8_t)phase;
  if (phase == PHASE_WAIT) {
    heap_remove(w, c);
    c->deadline = 0;
    return;
  }
  if (c->heap_idx == 0) {
    c->deadline = deadline;
    w->heap[w->heap_len] = c; /* room reserved at accept */
    heap_up(w, w->heap_len++);
  } else {
    uint64_t old = c->deadline;
    c->deadline = deadline;
    if (deadline < old)
      heap_up(w, c->heap_idx - 1);
    else if (deadline > old)
      heap_down(w, c->heap_idx - 1);
  }
  arm_timer(w);
}

static void set_phase(conn_t *c, enum conn_phase phase, uint32_t ms) {
  set_deadline(c, phase, uv_now(&c->worker->loop) + ms);
}

/* No byte of a request is being held: none came since the last one ended,
 * or only the start of a method (llhttp keeps those in its own state). */
static int no_partial_request(const conn_t *c) {
  return c->rx == NULL || (c->rx->scratch.len == 0 && c->rx->head_bytes == 0);
}

/* c's deadline passed. */
static void conn_expire(conn_t *c) {
  switch ((enum conn_phase)c->phase) {
  case PHASE_IDLE:
  case PHASE_SEND:
    conn_close(c);
    break;
  case PHASE_HEAD:
    if (c->queued == 0 && no_partial_request(c)) {
      conn_close(c); /* nothing was sent at all: just go */
      break;
    }
    /* fallthrough */
  case PHASE_BODY:
    /* Nothing more is read; from here the connection waits for its answers,
     * and for the client to take them (a pending write sets the send
     * deadline). */
    c->phase = PHASE_WAIT;
    queue_error(c, 408, "request not received in time");
    conn_flush(c);
    break;
  case PHASE_WAIT:
    break;
  }
}

static void on_conn_timer(uv_timer_t *t) {
  worker_priv_t *w = t->data;
  w->timer_due = 0; /* fired: not armed */
  uint64_t now = uv_now(&w->loop);
  /* An expired connection closes or moves to a later deadline (a send
   * deadline starts now), so this loop ends. */
  while (w->heap_len > 0 && w->heap[0]->deadline <= now) {
    conn_t *c = w->heap[0];
    heap_remove(w, c);
    if (!c->closing)
      conn_expire(c);
  }
  arm_timer(w);
}

/* ---- per-request memory: taken when needed, given back when idle ---- */

static conn_rx_t *rx_take(conn_t *c) {
  worker_priv_t *w = c->worker;
  conn_rx_t *rx = w->rx_spare;
  if (rx) {
    w->rx_spare = rx->next_spare;
    w->nrx_spare--;
    /* Keep the spare's buffers, forget the rest. */
    tg_buf_t scratch = rx->scratch, body = rx->body, target = rx->target, pending = rx->pending_in;
    memset(rx, 0, sizeof *rx);
    rx->scratch = scratch;
    rx->body = body;
    rx->target = target;
    rx->pending_in = pending;
  } else {
    rx = calloc(1, sizeof *rx);
    if (rx == NULL)
      return NULL;
  }
  llhttp_init(&rx->parser, HTTP_REQUEST, &parser_settings);
  rx->parser.data = c;
  c->rx = rx;
  return rx;
}

static void buf_trim(tg_buf_t *b) {
  if (b->cap > SPARE_BUF_MAX)
    tg_buf_free(b);
  else
    tg_buf_reset(b);
}

static void rx_free(conn_rx_t *rx) {
  tg_buf_free(&rx->scratch);
  tg_buf_free(&rx->body);
  tg_buf_free(&rx->target);
  tg_buf_free(&rx->pending_in);
  free(rx);
}

static void rx_give(worker_priv_t *w, conn_rx_t *rx) {
  if (w->nrx_spare >= RX_SPARES || w->finished) {
    rx_free(rx);
    return;
  }
  buf_trim(&rx->scratch);
  buf_trim(&rx->body);
  buf_trim(&rx->target);
  buf_trim(&rx->pending_in);
  rx->next_spare = w->rx_spare;
  w->rx_spare = rx;
  w->nrx_spare++;
}

/* Gives the parse state back once nothing in it is needed: parsing stopped
 * between two messages and no byte waits. The next byte takes a fresh one,
 * which is the state llhttp itself would be in at a message start. */
static void rx_release_if_idle(conn_t *c) {
  conn_rx_t *rx = c->rx;
  if (rx == NULL || c->in_execute || rx->in_message || rx->pending_in.len)
    return;
  c->rx = NULL;
  rx_give(c->worker, rx);
}

/* An empty output buffer with room, from the worker's spares when it has none. */
static void buf_take(worker_priv_t *w, tg_buf_t *b) {
  if (b->data == NULL && w->nbuf_spare > 0)
    *b = w->buf_spare[--w->nbuf_spare];
}

static void buf_give(worker_priv_t *w, tg_buf_t *b) {
  if (b->data == NULL)
    return;
  if (b->len == 0 && b->cap <= SPARE_BUF_MAX && w->nbuf_spare < BUF_SPARES && !w->finished) {
    tg_buf_reset(b);
    w->buf_spare[w->nbuf_spare++] = *b;
    *b = (tg_buf_t){0};
  } else {
    tg_buf_free(b);
  }
}

/* ---- answer queue ---- */

/* RFC 9110 token characters: what a header name may hold. */
static int is_token_n(const char *s, size_t n) {
  static const char extra[] = "!#$%&'*+-.^_`|~";
  if (n == 0)
    return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
          (ch && strchr(extra, ch))))
      return 0;
  }
  return 1;
}

static int name_is(const tg_http_header_t *h, const char *name) {
  size_t n = strlen(name);
  return h->name_len == n && strncasecmp(h->name, name, n) == 0;
}

/* A handler's header that could split the head or change its framing. */
static int header_ok(const tg_http_header_t *h) {
  if (h->name == NULL || !is_token_n(h->name, h->name_len) || (h->value == NULL && h->value_len))
    return 0;
  for (size_t i = 0; i < h->value_len; i++) {
    unsigned char ch = (unsigned char)h->value[i];
    if ((ch < 0x20 && ch != '\t') || ch == 0x7f)
      return 0;
  }
  return !name_is(h, "content-length") && !name_is(h, "transfer-encoding") &&
         !name_is(h, "connection");
}

/* The head of an answer up to its framing: reserves room for it and extra
 * bytes more (framing, body), then appends the status line, Date, Server
 * and headers. 0, or -ENOMEM with out unchanged. status is 200..599 (the
 * callers check): three digits. */
static int put_head(worker_priv_t *w, tg_buf_t *out, int status, const tg_http_header_t *headers,
                    size_t nheaders, size_t extra) {
  const char *reason = tg_http_reason(status);
  size_t reason_len = strlen(reason);
  /* Sized with checked sums: a wrapped size would reserve too little, and an
   * append that then fails would leave a head without its body. */
  size_t need = 16 + reason_len + w->date_len + 96;
  bool wrap = __builtin_add_overflow(need, extra, &need);
  for (size_t i = 0; i < nheaders && !wrap; i++)
    wrap = __builtin_add_overflow(need, headers[i].name_len, &need) ||
           __builtin_add_overflow(need, headers[i].value_len, &need) ||
           __builtin_add_overflow(need, (size_t)4, &need);
  if (wrap || tg_buf_reserve(out, need) != 0)
    return -ENOMEM;
  char code[4] = {(char)('0' + status / 100), (char)('0' + status / 10 % 10),
                  (char)('0' + status % 10), ' '};
  tg_buf_append(out, "HTTP/1.1 ", 9);
  tg_buf_append(out, code, 4);
  tg_buf_append(out, reason, reason_len);
  tg_buf_append(out, "\r\n", 2);
  tg_buf_append(out, w->date_hdr, w->date_len);
  tg_buf_append(out, "Server: tollgate\r\n", 18);
  for (size_t i = 0; i < nheaders; i++) {
    tg_buf_append(out, headers[i].name, headers[i].name_len);
    tg_buf_append(out, ": ", 2);
    tg_buf_append(out, headers[i].value, headers[i].value_len);
    tg_buf_append(out, "\r\n", 2);
  }
  return 0;
}

static void put_content_length(tg_buf_t *out, uint64_t n) {
  char cl[48] = "Content-Length: ";
  size_t k = 16 + u64_to_dec(n, cl + 16);
  memcpy(cl + k, "\r\n", 2);
  tg_buf_append(out, cl, k + 2);
}

/* The Connection header the answer needs and the blank line that ends the
 * head; a closing answer stops the connection reading. */
static void put_end_of_head(conn_t *c, req_priv_t *r, tg_buf_t *out, int close) {
  if (close) {
    tg_buf_append(out, "Connection: close\r\n\r\n", 21);
    c->stop_reading = 1;
    c->close_when_done = 1;
  } else if (r->pub.http_minor == 0) {
    tg_buf_append(out, "Connection: keep-alive\r\n\r\n", 26);
  } else {
    tg_buf_append(out, "\r\n", 2);
  }
}

/* Appends the answer to out. 0, or -ENOMEM with out unchanged. */
static int serialize(conn_t *c, tg_buf_t *out, req_priv_t *r, int status,
                     const tg_http_header_t *headers, size_t nheaders, const void *body,
                     size_t body_len) {
  worker_priv_t *w = c->worker;
  int close = !r->keep_alive || w->draining || c->stop_reading;
  if (put_head(w, out, status, headers, nheaders, body_len) != 0)
    return -ENOMEM;
  if (status >= 200 && status != 204 && status != 304)
    put_content_length(out, body_len);
  put_end_of_head(c, r, out, close);
  if (!r->head_method && body_len)
    tg_buf_append(out, body, body_len);
  return 0;
}

static void req_free(req_priv_t *r) {
  if (r->in_notify)
    notify_remove((worker_priv_t *)r->pub.worker, r);
  tg_buf_free(&r->out);
  free(r);
}

/* r's connection is going away, or r is cut from its queue: an answer
 * already serialized is dropped; a request still with its producer is
 * orphaned, and a producer that asked (tg_http_stream_on_abort) is told. */
static void req_orphan(req_priv_t *r) {
  r->next = NULL;
  if (r->done) {
    req_free(r);
    return;
  }
  r->conn = NULL;
  if (r->on_abort)
    notify_add((worker_priv_t *)r->pub.worker, r);
}

/* Moves finished answers at the head of the queue into the write buffer. */
static void drain_queue(conn_t *c) {
  while (c->qhead && c->qhead->done) {
    req_priv_t *r = c->qhead;
    c->qhead = r->next;
    if (c->qhead == NULL)
      c->qtail = NULL;
    if (r->out.len)
      buf_take(c->worker, &c->wbuf);
    if (r->out.len && tg_buf_append(&c->wbuf, r->out.data, r->out.len) != 0) {
      /* Skipping an answer would pair every later one with the wrong request. */
      req_free(r);
      conn_close(c);
      return;
    }
    c->queued--;
    c->unsent++;
    req_free(r);
  }
  /* A stream now the oldest: what it produced meanwhile goes out, and the
   * rest of it is written straight to wbuf. */
  req_priv_t *r = c->qhead;
  if (r && r->streaming && r->out.len) {
    buf_take(c->worker, &c->wbuf);
    if (tg_buf_append(&c->wbuf, r->out.data, r->out.len) != 0) {
      conn_close(c);
      return;
    }
    tg_buf_free(&r->out);
  }
}

/* The answer is taken: the application's access log hears of it. */
static void answered(req_priv_t *r, int status, uint64_t bytes) {
  if (r->pub.worker == NULL || r->pub.path == NULL) /* a server-made answer (error_req) */
    return;
  tg_server_t *s = ((worker_priv_t *)r->pub.worker)->server;
  if (s->cfg.on_answered)
    s->cfg.on_answered(&r->pub, status, bytes, s->cfg.ud);
}

void tg_http_respond(tg_http_req_t *req, int status, const tg_http_header_t *headers,
                     size_t nheaders, const void *body, size_t body_len) {
  req_priv_t *r = (req_priv_t *)req;
  conn_t *c = r->conn;
  if (c == NULL) { /* client went away while the handler worked */
    answered(r, status, 0);
    req_free(r);
    return;
  }
  int bad = status < 200 || status > 599;
  for (size_t i = 0; !bad && i < nheaders; i++)
    bad = !header_ok(&headers[i]);
  if (bad) {
    static const char oops[] = "internal error: invalid response\n";
    static const tg_http_header_t ct = {"Content-Type", 12, "text/plain; charset=utf-8", 25};
    status = 500;
    headers = &ct;
    nheaders = 1;
    body = oops;
    body_len = sizeof oops - 1;
  }
  answered(r, status, r->head_method ? 0 : body_len);
  int head = c->qhead == r; /* common case: the oldest request, nothing ahead of it */
  if (head)
    buf_take(c->worker, &c->wbuf);
  if (serialize(c, head ? &c->wbuf : &r->out, r, status, headers, nheaders, body, body_len) != 0) {
    /* No answer at all would shift every later one onto the wrong request. */
    r->done = 1;
    conn_close(c); /* frees r: it is in the queue */
    return;
  }
  r->done = 1;
  if (head) {
    c->qhead = r->next;
    if (c->qhead == NULL)
      c->qtail = NULL;
    c->queued--;
    c->unsent++;
    req_free(r);
  }
  drain_queue(c);
  if (c->closing)
    return;
  if (!c->in_execute)
    conn_flush(c);
}

void tg_http_respond_simple(tg_http_req_t *req, int status, const char *content_type,
                            const void *body, size_t body_len) {
  tg_http_header_t h = {"Content-Type", 12, content_type, content_type ? strlen(content_type) : 0};
  tg_http_respond(req, status, content_type ? &h : NULL, content_type ? 1 : 0, body, body_len);
}

void tg_http_respond_json(tg_http_req_t *req, int status, json_t *body) {
  char *text = body ? json_dumps(body, JSON_COMPACT | JSON_ENCODE_ANY) : NULL;
  json_decref(body);
  if (text == NULL) {
    static const char oops[] = "{\"error\":\"cannot build the answer\"}";
    tg_http_respond_simple(req, 500, "application/json", oops, sizeof oops - 1);
    return;
  }
  tg_http_respond_simple(req, status, "application/json", text, strlen(text));
  free(text);
}

/* ---- streamed answers ---- */

static void on_notify(uv_idle_t *h);

static void notify_add(worker_priv_t *w, req_priv_t *r) {
  if (r->in_notify)
    return;
  r->in_notify = 1;
  r->nnext = NULL;
  r->nprev = w->notify_tail;
  if (w->notify_tail)
    w->notify_tail->nnext = r;
  else
    w->notify_head = r;
  w->notify_tail = r;
  if (!w->finished)
    uv_idle_start(&w->notify_idle, on_notify);
}

static void notify_remove(worker_priv_t *w, req_priv_t *r) {
  if (!r->in_notify)
    return;
  r->in_notify = 0;
  if (r->nprev)
    r->nprev->nnext = r->nnext;
  else
    w->notify_head = r->nnext;
  if (r->nnext)
    r->nnext->nprev = r->nprev;
  else
    w->notify_tail = r->nprev;
  r->nprev = r->nnext = NULL;
}

/* Output a stream holds in our buffers: its own while earlier answers are
 * pending, the connection's once it is the oldest. */
static size_t stream_held(const conn_t *c, const req_priv_t *r) {
  return c->qhead == r ? c->wbuf.len + c->inflight.len : r->out.len;
}

/* Tells the producers on the list at entry (not those added meanwhile: a
 * callback may add more, which wait for the next loop turn). */
static void notify_run(worker_priv_t *w) {
  size_t n = 0;
  for (req_priv_t *r = w->notify_head; r; r = r->nnext)
    n++;
  while (n-- > 0 && w->notify_head) {
    req_priv_t *r = w->notify_head;
    notify_remove(w, r);
    if (r->conn == NULL) {
      /* The client went away: the request goes, then its producer hears. */
      void (*cb)(void *) = r->on_abort;
      void *ud = r->abort_ud;
      req_free(r);
      if (cb)
        cb(ud);
      continue;
    }
    conn_t *c = r->conn;
    if (!r->want_drain || r->done || c->closing || stream_held(c, r) > STREAM_LOW_WATER)
      continue;
    r->want_drain = 0;
    if (r->on_drain)
      r->on_drain(r->drain_ud);
  }
  if (w->notify_head == NULL)
    uv_idle_stop(&w->notify_idle);
}

static void on_notify(uv_idle_t *h) { notify_run(h->data); }

/* After output moved: the oldest answer, when a paused stream, may go on. */
static void stream_check(conn_t *c) {
  req_priv_t *r = c->qhead;
  if (c->closing || r == NULL || !r->streaming || !r->want_drain || r->done)
    return;
  if (stream_held(c, r) <= STREAM_LOW_WATER)
    notify_add(c->worker, r);
}

/* Where r's next bytes go. NULL when out of memory. */
static tg_buf_t *stream_dest(conn_t *c, req_priv_t *r) {
  if (c->qhead != r)
    return &r->out;
  buf_take(c->worker, &c->wbuf);
  return &c->wbuf;
}

static void stream_flush(conn_t *c) {
  if (!c->in_execute)
    conn_flush(c);
}

/* Removes r (not done) from its connection's queue together with every
 * request after it, which are orphaned: nothing more may follow a cut or a
 * close-delimited body on this connection. */
static void queue_cut_after(conn_t *c, req_priv_t *r) {
  req_priv_t *q = r->next;
  r->next = NULL;
  c->qtail = r;
  while (q) {
    req_priv_t *next = q->next;
    c->queued--;
    req_orphan(q);
    q = next;
  }
}

int tg_http_stream_start(tg_http_req_t *req, int status, const tg_http_header_t *headers,
                         size_t nheaders, int64_t content_length) {
  req_priv_t *r = (req_priv_t *)req;
  conn_t *c = r->conn;
  if (c == NULL) {
    req_free(r);
    return -ECONNRESET;
  }
  if (r->streaming || r->done)
    return -EINVAL;
  int bad = status < 200 || status > 599;
  for (size_t i = 0; !bad && i < nheaders; i++)
    bad = !header_ok(&headers[i]);
  if (bad) {
    r->on_abort = NULL;
    static const char oops[] = "internal error: invalid response\n";
    tg_http_respond_simple(req, 500, "text/plain; charset=utf-8", oops, sizeof oops - 1);
    return -EINVAL;
  }
  worker_priv_t *w = c->worker;
  r->no_body = r->head_method || status == 204 || status == 304;
  r->cl_left = -1;
  int announce_length = 0;
  if (status != 204 && status != 304 && content_length >= 0) {
    announce_length = 1;
    if (!r->head_method)
      r->cl_left = content_length;
  } else if (!r->no_body) {
    if (r->pub.http_minor >= 1)
      r->chunked = 1;
    else
      r->close_delim = 1;
  }
  int close = !r->keep_alive || w->draining || c->stop_reading || r->close_delim;
  tg_buf_t *out = stream_dest(c, r);
  if (put_head(w, out, status, headers, nheaders, 0) != 0) {
    conn_close(c); /* no answer would shift every later one onto the wrong request */
    req_free(r);   /* orphaned by the close; the caller hears it here, not from on_abort */
    return -ENOMEM;
  }
  if (announce_length)
    put_content_length(out, (uint64_t)content_length);
  else if (r->chunked)
    tg_buf_append(out, "Transfer-Encoding: chunked\r\n", 28);
  put_end_of_head(c, r, out, close);
  if (close && r->close_delim)
    queue_cut_after(c, r);
  r->streaming = 1;
  r->stream_status = status;
  stream_flush(c);
  return 0;
}

int tg_http_stream_write(tg_http_req_t *req, const void *data, size_t len) {
  req_priv_t *r = (req_priv_t *)req;
  conn_t *c = r->conn;
  if (c == NULL || c->closing)
    return -ECONNRESET;
  if (!r->streaming || r->done)
    return -EINVAL;
  if (len == 0 || r->no_body)
    return 0;
  if (r->cl_left >= 0) {
    if ((uint64_t)len > (uint64_t)r->cl_left)
      return -E2BIG;
    r->cl_left -= (int64_t)len;
  }
  tg_buf_t *out = stream_dest(c, r);
  int rc = 0;
  if (r->chunked) {
    static const char hex[] = "0123456789abcdef";
    char size[24];
    size_t k = sizeof size;
    size[--k] = '\n';
    size[--k] = '\r';
    for (size_t v = len; v; v >>= 4)
      size[--k] = hex[v & 15];
    rc = tg_buf_reserve(out, sizeof size - k + len + 2);
    if (rc == 0) {
      tg_buf_append(out, size + k, sizeof size - k);
      tg_buf_append(out, data, len);
      tg_buf_append(out, "\r\n", 2);
    }
  } else {
    rc = tg_buf_append(out, data, len);
  }
  if (rc != 0) {
    /* Skipping bytes would corrupt the body: the client gets a cut. */
    conn_close(c);
    return -ENOMEM;
  }
  r->stream_bytes += len;
  stream_flush(c);
  if (c->closing)
    return -ECONNRESET;
  size_t held = stream_held(c, r);
  worker_priv_t *w = c->worker;
  if (held > w->stream_peak) {
    w->stream_peak = held;
    uint64_t cur = atomic_load_explicit(&w->server->stream_peak, memory_order_relaxed);
    while (cur < held && !atomic_compare_exchange_weak_explicit(&w->server->stream_peak, &cur, held,
                                                                memory_order_relaxed,
                                                                memory_order_relaxed))
      ;
  }
  if (held >= STREAM_HIGH_WATER) {
    r->want_drain = 1;
    return 1;
  }
  return 0;
}

void tg_http_stream_on_drain(tg_http_req_t *req, void (*cb)(void *ud), void *ud) {
  req_priv_t *r = (req_priv_t *)req;
  r->on_drain = cb;
  r->drain_ud = ud;
}

void tg_http_stream_on_abort(tg_http_req_t *req, void (*cb)(void *ud), void *ud) {
  req_priv_t *r = (req_priv_t *)req;
  r->on_abort = cb;
  r->abort_ud = ud;
  if (r->conn == NULL && cb) /* already gone: told on the next loop turn */
    notify_add((worker_priv_t *)r->pub.worker, r);
  else if (cb == NULL && r->in_notify && r->conn == NULL)
    notify_remove((worker_priv_t *)r->pub.worker, r);
}

/* The stream ends without a clean end: whatever of it went out is followed
 * by nothing but the end of the connection (an RST where that end would
 * otherwise read as the end of the body). */
static void stream_abort(conn_t *c, req_priv_t *r) {
  c->stop_reading = 1;
  c->close_when_done = 1;
  queue_cut_after(c, r);
  if (c->qhead == r) {
    c->qhead = c->qtail = NULL;
    if (r->close_delim)
      c->reset_on_close = 1;
  } else {
    req_priv_t *p = c->qhead;
    while (p->next != r)
      p = p->next;
    p->next = NULL;
    c->qtail = p;
  }
  c->queued--;
  req_free(r);
  stream_flush(c);
}

int tg_http_stream_end(tg_http_req_t *req, bool ok) {
  req_priv_t *r = (req_priv_t *)req;
  conn_t *c = r->conn;
  if (c == NULL) {
    if (r->streaming)
      answered(r, r->stream_status, r->stream_bytes);
    req_free(r);
    return -ECONNRESET;
  }
  if (!r->streaming || r->done)
    return -EINVAL;
  answered(r, r->stream_status, r->stream_bytes);
  if (r->cl_left > 0)
    ok = false; /* fewer bytes than announced */
  if (!ok) {
    stream_abort(c, r);
    return 0;
  }
  if (r->chunked) {
    tg_buf_t *out = stream_dest(c, r);
    if (tg_buf_append(out, "0\r\n\r\n", 5) != 0) {
      conn_close(c);
      return -ENOMEM;
    }
  }
  r->done = 1;
  r->want_drain = 0;
  if (r->in_notify)
    notify_remove(c->worker, r);
  if (c->qhead == r) {
    c->qhead = r->next;
    if (c->qhead == NULL)
      c->qtail = NULL;
    c->queued--;
    c->unsent++;
    req_free(r);
  }
  drain_queue(c);
  if (c->closing)
    return 0;
  stream_flush(c);
  return 0;
}

/* Appends r to the connection's answer queue (answers leave in this order). */
static void queue_push(conn_t *c, req_priv_t *r) {
  if (c->qtail)
    c->qtail->next = r;
  else
    c->qhead = r;
  c->qtail = r;
  c->queued++;
}

/* The request a server-made answer (400, 405, 408, 413, 431, 501, ...) is
 * given as: queued behind those in flight, the last one read on this
 * connection, which then ends. NULL when out of memory (the connection is
 * closed). */
static req_priv_t *error_req(conn_t *c) {
  req_priv_t *r = calloc(1, sizeof *r);
  if (r == NULL) {
    conn_close(c);
    return NULL;
  }
  r->conn = c;
  r->pub.http_minor = 1;
  c->stop_reading = 1;
  queue_push(c, r);
  return r;
}

/* A body too large for a Connect (or any JSON/protobuf API) request is
 * answered in the error shape its client reads: {"code","message"} JSON,
 * where Connect's code for a size limit is resource_exhausted. */
static void queue_error_json(conn_t *c, int status, const char *msg) {
  req_priv_t *r = error_req(c);
  if (r == NULL)
    return;
  char body[200];
  int n = snprintf(body, sizeof body, "{\"code\":\"resource_exhausted\",\"message\":\"%s\"}", msg);
  tg_http_header_t h[1] = {{"Content-Type", 12, "application/json", 16}};
  tg_http_respond(&r->pub, status, h, 1, body, n > 0 && (size_t)n < sizeof body ? (size_t)n : 0);
}

static void queue_error(conn_t *c, int status, const char *msg) {
  req_priv_t *r = error_req(c);
  if (r == NULL)
    return;
  char body[160];
  size_t n = strlen(msg);
  if (n > sizeof body - 1)
    n = sizeof body - 1;
  memcpy(body, msg, n);
  body[n++] = '\n';
  tg_http_header_t h[2] = {{"Content-Type", 12, "text/plain; charset=utf-8", 25},
                           {"Allow", 5, "GET, HEAD, POST, OPTIONS", 24}};
  /* RFC 9110 15.5.6: a 405 lists the methods the server does take. */
  tg_http_respond(&r->pub, status, h, status == 405 ? 2 : 1, body, n);
}

/* ---- writing ---- */

/* Between requests, with a write pending: the connection may wait for the
 * client to read until idle_timeout_ms after the last write progress. Head
 * and body deadlines stay as they are. */
static void send_deadline(conn_t *c) {
  if (c->phase != PHASE_WAIT && c->phase != PHASE_IDLE && c->phase != PHASE_SEND)
    return;
  uint64_t now = uv_now(&c->worker->loop);
  uint64_t due = c->write_ms + c->worker->server->cfg.limits.idle_timeout_ms;
  set_deadline(c, PHASE_SEND, due > now ? due : now);
}

/* Hands the head of inflight (at most MAX_WRITE bytes) to uv_write. */
static void write_inflight(conn_t *c) {
  size_t n = c->inflight.len < MAX_WRITE ? c->inflight.len : MAX_WRITE;
  c->write_ms = uv_now(&c->worker->loop); /* a write starts: the last one made progress */
  send_deadline(c);
  uv_buf_t b = uv_buf_init(c->inflight.data, (unsigned int)n);
  /* Only a connection the client reads slowly (or a TLS one) gets here: the
   * request lives as long as its write. */
  uv_write_t *wr = malloc(sizeof *wr);
  if (wr == NULL) {
    conn_close(c);
    return;
  }
  wr->data = c;
  c->writing = 1;
  c->wlen = n;
  if (uv_write(wr, (uv_stream_t *)&c->handle, &b, 1, on_write) != 0) {
    free(wr);
    c->writing = 0;
    conn_close(c);
  }
}

static void on_write(uv_write_t *wr, int status) {
  conn_t *c = wr->data;
  free(wr);
  c->writing = 0;
  if (status < 0 || c->closing) {
    if (!c->closing)
      conn_close(c);
    return;
  }
  tg_buf_consume(&c->inflight, c->wlen);
  if (c->inflight.len) {
    write_inflight(c);
    return;
  }
  conn_flush(c);
}

static void conn_after_flush(conn_t *c) {
  if (c->closing || c->writing || c->wbuf.len || c->inflight.len)
    return;
  c->unsent = 0; /* everything serialized so far is on the wire */
  if (c->queued == 0 && c->close_when_done) {
    conn_close(c);
    return;
  }
  if (c->paused && c->queued < c->worker->server->cfg.limits.max_pipelined / 2 + 1) {
    conn_resume(c);
    /* Resuming answers more requests and may have started a write whose
     * buffer must not be freed below. */
    if (c->closing || c->writing || c->wbuf.len || c->inflight.len)
      return;
  }
  if (c->phase == PHASE_SEND) /* drained: back to waiting for handlers, or idle below */
    set_phase(c, PHASE_WAIT, 0);
  if (!c->closing && c->queued == 0 && c->phase == PHASE_WAIT) {
    set_phase(c, PHASE_IDLE, c->worker->server->cfg.limits.idle_timeout_ms);
    /* An idle connection keeps no buffer: they go back to the worker. */
    buf_give(c->worker, &c->wbuf);
    buf_give(c->worker, &c->inflight);
    rx_release_if_idle(c);
  }
  if (!c->closing && c->queued == 0 && c->worker->draining && no_partial_request(c))
    conn_close(c);
}

static void conn_flush_out(conn_t *c);

static void conn_flush(conn_t *c) {
  conn_flush_out(c);
  stream_check(c);
}

static void conn_flush_out(conn_t *c) {
  if (c->closing)
    return;
  if (c->writing) /* on_write flushes again */
    return;
  if (c->wbuf.len == 0 && !(c->tls && tg_tls_has_output(c->tls))) {
    conn_after_flush(c);
    return;
  }
  tg_buf_t *src = &c->wbuf;
  if (c->tls) {
    if (c->wbuf.len && tg_tls_write(c->tls, c->wbuf.data, c->wbuf.len) != 0) {
      conn_close(c);
      return;
    }
    tg_buf_reset(&c->wbuf);
    if (tg_tls_has_output(c->tls) && tg_tls_take_output(c->tls, &c->inflight) != 0) {
      conn_close(c);
      return;
    }
    src = &c->inflight;
  } else {
    /* Try the socket directly first: most answers fit and need no request. */
    size_t want = c->wbuf.len < MAX_WRITE ? c->wbuf.len : MAX_WRITE;
    uv_buf_t b = uv_buf_init(c->wbuf.data, (unsigned int)want);
    int n = uv_try_write((uv_stream_t *)&c->handle, &b, 1);
    if (n >= 0 && (size_t)n == c->wbuf.len) {
      tg_buf_reset(&c->wbuf);
      conn_after_flush(c);
      return;
    }
    if (n < 0 && n != UV_EAGAIN) {
      conn_close(c);
      return;
    }
    if (n < 0)
      n = 0;
    /* inflight is empty here (not writing): swap rather than copy. */
    tg_buf_t t = c->inflight;
    c->inflight = c->wbuf;
    c->wbuf = t;
    tg_buf_reset(&c->wbuf);
    tg_buf_consume(&c->inflight, (size_t)n);
    src = &c->inflight;
  }
  if (src->len == 0) {
    conn_after_flush(c);
    return;
  }
  write_inflight(c);
}

/* ---- parsing ---- */

static int hdr_is(const conn_rx_t *rx, uint32_t i, const char *name) {
  return strcasecmp(rx->scratch.data + rx->hoff[1 + 2 * i], name) == 0;
}

static const char *hdr_value(const conn_rx_t *rx, uint32_t i) {
  return rx->scratch.data + rx->hoff[2 + 2 * i];
}

/* The request (headers parsed) declares a JSON or protobuf body: an API
 * client, which reads errors as JSON. */
static int wants_json_error(const conn_rx_t *rx) {
  static const char *const types[] = {"application/json", "application/proto", "application/connect+",
                                      "application/grpc"};
  for (uint32_t i = 0; i < rx->nhdr; i++) {
    if (!hdr_is(rx, i, "content-type"))
      continue;
    const char *v = hdr_value(rx, i);
    for (size_t k = 0; k < sizeof types / sizeof types[0]; k++)
      if (strncasecmp(v, types[k], strlen(types[k])) == 0)
        return 1;
  }
  return 0;
}

static int on_message_begin(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  tg_buf_reset(&rx->scratch);
  tg_buf_reset(&rx->body);
  tg_buf_reset(&rx->target);
  rx->nhdr = 0;
  rx->span_start = 0;
  rx->head_bytes = 0;
  rx->in_message = 1;
  rx->expect_continue = 0;
  rx->in_trailers = 0;
  rx->upgrade = 0;
  rx->msg_start_ns = uv_hrtime();
  set_phase(c, PHASE_HEAD, c->worker->server->cfg.limits.header_timeout_ms);
  return 0;
}

static int add_head_bytes(conn_t *c, size_t n) {
  conn_rx_t *rx = c->rx;
  rx->head_bytes += n;
  if (rx->head_bytes > c->worker->server->cfg.limits.max_header_bytes) {
    rx->err_status = 431;
    return HPE_USER;
  }
  return 0;
}

static int on_span(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (add_head_bytes(c, len) != 0)
    return HPE_USER;
  if (rx->in_trailers) /* counted against the head limit, then dropped */
    return 0;
  if (tg_buf_append(&rx->scratch, at, len) != 0) {
    rx->err_status = 500;
    return HPE_USER;
  }
  return 0;
}

/* llhttp 8.1 takes obs-fold (a line starting with SP or HT continues the
 * previous field) and hands the continuation as more value bytes; RFC 9112
 * 5.2 lets a server refuse it, and a proxy that unfolds differently would see
 * other fields than we do. The byte before such a span is the LF that ended
 * the previous line, possibly at the end of the previous read. */
static int on_value_span(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (len && (at[0] == ' ' || at[0] == '\t')) {
    size_t off = (size_t)(at - rx->exec_data);
    char prev = off >= 1 ? at[-1] : rx->tail[1];
    if (prev == '\n') {
      rx->err_status = 400;
      rx->err_msg = "obsolete line folding";
      return HPE_USER;
    }
  }
  return on_span(p, at, len);
}

static int end_span(conn_t *c, uint32_t slot) {
  conn_rx_t *rx = c->rx;
  if (tg_buf_append(&rx->scratch, "", 1) != 0) { /* the NUL terminator */
    rx->err_status = 500;
    return HPE_USER;
  }
  rx->hoff[slot] = (uint16_t)rx->span_start;
  rx->span_start = (uint32_t)rx->scratch.len;
  return 0;
}

/* The request target has its own cap so an over-long one is a 414, not a 431. */
static int on_url(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  size_t limit = c->worker->server->cfg.limits.max_header_bytes;
  if (limit > 8192)
    limit = 8192;
  if (rx->scratch.len + len > limit) {
    rx->err_status = 414;
    return HPE_USER;
  }
  return on_span(p, at, len);
}

static int on_url_complete(llhttp_t *p) { return end_span(p->data, 0); }

static int on_field_complete(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (rx->in_trailers)
    return add_head_bytes(c, 4);
  if (rx->nhdr >= MAX_HEADERS) {
    rx->err_status = 431;
    return HPE_USER;
  }
  if (add_head_bytes(c, 4) != 0) /* ": " and CRLF count against the limit */
    return HPE_USER;
  int rc = end_span(c, 1 + 2 * rx->nhdr);
  const char *name = rx->scratch.data + rx->hoff[1 + 2 * rx->nhdr];
  if (rc == 0 && !is_token_n(name, strlen(name))) {
    rx->err_status = 400;
    rx->err_msg = "invalid header name";
    return HPE_USER;
  }
  return rc;
}

static int on_value_complete(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (rx->in_trailers)
    return 0;
  /* RFC 9110 5.5: trailing whitespace is not part of a field value, and
   * llhttp 8.1 leaves it in ("Host: api.example " names api.example). */
  while (rx->scratch.len > rx->span_start &&
         (rx->scratch.data[rx->scratch.len - 1] == ' ' || rx->scratch.data[rx->scratch.len - 1] == '\t'))
    rx->scratch.len--;
  int rc = end_span(c, 2 + 2 * rx->nhdr);
  rx->nhdr++;
  return rc;
}

static int head_error(conn_t *c, int status, const char *msg) {
  conn_rx_t *rx = c->rx;
  rx->err_status = status;
  rx->err_msg = msg;
  return HPE_USER;
}

static int is_ows(char ch) { return ch == ' ' || ch == '\t'; }

/* RFC 9112 6.1 and 7: we decode "chunked" and nothing else. Returns 0, or
 * the status to answer: 501 for a coding we do not implement ahead of a
 * final chunked, 400 when chunked is missing, not last, or repeated. */
static int check_transfer_encoding(const char *v) {
  int chunked = 0, other = 0;
  for (const char *e = v; *e;) {
    while (is_ows(*e) || *e == ',')
      e++;
    if (*e == '\0')
      break;
    const char *stop = e;
    while (*stop && *stop != ',')
      stop++;
    size_t n = (size_t)(stop - e);
    while (n && is_ows(e[n - 1]))
      n--;
    if (chunked) /* something after chunked, or chunked twice */
      return 400;
    if (n == 7 && strncasecmp(e, "chunked", 7) == 0)
      chunked = 1;
    else
      other = 1;
    e = stop;
  }
  if (!chunked)
    return 400;
  return other ? 501 : 0;
}

/* Normalizes the target and the host into rx->target (net/target.h), so a
 * bad one is refused before any body is read. */
static int parse_target(conn_t *c, llhttp_t *p, const char *host_hdr) {
  conn_rx_t *rx = c->rx;
  const char *url = rx->scratch.data + rx->hoff[0];
  size_t url_len = strlen(url);
  size_t host_len = host_hdr ? strlen(host_hdr) : 0;
  if (tg_buf_reserve(&rx->target, url_len + 4 + host_len + 1) != 0)
    return head_error(c, 500, NULL);
  const char *why = NULL;
  tg_target_t *t = &rx->tgt;
  if (tg_target_parse(url, url_len, rx->target.data, t, &why) != 0)
    return head_error(c, 400, why);
  if (t->asterisk && p->method != HTTP_OPTIONS)
    return head_error(c, 400, "\"*\" is for OPTIONS only");
  const char *end = t->host ? t->host + t->host_len + 1
                    : t->query ? t->query + t->query_len + 1
                               : t->path + t->path_len + 1;
  size_t used = (size_t)(end - rx->target.data);
  if (host_hdr) {
    /* Checked even when an absolute-form authority wins (RFC 9112 3.2.2):
     * a malformed Host is a malformed request. */
    char *out = rx->target.data + used;
    size_t n;
    if (tg_target_host(host_hdr, host_len, out, &n, &why) != 0)
      return head_error(c, 400, why);
    if (t->host == NULL && n > 0) {
      t->host = out;
      t->host_len = n;
    }
    used += n + 1;
  }
  rx->target.len = used;
  return 0;
}

static int on_headers_complete(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  const tg_http_limits_t *lim = &c->worker->server->cfg.limits;
  rx->in_trailers = 1; /* any header callback from here on is a trailer field */
  if (rx->hoff[0] >= rx->scratch.len) /* no URL at all */
    return head_error(c, 400, NULL);
  if (p->http_major != 1) /* HTTP/0.9 and anything newer than 1.x over this parser */
    return head_error(c, 505, NULL);
  /* A tunnel is not ours to open; the bytes after it must not be read as
   * requests either (the error closes the connection). */
  if (p->method == HTTP_CONNECT)
    return head_error(c, 405, "CONNECT is not supported");
  if ((p->flags & F_CONTENT_LENGTH) && p->content_length > lim->max_body_bytes)
    return head_error(c, 413, NULL);
  int hosts = 0, te = 0;
  const char *host = NULL, *te_value = NULL;
  for (uint32_t i = 0; i < rx->nhdr; i++) {
    if (hdr_is(rx, i, "host")) {
      hosts++;
      host = hdr_value(rx, i);
    } else if (hdr_is(rx, i, "transfer-encoding")) {
      te++;
      te_value = hdr_value(rx, i);
    } else if (hdr_is(rx, i, "upgrade")) {
      rx->upgrade = 1;
    }
  }
  /* RFC 9112 3.2: exactly one Host in HTTP/1.1; at most one in 1.0. */
  if (hosts > 1 || (hosts == 0 && p->http_minor >= 1))
    return head_error(c, 400, hosts ? "more than one Host header" : "missing Host header");
  if (te) {
    /* RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
     * framing; answer and close rather than guess. */
    if (p->http_minor == 0)
      return head_error(c, 400, "Transfer-Encoding in an HTTP/1.0 request");
    int status = te > 1 ? 400 : check_transfer_encoding(te_value);
    if (status)
      return head_error(c, status, status == 501 ? "transfer coding not supported"
                                                 : "invalid Transfer-Encoding");
  }
  int rc = parse_target(c, p, host);
  if (rc != 0)
    return rc;
  for (uint32_t i = 0; i < rx->nhdr; i++) {
    if (hdr_is(rx, i, "expect")) {
      if (strcasecmp(hdr_value(rx, i), "100-continue") != 0)
        return head_error(c, 417, NULL);
      rx->expect_continue = p->http_minor >= 1;
    }
  }
  if (rx->expect_continue && c->qhead == NULL && c->wbuf.len == 0 &&
      ((p->flags & F_CHUNKED) || p->content_length > 0)) {
    buf_take(c->worker, &c->wbuf);
    tg_buf_append(&c->wbuf, "HTTP/1.1 100 Continue\r\n\r\n", 25);
  }
  set_phase(c, PHASE_BODY, lim->body_timeout_ms);
  return 0;
}

static int on_body(llhttp_t *p, const char *at, size_t len) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (rx->body.len + len > c->worker->server->cfg.limits.max_body_bytes) {
    rx->err_status = 413;
    return HPE_USER;
  }
  if (tg_buf_append(&rx->body, at, len) != 0) {
    rx->err_status = 500;
    return HPE_USER;
  }
  return 0;
}

static int on_chunk_header(llhttp_t *p) {
  conn_t *c = p->data;
  c->rx->chunk_has_data = p->content_length > 0;
  return 0;
}

static int on_chunk_complete(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  if (!rx->chunk_has_data)
    return 0;
  rx->chunk_has_data = 0;
  rx->check_crlf = 1;
  return HPE_PAUSED;
}

/* A client's X-Request-Id goes into every log line of its request: only a
 * short token ([A-Za-z0-9._:-], 1..39 bytes) is adopted, else we make one. */
static void make_request_id(worker_priv_t *w, req_priv_t *r, const conn_rx_t *rx) {
  for (uint32_t i = 0; i < rx->nhdr; i++) {
    if (!hdr_is(rx, i, "x-request-id"))
      continue;
    const char *v = hdr_value(rx, i);
    size_t n = strlen(v);
    int ok = n > 0 && n < sizeof r->pub.request_id;
    for (size_t k = 0; ok && k < n; k++)
      ok = (v[k] >= '0' && v[k] <= '9') || (v[k] >= 'a' && v[k] <= 'z') ||
           (v[k] >= 'A' && v[k] <= 'Z') || v[k] == '-' || v[k] == '_' || v[k] == '.' ||
           v[k] == ':';
    if (ok) {
      memcpy(r->pub.request_id, v, n + 1);
      return;
    }
    break;
  }
  static const char hex[] = "0123456789abcdef";
  uint64_t hi = ((uint64_t)w->server->id_salt << 32) | (uint32_t)w->pub.id;
  uint64_t lo = w->req_counter;
  char *o = r->pub.request_id;
  for (int i = 15; i >= 0; i--)
    *o++ = hex[(hi >> (i * 4)) & 15];
  for (int i = 15; i >= 0; i--)
    *o++ = hex[(lo >> (i * 4)) & 15];
  *o = '\0';
}

/* "ip:port" or "[ip6]:port" of the client into out (64 bytes); "" when
 * unknown. Runs per request (the connection keeps the address as bytes):
 * no printf. */
static size_t format_peer(const conn_t *c, char *out) {
  char *o = out;
  out[0] = '\0';
  if (c->peer_family == AF_INET6)
    *o++ = '[';
  if (c->peer_family == 0 || uv_inet_ntop(c->peer_family, c->peer_addr, o, 48) != 0) {
    out[0] = '\0';
    return 0;
  }
  o += strlen(o);
  if (c->peer_family == AF_INET6)
    *o++ = ']';
  *o++ = ':';
  char digits[6];
  int n = 0;
  unsigned port = c->peer_port;
  do {
    digits[n++] = (char)('0' + port % 10);
    port /= 10;
  } while (port && n < 5);
  while (n > 0)
    *o++ = digits[--n];
  *o = '\0';
  return (size_t)(o - out);
}

static int on_message_complete(llhttp_t *p) {
  conn_t *c = p->data;
  conn_rx_t *rx = c->rx;
  worker_priv_t *w = c->worker;
  char peer_str[64];
  size_t peer_len = format_peer(c, peer_str) + 1;
  size_t hdrs_size = rx->nhdr * sizeof(tg_http_header_t);
  size_t total = sizeof(req_priv_t) + hdrs_size + rx->scratch.len + rx->target.len + rx->body.len +
                 1 + peer_len;
  req_priv_t *r = malloc(total);
  if (r == NULL) {
    rx->err_status = 500;
    return HPE_USER;
  }
  memset(r, 0, sizeof *r);
  char *mem = (char *)(r + 1);
  tg_http_header_t *hdrs = (tg_http_header_t *)mem;
  char *head = mem + hdrs_size;
  memcpy(head, rx->scratch.data, rx->scratch.len);
  char *target = head + rx->scratch.len;
  memcpy(target, rx->target.data, rx->target.len);
  char *body = target + rx->target.len;
  if (rx->body.len)
    memcpy(body, rx->body.data, rx->body.len);
  body[rx->body.len] = '\0';
  char *peer = body + rx->body.len + 1;
  memcpy(peer, peer_str, peer_len);

  for (uint32_t i = 0; i < rx->nhdr; i++) {
    hdrs[i].name = head + rx->hoff[1 + 2 * i];
    hdrs[i].value = head + rx->hoff[2 + 2 * i];
    hdrs[i].name_len = strlen(hdrs[i].name);
    hdrs[i].value_len = strlen(hdrs[i].value);
  }
  r->conn = c;
  /* After an Upgrade request the client may switch protocols whatever we
   * answer: its next bytes are not ours to parse as HTTP. */
  r->keep_alive = llhttp_should_keep_alive(p) && !rx->upgrade && !p->upgrade ? 1 : 0;
  r->head_method = p->method == HTTP_HEAD;
  tg_http_req_t *q = &r->pub;
  q->worker = &w->pub;
  q->id = ++w->req_counter;
  q->method = p->method;
  q->method_name = llhttp_method_name((llhttp_method_t)p->method);
  const tg_target_t *t = &rx->tgt;
  q->raw_target = head + rx->hoff[0];
  q->raw_target_len = strlen(q->raw_target);
  q->path = target + (t->path - rx->target.data);
  q->path_len = t->path_len;
  if (t->query) {
    q->query = target + (t->query - rx->target.data);
    q->query_len = t->query_len;
  }
  if (t->host) {
    q->host = target + (t->host - rx->target.data);
    q->host_len = t->host_len;
  }
  q->headers = hdrs;
  q->nheaders = rx->nhdr;
  q->body = body;
  q->body_len = rx->body.len;
  q->http_minor = p->http_minor;
  q->tls = c->tls != NULL;
  q->start_ns = rx->msg_start_ns;
  q->peer = peer;
  q->listener = (size_t)(c->listener - w->listeners);
  make_request_id(w, r, rx);
  queue_push(c, r);
  tg_buf_reset(&rx->scratch);
  tg_buf_reset(&rx->body);
  rx->head_bytes = 0;
  rx->in_message = 0;
  set_phase(c, PHASE_WAIT, 0);
  if (!r->keep_alive)
    c->stop_reading = 1;

  const tg_listener_config_t *lc = c->listener->cfg;
  lc->handler(q, lc->ud);

  if (c->writing && !c->closing) /* reading on does not move the send deadline */
    send_deadline(c);
  if (c->stop_reading || c->closing)
    return HPE_PAUSED;
  /* Answers the client has not taken yet count, whether still with their
   * handler or written into our buffers: a client that pipelines and never
   * reads stops being read. */
  if (c->queued + c->unsent >= w->server->cfg.limits.max_pipelined ||
      c->wbuf.len + c->inflight.len >= MAX_UNSENT_BYTES) {
    c->paused = 1;
    return HPE_PAUSED;
  }
  return 0;
}

static void settings_init(void) {
  llhttp_settings_init(&parser_settings);
  parser_settings.on_message_begin = on_message_begin;
  parser_settings.on_url = on_url;
  parser_settings.on_header_field = on_span;
  parser_settings.on_header_value = on_value_span;
  parser_settings.on_url_complete = on_url_complete;
  parser_settings.on_header_field_complete = on_field_complete;
  parser_settings.on_header_value_complete = on_value_complete;
  parser_settings.on_headers_complete = on_headers_complete;
  parser_settings.on_body = on_body;
  parser_settings.on_chunk_header = on_chunk_header;
  parser_settings.on_chunk_complete = on_chunk_complete;
  parser_settings.on_message_complete = on_message_complete;
}

/* Feeds plaintext to the parser. Returns 0 to go on reading, 1 when reading
 * must stop (error answer queued, paused, or the connection closed). */
static int conn_parse(conn_t *c, const char *data, size_t len) {
  if (c->stop_reading)
    return 1;
  if (c->rx == NULL && rx_take(c) == NULL) {
    conn_close(c);
    return 1;
  }
  conn_rx_t *rx = c->rx;
  if (c->paused) {
    if (tg_buf_append(&rx->pending_in, data, len) != 0)
      conn_close(c); /* dropping them would misframe what follows */
    return 1;
  }
  c->in_execute = 1;
  rx->exec_data = data;
  const char *cur = data;
  llhttp_errno_t e;
  for (;;) {
    e = llhttp_execute(&rx->parser, cur, len - (size_t)(cur - data));
    if (e != HPE_PAUSED || !rx->check_crlf)
      break;
    /* llhttp 8.1 skips the two bytes after chunk data without looking at
     * them; a proxy in front that checks would frame the body differently
     * (request smuggling). They sit just before the pause position, possibly
     * partly at the end of the previous read. */
    rx->check_crlf = 0;
    const char *pos = llhttp_get_error_pos(&rx->parser);
    size_t off = (size_t)(pos - data);
    char b1 = off >= 2 ? pos[-2] : off == 1 ? rx->tail[1] : rx->tail[0];
    char b2 = off >= 1 ? pos[-1] : rx->tail[1];
    if (b1 != '\r' || b2 != '\n') {
      rx->err_status = 400;
      rx->err_msg = "invalid chunk framing";
      e = HPE_USER;
      break;
    }
    llhttp_resume(&rx->parser);
    cur = pos;
  }
  if (len >= 2) {
    rx->tail[0] = data[len - 2];
    rx->tail[1] = data[len - 1];
  } else if (len == 1) {
    rx->tail[0] = rx->tail[1];
    rx->tail[1] = data[0];
  }
  c->in_execute = 0;
  if (c->closing)
    return 1;
  if (e == HPE_OK)
    return 0;
  if (e == HPE_PAUSED_UPGRADE) /* the Upgrade request was answered; nothing after it is read */
    c->stop_reading = 1;
  if (e == HPE_PAUSED || e == HPE_PAUSED_UPGRADE) {
    const char *pos = llhttp_get_error_pos(&rx->parser);
    size_t used = pos ? (size_t)(pos - data) : len;
    if (c->paused && used < len && tg_buf_append(&rx->pending_in, data + used, len - used) != 0)
      conn_close(c);
    return 1;
  }
  int status = rx->err_status ? rx->err_status : 400;
  const char *msg;
  switch (status) {
  case 413: msg = "request body too large"; break;
  case 414: msg = "request target too long"; break;
  case 431: msg = "request header fields too large"; break;
  case 417: msg = "expectation not supported"; break;
  case 505: msg = "HTTP version not supported"; break;
  case 500: msg = "out of memory"; break;
  case 405: case 501: msg = rx->err_msg ? rx->err_msg : tg_http_reason(status); break;
  default: msg = rx->err_msg ? rx->err_msg : llhttp_errno_name(e); status = 400; break;
  }
  if (e == HPE_INVALID_VERSION)
    status = 505, msg = "HTTP version not supported";
  if (status == 413 && rx->in_trailers && wants_json_error(rx))
    queue_error_json(c, status, msg);
  else
    queue_error(c, status, msg);
  return 1;
}

/* Parses what was read while paused, then reads again. A flush inside may
 * find the output drained and ask to resume once more: that is done by this
 * loop rather than by recursion, so a long pipeline costs no stack. */
static void conn_resume(conn_t *c) {
  if (c->resuming) {
    c->resume_again = 1;
    return;
  }
  c->resuming = 1;
  do {
    c->resume_again = 0;
    c->paused = 0;
    /* No parse state: parsing paused between two messages with nothing
     * left over, and the next byte starts afresh. */
    if (c->rx == NULL)
      break;
    llhttp_resume(&c->rx->parser);
    if (c->rx->pending_in.len == 0)
      break;
    tg_buf_t in = c->rx->pending_in;
    c->rx->pending_in = (tg_buf_t){0};
    conn_parse(c, in.data, in.len);
    tg_buf_free(&in);
    if (c->closing)
      break;
    drain_queue(c);
    if (c->closing)
      break;
    conn_flush(c);
  } while (c->resume_again && !c->closing);
  c->resuming = 0;
  if (c->closing)
    return;
  rx_release_if_idle(c);
  if (!c->paused && !c->reading && !c->stop_reading)
    conn_read_start(c);
}

/* ---- reading ---- */

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  conn_t *c = h->data;
  /* Safe to share: libuv reads one stream at a time and we consume the bytes
   * before the read callback returns. */
  *buf = uv_buf_init(c->worker->rbuf, READ_BUF_SIZE);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  conn_t *c = s->data;
  if (nread == 0)
    return;
  if (nread < 0) {
    /* EOF or error: answers for complete requests still go out if the peer
     * only half-closed; anything partial is dropped. */
    uv_read_stop(s);
    c->reading = 0;
    c->stop_reading = 1;
    c->close_when_done = 1;
    if (nread != UV_EOF || c->queued == 0)
      conn_close(c);
    else
      conn_flush(c);
    return;
  }
  if (c->tls) {
    if (tg_tls_feed(c->tls, buf->base, (size_t)nread) != 0) {
      conn_close(c);
      return;
    }
    for (;;) {
      int n = tg_tls_read(c->tls, c->worker->pbuf, READ_BUF_SIZE);
      if (n == 0)
        break;
      if (n < 0) {
        conn_close(c);
        return;
      }
      if (conn_parse(c, c->worker->pbuf, (size_t)n) != 0 && !c->paused)
        break;
      if (c->closing)
        return;
    }
    if (c->closing)
      return;
    drain_queue(c);
    conn_flush(c);
  } else {
    conn_parse(c, buf->base, (size_t)nread);
    if (c->closing)
      return;
    drain_queue(c);
    conn_flush(c);
  }
  if (c->closing)
    return;
  rx_release_if_idle(c);
  if ((c->paused || c->stop_reading) && c->reading) {
    uv_read_stop(s);
    c->reading = 0;
  }
}

static void conn_read_start(conn_t *c) {
  if (uv_read_start((uv_stream_t *)&c->handle, on_alloc, on_read) == 0)
    c->reading = 1;
}

/* ---- connection lifecycle ---- */

static void conn_handle_closed(uv_handle_t *h);

static void conn_close(conn_t *c) {
  if (c->closing)
    return;
  c->closing = 1;
  worker_priv_t *w = c->worker;
  /* Requests still with their handlers are orphaned: their answers are dropped. */
  req_priv_t *r = c->qhead;
  while (r) {
    req_priv_t *next = r->next;
    req_orphan(r);
    r = next;
  }
  c->qhead = c->qtail = NULL;
  c->queued = 0;
  if (c->prev)
    c->prev->nextc = c->nextc;
  else
    w->conns = c->nextc;
  if (c->nextc)
    c->nextc->prev = c->prev;
  w->nconns--;
  atomic_fetch_sub_explicit(&w->server->connections, 1, memory_order_relaxed);
  heap_remove(w, c);
  /* A close-delimited body that was cut must not end like a whole one. */
  if (!c->reset_on_close || uv_tcp_close_reset(&c->handle, conn_handle_closed) != 0)
    uv_close((uv_handle_t *)&c->handle, conn_handle_closed);
}

/* The parse state may be in use until here: conn_close can run inside a
 * parser callback. */
static void conn_handle_closed(uv_handle_t *h) {
  conn_t *c = h->data;
  worker_priv_t *w = c->worker;
  if (c->rx)
    rx_give(w, c->rx);
  tg_buf_free(&c->wbuf);
  tg_buf_free(&c->inflight);
  if (c->tls)
    tg_tls_free(c->tls);
  free(c);
  /* Give back what a burst of connections grew the deadline heap to. */
  if (w->heap_cap > 1024 && w->nconns < w->heap_cap / 4) {
    conn_t **heap = realloc(w->heap, (w->heap_cap / 2) * sizeof *heap);
    if (heap) {
      w->heap = heap;
      w->heap_cap /= 2;
    }
  }
  if (w->draining && w->nconns == 0)
    worker_finish(w);
}

static void on_connection(uv_stream_t *server, int status) {
  listener_t *l = server->data;
  worker_priv_t *w = l->worker;
  if (status < 0 || w->draining)
    return;
  conn_t *c = calloc(1, sizeof *c);
  if (c == NULL)
    return;
  uv_tcp_init(&w->loop, &c->handle);
  c->handle.data = c;
  if (uv_accept(server, (uv_stream_t *)&c->handle) != 0) {
    uv_close((uv_handle_t *)&c->handle, (uv_close_cb)free);
    return;
  }
  if (w->nconns >= w->max_conns) {
    /* Over the cap: a short answer, then the socket goes. */
    static const char busy[] = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                               "Connection: close\r\nRetry-After: 1\r\n\r\n";
    uv_buf_t b = uv_buf_init((char *)busy, sizeof busy - 1);
    if (l->tls == NULL)
      uv_try_write((uv_stream_t *)&c->handle, &b, 1);
    uv_close((uv_handle_t *)&c->handle, (uv_close_cb)free);
    return;
  }
  c->worker = w;
  c->listener = l;
  /* Its deadline's heap slot, so that setting one later cannot fail. */
  if (heap_reserve(w, w->nconns + 1) != 0) {
    uv_close((uv_handle_t *)&c->handle, (uv_close_cb)free);
    return;
  }
  uv_tcp_nodelay(&c->handle, 1);
  struct sockaddr_storage ss;
  int sl = sizeof ss;
  if (uv_tcp_getpeername(&c->handle, (struct sockaddr *)&ss, &sl) == 0) {
    if (ss.ss_family == AF_INET) {
      struct sockaddr_in *a = (struct sockaddr_in *)&ss;
      c->peer_family = AF_INET;
      c->peer_port = ntohs(a->sin_port);
      memcpy(c->peer_addr, &a->sin_addr, 4);
    } else if (ss.ss_family == AF_INET6) {
      struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
      c->peer_family = AF_INET6;
      c->peer_port = ntohs(a->sin6_port);
      memcpy(c->peer_addr, &a->sin6_addr, 16);
    }
  }
  if (l->tls) {
    c->tls = tg_tls_new(l->tls, NULL);
    if (c->tls == NULL) {
      uv_close((uv_handle_t *)&c->handle, (uv_close_cb)free);
      return;
    }
  }
  c->nextc = w->conns;
  if (w->conns)
    w->conns->prev = c;
  w->conns = c;
  w->nconns++;
  atomic_fetch_add_explicit(&w->server->connections, 1, memory_order_relaxed);
  /* The first request must start arriving within the header timeout. */
  set_phase(c, PHASE_HEAD, w->server->cfg.limits.header_timeout_ms);
  conn_read_start(c);
}

/* ---- workers ---- */

static void on_grace_expired(uv_timer_t *t) {
  worker_priv_t *w = t->data;
  conn_t *c = w->conns;
  while (c) {
    conn_t *next = c->nextc;
    conn_close(c);
    c = next;
  }
}

static void worker_free_spares(worker_priv_t *w) {
  while (w->rx_spare) {
    conn_rx_t *rx = w->rx_spare;
    w->rx_spare = rx->next_spare;
    rx_free(rx);
  }
  w->nrx_spare = 0;
  while (w->nbuf_spare > 0)
    tg_buf_free(&w->buf_spare[--w->nbuf_spare]);
  free(w->heap);
  w->heap = NULL;
  w->heap_len = w->heap_cap = 0;
}

/* Every connection is gone: let the application release its per-worker
 * state, then close the worker's own handles so its loop ends. */
static void worker_finish(worker_priv_t *w) {
  if (w->finished)
    return;
  w->finished = 1;
  tg_server_t *s = w->server;
  /* Producers of streams cut by the stop hear of it before the application
   * frees what they use. */
  while (w->notify_head)
    notify_run(w);
  if (s->cfg.on_worker_stop && w->app_started)
    s->cfg.on_worker_stop(&w->pub, s->cfg.ud);
  uv_close((uv_handle_t *)&w->grace_timer, NULL);
  uv_close((uv_handle_t *)&w->date_timer, NULL);
  uv_close((uv_handle_t *)&w->conn_timer, NULL);
  uv_close((uv_handle_t *)&w->stop_async, NULL);
  uv_close((uv_handle_t *)&w->notify_idle, NULL);
  worker_free_spares(w);
}

/* A drain of some listeners: close their sockets (new connections are
 * refused) and let their connections finish the request in flight, then close. */
static void close_listeners(worker_priv_t *w, uint64_t mask) {
  for (size_t i = 0; i < w->nlisteners && i < 64; i++) {
    listener_t *l = &w->listeners[i];
    if (!(mask & (UINT64_C(1) << i)) || !l->opened || l->closed)
      continue;
    l->closed = 1;
    uv_close((uv_handle_t *)&l->handle, NULL);
  }
  conn_t *c = w->conns;
  while (c) {
    conn_t *next = c->nextc;
    size_t li = (size_t)(c->listener - w->listeners);
    if (li < 64 && (mask & (UINT64_C(1) << li))) {
      c->stop_reading = 1;
      c->close_when_done = 1;
      if (c->queued == 0 && !c->writing)
        conn_close(c);
    }
    c = next;
  }
}

static void on_stop(uv_async_t *a) {
  worker_priv_t *w = a->data;
  if (w->draining)
    return;
  if (!atomic_load(&w->server->stopping)) {
    close_listeners(w, atomic_load(&w->server->close_mask));
    return;
  }
  w->draining = 1;
  for (size_t i = 0; i < w->nlisteners; i++)
    if (w->listeners[i].opened && !w->listeners[i].closed)
      uv_close((uv_handle_t *)&w->listeners[i].handle, NULL);
  /* Idle connections go now; busy ones when their last answer is written. */
  conn_t *c = w->conns;
  while (c) {
    conn_t *next = c->nextc;
    c->stop_reading = 1;
    c->close_when_done = 1;
    if (c->queued == 0 && !c->writing)
      conn_close(c);
    c = next;
  }
  if (w->nconns == 0) {
    worker_finish(w);
  } else {
    uv_timer_start(&w->grace_timer, on_grace_expired, w->server->grace_ms, 0);
  }
}

static void *worker_main(void *arg) {
  worker_priv_t *w = arg;
  tg_server_t *s = w->server;
  tg_worker_set_self(&w->pub);
  w->start_rc = 0;
  for (size_t i = 0; i < w->nlisteners; i++) {
    listener_t *l = &w->listeners[i];
    if (l->fd < 0)
      continue;
    if (l->cfg->tls_cert_file && l->cfg->tls_key_file) {
      l->tls = tg_tls_server_ctx_new(l->cfg->tls_cert_file, l->cfg->tls_key_file, w->start_err,
                                     sizeof w->start_err);
      if (l->tls == NULL) {
        w->start_rc = -EINVAL;
        goto started;
      }
    }
    uv_tcp_init(&w->loop, &l->handle);
    l->handle.data = l;
    l->opened = 1;
    int rc = uv_tcp_open(&l->handle, l->fd);
    if (rc == 0)
      rc = uv_listen((uv_stream_t *)&l->handle, 4096, on_connection);
    if (rc != 0) {
      snprintf(w->start_err, sizeof w->start_err, "listen: %s", uv_strerror(rc));
      w->start_rc = rc;
      goto started;
    }
  }
  w->app_started = s->cfg.on_worker_start != NULL;
  if (s->cfg.on_worker_start && (w->start_rc = s->cfg.on_worker_start(&w->pub, s->cfg.ud)) != 0)
    snprintf(w->start_err, sizeof w->start_err, "worker %d failed to start", w->pub.id);
started:
  uv_sem_post(&s->started);
  /* Runs until on_stop drains every connection (on a failed start, until
   * tg_server_start stops us). */
  uv_run(&w->loop, UV_RUN_DEFAULT);
  for (size_t i = 0; i < w->nlisteners; i++)
    if (!w->listeners[i].opened && w->listeners[i].fd >= 0)
      close(w->listeners[i].fd);
  for (size_t i = 0; i < w->nlisteners; i++)
    if (w->listeners[i].tls)
      tg_tls_ctx_free(w->listeners[i].tls);
  tg_worker_set_self(NULL);
  return NULL;
}

static int open_listener(const tg_listener_config_t *lc, int port, int probe, int *out_port,
                         char *err, size_t errlen) {
  struct addrinfo hints = {0}, *ai = NULL;
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", port);
  int rc = getaddrinfo(lc->host, portstr, &hints, &ai);
  if (rc != 0) {
    snprintf(err, errlen, "%s: %s", lc->host, gai_strerror(rc));
    return -EINVAL;
  }
  int fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    rc = -errno;
    snprintf(err, errlen, "socket: %s", strerror(errno));
    goto fail;
  }
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  /* SO_REUSEPORT would let this bind share a port that another process of
   * the same user listens on (a second gateway, say), splitting its traffic
   * silently: bind it plainly first, which only a listener refuses. */
  if (probe && port != 0 && bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
    rc = -errno;
    snprintf(err, errlen, "%s:%d: %s", lc->host, port, strerror(errno));
    close(fd);
    goto fail;
  }
  if (probe && port != 0) {
    close(fd);
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
      rc = -errno;
      snprintf(err, errlen, "socket: %s", strerror(errno));
      goto fail;
    }
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  }
  if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one) != 0 ||
      bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 4096) != 0) {
    rc = -errno;
    snprintf(err, errlen, "%s:%d: %s", lc->host, port, strerror(errno));
    close(fd);
    goto fail;
  }
  struct sockaddr_storage ss;
  socklen_t sl = sizeof ss;
  getsockname(fd, (struct sockaddr *)&ss, &sl);
  *out_port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                       : ntohs(((struct sockaddr_in *)&ss)->sin_port);
  freeaddrinfo(ai);
  return fd;
fail:
  freeaddrinfo(ai);
  return rc;
}

static void server_free(tg_server_t *s) {
  if (s->workers) {
    for (int i = 0; i < s->nworkers; i++) {
      worker_priv_t *w = s->workers[i];
      if (w == NULL)
        continue;
      uv_loop_close(&w->loop);
      free(w->listeners);
      free(w);
    }
  }
  free(s->workers);
  free(s->fds);
  free(s->ports);
  free(s->listeners);
  uv_sem_destroy(&s->started);
  free(s);
}

static void limits_defaults(tg_http_limits_t *l) {
  if (!l->max_header_bytes)
    l->max_header_bytes = 16384;
  if (l->max_header_bytes > 60000) /* header offsets are 16-bit */
    l->max_header_bytes = 60000;
  if (!l->max_body_bytes)
    l->max_body_bytes = 4u << 20;
  if (!l->header_timeout_ms)
    l->header_timeout_ms = 10000;
  if (!l->body_timeout_ms)
    l->body_timeout_ms = 30000;
  if (!l->idle_timeout_ms)
    l->idle_timeout_ms = 60000;
  if (!l->max_connections)
    l->max_connections = 10000;
  if (!l->max_pipelined)
    l->max_pipelined = 32;
}

int tg_server_start(tg_server_t **out, const tg_server_config_t *cfg, char *err, size_t errlen) {
  pthread_once(&settings_once, settings_init);
  *out = NULL;
  tg_server_t *s = calloc(1, sizeof *s);
  if (s == NULL)
    return -ENOMEM;
  uv_sem_init(&s->started, 0);
  s->cfg = *cfg;
  limits_defaults(&s->cfg.limits);
  s->grace_ms = 10000;
  s->nworkers = cfg->nworkers > 0 ? cfg->nworkers : (int)uv_available_parallelism();
  s->id_salt = (uint32_t)(uv_hrtime() ^ ((uint64_t)getpid() << 16));
  size_t nl = cfg->nlisteners;
  s->listeners = calloc(nl ? nl : 1, sizeof *s->listeners);
  s->ports = calloc(nl ? nl : 1, sizeof *s->ports);
  s->fds = malloc(sizeof(int) * (size_t)s->nworkers * (nl ? nl : 1));
  s->workers = calloc((size_t)s->nworkers, sizeof *s->workers);
  int rc = -ENOMEM;
  if (!s->listeners || !s->ports || !s->fds || !s->workers)
    goto fail;
  memcpy(s->listeners, cfg->listeners, nl * sizeof *s->listeners);
  s->cfg.listeners = s->listeners;
  for (size_t i = 0; i < (size_t)s->nworkers * nl; i++)
    s->fds[i] = -1;

  /* Every socket is bound here, so a taken port fails start-up plainly. */
  for (size_t li = 0; li < nl; li++) {
    const tg_listener_config_t *lc = &s->listeners[li];
    int port = lc->port;
    int nsock = lc->single_worker ? 1 : s->nworkers;
    for (int wi = 0; wi < nsock; wi++) {
      int got = 0;
      int fd = open_listener(lc, port, wi == 0, &got, err, errlen);
      if (fd < 0) {
        rc = fd;
        goto fail_fds;
      }
      s->fds[(size_t)wi * nl + li] = fd;
      port = got;
    }
    s->ports[li] = port;
  }
  /* Fail early on a bad certificate, before threads exist. */
  for (size_t li = 0; li < nl; li++) {
    const tg_listener_config_t *lc = &s->listeners[li];
    if (lc->tls_cert_file && lc->tls_key_file) {
      tg_tls_ctx_t *t = tg_tls_server_ctx_new(lc->tls_cert_file, lc->tls_key_file, err, errlen);
      if (t == NULL) {
        rc = -EINVAL;
        goto fail_fds;
      }
      tg_tls_ctx_free(t);
    }
  }

  uint32_t per_worker = (s->cfg.limits.max_connections + (uint32_t)s->nworkers - 1) / (uint32_t)s->nworkers;
  int started = 0;
  for (int wi = 0; wi < s->nworkers; wi++) {
    worker_priv_t *w = calloc(1, sizeof *w);
    if (w == NULL)
      goto fail_threads;
    s->workers[wi] = w;
    w->server = s;
    w->pub.id = wi;
    w->pub.loop = &w->loop;
    w->max_conns = per_worker;
    /* The stop handle is how the worker is ever told to stop: without it the
     * server could not be stopped, so start-up fails instead. */
    int urc = uv_loop_init(&w->loop);
    if (urc == 0 && (urc = uv_async_init(&w->loop, &w->stop_async, on_stop)) != 0)
      uv_loop_close(&w->loop);
    if (urc != 0) {
      s->workers[wi] = NULL;
      free(w);
      rc = urc;
      snprintf(err, errlen, "cannot set up worker %d's loop: %s", wi, uv_strerror(urc));
      goto fail_threads;
    }
    w->stop_async.data = w;
    uv_timer_init(&w->loop, &w->grace_timer);
    w->grace_timer.data = w;
    uv_timer_init(&w->loop, &w->date_timer);
    w->date_timer.data = w;
    uv_timer_init(&w->loop, &w->conn_timer);
    w->conn_timer.data = w;
    uv_unref((uv_handle_t *)&w->conn_timer); /* connections keep the loop alive, not their deadlines */
    uv_idle_init(&w->loop, &w->notify_idle);
    w->notify_idle.data = w;
    update_date(w);
    uv_timer_start(&w->date_timer, on_date_timer, 1000, 1000);
    uv_unref((uv_handle_t *)&w->date_timer);
    w->listeners = calloc(nl ? nl : 1, sizeof *w->listeners);
    if (w->listeners == NULL)
      goto fail_threads;
    w->nlisteners = nl;
    for (size_t li = 0; li < nl; li++) {
      w->listeners[li].worker = w;
      w->listeners[li].cfg = &s->listeners[li];
      w->listeners[li].fd = s->fds[(size_t)wi * nl + li];
    }
    /* An explicit stack: workers run Lua policies, whose C-stack budget
     * (policy/state.c) should not depend on the ulimit -s of whoever started
     * the process. */
    pthread_attr_t attr;
    int prc = pthread_attr_init(&attr);
    if (prc == 0) {
      pthread_attr_setstacksize(&attr, WORKER_STACK_BYTES);
      prc = pthread_create(&w->thread, &attr, worker_main, w);
      pthread_attr_destroy(&attr);
    }
    if (prc != 0) {
      rc = -prc;
      snprintf(err, errlen, "cannot start worker %d: %s", wi, strerror(prc));
      goto fail_threads;
    }
    started++;
    uv_sem_wait(&s->started);
    if (w->start_rc != 0) {
      rc = w->start_rc;
      snprintf(err, errlen, "%s", w->start_err);
      goto fail_threads;
    }
  }
  *out = s;
  return 0;

fail_threads:
  atomic_store(&s->stopping, 1);
  for (int wi = 0; wi < started; wi++) {
    uv_async_send(&s->workers[wi]->stop_async);
    pthread_join(s->workers[wi]->thread, NULL);
  }
  for (int wi = started; wi < s->nworkers; wi++) {
    worker_priv_t *w = s->workers[wi];
    if (w == NULL) { /* never set up: its sockets are still only in s->fds */
      for (size_t li = 0; li < nl; li++)
        if (s->fds[(size_t)wi * nl + li] >= 0)
          close(s->fds[(size_t)wi * nl + li]);
      continue;
    }
    uv_close((uv_handle_t *)&w->stop_async, NULL);
    uv_close((uv_handle_t *)&w->grace_timer, NULL);
    uv_close((uv_handle_t *)&w->date_timer, NULL);
    uv_close((uv_handle_t *)&w->conn_timer, NULL);
    uv_close((uv_handle_t *)&w->notify_idle, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    for (size_t li = 0; li < nl; li++)
      if (w->listeners && w->listeners[li].fd >= 0)
        close(w->listeners[li].fd);
  }
  server_free(s);
  return rc;
fail_fds:
  for (size_t i = 0; i < (size_t)s->nworkers * nl; i++)
    if (s->fds[i] >= 0)
      close(s->fds[i]);
fail:
  server_free(s);
  return rc;
}

int tg_server_port(const tg_server_t *s, size_t i) {
  return i < s->cfg.nlisteners ? s->ports[i] : -1;
}

uint64_t tg_server_connections(const tg_server_t *s) {
  return atomic_load_explicit(&s->connections, memory_order_relaxed);
}

uint64_t tg_server_stream_peak(const tg_server_t *s) {
  return atomic_load_explicit(&s->stream_peak, memory_order_relaxed);
}

void tg_server_close_listeners(tg_server_t *s, size_t first, size_t n) {
  uint64_t mask = 0;
  for (size_t i = first; i < first + n && i < s->cfg.nlisteners && i < 64; i++)
    mask |= UINT64_C(1) << i;
  atomic_fetch_or(&s->close_mask, mask);
  for (int i = 0; i < s->nworkers; i++)
    uv_async_send(&s->workers[i]->stop_async);
}

void tg_server_stop(tg_server_t *s, uint32_t grace_ms) {
  s->grace_ms = grace_ms;
  atomic_store(&s->stopping, 1);
  for (int i = 0; i < s->nworkers; i++)
    uv_async_send(&s->workers[i]->stop_async);
  for (int i = 0; i < s->nworkers; i++)
    pthread_join(s->workers[i]->thread, NULL);
  server_free(s);
}
