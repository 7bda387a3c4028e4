#ifndef TG_APP_H
#define TG_APP_H

#include <stdint.h>

#include <uv.h>

#include "config.h"
#include "offer.h"
#include "policy.h"
#include "ratelimit.h"
#include "snapshot.h"
#include "tenants.h"
#include "worker.h"

/* What the request pipeline shares: the process-wide parts (read-only after
 * start, or internally synchronized) and each worker's own parts. Modules of
 * the pipeline (exchange, resource) reach their worker's part through
 * tg_app_worker(req->worker). */

typedef struct tg_app {
  const tg_config_t *cfg;
  const tg_tenants_t *tenants;
  tg_policy_registry_t *policies;
  tg_ratelimit_t *limits;                 /* local table; also the Redis fallback */
  tg_ratelimit_redis_opts_t redis_opts;   /* host NULL: local mode */
  struct tg_app_worker **workers;         /* by worker id, set in on_worker_start */
  int nworkers;
  tg_snapshot_t **catalogs;               /* one per tenant (config order): tg_catalog_t */
  tg_offer_keyring_t offer_keys;          /* signs offer ids; read-only while serving */
  uint32_t offer_ttl_s;                   /* how long an offer id is accepted */
} tg_app_t;

typedef struct tg_app_worker {
  tg_app_t *app;
  tg_worker_t *worker;
  tg_policy_runtime_t *policy;
  tg_ratelimit_redis_t *redis;            /* NULL in local mode */
  uv_async_t policy_sync;                 /* woken after a reload is published */
  tg_snapshot_reader_t **catalog_readers; /* one per tenant */
} tg_app_worker_t;

/* Index of tenant t in the configuration (and in app->catalogs). */
static inline size_t tg_app_tenant_index(const tg_app_t *app, const tg_config_tenant_t *t) {
  return (size_t)(t - app->cfg->tenants);
}

static inline tg_app_worker_t *tg_app_worker(tg_worker_t *w) { return (tg_app_worker_t *)w->app; }

/* A rate-limit decision: allowed 1/0 and, when limited, the wait in ms. */
typedef void (*tg_app_take_cb)(void *ud, int allowed, uint32_t retry_after_ms);

/* Takes one request from tenant's bucket rate->key: the local table, or Redis
 * in redis mode (with the local table as fallback). cb runs exactly once:
 * before this returns in local mode, from the loop in redis mode. */
void tg_app_take(tg_app_worker_t *aw, const char *tenant, const tg_policy_rate_t *rate,
                 tg_app_take_cb cb, void *ud);

/* Seconds for a Retry-After header: ceil(ms / 1000), at least 1. */
static inline uint32_t tg_app_retry_after_s(uint32_t ms) { return ms ? (ms + 999) / 1000 : 1; }

#endif
