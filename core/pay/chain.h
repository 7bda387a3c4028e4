#ifndef TG_CHAIN_H
#define TG_CHAIN_H

/* JSON-RPC providers for the local verification of an EIP-3009 payment: what
 * the chain says of the payer's balance and of the authorization's nonce.
 *
 * One check is one HTTP POST carrying a JSON-RPC batch of three calls, all
 * against block "latest":
 *   id 1  eth_chainId
 *   id 2  eth_call {to: asset, data: balanceOf(address)          0x70a08231 || from}
 *   id 3  eth_call {to: asset, data: authorizationState(address,bytes32)
 *                                                                0xe94a0102 || from || nonce}
 * (addresses left-padded to 32-byte words). The reply is read strictly
 * (tg_chain_parse_reply): replies are matched by id, in any order; a provider
 * on another chain, a malformed word or a JSON-RPC error is an error, never a
 * balance of 0 or an unused nonce.
 *
 * A pool holds one tenant's providers on one worker loop. Providers are
 * ranked by an EWMA of their measured latency, a provider that failed
 * recently going after those that did not (the penalty is forgiven
 * TG_CHAIN_PENALTY_MS after its last failure, so a recovered provider is
 * tried again; a success clears it at once). A check tries the providers in
 * rank order, each at most once, moving on after any error or timeout.
 * Successful results are cached for cache_ttl_ms, keyed by (chain, asset,
 * from, nonce), in a bounded table (an older entry is overwritten when the
 * table is full). Concurrent checks of the same key are not merged.
 *
 * Metrics (tg_chain_metrics_init):
 *   t402_rpc_latency_seconds{provider}          histogram, every attempt that got an HTTP answer
 *   t402_rpc_errors_total{provider,kind}   kind: timeout|connect|http|rpc_error|bad_reply|wrong_chain
 * provider is the URL's scheme://host:port only: provider URLs often carry an
 * API key in their path, which must not reach a metrics page.
 *
 * Threads: the pool and every function taking it belong to the loop's thread.
 * The pure functions (parse, request body, u256) may be called from any thread. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "net/client.h"

#define TG_CHAIN_MAX_PROVIDERS 8
#define TG_CHAIN_PENALTY_MS 30000 /* a failure weighs on a provider's rank for this long */
#define TG_CHAIN_REPLY_MAX 65536  /* a longer reply body is malformed (-EPROTO) */
#define TG_CHAIN_REQUEST_MAX 768  /* room for tg_chain_request_body's output */

/* Function selectors (first 4 bytes of keccak256 of the signature). */
#define TG_CHAIN_SEL_BALANCE_OF "70a08231" /* balanceOf(address) */
#define TG_CHAIN_SEL_AUTH_STATE "e94a0102" /* authorizationState(address,bytes32) */

typedef struct tg_chain_pool tg_chain_pool_t;

typedef struct tg_chain_opts {
  uint32_t timeout_ms;    /* per provider attempt (whole HTTP request); 0: 2000 */
  uint32_t cache_ttl_ms;  /* how long a result is reused; 0: 2000 */
  uint32_t cache_entries; /* cache capacity; 0: 1024 */
} tg_chain_opts_t;

/* What the chain said. balance: the payer's token balance, uint256 big-endian. */
typedef struct tg_chain_state {
  uint8_t balance[32];
  bool nonce_used; /* authorizationState(from, nonce) is true: used or canceled */
} tg_chain_state_t;

/* Error codes of a check (negative errno), in the callback's err:
 *   -ETIMEDOUT     the provider did not answer within timeout_ms
 *   -ECONNREFUSED  no connection, or it broke (refused, reset, name not
 *                  resolved, the HTTP client's queue full)
 *   -EREMOTEIO     the provider answered an HTTP status other than 200, or a
 *                  JSON-RPC error object (e.g. the call reverted: no such token)
 *   -EPROTO        a malformed reply (bad HTTP, TLS failure, not the JSON-RPC
 *                  batch asked for, a result that is not a 32-byte word, a
 *                  boolean word other than 0 or 1, a reply over TG_CHAIN_REPLY_MAX)
 *   -EXDEV         the provider is on another chain than chain_id
 *   -EHOSTUNREACH  every provider failed, not all in the same way
 *   -ECANCELED     the pool (or its HTTP client) was freed first
 * When every provider tried failed with the same code, that code is reported
 * (one provider that timed out: -ETIMEDOUT). Every one of them means "not
 * verified": the caller refuses the payment (T402-2004 RPCUnavailable). */
typedef void (*tg_chain_cb)(int err, const tg_chain_state_t *st, void *ud);

/* Declares the two metrics; call once at start-up before workers run.
 * 0 or -ENOMEM. Without it the pool works and counts nothing. */
int tg_chain_metrics_init(void);

/* A pool over urls[0..n) (1..TG_CHAIN_MAX_PROVIDERS http:// or https:// URLs
 * without user info, copied), sending through http, which must outlive the pool. o may be NULL
 * for defaults. NULL on bad arguments or out of memory. Loop thread only. */
tg_chain_pool_t *tg_chain_pool_new(uv_loop_t *loop, tg_httpc_t *http, const char *const *urls, size_t n,
                                   const tg_chain_opts_t *o);

/* Checks still waiting get their callback with -ECANCELED before this
 * returns (a callback calling tg_chain_check then gets -ECANCELED). May be
 * called from inside one of p's callbacks. Requests already sent finish in
 * the HTTP client, their answers dropped. The memory is released by a close
 * callback: run the loop before closing it. p is invalid after. */
void tg_chain_pool_free(tg_chain_pool_t *p);

/* Starts a check of (asset, from, nonce) on chain_id. Returns 0 and cb(ud)
 * runs exactly once, on the loop, never inside this call (a cache hit too);
 * st is set only when err is 0 and lives during the call. Or returns -EINVAL
 * (NULL argument, chain_id 0), -ENOMEM or -ECANCELED (pool being freed), and
 * cb never runs. The three arrays are copied. */
int tg_chain_check(tg_chain_pool_t *p, uint64_t chain_id, const uint8_t asset[20], const uint8_t from[20],
                   const uint8_t nonce[32], tg_chain_cb cb, void *ud);

/* tg_chain_check without the cache (its answer still refreshes it): for a
 * question whose answer may have changed within cache_ttl_ms, such as "did
 * the settlement attempt that just timed out spend the nonce?". */
int tg_chain_check_fresh(tg_chain_pool_t *p, uint64_t chain_id, const uint8_t asset[20],
                         const uint8_t from[20], const uint8_t nonce[32], tg_chain_cb cb, void *ud);

/* Counters, for tests and logs. */
typedef struct tg_chain_stats {
  uint64_t checks, cache_hits, attempts, failovers;
} tg_chain_stats_t;
void tg_chain_pool_stats(const tg_chain_pool_t *p, tg_chain_stats_t *out);

/* ---- pure functions ---- */

/* The request body of a check into out (NUL-terminated); its length. */
size_t tg_chain_request_body(const uint8_t asset[20], const uint8_t from[20], const uint8_t nonce[32],
                             char out[TG_CHAIN_REQUEST_MAX]);

/* Reads a reply body (len bytes, need not be NUL-terminated) to the batch of
 * tg_chain_request_body: a JSON array of exactly three objects with ids 1, 2
 * and 3 (integers, in any order, each once), each with exactly one of
 * "result" (a string) or "error" (an object). Duplicate keys are malformed.
 * Checked in this order, the first failure decides:
 *   -EPROTO     the shape above, or over TG_CHAIN_REPLY_MAX bytes
 *   -EREMOTEIO  id 1 is an error object
 *   -EPROTO     id 1 is not a quantity ("0x" + 1..64 hex digits, value < 2^64)
 *   -EXDEV      id 1 is not chain_id
 *   -EREMOTEIO  id 2 or 3 is an error object
 *   -EPROTO     id 2 or 3 is not "0x" + exactly 64 hex digits, or id 3's
 *               word is neither 0 nor 1
 * 0 fills *out; on error *out is zeroed. Never reads past len. */
int tg_chain_parse_reply(const char *body, size_t len, uint64_t chain_id, tg_chain_state_t *out);

/* Compares two uint256 (32 bytes big-endian): -1, 0 or 1 as a <, ==, > b. */
int tg_u256_cmp(const uint8_t a[32], const uint8_t b[32]);

/* 1 when balance >= amount (a decimal uint256, tg_eip3009_parse_uint256's
 * syntax), 0 when less, -EINVAL when amount is not such a number. */
int tg_chain_balance_ge(const uint8_t balance[32], const char *amount_decimal);

#endif
