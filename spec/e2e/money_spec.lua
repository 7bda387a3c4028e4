-- Money on the request path. Prices come from the tenant's catalog (the RSL
-- <amount>, a decimal in the currency's units, becomes an integer count of
-- atomic units: 0.001 USD = 1000) and its price hook, on HTTP as on
-- DiscoverResources. The old flat payments.x402.price is refused with file
-- and line (it used to read "0.001" as 0 and serve the resource free). A
-- resource without any price is not for sale; only an explicit 0 is free.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local function tmpdir()
  local dir = os.tmpname()
  os.remove(dir)
  os.execute("mkdir -p " .. h.sh_quote(dir))
  return dir
end

-- Runs `tollgate CMD -c FILE`; returns its output and exit status.
local function run(cmd, path)
  local p = io.popen("timeout 10 " .. h.sh_quote(h.binary()) .. " " .. cmd .. " -c " .. h.sh_quote(path)
    .. " 2>&1; echo rc=$?")
  local out = p:read("*a")
  p:close()
  return out:gsub("rc=(%d+)\n$", ""), tonumber(out:match("rc=(%d+)\n$"))
end

-- A configuration with one tenant given payments.x402.price = price;
-- returns its path and the line the price is on.
local function priced_config(dir, price)
  local path = h.write_config(dir, { public = h.free_port(), admin = h.free_port() }, "t0k3n-for-money", {
    tenants = '{ name = "news", hosts = { "news.example" },\n'
      .. '      payments = { x402 = { pay_to = "0x000000000000000000000000000000000000dEaD",\n'
      .. "        price = " .. price .. " } } },",
  })
  local n = 0
  for line in io.lines(path) do
    n = n + 1
    if line:find("price = ", 1, true) then
      return path, n
    end
  end
  error("no price line in " .. path)
end

describe("payments.x402.price", function()
  for _, price in ipairs({ "1000", '"0.001"', "0", "{ 1000 }" }) do
    it("= " .. price .. " fails tollgate check with file, line and where prices come from", function()
      local dir = tmpdir()
      local path, line = priced_config(dir, price)
      local out, rc = run("check", path)
      assert.are.equal(1, rc, out)
      assert.truthy(out:find(path .. ":" .. line .. ": tenants[1].payments.x402.price: ", 1, true), out)
      assert.truthy(out:find("prices come from the tenant's catalog", 1, true), out)
      os.execute("rm -rf " .. h.sh_quote(dir))
    end)
  end

  it("refuses start-up instead of serving at a price nothing reads", function()
    local dir = tmpdir()
    local path, line = priced_config(dir, '"0.001"')
    local out, rc = run("run", path)
    assert.are.equal(1, rc, out)
    assert.truthy(out:find(path .. ":" .. line .. ":", 1, true), out)
    assert.truthy(out:find("remove payments.x402.price", 1, true), out)
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)
end)

describe("the price on the request path", function()
  local gw
  local policies = {
    ["nohook.lua"] = "return { skip = function(req) return false end }\n",
    ["zero.lua"] = 'return { price = function(offer, req) return 0, "USD" end }\n',
    ["nil.lua"] = "return { price = function(offer, req) return nil end }\n",
    ["passthrough.lua"] = "return { price = function(offer, req) return offer.amount, offer.currency end }\n",
    ["own-currency.lua"] = 'return { price = function(offer, req) return offer.amount, "USD" end }\n',
    ["num.xml"] = h.rsl({ amount = "0.001" }),
    ["str.xml"] = h.rsl({ amount = "0.0025", currency = "EUR" }),
    ["big.xml"] = h.rsl({ amount = "9007199254.740992" }),
    ["seven.xml"] = h.rsl({ amount = "0.0007" }),
    ["zero.xml"] = h.rsl({ free = true }),
    ["noamount.xml"] = h.rsl({ amount = false }),
  }
  local function tenant(name, fields)
    return string.format('{ name = "%s", hosts = { "%s.example" }%s },', name, name, fields or "")
  end
  local tenants = table.concat({
    tenant("num", ', catalog = { source = "num.xml" }'),
    tenant("str", ', catalog = { source = "str.xml" }'),
    tenant("big", ', catalog = { source = "big.xml" }'),
    tenant("zero", ', catalog = { source = "zero.xml" }'),
    tenant("none"),
    tenant("noamount", ', catalog = { source = "noamount.xml" }'),
    tenant("nohook", ', policy = "nohook.lua"'),
    tenant("nohook-priced", ', policy = "nohook.lua", catalog = { source = "seven.xml" }'),
    tenant("passthrough", ', policy = "passthrough.lua"'),
    tenant("own-currency", ', policy = "own-currency.lua", catalog = { source = "noamount.xml" }'),
    tenant("hook-zero", ', policy = "zero.lua"'),
    tenant("hook-nil", ', policy = "nil.lua", catalog = { source = "num.xml" }'),
  }, "\n    ")

  setup(function()
    gw = h.start({ tenants = tenants, files = policies })
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  local function get(host)
    local res, err = h.request(gw.port, h.get_req("/article", nil, host), { timeout = 5 })
    assert(res, "no answer: " .. tostring(err))
    return res
  end

  local function amount(res)
    return res.body:match('"amount":"(%d+)"')
  end

  it("the catalog's price is asked for, to the atomic unit, in its currency", function()
    local cases = { ["num.example"] = { "1000", "USD" }, ["str.example"] = { "2500", "EUR" },
      ["big.example"] = { "9007199254740992", "USD" }, ["nohook-priced.example"] = { "700", "USD" } }
    for host, want in pairs(cases) do
      local res = get(host)
      assert.are.equal(402, res.status, host .. ": " .. res.body)
      assert.are.equal(want[1], amount(res), host .. ": " .. res.body)
      assert.truthy(res.body:find('"currency":"' .. want[2] .. '"', 1, true), res.body)
    end
  end)

  it("no price anywhere is not for sale, never free", function()
    for _, host in ipairs({ "none.example", "noamount.example", "nohook.example" }) do
      local res = get(host)
      assert.are.equal(403, res.status, host .. ": " .. res.body)
      assert.truthy(res.body:find('"not for sale"', 1, true), res.body)
    end
    -- A hook that passes an absent price through passes nil on: the amount
    -- of an unpriced offer is nil, never 0, so this is not for sale either.
    for _, host in ipairs({ "passthrough.example", "own-currency.example" }) do
      local res = get(host)
      assert.are.equal(403, res.status, host .. ": " .. res.body)
      assert.truthy(res.body:find('"not for sale"', 1, true), res.body)
    end
  end)

  it("a price hook that answers nil wins over the catalog's price", function()
    assert.are.equal(403, get("hook-nil.example").status)
  end)

  it("only an explicit 0 is free", function()
    for _, host in ipairs({ "zero.example", "hook-zero.example" }) do
      local res = get(host)
      assert.are.equal(200, res.status, host .. ": " .. res.body)
      assert.truthy(res.body:find('"access":"free"', 1, true), res.body)
    end
  end)
end)
