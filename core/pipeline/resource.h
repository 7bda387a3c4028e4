#ifndef TG_RESOURCE_H
#define TG_RESOURCE_H

#include "pipeline/app.h"
#include "net/server.h"

/* The HTTP path for a tenant's own resources (a request whose Host is one of
 * the tenant's hosts): the policy pipeline skip -> rate_limit -> price, then
 * the answer. Until the payment flow lands (x402/t402 issue) a priced
 * resource answers 402 with the price in a JSON body, a skipped or zero-priced one 200, and
 * there is no origin to proxy to yet. The offer's price is the tenant's
 * payments.x402.price (parsed at load); a resource with neither that price
 * nor one from the policy's price hook is not for sale, never free. Only an
 * explicit 0 (configured, or returned by the hook) serves it free.
 *   402 {"error":"payment required","resource":PATH,"price":{"amount":"N","currency":C},
 *        "policy_version":V}
 *   200 {"tenant":T,"access":"free"}                   skipped, or priced at 0
 *   429 + Retry-After, body {"code":"T402-2005",...}   over the rate limit
 *   500, body {"code":"T402-2001",...}                 a policy failed (closed)
 *   403 {"error":"not for sale"}                       no price
 * Every body is JSON built with jansson; text from the client (PATH, the
 * request id) is repaired to valid UTF-8. Worker thread only. */
void tg_resource_handle(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req);

#endif
