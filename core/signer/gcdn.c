#include "signer/signer.h"

#include <errno.h>
#include <inttypes.h>
#include <string.h>

#include <mbedtls/base64.h>
#include <mbedtls/md.h>
#include <mbedtls/platform_util.h>

#include "signer/common.h"

#define GCDN_KEY_LEN 16

/* Google's key: base64url, padding optional. 0 or -EINVAL. */
static int decode_key(const char *key, size_t key_len, uint8_t out[GCDN_KEY_LEN]) {
  char tmp[64];
  uint8_t raw[48];
  size_t n = 0, olen = 0;
  int rc = -EINVAL;
  if (key == NULL || key_len == 0 || key_len > 44)
    return -EINVAL;
  for (size_t i = 0; i < key_len; i++) {
    char c = key[i];
    if (c == '+' || c == '/') /* standard base64 is not what Google hands out */
      goto done;
    tmp[n++] = c == '-' ? '+' : c == '_' ? '/' : c;
  }
  while (n % 4)
    tmp[n++] = '=';
  if (mbedtls_base64_decode(raw, sizeof raw, &olen, (const unsigned char *)tmp, n) == 0 &&
      olen == GCDN_KEY_LEN) {
    memcpy(out, raw, GCDN_KEY_LEN);
    rc = 0;
  }
done:
  mbedtls_platform_zeroize(tmp, sizeof tmp);
  mbedtls_platform_zeroize(raw, sizeof raw);
  return rc;
}

static int key_name_ok(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n == 0 || n > 63)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
          (s[i] >= '0' && s[i] <= '9') || s[i] == '-' || s[i] == '_'))
      return 0;
  return 1;
}

int tg_signer_gcdn_sign(const tg_signer_gcdn_opts_t *o, const char *key, size_t key_len,
                        const char *url, int64_t expires, tg_buf_t *out, char *err,
                        size_t errlen) {
  tg_signer_url_t u, p = {0};
  tg_buf_t res = {0};
  uint8_t k[GCDN_KEY_LEN], mac[20];
  size_t signed_from;
  int rc;
  if (o == NULL || !key_name_ok(o->key_name)) {
    tg_signer_err(err, errlen, "gcdn: the key name must be 1 to 63 of [A-Za-z0-9_-]");
    return -EINVAL;
  }
  if (expires <= 0) {
    tg_signer_err(err, errlen, "gcdn: no expiry");
    return -EINVAL;
  }
  if (decode_key(key, key_len, k) != 0) {
    tg_signer_err(err, errlen, "gcdn: the key is not a base64url 16-byte key");
    return -EINVAL;
  }
  if ((rc = tg_signer_url(url, 0, &u, err, errlen)) != 0)
    goto wipe;
  if ((rc = tg_buf_append(&res, u.buf.data, u.buf.len)) != 0)
    goto done;
  char sep = u.query < u.buf.len ? '&' : '?';
  if (o->url_prefix != NULL) {
    if ((rc = tg_signer_url(o->url_prefix, 0, &p, err, errlen)) != 0)
      goto done;
    if (p.buf.len > u.buf.len || memcmp(p.buf.data, u.buf.data, p.buf.len) != 0) {
      tg_signer_err(err, errlen, "gcdn: the URL does not start with the URL prefix");
      rc = -EINVAL;
      goto done;
    }
    if ((rc = tg_buf_printf(&res, "%c", sep)) != 0)
      goto done;
    signed_from = res.len;
    if ((rc = tg_buf_puts(&res, "URLPrefix=")) != 0 ||
        (rc = tg_signer_b64(&res, (const uint8_t *)p.buf.data, p.buf.len, 1, 1)) != 0 ||
        (rc = tg_buf_printf(&res, "&Expires=%" PRId64 "&KeyName=%s", expires, o->key_name)) != 0)
      goto done;
  } else {
    signed_from = 0;
    if ((rc = tg_buf_printf(&res, "%cExpires=%" PRId64 "&KeyName=%s", sep, expires,
                            o->key_name)) != 0)
      goto done;
  }
  if (mbedtls_md_hmac(mbedtls_md_info_from_type(MBEDTLS_MD_SHA1), k, sizeof k,
                      (const unsigned char *)res.data + signed_from, res.len - signed_from,
                      mac) != 0) {
    tg_signer_err(err, errlen, "gcdn: HMAC failed");
    rc = -EINVAL;
    goto done;
  }
  if ((rc = tg_buf_puts(&res, "&Signature=")) != 0 ||
      (rc = tg_signer_b64(&res, mac, sizeof mac, 1, 1)) != 0)
    goto done;
  rc = tg_signer_finish(&res, out);
done:
  if (rc == -ENOMEM)
    tg_signer_err(err, errlen, "out of memory");
  tg_signer_buf_wipe(&res);
  tg_signer_url_free(&p);
  tg_signer_url_free(&u);
wipe:
  mbedtls_platform_zeroize(k, sizeof k);
  mbedtls_platform_zeroize(mac, sizeof mac);
  return rc;
}
