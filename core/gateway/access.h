#ifndef TG_ACCESS_H
#define TG_ACCESS_H

#include <stdbool.h>
#include <stdint.h>

#include "config/config.h"
#include "net/server.h"

/* The access log (config access_log = { sample, errors }): one JSON line per
 * request answered by a handler on a public listener, through the structured
 * log (base/log.h: one write(2) per line, level info, msg "access"):
 *   ts, level, msg, request_id,
 *   tenant      the tenant's name (null: none matched)
 *   route       the RPC method ("ExecuteTransaction"), or "http"
 *   method, path (the normalized path, never the query string: it may hold
 *               secrets), status, bytes (body bytes of the answer),
 *   duration_ms from the request line to the answer taken (3 decimals)
 *   price, currency  what was charged or quoted (402), when anything was
 *   payer       redacted: an x402 payer as 0x1234…abcd, a billing
 *               reference as ****1234
 * Values are JSON strings (the log's fields are). What a handler knew is in
 * req->note (net/server.h), set where the pipeline learns it.
 *
 * tg_access_sampled: whether the line is written: every 4xx and 5xx with
 * errors, else a share `sample` of requests, chosen by a hash of the
 * request's id (no shared state). Pure; any thread. */
bool tg_access_sampled(const tg_config_access_log_t *cfg, uint64_t request_id, int worker, int status);

/* Writes req's line when the configuration asks for it. Worker thread
 * (tg_server_config_t.on_answered); req valid for the call. */
void tg_access_log(const tg_config_access_log_t *cfg, const tg_http_req_t *req, int status, uint64_t bytes);

#endif
