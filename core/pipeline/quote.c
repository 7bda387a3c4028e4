#include "pipeline/quote.h"

#include <stdio.h>
#include <string.h>

#include "base/log.h"
#include "base/money.h"
#include "catalog/rsl.h"

static uint32_t usage_bits(const tg_policy_req_t *r) {
  uint32_t bits = 0;
  for (size_t i = 0; i < r->npurposes; i++)
    for (size_t k = 0; k < TG_VIEW_NPURPOSES; k++)
      if (strcmp(r->purposes[i], tg_view_purposes[k].token) == 0)
        bits |= tg_view_purposes[k].bit;
  return bits;
}

static uint32_t user_bit(const tg_policy_req_t *r) {
  static const struct {
    const char *token;
    uint32_t bit;
  } users[] = {{"commercial", TG_RSL_USER_COMMERCIAL},
               {"non-commercial", TG_RSL_USER_NON_COMMERCIAL},
               {"education", TG_RSL_USER_EDUCATION},
               {"government", TG_RSL_USER_GOVERNMENT},
               {"personal", TG_RSL_USER_PERSONAL}};
  for (size_t i = 0; r->user_type && i < sizeof users / sizeof users[0]; i++)
    if (strcmp(r->user_type, users[i].token) == 0)
      return users[i].bit;
  return 0;
}

static const char *absent(tg_quote_t *q, tg_quote_status_t status, const char *detail) {
  q->status = status;
  q->detail = detail;
  q->n = 0;
  return detail;
}

void tg_quote_skipped(tg_quote_t *q) {
  memset(q, 0, sizeof *q);
  q->status = TG_QUOTE_SKIPPED;
  q->detail = "free: the tenant's policy skips payment for this resource";
  q->n = 1;
  q->offers[0].type = TG_RSL_PAY_FREE;
  q->offers[0].usage = TG_CATALOG_USAGE_CONCRETE;
  memcpy(q->offers[0].currency, "USD", 4);
}

const char *tg_quote_model(const tg_quote_offer_t *o) { return tg_rsl_pay_type_name(o->type); }

/* Prices one candidate into q->offers[q->n] (kept when for sale). */
static int price_one(tg_policy_state_t *st, const tg_view_t *v, const tg_catalog_offer_t *o,
                     tg_quote_t *q, tg_policy_error_t *err) {
  /* o->usage holds concrete purposes only: "all" and "ai-all" never match. */
  const char *tokens[TG_VIEW_NPURPOSES];
  size_t ntok = 0;
  for (size_t u = 0; u < TG_VIEW_NPURPOSES; u++)
    if (o->usage & tg_view_purposes[u].bit)
      tokens[ntok++] = tg_view_purposes[u].token;
  tg_policy_offer_t po = {v->req.uri, tg_rsl_pay_type_name(o->type), o->amount,
                          o->currency[0] ? o->currency : NULL, tokens, ntok, o->lastmod, o->license_url};
  tg_policy_price_t price;
  int rc = tg_policy_price(st, &po, &v->req, &price, err);
  if (rc != 0 && rc != TG_POLICY_ERR_NOHOOK)
    return rc;
  if (!price.for_sale)
    return 0;
  /* The sandbox bounds a hook's amount already; one out of range here is a
   * defect, and it must never be served as free. */
  if (price.amount < 0 || price.amount > TG_MONEY_MAX) {
    tg_log_req(TG_LOG_ERROR, v->req.request_id, "price out of range", "tenant", v->req.tenant, NULL);
    if (err) {
      err->code = TG_POLICY_ERR_TYPE;
      snprintf(err->msg, sizeof err->msg, "policy %s: price: amount out of range", v->req.tenant);
    }
    return TG_POLICY_ERR_TYPE;
  }
  tg_quote_offer_t *out = &q->offers[q->n++];
  out->amount = price.amount;
  memcpy(out->currency, price.currency, sizeof out->currency);
  out->type = o->type;
  out->usage = o->usage;
  out->license_url = o->license_url;
  out->reporting = o->reporting;
  out->content = o->content;
  out->license = (uint32_t)((o->key >> 16) & 0xffff);
  out->payment = (uint32_t)(o->key & 0xffff);
  return 0;
}

int tg_quote(const tg_config_tenant_t *tenant, const tg_catalog_t *cat, tg_policy_state_t *st,
             const tg_view_t *v, tg_quote_t *q, tg_policy_error_t *err) {
  q->n = 0;
  q->detail = NULL;
  tg_catalog_result_t res;
  if (tenant->catalog_source == NULL) {
    memset(&res.offers[0], 0, sizeof res.offers[0]);
    res.offers[0].type = TG_RSL_PAY_PURCHASE;
    res.offers[0].usage = TG_CATALOG_USAGE_CONCRETE;
    res.noffers = 1;
    res.status = TG_CATALOG_OFFERS;
  } else if (cat == NULL) {
    absent(q, TG_QUOTE_NO_CATALOG, "no catalog loaded for this tenant");
    return 0;
  } else {
    const tg_policy_req_t *r = &v->req;
    tg_catalog_query_t cq = {usage_bits(r), user_bit(r), ""};
    if (r->country && strlen(r->country) == 2)
      memcpy(cq.country, r->country, 3);
    tg_catalog_lookup(cat, v->target, v->target_len, &cq, &res);
  }
  switch (res.status) {
  case TG_CATALOG_NOT_IN_CATALOG:
    absent(q, TG_QUOTE_NOT_IN_CATALOG, "no catalog entry matches this URI");
    return 0;
  case TG_CATALOG_PROHIBITED:
    absent(q, TG_QUOTE_PROHIBITED, "the license prohibits the requested usage");
    return 0;
  case TG_CATALOG_FILTERED:
    absent(q, TG_QUOTE_FILTERED, "no license admits this usage, user type or country");
    return 0;
  case TG_CATALOG_NOT_FOR_SALE:
    absent(q, TG_QUOTE_NO_LICENSE, "the catalog entry carries no license");
    return 0;
  case TG_CATALOG_OFFERS:
    break;
  }
  for (uint32_t k = 0; k < res.noffers; k++) {
    int rc = price_one(st, v, &res.offers[k], q, err);
    if (rc != 0) {
      q->n = 0;
      return rc;
    }
  }
  if (q->n == 0)
    absent(q, TG_QUOTE_DECLINED, tenant->catalog_source ? "the tenant's policy does not sell this usage"
                                                        : "the tenant has no catalog and its policy does not "
                                                          "price this resource");
  else
    q->status = TG_QUOTE_OFFERS;
  return 0;
}
