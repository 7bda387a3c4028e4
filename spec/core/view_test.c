/* The request view of one resource (pipeline/view.h): the same uri, host,
 * path and query whatever spelling the caller used for an equivalent URI,
 * and the identity fields a Connect call carries. */
#include "pipeline/view.h"

#include <stdlib.h>
#include <string.h>

#include "test.h"

TEST(connect_uri_is_canonical) {
  static const struct {
    const char *in, *uri, *host, *path, *query, *target;
  } cases[] = {
      {"https://news.example/a/b", "https://news.example/a/b", "news.example", "/a/b", NULL, "/a/b"},
      {"HTTPS://News.Example:443/a?x=1", "https://news.example/a?x=1", "news.example", "/a", "x=1", "/a?x=1"},
      {"http://news.example:80", "http://news.example/", "news.example", "/", NULL, "/"},
      {"http://news.example:443/", "http://news.example:443/", "news.example:443", "/", NULL, "/"},
      {"https://news.example:8443/p?", "https://news.example:8443/p?", "news.example:8443", "/p", "", "/p?"},
      {"https://news.example?q", "https://news.example/?q", "news.example", "/", "q", "/?q"},
      {"https://news.example/a#frag", "https://news.example/a", "news.example", "/a", NULL, "/a"},
      {"https://news.example/a?b=c#frag", "https://news.example/a?b=c", "news.example", "/a", "b=c", "/a?b=c"},
      {"https://[::1]:443/x", "https://[::1]/x", "[::1]", "/x", NULL, "/x"},
      {"http://[::1]:8080/x", "http://[::1]:8080/x", "[::1]:8080", "/x", NULL, "/x"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    tg_view_t *v = malloc(sizeof *v);
    CHECK_INT(tg_view_connect(v, "DiscoverResources", cases[i].in, NULL, "news", NULL, NULL, NULL), 0);
    if (strcmp(v->req.uri, cases[i].uri) != 0)
      fprintf(stderr, "  %s -> %s\n", cases[i].in, v->req.uri);
    CHECK_STR(v->req.uri, cases[i].uri);
    CHECK_STR(v->req.host, cases[i].host);
    CHECK_STR(v->req.path, cases[i].path);
    if (cases[i].query)
      CHECK(v->req.query && strcmp(v->req.query, cases[i].query) == 0);
    else
      CHECK(v->req.query == NULL);
    CHECK_INT(v->target_len, strlen(cases[i].target));
    CHECK(memcmp(v->target, cases[i].target, v->target_len) == 0);
    CHECK_STR(v->req.method, "GET");
    CHECK_STR(v->req.rpc, "DiscoverResources");
    CHECK(v->req.kind == TG_POLICY_KIND_CONNECT);
    free(v);
  }
  tg_view_t *v = malloc(sizeof *v);
  CHECK_INT(tg_view_connect(v, "DiscoverResources", "ftp://news.example/", NULL, "news", NULL, NULL, NULL), -1);
  CHECK_INT(tg_view_connect(v, "DiscoverResources", "/relative", NULL, "news", NULL, NULL, NULL), -1);
  free(v);
}

TEST(connect_identity_from_the_ai_system) {
  Comp__V1__AISystem ai = COMP__V1__AISYSTEM__INIT;
  Comp__V1__UsagePurpose purposes[] = {COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_AI_INPUT,
                                       (Comp__V1__UsagePurpose)99, /* unknown: dropped */
                                       COMP__V1__USAGE_PURPOSE__USAGE_PURPOSE_SEARCH};
  ai.id = "bot-1";
  ai.name = "";
  ai.user_agent = "Bot/1";
  ai.user_type = COMP__V1__USER_TYPE__USER_TYPE_EDUCATION;
  ai.country = "DE";
  ai.n_usage_purposes = 3;
  ai.usage_purposes = purposes;
  tg_view_t *v = malloc(sizeof *v);
  CHECK_INT(tg_view_connect(v, "DiscoverResources", "https://news.example/a", NULL, "news", NULL, NULL, &ai), 0);
  CHECK_STR(v->req.ai_id, "bot-1");
  CHECK(v->req.ai_name == NULL); /* empty is absent */
  CHECK_STR(v->req.user_agent, "Bot/1");
  CHECK_STR(v->req.user_type, "education");
  CHECK_STR(v->req.country, "DE");
  CHECK_INT(v->req.npurposes, 2);
  CHECK_STR(v->req.purposes[0], "ai-input");
  CHECK_STR(v->req.purposes[1], "search");
  CHECK(v->req.ip == NULL && v->req.header == NULL); /* no HTTP request: no peer, no headers */
  /* Without an AI system the identity is nil by contract. */
  CHECK_INT(tg_view_connect(v, "DiscoverResources", "https://news.example/a", NULL, "news", NULL, NULL, NULL), 0);
  CHECK(v->req.ai_id == NULL && v->req.user_type == NULL && v->req.country == NULL && v->req.npurposes == 0);
  free(v);
}
