#include "catalog/pathtrie.h"

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Largest pattern and pattern count: a label length shares a uint32_t with a
 * child count, and node indices (at most 2n+1) must fit a uint32_t. */
#define MAX_PATTERN_LEN ((size_t)1 << 20)
#define MAX_PATTERNS ((size_t)1 << 30)

#define PAY_ANCHORED ((uint32_t)1 << 31)
#define PAY_GLOB ((uint32_t)1 << 30)
#define PAY_LEN_MASK (PAY_GLOB - 1)

/* A pattern as the builder holds it: the normalized body in the pool, split
 * into the literal key (walked in the trie) and the glob tail from the first '*'. */
typedef struct entry {
  uint32_t off;      /* body offset in the pool */
  uint32_t key_len;  /* bytes before the first '*' */
  uint32_t body_len; /* key plus tail, without the trailing '$' */
  uint32_t spec;     /* the pattern's length as added */
  uint32_t value;
  uint32_t anchored; /* ended in '$' (and not in "*$", which anchors nothing) */
} entry_t;

struct tg_pathtrie_builder {
  char *pool;
  size_t pool_len, pool_cap;
  entry_t *entries;
  size_t n, cap;
};

/* Labels this short live in the node itself: one cache miss less per level,
 * and most labels deep in a path trie (ids, dates) are this short. */
#define INLINE_LABEL 8
#define NCHILD_BITS 9

/* Children of a node are the contiguous range nodes[child_off, +nchild),
 * sorted by the first byte of their label, and firsts[child_off, +nchild)
 * holds those bytes, so a child search reads one cache line; a node's
 * patterns are the range pay[pay_off, +npay), most specific first. */
typedef struct node {
  union {
    uint32_t off;                  /* in labels[] when longer than INLINE_LABEL */
    uint8_t bytes[INLINE_LABEL];   /* else the label itself */
  } label;                         /* the edge label into this node */
  uint32_t child_off;
  uint32_t pay_off;
  uint32_t npay;
  uint32_t meta; /* label length << NCHILD_BITS | children (at most 256) */
} node_t;

static inline uint32_t node_label_len(const node_t *nd) { return nd->meta >> NCHILD_BITS; }
static inline uint32_t node_nchild(const node_t *nd) {
  return nd->meta & ((1u << NCHILD_BITS) - 1);
}

typedef struct payload {
  uint32_t value;
  uint32_t spec;
  uint32_t tail_off;   /* glob tail (starting with '*') in tails[] */
  uint32_t tail_flags; /* tail length | PAY_GLOB | PAY_ANCHORED */
} payload_t;

struct tg_pathtrie {
  node_t *nodes;
  uint8_t *firsts; /* first label byte of each node */
  size_t nnodes;
  uint8_t *labels;
  size_t nlabels;
  payload_t *pay;
  size_t npay;
  char *tails;
  size_t ntails;
};

tg_pathtrie_builder_t *tg_pathtrie_builder_new(void) {
  return calloc(1, sizeof(tg_pathtrie_builder_t));
}

void tg_pathtrie_builder_free(tg_pathtrie_builder_t *b) {
  if (!b)
    return;
  free(b->pool);
  free(b->entries);
  free(b);
}

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
  if (need <= *cap)
    return 0;
  size_t ncap = *cap ? *cap : 64;
  while (ncap < need)
    ncap *= 2;
  void *np = realloc(*p, ncap * elem);
  if (!np)
    return -ENOMEM;
  *p = np;
  *cap = ncap;
  return 0;
}

int tg_pathtrie_builder_add(tg_pathtrie_builder_t *b, const char *pattern, size_t len,
                            uint32_t value) {
  if (!b || (!pattern && len > 0))
    return -EINVAL;
  if (len >= MAX_PATTERN_LEN || b->n >= MAX_PATTERNS || b->pool_len + len > UINT32_MAX)
    return -E2BIG;
  bool anchored = len > 0 && pattern[len - 1] == '$';
  size_t body = anchored ? len - 1 : len;
  /* A trailing '*' swallows the rest of any path, so "/a*" and "/a*$" are
   * plain prefix matches on "/a": keep them out of the glob matcher. */
  if (body > 0 && pattern[body - 1] == '*') {
    while (body > 0 && pattern[body - 1] == '*')
      body--;
    anchored = false;
  }
  if (grow((void **)&b->entries, &b->cap, b->n + 1, sizeof(entry_t)) < 0 ||
      grow((void **)&b->pool, &b->pool_cap, b->pool_len + body + 1, 1) < 0)
    return -ENOMEM;
  entry_t *e = &b->entries[b->n];
  e->off = (uint32_t)b->pool_len;
  e->key_len = UINT32_MAX;
  char *out = b->pool + b->pool_len;
  size_t o = 0;
  for (size_t i = 0; i < body; i++) {
    if (pattern[i] == '*') {
      if (o > 0 && out[o - 1] == '*' && e->key_len != UINT32_MAX)
        continue; /* "**" is "*" */
      if (e->key_len == UINT32_MAX)
        e->key_len = (uint32_t)o;
    }
    out[o++] = pattern[i];
  }
  if (e->key_len == UINT32_MAX)
    e->key_len = (uint32_t)o;
  e->body_len = (uint32_t)o;
  e->spec = (uint32_t)len;
  e->value = value;
  e->anchored = anchored;
  b->pool_len += o;
  b->n++;
  return 0;
}

/* Key order (so that equal keys and shared prefixes are adjacent, a prefix
 * before its extensions), then most specific first, then smaller value. */
static int entry_cmp(const void *pa, const void *pb, void *arg) {
  const entry_t *a = pa, *b = pb;
  const char *pool = arg;
  size_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
  int c = memcmp(pool + a->off, pool + b->off, n);
  if (c)
    return c;
  if (a->key_len != b->key_len)
    return a->key_len < b->key_len ? -1 : 1;
  if (a->spec != b->spec)
    return a->spec > b->spec ? -1 : 1;
  if (a->value != b->value)
    return a->value < b->value ? -1 : 1;
  return a->off < b->off ? -1 : a->off > b->off;
}

/* The range of sorted entries under one node, before its label is known. */
typedef struct span {
  uint32_t lo, hi;
  uint32_t depth; /* key bytes consumed above this node */
} span_t;

void tg_pathtrie_free(tg_pathtrie_t *t) {
  if (!t)
    return;
  free(t->nodes);
  free(t->firsts);
  free(t->labels);
  free(t->pay);
  free(t->tails);
  free(t);
}

static void *shrink(void *p, size_t bytes) {
  void *np = realloc(p, bytes ? bytes : 1);
  return np ? np : p;
}

/* First index in [lo, hi) whose key byte at depth exceeds c; every key there
 * is longer than depth and the byte at depth is non-decreasing. */
static uint32_t group_end(const entry_t *e, const char *pool, uint32_t lo, uint32_t hi,
                          uint32_t depth, uint8_t c) {
  while (lo < hi) {
    uint32_t mid = lo + (hi - lo) / 2;
    if ((uint8_t)pool[e[mid].off + depth] <= c)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

tg_pathtrie_t *tg_pathtrie_build(tg_pathtrie_builder_t *b) {
  if (!b)
    return NULL;
  tg_pathtrie_t *t = calloc(1, sizeof(*t));
  span_t *spans = NULL;
  uint32_t *stack = NULL;
  if (!t)
    goto fail;
  size_t n = b->n;
  entry_t *e = b->entries;
  const char *pool = b->pool;
  if (n > 1)
    qsort_r(e, n, sizeof(entry_t), entry_cmp, b->pool);

  size_t key_bytes = 0, tail_bytes = 0;
  for (size_t i = 0; i < n; i++) {
    key_bytes += e[i].key_len;
    tail_bytes += e[i].body_len - e[i].key_len;
  }
  size_t max_nodes = 2 * n + 1;
  t->nodes = malloc(max_nodes * sizeof(node_t));
  t->firsts = malloc(max_nodes);
  spans = malloc(max_nodes * sizeof(span_t));
  stack = malloc(max_nodes * sizeof(uint32_t));
  t->labels = malloc(key_bytes + 1);
  t->pay = malloc((n ? n : 1) * sizeof(payload_t));
  t->tails = malloc(tail_bytes + 1);
  if (!t->nodes || !t->firsts || !spans || !stack || !t->labels || !t->pay || !t->tails)
    goto fail;

  for (size_t i = 0; i < n; i++) {
    payload_t *p = &t->pay[i];
    uint32_t tail = e[i].body_len - e[i].key_len;
    p->value = e[i].value;
    p->spec = e[i].spec;
    p->tail_off = (uint32_t)t->ntails;
    p->tail_flags = tail | (tail ? PAY_GLOB : 0) | (e[i].anchored ? PAY_ANCHORED : 0);
    memcpy(t->tails + t->ntails, pool + e[i].off + e[i].key_len, tail);
    t->ntails += tail;
  }
  t->npay = n;

  /* Each node allocates its children together; nodes are visited depth first
   * so that a subtree's blocks, labels and patterns sit close in memory. */
  spans[0] = (span_t){0, (uint32_t)n, 0};
  memset(&t->nodes[0], 0, sizeof(node_t));
  t->firsts[0] = 0;
  t->nnodes = 1;
  size_t depth = 0;
  stack[depth++] = 0;
  while (depth > 0) {
    uint32_t i = stack[--depth];
    node_t *nd = &t->nodes[i];
    span_t s = spans[i];
    uint32_t lcp = s.depth;
    if (s.lo < s.hi) {
      const entry_t *a = &e[s.lo], *z = &e[s.hi - 1];
      uint32_t m = a->key_len < z->key_len ? a->key_len : z->key_len;
      while (lcp < m && pool[a->off + lcp] == pool[z->off + lcp])
        lcp++;
      uint32_t label_len = lcp - s.depth;
      nd->meta = label_len << NCHILD_BITS;
      if (label_len <= INLINE_LABEL) {
        memcpy(nd->label.bytes, pool + a->off + s.depth, label_len);
      } else {
        nd->label.off = (uint32_t)t->nlabels;
        memcpy(t->labels + t->nlabels, pool + a->off + s.depth, label_len);
        t->nlabels += label_len;
      }
    }
    uint32_t j = s.lo;
    while (j < s.hi && e[j].key_len == lcp)
      j++;
    nd->pay_off = s.lo;
    nd->npay = j - s.lo;
    nd->child_off = (uint32_t)t->nnodes;
    while (j < s.hi) {
      uint8_t c = (uint8_t)pool[e[j].off + lcp];
      uint32_t end = group_end(e, pool, j, s.hi, lcp, c);
      node_t *ch = &t->nodes[t->nnodes];
      memset(ch, 0, sizeof(*ch));
      t->firsts[t->nnodes] = c;
      spans[t->nnodes] = (span_t){j, end, lcp};
      t->nnodes++;
      nd->meta++;
      j = end;
    }
    for (uint32_t k = node_nchild(nd); k > 0; k--)
      stack[depth++] = nd->child_off + k - 1;
  }

  free(spans);
  free(stack);
  tg_pathtrie_builder_free(b);
  t->nodes = shrink(t->nodes, t->nnodes * sizeof(node_t));
  t->firsts = shrink(t->firsts, t->nnodes);
  t->labels = shrink(t->labels, t->nlabels);
  t->tails = shrink(t->tails, t->ntails);
  return t;

fail:
  free(spans);
  free(stack);
  tg_pathtrie_builder_free(b);
  tg_pathtrie_free(t);
  return NULL;
}

size_t tg_pathtrie_bytes(const tg_pathtrie_t *t) {
  if (!t)
    return 0;
  return sizeof(*t) + t->nnodes * (sizeof(node_t) + 1) + t->nlabels + t->npay * sizeof(payload_t) +
         t->ntails;
}

size_t tg_pathtrie_count(const tg_pathtrie_t *t) { return t ? t->npay : 0; }

/* Two-pointer glob over '*' and literals: on a mismatch, retry from the last
 * '*' with one more byte swallowed. Only the last '*' is ever revisited, which
 * is enough for '*'-only globs and bounds the work by plen * slen. An
 * unanchored pattern is done once the pattern is used up (prefix match). */
static bool glob_match(const char *p, size_t plen, const char *s, size_t slen, bool anchored) {
  size_t pi = 0, si = 0, star = SIZE_MAX, mark = 0;
  while (si < slen) {
    if (pi < plen && p[pi] == '*') {
      star = pi++;
      mark = si;
    } else if (pi < plen && p[pi] == s[si]) {
      pi++;
      si++;
    } else if (pi == plen && !anchored) {
      return true;
    } else if (star != SIZE_MAX) {
      pi = star + 1;
      si = ++mark;
    } else {
      return false;
    }
  }
  while (pi < plen && p[pi] == '*')
    pi++;
  return pi == plen;
}

static bool better(const tg_pathtrie_hit_t *a, const tg_pathtrie_hit_t *b) {
  return a->specificity > b->specificity ||
         (a->specificity == b->specificity && a->value < b->value);
}

/* Keeps hits[0..kept) sorted, dropping the least specific once full. */
static void keep_hit(tg_pathtrie_hit_t *hits, size_t max_hits, size_t kept,
                     const payload_t *p) {
  tg_pathtrie_hit_t h = {p->value, p->spec};
  size_t i = kept < max_hits ? kept : max_hits;
  if (i == max_hits && (max_hits == 0 || !better(&h, &hits[max_hits - 1])))
    return;
  if (i == max_hits)
    i--;
  while (i > 0 && better(&h, &hits[i - 1])) {
    hits[i] = hits[i - 1];
    i--;
  }
  hits[i] = h;
}

static const node_t *find_child(const tg_pathtrie_t *t, const node_t *nd, uint8_t c) {
  /* First bytes are distinct: memchr's vector scan beats a branchy binary
   * search at these sizes (at most 256). */
  const uint8_t *f = t->firsts + nd->child_off;
  const uint8_t *hit = memchr(f, c, node_nchild(nd));
  return hit ? &t->nodes[nd->child_off + (uint32_t)(hit - f)] : NULL;
}

size_t tg_pathtrie_match(const tg_pathtrie_t *t, const char *path, size_t len,
                         tg_pathtrie_hit_t *hits, size_t max_hits) {
  if (!t || (!path && len > 0))
    return 0;
  size_t found = 0, pos = 0;
  const node_t *nd = &t->nodes[0];
  for (;;) {
    /* Every pattern below this node has the whole label in its literal key. */
    uint32_t label_len = node_label_len(nd);
    if (label_len > 0) {
      if (len - pos < label_len)
        break;
      if (label_len <= INLINE_LABEL) {
        uint32_t k = 0;
        while (k < label_len && (uint8_t)path[pos + k] == nd->label.bytes[k])
          k++;
        if (k < label_len)
          break;
      } else if (memcmp(path + pos, t->labels + nd->label.off, label_len) != 0) {
        break;
      }
      pos += label_len;
    }
    const payload_t *p = &t->pay[nd->pay_off], *pe = p + nd->npay;
    for (; p < pe; p++) {
      bool anchored = p->tail_flags & PAY_ANCHORED;
      bool ok;
      if (p->tail_flags & PAY_GLOB)
        ok = glob_match(t->tails + p->tail_off, p->tail_flags & PAY_LEN_MASK, path + pos,
                        len - pos, anchored);
      else
        ok = !anchored || pos == len;
      if (ok)
        keep_hit(hits, max_hits, found++, p);
    }
    if (pos == len || node_nchild(nd) == 0)
      break;
    nd = find_child(t, nd, (uint8_t)path[pos]);
    if (!nd)
      break;
  }
  return found;
}
