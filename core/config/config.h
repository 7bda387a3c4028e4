#ifndef TG_CONFIG_H
#define TG_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The gateway's one configuration file: a Lua chunk that returns a table,
 * evaluated in an empty sandbox (no libraries but string, table and math;
 * no io, os, require, load). Paths in it are relative to the file's folder.
 *
 *   return {
 *     listen  = { { host = "127.0.0.1", port = 8080 },
 *                 { host = "127.0.0.1", port = 8443, tls_cert = "c.pem", tls_key = "k.pem" } },
 *     admin   = { host = "127.0.0.1", port = 9090, token_file = "admin.token" },
 *     workers = 0,                 -- 0: one per core
 *     data_dir = "data",
 *     log_level = "info",
 *     limits = { max_header_bytes = 16384, max_body_bytes = 4194304,
 *                header_timeout_ms = 10000, body_timeout_ms = 30000,
 *                idle_timeout_ms = 60000, max_connections = 10000,
 *                shutdown_grace_ms = 10000 },
 *     redis = { host = "127.0.0.1", port = 6379, password_file = "redis.pass",
 *               timeout_ms = 20, db = 0 },          -- optional
 *     rate_limit = { mode = "local", table_size = 65536 },  -- mode "redis" needs redis
 *     exchange = { offer_ttl_s = 300, idempotency_key_max = 128 },
 *     ingest = { max_bytes = 268435456, timeout_ms = 10000, initial_wait_ms = 5000 },
 *     policy = { time_limit_ms = 50, load_time_limit_ms = 1000, memory_limit = 33554432,
 *                watch_debounce_ms = 200 },
 *     instance = "gw-1",          -- default: "<host name>:<first listen port>"
 *     tracing = { endpoint = "http://127.0.0.1:4318/v1/traces", sample = 1.0,
 *                 service_name = "tollgate", batch = 512, flush_ms = 1000, queue = 8192 },
 *     access_log = { sample = 1.0, errors = true },  -- absent: no access log (gateway/access.h)
 *     ledger = { mode = "local",   -- "redis": balances and idempotency keys shared (needs redis)
 *                wal = { capacity_bytes = 1073741824, segment_bytes = 67108864, batch_bytes = 65536,
 *                        batch_interval_us = 0, retention_bytes = 536870912, retention_age_s = 604800 },
 *                snapshot_every = 100000,
 *                idempotency = { ttl_s = 86400, max_entries = 1000000, pending_ttl_ms = 30000,
 *                                wait_ms = 2000 },
 *                ship = { store = "none", batch = 512, timeout_ms = 1000 },  -- "redis" needs redis
 *                accounts = { { billing_reference = "acct-demo", currency = "USD", amount = 100000000,
 *                               reference = "demo-opening" } } },
 *     tenants = {
 *       { name = "news", hosts = { "news.example" },
 *         catalog = { source = "rsl/news.xml", refresh_s = 300, strict = false },
 *         policy = "policies/news.lua",
 *         signer = { type = "nginx_secure_link", base_url = "https://cdn.news.example",
 *                    key_file = "keys/news.key", ttl_s = 300 },
 *         billing = { type = "builtin" },
 *         payments = { accepts = { { network = "eip155:84532", asset = "0x...", name = "USDC",
 *                                    version = "2", pay_to = "0x..." } },
 *                      facilitators = { "https://facilitator.example" } },
 *         usage = { report_within_s = 86400, overdue_limit = 3, token_pricing = "flat" } },
 *     },
 *   }
 *
 * Unknown keys are errors (typos must not pass silently). Defaults: the
 * values shown for workers, data_dir, log_level, limits, the keys of redis
 * (no password), rate_limit, exchange, ingest and policy, refresh_s 300,
 * strict false; no admin listener, no redis, no tenants. Rules beyond the
 * types:
 *   - listen: 1 to TG_CONFIG_MAX_LISTENERS entries; host an IP literal or a
 *     name; port 0..65535 (0: the system picks a free port); tls_cert and
 *     tls_key together. admin takes host, port and token_file (required).
 *   - workers 0..256; limits are integers 1..2^32-1; log_level one of
 *     debug, info, warn, error.
 *   - redis: host an IP literal or a name, port 1..65535, timeout_ms
 *     1..60000, db 0..65535, password_file a readable file. rate_limit: mode
 *     "local" (one table per instance) or "redis" (one limit across
 *     instances; needs the redis section), table_size a power of two in
 *     16..2^26 (slots of the local table, 16 bytes each).
 *   - exchange (the Connect API): offer_ttl_s 1..86400, how long an offer id
 *     is accepted after DiscoverResources issued it; idempotency_key_max
 *     16..1024, the longest ExecuteTransaction idempotency key (bytes).
 *   - ingest (catalog loading, every tenant): max_bytes 1024..2^30, the
 *     largest RSL document (file or HTTP body; larger is a failed refresh,
 *     "too_large"); timeout_ms 100..600000, a whole HTTP fetch; and
 *     initial_wait_ms 0..600000, how long start-up waits for the first
 *     catalogs before serving (0: not at all; /readyz names those missing).
 *   - policy (every tenant's Lua policy): time_limit_ms 1..10000 per hook
 *     call and per fixture; load_time_limit_ms 1..60000 to run a policy's
 *     top level; memory_limit 2^20..2^31 bytes per Lua state (one per tenant
 *     per worker); watch_debounce_ms 0..60000, the quiet time after a change
 *     in a policy folder before the reload (editors write in several steps).
 *   - tenant names [a-z0-9_-]{1,64}, unique; hosts are names, IPv4 or
 *     [IPv6], optionally ":port", lowercased, unique across tenants.
 *   - catalog.strict: true refuses an RSL document with any non-conformance
 *     (catalog/rsl.h, strict mode): such a refresh fails ("parse") and the
 *     previous catalog keeps serving. false (lenient) skips or maps broken
 *     parts with a warning.
 *   - files (policy, tls_*, token_file, a catalog source that is not an
 *     http(s) URL) must be readable when the file is loaded.
 *   - signer and billing name their kind in a string 'type' and take only
 *     that kind's keys. Every signer takes key_file (required), base_url
 *     (the CDN origin that replaces the resource's scheme and host) and
 *     ttl_s; then nginx_secure_link expression; akamai_edgeauth token_name,
 *     algorithm, acl, url_form, escape_early; gcdn key_name, url_prefix;
 *     cloudfront key_pair_id. Their values are checked by signer/signer.h
 *     (tg_signer_from_config) at start and by `tollgate check`. billing:
 *     builtin (no other key) or connect (url, token_file, deadline_ms,
 *     call_timeout_ms, breaker_failures, breaker_cooldown_ms,
 *     health_interval_ms, deferred_cap, reconcile_backoff_ms,
 *     reconcile_max_backoff_ms: their values are read and checked by
 *     billing/billconf.h). An unknown type or key is an error too.
 *   - ledger: mode local or redis (needs the redis section); wal
 *     capacity_bytes 2^20..2^40, segment_bytes 2^16..2^30 (at most the
 *     capacity), batch_bytes 512..2^26, batch_interval_us 0..10^6,
 *     retention_bytes and retention_age_s 0 (off) or a bound: a segment
 *     older or beyond it is removed once a balance snapshot covers it;
 *     snapshot_every 1000..2^31 records; idempotency ttl_s 1..30 days,
 *     max_entries 1024..2^26, pending_ttl_ms 100..3600000, wait_ms 0..60000;
 *     ship (log shipping, ledger/ship.h): store "none" (default) or "redis"
 *     (a Redis Stream tg:txlog:<instance> on the top-level redis section's
 *     server, an error without it; nothing without data_dir), batch 1..65536
 *     records per round, timeout_ms 1..60000 per call; a segment is then
 *     recycled only once shipped;
 *     accounts: billing_reference (1..256 bytes), amount 1..2^53, currency
 *     (default USD), reference (default "config:<ref>:<currency>"): each
 *     an opening credit applied once per reference, so a restart does not
 *     credit it again.
 *   - payments (and signer, billing once implemented): leaves are strings,
 *     integers (money is an integer in atomic units: fractions are refused,
 *     and integers above 2^53 must be written as strings) or booleans; list
 *     items become "key.1", "key.2"; items are sorted by key. A key ending in
 *     "_file" is a path: resolved and checked like the others.
 *     The payments section's keys are read by pay/payconf.h (HTTP 402:
 *     accepted assets, facilitators, verification, settlement, serving) at
 *     start and by `tollgate check`.
 *   - usage (usage reports, pipeline/usage.h): report_within_s 0..31536000,
 *     the time an AI system has to call ReportUsage after a purchase (0: no
 *     report is owed, unless the offer's RSL license has a <reporting>
 *     element: then 86400); overdue_limit 0..1000000, new purchases of an AI
 *     system with more overdue reports than this are denied
 *     (DENIAL_REASON_USAGE_REPORT_OVERDUE; 0: never); token_pricing "flat"
 *     (default: the offer's amount is the price) or "per_1k" (for offers of
 *     RSL payment type "use" the amount is per 1,000 tokens: a purchase
 *     charges ceil(amount * estimated_tokens / 1000), a report adjusts it to
 *     the tokens consumed). Absent: 0, 0, flat.
 *   - tracing (base/trace.h, rpc/otlp.h; absent: off, nothing recorded):
 *     endpoint (required) an http(s) OTLP/HTTP traces URL; sample 0..1, the
 *     share of new traces kept (an incoming traceparent's flag decides for
 *     its trace); service_name (default "tollgate"); batch 1..65536 spans
 *     per export; flush_ms 10..600000 between exports; queue 16..2^20 spans
 *     waiting per recording thread (about 700 bytes each, taken as the ring
 *     fills; more are dropped and counted).
 *   - payments.x402.price is refused: prices come from the tenant's catalog
 *     (the RSL <amount>, atomic units) and its price hook, on HTTP exactly as
 *     on DiscoverResources (pipeline/quote.h).
 *
 * Evaluation is bounded: TG_CONFIG_TIME_LIMIT_MS of wall-clock time (the
 * JIT is off so the check runs) and TG_CONFIG_MEMORY_LIMIT bytes; pcall in
 * the chunk cannot catch either. A single library call that runs long without allocating
 * (a pathological string pattern) is not interrupted: the file is trusted
 * operator input, the limits guard against mistakes. */

#define TG_CONFIG_MAX_LISTENERS 8

/* Defaults of the exchange, ingest and policy sections. The policy ones are
 * policy/policy.h's (pipeline/app.c checks they agree). */
#define TG_CONFIG_DEFAULT_OFFER_TTL_S 300
#define TG_CONFIG_DEFAULT_IDEMPOTENCY_KEY_MAX 128
#define TG_CONFIG_DEFAULT_INGEST_MAX_BYTES (256u << 20) /* a 1M-entry RSL with a license each */
#define TG_CONFIG_DEFAULT_INGEST_TIMEOUT_MS 10000u
#define TG_CONFIG_DEFAULT_INGEST_INITIAL_WAIT_MS 5000u
#define TG_CONFIG_DEFAULT_POLICY_TIME_LIMIT_MS 50
#define TG_CONFIG_DEFAULT_POLICY_LOAD_TIME_LIMIT_MS 1000
#define TG_CONFIG_DEFAULT_POLICY_MEMORY_LIMIT (32u << 20)
#define TG_CONFIG_DEFAULT_POLICY_WATCH_DEBOUNCE_MS 200
#define TG_CONFIG_TIME_LIMIT_MS 1000
#define TG_CONFIG_MEMORY_LIMIT (64u << 20)

typedef struct tg_config_listener {
  char *host;
  int port;
  char *tls_cert;     /* absolute path or NULL */
  char *tls_key;
} tg_config_listener_t;

typedef struct tg_config_kv {
  char *key;
  char *value;        /* numbers and booleans are kept as their text */
} tg_config_kv_t;

/* A flat string table for sections whose keys later modules interpret
 * (signer, billing, payments): key paths joined by '.', e.g. "x402.pay_to". */
typedef struct tg_config_section {
  tg_config_kv_t *items;
  size_t nitems;
} tg_config_section_t;

/* The optional top-level redis section; host NULL when it is absent. */
typedef struct tg_config_redis {
  char *host;
  int port;                   /* default 6379 */
  char *password_file;        /* absolute path or NULL (no AUTH) */
  uint32_t timeout_ms;        /* default 20 */
  int db;                     /* default 0 */
} tg_config_redis_t;

typedef enum { TG_CONFIG_RATE_LIMIT_LOCAL = 0, TG_CONFIG_RATE_LIMIT_REDIS } tg_config_rate_limit_mode_t;

#define TG_CONFIG_DEFAULT_WAL_CAPACITY (1LL << 30)

/* ledger.accounts: an opening credit of a prepaid account. */
typedef struct tg_config_account {
  char *billing_reference;    /* 1..256 bytes */
  char *currency;             /* default "USD" */
  int64_t amount;             /* atomic units, 1 .. 2^53 */
  char *reference;            /* the credit is applied once per reference; default "config:<ref>:<currency>" */
} tg_config_account_t;

typedef enum { TG_CONFIG_LEDGER_LOCAL = 0, TG_CONFIG_LEDGER_REDIS } tg_config_ledger_mode_t;

/* ledger.ship.store: none, or a Redis Stream through the top-level redis section (ledger/ship.h). */
typedef enum { TG_CONFIG_SHIP_NONE = 0, TG_CONFIG_SHIP_REDIS } tg_config_ship_store_t;

/* The ledger section: the write-ahead log, prepaid balances, idempotency. */
typedef struct tg_config_ledger {
  tg_config_ledger_mode_t mode;   /* local (default) or redis: balances and idempotency keys in Redis */
  uint64_t wal_capacity_bytes;    /* 1 GiB */
  uint64_t wal_segment_bytes;     /* 64 MiB */
  uint32_t wal_batch_bytes;       /* 64 KiB */
  uint32_t wal_batch_interval_us; /* 0: a batch is what queued while the disk was busy */
  uint64_t wal_retention_bytes;   /* 512 MiB; 0: keep everything (until capacity) */
  uint32_t wal_retention_age_s;   /* 7 days; 0: no age limit */
  uint32_t snapshot_every;        /* records between balance snapshots; 100000 */
  uint32_t idem_ttl_s;            /* 86400 */
  uint32_t idem_max_entries;      /* 1000000 */
  uint32_t idem_pending_ttl_ms;   /* redis mode: how long a crashed owner's claim blocks the key; 30000 */
  uint32_t idem_wait_ms;          /* how long a duplicate waits for the first call's answer; 2000 */
  tg_config_ship_store_t ship_store; /* ledger.ship.store: where the log is shipped; none (default) */
  uint32_t ship_batch;            /* ledger.ship.batch: records per round; 512 */
  uint32_t ship_timeout_ms;       /* ledger.ship.timeout_ms: per call to the store; 1000 */
  tg_config_account_t *accounts;
  size_t naccounts;
} tg_config_ledger_t;

/* A tenant's usage section: usage reports owed after a purchase (ReportUsage). */
typedef enum { TG_CONFIG_TOKEN_PRICING_FLAT = 0, TG_CONFIG_TOKEN_PRICING_PER_1K } tg_config_token_pricing_t;

typedef struct tg_config_usage {
  uint32_t report_within_s;   /* 0: no report owed unless the offer's license asks for one */
  uint32_t overdue_limit;     /* purchases denied above this many overdue reports per AI system; 0: never */
  tg_config_token_pricing_t token_pricing; /* flat (default) or per_1k */
} tg_config_usage_t;

typedef struct tg_config_tenant {
  char *name;                 /* [a-z0-9_-]{1,64}, unique */
  char **hosts;               /* lowercased, unique across tenants */
  size_t nhosts;
  char *catalog_source;       /* file path (absolute) or http(s) URL; NULL = none */
  uint32_t catalog_refresh_s; /* default 300 */
  bool catalog_strict;        /* refuse a non-conformant RSL document; default false */
  char *policy_file;          /* absolute path, or NULL for the default policy */
  tg_config_section_t signer;  /* empty: no signer (signer/signer.h reads it) */
  tg_config_section_t billing; /* empty: billing builtin */
  tg_config_section_t payments;
  tg_config_usage_t usage;     /* usage reports (pipeline/usage.h); absent: all zero (flat, nothing owed) */
} tg_config_tenant_t;

/* access_log = { sample = 1.0, errors = true } (gateway/access.h): one JSON
 * line per request, a share sample (0..1, default 1) of them, and with
 * errors (default true) every 4xx and 5xx whatever the sample. Absent: off. */
typedef struct tg_config_access_log {
  bool enabled;
  double sample;
  bool errors;
} tg_config_access_log_t;

/* The tracing section; endpoint NULL when it is absent (tracing off). */
typedef struct tg_config_tracing {
  char *endpoint;             /* OTLP/HTTP traces URL */
  double sample;              /* 1.0 */
  char *service_name;         /* "tollgate" */
  uint32_t batch;             /* 512 spans per export */
  uint32_t flush_ms;          /* 1000 */
  uint32_t queue;             /* 8192 */
} tg_config_tracing_t;

typedef struct tg_config {
  char *path;                 /* the file loaded (absolute) */
  char *dir;                  /* its folder */
  tg_config_listener_t listen[TG_CONFIG_MAX_LISTENERS];
  size_t nlisten;
  tg_config_listener_t admin; /* host NULL: no admin listener */
  char *admin_token_file;     /* absolute path */
  int workers;                /* 0 = number of cores */
  char *data_dir;             /* absolute path */
  char *log_level;
  size_t max_header_bytes;
  size_t max_body_bytes;
  uint32_t header_timeout_ms;
  uint32_t body_timeout_ms;
  uint32_t idle_timeout_ms;
  uint32_t max_connections;
  uint32_t shutdown_grace_ms;
  tg_config_redis_t redis;
  tg_config_rate_limit_mode_t rate_limit_mode;
  size_t rate_limit_table_size; /* default 65536 */
  uint32_t offer_ttl_s;             /* exchange.*: see above for ranges and defaults */
  uint32_t idempotency_key_max;
  size_t ingest_max_bytes;          /* ingest.* */
  uint32_t ingest_timeout_ms;
  uint32_t ingest_initial_wait_ms;
  uint32_t policy_time_limit_ms;    /* policy.* */
  uint32_t policy_load_time_limit_ms;
  size_t policy_memory_limit;
  uint32_t policy_watch_debounce_ms;
  tg_config_ledger_t ledger;
  char *instance;                   /* this gateway's name; default "<host name>:<first listen port>" */
  tg_config_tracing_t tracing;
  tg_config_access_log_t access_log;
  tg_config_tenant_t *tenants;
  size_t ntenants;
} tg_config_t;

/* Loads and validates path into cfg (zeroed by the call). Returns 0, or -1
 * with err holding "FILE:LINE: reason" (LINE is the Lua line for syntax and
 * runtime errors, or the line of the offending key or value where known;
 * "FILE: reason" otherwise). FILE is path as given. On failure cfg is left
 * zeroed and needs no free. Uses no global state: any thread may call it;
 * it takes a few milliseconds plus what the chunk itself runs. */
int tg_config_load(const char *path, tg_config_t *cfg, char *err, size_t errlen);

/* Frees everything cfg owns (all strings are malloc'd copies) and zeroes
 * it; safe on a zeroed cfg. */
void tg_config_free(tg_config_t *cfg);

/* Value of key in a section, or NULL. */
const char *tg_config_get(const tg_config_section_t *s, const char *key);

/* The integer at key of s (its decimal text: digits, no sign or leading
 * zero) into *out, def when the key is absent. -EINVAL with err
 * "<section>.<key>: '<value>' is not an integer in lo..hi" otherwise. */
int tg_config_get_uint(const tg_config_section_t *s, const char *section, const char *key, uint64_t lo, uint64_t hi,
                       uint64_t def, uint64_t *out, char *err, size_t errlen);

/* Reads the admin token (trimmed) from cfg->admin_token_file into a new
 * string the caller frees; NULL with err on failure (no token_file, missing
 * or unreadable file, empty, over 4096 bytes, inner whitespace). A file that
 * group or others may access is only a warning, logged with tg_log. */
char *tg_config_read_token(const tg_config_t *cfg, char *err, size_t errlen);

#endif
