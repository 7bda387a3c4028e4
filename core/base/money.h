#ifndef TG_MONEY_H
#define TG_MONEY_H

#include <stddef.h>
#include <stdint.h>

/* Amounts of money as the gateway holds them: an integer count of the
 * asset's atomic units (micro-USD for USD; USDC has 6 decimals, so 1000 is
 * 0.001 USDC), never a float. These readers are strict on purpose: what they
 * refuse is an error for the caller to report, never an amount of 0 (a price
 * that does not parse must not read as free). Pure functions, any thread. */

/* The largest amount: 2^53, the last integer a double holds exactly. Policies
 * see amounts as Lua numbers and many JSON clients as doubles, so a larger
 * amount would be priced as something else than what was configured. */
#define TG_MONEY_MAX INT64_C(9007199254740992)

/* Reads len bytes of s (need not be NUL-terminated) as an amount: "0", or a
 * digit 1-9 followed by digits, at most TG_MONEY_MAX. Nothing else: no sign,
 * spaces, leading zeros, decimal point, exponent or digit separators.
 * Returns 0 with *out set; or -EINVAL (not that form) or -ERANGE (above
 * TG_MONEY_MAX) with *out unchanged and err holding why, quoting s (e.g.
 * "\"0.001\" is not an amount in atomic units (a decimal fraction; an
 * integer: 1000 = 0.001 USDC at 6 decimals)"). err may be NULL. */
int tg_money_parse(const char *s, size_t len, int64_t *out, char *err, size_t errlen);

/* The same for a number (Lua's or JSON's): a finite integral value in
 * 0..TG_MONEY_MAX. 1e3 is 1000 here, since a number has no spelling left. */
int tg_money_from_double(double d, int64_t *out, char *err, size_t errlen);

#endif
