#ifndef TG_VIEW_H
#define TG_VIEW_H

#include <stddef.h>
#include <stdint.h>

#include "net/server.h"
#include "policy/policy.h"
#include "comp/v1/ai_system.pb-c.h"

/* The policy's view of a request (policy/policy.h tg_policy_req_t), built in
 * one place for both front ends: the HTTP path of a tenant's own resources
 * (pipeline/resource.c) and the Connect exchange (pipeline/exchange.c).
 *
 * The two still differ where they did before this builder (the next step
 * makes them produce the same view): host is the server's normalized host
 * for HTTP and the Host header as sent for Connect; user_agent is the
 * User-Agent header for HTTP and the AI system's user_agent for Connect. */

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

/* A view and the storage it points into. The view borrows from the request,
 * the AI system message and this struct: all three must outlive the hook
 * calls it is passed to. */
typedef struct tg_view {
  tg_policy_req_t req;
  const char *purposes[TG_VIEW_MAX_PURPOSES];
  char ip[64]; /* the peer without its port: rate-limit keys by address must not vary */
} tg_view_t;

/* Fills v for a request of kind for tenant. http may be NULL (a Connect call
 * already answered): the view then has no request fields. header/header_ud
 * serve req:header() (NULL: it answers nil). ai is the AI system of a Connect
 * message, or NULL. Worker thread; no allocation, cannot fail. */
void tg_view_build(tg_view_t *v, tg_policy_kind_t kind, tg_http_req_t *http, const char *tenant,
                   tg_policy_header_fn header, void *header_ud, const Comp__V1__AISystem *ai);

#endif
