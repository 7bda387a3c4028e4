-- Every shipped policy and every example in policies/README.md: loads in the
-- harness with its fixtures, has specs, and passes the gateway's own check
-- (`tollgate check`, when run-suite.sh hands us the binary) with the same
-- verdict as the harness.
local harness = require("tollgate.harness")

local function read(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

local function shipped()
  local list = {}
  local ls = io.popen("ls policies/*.lua 2>/dev/null")
  for line in ls:lines() do list[#list + 1] = line end
  ls:close()
  table.sort(list)
  return list
end

-- The ```lua blocks of the README, by their first line.
local function readme_blocks()
  local blocks = {}
  for code in read("policies/README.md"):gmatch("```lua\n(.-)```") do
    blocks[#blocks + 1] = code
  end
  return blocks
end

describe("shipped policies", function()
  local files = shipped()

  it("are at least the three documented examples", function()
    local names = {}
    for _, f in ipairs(files) do names[f] = true end
    for _, want in ipairs({ "policies/news_publisher.lua", "policies/metered_api.lua", "policies/strict.lua" }) do
      assert.is_true(names[want] == true, want)
    end
  end)

  for _, file in ipairs(files) do
    local name = file:match("([^/]+)%.lua$")

    it(file .. " loads with its fixtures, and has at least three", function()
      local ok, err = harness.check(file)
      assert.is_true(ok, err)
      assert.is_true(harness.load(file, { fixtures = false }):fixtures() >= 3)
    end)

    it(file .. " has a spec of its own", function()
      assert.is_true(exists("spec/policies/" .. name .. "_spec.lua"), "spec/policies/" .. name .. "_spec.lua")
    end)

    it(file .. " answers anonymous requests without failing", function()
      local p = harness.load(file, { now = 1700000000 })
      local anon = harness.req({ ip = "192.0.2.1" })
      for _, offer in ipairs({ harness.offer(), harness.offer({ model = "free", amount = harness.NONE }),
                               harness.offer({ amount = harness.NONE, currency = harness.NONE }) }) do
        local ok, msg = p:call("price", offer, anon)
        assert.is_true(ok, msg)
      end
      for _, hook in ipairs({ "skip", "rate_limit" }) do
        local ok, msg = p:call(hook, anon)
        assert.is_true(ok, msg)
      end
      local ok, msg = p:call("on_billing_timeout", harness.txn({ ai_id = harness.NONE }))
      assert.is_true(ok, msg)
      ok, msg = p:call("settle", anon, harness.sale({ payer = harness.NONE }))
      assert.is_true(ok, msg)
    end)
  end
end)

describe("policies/README.md", function()
  local blocks = readme_blocks()

  it("has worked examples", function()
    local n = 0
    for _, code in ipairs(blocks) do
      if code:find("^%-%- example: ") then n = n + 1 end
    end
    assert.is_true(n >= 4, "examples found: " .. n)
  end)

  for i, code in ipairs(blocks) do
    local label = code:match("^%-%- example: ([%w%-_]+)")
    if label then
      it("example '" .. label .. "' loads and passes its fixtures", function()
        local p = harness.load_string(code, "README-" .. label .. ".lua", { fixtures = false })
        assert.is_true(p:fixtures() >= 1)
      end)
    end

    local spec_name = code:match("^%-%- (spec/policies/[%w_]+_spec%.lua)")
    if spec_name then
      -- Runs the spec shown in the README with a small describe/it runner.
      it("spec example " .. spec_name .. " passes (block " .. i .. ")", function()
        local tests, befores = {}, {}
        local env = setmetatable({
          describe = function(_, fn) fn() end,
          before_each = function(fn) befores[#befores + 1] = fn end,
          it = function(name, fn) tests[#tests + 1] = { name = name, fn = fn } end,
          require = function(m) assert(m == "tollgate.harness") return harness end,
          assert = assert,
        }, { __index = _G })
        local chunk = assert(loadstring(code, "=" .. spec_name))
        setfenv(chunk, env)
        chunk()
        assert.is_true(#tests >= 3)
        for _, t in ipairs(tests) do
          for _, b in ipairs(befores) do b() end
          local ok, err = pcall(t.fn)
          assert.is_true(ok, t.name .. ": " .. tostring(err))
        end
      end)
    end
  end
end)

-- The gateway's verdict on the same files: tollgate check -c <config>.
local bin = os.getenv("TOLLGATE_BIN")

local function gateway_check(policy_path)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p '" .. dir .. "'") == 0)
  local cfg = dir .. "/tollgate.lua"
  local f = assert(io.open(cfg, "wb"))
  f:write(string.format([[return { listen = { { host = "127.0.0.1", port = 0 } },
    tenants = { { name = "t", hosts = { "t.example" }, policy = %q } } }]], policy_path))
  f:close()
  local p = io.popen("timeout 10 '" .. bin .. "' check -c '" .. cfg .. "' 2>&1; echo \"rc=$?\"")
  local out = p:read("*a")
  p:close()
  os.execute("rm -rf '" .. dir .. "'")
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, out:gsub("rc=%d+%s*$", "")
end

local function abs(path)
  if path:sub(1, 1) == "/" then return path end
  local pwd = io.popen("pwd"):read("*l")
  return pwd .. "/" .. path
end

describe("tollgate check agrees with the harness", function()
  if not bin or bin == "" then
    pending("TOLLGATE_BIN is not set (run spec/policies/run-suite.sh <tollgate-bin> <build-dir>)")
    return
  end

  for _, file in ipairs(shipped()) do
    it("accepts " .. file, function()
      local rc, out = gateway_check(abs(file))
      assert.are.equal(0, rc, out)
      assert.truthy(out:find("is valid", 1, true), out)
    end)
  end

  local broken = {
    syntax = "local P = {}\nfunction P.skip(req)\n  return req.path ==\nend\nreturn P\n",
    top_level = "local x\nreturn { skip = x.y }\n",
    not_a_table = "return 42\n",
    unknown_key = "return { prcie = function() end }\n",
    hook_type = "return { price = 15000 }\n",
    fixture = "return { price = function(o) return o.amount * 2, 'USD' end,\n" ..
      "  fixtures = { { name = 'x3', hook = 'price', offer = { amount = 5 }, expect = { 15, 'USD' } } } }\n",
    fixture_type = "return { price = function() return 0.5, 'USD' end,\n" ..
      "  fixtures = { { hook = 'price', expect = { 1, 'USD' } } } }\n",
    fixture_field = "return { skip = function() return true end,\n" ..
      "  fixtures = { { hook = 'skip', req = { pth = '/' }, expect = { true } } } }\n",
    fixture_req = "return { skip = function() return true end,\n" ..
      "  fixtures = { { hook = 'skip', req = { kind = 'http', purpose = 'ai-train' }, expect = { true } } } }\n",
    fixture_path = "return { skip = function() return true end,\n" ..
      "  fixtures = { { hook = 'skip', req = { path = '/free/../paid' }, expect = { true } } } }\n",
    escape = "return { skip = function() return true end, _x = io.open('/etc/passwd') }\n",
    loop = "while true do end\n",
  }
  local names = {}
  for k in pairs(broken) do names[#names + 1] = k end
  table.sort(names)

  for _, k in ipairs(names) do
    it("refuses the same broken policy: " .. k, function()
      local dir = os.tmpname()
      os.remove(dir)
      os.execute("mkdir -p '" .. dir .. "'")
      local path = dir .. "/" .. k .. ".lua"
      local f = assert(io.open(path, "wb"))
      f:write(broken[k])
      f:close()
      local ok, herr = harness.check(path)
      local rc, out = gateway_check(path)
      os.execute("rm -rf '" .. dir .. "'")
      assert.is_false(ok)
      assert.are.equal(1, rc, out)
      -- Both name the file; for code errors both give the same reason.
      assert.truthy(herr:find(path, 1, true), herr)
      assert.truthy(out:find(path, 1, true), out)
      if k ~= "loop" then
        assert.are.equal("tollgate: " .. herr, (out:gsub("%s+$", "")))
      end
    end)
  end
end)
