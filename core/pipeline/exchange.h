#ifndef TG_EXCHANGE_H
#define TG_EXCHANGE_H

#include "pipeline/app.h"
#include "rpc/connect.h"

/* The ramp.v1.ExchangeService handlers. DiscoverResources resolves each URI
 * to its tenant; the catalog, billing, signing and log arrive with later
 * issues (until then ExecuteTransaction and ReportUsage validate their input
 * and answer unimplemented). */

#define TG_EXCHANGE_MAX_RESOURCES 256

typedef struct tg_exchange {
  tg_app_t *app; /* borrowed; outlives the exchange */
} tg_exchange_t;

/* Registers the three methods on r with ex as their context. */
int tg_exchange_register(tg_exchange_t *ex, tg_connect_router_t *r);

#endif
