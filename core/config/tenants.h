#ifndef TG_TENANTS_H
#define TG_TENANTS_H

#include <stddef.h>

#include "config/config.h"

/* The immutable host -> tenant index built from the configuration. Shared
 * read-only by every worker; replaced whole on reload. */
typedef struct tg_tenants tg_tenants_t;

/* Builds the index; the config must outlive it. NULL on allocation failure. */
tg_tenants_t *tg_tenants_new(const tg_config_t *cfg);
void tg_tenants_free(tg_tenants_t *t);

/* The tenant claiming host (case-insensitive, len bytes, with or without a
 * ":port"; an exact "host:port" entry wins over a bare host), or NULL. */
const tg_config_tenant_t *tg_tenants_by_host(const tg_tenants_t *t, const char *host, size_t len);

/* Splits an absolute http(s) URI: sets *host and *host_len to the authority's
 * host[:port] part (no userinfo). Returns 0, or -EINVAL when uri is not an
 * absolute http or https URL with a host. */
int tg_uri_host(const char *uri, const char **host, size_t *host_len);

#endif
