#ifndef TG_READINESS_H
#define TG_READINESS_H

#include <stdatomic.h>

#include "catalog/ingest.h"
#include "config/config.h"
#include "net/server.h"

struct tg_app;

/* /readyz: 200 while the gateway serves and every tenant with a catalog
 * source has loaded one; 503 otherwise, naming each reason (starting or
 * draining, a tenant whose catalog never loaded and the kind of failure:
 * "fetch", "parse", ...). The public answer leaves out the failure's detail
 * (paths, URLs, parser messages): the admin /status carries it.
 *
 * With a transaction log (data_dir) the body has "log": {used_bytes,
 * capacity_bytes, utilization (used / capacity, 0..1)}, and 503 when
 * utilization is above TG_READINESS_LOG_FULL (purchases are about to get
 * the log-full answer); with log shipping (ledger.ship) "ship": {lag_seconds
 * (the oldest durable record not yet in the store, 0: none), shipped_seq,
 * pending (records)}; and for each tenant billed by a remote service
 * "billing": [{tenant, serving, consecutive_failures, rejects}], 503 when
 * one failed TG_READINESS_BILLING_FAILURES health checks in a row and its
 * policy rejects on a billing timeout (deferring tenants still sell).
 *
 * The fields are set on the main thread before serving starts (ingest,
 * server and app may stay NULL); serving flips at start and at the start of
 * a drain, and is read by any worker. */
#define TG_READINESS_LOG_FULL 0.9
#define TG_READINESS_BILLING_FAILURES 10

typedef struct tg_readiness {
  _Atomic int serving;
  _Atomic int draining;     /* the admin drain: 503 "draining" from then on */
  const tg_config_t *cfg;
  tg_ingest_t *ingest;
  tg_server_t *server;
  const struct tg_app *app; /* the log, the shipper, billing health; outlives serving */
} tg_readiness_t;

void tg_readiness_set_serving(tg_readiness_t *r, int serving);
/* The admin drain started: not serving, for good. Returns 1 the first time,
 * 0 when already draining. Any thread. */
int tg_readiness_start_drain(tg_readiness_t *r);
int tg_readiness_draining(const tg_readiness_t *r);
int tg_readiness_serving(const tg_readiness_t *r);

/* Answers req with the JSON report. Worker thread. */
void tg_readiness_respond(tg_readiness_t *r, tg_http_req_t *req);

#endif
