#include "signer/signer.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include <mbedtls/pk.h>
#include <mbedtls/platform_util.h>
#include <mbedtls/sha1.h>

#include "signer/common.h"

/* For RSA blinding: the signature is deterministic, the random only hides
 * the private operation's timing. */
static int rng(void *ctx, unsigned char *out, size_t n) {
  (void)ctx;
  while (n > 0) {
    ssize_t r = getrandom(out, n, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return -1;
    out += r;
    n -= (size_t)r;
  }
  return 0;
}

static int key_pair_id_ok(const char *s) {
  size_t n = s ? strlen(s) : 0;
  if (n == 0 || n > 64)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') ||
          (s[i] >= '0' && s[i] <= '9')))
      return 0;
  return 1;
}

int tg_signer_cloudfront_sign(const tg_signer_cloudfront_opts_t *o, const char *key,
                              size_t key_len, const char *url, int64_t expires, tg_buf_t *out,
                              char *err, size_t errlen) {
  tg_signer_url_t u;
  tg_buf_t pem = {0}, policy = {0}, res = {0};
  mbedtls_pk_context pk;
  unsigned char hash[20], sig[MBEDTLS_PK_SIGNATURE_MAX_SIZE];
  size_t siglen = 0;
  int rc;
  if (o == NULL || !key_pair_id_ok(o->key_pair_id)) {
    tg_signer_err(err, errlen, "cloudfront: the key pair id must be 1 to 64 of [A-Za-z0-9]");
    return -EINVAL;
  }
  if (expires <= 0) {
    tg_signer_err(err, errlen, "cloudfront: no expiry");
    return -EINVAL;
  }
  if (key == NULL || key_len == 0) {
    tg_signer_err(err, errlen, "cloudfront: no key");
    return -EINVAL;
  }
  if ((rc = tg_signer_url(url, 0, &u, err, errlen)) != 0)
    return rc;
  mbedtls_pk_init(&pk);
  /* mbedTLS reads PEM only from a NUL-terminated buffer, length counting it. */
  if ((rc = tg_buf_append(&pem, key, key_len)) != 0)
    goto done;
  if (mbedtls_pk_parse_key(&pk, (const unsigned char *)pem.data, pem.len + 1, NULL, 0) != 0 ||
      !mbedtls_pk_can_do(&pk, MBEDTLS_PK_RSA)) {
    tg_signer_err(err, errlen, "cloudfront: the key is not an unencrypted RSA private key in PEM");
    rc = -EINVAL;
    goto done;
  }
  /* The encoded URL carries no '"' or '\\', so it needs no JSON escaping. */
  if ((rc = tg_buf_printf(&policy,
                          "{\"Statement\":[{\"Resource\":\"%s\",\"Condition\":{\"DateLessThan\":"
                          "{\"AWS:EpochTime\":%" PRId64 "}}}]}",
                          u.buf.data, expires)) != 0)
    goto done;
  if (mbedtls_sha1_ret((const unsigned char *)policy.data, policy.len, hash) != 0 ||
      mbedtls_pk_sign(&pk, MBEDTLS_MD_SHA1, hash, sizeof hash, sig, &siglen, rng, NULL) != 0) {
    tg_signer_err(err, errlen, "cloudfront: RSA signing failed");
    rc = -EINVAL;
    goto done;
  }
  if ((rc = tg_buf_append(&res, u.buf.data, u.buf.len)) != 0 ||
      (rc = tg_buf_printf(&res, "%cExpires=%" PRId64 "&Key-Pair-Id=%s&Signature=",
                          u.query < u.buf.len ? '&' : '?', expires, o->key_pair_id)) != 0)
    goto done;
  size_t from = res.len;
  if ((rc = tg_signer_b64(&res, sig, siglen, 0, 1)) != 0)
    goto done;
  for (size_t i = from; i < res.len; i++) {
    char *c = &res.data[i];
    *c = *c == '+' ? '-' : *c == '=' ? '_' : *c == '/' ? '~' : *c;
  }
  rc = tg_signer_finish(&res, out);
done:
  if (rc == -ENOMEM)
    tg_signer_err(err, errlen, "out of memory");
  mbedtls_pk_free(&pk);
  mbedtls_platform_zeroize(hash, sizeof hash);
  mbedtls_platform_zeroize(sig, sizeof sig);
  tg_signer_buf_wipe(&pem);
  tg_buf_free(&policy);
  tg_signer_buf_wipe(&res);
  tg_signer_url_free(&u);
  return rc;
}
