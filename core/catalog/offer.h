#ifndef TG_OFFER_H
#define TG_OFFER_H

#include <stddef.h>
#include <stdint.h>

/* Offer tokens: the id of an offer returned by DiscoverResources, which the
 * gateway verifies later (at Exchange) without keeping any state. The token
 * carries every priced field and an HMAC-SHA256 tag over them, so a client
 * cannot change the price, the terms, the tenant or the expiry it accepts.
 *
 * Wire format, version 2 (all integers little-endian):
 *   u8      version (2)
 *   u32     key_id          fixed width, so the key is chosen without parsing
 *   varint  expires_at      unsigned LEB128, seconds since the Unix epoch
 *   varint  amount          atomic units of the currency (never negative)
 *   varint  content, license, payment, payment_type, usage_bits
 *   u8 len + bytes  currency (at most 16)
 *   u8 len + bytes  tenant   (at most 64)
 *   varint + bytes  uri      (1 to 2047 bytes): the resource the offer is for
 *   16 bytes        HMAC-SHA256(key, "tg-offer\0" || everything above), truncated
 * then base64url without padding. A token for a 50-byte URI is 135 characters; the longest, 2927.
 *
 * Version 1 carried a 128-bit hash of the URI instead of the URI: an offer
 * could be verified against a URI the client named, but a purchase that
 * names only the offer id (ExecuteTransaction) could not learn what to sign.
 * Version 1 tokens are refused as malformed (they lived offer_ttl_s).
 *
 * The tag is truncated to 128 bits (RFC 2104 section 5 allows truncation to
 * half the hash length); forging one still costs 2^128 tries. The URI is
 * public (the client named it), so carrying it costs no secrecy.
 *
 * Expiry: expires_at is the first second at which the offer is no longer
 * valid: an offer is accepted while now < expires_at.
 *
 * Only one spelling of a token decodes: the base64url alphabet without
 * padding or whitespace, and the decoded bytes must re-encode to the very
 * same string, so a token can serve as an idempotency key. */

#define TG_OFFER_VERSION 2
#define TG_OFFER_KEY_LEN 32   /* HMAC-SHA256 key bytes */
#define TG_OFFER_MAX_KEYS 8   /* keys held at once: the active one plus those being retired */
#define TG_OFFER_TAG_LEN 16   /* truncated HMAC-SHA256 */
#define TG_OFFER_URI_MAX 2047  /* bytes of a URI an offer can be made for */
#define TG_OFFER_TOKEN_MAX 3072 /* buffer size that fits any token and its NUL */

typedef struct tg_offer {
  char tenant[65];       /* NUL-terminated, at most 64 bytes */
  char uri[TG_OFFER_URI_MAX + 1]; /* NUL-terminated, 1 to TG_OFFER_URI_MAX bytes */
  uint32_t content, license, payment;
  int64_t amount;        /* atomic units (micro-USD for USD); >= 0 */
  char currency[17];     /* NUL-terminated, at most 16 bytes */
  uint32_t payment_type;
  uint32_t usage_bits;
  int64_t expires_at;    /* Unix seconds, first invalid second; >= 0 */
  uint32_t key_id;       /* set by decode to the key that signed; ignored by encode */
} tg_offer_t;

typedef struct tg_offer_key {
  uint32_t id;
  uint8_t key[TG_OFFER_KEY_LEN];
} tg_offer_key_t;

/* The HMAC keys. Set up on one thread, then read-only: any number of threads
 * may encode and decode with the same keyring at once. A rotation builds a
 * new keyring (new key active, old keys kept for verification until the
 * longest offer lifetime has passed) and publishes it the way configuration
 * is published. The keyring holds secrets: never log it; tg_offer_keyring_clear
 * wipes it. Plain struct, no heap: the caller owns its storage. */
typedef struct tg_offer_keyring {
  tg_offer_key_t keys[TG_OFFER_MAX_KEYS];
  size_t n;
  uint32_t active; /* key id used by encode; meaningful when has_active */
  int has_active;
} tg_offer_keyring_t;

/* Empties k (no key, none active). */
void tg_offer_keyring_init(tg_offer_keyring_t *k);

/* Adds a key of exactly TG_OFFER_KEY_LEN bytes (copied). The first key added
 * becomes the active one. Returns 0, -EINVAL (wrong length, NULL), -EEXIST
 * (id already present) or -ENOSPC (TG_OFFER_MAX_KEYS held). */
int tg_offer_keyring_add(tg_offer_keyring_t *k, uint32_t id, const uint8_t *key, size_t len);

/* The same from hex (2 * TG_OFFER_KEY_LEN digits, either case; len bytes of
 * hex, not NUL-terminated). -EINVAL for a wrong length or a non-hex digit. */
int tg_offer_keyring_add_hex(tg_offer_keyring_t *k, uint32_t id, const char *hex, size_t len);

/* Makes key id the one encode signs with. 0 or -ENOKEY. */
int tg_offer_keyring_set_active(tg_offer_keyring_t *k, uint32_t id);

/* Removes and wipes key id: tokens it signed no longer verify (-ENOKEY).
 * Removing the active key leaves no active key, so encode fails with -ENOKEY
 * until another is made active. 0 or -ENOKEY. */
int tg_offer_keyring_remove(tg_offer_keyring_t *k, uint32_t id);

/* Wipes every key (mbedtls_platform_zeroize) and empties k. */
void tg_offer_keyring_clear(tg_offer_keyring_t *k);

/* Writes the token for o, signed with the active key, NUL-terminated, into
 * out (TG_OFFER_TOKEN_MAX bytes always suffice). o->key_id is ignored.
 * Returns 0, -ENOKEY (no active key), -EINVAL (a string not terminated within
 * its field or too long, an empty URI or one above TG_OFFER_URI_MAX bytes,
 * amount or expires_at negative) or -ENOSPC (outlen
 * too small). On error out holds an empty string if outlen > 0. */
int tg_offer_encode(const tg_offer_keyring_t *k, const tg_offer_t *o, char *out, size_t outlen);

/* tg_offer_encode with the URI given apart (NUL-terminated, 1 to
 * TG_OFFER_URI_MAX bytes); o->uri is not read, so a caller signing several
 * offers for one URI need not copy it. The token is the same. */
int tg_offer_encode_uri(const tg_offer_keyring_t *k, const tg_offer_t *o, const char *uri, char *out,
                        size_t outlen);

/* Verifies token (len bytes, not necessarily NUL-terminated) and fills out.
 * Checks, in this order, and returns the first failure:
 *   -EINVAL     malformed: empty, not base64url, not canonical, wrong length,
 *               unknown version, fields that do not parse
 *   -ENOKEY     the key id is not in k (retired, or never ours)
 *   -EBADMSG    the tag does not match (compared in constant time)
 *   -ETIMEDOUT  now >= expires_at
 *   -EXDEV      uri is not NULL and is not the URI the offer was made for
 * Only the version and the key id are read before the tag is verified, and
 * only to choose the key. out->uri is the URI the offer was made for.
 * On any error out is zeroed, so no unverified field can leak out. */
int tg_offer_decode(const tg_offer_keyring_t *k, const char *token, size_t len, int64_t now,
                    const char *uri, tg_offer_t *out);

/* A short human-readable reason for a code returned above ("expired", ...). */
const char *tg_offer_strerror(int rc);

#endif
