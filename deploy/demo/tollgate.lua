-- The demo gateway: two example tenants on loopback. Format: core/config.h.
-- Start it from the repository root with `deploy/dev.sh run`, or
--   build/tollgate run -c deploy/demo/tollgate.lua
-- Paths are relative to this folder. Try it with a Host header:
--   curl -H 'Host: news.example' http://127.0.0.1:8080/healthz

-- HTTP 402 payments (x402 v1/v2, t402) for both tenants: a test token on a
-- local chain. `node spec/interop/lib/chain.js --demo` starts that chain
-- (anvil, chain id 84532 = Base Sepolia's, so version 1 clients know it as
-- "base-sepolia"), deploys the EIP-3009 test token at the address below and
-- runs the real x402 facilitator on 127.0.0.1:4021; `node spec/interop/pay.js`
-- pays with the real clients. Prices come from each tenant's catalog and
-- policy (micro-USD); at 6 decimals one micro-USD is one atomic unit.
local DEMO_PAYMENTS = {
  accepts = {
    { network = "eip155:84532", network_v1 = "base-sepolia",
      asset = "0x5FbDB2315678afecb367f032d93F642f64180aa3", -- the test token (anvil's first deployment)
      name = "USDC", version = "2",                         -- its EIP-712 domain
      pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906", -- demo: put your wallet here
      decimals = 6, max_timeout_s = 60 },
  },
  facilitators = { "http://127.0.0.1:4021" },
  rpc = { "http://127.0.0.1:8545" },  -- the chain, asked by the settlement queue (and verify = "local")
  description = "Licensed content, paid per request",
}

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
      billing = { type = "builtin" },
      payments = DEMO_PAYMENTS },

    -- A metered API paid per call over x402 or t402 (the test token), or
    -- bought through the exchange and fetched from its Akamai-style edge.
    { name = "api",
      hosts = { "api.example" },
      catalog = { source = "rsl/api.xml" },
      policy = "../../policies/metered_api.lua",
      signer = { type = "akamai_edgeauth", base_url = "https://edge.api.example",
                 key_file = "keys/api.key", ttl_s = 120 },
      billing = { type = "builtin" },
      payments = DEMO_PAYMENTS },
  },
}

