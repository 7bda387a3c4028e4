/* A test helper for core/pay/eip3009 (local verification of an x402 "exact"
 * EVM payment), until the gateway verifies by itself:
 *
 *   tg_eip3009_verify NAME VERSION CHAIN_ID CONTRACT FROM TO VALUE VALID_AFTER VALID_BEFORE NONCE SIGNATURE
 *     the arguments in their x402 wire form (addresses 0x-hex, numbers decimal,
 *     nonce 0x + 32 bytes, signature 0x + 65 bytes). Prints "digest 0x<64 hex>",
 *     then "signer 0x<EIP-55 address>" when one recovers. Exit 0 when the
 *     signer is FROM, 1 otherwise ("verify: <code> <reason>" on stderr).
 *   tg_eip3009_verify --keccak HEX
 *     prints keccak256 of the bytes HEX (no 0x; may be empty) as 0x<64 hex>.
 * Exit 2 on bad usage or a malformed argument. Used by spec/interop/eip3009.test.js
 * against viem. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/hex.h"
#include "base/keccak.h"
#include "pay/eip3009.h"

static int usage(const char *why) {
  fprintf(stderr, "usage: %s (see the comment at the top of spec/e2e/eip3009_verify.c)\n", why);
  return 2;
}

static int keccak_hex(const char *hex) {
  size_t n = strlen(hex);
  uint8_t *buf, out[32];
  char text[65];
  if (n % 2 != 0 || (buf = malloc(n / 2 + 1)) == NULL)
    return usage("--keccak wants an even number of hex digits");
  for (size_t i = 0; i < n / 2; i++) {
    int hi = tg_hex_value(hex[2 * i]), lo = tg_hex_value(hex[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      free(buf);
      return usage("--keccak wants hex");
    }
    buf[i] = (uint8_t)(hi << 4 | lo);
  }
  tg_keccak256(buf, n / 2, out);
  free(buf);
  tg_hex_encode(out, 32, text);
  printf("0x%s\n", text);
  return 0;
}

static int parse_chain_id(const char *s, uint64_t *out) {
  char *end;
  if (s[0] < '0' || s[0] > '9')
    return -EINVAL;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 10);
  if (errno != 0 || *end != '\0')
    return -EINVAL;
  *out = v;
  return 0;
}

int main(int argc, char **argv) {
  tg_eip712_domain_t d = {0};
  tg_eip3009_auth_t a;
  uint8_t sig[65], digest[32], signer[20];
  char hex[65], addr[43];
  int rc;
  if (argc == 3 && strcmp(argv[1], "--keccak") == 0)
    return keccak_hex(argv[2]);
  if (argc != 12)
    return usage("wrong number of arguments");
  d.name = argv[1];
  d.version = argv[2];
  if (parse_chain_id(argv[3], &d.chain_id) != 0)
    return usage("CHAIN_ID");
  if (tg_eip3009_parse_address(argv[4], d.verifying_contract) != 0)
    return usage("CONTRACT");
  if (tg_eip3009_parse_address(argv[5], a.from) != 0)
    return usage("FROM");
  if (tg_eip3009_parse_address(argv[6], a.to) != 0)
    return usage("TO");
  if (tg_eip3009_parse_uint256(argv[7], a.value) != 0)
    return usage("VALUE");
  if (tg_eip3009_parse_uint256(argv[8], a.valid_after) != 0)
    return usage("VALID_AFTER");
  if (tg_eip3009_parse_uint256(argv[9], a.valid_before) != 0)
    return usage("VALID_BEFORE");
  if (tg_eip3009_parse_bytes32(argv[10], a.nonce) != 0)
    return usage("NONCE");
  if (tg_eip3009_parse_signature(argv[11], sig) != 0)
    return usage("SIGNATURE");

  if ((rc = tg_eip3009_digest(&d, &a, digest)) != 0) {
    fprintf(stderr, "verify: %d digest: %s\n", rc, strerror(-rc));
    return 1;
  }
  tg_hex_encode(digest, 32, hex);
  printf("digest 0x%s\n", hex);
  if ((rc = tg_eip3009_recover(digest, sig, signer)) != 0) {
    fprintf(stderr, "verify: %d recover: %s\n", rc, strerror(-rc));
    return 1;
  }
  tg_eip3009_format_address(signer, addr);
  printf("signer %s\n", addr);
  if ((rc = tg_eip3009_verify(&d, &a, sig)) != 0) {
    fprintf(stderr, "verify: %d the signer is not FROM\n", rc);
    return 1;
  }
  return 0;
}
