#include "catalog/offerkey.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <fcntl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <mbedtls/platform_util.h>

#include "base/hex.h"
#include "base/log.h"

/* mkdir -p with mode 0700 for the folders it makes. */
static void mkdir_p(const char *dir) {
  char tmp[1024];
  snprintf(tmp, sizeof tmp, "%s", dir);
  for (char *p = tmp + 1; *p; p++) {
    if (*p == '/') {
      *p = '\0';
      mkdir(tmp, 0700);
      *p = '/';
    }
  }
  mkdir(tmp, 0700);
}

static int load_existing(tg_offer_keyring_t *k, const char *path, int fd, char *err, size_t errlen) {
  char hex[66];
  ssize_t n = read(fd, hex, sizeof hex);
  close(fd);
  /* 64 digits, and at most one trailing newline (an operator's echo). */
  int ok = (n == 64 || (n == 65 && hex[64] == '\n')) && tg_offer_keyring_add_hex(k, 1, hex, 64) == 0;
  mbedtls_platform_zeroize(hex, sizeof hex);
  if (!ok) {
    snprintf(err, errlen, "%s: expected 64 hex digits", path);
    return -EINVAL;
  }
  return 0;
}

int tg_offerkey_load(tg_offer_keyring_t *k, const char *data_dir, char *err, size_t errlen) {
  tg_offer_keyring_init(k);
  char path[1100];
  if (data_dir) {
    snprintf(path, sizeof path, "%s/offer.key", data_dir);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0)
      return load_existing(k, path, fd, err, errlen);
    if (errno != ENOENT) {
      snprintf(err, errlen, "%s: %s", path, strerror(errno));
      return -EIO;
    }
  }
  uint8_t raw[32];
  char hex[65];
  int rc = 0;
  if (getrandom(raw, sizeof raw, 0) != (ssize_t)sizeof raw) {
    snprintf(err, errlen, "no randomness for the offer key");
    return -EIO;
  }
  if (tg_offer_keyring_add(k, 1, raw, sizeof raw) != 0) {
    rc = -EINVAL;
    goto out;
  }
  if (data_dir == NULL) {
    tg_log(TG_LOG_WARN, "no data_dir: offer ids are signed with a key that dies with the process", NULL);
    goto out;
  }
  tg_hex_encode(raw, 32, hex);
  mkdir_p(data_dir);
  /* Written whole under a temporary name, then linked into place: another
   * instance sharing data_dir never reads a half-written key, and the one
   * that links second takes the first one's key. */
  char tmp[1200];
  snprintf(tmp, sizeof tmp, "%s.%ld.tmp", path, (long)getpid());
  int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0 || write(fd, hex, 64) != 64 || fsync(fd) != 0) {
    snprintf(err, errlen, "%s: cannot write the offer key: %s", tmp, strerror(errno));
    if (fd >= 0)
      close(fd);
    unlink(tmp);
    rc = -EIO;
    goto out;
  }
  close(fd);
  int linked = link(tmp, path);
  int link_errno = errno;
  unlink(tmp);
  if (linked != 0 && link_errno == EEXIST) {
    tg_offer_keyring_clear(k);
    tg_offer_keyring_init(k);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      snprintf(err, errlen, "%s: %s", path, strerror(errno));
      rc = -EIO;
    } else {
      rc = load_existing(k, path, fd, err, errlen);
    }
  } else if (linked != 0) {
    snprintf(err, errlen, "%s: cannot write the offer key: %s", path, strerror(link_errno));
    rc = -EIO;
  }
out:
  mbedtls_platform_zeroize(hex, sizeof hex);
  mbedtls_platform_zeroize(raw, sizeof raw);
  return rc;
}
