#include "pay/payconf.h"

#include <errno.h>
#include <string.h>

#include "test.h"

#define ASSET "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
#define PAY_TO "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"

static char err[512];
static tg_payconf_t pc;

/* A section as config.c flattens it: keys sorted, list items "key.N". */
typedef struct {
  tg_config_kv_t kv[64];
  tg_config_section_t s;
} section_t;

static section_t sec;

/* The minimal valid section, then pairs of (key, value) to set (value NULL
 * removes the key). */
static const tg_config_section_t *make(const char *const *changes) {
  static const char *const base[] = {"accepts.1.network",
                                     "eip155:84532",
                                     "accepts.1.asset",
                                     ASSET,
                                     "accepts.1.name",
                                     "USDC",
                                     "accepts.1.version",
                                     "2",
                                     "accepts.1.pay_to",
                                     PAY_TO,
                                     "facilitators.1",
                                     "http://127.0.0.1:4021",
                                     NULL};
  size_t n = 0;
  for (size_t i = 0; base[i]; i += 2, n++)
    sec.kv[n] = (tg_config_kv_t){(char *)base[i], (char *)base[i + 1]};
  for (size_t i = 0; changes && changes[i]; i += 2) {
    size_t j = 0;
    while (j < n && strcmp(sec.kv[j].key, changes[i]) != 0)
      j++;
    if (changes[i + 1] == NULL) {
      if (j < n)
        sec.kv[j] = sec.kv[--n];
      continue;
    }
    sec.kv[j] = (tg_config_kv_t){(char *)changes[i], (char *)changes[i + 1]};
    if (j == n)
      n++;
  }
  sec.s.items = sec.kv;
  sec.s.nitems = n;
  return &sec.s;
}

static int parse(const char *const *changes) {
  err[0] = '\0';
  tg_payconf_free(&pc);
  return tg_payconf_parse(make(changes), &pc, err, sizeof err);
}

TEST(empty_section_is_disabled) {
  tg_config_section_t empty = {NULL, 0};
  memset(&pc, 0x5a, sizeof pc);
  CHECK_INT(tg_payconf_parse(&empty, &pc, err, sizeof err), 0);
  CHECK(!pc.enabled);
  CHECK(pc.facilitators == NULL && pc.naccepts == 0);
  tg_payconf_free(&pc);
  tg_payconf_free(NULL);
}

TEST(minimal_and_defaults) {
  CHECK_INT(parse(NULL), 0);
  CHECK(pc.enabled);
  CHECK_INT(pc.naccepts, 1);
  const tg_pay_accept_t *a = &pc.accepts[0];
  CHECK_STR(a->network, "eip155:84532");
  CHECK_STR(a->network_v1, "");
  CHECK_INT(a->chain_id, 84532);
  CHECK_STR(a->asset_hex, ASSET);
  CHECK_INT(a->asset[0], 0x03);
  CHECK_INT(a->asset[19], 0x7e);
  CHECK_STR(a->pay_to_hex, PAY_TO);
  CHECK_STR(a->name, "USDC");
  CHECK_STR(a->version, "2");
  CHECK_STR(a->currency, "USD");
  CHECK_INT(a->decimals, 6);
  CHECK_INT(a->max_timeout_s, 60);
  CHECK_INT(pc.nfacilitators, 1);
  CHECK_STR(pc.facilitators[0], "http://127.0.0.1:4021");
  CHECK_INT(pc.nrpc, 0);
  CHECK(pc.rpc == NULL);
  CHECK_INT(pc.verify, TG_PAY_VERIFY_FACILITATOR);
  CHECK_INT(pc.settle, TG_PAY_SETTLE_SYNC);
  CHECK_INT(pc.serve, TG_PAY_SERVE_REDIRECT);
  CHECK(pc.origin == NULL && pc.description == NULL && pc.mime_type == NULL);
  CHECK_INT(pc.verify_cache_ttl_ms, 60000);
  CHECK_INT(pc.max_verifying, 256);
  CHECK_INT(pc.verify_wait_ms, 200);
  CHECK_INT(pc.facilitator_timeout_ms, 5000);
  tg_payconf_free(&pc);
  CHECK(!pc.enabled && pc.facilitators == NULL);
}

TEST(everything_set) {
  static const char *const c[] = {"accepts.1.network_v1",
                                  "base-sepolia",
                                  "accepts.1.currency",
                                  "usd",
                                  "accepts.1.decimals",
                                  "6",
                                  "accepts.1.max_timeout_s",
                                  "120",
                                  "accepts.1.asset",
                                  "0x036cbd53842c5426634e7929541ec2318f3dcf7e", /* lowercase: EIP-55 on output */
                                  "accepts.2.network",
                                  "eip155:31337",
                                  "accepts.2.asset",
                                  "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                                  "accepts.2.name",
                                  "Test Token",
                                  "accepts.2.version",
                                  "1",
                                  "accepts.2.pay_to",
                                  PAY_TO,
                                  "accepts.2.decimals",
                                  "18",
                                  "accepts.2.currency",
                                  "EUR",
                                  "facilitators.2",
                                  "https://x402.org/facilitator",
                                  "verify",
                                  "local",
                                  "rpc.1",
                                  "http://127.0.0.1:8545",
                                  "rpc.2",
                                  "https://rpc.example/v1/key",
                                  "settle",
                                  "async",
                                  "serve",
                                  "proxy",
                                  "origin",
                                  "http://127.0.0.1:8081/base",
                                  "description",
                                  "Caf\xc3\xa9 data",
                                  "mime_type",
                                  "application/json",
                                  "verify_cache_ttl_ms",
                                  "0",
                                  "max_verifying",
                                  "65536",
                                  "verify_wait_ms",
                                  "60000",
                                  "facilitator_timeout_ms",
                                  "100",
                                  NULL};
  int rc = parse(c);
  if (rc)
    fprintf(stderr, "  %s\n", err);
  CHECK_INT(rc, 0);
  CHECK_INT(pc.naccepts, 2);
  CHECK_STR(pc.accepts[0].network_v1, "base-sepolia");
  CHECK_STR(pc.accepts[0].asset_hex, ASSET);
  CHECK_STR(pc.accepts[0].currency, "usd");
  CHECK_INT(pc.accepts[0].max_timeout_s, 120);
  CHECK_INT(pc.accepts[1].chain_id, 31337);
  CHECK_INT(pc.accepts[1].decimals, 18);
  CHECK_STR(pc.accepts[1].name, "Test Token");
  CHECK_INT(pc.nfacilitators, 2);
  CHECK_STR(pc.facilitators[1], "https://x402.org/facilitator");
  CHECK_INT(pc.nrpc, 2);
  CHECK_STR(pc.rpc[1], "https://rpc.example/v1/key");
  CHECK_INT(pc.verify, TG_PAY_VERIFY_LOCAL);
  CHECK_INT(pc.settle, TG_PAY_SETTLE_ASYNC);
  CHECK_INT(pc.serve, TG_PAY_SERVE_PROXY);
  CHECK_STR(pc.origin, "http://127.0.0.1:8081/base");
  CHECK_STR(pc.description, "Caf\xc3\xa9 data");
  CHECK_STR(pc.mime_type, "application/json");
  CHECK_INT(pc.verify_cache_ttl_ms, 0);
  CHECK_INT(pc.max_verifying, 65536);
  CHECK_INT(pc.verify_wait_ms, 60000);
  CHECK_INT(pc.facilitator_timeout_ms, 100);
  char out[80];
  CHECK_INT(tg_pay_amount(&pc.accepts[0], 1500, "USD", out), 0);
  CHECK_STR(out, "1500");
  CHECK_INT(tg_pay_amount(&pc.accepts[1], 1500, "USD", out), -ENOENT);
  CHECK_INT(tg_pay_amount(&pc.accepts[1], 1500, "EUR", out), 0);
  CHECK_STR(out, "1500000000000000");
  tg_payconf_free(&pc);
}

TEST(eight_accepts_not_nine) {
  static char keys[9][5][32], chains[9][24];
  static const char *c[9 * 10 + 1];
  size_t n = 0;
  for (int i = 0; i < 9; i++) {
    const char *f[] = {"network", "asset", "name", "version", "pay_to"};
    for (int k = 0; k < 5; k++)
      snprintf(keys[i][k], sizeof keys[i][k], "accepts.%d.%s", i + 1, f[k]);
    snprintf(chains[i], sizeof chains[i], "eip155:%d", 100 + i);
    const char *v[] = {chains[i], ASSET, "USDC", "2", PAY_TO};
    for (int k = 0; k < 5; k++) {
      c[n++] = keys[i][k];
      c[n++] = v[k];
    }
  }
  c[8 * 10] = NULL;
  CHECK_INT(parse(c), 0);
  CHECK_INT(pc.naccepts, 8);
  CHECK_INT(pc.accepts[7].chain_id, 107);
  /* A ninth: its network key is enough to be refused. */
  CHECK_INT(parse((const char *const[]){keys[8][0], chains[8], NULL}), -EINVAL);
  CHECK_STR(err, "payments.accepts.9.network: accepts is a list of 1..8 tables");
  tg_payconf_free(&pc);
}

/* One change, refused with exactly this message. */
typedef struct {
  const char *changes[7];
  const char *err;
} refusal_t;

static const refusal_t refusals[] = {
    {{"colour", "blue"}, "payments.colour: unknown key"},
    {{"accepts.1.colour", "blue"}, "payments.accepts.1.colour: unknown key"},
    {{"x402.pay_to", PAY_TO}, "payments.x402.pay_to: unknown key"},
    {{"accepts", "x"}, "payments.accepts: expected a list of tables { network = ..., asset = ... }"},
    {{"accepts.1", "x"}, "payments.accepts.1: expected a list of tables { network = ..., asset = ... }"},
    {{"accepts.x.network", "eip155:1"}, "payments.accepts.x.network: accepts is a list of 1..8 tables"},
    {{"accepts.01.network", "eip155:1"}, "payments.accepts.01.network: accepts is a list of 1..8 tables"},
    {{"accepts.0.network", "eip155:1"}, "payments.accepts.0.network: accepts is a list of 1..8 tables"},
    {{"accepts.3.network", "eip155:1"}, "payments.accepts.2: missing (list positions run 1..3)"},
    {{"accepts.2.name", "USDC"}, "payments.accepts.2.network: required (CAIP-2, e.g. \"eip155:8453\")"},
    {{"accepts.1.network", NULL, "accepts.1.asset", NULL, "accepts.1.name", NULL},
     "payments.accepts.1.network: required (CAIP-2, e.g. \"eip155:8453\")"},
    {{"accepts.1.network", "eip155:0"},
     "payments.accepts.1.network: 'eip155:0' is not \"eip155:<chain id>\" with a chain id in 1..2^53"},
    {{"accepts.1.network", "eip155:9007199254740993"},
     "payments.accepts.1.network: 'eip155:9007199254740993' is not \"eip155:<chain id>\" with a chain id in 1..2^53"},
    {{"accepts.1.network", "eip155:084532"},
     "payments.accepts.1.network: 'eip155:084532' is not \"eip155:<chain id>\" with a chain id in 1..2^53"},
    {{"accepts.1.network", "base-sepolia"},
     "payments.accepts.1.network: 'base-sepolia' is not \"eip155:<chain id>\" with a chain id in 1..2^53"},
    {{"accepts.1.network", "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp"},
     "payments.accepts.1.network: 'solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp' is not \"eip155:<chain id>\" with a "
     "chain id in 1..2^53"},
    {{"accepts.1.network_v1", "Base"},
     "payments.accepts.1.network_v1: 'Base' is not a version 1 network name ([a-z0-9-]{1,31})"},
    {{"accepts.1.network_v1", ""},
     "payments.accepts.1.network_v1: '' is not a version 1 network name ([a-z0-9-]{1,31})"},
    {{"accepts.1.network_v1", "abcdefghijklmnopqrstuvwxyz012345"},
     "payments.accepts.1.network_v1: 'abcdefghijklmnopqrstuvwxyz012345' is not a version 1 network name "
     "([a-z0-9-]{1,31})"},
    {{"accepts.1.network_v1", "base"}, "payments.accepts.1.network_v1: 'base' is chain 8453, not eip155:84532"},
    {{"accepts.1.asset", NULL}, "payments.accepts.1.asset: required (an address, 0x + 40 hex digits)"},
    {{"accepts.1.pay_to", "0x209693Bc6afc0C5328bA36FaF03C514EF312287c"},
     "payments.accepts.1.pay_to: '0x209693Bc6afc0C5328bA36FaF03C514EF312287c' is not an address (0x + 40 hex "
     "digits; mixed case must be the EIP-55 checksum)"},
    {{"accepts.1.pay_to", "0x0000000000000000000000000000000000000000"}, "payments.accepts.1.pay_to: the zero address"},
    {{"accepts.1.asset", "0x036CbD53842c5426634e7929541eC2318f3dCF7"},
     "payments.accepts.1.asset: '0x036CbD53842c5426634e7929541eC2318f3dCF7' is not an address (0x + 40 hex "
     "digits; mixed case must be the EIP-55 checksum)"},
    {{"accepts.1.name", ""}, "payments.accepts.1.name: must be 1..63 bytes of printable ASCII"},
    {{"accepts.1.name", "US\nDC"}, "payments.accepts.1.name: must be 1..63 bytes of printable ASCII"},
    {{"accepts.1.name", "USD\xc3\xa9"}, "payments.accepts.1.name: must be 1..63 bytes of printable ASCII"},
    {{"accepts.1.version", "12345678901234567890123456789012"},
     "payments.accepts.1.version: must be 1..31 bytes of printable ASCII"},
    {{"accepts.1.version", NULL},
     "payments.accepts.1.version: required (the token's EIP-712 domain version, e.g. \"2\")"},
    {{"accepts.1.currency", "US D"}, "payments.accepts.1.currency: 'US D' is not a currency code ([A-Za-z0-9]{1,16})"},
    {{"accepts.1.currency", ""}, "payments.accepts.1.currency: '' is not a currency code ([A-Za-z0-9]{1,16})"},
    {{"accepts.1.decimals", "37"}, "payments.accepts.1.decimals: '37' is not an integer in 0..36"},
    {{"accepts.1.decimals", "-1"}, "payments.accepts.1.decimals: '-1' is not an integer in 0..36"},
    {{"accepts.1.decimals", "6.0"}, "payments.accepts.1.decimals: '6.0' is not an integer in 0..36"},
    {{"accepts.1.max_timeout_s", "0"}, "payments.accepts.1.max_timeout_s: '0' is not an integer in 1..86400"},
    {{"accepts.1.max_timeout_s", "86401"}, "payments.accepts.1.max_timeout_s: '86401' is not an integer in 1..86400"},
    {{"accepts.1.max_timeout_s", "99999999999999999999999"},
     "payments.accepts.1.max_timeout_s: '99999999999999999999999' is not an integer in 1..86400"},
    {{"facilitators.1", NULL}, "payments.facilitators: required (1..8 http(s) URLs)"},
    {{"facilitators", "http://a"}, "payments.facilitators: facilitators is a list of 1..8 URLs"},
    {{"facilitators.9", "http://a"}, "payments.facilitators.9: facilitators is a list of 1..8 URLs"},
    {{"facilitators.3", "http://a"}, "payments.facilitators.2: missing (list positions run 1..3)"},
    {{"facilitators.1", "ftp://a"}, "payments.facilitators.1: 'ftp://a' is not an http:// or https:// URL"},
    {{"facilitators.1", "http://"},
     "payments.facilitators.1: 'http://' has no valid host and port (a name, an IPv4 address or [IPv6], port 1..65535)"},
    {{"facilitators.1", "https:///x"},
     "payments.facilitators.1: 'https:///x' has no valid host and port (a name, an IPv4 address or [IPv6], port 1..65535)"},
    {{"facilitators.1", "http://127.0.0.1:70000"},
     "payments.facilitators.1: 'http://127.0.0.1:70000' has no valid host and port (a name, an IPv4 address or [IPv6], port 1..65535)"},
    {{"rpc.1", "http://[::zz]:8545"},
     "payments.rpc.1: 'http://[::zz]:8545' has no valid host and port (a name, an IPv4 address or [IPv6], port 1..65535)"},
    {{"facilitators.1", "http://a b"},
     "payments.facilitators.1: byte 0x20 at 8: a URL is printable ASCII without spaces"},
    {{"facilitators.1", "http://a/?x=1"},
     "payments.facilitators.1: a base URL takes no '?' (query, fragment or user info)"},
    {{"facilitators.1", "http://u:p@a/"},
     "payments.facilitators.1: a base URL takes no '@' (query, fragment or user info)"},
    {{"facilitators.1.url", "http://a"}, "payments.facilitators.1.url: facilitators is a list of 1..8 URLs"},
    {{"rpc.1", "localhost:8545"}, "payments.rpc.1: 'localhost:8545' is not an http:// or https:// URL"},
    {{"verify", "local"}, "payments.rpc: verify = \"local\" needs 1..8 JSON-RPC URLs"},
    {{"verify", "Local"}, "payments.verify: 'Local' is not \"facilitator\" or \"local\""},
    {{"settle", "later"}, "payments.settle: 'later' is not \"sync\" or \"async\""},
    {{"serve", "true"}, "payments.serve: 'true' is not \"redirect\" or \"proxy\""},
    {{"serve", "proxy"}, "payments.origin: serve = \"proxy\" needs the upstream's http(s) base URL"},
    {{"serve", "proxy", "origin", "/upstream"}, "payments.origin: '/upstream' is not an http:// or https:// URL"},
    {{"description", "a\tb"}, "payments.description: control byte 0x09 at 1"},
    {{"description", "a\xff"}, "payments.description: must be valid UTF-8 of at most 512 bytes"},
    {{"mime_type", "json"}, "payments.mime_type: 'json' is not a media type (type/subtype, printable ASCII)"},
    {{"mime_type", "text/ html"},
     "payments.mime_type: 'text/ html' is not a media type (type/subtype, printable ASCII)"},
    {{"verify_cache_ttl_ms", "3600001"}, "payments.verify_cache_ttl_ms: '3600001' is not an integer in 0..3600000"},
    {{"max_verifying", "0"}, "payments.max_verifying: '0' is not an integer in 1..65536"},
    {{"verify_wait_ms", "true"}, "payments.verify_wait_ms: 'true' is not an integer in 0..60000"},
    {{"facilitator_timeout_ms", "99"}, "payments.facilitator_timeout_ms: '99' is not an integer in 100..300000"},
};

TEST(refusals_say_which_key_and_why) {
  for (size_t i = 0; i < sizeof refusals / sizeof refusals[0]; i++) {
    memset(&pc, 0, sizeof pc);
    int rc = parse(refusals[i].changes);
    if (rc != -EINVAL || strcmp(err, refusals[i].err) != 0)
      fprintf(stderr, "  case %zu: %d '%s'\n", i, rc, err);
    CHECK_INT(rc, -EINVAL);
    CHECK_STR(err, refusals[i].err);
    CHECK(!pc.enabled && pc.facilitators == NULL && pc.naccepts == 0); /* nothing kept on failure */
  }
}

TEST(accepts_required_when_section_given) {
  CHECK_INT(parse((const char *const[]){"accepts.1.network", NULL, "accepts.1.asset", NULL, "accepts.1.name", NULL,
                                        "accepts.1.version", NULL, "accepts.1.pay_to", NULL, NULL}),
            -EINVAL);
  CHECK_STR(err, "payments.accepts: required (1..8 payment requirements)");
}

TEST(same_network_and_asset_twice) {
  static const char *const c[] = {"accepts.2.network",
                                  "eip155:84532",
                                  "accepts.2.asset",
                                  "0x036cbd53842c5426634e7929541ec2318f3dcf7e",
                                  "accepts.2.name",
                                  "USDC",
                                  "accepts.2.version",
                                  "2",
                                  "accepts.2.pay_to",
                                  PAY_TO,
                                  NULL};
  CHECK_INT(parse(c), -EINVAL);
  CHECK_STR(err, "payments.accepts.2: the same network and asset as accepts.1");
  /* Another chain with the same v1 name. */
  static const char *const d[] = {"accepts.1.network_v1",
                                  "my-chain",
                                  "accepts.2.network",
                                  "eip155:5",
                                  "accepts.2.network_v1",
                                  "my-chain",
                                  "accepts.2.asset",
                                  ASSET,
                                  "accepts.2.name",
                                  "USDC",
                                  "accepts.2.version",
                                  "2",
                                  "accepts.2.pay_to",
                                  PAY_TO,
                                  NULL};
  CHECK_INT(parse(d), -EINVAL);
  CHECK_STR(err, "payments.accepts.2.network_v1: 'my-chain' names eip155:84532 in accepts.1");
  /* The same v1 name on the same chain (two assets there) is fine. */
  static const char *const e[] = {"accepts.1.network_v1",
                                  "base-sepolia",
                                  "accepts.2.network",
                                  "eip155:84532",
                                  "accepts.2.network_v1",
                                  "base-sepolia",
                                  "accepts.2.asset",
                                  "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                                  "accepts.2.name",
                                  "EURC",
                                  "accepts.2.version",
                                  "2",
                                  "accepts.2.pay_to",
                                  PAY_TO,
                                  NULL};
  CHECK_INT(parse(e), 0);
  CHECK_INT(pc.naccepts, 2);
  tg_payconf_free(&pc);
}

TEST(limits_at_the_edges) {
  CHECK_INT(parse((const char *const[]){"accepts.1.network", "eip155:9007199254740992", "accepts.1.decimals", "0",
                                        "accepts.1.max_timeout_s", "86400", "facilitator_timeout_ms", "300000", NULL}),
            0);
  CHECK_INT(pc.accepts[0].chain_id, UINT64_C(9007199254740992));
  CHECK_INT(pc.accepts[0].decimals, 0);
  char desc[TG_PAY_MAX_DESCRIPTION + 2];
  memset(desc, 'd', sizeof desc);
  desc[TG_PAY_MAX_DESCRIPTION] = '\0';
  CHECK_INT(parse((const char *const[]){"description", desc, NULL}), 0);
  desc[TG_PAY_MAX_DESCRIPTION] = 'd';
  desc[TG_PAY_MAX_DESCRIPTION + 1] = '\0';
  CHECK_INT(parse((const char *const[]){"description", desc, NULL}), -EINVAL);
  static char url[TG_PAY_MAX_URL + 2];
  memcpy(url, "http://a/", 9);
  memset(url + 9, 'p', sizeof url - 10);
  url[TG_PAY_MAX_URL] = '\0';
  CHECK_INT(parse((const char *const[]){"facilitators.1", url, NULL}), 0);
  url[TG_PAY_MAX_URL] = 'p';
  CHECK_INT(parse((const char *const[]){"facilitators.1", url, NULL}), -EINVAL);
  CHECK_STR(err, "payments.facilitators.1: longer than 2048 bytes");
  tg_payconf_free(&pc);
}

TEST(caip2) {
  uint64_t id = 0;
  CHECK_INT(tg_pay_parse_caip2("eip155:1", &id), 0);
  CHECK_INT(id, 1);
  static const char *const bad[] = {"eip155:",
                                    "eip155:0",
                                    "eip155:01",
                                    "eip155:-1",
                                    "eip155:1 ",
                                    "EIP155:1",
                                    "eip155:9007199254740993",
                                    "eip155:18446744073709551617",
                                    "eip155:1a",
                                    NULL};
  for (size_t i = 0; bad[i]; i++)
    CHECK_INT(tg_pay_parse_caip2(bad[i], &id), -EINVAL);
  CHECK_INT(tg_pay_parse_caip2(NULL, &id), -EINVAL);
  CHECK_INT(id, 1);
}
