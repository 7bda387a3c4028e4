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

/* The value of a character in the alphabet, or -1. */
static int value_of(unsigned char c, int url) {
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (url)
    return c == '-' ? 62 : c == '_' ? 63 : -1;
  return c == '+' ? 62 : c == '/' ? 63 : -1;
}

int tg_b64_decode(const char *in, size_t len, int url, int pad, uint8_t *out, size_t outcap, size_t *outlen,
                  size_t *bad_at) {
  size_t body = len;
  if (pad) {
    if (len % 4 != 0)
      return -EDOM;
    while (body > 0 && len - body < 2 && in[body - 1] == '=')
      body--;
  }
  if (body % 4 == 1)
    return -EDOM;
  uint32_t acc = 0;
  int bits = 0;
  size_t o = 0;
  for (size_t i = 0; i < body; i++) {
    int v = value_of((unsigned char)in[i], url);
    if (v < 0) {
      if (bad_at)
        *bad_at = i;
      return -EINVAL;
    }
    acc = acc << 6 | (uint32_t)v;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      if (o == outcap)
        return -ENOSPC;
      out[o++] = (uint8_t)(acc >> bits);
      acc &= (1u << bits) - 1;
    }
  }
  if (acc != 0) /* bits left over must be zero: one spelling per byte string */
    return -EBADMSG;
  *outlen = o;
  return 0;
}

int tg_b64url_decode(const char *in, size_t len, uint8_t *out, size_t outcap, size_t *outlen) {
  if (len / 4 * 3 + (len % 4 > 1 ? len % 4 - 1 : 0) > outcap)
    return -ENOSPC;
  int rc = tg_b64_decode(in, len, 1, 0, out, outcap, outlen, NULL);
  return rc == 0 || rc == -ENOSPC ? rc : -EINVAL;
}
