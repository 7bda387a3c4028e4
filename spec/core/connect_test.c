/* Connect unary over the real HTTP server, driven with raw HTTP/1.1 from
 * blocking sockets: codecs, GET, 405/415, errors, timeouts, gzip, metrics. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <mbedtls/base64.h>
#include <zlib.h>

#include "base/buf.h"
#include "rpc/connect.h"
#include "net/server.h"
#include "base/metrics.h"
#include "ramp/v1/exchange.pb-c.h"
#include "test.h"

#define DISCOVER "/ramp.v1.ExchangeService/DiscoverResources"
#define EXECUTE "/ramp.v1.ExchangeService/ExecuteTransaction"
#define REPORT "/ramp.v1.ExchangeService/ReportUsage"
#define MAX_MESSAGE (1u << 20)

/* ---- the methods under test ---- */

static _Atomic int discover_calls, execute_calls, execute_late, execute_late_req;
static _Atomic uint32_t execute_remaining;

/* Synchronous: one NOT_IN_CATALOG result per query, built in the call arena. */
static void discover(tg_connect_call_t *call, const ProtobufCMessage *in, void *ud) {
  (void)ud;
  const Ramp__V1__DiscoverResourcesRequest *rq = (const Ramp__V1__DiscoverResourcesRequest *)in;
  atomic_fetch_add(&discover_calls, 1);
  tg_connect_call_set_tenant(call,
                             rq->ai_system && rq->ai_system->id[0] ? rq->ai_system->id : "anon");
  size_t n = rq->n_resources;
  Ramp__V1__ResourceResult *res = tg_connect_call_alloc(call, n * sizeof *res);
  Ramp__V1__ResourceResult **ptrs = tg_connect_call_alloc(call, n * sizeof *ptrs);
  if (res == NULL || ptrs == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "arena");
    return;
  }
  for (size_t i = 0; i < n; i++) {
    ramp__v1__resource_result__init(&res[i]);
    res[i].uri = rq->resources[i]->uri;
    res[i].absence_reason = RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG;
    ptrs[i] = &res[i];
  }
  Ramp__V1__DiscoverResourcesResponse out = RAMP__V1__DISCOVER_RESOURCES_RESPONSE__INIT;
  out.n_results = n;
  out.results = ptrs;
  out.catalog_built_at_unix = 1700000000123;
  tg_connect_reply(call, &out.base);
}

typedef struct pending {
  uv_timer_t timer;
  tg_connect_call_t *call;
  char key[64];
} pending_t;

static void on_pending_closed(uv_handle_t *h) { free(h->data); }

static void on_pending(uv_timer_t *t) {
  pending_t *p = t->data;
  if (tg_connect_call_expired(p->call)) {
    atomic_fetch_add(&execute_late, 1);
    if (tg_connect_call_http(p->call) == NULL && tg_connect_call_remaining_ms(p->call) == 0)
      atomic_fetch_add(&execute_late_req, 1);
  }
  Ramp__V1__ExecuteTransactionResponse out = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
  out.transaction_id = p->key;
  out.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_APPROVED;
  tg_connect_reply(p->call, &out.base);
  uv_close((uv_handle_t *)&p->timer, on_pending_closed);
}

/* Asynchronous: answers after the delay named by idempotency_key "delay=<ms>". */
static void execute(tg_connect_call_t *call, const ProtobufCMessage *in, void *ud) {
  (void)ud;
  const Ramp__V1__ExecuteTransactionRequest *rq = (const Ramp__V1__ExecuteTransactionRequest *)in;
  atomic_fetch_add(&execute_calls, 1);
  atomic_store(&execute_remaining, tg_connect_call_remaining_ms(call));
  tg_connect_call_set_tenant(call, "t-async");
  int ms = 0;
  sscanf(rq->idempotency_key, "delay=%d", &ms);
  pending_t *p = calloc(1, sizeof *p);
  p->call = call;
  snprintf(p->key, sizeof p->key, "%s", rq->idempotency_key);
  uv_timer_init(tg_connect_call_http(call)->worker->loop, &p->timer);
  p->timer.data = p;
  uv_timer_start(&p->timer, on_pending, (uint64_t)ms, 0);
}

static _Atomic int header_rcs[8];

/* Always fails, with the code given as transaction_id; "8+headers" also adds
 * response headers (and tries some that must be refused). */
static void report(tg_connect_call_t *call, const ProtobufCMessage *in, void *ud) {
  (void)ud;
  const Ramp__V1__ReportUsageRequest *rq = (const Ramp__V1__ReportUsageRequest *)in;
  tg_connect_call_set_tenant(call, "acme");
  if (strstr(rq->transaction_id, "+headers")) {
    static const char *const h[][2] = {{"Retry-After", "3"},   {"X-A", "1"},
                                       {"Bad Name", "x"},      {"X-Inject", "a\r\nSet-Cookie: x"},
                                       {"content-type", "x"}, {"X-B", "2"},
                                       {"X-C", "3"},           {"X-D", "4"}};
    for (size_t i = 0; i < 8; i++)
      atomic_store(&header_rcs[i], tg_connect_call_add_header(call, h[i][0], h[i][1]));
  }
  if (strstr(rq->transaction_id, "+detail")) {
    Ramp__V1__ExecuteTransactionResponse d = RAMP__V1__EXECUTE_TRANSACTION_RESPONSE__INIT;
    d.status = RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DENIED;
    d.denial_reason = RAMP__V1__DENIAL_REASON__DENIAL_REASON_BILLING_UNAVAILABLE;
    d.denial_detail = "billing is down";
    tg_connect_fail_detail(call, (tg_connect_code_t)atoi(rq->transaction_id), &d.base, "failed with a detail");
    return;
  }
  tg_connect_fail(call, (tg_connect_code_t)atoi(rq->transaction_id), "failed on purpose: %s",
                  rq->transaction_id);
}

/* ---- the server ---- */

static tg_connect_router_t *router;
static tg_server_t *server;
static int server_port;

static void on_http(tg_http_req_t *req, void *ud) {
  if (!tg_connect_handle(ud, req))
    tg_http_respond_simple(req, 404, "text/plain", "fallback", 8);
}

static void stop_server(void) {
  tg_server_stop(server, 2000);
  tg_connect_router_free(router);
  tg_metrics_reset();
}

static int port(void) {
  if (server)
    return server_port;
  router = tg_connect_router_new();
  tg_connect_method_t m[] = {
      {DISCOVER, "DiscoverResources", &ramp__v1__discover_resources_request__descriptor,
       &ramp__v1__discover_resources_response__descriptor, 1, discover, NULL},
      {EXECUTE, "ExecuteTransaction", &ramp__v1__execute_transaction_request__descriptor,
       &ramp__v1__execute_transaction_response__descriptor, 0, execute, NULL},
      {REPORT, "ReportUsage", &ramp__v1__report_usage_request__descriptor,
       &ramp__v1__report_usage_response__descriptor, 0, report, NULL},
  };
  for (size_t i = 0; i < 3; i++)
    if (tg_connect_router_add(router, &m[i]) != 0)
      return -1;
  tg_connect_router_set_max_message(router, MAX_MESSAGE);
  if (tg_connect_metrics_init() != 0)
    return -1;
  tg_listener_config_t l = {"127.0.0.1", 0, NULL, NULL, 0, on_http, router};
  tg_server_config_t cfg = {0};
  cfg.listeners = &l;
  cfg.nlisteners = 1;
  cfg.nworkers = 1;
  char err[256];
  if (tg_server_start(&server, &cfg, err, sizeof err) != 0) {
    fprintf(stderr, "start: %s\n", err);
    return -1;
  }
  server_port = tg_server_port(server, 0);
  atexit(stop_server);
  return server_port;
}

/* ---- a blocking HTTP/1.1 client ---- */

typedef struct resp {
  int status;
  tg_buf_t raw;
  char *head; /* status line and headers, NUL-terminated (inside raw) */
  const char *body;
  size_t body_len;
  double ms; /* wall time of the exchange */
} resp_t;

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Sends one request with Connection: close and reads the whole answer.
 * headers: extra header lines, each ending in \r\n. */
static int exchange(const char *method, const char *target, const char *headers, const void *body,
                    size_t len, resp_t *out) {
  memset(out, 0, sizeof *out);
  int p = port();
  if (p <= 0)
    return -1;
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  struct timeval tv = {5, 0};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  double t0 = now_ms();
  tg_buf_t rq = {0};
  int brc = tg_buf_printf(&rq, "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n%s", method, target,
                          headers ? headers : "");
  if (brc == 0 && (len || strcmp(method, "GET") != 0))
    brc = tg_buf_printf(&rq, "Content-Length: %zu\r\n", len);
  if (brc == 0)
    brc = tg_buf_puts(&rq, "\r\n");
  if (brc == 0)
    brc = tg_buf_append(&rq, body, len);
  if (brc != 0) { /* a request cut short would test something else */
    tg_buf_free(&rq);
    close(fd);
    return -1;
  }
  size_t off = 0;
  while (off < rq.len) {
    ssize_t w = send(fd, rq.data + off, rq.len - off, MSG_NOSIGNAL);
    if (w <= 0)
      break;
    off += (size_t)w;
  }
  tg_buf_free(&rq);
  char tmp[16384];
  ssize_t n;
  while ((n = recv(fd, tmp, sizeof tmp, 0)) > 0)
    tg_buf_append(&out->raw, tmp, (size_t)n);
  close(fd);
  out->ms = now_ms() - t0;
  if (out->raw.len == 0)
    return -1;
  char *hend = strstr(out->raw.data, "\r\n\r\n");
  if (hend == NULL || sscanf(out->raw.data, "HTTP/1.1 %d", &out->status) != 1)
    return -1;
  *hend = '\0';
  out->head = out->raw.data;
  out->body = hend + 4;
  out->body_len = out->raw.len - (size_t)(out->body - out->raw.data);
  return 0;
}

static void resp_free(resp_t *r) { tg_buf_free(&r->raw); }

/* A response header's value (copied into buf), or NULL. */
static const char *header(const resp_t *r, const char *name, char *buf, size_t buflen) {
  size_t nlen = strlen(name);
  for (const char *line = strstr(r->head, "\r\n"); line; line = strstr(line, "\r\n")) {
    line += 2;
    if (strncasecmp(line, name, nlen) == 0 && line[nlen] == ':') {
      const char *v = line + nlen + 1;
      while (*v == ' ')
        v++;
      const char *e = strstr(v, "\r\n");
      size_t vlen = e ? (size_t)(e - v) : strlen(v);
      if (vlen >= buflen)
        vlen = buflen - 1;
      memcpy(buf, v, vlen);
      buf[vlen] = '\0';
      return buf;
    }
  }
  return NULL;
}

/* The Connect error code in a JSON error body, "" when it is not one. */
static const char *error_code(const resp_t *r, char *buf, size_t buflen) {
  char ct[64];
  buf[0] = '\0';
  if (!header(r, "Content-Type", ct, sizeof ct) || strcmp(ct, "application/json") != 0)
    return buf;
  json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
  const char *code = j ? json_string_value(json_object_get(j, "code")) : NULL;
  snprintf(buf, buflen, "%s", code ? code : "");
  json_decref(j);
  return buf;
}

static const char *error_message(const resp_t *r, char *buf, size_t buflen) {
  json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
  const char *m = j ? json_string_value(json_object_get(j, "message")) : NULL;
  snprintf(buf, buflen, "%s", m ? m : "");
  json_decref(j);
  return buf;
}

/* ---- payload helpers ---- */

/* A packed DiscoverResourcesRequest with n queries of about uri_len bytes. */
static uint8_t *discover_request(size_t n, size_t uri_len, const char *tenant, size_t *len) {
  Comp__V1__AISystem ai = COMP__V1__AISYSTEM__INIT;
  ai.name = "Test Agent";
  ai.id = (char *)tenant;
  Ramp__V1__DiscoverResourcesRequest rq = RAMP__V1__DISCOVER_RESOURCES_REQUEST__INIT;
  rq.ai_system = &ai;
  Ramp__V1__ResourceQuery *qs = calloc(n ? n : 1, sizeof *qs);
  Ramp__V1__ResourceQuery **ps = calloc(n ? n : 1, sizeof *ps);
  char **uris = calloc(n ? n : 1, sizeof *uris);
  for (size_t i = 0; i < n; i++) {
    ramp__v1__resource_query__init(&qs[i]);
    uris[i] = malloc(uri_len + 32);
    int k = snprintf(uris[i], uri_len + 32, "https://example.com/%zu/", i);
    for (; (size_t)k < uri_len; k++)
      uris[i][k] = (char)('a' + (k % 26));
    uris[i][k] = '\0';
    qs[i].uri = uris[i];
    ps[i] = &qs[i];
  }
  rq.n_resources = n;
  rq.resources = ps;
  *len = ramp__v1__discover_resources_request__get_packed_size(&rq);
  uint8_t *out = malloc(*len ? *len : 1);
  ramp__v1__discover_resources_request__pack(&rq, out);
  for (size_t i = 0; i < n; i++)
    free(uris[i]);
  free(uris);
  free(qs);
  free(ps);
  return out;
}

static uint8_t *small_execute(const char *key, size_t *len) {
  Ramp__V1__ExecuteTransactionRequest rq = RAMP__V1__EXECUTE_TRANSACTION_REQUEST__INIT;
  rq.idempotency_key = (char *)key;
  *len = ramp__v1__execute_transaction_request__get_packed_size(&rq);
  uint8_t *out = malloc(*len + 1);
  ramp__v1__execute_transaction_request__pack(&rq, out);
  return out;
}

static uint8_t *small_report(const char *txid, size_t *len) {
  Ramp__V1__ReportUsageRequest rq = RAMP__V1__REPORT_USAGE_REQUEST__INIT;
  rq.transaction_id = (char *)txid;
  *len = ramp__v1__report_usage_request__get_packed_size(&rq);
  uint8_t *out = malloc(*len + 1);
  ramp__v1__report_usage_request__pack(&rq, out);
  return out;
}

static uint8_t *gzip_bytes(const void *in, size_t len, size_t *out_len) {
  z_stream z = {0};
  deflateInit2(&z, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY);
  uLong cap = deflateBound(&z, (uLong)len);
  uint8_t *out = malloc(cap);
  z.next_in = (Bytef *)in;
  z.avail_in = (uInt)len;
  z.next_out = out;
  z.avail_out = (uInt)cap;
  deflate(&z, Z_FINISH);
  *out_len = cap - z.avail_out;
  deflateEnd(&z);
  return out;
}

/* NULL when in is not a complete gzip stream. */
static uint8_t *gunzip_bytes(const void *in, size_t len, size_t *out_len) {
  z_stream z = {0};
  inflateInit2(&z, 15 + 16);
  size_t cap = 1 << 22;
  uint8_t *out = malloc(cap);
  z.next_in = (Bytef *)in;
  z.avail_in = (uInt)len;
  z.next_out = out;
  z.avail_out = (uInt)cap;
  int rc = inflate(&z, Z_FINISH);
  *out_len = cap - z.avail_out;
  inflateEnd(&z);
  if (rc != Z_STREAM_END) {
    free(out);
    return NULL;
  }
  return out;
}

/* URL-safe base64 without padding, as connect-es sends GET messages. */
static char *b64url(const void *in, size_t len) {
  size_t olen = 0;
  mbedtls_base64_encode(NULL, 0, &olen, in, len);
  char *out = malloc(olen + 1);
  mbedtls_base64_encode((unsigned char *)out, olen + 1, &olen, in, len);
  out[olen] = '\0';
  for (char *p = out; *p; p++)
    *p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
  while (olen && out[olen - 1] == '=')
    out[--olen] = '\0';
  return out;
}

static char *percent_encode(const char *s) {
  char *out = malloc(strlen(s) * 3 + 1), *o = out;
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
        c == '_' || c == '.' || c == '~')
      *o++ = (char)c;
    else
      o += sprintf(o, "%%%02X", c);
  }
  *o = '\0';
  return out;
}

static Ramp__V1__DiscoverResourcesResponse *unpack_discover(const resp_t *r) {
  return ramp__v1__discover_resources_response__unpack(NULL, r->body_len, (const uint8_t *)r->body);
}

/* ---- tests ---- */

TEST(code_names_and_http_status) {
  static const struct {
    tg_connect_code_t code;
    const char *name;
    int http;
  } want[] = {
      {TG_CONNECT_OK, "ok", 200},
      {TG_CONNECT_CANCELED, "canceled", 499},
      {TG_CONNECT_UNKNOWN, "unknown", 500},
      {TG_CONNECT_INVALID_ARGUMENT, "invalid_argument", 400},
      {TG_CONNECT_DEADLINE_EXCEEDED, "deadline_exceeded", 504},
      {TG_CONNECT_NOT_FOUND, "not_found", 404},
      {TG_CONNECT_ALREADY_EXISTS, "already_exists", 409},
      {TG_CONNECT_PERMISSION_DENIED, "permission_denied", 403},
      {TG_CONNECT_RESOURCE_EXHAUSTED, "resource_exhausted", 429},
      {TG_CONNECT_FAILED_PRECONDITION, "failed_precondition", 400},
      {TG_CONNECT_ABORTED, "aborted", 409},
      {TG_CONNECT_OUT_OF_RANGE, "out_of_range", 400},
      {TG_CONNECT_UNIMPLEMENTED, "unimplemented", 501},
      {TG_CONNECT_INTERNAL, "internal", 500},
      {TG_CONNECT_UNAVAILABLE, "unavailable", 503},
      {TG_CONNECT_DATA_LOSS, "data_loss", 500},
      {TG_CONNECT_UNAUTHENTICATED, "unauthenticated", 401},
  };
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    CHECK_STR(tg_connect_code_name(want[i].code), want[i].name);
    CHECK_INT(tg_connect_code_http(want[i].code), want[i].http);
  }
  CHECK_INT(tg_connect_code_http((tg_connect_code_t)99), 500);
  CHECK_STR(tg_connect_code_name((tg_connect_code_t)99), "unknown");
}

TEST(router_rejects_duplicates) {
  tg_connect_router_t *r = tg_connect_router_new();
  tg_connect_method_t m = {DISCOVER,
                           "DiscoverResources",
                           &ramp__v1__discover_resources_request__descriptor,
                           &ramp__v1__discover_resources_response__descriptor,
                           1,
                           discover,
                           NULL};
  CHECK_INT(tg_connect_router_add(r, &m), 0);
  CHECK_INT(tg_connect_router_add(r, &m), -EEXIST);
  m.path = "no-slash";
  CHECK_INT(tg_connect_router_add(r, &m), -EINVAL);
  tg_connect_router_free(r);
}

TEST(proto_post_succeeds) {
  size_t len;
  uint8_t *body = discover_request(2, 30, "t-proto", &len);
  resp_t r;
  int rc =
      exchange("POST", DISCOVER,
               "Content-Type: application/proto\r\nConnect-Protocol-Version: 1\r\n", body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 200);
  char v[128];
  CHECK_STR(header(&r, "Content-Type", v, sizeof v), "application/proto");
  CHECK(header(&r, "Content-Encoding", v, sizeof v) == NULL);
  CHECK(header(&r, "Vary", v, sizeof v) == NULL);
  Ramp__V1__DiscoverResourcesResponse *out = unpack_discover(&r);
  CHECK(out != NULL);
  int ok =
      out->n_results == 2 && out->catalog_built_at_unix == 1700000000123 &&
      strncmp(out->results[1]->uri, "https://example.com/1/", 22) == 0 &&
      out->results[0]->absence_reason == RAMP__V1__ABSENCE_REASON__ABSENCE_REASON_NOT_IN_CATALOG;
  ramp__v1__discover_resources_response__free_unpacked(out, NULL);
  resp_free(&r);
  CHECK(ok);
}

TEST(empty_proto_body_is_an_empty_message) {
  resp_t r;
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n", "", 0, &r), 0);
  CHECK_INT(r.status, 200);
  CHECK_INT(r.body_len, 7); /* only catalog_built_at_unix: tag + 6-byte varint */
  resp_free(&r);
}

TEST(json_post_answers_lower_camel) {
  const char *json =
      "{\"ai_system\":{\"id\":\"t-json\"},\"resources\":[{\"uri\":\"https://a.example/x\"}]}";
  resp_t r;
  CHECK_INT(
      exchange("POST", DISCOVER, "Content-Type: application/json\r\n", json, strlen(json), &r), 0);
  CHECK_INT(r.status, 200);
  char v[128];
  CHECK_STR(header(&r, "Content-Type", v, sizeof v), "application/json");
  json_t *j = json_loadb(r.body, r.body_len, 0, NULL);
  CHECK(j != NULL);
  const char *built = json_string_value(json_object_get(j, "catalogBuiltAtUnix"));
  json_t *res0 = json_array_get(json_object_get(j, "results"), 0);
  const char *reason = json_string_value(json_object_get(res0, "absenceReason"));
  const char *uri = json_string_value(json_object_get(res0, "uri"));
  int ok = built && strcmp(built, "1700000000123") == 0 && reason &&
           strcmp(reason, "ABSENCE_REASON_NOT_IN_CATALOG") == 0 && uri &&
           strcmp(uri, "https://a.example/x") == 0 &&
           json_object_get(j, "catalog_built_at_unix") == NULL;
  json_decref(j);
  resp_free(&r);
  CHECK(ok);
}

TEST(json_with_charset_is_accepted) {
  resp_t r;
  CHECK_INT(
      exchange("POST", DISCOVER, "Content-Type: application/json; charset=utf-8\r\n", "{}", 2, &r),
      0);
  CHECK_INT(r.status, 200);
  resp_free(&r);
}

TEST(get_with_base64_proto) {
  size_t len;
  uint8_t *body = discover_request(3, 20, "t-get", &len);
  char *b64 = b64url(body, len);
  free(body);
  char target[1024];
  snprintf(target, sizeof target, DISCOVER "?connect=v1&encoding=proto&base64=1&message=%s", b64);
  free(b64);
  resp_t r;
  CHECK_INT(exchange("GET", target, NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 200);
  char v[128];
  CHECK_STR(header(&r, "Content-Type", v, sizeof v), "application/proto");
  CHECK_STR(header(&r, "Vary", v, sizeof v), "Accept-Encoding");
  Ramp__V1__DiscoverResourcesResponse *out = unpack_discover(&r);
  CHECK(out != NULL);
  int ok = out->n_results == 3 && strncmp(out->results[2]->uri, "https://example.com/2/", 22) == 0;
  ramp__v1__discover_resources_response__free_unpacked(out, NULL);
  resp_free(&r);
  CHECK(ok);
}

TEST(get_with_json_and_gzip_base64) {
  char *msg = percent_encode("{\"resources\":[{\"uri\":\"https://b.example/y z\"}]}");
  char target[1024];
  snprintf(target, sizeof target, DISCOVER "?encoding=json&message=%s&connect=v1", msg);
  free(msg);
  resp_t r;
  CHECK_INT(exchange("GET", target, NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 200);
  char v[128];
  CHECK_STR(header(&r, "Content-Type", v, sizeof v), "application/json");
  int ok = memmem(r.body, r.body_len, "https://b.example/y z", 21) != NULL;
  resp_free(&r);
  CHECK(ok);

  /* compression=gzip applies to the base64-decoded message. */
  const char *json = "{\"resources\":[{\"uri\":\"https://c.example/\"}]}";
  size_t gz_len;
  uint8_t *gz = gzip_bytes(json, strlen(json), &gz_len);
  char *b64 = b64url(gz, gz_len);
  free(gz);
  snprintf(target, sizeof target, DISCOVER "?encoding=json&base64=1&compression=gzip&message=%s",
           b64);
  free(b64);
  CHECK_INT(exchange("GET", target, NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 200);
  ok = memmem(r.body, r.body_len, "https://c.example/", 18) != NULL;
  resp_free(&r);
  CHECK(ok);
}

TEST(get_errors) {
  resp_t r;
  char code[64], v[128];
  /* No or unknown encoding: the codec is unsupported, so 415 (the spec's rule). */
  CHECK_INT(exchange("GET", DISCOVER "?message=%7B%7D", NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 415);
  CHECK_STR(header(&r, "Accept-Post", v, sizeof v), "application/json, application/proto");
  resp_free(&r);
  CHECK_INT(exchange("GET", DISCOVER "?encoding=xml&message=x", NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 415);
  resp_free(&r);
  CHECK_INT(exchange("GET", DISCOVER "?encoding=json", NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
  CHECK_INT(exchange("GET", DISCOVER "?encoding=json&message=%7B%7D&connect=v2", NULL, NULL, 0, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
  CHECK_INT(exchange("GET", DISCOVER "?encoding=proto&base64=1&message=%21%21", NULL, NULL, 0, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
}

TEST(wrong_method_is_405_with_allow) {
  resp_t r;
  char v[128];
  CHECK_INT(exchange("GET", EXECUTE "?encoding=proto&message=", NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 405);
  CHECK_STR(header(&r, "Allow", v, sizeof v), "POST");
  CHECK_INT(r.body_len, 0);
  resp_free(&r);
  CHECK_INT(exchange("PUT", DISCOVER, "Content-Type: application/proto\r\n", "", 0, &r), 0);
  CHECK_INT(r.status, 405);
  CHECK_STR(header(&r, "Allow", v, sizeof v), "GET, POST");
  resp_free(&r);
}

TEST(unsupported_content_type_is_415) {
  static const char *const types[] = {
      "Content-Type: text/plain\r\n",
      "Content-Type: application/proto; charset=utf-8\r\n",
      "Content-Type: application/json; charset=latin1\r\n",
      "Content-Type: application/connect+proto\r\n",
      "",
  };
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
    resp_t r;
    char v[128];
    CHECK_INT(exchange("POST", DISCOVER, types[i], "{}", 2, &r), 0);
    CHECK_INT(r.status, 415);
    CHECK_STR(header(&r, "Accept-Post", v, sizeof v), "application/json, application/proto");
    CHECK_INT(r.body_len, 0);
    resp_free(&r);
  }
}

TEST(bad_protobuf_is_invalid_argument) {
  resp_t r;
  char code[64], msg[256];
  /* field 1, length-delimited, claims 5 bytes but carries 2 */
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n",
                     "\x0a\x05"
                     "ab",
                     4, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  CHECK(strstr(error_message(&r, msg, sizeof msg), "unmarshal") != NULL);
  char v[64];
  CHECK(header(&r, "Content-Encoding", v, sizeof v) == NULL);
  resp_free(&r);
  /* resources[0].uri = "\xff": wire-valid, but not UTF-8 */
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n",
                     "\x12\x03\x0a\x01\xff", 5, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  CHECK(strstr(error_message(&r, msg, sizeof msg), "UTF-8") != NULL);
  resp_free(&r);
  /* resources[0].uri = "a\0b": a NUL would cut the C string */
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n",
                     "\x12\x05\x0a\x03" "a\0b", 7, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  CHECK(strstr(error_message(&r, msg, sizeof msg), "NUL") != NULL);
  resp_free(&r);
  /* ... and in JSON. */
  static const char nul_json[] = "{\"resources\":[{\"uri\":\"a\\u0000b\"}]}";
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/json\r\n", nul_json,
                     sizeof nul_json - 1, &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK(strstr(error_message(&r, msg, sizeof msg), "NUL") != NULL);
  resp_free(&r);
}

TEST(bad_json_is_invalid_argument) {
  static const char *const bodies[] = {"{not json", "", "{\"resources\":7}", "[]"};
  for (size_t i = 0; i < sizeof bodies / sizeof bodies[0]; i++) {
    resp_t r;
    char code[64];
    CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/json\r\n", bodies[i],
                       strlen(bodies[i]), &r),
              0);
    CHECK_INT(r.status, 400);
    CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
    resp_free(&r);
  }
}

TEST(protocol_version_must_be_1) {
  resp_t r;
  char code[64];
  CHECK_INT(exchange("POST", DISCOVER,
                     "Content-Type: application/json\r\nConnect-Protocol-Version: 2\r\n", "{}", 2,
                     &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
}

TEST(bad_timeout_is_invalid_argument) {
  static const char *const values[] = {"abc", "12345678901", "-1", "1.5", "+5"};
  for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
    char hdr[128];
    snprintf(hdr, sizeof hdr, "Content-Type: application/json\r\nConnect-Timeout-Ms: %s\r\n",
             values[i]);
    resp_t r;
    char code[64];
    CHECK_INT(exchange("POST", DISCOVER, hdr, "{}", 2, &r), 0);
    CHECK_INT(r.status, 400);
    CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
    resp_free(&r);
  }
}

TEST(async_reply_within_deadline) {
  size_t len;
  uint8_t *body = small_execute("delay=20", &len);
  resp_t r;
  int rc =
      exchange("POST", EXECUTE, "Content-Type: application/proto\r\nConnect-Timeout-Ms: 5000\r\n",
               body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 200);
  uint32_t left = atomic_load(&execute_remaining);
  CHECK(left > 4000 && left <= 5000);
  Ramp__V1__ExecuteTransactionResponse *out =
      ramp__v1__execute_transaction_response__unpack(NULL, r.body_len, (const uint8_t *)r.body);
  CHECK(out != NULL);
  int ok = strcmp(out->transaction_id, "delay=20") == 0 &&
           out->status == RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_APPROVED;
  ramp__v1__execute_transaction_response__free_unpacked(out, NULL);
  resp_free(&r);
  CHECK(ok);
}

TEST(deadline_answers_504_and_drops_the_late_reply) {
  int late0 = atomic_load(&execute_late);
  size_t len;
  uint8_t *body = small_execute("delay=1500", &len);
  resp_t r;
  char code[64];
  int rc = exchange("POST", EXECUTE,
                    "Content-Type: application/proto\r\nConnect-Timeout-Ms: 60\r\n", body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 504);
  CHECK_STR(error_code(&r, code, sizeof code), "deadline_exceeded");
  /* Answered at the deadline, before the handler was done: not a speed
   * bound (a loaded machine may take long), an order. */
  CHECK(r.ms >= 50 && r.ms < 1500);
  CHECK_INT(atomic_load(&execute_late), late0);
  resp_free(&r);
  /* The handler still finishes, seeing the call expired; its answer goes nowhere. */
  for (int i = 0; i < 400 && atomic_load(&execute_late) == late0; i++)
    usleep(10000);
  CHECK_INT(atomic_load(&execute_late), late0 + 1);
  CHECK(atomic_load(&execute_late_req) >= 1);
}

TEST(zero_timeout_is_already_expired) {
  int calls0 = atomic_load(&execute_calls);
  size_t len;
  uint8_t *body = small_execute("delay=0", &len);
  resp_t r;
  char code[64];
  int rc = exchange("POST", EXECUTE, "Content-Type: application/proto\r\nConnect-Timeout-Ms: 0\r\n",
                    body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 504);
  CHECK_STR(error_code(&r, code, sizeof code), "deadline_exceeded");
  CHECK_INT(atomic_load(&execute_calls), calls0);
  resp_free(&r);
}

TEST(gzip_request_is_inflated) {
  size_t len, gz_len;
  uint8_t *body = discover_request(4, 100, "t-gz", &len);
  uint8_t *gz = gzip_bytes(body, len, &gz_len);
  free(body);
  resp_t r;
  /* Accept-Encoding without gzip: the small answer comes back plain. */
  int rc = exchange("POST", DISCOVER,
                    "Content-Type: application/proto\r\nContent-Encoding: gzip\r\n"
                    "Accept-Encoding: identity\r\n",
                    gz, gz_len, &r);
  free(gz);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 200);
  char v[64];
  CHECK(header(&r, "Content-Encoding", v, sizeof v) == NULL);
  Ramp__V1__DiscoverResourcesResponse *out = unpack_discover(&r);
  CHECK(out != NULL);
  int ok = out->n_results == 4;
  ramp__v1__discover_resources_response__free_unpacked(out, NULL);
  resp_free(&r);
  CHECK(ok);
}

TEST(large_response_is_gzipped_when_accepted) {
  size_t len;
  uint8_t *body = discover_request(40, 200, "t-big", &len);
  resp_t r;
  char v[64];
  int rc =
      exchange("POST", DISCOVER, "Content-Type: application/proto\r\nAccept-Encoding: br, gzip\r\n",
               body, len, &r);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 200);
  CHECK_STR(header(&r, "Content-Encoding", v, sizeof v), "gzip");
  size_t plain_len;
  uint8_t *plain = gunzip_bytes(r.body, r.body_len, &plain_len);
  CHECK(plain != NULL);
  Ramp__V1__DiscoverResourcesResponse *out =
      ramp__v1__discover_resources_response__unpack(NULL, plain_len, plain);
  free(plain);
  CHECK(out != NULL);
  int ok = out->n_results == 40 && r.body_len < plain_len;
  ramp__v1__discover_resources_response__free_unpacked(out, NULL);
  resp_free(&r);
  CHECK(ok);

  /* gzip;q=0 refuses it; no Accept-Encoding at all gets plain too. */
  CHECK_INT(exchange("POST", DISCOVER,
                     "Content-Type: application/proto\r\nAccept-Encoding: gzip;q=0\r\n", body, len,
                     &r),
            0);
  CHECK_INT(r.status, 200);
  CHECK(header(&r, "Content-Encoding", v, sizeof v) == NULL);
  resp_free(&r);
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n", body, len, &r), 0);
  CHECK(header(&r, "Content-Encoding", v, sizeof v) == NULL);
  resp_free(&r);

  /* A gzip request without Accept-Encoding is answered in gzip (the spec's rule). */
  size_t gz_len;
  uint8_t *gz = gzip_bytes(body, len, &gz_len);
  CHECK_INT(exchange("POST", DISCOVER,
                     "Content-Type: application/proto\r\nContent-Encoding: gzip\r\n", gz, gz_len,
                     &r),
            0);
  free(gz);
  free(body);
  CHECK_INT(r.status, 200);
  CHECK_STR(header(&r, "Content-Encoding", v, sizeof v), "gzip");
  resp_free(&r);
}

TEST(bad_gzip_is_invalid_argument) {
  resp_t r;
  char code[64];
  CHECK_INT(exchange("POST", DISCOVER,
                     "Content-Type: application/proto\r\nContent-Encoding: gzip\r\n", "not gzip", 8,
                     &r),
            0);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
  /* A truncated stream too. */
  size_t len, gz_len;
  uint8_t *body = discover_request(4, 100, "t", &len);
  uint8_t *gz = gzip_bytes(body, len, &gz_len);
  free(body);
  CHECK_INT(exchange("POST", DISCOVER,
                     "Content-Type: application/proto\r\nContent-Encoding: gzip\r\n", gz,
                     gz_len - 10, &r),
            0);
  free(gz);
  CHECK_INT(r.status, 400);
  CHECK_STR(error_code(&r, code, sizeof code), "invalid_argument");
  resp_free(&r);
}

TEST(unknown_encoding_is_unimplemented) {
  resp_t r;
  char code[64], msg[256];
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/json\r\nContent-Encoding: br\r\n",
                     "{}", 2, &r),
            0);
  CHECK_INT(r.status, 501);
  CHECK_STR(error_code(&r, code, sizeof code), "unimplemented");
  CHECK(strstr(error_message(&r, msg, sizeof msg), "gzip") != NULL);
  resp_free(&r);
}

TEST(inflated_message_over_the_limit_is_resource_exhausted) {
  size_t big = MAX_MESSAGE + 4096, gz_len;
  uint8_t *zeros = calloc(1, big);
  uint8_t *gz = gzip_bytes(zeros, big, &gz_len);
  free(zeros);
  resp_t r;
  char code[64];
  int rc =
      exchange("POST", DISCOVER, "Content-Type: application/proto\r\nContent-Encoding: gzip\r\n",
               gz, gz_len, &r);
  free(gz);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 429);
  CHECK_STR(error_code(&r, code, sizeof code), "resource_exhausted");
  resp_free(&r);
}

TEST(unknown_procedure_is_a_bare_404) {
  resp_t r;
  char code[64];
  CHECK_INT(exchange("POST", "/ramp.v1.ExchangeService/Nope", "Content-Type: application/json\r\n",
                     "{}", 2, &r),
            0);
  CHECK_INT(r.status, 404);
  CHECK_STR(error_code(&r, code, sizeof code), "");
  CHECK(r.body_len > 0 && memmem(r.body, r.body_len, "fallback", 8) == NULL);
  resp_free(&r);
  /* Not Connect-shaped: left to the caller. */
  CHECK_INT(exchange("GET", "/healthz", NULL, NULL, 0, &r), 0);
  CHECK_INT(r.status, 404);
  CHECK(r.body_len == 8 && memcmp(r.body, "fallback", 8) == 0);
  resp_free(&r);
  CHECK_INT(exchange("GET", "/admin/metrics", NULL, NULL, 0, &r), 0);
  CHECK(r.body_len == 8 && memcmp(r.body, "fallback", 8) == 0);
  resp_free(&r);
}

TEST(handler_errors_map_to_http_status) {
  static const struct {
    const char *txid;
    int http;
    const char *code;
  } cases[] = {
      {"5", 404, "not_found"},    {"16", 401, "unauthenticated"}, {"9", 400, "failed_precondition"},
      {"14", 503, "unavailable"}, {"0", 500, "unknown"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    size_t len;
    uint8_t *body = small_report(cases[i].txid, &len);
    resp_t r;
    char code[64], msg[256];
    int rc = exchange("POST", REPORT, "Content-Type: application/proto\r\n", body, len, &r);
    free(body);
    CHECK_INT(rc, 0);
    CHECK_INT(r.status, cases[i].http);
    CHECK_STR(error_code(&r, code, sizeof code), cases[i].code);
    CHECK(strncmp(error_message(&r, msg, sizeof msg), "failed on purpose", 17) == 0);
    resp_free(&r);
  }
}

/* A detail as Connect clients decode it: {"type": full message name, "value":
 * unpadded standard base64 of the binary message}. */
TEST(error_details_carry_a_message) {
  size_t len;
  uint8_t *body = small_report("14+detail", &len);
  resp_t r;
  char code[64], msg[256];
  int rc = exchange("POST", REPORT, "Content-Type: application/proto\r\n", body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 503);
  CHECK_STR(error_code(&r, code, sizeof code), "unavailable");
  CHECK_STR(error_message(&r, msg, sizeof msg), "failed with a detail");
  json_t *j = json_loadb(r.body, r.body_len, 0, NULL);
  json_t *d = json_array_get(json_object_get(j, "details"), 0);
  const char *type = json_string_value(json_object_get(d, "type"));
  const char *value = json_string_value(json_object_get(d, "value"));
  int ok = type && value && strcmp(type, "ramp.v1.ExecuteTransactionResponse") == 0 &&
           json_array_size(json_object_get(j, "details")) == 1 && strchr(value, '=') == NULL;
  uint8_t bin[256];
  size_t blen = 0;
  char padded[256];
  if (ok) {
    /* mbedTLS wants the padding back */
    snprintf(padded, sizeof padded, "%s%s", value, strlen(value) % 4 == 2 ? "==" : strlen(value) % 4 == 3 ? "=" : "");
    ok = mbedtls_base64_decode(bin, sizeof bin, &blen, (const uint8_t *)padded, strlen(padded)) == 0;
  }
  json_decref(j);
  resp_free(&r);
  CHECK(ok);
  Ramp__V1__ExecuteTransactionResponse *m = ramp__v1__execute_transaction_response__unpack(NULL, blen, bin);
  CHECK(m != NULL);
  int good = m->status == RAMP__V1__TRANSACTION_STATUS__TRANSACTION_STATUS_DENIED &&
             m->denial_reason == RAMP__V1__DENIAL_REASON__DENIAL_REASON_BILLING_UNAVAILABLE &&
             strcmp(m->denial_detail, "billing is down") == 0;
  ramp__v1__execute_transaction_response__free_unpacked(m, NULL);
  CHECK(good);
}

TEST(handler_headers_go_with_the_error) {
  size_t len;
  uint8_t *body = small_report("8+headers", &len);
  resp_t r;
  char v[64], code[64];
  int rc = exchange("POST", REPORT, "Content-Type: application/proto\r\n", body, len, &r);
  free(body);
  CHECK_INT(rc, 0);
  CHECK_INT(r.status, 429);
  CHECK_STR(error_code(&r, code, sizeof code), "resource_exhausted");
  CHECK_STR(header(&r, "Retry-After", v, sizeof v), "3");
  CHECK_STR(header(&r, "X-A", v, sizeof v), "1");
  CHECK_STR(header(&r, "X-B", v, sizeof v), "2");
  CHECK_STR(header(&r, "X-C", v, sizeof v), "3");
  CHECK_STR(header(&r, "Content-Type", v, sizeof v), "application/json");
  CHECK(header(&r, "Set-Cookie", v, sizeof v) == NULL);
  CHECK(header(&r, "X-D", v, sizeof v) == NULL);
  /* Refused: not a token, a control byte, the protocol's own, the fifth. */
  CHECK_INT(atomic_load(&header_rcs[0]), 0);
  CHECK_INT(atomic_load(&header_rcs[2]), -EINVAL);
  CHECK_INT(atomic_load(&header_rcs[3]), -EINVAL);
  CHECK_INT(atomic_load(&header_rcs[4]), -EINVAL);
  CHECK_INT(atomic_load(&header_rcs[7]), -ENOSPC);
  resp_free(&r);
}

TEST(metrics_count_each_call) {
  size_t len;
  uint8_t *body = small_report("7", &len);
  resp_t r;
  CHECK_INT(exchange("POST", REPORT, "Content-Type: application/proto\r\n", body, len, &r), 0);
  resp_free(&r);
  free(body);
  body = discover_request(1, 10, "t-metrics", &len);
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: application/proto\r\n", body, len, &r), 0);
  resp_free(&r);
  free(body);
  CHECK_INT(exchange("POST", DISCOVER, "Content-Type: text/plain\r\n", "x", 1, &r), 0);
  resp_free(&r);
  tg_buf_t out = {0};
  CHECK_INT(tg_metrics_render(&out), 0);
  int ok = out.data &&
           strstr(out.data, "exchange_rpc_total{method=\"ReportUsage\",code=\"permission_denied\","
                            "tenant_id=\"acme\"}") &&
           strstr(out.data, "exchange_rpc_total{method=\"DiscoverResources\",code=\"ok\",tenant_id="
                            "\"t-metrics\"} 1") &&
           strstr(out.data, "exchange_rpc_total{method=\"DiscoverResources\",code=\"unknown\"") &&
           strstr(out.data, "exchange_rpc_duration_seconds_count{method=\"DiscoverResources\","
                            "tenant_id=\"t-metrics\"} 1");
  if (!ok)
    fprintf(stderr, "%s\n", out.data ? out.data : "(empty)");
  tg_buf_free(&out);
  CHECK(ok);
}
