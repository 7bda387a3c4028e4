#ifndef TG_GATEWAY_H
#define TG_GATEWAY_H

#include <uv.h>

#include "config/config.h"

/* The assembled gateway: the pipeline's shared state, the listeners (public
 * and admin), catalog ingestion, readiness. Built from a loaded
 * configuration; owns nothing of it (the config must outlive it). Every call
 * here is for the main thread (the one that started it). */
typedef struct tg_gateway tg_gateway_t;

/* Starts serving. Returns 0, or negative with err set. */
int tg_gateway_start(tg_gateway_t **out, const tg_config_t *cfg, char *err, size_t errlen);

/* Port actually bound by public listener i (tests use port 0), or the admin
 * listener when i == -1. */
int tg_gateway_port(const tg_gateway_t *g, int i);

/* Reloads every tenant's policy now (SIGHUP); logged, 0 when nothing failed. */
int tg_gateway_reload(tg_gateway_t *g);

/* Reloads when a policy file changes (gateway/watch.h) on loop.
 * tg_gateway_unwatch closes the handles; run the loop once more after it. */
int tg_gateway_watch(tg_gateway_t *g, uv_loop_t *loop);
void tg_gateway_unwatch(tg_gateway_t *g);

/* Graceful stop: /readyz turns 503, listeners close, in-flight requests get
 * up to the configured grace, then everything is freed. */
void tg_gateway_stop(tg_gateway_t *g);

#endif
