#include "rpc/otlp.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "base/log.h"
#include "base/metrics.h"
#include "net/client.h"
#include "opentelemetry/proto/collector/trace/v1/trace_service.pb-c.h"

#define MAX_TRIES 3
#define STOP_DEADLINE_MS 2000

typedef Opentelemetry__Proto__Common__V1__KeyValue kv_t;
typedef Opentelemetry__Proto__Common__V1__AnyValue any_t;
typedef Opentelemetry__Proto__Trace__V1__Span pspan_t;

static tg_metric_t *m_exported;

struct tg_otlp {
  tg_tracer_t *tracer;
  char *endpoint, *service, *instance;
  uint32_t batch, flush_ms;
  uv_loop_t loop;
  uv_thread_t thread;
  uv_timer_t flush, retry;
  uv_async_t stop;
  tg_httpc_t *http;
  tg_span_t *spans;         /* the batch being exported (batch slots) */
  size_t nspans;
  uint8_t *body;            /* its encoding */
  size_t body_len;
  int tries;
  bool in_flight, stopping;
  uint64_t stop_deadline;
  uint64_t last_warn;
};

static void set_kv(kv_t *kv, any_t *v, const char *key, const char *s) {
  opentelemetry__proto__common__v1__key_value__init(kv);
  opentelemetry__proto__common__v1__any_value__init(v);
  kv->key = (char *)key;
  kv->value = v;
  v->value_case = OPENTELEMETRY__PROTO__COMMON__V1__ANY_VALUE__VALUE_STRING_VALUE;
  v->string_value = (char *)s;
}

uint8_t *tg_otlp_encode(const tg_span_t *spans, size_t n, const char *service_name, const char *instance,
                        size_t *len) {
  uint8_t *out = NULL;
  pspan_t *ps = calloc(n ? n : 1, sizeof *ps);
  pspan_t **pps = calloc(n ? n : 1, sizeof *pps);
  Opentelemetry__Proto__Trace__V1__Status *st = calloc(n ? n : 1, sizeof *st);
  size_t nattr = 0;
  for (size_t i = 0; i < n; i++)
    nattr += spans[i].nattrs;
  kv_t *kvs = calloc(nattr + 2, sizeof *kvs);
  kv_t **kvp = calloc(nattr + 2, sizeof *kvp);
  any_t *vals = calloc(nattr + 2, sizeof *vals);
  if (!ps || !pps || !st || !kvs || !kvp || !vals)
    goto done;
  size_t k = 0;
  for (size_t i = 0; i < n; i++) {
    const tg_span_t *s = &spans[i];
    pspan_t *p = &ps[i];
    opentelemetry__proto__trace__v1__span__init(p);
    p->trace_id = (ProtobufCBinaryData){16, (uint8_t *)s->trace_id};
    p->span_id = (ProtobufCBinaryData){8, (uint8_t *)s->span_id};
    if (s->has_parent)
      p->parent_span_id = (ProtobufCBinaryData){8, (uint8_t *)s->parent_id};
    p->flags = s->flags;
    p->name = (char *)s->name;
    p->kind = (Opentelemetry__Proto__Trace__V1__Span__SpanKind)s->kind;
    p->start_time_unix_nano = s->start_ns;
    p->end_time_unix_nano = s->end_ns;
    p->attributes = &kvp[k];
    p->n_attributes = s->nattrs;
    for (size_t a = 0; a < s->nattrs; a++, k++) {
      kvp[k] = &kvs[k];
      set_kv(&kvs[k], &vals[k], s->attrs[a].key, (char *)s->attrs[a].s);
      if (s->attrs[a].is_int) {
        vals[k].value_case = OPENTELEMETRY__PROTO__COMMON__V1__ANY_VALUE__VALUE_INT_VALUE;
        vals[k].int_value = s->attrs[a].i;
      }
    }
    if (s->status != TG_SPAN_UNSET) {
      opentelemetry__proto__trace__v1__status__init(&st[i]);
      st[i].code = (Opentelemetry__Proto__Trace__V1__Status__StatusCode)s->status;
      st[i].message = (char *)s->status_msg;
      p->status = &st[i];
    }
    pps[i] = p;
  }
  /* The resource's attributes take the last two slots. */
  kv_t *res_kv[2] = {&kvs[nattr], &kvs[nattr + 1]};
  set_kv(res_kv[0], &vals[nattr], "service.name", service_name ? service_name : "tollgate");
  set_kv(res_kv[1], &vals[nattr + 1], "service.instance.id", instance ? instance : "");
  Opentelemetry__Proto__Resource__V1__Resource res = OPENTELEMETRY__PROTO__RESOURCE__V1__RESOURCE__INIT;
  res.attributes = res_kv;
  res.n_attributes = instance ? 2 : 1;
  Opentelemetry__Proto__Common__V1__InstrumentationScope scope =
      OPENTELEMETRY__PROTO__COMMON__V1__INSTRUMENTATION_SCOPE__INIT;
  scope.name = "tollgate";
  Opentelemetry__Proto__Trace__V1__ScopeSpans ss = OPENTELEMETRY__PROTO__TRACE__V1__SCOPE_SPANS__INIT, *ssp = &ss;
  ss.scope = &scope;
  ss.spans = pps;
  ss.n_spans = n;
  Opentelemetry__Proto__Trace__V1__ResourceSpans rs = OPENTELEMETRY__PROTO__TRACE__V1__RESOURCE_SPANS__INIT,
                                                 *rsp = &rs;
  rs.resource = &res;
  rs.scope_spans = &ssp;
  rs.n_scope_spans = 1;
  Opentelemetry__Proto__Collector__Trace__V1__ExportTraceServiceRequest req =
      OPENTELEMETRY__PROTO__COLLECTOR__TRACE__V1__EXPORT_TRACE_SERVICE_REQUEST__INIT;
  req.resource_spans = &rsp;
  req.n_resource_spans = 1;
  size_t sz = opentelemetry__proto__collector__trace__v1__export_trace_service_request__get_packed_size(&req);
  if ((out = malloc(sz ? sz : 1)) == NULL)
    goto done;
  *len = opentelemetry__proto__collector__trace__v1__export_trace_service_request__pack(&req, out);
done:
  free(ps);
  free(pps);
  free(st);
  free(kvs);
  free(kvp);
  free(vals);
  return out;
}

static void batch_free(tg_otlp_t *x) {
  x->nspans = 0;
  free(x->body);
  x->body = NULL;
  x->in_flight = false;
}

static void pump(tg_otlp_t *x);

static void send_batch(tg_otlp_t *x);

static void on_retry(uv_timer_t *t) { send_batch(t->data); }

static void give_up(tg_otlp_t *x, const char *why) {
  uint64_t now = uv_now(&x->loop);
  tg_trace_count_dropped(x->tracer, "export_failed", x->nspans);
  if (x->last_warn == 0 || now - x->last_warn >= 60000) {
    char n[24];
    snprintf(n, sizeof n, "%zu", x->nspans);
    tg_log(TG_LOG_WARN, "tracing: spans not exported", "spans", n, "reason", why, NULL);
    x->last_warn = now;
  }
  batch_free(x);
}

static void on_sent(int err, const tg_httpc_response_t *resp, void *ud) {
  tg_otlp_t *x = ud;
  if (err == -ECANCELED) {
    give_up(x, "stopped");
    return;
  }
  if (err == 0 && resp->status >= 200 && resp->status < 300) {
    tg_counter_add(m_exported, NULL, x->nspans);
    batch_free(x);
    pump(x);
    return;
  }
  bool retry = err != 0 || resp->status == 429 || resp->status == 502 || resp->status == 503 || resp->status == 504;
  char why[64];
  if (err)
    snprintf(why, sizeof why, "%s", tg_httpc_strerror(err));
  else
    snprintf(why, sizeof why, "HTTP %d", resp->status);
  if (!retry || x->tries >= MAX_TRIES || x->stopping) {
    give_up(x, why);
    pump(x);
    return;
  }
  uv_timer_start(&x->retry, on_retry, 1000u << (x->tries - 1), 0);
}

static void send_batch(tg_otlp_t *x) {
  static const tg_http_header_t hdrs[] = {{"Content-Type", 12, "application/x-protobuf", 22}};
  tg_httpc_request_t req = {0};
  req.method = "POST";
  req.url = x->endpoint;
  req.headers = hdrs;
  req.nheaders = 1;
  req.body = x->body;
  req.body_len = x->body_len;
  req.timeout_ms = 5000;
  req.idempotent = 1; /* a collector takes a repeated batch as duplicates, not as harm */
  x->tries++;
  int rc = tg_httpc_send(x->http, &req, on_sent, x);
  if (rc != 0)
    give_up(x, tg_httpc_strerror(rc));
}

/* Starts the next export when none is in flight and spans wait. */
static void pump(tg_otlp_t *x) {
  if (x->in_flight)
    return;
  if (x->stopping && uv_now(&x->loop) >= x->stop_deadline)
    return;
  x->nspans = tg_trace_drain(x->tracer, x->spans, x->batch);
  if (x->nspans == 0)
    return;
  x->body = tg_otlp_encode(x->spans, x->nspans, x->service, x->instance, &x->body_len);
  if (x->body == NULL) {
    give_up(x, "out of memory");
    return;
  }
  x->in_flight = true;
  x->tries = 0;
  send_batch(x);
}

/* A batch that ends starts the next one (on_sent), so a backlog drains
 * without waiting for ticks. */
static void on_flush(uv_timer_t *t) { pump(t->data); }

static void close_all(tg_otlp_t *x) {
  uv_close((uv_handle_t *)&x->flush, NULL);
  uv_close((uv_handle_t *)&x->retry, NULL);
  uv_close((uv_handle_t *)&x->stop, NULL);
  tg_httpc_free(x->http);
  x->http = NULL;
  if (x->in_flight) /* waiting for a retry */
    give_up(x, "stopped");
}

static void on_stop_tick(uv_timer_t *t) {
  tg_otlp_t *x = t->data;
  pump(x);
  if ((!x->in_flight && tg_trace_pending(x->tracer) == 0) || uv_now(&x->loop) >= x->stop_deadline) {
    uv_timer_stop(&x->flush);
    uv_timer_stop(&x->retry);
    close_all(x);
  }
}

static void on_stop(uv_async_t *a) {
  tg_otlp_t *x = a->data;
  x->stopping = true;
  x->stop_deadline = uv_now(&x->loop) + STOP_DEADLINE_MS;
  uv_timer_start(&x->flush, on_stop_tick, 0, 20);
}

static void run_thread(void *arg) {
  tg_otlp_t *x = arg;
  uv_run(&x->loop, UV_RUN_DEFAULT);
}

static void otlp_free(tg_otlp_t *x) {
  free(x->endpoint);
  free(x->service);
  free(x->instance);
  free(x->spans);
  free(x);
}

tg_otlp_t *tg_otlp_start(tg_tracer_t *tracer, const tg_otlp_opts_t *opts, char *err, size_t errlen) {
  tg_otlp_t *x = calloc(1, sizeof *x);
  int rc;
  m_exported = tg_metric_new(TG_METRIC_COUNTER, "trace_spans_exported_total",
                             "Spans the tracing collector accepted (tracing.endpoint answered 2xx).", NULL, NULL, 0);
  if (x == NULL)
    goto oom;
  x->tracer = tracer;
  x->batch = opts->batch ? opts->batch : 512;
  x->flush_ms = opts->flush_ms ? opts->flush_ms : 1000;
  x->endpoint = strdup(opts->endpoint);
  x->service = strdup(opts->service_name ? opts->service_name : "tollgate");
  x->instance = opts->instance ? strdup(opts->instance) : NULL;
  x->spans = calloc(x->batch, sizeof *x->spans);
  if (!x->endpoint || !x->service || (opts->instance && !x->instance) || !x->spans)
    goto oom;
  if ((rc = uv_loop_init(&x->loop)) != 0) {
    snprintf(err, errlen, "tracing: %s", uv_strerror(rc));
    otlp_free(x);
    return NULL;
  }
  tg_httpc_opts_t ho = {.max_conns_per_origin = 2, .max_queue_per_origin = 4};
  if ((x->http = tg_httpc_new(&x->loop, &ho)) == NULL) {
    uv_loop_close(&x->loop);
    goto oom;
  }
  uv_timer_init(&x->loop, &x->flush);
  uv_timer_init(&x->loop, &x->retry);
  uv_async_init(&x->loop, &x->stop, on_stop);
  x->flush.data = x->retry.data = x->stop.data = x;
  uv_timer_start(&x->flush, on_flush, x->flush_ms, x->flush_ms);
  if ((rc = uv_thread_create(&x->thread, run_thread, x)) != 0) {
    snprintf(err, errlen, "tracing: cannot start the exporter thread: %s", uv_strerror(rc));
    close_all(x);
    uv_run(&x->loop, UV_RUN_DEFAULT);
    uv_loop_close(&x->loop);
    otlp_free(x);
    return NULL;
  }
  return x;
oom:
  snprintf(err, errlen, "tracing: out of memory");
  if (x)
    otlp_free(x);
  return NULL;
}

void tg_otlp_stop(tg_otlp_t *x) {
  if (x == NULL)
    return;
  uv_async_send(&x->stop);
  uv_thread_join(&x->thread);
  uv_loop_close(&x->loop);
  otlp_free(x);
}
