#ifndef TG_PAYCONF_H
#define TG_PAYCONF_H

/* A tenant's HTTP 402 payment settings: the `payments` section of the
 * configuration (config/config.h keeps it flattened, "accepts.1.pay_to"),
 * read and checked once, at load or reload, into a plain struct that the
 * pipeline keeps beside the tenant. What passes here is safe to put on the
 * wire as it is (x402.h builds the challenge from it).
 *
 *   payments = {
 *     accepts = {                 -- 1..TG_PAY_MAX_ACCEPTS requirements offered on every priced route
 *       { network = "eip155:84532",      -- CAIP-2, "eip155:<chain id>", chain id 1..2^53
 *         network_v1 = "base-sepolia",   -- optional, [a-z0-9-]{1,31}: offered to version 1 clients too
 *         asset = "0x036C...",           -- the token contract (EIP-55 checked when mixed case)
 *         name = "USDC", version = "2",  -- the token's EIP-712 domain (printable ASCII, not empty)
 *         pay_to = "0x...",
 *         currency = "USD",              -- the catalog currency this asset sells for ([A-Za-z0-9]{1,16})
 *         decimals = 6,                  -- 0..36
 *         max_timeout_s = 60 },          -- 1..86400
 *     },
 *     facilitators = { "http://127.0.0.1:4021" },  -- 1..8 http(s) base URLs
 *     verify = "facilitator",     -- or "local" (needs rpc)
 *     rpc = { "http://127.0.0.1:8545" },           -- 0..8 JSON-RPC URLs; also used by the settlement
 *                                                 -- queue to ask whether a settle whose answer was
 *                                                 -- lost went through: configure one in every mode
 *     settle = "sync",            -- or "async"
 *     serve = "redirect",         -- or "proxy" (needs origin, an http(s) URL)
 *     origin = "http://127.0.0.1:8081",
 *     description = "...",        -- optional, UTF-8, at most TG_PAY_MAX_DESCRIPTION bytes
 *     mime_type = "application/json",              -- optional, "type/subtype" printable ASCII
 *     verify_cache_ttl_ms = 60000,      -- 0..3600000 (0: no cache)
 *     max_verifying = 256,              -- 1..65536
 *     verify_wait_ms = 200,             -- 0..60000
 *     facilitator_timeout_ms = 5000,    -- 100..300000
 *   }
 *
 * Integers may also be written as decimal strings. Unknown keys, list
 * positions with gaps and the same (network, asset) offered twice are
 * refused. Pure functions on caller memory, any thread. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config/config.h"

#define TG_PAY_MAX_ACCEPTS 8
#define TG_PAY_MAX_URLS 8          /* facilitators, rpc */
#define TG_PAY_MAX_URL 2048        /* bytes of one URL */
#define TG_PAY_MAX_DESCRIPTION 512 /* bytes: the challenge goes in a header, keep it small */
#define TG_PAY_MAX_DECIMALS 36

typedef struct tg_pay_accept {
  char network[48];    /* CAIP-2, "eip155:84532" */
  char network_v1[32]; /* "" when version 1 clients are not offered this one */
  uint64_t chain_id;
  uint8_t asset[20];
  char asset_hex[43]; /* EIP-55 form */
  uint8_t pay_to[20];
  char pay_to_hex[43]; /* EIP-55 form */
  char name[64];       /* EIP-712 domain of the token */
  char version[32];
  char currency[17]; /* catalog currency, as written ("USD" by default) */
  uint8_t decimals;  /* of the asset: atomic units = 10^-decimals */
  uint32_t max_timeout_s;
} tg_pay_accept_t;

typedef enum { TG_PAY_VERIFY_FACILITATOR = 0, TG_PAY_VERIFY_LOCAL } tg_pay_verify_t;
typedef enum { TG_PAY_SETTLE_SYNC = 0, TG_PAY_SETTLE_ASYNC } tg_pay_settle_t;
typedef enum { TG_PAY_SERVE_REDIRECT = 0, TG_PAY_SERVE_PROXY } tg_pay_serve_t;

typedef struct tg_payconf {
  bool enabled; /* a payments section with accepts */
  tg_pay_accept_t accepts[TG_PAY_MAX_ACCEPTS];
  size_t naccepts;
  char **facilitators; /* in configured order (ranked at run time by the pool) */
  size_t nfacilitators;
  char **rpc;
  size_t nrpc;
  tg_pay_verify_t verify;
  tg_pay_settle_t settle;
  tg_pay_serve_t serve;
  char *origin;      /* NULL unless given */
  char *description; /* NULL unless given */
  char *mime_type;   /* NULL unless given */
  uint32_t verify_cache_ttl_ms, max_verifying, verify_wait_ms, facilitator_timeout_ms;
} tg_payconf_t;

/* Reads s into out (zeroed first; every string malloc'd, owned by out). An
 * empty section is not an error: out->enabled false, nothing to free. Returns
 * 0, -EINVAL with err naming the key and what is wrong
 * ("payments.accepts.1.pay_to: ..."), or -ENOMEM; on failure out holds
 * nothing (zeroed) and needs no free. */
int tg_payconf_parse(const tg_config_section_t *s, tg_payconf_t *out, char *err, size_t errlen);

/* Frees what out owns and zeroes it; safe on a zeroed struct and on NULL. */
void tg_payconf_free(tg_payconf_t *c);

/* A catalog price (price micro-units of currency: 1000 is 0.001 USD) as the
 * decimal string of a's asset units: price * 10^(decimals - 6), exact; with
 * fewer than 6 decimals, rounded up (a payment never falls short of the
 * price). currency is compared without regard to case. Returns 0 with out
 * set; -ENOENT when a sells for another currency (out ""); -ERANGE for a
 * negative price; -EINVAL for NULL arguments or decimals above 36. */
int tg_pay_amount(const tg_pay_accept_t *a, int64_t price, const char *currency, char out[80]);

/* The chain id of a CAIP-2 "eip155:<decimal>" network (no leading zero,
 * 1..2^53) into *chain_id: 0 or -EINVAL. Shared with the payload decoder. */
int tg_pay_parse_caip2(const char *network, uint64_t *chain_id);

#endif
