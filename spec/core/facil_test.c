#include "test.h"

#include <errno.h>
#include <netinet/in.h>
#include <stdbool.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <uv.h>

#include "base/buf.h"
#include "base/metrics.h"
#include "net/client.h"
#include "pay/facil.h"

#include "http_stub.h"

/* A facilitator on the test's own loop: the HTTP stub (http_stub.h) answering
 * /verify, /settle and /supported from a per-route script (then a default),
 * counting hits. */

typedef struct action {
  int status; /* 0: 200 */
  const char *body;
  uint32_t delay_ms;
  bool drop; /* close without an answer */
  const char *location;
} action_t;

typedef struct route {
  action_t script[8];
  int nscript, next;
  action_t dflt;
  int hits;
  char last_body[2048];
  char last_ctype[64];
} route_t;

typedef struct fsrv {
  http_stub_t stub;
  char url[64];
  route_t verify, settle, supported;
} fsrv_t;

static const char *VALID =
    "{\"isValid\":true,\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b66\"}";
static const char *INVALID = "{\"isValid\":false,\"invalidReason\":\"insufficient_funds\","
                             "\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b66\"}";
#define TX "0x1111111111111111111111111111111111111111111111111111111111111111"
static const char *SETTLED =
    "{\"success\":true,\"transaction\":\"" TX "\",\"network\":\"eip155:84532\","
    "\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b66\"}";
static const char *SUPPORTED =
    "{\"kinds\":[{\"x402Version\":2,\"scheme\":\"exact\",\"network\":\"eip155:84532\"},"
    "{\"x402Version\":1,\"scheme\":\"exact\",\"network\":\"base-sepolia\"}],\"extensions\":[],"
    "\"signers\":{}}";
static const char *BODY =
    "{\"x402Version\":2,\"paymentPayload\":{\"x402Version\":2,\"payload\":{}},"
    "\"paymentRequirements\":{\"scheme\":\"exact\",\"network\":\"eip155:84532\","
    "\"amount\":\"1000\"}}";

static void fsrv_handle(void *ud, const http_stub_req_t *q, http_stub_reply_t *rep) {
  fsrv_t *s = ud;
  route_t *r = NULL;
  size_t pl = strlen(q->path);
  if (pl >= 7 && strcmp(q->path + pl - 7, "/verify") == 0)
    r = &s->verify;
  else if (pl >= 7 && strcmp(q->path + pl - 7, "/settle") == 0)
    r = &s->settle;
  else if (pl >= 10 && strcmp(q->path + pl - 10, "/supported") == 0)
    r = &s->supported;
  action_t a = {.status = 404, .body = "{}"};
  if (r) {
    const char *ctype = http_stub_header(q, "content-type");
    r->hits++;
    snprintf(r->last_body, sizeof r->last_body, "%.*s", (int)q->body_len, q->body);
    snprintf(r->last_ctype, sizeof r->last_ctype, "%s", ctype ? ctype : "");
    a = r->next < r->nscript ? r->script[r->next++] : r->dflt;
  }
  rep->status = a.status ? a.status : 200;
  rep->delay_ms = a.delay_ms;
  rep->action = a.drop ? HTTP_STUB_CLOSE : HTTP_STUB_ANSWER;
  http_stub_reply_header(rep, "Content-Type", "application/json");
  if (a.location)
    http_stub_reply_header(rep, "Location", a.location);
  http_stub_reply_text(rep, a.body ? a.body : "");
}

static int fsrv_start(fsrv_t *s, uv_loop_t *loop) {
  memset(s, 0, sizeof *s);
  s->verify.dflt = (action_t){.body = VALID};
  s->settle.dflt = (action_t){.body = SETTLED};
  s->supported.dflt = (action_t){.body = SUPPORTED};
  if (http_stub_start(&s->stub, loop, fsrv_handle, s) != 0)
    return -1;
  snprintf(s->url, sizeof s->url, "http://127.0.0.1:%d", s->stub.port);
  return 0;
}

static void fsrv_close(fsrv_t *s) { http_stub_stop(&s->stub); }

static void script(route_t *r, action_t a) { r->script[r->nscript++] = a; }

static int closed_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in sin = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t sl = sizeof sin;
  bind(fd, (struct sockaddr *)&sin, sizeof sin);
  getsockname(fd, (struct sockaddr *)&sin, &sl);
  close(fd);
  return ntohs(sin.sin_port);
}

/* ---- loop helpers ---- */

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
  tg_facil_result_t r;
  char facilitator[64];
  tg_facil_pool_t *free_me; /* freed from inside the callback */
} got_t;

static void on_result(const tg_facil_result_t *r, void *ud) {
  got_t *g = ud;
  g->calls++;
  g->r = *r;
  snprintf(g->facilitator, sizeof g->facilitator, "%s", r->facilitator ? r->facilitator : "");
  g->r.facilitator = NULL;
  if (g->free_me)
    tg_facil_pool_free(g->free_me);
}

static const uint8_t K1[32] = {1}, K2[32] = {2};

/* Starts one verify (settle when key is (void *)-1) and waits for it. */
static int call(uv_loop_t *loop, tg_facil_pool_t *p, const uint8_t *key, bool settle, got_t *g) {
  memset(g, 0, sizeof *g);
  int rc = settle ? tg_facil_settle(p, BODY, strlen(BODY), on_result, g)
                  : tg_facil_verify(p, key, BODY, strlen(BODY), on_result, g);
  if (rc != 0)
    return rc;
  if (g->calls != 0)
    return -1000; /* never inside the call */
  if (run_until(loop, &g->calls, 1, 10000) != 0)
    return -1001;
  run_for(loop, 1);
  return g->calls == 1 ? 0 : -1002;
}

#define SETUP()                                                                                    \
  uv_loop_t loop;                                                                                  \
  CHECK_INT(uv_loop_init(&loop), 0);                                                               \
  tg_httpc_t *http = tg_httpc_new(&loop, NULL);                                                    \
  CHECK(http != NULL);                                                                             \
  static fsrv_t a, b;                                                                              \
  CHECK_INT(fsrv_start(&a, &loop), 0);                                                             \
  CHECK_INT(fsrv_start(&b, &loop), 0);                                                             \
  got_t g;                                                                                         \
  (void)g

#define TEARDOWN(p)                                                                                \
  tg_facil_pool_free(p);                                                                           \
  tg_httpc_free(http);                                                                             \
  fsrv_close(&a);                                                                                  \
  fsrv_close(&b);                                                                                  \
  uv_run(&loop, UV_RUN_DEFAULT);                                                                   \
  CHECK_INT(uv_loop_close(&loop), 0)

static tg_facil_pool_t *pool(uv_loop_t *loop, tg_httpc_t *http, const char *u1, const char *u2,
                             const tg_facil_opts_t *o) {
  const char *urls[] = {u1, u2};
  return tg_facil_pool_new(loop, http, "t1", urls, u2 ? 2 : 1, o);
}

/* ---- parsers ---- */

static int pv(const char *s, tg_facil_result_t *r) {
  return tg_facil_parse_verify(s, strlen(s), r);
}
static int ps(const char *s, tg_facil_result_t *r) {
  return tg_facil_parse_settle(s, strlen(s), r);
}

TEST(parse_verify) {
  tg_facil_result_t r;
  CHECK_INT(pv(VALID, &r), 0);
  CHECK_INT(r.status, TG_FACIL_OK);
  CHECK_STR(r.payer, "0x857b06519E91e3A54538791bDbb0E22373e36b66");
  CHECK_INT(pv(INVALID, &r), 0);
  CHECK_INT(r.status, TG_FACIL_REFUSED);
  CHECK_STR(r.reason, "insufficient_funds");
  CHECK_INT(pv("{\"isValid\":false}", &r), 0);
  CHECK_INT(r.status, TG_FACIL_REFUSED);
  CHECK_STR(r.reason, "isValid false");
  CHECK_INT(pv("{\"isValid\":true}", &r), 0);
  CHECK_STR(r.payer, "");
  CHECK_INT(pv("{\"isValid\":true,\"payer\":null}", &r), 0);
  /* A refusal stands whatever else is wrong with it. */
  CHECK_INT(pv("{\"isValid\":false,\"payer\":\"bob\",\"invalidReason\":7}", &r), 0);
  CHECK_INT(r.status, TG_FACIL_REFUSED);
  CHECK_STR(r.payer, "");
  const char *bad[] = {
      "",
      "garbage",
      "<html>502</html>",
      "[]",
      "\"isValid\"",
      "{}",
      "{\"isValid\":\"true\"}",
      "{\"isValid\":1}",
      "{\"isValid\":null}",
      "{\"isvalid\":true}",
      "{\"isValid\":true} x",
      "{\"isValid\":true,\"isValid\":false}",
      "{\"isValid\":true,\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b6\"}",
      "{\"isValid\":true,\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b6g\"}",
      "{\"isValid\":true,\"payer\":\"857b06519E91e3A54538791bDbb0E22373e36b66aa\"}",
      "{\"isValid\":true,\"payer\":5}",
      "{\"isValid\":true,\"payer\":\"0x857b06519E91e3A54538791bDbb0E22373e36b66\\u0000\"}"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    memset(&r, 0x5a, sizeof r);
    int rc = pv(bad[i], &r);
    if (rc != -EBADMSG)
      fprintf(stderr, "  accepted %s\n", bad[i]);
    CHECK_INT(rc, -EBADMSG);
    CHECK_INT(r.status, TG_FACIL_BAD_REPLY);
    CHECK(strncmp(r.reason, "facilitator reply: ", 19) == 0);
    CHECK_STR(r.payer, "");
  }
  /* Not NUL-terminated: only len bytes are read. */
  CHECK_INT(tg_facil_parse_verify("{\"isValid\":true}xxxx", 16, &r), 0);
  CHECK_INT(tg_facil_parse_verify(NULL, 0, &r), -EBADMSG);
  CHECK_INT(tg_facil_parse_verify(NULL, 3, &r), -EINVAL);
  CHECK_INT(tg_facil_parse_verify("{}", 2, NULL), -EINVAL);
  /* A huge reason is cut, control and non-ASCII bytes become '?'. */
  tg_buf_t big = {0};
  tg_buf_puts(&big, "{\"isValid\":false,\"invalidReason\":\"a\\n\xc3\xa9");
  for (int i = 0; i < 100000; i++)
    tg_buf_puts(&big, "b");
  tg_buf_puts(&big, "\"}");
  CHECK_INT(tg_facil_parse_verify(big.data, big.len, &r), 0);
  CHECK_INT(strlen(r.reason), sizeof r.reason - 1);
  CHECK(strncmp(r.reason, "a???bbb", 7) == 0);
  tg_buf_free(&big);
}

TEST(parse_settle) {
  tg_facil_result_t r;
  CHECK_INT(ps(SETTLED, &r), 0);
  CHECK_INT(r.status, TG_FACIL_OK);
  CHECK_STR(r.transaction, TX);
  CHECK_STR(r.network, "eip155:84532");
  CHECK_STR(r.payer, "0x857b06519E91e3A54538791bDbb0E22373e36b66");
  CHECK_INT(ps("{\"success\":false,\"errorReason\":\"invalid_transaction_state\",\"transaction\":"
               "\"\",\"network\":\"eip155:84532\"}",
               &r),
            0);
  CHECK_INT(r.status, TG_FACIL_REFUSED);
  CHECK_STR(r.reason, "invalid_transaction_state");
  CHECK_STR(r.transaction, "");
  CHECK_INT(ps("{\"success\":false,\"transaction\":\"junk\",\"payer\":\"x\"}", &r), 0);
  CHECK_INT(r.status, TG_FACIL_REFUSED);
  CHECK_STR(r.reason, "success false");
  CHECK_STR(r.transaction, "");
  /* Pending, both spellings, the transaction kept. */
  CHECK_INT(ps("{\"success\":false,\"errorReason\":\"settlement_pending\",\"transaction\":\"" TX
               "\"}",
               &r),
            0);
  CHECK_INT(r.status, TG_FACIL_PENDING);
  CHECK_STR(r.transaction, TX);
  CHECK_INT(ps("{\"success\":true,\"status\":\"pending\",\"transaction\":\"" TX "\"}", &r), 0);
  CHECK_INT(r.status, TG_FACIL_PENDING);
  CHECK_STR(r.reason, "settlement_pending");
  CHECK_INT(ps("{\"success\":false,\"status\":\"pending\"}", &r), 0);
  CHECK_INT(r.status, TG_FACIL_PENDING);
  CHECK_STR(r.transaction, "");
  const char *bad[] = {
      "",
      "nope",
      "{}",
      "{\"success\":\"true\",\"transaction\":\"" TX "\"}",
      "{\"success\":1}",
      "{\"success\":true}",
      "{\"success\":true,\"transaction\":\"\"}",
      "{\"success\":true,\"transaction\":null}",
      "{\"success\":true,\"transaction\":\"0x1111\"}",
      "{\"success\":true,\"transaction\":\"" TX "1\"}",
      "{\"success\":true,\"transaction\":"
      "\"0X1111111111111111111111111111111111111111111111111111111111111111\"}",
      "{\"success\":true,\"transaction\":"
      "\"0x111111111111111111111111111111111111111111111111111111111111111z\"}",
      "{\"success\":true,\"transaction\":7}",
      "{\"success\":true,\"transaction\":\"" TX "\",\"network\":8453}",
      "{\"success\":true,\"transaction\":\"" TX "\",\"payer\":\"0x12\"}",
      "{\"success\":false,\"errorReason\":\"settlement_pending\",\"transaction\":\"0xabc\"}",
      "{\"success\":true,\"transaction\":\"" TX "\",\"success\":false}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    memset(&r, 0x5a, sizeof r);
    int rc = ps(bad[i], &r);
    if (rc != -EBADMSG)
      fprintf(stderr, "  accepted %s\n", bad[i]);
    CHECK_INT(rc, -EBADMSG);
    CHECK_INT(r.status, TG_FACIL_BAD_REPLY);
    CHECK_STR(r.transaction, "");
  }
  /* A long network is cut safely. */
  tg_buf_t big = {0};
  tg_buf_puts(&big, "{\"success\":true,\"transaction\":\"" TX "\",\"network\":\"");
  for (int i = 0; i < 5000; i++)
    tg_buf_puts(&big, "n\\t");
  tg_buf_puts(&big, "\"}");
  CHECK_INT(tg_facil_parse_settle(big.data, big.len, &r), 0);
  CHECK_INT(strlen(r.network), sizeof r.network - 1);
  CHECK(strncmp(r.network, "n?n?", 4) == 0);
  tg_buf_free(&big);
  CHECK_STR(tg_facil_status_name(TG_FACIL_BUSY), "busy");
}

/* ---- the pool against a live facilitator ---- */

TEST(bad_arguments) {
  SETUP();
  const char *urls[] = {a.url, "ftp://x", "http://h/?k=1"};
  CHECK(tg_facil_pool_new(&loop, http, "t", urls, 0, NULL) == NULL);
  CHECK(tg_facil_pool_new(&loop, http, "t", urls + 1, 1, NULL) == NULL);
  CHECK(tg_facil_pool_new(&loop, http, "t", urls + 2, 1, NULL) == NULL);
  CHECK(tg_facil_pool_new(&loop, NULL, "t", urls, 1, NULL) == NULL);
  tg_facil_pool_t *p = tg_facil_pool_new(&loop, http, "t", urls, 1, NULL);
  CHECK(p != NULL);
  CHECK_INT(tg_facil_verify(p, K1, BODY, 0, on_result, &g), -EINVAL);
  CHECK_INT(tg_facil_verify(p, K1, NULL, 3, on_result, &g), -EINVAL);
  CHECK_INT(tg_facil_settle(p, BODY, 3, NULL, &g), -EINVAL);
  CHECK_INT(tg_facil_verify(NULL, K1, BODY, 3, on_result, &g), -EINVAL);
  TEARDOWN(p);
}

TEST(verify_valid_invalid_garbage_redirect) {
  SETUP();
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, NULL);
  CHECK(p != NULL);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_STR(g.r.payer, "0x857b06519E91e3A54538791bDbb0E22373e36b66");
  CHECK_STR(g.facilitator, a.url);
  CHECK_INT(g.r.http_status, 200);
  CHECK(!g.r.cached);
  CHECK_STR(a.verify.last_body, BODY);
  CHECK_STR(a.verify.last_ctype, "application/json");

  script(&a.verify, (action_t){.body = INVALID});
  script(&a.verify, (action_t){.body = "<html>oops</html>"});
  script(&a.verify,
         (action_t){.status = 308, .location = "http://evil.example/verify", .body = VALID});
  script(&a.verify, (action_t){.status = 302, .body = ""});
  script(&a.verify, (action_t){.status = 400, .body = "{\"error\":\"bad request\"}"});
  script(&a.verify, (action_t){.status = 400, .body = INVALID});
  script(&a.verify, (action_t){.status = 404, .body = ""});
  int before = a.verify.hits;
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK_STR(g.r.reason, "insufficient_funds");
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY); /* never followed, never "valid" */
  CHECK_INT(g.r.http_status, 308);
  CHECK(strstr(g.r.reason, "redirect") != NULL);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  CHECK_INT(g.r.http_status, 400);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  /* None of those was retried. */
  CHECK_INT(a.verify.hits - before, 7);
  CHECK_INT(g.r.attempts, 1);

  tg_buf_t m = {0};
  CHECK_INT(tg_metrics_render(&m), 0);
  tg_buf_append(&m, "", 1);
  char want[256];
  snprintf(want, sizeof want,
           "t402_facilitator_errors_total{tenant_id=\"t1\",facilitator=\"%s\",kind=\"redirect\"} 2",
           a.url);
  CHECK(strstr(m.data, want) != NULL);
  snprintf(
      want, sizeof want,
      "t402_facilitator_errors_total{tenant_id=\"t1\",facilitator=\"%s\",kind=\"bad_reply\"} 1",
      a.url);
  CHECK(strstr(m.data, want) != NULL);
  CHECK(strstr(m.data, "t402_verification_duration_seconds_count{network=\"eip155:84532\",scheme="
                       "\"exact\",status=\"invalid\"} 2") != NULL);
  CHECK(strstr(m.data, "t402_facilitator_latency_seconds_count{facilitator=") != NULL);
  tg_buf_free(&m);
  TEARDOWN(p);
}

TEST(retry_after_5xx_and_429_but_not_forever) {
  SETUP();
  tg_facil_opts_t o = {.backoff_ms = 5, .max_attempts = 3};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  script(&a.verify, (action_t){.status = 500, .body = "{}"});
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_INT(g.r.attempts, 2);
  CHECK_INT(a.verify.hits, 2);
  script(&a.verify, (action_t){.status = 429, .body = "{}"});
  script(&a.verify, (action_t){.status = 503, .body = "{}"});
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_INT(g.r.attempts, 3);
  a.verify.dflt = (action_t){.status = 502, .body = "bad gateway"};
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_UNAVAILABLE);
  CHECK_INT(g.r.attempts, 3);
  CHECK(strstr(g.r.reason, "502") != NULL);
  CHECK_INT(a.verify.hits, 8);
  TEARDOWN(p);
}

TEST(failover_from_a_closed_port) {
  SETUP();
  char down[64];
  snprintf(down, sizeof down, "http://127.0.0.1:%d", closed_port());
  tg_facil_pool_t *p = pool(&loop, http, down, a.url, NULL);
  const char *rank[2];
  CHECK_INT(tg_facil_pool_rank(p, rank, 2), 2);
  CHECK_STR(rank[0], down); /* configured order until something is known */
  CHECK_INT(call(&loop, p, K1, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_STR(g.facilitator, a.url);
  CHECK_INT(tg_facil_pool_rank(p, rank, 2), 2);
  CHECK_STR(rank[0], a.url);
  CHECK_STR(rank[1], down);
  /* Every facilitator down: UNAVAILABLE, with the reason. */
  char down2[64];
  snprintf(down2, sizeof down2, "http://127.0.0.1:%d/", closed_port());
  tg_facil_opts_t o = {.backoff_ms = 2};
  tg_facil_pool_t *q = pool(&loop, http, down, down2, &o);
  CHECK_INT(call(&loop, q, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_UNAVAILABLE);
  CHECK_INT(g.r.attempts, 4);
  CHECK(strstr(g.r.reason, "127.0.0.1") != NULL);
  tg_facil_pool_free(q);
  TEARDOWN(p);
}

TEST(ranking_moves_to_the_faster) {
  SETUP();
  a.verify.dflt.delay_ms = 60;
  tg_facil_pool_t *p = pool(&loop, http, a.url, b.url, NULL);
  for (int i = 0; i < 6; i++) {
    CHECK_INT(call(&loop, p, NULL, false, &g), 0);
    CHECK_INT(g.r.status, TG_FACIL_OK);
  }
  CHECK_INT(a.verify.hits, 1);
  CHECK_INT(b.verify.hits, 5);
  const char *rank[2];
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], b.url);
  /* b turns slow and failing: a takes over. */
  b.verify.dflt = (action_t){.status = 500};
  a.verify.dflt.delay_ms = 0;
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_STR(g.facilitator, a.url);
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], a.url);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.attempts, 1);
  CHECK_STR(g.facilitator, a.url);
  TEARDOWN(p);
}

TEST(supported_kinds_steer_the_choice) {
  SETUP();
  a.supported.dflt.body =
      "{\"kinds\":[{\"x402Version\":2,\"scheme\":\"exact\",\"network\":\"eip155:8453\"}]}";
  tg_facil_pool_t *p = pool(&loop, http, a.url, b.url, NULL);
  CHECK_INT(run_until(&loop, &b.supported.hits, 1, 5000), 0);
  run_until(&loop, &a.supported.hits, 1, 5000);
  run_for(&loop, 20);
  CHECK_INT(tg_facil_pool_supports(p, 0, 2, "exact", "eip155:84532"), 0);
  CHECK_INT(tg_facil_pool_supports(p, 0, 2, "exact", "eip155:8453"), 1);
  CHECK_INT(tg_facil_pool_supports(p, 1, 2, "exact", "eip155:84532"), 1);
  CHECK_INT(tg_facil_pool_supports(p, 1, 1, "exact", "base-sepolia"), 1);
  CHECK_INT(tg_facil_pool_supports(p, 2, 1, "exact", "base-sepolia"), -1);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_STR(g.facilitator, b.url);
  CHECK_INT(a.verify.hits, 0);
  TEARDOWN(p);
}

TEST(probes_bring_a_facilitator_back) {
  SETUP();
  tg_facil_opts_t o = {.probe_interval_ms = 50};
  a.supported.dflt = (action_t){.status = 503};
  tg_facil_pool_t *p = pool(&loop, http, a.url, b.url, &o);
  CHECK_INT(run_until(&loop, &a.supported.hits, 1, 5000), 0);
  run_for(&loop, 10);
  const char *rank[2];
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], b.url);
  /* a answers again, b stops: the probes turn the ranking around. */
  a.supported.dflt = (action_t){.body = SUPPORTED};
  b.supported.dflt = (action_t){.status = 500};
  int seen = a.supported.hits, seen_b = b.supported.hits;
  CHECK_INT(run_until(&loop, &a.supported.hits, seen + 1, 5000), 0);
  CHECK_INT(run_until(&loop, &b.supported.hits, seen_b + 1, 5000), 0);
  run_for(&loop, 10);
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], a.url);
  CHECK_INT(tg_facil_pool_supports(p, 0, 2, "exact", "eip155:84532"), 1);
  /* Healthy ones are probed every interval too. */
  seen = a.supported.hits;
  CHECK_INT(run_until(&loop, &a.supported.hits, seen + 2, 5000), 0);
  TEARDOWN(p);
}

TEST(cache_hits_skip_http_and_expire) {
  SETUP();
  tg_facil_opts_t o = {.cache_ttl_ms = 150};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  CHECK_INT(call(&loop, p, K1, false, &g), 0);
  CHECK(!g.r.cached);
  CHECK_INT(a.verify.hits, 1);
  CHECK_INT(call(&loop, p, K1, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK(g.r.cached);
  CHECK_STR(g.r.payer, "0x857b06519E91e3A54538791bDbb0E22373e36b66");
  CHECK_STR(g.facilitator, a.url);
  CHECK_INT(a.verify.hits, 1);
  /* Another key, and no key, go to the facilitator; refusals are not kept. */
  a.verify.dflt.body = INVALID;
  CHECK_INT(call(&loop, p, K2, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK_INT(call(&loop, p, K2, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(a.verify.hits, 4);
  CHECK_INT(call(&loop, p, K1, false, &g), 0);
  CHECK(g.r.cached);
  run_for(&loop, 200);
  CHECK_INT(call(&loop, p, K1, false, &g), 0);
  CHECK(!g.r.cached);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK_INT(a.verify.hits, 5);
  tg_buf_t m = {0};
  CHECK_INT(tg_metrics_render(&m), 0);
  tg_buf_append(&m, "", 1);
  CHECK(strstr(m.data, "t402_verification_duration_seconds_count{network=\"eip155:84532\",scheme="
                       "\"exact\",status=\"cached\"}") != NULL);
  tg_buf_free(&m);
  /* Without a TTL nothing is cached. */
  tg_facil_pool_t *q = pool(&loop, http, a.url, NULL, NULL);
  a.verify.dflt.body = VALID;
  CHECK_INT(call(&loop, q, K1, false, &g), 0);
  CHECK_INT(call(&loop, q, K1, false, &g), 0);
  CHECK(!g.r.cached);
  CHECK_INT(a.verify.hits, 7);
  tg_facil_pool_free(q);
  TEARDOWN(p);
}

TEST(cache_is_bounded) {
  SETUP();
  tg_facil_opts_t o = {.cache_ttl_ms = 60000, .cache_entries = 4};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  uint8_t k[32] = {0};
  for (int i = 0; i < 6; i++) {
    k[0] = (uint8_t)i;
    CHECK_INT(call(&loop, p, k, false, &g), 0);
  }
  CHECK_INT(a.verify.hits, 6);
  k[0] = 5;
  CHECK_INT(call(&loop, p, k, false, &g), 0);
  CHECK(g.r.cached);
  k[0] = 2;
  CHECK_INT(call(&loop, p, k, false, &g), 0);
  CHECK(g.r.cached);
  k[0] = 0; /* the oldest went */
  CHECK_INT(call(&loop, p, k, false, &g), 0);
  CHECK(!g.r.cached);
  CHECK_INT(a.verify.hits, 7);
  TEARDOWN(p);
}

TEST(max_verifying_gives_busy_after_the_wait) {
  SETUP();
  tg_facil_opts_t o = {.max_verifying = 1, .verify_wait_ms = 30};
  a.verify.dflt.delay_ms = 300;
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  got_t g1 = {0}, g2 = {0}, g3 = {0};
  CHECK_INT(tg_facil_verify(p, NULL, BODY, strlen(BODY), on_result, &g1), 0);
  uint64_t t0 = uv_hrtime();
  CHECK_INT(tg_facil_verify(p, NULL, BODY, strlen(BODY), on_result, &g2), 0);
  CHECK_INT(run_until(&loop, &g2.calls, 1, 5000), 0);
  uint64_t ms = (uv_hrtime() - t0) / 1000000u;
  CHECK_INT(g2.r.status, TG_FACIL_BUSY);
  CHECK(ms >= 25 && ms < 250);
  CHECK_INT(g1.calls, 0);
  /* No wait: BUSY at once (but not inside the call). */
  tg_facil_pool_t *q = pool(&loop, http, a.url, NULL, &(tg_facil_opts_t){.max_verifying = 1});
  CHECK_INT(tg_facil_verify(q, NULL, BODY, strlen(BODY), on_result, &g3), 0);
  got_t g4 = {0};
  CHECK_INT(tg_facil_verify(q, NULL, BODY, strlen(BODY), on_result, &g4), 0);
  CHECK_INT(g4.calls, 0);
  CHECK_INT(run_until(&loop, &g4.calls, 1, 5000), 0);
  CHECK_INT(g4.r.status, TG_FACIL_BUSY);
  CHECK_INT(run_until(&loop, &g1.calls, 1, 5000), 0);
  CHECK_INT(g1.r.status, TG_FACIL_OK);
  CHECK_INT(run_until(&loop, &g3.calls, 1, 5000), 0);
  CHECK_INT(g3.r.status, TG_FACIL_OK);
  tg_facil_pool_free(q);
  /* A long enough wait: the second gets the slot in FIFO order. */
  tg_facil_pool_t *r = pool(&loop, http, a.url, NULL,
                            &(tg_facil_opts_t){.max_verifying = 1, .verify_wait_ms = 2000});
  a.verify.dflt.delay_ms = 30;
  got_t w[3] = {{0}};
  for (int i = 0; i < 3; i++)
    CHECK_INT(tg_facil_verify(r, NULL, BODY, strlen(BODY), on_result, &w[i]), 0);
  CHECK_INT(run_until(&loop, &w[2].calls, 1, 5000), 0);
  CHECK_INT(w[0].calls + w[1].calls + w[2].calls, 3);
  for (int i = 0; i < 3; i++)
    CHECK_INT(w[i].r.status, TG_FACIL_OK);
  tg_facil_pool_free(r);
  TEARDOWN(p);
}

TEST(timeouts_and_the_deadline) {
  SETUP();
  a.verify.dflt.delay_ms = 2000;
  tg_facil_opts_t o = {.timeout_ms = 100, .deadline_ms = 250, .backoff_ms = 10};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  uint64_t t0 = uv_hrtime();
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  uint64_t ms = (uv_hrtime() - t0) / 1000000u;
  CHECK_INT(g.r.status, TG_FACIL_UNAVAILABLE);
  CHECK(strstr(g.r.reason, "timed out") != NULL || strstr(g.r.reason, "deadline") != NULL);
  CHECK(g.r.attempts >= 2);
  CHECK(ms >= 200 && ms < 1000);
  TEARDOWN(p);
}

TEST(settle_ok_pending_refused_and_retries) {
  SETUP();
  tg_facil_opts_t o = {.backoff_ms = 5};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_STR(g.r.transaction, TX);
  CHECK_STR(g.r.network, "eip155:84532");
  CHECK_STR(a.settle.last_body, BODY);
  script(&a.settle,
         (action_t){
             .body =
                 "{\"success\":false,\"errorReason\":\"settlement_pending\",\"transaction\":\"" TX
                 "\"}"});
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_PENDING);
  CHECK_STR(g.r.transaction, TX);
  script(&a.settle,
         (action_t){.body = "{\"success\":false,\"errorReason\":\"insufficient_funds\"}"});
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_REFUSED);
  CHECK(!g.r.maybe_settled);
  /* Never cached. */
  int hits = a.settle.hits;
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(a.settle.hits, hits + 1);
  /* 500, then OK: retried. */
  script(&a.settle, (action_t){.status = 500});
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_INT(g.r.attempts, 2);
  /* 500, then refused: the first may have settled, so not REFUSED. */
  script(&a.settle, (action_t){.status = 500});
  script(&a.settle, (action_t){.body = "{\"success\":false,\"errorReason\":\"nonce_used\"}"});
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_UNAVAILABLE);
  CHECK(g.r.maybe_settled);
  CHECK(strstr(g.r.reason, "nonce_used") != NULL);
  /* A redirect is final, never followed. */
  script(&a.settle, (action_t){.status = 307, .location = "/elsewhere"});
  hits = a.settle.hits;
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  CHECK_INT(a.settle.hits, hits + 1);
  /* Garbage: BAD_REPLY. */
  script(&a.settle, (action_t){.body = "{\"success\":true}"});
  CHECK_INT(call(&loop, p, NULL, true, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_BAD_REPLY);
  TEARDOWN(p);
}

TEST(free_with_calls_in_flight) {
  SETUP();
  a.verify.dflt.delay_ms = 300;
  a.settle.dflt.delay_ms = 300;
  tg_facil_opts_t o = {.max_verifying = 2, .verify_wait_ms = 5000, .cache_ttl_ms = 1000};
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  got_t v[4] = {{0}}, s = {0};
  for (int i = 0; i < 3; i++) /* two in flight, one waiting */
    CHECK_INT(tg_facil_verify(p, NULL, BODY, strlen(BODY), on_result, &v[i]), 0);
  CHECK_INT(tg_facil_settle(p, BODY, strlen(BODY), on_result, &s), 0);
  run_for(&loop, 50);
  for (int i = 0; i < 3; i++)
    CHECK_INT(v[i].calls, 0);
  tg_facil_pool_free(p);
  for (int i = 0; i < 3; i++) {
    CHECK_INT(v[i].calls, 1);
    CHECK_INT(v[i].r.status, TG_FACIL_UNAVAILABLE);
    CHECK(strstr(v[i].r.reason, "canceled") != NULL);
  }
  CHECK_INT(s.calls, 1);
  CHECK_INT(s.r.status, TG_FACIL_UNAVAILABLE);
  CHECK(s.r.maybe_settled);
  tg_facil_pool_free(p); /* twice: harmless while closing */
  /* The facilitator's late answers change nothing. */
  run_for(&loop, 400);
  CHECK_INT(a.verify.hits, 2);
  for (int i = 0; i < 3; i++)
    CHECK_INT(v[i].calls, 1);
  CHECK_INT(s.calls, 1);
  (void)v[3];
  TEARDOWN(NULL);
}

TEST(free_from_a_callback) {
  SETUP();
  tg_facil_opts_t o = {.cache_ttl_ms = 1000};
  a.verify.dflt.delay_ms = 200;
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, &o);
  got_t first = {.free_me = p}, other = {0};
  b.verify.dflt.delay_ms = 0;
  CHECK_INT(call(&loop, p, K1, false, &g), 0); /* warm the cache */
  CHECK_INT(tg_facil_verify(p, K1, BODY, strlen(BODY), on_result, &first), 0);
  CHECK_INT(tg_facil_verify(p, K2, BODY, strlen(BODY), on_result, &other), 0);
  CHECK_INT(run_until(&loop, &first.calls, 1, 5000), 0);
  CHECK(first.r.cached);
  CHECK_INT(other.calls, 1);
  CHECK_INT(other.r.status, TG_FACIL_UNAVAILABLE);
  run_for(&loop, 300);
  CHECK_INT(first.calls, 1);
  CHECK_INT(other.calls, 1);
  TEARDOWN(NULL);
}

TEST(httpc_freed_first) {
  SETUP();
  a.verify.dflt.delay_ms = 200;
  tg_facil_pool_t *p = pool(&loop, http, a.url, NULL, NULL);
  got_t v = {0};
  CHECK_INT(tg_facil_verify(p, NULL, BODY, strlen(BODY), on_result, &v), 0);
  run_for(&loop, 20);
  tg_httpc_free(http);
  CHECK_INT(run_until(&loop, &v.calls, 1, 5000), 0);
  CHECK_INT(v.r.status, TG_FACIL_UNAVAILABLE);
  run_for(&loop, 20);
  CHECK_INT(v.calls, 1);
  tg_facil_pool_free(p);
  fsrv_close(&a);
  fsrv_close(&b);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}

TEST(a_base_url_with_a_path) {
  SETUP();
  char u[96];
  snprintf(u, sizeof u, "%s/facilitator/", a.url);
  tg_facil_pool_t *p = pool(&loop, http, u, NULL, NULL);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  u[strlen(u) - 1] = '\0';
  CHECK_STR(g.facilitator, u);
  TEARDOWN(p);
}

TEST(a_down_facilitator_ranks_last_until_a_probe_answers) {
  SETUP();
  /* Scores alone would keep b first (a is slow, b failed once): being down
   * is what puts it behind. */
  tg_facil_opts_t o = {.timeout_ms = 300, .backoff_ms = 5};
  a.verify.dflt.delay_ms = 100;
  tg_facil_pool_t *p = pool(&loop, http, a.url, b.url, &o);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_STR(g.facilitator, a.url);
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_STR(g.facilitator, b.url);
  script(&b.verify, (action_t){.status = 500});
  int seen = b.supported.hits;
  CHECK_INT(call(&loop, p, NULL, false, &g), 0);
  CHECK_INT(g.r.status, TG_FACIL_OK);
  CHECK_STR(g.facilitator, a.url);
  const char *rank[2];
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], a.url);
  /* Probed again soon (500 ms after one failure), found well: first again. */
  CHECK_INT(run_until(&loop, &b.supported.hits, seen + 1, 3000), 0);
  run_for(&loop, 10);
  tg_facil_pool_rank(p, rank, 2);
  CHECK_STR(rank[0], b.url);
  TEARDOWN(p);
}
