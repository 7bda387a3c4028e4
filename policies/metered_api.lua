-- A data API metered per call, with a free tier.
--
-- Paid tier: every call costs the catalog price of its endpoint (the RSL
-- <amount>, e.g. 0.002 USD = 2000 micro-USD per call), bulk exports cost
-- ten calls, and each AI system may make 50 calls a second (bursts of 100).
--
-- Free tier: a caller that sends `X-Tier: free` on an eligible endpoint pays
-- nothing, within FREE_CALLS calls per FREE_WINDOW_S per AI system (per IP
-- address for callers that do not identify themselves). Past that allowance
-- the gateway answers 429 with Retry-After; the caller waits, or drops the
-- header and pays. Exports are never free.
--
-- Why the allowance lives in the rate limiter and not in a counter here:
-- hook state (upvalues, module locals) is per worker thread and per Lua
-- state, and a reload starts it afresh. A counter in `price` would give each
-- worker its own allowance (up to workers x FREE_CALLS per window) and hand
-- out a new one on every reload. The rate limiter is shared by all workers
-- of an instance (and by all instances in Redis mode), so the allowance it
-- enforces is the one written below. It is a GCRA bucket: FREE_CALLS at once
-- when unused, refilling at FREE_CALLS per window, so the long-run average is
-- exact and no single window sees more than about twice FREE_CALLS.

local FREE_CALLS = 100           -- per AI system per window
local FREE_WINDOW_S = 3600
local ANON_FREE_CALLS = 20       -- per IP address per window, for callers without an AI identity
local PAID_RATE, PAID_BURST = 50, 100
local ANON_PAID_RATE, ANON_PAID_BURST = 5, 10
local EXPORT_CALLS = 10          -- an export is priced as this many calls
local DEFER_UP_TO = 10000        -- micro-USD: 1 cent, about five calls

-- Documentation and liveness never need payment.
local function is_open(path)
  return path == "/healthz" or path == "/v1/status" or path:find("^/docs/") ~= nil
end

local function is_export(path)
  return path:find("^/v1/export/") ~= nil
end

-- The free tier is asked for by header, and only reads qualify.
local function free_tier(req)
  local tier = req:header("x-tier")
  return tier ~= nil and tier:lower() == "free" and req.method == "GET" and not is_export(req.path)
end

local function caller(req)
  if req.ai_id ~= nil then return "ai:" .. req.ai_id end
  return "ip:" .. (req.ip or "unknown")
end

local P = {}

function P.skip(req)
  return is_open(req.path)
end

function P.rate_limit(req)
  local who = caller(req)
  local anonymous = req.ai_id == nil
  if free_tier(req) then
    local calls = anonymous and ANON_FREE_CALLS or FREE_CALLS
    return "free:" .. who, calls / FREE_WINDOW_S, calls
  end
  if anonymous then return "paid:" .. who, ANON_PAID_RATE, ANON_PAID_BURST end
  return "paid:" .. who, PAID_RATE, PAID_BURST
end

function P.price(offer, req)
  -- Training on the data is licensed by contract, not per call.
  for _, p in ipairs(req.purposes) do
    if p == "ai-train" or p == "ai-all" or p == "all" then return nil end
  end
  local currency = offer.currency or "USD"
  if offer.model == "free" or free_tier(req) then return 0, currency end
  if offer.amount == nil or offer.currency == nil then return nil end
  if is_export(req.path) then return offer.amount * EXPORT_CALLS, currency end
  return offer.amount, currency
end

function P.on_billing_timeout(txn)
  if txn.ai_id ~= nil and txn.amount <= DEFER_UP_TO then return "deferred" end
  return "reject"
end

function P.on_settle_failure(txn)
  tollgate.log("warn", "metered call " .. txn.id .. " could not be settled: " .. (txn.reason or "unknown"))
end

local CALL = { uri = "https://api.example/v1/quotes/ACME", model = "use", amount = 2000, currency = "USD" }
local EXPORT = { uri = "https://api.example/v1/export/quotes", model = "use", amount = 2000, currency = "USD" }
local FREE = { ["X-Tier"] = "free" }

P.fixtures = {
  { name = "status is open", hook = "skip", req = { path = "/v1/status" }, expect = { true } },
  { name = "quotes are not", hook = "skip", req = { path = "/v1/quotes/ACME" }, expect = { false } },
  { name = "a paid call", hook = "price", offer = CALL,
    req = { path = "/v1/quotes/ACME", ai_id = "bot-1", purpose = "ai-input" }, expect = { 2000, "USD" } },
  { name = "a free-tier call", hook = "price", offer = CALL,
    req = { path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE }, expect = { 0, "USD" } },
  { name = "exports are never free", hook = "price", offer = EXPORT,
    req = { path = "/v1/export/quotes", ai_id = "bot-1", headers = FREE }, expect = { 20000, "USD" } },
  { name = "no per-call training", hook = "price", offer = CALL,
    req = { path = "/v1/quotes/ACME", purpose = "ai-train" }, expect = {} },
  { name = "free-tier allowance", hook = "rate_limit",
    req = { path = "/v1/quotes/ACME", ai_id = "bot-1", headers = FREE },
    expect = { "free:ai:bot-1", FREE_CALLS / FREE_WINDOW_S, FREE_CALLS } },
  { name = "paid limit", hook = "rate_limit", req = { path = "/v1/quotes/ACME", ai_id = "bot-1" },
    expect = { "paid:ai:bot-1", PAID_RATE, PAID_BURST } },
  { name = "cents are deferred", hook = "on_billing_timeout",
    txn = { id = "t1", amount = 2000, currency = "USD", ai_id = "bot-1" }, expect = { "deferred" } },
  { name = "exports are not", hook = "on_billing_timeout",
    txn = { id = "t2", amount = 20000, currency = "USD", ai_id = "bot-1" }, expect = { "reject" } },
}

return P
