/* libFuzzer target for the request-target normalizer (net/target.h): each
 * input is a request target. Whatever it is, the functions must not crash or
 * read out of bounds, and what they accept must hold the contract: a path
 * that starts with '/', has no "." or ".." segment and no "//", is never
 * longer than its input, gains no '/' (an encoded slash is never decoded),
 * keeps only upper-case %XX of reserved bytes, and normalizes to itself. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "net/target.h"

#define FAIL(...)                                                                              \
  do {                                                                                         \
    fprintf(stderr, "target_fuzz: " __VA_ARGS__);                                             \
    fprintf(stderr, "\n");                                                                     \
    abort();                                                                                   \
  } while (0)

static size_t count(const char *s, size_t n, char ch) {
  size_t k = 0;
  for (size_t i = 0; i < n; i++)
    k += s[i] == ch;
  return k;
}

static int is_hex_upper(char ch) { return (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'F'); }

static int unreserved(int v) {
  return (v >= '0' && v <= '9') || (v >= 'a' && v <= 'z') || (v >= 'A' && v <= 'Z') || v == '-' ||
         v == '.' || v == '_' || v == '~';
}

static void check_path(const char *in, size_t in_len, const char *p, size_t n) {
  if (n == 0 || p[0] != '/')
    FAIL("path does not start with '/'");
  if (n > in_len)
    FAIL("path longer than its input (%zu > %zu)", n, in_len);
  if (p[n] != '\0' || memchr(p, '\0', n))
    FAIL("path not NUL-terminated or holds a NUL");
  if (count(p, n, '/') > count(in, in_len, '/'))
    FAIL("a '/' appeared that the input did not have (decoded %%2F?)");
  for (size_t i = 0; i < n; i++) {
    unsigned char ch = (unsigned char)p[i];
    if (ch < 0x21 || ch > 0x7e || ch == '\\' || ch == '#' || ch == '?')
      FAIL("byte 0x%02x in the path", ch);
    if (ch == '/' && i + 1 < n && p[i + 1] == '/')
      FAIL("\"//\" in the path");
    if (ch == '%') {
      if (i + 2 >= n || !is_hex_upper(p[i + 1]) || !is_hex_upper(p[i + 2]))
        FAIL("%% not followed by two upper-case hex digits");
      int v = (p[i + 1] <= '9' ? p[i + 1] - '0' : p[i + 1] - 'A' + 10) * 16 +
              (p[i + 2] <= '9' ? p[i + 2] - '0' : p[i + 2] - 'A' + 10);
      if (unreserved(v) || v == '/' || v == 0 || v == '\\')
        FAIL("%%%c%c kept encoded", p[i + 1], p[i + 2]);
    }
  }
  /* No dot segment: every segment is checked between slashes. */
  for (size_t i = 0; i < n;) {
    size_t j = i + 1;
    while (j < n && p[j] != '/')
      j++;
    size_t len = j - i - 1;
    const char *seg = p + i + 1;
    if ((len == 1 && seg[0] == '.') || (len == 2 && seg[0] == '.' && seg[1] == '.'))
      FAIL("dot segment left in %.*s", (int)(n > 200 ? 200 : n), p);
    i = j;
  }
  /* Idempotent, and the same in place. */
  char *again = malloc(n + 1);
  size_t n2;
  const char *why;
  if (tg_target_path(p, n, again, &n2, &why) != 0)
    FAIL("normalized path refused on a second pass: %s", why);
  if (n2 != n || memcmp(again, p, n) != 0)
    FAIL("not idempotent");
  memcpy(again, p, n);
  if (tg_target_path(again, n, again, &n2, &why) != 0 || n2 != n || memcmp(again, p, n) != 0)
    FAIL("in-place normalization differs");
  free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  const char *in = (const char *)data;
  /* The path normalizer alone, into a separate buffer and in place. */
  char *out = malloc(size + 1);
  size_t n;
  const char *why = NULL;
  int rc = tg_target_path(in, size, out, &n, &why);
  if (rc == 0) {
    check_path(in, size, out, n);
  } else if (why == NULL) {
    FAIL("refused without a reason");
  }
  char *inplace = malloc(size + 1);
  if (size)
    memcpy(inplace, in, size);
  size_t n3;
  int rc3 = tg_target_path(inplace, size, inplace, &n3, &why);
  if (rc3 != rc || (rc == 0 && (n3 != n || memcmp(inplace, out, n) != 0)))
    FAIL("in place and out of place disagree");
  free(inplace);
  free(out);

  /* The whole target: origin-, absolute- or asterisk-form. */
  char *buf = malloc(size + 4);
  tg_target_t t;
  if (tg_target_parse(in, size, buf, &t, &why) == 0) {
    if (t.asterisk) {
      if (size != 1 || strcmp(t.path, "*") != 0)
        FAIL("asterisk-form from something else");
    } else {
      /* "http://h" gets path "/": the only path that may not come from the input. */
      if (!(t.host && t.path_len == 1 && t.path[0] == '/'))
        check_path(in, size, t.path, t.path_len);
    }
    if (t.query) {
      if (t.query[t.query_len] != '\0' || memchr(t.query, '#', t.query_len))
        FAIL("query not terminated or holds '#'");
      if (t.query_len >= size || memcmp(in + size - t.query_len, t.query, t.query_len) != 0 ||
          in[size - t.query_len - 1] != '?')
        FAIL("query is not the input's tail after '?'");
    }
    if (t.host) {
      char *h2 = malloc(t.host_len + 1);
      size_t hn;
      if (t.host_len == 0 || tg_target_host(t.host, t.host_len, h2, &hn, &why) != 0 ||
          hn != t.host_len || memcmp(h2, t.host, hn) != 0)
        FAIL("authority not normalized");
      free(h2);
    }
  }
  free(buf);
  return 0;
}
