#ifndef TG_URL_H
#define TG_URL_H

#include <stddef.h>
#include <stdint.h>

/* An absolute http(s) URL as the gateway's own clients take it (outbound
 * requests, the reverse proxy's origins, facilitators and JSON-RPC
 * providers in a configuration): one parser, so that what a configuration
 * accepts is what the client then reaches. Pure, any thread. */

typedef struct tg_url {
  int tls;            /* https */
  const char *host;   /* without brackets; points into the parsed string */
  size_t host_len;
  int bracketed;      /* an IPv6 literal, checked with inet_pton */
  uint16_t port;      /* given, or 80 / 443 */
  const char *target; /* path and query, without the fragment ("" when none) */
  size_t target_len;
} tg_url_t;

/* Parses the NUL-terminated s: "http://" or "https://" (either case), a
 * host of letters, digits, '-', '.', '_' (1..253 bytes) or a bracketed IPv6
 * literal, an optional port 1..65535, then the target. Refused with -EINVAL:
 * any byte <= 0x20 or 0x7f, user info ('@' in the authority), an empty
 * host, a bad port. u is written only on success. */
int tg_url_parse(const char *s, tg_url_t *u);

#endif
