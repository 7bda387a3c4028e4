#include "base/money.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define HINT "an integer: 1000 = 0.001 USDC at 6 decimals"
#define QUOTE_MAX 40 /* bytes of the input quoted in a message */

static int fail(int rc, char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static int fail(int rc, char *err, size_t errlen, const char *fmt, ...) {
  if (err != NULL && errlen > 0) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
  }
  return rc;
}

/* s as a quoted C-style string for a message: the input may hold anything,
 * and a message must stay one printable line. */
static void quote(const char *s, size_t len, char *out, size_t outlen) {
  size_t o = 0;
  out[o++] = '"';
  for (size_t i = 0; i < len && i < QUOTE_MAX && o + 6 < outlen; i++) {
    unsigned char ch = (unsigned char)s[i];
    if (ch == '"' || ch == '\\')
      o += (size_t)snprintf(out + o, outlen - o, "\\%c", ch);
    else if (ch < 0x20 || ch >= 0x7f)
      o += (size_t)snprintf(out + o, outlen - o, "\\x%02x", ch);
    else
      out[o++] = (char)ch;
  }
  if (len > QUOTE_MAX && o + 5 < outlen) {
    memcpy(out + o, "...", 3);
    o += 3;
  }
  out[o++] = '"';
  out[o] = '\0';
}

/* Why s is not an amount, for the usual mistakes; NULL when it is digits. */
static const char *why_not(const char *s, size_t len) {
  if (len == 0)
    return "empty";
  if (memchr(s, '.', len) || memchr(s, ',', len))
    return "a decimal fraction";
  if (s[0] == '-')
    return "negative";
  if (s[0] == '+')
    return "a sign";
  for (size_t i = 0; i < len; i++)
    if (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')
      return "spaces";
  bool digits = true;
  for (size_t i = 0; i < len; i++)
    if (s[i] < '0' || s[i] > '9')
      digits = false;
  if (!digits) {
    bool exp = false;
    for (size_t i = 0; i < len; i++)
      if (s[i] == 'e' || s[i] == 'E')
        exp = true;
    return exp ? "an exponent" : "not digits";
  }
  if (len > 1 && s[0] == '0')
    return "leading zeros";
  return NULL;
}

int tg_money_parse(const char *s, size_t len, int64_t *out, char *err, size_t errlen) {
  char q[QUOTE_MAX * 4 + 8];
  const char *why = why_not(s, len);
  if (why != NULL) {
    quote(s, len, q, sizeof q);
    return fail(-EINVAL, err, errlen, "%s is not an amount in atomic units (%s; " HINT ")", q, why);
  }
  int64_t v = 0;
  for (size_t i = 0; i < len; i++) {
    int d = s[i] - '0';
    if (v > (TG_MONEY_MAX - d) / 10) {
      quote(s, len, q, sizeof q);
      return fail(-ERANGE, err, errlen, "%s is more than 2^53 = %lld atomic units", q, (long long)TG_MONEY_MAX);
    }
    v = v * 10 + d;
  }
  *out = v;
  return 0;
}

int tg_money_from_double(double d, int64_t *out, char *err, size_t errlen) {
  if (!isfinite(d))
    return fail(-EINVAL, err, errlen, "%g is not an amount in atomic units (not finite; " HINT ")", d);
  if (d < 0)
    return fail(-EINVAL, err, errlen, "%.14g is not an amount in atomic units (negative; " HINT ")", d);
  if (d != floor(d))
    return fail(-EINVAL, err, errlen, "%.14g is not an amount in atomic units (a decimal fraction; " HINT ")", d);
  if (d > (double)TG_MONEY_MAX) /* every such double is integral: all digits while they are readable */
    return fail(-ERANGE, err, errlen, d < 1e18 ? "%.0f is more than 2^53 = %lld atomic units"
                                               : "%g is more than 2^53 = %lld atomic units",
                d, (long long)TG_MONEY_MAX);
  *out = (int64_t)d;
  return 0;
}
