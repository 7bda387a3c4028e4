/* libFuzzer target for the facilitator reply parsers (pay/facil.h): each
 * input is a /verify answer and a /settle answer. Whatever it is: no crash or
 * out-of-bounds read (the input is a copy of exactly size bytes, not
 * NUL-terminated), a documented code (0 or -EBADMSG) with the status it
 * implies, every string field NUL-terminated and printable, and what is
 * accepted holds its promises: OK verify carries a payer that is "" or
 * 0x + 40 hex; OK settle a transaction 0x + 64 hex; PENDING a transaction ""
 * or of that form; a refusal always carries a reason. Parsing is
 * deterministic: the same bytes give the same result. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pay/facil.h"

#define FAIL(...)                                                                                  \
  do {                                                                                             \
    fprintf(stderr, "facil_reply_fuzz: " __VA_ARGS__);                                             \
    fprintf(stderr, "\n");                                                                         \
    abort();                                                                                       \
  } while (0)

static int hexdigit(char c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static int hex_form(const char *s, size_t digits) {
  if (strlen(s) != 2 + digits || s[0] != '0' || s[1] != 'x')
    return 0;
  for (size_t i = 2; i < 2 + digits; i++)
    if (!hexdigit(s[i]))
      return 0;
  return 1;
}

static void text(const char *what, const char *s, size_t cap) {
  const char *end = memchr(s, '\0', cap);
  if (end == NULL)
    FAIL("%s is not NUL-terminated", what);
  for (; s < end; s++)
    if (*s < 0x20 || *s > 0x7e)
      FAIL("%s holds byte 0x%02x", what, (unsigned char)*s);
}

static void common(const tg_facil_result_t *r, int rc) {
  text("reason", r->reason, sizeof r->reason);
  text("payer", r->payer, sizeof r->payer);
  text("transaction", r->transaction, sizeof r->transaction);
  text("network", r->network, sizeof r->network);
  if (r->facilitator != NULL || r->cached || r->maybe_settled || r->http_status || r->attempts)
    FAIL("a parser set a pool field");
  if (rc != 0 && rc != -EBADMSG)
    FAIL("undocumented code %d", rc);
  if ((rc == -EBADMSG) != (r->status == TG_FACIL_BAD_REPLY))
    FAIL("code %d with status %d", rc, r->status);
  if (rc == -EBADMSG && (r->payer[0] || r->transaction[0] || r->network[0] || r->reason[0] == '\0'))
    FAIL("a bad reply kept fields or has no reason");
  if (r->payer[0] && !hex_form(r->payer, 40))
    FAIL("payer %s", r->payer);
  if (r->transaction[0] && !hex_form(r->transaction, 64))
    FAIL("transaction %s", r->transaction);
  if (r->status == TG_FACIL_REFUSED && r->reason[0] == '\0')
    FAIL("a refusal without a reason");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *copy = malloc(size ? size : 1); /* exactly size bytes: ASan sees any overread */
  if (copy == NULL)
    return 0;
  if (size)
    memcpy(copy, data, size);
  static tg_facil_result_t r, again;

  memset(&r, 0xa5, sizeof r);
  int rc = tg_facil_parse_verify(size ? copy : NULL, size, &r);
  common(&r, rc);
  if (r.status != TG_FACIL_OK && r.status != TG_FACIL_REFUSED && r.status != TG_FACIL_BAD_REPLY)
    FAIL("verify status %d", r.status);
  if (r.transaction[0] || r.network[0])
    FAIL("verify set a settle field");
  memset(&again, 0x5a, sizeof again);
  if (tg_facil_parse_verify(size ? copy : NULL, size, &again) != rc ||
      memcmp(&r, &again, sizeof r) != 0)
    FAIL("verify is not deterministic");

  memset(&r, 0xa5, sizeof r);
  rc = tg_facil_parse_settle(size ? copy : NULL, size, &r);
  common(&r, rc);
  if (r.status == TG_FACIL_OK && !hex_form(r.transaction, 64))
    FAIL("settled without a transaction");
  if (r.status == TG_FACIL_BUSY || r.status == TG_FACIL_UNAVAILABLE)
    FAIL("settle status %d", r.status);
  memset(&again, 0x5a, sizeof again);
  if (tg_facil_parse_settle(size ? copy : NULL, size, &again) != rc ||
      memcmp(&r, &again, sizeof r) != 0)
    FAIL("settle is not deterministic");
  free(copy);
  return 0;
}
