#include "pay/eip3009.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include "base/hex.h"
#include "base/keccak.h"

#define TRANSFER_TYPE                                                                          \
  "TransferWithAuthorization(address from,address to,uint256 value,uint256 validAfter,"        \
  "uint256 validBefore,bytes32 nonce)"
#define DOMAIN_TYPE "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"

/* The order n of secp256k1, and n / 2 (rounded down): s above it is high. */
static const uint8_t curve_n[32] = {
  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
  0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
};
static const uint8_t curve_half_n[32] = {
  0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
  0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
};

static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;
static secp256k1_context *ctx;

static void ctx_create(void) {
  /* Recovery uses no secret, so the context needs no randomization; after this
   * it is only read, which libsecp256k1 allows from any number of threads. */
  ctx = secp256k1_context_create(SECP256K1_CONTEXT_NONE);
}

/* An address as an ABI word: 12 zero bytes, then the 20. */
static void put_address(uint8_t word[32], const uint8_t addr[20]) {
  memset(word, 0, 12);
  memcpy(word + 12, addr, 20);
}

static int is_zero(const uint8_t v[32]) {
  uint8_t acc = 0;
  for (int i = 0; i < 32; i++)
    acc |= v[i];
  return acc == 0;
}

int tg_eip3009_digest(const tg_eip712_domain_t *d, const tg_eip3009_auth_t *a, uint8_t out[32]) {
  uint8_t dom[5 * 32], msg[7 * 32], pre[2 + 2 * 32];
  if (d == NULL || a == NULL || out == NULL || d->name == NULL || d->version == NULL)
    return -EINVAL;

  tg_keccak256(DOMAIN_TYPE, strlen(DOMAIN_TYPE), dom);
  tg_keccak256(d->name, strlen(d->name), dom + 32);
  tg_keccak256(d->version, strlen(d->version), dom + 64);
  memset(dom + 96, 0, 24);
  for (int i = 0; i < 8; i++)
    dom[96 + 24 + i] = (uint8_t)(d->chain_id >> (56 - 8 * i));
  put_address(dom + 128, d->verifying_contract);

  tg_keccak256(TRANSFER_TYPE, strlen(TRANSFER_TYPE), msg);
  put_address(msg + 32, a->from);
  put_address(msg + 64, a->to);
  memcpy(msg + 96, a->value, 32);
  memcpy(msg + 128, a->valid_after, 32);
  memcpy(msg + 160, a->valid_before, 32);
  memcpy(msg + 192, a->nonce, 32);

  pre[0] = 0x19;
  pre[1] = 0x01;
  tg_keccak256(dom, sizeof dom, pre + 2);
  tg_keccak256(msg, sizeof msg, pre + 34);
  tg_keccak256(pre, sizeof pre, out);
  return 0;
}

int tg_eip3009_recover(const uint8_t digest[32], const uint8_t sig[65], uint8_t signer[20]) {
  secp256k1_ecdsa_recoverable_signature rsig;
  secp256k1_pubkey pub;
  uint8_t raw[65], hash[32];
  size_t rawlen = sizeof raw;
  if (digest == NULL || sig == NULL || signer == NULL)
    return -EINVAL;
  const uint8_t *r = sig, *s = sig + 32; /* after the NULL check: no offset on a null pointer */
  if (sig[64] != 27 && sig[64] != 28)
    return -EBADMSG;
  /* Big-endian byte strings of equal length compare as numbers with memcmp. */
  if (is_zero(r) || is_zero(s) || memcmp(r, curve_n, 32) >= 0 || memcmp(s, curve_half_n, 32) > 0)
    return -EBADMSG;
  if (pthread_once(&ctx_once, ctx_create) != 0 || ctx == NULL)
    return -ENOMEM;
  if (!secp256k1_ecdsa_recoverable_signature_parse_compact(ctx, &rsig, sig, sig[64] - 27) ||
      !secp256k1_ecdsa_recover(ctx, &pub, &rsig, digest) ||
      !secp256k1_ec_pubkey_serialize(ctx, raw, &rawlen, &pub, SECP256K1_EC_UNCOMPRESSED) ||
      rawlen != 65)
    return -EBADMSG;
  tg_keccak256(raw + 1, 64, hash); /* without the 0x04 prefix */
  memcpy(signer, hash + 12, 20);
  return 0;
}

int tg_eip3009_verify(const tg_eip712_domain_t *d, const tg_eip3009_auth_t *a, const uint8_t sig[65]) {
  uint8_t digest[32], signer[20];
  int rc;
  if ((rc = tg_eip3009_digest(d, a, digest)) != 0)
    return rc;
  if ((rc = tg_eip3009_recover(digest, sig, signer)) != 0)
    return rc;
  return memcmp(signer, a->from, 20) == 0 ? 0 : -EPERM;
}

/* "0x" and exactly n bytes of hex, into out (which is written only on success).
 * lower/upper, when not NULL, say whether any a-f / A-F digit was seen. */
static int parse_hex(const char *s, uint8_t *out, size_t n, int *lower, int *upper) {
  uint8_t tmp[65];
  int lo = 0, up = 0;
  if (s == NULL || out == NULL || n > sizeof tmp || s[0] != '0' || s[1] != 'x')
    return -EINVAL;
  s += 2;
  for (size_t i = 0; i < 2 * n; i++) {
    int v = tg_hex_value(s[i]); /* the NUL of a short string is -1 */
    if (v < 0)
      return -EINVAL;
    lo |= s[i] >= 'a' && s[i] <= 'f';
    up |= s[i] >= 'A' && s[i] <= 'F';
    if (i % 2 == 0)
      tmp[i / 2] = (uint8_t)(v << 4);
    else
      tmp[i / 2] |= (uint8_t)v;
  }
  if (s[2 * n] != '\0')
    return -EINVAL;
  memcpy(out, tmp, n);
  if (lower)
    *lower = lo;
  if (upper)
    *upper = up;
  return 0;
}

/* EIP-55: hex digit i is uppercase when nibble i of keccak256(lowercase hex) is 8 or more. */
static void checksum_case(const uint8_t addr[20], char hex[41]) {
  uint8_t h[32];
  tg_hex_encode(addr, 20, hex);
  tg_keccak256(hex, 40, h);
  for (int i = 0; i < 40; i++) {
    int nibble = i % 2 == 0 ? h[i / 2] >> 4 : h[i / 2] & 0x0f;
    if (hex[i] >= 'a' && nibble >= 8)
      hex[i] = (char)(hex[i] - 'a' + 'A');
  }
}

int tg_eip3009_parse_address(const char *s, uint8_t out[20]) {
  uint8_t addr[20];
  char want[41];
  int lower, upper;
  if (parse_hex(s, addr, 20, &lower, &upper) != 0)
    return -EINVAL;
  if (lower && upper) {
    checksum_case(addr, want);
    if (memcmp(s + 2, want, 40) != 0)
      return -EINVAL;
  }
  memcpy(out, addr, 20);
  return 0;
}

int tg_eip3009_parse_uint256(const char *s, uint8_t out[32]) {
  uint8_t v[32] = {0};
  size_t n;
  if (s == NULL || out == NULL)
    return -EINVAL;
  n = strlen(s);
  if (n == 0 || n > 78 || (s[0] == '0' && n > 1))
    return -EINVAL;
  for (size_t i = 0; i < n; i++) {
    unsigned carry;
    if (s[i] < '0' || s[i] > '9')
      return -EINVAL;
    carry = (unsigned)(s[i] - '0');
    for (int k = 31; k >= 0; k--) { /* v = v * 10 + digit */
      unsigned t = v[k] * 10u + carry;
      v[k] = (uint8_t)t;
      carry = t >> 8;
    }
    if (carry != 0) /* above 2^256 - 1 */
      return -EINVAL;
  }
  memcpy(out, v, 32);
  return 0;
}

int tg_eip3009_parse_bytes32(const char *s, uint8_t out[32]) {
  return parse_hex(s, out, 32, NULL, NULL);
}

int tg_eip3009_parse_signature(const char *s, uint8_t out[65]) {
  return parse_hex(s, out, 65, NULL, NULL);
}

void tg_eip3009_format_address(const uint8_t addr[20], char out[43]) {
  out[0] = '0';
  out[1] = 'x';
  checksum_case(addr, out + 2);
}
