#ifndef TG_HTTP_CLIENT_H
#define TG_HTTP_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "server.h"

/* Outbound HTTP/1.1 client for one worker loop (billing adapter, facilitator,
 * RSL fetch): pooled keep-alive connections per origin (scheme://host:port),
 * TLS via mbedTLS with certificate verification, connect and request
 * timeouts, a bounded pool with a bounded wait queue. Never blocks the loop
 * (name resolution goes through uv_getaddrinfo). */

typedef struct tg_httpc tg_httpc_t;

typedef struct tg_httpc_opts {
  uint32_t max_conns_per_origin;   /* default 64 */
  uint32_t max_queue_per_origin;   /* requests waiting for a connection; default 1024 */
  uint32_t connect_timeout_ms;     /* default 2000 */
  uint32_t idle_timeout_ms;        /* pooled idle connection lifetime; default 60000 */
  size_t max_response_bytes;       /* default 8 MiB; larger: -EFBIG */
  const char *ca_file;             /* NULL: system bundle */
} tg_httpc_opts_t;

typedef struct tg_httpc_request {
  const char *method;              /* "GET", "POST", ... */
  const char *url;                 /* http:// or https:// absolute URL */
  const tg_http_header_t *headers; /* extra headers; Host, Content-Length added */
  size_t nheaders;
  const void *body;
  size_t body_len;
  uint32_t timeout_ms;             /* whole request incl. waiting for a connection; 0 = 30000 */
} tg_httpc_request_t;

typedef struct tg_httpc_response {
  int status;
  const tg_http_header_t *headers;
  size_t nheaders;
  const char *body;                /* de-chunked, NUL-terminated */
  size_t body_len;
} tg_httpc_response_t;

/* err is 0 with resp set, or negative with resp NULL: UV_ETIMEDOUT,
 * UV_ECONNREFUSED, UV_ECONNRESET, UV_EAI_*, -EFBIG (body too large),
 * -EPROTO (bad HTTP or TLS failure, incl. certificate), -ECANCELED (client
 * freed), -EBUSY (queue full). resp and its buffers live only during the call. */
typedef void (*tg_httpc_cb)(int err, const tg_httpc_response_t *resp, void *ud);

/* opts may be NULL for defaults. Only the loop's thread may use the client. */
tg_httpc_t *tg_httpc_new(uv_loop_t *loop, const tg_httpc_opts_t *opts);
/* Cancels what is in flight (callbacks run with -ECANCELED before this
 * returns or on the next loop turn), closes connections; the memory is freed
 * once the handles are closed, so run the loop afterwards. */
void tg_httpc_free(tg_httpc_t *c);

/* Starts a request; the callback runs exactly once, never synchronously.
 * Returns 0, or a negative errno (bad URL: -EINVAL) without calling cb.
 * Copies everything in req. */
int tg_httpc_send(tg_httpc_t *c, const tg_httpc_request_t *req, tg_httpc_cb cb, void *ud);

/* Text of an error code from the callback. */
const char *tg_httpc_strerror(int err);

/* Lookup in a response's headers (case-insensitive); NULL when absent. */
const tg_http_header_t *tg_httpc_header(const tg_httpc_response_t *resp, const char *name);

#endif
