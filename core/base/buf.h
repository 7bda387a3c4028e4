#ifndef TG_BUF_H
#define TG_BUF_H

#include <stdarg.h>
#include <stddef.h>

/* A growable byte buffer. Zero-initialise it ({0}) before first use; data is
 * always NUL-terminated after a successful append (not counted in len), so a
 * buffer holding text can be passed to C string functions. */
typedef struct tg_buf {
  char *data;
  size_t len;
  size_t cap;
} tg_buf_t;

/* Each returns 0 or -ENOMEM; on failure the buffer is unchanged. */
int tg_buf_reserve(tg_buf_t *b, size_t extra);
int tg_buf_append(tg_buf_t *b, const void *data, size_t len);
int tg_buf_puts(tg_buf_t *b, const char *s);
int tg_buf_printf(tg_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int tg_buf_vprintf(tg_buf_t *b, const char *fmt, va_list ap);
/* Drops the first n bytes, keeping the rest. */
void tg_buf_consume(tg_buf_t *b, size_t n);
void tg_buf_reset(tg_buf_t *b);
void tg_buf_free(tg_buf_t *b);

#endif
