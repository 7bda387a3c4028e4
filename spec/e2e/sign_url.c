/* A test helper that signs one URL with core/signer and prints it, or fails
 * (exit 1, the error on stderr; exit 2 on bad usage). Built by CMake with the
 * build's own flags (sanitizers included), until the gateway signs by itself.
 *
 *   tg_sign_url SECRET EXPRESSION|- URL EXPIRES
 *     nginx secure_link (spec/e2e/signer_nginx_spec.lua).
 *   tg_sign_url --kind=akamai [OPTION...] KEY URL|PATH EXPIRES
 *     Akamai EdgeAuth; KEY is the hex key. --token prints the token alone for
 *     PATH (tg_signer_akamai_token), else the signed URL. Options:
 *     --url-form --acl=A --start=N --ip=S --id=S --data=S --salt=S
 *     --escape-early --alg=sha256|sha1|md5 --token-name=S
 *   tg_sign_url --kind=cloudfront --key-pair-id=ID KEYFILE URL EXPIRES
 *     CloudFront canned policy; KEYFILE holds the RSA private key in PEM.
 * Used by spec/interop/signers.test.js against the npm reference signers. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "signer/signer.h"

static int usage(void) {
  fprintf(stderr, "usage: see the comment at the top of spec/e2e/sign_url.c\n");
  return 2;
}

static const char *opt(const char *arg, const char *name) {
  size_t n = strlen(name);
  return strncmp(arg, name, n) == 0 && arg[n] == '=' ? arg + n + 1 : NULL;
}

static int read_file(const char *path, tg_buf_t *b) {
  FILE *f = fopen(path, "rb");
  char chunk[4096];
  size_t n;
  if (f == NULL)
    return -errno;
  while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
    if (tg_buf_append(b, chunk, n) != 0) {
      fclose(f);
      return -ENOMEM;
    }
  fclose(f);
  return tg_buf_puts(b, "");
}

int main(int argc, char **argv) {
  char err[256] = "";
  tg_buf_t out = {0}, key = {0};
  int rc;
  if (argc >= 2 && strncmp(argv[1], "--kind=", 7) == 0) {
    const char *kind = argv[1] + 7, *v;
    tg_signer_akamai_opts_t ak = {0};
    tg_signer_cloudfront_opts_t cf = {0};
    int token_only = 0, i = 2;
    for (; i < argc && strncmp(argv[i], "--", 2) == 0; i++) {
      const char *a = argv[i];
      if (strcmp(a, "--url-form") == 0)
        ak.url_form = 1;
      else if (strcmp(a, "--escape-early") == 0)
        ak.escape_early = 1;
      else if (strcmp(a, "--token") == 0)
        token_only = 1;
      else if ((v = opt(a, "--acl")))
        ak.acl = v;
      else if ((v = opt(a, "--start")))
        ak.start_time = strtoll(v, NULL, 10);
      else if ((v = opt(a, "--ip")))
        ak.ip = v;
      else if ((v = opt(a, "--id")))
        ak.session_id = v;
      else if ((v = opt(a, "--data")))
        ak.payload = v;
      else if ((v = opt(a, "--salt")))
        ak.salt = v;
      else if ((v = opt(a, "--token-name")))
        ak.token_name = v;
      else if ((v = opt(a, "--alg")))
        ak.alg = strcmp(v, "sha1") == 0 ? TG_AKAMAI_SHA1
                 : strcmp(v, "md5") == 0 ? TG_AKAMAI_MD5 : TG_AKAMAI_SHA256;
      else if ((v = opt(a, "--key-pair-id")))
        cf.key_pair_id = v;
      else
        return usage();
    }
    if (argc - i != 3)
      return usage();
    const char *url = argv[i + 1];
    int64_t expires = strtoll(argv[i + 2], NULL, 10);
    if (strcmp(kind, "akamai") == 0) {
      rc = token_only ? tg_signer_akamai_token(&ak, argv[i], strlen(argv[i]), url, expires, &out,
                                               err, sizeof err)
                      : tg_signer_akamai_sign(&ak, argv[i], strlen(argv[i]), url, expires, &out,
                                              err, sizeof err);
    } else if (strcmp(kind, "cloudfront") == 0) {
      if ((rc = read_file(argv[i], &key)) != 0) {
        fprintf(stderr, "sign: cannot read %s: %s\n", argv[i], strerror(-rc));
        return 1;
      }
      rc = tg_signer_cloudfront_sign(&cf, key.data, key.len, url, expires, &out, err, sizeof err);
      tg_buf_free(&key);
    } else {
      return usage();
    }
  } else if (argc == 5) {
    tg_signer_nginx_opts_t o = {.expression = strcmp(argv[2], "-") ? argv[2] : NULL};
    rc = tg_signer_nginx_sign(&o, argv[1], strlen(argv[1]), argv[3], strtoll(argv[4], NULL, 10),
                              &out, err, sizeof err);
  } else {
    return usage();
  }
  if (rc != 0) {
    fprintf(stderr, "sign: %d %s\n", rc, err);
    return 1;
  }
  puts(out.data);
  tg_buf_free(&out);
  return 0;
}
