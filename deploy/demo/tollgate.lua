-- The demo gateway: two example tenants on loopback. Format: core/config.h.
-- Start it from the repository root with `deploy/dev.sh run`, or
--   build/tollgate run -c deploy/demo/tollgate.lua
-- Paths are relative to this folder. Try it with a Host header:
--   curl -H 'Host: news.example' http://127.0.0.1:8080/healthz

return {
  listen = { { host = "127.0.0.1", port = 8080 } },

  -- admin.token and keys/news.key hold values for the demo only: anyone can
  -- read them here. A real deployment makes its own (openssl rand -hex 24)
  -- and keeps them readable by the gateway's user alone. (keys/news.key is
  -- for the news signer, which the next issue adds: see below.)
  admin = { host = "127.0.0.1", port = 9090, token_file = "admin.token" },

  workers = 0,                          -- one per core
  data_dir = "../../.cache/demo-data",  -- .cache/ is not committed
  log_level = "info",

  tenants = {
    -- A publisher: licensed content described by RSL. The next issue adds
    -- its delivery by signed links that nginx secure_link verifies and its
    -- built-in billing; until they exist the configuration refuses them:
    --   signer = { type = "nginx_secure_link", base_url = "http://127.0.0.1:8081",
    --              key_file = "keys/news.key", ttl_s = 300 },
    --   billing = { type = "builtin" },
    { name = "news",
      hosts = { "news.example", "localhost" },
      catalog = { source = "rsl/news.xml", refresh_s = 300 },
      policy = "../../policies/news_publisher.lua" },

    -- A metered API paid per call over x402 (Base Sepolia, test USDC).
    -- billing = { type = "builtin" } comes with the next issue, as above.
    { name = "api",
      hosts = { "api.example" },
      catalog = { source = "rsl/api.xml" },
      policy = "../../policies/metered_api.lua",
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
