#include "pay/settleq.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "base/hash.h"
#include "base/hex.h"
#include "base/log.h"
#include "base/metrics.h"
#include "ledger/record.h"
#include "ledger/v1/ledger.pb-c.h"

#define BUCKETS 1024
#define MAX_AMOUNT_DIGITS 78 /* a uint256 */
#define ST(x) LEDGER__V1__SETTLEMENT_STATE__SETTLEMENT_STATE_##x

typedef unsigned __int128 u128; /* a sum of amounts for the gauge: exact where a double is not */

/* The gauge's sum for one (tenant, network, asset). */
typedef struct key {
  struct key *next;
  char *tenant, *network, *asset;
  u128 sum;
} gkey_t;

typedef struct item {
  struct item *prev, *next; /* the book's order: PENDING sequence */
  struct item *hnext;       /* bucket chain by id */
  tg_settle_item_t v;       /* strings below; attempts and maybe_sent not kept here */
  char id[TG_SETTLEQ_ID_LEN];
  char *strs;    /* one block for tenant..request_id */
  char *request; /* owned */
  gkey_t *key;
  u128 amount;
  uint64_t seq;       /* its PENDING record */
  uint32_t attempts;  /* sends so far (ATTEMPT records) */
  bool maybe_sent;    /* an ATTEMPT record is durable */
  bool ready;         /* the PENDING record is durable: the runner may take it */
  bool in_flight;     /* the runner works on it */
  int64_t next_at_ms; /* wall clock: not before */
  /* A terminal record decided and not yet durable: written again at a later pass. */
  uint32_t want;
  char want_tx[80], want_err[192], want_fac[128];
} item_t;

struct tg_settleq {
  pthread_mutex_t mu;
  item_t *b[BUCKETS];
  item_t *head, *tail;
  size_t n;
  gkey_t *keys;
  char *instance;
  tg_settleq_runner_t *runner; /* under mu: kicks */
};

static tg_metric_t *m_unsettled, *m_settlements;

int tg_settleq_metrics_init(void) {
  static const char *const ul[] = {"tenant_id", "network", "asset", NULL};
  static const char *const sl[] = {"network", "scheme", "status", NULL};
  m_unsettled =
      tg_metric_new(TG_METRIC_GAUGE, "t402_unsettled_amount",
                    "Atomic units of the asset served and not yet settled (asynchronous settlement).", ul, NULL, 0);
  m_settlements = tg_metric_new(TG_METRIC_COUNTER, "t402_settlements_total",
                                "Settlements by what became of them: pending (queued), retry (an attempt to "
                                "be repeated), settled, failed.",
                                sl, NULL, 0);
  return m_unsettled && m_settlements ? 0 : -ENOMEM;
}

void tg_settle_count(const char *network, const char *scheme, const char *status) {
  const char *labels[] = {network, scheme, status};
  tg_counter_add(m_settlements, labels, 1);
}

static size_t bucket(const char *id) { return (size_t)(tg_fnv1a_str(id) % BUCKETS); }

static int64_t now_unix_s(void) { return (int64_t)time(NULL); }

/* Decimal digits to u128, saturating (a gauge, not money that moves). */
static u128 parse_amount(const char *s) {
  u128 v = 0, max = ~(u128)0;
  for (; *s; s++) {
    unsigned d = (unsigned)(*s - '0');
    if (v > (max - d) / 10)
      return max;
    v = v * 10 + d;
  }
  return v;
}

static bool digits_only(const char *s) {
  size_t n = strspn(s, "0123456789");
  return n > 0 && n <= MAX_AMOUNT_DIGITS && s[n] == '\0';
}

/* ---- the book (callers hold mu) */

static item_t *find(tg_settleq_t *q, const char *id) {
  for (item_t *it = q->b[bucket(id)]; it; it = it->hnext)
    if (strcmp(it->id, id) == 0)
      return it;
  return NULL;
}

static void gauge_update(const gkey_t *k) {
  const char *labels[] = {k->tenant, k->network, k->asset};
  tg_gauge_set(m_unsettled, labels, (double)k->sum);
}

/* Counts it in its key's sum (a PENDING record durable). */
static int key_add(tg_settleq_t *q, item_t *it) {
  gkey_t *k = q->keys;
  for (; k; k = k->next)
    if (strcmp(k->tenant, it->v.tenant) == 0 && strcmp(k->network, it->v.network) == 0 &&
        strcmp(k->asset, it->v.asset) == 0)
      break;
  if (k == NULL) {
    k = calloc(1, sizeof *k);
    if (k == NULL || (k->tenant = strdup(it->v.tenant)) == NULL || (k->network = strdup(it->v.network)) == NULL ||
        (k->asset = strdup(it->v.asset)) == NULL) {
      if (k)
        free(k->tenant), free(k->network), free(k->asset);
      free(k);
      return -ENOMEM;
    }
    k->next = q->keys;
    q->keys = k;
  }
  it->key = k;
  k->sum = k->sum + it->amount < k->sum ? ~(u128)0 : k->sum + it->amount;
  gauge_update(k);
  return 0;
}

static void key_sub(item_t *it) {
  gkey_t *k = it->key;
  if (k == NULL)
    return;
  k->sum = k->sum >= it->amount ? k->sum - it->amount : 0;
  it->key = NULL;
  gauge_update(k);
}

static void item_free(item_t *it) {
  if (it == NULL)
    return;
  free(it->strs);
  free(it->request);
  free(it);
}

/* A copy of src's strings and request under id. NULL when out of memory. */
static item_t *item_new(const char *id, const tg_settle_item_t *src) {
  const char *f[7] = {src->tenant, src->network, src->scheme, src->asset, src->payer, src->amount, src->request_id};
  size_t total = 0;
  for (int i = 0; i < 7; i++)
    total += strlen(f[i] ? f[i] : "") + 1;
  item_t *it = calloc(1, sizeof *it);
  if (it == NULL || (it->strs = malloc(total)) == NULL || (it->request = malloc(src->request_len + 1)) == NULL) {
    item_free(it);
    return NULL;
  }
  const char **dst[7] = {&it->v.tenant, &it->v.network, &it->v.scheme,    &it->v.asset,
                         &it->v.payer,  &it->v.amount,  &it->v.request_id};
  char *p = it->strs;
  for (int i = 0; i < 7; i++) {
    size_t l = strlen(f[i] ? f[i] : "");
    memcpy(p, f[i] ? f[i] : "", l + 1);
    *dst[i] = p;
    p += l + 1;
  }
  memcpy(it->request, src->request, src->request_len);
  it->request[src->request_len] = '\0';
  it->v.request = it->request;
  it->v.request_len = src->request_len;
  memcpy(it->v.nonce, src->nonce, 32);
  it->v.valid_before = src->valid_before;
  snprintf(it->id, sizeof it->id, "%s", id);
  it->v.id = it->id;
  it->amount = parse_amount(it->v.amount);
  return it;
}

/* Into the bucket and the order (by seq: appends from several workers may
 * arrive slightly out of order). */
static void link_item(tg_settleq_t *q, item_t *it) {
  size_t k = bucket(it->id);
  it->hnext = q->b[k];
  q->b[k] = it;
  item_t *after = q->tail;
  while (after && after->seq > it->seq)
    after = after->prev;
  it->prev = after;
  it->next = after ? after->next : q->head;
  if (it->next)
    it->next->prev = it;
  else
    q->tail = it;
  if (after)
    after->next = it;
  else
    q->head = it;
  q->n++;
}

static void unlink_item(tg_settleq_t *q, item_t *it) {
  for (item_t **pp = &q->b[bucket(it->id)]; *pp; pp = &(*pp)->hnext)
    if (*pp == it) {
      *pp = it->hnext;
      break;
    }
  if (it->prev)
    it->prev->next = it->next;
  else
    q->head = it->next;
  if (it->next)
    it->next->prev = it->prev;
  else
    q->tail = it->prev;
  q->n--;
  key_sub(it);
}

tg_settleq_t *tg_settleq_new(const char *instance) {
  tg_settleq_t *q = calloc(1, sizeof *q);
  if (q == NULL || (q->instance = strdup(instance ? instance : "")) == NULL) {
    free(q);
    return NULL;
  }
  pthread_mutex_init(&q->mu, NULL);
  return q;
}

void tg_settleq_free(tg_settleq_t *q) {
  if (q == NULL)
    return;
  for (item_t *it = q->head, *next; it; it = next) {
    next = it->next;
    item_free(it);
  }
  for (gkey_t *k = q->keys, *next; k; k = next) {
    next = k->next;
    free(k->tenant), free(k->network), free(k->asset);
    free(k);
  }
  pthread_mutex_destroy(&q->mu);
  free(q->instance);
  free(q);
}

size_t tg_settleq_count(tg_settleq_t *q) {
  pthread_mutex_lock(&q->mu);
  size_t n = q->n;
  pthread_mutex_unlock(&q->mu);
  return n;
}

uint64_t tg_settleq_oldest_seq(tg_settleq_t *q) {
  pthread_mutex_lock(&q->mu);
  uint64_t s = q->head ? q->head->seq : 0;
  pthread_mutex_unlock(&q->mu);
  return s;
}

uint64_t tg_settleq_covered(tg_settleq_t *q, uint64_t covered_seq) {
  uint64_t oldest = tg_settleq_oldest_seq(q);
  return oldest && oldest - 1 < covered_seq ? oldest - 1 : covered_seq;
}

int tg_settleq_info(tg_settleq_t *q, const char *id, uint32_t *attempts, bool *maybe_sent, bool *queued) {
  pthread_mutex_lock(&q->mu);
  item_t *it = find(q, id);
  if (it) {
    if (attempts)
      *attempts = it->attempts;
    if (maybe_sent)
      *maybe_sent = it->maybe_sent;
    if (queued)
      *queued = it->ready;
  }
  pthread_mutex_unlock(&q->mu);
  return it ? 0 : -ENOENT;
}

/* ---- records */

uint8_t *tg_settleq_record(const tg_settle_item_t *item, uint32_t state, uint32_t attempts, const char *tx,
                           const char *error, const char *facilitator, int64_t next_attempt_unix_ms,
                           const char *instance, size_t *len) {
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__Settlement s = LEDGER__V1__SETTLEMENT__INIT;
  rec.at_unix_ms = tg_record_now_ms();
  rec.instance = (char *)(instance ? instance : "");
  rec.kind_case = LEDGER__V1__RECORD__KIND_SETTLEMENT;
  rec.settlement = &s;
#define OR_EMPTY(x) ((char *)((x) ? (x) : ""))
  s.id = OR_EMPTY(item->id);
  s.tenant = OR_EMPTY(item->tenant);
  s.network = OR_EMPTY(item->network);
  s.scheme = OR_EMPTY(item->scheme);
  s.asset = OR_EMPTY(item->asset);
  s.payer = OR_EMPTY(item->payer);
  s.amount = OR_EMPTY(item->amount);
  s.request_id = OR_EMPTY(item->request_id);
  s.transaction = OR_EMPTY(tx);
  s.error = OR_EMPTY(error);
  s.facilitator = OR_EMPTY(facilitator);
#undef OR_EMPTY
  s.state = state;
  s.attempts = attempts;
  s.valid_before = item->valid_before;
  s.next_attempt_unix_ms = next_attempt_unix_ms;
  if (state == ST(PENDING)) {
    s.request.data = (uint8_t *)item->request;
    s.request.len = item->request_len;
    s.nonce.data = (uint8_t *)item->nonce;
    s.nonce.len = 32;
  }
  *len = ledger__v1__record__get_packed_size(&rec);
  uint8_t *out = malloc(*len ? *len : 1);
  if (out)
    ledger__v1__record__pack(&rec, out);
  return out;
}

int tg_settleq_replay(tg_settleq_t *q, uint64_t seq, const void *payload, size_t len) {
  Ledger__V1__Record *rec = ledger__v1__record__unpack(NULL, len, payload);
  if (rec == NULL)
    return 0; /* not a Record: the balances' replay says so */
  int rc = 0;
  if (rec->kind_case != LEDGER__V1__RECORD__KIND_SETTLEMENT)
    goto done;
  const Ledger__V1__Settlement *s = rec->settlement;
  pthread_mutex_lock(&q->mu);
  item_t *it = find(q, s->id);
  switch (s->state) {
  case ST(PENDING): {
    if (it != NULL)
      break; /* the same id twice: the first holds */
    if (s->id[0] == '\0' || s->request.len == 0 || s->nonce.len != 32 || !digits_only(s->amount)) {
      char sq[24];
      snprintf(sq, sizeof sq, "%llu", (unsigned long long)seq);
      tg_log(TG_LOG_ERROR, "settlement: a PENDING record without what a send needs (ignored)", "seq", sq, "id", s->id,
             NULL);
      break;
    }
    tg_settle_item_t v = {.tenant = s->tenant,
                          .network = s->network,
                          .scheme = s->scheme,
                          .asset = s->asset,
                          .payer = s->payer,
                          .amount = s->amount,
                          .request_id = s->request_id,
                          .valid_before = s->valid_before,
                          .request = (const char *)s->request.data,
                          .request_len = s->request.len};
    memcpy(v.nonce, s->nonce.data, 32);
    item_t *n = item_new(s->id, &v);
    if (n == NULL || key_add(q, n) != 0) {
      item_free(n);
      rc = -ENOMEM;
      break;
    }
    n->seq = seq;
    n->ready = true;
    n->attempts = s->attempts;
    n->maybe_sent = s->attempts > 0 || s->transaction[0] != '\0'; /* sent before it was queued */
    link_item(q, n);
    break;
  }
  case ST(ATTEMPT):
  case ST(RETRY):
    if (it == NULL)
      break; /* its PENDING record is gone: nothing owed */
    if (s->attempts > it->attempts)
      it->attempts = s->attempts;
    it->maybe_sent = true;
    it->next_at_ms = s->state == ST(RETRY) ? s->next_attempt_unix_ms : 0;
    break;
  case ST(SETTLED):
  case ST(FAILED):
    /* In flight: the runner wrote it and removes it itself (so replay is safe from on_durable too). */
    if (it != NULL && !it->in_flight) {
      unlink_item(q, it);
      item_free(it);
    }
    break;
  default:
    break; /* a state a newer gateway wrote: never guess */
  }
  pthread_mutex_unlock(&q->mu);
done:
  ledger__v1__record__free_unpacked(rec, NULL);
  return rc;
}

/* ---- enqueue */

static void new_id(char out[TG_SETTLEQ_ID_LEN]) {
  uint8_t rnd[16];
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
    /* Without getrandom: time and address, unique enough within a run. */
    static _Thread_local uint64_t ctr;
    uint64_t a = uv_hrtime(), b = (uint64_t)(uintptr_t)&ctr ^ (uint64_t)time(NULL) << 20 ^ ++ctr;
    memcpy(rnd, &a, 8);
    memcpy(rnd + 8, &b, 8);
  }
  memcpy(out, "st_", 3);
  tg_hex_encode(rnd, sizeof rnd, out + 3);
  out[TG_SETTLEQ_ID_LEN - 1] = '\0';
}

static void kick_locked(tg_settleq_t *q);

typedef struct enq {
  tg_settleq_t *q;
  item_t *it;
  tg_settleq_enqueue_cb cb;
  void *arg;
  char id[TG_SETTLEQ_ID_LEN];
} enq_t;

static void on_pending_durable(void *arg, int status, uint64_t seq) {
  enq_t *e = arg;
  tg_settleq_t *q = e->q;
  (void)seq;
  item_t *dead = NULL;
  pthread_mutex_lock(&q->mu);
  if (status == 0 && key_add(q, e->it) != 0)
    e->it->key = NULL; /* the gauge misses it; the settlement does not */
  if (status == 0) {
    /* Counted under the lock: once ready, the runner may settle and free it. */
    tg_settle_count(e->it->v.network, e->it->v.scheme, "pending");
    e->it->ready = true;
    kick_locked(q);
  } else {
    unlink_item(q, e->it);
    dead = e->it;
  }
  pthread_mutex_unlock(&q->mu);
  item_free(dead);
  e->cb(e->arg, status, e->id);
  free(e);
}

static bool short_str(const char *s, bool required) {
  if (s == NULL)
    return !required;
  size_t l = strlen(s);
  return (l > 0 || !required) && l < TG_SETTLEQ_MAX_STR;
}

int tg_settleq_enqueue(tg_settleq_t *q, tg_wal_client_t *w, const tg_settle_item_t *item, tg_settleq_enqueue_cb cb,
                       void *arg, char id_out[TG_SETTLEQ_ID_LEN]) {
  if (cb == NULL || !short_str(item->tenant, true) || !short_str(item->network, true) ||
      !short_str(item->scheme, true) || !short_str(item->asset, true) || !short_str(item->payer, true) ||
      !short_str(item->request_id, false) || !short_str(item->transaction, false) || item->amount == NULL ||
      !digits_only(item->amount) || item->request == NULL || item->request_len == 0)
    return -EINVAL;
  char id[TG_SETTLEQ_ID_LEN];
  new_id(id);
  item_t *it = item_new(id, item);
  enq_t *e = malloc(sizeof *e);
  size_t len = 0;
  bool sent = item->maybe_sent || (item->transaction && item->transaction[0]);
  if (it && sent) {
    it->maybe_sent = true;
    it->attempts = item->attempts ? item->attempts : 1;
  }
  uint8_t *rec =
      it ? tg_settleq_record(&it->v, ST(PENDING), it->attempts, item->transaction, NULL, NULL, 0, q->instance, &len)
         : NULL;
  if (it == NULL || e == NULL || rec == NULL) {
    item_free(it);
    free(e);
    free(rec);
    return -ENOMEM;
  }
  *e = (enq_t){.q = q, .it = it, .cb = cb, .arg = arg};
  memcpy(e->id, id, sizeof id);
  /* In the book before the record can be durable: retention never passes it. */
  pthread_mutex_lock(&q->mu);
  uint64_t seq = 0;
  int rc = tg_wal_append(w, rec, len, on_pending_durable, e, &seq);
  if (rc == 0) {
    it->seq = seq;
    link_item(q, it);
  }
  pthread_mutex_unlock(&q->mu);
  free(rec);
  if (rc != 0) {
    item_free(it);
    free(e);
    return rc;
  }
  if (id_out)
    memcpy(id_out, id, sizeof id);
  return 0;
}

/* ---- the runner */

struct tg_settleq_runner {
  tg_settleq_t *q;
  uv_loop_t *loop;
  tg_wal_client_t *w;
  tg_settleq_hooks_t h;
  tg_settleq_runner_opts_t o;
  uv_timer_t timer;
  uv_async_t wake;
  size_t busy; /* jobs */
  int open;    /* handles not yet closed */
  bool closing;
  bool saturated; /* a pass left due items for want of room */
  uint64_t rnd;   /* jitter */
};

static void kick_locked(tg_settleq_t *q) {
  if (q->runner)
    uv_async_send(&q->runner->wake);
}

void tg_settleq_kick(tg_settleq_t *q) {
  pthread_mutex_lock(&q->mu);
  kick_locked(q);
  pthread_mutex_unlock(&q->mu);
}

void tg_settleq_runner_opts_init(tg_settleq_runner_opts_t *o) {
  *o =
      (tg_settleq_runner_opts_t){.max_inflight = 16, .backoff_min_ms = 1000, .backoff_max_ms = 300000, .tick_ms = 1000};
}

typedef enum { PROBE_BEFORE_SEND, PROBE_EXPIRED, PROBE_REFUSED } probe_why_t;

typedef struct job {
  tg_settleq_runner_t *r;
  item_t *it;
  tg_settle_item_t v; /* what the hooks see */
  probe_why_t why;
  uint32_t state;  /* the record being appended */
  bool prior_sent; /* an attempt before this one may have been sent */
  char tx[80], err[192], fac[128];
} job_t;

static void maybe_free_runner(tg_settleq_runner_t *r) {
  if (r->closing && r->busy == 0 && r->open == 0)
    free(r);
}

static int64_t backoff_ms(tg_settleq_runner_t *r, uint32_t attempts) {
  uint64_t d = r->o.backoff_min_ms;
  for (uint32_t i = 1; i < attempts && d < r->o.backoff_max_ms; i++)
    d *= 2;
  if (d > r->o.backoff_max_ms)
    d = r->o.backoff_max_ms;
  r->rnd ^= r->rnd << 13, r->rnd ^= r->rnd >> 7, r->rnd ^= r->rnd << 17;
  return (int64_t)(d / 2 + r->rnd % (d / 2 + 1)); /* half to all of it: retries spread out */
}

/* A job's slot is free again: a runner that left due items for want of
 * room takes them now rather than at its next tick. */
static void slot_freed(tg_settleq_runner_t *r) {
  r->busy--;
  if (r->saturated && !r->closing) {
    r->saturated = false;
    uv_async_send(&r->wake);
  }
  maybe_free_runner(r);
}

/* The job ends; the item is taken again at a pass at or after next_at (0: keep). */
static void job_end(job_t *j, int64_t next_at_ms) {
  tg_settleq_runner_t *r = j->r;
  tg_settleq_t *q = r->q;
  pthread_mutex_lock(&q->mu);
  j->it->in_flight = false;
  if (next_at_ms)
    j->it->next_at_ms = next_at_ms;
  pthread_mutex_unlock(&q->mu);
  free(j);
  slot_freed(r);
}

static void append_record(job_t *j, uint32_t state, const char *tx, const char *err, int64_t next_at_unix_ms,
                          tg_wal_append_cb cb);

/* The terminal record: the item leaves the book once it is durable. */
static void on_terminal(void *arg, int status, uint64_t seq) {
  job_t *j = arg;
  tg_settleq_runner_t *r = j->r;
  tg_settleq_t *q = r->q;
  (void)seq;
  if (status != 0) {
    tg_log(TG_LOG_ERROR, "settlement: the outcome could not be logged (written again later)", "id", j->it->id, "error",
           strerror(-status), NULL);
    job_end(j, tg_record_now_ms() + r->o.backoff_min_ms);
    return;
  }
  item_t *it = j->it;
  pthread_mutex_lock(&q->mu);
  unlink_item(q, it);
  pthread_mutex_unlock(&q->mu);
  bool settled = j->state == ST(SETTLED);
  tg_settle_count(it->v.network, it->v.scheme, settled ? "settled" : "failed");
  if (settled)
    tg_log(TG_LOG_INFO, "settlement settled", "id", it->id, "tenant", it->v.tenant, "transaction", j->tx, NULL);
  else
    tg_log(TG_LOG_WARN, "settlement failed", "id", it->id, "tenant", it->v.tenant, "reason", j->err, NULL);
  if (!settled && !r->closing && r->h.on_failure)
    r->h.on_failure(r->h.ud, &j->v, j->err);
  item_free(it);
  free(j);
  slot_freed(r);
}

static void terminal(job_t *j, uint32_t state, const char *tx, const char *err) {
  tg_settleq_t *q = j->r->q;
  if (tx != j->tx)
    snprintf(j->tx, sizeof j->tx, "%s", tx ? tx : "");
  if (err != j->err)
    snprintf(j->err, sizeof j->err, "%s", err ? err : "");
  /* Kept on the item: a record that cannot be written now is written at a later pass, not sent again. */
  pthread_mutex_lock(&q->mu);
  j->it->want = state;
  memcpy(j->it->want_tx, j->tx, sizeof j->tx);
  memcpy(j->it->want_err, j->err, sizeof j->err);
  memcpy(j->it->want_fac, j->fac, sizeof j->fac);
  pthread_mutex_unlock(&q->mu);
  append_record(j, state, j->tx, j->err, 0, on_terminal);
}

static void on_retry_logged(void *arg, int status, uint64_t seq) {
  job_t *j = arg;
  (void)seq;
  if (status == 0)
    tg_settle_count(j->v.network, j->v.scheme, "retry");
  job_end(j, 0); /* next_at set before the append */
}

static void retry(job_t *j, const char *err, const char *tx) {
  tg_settleq_runner_t *r = j->r;
  snprintf(j->err, sizeof j->err, "%s", err);
  snprintf(j->tx, sizeof j->tx, "%s", tx ? tx : "");
  int64_t next = tg_record_now_ms() + backoff_ms(r, j->v.attempts);
  pthread_mutex_lock(&r->q->mu);
  j->it->next_at_ms = next;
  pthread_mutex_unlock(&r->q->mu);
  append_record(j, ST(RETRY), j->tx, j->err, next, on_retry_logged);
}

static void probe(job_t *j, probe_why_t why);

static void on_sent(void *arg, const tg_settle_result_t *res) {
  job_t *j = arg;
  if (j->r->closing) {
    job_end(j, 0); /* its ATTEMPT is the last record: probed or sent again after the restart */
    return;
  }
  snprintf(j->fac, sizeof j->fac, "%s", res->facilitator ? res->facilitator : "");
  const char *reason = res->reason && res->reason[0] ? res->reason : NULL;
  switch (res->status) {
  case TG_SETTLE_OK:
    snprintf(j->err, sizeof j->err, "%s", "");
    terminal(j, ST(SETTLED), res->transaction, NULL);
    break;
  case TG_SETTLE_PENDING:
    retry(j, "settlement pending", res->transaction);
    break;
  case TG_SETTLE_REFUSED:
    snprintf(j->err, sizeof j->err, "%s", reason ? reason : "refused by the facilitator");
    if (j->prior_sent && j->r->h.probe) /* an earlier attempt may have settled it */
      probe(j, PROBE_REFUSED);
    else
      terminal(j, ST(FAILED), NULL, j->err);
    break;
  default:
    retry(j, reason ? reason : "facilitator unavailable", NULL);
    break;
  }
}

static void on_attempt_logged(void *arg, int status, uint64_t seq) {
  job_t *j = arg;
  tg_settleq_runner_t *r = j->r;
  (void)seq;
  if (status != 0) {
    tg_log(TG_LOG_ERROR, "settlement: the attempt could not be logged (not sent)", "id", j->it->id, "error",
           strerror(-status), NULL);
    job_end(j, tg_record_now_ms() + backoff_ms(r, 1));
    return;
  }
  pthread_mutex_lock(&r->q->mu);
  j->it->attempts = j->v.attempts;
  j->it->maybe_sent = true;
  pthread_mutex_unlock(&r->q->mu);
  if (r->closing) {
    job_end(j, 0);
    return;
  }
  r->h.send(r->h.ud, &j->v, on_sent, j);
}

static void attempt(job_t *j) {
  j->prior_sent = j->v.maybe_sent;
  j->v.attempts++;
  append_record(j, ST(ATTEMPT), NULL, NULL, 0, on_attempt_logged);
}

static void on_probed(void *arg, int status, bool used) {
  job_t *j = arg;
  if (j->r->closing) {
    job_end(j, 0);
    return;
  }
  if (status == 0 && used) {
    j->fac[0] = '\0';
    terminal(j, ST(SETTLED), NULL, "settled by an earlier attempt (nonce used on chain)");
    return;
  }
  const char *unknown = status != 0 ? " (the chain could not be asked whether an earlier attempt settled)" : "";
  char why[192];
  switch (j->why) {
  case PROBE_BEFORE_SEND:
    attempt(j); /* unused (or unknown): a send cannot pay twice */
    break;
  case PROBE_EXPIRED:
    snprintf(why, sizeof why, "authorization expired (validBefore passed) before it settled%s", unknown);
    terminal(j, ST(FAILED), NULL, why);
    break;
  case PROBE_REFUSED:
    snprintf(why, sizeof why, "%.120s%s", j->err, unknown);
    terminal(j, ST(FAILED), NULL, why);
    break;
  }
}

static void probe(job_t *j, probe_why_t why) {
  j->why = why;
  j->r->h.probe(j->r->h.ud, &j->v, on_probed, j);
}

/* Appends the record; a refusal ends the job (a later pass tries again). */
static void append_record(job_t *j, uint32_t state, const char *tx, const char *err, int64_t next_at_unix_ms,
                          tg_wal_append_cb cb) {
  tg_settleq_runner_t *r = j->r;
  if (r->closing) {
    job_end(j, 0);
    return;
  }
  j->state = state;
  size_t len;
  uint8_t *rec = tg_settleq_record(&j->v, state, j->v.attempts, tx, err, j->fac, next_at_unix_ms, r->q->instance, &len);
  int rc = rec ? tg_wal_append(r->w, rec, len, cb, j, NULL) : -ENOMEM;
  free(rec);
  if (rc != 0) {
    char st[8];
    snprintf(st, sizeof st, "%u", state);
    tg_log(TG_LOG_WARN, "settlement: a record could not be appended (tried again later)", "id", j->it->id, "state", st,
           "error", strerror(-rc), NULL);
    if (state == ST(ATTEMPT))
      j->v.attempts--;
    job_end(j, tg_record_now_ms() + backoff_ms(r, 1));
  }
}

static void start(job_t *j) {
  item_t *it = j->it;
  if (it->want) { /* decided before: only its record is missing */
    memcpy(j->fac, it->want_fac, sizeof j->fac);
    terminal(j, it->want, it->want_tx, it->want_err);
    return;
  }
  if (now_unix_s() > it->v.valid_before) {
    if (j->v.maybe_sent && j->r->h.probe)
      probe(j, PROBE_EXPIRED);
    else
      terminal(j, ST(FAILED), NULL, "authorization expired (validBefore passed) before it settled");
    return;
  }
  if (j->v.maybe_sent && j->r->h.probe) {
    probe(j, PROBE_BEFORE_SEND);
    return;
  }
  attempt(j);
}

static void pass(tg_settleq_runner_t *r) {
  if (r->closing)
    return;
  tg_settleq_t *q = r->q;
  int64_t now = tg_record_now_ms();
  job_t *jobs[64];
  size_t nj = 0;
  r->saturated = false;
  pthread_mutex_lock(&q->mu);
  for (item_t *it = q->head; it; it = it->next) {
    if (!it->ready || it->in_flight)
      continue;
    /* A wall clock set back does not hold a retry longer than the longest backoff. */
    if (it->next_at_ms > now && it->next_at_ms - now <= (int64_t)r->o.backoff_max_ms)
      continue;
    if (r->busy + nj >= r->o.max_inflight || nj == sizeof jobs / sizeof jobs[0]) {
      r->saturated = true;
      break;
    }
    job_t *j = calloc(1, sizeof *j);
    if (j == NULL)
      break;
    j->r = r;
    j->it = it;
    j->v = it->v;
    j->v.attempts = it->attempts;
    j->v.maybe_sent = it->maybe_sent;
    it->in_flight = true;
    jobs[nj++] = j;
  }
  pthread_mutex_unlock(&q->mu);
  r->busy += nj;
  for (size_t i = 0; i < nj; i++)
    start(jobs[i]);
}

static void on_tick(uv_timer_t *t) { pass(t->data); }
static void on_closed(uv_handle_t *h);
static void on_wake(uv_async_t *a) { pass(a->data); }

int tg_settleq_runner_new(tg_settleq_t *q, uv_loop_t *loop, tg_wal_client_t *w, const tg_settleq_hooks_t *hooks,
                          const tg_settleq_runner_opts_t *o, tg_settleq_runner_t **out) {
  if (hooks == NULL || hooks->send == NULL || w == NULL)
    return -EINVAL;
  tg_settleq_runner_t *r = calloc(1, sizeof *r);
  if (r == NULL)
    return -ENOMEM;
  r->q = q, r->loop = loop, r->w = w, r->h = *hooks;
  tg_settleq_runner_opts_init(&r->o);
  if (o) {
    if (o->max_inflight)
      r->o.max_inflight = o->max_inflight;
    if (o->backoff_min_ms)
      r->o.backoff_min_ms = o->backoff_min_ms;
    if (o->backoff_max_ms)
      r->o.backoff_max_ms = o->backoff_max_ms;
    if (o->tick_ms)
      r->o.tick_ms = o->tick_ms;
  }
  if (r->o.backoff_max_ms < r->o.backoff_min_ms)
    r->o.backoff_max_ms = r->o.backoff_min_ms;
  r->rnd = uv_hrtime() | 1;
  int rc;
  if ((rc = uv_timer_init(loop, &r->timer)) != 0) {
    free(r);
    return rc;
  }
  r->timer.data = r;
  r->open = 1;
  if ((rc = uv_async_init(loop, &r->wake, on_wake)) != 0) {
    r->closing = true;
    uv_close((uv_handle_t *)&r->timer, on_closed); /* r goes once the loop has closed it */
    return rc;
  }
  r->wake.data = r;
  r->open = 2;
  pthread_mutex_lock(&q->mu);
  if (q->runner != NULL) {
    pthread_mutex_unlock(&q->mu);
    tg_settleq_runner_free(r);
    return -EBUSY;
  }
  q->runner = r;
  pthread_mutex_unlock(&q->mu);
  uv_timer_start(&r->timer, on_tick, 0, r->o.tick_ms);
  *out = r;
  return 0;
}

static void on_closed(uv_handle_t *h) {
  tg_settleq_runner_t *r = h->data;
  r->open--;
  maybe_free_runner(r);
}

void tg_settleq_runner_free(tg_settleq_runner_t *r) {
  if (r == NULL)
    return;
  pthread_mutex_lock(&r->q->mu);
  if (r->q->runner == r)
    r->q->runner = NULL;
  pthread_mutex_unlock(&r->q->mu);
  r->closing = true;
  uv_close((uv_handle_t *)&r->timer, on_closed);
  uv_close((uv_handle_t *)&r->wake, on_closed);
}

size_t tg_settleq_runner_busy(const tg_settleq_runner_t *r) { return r->busy; }
