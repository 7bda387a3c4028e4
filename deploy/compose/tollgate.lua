-- The gateway of deploy/compose.yaml (format: core/config/config.h). Mounted at /etc/tollgate
-- with the demo's catalogs, keys and admin token and the repository's policies beside it, so the
-- relative paths below resolve there. Demo secrets only: anyone can read them in this repository.
return {
  listen = { { host = "0.0.0.0", port = 8080 } },
  admin = { host = "0.0.0.0", port = 9090, token_file = "admin.token" },
  workers = 2,
  data_dir = "/var/lib/tollgate",
  log_level = "info",
  limits = { shutdown_grace_ms = 10000 },   -- compose.yaml's stop_grace_period is 20s
  -- Redis: shared balances, idempotency keys and rate limits, and the log shipped to a stream.
  redis = { host = "redis", port = 6379, timeout_ms = 50 },
  rate_limit = { mode = "redis" },
  ledger = {
    mode = "redis",
    ship = { store = "redis" },
    accounts = { { billing_reference = "acct-demo", currency = "USD", amount = 10000000,
                   reference = "compose-opening-credit" } },
  },
  tenants = {
    -- Billed through the publisher's own system: here the stand-in service "billing".
    { name = "news",
      hosts = { "news.example", "localhost" },
      catalog = { source = "rsl/news.xml", refresh_s = 300 },
      policy = "policies/news_publisher.lua",
      signer = { type = "nginx_secure_link", base_url = "http://cdn.news.example",
                 key_file = "keys/news.key", ttl_s = 300 },
      billing = { type = "connect", url = "http://billing:8090", token_file = "billing.token",
                  deadline_ms = 30 } },
    -- Billed on the built-in prepaid ledger (balances in Redis).
    { name = "api",
      hosts = { "api.example" },
      catalog = { source = "rsl/api.xml" },
      policy = "policies/metered_api.lua",
      signer = { type = "akamai_edgeauth", base_url = "https://edge.api.example",
                 key_file = "keys/api.key", ttl_s = 120 },
      billing = { type = "builtin" } },
  },
}
