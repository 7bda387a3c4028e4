-- A policy reload, as an operator reads it: one log line per reload,
-- whatever asked for it; a refused reload names the version it refused and
-- the one that stays; a version reads the same (12 characters) in the log,
-- the admin answers and the metrics.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local V1 = 'return { price = function(o, r) return 100, "USD" end }\n'
local V2 = 'return { price = function(o, r) return 200, "USD" end }\n'
local BROKEN = 'return { price = function(o, r) return 300, "USD" end\n' -- missing brace

local function sha12(text)
  local path = os.tmpname()
  h.write_file(path, text)
  local p = assert(io.popen("sha256sum " .. h.sh_quote(path)))
  local sum = p:read("*l"):sub(1, 12)
  p:close()
  os.remove(path)
  return sum
end

local function admin(gw, method, path)
  local raw = table.concat({ method .. " " .. path .. " HTTP/1.1", "Host: 127.0.0.1",
    "Authorization: Bearer " .. gw.token, "Content-Length: 0", "", "" }, "\r\n")
  return assert(h.request(gw.admin_port, raw, { timeout = 10 }))
end

local function log_lines(gw, msg)
  local out = {}
  for line in gw.log():gmatch("[^\n]+") do
    if line:find('"msg":"' .. msg .. '"', 1, true) then out[#out + 1] = h.json_decode(line) end
  end
  return out
end

describe("policy reload log", function()
  local gw

  setup(function()
    gw = h.start({ tenants = '{ name = "news", hosts = { "news.example" }, policy = "p.lua" },',
      files = { ["p.lua"] = V1 } })
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("is one line per applied reload, with versions as the answers show them", function()
    h.write_file(gw.dir .. "/p.lua", V2)
    local res = admin(gw, "POST", "/reload")
    assert.are.equal(200, res.status, res.body)
    local report = h.json_decode(res.body)
    assert.are.equal(sha12(V2), report.tenants[1].version)
    local lines = log_lines(gw, "policy reloaded")
    assert.are.equal(1, #lines, gw.log())
    assert.are.equal(sha12(V2), lines[1].version)
    assert.are.equal(sha12(V1), lines[1].previous)
    local st = h.json_decode(admin(gw, "GET", "/status").body)
    assert.are.equal(sha12(V2), st.tenants[1].policy.version)
    local metrics = admin(gw, "GET", "/metrics").body
    assert.truthy(metrics:find('policy_version_info{tenant_id="news",version="' .. sha12(V2) .. '"} 1', 1, true),
      metrics)
  end)

  it("names the refused version and the one that stays", function()
    h.write_file(gw.dir .. "/p.lua", BROKEN)
    local res = admin(gw, "POST", "/reload")
    assert.are.equal(422, res.status, res.body)
    local lines = log_lines(gw, "policy reload refused")
    assert.are.equal(1, #lines, gw.log())
    assert.are.equal(sha12(BROKEN), lines[1].version)
    assert.are.equal(sha12(V2), lines[1].active)
    assert.truthy(lines[1].reason:find("p.lua", 1, true), lines[1].reason)
    h.write_file(gw.dir .. "/p.lua", V2)
  end)
end)
