-- The admin listener against the real binary: bearer token required,
-- /metrics only there, and a clean exit on SIGTERM.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

describe("admin listener", function()
  local gw

  setup(function()
    gw = h.start()
  end)

  teardown(function()
    if gw and not gw.stopped then
      h.stop(gw)
    end
  end)

  local function metrics(headers)
    return assert(h.request(gw.admin_port, h.get_req("/metrics", headers, "127.0.0.1")))
  end

  local function assert_refused(res)
    assert.are.equal(401, res.status, res.head .. res.body)
    assert.truthy((res.headers["www-authenticate"] or ""):match("^Bearer"), res.head)
    assert.falsy(res.body:find("# HELP", 1, true), "metrics leaked in a refusal")
    assert(h.alive(gw.port))
  end

  it("no token -> 401", function()
    assert_refused(metrics())
  end)

  it("wrong token -> 401", function()
    assert_refused(metrics({ "Authorization: Bearer not-the-token" }))
  end)

  it("the token with its last character changed -> 401", function()
    local t = gw.token:sub(1, -2) .. (gw.token:sub(-1) == "0" and "1" or "0")
    assert_refused(metrics({ "Authorization: Bearer " .. t }))
  end)

  it("a prefix of the token -> 401", function()
    assert_refused(metrics({ "Authorization: Bearer " .. gw.token:sub(1, -2) }))
  end)

  it("the token with extra characters -> 401", function()
    assert_refused(metrics({ "Authorization: Bearer " .. gw.token .. "x" }))
  end)

  it("the token under another scheme -> 401", function()
    assert_refused(metrics({ "Authorization: Basic " .. gw.token }))
  end)

  it("the right token -> 200 with Prometheus text", function()
    -- One Connect call first, so the RPC counter has a sample.
    local call = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover({ "https://news.example/a" }))))
    assert.are.equal(200, call.status)
    local res = metrics({ "Authorization: Bearer " .. gw.token })
    assert.are.equal(200, res.status, res.head .. res.body)
    assert.truthy((res.headers["content-type"] or ""):match("^text/plain"), res.head)
    assert.truthy(res.body:find("# TYPE exchange_rpc_total counter", 1, true), res.body)
    assert.truthy(res.body:find('exchange_rpc_total{method="DiscoverResources",code="ok"', 1, true), res.body)
  end)

  it("/metrics on the public port -> 404, with or without the token", function()
    -- A host no tenant claims: nothing answers but the gateway's own routes.
    local a = assert(h.request(gw.port, h.get_req("/metrics", nil, "127.0.0.1")))
    assert.are.equal(404, a.status)
    local b = assert(h.request(gw.port, h.get_req("/metrics", { "Authorization: Bearer " .. gw.token }, "127.0.0.1")))
    assert.are.equal(404, b.status)
    assert.falsy(b.body:find("# HELP", 1, true))
    -- A tenant's host: /metrics is one of its resource paths, never the registry.
    local c = assert(h.request(gw.port, h.get_req("/metrics", { "Authorization: Bearer " .. gw.token })))
    assert.are_not.equal(200, c.status)
    assert.falsy(c.body:find("# HELP", 1, true))
  end)

  it("bad HTTP on the admin port -> 400, admin still answers", function()
    local res = assert(h.request(gw.admin_port, "GARBAGE\r\n\r\n"))
    assert.are.equal(400, res.status)
    assert.are.equal(200, metrics({ "Authorization: Bearer " .. gw.token }).status)
  end)

  it("SIGTERM: exits with status 0 within the shutdown grace", function()
    local exited, rc, took = h.stop(gw)
    assert.is_true(exited, "still running 10 s after SIGTERM")
    assert.are.equal(0, rc, "exit status; log:\n" .. gw.log())
    assert.is_true(took < 3, string.format("took %.2f s to stop", took))
    assert.is_nil(h.connect(gw.port, 1), "public port still accepts after exit")
  end)
end)
