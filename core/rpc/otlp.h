#ifndef TG_OTLP_H
#define TG_OTLP_H

#include <stddef.h>
#include <stdint.h>

#include "base/trace.h"

/* The OTLP/HTTP span exporter: POSTs ExportTraceServiceRequest (protobuf,
 * Content-Type application/x-protobuf; proto/opentelemetry/) to a
 * collector's /v1/traces URL.
 *
 * Threads: it runs on its own thread with its own loop and HTTP client
 * (net/client.h); it only reads the tracer's rings (base/trace.h), so the
 * request path never waits for it. Every flush_ms, or as soon as a batch is
 * full, it sends up to `batch` spans; one export is in flight at a time.
 * Failure: a 429, 502, 503, 504 or a transport error is retried twice
 * (after 1 s, then 2 s); then, or on any other non-2xx answer, the batch is
 * dropped and counted in trace_spans_dropped_total{reason="export_failed"}
 * with a warning at most once a minute. Spans that pile up meanwhile fill
 * the rings and are dropped there (queue_full): tracing never blocks or
 * slows a request.
 * Ownership: the exporter borrows the tracer (freed by the caller after
 * tg_otlp_stop); what it drains is copied into its own batch buffer. */

typedef struct tg_otlp tg_otlp_t;

typedef struct tg_otlp_opts {
  const char *endpoint;      /* http(s) URL; copied */
  const char *service_name;  /* resource service.name; copied */
  const char *instance;      /* resource service.instance.id; copied; may be NULL */
  uint32_t batch;            /* spans per export; 0: 512 */
  uint32_t flush_ms;         /* 0: 1000 */
} tg_otlp_opts_t;

/* Starts the exporter thread. NULL with err on failure (out of memory, a
 * thread that did not start). */
tg_otlp_t *tg_otlp_start(tg_tracer_t *tracer, const tg_otlp_opts_t *opts, char *err, size_t errlen);

/* Exports what is queued (for at most about 2 s), stops the thread and
 * frees the exporter. Call after the recording threads stopped. NULL: no-op. */
void tg_otlp_stop(tg_otlp_t *x);

/* Encodes spans as one ExportTraceServiceRequest; a malloc'd buffer the
 * caller frees, its length in *len; NULL when out of memory. Any thread. */
uint8_t *tg_otlp_encode(const tg_span_t *spans, size_t n, const char *service_name, const char *instance,
                        size_t *len);

#endif
