#include "pipeline/view.h"

#include <string.h>

#include "catalog/rsl.h"

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

void tg_view_build(tg_view_t *v, tg_policy_kind_t kind, tg_http_req_t *http, const char *tenant,
                   tg_policy_header_fn header, void *header_ud, const Comp__V1__AISystem *ai) {
  tg_policy_req_t *r = &v->req;
  memset(r, 0, sizeof *r);
  v->ip[0] = '\0';
  r->kind = kind;
  r->tenant = tenant;
  if (http) {
    r->method = http->method_name;
    r->path = http->path;
    r->query = http->query;
    if (kind == TG_POLICY_KIND_HTTP) {
      const tg_http_header_t *ua = tg_http_req_header(http, "user-agent");
      r->host = http->host; /* normalized by the server: absolute-form authority, else Host */
      r->user_agent = ua ? ua->value : NULL;
    } else {
      const tg_http_header_t *h = tg_http_req_header(http, "host");
      r->host = h ? h->value : NULL;
    }
    tg_http_peer_ip(http, v->ip, sizeof v->ip);
    r->ip = v->ip;
    r->request_id = http->request_id;
    r->header = header;
    r->header_ud = header_ud;
  }
  if (ai) {
    size_t n = 0;
    for (size_t i = 0; i < ai->n_usage_purposes && n < TG_VIEW_MAX_PURPOSES; i++) {
      const tg_view_purpose_t *p = tg_view_purpose(ai->usage_purposes[i]);
      if (p)
        v->purposes[n++] = p->token;
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
}
