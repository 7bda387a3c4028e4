#ifndef TG_X402_H
#define TG_X402_H

/* The HTTP 402 wire of x402 (versions 1 and 2) and t402 (PROTOCOLS.md section
 * 2): the challenge a priced route answers with, the payment a client sends
 * back (decoded strictly, matched against what was offered, and checked
 * locally for the "exact" EVM scheme), the facilitator request bodies, the
 * settlement response header, and t402's error codes.
 *
 * Everything here is a pure function on caller memory: any thread, no
 * global state but libsecp256k1's context (pay/eip3009.h). JSON that leaves
 * is compact and ASCII-only (non-ASCII as \uXXXX: the t402 client decodes
 * with atob), keys in the order shown. Base64 is the standard alphabet with
 * padding, both ways.
 *
 * Codes: functions that judge a client's payment return 0 or a t402 code
 * (1001 InvalidRequest ... 3005 PaymentMismatch, see tg_t402_code_name);
 * functions that build return 0 or a negative errno. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "pay/eip3009.h"
#include "pay/payconf.h"

#define TG_X402_MAX_HEADER 8192 /* bytes of a PAYMENT-SIGNATURE / X-PAYMENT value */

/* t402 codes (PROTOCOLS.md). */
enum {
  TG_T402_INVALID_REQUEST = 1001,
  TG_T402_MISSING_PAYLOAD = 1002,
  TG_T402_MISSING_REQUIREMENTS = 1003,
  TG_T402_INVALID_PAYLOAD = 1004,
  TG_T402_INVALID_REQUIREMENTS = 1005,
  TG_T402_INVALID_SIGNATURE = 1006,
  TG_T402_INVALID_NETWORK = 1007,
  TG_T402_INVALID_SCHEME = 1008,
  TG_T402_INVALID_AMOUNT = 1009,
  TG_T402_INVALID_ADDRESS = 1010,
  TG_T402_EXPIRED_PAYMENT = 1011,
  TG_T402_INVALID_NONCE = 1012,
  TG_T402_INTERNAL = 2001,
  TG_T402_DATABASE_UNAVAILABLE = 2002,
  TG_T402_CACHE_UNAVAILABLE = 2003,
  TG_T402_RPC_UNAVAILABLE = 2004,
  TG_T402_RATE_LIMITED = 2005,
  TG_T402_SERVICE_UNAVAILABLE = 2006,
  TG_T402_VERIFICATION_FAILED = 3001,
  TG_T402_SETTLEMENT_FAILED = 3002,
  TG_T402_INSUFFICIENT_BALANCE = 3003,
  TG_T402_ALLOWANCE_INSUFFICIENT = 3004,
  TG_T402_PAYMENT_MISMATCH = 3005,
  TG_T402_DUPLICATE_PAYMENT = 3006,
  TG_T402_SETTLEMENT_PENDING = 3007,
  TG_T402_SETTLEMENT_TIMEOUT = 3008,
  TG_T402_CHAIN_UNAVAILABLE = 4001,
  TG_T402_TRANSACTION_FAILED = 4002,
  TG_T402_TRANSACTION_REVERTED = 4003,
  TG_T402_GAS_ESTIMATION_FAILED = 4004,
  TG_T402_NONCE_CONFLICT = 4005,
  TG_T402_CHAIN_CONGESTED = 4006,
  TG_T402_CONTRACT_ERROR = 4007,
};

/* ---- the challenge ---- */

/* One requirement offered: the asset (borrowed for the call) and its amount
 * (decimal atomic units, from tg_pay_amount). */
typedef struct tg_x402_offer {
  const tg_pay_accept_t *accept;
  char amount[80];
} tg_x402_offer_t;

/* The resource: url required (absolute URL of the request), the others may
 * be NULL. UTF-8; ill-formed bytes are replaced by U+FFFD. */
typedef struct tg_x402_resource {
  const char *url, *description, *mime_type;
} tg_x402_resource_t;

/* What a 402 answer carries; immutable once built, so one may be cached and
 * read by several threads at once (jansson's reference counts are atomic,
 * but never json_incref/json_decref these from two threads at once without
 * thinking: readers only borrow). */
typedef struct tg_x402_challenge {
  char *header; /* PAYMENT-REQUIRED value: base64 of the v2 PaymentRequired, NUL-terminated */
  size_t header_len;
  char *body_v1; /* the 402 body: the v1 PaymentRequired JSON (accepts only offers with network_v1) */
  size_t body_v1_len;
  json_t *accepts_v2, *accepts_v1;     /* the offered requirements: v2 one per offer; v1 a subset */
  size_t n;                            /* offers (= size of accepts_v2) */
  size_t v1_offer[TG_PAY_MAX_ACCEPTS]; /* accepts_v1[j] is offer v1_offer[j] */
  size_t n_v1;
} tg_x402_challenge_t;

/* Builds the challenge for n offers (1..TG_PAY_MAX_ACCEPTS) into out:
 *   v2: {"x402Version":2,"t402Version":2,"error":E,"resource":{"url","description"?,"mimeType"?},
 *        "accepts":[{"scheme":"exact","network","amount","asset","payTo","maxTimeoutSeconds",
 *                    "extra":{"name","version"}}]}      (both version fields: x402 and t402 clients read it)
 *   v1: {"x402Version":1,"error":E,"accepts":[{"scheme":"exact","network":<network_v1>,"maxAmountRequired",
 *        "resource","description","mimeType","payTo","maxTimeoutSeconds","asset","extra"}]}
 * error may be NULL (then no "error" key). Returns 0, -EINVAL (bad
 * arguments: no url, n out of range, an offer without accept or amount) or
 * -ENOMEM; out is zeroed on failure. Free with tg_x402_challenge_free. */
int tg_x402_challenge_build(const tg_x402_resource_t *r, const tg_x402_offer_t *o, size_t n, const char *error,
                            tg_x402_challenge_t *out);
void tg_x402_challenge_free(tg_x402_challenge_t *c);

/* The amount offered with offer index (borrowed from c), or NULL. */
const char *tg_x402_challenge_amount(const tg_x402_challenge_t *c, size_t index);

/* ---- the payment ---- */

typedef struct tg_x402_payment {
  int version;      /* 1 or 2 */
  bool t402;        /* the payload carried t402Version (always 2) */
  json_t *root;     /* the decoded PaymentPayload (owned) */
  json_t *accepted; /* v2: root's "accepted" (borrowed from root); v1: NULL */
  char scheme[16];  /* "exact" */
  char network[48]; /* v2: CAIP-2 from accepted; v1: the name */
  tg_eip3009_auth_t auth;
  uint8_t sig[65];
  char payer[43];   /* auth.from in EIP-55 form */
  uint8_t hash[32]; /* SHA-256 of the decoded JSON bytes: a key for caches */
} tg_x402_payment_t;

/* Decodes a payment header value (len bytes, need not be NUL-terminated):
 * v1_header true for X-PAYMENT (version 1 payloads), false for
 * PAYMENT-SIGNATURE (version 2, x402 or t402). Strict: at most
 * TG_X402_MAX_HEADER bytes; standard base64 with padding, nothing else (no
 * white space, no URL alphabet, unused bits zero); a JSON object of
 * well-formed UTF-8 without duplicate keys; exactly one of x402Version (1 or
 * 2) and t402Version (2), integers, and the one the header is for; scheme
 * "exact"; payload.signature and payload.authorization.{from, to, value,
 * validAfter, validBefore, nonce} in their strict forms (pay/eip3009.h).
 * Returns 0 with out filled (free with tg_x402_payment_free), or a code with
 * err saying why and out zeroed:
 *   1002 no value (NULL or empty);
 *   1001 too long, not base64, not JSON, not an object, versions wrong, or
 *        the version of the other header;
 *   1004 accepted/payload/authorization missing or malformed, a field that
 *        does not parse;
 *   1008 scheme other than "exact";
 *   1007 network malformed (v2 not "eip155:<id>", v1 not [a-z0-9-]{1,31}). */
int tg_x402_payment_decode(const char *value, size_t len, bool v1_header, tg_x402_payment_t *out, char *err,
                           size_t errlen);
/* Frees root and zeroes p; safe on a zeroed struct and NULL. */
void tg_x402_payment_free(tg_x402_payment_t *p);

/* Which offer of c the payment takes, into *index (an offer index, 0..c->n-1).
 * v2: accepted equals one of accepts_v2 (json_equal, extra included; JSON
 * integers stay integers). v1: an entry of accepts_v1 with the payment's
 * scheme and network (preferring one whose payTo is the authorization's to
 * and whose amount is its value, when several assets share a network).
 * Returns 0, 3005 (PaymentMismatch) or -EINVAL (NULL arguments). */
int tg_x402_payment_match(const tg_x402_payment_t *p, const tg_x402_challenge_t *c, size_t *index);

/* Local verification of a matched payment against offer a with amount
 * (decimal atomic units) at now_s (unix seconds), in the order a
 * facilitator reports: network (1007), to == payTo (1010), validBefore >=
 * now + 6 and validAfter <= now (1011), value == amount for x402, >= amount
 * for t402 (1009), then the signature by from over a's EIP-712 domain
 * (1006; checked last, it is the costly one). Balance and nonce use are the
 * chain's (pay/chain.h). Returns 0 or the code, also stored in *code when
 * code is not NULL; -EINVAL for NULL arguments or an amount that is not a
 * uint256. */
int tg_x402_check_local(const tg_x402_payment_t *p, const tg_pay_accept_t *a, const char *amount, int64_t now_s,
                        int *code);

/* The body of a facilitator POST /verify or /settle:
 *   {"x402Version":V | "t402Version":2, "paymentPayload":<root>, "paymentRequirements":<offered>}
 * offered is the v1 or v2 form of offer index, as the payment's version.
 * Malloc'd (free()), NUL-terminated, length in *len; NULL when index is not
 * an offer of that version or out of memory. */
char *tg_x402_facilitator_body(const tg_x402_payment_t *p, const tg_x402_challenge_t *c, size_t index, size_t *len);

/* PAYMENT-RESPONSE / X-PAYMENT-RESPONSE value: base64 of
 * {"success":b,"transaction":tx,"network":network,"payer"?:..,"errorReason"?:..}
 * (tx and network "" when NULL; payer and error_reason left out when NULL).
 * Malloc'd (free()), or NULL when out of memory. */
char *tg_x402_settle_header(bool success, const char *tx, const char *network, const char *payer,
                            const char *error_reason);

/* ---- t402 errors ---- */

/* HTTP status of a code: 1xxx 400, 2005 429, other 2xxx 500, 3001/3005 422,
 * other 3xxx 500, 4xxx 502; 500 for anything else. */
int tg_t402_status(int code);

/* {"code":"T402-NNNN","message":..,"details"?:..}: details is stolen (may be
 * NULL), message NULL gives the code's name. Malloc'd (free()), length in
 * *len (may be NULL); NULL when out of memory. */
char *tg_t402_error_body(int code, const char *message, json_t *details, size_t *len);

/* "InvalidSignature" for 1006 ...; "Unknown" for a code not in the list. */
const char *tg_t402_code_name(int code);

#endif
