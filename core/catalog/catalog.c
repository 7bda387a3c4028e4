#include "catalog/catalog.h"

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "catalog/pathtrie.h"

#define NO_SET UINT32_MAX
#define NO_URL UINT32_MAX
#define MAX_LICENSE_URL 2048
#define MAX_CONTENTS (1u << 30)
#define MAX_HITS 32
#define ALL_USERS                                                                                  \
  (TG_RSL_USER_COMMERCIAL | TG_RSL_USER_NON_COMMERCIAL | TG_RSL_USER_EDUCATION |                  \
   TG_RSL_USER_GOVERNMENT | TG_RSL_USER_PERSONAL)
#define AI_USAGE (TG_RSL_USAGE_AI_TRAIN | TG_RSL_USAGE_AI_INPUT | TG_RSL_USAGE_AI_INDEX)

/* A license reduced to what matching needs; prohibits are already applied. */
typedef struct {
  uint32_t usage_allowed;    /* concrete purposes permitted and not prohibited */
  uint32_t usage_prohibited; /* concrete purposes prohibited */
  uint32_t geo_first;        /* permitted codes, then prohibited codes, in geos[] */
  uint32_t pay_first;        /* in pays[] */
  uint16_t npermit_geo, nprohibit_geo;
  uint16_t npay;             /* 0: free */
  uint8_t user_allowed;      /* TG_RSL_USER_* permitted and not prohibited */
  uint8_t has_permit_geo;
  uint8_t reporting;         /* the license asks for usage reports (<reporting>) */
} lic_t;

typedef struct {
  int64_t amount;
  char currency[8];
  uint8_t type; /* tg_rsl_pay_type_t */
} pay_t;

typedef struct {
  uint32_t first, n; /* licenses[first .. first+n) */
} lset_t;

struct tg_catalog {
  tg_pathtrie_t *trie;
  uint32_t ncontents;  /* as in the document, kept or not */
  uint32_t *content_set; /* per content: its license set, NO_SET when it has no license */
  int64_t *lastmod;    /* per content */
  uint32_t *license_url; /* per content: offset in urls, NO_URL when none */
  char *urls;          /* interned license URLs, each NUL-terminated */
  size_t urls_len;
  lset_t *sets;
  lic_t *lics;
  uint16_t *geos; /* two ASCII letters, first in the high byte */
  pay_t *pays;
  uint32_t nsets, nlics, ngeos, npays;
  size_t entries, skipped;
  int64_t built_at;
};

/* Growable arrays used while building; shrunk to fit at the end. */
typedef struct {
  void *p;
  uint32_t n, cap;
} vec_t;

static int vec_reserve(vec_t *v, size_t elsize, size_t more) {
  if ((size_t)v->n + more <= v->cap)
    return 0;
  size_t cap = v->cap ? v->cap : 16;
  while (cap < (size_t)v->n + more)
    cap *= 2;
  if (cap > UINT32_MAX)
    return -E2BIG;
  void *p = realloc(v->p, cap * elsize);
  if (!p)
    return -ENOMEM;
  v->p = p;
  v->cap = (uint32_t)cap;
  return 0;
}

static void *vec_shrink(vec_t *v, size_t elsize) {
  if (v->n == 0) {
    free(v->p);
    return NULL;
  }
  void *p = realloc(v->p, (size_t)v->n * elsize);
  return p ? p : v->p;
}

static uint32_t concrete_usage(uint32_t bits) {
  uint32_t out = bits & TG_CATALOG_USAGE_CONCRETE;
  if (bits & TG_RSL_USAGE_AI_ALL)
    out |= AI_USAGE;
  if (bits & TG_RSL_USAGE_ALL)
    out |= TG_CATALOG_USAGE_CONCRETE;
  return out;
}

static uint16_t geo_code(const char *s) {
  if (!s || !s[0] || !s[1] || s[2])
    return 0;
  unsigned a = (unsigned char)s[0], b = (unsigned char)s[1];
  if (a >= 'a' && a <= 'z')
    a -= 32;
  if (b >= 'a' && b <= 'z')
    b -= 32;
  return (uint16_t)(a << 8 | b);
}

typedef struct {
  vec_t sets, lics, geos, pays;
  uint32_t *slots; /* interning table: set index or NO_SET */
  uint64_t *hashes;
  size_t nslots;
  vec_t urls;        /* bytes of the interned license URLs */
  uint32_t *uslots;  /* their interning table: offset in urls or NO_URL */
  size_t nuslots, nurls;
} builder_t;

static uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h * 0x100000001b3ull;
}

static uint64_t set_hash(const builder_t *b, uint32_t first, uint32_t n) {
  const lic_t *lics = b->lics.p;
  const uint16_t *geos = b->geos.p;
  const pay_t *pays = b->pays.p;
  uint64_t h = mix(0xcbf29ce484222325ull, n);
  for (uint32_t i = first; i < first + n; i++) {
    const lic_t *l = &lics[i];
    h = mix(h, (uint64_t)l->usage_allowed << 32 | l->usage_prohibited);
    h = mix(h, (uint64_t)l->reporting << 48 | (uint64_t)l->user_allowed << 40 | (uint64_t)l->has_permit_geo << 32 |
                   (uint64_t)l->npermit_geo << 16 | l->nprohibit_geo);
    for (uint32_t g = 0; g < (uint32_t)l->npermit_geo + l->nprohibit_geo; g++)
      h = mix(h, geos[l->geo_first + g]);
    h = mix(h, l->npay);
    for (uint32_t k = 0; k < l->npay; k++) {
      const pay_t *p = &pays[l->pay_first + k];
      uint64_t cur = 0;
      memcpy(&cur, p->currency, sizeof cur);
      h = mix(mix(mix(h, (uint64_t)p->amount), cur), p->type);
    }
  }
  return h;
}

static bool lic_equal(const builder_t *b, const lic_t *x, const lic_t *y) {
  const uint16_t *geos = b->geos.p;
  const pay_t *pays = b->pays.p;
  if (x->usage_allowed != y->usage_allowed || x->usage_prohibited != y->usage_prohibited ||
      x->user_allowed != y->user_allowed || x->has_permit_geo != y->has_permit_geo ||
      x->npermit_geo != y->npermit_geo || x->nprohibit_geo != y->nprohibit_geo ||
      x->npay != y->npay || x->reporting != y->reporting)
    return false;
  size_t ngeo = (size_t)x->npermit_geo + x->nprohibit_geo;
  if (ngeo && memcmp(geos + x->geo_first, geos + y->geo_first, ngeo * sizeof *geos) != 0)
    return false;
  for (uint32_t k = 0; k < x->npay; k++) {
    const pay_t *p = &pays[x->pay_first + k], *q = &pays[y->pay_first + k];
    if (p->amount != q->amount || p->type != q->type ||
        memcmp(p->currency, q->currency, sizeof p->currency) != 0)
      return false;
  }
  return true;
}

static int grow_slots(builder_t *b) {
  size_t n = b->nslots ? b->nslots * 2 : 1024;
  uint32_t *slots = malloc(n * sizeof *slots);
  uint64_t *hashes = malloc(n * sizeof *hashes);
  if (!slots || !hashes) {
    free(slots);
    free(hashes);
    return -ENOMEM;
  }
  memset(slots, 0xff, n * sizeof *slots);
  for (size_t i = 0; i < b->nslots; i++) {
    if (b->slots[i] == NO_SET)
      continue;
    size_t j = (size_t)b->hashes[i] & (n - 1);
    while (slots[j] != NO_SET)
      j = (j + 1) & (n - 1);
    slots[j] = b->slots[i];
    hashes[j] = b->hashes[i];
  }
  free(b->slots);
  free(b->hashes);
  b->slots = slots;
  b->hashes = hashes;
  b->nslots = n;
  return 0;
}

/* Appends the content's licenses, then either keeps them as a new set or
 * rolls them back when an identical set exists. */
static int add_set(builder_t *b, const tg_rsl_content_t *ct, uint32_t *set_out, char *err,
                   size_t errlen) {
  int rc;
  if (ct->nlicenses > 0xffff) {
    snprintf(err, errlen, "content %s: too many licenses", ct->url);
    return -E2BIG;
  }
  uint32_t lic0 = b->lics.n, geo0 = b->geos.n, pay0 = b->pays.n;
  if ((rc = vec_reserve(&b->lics, sizeof(lic_t), ct->nlicenses)) < 0)
    return rc;
  for (size_t i = 0; i < ct->nlicenses; i++) {
    const tg_rsl_license_t *rl = &ct->licenses[i];
    if (rl->npayments > 0xffff || rl->npermit_geo > 0xffff || rl->nprohibit_geo > 0xffff) {
      snprintf(err, errlen, "content %s: license too large", ct->url);
      return -E2BIG;
    }
    lic_t l = {0};
    l.reporting = rl->nreporting > 0;
    uint32_t permitted =
        rl->has_permit_usage ? concrete_usage(rl->permit_usage) : TG_CATALOG_USAGE_CONCRETE;
    l.usage_prohibited = concrete_usage(rl->prohibit_usage);
    l.usage_allowed = permitted & ~l.usage_prohibited;
    uint32_t users = rl->has_permit_user ? rl->permit_user : ALL_USERS;
    l.user_allowed = (uint8_t)(users & ~rl->prohibit_user & ALL_USERS);
    l.has_permit_geo = rl->has_permit_geo;
    if ((rc = vec_reserve(&b->geos, sizeof(uint16_t), rl->npermit_geo + rl->nprohibit_geo)) < 0)
      return rc;
    uint16_t *geos = b->geos.p;
    l.geo_first = b->geos.n;
    for (size_t g = 0; g < rl->npermit_geo; g++) {
      uint16_t code = geo_code(rl->permit_geo[g]);
      if (code) {
        geos[b->geos.n++] = code;
        l.npermit_geo++;
      }
    }
    for (size_t g = 0; g < rl->nprohibit_geo; g++) {
      uint16_t code = geo_code(rl->prohibit_geo[g]);
      if (code) {
        geos[b->geos.n++] = code;
        l.nprohibit_geo++;
      }
    }
    if ((rc = vec_reserve(&b->pays, sizeof(pay_t), rl->npayments)) < 0)
      return rc;
    pay_t *pays = b->pays.p;
    l.pay_first = b->pays.n;
    l.npay = (uint16_t)rl->npayments;
    for (size_t k = 0; k < rl->npayments; k++) {
      const tg_rsl_payment_t *rp = &rl->payments[k];
      pay_t p;
      memset(&p, 0, sizeof p); /* padding too: hashing reads the currency bytes */
      p.type = (uint8_t)rp->type;
      p.amount = rp->has_amount && rp->type != TG_RSL_PAY_FREE ? rp->amount : 0;
      memcpy(p.currency, rp->currency, sizeof p.currency);
      p.currency[sizeof p.currency - 1] = '\0';
      pays[b->pays.n++] = p;
    }
    ((lic_t *)b->lics.p)[b->lics.n++] = l;
  }

  uint32_t n = (uint32_t)ct->nlicenses;
  uint64_t h = set_hash(b, lic0, n);
  if (b->nslots == 0 || (size_t)(b->sets.n + 1) * 2 > b->nslots)
    if ((rc = grow_slots(b)) < 0)
      return rc;
  const lset_t *sets = b->sets.p;
  const lic_t *lics = b->lics.p;
  size_t j = (size_t)h & (b->nslots - 1);
  for (; b->slots[j] != NO_SET; j = (j + 1) & (b->nslots - 1)) {
    if (b->hashes[j] != h)
      continue;
    const lset_t *s = &sets[b->slots[j]];
    if (s->n != n)
      continue;
    uint32_t i = 0;
    while (i < n && lic_equal(b, &lics[s->first + i], &lics[lic0 + i]))
      i++;
    if (i == n) {
      b->lics.n = lic0;
      b->geos.n = geo0;
      b->pays.n = pay0;
      *set_out = b->slots[j];
      return 0;
    }
  }
  if ((rc = vec_reserve(&b->sets, sizeof(lset_t), 1)) < 0)
    return rc;
  ((lset_t *)b->sets.p)[b->sets.n] = (lset_t){lic0, n};
  b->slots[j] = b->sets.n;
  b->hashes[j] = h;
  *set_out = b->sets.n++;
  return 0;
}

/* The URL an offer of this content names as its license: the content's
 * legal terms (<terms>), else its license server (server=""). Only an
 * absolute http(s) URL of sane length without spaces or control bytes: it
 * goes to clients as a link. NULL when there is none. */
static const char *license_url_of(const tg_rsl_content_t *ct) {
  const char *cand[] = {ct->terms, ct->server};
  for (size_t i = 0; i < 2; i++) {
    const char *u = cand[i];
    if (!u || (strncasecmp(u, "http://", 7) != 0 && strncasecmp(u, "https://", 8) != 0))
      continue;
    size_t n = strnlen(u, MAX_LICENSE_URL + 1);
    bool clean = n <= MAX_LICENSE_URL && u[u[4] == ':' ? 7 : 8] != '\0';
    for (size_t k = 0; clean && k < n; k++)
      clean = (unsigned char)u[k] > ' ' && u[k] != 0x7f;
    if (clean)
      return u;
  }
  return NULL;
}

static uint64_t str_hash(const char *s) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (; *s; s++)
    h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
  return h;
}

/* Interns url: contents of one publisher mostly share a few terms URLs, so
 * each is stored once. *off gets its offset in b->urls. */
static int intern_url(builder_t *b, const char *url, uint32_t *off) {
  int rc;
  if (b->nuslots == 0 || (b->nurls + 1) * 2 > b->nuslots) {
    size_t n = b->nuslots ? b->nuslots * 2 : 64;
    uint32_t *slots = malloc(n * sizeof *slots);
    if (!slots)
      return -ENOMEM;
    memset(slots, 0xff, n * sizeof *slots);
    for (size_t i = 0; i < b->nuslots; i++) {
      if (b->uslots[i] == NO_URL)
        continue;
      size_t j = (size_t)str_hash((const char *)b->urls.p + b->uslots[i]) & (n - 1);
      while (slots[j] != NO_URL)
        j = (j + 1) & (n - 1);
      slots[j] = b->uslots[i];
    }
    free(b->uslots);
    b->uslots = slots;
    b->nuslots = n;
  }
  size_t j = (size_t)str_hash(url) & (b->nuslots - 1);
  for (; b->uslots[j] != NO_URL; j = (j + 1) & (b->nuslots - 1))
    if (strcmp((const char *)b->urls.p + b->uslots[j], url) == 0) {
      *off = b->uslots[j];
      return 0;
    }
  size_t len = strlen(url) + 1;
  if ((rc = vec_reserve(&b->urls, 1, len)) < 0)
    return rc;
  *off = b->urls.n;
  memcpy((char *)b->urls.p + b->urls.n, url, len);
  b->urls.n += (uint32_t)len;
  b->uslots[j] = *off;
  b->nurls++;
  return 0;
}

/* Length of the host part of "host[:port]" without the port. */
static size_t host_len(const char *h, size_t n) {
  if (n > 0 && h[0] == '[') {
    const char *close = memchr(h, ']', n);
    return close ? (size_t)(close - h) + 1 : n;
  }
  const char *colon = memchr(h, ':', n);
  return colon ? (size_t)(colon - h) : n;
}

static bool own_host(const char *h, size_t n, const char *const *hosts, size_t nhosts) {
  n = host_len(h, n);
  for (size_t i = 0; i < nhosts; i++) {
    if (!hosts[i])
      continue;
    size_t m = host_len(hosts[i], strlen(hosts[i]));
    if (m == n && strncasecmp(hosts[i], h, n) == 0)
      return true;
  }
  return false;
}

/* Turns a content url into the path pattern to index. Returns false when the
 * content is not this tenant's (foreign host, other scheme). */
static bool url_pattern(const char *url, const char *const *hosts, size_t nhosts,
                        const char **pat, size_t *len) {
  size_t skip;
  if (strncasecmp(url, "http://", 7) == 0)
    skip = 7;
  else if (strncasecmp(url, "https://", 8) == 0)
    skip = 8;
  else if (strstr(url, "://"))
    return false;
  else {
    *pat = url;
    *len = strlen(url);
    return true;
  }
  const char *host = url + skip;
  size_t hn = strcspn(host, "/?#");
  const char *at = memchr(host, '@', hn); /* userinfo is not part of the host */
  if (at) {
    hn -= (size_t)(at + 1 - host);
    host = at + 1;
  }
  if (hn == 0 || !own_host(host, hn, hosts, nhosts))
    return false;
  const char *path = host + hn;
  size_t pn = strcspn(path, "#");
  if (pn == 0 || path[0] != '/') {
    /* "https://h" or "https://h?q": the pattern is the root, "/" */
    *pat = "/";
    *len = 1;
    return true;
  }
  *pat = path;
  *len = pn;
  return true;
}

int tg_catalog_build(const tg_rsl_doc_t *doc, const char *const *hosts, size_t nhosts,
                     tg_catalog_t **out, char *err, size_t errlen) {
  char dummy[1];
  if (!err || errlen == 0) {
    err = dummy;
    errlen = sizeof dummy;
  }
  err[0] = '\0';
  if (out)
    *out = NULL;
  if (!doc || !out || (nhosts > 0 && !hosts)) {
    snprintf(err, errlen, "catalog: NULL argument");
    return -EINVAL;
  }
  if (doc->ncontents > MAX_CONTENTS) {
    snprintf(err, errlen, "catalog: %zu contents, limit %u", doc->ncontents, MAX_CONTENTS);
    return -E2BIG;
  }
  int rc = -ENOMEM;
  builder_t b = {0};
  tg_pathtrie_builder_t *tb = NULL;
  tg_catalog_t *c = calloc(1, sizeof *c);
  if (!c)
    goto fail;
  c->ncontents = (uint32_t)doc->ncontents;
  if (c->ncontents) {
    c->content_set = malloc(c->ncontents * sizeof *c->content_set);
    c->lastmod = malloc(c->ncontents * sizeof *c->lastmod);
    c->license_url = malloc(c->ncontents * sizeof *c->license_url);
    if (!c->content_set || !c->lastmod || !c->license_url)
      goto fail;
  }
  if (!(tb = tg_pathtrie_builder_new()))
    goto fail;

  for (uint32_t i = 0; i < c->ncontents; i++) {
    const tg_rsl_content_t *ct = &doc->contents[i];
    c->content_set[i] = NO_SET;
    c->lastmod[i] = ct->lastmod;
    c->license_url[i] = NO_URL;
    const char *pat;
    size_t plen;
    if (!ct->url || !url_pattern(ct->url, hosts, nhosts, &pat, &plen)) {
      c->skipped++;
      continue;
    }
    if (ct->nlicenses > 0 && (rc = add_set(&b, ct, &c->content_set[i], err, errlen)) < 0)
      goto fail;
    const char *lu = ct->nlicenses > 0 ? license_url_of(ct) : NULL;
    if (lu && (rc = intern_url(&b, lu, &c->license_url[i])) < 0) {
      if (rc == -E2BIG)
        snprintf(err, errlen, "catalog: license URLs over 4 GiB");
      goto fail;
    }
    if ((rc = tg_pathtrie_builder_add(tb, pat, plen, i)) < 0) {
      snprintf(err, errlen, "catalog: content %s: %s", ct->url, strerror(-rc));
      goto fail;
    }
    c->entries++;
  }
  c->trie = tg_pathtrie_build(tb);
  tb = NULL;
  rc = -ENOMEM;
  if (!c->trie)
    goto fail;
  c->nsets = b.sets.n;
  c->nlics = b.lics.n;
  c->ngeos = b.geos.n;
  c->npays = b.pays.n;
  c->sets = vec_shrink(&b.sets, sizeof(lset_t));
  c->lics = vec_shrink(&b.lics, sizeof(lic_t));
  c->geos = vec_shrink(&b.geos, sizeof(uint16_t));
  c->pays = vec_shrink(&b.pays, sizeof(pay_t));
  c->urls_len = b.urls.n;
  c->urls = vec_shrink(&b.urls, 1);
  free(b.slots);
  free(b.hashes);
  free(b.uslots);
  c->built_at = (int64_t)time(NULL);
  *out = c;
  return 0;

fail:
  if (rc == -ENOMEM && !err[0])
    snprintf(err, errlen, "catalog: out of memory");
  tg_pathtrie_builder_free(tb);
  free(b.sets.p);
  free(b.lics.p);
  free(b.geos.p);
  free(b.pays.p);
  free(b.slots);
  free(b.hashes);
  free(b.urls.p);
  free(b.uslots);
  tg_catalog_free(c);
  return rc;
}

void tg_catalog_free(tg_catalog_t *c) {
  if (!c)
    return;
  tg_pathtrie_free(c->trie);
  free(c->content_set);
  free(c->lastmod);
  free(c->license_url);
  free(c->urls);
  free(c->sets);
  free(c->lics);
  free(c->geos);
  free(c->pays);
  free(c);
}

size_t tg_catalog_bytes(const tg_catalog_t *c) {
  if (!c)
    return 0;
  return sizeof *c + tg_pathtrie_bytes(c->trie) +
         (size_t)c->ncontents * (sizeof *c->content_set + sizeof *c->lastmod + sizeof *c->license_url) +
         c->urls_len +
         (size_t)c->nsets * sizeof(lset_t) + (size_t)c->nlics * sizeof(lic_t) +
         (size_t)c->ngeos * sizeof(uint16_t) + (size_t)c->npays * sizeof(pay_t);
}

size_t tg_catalog_entries(const tg_catalog_t *c) { return c ? c->entries : 0; }
size_t tg_catalog_skipped(const tg_catalog_t *c) { return c ? c->skipped : 0; }
size_t tg_catalog_license_sets(const tg_catalog_t *c) { return c ? c->nsets : 0; }
int64_t tg_catalog_built_at(const tg_catalog_t *c) { return c ? c->built_at : 0; }

static bool geo_listed(const uint16_t *g, uint32_t n, uint16_t code) {
  for (uint32_t i = 0; i < n; i++)
    if (g[i] == code)
      return true;
  return false;
}

static bool lic_admits(const tg_catalog_t *c, const lic_t *l, uint32_t usage, uint32_t user,
                       uint16_t country) {
  if (usage ? (usage & ~l->usage_allowed) != 0 : l->usage_allowed == 0)
    return false;
  if (user ? (user & ~(uint32_t)l->user_allowed) != 0 : l->user_allowed == 0)
    return false;
  if (!country)
    return !l->has_permit_geo && l->nprohibit_geo == 0;
  if (l->npermit_geo + l->nprohibit_geo == 0)
    return !l->has_permit_geo; /* an empty permits list denies every country */
  const uint16_t *g = c->geos + l->geo_first;
  if (l->has_permit_geo && !geo_listed(g, l->npermit_geo, country))
    return false;
  return !geo_listed(g + l->npermit_geo, l->nprohibit_geo, country);
}

static void add_offers(const tg_catalog_t *c, uint32_t content, uint32_t li, const lic_t *l,
                       tg_catalog_result_t *res) {
  uint32_t n = l->npay ? l->npay : 1;
  for (uint32_t k = 0; k < n; k++) {
    res->total_offers++;
    if (res->noffers == TG_CATALOG_MAX_OFFERS)
      continue;
    tg_catalog_offer_t *o = &res->offers[res->noffers++];
    memset(o, 0, sizeof *o);
    o->key = tg_catalog_offer_key(content, li, k);
    o->content = content;
    o->lastmod = c->lastmod[content];
    o->license_url = c->license_url[content] == NO_URL ? NULL : c->urls + c->license_url[content];
    o->usage = l->usage_allowed;
    o->reporting = l->reporting != 0;
    if (l->npay) {
      const pay_t *p = &c->pays[l->pay_first + k];
      o->type = (tg_rsl_pay_type_t)p->type;
      o->amount = p->amount;
      memcpy(o->currency, p->currency, sizeof o->currency);
    } else {
      o->type = TG_RSL_PAY_FREE;
    }
  }
}

/* Evaluates one content; appends its offers when it has any. */
static tg_catalog_status_t eval_content(const tg_catalog_t *c, uint32_t content, uint32_t usage,
                                        uint32_t user, uint16_t country,
                                        tg_catalog_result_t *res) {
  uint32_t si = c->content_set[content];
  if (si == NO_SET)
    return TG_CATALOG_NOT_FOR_SALE;
  const lset_t *s = &c->sets[si];
  const lic_t *lics = c->lics + s->first;
  for (uint32_t i = 0; i < s->n; i++) {
    uint32_t x = lics[i].usage_prohibited;
    if (usage ? (usage & x) != 0 : x == TG_CATALOG_USAGE_CONCRETE)
      return TG_CATALOG_PROHIBITED;
  }
  tg_catalog_status_t st = TG_CATALOG_FILTERED;
  for (uint32_t i = 0; i < s->n; i++) {
    if (!lic_admits(c, &lics[i], usage, user, country))
      continue;
    st = TG_CATALOG_OFFERS;
    add_offers(c, content, i, &lics[i], res);
  }
  return st;
}

/* Lower is more restrictive when tied contents disagree. */
static int restrictiveness(tg_catalog_status_t st) {
  switch (st) {
  case TG_CATALOG_PROHIBITED:
    return 0;
  case TG_CATALOG_NOT_FOR_SALE:
    return 1;
  case TG_CATALOG_FILTERED:
    return 2;
  default:
    return 3;
  }
}

int tg_catalog_lookup(const tg_catalog_t *c, const char *path, size_t len,
                      const tg_catalog_query_t *q, tg_catalog_result_t *res) {
  if (!c || !res || (!path && len))
    return -EINVAL;
  res->status = TG_CATALOG_NOT_IN_CATALOG;
  res->content = UINT32_MAX;
  res->noffers = res->total_offers = 0;
  uint32_t usage = q ? concrete_usage(q->usage) : 0;
  uint32_t user = q ? q->user & ALL_USERS : 0;
  uint16_t country = q ? geo_code(q->country) : 0;

  tg_pathtrie_hit_t hits[MAX_HITS];
  size_t n = tg_pathtrie_match(c->trie, path ? path : "", len, hits, MAX_HITS);
  if (n == 0)
    return 0;
  if (n > MAX_HITS)
    n = MAX_HITS;
  res->content = hits[0].value;
  tg_catalog_status_t worst = TG_CATALOG_OFFERS;
  for (size_t i = 0; i < n && hits[i].specificity == hits[0].specificity; i++) {
    tg_catalog_status_t st = eval_content(c, hits[i].value, usage, user, country, res);
    if (restrictiveness(st) < restrictiveness(worst))
      worst = st;
  }
  res->status = worst;
  if (worst != TG_CATALOG_OFFERS)
    res->noffers = res->total_offers = 0;
  return 0;
}
