#ifndef TG_FACIL_H
#define TG_FACIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <uv.h>

#include "net/client.h"

/* The HELP of t402_verification_duration_seconds, declared by the pool and
 * the paywall (local verification) alike: one family, one text. */
#define TG_FACIL_VERIFY_HELP                                                                             \
  "Time to verify an x402/t402 payment, by network, scheme and status: valid, invalid, error (no "      \
  "facilitator or chain answer: the payment is refused, retry), cached (a verification reused)."

/* The x402/t402 facilitator pool of one tenant on one worker loop: POST
 * /verify and POST /settle to 1..TG_FACIL_MAX facilitators, ranked at run
 * time, with failover, bounded retries, a bound on verifications in flight
 * and a cache of positive verifications.
 *
 * Threads: a pool belongs to the loop it was made on; every function but the
 * two parsers is for that loop's thread only. The parsers are pure (any
 * thread).
 *
 * Ranking. Each facilitator keeps an EWMA of the latency of its answers and
 * an EWMA of its failure rate; its score is latency_ms + failure_rate x
 * timeout_ms. A facilitator whose last request or probe failed is "down": it
 * ranks behind every facilitator that is up (down ones by their score too),
 * and is probed again after 500 ms doubling per failure up to
 * probe_interval_ms. One whose GET /supported lists kinds that do not
 * include the call's (x402Version or t402Version, paymentRequirements.scheme,
 * .network, read from the body) ranks behind all that list it or said
 * nothing (versions compare as numbers: x402Version 2 and t402Version 2 are
 * one kind). Ties keep the configured order. A call tries the facilitators in
 * rank order (ranked again at each attempt), each once per round.
 *
 * Probes: GET <url>/supported at creation and every probe_interval_ms (down
 * ones sooner, as above). A 2xx {"kinds":[...]} stores the kinds (up to
 * TG_FACIL_MAX_KINDS); any 2xx or 4xx answer marks the facilitator up
 * (reachable; kinds left unknown when the answer has none); a connect
 * failure, timeout, 5xx or 3xx marks it down.
 *
 * Failures and retries. Retryable, on the next facilitator in rank order and,
 * once every facilitator failed in a round, after an exponential backoff
 * (backoff_ms doubling per round up to 1 s, jittered down to half): connect
 * failures, resets, timeouts, 5xx and 429. Final at once: a well-formed
 * isValid:false / success:false (REFUSED, also when it comes with a 4xx), any
 * other 4xx and any 3xx (redirects are never followed: an upstream bug once
 * let a 308 serve everything free), a reply that is not JSON or lacks the
 * fields (BAD_REPLY: a broken facilitator, not a busy one; it is also marked
 * down). A response tg_httpc cannot read at all (-EPROTO: bad HTTP or TLS,
 * -EFBIG) is retried like a connect failure. Attempts stop at max_attempts or
 * when the call's deadline would pass; the call then ends with the last
 * failure as reason, UNAVAILABLE (BAD_REPLY when that was -EPROTO/-EFBIG).
 *
 * Settle is never cached. It IS retried as above, also after a timeout or 5xx
 * when the facilitator may have received it: a /settle of the same EIP-3009
 * authorization cannot pay twice (the token contract burns the nonce), so a
 * repeat either settles or is refused. Because such a refusal may follow an
 * earlier attempt that did settle, a settle refused after an attempt whose
 * outcome is unknown ends UNAVAILABLE with maybe_settled set, never REFUSED:
 * REFUSED always means "not paid". maybe_settled is also set on a settle that
 * ends UNAVAILABLE after such an attempt, or canceled while in flight. (A
 * connect refusal or name failure was never sent; a 429 was not processed.)
 *
 * Verify is bounded: at most max_verifying verifications hold a slot (from
 * their first attempt to their answer); more wait in FIFO order up to
 * verify_wait_ms and then end BUSY. Cache hits take no slot. Settles are not
 * bounded here (the httpc queue bounds them).
 *
 * Cache: keyed by the 32 bytes the caller passes (SHA-256 of the payment
 * payload), only isValid:true answers, for cache_ttl_ms, at most
 * cache_entries (the oldest goes first). A cached answer does not re-check the
 * authorization's time window or nonce: the caller checks validBefore and
 * claims the nonce (pay/nonce.h) as it would after a fresh verification.
 *
 * Metrics (declared by tg_facil_pool_new):
 *   t402_verification_duration_seconds{network,scheme,status} histogram,
 *     status valid|invalid|error|cached (error: busy, unavailable, bad reply)
 *   t402_settlement_duration_seconds{network,scheme,status} histogram,
 *     status settled|refused|pending|error
 *   t402_facilitator_errors_total{tenant_id,facilitator,kind} counter, kind
 *     connect|timeout|status_5xx|status_4xx|redirect|bad_reply (429 counts
 *     as status_4xx); probes count too
 *   t402_facilitator_latency_seconds{facilitator} histogram of answered
 *     verify and settle requests
 * The facilitator label is the URL's origin (scheme://host[:port]): never its
 * path or query, which may carry a key. */

#define TG_FACIL_MAX 8        /* facilitators per pool */
#define TG_FACIL_MAX_KINDS 32 /* kinds kept per facilitator from /supported */

typedef struct tg_facil_pool tg_facil_pool_t;

/* NULL options take every default. Otherwise each field is taken as given,
 * except where "0: default" is said. */
typedef struct tg_facil_opts {
  uint32_t timeout_ms;        /* one HTTP request (verify, settle, probe); 0: 5000 */
  uint32_t deadline_ms;       /* a whole call: waiting, attempts, backoff; 0: 2 x timeout_ms */
  uint32_t max_verifying;     /* verifications holding a slot; 0: 256 */
  uint32_t verify_wait_ms;    /* wait for a slot, then BUSY; 0: BUSY at once when full */
  uint32_t cache_ttl_ms;      /* 0: no cache */
  uint32_t cache_entries;     /* 0: 4096 */
  uint32_t probe_interval_ms; /* 0: 30000 */
  uint32_t max_attempts;      /* HTTP attempts per call; 0: number of facilitators + 2 */
  uint32_t backoff_ms;        /* first backoff between rounds; 0: 50 */
} tg_facil_opts_t;

/* Makes a pool and starts probing. tenant (the metrics' tenant_id) and urls
 * (1..TG_FACIL_MAX base URLs, http:// or https://, such as
 * "http://127.0.0.1:4021" or "https://x402.org/facilitator"; a trailing '/'
 * is dropped; no query or fragment) are copied. http must outlive the pool:
 * free the pool first. (Should http be freed first while a request of the
 * pool is in flight, the pool sees -ECANCELED, ends its calls UNAVAILABLE
 * and never uses http again; with nothing in flight it cannot notice.)
 * NULL on a bad argument or out of memory. */
tg_facil_pool_t *tg_facil_pool_new(uv_loop_t *loop, tg_httpc_t *http, const char *tenant,
                                   const char *const *urls, size_t n, const tg_facil_opts_t *o);

/* Every callback not yet run runs before this returns: with its result when
 * it was known already, else UNAVAILABLE "canceled". Requests still in
 * tg_httpc finish there unseen. Calls made from those callbacks return
 * -ECANCELED. May be called from a callback of the pool. Memory is released
 * by a close callback: run the loop before uv_loop_close. NULL is a no-op. */
void tg_facil_pool_free(tg_facil_pool_t *p);

typedef enum {
  TG_FACIL_OK = 0,      /* verify: isValid true; settle: success true (transaction set) */
  TG_FACIL_REFUSED,     /* isValid false / success false: reason says why */
  TG_FACIL_PENDING,     /* settle: submitted, not final (transaction set when given) */
  TG_FACIL_UNAVAILABLE, /* every facilitator down or timed out, deadline, canceled */
  TG_FACIL_BAD_REPLY,   /* garbage, missing fields, redirect, unexpected 4xx: a 502 */
  TG_FACIL_BUSY,        /* over max_verifying after verify_wait_ms: T402-2006 */
} tg_facil_status_t;

/* "ok", "refused", "pending", "unavailable", "bad_reply", "busy". */
const char *tg_facil_status_name(tg_facil_status_t s);

typedef struct tg_facil_result {
  tg_facil_status_t status;
  char reason[128];        /* invalidReason / errorReason, or our own words; printable ASCII
                              (other bytes become '?'), truncated */
  char payer[43];          /* "0x" + 40 hex as the facilitator wrote it, or "" */
  char transaction[80];    /* settle: "0x" + 64 hex, or "" */
  char network[48];        /* settle: as the facilitator wrote it (printable), or "" */
  const char *facilitator; /* base URL that answered (the pool's copy), or NULL */
  bool cached;             /* verify answered from the cache */
  bool maybe_settled;      /* settle UNAVAILABLE: an attempt may have settled */
  int http_status;         /* status of the last answer, 0 when none */
  uint32_t attempts;       /* HTTP attempts made by this call */
} tg_facil_result_t;

/* r and its strings live only during the call. */
typedef void (*tg_facil_cb)(const tg_facil_result_t *r, void *ud);

/* Verifies: body is the facilitator request (tg_x402_facilitator_body), len
 * bytes, copied. key (32 bytes, copied; NULL: no cache) is the cache key.
 * Returns 0 and cb(result, ud) runs exactly once, never inside this call
 * (a cache hit or BUSY arrives on a later loop turn); or -EINVAL (NULL p,
 * body or cb, len 0), -ECANCELED (the pool is being freed), -ENOMEM, and cb
 * never runs. ud must stay valid until cb runs. */
int tg_facil_verify(tg_facil_pool_t *p, const uint8_t key[32], const char *body, size_t len,
                    tg_facil_cb cb, void *ud);

/* Settles: as tg_facil_verify without cache and bound. */
int tg_facil_settle(tg_facil_pool_t *p, const char *body, size_t len, tg_facil_cb cb, void *ud);

/* A W3C traceparent (copied; NULL or longer than 55 bytes: none) that the
 * next tg_facil_verify or tg_facil_settle on this pool sends with each of
 * its attempts; it applies to that one call only. Loop thread only. */
void tg_facil_set_traceparent(tg_facil_pool_t *p, const char *traceparent);

/* The base URLs in current rank order for a call of no known kind, into
 * urls (the pool's copies, valid while it lives); returns how many (at most
 * n). For tests and the admin API. */
size_t tg_facil_pool_rank(const tg_facil_pool_t *p, const char **urls, size_t n);

/* 1 when the facilitator at index i (configuration order) listed
 * (version, scheme, network) in its last /supported, 0 when it listed other
 * kinds only, -1 when not known (no answer yet, no kinds, bad index). */
int tg_facil_pool_supports(const tg_facil_pool_t *p, size_t i, int version, const char *scheme,
                           const char *network);

/* Parsers of a facilitator's answer body (len bytes, need not be
 * NUL-terminated). out is always filled: zeroed first, then status and the
 * fields. Return 0 with status OK, REFUSED or PENDING; or -EBADMSG with
 * status BAD_REPLY and reason saying what is wrong; -EINVAL for NULL out
 * (or NULL body with len > 0).
 *
 * verify: a JSON object with boolean isValid; invalidReason (string) when
 *   present becomes reason; payer when present and not null must be a string
 *   "0x" + 40 hex digits.
 * settle: a JSON object with boolean success; payer as above; network when
 *   present must be a string (printable, kept truncated); transaction when
 *   success is true must be "0x" + 64 hex digits (when false it is kept only
 *   if it has that form); errorReason becomes reason. errorReason
 *   "settlement_pending", or a "status" of "pending", is PENDING (a
 *   transaction, when given and not "", must have the form above). */
int tg_facil_parse_verify(const char *body, size_t len, tg_facil_result_t *out);
int tg_facil_parse_settle(const char *body, size_t len, tg_facil_result_t *out);

#endif
