#include <errno.h>
#include <pthread.h>
#include <sys/resource.h>
#include <time.h>

#include "catalog/pathtrie.h"
#include "test.h"

#if defined(__SANITIZE_ADDRESS__)
#define UNDER_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define UNDER_ASAN 1
#endif
#endif

static tg_pathtrie_t *build(const char *const *patterns, size_t n) {
  tg_pathtrie_builder_t *b = tg_pathtrie_builder_new();
  if (!b)
    return NULL;
  for (size_t i = 0; i < n; i++)
    if (tg_pathtrie_builder_add(b, patterns[i], strlen(patterns[i]), (uint32_t)i) != 0) {
      tg_pathtrie_builder_free(b);
      return NULL;
    }
  return tg_pathtrie_build(b);
}

/* Values of the matching patterns, most specific first, as "v,v,v". */
static const char *matches(const tg_pathtrie_t *t, const char *path) {
  static char out[512];
  tg_pathtrie_hit_t hits[32];
  size_t n = tg_pathtrie_match(t, path, strlen(path), hits, 32);
  out[0] = '\0';
  for (size_t i = 0; i < n && i < 32; i++)
    snprintf(out + strlen(out), sizeof(out) - strlen(out), "%s%u", i ? "," : "", hits[i].value);
  return out;
}

#define N(a) (sizeof(a) / sizeof((a)[0]))

TEST(exact_and_prefix) {
  const char *p[] = {"/a", "/a/b", "/about$", "/c"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  CHECK_STR(matches(t, "/a"), "0");
  CHECK_STR(matches(t, "/a/b"), "1,0");
  CHECK_STR(matches(t, "/a/bc/d"), "1,0");
  CHECK_STR(matches(t, "/about"), "2,0");
  CHECK_STR(matches(t, "/abouts"), "0");
  CHECK_STR(matches(t, "/"), "");
  CHECK_STR(matches(t, "/b"), "");
  CHECK_STR(matches(t, "/cx"), "3");
  CHECK_STR(matches(t, ""), "");
  CHECK_INT(tg_pathtrie_count(t), 4);
  CHECK(tg_pathtrie_bytes(t) > 0);
  tg_pathtrie_free(t);
}

TEST(dollar_anchor) {
  const char *p[] = {"/x$", "/$", "$", "/a$b"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  CHECK_STR(matches(t, "/x"), "0");
  CHECK_STR(matches(t, "/x/"), "");
  CHECK_STR(matches(t, "/"), "1");
  CHECK_STR(matches(t, ""), "2");
  /* '$' not at the end is literal. */
  CHECK_STR(matches(t, "/a$b"), "3");
  CHECK_STR(matches(t, "/a$bc"), "3");
  CHECK_STR(matches(t, "/ab"), "");
  tg_pathtrie_free(t);
}

TEST(star_middle_and_end) {
  const char *p[] = {"/*.pdf", "/news/*/amp", "/img/*", "/*/private/", "/**z"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  CHECK_STR(matches(t, "/doc.pdf"), "0");
  CHECK_STR(matches(t, "/a/b/doc.pdf?q=1"), "0"); /* no '$': prefix after the glob */
  CHECK_STR(matches(t, "/doc.pd"), "");
  CHECK_STR(matches(t, "/news/2025/11/amp"), "1");
  CHECK_STR(matches(t, "/news//amp"), "1");
  CHECK_STR(matches(t, "/news/amp"), "");
  CHECK_STR(matches(t, "/img"), "");
  CHECK_STR(matches(t, "/img/"), "2");
  CHECK_STR(matches(t, "/img/a/b.png"), "2");
  CHECK_STR(matches(t, "/u/private/x"), "3");
  CHECK_STR(matches(t, "/private/"), "");
  CHECK_STR(matches(t, "/z"), "4");
  CHECK_STR(matches(t, "/aaaz"), "4");
  CHECK_STR(matches(t, "/aaa"), "");
  tg_pathtrie_free(t);
}

TEST(star_with_dollar) {
  const char *p[] = {"/*.pdf$", "/a*$", "*$", "/*b*c$"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  CHECK_STR(matches(t, "/x.pdf"), "0,2");
  CHECK_STR(matches(t, "/x.pdf?"), "2");
  CHECK_STR(matches(t, "/a.pdf.pdf"), "0,1,2");
  CHECK_STR(matches(t, "/abc"), "3,1,2");
  CHECK_STR(matches(t, "/abcbc"), "3,1,2");
  CHECK_STR(matches(t, "/abcb"), "1,2");
  CHECK_STR(matches(t, ""), "2");
  tg_pathtrie_free(t);
}

TEST(most_specific_first_and_ties) {
  /* lengths: 1, 2, 6, 6, 10 */
  const char *p[] = {"/", "/a", "/a/b/c", "/a/*/c", "/a/b/c/d$"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  tg_pathtrie_hit_t h[8];
  size_t n = tg_pathtrie_match(t, "/a/b/c/d", 8, h, 8);
  CHECK_INT(n, 5);
  CHECK_INT(h[0].value, 4);
  CHECK_INT(h[0].specificity, 9);
  CHECK_INT(h[1].value, 2); /* tie at 6: smaller value first */
  CHECK_INT(h[2].value, 3);
  CHECK_INT(h[2].specificity, 6);
  CHECK_INT(h[3].value, 1);
  CHECK_INT(h[4].value, 0);
  /* Truncated: the count is still every match, the kept ones the most specific. */
  n = tg_pathtrie_match(t, "/a/b/c/d", 8, h, 2);
  CHECK_INT(n, 5);
  CHECK_INT(h[0].value, 4);
  CHECK_INT(h[1].value, 2);
  CHECK_INT(tg_pathtrie_match(t, "/a/b/c/d", 8, NULL, 0), 5);
  tg_pathtrie_free(t);
}

TEST(percent_encoding_is_literal) {
  const char *p[] = {"/a%2Fb", "/caf%C3%A9$"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  CHECK_STR(matches(t, "/a%2Fb/c"), "0");
  CHECK_STR(matches(t, "/a/b"), "");
  CHECK_STR(matches(t, "/a%2fb"), "");
  CHECK_STR(matches(t, "/caf%C3%A9"), "1");
  CHECK_STR(matches(t, "/caf\xC3\xA9"), "");
  tg_pathtrie_free(t);
}

TEST(duplicates_keep_both_values) {
  tg_pathtrie_builder_t *b = tg_pathtrie_builder_new();
  CHECK(b);
  CHECK_INT(tg_pathtrie_builder_add(b, "/dup", 4, 7), 0);
  CHECK_INT(tg_pathtrie_builder_add(b, "/dup", 4, 3), 0);
  CHECK_INT(tg_pathtrie_builder_add(b, "/dup", 4, 7), 0);
  CHECK_INT(tg_pathtrie_builder_add(NULL, "/x", 2, 1), -EINVAL);
  CHECK_INT(tg_pathtrie_builder_add(b, NULL, 2, 1), -EINVAL);
  tg_pathtrie_t *t = tg_pathtrie_build(b);
  CHECK(t);
  CHECK_STR(matches(t, "/dup/x"), "3,7,7");
  tg_pathtrie_free(t);
}

TEST(pattern_length_limit) {
  size_t big = (size_t)1 << 20;
  char *p = malloc(big);
  CHECK(p);
  memset(p, 'a', big);
  p[0] = '/';
  tg_pathtrie_builder_t *b = tg_pathtrie_builder_new();
  if (!b)
    free(p);
  CHECK(b);
  int rc_big = tg_pathtrie_builder_add(b, p, big, 1);
  int rc_ok = tg_pathtrie_builder_add(b, p, big - 1, 2);
  tg_pathtrie_t *t = tg_pathtrie_build(b);
  size_t n = t ? tg_pathtrie_match(t, p, big, NULL, 0) : 0;
  size_t n_short = t ? tg_pathtrie_match(t, p, big - 2, NULL, 0) : 0;
  int built = t != NULL;
  tg_pathtrie_free(t);
  free(p);
  CHECK_INT(rc_big, -E2BIG);
  CHECK_INT(rc_ok, 0);
  CHECK(built);
  CHECK_INT(n, 1);
  CHECK_INT(n_short, 0);
}

TEST(empty_trie_and_empty_pattern) {
  tg_pathtrie_t *t = build(NULL, 0);
  CHECK(t);
  CHECK_STR(matches(t, "/anything"), "");
  CHECK_STR(matches(t, ""), "");
  CHECK_INT(tg_pathtrie_count(t), 0);
  tg_pathtrie_free(t);
  const char *p[] = {""};
  t = build(p, 1);
  CHECK(t);
  CHECK_STR(matches(t, ""), "0");
  CHECK_STR(matches(t, "/x"), "0");
  tg_pathtrie_free(t);
  tg_pathtrie_free(NULL);
  tg_pathtrie_builder_free(NULL);
}

TEST(glob_does_not_explode) {
  const char *p[] = {"/*a*a*a*a*a*a*a*a*a*b$", "/*a*a*a*a*a*a*a*a*a*b"};
  tg_pathtrie_t *t = build(p, N(p));
  CHECK(t);
  char path[20001];
  path[0] = '/';
  memset(path + 1, 'a', sizeof(path) - 2);
  path[sizeof(path) - 1] = '\0';
  CHECK_STR(matches(t, path), "");
  path[sizeof(path) - 2] = 'b';
  CHECK_STR(matches(t, path), "0,1");
  tg_pathtrie_free(t);
}

/* The reference: robots.txt matching written as plainly as possible. */
static int ref_glob(const char *p, size_t pl, const char *s, size_t sl, int anchored) {
  if (pl == 0)
    return anchored ? sl == 0 : 1;
  if (p[0] == '*') {
    for (size_t k = 0; k <= sl; k++)
      if (ref_glob(p + 1, pl - 1, s + k, sl - k, anchored))
        return 1;
    return 0;
  }
  return sl > 0 && s[0] == p[0] && ref_glob(p + 1, pl - 1, s + 1, sl - 1, anchored);
}

static int ref_match(const char *pat, const char *path) {
  size_t pl = strlen(pat);
  int anchored = pl > 0 && pat[pl - 1] == '$';
  return ref_glob(pat, anchored ? pl - 1 : pl, path, strlen(path), anchored);
}

static uint64_t rng_state;
static uint32_t rnd(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return (uint32_t)(rng_state >> 11);
}

static void rand_string(char *out, size_t max, const char *alphabet) {
  size_t n = rnd() % max, k = strlen(alphabet);
  for (size_t i = 0; i < n; i++)
    out[i] = alphabet[rnd() % k];
  out[n] = '\0';
}

static int hit_cmp(const void *a, const void *b) {
  const tg_pathtrie_hit_t *x = a, *y = b;
  if (x->specificity != y->specificity)
    return x->specificity > y->specificity ? -1 : 1;
  return x->value < y->value ? -1 : x->value > y->value;
}

TEST(random_against_reference) {
  enum { ROUNDS = 40, PATTERNS = 150, PATHS = 400, MAXH = 160 };
  static char pats[PATTERNS][16];
  rng_state = 0x9e3779b97f4a7c15ull;
  size_t checked = 0, nonempty = 0;
  for (int r = 0; r < ROUNDS; r++) {
    tg_pathtrie_builder_t *b = tg_pathtrie_builder_new();
    CHECK(b);
    for (int i = 0; i < PATTERNS; i++) {
      pats[i][0] = '/';
      rand_string(pats[i] + (rnd() % 4 != 0), 10, "/ab**$");
      CHECK_INT(tg_pathtrie_builder_add(b, pats[i], strlen(pats[i]), (uint32_t)i), 0);
    }
    tg_pathtrie_t *t = tg_pathtrie_build(b);
    CHECK(t);
    for (int k = 0; k < PATHS; k++) {
      char path[24];
      path[0] = '/';
      rand_string(path + (rnd() % 8 != 0), 14, "/ab$");
      tg_pathtrie_hit_t want[MAXH], got[MAXH];
      size_t nw = 0;
      for (int i = 0; i < PATTERNS; i++)
        if (ref_match(pats[i], path))
          want[nw++] = (tg_pathtrie_hit_t){(uint32_t)i, (uint32_t)strlen(pats[i])};
      qsort(want, nw, sizeof(want[0]), hit_cmp);
      size_t ng = tg_pathtrie_match(t, path, strlen(path), got, MAXH);
      if (ng != nw)
        fprintf(stderr, "  path \"%s\": %zu matches, reference %zu\n", path, ng, nw);
      CHECK_INT(ng, nw);
      for (size_t i = 0; i < nw; i++) {
        if (got[i].value != want[i].value)
          fprintf(stderr, "  path \"%s\" hit %zu: pattern \"%s\", reference \"%s\"\n", path, i,
                  pats[got[i].value], pats[want[i].value]);
        CHECK_INT(got[i].value, want[i].value);
        CHECK_INT(got[i].specificity, want[i].specificity);
      }
      checked++;
      nonempty += nw > 0;
    }
    tg_pathtrie_free(t);
  }
  /* The generator must produce real matches, or the comparison proves little. */
  CHECK(nonempty > checked / 4);
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *const words[] = {"climate", "budget",  "election", "football", "recipe",
                                    "market",  "science", "travel",   "health",   "music",
                                    "review",  "startup", "energy",   "housing",  "space"};

/* "/articles/2025/11/<word>-<word>-<id>", one in a hundred a wildcard pattern. */
static size_t catalog_path(char *out, size_t cap, uint32_t i, int pattern) {
  uint32_t h = i * 2654435761u;
  int n = snprintf(out, cap, "/%s/%04u/%02u/%s-%s-%07u", i % 7 ? "articles" : "videos",
                   2010 + h % 16, 1 + (h >> 8) % 12, words[(h >> 12) % N(words)],
                   words[(h >> 16) % N(words)], i);
  if (pattern && i % 100 == 0)
    n += snprintf(out + n, cap - (size_t)n, "*.amp$");
  return (size_t)n;
}

typedef struct {
  const tg_pathtrie_t *t;
  uint32_t start, count;
  int errors;
} reader_t;

static void *reader(void *arg) {
  reader_t *r = arg;
  char path[128];
  for (uint32_t i = r->start; i < r->start + r->count; i++) {
    tg_pathtrie_hit_t h[4];
    size_t len = catalog_path(path, sizeof(path), i, 0);
    if (i % 100 == 0)
      len += (size_t)snprintf(path + len, sizeof(path) - len, "/p.amp");
    size_t n = tg_pathtrie_match(r->t, path, len, h, 4);
    if (n != 1 || h[0].value != i)
      r->errors++;
  }
  return NULL;
}

TEST(million_entries) {
  uint32_t n = 1000000;
#ifdef UNDER_ASAN
  n = 100000;
#endif
  const char *env = getenv("TG_PATHTRIE_N");
  if (env && atoi(env) > 0)
    n = (uint32_t)atoi(env);
  char path[128];
  double t0 = now_s();
  tg_pathtrie_builder_t *b = tg_pathtrie_builder_new();
  CHECK(b);
  size_t pattern_bytes = 0;
  for (uint32_t i = 0; i < n; i++) {
    size_t len = catalog_path(path, sizeof(path), i, 1);
    pattern_bytes += len;
    CHECK_INT(tg_pathtrie_builder_add(b, path, len, i), 0);
  }
  double t1 = now_s();
  tg_pathtrie_t *t = tg_pathtrie_build(b);
  double t2 = now_s();
  CHECK(t);
  CHECK_INT(tg_pathtrie_count(t), n);

  /* Every entry finds itself and only itself: fixed-width ids keep one path
   * from being a prefix of another; the '/' exercises prefix matching. */
  /* Paths are made before the clock starts, so ns/op is the match alone. */
  uint32_t lookups = n, errors = 0;
  char *paths = malloc((size_t)lookups * 64);
  uint8_t *lens = malloc(lookups);
  CHECK(paths && lens);
  for (uint32_t i = 0; i < lookups; i++) {
    char *p = paths + (size_t)i * 64;
    size_t len = catalog_path(p, 64, i, 0);
    if (i % 100 == 0)
      len += (size_t)snprintf(p + len, 64 - len, "/p.amp");
    else
      p[len++] = '/';
    lens[i] = (uint8_t)len;
  }
  double t3 = now_s();
  for (uint32_t i = 0; i < lookups; i++) {
    tg_pathtrie_hit_t h[4];
    size_t m = tg_pathtrie_match(t, paths + (size_t)i * 64, lens[i], h, 4);
    if (m != 1 || h[0].value != i)
      errors++;
  }
  double t4 = now_s();
  free(paths);
  free(lens);
  CHECK_INT(errors, 0);
  tg_pathtrie_hit_t h[4];
  CHECK_INT(tg_pathtrie_match(t, "/articles/2099/", 15, h, 4), 0);
  CHECK_INT(tg_pathtrie_match(t, "/articles", 9, h, 4), 0);

  /* Readers on many threads at once, no lock: the trie is immutable. */
  pthread_t th[4];
  reader_t rd[4];
  for (int i = 0; i < 4; i++) {
    rd[i] = (reader_t){t, (uint32_t)i * (n / 4), n / 4 < 20000 ? n / 4 : 20000, 0};
    CHECK_INT(pthread_create(&th[i], NULL, reader, &rd[i]), 0);
  }
  int thread_errors = 0;
  for (int i = 0; i < 4; i++) {
    pthread_join(th[i], NULL);
    thread_errors += rd[i].errors;
  }
  CHECK_INT(thread_errors, 0);

  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  printf("  pathtrie: %u entries (%.1f pattern bytes avg): add %.3f s, build %.3f s, "
         "%zu bytes (%.1f bytes/entry), match %.0f ns/op, peak RSS of this test %ld MiB\n",
         n, (double)pattern_bytes / n, t1 - t0, t2 - t1, tg_pathtrie_bytes(t),
         (double)tg_pathtrie_bytes(t) / n, (t4 - t3) * 1e9 / lookups, ru.ru_maxrss / 1024);
  tg_pathtrie_free(t);
}
