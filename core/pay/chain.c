#include "pay/chain.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "base/hash.h"
#include "base/hex.h"
#include "base/metrics.h"
#include "pay/eip3009.h"

#define KEY_LEN (8 + 20 + 20 + 32) /* chain id, asset, from, nonce */
#define CACHE_WAYS 4
#define EWMA_ALPHA 0.2
#define LABEL_MAX 128

typedef struct provider {
  char *url;
  char label[LABEL_MAX]; /* scheme://host:port, the metric label */
  double ewma_ms;        /* latency of successful attempts; 0 until measured */
  uint32_t fails;        /* failures since the last success */
  uint64_t last_fail_ms; /* loop time of the last failure */
} provider_t;

typedef struct cache_entry {
  uint8_t key[KEY_LEN];
  uint64_t expires_ms; /* loop time; 0: empty */
  tg_chain_state_t st;
} cache_entry_t;

/* One check. It sits on the pool's `live` list from start to delivery, or on
 * the `ready` list when its result must wait for the next loop turn. When
 * the pool is freed while its request is in the HTTP client, p becomes NULL
 * and the HTTP callback just frees it. */
typedef struct check {
  struct check *prev, *next;
  tg_chain_pool_t *p;
  uint8_t key[KEY_LEN];
  uint64_t chain_id;
  char body[TG_CHAIN_REQUEST_MAX];
  size_t body_len;
  uint8_t order[TG_CHAIN_MAX_PROVIDERS]; /* providers by rank at start */
  size_t norder, tried;                  /* order[tried - 1] is the one asked last */
  int err;                               /* the failures' common code, or -EHOSTUNREACH */
  uint64_t sent_ns;
  tg_chain_state_t st; /* the result, for a delivery from the ready list */
  tg_chain_cb cb;
  void *ud;
} check_t;

struct tg_chain_pool {
  uv_loop_t *loop;
  tg_httpc_t *http;
  provider_t prov[TG_CHAIN_MAX_PROVIDERS];
  size_t n;
  uint32_t timeout_ms, ttl_ms;
  cache_entry_t *cache;
  size_t nsets; /* power of two; CACHE_WAYS entries each */
  check_t *live;
  check_t *ready, *ready_tail; /* singly linked through next */
  uv_timer_t kick;             /* delivers the ready list on the next turn */
  bool closing;
  tg_chain_stats_t stats;
};

static tg_metric_t *m_latency, *m_errors;

int tg_chain_metrics_init(void) {
  static const char *const lat_labels[] = {"provider", NULL};
  static const char *const err_labels[] = {"provider", "kind", NULL};
  static const double buckets[] = {0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2};
  m_latency = tg_metric_new(TG_METRIC_HISTOGRAM, "t402_rpc_latency_seconds",
                            "Time for a JSON-RPC provider to answer a payment check (balance, nonce state), by "
                            "provider; a slow or failing provider is ranked down (t402_rpc_errors_total).",
                            lat_labels, buckets, sizeof buckets / sizeof buckets[0]);
  m_errors =
      tg_metric_new(TG_METRIC_COUNTER, "t402_rpc_errors_total",
                    "JSON-RPC provider attempts that failed, by provider and kind.", err_labels, NULL, 0);
  return m_latency && m_errors ? 0 : -ENOMEM;
}

/* ---- pure functions ---- */

static const char *const SEL_BALANCE = TG_CHAIN_SEL_BALANCE_OF;
static const char *const SEL_AUTH = TG_CHAIN_SEL_AUTH_STATE;

size_t tg_chain_request_body(const uint8_t asset[20], const uint8_t from[20], const uint8_t nonce[32],
                             char out[TG_CHAIN_REQUEST_MAX]) {
  char to[41], addr[41], n[65];
  tg_hex_encode(asset, 20, to);
  tg_hex_encode(from, 20, addr);
  tg_hex_encode(nonce, 32, n);
  int len = snprintf(out, TG_CHAIN_REQUEST_MAX,
                     "[{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"eth_chainId\",\"params\":[]},"
                     "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"eth_call\",\"params\":[{\"to\":\"0x%s\","
                     "\"data\":\"0x%s000000000000000000000000%s\"},\"latest\"]},"
                     "{\"jsonrpc\":\"2.0\",\"id\":3,\"method\":\"eth_call\",\"params\":[{\"to\":\"0x%s\","
                     "\"data\":\"0x%s000000000000000000000000%s%s\"},\"latest\"]}]",
                     to, SEL_BALANCE, addr, to, SEL_AUTH, addr, n);
  return len > 0 && len < TG_CHAIN_REQUEST_MAX ? (size_t)len : 0;
}

/* "0x" + 1..64 hex digits with a value below 2^64. */
static int parse_quantity(const char *s, size_t len, uint64_t *v) {
  if (len < 3 || len > 66 || s[0] != '0' || s[1] != 'x')
    return -EPROTO;
  uint64_t x = 0;
  for (size_t i = 2; i < len; i++) {
    int d = tg_hex_value(s[i]);
    if (d < 0 || x > (UINT64_MAX >> 4))
      return -EPROTO;
    x = x << 4 | (uint64_t)d;
  }
  *v = x;
  return 0;
}

/* "0x" + exactly 64 hex digits. */
static int parse_word(const char *s, size_t len, uint8_t out[32]) {
  if (len != 66 || s[0] != '0' || s[1] != 'x')
    return -EPROTO;
  for (size_t i = 0; i < 32; i++) {
    int hi = tg_hex_value(s[2 + 2 * i]), lo = tg_hex_value(s[3 + 2 * i]);
    if (hi < 0 || lo < 0)
      return -EPROTO;
    out[i] = (uint8_t)(hi << 4 | lo);
  }
  return 0;
}

/* Sorts the batch's three replies by id into by_id[0..3); -EPROTO when the shape is wrong. */
static int batch_shape(json_t *root, json_t *by_id[3]) {
  if (!json_is_array(root) || json_array_size(root) != 3)
    return -EPROTO;
  by_id[0] = by_id[1] = by_id[2] = NULL;
  for (size_t i = 0; i < 3; i++) {
    json_t *o = json_array_get(root, i);
    if (!json_is_object(o))
      return -EPROTO;
    json_t *id = json_object_get(o, "id");
    if (!json_is_integer(id))
      return -EPROTO;
    json_int_t k = json_integer_value(id);
    if (k < 1 || k > 3 || by_id[k - 1] != NULL)
      return -EPROTO;
    json_t *res = json_object_get(o, "result"), *err = json_object_get(o, "error");
    if ((res == NULL) == (err == NULL))
      return -EPROTO;
    if (res != NULL ? !json_is_string(res) : !json_is_object(err))
      return -EPROTO;
    by_id[k - 1] = o;
  }
  return 0;
}

static int reply_word(json_t *o, uint8_t out[32]) {
  json_t *res = json_object_get(o, "result");
  if (res == NULL)
    return -EREMOTEIO;
  return parse_word(json_string_value(res), json_string_length(res), out);
}

static int parse_reply(json_t *root, uint64_t chain_id, tg_chain_state_t *out) {
  json_t *by_id[3];
  int rc = batch_shape(root, by_id);
  if (rc != 0)
    return rc;
  json_t *res = json_object_get(by_id[0], "result");
  if (res == NULL)
    return -EREMOTEIO;
  uint64_t got;
  if (parse_quantity(json_string_value(res), json_string_length(res), &got) != 0)
    return -EPROTO;
  if (got != chain_id)
    return -EXDEV;
  if (json_object_get(by_id[1], "error") || json_object_get(by_id[2], "error"))
    return -EREMOTEIO;
  uint8_t bal[32], used[32];
  if ((rc = reply_word(by_id[1], bal)) != 0 || (rc = reply_word(by_id[2], used)) != 0)
    return rc;
  for (size_t i = 0; i < 31; i++)
    if (used[i] != 0)
      return -EPROTO;
  if (used[31] > 1)
    return -EPROTO;
  memcpy(out->balance, bal, 32);
  out->nonce_used = used[31] == 1;
  return 0;
}

int tg_chain_parse_reply(const char *body, size_t len, uint64_t chain_id, tg_chain_state_t *out) {
  if (out == NULL)
    return -EINVAL;
  memset(out, 0, sizeof *out);
  if (body == NULL || len > TG_CHAIN_REPLY_MAX)
    return -EPROTO;
  json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, NULL);
  if (root == NULL)
    return -EPROTO;
  tg_chain_state_t st = {{0}, false};
  int rc = parse_reply(root, chain_id, &st);
  json_decref(root);
  if (rc == 0)
    *out = st;
  return rc;
}

int tg_u256_cmp(const uint8_t a[32], const uint8_t b[32]) {
  int c = memcmp(a, b, 32);
  return (c > 0) - (c < 0);
}

int tg_chain_balance_ge(const uint8_t balance[32], const char *amount_decimal) {
  uint8_t amount[32];
  if (balance == NULL || amount_decimal == NULL || tg_eip3009_parse_uint256(amount_decimal, amount) != 0)
    return -EINVAL;
  return tg_u256_cmp(balance, amount) >= 0;
}

/* ---- the cache ---- */

static size_t cache_set(const tg_chain_pool_t *p, const uint8_t key[KEY_LEN]) {
  uint64_t h = tg_fnv1a(TG_FNV1A_INIT, key, KEY_LEN); /* an attacker steering keys only evicts entries */
  return (size_t)(h ^ h >> 29) & (p->nsets - 1);
}

static const tg_chain_state_t *cache_get(tg_chain_pool_t *p, const uint8_t key[KEY_LEN]) {
  uint64_t now = uv_now(p->loop);
  cache_entry_t *set = p->cache + cache_set(p, key) * CACHE_WAYS;
  for (size_t i = 0; i < CACHE_WAYS; i++)
    if (set[i].expires_ms > now && memcmp(set[i].key, key, KEY_LEN) == 0)
      return &set[i].st;
  return NULL;
}

/* Into the entry holding key, else an empty or expired one, else the one expiring first. */
static void cache_put(tg_chain_pool_t *p, const uint8_t key[KEY_LEN], const tg_chain_state_t *st) {
  uint64_t now = uv_now(p->loop);
  cache_entry_t *set = p->cache + cache_set(p, key) * CACHE_WAYS, *victim = &set[0];
  for (size_t i = 0; i < CACHE_WAYS; i++) {
    if (memcmp(set[i].key, key, KEY_LEN) == 0 || set[i].expires_ms <= now) {
      victim = &set[i];
      break;
    }
    if (set[i].expires_ms < victim->expires_ms)
      victim = &set[i];
  }
  memcpy(victim->key, key, KEY_LEN);
  victim->expires_ms = now + p->ttl_ms;
  victim->st = *st;
}

/* ---- providers ---- */

/* scheme://host:port of url (the path, query and any key in them left out). */
static void provider_label(const char *url, char out[LABEL_MAX]) {
  const char *host = strstr(url, "://");
  host = host ? host + 3 : url;
  size_t n = strcspn(host, "/?#");
  const char *bracket = memchr(host, ']', n);
  const char *after = bracket ? bracket : host;
  bool has_port = memchr(after, ':', n - (size_t)(after - host)) != NULL;
  const char *port = has_port ? "" : strncmp(url, "https:", 6) == 0 ? ":443" : ":80";
  int scheme_len = (int)(host - url);
  if (n > LABEL_MAX / 2)
    n = LABEL_MAX / 2;
  snprintf(out, LABEL_MAX, "%.*s%.*s%s", scheme_len > 16 ? 16 : scheme_len, url, (int)n, host, port);
}

static bool penalized(const tg_chain_pool_t *p, const provider_t *v) {
  return v->fails > 0 && uv_now(p->loop) - v->last_fail_ms < TG_CHAIN_PENALTY_MS;
}

/* Providers by rank: not recently failed first, then by latency, then as configured. */
static void rank(const tg_chain_pool_t *p, uint8_t order[TG_CHAIN_MAX_PROVIDERS]) {
  bool pen[TG_CHAIN_MAX_PROVIDERS];
  for (size_t i = 0; i < p->n; i++) {
    order[i] = (uint8_t)i;
    pen[i] = penalized(p, &p->prov[i]);
  }
  for (size_t i = 1; i < p->n; i++) {
    uint8_t x = order[i];
    size_t j = i;
    while (j > 0) {
      uint8_t y = order[j - 1];
      bool before = pen[x] != pen[y] ? !pen[x] : p->prov[x].ewma_ms < p->prov[y].ewma_ms;
      if (!before)
        break;
      order[j] = y;
      j--;
    }
    order[j] = x;
  }
}

static void count_error(const provider_t *v, const char *kind) {
  if (m_errors) {
    const char *labels[] = {v->label, kind};
    tg_counter_add(m_errors, labels, 1);
  }
}

static void provider_ok(provider_t *v, double ms) {
  v->ewma_ms = v->ewma_ms == 0 ? ms : (1 - EWMA_ALPHA) * v->ewma_ms + EWMA_ALPHA * ms;
  if (v->ewma_ms <= 0)
    v->ewma_ms = 0.001; /* 0 stands for "not measured yet" */
  v->fails = 0;
}

/* kind is the metric's: timeout|connect|http|rpc_error|bad_reply|wrong_chain. */
static void provider_failed(tg_chain_pool_t *p, provider_t *v, const char *kind) {
  count_error(v, kind);
  v->fails++;
  v->last_fail_ms = uv_now(p->loop);
}

static const char *error_kind(int err) {
  return err == -ETIMEDOUT   ? "timeout"
         : err == -EREMOTEIO ? "rpc_error"
         : err == -EPROTO    ? "bad_reply"
         : err == -EXDEV     ? "wrong_chain"
                             : "connect";
}

/* ---- checks ---- */

static void live_unlink(tg_chain_pool_t *p, check_t *c) {
  if (c->prev)
    c->prev->next = c->next;
  else
    p->live = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

/* Unlinks and frees c, then runs its callback. */
static void deliver(tg_chain_pool_t *p, check_t *c, int err, const tg_chain_state_t *st) {
  tg_chain_cb cb = c->cb;
  void *ud = c->ud;
  tg_chain_state_t copy = st ? *st : (tg_chain_state_t){{0}, false};
  live_unlink(p, c);
  free(c);
  cb(err, err == 0 ? &copy : NULL, ud);
}

static void on_kick(uv_timer_t *t) {
  tg_chain_pool_t *p = t->data;
  check_t *c;
  while ((c = p->ready) != NULL) {
    p->ready = c->next;
    if (p->ready == NULL)
      p->ready_tail = NULL;
    tg_chain_cb cb = c->cb;
    void *ud = c->ud;
    int err = c->err;
    tg_chain_state_t st = c->st;
    free(c);
    cb(err, err == 0 ? &st : NULL, ud);
  }
}

/* Queues c's result for the next loop turn (a result known inside tg_chain_check). */
static void defer(tg_chain_pool_t *p, check_t *c, int err, const tg_chain_state_t *st) {
  live_unlink(p, c);
  c->err = err;
  if (st)
    c->st = *st;
  c->next = NULL;
  if (p->ready_tail)
    p->ready_tail->next = c;
  else
    p->ready = c;
  p->ready_tail = c;
  uv_timer_start(&p->kick, on_kick, 0, 0);
}

static void note_failure(check_t *c, int err) {
  if (c->tried == 1)
    c->err = err;
  else if (c->err != err)
    c->err = -EHOSTUNREACH;
}

static void on_http(int err, const tg_httpc_response_t *resp, void *ud);

/* Sends c to the next provider in its order; when none is left (or sending
 * is canceled), finishes c: now, or on the next turn when inside tg_chain_check. */
static void attempt(tg_chain_pool_t *p, check_t *c, bool inside) {
  while (c->tried < c->norder) {
    provider_t *v = &p->prov[c->order[c->tried++]];
    if (c->tried > 1)
      p->stats.failovers++;
    p->stats.attempts++;
    static const tg_http_header_t hdr[] = {{"Content-Type", 12, "application/json", 16}};
    tg_httpc_request_t req = {.method = "POST",
                              .url = v->url,
                              .headers = hdr,
                              .nheaders = 1,
                              .body = c->body,
                              .body_len = c->body_len,
                              .timeout_ms = p->timeout_ms,
                              .idempotent = 1};
    c->sent_ns = uv_hrtime();
    int rc = tg_httpc_send(p->http, &req, on_http, c);
    if (rc == 0)
      return;
    if (rc == -ECANCELED) {
      c->err = -ECANCELED;
      c->tried = c->norder;
      break;
    }
    provider_failed(p, v, "connect");
    note_failure(c, -ECONNREFUSED);
  }
  if (inside)
    defer(p, c, c->err, NULL);
  else
    deliver(p, c, c->err, NULL);
}

/* The check's code for what the HTTP client returned. */
static int transport_error(int err) {
  if (err == UV_ETIMEDOUT)
    return -ETIMEDOUT;
  if (err == -EPROTO || err == -EFBIG)
    return -EPROTO;
  if (err == -ECANCELED)
    return -ECANCELED;
  return -ECONNREFUSED;
}

static void on_http(int err, const tg_httpc_response_t *resp, void *ud) {
  check_t *c = ud;
  tg_chain_pool_t *p = c->p;
  if (p == NULL) { /* the pool was freed meanwhile */
    free(c);
    return;
  }
  provider_t *v = &p->prov[c->order[c->tried - 1]];
  double ms = (double)(uv_hrtime() - c->sent_ns) / 1e6;
  tg_chain_state_t st;
  const char *kind = NULL;
  int rc;
  if (err != 0) {
    rc = transport_error(err);
    if (rc == -ECANCELED) {
      deliver(p, c, -ECANCELED, NULL);
      return;
    }
  } else {
    if (m_latency) {
      const char *labels[] = {v->label};
      tg_histogram_observe(m_latency, labels, ms / 1000);
    }
    if (resp->status != 200) {
      rc = -EREMOTEIO;
      kind = "http";
    } else {
      rc = tg_chain_parse_reply(resp->body, resp->body_len, c->chain_id, &st);
    }
  }
  if (rc == 0) {
    provider_ok(v, ms);
    cache_put(p, c->key, &st);
    deliver(p, c, 0, &st);
    return;
  }
  provider_failed(p, v, kind ? kind : error_kind(rc));
  note_failure(c, rc);
  attempt(p, c, false);
}

static int start_check(tg_chain_pool_t *p, uint64_t chain_id, const uint8_t asset[20], const uint8_t from[20],
                       const uint8_t nonce[32], bool fresh, tg_chain_cb cb, void *ud) {
  if (p == NULL || chain_id == 0 || asset == NULL || from == NULL || nonce == NULL || cb == NULL)
    return -EINVAL;
  if (p->closing)
    return -ECANCELED;
  check_t *c = calloc(1, sizeof(*c));
  if (c == NULL)
    return -ENOMEM;
  c->p = p;
  c->cb = cb;
  c->ud = ud;
  c->chain_id = chain_id;
  for (int i = 0; i < 8; i++)
    c->key[i] = (uint8_t)(chain_id >> (56 - 8 * i));
  memcpy(c->key + 8, asset, 20);
  memcpy(c->key + 28, from, 20);
  memcpy(c->key + 48, nonce, 32);
  c->next = p->live;
  if (p->live)
    p->live->prev = c;
  p->live = c;
  p->stats.checks++;
  const tg_chain_state_t *hit = fresh ? NULL : cache_get(p, c->key);
  if (hit != NULL) {
    p->stats.cache_hits++;
    defer(p, c, 0, hit);
    return 0;
  }
  c->body_len = tg_chain_request_body(asset, from, nonce, c->body);
  rank(p, c->order);
  c->norder = p->n;
  attempt(p, c, true);
  return 0;
}

int tg_chain_check(tg_chain_pool_t *p, uint64_t chain_id, const uint8_t asset[20], const uint8_t from[20],
                   const uint8_t nonce[32], tg_chain_cb cb, void *ud) {
  return start_check(p, chain_id, asset, from, nonce, false, cb, ud);
}

int tg_chain_check_fresh(tg_chain_pool_t *p, uint64_t chain_id, const uint8_t asset[20],
                         const uint8_t from[20], const uint8_t nonce[32], tg_chain_cb cb, void *ud) {
  return start_check(p, chain_id, asset, from, nonce, true, cb, ud);
}

void tg_chain_pool_stats(const tg_chain_pool_t *p, tg_chain_stats_t *out) {
  if (p && out)
    *out = p->stats;
}

/* ---- the pool ---- */

static void free_memory(tg_chain_pool_t *p) {
  for (size_t i = 0; i < p->n; i++)
    free(p->prov[i].url);
  free(p->cache);
  free(p);
}

static void on_closed(uv_handle_t *h) { free_memory(h->data); }

tg_chain_pool_t *tg_chain_pool_new(uv_loop_t *loop, tg_httpc_t *http, const char *const *urls, size_t n,
                                   const tg_chain_opts_t *o) {
  if (loop == NULL || http == NULL || urls == NULL || n == 0 || n > TG_CHAIN_MAX_PROVIDERS)
    return NULL;
  for (size_t i = 0; i < n; i++) {
    if (urls[i] == NULL || (strncmp(urls[i], "http://", 7) != 0 && strncmp(urls[i], "https://", 8) != 0))
      return NULL;
    const char *auth = strstr(urls[i], "://") + 3;
    if (memchr(auth, '@', strcspn(auth, "/?#")) != NULL) /* user info: refused by the client, and a secret */
      return NULL;
  }
  tg_chain_pool_t *p = calloc(1, sizeof(*p));
  if (p == NULL)
    return NULL;
  p->loop = loop;
  p->http = http;
  p->timeout_ms = o && o->timeout_ms ? o->timeout_ms : 2000;
  p->ttl_ms = o && o->cache_ttl_ms ? o->cache_ttl_ms : 2000;
  size_t entries = o && o->cache_entries ? o->cache_entries : 1024;
  p->nsets = 1;
  while (p->nsets * CACHE_WAYS < entries)
    p->nsets *= 2;
  p->cache = calloc(p->nsets * CACHE_WAYS, sizeof(*p->cache));
  if (p->cache == NULL)
    goto fail;
  for (; p->n < n; p->n++) {
    if ((p->prov[p->n].url = strdup(urls[p->n])) == NULL)
      goto fail;
    provider_label(urls[p->n], p->prov[p->n].label);
  }
  if (uv_timer_init(loop, &p->kick) != 0)
    goto fail;
  p->kick.data = p;
  return p;
fail:
  free_memory(p);
  return NULL;
}

void tg_chain_pool_free(tg_chain_pool_t *p) {
  if (p == NULL || p->closing)
    return;
  p->closing = true;
  uv_timer_stop(&p->kick);
  check_t *c;
  while ((c = p->ready) != NULL) {
    p->ready = c->next;
    tg_chain_cb cb = c->cb;
    void *ud = c->ud;
    free(c);
    cb(-ECANCELED, NULL, ud);
  }
  p->ready_tail = NULL;
  while ((c = p->live) != NULL) { /* each waits for the HTTP client, which frees it */
    live_unlink(p, c);
    c->p = NULL;
    c->cb(-ECANCELED, NULL, c->ud);
  }
  uv_close((uv_handle_t *)&p->kick, on_closed);
}
