#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/metrics.h"
#include "base/trace.h"
#include "config/config.h"
#include "opentelemetry/proto/collector/trace/v1/trace_service.pb-c.h"
#include "rpc/otlp.h"
#include "http_stub.h"
#include "test.h"

typedef Opentelemetry__Proto__Collector__Trace__V1__ExportTraceServiceRequest export_req_t;

static const char TP[] = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

TEST(traceparent_parse_valid) {
  tg_trace_ctx_t c;
  CHECK_INT(tg_traceparent_parse(TP, strlen(TP), &c), 0);
  CHECK_INT(c.trace_id[0], 0x4b);
  CHECK_INT(c.trace_id[15], 0x36);
  CHECK_INT(c.span_id[0], 0x00);
  CHECK_INT(c.span_id[7], 0xb7);
  CHECK_INT(c.flags, 1);
  char out[TG_TRACEPARENT_LEN + 1];
  tg_traceparent_format(c.trace_id, c.span_id, c.flags, out);
  CHECK_STR(out, TP);
  /* Surrounding blanks are allowed (OWS of the header field). */
  CHECK_INT(tg_traceparent_parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\t", 57, &c), 0);
  CHECK_INT(c.flags, 0);
  /* A future version: longer, with a '-' after the flags, read as 00. */
  const char *v1 = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
  CHECK_INT(tg_traceparent_parse(v1, strlen(v1), &c), 0);
}

TEST(traceparent_parse_invalid) {
  static const char *bad[] = {
      "",
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",      /* short */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",   /* 00 with more */
      "00-00000000000000000000000000000000-00f067aa0ba902b7-01",     /* zero trace id */
      "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",     /* zero parent id */
      "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",     /* upper case */
      "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     /* version ff */
      "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",     /* separator */
      "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",     /* not hex */
      "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",    /* future version, no '-' */
  };
  tg_trace_ctx_t c;
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    if (tg_traceparent_parse(bad[i], strlen(bad[i]), &c) != -EINVAL)
      fprintf(stderr, "  accepted: %s\n", bad[i]);
    CHECK_INT(tg_traceparent_parse(bad[i], strlen(bad[i]), &c), -EINVAL);
  }
  CHECK_INT(tg_traceparent_parse(NULL, 0, &c), -EINVAL);
}

TEST(off_is_null) {
  tg_trace_set_global(NULL);
  tg_span_t *s = tg_span_start_server("x", TP, strlen(TP));
  CHECK(s == NULL);
  CHECK(tg_span_start_root("x", TG_SPAN_CLIENT) == NULL);
  CHECK(tg_span_start("child", s, TG_SPAN_INTERNAL) == NULL);
  tg_span_ref_t ref;
  tg_span_ref(s, &ref);
  CHECK(ref.tracer == NULL);
  CHECK(tg_span_start_ref("child", &ref, TG_SPAN_INTERNAL) == NULL);
  tg_span_set_str(s, "k", "v");
  tg_span_set_int(s, "k", 1);
  tg_span_set_error(s, "e");
  char tp[TG_TRACEPARENT_LEN + 1] = "untouched";
  CHECK_INT(tg_span_traceparent(s, tp), -1);
  CHECK_STR(tp, "untouched");
  tg_span_finish(&s, "e");
  tg_span_end(NULL);
}

TEST(tree_and_propagation) {
  tg_tracer_t *t = tg_tracer_new(NULL);
  CHECK(t != NULL);
  tg_trace_set_global(t);
  tg_span_t *srv = tg_span_start_server("ExecuteTransaction", TP, strlen(TP));
  CHECK(srv != NULL);
  CHECK_INT(srv->kind, TG_SPAN_SERVER);
  CHECK(srv->has_parent);
  tg_trace_ctx_t in;
  tg_traceparent_parse(TP, strlen(TP), &in);
  CHECK(memcmp(srv->trace_id, in.trace_id, 16) == 0);
  CHECK(memcmp(srv->parent_id, in.span_id, 8) == 0);
  CHECK(memcmp(srv->span_id, in.span_id, 8) != 0);
  tg_span_ref_t ref;
  tg_span_ref(srv, &ref);
  tg_span_t *auth = tg_span_start_ref("billing.authorize", &ref, TG_SPAN_CLIENT);
  tg_span_t *q = tg_span_start("catalog.quote", srv, TG_SPAN_INTERNAL);
  CHECK(auth && q);
  CHECK(memcmp(auth->trace_id, in.trace_id, 16) == 0 && memcmp(auth->parent_id, srv->span_id, 8) == 0);
  CHECK(memcmp(q->parent_id, srv->span_id, 8) == 0);
  char tp[TG_TRACEPARENT_LEN + 1];
  CHECK_INT(tg_span_traceparent(auth, tp), 0);
  tg_trace_ctx_t out;
  CHECK_INT(tg_traceparent_parse(tp, strlen(tp), &out), 0);
  CHECK(memcmp(out.trace_id, in.trace_id, 16) == 0 && memcmp(out.span_id, auth->span_id, 8) == 0);
  CHECK_INT(out.flags, 1);
  for (int i = 0; i < TG_SPAN_MAX_ATTRS + 3; i++)
    tg_span_set_int(q, "n", i);
  CHECK_INT(q->nattrs, TG_SPAN_MAX_ATTRS);
  tg_span_end(q);
  tg_span_finish(&auth, "declined");
  CHECK(auth == NULL);
  tg_span_end(srv);
  static tg_span_t got[8];
  CHECK_INT(tg_trace_drain(t, got, 8), 3);
  CHECK_STR(got[1].name, "billing.authorize");
  CHECK_INT(got[1].status, TG_SPAN_ERROR);
  CHECK_STR(got[1].status_msg, "declined");
  CHECK_INT(got[0].nattrs, TG_SPAN_MAX_ATTRS);
  CHECK_INT(got[0].attrs[TG_SPAN_MAX_ATTRS - 1].i, TG_SPAN_MAX_ATTRS - 1);
  CHECK(got[2].end_ns >= got[2].start_ns && got[2].start_ns > 1700000000ull * 1000000000ull);
  /* An invalid header starts a new trace, sampled; an unsampled one records nothing. */
  srv = tg_span_start_server("x", "garbage", 7);
  CHECK(srv != NULL && !srv->has_parent && memcmp(srv->trace_id, in.trace_id, 16) != 0);
  tg_span_end(srv);
  const char *unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
  CHECK(tg_span_start_server("x", unsampled, strlen(unsampled)) == NULL);
  tg_trace_set_global(NULL);
  tg_tracer_free(t); /* frees the span still queued */
}

TEST(sample_zero_keeps_nothing_new) {
  tg_tracer_opts_t o = {.sample = 0, .sample_set = true};
  tg_tracer_t *t = tg_tracer_new(&o);
  CHECK(t != NULL);
  for (int i = 0; i < 100; i++)
    CHECK(tg_tracer_start_server(t, "x", NULL, 0) == NULL);
  /* The caller's sampled flag still wins. */
  tg_span_t *s = tg_tracer_start_server(t, "x", TP, strlen(TP));
  CHECK(s != NULL);
  tg_span_end(s);
  tg_tracer_free(t);
}

TEST(full_queue_drops_and_counts) {
  tg_tracer_opts_t o = {.queue = 16};
  tg_tracer_t *t = tg_tracer_new(&o);
  CHECK(t != NULL);
  for (int i = 0; i < 20; i++)
    tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  CHECK_INT(tg_trace_dropped(t), 4);
  CHECK_INT(tg_trace_pending(t), 16);
  tg_buf_t out = {0};
  CHECK_INT(tg_metrics_render(&out), 0);
  CHECK(out.data && strstr(out.data, "trace_spans_dropped_total{reason=\"queue_full\"}") != NULL);
  tg_buf_free(&out);
  static tg_span_t got[32];
  CHECK_INT(tg_trace_drain(t, got, 32), 16);
  /* Room again. */
  tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  CHECK_INT(tg_trace_dropped(t), 4);
  tg_tracer_free(t);
}

TEST(encode_decodes_as_otlp) {
  tg_tracer_t *t = tg_tracer_new(NULL);
  tg_span_t *srv = tg_tracer_start_server(t, "ExecuteTransaction", TP, strlen(TP));
  tg_span_t *c = tg_span_start("wal.append", srv, TG_SPAN_INTERNAL);
  tg_span_set_str(srv, "tenant", "news");
  tg_span_set_int(c, "bytes", 123);
  tg_span_set_error(c, "disk");
  tg_span_t spans[2] = {*srv, *c};
  size_t len = 0;
  uint8_t *body = tg_otlp_encode(spans, 2, "tollgate", "gw-1", &len);
  CHECK(body != NULL && len > 0);
  export_req_t *r =
      opentelemetry__proto__collector__trace__v1__export_trace_service_request__unpack(NULL, len, body);
  free(body);
  CHECK(r != NULL);
  CHECK_INT(r->n_resource_spans, 1);
  Opentelemetry__Proto__Trace__V1__ResourceSpans *rs = r->resource_spans[0];
  CHECK_INT(rs->resource->n_attributes, 2);
  CHECK_STR(rs->resource->attributes[0]->key, "service.name");
  CHECK_STR(rs->resource->attributes[0]->value->string_value, "tollgate");
  CHECK_INT(rs->n_scope_spans, 1);
  CHECK_INT(rs->scope_spans[0]->n_spans, 2);
  Opentelemetry__Proto__Trace__V1__Span *a = rs->scope_spans[0]->spans[0], *b = rs->scope_spans[0]->spans[1];
  CHECK_STR(a->name, "ExecuteTransaction");
  CHECK_INT(a->kind, 2);
  CHECK_INT(a->trace_id.len, 16);
  CHECK(memcmp(a->trace_id.data, srv->trace_id, 16) == 0);
  CHECK(memcmp(a->parent_span_id.data, srv->parent_id, 8) == 0);
  CHECK_INT(b->parent_span_id.len, 8);
  CHECK(memcmp(b->parent_span_id.data, a->span_id.data, 8) == 0);
  CHECK_STR(a->attributes[0]->value->string_value, "news");
  CHECK_INT(b->attributes[0]->value->int_value, 123);
  CHECK(b->status != NULL);
  CHECK_INT(b->status->code, 2);
  CHECK_STR(b->status->message, "disk");
  CHECK_INT(a->start_time_unix_nano, srv->start_ns);
  opentelemetry__proto__collector__trace__v1__export_trace_service_request__free_unpacked(r, NULL);
  tg_span_free(srv);
  tg_span_free(c);
  tg_tracer_free(t);
}

typedef struct seen {
  int posts;
  size_t spans;
  char ctype[64];
  int fail_first; /* answer 503 to this many posts first */
} seen_t;

static void collector(void *ud, const http_stub_req_t *q, http_stub_reply_t *rep) {
  seen_t *s = ud;
  s->posts++;
  const char *ct = http_stub_header(q, "Content-Type");
  snprintf(s->ctype, sizeof s->ctype, "%s", ct ? ct : "");
  if (s->fail_first > 0) {
    s->fail_first--;
    rep->status = 503;
    return;
  }
  export_req_t *r = opentelemetry__proto__collector__trace__v1__export_trace_service_request__unpack(
      NULL, q->body_len, (const uint8_t *)q->body);
  if (r && strcmp(q->path, "/v1/traces") == 0) {
    for (size_t i = 0; i < r->n_resource_spans; i++)
      for (size_t j = 0; j < r->resource_spans[i]->n_scope_spans; j++)
        s->spans += r->resource_spans[i]->scope_spans[j]->n_spans;
    opentelemetry__proto__collector__trace__v1__export_trace_service_request__free_unpacked(r, NULL);
  }
  rep->status = r ? 200 : 400;
}

static void run_until(uv_loop_t *loop, const seen_t *s, size_t spans, int ms) {
  for (int i = 0; i < ms / 5 && s->spans < spans; i++) {
    uv_run(loop, UV_RUN_NOWAIT);
    uv_sleep(5);
  }
}

TEST(exporter_posts_batches_and_retries) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  http_stub_t stub;
  seen_t seen = {.fail_first = 1};
  CHECK_INT(http_stub_start(&stub, &loop, collector, &seen), 0);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/traces", stub.port);
  tg_tracer_t *t = tg_tracer_new(NULL);
  char err[128] = "";
  tg_otlp_opts_t o = {.endpoint = url, .service_name = "tollgate", .batch = 4, .flush_ms = 20};
  tg_otlp_t *x = tg_otlp_start(t, &o, err, sizeof err);
  CHECK(x != NULL);
  for (int i = 0; i < 10; i++)
    tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  /* First answer 503: retried after a second; batches of at most 4. */
  run_until(&loop, &seen, 10, 5000);
  tg_otlp_stop(x);
  CHECK_INT(seen.spans, 10);
  CHECK(seen.posts >= 4); /* 3 batches + the refused one */
  CHECK_STR(seen.ctype, "application/x-protobuf");
  CHECK_INT(tg_trace_dropped(t), 0);
  tg_tracer_free(t);
  http_stub_stop(&stub);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}

TEST(exporter_stop_flushes_and_unreachable_counts) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  http_stub_t stub;
  seen_t seen = {0};
  CHECK_INT(http_stub_start(&stub, &loop, collector, &seen), 0);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/traces", stub.port);
  tg_tracer_t *t = tg_tracer_new(NULL);
  char err[128];
  /* A long flush interval: only the stop sends. The stub answers from this
   * thread, so run its loop while the exporter stops on another. */
  tg_otlp_opts_t o = {.endpoint = url, .flush_ms = 600000};
  tg_otlp_t *x = tg_otlp_start(t, &o, err, sizeof err);
  CHECK(x != NULL);
  tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  uv_thread_t th;
  uv_thread_create(&th, (void (*)(void *))tg_otlp_stop, x);
  run_until(&loop, &seen, 1, 3000);
  uv_thread_join(&th);
  CHECK_INT(seen.spans, 1);
  tg_tracer_free(t);
  http_stub_stop(&stub);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);

  /* Port 1: refused; the stop gives up on it and counts the batch. */
  t = tg_tracer_new(NULL);
  tg_otlp_opts_t o2 = {.endpoint = "http://127.0.0.1:1/v1/traces", .flush_ms = 10};
  x = tg_otlp_start(t, &o2, err, sizeof err);
  CHECK(x != NULL);
  tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  tg_span_end(tg_tracer_start_server(t, "x", NULL, 0));
  uv_sleep(100);
  tg_otlp_stop(x);
  CHECK_INT(tg_trace_dropped(t), 2);
  tg_tracer_free(t);
}

/* The tracing section of the configuration (config/config.h). */
static int load_cfg(const char *body, tg_config_t *cfg, char *err, size_t errlen) {
  char path[] = "/tmp/tgtrace-XXXXXX.lua";
  int fd = mkstemps(path, 4);
  if (fd < 0)
    return -2;
  FILE *f = fdopen(fd, "w");
  fprintf(f, "return { listen = { { host = \"127.0.0.1\", port = 0 } }, %s }\n", body);
  fclose(f);
  int rc = tg_config_load(path, cfg, err, errlen);
  remove(path);
  return rc;
}

TEST(config_tracing_section) {
  tg_config_t cfg;
  char err[512];
  CHECK_INT(load_cfg("", &cfg, err, sizeof err), 0);
  CHECK(cfg.tracing.endpoint == NULL); /* absent: off */
  tg_config_free(&cfg);
  CHECK_INT(load_cfg("tracing = { endpoint = \"http://127.0.0.1:4318/v1/traces\" }", &cfg, err, sizeof err), 0);
  CHECK_STR(cfg.tracing.endpoint, "http://127.0.0.1:4318/v1/traces");
  CHECK_STR(cfg.tracing.service_name, "tollgate");
  CHECK(cfg.tracing.sample == 1.0);
  CHECK_INT(cfg.tracing.batch, 512);
  CHECK_INT(cfg.tracing.flush_ms, 1000);
  CHECK_INT(cfg.tracing.queue, 8192);
  tg_config_free(&cfg);
  CHECK_INT(load_cfg("tracing = { endpoint = \"https://c.example/v1/traces\", sample = 0.25, service_name = \"gw\", "
                     "batch = 64, flush_ms = 250, queue = 1024 }",
                     &cfg, err, sizeof err),
            0);
  CHECK(cfg.tracing.sample == 0.25);
  CHECK_STR(cfg.tracing.service_name, "gw");
  CHECK_INT(cfg.tracing.batch, 64);
  CHECK_INT(cfg.tracing.flush_ms, 250);
  CHECK_INT(cfg.tracing.queue, 1024);
  tg_config_free(&cfg);
  static const char *bad[][2] = {
      {"tracing = { sample = 1 }", "missing 'endpoint'"},
      {"tracing = { endpoint = \"http://x/v1/traces\", sample = 1.5 }", "0..1"},
      {"tracing = { endpoint = \"ftp://x/v1/traces\" }", "not an http(s) URL"},
      {"tracing = { endpoint = \"http://x/v1/traces\", batch = 0 }", "batch"},
      {"tracing = { endpoint = \"http://x/v1/traces\", sampel = 1 }", "sampel"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    CHECK_INT(load_cfg(bad[i][0], &cfg, err, sizeof err), -1);
    if (strstr(err, bad[i][1]) == NULL)
      fprintf(stderr, "  %s -> %s\n", bad[i][0], err);
    CHECK(strstr(err, bad[i][1]) != NULL);
  }
}

static void produce(void *arg) {
  tg_tracer_t *t = arg;
  for (int i = 0; i < 20000; i++) {
    tg_span_t *s = tg_tracer_start_server(t, "x", NULL, 0);
    tg_span_set_int(s, "i", i);
    tg_span_end(s);
  }
}

/* Two threads record while the exporter drains: every span is exported or
 * counted dropped, none twice. */
TEST(concurrent_recording_loses_nothing_uncounted) {
  uv_loop_t loop;
  uv_loop_init(&loop);
  http_stub_t stub;
  seen_t seen = {0};
  CHECK_INT(http_stub_start(&stub, &loop, collector, &seen), 0);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/v1/traces", stub.port);
  tg_tracer_opts_t to = {.queue = 1024};
  tg_tracer_t *t = tg_tracer_new(&to);
  char err[128];
  tg_otlp_opts_t o = {.endpoint = url, .batch = 256, .flush_ms = 10};
  tg_otlp_t *x = tg_otlp_start(t, &o, err, sizeof err);
  CHECK(x != NULL);
  uv_thread_t a, b;
  uv_thread_create(&a, produce, t);
  uv_thread_create(&b, produce, t);
  for (int i = 0; i < 2000 && seen.spans + tg_trace_dropped(t) < 40000; i++) {
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_sleep(5);
  }
  uv_thread_join(&a);
  uv_thread_join(&b);
  uv_thread_t th;
  uv_thread_create(&th, (void (*)(void *))tg_otlp_stop, x);
  run_until(&loop, &seen, 40000 - tg_trace_dropped(t), 3000);
  uv_thread_join(&th);
  CHECK_INT(seen.spans + tg_trace_dropped(t), 40000);
  CHECK(seen.spans > 0);
  tg_tracer_free(t);
  http_stub_stop(&stub);
  uv_run(&loop, UV_RUN_DEFAULT);
  uv_loop_close(&loop);
}
