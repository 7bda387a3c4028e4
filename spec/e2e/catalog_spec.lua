-- Catalogs against the real binary: RSL from a file becomes offers in
-- DiscoverResources, a broken file keeps the previous catalog serving, and
-- catalogs replaced continuously under wrk load fail no request and never mix
-- two catalogs in one answer.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local function rsl(amount)
  return string.format([[<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/a/*">
    <license>
      <permits type="usage">ai-input search</permits>
      <payment type="use"><amount currency="USD">%s</amount></payment>
    </license>
  </content>
  <content url="/private/*">
    <license><prohibits type="usage">all</prohibits></license>
  </content>
</rsl>
]], amount)
end

local TENANT = '{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml", refresh_s = 3600 } },'

local function discover(gw, uris)
  local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover(uris))))
  assert.are.equal(200, res.status, res.body)
  return res.body
end

local function refresh(gw)
  local raw = table.concat({ "POST /catalog/refresh?tenant=news HTTP/1.1", "Host: 127.0.0.1",
    "Authorization: Bearer " .. gw.token, "Content-Length: 0", "", "" }, "\r\n")
  return assert(h.request(gw.admin_port, raw, { timeout = 5 }))
end

-- The news tenant's catalog on the admin /status: loaded, failing, attempts
-- (refresh attempts finished), last_error.
local function catalog_status(gw)
  local res = assert(h.request(gw.admin_port,
    h.get_req("/status", { "Authorization: Bearer " .. gw.token }, "127.0.0.1")))
  assert.are.equal(200, res.status, res.body)
  for _, t in ipairs(h.json_decode(res.body).tenants) do
    if t.name == "news" then return t.catalog, res.body end
  end
  error("no tenant news in /status: " .. res.body)
end

local function wait_for(pred, seconds)
  local deadline = h.now() + (seconds or 5)
  while h.now() < deadline do
    if pred() then return true end
    h.sleep(0.05)
  end
  return false
end

describe("catalog", function()
  local gw

  setup(function()
    gw = h.start({ workers = 2, tenants = TENANT, files = { ["news.xml"] = rsl("0.010") } })
    -- The listeners answer before the ingestion thread has read the file.
    local st
    assert(wait_for(function()
      st = catalog_status(gw)
      return st.loaded
    end, 10), "the catalog never loaded")
  end)

  teardown(function()
    if gw and not gw.stopped then
      local exited, rc = h.stop(gw)
      assert.is_true(exited)
      assert.are.equal(0, rc)
    end
  end)

  it("answers offers, prohibitions and absences from the RSL file", function()
    local body = discover(gw, { "https://news.example/a/1", "https://news.example/private/x",
      "https://news.example/other", "https://unknown.example/" })
    assert.truthy(body:find('"amount":"10000"', 1, true), body)
    assert.truthy(body:find('"id":"', 1, true), body)
    assert.truthy(body:find("ABSENCE_REASON_PROHIBITED", 1, true), body)
    assert.truthy(body:find("ABSENCE_REASON_NOT_IN_CATALOG", 1, true), body)
    assert.truthy(body:find("ABSENCE_REASON_TENANT_UNKNOWN", 1, true), body)
    assert.truthy(body:find('"catalogBuiltAtUnix":"', 1, true), body)
  end)

  it("keeps serving the previous catalog when the new file is broken", function()
    local before = catalog_status(gw)
    assert.are.equal(true, before.loaded)
    assert.are.equal(false, before.failing)
    h.write_file(gw.dir .. "/news.xml", "<rsl xmlns='https://rslstandard.org/rsl'><content")
    assert.are.equal(202, refresh(gw).status)
    -- 202 only queues the refresh: the old catalog answers until it has run, so
    -- wait for the attempt to be counted, and failed on the parser, first.
    local st, body
    assert.is_true(wait_for(function()
      st, body = catalog_status(gw)
      return st.attempts > before.attempts
    end, 10), "the refresh attempt was never counted: " .. tostring(body))
    assert.are.equal(true, st.failing, body)
    assert.truthy(tostring(st.last_error):find("^parse: "), body)
    assert.are.equal(true, st.loaded, body)
    assert.truthy(discover(gw, { "https://news.example/a/1" }):find('"amount":"10000"', 1, true))
    h.write_file(gw.dir .. "/news.xml", rsl("0.010"))
  end)

  it("swaps catalogs under load without a failed request or a mixed answer", function()
    -- Each request asks for two URIs of the same tenant: both offers must carry
    -- the same price, since one answer reads one catalog.
    local script = gw.dir .. "/swap.lua"
    h.write_file(script, string.format([[
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = %q
local threads = {}
function setup(t) table.insert(threads, t) end
function init() ok, bad, mixed, p1, p2 = 0, 0, 0, 0, 0 end
function response(status, headers, body)
  if status ~= 200 then bad = bad + 1 return end
  local a, b = body:match('"amount":"(%%d+)".-"amount":"(%%d+)"')
  if not a or a ~= b then mixed = mixed + 1 return end
  ok = ok + 1
  if a == "10000" then p1 = p1 + 1 elseif a == "20000" then p2 = p2 + 1 end
end
function done(s)
  local t = { ok = 0, bad = 0, mixed = 0, p1 = 0, p2 = 0 }
  for _, th in ipairs(threads) do
    for k in pairs(t) do t[k] = t[k] + th:get(k) end
  end
  io.write(string.format("SWAP ok=%%d bad=%%d mixed=%%d p1=%%d p2=%%d errors=%%d\n", t.ok, t.bad, t.mixed,
    t.p1, t.p2, s.errors.connect + s.errors.read + s.errors.write + s.errors.timeout))
end
]], h.json_discover({ "https://news.example/a/1", "https://news.example/a/2" })))
    local out = gw.dir .. "/swap.out"
    os.execute(string.format("wrk -t2 -c16 -d5s -s %s http://127.0.0.1:%d%s > %s 2>&1 &", h.sh_quote(script),
      gw.port, h.DISCOVER, h.sh_quote(out)))
    h.sleep(0.3)
    local swaps = 0
    local t0 = h.now()
    while h.now() - t0 < 4.2 do
      swaps = swaps + 1
      h.write_file(gw.dir .. "/news.xml", rsl(swaps % 2 == 0 and "0.010" or "0.020"))
      refresh(gw)
      h.sleep(0.04)
    end
    local text
    assert.is_true(wait_for(function()
      text = h.read_file(out) or ""
      return text:find("SWAP") ~= nil
    end, 15), "wrk did not finish")
    local ok, bad, mixed, p1, p2, errors = text:match("SWAP ok=(%d+) bad=(%d+) mixed=(%d+) p1=(%d+) p2=(%d+) errors=(%d+)")
    print(string.format("catalog swap: %d swaps; %s answers, %s failed, %s mixed, %s socket errors",
      swaps, ok, bad, mixed, errors))
    assert.is_true(tonumber(ok) > 1000, text)
    assert.are.equal(0, tonumber(bad), text)
    assert.are.equal(0, tonumber(mixed), text)
    assert.are.equal(0, tonumber(errors), text)
    assert.is_true(tonumber(p1) > 0 and tonumber(p2) > 0, "the catalog did not change under load: " .. text)
  end)

  it("exposes the catalog metrics", function()
    local res = assert(h.request(gw.admin_port,
      h.get_req("/metrics", { "Authorization: Bearer " .. gw.token }, "127.0.0.1")))
    for _, name in ipairs({ "catalog_entries", "catalog_last_refresh_timestamp",
      "catalog_refresh_duration_seconds", "catalog_refresh_errors_total", "exchange_offers_returned" }) do
      assert.truthy(res.body:find(name, 1, true), "missing " .. name)
    end
    assert.truthy(res.body:find('catalog_refresh_errors_total{tenant_id="news",reason="parse"} 1', 1, true))
  end)
end)

describe("catalog that never loaded", function()
  local gw

  setup(function()
    gw = h.start({ tenants = '{ name = "news", hosts = { "news.example" }, catalog = { source = "broken.xml" } },',
      files = { ["broken.xml"] = "<rsl xmlns='https://rslstandard.org/rsl'><content" } })
    assert(wait_for(function() return catalog_status(gw).attempts >= 1 end, 10),
      "the first load was never attempted")
  end)

  teardown(function()
    if gw and not gw.stopped then h.stop(gw) end
  end)

  it("is named on the public /readyz by kind only; the admin /status has the detail", function()
    -- Listeners answer while the first load is still being waited for (the
    -- reason is then "starting"): wait until the failed attempt is named.
    local res, ready, named
    local deadline = h.now() + 15
    repeat
      res = assert(h.request(gw.port, h.get_req("/readyz")))
      assert.are.equal(503, res.status, res.body)
      ready = h.json_decode(res.body)
      for _, r in ipairs(ready.reasons) do
        if type(r) == "table" and r.tenant == "news" and r.catalog ~= "first load not finished" then named = r end
      end
      if not named then h.sleep(0.05) end
    until named or h.now() > deadline
    assert.are.equal(false, ready.ready)
    assert.truthy(named, res.body)
    assert.are.equal("parse", named.catalog)
    -- The parser's message (and any path or URL) is for operators, not for
    -- whoever can reach /readyz.
    assert.falsy(res.body:find("parse:", 1, true), res.body)
    assert.falsy(res.body:find(gw.dir, 1, true), res.body)

    local st = assert(h.request(gw.admin_port,
      h.get_req("/status", { "Authorization: Bearer " .. gw.token }, "127.0.0.1")))
    assert.are.equal(200, st.status, st.body)
    local status = h.json_decode(st.body)
    local cat = status.tenants[1].catalog
    assert.are.equal(false, cat.loaded)
    assert.truthy(cat.last_error:find("^parse: .+"), st.body)
  end)
end)
