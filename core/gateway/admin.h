#ifndef TG_ADMIN_H
#define TG_ADMIN_H

#include <stddef.h>
#include <time.h>

#include "catalog/ingest.h"
#include "gateway/readiness.h"
#include "net/server.h"
#include "pipeline/app.h"

/* The admin listener's routes, behind a bearer token compared in constant
 * time (401 with WWW-Authenticate otherwise, logged without the token):
 *   GET  /metrics                     Prometheus text
 *   GET  /status                      version, uptime, readiness, and per tenant its
 *                                     policy (live version, last reload attempt, whether
 *                                     the file on disk differs) and catalog
 *   POST /reload[?tenant=NAME]        policy reload (gateway/reload.h)
 *   POST /reload?dry_run=1[&tenant=N] validate and compare the files, publish nothing
 *   POST /catalog/refresh[?tenant=N]  catalog ingestion now (202)
 *   GET  /ledger/balance[?account=R]  prepaid balances (balance, held, available per
 *                                     currency) of one account, or of the first 1000
 *   POST /ledger/topup                {"account","amount","currency","reference"}: a credit,
 *                                     logged durably before the answer; once per reference
 *   GET  /admin/tenants               per tenant: name, hosts, policy version, catalog age
 *                                     and last error, billing state, payments enabled
 *   POST /admin/tenants/N/reload-policy   /reload?tenant=N
 *   POST /admin/tenants/N/reload-catalog  /catalog/refresh?tenant=N (202; 409 no source)
 *   POST /admin/drain[?delay_ms=D]    readiness 503 now, public listeners closed after D ms,
 *                                     in-flight requests answered; admin serves on; idempotent
 *   GET  /admin/drain                 {draining, connections}
 * Everything the struct points to is borrowed and outlives the listener;
 * token is a secret: it never reaches a log or an answer. Handlers run on
 * worker 0 (the admin listener is single-worker). server and npublic are
 * set once the listeners are up (the drain closes listeners [0, npublic)). */
typedef struct tg_admin {
  const char *token;
  size_t token_len;
  const char *version;
  time_t started_at;
  tg_app_t *app;
  tg_ingest_t *ingest;          /* may be NULL */
  tg_readiness_t *readiness;
  tg_server_t *server;          /* NULL until the listeners are up */
  size_t npublic;
  uv_timer_t drain_timer;       /* the drain's delay (worker 0's loop) */
  uv_loop_t *drain_loop;        /* the loop drain_timer is open on; NULL: closed or never opened */
} tg_admin_t;

/* tg_http_handler_fn with ud a tg_admin_t. */
void tg_admin_handle(tg_http_req_t *req, void *ud);

/* Worker w stops: the drain's delay timer, when it is open on w's loop, is
 * closed (its loop could not be closed otherwise). On w's thread. */
void tg_admin_worker_stop(tg_admin_t *a, tg_worker_t *w);

#endif
