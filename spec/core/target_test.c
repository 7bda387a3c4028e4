/* The request-target and Host normalizer (net/target.h), as pure functions:
 * what each spelling becomes, and what is refused. */
#include "net/target.h"
#include "test.h"

/* Normalizes in; NULL when refused. Returns a static buffer. */
static const char *path_of(const char *in) {
  static char out[512];
  size_t n;
  const char *why;
  return tg_target_path(in, strlen(in), out, &n, &why) == 0 ? out : NULL;
}

static const char *host_of(const char *in) {
  static char out[512];
  size_t n;
  const char *why;
  return tg_target_host(in, strlen(in), out, &n, &why) == 0 ? out : NULL;
}

TEST(paths) {
  struct {
    const char *in, *out;
  } cases[] = {
      {"/", "/"},
      {"/a/b", "/a/b"},
      {"/a/./b", "/a/b"},
      {"/a/../b", "/b"},
      {"/a/b/..", "/a/"},
      {"/a/b/.", "/a/b/"},
      {"/a/b/../..", "/"},
      {"/./", "/"},
      {"/a/%2e%2E/b", "/b"},
      {"/a/.%2e", "/"},
      {"/%7Euser/%41%62", "/~user/Ab"},
      {"/a%3a%3A%c3%a9", "/a%3A%3A%C3%A9"},
      {"/%25", "/%25"},
      {"/%252e", "/%252e"},
      {"//a///b//", "/a/b/"},
      {"/a//../b", "/b"},
      {"/...", "/..."},
      {"/a/..b/.c", "/a/..b/.c"},
      {"/a;p=1/b", "/a;p=1/b"},
      {"/a|b^c[d]", "/a|b^c[d]"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    CHECK_STR(path_of(cases[i].in), cases[i].out);
  const char *refused[] = {
      "", "a", "*", "/..", "/a/../..", "/%2e%2e", "/a%2Fb", "/a%2f", "/a%5cb", "/a%00", "/%",
      "/%4", "/%g0", "/a\\b", "/a#b", "/a?b", "/a b", "/a\x7f", "/a\x80", "/x/..;/y", "/x/.;/y",
      "/..;", "/a\tb",
  };
  for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
    if (path_of(refused[i]) != NULL) {
      fprintf(stderr, "  accepted %s\n", refused[i]);
      CHECK(0);
    }
  }
  /* In place gives the same. */
  char buf[] = "/x/%2e/y/../%7a";
  size_t n;
  const char *why;
  CHECK_INT(tg_target_path(buf, strlen(buf), buf, &n, &why), 0);
  CHECK_STR(buf, "/x/z");
}

TEST(hosts) {
  struct {
    const char *in, *out;
  } cases[] = {
      {"", ""},
      {"api.example", "api.example"},
      {"API.Example", "api.example"},
      {"api.example.", "api.example"},
      {"api.example:8080", "api.example:8080"},
      {"api.example:0080", "api.example:80"},
      {"api.example:0", "api.example:0"},
      {"api.example:", "api.example"},
      {"127.0.0.1:65535", "127.0.0.1:65535"},
      {"[::1]", "[::1]"},
      {"[::1]:443", "[::1]:443"},
      {"[2001:DB8::A]", "[2001:db8::a]"},
      {"[::ffff:1.2.3.4]", "[::ffff:1.2.3.4]"},
      {"my_host-1", "my_host-1"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    CHECK_STR(host_of(cases[i].in), cases[i].out);
  const char *refused[] = {
      ".", "a..b", ".a", ":80", "a:65536", "a:000080", "a:8o", "a:-1", "a:80:80", "a b", "a/b",
      "a\\b", "user@a", "a@b:80", "a%41", "[::1", "[::1]x", "[::1]]", "[fe80::1%25eth0]", "[v1.x]",
      "[1.2.3.4]", "[]", "a\xc3\xa9", "a\r\nb",
  };
  for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
    if (host_of(refused[i]) != NULL) {
      fprintf(stderr, "  accepted host %s\n", refused[i]);
      CHECK(0);
    }
  }
  char long_name[300];
  memset(long_name, 'a', sizeof long_name - 1);
  long_name[sizeof long_name - 1] = '\0';
  CHECK(host_of(long_name) == NULL);
}

TEST(targets) {
  char out[256];
  tg_target_t t;
  const char *why;
  const char *in = "http://API.example:0443/a/../b?x=/../y";
  CHECK_INT(tg_target_parse(in, strlen(in), out, &t, &why), 0);
  CHECK_STR(t.path, "/b");
  CHECK_STR(t.query, "x=/../y");
  CHECK_STR(t.host, "api.example:443");
  CHECK_INT(t.host_len, 15);
  in = "https://h";
  CHECK_INT(tg_target_parse(in, strlen(in), out, &t, &why), 0);
  CHECK_STR(t.path, "/");
  CHECK(t.query == NULL);
  in = "/p?";
  CHECK_INT(tg_target_parse(in, strlen(in), out, &t, &why), 0);
  CHECK_STR(t.path, "/p");
  CHECK_STR(t.query, "");
  CHECK(t.host == NULL);
  in = "*";
  CHECK_INT(tg_target_parse(in, strlen(in), out, &t, &why), 0);
  CHECK(t.asterisk);
  const char *refused[] = {
      "", "?a", "p", "**", "host:443", "ftp://h/", "ws://h/", "http:/h", "http://", "http:///p",
      "http://u@h/", "http://h#f", "/a#f", "/a?b#f", "/a?b c", "/a?\xc3\xa9", "http://h:99999/",
  };
  for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
    why = NULL;
    if (tg_target_parse(refused[i], strlen(refused[i]), out, &t, &why) == 0 || why == NULL) {
      fprintf(stderr, "  accepted target %s\n", refused[i]);
      CHECK(0);
    }
  }
}
