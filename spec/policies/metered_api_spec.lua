-- policies/metered_api.lua: per-call prices, a free tier held by the rate
-- limiter (shared by all workers), exports never free.
local harness = require("tollgate.harness")

local FREE = { ["X-Tier"] = "free" }

describe("metered_api policy", function()
  local p

  before_each(function()
    p = harness.load("policies/metered_api.lua", { tenant = "api" })
  end)

  local call = { uri = "https://api.example/v1/quotes/ACME", model = "use", amount = 2000 }
  local export = { uri = "https://api.example/v1/export/quotes", model = "use", amount = 2000 }

  local function price(offer, req)
    return { p:price(harness.offer(offer), harness.req(req)) }
  end

  local function limit(req)
    return { p:rate_limit(harness.req(req)) }
  end

  it("passes its own fixtures", function()
    assert.is_true(p:fixtures() >= 13)
  end)

  describe("skip", function()
    it("leaves liveness and documentation open", function()
      for _, path in ipairs({ "/healthz", "/v1/status", "/docs/", "/docs/quotes.html" }) do
        assert.is_true(p:skip(harness.req({ path = path })), path)
      end
    end)

    it("meters every endpoint", function()
      for _, path in ipairs({ "/", "/v1/quotes/ACME", "/v1/export/quotes", "/v1/status/x", "/docsx" }) do
        assert.is_false(p:skip(harness.req({ path = path })), path)
      end
    end)
  end)

  describe("paid tier", function()
    it("charges the catalog price per call", function()
      assert.are.same({ 2000, "USD" }, price(call, { path = "/v1/quotes/ACME", ai_id = "bot-1", purpose = "ai-input" }))
      assert.are.same({ 2000, "USD" }, price(call, { path = "/v1/quotes/ACME" }))
    end)

    it("prices an export as ten calls", function()
      assert.are.same({ 20000, "USD" }, price(export, { path = "/v1/export/quotes", ai_id = "bot-1" }))
    end)

    it("does not sell training use per call", function()
      for _, purpose in ipairs({ "ai-train", "ai-all", "all" }) do
        assert.are.same({}, price(call, { path = "/v1/quotes/ACME", purpose = purpose }), purpose)
      end
      assert.are.same({}, price(call, { path = "/v1/quotes/ACME", purposes = { "ai-input", "ai-train" } }))
    end)

    it("offers without amount or currency are not for sale", function()
      assert.are.same({}, price({ amount = harness.NONE }, { path = "/v1/quotes/ACME" }))
      assert.are.same({}, price({ currency = harness.NONE }, { path = "/v1/quotes/ACME" }))
    end)

    it("limits each AI system to 50 calls a second, bursts of 100", function()
      assert.are.same({ "paid:ai:bot-1", 50, 100 }, limit({ path = "/v1/quotes/ACME", ai_id = "bot-1" }))
    end)

    it("limits anonymous callers per IP address, tighter", function()
      assert.are.same({ "paid:ip:198.51.100.1", 5, 10 }, limit({ path = "/v1/quotes/ACME", ip = "198.51.100.1" }))
    end)
  end)

  describe("free tier", function()
    it("costs nothing when asked for by header (any case)", function()
      assert.are.same({ 0, "USD" }, price(call, { path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE }))
      assert.are.same({ 0, "USD" }, price(call, { path = "/v1/quotes/ACME", headers = { ["x-tier"] = "FREE" } }))
    end)

    it("ignores other tiers", function()
      assert.are.same({ 2000, "USD" }, price(call, { path = "/v1/quotes/ACME", headers = { ["X-Tier"] = "gold" } }))
    end)

    it("is for reads only: exports and writes pay", function()
      assert.are.same({ 20000, "USD" }, price(export, { path = "/v1/export/quotes", ai_id = "bot-1", headers = FREE }))
      assert.are.same({ 2000, "USD" }, price(call, { method = "POST", path = "/v1/quotes/ACME", headers = FREE }))
      assert.are.same({ "paid:ai:bot-1", 50, 100 },
        limit({ path = "/v1/export/quotes", ai_id = "bot-1", headers = FREE }))
    end)

    it("is an allowance in the shared rate limiter: 100 calls an hour per AI system", function()
      local key, rate, burst = p:rate_limit(harness.req({ path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE }))
      assert.are.equal("free:ai:bot-1", key)
      assert.are.equal(100, burst)
      assert.is_true(math.abs(rate * 3600 - 100) < 1e-9)
    end)

    it("gives anonymous callers 20 calls an hour per IP address", function()
      local key, rate, burst = p:rate_limit(harness.req({ path = "/v1/quotes/ACME", ip = "198.51.100.1", headers = FREE }))
      assert.are.equal("free:ip:198.51.100.1", key)
      assert.are.equal(20, burst)
      assert.is_true(math.abs(rate * 3600 - 20) < 1e-9)
    end)

    it("keeps the free and the paid allowance of one caller apart", function()
      local free = p:rate_limit(harness.req({ path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE }))
      local paid = p:rate_limit(harness.req({ path = "/v1/quotes/ACME", ai_id = "bot-1" }))
      assert.are_not.equal(free, paid)
    end)

    it("holds no per-worker counter: the thousandth free call is still free and still limited", function()
      local req = harness.req({ path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE })
      for _ = 1, 1000 do
        assert.are.same({ 0, "USD" }, { p:price(harness.offer(call), req) })
      end
      assert.are.equal("free:ai:bot-1", (p:rate_limit(req)))
    end)
  end)

  describe("on_billing_timeout", function()
    it("defers up to one cent for identified callers", function()
      assert.are.equal("deferred", p:on_billing_timeout(harness.txn({ amount = 2000 })))
      assert.are.equal("deferred", p:on_billing_timeout(harness.txn({ amount = 10000 })))
    end)

    it("refuses more, and anonymous callers", function()
      assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = 10001 })))
      assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = 2000, ai_id = harness.NONE })))
    end)
  end)

  it("logs settlement failures", function()
    p:on_settle_failure(harness.txn({ id = "t7", reason = "error" }))
    assert.are.same({ { level = "warn", message = "metered call t7 could not be settled: error" } }, p.logs)
  end)

  it("logs an x402 settlement failure with the payer and the chain's reason", function()
    p:on_settle_failure(harness.txn({ id = "t8", reason = "error", error = "insufficient_funds",
                                      payer = "0xabc", network = "eip155:84532", billing_ref = harness.NONE }))
    assert.are.same({ { level = "warn", message = "metered call t8 could not be settled: error: " ..
      "insufficient_funds (payer 0xabc on eip155:84532)" } }, p.logs)
  end)

  describe("settle", function()
    local function settle(amount, path)
      return p:settle(harness.http({ path = path or "/v1/quotes/ACME" }), harness.sale({ amount = amount }))
    end

    it("serves calls up to a cent first and settles after", function()
      assert.are.equal("async", settle(2000))
      assert.are.equal("async", settle(10000))
      assert.are.equal("async", settle(0))
    end)

    it("settles larger sums, such as exports, before serving", function()
      assert.are.equal("sync", settle(10001))
      assert.are.equal("sync", settle(20000, "/v1/export/quotes"))
    end)
  end)
end)
