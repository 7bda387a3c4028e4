#ifndef TG_RELOAD_H
#define TG_RELOAD_H

#include <jansson.h>

#include "net/server.h"
#include "policy/policy.h"

/* Policy reloads, whatever asked for them (SIGHUP, a file change, the admin
 * route): validate and publish through the registry, log each tenant's
 * outcome once, and report it.
 *
 * tg_reload_policies: tenant NULL reloads every tenant. *report (may be
 * NULL) gets {"tenants":[{"tenant","status","version","error"?}]}, a new
 * reference the caller releases. Returns what tg_policy_reload returns. Any
 * thread but a worker's request path (compiling takes milliseconds). */
int tg_reload_policies(tg_policy_registry_t *r, const char *tenant, json_t **report);

/* A dry run of that reload (tg_policy_dry_run): nothing is published.
 * *report (may be NULL) gets
 *   {"dry_run":true,"tenants":[{"tenant","result":"valid"|"invalid"|"unchanged",
 *     "live_version","candidate_version" (12 characters; null: unreadable),
 *     "error"? ("FILE:LINE: reason", when invalid), "compare_error"?,
 *     "compared","differing","differences":[...] (policy.h, tg_policy_comparison_t)}]}
 * Returns what tg_policy_dry_run returns. Threads as tg_reload_policies. */
int tg_reload_dry_run(tg_policy_registry_t *r, const char *tenant, json_t **report);

/* The admin route: runs tg_reload_policies (dry_run: tg_reload_dry_run) on
 * the libuv thread pool and answers req from the worker's loop: 200 all
 * applied or unchanged (dry run: all valid or unchanged), 404 unknown
 * tenant, 422 a tenant refused, the old version staying (dry run: a
 * candidate a reload would refuse), 503 when the job cannot be scheduled.
 * tenant is copied (NULL: every tenant). */
void tg_reload_respond(tg_policy_registry_t *r, tg_http_req_t *req, const char *tenant,
                       int dry_run);

#endif
