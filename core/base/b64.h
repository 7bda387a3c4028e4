#ifndef TG_B64_H
#define TG_B64_H

#include <stddef.h>
#include <stdint.h>

/* Base64 encoding (RFC 4648): the standard alphabet (section 4) or the URL
 * and file name safe one (section 5), with or without '=' padding. For
 * public data (tokens, digests, signatures, payment headers): the table
 * lookups are not constant-time. Pure functions, any thread. */

/* Characters the encoding of n bytes takes (without the NUL). */
size_t tg_b64_len(size_t n, int pad);

/* Writes the encoding of in[0..n) and a NUL into out (outlen bytes).
 * Returns 0, or -ENOSPC when it does not fit (out is then "" if outlen > 0). */
int tg_b64_encode(const uint8_t *in, size_t n, int url, int pad, char *out, size_t outlen);

/* Decodes len characters of in (not NUL-terminated) into out (outcap bytes),
 * *outlen set. Strict, so that a decodable text has exactly one spelling:
 * only the chosen alphabet (url: RFC 4648 section 5, else section 4), no
 * white space; with pad, a length that is a multiple of 4 and '=' exactly
 * where padding goes; without pad, no '=' and a length that is not 1 mod 4;
 * the unused low bits of the last character zero. Returns 0, or: -EINVAL a
 * character outside the alphabet (or a misplaced '='), its index in *bad_at
 * when bad_at is not NULL; -EDOM a length the padding rule refuses;
 * -EBADMSG unused bits not zero; -ENOSPC out is too small. */
int tg_b64_decode(const char *in, size_t len, int url, int pad, uint8_t *out, size_t outcap, size_t *outlen,
                  size_t *bad_at);

/* Unpadded base64url: tg_b64_decode(in, len, 1, 0, ...), with -EINVAL for
 * every refusal but -ENOSPC. */
int tg_b64url_decode(const char *in, size_t len, uint8_t *out, size_t outcap, size_t *outlen);

#endif
