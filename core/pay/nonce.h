#ifndef TG_NONCE_H
#define TG_NONCE_H

/* Replay protection before settlement: one payment authorization, named by
 * (network, asset, payer, nonce), is let through verification once. A claim
 * holds until the authorization's validBefore; after that the verifier
 * refuses the authorization anyway (x402 wants validBefore >= now + 6 s),
 * and once settled the chain refuses its nonce for good.
 *
 * Two stores, same key:
 *  - local: one process-wide table shared by every worker thread (one
 *    instance, or the first line in front of Redis);
 *  - redis: per worker, on base/redisconn, shared by every instance.
 * Both fail closed: a claim that cannot be recorded (table full, Redis down
 * or slow) is not a claim, and the caller refuses the payment: local full ->
 * T402-2006 ServiceUnavailable, Redis unavailable -> T402-2003 CacheUnavailable.
 *
 * Expiry: an entry is kept until validBefore however far off, never capped
 * (a cap would reopen replay of long-lived authorizations after it). The
 * bound on memory is max_entries: a full table refuses new claims. Callers
 * should refuse a validBefore beyond now + maxTimeoutSeconds (plus a small
 * skew) before claiming, so that entries live about a minute and a payer
 * cannot pin memory with authorizations valid for years. */

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* The store key: SHA-256 over the parts, each prefixed with its length as one
 * byte: len(network) network || 20 asset || 20 payer || 32 nonce (network
 * longer than 255 bytes is cut at 255; CAIP-2 names are at most 41). Pure,
 * any thread. */
void tg_nonce_key(const char *network, const uint8_t asset[20], const uint8_t payer[20],
                  const uint8_t nonce[32], uint8_t out[32]);

/* ---- local ---- */

typedef struct tg_nonce_store tg_nonce_store_t;

/* A table holding at most max_entries live claims (at least 64), in 64
 * shards of max_entries / 64 each (rounded up), each with its own mutex. A
 * shard refuses claims once it holds its share, so the store as a whole may
 * refuse a little before max_entries: size it with room to spare. Memory,
 * allocated at once: 80 to 160 bytes per entry (40-byte slots, a power of
 * two per shard, at most half full). Slots are placed by a keyed hash under
 * a random per-store seed, so payers cannot aim nonces at one shard's slots.
 * NULL when out of memory. Free with tg_nonce_store_free once no thread
 * uses it. */
tg_nonce_store_t *tg_nonce_store_new(size_t max_entries);
void tg_nonce_store_free(tg_nonce_store_t *s);

/* Claims key until expires_unix_s (the authorization's validBefore): an
 * entry is live while now_s < expires_unix_s. Returns
 *   0        claimed (a new key, or one whose earlier claim expired)
 *   -EEXIST  claimed already and not expired: a replay or a concurrent request
 *   -ENOSPC  the key's shard is full of live entries (fail closed: 2006)
 *   -EINVAL  a NULL argument, or expires_unix_s <= now_s.
 * Expired entries are reclaimed when a full shard needs room (a sweep of that
 * shard, at most once until its earliest live entry expires) or by
 * tg_nonce_store_sweep. Any thread. Each key has exactly one winner among
 * concurrent claims. */
int tg_nonce_claim(tg_nonce_store_t *s, const uint8_t key[32], int64_t expires_unix_s, int64_t now_s);

/* Forgets key: after a verification that definitively failed, so that the
 * payer may try the same authorization again. Only the claim's winner calls
 * it. Any thread; no-op when absent. */
void tg_nonce_release(tg_nonce_store_t *s, const uint8_t key[32]);

/* Drops every entry expired at now_s (a periodic timer may call it; claims
 * also sweep a full shard by themselves). Returns how many. Any thread. */
size_t tg_nonce_store_sweep(tg_nonce_store_t *s, int64_t now_s);

/* Live and expired-but-not-yet-reclaimed entries, for metrics and tests. */
size_t tg_nonce_store_count(tg_nonce_store_t *s);

/* ---- redis ---- */

typedef struct tg_nonce_redis tg_nonce_redis_t;

/* Where Redis is; strings are copied by tg_nonce_redis_new. */
typedef struct tg_nonce_redis_opts {
  const char *host; /* IP literal or name (resolved by hiredis at each connect) */
  int port;
  const char *password; /* AUTH, or NULL */
  int db;               /* SELECT when not 0 */
  uint32_t timeout_ms;  /* per call; 0: 20 */
  const char *instance; /* this instance's id, stored as the claim's value and in log lines; NULL: "" */
} tg_nonce_redis_opts_t;

/* One worker's connection, on its loop (Redis 7: SET ... PXAT). Redis being
 * down is not a failure; claims fail until it answers. Returns 0 and *out,
 * or *out NULL and err: -EINVAL (NULL argument, no host, instance over 128
 * bytes), -ENOMEM, or tg_redisconn_new's error. Loop thread only. */
int tg_nonce_redis_new(uv_loop_t *loop, const tg_nonce_redis_opts_t *o, tg_nonce_redis_t **out, char *err,
                       size_t errlen);

/* Closes the connection: waiting calls get -ECANCELED before this returns.
 * Memory is released by close callbacks: run the loop before closing it.
 * Not from inside one of r's callbacks. Loop thread only. */
void tg_nonce_redis_free(tg_nonce_redis_t *r);

/* status: 0 claimed / released, -EEXIST claimed already (claim), -ENOENT
 * nothing to release (release), or, Redis not deciding (the caller fails
 * closed: T402-2003):
 *   -ETIMEDOUT     no answer within timeout_ms (a claim that landed late is
 *                  undone by the connection, so the payer may retry)
 *   -ECONNREFUSED  not connected
 *   -EIO           connection lost while waiting, or an unexpected reply
 *   -ECANCELED     tg_nonce_redis_free ran first */
typedef void (*tg_nonce_redis_cb)(int status, void *ud);

/* Claims key "tg:nonce:<hex key>" until expires_unix_ms (absolute Unix time in
 * ms: the authorization's validBefore * 1000), by one script running
 * SET key <instance> NX PXAT expires_unix_ms: of concurrent claims from any
 * number of connections exactly one gets 0. Returns 0 and cb runs exactly
 * once on the loop, never inside this call; or -EINVAL (NULL argument,
 * expires_unix_ms <= 0), -ENOMEM, -ECANCELED, and cb never runs. An expiry
 * already past at the Redis clock claims nothing and answers 0 (the entry
 * expired at once; the caller refuses such a payment before claiming).
 * Loop thread only. */
int tg_nonce_redis_claim(tg_nonce_redis_t *r, const uint8_t key[32], int64_t expires_unix_ms,
                         tg_nonce_redis_cb cb, void *ud);

/* Deletes the claim of key (after a verification that definitively failed;
 * only the claim's winner calls it). Same returns and callback as claim. */
int tg_nonce_redis_release(tg_nonce_redis_t *r, const uint8_t key[32], tg_nonce_redis_cb cb, void *ud);

/* 1 while connected with the script loaded, else 0. */
int tg_nonce_redis_ready(const tg_nonce_redis_t *r);

#endif
