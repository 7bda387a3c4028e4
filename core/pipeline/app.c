#include "pipeline/app.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "base/log.h"
#include "base/metrics.h"
#include "catalog/catalog.h"
#include "catalog/offerkey.h"

/* Wakes every worker to rebuild the changed states between requests. */
static void on_publish(void *ud, uint64_t generation) {
  tg_app_t *app = ud;
  (void)generation;
  for (int i = 0; i < app->nworkers; i++)
    if (app->workers[i])
      uv_async_send(&app->workers[i]->policy_sync);
}

static void on_policy_sync(uv_async_t *a) {
  tg_app_worker_t *aw = a->data;
  tg_policy_runtime_sync(aw->policy);
}

static void destroy_catalog(void *data) { tg_catalog_free(data); }

/* config.h documents the policy defaults as its own numbers: keep them the policy module's. */
_Static_assert(TG_CONFIG_DEFAULT_POLICY_TIME_LIMIT_MS == TG_POLICY_DEFAULT_TIME_LIMIT_MS, "policy time limit");
_Static_assert(TG_CONFIG_DEFAULT_POLICY_LOAD_TIME_LIMIT_MS == TG_POLICY_DEFAULT_LOAD_TIME_LIMIT_MS,
               "policy load time limit");
_Static_assert(TG_CONFIG_DEFAULT_POLICY_MEMORY_LIMIT == TG_POLICY_DEFAULT_MEMORY_LIMIT, "policy memory limit");

static tg_metric_t *m_decisions;

void tg_app_decision(const char *tenant, bool connect, tg_decision_t d) {
  static const char *const outcomes[TG_DECISION_N] = {"402", "429", "skip", "free", "403", "error"};
  const char *labels[] = {tenant, connect ? "connect" : "http", outcomes[d]};
  tg_counter_add(m_decisions, labels, 1);
}

int tg_app_init(tg_app_t *app, const tg_config_t *cfg, const char *version, char *err,
                size_t errlen) {
  int rc;
  *app = (tg_app_t){0};
  app->cfg = cfg;
  tg_offer_keyring_init(&app->offer_keys);
  tg_policy_options_t popt = {0};
  popt.version = version;
  popt.time_limit_ms = cfg->policy_time_limit_ms; /* 0 (a config not from tg_config_load): the defaults */
  popt.load_time_limit_ms = cfg->policy_load_time_limit_ms;
  popt.memory_limit = cfg->policy_memory_limit;
  popt.on_publish = on_publish;
  popt.on_publish_ud = app;
  if ((rc = tg_policy_registry_new(cfg, &popt, &app->policies, err, errlen)) != 0)
    return rc;
  static const char *const dlabels[] = {"tenant_id", "front", "outcome", NULL};
  m_decisions = tg_metric_new(TG_METRIC_COUNTER, "policy_decisions_total",
                              "What the pipeline decided per resource: 402 (priced), 429 (rate limited), "
                              "skip, free, 403 (not for sale) or error (failed closed).",
                              dlabels, NULL, 0);
  if (m_decisions == NULL || tg_ratelimit_metrics_init() != 0) {
    snprintf(err, errlen, "cannot declare the rate-limit metrics");
    return -ENOMEM;
  }
  app->limits = tg_ratelimit_new(cfg->rate_limit_table_size ? cfg->rate_limit_table_size : 65536);
  if (cfg->rate_limit_mode == TG_CONFIG_RATE_LIMIT_REDIS &&
      tg_ratelimit_redis_opts_init(&app->redis_opts, &cfg->redis, err, errlen) != 0)
    return -EINVAL;
  app->nworkers = cfg->workers > 0 ? cfg->workers : (int)uv_available_parallelism();
  app->workers = calloc((size_t)app->nworkers, sizeof *app->workers);
  app->catalogs = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *app->catalogs);
  app->tenants = tg_tenants_new(cfg);
  if (app->limits == NULL || app->workers == NULL || app->catalogs == NULL || app->tenants == NULL) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  for (size_t i = 0; i < cfg->ntenants; i++)
    if ((app->catalogs[i] = tg_snapshot_new(destroy_catalog)) == NULL) {
      snprintf(err, errlen, "out of memory");
      return -ENOMEM;
    }
  app->offer_ttl_s = cfg->offer_ttl_s ? cfg->offer_ttl_s : TG_CONFIG_DEFAULT_OFFER_TTL_S;
  return tg_offerkey_load(&app->offer_keys, cfg->data_dir, err, errlen);
}

void tg_app_clear(tg_app_t *app) {
  tg_tenants_free(app->tenants);
  if (app->policies)
    tg_policy_registry_free(app->policies);
  if (app->limits)
    tg_ratelimit_free(app->limits);
  tg_ratelimit_redis_opts_clear(&app->redis_opts);
  if (app->catalogs) {
    for (size_t i = 0; i < app->cfg->ntenants; i++)
      if (app->catalogs[i])
        tg_snapshot_free(app->catalogs[i]);
    free(app->catalogs);
  }
  tg_offer_keyring_clear(&app->offer_keys);
  free(app->workers);
  *app = (tg_app_t){0};
}

int tg_app_worker_start(tg_app_t *app, tg_worker_t *w) {
  char err[512] = "out of memory";
  int rc = -ENOMEM;
  tg_app_worker_t *aw = calloc(1, sizeof *aw);
  if (aw == NULL)
    goto fail;
  aw->app = app;
  aw->worker = w;
  app->workers[w->id] = aw;
  if ((aw->httpc = tg_httpc_new(w->loop, NULL)) == NULL) {
    snprintf(err, sizeof err, "cannot create the outbound HTTP client (out of memory)");
    goto fail;
  }
  if ((aw->policy = tg_policy_runtime_new(app->policies, err, sizeof err)) == NULL) {
    rc = -EINVAL; /* err says why: memory, or a policy that no longer loads */
    goto fail;
  }
  if (app->redis_opts.host &&
      (rc = tg_ratelimit_redis_new(w->loop, &app->redis_opts, app->limits, &aw->redis, err, sizeof err)) != 0)
    goto fail;
  rc = -ENOMEM;
  snprintf(err, sizeof err, "out of memory");
  aw->catalog_readers = calloc(app->cfg->ntenants ? app->cfg->ntenants : 1, sizeof *aw->catalog_readers);
  if (aw->catalog_readers == NULL)
    goto fail;
  for (size_t i = 0; i < app->cfg->ntenants; i++)
    if ((aw->catalog_readers[i] = tg_snapshot_reader_register(app->catalogs[i])) == NULL)
      goto fail;
  if ((rc = uv_async_init(w->loop, &aw->policy_sync, on_policy_sync)) != 0) {
    snprintf(err, sizeof err, "cannot create the reload wake-up handle: %s", uv_strerror(rc));
    goto fail;
  }
  aw->policy_sync.data = aw;
  return 0;
fail:
  tg_log(TG_LOG_ERROR, "worker start failed", "reason", err, NULL);
  return rc;
}

static void free_handle_data(uv_handle_t *h) { free(h->data); }

void tg_app_worker_stop(tg_app_t *app, tg_worker_t *w) {
  tg_app_worker_t *aw = app->workers[w->id];
  if (aw == NULL)
    return;
  app->workers[w->id] = NULL;
  if (aw->httpc)
    tg_httpc_free(aw->httpc);
  if (aw->redis)
    tg_ratelimit_redis_free(aw->redis);
  if (aw->policy)
    tg_policy_runtime_free(aw->policy);
  if (aw->catalog_readers) {
    for (size_t i = 0; i < app->cfg->ntenants; i++)
      if (aw->catalog_readers[i])
        tg_snapshot_reader_unregister(aw->catalog_readers[i]);
    free(aw->catalog_readers);
  }
  /* The async handle lives in aw: free aw once the handle is closed. */
  if (aw->policy_sync.loop) {
    aw->policy_sync.data = aw;
    uv_close((uv_handle_t *)&aw->policy_sync, free_handle_data);
  } else {
    free(aw);
  }
}

typedef struct take {
  tg_app_take_cb cb;
  void *ud;
} take_t;

static void on_redis_take(void *arg, int allowed, uint32_t retry_after_ms, tg_ratelimit_source_t src) {
  take_t *t = arg;
  (void)src;
  t->cb(t->ud, allowed, retry_after_ms);
  free(t);
}

void tg_app_take(tg_app_worker_t *aw, const char *tenant, const tg_policy_rate_t *rate,
                 tg_app_take_cb cb, void *ud) {
  if (aw->redis) {
    take_t *t = malloc(sizeof *t);
    if (t && (t->cb = cb, t->ud = ud,
              tg_ratelimit_redis_take(aw->redis, tenant, rate->key, rate->keylen, rate->rate,
                                      rate->burst, on_redis_take, t) == 0))
      return;
    free(t);
  }
  uint32_t retry = 0;
  int rc;
  /* Counted once, inside the take. Could Redis not be asked, the decision is
   * a fallback like Redis' own and is labelled so. A rate the table refuses
   * (the policy module checks it first) denies rather than lets through. */
  if (aw->redis)
    rc = tg_ratelimit_take_fallback(aw->app->limits, tenant, rate->key, rate->keylen, rate->rate,
                                    rate->burst, tg_ratelimit_now_us(), "error", &retry);
  else
    rc = tg_ratelimit_take(aw->app->limits, tenant, rate->key, rate->keylen, rate->rate, rate->burst,
                           tg_ratelimit_now_us(), &retry);
  cb(ud, rc == 1, rc == 1 ? 0 : retry ? retry : 1000);
}
