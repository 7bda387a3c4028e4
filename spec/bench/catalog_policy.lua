-- Policy of the "catalog" tenant in spec/bench/run.sh (the second row): a publisher's policy
-- doing the kind of work a real one does on every DiscoverResources, so that the row measures
-- the Lua pipeline and not only the C around it.
--
--   skip        robots.txt and the favicon are free (no URI of the benchmark is)
--   rate_limit  one bucket per AI system (per address when anonymous), at a rate and burst
--               no benchmark reaches: the limiter runs on every call and never denies
--   price       from the catalog's amount: the dearest declared usage purpose, times a
--               factor per user type, with an age band from the content's lastmod; a purpose
--               the offer's licence does not permit is not for sale
--
-- The benchmark's AI system declares ai-input and ai-index as a commercial user, so each
-- "use" offer costs 100% x 120% x the age band of its catalog amount; "purchase" offers
-- (licence "all") get the same factors.

local money = require("tollgate.money")

local DAY = 24 * 3600
local YEAR = 365 * DAY

local FREE_PATHS = { ["/robots.txt"] = true, ["/favicon.ico"] = true }

-- Percent of the catalog amount per usage purpose (RSL tokens).
local PURPOSE_PCT = {
  ["search"] = 0,
  ["ai-index"] = 80,
  ["ai-input"] = 100,
  ["ai-train"] = 400,
  ["ai-all"] = 400,
  ["all"] = 400,
}
local UNDECLARED_PCT = 400 -- saying nothing about the use pays as for the dearest

-- Percent per RSL user type; nil (not said) pays as commercial.
local USER_PCT = {
  ["commercial"] = 120,
  ["non-commercial"] = 60,
  ["education"] = 40,
  ["personal"] = 80,
  ["government"] = 100,
}
local UNDECLARED_USER_PCT = 120

-- Age bands from the content's lastmod: fresh costs more, the archive less.
local FRESH_PCT, ARCHIVE_PCT = 150, 70

local function permitted(offer, purpose)
  local list = offer.purposes
  if #list == 0 then return true end
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
  if req.ai_id ~= nil then return "ai:" .. req.ai_id, 1000000000, 1000000000 end
  return "ip:" .. (req.ip or "unknown"), 1000000000, 1000000000
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
      if want == nil or not permitted(offer, p) then return nil end
      if pct == nil or want > pct then pct = want end
    end
  end
  if pct == 0 then return 0, offer.currency end

  local user_pct = UNDECLARED_USER_PCT
  if req.user_type ~= nil then
    user_pct = USER_PCT[req.user_type]
    if user_pct == nil then return nil end
  end

  local amount = money.percent(money.percent(offer.amount, pct), user_pct)
  if offer.lastmod then
    local age = tollgate.now() - offer.lastmod
    if age < 30 * DAY then
      amount = money.percent(amount, FRESH_PCT)
    elseif age > YEAR then
      amount = money.percent(amount, ARCHIVE_PCT)
    end
  end
  return amount, offer.currency
end

local NOW = 1800000000
local OFFER = { uri = "https://catalog.example/articles/2021/03/story-1", model = "use", amount = 2000,
                currency = "USD", purposes = { "ai-input", "ai-index", "search" }, lastmod = NOW - 2 * YEAR }

local function offer(fields)
  local o = {}
  for k, v in pairs(OFFER) do o[k] = v end
  for k, v in pairs(fields or {}) do o[k] = v end
  return o
end

P.fixtures = {
  { name = "the benchmark's caller", hook = "price", now = NOW, offer = offer(),
    req = { ai_id = "sys-bench-01", purposes = { "ai-input", "ai-index" }, user_type = "commercial" },
    expect = { 1680, "USD" } },
  { name = "education, fresh", hook = "price", now = NOW, offer = offer({ lastmod = NOW - DAY }),
    req = { ai_id = "b", purpose = "ai-input", user_type = "education" }, expect = { 1200, "USD" } },
  { name = "search is free", hook = "price", now = NOW, offer = offer(), req = { purpose = "search" },
    expect = { 0, "USD" } },
  { name = "not permitted", hook = "price", now = NOW, offer = offer(), req = { purpose = "ai-train" },
    expect = {} },
  { name = "never denies", hook = "rate_limit", req = { ai_id = "b" }, expect = { "ai:b", 1000000000, 1000000000 } },
  { name = "articles are paid", hook = "skip", req = { path = "/articles/2021/03/story-1" }, expect = { false } },
}

return P
