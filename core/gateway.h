#ifndef TG_GATEWAY_H
#define TG_GATEWAY_H

#include <stdint.h>

#include "config.h"

/* The assembled gateway: listeners, routes, admin, readiness. Built from a
 * loaded configuration; owns nothing of it (the config must outlive it). */
typedef struct tg_gateway tg_gateway_t;

/* Starts serving. Returns 0, or negative with err set. */
int tg_gateway_start(tg_gateway_t **out, const tg_config_t *cfg, char *err, size_t errlen);

/* Port actually bound by public listener i (tests use port 0), or the admin
 * listener when i == -1. */
int tg_gateway_port(const tg_gateway_t *g, int i);

/* Graceful stop: /readyz turns 503, listeners close, in-flight requests get
 * up to the configured grace, then everything is freed. */
void tg_gateway_stop(tg_gateway_t *g);

#endif
