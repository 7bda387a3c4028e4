#ifndef TG_TEST_TMPFILES_H
#define TG_TEST_TMPFILES_H

/* Files a C test writes (policies, configurations): one private folder per
 * test process, made on first use and removed at exit; each write replaces
 * its file atomically (a rename, as an editor or a deploy would). Paths
 * returned are valid until eight more have been asked for. Test code only:
 * any failure aborts. */

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "base/log.h"

static char tg_tmpdir_[256];

static void tg_tmpdir_remove_(void) {
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tg_tmpdir_);
  if (system(cmd) != 0)
    fprintf(stderr, "could not remove %s\n", tg_tmpdir_);
}

/* TMPDIR/name. */
static const char *tmp_path(const char *name) {
  static char paths[8][1024];
  static int next;
  if (tg_tmpdir_[0] == '\0') {
    snprintf(tg_tmpdir_, sizeof tg_tmpdir_, "/tmp/tg_test.XXXXXX");
    if (mkdtemp(tg_tmpdir_) == NULL)
      abort();
    atexit(tg_tmpdir_remove_);
  }
  char *p = paths[next++ % 8];
  if ((size_t)snprintf(p, sizeof paths[0], "%s/%s", tg_tmpdir_, name) >= sizeof paths[0])
    abort();
  return p;
}

/* Writes src to TMPDIR/name; returns the path. */
static const char *tmp_write(const char *name, const char *src) {
  const char *path = tmp_path(name);
  char tmp[1100];
  snprintf(tmp, sizeof tmp, "%s.tmp", path);
  FILE *f = fopen(tmp, "wb");
  if (f == NULL)
    abort();
  fwrite(src, 1, strlen(src), f);
  fclose(f);
  if (rename(tmp, path) != 0)
    abort();
  return path;
}

/* Logs of the code under test go to /dev/null. */
static void quiet_logs(void) {
  static int fd = -1;
  if (fd < 0)
    fd = open("/dev/null", O_WRONLY);
  tg_log_set_fd(fd);
}

/* Seconds on the monotonic clock. */
static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#endif
