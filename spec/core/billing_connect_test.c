#include "test.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <strings.h>

#include <uv.h>

#include "base/buf.h"
#include "base/metrics.h"
#include "billing/billing.h"
#include "billing/v1/billing.pb-c.h"
#include "net/client.h"

#include "http_stub.h"

/* The billing service here stands for the publisher's own system: a real
 * HTTP/1.1 server on the test's loop (http_stub.h) that speaks the Connect
 * protobuf wire of billing.v1.BillingService (requests decoded with the
 * generated protobuf-c code), answering from a script. The adapter under test reaches it through
 * the real pooled client. */

typedef struct action {
  int status;             /* 0: 200 */
  const char *error_code; /* non-200: the Connect error code */
  int delay_ms;
  bool garbage;           /* a 200 whose body is not the message */
  bool approved;          /* Authorize */
  const char *hold;
  int64_t available;
  const char *reason;
  bool ok, already_done;  /* Capture, Release */
} action_t;

typedef struct route {
  action_t script[8];
  int nscript, next;
  action_t dflt;
  int hits;
  char last_txid[64], last_ref[64], last_hold[64], last_billing_id[64], last_tenant[32], last_ai[32];
  int64_t last_amount;
} route_t;

typedef struct bsrv {
  http_stub_t stub;
  char url[64];
  route_t authorize, capture, release;
  char authz[128], ctype[64], cpv[16], ctimeout[16], traceparent[80];
} bsrv_t;

#define COPY(dst, src) snprintf(dst, sizeof dst, "%s", src)

/* A request header's value, "" when absent. */
static const char *header(const http_stub_req_t *q, const char *name) {
  const char *v = http_stub_header(q, name);
  return v ? v : "";
}

static void bsrv_handle(void *ud, const http_stub_req_t *q, http_stub_reply_t *rep) {
  bsrv_t *s = ud;
  COPY(s->authz, header(q, "authorization"));
  COPY(s->ctype, header(q, "content-type"));
  COPY(s->cpv, header(q, "connect-protocol-version"));
  COPY(s->ctimeout, header(q, "connect-timeout-ms"));
  COPY(s->traceparent, header(q, "traceparent"));
  const uint8_t *body = (const uint8_t *)q->body;
  size_t clen = q->body_len;
  route_t *r = NULL;
  action_t a = {.status = 404, .error_code = "unimplemented"};
  int kind = 0;
  if (strcmp(q->path, "/billing.v1.BillingService/Authorize") == 0) {
    r = &s->authorize;
    kind = 1;
    Billing__V1__AuthorizeRequest *m = billing__v1__authorize_request__unpack(NULL, clen, body);
    if (m) {
      COPY(r->last_txid, m->transaction_id);
      COPY(r->last_ref, m->billing_reference);
      COPY(r->last_tenant, m->tenant);
      COPY(r->last_ai, m->ai_system_id);
      r->last_amount = m->amount;
      billing__v1__authorize_request__free_unpacked(m, NULL);
    }
  } else if (strcmp(q->path, "/billing.v1.BillingService/Capture") == 0) {
    r = &s->capture;
    kind = 2;
    Billing__V1__CaptureRequest *m = billing__v1__capture_request__unpack(NULL, clen, body);
    if (m) {
      COPY(r->last_hold, m->hold_id);
      COPY(r->last_billing_id, m->billing_id);
      r->last_amount = m->amount;
      billing__v1__capture_request__free_unpacked(m, NULL);
    }
  } else if (strcmp(q->path, "/billing.v1.BillingService/Release") == 0) {
    r = &s->release;
    kind = 3;
    Billing__V1__ReleaseRequest *m = billing__v1__release_request__unpack(NULL, clen, body);
    if (m) {
      COPY(r->last_hold, m->hold_id);
      COPY(r->last_billing_id, m->billing_id);
      r->last_amount = m->amount;
      billing__v1__release_request__free_unpacked(m, NULL);
    }
  }
  if (r) {
    r->hits++;
    a = r->next < r->nscript ? r->script[r->next++] : r->dflt;
  }
  rep->status = a.status ? a.status : 200;
  rep->delay_ms = a.delay_ms > 0 ? (uint32_t)a.delay_ms : 0;
  if (rep->status != 200) {
    char j[160];
    snprintf(j, sizeof j, "{\"code\":\"%s\",\"message\":\"scripted failure\"}", a.error_code);
    http_stub_reply_header(rep, "Content-Type", "application/json");
    http_stub_reply_text(rep, j);
    return;
  }
  http_stub_reply_header(rep, "Content-Type", "application/proto");
  if (a.garbage) {
    http_stub_reply_text(rep, "\xff\xff\xff");
    return;
  }
  ProtobufCMessage *msg;
  Billing__V1__AuthorizeResponse ar = BILLING__V1__AUTHORIZE_RESPONSE__INIT;
  Billing__V1__CaptureResponse cr = BILLING__V1__CAPTURE_RESPONSE__INIT;
  Billing__V1__ReleaseResponse rr = BILLING__V1__RELEASE_RESPONSE__INIT;
  if (kind == 1) {
    ar.approved = a.approved;
    ar.hold_id = (char *)(a.hold ? a.hold : "");
    ar.available = a.available;
    ar.decline_reason = (char *)(a.reason ? a.reason : "");
    msg = &ar.base;
  } else if (kind == 2) {
    cr.ok = a.ok, cr.already_done = a.already_done;
    msg = &cr.base;
  } else {
    rr.ok = a.ok, rr.already_done = a.already_done;
    msg = &rr.base;
  }
  size_t n = protobuf_c_message_get_packed_size(msg);
  uint8_t *out = malloc(n + 1);
  protobuf_c_message_pack(msg, out);
  http_stub_reply_body(rep, out, n);
  free(out);
}

static int bsrv_start(bsrv_t *s, uv_loop_t *loop) {
  memset(s, 0, sizeof *s);
  s->authorize.dflt = (action_t){.approved = true, .hold = "hold-1", .available = -1};
  s->capture.dflt = (action_t){.ok = true};
  s->release.dflt = (action_t){.ok = true};
  if (http_stub_start(&s->stub, loop, bsrv_handle, s) != 0)
    return -1;
  snprintf(s->url, sizeof s->url, "http://127.0.0.1:%d/", s->stub.port);
  return 0;
}

static void bsrv_close(bsrv_t *s) { http_stub_stop(&s->stub); }

static void on_noop(uv_timer_t *t) { (void)t; }

static int run_until(uv_loop_t *loop, const int *count, int want, uint64_t ms) {
  uint64_t deadline = uv_hrtime() + ms * 1000000u;
  uv_timer_t tick;
  uv_timer_init(loop, &tick);
  uv_timer_start(&tick, on_noop, 5, 5);
  while (*count < want && uv_hrtime() < deadline)
    uv_run(loop, UV_RUN_ONCE);
  uv_close((uv_handle_t *)&tick, NULL);
  uv_run(loop, UV_RUN_NOWAIT);
  return *count >= want ? 0 : -1;
}

static void run_for(uv_loop_t *loop, uint64_t ms) {
  int never = 0;
  run_until(loop, &never, 1, ms);
}

typedef struct got {
  int calls;
  tg_billing_result_t r;
} got_t;

static void on_result(void *arg, const tg_billing_result_t *r) {
  got_t *g = arg;
  g->calls++;
  g->r = *r;
}

static tg_billing_auth_t auth(uv_loop_t *loop, const char *txid, uint64_t deadline_in_ms) {
  return (tg_billing_auth_t){.tenant = "t1",
                             .billing_ref = "acct-123456789",
                             .currency = "USD",
                             .amount = 250,
                             .transaction_id = txid,
                             .ai_system_id = "ai-1",
                             .request_id = "req-1",
                             .deadline_ms = uv_now(loop) + deadline_in_ms,
                             .traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"};
}

/* Authorize and wait for the answer (never inside the call: it goes out). */
static int do_authorize(uv_loop_t *loop, tg_billing_t *b, const tg_billing_auth_t *a, got_t *g) {
  memset(g, 0, sizeof *g);
  b->ops->authorize(b, a, on_result, g);
  if (run_until(loop, &g->calls, 1, 5000) != 0)
    return -1;
  return g->calls == 1 ? 0 : -2;
}

static int do_finish(uv_loop_t *loop, tg_billing_t *b, bool cap, const char *hold_in, got_t *g) {
  char hold[TG_BILLING_HOLD_MAX];
  snprintf(hold, sizeof hold, "%s", hold_in); /* may point into g */
  memset(g, 0, sizeof *g);
  (cap ? b->ops->capture : b->ops->release)(b, hold, on_result, g);
  if (run_until(loop, &g->calls, 1, 5000) != 0)
    return -1;
  return g->calls == 1 ? 0 : -2;
}

/* The value of one series in the exposition, or -1 when absent. */
static double metric(const char *series) {
  tg_buf_t out = {0};
  double v = -1;
  if (tg_metrics_render(&out) == 0 && tg_buf_puts(&out, "") == 0) {
    for (char *p = out.data; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
      size_t n = strlen(series);
      if (strncmp(p, series, n) == 0 && p[n] == ' ') {
        v = strtod(p + n + 1, NULL);
        break;
      }
    }
  }
  tg_buf_free(&out);
  return v;
}

#define SETUP(nfail, cooldown)                                                            \
  tg_metrics_reset();                                                                              \
  uv_loop_t loop;                                                                                  \
  CHECK_INT(uv_loop_init(&loop), 0);                                                               \
  tg_httpc_t *http = tg_httpc_new(&loop, NULL);                                                    \
  CHECK(http != NULL);                                                                             \
  static bsrv_t s;                                                                                 \
  CHECK_INT(bsrv_start(&s, &loop), 0);                                                             \
  tg_billing_connect_opts_t o = {.tenant = "t1",                                                   \
                                 .base_url = s.url,                                                \
                                 .bearer_token = "s3cret-token",                                   \
                                 .breaker_failures = (nfail),                         \
                                 .breaker_cooldown_ms = (cooldown)};                               \
  tg_billing_t *b = tg_billing_connect_new(&loop, http, &o);                                       \
  CHECK(b != NULL);                                                                                \
  got_t g

#define TEARDOWN()                                                                                 \
  tg_billing_free(b);                                                                              \
  tg_httpc_free(http);                                                                             \
  bsrv_close(&s);                                                                                  \
  uv_run(&loop, UV_RUN_DEFAULT);                                                                   \
  CHECK_INT(uv_loop_close(&loop), 0);                                                              \
  tg_metrics_reset()

TEST(new_refuses_missing_options) {
  uv_loop_t loop;
  CHECK_INT(uv_loop_init(&loop), 0);
  tg_httpc_t *http = tg_httpc_new(&loop, NULL);
  tg_billing_connect_opts_t o = {.tenant = "t1", .base_url = "http://127.0.0.1:1"};
  CHECK(tg_billing_connect_new(&loop, http, &o) == NULL); /* no token */
  o.bearer_token = "x";
  CHECK(tg_billing_connect_new(&loop, NULL, &o) == NULL);
  tg_httpc_free(http);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}

TEST(approve_sends_connect_headers_and_fields) {
  SETUP(5, 5000);
  CHECK_STR(b->ops->name, "connect");
  tg_billing_auth_t a = auth(&loop, "tx-approve", 1000);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_STR(g.r.hold, "hold-1");
  CHECK_INT(s.authorize.hits, 1);
  CHECK_STR(s.authz, "Bearer s3cret-token");
  CHECK_STR(s.ctype, "application/proto");
  CHECK_STR(s.cpv, "1");
  long tmo = strtol(s.ctimeout, NULL, 10);
  CHECK(tmo > 0 && tmo <= 1000);
  CHECK_STR(s.traceparent, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
  CHECK_STR(s.authorize.last_txid, "tx-approve");
  CHECK_STR(s.authorize.last_ref, "acct-123456789");
  CHECK_STR(s.authorize.last_tenant, "t1");
  CHECK_STR(s.authorize.last_ai, "ai-1");
  CHECK_INT(s.authorize.last_amount, 250);
  CHECK_INT(b->ops->health(b), 0);
  CHECK(metric("billing_authorize_total{tenant_id=\"t1\",result=\"approved\"}") == 1);
  CHECK(metric("billing_authorize_duration_seconds_count{tenant_id=\"t1\",approved=\"true\"}") == 1);
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 0);
  /* Capture twice with the same billing id: both reach the service, which
   * is where idempotency lives; the adapter does not dedupe. */
  s.capture.script[0] = (action_t){.ok = true};
  s.capture.script[1] = (action_t){.ok = true, .already_done = true};
  s.capture.nscript = 2;
  CHECK_INT(do_finish(&loop, b, true, g.r.hold, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_INT(s.capture.hits, 1);
  CHECK_STR(s.capture.last_hold, "hold-1");
  CHECK_STR(s.capture.last_billing_id, "tx-approve");
  CHECK_INT(s.capture.last_amount, 250);
  CHECK_STR(s.authz, "Bearer s3cret-token");
  s.capture.last_billing_id[0] = '\0';
  CHECK_INT(do_finish(&loop, b, true, "hold-1", &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK(strstr(g.r.detail, "already captured") != NULL);
  CHECK_INT(s.capture.hits, 2);
  CHECK_STR(s.capture.last_billing_id, "tx-approve");
  /* An unknown hold is refused here without a call. */
  CHECK_INT(do_finish(&loop, b, true, "nope", &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_DECLINED);
  CHECK_INT(s.capture.hits, 2);
  TEARDOWN();
}

TEST(decline_with_available_and_release) {
  SETUP(5, 5000);
  s.authorize.script[0] = (action_t){.approved = false, .available = 40, .reason = "insufficient funds"};
  s.authorize.nscript = 1;
  tg_billing_auth_t a = auth(&loop, "tx-decline", 1000);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_DECLINED);
  CHECK_INT(g.r.available, 40);
  CHECK(strstr(g.r.detail, "insufficient funds") != NULL);
  CHECK(strstr(g.r.detail, "****6789") != NULL);
  CHECK(strstr(g.r.detail, "acct-123456789") == NULL); /* redacted only */
  CHECK(metric("billing_authorize_total{tenant_id=\"t1\",result=\"declined\"}") == 1);
  CHECK(metric("billing_authorize_duration_seconds_count{tenant_id=\"t1\",approved=\"false\"}") == 1);
  /* Release of an approved hold reaches the service with the billing id. */
  a = auth(&loop, "tx-rel", 1000);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_INT(do_finish(&loop, b, false, g.r.hold, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_INT(s.release.hits, 1);
  CHECK_STR(s.release.last_billing_id, "tx-rel");
  CHECK_INT(b->ops->health(b), 0);
  TEARDOWN();
}

TEST(connect_error_and_bad_body_are_unavailable) {
  SETUP(5, 5000);
  s.authorize.script[0] = (action_t){.status = 503, .error_code = "unavailable"};
  s.authorize.script[1] = (action_t){.garbage = true};
  s.authorize.nscript = 2;
  tg_billing_auth_t a = auth(&loop, "tx-err", 1000);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
  CHECK(strstr(g.r.detail, "unavailable") != NULL);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
  CHECK_INT(s.authorize.hits, 2);
  CHECK(metric("billing_authorize_total{tenant_id=\"t1\",result=\"unavailable\"}") == 2);
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 0); /* 2 < 5 */
  TEARDOWN();
}

TEST(slow_answer_times_out_and_late_hold_is_released) {
  SETUP(5, 5000);
  s.authorize.script[0] = (action_t){.approved = true, .hold = "late-hold", .delay_ms = 300};
  s.authorize.nscript = 1;
  tg_billing_auth_t a = auth(&loop, "tx-slow", 60);
  uint64_t t0 = uv_now(&loop);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_TIMEOUT);
  CHECK(uv_now(&loop) - t0 < 250); /* answered at the deadline, not with the server */
  CHECK_INT(s.release.hits, 0);
  CHECK_INT(run_until(&loop, &s.release.hits, 1, 3000), 0);
  CHECK_STR(s.release.last_hold, "late-hold");
  CHECK_STR(s.release.last_billing_id, "tx-slow");
  run_for(&loop, 20);
  CHECK_INT(g.calls, 1); /* exactly once */
  CHECK(metric("billing_timeout_total{tenant_id=\"t1\"}") == 1);
  CHECK(metric("billing_authorize_total{tenant_id=\"t1\",result=\"timeout\"}") == 1);
  /* The late hold is not capturable. */
  CHECK_INT(do_finish(&loop, b, true, "late-hold", &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_DECLINED);
  CHECK_INT(s.capture.hits, 0);
  TEARDOWN();
}

TEST(breaker_opens_probes_and_closes) {
  SETUP(3, 300);
  s.authorize.dflt = (action_t){.status = 503, .error_code = "unavailable"};
  tg_billing_auth_t a = auth(&loop, "tx-br", 1000);
  for (int i = 0; i < 3; i++) {
    CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
    CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
  }
  CHECK_INT(s.authorize.hits, 3);
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 1);
  CHECK_INT(b->ops->health(b), -EAGAIN);
  /* Open: fail fast, the service is not called. */
  for (int i = 0; i < 3; i++) {
    memset(&g, 0, sizeof g);
    b->ops->authorize(b, &a, on_result, &g);
    CHECK_INT(g.calls, 1);
    CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
    CHECK_STR(g.r.detail, "circuit open");
  }
  CHECK_INT(s.authorize.hits, 3);
  /* After the cool-down one probe goes; it fails: open again. */
  run_for(&loop, 350);
  CHECK_INT(b->ops->health(b), 0);
  memset(&g, 0, sizeof g);
  b->ops->authorize(b, &a, on_result, &g);
  CHECK_INT(g.calls, 0); /* the probe is in flight */
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 2);
  got_t g2 = {0};
  b->ops->authorize(b, &a, on_result, &g2); /* only one probe */
  CHECK_INT(g2.calls, 1);
  CHECK_STR(g2.r.detail, "circuit open");
  CHECK_INT(run_until(&loop, &g.calls, 1, 3000), 0);
  CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
  CHECK_INT(s.authorize.hits, 4);
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 1);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_STR(g.r.detail, "circuit open");
  CHECK_INT(s.authorize.hits, 4);
  /* Next probe succeeds: closed. */
  s.authorize.dflt = (action_t){.approved = true, .hold = "hold-ok"};
  run_for(&loop, 350);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_INT(s.authorize.hits, 5);
  CHECK(metric("billing_circuit_state{tenant_id=\"t1\"}") == 0);
  CHECK_INT(b->ops->health(b), 0);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_APPROVED);
  CHECK_INT(s.authorize.hits, 6);
  CHECK(metric("billing_authorize_total{tenant_id=\"t1\",result=\"unavailable\"}") == 9);
  TEARDOWN();
}

TEST(timeouts_count_toward_the_breaker) {
  SETUP(2, 5000);
  s.authorize.dflt = (action_t){.approved = true, .hold = "h-slow", .delay_ms = 150};
  tg_billing_auth_t a = auth(&loop, "tx-to", 30);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_TIMEOUT);
  a = auth(&loop, "tx-to2", 30);
  CHECK_INT(do_authorize(&loop, b, &a, &g), 0);
  CHECK_INT(g.r.status, TG_BILLING_TIMEOUT);
  CHECK_INT(b->ops->health(b), -EAGAIN);
  CHECK_INT(run_until(&loop, &s.release.hits, 2, 3000), 0); /* both late holds released */
  CHECK(metric("billing_timeout_total{tenant_id=\"t1\"}") == 2);
  TEARDOWN();
}

TEST(free_answers_calls_in_flight) {
  SETUP(5, 5000);
  s.authorize.dflt = (action_t){.approved = true, .hold = "h", .delay_ms = 200};
  tg_billing_auth_t a = auth(&loop, "tx-free", 1000);
  memset(&g, 0, sizeof g);
  b->ops->authorize(b, &a, on_result, &g);
  run_for(&loop, 20);
  CHECK_INT(g.calls, 0);
  tg_billing_free(b);
  CHECK_INT(g.calls, 1);
  CHECK_INT(g.r.status, TG_BILLING_UNAVAILABLE);
  run_for(&loop, 300);
  CHECK_INT(g.calls, 1);
  tg_httpc_free(http);
  bsrv_close(&s);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
  tg_metrics_reset();
}
