#ifndef TG_TRACE_H
#define TG_TRACE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Spans in the W3C Trace Context model (https://www.w3.org/TR/trace-context/),
 * recorded by the request path and handed to an exporter (rpc/otlp.h) that
 * runs on its own thread.
 *
 * Off is a NULL tracer: with no process tracer set, tg_span_start_server
 * returns NULL and every other call on a NULL span returns at once, without
 * allocating or touching shared memory. On, a span is one malloc at start;
 * tg_span_end copies it into the ending thread's own ring (single producer,
 * single consumer: the exporter), no lock, and frees it on that thread. A
 * ring holds at most `queue` spans; a span ended into a full ring is counted in
 * trace_spans_dropped_total{reason="queue_full"}. A thread's first span
 * registers its ring under a mutex, once.
 *
 * Sampling is parent-based: an incoming traceparent's sampled flag decides;
 * without one (or with an invalid one: a new trace starts), a trace is kept
 * with probability `sample`, decided on its trace id. An unsampled request
 * records nothing (its spans are NULL). */

#define TG_TRACEPARENT_LEN 55 /* "00-" 32 hex "-" 16 hex "-" 2 hex */
#define TG_SPAN_MAX_ATTRS 6
#define TG_SPAN_STR_MAX 64    /* string attribute values and the status message are cut to this (incl. NUL) */

typedef struct tg_tracer tg_tracer_t;

typedef struct tg_trace_ctx {
  uint8_t trace_id[16];
  uint8_t span_id[8];   /* the parent's span id */
  uint8_t flags;        /* bit 0: sampled */
} tg_trace_ctx_t;

typedef enum { TG_SPAN_INTERNAL = 1, TG_SPAN_SERVER = 2, TG_SPAN_CLIENT = 3 } tg_span_kind_t;
typedef enum { TG_SPAN_UNSET = 0, TG_SPAN_OK = 1, TG_SPAN_ERROR = 2 } tg_span_status_t;

typedef struct tg_span_attr {
  const char *key;      /* a string literal (not copied) */
  bool is_int;
  int64_t i;
  char s[TG_SPAN_STR_MAX];
} tg_span_attr_t;

/* A span. Fields are read by the exporter once the span has ended; the
 * recording thread writes them only through the functions below. */
typedef struct tg_span {
  tg_tracer_t *tracer;
  const char *name;     /* a string literal (not copied) */
  uint8_t trace_id[16], span_id[8], parent_id[8];
  bool has_parent;
  uint8_t flags;
  tg_span_kind_t kind;
  uint64_t start_ns, end_ns; /* unix time, ns */
  tg_span_status_t status;
  char status_msg[TG_SPAN_STR_MAX];
  size_t nattrs;
  tg_span_attr_t attrs[TG_SPAN_MAX_ATTRS];
} tg_span_t;

/* Parses a traceparent header value (surrounding spaces and tabs allowed):
 * version 00 is exactly 55 characters; a higher version (not ff) may be
 * longer if character 55 is '-', and is read as 00. Lower-case hex only;
 * all-zero trace or parent ids are invalid. Returns 0 or -EINVAL. */
int tg_traceparent_parse(const char *s, size_t len, tg_trace_ctx_t *out);
/* "00-<trace>-<span>-<flags>" into out (TG_TRACEPARENT_LEN + 1 bytes, NUL-terminated). */
void tg_traceparent_format(const uint8_t trace_id[16], const uint8_t span_id[8], uint8_t flags, char *out);

typedef struct tg_tracer_opts {
  double sample;        /* 0..1; default (0 given with sample_set false) 1.0 */
  bool sample_set;
  uint32_t queue;       /* spans per recording thread's ring, rounded up to a power of two; default 8192 */
} tg_tracer_opts_t;

/* A tracer; NULL on out of memory. Also declares trace_spans_dropped_total.
 * Free it only once no thread records and the exporter has stopped. */
tg_tracer_t *tg_tracer_new(const tg_tracer_opts_t *opts);
/* Frees the tracer, the spans still queued and the rings. NULL is a no-op. */
void tg_tracer_free(tg_tracer_t *t);

/* The process tracer that tg_span_start_server uses: set before workers
 * start, cleared (NULL) after they stopped. NULL (the default): tracing off. */
void tg_trace_set_global(tg_tracer_t *t);
tg_tracer_t *tg_trace_global(void);

/* A server span for a request that arrived with traceparent (NULL or any
 * bytes: invalid starts a new trace) on the process tracer; NULL when
 * tracing is off or the trace is not sampled. Any thread. */
tg_span_t *tg_span_start_server(const char *name, const char *traceparent, size_t len);
/* A root span (a new trace, no parent) on the process tracer, for work no
 * request asked for (a catalog fetch); NULL when tracing is off or the trace
 * is not sampled. Any thread. */
tg_span_t *tg_span_start_root(const char *name, tg_span_kind_t kind);
/* The same on a given tracer (tests). */
tg_span_t *tg_tracer_start_server(tg_tracer_t *t, const char *name, const char *traceparent, size_t len);
/* A child of parent (same trace, parent's span id); NULL when parent is NULL
 * or out of memory. The parent may end before its child. */
tg_span_t *tg_span_start(const char *name, const tg_span_t *parent, tg_span_kind_t kind);

/* A span's identity, kept by value to parent spans started after the span
 * itself ended (a capture after the answer). ref->tracer NULL: none. */
typedef struct tg_span_ref {
  tg_tracer_t *tracer;
  uint8_t trace_id[16], span_id[8];
  uint8_t flags;
} tg_span_ref_t;
/* Copies s's identity into ref (ref->tracer NULL when s is NULL). */
void tg_span_ref(const tg_span_t *s, tg_span_ref_t *ref);
/* tg_span_start under a ref; NULL when ref->tracer is NULL. */
tg_span_t *tg_span_start_ref(const char *name, const tg_span_ref_t *ref, tg_span_kind_t kind);

/* Attributes: at most TG_SPAN_MAX_ATTRS (more are ignored); key a literal,
 * a string value is copied (cut to TG_SPAN_STR_MAX - 1 bytes). */
void tg_span_set_str(tg_span_t *s, const char *key, const char *value);
void tg_span_set_int(tg_span_t *s, const char *key, int64_t value);
/* Status error with a message (copied; may be NULL), or ok. */
void tg_span_set_error(tg_span_t *s, const char *msg);
void tg_span_set_ok(tg_span_t *s);
/* Ends the span: it belongs to the tracer from then on (the pointer must not
 * be used again). NULL is a no-op. */
void tg_span_end(tg_span_t *s);
/* Ends *sp with an error status when msg is not NULL, and sets *sp to NULL. */
void tg_span_finish(tg_span_t **sp, const char *error);
/* The traceparent naming s as the parent, for an outgoing call: 0, or -1
 * when s is NULL (out untouched). out: TG_TRACEPARENT_LEN + 1 bytes. */
int tg_span_traceparent(const tg_span_t *s, char *out);

/* The exporter's side (one consumer thread): copies up to max ended spans
 * out of the rings into out (the caller's array) and frees their slots.
 * Attributes past each span's nattrs are left unset. */
size_t tg_trace_drain(tg_tracer_t *t, tg_span_t *out, size_t max);
/* Spans waiting in the rings (approximate while threads record). */
size_t tg_trace_pending(tg_tracer_t *t);
/* Discards a span that was not ended (nothing is recorded). NULL: no-op. */
void tg_span_free(tg_span_t *s);
/* Counts n spans dropped for reason ("queue_full", "export_failed") in
 * trace_spans_dropped_total; any thread. */
void tg_trace_count_dropped(tg_tracer_t *t, const char *reason, uint64_t n);
/* Total dropped so far (tests). */
uint64_t tg_trace_dropped(const tg_tracer_t *t);

#endif
