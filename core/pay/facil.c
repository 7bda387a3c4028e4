#include "pay/facil.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>

#include <jansson.h>

#include "base/hex.h"
#include "base/log.h"
#include "base/metrics.h"

#define EWMA_ALPHA 0.3
#define PROBE_RETRY_MS 500 /* first re-probe of a down facilitator, doubling */
#define BACKOFF_MAX_MS 1000

typedef struct kind {
  int version;
  char scheme[16];
  char network[48];
} kind_t;

typedef struct facil {
  size_t index;
  char *url; /* base, as configured without a trailing '/' */
  char *verify_url, *settle_url, *supported_url;
  char label[96];      /* origin, for metrics */
  double lat_ms;       /* EWMA of answered requests; 0 before the first */
  double err;          /* EWMA of failures (0..1) */
  uint32_t fails;      /* consecutive failures; > 0 means down */
  uint64_t next_probe; /* uv_now() ms */
  bool probing;
  int nkinds; /* -1: not known */
  kind_t kinds[TG_FACIL_MAX_KINDS];
} facil_t;

enum call_state { ST_WAIT, ST_SEND, ST_BACKOFF };

typedef struct call call_t;
typedef struct hreq hreq_t;
TAILQ_HEAD(call_list, call);
TAILQ_HEAD(hreq_list, hreq);

struct call {
  TAILQ_ENTRY(call) link; /* in the list of its state */
  struct call_list *list; /* that list */
  bool settle;
  bool slot; /* holds one of max_verifying */
  bool has_key;
  bool maybe_sent; /* settle: an attempt may have reached a facilitator */
  uint8_t key[32];
  int version; /* of the body, 0 when not known */
  char scheme[16], network[48];
  char *body;
  size_t len;
  tg_facil_cb cb;
  void *ud;
  uint64_t start_ns;             /* uv_hrtime() */
  uint64_t deadline;             /* uv_now() ms */
  uint64_t wake;                 /* ST_WAIT: give up at; ST_BACKOFF: next attempt at */
  uint32_t round;                /* rounds over every facilitator so far */
  uint32_t tried;                /* facilitators tried in this round (bits by index) */
  tg_facil_status_t fail_status; /* what running out of attempts reports */
  tg_facil_result_t res;         /* the answer once ready; until then, the last failure */
  char traceparent[56];          /* sent with each attempt; "" for none */
};

/* One tg_httpc request. Outlives the pool when the pool is freed first:
 * p is then NULL and the answer is dropped. */
struct hreq {
  TAILQ_ENTRY(hreq) link; /* p->reqs */
  tg_facil_pool_t *p;
  call_t *call; /* NULL for a probe */
  facil_t *f;
  uint64_t sent_ns;
};

typedef struct centry centry_t;
struct centry {
  centry_t *hnext;
  TAILQ_ENTRY(centry) age; /* oldest first; the TTL is one, so also the first to expire */
  uint8_t key[32];
  uint64_t expires; /* uv_now() ms */
  const facil_t *f;
  char payer[43];
};
TAILQ_HEAD(centry_list, centry);

struct tg_facil_pool {
  char next_tp[56]; /* tg_facil_set_traceparent: for the next call only */
  uv_loop_t *loop;
  tg_httpc_t *http;
  char *tenant;
  tg_facil_opts_t o;
  facil_t f[TG_FACIL_MAX];
  size_t n;
  struct call_list wait, send, backoff, ready;
  struct hreq_list reqs;
  uint32_t verifying; /* calls holding a slot */
  uv_timer_t timer;   /* probes, waits, backoffs and ready answers */
  bool closing;
  bool http_gone; /* the client was freed under us: never touch it again */
  uint64_t rng;
  centry_t **buckets;
  size_t nbuckets, ncached;
  struct centry_list ages;
  tg_metric_t *m_verify, *m_settle, *m_errors, *m_latency;
};

/* ---- parsers ---- */

const char *tg_facil_status_name(tg_facil_status_t s) {
  switch (s) {
  case TG_FACIL_OK:
    return "ok";
  case TG_FACIL_REFUSED:
    return "refused";
  case TG_FACIL_PENDING:
    return "pending";
  case TG_FACIL_UNAVAILABLE:
    return "unavailable";
  case TG_FACIL_BAD_REPLY:
    return "bad_reply";
  case TG_FACIL_BUSY:
    return "busy";
  }
  return "unknown";
}

/* Printable ASCII of s[0..n), other bytes as '?', truncated to cap - 1. */
static void put_text(char *dst, size_t cap, const char *s, size_t n) {
  size_t i = 0;
  for (; i < n && i + 1 < cap; i++)
    dst[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
  dst[i] = '\0';
}

static bool is_hex_form(const char *s, size_t len, size_t digits) {
  if (len != 2 + digits || s[0] != '0' || s[1] != 'x')
    return false;
  for (size_t i = 2; i < len; i++)
    if (tg_hex_value(s[i]) < 0)
      return false;
  return true;
}

static int bad(tg_facil_result_t *out, const char *why) {
  out->status = TG_FACIL_BAD_REPLY;
  snprintf(out->reason, sizeof out->reason, "facilitator reply: %s", why);
  out->payer[0] = out->transaction[0] = out->network[0] = '\0';
  return -EBADMSG;
}

static json_t *load_object(const char *body, size_t len, tg_facil_result_t *out, int *rc) {
  json_error_t jerr;
  json_t *root = json_loadb(len ? body : "", len, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL) {
    *rc = bad(out, "not JSON");
    return NULL;
  }
  if (!json_is_object(root)) {
    json_decref(root);
    *rc = bad(out, "not a JSON object");
    return NULL;
  }
  return root;
}

/* 1: a well-formed payer copied; 0: none (absent, null, ""); -1: malformed. */
static int get_payer(json_t *root, tg_facil_result_t *out) {
  json_t *v = json_object_get(root, "payer");
  if (v == NULL || json_is_null(v))
    return 0;
  if (!json_is_string(v))
    return -1;
  size_t n = json_string_length(v);
  if (n == 0)
    return 0;
  if (!is_hex_form(json_string_value(v), n, 40))
    return -1;
  memcpy(out->payer, json_string_value(v), n + 1);
  return 1;
}

static void get_reason(json_t *root, const char *name, tg_facil_result_t *out) {
  json_t *v = json_object_get(root, name);
  if (json_is_string(v))
    put_text(out->reason, sizeof out->reason, json_string_value(v), json_string_length(v));
}

int tg_facil_parse_verify(const char *body, size_t len, tg_facil_result_t *out) {
  if (out == NULL || (body == NULL && len > 0))
    return -EINVAL;
  memset(out, 0, sizeof *out);
  int rc = 0;
  json_t *root = load_object(body, len, out, &rc);
  if (root == NULL)
    return rc;
  json_t *valid = json_object_get(root, "isValid");
  if (!json_is_boolean(valid)) {
    rc = bad(out, "isValid missing or not a boolean");
  } else if (json_is_true(valid)) {
    out->status = TG_FACIL_OK;
    if (get_payer(root, out) < 0)
      rc = bad(out, "payer is not an address");
  } else {
    out->status = TG_FACIL_REFUSED;
    if (get_payer(root, out) < 0)
      out->payer[0] = '\0'; /* a refusal stands whatever its payer says */
    get_reason(root, "invalidReason", out);
    if (out->reason[0] == '\0')
      snprintf(out->reason, sizeof out->reason, "isValid false");
  }
  json_decref(root);
  return rc;
}

int tg_facil_parse_settle(const char *body, size_t len, tg_facil_result_t *out) {
  if (out == NULL || (body == NULL && len > 0))
    return -EINVAL;
  memset(out, 0, sizeof *out);
  int rc = 0;
  json_t *root = load_object(body, len, out, &rc);
  if (root == NULL)
    return rc;
  json_t *success = json_object_get(root, "success");
  json_t *reason = json_object_get(root, "errorReason");
  json_t *status = json_object_get(root, "status");
  json_t *tx = json_object_get(root, "transaction");
  json_t *net = json_object_get(root, "network");
  bool pending =
      (json_is_string(reason) && strcmp(json_string_value(reason), "settlement_pending") == 0) ||
      (json_is_string(status) && strcmp(json_string_value(status), "pending") == 0);
  if (!json_is_boolean(success)) {
    rc = bad(out, "success missing or not a boolean");
    goto done;
  }
  bool ok = json_is_true(success) && !pending;
  out->status = pending ? TG_FACIL_PENDING : ok ? TG_FACIL_OK : TG_FACIL_REFUSED;
  if (tx != NULL && !json_is_null(tx) && !json_is_string(tx)) {
    if (ok || pending) {
      rc = bad(out, "transaction is not a string");
      goto done;
    }
  } else if (json_is_string(tx)) {
    const char *t = json_string_value(tx);
    size_t n = json_string_length(tx);
    if (is_hex_form(t, n, 64))
      memcpy(out->transaction, t, n + 1);
    else if (ok || (pending && n > 0)) {
      rc = bad(out, "transaction is not 0x and 64 hex digits");
      goto done;
    }
  }
  if (ok && out->transaction[0] == '\0') {
    rc = bad(out, "success without a transaction");
    goto done;
  }
  if (net != NULL && !json_is_null(net)) {
    if (!json_is_string(net)) {
      rc = bad(out, "network is not a string");
      goto done;
    }
    put_text(out->network, sizeof out->network, json_string_value(net), json_string_length(net));
  }
  if (get_payer(root, out) < 0) {
    if (ok || pending) {
      rc = bad(out, "payer is not an address");
      goto done;
    }
    out->payer[0] = '\0';
  }
  get_reason(root, "errorReason", out);
  if (out->reason[0] == '\0' && out->status == TG_FACIL_REFUSED)
    snprintf(out->reason, sizeof out->reason, "success false");
  if (out->reason[0] == '\0' && pending)
    snprintf(out->reason, sizeof out->reason, "settlement_pending");
done:
  json_decref(root);
  return rc;
}

/* ---- facilitators and ranking ---- */

static void origin_of(const char *url, char *out, size_t cap) {
  const char *s = strstr(url, "://");
  size_t n = s ? (size_t)(s - url) + 3 : 0;
  n += strcspn(url + n, "/?#");
  put_text(out, cap, url, n);
}

static bool kind_known(const call_t *c) {
  return c != NULL && c->version > 0 && c->scheme[0] && c->network[0];
}

static int supports(const facil_t *f, int version, const char *scheme, const char *network) {
  if (f->nkinds < 0)
    return -1;
  for (int i = 0; i < f->nkinds; i++)
    if (f->kinds[i].version == version && strcmp(f->kinds[i].scheme, scheme) == 0 &&
        strcmp(f->kinds[i].network, network) == 0)
      return 1;
  return 0;
}

static double score(const tg_facil_pool_t *p, const facil_t *f) {
  return f->lat_ms + f->err * (double)p->o.timeout_ms;
}

/* a before b? unsupported last, then down last, then by score, then by index. */
static bool before(const tg_facil_pool_t *p, const call_t *c, const facil_t *a, const facil_t *b) {
  if (kind_known(c)) {
    bool ua = supports(a, c->version, c->scheme, c->network) == 0;
    bool ub = supports(b, c->version, c->scheme, c->network) == 0;
    if (ua != ub)
      return ub;
  }
  if ((a->fails > 0) != (b->fails > 0))
    return b->fails > 0;
  double sa = score(p, a), sb = score(p, b);
  if (sa != sb)
    return sa < sb;
  return a->index < b->index;
}

static size_t rank(const tg_facil_pool_t *p, const call_t *c, facil_t **order) {
  for (size_t i = 0; i < p->n; i++) {
    facil_t *f = (facil_t *)&p->f[i];
    size_t j = i;
    for (; j > 0 && before(p, c, f, order[j - 1]); j--)
      order[j] = order[j - 1];
    order[j] = f;
  }
  return p->n;
}

size_t tg_facil_pool_rank(const tg_facil_pool_t *p, const char **urls, size_t n) {
  if (p == NULL || urls == NULL)
    return 0;
  facil_t *order[TG_FACIL_MAX];
  size_t m = rank(p, NULL, order);
  if (m > n)
    m = n;
  for (size_t i = 0; i < m; i++)
    urls[i] = order[i]->url;
  return m;
}

int tg_facil_pool_supports(const tg_facil_pool_t *p, size_t i, int version, const char *scheme,
                           const char *network) {
  if (p == NULL || i >= p->n || scheme == NULL || network == NULL)
    return -1;
  return supports(&p->f[i], version, scheme, network);
}

static void count_error(tg_facil_pool_t *p, const facil_t *f, const char *kind) {
  const char *labels[] = {p->tenant, f->label, kind};
  tg_counter_add(p->m_errors, labels, 1);
}

static void facil_failed(tg_facil_pool_t *p, facil_t *f, const char *kind) {
  count_error(p, f, kind);
  f->fails++;
  f->err = f->err * (1 - EWMA_ALPHA) + EWMA_ALPHA;
  uint64_t delay = PROBE_RETRY_MS;
  for (uint32_t i = 1; i < f->fails && delay < p->o.probe_interval_ms; i++)
    delay *= 2;
  if (delay > p->o.probe_interval_ms)
    delay = p->o.probe_interval_ms;
  f->next_probe = uv_now(p->loop) + delay;
}

/* An answer came (ms: how long it took; 0: a probe, latency not taken). */
static void facil_answered(tg_facil_pool_t *p, facil_t *f, double ms, bool good) {
  if (f->fails > 0 && !f->probing)
    f->next_probe = uv_now(p->loop) + p->o.probe_interval_ms;
  f->fails = 0;
  f->err = f->err * (1 - EWMA_ALPHA) + (good ? 0 : EWMA_ALPHA);
  if (ms > 0) {
    f->lat_ms = f->lat_ms == 0 ? ms : f->lat_ms * (1 - EWMA_ALPHA) + ms * EWMA_ALPHA;
    const char *labels[] = {f->label};
    tg_histogram_observe(p->m_latency, labels, ms / 1000.0);
  }
}

static void read_kinds(facil_t *f, const char *body, size_t len) {
  json_t *root = json_loadb(body, len, 0, NULL);
  json_t *kinds = json_object_get(root, "kinds");
  if (json_is_array(kinds)) {
    int n = 0;
    size_t i;
    json_t *k;
    json_array_foreach(kinds, i, k) {
      if (n == TG_FACIL_MAX_KINDS)
        break;
      json_t *v = json_object_get(k, "x402Version");
      if (!json_is_integer(v))
        v = json_object_get(k, "t402Version");
      const char *scheme = json_string_value(json_object_get(k, "scheme"));
      const char *network = json_string_value(json_object_get(k, "network"));
      if (!json_is_integer(v) || scheme == NULL || network == NULL ||
          strlen(scheme) >= sizeof f->kinds[0].scheme ||
          strlen(network) >= sizeof f->kinds[0].network || json_integer_value(v) < 1 ||
          json_integer_value(v) > 1000)
        continue;
      f->kinds[n].version = (int)json_integer_value(v);
      snprintf(f->kinds[n].scheme, sizeof f->kinds[n].scheme, "%s", scheme);
      snprintf(f->kinds[n].network, sizeof f->kinds[n].network, "%s", network);
      n++;
    }
    f->nkinds = n;
  }
  json_decref(root);
}

/* ---- the cache ---- */

static size_t cache_bucket(const tg_facil_pool_t *p, const uint8_t key[32]) {
  uint64_t h;
  memcpy(&h, key, sizeof h); /* the key is a SHA-256 already */
  return (size_t)(h & (p->nbuckets - 1));
}

static void cache_remove(tg_facil_pool_t *p, centry_t *e) {
  for (centry_t **q = &p->buckets[cache_bucket(p, e->key)]; *q; q = &(*q)->hnext)
    if (*q == e) {
      *q = e->hnext;
      break;
    }
  TAILQ_REMOVE(&p->ages, e, age);
  p->ncached--;
  free(e);
}

static centry_t *cache_get(tg_facil_pool_t *p, const uint8_t key[32]) {
  if (p->buckets == NULL)
    return NULL;
  for (centry_t *e = p->buckets[cache_bucket(p, key)]; e; e = e->hnext)
    if (memcmp(e->key, key, 32) == 0) {
      if (e->expires > uv_now(p->loop))
        return e;
      cache_remove(p, e);
      return NULL;
    }
  return NULL;
}

static void cache_put(tg_facil_pool_t *p, const uint8_t key[32], const tg_facil_result_t *r,
                      const facil_t *f) {
  if (p->buckets == NULL)
    return;
  uint64_t now = uv_now(p->loop);
  centry_t *e = cache_get(p, key);
  if (e != NULL)
    cache_remove(p, e);
  while (!TAILQ_EMPTY(&p->ages) &&
         (p->ncached >= p->o.cache_entries || TAILQ_FIRST(&p->ages)->expires <= now))
    cache_remove(p, TAILQ_FIRST(&p->ages));
  e = calloc(1, sizeof *e);
  if (e == NULL)
    return;
  memcpy(e->key, key, 32);
  e->expires = now + p->o.cache_ttl_ms;
  e->f = f;
  memcpy(e->payer, r->payer, sizeof e->payer);
  size_t b = cache_bucket(p, key);
  e->hnext = p->buckets[b];
  p->buckets[b] = e;
  TAILQ_INSERT_TAIL(&p->ages, e, age);
  p->ncached++;
}

/* ---- calls ---- */

static void rearm(tg_facil_pool_t *p);
static void attempt(tg_facil_pool_t *p, call_t *c);

static void move(call_t *c, struct call_list *to) {
  if (c->list)
    TAILQ_REMOVE(c->list, c, link);
  c->list = to;
  if (to)
    TAILQ_INSERT_TAIL(to, c, link);
}

static void observe(tg_facil_pool_t *p, const call_t *c) {
  const tg_facil_result_t *r = &c->res;
  const char *status;
  if (c->settle)
    status = r->status == TG_FACIL_OK        ? "settled"
             : r->status == TG_FACIL_REFUSED ? "refused"
             : r->status == TG_FACIL_PENDING ? "pending"
                                             : "error";
  else
    status = r->status == TG_FACIL_OK        ? (r->cached ? "cached" : "valid")
             : r->status == TG_FACIL_REFUSED ? "invalid"
                                             : "error";
  const char *labels[] = {c->network, c->scheme, status};
  tg_histogram_observe(c->settle ? p->m_settle : p->m_verify, labels,
                       (double)(uv_hrtime() - c->start_ns) / 1e9);
}

static void admit(tg_facil_pool_t *p);

/* Runs c's callback with c->res and frees c. */
static void deliver(tg_facil_pool_t *p, call_t *c) {
  move(c, NULL);
  if (c->slot) {
    c->slot = false;
    p->verifying--;
    if (!p->closing)
      admit(p);
  }
  observe(p, c);
  tg_facil_result_t r = c->res;
  tg_facil_cb cb = c->cb;
  void *ud = c->ud;
  free(c->body);
  free(c);
  cb(&r, ud);
}

/* The answer is known: it is delivered from the timer (never inside the
 * caller's own call). */
static void ready(tg_facil_pool_t *p, call_t *c) {
  move(c, &p->ready);
  rearm(p);
}

static void finish(tg_facil_pool_t *p, call_t *c, tg_facil_status_t st, const char *fmt,
                   const char *what) {
  c->res.status = st;
  if (fmt)
    snprintf(c->res.reason, sizeof c->res.reason, fmt, what);
  ready(p, c);
}

static bool cache_answer(tg_facil_pool_t *p, call_t *c) {
  if (!c->has_key || c->settle)
    return false;
  centry_t *e = cache_get(p, c->key);
  if (e == NULL)
    return false;
  memset(&c->res, 0, sizeof c->res);
  c->res.status = TG_FACIL_OK;
  c->res.cached = true;
  c->res.facilitator = e->f->url;
  memcpy(c->res.payer, e->payer, sizeof c->res.payer);
  ready(p, c);
  return true;
}

/* Gives free slots to waiting verifications, oldest first. */
static void admit(tg_facil_pool_t *p) {
  call_t *c;
  while ((c = TAILQ_FIRST(&p->wait)) != NULL && p->verifying < p->o.max_verifying) {
    if (cache_answer(p, c))
      continue;
    c->slot = true;
    p->verifying++;
    attempt(p, c);
  }
}

static uint64_t next_rand(tg_facil_pool_t *p) {
  p->rng ^= p->rng << 13; /* xorshift64: jitter only */
  p->rng ^= p->rng >> 7;
  p->rng ^= p->rng << 17;
  return p->rng;
}

static void on_http(int err, const tg_httpc_response_t *resp, void *ud);

/* Sends c to the best facilitator not tried in this round, or backs off, or
 * gives up. */
static void attempt(tg_facil_pool_t *p, call_t *c) {
  uint64_t now = uv_now(p->loop);
  for (;;) {
    if (c->res.attempts >= p->o.max_attempts)
      break;
    if (p->http_gone) {
      snprintf(c->res.reason, sizeof c->res.reason, "the HTTP client is closed");
      break;
    }
    if (now >= c->deadline) {
      if (c->res.reason[0] == '\0')
        snprintf(c->res.reason, sizeof c->res.reason, "deadline passed");
      break;
    }
    facil_t *order[TG_FACIL_MAX], *f = NULL;
    size_t n = rank(p, c, order);
    for (size_t i = 0; i < n && f == NULL; i++)
      if (!(c->tried & (1u << order[i]->index)))
        f = order[i];
    if (f == NULL) {
      uint64_t delay = p->o.backoff_ms;
      for (uint32_t i = 0; i < c->round && delay < BACKOFF_MAX_MS; i++)
        delay *= 2;
      if (delay > BACKOFF_MAX_MS)
        delay = BACKOFF_MAX_MS;
      delay = delay / 2 + next_rand(p) % (delay / 2 + 1);
      c->round++;
      c->tried = 0;
      if (now + delay >= c->deadline)
        break;
      c->wake = now + delay;
      move(c, &p->backoff);
      rearm(p);
      return;
    }
    c->tried |= 1u << f->index;
    hreq_t *h = calloc(1, sizeof *h);
    if (h == NULL) {
      finish(p, c, TG_FACIL_UNAVAILABLE, "%s", "out of memory");
      return;
    }
    h->p = p;
    h->call = c;
    h->f = f;
    h->sent_ns = uv_hrtime();
    uint64_t left = c->deadline - now;
    tg_http_header_t hdrs[] = {{"Content-Type", 12, "application/json", 16},
                               {"Accept", 6, "application/json", 16},
                               {"traceparent", 11, c->traceparent, strlen(c->traceparent)}};
    tg_httpc_request_t req = {.method = "POST",
                              .url = c->settle ? f->settle_url : f->verify_url,
                              .headers = hdrs,
                              .nheaders = c->traceparent[0] ? 3 : 2,
                              .body = c->body,
                              .body_len = c->len,
                              .timeout_ms =
                                  (uint32_t)(left < p->o.timeout_ms ? left : p->o.timeout_ms),
                              .idempotent = 1}; /* see the header: both are safe to repeat */
    int rc = tg_httpc_send(p->http, &req, on_http, h);
    if (rc != 0) {
      free(h);
      snprintf(c->res.reason, sizeof c->res.reason, "facilitator %.60s: %.50s", f->label,
               tg_httpc_strerror(rc));
      if (rc == -ECANCELED)
        p->http_gone = true;
      if (rc == -ECANCELED || rc == -ENOMEM)
        break;
      continue; /* a URL the client refuses: the next one */
    }
    TAILQ_INSERT_TAIL(&p->reqs, h, link);
    c->res.attempts++;
    c->res.facilitator = f->url;
    move(c, &p->send);
    return;
  }
  c->res.status = c->fail_status;
  c->res.maybe_settled = c->settle && c->maybe_sent;
  ready(p, c);
}

/* A retryable failure of c at f: the reason is kept for the end. */
static void retry(tg_facil_pool_t *p, call_t *c, facil_t *f, const char *kind, const char *what,
                  int code, tg_facil_status_t st) {
  facil_failed(p, f, kind);
  if (code)
    snprintf(c->res.reason, sizeof c->res.reason, "facilitator %.60s: %.30s %d", f->label, what,
             code);
  else
    snprintf(c->res.reason, sizeof c->res.reason, "facilitator %.60s: %.50s", f->label, what);
  c->fail_status = st;
  attempt(p, c);
}

static bool never_sent(int err) {
  return err == UV_ECONNREFUSED || err == UV_ENETUNREACH || err == UV_EHOSTUNREACH ||
         err == UV_EAI_NONAME || err == UV_EAI_AGAIN || err == UV_EAI_FAIL ||
         err == UV_EADDRNOTAVAIL;
}

static void call_answer(tg_facil_pool_t *p, call_t *c, facil_t *f, int err,
                        const tg_httpc_response_t *resp, double ms) {
  if (err == -ECANCELED) {
    p->http_gone = true;
    c->res.maybe_settled = c->settle;
    finish(p, c, TG_FACIL_UNAVAILABLE, "%s", "canceled: the HTTP client is closed");
    return;
  }
  if (err == -EBUSY) {
    /* Our own client's queue for that origin is full: not the facilitator's
     * fault, so no penalty; the next facilitator may have room. */
    snprintf(c->res.reason, sizeof c->res.reason, "facilitator %.60s: %.50s", f->label,
             tg_httpc_strerror(err));
    attempt(p, c);
    return;
  }
  if (err != 0) {
    if (c->settle && !never_sent(err))
      c->maybe_sent = true;
    if (err == -EPROTO || err == -EFBIG)
      retry(p, c, f, "bad_reply", tg_httpc_strerror(err), 0, TG_FACIL_BAD_REPLY);
    else
      retry(p, c, f, err == UV_ETIMEDOUT ? "timeout" : "connect", tg_httpc_strerror(err), 0,
            TG_FACIL_UNAVAILABLE);
    return;
  }
  c->res.http_status = resp->status;
  if (resp->status >= 300 && resp->status < 400) {
    facil_failed(p, f, "redirect");
    finish(p, c, TG_FACIL_BAD_REPLY, "facilitator answered a redirect (%s): not followed",
           tg_httpc_header(resp, "location") ? "with Location" : "no Location");
    return;
  }
  if (resp->status == 429 || resp->status >= 500) {
    if (c->settle && resp->status != 429)
      c->maybe_sent = true;
    retry(p, c, f, resp->status == 429 ? "status_4xx" : "status_5xx", "answered", resp->status,
          TG_FACIL_UNAVAILABLE);
    return;
  }
  tg_facil_result_t r;
  int rc = c->settle ? tg_facil_parse_settle(resp->body, resp->body_len, &r)
                     : tg_facil_parse_verify(resp->body, resp->body_len, &r);
  uint32_t attempts = c->res.attempts;
  if (resp->status < 200 || resp->status >= 300) {
    /* Another 4xx: final. A refusal in proper form is still a refusal
     * (some facilitators answer isValid:false with a 400). */
    bool refusal = rc == 0 && r.status == TG_FACIL_REFUSED;
    facil_answered(p, f, ms, refusal);
    if (refusal) {
      c->res = r;
    } else {
      count_error(p, f, "status_4xx");
      c->res.status = TG_FACIL_BAD_REPLY;
      snprintf(c->res.reason, sizeof c->res.reason, "facilitator answered %d", resp->status);
    }
  } else if (rc != 0) {
    facil_failed(p, f, "bad_reply");
    c->res = r;
  } else {
    facil_answered(p, f, ms, true);
    c->res = r;
    if (!c->settle && r.status == TG_FACIL_OK && c->has_key && p->o.cache_ttl_ms > 0)
      cache_put(p, c->key, &r, f);
  }
  c->res.attempts = attempts;
  c->res.http_status = resp->status;
  c->res.facilitator = f->url;
  if (c->settle && c->maybe_sent && c->res.status == TG_FACIL_REFUSED) {
    char why[sizeof c->res.reason];
    memcpy(why, c->res.reason, sizeof why);
    c->res.status = TG_FACIL_UNAVAILABLE;
    c->res.maybe_settled = true;
    snprintf(c->res.reason, sizeof c->res.reason,
             "refused after an attempt that may have settled: %.78s", why);
  }
  deliver(p, c);
}

static void probe_answer(tg_facil_pool_t *p, facil_t *f, int err, const tg_httpc_response_t *resp) {
  f->probing = false;
  f->next_probe = uv_now(p->loop) + p->o.probe_interval_ms;
  if (err == -ECANCELED)
    p->http_gone = true;
  else if (err != 0)
    facil_failed(p, f,
                 err == UV_ETIMEDOUT                 ? "timeout"
                 : (err == -EPROTO || err == -EFBIG) ? "bad_reply"
                                                     : "connect");
  else if (resp->status >= 300 && resp->status < 400)
    facil_failed(p, f, "redirect");
  else if (resp->status >= 500 || resp->status == 429)
    facil_failed(p, f, resp->status == 429 ? "status_4xx" : "status_5xx");
  else {
    if (resp->status >= 200 && resp->status < 300)
      read_kinds(f, resp->body, resp->body_len);
    f->fails = 0;
    f->err *= 1 - EWMA_ALPHA;
  }
}

static void on_http(int err, const tg_httpc_response_t *resp, void *ud) {
  hreq_t *h = ud;
  tg_facil_pool_t *p = h->p;
  call_t *c = h->call;
  facil_t *f = h->f;
  double ms = (double)(uv_hrtime() - h->sent_ns) / 1e6;
  if (p != NULL)
    TAILQ_REMOVE(&p->reqs, h, link);
  free(h);
  if (p == NULL || p->closing)
    return;
  if (c == NULL)
    probe_answer(p, f, err, resp);
  else
    call_answer(p, c, f, err, resp, ms > 0 ? ms : 0.001);
  if (!p->closing)
    rearm(p);
}

static void probe(tg_facil_pool_t *p, facil_t *f) {
  if (p->http_gone)
    return;
  hreq_t *h = calloc(1, sizeof *h);
  if (h == NULL)
    return;
  h->p = p;
  h->f = f;
  h->sent_ns = uv_hrtime();
  tg_httpc_request_t req = {
      .method = "GET", .url = f->supported_url, .timeout_ms = p->o.timeout_ms};
  if (tg_httpc_send(p->http, &req, on_http, h) != 0) {
    free(h);
    f->next_probe = uv_now(p->loop) + p->o.probe_interval_ms;
    return;
  }
  TAILQ_INSERT_TAIL(&p->reqs, h, link);
  f->probing = true;
}

static void on_timer(uv_timer_t *t) {
  tg_facil_pool_t *p = t->data;
  uint64_t now = uv_now(p->loop);
  call_t *c;
  while ((c = TAILQ_FIRST(&p->wait)) != NULL && c->wake <= now)
    finish(p, c, TG_FACIL_BUSY, "%s", "too many verifications in flight");
  for (call_t *next, *b = TAILQ_FIRST(&p->backoff); b; b = next) {
    next = TAILQ_NEXT(b, link);
    if (b->wake <= now)
      attempt(p, b);
  }
  for (size_t i = 0; i < p->n; i++)
    if (!p->f[i].probing && p->f[i].next_probe <= now)
      probe(p, &p->f[i]);
  /* Only what is ready now: an answer made ready by a callback waits a turn. */
  size_t k = 0;
  TAILQ_FOREACH(c, &p->ready, link)
  k++;
  while (k-- > 0 && (c = TAILQ_FIRST(&p->ready)) != NULL) {
    deliver(p, c);
    if (p->closing)
      return;
  }
  rearm(p);
}

static void rearm(tg_facil_pool_t *p) {
  if (p->closing)
    return;
  uint64_t now = uv_now(p->loop), due = UINT64_MAX;
  if (!TAILQ_EMPTY(&p->ready))
    due = now;
  call_t *c = TAILQ_FIRST(&p->wait);
  if (c && c->wake < due)
    due = c->wake;
  TAILQ_FOREACH(c, &p->backoff, link)
  if (c->wake < due)
    due = c->wake;
  for (size_t i = 0; i < p->n && !p->http_gone; i++)
    if (!p->f[i].probing && p->f[i].next_probe < due)
      due = p->f[i].next_probe;
  if (due == UINT64_MAX)
    uv_timer_stop(&p->timer);
  else
    uv_timer_start(&p->timer, on_timer, due > now ? due - now : 0, 0);
}

/* The kind a body asks for, when it says. */
static void read_call_kind(call_t *c) {
  json_t *root = json_loadb(c->body, c->len, 0, NULL);
  json_t *v = json_object_get(root, "x402Version");
  if (!json_is_integer(v))
    v = json_object_get(root, "t402Version");
  json_t *req = json_object_get(root, "paymentRequirements");
  const char *scheme = json_string_value(json_object_get(req, "scheme"));
  const char *network = json_string_value(json_object_get(req, "network"));
  if (json_is_integer(v) && json_integer_value(v) > 0 && json_integer_value(v) <= 1000)
    c->version = (int)json_integer_value(v);
  if (scheme && strlen(scheme) < sizeof c->scheme)
    memcpy(c->scheme, scheme, strlen(scheme) + 1);
  if (network && strlen(network) < sizeof c->network)
    memcpy(c->network, network, strlen(network) + 1);
  json_decref(root);
}

static int start(tg_facil_pool_t *p, bool settle, const uint8_t *key, const char *body, size_t len,
                 tg_facil_cb cb, void *ud) {
  if (p == NULL || body == NULL || len == 0 || cb == NULL)
    return -EINVAL;
  if (p->closing)
    return -ECANCELED;
  call_t *c = calloc(1, sizeof *c);
  if (c == NULL || (c->body = malloc(len)) == NULL) {
    free(c);
    return -ENOMEM;
  }
  memcpy(c->body, body, len);
  c->len = len;
  memcpy(c->traceparent, p->next_tp, sizeof c->traceparent);
  p->next_tp[0] = '\0';
  c->settle = settle;
  c->cb = cb;
  c->ud = ud;
  c->start_ns = uv_hrtime();
  uint64_t now = uv_now(p->loop);
  c->deadline = now + p->o.deadline_ms;
  c->fail_status = TG_FACIL_UNAVAILABLE;
  if (key != NULL) {
    memcpy(c->key, key, 32);
    c->has_key = true;
  }
  read_call_kind(c);
  if (settle) {
    attempt(p, c);
  } else if (cache_answer(p, c)) {
  } else if (p->verifying < p->o.max_verifying && TAILQ_EMPTY(&p->wait)) {
    c->slot = true;
    p->verifying++;
    attempt(p, c);
  } else {
    c->wake = now + p->o.verify_wait_ms;
    if (c->wake > c->deadline)
      c->wake = c->deadline;
    move(c, &p->wait);
    rearm(p);
  }
  return 0;
}

int tg_facil_verify(tg_facil_pool_t *p, const uint8_t key[32], const char *body, size_t len,
                    tg_facil_cb cb, void *ud) {
  return start(p, false, key, body, len, cb, ud);
}

int tg_facil_settle(tg_facil_pool_t *p, const char *body, size_t len, tg_facil_cb cb, void *ud) {
  return start(p, true, NULL, body, len, cb, ud);
}

void tg_facil_set_traceparent(tg_facil_pool_t *p, const char *traceparent) {
  if (p == NULL)
    return;
  if (traceparent == NULL || strlen(traceparent) >= sizeof p->next_tp)
    p->next_tp[0] = '\0';
  else
    memcpy(p->next_tp, traceparent, strlen(traceparent) + 1);
}

/* ---- the pool ---- */

static char *join(const char *base, size_t n, const char *path) {
  size_t m = strlen(path);
  char *s = malloc(n + m + 1);
  if (s) {
    memcpy(s, base, n);
    memcpy(s + n, path, m + 1);
  }
  return s;
}

static void pool_release(tg_facil_pool_t *p) {
  for (size_t i = 0; i < p->n; i++) {
    free(p->f[i].url);
    free(p->f[i].verify_url);
    free(p->f[i].settle_url);
    free(p->f[i].supported_url);
  }
  while (!TAILQ_EMPTY(&p->ages))
    cache_remove(p, TAILQ_FIRST(&p->ages));
  free(p->buckets);
  free(p->tenant);
  free(p);
}

static void on_timer_closed(uv_handle_t *h) { pool_release(h->data); }

tg_facil_pool_t *tg_facil_pool_new(uv_loop_t *loop, tg_httpc_t *http, const char *tenant,
                                   const char *const *urls, size_t n, const tg_facil_opts_t *o) {
  if (loop == NULL || http == NULL || tenant == NULL || urls == NULL || n == 0 || n > TG_FACIL_MAX)
    return NULL;
  tg_facil_pool_t *p = calloc(1, sizeof *p);
  if (p == NULL)
    return NULL;
  p->loop = loop;
  p->http = http;
  TAILQ_INIT(&p->wait);
  TAILQ_INIT(&p->send);
  TAILQ_INIT(&p->backoff);
  TAILQ_INIT(&p->ready);
  TAILQ_INIT(&p->reqs);
  TAILQ_INIT(&p->ages);
  if (o)
    p->o = *o;
  if (p->o.timeout_ms == 0)
    p->o.timeout_ms = 5000;
  if (p->o.deadline_ms == 0)
    p->o.deadline_ms = 2 * p->o.timeout_ms;
  if (p->o.max_verifying == 0)
    p->o.max_verifying = 256;
  if (p->o.cache_entries == 0)
    p->o.cache_entries = 4096;
  if (p->o.probe_interval_ms == 0)
    p->o.probe_interval_ms = 30000;
  if (p->o.max_attempts == 0)
    p->o.max_attempts = (uint32_t)n + 2;
  if (p->o.backoff_ms == 0)
    p->o.backoff_ms = 50;
  p->rng = uv_hrtime() ^ (uint64_t)(uintptr_t)p ^ 0x9e3779b97f4a7c15u;
  if (p->rng == 0)
    p->rng = 1;
  p->tenant = strdup(tenant);
  if (p->tenant == NULL)
    goto fail;
  p->n = n;
  for (size_t i = 0; i < n; i++) {
    facil_t *f = &p->f[i];
    f->index = i;
    f->nkinds = -1;
    const char *u = urls[i];
    if (u == NULL || (strncmp(u, "http://", 7) != 0 && strncmp(u, "https://", 8) != 0) ||
        strpbrk(u, "?# \r\n") != NULL)
      goto fail;
    size_t len = strlen(u);
    while (len > 0 && u[len - 1] == '/')
      len--;
    f->url = join(u, len, "");
    f->verify_url = join(u, len, "/verify");
    f->settle_url = join(u, len, "/settle");
    f->supported_url = join(u, len, "/supported");
    if (!f->url || !f->verify_url || !f->settle_url || !f->supported_url)
      goto fail;
    origin_of(f->url, f->label, sizeof f->label);
  }
  if (p->o.cache_ttl_ms > 0) {
    p->nbuckets = 16;
    while (p->nbuckets < p->o.cache_entries && p->nbuckets < ((size_t)1 << 30))
      p->nbuckets *= 2;
    p->buckets = calloc(p->nbuckets, sizeof *p->buckets);
    if (p->buckets == NULL)
      goto fail;
  }
  static const char *const vl[] = {"network", "scheme", "status", NULL};
  static const char *const el[] = {"tenant_id", "facilitator", "kind", NULL};
  static const char *const ll[] = {"facilitator", NULL};
  p->m_verify =
      tg_metric_new(TG_METRIC_HISTOGRAM, "t402_verification_duration_seconds",
                    TG_FACIL_VERIFY_HELP,
                    vl, NULL, 0);
  static const char *const sl[] = {"network", "scheme", "status", NULL};
  p->m_settle =
      tg_metric_new(TG_METRIC_HISTOGRAM, "t402_settlement_duration_seconds",
                    "Time to settle an x402/t402 payment with a facilitator, by network, scheme "
                    "and outcome (settled, refused, pending, error).",
                    sl, NULL, 0);
  p->m_errors =
      tg_metric_new(TG_METRIC_COUNTER, "t402_facilitator_errors_total",
                    "Failed facilitator requests and probes by tenant, facilitator origin and kind "
                    "(connect, timeout, status_5xx, status_4xx, redirect, bad_reply).",
                    el, NULL, 0);
  p->m_latency =
      tg_metric_new(TG_METRIC_HISTOGRAM, "t402_facilitator_latency_seconds",
                    "Time a facilitator took to answer a verify or settle request.", ll, NULL, 0);
  if (uv_timer_init(loop, &p->timer) != 0)
    goto fail;
  p->timer.data = p;
  rearm(p); /* next_probe 0: probe each at once */
  return p;
fail:
  pool_release(p);
  return NULL;
}

static void cancel(tg_facil_pool_t *p, struct call_list *l) {
  call_t *c;
  while ((c = TAILQ_FIRST(l)) != NULL) {
    c->res.status = TG_FACIL_UNAVAILABLE;
    c->res.maybe_settled = c->settle && (c->maybe_sent || l == &p->send);
    snprintf(c->res.reason, sizeof c->res.reason, "canceled: the facilitator pool is closing");
    deliver(p, c);
  }
}

void tg_facil_pool_free(tg_facil_pool_t *p) {
  if (p == NULL || p->closing)
    return;
  p->closing = true;
  uv_timer_stop(&p->timer);
  hreq_t *h;
  while ((h = TAILQ_FIRST(&p->reqs)) != NULL) {
    TAILQ_REMOVE(&p->reqs, h, link);
    h->p = NULL;
  }
  call_t *c;
  while ((c = TAILQ_FIRST(&p->ready)) != NULL)
    deliver(p, c);
  cancel(p, &p->send);
  cancel(p, &p->backoff);
  cancel(p, &p->wait);
  uv_close((uv_handle_t *)&p->timer, on_timer_closed);
}
