#ifndef TG_POLICY_H
#define TG_POLICY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"

/* Per-tenant Lua policies: hooks the request pipeline calls (skip,
 * rate_limit, price, on_billing_timeout, on_settle_failure, settle), run in the
 * sandbox of lua/tollgate/sandbox.lua (embedded in the binary), each call
 * bounded in time and each Lua state in memory. The policy API for operators
 * is in policies/README.md; the Lua side of the contract at the top of
 * lua/tollgate/sandbox.lua.
 *
 * Three layers:
 *   - the registry (one per process, main thread): every tenant's policy
 *     source and version, validated at start-up and on reload, published to
 *     the workers as an immutable refcounted snapshot (one atomic pointer
 *     store plus a generation counter);
 *   - a runtime per worker thread: one Lua state per tenant, compiled once,
 *     rebuilt when the snapshot's version of that tenant changes;
 *   - a state pinned for one request: tg_policy_acquire .. tg_policy_release.
 *     A request finishes on the version it started with; a replaced state is
 *     closed when its last request releases it.
 *
 * Bounds, per call (hook, load, fixture): time, checked by a count hook
 * every 1000 instructions, by a process-wide watchdog thread that signals a
 * thread still in a call past its deadline (so the instruction after a long
 * C call is checked at once; the signal is SIGRTMIN+6, which nothing else in
 * the process may use), and when the call returns (an overrun inside C fails
 * closed as a timeout); memory, per state; the C stack: library functions
 * that call back into Lua nest at most 100 deep and within 1 MiB of C stack
 * (less on a thread whose stack is smaller), since LuaJIT itself bounds only
 * its Lua stack and recursion through them would crash the process.
 *
 * Failing closed: every hook call returns 0 or a TG_POLICY_ERR_* code with a
 * message ("policy news: price: expected integer amount, got 0.5"); the
 * module has then already logged it (tenant, hook, reason, request id) and
 * counted policy_errors_total{tenant_id,hook,kind}. The caller answers the
 * request as failed (no free pass, no sale). The state stays usable.
 *
 * Metrics (declared by tg_policy_registry_new):
 *   policy_errors_total{tenant_id,hook,kind}   kind: error|timeout|memory|type
 *   policy_reloads_total{tenant_id,result}     result: ok|error
 *   policy_reload_errors_total{tenant_id}
 *   policy_version_info{tenant_id,version}     one series per tenant: the active version, 1
 *                                              (a replaced version's series is removed)
 *   policy_hook_duration_seconds{tenant_id,hook}  histogram, buckets 5 us .. 50 ms; _count:
 *                                              the hook calls
 *   policy_dry_runs_total{tenant_id,result}    result: valid|invalid|unchanged (nothing else
 *                                              of a real reload moves on a dry run) */

typedef struct tg_policy_registry tg_policy_registry_t;
typedef struct tg_policy_runtime tg_policy_runtime_t;
typedef struct tg_policy_state tg_policy_state_t;

/* Error codes (negative, as hook calls return them). */
#define TG_POLICY_ERR_RUNTIME (-1001) /* the hook raised an error */
#define TG_POLICY_ERR_TIMEOUT (-1002) /* the call ran past its time limit */
#define TG_POLICY_ERR_MEMORY  (-1003) /* the state hit its memory cap */
#define TG_POLICY_ERR_TYPE    (-1004) /* the hook returned values of the wrong type */
#define TG_POLICY_ERR_NOHOOK  (-1005) /* the policy defines no such hook: the results hold
                                         the default policy's answer, use them */

#define TG_POLICY_MSG_LEN 512
#define TG_POLICY_VERSION_LEN 65        /* sha256 hex + NUL */
#define TG_POLICY_VERSION_SHOWN 12      /* characters of a version in logs, answers, metrics */
#define TG_POLICY_KEY_MAX 256           /* rate-limit keys: 1..256 bytes */
#define TG_POLICY_CURRENCY_MAX 16

#define TG_POLICY_DEFAULT_TIME_LIMIT_MS 50
#define TG_POLICY_DEFAULT_LOAD_TIME_LIMIT_MS 1000
#define TG_POLICY_DEFAULT_MEMORY_LIMIT (32u << 20)
#define TG_POLICY_MAX_SOURCE (1u << 20) /* larger policy files are refused */

typedef enum {
  TG_POLICY_HOOK_SKIP = 0,
  TG_POLICY_HOOK_RATE_LIMIT,
  TG_POLICY_HOOK_PRICE,
  TG_POLICY_HOOK_ON_BILLING_TIMEOUT,
  TG_POLICY_HOOK_ON_SETTLE_FAILURE,
  TG_POLICY_HOOK_SETTLE,          /* x402/t402: settle before or after serving */
  TG_POLICY_NHOOKS
} tg_policy_hook_t;

/* "skip", "rate_limit", ... */
const char *tg_policy_hook_name(tg_policy_hook_t hook);

typedef struct tg_policy_error {
  int code;                       /* 0 or TG_POLICY_ERR_* */
  char msg[TG_POLICY_MSG_LEN];    /* "policy <tenant>: <hook>: <reason>" */
} tg_policy_error_t;

typedef struct tg_policy_options {
  uint32_t time_limit_ms;         /* per hook call; 0: TG_POLICY_DEFAULT_TIME_LIMIT_MS */
  uint32_t load_time_limit_ms;    /* running a policy's top level; 0: default */
  size_t memory_limit;            /* bytes per Lua state; 0: TG_POLICY_DEFAULT_MEMORY_LIMIT */
  const char *version;            /* tollgate.version seen by policies (copied); NULL: "" */
  /* Called on the reloading thread after a new snapshot was published, so
   * the caller can wake each worker (uv_async_send) to call
   * tg_policy_runtime_sync. Must not call back into the registry. */
  void (*on_publish)(void *ud, uint64_t generation);
  void *on_publish_ud;
} tg_policy_options_t;

/* ---- Views: what hooks see. All strings NUL-terminated; NULL is nil in Lua.
 * The structs and everything they point to must stay valid for the duration
 * of the hook call only; the Lua side cannot keep them (a view used after its
 * call raises an error). */

typedef enum { TG_POLICY_KIND_HTTP = 0, TG_POLICY_KIND_CONNECT } tg_policy_kind_t;

/* Header lookup for req:header(name): name is namelen bytes (any case; the
 * callback compares case-insensitively). Returns the value (vlen bytes,
 * valid for the call) or NULL. */
typedef const char *(*tg_policy_header_fn)(void *ud, const char *name, size_t namelen,
                                           size_t *vlen);

/* The resource a hook decides about, the same on both front ends (the
 * guide's "Views" section is the contract): uri is absolute
 * ("https://news.example/a/b?x=1": scheme and host lower-case, no default
 * port, no userinfo or fragment), host its authority, path its normalized
 * path (net/target.h) and query what follows '?' (NULL: none). On Connect,
 * method is "GET" (how the resource is fetched) and rpc the method name
 * ("DiscoverResources"); on HTTP, rpc is NULL. The identity fields a front
 * end does not know are NULL (purposes empty). */
typedef struct tg_policy_req {
  const char *method, *path, *query, *host, *uri, *rpc;
  const char *tenant;
  const char *ip, *user_agent;
  const char *const *purposes;    /* usage purpose tokens of the AI system; req.purpose = first */
  size_t npurposes;
  const char *ai_id, *ai_name, *user_type, *country;
  tg_policy_header_fn header;     /* NULL: req:header() answers nil */
  void *header_ud;
  tg_policy_kind_t kind;          /* req.kind: "http" or "connect" */
  const char *request_id;         /* for logs only; not visible to the policy */
} tg_policy_req_t;

typedef struct tg_policy_offer {
  const char *uri;
  const char *model;              /* "purchase", "subscription", ..., "free" */
  int64_t amount;                 /* atomic units (micro-USD for USD/USDC); ignored without currency */
  const char *currency;           /* NULL: the offer has no price (offer.amount is nil in Lua) */
  const char *const *purposes;    /* purposes the license permits */
  size_t npurposes;
  int64_t lastmod;                /* unix seconds; 0: unknown (nil) */
  const char *license_url;
} tg_policy_offer_t;

typedef struct tg_policy_txn {
  const char *id, *tenant;
  int64_t amount;
  const char *currency;
  const char *ai_id;
  const char *billing_ref;        /* raw: the policy only ever sees it redacted ("****1234") */
  uint32_t items, attempts;
  const char *reason;             /* "timeout", "error", "circuit_open", "billing_refused", ... */
  uint64_t failing_ms;            /* on_billing_timeout: how long billing has been failing (0: this
                                   * is the first failure since it last answered) */
  /* An x402/t402 settlement (on_settle_failure); NULL (nil) on the Connect
   * path. network a CAIP-2 chain id ("eip155:84532"), payer the paying
   * address, transaction the settlement's transaction hash when one was
   * sent, error the facilitator's or the chain's reason. */
  const char *network, *payer, *transaction, *error;
  const char *request_id;         /* for logs only */
} tg_policy_txn_t;

/* What an x402/t402 payment settles, for the settle hook (the sale view). */
typedef struct tg_policy_sale {
  int64_t amount;                 /* the price paid, atomic units (micro-USD for USD/USDC) */
  const char *currency;           /* the price's currency: "USD" */
  const char *network;            /* CAIP-2 chain id: "eip155:84532" */
  const char *asset;              /* the token's contract address: "0x036C..." */
  const char *payer;              /* the paying address: "0x..." */
  const char *scheme;             /* the payment scheme: "exact" */
} tg_policy_sale_t;

/* ---- Results */

typedef struct tg_policy_rate {
  bool limited;                   /* false: the hook returned nil, no limit */
  char key[TG_POLICY_KEY_MAX + 1];
  size_t keylen;                  /* the key may hold NUL bytes: use keylen */
  double rate;                    /* requests per second, > 0 */
  uint32_t burst;                 /* >= 1 */
} tg_policy_rate_t;

typedef struct tg_policy_price {
  bool for_sale;                  /* false: the hook returned nil */
  int64_t amount;                 /* 0 .. 2^53 */
  char currency[TG_POLICY_CURRENCY_MAX + 1];
} tg_policy_price_t;

typedef enum { TG_POLICY_BILLING_REJECT = 0, TG_POLICY_BILLING_DEFERRED } tg_policy_billing_t;

/* SYNC: settle, then serve; ASYNC: serve, then settle. */
typedef enum { TG_POLICY_SETTLE_SYNC = 0, TG_POLICY_SETTLE_ASYNC } tg_policy_settle_t;

/* ---- Registry (main thread) */

/* Builds the registry from cfg: reads each tenant's policy_file (NULL: the
 * embedded lua/default_policy.lua), validates it exactly as
 * tg_policy_check_file does and declares the metrics. Fails start-up on the
 * first invalid policy: -EINVAL (or -ENOMEM, -errno of a read) with err =
 * "FILE:LINE: reason" ("FILE: reason" when there is no line). opt may be
 * NULL. cfg is only read during the call. */
int tg_policy_registry_new(const tg_config_t *cfg, const tg_policy_options_t *opt,
                           tg_policy_registry_t **out, char *err, size_t errlen);

/* Frees the registry. Every runtime made from it must be freed first. */
void tg_policy_registry_free(tg_policy_registry_t *r);

/* Validates one policy file as the registry does (compile, top level,
 * returned hooks, fixtures) in a throwaway state, for `tollgate check`.
 * tenant is what tollgate.tenant reads (may be NULL); path NULL checks the
 * embedded default policy. Any thread. 0, or -EINVAL/-errno with err. */
int tg_policy_check_file(const char *path, const char *tenant, const tg_policy_options_t *opt,
                         char *err, size_t errlen);

/* Makes tg_policy_reload validate each changed policy (compile, top level,
 * hooks, fixtures) in a child process before anything of it runs in this one:
 * exe is started as `exe policy-validate --tenant T --path P ...` (use
 * "/proc/self/exe" for this binary; core/main.c hands that subcommand to
 * tg_policy_validator_main). A child that crashes, or runs longer than
 * timeout_ms (0: 30 s; it is killed), refuses the reload with that reason;
 * the old version stays. NULL (the default) validates in this process.
 * Start-up (tg_policy_registry_new) and tg_policy_check_file always validate
 * in-process. Call on the main thread before any reload may run. */
void tg_policy_set_validator(const char *exe, uint32_t timeout_ms);

/* The child's side of tg_policy_set_validator: argv[0] is "policy-validate",
 * then the options the parent passes; the source comes on fd 0, a failure's
 * "FILE:LINE: reason" goes to fd 3. Returns the exit status: 0 valid, 1
 * invalid, 2 bad usage, 3 out of memory. */
int tg_policy_validator_main(int argc, char **argv);

/* What tg_policy_check_file saw in a valid policy, for `tollgate policy test`. */
typedef struct tg_policy_summary {
  char version[TG_POLICY_VERSION_LEN];
  unsigned fixtures;              /* fixtures declared, all run and passed */
  bool hooks[TG_POLICY_NHOOKS];   /* the hooks the policy defines itself */
} tg_policy_summary_t;

/* tg_policy_check_file that also fills *sum when the policy is valid. */
int tg_policy_check_file_summary(const char *path, const char *tenant,
                                 const tg_policy_options_t *opt, tg_policy_summary_t *sum,
                                 char *err, size_t errlen);

/* tg_policy_check_file for every tenant of cfg; stops at the first error. */
int tg_policy_check_config(const tg_config_t *cfg, const tg_policy_options_t *opt, char *err,
                           size_t errlen);

typedef enum {
  TG_POLICY_RELOAD_UNCHANGED = 0, /* same source as the active version */
  TG_POLICY_RELOAD_UPDATED,       /* validated and published */
  TG_POLICY_RELOAD_FAILED         /* refused: the old version stays active */
} tg_policy_reload_status_t;

typedef struct tg_policy_reload_result {
  char tenant[65];
  tg_policy_reload_status_t status;
  char version[TG_POLICY_VERSION_LEN]; /* active after the reload */
  char error[TG_POLICY_MSG_LEN];       /* "FILE:LINE: reason" when FAILED */
} tg_policy_reload_result_t;

/* Re-reads and validates the policy of tenant (NULL: every tenant); tenants
 * that pass and changed are published together in one new snapshot; one
 * that fails keeps its old version (logged with file:line, counted in
 * policy_reload_errors_total). *results (malloc'd, caller frees with free)
 * gets one entry per tenant considered, *nresults their count; both may be
 * NULL when not wanted. Returns 0 when nothing failed, -EINVAL when some
 * tenant failed, -ENOENT for an unknown tenant, -ENOMEM. Any thread except a
 * worker's request path (it compiles and runs policies: milliseconds);
 * concurrent calls are serialized. */
int tg_policy_reload(tg_policy_registry_t *r, const char *tenant,
                     tg_policy_reload_result_t **results, size_t *nresults);

/* ---- Dry runs: how a candidate version would decide, next to the live one
 * (POST /reload?dry_run=1, `tollgate policy diff`). Nothing is published. */

#define TG_POLICY_DIFF_MAX 500          /* differences listed per comparison */

typedef enum {
  TG_POLICY_DRY_UNCHANGED = 0,    /* the candidate is the live version */
  TG_POLICY_DRY_VALID,            /* a reload would publish it */
  TG_POLICY_DRY_INVALID           /* a reload would refuse it (error says why) */
} tg_policy_dry_status_t;

/* "unchanged", "valid", "invalid" */
const char *tg_policy_dry_status_name(tg_policy_dry_status_t status);

struct json_t;

/* For each input among the fixtures of both versions (the live one's first;
 * an input both declare is run once), the hook of each version is called
 * with it, as a reload's validation calls fixtures (each call bounded by the
 * hook time limit, the state by the memory limit), and the checked results
 * are compared. Two failed calls are the same decision (the request fails
 * closed either way). */
typedef struct tg_policy_comparison {
  char tenant[65];
  tg_policy_dry_status_t status;
  char live_version[TG_POLICY_VERSION_LEN];
  char candidate_version[TG_POLICY_VERSION_LEN]; /* "" when the file could not be read */
  char error[TG_POLICY_MSG_LEN];  /* INVALID: "FILE:LINE: reason", as a reload would log */
  /* The comparison could not run or finish (a version does not load, a
   * limit hit in a call): "FILE: <which call>: reason"; "" otherwise. Not
   * set when the candidate is INVALID for the same reason. */
  char compare_error[TG_POLICY_MSG_LEN];
  size_t compared;                /* inputs run through both versions */
  size_t differing;               /* of them, those decided differently */
  /* JSON array, the first TG_POLICY_DIFF_MAX of them (NULL when none was
   * compared), each
   *   {"fixture":{"of":"live"|"candidate","index":N,"name":"..."?},"hook":"price",
   *    "live":R,"candidate":R}
   * R the checked results as a list ([15000,"USD"], [] for nil, [true]) or
   * {"error":"..."} for a failed call; a version without a settle hook
   * answers ["default"] (the tenant's configured mode, which a comparison
   * does not know). Owned: tg_policy_comparisons_free. */
  struct json_t *differences;
} tg_policy_comparison_t;

/* Compares the policy in cand_path with the one in live_path, in this
 * process (tenant: what tollgate.tenant reads in both; may be NULL; opt may
 * be NULL). The candidate is validated as a reload would (status VALID or
 * INVALID; UNCHANGED when both files hold the same bytes). Returns 0 with
 * *out filled, or -errno (-EINVAL: the live file does not load) with
 * out->error. Release out->differences with tg_policy_comparisons_free(out,
 * 1, false). Any thread. */
int tg_policy_compare_files(const char *live_path, const char *cand_path, const char *tenant,
                            const tg_policy_options_t *opt, tg_policy_comparison_t *out);

/* The dry run of tg_policy_reload(r, tenant): for each tenant considered,
 * the file on disk is the candidate and the active version the live one;
 * the candidate is validated (in the validator process, when
 * tg_policy_set_validator set one; the comparison then runs there too) and
 * compared. Nothing is published or recorded as a reload attempt; counted in
 * policy_dry_runs_total{tenant_id,result} and logged once per tenant
 * ("policy dry run"). *out (one entry per tenant considered, *n of them) is
 * freed with tg_policy_comparisons_free. Returns 0 when no candidate is
 * invalid, -EINVAL when one is, -ENOENT for an unknown tenant, -ENOMEM.
 * Threads as tg_policy_reload (serialized with reloads). */
int tg_policy_dry_run(tg_policy_registry_t *r, const char *tenant,
                      tg_policy_comparison_t **out, size_t *n);

/* Releases the differences of c[0..n) and, when owned is true, frees c
 * (tg_policy_dry_run's array). */
void tg_policy_comparisons_free(tg_policy_comparison_t *c, size_t n, bool owned);

/* Active version (sha256 hex of the source) of tenant into out; 0 or -ENOENT.
 * Any thread. Display the first 12 characters. */
int tg_policy_version(tg_policy_registry_t *r, const char *tenant,
                      char out[TG_POLICY_VERSION_LEN]);

typedef struct tg_policy_info {
  char tenant[65];
  char path[1024];                /* "" for the embedded default policy */
  char version[TG_POLICY_VERSION_LEN];
  double loaded_at;               /* unix seconds of the validation that published it */
  /* The last reload attempt of this tenant since start-up (tg_policy_reload,
   * whatever asked for it; dry runs are not attempts). */
  bool reloaded;                  /* false: none yet, the fields below are empty */
  tg_policy_reload_status_t last_status;
  double last_at;                 /* unix seconds */
  char last_version[TG_POLICY_VERSION_LEN]; /* of the file it read (the refused one, when
                                               FAILED); "" when unreadable */
  char last_error[TG_POLICY_MSG_LEN];       /* "FILE:LINE: reason" when FAILED */
} tg_policy_info_t;

/* Number of tenants, and the active policy of the i-th (0 or -ENOENT). Any
 * thread (admin status route, file watchers: watch each non-empty path). */
size_t tg_policy_count(tg_policy_registry_t *r);
int tg_policy_info(tg_policy_registry_t *r, size_t i, tg_policy_info_t *out);

/* The i-th tenant's policy file as it is on disk now, next to the active
 * version: version gets the file's (sha256 hex of what it holds now), and
 * *differs is true when that is not the active one (a save not reloaded
 * yet, or one a reload refused) or the file cannot be read (then version is
 * "" and err says why). The embedded default policy has no file and never
 * differs. Reads and hashes the whole file: not for a request path. 0 or
 * -ENOENT (no such tenant). Any thread. */
int tg_policy_file_state(tg_policy_registry_t *r, size_t i, bool *differs,
                         char version[TG_POLICY_VERSION_LEN], char *err, size_t errlen);

/* Generation of the published snapshot (starts at 1, +1 per publish). */
uint64_t tg_policy_generation(tg_policy_registry_t *r);

/* ---- Runtime (one per worker thread; all calls from that thread) */

/* Builds the worker's states for every tenant (from its on_worker_start).
 * NULL with err on failure (memory, or a policy that no longer loads). */
tg_policy_runtime_t *tg_policy_runtime_new(tg_policy_registry_t *r, char *err, size_t errlen);

/* Frees the runtime and its states (on_worker_stop). States still acquired
 * are closed when released. */
void tg_policy_runtime_free(tg_policy_runtime_t *rt);

/* Rebuilds the states of tenants whose version changed since the runtime
 * last looked. tg_policy_acquire does this by itself when the generation
 * moved (one atomic load per request); call this from a uv_async on the
 * worker after on_publish to take the compile cost off the next request.
 * Returns the number of states rebuilt, or a negative errno when one failed
 * to build (that tenant keeps its previous state; logged). */
int tg_policy_runtime_sync(tg_policy_runtime_t *rt);

/* Pins tenant's current state for one request; NULL when the tenant is
 * unknown or has no usable state (fail the request closed). Release it with
 * tg_policy_release on the same thread once the request is done with policy
 * calls. */
tg_policy_state_t *tg_policy_acquire(tg_policy_runtime_t *rt, const char *tenant);
void tg_policy_release(tg_policy_state_t *st);

/* Version of a pinned state (NUL-terminated sha256 hex, valid while pinned). */
const char *tg_policy_state_version(const tg_policy_state_t *st);

/* True when the state's policy defines hook (so the caller can skip work). */
bool tg_policy_has_hook(const tg_policy_state_t *st, tg_policy_hook_t hook);

/* ---- Hook calls (worker thread, pinned state). Each returns 0 with the
 * result filled, TG_POLICY_ERR_NOHOOK with the default policy's result
 * filled (skip: false; rate_limit: not limited; price: the offer's amount and
 * currency, 0 for model "free", not for sale without a currency;
 * on_billing_timeout: reject; settle: the caller's default, see below), or
 * another TG_POLICY_ERR_* with err filled and the result zeroed. err may be
 * NULL. */
int tg_policy_skip(tg_policy_state_t *st, const tg_policy_req_t *req, bool *skip,
                   tg_policy_error_t *err);
int tg_policy_rate_limit(tg_policy_state_t *st, const tg_policy_req_t *req,
                         tg_policy_rate_t *out, tg_policy_error_t *err);
int tg_policy_price(tg_policy_state_t *st, const tg_policy_offer_t *offer,
                    const tg_policy_req_t *req, tg_policy_price_t *out, tg_policy_error_t *err);
int tg_policy_on_billing_timeout(tg_policy_state_t *st, const tg_policy_txn_t *txn,
                                 tg_policy_billing_t *out, tg_policy_error_t *err);
int tg_policy_on_settle_failure(tg_policy_state_t *st, const tg_policy_txn_t *txn,
                                tg_policy_error_t *err);

/* Whether an x402/t402 payment is settled before the resource is served
 * (SYNC) or after it (ASYNC): the policy's settle(req, sale) returns "sync"
 * or "async". Unlike the hooks above, the answer without the hook is the
 * caller's: TG_POLICY_ERR_NOHOOK with *out = dflt (the tenant's configured
 * mode; the default policy defines no settle). Any other failure (a result
 * that is not "sync" or "async" is TG_POLICY_ERR_TYPE) leaves *out = SYNC:
 * settling first is the closed side, nothing is served unpaid. */
int tg_policy_settle(tg_policy_state_t *st, const tg_policy_req_t *req,
                     const tg_policy_sale_t *sale, tg_policy_settle_t dflt,
                     tg_policy_settle_t *out, tg_policy_error_t *err);

/* The embedded copy of lua/<name> (e.g. "tollgate/sandbox.lua"), or NULL. */
const char *tg_policy_embedded(const char *name, size_t *len);

/* The name of the i-th embedded file (0, 1, ... in name order), or NULL past
 * the last: with tg_policy_embedded, what `tollgate policy test --spec`
 * writes out for busted (tollgate/harness.lua and what it requires). */
const char *tg_policy_embedded_name(size_t i);

#endif
