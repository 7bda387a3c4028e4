#ifndef TG_NET_TARGET_H
#define TG_NET_TARGET_H

#include <stddef.h>

/* The request target and the Host, in one canonical spelling.
 *
 * The server normalizes every request once, before its handler runs, so that
 * routing, policies and catalogs all look up the same string, and a path that
 * means one resource to the origin cannot be matched as another here (payment
 * bypass by "/free/../paid", "%2e%2e", "//paid" and the like).
 *
 * Threads: pure functions over caller memory; any thread. Nothing is
 * allocated; inputs are bytes with a length (not NUL-terminated) and are never
 * modified unless the caller passes the same buffer as output. Failure: a
 * negative errno-style code (-EINVAL) and *why set to a static, human-readable
 * reason; the output is then unspecified. The server answers every failure
 * with 400 and closes the connection. */

/* Normalizes an absolute path (no query, no fragment), RFC 3986 section 6:
 *   - it must start with '/';
 *   - a byte outside 0x21..0x7E, '\\' (a separator to some origins), '#'
 *     or '?' is refused; other printable bytes are kept as they are;
 *   - "%XX" must have two hex digits; %XX of an unreserved character
 *     (ALPHA DIGIT - . _ ~) is decoded, others are kept with upper-case hex;
 *     %2F ('/'), %5C ('\\') and %00 are refused (they would change the
 *     segments an origin sees); decoding happens once, so %252e stays %252E;
 *   - runs of '/' are merged into one, as nginx does by default (an origin
 *     that merges them would otherwise serve "//paid" as "/paid");
 *   - "." and ".." segments are removed after decoding (RFC 3986 5.2.4), a
 *     ".." that would climb above the root is refused, and so is a segment
 *     that starts ".;" or "..;" (Tomcat and others read "..;" as "..").
 * The result is never longer than the input, starts with '/', holds no "."
 * or ".." segment, and normalizing it again gives it back unchanged.
 * out must hold len + 1 bytes and may be in itself (in-place); it is
 * NUL-terminated and *out_len is its length. */
int tg_target_path(const char *in, size_t len, char *out, size_t *out_len, const char **why);

/* Validates and normalizes a Host header value or an absolute-form authority:
 *   reg-name   letters, digits, '-', '_', '.' (no empty label; one trailing
 *              dot is dropped), at most 253 bytes;
 *   IPv4       as a reg-name (digits and dots);
 *   [IPv6]     a literal inet_pton accepts; zone ids and IPvFuture refused;
 *   :port      optional, at most 5 digits, 0..65535; written back without
 *              leading zeros; an empty port ("host:") is dropped.
 * Userinfo ('@'), whitespace, percent-encoding and any other byte are refused.
 * Letters are lower-cased. An empty input is valid and gives an empty output
 * (RFC 9110 7.2: a client with no authority sends an empty Host). The result
 * is never longer than the input and normalizing it again changes nothing.
 * out must hold len + 1 bytes and may be in itself; it is NUL-terminated. */
int tg_target_host(const char *in, size_t len, char *out, size_t *out_len, const char **why);

/* A parsed and normalized request target. Pointers are into the caller's out
 * buffer (see tg_target_parse); each part is NUL-terminated there. */
typedef struct tg_target {
  const char *path;    /* normalized (tg_target_path), or "*" for asterisk-form */
  size_t path_len;
  const char *query;   /* after '?', verbatim; NULL when there is no '?' */
  size_t query_len;
  const char *host;    /* absolute-form authority, normalized (tg_target_host); NULL for other forms */
  size_t host_len;
  int asterisk;        /* the target was "*" (only OPTIONS may use it: the caller checks) */
} tg_target_t;

/* Parses a request target as received (RFC 9112 3.2): origin-form "/p?q",
 * absolute-form "http://host[:port]/p?q" (http and https only, any case; no
 * userinfo; an empty path becomes "/"), or "*". Authority-form (CONNECT's
 * "host:port") and anything else is refused. A fragment ('#') is refused
 * rather than dropped: no client sends one, and proxies disagree on it. The
 * query may hold printable ASCII but '#'; it is not otherwise changed.
 * out must hold len + 4 bytes; it must not overlap in. t points into out. */
int tg_target_parse(const char *in, size_t len, char *out, tg_target_t *t, const char **why);

#endif
