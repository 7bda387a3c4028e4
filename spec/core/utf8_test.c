#include "base/utf8.h"

#include "test.h"

TEST(decode_code_points) {
  static const struct {
    const char *s;
    size_t len, used;
    uint32_t cp;
  } cases[] = {
      {"A", 1, 1, 'A'},
      {"\x7f", 1, 1, 0x7f},
      {"\xc2\x80", 2, 2, 0x80},
      {"\xdf\xbf", 2, 2, 0x7ff},
      {"\xe0\xa0\x80", 3, 3, 0x800},
      {"\xe2\x82\xac", 3, 3, 0x20ac},
      {"\xed\x9f\xbf", 3, 3, 0xd7ff},
      {"\xee\x80\x80", 3, 3, 0xe000},
      {"\xef\xbf\xbf", 3, 3, 0xffff},
      {"\xf0\x90\x80\x80", 4, 4, 0x10000},
      {"\xf4\x8f\xbf\xbf", 4, 4, 0x10ffff},
      /* Ill-formed: the count is the maximal subpart. */
      {"\x80", 1, 1, TG_UTF8_INVALID},
      {"\xc0\x80", 2, 1, TG_UTF8_INVALID},     /* overlong lead */
      {"\xc1\xbf", 2, 1, TG_UTF8_INVALID},
      {"\xe0\x9f\xbf", 3, 1, TG_UTF8_INVALID}, /* overlong 3-byte */
      {"\xed\xa0\x80", 3, 1, TG_UTF8_INVALID}, /* surrogate */
      {"\xf0\x8f\xbf\xbf", 4, 1, TG_UTF8_INVALID},
      {"\xf4\x90\x80\x80", 4, 1, TG_UTF8_INVALID}, /* above U+10FFFF */
      {"\xf5\x80\x80\x80", 4, 1, TG_UTF8_INVALID},
      {"\xff", 1, 1, TG_UTF8_INVALID},
      {"\xe2\x82", 2, 2, TG_UTF8_INVALID},     /* truncated by len */
      {"\xe2\x82" "A", 3, 2, TG_UTF8_INVALID}, /* truncated by a non-continuation */
      {"\xf0\x9f\x98", 3, 3, TG_UTF8_INVALID},
      {"\xe2\x82\xac", 1, 1, TG_UTF8_INVALID}, /* len stops before the tail */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    uint32_t cp = 0;
    size_t used = tg_utf8_decode(cases[i].s, cases[i].len, &cp);
    if (used != cases[i].used || cp != cases[i].cp)
      fprintf(stderr, "  case %zu: used %zu cp %" PRIx32 "\n", i, used, cp);
    CHECK_INT(used, cases[i].used);
    CHECK_INT(cp, cases[i].cp);
  }
}

TEST(valid_and_repair) {
  CHECK(tg_utf8_valid("", 0));
  CHECK(tg_utf8_valid("plain ascii", 11));
  CHECK(tg_utf8_valid("caf\xc3\xa9 \xf0\x9f\x98\x80", 10));
  CHECK(!tg_utf8_valid("caf\xc3", 4));
  CHECK(!tg_utf8_valid("a\xed\xbf\xbf", 4));
  CHECK(tg_utf8_valid("a\0b", 3)); /* NUL is a code point; callers pass lengths */

  tg_buf_t b = {0};
  CHECK(tg_utf8_repair(&b, "ok", 2) == 0);
  CHECK_STR(b.data, "ok");
  tg_buf_reset(&b);
  /* Unicode's example of maximal subparts: 61 F1 80 80 E1 80 C2 62 80 63 80 BF 64. */
  CHECK(tg_utf8_repair(&b, "\x61\xf1\x80\x80\xe1\x80\xc2\x62\x80\x63\x80\xbf\x64", 13) == 0);
  CHECK_STR(b.data, "a\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd" "b\xef\xbf\xbd" "c\xef\xbf\xbd\xef\xbf\xbd"
                    "d");
  CHECK(tg_utf8_valid(b.data, b.len));
  tg_buf_reset(&b);
  CHECK(tg_utf8_repair(&b, "\xff", 1) == 0);
  CHECK_STR(b.data, "\xef\xbf\xbd");
  tg_buf_free(&b);
}
