-- A data API metered per call, with a free tier.
--
-- Paid tier: every call costs the catalog price of its endpoint (the RSL
-- <amount>, e.g. 0.002 USD = 2000 micro-USD per call), bulk exports cost
-- ten calls, and each AI system may make 50 calls a second (bursts of 100).
--
-- Paid with x402/t402 (HTTP 402): calls up to SERVE_FIRST_UP_TO are served
-- at once and settled after (async), larger sums (exports) are settled
-- before the data leaves (sync); see P.settle for why.
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
local SERVE_FIRST_UP_TO = 10000  -- micro-USD: x402 payments up to this are settled after serving

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

-- Settling on chain takes a facilitator round trip (a second or more) that a
-- per-call API should not add to every call. Serving first risks a
-- settlement that fails after the data left (the payer moved the funds in
-- between; on_settle_failure then says who owes it): at most a cent per
-- call, and the paid rate limit bounds how many such calls a payer can make.
-- An export's worth of data is not handed over before the money has moved.
function P.settle(req, sale)
  if sale.amount <= SERVE_FIRST_UP_TO then return "async" end
  return "sync"
end

function P.on_settle_failure(txn)
  local msg = "metered call " .. txn.id .. " could not be settled: " .. (txn.reason or "unknown")
  if txn.error ~= nil then msg = msg .. ": " .. txn.error end
  -- An x402/t402 payment names who owes the call (served first: see P.settle).
  if txn.payer ~= nil then msg = msg .. " (payer " .. txn.payer .. " on " .. (txn.network or "?") .. ")" end
  tollgate.log("warn", msg)
end

local CALL = { uri = "https://api.example/v1/quotes/ACME", model = "use", amount = 2000, currency = "USD" }
local EXPORT = { uri = "https://api.example/v1/export/quotes", model = "use", amount = 2000, currency = "USD" }
local FREE = { ["X-Tier"] = "free" }
local function sale(amount)
  return { amount = amount, currency = "USD", network = "eip155:84532", scheme = "exact",
           asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e", payer = "0x857b06519E91e3A54538791bDbb0E22373e36b66" }
end

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
  { name = "a call is served, then settled", hook = "settle",
    req = { path = "/v1/quotes/ACME" }, sale = sale(2000), expect = { "async" } },
  { name = "one cent still is", hook = "settle",
    req = { path = "/v1/quotes/ACME" }, sale = sale(SERVE_FIRST_UP_TO), expect = { "async" } },
  { name = "an export is settled first", hook = "settle",
    req = { path = "/v1/export/quotes" }, sale = sale(20000), expect = { "sync" } },
}

return P
