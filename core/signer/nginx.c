#include "signer/signer.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <mbedtls/md5.h>
#include <mbedtls/platform_util.h>

#include "base/hex.h"
#include "signer/common.h"

/* nginx's $uri: the path with %XX decoded. Refuses what nginx would rewrite
 * before hashing (merged slashes, dot segments) or reject (%00). */
static int decode_path(const char *p, size_t n, tg_buf_t *out, char *err, size_t errlen) {
  for (size_t i = 0; i < n; i++) {
    char c = p[i];
    if (c == '%') {
      c = (char)(tg_hex_value(p[i + 1]) << 4 | tg_hex_value(p[i + 2]));
      i += 2;
      if (c == '\0') {
        tg_signer_err(err, errlen, "the URL's path has %%00, which nginx refuses");
        return -EINVAL;
      }
    }
    if (tg_buf_append(out, &c, 1) != 0)
      return -ENOMEM;
  }
  const char *s = out->data;
  for (size_t i = 0; i < out->len; i++) {
    if (s[i] != '/')
      continue;
    size_t j = i + 1;
    while (j < out->len && s[j] != '/')
      j++;
    size_t seg = j - i - 1;
    if ((seg == 0 && j < out->len) || (seg == 1 && s[i + 1] == '.') ||
        (seg == 2 && s[i + 1] == '.' && s[i + 2] == '.')) {
      tg_signer_err(err, errlen,
                    "the URL's path has an empty, '.' or '..' segment, which nginx rewrites");
      return -EINVAL;
    }
  }
  return 0;
}

static int var_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}

/* The expression with its variables substituted, into h. */
static int expand(const char *expr, const char *exp_s, const tg_buf_t *uri, const char *key,
                  size_t key_len, tg_buf_t *h, char *err, size_t errlen) {
  int used_secret = 0;
  for (const char *p = expr; *p;) {
    if (*p != '$') {
      const char *q = strchr(p, '$');
      size_t len = q ? (size_t)(q - p) : strlen(p);
      if (tg_buf_append(h, p, len) != 0)
        return -ENOMEM;
      p += len;
      continue;
    }
    const char *name = p + 1, *end;
    size_t len = 0;
    if (*name == '{') {
      name++;
      while (var_char(name[len]))
        len++;
      if (name[len] != '}') {
        tg_signer_err(err, errlen, "secure_link_md5 expression: unterminated ${...}");
        return -EINVAL;
      }
      end = name + len + 1;
    } else {
      while (var_char(name[len]))
        len++;
      end = name + len;
    }
    int rc;
    if (len == 19 && strncmp(name, "secure_link_expires", len) == 0) {
      rc = tg_buf_puts(h, exp_s);
    } else if (len == 3 && strncmp(name, "uri", len) == 0) {
      rc = tg_buf_append(h, uri->data, uri->len);
    } else if (len == 6 && strncmp(name, "secret", len) == 0) {
      rc = tg_buf_append(h, key, key_len);
      used_secret = 1;
    } else {
      tg_signer_err(err, errlen,
                    "secure_link_md5 expression: unknown variable $%.*s (known: "
                    "$secure_link_expires, $uri, $secret)",
                    (int)(len > 64 ? 64 : len), name);
      return -EINVAL;
    }
    if (rc != 0)
      return -ENOMEM;
    p = end;
  }
  if (!used_secret) {
    tg_signer_err(err, errlen, "secure_link_md5 expression: no $secret, so anyone could sign");
    return -EINVAL;
  }
  return 0;
}

int tg_signer_nginx_sign(const tg_signer_nginx_opts_t *o, const char *key, size_t key_len,
                         const char *url, int64_t expires, tg_buf_t *out, char *err,
                         size_t errlen) {
  tg_signer_url_t u;
  tg_buf_t uri = {0}, h = {0}, res = {0};
  uint8_t md5[16];
  char exp_s[24];
  int rc;
  const char *expr = o && o->expression ? o->expression : TG_SIGNER_NGINX_DEFAULT;
  if (key == NULL || key_len == 0 || memchr(key, '\0', key_len) != NULL) {
    tg_signer_err(err, errlen, "nginx secure_link: the key is missing or has a NUL byte");
    return -EINVAL;
  }
  if (expires <= 0) {
    tg_signer_err(err, errlen, "nginx secure_link: no expiry");
    return -EINVAL;
  }
  if ((rc = tg_signer_url(url, 1, &u, err, errlen)) != 0)
    return rc;
  snprintf(exp_s, sizeof exp_s, "%" PRId64, expires);
  if ((rc = decode_path(u.buf.data + u.path, u.query - u.path, &uri, err, errlen)) != 0)
    goto done;
  if ((rc = expand(expr, exp_s, &uri, key, key_len, &h, err, errlen)) != 0)
    goto done;
  if (mbedtls_md5_ret((const unsigned char *)h.data, h.len, md5) != 0) {
    tg_signer_err(err, errlen, "nginx secure_link: MD5 failed");
    rc = -EINVAL;
    goto done;
  }
  if ((rc = tg_buf_append(&res, u.buf.data, u.buf.len)) != 0 ||
      (rc = tg_buf_puts(&res, u.query < u.buf.len ? "&md5=" : "?md5=")) != 0 ||
      (rc = tg_signer_b64(&res, md5, sizeof md5, 1, 0)) != 0 ||
      (rc = tg_buf_printf(&res, "&expires=%s", exp_s)) != 0)
    goto done;
  rc = tg_signer_finish(&res, out);
done:
  if (rc == -ENOMEM)
    tg_signer_err(err, errlen, "out of memory");
  mbedtls_platform_zeroize(md5, sizeof md5);
  tg_signer_buf_wipe(&h);
  tg_buf_free(&uri);
  tg_signer_buf_wipe(&res);
  tg_signer_url_free(&u);
  return rc;
}
