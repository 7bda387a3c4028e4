#ifndef TG_IDEM_H
#define TG_IDEM_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* The idempotency table of ExecuteTransaction: one idempotency key never
 * produces two charges, and a retry gets the first answer byte for byte.
 *
 * The caller (the pipeline) computes the two 32-byte values it is keyed by:
 *  - scope: SHA-256 of (billing reference, NUL, idempotency key), the key of
 *    the table (the raw idempotency key is never stored here);
 *  - req_hash: SHA-256 of the request's canonical form. The same scope with
 *    another req_hash is a conflict (answered already_exists, as Stripe does).
 * The response is opaque bytes (the encoded answer), stored when the
 * transaction is done and handed back on every replay.
 *
 * An entry is PENDING from the begin that created it until its owner calls
 * finish (it becomes DONE, with the response, for ttl_ms) or abort (it is
 * removed: a refused transaction is not remembered, the key may be used
 * again). An expired DONE entry behaves as absent.
 *
 * Two modes:
 *  - local: one process-wide table (tg_idem_t), shared by the worker threads;
 *  - redis: the keys live in Redis (tg_idem_redis_t, one per worker loop), so
 *    several gateway instances share them. It fails closed: when Redis cannot
 *    answer, the caller gets an error and must answer `unavailable`, never
 *    charge without the shared check. */

/* What begin found. TG_IDEM_NEW is 0 so that "0 or a negative errno" reads
 * as usual where the caller only wants to know whether it owns the key. */
typedef enum {
  TG_IDEM_NEW = 0,      /* no live entry: a PENDING one was made, the caller owns the key */
  TG_IDEM_PENDING = 1,  /* another call owns it (same req_hash) and has not finished: poll again */
  TG_IDEM_DONE = 2,     /* finished with the same req_hash: replay the stored response */
  TG_IDEM_CONFLICT = 3, /* a live entry (pending or done) with another req_hash */
} tg_idem_state_t;

/* Declares the metrics (once at start-up, before workers run):
 *   idempotency_entries                 gauge: entries held by local tables
 *   idempotency_hits_total{result}      result: replay|conflict|pending (both modes)
 *   idempotency_evictions_total         live DONE entries dropped for room (local)
 * Returns 0 or -ENOMEM. Without it the table works and counts nothing. */
int tg_idem_metrics_init(void);

/* ---- local mode ---- */

typedef struct tg_idem tg_idem_t;

/* A DONE entry's response, given by tg_idem_begin. */
typedef struct tg_idem_result {
  void *response;      /* DONE: a malloc'd copy (non-NULL, even when empty); the caller frees it */
  size_t response_len; /* its length (0 allowed) */
} tg_idem_result_t;

/* Counters of one table, for tests and `tollgate` diagnostics (any thread). */
typedef struct tg_idem_stats {
  size_t entries;     /* held now, pending and done (expired ones not yet swept included) */
  size_t pending;     /* of which PENDING */
  uint64_t evictions; /* live DONE entries dropped to make room */
} tg_idem_stats_t;

/* The clock of every time argument below: wall-clock milliseconds
 * (CLOCK_REALTIME), because tg_idem_restore takes completion times written to
 * the log before a restart, which a monotonic clock cannot compare with. A
 * clock step shortens or lengthens the TTL of the entries by as much. */
uint64_t tg_idem_now_ms(void);

/* A table of at most max_entries entries (>= 1), DONE entries living ttl_ms
 * (> 0) after their finish. NULL on out of memory or bad arguments.
 *
 * Sizing: max_entries must cover ttl_ms x the peak rate of transactions
 * (plus those in flight): when the table is full the least recently used DONE
 * entry is evicted (idempotency_evictions_total), and a retry of an evicted
 * key is NEW again, so it can be charged a second time. A PENDING entry is
 * never evicted. About 150 bytes per entry plus its response.
 *
 * The table is split into up to 64 shards (by a keyed hash of scope, so that
 * clients cannot aim keys at one shard), each with its own mutex, LRU list
 * and an even share of max_entries: the LRU order and the bound hold per
 * shard. Small tables (max_entries below 1024) have fewer shards, one below
 * 32 entries, where the order is exact. */
tg_idem_t *tg_idem_new(size_t max_entries, uint64_t ttl_ms);

/* Frees the table and every entry. No thread may use it any more. */
void tg_idem_free(tg_idem_t *t);

/* Looks scope up and, when it has no live entry, makes a PENDING one owned
 * by the caller, who must later call tg_idem_finish or tg_idem_abort (a
 * PENDING entry has no TTL: if its owner never ends it, the key stays
 * PENDING). Returns
 *  - TG_IDEM_NEW: the caller owns the key;
 *  - TG_IDEM_PENDING: another call owns it with the same req_hash (poll again);
 *  - TG_IDEM_DONE: out->response and out->response_len are set (the caller
 *    frees out->response); the entry becomes the most recently used;
 *  - TG_IDEM_CONFLICT: a live entry with another req_hash;
 *  - -ENOMEM, or -EBUSY when the scope's shard is full of PENDING entries
 *    (nothing to evict; answer unavailable), or -EINVAL (a NULL argument).
 * out is written only for TG_IDEM_DONE. Counts idempotency_hits_total for
 * PENDING (pending), DONE (replay) and CONFLICT (conflict).
 * Any thread, concurrently: one shard mutex is held for the lookup (and for
 * the copy of a response). */
int tg_idem_begin(tg_idem_t *t, const uint8_t scope[32], const uint8_t req_hash[32], uint64_t now_ms,
                  tg_idem_result_t *out);

/* PENDING -> DONE: stores a copy of resp (len bytes; resp may be NULL when
 * len is 0), expiring at now_ms + ttl_ms. Returns 0, -ENOENT (no entry for
 * scope), -EINVAL (the entry is not PENDING), or -ENOMEM (the entry stays
 * PENDING: call finish again, or abort). Only the caller that got
 * TG_IDEM_NEW may call it, once. Any thread. */
int tg_idem_finish(tg_idem_t *t, const uint8_t scope[32], const void *resp, size_t len, uint64_t now_ms);

/* Removes the PENDING entry of scope (the transaction was refused: the key
 * may be used again). Returns 0, -ENOENT (no entry) or -EINVAL (the entry is
 * DONE: it is kept). Only the caller that got TG_IDEM_NEW. Any thread. */
int tg_idem_abort(tg_idem_t *t, const uint8_t scope[32]);

/* Recovery: inserts a DONE entry for a transaction done at done_at_ms (from
 * the write-ahead log), expiring at done_at_ms + ttl_ms; nothing is done when
 * that is not after now_ms. A DONE entry already there is replaced (the log
 * is replayed in order: the later record wins). Returns 0, -EEXIST (scope is
 * PENDING: kept), -EBUSY (the shard is full of PENDING entries), -ENOMEM or
 * -EINVAL. May evict, as begin. Any thread. */
int tg_idem_restore(tg_idem_t *t, const uint8_t scope[32], const uint8_t req_hash[32], const void *resp,
                    size_t len, uint64_t done_at_ms, uint64_t now_ms);

/* Removes every expired entry (call it from a timer, e.g. every few
 * seconds, so that memory and idempotency_entries follow the TTL; begin only
 * drops the expired entries it meets). Returns how many. Any thread; locks one
 * shard at a time. */
size_t tg_idem_expire(tg_idem_t *t, uint64_t now_ms);

void tg_idem_stats(tg_idem_t *t, tg_idem_stats_t *out);

/* ---- redis mode ---- */

typedef struct tg_idem_redis tg_idem_redis_t;

/* Where Redis is and how keys live there. Strings are borrowed: they must
 * stay valid during tg_idem_redis_new, which copies them. */
typedef struct tg_idem_redis_opts {
  const char *host;        /* IP literal (or a name, resolved by hiredis at each connect) */
  int port;
  const char *password;    /* AUTH password or NULL; never logged, wiped when freed */
  int db;                  /* SELECT db when not 0 */
  uint32_t timeout_ms;     /* per call: no answer by then -> -ETIMEDOUT; 0: 20 */
  uint64_t ttl_ms;         /* life of a DONE value; required (> 0) */
  uint64_t pending_ttl_ms; /* life of a PENDING value, if its owner dies; required (> 0) */
  const char *instance;    /* this gateway instance's id (e.g. host:pid), written into PENDING
                            * values: unique per instance; at most 128 bytes; NULL: "" */
} tg_idem_redis_opts_t;

/* Result of a call. For begin: state is a tg_idem_state_t, and for
 * TG_IDEM_DONE resp/len are the stored response (valid only during the
 * callback: copy it). For finish and abort: state is 0. Otherwise a negative
 * errno, resp NULL:
 *   -ETIMEDOUT     no answer within timeout_ms (the command may still run:
 *                  a begin that turns out NEW afterwards is aborted by itself)
 *   -ECONNREFUSED  not connected (Redis down, reconnecting, or refusing AUTH)
 *   -EIO           connection lost while waiting, or an unexpected reply
 *   -ECANCELED     tg_idem_redis_free ran first
 *   -ESTALE        finish only: the key now holds another request's value
 *                  (our PENDING value expired and the key was reused); not stored
 *   -ENOENT        abort only: the key did not hold our PENDING value (expired or
 *                  finished); nothing deleted
 * With any negative state in begin, the caller must answer unavailable. */
typedef void (*tg_idem_redis_cb)(void *arg, int state, const void *resp, size_t len);

/* One worker's connection, on its loop: connects at once, loads the script
 * (SCRIPT LOAD) on every connect, reconnects with backoff (100 ms doubling to
 * 2 s, jittered) after a drop, and drops a connection that has answered
 * nothing for max(1 s, 10 x timeout_ms) while calls wait. Redis being down
 * is not a failure here (calls fail until it answers). Returns 0 and *out, or
 * *out NULL and err saying why: -EINVAL (NULL argument, no host, ttl 0,
 * instance too long), -ENOMEM, -EIO (hashing the script), or the libuv error
 * creating a timer. Loop thread only. */
int tg_idem_redis_new(uv_loop_t *loop, const tg_idem_redis_opts_t *o, tg_idem_redis_t **out, char *err,
                      size_t errlen);

/* Keys are "tg:idem:<hex scope>"; values are
 *   "P" <hex req_hash> <instance>   while pending (PX pending_ttl_ms)
 *   "D" <hex req_hash> <response>   when done     (PX ttl_ms)
 * Each call is one EVALSHA of one script (EVAL when the server answers
 * NOSCRIPT), so it is atomic and one round trip.
 *
 * The calls below return 0, and then cb(arg, ...) runs exactly once on the
 * loop, never inside the call, within about timeout_ms; or they return
 * -EINVAL (NULL argument), -EMSGSIZE (response over TG_IDEM_REDIS_MAX_RESPONSE),
 * -ECANCELED (being freed) or -ENOMEM, and cb never runs. arg must stay valid
 * until cb runs. Loop thread only. */
#define TG_IDEM_REDIS_MAX_RESPONSE (16u << 20)

/* SET key P... NX PX pending_ttl_ms; when the key exists, reads it: the
 * states of tg_idem_begin. A PENDING value of another instance with the same
 * req_hash is PENDING (poll again); a different req_hash, pending or done, is
 * CONFLICT. Counts idempotency_hits_total as tg_idem_begin. */
int tg_idem_redis_begin(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                        tg_idem_redis_cb cb, void *arg);

/* Stores "D<hash><resp>" with PX ttl_ms when the key holds our own PENDING
 * value, any value with the same req_hash (a retried finish, or another
 * instance that took the key after our PENDING value expired), or nothing
 * (our PENDING value expired: storing the answer still protects later
 * retries; logged, since pending_ttl_ms is then too short). A different
 * req_hash is left alone: -ESTALE. resp is copied (may be NULL when len is
 * 0). A finish that fails leaves the PENDING value to expire after
 * pending_ttl_ms, after which the key may be charged again: retry it. */
int tg_idem_redis_finish(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                         const void *resp, size_t len, tg_idem_redis_cb cb, void *arg);

/* Deletes the key only when it holds our own PENDING value for req_hash. */
int tg_idem_redis_abort(tg_idem_redis_t *r, const uint8_t scope[32], const uint8_t req_hash[32],
                        tg_idem_redis_cb cb, void *arg);

/* 1 while connected with the script loaded, else 0 (for readiness). */
int tg_idem_redis_ready(const tg_idem_redis_t *r);

/* Closes the connection: every call still waiting gets -ECANCELED, before
 * this returns. Not from inside one of r's callbacks. The memory is released
 * by close callbacks: run the loop (UV_RUN_DEFAULT) before uv_loop_close.
 * Loop thread only; r is invalid after. */
void tg_idem_redis_free(tg_idem_redis_t *r);

#endif
