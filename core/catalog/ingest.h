#ifndef TG_INGEST_H
#define TG_INGEST_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"
#include "base/snapshot.h"

/* Catalog ingestion: one dedicated thread with its own uv loop and HTTP client
 * loads every tenant's RSL document (file or http(s) URL), builds its catalog
 * there, off the request path, and publishes it to the tenant's snapshot.
 *
 * Each tenant with a catalog_source is loaded once at start, then every
 * catalog_refresh_s seconds (plus up to 5 % jitter, at most 30 s, so tenants
 * do not refresh in lockstep), and on demand (tg_ingest_refresh). A file is
 * rebuilt only when its mtime or size changed; a URL is fetched with
 * If-None-Match / If-Modified-Since, and a 304 keeps the current catalog.
 * Either "unchanged" counts as a successful refresh.
 *
 * Retired catalogs are freed on the ingestion thread (tg_snapshot_collect after
 * each publish and once a second), never on a worker.
 *
 * A tenant's document is parsed in lenient mode, or strict mode when its
 * catalog_strict is set: then any non-conformance fails the refresh ("parse").
 *
 * On any failure nothing is published: the previous catalog keeps serving.
 * Failure reasons (metric label and status): "fetch" (connection, file read),
 * "timeout", "http_status" (non-2xx/304), "content_type" (not
 * application/rsl+xml, application/xml or text/xml), "too_large", "parse",
 * "build".
 *
 * Metrics: catalog_entries{tenant_id} (gauge, entries),
 * catalog_last_refresh_timestamp{tenant_id} (gauge, unix seconds of the last
 * success), catalog_refresh_duration_seconds{tenant_id} (histogram, every
 * attempt), catalog_refresh_errors_total{tenant_id,reason} (counter). */

#define TG_INGEST_MAX_BYTES TG_CONFIG_DEFAULT_INGEST_MAX_BYTES
#define TG_INGEST_MAX_ELEMENTS 32000000u
#define TG_INGEST_TIMEOUT_MS TG_CONFIG_DEFAULT_INGEST_TIMEOUT_MS

typedef struct tg_ingest tg_ingest_t;

typedef struct tg_ingest_opts {
  size_t max_bytes;    /* document size cap, file or HTTP response; 0:
                          cfg->ingest_max_bytes, or TG_INGEST_MAX_BYTES when that is 0 */
  uint32_t timeout_ms; /* whole HTTP request; 0: cfg->ingest_timeout_ms, or
                          TG_INGEST_TIMEOUT_MS */
  const char *ca_file; /* for https sources; NULL: system bundle. Copied. */
} tg_ingest_opts_t;

typedef struct tg_ingest_status {
  bool has_source;      /* the tenant has a catalog_source (else all else is zero) */
  bool loaded;          /* a catalog was published at least once */
  bool attempted;       /* the first attempt finished */
  bool failing;         /* the most recent attempt failed */
  int64_t last_success; /* unix seconds of the last successful refresh, 0 never */
  uint64_t attempts;    /* attempts finished */
  uint64_t loads;       /* catalogs built and published */
  size_t entries;       /* entries of the current catalog */
  size_t warnings;      /* RSL warnings of the current catalog */
  char last_reason[16]; /* reason of the most recent failure, "" none ever */
  char last_error[192]; /* "reason: detail" of the most recent failure, "" none
                           ever */
} tg_ingest_status_t;

/* Starts the ingestion thread. cfg and tenant_snaps[0..cfg->ntenants) must
 * outlive the ingester; tenant_snaps[i] may be NULL only for a tenant without
 * catalog_source. Each snapshot receives tg_catalog_t pointers: create it with
 * tg_snapshot_new(tg_catalog_free-compatible destroy). Returns NULL with err
 * set on failure. opts may be NULL (defaults). Call from one owner thread. */
tg_ingest_t *tg_ingest_start(const tg_config_t *cfg, tg_snapshot_t *const *tenant_snaps, char *err,
                             size_t errlen);
tg_ingest_t *tg_ingest_start_opts(const tg_config_t *cfg, tg_snapshot_t *const *tenant_snaps,
                                  const tg_ingest_opts_t *opts, char *err, size_t errlen);

/* Asks for a refresh of tenant (by name; NULL: every tenant with a source),
 * done soon on the ingestion thread; a refresh already running is followed by
 * another one. Any thread. Returns 0, -ENOENT (no such tenant, or it has no
 * source), -EINVAL (NULL ing). */
int tg_ingest_refresh(tg_ingest_t *ing, const char *tenant);

/* Blocks until every tenant's first attempt finished (success or failure).
 * Returns 0, or -ETIMEDOUT. Any thread. */
int tg_ingest_wait_initial(tg_ingest_t *ing, uint32_t timeout_ms);

/* Copies the status of cfg->tenants[tenant_index]. Returns 0 or -EINVAL
 * (index out of range). Any thread. */
int tg_ingest_status(tg_ingest_t *ing, size_t tenant_index, tg_ingest_status_t *out);

/* Stops the loop (an in-flight fetch is cancelled, nothing more published),
 * joins the thread and frees. The snapshots stay with their owner. NULL is a
 * no-op. Call from the thread that started it. */
void tg_ingest_stop(tg_ingest_t *ing);

#endif
