#ifndef TG_KECCAK_H
#define TG_KECCAK_H

#include <stddef.h>
#include <stdint.h>

/* Ethereum's Keccak-256: Keccak-f[1600], rate 136 bytes, capacity 512, and the
 * original Keccak padding (0x01 ... 0x80), not FIPS 202 SHA3-256's 0x06. No
 * Debian C library we can link has it (mbedTLS 2.28 has no SHA-3), hence our own.
 * Pure functions on caller memory: any thread may call them. */

typedef struct tg_keccak256 {
  uint64_t s[25]; /* the state, lane (x, y) at s[x + 5y], little-endian bytes */
  size_t pos;     /* bytes absorbed into the current block, < 136 */
} tg_keccak256_t;

/* keccak256(data[0..len)) into out. data may be NULL when len is 0. */
void tg_keccak256(const void *data, size_t len, uint8_t out[32]);

/* Incremental form: init, update any number of times, final once (final
 * leaves c unusable until the next init). */
void tg_keccak256_init(tg_keccak256_t *c);
void tg_keccak256_update(tg_keccak256_t *c, const void *data, size_t len);
void tg_keccak256_final(tg_keccak256_t *c, uint8_t out[32]);

#endif
