#ifndef TG_SIGNER_COMMON_H
#define TG_SIGNER_COMMON_H

/* Helpers shared by the signer kinds (signer.c). Not for other layers. */

#include <stddef.h>
#include <stdint.h>

#include "base/buf.h"

void tg_signer_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A URL after tg_signer_url: the encoded text in buf, and offsets into it. */
typedef struct tg_signer_url {
  tg_buf_t buf;
  size_t path;  /* offset of the path's first '/' */
  size_t query; /* offset of '?', or buf.len when there is no query */
  int absolute; /* 1: scheme://authority..., 0: a path */
} tg_signer_url_t;

/* Parses and percent-encodes url (signer.h's rule). allow_path: a bare path
 * is accepted. 0, -EINVAL (err set) or -ENOMEM; on failure u holds nothing. */
int tg_signer_url(const char *url, int allow_path, tg_signer_url_t *u, char *err, size_t errlen);
void tg_signer_url_free(tg_signer_url_t *u);

/* base64 of in[0..n) appended to b; url: '-' '_' alphabet; pad: keep '='. */
int tg_signer_b64(tg_buf_t *b, const uint8_t *in, size_t n, int url, int pad);

/* Appends tmp to out, wipes and frees tmp: the one place a URL is written. */
int tg_signer_finish(tg_buf_t *tmp, tg_buf_t *out);

/* Wipes a buffer that held key-derived bytes, then frees it. */
void tg_signer_buf_wipe(tg_buf_t *b);

#endif
