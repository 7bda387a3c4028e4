#ifndef TG_TEST_H
#define TG_TEST_H

/* A very small unit-test runner: tests register themselves, main runs them
 * all (or those named on the command line) and prints "N passed, N failed".
 * A test fails on its first failed CHECK. A run that ran no test (none
 * registered, or no name matched) fails, as "0 passed, 1 failed": a test
 * binary that checks nothing must not read as green. There is no skip: a
 * test that cannot run its check fails. */

#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct tg_test {
  const char *name;
  void (*fn)(int *failed);
  struct tg_test *next;
} tg_test_t;

static tg_test_t *tg_tests_head, **tg_tests_tail = &tg_tests_head;

#define TEST(name)                                                                             \
  static void test_##name(int *tg_failed_);                                                    \
  static tg_test_t tg_test_rec_##name = {#name, test_##name, NULL};                            \
  __attribute__((constructor)) static void tg_test_reg_##name(void) {                          \
    *tg_tests_tail = &tg_test_rec_##name;                                                      \
    tg_tests_tail = &tg_test_rec_##name.next;                                                  \
  }                                                                                            \
  static void test_##name(int *tg_failed_)

#define CHECK(cond)                                                                            \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      fprintf(stderr, "  %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond);               \
      *tg_failed_ = 1;                                                                         \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

#define CHECK_INT(a, b)                                                                        \
  do {                                                                                         \
    long long a_ = (long long)(a), b_ = (long long)(b);                                        \
    if (a_ != b_) {                                                                            \
      fprintf(stderr, "  %s:%d: %s == %lld, expected %s == %lld\n", __FILE__, __LINE__, #a, a_, \
              #b, b_);                                                                         \
      *tg_failed_ = 1;                                                                         \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

#define CHECK_STR(a, b)                                                                        \
  do {                                                                                         \
    const char *a_ = (a), *b_ = (b);                                                           \
    if (a_ == NULL || b_ == NULL || strcmp(a_, b_) != 0) {                                     \
      fprintf(stderr, "  %s:%d: %s == \"%s\", expected \"%s\"\n", __FILE__, __LINE__, #a,       \
              a_ ? a_ : "(null)", b_ ? b_ : "(null)");                                         \
      *tg_failed_ = 1;                                                                         \
      return;                                                                                  \
    }                                                                                          \
  } while (0)

int main(int argc, char **argv) {
  int passed = 0, failed = 0;
  /* As the gateway does (core/main.c): a peer that closes while a test writes
   * is an error to see, not a signal that kills the whole test binary. */
  signal(SIGPIPE, SIG_IGN);
  for (tg_test_t *t = tg_tests_head; t; t = t->next) {
    if (argc > 1) {
      int want = 0;
      for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], t->name) == 0)
          want = 1;
      if (!want)
        continue;
    }
    int f = 0;
    t->fn(&f);
    printf("%s %s\n", f ? "FAIL" : "ok  ", t->name);
    fflush(stdout);
    if (f)
      failed++;
    else
      passed++;
  }
  if (passed + failed == 0) {
    fprintf(stderr, "no test ran%s\n", argc > 1 ? ": no test has the name given" : "");
    printf("0 passed, 1 failed\n");
    return 1;
  }
  printf("%d passed, %d failed\n", passed, failed);
  return failed ? 1 : 0;
}

#endif
