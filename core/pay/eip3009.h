#ifndef TG_EIP3009_H
#define TG_EIP3009_H

/* Local verification of an x402/t402 "exact" EVM payment: the EIP-712 digest of
 * an EIP-3009 TransferWithAuthorization and the signer that the signature
 * recovers to (secp256k1 public-key recovery, address = last 20 bytes of
 * keccak256 of the 64-byte public key). It proves who signed what; it checks
 * no time window, amount, payee, balance or nonce use: the caller does.
 *
 * Every function here is pure on caller memory and may be called from any
 * thread; the one secp256k1 context is created on first use (pthread_once)
 * and only read after that. Errors: 0 or a negative errno code, and nothing
 * is written to an output on error. */

#include <stddef.h>
#include <stdint.h>

/* The signed message, fields in their ABI form: uint256 as 32 bytes big-endian. */
typedef struct tg_eip3009_auth {
  uint8_t from[20], to[20];
  uint8_t value[32], valid_after[32], valid_before[32]; /* uint256 big-endian */
  uint8_t nonce[32];
} tg_eip3009_auth_t;

/* EIP712Domain(string name,string version,uint256 chainId,address verifyingContract):
 * for x402, name and version come from the requirements' extra, the contract
 * is the asset (the token). name and version are NUL-terminated UTF-8, read
 * only during the call. */
typedef struct tg_eip712_domain {
  const char *name, *version;
  uint64_t chain_id;
  uint8_t verifying_contract[20];
} tg_eip712_domain_t;

/* keccak256(0x19 0x01 || domainSeparator || hashStruct(auth)) into out.
 * -EINVAL when an argument (or name, version) is NULL. */
int tg_eip3009_digest(const tg_eip712_domain_t *d, const tg_eip3009_auth_t *a, uint8_t out[32]);

/* The address that signed digest with sig = r || s || v (65 bytes), into signer.
 * v must be 27 or 28, the form of the x402 wire and the only one USDC's
 * FiatToken (ECRecover.recover) accepts on chain: 0/1 would pass here and
 * revert at settlement, so they are refused. s must be at most n/2 (EIP-2,
 * also enforced by FiatToken: the other half would be a second valid
 * signature of the same authorization), r and s in [1, n).
 * -EINVAL: an argument is NULL. -EBADMSG: bad v, r or s out of range, high s,
 * or no public key recovers. -ENOMEM: the secp256k1 context could not be made. */
int tg_eip3009_recover(const uint8_t digest[32], const uint8_t sig[65], uint8_t signer[20]);

/* 0 when sig is a signature of (d, a) by a->from; -EPERM when it recovers to
 * another address; else the error of tg_eip3009_digest or tg_eip3009_recover. */
int tg_eip3009_verify(const tg_eip712_domain_t *d, const tg_eip3009_auth_t *a, const uint8_t sig[65]);

/* The wire forms of the x402 payload (PROTOCOLS.md), parsed strictly: the
 * whole NUL-terminated string or -EINVAL, out untouched on error. Hex is
 * "0x" (lowercase x) and exactly the digits asked for, either case. */

/* An address: "0x" + 40 hex digits. All-lowercase or all-uppercase digits are
 * taken as they are (no checksum); mixed case is an EIP-55 checksum and must be
 * the right one: a wrong checksum is a mistyped address, refused. */
int tg_eip3009_parse_address(const char *s, uint8_t out[20]);

/* A uint256 in decimal: 1 to 78 digits, nothing else (no sign, space or
 * leading zero except "0" itself: one number, one spelling), at most 2^256-1.
 * Into 32 bytes big-endian. */
int tg_eip3009_parse_uint256(const char *s, uint8_t out[32]);

/* A bytes32 (the nonce): "0x" + 64 hex digits. */
int tg_eip3009_parse_bytes32(const char *s, uint8_t out[32]);

/* A signature: "0x" + 130 hex digits (r || s || v); its values are checked by
 * tg_eip3009_recover, not here. */
int tg_eip3009_parse_signature(const char *s, uint8_t out[65]);

/* addr as "0x" + 40 hex digits in EIP-55 checksum case, NUL-terminated. */
void tg_eip3009_format_address(const uint8_t addr[20], char out[43]);

#endif
