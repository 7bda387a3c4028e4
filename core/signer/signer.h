#ifndef TG_SIGNER_H
#define TG_SIGNER_H

#include <stddef.h>
#include <stdint.h>

#include "base/buf.h"
#include "config/config.h"

/* CDN URL signers: what an agent bought is fetched from the publisher's CDN
 * with a URL that the CDN (or web server) verifies. Each kind is a pure
 * function of (key, URL, expiry, options) in its own file; tg_signer_t picks
 * one by type, as the tenant's `signer.type` will.
 *
 * Contract shared by every tg_signer_*_sign below:
 *  - Threads: any thread, concurrently. No global state, no I/O, no lock, no
 *    allocation kept after the call.
 *  - url: an absolute URL (scheme://authority/path[?query]) or a path
 *    ("/a/b[?query]") where the kind allows one. It is put in the form the
 *    WHATWG URL serializer (Node's URL) gives: scheme and host in lowercase,
 *    a missing path as "/", and bytes a URL may not carry raw (controls,
 *    space, non-ASCII, " < > ` { }, and ' in the query) percent-encoded. The
 *    URL signed and the URL written are that form. (npm's
 *    @aws-sdk/cloudfront-signer 3.1166 re-encodes path segments and rebuilds
 *    the query its own way; each side signs exactly what it writes, so both
 *    verify: spec/interop/signers.test.js pins where the spellings differ.)
 *    Refused: user info, a '%' not followed by two hex digits, a
 *    '\', a fragment ('#'), a URL longer than TG_SIGNER_URL_MAX.
 *  - key, key_len: the secret as tg_secret_read returns it (its format is the
 *    kind's: see each). Borrowed for the call; a working copy (a decoded key)
 *    is wiped before return. A key never reaches err or a log.
 *  - expires: unix seconds, > 0.
 *  - out: on success the signed URL is appended (NUL-terminated). On failure
 *    out is left exactly as it was: never a partial URL.
 *  - Returns 0, -EINVAL (bad key, URL or option; err says why), or -ENOMEM.
 *    err may be NULL. */

#define TG_SIGNER_URL_MAX 8192

/* nginx secure_link (ngx_http_secure_link_module, "secure_link_md5" mode).
 * md5 = base64url without padding of MD5(expression), where the expression
 * substitutes $secure_link_expires (the expiry), $uri (the percent-decoded
 * path, as nginx's $uri) and $secret (the key); ${name} works too. Appends
 * md5=<md5>&expires=<expiry> to the query. The location's directives to match:
 *   secure_link $arg_md5,$arg_expires;
 *   secure_link_md5 "<the same expression, with the secret written in>";
 * A path with "//", "." or ".." segments or %00 is refused: nginx would
 * normalize it and the hash would not match. key: the secret, any bytes but
 * NUL. */
typedef struct tg_signer_nginx_opts {
  const char *expression; /* NULL: TG_SIGNER_NGINX_DEFAULT; must use $secret */
} tg_signer_nginx_opts_t;

#define TG_SIGNER_NGINX_DEFAULT "$secure_link_expires$uri $secret"

int tg_signer_nginx_sign(const tg_signer_nginx_opts_t *o, const char *key, size_t key_len,
                         const char *url, int64_t expires, tg_buf_t *out, char *err,
                         size_t errlen);

/* Akamai EdgeAuth token v2, as the npm package akamai-edgeauth builds it:
 * fields ip=, st=, exp=, acl= (acl form), id=, data= joined by '~'; the HMAC
 * is over those fields plus url= (url form, not emitted) and salt= (not
 * emitted), and the token ends with ~hmac=<hex>. key: hex (the EdgeAuth
 * "encryption key"), decoded before use. The signed URL is
 * url?<token_name>=<token>. */
typedef enum { TG_AKAMAI_SHA256 = 0, TG_AKAMAI_SHA1, TG_AKAMAI_MD5 } tg_akamai_alg_t;

typedef struct tg_signer_akamai_opts {
  int url_form;           /* 0: acl= token; 1: url= token for the URL's path */
  const char *acl;        /* acl form: NULL signs the URL's path; several joined by '!' */
  int64_t start_time;     /* 0: no st= field */
  const char *ip;         /* optional fields, NULL for none */
  const char *session_id;
  const char *payload;
  const char *salt;
  int escape_early;       /* 1: ip, id, data and url are percent-encoded (lowercase) */
  tg_akamai_alg_t alg;
  const char *token_name; /* NULL: "__token__" */
} tg_signer_akamai_opts_t;

/* The token alone, appended to out (same contract; path is the acl/url
 * value before escaping, used when o->acl is NULL). */
int tg_signer_akamai_token(const tg_signer_akamai_opts_t *o, const char *key, size_t key_len,
                           const char *path, int64_t expires, tg_buf_t *out, char *err,
                           size_t errlen);

int tg_signer_akamai_sign(const tg_signer_akamai_opts_t *o, const char *key, size_t key_len,
                          const char *url, int64_t expires, tg_buf_t *out, char *err,
                          size_t errlen);

/* Google Cloud CDN signed URL. Signs "<url>?Expires=<e>&KeyName=<name>"
 * ('&' when the URL has a query) with HMAC-SHA1, appends
 * &Signature=<base64url, padded>. With url_prefix set, signs
 * "URLPrefix=<base64url(prefix)>&Expires=..&KeyName=.." instead, and the URL
 * must start with the prefix. key: the base64url key Google gives (16 bytes
 * once decoded; padding optional). The URL must be absolute. */
typedef struct tg_signer_gcdn_opts {
  const char *key_name;   /* required: [A-Za-z0-9_-]{1,63} */
  const char *url_prefix; /* NULL: sign the URL itself */
} tg_signer_gcdn_opts_t;

int tg_signer_gcdn_sign(const tg_signer_gcdn_opts_t *o, const char *key, size_t key_len,
                        const char *url, int64_t expires, tg_buf_t *out, char *err,
                        size_t errlen);

/* CloudFront canned policy. RSA-SHA1 (PKCS#1 v1.5) over
 *   {"Statement":[{"Resource":"<url>","Condition":{"DateLessThan":{"AWS:EpochTime":<e>}}}]}
 * in CloudFront's base64 ('+' -> '-', '=' -> '_', '/' -> '~'); appends
 * Expires=<e>&Key-Pair-Id=<id>&Signature=<sig> (the order of the npm
 * @aws-sdk/cloudfront-signer). key: an RSA private key in
 * PEM (PKCS#1 or unencrypted PKCS#8), parsed on each call. The URL must be
 * absolute. */
typedef struct tg_signer_cloudfront_opts {
  const char *key_pair_id; /* required: [A-Za-z0-9]{1,64} */
} tg_signer_cloudfront_opts_t;

int tg_signer_cloudfront_sign(const tg_signer_cloudfront_opts_t *o, const char *key,
                              size_t key_len, const char *url, int64_t expires, tg_buf_t *out,
                              char *err, size_t errlen);

/* One tenant's signer: a kind, its options and its key. */
typedef enum {
  TG_SIGNER_NONE = 0,
  TG_SIGNER_NGINX,
  TG_SIGNER_AKAMAI,
  TG_SIGNER_GCDN,
  TG_SIGNER_CLOUDFRONT,
} tg_signer_type_t;

typedef struct tg_signer {
  tg_signer_type_t type;
  char *key;      /* owned: from tg_secret_read; wiped and freed by tg_signer_free */
  size_t key_len;
  const char *base_url; /* NULL: sign the resource URI as is; else the CDN origin
                           (scheme://host[:port][/prefix]) its path and query go under */
  uint32_t ttl_s;       /* how long a signed URL is valid */
  union {
    tg_signer_nginx_opts_t nginx;
    tg_signer_akamai_opts_t akamai;
    tg_signer_gcdn_opts_t gcdn;
    tg_signer_cloudfront_opts_t cloudfront;
  } opt;          /* strings borrowed: they must outlive the signer */
} tg_signer_t;

/* "nginx_secure_link", "akamai_edgeauth", "gcdn", "cloudfront" -> the type, or
 * TG_SIGNER_NONE. And back (NULL for TG_SIGNER_NONE). */
tg_signer_type_t tg_signer_type_parse(const char *name);
const char *tg_signer_type_name(tg_signer_type_t t);

/* Signs with s's kind (contract above). A signer without a key is -EINVAL. */
int tg_signer_sign(const tg_signer_t *s, const char *url, int64_t expires, tg_buf_t *out,
                   char *err, size_t errlen);

#define TG_SIGNER_DEFAULT_TTL_S 300

/* Builds a tenant's signer from its configuration section (config.h: type,
 * key_file, base_url, ttl_s and the kind's keys): reads the key with
 * tg_secret_read, checks every option, and signs a probe URL so that a key
 * the kind cannot use (bad hex, bad base64, not an RSA PEM) fails here, at
 * start or in `tollgate check`, not on the first purchase. An empty section
 * gives type TG_SIGNER_NONE and 0. Strings are borrowed from the section,
 * which must outlive the signer. Returns 0, or -EINVAL / -ENOMEM with err
 * ("signer.<key>: why"); the key never reaches err. Blocking (file read):
 * start-up or a tool. */
int tg_signer_from_config(const tg_config_section_t *sec, tg_signer_t *out, char *err, size_t errlen);

/* The retrieval URL of resource uri (absolute, as an offer names it): with
 * base_url, its path and query under base_url; signed to expire at
 * now + ttl_s (*expires). Appended to out; same contract as tg_signer_sign. */
int tg_signer_resource(const tg_signer_t *s, const char *uri, int64_t now, tg_buf_t *out, int64_t *expires,
                       char *err, size_t errlen);

/* Wipes and frees the key, and zeroes s. NULL is fine. */
void tg_signer_free(tg_signer_t *s);

#endif
