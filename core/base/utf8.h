#ifndef TG_UTF8_H
#define TG_UTF8_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "base/buf.h"

/* UTF-8 checks for text that leaves the process (logs, metrics, JSON): well-formed
 * means RFC 3629, so no overlong forms, no surrogates, nothing above U+10FFFF.
 * Pure functions, safe from any thread. */

#define TG_UTF8_INVALID UINT32_MAX

/* Decodes the sequence at s (len > 0). Returns the bytes consumed (at least 1)
 * and stores the code point, or TG_UTF8_INVALID when the bytes are ill-formed;
 * then the bytes consumed are the maximal ill-formed subpart, so replacing each
 * with one U+FFFD follows Unicode's recommended practice. */
size_t tg_utf8_decode(const char *s, size_t len, uint32_t *cp);

bool tg_utf8_valid(const char *s, size_t len);

/* Appends s to out with every ill-formed subpart replaced by U+FFFD.
 * Returns 0 or -ENOMEM (out then unchanged). */
int tg_utf8_repair(tg_buf_t *out, const char *s, size_t len);

/* A JSON string of s (NUL-terminated) with ill-formed parts repaired as
 * above, for text from outside that goes into a JSON answer: never NULL for
 * a bad byte (jansson refuses those), NULL only when out of memory; s NULL
 * gives JSON null. */
struct json_t;
struct json_t *tg_utf8_json_string(const char *s);

/* The same for len bytes (NUL bytes allowed: JSON escapes them). */
struct json_t *tg_utf8_json_stringn(const char *s, size_t len);

#endif
