#ifndef TG_PREPAID_REDIS_H
#define TG_PREPAID_REDIS_H

#include <stddef.h>
#include <stdint.h>

#include <uv.h>

/* Prepaid balances in Redis (ledger.mode = "redis"): every gateway instance
 * holds and charges the same accounts, so two instances never spend the same
 * money twice. One client per worker loop, like tg_idem_redis_t.
 *
 * Data model, per account (ref, currency); the braces are literal, a Redis
 * Cluster hash tag, so the three keys of an account share one slot:
 *   tg:acct:{<ref>}:<cur>    hash: balance  integer, atomic units (HINCRBY only)
 *                                  held     integer, the sum of the live holds below
 *   tg:holds:{<ref>}:<cur>   sorted set: member hold id, score its expiry (ms of Redis TIME)
 *   tg:hold:{<ref>}:<cur>    hash: hold id -> amount (decimal)
 * and, for idempotency:
 *   tg:captured:<txid>       "1", PX captured_ttl_ms (7 days): the capture of txid was applied
 *   tg:credit:<reference>    "1", no expiry: the credit with this reference was applied
 * available = balance - held. `held` is kept equal to the sum of the hold
 * hash by every script, so no call sums the holds. Expired holds (an instance
 * died between hold and capture/release) are dropped lazily by every script
 * on the account (up to 1000 per call), so they never block money for good;
 * both hold keys carry a PEXPIRE as long as their longest hold, so the keys
 * of an account nobody touches again vanish, and a script that finds no hold
 * left resets `held` to 0. Lua numbers are doubles: amounts and balances
 * stay within 2^53 (exact), money is changed by HINCRBY on decimal strings
 * only. The capture and credit keys are outside the account's slot: the
 * scripts need one Redis (primary, or Sentinel), not a Cluster.
 *
 * Each call is one EVALSHA (EVAL when the server answers NOSCRIPT) of one
 * script per operation: atomic and one round trip. The scripts read Redis
 * TIME, which needs Redis >= 3.2 (effects replication; default since 5).
 *
 * Hold ids are 32 lowercase hex digits: 64 random bits drawn when the client
 * is made, then a 64-bit counter, so they are unique across workers and
 * instances without coordination (a collision is refused by the script).
 *
 * Limits: ref 1..TG_PREPAID_REDIS_MAX_REF bytes (no NUL), currency 1..16 of
 * [A-Za-z0-9], a txid or a credit reference 1..256 bytes; amount
 * 0..TG_PREPAID_REDIS_MAX_AMOUNT. */

#define TG_PREPAID_REDIS_MAX_REF 256
#define TG_PREPAID_REDIS_MAX_CURRENCY 16
#define TG_PREPAID_REDIS_MAX_ID 256
#define TG_PREPAID_REDIS_MAX_AMOUNT (INT64_C(1) << 53)
#define TG_PREPAID_REDIS_HOLD_ID_LEN 32

typedef struct tg_prepaid_redis tg_prepaid_redis_t;

/* Strings are borrowed during tg_prepaid_redis_new, which copies them. */
typedef struct tg_prepaid_redis_opts {
  const char *host;         /* IP literal or name (resolved by hiredis at each connect) */
  int port;
  const char *password;     /* AUTH password or NULL; never logged, wiped when freed */
  int db;                   /* SELECT db when not 0 */
  uint32_t timeout_ms;      /* per call: no answer by then -> -ETIMEDOUT; 0: 20 */
  uint64_t hold_ttl_ms;     /* life of a hold nobody ends; longer than any purchase; 0: 60000 */
  uint64_t captured_ttl_ms; /* how long a capture's txid is remembered; 0: 7 days */
  const char *instance;     /* this instance's id, for logs; at most 128 bytes; NULL: "" */
} tg_prepaid_redis_opts_t;

/* Results. status is a negative errno on failure:
 *   -ETIMEDOUT     no answer within timeout_ms (the script may still run: see each call)
 *   -ECONNREFUSED  not connected (Redis down, reconnecting, or refusing AUTH)
 *   -EIO           connection lost while waiting, or an unexpected reply
 *   -ECANCELED     tg_prepaid_redis_free ran first
 * The strings passed to a callback are valid during the callback only. */

/* hold: status 0 held (hold_id set, available = what is left after it),
 * -ENOSPC insufficient funds (hold_id NULL, available = what the account has,
 * 0 for no account), or an error above (hold_id NULL, available 0). */
typedef void (*tg_prepaid_redis_hold_cb)(void *arg, int status, const char *hold_id, int64_t available);

/* capture, release, credit: status 1 applied now, 0 not applied (capture:
 * txid already captured; release: no such live hold; credit: reference
 * already applied), or an error (credit: -EOVERFLOW, the balance would pass
 * 2^53). balance: capture and credit, the account's balance after (as it is,
 * when not applied); release 0. */
typedef void (*tg_prepaid_redis_done_cb)(void *arg, int status, int64_t balance);

/* balance: status 0 with balance and held (both 0 for no account), or an error. */
typedef void (*tg_prepaid_redis_balance_cb)(void *arg, int status, int64_t balance, int64_t held);

/* One worker's client, on its loop: connects at once, loads the scripts on
 * every connect, reconnects with backoff (100 ms doubling to 2 s, jittered)
 * and drops a connection that answered nothing for max(1 s, 10 x timeout_ms)
 * while calls wait. Redis being down is not an error here (calls fail until
 * it answers). Returns 0 and *out, or *out NULL and err saying why: -EINVAL
 * (NULL argument, no host, instance too long), -ENOMEM, -EIO (hashing the
 * scripts or no random source), or the libuv error creating a timer. Loop
 * thread only. */
int tg_prepaid_redis_new(uv_loop_t *loop, const tg_prepaid_redis_opts_t *o, tg_prepaid_redis_t **out, char *err,
                         size_t errlen);

/* The calls below return 0, and then cb(arg, ...) runs exactly once on the
 * loop, never inside the call, within about timeout_ms; or they return
 * -EINVAL (NULL, out-of-range argument), -ECANCELED (being freed) or -ENOMEM,
 * and cb never runs. Strings are copied; arg must stay valid until cb runs.
 * Loop thread only. */

/* Holds amount on (ref, currency) for hold_ttl_ms when available >= amount.
 * A hold of 0 always succeeds, records nothing, and still gets an id. A hold
 * that answers -ETIMEDOUT and then succeeds after all is released by the
 * client itself; after a lost connection it may stay until it expires. */
int tg_prepaid_redis_hold(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                          tg_prepaid_redis_hold_cb cb, void *arg);

/* Charges amount for the transaction txid: once per txid (for
 * captured_ttl_ms), balance -= amount, and drops hold_id if it is still
 * live. The debit happens even when the hold expired or was never made (the
 * transaction is durable in the gateway's log: the money is owed), so the
 * balance may go below 0. hold_id may be NULL or "". On an error the capture
 * may or may not have been applied: call it again with the same txid. */
int tg_prepaid_redis_capture(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                             const char *hold_id, const char *txid, tg_prepaid_redis_done_cb cb, void *arg);

/* Drops hold_id from (ref, currency) if it is still live. */
int tg_prepaid_redis_release(tg_prepaid_redis_t *r, const char *ref, const char *currency, const char *hold_id,
                             tg_prepaid_redis_done_cb cb, void *arg);

/* balance += amount (> 0), once per reference (NULL or "": no idempotency);
 * refused with -EOVERFLOW when the balance would pass 2^53 (the reference is
 * then not used up). On an error other than -EOVERFLOW, call again with the
 * same reference. */
int tg_prepaid_redis_credit(tg_prepaid_redis_t *r, const char *ref, const char *currency, int64_t amount,
                            const char *reference, tg_prepaid_redis_done_cb cb, void *arg);

/* The account's balance and the sum of its live holds (expired ones dropped first). */
int tg_prepaid_redis_balance(tg_prepaid_redis_t *r, const char *ref, const char *currency,
                             tg_prepaid_redis_balance_cb cb, void *arg);

/* 1 while connected with every script loaded, else 0 (for readiness). */
int tg_prepaid_redis_ready(const tg_prepaid_redis_t *r);

/* Closes the connection: every call still waiting gets -ECANCELED before
 * this returns. Not from inside one of r's callbacks. Memory is released by
 * close callbacks: run the loop (UV_RUN_DEFAULT) before uv_loop_close. Loop
 * thread only; r is invalid after. */
void tg_prepaid_redis_free(tg_prepaid_redis_t *r);

#endif
