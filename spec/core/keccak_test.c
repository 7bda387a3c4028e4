#include "base/keccak.h"

#include <string.h>

#include "base/hex.h"
#include "test.h"

static const char *hex32(const uint8_t d[32], char out[65]) {
  tg_hex_encode(d, 32, out);
  return out;
}

/* Ethereum's keccak256 (0x01 padding): not SHA3-256, whose "" is a7ffc6f8... */
TEST(known_vectors) {
  uint8_t d[32];
  char h[65];
  tg_keccak256("", 0, d);
  CHECK_STR(hex32(d, h), "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
  tg_keccak256(NULL, 0, d);
  CHECK_STR(hex32(d, h), "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470");
  tg_keccak256("abc", 3, d);
  CHECK_STR(hex32(d, h), "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45");
  /* The EIP-712 type hash of EIP-3009, as the USDC contract has it
   * (TRANSFER_WITH_AUTHORIZATION_TYPEHASH in FiatTokenV2). */
  static const char type[] = "TransferWithAuthorization(address from,address to,uint256 value,"
                             "uint256 validAfter,uint256 validBefore,bytes32 nonce)";
  tg_keccak256(type, strlen(type), d);
  CHECK_STR(hex32(d, h), "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267");
}

/* Lengths around the 136-byte block, bytes i & 0xff. Values from viem 2.58.8:
 *   node -e 'import("viem").then(({keccak256})=>{for(const n of [135,136,137,272,1000])
 *     console.log(n,keccak256(Uint8Array.from({length:n},(_,i)=>i&255)))})' */
TEST(block_boundaries_match_viem) {
  static const struct {
    size_t n;
    const char *hex;
  } v[] = {
    {135, "cbdfd9dee5faad3818d6b06f95a219fd290b0e1706f6a82e5a595b9ce9faca62"},
    {136, "7ce759f1ab7f9ce437719970c26b0a66ff11fe3e38e17df89cf5d29c7d7f807e"},
    {137, "ac73d4fae68b8453f764007c1a20ce95994187861f0c3227a3a8e99a73a3b1db"},
    {272, "fdf2ec49e749960d3c8521a0219af8d03e30e2b3bf19bd16150ee0eaf133d66e"},
    {1000, "aca79e4146e30eb1c733f6d6060d72471c36ea4e01ebf45d7f4916249c2bbd82"},
  };
  uint8_t in[1000], d[32];
  char h[65];
  for (size_t i = 0; i < sizeof in; i++)
    in[i] = (uint8_t)i;
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    tg_keccak256(in, v[i].n, d);
    CHECK_STR(hex32(d, h), v[i].hex);
  }
}

/* The incremental form gives the one-shot digest however the input is cut,
 * for every length 0..300 (all positions of the padding in a block). */
TEST(incremental_equals_one_shot) {
  uint8_t in[300], one[32], inc[32];
  for (size_t i = 0; i < sizeof in; i++)
    in[i] = (uint8_t)(i * 7 + 3);
  for (size_t n = 0; n <= sizeof in; n++) {
    tg_keccak256(in, n, one);
    for (size_t cut = 1; cut <= 137; cut += 17) {
      tg_keccak256_t c;
      tg_keccak256_init(&c);
      for (size_t off = 0; off < n; off += cut)
        tg_keccak256_update(&c, in + off, n - off < cut ? n - off : cut);
      tg_keccak256_final(&c, inc);
      CHECK(memcmp(one, inc, 32) == 0);
    }
  }
}

/* Every length 0..300 gives a different digest, and one flipped input bit
 * changes it: a padding that ignored the length or a byte would show here. */
TEST(length_and_bits_matter) {
  static uint8_t seen[301][32];
  uint8_t in[300] = {0}, d[32];
  for (size_t n = 0; n <= sizeof in; n++) {
    tg_keccak256(in, n, seen[n]);
    for (size_t m = 0; m < n; m++)
      CHECK(memcmp(seen[m], seen[n], 32) != 0);
  }
  for (size_t i = 0; i < 300; i += 29) {
    in[i] ^= 0x80;
    tg_keccak256(in, 300, d);
    CHECK(memcmp(d, seen[300], 32) != 0);
    in[i] ^= 0x80;
  }
}
