#include "signer/signer.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mbedtls/platform_util.h>

#include "base/b64.h"
#include "base/hex.h"
#include "base/secret.h"
#include "signer/common.h"

void tg_signer_err(char *err, size_t errlen, const char *fmt, ...) {
  if (err == NULL || errlen == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err, errlen, fmt, ap);
  va_end(ap);
}

/* What passes raw follows the WHATWG URL serializer (what Node's URL, and so
 * the npm reference signers, produce): RFC 3986's unreserved, sub-delims,
 * ':' '@' '/' '?', and also '|' '^' '[' ']'; in the query, '\'' is encoded.
 * '%' is checked by the caller. */
static int url_raw_ok(unsigned char c, int in_query) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
    return 1;
  if (c == '\'')
    return !in_query;
  return c != 0 && strchr("-._~!$&()*+,;=:@/?|^[]", c) != NULL;
}

/* A host name, an IPv4 or [IPv6] address, and a port: no user info. */
static int host_ok(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
         (c != 0 && strchr("-.:[]", c) != NULL);
}

static int scheme_char(char c, int first) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'))
    return 1;
  return !first && ((c >= '0' && c <= '9') || c == '+' || c == '-' || c == '.');
}

int tg_signer_url(const char *url, int allow_path, tg_signer_url_t *u, char *err, size_t errlen) {
  static const char hexd[] = "0123456789ABCDEF";
  size_t n, i = 0;
  memset(u, 0, sizeof *u);
  if (url == NULL || url[0] == '\0') {
    tg_signer_err(err, errlen, "no URL to sign");
    return -EINVAL;
  }
  n = strlen(url);
  if (n > TG_SIGNER_URL_MAX) {
    tg_signer_err(err, errlen, "the URL is longer than %d bytes", TG_SIGNER_URL_MAX);
    return -EINVAL;
  }
  if (url[0] == '/') {
    if (!allow_path || url[1] == '/') {
      tg_signer_err(err, errlen, "the URL must be absolute (scheme://host/path)");
      return -EINVAL;
    }
  } else {
    while (i < n && scheme_char(url[i], i == 0))
      i++;
    if (i == 0 || strncmp(url + i, "://", 3) != 0) {
      tg_signer_err(err, errlen, "the URL has no scheme://");
      return -EINVAL;
    }
    i += 3;
    size_t a = i;
    while (i < n && url[i] != '/' && url[i] != '?' && url[i] != '#') {
      unsigned char c = (unsigned char)url[i];
      if (!host_ok(c)) {
        tg_signer_err(err, errlen, "the URL's host has a byte 0x%02x that a host may not carry", c);
        return -EINVAL;
      }
      i++;
    }
    if (i == a) {
      tg_signer_err(err, errlen, "the URL has no host");
      return -EINVAL;
    }
    u->absolute = 1;
  }
  int rc = tg_buf_append(&u->buf, url, i);
  /* Scheme and host are case-insensitive; WHATWG writes them in lowercase. */
  for (size_t j = 0; rc == 0 && j < i; j++)
    if (u->buf.data[j] >= 'A' && u->buf.data[j] <= 'Z')
      u->buf.data[j] = (char)(u->buf.data[j] - 'A' + 'a');
  if (rc == 0 && (i == n || url[i] != '/'))
    rc = tg_buf_puts(&u->buf, "/"); /* "https://h" and "https://h/" are one resource */
  u->path = u->absolute ? i : 0;
  u->query = SIZE_MAX;
  for (; rc == 0 && i < n; i++) {
    unsigned char c = (unsigned char)url[i];
    if (c == '#') {
      tg_signer_err(err, errlen, "the URL has a fragment ('#'), which a CDN never sees");
      goto invalid;
    }
    if (c == '\\') {
      /* WHATWG reads it as '/' in http(s) URLs: refuse rather than guess. */
      tg_signer_err(err, errlen, "the URL has a '\\'");
      goto invalid;
    }
    if (c == '%') {
      if (i + 2 >= n || tg_hex_value(url[i + 1]) < 0 || tg_hex_value(url[i + 2]) < 0) {
        tg_signer_err(err, errlen, "the URL has a '%%' that is not followed by two hex digits");
        goto invalid;
      }
      rc = tg_buf_append(&u->buf, url + i, 3);
      i += 2;
      continue;
    }
    if (c == '?' && u->query == SIZE_MAX)
      u->query = u->buf.len;
    if (url_raw_ok(c, u->query != SIZE_MAX)) {
      rc = tg_buf_append(&u->buf, url + i, 1);
    } else {
      char e[3] = {'%', hexd[c >> 4], hexd[c & 15]};
      rc = tg_buf_append(&u->buf, e, 3);
    }
  }
  if (rc == 0 && u->buf.len > TG_SIGNER_URL_MAX) {
    tg_signer_err(err, errlen, "the URL is longer than %d bytes once encoded", TG_SIGNER_URL_MAX);
    goto invalid;
  }
  if (rc != 0) {
    tg_signer_err(err, errlen, "out of memory");
    tg_signer_url_free(u);
    return rc;
  }
  if (u->query == SIZE_MAX)
    u->query = u->buf.len;
  return 0;
invalid:
  tg_signer_url_free(u);
  return -EINVAL;
}

void tg_signer_url_free(tg_signer_url_t *u) {
  tg_buf_free(&u->buf);
  memset(u, 0, sizeof *u);
}

int tg_signer_b64(tg_buf_t *b, const uint8_t *in, size_t n, int url, int pad) {
  size_t need = tg_b64_len(n, pad) + 1;
  int rc = tg_buf_reserve(b, need);
  if (rc != 0)
    return rc;
  if (tg_b64_encode(in, n, url, pad, b->data + b->len, need) != 0)
    return -EINVAL;
  b->len += need - 1;
  return 0;
}

void tg_signer_buf_wipe(tg_buf_t *b) {
  if (b->data != NULL)
    mbedtls_platform_zeroize(b->data, b->cap);
  tg_buf_free(b);
}

int tg_signer_finish(tg_buf_t *tmp, tg_buf_t *out) {
  int rc = tg_buf_append(out, tmp->data, tmp->len);
  tg_signer_buf_wipe(tmp);
  return rc;
}

static const struct {
  const char *name;
  tg_signer_type_t type;
} types[] = {
    {"nginx_secure_link", TG_SIGNER_NGINX},
    {"akamai_edgeauth", TG_SIGNER_AKAMAI},
    {"gcdn", TG_SIGNER_GCDN},
    {"cloudfront", TG_SIGNER_CLOUDFRONT},
};

tg_signer_type_t tg_signer_type_parse(const char *name) {
  for (size_t i = 0; name != NULL && i < sizeof types / sizeof types[0]; i++)
    if (strcmp(name, types[i].name) == 0)
      return types[i].type;
  return TG_SIGNER_NONE;
}

const char *tg_signer_type_name(tg_signer_type_t t) {
  for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
    if (types[i].type == t)
      return types[i].name;
  return NULL;
}

int tg_signer_sign(const tg_signer_t *s, const char *url, int64_t expires, tg_buf_t *out,
                   char *err, size_t errlen) {
  if (s == NULL || s->key == NULL || s->key_len == 0) {
    tg_signer_err(err, errlen, "the signer has no key");
    return -EINVAL;
  }
  switch (s->type) {
  case TG_SIGNER_NGINX:
    return tg_signer_nginx_sign(&s->opt.nginx, s->key, s->key_len, url, expires, out, err, errlen);
  case TG_SIGNER_AKAMAI:
    return tg_signer_akamai_sign(&s->opt.akamai, s->key, s->key_len, url, expires, out, err,
                                 errlen);
  case TG_SIGNER_GCDN:
    return tg_signer_gcdn_sign(&s->opt.gcdn, s->key, s->key_len, url, expires, out, err, errlen);
  case TG_SIGNER_CLOUDFRONT:
    return tg_signer_cloudfront_sign(&s->opt.cloudfront, s->key, s->key_len, url, expires, out,
                                     err, errlen);
  default:
    tg_signer_err(err, errlen, "unknown signer type");
    return -EINVAL;
  }
}

static int get_bool(const tg_config_section_t *sec, const char *key, int *out, char *err, size_t errlen) {
  const char *v = tg_config_get(sec, key);
  if (v == NULL)
    return 0;
  if (strcmp(v, "true") == 0 || strcmp(v, "false") == 0) {
    *out = v[0] == 't';
    return 0;
  }
  tg_signer_err(err, errlen, "signer.%s: expected true or false", key);
  return -EINVAL;
}

static int kind_options(const tg_config_section_t *sec, tg_signer_t *s, char *err, size_t errlen) {
  switch (s->type) {
  case TG_SIGNER_NGINX:
    s->opt.nginx.expression = tg_config_get(sec, "expression");
    return 0;
  case TG_SIGNER_AKAMAI: {
    tg_signer_akamai_opts_t *o = &s->opt.akamai;
    const char *alg = tg_config_get(sec, "algorithm");
    o->token_name = tg_config_get(sec, "token_name");
    o->acl = tg_config_get(sec, "acl");
    if (alg == NULL || strcmp(alg, "sha256") == 0)
      o->alg = TG_AKAMAI_SHA256;
    else if (strcmp(alg, "sha1") == 0)
      o->alg = TG_AKAMAI_SHA1;
    else if (strcmp(alg, "md5") == 0)
      o->alg = TG_AKAMAI_MD5;
    else {
      tg_signer_err(err, errlen, "signer.algorithm: '%.32s' is not one of sha256, sha1, md5", alg);
      return -EINVAL;
    }
    if (get_bool(sec, "url_form", &o->url_form, err, errlen) != 0 ||
        get_bool(sec, "escape_early", &o->escape_early, err, errlen) != 0)
      return -EINVAL;
    return 0;
  }
  case TG_SIGNER_GCDN:
    s->opt.gcdn.key_name = tg_config_get(sec, "key_name");
    s->opt.gcdn.url_prefix = tg_config_get(sec, "url_prefix");
    if (s->opt.gcdn.key_name == NULL) {
      tg_signer_err(err, errlen, "signer.key_name: required (the key's name in Cloud CDN)");
      return -EINVAL;
    }
    return 0;
  case TG_SIGNER_CLOUDFRONT:
    s->opt.cloudfront.key_pair_id = tg_config_get(sec, "key_pair_id");
    if (s->opt.cloudfront.key_pair_id == NULL) {
      tg_signer_err(err, errlen, "signer.key_pair_id: required (the CloudFront public key id)");
      return -EINVAL;
    }
    return 0;
  default:
    tg_signer_err(err, errlen, "signer.type: unknown");
    return -EINVAL;
  }
}

int tg_signer_from_config(const tg_config_section_t *sec, tg_signer_t *out, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  if (sec->nitems == 0)
    return 0;
  const char *type = tg_config_get(sec, "type"), *file = tg_config_get(sec, "key_file");
  const char *ttl = tg_config_get(sec, "ttl_s");
  char why[256] = "";
  if ((out->type = tg_signer_type_parse(type)) == TG_SIGNER_NONE) {
    tg_signer_err(err, errlen, "signer.type: '%.32s' is not a signer type", type ? type : "");
    return -EINVAL;
  }
  out->ttl_s = TG_SIGNER_DEFAULT_TTL_S;
  if (ttl != NULL) {
    char *end;
    unsigned long v = strtoul(ttl, &end, 10);
    if (*end != '\0' || v < 1 || v > 7 * 86400 || ttl[0] == '-') {
      tg_signer_err(err, errlen, "signer.ttl_s: must be an integer in 1..604800");
      return -EINVAL;
    }
    out->ttl_s = (uint32_t)v;
  }
  out->base_url = tg_config_get(sec, "base_url");
  if (out->base_url != NULL) {
    tg_signer_url_t u;
    int bad = tg_signer_url(out->base_url, 0, &u, why, sizeof why) != 0;
    if (!bad)
      tg_signer_url_free(&u);
    if (bad || strpbrk(out->base_url, "?#") != NULL) {
      tg_signer_err(err, errlen, "signer.base_url: %s", why[0] ? why : "must not carry a query");
      tg_signer_free(out);
      return -EINVAL;
    }
  }
  int rc = kind_options(sec, out, err, errlen);
  if (rc != 0) {
    tg_signer_free(out);
    return rc;
  }
  if (file == NULL) {
    tg_signer_err(err, errlen, "signer.key_file: required");
    tg_signer_free(out);
    return -EINVAL;
  }
  if ((out->key = tg_secret_read(file, "signer key", 0, why, sizeof why)) == NULL) {
    tg_signer_err(err, errlen, "signer.key_file: %s", why);
    tg_signer_free(out);
    return -EINVAL;
  }
  out->key_len = strlen(out->key);
  /* A probe: the kind parses the key exactly as it will on a purchase. */
  tg_buf_t probe = {0};
  int64_t expires;
  rc = tg_signer_resource(out, "https://probe.invalid/tollgate-probe", 1, &probe, &expires, why, sizeof why);
  tg_signer_buf_wipe(&probe);
  if (rc != 0) {
    tg_signer_err(err, errlen, "signer (%s, key_file %s): %s", type, file, why);
    tg_signer_free(out);
    return rc;
  }
  return 0;
}

int tg_signer_resource(const tg_signer_t *s, const char *uri, int64_t now, tg_buf_t *out, int64_t *expires,
                       char *err, size_t errlen) {
  if (s == NULL || uri == NULL) {
    tg_signer_err(err, errlen, "no signer");
    return -EINVAL;
  }
  *expires = now + (int64_t)(s->ttl_s ? s->ttl_s : TG_SIGNER_DEFAULT_TTL_S);
  if (s->base_url == NULL)
    return tg_signer_sign(s, uri, *expires, out, err, errlen);
  /* The resource's path and query under the CDN origin (and its prefix). */
  const char *p = strstr(uri, "://");
  p = p ? strpbrk(p + 3, "/?") : NULL;
  const char *tail = p ? p : "/";
  size_t blen = strlen(s->base_url);
  if (blen > 0 && s->base_url[blen - 1] == '/' && tail[0] == '/')
    blen--;
  tg_buf_t url = {0};
  int rc = tg_buf_append(&url, s->base_url, blen);
  if (rc == 0 && tail[0] == '?')
    rc = tg_buf_puts(&url, "/");
  if (rc == 0)
    rc = tg_buf_puts(&url, tail);
  if (rc != 0) {
    tg_buf_free(&url);
    return rc;
  }
  rc = tg_signer_sign(s, url.data, *expires, out, err, errlen);
  tg_buf_free(&url);
  return rc;
}

void tg_signer_free(tg_signer_t *s) {
  if (s == NULL)
    return;
  if (s->key != NULL) {
    mbedtls_platform_zeroize(s->key, s->key_len);
    tg_secret_free(s->key);
  }
  mbedtls_platform_zeroize(s, sizeof *s);
}
