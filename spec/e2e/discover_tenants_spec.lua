-- DiscoverResources across many tenants in one call, against the real binary:
-- every tenant a call names is served from its catalog and rate-limited by
-- its own policy (no cap below the call's 256 URIs), a denial carries
-- Retry-After, and offers name the license URL of their RSL content.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local NTENANTS = 20

local function name(i) return string.format("t%02d", i) end

local function rsl(i)
  return string.format([[<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/a/*">
    <license>
      <permits type="usage">ai-input</permits>
      <payment type="use"><amount currency="USD">0.0%02d</amount></payment>
    </license>
    <terms>https://%s.example/terms</terms>
  </content>
  <content url="/b/*" server="https://license.%s.example/api">
    <license>
      <permits type="usage">ai-input</permits>
      <payment type="use"><amount currency="USD">0.5</amount></payment>
    </license>
  </content>
</rsl>
]], i, name(i), name(i))
end

-- The last tenant limits every Discover call naming it to one per 2 s.
local LAST_POLICY = [[
return { rate_limit = function(req) return "discover", 0.5, 1 end }
]]

local SOLO_POLICY = [[
return { rate_limit = function(req) return "solo", 0.25, 1 end }
]]

-- Prices only offers that carry the license URL: the price hook sees it too.
local HOOK_POLICY = [[
return {
  price = function(offer, req)
    if offer.license_url ~= "https://t01.example/terms" then return nil end
    return 555, "USD"
  end,
}
]]

local function config()
  local tenants, files = {}, {}
  for i = 1, NTENANTS do
    local n = name(i)
    files[n .. ".xml"] = rsl(i)
    tenants[#tenants + 1] = string.format(
      '{ name = %q, hosts = { "%s.example" }, catalog = { source = "%s.xml", refresh_s = 3600 }%s },',
      n, n, n, i == NTENANTS and ', policy = "last.lua"' or "")
  end
  files["last.lua"] = LAST_POLICY
  files["solo.lua"] = SOLO_POLICY
  files["hook.lua"] = HOOK_POLICY
  files["one.xml"] = rsl(1)
  tenants[#tenants + 1] =
    '{ name = "solo", hosts = { "solo.example" }, catalog = { source = "one.xml" }, policy = "solo.lua" },'
  tenants[#tenants + 1] =
    '{ name = "hook", hosts = { "hook.example" }, catalog = { source = "one.xml" }, policy = "hook.lua" },'
  return table.concat(tenants, "\n    "), files
end

local function discover(gw, uris)
  return assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover(uris))))
end

local function uris_of_all(path)
  local uris = {}
  for i = 1, NTENANTS do
    uris[i] = string.format("https://%s.example%s", name(i), path)
  end
  return uris
end

-- ceil(ms / 1000), at least 1: what Retry-After must say for the wait in the message.
local function retry_secs(res)
  local ms = tonumber(h.json_decode(res.body).message:match("retry after (%d+) ms"))
  assert(ms, res.body)
  return math.max(1, math.ceil(ms / 1000))
end

describe("discover across tenants", function()
  local gw

  setup(function()
    local tenants, files = config()
    gw = h.start({ workers = 1, tenants = tenants, files = files })
    assert(h.wait_ready(gw))
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("serves every tenant of a 20-tenant call from its catalog, then runs the 20th tenant's limit", function()
    local res = discover(gw, uris_of_all("/a/1"))
    assert.are.equal(200, res.status, res.body)
    local body = h.json_decode(res.body)
    assert.are.equal(NTENANTS, #body.results)
    for i, r in ipairs(body.results) do
      assert.are.equal(string.format("https://%s.example/a/1", name(i)), r.uri)
      assert(r.offers and #r.offers == 1, "no offer for " .. r.uri .. ": " .. tostring(r.absenceDetail))
      assert.are.equal(tostring(i * 1000), r.offers[1].pricing.price.amount, r.uri)
    end
    -- The 20th tenant's bucket is empty now: the whole call is refused.
    local again = discover(gw, uris_of_all("/a/1"))
    assert.are.equal(429, again.status, again.body)
    assert.are.equal("resource_exhausted", h.connect_code(again))
    assert.are.equal(tostring(retry_secs(again)), again.headers["retry-after"])
  end)

  it("names the content's terms URL in its offers, else its license server", function()
    local res = discover(gw, { "https://t03.example/a/1", "https://t03.example/b/1", "https://hook.example/a/1" })
    assert.are.equal(200, res.status, res.body)
    local results = h.json_decode(res.body).results
    assert.are.equal("https://t03.example/terms", results[1].offers[1].terms.licenseUrl)
    assert.are.equal("https://license.t03.example/api", results[2].offers[1].terms.licenseUrl)
    assert(results[3].offers, res.body)
    assert.are.equal("555", results[3].offers[1].pricing.price.amount)
    assert.are.equal("https://t01.example/terms", results[3].offers[1].terms.licenseUrl)
  end)

  it("answers a rate-limited call resource_exhausted with Retry-After in whole seconds", function()
    local first = discover(gw, { "https://solo.example/a/1" })
    assert.are.equal(200, first.status, first.body)
    local res = discover(gw, { "https://solo.example/a/1" })
    assert.are.equal(429, res.status, res.body)
    assert.are.equal("resource_exhausted", h.connect_code(res))
    local secs = retry_secs(res)
    assert.are.equal(tostring(secs), res.headers["retry-after"])
    assert.is_true(secs >= 1 and secs <= 4, res.body)
  end)
end)
