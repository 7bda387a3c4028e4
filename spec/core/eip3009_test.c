#include "pay/eip3009.h"

#include <errno.h>
#include <pthread.h>
#include <string.h>

#include <secp256k1.h>
#include <secp256k1_recovery.h>

#include "base/hex.h"
#include "base/keccak.h"
#include "test.h"

/* One authorization signed once with viem 2.58.8 (spec/interop, node 20):
 *   import { hashTypedData } from "viem"; import { privateKeyToAccount } from "viem/accounts";
 *   const acct = privateKeyToAccount("0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d");
 *   const domain = { name: "USDC", version: "2", chainId: 84532,
 *                    verifyingContract: "0x036CbD53842c5426634e7929541eC2318f3dCF7e" };
 *   const types = { TransferWithAuthorization: [{name:"from",type:"address"}, {name:"to",type:"address"},
 *     {name:"value",type:"uint256"}, {name:"validAfter",type:"uint256"},
 *     {name:"validBefore",type:"uint256"}, {name:"nonce",type:"bytes32"}] };
 *   const message = { from: acct.address, to: "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
 *     value: 10000n, validAfter: 0n, validBefore: 1767225600n,
 *     nonce: "0x" + "a5".repeat(16) + "5a".repeat(16) };
 *   hashTypedData({domain, types, primaryType: "TransferWithAuthorization", message});   // DIGEST
 *   await acct.signTypedData({domain, types, primaryType: "TransferWithAuthorization", message}); // SIG */
#define FROM "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
#define TO "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
#define NONCE "0xa5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a"
#define DIGEST "4ed03f5cd2269f8021f3dd0b5b55378340b06b30637b24fe7b0c61951833f9f1"
#define SIG                                                                                    \
  "0x7ddc85e0d0e4a089c2977c2883b3128ef9e2902d9f3eccd59abfd849e4398b06"                         \
  "06d23443d953f6a428853b5bbc64a30b35d7f261f05ddafb7fbba9f6226eb4c51b"

static const uint8_t curve_n[32] = {
  0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe,
  0xba, 0xae, 0xdc, 0xe6, 0xaf, 0x48, 0xa0, 0x3b, 0xbf, 0xd2, 0x5e, 0x8c, 0xd0, 0x36, 0x41, 0x41,
};

static int vector(tg_eip712_domain_t *d, tg_eip3009_auth_t *a, uint8_t sig[65]) {
  memset(d, 0, sizeof *d);
  d->name = "USDC";
  d->version = "2";
  d->chain_id = 84532;
  if (tg_eip3009_parse_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e", d->verifying_contract) ||
      tg_eip3009_parse_address(FROM, a->from) || tg_eip3009_parse_address(TO, a->to) ||
      tg_eip3009_parse_uint256("10000", a->value) || tg_eip3009_parse_uint256("0", a->valid_after) ||
      tg_eip3009_parse_uint256("1767225600", a->valid_before) ||
      tg_eip3009_parse_bytes32(NONCE, a->nonce) || tg_eip3009_parse_signature(SIG, sig))
    return -1;
  return 0;
}

/* First use from several threads at once: the context is made once. */
static void *recover_many(void *arg) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65];
  int *bad = arg;
  if (vector(&d, &a, sig) != 0)
    *bad = 1;
  for (int i = 0; i < 50; i++)
    if (tg_eip3009_verify(&d, &a, sig) != 0)
      *bad = 1;
  return NULL;
}

TEST(threads) {
  pthread_t t[4];
  int bad[4] = {0};
  for (int i = 0; i < 4; i++)
    CHECK_INT(pthread_create(&t[i], NULL, recover_many, &bad[i]), 0);
  for (int i = 0; i < 4; i++) {
    pthread_join(t[i], NULL);
    CHECK_INT(bad[i], 0);
  }
}

/* a = n - a, big-endian. */
static void negate_mod_n(uint8_t a[32]) {
  int borrow = 0;
  for (int i = 31; i >= 0; i--) {
    int t = curve_n[i] - a[i] - borrow;
    borrow = t < 0;
    a[i] = (uint8_t)(t & 0xff);
  }
}

TEST(viem_vector_digest_and_signer) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65], digest[32], signer[20];
  char hex[65], addr[43];
  CHECK_INT(vector(&d, &a, sig), 0);
  CHECK_INT(tg_eip3009_digest(&d, &a, digest), 0);
  tg_hex_encode(digest, 32, hex);
  CHECK_STR(hex, DIGEST);
  CHECK_INT(tg_eip3009_recover(digest, sig, signer), 0);
  tg_eip3009_format_address(signer, addr);
  CHECK_STR(addr, FROM);
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), 0);
}

/* Every field of domain and message is in the digest. */
TEST(every_field_is_signed) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65];
  CHECK_INT(vector(&d, &a, sig), 0);
  uint8_t *fields[] = {a.from, a.to, a.value, a.valid_after, a.valid_before, a.nonce,
                       d.verifying_contract};
  for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
    fields[i][19] ^= 1;
    CHECK(tg_eip3009_verify(&d, &a, sig) != 0);
    fields[i][19] ^= 1;
  }
  d.chain_id = 8453;
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EPERM);
  d.chain_id = 84532;
  d.name = "USD Coin";
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EPERM);
  d.name = "USDC";
  d.version = "1";
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EPERM);
  d.version = "2";
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), 0);
}

TEST(wrong_from_is_eperm) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65], digest[32], signer[20];
  CHECK_INT(vector(&d, &a, sig), 0);
  /* The signature is over from = FROM: claiming another from changes the digest. */
  CHECK_INT(tg_eip3009_parse_address(TO, a.from), 0);
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EPERM);
  CHECK_INT(tg_eip3009_digest(&d, &a, digest), 0);
  CHECK_INT(tg_eip3009_recover(digest, sig, signer), 0);
  CHECK(memcmp(signer, a.from, 20) != 0);
}

/* Any one flipped bit of r or s: not FROM's signature any more. */
TEST(flipped_signature_bits_are_refused) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65];
  CHECK_INT(vector(&d, &a, sig), 0);
  for (int bit = 0; bit < 512; bit += 7) {
    sig[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    int rc = tg_eip3009_verify(&d, &a, sig);
    CHECK(rc == -EPERM || rc == -EBADMSG);
    sig[bit / 8] ^= (uint8_t)(1u << (bit % 8));
  }
  sig[64] = 27 + 28 - sig[64]; /* the other candidate key */
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EPERM);
  sig[64] = 27 + 28 - sig[64];
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), 0);
}

/* (r, n - s) with v flipped is the same signer's signature too (ECDSA
 * malleability): libsecp256k1 recovers FROM from it, we refuse it (EIP-2). */
TEST(high_s_twin_is_refused) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65], digest[32], signer[20], raw[65];
  size_t rawlen = sizeof raw;
  secp256k1_context *ctx = secp256k1_context_create(SECP256K1_CONTEXT_NONE);
  secp256k1_ecdsa_recoverable_signature rs;
  secp256k1_pubkey pub;
  CHECK(ctx != NULL);
  CHECK_INT(vector(&d, &a, sig), 0);
  CHECK_INT(tg_eip3009_digest(&d, &a, digest), 0);
  negate_mod_n(sig + 32);
  sig[64] = sig[64] == 27 ? 28 : 27;
  CHECK_INT(tg_eip3009_recover(digest, sig, signer), -EBADMSG);
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EBADMSG);
  /* Proof that the refusal is ours, not a broken signature: it recovers FROM's key. */
  CHECK(secp256k1_ecdsa_recoverable_signature_parse_compact(ctx, &rs, sig, sig[64] - 27));
  CHECK(secp256k1_ecdsa_recover(ctx, &pub, &rs, digest));
  CHECK(secp256k1_ec_pubkey_serialize(ctx, raw, &rawlen, &pub, SECP256K1_EC_UNCOMPRESSED));
  secp256k1_context_destroy(ctx);
  uint8_t h[32];
  tg_keccak256(raw + 1, 64, h);
  CHECK(memcmp(h + 12, a.from, 20) == 0);
}

TEST(v_r_s_ranges) {
  tg_eip712_domain_t d;
  tg_eip3009_auth_t a;
  uint8_t sig[65], digest[32], signer[20];
  static const uint8_t half_n[32] = {
    0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0x5d, 0x57, 0x6e, 0x73, 0x57, 0xa4, 0x50, 0x1d, 0xdf, 0xe9, 0x2f, 0x46, 0x68, 0x1b, 0x20, 0xa0,
  };
  CHECK_INT(vector(&d, &a, sig), 0);
  CHECK_INT(tg_eip3009_digest(&d, &a, digest), 0);
  /* v: 27 and 28 only; 0/1 (raw recovery id) would revert in FiatToken. */
  static const uint8_t bad_v[] = {0, 1, 2, 26, 29, 35, 36, 255};
  for (size_t i = 0; i < sizeof bad_v; i++) {
    uint8_t t[65];
    memcpy(t, sig, 65);
    t[64] = bad_v[i];
    CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  }
  uint8_t t[65];
  memcpy(t, sig, 65);
  memset(t, 0, 32); /* r = 0 */
  CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  memcpy(t, curve_n, 32); /* r = n */
  CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  memset(t, 0xff, 32); /* r > n */
  CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  memcpy(t, sig, 65);
  memset(t + 32, 0, 32); /* s = 0 */
  CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  memcpy(t + 32, half_n, 32); /* s = n/2 + 1: the smallest high s */
  t[63]++;
  CHECK_INT(tg_eip3009_recover(digest, t, signer), -EBADMSG);
  CHECK_INT(tg_eip3009_recover(NULL, sig, signer), -EINVAL);
  CHECK_INT(tg_eip3009_recover(digest, NULL, signer), -EINVAL);
  CHECK_INT(tg_eip3009_recover(digest, sig, NULL), -EINVAL);
  d.name = NULL;
  CHECK_INT(tg_eip3009_digest(&d, &a, digest), -EINVAL);
  CHECK_INT(tg_eip3009_verify(&d, &a, sig), -EINVAL);
}

TEST(parse_address) {
  uint8_t out[20], want[20] = {0x03, 0x6c, 0xbd, 0x53, 0x84, 0x2c, 0x54, 0x26, 0x63, 0x4e,
                               0x79, 0x29, 0x54, 0x1e, 0xc2, 0x31, 0x8f, 0x3d, 0xcf, 0x7e};
  char back[43];
  CHECK_INT(tg_eip3009_parse_address("0x036CbD53842c5426634e7929541eC2318f3dCF7e", out), 0);
  CHECK(memcmp(out, want, 20) == 0);
  tg_eip3009_format_address(out, back);
  CHECK_STR(back, "0x036CbD53842c5426634e7929541eC2318f3dCF7e");
  CHECK_INT(tg_eip3009_parse_address("0x036cbd53842c5426634e7929541ec2318f3dcf7e", out), 0);
  CHECK(memcmp(out, want, 20) == 0);
  CHECK_INT(tg_eip3009_parse_address("0x036CBD53842C5426634E7929541EC2318F3DCF7E", out), 0);
  CHECK(memcmp(out, want, 20) == 0);
  /* EIP-55's own examples. */
  CHECK_INT(tg_eip3009_parse_address("0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", out), 0);
  CHECK_INT(tg_eip3009_parse_address("0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359", out), 0);
  memset(out, 0xee, 20);
  static const char *const bad[] = {
    "0x036CbD53842c5426634e7929541eC2318f3dCF7E", /* one letter's case wrong: checksum */
    "0x036cBD53842c5426634e7929541eC2318f3dCF7e",
    "0X036cbd53842c5426634e7929541ec2318f3dcf7e",
    "036cbd53842c5426634e7929541ec2318f3dcf7e",
    "0x036cbd53842c5426634e7929541ec2318f3dcf7",
    "0x036cbd53842c5426634e7929541ec2318f3dcf7e0",
    "0x036cbd53842c5426634e7929541ec2318f3dcf7g",
    "0x036cbd53842c5426634e7929541ec2318f3dcf7e ",
    " 0x036cbd53842c5426634e7929541ec2318f3dcf7e",
    "0x",
    "",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK_INT(tg_eip3009_parse_address(bad[i], out), -EINVAL);
  CHECK_INT(tg_eip3009_parse_address(NULL, out), -EINVAL);
  for (int i = 0; i < 20; i++)
    CHECK_INT(out[i], 0xee); /* untouched on error */
}

TEST(parse_uint256) {
  uint8_t out[32], want[32] = {0};
  CHECK_INT(tg_eip3009_parse_uint256("0", out), 0);
  CHECK(memcmp(out, want, 32) == 0);
  want[30] = 0x01;
  CHECK_INT(tg_eip3009_parse_uint256("256", out), 0);
  CHECK(memcmp(out, want, 32) == 0);
  memset(want, 0, 32);
  want[28] = 0x69, want[29] = 0x55, want[30] = 0xb9, want[31] = 0x00; /* 1767225600 */
  CHECK_INT(tg_eip3009_parse_uint256("1767225600", out), 0);
  CHECK(memcmp(out, want, 32) == 0);
  memset(want, 0xff, 32);
  CHECK_INT(tg_eip3009_parse_uint256(
              "115792089237316195423570985008687907853269984665640564039457584007913129639935", out),
            0);
  CHECK(memcmp(out, want, 32) == 0);
  memset(out, 0xee, 32);
  static const char *const bad[] = {
    "115792089237316195423570985008687907853269984665640564039457584007913129639936", /* 2^256 */
    "999999999999999999999999999999999999999999999999999999999999999999999999999999",
    "1157920892373161954235709850086879078532699846656405640394575840079131296399350",
    "", "-1", "+1", "01", "00", " 1", "1 ", "1e3", "0x10", "1.0", "1_000",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
    CHECK_INT(tg_eip3009_parse_uint256(bad[i], out), -EINVAL);
  CHECK_INT(tg_eip3009_parse_uint256(NULL, out), -EINVAL);
  for (int i = 0; i < 32; i++)
    CHECK_INT(out[i], 0xee);
}

TEST(parse_nonce_and_signature) {
  uint8_t n[32], s[65];
  CHECK_INT(tg_eip3009_parse_bytes32(NONCE, n), 0);
  CHECK_INT(n[0], 0xa5);
  CHECK_INT(n[31], 0x5a);
  CHECK_INT(tg_eip3009_parse_bytes32("0xA5A5A5A5A5A5A5A5A5A5A5A5A5A5A5A55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a", n), 0);
  CHECK_INT(tg_eip3009_parse_bytes32("0xa5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5", n), -EINVAL);
  CHECK_INT(tg_eip3009_parse_bytes32("0xa5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a00", n), -EINVAL);
  CHECK_INT(tg_eip3009_parse_bytes32("a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a55a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a00", n), -EINVAL);
  CHECK_INT(tg_eip3009_parse_signature(SIG, s), 0);
  CHECK_INT(s[64], 27);
  CHECK_INT(tg_eip3009_parse_signature(SIG "00", s), -EINVAL);
  char shortsig[sizeof SIG];
  memcpy(shortsig, SIG, sizeof SIG);
  shortsig[sizeof SIG - 3] = '\0'; /* 64 bytes: no v */
  CHECK_INT(tg_eip3009_parse_signature(shortsig, s), -EINVAL);
  shortsig[sizeof SIG - 3] = 'z';
  CHECK_INT(tg_eip3009_parse_signature(shortsig, s), -EINVAL);
}
