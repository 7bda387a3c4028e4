#ifndef TG_METRICS_H
#define TG_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "base/buf.h"

/* A Prometheus metrics registry. Metrics (families) are declared at start-up,
 * before worker threads run; series (label value combinations) appear on first
 * use. Each thread updates its own shard with no lock; a scrape merges the
 * shards. Label values are copied on first use of a series.
 *
 * Threads: every function except tg_metrics_reset may be called from any
 * thread at any time. Counters and histograms are kept per thread (a thread's
 * first update takes a mutex once to get its shard; a shard outlives its
 * thread and is adopted by a later thread). Gauges are kept once per family,
 * so tg_gauge_set from several threads yields one coherent value (last write
 * wins); their updates are lock-free atomics. After the first use of a series,
 * updates neither allocate nor lock. When memory runs out an update is dropped. */

typedef enum { TG_METRIC_COUNTER, TG_METRIC_GAUGE, TG_METRIC_HISTOGRAM } tg_metric_type_t;

typedef struct tg_metric tg_metric_t;

#define TG_METRIC_MAX_LABELS 4

/* Declares a family. label_names is NULL-terminated (or NULL for none).
 * buckets (histograms only) is an ascending array of upper bounds, nbuckets
 * long; NULL takes latency defaults 0.0005 .. 10 s; a last bound of +Inf is
 * dropped (+Inf is always rendered). Declaring a name again with the same
 * type, labels and buckets returns the existing family. Returns NULL when the
 * name is taken by a different declaration, a name or label name is not valid
 * Prometheus syntax (label names starting "__", and "le" on histograms, are
 * reserved), there are more than TG_METRIC_MAX_LABELS labels, buckets are not
 * strictly ascending and finite, or out of memory. Families stay valid until
 * tg_metrics_reset. Meant for start-up; thread-safe anyway. */
tg_metric_t *tg_metric_new(tg_metric_type_t type, const char *name, const char *help,
                           const char *const *label_names, const double *buckets,
                           size_t nbuckets);

/* Updates. labels has one value per declared label name, in order (NULL when
 * the family has none; a NULL value counts as ""). Lock-free for the calling
 * thread's shard. A call on a family of another type is ignored. */
void tg_counter_add(tg_metric_t *m, const char *const *labels, uint64_t n);
void tg_gauge_set(tg_metric_t *m, const char *const *labels, double v);
void tg_gauge_add(tg_metric_t *m, const char *const *labels, double delta);
void tg_histogram_observe(tg_metric_t *m, const char *const *labels, double v);

/* Removes a gauge series from the exposition (a label set that stopped being
 * true, such as a replaced version in an *_info gauge): 1 when it was shown,
 * 0 when there was no such series or it was removed already. A later
 * tg_gauge_set or tg_gauge_add of the same labels brings it back, starting
 * from its new value. The series' memory is kept (readers walk the series
 * without locks) until tg_metrics_reset; removing and setting the same labels
 * from two threads at once is a race the last call wins. Counters and
 * histograms only ever grow and cannot be removed. */
int tg_gauge_remove(tg_metric_t *m, const char *const *labels);

/* Appends the Prometheus text exposition (version 0.0.4) of every family,
 * shards merged, to out: families in declaration order, series sorted by label
 * values, a zero sample for a family without labels that has no series yet.
 * Label values that are not valid UTF-8 are rendered with U+FFFD. Safe from
 * any thread at any time, concurrently with updates. Returns 0 or -ENOMEM (out
 * then unchanged). */
int tg_metrics_render(tg_buf_t *out);

/* Frees the registry: every family pointer becomes invalid. Tests and
 * shutdown only, with no other thread using the registry. Families may be
 * declared again afterwards. */
void tg_metrics_reset(void);

#endif
