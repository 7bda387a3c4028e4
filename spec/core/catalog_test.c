#include "catalog/catalog.h"

#include <errno.h>
#include <sys/resource.h>
#include <time.h>

#include "test.h"

#define NS "https://rslstandard.org/rsl"
#define DOC(body) "<rsl xmlns=\"" NS "\">" body "</rsl>"

static const char *const hosts[] = {"Example.com", "www.example.com:8443", "[::1]"};
#define NHOSTS 3

/* Parses xml (strictly, so a typo in a test document fails loudly) and builds. */
static tg_catalog_t *build(const char *xml) {
  tg_rsl_doc_t *doc = NULL;
  tg_rsl_options_t strict = {.strict = true};
  tg_rsl_report_t rep;
  if (tg_rsl_parse(xml, strlen(xml), &strict, &doc, &rep) != 0) {
    for (size_t i = 0; i < rep.nmessages; i++)
      fprintf(stderr, "  rsl: %s\n", rep.messages[i]);
    return NULL;
  }
  tg_catalog_t *c = NULL;
  char err[128];
  int rc = tg_catalog_build(doc, hosts, NHOSTS, &c, err, sizeof err);
  tg_rsl_doc_free(doc);
  if (rc != 0)
    fprintf(stderr, "  build: %d %s\n", rc, err);
  return c;
}

static tg_catalog_result_t look(const tg_catalog_t *c, const char *path, uint32_t usage,
                                uint32_t user, const char *country) {
  tg_catalog_query_t q = {.usage = usage, .user = user};
  snprintf(q.country, sizeof q.country, "%s", country);
  tg_catalog_result_t r;
  memset(&r, 0xab, sizeof r); /* lookup must set everything it reports */
  if (tg_catalog_lookup(c, path, strlen(path), &q, &r) != 0)
    r.status = (tg_catalog_status_t)-1;
  return r;
}

#define TRAIN TG_RSL_USAGE_AI_TRAIN
#define INPUT TG_RSL_USAGE_AI_INPUT
#define INDEX TG_RSL_USAGE_AI_INDEX
#define SEARCH TG_RSL_USAGE_SEARCH

TEST(more_specific_pattern_wins) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/articles/*\"><license><payment type=\"use\">"
      "<amount currency=\"USD\">0.01</amount></payment></license></content>"
      "<content url=\"/articles/premium/*\"><license><payment type=\"use\">"
      "<amount currency=\"USD\">0.5</amount></payment></license></content>"
      "<content url=\"/articles/free$\"><license/></content>"));
  CHECK(c);
  CHECK_INT(tg_catalog_entries(c), 3);
  tg_catalog_result_t r = look(c, "/articles/a", INPUT, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.content, 0);
  CHECK_INT(r.noffers, 1);
  CHECK_INT(r.offers[0].amount, 10000);
  r = look(c, "/articles/premium/x", INPUT, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.content, 1);
  CHECK_INT(r.noffers, 1);
  CHECK_INT(r.offers[0].amount, 500000);
  CHECK_STR(r.offers[0].currency, "USD");
  CHECK_INT(r.offers[0].type, TG_RSL_PAY_USE);
  CHECK(r.offers[0].key == tg_catalog_offer_key(1, 0, 0));
  r = look(c, "/articles/free", INPUT, 0, "");
  CHECK_INT(r.content, 2);
  CHECK_INT(r.offers[0].type, TG_RSL_PAY_FREE);
  /* "$" anchors: a longer path falls back to the wildcard */
  r = look(c, "/articles/freebie", INPUT, 0, "");
  CHECK_INT(r.content, 0);
  tg_catalog_free(c);
}

TEST(prohibits_beats_permits_at_equal_specificity) {
  /* same specificity: one content permits ai-train for a price, one prohibits it */
  tg_catalog_t *c = build(DOC(
      "<content url=\"/a/*\"><license><permits type=\"usage\">ai-train</permits>"
      "<payment type=\"training\"><amount currency=\"USD\">1</amount></payment></license></content>"
      "<content url=\"/a/b\"><license><prohibits type=\"usage\">ai-train</prohibits></license>"
      "</content>"
      "<content url=\"/a/c\"><license><permits type=\"usage\">ai-train ai-input</permits>"
      "</license></content>"));
  CHECK(c);
  /* both patterns are 4 bytes long */
  tg_catalog_result_t r = look(c, "/a/bx", TRAIN, 0, "");
  CHECK_INT(r.status, TG_CATALOG_PROHIBITED);
  CHECK_INT(r.noffers, 0);
  /* ties that both admit: offers of both contents */
  r = look(c, "/a/c", TRAIN, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.total_offers, 2);
  CHECK(r.offers[0].content != r.offers[1].content);
  /* one tied content admits ai-input, the other does not: most restrictive wins */
  r = look(c, "/a/c", INPUT, 0, "");
  CHECK_INT(r.status, TG_CATALOG_FILTERED);
  /* within one content: a license prohibiting beats another that permits */
  tg_catalog_free(c);
  c = build(DOC("<content url=\"/\">"
                "<license><permits type=\"usage\">all</permits></license>"
                "<license><prohibits type=\"usage\">ai-input</prohibits></license></content>"));
  CHECK(c);
  CHECK_INT(look(c, "/x", INPUT, 0, "").status, TG_CATALOG_PROHIBITED);
  CHECK_INT(look(c, "/x", TRAIN | INPUT, 0, "").status, TG_CATALOG_PROHIBITED);
  r = look(c, "/x", TRAIN, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.total_offers, 2);
  CHECK_INT(r.offers[1].usage, TRAIN | INDEX | SEARCH);
  tg_catalog_free(c);
}

TEST(permits_list_is_closed) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/\"><license><permits type=\"usage\">search</permits></license></content>"
      "<content url=\"/open/\"><license><prohibits type=\"user\">personal</prohibits>"
      "</license></content>"));
  CHECK(c);
  CHECK_INT(look(c, "/p", SEARCH, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/p", TRAIN, 0, "").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/p", SEARCH | INDEX, 0, "").status, TG_CATALOG_FILTERED);
  /* unspecified purpose: the license allows something */
  tg_catalog_result_t r = look(c, "/p", 0, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.offers[0].usage, SEARCH);
  /* no usage permits at all: every purpose allowed */
  r = look(c, "/open/x", TRAIN | INPUT | INDEX | SEARCH, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.offers[0].usage, TG_CATALOG_USAGE_CONCRETE);
  tg_catalog_free(c);
}

TEST(ai_all_and_all) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/ai/\"><license><permits type=\"usage\">ai-all</permits></license></content>"
      "<content url=\"/all/\"><license><permits type=\"usage\">all</permits></license></content>"
      "<content url=\"/noai/\"><license><prohibits type=\"usage\">ai-all</prohibits></license>"
      "</content>"
      "<content url=\"/none/\"><license><prohibits type=\"usage\">all</prohibits></license>"
      "</content>"));
  CHECK(c);
  CHECK_INT(look(c, "/ai/x", TRAIN, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/ai/x", INPUT | INDEX, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/ai/x", TG_RSL_USAGE_AI_ALL, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/ai/x", SEARCH, 0, "").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/ai/x", TG_RSL_USAGE_ALL, 0, "").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/all/x", TG_RSL_USAGE_ALL, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/all/x", SEARCH | TRAIN, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/noai/x", INPUT, 0, "").status, TG_CATALOG_PROHIBITED);
  CHECK_INT(look(c, "/noai/x", TG_RSL_USAGE_AI_ALL, 0, "").status, TG_CATALOG_PROHIBITED);
  CHECK_INT(look(c, "/noai/x", SEARCH, 0, "").status, TG_CATALOG_OFFERS);
  /* unspecified purpose: prohibited only when every purpose is */
  CHECK_INT(look(c, "/noai/x", 0, 0, "").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/none/x", 0, 0, "").status, TG_CATALOG_PROHIBITED);
  CHECK_INT(look(c, "/none/x", SEARCH, 0, "").status, TG_CATALOG_PROHIBITED);
  tg_catalog_free(c);
}

TEST(user_type_and_geo_filters) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/\">"
      "<license><permits type=\"user\">education non-commercial</permits>"
      "<prohibits type=\"user\">education</prohibits>"
      "<payment type=\"use\"><amount currency=\"USD\">0.001</amount></payment></license>"
      "<license><permits type=\"user\">commercial</permits><permits type=\"geo\">US CA</permits>"
      "<payment type=\"use\"><amount currency=\"USD\">0.002</amount></payment></license>"
      "<license><permits type=\"user\">government</permits><prohibits type=\"geo\">RU</prohibits>"
      "<payment type=\"use\"><amount currency=\"USD\">0.003</amount></payment></license>"
      "</content>"));
  CHECK(c);
  tg_catalog_result_t r = look(c, "/a", INPUT, TG_RSL_USER_NON_COMMERCIAL, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.noffers, 1);
  CHECK_INT(r.offers[0].amount, 1000);
  CHECK(r.offers[0].key == tg_catalog_offer_key(0, 0, 0));
  /* prohibited user type beats the permits list of the same license */
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_EDUCATION, "").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_PERSONAL, "US").status, TG_CATALOG_FILTERED);
  r = look(c, "/a", INPUT, TG_RSL_USER_COMMERCIAL, "us");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.noffers, 1);
  CHECK_INT(r.offers[0].amount, 2000);
  CHECK(r.offers[0].key == tg_catalog_offer_key(0, 1, 0));
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_COMMERCIAL, "FR").status, TG_CATALOG_FILTERED);
  /* geo terms need a known country */
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_COMMERCIAL, "").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_GOVERNMENT, "DE").status, TG_CATALOG_OFFERS);
  CHECK_INT(look(c, "/a", INPUT, TG_RSL_USER_GOVERNMENT, "RU").status, TG_CATALOG_FILTERED);
  /* unspecified user type and country: only the license without geo terms */
  r = look(c, "/a", INPUT, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.total_offers, 1);
  CHECK_INT(r.offers[0].amount, 1000);
  r = look(c, "/a", INPUT, 0, "CA");
  CHECK_INT(r.total_offers, 3);
  tg_catalog_free(c);
}

TEST(empty_geo_permits_denies_every_country) {
  tg_catalog_t *c = build(DOC("<content url=\"/\"><license><permits type=\"geo\"></permits>"
                              "</license></content>"));
  CHECK(c);
  CHECK_INT(look(c, "/a", 0, 0, "US").status, TG_CATALOG_FILTERED);
  CHECK_INT(look(c, "/a", 0, 0, "").status, TG_CATALOG_FILTERED);
  tg_catalog_free(c);
}

TEST(absolute_urls_own_and_foreign_hosts) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"https://EXAMPLE.com:443/news/*\"><license/></content>"
      "<content url=\"http://www.example.com/blog/\"><license/></content>"
      "<content url=\"https://other.org/news/*\"><license/></content>"
      "<content url=\"https://example.com\"><license><payment type=\"attribution\"/></license>"
      "</content>"
      "<content url=\"ftp://example.com/files/\"><license/></content>"
      "<content url=\"https://example.com.evil.net/x/\"><license/></content>"
      "<content url=\"http://user@[::1]:8080/v6/*#frag\"><license/></content>"
      "<content url=\"https://[::2]/v6/other/\"><license/></content>"));
  CHECK(c);
  CHECK_INT(tg_catalog_entries(c), 4);
  CHECK_INT(look(c, "/v6/a", 0, 0, "").content, 6);
  CHECK_INT(look(c, "/v6/other/a", 0, 0, "").content, 6);
  CHECK_INT(tg_catalog_skipped(c), 4);
  CHECK_INT(look(c, "/news/1", 0, 0, "").content, 0);
  CHECK_INT(look(c, "/blog/1", 0, 0, "").content, 1);
  /* the root pattern catches the rest, including the foreign hosts' paths */
  tg_catalog_result_t r = look(c, "/x/1", 0, 0, "");
  CHECK_INT(r.content, 3);
  CHECK_INT(r.offers[0].type, TG_RSL_PAY_ATTRIBUTION);
  CHECK_INT(look(c, "/files/a", 0, 0, "").content, 3);
  tg_catalog_free(c);
}

TEST(no_match) {
  tg_catalog_t *c = build(DOC("<content url=\"/only/$\"><license/></content>"));
  CHECK(c);
  tg_catalog_result_t r = look(c, "/only/x", TRAIN, 0, "US");
  CHECK_INT(r.status, TG_CATALOG_NOT_IN_CATALOG);
  CHECK_INT(r.noffers, 0);
  CHECK(r.content == UINT32_MAX);
  CHECK_INT(look(c, "/", 0, 0, "").status, TG_CATALOG_NOT_IN_CATALOG);
  CHECK_INT(look(c, "/only/", 0, 0, "").status, TG_CATALOG_OFFERS);
  tg_catalog_free(c);
}

TEST(free_license) {
  tg_catalog_t *c = build(DOC("<content url=\"/f\" lastmod=\"2025-01-01T00:00:00Z\">"
                              "<license><permits type=\"usage\">search</permits></license>"
                              "<license><payment type=\"free\"/></license></content>"));
  CHECK(c);
  tg_catalog_result_t r = look(c, "/f", SEARCH, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK_INT(r.noffers, 2);
  for (int i = 0; i < 2; i++) {
    CHECK_INT(r.offers[i].type, TG_RSL_PAY_FREE);
    CHECK_INT(r.offers[i].amount, 0);
    CHECK_STR(r.offers[i].currency, "");
    CHECK_INT(r.offers[i].lastmod, 1735689600);
  }
  tg_catalog_free(c);
}

TEST(multiple_payments_and_offer_cap) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/m\"><license>"
      "<payment type=\"crawl\"><amount currency=\"USD\">0.000001</amount></payment>"
      "<payment type=\"subscription\"><amount currency=\"EUR\">10</amount></payment>"
      "</license></content>"
      "<content url=\"/many\"><license>"
      "<payment type=\"use\"><amount currency=\"USD\">1</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">2</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">3</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">4</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">5</amount></payment>"
      "</license><license>"
      "<payment type=\"use\"><amount currency=\"USD\">6</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">7</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">8</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">9</amount></payment>"
      "<payment type=\"use\"><amount currency=\"USD\">10</amount></payment>"
      "</license></content>"));
  CHECK(c);
  tg_catalog_result_t r = look(c, "/m", 0, 0, "");
  CHECK_INT(r.noffers, 2);
  CHECK_INT(r.offers[0].type, TG_RSL_PAY_CRAWL);
  CHECK_INT(r.offers[0].amount, 1);
  CHECK_INT(r.offers[1].type, TG_RSL_PAY_SUBSCRIPTION);
  CHECK_INT(r.offers[1].amount, 10000000);
  CHECK_STR(r.offers[1].currency, "EUR");
  CHECK(r.offers[1].key == tg_catalog_offer_key(0, 0, 1));
  r = look(c, "/many", 0, 0, "");
  CHECK_INT(r.noffers, TG_CATALOG_MAX_OFFERS);
  CHECK_INT(r.total_offers, 10);
  CHECK(r.offers[7].key == tg_catalog_offer_key(1, 1, 2));
  CHECK_INT(r.offers[7].amount, 8000000);
  tg_catalog_free(c);
}

TEST(content_without_license_is_not_for_sale) {
  tg_rsl_doc_t *doc = NULL;
  const char *xml = DOC("<content url=\"/nl/*\"/><content url=\"/\"><license/></content>");
  CHECK_INT(tg_rsl_parse(xml, strlen(xml), NULL, &doc, NULL), 0);
  CHECK_INT(doc->contents[0].nlicenses, 0);
  tg_catalog_t *c = NULL;
  CHECK_INT(tg_catalog_build(doc, hosts, NHOSTS, &c, NULL, 0), 0);
  tg_rsl_doc_free(doc);
  tg_catalog_result_t r = look(c, "/nl/a", TRAIN, 0, "");
  CHECK_INT(r.status, TG_CATALOG_NOT_FOR_SALE);
  CHECK_INT(r.content, 0);
  CHECK_INT(r.noffers, 0);
  CHECK_INT(look(c, "/other", TRAIN, 0, "").status, TG_CATALOG_OFFERS);
  tg_catalog_free(c);
}

TEST(license_sets_are_interned) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/a\"><license><permits type=\"geo\">US</permits>"
      "<payment type=\"use\"><amount currency=\"USD\">1</amount></payment></license></content>"
      "<content url=\"/b\"><license><permits type=\"geo\">us</permits>"
      "<payment type=\"use\"><amount currency=\"USD\">1</amount></payment></license></content>"
      "<content url=\"/c\"><license><permits type=\"geo\">US</permits>"
      "<payment type=\"use\"><amount currency=\"USD\">2</amount></payment></license></content>"
      "<content url=\"/d\"><license><permits type=\"geo\">CA</permits>"
      "<payment type=\"use\"><amount currency=\"USD\">1</amount></payment></license></content>"));
  CHECK(c);
  CHECK_INT(tg_catalog_entries(c), 4);
  CHECK_INT(tg_catalog_license_sets(c), 3);
  /* the shared set still answers per content */
  tg_catalog_result_t r = look(c, "/b", 0, 0, "US");
  CHECK_INT(r.content, 1);
  CHECK(r.offers[0].key == tg_catalog_offer_key(1, 0, 0));
  CHECK_INT(r.offers[0].amount, 1000000);
  CHECK_INT(look(c, "/c", 0, 0, "US").offers[0].amount, 2000000);
  CHECK_INT(look(c, "/d", 0, 0, "US").status, TG_CATALOG_FILTERED);
  tg_catalog_free(c);
}

TEST(offers_carry_the_license_url) {
  tg_catalog_t *c = build(DOC(
      "<content url=\"/a/*\" server=\"https://ls.example.com/api\"><license/>"
      "<terms>https://example.com/terms</terms></content>"
      "<content url=\"/b/*\" server=\"https://ls.example.com/api\"><license/></content>"
      "<content url=\"/c/*\"><license/><terms>see the notice on our site</terms></content>"
      "<content url=\"/d/*\" server=\"https://ls.example.com/api\"><license/>"
      "<terms>ftp://example.com/terms</terms></content>"
      "<content url=\"/e/*\"><license/><terms>https://example.com/terms</terms></content>"));
  CHECK(c);
  /* The legal terms first, else the license server, else none. */
  tg_catalog_result_t a = look(c, "/a/1", INPUT, 0, "");
  CHECK_INT(a.status, TG_CATALOG_OFFERS);
  CHECK_STR(a.offers[0].license_url, "https://example.com/terms");
  tg_catalog_result_t r = look(c, "/b/1", INPUT, 0, "");
  CHECK_STR(r.offers[0].license_url, "https://ls.example.com/api");
  r = look(c, "/c/1", INPUT, 0, "");
  CHECK_INT(r.status, TG_CATALOG_OFFERS);
  CHECK(r.offers[0].license_url == NULL);
  r = look(c, "/d/1", INPUT, 0, "");
  CHECK_STR(r.offers[0].license_url, "https://ls.example.com/api");
  /* Interned: one copy for contents that share it. */
  r = look(c, "/e/1", INPUT, 0, "");
  CHECK(r.offers[0].license_url == a.offers[0].license_url);
  tg_catalog_free(c);
}

TEST(bad_arguments) {
  tg_catalog_t *c = (tg_catalog_t *)1;
  char err[64];
  CHECK_INT(tg_catalog_build(NULL, hosts, NHOSTS, &c, err, sizeof err), -EINVAL);
  CHECK(c == NULL);
  CHECK(err[0] != '\0');
  tg_rsl_doc_t empty = {0};
  CHECK_INT(tg_catalog_build(&empty, NULL, 0, &c, err, sizeof err), 0);
  CHECK_INT(tg_catalog_entries(c), 0);
  CHECK(tg_catalog_built_at(c) > 0);
  tg_catalog_result_t r;
  CHECK_INT(tg_catalog_lookup(c, "/", 1, NULL, &r), 0);
  CHECK_INT(r.status, TG_CATALOG_NOT_IN_CATALOG);
  CHECK_INT(tg_catalog_lookup(c, "/", 1, NULL, NULL), -EINVAL);
  tg_catalog_free(c);
  tg_catalog_free(NULL);
}

TEST(too_many_licenses_in_one_content) {
  tg_rsl_content_t ct = {.url = "/x", .nlicenses = 65536};
  ct.licenses = calloc(ct.nlicenses, sizeof *ct.licenses);
  CHECK(ct.licenses);
  tg_rsl_doc_t doc = {.contents = &ct, .ncontents = 1};
  tg_catalog_t *c = (tg_catalog_t *)1;
  char err[128] = "";
  int rc = tg_catalog_build(&doc, hosts, NHOSTS, &c, err, sizeof err);
  free(ct.licenses);
  CHECK_INT(rc, -E2BIG);
  CHECK(c == NULL);
  CHECK(strstr(err, "/x") != NULL);
  ct.nlicenses = 65535;
  ct.licenses = calloc(ct.nlicenses, sizeof *ct.licenses);
  CHECK(ct.licenses);
  rc = tg_catalog_build(&doc, hosts, NHOSTS, &c, err, sizeof err);
  free(ct.licenses);
  CHECK_INT(rc, 0);
  tg_catalog_result_t r = look(c, "/x", 0, 0, "");
  CHECK_INT(r.total_offers, 65535);
  CHECK_INT(r.noffers, TG_CATALOG_MAX_OFFERS);
  CHECK(r.offers[7].key == tg_catalog_offer_key(0, 7, 0));
  tg_catalog_free(c);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TG_ASAN 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define TG_ASAN 1
#endif

/* A generated catalog: most contents share a handful of license sets, as in
 * real publisher files. Figures are printed, only correctness is asserted. */
TEST(large_catalog) {
#ifdef TG_ASAN
  const size_t n = 100000;
#else
  const size_t n = 1000000;
#endif
  tg_rsl_doc_t doc = {0};
  tg_rsl_license_t lics[4];
  tg_rsl_payment_t pays[4];
  memset(lics, 0, sizeof lics);
  memset(pays, 0, sizeof pays);
  for (int i = 0; i < 4; i++) {
    pays[i].type = TG_RSL_PAY_USE;
    pays[i].has_amount = true;
    pays[i].amount = 1000 * (i + 1);
    strcpy(pays[i].currency, "USD");
    lics[i].payments = &pays[i];
    lics[i].npayments = 1;
    lics[i].has_permit_usage = true;
    lics[i].permit_usage = i % 2 ? TG_RSL_USAGE_AI_ALL : TG_RSL_USAGE_AI_INPUT;
  }
  doc.contents = calloc(n, sizeof *doc.contents);
  char *urls = malloc(n * 40);
  CHECK(doc.contents && urls);
  doc.ncontents = n;
  for (size_t i = 0; i < n; i++) {
    char *u = urls + i * 40;
    if (i % 10 == 0)
      snprintf(u, 40, "/s%zu/p%zu/*", i % 997, i);
    else
      snprintf(u, 40, "/s%zu/p%zu", i % 997, i);
    doc.contents[i].url = u;
    doc.contents[i].lastmod = (int64_t)i;
    doc.contents[i].licenses = &lics[i % 4];
    doc.contents[i].nlicenses = i % 7 == 3 ? 2 : 1; /* a few two-license sets */
    if (i % 4 == 3)
      doc.contents[i].nlicenses = 1;
  }
  tg_catalog_t *c = NULL;
  char err[128];
  double t0 = now_s();
  int rc = tg_catalog_build(&doc, hosts, NHOSTS, &c, err, sizeof err);
  double t1 = now_s();
  CHECK_INT(rc, 0);
  CHECK_INT(tg_catalog_entries(c), n);
  CHECK(tg_catalog_license_sets(c) <= 8);
  size_t bytes = tg_catalog_bytes(c);
  printf("  catalog: %zu entries, %zu license sets, build %.3f s, %zu bytes (%.1f B/entry)\n", n,
         tg_catalog_license_sets(c), t1 - t0, bytes, (double)bytes / (double)n);

  /* spot-check against the generator, then time lookups */
  char path[64];
  for (size_t i = 1; i < n; i += n / 97) {
    int len = snprintf(path, sizeof path, "/s%zu/p%zu%s", i % 997, i, i % 10 == 0 ? "/x" : "");
    tg_catalog_result_t r;
    CHECK_INT(tg_catalog_lookup(c, path, (size_t)len, NULL, &r), 0);
    CHECK_INT(r.status, TG_CATALOG_OFFERS);
    CHECK_INT(r.content, i);
    CHECK_INT(r.offers[0].lastmod, (int64_t)i);
    CHECK_INT(r.offers[0].amount, 1000 * (int64_t)(i % 4 + 1));
  }
  /* paths are made before the clock starts, so ns/op is the lookup alone */
  enum { NPATHS = 4096 };
  static char paths[NPATHS][48];
  static size_t lens[NPATHS];
  for (size_t k = 0; k < NPATHS; k++) {
    size_t i = (k * 7919 * 13) % n;
    lens[k] = (size_t)snprintf(paths[k], sizeof paths[k], "/s%zu/p%zu%s", i % 997, i,
                               i % 10 == 0 ? "/x" : "");
  }
  const size_t iters = 400000;
  tg_catalog_query_t q = {.usage = TG_RSL_USAGE_AI_INPUT, .country = "US"};
  size_t offers = 0;
  t0 = now_s();
  for (size_t k = 0; k < iters; k++) {
    tg_catalog_result_t r;
    tg_catalog_lookup(c, paths[k % NPATHS], lens[k % NPATHS], &q, &r);
    offers += r.noffers;
  }
  t1 = now_s();
  CHECK(offers >= iters);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("  lookup: %.0f ns/op; peak RSS of this test %ld MiB (generated document included)\n",
         (t1 - t0) * 1e9 / (double)iters, ru.ru_maxrss / 1024);
  tg_catalog_free(c);
  free(urls);
  free(doc.contents);
}
