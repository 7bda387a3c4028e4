#include "catalog/offer.h"
#include "base/b64.h"
#include "base/hex.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/constant_time.h>
#include <mbedtls/md.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/sha256.h>

#define HEADER_LEN 5 /* version + fixed-width key id */
#define MIN_PAYLOAD (HEADER_LEN + 7 + 2 + 2) /* seven 1-byte varints, two empty strings, a 1-byte URI */
#define MAX_PAYLOAD (HEADER_LEN + 2 * 9 + 5 * 5 + 1 + 16 + 1 + 64 + 2 + TG_OFFER_URI_MAX + TG_OFFER_TAG_LEN)

_Static_assert(4 * ((MAX_PAYLOAD + 2) / 3) < TG_OFFER_TOKEN_MAX, "TG_OFFER_TOKEN_MAX fits every token");

/* Domain separation: a key shared by mistake with another HMAC use in the
 * gateway still cannot turn that use's tags into offer tags. */
static const char mac_context[] = "tg-offer"; /* MACed with its NUL */

void tg_offer_keyring_init(tg_offer_keyring_t *k) {
  memset(k, 0, sizeof(*k));
}

static tg_offer_key_t *find_key(const tg_offer_keyring_t *k, uint32_t id) {
  for (size_t i = 0; i < k->n; i++)
    if (k->keys[i].id == id)
      return (tg_offer_key_t *)&k->keys[i];
  return NULL;
}

int tg_offer_keyring_add(tg_offer_keyring_t *k, uint32_t id, const uint8_t *key, size_t len) {
  if (k == NULL || key == NULL || len != TG_OFFER_KEY_LEN)
    return -EINVAL;
  if (find_key(k, id))
    return -EEXIST;
  if (k->n >= TG_OFFER_MAX_KEYS)
    return -ENOSPC;
  k->keys[k->n].id = id;
  memcpy(k->keys[k->n].key, key, TG_OFFER_KEY_LEN);
  k->n++;
  if (!k->has_active) {
    k->active = id;
    k->has_active = 1;
  }
  return 0;
}

int tg_offer_keyring_add_hex(tg_offer_keyring_t *k, uint32_t id, const char *hex, size_t len) {
  uint8_t key[TG_OFFER_KEY_LEN];
  int rc = -EINVAL;
  if (hex == NULL || len != 2 * TG_OFFER_KEY_LEN)
    return -EINVAL;
  for (size_t i = 0; i < TG_OFFER_KEY_LEN; i++) {
    int hi = tg_hex_value(hex[2 * i]), lo = tg_hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0)
      goto done;
    key[i] = (uint8_t)(hi << 4 | lo);
  }
  rc = tg_offer_keyring_add(k, id, key, sizeof(key));
done:
  mbedtls_platform_zeroize(key, sizeof(key));
  return rc;
}

int tg_offer_keyring_set_active(tg_offer_keyring_t *k, uint32_t id) {
  if (find_key(k, id) == NULL)
    return -ENOKEY;
  k->active = id;
  k->has_active = 1;
  return 0;
}

int tg_offer_keyring_remove(tg_offer_keyring_t *k, uint32_t id) {
  tg_offer_key_t *key = find_key(k, id);
  if (key == NULL)
    return -ENOKEY;
  size_t i = (size_t)(key - k->keys);
  memmove(&k->keys[i], &k->keys[i + 1], (k->n - i - 1) * sizeof(k->keys[0]));
  k->n--;
  mbedtls_platform_zeroize(&k->keys[k->n], sizeof(k->keys[0]));
  if (k->has_active && k->active == id) {
    k->has_active = 0;
    k->active = 0;
  }
  return 0;
}

void tg_offer_keyring_clear(tg_offer_keyring_t *k) {
  mbedtls_platform_zeroize(k, sizeof(*k));
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

/* Strict: at most max_bytes, no value above max, no overlong zero tail, so
 * each value has exactly one encoding. Returns bytes read or 0 on error. */
static size_t get_varint(const uint8_t *p, size_t avail, size_t max_bytes, uint64_t max,
                         uint64_t *out) {
  uint64_t v = 0;
  for (size_t i = 0; i < avail && i < max_bytes; i++) {
    v |= (uint64_t)(p[i] & 0x7f) << (7 * i);
    if (!(p[i] & 0x80)) {
      if (i > 0 && p[i] == 0)
        return 0;
      if (v > max)
        return 0;
      *out = v;
      return i + 1;
    }
  }
  return 0;
}

static void put_u32le(uint8_t *p, uint32_t v) {
  p[0] = (uint8_t)v;
  p[1] = (uint8_t)(v >> 8);
  p[2] = (uint8_t)(v >> 16);
  p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_u32le(const uint8_t *p) {
  return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Per-thread HMAC-SHA256 states with the key already absorbed: the inner
 * hash after K^ipad and the domain separation string, the outer one after
 * K^opad. A tag then costs the compressions of the message and one for the
 * outer hash (three for an offer), against five through mbedtls_md_hmac,
 * which absorbs both pads again on every call; Discover signs every offer it
 * answers. Found by the key's bytes, so a rotated keyring never reuses a
 * stale state. The tags are plain HMAC-SHA256 (RFC 2104), as before. */
#define HMAC_CACHE 4
#define SHA256_BLOCK 64

typedef struct hmac_cache {
  struct {
    int used;
    uint8_t key[TG_OFFER_KEY_LEN];
    mbedtls_sha256_context inner, outer;
  } e[HMAC_CACHE];
  unsigned next;
} hmac_cache_t;

static pthread_key_t hmac_key;
static pthread_once_t hmac_once = PTHREAD_ONCE_INIT;

static void hmac_cache_free(void *p) {
  hmac_cache_t *c = p;
  for (unsigned i = 0; i < HMAC_CACHE; i++)
    if (c->e[i].used) {
      mbedtls_sha256_free(&c->e[i].inner);
      mbedtls_sha256_free(&c->e[i].outer);
    }
  mbedtls_platform_zeroize(c, sizeof *c);
  free(c);
}

static void hmac_key_init(void) { pthread_key_create(&hmac_key, hmac_cache_free); }

/* Absorbs the key xor pad (a whole block) into a fresh context. */
static int absorb_pad(mbedtls_sha256_context *ctx, const uint8_t *key, uint8_t pad) {
  uint8_t block[SHA256_BLOCK];
  memset(block, pad, sizeof block);
  for (size_t i = 0; i < TG_OFFER_KEY_LEN; i++)
    block[i] ^= key[i];
  mbedtls_sha256_init(ctx);
  int rc = mbedtls_sha256_starts_ret(ctx, 0) != 0 || mbedtls_sha256_update_ret(ctx, block, sizeof block) != 0;
  mbedtls_platform_zeroize(block, sizeof block);
  return rc ? -EIO : 0;
}

static int hmac_states(const tg_offer_key_t *key, mbedtls_sha256_context **inner,
                       mbedtls_sha256_context **outer) {
  pthread_once(&hmac_once, hmac_key_init);
  hmac_cache_t *c = pthread_getspecific(hmac_key);
  if (c == NULL) {
    if ((c = calloc(1, sizeof *c)) == NULL || pthread_setspecific(hmac_key, c) != 0) {
      free(c);
      return -ENOMEM;
    }
  }
  unsigned i;
  for (i = 0; i < HMAC_CACHE; i++)
    if (c->e[i].used && mbedtls_ct_memcmp(c->e[i].key, key->key, sizeof key->key) == 0)
      break;
  if (i == HMAC_CACHE) {
    i = c->next++ % HMAC_CACHE;
    if (c->e[i].used) {
      mbedtls_sha256_free(&c->e[i].inner);
      mbedtls_sha256_free(&c->e[i].outer);
      c->e[i].used = 0;
    }
    /* The key is 32 bytes, under the block size: used as is (RFC 2104 2). */
    if (absorb_pad(&c->e[i].inner, key->key, 0x36) != 0 ||
        mbedtls_sha256_update_ret(&c->e[i].inner, (const unsigned char *)mac_context, sizeof mac_context) != 0 ||
        absorb_pad(&c->e[i].outer, key->key, 0x5c) != 0) {
      mbedtls_sha256_free(&c->e[i].inner);
      mbedtls_sha256_free(&c->e[i].outer);
      return -EIO;
    }
    memcpy(c->e[i].key, key->key, sizeof key->key);
    c->e[i].used = 1;
  }
  *inner = &c->e[i].inner;
  *outer = &c->e[i].outer;
  return 0;
}

static int compute_tag(const tg_offer_key_t *key, const uint8_t *msg, size_t len,
                       uint8_t tag[TG_OFFER_TAG_LEN]) {
  uint8_t full[32];
  mbedtls_sha256_context *inner, *outer;
  if (len > MAX_PAYLOAD)
    return -EIO;
  if (hmac_states(key, &inner, &outer) == 0) {
    mbedtls_sha256_context ctx;
    mbedtls_sha256_init(&ctx);
    mbedtls_sha256_clone(&ctx, inner);
    int bad = mbedtls_sha256_update_ret(&ctx, msg, len) != 0 || mbedtls_sha256_finish_ret(&ctx, full) != 0;
    if (!bad) {
      mbedtls_sha256_clone(&ctx, outer);
      bad = mbedtls_sha256_update_ret(&ctx, full, sizeof full) != 0 || mbedtls_sha256_finish_ret(&ctx, full) != 0;
    }
    mbedtls_sha256_free(&ctx);
    if (!bad) {
      memcpy(tag, full, TG_OFFER_TAG_LEN);
      mbedtls_platform_zeroize(full, sizeof(full));
      return 0;
    }
  }
  /* No per-thread state (out of memory): the one-shot HMAC, same tag. */
  uint8_t input[sizeof(mac_context) + MAX_PAYLOAD];
  const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
  memcpy(input, mac_context, sizeof(mac_context));
  memcpy(input + sizeof(mac_context), msg, len);
  if (md == NULL || mbedtls_md_hmac(md, key->key, sizeof(key->key), input, sizeof(mac_context) + len, full) != 0)
    return -EIO;
  memcpy(tag, full, TG_OFFER_TAG_LEN);
  mbedtls_platform_zeroize(full, sizeof(full));
  return 0;
}


static int encode(const tg_offer_keyring_t *k, const tg_offer_t *o, const char *uri, char *out,
                  size_t outlen) {
  uint8_t buf[MAX_PAYLOAD];
  size_t n = 0;
  int rc;
  if (out != NULL && outlen > 0)
    out[0] = '\0';
  if (k == NULL || o == NULL || out == NULL || uri == NULL)
    return -EINVAL;
  size_t uri_len = strnlen(uri, TG_OFFER_URI_MAX + 1);
  if (uri_len == 0 || uri_len > TG_OFFER_URI_MAX)
    return -EINVAL;
  const tg_offer_key_t *key = k->has_active ? find_key(k, k->active) : NULL;
  if (key == NULL)
    return -ENOKEY;
  size_t tenant_len = strnlen(o->tenant, sizeof(o->tenant));
  size_t currency_len = strnlen(o->currency, sizeof(o->currency));
  if (tenant_len == sizeof(o->tenant) || currency_len == sizeof(o->currency) || o->amount < 0 ||
      o->expires_at < 0)
    return -EINVAL;

  buf[n++] = TG_OFFER_VERSION;
  put_u32le(buf + n, key->id);
  n += 4;
  n += put_varint(buf + n, (uint64_t)o->expires_at);
  n += put_varint(buf + n, (uint64_t)o->amount);
  n += put_varint(buf + n, o->content);
  n += put_varint(buf + n, o->license);
  n += put_varint(buf + n, o->payment);
  n += put_varint(buf + n, o->payment_type);
  n += put_varint(buf + n, o->usage_bits);
  buf[n++] = (uint8_t)currency_len;
  memcpy(buf + n, o->currency, currency_len);
  n += currency_len;
  buf[n++] = (uint8_t)tenant_len;
  memcpy(buf + n, o->tenant, tenant_len);
  n += tenant_len;
  n += put_varint(buf + n, uri_len);
  memcpy(buf + n, uri, uri_len);
  n += uri_len;
  if ((rc = compute_tag(key, buf, n, buf + n)) < 0)
    return rc;
  n += TG_OFFER_TAG_LEN;
  return tg_b64_encode(buf, n, 1, 0, out, outlen);
}

int tg_offer_encode(const tg_offer_keyring_t *k, const tg_offer_t *o, char *out, size_t outlen) {
  return encode(k, o, o ? o->uri : NULL, out, outlen);
}

int tg_offer_encode_uri(const tg_offer_keyring_t *k, const tg_offer_t *o, const char *uri, char *out,
                        size_t outlen) {
  return encode(k, o, uri, out, outlen);
}

/* Strict base64url (base/b64.h): one spelling per payload. */
static int b64url_decode(const char *token, size_t len, uint8_t *out, size_t *outlen) {
  if (len == 0)
    return -EINVAL;
  return tg_b64url_decode(token, len, out, MAX_PAYLOAD, outlen) == 0 ? 0 : -EINVAL;
}

/* Parses the authenticated body (everything between the header and the
 * tag). Only called once the tag has been verified. */
static int parse_body(const uint8_t *p, size_t len, tg_offer_t *o) {
  uint64_t v[7];
  static const uint64_t max[7] = {INT64_MAX, INT64_MAX, UINT32_MAX, UINT32_MAX,
                                  UINT32_MAX, UINT32_MAX, UINT32_MAX};
  size_t off = 0;
  for (int i = 0; i < 7; i++) {
    size_t used = get_varint(p + off, len - off, i < 2 ? 9 : 5, max[i], &v[i]);
    if (used == 0)
      return -EINVAL;
    off += used;
  }
  o->expires_at = (int64_t)v[0];
  o->amount = (int64_t)v[1];
  o->content = (uint32_t)v[2];
  o->license = (uint32_t)v[3];
  o->payment = (uint32_t)v[4];
  o->payment_type = (uint32_t)v[5];
  o->usage_bits = (uint32_t)v[6];

  char *dst[2] = {o->currency, o->tenant};
  size_t cap[2] = {sizeof(o->currency) - 1, sizeof(o->tenant) - 1};
  for (int i = 0; i < 2; i++) {
    if (off >= len)
      return -EINVAL;
    size_t slen = p[off++];
    if (slen > cap[i] || slen > len - off || memchr(p + off, '\0', slen) != NULL)
      return -EINVAL;
    memcpy(dst[i], p + off, slen);
    dst[i][slen] = '\0';
    off += slen;
  }
  uint64_t ulen;
  size_t used = get_varint(p + off, len - off, 2, TG_OFFER_URI_MAX, &ulen);
  if (used == 0 || ulen == 0 || ulen != len - off - used || memchr(p + off + used, '\0', ulen) != NULL)
    return -EINVAL;
  memcpy(o->uri, p + off + used, ulen);
  o->uri[ulen] = '\0';
  return 0;
}

int tg_offer_decode(const tg_offer_keyring_t *k, const char *token, size_t len, int64_t now,
                    const char *uri, tg_offer_t *out) {
  uint8_t buf[MAX_PAYLOAD];
  uint8_t tag[TG_OFFER_TAG_LEN];
  size_t n = 0;
  int rc;
  if (out == NULL)
    return -EINVAL;
  memset(out, 0, sizeof(*out));
  if (k == NULL || (token == NULL && len > 0))
    return -EINVAL;
  if ((rc = b64url_decode(token, len, buf, &n)) < 0)
    goto fail;
  rc = -EINVAL;
  if (n < MIN_PAYLOAD + TG_OFFER_TAG_LEN || buf[0] != TG_OFFER_VERSION)
    goto fail;

  const tg_offer_key_t *key = find_key(k, get_u32le(buf + 1));
  rc = -ENOKEY;
  if (key == NULL)
    goto fail;
  size_t signed_len = n - TG_OFFER_TAG_LEN;
  if ((rc = compute_tag(key, buf, signed_len, tag)) < 0)
    goto fail;
  rc = -EBADMSG;
  if (mbedtls_ct_memcmp(tag, buf + signed_len, TG_OFFER_TAG_LEN) != 0)
    goto fail;

  if ((rc = parse_body(buf + HEADER_LEN, signed_len - HEADER_LEN, out)) < 0)
    goto fail;
  out->key_id = key->id;
  rc = -ETIMEDOUT;
  if (now >= out->expires_at)
    goto fail;
  rc = -EXDEV;
  if (uri != NULL && strcmp(uri, out->uri) != 0)
    goto fail;
  return 0;

fail:
  memset(out, 0, sizeof(*out));
  return rc;
}

const char *tg_offer_strerror(int rc) {
  switch (rc) {
  case 0:
    return "ok";
  case -EINVAL:
    return "malformed offer id";
  case -ENOKEY:
    return "offer id signed with an unknown or retired key";
  case -EBADMSG:
    return "offer id signature does not match";
  case -ETIMEDOUT:
    return "offer expired";
  case -EXDEV:
    return "offer was made for another resource";
  case -ENOSPC:
    return "buffer too small for an offer id";
  case -EIO:
    return "crypto failure";
  default:
    return "offer error";
  }
}
