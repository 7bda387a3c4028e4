-- One policy, two front ends, one answer. The operator's story of issue 8: a
-- policy written from the guide (recipes cost 2000 for commercial AI systems
-- and 500 for education, some paths free, 5 requests per second per client)
-- is run through the busted harness (harness.http / harness.connect) and
-- through the real binary on the HTTP resource path and on
-- DiscoverResources; every case must get the same decision everywhere. The
-- policy's own fixtures are replayed against the binary too, and both front
-- ends must quote the same price, currency and terms for the same URI and
-- identity.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "../../lua/?.lua;" .. package.path
local h = require("helpers")
local harness = require("tollgate.harness")

local HOST = "recipes.example"

local POLICY = [[
-- Recipes: 2000 (0.002 USD) for commercial AI systems, 500 for education;
-- /free/ and /robots.txt free; 5 requests per second per client.
local P = {}

function P.skip(req)
  return req.path == "/robots.txt" or req.path:find("^/free/") ~= nil
end

function P.rate_limit(req)
  -- An AI system by its id (Connect), anyone else by address (HTTP).
  return "client:" .. (req.ai_id or req.ip or "unknown"), 5, 5
end

function P.price(offer, req)
  if not req.path:find("^/recipes/") then return offer.amount, offer.currency end
  if req.user_type == "education" then return 500, "USD" end
  return 2000, "USD" -- commercial, and any identity we do not know
end

P.fixtures = {
  { name = "education on Connect", hook = "price",
    offer = { uri = "https://recipes.example/recipes/soup", model = "purchase", amount = 2000, currency = "USD" },
    req = { kind = "connect", uri = "https://recipes.example/recipes/soup", user_type = "education" },
    expect = { 500, "USD" } },
  { name = "commercial on Connect", hook = "price",
    offer = { uri = "https://recipes.example/recipes/soup", model = "purchase", amount = 2000, currency = "USD" },
    req = { kind = "connect", uri = "https://recipes.example/recipes/soup", user_type = "commercial" },
    expect = { 2000, "USD" } },
  { name = "anonymous on HTTP", hook = "price",
    offer = { uri = "http://recipes.example/recipes/soup", model = "purchase", amount = 2000, currency = "USD" },
    req = { kind = "http", uri = "http://recipes.example/recipes/soup" },
    expect = { 2000, "USD" } },
  { name = "free tips", hook = "skip", req = { uri = "http://recipes.example/free/tips" }, expect = { true } },
}

return P
]]

-- The catalog: recipes at 0.002 USD, news at 0.001 USD, a free tips section
-- (the skip hook lets it through before the catalog is asked).
local RSL = [[<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/recipes/*">
    <license>
      <permits type="usage">ai-input search</permits>
      <payment type="purchase"><amount currency="USD">0.002</amount></payment>
    </license>
    <terms>https://recipes.example/terms</terms>
  </content>
  <content url="/news/*">
    <license>
      <permits type="usage">ai-input</permits>
      <payment type="purchase"><amount currency="USD">0.001</amount></payment>
    </license>
  </content>
</rsl>
]]

-- What the catalog offers for a path, as the price hook's offer table.
local function catalog_offer(uri, path)
  if path:find("^/recipes/") then
    return { uri = uri, model = "purchase", amount = 2000, currency = "USD", purposes = { "ai-input", "search" },
             license_url = "https://recipes.example/terms" }
  elseif path:find("^/news/") then
    return { uri = uri, model = "purchase", amount = 1000, currency = "USD", purposes = { "ai-input" } }
  end
end

local USER_TYPES = { commercial = "USER_TYPE_COMMERCIAL", education = "USER_TYPE_EDUCATION",
                     government = "USER_TYPE_GOVERNMENT" }
local PURPOSES = { ["ai-input"] = "USAGE_PURPOSE_AI_INPUT", search = "USAGE_PURPOSE_SEARCH" }

-- Each case on the front end it names. ai: the AI system of a Connect call.
local CASES = {
  { front = "http", path = "/recipes/soup" },
  { front = "http", path = "/recipes/soup", query = "servings=4" },
  { front = "http", path = "/free/tips" },
  { front = "http", path = "/robots.txt" },
  { front = "http", path = "/news/1" },
  { front = "http", path = "/nothing/here" },
  { front = "connect", path = "/recipes/soup", ai = { id = "bot-1", user_type = "commercial", purposes = { "ai-input" } } },
  { front = "connect", path = "/recipes/soup", ai = { id = "edu-1", user_type = "education", purposes = { "ai-input" } } },
  { front = "connect", path = "/recipes/soup", ai = { id = "gov-1", user_type = "government" } },
  { front = "connect", path = "/recipes/soup", ai = {} },
  { front = "connect", path = "/free/tips", ai = { id = "edu-1", user_type = "education" } },
  { front = "connect", path = "/robots.txt", ai = { id = "bot-1" } },
  { front = "connect", path = "/news/1", ai = { id = "edu-1", user_type = "education", purposes = { "ai-input" } } },
  { front = "connect", path = "/nothing/here", ai = { id = "bot-1" } },
}

local function label(case)
  local who = case.ai and (case.ai.user_type or "anonymous") or "anonymous"
  return case.front .. " " .. case.path .. (case.query and ("?" .. case.query) or "") .. " (" .. who .. ")"
end

-- The harness's decision: "free", "not for sale", or "AMOUNT CURRENCY".
local function harness_decision(p, case)
  local req
  if case.front == "http" then
    req = harness.http({ host = HOST, path = case.path, query = case.query })
  else
    local ai = case.ai
    req = harness.connect({ uri = "https://" .. HOST .. case.path, ai_id = ai.id, user_type = ai.user_type,
                            purposes = ai.purposes })
  end
  if p:skip(req) then return "free" end
  local offer = catalog_offer(req.uri, case.path)
  if not offer then return "not for sale" end
  local amount, currency = p:price(offer, req)
  if amount == nil then return "not for sale" end
  if amount == 0 then return "free" end
  return amount .. " " .. currency
end

local function discover_body(uris, ai)
  local sys = {}
  if ai then
    if ai.id then sys[#sys + 1] = string.format('"id":%q', ai.id) end
    if ai.user_type then sys[#sys + 1] = string.format('"userType":%q', USER_TYPES[ai.user_type]) end
    if ai.purposes then
      local list = {}
      for i, t in ipairs(ai.purposes) do list[i] = string.format("%q", PURPOSES[t]) end
      sys[#sys + 1] = '"usagePurposes":[' .. table.concat(list, ",") .. "]"
    end
  end
  local body = h.json_discover(uris)
  return '{"aiSystem":{' .. table.concat(sys, ",") .. "}," .. body:sub(2)
end

local function discover(gw, uris, ai, ip_header)
  local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", discover_body(uris, ai))))
  assert.are.equal(200, res.status, res.body)
  return h.json_decode(res.body).results
end

-- The binary's decision for one case, in the harness's words.
local function gateway_decision(gw, case)
  if case.front == "http" then
    local target = case.path .. (case.query and ("?" .. case.query) or "")
    local res = assert(h.request(gw.port, h.get_req(target, nil, HOST)))
    if res.status == 200 then return "free" end
    if res.status == 403 then return "not for sale" end
    assert.are.equal(402, res.status, res.body)
    local body = h.json_decode(res.body)
    return body.price.amount .. " " .. body.price.currency
  end
  local r = discover(gw, { "https://" .. HOST .. case.path }, case.ai)[1]
  if not r.offers then return "not for sale" end
  local o = r.offers[1]
  if o.pricing.model == "PAYMENT_MODEL_FREE" then return "free" end
  local amount = o.pricing.price.amount
  if amount == "0" then return "free" end
  return amount .. " " .. o.pricing.price.currency
end

describe("one policy on both front ends", function()
  local gw, p

  setup(function()
    p = harness.load_string(POLICY, "recipes.lua", { tenant = "recipes" })
    gw = h.start({
      workers = 1,
      tenants = string.format(
        '{ name = "recipes", hosts = { %q }, catalog = { source = "recipes.xml" }, policy = "recipes.lua" },', HOST),
      files = { ["recipes.lua"] = POLICY, ["recipes.xml"] = RSL },
    })
    assert(h.wait_ready(gw))
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  -- One request per case and a pause between them: the cases share a
  -- client key and the limit is 5 per second.
  it("decides every case as the harness does", function()
    for _, case in ipairs(CASES) do
      local want = harness_decision(p, case)
      local got = gateway_decision(gw, case)
      assert.are.equal(want, got, label(case))
      h.sleep(0.25)
    end
  end)

  it("agrees with the harness on the cases that distinguish identities", function()
    -- Guards the comparison above against agreeing on nothing: the policy's
    -- identities must really lead to different prices.
    assert.are.equal("500 USD", harness_decision(p, CASES[8]))
    assert.are.equal("2000 USD", harness_decision(p, CASES[7]))
    assert.are.equal("2000 USD", harness_decision(p, CASES[1]))
    assert.are.equal("free", harness_decision(p, CASES[3]))
  end)

  it("replays the policy's own fixtures against the binary", function()
    assert.is_true(p:fixtures() >= 4)
    for _, f in ipairs(p.policy.fixtures) do
      local uri = f.req.uri
      local scheme, path = uri:match("^(%a+)://[^/]+(/.*)$")
      local front = f.req.kind or "http"
      local case = { front = front, path = path }
      if front == "connect" then case.ai = { user_type = f.req.user_type } end
      local got = gateway_decision(gw, case)
      if f.hook == "skip" and f.expect[1] then
        assert.are.equal("free", got, f.name)
      elseif f.hook == "skip" then
        assert.are_not.equal("free", got, f.name)
      else
        assert.are.equal(f.expect[1] .. " " .. f.expect[2], got, f.name)
      end
      assert.truthy(scheme)
      h.sleep(0.25)
    end
  end)

  it("quotes the same price, currency and terms on both front ends for an anonymous client", function()
    h.sleep(1.2) -- a fresh second of the client's bucket
    for _, path in ipairs({ "/recipes/soup", "/news/1" }) do
      local res = assert(h.request(gw.port, h.get_req(path, nil, HOST)))
      assert.are.equal(402, res.status, res.body)
      local http = h.json_decode(res.body).offers
      local connect = discover(gw, { "https://" .. HOST .. path }, {})[1].offers
      assert.are.equal(#connect, #http, path)
      for i, o in ipairs(connect) do
        local hp = http[i]
        assert.are.equal(o.pricing.price.amount, hp.price.amount, path)
        assert.are.equal(o.pricing.price.currency, hp.price.currency, path)
        assert.are.equal(o.pricing.model, "PAYMENT_MODEL_" .. hp.model:upper(), path)
        local purposes = {}
        for k, t in ipairs(hp.terms.permitted_purposes) do purposes[k] = "USAGE_PURPOSE_" .. t:upper():gsub("-", "_") end
        assert.are.same(o.terms.permittedPurposes or {}, purposes, path)
        assert.are.equal(o.terms.licenseUrl, hp.terms.license_url, path)
      end
    end
  end)

  it("offers a skipped URI free in Discover, with the reason", function()
    local r = discover(gw, { "https://" .. HOST .. "/free/tips" }, { id = "bot-9" })[1]
    assert.are.equal(1, #r.offers)
    assert.are.equal("PAYMENT_MODEL_FREE", r.offers[1].pricing.model)
    assert.truthy(r.offers[1].id and #r.offers[1].id > 20, "a free offer still has an id")
    assert.truthy(tostring(r.absenceDetail):find("skips payment", 1, true), tostring(r.absenceDetail))
  end)

  it("limits a client to 5 per second on HTTP, as its rate_limit hook says", function()
    assert.are.same({ "client:192.0.2.10", 5, 5 }, { p:rate_limit(harness.http({ host = HOST, path = "/news/1" })) })
    h.sleep(1.2)
    local statuses = {}
    for i = 1, 8 do
      statuses[i] = assert(h.request(gw.port, h.get_req("/news/1", nil, HOST))).status
    end
    assert.are.same({ 402, 402, 402, 402, 402 }, { unpack(statuses, 1, 5) })
    assert.are.equal(429, statuses[8], table.concat(statuses, " "))
  end)

  it("counts decisions per tenant, front end and outcome", function()
    local res = assert(h.request(gw.admin_port, h.get_req("/metrics", { "Authorization: Bearer " .. gw.token }, "127.0.0.1")))
    assert.are.equal(200, res.status)
    for _, want in ipairs({
      'policy_decisions_total{tenant_id="recipes",front="http",outcome="402"}',
      'policy_decisions_total{tenant_id="recipes",front="http",outcome="skip"}',
      'policy_decisions_total{tenant_id="recipes",front="http",outcome="403"}',
      'policy_decisions_total{tenant_id="recipes",front="http",outcome="429"}',
      'policy_decisions_total{tenant_id="recipes",front="connect",outcome="402"}',
      'policy_decisions_total{tenant_id="recipes",front="connect",outcome="skip"}',
      'policy_decisions_total{tenant_id="recipes",front="connect",outcome="403"}',
    }) do
      assert.truthy(res.body:find(want, 1, true), want)
    end
  end)
end)
