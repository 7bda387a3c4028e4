#ifndef TG_HASH_H
#define TG_HASH_H

#include <stddef.h>
#include <stdint.h>

/* FNV-1a, 64 bits: the hash of the in-memory tables keyed by ids the gateway
 * made or verified (transaction, hold and settlement ids). Not for keys an
 * attacker picks freely where collisions would cost more than an eviction.
 * Pure functions, any thread. */

#define TG_FNV1A_INIT UINT64_C(1469598103934665603)

static inline uint64_t tg_fnv1a(uint64_t h, const void *data, size_t len) {
  const uint8_t *p = data;
  for (size_t i = 0; i < len; i++)
    h = (h ^ p[i]) * UINT64_C(1099511628211);
  return h;
}

/* Of a NUL-terminated string. */
static inline uint64_t tg_fnv1a_str(const char *s) {
  uint64_t h = TG_FNV1A_INIT;
  for (; *s; s++)
    h = (h ^ (uint8_t)*s) * UINT64_C(1099511628211);
  return h;
}

#endif
