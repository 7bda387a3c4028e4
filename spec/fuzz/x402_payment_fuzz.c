/* libFuzzer target for the x402/t402 payment header (pay/x402.h). Each input
 * is tried four times: as it is, as an X-PAYMENT and as a PAYMENT-SIGNATURE
 * value (the base64 layer), and base64-encoded first, as both again (so the
 * mutations reach the JSON and payload parsers behind a valid base64). For
 * each:
 *   - decode returns 0 or a documented code (1001, 1002, 1004, 1007, 1008),
 *     with out zeroed and err set on failure;
 *   - what it accepts has version 1 or 2 as the header asks, "exact", a
 *     payer that is its from, and is matched against a fixed challenge
 *     (0 or 3005); a match is checked locally (0 or one of its codes) and
 *     gets a facilitator body that parses back with the payload unchanged.
 * Seeds in spec/fuzz/corpus/x402_payment_fuzz are PaymentPayload JSON texts
 * (v2 x402, v2 t402, v1) signed with the viem vector of eip3009_test.c, which
 * check_local accepts at NOW, and their base64 headers. Any breach aborts. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/b64.h"
#include "pay/x402.h"

#define FAIL(...)                                                                                                      \
  do {                                                                                                                 \
    fprintf(stderr, "x402_payment_fuzz: " __VA_ARGS__);                                                                \
    fprintf(stderr, "\n");                                                                                             \
    abort();                                                                                                           \
  } while (0)

#define NOW INT64_C(1767225000)

static tg_pay_accept_t acc[2];
static tg_x402_challenge_t ch;

static void setup(void) {
  static int done;
  if (done)
    return;
  static const char *const c[] = {
      "accepts.1.network",    "eip155:84532",
      "accepts.1.network_v1", "base-sepolia",
      "accepts.1.asset",      "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
      "accepts.1.name",       "USDC",
      "accepts.1.version",    "2",
      "accepts.1.pay_to",     "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
      "accepts.2.network",    "eip155:31337",
      "accepts.2.asset",      "0x5FbDB2315678afecb367f032d93F642f64180aa3",
      "accepts.2.name",       "Test Token",
      "accepts.2.version",    "1",
      "accepts.2.pay_to",     "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
      "accepts.2.decimals",   "18",
      "facilitators.1",       "http://127.0.0.1:4021",
  };
  static tg_config_kv_t kv[sizeof c / sizeof c[0] / 2];
  for (size_t i = 0; i < sizeof kv / sizeof kv[0]; i++)
    kv[i] = (tg_config_kv_t){(char *)c[2 * i], (char *)c[2 * i + 1]};
  tg_config_section_t s = {kv, sizeof kv / sizeof kv[0]};
  static tg_payconf_t pc;
  char err[256];
  if (tg_payconf_parse(&s, &pc, err, sizeof err) != 0)
    FAIL("payconf: %s", err);
  tg_x402_offer_t o[2];
  for (int i = 0; i < 2; i++) {
    acc[i] = pc.accepts[i];
    o[i].accept = &acc[i];
    if (tg_pay_amount(&acc[i], 10000, "USD", o[i].amount) != 0)
      FAIL("amount");
  }
  tg_x402_resource_t r = {"https://api.example/data", "Weather", "application/json"};
  if (tg_x402_challenge_build(&r, o, 2, "payment required", &ch) != 0)
    FAIL("challenge");
  tg_payconf_free(&pc);
  done = 1;
}

static void try_header(const char *v, size_t n, bool v1) {
  static tg_x402_payment_t p;
  static const tg_x402_payment_t zero;
  char err[256];
  memset(&p, 0xa5, sizeof p);
  err[0] = 'x';
  err[1] = '\0';
  int rc = tg_x402_payment_decode(v, n, v1, &p, err, sizeof err);
  if (rc != 0) {
    if (rc != 1001 && rc != 1002 && rc != 1004 && rc != 1007 && rc != 1008)
      FAIL("undocumented code %d (%s)", rc, err);
    if (memcmp(&p, &zero, sizeof p) != 0)
      FAIL("out not zeroed on %d", rc);
    if (memchr(err, '\0', sizeof err) == NULL || strcmp(err, "x") == 0)
      FAIL("no reason for %d", rc);
    return;
  }
  if (p.version != (v1 ? 1 : 2) || (p.t402 && p.version != 2) || strcmp(p.scheme, "exact") != 0 || p.root == NULL ||
      (p.version == 2) != (p.accepted != NULL))
    FAIL("accepted version %d t402 %d scheme %.16s", p.version, p.t402, p.scheme);
  char payer[43];
  tg_eip3009_format_address(p.auth.from, payer);
  if (strcmp(payer, p.payer) != 0)
    FAIL("payer %s is not from %s", p.payer, payer);
  size_t idx = SIZE_MAX;
  rc = tg_x402_payment_match(&p, &ch, &idx);
  if (rc == 3005) {
    tg_x402_payment_free(&p);
    return;
  }
  if (rc != 0 || idx >= ch.n)
    FAIL("match: %d, index %zu", rc, idx);
  if (p.version == 2 && !json_equal(p.accepted, json_array_get(ch.accepts_v2, idx)))
    FAIL("matched a requirement that is not the one accepted");
  int code = -1;
  rc = tg_x402_check_local(&p, &acc[idx], tg_x402_challenge_amount(&ch, idx), NOW, &code);
  if (rc != code || (rc != 0 && rc != 1006 && rc != 1007 && rc != 1009 && rc != 1010 && rc != 1011))
    FAIL("check_local: %d (code %d)", rc, code);
  size_t len = 0;
  char *body = tg_x402_facilitator_body(&p, &ch, idx, &len);
  if (body == NULL || strlen(body) != len)
    FAIL("no facilitator body");
  json_error_t jerr;
  json_t *b = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
  if (b == NULL || !json_equal(json_object_get(b, "paymentPayload"), p.root))
    FAIL("facilitator body does not carry the payload: %s", b ? "differs" : jerr.text);
  for (const char *q = body; *q; q++)
    if ((unsigned char)*q >= 0x80)
      FAIL("non-ASCII byte in the facilitator body");
  json_decref(b);
  free(body);
  tg_x402_payment_free(&p);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static char enc[4 * (TG_X402_MAX_HEADER / 3) + 8];
  setup();
  try_header((const char *)data, size, false);
  try_header((const char *)data, size, true);
  if (size > 0 && tg_b64_len(size, 1) < sizeof enc && tg_b64_encode(data, size, 0, 1, enc, sizeof enc) == 0) {
    try_header(enc, strlen(enc), false);
    try_header(enc, strlen(enc), true);
  }
  return 0;
}
