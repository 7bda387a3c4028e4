-- Every answer of a tenant's resource path is JSON built with jansson: a
-- path with quotes, backslashes, bad UTF-8 or 4000 bytes comes back as one
-- string value, and the body has exactly the keys it should, no more.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
-- dkjson comes with busted (its JSON output handler), so every e2e run has it.
local json = require("dkjson")

local POLICIES = {
  -- priced by the catalog: the default policy's price hook
  ["priced.xml"] = h.rsl({ amount = "0.001" }),
  ["free.xml"] = h.rsl({ free = true }),
  ["limited.lua"] = [[
return { rate_limit = function(req) return "one", 0.001, 1 end }
]],
  ["raises.lua"] = [[
return { price = function(offer, req) error("boom") end }
]],
}

local TENANTS = [[
{ name = "priced", hosts = { "priced.example" }, catalog = { source = "priced.xml" } },
    { name = "free", hosts = { "free.example" }, catalog = { source = "free.xml" } },
    { name = "unpriced", hosts = { "unpriced.example" } },
    { name = "limited", hosts = { "limited.example" }, policy = "limited.lua",
      catalog = { source = "priced.xml" } },
    { name = "raises", hosts = { "raises.example" }, policy = "raises.lua",
      catalog = { source = "priced.xml" } },]]

-- True when s is well-formed UTF-8 (RFC 3629), as a JSON text must be.
local function utf8_valid(s)
  local i, n = 1, #s
  while i <= n do
    local c = s:byte(i)
    local len, lo, hi = 1, 0x80, 0xbf
    if c < 0x80 then
      len = 1
    elseif c >= 0xc2 and c <= 0xdf then
      len = 2
    elseif c >= 0xe0 and c <= 0xef then
      len = 3
      if c == 0xe0 then lo = 0xa0 elseif c == 0xed then hi = 0x9f end
    elseif c >= 0xf0 and c <= 0xf4 then
      len = 4
      if c == 0xf0 then lo = 0x90 elseif c == 0xf4 then hi = 0x8f end
    else
      return false
    end
    for k = 1, len - 1 do
      local b = s:byte(i + k)
      if not b then return false end
      if k == 1 then
        if b < lo or b > hi then return false end
      elseif b < 0x80 or b > 0xbf then
        return false
      end
    end
    i = i + len
  end
  return true
end

-- The body as a JSON object, asserting it is one whole, valid JSON text.
local function decode(res)
  assert.are.equal("application/json", res.headers["content-type"])
  assert.is_true(utf8_valid(res.body), "body is not UTF-8: " .. h.show(res.body))
  local obj, pos, err = json.decode(res.body, 1, json.null)
  assert(obj, "body is not JSON (" .. tostring(err) .. "): " .. h.show(res.body))
  assert.are.equal(#res.body + 1, pos, "trailing bytes after the JSON value: " .. h.show(res.body))
  assert.are.equal("table", type(obj))
  return obj
end

local function keys(obj)
  local out = {}
  for k in pairs(obj) do
    out[#out + 1] = k
  end
  table.sort(out)
  return out
end

-- Paths that reach the handler, and the resource the 402 must name: the path
-- as the server normalized it (net/target.h: percent escapes that stay
-- encoded get upper-case hex), byte for byte inside one JSON string.
local PATHS = {
  { name = "a quote that would close the string", raw = '/x","injected":"y', want = '/x","injected":"y' },
  { name = "quotes and braces", raw = '/"}"{"a":', want = '/"}"{"a":' },
  { name = "markup and an apostrophe", raw = "/<script>'x'</script>&amp;", want = "/<script>'x'</script>&amp;" },
  { name = "percent-encoded control bytes", raw = "/c%0a%0d%1b%22%7f%ff", want = "/c%0A%0D%1B%22%7F%FF" },
  { name = "4000 bytes", raw = "/" .. string.rep("p", 3999), want = "/" .. string.rep("p", 3999) },
  { name = "4000 bytes of quotes", raw = "/" .. string.rep('"', 3999), want = "/" .. string.rep('"', 3999) },
}

-- Paths the server may refuse before any handler (400); if one gets through,
-- its answer must still be whole JSON naming it, repaired to UTF-8.
local ODD_PATHS = {
  { raw = '/a\\"b\\', want = '/a\\"b\\' },
  { raw = "/bad\xff\xfeutf8", want = "/bad\xef\xbf\xbd\xef\xbf\xbdutf8" },
  { raw = "/caf\xc3\xa9", want = "/caf\xc3\xa9" },
  { raw = "/nul%00", want = "/nul%00" },
}

describe("resource answers are JSON", function()
  local gw

  setup(function()
    gw = h.start({ tenants = TENANTS, files = POLICIES })
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  local function get(host, path, headers)
    local res, err = h.request(gw.port, h.get_req(path, headers, host), { timeout = 5 })
    assert(res, "no answer: " .. tostring(err))
    return res
  end

  for _, case in ipairs(PATHS) do
    it("402 with " .. case.name .. " in the path", function()
      local res = get("priced.example", case.raw .. "?q=1")
      assert.are.equal(402, res.status, h.show(res.body))
      local obj = decode(res)
      assert.are.same({ "error", "offers", "policy_version", "price", "resource", "uri" }, keys(obj))
      assert.are.equal("payment required", obj.error)
      assert.are.equal(case.want, obj.resource)
      assert.are.equal("http://priced.example" .. case.want .. "?q=1", obj.uri)
      assert.are.same({ amount = "1000", currency = "USD" }, obj.price)
      assert.are.same({ { model = "purchase", price = { amount = "1000", currency = "USD" },
                          terms = { permitted_purposes = { "ai-train", "ai-input", "ai-index", "search" } } } },
                      obj.offers)
      assert.truthy(obj.policy_version:match("^%x+$"), obj.policy_version)
    end)
  end

  it("a backslash or a raw byte above 0x7e is refused, or answered as whole JSON", function()
    for _, case in ipairs(ODD_PATHS) do
      local res = get("priced.example", case.raw)
      if res.status ~= 400 then
        assert.are.equal(402, res.status, h.show(res.body))
        local obj = decode(res)
        assert.are.same({ "error", "offers", "policy_version", "price", "resource", "uri" }, keys(obj))
        assert.are.equal(case.want, obj.resource)
      end
    end
  end)

  it("200 free, 403 not for sale", function()
    for _, case in ipairs(PATHS) do
      local res = get("free.example", case.raw)
      assert.are.equal(200, res.status, h.show(res.body))
      assert.are.same({ tenant = "free", access = "free" }, decode(res))
      res = get("unpriced.example", case.raw)
      assert.are.equal(403, res.status, h.show(res.body))
      assert.are.same({ error = "not for sale", reason = "not_for_sale",
                        detail = "the tenant has no catalog and its policy does not price this resource" }, decode(res))
    end
  end)

  it("500 T402-2001 carries the request id and nothing of the error", function()
    local res = get("raises.example", '/x"y', { "X-Request-Id: req-42.a_b" })
    assert.are.equal(500, res.status, h.show(res.body))
    local obj = decode(res)
    assert.are.same({ "code", "message", "request_id" }, keys(obj))
    assert.are.equal("T402-2001", obj.code)
    assert.are.equal("req-42.a_b", obj.request_id)
    assert.falsy(res.body:find("boom", 1, true))
  end)

  it("429 T402-2005 keeps its Retry-After", function()
    local first = get("limited.example", '/x"y')
    assert.are.equal(402, first.status, h.show(first.body))
    decode(first)
    local res = get("limited.example", '/x"y')
    assert.are.equal(429, res.status, h.show(res.body))
    local obj = decode(res)
    assert.are.same({ "code", "message", "retry" }, keys(obj))
    assert.are.equal("T402-2005", obj.code)
    assert.are.same({ "after_ms" }, keys(obj.retry))
    assert.is_true(obj.retry.after_ms > 0)
    local secs = tonumber(res.headers["retry-after"])
    assert(secs and secs >= 1 and secs == math.floor(secs), "Retry-After: " .. tostring(res.headers["retry-after"]))
    assert.are.equal(math.max(1, math.ceil(obj.retry.after_ms / 1000)), secs)
  end)
end)
