-- The request target and the host against the real binary: every lookup
-- (routing, policy, catalog) must see one normalized path and one host, so a
-- path or host spelled another way cannot be priced as something else (a free
-- path) or routed to another tenant. RFC 3986 section 6, RFC 9112 section 3.2,
-- RFC 9110 section 7.2; nginx and HAProxy behave the same on these.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

-- api.example prices everything but /docs/ (free, no rate limit either);
-- news.example prices everything at 1, so the answer tells the tenants apart.
local API = [[
local P = {}
function P.skip(req) return req.path:sub(1, 6) == "/docs/" end
function P.rate_limit(req) return "ip:" .. req.ip, 100000, 100000 end
function P.price(offer, req) return 2500, "USD" end
return P
]]
local NEWS = [[
local P = {}
function P.price(offer, req) return 1, "USD" end
return P
]]

local TENANTS = [[
{ name = "api", hosts = { "api.example" }, policy = "api.lua" },
    { name = "news", hosts = { "news.example" }, policy = "news.lua" },]]

local function raw_get(target, host)
  return "GET " .. target .. " HTTP/1.1\r\nHost: " .. host .. "\r\n\r\n"
end

describe("request targets and hosts", function()
  local gw

  setup(function()
    gw = h.start({ tenants = TENANTS, files = { ["api.lua"] = API, ["news.lua"] = NEWS } })
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  local function expect(raw, status, body_has)
    local res, err, s = h.exchange(gw.port, raw, 5)
    if s then
      s:close()
    end
    assert(res, "no answer to " .. h.show(raw) .. ": " .. tostring(err))
    assert.are.equal(status, res.status, "request: " .. h.show(raw) .. "\nanswer:\n" .. res.head .. res.body)
    if body_has then
      assert.truthy(res.body:find(body_has, 1, true), "request: " .. h.show(raw) .. "\nbody: " .. res.body)
    end
    return res
  end

  -- The server refuses a target it cannot normalize: 400, then it closes.
  local function expect_refused(raw)
    local res, err, s = h.exchange(gw.port, raw, 5)
    assert(res, "no answer to " .. h.show(raw) .. ": " .. tostring(err))
    assert.are.equal(400, res.status, "request: " .. h.show(raw) .. "\nanswer:\n" .. res.head .. res.body)
    assert.are.equal("close", res.headers["connection"])
    local how, extra = h.wait_close(s, 3)
    s:close()
    assert.are.equal("closed", how)
    assert.are.equal("", extra)
  end

  describe("dot segments cannot reach a priced path through a free one", function()
    local priced = {
      "/docs/../v1/quotes/ACME",
      "/docs/%2e%2e/v1/quotes/ACME",
      "/docs/%2E%2E/v1/quotes/ACME",
      "/docs/.%2e/v1/quotes/ACME",
      "/docs/x/../../v1/quotes/ACME",
      "/docs/./../v1/quotes/ACME",
      "/docs//../v1/quotes/ACME",
      "/docs/../v1/quotes/ACME?free=/docs/",
    }
    for _, target in ipairs(priced) do
      it(target .. " is priced as /v1/quotes/ACME (402)", function()
        expect(raw_get(target, "api.example"), 402, '"amount":"2500"')
      end)
    end

    it("the free path itself stays free, also spelled with unreserved %XX", function()
      expect(raw_get("/docs/guide", "api.example"), 200)
      expect(raw_get("/%64ocs/guide", "api.example"), 200)
      expect(raw_get("/v1/../docs/guide", "api.example"), 200)
    end)

    -- An origin that decodes these would see other segments than we would.
    local refused = {
      "/docs/..%2Fv1/quotes/ACME",
      "/docs%2F..%2Fv1/quotes/ACME",
      "/docs/..%2fv1/quotes/ACME",
      "/docs/..%5Cv1/quotes/ACME",
      "/docs/..\\v1/quotes/ACME",
      "/docs/..;/v1/quotes/ACME",
      "/docs/%00/x",
      "/docs/%zz",
      "/docs/%4",
      "/../docs/x",
      "/docs/../../x",
      "/docs/x#/../../v1/quotes/ACME",
      "/docs/\xc3\xa9",
      "*",
    }
    for _, target in ipairs(refused) do
      it(h.show(target) .. " is refused with 400", function()
        expect_refused(raw_get(target, "api.example"))
      end)
    end
  end)

  describe("absolute-form targets (RFC 9112 3.2.2)", function()
    it("are accepted and their authority picks the tenant, not Host", function()
      expect(raw_get("http://api.example/v1/quotes/ACME", "news.example"), 402, '"amount":"2500"')
      expect(raw_get("HTTP://API.EXAMPLE:80/v1/quotes/ACME", "news.example"), 402, '"amount":"2500"')
      expect(raw_get("https://api.example/docs/guide", "news.example"), 200)
      expect(raw_get("http://news.example/v1/quotes/ACME", "api.example"), 402, '"amount":"1"')
    end)

    it("an unknown authority is not rescued by a known Host", function()
      expect(raw_get("http://elsewhere.example/v1/quotes/ACME", "api.example"), 404)
    end)

    it("are normalized like any target", function()
      expect(raw_get("http://api.example/docs/../v1/quotes/ACME", "news.example"), 402, '"amount":"2500"')
      expect(raw_get("http://api.example", "news.example"), 402, '"amount":"2500"')
    end)

    it("other schemes, userinfo, empty hosts and bad ports are refused", function()
      for _, target in ipairs({ "ftp://api.example/x", "ws://api.example/x", "http://user@api.example/x",
        "http://user:pw@api.example/x", "http:///x", "http://api.example:99999/x",
        "http://api.example:0000080/x", "http://[fe80::1%25eth0]/x" }) do
        expect_refused(raw_get(target, "api.example"))
      end
    end)
  end)

  describe("Host values", function()
    it("are matched lower-cased, without a trailing dot, leading zeros in the port or trailing blanks", function()
      expect(raw_get("/v1/quotes/ACME", "API.Example"), 402, '"amount":"2500"')
      expect(raw_get("/v1/quotes/ACME", "api.example."), 402, '"amount":"2500"')
      expect(raw_get("/v1/quotes/ACME", "api.example:08080"), 402, '"amount":"2500"')
      expect(raw_get("/v1/quotes/ACME", "api.example \t"), 402, '"amount":"2500"')
    end)

    local bad = {
      "exa mple/../x", "api.example/../x", "api.example/x", "user@api.example", "api.example:99999",
      "api.example:123456", "api.example:80:80", "api.example:-1", "[fe80::1%25eth0]", "[v1.x]",
      "[::1", "a..example", "api%2eexample", "api.example\\x",
    }
    for _, host in ipairs(bad) do
      it(h.show(host) .. " is refused with 400", function()
        expect_refused(raw_get("/v1/quotes/ACME", host))
      end)
    end

    it("the existing Host rules hold", function()
      expect_refused("GET /healthz HTTP/1.1\r\n\r\n")
      expect_refused("GET /healthz HTTP/1.1\r\nHost: api.example\r\nHost: api.example\r\n\r\n")
    end)
  end)

  it("the gateway still answers", function()
    assert(h.alive(gw.port))
  end)
end)
