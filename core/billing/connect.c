#include "billing/billing.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "base/hash.h"
#include "base/log.h"
#include "base/metrics.h"
#include "billing/v1/billing.pb-c.h"

/* The publisher's billing service over Connect (billing.h). Like the redis
 * adapter, the hold string handed to the pipeline is the service's hold id;
 * the transaction id (billing_id) and amount that capture and release need
 * stay here in a map from hold id. A captured hold stays known (up to
 * KEEP_CAPTURED of them, oldest dropped first) so that a retried capture
 * reaches the service, which answers already_done: idempotency is the
 * service's, keyed by billing_id, not ours. */

#define BUCKETS 1024
#define KEEP_CAPTURED 4096
#define LATE_GRACE_MS 2000 /* how long past the deadline a late answer is still awaited (to release it) */

enum { CALL_AUTHORIZE, CALL_CAPTURE, CALL_RELEASE, CALL_LATE_RELEASE, CALL_HEALTH };
enum { CIRCUIT_CLOSED = 0, CIRCUIT_OPEN = 1, CIRCUIT_HALF_OPEN = 2 };

typedef struct entry entry_t;
struct entry {
  entry_t *next;     /* in its bucket */
  entry_t *fifo;     /* captured: the next younger captured entry */
  bool captured;
  int64_t amount;
  char hold[TG_BILLING_HOLD_MAX];
  char txid[];
};

typedef struct connect_billing connect_billing_t;

/* One HTTP call. It outlives the adapter when the adapter is freed first
 * (cb NULL then): the client's callback only cleans up. */
typedef struct call call_t;
struct call {
  call_t *prev, *next; /* in cb->calls */
  connect_billing_t *cb;
  int kind;
  tg_billing_cb done;
  void *arg;
  bool answered;        /* the caller has its result (deadline, or the adapter was freed) */
  bool probe;           /* the half-open probe */
  uint64_t deadline_ms; /* authorize: uv_now() instant */
  uint64_t start_ns;
  int64_t amount;
  char ref_red[16];
  char txid[128];
  char hold[TG_BILLING_HOLD_MAX];
};

struct connect_billing {
  tg_billing_t base;
  tg_httpc_t *http;
  char *tenant, *base_url, *auth;
  uint32_t deadline_ms, call_timeout_ms, breaker_failures, cooldown_ms;
  int circuit;
  uint32_t failures;       /* consecutive */
  uint64_t open_until;     /* uv_now() instant */
  bool probe_in_flight;
  bool closing;            /* freed; the memory goes when the timer has closed */
  uv_timer_t deadline_timer;
  call_t *calls;
  entry_t *map[BUCKETS];
  entry_t *cap_head, *cap_tail; /* captured entries, oldest first */
  size_t ncaptured;
  tg_metric_t *m_total, *m_duration, *m_timeout, *m_circuit;
};

static size_t bucket(const char *hold) { return (size_t)(tg_fnv1a_str(hold) % BUCKETS); }

static entry_t *map_find(connect_billing_t *b, const char *hold) {
  if (hold == NULL)
    return NULL;
  for (entry_t *e = b->map[bucket(hold)]; e; e = e->next)
    if (strcmp(e->hold, hold) == 0)
      return e;
  return NULL;
}

static void map_remove(connect_billing_t *b, entry_t *e) {
  for (entry_t **p = &b->map[bucket(e->hold)]; *p; p = &(*p)->next)
    if (*p == e) {
      *p = e->next;
      return;
    }
}

static void map_put(connect_billing_t *b, entry_t *e) {
  size_t i = bucket(e->hold);
  e->next = b->map[i];
  b->map[i] = e;
}

static void mark_captured(connect_billing_t *b, entry_t *e) {
  if (e->captured)
    return;
  e->captured = true;
  e->fifo = NULL;
  if (b->cap_tail)
    b->cap_tail->fifo = e;
  else
    b->cap_head = e;
  b->cap_tail = e;
  if (++b->ncaptured > KEEP_CAPTURED) {
    entry_t *old = b->cap_head;
    b->cap_head = old->fifo;
    if (b->cap_head == NULL)
      b->cap_tail = NULL;
    b->ncaptured--;
    map_remove(b, old);
    free(old);
  }
}

static void set_circuit(connect_billing_t *b, int state) {
  b->circuit = state;
  const char *l[] = {b->tenant};
  tg_gauge_set(b->m_circuit, l, state);
}

/* Whether a call may go out now; the half-open probe is marked. */
static bool breaker_admit(connect_billing_t *b, bool *probe) {
  *probe = false;
  if (b->circuit == CIRCUIT_CLOSED)
    return true;
  if (b->circuit == CIRCUIT_OPEN) {
    if (uv_now(b->base.loop) < b->open_until)
      return false;
    set_circuit(b, CIRCUIT_HALF_OPEN);
    tg_log(TG_LOG_INFO, "billing connect: circuit half-open, probing", "tenant", b->tenant, NULL);
  }
  if (b->probe_in_flight)
    return false;
  b->probe_in_flight = true;
  *probe = true;
  return true;
}

static void breaker_record(connect_billing_t *b, bool probe, bool ok) {
  if (probe)
    b->probe_in_flight = false;
  if (ok) {
    b->failures = 0;
    if (b->circuit != CIRCUIT_CLOSED) {
      set_circuit(b, CIRCUIT_CLOSED);
      tg_log(TG_LOG_INFO, "billing connect: circuit closed", "tenant", b->tenant, NULL);
    }
    return;
  }
  b->failures++;
  if ((b->circuit == CIRCUIT_HALF_OPEN && probe) ||
      (b->circuit == CIRCUIT_CLOSED && b->failures >= b->breaker_failures)) {
    b->open_until = uv_now(b->base.loop) + b->cooldown_ms;
    set_circuit(b, CIRCUIT_OPEN);
    char n[16];
    snprintf(n, sizeof n, "%" PRIu32, b->failures);
    tg_log(TG_LOG_WARN, "billing connect: circuit open", "tenant", b->tenant, "failures", n, NULL);
  }
}

static const char *result_name(tg_billing_status_t s) {
  switch (s) {
  case TG_BILLING_APPROVED:
    return "approved";
  case TG_BILLING_DECLINED:
    return "declined";
  case TG_BILLING_TIMEOUT:
    return "timeout";
  default:
    return "unavailable";
  }
}

static void count_authorize(connect_billing_t *b, const call_t *c, const tg_billing_result_t *r) {
  const char *l[] = {b->tenant, result_name(r->status)};
  tg_counter_add(b->m_total, l, 1);
  if (r->status == TG_BILLING_TIMEOUT)
    tg_counter_add(b->m_timeout, l, 1);
  if (c != NULL) {
    const char *d[] = {b->tenant, r->status == TG_BILLING_APPROVED ? "true" : "false"};
    tg_histogram_observe(b->m_duration, d, (double)(uv_hrtime() - c->start_ns) / 1e9);
  }
}

static void answer_now(connect_billing_t *b, int kind, tg_billing_cb cb, void *arg, tg_billing_status_t st,
                       const char *detail) {
  tg_billing_result_t r = {.status = st, .available = -1};
  snprintf(r.detail, sizeof r.detail, "%s", detail);
  if (kind == CALL_AUTHORIZE)
    count_authorize(b, NULL, &r);
  cb(arg, &r);
}

static void call_unlink(call_t *c) {
  if (c->cb == NULL)
    return;
  if (c->prev)
    c->prev->next = c->next;
  else
    c->cb->calls = c->next;
  if (c->next)
    c->next->prev = c->prev;
  c->prev = c->next = NULL;
}

static void deadline_timer_cb(uv_timer_t *t);

static void arm_deadline(connect_billing_t *b) {
  uint64_t first = 0;
  for (call_t *c = b->calls; c; c = c->next)
    if (c->kind == CALL_AUTHORIZE && !c->answered && (first == 0 || c->deadline_ms < first))
      first = c->deadline_ms;
  if (first == 0) {
    uv_timer_stop(&b->deadline_timer);
    return;
  }
  uint64_t now = uv_now(b->base.loop);
  uv_timer_start(&b->deadline_timer, deadline_timer_cb, first > now ? first - now : 0, 0);
}

/* The caller hears TIMEOUT now; the call stays in flight so that a late
 * approval can be released (on_response). */
static void deadline_timer_cb(uv_timer_t *t) {
  connect_billing_t *b = t->data;
  uint64_t now = uv_now(b->base.loop);
  for (call_t *c = b->calls; c; c = c->next)
    if (c->kind == CALL_AUTHORIZE && !c->answered && c->deadline_ms <= now) {
      c->answered = true;
      tg_billing_result_t r = {.status = TG_BILLING_TIMEOUT, .available = -1};
      snprintf(r.detail, sizeof r.detail, "the billing service did not answer by the deadline");
      breaker_record(b, c->probe, false);
      c->probe = false;
      count_authorize(b, c, &r);
      c->done(c->arg, &r); /* may free the adapter: then the list is empty, b lives until the timer closed */
    }
  if (!b->closing)
    arm_deadline(b);
}

static void on_response(int err, const tg_httpc_response_t *resp, void *ud);

static call_t *call_new(connect_billing_t *b, int kind, tg_billing_cb done, void *arg) {
  call_t *c = calloc(1, sizeof(*c));
  if (c == NULL)
    return NULL;
  c->cb = b;
  c->kind = kind;
  c->done = done;
  c->arg = arg;
  c->start_ns = uv_hrtime();
  c->next = b->calls;
  if (b->calls)
    b->calls->prev = c;
  b->calls = c;
  return c;
}

static const char *method_of(int kind) {
  switch (kind) {
  case CALL_AUTHORIZE:
    return "Authorize";
  case CALL_CAPTURE:
    return "Capture";
  case CALL_HEALTH:
    return "Health";
  default:
    return "Release";
  }
}

/* POSTs the packed message; 0 or a negative errno (the call then is not in
 * flight and its owner frees it). */
static int post(connect_billing_t *b, call_t *c, const ProtobufCMessage *msg, uint32_t timeout_ms,
                uint32_t connect_timeout_ms, const char *traceparent) {
  size_t len = protobuf_c_message_get_packed_size(msg);
  uint8_t *body = malloc(len ? len : 1);
  if (body == NULL)
    return -ENOMEM;
  protobuf_c_message_pack(msg, body);
  size_t ul = strlen(b->base_url) + 64;
  char *url = malloc(ul);
  if (url == NULL) {
    free(body);
    return -ENOMEM;
  }
  snprintf(url, ul, "%s/billing.v1.BillingService/%s", b->base_url, method_of(c->kind));
  char tmo[24];
  snprintf(tmo, sizeof tmo, "%" PRIu32, connect_timeout_ms ? connect_timeout_ms : 1);
  tg_http_header_t h[5] = {
      {"Content-Type", 12, "application/proto", 17},
      {"Connect-Protocol-Version", 24, "1", 1},
      {"Connect-Timeout-Ms", 18, tmo, strlen(tmo)},
      {"Authorization", 13, b->auth, strlen(b->auth)},
      {"traceparent", 11, traceparent, traceparent ? strlen(traceparent) : 0},
  };
  size_t nh = traceparent && traceparent[0] ? 5 : 4;
  /* Authorize is keyed by transaction_id, capture and release by billing_id:
   * all safe to send twice. */
  tg_httpc_request_t req = {.method = "POST",
                            .url = url,
                            .headers = h,
                            .nheaders = nh,
                            .body = body,
                            .body_len = len,
                            .timeout_ms = timeout_ms,
                            .idempotent = 1};
  int rc = tg_httpc_send(b->http, &req, on_response, c);
  free(url);
  free(body);
  return rc;
}

/* The Connect error of a non-200 answer, for the detail: "unavailable: ...". */
static void connect_error(const tg_httpc_response_t *resp, char *out, size_t n) {
  json_t *j = json_loadb(resp->body, resp->body_len, 0, NULL);
  const char *code = j ? json_string_value(json_object_get(j, "code")) : NULL;
  const char *msg = j ? json_string_value(json_object_get(j, "message")) : NULL;
  if (code)
    snprintf(out, n, "the billing service answered %s: %.120s", code, msg ? msg : "");
  else
    snprintf(out, n, "the billing service answered HTTP %d", resp->status);
  json_decref(j);
}

static void late_release(connect_billing_t *b, const char *hold, const char *txid, int64_t amount);

static void on_authorize(connect_billing_t *b, call_t *c, int err, const tg_httpc_response_t *resp) {
  tg_billing_result_t r = {.status = TG_BILLING_UNAVAILABLE, .available = -1};
  Billing__V1__AuthorizeResponse *m = NULL;
  if (err != 0)
    snprintf(r.detail, sizeof r.detail, "the billing service failed (%s)", tg_httpc_strerror(err));
  else if (resp->status != 200)
    connect_error(resp, r.detail, sizeof r.detail);
  else if ((m = billing__v1__authorize_response__unpack(NULL, resp->body_len, (const uint8_t *)resp->body)) ==
           NULL)
    snprintf(r.detail, sizeof r.detail, "the billing service sent a body that is not an AuthorizeResponse");
  else if (m->approved && (m->hold_id[0] == '\0' || strlen(m->hold_id) >= TG_BILLING_HOLD_MAX))
    snprintf(r.detail, sizeof r.detail, "the billing service approved without a usable hold id");
  else if (m->approved) {
    r.status = TG_BILLING_APPROVED;
    snprintf(r.hold, sizeof r.hold, "%s", m->hold_id);
  } else {
    r.status = TG_BILLING_DECLINED;
    r.available = m->available;
    snprintf(r.detail, sizeof r.detail, "account %s declined: %.140s", c->ref_red,
             m->decline_reason[0] ? m->decline_reason : "no reason given");
  }
  if (c->answered) {
    /* Too late: the caller heard TIMEOUT; nobody will capture this hold. */
    if (r.status == TG_BILLING_APPROVED)
      late_release(b, r.hold, c->txid, c->amount);
  } else {
    bool ok = r.status == TG_BILLING_APPROVED || r.status == TG_BILLING_DECLINED;
    if (r.status == TG_BILLING_APPROVED) {
      size_t tl = strlen(c->txid);
      entry_t *e = calloc(1, sizeof(*e) + tl + 1);
      if (e == NULL) {
        /* Unknown hold: could not be captured, so give it back. */
        late_release(b, r.hold, c->txid, c->amount);
        r = (tg_billing_result_t){.status = TG_BILLING_UNAVAILABLE, .available = -1};
        snprintf(r.detail, sizeof r.detail, "out of memory");
      } else {
        memcpy(e->txid, c->txid, tl + 1);
        snprintf(e->hold, sizeof e->hold, "%s", r.hold);
        e->amount = c->amount;
        map_put(b, e);
      }
    }
    if (!ok)
      tg_log(TG_LOG_WARN, "billing connect: authorize failed", "tenant", b->tenant, "account", c->ref_red,
             "transaction", c->txid, "error", r.detail, NULL);
    breaker_record(b, c->probe, ok);
    count_authorize(b, c, &r);
    c->answered = true;
    tg_billing_cb done = c->done;
    void *arg = c->arg;
    if (m)
      billing__v1__authorize_response__free_unpacked(m, NULL);
    arm_deadline(b);
    done(arg, &r);
    return;
  }
  if (m)
    billing__v1__authorize_response__free_unpacked(m, NULL);
  arm_deadline(b);
}

static void on_finish(connect_billing_t *b, call_t *c, int err, const tg_httpc_response_t *resp) {
  tg_billing_result_t r = {.status = TG_BILLING_UNAVAILABLE, .available = -1};
  bool ok = false, done_before = false, known = false;
  if (err != 0)
    snprintf(r.detail, sizeof r.detail, "the billing service failed (%s)", tg_httpc_strerror(err));
  else if (resp->status != 200)
    connect_error(resp, r.detail, sizeof r.detail);
  else if (c->kind == CALL_HEALTH) {
    Billing__V1__HealthResponse *m =
        billing__v1__health_response__unpack(NULL, resp->body_len, (const uint8_t *)resp->body);
    if (m) {
      known = true, ok = m->serving;
      billing__v1__health_response__free_unpacked(m, NULL);
    }
  } else if (c->kind == CALL_CAPTURE) {
    Billing__V1__CaptureResponse *m =
        billing__v1__capture_response__unpack(NULL, resp->body_len, (const uint8_t *)resp->body);
    if (m) {
      known = true, ok = m->ok, done_before = m->already_done;
      billing__v1__capture_response__free_unpacked(m, NULL);
    }
  } else {
    Billing__V1__ReleaseResponse *m =
        billing__v1__release_response__unpack(NULL, resp->body_len, (const uint8_t *)resp->body);
    if (m) {
      known = true, ok = m->ok, done_before = m->already_done;
      billing__v1__release_response__free_unpacked(m, NULL);
    }
  }
  if (err == 0 && resp->status == 200 && !known)
    snprintf(r.detail, sizeof r.detail, "the billing service sent a body that is not a %sResponse",
             method_of(c->kind));
  if (known) {
    r.status = ok ? TG_BILLING_APPROVED : TG_BILLING_DECLINED;
    snprintf(r.detail, sizeof r.detail, "%s",
             c->kind == CALL_HEALTH ? (ok ? "" : "the billing service says it is not serving")
             : !ok ? "the billing service does not know the hold"
             : done_before ? (c->kind == CALL_CAPTURE ? "already captured (a retry)" : "already released")
                           : "");
  }
  if (b != NULL) {
    if (c->kind != CALL_LATE_RELEASE && c->kind != CALL_HEALTH)
      breaker_record(b, c->probe, known);
    entry_t *e = map_find(b, c->hold);
    if (e && known && ok && c->kind == CALL_CAPTURE)
      mark_captured(b, e);
    else if (e && known && c->kind != CALL_CAPTURE && !e->captured) {
      map_remove(b, e);
      free(e);
    }
  }
  if (c->kind == CALL_LATE_RELEASE) {
    if (r.status != TG_BILLING_APPROVED)
      tg_log(TG_LOG_WARN, "billing connect: a late hold could not be released (the service must expire it)",
             "transaction", c->txid, "error", r.detail, NULL);
    return;
  }
  if (!c->answered) {
    if (r.status == TG_BILLING_UNAVAILABLE && c->kind == CALL_CAPTURE)
      tg_log(TG_LOG_ERROR, "billing connect: capture failed, the amount is owed but not yet charged", "transaction",
             c->txid, "error", r.detail, NULL);
    c->answered = true;
    c->done(c->arg, &r);
  }
}

static void on_response(int err, const tg_httpc_response_t *resp, void *ud) {
  call_t *c = ud;
  connect_billing_t *b = c->cb;
  call_unlink(c);
  if (c->kind == CALL_AUTHORIZE) {
    if (b)
      on_authorize(b, c, err, resp);
  } else {
    on_finish(b, c, err, resp);
  }
  free(c);
}

/* Not through the breaker: a hold nobody will capture must go back. */
static void late_release(connect_billing_t *b, const char *hold, const char *txid, int64_t amount) {
  call_t *c = call_new(b, CALL_LATE_RELEASE, NULL, NULL);
  if (c == NULL)
    goto fail;
  c->answered = true;
  snprintf(c->hold, sizeof c->hold, "%s", hold);
  snprintf(c->txid, sizeof c->txid, "%s", txid);
  Billing__V1__ReleaseRequest m = BILLING__V1__RELEASE_REQUEST__INIT;
  m.hold_id = c->hold;
  m.billing_id = c->txid;
  m.amount = amount;
  if (post(b, c, &m.base, b->call_timeout_ms, b->call_timeout_ms, NULL) == 0)
    return;
  call_unlink(c);
  free(c);
fail:
  tg_log(TG_LOG_WARN, "billing connect: a late hold could not be released (the service must expire it)",
         "transaction", txid, NULL);
}

static void authorize(tg_billing_t *base, const tg_billing_auth_t *a, tg_billing_cb cb, void *arg) {
  connect_billing_t *b = (connect_billing_t *)base;
  if (a->transaction_id == NULL || a->transaction_id[0] == '\0' || strlen(a->transaction_id) >= 128 ||
      a->billing_ref == NULL || a->currency == NULL) {
    answer_now(b, CALL_AUTHORIZE, cb, arg, TG_BILLING_UNAVAILABLE,
               "no transaction id (or one too long), account or currency for the billing service");
    return;
  }
  uint64_t now = uv_now(base->loop);
  uint64_t deadline = a->deadline_ms ? a->deadline_ms : now + b->deadline_ms;
  if (now >= deadline) {
    answer_now(b, CALL_AUTHORIZE, cb, arg, TG_BILLING_TIMEOUT, "the deadline passed before billing was asked");
    return;
  }
  bool probe;
  if (!breaker_admit(b, &probe)) {
    answer_now(b, CALL_AUTHORIZE, cb, arg, TG_BILLING_UNAVAILABLE, "circuit open");
    return;
  }
  call_t *c = call_new(b, CALL_AUTHORIZE, cb, arg);
  if (c == NULL) {
    breaker_record(b, probe, true); /* not the service's fault: give the probe back */
    answer_now(b, CALL_AUTHORIZE, cb, arg, TG_BILLING_UNAVAILABLE, "out of memory");
    return;
  }
  c->probe = probe;
  c->deadline_ms = deadline;
  c->amount = a->amount;
  tg_billing_redact(a->billing_ref, c->ref_red);
  snprintf(c->txid, sizeof c->txid, "%s", a->transaction_id);
  Billing__V1__AuthorizeRequest m = BILLING__V1__AUTHORIZE_REQUEST__INIT;
  m.billing_reference = (char *)a->billing_ref;
  m.currency = (char *)a->currency;
  m.amount = a->amount;
  m.transaction_id = (char *)a->transaction_id;
  m.tenant = (char *)(a->tenant ? a->tenant : b->tenant);
  m.ai_system_id = (char *)(a->ai_system_id ? a->ai_system_id : "");
  uint32_t left = (uint32_t)(deadline - now);
  int rc = post(b, c, &m.base, left + LATE_GRACE_MS, left, a->traceparent);
  if (rc != 0) {
    call_unlink(c);
    free(c);
    if (rc == -EINVAL) /* our input (a traceparent with CR/LF, a bad base_url): not the service's failure */
      b->probe_in_flight = probe ? false : b->probe_in_flight;
    else
      breaker_record(b, probe, false);
    char d[128];
    snprintf(d, sizeof d, "the billing service could not be called (%s)", tg_httpc_strerror(rc));
    answer_now(b, CALL_AUTHORIZE, cb, arg, TG_BILLING_UNAVAILABLE, d);
    return;
  }
  arm_deadline(b);
}

/* Sends Capture or Release of (hold, txid, amount) through the breaker. */
static void finish_send(connect_billing_t *b, const char *hold, const char *txid, int64_t amount, int kind,
                        tg_billing_cb cb, void *arg) {
  bool probe;
  if (!breaker_admit(b, &probe)) {
    answer_now(b, kind, cb, arg, TG_BILLING_UNAVAILABLE, "circuit open");
    return;
  }
  call_t *c = call_new(b, kind, cb, arg);
  if (c == NULL) {
    breaker_record(b, probe, true);
    answer_now(b, kind, cb, arg, TG_BILLING_UNAVAILABLE, "out of memory");
    return;
  }
  c->probe = probe;
  snprintf(c->hold, sizeof c->hold, "%s", hold);
  snprintf(c->txid, sizeof c->txid, "%s", txid);
  int rc;
  if (kind == CALL_CAPTURE) {
    Billing__V1__CaptureRequest m = BILLING__V1__CAPTURE_REQUEST__INIT;
    m.hold_id = c->hold;
    m.billing_id = c->txid;
    m.amount = amount;
    rc = post(b, c, &m.base, b->call_timeout_ms, b->call_timeout_ms, NULL);
  } else {
    Billing__V1__ReleaseRequest m = BILLING__V1__RELEASE_REQUEST__INIT;
    m.hold_id = c->hold;
    m.billing_id = c->txid;
    m.amount = amount;
    rc = post(b, c, &m.base, b->call_timeout_ms, b->call_timeout_ms, NULL);
  }
  if (rc != 0) {
    call_unlink(c);
    free(c);
    breaker_record(b, probe, false);
    answer_now(b, kind, cb, arg, TG_BILLING_UNAVAILABLE, "the billing service could not be called");
  }
}

static void finish(tg_billing_t *base, const char *hold, int kind, tg_billing_cb cb, void *arg) {
  connect_billing_t *b = (connect_billing_t *)base;
  entry_t *e = map_find(b, hold);
  if (e == NULL) {
    answer_now(b, kind, cb, arg, TG_BILLING_DECLINED, "no such hold (already released?)");
    return;
  }
  finish_send(b, e->hold, e->txid, e->amount, kind, cb, arg);
}

void tg_billing_connect_capture(tg_billing_t *base, const char *txid, const char *hold, int64_t amount,
                                tg_billing_cb cb, void *arg) {
  connect_billing_t *b = (connect_billing_t *)base;
  if (txid == NULL || txid[0] == '\0' || strlen(txid) >= sizeof((call_t *)0)->txid ||
      (hold && strlen(hold) >= TG_BILLING_HOLD_MAX)) {
    answer_now(b, CALL_CAPTURE, cb, arg, TG_BILLING_UNAVAILABLE, "no transaction id, or one too long");
    return;
  }
  finish_send(b, hold ? hold : "", txid, amount, CALL_CAPTURE, cb, arg);
}

void tg_billing_connect_health(tg_billing_t *base, tg_billing_cb cb, void *arg) {
  connect_billing_t *b = (connect_billing_t *)base;
  call_t *c = call_new(b, CALL_HEALTH, cb, arg);
  if (c == NULL) {
    answer_now(b, CALL_HEALTH, cb, arg, TG_BILLING_UNAVAILABLE, "out of memory");
    return;
  }
  Billing__V1__HealthRequest m = BILLING__V1__HEALTH_REQUEST__INIT;
  m.tenant = b->tenant;
  if (post(b, c, &m.base, b->call_timeout_ms, b->call_timeout_ms, NULL) != 0) {
    call_unlink(c);
    free(c);
    answer_now(b, CALL_HEALTH, cb, arg, TG_BILLING_UNAVAILABLE, "the billing service could not be called");
  }
}

static void capture(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) {
  finish(b, hold, CALL_CAPTURE, cb, arg);
}

static void release(tg_billing_t *b, const char *hold, tg_billing_cb cb, void *arg) {
  finish(b, hold, CALL_RELEASE, cb, arg);
}

static int health(tg_billing_t *base) {
  connect_billing_t *b = (connect_billing_t *)base;
  return b->circuit == CIRCUIT_OPEN && uv_now(base->loop) < b->open_until ? -EAGAIN : 0;
}

static void timer_closed(uv_handle_t *h) {
  connect_billing_t *b = h->data;
  free(b->tenant);
  free(b->base_url);
  if (b->auth) {
    memset(b->auth, 0, strlen(b->auth)); /* the token */
    free(b->auth);
  }
  free(b);
}

/* Calls in flight are answered UNAVAILABLE now; their HTTP requests finish
 * (or are cancelled by the client's free) and only clean up. Known holds are
 * forgotten: the service expires them. */
static void connect_free(tg_billing_t *base) {
  connect_billing_t *b = (connect_billing_t *)base;
  b->closing = true;
  call_t *c;
  while ((c = b->calls) != NULL) {
    call_unlink(c);
    c->cb = NULL;
    if (!c->answered) {
      c->answered = true;
      tg_billing_result_t r = {.status = TG_BILLING_UNAVAILABLE, .available = -1};
      snprintf(r.detail, sizeof r.detail, "the billing adapter is closing");
      c->done(c->arg, &r);
    }
  }
  for (size_t i = 0; i < BUCKETS; i++)
    while (b->map[i]) {
      entry_t *e = b->map[i];
      b->map[i] = e->next;
      free(e);
    }
  uv_close((uv_handle_t *)&b->deadline_timer, timer_closed);
}

static const tg_billing_ops_t connect_ops = {"connect", authorize, capture, release, health, connect_free};

tg_billing_t *tg_billing_connect_new(uv_loop_t *loop, tg_httpc_t *http, const tg_billing_connect_opts_t *o) {
  if (loop == NULL || http == NULL || o == NULL || o->tenant == NULL || o->base_url == NULL ||
      o->bearer_token == NULL || o->bearer_token[0] == '\0')
    return NULL;
  connect_billing_t *b = calloc(1, sizeof(*b));
  if (b == NULL)
    return NULL;
  b->base.ops = &connect_ops;
  b->base.loop = loop;
  b->http = http;
  b->tenant = strdup(o->tenant);
  size_t ul = strlen(o->base_url);
  while (ul > 0 && o->base_url[ul - 1] == '/')
    ul--;
  b->base_url = strndup(o->base_url, ul);
  size_t al = strlen(o->bearer_token) + 8;
  b->auth = malloc(al);
  if (b->auth)
    snprintf(b->auth, al, "Bearer %s", o->bearer_token);
  b->deadline_ms = o->deadline_ms ? o->deadline_ms : 30;
  b->call_timeout_ms = o->call_timeout_ms ? o->call_timeout_ms : 5000;
  b->breaker_failures = o->breaker_failures ? o->breaker_failures : 5;
  b->cooldown_ms = o->breaker_cooldown_ms ? o->breaker_cooldown_ms : 5000;
  static const char *const tr[] = {"tenant_id", "result", NULL};
  static const char *const ta[] = {"tenant_id", "approved", NULL};
  static const char *const t[] = {"tenant_id", NULL};
  b->m_total = tg_metric_new(TG_METRIC_COUNTER, "billing_authorize_total",
                             "Authorize calls to the tenant's billing service, by result: approved, declined, timeout "
                             "(no answer by billing.deadline_ms), unavailable (an error, or the circuit open).",
                             tr, NULL, 0);
  b->m_duration = tg_metric_new(TG_METRIC_HISTOGRAM, "billing_authorize_duration_seconds",
                                "Time the billing adapter took to authorize a purchase (hold), by tenant and "
                                "whether it approved.",
                                ta, tg_billing_auth_buckets, tg_billing_auth_nbuckets);
  b->m_timeout = tg_metric_new(TG_METRIC_COUNTER, "billing_timeout_total",
                               "Authorize calls that got no answer by billing.deadline_ms; the tenant's "
                               "on_billing_timeout hook then rejected or deferred the purchase.",
                               t, NULL, 0);
  b->m_circuit = tg_metric_new(TG_METRIC_GAUGE, "billing_circuit_state",
                               "Circuit breaker of the billing adapter: 0 closed, 1 open, 2 half-open", t, NULL, 0);
  if (b->tenant == NULL || b->base_url == NULL || b->auth == NULL || b->m_total == NULL || b->m_duration == NULL ||
      b->m_timeout == NULL || b->m_circuit == NULL || uv_timer_init(loop, &b->deadline_timer) != 0)
    goto fail;
  b->deadline_timer.data = b;
  set_circuit(b, CIRCUIT_CLOSED);
  return &b->base;
fail:
  free(b->tenant);
  free(b->base_url);
  free(b->auth);
  free(b);
  return NULL;
}
