#ifndef TG_GATEWAY_H
#define TG_GATEWAY_H

#include <stdint.h>

#include <uv.h>

#include "config.h"

/* The assembled gateway: listeners, routes, admin, readiness. Built from a
 * loaded configuration; owns nothing of it (the config must outlive it). */
typedef struct tg_gateway tg_gateway_t;

/* Starts serving. Returns 0, or negative with err set. */
int tg_gateway_start(tg_gateway_t **out, const tg_config_t *cfg, char *err, size_t errlen);

/* Port actually bound by public listener i (tests use port 0), or the admin
 * listener when i == -1. */
int tg_gateway_port(const tg_gateway_t *g, int i);

/* Reloads the policies of tenant (NULL: all) now; summary (may be NULL)
 * gets a JSON report. 0 when nothing failed. Not on a worker's loop. */
struct tg_buf;
int tg_gateway_reload(tg_gateway_t *g, const char *tenant, struct tg_buf *summary);

/* Reloads when a policy file changes (uv fs events on the main loop).
 * tg_gateway_unwatch closes the handles; run the loop once more after it. */
int tg_gateway_watch(tg_gateway_t *g, uv_loop_t *loop);
void tg_gateway_unwatch(tg_gateway_t *g);

/* Graceful stop: /readyz turns 503, listeners close, in-flight requests get
 * up to the configured grace, then everything is freed. */
void tg_gateway_stop(tg_gateway_t *g);

#endif
