-- The demo gateway: two example tenants on loopback. Format: core/config.h.
-- Start it from the repository root with `deploy/dev.sh run`, or
--   build/tollgate run -c deploy/demo/tollgate.lua
-- Paths are relative to this folder. Try it with a Host header:
--   curl -H 'Host: news.example' http://127.0.0.1:8080/healthz

return {
  listen = { { host = "127.0.0.1", port = 8080 } },

  -- admin.token and keys/*.key hold values for the demo only: anyone can
  -- read them here. A real deployment makes its own (openssl rand -hex 24)
  -- and keeps them readable by the gateway's user alone.
  admin = { host = "127.0.0.1", port = 9090, token_file = "admin.token" },

  workers = 0,                          -- one per core
  data_dir = "../../.cache/demo-data",  -- .cache/ is not committed
  log_level = "info",

  -- The built-in prepaid ledger and its write-ahead log (data_dir/wal). The
  -- demo account is funded once with 10 USD (amounts are micro-USD); top it
  -- up on the admin listener (POST /ledger/topup).
  ledger = {
    accounts = { { billing_reference = "acct-demo", currency = "USD", amount = 10000000,
                   reference = "demo-opening-credit" } },
  },

  tenants = {
    -- A publisher: licensed content described by RSL, delivered from its
    -- CDN (here an nginx with secure_link on 127.0.0.1:8081) by signed links.
    { name = "news",
      hosts = { "news.example", "localhost" },
      catalog = { source = "rsl/news.xml", refresh_s = 300 },
      policy = "../../policies/news_publisher.lua",
      signer = { type = "nginx_secure_link", base_url = "http://127.0.0.1:8081",
                 key_file = "keys/news.key", ttl_s = 300 },
      billing = { type = "builtin" } },

    -- A metered API paid per call over x402 (Base Sepolia, test USDC), or
    -- bought through the exchange and fetched from its Akamai-style edge.
    { name = "api",
      hosts = { "api.example" },
      catalog = { source = "rsl/api.xml" },
      policy = "../../policies/metered_api.lua",
      signer = { type = "akamai_edgeauth", base_url = "https://edge.api.example",
                 key_file = "keys/api.key", ttl_s = 120 },
      billing = { type = "builtin" },
      payments = {
        x402 = {
          network = "eip155:84532",
          asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e", -- USDC on Base Sepolia
          extra = { name = "USDC", version = "2" },            -- its EIP-712 domain
          pay_to = "0x000000000000000000000000000000000000dEaD", -- demo: put your wallet here
          -- Prices come from rsl/api.xml and the policy's price hook, the
          -- same for HTTP requests and DiscoverResources.
          max_timeout_s = 60,
        },
      } },
  },
}
