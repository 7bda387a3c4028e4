#ifndef TG_CATALOG_H
#define TG_CATALOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "catalog/rsl.h"

/* One tenant's immutable catalog: the RSL contents of its document indexed by
 * path pattern (core/pathtrie.h), with the terms matching needs copied into
 * compact arrays. Built once off the request path; then read-only, so any
 * number of threads may look up in one catalog at once without locks. Whoever
 * publishes it frees it only after its last reader has finished.
 *
 * Matching rules (RSL 1.0, robots.txt precedence):
 * - every pattern matching the path is found; the most specific (longest
 *   pattern) wins. Several contents tied at the top specificity combine with
 *   the most restrictive reading: if one prohibits, the answer is PROHIBITED;
 *   if one has no license, NOT_FOR_SALE; if one admits nothing, FILTERED;
 *   otherwise the offers of all of them (each offer names its content). Only
 *   the 32 most specific matches are looked at, so at most 32 tied contents.
 * - within a content, licenses are alternatives. If any license prohibits one
 *   of the query's purposes, the content is PROHIBITED (prohibits beats
 *   permits, whatever the license's user/geo terms). A license applies when
 *   it admits every queried purpose, the user type and the country.
 * - a permits list is closed: with it, unlisted values are denied; without it,
 *   everything is allowed. "all" means every purpose, "ai-all" means ai-train,
 *   ai-input and ai-index; a query for "ai-all" asks for all three.
 * - unspecified query fields: purposes 0 means "any purpose": PROHIBITED only
 *   when every purpose is prohibited, and a license applies when it allows at
 *   least one. User type 0 likewise. Country "" is admitted only by licenses
 *   without any geo terms (an unknown country cannot be shown to be allowed).
 * - a content without <license> means nothing is licensed: NOT_FOR_SALE.
 * - a license without <payment> is free: one offer of type FREE, amount 0.
 *
 * Each content keeps the URL its offers name as their license (see
 * tg_catalog_offer_t.license_url), interned: a publisher's contents mostly
 * share one terms URL.
 *
 * Identical license sets are interned: each content stores a 32-bit index of
 * its set, so a million contents sharing a few sets cost little beyond the
 * trie. */

#define TG_CATALOG_MAX_OFFERS 8

/* Purposes as concrete bits: what "all" and "ai-all" expand to. */
#define TG_CATALOG_USAGE_CONCRETE                                                                  \
  (TG_RSL_USAGE_AI_TRAIN | TG_RSL_USAGE_AI_INPUT | TG_RSL_USAGE_AI_INDEX | TG_RSL_USAGE_SEARCH)

typedef struct tg_catalog tg_catalog_t;

typedef enum {
  TG_CATALOG_NOT_IN_CATALOG, /* no pattern matched the path */
  TG_CATALOG_PROHIBITED,     /* a winning license prohibits a queried purpose */
  TG_CATALOG_FILTERED,       /* licenses exist, none admits the purposes/user type/country */
  TG_CATALOG_NOT_FOR_SALE,   /* the winning content has no license */
  TG_CATALOG_OFFERS,         /* at least one offer */
} tg_catalog_status_t;

typedef struct {
  uint32_t usage; /* TG_RSL_USAGE_* wanted; 0 unspecified */
  uint32_t user;  /* one TG_RSL_USER_* bit (several allowed: all must be admitted); 0 unspecified */
  char country[3]; /* ISO 3166-1 alpha-2 ("US", case-insensitive) or "" unknown */
} tg_catalog_query_t;

typedef struct {
  uint64_t key;            /* stable within one document: see tg_catalog_offer_key */
  int64_t amount;          /* atomic units (micro-units of currency); 0 when free or when the
                            * payment had no <amount> (attribution, or priced elsewhere:
                            * the tenant's price hook decides) */
  int64_t lastmod;         /* the content's lastmod, unix seconds, 0 unknown */
  const char *license_url; /* the content's <terms> URL, else its license server (server=""),
                            * when it is an absolute http(s) URL; NULL none. Points into the
                            * catalog: valid as long as the catalog is */
  uint32_t content;        /* index of the content in the RSL document */
  uint32_t usage;          /* purposes the license allows, concrete bits (prohibits removed) */
  tg_rsl_pay_type_t type;  /* TG_RSL_PAY_FREE for a license without payment */
  char currency[8];        /* as written, "" when absent */
  bool reporting;          /* the license has a <reporting> element: usage reports are owed */
} tg_catalog_offer_t;

typedef struct {
  tg_catalog_status_t status;
  uint32_t content;        /* winning content's document index (the lowest among ties);
                            * UINT32_MAX when none */
  uint32_t noffers;        /* offers written, at most TG_CATALOG_MAX_OFFERS */
  uint32_t total_offers;   /* applicable (license, payment) pairs, may exceed noffers */
  tg_catalog_offer_t offers[TG_CATALOG_MAX_OFFERS];
} tg_catalog_result_t;

/* Builds the catalog of doc for a tenant serving hosts[0..nhosts) (names,
 * optionally with ":port"; compared case-insensitively, ports ignored).
 * A content url is a path pattern, or an http(s) URL kept only when its host is
 * one of hosts (scheme and host are stripped, "" path becomes "/", a fragment
 * is dropped); other absolute URLs are skipped. doc may be freed afterwards.
 * Returns 0 and *out (free with tg_catalog_free), or -EINVAL (NULL argument),
 * -E2BIG (over 2^30 contents, or 65535 licenses/payments in one content or
 * license), -ENOMEM; then *out is NULL and err (if errlen > 0) says why. */
int tg_catalog_build(const tg_rsl_doc_t *doc, const char *const *hosts, size_t nhosts,
                     tg_catalog_t **out, char *err, size_t errlen);

/* NULL is a no-op. The caller makes sure no reader is left. */
void tg_catalog_free(tg_catalog_t *c);

/* Bytes held by the catalog, trie included (not malloc overhead). */
size_t tg_catalog_bytes(const tg_catalog_t *c);

/* Patterns indexed (contents kept). */
size_t tg_catalog_entries(const tg_catalog_t *c);

/* Contents skipped at build (absolute URL of a foreign host or another scheme). */
size_t tg_catalog_skipped(const tg_catalog_t *c);

/* Distinct license sets after interning. */
size_t tg_catalog_license_sets(const tg_catalog_t *c);

/* Unix seconds at build. */
int64_t tg_catalog_built_at(const tg_catalog_t *c);

/* Matches path[0..len) (no scheme/host; include the query string if patterns
 * should see it) and fills *res. q may be NULL (all unspecified). Returns 0 or
 * -EINVAL (NULL c or res). Pure read, no allocation, no lock: any thread. */
int tg_catalog_lookup(const tg_catalog_t *c, const char *path, size_t len,
                      const tg_catalog_query_t *q, tg_catalog_result_t *res);

/* The offer key layout: content index (32 bits) | license index (16) | payment
 * index (16), indices as in the RSL document (payment 0 for a free license). */
static inline uint64_t tg_catalog_offer_key(uint32_t content, uint32_t license, uint32_t payment) {
  return ((uint64_t)content << 32) | ((uint64_t)(license & 0xffff) << 16) | (payment & 0xffff);
}

#endif
