#ifndef TG_RESOURCE_H
#define TG_RESOURCE_H

#include "pipeline/app.h"
#include "net/server.h"

/* The HTTP path for a tenant's own resources (a request whose Host is one of
 * the tenant's hosts): the policy pipeline skip -> rate_limit -> price, then
 * the answer. Until the payment flow lands (x402/t402 issue) a priced
 * resource answers 402 with the price in a JSON body, a skipped or zero-priced one 200, and
 * there is no origin to proxy to yet.
 *   429 + Retry-After, body {"code":"T402-2005",...}   over the rate limit
 *   500, body {"code":"T402-2001",...}                 a policy failed (closed)
 *   403 {"error":"not for sale"}                       price returned nil */
void tg_resource_handle(tg_app_worker_t *aw, const tg_config_tenant_t *tenant, tg_http_req_t *req);

#endif
