#include "gateway/access.h"

#include <inttypes.h>
#include <stdio.h>

#include <uv.h>

#include "base/log.h"

/* splitmix64: a request id (a counter per worker) spread over 64 bits. */
static uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

bool tg_access_sampled(const tg_config_access_log_t *cfg, uint64_t request_id, int worker, int status) {
  if (!cfg->enabled)
    return false;
  if (cfg->errors && status >= 400)
    return true;
  if (cfg->sample >= 1.0)
    return true;
  if (cfg->sample <= 0.0)
    return false;
  uint64_t h = mix(request_id ^ ((uint64_t)(unsigned)worker << 56));
  return (double)(h >> 11) * 0x1.0p-53 < cfg->sample;
}

void tg_access_log(const tg_config_access_log_t *cfg, const tg_http_req_t *req, int status, uint64_t bytes) {
  if (!tg_access_sampled(cfg, req->id, req->worker ? req->worker->id : 0, status))
    return;
  const tg_http_note_t *n = &req->note;
  char st[8], by[24], dur[32], price[24];
  snprintf(st, sizeof st, "%d", status);
  snprintf(by, sizeof by, "%" PRIu64, bytes);
  uint64_t ns = uv_hrtime() - req->start_ns;
  snprintf(dur, sizeof dur, "%" PRIu64 ".%03" PRIu64, ns / 1000000, ns / 1000 % 1000);
  if (n->priced)
    snprintf(price, sizeof price, "%" PRId64, n->price);
  tg_log_req(TG_LOG_INFO, req->request_id, "access", "tenant", n->tenant[0] ? n->tenant : NULL, "route",
             n->route ? n->route : "http", "method", req->method_name, "path", req->path, "status", st, "price",
             n->priced ? price : NULL, "currency", n->priced ? n->currency : NULL, "payer",
             n->payer[0] ? n->payer : NULL, "duration_ms", dur, "bytes", by, NULL);
}
