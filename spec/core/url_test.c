#include "net/url.h"

#include <errno.h>
#include <string.h>

#include "test.h"

/* What the outbound client, the proxy and a payments section all accept. */
TEST(parses_the_parts) {
  tg_url_t u;
  CHECK_INT(tg_url_parse("http://facil.example:4021/base/path?q=1#frag", &u), 0);
  CHECK_INT(u.tls, 0);
  CHECK(u.host_len == 13 && memcmp(u.host, "facil.example", 13) == 0);
  CHECK_INT(u.port, 4021);
  CHECK(u.target_len == 14 && memcmp(u.target, "/base/path?q=1", 14) == 0);
  CHECK_INT(tg_url_parse("HTTPS://Example.COM", &u), 0);
  CHECK_INT(u.tls, 1);
  CHECK_INT(u.port, 443);
  CHECK_INT(u.target_len, 0);
  CHECK_INT(tg_url_parse("http://[::1]:8545/", &u), 0);
  CHECK_INT(u.bracketed, 1);
  CHECK(u.host_len == 3 && memcmp(u.host, "::1", 3) == 0);
  CHECK_INT(u.port, 8545);
  CHECK_INT(tg_url_parse("http://127.0.0.1:1", &u), 0);
  CHECK_INT(u.port, 1);
}

/* Each refusal leaves u as it was. */
TEST(refuses_what_no_client_should_reach) {
  static const char *const bad[] = {
      "", "ftp://a", "http://", "https:///x", "http://a b", "http://a\r\nX: y", "http://a\x7f",
      "http://u:p@a/", "http://a:0", "http://a:65536", "http://a:99999999999999999999", "http://a:8x",
      "http://[::zz]/", "http://[::1", "http://[::1]x/", "http://a%2Fb/", "http://a;b/"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    tg_url_t u = {.port = 7};
    if (tg_url_parse(bad[i], &u) != -EINVAL || u.port != 7) {
      fprintf(stderr, "  accepted or touched u: \"%s\"\n", bad[i]);
      CHECK(0);
    }
  }
  char long_host[300] = "http://";
  memset(long_host + 7, 'a', 254); /* one past the longest DNS name */
  long_host[7 + 254] = '\0';
  tg_url_t u;
  CHECK_INT(tg_url_parse(long_host, &u), -EINVAL);
  long_host[7 + 253] = '\0';
  CHECK_INT(tg_url_parse(long_host, &u), 0);
}
