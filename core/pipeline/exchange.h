#ifndef TG_EXCHANGE_H
#define TG_EXCHANGE_H

#include "pipeline/app.h"
#include "rpc/connect.h"

/* The ramp.v1.ExchangeService handlers. DiscoverResources resolves each URI
 * to its tenant, runs the rate_limit hook of every tenant the call names
 * (a denial answers resource_exhausted with Retry-After, whole seconds
 * rounded up), then answers each URI from its tenant's catalog and price
 * hook; offers carry the content's license URL (catalog/catalog.h).
 * ExecuteTransaction is pipeline/purchase.h. ReportUsage arrives with a
 * later issue (until then it validates its input and answers
 * unimplemented). Offer ids are accepted for app->offer_ttl_s. */

#define TG_EXCHANGE_MAX_RESOURCES 256

typedef struct tg_exchange {
  tg_app_t *app; /* borrowed; outlives the exchange */
} tg_exchange_t;

/* Registers the three methods on r with ex as their context. */
int tg_exchange_register(tg_exchange_t *ex, tg_connect_router_t *r);

#endif
