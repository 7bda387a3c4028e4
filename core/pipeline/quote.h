#ifndef TG_QUOTE_H
#define TG_QUOTE_H

#include <stddef.h>
#include <stdint.h>

#include "catalog/catalog.h"
#include "config/config.h"
#include "pipeline/view.h"
#include "policy/policy.h"

/* What one resource is offered at, for one request view: the tenant's
 * catalog matched on the view's path (and query) with the view's identity
 * (purposes, user type, country), each applicable offer priced by the
 * tenant's price hook. Both front ends quote through here, so an HTTP
 * request and a DiscoverResources call for the same URI and identity get the
 * same prices, currencies and terms.
 *
 * A tenant without a catalog section has one implicit offer for every path:
 * model "purchase", no amount and no currency (offer.amount nil), permitting
 * every purpose: only its price hook can sell it.
 *
 * Threads: a worker, with the catalog and the policy state pinned for the
 * call. No allocation. */

typedef enum {
  TG_QUOTE_OFFERS = 0,     /* n >= 1 offers */
  TG_QUOTE_NO_CATALOG,     /* the tenant's catalog has not loaded yet */
  TG_QUOTE_NOT_IN_CATALOG, /* no catalog entry matches the path */
  TG_QUOTE_PROHIBITED,     /* the license prohibits the usage asked for */
  TG_QUOTE_FILTERED,       /* no license admits the purposes, user type or country */
  TG_QUOTE_NO_LICENSE,     /* the catalog entry carries no license */
  TG_QUOTE_DECLINED,       /* the price hook sells none of the offers */
  TG_QUOTE_SKIPPED         /* the skip hook answered true: one free offer */
} tg_quote_status_t;

typedef struct tg_quote_offer {
  int64_t amount;                 /* as priced: 0 .. TG_MONEY_MAX; 0 is free */
  char currency[TG_POLICY_CURRENCY_MAX + 1];
  tg_rsl_pay_type_t type;
  uint32_t usage;                 /* concrete purposes the license permits (TG_RSL_USAGE_*) */
  const char *license_url;        /* in the catalog (pinned), or NULL */
  uint32_t content, license, payment; /* indices in the RSL document; 0 for implicit offers */
  bool reporting;                 /* the license asks for usage reports */
} tg_quote_offer_t;

typedef struct tg_quote {
  tg_quote_status_t status;
  const char *detail;             /* why, for an answer: a constant sentence */
  size_t n;
  tg_quote_offer_t offers[TG_CATALOG_MAX_OFFERS];
} tg_quote_t;

/* Quotes the resource of v for tenant. cat is the tenant's pinned catalog
 * (NULL: none published yet); st its pinned policy state. Returns 0 with
 * *q filled, or the TG_POLICY_ERR_* of a price hook that failed (logged and
 * counted by the policy module; the request fails closed), err filled. */
int tg_quote(const tg_config_tenant_t *tenant, const tg_catalog_t *cat, tg_policy_state_t *st,
             const tg_view_t *v, tg_quote_t *q, tg_policy_error_t *err);

/* The quote of a resource the skip hook lets through: one offer of model
 * free, amount 0, currency "USD", status TG_QUOTE_SKIPPED. */
void tg_quote_skipped(tg_quote_t *q);

/* "purchase", "free", ... (RSL payment types). */
const char *tg_quote_model(const tg_quote_offer_t *o);

#endif
