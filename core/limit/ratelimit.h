#ifndef TG_RATELIMIT_H
#define TG_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "config/config.h"

/* Rate limits per tenant and key, by GCRA (the generic cell rate algorithm:
 * a token bucket kept as one "theoretical arrival time", TAT). A key may
 * take `burst` requests at once, then `rate_per_s` per second:
 *   T = 1e6 / rate_per_s us (emission interval), tau = T * (burst - 1);
 *   allowed when TAT - now <= tau, and then TAT = max(TAT, now) + T;
 *   when limited, retry after TAT - tau - now (rounded up to whole ms).
 * T is kept in whole microseconds, so a rate is off by at most rate / 2e6
 * of itself (0.05% at 1000/s), and capped at TG_RATELIMIT_MAX_US, as is tau.
 *
 * Two modes share that math:
 *  - local: one process-wide table (tg_ratelimit_t), lock-free, shared by
 *    every worker thread, so one limit holds across the workers of an instance;
 *  - redis: one Redis connection per worker (tg_ratelimit_redis_t) running a
 *    server-side script with the Redis clock, so several instances enforce one
 *    limit; when Redis is slow or down, the local table decides instead. */

#define TG_RATELIMIT_PROBE 16                  /* slots searched per key (the neighbourhood) */
#define TG_RATELIMIT_MAX_US (UINT64_C(1) << 40) /* ~12.7 days: cap on T and on tau */

typedef struct tg_ratelimit tg_ratelimit_t;

/* Where a decision came from (also the `source` label of the metric). */
typedef enum {
  TG_RATELIMIT_LOCAL = 0, /* local mode: the process-wide table */
  TG_RATELIMIT_REDIS,     /* redis mode: the Redis script */
  TG_RATELIMIT_FALLBACK,  /* redis mode, decided by the local table: Redis slow, failing or down */
} tg_ratelimit_source_t;

/* "local", "redis", "local-fallback". */
const char *tg_ratelimit_source_name(tg_ratelimit_source_t source);

/* Declares the metrics (call once at start-up, before workers run):
 *   ratelimit_decisions_total{tenant_id,result,source}  result: allowed|limited
 *   ratelimit_table_full_total{action}                   action: evict|allow
 *   ratelimit_redis_fallback_total{reason}               reason: timeout|error|unavailable
 * Returns 0 or -ENOMEM. Without it the limiter works and counts nothing. */
int tg_ratelimit_metrics_init(void);

/* The clock every caller of one table must use: CLOCK_MONOTONIC in us
 * (uv_hrtime() / 1000). Any thread. */
uint64_t tg_ratelimit_now_us(void);

/* A table of `slots` entries (rounded up to a power of two, at least
 * TG_RATELIMIT_PROBE; 16 bytes each). Keys are hashed with SipHash-2-4 under a
 * random per-table key, so clients cannot aim keys at one neighbourhood.
 * NULL when out of memory. Free with tg_ratelimit_free once no thread uses it.
 *
 * Each key lives in one of the TG_RATELIMIT_PROBE slots after its hash. A
 * slot whose TAT has passed holds no state worth keeping (its bucket is full)
 * and is reused by the next new key. When all slots of a neighbourhood hold
 * live keys, the new key evicts the one with the smallest TAT (the closest to
 * full, so the least state is lost); should that race with other threads
 * TG_RATELIMIT_PROBE times over, the request is allowed untracked. Both count
 * ratelimit_table_full_total: a full table fails open, never closed, and the
 * metric says the table wants more slots (config rate_limit.table_size).
 * Evictions start when about 40% of the slots hold live keys (a key is live
 * until its bucket is full again, up to burst / rate seconds after its last
 * request): size the table at 2.5 times the keys live at once; the default
 * 65536 slots (1 MiB) hold about 25000. */
tg_ratelimit_t *tg_ratelimit_new(size_t slots);
void tg_ratelimit_free(tg_ratelimit_t *rl);

/* Takes one request for (tenant, key): tenant is a C string, key is key_len
 * bytes (any bytes). rate_per_s > 0 and finite (fractions welcome: 0.5 is one
 * per 2 s), burst >= 1. now_us from tg_ratelimit_now_us() (tests pass their
 * own; it must stay below 2^51). Returns 1 allowed, 0 limited (and
 * *retry_after_ms >= 1 when retry_after_ms is not NULL), -EINVAL for bad
 * arguments. Counts ratelimit_decisions_total{source="local"}.
 *
 * Threads: any thread, concurrently, no locks: atomic compare-and-swap on the
 * slot. Exact under contention on one key (every allowed request advances the
 * TAT by T). Approximate only around a full neighbourhood: a request racing
 * with the reuse or eviction of its own key's slot may go uncounted, and two
 * first requests of one new key racing there may claim two slots (one extra
 * request allowed). */
int tg_ratelimit_take(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                      double rate_per_s, uint32_t burst, uint64_t now_us, uint32_t *retry_after_ms);

/* tg_ratelimit_take without the metric, for callers that count the decision
 * under another source with tg_ratelimit_count. */
int tg_ratelimit_check(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                       double rate_per_s, uint32_t burst, uint64_t now_us, uint32_t *retry_after_ms);
void tg_ratelimit_count(const char *tenant, int allowed, tg_ratelimit_source_t source);

/* The GCRA constants for a rate and burst, in us: *interval_us = T (rounded,
 * 1..TG_RATELIMIT_MAX_US), *tau_us = T * (burst - 1) (capped). Returns 0, or
 * -EINVAL when rate_per_s is not finite and > 0 or burst is 0 (so callers can
 * check what a policy returned before taking). */
int tg_ratelimit_params(double rate_per_s, uint32_t burst, uint64_t *interval_us, uint64_t *tau_us);

/* Counts ratelimit_redis_fallback_total{reason}: the redis mode's fallbacks. */
void tg_ratelimit_count_fallback(const char *reason);

/* tg_ratelimit_take for redis mode when Redis could not even be asked
 * (tg_ratelimit_redis_take failed): the local table decides, counted as
 * source "local-fallback" and as a fallback for reason ("error", ...), as
 * the redis mode's own fallbacks are. Same arguments and returns as
 * tg_ratelimit_take. Any thread. */
int tg_ratelimit_take_fallback(tg_ratelimit_t *rl, const char *tenant, const char *key, size_t key_len,
                               double rate_per_s, uint32_t burst, uint64_t now_us, const char *reason,
                               uint32_t *retry_after_ms);

/* SipHash-2-4 of len bytes under a 16-byte key (the table's key hash; public
 * so tests can check it against the reference vectors). */
uint64_t tg_ratelimit_siphash(const uint8_t key[16], const void *data, size_t len);

/* ---- distributed mode ---- */

typedef struct tg_ratelimit_redis tg_ratelimit_redis_t;

/* Where Redis is. Strings are owned by the options (tg_ratelimit_redis_opts_init
 * fills them; tg_ratelimit_redis_new copies them). */
typedef struct tg_ratelimit_redis_opts {
  char *host;          /* IP literal; a name is resolved by hiredis at each connect, on the worker */
  int port;
  char *password;      /* AUTH password, or NULL */
  uint32_t timeout_ms; /* per take: no answer by then -> local decision */
  int db;              /* SELECT db when not 0 */
} tg_ratelimit_redis_opts_t;

/* Options from the config's redis section: resolves a host name to an
 * address once (blocking getaddrinfo: call it on the main thread at start;
 * an unresolvable name is kept for hiredis to retry) and reads the password
 * file. Returns 0, or -1 with err (no redis section, unreadable or empty
 * password file, out of memory). */
int tg_ratelimit_redis_opts_init(tg_ratelimit_redis_opts_t *o, const tg_config_redis_t *cfg, char *err,
                                 size_t errlen);
/* Frees the strings (the password is wiped first) and zeroes o. */
void tg_ratelimit_redis_opts_clear(tg_ratelimit_redis_opts_t *o);

/* One worker's connection, on its loop: connects at once, loads the script
 * (SCRIPT LOAD) on every connect, reconnects with backoff (100 ms doubling to
 * 2 s, jittered) after any drop, and drops a connection that has answered
 * nothing for max(1 s, 10 x timeout_ms) while requests wait. local is the
 * process-wide table used for fallback decisions; it must outlive this.
 * Redis being down is not a failure (takes fall back until it answers).
 * Returns 0 and *out, or with *out NULL and err saying why: -EINVAL (a
 * NULL argument or no host), -ENOMEM, -EIO (the script's hash), or the
 * libuv error creating a timer (handles already made are closing: run the
 * loop before closing it). Loop thread only. */
int tg_ratelimit_redis_new(uv_loop_t *loop, const tg_ratelimit_redis_opts_t *opts, tg_ratelimit_t *local,
                           tg_ratelimit_redis_t **out, char *err, size_t errlen);

/* Decided: allowed 1 or 0, retry_after_ms >= 1 when limited, source REDIS or
 * FALLBACK. */
typedef void (*tg_ratelimit_cb)(void *arg, int allowed, uint32_t retry_after_ms,
                                tg_ratelimit_source_t source);

/* Takes one request, as tg_ratelimit_take, by the Redis script on key
 * "tg:rl:<tenant>:<key>" (the key expires when its bucket is full again).
 * Returns 0 and cb(arg, ...) runs exactly once, never from inside this call:
 * within about timeout_ms (the loop's timer resolution), by Redis or, on
 * timeout, error reply or no connection, by the local table. Every fallback
 * counts ratelimit_redis_fallback_total{reason}; the first one in 10 s is
 * logged per worker ("redis unreachable, using local limits"). Counts
 * ratelimit_decisions_total. Returns -EINVAL (bad arguments) or -ENOMEM, and
 * then cb never runs. arg must stay valid until cb runs. Loop thread only. */
int tg_ratelimit_redis_take(tg_ratelimit_redis_t *r, const char *tenant, const char *key, size_t key_len,
                            double rate_per_s, uint32_t burst, tg_ratelimit_cb cb, void *arg);

/* 1 while connected with the script loaded (decisions go to Redis), else 0. */
int tg_ratelimit_redis_ready(const tg_ratelimit_redis_t *r);

/* Closes the connection. Takes still waiting are decided by the local table
 * and their callbacks run before this returns. The memory is released by
 * close callbacks: run the loop until it has no handles left (uv_run
 * UV_RUN_DEFAULT) before uv_loop_close. Loop thread only; r is invalid after. */
void tg_ratelimit_redis_free(tg_ratelimit_redis_t *r);

#endif
