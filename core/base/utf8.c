#include "base/utf8.h"

#include <string.h>

#include <jansson.h>

#include <errno.h>

static const char replacement[] = "\xEF\xBF\xBD";

size_t tg_utf8_decode(const char *s, size_t len, uint32_t *cp) {
  const unsigned char *p = (const unsigned char *)s;
  unsigned c = p[0];
  if (c < 0x80) {
    *cp = c;
    return 1;
  }
  /* The second byte's range is narrowed for E0/ED/F0/F4 to exclude overlongs,
   * surrogates and values above U+10FFFF (RFC 3629 table). */
  size_t need;
  uint32_t v;
  unsigned lo = 0x80, hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
    v = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    v = c & 0x0F;
    if (c == 0xE0)
      lo = 0xA0;
    else if (c == 0xED)
      hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    v = c & 0x07;
    if (c == 0xF0)
      lo = 0x90;
    else if (c == 0xF4)
      hi = 0x8F;
  } else {
    *cp = TG_UTF8_INVALID;
    return 1;
  }
  size_t i = 1;
  for (; i <= need && i < len; i++) {
    unsigned b = p[i];
    if (b < lo || b > hi)
      break;
    v = (v << 6) | (b & 0x3F);
    lo = 0x80;
    hi = 0xBF;
  }
  *cp = i == need + 1 ? v : TG_UTF8_INVALID;
  return i;
}

bool tg_utf8_valid(const char *s, size_t len) {
  size_t i = 0;
  while (i < len) {
    if ((unsigned char)s[i] < 0x80) {
      i++;
      continue;
    }
    uint32_t cp;
    i += tg_utf8_decode(s + i, len - i, &cp);
    if (cp == TG_UTF8_INVALID)
      return false;
  }
  return true;
}

int tg_utf8_repair(tg_buf_t *out, const char *s, size_t len) {
  size_t start = out->len, run = 0, i = 0;
  while (i < len) {
    uint32_t cp;
    size_t n = tg_utf8_decode(s + i, len - i, &cp);
    if (cp != TG_UTF8_INVALID) {
      i += n;
      continue;
    }
    if (tg_buf_append(out, s + run, i - run) != 0 ||
        tg_buf_append(out, replacement, sizeof replacement - 1) != 0)
      goto fail;
    i += n;
    run = i;
  }
  if (tg_buf_append(out, s + run, len - run) != 0)
    goto fail;
  return 0;

fail:
  out->len = start;
  if (out->data)
    out->data[start] = '\0';
  return -ENOMEM;
}

json_t *tg_utf8_json_string(const char *s) {
  return s == NULL ? json_null() : tg_utf8_json_stringn(s, strlen(s));
}

json_t *tg_utf8_json_stringn(const char *s, size_t len) {
  if (tg_utf8_valid(s, len))
    return json_stringn(s, len);
  tg_buf_t b = {0};
  json_t *j = tg_utf8_repair(&b, s, len) == 0 ? json_stringn(b.data ? b.data : "", b.len) : NULL;
  tg_buf_free(&b);
  return j;
}
