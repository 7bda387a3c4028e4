#ifndef TG_RESOURCE_H
#define TG_RESOURCE_H

#include "pipeline/app.h"
#include "net/server.h"

/* The HTTP path for a tenant's own resources (a request whose Host is one of
 * the tenant's hosts): skip -> rate_limit -> the quote (pipeline/quote.h: the
 * tenant's catalog and price hook, exactly as DiscoverResources quotes the
 * same URI), then the answer. A tenant with a payments section hands a
 * priced resource to the paywall (pipeline/paywall.h: the x402/t402
 * challenge, payment, settlement and serving); a tenant without one answers
 * 402 with its offers in a JSON body. An HTTP request names no usage
 * purpose, so it is served free only when every offer for it is priced at 0.
 *   402 {"error":"payment required","resource":PATH,"uri":URI,   (no payments section)
 *        "price":{"amount":"N","currency":C},            the first offer not free
 *        "offers":[{"model":M,"price":{...},"terms":{"permitted_purposes":[...],
 *                   "license_url":U}}],                  every offer, as Discover lists them
 *        "policy_version":V}
 *   200 {"tenant":T,"access":"free"}                   skipped, or every offer at 0
 *   429 + Retry-After, body {"code":"T402-2005",...}   over the rate limit
 *   500, body {"code":"T402-2001",...}                 a policy failed (closed)
 *   403 {"error":"not for sale","reason":R,"detail":D} no offer; R is Discover's
 *        absence reason in lower case: not_in_catalog, prohibited,
 *        filtered_by_restrictions, not_for_sale
 *   503 {"error":"catalog not loaded",...} + Retry-After   before the first catalog
 * Every body is JSON built with jansson; text from the client (PATH, the
 * request id) is repaired to valid UTF-8. Outcomes are counted in
 * policy_decisions_total (pipeline/app.h). Worker thread only. */
void tg_resource_handle(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req);

#endif
