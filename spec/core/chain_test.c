#include "test.h"

#include <errno.h>
#include <stdbool.h>

#include <jansson.h>
#include <uv.h>

#include "base/buf.h"
#include "base/keccak.h"
#include "base/metrics.h"
#include "net/client.h"
#include "pay/chain.h"

#include "http_stub.h"

/* JSON-RPC providers played by the HTTP stub (http_stub.h) on the test's own
 * loop: it checks each request is the batch a check must send, and answers
 * as its mode says. */

static const uint8_t ASSET[20] = {0x03, 0x6c, 0xbd, 0x53, 0x84, 0x2c, 0x54, 0x26, 0x63, 0x4e,
                                  0x79, 0x29, 0x54, 0x1e, 0xc2, 0x31, 0x8f, 0x3d, 0xcf, 0x7e};
static const uint8_t FROM[20] = {0xf3, 0x9f, 0xd6, 0xe5, 0x1a, 0xad, 0x88, 0xf6, 0xf4, 0xce,
                                 0x6a, 0xb8, 0x82, 0x72, 0x79, 0xcf, 0xff, 0xb9, 0x22, 0x66};
#define CHAIN 84532u

static void hex(const uint8_t *in, size_t n, char *out) {
  static const char d[] = "0123456789abcdef";
  for (size_t i = 0; i < n; i++) {
    out[2 * i] = d[in[i] >> 4];
    out[2 * i + 1] = d[in[i] & 15];
  }
  out[2 * n] = '\0';
}

static void nonce_of(uint8_t out[32], unsigned n) {
  memset(out, 0x5a, 32);
  memcpy(out, &n, sizeof n);
}

/* ---- the fake provider ---- */

typedef enum {
  M_OK,          /* answers in request order */
  M_REVERSED,    /* answers in reverse order */
  M_USED,        /* the nonce is used */
  M_WRONG_CHAIN, /* eth_chainId is another chain */
  M_BAD_HEX,     /* the balance word has a non-hex digit */
  M_SHORT,       /* the balance is "0x" (a call to an address without code) */
  M_ERROR,       /* the authorizationState call reverted */
  M_HTTP500,     /* 500 with a JSON-RPC-looking body */
  M_HANG,        /* reads the request, never answers */
  M_CLOSE,       /* closes the connection on the request */
  M_SLOW,        /* answers after 40 ms */
  M_DEAD,        /* nobody listens on its port */
} pmode_t;

typedef struct srv {
  http_stub_t stub; /* stub.port, stub.hits */
  pmode_t mode;
  int bad_requests; /* requests that were not the batch expected */
  uint8_t balance[32];
} srv_t;

/* Checks one request of the batch; its answer (a JSON object) or NULL. */
static json_t *answer_one(srv_t *s, json_t *q) {
  char want_to[43], from[41], want_bal[8 + 2 + 24 + 40 + 1];
  want_to[0] = '0', want_to[1] = 'x';
  hex(ASSET, 20, want_to + 2);
  hex(FROM, 20, from);
  snprintf(want_bal, sizeof want_bal, "0x70a08231000000000000000000000000%s", from);
  json_t *id = json_object_get(q, "id");
  const char *method = json_string_value(json_object_get(q, "method"));
  json_t *params = json_object_get(q, "params");
  if (!json_is_integer(id) || method == NULL || !json_is_array(params) ||
      strcmp(json_string_value(json_object_get(q, "jsonrpc")) ?: "", "2.0") != 0)
    return NULL;
  json_int_t n = json_integer_value(id);
  char word[67] = "0x";
  json_t *result = NULL;
  if (strcmp(method, "eth_chainId") == 0) {
    if (json_array_size(params) != 0)
      return NULL;
    snprintf(word, sizeof word, "0x%x", s->mode == M_WRONG_CHAIN ? CHAIN + 1 : CHAIN);
    result = json_string(word);
  } else if (strcmp(method, "eth_call") == 0) {
    json_t *call = json_array_get(params, 0);
    const char *to = json_string_value(json_object_get(call, "to"));
    const char *data = json_string_value(json_object_get(call, "data"));
    if (json_array_size(params) != 2 || json_object_size(call) != 2 || to == NULL || data == NULL ||
        strcmp(to, want_to) != 0 || strcmp(json_string_value(json_array_get(params, 1)) ?: "", "latest") != 0)
      return NULL;
    if (strcmp(data, want_bal) == 0) {
      hex(s->balance, 32, word + 2);
      if (s->mode == M_BAD_HEX)
        word[40] = 'g';
      result = json_string(s->mode == M_SHORT ? "0x" : word);
    } else if (strlen(data) == 2 + 8 + 64 + 64 && strncmp(data, "0xe94a0102", 10) == 0 &&
               strncmp(data + 10, want_bal + 10, 64) == 0) {
      if (s->mode == M_ERROR)
        return json_pack("{s:s,s:I,s:{s:i,s:s}}", "jsonrpc", "2.0", "id", (json_int_t)n, "error", "code", 3,
                         "message", "execution reverted");
      snprintf(word, sizeof word, "0x%064d", s->mode == M_USED ? 1 : 0);
      result = json_string(word);
    } else {
      return NULL;
    }
  } else {
    return NULL;
  }
  return json_pack("{s:s,s:I,s:o}", "jsonrpc", "2.0", "id", (json_int_t)n, "result", result);
}

/* The answer body to a batch, or NULL when the request is not what a check sends. */
static char *answer(srv_t *s, const char *body, size_t len, int *status) {
  json_t *req = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL), *out = json_array();
  bool ok = json_is_array(req) && json_array_size(req) == 3;
  for (size_t i = 0; ok && i < 3; i++) {
    json_t *a = answer_one(s, json_array_get(req, i));
    ok = a != NULL && json_integer_value(json_object_get(json_array_get(req, i), "id")) == (json_int_t)i + 1;
    if (a && s->mode == M_REVERSED)
      json_array_insert_new(out, 0, a);
    else if (a)
      json_array_append_new(out, a);
  }
  json_decref(req);
  char *text = ok ? json_dumps(out, JSON_COMPACT) : NULL;
  json_decref(out);
  *status = ok ? (s->mode == M_HTTP500 ? 500 : 200) : 400;
  if (!ok)
    s->bad_requests++;
  return text;
}

static void handle(void *ud, const http_stub_req_t *q, http_stub_reply_t *rep) {
  srv_t *s = ud;
  if (s->mode == M_HANG) {
    rep->action = HTTP_STUB_HANG;
    return;
  }
  if (s->mode == M_CLOSE) {
    rep->action = HTTP_STUB_CLOSE;
    return;
  }
  int status;
  char *text = answer(s, q->body, q->body_len, &status);
  rep->status = status;
  http_stub_reply_header(rep, "Content-Type", "application/json");
  http_stub_reply_text(rep, text);
  free(text);
  if (s->mode == M_SLOW)
    rep->delay_ms = 40;
}

static int srv_start(uv_loop_t *loop, srv_t *s, pmode_t mode) {
  memset(s, 0, sizeof *s);
  s->mode = mode;
  s->balance[30] = 0x27, s->balance[31] = 0x10; /* 10000 */
  return http_stub_start(&s->stub, loop, handle, s) != 0 ? -1 : 0;
}

static void srv_stop(srv_t *s) { http_stub_stop(&s->stub); }

/* A loopback port with nobody listening. */
static int dead_port(uv_loop_t *loop) {
  srv_t s;
  if (srv_start(loop, &s, M_OK) != 0)
    return -1;
  srv_stop(&s);
  uv_run(loop, UV_RUN_NOWAIT);
  return s.stub.port;
}

/* ---- checks ---- */

typedef struct result {
  int calls, err;
  tg_chain_state_t st;
  bool had_state;
} result_t;

static bool inside_check;
static int sync_callbacks;

static void on_result(int err, const tg_chain_state_t *st, void *ud) {
  result_t *r = ud;
  if (inside_check)
    sync_callbacks++;
  r->calls++;
  r->err = err;
  r->had_state = st != NULL;
  if (st)
    r->st = *st;
}

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

/* One check to its callback: 0, or -1000 when cb never came, -1001 when it came twice or inside. */
static int check(uv_loop_t *loop, tg_chain_pool_t *p, unsigned nonce, result_t *r) {
  uint8_t n[32];
  nonce_of(n, nonce);
  memset(r, 0, sizeof *r);
  inside_check = true;
  int rc = tg_chain_check(p, CHAIN, ASSET, FROM, n, on_result, r);
  inside_check = false;
  if (rc != 0)
    return rc;
  if (r->calls != 0 || sync_callbacks != 0)
    return -1001;
  if (run_until(loop, &r->calls, 1, 5000) != 0)
    return -1000;
  run_for(loop, 1);
  return r->calls == 1 ? 0 : -1001;
}

typedef struct env {
  uv_loop_t loop;
  tg_httpc_t *http;
  srv_t s[3];
  int ns;
  char urls[3][96];
  const char *u[3];
} env_t;

static int env_open(env_t *e, int ns, const pmode_t *modes) {
  memset(e, 0, sizeof *e);
  if (uv_loop_init(&e->loop) != 0 || (e->http = tg_httpc_new(&e->loop, NULL)) == NULL)
    return -1;
  e->ns = ns;
  /* The live ones first: a dead one's port, taken after, cannot be theirs. */
  for (int pass = 0; pass < 2; pass++)
    for (int i = 0; i < ns; i++) {
      int port;
      if ((modes[i] == M_DEAD) != (pass == 1))
        continue;
      if (modes[i] == M_DEAD) {
        port = dead_port(&e->loop); /* e->s[i] stays a stub never started */
      } else {
        if (srv_start(&e->loop, &e->s[i], modes[i]) != 0)
          return -1;
        port = e->s[i].stub.port;
      }
      snprintf(e->urls[i], sizeof e->urls[i], "http://127.0.0.1:%d/v3/secret-key-%d", port, i);
      e->u[i] = e->urls[i];
    }
  return 0;
}

static int env_close(env_t *e, tg_chain_pool_t *p) {
  tg_chain_pool_free(p);
  tg_httpc_free(e->http);
  for (int i = 0; i < e->ns; i++)
    srv_stop(&e->s[i]); /* a no-op on a dead one's */
  uv_run(&e->loop, UV_RUN_DEFAULT);
  return uv_loop_close(&e->loop);
}

/* ---- tests ---- */

TEST(selectors_are_keccak_of_the_signatures) {
  uint8_t h[32];
  char got[9];
  tg_keccak256("balanceOf(address)", 18, h);
  hex(h, 4, got);
  CHECK_STR(got, TG_CHAIN_SEL_BALANCE_OF);
  const char *sig = "authorizationState(address,bytes32)";
  tg_keccak256(sig, strlen(sig), h);
  hex(h, 4, got);
  CHECK_STR(got, TG_CHAIN_SEL_AUTH_STATE);
  CHECK_STR(got, "e94a0102");
}

TEST(request_body) {
  char body[TG_CHAIN_REQUEST_MAX];
  uint8_t n[32];
  nonce_of(n, 7);
  size_t len = tg_chain_request_body(ASSET, FROM, n, body);
  CHECK(len > 0 && len == strlen(body));
  srv_t s = {.mode = M_OK};
  int status;
  char *a = answer(&s, body, len, &status); /* the fake provider's own check of the batch */
  CHECK(a != NULL);
  CHECK_INT(status, 200);
  free(a);
  char nh[65];
  hex(n, 32, nh);
  CHECK(strstr(body, nh) != NULL);
  CHECK(strstr(body, "\"latest\"") != NULL);
}

#define OKW "\"0x0000000000000000000000000000000000000000000000000000000000002710\""
#define ZERO "\"0x0000000000000000000000000000000000000000000000000000000000000000\""
#define ONE "\"0x0000000000000000000000000000000000000000000000000000000000000001\""

static int parse(const char *s, tg_chain_state_t *st) {
  memset(st, 0xee, sizeof *st);
  return tg_chain_parse_reply(s, strlen(s), CHAIN, st);
}

static bool zeroed(const tg_chain_state_t *st) {
  static const tg_chain_state_t z;
  return memcmp(st->balance, z.balance, 32) == 0 && !st->nonce_used;
}

TEST(parse_reply) {
  tg_chain_state_t st;
  CHECK_INT(parse("[{\"jsonrpc\":\"2.0\",\"id\":1,\"result\":\"0x14a34\"},{\"jsonrpc\":\"2.0\",\"id\":2,"
                  "\"result\":" OKW "},{\"jsonrpc\":\"2.0\",\"id\":3,\"result\":" ZERO "}]",
                  &st),
            0);
  CHECK(st.balance[30] == 0x27 && st.balance[31] == 0x10 && !st.nonce_used);
  /* Any order, matched by id; upper-case digits; a used nonce. */
  CHECK_INT(parse("[{\"id\":3,\"result\":" ONE "},{\"id\":1,\"result\":\"0x14A34\"},{\"id\":2,\"result\":" OKW
                  "}]",
                  &st),
            0);
  CHECK(st.nonce_used && st.balance[31] == 0x10);
  CHECK_INT(parse("[{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO
                  "},{\"id\":1,\"result\":\"0x0014a34\"}]",
                  &st),
            0);
  /* Another chain. */
  CHECK_INT(parse("[{\"id\":1,\"result\":\"0x1\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO
                  "}]",
                  &st),
            -EXDEV);
  CHECK(zeroed(&st));
  /* Another chain wins over a reverted call (the token is not there). */
  CHECK_INT(
      parse("[{\"id\":1,\"result\":\"0x1\"},{\"id\":2,\"error\":{\"code\":3}},{\"id\":3,\"result\":" ZERO
            "}]",
            &st),
      -EXDEV);
  /* JSON-RPC errors. */
  CHECK_INT(parse("[{\"id\":1,\"error\":{\"code\":-32005,\"message\":\"limit\"}},{\"id\":2,\"result\":" OKW
                  "},{\"id\":3,\"result\":" ZERO "}]",
                  &st),
            -EREMOTEIO);
  CHECK_INT(parse("[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW
                  "},{\"id\":3,\"error\":{\"code\":3,\"message\":\"execution reverted\"}}]",
                  &st),
            -EREMOTEIO);
  CHECK(zeroed(&st));
  /* Malformed: never a balance of 0 or an unused nonce. */
  static const char *const bad[] = {
      "",
      "null",
      "{\"jsonrpc\":\"2.0\",\"id\":null,\"error\":{\"code\":-32600}}",
      "[]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO
      "},{\"id\":4,\"result\":\"0x\"}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":2,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":\"3\",\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3.0,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":4,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO
      ",\"error\":{}}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":null}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":0}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"error\":\"x\"}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":\"0x\"},{\"id\":3,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":\"0x2710\"},{\"id\":3,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":"
      "\"0X0000000000000000000000000000000000000000000000000000000000002710\"},{\"id\":3,\"result\":" ZERO
      "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":"
      "\"0x000000000000000000000000000000000000000000000000000000000000271g\"},{\"id\":3,\"result\":" ZERO
      "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":"
      "\"0x00000000000000000000000000000000000000000000000000000000000002710\"},{\"id\":3,\"result\":" ZERO
      "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW
      "},{\"id\":3,\"result\":\"0x0000000000000000000000000000000000000000000000000000000000000002\"}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW
      "},{\"id\":3,\"result\":\"0x1000000000000000000000000000000000000000000000000000000000000001\"}]",
      "[{\"id\":1,\"result\":\"14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x1000000000000000000000000000000000000000000000000000000000014a34\"},{\"id\":"
      "2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO "}]",
      "[{\"id\":1,\"result\":\"0x14a34\",\"id\":1},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO
      "}]",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO "}] x",
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":"
      "\"0x0000000000000000000000000000000000000000000000000000000000002710\\u0000\"},{\"id\":3,"
      "\"result\":" ZERO "}]",
      "[1,2,3]",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = parse(bad[i], &st);
    if (rc != -EPROTO)
      fprintf(stderr, "  bad[%zu] gave %d\n", i, rc);
    CHECK_INT(rc, -EPROTO);
    CHECK(zeroed(&st));
  }
  /* Only len bytes are read; a body over the limit is malformed. */
  const char *good =
      "[{\"id\":1,\"result\":\"0x14a34\"},{\"id\":2,\"result\":" OKW "},{\"id\":3,\"result\":" ZERO "}]";
  CHECK_INT(tg_chain_parse_reply(good, strlen(good) - 1, CHAIN, &st), -EPROTO);
  char *big = malloc(TG_CHAIN_REPLY_MAX + 2);
  memset(big, ' ', TG_CHAIN_REPLY_MAX + 1);
  memcpy(big, good, strlen(good));
  CHECK_INT(tg_chain_parse_reply(big, TG_CHAIN_REPLY_MAX, CHAIN, &st), 0);
  CHECK_INT(tg_chain_parse_reply(big, TG_CHAIN_REPLY_MAX + 1, CHAIN, &st), -EPROTO);
  free(big);
  CHECK_INT(tg_chain_parse_reply(good, strlen(good), CHAIN, NULL), -EINVAL);
}

TEST(u256_compare) {
  uint8_t a[32] = {0}, b[32] = {0};
  CHECK_INT(tg_u256_cmp(a, b), 0);
  a[31] = 1;
  CHECK_INT(tg_u256_cmp(a, b), 1);
  b[0] = 1;
  CHECK_INT(tg_u256_cmp(a, b), -1);
  uint8_t bal[32] = {0};
  bal[30] = 0x27, bal[31] = 0x10; /* 10000 */
  CHECK_INT(tg_chain_balance_ge(bal, "10000"), 1);
  CHECK_INT(tg_chain_balance_ge(bal, "9999"), 1);
  CHECK_INT(tg_chain_balance_ge(bal, "10001"), 0);
  CHECK_INT(tg_chain_balance_ge(bal, "0"), 1);
  CHECK_INT(tg_chain_balance_ge(
                bal, "115792089237316195423570985008687907853269984665640564039457584007913129639935"),
            0);
  CHECK_INT(tg_chain_balance_ge(bal, "-1"), -EINVAL);
  CHECK_INT(tg_chain_balance_ge(bal, "010"), -EINVAL);
  CHECK_INT(tg_chain_balance_ge(bal, "1e4"), -EINVAL);
  CHECK_INT(tg_chain_balance_ge(bal, ""), -EINVAL);
  memset(bal, 0xff, 32);
  CHECK_INT(tg_chain_balance_ge(
                bal, "115792089237316195423570985008687907853269984665640564039457584007913129639935"),
            1);
}

TEST(check_answers_and_cache) {
  env_t e;
  pmode_t modes[] = {M_OK};
  CHECK_INT(env_open(&e, 1, modes), 0);
  tg_chain_opts_t o = {.cache_ttl_ms = 150};
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 1, &o);
  CHECK(p != NULL);
  result_t r;
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK(r.had_state && !r.st.nonce_used && r.st.balance[30] == 0x27 && r.st.balance[31] == 0x10);
  CHECK_INT(e.s[0].stub.hits, 1);
  CHECK_INT(e.s[0].bad_requests, 0);
  /* The same key again: from the cache, still never synchronous. */
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK(r.st.balance[31] == 0x10);
  CHECK_INT(e.s[0].stub.hits, 1);
  /* Fresh: asked, whatever the cache holds; the answer refreshes it. */
  e.s[0].mode = M_USED;
  uint8_t n1[32];
  nonce_of(n1, 1);
  memset(&r, 0, sizeof r);
  inside_check = true;
  CHECK_INT(tg_chain_check_fresh(p, CHAIN, ASSET, FROM, n1, on_result, &r), 0);
  inside_check = false;
  CHECK_INT(run_until(&e.loop, &r.calls, 1, 5000), 0);
  CHECK_INT(r.err, 0);
  CHECK(r.st.nonce_used);
  CHECK_INT(e.s[0].stub.hits, 2);
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK(r.st.nonce_used);
  CHECK_INT(e.s[0].stub.hits, 2);
  /* Another nonce: asked. */
  e.s[0].mode = M_USED;
  CHECK_INT(check(&e.loop, p, 2, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK(r.st.nonce_used);
  CHECK_INT(e.s[0].stub.hits, 3);
  /* Another chain id or asset is another key. */
  uint8_t n[32];
  nonce_of(n, 1);
  memset(&r, 0, sizeof r);
  CHECK_INT(tg_chain_check(p, CHAIN + 1, ASSET, FROM, n, on_result, &r), 0);
  CHECK_INT(run_until(&e.loop, &r.calls, 1, 5000), 0);
  CHECK_INT(r.err, -EXDEV);
  CHECK_INT(e.s[0].stub.hits, 4);
  /* After the TTL: asked again. */
  run_for(&e.loop, 200);
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK(r.st.nonce_used);
  CHECK_INT(e.s[0].stub.hits, 5);
  tg_chain_stats_t stats;
  tg_chain_pool_stats(p, &stats);
  CHECK_INT(stats.checks, 7);
  CHECK_INT(stats.cache_hits, 2);
  CHECK_INT(stats.attempts, 5);
  CHECK_INT(stats.failovers, 0);
  /* Bad arguments: refused at once. */
  CHECK_INT(tg_chain_check(p, 0, ASSET, FROM, n, on_result, &r), -EINVAL);
  CHECK_INT(tg_chain_check(p, CHAIN, NULL, FROM, n, on_result, &r), -EINVAL);
  CHECK_INT(tg_chain_check(p, CHAIN, ASSET, FROM, n, NULL, &r), -EINVAL);
  CHECK_INT(sync_callbacks, 0);
  CHECK_INT(env_close(&e, p), 0);
}

/* Single provider in mode m: the error a check gets. */
static int one_provider(pmode_t m, uint32_t timeout_ms, int *hits) {
  env_t e;
  pmode_t modes[] = {m};
  if (env_open(&e, 1, modes) != 0)
    return -2000;
  tg_chain_opts_t o = {.timeout_ms = timeout_ms};
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 1, &o);
  if (p == NULL)
    return -2001;
  result_t r;
  int rc = check(&e.loop, p, 1, &r);
  if (rc == 0 && (r.err == 0) != r.had_state)
    rc = -2002;
  if (rc == 0 && e.s[0].bad_requests != 0)
    rc = -2003;
  if (hits)
    *hits = e.s[0].stub.hits;
  if (env_close(&e, p) != 0)
    rc = -2004;
  if (rc == 0 && r.err != 0) {
    tg_chain_state_t z = {{0}, false};
    if (memcmp(&r.st, &z, sizeof z) != 0)
      rc = -2005;
  }
  return rc == 0 ? r.err : rc;
}

TEST(check_errors_one_provider) {
  int hits;
  CHECK_INT(one_provider(M_REVERSED, 0, &hits), 0);
  CHECK_INT(one_provider(M_WRONG_CHAIN, 0, &hits), -EXDEV);
  CHECK_INT(one_provider(M_BAD_HEX, 0, &hits), -EPROTO);
  CHECK_INT(one_provider(M_SHORT, 0, &hits), -EPROTO);
  CHECK_INT(one_provider(M_ERROR, 0, &hits), -EREMOTEIO);
  CHECK_INT(one_provider(M_HTTP500, 0, &hits), -EREMOTEIO);
  CHECK_INT(one_provider(M_DEAD, 0, &hits), -ECONNREFUSED);
  uint64_t t0 = uv_hrtime();
  CHECK_INT(one_provider(M_HANG, 200, &hits), -ETIMEDOUT);
  uint64_t ms = (uv_hrtime() - t0) / 1000000;
  CHECK(ms >= 190 && ms < 2000);
  CHECK_INT(hits, 1);
  /* A connection closed without an answer: the client sends it once more (idempotent), then gives up. */
  int rc = one_provider(M_CLOSE, 0, &hits);
  CHECK(rc == -ECONNREFUSED);
}

TEST(failover_and_ranking) {
  env_t e;
  pmode_t modes[] = {M_DEAD, M_OK};
  CHECK_INT(env_open(&e, 2, modes), 0);
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 2, NULL);
  CHECK(p != NULL);
  result_t r;
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK_INT(e.s[1].stub.hits, 1);
  tg_chain_stats_t st;
  tg_chain_pool_stats(p, &st);
  CHECK_INT(st.attempts, 2);
  CHECK_INT(st.failovers, 1);
  /* The failed provider now ranks last: the next check goes straight to the good one. */
  CHECK_INT(check(&e.loop, p, 2, &r), 0);
  CHECK_INT(r.err, 0);
  tg_chain_pool_stats(p, &st);
  CHECK_INT(st.attempts, 3);
  CHECK_INT(st.failovers, 1);
  CHECK_INT(env_close(&e, p), 0);

  /* Timeout, then wrong chain, then a good one: each tried once, in order. */
  pmode_t modes2[] = {M_HANG, M_WRONG_CHAIN, M_OK};
  CHECK_INT(env_open(&e, 3, modes2), 0);
  tg_chain_opts_t o = {.timeout_ms = 150};
  p = tg_chain_pool_new(&e.loop, e.http, e.u, 3, &o);
  CHECK(p != NULL);
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  CHECK(e.s[0].stub.hits == 1 && e.s[1].stub.hits == 1 && e.s[2].stub.hits == 1);
  CHECK_INT(env_close(&e, p), 0);

  /* All failing the same way: that code; in different ways: -EHOSTUNREACH. */
  pmode_t modes3[] = {M_WRONG_CHAIN, M_WRONG_CHAIN};
  CHECK_INT(env_open(&e, 2, modes3), 0);
  p = tg_chain_pool_new(&e.loop, e.http, e.u, 2, NULL);
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, -EXDEV);
  CHECK(e.s[0].stub.hits == 1 && e.s[1].stub.hits == 1);
  e.s[1].mode = M_BAD_HEX;
  CHECK_INT(check(&e.loop, p, 2, &r), 0);
  CHECK_INT(r.err, -EHOSTUNREACH);
  CHECK(!r.had_state);
  CHECK(e.s[0].stub.hits == 2 && e.s[1].stub.hits == 2);
  CHECK_INT(env_close(&e, p), 0);
}

TEST(ranked_by_latency) {
  env_t e;
  pmode_t modes[] = {M_SLOW, M_OK};
  CHECK_INT(env_open(&e, 2, modes), 0);
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 2, NULL);
  CHECK(p != NULL);
  result_t r;
  for (unsigned i = 0; i < 6; i++) {
    CHECK_INT(check(&e.loop, p, 10 + i, &r), 0);
    CHECK_INT(r.err, 0);
  }
  /* The first goes to the first configured; once both are measured the fast one takes the rest. */
  CHECK_INT(e.s[0].stub.hits, 1);
  CHECK_INT(e.s[1].stub.hits, 5);
  CHECK_INT(env_close(&e, p), 0);
}

TEST(free_cancels_waiting_checks) {
  env_t e;
  pmode_t modes[] = {M_SLOW};
  CHECK_INT(env_open(&e, 1, modes), 0);
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 1, NULL);
  CHECK(p != NULL);
  result_t r, cached, waiting;
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  uint8_t n1[32], n2[32];
  nonce_of(n1, 1);
  nonce_of(n2, 2);
  memset(&cached, 0, sizeof cached);
  memset(&waiting, 0, sizeof waiting);
  CHECK_INT(tg_chain_check(p, CHAIN, ASSET, FROM, n1, on_result, &cached), 0);  /* a cache hit, queued */
  CHECK_INT(tg_chain_check(p, CHAIN, ASSET, FROM, n2, on_result, &waiting), 0); /* at the provider */
  run_for(&e.loop, 10);
  CHECK_INT(waiting.calls, 0);
  CHECK_INT(cached.calls, 1);
  tg_chain_pool_free(p);
  CHECK_INT(waiting.calls, 1);
  CHECK_INT(waiting.err, -ECANCELED);
  /* The answer arrives after the pool is gone: dropped. */
  run_for(&e.loop, 100);
  CHECK_INT(waiting.calls, 1);
  CHECK_INT(env_close(&e, NULL), 0);
}

TEST(metrics_label_hides_the_url_path) {
  CHECK_INT(tg_chain_metrics_init(), 0);
  env_t e;
  pmode_t modes[] = {M_DEAD, M_OK};
  CHECK_INT(env_open(&e, 2, modes), 0);
  tg_chain_pool_t *p = tg_chain_pool_new(&e.loop, e.http, e.u, 2, NULL);
  CHECK(p != NULL);
  result_t r;
  CHECK_INT(check(&e.loop, p, 1, &r), 0);
  CHECK_INT(r.err, 0);
  int dead = atoi(strrchr(e.urls[0], ':') + 1), good = e.s[1].stub.port;
  CHECK_INT(env_close(&e, p), 0);
  tg_buf_t out = {0};
  CHECK_INT(tg_metrics_render(&out), 0);
  char want[160];
  snprintf(want, sizeof want, "t402_rpc_errors_total{provider=\"http://127.0.0.1:%d\",kind=\"connect\"} 1",
           dead);
  char *text = strndup((const char *)out.data, out.len);
  tg_buf_free(&out);
  if (strstr(text, want) == NULL)
    fprintf(stderr, "%s", text);
  CHECK(strstr(text, want) != NULL);
  snprintf(want, sizeof want, "t402_rpc_latency_seconds_count{provider=\"http://127.0.0.1:%d\"} 1", good);
  CHECK(strstr(text, want) != NULL);
  CHECK(strstr(text, "t402_rpc_latency_seconds_bucket{provider=") != NULL);
  CHECK(strstr(text, "secret") == NULL);
  free(text);
  tg_metrics_reset();
}

TEST(pool_new_refuses_bad_arguments) {
  uv_loop_t loop;
  CHECK_INT(uv_loop_init(&loop), 0);
  tg_httpc_t *http = tg_httpc_new(&loop, NULL);
  const char *bad[] = {"ftp://x", "http://user:pw@127.0.0.1:8545/", "https://key@host"};
  const char *nine[9] = {"http://a", "http://a", "http://a", "http://a", "http://a",
                         "http://a", "http://a", "http://a", "http://a"};
  for (size_t i = 0; i < 3; i++)
    CHECK(tg_chain_pool_new(&loop, http, bad + i, 1, NULL) == NULL);
  CHECK(tg_chain_pool_new(&loop, http, nine, 9, NULL) == NULL);
  CHECK(tg_chain_pool_new(&loop, http, nine, 0, NULL) == NULL);
  CHECK(tg_chain_pool_new(&loop, NULL, nine, 1, NULL) == NULL);
  tg_chain_pool_t *p = tg_chain_pool_new(&loop, http, nine, 8, NULL);
  CHECK(p != NULL);
  tg_chain_pool_free(p);
  tg_httpc_free(http);
  uv_run(&loop, UV_RUN_DEFAULT);
  CHECK_INT(uv_loop_close(&loop), 0);
}
