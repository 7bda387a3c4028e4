-- The operator routes of the admin listener (core/gateway/admin.h): the
-- tenant list, per-tenant policy and catalog reloads, and the drain, all
-- behind the bearer token.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local socket = require("socket")

local POLICY_A = 'return { price = function(o, r) return 1000, "USD" end }\n'
local POLICY_B = 'return { price = function(o, r) return 2000, "USD" end }\n'

describe("admin operator routes", function()
  local gw, billing

  setup(function()
    -- A billing service that takes connections and never answers: a purchase
    -- for "shop" waits its Authorize deadline (2 s), so it is in flight.
    billing = assert(socket.bind(h.HOST, 0))
    local _, bport = billing:getsockname()
    gw = h.start_prepared({
      workers = 2,
      tenants = string.format([[{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" },
      policy = "news.lua" },
    { name = "shop", hosts = { "shop.example" }, catalog = { source = "shop.xml" },
      billing = { type = "connect", url = "http://127.0.0.1:%d", token_file = "billing.token",
                  deadline_ms = 2000, call_timeout_ms = 2000, health_interval_ms = 60000 } },
    { name = "bare", hosts = { "bare.example" } },]], tonumber(bport)),
      files = { ["news.xml"] = h.rsl({ amount = "0.001" }), ["shop.xml"] = h.rsl({ amount = "0.001" }),
        ["news.lua"] = POLICY_A },
    }, function(dir)
      h.write_file(dir .. "/billing.token", "billing-tok-" .. h.random_hex(8) .. "\n", "600")
    end)
    assert(h.wait_ready(gw, 10))
  end)

  teardown(function()
    if gw and not gw.stopped then
      h.stop(gw)
    end
    if billing then
      billing:close()
    end
  end)

  local function admin_noauth(method, path)
    local raw = method .. " " .. path .. " HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    return assert(h.request(gw.admin_port, raw))
  end

  local function tenants()
    local res = h.admin(gw, "GET", "/admin/tenants")
    assert.are.equal(200, res.status, res.body)
    local by = {}
    for _, t in ipairs(h.json_decode(res.body).tenants) do
      by[t.name] = t
    end
    return by, res.body
  end

  it("every new route wants the token: 401 without it", function()
    for _, r in ipairs({ { "GET", "/admin/tenants" }, { "POST", "/admin/tenants/news/reload-policy" },
      { "POST", "/admin/tenants/news/reload-catalog" }, { "POST", "/admin/drain" }, { "GET", "/admin/drain" } }) do
      local res = admin_noauth(r[1], r[2])
      assert.are.equal(401, res.status, r[2] .. ": " .. res.body)
    end
    assert.is_false(h.json_decode(h.admin(gw, "GET", "/admin/drain").body).draining)
  end)

  it("GET /admin/tenants: hosts, policy version, catalog age, billing state, payments", function()
    local by, body = tenants()
    assert.are.same({ "news.example" }, by.news.hosts)
    assert.are.equal("string", type(by.news.policy.version), body)
    assert.are.equal("number", type(by.news.catalog.age_s), body)
    assert.is_true(by.news.catalog.age_s >= 0 and by.news.catalog.age_s < 60, body)
    assert.is_true(by.news.catalog.loaded, body)
    assert.are.equal("builtin", by.news.billing.type, body)
    assert.are.equal("remote", by.shop.billing.type, body)
    assert.are.equal("closed", by.shop.billing.circuit, body)
    assert.are.equal("number", type(by.shop.billing.consecutive_failures), body)
    assert.is_false(by.news.payments_enabled, body)
    assert.is_nil(by.bare.catalog, body) -- no catalog source: null
    assert.is_nil(h.json_decode(body).tenants[4], body)
  end)

  it("POST /admin/tenants/NAME/reload-policy reloads that tenant only", function()
    local before = tenants()
    h.write_file(gw.dir .. "/news.lua", POLICY_B)
    local res = h.admin(gw, "POST", "/admin/tenants/news/reload-policy")
    assert.are.equal(200, res.status, res.body)
    local rep = h.json_decode(res.body)
    assert.are.equal(1, #rep.tenants, res.body)
    assert.are.equal("news", rep.tenants[1].tenant, res.body)
    local after = tenants()
    assert.are_not.equal(before.news.policy.version, after.news.policy.version)
    assert.are.equal(before.shop.policy.version, after.shop.policy.version)
    -- A broken file is refused and named; the live version stays.
    h.write_file(gw.dir .. "/news.lua", "return {")
    local bad = h.admin(gw, "POST", "/admin/tenants/news/reload-policy")
    assert.are.equal(422, bad.status, bad.body)
    local kept = tenants()
    assert.are.equal(after.news.policy.version, kept.news.policy.version)
    assert.truthy(kept.news.policy.last_error, require("dkjson").encode(kept.news))
    h.write_file(gw.dir .. "/news.lua", POLICY_B)
    assert.are.equal(200, h.admin(gw, "POST", "/admin/tenants/news/reload-policy").status)
  end)

  it("unknown tenants, unknown actions and GET are refused", function()
    assert.are.equal(404, h.admin(gw, "POST", "/admin/tenants/nope/reload-policy").status)
    assert.are.equal(404, h.admin(gw, "POST", "/admin/tenants/nope/reload-catalog").status)
    assert.are.equal(404, h.admin(gw, "POST", "/admin/tenants/news/reload-everything").status)
    assert.are.equal(405, h.admin(gw, "GET", "/admin/tenants/news/reload-policy").status)
    assert.are.equal(409, h.admin(gw, "POST", "/admin/tenants/bare/reload-catalog").status)
    assert.are.equal(400, h.admin(gw, "POST", "/admin/drain?delay_ms=soon").status)
    assert.is_false(h.json_decode(h.admin(gw, "GET", "/admin/drain").body).draining)
  end)

  it("POST /admin/tenants/NAME/reload-catalog rebuilds that tenant's catalog now", function()
    local function entries(t)
      return tenants()[t].catalog.entries
    end
    assert.are.equal(1, entries("news"))
    h.write_file(gw.dir .. "/news.xml", '<?xml version="1.0" encoding="UTF-8"?>\n'
      .. '<rsl xmlns="https://rslstandard.org/rsl">'
      .. '<content url="/a"><license><payment type="purchase"><amount currency="USD">0.001</amount></payment></license></content>'
      .. '<content url="/b"><license><payment type="purchase"><amount currency="USD">0.002</amount></payment></license></content>'
      .. '</rsl>\n')
    local res = h.admin(gw, "POST", "/admin/tenants/news/reload-catalog")
    assert.are.equal(202, res.status, res.body)
    local deadline = h.now() + 5
    while entries("news") ~= 2 and h.now() < deadline do
      h.sleep(0.05)
    end
    assert.are.equal(2, entries("news"))
    assert.are.equal(1, entries("shop"))
  end)

  it("POST /admin/drain: readiness 503, in-flight answered, new connections refused, admin serves on", function()
    local dres = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json",
      h.json_discover({ "https://shop.example/x" }), { "Host: shop.example" }):gsub("Host: news.example\r\n", ""),
      { timeout = 5 }))
    assert.are.equal(200, dres.status, dres.body)
    local offer = h.json_decode(dres.body).results[1].offers[1].id
    local body = string.format('{"aiSystem":{"id":"bot","billingReference":"acct-drain-0001"},'
      .. '"idempotencyKey":"drain-%s","items":[{"offerId":"%s"}]}', h.random_hex(4), offer)
    local raw = h.connect_req(h.EXECUTE, "json", body, { "Host: shop.example" }):gsub("Host: news.example\r\n", "")
    local inflight = assert(h.connect(gw.port, 10))
    assert(h.send(inflight, raw))
    h.sleep(0.3) -- the purchase now waits for the billing service
    assert.are.equal("", (h.poll_bytes(inflight, 0.05)), "answered before the drain: not in flight")
    local t0 = h.now()
    local res = h.admin(gw, "POST", "/admin/drain?delay_ms=1000")
    assert.are.equal(202, res.status, res.body)
    -- During the delay: still accepting, but not ready.
    local ready = assert(h.request(gw.port, h.get_req("/readyz"), { timeout = 2 }))
    assert.are.equal(503, ready.status, ready.body)
    assert.truthy(ready.body:find('"draining"', 1, true), ready.body)
    -- Idempotent.
    local again = h.admin(gw, "POST", "/admin/drain")
    assert.are.equal(200, again.status, again.body)
    assert.is_true(h.json_decode(again.body).already, again.body)
    -- After the delay the public port refuses new connections.
    local refused = false
    local deadline = h.now() + 5
    while h.now() < deadline do
      local s = h.connect(gw.port, 1)
      if not s then
        refused = true
        break
      end
      s:close()
      h.sleep(0.05)
    end
    assert.is_true(refused, "the public port still accepts after the drain")
    assert.is_true(h.now() - t0 >= 0.9, "closed before delay_ms")
    -- The purchase in flight is answered in full, then its connection closes.
    local ans, err = h.read_response(inflight, 10)
    assert(ans, "the in-flight request got no answer: " .. tostring(err))
    assert.truthy(ans.status == 200 or ans.status == 503, ans.head .. ans.body)
    assert.are.equal("close", (ans.headers["connection"] or ""):lower(), ans.head)
    assert.are.equal("closed", (h.wait_close(inflight, 3)))
    inflight:close()
    -- The admin listener still serves.
    local st = h.admin(gw, "GET", "/admin/drain")
    assert.are.equal(200, st.status)
    assert.is_true(h.json_decode(st.body).draining, st.body)
    assert.are.equal(200, h.admin(gw, "GET", "/admin/tenants").status)
    h.stop_clean(gw)
  end)
end)
