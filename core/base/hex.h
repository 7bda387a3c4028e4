#ifndef TG_HEX_H
#define TG_HEX_H

#include <stddef.h>
#include <stdint.h>

/* Lowercase hex of in[0..n) into out, which needs 2n+1 bytes (NUL-terminated).
 * mbedTLS has no public hex codec; every digest and key we print goes here. */
void tg_hex_encode(const uint8_t *in, size_t n, char *out);

/* Value of one hex digit (either case), or -1. */
static inline int tg_hex_value(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

#endif
