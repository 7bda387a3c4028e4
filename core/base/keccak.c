#include "base/keccak.h"

#include <string.h>

#define RATE 136 /* (1600 - 2 * 256) / 8 */

/* FIPS 202 section 3.2.5: RC[i] of round i, from the rc(t) LFSR of Algorithm 5. */
static const uint64_t round_constants[24] = {
  0x0000000000000001ULL, 0x0000000000008082ULL, 0x800000000000808aULL, 0x8000000080008000ULL,
  0x000000000000808bULL, 0x0000000080000001ULL, 0x8000000080008081ULL, 0x8000000000008009ULL,
  0x000000000000008aULL, 0x0000000000000088ULL, 0x0000000080008009ULL, 0x000000008000000aULL,
  0x000000008000808bULL, 0x800000000000008bULL, 0x8000000000008089ULL, 0x8000000000008003ULL,
  0x8000000000008002ULL, 0x8000000000000080ULL, 0x000000000000800aULL, 0x800000008000000aULL,
  0x8000000080008081ULL, 0x8000000000008080ULL, 0x0000000080000001ULL, 0x8000000080008008ULL,
};

/* FIPS 202 section 3.2.2 (rho): the rotation of lane (x, y), at x + 5y. */
static const unsigned rho_offsets[25] = {
  0,  1,  62, 28, 27,
  36, 44, 6,  55, 20,
  3,  10, 43, 25, 39,
  41, 45, 15, 21, 8,
  18, 2,  61, 56, 14,
};

static inline uint64_t rotl(uint64_t v, unsigned n) {
  return n == 0 ? v : (v << n) | (v >> (64 - n));
}

/* Keccak-f[1600]: 24 rounds of theta, rho, pi, chi, iota. */
static void permute(uint64_t a[25]) {
  uint64_t b[25], c[5], d;
  for (int round = 0; round < 24; round++) {
    for (int x = 0; x < 5; x++)
      c[x] = a[x] ^ a[x + 5] ^ a[x + 10] ^ a[x + 15] ^ a[x + 20];
    for (int x = 0; x < 5; x++) {
      d = c[(x + 4) % 5] ^ rotl(c[(x + 1) % 5], 1);
      for (int y = 0; y < 25; y += 5)
        a[x + y] ^= d;
    }
    /* rho and pi: lane (x, y) moves to (y, 2x + 3y). */
    for (int x = 0; x < 5; x++)
      for (int y = 0; y < 5; y++)
        b[y + 5 * ((2 * x + 3 * y) % 5)] = rotl(a[x + 5 * y], rho_offsets[x + 5 * y]);
    for (int y = 0; y < 25; y += 5)
      for (int x = 0; x < 5; x++)
        a[x + y] = b[x + y] ^ (~b[(x + 1) % 5 + y] & b[(x + 2) % 5 + y]);
    a[0] ^= round_constants[round];
  }
}

/* Byte i of the state is byte i % 8 of lane i / 8, little-endian (FIPS 202
 * section 3.1.2): written byte-wise, so the host's byte order does not matter. */
static inline void xor_byte(uint64_t s[25], size_t i, uint8_t v) {
  s[i / 8] ^= (uint64_t)v << (8 * (i % 8));
}

void tg_keccak256_init(tg_keccak256_t *c) {
  memset(c, 0, sizeof *c);
}

void tg_keccak256_update(tg_keccak256_t *c, const void *data, size_t len) {
  const uint8_t *p = data;
  for (size_t i = 0; i < len; i++) {
    xor_byte(c->s, c->pos, p[i]);
    if (++c->pos == RATE) {
      permute(c->s);
      c->pos = 0;
    }
  }
}

void tg_keccak256_final(tg_keccak256_t *c, uint8_t out[32]) {
  /* pad10*1 with Keccak's domain bit: 0x01 first, 0x80 last (one byte 0x81 when
   * a single byte is left in the block). */
  xor_byte(c->s, c->pos, 0x01);
  xor_byte(c->s, RATE - 1, 0x80);
  permute(c->s);
  for (size_t i = 0; i < 32; i++)
    out[i] = (uint8_t)(c->s[i / 8] >> (8 * (i % 8)));
  memset(c, 0, sizeof *c);
}

void tg_keccak256(const void *data, size_t len, uint8_t out[32]) {
  tg_keccak256_t c;
  tg_keccak256_init(&c);
  tg_keccak256_update(&c, data, len);
  tg_keccak256_final(&c, out);
}
