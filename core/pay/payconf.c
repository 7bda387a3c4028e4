#include "pay/payconf.h"
#include "net/url.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "base/utf8.h"
#include "pay/eip3009.h"

#define CHAIN_ID_MAX (UINT64_C(1) << 53)

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static int fail(char *err, size_t errlen, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return -EINVAL;
}

/* Digits only, no leading zero ("0" itself allowed), at most max. */
static int parse_uint(const char *s, uint64_t max, uint64_t *out) {
  uint64_t v = 0;
  if (s == NULL || s[0] == '\0' || (s[0] == '0' && s[1] != '\0'))
    return -EINVAL;
  for (const char *p = s; *p; p++) {
    if (*p < '0' || *p > '9')
      return -EINVAL;
    unsigned d = (unsigned)(*p - '0');
    if (v > (max - d) / 10)
      return -EINVAL;
    v = v * 10 + d;
  }
  *out = v;
  return 0;
}

int tg_pay_parse_caip2(const char *network, uint64_t *chain_id) {
  uint64_t v;
  if (network == NULL || strncmp(network, "eip155:", 7) != 0 || parse_uint(network + 7, CHAIN_ID_MAX, &v) != 0 ||
      v == 0)
    return -EINVAL;
  *chain_id = v;
  return 0;
}

static bool printable(const char *s) {
  for (; *s; s++)
    if (*s < 0x20 || *s > 0x7e)
      return false;
  return true;
}

/* The version 1 names whose chain is known: a name given with another
 * chain id is a mistake that would send v1 clients to the wrong chain. */
static const struct {
  const char *name;
  uint64_t chain_id;
} v1_names[] = {
    {"base", 8453},   {"base-sepolia", 84532}, {"avalanche", 43114},  {"avalanche-fuji", 43113},
    {"polygon", 137}, {"polygon-amoy", 80002}, {"sei", 1329},         {"sei-testnet", 1328},
    {"iotex", 4689},  {"ethereum", 1},         {"sepolia", 11155111},
};

/* A base URL as the HTTP client will take it (net/url.h), without query,
 * fragment or user info. */
static int check_url(const char *key, const char *v, char *err, size_t errlen) {
  size_t n = strlen(v);
  if (strncmp(v, "http://", 7) != 0 && strncmp(v, "https://", 8) != 0)
    return fail(err, errlen, "payments.%s: '%.64s' is not an http:// or https:// URL", key, v);
  if (n > TG_PAY_MAX_URL)
    return fail(err, errlen, "payments.%s: longer than %d bytes", key, TG_PAY_MAX_URL);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)v[i];
    if (c <= 0x20 || c >= 0x7f)
      return fail(err, errlen, "payments.%s: byte 0x%02x at %zu: a URL is printable ASCII without spaces", key, c, i);
    if (c == '?' || c == '#' || c == '@')
      return fail(err, errlen, "payments.%s: a base URL takes no '%c' (query, fragment or user info)", key, c);
  }
  tg_url_t u;
  if (tg_url_parse(v, &u) != 0)
    return fail(err, errlen, "payments.%s: '%.64s' has no valid host and port (a name, an IPv4 address or "
                             "[IPv6], port 1..65535)", key, v);
  return 0;
}

/* Numbers arrive as their decimal text (config.c), strings as written. */
static int get_u32(const tg_config_section_t *s, const char *key, uint32_t lo, uint32_t hi, uint32_t def, uint32_t *out,
                   char *err, size_t errlen) {
  uint64_t x;
  int rc = tg_config_get_uint(s, "payments", key, lo, hi, def, &x, err, errlen);
  if (rc == 0)
    *out = (uint32_t)x;
  return rc;
}

static int copy_str(char *dst, size_t cap, const char *v) {
  size_t n = strlen(v);
  if (n >= cap)
    return -1;
  memcpy(dst, v, n + 1);
  return 0;
}

static const char *const accept_keys[] = {"network", "network_v1", "asset",    "name",          "version",
                                          "pay_to",  "currency",   "decimals", "max_timeout_s", NULL};
static const char *const top_keys[] = {"verify",
                                       "settle",
                                       "serve",
                                       "origin",
                                       "description",
                                       "mime_type",
                                       "verify_cache_ttl_ms",
                                       "max_verifying",
                                       "verify_wait_ms",
                                       "facilitator_timeout_ms",
                                       NULL};

static bool in_list(const char *k, const char *const *list) {
  for (; *list; list++)
    if (strcmp(k, *list) == 0)
      return true;
  return false;
}

/* "<list>.<N>" or "<list>.<N>.<rest>": N (1..max) into *index, rest (may be
 * NULL when the key ends at N). 1: the key is under list, 0: it is not,
 * -1: it is, with a bad position. */
static int list_key(const char *key, const char *list, size_t max, size_t *index, const char **rest) {
  size_t n = strlen(list);
  if (strncmp(key, list, n) != 0 || (key[n] != '.' && key[n] != '\0'))
    return 0;
  if (key[n] == '\0')
    return -1;
  const char *p = key + n + 1;
  size_t v = 0, digits = 0;
  while (*p >= '0' && *p <= '9' && digits < 4) {
    v = v * 10 + (size_t)(*p - '0');
    p++;
    digits++;
  }
  if (digits == 0 || (*p != '\0' && *p != '.') || key[n + 1] == '0' || v < 1 || v > max)
    return -1;
  *index = v - 1;
  *rest = *p == '.' ? p + 1 : NULL;
  return 1;
}

static int parse_accept(const tg_config_section_t *s, size_t i, tg_pay_accept_t *a, char *err, size_t errlen) {
  char key[64];
  const char *v;
#define KEY(name) (snprintf(key, sizeof key, "accepts.%zu." name, i + 1), key)
  v = tg_config_get(s, KEY("network"));
  if (v == NULL)
    return fail(err, errlen, "payments.%s: required (CAIP-2, e.g. \"eip155:8453\")", key);
  if (tg_pay_parse_caip2(v, &a->chain_id) != 0)
    return fail(err, errlen, "payments.%s: '%.64s' is not \"eip155:<chain id>\" with a chain id in 1..2^53", key, v);
  copy_str(a->network, sizeof a->network, v); /* fits: 7 + 16 digits */

  if ((v = tg_config_get(s, KEY("network_v1"))) != NULL) {
    size_t n = strlen(v);
    if (n == 0 || n >= sizeof a->network_v1 || strspn(v, "abcdefghijklmnopqrstuvwxyz0123456789-") != n)
      return fail(err, errlen, "payments.%s: '%.64s' is not a version 1 network name ([a-z0-9-]{1,31})", key, v);
    for (size_t k = 0; k < sizeof v1_names / sizeof v1_names[0]; k++)
      if (strcmp(v, v1_names[k].name) == 0 && v1_names[k].chain_id != a->chain_id)
        return fail(err, errlen, "payments.%s: '%s' is chain %llu, not %s", key, v,
                    (unsigned long long)v1_names[k].chain_id, a->network);
    copy_str(a->network_v1, sizeof a->network_v1, v);
  }

  static const char *const addr_fields[] = {"asset", "pay_to"};
  for (size_t k = 0; k < 2; k++) {
    uint8_t *bin = k == 0 ? a->asset : a->pay_to;
    char *hex = k == 0 ? a->asset_hex : a->pay_to_hex;
    snprintf(key, sizeof key, "accepts.%zu.%s", i + 1, addr_fields[k]);
    if ((v = tg_config_get(s, key)) == NULL)
      return fail(err, errlen, "payments.%s: required (an address, 0x + 40 hex digits)", key);
    if (tg_eip3009_parse_address(v, bin) != 0)
      return fail(err, errlen,
                  "payments.%s: '%.64s' is not an address (0x + 40 hex digits; mixed case must be the EIP-55 "
                  "checksum)",
                  key, v);
    static const uint8_t zero[20];
    if (memcmp(bin, zero, 20) == 0)
      return fail(err, errlen, "payments.%s: the zero address", key);
    tg_eip3009_format_address(bin, hex);
  }

  static const char *const text_fields[] = {"name", "version"};
  for (size_t k = 0; k < 2; k++) {
    char *dst = k == 0 ? a->name : a->version;
    size_t cap = k == 0 ? sizeof a->name : sizeof a->version;
    snprintf(key, sizeof key, "accepts.%zu.%s", i + 1, text_fields[k]);
    if ((v = tg_config_get(s, key)) == NULL)
      return fail(err, errlen, "payments.%s: required (the token's EIP-712 domain %s, e.g. %s)", key, text_fields[k],
                  k == 0 ? "\"USDC\"" : "\"2\"");
    if (v[0] == '\0' || !printable(v) || copy_str(dst, cap, v) != 0)
      return fail(err, errlen, "payments.%s: must be 1..%zu bytes of printable ASCII", key, cap - 1);
  }

  v = tg_config_get(s, KEY("currency"));
  if (v == NULL)
    v = "USD";
  if (v[0] == '\0' || strlen(v) >= sizeof a->currency ||
      strspn(v, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != strlen(v))
    return fail(err, errlen, "payments.%s: '%.32s' is not a currency code ([A-Za-z0-9]{1,16})", key, v);
  copy_str(a->currency, sizeof a->currency, v);

  uint32_t x;
  if (get_u32(s, KEY("decimals"), 0, TG_PAY_MAX_DECIMALS, 6, &x, err, errlen) != 0)
    return -EINVAL;
  a->decimals = (uint8_t)x;
  if (get_u32(s, KEY("max_timeout_s"), 1, 86400, 60, &a->max_timeout_s, err, errlen) != 0)
    return -EINVAL;
#undef KEY
  return 0;
}

/* A list of URLs: positions 1..n, each an http(s) URL. */
static int parse_urls(const tg_config_section_t *s, const char *list, size_t n, char ***out, size_t *nout, char *err,
                      size_t errlen) {
  if (n == 0)
    return 0;
  *out = calloc(n, sizeof **out);
  if (*out == NULL)
    return -ENOMEM;
  *nout = n;
  for (size_t i = 0; i < n; i++) {
    char key[64];
    snprintf(key, sizeof key, "%s.%zu", list, i + 1);
    const char *v = tg_config_get(s, key);
    if (v == NULL)
      return fail(err, errlen, "payments.%s: missing (list positions run 1..%zu)", key, n);
    int rc = check_url(key, v, err, errlen);
    if (rc != 0)
      return rc;
    if (((*out)[i] = strdup(v)) == NULL)
      return -ENOMEM;
  }
  return 0;
}

static int parse_enum(const tg_config_section_t *s, const char *key, const char *a, const char *b, int *out, char *err,
                      size_t errlen) {
  const char *v = tg_config_get(s, key);
  if (v == NULL || strcmp(v, a) == 0)
    *out = 0;
  else if (strcmp(v, b) == 0)
    *out = 1;
  else
    return fail(err, errlen, "payments.%s: '%.32s' is not \"%s\" or \"%s\"", key, v, a, b);
  return 0;
}

static int parse(const tg_config_section_t *s, tg_payconf_t *out, char *err, size_t errlen) {
  size_t nacc = 0, nfac = 0, nrpc = 0;
  int rc;
  /* Every key first: unknown ones and bad list positions. */
  for (size_t i = 0; i < s->nitems; i++) {
    const char *k = s->items[i].key, *rest;
    size_t idx;
    if ((rc = list_key(k, "accepts", TG_PAY_MAX_ACCEPTS, &idx, &rest)) != 0) {
      if (rc < 0 || rest == NULL) {
        if (strcmp(k, "accepts") == 0 || (rc > 0 && rest == NULL))
          return fail(err, errlen, "payments.%s: expected a list of tables { network = ..., asset = ... }", k);
        return fail(err, errlen, "payments.%s: accepts is a list of 1..%d tables", k, TG_PAY_MAX_ACCEPTS);
      }
      if (!in_list(rest, accept_keys))
        return fail(err, errlen, "payments.%s: unknown key", k);
      nacc = idx + 1 > nacc ? idx + 1 : nacc;
      continue;
    }
    const char *lists[] = {"facilitators", "rpc"};
    size_t *counts[] = {&nfac, &nrpc};
    bool listed = false;
    for (size_t l = 0; l < 2 && !listed; l++) {
      rc = list_key(k, lists[l], TG_PAY_MAX_URLS, &idx, &rest);
      if (rc == 0)
        continue;
      if (rc < 0 || rest != NULL)
        return fail(err, errlen, "payments.%s: %s is a list of 1..%d URLs", k, lists[l], TG_PAY_MAX_URLS);
      *counts[l] = idx + 1 > *counts[l] ? idx + 1 : *counts[l];
      listed = true;
    }
    if (!listed && !in_list(k, top_keys))
      return fail(err, errlen, "payments.%s: unknown key", k);
  }
  if (nacc == 0)
    return fail(err, errlen, "payments.accepts: required (1..%d payment requirements)", TG_PAY_MAX_ACCEPTS);

  for (size_t i = 0; i < nacc; i++) {
    char key[32];
    snprintf(key, sizeof key, "accepts.%zu.", i + 1);
    bool any = false;
    for (size_t j = 0; j < s->nitems && !any; j++)
      any = strncmp(s->items[j].key, key, strlen(key)) == 0;
    if (!any)
      return fail(err, errlen, "payments.accepts.%zu: missing (list positions run 1..%zu)", i + 1, nacc);
    if ((rc = parse_accept(s, i, &out->accepts[i], err, errlen)) != 0)
      return rc;
    for (size_t j = 0; j < i; j++) {
      const tg_pay_accept_t *a = &out->accepts[j], *b = &out->accepts[i];
      if (strcmp(a->network, b->network) == 0 && memcmp(a->asset, b->asset, 20) == 0)
        return fail(err, errlen, "payments.accepts.%zu: the same network and asset as accepts.%zu", i + 1, j + 1);
      if (a->network_v1[0] && strcmp(a->network_v1, b->network_v1) == 0 && a->chain_id != b->chain_id)
        return fail(err, errlen, "payments.accepts.%zu.network_v1: '%s' names %s in accepts.%zu", i + 1, b->network_v1,
                    a->network, j + 1);
    }
  }
  out->naccepts = nacc;

  if (nfac == 0)
    return fail(err, errlen, "payments.facilitators: required (1..%d http(s) URLs)", TG_PAY_MAX_URLS);
  if ((rc = parse_urls(s, "facilitators", nfac, &out->facilitators, &out->nfacilitators, err, errlen)) != 0 ||
      (rc = parse_urls(s, "rpc", nrpc, &out->rpc, &out->nrpc, err, errlen)) != 0)
    return rc;

  int e;
  if ((rc = parse_enum(s, "verify", "facilitator", "local", &e, err, errlen)) != 0)
    return rc;
  out->verify = e ? TG_PAY_VERIFY_LOCAL : TG_PAY_VERIFY_FACILITATOR;
  if ((rc = parse_enum(s, "settle", "sync", "async", &e, err, errlen)) != 0)
    return rc;
  out->settle = e ? TG_PAY_SETTLE_ASYNC : TG_PAY_SETTLE_SYNC;
  if ((rc = parse_enum(s, "serve", "redirect", "proxy", &e, err, errlen)) != 0)
    return rc;
  out->serve = e ? TG_PAY_SERVE_PROXY : TG_PAY_SERVE_REDIRECT;
  if (out->verify == TG_PAY_VERIFY_LOCAL && out->nrpc == 0)
    return fail(err, errlen, "payments.rpc: verify = \"local\" needs 1..%d JSON-RPC URLs", TG_PAY_MAX_URLS);

  const char *v = tg_config_get(s, "origin");
  if (v != NULL) {
    if ((rc = check_url("origin", v, err, errlen)) != 0)
      return rc;
    if ((out->origin = strdup(v)) == NULL)
      return -ENOMEM;
  } else if (out->serve == TG_PAY_SERVE_PROXY) {
    return fail(err, errlen, "payments.origin: serve = \"proxy\" needs the upstream's http(s) base URL");
  }

  if ((v = tg_config_get(s, "description")) != NULL) {
    size_t n = strlen(v);
    if (n > TG_PAY_MAX_DESCRIPTION || !tg_utf8_valid(v, n))
      return fail(err, errlen, "payments.description: must be valid UTF-8 of at most %d bytes", TG_PAY_MAX_DESCRIPTION);
    for (size_t i = 0; i < n; i++)
      if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f)
        return fail(err, errlen, "payments.description: control byte 0x%02x at %zu", (unsigned char)v[i], i);
    if ((out->description = strdup(v)) == NULL)
      return -ENOMEM;
  }
  if ((v = tg_config_get(s, "mime_type")) != NULL) {
    const char *slash = strchr(v, '/');
    if (strlen(v) > 127 || !printable(v) || strchr(v, ' ') != NULL || slash == NULL || slash == v || slash[1] == '\0')
      return fail(err, errlen, "payments.mime_type: '%.64s' is not a media type (type/subtype, printable ASCII)", v);
    if ((out->mime_type = strdup(v)) == NULL)
      return -ENOMEM;
  }

  if ((rc = get_u32(s, "verify_cache_ttl_ms", 0, 3600000, 60000, &out->verify_cache_ttl_ms, err, errlen)) != 0 ||
      (rc = get_u32(s, "max_verifying", 1, 65536, 256, &out->max_verifying, err, errlen)) != 0 ||
      (rc = get_u32(s, "verify_wait_ms", 0, 60000, 200, &out->verify_wait_ms, err, errlen)) != 0 ||
      (rc = get_u32(s, "facilitator_timeout_ms", 100, 300000, 5000, &out->facilitator_timeout_ms, err, errlen)) != 0)
    return rc;
  out->enabled = true;
  return 0;
}

int tg_payconf_parse(const tg_config_section_t *s, tg_payconf_t *out, char *err, size_t errlen) {
  if (out == NULL)
    return -EINVAL;
  memset(out, 0, sizeof *out);
  if (s == NULL || s->nitems == 0)
    return 0;
  int rc = parse(s, out, err, errlen);
  if (rc != 0) {
    if (rc == -ENOMEM)
      fail(err, errlen, "payments: out of memory");
    tg_payconf_free(out);
  }
  return rc;
}

static void free_list(char **l, size_t n) {
  for (size_t i = 0; l != NULL && i < n; i++)
    free(l[i]);
  free(l);
}

void tg_payconf_free(tg_payconf_t *c) {
  if (c == NULL)
    return;
  free_list(c->facilitators, c->nfacilitators);
  free_list(c->rpc, c->nrpc);
  free(c->origin);
  free(c->description);
  free(c->mime_type);
  memset(c, 0, sizeof *c);
}

int tg_pay_amount(const tg_pay_accept_t *a, int64_t price, const char *currency, char out[80]) {
  if (a == NULL || currency == NULL || out == NULL || a->decimals > TG_PAY_MAX_DECIMALS)
    return -EINVAL;
  out[0] = '\0';
  if (strcasecmp(a->currency, currency) != 0)
    return -ENOENT;
  if (price < 0)
    return -ERANGE;
  uint64_t p = (uint64_t)price;
  if (a->decimals >= 6) {
    /* At most 19 digits and 30 zeros. */
    int n = snprintf(out, 80, "%llu", (unsigned long long)p);
    if (p != 0)
      for (int z = 0; z < a->decimals - 6; z++)
        out[n++] = '0';
    out[n] = '\0';
  } else {
    uint64_t div = 1;
    for (int z = a->decimals; z < 6; z++)
      div *= 10;
    snprintf(out, 80, "%llu", (unsigned long long)(p / div + (p % div != 0)));
  }
  return 0;
}
