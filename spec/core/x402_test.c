#include "pay/x402.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>

#include <mbedtls/base64.h>
#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include "base/b64.h"
#include "base/hex.h"
#include "test.h"

/* The payer: anvil's account 1 (a well-known test key, never funded anywhere real). */
#define PAYER_KEY "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d"
#define PAYER "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
#define ASSET "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
#define PAY_TO "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
#define ASSET2 "0x5FbDB2315678afecb367f032d93F642f64180aa3"
#define NONCE "0xa5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
#define NOW INT64_C(1767225000)

/* The offers of every test: USDC on Base Sepolia (v1 and v2), a token on a
 * local chain (v2 only). */
static tg_pay_accept_t acc[2];
static tg_x402_offer_t offers[2];
static tg_x402_challenge_t ch;
static char err[512];

static int fixture(void) {
  static bool done;
  if (done)
    return 0;
  memset(acc, 0, sizeof acc);
  tg_pay_accept_t *a = &acc[0];
  strcpy(a->network, "eip155:84532");
  strcpy(a->network_v1, "base-sepolia");
  a->chain_id = 84532;
  strcpy(a->name, "USDC");
  strcpy(a->version, "2");
  strcpy(a->currency, "USD");
  a->decimals = 6;
  a->max_timeout_s = 60;
  if (tg_eip3009_parse_address(ASSET, a->asset) || tg_eip3009_parse_address(PAY_TO, a->pay_to))
    return -1;
  tg_eip3009_format_address(a->asset, a->asset_hex);
  tg_eip3009_format_address(a->pay_to, a->pay_to_hex);
  acc[1] = acc[0];
  a = &acc[1];
  strcpy(a->network, "eip155:31337");
  a->network_v1[0] = '\0';
  a->chain_id = 31337;
  strcpy(a->name, "Test Token");
  strcpy(a->version, "1");
  a->decimals = 18;
  a->max_timeout_s = 300;
  if (tg_eip3009_parse_address(ASSET2, a->asset))
    return -1;
  tg_eip3009_format_address(a->asset, a->asset_hex);
  for (int i = 0; i < 2; i++) {
    offers[i].accept = &acc[i];
    if (tg_pay_amount(&acc[i], 10000, "USD", offers[i].amount) != 0)
      return -1;
  }
  tg_x402_resource_t r = {"https://api.example/data", "Weather", "application/json"};
  if (tg_x402_challenge_build(&r, offers, 2, "PAYMENT-SIGNATURE header is required", &ch) != 0)
    return -1;
  done = true;
  return 0;
}

/* The fields of an authorization, as on the wire. */
typedef struct {
  const char *from, *to, *value, *after, *before, *nonce;
} auth_s;

static auth_s default_auth(void) { return (auth_s){PAYER, PAY_TO, "10000", "0", "1767225600", NONCE}; }

/* Signs as with the payer's key over a's domain: r || s || v, v 27/28. */
static int sign(const auth_s *as, const tg_pay_accept_t *a, char hex[133]) {
  tg_eip3009_auth_t auth;
  tg_eip712_domain_t d = {.name = a->name, .version = a->version, .chain_id = a->chain_id};
  memcpy(d.verifying_contract, a->asset, 20);
  if (tg_eip3009_parse_address(as->from, auth.from) || tg_eip3009_parse_address(as->to, auth.to) ||
      tg_eip3009_parse_uint256(as->value, auth.value) || tg_eip3009_parse_uint256(as->after, auth.valid_after) ||
      tg_eip3009_parse_uint256(as->before, auth.valid_before) || tg_eip3009_parse_bytes32(as->nonce, auth.nonce))
    return -1;
  uint8_t digest[32], key[32], sig[65];
  for (int i = 0; i < 32; i++)
    key[i] = (uint8_t)(tg_hex_value(PAYER_KEY[2 * i]) << 4 | tg_hex_value(PAYER_KEY[2 * i + 1]));
  if (tg_eip3009_digest(&d, &auth, digest) != 0)
    return -1;
  secp256k1_context *ctx = secp256k1_context_create(SECP256K1_CONTEXT_SIGN);
  secp256k1_ecdsa_recoverable_signature rs;
  int recid = 0;
  int ok = ctx && secp256k1_ecdsa_sign_recoverable(ctx, &rs, digest, key, NULL, NULL) &&
           secp256k1_ecdsa_recoverable_signature_serialize_compact(ctx, sig, &recid, &rs);
  if (ctx)
    secp256k1_context_destroy(ctx);
  if (!ok)
    return -1;
  sig[64] = (uint8_t)(27 + recid); /* libsecp256k1 signs with low s already */
  hex[0] = '0', hex[1] = 'x';
  tg_hex_encode(sig, 65, hex + 2);
  return 0;
}

/* A PaymentPayload: version 2 (t402 or x402) echoing accepted, or version 1
 * naming network; signed over a's domain. */
static json_t *payload(int version, bool t402, const json_t *accepted, const char *network, const auth_s *as,
                       const tg_pay_accept_t *a) {
  char sig[133];
  if (sign(as, a, sig) != 0)
    return NULL;
  json_t *auth = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s}", "from", as->from, "to", as->to, "value", as->value,
                           "validAfter", as->after, "validBefore", as->before, "nonce", as->nonce);
  json_t *pl = json_pack("{s:s,s:o}", "signature", sig, "authorization", auth);
  if (version == 1)
    return json_pack("{s:i,s:s,s:s,s:o}", "x402Version", 1, "scheme", "exact", "network", network, "payload", pl);
  return json_pack("{s:i,s:{s:s},s:O,s:o}", t402 ? "t402Version" : "x402Version", 2, "resource", "url",
                   "https://api.example/data", "accepted", accepted, "payload", pl);
}

static char *b64_text(const char *s, size_t n) {
  size_t need = tg_b64_len(n, 1) + 1;
  char *out = malloc(need);
  if (out && tg_b64_encode((const uint8_t *)s, n, 0, 1, out, need) != 0) {
    free(out);
    return NULL;
  }
  return out;
}

/* The header value for root (stolen). */
static char *enc(json_t *root) {
  if (root == NULL)
    return NULL;
  char *s = json_dumps(root, JSON_COMPACT);
  json_decref(root);
  char *h = s ? b64_text(s, strlen(s)) : NULL;
  free(s);
  return h;
}

static int dec(const char *h, bool v1, tg_x402_payment_t *p) {
  err[0] = '\0';
  return tg_x402_payment_decode(h, h ? strlen(h) : 0, v1, p, err, sizeof err);
}

/* Decodes standard base64 into a NUL-terminated malloc'd string. */
static char *unb64(const char *s) {
  size_t n = strlen(s), olen = 0;
  unsigned char *out = malloc(n + 1);
  if (out == NULL || mbedtls_base64_decode(out, n, &olen, (const unsigned char *)s, n) != 0) {
    free(out);
    return NULL;
  }
  out[olen] = '\0';
  return (char *)out;
}

static const json_t *offered(size_t i) { return json_array_get(ch.accepts_v2, i); }

#define V2_JSON                                                                                                        \
  "{\"x402Version\":2,\"t402Version\":2,\"error\":\"PAYMENT-SIGNATURE header is required\",\"resource\":{"             \
  "\"url\":\"https://api.example/data\",\"description\":\"Weather\",\"mimeType\":\"application/json\"},"               \
  "\"accepts\":[{\"scheme\":\"exact\",\"network\":\"eip155:84532\",\"amount\":\"10000\",\"asset\":\"" ASSET            \
  "\",\"payTo\":\"" PAY_TO "\",\"maxTimeoutSeconds\":60,\"extra\":{\"name\":\"USDC\",\"version\":\"2\"}},"             \
  "{\"scheme\":\"exact\",\"network\":\"eip155:31337\",\"amount\":\"10000000000000000\",\"asset\":\"" ASSET2            \
  "\",\"payTo\":\"" PAY_TO "\",\"maxTimeoutSeconds\":300,\"extra\":{\"name\":\"Test Token\",\"version\":\"1\"}}]}"

#define V1_JSON                                                                                                        \
  "{\"x402Version\":1,\"error\":\"PAYMENT-SIGNATURE header is required\",\"accepts\":[{\"scheme\":\"exact\","          \
  "\"network\":\"base-sepolia\",\"maxAmountRequired\":\"10000\",\"resource\":\"https://api.example/data\","            \
  "\"description\":\"Weather\",\"mimeType\":\"application/json\",\"payTo\":\"" PAY_TO                                  \
  "\",\"maxTimeoutSeconds\":60,\"asset\":\"" ASSET "\",\"extra\":{\"name\":\"USDC\",\"version\":\"2\"}}]}"

TEST(challenge_exact_bytes) {
  CHECK_INT(fixture(), 0);
  char *json = unb64(ch.header);
  CHECK(json != NULL);
  int same = strcmp(json, V2_JSON) == 0;
  if (!same)
    fprintf(stderr, "  got %s\n", json);
  free(json);
  CHECK(same);
  char *want = b64_text(V2_JSON, strlen(V2_JSON));
  same = want && strcmp(want, ch.header) == 0 && ch.header_len == strlen(want);
  free(want);
  CHECK(same);
  CHECK_STR(ch.body_v1, V1_JSON);
  CHECK_INT(ch.body_v1_len, strlen(V1_JSON));
  CHECK_INT(ch.n, 2);
  CHECK_INT(ch.n_v1, 1);
  CHECK_INT(ch.v1_offer[0], 0);
  CHECK_STR(tg_x402_challenge_amount(&ch, 1), "10000000000000000");
  CHECK(tg_x402_challenge_amount(&ch, 2) == NULL);
}

TEST(challenge_without_optional_parts) {
  CHECK_INT(fixture(), 0);
  tg_x402_challenge_t c;
  tg_x402_resource_t r = {"https://a.example/x", NULL, NULL};
  CHECK_INT(tg_x402_challenge_build(&r, &offers[1], 1, NULL, &c), 0);
  char *json = unb64(c.header);
  CHECK(json != NULL);
  const char *want =
      "{\"x402Version\":2,\"t402Version\":2,\"resource\":{\"url\":\"https://a.example/x\"},\"accepts\":[";
  int ok = strncmp(json, want, strlen(want)) == 0;
  free(json);
  CHECK(ok);
  CHECK_STR(c.body_v1, "{\"x402Version\":1,\"accepts\":[]}");
  tg_x402_challenge_free(&c);
  CHECK(c.header == NULL && c.accepts_v2 == NULL);
  tg_x402_challenge_free(&c); /* twice: harmless */
  /* Refused arguments. */
  r.url = NULL;
  CHECK_INT(tg_x402_challenge_build(&r, offers, 1, NULL, &c), -EINVAL);
  r.url = "https://a.example/x";
  CHECK_INT(tg_x402_challenge_build(&r, offers, 0, NULL, &c), -EINVAL);
  CHECK_INT(tg_x402_challenge_build(&r, offers, TG_PAY_MAX_ACCEPTS + 1, NULL, &c), -EINVAL);
  tg_x402_offer_t o = {NULL, "1"};
  CHECK_INT(tg_x402_challenge_build(&r, &o, 1, NULL, &c), -EINVAL);
  o.accept = &acc[0];
  o.amount[0] = '\0';
  CHECK_INT(tg_x402_challenge_build(&r, &o, 1, NULL, &c), -EINVAL);
}

TEST(challenge_is_ascii) {
  CHECK_INT(fixture(), 0);
  tg_x402_challenge_t c;
  /* é, a BMP symbol, a non-BMP one, and an ill-formed byte. */
  tg_x402_resource_t r = {"https://a.example/caf\xc3\xa9", "Caf\xc3\xa9 \xe2\x98\x95 \xf0\x9d\x84\x9e \xff",
                          "text/plain"};
  CHECK_INT(tg_x402_challenge_build(&r, offers, 1, "\xc3\xa9rror", &c), 0);
  char *json = unb64(c.header);
  int ascii = json != NULL;
  for (const char *p = json; p && *p; p++)
    ascii &= (unsigned char)*p < 0x80;
  for (const char *p = c.body_v1; *p; p++)
    ascii &= (unsigned char)*p < 0x80;
  int has = json && strstr(json, "\"description\":\"Caf\\u00E9 \\u2615 \\uD834\\uDD1E \\uFFFD\"") != NULL &&
            strstr(json, "\"url\":\"https://a.example/caf\\u00E9\"") != NULL &&
            strstr(json, "\"error\":\"\\u00E9rror\"") != NULL;
  free(json);
  has = has && strstr(c.body_v1, "\"description\":\"Caf\\u00E9 \\u2615 \\uD834\\uDD1E \\uFFFD\"") != NULL;
  tg_x402_challenge_free(&c);
  CHECK(ascii);
  CHECK(has);
}

TEST(v2_round_trip) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  char *h = enc(payload(2, false, offered(0), NULL, &as, &acc[0]));
  CHECK(h != NULL);
  tg_x402_payment_t p;
  int rc = dec(h, false, &p);
  if (rc)
    fprintf(stderr, "  %s\n", err);
  CHECK_INT(rc, 0);
  CHECK_INT(p.version, 2);
  CHECK(!p.t402);
  CHECK_STR(p.scheme, "exact");
  CHECK_STR(p.network, "eip155:84532");
  CHECK_STR(p.payer, PAYER);
  CHECK(p.accepted != NULL && json_equal(p.accepted, offered(0)));
  /* hash: SHA-256 of the JSON bytes, so another spelling of the header is another key. */
  uint8_t zero[32] = {0};
  CHECK(memcmp(p.hash, zero, 32) != 0);
  size_t idx = 99;
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
  CHECK_INT(idx, 0);
  int code = -1;
  CHECK_INT(tg_x402_check_local(&p, &acc[0], tg_x402_challenge_amount(&ch, idx), NOW, &code), 0);
  CHECK_INT(code, 0);
  size_t len = 0;
  char *body = tg_x402_facilitator_body(&p, &ch, idx, &len);
  CHECK(body != NULL);
  CHECK_INT(len, strlen(body));
  json_t *b = json_loads(body, 0, NULL);
  const char *pre = "{\"x402Version\":2,\"paymentPayload\":{\"x402Version\":2,\"resource\":";
  int ok = strncmp(body, pre, strlen(pre)) == 0 && b && json_equal(json_object_get(b, "paymentPayload"), p.root) &&
           json_equal(json_object_get(b, "paymentRequirements"), offered(0)) && json_object_size(b) == 3;
  free(body);
  json_decref(b);
  CHECK(ok);
  CHECK(tg_x402_facilitator_body(&p, &ch, 2, &len) == NULL);
  tg_x402_payment_free(&p);
  CHECK(p.root == NULL);
  tg_x402_payment_free(&p);
  free(h);
}

TEST(second_offer_18_decimals) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  as.value = "10000000000000000";
  char *h = enc(payload(2, false, offered(1), NULL, &as, &acc[1]));
  tg_x402_payment_t p;
  CHECK_INT(dec(h, false, &p), 0);
  free(h);
  size_t idx = 0;
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
  CHECK_INT(idx, 1);
  CHECK_INT(tg_x402_check_local(&p, &acc[1], tg_x402_challenge_amount(&ch, 1), NOW, NULL), 0);
  /* Checked against the other offer: another network. */
  CHECK_INT(tg_x402_check_local(&p, &acc[0], tg_x402_challenge_amount(&ch, 1), NOW, NULL), 1007);
  tg_x402_payment_free(&p);
}

TEST(t402_round_trip_and_value) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  static const struct {
    const char *value;
    int x402, t402;
  } cases[] = {{"10000", 0, 0}, {"10001", 1009, 0}, {"9999", 1009, 1009}, {"0", 1009, 1009}};
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    as.value = cases[i].value;
    for (int t = 0; t < 2; t++) {
      char *h = enc(payload(2, t, offered(0), NULL, &as, &acc[0]));
      tg_x402_payment_t p;
      CHECK_INT(dec(h, false, &p), 0);
      free(h);
      CHECK_INT(p.t402, t);
      size_t idx;
      CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
      int code = -1;
      int rc = tg_x402_check_local(&p, &acc[0], "10000", NOW, &code);
      CHECK_INT(rc, t ? cases[i].t402 : cases[i].x402);
      CHECK_INT(code, rc);
      char *body = tg_x402_facilitator_body(&p, &ch, idx, NULL);
      const char *pre = t ? "{\"t402Version\":2,\"paymentPayload\":{\"t402Version\":2," : "{\"x402Version\":2,";
      int ok = body && strncmp(body, pre, strlen(pre)) == 0;
      free(body);
      tg_x402_payment_free(&p);
      CHECK(ok);
    }
  }
}

TEST(v1_round_trip) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  char *h = enc(payload(1, false, NULL, "base-sepolia", &as, &acc[0]));
  tg_x402_payment_t p;
  CHECK_INT(dec(h, true, &p), 0);
  CHECK_INT(p.version, 1);
  CHECK(p.accepted == NULL);
  CHECK_STR(p.network, "base-sepolia");
  size_t idx = 99;
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
  CHECK_INT(idx, 0);
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "10000", NOW, NULL), 0);
  char *body = tg_x402_facilitator_body(&p, &ch, idx, NULL);
  json_t *b = body ? json_loads(body, 0, NULL) : NULL;
  int ok = b && json_integer_value(json_object_get(b, "x402Version")) == 1 &&
           json_equal(json_object_get(b, "paymentRequirements"), json_array_get(ch.accepts_v1, 0));
  json_decref(b);
  free(body);
  CHECK(ok);
  /* Offer 1 has no v1 form. */
  CHECK(tg_x402_facilitator_body(&p, &ch, 1, NULL) == NULL);
  /* The v1 header only: a v1 payload in PAYMENT-SIGNATURE is refused, naming X-PAYMENT. */
  tg_x402_payment_t q;
  CHECK_INT(dec(h, false, &q), 1001);
  CHECK(strstr(err, "X-PAYMENT") != NULL);
  tg_x402_payment_free(&p);
  free(h);
  /* A network not offered to v1 clients. */
  h = enc(payload(1, false, NULL, "base", &as, &acc[0]));
  CHECK_INT(dec(h, true, &p), 0);
  free(h);
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 3005);
  tg_x402_payment_free(&p);
}

TEST(v2_in_the_v1_header) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  tg_x402_payment_t p;
  for (int t = 0; t < 2; t++) {
    char *h = enc(payload(2, t, offered(0), NULL, &as, &acc[0]));
    int rc = dec(h, true, &p);
    free(h);
    CHECK_INT(rc, 1001);
    CHECK(strstr(err, "PAYMENT-SIGNATURE") != NULL);
    CHECK(p.root == NULL);
  }
}

TEST(missing_and_oversize) {
  tg_x402_payment_t p;
  memset(&p, 0x5a, sizeof p);
  CHECK_INT(tg_x402_payment_decode(NULL, 0, false, &p, err, sizeof err), 1002);
  CHECK(p.root == NULL && p.version == 0);
  CHECK_INT(tg_x402_payment_decode("", 0, true, &p, err, sizeof err), 1002);
  static char big[TG_X402_MAX_HEADER + 5];
  memset(big, 'A', sizeof big - 1);
  CHECK_INT(tg_x402_payment_decode(big, TG_X402_MAX_HEADER + 4, false, &p, err, sizeof err), 1001);
  CHECK(strstr(err, "more than 8192") != NULL);
  /* 8192 bytes is not too long: it fails later, as not JSON. */
  CHECK_INT(tg_x402_payment_decode(big, TG_X402_MAX_HEADER, false, &p, err, sizeof err), 1001);
  CHECK(strstr(err, "not JSON") != NULL);
  /* A valid payment padded out past the limit with a long JSON member. */
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  json_t *root = payload(2, false, offered(0), NULL, &as, &acc[0]);
  char pad[6200];
  memset(pad, 'x', sizeof pad - 1);
  pad[sizeof pad - 1] = '\0';
  json_object_set_new(root, "extensions", json_pack("{s:s}", "pad", pad));
  char *h = enc(root);
  CHECK(h != NULL && strlen(h) > TG_X402_MAX_HEADER);
  CHECK_INT(dec(h, false, &p), 1001);
  free(h);
}

TEST(base64_is_strict) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  char *h = enc(payload(2, false, offered(0), NULL, &as, &acc[0]));
  CHECK(h != NULL);
  tg_x402_payment_t p;
  CHECK_INT(dec(h, false, &p), 0);
  tg_x402_payment_free(&p);
  size_t n = strlen(h);
  char *t = malloc(n + 8);
  CHECK(t != NULL);
  /* The padding: the JSON text of this payload needs some. */
  int pad = (h[n - 1] == '=') + (h[n - 2] == '=');
  CHECK(pad > 0);
  memcpy(t, h, n - (size_t)pad);
  t[n - (size_t)pad] = '\0';
  CHECK_INT(dec(t, false, &p), 1001); /* unpadded */
  memcpy(t, h, n + 1);
  strcat(t, "====");
  CHECK_INT(dec(t, false, &p), 1001); /* over-padded */
  /* White space anywhere. */
  static const char *const ws[] = {" ", "\n", "\r\n", "\t"};
  for (size_t i = 0; i < 4; i++) {
    snprintf(t, n + 8, "%.*s%s%s", 8, h, ws[i], h + 8);
    CHECK_INT(dec(t, false, &p), 1001);
    snprintf(t, n + 8, "%s%s", h, ws[i]);
    CHECK_INT(dec(t, false, &p), 1001);
  }
  /* The URL alphabet, wherever + or / occurs; and a '=' inside. */
  int swapped = 0;
  memcpy(t, h, n + 1);
  for (size_t i = 0; i < n; i++)
    if (t[i] == '+' || t[i] == '/') {
      t[i] = t[i] == '+' ? '-' : '_';
      swapped = 1;
    }
  if (swapped)
    CHECK_INT(dec(t, false, &p), 1001);
  memcpy(t, h, n + 1);
  t[4] = '=';
  CHECK_INT(dec(t, false, &p), 1001);
  free(t);
  free(h);
  /* "{}" is e30=; the same bytes with a non-zero unused bit: e31=. */
  CHECK_INT(dec("e30=", false, &p), 1001);
  CHECK(strstr(err, "x402Version") != NULL); /* it got to the JSON */
  CHECK_INT(dec("e31=", false, &p), 1001);
  CHECK(strstr(err, "unused bits") != NULL);
  CHECK_INT(dec("e30", false, &p), 1001);
  /* A NUL inside the value. */
  CHECK_INT(tg_x402_payment_decode("e30=\0AAA", 8, false, &p, err, sizeof err), 1001);
}

/* JSON text t as a header, decoded with the v2 header. */
static int dec_json(const char *t, bool v1, tg_x402_payment_t *p) {
  char *h = b64_text(t, strlen(t));
  int rc = dec(h, v1, p);
  free(h);
  return rc;
}

TEST(json_refusals) {
  tg_x402_payment_t p;
  static const char *const bad[] = {
      "[]",
      "\"x\"",
      "{",
      "{\"x402Version\":2} x",
      "{\"x402Version\":2,\"x402Version\":2}",
      "{\"x402Version\":2,\"t402Version\":2}",
      "{\"x402Version\":1,\"t402Version\":2}",
      "{}",
      "{\"x402Version\":3}",
      "{\"x402Version\":0}",
      "{\"x402Version\":\"2\"}",
      "{\"x402Version\":2.0}",
      "{\"t402Version\":1}",
      "{\"t402Version\":3}",
      "{\"t402Version\":true}",
      "{\"x402Version\":2,\"s\":\"\xff\"}",
      "{\"x402Version\":2,\"s\":\"\xc0\xaf\"}",
      "{\"x402Version\":2,\"s\":\"a\\u0000b\"}",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = dec_json(bad[i], false, &p);
    if (rc != 1001)
      fprintf(stderr, "  case %zu: %d %s\n", i, rc, err);
    CHECK_INT(rc, 1001);
    CHECK(p.root == NULL);
    CHECK(err[0] != '\0');
  }
  CHECK_INT(dec_json("{\"x402Version\":2,\"t402Version\":2}", false, &p), 1001);
  CHECK(strstr(err, "both") != NULL);
}

/* The default v2 payment with one change made by edit, decoded. */
static int edited(void (*edit)(json_t *root), bool v1, tg_x402_payment_t *p) {
  auth_s as = default_auth();
  json_t *root =
      v1 ? payload(1, false, NULL, "base-sepolia", &as, &acc[0]) : payload(2, false, offered(0), NULL, &as, &acc[0]);
  if (root == NULL)
    return -1;
  json_t *a = json_object_get(root, "accepted");
  if (a != NULL) /* a copy of our own, not the challenge's object */
    json_object_set_new(root, "accepted", json_deep_copy(a));
  edit(root);
  char *h = enc(root);
  int rc = dec(h, v1, p);
  free(h);
  return rc;
}

static json_t *authz(json_t *root) { return json_object_get(json_object_get(root, "payload"), "authorization"); }
static void no_accepted(json_t *r) { json_object_del(r, "accepted"); }
static void accepted_array(json_t *r) { json_object_set_new(r, "accepted", json_array()); }
static void no_payload(json_t *r) { json_object_del(r, "payload"); }
static void payload_string(json_t *r) { json_object_set_new(r, "payload", json_string("x")); }
static void no_authorization(json_t *r) { json_object_del(json_object_get(r, "payload"), "authorization"); }
static void no_signature(json_t *r) { json_object_del(json_object_get(r, "payload"), "signature"); }
static void short_signature(json_t *r) {
  json_object_set_new(json_object_get(r, "payload"), "signature", json_string("0x1234"));
}
static void from_bad(json_t *r) { json_object_set_new(authz(r), "from", json_string("0x1234")); }
static void from_checksum(json_t *r) {
  json_object_set_new(authz(r), "from", json_string("0x70997970c51812dc3A010C7d01b50e0d17dc79C8"));
}
static void to_missing(json_t *r) { json_object_del(authz(r), "to"); }
static void value_number(json_t *r) { json_object_set_new(authz(r), "value", json_integer(10000)); }
static void value_hex(json_t *r) { json_object_set_new(authz(r), "value", json_string("0x2710")); }
static void after_negative(json_t *r) { json_object_set_new(authz(r), "validAfter", json_string("-1")); }
static void before_leading_zero(json_t *r) { json_object_set_new(authz(r), "validBefore", json_string("01767225600")); }
static void nonce_short(json_t *r) { json_object_set_new(authz(r), "nonce", json_string("0xa5")); }
static void scheme_upto(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "scheme", json_string("upto"));
}
static void scheme_missing(json_t *r) { json_object_del(json_object_get(r, "accepted"), "scheme"); }
static void network_solana(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "network",
                      json_string("solana:EtWTRABZaYq6iMfeYKouRu166VU2xqa1"));
}
static void network_v1_name(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "network", json_string("base-sepolia"));
}
static void network_leading_zero(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "network", json_string("eip155:084532"));
}
static void v1_network_caps(json_t *r) { json_object_set_new(r, "network", json_string("Base")); }
static void v1_scheme_missing(json_t *r) { json_object_del(r, "scheme"); }
static void v1_scheme_other(json_t *r) { json_object_set_new(r, "scheme", json_string("exact ")); }

TEST(payload_refusals) {
  CHECK_INT(fixture(), 0);
  static const struct {
    void (*edit)(json_t *);
    bool v1;
    int code;
    const char *says;
  } cases[] = {
      {no_accepted, false, 1004, "accepted: missing"},
      {accepted_array, false, 1004, "accepted: not an object"},
      {no_payload, false, 1004, "payload: missing"},
      {payload_string, false, 1004, "payload: not an object"},
      {no_authorization, false, 1004, "payload.authorization: missing"},
      {no_signature, false, 1004, "payload.signature"},
      {short_signature, false, 1004, "payload.signature"},
      {from_bad, false, 1004, "payload.authorization.from"},
      {from_checksum, false, 1004, "payload.authorization.from"},
      {to_missing, false, 1004, "payload.authorization.to: missing"},
      {value_number, false, 1004, "payload.authorization.value: missing or not a string"},
      {value_hex, false, 1004, "payload.authorization.value: a decimal"},
      {after_negative, false, 1004, "payload.authorization.validAfter"},
      {before_leading_zero, false, 1004, "payload.authorization.validBefore"},
      {nonce_short, false, 1004, "payload.authorization.nonce"},
      {scheme_upto, false, 1008, "accepted.scheme: 'upto'"},
      {scheme_missing, false, 1004, "accepted.scheme"},
      {network_solana, false, 1007, "accepted.network"},
      {network_v1_name, false, 1007, "accepted.network"},
      {network_leading_zero, false, 1007, "accepted.network"},
      {v1_network_caps, true, 1007, "network: 'Base'"},
      {v1_scheme_missing, true, 1004, "scheme"},
      {v1_scheme_other, true, 1008, "scheme"},
      {no_payload, true, 1004, "payload: missing"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tg_x402_payment_t p;
    int rc = edited(cases[i].edit, cases[i].v1, &p);
    if (rc != cases[i].code || strstr(err, cases[i].says) == NULL)
      fprintf(stderr, "  case %zu: %d '%s'\n", i, rc, err);
    CHECK_INT(rc, cases[i].code);
    CHECK(strstr(err, cases[i].says) != NULL);
    CHECK(p.root == NULL && p.accepted == NULL);
  }
}

static void m_network(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "network", json_string("eip155:8453"));
}
static void m_amount(json_t *r) { json_object_set_new(json_object_get(r, "accepted"), "amount", json_string("1")); }
static void m_asset(json_t *r) { json_object_set_new(json_object_get(r, "accepted"), "asset", json_string(ASSET2)); }
static void m_asset_case(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "asset",
                      json_string("0x036cbd53842c5426634e7929541ec2318f3dcf7e"));
}
static void m_pay_to(json_t *r) { json_object_set_new(json_object_get(r, "accepted"), "payTo", json_string(PAYER)); }
static void m_timeout(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "maxTimeoutSeconds", json_integer(61));
}
static void m_timeout_real(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "maxTimeoutSeconds", json_real(60.0));
}
static void m_timeout_string(json_t *r) {
  json_object_set_new(json_object_get(r, "accepted"), "maxTimeoutSeconds", json_string("60"));
}
static void m_extra_name(json_t *r) {
  json_object_set_new(json_object_get(json_object_get(r, "accepted"), "extra"), "name", json_string("USD Coin"));
}
static void m_extra_version(json_t *r) {
  json_object_set_new(json_object_get(json_object_get(r, "accepted"), "extra"), "version", json_string("1"));
}
static void m_extra_more(json_t *r) {
  json_object_set_new(json_object_get(json_object_get(r, "accepted"), "extra"), "paymentFlow", json_string("upfront"));
}
static void m_no_extra(json_t *r) { json_object_del(json_object_get(r, "accepted"), "extra"); }
static void m_more(json_t *r) { json_object_set_new(json_object_get(r, "accepted"), "x", json_true()); }
static void m_reorder(json_t *r) {
  /* The same members in another order: still the offered requirement. */
  json_t *a = json_object_get(r, "accepted"), *b = json_object();
  const char *keys[] = {"extra", "maxTimeoutSeconds", "payTo", "asset", "amount", "network", "scheme"};
  for (int i = 0; i < 7; i++)
    json_object_set(b, keys[i], json_object_get(a, keys[i]));
  json_object_set_new(r, "accepted", b);
}

TEST(mismatch_of_each_field) {
  CHECK_INT(fixture(), 0);
  void (*edits[])(json_t *) = {
      m_network,        m_amount,     m_asset,         m_asset_case, m_pay_to,   m_timeout, m_timeout_real,
      m_timeout_string, m_extra_name, m_extra_version, m_extra_more, m_no_extra, m_more};
  for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
    tg_x402_payment_t p;
    int rc = edited(edits[i], false, &p);
    if (rc != 0)
      fprintf(stderr, "  case %zu: %s\n", i, err);
    CHECK_INT(rc, 0);
    size_t idx = 77;
    rc = tg_x402_payment_match(&p, &ch, &idx);
    tg_x402_payment_free(&p);
    if (rc != 3005)
      fprintf(stderr, "  case %zu matched\n", i);
    CHECK_INT(rc, 3005);
    CHECK_INT(idx, 77);
  }
  tg_x402_payment_t p;
  CHECK_INT(edited(m_reorder, false, &p), 0);
  size_t idx;
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
  CHECK_INT(tg_x402_payment_match(NULL, &ch, &idx), -EINVAL);
  tg_x402_payment_free(&p);
}

/* A v2 payment for offer 0 with the given authorization, decoded. */
static int paid(const auth_s *as, const tg_pay_accept_t *signer_domain, tg_x402_payment_t *p) {
  char *h = enc(payload(2, false, offered(0), NULL, as, signer_domain));
  int rc = dec(h, false, p);
  free(h);
  return rc;
}

static int local(const auth_s *as, int64_t now) {
  tg_x402_payment_t p;
  if (paid(as, &acc[0], &p) != 0)
    return -1;
  int rc = tg_x402_check_local(&p, &acc[0], "10000", now, NULL);
  tg_x402_payment_free(&p);
  return rc;
}

TEST(time_window_edges) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth(); /* validBefore 1767225600 */
  CHECK_INT(local(&as, 1767225600 - 6), 0);
  CHECK_INT(local(&as, 1767225600 - 5), 1011);
  CHECK_INT(local(&as, 1767225600), 1011);
  CHECK_INT(local(&as, INT64_MAX), 1011);
  as.after = "1767225000";
  CHECK_INT(local(&as, 1767225000), 0);
  CHECK_INT(local(&as, 1767225000 - 1), 1011);
  /* Far future and the largest uint256: no overflow, a window that is open. */
  as.after = "0";
  as.before = "9223372036854775808"; /* 2^63 */
  CHECK_INT(local(&as, NOW), 0);
  CHECK_INT(local(&as, INT64_MAX), 0);
  as.before = "115792089237316195423570985008687907853269984665640564039457584007913129639935";
  CHECK_INT(local(&as, NOW), 0);
  as.after = "18446744073709551616"; /* 2^64: never valid yet */
  CHECK_INT(local(&as, INT64_MAX), 1011);
  as.after = "0";
  as.before = "0";
  CHECK_INT(local(&as, 0), 1011);
}

TEST(local_refusals) {
  CHECK_INT(fixture(), 0);
  auth_s as = default_auth();
  tg_x402_payment_t p;
  /* Paid to someone else. */
  as.to = PAYER;
  CHECK_INT(local(&as, NOW), 1010);
  as = default_auth();
  /* Signed over another domain (the token's name): the signature recovers someone else. */
  tg_pay_accept_t other = acc[0];
  strcpy(other.name, "USD Coin");
  CHECK_INT(paid(&as, &other, &p), 0);
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "10000", NOW, NULL), 1006);
  tg_x402_payment_free(&p);
  /* Claims a from it did not sign as. */
  CHECK_INT(paid(&as, &acc[0], &p), 0);
  CHECK_INT(tg_eip3009_parse_address(PAY_TO, p.auth.from), 0);
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "10000", NOW, NULL), 1006);
  tg_x402_payment_free(&p);
  /* A high-s twin or v 0: refused by the strict recovery. */
  CHECK_INT(paid(&as, &acc[0], &p), 0);
  p.sig[64] = (uint8_t)(p.sig[64] - 27);
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "10000", NOW, NULL), 1006);
  /* Bad arguments. */
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "ten", NOW, NULL), -EINVAL);
  CHECK_INT(tg_x402_check_local(&p, NULL, "10000", NOW, NULL), -EINVAL);
  tg_x402_payment_free(&p);
  /* The amount: the value signed differs from the one offered. */
  as.value = "10000";
  CHECK_INT(paid(&as, &acc[0], &p), 0);
  CHECK_INT(tg_x402_check_local(&p, &acc[0], "20000", NOW, NULL), 1009);
  tg_x402_payment_free(&p);
}

TEST(settle_header) {
  char *h = tg_x402_settle_header(true, "0xabc", "eip155:84532", PAYER, NULL);
  CHECK(h != NULL);
  char *j = unb64(h);
  free(h);
  CHECK(j != NULL);
  int ok = strcmp(j, "{\"success\":true,\"transaction\":\"0xabc\",\"network\":\"eip155:84532\",\"payer\":\"" PAYER
                     "\"}") == 0;
  free(j);
  CHECK(ok);
  h = tg_x402_settle_header(false, NULL, NULL, NULL, "insufficient_funds \xc3\xa9");
  j = h ? unb64(h) : NULL;
  free(h);
  CHECK(j != NULL);
  ok = strcmp(j, "{\"success\":false,\"transaction\":\"\",\"network\":\"\",\"errorReason\":\"insufficient_funds "
                 "\\u00E9\"}") == 0;
  free(j);
  CHECK(ok);
}

TEST(t402_codes) {
  static const struct {
    int code, status;
    const char *name;
  } c[] = {
      {1001, 400, "InvalidRequest"},
      {1002, 400, "MissingPayload"},
      {1003, 400, "MissingRequirements"},
      {1004, 400, "InvalidPayload"},
      {1005, 400, "InvalidRequirements"},
      {1006, 400, "InvalidSignature"},
      {1007, 400, "InvalidNetwork"},
      {1008, 400, "InvalidScheme"},
      {1009, 400, "InvalidAmount"},
      {1010, 400, "InvalidAddress"},
      {1011, 400, "ExpiredPayment"},
      {1012, 400, "InvalidNonce"},
      {2001, 500, "Internal"},
      {2002, 500, "DatabaseUnavailable"},
      {2003, 500, "CacheUnavailable"},
      {2004, 500, "RPCUnavailable"},
      {2005, 429, "RateLimited"},
      {2006, 500, "ServiceUnavailable"},
      {3001, 422, "VerificationFailed"},
      {3002, 500, "SettlementFailed"},
      {3003, 500, "InsufficientBalance"},
      {3004, 500, "AllowanceInsufficient"},
      {3005, 422, "PaymentMismatch"},
      {3006, 500, "DuplicatePayment"},
      {3007, 500, "SettlementPending"},
      {3008, 500, "SettlementTimeout"},
      {4001, 502, "ChainUnavailable"},
      {4002, 502, "TransactionFailed"},
      {4003, 502, "TransactionReverted"},
      {4004, 502, "GasEstimationFailed"},
      {4005, 502, "NonceConflict"},
      {4006, 502, "ChainCongested"},
      {4007, 502, "ContractError"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    CHECK_INT(tg_t402_status(c[i].code), c[i].status);
    CHECK_STR(tg_t402_code_name(c[i].code), c[i].name);
  }
  CHECK_STR(tg_t402_code_name(9999), "Unknown");
  CHECK_INT(tg_t402_status(0), 500);
  size_t len = 0;
  char *b = tg_t402_error_body(3005, "accepted is not what was offered", NULL, &len);
  CHECK_STR(b, "{\"code\":\"T402-3005\",\"message\":\"accepted is not what was offered\"}");
  CHECK_INT(len, strlen(b));
  free(b);
  b = tg_t402_error_body(1006, NULL, json_pack("{s:s}", "payer", PAYER), NULL);
  CHECK_STR(b, "{\"code\":\"T402-1006\",\"message\":\"InvalidSignature\",\"details\":{\"payer\":\"" PAYER "\"}}");
  free(b);
  b = tg_t402_error_body(1001, "\xe2\x82\xac", NULL, NULL);
  CHECK_STR(b, "{\"code\":\"T402-1001\",\"message\":\"\\u20AC\"}");
  free(b);
}

TEST(amount_scaling) {
  tg_pay_accept_t a;
  memset(&a, 0, sizeof a);
  strcpy(a.currency, "USD");
  char out[80];
  static const struct {
    int decimals;
    int64_t price;
    const char *want;
  } c[] = {
      {6, 10000, "10000"},
      {6, 0, "0"},
      {18, 10000, "10000000000000000"},
      {18, 1, "1000000000000"},
      {18, 0, "0"},
      {36, INT64_MAX, "9223372036854775807000000000000000000000000000000"},
      {2, 10000, "1"},
      {2, 10001, "2"},
      {2, 9999, "1"},
      {2, 1, "1"},
      {2, 0, "0"},
      {0, 1000000, "1"},
      {0, 1000001, "2"},
      {0, INT64_MAX, "9223372036855"},
      {5, 15, "2"},
      {7, 15, "150"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    a.decimals = (uint8_t)c[i].decimals;
    CHECK_INT(tg_pay_amount(&a, c[i].price, "USD", out), 0);
    CHECK_STR(out, c[i].want);
  }
  CHECK_INT(tg_pay_amount(&a, 1, "usd", out), 0); /* case does not matter */
  CHECK_INT(tg_pay_amount(&a, 1, "EUR", out), -ENOENT);
  CHECK_STR(out, "");
  CHECK_INT(tg_pay_amount(&a, -1, "USD", out), -ERANGE);
  a.decimals = 37;
  CHECK_INT(tg_pay_amount(&a, 1, "USD", out), -EINVAL);
  CHECK_INT(tg_pay_amount(NULL, 1, "USD", out), -EINVAL);
}

TEST(challenge_shared_by_threads_is_read_only) {
  /* Matching and bodies only read the challenge: its reference counts stay. */
  CHECK_INT(fixture(), 0);
  size_t before = ch.accepts_v2->refcount;
  auth_s as = default_auth();
  tg_x402_payment_t p;
  CHECK_INT(paid(&as, &acc[0], &p), 0);
  size_t idx;
  CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
  free(tg_x402_facilitator_body(&p, &ch, idx, NULL));
  tg_x402_payment_free(&p);
  CHECK_INT(ch.accepts_v2->refcount, before);
  CHECK_INT(json_array_get(ch.accepts_v2, 0)->refcount, 1);
}

/* A payload signed by viem (the vector of eip3009_test.c), not by this file's
 * signer: the same text seeds the fuzzer (spec/fuzz/corpus/x402_payment_fuzz). */
#define VIEM_SIG                                                                                                       \
  "0x7ddc85e0d0e4a089c2977c2883b3128ef9e2902d9f3eccd59abfd849e4398b0606d23443d953f6a428853b5bbc64a30b35d7f261f05ddafb" \
  "7fb"                                                                                                                \
  "ba9f6226eb4c51b"
#define VIEM_PAYLOAD                                                                                                   \
  "{\"signature\":\"" VIEM_SIG "\",\"authorization\":{\"from\":\"" PAYER "\",\"to\":\"" PAY_TO                         \
  "\",\"value\":\"10000\",\"validAfter\":\"0\",\"validBefore\":\"1767225600\",\"nonce\":\"" NONCE "\"}}"

TEST(viem_signed_payloads) {
  CHECK_INT(fixture(), 0);
  char *acc0 = json_dumps(offered(0), JSON_COMPACT);
  CHECK(acc0 != NULL);
  char v2[2048], t2[2048];
  snprintf(v2, sizeof v2,
           "{\"x402Version\":2,\"resource\":{\"url\":\"https://api.example/data\"},\"accepted\":%s,"
           "\"payload\":" VIEM_PAYLOAD "}",
           acc0);
  snprintf(t2, sizeof t2, "{\"t402Version\":2,\"accepted\":%s,\"payload\":" VIEM_PAYLOAD "}", acc0);
  free(acc0);
  const char *v1 = "{\"x402Version\":1,\"scheme\":\"exact\",\"network\":\"base-sepolia\",\"payload\":" VIEM_PAYLOAD "}";
  const char *texts[] = {v2, t2, v1};
  for (int i = 0; i < 3; i++) {
    tg_x402_payment_t p;
    int rc = dec_json(texts[i], i == 2, &p);
    if (rc)
      fprintf(stderr, "  %d: %s\n", i, err);
    CHECK_INT(rc, 0);
    CHECK_INT(p.t402, i == 1);
    size_t idx = 9;
    CHECK_INT(tg_x402_payment_match(&p, &ch, &idx), 0);
    CHECK_INT(idx, 0);
    CHECK_INT(tg_x402_check_local(&p, &acc[0], "10000", NOW, NULL), 0);
    tg_x402_payment_free(&p);
  }
}
