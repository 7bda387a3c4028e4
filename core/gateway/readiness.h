#ifndef TG_READINESS_H
#define TG_READINESS_H

#include <stdatomic.h>

#include "catalog/ingest.h"
#include "config/config.h"
#include "net/server.h"

/* /readyz: 200 while the gateway serves and every tenant with a catalog
 * source has loaded one; 503 otherwise, naming each reason (starting or
 * draining, a tenant whose catalog never loaded and the kind of failure:
 * "fetch", "parse", ...). The public answer leaves out the failure's detail
 * (paths, URLs, parser messages): the admin /status carries it.
 *
 * The fields are set on the main thread before serving starts (ingest and
 * server may stay NULL); serving flips at start and at the start of a drain,
 * and is read by any worker. */
typedef struct tg_readiness {
  _Atomic int serving;
  const tg_config_t *cfg;
  tg_ingest_t *ingest;
  tg_server_t *server;
} tg_readiness_t;

void tg_readiness_set_serving(tg_readiness_t *r, int serving);
int tg_readiness_serving(const tg_readiness_t *r);

/* Answers req with the JSON report. Worker thread. */
void tg_readiness_respond(tg_readiness_t *r, tg_http_req_t *req);

#endif
