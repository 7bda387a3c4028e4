#include "gateway/gateway.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/log.h"
#include "base/secret.h"
#include "catalog/ingest.h"
#include "base/metrics.h"
#include "gateway/access.h"
#include "gateway/admin.h"
#include "gateway/readiness.h"
#include "gateway/reload.h"
#include "gateway/watch.h"
#include "ledger/ship.h"
#include "net/server.h"
#include "pipeline/app.h"
#include "pipeline/exchange.h"
#include "pipeline/resource.h"
#include "pipeline/usage.h"
#include "rpc/connect.h"
#include "rpc/otlp.h"

/* Log shipping (ledger.ship): the shipper reads segment files on its loop,
 * so it gets a loop and a thread of its own. Stopped after the log closed:
 * it ships what the last appends made durable, for up to SHIP_DRAIN_MS. */
#define SHIP_DRAIN_MS 3000
typedef struct shipper {
  uv_loop_t loop;
  uv_thread_t thread;
  uv_async_t stop;            /* main thread -> ship thread: drain, then free */
  uv_timer_t drain;
  uint64_t drain_until;       /* uv_now of the ship loop */
  _Atomic uint64_t target;    /* ship at least this far before stopping */
  tg_ship_t *ship;
} shipper_t;

struct tg_gateway {
  const tg_config_t *cfg;
  tg_app_t app;
  tg_server_t *server;
  tg_connect_router_t *router;
  tg_exchange_t exchange;
  tg_ingest_t *ingest;      /* catalog ingestion thread */
  tg_readiness_t readiness;
  tg_admin_t admin;
  char *admin_token;
  tg_watch_t *watch;
  uv_timer_t maintain;      /* balance snapshots (main loop) */
  bool maintaining;
  size_t nlisten;           /* public listeners; the admin one comes after them */
  shipper_t *shipper;       /* NULL: no log shipping */
  tg_tracer_t *tracer;      /* tracing (base/trace.h); NULL: off */
  tg_otlp_t *otlp;          /* its exporter thread */
};

static void ship_thread(void *arg) {
  shipper_t *sh = arg;
  uv_run(&sh->loop, UV_RUN_DEFAULT); /* until on_ship_drain closed every handle */
}

static void on_ship_drain(uv_timer_t *t) {
  shipper_t *sh = t->data;
  if (tg_ship_shipped_seq(sh->ship) < atomic_load(&sh->target) && uv_now(t->loop) < sh->drain_until)
    return;
  if (tg_ship_shipped_seq(sh->ship) < atomic_load(&sh->target))
    tg_log(TG_LOG_WARN, "log shipping: stopped with records not shipped (shipped at the next start)", NULL);
  tg_ship_free(sh->ship);
  sh->ship = NULL;
  uv_close((uv_handle_t *)&sh->drain, NULL);
  uv_close((uv_handle_t *)&sh->stop, NULL);
}

static void on_ship_stop(uv_async_t *a) {
  shipper_t *sh = a->data;
  if (uv_is_active((uv_handle_t *)&sh->drain))
    return;
  sh->drain_until = uv_now(&sh->loop) + SHIP_DRAIN_MS;
  uv_timer_start(&sh->drain, on_ship_drain, 0, 10);
}

/* After tg_app_open_ledger, before the workers: the shipper, on its thread,
 * kicked by app.c's on_durable from now on. Nothing without ledger.ship or a log. */
static int ship_start(tg_gateway_t *g, char *err, size_t errlen) {
  const tg_config_t *cfg = g->cfg;
  if (cfg->ledger.ship_store != TG_CONFIG_SHIP_REDIS || g->app.wal == NULL)
    return 0;
  tg_ratelimit_redis_opts_t ro = {0};
  char waldir[4096];
  shipper_t *sh = NULL;
  int rc = -ENOMEM;
  if (tg_ship_metrics_init() != 0) {
    snprintf(err, errlen, "cannot declare the log shipping metrics");
    goto fail;
  }
  if (tg_ratelimit_redis_opts_init(&ro, &cfg->redis, err, errlen) != 0) {
    rc = -EINVAL;
    goto fail;
  }
  snprintf(waldir, sizeof waldir, "%s/wal", cfg->data_dir);
  if ((sh = calloc(1, sizeof *sh)) == NULL || (rc = uv_loop_init(&sh->loop)) != 0) {
    snprintf(err, errlen, "log shipping: %s", sh ? uv_strerror(rc) : "out of memory");
    free(sh);
    sh = NULL;
    goto fail;
  }
  /* Every record so far is durable: those recovery found, and the opening credits appended since. */
  tg_wal_stats_t st;
  tg_wal_stats(g->app.wal, &st);
  tg_ship_opts_t so = {.wal_dir = waldir,
                       .data_dir = cfg->data_dir,
                       .instance = cfg->instance,
                       .host = ro.host,
                       .port = ro.port,
                       .password = ro.password,
                       .db = ro.db,
                       .timeout_ms = cfg->ledger.ship_timeout_ms,
                       .batch = cfg->ledger.ship_batch,
                       .durable_seq = g->app.wal_recovered_seq + st.records};
  /* The loop is not running yet: this thread is its thread until uv_thread_create. */
  if ((rc = tg_ship_new(&sh->loop, &so, &sh->ship, err, errlen)) != 0)
    goto fail_loop;
  sh->stop.data = sh->drain.data = sh;
  uv_timer_init(&sh->loop, &sh->drain);
  if ((rc = uv_async_init(&sh->loop, &sh->stop, on_ship_stop)) != 0) {
    snprintf(err, errlen, "log shipping: %s", uv_strerror(rc));
    uv_close((uv_handle_t *)&sh->drain, NULL);
    tg_ship_free(sh->ship);
    goto fail_loop;
  }
  if ((rc = uv_thread_create(&sh->thread, ship_thread, sh)) != 0) {
    snprintf(err, errlen, "log shipping: cannot start its thread: %s", uv_strerror(rc));
    uv_close((uv_handle_t *)&sh->drain, NULL);
    uv_close((uv_handle_t *)&sh->stop, NULL);
    tg_ship_free(sh->ship);
    goto fail_loop;
  }
  g->shipper = sh;
  g->app.ship = sh->ship;
  tg_ratelimit_redis_opts_clear(&ro);
  return 0;
fail_loop:
  uv_run(&sh->loop, UV_RUN_DEFAULT);
  uv_loop_close(&sh->loop);
  free(sh);
fail:
  tg_ratelimit_redis_opts_clear(&ro);
  return rc;
}

/* After the log closed (its last records kicked): ship them, then stop. */
static void ship_stop(tg_gateway_t *g) {
  shipper_t *sh = g->shipper;
  if (sh == NULL)
    return;
  g->shipper = NULL;
  atomic_store(&sh->target, tg_ship_durable_seq(sh->ship));
  uv_async_send(&sh->stop);
  uv_thread_join(&sh->thread);
  uv_loop_close(&sh->loop);
  free(sh);
}

static void public_handler(tg_http_req_t *req, void *ud) {
  tg_gateway_t *g = ud;
  if (tg_connect_handle(g->router, req))
    return;
  if (strcmp(req->path, "/healthz") == 0) {
    tg_http_respond_simple(req, 200, "text/plain; charset=utf-8", "ok\n", 3);
    return;
  }
  if (strcmp(req->path, "/readyz") == 0) {
    tg_readiness_respond(&g->readiness, req);
    return;
  }
  /* req->host: the absolute-form authority or the Host header, normalized by the server. */
  const tg_config_tenant_t *t = req->host ? tg_tenants_by_host(g->app.tenants, req->host, req->host_len) : NULL;
  if (t) {
    snprintf(req->note.tenant, sizeof req->note.tenant, "%s", t->name);
    tg_resource_handle(tg_app_worker(&g->app, req->worker), t, req);
    return;
  }
  tg_http_respond_json(req, 404, json_pack("{s:s}", "error", "not found"));
}

static tg_metric_t *m_http_duration;

/* The RED duration of a tenant's plain HTTP requests (402 challenges, paid
 * and free answers, proxied ones): the Connect front has its own
 * (exchange_rpc_duration_seconds). */
static int http_metrics_init(void) {
  static const char *const l[] = {"tenant_id", "code", NULL};
  m_http_duration = tg_metric_new(TG_METRIC_HISTOGRAM, "http_request_duration_seconds",
                                  "Time from a tenant's plain HTTP request (a resource: 402 challenge, paid, free, "
                                  "proxied) to its answer, by tenant and status class (2xx, 3xx, 4xx, 5xx).",
                                  l, NULL, 0);
  return m_http_duration ? 0 : -ENOMEM;
}

/* Each answer on a public listener (the admin one is not traffic): the RED
 * duration of tenants' plain HTTP requests, and the access log. */
static void on_answered(const tg_http_req_t *req, int status, uint64_t bytes, void *ud) {
  tg_gateway_t *g = ud;
  if (req->listener >= g->nlisten)
    return;
  if (req->note.route == NULL && req->note.tenant[0] != '\0' && status >= 100 && status < 600) {
    static const char *const classes[] = {"1xx", "2xx", "3xx", "4xx", "5xx"};
    const char *labels[] = {req->note.tenant, classes[status / 100 - 1]};
    tg_histogram_observe(m_http_duration, labels, (double)(uv_hrtime() - req->start_ns) / 1e9);
  }
  if (g->cfg->access_log.enabled)
    tg_access_log(&g->cfg->access_log, req, status, bytes);
}

static int worker_start(tg_worker_t *w, void *ud) {
  tg_gateway_t *g = ud;
  return tg_app_worker_start(&g->app, w);
}

static void worker_stop(tg_worker_t *w, void *ud) {
  tg_gateway_t *g = ud;
  tg_admin_worker_stop(&g->admin, w);
  tg_app_worker_stop(&g->app, w);
}

/* Tracing, when configured: the process tracer and its exporter thread,
 * before anything records (ingestion, workers). */
static int trace_start(tg_gateway_t *g, char *err, size_t errlen) {
  const tg_config_tracing_t *tc = &g->cfg->tracing;
  if (tc->endpoint == NULL)
    return 0;
  tg_tracer_opts_t to = {.sample = tc->sample, .sample_set = true, .queue = tc->queue};
  tg_otlp_opts_t oo = {.endpoint = tc->endpoint,
                       .service_name = tc->service_name,
                       .instance = g->cfg->instance,
                       .batch = tc->batch,
                       .flush_ms = tc->flush_ms};
  if ((g->tracer = tg_tracer_new(&to)) == NULL) {
    snprintf(err, errlen, "tracing: out of memory");
    return -ENOMEM;
  }
  if ((g->otlp = tg_otlp_start(g->tracer, &oo, err, errlen)) == NULL) {
    tg_tracer_free(g->tracer);
    g->tracer = NULL;
    return -ENOMEM;
  }
  tg_trace_set_global(g->tracer);
  return 0;
}

/* After the workers and ingestion stopped: export what they recorded. */
static void trace_stop(tg_gateway_t *g) {
  if (g->tracer == NULL)
    return;
  tg_trace_set_global(NULL);
  tg_otlp_stop(g->otlp);
  tg_tracer_free(g->tracer);
  g->otlp = NULL;
  g->tracer = NULL;
}

static void gateway_free(tg_gateway_t *g) {
  trace_stop(g);
  tg_connect_router_free(g->router);
  tg_app_clear(&g->app); /* closes the log: its last records are kicked to the shipper */
  ship_stop(g);
  tg_secret_free(g->admin_token);
  free(g);
}

static int start_listeners(tg_gateway_t *g, char *err, size_t errlen) {
  const tg_config_t *cfg = g->cfg;
  tg_listener_config_t ls[TG_CONFIG_MAX_LISTENERS + 1];
  size_t n = 0;
  for (size_t i = 0; i < cfg->nlisten; i++) {
    const tg_config_listener_t *l = &cfg->listen[i];
    ls[n++] = (tg_listener_config_t){l->host, l->port, l->tls_cert, l->tls_key, 0, public_handler, g};
  }
  g->nlisten = n;
  if (cfg->admin.host)
    ls[n++] = (tg_listener_config_t){cfg->admin.host, cfg->admin.port, cfg->admin.tls_cert,
                                     cfg->admin.tls_key, 1, tg_admin_handle, &g->admin};
  tg_server_config_t sc = {0};
  sc.listeners = ls;
  sc.nlisteners = n;
  sc.nworkers = g->app.nworkers;
  sc.on_worker_start = worker_start;
  sc.on_worker_stop = worker_stop;
  sc.on_answered = on_answered;
  sc.ud = g;
  sc.limits.max_header_bytes = cfg->max_header_bytes;
  sc.limits.max_body_bytes = cfg->max_body_bytes;
  sc.limits.header_timeout_ms = cfg->header_timeout_ms;
  sc.limits.body_timeout_ms = cfg->body_timeout_ms;
  sc.limits.idle_timeout_ms = cfg->idle_timeout_ms;
  sc.limits.max_connections = cfg->max_connections;
  int rc = tg_server_start(&g->server, &sc, err, errlen);
  if (rc != 0)
    return rc;
  for (size_t i = 0; i < n; i++) {
    char addr[300];
    snprintf(addr, sizeof addr, "%s://%s:%d", ls[i].tls_cert_file ? "https" : "http", ls[i].host,
             tg_server_port(g->server, i));
    tg_log(TG_LOG_INFO, "listening", "addr", addr, "role", i < g->nlisten ? "public" : "admin", NULL);
  }
  return 0;
}

int tg_gateway_start(tg_gateway_t **out, const tg_config_t *cfg, char *err, size_t errlen) {
  int rc;
  tg_gateway_t *g = calloc(1, sizeof *g);
  if (g == NULL)
    return -ENOMEM;
  g->cfg = cfg;
  if (cfg->admin.host) {
    if ((g->admin_token = tg_config_read_token(cfg, err, errlen)) == NULL) {
      rc = -EINVAL;
      goto fail;
    }
  }
  if ((rc = tg_app_init(&g->app, cfg, TG_VERSION, err, errlen)) != 0 ||
      (rc = tg_app_open_ledger(&g->app, err, errlen)) != 0 || (rc = ship_start(g, err, errlen)) != 0)
    goto fail;
  rc = -ENOMEM;
  if ((g->router = tg_connect_router_new()) == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  g->exchange.app = &g->app;
  if (cfg->max_body_bytes)
    tg_connect_router_set_max_message(g->router, cfg->max_body_bytes);
  if ((rc = tg_connect_metrics_init()) != 0 || (rc = http_metrics_init()) != 0 ||
      (rc = tg_exchange_register(&g->exchange, g->router)) != 0) {
    snprintf(err, errlen, "cannot register the exchange routes (%d)", rc);
    goto fail;
  }
  if ((rc = trace_start(g, err, errlen)) != 0)
    goto fail;
  /* Ingestion first: everything the workers read is in place before the
   * first request (an early /catalog/refresh finds its ingester). */
  if ((g->ingest = tg_ingest_start(cfg, g->app.catalogs, err, errlen)) == NULL) {
    rc = -ENOMEM;
    goto fail;
  }
  g->readiness.cfg = cfg;
  g->readiness.ingest = g->ingest;
  g->readiness.app = &g->app;
  g->admin = (tg_admin_t){.token = g->admin_token,
                          .token_len = g->admin_token ? strlen(g->admin_token) : 0,
                          .version = TG_VERSION,
                          .started_at = time(NULL),
                          .app = &g->app,
                          .ingest = g->ingest,
                          .readiness = &g->readiness};
  if ((rc = start_listeners(g, err, errlen)) != 0) {
    tg_ingest_stop(g->ingest);
    goto fail;
  }
  g->readiness.server = g->server; /* read only once serving is set (release) */
  g->admin.npublic = g->nlisten;   /* the drain closes the public listeners */
  g->admin.server = g->server;
  /* Serve with the catalogs that load quickly; /readyz names the others. */
  if (cfg->ingest_initial_wait_ms)
    tg_ingest_wait_initial(g->ingest, cfg->ingest_initial_wait_ms);
  tg_readiness_set_serving(&g->readiness, 1);
  *out = g;
  return 0;
fail:
  gateway_free(g);
  return rc;
}

int tg_gateway_port(const tg_gateway_t *g, int i) {
  if (i < 0)
    return g->cfg->admin.host ? tg_server_port(g->server, g->nlisten) : -1;
  return tg_server_port(g->server, (size_t)i);
}

int tg_gateway_reload(tg_gateway_t *g) { return tg_reload_policies(g->app.policies, NULL, NULL); }

static void on_maintain(uv_timer_t *t) {
  tg_gateway_t *g = t->data;
  tg_app_ledger_maintain(&g->app, false);
  tg_app_ledger_tick(&g->app, t->loop);
  tg_usage_tick(g->app.usage, (int64_t)time(NULL)); /* overdue usage reports, and their gauges */
}

int tg_gateway_watch(tg_gateway_t *g, uv_loop_t *loop) {
  if (!g->maintaining && g->app.prepaid && uv_timer_init(loop, &g->maintain) == 0) {
    g->maintain.data = g;
    g->maintaining = true;
    uv_timer_start(&g->maintain, on_maintain, 1000, 5000);
  }
  g->watch = tg_watch_start(g->app.policies, loop, g->cfg->policy_watch_debounce_ms);
  return g->watch ? 0 : -ENOMEM;
}

void tg_gateway_unwatch(tg_gateway_t *g) {
  if (g->maintaining) {
    g->maintaining = false;
    uv_close((uv_handle_t *)&g->maintain, NULL);
    tg_app_ledger_main_stop(&g->app);
  }
  tg_watch_stop(g->watch);
  g->watch = NULL;
}

void tg_gateway_stop(tg_gateway_t *g) {
  tg_readiness_set_serving(&g->readiness, 0);
  tg_server_stop(g->server, g->cfg->shutdown_grace_ms ? g->cfg->shutdown_grace_ms : 10000);
  tg_ingest_stop(g->ingest);
  gateway_free(g);
}
