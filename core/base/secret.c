#include "base/secret.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "base/log.h"

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

char *tg_secret_read(const char *path, const char *what, int flags, char *err, size_t errlen) {
  char buf[TG_SECRET_MAX + 1];
  char *secret = NULL;
  struct stat st;
  size_t n = 0;
  int fd = -1;
  if (path == NULL) {
    snprintf(err, errlen, "no file is configured for the %s", what);
    return NULL;
  }
  /* O_NONBLOCK: a FIFO put in place of the file must not hang the start. */
  fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0 || fstat(fd, &st) != 0) {
    snprintf(err, errlen, "%s: cannot read the %s: %s", path, what, strerror(errno));
    goto done;
  }
  if (!S_ISREG(st.st_mode)) {
    snprintf(err, errlen, "%s: the %s file is not a regular file", path, what);
    goto done;
  }
  for (;;) {
    ssize_t r = read(fd, buf + n, sizeof buf - n);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      snprintf(err, errlen, "%s: cannot read the %s: %s", path, what, strerror(errno));
      goto done;
    }
    if (r == 0)
      break;
    n += (size_t)r;
    if (n > TG_SECRET_MAX) {
      snprintf(err, errlen, "%s: the %s file is larger than %d bytes", path, what, TG_SECRET_MAX);
      goto done;
    }
  }
  size_t a = 0, b = n;
  while (a < b && is_space(buf[a]))
    a++;
  while (b > a && is_space(buf[b - 1]))
    b--;
  if (a == b) {
    snprintf(err, errlen, "%s: the %s file is empty", path, what);
    goto done;
  }
  for (size_t i = a; i < b; i++) {
    unsigned char c = (unsigned char)buf[i];
    if (c == 0 || ((flags & TG_SECRET_TOKEN) && (c <= ' ' || c == 0x7f))) {
      snprintf(err, errlen, "%s: the %s contains white space or control characters", path, what);
      goto done;
    }
  }
  if ((secret = strndup(buf + a, b - a)) == NULL) {
    snprintf(err, errlen, "out of memory");
    goto done;
  }
  /* Kubernetes mounts secrets 0644 by default: worth a warning, not a refusal. */
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    tg_log(TG_LOG_WARN, "secret file is accessible to group or others; chmod 600 it", "path", path,
           "secret", what, NULL);
done:
  explicit_bzero(buf, sizeof buf);
  if (fd >= 0)
    close(fd);
  return secret;
}

void tg_secret_free(char *s) {
  if (s == NULL)
    return;
  explicit_bzero(s, strlen(s));
  free(s);
}

int tg_secret_exposed(const char *path) {
  struct stat st;
  return path && stat(path, &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0;
}
