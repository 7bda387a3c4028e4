-- A news publisher that prices by what the content is used for and by how
-- fresh it is. Prices start from the catalog (the RSL <amount> of the offer,
-- an integer in micro-USD) and are adjusted here:
--
--   search               free (being found is worth more than the fee)
--   ai-index, ai-input   the catalog price
--   ai-train, ai-all, all  four times the catalog price (the content is kept)
--   fresh articles       +50% when lastmod is within the last 24 hours
--   archive              -40% when lastmod is more than a year old
--
-- A request that declares several purposes pays for the dearest one. Each AI
-- system has its own rate limit (training crawlers a tighter one), callers
-- that do not identify themselves share a small limit per IP address, and
-- robots.txt, the health check and the favicon are never charged.

local money = require("tollgate.money")

local DAY = 24 * 3600
local YEAR = 365 * DAY

local FREE_PATHS = { ["/robots.txt"] = true, ["/healthz"] = true, ["/favicon.ico"] = true }

-- Percent of the catalog price per usage purpose (RSL usage tokens).
local PURPOSE_PCT = {
  ["search"] = 0,
  ["ai-index"] = 100,
  ["ai-input"] = 100,
  ["ai-train"] = 400,
  ["ai-all"] = 400,
  ["all"] = 400,
}
local UNDECLARED_PCT = 100 -- no purpose declared: the catalog price
local FRESH_PREMIUM_PCT = 150
local ARCHIVE_PCT = 60

-- RSL's umbrella tokens: "all" permits every use, "ai-all" every AI use.
local function permitted(offer, purpose)
  local list = offer.purposes
  if #list == 0 then return true end -- the license lists no usage restriction
  for _, p in ipairs(list) do
    if p == purpose or p == "all" or (p == "ai-all" and purpose:find("^ai%-")) then return true end
  end
  return false
end

local P = {}

function P.skip(req)
  return FREE_PATHS[req.path] == true
end

function P.rate_limit(req)
  if req.ai_id == nil then
    return "ip:" .. (req.ip or "unknown"), 1, 5
  end
  for _, p in ipairs(req.purposes) do
    if p == "ai-train" or p == "ai-all" or p == "all" then
      return "train:" .. req.ai_id, 2, 10
    end
  end
  return "ai:" .. req.ai_id, 20, 40
end

function P.price(offer, req)
  if offer.model == "free" then return 0, offer.currency or "USD" end
  if offer.amount == nil or offer.currency == nil then return nil end

  local pct = UNDECLARED_PCT
  local purposes = req.purposes
  if #purposes > 0 then
    pct = nil
    for _, p in ipairs(purposes) do
      local want = PURPOSE_PCT[p]
      -- An unknown purpose, or one the license does not permit: not for sale.
      if want == nil or not permitted(offer, p) then return nil end
      if pct == nil or want > pct then pct = want end
    end
  end
  if pct == 0 then return 0, offer.currency end

  local amount = money.percent(offer.amount, pct)
  if offer.lastmod then
    local age = tollgate.now() - offer.lastmod
    if age < DAY then
      amount = money.percent(amount, FRESH_PREMIUM_PCT)
    elseif age > YEAR then
      amount = money.percent(amount, ARCHIVE_PCT)
    end
  end
  return amount, offer.currency
end

-- Small sums from an identified AI system are served and billed later; an
-- anonymous or large purchase waits for the billing service or is refused.
function P.on_billing_timeout(txn)
  if txn.ai_id ~= nil and txn.amount <= 50000 then return "deferred" end
  return "reject"
end

function P.on_settle_failure(txn)
  tollgate.log("warn", "settlement failed for " .. txn.id .. " after " .. (txn.attempts or 0) ..
    " attempts (" .. (txn.reason or "unknown") .. "), " .. money.to_decimal(txn.amount, 6) .. " " ..
    (txn.currency or "?"))
end

local NOW = 1700000000
local ARTICLE = { uri = "https://news.example/2023/11/14/budget", model = "purchase", amount = 15000,
                  currency = "USD", lastmod = NOW - 3 * DAY }

local function article(fields)
  local o = {}
  for k, v in pairs(ARTICLE) do o[k] = v end
  for k, v in pairs(fields or {}) do o[k] = v end
  return o
end

P.fixtures = {
  { name = "robots.txt is free", hook = "skip", req = { path = "/robots.txt" }, expect = { true } },
  { name = "articles are not", hook = "skip", req = { path = "/2023/11/14/budget" }, expect = { false } },
  { name = "RAG pays the catalog price", hook = "price", now = NOW, offer = article(),
    req = { purpose = "ai-input", ai_id = "bot-1" }, expect = { 15000, "USD" } },
  { name = "search is free", hook = "price", now = NOW, offer = article(),
    req = { purpose = "search" }, expect = { 0, "USD" } },
  { name = "training costs 4x", hook = "price", now = NOW, offer = article(),
    req = { purpose = "ai-train" }, expect = { 60000, "USD" } },
  { name = "fresh training costs 4x +50%", hook = "price", now = NOW,
    offer = article({ lastmod = NOW - 3600 }), req = { purpose = "ai-train" }, expect = { 90000, "USD" } },
  { name = "archive RAG -40%", hook = "price", now = NOW, offer = article({ lastmod = NOW - 2 * YEAR }),
    req = { purpose = "ai-input" }, expect = { 9000, "USD" } },
  { name = "the dearest purpose wins", hook = "price", now = NOW, offer = article(),
    req = { purposes = { "search", "ai-train" } }, expect = { 60000, "USD" } },
  { name = "a use the license does not permit", hook = "price", now = NOW,
    offer = article({ purposes = { "search", "ai-input" } }), req = { purpose = "ai-train" }, expect = {} },
  { name = "training crawlers get the tight limit", hook = "rate_limit",
    req = { ai_id = "bot-1", purpose = "ai-train" }, expect = { "train:bot-1", 2, 10 } },
  { name = "anonymous callers share a limit per IP", hook = "rate_limit", req = { ip = "198.51.100.7" },
    expect = { "ip:198.51.100.7", 1, 5 } },
  { name = "small sums are deferred", hook = "on_billing_timeout",
    txn = { id = "t1", amount = 15000, currency = "USD", ai_id = "bot-1" }, expect = { "deferred" } },
  { name = "large sums are refused", hook = "on_billing_timeout",
    txn = { id = "t2", amount = 90000, currency = "USD", ai_id = "bot-1" }, expect = { "reject" } },
}

return P
