/* tg_sign_url SECRET EXPRESSION|- URL EXPIRES: prints the URL signed for
 * nginx secure_link (core/signer), or fails. A helper of
 * spec/e2e/signer_nginx_spec.lua until the gateway signs by itself; built by
 * CMake with the build's own flags (sanitizers included). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "signer/signer.h"
int main(int argc, char **argv) {
  char err[256] = "";
  tg_buf_t out = {0};
  if (argc != 5)
    return 2;
  tg_signer_nginx_opts_t o = {.expression = strcmp(argv[2], "-") ? argv[2] : NULL};
  int rc = tg_signer_nginx_sign(&o, argv[1], strlen(argv[1]), argv[3], strtoll(argv[4], NULL, 10),
                                &out, err, sizeof err);
  if (rc != 0) {
    fprintf(stderr, "sign: %d %s\n", rc, err);
    return 1;
  }
  puts(out.data);
  tg_buf_free(&out);
  return 0;
}
