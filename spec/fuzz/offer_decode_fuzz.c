/* libFuzzer target for offer tokens (catalog/offer.h), version 2. Each input
 * is tried twice against a fixed keyring (key 7, active, and key 9):
 *   - as it is, as a token: whatever it is, decode returns a documented code,
 *     zeroes out on any failure, and what it accepts re-encodes to the very
 *     same token (one spelling), decodes again with its own URI claimed, is
 *     refused for another URI (-EXDEV) and at its expiry (-ETIMEDOUT);
 *   - re-signed: the input's bytes (base64url-decoded when they are base64,
 *     raw otherwise) get a valid tag over all but their last 16 bytes, made
 *     here with mbedTLS' one-shot HMAC, so the mutations reach the body
 *     parser that no forged tag would; a key the ring holds must never report
 *     -EBADMSG, and the same checks apply to what is accepted.
 * Seeds in spec/fuzz/corpus/offer_decode_fuzz are tokens signed with key 7
 * (bytes 00 01 .. 1f) and key 9 (bytes f0 e1 .. 0f, KEY9 below). Any breach
 * aborts, which libFuzzer reports as a crash with the input saved. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>

#include "catalog/offer.h"

#define FAIL(...)                                                                              \
  do {                                                                                         \
    fprintf(stderr, "offer_decode_fuzz: " __VA_ARGS__);                                        \
    fprintf(stderr, "\n");                                                                     \
    abort();                                                                                   \
  } while (0)

/* Bytes of the largest payload the format allows (offer.c's MAX_PAYLOAD). */
#define PAYLOAD_MAX (5 + 2 * 9 + 5 * 5 + 1 + 16 + 1 + 64 + 2 + TG_OFFER_URI_MAX + TG_OFFER_TAG_LEN)

static const uint8_t KEY7[TG_OFFER_KEY_LEN] = {
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f};
static const uint8_t KEY9[TG_OFFER_KEY_LEN] = {
    0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, 0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f,
    0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87, 0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f};

static tg_offer_keyring_t ring7, ring9; /* the same two keys; 7 or 9 active */
static const tg_offer_t zero;

static void setup(void) {
  static int done;
  if (done)
    return;
  tg_offer_keyring_init(&ring7);
  if (tg_offer_keyring_add(&ring7, 7, KEY7, sizeof KEY7) != 0 ||
      tg_offer_keyring_add(&ring7, 9, KEY9, sizeof KEY9) != 0)
    FAIL("keyring setup");
  ring9 = ring7;
  if (tg_offer_keyring_set_active(&ring9, 9) != 0)
    FAIL("keyring setup");
  done = 1;
}

static int documented(int rc) {
  return rc == 0 || rc == -EINVAL || rc == -ENOKEY || rc == -EBADMSG || rc == -ETIMEDOUT ||
         rc == -EXDEV;
}

static int terminated(const char *s, size_t cap) { return memchr(s, '\0', cap) != NULL; }

/* token (len bytes) decoded at now = 0 into *d with rc 0: check it all. */
static void accepted(const char *token, size_t len, const tg_offer_t *d) {
  static char again[TG_OFFER_TOKEN_MAX];
  static tg_offer_t e;
  if (!terminated(d->tenant, sizeof d->tenant) || !terminated(d->currency, sizeof d->currency) ||
      !terminated(d->uri, sizeof d->uri))
    FAIL("a string field is not terminated");
  size_t ulen = strlen(d->uri);
  if (ulen == 0 || ulen > TG_OFFER_URI_MAX)
    FAIL("accepted a URI of %zu bytes", ulen);
  if (d->amount < 0 || d->expires_at <= 0)
    FAIL("accepted amount %lld, expires_at %lld", (long long)d->amount, (long long)d->expires_at);
  if (d->key_id != 7 && d->key_id != 9)
    FAIL("key id %u is not in the ring", d->key_id);
  if (len >= TG_OFFER_TOKEN_MAX)
    FAIL("accepted a token of %zu characters", len);

  /* One spelling: the decoded offer re-encodes to the token, by both calls. */
  const tg_offer_keyring_t *ring = d->key_id == 7 ? &ring7 : &ring9;
  int rc = tg_offer_encode(ring, d, again, sizeof again);
  if (rc != 0)
    FAIL("re-encode of an accepted offer: %d", rc);
  if (strlen(again) != len || memcmp(again, token, len) != 0)
    FAIL("re-encoded to another token:\n  in:  %.*s\n  out: %s", (int)len, token, again);
  e = *d;
  memset(e.uri, 'x', sizeof e.uri); /* not read by encode_uri */
  rc = tg_offer_encode_uri(ring, &e, d->uri, again, sizeof again);
  if (rc != 0 || strlen(again) != len || memcmp(again, token, len) != 0)
    FAIL("encode_uri disagrees with encode (%d)", rc);

  /* Its own URI claimed: the same offer. Another URI: -EXDEV. */
  memset(&e, 0xa5, sizeof e);
  rc = tg_offer_decode(&ring7, token, len, 0, d->uri, &e);
  if (rc != 0 || memcmp(&e, d, sizeof e) != 0)
    FAIL("decode with its own URI claimed: %d or another offer", rc);
  static char other[TG_OFFER_URI_MAX + 2];
  memcpy(other, d->uri, ulen);
  other[ulen] = '#';
  other[ulen + 1] = '\0';
  memset(&e, 0xa5, sizeof e);
  rc = tg_offer_decode(&ring7, token, len, 0, other, &e);
  if (rc != -EXDEV || memcmp(&e, &zero, sizeof e) != 0)
    FAIL("decode with a longer URI claimed: %d", rc);
  other[ulen - 1] ^= 1;
  other[ulen] = '\0';
  memset(&e, 0xa5, sizeof e);
  rc = tg_offer_decode(&ring7, token, len, 0, other, &e);
  if (rc != -EXDEV || memcmp(&e, &zero, sizeof e) != 0)
    FAIL("decode with another URI claimed: %d", rc);

  /* Expiry: valid until expires_at - 1, not at expires_at. */
  rc = tg_offer_decode(&ring7, token, len, d->expires_at - 1, NULL, &e);
  if (rc != 0)
    FAIL("refused before its expiry: %d", rc);
  memset(&e, 0xa5, sizeof e);
  rc = tg_offer_decode(&ring7, token, len, d->expires_at, NULL, &e);
  if (rc != -ETIMEDOUT || memcmp(&e, &zero, sizeof e) != 0)
    FAIL("not -ETIMEDOUT at expires_at: %d", rc);

  /* A ring without the signing key: -ENOKEY. */
  tg_offer_keyring_t less = ring7;
  tg_offer_keyring_remove(&less, d->key_id);
  rc = tg_offer_decode(&less, token, len, 0, NULL, &e);
  tg_offer_keyring_clear(&less);
  if (rc != -ENOKEY)
    FAIL("decoded without its key: %d", rc);
}

/* Decodes token (len bytes) at now = 0 without a claimed URI; checks the
 * result and returns the code. */
static int try_token(const char *token, size_t len) {
  static tg_offer_t d;
  memset(&d, 0xa5, sizeof d);
  int rc = tg_offer_decode(&ring7, token, len, 0, NULL, &d);
  if (!documented(rc) || rc == -EXDEV)
    FAIL("undocumented code %d", rc);
  if (rc != 0) {
    if (memcmp(&d, &zero, sizeof d) != 0)
      FAIL("out not zeroed on %d", rc);
    return rc;
  }
  accepted(token, len, &d);
  return rc;
}

/* Lenient base64url decode (trailing bits ignored): 0 when the input is not base64url. */
static size_t unb64(const uint8_t *in, size_t n, uint8_t *out, size_t cap) {
  static char tmp[4 * ((PAYLOAD_MAX + 64) / 3) + 8];
  size_t i, olen = 0;
  if (n == 0 || n % 4 == 1 || n + 4 > sizeof tmp)
    return 0;
  for (i = 0; i < n; i++) {
    char c = (char)in[i];
    if (c == '-')
      c = '+';
    else if (c == '_')
      c = '/';
    else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9')))
      return 0;
    tmp[i] = c;
  }
  while (i % 4)
    tmp[i++] = '=';
  /* mbedTLS refuses non-zero trailing bits in some versions: then raw. */
  if (mbedtls_base64_decode(out, cap, &olen, (const unsigned char *)tmp, i) != 0)
    return 0;
  return olen;
}

static size_t b64url(const uint8_t *p, size_t n, char *out, size_t cap) {
  size_t olen = 0;
  if (mbedtls_base64_encode((unsigned char *)out, cap, &olen, p, n) != 0)
    FAIL("base64 of %zu bytes", n);
  while (olen && out[olen - 1] == '=')
    olen--;
  for (size_t i = 0; i < olen; i++)
    out[i] = out[i] == '+' ? '-' : out[i] == '/' ? '_' : out[i];
  out[olen] = '\0';
  return olen;
}

/* Signs p[0 .. n - 16) into its last 16 bytes, as a holder of key would. */
static void sign(const uint8_t *key, uint8_t *p, size_t n) {
  static uint8_t in[9 + PAYLOAD_MAX + 64];
  uint8_t full[32];
  memcpy(in, "tg-offer", 9);
  memcpy(in + 9, p, n - TG_OFFER_TAG_LEN);
  if (mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), key, TG_OFFER_KEY_LEN, in,
                      9 + n - TG_OFFER_TAG_LEN, full) != 0)
    FAIL("hmac");
  memcpy(p + n - TG_OFFER_TAG_LEN, full, TG_OFFER_TAG_LEN);
}

static void try_resigned(const uint8_t *data, size_t size) {
  static uint8_t p[PAYLOAD_MAX + 64];
  static char tok[sizeof p * 4 / 3 + 8];
  size_t n = unb64(data, size, p, sizeof p);
  if (n == 0) {
    if (size > sizeof p)
      return; /* too long for a payload either way */
    memcpy(p, data, size);
    n = size;
  }
  if (n < 5 + TG_OFFER_TAG_LEN)
    return;
  uint32_t id = (uint32_t)p[1] | (uint32_t)p[2] << 8 | (uint32_t)p[3] << 16 | (uint32_t)p[4] << 24;
  sign(id == 9 ? KEY9 : KEY7, p, n);
  size_t len = b64url(p, n, tok, sizeof tok);
  int rc = try_token(tok, len);
  if (rc == -EBADMSG)
    FAIL("a tag made with the key is refused (%zu bytes, key id %u)", n, id);
  if ((id == 7 || id == 9) && rc == -ENOKEY)
    FAIL("key %u held but -ENOKEY", id);
  if (rc == 0 && (p[0] != TG_OFFER_VERSION || n > PAYLOAD_MAX))
    FAIL("accepted version %u, %zu bytes", p[0], n);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  setup();
  try_token((const char *)data, size);
  try_resigned(data, size);
  return 0;
}
