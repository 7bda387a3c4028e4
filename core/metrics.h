#ifndef TG_METRICS_H
#define TG_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "buf.h"

/* A Prometheus metrics registry. Metrics (families) are declared at start-up,
 * before worker threads run; series (label value combinations) appear on first
 * use. Each thread updates its own shard with no lock; a scrape merges the
 * shards. Label values are copied on first use of a series. */

typedef enum { TG_METRIC_COUNTER, TG_METRIC_GAUGE, TG_METRIC_HISTOGRAM } tg_metric_type_t;

typedef struct tg_metric tg_metric_t;

#define TG_METRIC_MAX_LABELS 4

/* Declares a family. label_names is NULL-terminated (or NULL for none).
 * buckets (histograms only) is an ascending array of upper bounds, nbuckets
 * long; NULL takes latency defaults 0.0005 .. 10 s. Returns NULL when the name
 * is taken with another type or out of memory. Not thread-safe: call at start-up. */
tg_metric_t *tg_metric_new(tg_metric_type_t type, const char *name, const char *help,
                           const char *const *label_names, const double *buckets,
                           size_t nbuckets);

/* Updates. labels has one value per declared label name, in order (NULL when
 * the family has none). Lock-free for the calling thread's shard. */
void tg_counter_add(tg_metric_t *m, const char *const *labels, uint64_t n);
void tg_gauge_set(tg_metric_t *m, const char *const *labels, double v);
void tg_gauge_add(tg_metric_t *m, const char *const *labels, double delta);
void tg_histogram_observe(tg_metric_t *m, const char *const *labels, double v);

/* Appends the Prometheus text exposition (version 0.0.4) of every family,
 * shards merged, to out. Safe from any thread at any time. */
int tg_metrics_render(tg_buf_t *out);

/* Frees the registry (tests and shutdown, with no other thread using it). */
void tg_metrics_reset(void);

#endif
