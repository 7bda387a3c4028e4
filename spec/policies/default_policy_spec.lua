-- lua/default_policy.lua: what tenants without a policy get.
local harness = require("tollgate.harness")

describe("default policy", function()
  local p

  before_each(function()
    p = harness.load("lua/default_policy.lua", { tenant = "plain" })
  end)

  it("passes its own fixtures", function()
    assert.is_true(p:fixtures() >= 4)
  end)

  it("skips nothing", function()
    for _, path in ipairs({ "/", "/robots.txt", "/healthz" }) do
      assert.is_false(p:skip(harness.req({ path = path })), path)
    end
  end)

  it("sets no rate limit", function()
    assert.are.equal(0, select("#", p:rate_limit(harness.req({ ai_id = "bot-1" }))))
  end)

  it("charges the catalog price, whatever the purpose", function()
    for _, purpose in ipairs({ "search", "ai-input", "ai-train" }) do
      assert.are.same({ 15000, "USD" }, { p:price(harness.offer(), harness.req({ purpose = purpose })) }, purpose)
    end
    assert.are.same({ 42, "USDC" }, { p:price(harness.offer({ amount = 42, currency = "USDC" }), harness.req()) })
  end)

  it("gives free offers away, in USD when the catalog names no currency", function()
    assert.are.same({ 0, "USD" }, { p:price(harness.offer({ model = "free", amount = harness.NONE }), harness.req()) })
    assert.are.same({ 0, "USDC" }, { p:price(harness.offer({ model = "free", currency = "USDC" }), harness.req()) })
    assert.are.same({ 0, "USD" },
      { p:price(harness.offer({ model = "free", amount = harness.NONE, currency = harness.NONE }), harness.req()) })
  end)

  it("does not sell offers without amount or currency", function()
    assert.are.equal(0, select("#", p:price(harness.offer({ amount = harness.NONE }), harness.req())))
    assert.are.equal(0, select("#", p:price(harness.offer({ currency = harness.NONE }), harness.req())))
  end)

  it("rejects on a billing timeout", function()
    assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = 1 })))
    assert.are.equal("reject", p:on_billing_timeout(harness.txn()))
  end)

  it("leaves settlement to the configuration: no settle hook", function()
    assert.is_false(p:has("settle"))
    assert.are.equal("sync", p:settle(harness.http(), harness.sale()))
    local async = harness.load("lua/default_policy.lua", { tenant = "plain", settle_default = "async" })
    assert.are.equal("async", async:settle(harness.http(), harness.sale()))
  end)

  it("answers like a policy that defines no hooks at all", function()
    local empty = harness.load_string("return {}", "empty.lua")
    local cases = {
      { harness.offer(), harness.req() },
      { harness.offer({ model = "free", amount = harness.NONE }), harness.req() },
      { harness.offer({ currency = harness.NONE }), harness.req() },
    }
    for _, c in ipairs(cases) do
      assert.are.same({ p:price(c[1], c[2]) }, { empty:price(c[1], c[2]) })
    end
    assert.are.equal(p:on_billing_timeout(harness.txn()), empty:on_billing_timeout(harness.txn()))
  end)
end)
