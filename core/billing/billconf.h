#ifndef TG_BILLCONF_H
#define TG_BILLCONF_H

#include <stdbool.h>
#include <stdint.h>

#include "config/config.h"

/* A tenant's billing settings: the `billing` section of the configuration
 * (config.c checks the kind and its key names; this reads the values), at
 * start and by `tollgate check`.
 *
 *   billing = { type = "builtin" }          -- the built-in prepaid ledger (default)
 *   billing = { type = "connect",           -- the publisher's BillingService (proto/billing/v1)
 *               url = "https://billing.example:8443",  -- http(s) base URL; a path prefix is kept
 *               token_file = "billing.token",           -- bearer token (a secret file)
 *               deadline_ms = 30,            -- Authorize deadline, 1..60000
 *               call_timeout_ms = 5000,      -- Capture, Release, Health and reconciliation, 100..300000
 *               breaker_failures = 5,        -- consecutive failures that open the circuit, 1..1000
 *               breaker_cooldown_ms = 5000,  -- open for this long, then one probe, 100..3600000
 *               health_interval_ms = 1000,   -- Health probe period (readiness), 100..600000
 *               deferred_cap = 100000000,    -- atomic units per currency served unbilled at most
 *                                            -- (DEFERRED, not yet captured); 0..2^53, 0: never defer
 *               reconcile_backoff_ms = 200,  -- first retry of a deferred charge, 10..600000,
 *               reconcile_max_backoff_ms = 60000 } -- doubling up to this, 100..86400000
 *
 * Integers may be written as decimal strings. The token is read here
 * (base/secret.h): a missing, empty or group-readable file is reported as
 * the secret reader does. Pure functions on caller memory, any thread
 * (blocking file I/O for the token: start-up or `tollgate check`). */

typedef struct tg_billconf {
  bool remote;                  /* type "connect" */
  char *url;                    /* remote: the base URL without trailing '/' */
  char *token;                  /* remote: the bearer token (tg_secret_free wipes it) */
  uint32_t deadline_ms, call_timeout_ms, breaker_failures, breaker_cooldown_ms, health_interval_ms;
  int64_t deferred_cap;
  uint32_t reconcile_backoff_ms, reconcile_max_backoff_ms;
} tg_billconf_t;

/* Reads s into out (zeroed first; strings owned by out). An empty section
 * or type "builtin" is remote false. Returns 0, -EINVAL with err naming the
 * key ("billing.url: ..."), or -ENOMEM; on failure out holds nothing. */
int tg_billconf_parse(const tg_config_section_t *s, tg_billconf_t *out, char *err, size_t errlen);

/* Frees what c owns (the token wiped) and zeroes it; safe on a zeroed struct. */
void tg_billconf_free(tg_billconf_t *c);

#endif
