#include "base/money.h"
#include "test.h"

#include <errno.h>
#include <math.h>

static char err[256];

static int parse(const char *s, int64_t *v) {
  err[0] = '\0';
  return tg_money_parse(s, strlen(s), v, err, sizeof err);
}

TEST(digits_are_amounts) {
  static const struct {
    const char *s;
    int64_t want;
  } ok[] = {{"0", 0}, {"1", 1}, {"1000", 1000}, {"15000", 15000}, {"9007199254740992", TG_MONEY_MAX}};
  for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
    int64_t v = -1;
    CHECK_INT(parse(ok[i].s, &v), 0);
    CHECK_INT(v, ok[i].want);
  }
  /* len bounds the input: the rest of a larger buffer is not read. */
  int64_t v = -1;
  CHECK_INT(tg_money_parse("123abc", 3, &v, err, sizeof err), 0);
  CHECK_INT(v, 123);
}

/* A refusal never writes 0 (or anything) into the amount. */
TEST(anything_else_is_refused) {
  static const struct {
    const char *s;
    int rc;
    const char *why;
  } bad[] = {
      {"0.001", -EINVAL, "\"0.001\" is not an amount in atomic units (a decimal fraction; an integer: 1000 = 0.001 USDC at 6 decimals)"},
      {"1,5", -EINVAL, "(a decimal fraction;"},
      {"", -EINVAL, "\"\" is not an amount in atomic units (empty;"},
      {"abc", -EINVAL, "(not digits;"},
      {"-5", -EINVAL, "(negative;"},
      {"-0", -EINVAL, "(negative;"},
      {"+5", -EINVAL, "(a sign;"},
      {"1e3", -EINVAL, "(an exponent;"},
      {"1E3", -EINVAL, "(an exponent;"},
      {" 10", -EINVAL, "(spaces;"},
      {"10 ", -EINVAL, "(spaces;"},
      {"1 0", -EINVAL, "(spaces;"},
      {"00", -EINVAL, "(leading zeros;"},
      {"0x1F", -EINVAL, "(not digits;"},
      {"inf", -EINVAL, "(not digits;"},
      {"\xd9\xa3", -EINVAL, "\"\\xd9\\xa3\" is not an amount"}, /* ARABIC-INDIC DIGIT THREE */
      {"9007199254740993", -ERANGE, "\"9007199254740993\" is more than 2^53 = 9007199254740992 atomic units"},
      {"99999999999999999999", -ERANGE, "is more than 2^53"},
      {"18446744073709551617", -ERANGE, "is more than 2^53"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int64_t v = 42;
    int rc = parse(bad[i].s, &v);
    if (rc != bad[i].rc || strstr(err, bad[i].why) == NULL)
      fprintf(stderr, "  \"%s\": rc %d, err: %s\n  want: %s\n", bad[i].s, rc, err, bad[i].why);
    CHECK_INT(rc, bad[i].rc);
    CHECK(strstr(err, bad[i].why) != NULL);
    CHECK_INT(v, 42);
  }
  /* Bytes past the first NUL still count: "1\0" is not "1". */
  int64_t v = 42;
  CHECK_INT(tg_money_parse("1\0", 2, &v, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "\"1\\x00\"") != NULL);
  /* A long input is quoted cut, and err may be small or absent. */
  char longs[300];
  memset(longs, '7', sizeof longs - 1);
  longs[sizeof longs - 1] = '\0';
  CHECK_INT(parse(longs, &v), -ERANGE);
  CHECK(strstr(err, "...\" is more than") != NULL);
  char tiny[8];
  CHECK_INT(tg_money_parse("0.5", 3, &v, tiny, sizeof tiny), -EINVAL);
  CHECK_INT(strlen(tiny), sizeof tiny - 1);
  CHECK_INT(tg_money_parse("0.5", 3, &v, NULL, 0), -EINVAL);
  CHECK_INT(v, 42);
}

TEST(numbers) {
  int64_t v = -1;
  CHECK_INT(tg_money_from_double(1000, &v, err, sizeof err), 0);
  CHECK_INT(v, 1000);
  CHECK_INT(tg_money_from_double(0, &v, err, sizeof err), 0);
  CHECK_INT(v, 0);
  CHECK_INT(tg_money_from_double(9007199254740992.0, &v, err, sizeof err), 0);
  CHECK_INT(v, TG_MONEY_MAX);
  v = 42;
  CHECK_INT(tg_money_from_double(1.5, &v, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "1.5 is not an amount in atomic units (a decimal fraction;") != NULL);
  CHECK_INT(tg_money_from_double(-5, &v, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "(negative;") != NULL);
  CHECK_INT(tg_money_from_double(1e30, &v, err, sizeof err), -ERANGE);
  CHECK(strstr(err, "1e+30 is more than 2^53") != NULL);
  CHECK_INT(tg_money_from_double(9007199254740994.0, &v, err, sizeof err), -ERANGE);
  CHECK(strstr(err, "9007199254740994 is more than 2^53") != NULL);
  CHECK_INT(tg_money_from_double(NAN, &v, err, sizeof err), -EINVAL);
  CHECK_INT(tg_money_from_double(INFINITY, &v, err, sizeof err), -EINVAL);
  CHECK(strstr(err, "not finite") != NULL);
  CHECK_INT(v, 42);
}
