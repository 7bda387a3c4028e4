#include "catalog/rsl.h"

#include <errno.h>

#include "test.h"

#define NS "https://rslstandard.org/rsl"

static const tg_rsl_options_t strict = {.strict = true};

static int parse(const char *xml, const tg_rsl_options_t *opt, tg_rsl_doc_t **doc,
                 tg_rsl_report_t *rep) {
  return tg_rsl_parse(xml, strlen(xml), opt, doc, rep);
}

/* True when some report message contains both needles. */
static bool has_msg(const tg_rsl_report_t *rep, const char *a, const char *b) {
  for (size_t i = 0; i < rep->nmessages; i++)
    if (strstr(rep->messages[i], a) && (!b || strstr(rep->messages[i], b)))
      return true;
  return false;
}

static const char full_doc[] =
    "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    "<rsl xmlns=\"" NS "\">\n"
    "  <content url=\"https://example.com/articles/*\" server=\"https://ls.example.com/\"\n"
    "           encrypted=\"true\" lastmod=\"2025-09-10T12:30:00Z\">\n"
    "    <schema>https://example.com/schema.jsonld</schema>\n"
    "    <alternate>https://example.com/articles.pdf</alternate>\n"
    "    <copyright>Example Media &amp; Co</copyright>\n"
    "    <terms>https://example.com/terms</terms>\n"
    "    <license>\n"
    "      <permits type=\"usage\">ai-train ai-input search</permits>\n"
    "      <prohibits type=\"usage\">ai-index</prohibits>\n"
    "      <permits type=\"user\">commercial education</permits>\n"
    "      <prohibits type=\"user\">government</prohibits>\n"
    "      <permits type=\"geo\">US ca</permits>\n"
    "      <prohibits type=\"geo\">RU</prohibits>\n"
    "      <payment type=\"use\">\n"
    "        <amount currency=\"USD\">0.015</amount>\n"
    "        <standard>https://rslcollective.org/license</standard>\n"
    "        <custom>https://example.com/custom</custom>\n"
    "        <accepts type=\"method\">x402</accepts>\n"
    "        <accepts type=\"card\"/>\n"
    "      </payment>\n"
    "      <payment type=\"training\"><amount currency=\"USDC\">1</amount></payment>\n"
    "      <legal type=\"warranty\">none</legal>\n"
    "      <reporting type=\"usage\" endpoint=\"https://example.com/report\"/>\n"
    "    </license>\n"
    "    <license>\n"
    "      <permits type=\"usage\">all</permits>\n"
    "      <payment type=\"attribution\"/>\n"
    "    </license>\n"
    "  </content>\n"
    "  <content url=\"/docs/*.pdf$\" lastmod=\"2024-02-29\">\n"
    "    <license><prohibits type=\"usage\">ai-all</prohibits></license>\n"
    "  </content>\n"
    "</rsl>\n";

TEST(every_element_read_back) {
  tg_rsl_doc_t *doc = NULL;
  tg_rsl_report_t rep;
  CHECK_INT(parse(full_doc, &strict, &doc, &rep), 0);
  CHECK_INT(rep.errors, 0);
  CHECK_INT(rep.warnings, 0);
  CHECK_INT(doc->ncontents, 2);
  tg_rsl_content_t *c = &doc->contents[0];
  CHECK_STR(c->url, "https://example.com/articles/*");
  CHECK_STR(c->server, "https://ls.example.com/");
  CHECK(c->encrypted);
  CHECK_INT(c->lastmod, 1757507400); /* 2025-09-10T12:30:00Z */
  CHECK_STR(c->schema, "https://example.com/schema.jsonld");
  CHECK_STR(c->alternate, "https://example.com/articles.pdf");
  CHECK_STR(c->copyright, "Example Media & Co");
  CHECK_STR(c->terms, "https://example.com/terms");
  CHECK_INT(c->nlicenses, 2);
  tg_rsl_license_t *l = &c->licenses[0];
  CHECK(l->has_permit_usage && l->has_permit_user && l->has_permit_geo);
  CHECK_INT(l->permit_usage, TG_RSL_USAGE_AI_TRAIN | TG_RSL_USAGE_AI_INPUT | TG_RSL_USAGE_SEARCH);
  CHECK_INT(l->prohibit_usage, TG_RSL_USAGE_AI_INDEX);
  CHECK_INT(l->permit_user, TG_RSL_USER_COMMERCIAL | TG_RSL_USER_EDUCATION);
  CHECK_INT(l->prohibit_user, TG_RSL_USER_GOVERNMENT);
  CHECK_INT(l->npermit_geo, 2);
  CHECK_STR(l->permit_geo[0], "US");
  CHECK_STR(l->permit_geo[1], "CA");
  CHECK_INT(l->nprohibit_geo, 1);
  CHECK_STR(l->prohibit_geo[0], "RU");
  CHECK_INT(l->npayments, 2);
  tg_rsl_payment_t *pay = &l->payments[0];
  CHECK_INT(pay->type, TG_RSL_PAY_USE);
  CHECK(pay->has_amount);
  CHECK_INT(pay->amount, 15000);
  CHECK_STR(pay->currency, "USD");
  CHECK_STR(pay->standard, "https://rslcollective.org/license");
  CHECK_STR(pay->custom, "https://example.com/custom");
  CHECK_INT(pay->naccepts, 2);
  CHECK_STR(pay->accepts[0], "x402");
  CHECK_STR(pay->accepts[1], "card");
  CHECK_INT(l->payments[1].type, TG_RSL_PAY_TRAINING);
  CHECK_INT(l->payments[1].amount, 1000000);
  CHECK_STR(l->payments[1].currency, "USDC");
  CHECK_INT(l->nlegal, 1);
  CHECK_STR(l->legal[0].type, "warranty");
  CHECK_STR(l->legal[0].text, "none");
  CHECK_INT(l->nreporting, 1);
  CHECK_STR(l->reporting[0].type, "usage");
  CHECK_STR(l->reporting[0].endpoint, "https://example.com/report");
  l = &c->licenses[1];
  CHECK_INT(l->permit_usage, TG_RSL_USAGE_ALL);
  CHECK(!l->has_permit_user && !l->has_permit_geo);
  CHECK_INT(l->npayments, 1);
  CHECK_INT(l->payments[0].type, TG_RSL_PAY_ATTRIBUTION);
  CHECK(!l->payments[0].has_amount);
  c = &doc->contents[1];
  CHECK_STR(c->url, "/docs/*.pdf$");
  CHECK_INT(c->lastmod, 1709164800); /* 2024-02-29 */
  CHECK(!c->encrypted && !c->server && !c->schema);
  CHECK_INT(c->nlicenses, 1);
  CHECK(!c->licenses[0].has_permit_usage);
  CHECK_INT(c->licenses[0].prohibit_usage, TG_RSL_USAGE_AI_ALL);
  CHECK_INT(c->licenses[0].npayments, 0); /* free */
  tg_rsl_doc_free(doc);
}

TEST(empty_permits_is_closed) {
  const char *xml = "<rsl xmlns=\"" NS "\"><content url=\"/\"><license>"
                    "<permits type=\"usage\"></permits></license></content></rsl>";
  tg_rsl_doc_t *doc;
  CHECK_INT(parse(xml, &strict, &doc, NULL), 0);
  CHECK(doc->contents[0].licenses[0].has_permit_usage);
  CHECK_INT(doc->contents[0].licenses[0].permit_usage, 0);
  tg_rsl_doc_free(doc);
}

TEST(lastmod_with_offset) {
  const char *xml = "<rsl xmlns=\"" NS "\"><content url=\"/\" lastmod=\"1970-01-02T01:00:00.5+01:00\">"
                    "<license/></content></rsl>";
  tg_rsl_doc_t *doc;
  CHECK_INT(parse(xml, &strict, &doc, NULL), 0);
  CHECK_INT(doc->contents[0].lastmod, 86400);
  tg_rsl_doc_free(doc);
}

static const char repeated_doc[] =
    "<rsl xmlns=\"" NS "\">\n"
    "<content url=\"/a\">\n"
    "<terms>first</terms>\n"
    "<terms>second</terms>\n"
    "<license>\n"
    "<permits type=\"usage\">ai-input</permits>\n"
    "<permits type=\"usage\">search</permits>\n"
    "<prohibits type=\"geo\">CN</prohibits>\n"
    "<prohibits type=\"geo\">RU</prohibits>\n"
    "</license>\n"
    "</content>\n"
    "</rsl>\n";

TEST(repeated_elements) {
  tg_rsl_doc_t *doc = NULL;
  tg_rsl_report_t rep;
  CHECK_INT(parse(repeated_doc, NULL, &doc, &rep), 0);
  CHECK_INT(rep.errors, 0);
  CHECK_INT(rep.warnings, 2); /* repeated terms, repeated permits usage */
  tg_rsl_content_t *c = &doc->contents[0];
  CHECK_STR(c->terms, "first");
  CHECK_INT(c->licenses[0].permit_usage, TG_RSL_USAGE_AI_INPUT | TG_RSL_USAGE_SEARCH);
  CHECK_INT(c->licenses[0].nprohibit_geo, 2);
  CHECK_STR(c->licenses[0].prohibit_geo[1], "RU");
  tg_rsl_doc_free(doc);

  CHECK_INT(parse(repeated_doc, &strict, &doc, &rep), -EINVAL);
  CHECK(doc == NULL);
  CHECK_INT(rep.errors, 2);
  CHECK(has_msg(&rep, "line 4:", "repeated <terms>"));
  CHECK(has_msg(&rep, "line 7:", "repeated <permits"));
}

static const char draft_doc[] =
    "<rsl xmlns=\"" NS "\">\n"
    "<content url=\"/x\">\n"
    "<license>\n"
    "<permits type=\"usage\">train-ai search</permits>\n"
    "<prohibits type=\"usage\">tdm</prohibits>\n"
    "<payment type=\"inference\"><amount currency=\"USD\">2.5</amount></payment>\n"
    "</license>\n"
    "</content>\n"
    "</rsl>\n";

TEST(draft_tokens_lenient_mapped) {
  tg_rsl_doc_t *doc = NULL;
  tg_rsl_report_t rep;
  CHECK_INT(parse(draft_doc, NULL, &doc, &rep), 0);
  CHECK_INT(rep.warnings, 3);
  CHECK_INT(rep.errors, 0);
  tg_rsl_license_t *l = &doc->contents[0].licenses[0];
  CHECK_INT(l->permit_usage, TG_RSL_USAGE_AI_TRAIN | TG_RSL_USAGE_SEARCH);
  CHECK_INT(l->prohibit_usage, TG_RSL_USAGE_AI_TRAIN);
  CHECK_INT(l->npayments, 1);
  CHECK_INT(l->payments[0].type, TG_RSL_PAY_USE);
  CHECK_INT(l->payments[0].amount, 2500000);
  tg_rsl_doc_free(doc);
}

TEST(draft_tokens_strict_errors_with_line) {
  tg_rsl_doc_t *doc = (tg_rsl_doc_t *)1;
  tg_rsl_report_t rep;
  CHECK_INT(parse(draft_doc, &strict, &doc, &rep), -EINVAL);
  CHECK(doc == NULL);
  CHECK_INT(rep.errors, 3);
  CHECK_INT(rep.nmessages, 3);
  CHECK(has_msg(&rep, "line 4:", "train-ai"));
  CHECK(has_msg(&rep, "line 5:", "tdm"));
  CHECK(has_msg(&rep, "line 6:", "inference"));
}

static const char broken_doc[] =
    "<rsl xmlns=\"" NS "\">\n"
    "<content><license/></content>\n"                                     /* 2: no url */
    "<content url=\"/nolicense\"></content>\n"                            /* 3: no license */
    "<content url=\"/badpay\">\n"
    "<license><payment type=\"barter\"/></license>\n"                     /* 5: dropped */
    "<license><payment type=\"use\"><amount>abc</amount></payment></license>\n" /* 6: dropped */
    "<license><permits type=\"usage\">search ai-magic</permits></license>\n"  /* 7: token */
    "</content>\n"
    "<content url=\"/unknown\"><license><frobnicate>x</frobnicate></license></content>\n" /* 9 */
    "</rsl>\n";

TEST(broken_parts_lenient_skipped) {
  tg_rsl_doc_t *doc = NULL;
  tg_rsl_report_t rep;
  CHECK_INT(parse(broken_doc, NULL, &doc, &rep), 0);
  CHECK_INT(rep.errors, 0);
  CHECK_INT(rep.warnings, 6);
  CHECK_INT(doc->ncontents, 3);
  CHECK_STR(doc->contents[0].url, "/nolicense");
  CHECK_INT(doc->contents[0].nlicenses, 0);
  CHECK_STR(doc->contents[1].url, "/badpay");
  CHECK_INT(doc->contents[1].nlicenses, 1);
  CHECK_INT(doc->contents[1].licenses[0].permit_usage, TG_RSL_USAGE_SEARCH);
  CHECK_INT(doc->contents[2].nlicenses, 1);
  tg_rsl_doc_free(doc);

  CHECK_INT(parse(broken_doc, &strict, &doc, &rep), -EINVAL);
  CHECK_INT(rep.errors, 6);
  CHECK(has_msg(&rep, "line 2:", "without url"));
  CHECK(has_msg(&rep, "line 3:", "no license"));
  CHECK(has_msg(&rep, "line 5:", "barter"));
  CHECK(has_msg(&rep, "line 6:", "abc"));
  CHECK(has_msg(&rep, "line 7:", "ai-magic"));
  CHECK(has_msg(&rep, "line 9:", "frobnicate"));
}

static int amount_of(const char *amount, int64_t *out, tg_rsl_report_t *rep, bool strict_mode) {
  char xml[512];
  snprintf(xml, sizeof xml,
           "<rsl xmlns=\"" NS "\"><content url=\"/\"><license><payment type=\"use\">"
           "<amount currency=\"USD\">%s</amount></payment></license></content></rsl>",
           amount);
  tg_rsl_options_t opt = {.strict = strict_mode};
  tg_rsl_doc_t *doc;
  int rc = parse(xml, &opt, &doc, rep);
  if (rc)
    return rc;
  tg_rsl_content_t *c = &doc->contents[0];
  *out = c->nlicenses ? c->licenses[0].payments[0].amount : -1;
  tg_rsl_doc_free(doc);
  return 0;
}

TEST(amounts) {
  int64_t v;
  tg_rsl_report_t rep;
  CHECK_INT(amount_of("0.015", &v, &rep, true), 0);
  CHECK_INT(v, 15000);
  CHECK_INT(amount_of("1", &v, &rep, true), 0);
  CHECK_INT(v, 1000000);
  CHECK_INT(amount_of(" 12.000001 ", &v, &rep, true), 0);
  CHECK_INT(v, 12000001);
  CHECK_INT(amount_of("0", &v, &rep, true), 0);
  CHECK_INT(v, 0);
  static const char *const bad[] = {"0.0000001", "-1", "abc", "", "1.", ".5", "1e3",
                                    "+1", "99999999999999999999", "1,5"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    CHECK_INT(amount_of(bad[i], &v, &rep, true), -EINVAL);
    CHECK(has_msg(&rep, "bad amount", NULL));
    CHECK_INT(amount_of(bad[i], &v, &rep, false), 0);
    CHECK_INT(v, -1); /* license dropped, never treated as free */
    CHECK_INT(rep.warnings, 2); /* bad amount + content left without license */
  }
}

TEST(wrong_namespace_and_root) {
  tg_rsl_doc_t *doc = (tg_rsl_doc_t *)1;
  tg_rsl_report_t rep;
  CHECK_INT(parse("<rsl xmlns=\"https://example.com/rsl\"><content url=\"/\"/></rsl>", NULL,
                  &doc, &rep),
            -EINVAL);
  CHECK(doc == NULL);
  CHECK(has_msg(&rep, "line 1:", "root must be"));
  CHECK_INT(parse("<rsl><content url=\"/\"/></rsl>", NULL, &doc, &rep), -EINVAL);
  CHECK_INT(parse("<license xmlns=\"" NS "\"/>", NULL, &doc, &rep), -EINVAL);
  CHECK(has_msg(&rep, "root must be", NULL));
}

TEST(foreign_namespace_ignored) {
  const char *xml = "<rsl xmlns=\"" NS "\" xmlns:x=\"https://example.com/ext\">"
                    "<x:meta><content url=\"/hidden\"/></x:meta>"
                    "<content url=\"/a\" x:note=\"n\"><x:extra>y</x:extra>"
                    "<license><x:price>9</x:price><permits type=\"usage\">search</permits>"
                    "</license></content></rsl>";
  tg_rsl_doc_t *doc;
  tg_rsl_report_t rep;
  CHECK_INT(parse(xml, &strict, &doc, &rep), 0);
  CHECK_INT(rep.warnings + rep.errors, 0);
  CHECK_INT(doc->ncontents, 1);
  CHECK_STR(doc->contents[0].url, "/a");
  CHECK_INT(doc->contents[0].licenses[0].permit_usage, TG_RSL_USAGE_SEARCH);
  tg_rsl_doc_free(doc);
}

TEST(malformed_xml_with_line) {
  tg_rsl_doc_t *doc = (tg_rsl_doc_t *)1;
  tg_rsl_report_t rep;
  const char *xml = "<rsl xmlns=\"" NS "\">\n<content url=\"/\">\n<license>\n</content>\n</rsl>";
  CHECK_INT(parse(xml, NULL, &doc, &rep), -EINVAL);
  CHECK(doc == NULL);
  CHECK_INT(rep.errors, 1);
  CHECK(has_msg(&rep, "line 4:", "malformed XML"));
  CHECK_INT(parse("", NULL, &doc, &rep), -EINVAL);
  CHECK_INT(parse("<rsl xmlns=\"" NS "\">&undefined;</rsl>", NULL, &doc, &rep), -EINVAL);
}

TEST(oversized_document) {
  tg_rsl_options_t opt = {.max_bytes = 64};
  tg_rsl_doc_t *doc = (tg_rsl_doc_t *)1;
  tg_rsl_report_t rep;
  CHECK_INT(parse(full_doc, &opt, &doc, &rep), -E2BIG);
  CHECK(doc == NULL);
  CHECK(has_msg(&rep, "exceeds 64", NULL));
  /* The default cap is 8 MiB: a 9 MiB buffer is refused before expat sees it. */
  size_t n = 9u << 20;
  char *big = malloc(n);
  CHECK(big);
  memset(big, ' ', n);
  int rc = tg_rsl_parse(big, n, NULL, &doc, &rep);
  free(big);
  CHECK_INT(rc, -E2BIG);
}

TEST(depth_limit) {
  const char *xml = "<rsl xmlns=\"" NS "\"><a:x xmlns:a=\"urn:a\"><a:x><a:x><a:x/></a:x></a:x></a:x></rsl>";
  tg_rsl_options_t opt = {.max_depth = 4};
  tg_rsl_doc_t *doc;
  tg_rsl_report_t rep;
  CHECK_INT(parse(xml, &opt, &doc, &rep), -E2BIG);
  CHECK(has_msg(&rep, "line 1:", "nesting deeper than 4"));
  opt.max_depth = 5;
  CHECK_INT(parse(xml, &opt, &doc, &rep), 0);
  tg_rsl_doc_free(doc);
}

TEST(element_count_limit) {
  tg_rsl_options_t opt = {.max_elements = 10};
  tg_rsl_doc_t *doc;
  tg_rsl_report_t rep;
  CHECK_INT(parse(full_doc, &opt, &doc, &rep), -E2BIG);
  CHECK(has_msg(&rep, "more than 10 elements", NULL));
  opt.max_elements = 100;
  CHECK_INT(parse(full_doc, &opt, &doc, &rep), 0);
  tg_rsl_doc_free(doc);
}

TEST(billion_laughs_refused) {
  const char *xml =
      "<?xml version=\"1.0\"?>\n"
      "<!DOCTYPE rsl [\n"
      " <!ENTITY a \"lol\">\n"
      " <!ENTITY b \"&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;\">\n"
      " <!ENTITY c \"&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;\">\n"
      " <!ENTITY d \"&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;\">\n"
      "]>\n"
      "<rsl xmlns=\"" NS "\"><content url=\"/&d;\"><license/></content></rsl>";
  tg_rsl_doc_t *doc = (tg_rsl_doc_t *)1;
  tg_rsl_report_t rep;
  CHECK_INT(parse(xml, NULL, &doc, &rep), -EINVAL);
  CHECK(doc == NULL);
  CHECK_INT(rep.errors, 1);
  CHECK(has_msg(&rep, "line 2:", "entity declarations are refused"));
  const char *ext = "<!DOCTYPE rsl SYSTEM \"file:///etc/passwd\"><rsl xmlns=\"" NS "\"/>";
  CHECK_INT(parse(ext, NULL, &doc, &rep), -EINVAL);
  CHECK(has_msg(&rep, "refused", NULL));
}

TEST(empty_rsl_and_report_bounded) {
  tg_rsl_doc_t *doc;
  tg_rsl_report_t rep;
  CHECK_INT(parse("<rsl xmlns=\"" NS "\"/>", NULL, &doc, &rep), 0);
  CHECK_INT(doc->ncontents, 0);
  CHECK_INT(rep.warnings, 1);
  tg_rsl_doc_free(doc);
  CHECK_INT(parse("<rsl xmlns=\"" NS "\"/>", &strict, &doc, &rep), -EINVAL);

  /* 40 bad contents: every one counted, only the first 32 listed. */
  char xml[4096] = "<rsl xmlns=\"" NS "\">";
  for (int i = 0; i < 40; i++)
    strcat(xml, "<content/>\n");
  strcat(xml, "<content url=\"/\"><license/></content></rsl>");
  CHECK_INT(parse(xml, &strict, &doc, &rep), -EINVAL);
  CHECK_INT(rep.errors, 40);
  CHECK_INT(rep.nmessages, TG_RSL_REPORT_MAX);
  CHECK(has_msg(&rep, "line 32:", "without url"));
  CHECK_INT(parse(xml, NULL, &doc, &rep), 0);
  CHECK_INT(rep.warnings, 40);
  CHECK_INT(doc->ncontents, 1);
  tg_rsl_doc_free(doc);
}

TEST(many_contents) {
  /* Growth past several doublings, freed cleanly (ASan build checks the leaks). */
  size_t n = 5000, cap = n * 80 + 100;
  char *xml = malloc(cap);
  CHECK(xml);
  size_t off = (size_t)snprintf(xml, cap, "<rsl xmlns=\"" NS "\">");
  for (size_t i = 0; i < n; i++)
    off += (size_t)snprintf(xml + off, cap - off,
                            "<content url=\"/p/%zu/*\"><license><payment type=\"crawl\"/>"
                            "</license></content>",
                            i);
  snprintf(xml + off, cap - off, "</rsl>");
  tg_rsl_doc_t *doc;
  int rc = parse(xml, &strict, &doc, NULL);
  free(xml);
  CHECK_INT(rc, 0);
  CHECK_INT(doc->ncontents, n);
  CHECK_STR(doc->contents[4999].url, "/p/4999/*");
  CHECK_INT(doc->contents[4999].licenses[0].payments[0].type, TG_RSL_PAY_CRAWL);
  tg_rsl_doc_free(doc);
}

TEST(attribute_values_checked) {
  const char *xml = "<rsl xmlns=\"" NS "\">\n"
                    "<content url=\"/a\" encrypted=\"maybe\" lastmod=\"2025-13-01\">\n"
                    "<license>\n"
                    "<permits type=\"geo\">us USA</permits>\n"
                    "<permits type=\"colour\">red</permits>\n"
                    "<reporting type=\"usage\">https://example.com/r</reporting>\n"
                    "</license>\n"
                    "<license><payment><amount>1</amount></payment></license>\n"
                    "</content>\n"
                    "</rsl>\n";
  tg_rsl_doc_t *doc;
  tg_rsl_report_t rep;
  CHECK_INT(parse(xml, NULL, &doc, &rep), 0);
  CHECK_INT(rep.warnings, 5);
  tg_rsl_content_t *c = &doc->contents[0];
  CHECK(!c->encrypted);
  CHECK_INT(c->lastmod, 0);
  CHECK_INT(c->nlicenses, 1); /* the payment without type dropped its license */
  tg_rsl_license_t *l = &c->licenses[0];
  CHECK(l->has_permit_geo && !l->has_permit_usage);
  CHECK_INT(l->npermit_geo, 1);
  CHECK_STR(l->permit_geo[0], "US");
  CHECK_STR(l->reporting[0].endpoint, "https://example.com/r");
  tg_rsl_doc_free(doc);
  CHECK_INT(parse(xml, &strict, &doc, &rep), -EINVAL);
  CHECK(has_msg(&rep, "line 2:", "encrypted"));
  CHECK(has_msg(&rep, "line 2:", "lastmod"));
  CHECK(has_msg(&rep, "line 4:", "USA"));
  CHECK(has_msg(&rep, "line 5:", "colour"));
  CHECK(has_msg(&rep, "line 8:", "without type"));
}
