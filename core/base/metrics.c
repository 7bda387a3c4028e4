#include "base/metrics.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/utf8.h"

/* Gauges live in one table per family. A fixed bucket count keeps lookups
 * lock-free: chains only ever grow at their head. */
#define GAUGE_BUCKETS 64
/* Series are cache-line aligned so that two threads' hot counters never share
 * a line. */
#define CACHE_LINE 64

typedef struct series series_t;
struct series {
  series_t *next;  /* shard's published list, or a gauge bucket chain; set before publication */
  series_t *hnext; /* owner thread's hash chain (counters, histograms) */
  uint64_t hash;
  const char *labels[TG_METRIC_MAX_LABELS]; /* as given, for lookups; "" past nlabels */
  const char *shown[TG_METRIC_MAX_LABELS];  /* as rendered: invalid UTF-8 repaired */
  size_t lens[TG_METRIC_MAX_LABELS];        /* strlen of labels */
  _Atomic bool removed;                     /* gauges: hidden by tg_gauge_remove */
  /* counter: count; gauge: double bits; histogram: sum (double bits), then one
   * non-cumulative count per bucket, +Inf last. */
  _Atomic uint64_t v[];
};

/* One family's series in one thread's shard. Only the owner thread appends;
 * the scraper walks the published list from head. */
typedef struct fshard fshard_t;
struct fshard {
  fshard_t *next; /* family's list of shards; set before publication */
  series_t *_Atomic head;
  series_t **table; /* owner only: chained hash on series hash */
  size_t mask, count;
};

typedef struct shard shard_t;
struct shard {
  shard_t *next;  /* registry list, under reg.lock */
  fshard_t **fam; /* by family index; owner only */
  size_t nfam;
  pthread_t owner;
  bool retired; /* owner exited: the next new thread adopts the shard */
};

struct tg_metric {
  tg_metric_t *_Atomic next; /* declaration order */
  tg_metric_type_t type;
  size_t index; /* into shard_t.fam */
  char *name, *help;
  size_t nlabels;
  char *label_names[TG_METRIC_MAX_LABELS];
  double *bounds; /* histograms: finite upper bounds, ascending */
  char (*le)[32]; /* bounds as rendered */
  size_t nbounds;
  size_t nvals; /* length of series_t.v */
  fshard_t *_Atomic shards;
  series_t *_Atomic gauges[GAUGE_BUCKETS];
};

static struct {
  pthread_mutex_t lock; /* declarations, the shard list */
  tg_metric_t *_Atomic head;
  tg_metric_t *tail;
  size_t nfam;
  shard_t *shards;
  /* Bumped by reset so that threads drop their cached shard pointer. */
  _Atomic unsigned gen;
} reg = {.lock = PTHREAD_MUTEX_INITIALIZER};

static _Thread_local shard_t *tls_shard;
static _Thread_local unsigned tls_gen;

static pthread_once_t key_once = PTHREAD_ONCE_INIT;
static pthread_key_t shard_key;
static bool key_ok;

static const double default_bounds[] = {0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                        0.1,    0.25,  0.5,    1,     2.5,  5,     10};

static const char *const no_labels[TG_METRIC_MAX_LABELS] = {"", "", "", ""};

static inline const char *label_at(const char *const *labels, size_t i) {
  return labels && labels[i] ? labels[i] : "";
}

static inline uint64_t double_bits(double d) {
  uint64_t u;
  memcpy(&u, &d, sizeof u);
  return u;
}

static inline double bits_double(uint64_t u) {
  double d;
  memcpy(&d, &u, sizeof d);
  return d;
}

/* Owner-only updates: one writer, so a plain load and store suffice (no lock
 * prefix); the scraper's relaxed loads see whole values. */
static inline void own_add_u64(_Atomic uint64_t *p, uint64_t n) {
  atomic_store_explicit(p, atomic_load_explicit(p, memory_order_relaxed) + n,
                        memory_order_relaxed);
}

static inline void own_add_double(_Atomic uint64_t *p, double d) {
  uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
  atomic_store_explicit(p, double_bits(bits_double(old) + d), memory_order_relaxed);
}

/* Shortest form that reads back to the same double; integers without
 * exponent; Prometheus spellings for the non-finite values. */
static void fmt_double(char *dst, size_t cap, double v) {
  if (isnan(v)) {
    snprintf(dst, cap, "NaN");
  } else if (isinf(v)) {
    snprintf(dst, cap, "%s", v > 0 ? "+Inf" : "-Inf");
  } else if (v == trunc(v) && fabs(v) < 1e15) {
    snprintf(dst, cap, "%.0f", v);
  } else {
    for (int prec = 15; prec <= 17; prec++) {
      snprintf(dst, cap, "%.*g", prec, v);
      if (strtod(dst, NULL) == v)
        break;
    }
  }
}

static bool valid_name(const char *s, bool colon) {
  if (s == NULL || *s == '\0')
    return false;
  for (size_t i = 0; s[i]; i++) {
    char c = s[i];
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
              (colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
    if (!ok)
      return false;
  }
  return true;
}

static bool same_shape(const tg_metric_t *m, tg_metric_type_t type,
                       const char *const *label_names, size_t nlabels, const double *bounds,
                       size_t nbounds) {
  if (m->type != type || m->nlabels != nlabels || m->nbounds != nbounds)
    return false;
  for (size_t i = 0; i < nlabels; i++)
    if (strcmp(m->label_names[i], label_names[i]) != 0)
      return false;
  for (size_t i = 0; i < nbounds; i++)
    if (m->bounds[i] != bounds[i])
      return false;
  return true;
}

static void metric_free(tg_metric_t *m) {
  fshard_t *fs = atomic_load_explicit(&m->shards, memory_order_relaxed);
  while (fs) {
    fshard_t *fnext = fs->next;
    series_t *s = atomic_load_explicit(&fs->head, memory_order_relaxed);
    while (s) {
      series_t *next = s->next;
      free(s);
      s = next;
    }
    free(fs->table);
    free(fs);
    fs = fnext;
  }
  for (size_t k = 0; k < GAUGE_BUCKETS; k++) {
    series_t *s = atomic_load_explicit(&m->gauges[k], memory_order_relaxed);
    while (s) {
      series_t *next = s->next;
      free(s);
      s = next;
    }
  }
  for (size_t i = 0; i < m->nlabels; i++)
    free(m->label_names[i]);
  free(m->bounds);
  free(m->le);
  free(m->name);
  free(m->help);
  free(m);
}

tg_metric_t *tg_metric_new(tg_metric_type_t type, const char *name, const char *help,
                           const char *const *label_names, const double *buckets,
                           size_t nbuckets) {
  if ((unsigned)type > TG_METRIC_HISTOGRAM || !valid_name(name, true))
    return NULL;
  size_t nlabels = 0;
  if (label_names) {
    for (; label_names[nlabels]; nlabels++) {
      const char *l = label_names[nlabels];
      if (nlabels == TG_METRIC_MAX_LABELS || !valid_name(l, false) || strncmp(l, "__", 2) == 0 ||
          (type == TG_METRIC_HISTOGRAM && strcmp(l, "le") == 0))
        return NULL;
      for (size_t j = 0; j < nlabels; j++)
        if (strcmp(label_names[j], l) == 0)
          return NULL;
    }
  }
  const double *bounds = NULL;
  size_t nbounds = 0;
  if (type == TG_METRIC_HISTOGRAM) {
    bounds = buckets ? buckets : default_bounds;
    nbounds = buckets ? nbuckets : sizeof default_bounds / sizeof default_bounds[0];
    if (nbounds > 0 && isinf(bounds[nbounds - 1]) && bounds[nbounds - 1] > 0)
      nbounds--;
    for (size_t i = 0; i < nbounds; i++)
      if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1])))
        return NULL;
  }

  tg_metric_t *m = NULL;
  tg_buf_t h = {0};
  pthread_mutex_lock(&reg.lock);
  for (tg_metric_t *o = atomic_load_explicit(&reg.head, memory_order_relaxed); o;
       o = atomic_load_explicit(&o->next, memory_order_relaxed)) {
    if (strcmp(o->name, name) == 0) {
      m = same_shape(o, type, label_names, nlabels, bounds, nbounds) ? o : NULL;
      goto out;
    }
  }
  m = calloc(1, sizeof *m);
  if (m == NULL)
    goto out;
  m->type = type;
  m->nlabels = nlabels;
  m->nbounds = nbounds;
  m->nvals = type == TG_METRIC_HISTOGRAM ? nbounds + 2 : 1;
  /* HELP must be valid UTF-8 in the exposition, like label values. */
  if (help && tg_utf8_repair(&h, help, strlen(help)) != 0)
    goto fail;
  m->help = strdup(h.data ? h.data : "");
  m->name = strdup(name);
  if (m->help == NULL || m->name == NULL)
    goto fail;
  for (size_t i = 0; i < nlabels; i++)
    if ((m->label_names[i] = strdup(label_names[i])) == NULL)
      goto fail;
  if (nbounds) {
    m->bounds = malloc(nbounds * sizeof *m->bounds);
    m->le = malloc(nbounds * sizeof *m->le);
    if (m->bounds == NULL || m->le == NULL)
      goto fail;
    memcpy(m->bounds, bounds, nbounds * sizeof *bounds);
    for (size_t i = 0; i < nbounds; i++)
      fmt_double(m->le[i], sizeof m->le[i], bounds[i]);
  }
  m->index = reg.nfam++;
  if (reg.tail)
    atomic_store_explicit(&reg.tail->next, m, memory_order_release);
  else
    atomic_store_explicit(&reg.head, m, memory_order_release);
  reg.tail = m;
  goto out;

fail:
  metric_free(m);
  m = NULL;
out:
  pthread_mutex_unlock(&reg.lock);
  tg_buf_free(&h);
  return m;
}

static void shard_retire(void *p) {
  /* p may be stale (freed by a reset, its address reused by another thread's
   * shard): retire only a live shard that this thread owns. */
  pthread_mutex_lock(&reg.lock);
  for (shard_t *s = reg.shards; s; s = s->next) {
    if (s == p && !s->retired && pthread_equal(s->owner, pthread_self())) {
      s->retired = true;
      break;
    }
  }
  pthread_mutex_unlock(&reg.lock);
}

static void key_init(void) { key_ok = pthread_key_create(&shard_key, shard_retire) == 0; }

static shard_t *shard_acquire(void) {
  pthread_once(&key_once, key_init);
  pthread_mutex_lock(&reg.lock);
  shard_t *s = reg.shards;
  while (s && !s->retired)
    s = s->next;
  if (s == NULL) {
    s = calloc(1, sizeof *s);
    if (s == NULL) {
      pthread_mutex_unlock(&reg.lock);
      return NULL;
    }
    s->next = reg.shards;
    reg.shards = s;
  }
  s->retired = false;
  s->owner = pthread_self();
  unsigned gen = atomic_load_explicit(&reg.gen, memory_order_relaxed);
  pthread_mutex_unlock(&reg.lock);
  if (key_ok)
    pthread_setspecific(shard_key, s);
  tls_shard = s;
  tls_gen = gen;
  return s;
}

static fshard_t *fshard_attach(shard_t *sh, tg_metric_t *m) {
  if (m->index >= sh->nfam) {
    size_t n = sh->nfam ? sh->nfam : 8;
    while (n <= m->index)
      n *= 2;
    fshard_t **fam = realloc(sh->fam, n * sizeof *fam);
    if (fam == NULL)
      return NULL;
    memset(fam + sh->nfam, 0, (n - sh->nfam) * sizeof *fam);
    sh->fam = fam;
    sh->nfam = n;
  }
  fshard_t *fs = calloc(1, sizeof *fs);
  if (fs == NULL)
    return NULL;
  fs->mask = 7;
  fs->table = calloc(fs->mask + 1, sizeof *fs->table);
  if (fs->table == NULL) {
    free(fs);
    return NULL;
  }
  atomic_init(&fs->head, NULL);
  fshard_t *top = atomic_load_explicit(&m->shards, memory_order_relaxed);
  do
    fs->next = top;
  while (!atomic_compare_exchange_weak_explicit(&m->shards, &top, fs, memory_order_release,
                                                memory_order_relaxed));
  sh->fam[m->index] = fs;
  return fs;
}

/* Word-at-a-time mixing (the FxHash step), finished with a fold so that the
 * low bits used as a table index depend on every input byte. Each value's
 * tail word carries its length in the top byte, which also separates values:
 * ("ab","c") and ("a","bc") hash apart. */
static inline uint64_t mix(uint64_t h, uint64_t w) {
  return (((h << 5) | (h >> 59)) ^ w) * 0x517cc1b727220a95ULL;
}

static uint64_t hash_labels(size_t n, const char *const *labels, size_t *lens) {
  uint64_t h = 0;
  for (size_t i = 0; i < n; i++) {
    const char *s = label_at(labels, i);
    size_t len = strlen(s), j = 0;
    for (; j + 8 <= len; j += 8) {
      uint64_t w;
      memcpy(&w, s + j, 8);
      h = mix(h, w);
    }
    uint64_t w = 0;
    for (size_t k = 0; j + k < len; k++) /* a call to memcpy costs more here */
      w |= (uint64_t)(unsigned char)s[j + k] << (8 * k);
    h = mix(h, w ^ ((uint64_t)(len & 0xff) << 56));
    lens[i] = len;
  }
  return h ^ (h >> 29) ^ (h >> 47);
}

static bool labels_equal(size_t n, const series_t *s, const char *const *labels,
                         const size_t *lens) {
  for (size_t i = 0; i < n; i++)
    if (s->lens[i] != lens[i] || memcmp(s->labels[i], label_at(labels, i), lens[i]) != 0)
      return false;
  return true;
}

/* One allocation per series: the struct, its values, then the label copies
 * and, for labels that are not valid UTF-8, their repaired forms. */
static series_t *series_new(const tg_metric_t *m, const char *const *labels, uint64_t hash,
                            const size_t *len) {
  size_t text = 0, repaired_at[TG_METRIC_MAX_LABELS];
  bool bad[TG_METRIC_MAX_LABELS];
  tg_buf_t repaired = {0};
  for (size_t i = 0; i < m->nlabels; i++) {
    const char *l = label_at(labels, i);
    text += len[i] + 1;
    bad[i] = !tg_utf8_valid(l, len[i]);
    if (bad[i]) {
      repaired_at[i] = repaired.len;
      if (tg_utf8_repair(&repaired, l, len[i]) != 0 || tg_buf_append(&repaired, "", 1) != 0)
        goto fail;
    }
  }
  size_t head = sizeof(series_t) + m->nvals * sizeof(_Atomic uint64_t);
  size_t size = (head + text + repaired.len + CACHE_LINE - 1) & ~(size_t)(CACHE_LINE - 1);
  series_t *s = aligned_alloc(CACHE_LINE, size);
  if (s == NULL)
    goto fail;
  s->next = s->hnext = NULL;
  s->hash = hash;
  char *p = (char *)s + head;
  for (size_t i = 0; i < TG_METRIC_MAX_LABELS; i++) {
    s->labels[i] = s->shown[i] = no_labels[i];
    s->lens[i] = 0;
    if (i < m->nlabels) {
      s->lens[i] = len[i];
      memcpy(p, label_at(labels, i), len[i] + 1);
      s->labels[i] = s->shown[i] = p;
      p += len[i] + 1;
    }
  }
  if (repaired.len) {
    memcpy(p, repaired.data, repaired.len);
    for (size_t i = 0; i < m->nlabels; i++)
      if (bad[i])
        s->shown[i] = p + repaired_at[i];
  }
  for (size_t i = 0; i < m->nvals; i++)
    atomic_init(&s->v[i], 0);
  atomic_init(&s->removed, false);
  tg_buf_free(&repaired);
  return s;

fail:
  tg_buf_free(&repaired);
  return NULL;
}

static void table_grow(fshard_t *fs) {
  size_t n = (fs->mask + 1) * 2;
  series_t **t = calloc(n, sizeof *t);
  if (t == NULL)
    return; /* longer chains, still correct */
  for (size_t i = 0; i <= fs->mask; i++) {
    series_t *s = fs->table[i];
    while (s) {
      series_t *next = s->hnext;
      s->hnext = t[s->hash & (n - 1)];
      t[s->hash & (n - 1)] = s;
      s = next;
    }
  }
  free(fs->table);
  fs->table = t;
  fs->mask = n - 1;
}

/* The calling thread's series for labels in a counter or histogram family. */
static series_t *own_series(tg_metric_t *m, const char *const *labels) {
  shard_t *sh = tls_shard;
  if (sh == NULL || tls_gen != atomic_load_explicit(&reg.gen, memory_order_relaxed)) {
    if ((sh = shard_acquire()) == NULL)
      return NULL;
  }
  fshard_t *fs = m->index < sh->nfam ? sh->fam[m->index] : NULL;
  if (fs == NULL && (fs = fshard_attach(sh, m)) == NULL)
    return NULL;

  size_t lens[TG_METRIC_MAX_LABELS];
  uint64_t h = hash_labels(m->nlabels, labels, lens);
  for (series_t *s = fs->table[h & fs->mask]; s; s = s->hnext)
    if (s->hash == h && labels_equal(m->nlabels, s, labels, lens))
      return s;

  series_t *s = series_new(m, labels, h, lens);
  if (s == NULL)
    return NULL;
  s->hnext = fs->table[h & fs->mask];
  fs->table[h & fs->mask] = s;
  if (++fs->count > fs->mask + 1)
    table_grow(fs);
  s->next = atomic_load_explicit(&fs->head, memory_order_relaxed);
  atomic_store_explicit(&fs->head, s, memory_order_release);
  return s;
}

/* The gauge series for labels; create: make it when missing (else NULL). */
static series_t *gauge_find(tg_metric_t *m, const char *const *labels, bool create) {
  size_t lens[TG_METRIC_MAX_LABELS];
  uint64_t h = hash_labels(m->nlabels, labels, lens);
  series_t *_Atomic *slot = &m->gauges[h % GAUGE_BUCKETS];
  series_t *top = atomic_load_explicit(slot, memory_order_acquire), *fresh = NULL;
  for (;;) {
    for (series_t *s = top; s; s = s->next) {
      if (s->hash == h && labels_equal(m->nlabels, s, labels, lens)) {
        free(fresh); /* another thread inserted the same labels first */
        return s;
      }
    }
    if (!create)
      return NULL;
    if (fresh == NULL && (fresh = series_new(m, labels, h, lens)) == NULL)
      return NULL;
    fresh->next = top;
    if (atomic_compare_exchange_weak_explicit(slot, &top, fresh, memory_order_release,
                                              memory_order_acquire))
      return fresh;
  }
}

static series_t *gauge_series(tg_metric_t *m, const char *const *labels) {
  return gauge_find(m, labels, true);
}

void tg_counter_add(tg_metric_t *m, const char *const *labels, uint64_t n) {
  if (m == NULL || m->type != TG_METRIC_COUNTER)
    return;
  series_t *s = own_series(m, labels);
  if (s)
    own_add_u64(&s->v[0], n);
}

/* A removed series comes back from 0, as if it were new. */
static void gauge_revive(series_t *s) {
  if (!atomic_load_explicit(&s->removed, memory_order_relaxed))
    return;
  atomic_store_explicit(&s->v[0], double_bits(0), memory_order_relaxed);
  atomic_store_explicit(&s->removed, false, memory_order_release);
}

void tg_gauge_set(tg_metric_t *m, const char *const *labels, double v) {
  if (m == NULL || m->type != TG_METRIC_GAUGE)
    return;
  series_t *s = gauge_series(m, labels);
  if (s == NULL)
    return;
  atomic_store_explicit(&s->v[0], double_bits(v), memory_order_relaxed);
  atomic_store_explicit(&s->removed, false, memory_order_release);
}

void tg_gauge_add(tg_metric_t *m, const char *const *labels, double delta) {
  if (m == NULL || m->type != TG_METRIC_GAUGE)
    return;
  series_t *s = gauge_series(m, labels);
  if (s == NULL)
    return;
  gauge_revive(s);
  uint64_t old = atomic_load_explicit(&s->v[0], memory_order_relaxed);
  while (!atomic_compare_exchange_weak_explicit(&s->v[0], &old,
                                                double_bits(bits_double(old) + delta),
                                                memory_order_relaxed, memory_order_relaxed))
    ;
}

int tg_gauge_remove(tg_metric_t *m, const char *const *labels) {
  if (m == NULL || m->type != TG_METRIC_GAUGE)
    return 0;
  series_t *s = gauge_find(m, labels, false);
  return s && !atomic_exchange_explicit(&s->removed, true, memory_order_acq_rel);
}

void tg_histogram_observe(tg_metric_t *m, const char *const *labels, double v) {
  if (m == NULL || m->type != TG_METRIC_HISTOGRAM)
    return;
  series_t *s = own_series(m, labels);
  if (s == NULL)
    return;
  /* First bound >= v; NaN compares false everywhere and lands in +Inf. */
  size_t lo = 0, hi = m->nbounds;
  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (v <= m->bounds[mid])
      hi = mid;
    else
      lo = mid + 1;
  }
  own_add_u64(&s->v[1 + lo], 1);
  own_add_double(&s->v[0], v);
}

/* Text-format escaping: backslash and newline always, double quote inside
 * label values. */
static int put_escaped(tg_buf_t *b, const char *s, bool quote) {
  size_t run = 0, i = 0;
  for (; s[i]; i++) {
    const char *esc = NULL;
    if (s[i] == '\\')
      esc = "\\\\";
    else if (s[i] == '\n')
      esc = "\\n";
    else if (quote && s[i] == '"')
      esc = "\\\"";
    if (esc) {
      if (tg_buf_append(b, s + run, i - run) != 0 || tg_buf_puts(b, esc) != 0)
        return -ENOMEM;
      run = i + 1;
    }
  }
  return tg_buf_append(b, s + run, i - run);
}

static int put_sample(tg_buf_t *b, const tg_metric_t *m, const char *suffix,
                      const char *const *labels, const char *le, const char *value) {
  if (tg_buf_puts(b, m->name) != 0 || tg_buf_puts(b, suffix) != 0)
    return -ENOMEM;
  if (m->nlabels || le) {
    char sep = '{';
    for (size_t i = 0; i < m->nlabels; i++) {
      if (tg_buf_append(b, &sep, 1) != 0 || tg_buf_puts(b, m->label_names[i]) != 0 ||
          tg_buf_puts(b, "=\"") != 0 || put_escaped(b, labels[i], true) != 0 ||
          tg_buf_puts(b, "\"") != 0)
        return -ENOMEM;
      sep = ',';
    }
    if (le && (tg_buf_append(b, &sep, 1) != 0 || tg_buf_printf(b, "le=\"%s\"", le) != 0))
      return -ENOMEM;
    if (tg_buf_puts(b, "}") != 0)
      return -ENOMEM;
  }
  if (tg_buf_printf(b, " %s\n", value) != 0)
    return -ENOMEM;
  return 0;
}

static inline uint64_t load_u64(_Atomic uint64_t *p) {
  return atomic_load_explicit(p, memory_order_relaxed);
}

/* Renders n series that share their shown labels (n may be 0 for a family
 * without labels): counters and histograms sum, gauges too (they only share
 * labels when repairing invalid UTF-8 made them equal). */
static int put_group(tg_buf_t *b, const tg_metric_t *m, series_t *const *g, size_t n) {
  const char *const *labels = n ? g[0]->shown : no_labels;
  char num[40];
  if (m->type == TG_METRIC_COUNTER) {
    uint64_t total = 0;
    for (size_t i = 0; i < n; i++)
      total += load_u64(&g[i]->v[0]);
    snprintf(num, sizeof num, "%" PRIu64, total);
    return put_sample(b, m, "", labels, NULL, num);
  }
  if (m->type == TG_METRIC_GAUGE) {
    double v = 0;
    for (size_t i = 0; i < n; i++)
      v += bits_double(load_u64(&g[i]->v[0]));
    fmt_double(num, sizeof num, v);
    return put_sample(b, m, "", labels, NULL, num);
  }
  /* _count is the +Inf bucket as read here, so the two always agree even
   * while observations land. */
  uint64_t cum = 0;
  for (size_t k = 0; k <= m->nbounds; k++) {
    for (size_t i = 0; i < n; i++)
      cum += load_u64(&g[i]->v[1 + k]);
    snprintf(num, sizeof num, "%" PRIu64, cum);
    int rc = put_sample(b, m, "_bucket", labels, k < m->nbounds ? m->le[k] : "+Inf", num);
    if (rc != 0)
      return rc;
  }
  double sum = 0;
  for (size_t i = 0; i < n; i++)
    sum += bits_double(load_u64(&g[i]->v[0]));
  fmt_double(num, sizeof num, sum);
  int rc = put_sample(b, m, "_sum", labels, NULL, num);
  if (rc != 0)
    return rc;
  snprintf(num, sizeof num, "%" PRIu64, cum);
  return put_sample(b, m, "_count", labels, NULL, num);
}

static int cmp_series(const void *a, const void *b) {
  const series_t *x = *(series_t *const *)a, *y = *(series_t *const *)b;
  for (size_t i = 0; i < TG_METRIC_MAX_LABELS; i++) {
    int c = strcmp(x->shown[i], y->shown[i]);
    if (c != 0)
      return c;
  }
  return 0;
}

typedef struct {
  series_t **v;
  size_t n, cap;
} series_vec_t;

static int vec_push(series_vec_t *vec, series_t *s) {
  if (vec->n == vec->cap) {
    size_t cap = vec->cap ? vec->cap * 2 : 64;
    series_t **v = realloc(vec->v, cap * sizeof *v);
    if (v == NULL)
      return -ENOMEM;
    vec->v = v;
    vec->cap = cap;
  }
  vec->v[vec->n++] = s;
  return 0;
}

static int collect(tg_metric_t *m, series_vec_t *vec) {
  vec->n = 0;
  if (m->type == TG_METRIC_GAUGE) {
    for (size_t k = 0; k < GAUGE_BUCKETS; k++)
      for (series_t *s = atomic_load_explicit(&m->gauges[k], memory_order_acquire); s;
           s = s->next)
        if (!atomic_load_explicit(&s->removed, memory_order_acquire) && vec_push(vec, s) != 0)
          return -ENOMEM;
    return 0;
  }
  for (fshard_t *fs = atomic_load_explicit(&m->shards, memory_order_acquire); fs; fs = fs->next)
    for (series_t *s = atomic_load_explicit(&fs->head, memory_order_acquire); s; s = s->next)
      if (vec_push(vec, s) != 0)
        return -ENOMEM;
  return 0;
}

static int render_family(tg_buf_t *b, tg_metric_t *m, series_vec_t *vec) {
  static const char *const type_names[] = {"counter", "gauge", "histogram"};
  if (tg_buf_printf(b, "# HELP %s ", m->name) != 0 || put_escaped(b, m->help, false) != 0 ||
      tg_buf_printf(b, "\n# TYPE %s %s\n", m->name, type_names[m->type]) != 0)
    return -ENOMEM;
  int rc = collect(m, vec);
  if (rc != 0)
    return rc;
  if (vec->n == 0)
    return m->nlabels == 0 ? put_group(b, m, NULL, 0) : 0;
  qsort(vec->v, vec->n, sizeof *vec->v, cmp_series);
  for (size_t i = 0; i < vec->n;) {
    size_t j = i + 1;
    while (j < vec->n && cmp_series(&vec->v[i], &vec->v[j]) == 0)
      j++;
    if ((rc = put_group(b, m, vec->v + i, j - i)) != 0)
      return rc;
    i = j;
  }
  return 0;
}

int tg_metrics_render(tg_buf_t *out) {
  size_t start = out->len;
  series_vec_t vec = {0};
  int rc = 0;
  for (tg_metric_t *m = atomic_load_explicit(&reg.head, memory_order_acquire); m;
       m = atomic_load_explicit(&m->next, memory_order_acquire)) {
    if ((rc = render_family(out, m, &vec)) != 0)
      goto fail;
  }
  free(vec.v);
  return 0;

fail:
  free(vec.v);
  out->len = start;
  if (out->data)
    out->data[start] = '\0';
  return rc;
}

void tg_metrics_reset(void) {
  pthread_mutex_lock(&reg.lock);
  tg_metric_t *m = atomic_load_explicit(&reg.head, memory_order_relaxed);
  shard_t *sh = reg.shards;
  atomic_store_explicit(&reg.head, NULL, memory_order_relaxed);
  reg.tail = NULL;
  reg.nfam = 0;
  reg.shards = NULL;
  atomic_fetch_add_explicit(&reg.gen, 1, memory_order_relaxed);
  pthread_mutex_unlock(&reg.lock);

  while (m) {
    tg_metric_t *next = atomic_load_explicit(&m->next, memory_order_relaxed);
    metric_free(m);
    m = next;
  }
  while (sh) {
    shard_t *next = sh->next;
    free(sh->fam);
    free(sh);
    sh = next;
  }
}
