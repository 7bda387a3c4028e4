#include "gateway.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "buf.h"
#include "connect/connect.h"
#include "exchange.h"
#include "http/client.h"
#include "http/server.h"
#include "log.h"
#include "metrics.h"
#include "tenants.h"

#ifndef TG_VERSION
#define TG_VERSION "0.1.0"
#endif

struct tg_gateway {
  const tg_config_t *cfg;
  tg_server_t *server;
  tg_connect_router_t *router;
  tg_tenants_t *tenants;
  tg_exchange_t exchange;
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
  tg_buf_t b = {0};
  int ready = atomic_load_explicit(&g->ready, memory_order_acquire);
  tg_buf_printf(&b, "{\"ready\":%s,\"tenants\":%zu,\"connections\":%llu,\"reasons\":[%s]}",
                ready ? "true" : "false", g->cfg->ntenants,
                (unsigned long long)(g->server ? tg_server_connections(g->server) : 0),
                ready ? "" : "\"not serving: starting or draining\"");
  respond_json(req, ready ? 200 : 503, b.data);
  tg_buf_free(&b);
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
  respond_json(req, 404, "{\"error\":\"not found\"}");
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
    tg_http_respond(req, 401, h, 2, body, sizeof body - 1);
    tg_log_req(TG_LOG_WARN, req->request_id, "admin request refused", "peer", req->peer, "path",
               req->path, NULL);
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
  if (strcmp(req->path, "/status") == 0) {
    tg_buf_t b = {0};
    tg_buf_printf(&b, "{\"version\":\"%s\",\"uptime_s\":%lld,\"ready\":%s,\"tenants\":[", TG_VERSION,
                  (long long)(time(NULL) - g->started_at),
                  atomic_load(&g->ready) ? "true" : "false");
    for (size_t i = 0; i < g->cfg->ntenants; i++)
      tg_buf_printf(&b, "%s{\"name\":\"%s\"}", i ? "," : "", g->cfg->tenants[i].name);
    tg_buf_puts(&b, "]}");
    respond_json(req, 200, b.data);
    tg_buf_free(&b);
    return;
  }
  respond_json(req, 404, "{\"error\":\"not found\"}");
}

/* Each worker gets its own outbound client (billing, facilitator, RSL). */
static int worker_start(tg_worker_t *w, void *ud) {
  (void)ud;
  w->httpc = tg_httpc_new(w->loop, NULL);
  return w->httpc ? 0 : -ENOMEM;
}

static void worker_stop(tg_worker_t *w, void *ud) {
  (void)ud;
  if (w->httpc)
    tg_httpc_free(w->httpc);
  w->httpc = NULL;
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
  g->tenants = tg_tenants_new(cfg);
  g->router = tg_connect_router_new();
  if (g->tenants == NULL || g->router == NULL) {
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
  atomic_store_explicit(&g->ready, 1, memory_order_release);
  *out = g;
  return 0;
fail:
  tg_connect_router_free(g->router);
  tg_tenants_free(g->tenants);
  free(g->admin_token);
  free(g);
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
  tg_connect_router_free(g->router);
  tg_tenants_free(g->tenants);
  free(g->admin_token);
  free(g);
}
