-- A strict policy: sell only what is explicitly allowed, to callers who say
-- who they are, and never serve before the money is confirmed.
--
--   - Only the usage purposes in ALLOWED are for sale, and only when the
--     offer's license permits them too; anything else (training, no declared
--     purpose, an anonymous caller, a currency outside CURRENCIES) is not for
--     sale: price returns nil and the gateway refuses the request.
--   - The catalog price as is: no discounts, no free tier. Offers the
--     catalog marks free stay free.
--   - Tight rate limits: 1 request a second per AI system (bursts of 3);
--     anonymous callers get one request every 5 seconds per IP address.
--   - A billing service that does not answer in time means no sale: nothing
--     is ever deferred.
--   - Nothing skips payment except robots.txt and the health check.

local ALLOWED = { ["ai-input"] = true, ["search"] = true }
local CURRENCIES = { USD = true, USDC = true }

-- RSL's umbrella tokens: "all" permits every use, "ai-all" every AI use.
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
  return req.method == "GET" and (req.path == "/robots.txt" or req.path == "/healthz")
end

function P.rate_limit(req)
  if req.ai_id == nil then return "anon:" .. (req.ip or "unknown"), 0.2, 1 end
  return "ai:" .. req.ai_id, 1, 3
end

function P.price(offer, req)
  if req.ai_id == nil then return nil end
  local purposes = req.purposes
  if #purposes == 0 then return nil end
  for _, p in ipairs(purposes) do
    if not ALLOWED[p] or not permitted(offer, p) then return nil end
  end
  if offer.currency == nil or not CURRENCIES[offer.currency] then return nil end
  if offer.model == "free" then return 0, offer.currency end
  if offer.amount == nil then return nil end
  return offer.amount, offer.currency
end

function P.on_billing_timeout()
  return "reject"
end

function P.on_settle_failure(txn)
  tollgate.log("error", "settlement failed for " .. txn.id .. " (" .. (txn.reason or "unknown") ..
    "): reconcile by hand")
end

local OFFER = { uri = "https://docs.example/guide", model = "purchase", amount = 15000, currency = "USD",
                purposes = { "ai-input", "search" } }

P.fixtures = {
  { name = "identified RAG use", hook = "price", offer = OFFER, req = { ai_id = "bot-1", purpose = "ai-input" },
    expect = { 15000, "USD" } },
  { name = "training is not for sale", hook = "price", offer = OFFER,
    req = { ai_id = "bot-1", purpose = "ai-train" }, expect = {} },
  { name = "one forbidden purpose spoils the request", hook = "price", offer = OFFER,
    req = { ai_id = "bot-1", purposes = { "search", "ai-train" } }, expect = {} },
  { name = "no declared purpose", hook = "price", offer = OFFER, req = { ai_id = "bot-1" }, expect = {} },
  { name = "anonymous callers", hook = "price", offer = OFFER, req = { purpose = "ai-input" }, expect = {} },
  { name = "robots.txt is free", hook = "skip", req = { path = "/robots.txt" }, expect = { true } },
  { name = "nothing else is", hook = "skip", req = { path = "/guide" }, expect = { false } },
  { name = "tight per-AI limit", hook = "rate_limit", req = { ai_id = "bot-1" }, expect = { "ai:bot-1", 1, 3 } },
  { name = "never deferred", hook = "on_billing_timeout", txn = { id = "t1", amount = 1, currency = "USD" },
    expect = { "reject" } },
}

return P
