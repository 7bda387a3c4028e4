#include "signer/signer.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/md.h>
#include <mbedtls/platform_util.h>

#include "base/hex.h"
#include "signer/common.h"

/* akamai-edgeauth's escapeEarly: encodeURIComponent, then ~ ' * encoded
 * too, every escape in lowercase. */
static int escape_early(tg_buf_t *b, const char *s) {
  static const char hexd[] = "0123456789abcdef";
  for (; *s; s++) {
    unsigned char c = (unsigned char)*s;
    int keep = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               (c != 0 && strchr("-_.!()", c) != NULL);
    char e[3] = {'%', hexd[c >> 4], hexd[c & 15]};
    if (tg_buf_append(b, keep ? (const char *)s : e, keep ? 1 : 3) != 0)
      return -ENOMEM;
  }
  return 0;
}

/* One "name=value" field; value escaped when asked. The field delimiter
 * inside a value that is sent would split the token, so it is refused; url=
 * and salt= are only hashed (sent: 0), where a '~' is harmless (a path like
 * /~user/ in the url form, as akamai-edgeauth signs it). */
static int field(tg_buf_t *b, const char *name, const char *value, int esc, int sent,
                 char *err, size_t errlen) {
  if (sent && !esc && strchr(value, '~') != NULL) {
    tg_signer_err(err, errlen, "akamai edgeauth: the %s field has a '~'", name);
    return -EINVAL;
  }
  if ((b->len > 0 && tg_buf_puts(b, "~") != 0) || tg_buf_printf(b, "%s=", name) != 0)
    return -ENOMEM;
  return esc ? escape_early(b, value) : tg_buf_puts(b, value);
}

int tg_signer_akamai_token(const tg_signer_akamai_opts_t *o, const char *key, size_t key_len,
                           const char *path, int64_t expires, tg_buf_t *out, char *err,
                           size_t errlen) {
  static const tg_signer_akamai_opts_t defaults = {0};
  tg_buf_t tok = {0}, src = {0};
  uint8_t k[256], mac[MBEDTLS_MD_MAX_SIZE];
  char hex[2 * MBEDTLS_MD_MAX_SIZE + 1];
  size_t klen = key_len / 2;
  int rc = -EINVAL, esc;
  if (o == NULL)
    o = &defaults;
  esc = o->escape_early;
  if (key == NULL || key_len == 0 || key_len % 2 != 0 || klen > sizeof k) {
    tg_signer_err(err, errlen, "akamai edgeauth: the key must be hex, at most %zu bytes",
                  sizeof k);
    return -EINVAL;
  }
  for (size_t i = 0; i < klen; i++) {
    int hi = tg_hex_value(key[2 * i]), lo = tg_hex_value(key[2 * i + 1]);
    if (hi < 0 || lo < 0) {
      mbedtls_platform_zeroize(k, sizeof k);
      tg_signer_err(err, errlen, "akamai edgeauth: the key is not hex");
      return -EINVAL;
    }
    k[i] = (uint8_t)(hi << 4 | lo);
  }
  const mbedtls_md_info_t *md = mbedtls_md_info_from_type(
      o->alg == TG_AKAMAI_SHA1 ? MBEDTLS_MD_SHA1
      : o->alg == TG_AKAMAI_MD5 ? MBEDTLS_MD_MD5 : MBEDTLS_MD_SHA256);
  const char *acl = o->acl ? o->acl : path;
  if (md == NULL || expires <= 0 || (o->start_time > 0 && expires < o->start_time)) {
    tg_signer_err(err, errlen, "akamai edgeauth: no expiry, or one before the start time");
    goto done;
  }
  if (acl == NULL || acl[0] == '\0') {
    tg_signer_err(err, errlen, "akamai edgeauth: no %s to sign", o->url_form ? "url" : "acl");
    goto done;
  }
  char num[24];
  if (o->ip && (rc = field(&tok, "ip", o->ip, esc, 1, err, errlen)) != 0)
    goto done;
  if (o->start_time > 0) {
    snprintf(num, sizeof num, "%" PRId64, o->start_time);
    if ((rc = field(&tok, "st", num, 0, 1, err, errlen)) != 0)
      goto done;
  }
  snprintf(num, sizeof num, "%" PRId64, expires);
  if ((rc = field(&tok, "exp", num, 0, 1, err, errlen)) != 0)
    goto done;
  if (!o->url_form && (rc = field(&tok, "acl", acl, 0, 1, err, errlen)) != 0)
    goto done;
  if (o->session_id && (rc = field(&tok, "id", o->session_id, esc, 1, err, errlen)) != 0)
    goto done;
  if (o->payload && (rc = field(&tok, "data", o->payload, esc, 1, err, errlen)) != 0)
    goto done;
  /* What is hashed: the token so far, then url= and salt=, which are not sent. */
  if ((rc = tg_buf_append(&src, tok.data ? tok.data : "", tok.len)) != 0)
    goto done;
  if (o->url_form && (rc = field(&src, "url", acl, esc, 0, err, errlen)) != 0)
    goto done;
  if (o->salt && (rc = field(&src, "salt", o->salt, 0, 0, err, errlen)) != 0)
    goto done;
  if (mbedtls_md_hmac(md, k, klen, (const unsigned char *)src.data, src.len, mac) != 0) {
    tg_signer_err(err, errlen, "akamai edgeauth: HMAC failed");
    rc = -EINVAL;
    goto done;
  }
  tg_hex_encode(mac, mbedtls_md_get_size(md), hex);
  if ((rc = tg_buf_printf(&tok, "~hmac=%s", hex)) != 0)
    goto done;
  rc = tg_signer_finish(&tok, out);
done:
  if (rc == -ENOMEM)
    tg_signer_err(err, errlen, "out of memory");
  mbedtls_platform_zeroize(k, sizeof k);
  mbedtls_platform_zeroize(mac, sizeof mac);
  tg_signer_buf_wipe(&src);
  tg_signer_buf_wipe(&tok);
  return rc;
}

int tg_signer_akamai_sign(const tg_signer_akamai_opts_t *o, const char *key, size_t key_len,
                          const char *url, int64_t expires, tg_buf_t *out, char *err,
                          size_t errlen) {
  tg_signer_url_t u;
  tg_buf_t path = {0}, tok = {0}, res = {0};
  const char *name = o && o->token_name ? o->token_name : "__token__";
  int rc;
  if (name[0] == '\0' || strpbrk(name, "&=?#% ") != NULL) {
    tg_signer_err(err, errlen, "akamai edgeauth: bad token name");
    return -EINVAL;
  }
  if ((rc = tg_signer_url(url, 1, &u, err, errlen)) != 0)
    return rc;
  if ((rc = tg_buf_append(&path, u.buf.data + u.path, u.query - u.path)) != 0 ||
      (rc = tg_signer_akamai_token(o, key, key_len, path.data, expires, &tok, err, errlen)) != 0)
    goto done;
  if ((rc = tg_buf_append(&res, u.buf.data, u.buf.len)) != 0 ||
      (rc = tg_buf_printf(&res, "%c%s=%s", u.query < u.buf.len ? '&' : '?', name, tok.data)) !=
          0)
    goto done;
  rc = tg_signer_finish(&res, out);
done:
  if (rc == -ENOMEM)
    tg_signer_err(err, errlen, "out of memory");
  tg_buf_free(&path);
  tg_signer_buf_wipe(&tok);
  tg_signer_buf_wipe(&res);
  tg_signer_url_free(&u);
  return rc;
}
