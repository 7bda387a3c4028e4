#include "billing/reconcile.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/hash.h"
#include "base/log.h"
#include "base/metrics.h"
#include "ledger/record.h"
#include "ledger/v1/ledger.pb-c.h"

#define BUCKETS 4096
#define MAX_CURRENCIES 16 /* per tenant with deferred money outstanding at once */

typedef struct owed owed_t;
struct owed {
  owed_t *next;       /* in its bucket */
  size_t tenant;
  bool deferred;      /* counts against the cap until done */
  bool claimed;       /* a capture or a reconciliation is under way */
  uint32_t attempts;
  uint64_t due_ms;    /* monotonic ms: not before */
  uint64_t seq;       /* its Transaction record; 0 until known */
  int64_t amount;
  char txid[128];
  char currency[17];
  char hold[TG_BILLING_HOLD_MAX];
  char *ref, *ai;
};

typedef struct outstanding {
  char currency[17];
  int64_t amount;
} outstanding_t;

typedef struct tenant {
  _Atomic uint64_t failing_since; /* monotonic ms + 1; 0: not failing */
  _Atomic uint32_t health_fails;
  _Atomic bool probed, serving, accepts_deferred, decided;
  size_t nowed;                   /* entries of this tenant (mutex) */
  outstanding_t out[MAX_CURRENCIES];
} tenant_t;

struct tg_billing_book {
  pthread_mutex_t mu;
  size_t ntenants;
  const char **names; /* the array is ours; the strings are borrowed */
  bool *remote;
  tenant_t *t;
  owed_t *b[BUCKETS];
  size_t n;
  size_t unknown_tenant; /* replayed charges of tenants not (or no longer) remote */
  char *instance;
};

static tg_metric_t *m_outstanding, *m_deferred, *m_owed, *m_health;

int tg_billing_book_metrics_init(void) {
  static const char *const tc[] = {"tenant_id", "currency", NULL};
  static const char *const tr[] = {"tenant_id", "result", NULL};
  static const char *const t[] = {"tenant_id", NULL};
  m_outstanding = tg_metric_new(TG_METRIC_GAUGE, "billing_deferred_outstanding",
                                "Money served in deferred state and not yet captured, atomic units of currency.", tc,
                                NULL, 0);
  m_deferred = tg_metric_new(TG_METRIC_COUNTER, "billing_deferred_total",
                             "Deferred billing: deferred (served unbilled), over_cap (refused, the cap reached), "
                             "captured (charged later), refused (billing refused the deferred charge).",
                             tr, NULL, 0);
  m_owed = tg_metric_new(TG_METRIC_GAUGE, "billing_owed_charges",
                         "Charges a remote billing service has not confirmed yet (deferred or capture pending).", t,
                         NULL, 0);
  m_health = tg_metric_new(TG_METRIC_GAUGE, "billing_health_up",
                           "1 when the billing service's last Health probe answered serving, else 0.", t, NULL, 0);
  return m_outstanding && m_deferred && m_owed && m_health ? 0 : -ENOMEM;
}

static void count_deferred(const tg_billing_book_t *b, size_t ti, const char *result) {
  const char *l[] = {b->names[ti], result};
  tg_counter_add(m_deferred, l, 1);
}

static size_t bucket(const char *txid) { return (size_t)(tg_fnv1a_str(txid) % BUCKETS); }

tg_billing_book_t *tg_billing_book_new(size_t ntenants, const char *const *names, const bool *remote,
                                       const char *instance) {
  tg_billing_book_t *b = calloc(1, sizeof *b);
  if (b == NULL)
    return NULL;
  b->ntenants = ntenants;
  b->names = calloc(ntenants ? ntenants : 1, sizeof *b->names);
  b->remote = calloc(ntenants ? ntenants : 1, sizeof *b->remote);
  b->t = calloc(ntenants ? ntenants : 1, sizeof *b->t);
  b->instance = strdup(instance ? instance : "");
  if (b->names == NULL || b->remote == NULL || b->t == NULL || b->instance == NULL) {
    free(b->names);
    free(b->remote);
    free(b->t);
    free(b->instance);
    free(b);
    return NULL;
  }
  for (size_t i = 0; i < ntenants; i++) {
    b->names[i] = names[i];
    b->remote[i] = remote[i];
    atomic_init(&b->t[i].serving, true);
  }
  pthread_mutex_init(&b->mu, NULL);
  return b;
}

static void owed_free(owed_t *e) {
  free(e->ref);
  free(e->ai);
  free(e);
}

void tg_billing_book_free(tg_billing_book_t *b) {
  if (b == NULL)
    return;
  for (size_t i = 0; i < BUCKETS; i++)
    for (owed_t *e = b->b[i], *next; e; e = next) {
      next = e->next;
      owed_free(e);
    }
  pthread_mutex_destroy(&b->mu);
  free(b->names);
  free(b->remote);
  free(b->t);
  free(b->instance);
  free(b);
}

/* ---- Tenant health */

void tg_billing_book_ok(tg_billing_book_t *b, size_t ti) {
  if (ti < b->ntenants)
    atomic_store(&b->t[ti].failing_since, 0);
}

uint64_t tg_billing_book_failed(tg_billing_book_t *b, size_t ti, uint64_t now_ms) {
  if (ti >= b->ntenants)
    return 0;
  uint64_t zero = 0;
  if (atomic_compare_exchange_strong(&b->t[ti].failing_since, &zero, now_ms + 1))
    return 0;
  uint64_t since = zero - 1;
  return now_ms > since ? now_ms - since : 0;
}

void tg_billing_book_decided(tg_billing_book_t *b, size_t ti, bool rejects) {
  if (ti < b->ntenants) {
    atomic_store(&b->t[ti].accepts_deferred, !rejects);
    atomic_store(&b->t[ti].decided, true);
  }
}

void tg_billing_book_health(tg_billing_book_t *b, size_t ti, bool serving) {
  if (ti >= b->ntenants)
    return;
  tenant_t *t = &b->t[ti];
  atomic_store(&t->probed, true);
  atomic_store(&t->serving, serving);
  if (serving)
    atomic_store(&t->health_fails, 0);
  else
    atomic_fetch_add(&t->health_fails, 1);
  const char *l[] = {b->names[ti]};
  tg_gauge_set(m_health, l, serving ? 1 : 0);
}

void tg_billing_book_health_get(tg_billing_book_t *b, size_t ti, tg_billing_book_health_t *out) {
  memset(out, 0, sizeof *out);
  out->rejects = true;
  out->serving = true;
  if (b == NULL || ti >= b->ntenants)
    return;
  tenant_t *t = &b->t[ti];
  out->remote = b->remote[ti];
  out->probed = atomic_load(&t->probed);
  out->serving = atomic_load(&t->serving);
  out->consecutive_failures = atomic_load(&t->health_fails);
  out->decided = atomic_load(&t->decided);
  out->rejects = !atomic_load(&t->accepts_deferred);
}

/* ---- Charges */

static owed_t *find_locked(tg_billing_book_t *b, const char *txid) {
  for (owed_t *e = b->b[bucket(txid)]; e; e = e->next)
    if (strcmp(e->txid, txid) == 0)
      return e;
  return NULL;
}

static outstanding_t *outstanding_locked(tenant_t *t, const char *currency, bool make) {
  outstanding_t *free_slot = NULL;
  for (size_t i = 0; i < MAX_CURRENCIES; i++) {
    if (t->out[i].currency[0] && strcmp(t->out[i].currency, currency) == 0)
      return &t->out[i];
    if (t->out[i].currency[0] == '\0' && free_slot == NULL)
      free_slot = &t->out[i];
  }
  if (make && free_slot)
    snprintf(free_slot->currency, sizeof free_slot->currency, "%s", currency);
  return make ? free_slot : NULL;
}

static void publish_locked(tg_billing_book_t *b, size_t ti, const outstanding_t *o) {
  if (o) {
    const char *l[] = {b->names[ti], o->currency};
    tg_gauge_set(m_outstanding, l, (double)o->amount);
  }
  const char *l[] = {b->names[ti]};
  tg_gauge_set(m_owed, l, (double)b->t[ti].nowed);
}

/* Enters a charge (mutex held). 0, -EEXIST, -EINVAL or -ENOMEM. */
static int enter_locked(tg_billing_book_t *b, size_t ti, const char *txid, const char *ref, const char *currency,
                        int64_t amount, const char *ai, const char *hold, bool deferred, bool claimed,
                        owed_t **out) {
  if (ti >= b->ntenants || txid == NULL || txid[0] == '\0' || strlen(txid) >= sizeof((owed_t *)0)->txid ||
      ref == NULL || strlen(ref) > 256 || currency == NULL || currency[0] == '\0' ||
      strlen(currency) >= sizeof((owed_t *)0)->currency || (ai && strlen(ai) > 256) ||
      (hold && strlen(hold) >= TG_BILLING_HOLD_MAX) || amount < 0)
    return -EINVAL;
  if (find_locked(b, txid))
    return -EEXIST;
  owed_t *e = calloc(1, sizeof *e);
  if (e == NULL || (e->ref = strdup(ref)) == NULL || (e->ai = strdup(ai ? ai : "")) == NULL) {
    if (e)
      owed_free(e);
    return -ENOMEM;
  }
  e->tenant = ti;
  e->deferred = deferred;
  e->claimed = claimed;
  e->amount = amount;
  snprintf(e->txid, sizeof e->txid, "%s", txid);
  snprintf(e->currency, sizeof e->currency, "%s", currency);
  snprintf(e->hold, sizeof e->hold, "%s", hold ? hold : "");
  size_t k = bucket(txid);
  e->next = b->b[k];
  b->b[k] = e;
  b->n++;
  b->t[ti].nowed++;
  *out = e;
  return 0;
}

int tg_billing_book_defer(tg_billing_book_t *b, size_t ti, const char *txid, const char *ref, const char *currency,
                          int64_t amount, const char *ai_system_id, int64_t cap) {
  if (ti >= b->ntenants || currency == NULL || strlen(currency) >= sizeof((outstanding_t *)0)->currency)
    return -EINVAL;
  pthread_mutex_lock(&b->mu);
  outstanding_t *o = outstanding_locked(&b->t[ti], currency, true);
  int rc = 0;
  owed_t *e;
  if (o == NULL || amount < 0 || o->amount > cap - amount) {
    rc = -ENOSPC;
  } else if ((rc = enter_locked(b, ti, txid, ref, currency, amount, ai_system_id, NULL, true, true, &e)) == 0) {
    o->amount += amount;
  }
  if (o && o->amount == 0 && rc != 0)
    o->currency[0] = '\0'; /* a slot taken for nothing */
  if (rc == 0)
    publish_locked(b, ti, o);
  pthread_mutex_unlock(&b->mu);
  count_deferred(b, ti, rc == 0 ? "deferred" : rc == -ENOSPC ? "over_cap" : "error");
  return rc;
}

int tg_billing_book_owe_capture(tg_billing_book_t *b, size_t ti, const char *txid, const char *ref,
                                const char *currency, int64_t amount, const char *ai_system_id, const char *hold) {
  pthread_mutex_lock(&b->mu);
  owed_t *e;
  int rc = enter_locked(b, ti, txid, ref, currency, amount, ai_system_id, hold, false, true, &e);
  if (rc == 0)
    publish_locked(b, ti, NULL);
  pthread_mutex_unlock(&b->mu);
  return rc;
}

void tg_billing_book_set_seq(tg_billing_book_t *b, const char *txid, uint64_t seq) {
  pthread_mutex_lock(&b->mu);
  owed_t *e = find_locked(b, txid);
  if (e)
    e->seq = seq;
  pthread_mutex_unlock(&b->mu);
}

/* Jittered exponential backoff: base * 2^(attempts-1), at most max, +-25%. */
static uint64_t backoff_ms(uint32_t attempts, uint32_t base, uint32_t max) {
  uint64_t d = base ? base : 200;
  for (uint32_t i = 1; i < attempts && d < max; i++)
    d *= 2;
  if (d > max)
    d = max;
  uint64_t jitter = d / 4;
  if (jitter)
    d = d - jitter + (uint64_t)rand() % (2 * jitter + 1);
  return d;
}

static uint64_t now_ms(void) { return uv_hrtime() / 1000000u; }

/* The claim on txid ends: due again after delay_ms (mutex taken here). */
static void unclaim(tg_billing_book_t *b, const char *txid, uint64_t delay_ms, bool failed, const char *hold) {
  pthread_mutex_lock(&b->mu);
  owed_t *e = find_locked(b, txid);
  if (e) {
    e->claimed = false;
    if (failed)
      e->attempts++;
    e->due_ms = now_ms() + delay_ms;
    if (hold)
      snprintf(e->hold, sizeof e->hold, "%s", hold);
  }
  pthread_mutex_unlock(&b->mu);
}

void tg_billing_book_retry(tg_billing_book_t *b, const char *txid, uint32_t delay_ms) {
  unclaim(b, txid, delay_ms, false, NULL);
}

void tg_billing_book_done(tg_billing_book_t *b, const char *txid) {
  pthread_mutex_lock(&b->mu);
  for (owed_t **pp = &b->b[bucket(txid)]; *pp; pp = &(*pp)->next) {
    owed_t *e = *pp;
    if (strcmp(e->txid, txid) != 0)
      continue;
    *pp = e->next;
    b->n--;
    tenant_t *t = &b->t[e->tenant];
    t->nowed--;
    outstanding_t *o = NULL;
    if (e->deferred && (o = outstanding_locked(t, e->currency, false)) != NULL)
      o->amount -= e->amount;
    publish_locked(b, e->tenant, o);
    owed_free(e);
    break;
  }
  pthread_mutex_unlock(&b->mu);
}

size_t tg_billing_book_count(tg_billing_book_t *b) {
  pthread_mutex_lock(&b->mu);
  size_t n = b->n;
  pthread_mutex_unlock(&b->mu);
  return n;
}

uint64_t tg_billing_book_oldest_seq(tg_billing_book_t *b) {
  uint64_t oldest = 0;
  pthread_mutex_lock(&b->mu);
  /* A charge whose record's sequence is not known yet (entered before its
   * append, the durable callback still on its way) may be at any sequence
   * already durable: nothing may go until it is known. */
  for (size_t i = 0; i < BUCKETS; i++)
    for (owed_t *e = b->b[i]; e; e = e->next)
      if (oldest == 0 || (e->seq ? e->seq : 1) < oldest)
        oldest = e->seq ? e->seq : 1;
  pthread_mutex_unlock(&b->mu);
  return oldest;
}

static size_t tenant_index(const tg_billing_book_t *b, const char *name) {
  for (size_t i = 0; i < b->ntenants; i++)
    if (strcmp(b->names[i], name) == 0)
      return i;
  return SIZE_MAX;
}

int tg_billing_book_replay(tg_billing_book_t *b, uint64_t seq, const void *payload, size_t len) {
  Ledger__V1__Record *rec = ledger__v1__record__unpack(NULL, len, payload);
  if (rec == NULL)
    return -EBADMSG;
  const Ledger__V1__Transaction *tx = rec->transaction;
  const Ledger__V1__LedgerChange *lc = rec->ledger_change;
  if (rec->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION && tx->n_items > 0 && tx->n_totals == 1 &&
      (tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED ||
       (tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED &&
        strcmp(tx->billing_type, "connect") == 0))) {
    size_t ti = tenant_index(b, tx->items[0]->tenant);
    bool deferred = tx->outcome == LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED;
    pthread_mutex_lock(&b->mu);
    if (ti == SIZE_MAX || !b->remote[ti]) {
      b->unknown_tenant++;
    } else {
      owed_t *e;
      outstanding_t *o = deferred ? outstanding_locked(&b->t[ti], tx->totals[0]->currency, true) : NULL;
      if (enter_locked(b, ti, tx->id, tx->billing_reference, tx->totals[0]->currency, tx->totals[0]->amount,
                       tx->ai_system_id, NULL, deferred, false, &e) == 0) {
        e->seq = seq;
        if (o)
          o->amount += e->amount; /* replay does not apply the cap: these were served already */
        publish_locked(b, ti, o);
      }
    }
    pthread_mutex_unlock(&b->mu);
  } else if (rec->kind_case == LEDGER__V1__RECORD__KIND_LEDGER_CHANGE && lc->transaction_id[0] != '\0' &&
             (lc->kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE ||
              lc->kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_REFUSED)) {
    tg_billing_book_done(b, lc->transaction_id);
  }
  ledger__v1__record__free_unpacked(rec, NULL);
  return 0;
}

/* ---- The reconciler */

typedef struct job job_t;

struct tg_billing_runner {
  tg_billing_book_t *book;
  uv_loop_t *loop;
  tg_wal_client_t *wal;
  tg_billing_runner_hooks_t hooks;
  uv_timer_t timer;
  uint32_t tick_ms, max_in_flight, call_timeout_ms;
  size_t ntenants;
  uint32_t *backoff, *max_backoff, *health_ms;
  uint64_t *next_health;
  bool *probing;
  bool *blocked;      /* per tenant, this fill: no adapter, or its circuit is open (fail fast: wait) */
  uint32_t in_flight; /* jobs and health probes */
  bool closing, timer_closed;
  bool filling;       /* fill() is running (a job that ends at once must not recurse) */
  bool drained;       /* the last fill found nothing due: wait for the tick */
};

struct job {
  tg_billing_runner_t *r;
  tg_billing_owed_t o; /* points into the strings below */
  char txid[128], currency[17], hold[TG_BILLING_HOLD_MAX];
  char *ref, *ai;
  char why[192];
};

static void runner_maybe_free(tg_billing_runner_t *r) {
  if (!r->closing || !r->timer_closed || r->in_flight > 0)
    return;
  free(r->backoff);
  free(r->max_backoff);
  free(r->health_ms);
  free(r->next_health);
  free(r->probing);
  free(r->blocked);
  free(r);
}

static void fill(tg_billing_runner_t *r);

/* A job ends: its slot goes to the next due charge at once, so the rate is
 * the service's, not one round per tick. */
static void job_end(job_t *j) {
  tg_billing_runner_t *r = j->r;
  free(j->ref);
  free(j->ai);
  free(j);
  r->in_flight--;
  if (!r->closing && !r->drained)
    fill(r);
  runner_maybe_free(r);
}

static uint32_t tenant_backoff(const tg_billing_runner_t *r, size_t ti, uint32_t attempts) {
  return (uint32_t)backoff_ms(attempts, r->backoff[ti], r->max_backoff[ti]);
}

/* The call failed: due again after backoff. */
static void job_retry(job_t *j, const char *hold) {
  unclaim(j->r->book, j->txid, tenant_backoff(j->r, j->o.tenant, j->o.attempts + 1), true, hold);
  job_end(j);
}

static void on_recorded(void *arg, int status, uint64_t seq) {
  job_t *j = arg;
  (void)seq;
  tg_billing_runner_t *r = j->r;
  if (status != 0) {
    /* Not logged: asked again later (capture and refusal are idempotent). */
    tg_log(TG_LOG_ERROR, "billing reconcile: record not logged", "transaction", j->txid, "error",
           strerror(-status), NULL);
    job_retry(j, NULL);
    return;
  }
  bool refused = j->why[0] != '\0';
  tg_billing_book_done(r->book, j->txid);
  if (j->o.deferred)
    count_deferred(r->book, j->o.tenant, refused ? "refused" : "captured");
  if (refused && r->hooks.refused && !r->closing)
    r->hooks.refused(r->hooks.ud, &j->o, j->why);
  job_end(j);
}

static void record(job_t *j, Ledger__V1__LedgerChangeKind kind) {
  size_t len;
  uint8_t *rec = tg_record_ledger_change(kind, j->ref, j->currency, j->o.amount, j->txid,
                                         kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_REFUSED ? j->why
                                                                                                          : NULL,
                                         j->r->book->instance, &len);
  if (rec == NULL || tg_wal_append(j->r->wal, rec, len, on_recorded, j, NULL) != 0) {
    free(rec);
    job_retry(j, NULL);
    return;
  }
  free(rec);
}

static void on_captured(void *arg, const tg_billing_result_t *res) {
  job_t *j = arg;
  switch (res->status) {
  case TG_BILLING_APPROVED: {
    char red[16];
    tg_billing_redact(j->ref, red);
    tg_log(TG_LOG_INFO, j->o.deferred ? "billing reconcile: deferred charge captured" : "billing reconcile: captured",
           "tenant", j->r->book->names[j->o.tenant], "transaction", j->txid, "account", red, NULL);
    j->why[0] = '\0';
    record(j, LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CAPTURE);
    return;
  }
  case TG_BILLING_DECLINED:
    /* The hold is unknown or expired: authorize again (idempotent by
     * transaction id), then capture. */
    job_retry(j, "");
    return;
  default:
    job_retry(j, NULL);
  }
}

static void capture(job_t *j) {
  tg_billing_t *a = j->r->hooks.adapter(j->r->hooks.ud, j->o.tenant);
  if (a == NULL) {
    job_retry(j, NULL);
    return;
  }
  tg_billing_connect_capture(a, j->txid, j->hold, j->o.amount, on_captured, j);
}

static void on_authorized(void *arg, const tg_billing_result_t *res) {
  job_t *j = arg;
  tg_billing_runner_t *r = j->r;
  switch (res->status) {
  case TG_BILLING_APPROVED:
    tg_billing_book_ok(r->book, j->o.tenant);
    snprintf(j->hold, sizeof j->hold, "%s", res->hold);
    capture(j);
    return;
  case TG_BILLING_DECLINED: {
    tg_billing_book_ok(r->book, j->o.tenant);
    char red[16];
    tg_billing_redact(j->ref, red);
    snprintf(j->why, sizeof j->why, "%s", res->detail[0] ? res->detail : "declined");
    tg_log(TG_LOG_ERROR,
           j->o.deferred ? "billing reconcile: billing refused a deferred charge (served, never charged)"
                         : "billing reconcile: billing refused a charge it had approved (served, never charged)",
           "tenant", r->book->names[j->o.tenant], "transaction", j->txid, "account", red, "detail", j->why, NULL);
    record(j, LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_REFUSED);
    return;
  }
  default:
    job_retry(j, NULL);
  }
}

static void start_job(tg_billing_runner_t *r, job_t *j) {
  r->in_flight++;
  if (j->hold[0] != '\0') {
    capture(j);
    return;
  }
  tg_billing_t *a = r->hooks.adapter(r->hooks.ud, j->o.tenant);
  if (a == NULL) {
    job_retry(j, NULL);
    return;
  }
  tg_billing_auth_t au = {0};
  au.tenant = r->book->names[j->o.tenant];
  au.billing_ref = j->ref;
  au.currency = j->currency;
  au.amount = j->o.amount;
  au.transaction_id = j->txid;
  au.ai_system_id = j->ai;
  au.request_id = "";
  au.deadline_ms = uv_now(r->loop) + r->call_timeout_ms;
  a->ops->authorize(a, &au, on_authorized, j);
}

/* Claims up to max due charges of remote tenants (copies). */
static size_t claim(tg_billing_runner_t *r, job_t **out, size_t max) {
  tg_billing_book_t *b = r->book;
  uint64_t now = now_ms();
  size_t n = 0;
  pthread_mutex_lock(&b->mu);
  for (size_t k = 0; k < BUCKETS && n < max; k++)
    for (owed_t *e = b->b[k]; e && n < max; e = e->next) {
      if (e->claimed || e->due_ms > now || e->tenant >= r->ntenants || r->blocked[e->tenant])
        continue;
      job_t *j = calloc(1, sizeof *j);
      if (j == NULL || (j->ref = strdup(e->ref)) == NULL || (j->ai = strdup(e->ai)) == NULL) {
        if (j)
          free(j->ref);
        free(j);
        k = BUCKETS;
        break;
      }
      e->claimed = true;
      j->r = r;
      snprintf(j->txid, sizeof j->txid, "%s", e->txid);
      snprintf(j->currency, sizeof j->currency, "%s", e->currency);
      snprintf(j->hold, sizeof j->hold, "%s", e->hold);
      j->o = (tg_billing_owed_t){.tenant = e->tenant, .txid = j->txid, .ref = j->ref, .currency = j->currency,
                                 .ai_system_id = j->ai, .amount = e->amount, .attempts = e->attempts,
                                 .deferred = e->deferred};
      out[n++] = j;
    }
  pthread_mutex_unlock(&b->mu);
  return n;
}

static void on_health(void *arg, const tg_billing_result_t *res) {
  job_t *j = arg; /* only r and o.tenant are used */
  tg_billing_runner_t *r = j->r;
  size_t ti = j->o.tenant;
  r->probing[ti] = false;
  if (!r->closing) {
    bool serving = res->status == TG_BILLING_APPROVED;
    tg_billing_book_health(r->book, ti, serving);
    if (!serving && !atomic_load(&r->book->t[ti].decided))
      tg_billing_book_decided(r->book, ti, r->hooks.rejects ? r->hooks.rejects(r->hooks.ud, ti) : true);
  }
  job_end(j);
}

static void probe_health(tg_billing_runner_t *r, uint64_t now) {
  for (size_t ti = 0; ti < r->ntenants; ti++) {
    if (r->health_ms[ti] == 0 || r->probing[ti] || now < r->next_health[ti])
      continue;
    tg_billing_t *a = r->hooks.adapter(r->hooks.ud, ti);
    job_t *j = a ? calloc(1, sizeof *j) : NULL;
    if (j == NULL)
      continue;
    j->r = r;
    j->o.tenant = ti;
    r->next_health[ti] = now + r->health_ms[ti];
    r->probing[ti] = true;
    r->in_flight++;
    tg_billing_connect_health(a, on_health, j);
  }
}

/* Starts due charges up to max_in_flight. */
static void fill(tg_billing_runner_t *r) {
  if (r->filling || r->closing)
    return;
  r->filling = true;
  /* A tenant whose circuit is open would fail every charge at once: its
   * charges wait for the probe that closes it (a purchase's, or ours once
   * the cool-down is over). */
  for (size_t ti = 0; ti < r->ntenants; ti++) {
    tg_billing_t *a = r->hooks.adapter(r->hooks.ud, ti);
    r->blocked[ti] = a == NULL || a->ops->health(a) != 0;
  }
  while (r->in_flight < r->max_in_flight) {
    job_t *jobs[64];
    size_t room = r->max_in_flight - r->in_flight;
    size_t n = claim(r, jobs, room < 64 ? room : 64);
    r->drained = n == 0;
    for (size_t i = 0; i < n; i++)
      start_job(r, jobs[i]);
    if (n == 0)
      break;
  }
  r->filling = false;
}

static void on_tick(uv_timer_t *t) {
  tg_billing_runner_t *r = t->data;
  if (r->closing)
    return;
  probe_health(r, now_ms());
  r->drained = false;
  if (tg_billing_book_count(r->book) > 0)
    fill(r);
}

static uint32_t *copy_u32(const uint32_t *src, size_t n, uint32_t dflt) {
  uint32_t *a = calloc(n ? n : 1, sizeof *a);
  for (size_t i = 0; a && i < n; i++)
    a[i] = src ? src[i] : dflt;
  return a;
}

int tg_billing_runner_new(tg_billing_book_t *b, uv_loop_t *loop, tg_wal_client_t *w,
                          const tg_billing_runner_hooks_t *hooks, const tg_billing_runner_opts_t *o, size_t ntenants,
                          tg_billing_runner_t **out) {
  if (b == NULL || loop == NULL || w == NULL || hooks == NULL || hooks->adapter == NULL || o == NULL)
    return -EINVAL;
  tg_billing_runner_t *r = calloc(1, sizeof *r);
  if (r == NULL)
    return -ENOMEM;
  r->book = b;
  r->loop = loop;
  r->wal = w;
  r->hooks = *hooks;
  r->ntenants = ntenants < b->ntenants ? ntenants : b->ntenants;
  r->tick_ms = o->tick_ms ? o->tick_ms : 100;
  r->max_in_flight = o->max_in_flight ? o->max_in_flight : 64;
  r->call_timeout_ms = o->call_timeout_ms ? o->call_timeout_ms : 5000;
  r->backoff = copy_u32(o->backoff_ms, r->ntenants, 200);
  r->max_backoff = copy_u32(o->max_backoff_ms, r->ntenants, 60000);
  r->health_ms = copy_u32(o->health_ms, r->ntenants, 0);
  r->next_health = calloc(r->ntenants ? r->ntenants : 1, sizeof *r->next_health);
  r->probing = calloc(r->ntenants ? r->ntenants : 1, sizeof *r->probing);
  r->blocked = calloc(r->ntenants ? r->ntenants : 1, sizeof *r->blocked);
  int rc = -ENOMEM;
  if (r->backoff && r->max_backoff && r->health_ms && r->next_health && r->probing && r->blocked &&
      (rc = uv_timer_init(loop, &r->timer)) == 0) {
    r->timer.data = r;
    uv_timer_start(&r->timer, on_tick, 0, r->tick_ms);
    *out = r;
    return 0;
  }
  r->closing = r->timer_closed = true;
  runner_maybe_free(r);
  return rc;
}

static void on_timer_closed(uv_handle_t *h) {
  tg_billing_runner_t *r = h->data;
  r->timer_closed = true;
  runner_maybe_free(r);
}

void tg_billing_runner_free(tg_billing_runner_t *r) {
  if (r == NULL)
    return;
  r->closing = true;
  uv_close((uv_handle_t *)&r->timer, on_timer_closed);
}
