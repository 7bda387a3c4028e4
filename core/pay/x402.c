#include "pay/x402.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/sha256.h>
#include <mbedtls/version.h>

#include "base/b64.h"
#include "base/utf8.h"

#define DUMP_FLAGS (JSON_COMPACT | JSON_ENSURE_ASCII | JSON_PRESERVE_ORDER)

static int say(char *err, size_t errlen, int code, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static int say(char *err, size_t errlen, int code, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return code;
}

/* Sets k to v (stolen); v NULL (a failed allocation) is an error too. */
static int set(json_t *o, const char *k, json_t *v) { return v == NULL ? -1 : json_object_set_new(o, k, v); }

static json_t *text(const char *s) { return tg_utf8_json_string(s); }

/* JSON text (compact, ASCII) of v, or NULL. */
static char *dump(const json_t *v, size_t *len) {
  char *s = json_dumps(v, DUMP_FLAGS);
  if (s != NULL && len != NULL)
    *len = strlen(s);
  return s;
}

/* Standard base64 with padding of n bytes, malloc'd. */
static char *b64(const char *in, size_t n, size_t *len) {
  size_t need = tg_b64_len(n, 1) + 1;
  char *out = malloc(need);
  if (out == NULL)
    return NULL;
  if (tg_b64_encode((const uint8_t *)in, n, 0, 1, out, need) != 0) {
    free(out);
    return NULL;
  }
  if (len != NULL)
    *len = need - 1;
  return out;
}

/* ---- challenge ---- */

static json_t *extra(const tg_pay_accept_t *a) {
  json_t *e = json_object();
  if (e == NULL || set(e, "name", text(a->name)) != 0 || set(e, "version", text(a->version)) != 0) {
    json_decref(e);
    return NULL;
  }
  return e;
}

static json_t *requirement_v2(const tg_x402_offer_t *o) {
  const tg_pay_accept_t *a = o->accept;
  json_t *r = json_object();
  if (r == NULL || set(r, "scheme", json_string("exact")) || set(r, "network", text(a->network)) ||
      set(r, "amount", text(o->amount)) || set(r, "asset", text(a->asset_hex)) ||
      set(r, "payTo", text(a->pay_to_hex)) || set(r, "maxTimeoutSeconds", json_integer(a->max_timeout_s)) ||
      set(r, "extra", extra(a))) {
    json_decref(r);
    return NULL;
  }
  return r;
}

static json_t *requirement_v1(const tg_x402_resource_t *res, const tg_x402_offer_t *o) {
  const tg_pay_accept_t *a = o->accept;
  json_t *r = json_object();
  /* v1 clients' schema requires description and mimeType strings. */
  if (r == NULL || set(r, "scheme", json_string("exact")) || set(r, "network", text(a->network_v1)) ||
      set(r, "maxAmountRequired", text(o->amount)) || set(r, "resource", text(res->url)) ||
      set(r, "description", text(res->description ? res->description : "")) ||
      set(r, "mimeType", text(res->mime_type ? res->mime_type : "")) || set(r, "payTo", text(a->pay_to_hex)) ||
      set(r, "maxTimeoutSeconds", json_integer(a->max_timeout_s)) || set(r, "asset", text(a->asset_hex)) ||
      set(r, "extra", extra(a))) {
    json_decref(r);
    return NULL;
  }
  return r;
}

void tg_x402_challenge_free(tg_x402_challenge_t *c) {
  if (c == NULL)
    return;
  free(c->header);
  free(c->body_v1);
  json_decref(c->accepts_v2);
  json_decref(c->accepts_v1);
  memset(c, 0, sizeof *c);
}

int tg_x402_challenge_build(const tg_x402_resource_t *r, const tg_x402_offer_t *o, size_t n, const char *error,
                            tg_x402_challenge_t *out) {
  if (out == NULL)
    return -EINVAL;
  memset(out, 0, sizeof *out);
  if (r == NULL || r->url == NULL || o == NULL || n == 0 || n > TG_PAY_MAX_ACCEPTS)
    return -EINVAL;
  for (size_t i = 0; i < n; i++)
    if (o[i].accept == NULL || memchr(o[i].amount, '\0', sizeof o[i].amount) == NULL || o[i].amount[0] == '\0')
      return -EINVAL;
  int rc = -ENOMEM;
  json_t *v2 = NULL, *v1 = NULL, *res = NULL;
  char *json = NULL;
  size_t jlen = 0;
  if ((out->accepts_v2 = json_array()) == NULL || (out->accepts_v1 = json_array()) == NULL)
    goto fail;
  for (size_t i = 0; i < n; i++) {
    if (json_array_append_new(out->accepts_v2, requirement_v2(&o[i])) != 0)
      goto fail;
    if (o[i].accept->network_v1[0] != '\0') {
      if (json_array_append_new(out->accepts_v1, requirement_v1(r, &o[i])) != 0)
        goto fail;
      out->v1_offer[out->n_v1++] = i;
    }
  }
  out->n = n;

  if ((res = json_object()) == NULL || set(res, "url", text(r->url)) ||
      (r->description && set(res, "description", text(r->description))) ||
      (r->mime_type && set(res, "mimeType", text(r->mime_type))))
    goto fail;
  if ((v2 = json_object()) == NULL || set(v2, "x402Version", json_integer(2)) ||
      set(v2, "t402Version", json_integer(2)) || (error && set(v2, "error", text(error))) ||
      json_object_set(v2, "resource", res) || json_object_set(v2, "accepts", out->accepts_v2))
    goto fail;
  if ((json = dump(v2, &jlen)) == NULL || (out->header = b64(json, jlen, &out->header_len)) == NULL)
    goto fail;

  if ((v1 = json_object()) == NULL || set(v1, "x402Version", json_integer(1)) ||
      (error && set(v1, "error", text(error))) || json_object_set(v1, "accepts", out->accepts_v1))
    goto fail;
  if ((out->body_v1 = dump(v1, &out->body_v1_len)) == NULL)
    goto fail;
  rc = 0;
  goto done;
fail:
  tg_x402_challenge_free(out);
done:
  json_decref(res);
  free(json);
  json_decref(v2);
  json_decref(v1);
  return rc;
}

const char *tg_x402_challenge_amount(const tg_x402_challenge_t *c, size_t index) {
  if (c == NULL || index >= c->n)
    return NULL;
  return json_string_value(json_object_get(json_array_get(c->accepts_v2, index), "amount"));
}

/* ---- payment ---- */

/* Standard base64, padded, one spelling; decoded into a malloc'd buffer. */
static int unb64(const char *s, size_t n, unsigned char **out, size_t *olen, char *err, size_t errlen) {
  size_t bad = 0;
  if ((*out = malloc(n / 4 * 3 + 1)) == NULL)
    return say(err, errlen, -ENOMEM, "out of memory");
  int rc = tg_b64_decode(s, n, 0, 1, *out, n / 4 * 3 + 1, olen, &bad);
  if (rc == 0)
    return 0;
  free(*out);
  *out = NULL;
  if (rc == -EDOM)
    return say(err, errlen, -EINVAL, "not base64: %zu characters is not a multiple of 4 (padding is required)", n);
  if (rc == -EBADMSG)
    return say(err, errlen, -EINVAL, "not base64: the unused bits of the last character are not zero");
  return say(err, errlen, -EINVAL, "not base64: byte 0x%02x at %zu (standard alphabet, no white space)",
             (unsigned char)s[bad], bad);
}

/* An integer member k of o: 1 when present and an integer (value in *v), 0
 * absent, -1 present but not an integer. */
static int int_member(const json_t *o, const char *k, json_int_t *v) {
  json_t *x = json_object_get(o, k);
  if (x == NULL)
    return 0;
  if (!json_is_integer(x))
    return -1;
  *v = json_integer_value(x);
  return 1;
}

static const char *str_member(const json_t *o, const char *k) { return json_string_value(json_object_get(o, k)); }

static int versions(const json_t *root, bool v1_header, tg_x402_payment_t *p, char *err, size_t errlen) {
  json_int_t xv = 0, tv = 0;
  int hx = int_member(root, "x402Version", &xv), ht = int_member(root, "t402Version", &tv);
  if (hx < 0 || ht < 0)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "%s is not an integer", hx < 0 ? "x402Version" : "t402Version");
  if (hx && ht)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "both x402Version and t402Version: a payload carries one");
  if (!hx && !ht)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "no x402Version or t402Version");
  if (hx && xv != 1 && xv != 2)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "x402Version %lld: 1 or 2 is spoken here", (long long)xv);
  if (ht && tv != 2)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "t402Version %lld: 2 is spoken here", (long long)tv);
  p->version = hx ? (int)xv : 2;
  p->t402 = ht != 0;
  if (v1_header && p->version != 1)
    return say(err, errlen, TG_T402_INVALID_REQUEST,
               "X-PAYMENT carries version 1 payloads; a version 2 payload goes in PAYMENT-SIGNATURE");
  if (!v1_header && p->version != 2)
    return say(err, errlen, TG_T402_INVALID_REQUEST,
               "PAYMENT-SIGNATURE carries version 2 payloads; a version 1 payload goes in X-PAYMENT");
  return 0;
}

static bool v1_name(const char *s) {
  size_t n = strlen(s);
  return n >= 1 && n <= 31 && strspn(s, "abcdefghijklmnopqrstuvwxyz0123456789-") == n;
}

static int fields(const json_t *root, tg_x402_payment_t *p, char *err, size_t errlen) {
  const json_t *from = root;
  if (p->version == 2) {
    p->accepted = json_object_get(root, "accepted");
    if (!json_is_object(p->accepted))
      return say(err, errlen, TG_T402_INVALID_PAYLOAD, "accepted: %s", p->accepted ? "not an object" : "missing");
    from = p->accepted;
  }
  const char *where = p->version == 2 ? "accepted." : "";
  const char *scheme = str_member(from, "scheme"), *network = str_member(from, "network");
  if (scheme == NULL)
    return say(err, errlen, TG_T402_INVALID_PAYLOAD, "%sscheme: missing or not a string", where);
  if (strcmp(scheme, "exact") != 0)
    return say(err, errlen, TG_T402_INVALID_SCHEME, "%sscheme: '%.32s' is not offered (\"exact\" is)", where, scheme);
  memcpy(p->scheme, "exact", sizeof "exact");
  if (network == NULL)
    return say(err, errlen, TG_T402_INVALID_PAYLOAD, "%snetwork: missing or not a string", where);
  uint64_t chain;
  bool ok = p->version == 2 ? tg_pay_parse_caip2(network, &chain) == 0 : v1_name(network);
  if (!ok)
    return say(err, errlen, TG_T402_INVALID_NETWORK, "%snetwork: '%.64s' is not %s", where, network,
               p->version == 2 ? "\"eip155:<chain id>\"" : "a version 1 network name");
  snprintf(p->network, sizeof p->network, "%s", network); /* fits: checked above */

  const json_t *payload = json_object_get(root, "payload");
  if (!json_is_object(payload))
    return say(err, errlen, TG_T402_INVALID_PAYLOAD, "payload: %s", payload ? "not an object" : "missing");
  const json_t *auth = json_object_get(payload, "authorization");
  if (!json_is_object(auth))
    return say(err, errlen, TG_T402_INVALID_PAYLOAD, "payload.authorization: %s", auth ? "not an object" : "missing");
  if (tg_eip3009_parse_signature(str_member(payload, "signature"), p->sig) != 0)
    return say(err, errlen, TG_T402_INVALID_PAYLOAD, "payload.signature: missing or not 0x + 130 hex digits (r, s, v)");
  static const struct {
    const char *name;
    int kind; /* 0 address, 1 uint256, 2 bytes32 */
    size_t off;
  } f[] = {
      {"from", 0, offsetof(tg_eip3009_auth_t, from)},
      {"to", 0, offsetof(tg_eip3009_auth_t, to)},
      {"value", 1, offsetof(tg_eip3009_auth_t, value)},
      {"validAfter", 1, offsetof(tg_eip3009_auth_t, valid_after)},
      {"validBefore", 1, offsetof(tg_eip3009_auth_t, valid_before)},
      {"nonce", 2, offsetof(tg_eip3009_auth_t, nonce)},
  };
  static const char *const forms[] = {"an address (0x + 40 hex digits, EIP-55 when mixed case)",
                                      "a decimal string (uint256)", "0x + 64 hex digits"};
  for (size_t i = 0; i < sizeof f / sizeof f[0]; i++) {
    const char *v = str_member(auth, f[i].name);
    uint8_t *dst = (uint8_t *)&p->auth + f[i].off;
    int rc = f[i].kind == 0   ? tg_eip3009_parse_address(v, dst)
             : f[i].kind == 1 ? tg_eip3009_parse_uint256(v, dst)
                              : tg_eip3009_parse_bytes32(v, dst);
    if (rc != 0)
      return say(err, errlen, TG_T402_INVALID_PAYLOAD, "payload.authorization.%s: %s", f[i].name,
                 v == NULL ? "missing or not a string" : forms[f[i].kind]);
  }
  tg_eip3009_format_address(p->auth.from, p->payer);
  return 0;
}

int tg_x402_payment_decode(const char *value, size_t len, bool v1_header, tg_x402_payment_t *out, char *err,
                           size_t errlen) {
  const char *hname = v1_header ? "X-PAYMENT" : "PAYMENT-SIGNATURE";
  if (out == NULL)
    return say(err, errlen, TG_T402_INTERNAL, "no output");
  memset(out, 0, sizeof *out);
  if (err != NULL && errlen > 0)
    err[0] = '\0';
  if (value == NULL || len == 0)
    return say(err, errlen, TG_T402_MISSING_PAYLOAD, "no %s value", hname);
  if (len > TG_X402_MAX_HEADER)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "%s: %zu bytes, more than %d", hname, len, TG_X402_MAX_HEADER);
  unsigned char *raw = NULL;
  size_t rawlen = 0;
  char why[160];
  int rc = unb64(value, len, &raw, &rawlen, why, sizeof why);
  if (rc == -ENOMEM)
    return say(err, errlen, TG_T402_INTERNAL, "%s: out of memory", hname);
  if (rc != 0)
    return say(err, errlen, TG_T402_INVALID_REQUEST, "%s: %s", hname, why);
  json_error_t jerr;
  json_t *root = json_loadb((const char *)raw, rawlen, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL) {
    free(raw);
    return say(err, errlen, TG_T402_INVALID_REQUEST, "%s: not JSON: %s at byte %d", hname, jerr.text, jerr.position);
  }
  if (!json_is_object(root)) {
    free(raw);
    json_decref(root);
    return say(err, errlen, TG_T402_INVALID_REQUEST, "%s: the JSON is not an object", hname);
  }
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
  mbedtls_sha256(raw, rawlen, out->hash, 0);
#else
  mbedtls_sha256_ret(raw, rawlen, out->hash, 0);
#endif
  free(raw);
  out->root = root;
  if ((rc = versions(root, v1_header, out, err, errlen)) != 0 || (rc = fields(root, out, err, errlen)) != 0) {
    tg_x402_payment_free(out);
    return rc;
  }
  return 0;
}

void tg_x402_payment_free(tg_x402_payment_t *p) {
  if (p == NULL)
    return;
  json_decref(p->root);
  memset(p, 0, sizeof *p);
}

/* A decimal string as uint256, or -1. */
static int amount256(const char *s, uint8_t out[32]) { return tg_eip3009_parse_uint256(s, out) == 0 ? 0 : -1; }

int tg_x402_payment_match(const tg_x402_payment_t *p, const tg_x402_challenge_t *c, size_t *index) {
  if (p == NULL || c == NULL || index == NULL || p->root == NULL)
    return -EINVAL;
  if (p->version == 2) {
    for (size_t i = 0; i < c->n; i++)
      if (json_equal(p->accepted, json_array_get(c->accepts_v2, i))) {
        *index = i;
        return 0;
      }
    return TG_T402_PAYMENT_MISMATCH;
  }
  size_t best = SIZE_MAX;
  for (size_t j = 0; j < c->n_v1; j++) {
    const json_t *e = json_array_get(c->accepts_v1, j);
    const char *scheme = str_member(e, "scheme"), *network = str_member(e, "network");
    if (scheme == NULL || network == NULL || strcmp(scheme, p->scheme) != 0 || strcmp(network, p->network) != 0)
      continue;
    uint8_t to[20], amt[32];
    if (tg_eip3009_parse_address(str_member(e, "payTo"), to) == 0 && memcmp(to, p->auth.to, 20) == 0 &&
        amount256(str_member(e, "maxAmountRequired"), amt) == 0 && memcmp(amt, p->auth.value, 32) == 0) {
      best = j;
      break;
    }
    if (best == SIZE_MAX)
      best = j;
  }
  if (best == SIZE_MAX)
    return TG_T402_PAYMENT_MISMATCH;
  *index = c->v1_offer[best];
  return 0;
}

/* v (uint256 big-endian) compared with t: -1, 0, 1. Past 2^63 is "later". */
static int cmp_time(const uint8_t v[32], int64_t t) {
  for (int i = 0; i < 24; i++)
    if (v[i] != 0)
      return 1;
  uint64_t u = 0;
  for (int i = 24; i < 32; i++)
    u = u << 8 | v[i];
  if (u > (uint64_t)INT64_MAX || t < 0)
    return 1;
  return (int64_t)u < t ? -1 : (int64_t)u > t;
}

int tg_x402_check_local(const tg_x402_payment_t *p, const tg_pay_accept_t *a, const char *amount, int64_t now_s,
                        int *code) {
  uint8_t want[32];
  int rc = 0;
  if (p == NULL || a == NULL || amount == NULL || amount256(amount, want) != 0)
    return -EINVAL;
  const char *net = p->version == 1 ? a->network_v1 : a->network;
  if (strcmp(p->network, net) != 0)
    rc = TG_T402_INVALID_NETWORK;
  else if (memcmp(p->auth.to, a->pay_to, 20) != 0)
    rc = TG_T402_INVALID_ADDRESS;
  else if (cmp_time(p->auth.valid_before, now_s > INT64_MAX - 6 ? INT64_MAX : now_s + 6) < 0 ||
           cmp_time(p->auth.valid_after, now_s) > 0)
    rc = TG_T402_EXPIRED_PAYMENT;
  else if (p->t402 ? memcmp(p->auth.value, want, 32) < 0 : memcmp(p->auth.value, want, 32) != 0)
    rc = TG_T402_INVALID_AMOUNT;
  else {
    tg_eip712_domain_t d = {.name = a->name, .version = a->version, .chain_id = a->chain_id};
    memcpy(d.verifying_contract, a->asset, 20);
    if (tg_eip3009_verify(&d, &p->auth, p->sig) != 0)
      rc = TG_T402_INVALID_SIGNATURE;
  }
  if (code != NULL)
    *code = rc;
  return rc;
}

char *tg_x402_facilitator_body(const tg_x402_payment_t *p, const tg_x402_challenge_t *c, size_t index, size_t *len) {
  if (p == NULL || c == NULL || p->root == NULL || index >= c->n)
    return NULL;
  const json_t *req = NULL;
  if (p->version == 2) {
    req = json_array_get(c->accepts_v2, index);
  } else {
    for (size_t j = 0; j < c->n_v1 && req == NULL; j++)
      if (c->v1_offer[j] == index)
        req = json_array_get(c->accepts_v1, j);
  }
  if (req == NULL)
    return NULL;
  json_t *b = json_object();
  char *s = NULL;
  /* A copy: the challenge may be shared by threads, its reference counts untouched. */
  if (b != NULL && set(b, p->t402 ? "t402Version" : "x402Version", json_integer(p->version)) == 0 &&
      set(b, "paymentPayload", json_deep_copy(p->root)) == 0 && set(b, "paymentRequirements", json_deep_copy(req)) == 0)
    s = dump(b, len);
  json_decref(b);
  return s;
}

char *tg_x402_settle_header(bool success, const char *tx, const char *network, const char *payer,
                            const char *error_reason) {
  json_t *o = json_object();
  char *json = NULL, *out = NULL;
  size_t n = 0;
  if (o != NULL && set(o, "success", json_boolean(success)) == 0 && set(o, "transaction", text(tx ? tx : "")) == 0 &&
      set(o, "network", text(network ? network : "")) == 0 && (payer == NULL || set(o, "payer", text(payer)) == 0) &&
      (error_reason == NULL || set(o, "errorReason", text(error_reason)) == 0) && (json = dump(o, &n)) != NULL)
    out = b64(json, n, NULL);
  free(json);
  json_decref(o);
  return out;
}

/* ---- t402 errors ---- */

static const struct {
  int code;
  const char *name;
} names[] = {
    {1001, "InvalidRequest"},
    {1002, "MissingPayload"},
    {1003, "MissingRequirements"},
    {1004, "InvalidPayload"},
    {1005, "InvalidRequirements"},
    {1006, "InvalidSignature"},
    {1007, "InvalidNetwork"},
    {1008, "InvalidScheme"},
    {1009, "InvalidAmount"},
    {1010, "InvalidAddress"},
    {1011, "ExpiredPayment"},
    {1012, "InvalidNonce"},
    {2001, "Internal"},
    {2002, "DatabaseUnavailable"},
    {2003, "CacheUnavailable"},
    {2004, "RPCUnavailable"},
    {2005, "RateLimited"},
    {2006, "ServiceUnavailable"},
    {3001, "VerificationFailed"},
    {3002, "SettlementFailed"},
    {3003, "InsufficientBalance"},
    {3004, "AllowanceInsufficient"},
    {3005, "PaymentMismatch"},
    {3006, "DuplicatePayment"},
    {3007, "SettlementPending"},
    {3008, "SettlementTimeout"},
    {4001, "ChainUnavailable"},
    {4002, "TransactionFailed"},
    {4003, "TransactionReverted"},
    {4004, "GasEstimationFailed"},
    {4005, "NonceConflict"},
    {4006, "ChainCongested"},
    {4007, "ContractError"},
};

const char *tg_t402_code_name(int code) {
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    if (names[i].code == code)
      return names[i].name;
  return "Unknown";
}

int tg_t402_status(int code) {
  if (code >= 1000 && code < 2000)
    return 400;
  if (code == 2005)
    return 429;
  if (code == 3001 || code == 3005)
    return 422;
  if (code >= 4000 && code < 5000)
    return 502;
  return 500;
}

char *tg_t402_error_body(int code, const char *message, json_t *details, size_t *len) {
  char id[24];
  snprintf(id, sizeof id, "T402-%04d", code);
  json_t *o = json_object();
  char *s = NULL;
  if (o != NULL && set(o, "code", json_string(id)) == 0 &&
      set(o, "message", text(message ? message : tg_t402_code_name(code))) == 0) {
    if (details == NULL || json_object_set(o, "details", details) == 0)
      s = dump(o, len);
  }
  json_decref(details);
  json_decref(o);
  return s;
}
