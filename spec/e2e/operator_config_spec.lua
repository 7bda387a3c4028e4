-- What operators set in the configuration (core/config/config.h) reaches the
-- running gateway: offer lifetime, idempotency key length, catalog size cap,
-- strict RSL, policy time and memory limits, the reload debounce; and the
-- signer and billing kinds that do not exist yet are refused, not ignored.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local function rsl(amount, extra)
  return string.format([[<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/a/*">
    <license>
      <permits type="usage">%s</permits>
      <payment type="use"><amount currency="USD">%s</amount></payment>
    </license>
  </content>
</rsl>
<!--%s-->
]], extra and "tdm" or "ai-input", amount, extra or "")
end

-- "tdm" is a draft token: the lenient parser maps it to ai-train with a warning,
-- the strict one refuses the document.
local NONCONFORMANT = rsl("0.02", " ")
local BIG = rsl("0.03", string.rep("x", 2000))

local function discover(gw, uris)
  return assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover(uris))))
end

local function get(gw, host, path)
  return assert(h.request(gw.port, h.get_req(path or "/x", nil, host)))
end

local function readyz(gw)
  return assert(h.request(gw.port, h.get_req("/readyz")))
end

local function wait_for(pred, seconds)
  local deadline = h.now() + (seconds or 5)
  repeat
    if pred() then return true end
    h.sleep(0.05)
  until h.now() > deadline
  return false
end

-- Runs `tollgate check` on a configuration whose tenants section is given.
-- Returns the exit status and the output.
local function check(tenants, files, extra)
  local p = assert(io.popen("mktemp -d"))
  local dir = p:read("*l")
  p:close()
  local path = h.write_config(dir, { public = 1, admin = 2 }, "token-for-check-0123",
    { tenants = tenants, files = files, extra = extra })
  local out = assert(io.popen(string.format("%s check -c %s 2>&1; echo \"rc=$?\"", h.sh_quote(h.binary()),
    h.sh_quote(path)))):read("*a")
  os.execute("rm -rf " .. h.sh_quote(dir))
  return tonumber(out:match("rc=(%d+)%s*$")), out, path
end

describe("operator settings", function()
  local gw

  setup(function()
    gw = h.start({
      tenants = [[
    { name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" } },
    { name = "lenient", hosts = { "lenient.example" }, catalog = { source = "odd.xml", strict = false } },
    { name = "strict", hosts = { "strict.example" }, catalog = { source = "odd.xml", strict = true } },
    { name = "big", hosts = { "big.example" }, catalog = { source = "big.xml" } },
    { name = "reload", hosts = { "reload.example" }, policy = "reload.lua" },]],
      extra = [[
  exchange = { offer_ttl_s = 60, idempotency_key_max = 16 },
  ingest = { max_bytes = 1024, timeout_ms = 2000, initial_wait_ms = 3000 },
  policy = { watch_debounce_ms = 1500 },]],
      files = {
        ["news.xml"] = rsl("0.01"),
        ["odd.xml"] = NONCONFORMANT,
        ["big.xml"] = BIG,
        ["reload.lua"] = 'return { price = function(o, r) return 100, "USD" end }',
      },
    })
    assert(wait_for(function()
      local body = readyz(gw).body
      return body:find('"parse"', 1, true) and body:find('"too_large"', 1, true)
    end), readyz(gw).body)
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("issues offers that expire after exchange.offer_ttl_s", function()
    local res = discover(gw, { "https://news.example/a/1" })
    assert.are.equal(200, res.status, res.body)
    local offer = h.json_decode(res.body).results[1].offers[1]
    local left = tonumber(offer.expiresAtUnix) - os.time()
    assert(left >= 58 and left <= 61, "expires in " .. left .. " s")
  end)

  it("takes idempotency keys up to exchange.idempotency_key_max bytes", function()
    local function execute(key)
      local body = string.format('{"idempotencyKey":"%s","items":[{"offerId":"x"}]}', key)
      return assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", body)))
    end
    local long = execute(string.rep("k", 17))
    assert.are.equal("invalid_argument", h.connect_code(long))
    assert.are.equal("idempotency_key: required, 1 to 16 bytes of UTF-8", h.json_decode(long.body).message)
    -- 16 bytes pass the key check and reach the next one: no billing reference
    local ok16 = execute(string.rep("k", 16))
    assert.are.equal("invalid_argument", h.connect_code(ok16))
    assert.truthy(h.json_decode(ok16.body).message:find("^ai_system.billing_reference"), ok16.body)
  end)

  it("refuses a non-conformant RSL document for a strict tenant only", function()
    local res = discover(gw, { "https://lenient.example/a/1", "https://strict.example/a/1" })
    assert.are.equal(200, res.status, res.body)
    local results = h.json_decode(res.body).results
    assert(results[1].offers, res.body)
    assert.are.equal("20000", results[1].offers[1].pricing.price.amount)
    assert.are.equal("no catalog loaded for this tenant", results[2].absenceDetail)
    local ready = h.json_decode(readyz(gw).body)
    local why = {}
    for _, r in ipairs(ready.reasons) do
      if type(r) == "table" then why[r.tenant] = r.catalog end
    end
    assert.are.equal("parse", why.strict)
    assert.is_nil(why.lenient)
  end)

  it("refuses a catalog larger than ingest.max_bytes", function()
    local res = discover(gw, { "https://big.example/a/1" })
    assert.are.equal("no catalog loaded for this tenant", h.json_decode(res.body).results[1].absenceDetail)
    assert.truthy(readyz(gw).body:find('{"tenant":"big","catalog":"too_large"}', 1, true))
  end)

  it("waits policy.watch_debounce_ms after a policy file changes before reloading it", function()
    local function price()
      local res = get(gw, "reload.example")
      assert.are.equal(402, res.status, res.body)
      return h.json_decode(res.body).price.amount
    end
    assert.are.equal("100", price())
    h.write_file(gw.dir .. "/reload.lua", 'return { price = function(o, r) return 200, "USD" end }')
    h.sleep(0.7) -- the default debounce (200 ms) would have reloaded by now
    assert.are.equal("100", price())
    assert(wait_for(function() return price() == "200" end, 8), "the edit was never reloaded")
  end)
end)

describe("policy limits from the configuration", function()
  local gw

  setup(function()
    gw = h.start({
      tenants = [[
    { name = "slow", hosts = { "slow.example" }, policy = "slow.lua" },
    { name = "hungry", hosts = { "hungry.example" }, policy = "hungry.lua" },]],
      extra = "policy = { time_limit_ms = 7, memory_limit = 4194304 },",
      files = {
        ["slow.lua"] = "return { price = function(o, r) while true do end end }",
        ["hungry.lua"] = 'return { price = function(o, r) return #string.rep("x", 8 * 1024 * 1024), "USD" end }',
      },
    })
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("bounds a hook call by policy.time_limit_ms", function()
    local res = get(gw, "slow.example")
    assert.are.equal(500, res.status, res.body)
    assert(wait_for(function() return gw.log():find("exceeded its time limit (7 ms)", 1, true) end), gw.log())
  end)

  it("bounds a policy state by policy.memory_limit", function()
    local res = get(gw, "hungry.example")
    assert.are.equal(500, res.status, res.body)
    assert(wait_for(function() return gw.log():find("exceeded its memory limit (4194304 bytes)", 1, true) end),
      gw.log())
  end)
end)

describe("tollgate check", function()
  it("runs fixtures under the configured policy limits, as the gateway does", function()
    -- A fixture that needs well over the default 50 ms per call.
    local slow = [[
local P = {}
function P.price(o, r) for i = 1, 5e7 do end return 1, "USD" end
P.fixtures = { { name = "slow but fine", hook = "price", offer = { amount = 1, currency = "USD" },
                 expect = { 1, "USD" } } }
return P
]]
    local tenants = '{ name = "news", hosts = { "news.example" }, policy = "slow.lua" },'
    local rc, out = check(tenants, { ["slow.lua"] = slow })
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("slow but fine", 1, true), out)
    rc, out = check(tenants, { ["slow.lua"] = slow }, "policy = { time_limit_ms = 10000 },")
    assert.are.equal(0, rc, out)
  end)
end)

describe("tollgate check on secrets", function()
  it("warns about a secret file that group or others can read, and not about one they cannot", function()
    local p = assert(io.popen("mktemp -d"))
    local dir = p:read("*l")
    p:close()
    local path = h.write_config(dir, { public = 1, admin = 2 }, "token-for-check-0123",
      { tenants = '{ name = "news", hosts = { "news.example" } },' })
    local function run()
      return assert(io.popen(string.format("%s check -c %s 2>&1", h.sh_quote(h.binary()), h.sh_quote(path))))
        :read("*a")
    end
    local quiet = run()
    os.execute("chmod 644 " .. h.sh_quote(dir .. "/admin.token"))
    local loud = run()
    os.execute("rm -rf " .. h.sh_quote(dir))
    assert.truthy(quiet:find("is valid", 1, true), quiet)
    assert.falsy(quiet:find("readable by group or others", 1, true), quiet)
    assert.truthy(loud:find("admin.token is readable by group or others; chmod 600 it", 1, true), loud)
    assert.truthy(loud:find("is valid", 1, true), loud)
  end)
end)

describe("signer and billing", function()
  it("check reads the signer's key and refuses what the signer cannot use, with the reason", function()
    local rc, out = check([[
    { name = "news", hosts = { "news.example" },
      signer = { type = "nginx_secure_link", base_url = "https://cdn.news.example", ttl_s = 300 } },]])
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("tenant news: signer.key_file: required", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" }, billing = { type = "connect" } },]])
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("tenant news: billing.url: required for type connect", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" },
      billing = { type = "connect", url = "http://127.0.0.1:7001", token_file = "missing.token" } },]])
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("tenants[1].billing.token_file: cannot read", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" },
      billing = { type = "connect", url = "ftp://billing.example", token_file = "billing.token" } },]],
      { ["billing.token"] = "billing-token-0123" })
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("billing.url: 'ftp://billing.example' is not an http(s) URL", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" },
      billing = { type = "connect", url = "http://127.0.0.1:7001", token_file = "billing.token",
                  deadline_ms = 0 } },]], { ["billing.token"] = "billing-token-0123" })
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("billing.deadline_ms: '0' is not an integer in 1..60000", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" },
      signer = { type = "nginx_secure_link", key = "k" } },]])
    assert.are.equal(1, rc, out)
    assert.truthy(out:find("unknown key 'key' in tenants[1].signer", 1, true), out)
    rc, out = check([[
    { name = "news", hosts = { "news.example" }, billing = { type = "builtin" } },]])
    assert.are.equal(0, rc, out)
  end)

  it("the demo gives each tenant a signer and the built-in billing, and checks clean", function()
    local demo = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "../../deploy/demo/tollgate.lua"
    local out = assert(io.popen(string.format("%s check -c %s 2>&1; echo \"rc=$?\"", h.sh_quote(h.binary()),
      h.sh_quote(demo)))):read("*a")
    assert.truthy(out:find("is valid", 1, true), out)
    local _, signers = h.read_file(demo):gsub("\n%s*signer%s*=", "")
    local _, billing = h.read_file(demo):gsub("\n%s*billing%s*=", "")
    assert.are.equal(2, signers)
    assert.are.equal(2, billing)
  end)
end)
