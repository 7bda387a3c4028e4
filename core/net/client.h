#ifndef TG_HTTP_CLIENT_H
#define TG_HTTP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "net/server.h"

/* Outbound HTTP/1.1 client for one worker loop (billing adapter, facilitator,
 * RSL fetch): pooled keep-alive connections per origin (scheme://host:port),
 * TLS via mbedTLS with certificate verification, connect and request
 * timeouts, a bounded pool with a bounded wait queue. Never blocks the loop
 * (name resolution goes through uv_getaddrinfo; results are reused for 10 s;
 * the addresses of a name are tried in order; IP literals skip the resolver).
 *
 * A connection returns to the pool only after a complete response that did
 * not ask to close. When a connection fails before any byte of the response
 * arrived (EOF, reset) and the request is idempotent or the connection was a
 * reused one (the keep-alive race: the server closed it while idle), the
 * request is sent once more on another connection, and the origin's other
 * idle connections are dropped. Note this can repeat a POST that went out
 * on a reused connection the server closed without answering. */

typedef struct tg_httpc tg_httpc_t;

typedef struct tg_httpc_opts {
  uint32_t max_conns_per_origin;   /* default 64 */
  uint32_t max_queue_per_origin;   /* requests waiting for a connection (incl. ones being
                                      dialed for them); more: -EBUSY; default 1024 */
  uint32_t connect_timeout_ms;     /* TCP connect + TLS handshake; default 2000 */
  uint32_t idle_timeout_ms;        /* pooled idle connection lifetime; default 60000 */
  size_t max_response_bytes;       /* status line, headers and body; default 8 MiB;
                                      larger: -EFBIG */
  const char *ca_file;             /* NULL: system bundle */
} tg_httpc_opts_t;

typedef struct tg_httpc_request {
  const char *method;              /* "GET", "POST", ... */
  const char *url;                 /* http:// or https:// absolute URL */
  const tg_http_header_t *headers; /* extra headers; Host, Content-Length (for a body or
                                      POST/PUT/PATCH) and User-Agent (unless given) are
                                      added; given Host, Content-Length, Transfer-Encoding
                                      are ignored; CR/LF in values: -EINVAL */
  size_t nheaders;
  const void *body;
  size_t body_len;
  uint32_t timeout_ms;             /* whole request incl. waiting for a connection; 0 = 30000 */
  int idempotent;                  /* 1: safe to send twice (e.g. it carries an idempotency
                                      key). Only such requests, and GET/HEAD/PUT/DELETE/
                                      OPTIONS, are retried when a reused connection turns
                                      out closed; any other fails with UV_ECONNRESET/UV_EOF */
} tg_httpc_request_t;

typedef struct tg_httpc_response {
  int status;
  const tg_http_header_t *headers; /* as received; names and values NUL-terminated */
  size_t nheaders;
  const char *body;                /* de-chunked, NUL-terminated ("" when none) */
  size_t body_len;
} tg_httpc_response_t;

/* err is 0 with resp set (any status: 4xx and 5xx are responses too; 1xx
 * are skipped), or negative with resp NULL: UV_ETIMEDOUT (request deadline
 * or connect timeout), UV_ECONNREFUSED, UV_ECONNRESET (closed before the
 * response was complete), UV_EAI_*, -EFBIG (response too large), -EPROTO
 * (bad HTTP or TLS failure, incl. certificate), -ECANCELED (client freed),
 * -EBUSY (queue full), -ENOMEM. resp and its buffers live only during the
 * call. The callback may send new requests, or free the client. */
typedef void (*tg_httpc_cb)(int err, const tg_httpc_response_t *resp, void *ud);

/* opts may be NULL for defaults. Only the loop's thread may use the client. */
tg_httpc_t *tg_httpc_new(uv_loop_t *loop, const tg_httpc_opts_t *opts);
/* Cancels what is in flight (callbacks run with -ECANCELED before this
 * returns), closes connections; the memory is freed once the handles are
 * closed, so run the loop afterwards. Sends on a freed client are not
 * allowed (inside a callback run by this call they return -ECANCELED). */
void tg_httpc_free(tg_httpc_t *c);

/* Starts a request; the callback runs exactly once, never synchronously
 * (errors found at once, like a full queue, arrive on the next loop turn).
 * Returns 0, or a negative errno (bad URL, method or header: -EINVAL;
 * -ENOMEM) without calling cb. Copies everything in req. URLs: http or https,
 * host name, IPv4 or [IPv6] literal, optional port, no user info. */
int tg_httpc_send(tg_httpc_t *c, const tg_httpc_request_t *req, tg_httpc_cb cb, void *ud);

/* Text of an error code from the callback. */
const char *tg_httpc_strerror(int err);

/* Details of the most recent failure on this client, for logs: the TLS reason
 * ("certificate verification failed: ..."), the resolver's message, the HTTP
 * parse error. "" before any failure. Owned by the client; valid until the
 * next call into it or the next loop turn. */
const char *tg_httpc_last_error(const tg_httpc_t *c);

/* Lookup in a response's headers (case-insensitive); NULL when absent. */
const tg_http_header_t *tg_httpc_header(const tg_httpc_response_t *resp, const char *name);

#endif
