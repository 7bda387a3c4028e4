-- policies/strict.lua: only allowed purposes, identified callers, tight
-- limits, nothing deferred.
local harness = require("tollgate.harness")

describe("strict policy", function()
  local p

  before_each(function()
    p = harness.load("policies/strict.lua", { tenant = "docs" })
  end)

  local guide = { uri = "https://docs.example/guide", purposes = { "ai-input", "search" } }

  local function price(offer, req)
    return { p:price(harness.offer(offer), harness.req(req)) }
  end

  it("passes its own fixtures", function()
    assert.is_true(p:fixtures() >= 8)
  end)

  describe("price", function()
    it("sells allowed purposes to identified callers at the catalog price", function()
      assert.are.same({ 15000, "USD" }, price(guide, { ai_id = "bot-1", purpose = "ai-input" }))
      assert.are.same({ 15000, "USD" }, price(guide, { ai_id = "bot-1", purpose = "search" }))
      assert.are.same({ 15000, "USD" }, price(guide, { ai_id = "bot-1", purposes = { "search", "ai-input" } }))
    end)

    it("refuses every purpose not explicitly allowed", function()
      -- (a token outside RSL's never reaches a hook: the gateway drops it)
      for _, purpose in ipairs({ "ai-train", "ai-index", "ai-all", "all" }) do
        assert.are.same({}, price({ purposes = { "all" } }, { ai_id = "bot-1", purpose = purpose }), purpose)
      end
    end)

    it("refuses a request when any one of its purposes is not allowed", function()
      assert.are.same({}, price(guide, { ai_id = "bot-1", purposes = { "ai-input", "ai-train" } }))
    end)

    it("refuses purposes the offer's license does not permit", function()
      assert.are.same({}, price({ purposes = { "search" } }, { ai_id = "bot-1", purpose = "ai-input" }))
      assert.are.same({ 15000, "USD" }, price({ purposes = { "ai-all" } }, { ai_id = "bot-1", purpose = "ai-input" }))
      assert.are.same({ 15000, "USD" }, price({}, { ai_id = "bot-1", purpose = "ai-input" }))
    end)

    it("refuses callers without an identity or a declared purpose", function()
      assert.are.same({}, price(guide, { purpose = "ai-input" }))
      assert.are.same({}, price(guide, { ai_id = "bot-1" }))
    end)

    it("sells in USD and USDC only", function()
      assert.are.same({ 15000, "USDC" }, price({ currency = "USDC" }, { ai_id = "bot-1", purpose = "search" }))
      assert.are.same({}, price({ currency = "EUR" }, { ai_id = "bot-1", purpose = "search" }))
      assert.are.same({}, price({ currency = harness.NONE }, { ai_id = "bot-1", purpose = "search" }))
    end)

    it("gives no discount, and keeps free offers free", function()
      assert.are.same({ 7, "USD" }, price({ amount = 7 }, { ai_id = "bot-1", purpose = "search" }))
      assert.are.same({ 0, "USD" }, price({ model = "free", amount = harness.NONE }, { ai_id = "bot-1", purpose = "search" }))
      assert.are.same({}, price({ amount = harness.NONE }, { ai_id = "bot-1", purpose = "search" }))
    end)
  end)

  describe("skip", function()
    it("serves only robots.txt and the health check without payment, and only to GET", function()
      assert.is_true(p:skip(harness.req({ path = "/robots.txt" })))
      assert.is_true(p:skip(harness.req({ path = "/healthz" })))
      assert.is_false(p:skip(harness.req({ path = "/healthz", method = "POST" })))
      assert.is_false(p:skip(harness.req({ path = "/favicon.ico" })))
      assert.is_false(p:skip(harness.req({ path = "/guide" })))
    end)
  end)

  describe("rate_limit", function()
    it("allows an AI system one request a second, bursts of 3", function()
      assert.are.same({ "ai:bot-1", 1, 3 }, { p:rate_limit(harness.req({ ai_id = "bot-1" })) })
    end)

    it("allows an anonymous IP address one request every 5 seconds", function()
      assert.are.same({ "anon:192.0.2.10", 0.2, 1 }, { p:rate_limit(harness.req()) })
    end)
  end)

  describe("on_billing_timeout", function()
    it("never defers, whatever the amount or the caller", function()
      for _, amount in ipairs({ 0, 1, 15000, 9007199254740992 }) do
        assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = amount })))
      end
      assert.are.equal("reject", p:on_billing_timeout(harness.txn({ ai_id = harness.NONE })))
    end)
  end)

  it("logs settlement failures as errors", function()
    p:on_settle_failure(harness.txn({ id = "t3", reason = "timeout" }))
    assert.are.same({ { level = "error", message = "settlement failed for t3 (timeout): reconcile by hand" } }, p.logs)
  end)
end)
