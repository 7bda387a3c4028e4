#ifndef TG_HTTP_PROXY_H
#define TG_HTTP_PROXY_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "net/server.h"

/* Reverse proxy to an origin, one per worker loop: the request as the server
 * read it (whole, under max_body_bytes) goes upstream; the response comes
 * back as it arrives through the server's streamed answers (net/server.h),
 * never held whole: while the client holds 256 KiB unread, the upstream is
 * not read.
 *
 * Upstream request: the method, the normalized path (what routing and
 * payment matched, not the raw target) under the origin's base path, the
 * query verbatim, HTTP/1.1, Host set to the origin's authority, the body
 * with Content-Length. Dropped: hop-by-hop fields (Connection and the names
 * it lists, Keep-Alive, Proxy-Authenticate, Proxy-Authorization, TE, Trailer,
 * Transfer-Encoding, Upgrade, Proxy-Connection), Expect (answered by the
 * server already), and the payment fields PAYMENT-SIGNATURE, X-PAYMENT,
 * PAYMENT-RESPONSE, X-PAYMENT-RESPONSE (Authorization is kept). Added:
 * X-Forwarded-For (the client's address appended to any it sent),
 * X-Forwarded-Host (the host the client asked for), X-Forwarded-Proto,
 * Via: 1.1 tollgate (appended).
 *
 * Upstream response: 1xx skipped (101 is a bad response); hop-by-hop fields,
 * the payment fields, Date and Server (the server sets its own, as nginx
 * does) dropped; Via appended; the caller's extra fields added; the body
 * de-chunked and framed again by the server (Content-Length kept when the
 * origin sent one; else chunked).
 *
 * Connections: keep-alive, pooled per origin (scheme, host, port): one goes
 * back to the pool after a complete response that did not ask to close, with
 * nothing unread; at most max_idle_per_origin wait there. A pooled
 * connection that fails before any byte of the response (the origin closed
 * it while idle) is replaced by a new one and the request sent again, once,
 * for GET, HEAD, PUT, DELETE, OPTIONS and TRACE only.
 *
 * Failures before the response started: 502 with {"error":"bad gateway",
 * "detail":...} (refused, reset, resolution failure, bad HTTP, a head over
 * max_header_bytes), 504 with {"error":"gateway timeout","detail":...}
 * (connect or first-byte timeout). After it started: the client's
 * connection is cut (tg_http_stream_end not ok), never ended cleanly. A
 * client that goes away closes its upstream connection (never pooled).
 *
 * Origins are http:// only (no TLS to the origin yet). */

typedef struct tg_proxy tg_proxy_t;

typedef struct tg_proxy_opts {
  uint32_t max_idle_per_origin;    /* pooled idle connections per origin; default 32 */
  uint32_t connect_timeout_ms;     /* resolve + TCP connect: else 504; default 2000 */
  uint32_t first_byte_timeout_ms;  /* request sent -> first response byte: else 504; default 30000 */
  uint32_t idle_timeout_ms;        /* gap between two reads of a response (not counting the time
                                      the client is slow): else 504 before the response started,
                                      a cut after; default 30000 */
  uint32_t pool_idle_timeout_ms;   /* a pooled connection is closed after this long unused:
                                      keep it under the origin's keep-alive timeout (node's is
                                      5 s); default 4000 */
  size_t max_header_bytes;         /* status line and header fields of a response: else 502;
                                      default 16 KiB */
} tg_proxy_opts_t;

/* o may be NULL (defaults). NULL when out of memory. Loop thread only. */
tg_proxy_t *tg_proxy_new(uv_loop_t *loop, const tg_proxy_opts_t *o);

/* Ends every exchange in flight (an answer not started yet becomes a 502,
 * one started is cut; their done callbacks run, err -ECANCELED, before this
 * returns) and closes the connections; the memory goes once the handles are
 * closed, so run the loop afterwards. Not from inside a done callback. */
void tg_proxy_free(tg_proxy_t *p);

/* Called once, on the loop, never inside tg_proxy_forward, after req was
 * answered or the client went away (req must not be used then). err: 0 when
 * the whole response was relayed; else UV_ECONNREFUSED, UV_ETIMEDOUT,
 * UV_ECONNRESET (the origin closed or reset, also mid-body), -EPROTO (bad
 * HTTP from the origin), UV_EAI_* (resolution), -ECONNABORTED (the client
 * went away), -ECANCELED (tg_proxy_free), -ENOMEM. status: what the client
 * was answered (the origin's status, or our 502/504); 0 when nothing. */
typedef void (*tg_proxy_done_fn)(void *ud, int err, int status);

/* Forwards req to origin ("http://host[:port][/base/path]") and answers req
 * with the response, adding extra_resp (copied; e.g. PAYMENT-RESPONSE).
 * From the handler (or later, before answering req), on the loop's thread.
 * Returns 0 (the proxy now answers req, done follows), or a negative errno
 * without touching req or calling done: -EINVAL for an origin that is not
 * an http URL or an invalid extra header, -ENOMEM. */
int tg_proxy_forward(tg_proxy_t *p, tg_http_req_t *req, const char *origin,
                     const tg_http_header_t *extra_resp, size_t nextra, tg_proxy_done_fn done,
                     void *ud);

/* Upstream connections this proxy opened since it was made, and how many
 * are open and idle in the pools now (tests, metrics). */
uint64_t tg_proxy_connections_opened(const tg_proxy_t *p);
size_t tg_proxy_idle_connections(const tg_proxy_t *p);

#endif
