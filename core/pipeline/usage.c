#include "pipeline/usage.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/hash.h"
#include "base/log.h"
#include "base/metrics.h"
#include "billing/billing.h"
#include "catalog/rsl.h"
#include "ledger/record.h"
#include "ledger/v1/ledger.pb-c.h"

/* ---- A chained hash table of nodes keyed by a string */

typedef struct hnode {
  struct hnode *next;
  uint64_t hash;
  const char *key;
} hnode_t;

typedef struct htab {
  hnode_t **b;
  size_t nb, n;
} htab_t;

static uint64_t hash_str(const char *s) {
  uint64_t h = tg_fnv1a_str(s);
  return h ^ (h >> 29);
}

static hnode_t *ht_find(const htab_t *t, const char *key) {
  if (t->nb == 0)
    return NULL;
  uint64_t h = hash_str(key);
  for (hnode_t *n = t->b[h & (t->nb - 1)]; n; n = n->next)
    if (n->hash == h && strcmp(n->key, key) == 0)
      return n;
  return NULL;
}

static int ht_add(htab_t *t, hnode_t *n) {
  if (t->n + 1 > t->nb) { /* load factor 1: double */
    size_t nb = t->nb ? t->nb * 2 : 64;
    hnode_t **b = calloc(nb, sizeof *b);
    if (b == NULL)
      return -ENOMEM;
    for (size_t i = 0; i < t->nb; i++)
      for (hnode_t *x = t->b[i], *next; x; x = next) {
        next = x->next;
        x->next = b[x->hash & (nb - 1)];
        b[x->hash & (nb - 1)] = x;
      }
    free(t->b);
    t->b = b;
    t->nb = nb;
  }
  n->hash = hash_str(n->key);
  n->next = t->b[n->hash & (t->nb - 1)];
  t->b[n->hash & (t->nb - 1)] = n;
  t->n++;
  return 0;
}

static void ht_del(htab_t *t, hnode_t *n) {
  for (hnode_t **p = &t->b[n->hash & (t->nb - 1)]; *p; p = &(*p)->next)
    if (*p == n) {
      *p = n->next;
      t->n--;
      return;
    }
}

/* ---- The book */

typedef enum { ST_NONE = 0, ST_PENDING, ST_OVERDUE, ST_REPORTED } state_t;

struct akey;

typedef struct ob {
  hnode_t node;            /* by txid (node.key) */
  struct ob *prev, *next;  /* in the open or the closed list */
  int list;                /* 0 none, 1 open, 2 closed */
  state_t state;
  bool reported, late, claimed;
  uint64_t seq;            /* the Transaction record's */
  int64_t due_at, reported_at, adjustment;
  ptrdiff_t gidx, kidx;    /* positions in the global pending heap and its key's heap; -1 none */
  struct akey *key;        /* open obligations: the AI system's entry */
  size_t tenant_index;     /* SIZE_MAX: not configured */
  char *txid, *tenant, *ai_system_id, *billing_ref;
  char currency[17];
  size_t nitems;
  tg_usage_item_t *items;  /* offer_id points into this allocation */
} ob_t;

typedef struct heap {
  ob_t **a;
  size_t n, cap;
} heap_t;

/* An AI system's open obligations: pending ones by due time, overdue ones by due time. */
typedef struct akey {
  hnode_t node;
  heap_t pend, over;
  char name[];
} akey_t;

typedef struct dev {
  hnode_t node;
  int64_t estimated, consumed;
  char label[16];
} devsum_t;

typedef struct tstats {
  uint64_t pending, overdue, reported, on_time, late;
  htab_t devs;
  size_t ndevs;
} tstats_t;

typedef struct tname {
  const char *name;
  size_t index;
} tname_t;

typedef struct list {
  ob_t *head, *tail;
} list_t;

struct tg_usage {
  pthread_mutex_t mu;
  const tg_config_t *cfg;
  size_t max;
  htab_t obs;              /* ob_t by txid */
  htab_t keys;             /* akey_t by "i:<ai id>" or "r:<billing ref>" */
  heap_t pending;          /* every pending obligation, by due time */
  list_t open, closed;     /* open: pending and overdue, by sequence; closed: the rest, by closing */
  tstats_t *stats;         /* per configured tenant */
  tname_t *names;          /* tenants sorted by name */
};

static tg_metric_t *m_obl, *m_open, *m_rate, *m_dev, *m_devcum;

int tg_usage_metrics_init(void) {
  static const char *const ls[] = {"tenant_id", "state", NULL};
  static const char *const lt[] = {"tenant_id", NULL};
  static const char *const lr[] = {"tenant_id", "billing_ref", NULL};
  static const double buckets[] = {-1, -0.5, -0.25, -0.1, -0.01, 0, 0.01, 0.1, 0.25, 0.5, 1, 2, 5, 10, 100};
  m_obl = tg_metric_new(TG_METRIC_COUNTER, "reporting_obligations_total",
                        "Usage report obligations by tenant and the state they reached: pending (owed after a "
                        "purchase), overdue (their due time passed unreported), reported (on time or late).",
                        ls, NULL, 0);
  m_open = tg_metric_new(TG_METRIC_GAUGE, "reporting_obligations_open",
                         "Usage reports owed now, by tenant and state: pending (not due yet), overdue (due and "
                         "not reported).",
                         ls, NULL, 0);
  m_rate = tg_metric_new(TG_METRIC_GAUGE, "reporting_compliance_rate",
                         "Usage reports made on time over the obligations due so far (on time, late, overdue), "
                         "by tenant; 1 while none is due.",
                         lt, NULL, 0);
  m_dev = tg_metric_new(TG_METRIC_HISTOGRAM, "reporting_token_deviation",
                        "Per usage report: (consumed - estimated) / estimated tokens over its items (consumed "
                        "tokens when none were estimated), by tenant.",
                        lt, buckets, sizeof buckets / sizeof buckets[0]);
  m_devcum = tg_metric_new(TG_METRIC_GAUGE, "reporting_token_deviation_cumulative",
                           "(consumed - estimated) / estimated tokens over every usage report of a billing "
                           "reference (redacted; at most 1000 per tenant, then \"other\"), by tenant.",
                           lr, NULL, 0);
  return m_obl && m_open && m_rate && m_dev && m_devcum ? 0 : -ENOMEM;
}

/* ---- heaps (min by due time, then sequence), indexed through the ob */

static ptrdiff_t *hidx(ob_t *o, int global) { return global ? &o->gidx : &o->kidx; }

static bool before(const ob_t *a, const ob_t *b) {
  return a->due_at < b->due_at || (a->due_at == b->due_at && a->seq < b->seq);
}

static void hset(heap_t *h, size_t i, ob_t *o, int g) {
  h->a[i] = o;
  *hidx(o, g) = (ptrdiff_t)i;
}

static void sift_up(heap_t *h, size_t i, int g) {
  ob_t *o = h->a[i];
  while (i > 0) {
    size_t p = (i - 1) / 2;
    if (!before(o, h->a[p]))
      break;
    hset(h, i, h->a[p], g);
    i = p;
  }
  hset(h, i, o, g);
}

static void sift_down(heap_t *h, size_t i, int g) {
  ob_t *o = h->a[i];
  for (;;) {
    size_t l = 2 * i + 1, m = i;
    const ob_t *best = o;
    if (l < h->n && before(h->a[l], best))
      m = l, best = h->a[l];
    if (l + 1 < h->n && before(h->a[l + 1], best))
      m = l + 1;
    if (m == i)
      break;
    hset(h, i, h->a[m], g);
    i = m;
  }
  hset(h, i, o, g);
}

static int heap_push(heap_t *h, ob_t *o, int g) {
  if (h->n == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : 8;
    ob_t **a = realloc(h->a, cap * sizeof *a);
    if (a == NULL)
      return -ENOMEM;
    h->a = a;
    h->cap = cap;
  }
  h->a[h->n++] = o;
  sift_up(h, h->n - 1, g);
  return 0;
}

static void heap_remove(heap_t *h, ob_t *o, int g) {
  ptrdiff_t *ip = hidx(o, g);
  if (*ip < 0)
    return;
  size_t i = (size_t)*ip;
  *ip = -1;
  ob_t *last = h->a[--h->n];
  if (i == h->n)
    return;
  hset(h, i, last, g);
  sift_up(h, i, g);
  sift_down(h, (size_t)*hidx(last, g), g);
}

/* ---- lists */

static void list_del(tg_usage_t *u, ob_t *o) {
  list_t *l = o->list == 1 ? &u->open : o->list == 2 ? &u->closed : NULL;
  if (l == NULL)
    return;
  if (o->prev)
    o->prev->next = o->next;
  else
    l->head = o->next;
  if (o->next)
    o->next->prev = o->prev;
  else
    l->tail = o->prev;
  o->prev = o->next = NULL;
  o->list = 0;
}

static void list_add(tg_usage_t *u, ob_t *o, int which) {
  list_del(u, o);
  list_t *l = which == 1 ? &u->open : &u->closed;
  o->prev = l->tail;
  o->next = NULL;
  if (l->tail)
    l->tail->next = o;
  else
    l->head = o;
  l->tail = o;
  o->list = which;
}

/* ---- tenants */

static int cmp_tname(const void *a, const void *b) {
  return strcmp(((const tname_t *)a)->name, ((const tname_t *)b)->name);
}

static size_t tenant_find(const tg_usage_t *u, const char *name) {
  tname_t k = {name, 0};
  const tname_t *t = u->cfg->ntenants ? bsearch(&k, u->names, u->cfg->ntenants, sizeof k, cmp_tname) : NULL;
  return t ? t->index : SIZE_MAX;
}

static const tg_config_tenant_t *tenant_cfg(const tg_usage_t *u, size_t ti) {
  return ti < u->cfg->ntenants ? &u->cfg->tenants[ti] : NULL;
}

static void publish(tg_usage_t *u, size_t ti) {
  if (ti >= u->cfg->ntenants)
    return;
  const tstats_t *s = &u->stats[ti];
  const char *name = u->cfg->tenants[ti].name;
  const char *lp[] = {name, "pending"}, *lo[] = {name, "overdue"}, *lt[] = {name};
  tg_gauge_set(m_open, lp, (double)s->pending);
  tg_gauge_set(m_open, lo, (double)s->overdue);
  uint64_t due = s->on_time + s->late + s->overdue;
  tg_gauge_set(m_rate, lt, due ? (double)s->on_time / (double)due : 1.0);
}

/* reporting_obligations_total{tenant_id,state}: an obligation reached state. */
static void count(const tg_usage_t *u, size_t ti, const char *state) {
  if (ti >= u->cfg->ntenants)
    return;
  const char *l[] = {u->cfg->tenants[ti].name, state};
  tg_counter_add(m_obl, l, 1);
}

/* ---- keys (AI systems) */

static void key_name(const char *ai_system_id, const char *ref, char *out, size_t outlen) {
  if (ai_system_id && ai_system_id[0])
    snprintf(out, outlen, "i:%s", ai_system_id);
  else
    snprintf(out, outlen, "r:%s", ref ? ref : "");
}

static akey_t *key_get(tg_usage_t *u, const char *ai_system_id, const char *ref) {
  char name[600];
  key_name(ai_system_id, ref, name, sizeof name);
  hnode_t *n = ht_find(&u->keys, name);
  if (n)
    return (akey_t *)n;
  size_t len = strlen(name);
  akey_t *k = calloc(1, sizeof *k + len + 1);
  if (k == NULL)
    return NULL;
  memcpy(k->name, name, len + 1);
  k->node.key = k->name;
  if (ht_add(&u->keys, &k->node) != 0) {
    free(k);
    return NULL;
  }
  return k;
}

static void key_drop_if_empty(tg_usage_t *u, akey_t *k) {
  if (k == NULL || k->pend.n > 0 || k->over.n > 0)
    return;
  ht_del(&u->keys, &k->node);
  free(k->pend.a);
  free(k->over.a);
  free(k);
}

/* ---- state changes (mu held) */

static void make_overdue(tg_usage_t *u, ob_t *o) {
  heap_remove(&u->pending, o, 1);
  if (o->key) {
    heap_remove(&o->key->pend, o, 0);
    if (heap_push(&o->key->over, o, 0) != 0)
      tg_log(TG_LOG_ERROR, "usage: out of memory, an overdue report is not counted", "transaction", o->txid, NULL);
  }
  o->state = ST_OVERDUE;
  if (o->tenant_index < u->cfg->ntenants) {
    u->stats[o->tenant_index].pending--;
    u->stats[o->tenant_index].overdue++;
  }
  count(u, o->tenant_index, "overdue");
}

/* Takes an open obligation out of the heaps and its key (before it is
 * reported or forgotten). */
static void close_open(tg_usage_t *u, ob_t *o) {
  tstats_t *s = o->tenant_index < u->cfg->ntenants ? &u->stats[o->tenant_index] : NULL;
  if (o->state == ST_PENDING) {
    heap_remove(&u->pending, o, 1);
    if (o->key)
      heap_remove(&o->key->pend, o, 0);
    if (s)
      s->pending--;
  } else if (o->state == ST_OVERDUE) {
    if (o->key)
      heap_remove(&o->key->over, o, 0);
    if (s)
      s->overdue--;
  }
  key_drop_if_empty(u, o->key);
  o->key = NULL;
}

static void ob_free(tg_usage_t *u, ob_t *o) {
  close_open(u, o);
  list_del(u, o);
  ht_del(&u->obs, &o->node);
  free(o);
}

static void evict_one(tg_usage_t *u) {
  ob_t *o = u->closed.head;
  if (o == NULL) {
    o = u->open.head;
    if (o == NULL)
      return;
    static _Atomic uint64_t last;
    uint64_t now = (uint64_t)time(NULL), prev = last;
    if (now != prev && atomic_compare_exchange_strong(&last, &prev, now))
      tg_log(TG_LOG_WARN, "usage: the book is full of open obligations: the oldest is forgotten", "transaction",
             o->txid, NULL);
  }
  size_t ti = o->tenant_index;
  ob_free(u, o);
  publish(u, ti);
}

/* ---- construction */

tg_usage_t *tg_usage_new(const tg_config_t *cfg, size_t max_entries) {
  tg_usage_t *u = calloc(1, sizeof *u);
  if (u == NULL)
    return NULL;
  pthread_mutex_init(&u->mu, NULL);
  u->cfg = cfg;
  u->max = max_entries ? max_entries : TG_USAGE_DEFAULT_MAX;
  size_t n = cfg->ntenants ? cfg->ntenants : 1;
  u->stats = calloc(n, sizeof *u->stats);
  u->names = calloc(n, sizeof *u->names);
  if (u->stats == NULL || u->names == NULL) {
    tg_usage_free(u);
    return NULL;
  }
  for (size_t i = 0; i < cfg->ntenants; i++)
    u->names[i] = (tname_t){cfg->tenants[i].name, i};
  if (cfg->ntenants)
    qsort(u->names, cfg->ntenants, sizeof *u->names, cmp_tname);
  return u;
}

void tg_usage_free(tg_usage_t *u) {
  if (u == NULL)
    return;
  for (ob_t *o = u->open.head, *next; o; o = next) {
    next = o->next;
    ob_free(u, o);
  }
  for (ob_t *o = u->closed.head, *next; o; o = next) {
    next = o->next;
    ob_free(u, o);
  }
  free(u->obs.b);
  free(u->keys.b);
  free(u->pending.a);
  if (u->stats) {
    for (size_t i = 0; i < u->cfg->ntenants; i++) {
      htab_t *t = &u->stats[i].devs;
      for (size_t b = 0; b < t->nb; b++)
        for (hnode_t *x = t->b[b], *next; x; x = next) {
          next = x->next;
          free(x);
        }
      free(t->b);
    }
  }
  free(u->stats);
  free(u->names);
  pthread_mutex_destroy(&u->mu);
  free(u);
}

/* ---- records */

static const char *str_or(const char *s) { return s ? s : ""; }

static void add_transaction(tg_usage_t *u, uint64_t seq, const Ledger__V1__Transaction *tx) {
  if (tx->outcome != LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED &&
      tx->outcome != LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_DEFERRED)
    return;
  if (tx->id[0] == '\0' || tx->n_items == 0 || tx->n_items > TG_USAGE_MAX_ITEMS || ht_find(&u->obs, tx->id))
    return;
  while (u->obs.n >= u->max && (u->closed.head || u->open.head))
    evict_one(u);
  const char *tenant = str_or(tx->items[0]->tenant);
  size_t size = sizeof(ob_t) + tx->n_items * sizeof(tg_usage_item_t) + strlen(tx->id) + strlen(tenant) +
                strlen(str_or(tx->ai_system_id)) + strlen(str_or(tx->billing_reference)) + 4;
  for (size_t i = 0; i < tx->n_items; i++)
    size += strlen(str_or(tx->items[i]->offer_id)) + 1;
  ob_t *o = calloc(1, size);
  if (o == NULL) {
    tg_log(TG_LOG_ERROR, "usage: out of memory, a transaction is not in the usage book", "transaction", tx->id, NULL);
    return;
  }
  o->items = (tg_usage_item_t *)(o + 1);
  char *p = (char *)(o->items + tx->n_items);
#define COPY(dst, src)                                                                                               \
  do {                                                                                                               \
    size_t l_ = strlen(src) + 1;                                                                                     \
    memcpy(p, src, l_);                                                                                              \
    dst = p;                                                                                                         \
    p += l_;                                                                                                         \
  } while (0)
  COPY(o->txid, tx->id);
  COPY(o->tenant, tenant);
  COPY(o->ai_system_id, str_or(tx->ai_system_id));
  COPY(o->billing_ref, str_or(tx->billing_reference));
  o->nitems = tx->n_items;
  o->seq = seq;
  o->gidx = o->kidx = -1;
  o->tenant_index = tenant_find(u, tenant);
  const tg_config_tenant_t *t = tenant_cfg(u, o->tenant_index);
  bool per_1k = t && t->usage.token_pricing == TG_CONFIG_TOKEN_PRICING_PER_1K;
  for (size_t i = 0; i < tx->n_items; i++) {
    const Ledger__V1__TransactionItem *it = tx->items[i];
    COPY(o->items[i].offer_id, str_or(it->offer_id));
    o->items[i].amount = it->amount;
    o->items[i].estimated = it->estimated_tokens;
    o->items[i].consumed = it->estimated_tokens;
    o->items[i].per_1k = per_1k && it->payment_type == TG_RSL_PAY_USE;
  }
#undef COPY
  const char *cur = tx->n_totals > 0 ? str_or(tx->totals[0]->currency) : str_or(tx->items[0]->currency);
  snprintf(o->currency, sizeof o->currency, "%s", cur);
  o->node.key = o->txid;
  if (ht_add(&u->obs, &o->node) != 0) {
    free(o);
    return;
  }
  o->due_at = tx->report_due_at_unix > 0 ? tx->report_due_at_unix : 0;
  if (o->due_at > 0 && (o->key = key_get(u, o->ai_system_id, o->billing_ref)) != NULL &&
      heap_push(&o->key->pend, o, 0) == 0) {
    if (heap_push(&u->pending, o, 1) != 0)
      heap_remove(&o->key->pend, o, 0);
  }
  if (o->kidx >= 0 && o->gidx >= 0) {
    o->state = ST_PENDING;
    if (o->tenant_index < u->cfg->ntenants)
      u->stats[o->tenant_index].pending++;
    count(u, o->tenant_index, "pending");
    list_add(u, o, 1);
  } else {
    if (o->due_at > 0)
      tg_log(TG_LOG_ERROR, "usage: out of memory, an obligation is not tracked", "transaction", o->txid, NULL);
    key_drop_if_empty(u, o->key);
    o->key = NULL;
    o->state = ST_NONE;
    list_add(u, o, 2);
  }
  publish(u, o->tenant_index);
}

static void observe_deviation(tg_usage_t *u, const ob_t *o) {
  int64_t est = 0, cons = 0;
  for (size_t i = 0; i < o->nitems; i++) {
    est += o->items[i].estimated;
    cons += o->items[i].consumed;
  }
  if (o->tenant_index >= u->cfg->ntenants)
    return;
  const char *name = u->cfg->tenants[o->tenant_index].name;
  const char *lt[] = {name};
  tg_histogram_observe(m_dev, lt, est ? (double)(cons - est) / (double)est : (double)cons);
  tstats_t *s = &u->stats[o->tenant_index];
  char label[16];
  tg_billing_redact(o->billing_ref, label);
  devsum_t *d = (devsum_t *)ht_find(&s->devs, label);
  if (d == NULL && s->ndevs >= 1000)
    d = (devsum_t *)ht_find(&s->devs, "other");
  if (d == NULL) {
    if ((d = calloc(1, sizeof *d)) == NULL)
      return;
    snprintf(d->label, sizeof d->label, "%s", s->ndevs >= 1000 ? "other" : label);
    d->node.key = d->label;
    if (ht_add(&s->devs, &d->node) != 0) {
      free(d);
      return;
    }
    s->ndevs++;
  }
  d->estimated += est;
  d->consumed += cons;
  const char *lr[] = {name, d->label};
  tg_gauge_set(m_devcum, lr,
               d->estimated ? (double)(d->consumed - d->estimated) / (double)d->estimated : (double)d->consumed);
}

static void add_report(tg_usage_t *u, const Ledger__V1__UsageReport *r) {
  hnode_t *n = ht_find(&u->obs, str_or(r->transaction_id));
  if (n == NULL)
    return; /* another instance's, or no longer in the book */
  ob_t *o = (ob_t *)n;
  o->claimed = false;
  if (o->reported)
    return; /* the first report stands */
  for (size_t i = 0; i < r->n_items; i++)
    for (size_t j = 0; j < o->nitems; j++)
      if (strcmp(str_or(r->items[i]->offer_id), o->items[j].offer_id) == 0) {
        o->items[j].consumed = r->items[i]->consumed_tokens;
        o->items[j].adjustment = r->items[i]->adjustment;
      }
  o->reported = true;
  o->late = r->late;
  o->reported_at = r->reported_at_unix;
  o->adjustment = r->adjustment ? r->adjustment->amount : 0;
  close_open(u, o);
  if (o->state != ST_NONE) {
    o->state = ST_REPORTED;
    count(u, o->tenant_index, "reported");
    if (o->tenant_index < u->cfg->ntenants) {
      tstats_t *s = &u->stats[o->tenant_index];
      s->reported++;
      if (o->late)
        s->late++;
      else
        s->on_time++;
    }
  }
  list_add(u, o, 2);
  observe_deviation(u, o);
  publish(u, o->tenant_index);
}

int tg_usage_apply(tg_usage_t *u, uint64_t seq, const void *payload, size_t len) {
  Ledger__V1__Record *rec = ledger__v1__record__unpack(NULL, len, payload);
  if (rec == NULL)
    return -EBADMSG;
  pthread_mutex_lock(&u->mu);
  if (rec->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION)
    add_transaction(u, seq, rec->transaction);
  else if (rec->kind_case == LEDGER__V1__RECORD__KIND_USAGE_REPORT)
    add_report(u, rec->usage_report);
  pthread_mutex_unlock(&u->mu);
  ledger__v1__record__free_unpacked(rec, NULL);
  return 0;
}

void tg_usage_tick(tg_usage_t *u, int64_t now) {
  if (u == NULL)
    return;
  pthread_mutex_lock(&u->mu);
  while (u->pending.n > 0 && u->pending.a[0]->due_at < now)
    make_overdue(u, u->pending.a[0]);
  for (size_t i = 0; i < u->cfg->ntenants; i++)
    publish(u, i);
  pthread_mutex_unlock(&u->mu);
}

uint64_t tg_usage_oldest_seq(tg_usage_t *u) {
  if (u == NULL)
    return 0;
  int64_t now = (int64_t)time(NULL);
  uint64_t seq = 0;
  pthread_mutex_lock(&u->mu);
  for (ob_t *o = u->open.head; o; o = o->next)
    if (!(o->due_at + TG_USAGE_OVERDUE_HOLD_S < now)) {
      seq = o->seq;
      break;
    }
  pthread_mutex_unlock(&u->mu);
  return seq;
}

int tg_usage_overdue(tg_usage_t *u, const char *ai_system_id, const char *billing_ref, uint32_t limit,
                     char *detail, size_t dlen) {
  if (u == NULL || limit == 0)
    return 0;
  char name[600];
  key_name(ai_system_id, billing_ref, name, sizeof name);
  int64_t now = (int64_t)time(NULL);
  int over = 0;
  pthread_mutex_lock(&u->mu);
  akey_t *k = (akey_t *)ht_find(&u->keys, name);
  if (k) {
    while (k->pend.n > 0 && k->pend.a[0]->due_at < now) {
      ob_t *o = k->pend.a[0];
      make_overdue(u, o);
      publish(u, o->tenant_index);
    }
    if (k->over.n > limit) {
      char since[32];
      time_t t = (time_t)k->over.a[0]->due_at;
      struct tm tm;
      gmtime_r(&t, &tm);
      strftime(since, sizeof since, "%Y-%m-%dT%H:%M:%SZ", &tm);
      snprintf(detail, dlen, "%zu usage reports overdue since %s: report them with ReportUsage", k->over.n, since);
      over = 1;
    }
  }
  pthread_mutex_unlock(&u->mu);
  return over;
}

void tg_usage_stats(tg_usage_t *u, const char *tenant, tg_usage_stats_t *out) {
  *out = (tg_usage_stats_t){0};
  pthread_mutex_lock(&u->mu);
  size_t ti = tenant_find(u, tenant);
  if (ti < u->cfg->ntenants) {
    const tstats_t *s = &u->stats[ti];
    out->pending = s->pending;
    out->overdue = s->overdue;
    out->reported = s->reported;
    out->on_time = s->on_time;
    out->late = s->late;
  }
  out->entries = u->obs.n;
  pthread_mutex_unlock(&u->mu);
}

/* ---- pricing */

int tg_usage_due(const tg_config_tenant_t *t, bool license_reporting, int64_t now, int64_t *due_at) {
  *due_at = 0;
  if (t && t->usage.report_within_s > 0)
    *due_at = now + (int64_t)t->usage.report_within_s;
  else if (license_reporting)
    *due_at = now + 86400;
  return *due_at > 0;
}

/* ceil(amount * tokens / 1000), amount and tokens >= 0. */
static int per_1k(int64_t amount, int64_t tokens, int64_t *out) {
  __int128 v = ((__int128)amount * tokens + 999) / 1000;
  if (v > INT64_MAX)
    return -EOVERFLOW;
  *out = (int64_t)v;
  return 0;
}

int tg_usage_item_charge(const tg_config_tenant_t *t, int64_t amount, uint32_t payment_type, int64_t estimated_tokens,
                         int64_t *charge) {
  if (amount < 0 || estimated_tokens < 0)
    return -EINVAL;
  if (t == NULL || t->usage.token_pricing != TG_CONFIG_TOKEN_PRICING_PER_1K || payment_type != TG_RSL_PAY_USE) {
    *charge = amount;
    return 0;
  }
  return per_1k(amount, estimated_tokens, charge);
}

/* ---- claims */

void tg_usage_claim_clear(tg_usage_claim_t *c) {
  free(c->strings);
  c->strings = NULL;
}

/* Copies o into out (the offer ids into out->strings); counts from consumed
 * (NULL: o's). -ENOMEM. */
static int fill_claim(const ob_t *o, const int64_t *consumed, tg_usage_claim_t *out) {
  size_t size = 1;
  for (size_t i = 0; i < o->nitems; i++)
    size += strlen(o->items[i].offer_id) + 1;
  char *p = malloc(size);
  if (p == NULL)
    return -ENOMEM;
  out->strings = p;
  snprintf(out->txid, sizeof out->txid, "%s", o->txid);
  snprintf(out->tenant, sizeof out->tenant, "%s", o->tenant);
  out->tenant_index = o->tenant_index;
  snprintf(out->currency, sizeof out->currency, "%s", o->currency);
  snprintf(out->ai_system_id, sizeof out->ai_system_id, "%s", o->ai_system_id);
  snprintf(out->billing_ref, sizeof out->billing_ref, "%s", o->billing_ref);
  out->due_at = o->due_at;
  out->nitems = o->nitems;
  out->any_per_1k = false;
  for (size_t i = 0; i < o->nitems; i++) {
    size_t l = strlen(o->items[i].offer_id) + 1;
    memcpy(p, o->items[i].offer_id, l);
    out->items[i] = o->items[i];
    out->items[i].offer_id = p;
    p += l;
    if (consumed)
      out->items[i].consumed = consumed[i];
    out->any_per_1k = out->any_per_1k || o->items[i].per_1k;
  }
  return 0;
}

int tg_usage_claim(tg_usage_t *u, const char *txid, const char *ai_system_id, const char *billing_ref,
                   const tg_usage_use_t *uses, size_t nuses, int64_t now, tg_usage_claim_t *out, char *why,
                   size_t wlen) {
  memset(out, 0, offsetof(tg_usage_claim_t, items));
  out->strings = NULL;
  out->nitems = 0;
  int rc = 0;
  int64_t consumed[TG_USAGE_MAX_ITEMS];
  pthread_mutex_lock(&u->mu);
  ob_t *o = (ob_t *)ht_find(&u->obs, txid);
  if (o == NULL) {
    rc = -ENOENT;
    goto done;
  }
  if (strcmp(str_or(ai_system_id), o->ai_system_id) != 0 || strcmp(str_or(billing_ref), o->billing_ref) != 0) {
    rc = -EPERM;
    goto done;
  }
  for (size_t j = 0; j < o->nitems; j++)
    consumed[j] = o->items[j].estimated;
  for (size_t i = 0; i < nuses; i++) {
    size_t j = 0;
    while (j < o->nitems && strcmp(uses[i].offer_id, o->items[j].offer_id) != 0)
      j++;
    if (j == o->nitems) {
      snprintf(why, wlen, "usage[%zu].offer_id: not an item of transaction %s", i, txid);
      rc = -EINVAL;
      goto done;
    }
    consumed[j] = uses[i].consumed;
  }
  if (o->reported) {
    for (size_t j = 0; j < o->nitems; j++)
      if (consumed[j] != o->items[j].consumed) {
        rc = -EEXIST;
        goto done;
      }
    if ((rc = fill_claim(o, NULL, out)) == 0) {
      out->reported_at = o->reported_at;
      out->late = o->late;
      out->adjustment = o->adjustment;
      rc = TG_USAGE_SAME;
    }
    goto done;
  }
  if (o->claimed) {
    rc = -EBUSY;
    goto done;
  }
  if ((rc = fill_claim(o, consumed, out)) != 0)
    goto done;
  int64_t total = 0;
  for (size_t j = 0; j < out->nitems; j++) {
    tg_usage_item_t *it = &out->items[j];
    int64_t a = 0, b = 0;
    it->adjustment = 0;
    if (!it->per_1k)
      continue;
    if (per_1k(it->amount, it->consumed, &a) != 0 || per_1k(it->amount, it->estimated, &b) != 0 ||
        __builtin_add_overflow(total, a - b, &total)) {
      snprintf(why, wlen, "usage: the adjustment of transaction %s overflows", txid);
      tg_usage_claim_clear(out);
      rc = -EINVAL;
      goto done;
    }
    it->adjustment = a - b;
  }
  out->adjustment = total;
  out->reported_at = now;
  out->late = o->due_at > 0 && now > o->due_at;
  o->claimed = true;
done:
  pthread_mutex_unlock(&u->mu);
  return rc;
}

void tg_usage_unclaim(tg_usage_t *u, const char *txid) {
  pthread_mutex_lock(&u->mu);
  ob_t *o = (ob_t *)ht_find(&u->obs, txid);
  if (o)
    o->claimed = false;
  pthread_mutex_unlock(&u->mu);
}

uint8_t *tg_usage_record(const tg_usage_claim_t *c, const char *billing, const char *detail, const char *instance,
                         const char *request_id, size_t *len) {
  Ledger__V1__Record rec = LEDGER__V1__RECORD__INIT;
  Ledger__V1__UsageReport r = LEDGER__V1__USAGE_REPORT__INIT;
  Ledger__V1__Amount adj = LEDGER__V1__AMOUNT__INIT;
  Ledger__V1__UsageItem items[TG_USAGE_MAX_ITEMS];
  Ledger__V1__UsageItem *ptrs[TG_USAGE_MAX_ITEMS];
  rec.at_unix_ms = tg_record_now_ms();
  rec.instance = (char *)str_or(instance);
  rec.kind_case = LEDGER__V1__RECORD__KIND_USAGE_REPORT;
  rec.usage_report = &r;
  r.transaction_id = (char *)c->txid;
  r.ai_system_id = (char *)c->ai_system_id;
  r.billing_reference = (char *)c->billing_ref;
  r.tenant = (char *)c->tenant;
  r.reported_at_unix = c->reported_at;
  r.due_at_unix = c->due_at;
  r.late = c->late;
  r.adjustment_billing = (char *)str_or(billing);
  r.adjustment_detail = (char *)str_or(detail);
  r.request_id = (char *)str_or(request_id);
  if (c->any_per_1k) {
    adj.currency = (char *)c->currency;
    adj.amount = c->adjustment;
    r.adjustment = &adj;
  }
  for (size_t i = 0; i < c->nitems; i++) {
    ledger__v1__usage_item__init(&items[i]);
    items[i].offer_id = (char *)c->items[i].offer_id;
    items[i].consumed_tokens = c->items[i].consumed;
    items[i].estimated_tokens = c->items[i].estimated;
    items[i].adjustment = c->items[i].adjustment;
    ptrs[i] = &items[i];
  }
  r.n_items = c->nitems;
  r.items = ptrs;
  *len = ledger__v1__record__get_packed_size(&rec);
  uint8_t *out = malloc(*len ? *len : 1);
  if (out)
    ledger__v1__record__pack(&rec, out);
  return out;
}

/* ---- ReportUsage */

typedef struct report {
  tg_app_worker_t *aw;
  tg_connect_call_t *call;
  tg_billing_t *billing;
  char request_id[64];
  int appends;            /* appends still out */
  int failed;             /* the first failure's status */
  bool claimed, has_hold;
  char hold[TG_BILLING_HOLD_MAX];
  char mode[16];          /* UsageReport.adjustment_billing */
  char detail[192];
  char auth_txid[80];     /* "<txid>:usage", the billing id of an extra charge */
  const Ramp__V1__ReportUsageRequest *req; /* valid until the call is finished */
  tg_usage_use_t uses[TG_USAGE_MAX_ITEMS];
  uv_timer_t timer;       /* polls while another call's report of the transaction is being logged */
  bool timer_open;
  uint64_t wait_until;
  tg_usage_claim_t c;
} report_t;

static void on_timer_closed(uv_handle_t *h) { free(h->data); }

static void report_free(report_t *r) {
  tg_usage_claim_clear(&r->c);
  if (r->timer_open) {
    r->timer.data = r;
    uv_close((uv_handle_t *)&r->timer, on_timer_closed);
  } else {
    free(r);
  }
}

/* The answer, from a claim (a new report, or the first one's). */
static void reply(tg_connect_call_t *call, const tg_usage_claim_t *c) {
  Ramp__V1__ReportUsageResponse resp = RAMP__V1__REPORT_USAGE_RESPONSE__INIT;
  Ramp__V1__Money m = RAMP__V1__MONEY__INIT;
  Ramp__V1__UsageRecord *recs = tg_connect_call_alloc(call, c->nitems * sizeof *recs);
  Ramp__V1__UsageRecord **ptrs = tg_connect_call_alloc(call, c->nitems * sizeof *ptrs);
  if (recs == NULL || ptrs == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  for (size_t i = 0; i < c->nitems; i++) {
    ramp__v1__usage_record__init(&recs[i]);
    recs[i].offer_id = (char *)c->items[i].offer_id;
    recs[i].consumed_tokens = c->items[i].consumed;
    recs[i].estimated_tokens = c->items[i].estimated;
    ptrs[i] = &recs[i];
  }
  resp.transaction_id = (char *)c->txid;
  resp.accepted = true;
  resp.n_usage = c->nitems;
  resp.usage = ptrs;
  if (c->any_per_1k) {
    m.currency = (char *)c->currency;
    m.amount = c->adjustment;
    resp.adjustment = &m;
  }
  tg_connect_reply(call, &resp.base);
}

static void on_captured(void *arg, const tg_billing_result_t *res) {
  report_t *r = arg;
  if (res->status != TG_BILLING_APPROVED)
    tg_log_req(TG_LOG_ERROR, r->request_id, "usage: the adjustment's capture failed (the publisher collects it)",
               "transaction", r->c.txid, "detail", res->detail, NULL);
  report_free(r);
}

static void on_released(void *arg, const tg_billing_result_t *res) {
  (void)arg;
  if (res->status != TG_BILLING_APPROVED)
    tg_log(TG_LOG_WARN, "usage: an adjustment hold was not released (it expires by itself)", "detail", res->detail,
           NULL);
}

static void append_failed(report_t *r, int rc) {
  char msg[200];
  if (rc == -ENOSPC)
    snprintf(msg, sizeof msg, "the transaction log is full: the report was not recorded; retry later");
  else if (rc == -EAGAIN)
    snprintf(msg, sizeof msg, "the transaction log is behind: retry in a second; the report was not recorded");
  else
    snprintf(msg, sizeof msg, "the transaction log cannot take records (%s): retry later", strerror(-rc));
  if (rc == -EAGAIN || rc == -ENOSPC)
    tg_connect_call_add_header(r->call, "Retry-After", rc == -EAGAIN ? "1" : "60");
  tg_connect_fail(r->call, TG_CONNECT_UNAVAILABLE, "%s", msg);
}

static void on_logged(void *arg, int status, uint64_t seq) {
  report_t *r = arg;
  (void)seq;
  if (status != 0 && r->failed == 0)
    r->failed = status;
  if (--r->appends > 0)
    return;
  if (r->failed) {
    tg_log_req(TG_LOG_ERROR, r->request_id, "usage: report not logged", "transaction", r->c.txid, "error",
               strerror(-r->failed), NULL);
    tg_usage_unclaim(r->aw->app->usage, r->c.txid);
    append_failed(r, r->failed);
    if (r->has_hold)
      r->billing->ops->release(r->billing, r->hold, on_released, NULL);
    report_free(r);
    return;
  }
  reply(r->call, &r->c);
  if (r->has_hold) {
    r->billing->ops->capture(r->billing, r->hold, on_captured, r);
    return;
  }
  report_free(r);
}

/* Appends the adjustment (built-in ledger) and the report; answers once durable. */
static void log_report(report_t *r) {
  const tg_app_t *app = r->aw->app;
  const char *instance = app->cfg->instance;
  int rc = 0;
  r->appends = 1; /* held while appending */
  if (strcmp(r->mode, "ledger") == 0) {
    char reference[96];
    size_t len;
    snprintf(reference, sizeof reference, "usage:%s", r->c.txid);
    int64_t a = r->c.adjustment;
    uint8_t *rec = tg_record_ledger_change(a > 0 ? LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_DEBIT
                                                 : LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT,
                                           r->c.billing_ref, r->c.currency, a > 0 ? a : -a, r->c.txid, reference,
                                           instance, &len);
    rc = rec ? tg_app_append(r->aw, rec, len, on_logged, r) : -ENOMEM;
    free(rec);
    if (rc == 0)
      r->appends++;
  }
  if (rc == 0) {
    size_t len;
    uint8_t *rec = tg_usage_record(&r->c, r->mode, r->detail, instance, r->request_id, &len);
    rc = rec ? tg_app_append(r->aw, rec, len, on_logged, r) : -ENOMEM;
    free(rec);
    if (rc == 0)
      r->appends++;
  }
  if (rc != 0 && r->failed == 0)
    r->failed = rc;
  on_logged(r, 0, 0); /* the hold above */
}

static void on_authorized(void *arg, const tg_billing_result_t *res) {
  report_t *r = arg;
  if (res->status == TG_BILLING_APPROVED) {
    memcpy(r->hold, res->hold, sizeof r->hold);
    r->has_hold = true;
    snprintf(r->mode, sizeof r->mode, "authorized");
  } else {
    snprintf(r->mode, sizeof r->mode, "unbilled");
    snprintf(r->detail, sizeof r->detail, "%s", res->detail);
    tg_log_req(TG_LOG_WARN, r->request_id, "usage: the adjustment was not authorized (logged as unbilled)",
               "transaction", r->c.txid, "detail", res->detail, NULL);
  }
  log_report(r);
}

static int check_request(tg_connect_call_t *call, const Ramp__V1__ReportUsageRequest *req, tg_usage_use_t *uses) {
  if (req->ai_system == NULL || req->ai_system->billing_reference[0] == '\0') {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                    "ai_system: required, with the billing_reference the transaction was charged to");
    return -1;
  }
  if (req->transaction_id[0] == '\0' || strlen(req->transaction_id) >= sizeof((tg_usage_claim_t *)0)->txid) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "transaction_id: required, as ExecuteTransaction answered it");
    return -1;
  }
  if (req->n_usage == 0 || req->n_usage > TG_USAGE_MAX_ITEMS) {
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "usage: %zu records; a report takes 1 to %d, one per offer",
                    req->n_usage, TG_USAGE_MAX_ITEMS);
    return -1;
  }
  for (size_t i = 0; i < req->n_usage; i++) {
    const Ramp__V1__UsageRecord *u = req->usage[i];
    if (u->offer_id[0] == '\0') {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "usage[%zu].offer_id: required", i);
      return -1;
    }
    if (u->consumed_tokens < 0 || u->consumed_tokens > TG_USAGE_MAX_TOKENS) {
      tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT,
                      "usage[%zu].consumed_tokens: %" PRId64 " is out of range (0 to 10^12)", i, u->consumed_tokens);
      return -1;
    }
    for (size_t j = 0; j < i; j++)
      if (strcmp(req->usage[j]->offer_id, u->offer_id) == 0) {
        tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "usage[%zu]: the same offer as usage[%zu]; report it once",
                        i, j);
        return -1;
      }
    uses[i] = (tg_usage_use_t){u->offer_id, u->consumed_tokens};
  }
  return 0;
}

static void attempt(report_t *r);

static void on_poll(uv_timer_t *t) { attempt(t->data); }

void tg_usage_report(tg_app_worker_t *aw, tg_connect_call_t *call, const Ramp__V1__ReportUsageRequest *req) {
  tg_app_t *app = aw->app;
  report_t *r = calloc(1, sizeof *r);
  if (r == NULL) {
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    return;
  }
  if (check_request(call, req, r->uses) != 0) {
    free(r);
    return;
  }
  if (app->usage == NULL || aw->wal == NULL) {
    tg_connect_fail(call, TG_CONNECT_UNAVAILABLE, "usage reports are not available on this gateway (no ledger)");
    free(r);
    return;
  }
  r->aw = aw;
  r->call = call;
  r->req = req;
  tg_http_req_t *http = tg_connect_call_http(call);
  snprintf(r->request_id, sizeof r->request_id, "%s", http ? http->request_id : "");
  attempt(r);
}

/* Claims the transaction's report, or waits for another call's being logged
 * (ledger.idempotency.wait_ms, as a duplicate purchase does). */
static void attempt(report_t *r) {
  tg_app_t *app = r->aw->app;
  tg_connect_call_t *call = r->call;
  const Ramp__V1__ReportUsageRequest *req = r->req;
  uv_loop_t *loop = r->aw->worker->loop;
  char why[256] = "";
  tg_usage_claim_clear(&r->c);
  int rc = tg_usage_claim(app->usage, req->transaction_id, req->ai_system->id, req->ai_system->billing_reference,
                          r->uses, req->n_usage, (int64_t)time(NULL), &r->c, why, sizeof why);
  if (rc == -EBUSY) {
    if (r->wait_until == 0)
      r->wait_until = uv_now(loop) + app->cfg->ledger.idem_wait_ms;
    if (uv_now(loop) < r->wait_until && !tg_connect_call_expired(call)) {
      if (!r->timer_open && uv_timer_init(loop, &r->timer) == 0) {
        r->timer_open = true;
        r->timer.data = r;
      }
      if (r->timer_open && uv_timer_start(&r->timer, on_poll, 1, 0) == 0)
        return;
    }
  }
  switch (rc) {
  case 0:
    break;
  case TG_USAGE_SAME:
    tg_connect_call_set_tenant(call, r->c.tenant);
    reply(call, &r->c);
    report_free(r);
    return;
  case -ENOENT:
    tg_connect_fail(call, TG_CONNECT_NOT_FOUND, "transaction %s: not known to this gateway", req->transaction_id);
    report_free(r);
    return;
  case -EPERM:
    tg_connect_fail(call, TG_CONNECT_PERMISSION_DENIED,
                    "transaction %s: not this AI system's (ai_system.id and billing_reference must be the "
                    "purchase's)",
                    req->transaction_id);
    report_free(r);
    return;
  case -EINVAL:
    tg_connect_fail(call, TG_CONNECT_INVALID_ARGUMENT, "%s", why);
    report_free(r);
    return;
  case -EEXIST:
    tg_connect_fail(call, TG_CONNECT_ALREADY_EXISTS,
                    "transaction %s: already reported with other token counts; a report is made once",
                    req->transaction_id);
    report_free(r);
    return;
  case -EBUSY:
    tg_connect_fail(call, TG_CONNECT_ABORTED, "transaction %s: a report of it is being recorded; retry",
                    req->transaction_id);
    report_free(r);
    return;
  default:
    tg_connect_fail(call, TG_CONNECT_RESOURCE_EXHAUSTED, "out of memory");
    report_free(r);
    return;
  }
  tg_connect_call_set_tenant(call, r->c.tenant);
  tg_app_worker_t *aw = r->aw;
  r->billing = tg_app_billing(aw, r->c.tenant_index < app->cfg->ntenants ? r->c.tenant_index : 0);
  if (r->billing == NULL)
    r->billing = aw->billing;
  if (r->c.adjustment == 0 || r->billing == NULL) {
    log_report(r);
  } else if (strcmp(r->billing->ops->name, TG_PREPAID_BILLING_TYPE) == 0) {
    snprintf(r->mode, sizeof r->mode, "ledger");
    log_report(r);
  } else if (r->c.adjustment < 0) {
    snprintf(r->mode, sizeof r->mode, "refund_due");
    log_report(r);
  } else {
    snprintf(r->auth_txid, sizeof r->auth_txid, "%s:usage", r->c.txid);
    tg_billing_auth_t a = {0};
    a.tenant = r->c.tenant;
    a.billing_ref = r->c.billing_ref;
    a.currency = r->c.currency;
    a.amount = r->c.adjustment;
    a.transaction_id = r->auth_txid;
    a.deadline_ms = uv_now(aw->worker->loop) + 1000; /* not on an agent's critical path: room for a slow service */
    a.ai_system_id = r->c.ai_system_id;
    a.request_id = r->request_id;
    r->billing->ops->authorize(r->billing, &a, on_authorized, r);
  }
}
