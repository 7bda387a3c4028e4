/* libFuzzer target for the Host / authority parser (net/target.h): each input
 * is a Host header value. No crash or out-of-bounds read whatever it is, and
 * what it accepts is lower-case, bounded, made of host characters only, holds
 * no userinfo, has a port of at most 65535 without leading zeros, is never
 * longer than its input, and normalizes to itself. */
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net/target.h"

#define FAIL(...)                                                                              \
  do {                                                                                         \
    fprintf(stderr, "host_fuzz: " __VA_ARGS__);                                               \
    fprintf(stderr, "\n");                                                                     \
    abort();                                                                                   \
  } while (0)

static void check(const char *in, size_t size, const char *h, size_t n) {
  if (n > size)
    FAIL("longer than the input");
  if (h[n] != '\0' || memchr(h, '\0', n))
    FAIL("not NUL-terminated or holds a NUL");
  if (n == 0) {
    if (size != 0)
      FAIL("a non-empty input gave an empty host");
    return;
  }
  size_t name_end = n;
  if (h[0] == '[') {
    const char *close = memchr(h, ']', n);
    if (close == NULL)
      FAIL("unclosed IPv6 literal");
    char lit[64];
    size_t ln = (size_t)(close - h) - 1;
    if (ln >= sizeof lit)
      FAIL("IPv6 literal too long");
    memcpy(lit, h + 1, ln);
    lit[ln] = '\0';
    unsigned char a[16];
    if (inet_pton(AF_INET6, lit, a) != 1)
      FAIL("accepted an invalid IPv6 literal %s", lit);
    name_end = (size_t)(close - h) + 1;
  } else {
    const char *colon = memchr(h, ':', n);
    if (colon)
      name_end = (size_t)(colon - h);
    if (name_end == 0 || name_end > 253 || h[name_end - 1] == '.' || h[0] == '.')
      FAIL("bad name length or dot at an end");
  }
  for (size_t i = 0; i < name_end; i++) {
    char ch = h[i];
    if (ch >= 'A' && ch <= 'Z')
      FAIL("upper case kept");
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' ||
          ch == '.' || ch == ':' || ch == '[' || ch == ']'))
      FAIL("byte 0x%02x in the host", (unsigned char)ch);
    if (ch == '.' && i + 1 < name_end && h[i + 1] == '.')
      FAIL("empty label");
  }
  if (name_end < n) {
    if (h[name_end] != ':' || name_end + 1 == n)
      FAIL("junk after the host, or an empty port kept");
    const char *port = h + name_end + 1;
    size_t pn = n - name_end - 1;
    if (pn > 5 || (pn > 1 && port[0] == '0'))
      FAIL("port with leading zeros or too long");
    unsigned long v = 0;
    for (size_t i = 0; i < pn; i++) {
      if (port[i] < '0' || port[i] > '9')
        FAIL("non-digit in the port");
      v = v * 10 + (unsigned long)(port[i] - '0');
    }
    if (v > 65535)
      FAIL("port over 65535");
  }
  if (memchr(in, '@', size))
    FAIL("accepted userinfo");
  char *again = malloc(n + 1);
  size_t n2;
  const char *why;
  if (tg_target_host(h, n, again, &n2, &why) != 0 || n2 != n || memcmp(again, h, n) != 0)
    FAIL("not idempotent");
  free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *in = (const char *)data;
  char *out = malloc(size + 1);
  size_t n;
  const char *why = NULL;
  int rc = tg_target_host(in, size, out, &n, &why);
  if (rc == 0)
    check(in, size, out, n);
  else if (why == NULL)
    FAIL("refused without a reason");
  /* In place gives the same. */
  char *inplace = malloc(size + 1);
  if (size)
    memcpy(inplace, in, size);
  size_t n2;
  int rc2 = tg_target_host(inplace, size, inplace, &n2, &why);
  if (rc2 != rc || (rc == 0 && (n2 != n || memcmp(inplace, out, n) != 0)))
    FAIL("in place and out of place disagree");
  free(inplace);
  free(out);
  return 0;
}
