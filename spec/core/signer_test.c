#include "signer/signer.h"
#include "test.h"

#include <errno.h>

#include "base/secret.h"

/* Expected URLs from spec/core/fixtures/signer_vectors.py (python3 hashlib,
 * hmac, base64 and the openssl command; not this code). Regenerate with
 *   python3 spec/core/fixtures/signer_vectors.py */
#define NGINX_PLAIN "https://cdn.example/videos/a.mp4?md5=8wNazH2j8xaDy3PsZhG_Iw&expires=1767225600"
#define NGINX_ESCAPED "https://cdn.example/v/a%20b/%C3%A9%22.mp4?x=1&md5=HN-P534gwh9SR9VY6JL3Nw&expires=1767225600"
#define NGINX_EXPR "/videos/a.mp4?md5=pi42WLPXtlARKyq8T0Expw&expires=1767225600"
#define AKAMAI_ACL "exp=1767225600~acl=/videos/*~hmac=1ffee9b9cab9bf3f90b904f4986797390fd792a71b1e9727012ca68a54636dd5"
#define AKAMAI_ACL_ST "st=1767225000~exp=1767225600~acl=/a/*!/b/*~id=s-1~data=p1~hmac=ccbb35e12891c51460bb3fa66e88eedede89a7a8885f0535bf6243b453bf5aa7"
#define AKAMAI_URL_ESC "ip=10.0.0.1~exp=1767225600~id=x%20y%7e%27%2a(~data=d%2f1~hmac=202c3bd21cb15d42c343c413b4223878a6038424bcf272ca6f359365558b51e2"
#define AKAMAI_SHA1 "exp=1767225600~acl=/x~hmac=71ee38cbef2e8467a0bfd7f65eb13cb46941f18e"
#define GCDN_URL "https://media.example/segments/1.ts?Expires=1767225600&KeyName=my-key&Signature=YIE4zCtU0gVABmHCsK8r6L6L7PY="
#define GCDN_QUERY "https://media.example/a%20b.ts?q=1&Expires=1767225600&KeyName=my-key&Signature=2FrfQlawW3-o_NC_2Lr5RYqKTe0="
#define GCDN_PREFIX "https://media.example/segments/1.ts?URLPrefix=aHR0cHM6Ly9tZWRpYS5leGFtcGxlL3NlZ21lbnRzLw==&Expires=1767225600&KeyName=my-key&Signature=CdA1xmTPBGh9DLXRsI0MnUwXrDs="
#define GCDN_WHATWG "https://media.example/a|b^[c]'d?q=%27x%27&Expires=1767225600&KeyName=k1&Signature=aM_3alPqsae0r_XpFjcolTPR8Mo="
#define CF_CANNED "https://d111111abcdef8.cloudfront.net/img/a%20b.jpg?Expires=1767225600&Key-Pair-Id=K2JCJMDEHXQW5F&Signature=tAQCj~lSndKVfrytK6YlAK5~R8Bi~jFZIAAkXbraMpynGQtF0xdI5RIOH3UpsMjaBpOSX5hbmy1zsdviJGTNhlTOoj4fnLgoAnO8J5gFrlgqUjou1jb~SYY59iUXvVJ5WTtifIb4dmZfDYEW-xUDC7jOm0DcAZZ1T751w9tpS-~anCbh3RleGPifVzxn6~aOxwinVSMilmSH2IFSwJm~AkC3rV3fCeXS1616XJpwj~h3EjiVeY7XDqkSLt4RJCVAqOyXBGI4DH3dDoWhThbZa6izRsXICKBeAqqxik99JBIQEyKdyOtWHVp9wdeAUfIw2yuWYBrW6J~CR~Atdlj1Og__"

static const int64_t EXP = 1767225600;
static const char *NGX_KEY = "s3cr3t-k3y";
static const char *AK_KEY = "52a152a152a152a152a152a1";
static const char *G_KEY = "nZtRohdNF9m3cKM24IcK4w==";
#define RSA_PEM "spec/core/fixtures/signer_rsa.pem"
#define EC_PEM "spec/core/fixtures/signer_ec.pem"

static char *read_key(const char *path) {
  char err[256];
  char *k = tg_secret_read(path, "test key", 0, err, sizeof err);
  if (k == NULL)
    fprintf(stderr, "  %s\n", err);
  return k;
}

/* A failed sign leaves out as it was: what a caller had there stays, and
 * nothing of a URL is appended. */
#define PRESET(b) tg_buf_t b = {0}; tg_buf_puts(&b, "keep")
#define UNTOUCHED(b) (b.len == 4 && strcmp(b.data, "keep") == 0)

TEST(nginx_vectors) {
  char err[256] = "";
  tg_buf_t out = {0};
  CHECK_INT(tg_signer_nginx_sign(NULL, NGX_KEY, strlen(NGX_KEY),
                                 "https://cdn.example/videos/a.mp4", EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, NGINX_PLAIN);
  tg_buf_reset(&out);
  /* Space, non-ASCII and '"' are encoded in the URL; $uri hashes them decoded. */
  CHECK_INT(tg_signer_nginx_sign(NULL, NGX_KEY, strlen(NGX_KEY),
                                 "https://cdn.example/v/a b/\xc3\xa9\".mp4?x=1", EXP, &out, err,
                                 sizeof err),
            0);
  CHECK_STR(out.data, NGINX_ESCAPED);
  tg_buf_reset(&out);
  tg_signer_nginx_opts_t o = {.expression = "$uri|${secure_link_expires}|$secret"};
  CHECK_INT(tg_signer_nginx_sign(&o, NGX_KEY, strlen(NGX_KEY), "/videos/a.mp4", EXP, &out, err,
                                 sizeof err),
            0);
  CHECK_STR(out.data, NGINX_EXPR);
  tg_buf_free(&out);
}

TEST(nginx_bad_input) {
  char err[256];
  PRESET(out);
  struct {
    const char *expr, *key, *url;
  } bad[] = {
      {NULL, "", "https://cdn.example/a"},                /* missing key */
      {NULL, NGX_KEY, ""},                                /* no URL */
      {NULL, NGX_KEY, "cdn.example/a"},                   /* no scheme */
      {NULL, NGX_KEY, "https:///a"},                      /* no host */
      {NULL, NGX_KEY, "https://cdn.example/a#frag"},      /* fragment */
      {NULL, NGX_KEY, "https://cdn.example/a%2"},         /* truncated escape */
      {NULL, NGX_KEY, "https://cdn.example/a%zz"},        /* not hex */
      {NULL, NGX_KEY, "https://cdn.example/a/../b"},      /* nginx would rewrite */
      {NULL, NGX_KEY, "https://cdn.example/a/%2e/b"},     /* the same, encoded */
      {NULL, NGX_KEY, "https://cdn.example//a"},          /* merged slashes */
      {NULL, NGX_KEY, "https://cdn.example/a%00b"},       /* nginx refuses */
      {NULL, NGX_KEY, "https://cdn example/a"},           /* space in the host */
      {NULL, NGX_KEY, "https://user@cdn.example/a"},      /* user info */
      {NULL, NGX_KEY, "https://cdn.example/a\\b"},        /* WHATWG reads '/' */
      {"$secure_link_expires$uri", NGX_KEY, "/a"},        /* no secret: forgeable */
      {"$uri $remote_addr $secret", NGX_KEY, "/a"},       /* unknown variable */
      {"${uri $secret", NGX_KEY, "/a"},                   /* unterminated */
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    tg_signer_nginx_opts_t o = {.expression = bad[i].expr};
    err[0] = '\0';
    int rc = tg_signer_nginx_sign(&o, bad[i].key, strlen(bad[i].key), bad[i].url, EXP, &out, err,
                                  sizeof err);
    if (rc != -EINVAL)
      fprintf(stderr, "  case %zu\n", i);
    CHECK_INT(rc, -EINVAL);
    CHECK(err[0] != '\0');
    CHECK(strstr(err, NGX_KEY) == NULL);
    CHECK(UNTOUCHED(out));
  }
  CHECK_INT(tg_signer_nginx_sign(NULL, "a\0b", 3, "/a", EXP, &out, err, sizeof err), -EINVAL);
  CHECK_INT(tg_signer_nginx_sign(NULL, NGX_KEY, strlen(NGX_KEY), "/a", 0, &out, err, sizeof err),
            -EINVAL);
  CHECK_INT(tg_signer_nginx_sign(NULL, NULL, 0, "/a", EXP, &out, NULL, 0), -EINVAL);
  char big[TG_SIGNER_URL_MAX + 16];
  memset(big, 'a', sizeof big - 1);
  big[0] = '/';
  big[sizeof big - 1] = '\0';
  CHECK_INT(tg_signer_nginx_sign(NULL, NGX_KEY, strlen(NGX_KEY), big, EXP, &out, err, sizeof err),
            -EINVAL);
  CHECK(UNTOUCHED(out));
  /* Success appends after what was there. */
  CHECK_INT(tg_signer_nginx_sign(NULL, NGX_KEY, strlen(NGX_KEY),
                                 "https://cdn.example/videos/a.mp4", EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, "keep" NGINX_PLAIN);
  tg_buf_free(&out);
}

TEST(akamai_vectors) {
  char err[256] = "";
  tg_buf_t out = {0};
  tg_signer_akamai_opts_t o = {0};
  CHECK_INT(tg_signer_akamai_token(&o, AK_KEY, strlen(AK_KEY), "/videos/*", EXP, &out, err,
                                   sizeof err),
            0);
  CHECK_STR(out.data, AKAMAI_ACL);
  tg_buf_reset(&out);
  o = (tg_signer_akamai_opts_t){.acl = "/a/*!/b/*", .start_time = EXP - 600, .session_id = "s-1",
                                .payload = "p1"};
  CHECK_INT(tg_signer_akamai_token(&o, AK_KEY, strlen(AK_KEY), NULL, EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, AKAMAI_ACL_ST);
  tg_buf_reset(&out);
  o = (tg_signer_akamai_opts_t){.url_form = 1, .ip = "10.0.0.1", .session_id = "x y~'*(",
                                .payload = "d/1", .salt = "pepper", .escape_early = 1};
  CHECK_INT(tg_signer_akamai_token(&o, AK_KEY, strlen(AK_KEY), "/v/a%20b.mp4", EXP, &out, err,
                                   sizeof err),
            0);
  CHECK_STR(out.data, AKAMAI_URL_ESC);
  tg_buf_reset(&out);
  o = (tg_signer_akamai_opts_t){.alg = TG_AKAMAI_SHA1};
  CHECK_INT(tg_signer_akamai_token(&o, "0A0b0C", 6, "/x", EXP, &out, err, sizeof err), 0);
  CHECK_STR(out.data, AKAMAI_SHA1);
  tg_buf_reset(&out);
  /* The URL form: the path of the encoded URL is what url= hashes. */
  o = (tg_signer_akamai_opts_t){.url_form = 1, .ip = "10.0.0.1", .session_id = "x y~'*(",
                                .payload = "d/1", .salt = "pepper", .escape_early = 1};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), "https://cdn.example/v/a b.mp4",
                                  EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, "https://cdn.example/v/a%20b.mp4?__token__=" AKAMAI_URL_ESC);
  tg_buf_reset(&out);
  o = (tg_signer_akamai_opts_t){.acl = "/videos/*", .token_name = "hdnts"};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), "https://cdn.example/videos/a.mp4?q=1",
                                  EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, "https://cdn.example/videos/a.mp4?q=1&hdnts=" AKAMAI_ACL);
  tg_buf_free(&out);
}

TEST(akamai_bad_input) {
  char err[256];
  PRESET(out);
  tg_signer_akamai_opts_t o = {0};
  const char *url = "https://cdn.example/a";
  CHECK_INT(tg_signer_akamai_sign(&o, "", 0, url, EXP, &out, err, sizeof err), -EINVAL);
  CHECK_INT(tg_signer_akamai_sign(&o, "abc", 3, url, EXP, &out, err, sizeof err), -EINVAL);
  CHECK_INT(tg_signer_akamai_sign(&o, "zz52", 4, url, EXP, &out, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "zz52") == NULL);
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), url, 0, &out, err, sizeof err),
            -EINVAL);
  o.start_time = EXP + 1;
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), url, EXP, &out, err, sizeof err),
            -EINVAL);
  o = (tg_signer_akamai_opts_t){.acl = "/a~b"};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), url, EXP, &out, err, sizeof err),
            -EINVAL);
  o = (tg_signer_akamai_opts_t){.session_id = "a~b"};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), url, EXP, &out, err, sizeof err),
            -EINVAL);
  o = (tg_signer_akamai_opts_t){.token_name = "a=b"};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), url, EXP, &out, err, sizeof err),
            -EINVAL);
  o = (tg_signer_akamai_opts_t){0};
  CHECK_INT(tg_signer_akamai_sign(&o, AK_KEY, strlen(AK_KEY), "https://cdn.example/a#x", EXP, &out,
                                  err, sizeof err),
            -EINVAL);
  CHECK(UNTOUCHED(out));
  tg_buf_free(&out);
}

TEST(gcdn_vectors) {
  char err[256] = "";
  tg_buf_t out = {0};
  tg_signer_gcdn_opts_t o = {.key_name = "my-key"};
  CHECK_INT(tg_signer_gcdn_sign(&o, G_KEY, strlen(G_KEY), "https://media.example/segments/1.ts",
                                EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, GCDN_URL);
  tg_buf_reset(&out);
  /* Key without its padding; a URL with a query and a byte to encode. */
  CHECK_INT(tg_signer_gcdn_sign(&o, G_KEY, strlen(G_KEY) - 2, "https://media.example/a b.ts?q=1",
                                EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, GCDN_QUERY);
  tg_buf_reset(&out);
  o.url_prefix = "https://media.example/segments/";
  CHECK_INT(tg_signer_gcdn_sign(&o, G_KEY, strlen(G_KEY), "https://media.example/segments/1.ts",
                                EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, GCDN_PREFIX);
  tg_buf_reset(&out);
  /* The WHATWG form: host in lowercase, | ^ [ ] raw, ' encoded in the query. */
  tg_signer_gcdn_opts_t k1 = {.key_name = "k1"};
  CHECK_INT(tg_signer_gcdn_sign(&k1, G_KEY, strlen(G_KEY), "HTTPS://Media.EXAMPLE/a|b^[c]'d?q='x'",
                                EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, GCDN_WHATWG);
  tg_buf_free(&out);
}

TEST(gcdn_bad_input) {
  char err[256];
  PRESET(out);
  tg_signer_gcdn_opts_t o = {.key_name = "my-key"};
  const char *url = "https://media.example/a.ts";
  const char *keys[] = {"", "nZtRohdNF9m3cKM24IcK", /* 15 bytes */
                        "nZtRohdNF9m3cKM24IcK4w4w", /* 18 bytes */
                        "nZtRohdNF9m3c+M24IcK4w==", /* standard alphabet */
                        "nZtRohdNF9m3c!M24IcK4w=="};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    CHECK_INT(tg_signer_gcdn_sign(&o, keys[i], strlen(keys[i]), url, EXP, &out, err, sizeof err),
              -EINVAL);
    CHECK(strstr(err, "nZtR") == NULL);
  }
  CHECK_INT(tg_signer_gcdn_sign(&o, NULL, 0, url, EXP, &out, err, sizeof err), -EINVAL);
  const char *names[] = {NULL, "", "a b", "a&KeyName=b",
                         "0123456789012345678901234567890123456789012345678901234567890123"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    tg_signer_gcdn_opts_t b = {.key_name = names[i]};
    CHECK_INT(tg_signer_gcdn_sign(&b, G_KEY, strlen(G_KEY), url, EXP, &out, err, sizeof err),
              -EINVAL);
  }
  CHECK_INT(tg_signer_gcdn_sign(&o, G_KEY, strlen(G_KEY), "/a.ts", EXP, &out, err, sizeof err),
            -EINVAL); /* Google signs the whole URL: a path is not enough */
  o.url_prefix = "https://media.example/other/";
  CHECK_INT(tg_signer_gcdn_sign(&o, G_KEY, strlen(G_KEY), url, EXP, &out, err, sizeof err),
            -EINVAL);
  CHECK(UNTOUCHED(out));
  tg_buf_free(&out);
}

TEST(cloudfront_vector) {
  char err[256] = "";
  tg_buf_t out = {0};
  char *pem = read_key(RSA_PEM);
  CHECK(pem != NULL);
  tg_signer_cloudfront_opts_t o = {.key_pair_id = "K2JCJMDEHXQW5F"};
  int rc = tg_signer_cloudfront_sign(&o, pem, strlen(pem),
                                     "https://d111111abcdef8.cloudfront.net/img/a b.jpg", EXP,
                                     &out, err, sizeof err);
  tg_secret_free(pem);
  if (rc != 0)
    fprintf(stderr, "  %s\n", err);
  CHECK_INT(rc, 0);
  CHECK_STR(out.data, CF_CANNED);
  tg_buf_free(&out);
}

TEST(cloudfront_bad_input) {
  char err[256];
  PRESET(out);
  tg_signer_cloudfront_opts_t o = {.key_pair_id = "K2JCJMDEHXQW5F"};
  const char *url = "https://d111111abcdef8.cloudfront.net/a.jpg";
  char *ec = read_key(EC_PEM), *rsa = read_key(RSA_PEM);
  CHECK(ec != NULL && rsa != NULL);
  int rc_ec = tg_signer_cloudfront_sign(&o, ec, strlen(ec), url, EXP, &out, err, sizeof err);
  /* A PEM cut short: still PEM-looking, not a key. */
  int rc_cut = tg_signer_cloudfront_sign(&o, rsa, strlen(rsa) / 2, url, EXP, &out, err, sizeof err);
  int rc_path = tg_signer_cloudfront_sign(&o, rsa, strlen(rsa), "/a.jpg", EXP, &out, err, sizeof err);
  tg_signer_cloudfront_opts_t bad = {.key_pair_id = "K2J-CJM"};
  int rc_id = tg_signer_cloudfront_sign(&bad, rsa, strlen(rsa), url, EXP, &out, err, sizeof err);
  int rc_exp = tg_signer_cloudfront_sign(&o, rsa, strlen(rsa), url, -1, &out, err, sizeof err);
  tg_secret_free(ec);
  tg_secret_free(rsa);
  CHECK_INT(rc_ec, -EINVAL);
  CHECK_INT(rc_cut, -EINVAL);
  CHECK_INT(rc_path, -EINVAL);
  CHECK_INT(rc_id, -EINVAL);
  CHECK_INT(rc_exp, -EINVAL);
  CHECK_INT(tg_signer_cloudfront_sign(&o, "not a key", 9, url, EXP, &out, err, sizeof err),
            -EINVAL);
  CHECK_INT(tg_signer_cloudfront_sign(&o, NULL, 0, url, EXP, &out, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "not a key") == NULL);
  CHECK(UNTOUCHED(out));
  tg_buf_free(&out);
}

TEST(signer_by_type) {
  char err[256] = "";
  tg_buf_t out = {0};
  CHECK_INT(tg_signer_type_parse("nginx_secure_link"), TG_SIGNER_NGINX);
  CHECK_INT(tg_signer_type_parse("akamai_edgeauth"), TG_SIGNER_AKAMAI);
  CHECK_INT(tg_signer_type_parse("gcdn"), TG_SIGNER_GCDN);
  CHECK_INT(tg_signer_type_parse("cloudfront"), TG_SIGNER_CLOUDFRONT);
  CHECK_INT(tg_signer_type_parse("s3"), TG_SIGNER_NONE);
  CHECK_INT(tg_signer_type_parse(NULL), TG_SIGNER_NONE);
  CHECK_STR(tg_signer_type_name(TG_SIGNER_GCDN), "gcdn");
  CHECK(tg_signer_type_name(TG_SIGNER_NONE) == NULL);

  tg_signer_t s = {.type = TG_SIGNER_GCDN};
  s.opt.gcdn.key_name = "my-key";
  /* No key yet: refused, nothing written. */
  CHECK_INT(tg_signer_sign(&s, "https://media.example/segments/1.ts", EXP, &out, err, sizeof err),
            -EINVAL);
  CHECK_INT(out.len, 0);
  s.key = strdup(G_KEY);
  s.key_len = strlen(G_KEY);
  CHECK_INT(tg_signer_sign(&s, "https://media.example/segments/1.ts", EXP, &out, err, sizeof err),
            0);
  CHECK_STR(out.data, GCDN_URL);
  tg_signer_free(&s);
  CHECK(s.key == NULL && s.key_len == 0 && s.type == TG_SIGNER_NONE);
  tg_signer_free(NULL);

  tg_signer_t n = {.type = TG_SIGNER_NGINX, .key = strdup(NGX_KEY), .key_len = strlen(NGX_KEY)};
  tg_buf_reset(&out);
  CHECK_INT(tg_signer_sign(&n, "https://cdn.example/videos/a.mp4", EXP, &out, err, sizeof err), 0);
  CHECK_STR(out.data, NGINX_PLAIN);
  n.type = (tg_signer_type_t)99;
  CHECK_INT(tg_signer_sign(&n, "https://cdn.example/videos/a.mp4", EXP, &out, err, sizeof err),
            -EINVAL);
  tg_signer_free(&n);
  tg_buf_free(&out);
}
