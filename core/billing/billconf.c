#include "billing/billconf.h"

#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "base/secret.h"
#include "net/url.h"

#define MONEY_MAX (INT64_C(1) << 53)

typedef struct num {
  const char *key;
  uint64_t lo, hi, def;
  size_t off; /* of the uint32_t in tg_billconf_t */
} num_t;

static const num_t nums[] = {
    {"deadline_ms", 1, 60000, 30, offsetof(tg_billconf_t, deadline_ms)},
    {"call_timeout_ms", 100, 300000, 5000, offsetof(tg_billconf_t, call_timeout_ms)},
    {"breaker_failures", 1, 1000, 5, offsetof(tg_billconf_t, breaker_failures)},
    {"breaker_cooldown_ms", 100, 3600000, 5000, offsetof(tg_billconf_t, breaker_cooldown_ms)},
    {"health_interval_ms", 100, 600000, 1000, offsetof(tg_billconf_t, health_interval_ms)},
    {"reconcile_backoff_ms", 10, 600000, 200, offsetof(tg_billconf_t, reconcile_backoff_ms)},
    {"reconcile_max_backoff_ms", 100, 86400000, 60000, offsetof(tg_billconf_t, reconcile_max_backoff_ms)},
};

int tg_billconf_parse(const tg_config_section_t *s, tg_billconf_t *out, char *err, size_t errlen) {
  memset(out, 0, sizeof *out);
  const char *type = tg_config_get(s, "type");
  if (type == NULL || strcmp(type, "builtin") == 0)
    return 0;
  if (strcmp(type, "connect") != 0) {
    snprintf(err, errlen, "billing.type: '%.32s' is not a billing type (builtin or connect)", type);
    return -EINVAL;
  }
  tg_billconf_t c = {.remote = true};
  for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
    uint64_t v;
    if (tg_config_get_uint(s, "billing", nums[i].key, nums[i].lo, nums[i].hi, nums[i].def, &v, err, errlen) != 0)
      return -EINVAL;
    *(uint32_t *)((char *)&c + nums[i].off) = (uint32_t)v;
  }
  uint64_t cap;
  if (tg_config_get_uint(s, "billing", "deferred_cap", 0, MONEY_MAX, 100000000, &cap, err, errlen) != 0)
    return -EINVAL;
  c.deferred_cap = (int64_t)cap;
  if (c.reconcile_max_backoff_ms < c.reconcile_backoff_ms) {
    snprintf(err, errlen, "billing.reconcile_max_backoff_ms: %u is below reconcile_backoff_ms (%u)",
             c.reconcile_max_backoff_ms, c.reconcile_backoff_ms);
    return -EINVAL;
  }
  const char *url = tg_config_get(s, "url");
  tg_url_t u;
  if (url == NULL) {
    snprintf(err, errlen, "billing.url: required for type connect (the base URL of the BillingService)");
    return -EINVAL;
  }
  if (tg_url_parse(url, &u) != 0) {
    snprintf(err, errlen,
             "billing.url: '%.200s' is not an http(s) URL with a valid host and port (a name, an IPv4 address "
             "or [IPv6], port 1..65535)",
             url);
    return -EINVAL;
  }
  if (memchr(u.target, '?', u.target_len) != NULL) {
    snprintf(err, errlen, "billing.url: '%.200s' has a query; give the base URL only", url);
    return -EINVAL;
  }
  const char *tf = tg_config_get(s, "token_file");
  if (tf == NULL) {
    snprintf(err, errlen, "billing.token_file: required for type connect (the bearer token the service expects)");
    return -EINVAL;
  }
  char why[300];
  if ((c.token = tg_secret_read(tf, "billing token", TG_SECRET_TOKEN, why, sizeof why)) == NULL) {
    snprintf(err, errlen, "billing.token_file: %s", why);
    return -EINVAL;
  }
  size_t ul = strlen(url);
  while (ul > 0 && url[ul - 1] == '/')
    ul--;
  if ((c.url = strndup(url, ul)) == NULL) {
    tg_secret_free(c.token);
    snprintf(err, errlen, "out of memory");
    return -ENOMEM;
  }
  *out = c;
  return 0;
}

void tg_billconf_free(tg_billconf_t *c) {
  if (c == NULL)
    return;
  free(c->url);
  tg_secret_free(c->token);
  memset(c, 0, sizeof *c);
}
