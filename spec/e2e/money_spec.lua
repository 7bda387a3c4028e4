-- Money in the configuration: payments.x402.price is an integer count of
-- atomic units (1000 = 0.001 USDC). A malformed price is a configuration
-- error with file and line, for `tollgate check` and `tollgate run` alike;
-- it used to read as 0 and serve the resource free. On the request path a
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

-- A configuration with one tenant priced by the Lua expression price;
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

local MALFORMED = {
  { lua = '"0.001"', why = '"0.001" is not an amount in atomic units (a decimal fraction; an integer: 1000 = 0.001 USDC at 6 decimals)' },
  { lua = '"abc"', why = "not digits" },
  { lua = '"-5"', why = "negative" },
  { lua = "-5", why = "negative" },
  { lua = '"1e3"', why = "an exponent" },
  { lua = '" 10"', why = "spaces" },
  { lua = '"10 "', why = "spaces" },
  { lua = '""', why = "empty" },
  { lua = "1.5", why = "a decimal fraction" },
  { lua = "1e30", why = "is more than 2^53" },
  { lua = '"99999999999999999999"', why = "is more than 2^53" },
  { lua = "{ 1000 }", why = "expected an amount in atomic units" },
}

describe("a malformed price", function()
  for _, case in ipairs(MALFORMED) do
    it("price = " .. case.lua .. " fails tollgate check with file and line", function()
      local dir = tmpdir()
      local path, line = priced_config(dir, case.lua)
      local out, rc = run("check", path)
      assert.are.equal(1, rc, out)
      assert.truthy(out:find(path .. ":" .. line .. ": tenants[1].payments.x402.price: ", 1, true), out)
      assert.truthy(out:find(case.why, 1, true), out)
      os.execute("rm -rf " .. h.sh_quote(dir))
    end)
  end

  it("refuses start-up instead of serving free", function()
    local dir = tmpdir()
    local path, line = priced_config(dir, '"0.001"')
    local out, rc = run("run", path)
    assert.are.equal(1, rc, out)
    assert.truthy(out:find(path .. ":" .. line .. ":", 1, true), out)
    assert.truthy(out:find("atomic units", 1, true), out)
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)

  it("a well-formed price passes check", function()
    for _, price in ipairs({ "1000", '"1000"', "0", '"9007199254740992"' }) do
      local dir = tmpdir()
      local out, rc = run("check", (priced_config(dir, price)))
      assert.are.equal(0, rc, price .. ": " .. out)
      os.execute("rm -rf " .. h.sh_quote(dir))
    end
  end)
end)

describe("the price on the request path", function()
  local gw
  local PAY_TO = 'pay_to = "0x000000000000000000000000000000000000dEaD"'
  local policies = {
    ["nohook.lua"] = "return { skip = function(req) return false end }\n",
    ["zero.lua"] = 'return { price = function(offer, req) return 0, "USD" end }\n',
    ["nil.lua"] = "return { price = function(offer, req) return nil end }\n",
    ["passthrough.lua"] = "return { price = function(offer, req) return offer.amount, offer.currency end }\n",
    ["own-currency.lua"] = 'return { price = function(offer, req) return offer.amount, "USD" end }\n',
  }
  local tenants = table.concat({
    '{ name = "num", hosts = { "num.example" }, payments = { x402 = { price = 1000 } } },',
    '{ name = "str", hosts = { "str.example" }, payments = { x402 = { price = "2500" } } },',
    '{ name = "big", hosts = { "big.example" }, payments = { x402 = { price = "9007199254740992" } } },',
    '{ name = "zero", hosts = { "zero.example" }, payments = { x402 = { price = 0 } } },',
    '{ name = "none", hosts = { "none.example" } },',
    '{ name = "noprice", hosts = { "noprice.example" }, payments = { x402 = { ' .. PAY_TO .. " } } },",
    '{ name = "nohook", hosts = { "nohook.example" }, policy = "nohook.lua" },',
    '{ name = "nohook-priced", hosts = { "nohook-priced.example" }, policy = "nohook.lua",'
      .. " payments = { x402 = { price = 700 } } },",
    '{ name = "passthrough", hosts = { "passthrough.example" }, policy = "passthrough.lua" },',
    '{ name = "own-currency", hosts = { "own-currency.example" }, policy = "own-currency.lua" },',
    '{ name = "hook-zero", hosts = { "hook-zero.example" }, policy = "zero.lua" },',
    '{ name = "hook-nil", hosts = { "hook-nil.example" }, policy = "nil.lua",'
      .. " payments = { x402 = { price = 1000 } } },",
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

  it("a configured price is asked for, to the atomic unit", function()
    local cases = { ["num.example"] = "1000", ["str.example"] = "2500", ["big.example"] = "9007199254740992",
      ["nohook-priced.example"] = "700" }
    for host, want in pairs(cases) do
      local res = get(host)
      assert.are.equal(402, res.status, host .. ": " .. res.body)
      assert.are.equal(want, amount(res), host .. ": " .. res.body)
      assert.truthy(res.body:find('"currency":"USDC"', 1, true), res.body)
    end
  end)

  it("no price anywhere is not for sale, never free", function()
    for _, host in ipairs({ "none.example", "noprice.example", "nohook.example" }) do
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

  it("a price hook that answers nil wins over the configured price", function()
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
