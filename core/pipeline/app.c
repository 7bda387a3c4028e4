#include "pipeline/app.h"

#include "billing/billconf.h"
#include "billing/reconcile.h"

#include <errno.h>
#include <stdio.h>
#include <inttypes.h>
#include <stdlib.h>

#include "base/log.h"
#include "base/metrics.h"
#include "catalog/catalog.h"
#include "catalog/offerkey.h"
#include "ledger/record.h"
#include "ledger/ship.h"
#include "pipeline/owed.h"
#include "pipeline/paywall.h"
#include "pipeline/purchase.h"
#include "pipeline/usage.h"

#include <string.h>
#include <sys/stat.h>
#include <time.h>

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
  static const char *const outcomes[TG_DECISION_N] = {"402", "429", "skip", "free", "403", "error", "paid"};
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
                              "skip, free, 403 (not for sale), error (failed closed) or paid (an HTTP 402 "
                              "payment accepted and the resource served).",
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
  if ((rc = tg_paywall_new(app, &app->pay, err, errlen)) != 0)
    return rc;
  return tg_offerkey_load(&app->offer_keys, cfg->data_dir, err, errlen);
}

void tg_app_clear(tg_app_t *app) {
  if (app->wal) {
    tg_wal_close(app->wal); /* everything queued is durable (and applied) or failed */
    app->wal = NULL;
    tg_app_ledger_maintain(app, true);
  }
  tg_prepaid_free(app->prepaid);
  tg_idem_free(app->idem);
  tg_owed_free(app->owed);
  tg_billing_book_free(app->billing_book);
  if (app->billconf) {
    for (size_t i = 0; i < app->cfg->ntenants; i++)
      tg_billconf_free(&app->billconf[i]);
    free(app->billconf);
  }
  tg_usage_free(app->usage);
  tg_paywall_free(app->pay);
  tg_ratelimit_redis_opts_clear(&app->ledger_redis);
  free(app->snapshot_path);
  if (app->signers) {
    for (size_t i = 0; i < app->cfg->ntenants; i++)
      tg_signer_free(&app->signers[i]);
    free(app->signers);
  }
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

static tg_billing_t *runner_adapter(void *ud, size_t ti) {
  tg_app_worker_t *aw = ud;
  return aw->remote ? aw->remote[ti] : NULL;
}

/* Billing refused a deferred charge: the tenant's policy is told
 * (on_settle_failure, reason "billing_refused"); it cannot change it. */
static void runner_refused(void *ud, const tg_billing_owed_t *o, const char *why) {
  tg_app_worker_t *aw = ud;
  const char *tenant = aw->app->cfg->tenants[o->tenant].name;
  tg_policy_state_t *st = tg_policy_acquire(aw->policy, tenant);
  if (st == NULL)
    return;
  tg_policy_txn_t txn = {0};
  txn.id = o->txid;
  txn.tenant = tenant;
  txn.amount = o->amount;
  txn.currency = o->currency;
  txn.ai_id = o->ai_system_id;
  txn.billing_ref = o->ref;
  txn.attempts = o->attempts + 1;
  txn.reason = "billing_refused";
  txn.error = why;
  txn.request_id = "";
  tg_policy_error_t perr;
  (void)tg_policy_on_settle_failure(st, &txn, &perr);
  tg_policy_release(st);
}

/* Readiness asks before the first purchase does: would the tenant's policy
 * reject on a billing failure? A transaction of nothing, reason "error"; a
 * policy that fails rejects. */
static bool runner_rejects(void *ud, size_t ti) {
  tg_app_worker_t *aw = ud;
  const char *tenant = aw->app->cfg->tenants[ti].name;
  tg_policy_state_t *st = tg_policy_acquire(aw->policy, tenant);
  if (st == NULL)
    return true;
  tg_policy_txn_t txn = {0};
  txn.id = "";
  txn.tenant = tenant;
  txn.currency = "";
  txn.reason = "error";
  txn.request_id = "";
  tg_policy_billing_t d = TG_POLICY_BILLING_REJECT;
  tg_policy_error_t perr;
  int rc = tg_policy_on_billing_timeout(st, &txn, &d, &perr);
  tg_policy_release(st);
  return (rc != 0 && rc != TG_POLICY_ERR_NOHOOK) || d == TG_POLICY_BILLING_REJECT;
}

/* Each remote-billed tenant's adapter on this worker; worker 0 also runs the
 * reconciler and the health probes. */
static int remote_billing_start(tg_app_t *app, tg_app_worker_t *aw, char *err, size_t errlen) {
  size_t n = app->cfg->ntenants;
  if ((aw->remote = calloc(n ? n : 1, sizeof *aw->remote)) == NULL)
    goto nomem;
  for (size_t i = 0; i < n; i++) {
    const tg_billconf_t *bc = &app->billconf[i];
    if (!bc->remote)
      continue;
    tg_billing_connect_opts_t o = {app->cfg->tenants[i].name, bc->url, bc->token, bc->deadline_ms,
                                   bc->call_timeout_ms, bc->breaker_failures, bc->breaker_cooldown_ms};
    if ((aw->remote[i] = tg_billing_connect_new(aw->worker->loop, aw->httpc, &o)) == NULL)
      goto nomem;
  }
  if (aw->worker->id != 0 || aw->wal == NULL)
    return 0;
  uint32_t *backoff = calloc(n ? n : 1, sizeof *backoff), *maxb = calloc(n ? n : 1, sizeof *maxb),
           *health = calloc(n ? n : 1, sizeof *health);
  uint32_t call_timeout = 0;
  int rc = -ENOMEM;
  if (backoff && maxb && health) {
    for (size_t i = 0; i < n; i++) {
      const tg_billconf_t *bc = &app->billconf[i];
      backoff[i] = bc->remote ? bc->reconcile_backoff_ms : 200;
      maxb[i] = bc->remote ? bc->reconcile_max_backoff_ms : 60000;
      health[i] = bc->remote ? bc->health_interval_ms : 0;
      if (bc->remote && bc->call_timeout_ms > call_timeout)
        call_timeout = bc->call_timeout_ms;
    }
    tg_billing_runner_hooks_t h = {runner_adapter, runner_refused, runner_rejects, aw};
    tg_billing_runner_opts_t ro = {0};
    ro.backoff_ms = backoff;
    ro.max_backoff_ms = maxb;
    ro.health_ms = health;
    ro.call_timeout_ms = call_timeout;
    rc = tg_billing_runner_new(app->billing_book, aw->worker->loop, aw->wal, &h, &ro, n, &aw->reconciler);
  }
  free(backoff);
  free(maxb);
  free(health);
  if (rc != 0)
    snprintf(err, errlen, "cannot start the billing reconciler (%s)", strerror(-rc));
  return rc;
nomem:
  snprintf(err, errlen, "cannot create the billing adapters (out of memory)");
  return -ENOMEM;
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
  if (app->wal && (rc = tg_wal_client_new(app->wal, w->loop, &aw->wal)) != 0) {
    snprintf(err, sizeof err, "cannot attach to the transaction log (%s)", uv_strerror(rc));
    goto fail;
  }
  if (app->wal && app->ledger_redis.host) {
    tg_prepaid_redis_opts_t po = {app->ledger_redis.host,       app->ledger_redis.port, app->ledger_redis.password,
                                  app->ledger_redis.db,         app->ledger_redis.timeout_ms, 0, 0,
                                  app->cfg->instance};
    if ((rc = tg_prepaid_redis_new(w->loop, &po, &aw->prepaid_redis, err, sizeof err)) != 0)
      goto fail;
    aw->billing = tg_billing_redis_new(w->loop, aw->prepaid_redis);
  } else if (app->wal) {
    aw->billing = tg_billing_builtin_new(w->loop, app->prepaid);
  }
  if (app->wal && aw->billing == NULL) {
    snprintf(err, sizeof err, "out of memory");
    rc = -ENOMEM;
    goto fail;
  }
  if (app->wal && app->ledger_redis.host) {
    const tg_config_ledger_t *l = &app->cfg->ledger;
    tg_idem_redis_opts_t io = {app->ledger_redis.host, app->ledger_redis.port, app->ledger_redis.password,
                               app->ledger_redis.db, app->ledger_redis.timeout_ms,
                               (uint64_t)l->idem_ttl_s * 1000, l->idem_pending_ttl_ms, app->cfg->instance};
    if ((rc = tg_idem_redis_new(w->loop, &io, &aw->idem_redis, err, sizeof err)) != 0)
      goto fail;
  }
  if ((rc = uv_async_init(w->loop, &aw->policy_sync, on_policy_sync)) != 0) {
    snprintf(err, sizeof err, "cannot create the reload wake-up handle: %s", uv_strerror(rc));
    goto fail;
  }
  aw->policy_sync.data = aw;
  if ((rc = tg_paywall_worker_start(aw, err, sizeof err)) != 0)
    goto fail;
  if (app->billing_book && (rc = remote_billing_start(app, aw, err, sizeof err)) != 0)
    goto fail;
  return 0;
fail:
  tg_log(TG_LOG_ERROR, "worker start failed", "reason", err, NULL);
  return rc;
}

static void free_handle_data(uv_handle_t *h) { free(h->data); }

static void worker_teardown(tg_app_t *app, tg_app_worker_t *aw) {
  tg_billing_runner_free(aw->reconciler); /* then the adapters answer what it has in flight */
  if (aw->remote) {
    for (size_t i = 0; i < app->cfg->ntenants; i++)
      tg_billing_free(aw->remote[i]); /* before the client they borrow */
    free(aw->remote);
  }
  tg_paywall_worker_stop(aw); /* before the client its pools use */
  if (aw->httpc)
    tg_httpc_free(aw->httpc);
  if (aw->redis)
    tg_ratelimit_redis_free(aw->redis);
  tg_billing_free(aw->billing); /* before the ledger it borrows */
  if (aw->prepaid_redis)
    tg_prepaid_redis_free(aw->prepaid_redis);
  if (aw->idem_redis)
    tg_idem_redis_free(aw->idem_redis);
  tg_wal_client_release(aw->wal);
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

#define DRAIN_MS 5000 /* the longest a stopping worker waits for its log appends */

static void on_drain_closed(uv_handle_t *h) {
  tg_app_worker_t *aw = h->data;
  worker_teardown(aw->app, aw);
}

/* A purchase waiting for its record still needs everything the worker holds:
 * the teardown waits until the log has answered every append. */
static void on_drain(uv_timer_t *t) {
  tg_app_worker_t *aw = t->data;
  if (tg_wal_client_inflight(aw->wal) > 0 && uv_now(t->loop) < aw->drain_until)
    return;
  uv_close((uv_handle_t *)t, on_drain_closed);
}

void tg_app_worker_stop(tg_app_t *app, tg_worker_t *w) {
  tg_app_worker_t *aw = app->workers[w->id];
  if (aw == NULL)
    return;
  app->workers[w->id] = NULL;
  if (aw->wal && tg_wal_client_inflight(aw->wal) > 0 && uv_timer_init(w->loop, &aw->drain) == 0) {
    aw->drain.data = aw;
    aw->drain_until = uv_now(w->loop) + DRAIN_MS;
    uv_timer_start(&aw->drain, on_drain, 1, 1);
    return;
  }
  worker_teardown(app, aw);
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

/* ---- The money path */

int tg_app_append(tg_app_worker_t *aw, const void *payload, size_t len, tg_wal_append_cb cb, void *arg) {
  if (aw->wal == NULL)
    return -ENODEV;
  return tg_wal_append(aw->wal, payload, len, cb, arg, NULL);
}

static int on_durable(void *arg, uint64_t seq, const void *payload, size_t len) {
  tg_app_t *app = arg;
  int rc = tg_prepaid_apply(app->prepaid, seq, payload, len);
  if (rc != 0)
    tg_log(TG_LOG_ERROR, "ledger: a durable record does not decode", NULL);
  if (app->usage)
    tg_usage_apply(app->usage, seq, payload, len);
  if (app->ship)
    tg_ship_kick(app->ship, seq);
  return 0;
}

static int on_replay(void *arg, uint64_t seq, const void *payload, size_t len) {
  tg_app_t *app = arg;
  int rc = tg_prepaid_apply(app->prepaid, seq, payload, len);
  if (rc == 0)
    rc = tg_purchase_replay(app, seq, payload, len);
  if (rc == 0)
    rc = tg_paywall_replay(app->pay, seq, payload, len);
  if (rc == 0 && app->billing_book)
    rc = tg_billing_book_replay(app->billing_book, seq, payload, len);
  if (rc == 0 && app->usage)
    rc = tg_usage_apply(app->usage, seq, payload, len);
  return rc;
}

typedef struct seed {
  int pending, failed;
} seed_t;

static void on_seeded(void *arg, int status, uint64_t seq) {
  seed_t *s = arg;
  (void)seq;
  s->pending--;
  if (status != 0)
    s->failed = status;
}

typedef struct rseed {
  int pending;
  int status;
} rseed_t;

static void on_rseeded(void *arg, int status, int64_t balance) {
  rseed_t *s = arg;
  (void)balance;
  s->pending--;
  s->status = status;
}

/* Redis mode: the opening credits go to Redis (once per reference there).
 * Redis down at start is not fatal: purchases fail until it answers, and the
 * credits are tried again at the next start. */
static void seed_redis(tg_app_t *app) {
  const tg_config_ledger_t *l = &app->cfg->ledger;
  uv_loop_t loop;
  tg_prepaid_redis_t *r = NULL;
  char err[256];
  if (l->naccounts == 0 || uv_loop_init(&loop) != 0)
    return;
  tg_prepaid_redis_opts_t po = {app->ledger_redis.host, app->ledger_redis.port, app->ledger_redis.password,
                                app->ledger_redis.db,   app->ledger_redis.timeout_ms, 0, 0, app->cfg->instance};
  if (tg_prepaid_redis_new(&loop, &po, &r, err, sizeof err) == 0) {
    uint64_t until = uv_hrtime() + 3000000000ULL;
    while (!tg_prepaid_redis_ready(r) && uv_hrtime() < until)
      uv_run(&loop, UV_RUN_NOWAIT), uv_sleep(5);
    for (size_t i = 0; i < l->naccounts; i++) {
      const tg_config_account_t *a = &l->accounts[i];
      rseed_t s = {1, 0};
      if (tg_prepaid_redis_credit(r, a->billing_reference, a->currency, a->amount, a->reference, on_rseeded, &s) != 0)
        s.pending = 0, s.status = -EIO;
      while (s.pending > 0)
        uv_run(&loop, UV_RUN_ONCE);
      if (s.status < 0)
        tg_log(TG_LOG_WARN, "ledger: an opening credit could not reach Redis (tried again at the next start)",
               "reference", a->reference, "error", strerror(-s.status), NULL);
    }
    tg_prepaid_redis_free(r);
  }
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}

/* The opening credits of ledger.accounts not applied yet, appended on a
 * loop of this thread and waited for. */
static int seed_accounts(tg_app_t *app, char *err, size_t errlen) {
  if (app->ledger_redis.host) {
    seed_redis(app);
    return 0;
  }
  const tg_config_ledger_t *l = &app->cfg->ledger;
  uv_loop_t loop;
  tg_wal_client_t *c = NULL;
  seed_t s = {0};
  int rc = uv_loop_init(&loop);
  if (rc != 0) {
    snprintf(err, errlen, "cannot make a loop: %s", uv_strerror(rc));
    return rc;
  }
  if ((rc = tg_wal_client_new(app->wal, &loop, &c)) != 0)
    goto done;
  for (size_t i = 0; i < l->naccounts && rc == 0; i++) {
    const tg_config_account_t *a = &l->accounts[i];
    int64_t after;
    rc = tg_prepaid_credit_check(app->prepaid, a->billing_reference, a->currency, a->amount, a->reference, &after);
    if (rc == -EALREADY) {
      rc = 0;
      continue;
    }
    if (rc != 0) {
      snprintf(err, errlen, "ledger.accounts[%zu]: the opening credit is refused (%s)", i + 1, strerror(-rc));
      goto done;
    }
    size_t n;
    uint8_t *buf = tg_record_ledger_change(LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT,
                                           a->billing_reference, a->currency, a->amount, NULL, a->reference,
                                           app->cfg->instance, &n);
    if (buf == NULL) {
      rc = -ENOMEM;
      break;
    }
    if ((rc = tg_wal_append(c, buf, n, on_seeded, &s, NULL)) == 0)
      s.pending++;
    free(buf);
  }
  while (s.pending > 0)
    uv_run(&loop, UV_RUN_ONCE);
  if (rc == 0 && s.failed)
    rc = s.failed;
  if (rc != 0 && err[0] == '\0')
    snprintf(err, errlen, "ledger.accounts: the opening credits could not be logged (%s)", strerror(-rc));
done:
  if (c)
    tg_wal_client_free(c);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
  return rc;
}

/* Each tenant's billing section; the book when a tenant bills remotely. */
static int open_billing(tg_app_t *app, char *err, size_t errlen) {
  const tg_config_t *cfg = app->cfg;
  size_t n = cfg->ntenants;
  bool any = false;
  if ((app->billconf = calloc(n ? n : 1, sizeof *app->billconf)) == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < n; i++) {
    char why[400];
    int rc = tg_billconf_parse(&cfg->tenants[i].billing, &app->billconf[i], why, sizeof why);
    if (rc != 0) {
      snprintf(err, errlen, "tenant %s: %s", cfg->tenants[i].name, why);
      return rc;
    }
    any = any || app->billconf[i].remote;
  }
  if (!any || cfg->data_dir == NULL)
    return 0;
  if (cfg->ledger.mode == TG_CONFIG_LEDGER_REDIS) {
    snprintf(err, errlen, "billing type connect works with ledger.mode \"local\" only (the charges a remote "
                          "service owes are kept in this instance's log)");
    return -EINVAL;
  }
  const char **names = calloc(n, sizeof *names);
  bool *remote = calloc(n, sizeof *remote);
  if (names && remote) {
    for (size_t i = 0; i < n; i++) {
      names[i] = cfg->tenants[i].name;
      remote[i] = app->billconf[i].remote;
    }
    app->billing_book = tg_billing_book_new(n, names, remote, cfg->instance);
  }
  free(names);
  free(remote);
  if (app->billing_book == NULL || tg_billing_book_metrics_init() != 0) {
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  return 0;
}

int tg_app_open_ledger(tg_app_t *app, char *err, size_t errlen) {
  const tg_config_t *cfg = app->cfg;
  const tg_config_ledger_t *l = &cfg->ledger;
  int rc;
  err[0] = '\0';
  if ((app->signers = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *app->signers)) == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < cfg->ntenants; i++) {
    char why[400];
    if ((rc = tg_signer_from_config(&cfg->tenants[i].signer, &app->signers[i], why, sizeof why)) != 0) {
      snprintf(err, errlen, "tenant %s: %s", cfg->tenants[i].name, why);
      return rc;
    }
  }
  if ((rc = open_billing(app, err, errlen)) != 0)
    return rc;
  if (cfg->data_dir == NULL)
    return 0;
  if (cfg->ledger.mode == TG_CONFIG_LEDGER_REDIS &&
      tg_ratelimit_redis_opts_init(&app->ledger_redis, &cfg->redis, err, errlen) != 0)
    return -EINVAL;
  if (tg_purchase_metrics_init() != 0 || tg_wal_metrics_init() != 0 || tg_idem_metrics_init() != 0) {
    snprintf(err, errlen, "cannot declare the ledger metrics");
    return -ENOMEM;
  }
  size_t dl = strlen(cfg->data_dir) + 32;
  char *waldir = malloc(dl);
  app->snapshot_path = malloc(dl);
  app->prepaid = tg_prepaid_new();
  app->idem = tg_idem_new(l->idem_max_entries ? l->idem_max_entries : 1000000,
                          (uint64_t)(l->idem_ttl_s ? l->idem_ttl_s : 86400) * 1000);
  app->owed = tg_owed_new();
  app->usage = tg_usage_new(cfg, 0);
  if (waldir == NULL || app->snapshot_path == NULL || app->prepaid == NULL || app->idem == NULL ||
      app->owed == NULL || app->usage == NULL || tg_usage_metrics_init() != 0) {
    free(waldir);
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  snprintf(waldir, dl, "%s/wal", cfg->data_dir);
  snprintf(app->snapshot_path, dl, "%s/ledger.snap", cfg->data_dir);
  mkdir(cfg->data_dir, 0700);
  uint64_t snap_seq = 0;
  rc = tg_prepaid_snapshot_load(app->prepaid, app->snapshot_path, &snap_seq);
  if (rc != 0 && rc != -ENOENT) {
    snprintf(err, errlen, "%s: the balance snapshot is damaged (%s): move it away to rebuild the balances "
                          "from the whole log, if the log still holds every record",
             app->snapshot_path, strerror(-rc));
    free(waldir);
    return rc;
  }
  tg_wal_opts_t o;
  tg_wal_opts_init(&o);
  o.dir = waldir;
  if (l->wal_capacity_bytes)
    o.capacity_bytes = l->wal_capacity_bytes;
  if (l->wal_segment_bytes)
    o.segment_bytes = l->wal_segment_bytes;
  if (l->wal_batch_bytes)
    o.batch_bytes = l->wal_batch_bytes;
  o.batch_interval_us = l->wal_batch_interval_us;
  o.replay = on_replay;
  o.replay_arg = app;
  o.on_durable = on_durable;
  o.on_durable_arg = app;
  tg_wal_recovery_t rec;
  char why[512] = "";
  uint64_t t0 = uv_hrtime();
  rc = tg_wal_open(&o, &app->wal, &rec, why, sizeof why);
  free(waldir);
  if (rc != 0) {
    snprintf(err, errlen, "transaction log: %s", why[0] ? why : strerror(-rc));
    return rc;
  }
  app->wal_recovered_seq = rec.next_seq - 1;
  if (rec.first_seq > snap_seq + 1 || rec.next_seq <= snap_seq) {
    snprintf(err, errlen,
             "transaction log: it holds records %" PRIu64 "..%" PRIu64 " but the balance snapshot %s covers "
             "records up to %" PRIu64 " (%s): restore the snapshot or the log that go together",
             rec.first_seq, rec.next_seq - 1, app->snapshot_path, snap_seq, snap_seq ? "written" : "missing");
    tg_wal_close(app->wal);
    app->wal = NULL;
    return -EBADMSG;
  }
  char segs[24], recs[24], dropped[24], ms[24], snap[24];
  snprintf(segs, sizeof segs, "%" PRIu64, rec.segments);
  snprintf(recs, sizeof recs, "%" PRIu64, rec.records);
  snprintf(dropped, sizeof dropped, "%" PRIu64, rec.dropped_bytes);
  snprintf(ms, sizeof ms, "%.1f", (double)(uv_hrtime() - t0) / 1e6);
  snprintf(snap, sizeof snap, "%" PRIu64, snap_seq);
  tg_log(rec.dropped_bytes ? TG_LOG_WARN : TG_LOG_INFO, "transaction log recovered", "segments", segs, "records",
         recs, "snapshot_seq", snap, "torn_tail_bytes", dropped, "ms", ms, NULL);
  if (tg_owed_count(app->owed) > 0) {
    char owed[24];
    snprintf(owed, sizeof owed, "%zu", tg_owed_count(app->owed));
    tg_log(TG_LOG_WARN, "ledger: captures owed to Redis from before the restart (paid from the main loop)",
           "transactions", owed, NULL);
  }
  return seed_accounts(app, err, errlen);
}

void tg_app_ledger_tick(tg_app_t *app, uv_loop_t *loop) {
  if (app->owed == NULL || app->wal == NULL || !app->ledger_redis.host || tg_owed_count(app->owed) == 0)
    return;
  char err[256];
  if (app->main_redis == NULL) {
    tg_prepaid_redis_opts_t po = {app->ledger_redis.host, app->ledger_redis.port, app->ledger_redis.password,
                                  app->ledger_redis.db,   app->ledger_redis.timeout_ms, 0, 0, app->cfg->instance};
    if (tg_prepaid_redis_new(loop, &po, &app->main_redis, err, sizeof err) != 0)
      return;
  }
  if (app->main_wal == NULL && tg_wal_client_new(app->wal, loop, &app->main_wal) != 0)
    return;
  tg_owed_settle(app->owed, app->main_redis, app->main_wal, app->cfg->instance, 1000);
}

void tg_app_ledger_main_stop(tg_app_t *app) {
  if (app->main_redis)
    tg_prepaid_redis_free(app->main_redis);
  app->main_redis = NULL;
  tg_wal_client_release(app->main_wal);
  app->main_wal = NULL;
}

/* Removes the segments retention lets go: covered by the last snapshot on
 * disk, and older than the idempotency TTL (a restart rebuilds idempotency
 * answers from the log); nothing while captures are owed to Redis (they are
 * rebuilt from their records too). */
static void ledger_retain(tg_app_t *app) {
  const tg_config_ledger_t *l = &app->cfg->ledger;
  if (app->wal == NULL || (l->wal_retention_bytes == 0 && l->wal_retention_age_s == 0))
    return;
  if (app->owed && tg_owed_count(app->owed) > 0)
    return;
  /* Read the snapshot's sequence first: a settlement enters its book before
   * its record can be durable, so one covered by it is in the book by then.
   * The segments from the oldest settlement still owed stay (the queue is
   * rebuilt from them). */
  uint64_t covered = tg_prepaid_snapshot_seq(app->prepaid);
  uint64_t oldest = tg_paywall_oldest_seq(app->pay);
  if (oldest != 0 && oldest - 1 < covered)
    covered = oldest - 1;
  /* Charges a billing service still owes are rebuilt from their records too. */
  oldest = app->billing_book ? tg_billing_book_oldest_seq(app->billing_book) : 0;
  if (oldest != 0 && oldest - 1 < covered)
    covered = oldest - 1;
  /* Usage obligations still open are rebuilt from their Transaction records. */
  oldest = tg_usage_oldest_seq(app->usage);
  if (oldest != 0 && oldest - 1 < covered)
    covered = oldest - 1;
  /* Log shipping: a segment goes only once the store holds all of it. */
  if (app->ship && tg_ship_shipped_seq(app->ship) < covered)
    covered = tg_ship_shipped_seq(app->ship);
  uint32_t keep = l->idem_ttl_s ? l->idem_ttl_s : 86400;
  tg_wal_retain_stats_t st;
  int rc = tg_wal_retain_keep(app->wal, covered, l->wal_retention_bytes,
                              l->wal_retention_age_s, keep, &st);
  if (rc == 0 && st.removed_segments == 0)
    return;
  char n[24], first[24], bytes[24];
  snprintf(n, sizeof n, "%" PRIu64, st.removed_segments);
  snprintf(first, sizeof first, "%" PRIu64, st.first_seq);
  snprintf(bytes, sizeof bytes, "%" PRIu64, st.bytes);
  if (rc != 0)
    tg_log(TG_LOG_ERROR, "transaction log retention failed", "error", strerror(-rc), "removed_segments", n,
           "first_seq", first, "bytes", bytes, NULL);
  else
    tg_log(TG_LOG_INFO, "transaction log segments removed", "removed_segments", n, "first_seq", first, "bytes",
           bytes, NULL);
}

void tg_app_ledger_maintain(tg_app_t *app, bool force) {
  if (app->prepaid == NULL || app->snapshot_path == NULL)
    return;
  if (app->idem)
    tg_idem_expire(app->idem, tg_idem_now_ms());
  uint32_t every = app->cfg->ledger.snapshot_every ? app->cfg->ledger.snapshot_every : 100000;
  if (force || tg_prepaid_snapshot_due(app->prepaid, every)) {
    int rc = tg_prepaid_snapshot_write(app->prepaid, app->snapshot_path);
    if (rc != 0)
      tg_log(TG_LOG_ERROR, "ledger snapshot not written", "path", app->snapshot_path, "error", strerror(-rc),
             NULL);
  }
  ledger_retain(app); /* app->wal is NULL at shutdown: nothing then */
}

void tg_app_billing_health(const tg_app_t *app, size_t ti, tg_app_billing_health_t *out) {
  tg_billing_book_health_t h;
  tg_billing_book_health_get(app->billing_book, ti, &h);
  *out = (tg_app_billing_health_t){.configured = h.remote,
                                   .serving = h.serving,
                                   .consecutive_failures = h.consecutive_failures,
                                   .rejects = h.rejects};
}

tg_billing_t *tg_app_billing(tg_app_worker_t *aw, size_t ti) {
  if (aw->remote && ti < aw->app->cfg->ntenants && aw->remote[ti])
    return aw->remote[ti];
  return aw->billing;
}
