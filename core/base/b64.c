#include "base/b64.h"

#include <errno.h>

size_t tg_b64_len(size_t n, int pad) {
  if (pad)
    return (n + 2) / 3 * 4;
  return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

int tg_b64_encode(const uint8_t *in, size_t n, int url, int pad, char *out, size_t outlen) {
  static const char std[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  static const char safe[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const char *abc = url ? safe : std;
  if (tg_b64_len(n, pad) + 1 > outlen) {
    if (outlen > 0)
      out[0] = '\0';
    return -ENOSPC;
  }
  char *o = out;
  size_t i = 0;
  for (; i + 3 <= n; i += 3) {
    uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
    *o++ = abc[v >> 18];
    *o++ = abc[(v >> 12) & 63];
    *o++ = abc[(v >> 6) & 63];
    *o++ = abc[v & 63];
  }
  if (n - i > 0) {
    uint32_t v = (uint32_t)in[i] << 16 | (n - i == 2 ? (uint32_t)in[i + 1] << 8 : 0);
    *o++ = abc[v >> 18];
    *o++ = abc[(v >> 12) & 63];
    if (n - i == 2)
      *o++ = abc[(v >> 6) & 63];
    else if (pad)
      *o++ = '=';
    if (pad)
      *o++ = '=';
  }
  *o = '\0';
  return 0;
}
