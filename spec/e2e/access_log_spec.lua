-- The access log (config access_log, core/gateway/access.h): one JSON line
-- per request on the public listeners, both front ends, sampled, with the
-- billing reference redacted and never the query string.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local dkjson = require("dkjson")

local ACCOUNT = "acct-access-" .. h.random_hex(6) .. "-98765432"
local SECRET_QUERY = "token=" .. h.random_hex(12)

local function opts(access_log)
  return {
    access_log = false, -- helpers.lua's suite default: this spec sets its own, or none
    tenants = '{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" }, '
      .. 'signer = { type = "nginx_secure_link", base_url = "http://cdn.test", key_file = "news.key", ttl_s = 600 } },',
    files = { ["news.xml"] = h.rsl({ amount = "0.001" }), ["news.key"] = "access-key-" .. h.random_hex(8) .. "\n" },
    extra = string.format('ledger = { accounts = { { billing_reference = %q, amount = 1000000 } } },\n  %s',
      ACCOUNT, access_log and ("access_log = " .. access_log .. ",") or ""),
  }
end

local function access_lines(gw)
  local out = {}
  for line in gw.log():gmatch("[^\n]+") do
    if line:find('"msg":"access"', 1, true) then
      out[#out + 1] = h.json_decode(line)
    end
  end
  return out
end

-- Waits until the log holds n access lines (the line is written as the
-- answer is taken, so it is there by the time the client reads it; the
-- wait only covers the file system).
local function wait_lines(gw, n)
  local deadline = h.now() + 3
  local lines = access_lines(gw)
  while #lines < n and h.now() < deadline do
    h.sleep(0.02)
    lines = access_lines(gw)
  end
  return lines
end

local function post(gw, path, body)
  return assert(h.request(gw.port, h.connect_req(path, "json", body), { timeout = 10 }))
end

describe("access log", function()
  describe("sample = 1.0", function()
    local gw
    setup(function()
      gw = h.start(opts("{ sample = 1.0, errors = true }"))
      assert(h.wait_ready(gw, 10))
    end)
    teardown(function()
      if gw then h.stop(gw) end
    end)

    it("one line per request on both front ends, redacted, without the query", function()
      local before = #access_lines(gw)
      local d = post(gw, h.DISCOVER, h.json_discover({ "https://news.example/a" }))
      assert.are.equal(200, d.status, d.body)
      local offer = h.json_decode(d.body).results[1].offers[1].id
      local body = string.format('{"aiSystem":{"id":"bot","billingReference":%s},"idempotencyKey":"al-%s",'
        .. '"items":[{"offerId":%s}]}', dkjson.encode(ACCOUNT), h.random_hex(4), dkjson.encode(offer))
      local x = post(gw, h.EXECUTE, body)
      assert.are.equal(200, x.status, x.body)
      assert.are.equal("TRANSACTION_STATUS_APPROVED", h.json_decode(x.body).status, x.body)
      local g = assert(h.request(gw.port, h.get_req("/a?" .. SECRET_QUERY)))
      local nf = assert(h.request(gw.port, h.get_req("/x", nil, "nobody.example")))
      assert.are.equal(404, nf.status)
      -- The admin listener is not traffic: not logged.
      assert.are.equal(200, h.admin(gw, "GET", "/admin/tenants").status)

      local lines = wait_lines(gw, before + 4)
      assert.are.equal(before + 4, #lines, gw.log())
      local disc, exec, http, none = lines[before + 1], lines[before + 2], lines[before + 3], lines[before + 4]
      assert.are.equal("DiscoverResources", disc.route)
      assert.are.equal("news", disc.tenant)
      assert.are.equal("200", disc.status)
      assert.are.equal("POST", disc.method)
      assert.are.equal(h.DISCOVER, disc.path)
      assert.truthy(tonumber(disc.duration_ms), disc.duration_ms)
      assert.are.equal(tostring(#d.body), disc.bytes)
      assert.truthy(disc.request_id and disc.ts, dkjson.encode(disc))

      assert.are.equal("ExecuteTransaction", exec.route)
      assert.are.equal("news", exec.tenant)
      assert.are.equal("1000", exec.price, dkjson.encode(exec))
      assert.are.equal("USD", exec.currency)
      assert.are.equal("****5432", exec.payer, dkjson.encode(exec))

      assert.are.equal("http", http.route)
      assert.are.equal("news", http.tenant)
      assert.are.equal("/a", http.path)
      assert.are.equal(tostring(g.status), http.status)

      assert.are.equal("404", none.status)
      assert.is_nil(none.tenant)

      local log = gw.log()
      assert.falsy(log:find(ACCOUNT, 1, true), "the full billing reference is in the log")
      assert.falsy(log:find(SECRET_QUERY, 1, true), "the query string is in the log")
    end)
  end)

  describe("sample = 0", function()
    it("errors = true: only 4xx and 5xx are logged", function()
      local gw = h.start(opts("{ sample = 0, errors = true }"))
      assert(h.wait_ready(gw, 10))
      local before = #access_lines(gw)
      for _ = 1, 5 do
        assert.are.equal(200, post(gw, h.DISCOVER, h.json_discover({ "https://news.example/a" })).status)
      end
      assert.are.equal(404, assert(h.request(gw.port, h.get_req("/x", nil, "nobody.example"))).status)
      local lines = wait_lines(gw, before + 1)
      h.sleep(0.1)
      lines = access_lines(gw)
      assert.are.equal(before + 1, #lines, gw.log())
      assert.are.equal("404", lines[#lines].status)
      h.stop_clean(gw)
    end)

    it("errors = false: nothing; absent: nothing", function()
      for _, al in ipairs({ "{ sample = 0, errors = false }", false }) do
        local gw = h.start(opts(al))
        assert(h.wait_ready(gw, 10))
        assert.are.equal(200, post(gw, h.DISCOVER, h.json_discover({ "https://news.example/a" })).status)
        assert.are.equal(404, assert(h.request(gw.port, h.get_req("/x", nil, "nobody.example"))).status)
        assert.are.equal(0, select(2, h.stop_keep(gw)))
        assert.truthy(gw.log():find('"msg":"listening"', 1, true), "no log read")
        assert.are.equal(0, #access_lines(gw), gw.log())
        os.execute("rm -rf " .. h.sh_quote(gw.dir))
      end
    end)
  end)

  describe("sample = 0.5", function()
    it("logs some requests and not others", function()
      local gw = h.start(opts("{ sample = 0.5, errors = false }"))
      assert(h.wait_ready(gw, 10))
      for _ = 1, 60 do
        assert.are.equal(200, post(gw, h.DISCOVER, h.json_discover({ "https://news.example/a" })).status)
      end
      assert.are.equal(0, select(2, h.stop_keep(gw)))
      local n = #access_lines(gw)
      os.execute("rm -rf " .. h.sh_quote(gw.dir))
      -- 60 fair coins: fewer than 10 or more than 50 heads is a 1-in-10^7 event.
      assert.is_true(n >= 10 and n <= 50, n .. " of 60 logged")
    end)
  end)

  it("tollgate check refuses a bad access_log", function()
    local dir = h.capture("mktemp -d"):gsub("%s+$", "")
    local path = h.write_config(dir, { public = 1, admin = 2 }, "tok-" .. h.random_hex(8),
      { extra = "access_log = { sample = 2 }," })
    local out = h.capture(string.format("%s check -c %s 2>&1; echo rc=$?", h.sh_quote(h.binary()), h.sh_quote(path)))
    assert.truthy(out:find("rc=1", 1, true), out)
    assert.truthy(out:find("access_log.sample", 1, true), out)
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)
end)
