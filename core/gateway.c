#include "gateway.h"
#include "hex.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <mbedtls/platform_util.h>
#include <llhttp.h>

#include "app.h"
#include "catalog.h"
#include "offer.h"
#include "snapshot.h"
#include "buf.h"
#include "connect/connect.h"
#include "exchange.h"
#include "ingest.h"
#include "http/client.h"
#include "http/server.h"
#include "log.h"
#include "metrics.h"
#include "policy.h"
#include "ratelimit.h"
#include "resource.h"
#include "tenants.h"

#ifndef TG_VERSION
#define TG_VERSION "0.1.0"
#endif

typedef struct watch {
  uv_fs_event_t ev;
  struct tg_gateway *g;
} watch_t;

struct tg_gateway {
  const tg_config_t *cfg;
  tg_server_t *server;
  tg_connect_router_t *router;
  tg_tenants_t *tenants;
  tg_exchange_t exchange;
  tg_app_t app;
  watch_t *watches;         /* policy folders watched on the main loop */
  size_t nwatches;
  uv_timer_t debounce;      /* editors write in several steps: reload once they settle */
  int watching;
  tg_ingest_t *ingest;      /* catalog ingestion thread */
  char *admin_token;
  size_t admin_token_len;
  size_t nlisten;
  _Atomic int ready;       /* 1 while serving; 0 starting and draining */
  time_t started_at;
};

static void respond_json(tg_http_req_t *req, int status, const char *body) {
  tg_http_respond_simple(req, status, "application/json", body, strlen(body));
}

static void readyz(tg_gateway_t *g, tg_http_req_t *req) {
  tg_buf_t b = {0}, reasons = {0};
  int ready = atomic_load_explicit(&g->ready, memory_order_acquire);
  if (!ready)
    tg_buf_puts(&reasons, "\"not serving: starting or draining\"");
  /* A tenant whose catalog never loaded has no inventory: say which and why. */
  for (size_t i = 0; g->ingest && i < g->cfg->ntenants; i++) {
    tg_ingest_status_t st;
    if (tg_ingest_status(g->ingest, i, &st) != 0 || !st.has_source || st.loaded)
      continue;
    json_t *why = json_string(st.attempted ? st.last_error : "first load not finished");
    char *esc = why ? json_dumps(why, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
    tg_buf_printf(&reasons, "%s{\"tenant\":\"%s\",\"catalog\":%s}", reasons.len ? "," : "",
                  g->cfg->tenants[i].name, esc ? esc : "\"?\"");
    free(esc);
    json_decref(why);
    ready = 0;
  }
  tg_buf_printf(&b, "{\"ready\":%s,\"tenants\":%zu,\"connections\":%llu,\"reasons\":[%s]}",
                ready ? "true" : "false", g->cfg->ntenants,
                (unsigned long long)(g->server ? tg_server_connections(g->server) : 0),
                reasons.len ? reasons.data : "");
  respond_json(req, ready ? 200 : 503, b.data);
  tg_buf_free(&b);
  tg_buf_free(&reasons);
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
    readyz(g, req);
    return;
  }
  const tg_http_header_t *host = tg_http_req_header(req, "host");
  const tg_config_tenant_t *t = host ? tg_tenants_by_host(g->tenants, host->value, host->value_len) : NULL;
  if (t) {
    tg_resource_handle(tg_app_worker(req->worker), t, req);
    return;
  }
  respond_json(req, 404, "{\"error\":\"not found\"}");
}

/* ---- policy reloads ---- */

static void log_reload(const tg_policy_reload_result_t *res, size_t n, tg_buf_t *out) {
  tg_buf_puts(out, "{\"tenants\":[");
  for (size_t i = 0; i < n; i++) {
    static const char *const names[] = {"unchanged", "updated", "failed"};
    const tg_policy_reload_result_t *r = &res[i];
    json_t *err = json_string(r->error);
    char *esc = err ? json_dumps(err, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
    tg_buf_printf(out, "%s{\"tenant\":\"%s\",\"status\":\"%s\",\"version\":\"%.12s\"%s%s}",
                  i ? "," : "", r->tenant, names[r->status], r->version,
                  r->status == TG_POLICY_RELOAD_FAILED ? ",\"error\":" : "",
                  r->status == TG_POLICY_RELOAD_FAILED && esc ? esc : "");
    free(esc);
    json_decref(err);
    if (r->status == TG_POLICY_RELOAD_UPDATED)
      tg_log(TG_LOG_INFO, "policy reloaded", "tenant", r->tenant, "version", r->version, NULL);
  }
  tg_buf_puts(out, "]}");
}

int tg_gateway_reload(tg_gateway_t *g, const char *tenant, tg_buf_t *summary) {
  tg_policy_reload_result_t *res = NULL;
  size_t n = 0;
  int rc = tg_policy_reload(g->app.policies, tenant, &res, &n);
  tg_buf_t tmp = {0};
  log_reload(res, n, summary ? summary : &tmp);
  tg_buf_free(&tmp);
  free(res);
  return rc;
}

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

/* The admin reload runs on the thread pool: it compiles and dry-runs
 * policies, which must not stall worker 0's requests. */
typedef struct reload_job {
  uv_work_t work;
  tg_gateway_t *g;
  tg_http_req_t *req;
  char tenant[65];
  int rc;
  tg_buf_t summary;
} reload_job_t;

static void reload_work(uv_work_t *w) {
  reload_job_t *j = w->data;
  j->rc = tg_gateway_reload(j->g, j->tenant[0] ? j->tenant : NULL, &j->summary);
}

static void reload_done(uv_work_t *w, int status) {
  reload_job_t *j = w->data;
  int http = status != 0 ? 500 : j->rc == 0 ? 200 : j->rc == -ENOENT ? 404 : 422;
  if (j->rc == -ENOENT)
    respond_json(j->req, http, "{\"error\":\"unknown tenant\"}");
  else
    tg_http_respond_simple(j->req, http, "application/json", j->summary.data, j->summary.len);
  tg_buf_free(&j->summary);
  free(j);
}

static void admin_reload(tg_gateway_t *g, tg_http_req_t *req) {
  reload_job_t *j = calloc(1, sizeof *j);
  if (j == NULL) {
    respond_json(req, 503, "{\"error\":\"out of memory\"}");
    return;
  }
  j->g = g;
  j->req = req;
  j->work.data = j;
  if (req->query && strncmp(req->query, "tenant=", 7) == 0)
    snprintf(j->tenant, sizeof j->tenant, "%.*s", (int)strcspn(req->query + 7, "&"), req->query + 7);
  if (uv_queue_work(req->worker->loop, &j->work, reload_work, reload_done) != 0) {
    free(j);
    respond_json(req, 503, "{\"error\":\"cannot schedule the reload\"}");
  }
}

/* Compares in time independent of where the first difference is. */
static int token_equal(const char *a, size_t alen, const char *b, size_t blen) {
  unsigned char d = alen != blen;
  size_t n = alen < blen ? alen : blen;
  for (size_t i = 0; i < n; i++)
    d |= (unsigned char)(a[i] ^ b[i]);
  return d == 0;
}

static int admin_authorized(tg_gateway_t *g, tg_http_req_t *req) {
  const tg_http_header_t *h = tg_http_req_header(req, "authorization");
  if (h == NULL || h->value_len < 7 || strncasecmp(h->value, "Bearer ", 7) != 0)
    return 0;
  const char *tok = h->value + 7;
  size_t len = h->value_len - 7;
  while (len && *tok == ' ')
    tok++, len--;
  return token_equal(tok, len, g->admin_token, g->admin_token_len);
}

static void admin_handler(tg_http_req_t *req, void *ud) {
  tg_gateway_t *g = ud;
  if (!admin_authorized(g, req)) {
    tg_http_header_t h[2] = {{"WWW-Authenticate", 16, "Bearer realm=\"tollgate-admin\"", 29},
                             {"Content-Type", 12, "application/json", 16}};
    static const char body[] = "{\"error\":\"unauthorized\"}";
    tg_log_req(TG_LOG_WARN, req->request_id, "admin request refused", "peer", req->peer, "path",
               req->path, NULL);
    tg_http_respond(req, 401, h, 2, body, sizeof body - 1); /* req is gone after this */
    return;
  }
  if (strcmp(req->path, "/metrics") == 0) {
    tg_buf_t b = {0};
    if (tg_metrics_render(&b) != 0) {
      tg_buf_free(&b);
      respond_json(req, 500, "{\"error\":\"metrics unavailable\"}");
      return;
    }
    tg_http_respond_simple(req, 200, "text/plain; version=0.0.4; charset=utf-8", b.data, b.len);
    tg_buf_free(&b);
    return;
  }
  if (strcmp(req->path, "/reload") == 0) {
    if (req->method != HTTP_POST) {
      tg_http_header_t h[2] = {{"Allow", 5, "POST", 4}, {"Content-Type", 12, "application/json", 16}};
      static const char body[] = "{\"error\":\"use POST\"}";
      tg_http_respond(req, 405, h, 2, body, sizeof body - 1);
      return;
    }
    admin_reload(g, req);
    return;
  }
  if (strcmp(req->path, "/catalog/refresh") == 0) {
    if (req->method != HTTP_POST) {
      tg_http_header_t h[2] = {{"Allow", 5, "POST", 4}, {"Content-Type", 12, "application/json", 16}};
      static const char body[] = "{\"error\":\"use POST\"}";
      tg_http_respond(req, 405, h, 2, body, sizeof body - 1);
      return;
    }
    char tenant[65] = "";
    if (req->query && strncmp(req->query, "tenant=", 7) == 0)
      snprintf(tenant, sizeof tenant, "%.*s", (int)strcspn(req->query + 7, "&"), req->query + 7);
    int rc = g->ingest ? tg_ingest_refresh(g->ingest, tenant[0] ? tenant : NULL) : -ENOENT;
    if (rc == 0)
      respond_json(req, 202, "{\"refresh\":\"started\"}");
    else
      respond_json(req, 404, "{\"error\":\"unknown tenant or no catalog source\"}");
    return;
  }
  if (strcmp(req->path, "/status") == 0) {
    tg_buf_t b = {0};
    tg_buf_printf(&b, "{\"version\":\"%s\",\"uptime_s\":%lld,\"ready\":%s,\"policy_generation\":%llu,"
                  "\"tenants\":[",
                  TG_VERSION, (long long)(time(NULL) - g->started_at),
                  atomic_load(&g->ready) ? "true" : "false",
                  (unsigned long long)tg_policy_generation(g->app.policies));
    size_t np = tg_policy_count(g->app.policies);
    for (size_t i = 0; i < np; i++) {
      tg_policy_info_t info;
      if (tg_policy_info(g->app.policies, i, &info) != 0)
        continue;
      json_t *path = json_string(info.path);
      char *esc = path ? json_dumps(path, JSON_ENCODE_ANY | JSON_ENSURE_ASCII) : NULL;
      tg_buf_printf(&b, "%s{\"name\":\"%s\",\"policy\":{\"file\":%s,\"version\":\"%s\",\"loaded_at\":%.3f}}",
                    i ? "," : "", info.tenant, esc ? esc : "null", info.version, info.loaded_at);
      free(esc);
      json_decref(path);
    }
    tg_buf_puts(&b, "]}");
    respond_json(req, 200, b.data);
    tg_buf_free(&b);
    return;
  }
  respond_json(req, 404, "{\"error\":\"not found\"}");
}

void tg_app_take(tg_app_worker_t *aw, const char *tenant, const tg_policy_rate_t *rate,
                 tg_app_take_cb cb, void *ud);

static void free_handle_data(uv_handle_t *h) { free(h->data); }

static void destroy_catalog(void *data) { tg_catalog_free(data); }

/* mkdir -p with mode 0700 for the folders it makes. */
static void mkdir_p(const char *dir) {
  char tmp[1024];
  snprintf(tmp, sizeof tmp, "%s", dir);
  for (char *p = tmp + 1; *p; p++) {
    if (*p == '/') {
      *p = '\0';
      mkdir(tmp, 0700);
      *p = '/';
    }
  }
  mkdir(tmp, 0700);
}

/* The key that signs offer ids: <data_dir>/offer.key (64 hex digits), made
 * on first start. Instances behind one load balancer must share the file, so
 * that an offer discovered on one is accepted by another. Without a data_dir
 * the key lives in memory only (offers die with the process). */
static int offer_keys_load(tg_offer_keyring_t *k, const tg_config_t *cfg, char *err, size_t errlen) {
  tg_offer_keyring_init(k);
  uint8_t raw[32];
  char hex[65];
  char path[1100];
  FILE *f = NULL;
  if (cfg->data_dir) {
    snprintf(path, sizeof path, "%s/offer.key", cfg->data_dir);
    f = fopen(path, "r");
    if (f) {
      size_t n = fread(hex, 1, 64, f);
      fclose(f);
      hex[n] = '\0';
      if (n != 64 || tg_offer_keyring_add_hex(k, 1, hex, 64) != 0) {
        snprintf(err, errlen, "%s: expected 64 hex digits", path);
        return -EINVAL;
      }
      mbedtls_platform_zeroize(hex, sizeof hex);
      return 0;
    }
  }
  if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
    snprintf(err, errlen, "no randomness for the offer key");
    return -EIO;
  }
  if (tg_offer_keyring_add(k, 1, raw, sizeof raw) != 0)
    return -EINVAL;
  if (cfg->data_dir) {
    tg_hex_encode(raw, 32, hex);
    mkdir_p(cfg->data_dir);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
    if (fd < 0 || write(fd, hex, 64) != 64) {
      snprintf(err, errlen, "%s: cannot write the offer key: %s", path, strerror(errno));
      if (fd >= 0)
        close(fd);
      return -EIO;
    }
    close(fd);
    mbedtls_platform_zeroize(hex, sizeof hex);
  } else {
    tg_log(TG_LOG_WARN, "no data_dir: offer ids are signed with a key that dies with the process", NULL);
  }
  mbedtls_platform_zeroize(raw, sizeof raw);
  return 0;
}

static void app_free(tg_gateway_t *g) {
  tg_connect_router_free(g->router);
  tg_tenants_free(g->tenants);
  if (g->app.policies)
    tg_policy_registry_free(g->app.policies);
  if (g->app.limits)
    tg_ratelimit_free(g->app.limits);
  tg_ratelimit_redis_opts_clear(&g->app.redis_opts);
  if (g->app.catalogs) {
    for (size_t i = 0; i < g->cfg->ntenants; i++)
      if (g->app.catalogs[i])
        tg_snapshot_free(g->app.catalogs[i]);
    free(g->app.catalogs);
  }
  tg_offer_keyring_clear(&g->app.offer_keys);
  free(g->app.workers);
  free(g->watches);
  free(g->admin_token);
  free(g);
}

/* Each worker gets its own outbound client (billing, facilitator, RSL), its
 * own policy states, and in redis mode its own Redis connection. */
static int worker_start(tg_worker_t *w, void *ud) {
  tg_gateway_t *g = ud;
  char err[512];
  tg_app_worker_t *aw = calloc(1, sizeof *aw);
  if (aw == NULL)
    return -ENOMEM;
  aw->app = &g->app;
  aw->worker = w;
  w->app = aw;
  w->httpc = tg_httpc_new(w->loop, NULL);
  aw->policy = tg_policy_runtime_new(g->app.policies, err, sizeof err);
  if (w->httpc == NULL || aw->policy == NULL) {
    tg_log(TG_LOG_ERROR, "worker start failed", "reason", aw->policy ? "out of memory" : err, NULL);
    return -ENOMEM;
  }
  if (g->app.redis_opts.host) {
    aw->redis = tg_ratelimit_redis_new(w->loop, &g->app.redis_opts, g->app.limits, err, sizeof err);
    if (aw->redis == NULL)
      return -ENOMEM;
  }
  aw->catalog_readers = calloc(g->cfg->ntenants ? g->cfg->ntenants : 1, sizeof *aw->catalog_readers);
  if (aw->catalog_readers == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < g->cfg->ntenants; i++)
    if ((aw->catalog_readers[i] = tg_snapshot_reader_register(g->app.catalogs[i])) == NULL)
      return -ENOMEM;
  uv_async_init(w->loop, &aw->policy_sync, on_policy_sync);
  aw->policy_sync.data = aw;
  g->app.workers[w->id] = aw;
  return 0;
}

static void worker_stop(tg_worker_t *w, void *ud) {
  tg_gateway_t *g = ud;
  tg_app_worker_t *aw = w->app;
  if (w->httpc)
    tg_httpc_free(w->httpc);
  w->httpc = NULL;
  if (aw == NULL)
    return;
  g->app.workers[w->id] = NULL;
  if (aw->redis)
    tg_ratelimit_redis_free(aw->redis);
  if (aw->policy)
    tg_policy_runtime_free(aw->policy);
  if (aw->catalog_readers) {
    for (size_t i = 0; i < g->cfg->ntenants; i++)
      if (aw->catalog_readers[i])
        tg_snapshot_reader_unregister(aw->catalog_readers[i]);
    free(aw->catalog_readers);
  }
  /* The async handle lives in aw: free aw once the handle is closed. */
  if (aw->policy_sync.loop)
    uv_close((uv_handle_t *)&aw->policy_sync, free_handle_data);
  else
    free(aw);
  w->app = NULL;
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
    free(t); /* could not ask Redis: decide locally */
  }
  uint32_t retry = 0;
  int allowed = tg_ratelimit_take(aw->app->limits, tenant, rate->key, rate->keylen, rate->rate,
                                  rate->burst, tg_ratelimit_now_us(), &retry);
  tg_ratelimit_count(tenant, allowed, TG_RATELIMIT_LOCAL);
  cb(ud, allowed, retry);
}

int tg_gateway_start(tg_gateway_t **out, const tg_config_t *cfg, char *err, size_t errlen) {
  int rc = -ENOMEM;
  tg_gateway_t *g = calloc(1, sizeof *g);
  if (g == NULL)
    return -ENOMEM;
  g->cfg = cfg;
  g->started_at = time(NULL);
  if (cfg->admin.host) {
    g->admin_token = tg_config_read_token(cfg, err, errlen);
    if (g->admin_token == NULL) {
      rc = -EINVAL;
      goto fail;
    }
    g->admin_token_len = strlen(g->admin_token);
  }
  g->app.cfg = cfg;
  tg_policy_options_t popt = {0};
  popt.version = TG_VERSION;
  popt.on_publish = on_publish;
  popt.on_publish_ud = &g->app;
  if ((rc = tg_policy_registry_new(cfg, &popt, &g->app.policies, err, errlen)) != 0)
    goto fail;
  if ((rc = tg_ratelimit_metrics_init()) != 0) {
    snprintf(err, errlen, "cannot declare the rate-limit metrics");
    goto fail;
  }
  g->app.limits = tg_ratelimit_new(cfg->rate_limit_table_size ? cfg->rate_limit_table_size : 65536);
  if (cfg->rate_limit_mode == TG_CONFIG_RATE_LIMIT_REDIS &&
      tg_ratelimit_redis_opts_init(&g->app.redis_opts, &cfg->redis, err, errlen) != 0) {
    rc = -EINVAL;
    goto fail;
  }
  g->app.nworkers = cfg->workers > 0 ? cfg->workers : (int)uv_available_parallelism();
  g->app.workers = calloc((size_t)g->app.nworkers, sizeof *g->app.workers);
  g->app.catalogs = calloc(cfg->ntenants ? cfg->ntenants : 1, sizeof *g->app.catalogs);
  for (size_t i = 0; g->app.catalogs && i < cfg->ntenants; i++)
    if ((g->app.catalogs[i] = tg_snapshot_new(destroy_catalog)) == NULL) {
      snprintf(err, errlen, "out of memory");
      goto fail;
    }
  g->app.offer_ttl_s = 300;
  if ((rc = offer_keys_load(&g->app.offer_keys, cfg, err, errlen)) != 0)
    goto fail;
  g->tenants = tg_tenants_new(cfg);
  g->app.tenants = g->tenants;
  g->router = tg_connect_router_new();
  if (g->tenants == NULL || g->router == NULL || g->app.limits == NULL || g->app.workers == NULL ||
      g->app.catalogs == NULL) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  g->exchange.tenants = g->tenants;
  if (cfg->max_body_bytes)
    tg_connect_router_set_max_message(g->router, cfg->max_body_bytes);
  if ((rc = tg_connect_metrics_init()) != 0 || (rc = tg_exchange_register(&g->exchange, g->router)) != 0) {
    snprintf(err, errlen, "cannot register the exchange routes (%d)", rc);
    goto fail;
  }

  tg_listener_config_t ls[TG_CONFIG_MAX_LISTENERS + 1];
  size_t n = 0;
  for (size_t i = 0; i < cfg->nlisten; i++) {
    const tg_config_listener_t *l = &cfg->listen[i];
    ls[n++] = (tg_listener_config_t){l->host, l->port, l->tls_cert, l->tls_key, 0, public_handler, g};
  }
  g->nlisten = n;
  if (cfg->admin.host)
    ls[n++] = (tg_listener_config_t){cfg->admin.host, cfg->admin.port, cfg->admin.tls_cert,
                                     cfg->admin.tls_key, 1, admin_handler, g};
  tg_server_config_t sc = {0};
  sc.listeners = ls;
  sc.nlisteners = n;
  sc.nworkers = cfg->workers;
  sc.on_worker_start = worker_start;
  sc.on_worker_stop = worker_stop;
  sc.ud = g;
  sc.limits.max_header_bytes = cfg->max_header_bytes;
  sc.limits.max_body_bytes = cfg->max_body_bytes;
  sc.limits.header_timeout_ms = cfg->header_timeout_ms;
  sc.limits.body_timeout_ms = cfg->body_timeout_ms;
  sc.limits.idle_timeout_ms = cfg->idle_timeout_ms;
  sc.limits.max_connections = cfg->max_connections;
  if ((rc = tg_server_start(&g->server, &sc, err, errlen)) != 0)
    goto fail;
  for (size_t i = 0; i < n; i++) {
    char addr[300];
    snprintf(addr, sizeof addr, "%s://%s:%d", ls[i].tls_cert_file ? "https" : "http", ls[i].host,
             tg_server_port(g->server, i));
    tg_log(TG_LOG_INFO, "listening", "addr", addr, "role", i < g->nlisten ? "public" : "admin", NULL);
  }
  g->ingest = tg_ingest_start(cfg, g->app.catalogs, err, errlen);
  if (g->ingest == NULL) {
    tg_server_stop(g->server, 0);
    rc = -ENOMEM;
    goto fail;
  }
  /* Serve with the catalogs that load quickly; /readyz names the others. */
  tg_ingest_wait_initial(g->ingest, 5000);
  atomic_store_explicit(&g->ready, 1, memory_order_release);
  *out = g;
  return 0;
fail:
  app_free(g);
  return rc;
}

int tg_gateway_port(const tg_gateway_t *g, int i) {
  if (i < 0)
    return g->cfg->admin.host ? tg_server_port(g->server, g->nlisten) : -1;
  return tg_server_port(g->server, (size_t)i);
}

void tg_gateway_stop(tg_gateway_t *g) {
  atomic_store_explicit(&g->ready, 0, memory_order_release);
  tg_server_stop(g->server, g->cfg->shutdown_grace_ms ? g->cfg->shutdown_grace_ms : 10000);
  if (g->ingest)
    tg_ingest_stop(g->ingest);
  app_free(g);
}

/* ---- watching policy files ---- */

static void on_debounced(uv_timer_t *t) {
  tg_gateway_t *g = t->data;
  tg_gateway_reload(g, NULL, NULL);
}

static void on_fs_event(uv_fs_event_t *ev, const char *filename, int events, int status) {
  watch_t *w = (watch_t *)ev;
  (void)filename;
  (void)events;
  if (status < 0)
    return;
  uv_timer_start(&w->g->debounce, on_debounced, 200, 0);
}

int tg_gateway_watch(tg_gateway_t *g, uv_loop_t *loop) {
  size_t n = tg_policy_count(g->app.policies);
  g->watches = calloc(n ? n : 1, sizeof *g->watches);
  if (g->watches == NULL)
    return -ENOMEM;
  uv_timer_init(loop, &g->debounce);
  g->debounce.data = g;
  g->watching = 1;
  for (size_t i = 0; i < n; i++) {
    tg_policy_info_t info;
    if (tg_policy_info(g->app.policies, i, &info) != 0 || info.path[0] == '\0')
      continue;
    /* Watch the folder: editors replace files by renaming over them, which
     * ends a watch on the file itself. */
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", info.path);
    char *slash = strrchr(dir, '/');
    if (slash)
      *slash = '\0';
    int dup = 0;
    for (size_t k = 0; k < g->nwatches; k++) {
      char have[1024];
      size_t len = sizeof have;
      if (uv_fs_event_getpath(&g->watches[k].ev, have, &len) == 0 && strcmp(have, dir) == 0)
        dup = 1;
    }
    if (dup)
      continue;
    watch_t *w = &g->watches[g->nwatches];
    w->g = g;
    uv_fs_event_init(loop, &w->ev);
    if (uv_fs_event_start(&w->ev, on_fs_event, dir, 0) != 0) {
      tg_log(TG_LOG_WARN, "cannot watch policy folder", "dir", dir, NULL);
      uv_close((uv_handle_t *)&w->ev, NULL);
      continue;
    }
    g->nwatches++;
  }
  return 0;
}

void tg_gateway_unwatch(tg_gateway_t *g) {
  if (!g->watching)
    return;
  for (size_t i = 0; i < g->nwatches; i++)
    uv_close((uv_handle_t *)&g->watches[i].ev, NULL);
  uv_close((uv_handle_t *)&g->debounce, NULL);
  g->watching = 0;
}
