#ifndef TG_HTTP_SERVER_H
#define TG_HTTP_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "base/worker.h"

/* HTTP/1.1 server: N worker threads, each with its own libuv loop and its own
 * SO_REUSEPORT listening socket per listener; no lock on the request path.
 * Keep-alive, pipelining (responses in request order), chunked request bodies,
 * Expect: 100-continue, limits (431, 413, 408, connection cap), optional TLS.
 *
 * What never reaches a handler (answered here, then the connection closes):
 * a target or Host that does not normalize (400, net/target.h), "*" but for
 * OPTIONS (400), CONNECT (405), Transfer-Encoding in HTTP/1.0 (400), a
 * transfer coding other than a lone "chunked" (501, or 400 when chunked is
 * not last), obs-fold (400). Trailer fields are read and dropped, never
 * merged into the headers. A request carrying Upgrade is served as plain
 * HTTP (RFC 9110 7.8 lets a server ignore it) and the connection then
 * closes, so bytes after it are never parsed as another request.
 *
 * Backpressure: a connection stops being read while the client has not taken
 * max_pipelined answers (queued, or serialized but unwritten) or 256 KiB of
 * unwritten output, and is read again once its output has drained; one whose
 * output makes no progress for idle_timeout_ms is closed.
 *
 * An idle keep-alive connection holds no parse state, buffer or timer of its
 * own: about 450 bytes with its libuv handle (plus the TLS session over TLS). */

typedef struct tg_http_header {
  const char *name;
  size_t name_len;
  const char *value;
  size_t value_len;
} tg_http_header_t;

typedef struct tg_http_req tg_http_req_t;

/* What handlers note about a request for its access log line
 * (gateway/access.h): zero when the request arrives, set by whichever layer
 * knows, read once the answer is queued (tg_server_config_t.on_answered).
 * Plain copies: nothing here is owned. Never a secret: payer is already
 * redacted by whoever sets it. */
typedef struct tg_http_note {
  char tenant[65];             /* "" unknown */
  const char *route;           /* static or outlives the server: the RPC method; NULL: plain HTTP */
  bool priced;                 /* price and currency hold what was charged or quoted */
  int64_t price;               /* atomic units */
  char currency[33];
  char payer[24];              /* redacted: "0x1234…abcd", "****1234" */
} tg_http_note_t;

/* Called on the worker thread once the whole request (headers and body) is in.
 * The handler answers now or later with tg_http_respond(), exactly once. */
typedef void (*tg_http_handler_fn)(tg_http_req_t *req, void *ud);

struct tg_http_req {
  tg_worker_t *worker;
  uint64_t id;                 /* unique in this process */
  char request_id[40];         /* X-Request-Id if the client sent a sane one, else generated */
  int method;                  /* llhttp_method_t (HTTP_GET, HTTP_POST, ...) */
  const char *method_name;     /* "GET", "POST", ... */
  /* The target, normalized once before the handler runs (net/target.h): dot
   * segments removed, unreserved %XX decoded, '/' runs merged. Every lookup
   * (routing, policy, catalog) uses this; "*" only for OPTIONS *. */
  const char *path;            /* NUL-terminated, starts with '/' (or is "*") */
  size_t path_len;
  const char *query;           /* after '?', verbatim, NUL-terminated, or NULL */
  size_t query_len;
  const char *raw_target;      /* the request target exactly as received, NUL-terminated */
  size_t raw_target_len;
  /* The host the request is for, validated and lower-cased (net/target.h):
   * from an absolute-form target when there is one (RFC 9112 3.2.2: it wins
   * over Host), else from the Host header. The port is included when the
   * client sent one ("api.example:8080", "[::1]:80"); tg_tenants_by_host
   * matches with and without it. NULL when the request names no host
   * (HTTP/1.0 without Host, or an empty Host). */
  const char *host;
  size_t host_len;
  tg_http_header_t *headers;   /* as received; names and values NUL-terminated */
  size_t nheaders;
  const char *body;            /* de-chunked body, NUL-terminated (terminator not counted) */
  size_t body_len;
  int http_minor;              /* 0 or 1 */
  int tls;                     /* arrived over TLS */
  uint64_t start_ns;           /* uv_hrtime() when the request line arrived */
  const char *peer;            /* "ip:port" of the client */
  size_t listener;             /* index of the listener it arrived on */
  tg_http_note_t note;         /* for the access log; handlers write it */
};

/* Case-insensitive header lookup; NULL when absent. The first match wins. */
const tg_http_header_t *tg_http_req_header(const tg_http_req_t *req, const char *name);
/* The same for a name of n bytes (not NUL-terminated). */
const tg_http_header_t *tg_http_req_header_n(const tg_http_req_t *req, const char *name, size_t n);

/* The client's address without its port ("127.0.0.1", "[::1]") into out. */
void tg_http_peer_ip(const tg_http_req_t *req, char *out, size_t outlen);

/* Answers req. Copies status, headers and body; after this call req and
 * everything it points to must not be used. Content-Length, Date, Server and
 * Connection are added by the server: do not pass them. A status outside
 * 200..599, a header name that is not a token, a value holding CR, LF, NUL or
 * another control byte, or a framing header (Content-Length,
 * Transfer-Encoding, Connection) is a handler bug: the client gets a plain
 * 500 instead, never a split or doubled header. Safe to call from the
 * worker thread only, at any time after the handler was called (also after
 * the client went away: the answer is then dropped). */
void tg_http_respond(tg_http_req_t *req, int status, const tg_http_header_t *headers,
                     size_t nheaders, const void *body, size_t body_len);

/* Convenience for small fixed answers: one Content-Type header and a body. */
void tg_http_respond_simple(tg_http_req_t *req, int status, const char *content_type,
                            const void *body, size_t body_len);

/* Answers with body serialized as compact JSON (Content-Type
 * application/json), or a 500 when it cannot be serialized. Takes the
 * reference to body (NULL answers 500: a json_* constructor failed). */
void tg_http_respond_json(tg_http_req_t *req, int status, json_t *body);

/* Streamed answers: the head now, the body as it is produced, for bodies
 * that are not held whole (net/proxy.h). The request itself was read whole
 * (max_body_bytes) before the handler ran; only the answer streams.
 *
 *   tg_http_stream_start   the status and headers, under the same rules as
 *                          tg_http_respond (Date and Server are added;
 *                          Content-Length, Transfer-Encoding and Connection
 *                          must not be passed). content_length >= 0 is
 *                          announced and must then be written exactly; -1
 *                          (unknown) frames the body as chunks for HTTP/1.1
 *                          and by the end of the connection for HTTP/1.0 (the
 *                          connection then closes, and nothing pipelined
 *                          after the request is answered). A HEAD request,
 *                          a 204 and a 304 carry no body: writes are dropped
 *                          (HEAD still announces content_length when >= 0).
 *   tg_http_stream_write   copies len bytes. Returns 0; 1 when the stream now
 *                          holds 256 KiB or more of unwritten output (the
 *                          bytes were taken: pause the source until on_drain);
 *                          -E2BIG when more than content_length would be
 *                          written (nothing taken); -ECONNRESET or -ENOMEM
 *                          when the client is gone (nothing taken; on_abort
 *                          follows unless tg_http_stream_end comes first).
 *   tg_http_stream_on_drain  cb runs once the output held is down to 64 KiB
 *                          after a write answered 1.
 *   tg_http_stream_on_abort  cb runs when the client goes away before the
 *                          answer is ended (also before it started: a
 *                          handler may register it while it waits for its
 *                          source). req is freed before cb runs: the
 *                          producer stops and never touches req again.
 *   tg_http_stream_end     ok: the body is complete (a short Content-Length
 *                          body counts as not ok). Not ok: the answer was
 *                          cut; answers before it are still written, then the
 *                          connection closes (reset for a close-delimited
 *                          body, so the client never reads a cut as whole).
 *                          After it req is not used again. Returns 0, or
 *                          negative when the client was already gone.
 *
 * Answers keep request order: a stream behind pending answers holds its
 * output (and answers 1 at the high mark) until those are written. Every
 * callback runs on the worker thread from the loop, never inside a
 * tg_http_* call, and never after tg_http_stream_end or after the request
 * was freed. A stream's output counts towards the connection's send
 * deadline (idle_timeout_ms without write progress closes it). The handler
 * uses either tg_http_respond or the stream calls for a request; a
 * negative tg_http_stream_start (-ECONNRESET: the client is gone; -EINVAL:
 * bad status or header, a 500 was sent instead; -ENOMEM) has finished the
 * request. Worker thread only. */
int tg_http_stream_start(tg_http_req_t *req, int status, const tg_http_header_t *headers,
                         size_t nheaders, int64_t content_length);
int tg_http_stream_write(tg_http_req_t *req, const void *data, size_t len);
void tg_http_stream_on_drain(tg_http_req_t *req, void (*cb)(void *ud), void *ud);
void tg_http_stream_on_abort(tg_http_req_t *req, void (*cb)(void *ud), void *ud);
int tg_http_stream_end(tg_http_req_t *req, bool ok);

/* Reason phrase for a status code ("OK", "Not Found", ...). */
const char *tg_http_reason(int status);

typedef struct tg_http_limits {
  size_t max_header_bytes;     /* request line + headers; over it: 431 (default 16 KiB) */
  size_t max_body_bytes;       /* over it: 413 (default 4 MiB) */
  uint32_t header_timeout_ms;  /* whole head must arrive within this: else 408 and close (default 10 s) */
  uint32_t body_timeout_ms;    /* whole body within this after the head: else 408 (default 30 s) */
  uint32_t idle_timeout_ms;    /* keep-alive idle, or output left unread, before close (default 60 s) */
  uint32_t max_connections;    /* for the whole server; spread over workers (default 10000) */
  uint32_t max_pipelined;      /* answers not yet written (queued or unsent) before reading pauses (default 32) */
} tg_http_limits_t;

typedef struct tg_listener_config {
  const char *host;            /* "127.0.0.1", "0.0.0.0", "::" */
  int port;                    /* 0 picks a free port; tg_server_port() tells which */
  const char *tls_cert_file;   /* PEM; both set enables TLS on this listener */
  const char *tls_key_file;
  int single_worker;           /* 1: only worker 0 accepts (admin listener) */
  tg_http_handler_fn handler;
  void *ud;
} tg_listener_config_t;

typedef struct tg_server_config {
  const tg_listener_config_t *listeners;
  size_t nlisteners;
  int nworkers;                /* <= 0: number of cores */
  tg_http_limits_t limits;     /* zero fields take the defaults */
  /* Called on each worker thread before it accepts, and after it stops.
   * on_worker_stop follows every on_worker_start, also one that failed
   * (it undoes a partial start, or the worker's loop could not end). */
  int (*on_worker_start)(tg_worker_t *w, void *ud);
  void (*on_worker_stop)(tg_worker_t *w, void *ud);
  /* Optional: called on the worker thread once a handler's answer is taken
   * (tg_http_respond, or tg_http_stream_end: body_bytes is what was
   * written), also when the client went away meanwhile; req is valid for
   * the call only. Answers the server makes itself (400, 413, ...) never
   * reached a handler and are not reported. */
  void (*on_answered)(const tg_http_req_t *req, int status, uint64_t body_bytes, void *ud);
  void *ud;
} tg_server_config_t;

typedef struct tg_server tg_server_t;

/* Binds every listener, starts the workers and returns once all accept.
 * Returns 0 or a negative errno; on failure err names the reason. */
int tg_server_start(tg_server_t **out, const tg_server_config_t *cfg, char *err, size_t errlen);

/* Actual bound port of listener i (useful with port 0). */
int tg_server_port(const tg_server_t *s, size_t i);

/* Number of open connections across workers (approximate while running). */
uint64_t tg_server_connections(const tg_server_t *s);

/* The most output any streamed answer held at once (bytes taken by
 * tg_http_stream_write, not yet written to the socket), across workers since
 * start: what a slow client costs a stream. */
uint64_t tg_server_stream_peak(const tg_server_t *s);

/* Drain of listeners [first, first + n): their sockets close on every
 * worker (a new connection is refused), and their connections close once
 * the request in flight is answered (that answer says Connection: close);
 * other listeners serve on. Idempotent; any thread; tg_server_stop later
 * stops the rest. */
void tg_server_close_listeners(tg_server_t *s, size_t first, size_t n);

/* Graceful stop: closes listeners, lets in-flight requests finish for up to
 * grace_ms, then closes every connection, joins the workers and frees s.
 * Call from the thread that started the server. */
void tg_server_stop(tg_server_t *s, uint32_t grace_ms);

#endif
