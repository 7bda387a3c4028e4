#include "ledger/prepaid.h"
#include "base/hash.h"
#include "base/file.h"
#include "ledger/record.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "base/crc32c.h"
#include "base/log.h"
#include "ledger/v1/ledger.pb-c.h"

#define SHARDS 64
#define SHARD_BITS 6
#define SNAP_HEADER 16

static const char SNAP_MAGIC[8] = {'T', 'G', 'S', 'N', 'A', 'P', '0', '1'};

/* Every hashed thing starts with this, so one chained table serves all. */
typedef struct node {
  struct node *next;
  uint64_t hash;
} node_t;

typedef struct {
  node_t **b;
  size_t n; /* buckets, a power of two (0 until the first insertion) */
  size_t count;
} table_t;

typedef struct account {
  node_t node;
  int64_t balance;
  int64_t held; /* sum of the live holds on it */
  size_t ref_len;
  char currency[TG_PREPAID_MAX_CURRENCY + 1];
  char ref[]; /* NUL-terminated */
} account_t;

typedef struct hold {
  node_t node;
  uint64_t id;
  account_t *acct; /* NULL: a hold of 0 on an account that did not exist */
  int64_t amount;
} hold_t;

/* An applied credit/debit reference: kind byte, then the reference. */
typedef struct refnode {
  node_t node;
  size_t len;
  char key[];
} refnode_t;

typedef struct {
  _Alignas(64) pthread_mutex_t mu;
  table_t t;
} shard_t;

struct tg_prepaid {
  shard_t accts[SHARDS]; /* by hash of (ref, currency) */
  shard_t holds[SHARDS]; /* by hash of the hold id */
  /* apply, load and the snapshot copy serialize on it; it guards refs and
   * naccounts (accounts are only made under it, so their number is stable
   * while it is held). hold/capture/release never take it. */
  pthread_mutex_t apply_mu;
  table_t refs;
  size_t naccounts;
  pthread_mutex_t write_mu;  /* one snapshot writer at a time */
  _Atomic uint64_t last_seq; /* stored under apply_mu */
  _Atomic uint64_t snap_seq; /* last_seq of the last snapshot written or loaded */
  _Atomic uint64_t next_hold;
};

/* ---- hashing and tables ---- */

static uint64_t mix(uint64_t h) {
  h ^= h >> 33;
  h *= UINT64_C(0xff51afd7ed558ccd);
  h ^= h >> 33;
  h *= UINT64_C(0xc4ceb9fe1a85ec53);
  return h ^ (h >> 33);
}

static uint64_t fnv(uint64_t h, const void *data, size_t len) { return tg_fnv1a(h, data, len); }

#define FNV_SEED UINT64_C(0xcbf29ce484222325)

/* Makes room for one more node (load factor at most 1). */
static int table_reserve(table_t *t) {
  if (t->count < t->n)
    return 0;
  size_t n = t->n ? t->n * 2 : 16;
  node_t **b = calloc(n, sizeof *b);
  if (b == NULL)
    return -ENOMEM;
  for (size_t i = 0; i < t->n; i++) {
    node_t *x = t->b[i], *next;
    for (; x; x = next) {
      next = x->next;
      size_t j = x->hash & (n - 1);
      x->next = b[j];
      b[j] = x;
    }
  }
  free(t->b);
  t->b = b;
  t->n = n;
  return 0;
}

/* After table_reserve. */
static void table_add(table_t *t, node_t *x) {
  size_t j = x->hash & (t->n - 1);
  x->next = t->b[j];
  t->b[j] = x;
  t->count++;
}

/* The head of hash's chain (compare hashes and keys along it). */
static node_t *table_chain(const table_t *t, uint64_t hash) {
  return t->n ? t->b[hash & (t->n - 1)] : NULL;
}

static void table_clear(table_t *t) {
  for (size_t i = 0; i < t->n; i++) {
    node_t *x = t->b[i], *next;
    for (; x; x = next) {
      next = x->next;
      free(x);
    }
  }
  free(t->b);
  memset(t, 0, sizeof *t);
}

/* ---- accounts ---- */

typedef struct {
  const char *ref;
  size_t ref_len;
  const char *currency;
  uint64_t hash;
} acct_key_t;

static int valid_currency(const char *c) {
  size_t n = c ? strlen(c) : 0;
  if (n == 0 || n > TG_PREPAID_MAX_CURRENCY)
    return 0;
  for (size_t i = 0; i < n; i++) {
    char ch = c[i];
    if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9')))
      return 0;
  }
  return 1;
}

static int key_make(acct_key_t *k, const char *ref, const char *currency) {
  size_t n = ref ? strlen(ref) : 0;
  if (n == 0 || n > TG_PREPAID_MAX_REF || !valid_currency(currency))
    return -EINVAL;
  k->ref = ref;
  k->ref_len = n;
  k->currency = currency;
  k->hash = mix(fnv(fnv(FNV_SEED, ref, n + 1), currency, strlen(currency)));
  return 0;
}

/* The top bits pick the shard, the low bits the bucket. */
static shard_t *acct_shard(tg_prepaid_t *p, uint64_t hash) {
  return &p->accts[hash >> (64 - SHARD_BITS)];
}

/* Shard locked. */
static account_t *acct_find(shard_t *s, const acct_key_t *k) {
  for (node_t *x = table_chain(&s->t, k->hash); x; x = x->next) {
    account_t *a = (account_t *)x;
    if (x->hash == k->hash && a->ref_len == k->ref_len && memcmp(a->ref, k->ref, k->ref_len) == 0 &&
        strcmp(a->currency, k->currency) == 0)
      return a;
  }
  return NULL;
}

/* Finds or makes the account; shard locked, and apply_mu held (naccounts). */
static account_t *acct_get(tg_prepaid_t *p, shard_t *s, const acct_key_t *k) {
  account_t *a = acct_find(s, k);
  if (a != NULL)
    return a;
  if (table_reserve(&s->t) != 0 || (a = calloc(1, sizeof *a + k->ref_len + 1)) == NULL)
    return NULL;
  a->node.hash = k->hash;
  a->ref_len = k->ref_len;
  memcpy(a->ref, k->ref, k->ref_len);
  strcpy(a->currency, k->currency);
  table_add(&s->t, &a->node);
  p->naccounts++;
  return a;
}

/* balance - held, saturated (a debit may take a balance below zero). */
static int64_t available_of(const account_t *a) {
  int64_t v;
  if (__builtin_sub_overflow(a->balance, a->held, &v))
    return INT64_MIN;
  return v;
}

/* ---- life ---- */

tg_prepaid_t *tg_prepaid_new(void) {
  tg_prepaid_t *p = aligned_alloc(64, (sizeof(tg_prepaid_t) + 63) & ~(size_t)63);
  if (p == NULL)
    return NULL;
  memset(p, 0, sizeof *p);
  for (int i = 0; i < SHARDS; i++) {
    pthread_mutex_init(&p->accts[i].mu, NULL);
    pthread_mutex_init(&p->holds[i].mu, NULL);
  }
  pthread_mutex_init(&p->apply_mu, NULL);
  pthread_mutex_init(&p->write_mu, NULL);
  atomic_init(&p->last_seq, 0);
  atomic_init(&p->snap_seq, 0);
  atomic_init(&p->next_hold, 1);
  return p;
}

void tg_prepaid_free(tg_prepaid_t *p) {
  if (p == NULL)
    return;
  for (int i = 0; i < SHARDS; i++) {
    table_clear(&p->accts[i].t);
    table_clear(&p->holds[i].t);
    pthread_mutex_destroy(&p->accts[i].mu);
    pthread_mutex_destroy(&p->holds[i].mu);
  }
  table_clear(&p->refs);
  pthread_mutex_destroy(&p->apply_mu);
  pthread_mutex_destroy(&p->write_mu);
  free(p);
}

/* ---- holds ---- */

static shard_t *hold_shard(tg_prepaid_t *p, uint64_t hash) {
  return &p->holds[hash >> (64 - SHARD_BITS)];
}

static int hold_insert(tg_prepaid_t *p, hold_t *h) {
  shard_t *s = hold_shard(p, h->node.hash);
  pthread_mutex_lock(&s->mu);
  int r = table_reserve(&s->t);
  if (r == 0)
    table_add(&s->t, &h->node);
  pthread_mutex_unlock(&s->mu);
  return r;
}

/* Unlinks and returns the hold, or NULL. */
static hold_t *hold_take(tg_prepaid_t *p, uint64_t id) {
  uint64_t hash = mix(id);
  shard_t *s = hold_shard(p, hash);
  hold_t *found = NULL;
  pthread_mutex_lock(&s->mu);
  if (s->t.n) {
    node_t **pp = &s->t.b[hash & (s->t.n - 1)];
    for (; *pp; pp = &(*pp)->next) {
      if (((hold_t *)*pp)->id == id) {
        found = (hold_t *)*pp;
        *pp = found->node.next;
        s->t.count--;
        break;
      }
    }
  }
  pthread_mutex_unlock(&s->mu);
  return found;
}

/* held -= amount on the hold's account (accounts are never freed while p lives). */
static void unhold(tg_prepaid_t *p, account_t *a, int64_t amount) {
  if (a == NULL)
    return;
  shard_t *s = acct_shard(p, a->node.hash);
  pthread_mutex_lock(&s->mu);
  a->held -= amount;
  pthread_mutex_unlock(&s->mu);
}

int tg_prepaid_hold(tg_prepaid_t *p, const char *ref, const char *currency, int64_t amount,
                    uint64_t *hold_id, int64_t *available) {
  acct_key_t k;
  if (hold_id == NULL || amount < 0 || key_make(&k, ref, currency) != 0)
    return -EINVAL;
  hold_t *h = malloc(sizeof *h);
  if (h == NULL)
    return -ENOMEM;
  shard_t *s = acct_shard(p, k.hash);
  pthread_mutex_lock(&s->mu);
  account_t *a = acct_find(s, &k);
  int64_t avail = a ? available_of(a) : 0;
  int ok = amount == 0 || (a != NULL && avail >= amount);
  if (ok && a != NULL) {
    a->held += amount; /* cannot overflow: held + amount <= balance */
    avail -= amount;
  }
  pthread_mutex_unlock(&s->mu);
  if (available)
    *available = avail;
  if (!ok) {
    free(h);
    return -ENOSPC;
  }
  h->id = atomic_fetch_add_explicit(&p->next_hold, 1, memory_order_relaxed);
  h->node.hash = mix(h->id);
  h->acct = a;
  h->amount = amount;
  if (hold_insert(p, h) != 0) {
    unhold(p, a, amount);
    free(h);
    return -ENOMEM;
  }
  *hold_id = h->id;
  return 0;
}

static int hold_end(tg_prepaid_t *p, uint64_t hold_id) {
  hold_t *h = hold_take(p, hold_id);
  if (h == NULL)
    return -ENOENT;
  unhold(p, h->acct, h->amount);
  free(h);
  return 0;
}

/* The balance was debited by apply already: capture only gives the hold back. */
int tg_prepaid_capture(tg_prepaid_t *p, uint64_t hold_id) {
  return hold_end(p, hold_id);
}

int tg_prepaid_release(tg_prepaid_t *p, uint64_t hold_id) {
  return hold_end(p, hold_id);
}

/* ---- apply ---- */

static void log_skip(const char *why, uint64_t seq, const char *ref) {
  char s[24], red[TG_REDACT_REF_LEN];
  snprintf(s, sizeof s, "%" PRIu64, seq);
  tg_redact_ref(ref, red, sizeof red);
  tg_log(TG_LOG_ERROR, why, "seq", s, "billing_reference", red, NULL);
}

/* balance += delta on (ref, currency), saturating; apply_mu held. */
static int adjust(tg_prepaid_t *p, uint64_t seq, const acct_key_t *k, int64_t delta) {
  shard_t *s = acct_shard(p, k->hash);
  pthread_mutex_lock(&s->mu);
  account_t *a = acct_get(p, s, k);
  int clamped = 0;
  if (a != NULL && __builtin_add_overflow(a->balance, delta, &a->balance)) {
    a->balance = delta > 0 ? INT64_MAX : INT64_MIN;
    clamped = 1;
  }
  pthread_mutex_unlock(&s->mu);
  if (a == NULL) {
    log_skip("prepaid: out of memory, a balance change is lost until restart", seq, k->ref);
    return -ENOMEM;
  }
  if (clamped)
    log_skip("prepaid: balance out of int64 range, clamped", seq, k->ref);
  return 0;
}

static int apply_transaction(tg_prepaid_t *p, uint64_t seq, const Ledger__V1__Transaction *t) {
  if (t->outcome != LEDGER__V1__TRANSACTION_OUTCOME__TRANSACTION_OUTCOME_APPROVED)
    return 0;
  if (t->billing_type[0] != '\0' && strcmp(t->billing_type, TG_PREPAID_BILLING_TYPE) != 0)
    return 0;
  int r = 0;
  for (size_t i = 0; i < t->n_totals; i++) {
    const Ledger__V1__Amount *am = t->totals[i];
    acct_key_t k;
    if (am->amount == 0)
      continue;
    if (am->amount < 0 || key_make(&k, t->billing_reference, am->currency) != 0) {
      log_skip("prepaid: bad total in an approved transaction, skipped", seq, t->billing_reference);
      continue;
    }
    int e = adjust(p, seq, &k, -am->amount);
    if (e != 0)
      r = e;
  }
  return r;
}

static uint64_t ref_hash(char kind, const char *reference) {
  return mix(fnv(fnv(FNV_SEED, &kind, 1), reference, strlen(reference)));
}

/* apply_mu held. */
static int ref_seen(tg_prepaid_t *p, char kind, const char *reference) {
  uint64_t h = ref_hash(kind, reference);
  size_t n = strlen(reference);
  for (node_t *x = table_chain(&p->refs, h); x; x = x->next) {
    refnode_t *r = (refnode_t *)x;
    if (x->hash == h && r->len == n + 1 && r->key[0] == kind && memcmp(r->key + 1, reference, n) == 0)
      return 1;
  }
  return 0;
}

/* apply_mu held; the reference is not in the set yet. */
static int ref_add(tg_prepaid_t *p, char kind, const char *reference) {
  size_t n = strlen(reference);
  refnode_t *r = malloc(sizeof *r + n + 1);
  if (r == NULL || table_reserve(&p->refs) != 0) {
    free(r);
    return -ENOMEM;
  }
  r->node.hash = ref_hash(kind, reference);
  r->len = n + 1;
  r->key[0] = kind;
  memcpy(r->key + 1, reference, n);
  table_add(&p->refs, &r->node);
  return 0;
}

static int apply_change(tg_prepaid_t *p, uint64_t seq, const Ledger__V1__LedgerChange *c, int fresh) {
  char kind;
  if (c->kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_CREDIT)
    kind = 'C';
  else if (c->kind == LEDGER__V1__LEDGER_CHANGE_KIND__LEDGER_CHANGE_KIND_DEBIT)
    kind = 'D';
  else
    return 0;
  acct_key_t k;
  if (c->amount <= 0 || key_make(&k, c->billing_reference, c->currency) != 0) {
    log_skip("prepaid: bad credit or debit record, skipped", seq, c->billing_reference);
    return 0;
  }
  int keyed = c->reference[0] != '\0';
  if (keyed && ref_seen(p, kind, c->reference))
    return 0;
  int r = fresh ? adjust(p, seq, &k, kind == 'C' ? c->amount : -c->amount) : 0;
  if (r == 0 && keyed && (r = ref_add(p, kind, c->reference)) != 0)
    log_skip("prepaid: out of memory, a credit/debit reference is forgotten", seq, c->billing_reference);
  return r;
}

int tg_prepaid_apply(tg_prepaid_t *p, uint64_t seq, const void *payload, size_t len) {
  Ledger__V1__Record *rec = ledger__v1__record__unpack(NULL, len, payload);
  pthread_mutex_lock(&p->apply_mu);
  int fresh = seq > atomic_load_explicit(&p->last_seq, memory_order_relaxed);
  int r = 0;
  if (rec == NULL) {
    log_skip("prepaid: a write-ahead log record does not decode", seq, NULL);
    r = -EBADMSG;
  } else if (rec->kind_case == LEDGER__V1__RECORD__KIND_TRANSACTION && fresh) {
    r = apply_transaction(p, seq, rec->transaction);
  } else if (rec->kind_case == LEDGER__V1__RECORD__KIND_LEDGER_CHANGE) {
    r = apply_change(p, seq, rec->ledger_change, fresh);
  }
  if (fresh)
    atomic_store_explicit(&p->last_seq, seq, memory_order_release);
  pthread_mutex_unlock(&p->apply_mu);
  if (rec != NULL)
    ledger__v1__record__free_unpacked(rec, NULL);
  return r;
}

int tg_prepaid_wal_cb(void *arg, uint64_t seq, const void *payload, size_t len) {
  return tg_prepaid_apply(arg, seq, payload, len);
}

uint64_t tg_prepaid_last_seq(tg_prepaid_t *p) {
  return atomic_load_explicit(&p->last_seq, memory_order_acquire);
}

/* ---- queries ---- */

int tg_prepaid_credit_check(tg_prepaid_t *p, const char *ref, const char *currency, int64_t amount,
                            const char *reference, int64_t *balance_after) {
  acct_key_t k;
  if (amount <= 0 || key_make(&k, ref, currency) != 0)
    return -EINVAL;
  int64_t bal = 0;
  pthread_mutex_lock(&p->apply_mu);
  int seen = reference != NULL && reference[0] != '\0' && ref_seen(p, 'C', reference);
  shard_t *s = acct_shard(p, k.hash);
  pthread_mutex_lock(&s->mu);
  account_t *a = acct_find(s, &k);
  if (a != NULL)
    bal = a->balance;
  pthread_mutex_unlock(&s->mu);
  pthread_mutex_unlock(&p->apply_mu);
  int64_t after;
  if (seen)
    after = bal;
  else if (__builtin_add_overflow(bal, amount, &after) || after > TG_PREPAID_MAX_CREDIT_BALANCE)
    return -EOVERFLOW;
  if (balance_after)
    *balance_after = after;
  return seen ? -EALREADY : 0;
}

int tg_prepaid_balance(tg_prepaid_t *p, const char *ref, const char *currency, int64_t *balance,
                       int64_t *held) {
  acct_key_t k;
  if (key_make(&k, ref, currency) != 0)
    return -EINVAL;
  shard_t *s = acct_shard(p, k.hash);
  pthread_mutex_lock(&s->mu);
  account_t *a = acct_find(s, &k);
  if (a != NULL && balance)
    *balance = a->balance;
  if (a != NULL && held)
    *held = a->held;
  pthread_mutex_unlock(&s->mu);
  return a ? 0 : -ENOENT;
}

int tg_prepaid_each(tg_prepaid_t *p, tg_prepaid_each_cb cb, void *arg) {
  int r = 0;
  for (int i = 0; i < SHARDS && r == 0; i++) {
    shard_t *s = &p->accts[i];
    pthread_mutex_lock(&s->mu);
    for (size_t j = 0; j < s->t.n && r == 0; j++)
      for (node_t *x = s->t.b[j]; x && r == 0; x = x->next) {
        account_t *a = (account_t *)x;
        r = cb(arg, a->ref, a->currency, a->balance, a->held);
      }
    pthread_mutex_unlock(&s->mu);
  }
  return r;
}

/* ---- snapshots ---- */

static void put32(uint8_t *b, uint32_t v) {
  for (int i = 0; i < 4; i++)
    b[i] = (uint8_t)(v >> (8 * i));
}
static uint32_t get32(const uint8_t *b) {
  return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

/* What a snapshot holds, copied out of the ledger. */
typedef struct {
  Ledger__V1__Balance **v;
  size_t n;
  char **credit_refs, **debit_refs; /* the applied references, by kind */
  size_t n_credit, n_debit;
} balances_t;

static void balances_free(balances_t *bs) {
  for (size_t i = 0; i < bs->n; i++)
    free(bs->v[i]); /* strings share the allocation */
  free(bs->v);
  for (size_t i = 0; i < bs->n_credit; i++)
    free(bs->credit_refs[i]);
  free(bs->credit_refs);
  for (size_t i = 0; i < bs->n_debit; i++)
    free(bs->debit_refs[i]);
  free(bs->debit_refs);
}

/* Copies the applied references into bs; apply_mu held. */
static int refs_copy(tg_prepaid_t *p, balances_t *bs) {
  size_t cap = p->refs.count ? p->refs.count : 1;
  bs->credit_refs = malloc(cap * sizeof *bs->credit_refs);
  bs->debit_refs = malloc(cap * sizeof *bs->debit_refs);
  if (bs->credit_refs == NULL || bs->debit_refs == NULL)
    return -ENOMEM;
  for (size_t j = 0; j < p->refs.n; j++)
    for (node_t *x = p->refs.b[j]; x; x = x->next) {
      const refnode_t *rn = (const refnode_t *)x;
      char *str = malloc(rn->len); /* len - 1 bytes of reference, and a NUL */
      if (str == NULL)
        return -ENOMEM;
      memcpy(str, rn->key + 1, rn->len - 1);
      str[rn->len - 1] = '\0';
      if (rn->key[0] == 'C')
        bs->credit_refs[bs->n_credit++] = str;
      else
        bs->debit_refs[bs->n_debit++] = str;
    }
  return 0;
}

/* One Balance with its strings in the same allocation. */
static Ledger__V1__Balance *balance_of(const account_t *a) {
  size_t cl = strlen(a->currency);
  Ledger__V1__Balance *b = malloc(sizeof *b + a->ref_len + 1 + cl + 1);
  if (b == NULL)
    return NULL;
  ledger__v1__balance__init(b);
  char *s = (char *)(b + 1);
  memcpy(s, a->ref, a->ref_len + 1);
  memcpy(s + a->ref_len + 1, a->currency, cl + 1);
  b->billing_reference = s;
  b->currency = s + a->ref_len + 1;
  b->balance = a->balance;
  return b;
}

/* Copies every balance and the sequence they are at, with apply held off. */
static int balances_copy(tg_prepaid_t *p, balances_t *bs, uint64_t *seq) {
  int r = 0;
  pthread_mutex_lock(&p->apply_mu);
  *seq = atomic_load_explicit(&p->last_seq, memory_order_relaxed);
  bs->n = 0;
  bs->v = malloc((p->naccounts ? p->naccounts : 1) * sizeof *bs->v);
  if (bs->v == NULL)
    r = -ENOMEM;
  for (int i = 0; i < SHARDS && r == 0; i++) {
    shard_t *s = &p->accts[i];
    pthread_mutex_lock(&s->mu);
    for (size_t j = 0; j < s->t.n && r == 0; j++)
      for (node_t *x = s->t.b[j]; x && r == 0; x = x->next) {
        Ledger__V1__Balance *b = balance_of((account_t *)x);
        if (b == NULL)
          r = -ENOMEM;
        else
          bs->v[bs->n++] = b;
      }
    pthread_mutex_unlock(&s->mu);
  }
  if (r == 0)
    r = refs_copy(p, bs);
  pthread_mutex_unlock(&p->apply_mu);
  return r;
}

/* Frame: magic | u32 length | u32 CRC32C(payload) | payload. */
static int snapshot_encode(uint64_t seq, const balances_t *bs, uint8_t **out, size_t *outlen) {
  Ledger__V1__Snapshot snap = LEDGER__V1__SNAPSHOT__INIT;
  snap.wal_seq = seq;
  snap.at_unix_ms = tg_record_now_ms();
  snap.n_balances = bs->n;
  snap.balances = bs->v;
  snap.n_credit_references = bs->n_credit;
  snap.credit_references = bs->credit_refs;
  snap.n_debit_references = bs->n_debit;
  snap.debit_references = bs->debit_refs;
  size_t n = ledger__v1__snapshot__get_packed_size(&snap);
  if (n > UINT32_MAX)
    return -EFBIG;
  uint8_t *buf = malloc(SNAP_HEADER + n);
  if (buf == NULL)
    return -ENOMEM;
  ledger__v1__snapshot__pack(&snap, buf + SNAP_HEADER);
  memcpy(buf, SNAP_MAGIC, 8);
  put32(buf + 8, (uint32_t)n);
  put32(buf + 12, tg_crc32c(0, buf + SNAP_HEADER, n));
  *out = buf;
  *outlen = SNAP_HEADER + n;
  return 0;
}

int tg_prepaid_snapshot_write(tg_prepaid_t *p, const char *path) {
  return tg_prepaid_snapshot_write_seq(p, path, NULL);
}

int tg_prepaid_snapshot_write_seq(tg_prepaid_t *p, const char *path, uint64_t *written_seq) {
  balances_t bs = {0};
  uint64_t seq = 0;
  uint8_t *buf = NULL;
  size_t len = 0;
  pthread_mutex_lock(&p->write_mu);
  int r = balances_copy(p, &bs, &seq);
  if (r == 0)
    r = snapshot_encode(seq, &bs, &buf, &len);
  balances_free(&bs);
  if (r == 0)
    r = tg_file_write_atomic(path, buf, len, 0640);
  if (r == 0)
    atomic_store_explicit(&p->snap_seq, seq, memory_order_relaxed);
  pthread_mutex_unlock(&p->write_mu);
  free(buf);
  if (r == 0 && written_seq)
    *written_seq = seq;
  return r;
}

uint64_t tg_prepaid_snapshot_seq(tg_prepaid_t *p) {
  return atomic_load_explicit(&p->snap_seq, memory_order_relaxed);
}

/* The Snapshot inside a verified frame, or NULL. */
static Ledger__V1__Snapshot *snapshot_decode(const uint8_t *b, size_t n) {
  if (n < SNAP_HEADER || memcmp(b, SNAP_MAGIC, 8) != 0)
    return NULL;
  uint32_t len = get32(b + 8);
  if ((size_t)len != n - SNAP_HEADER || get32(b + 12) != tg_crc32c(0, b + SNAP_HEADER, len))
    return NULL;
  return ledger__v1__snapshot__unpack(NULL, len, b + SNAP_HEADER);
}

/* Adds the snapshot's accounts to the (empty) ledger; apply_mu held. */
static int load_balances(tg_prepaid_t *p, const Ledger__V1__Snapshot *snap) {
  for (size_t i = 0; i < snap->n_balances; i++) {
    const Ledger__V1__Balance *b = snap->balances[i];
    acct_key_t k;
    if (key_make(&k, b->billing_reference, b->currency) != 0)
      return -EBADMSG;
    shard_t *s = acct_shard(p, k.hash);
    pthread_mutex_lock(&s->mu);
    int dup = acct_find(s, &k) != NULL;
    account_t *a = dup ? NULL : acct_get(p, s, &k);
    if (a != NULL)
      a->balance = b->balance;
    pthread_mutex_unlock(&s->mu);
    if (dup)
      return -EBADMSG;
    if (a == NULL)
      return -ENOMEM;
  }
  return 0;
}

/* Adds the snapshot's references of one kind to the (empty) set; apply_mu
 * held. An empty or repeated reference is damage: apply never adds one. */
static int load_refs(tg_prepaid_t *p, char kind, char *const *v, size_t n) {
  for (size_t i = 0; i < n; i++) {
    if (v[i] == NULL || v[i][0] == '\0' || ref_seen(p, kind, v[i]))
      return -EBADMSG;
    int r = ref_add(p, kind, v[i]);
    if (r != 0)
      return r;
  }
  return 0;
}

int tg_prepaid_snapshot_load(tg_prepaid_t *p, const char *path, uint64_t *seq) {
  uint8_t *buf = NULL;
  size_t len = 0;
  int shrank = 0;
  int r = tg_file_read(path, &buf, &len, &shrank);
  if (r == 0 && shrank) { /* changed while read: not a whole snapshot */
    free(buf);
    r = -EBADMSG;
  }
  if (r != 0)
    return r;
  Ledger__V1__Snapshot *snap = snapshot_decode(buf, len);
  free(buf);
  if (snap == NULL)
    return -EBADMSG;
  pthread_mutex_lock(&p->apply_mu);
  if (p->naccounts != 0 || p->refs.count != 0 ||
      atomic_load_explicit(&p->last_seq, memory_order_relaxed) != 0) {
    r = -EBUSY;
  } else if ((r = load_balances(p, snap)) != 0 ||
             (r = load_refs(p, 'C', snap->credit_references, snap->n_credit_references)) != 0 ||
             (r = load_refs(p, 'D', snap->debit_references, snap->n_debit_references)) != 0) {
    for (int i = 0; i < SHARDS; i++) /* back to empty: nothing else runs at start-up */
      table_clear(&p->accts[i].t);
    table_clear(&p->refs);
    p->naccounts = 0;
  } else {
    atomic_store_explicit(&p->last_seq, snap->wal_seq, memory_order_release);
    atomic_store_explicit(&p->snap_seq, snap->wal_seq, memory_order_relaxed);
    if (seq)
      *seq = snap->wal_seq;
  }
  pthread_mutex_unlock(&p->apply_mu);
  ledger__v1__snapshot__free_unpacked(snap, NULL);
  return r;
}

int tg_prepaid_snapshot_due(tg_prepaid_t *p, uint64_t every_records) {
  uint64_t last = atomic_load_explicit(&p->last_seq, memory_order_relaxed);
  uint64_t snap = atomic_load_explicit(&p->snap_seq, memory_order_relaxed);
  return last > snap && last - snap >= (every_records ? every_records : 1);
}
