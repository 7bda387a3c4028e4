#include "pipeline/view.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "catalog/rsl.h"
#include "config/tenants.h"
#include "rpc/connect.h"

const tg_view_purpose_t tg_view_purposes[TG_VIEW_NPURPOSES] = {
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_ALL, TG_RSL_USAGE_ALL, "all"},
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_ALL, TG_RSL_USAGE_AI_ALL, "ai-all"},
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_TRAIN, TG_RSL_USAGE_AI_TRAIN, "ai-train"},
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INPUT, TG_RSL_USAGE_AI_INPUT, "ai-input"},
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INDEX, TG_RSL_USAGE_AI_INDEX, "ai-index"},
    {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_SEARCH, TG_RSL_USAGE_SEARCH, "search"},
};

static const tg_view_user_type_t user_types[] = {
    {COMP__V1__USER_TYPE__USER_TYPE_COMMERCIAL, TG_RSL_USER_COMMERCIAL, "commercial"},
    {COMP__V1__USER_TYPE__USER_TYPE_NON_COMMERCIAL, TG_RSL_USER_NON_COMMERCIAL, "non-commercial"},
    {COMP__V1__USER_TYPE__USER_TYPE_EDUCATION, TG_RSL_USER_EDUCATION, "education"},
    {COMP__V1__USER_TYPE__USER_TYPE_GOVERNMENT, TG_RSL_USER_GOVERNMENT, "government"},
    {COMP__V1__USER_TYPE__USER_TYPE_PERSONAL, TG_RSL_USER_PERSONAL, "personal"},
};

const tg_view_purpose_t *tg_view_purpose(Comp__V1__UsagePurpose value) {
  for (size_t i = 0; i < TG_VIEW_NPURPOSES; i++)
    if (tg_view_purposes[i].value == value)
      return &tg_view_purposes[i];
  return NULL;
}

const tg_view_user_type_t *tg_view_user_type(Comp__V1__UserType value) {
  for (size_t i = 0; i < sizeof user_types / sizeof user_types[0]; i++)
    if (user_types[i].value == value)
      return &user_types[i];
  return NULL;
}

static const char *nonempty(const char *s) { return s && *s ? s : NULL; }

/* host[0..len) lower-cased into out, without the scheme's default port
 * (":80" for http, ":443" for https, also "[::1]:443"). -1 when it does not
 * fit. */
static int canonical_host(const char *host, size_t len, bool https, char *out) {
  const char *colon = NULL;
  for (size_t i = len; i > 0; i--) {
    char c = host[i - 1];
    if (c == ':') {
      colon = host + i - 1;
      break;
    }
    if (c == ']' || c < '0' || c > '9')
      break;
  }
  if (colon) {
    const char *port = colon + 1;
    size_t plen = (size_t)(host + len - port);
    if ((plen == 2 && !https && memcmp(port, "80", 2) == 0) ||
        (plen == 3 && https && memcmp(port, "443", 3) == 0))
      len = (size_t)(colon - host);
  }
  if (len >= TG_VIEW_HOST_MAX)
    return -1;
  for (size_t i = 0; i < len; i++)
    out[i] = (char)tolower((unsigned char)host[i]);
  out[len] = '\0';
  return 0;
}

/* v->uri = scheme "://" v->host path ["?" query]; sets target. */
static int compose_uri(tg_view_t *v, bool https, const char *path, size_t plen, const char *query,
                       size_t qlen) {
  const char *scheme = https ? "https://" : "http://";
  size_t slen = https ? 8 : 7, hlen = strlen(v->host), n = slen + hlen; /* host < TG_VIEW_HOST_MAX */
  size_t need = n + plen + (query ? 1 + qlen : 0);
  if (need >= sizeof v->uri)
    return -1;
  memcpy(v->uri, scheme, slen);
  memcpy(v->uri + slen, v->host, hlen);
  char *t = v->uri + n;
  memcpy(t, path, plen);
  if (query) {
    t[plen] = '?';
    memcpy(t + plen + 1, query, qlen);
  }
  v->uri[need] = '\0';
  v->target = t;
  v->target_len = need - n;
  return 0;
}

static void base(tg_view_t *v, tg_policy_kind_t kind, tg_http_req_t *http, const char *tenant,
                 tg_policy_header_fn header, void *header_ud) {
  tg_policy_req_t *r = &v->req;
  memset(r, 0, sizeof *r);
  v->ip[0] = '\0';
  r->kind = kind;
  r->tenant = tenant;
  r->uri = v->uri;
  r->host = v->host;
  if (http) {
    tg_http_peer_ip(http, v->ip, sizeof v->ip);
    r->ip = v->ip;
    r->request_id = http->request_id;
    r->header = header;
    r->header_ud = header_ud;
  }
}

int tg_view_http(tg_view_t *v, tg_http_req_t *http, const char *tenant, tg_policy_header_fn header,
                 void *header_ud) {
  base(v, TG_POLICY_KIND_HTTP, http, tenant, header, header_ud);
  bool https = http->tls != 0;
  if (http->host == NULL || canonical_host(http->host, http->host_len, https, v->host) != 0 ||
      compose_uri(v, https, http->path, http->path_len, http->query, http->query_len) != 0)
    return -1;
  tg_policy_req_t *r = &v->req;
  r->method = http->method_name;
  r->path = http->path;
  r->query = http->query;
  const tg_http_header_t *ua = tg_http_req_header(http, "user-agent");
  r->user_agent = ua ? ua->value : NULL;
  return 0;
}

int tg_view_connect(tg_view_t *v, const char *rpc, const char *uri, tg_http_req_t *http,
                    const char *tenant, tg_policy_header_fn header, void *header_ud,
                    const Comp__V1__AISystem *ai) {
  base(v, TG_POLICY_KIND_CONNECT, http, tenant, header, header_ud);
  const char *host;
  size_t host_len;
  if (tg_uri_host(uri, &host, &host_len) != 0)
    return -1;
  bool https = strncasecmp(uri, "https:", 6) == 0;
  if (canonical_host(host, host_len, https, v->host) != 0)
    return -1;
  const char *p = host + host_len;
  size_t plen = strcspn(p, "?#");
  const char *query = p[plen] == '?' ? p + plen + 1 : NULL;
  size_t qlen = query ? strcspn(query, "#") : 0;
  if (plen == 0) /* "https://news.example" and "https://news.example?x" name "/" */
    p = "/", plen = 1;
  if (plen >= sizeof v->path)
    return -1;
  memcpy(v->path, p, plen);
  v->path[plen] = '\0';
  if (compose_uri(v, https, v->path, plen, query, qlen) != 0)
    return -1;
  tg_policy_req_t *r = &v->req;
  r->method = "GET";
  r->rpc = rpc;
  r->path = v->path;
  r->query = query ? v->target + plen + 1 : NULL;
  if (ai) {
    size_t n = 0;
    for (size_t i = 0; i < ai->n_usage_purposes && n < TG_VIEW_MAX_PURPOSES; i++) {
      const tg_view_purpose_t *pp = tg_view_purpose(ai->usage_purposes[i]);
      if (pp)
        v->purposes[n++] = pp->token;
    }
    r->purposes = v->purposes;
    r->npurposes = n;
    r->ai_id = nonempty(ai->id);
    r->ai_name = nonempty(ai->name);
    r->user_agent = nonempty(ai->user_agent);
    const tg_view_user_type_t *u = tg_view_user_type(ai->user_type);
    r->user_type = u ? u->token : NULL;
    r->country = nonempty(ai->country);
  }
  return 0;
}

const char *tg_view_call_header(void *ud, const char *name, size_t namelen, size_t *vlen) {
  tg_http_req_t *req = tg_connect_call_http(ud);
  const tg_http_header_t *h = req ? tg_http_req_header_n(req, name, namelen) : NULL;
  if (h == NULL)
    return NULL;
  *vlen = h->value_len;
  return h->value;
}
