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

/* Raw token bytes: the longest payload (every field at its widest, a URI of
 * TG_OFFER_URI_MAX bytes) is 2195 bytes, tag included. */
#define RAW_MAX 2304

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
  uint8_t in[9 + RAW_MAX], full[32];
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

static size_t put_varint(uint8_t *p, uint64_t v) {
  size_t n = 0;
  while (v >= 0x80) {
    p[n++] = (uint8_t)(v | 0x80);
    v >>= 7;
  }
  p[n++] = (uint8_t)v;
  return n;
}

/* Hand-builds the bytes of a token for sample()'s fields: version ver, key
 * id 7, the fields, then tail (where version 2 puts the URI's length and
 * bytes, version 1 the URI's hash), then a tag made with key. Returns the
 * length. A test checks that it spells what the encoder does. */
static size_t build(uint8_t *p, uint8_t ver, const uint8_t *tail, size_t tail_len,
                    const uint8_t key[32]) {
  size_t n = 0;
  p[n++] = ver;
  p[n++] = 7;
  p[n++] = 0;
  p[n++] = 0;
  p[n++] = 0;
  n += put_varint(p + n, (uint64_t)(NOW + 300));
  n += put_varint(p + n, 2500);
  n += put_varint(p + n, 3);
  n += put_varint(p + n, 12);
  n += put_varint(p + n, 1);
  n += put_varint(p + n, 2);
  n += put_varint(p + n, 5);
  p[n++] = 3;
  memcpy(p + n, "USD", 3);
  n += 3;
  p[n++] = 12;
  memcpy(p + n, "news-example", 12);
  n += 12;
  memcpy(p + n, tail, tail_len);
  n += tail_len;
  n += TG_OFFER_TAG_LEN;
  resign(key, p, n);
  return n;
}

/* The version 2 tail for uri (len bytes, may hold a NUL): varint + bytes. */
static size_t uri_tail(uint8_t *p, const char *uri, size_t len) {
  size_t n = put_varint(p, len);
  memcpy(p + n, uri, len);
  return n + len;
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

TEST(token_tag_and_uri_are_what_the_header_says) {
  tg_offer_keyring_t k;
  tg_offer_t o;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], copy[RAW_MAX], key[32], tail[64];
  size_t ulen = strlen(URI);
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  CHECK(n > TG_OFFER_TAG_LEN + ulen + 1 + 5);
  CHECK_INT(raw[0], 2);
  CHECK_INT(TG_OFFER_VERSION, 2);
  CHECK_INT(raw[1] | raw[2] << 8 | raw[3] << 16 | raw[4] << 24, 7);
  /* The URI, its length (one varint byte: 50 < 128) first, then the tag. */
  CHECK(ulen < 128);
  CHECK_INT(raw[n - TG_OFFER_TAG_LEN - ulen - 1], ulen);
  CHECK(memcmp(raw + n - TG_OFFER_TAG_LEN - ulen, URI, ulen) == 0);
  /* The tag is HMAC-SHA256(key, "tg-offer\0" || the rest), truncated. */
  memcpy(copy, raw, n);
  key_bytes(KEY1_HEX, key);
  resign(key, copy, n);
  CHECK(memcmp(copy, raw, n) == 0);
  /* The hand builder the tests below use spells exactly what encode does. */
  size_t tl = uri_tail(tail, URI, ulen);
  CHECK_INT(build(copy, 2, tail, tl, key), n);
  CHECK(memcmp(copy, raw, n) == 0);
}

/* The URI given apart yields the very token encode makes (o->uri unread);
 * the per-thread HMAC states stay right when more keys take turns than the
 * thread keeps (each tag checked against mbedtls' one-shot HMAC). */
TEST(encode_uri_is_encode_and_states_follow_keys) {
  tg_offer_keyring_t k;
  tg_offer_t o, other;
  char a[TG_OFFER_TOKEN_MAX], b[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], copy[RAW_MAX], key[32];
  sample(&o);
  other = o;
  strcpy(other.uri, "https://elsewhere.example/not-read");
  for (int round = 0; round < 3; round++)
    for (uint32_t id = 1; id <= 6; id++) {
      tg_offer_keyring_init(&k);
      for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)(id * 37 + i);
      CHECK_INT(tg_offer_keyring_add(&k, id, key, sizeof key), 0);
      CHECK_INT(tg_offer_encode(&k, &o, a, sizeof a), 0);
      CHECK_INT(tg_offer_encode_uri(&k, &other, URI, b, sizeof b), 0);
      CHECK_STR(a, b);
      memset(other.uri, 'x', sizeof other.uri); /* not even terminated: not read */
      CHECK_INT(tg_offer_encode_uri(&k, &other, URI, b, sizeof b), 0);
      CHECK_STR(a, b);
      size_t n = raw_decode(a, raw, sizeof raw);
      CHECK(n > 40 && n <= sizeof raw);
      if (n <= 40 || n > sizeof raw)
        return;
      memcpy(copy, raw, n);
      resign(key, copy, n);
      CHECK(memcmp(copy, raw, n) == 0);
      tg_offer_t d;
      CHECK_INT(tg_offer_decode(&k, b, strlen(b), NOW, NULL, &d), 0);
      CHECK_STR(d.uri, URI);
      CHECK_INT(d.key_id, id);
      tg_offer_keyring_clear(&k);
    }
  keyring(&k);
  strcpy(b, "junk");
  CHECK_INT(tg_offer_encode_uri(&k, &o, NULL, b, sizeof b), -EINVAL);
  CHECK_STR(b, "");
  strcpy(b, "junk");
  CHECK_INT(tg_offer_encode_uri(&k, &o, "", b, sizeof b), -EINVAL);
  CHECK_STR(b, "");
}

/* The token's base64url is the gateway's own encoder: for payloads of every
 * length modulo 3 (tenant names of 1 to 64 bytes) it must spell exactly what
 * mbedTLS' standard base64 spells, translated and unpadded. */
TEST(base64url_matches_the_standard_encoding) {
  tg_offer_keyring_t k;
  tg_offer_t o;
  char tok[TG_OFFER_TOKEN_MAX], want[TG_OFFER_TOKEN_MAX + 4];
  uint8_t raw[RAW_MAX];
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
  /* Payload: header 5, expiry 5 (NOW + 300 < 2^35), amount 2 (2500), five
   * 1-byte varints, currency 1 + 3, tenant 1 + 12, URI 1 + 50, tag 16 = 101
   * bytes; base64url without padding: ceil(101 * 4 / 3) = 135 characters. */
  size_t payload = 5 + 5 + 2 + 5 + 1 + 3 + 1 + 12 + 1 + strlen(URI) + TG_OFFER_TAG_LEN;
  CHECK_INT(payload, 101);
  CHECK_INT(strlen(tok), (payload * 4 + 2) / 3);
  CHECK(strlen(tok) < 160);
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

  /* Without a claimed URI nothing is compared, and the token tells the URI. */
  memset(&d, 0x55, sizeof d);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), 0);
  CHECK_STR(d.uri, URI);
  CHECK_STR(d.tenant, "news-example");
  CHECK_INT(d.amount, 2500);
  CHECK_INT(d.key_id, 7);
  /* The buffer need only fit the token and its NUL. */
  char exact[160];
  size_t len = strlen(tok);
  CHECK_INT(tg_offer_encode(&k, &o, exact, len + 1), 0);
  CHECK_STR(exact, tok);
  CHECK_INT(tg_offer_encode(&k, &o, exact, len), -ENOSPC);
  CHECK_STR(exact, "");
}

TEST(round_trip_extremes) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  keyring(&k);
  memset(&o, 0, sizeof(o));
  memset(o.tenant, 't', 64);
  memset(o.currency, 'C', 16);
  memset(o.uri, 'u', TG_OFFER_URI_MAX); /* the longest URI: 2047 bytes */
  o.uri[TG_OFFER_URI_MAX - 1] = '~';
  o.content = o.license = o.payment = o.payment_type = o.usage_bits = UINT32_MAX;
  o.amount = INT64_MAX;
  o.expires_at = INT64_MAX;
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  printf("  longest token: %zu chars\n", strlen(tok));
  /* 5 + 2 * 9 + 5 * 5 + 1 + 16 + 1 + 64 + 2 + 2047 + 16 = 2195 bytes. */
  CHECK_INT(strlen(tok), (2195 * 4 + 2) / 3);
  CHECK(strlen(tok) < TG_OFFER_TOKEN_MAX);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, o.uri, &d), 0);
  CHECK_INT(strlen(d.tenant), 64);
  CHECK_INT(strlen(d.currency), 16);
  CHECK_INT(strlen(d.uri), TG_OFFER_URI_MAX);
  CHECK(memcmp(d.uri, o.uri, TG_OFFER_URI_MAX + 1) == 0);
  CHECK_INT(d.amount, INT64_MAX);
  CHECK_INT(d.expires_at, INT64_MAX);
  CHECK_INT(d.usage_bits, UINT32_MAX);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), 0);
  CHECK(memcmp(d.uri, o.uri, TG_OFFER_URI_MAX + 1) == 0);
  /* A claim one byte shorter or longer is another resource. */
  char claim[TG_OFFER_URI_MAX + 2];
  memcpy(claim, o.uri, TG_OFFER_URI_MAX);
  claim[TG_OFFER_URI_MAX - 1] = '\0';
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, claim, &d), -EXDEV);
  memcpy(claim, o.uri, TG_OFFER_URI_MAX);
  claim[TG_OFFER_URI_MAX] = 'u';
  claim[TG_OFFER_URI_MAX + 1] = '\0';
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, claim, &d), -EXDEV);
  /* The same through encode_uri, and a URI of 2048 bytes is refused. */
  char a[TG_OFFER_TOKEN_MAX];
  CHECK_INT(tg_offer_encode_uri(&k, &o, o.uri, a, sizeof a), 0);
  CHECK_STR(a, tok);
  CHECK_INT(tg_offer_encode_uri(&k, &o, claim, a, sizeof a), -EINVAL);
  CHECK_STR(a, "");
  memset(o.uri, 'u', sizeof o.uri); /* 2048 bytes, no room for the NUL */
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
  CHECK_STR(tok, "");

  /* All zero, empty strings, the shortest URI. */
  memset(&o, 0, sizeof(o));
  o.expires_at = 1;
  strcpy(o.uri, "/");
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  printf("  shortest token: %zu chars\n", strlen(tok));
  /* 5 + 7 + 1 + 1 + 2 + 16 = 32 bytes. */
  CHECK_INT(strlen(tok), (32 * 4 + 2) / 3);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), 0, "/", &d), 0);
  CHECK_STR(d.tenant, "");
  CHECK_STR(d.currency, "");
  CHECK_STR(d.uri, "/");
  CHECK_INT(d.amount, 0);
  /* An empty URI is no longer something an offer can be made for. */
  o.uri[0] = '\0';
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), -EINVAL);
  CHECK_STR(tok, "");
  CHECK_INT(tg_offer_encode_uri(&k, &o, "", tok, sizeof(tok)), -EINVAL);
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
  uint8_t raw[RAW_MAX];
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
  uint8_t raw[RAW_MAX], other[32];
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
  uint8_t raw[RAW_MAX], key[32];
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  key_bytes(KEY1_HEX, key);
  /* Correctly signed, but a version this gateway does not speak. */
  raw[0] = 3;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  raw[0] = 0;
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  raw[0] = 1; /* a version 2 body under a version 1 byte */
  resign(key, raw, n);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
}

/* Version 1 tokens, as the previous gateway made them (the URI's truncated
 * SHA-256 where version 2 has the URI) and validly signed with a key we
 * hold, are refused as malformed, whatever URI is claimed. */
TEST(version_1_tokens_refused) {
  tg_offer_keyring_t k;
  tg_offer_t d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], key[32], h[32];
  keyring(&k);
  key_bytes(KEY1_HEX, key);
  mbedtls_sha256_ret((const unsigned char *)URI, strlen(URI), h, 0);
  size_t n = build(raw, 1, h, 16, key);
  CHECK_INT(n, 5 + 5 + 2 + 5 + 4 + 13 + 16 + 16);
  raw_encode(raw, n, tok);
  memset(&d, 0x55, sizeof d);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  CHECK_INT(d.amount, 0);
  CHECK_STR(d.uri, "");
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  /* Under version 2 the same bytes are signed but do not parse. */
  n = build(raw, 2, h, 16, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
}

/* Every byte of the URI is covered by the tag. */
TEST(tampered_uri_rejected) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX], bad[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX];
  size_t ulen = strlen(URI);
  keyring(&k);
  sample(&o);
  CHECK_INT(tg_offer_encode(&k, &o, tok, sizeof(tok)), 0);
  size_t n = raw_decode(tok, raw, sizeof(raw));
  size_t at = n - TG_OFFER_TAG_LEN - ulen;
  CHECK(memcmp(raw + at, URI, ulen) == 0);
  /* "article-1234" to "article-1235": the very URI uri_mismatch claims. */
  size_t digit = at + ulen - strlen(".html") - 1;
  CHECK_INT(raw[digit], '4');
  raw[digit] = '5';
  raw_encode(raw, n, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, NULL, &d), -EBADMSG);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW,
                            "https://news.example.com/2024/05/article-1235.html", &d),
            -EBADMSG);
  CHECK_STR(d.uri, "");
  raw[digit] = '4';
  for (size_t i = at; i < at + ulen; i++) {
    raw[i] ^= 0x20;
    raw_encode(raw, n, bad);
    CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, NULL, &d), -EBADMSG);
    raw[i] ^= 0x20;
  }
  /* The length byte too. */
  raw[at - 1]--;
  raw_encode(raw, n, bad);
  CHECK_INT(tg_offer_decode(&k, bad, strlen(bad), NOW, NULL, &d), -EBADMSG);
  raw[at - 1]++;
  raw_encode(raw, n, bad);
  CHECK_STR(bad, tok);
}

/* A URI holding a NUL cannot come out of encode (a C string); one signed by
 * hand is refused, so out->uri is never a truncated URI. */
TEST(uri_with_nul_rejected) {
  tg_offer_keyring_t k;
  tg_offer_t d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], key[32], tail[64];
  char uri[64];
  size_t ulen = strlen(URI);
  keyring(&k);
  key_bytes(KEY1_HEX, key);
  size_t at[] = {0, 8, ulen - 1};
  for (size_t i = 0; i < sizeof at / sizeof at[0]; i++) {
    memcpy(uri, URI, ulen);
    uri[at[i]] = '\0';
    size_t n = build(raw, 2, tail, uri_tail(tail, uri, ulen), key);
    raw_encode(raw, n, tok);
    CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
    CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, uri, &d), -EINVAL); /* the part before the NUL */
    CHECK_INT(d.amount, 0);
  }
  /* A URI of one NUL byte. */
  size_t n = build(raw, 2, (const uint8_t *)"\x01\x00", 2, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, "", &d), -EINVAL);
  /* The same builder with the NUL replaced decodes: it is the NUL refused. */
  n = build(raw, 2, (const uint8_t *)"\x01/", 2, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, "/", &d), 0);
}

/* The URI's length has one spelling: the shortest LEB128, at most 2047. */
TEST(uri_length_must_be_canonical) {
  tg_offer_keyring_t k;
  tg_offer_t d;
  char tok[TG_OFFER_TOKEN_MAX];
  static uint8_t raw[RAW_MAX + 64], tail[TG_OFFER_URI_MAX + 64];
  static char uri[TG_OFFER_URI_MAX + 2];
  uint8_t key[32];
  size_t ulen = strlen(URI), n;
  keyring(&k);
  key_bytes(KEY1_HEX, key);
  /* 50 as two bytes (0xb2 0x00) and as three (0xb2 0x80 0x00). */
  tail[0] = 0x80 | (uint8_t)ulen;
  tail[1] = 0x00;
  memcpy(tail + 2, URI, ulen);
  n = build(raw, 2, tail, 2 + ulen, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  tail[1] = 0x80;
  tail[2] = 0x00;
  memcpy(tail + 3, URI, ulen);
  n = build(raw, 2, tail, 3 + ulen, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  /* The canonical one-byte form of the same URI decodes. */
  n = build(raw, 2, tail, uri_tail(tail, URI, ulen), key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), 0);

  /* 200 bytes: two varint bytes are canonical (0xc8 0x01), three are not. */
  memset(uri, 'p', 200);
  uri[200] = '\0';
  n = build(raw, 2, tail, uri_tail(tail, uri, 200), key);
  CHECK_INT(tail[0], 0xc8);
  CHECK_INT(tail[1], 0x01);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, uri, &d), 0);
  tail[1] = 0x81;
  tail[2] = 0x00;
  memcpy(tail + 3, uri, 200);
  n = build(raw, 2, tail, 3 + 200, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);

  /* Length zero, and a length over TG_OFFER_URI_MAX (2048, canonically
   * 0x80 0x10, with 2048 bytes that fit the payload), signed: refused. */
  n = build(raw, 2, (const uint8_t *)"\x00", 1, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, "", &d), -EINVAL);
  memset(uri, 'p', TG_OFFER_URI_MAX + 1);
  uri[TG_OFFER_URI_MAX + 1] = '\0';
  n = build(raw, 2, tail, uri_tail(tail, uri, TG_OFFER_URI_MAX + 1), key);
  CHECK_INT(tail[0], 0x80);
  CHECK_INT(tail[1], 0x10);
  CHECK(n <= RAW_MAX);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  /* 2047 by hand is the encoder's token. */
  n = build(raw, 2, tail, uri_tail(tail, uri, TG_OFFER_URI_MAX), key);
  raw_encode(raw, n, tok);
  uri[TG_OFFER_URI_MAX] = '\0';
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, uri, &d), 0);
  CHECK_INT(strlen(d.uri), TG_OFFER_URI_MAX);
}

/* The URI runs to the tag: nothing may follow it, and it may not stop short. */
TEST(uri_length_must_match_the_rest) {
  tg_offer_keyring_t k;
  tg_offer_t d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], key[32], tail[128];
  size_t ulen = strlen(URI);
  keyring(&k);
  key_bytes(KEY1_HEX, key);
  size_t tl = uri_tail(tail, URI, ulen);
  /* One trailing byte (of any value), then several. */
  const uint8_t extra[] = {0x00, 'x', 0xff};
  for (size_t i = 0; i < sizeof extra; i++) {
    tail[tl] = extra[i];
    size_t n = build(raw, 2, tail, tl + 1, key);
    raw_encode(raw, n, tok);
    CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
    CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, URI, &d), -EINVAL);
  }
  memcpy(tail + tl, "/more", 5);
  size_t n = build(raw, 2, tail, tl + 5, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  /* The length claims one byte more than there is, or one less. */
  tail[0] = (uint8_t)(ulen + 1);
  n = build(raw, 2, tail, tl, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  tail[0] = (uint8_t)(ulen - 1);
  n = build(raw, 2, tail, tl, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  /* No URI at all: the body ends after the tenant. */
  n = build(raw, 2, tail, 0, key);
  raw_encode(raw, n, tok);
  CHECK_INT(tg_offer_decode(&k, tok, strlen(tok), NOW, NULL, &d), -EINVAL);
  CHECK_INT(d.amount, 0);
}

TEST(signed_but_malformed_body) {
  tg_offer_keyring_t k;
  tg_offer_t o, d;
  char tok[TG_OFFER_TOKEN_MAX];
  uint8_t raw[RAW_MAX], key[32];
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
  junk[0] = TG_OFFER_VERSION;
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
  uint8_t raw[RAW_MAX];
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
