#ifndef TG_CONNECT_H
#define TG_CONNECT_H

#include <stdarg.h>

#include <protobuf-c/protobuf-c.h>

#include "base/trace.h"
#include "net/server.h"

/* Connect protocol, unary over HTTP/1.1: routing by /<pkg>.<Service>/<Method>,
 * application/proto and application/json, Connect error JSON, Connect-Timeout-Ms,
 * gzip both ways, GET for NO_SIDE_EFFECTS methods, 405 and 415 rules. */

typedef enum tg_connect_code {
  TG_CONNECT_OK = 0,
  TG_CONNECT_CANCELED,
  TG_CONNECT_UNKNOWN,
  TG_CONNECT_INVALID_ARGUMENT,
  TG_CONNECT_DEADLINE_EXCEEDED,
  TG_CONNECT_NOT_FOUND,
  TG_CONNECT_ALREADY_EXISTS,
  TG_CONNECT_PERMISSION_DENIED,
  TG_CONNECT_RESOURCE_EXHAUSTED,
  TG_CONNECT_FAILED_PRECONDITION,
  TG_CONNECT_ABORTED,
  TG_CONNECT_OUT_OF_RANGE,
  TG_CONNECT_UNIMPLEMENTED,
  TG_CONNECT_INTERNAL,
  TG_CONNECT_UNAVAILABLE,
  TG_CONNECT_DATA_LOSS,
  TG_CONNECT_UNAUTHENTICATED,
} tg_connect_code_t;

/* "invalid_argument", ... ("ok" for 0). */
const char *tg_connect_code_name(tg_connect_code_t code);
/* HTTP status for a code (400, 404, 429, ...). */
int tg_connect_code_http(tg_connect_code_t code);

typedef struct tg_connect_call tg_connect_call_t;

/* A method handler. request is owned by the call and valid until the call is
 * finished. The handler finishes the call now or later, exactly once, with
 * tg_connect_reply() or tg_connect_fail(), on the worker thread. */
typedef void (*tg_connect_method_fn)(tg_connect_call_t *call, const ProtobufCMessage *request,
                                     void *ud);

typedef struct tg_connect_method {
  const char *path;                            /* "/ramp.v1.ExchangeService/DiscoverResources" */
  const char *name;                            /* metrics label, e.g. "DiscoverResources" */
  const ProtobufCMessageDescriptor *input;
  const ProtobufCMessageDescriptor *output;
  int no_side_effects;                         /* 1: GET allowed (idempotency_level NO_SIDE_EFFECTS) */
  tg_connect_method_fn fn;
  void *ud;
} tg_connect_method_t;

typedef struct tg_connect_router tg_connect_router_t;

tg_connect_router_t *tg_connect_router_new(void);
void tg_connect_router_free(tg_connect_router_t *r);
/* Copies m (and its path and name strings). Returns 0, or -EEXIST / -ENOMEM /
 * -EINVAL. Register before the server starts; afterwards the router is
 * read-only and shared by all workers without a lock. */
int tg_connect_router_add(tg_connect_router_t *r, const tg_connect_method_t *m);

/* Largest request message after decompression; larger is resource_exhausted.
 * Keep it in step with the server's max_body_bytes. Call before start. */
#define TG_CONNECT_MAX_MESSAGE_BYTES (4u << 20)
void tg_connect_router_set_max_message(tg_connect_router_t *r, size_t max_bytes);

/* Serves req if its path is a registered procedure, or looks like one: a
 * /pkg.Service/Method path that is not registered gets a bare 404 (as
 * connect-go and connect-node answer; clients read it as unimplemented).
 * Returns 1 when it took the request (it is or will be answered), 0 when the
 * path is not a Connect path and the caller should route it elsewhere.
 * Worker thread only. */
int tg_connect_handle(const tg_connect_router_t *r, tg_http_req_t *req);

/* Finishes with a response message (encoded as the request was, compressed if
 * the client accepts gzip and the body is large enough). */
void tg_connect_reply(tg_connect_call_t *call, const ProtobufCMessage *response);
/* Finishes with a Connect error (TG_CONNECT_OK counts as unknown). A second
 * reply or fail on the same call is ignored. */
void tg_connect_fail(tg_connect_call_t *call, tg_connect_code_t code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Accessors for handlers, worker thread only, valid until the call is finished. */
/* The HTTP request (headers, peer, worker); NULL once the call was answered,
 * i.e. after the deadline passed: do not keep the pointer across waits. */
tg_http_req_t *tg_connect_call_http(tg_connect_call_t *call);
/* 1 once the client's Connect-Timeout-Ms has passed (the call was already
 * answered deadline_exceeded; the handler still must finish it, and its
 * answer is dropped). */
/* tg_connect_fail with one error detail: the message detail in the error
 * body's "details" ({"type": its full name, "value": unpadded base64 of its
 * binary encoding}), as Connect clients decode them (connect-es
 * ConnectError.findDetails). msg is used as is. */
void tg_connect_fail_detail(tg_connect_call_t *call, tg_connect_code_t code, const ProtobufCMessage *detail,
                           const char *msg);

int tg_connect_call_expired(const tg_connect_call_t *call);
/* The call's server span (base/trace.h: the incoming traceparent's trace, or
 * a new one), the parent of the pipeline's spans; NULL when tracing is off
 * or the trace is not sampled. It ends when the call is answered: a child
 * must be started before that (it may end later). */
tg_span_t *tg_connect_call_span(const tg_connect_call_t *call);
/* Milliseconds left before the deadline; UINT32_MAX when there is none. */
uint32_t tg_connect_call_remaining_ms(const tg_connect_call_t *call);
/* Sets the tenant_id label the call is counted under in exchange_rpc_total
 * (copied, at most 63 bytes; "" until set). */
void tg_connect_call_set_tenant(tg_connect_call_t *call, const char *tenant_id);
/* Adds a response header sent with the call's answer, reply or error (e.g.
 * Retry-After on resource_exhausted). name and value are copied into the
 * call's arena. At most 4 per call. Returns 0, -EINVAL (name not an HTTP
 * token, value with a control byte, or a header the protocol writes itself:
 * Content-Type, Content-Encoding, Content-Length, Accept-Encoding, Vary,
 * Connection, Transfer-Encoding, Date, Server), -ENOSPC or -ENOMEM; the
 * answer then goes without it. Call before tg_connect_reply/fail; a header
 * added after the call was answered (deadline) is never sent. */
int tg_connect_call_add_header(tg_connect_call_t *call, const char *name, const char *value);
/* Memory from the call's arena (aligned for any type), freed with the call:
 * for building the response. NULL when out of memory. */
void *tg_connect_call_alloc(tg_connect_call_t *call, size_t n);

/* Registers exchange_rpc_total and exchange_rpc_duration_seconds. Call once,
 * before workers start. */
int tg_connect_metrics_init(void);

#endif
