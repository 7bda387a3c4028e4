#ifndef TG_VIEW_H
#define TG_VIEW_H

#include <stddef.h>
#include <stdint.h>

#include "net/server.h"
#include "policy/policy.h"
#include "comp/v1/ai_system.pb-c.h"

/* The policy's view of a request (policy/policy.h tg_policy_req_t), built in
 * one place for both front ends: the HTTP path of a tenant's own resources
 * (pipeline/resource.c) and the Connect exchange (pipeline/exchange.c), one
 * view per resource URI. The resource fields mean the same on both:
 *   uri    "scheme://host/path?query": scheme and host lower-case, the
 *          scheme's default port dropped, no userinfo, no fragment (on HTTP
 *          the scheme is https when the request came over TLS)
 *   host   the uri's authority, path its normalized path (net/target.h), query
 *          what follows '?' (NULL: no '?')
 *   method the HTTP method; "GET" on Connect (how the resource is fetched)
 *   rpc    NULL on HTTP; the Connect method name ("DiscoverResources")
 * and the identity fields are those the front end knows: on HTTP the peer
 * address and the User-Agent header; on Connect the peer address and the AI
 * system (id, name, user agent, user type, country, purposes). The others
 * are NULL (purposes empty). policies/README.md "Views" is the contract. */

/* The usage purposes, one row each, in enum order: the API's enum value, the
 * RSL usage bit (catalog/rsl.h) and the RSL token policies see. "all" and
 * "ai-all" come first; the rest are the concrete purposes an offer names. */
typedef struct tg_view_purpose {
  Comp__V1__UsagePurpose value;
  uint32_t bit;
  const char *token;
} tg_view_purpose_t;

#define TG_VIEW_NPURPOSES 6
extern const tg_view_purpose_t tg_view_purposes[TG_VIEW_NPURPOSES];

/* The row of a purpose enum value, or NULL (unspecified or unknown). */
const tg_view_purpose_t *tg_view_purpose(Comp__V1__UsagePurpose value);

/* The user types likewise: enum value, RSL user bit, RSL token. */
typedef struct tg_view_user_type {
  Comp__V1__UserType value;
  uint32_t bit;
  const char *token;
} tg_view_user_type_t;

const tg_view_user_type_t *tg_view_user_type(Comp__V1__UserType value);

#define TG_VIEW_MAX_PURPOSES 8 /* purposes of one AI system a view carries; more are dropped */
#define TG_VIEW_HOST_MAX 272   /* a host of 255 bytes, brackets and a port */
#define TG_VIEW_URI_MAX 8576   /* "https://" + host + a request target of 8 KiB */
#define TG_VIEW_PATH_MAX 2048  /* the path of a Connect resource URI (at most 2047 bytes long) */

/* A view and the storage it points into. The view borrows from the request,
 * the AI system message and this struct: all three must outlive the hook
 * calls it is passed to. About 11 KiB: build it where it is used. */
typedef struct tg_view {
  tg_policy_req_t req;
  const char *purposes[TG_VIEW_MAX_PURPOSES];
  char ip[64]; /* the peer without its port: rate-limit keys by address must not vary */
  char host[TG_VIEW_HOST_MAX];
  char uri[TG_VIEW_URI_MAX];
  char path[TG_VIEW_PATH_MAX]; /* Connect only: the uri's path, NUL-terminated */
  /* What the catalog matches: the path and, when there is one, '?' and the
   * query (a tail of uri). */
  const char *target;
  size_t target_len;
} tg_view_t;

/* The view of an HTTP request for a tenant's resource. http->host must be
 * set (the tenant was found by it). header/header_ud serve req:header().
 * Worker thread; no allocation. 0, or -1 when the URI does not fit (the
 * server's target limit keeps it from happening). */
int tg_view_http(tg_view_t *v, tg_http_req_t *http, const char *tenant, tg_policy_header_fn header,
                 void *header_ud);

/* The view of one resource of a Connect call. uri is the resource as the
 * caller named it: an absolute http(s) URL whose authority has no userinfo
 * and whose path is in normal form (the caller checked both). rpc is the
 * method name. http may be NULL (the call was answered already): the view
 * then has no peer and no headers. ai is the call's AI system, or NULL.
 * 0, or -1 when uri is not such a URL or does not fit. */
/* req:header() on Connect: the header of the call's HTTP request (ud: the
 * tg_connect_call_t), or NULL once the call has no request (deadline). */
const char *tg_view_call_header(void *ud, const char *name, size_t namelen, size_t *vlen);

int tg_view_connect(tg_view_t *v, const char *rpc, const char *uri, tg_http_req_t *http,
                    const char *tenant, tg_policy_header_fn header, void *header_ud,
                    const Comp__V1__AISystem *ai);

#endif
