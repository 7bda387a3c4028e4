-- policies/news_publisher.lua: prices by purpose and freshness, per-AI limits.
local harness = require("tollgate.harness")

local NOW = 1700000000
local HOUR, DAY = 3600, 86400

describe("news_publisher policy", function()
  local p

  before_each(function()
    p = harness.load("policies/news_publisher.lua", { tenant = "news", now = NOW })
  end)

  local function price(offer, req)
    return { p:price(harness.offer(offer), harness.req(req)) }
  end

  local article = { lastmod = NOW - 3 * DAY } -- neither fresh nor archive

  it("passes its own fixtures", function()
    assert.is_true(p:fixtures() >= 10)
  end)

  describe("skip", function()
    it("serves robots.txt, the health check and the favicon without payment", function()
      for _, path in ipairs({ "/robots.txt", "/healthz", "/favicon.ico" }) do
        assert.is_true(p:skip(harness.req({ path = path })), path)
      end
    end)

    it("charges for everything else, including look-alikes", function()
      for _, path in ipairs({ "/", "/2023/11/14/budget", "/robots.txt.bak", "/healthz/paywall", "/ROBOTS.TXT" }) do
        assert.is_false(p:skip(harness.req({ path = path })), path)
      end
    end)
  end)

  describe("price by purpose", function()
    it("search is free", function()
      assert.are.same({ 0, "USD" }, price(article, { purpose = "search" }))
    end)

    it("ai-input and ai-index pay the catalog price", function()
      assert.are.same({ 15000, "USD" }, price(article, { purpose = "ai-input" }))
      assert.are.same({ 15000, "USD" }, price(article, { purpose = "ai-index" }))
    end)

    it("training pays four times the catalog price, as do ai-all and all", function()
      for _, purpose in ipairs({ "ai-train", "ai-all", "all" }) do
        assert.are.same({ 60000, "USD" }, price(article, { purpose = purpose }), purpose)
      end
    end)

    it("a request without a declared purpose pays the catalog price", function()
      assert.are.same({ 15000, "USD" }, price(article, {}))
    end)

    it("several purposes pay for the dearest", function()
      assert.are.same({ 60000, "USD" }, price(article, { purposes = { "search", "ai-train", "ai-input" } }))
      assert.are.same({ 15000, "USD" }, price(article, { purposes = { "search", "ai-input" } }))
    end)

    it("never sees an unknown purpose: the gateway drops tokens outside RSL's", function()
      assert.has_error(function() harness.connect({ purpose = "tdm" }) end)
      assert.has_error(function() harness.connect({ purposes = { "search", "resell" } }) end)
    end)

    it("a purpose the license does not permit is not for sale", function()
      local o = { lastmod = article.lastmod, purposes = { "search", "ai-input" } }
      assert.are.same({}, price(o, { purpose = "ai-train" }))
      assert.are.same({ 15000, "USD" }, price(o, { purpose = "ai-input" }))
    end)

    it("understands RSL's umbrella tokens in the license", function()
      local ai = { lastmod = article.lastmod, purposes = { "ai-all" } }
      assert.are.same({ 60000, "USD" }, price(ai, { purpose = "ai-train" }))
      assert.are.same({}, price(ai, { purpose = "search" }))
      local all = { lastmod = article.lastmod, purposes = { "all" } }
      assert.are.same({ 0, "USD" }, price(all, { purpose = "search" }))
    end)

    it("keeps the offer's currency", function()
      assert.are.same({ 15000, "USDC" }, price({ lastmod = article.lastmod, currency = "USDC" }, { purpose = "ai-input" }))
    end)

    it("free offers stay free; offers without amount or currency are not for sale", function()
      assert.are.same({ 0, "USD" }, price({ model = "free", amount = harness.NONE }, { purpose = "ai-train" }))
      assert.are.same({}, price({ amount = harness.NONE }, { purpose = "ai-input" }))
      assert.are.same({}, price({ currency = harness.NONE }, { purpose = "ai-input" }))
    end)
  end)

  describe("price by freshness", function()
    it("articles modified within 24 hours cost 50% more", function()
      assert.are.same({ 22500, "USD" }, price({ lastmod = NOW - HOUR }, { purpose = "ai-input" }))
      assert.are.same({ 22500, "USD" }, price({ lastmod = NOW - DAY + 1 }, { purpose = "ai-input" }))
      assert.are.same({ 90000, "USD" }, price({ lastmod = NOW - HOUR }, { purpose = "ai-train" }))
    end)

    it("the premium ends after 24 hours", function()
      assert.are.same({ 15000, "USD" }, price({ lastmod = NOW - DAY }, { purpose = "ai-input" }))
      p:set_now(NOW + DAY)
      assert.are.same({ 15000, "USD" }, price({ lastmod = NOW - HOUR }, { purpose = "ai-input" }))
    end)

    it("articles older than a year cost 40% less", function()
      assert.are.same({ 9000, "USD" }, price({ lastmod = NOW - 400 * DAY }, { purpose = "ai-input" }))
      assert.are.same({ 36000, "USD" }, price({ lastmod = NOW - 400 * DAY }, { purpose = "ai-train" }))
      assert.are.same({ 15000, "USD" }, price({ lastmod = NOW - 364 * DAY }, { purpose = "ai-input" }))
    end)

    it("an offer without lastmod pays the plain price", function()
      assert.are.same({ 15000, "USD" }, price({}, { purpose = "ai-input" }))
    end)

    it("searching fresh articles is still free", function()
      assert.are.same({ 0, "USD" }, price({ lastmod = NOW - HOUR }, { purpose = "search" }))
    end)

    it("rounds odd amounts to whole micro-units, half up", function()
      -- 333 * 1.5 = 499.5 -> 500; 333 * 0.6 = 199.8 -> 200
      assert.are.same({ 500, "USD" }, price({ amount = 333, lastmod = NOW - HOUR }, { purpose = "ai-input" }))
      assert.are.same({ 200, "USD" }, price({ amount = 333, lastmod = NOW - 2 * 365 * DAY }, { purpose = "ai-input" }))
    end)
  end)

  describe("rate_limit", function()
    it("gives each AI system its own limit", function()
      assert.are.same({ "ai:bot-1", 20, 40 }, { p:rate_limit(harness.req({ ai_id = "bot-1", purpose = "ai-input" })) })
      assert.are.same({ "ai:bot-2", 20, 40 }, { p:rate_limit(harness.req({ ai_id = "bot-2" })) })
    end)

    it("holds training crawlers to a tighter one", function()
      assert.are.same({ "train:bot-1", 2, 10 },
        { p:rate_limit(harness.req({ ai_id = "bot-1", purposes = { "search", "ai-train" } })) })
      assert.are.same({ "train:bot-1", 2, 10 }, { p:rate_limit(harness.req({ ai_id = "bot-1", purpose = "all" })) })
    end)

    it("limits anonymous callers per IP address", function()
      assert.are.same({ "ip:192.0.2.10", 1, 5 }, { p:rate_limit(harness.req()) })
      assert.are.same({ "ip:unknown", 1, 5 }, { p:rate_limit(harness.req({ ip = harness.NONE })) })
    end)
  end)

  describe("on_billing_timeout", function()
    it("defers small sums of identified AI systems", function()
      assert.are.equal("deferred", p:on_billing_timeout(harness.txn({ amount = 50000 })))
      assert.are.equal("deferred", p:on_billing_timeout(harness.txn({ amount = 0 })))
    end)

    it("refuses larger sums and anonymous buyers", function()
      assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = 50001 })))
      assert.are.equal("reject", p:on_billing_timeout(harness.txn({ amount = 1, ai_id = harness.NONE })))
    end)
  end)

  describe("on_settle_failure", function()
    it("logs a warning with the transaction, not the billing reference", function()
      p:on_settle_failure(harness.txn({ id = "txn-42", amount = 60000, attempts = 3, reason = "error" }))
      assert.are.equal(1, #p.logs)
      assert.are.equal("warn", p.logs[1].level)
      assert.are.equal("settlement failed for txn-42 after 3 attempts (error), 0.06 USD", p.logs[1].message)
      assert.falsy(p.logs[1].message:find("1234", 1, true))
    end)
  end)
end)
