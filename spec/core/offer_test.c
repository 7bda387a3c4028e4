#include "catalog/offer.h"
#include "test.h"

#include <errno.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>
#include <mbedtls/sha256.h>

static const char *KEY1_HEX = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
static const char *KEY2_HEX = "F0E1D2C3B4A5968778695A4B3C2D1E0FF0E1D2C3B4A5968778695A4B3C2D1E0F";
static const char *URI = "https://news.example.com/2024/05/article-1234.html";
static const int64_t NOW = 1717000000;

static void keyring(tg_offer_keyring_t *k) {
  tg_offer_keyring_init(k);
  tg_offer_keyring_add_hex(k, 7, KEY1_HEX, strlen(KEY1_HEX));
}

static void sample(tg_offer_t *o) {
  memset(o, 0, sizeof(*o));
  strcpy(o->tenant, "news-example");
  strcpy(o->uri, URI);
  o->content = 3;
  o->license = 12;
  o->payment = 1;
  o->amount = 2500; /* 0.0025 USD in micro-USD */
  strcpy(o->currency, "USD");
  o->payment_type = 2;
  o->usage_bits = 0x5;
  o->expires_at = NOW + 300;
}

/* base64url through mbedTLS, for tests that edit the decoded bytes. */
static size_t raw_decode(const char *tok, uint8_t *out, size_t cap) {
  char tmp[TG_OFFER_TOKEN_MAX + 4];
  size_t n = strlen(tok), olen = 0, i;
  for (i = 0; i < n; i++)
    tmp[i] = tok[i] == '-' ? '+' : tok[i] == '_' ? '/' : tok[i];
  while (i % 4)
    tmp[i++] = '=';
  if (mbedtls_base64_decode(out, cap, &olen, (const unsigned char *)tmp, i) != 0)
    return 0;
  return olen;
}

static void raw_encode(const uint8_t *p, size_t n, char *out) {
  char tmp[TG_OFFER_TOKEN_MAX + 4];
  size_t olen = 0;
  mbedtls_base64_encode((unsigned char *)tmp, sizeof(tmp), &olen, p, n);
  while (olen && tmp[olen - 1] == '=')
    olen--;
  for (size_t i = 0; i < olen; i++)
    out[i] = tmp[i] == '+' ? '-' : tmp[i] == '/' ? '_' : tmp[i];
  out[olen] = '\0';
}

/* Re-signs raw bytes with key (what a holder of the key could do), so tests
 * can build well-signed tokens the encoder would never emit. */
static void resign(const uint8_t key[32], uint8_t *p, size_t n) {
  uint8_t in[512], full[32];
  memcpy(in, "tg-offer", 9);
  memcpy(in + 9, p, n - TG_OFFER_TAG_LEN);
  mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256), key, 32, in,
                  9 + n - TG_OFFER_TAG_LEN, full);
  memcpy(p + n - TG_OFFER_TAG_LEN, full, TG_OFFER_TAG_LEN);
}

static void key_bytes(const char *hex, uint8_t out[32]) {
  for (int i = 0; i < 32; i++) {
    unsigned v;
    sscanf(hex + 2 * i, "%2x", &v);
    out[i] = (uint8_t)v;
  }
}

TEST(hmac_sha256_rfc4231_case2) {
  static const uint8_t expect[32] = {
      0x5b, 0xdc, 0xc1, 0x46, 0xbf, 0x60, 0x75, 0x4e, 0x6a, 0x04, 0x24, 0x26, 0x08, 0x95, 0x75, 0xc7,
      0x5a, 0x00, 0x3f, 0x08, 0x9d, 0x27, 0x39, 0x83, 0x9d, 0xec, 0x58, 0xb9, 0x64, 0xec, 0x38, 0x43};
  const char *msg = "what do ya want for nothing?";
  uint8_t out[32];
  CHECK_INT(mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA256),
                            (const unsigned char *)"Jefe", 4, (const unsigned char *)msg,
                            strlen(msg), out),
            0);
  CHECK(memcmp(out, expect, 32) == 0);
}

TEST(token_tag_and_uri_hash_are_what_the_header_says) {
  tg_offer_keyring_t k;
  tg_offer_t o;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[256], copy[256], key[32], h[32];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  CHECK(n > 40);
  CHECK_INT(raw[0], 1);
  CHECK_INT(raw[1] | raw[2] << 8 | raw[3] << 16 | raw[4] << 24, 7);
  mbedtls_sha256_ret((const unsigned char *)URI, strlen(URI), h, 0);
  CHECK(memcmp(raw + n - 32, h, 16) == 0);
  memcpy(copy, raw, n);
  key_bytes(KEY1_HEX, key);
  resign(key, copy, n);
  CHECK(memcmp(copy, raw, n) == 0);
}

/* The hash given once per URI yields the very token encode makes; the
 * per-thread HMAC states stay right when more keys take turns than the
 * thread keeps (each tag checked against mbedtls' one-shot HMAC). */
TEST(encode_hashed_is_encode_and_states_follow_keys) {
  tg_offer_keyring_t k;
  tg_offer_t o;
  char a[TG_OFFER_TOKEN_MAX], b[TG_OFFER_TOKEN_MAX];
  uint8_t hash[TG_OFFER_HASH_LEN], raw[256], copy[256], key[32];
  sample(&o);
  CHECK_INT(tg_offer_uri_hash(o.uri, hash), 0);
  for (int round = 0; round < 3; round++)
    for (uint32_t id = 1; id <= 6; id++) {
      tg_offer_keyring_init(&k);
      for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)(id * 37 + i);
      CHECK_INT(tg_offer_keyring_add(&k, id, key, sizeof key), 0);
      CHECK_INT(tg_offer_encode(&k, &o, a, sizeof a), 0);
      CHECK_INT(tg_offer_encode_hashed(&k, &o, hash, b, sizeof b), 0);
      CHECK_STR(a, b);
      size_t n = raw_decode(a, raw, sizeof raw);
      CHECK(n > 40 && n <= sizeof raw);
      if (n <= 40 || n > sizeof raw)
        return;
      memcpy(copy, raw, n);
      resign(key, copy, n);
      CHECK(memcmp(copy, raw, n) == 0);
      tg_offer_keyring_clear(&k);
    }
  CHECK_INT(tg_offer_encode_hashed(&k, &o, NULL, b, sizeof b), -EINVAL);
}

/* The token's base64url is the gateway's own encoder: for payloads of every
 * length modulo 3 (tenant names of 1 to 64 bytes) it must spell exactly what
 * mbedTLS' standard base64 spells, translated and unpadded. */
TEST(base64url_matches_the_standard_encoding) {
  tg_offer_keyring_t k;
  tg_offer_t o;
  char tok[TG_OFFER_TOKEN_MAX], want[TG_OFFER_TOKEN_MAX + 4];
  uint8_t raw[256];
  keyring(&k);
  sample(&o);
  for (size_t len = 1; len <= 64; len++) {
    memset(o.tenant, 'a' + (int)(len % 26), len);
    o.tenant[len] = '\0';
    o.amount = (int64_t)(len * 7919); /* varied bytes, so '-' and '_' show up */
    CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof tok), 0);
    size_t n = raw_decode(tok, raw, sizeof raw);
    CHECK(n > 0);
    raw_encode(raw, n, want);
    CHECK_STR(tok, want);
  }
}

TEST(round_trip) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  printf("  token (%zu chars): %s\n", strlen(tok), tok);
  CHECK(strlen(tok) < 120);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), 0);
  CHECK_STR(d.tenant, "news-example");
  CHECK_STR(d.uri, URI);
  CHECK_STR(d.currency, "USD");
  CHECK_INT(d.content, 3);
  CHECK_INT(d.license, 12);
  CHECK_INT(d.payment, 1);
  CHECK_INT(d.amount, 2500);
  CHECK_INT(d.payment_type, 2);
  CHECK_INT(d.usage_bits, 5);
  CHECK_INT(d.expires_at, NOW + 300);
  CHECK_INT(d.key_id, 7);

  /* Without a claimed URI nothing is checked and the URI stays empty. */
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), 0);
  CHECK_STR(d.uri, "");
  CHECK_INT(d.amount, 2500);
}

TEST(round_trip_extremes) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  memset(&o, 0, sizeof(o));
  memset(o.tenant, 't', 64);
  memset(o.currency, 'C', 16);
  memset(o.uri, 'u', sizeof(o.uri) - 1);
  o.content = o.license = o.payment = o.payment_type = o.usage_bits = UINT32_MAX;
  o.amount = INT64_MAX;
  o.expires_at = INT64_MAX;
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  printf("  longest token: %zu chars\n", strlen(tok));
  CHECK(strlen(tok) < TG_OFFER_TOKEN_MAX);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, o.uri, &d), 0);
  CHECK_INT(strlen(d.tenant), 64);
  CHECK_INT(strlen(d.currency), 16);
  CHECK_INT(d.amount, INT64_MAX);
  CHECK_INT(d.usage_bits, UINT32_MAX);

  /* All zero and empty strings. */
  memset(&o, 0, sizeof(o));
  o.expires_at = 1;
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  printf("  shortest token: %zu chars\n", strlen(tok));
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), 0, "", &d), 0);
  CHECK_STR(d.tenant, "");
  CHECK_INT(d.amount, 0);
}

TEST(encode_rejects_bad_input) {
  tg_offer_keyring_t k, empty;
  tg_offer_t o;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  tg_offer_keyring_init(&empty);
  sample(&o);
  CHECK_INT(tg_offer_encode(&empty, &o, tok, sizeof(tok)), -ENOKEY);
  CHECK_INT(tg_offer_encode(&k, &o, tok, 10), -ENOSPC);
  CHECK_STR(tok, "");
  o.amount = -1;
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
  sample(&o);
  o.expires_at = -5;
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
  sample(&o);
  memset(o.tenant, 'x', sizeof(o.tenant)); /* not terminated */
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
  sample(&o);
  memset(o.currency, 'x', sizeof(o.currency));
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
}

TEST(every_flipped_bit_is_rejected) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX], bad[TG_OFFER_TOKEN_MAX];
  uint8_t raw[256];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  CHECK(n > 0);
  int tried = 0;
  for (size_t i = 0; i < n; i++) {
    for (int b = 0; b < 8; b++) {
      raw[i] ^= (uint8_t)(1u << b);
      raw_encode(raw, n, bad);
      int rc = tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d);
      raw[i] ^= (uint8_t)(1u << b);
      if (i == 0)
        CHECK_INT(rc, -EINVAL); /* version */
      else if (i < 5)
        CHECK_INT(rc, -ENOKEY); /* key id 7 with one bit flipped is not in the ring */
      else
        CHECK_INT(rc, -EBADMSG);
      CHECK_INT(d.amount, 0); /* nothing unverified is handed out */
      tried++;
    }
  }
  CHECK_INT(tried, (int)n * 8);
  /* Every single character replaced by another of the alphabet. */
  const char *alpha = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  size_t len = strlen(tok);
  for (size_t i = 0; i < len; i++) {
    for (const char *c = alpha; *c; c++) {
      if (*c == tok[i])
        continue;
      memcpy(bad, tok, len + 1);
      bad[i] = *c;
      CHECK(tg_offer_decode(&k, bad, len, NOW, URI, &d) < 0);
    }
  }
}

TEST(price_change_rejected) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX], bad[TG_OFFER_TOKEN_MAX];
  uint8_t raw[256], other[32];
  keyring(&k);
  sample(&o);
  o.amount = 100; /* a one-byte varint at a known offset */
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  /* header 5, expires_at varint 5 bytes (NOW+300 < 2^35), then amount */
  CHECK_INT(raw[10], 100);
  raw[10] = 1;
  raw_encode(raw, n, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EBADMSG);
  /* Re-signed with a key the gateway does not hold under the same id. */
  key_bytes(KEY2_HEX, other);
  resign(other, raw, n);
  raw_encode(raw, n, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EBADMSG);
  /* A token of another offer with the lower price does not fit this URI. */
  sample(&o);
  o.amount = 1;
  strcpy(o.uri, "https://news.example.com/cheap");
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EXDEV);
}

TEST(expiry_boundary) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), o.expires_at - 1, URI, &d), 0);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), o.expires_at, URI, &d), -ETIMEDOUT);
  CHECK_INT(d.amount, 0);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), o.expires_at + 1000, URI, &d), -ETIMEDOUT);
  /* Expiry is checked after the MAC: a forged token reports the forgery. */
  char bad[TG_OFFER_TOKEN_MAX];
  strcpy(bad, tok);
  bad[20] = bad[20] == 'A' ? 'B' : 'A';
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), o.expires_at + 1000, URI, &d), -EBADMSG);
}

TEST(key_rotation) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char old_tok[TG_OFFER_TOKEN_MAX], new_tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, old_tok, sizeof(old_tok)), 0);

  CHECK_INT(tg_offer_keyring_add_hex(&k, 8, KEY2_HEX, strlen(KEY2_HEX)), 0);
  CHECK_INT(k.active, 7); /* adding does not switch */
  CHECK_INT(tg_offer_keyring_set_active(&k, 8), 0);
  CHECK_INT(tg_offer_encode(&k, &o, new_tok, sizeof(new_tok)), 0);
  CHECK(strcmp(old_tok, new_tok) != 0);
  CHECK_INT(tg_offer_decode(&k, new_tok, strlen(new_tok), NOW, URI, &d), 0);
  CHECK_INT(d.key_id, 8);
  CHECK_INT(tg_offer_decode(&k, old_tok, strlen(old_tok), NOW, URI, &d), 0);
  CHECK_INT(d.key_id, 7);

  CHECK_INT(tg_offer_keyring_remove(&k, 7), 0);
  CHECK_INT(tg_offer_decode(&k, old_tok, strlen(old_tok), NOW, URI, &d), -ENOKEY);
  CHECK_INT(tg_offer_decode(&k, new_tok, strlen(new_tok), NOW, URI, &d), 0);
  CHECK_INT(tg_offer_keyring_remove(&k, 7), -ENOKEY);

  /* Removing the active key leaves nothing to sign with. */
  CHECK_INT(tg_offer_keyring_remove(&k, 8), 0);
  CHECK_INT(tg_offer_encode(&k, &o, new_tok, sizeof(new_tok)), -ENOKEY);
  CHECK_INT(tg_offer_keyring_set_active(&k, 8), -ENOKEY);
}

TEST(keyring_limits) {
  tg_offer_keyring_t k;
  uint8_t key[32] = {1};
  tg_offer_keyring_init(&k);
  CHECK_INT(tg_offer_keyring_add(&k, 1, key, 31), -EINVAL);
  CHECK_INT(tg_offer_keyring_add_hex(&k, 1, KEY1_HEX, 63), -EINVAL);
  CHECK_INT(tg_offer_keyring_add_hex(&k, 1, "zz0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                                     64),
            -EINVAL);
  CHECK_INT(k.n, 0);
  for (uint32_t i = 0; i < TG_OFFER_MAX_KEYS; i++)
    CHECK_INT(tg_offer_keyring_add(&k, i, key, 32), 0);
  CHECK_INT(tg_offer_keyring_add(&k, 100, key, 32), -ENOSPC);
  CHECK_INT(tg_offer_keyring_add(&k, 3, key, 32), -EEXIST);
  CHECK_INT(k.active, 0);
  tg_offer_keyring_clear(&k);
  CHECK_INT(k.n, 0);
  CHECK_INT(k.keys[0].key[0], 0);

  /* Hex and raw forms give the same key. */
  tg_offer_keyring_t a, b;
  tg_offer_t o;
  char ta[TG_OFFER_TOKEN_MAX], tb[TG_OFFER_TOKEN_MAX];
  tg_offer_keyring_init(&a);
  tg_offer_keyring_init(&b);
  key_bytes(KEY2_HEX, key);
  CHECK_INT(tg_offer_keyring_add(&a, 9, key, 32), 0);
  CHECK_INT(tg_offer_keyring_add_hex(&b, 9, KEY2_HEX, 64), 0);
  sample(&o);
  CHECK_INT(tg_offer_encode(&a, &o, ta, sizeof(ta)), 0);
  CHECK_INT(tg_offer_encode(&b, &o, tb, sizeof(tb)), 0);
  CHECK_STR(ta, tb);
}

TEST(unknown_version) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[256], key[32];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  key_bytes(KEY1_HEX, key);
  /* Correctly signed, but a version this gateway does not speak. */
  raw[0] = 2;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  raw[0] = 0;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
}

TEST(signed_but_malformed_body) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[256], key[32];
  keyring(&k);
  key_bytes(KEY1_HEX, key);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  /* Currency length byte claims more than fits: even with a valid tag the
   * body must parse strictly. Offset: 5 + 5 (expiry) + 2 (2500) + 5 u32. */
  CHECK_INT(raw[17], 3);
  raw[17] = 200;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  /* A NUL inside the tenant. */
  n = raw_decode(tok, raw, sizeof(raw));
  raw[17] = 3;
  raw[22] = 0;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
}

TEST(garbage_and_empty) {
  tg_offer_keyring_t k;
  tg_offer_t d;
  keyring(&k);
  CHECK_INT(tg_offer_decode(&k, "", 0, NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, NULL, 0, NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, "A", 1, NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, "hello world", 11, NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, "!!!!", 4, NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, "AAAA", 4, NOW, NULL, &d), -EINVAL);
  char big[4096];
  memset(big, 'A', sizeof(big));
  CHECK_INT(tg_offer_decode(&k, big, sizeof(big), NOW, NULL, &d), -EINVAL);
  uint8_t junk[80];
  char tok[TG_OFFER_TOKEN_MAX];
  for (int i = 0; i < 80; i++)
    junk[i] = (uint8_t)(i * 37 + 11);
  junk[0] = 1;
  raw_encode(junk, sizeof(junk), tok);
  int rc = tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d);
  CHECK(rc == -ENOKEY || rc == -EBADMSG);
}

TEST(non_canonical_spellings_rejected) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX], bad[TG_OFFER_TOKEN_MAX + 8];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t len = strlen(tok);
  /* Padding, standard alphabet, whitespace: all refused. */
  snprintf(bad, sizeof(bad), "%s==", tok);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EINVAL);
  snprintf(bad, sizeof(bad), "%s\n", tok);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EINVAL);
  snprintf(bad, sizeof(bad), " %s", tok);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EINVAL);
  memcpy(bad, tok, len + 1);
  bad[3] = '+';
  CHECK_INT(tg_offer_decode(&k, bad, len, NOW, URI, &d), -EINVAL);
  /* The decode length is honoured: bytes past len are not read. */
  memcpy(bad, tok, len);
  memcpy(bad + len, "XYZ", 4);
  CHECK_INT(tg_offer_decode(&k, bad, len, NOW, URI, &d), 0);
}

TEST(truncated_tokens) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t len = strlen(tok);
  for (size_t l = 0; l < len; l++)
    CHECK(tg_offer_decode(&k, tok, l, NOW, URI, &d) < 0);
  /* Truncation on a byte boundary reaches the MAC check. */
  uint8_t raw[256];
  size_t n = raw_decode(tok, raw, sizeof(raw));
  char bad[TG_OFFER_TOKEN_MAX];
  raw_encode(raw, n - 1, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EBADMSG);
  raw_encode(raw, 20, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, URI, &d), -EINVAL);
}

TEST(uri_mismatch) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW,
                            "https://news.example.com/2024/05/article-1235.html", &d),
            -EXDEV);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, "", &d), -EXDEV);
  char longuri[3000];
  memset(longuri, 'a', sizeof(longuri) - 1);
  longuri[sizeof(longuri) - 1] = '\0';
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, longuri, &d), -EXDEV);
  CHECK_STR(d.uri, "");
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), 0);
}

TEST(strerror_names_every_code) {
  CHECK_STR(tg_offer_strerror(-ETIMEDOUT), "offer expired");
  CHECK(strcmp(tg_offer_strerror(-EBADMSG), tg_offer_strerror(-EINVAL)) != 0);
  CHECK(strcmp(tg_offer_strerror(-ENOKEY), tg_offer_strerror(-EXDEV)) != 0);
  CHECK_STR(tg_offer_strerror(-E2BIG), "offer error");
}
