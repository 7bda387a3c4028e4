#include "base/buf.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int tg_buf_reserve(tg_buf_t *b, size_t extra) {
  if (extra > SIZE_MAX - b->len - 1) /* a length that wraps is no length */
    return -ENOMEM;
  size_t need = b->len + extra + 1;
  if (need <= b->cap)
    return 0;
  size_t cap = b->cap ? b->cap : 256;
  while (cap < need)
    cap = cap > SIZE_MAX / 2 ? need : cap * 2;
  char *p = realloc(b->data, cap);
  if (p == NULL)
    return -ENOMEM;
  b->data = p;
  b->cap = cap;
  return 0;
}

int tg_buf_append(tg_buf_t *b, const void *data, size_t len) {
  if (tg_buf_reserve(b, len) != 0)
    return -ENOMEM;
  if (len)
    memcpy(b->data + b->len, data, len);
  b->len += len;
  b->data[b->len] = '\0';
  return 0;
}

int tg_buf_puts(tg_buf_t *b, const char *s) { return tg_buf_append(b, s, strlen(s)); }

int tg_buf_vprintf(tg_buf_t *b, const char *fmt, va_list ap) {
  va_list ap2;
  va_copy(ap2, ap);
  char tmp[256];
  int n = vsnprintf(tmp, sizeof tmp, fmt, ap2);
  va_end(ap2);
  if (n < 0)
    return -EINVAL;
  if ((size_t)n < sizeof tmp)
    return tg_buf_append(b, tmp, (size_t)n);
  if (tg_buf_reserve(b, (size_t)n) != 0)
    return -ENOMEM;
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  b->len += (size_t)n;
  return 0;
}

int tg_buf_printf(tg_buf_t *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int rc = tg_buf_vprintf(b, fmt, ap);
  va_end(ap);
  return rc;
}

void tg_buf_consume(tg_buf_t *b, size_t n) {
  if (n >= b->len) {
    b->len = 0;
  } else {
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
  }
  if (b->data)
    b->data[b->len] = '\0';
}

void tg_buf_reset(tg_buf_t *b) {
  b->len = 0;
  if (b->data)
    b->data[0] = '\0';
}

void tg_buf_free(tg_buf_t *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}
