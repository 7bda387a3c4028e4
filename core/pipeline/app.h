#ifndef TG_APP_H
#define TG_APP_H

#include <stdbool.h>
#include <stdint.h>

#include <uv.h>

#include "base/snapshot.h"
#include "base/worker.h"
#include "billing/billing.h"
#include "catalog/offer.h"
#include "config/config.h"
#include "config/tenants.h"
#include "ledger/idem.h"
#include "ledger/prepaid.h"
#include "ledger/prepaid_redis.h"
#include "ledger/wal.h"
#include "limit/ratelimit.h"
#include "net/client.h"
#include "policy/policy.h"
#include "signer/signer.h"

/* What the request pipeline shares: the process-wide parts (read-only after
 * tg_app_init, or internally synchronized) and each worker's own parts, in
 * app->workers[worker id]. Threads: tg_app_init/tg_app_clear on the main
 * thread while no worker runs; tg_app_worker_start/stop on the worker's own
 * thread; everything else on a worker's thread, for that worker. */

typedef struct tg_app_worker tg_app_worker_t;

typedef struct tg_app {
  const tg_config_t *cfg;                 /* borrowed; outlives the app */
  tg_tenants_t *tenants;
  tg_policy_registry_t *policies;
  tg_ratelimit_t *limits;                 /* local table; also the Redis fallback */
  tg_ratelimit_redis_opts_t redis_opts;   /* host NULL: local mode */
  tg_app_worker_t **workers;              /* by worker id; NULL until that worker started */
  int nworkers;
  tg_snapshot_t **catalogs;               /* one per tenant (config order): tg_catalog_t */
  tg_offer_keyring_t offer_keys;          /* signs offer ids; read-only while serving */
  uint32_t offer_ttl_s;                   /* how long an offer id is accepted */
  /* The money path (pipeline/purchase.h); NULL without a data_dir. */
  tg_wal_t *wal;                          /* data_dir/wal */
  tg_prepaid_t *prepaid;                  /* the built-in ledger's balances */
  tg_idem_t *idem;                        /* idempotency answers of this instance */
  tg_signer_t *signers;                   /* one per tenant (config order); type NONE: none */
  char *snapshot_path;                    /* data_dir/ledger.snap */
  tg_ratelimit_redis_opts_t ledger_redis; /* ledger.mode redis: where (host NULL otherwise) */
  struct tg_owed *owed;                   /* ledger.mode redis: captures not yet confirmed */
  tg_prepaid_redis_t *main_redis;         /* the main loop's, paying owed captures */
  tg_wal_client_t *main_wal;
  struct tg_paywall *pay;                 /* HTTP 402 payments (pipeline/paywall.h); NULL: none */
  struct tg_billconf *billconf;           /* per tenant (config order): its billing section, read */
  struct tg_billing_book *billing_book;   /* remote billing: charges owed, health (billing/reconcile.h); NULL: none */
  struct tg_usage *usage;                 /* usage reports owed and made (pipeline/usage.h); NULL without a ledger */
  struct tg_ship *ship;                   /* ledger.ship: the shipper (gateway.c runs it), kicked from on_durable,
                                           * bounds retention; set before workers start; NULL: none */
  uint64_t wal_recovered_seq;             /* tg_app_open_ledger: the last record recovery found (next_seq - 1) */
} tg_app_t;

struct tg_app_worker {
  tg_app_t *app;
  tg_worker_t *worker;
  tg_httpc_t *httpc;                      /* outbound client (billing, facilitator) */
  tg_policy_runtime_t *policy;
  tg_ratelimit_redis_t *redis;            /* NULL in local mode */
  uv_async_t policy_sync;                 /* woken after a reload is published */
  tg_snapshot_reader_t **catalog_readers; /* one per tenant */
  tg_wal_client_t *wal;                   /* appends complete on this worker's loop */
  tg_billing_t *billing;                  /* the built-in ledger's adapter */
  tg_billing_t **remote;                  /* per tenant: its billing service's adapter, or NULL */
  struct tg_billing_runner *reconciler;   /* worker 0: pays what the billing book owes */
  tg_idem_redis_t *idem_redis;            /* ledger.mode redis: the shared idempotency keys */
  tg_prepaid_redis_t *prepaid_redis;      /* ledger.mode redis: the shared balances */
  uv_timer_t drain;                       /* stopping: waits for the log's answers */
  uint64_t drain_until;
  struct tg_paywall_worker *pay;          /* NULL when no tenant takes payments */
};

/* Builds the shared parts from cfg: policy registry (version is reported in
 * policy_version_info), rate-limit table and Redis options, one catalog
 * snapshot slot per tenant, the offer key (catalog/offerkey.h). Returns 0,
 * or negative with err set; tg_app_clear frees a half-built app too. */
int tg_app_init(tg_app_t *app, const tg_config_t *cfg, const char *version, char *err,
                size_t errlen);
void tg_app_clear(tg_app_t *app);

/* Opens the money path (after tg_app_init, before workers start): the
 * balance snapshot, the write-ahead log with replay into the balances and
 * the idempotency table, the opening credits of ledger.accounts not applied
 * yet, and each tenant's signer. Without a data_dir it does nothing (and
 * ExecuteTransaction answers unavailable). Returns 0 or negative with err.
 * Blocking: start-up only. */
int tg_app_open_ledger(tg_app_t *app, char *err, size_t errlen);

/* Writes the balance snapshot when snapshot_every records were applied since
 * the last one, then removes the segments retention lets go. Blocking file
 * I/O: the thread pool or the main thread, never a worker. */
void tg_app_ledger_maintain(tg_app_t *app, bool force);

/* On the main loop, every few seconds (gateway maintenance timer): pays
 * the owed captures of Redis mode. tg_app_ledger_main_stop frees what it
 * made on that loop (run the loop once more after). */
void tg_app_ledger_tick(tg_app_t *app, uv_loop_t *loop);
void tg_app_ledger_main_stop(tg_app_t *app);

/* Appends one record through worker aw and calls cb on its loop when it is
 * durable (wal.h contract). For the admin's top-ups. */
int tg_app_append(tg_app_worker_t *aw, const void *payload, size_t len, tg_wal_append_cb cb, void *arg);

/* The per-worker parts, on worker w's thread: client, policy states, Redis
 * connection, catalog readers. Returns 0, or the cause as a negative errno
 * (-ENOMEM, -EINVAL for policy states that do not build, the Redis
 * limiter's or libuv's code), logged with its reason ("worker start
 * failed"). tg_app_worker_stop undoes a partial start too; run the loop
 * once more after it. */
int tg_app_worker_start(tg_app_t *app, tg_worker_t *w);
void tg_app_worker_stop(tg_app_t *app, tg_worker_t *w);

/* This worker's part, from the worker a request runs on. */
static inline tg_app_worker_t *tg_app_worker(const tg_app_t *app, const tg_worker_t *w) {
  return app->workers[w->id];
}

/* Index of tenant t in the configuration (and in app->catalogs). */
static inline size_t tg_app_tenant_index(const tg_app_t *app, const tg_config_tenant_t *t) {
  return (size_t)(t - app->cfg->tenants);
}

/* Billing reachability of tenant ti, for /readyz: configured false for a
 * tenant billed by the built-in ledger (always reachable). serving: the last
 * health probe answered serving; consecutive_failures: health probes failed
 * in a row; rejects: the tenant's policy rejects on a billing timeout (its
 * last on_billing_timeout decision, reject until one was made). Any thread. */
typedef struct tg_app_billing_health {
  bool configured;
  bool serving;
  uint32_t consecutive_failures;
  bool rejects;
} tg_app_billing_health_t;

void tg_app_billing_health(const tg_app_t *app, size_t ti, tg_app_billing_health_t *out);

/* The billing adapter that bills tenant ti's purchases on worker aw: the
 * tenant's remote service (billing type "connect"), else the ledger's
 * (aw->billing). NULL without a ledger. Worker thread. */
tg_billing_t *tg_app_billing(tg_app_worker_t *aw, size_t ti);

/* A rate-limit decision: allowed 1/0 and, when limited, the wait in ms. */
typedef void (*tg_app_take_cb)(void *ud, int allowed, uint32_t retry_after_ms);

/* Takes one request from tenant's bucket rate->key: the local table, or Redis
 * in redis mode (with the local table as fallback, counted as source
 * "local-fallback" also when Redis could not be asked at all). cb runs
 * exactly once: before this returns in local mode or when Redis could not be
 * asked, from the loop otherwise. */
void tg_app_take(tg_app_worker_t *aw, const char *tenant, const tg_policy_rate_t *rate,
                 tg_app_take_cb cb, void *ud);

/* What the pipeline decided for one resource, counted in
 * policy_decisions_total{tenant_id,front,outcome} (front "http" or
 * "connect"; on Connect one decision per resource URI, and one "429" per
 * tenant of a call that a rate limit stopped). */
typedef enum {
  TG_DECISION_PRICED = 0, /* outcome "402": offered at a price */
  TG_DECISION_LIMITED,    /* "429": over a rate limit */
  TG_DECISION_SKIP,       /* "skip": the skip hook let it through free */
  TG_DECISION_FREE,       /* "free": every offer priced at 0 */
  TG_DECISION_NOT_FOR_SALE, /* "403": no offer (not in catalog, prohibited, declined, ...) */
  TG_DECISION_ERROR,      /* "error": a policy failed, the request failed closed */
  TG_DECISION_PAID,       /* "paid": an HTTP 402 payment was accepted and the resource served */
  TG_DECISION_N
} tg_decision_t;

void tg_app_decision(const char *tenant, bool connect, tg_decision_t d);

/* Seconds for a Retry-After header: ceil(ms / 1000), at least 1. */
static inline uint32_t tg_app_retry_after_s(uint32_t ms) { return ms ? (ms + 999) / 1000 : 1; }

#endif
