/* libFuzzer target for the JSON-RPC batch reply parser (pay/chain.h,
 * tg_chain_parse_reply): each input is a reply body, read for chain 84532
 * (0x14a34). Whatever it is:
 *   - the code is one of the documented ones (0, -EPROTO, -EREMOTEIO, -EXDEV),
 *     the same on a second read, and out is zeroed on any error;
 *   - what is accepted is refused for another chain id (-EXDEV): an answer
 *     never passes without its eth_chainId being the chain asked for;
 *   - what is accepted names a nonce state that came from a 0 or 1 word: the
 *     input holds the id-3 result spelled as one of those words.
 * Useful seeds are batch replies such as
 *   [{"jsonrpc":"2.0","id":1,"result":"0x14a34"},
 *    {"jsonrpc":"2.0","id":2,"result":"0x<64 hex>"},
 *    {"jsonrpc":"2.0","id":3,"result":"0x<63 zeros>1"}]
 * in any order, with error objects in their places. Any breach aborts. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pay/chain.h"

#define CHAIN 84532u

#define FAIL(...)                                                                                            \
  do {                                                                                                       \
    fprintf(stderr, "rpc_reply_fuzz: " __VA_ARGS__);                                                         \
    fprintf(stderr, "\n");                                                                                   \
    abort();                                                                                                 \
  } while (0)

static int documented(int rc) { return rc == 0 || rc == -EPROTO || rc == -EREMOTEIO || rc == -EXDEV; }

static int zero(const tg_chain_state_t *st) {
  for (size_t i = 0; i < 32; i++)
    if (st->balance[i])
      return 0;
  return !st->nonce_used;
}

/* The bytes of "0x" + 63 zeros + digit d, case-insensitive on the x only by being exact. */
static int holds_word(const uint8_t *data, size_t size, char d) {
  static char w[67];
  memcpy(w, "0x", 2);
  memset(w + 2, '0', 63);
  w[65] = d;
  w[66] = '\0';
  for (size_t i = 0; i + 66 <= size; i++)
    if (memcmp(data + i, w, 66) == 0)
      return 1;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  tg_chain_state_t a, b;
  memset(&a, 0xa5, sizeof a);
  int rc = tg_chain_parse_reply((const char *)data, size, CHAIN, &a);
  if (!documented(rc))
    FAIL("undocumented code %d", rc);
  if (rc != 0 && !zero(&a))
    FAIL("out not zeroed on %d", rc);
  memset(&b, 0x5a, sizeof b);
  int again = tg_chain_parse_reply((const char *)data, size, CHAIN, &b);
  if (again != rc || memcmp(&a, &b, sizeof a) != 0)
    FAIL("a second read gave %d, not %d, or another state", again, rc);
  if (rc != 0)
    return 0;
  if (size > TG_CHAIN_REPLY_MAX)
    FAIL("accepted %zu bytes", size);
  int other = tg_chain_parse_reply((const char *)data, size, CHAIN + 1, &b);
  if (other != -EXDEV)
    FAIL("accepted for chain %u and %u (%d)", CHAIN, CHAIN + 1, other);
  /* JSON escapes could spell the word otherwise; only plain spellings are checked. */
  if (memchr(data, '\\', size) == NULL && !holds_word(data, size, a.nonce_used ? '1' : '0'))
    FAIL("nonce_used %d without its word in the input", a.nonce_used);
  return 0;
}
