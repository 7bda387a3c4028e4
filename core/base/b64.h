#ifndef TG_B64_H
#define TG_B64_H

#include <stddef.h>
#include <stdint.h>

/* Base64 encoding (RFC 4648): the standard alphabet (section 4) or the URL
 * and file name safe one (section 5), with or without '=' padding. For
 * public data (tokens, digests, signatures): the table lookups are not
 * constant-time. Pure functions, any thread. Decoding of padded text stays
 * with mbedTLS (mbedtls_base64_decode); tg_b64url_decode below is the
 * strict decoder of unpadded URL-alphabet tokens. */

/* Characters the encoding of n bytes takes (without the NUL). */
size_t tg_b64_len(size_t n, int pad);

/* Writes the encoding of in[0..n) and a NUL into out (outlen bytes).
 * Returns 0, or -ENOSPC when it does not fit (out is then "" if outlen > 0). */
int tg_b64_encode(const uint8_t *in, size_t n, int url, int pad, char *out, size_t outlen);

/* Decodes unpadded base64url (len characters, not NUL-terminated) into out
 * (outcap bytes), *outlen set. Strict, so that a decodable text has exactly
 * one spelling: only the URL alphabet, no '=', no white space, a length that
 * is not 1 mod 4, and the unused low bits of the last character zero.
 * Returns 0, -EINVAL (any of those) or -ENOSPC. */
int tg_b64url_decode(const char *in, size_t len, uint8_t *out, size_t outcap, size_t *outlen);

#endif
