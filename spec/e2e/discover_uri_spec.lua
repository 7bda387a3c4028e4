-- DiscoverResources and the URIs it prices. An offer id carries its URI,
-- so a URI longer than an offer can hold is refused rather than cut (an
-- offer signed for a prefix of the URI would be an offer for another
-- resource); and a path that is not in normal form is refused rather than
-- matched as written ("/a/../private/x" is /private/x to the origin).
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local MAX_URI = 2047

local RSL = [[<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/a/*">
    <license>
      <permits type="usage">ai-input</permits>
      <payment type="use"><amount currency="USD">0.001</amount></payment>
    </license>
  </content>
  <content url="/private/*">
    <license><prohibits type="usage">all</prohibits></license>
  </content>
</rsl>
]]

describe("DiscoverResources URI length", function()
  local gw

  setup(function()
    gw = h.start({
      tenants = '{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" } },',
      files = { ["news.xml"] = RSL },
    })
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  local function discover(uris)
    local res, err = h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover(uris)), { timeout = 5 })
    assert(res, "no answer: " .. tostring(err))
    return res
  end

  local function uri_of(len)
    local prefix = "https://" .. h.TENANT_HOST .. "/"
    return prefix .. string.rep("a", len - #prefix)
  end

  it("answers a URI of " .. MAX_URI .. " bytes", function()
    local res = discover({ uri_of(MAX_URI) })
    assert.are.equal(200, res.status, h.show(res.body))
  end)

  it("refuses a longer one, naming it, in place of cutting it", function()
    for _, len in ipairs({ MAX_URI + 1, 4000 }) do
      local res = discover({ "https://" .. h.TENANT_HOST .. "/a", uri_of(len) })
      assert.are.equal(400, res.status, h.show(res.body))
      assert.are.equal("invalid_argument", h.connect_code(res))
      assert.truthy(res.body:find("resources[1].uri: longer than " .. MAX_URI .. " bytes", 1, true), res.body)
    end
    assert(h.alive(gw.port))
  end)

  it("prices a path in normal form", function()
    local res = discover({ "https://news.example/a/x", "https://news.example/a/x?page=2", "https://news.example" })
    assert.are.equal(200, res.status, h.show(res.body))
    assert.truthy(res.body:find('"amount":"1000"', 1, true), res.body)
  end)

  it("refuses a path that means another one", function()
    for _, path in ipairs({ "/a/../private/x", "/a/%2e%2e/private/x", "/a/./x", "//private/x", "/a/%7ex",
      "/a/%2fx/..", "/a%5c..%5cprivate%5cx" }) do
      local res = discover({ "https://news.example/a/ok", "https://news.example" .. path })
      assert.are.equal(400, res.status, path .. ": " .. h.show(res.body))
      assert.are.equal("invalid_argument", h.connect_code(res))
      assert.truthy(res.body:find("resources[1].uri: the path is not in normal form", 1, true), res.body)
    end
  end)
end)
