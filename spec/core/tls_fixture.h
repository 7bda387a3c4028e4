#ifndef TG_TLS_FIXTURE_H
#define TG_TLS_FIXTURE_H

/* Throwaway PKI for tests, made with the openssl CLI in a fresh temporary
 * directory: a CA (ca.crt); a server certificate signed by it, naming
 * localhost and 127.0.0.1 as subjectAltNames under an unrelated CN
 * (server.crt, server.key); and an unrelated second CA (other-ca.crt) for
 * verification failures. EC P-256 keeps it fast. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct tls_fixture {
  char dir[64];
  char ca[128], other_ca[128], cert[128], key[128];
} tls_fixture_t;

static int tls_fixture_run(const tls_fixture_t *f, const char *cmd) {
  char line[2048];
  snprintf(line, sizeof line, "cd '%s' && ( %s ) >/dev/null 2>&1", f->dir, cmd);
  return system(line) == 0 ? 0 : -1;
}

static void tls_fixture_remove(tls_fixture_t *f) {
  if (f->dir[0] == '\0')
    return;
  char line[128];
  snprintf(line, sizeof line, "rm -rf '%s'", f->dir);
  if (system(line) != 0)
    fprintf(stderr, "  tls fixture: could not remove %s\n", f->dir);
  f->dir[0] = '\0';
}

/* 0 on success; on failure the directory is removed. */
static int tls_fixture_make(tls_fixture_t *f) {
  memset(f, 0, sizeof *f);
  snprintf(f->dir, sizeof f->dir, "/tmp/tg-tls-XXXXXX");
  if (mkdtemp(f->dir) == NULL)
    return -1;
  static const char *steps[] = {
      "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      " -keyout ca.key -out ca.crt -days 2 -subj /CN=tollgate-test-ca"
      " -addext basicConstraints=critical,CA:TRUE"
      " -addext keyUsage=critical,keyCertSign,cRLSign",
      "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      " -keyout other-ca.key -out other-ca.crt -days 2 -subj /CN=tollgate-other-ca"
      " -addext basicConstraints=critical,CA:TRUE"
      " -addext keyUsage=critical,keyCertSign,cRLSign",
      "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
      " -keyout server.key -out server.csr -subj /CN=tollgate-test-server",
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n"
      "keyUsage=critical,digitalSignature\\nextendedKeyUsage=serverAuth\\n' > server.ext",
      "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial"
      " -out server.crt -days 2 -extfile server.ext",
  };
  for (size_t i = 0; i < sizeof steps / sizeof steps[0]; i++) {
    if (tls_fixture_run(f, steps[i]) != 0) {
      fprintf(stderr, "  tls fixture: failed: %s\n", steps[i]);
      tls_fixture_remove(f);
      return -1;
    }
  }
  snprintf(f->ca, sizeof f->ca, "%s/ca.crt", f->dir);
  snprintf(f->other_ca, sizeof f->other_ca, "%s/other-ca.crt", f->dir);
  snprintf(f->cert, sizeof f->cert, "%s/server.crt", f->dir);
  snprintf(f->key, sizeof f->key, "%s/server.key", f->dir);
  return 0;
}

#endif
