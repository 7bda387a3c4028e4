#include "config/tenants.h"

#include <ctype.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct slot {
  const char *host; /* lowercased, from the config */
  size_t len;
  const tg_config_tenant_t *tenant;
} slot_t;

struct tg_tenants {
  slot_t *slots;
  size_t mask; /* capacity - 1, a power of two */
};

static uint64_t hash_lower(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) {
    h ^= (unsigned char)tolower((unsigned char)s[i]);
    h *= 1099511628211ull;
  }
  return h;
}

tg_tenants_t *tg_tenants_new(const tg_config_t *cfg) {
  size_t n = 0;
  for (size_t i = 0; i < cfg->ntenants; i++)
    n += cfg->tenants[i].nhosts;
  size_t cap = 16;
  while (cap < n * 2)
    cap *= 2;
  tg_tenants_t *t = calloc(1, sizeof *t);
  if (t == NULL)
    return NULL;
  t->slots = calloc(cap, sizeof *t->slots);
  if (t->slots == NULL) {
    free(t);
    return NULL;
  }
  t->mask = cap - 1;
  for (size_t i = 0; i < cfg->ntenants; i++) {
    const tg_config_tenant_t *ten = &cfg->tenants[i];
    for (size_t k = 0; k < ten->nhosts; k++) {
      const char *h = ten->hosts[k];
      size_t len = strlen(h);
      size_t j = hash_lower(h, len) & t->mask;
      while (t->slots[j].host)
        j = (j + 1) & t->mask;
      t->slots[j] = (slot_t){h, len, ten};
    }
  }
  return t;
}

void tg_tenants_free(tg_tenants_t *t) {
  if (t == NULL)
    return;
  free(t->slots);
  free(t);
}

static const tg_config_tenant_t *find(const tg_tenants_t *t, const char *host, size_t len) {
  for (size_t j = hash_lower(host, len) & t->mask; t->slots[j].host; j = (j + 1) & t->mask) {
    const slot_t *s = &t->slots[j];
    if (s->len == len && strncasecmp(s->host, host, len) == 0)
      return s->tenant;
  }
  return NULL;
}

const tg_config_tenant_t *tg_tenants_by_host(const tg_tenants_t *t, const char *host, size_t len) {
  if (t == NULL || len == 0)
    return NULL;
  const tg_config_tenant_t *ten = find(t, host, len);
  if (ten)
    return ten;
  /* Strip a port, keeping IPv6 brackets intact. */
  const char *colon = memrchr(host, ':', len);
  const char *bracket = memrchr(host, ']', len);
  if (colon && (!bracket || colon > bracket))
    return find(t, host, (size_t)(colon - host));
  return NULL;
}

int tg_uri_host(const char *uri, const char **host, size_t *host_len) {
  const char *p;
  if (strncasecmp(uri, "https://", 8) == 0)
    p = uri + 8;
  else if (strncasecmp(uri, "http://", 7) == 0)
    p = uri + 7;
  else
    return -EINVAL;
  size_t n = strcspn(p, "/?#");
  const char *at = memchr(p, '@', n);
  if (at) {
    n -= (size_t)(at + 1 - p);
    p = at + 1;
  }
  if (n == 0 || n > 255)
    return -EINVAL;
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)p[i];
    if (!(isalnum(ch) || ch == '.' || ch == '-' || ch == ':' || ch == '[' || ch == ']' || ch == '_'))
      return -EINVAL;
  }
  *host = p;
  *host_len = n;
  return 0;
}
