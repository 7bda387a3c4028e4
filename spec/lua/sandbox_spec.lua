-- The policy sandbox (lua/tollgate/sandbox.lua) on its own, under LuaJIT.
-- The gateway embeds the same file; spec/core/policy_test.c covers the C
-- runtime around it (time and memory limits, views over C structs, reload).

local sandbox = require("tollgate.sandbox")

local function load_ok(src, opts)
  local p, err = sandbox.load(src, "@policies/test.lua", opts)
  assert(p, err)
  return p
end

local function load_err(src, opts)
  local p, err = sandbox.load(src, "@policies/test.lua", opts)
  assert.is_nil(p)
  assert.is_string(err)
  return err
end

-- Runs src as a policy's top level and returns the error it raised.
local function escape_error(code)
  return load_err("do " .. code .. " end\nreturn {}")
end

describe("sandbox.load", function()
  it("returns a normalized table of hooks and fixtures", function()
    local src = [[
      local P = { _notes = "kept out" }
      function P.price(offer) return offer.amount, offer.currency end
      function P.skip() return false end
      P.fixtures = { { hook = "skip", expect = { false } } }
      return P
    ]]
    local p = load_ok(src)
    assert.is_function(p.price)
    assert.is_function(p.skip)
    assert.is_nil(p.rate_limit)
    assert.is_nil(p._notes)
    assert.are.equal(1, #p.fixtures)
  end)

  it("does not see later changes to the policy's own table", function()
    local p = load_ok([[
      local P = {}
      function P.skip() P.skip = function() return true end return false end
      return P
    ]])
    assert.are.same({ true, false }, { sandbox.call(p, "skip", sandbox.views.req({})) })
    assert.are.same({ true, false }, { sandbox.call(p, "skip", sandbox.views.req({})) })
  end)

  it("reports syntax and runtime errors with file and line", function()
    assert.are.equal("policies/test.lua:2: unexpected symbol near '<eof>'",
      load_err("local P = {}\nreturn P +"))
    assert.are.equal("policies/test.lua:3: boom", load_err("local x = 1\n\nerror('boom')"))
  end)

  it("refuses bytecode", function()
    local bc = string.dump(function() return {} end)
    assert.are.equal("policies/test.lua: bytecode chunks are not allowed", load_err(bc))
    assert.are.equal("policies/test.lua: bytecode chunks are not allowed", load_err("\27LJ junk"))
  end)

  it("validates what the chunk returns", function()
    assert.matches("must return a table of hooks, got nil", load_err("x = 1"))
    assert.matches("must return a table of hooks, got string", load_err("return 'x'"))
    assert.matches("hook 'price' must be a function, got number", load_err("return { price = 1 }"))
    assert.matches("unknown field 'pricee'", load_err("return { pricee = function() end }"))
    assert.matches("unknown field '1'", load_err("return { function() end }"))
    assert.matches("fixtures must be a list", load_err("return { fixtures = 5 }"))
    assert.matches("fixture 1: hook must be one of", load_err("return { fixtures = { { hook = 'nope' } } }"))
    assert.matches("fixture 1: unknown field 'expext'",
      load_err("return { fixtures = { { hook = 'skip', expext = {} } } }"))
    assert.matches("fixture 1: give expect or error, not both",
      load_err("return { fixtures = { { hook = 'skip', expect = {}, error = 'x' } } }"))
    assert.matches("fixture 2: expected a table", load_err("return { fixtures = { { hook = 'skip' }, 5 } }"))
  end)

  it("never calls __tostring on an error object", function()
    local err = load_err("error(setmetatable({}, { __tostring = function() while true do end end }))")
    assert.are.equal("policies/test.lua: (error object is a table value)", err)
  end)

  it("gives the policy tollgate.tenant, version, now and log", function()
    local lines = {}
    local p = load_ok([[
      tollgate.log("info", "loaded for " .. tollgate.tenant .. " on " .. tollgate.version)
      return { skip = function() return tollgate.now() == 1234.5 end }
    ]], { tenant = "news", version = "1.2.3", now = function() return 1234.5 end,
          log = function(level, msg) lines[#lines + 1] = level .. ": " .. msg end })
    assert.are.same({ "info: loaded for news on 1.2.3" }, lines)
    assert.are.same({ true, true }, { sandbox.call(p, "skip", sandbox.views.req({})) })
    assert.matches("level must be debug, info, warn or error", load_err("tollgate.log('loud', 'x')"))
    assert.matches("message must be a string", load_err("tollgate.log('info', {})"))
  end)
end)

describe("sandbox escapes", function()
  local cases = {
    { "io.open('/etc/passwd')", "attempt to index global 'io' (a nil value)" },
    { "os.execute('true')", "attempt to call field 'execute' (a nil value)" },
    { "os.exit(1)", "attempt to call field 'exit' (a nil value)" },
    { "return os.getenv('HOME')", "attempt to call field 'getenv' (a nil value)" },
    { "require('ffi')", "module 'ffi' is not allowed in a policy" },
    { "require('jit')", "module 'jit' is not allowed in a policy" },
    { "require('debug')", "module 'debug' is not allowed in a policy" },
    { "require('tollgate.sandbox')", "module 'tollgate.sandbox' is not allowed in a policy" },
    { "load('return 1')", "attempt to call global 'load' (a nil value)" },
    { "loadstring('return 1')", "attempt to call global 'loadstring' (a nil value)" },
    { "dofile('/etc/passwd')", "attempt to call global 'dofile' (a nil value)" },
    { "loadfile('/etc/passwd')", "attempt to call global 'loadfile' (a nil value)" },
    { "string.dump(function() end)", "attempt to call field 'dump' (a nil value)" },
    { "return ('x'):dump()", "attempt to call method 'dump' (a nil value)" },
    { "getfenv(1)", "attempt to call global 'getfenv' (a nil value)" },
    { "setfenv(1, {})", "attempt to call global 'setfenv' (a nil value)" },
    { "rawset(string, 'x', 1)", "attempt to call global 'rawset' (a nil value)" },
    { "rawget(string, 'x')", "attempt to call global 'rawget' (a nil value)" },
    { "string.upper = nil", "attempt to modify read-only table 'string' (field 'upper')" },
    { "table.concat = nil", "attempt to modify read-only table 'table' (field 'concat')" },
    { "math.floor = nil", "attempt to modify read-only table 'math' (field 'floor')" },
    { "os.time = nil", "attempt to modify read-only table 'os' (field 'time')" },
    { "tollgate.log = nil", "attempt to modify read-only table 'tollgate' (field 'log')" },
    { "require('tollgate.money').MAX = 1",
      "attempt to modify read-only table 'tollgate.money' (field 'MAX')" },
    { "getmetatable('').__index.upper = nil", "attempt to index a nil value" },
    { "setmetatable(string, nil)", "cannot change a protected metatable" },
    { "setmetatable('', {})", "bad argument #1 to 'setmetatable' (table expected, got string)" },
    { "collectgarbage()", "attempt to call global 'collectgarbage' (a nil value)" },
    { "newproxy(true)", "attempt to call global 'newproxy' (a nil value)" },
    { "coroutine.create(print)", "attempt to index global 'coroutine' (a nil value)" },
    { "debug.getinfo(1)", "attempt to index global 'debug' (a nil value)" },
    { "jit.on()", "attempt to index global 'jit' (a nil value)" },
    { "return package.loaded", "attempt to index global 'package' (a nil value)" },
    { "return _G.os.execute('x')", "attempt to call field 'execute' (a nil value)" },
    { "gcinfo()", "attempt to call global 'gcinfo' (a nil value)" },
    { "module('x')", "attempt to call global 'module' (a nil value)" },
  }
  for _, c in ipairs(cases) do
    it("closes " .. c[1], function()
      local err = escape_error(c[1])
      assert.truthy(err:find(c[2], 1, true), "got: " .. err)
    end)
  end

  it("leaves the shared library tables untouched", function()
    local upper, find, meta_index = string.upper, string.find, getmetatable("").__index
    load_ok([[
      pcall(function() string.upper = nil end)
      pcall(function() string.find = function() end end)
      pcall(function() getmetatable("").__index.upper = nil end)
      pcall(function() table.insert = nil end)
      return {}
    ]])
    assert.are.equal(upper, string.upper)
    assert.are.equal(find, string.find)
    assert.is_function(table.insert)
    assert.are.equal(meta_index, getmetatable("").__index)
    assert.are.equal("A", ("a"):upper())
  end)

  it("gives each policy its own globals", function()
    local a = load_ok("counter = 1 return { skip = function() counter = counter + 1 return counter == 2 end }")
    local b = load_ok("return { skip = function() return counter ~= nil end }")
    assert.are.same({ true, true }, { sandbox.call(a, "skip", sandbox.views.req({})) })
    assert.are.same({ true, false }, { sandbox.call(b, "skip", sandbox.views.req({})) })
    assert.is_nil(rawget(_G, "counter"))
  end)

  it("lets policies iterate the frozen tables and read what is allowed", function()
    load_ok([[
      local n = 0
      for k, v in pairs(string) do n = n + 1 assert(k ~= "dump") end
      assert(n > 10)
      for k in pairs(os) do assert(k == "time" or k == "clock" or k == "date" or k == "difftime") end
      local money = require("tollgate.money")
      assert(money.from_decimal("0.015", 6) == 15000)
      assert(require("tollgate.money") == money)
      assert(getmetatable(string) == false and getmetatable("") == nil)
      local t = setmetatable({}, { __index = function(_, k) return k .. "!" end })
      assert(t.x == "x!")
      assert(select("#", pcall(error, "x")) == 2)
      assert(_G == _G._G and _G.string == string)
      return {}
    ]])
  end)
end)

describe("sandbox time bounds in plain Lua", function()
  local function times_out(src)
    local t0 = os.clock()
    local ok, err = pcall(sandbox.with_deadline, 0.05, sandbox.load, src, "@t.lua")
    assert.is_false(ok)
    assert.are.equal("policy exceeded its time limit", err)
    assert.is_true(os.clock() - t0 < 1)
  end

  it("stops loops, including ones that catch the timeout", function()
    times_out("while true do end")
    times_out("while true do pcall(function() while true do end end) end")
    times_out("while true do local ok = pcall(error, 'x') end")
    times_out("xpcall(function() error('x') end, function() while true do end end) while true do end")
    times_out("local function f() local ok, e = xpcall(f, f) error(e, 0) end f()")
    times_out("local function f() pcall(f) pcall(f) end f()")
    times_out("local e = setmetatable({}, { __tostring = function() while true do end end })\n" ..
              "pcall(tostring, e) return {}")
  end)

  it("stops pattern bombs, which run in C", function()
    times_out("string.find(string.rep('a', 1e5), '.-.-.-.-b')")
    times_out("return (string.rep('a', 1e5)):match('.-.-.-.-b')")
    times_out("local s = string.rep('a', 1e5) s:gsub('.-.-.-b', '')")
    times_out("for x in string.rep('a', 1e5):gmatch('.-.-.-b') do end")
    times_out("string.find(string.rep('a', 1e7), string.rep('a', 1e5) .. 'b', 1, true)")
  end)

  it("runs xpcall's message handler with the error, after unwinding", function()
    local p = load_ok([[
      local ok, msg = xpcall(function() error("inner", 0) end, function(e) return "handled: " .. e end)
      assert(ok == false and msg == "handled: inner")
      local ok2, a, b = xpcall(function(x, y) return x + y, "z" end, error, 1, 2)
      assert(ok2 == true and a == 3 and b == "z")
      local ok3, m3 = xpcall(error, function() error("again", 0) end)
      assert(ok3 == false and m3 == "again")
      return {}
    ]])
    assert.is_table(p)
  end)

  it("leaves the deadline and the hook as they were", function()
    assert.are.equal(3, sandbox.with_deadline(1, function() return 3 end))
    assert.is_nil(debug.gethook())
    local n = 0
    for i = 1, 1e6 do n = n + i end -- would raise if a hook were left behind
    assert.are.equal(500000500000, n)
  end)
end)

describe("sandbox.views", function()
  it("makes read-only views", function()
    local req = sandbox.views.req({ path = "/a", purposes = { "ai-input", "ai-train" } })
    assert.are.equal("/a", req.path)
    assert.are.equal("GET", req.method)
    assert.are.equal("connect", req.kind) -- purposes come only with Connect calls
    assert.are.equal("ai-input", req.purpose)
    assert.are.same({ "ai-input", "ai-train" }, req.purposes)
    assert.has_error(function() req.path = "/b" end,
      "attempt to modify read-only view 'req' (field 'path')")
    local offer = sandbox.views.offer({ amount = 5, currency = "USD" })
    assert.has_error(function() offer.amount = 0 end,
      "attempt to modify read-only view 'offer' (field 'amount')")
    local txn = sandbox.views.txn({ id = "t1", amount = 5 }, { tenant = "news" })
    assert.are.equal("news", txn.tenant)
    assert.has_error(function() txn.x = 0 end, "attempt to modify read-only view 'txn' (field 'x')")
  end)

  it("hands out copies of lists", function()
    local req = sandbox.views.req({ purpose = "ai-train" })
    local p = req.purposes
    p[1] = "changed"
    assert.are.equal("ai-train", req.purposes[1])
  end)

  it("looks headers up case-insensitively, as req:header() and req.header()", function()
    local req = sandbox.views.req({ headers = { ["User-Agent"] = "bot/1" } })
    assert.are.equal("bot/1", req:header("user-agent"))
    assert.are.equal("bot/1", req.header("USER-AGENT"))
    assert.is_nil(req:header("x-other"))
  end)

  it("refuses unknown and mistyped fields", function()
    assert.has_error(function() sandbox.views.req({ pth = "/" }) end, "req: unknown field 'pth'")
    assert.has_error(function() sandbox.views.offer({ amount = 0.5 }) end,
      "offer.amount: expected integer, got 0.5")
    assert.has_error(function() sandbox.views.req({ purposes = { 1 } }) end,
      "req.purposes[1]: expected string, got number")
    assert.has_error(function() sandbox.views.txn({ id = 5 }) end, "txn.id: expected string, got 5")
    assert.has_error(function() sandbox.views.sale({ amount = 0.5 }) end, "sale.amount: expected integer, got 0.5")
    assert.has_error(function() sandbox.views.sale({ chain = "base" }) end, "sale: unknown field 'chain'")
  end)

  it("makes a read-only sale view, and txn with the x402 fields", function()
    local sale = sandbox.views.sale({ amount = 2000, currency = "USD", network = "eip155:84532",
                                      asset = "0xA", payer = "0xP", scheme = "exact" })
    assert.are.equal(2000, sale.amount)
    assert.are.equal("eip155:84532", sale.network)
    assert.are.equal("sale", tostring(sale))
    assert.has_error(function() sale.amount = 1 end, "attempt to modify read-only view 'sale' (field 'amount')")
    local txn = sandbox.views.txn({ id = "t", payer = "0xP", network = "eip155:84532", transaction = "0xT",
                                    error = "insufficient_funds" })
    assert.are.equal("0xT", txn.transaction)
    assert.are.equal("insufficient_funds", txn.error)
    assert.is_nil(sandbox.views.txn({ id = "t" }).payer)
  end)
end)

-- What the gateway can hand a hook as req (policies/README.md "Views"): the
-- views fixtures and the harness build refuse anything else, and derive
-- what the gateway derives.
describe("sandbox.views.req, held to what the gateway produces", function()
  local req = sandbox.views.req

  -- The message of the error views.req raises for t.
  local function refusal(t)
    local ok, err = pcall(req, t)
    assert.is_false(ok, "accepted")
    return err
  end

  local function refuses(t, field, ...)
    local err = refusal(t)
    assert.are.equal("req." .. field .. ": ", err:sub(1, #field + 6), err)
    for _, want in ipairs({ ... }) do
      assert.truthy(err:find(want, 1, true), "'" .. want .. "' not in: " .. err)
    end
  end

  describe("derives", function()
    it("kind http when nothing says otherwise, with path / and method GET", function()
      for _, t in ipairs({ {}, { path = "/a" }, { ip = "192.0.2.1", headers = { ["X-A"] = "1" } },
                           { purposes = {} }, { method = "POST" } }) do
        local r = req(t)
        assert.are.equal("http", r.kind)
        assert.is_nil(r.rpc)
        assert.are.same({}, r.purposes)
        assert.is_nil(r.purpose)
      end
      local r = req({})
      assert.are.equal("/", r.path)
      assert.are.equal("GET", r.method)
      assert.is_nil(r.uri)
      assert.is_nil(r.host)
      assert.is_nil(r.query)
    end)

    it("kind connect from any AI-system field or rpc, with rpc DiscoverResources and method GET", function()
      for _, t in ipairs({ { ai_id = "bot" }, { ai_name = "Bot" }, { user_type = "personal" },
                           { country = "DE" }, { purpose = "search" }, { purposes = { "ai-train" } },
                           { rpc = "DiscoverResources" } }) do
        local r = req(t)
        assert.are.equal("connect", r.kind)
        assert.are.equal("DiscoverResources", r.rpc)
        assert.are.equal("GET", r.method)
      end
      assert.are.equal("ExecuteTransaction", req({ rpc = "ExecuteTransaction" }).rpc)
      local anon = req({ kind = "connect" })
      assert.are.equal("DiscoverResources", anon.rpc)
      assert.are.same({}, anon.purposes)
    end)

    it("keeps an explicit kind", function()
      assert.are.equal("http", req({ kind = "http", path = "/x" }).kind)
      assert.are.equal("connect", req({ kind = "connect" }).kind)
    end)

    it("host, path and query from uri", function()
      local r = req({ uri = "https://news.example:8443/a/b?x=1&y" })
      assert.are.equal("https://news.example:8443/a/b?x=1&y", r.uri)
      assert.are.equal("news.example:8443", r.host)
      assert.are.equal("/a/b", r.path)
      assert.are.equal("x=1&y", r.query)
      assert.are.equal("http", r.kind)
      r = req({ uri = "http://news.example/" })
      assert.are.equal("/", r.path)
      assert.is_nil(r.query)
      assert.are.equal("", req({ uri = "http://news.example/a?" }).query)
      assert.are.equal("[2001:db8::1]:8080", req({ uri = "http://[2001:db8::1]:8080/" }).host)
    end)

    it("uri from host: http:// on http, https:// on connect", function()
      assert.are.equal("http://news.example/a?b=1", req({ host = "news.example", path = "/a", query = "b=1" }).uri)
      assert.are.equal("http://news.example/", req({ host = "news.example" }).uri)
      assert.are.equal("https://news.example/a", req({ host = "news.example", path = "/a", ai_id = "bot" }).uri)
      assert.are.equal("http://news.example:443/", req({ host = "news.example:443" }).uri)
      assert.are.equal("https://news.example:80/", req({ host = "news.example:80", kind = "connect" }).uri)
    end)

    it("accepts host, path and query alongside a uri they agree with", function()
      local r = req({ uri = "https://news.example/a?q", host = "news.example", path = "/a", query = "q" })
      assert.are.equal("https://news.example/a?q", r.uri)
    end)

    it("user_agent from the User-Agent header on http, and the header from user_agent", function()
      local r = req({ headers = { ["user-agent"] = "Bot/2" } })
      assert.are.equal("Bot/2", r.user_agent)
      r = req({ user_agent = "Bot/3" })
      assert.are.equal("Bot/3", r:header("User-Agent"))
      r = req({ user_agent = "Bot/4", headers = { ["User-Agent"] = "Bot/4" } })
      assert.are.equal("Bot/4", r.user_agent)
    end)

    it("on connect keeps user_agent (the AI system's) apart from the call's headers", function()
      local r = req({ ai_id = "bot", user_agent = "AIBot/1", headers = { ["User-Agent"] = "connect-es/2" } })
      assert.are.equal("AIBot/1", r.user_agent)
      assert.are.equal("connect-es/2", r:header("user-agent"))
      assert.is_nil(req({ ai_id = "bot" }):header("user-agent"))
    end)

    it("purposes from purpose, and purpose from purposes", function()
      assert.are.same({ "search" }, req({ purpose = "search" }).purposes)
      assert.are.equal("ai-input", req({ purposes = { "ai-input", "search" } }).purpose)
      assert.are.same({ "ai-input", "search" }, req({ purpose = "ai-input", purposes = { "ai-input", "search" } }).purposes)
    end)

    it("the tenant from opts unless given", function()
      assert.are.equal("news", req({}, { tenant = "news" }).tenant)
      assert.are.equal("docs", req({ tenant = "docs" }, { tenant = "news" }).tenant)
    end)

    it("a plain table (req_table) that views.req takes back unchanged", function()
      for _, t in ipairs({ {}, { host = "news.example", path = "/a", query = "x", user_agent = "B/1" },
                           { uri = "https://news.example/a", purpose = "ai-train", ai_id = "bot",
                             headers = { Authorization = "Bearer x" } },
                           { rpc = "ExecuteTransaction", uri = "http://news.example:8080/" } }) do
        local plain = sandbox.req_table(t)
        local again = sandbox.req_table(plain)
        assert.are.same(plain, again)
        local v = req(plain)
        for k, val in pairs(plain) do
          if k ~= "headers" then assert.are.same(val, v[k], k) end
        end
      end
      local plain = sandbox.req_table({ purpose = "search", host = "news.example" })
      assert.are.same({ kind = "connect", rpc = "DiscoverResources", method = "GET", host = "news.example",
                        path = "/", uri = "https://news.example/", purposes = { "search" }, purpose = "search",
                        headers = {} }, plain)
      plain = sandbox.req_table({ host = "news.example", user_agent = "B/1" })
      assert.are.same({ kind = "http", method = "GET", host = "news.example", path = "/", uri = "http://news.example/",
                        purposes = {}, user_agent = "B/1", headers = { ["User-Agent"] = "B/1" } }, plain)
    end)
  end)

  describe("refuses", function()
    it("an unknown kind", function()
      assert.are.equal('req.kind: "grpc" is not a kind the gateway produces: write "http" (a request for a ' ..
        'tenant\'s resource) or "connect" (a Connect call about it)', refusal({ kind = "grpc" }))
      refuses({ kind = "HTTP" }, "kind", '"http"')
    end)

    it("an unknown user_type, listing the allowed ones", function()
      assert.are.equal('req.user_type: unknown user type "edu": write one of commercial, non-commercial, ' ..
        "education, government, personal", refusal({ user_type = "edu" }))
    end)

    it("an unknown purpose token, in purpose or purposes", function()
      assert.are.equal('req.purpose: unknown usage purpose "tdm": write one of all, ai-all, ai-train, ' ..
        "ai-input, ai-index, search (the gateway passes no other)", refusal({ purpose = "tdm" }))
      refuses({ purposes = { "search", "resell" } }, "purposes[2]", '"resell"', "ai-train")
      refuses({ purposes = { "AI-TRAIN" } }, "purposes[1]", "unknown usage purpose")
    end)

    it("purpose and purposes that disagree", function()
      refuses({ purpose = "search", purposes = { "ai-train", "search" } }, "purpose", "purposes[1]")
    end)

    it("AI-system fields on kind http, saying they come only with Connect calls", function()
      for _, k in ipairs({ "ai_id", "ai_name", "country" }) do
        refuses({ kind = "http", [k] = "x" }, k, "only Connect calls", 'kind = "connect"')
      end
      refuses({ kind = "http", user_type = "personal" }, "user_type", "only Connect calls")
      refuses({ kind = "http", purpose = "search" }, "purpose", "only Connect calls", "purposes empty")
      refuses({ kind = "http", purposes = { "search" } }, "purposes", "only Connect calls")
    end)

    it("rpc on http, and an unknown rpc", function()
      refuses({ kind = "http", rpc = "DiscoverResources" }, "rpc", "only Connect calls have an rpc")
      refuses({ rpc = "ReportUsage" }, "rpc", '"DiscoverResources" or "ExecuteTransaction"')
      refuses({ rpc = "discoverresources" }, "rpc", '"DiscoverResources"')
    end)

    it("a method other than GET on connect, and a lower-case one on http", function()
      refuses({ ai_id = "bot", method = "POST" }, "method", 'always "GET"', 'kind = "http"')
      refuses({ kind = "connect", method = "HEAD" }, "method", 'always "GET"')
      refuses({ method = "get" }, "method", 'e.g. "GET"')
      assert.are.equal("DELETE", req({ method = "DELETE" }).method)
    end)

    it("a path not in the normal form, saying what the gateway would see", function()
      assert.are.equal('req.path: "/a/../b" is not in the gateway\'s normal form: a hook would see "/b"; write that',
        refusal({ path = "/a/../b" }))
      for _, c in ipairs({ { "/a//b", '"/a/b"' }, { "/a/./b", '"/a/b"' }, { "/%7Euser", '"/~user"' },
                           { "/a%3a", '"/a%3A"' }, { "/a/%2e%2e/b", '"/b"' }, { "//", '"/"' } }) do
        refuses({ path = c[1] }, "path", "normal form", c[2])
      end
    end)

    it("a path the gateway refuses outright", function()
      for _, c in ipairs({ { "a", 'no leading "/"' }, { "/a%2Fb", "encoded slash" }, { "/a%5cb", "encoded slash" },
                           { "/a%00", "encoded NUL" }, { "/a b", "non-ASCII" }, { "/caf\195\169", "non-ASCII" },
                           { "/a\tb", "control" }, { "/a\\b", "backslash" }, { "/..", "climbs above the root" },
                           { "/a?b", "req.query" }, { "/a#b", "fragment" }, { "/%zz", "percent-encoding" },
                           { "/x/..;/y", "dot segment with parameters" } }) do
        refuses({ path = c[1] }, "path", c[2], "the gateway refuses such requests")
      end
    end)

    it("a query holding '#' or bytes the gateway refuses", function()
      refuses({ query = "a=1#frag" }, "query", '"#"', "%23")
      refuses({ query = "a b" }, "query", "percent-encode")
      refuses({ query = "caf\195\169" }, "query", "non-ASCII")
      assert.are.equal("a=%20&b=/?c", req({ query = "a=%20&b=/?c" }).query)
    end)

    it("a host that is not lower-case or carries the scheme's default port", function()
      assert.are.equal('req.host: "News.Example" is not how the gateway writes it (lower-case, no empty port, ' ..
        'no trailing dot): write "news.example"', refusal({ host = "News.Example" }))
      refuses({ host = "news.example:80" }, "host", "default port 80", 'write "news.example"')
      refuses({ host = "news.example:443", kind = "connect" }, "host", "default port 443")
      refuses({ host = "news.example.", path = "/" }, "host", 'write "news.example"')
      refuses({ host = "news.example:" }, "host", 'write "news.example"')
      refuses({ host = "news.example:0080" }, "host", "default port 80")
      refuses({ host = "[2001:DB8::1]" }, "host", 'write "[2001:db8::1]"')
      refuses({ host = "user@news.example" }, "host", "userinfo")
      refuses({ host = "" }, "host", "the gateway refuses")
      refuses({ host = "news example" }, "host", "the gateway refuses")
      refuses({ host = "news.example:99999" }, "host", "port")
    end)

    it("a uri that is not absolute http(s)", function()
      refuses({ uri = "/a" }, "uri", "not an absolute URI")
      refuses({ uri = "news.example/a" }, "uri", "not an absolute URI")
      refuses({ uri = "ftp://news.example/a" }, "uri", '"http" and "https"')
      refuses({ uri = "HTTPS://news.example/a" }, "uri", 'the gateway writes "https://news.example/a"')
      refuses({ uri = "https://news.example" }, "uri", 'no path', '"https://news.example/"')
      refuses({ uri = "https:///a" }, "uri", "no host")
    end)

    it("a uri with userinfo or a fragment", function()
      assert.are.equal('req.uri: "https://u:pw@news.example/a" carries userinfo ("u:pw@"): the gateway ' ..
        "refuses such URIs; drop it", refusal({ uri = "https://u:pw@news.example/a" }))
      refuses({ uri = "https://news.example/a#top" }, "uri", 'fragment ("#top")')
      refuses({ uri = "https://news.example/a?x#top" }, "uri", "fragment")
    end)

    it("a uri whose host, path or query is not as the gateway writes it", function()
      refuses({ uri = "https://News.example/a" }, "uri", 'the host of', 'write "news.example"')
      refuses({ uri = "https://news.example:443/a" }, "uri", "default port 443")
      refuses({ uri = "http://news.example:80/a" }, "uri", "default port 80")
      refuses({ uri = "https://news.example/a/../b" }, "uri", "the path of", '"/b"')
      refuses({ uri = "https://news.example/a%2Fb" }, "uri", "encoded slash")
      refuses({ uri = "https://news.example/a?b c" }, "uri", "the query of", "percent-encode")
      assert.are.equal("news.example:443", req({ uri = "http://news.example:443/" }).host)
    end)

    it("a uri that disagrees with host, path or query given alongside", function()
      assert.are.equal('req.host: "other.example" disagrees with uri "https://news.example/a" (whose host is ' ..
        '"news.example"): give the uri alone, or make them agree',
        refusal({ uri = "https://news.example/a", host = "other.example" }))
      refuses({ uri = "https://news.example/a", path = "/b" }, "path", 'whose path is "/a"')
      refuses({ uri = "https://news.example/a?x=1", query = "x=2" }, "query", 'whose query is "x=1"')
      refuses({ uri = "https://news.example/a", query = "x=1" }, "query", 'which has no "?"')
    end)

    it("on http, a user_agent that disagrees with the User-Agent header", function()
      refuses({ user_agent = "A/1", headers = { ["User-Agent"] = "B/1" } }, "user_agent", "User-Agent header")
    end)

    it("two headers of the same name, and empty strings the gateway passes as nil", function()
      assert.has_error(function() req({ headers = { ["X-A"] = "1", ["x-a"] = "2" } }) end,
        'req.headers: two entries name the header "x-a" (names are case-insensitive)')
      for _, k in ipairs({ "ai_id", "ai_name", "country" }) do
        refuses({ kind = "connect", [k] = "" }, k, "as nil")
      end
      refuses({ kind = "connect", user_agent = "" }, "user_agent", "as nil")
      assert.are.equal("", req({ user_agent = "" }).user_agent) -- an empty User-Agent header exists
    end)

    it("in fixtures too, naming the fixture", function()
      local p = load_ok([[return { skip = function() return true end,
        fixtures = { { hook = "skip", req = { path = "/free/../paid" }, expect = { true } } } }]])
      assert.are.same({ false, 'fixture 1 (skip): req.path: "/free/../paid" is not in the gateway\'s normal ' ..
        'form: a hook would see "/paid"; write that' }, { sandbox.run_fixtures(p) })
      p = load_ok([[return { price = function(o, r) return r.kind == "connect" and 1 or 2, "USD" end,
        fixtures = { { hook = "price", req = { purpose = "ai-train" }, expect = { 1, "USD" } },
                     { hook = "price", req = { path = "/a" }, expect = { 2, "USD" } },
                     { hook = "price", req = { kind = "http", user_type = "education" } } } }]])
      local ok, err = sandbox.run_fixtures(p)
      assert.is_false(ok)
      local want = "fixture 3 (price): req.user_type: only Connect calls"
      assert.are.equal(want, err:sub(1, #want))
    end)
  end)

  describe("normal_path: core/net/target.c in Lua (spec/core/target_test.c's cases)", function()
    it("normalizes", function()
      local cases = {
        { "/", "/" }, { "/a/b", "/a/b" }, { "/a/./b", "/a/b" }, { "/a/../b", "/b" }, { "/a/b/..", "/a/" },
        { "/a/b/.", "/a/b/" }, { "/a/b/../..", "/" }, { "/./", "/" }, { "/a/%2e%2E/b", "/b" }, { "/a/.%2e", "/" },
        { "/%7Euser/%41%62", "/~user/Ab" }, { "/a%3a%3A%c3%a9", "/a%3A%3A%C3%A9" }, { "/%25", "/%25" },
        { "/%252e", "/%252e" }, { "//a///b//", "/a/b/" }, { "/a//../b", "/b" }, { "/...", "/..." },
        { "/a/..b/.c", "/a/..b/.c" }, { "/a;p=1/b", "/a;p=1/b" }, { "/a|b^c[d]", "/a|b^c[d]" },
        { "/x/%2e/y/../%7a", "/x/z" },
      }
      for _, c in ipairs(cases) do
        assert.are.equal(c[2], sandbox.normal_path(c[1]), c[1])
        assert.are.equal(c[2], sandbox.normal_path(c[2]), c[2]) -- normalizing again changes nothing
      end
    end)

    it("refuses", function()
      for _, p in ipairs({ "", "a", "*", "/..", "/a/../..", "/%2e%2e", "/a%2Fb", "/a%2f", "/a%5cb", "/a%00", "/%",
                           "/%4", "/%g0", "/a\\b", "/a#b", "/a?b", "/a b", "/a\127", "/a\128", "/x/..;/y",
                           "/x/.;/y", "/..;", "/a\tb" }) do
        local norm, why = sandbox.normal_path(p)
        assert.is_nil(norm, p)
        assert.is_string(why)
      end
    end)
  end)

  for _, kind in ipairs({ "offer", "txn", "sale" }) do
    it("has the fields of the C view (core/policy/state.c " .. kind .. "_fields)", function()
      local f = assert(io.open("core/policy/state.c", "rb"))
      local src = f:read("*a")
      f:close()
      local list = assert(src:match(kind .. "_fields%[%]%s*=%s*(%b{})"), kind .. "_fields not found")
      local c, lua = {}, {}
      for name in list:gmatch('"([%w_]+)"') do c[#c + 1] = name end
      for k in pairs(sandbox.VIEW_FIELDS[kind]) do lua[#lua + 1] = k end
      table.sort(c)
      table.sort(lua)
      assert.are.same(c, lua)
    end)
  end

  it("has the fields of the C view (core/policy/state.c req_fields)", function()
    local f = assert(io.open("core/policy/state.c", "rb"))
    local src = f:read("*a")
    f:close()
    local list = assert(src:match("req_fields%[%]%s*=%s*(%b{})"), "req_fields not found")
    local c = {}
    for name in list:gmatch('"([%w_]+)"') do c[#c + 1] = name end
    local lua = { "purpose", "header" } -- served by the view itself, not stored
    for k in pairs(sandbox.VIEW_FIELDS.req) do lua[#lua + 1] = k end
    table.sort(c)
    table.sort(lua)
    assert.are.same(c, lua)
  end)
end)

describe("sandbox.check_result", function()
  local cr = sandbox.check_result

  it("normalizes valid results", function()
    assert.are.same({ true }, { cr("skip", true) })
    assert.are.same({ false }, { cr("skip", nil) })
    assert.are.same({ false }, { cr("skip", false) })
    assert.are.same({ "k", 0.5, 3 }, { cr("rate_limit", "k", 0.5, 3) })
    assert.are.equal(0, select("#", cr("rate_limit", nil)))
    assert.are.same({ 15000, "USD" }, { cr("price", 15000, "USD") })
    assert.are.same({ 0, "USDC" }, { cr("price", 0, "USDC") })
    assert.are.equal(0, select("#", cr("price", nil)))
    assert.are.same({ "deferred" }, { cr("on_billing_timeout", "deferred") })
    assert.are.equal(0, select("#", cr("on_settle_failure", "anything")))
    assert.are.same({ "sync" }, { cr("settle", "sync") })
    assert.are.same({ "async" }, { cr("settle", "async") })
  end)

  it("refuses wrong types with the messages the C runtime reports", function()
    local function bad(hook, want, ...)
      local a, b = cr(hook, ...)
      assert.is_nil(a)
      assert.are.equal(want, b)
    end
    bad("skip", 'expected boolean, got "yes"', "yes")
    bad("rate_limit", "expected key string (1-256 bytes), got 5", 5, 1, 1)
    bad("rate_limit", "expected rate number > 0, got -1", "k", -1, 1)
    bad("rate_limit", "expected rate number > 0, got inf", "k", math.huge, 1)
    bad("rate_limit", "expected integer burst >= 1, got 1.5", "k", 1, 1.5)
    bad("price", "expected integer amount, got 0.5", 0.5, "USD")
    bad("price", "expected integer amount, got -1", -1, "USD")
    bad("price", 'expected integer amount, got "1"', "1", "USD")
    bad("price", "expected currency code, got nil", 1)
    bad("price", 'expected currency code, got "U-S"', 1, "U-S")
    bad("on_billing_timeout", 'expected "reject" or "deferred", got nil', nil)
    bad("settle", 'expected "sync" or "async", got nil', nil)
    bad("settle", 'expected "sync" or "async", got "later"', "later")
    bad("settle", 'expected "sync" or "async", got 1', 1)
    bad("settle", 'expected "sync" or "async", got table', {})
    assert.has_error(function() cr("nope", 1) end, "unknown hook 'nope'")
  end)
end)

describe("sandbox.run_fixtures", function()
  it("passes when every fixture holds", function()
    local p = load_ok([[
      return {
        price = function(offer, req)
          if req.purpose == "ai-train" then return offer.amount * 10, offer.currency end
          return offer.amount, offer.currency
        end,
        on_billing_timeout = function(txn) return txn.amount <= 5 and "deferred" or "reject" end,
        skip = function(req) return tollgate.now() > 100 end,
        settle = function(req, sale) return sale.amount < 1000 and "async" or "sync" end,
        fixtures = {
          { hook = "price", offer = { amount = 7, currency = "USD" }, req = { purpose = "ai-train" },
            expect = { 70, "USD" } },
          { hook = "on_billing_timeout", txn = { amount = 9 }, expect = { "reject" } },
          { hook = "skip", now = 50, expect = { false } },
          { hook = "skip", now = 500, expect = { true } },
          { hook = "price", offer = { amount = 7 }, error = "expected currency code" },
          { hook = "settle", sale = { amount = 7, scheme = "exact" }, expect = { "async" } },
          { hook = "settle", req = { path = "/big" }, sale = { amount = 7000 }, expect = { "sync" } },
        },
      }
    ]])
    assert.are.same({ true }, { sandbox.run_fixtures(p) })
  end)

  it("names the fixture that fails and why", function()
    local p = load_ok([[
      return { price = function() return 1, "USD" end,
               fixtures = { { hook = "price", name = "cheap", expect = { 2, "USD" } } } }
    ]])
    assert.are.same({ false, 'fixture 1 \'cheap\' (price): expected {2, "USD"}, got {1, "USD"}' },
      { sandbox.run_fixtures(p) })
    p = load_ok([[return { skip = function(req) return req.nope.x end,
                          fixtures = { { hook = "skip", expect = { false } } } }]])
    local ok, err = sandbox.run_fixtures(p)
    assert.is_false(ok)
    assert.matches("^fixture 1 %(skip%): policies/test.lua:1: attempt to index field 'nope'", err)
    p = load_ok([[return { fixtures = { { hook = "skip" } } }]])
    assert.are.same({ false, "fixture 1 (skip): the policy has no hook 'skip'" }, { sandbox.run_fixtures(p) })
    p = load_ok([[return { skip = function() end, fixtures = { { hook = "skip", req = { bad = 1 } } } }]])
    assert.are.same({ false, "fixture 1 (skip): req: unknown field 'bad'" }, { sandbox.run_fixtures(p) })
  end)

  it("runs the default policy's own fixtures", function()
    local f = assert(io.open("lua/default_policy.lua"))
    local p = load_ok(f:read("*a"))
    f:close()
    assert.are.same({ true }, { sandbox.run_fixtures(p) })
    assert.is_nil(p.skip)
    assert.is_nil(p.rate_limit)
  end)
end)

describe("sandbox.call and sandbox.invoke", function()
  it("return status first and catch runtime errors in call", function()
    local p = load_ok("return { price = function() error('nope') end, skip = function() return 1 end }")
    local ok, err = sandbox.call(p, "price", sandbox.views.offer({}), sandbox.views.req({}))
    assert.is_false(ok)
    assert.matches("policies/test.lua:1: nope", err)
    assert.are.same({ false, "expected boolean, got 1" }, { sandbox.call(p, "skip", sandbox.views.req({})) })
    assert.are.same({ false, "policy has no hook 'rate_limit'" },
      { sandbox.call(p, "rate_limit", sandbox.views.req({})) })
    assert.has_error(function() sandbox.invoke("price", p.price) end)
  end)
end)

describe("table.sort in the sandbox", function()
  it("sorts long arrays (through a Lua comparator) and short ones alike", function()
    local p = load_ok([[
      local t = {}
      for i = 1, 200001 do t[i] = (i * 7919) % 200003 end
      table.sort(t)
      for i = 2, #t do assert(t[i - 1] <= t[i]) end
      local u = { 3, 1, 2 }
      table.sort(u, function(a, b) return a > b end)
      assert(u[1] == 3 and u[3] == 1)
      return {}
    ]])
    assert.is_table(p)
  end)
end)

describe("library functions that call back into Lua", function()
  local CSTACK = "C stack overflow (library functions calling back into Lua nested too deeply)"
  -- Each used to recurse on busted's own C stack until it crashed (gsub) or
  -- ran into Lua's stack limit thousands of C frames deep (sort, format).
  local bodies = {
    "local function f(s) return (s:gsub('.', f)) end f('x')",
    "local t t = setmetatable({}, { __index = function(_, k) return (('x'):gsub('x', t)) end })\n" ..
      "local _ = ('x'):gsub('x', t)",
    "local o = setmetatable({}, { __tostring = function(o) return string.format('%s', o) end })\n" ..
      "local _ = string.format('%s', o)",
    "local function f(a, b) table.sort({ 3, 2, 1 }, f) return a < b end table.sort({ 3, 2, 1 }, f)",
    "local mt = {} mt.__lt = function() table.sort({ setmetatable({}, mt), setmetatable({}, mt) }) " ..
      "return false end table.sort({ setmetatable({}, mt), setmetatable({}, mt) })",
  }
  for i, body in ipairs(bodies) do
    it("stop nesting past a bound (" .. i .. ")", function()
      local err = load_err(body .. "\nreturn {}")
      assert.truthy(err:find(CSTACK, 1, true), err)
    end)
  end

  it("nest as deep as the C runtime allows, no deeper", function()
    local p = load_ok([[
      local depth = 0
      local function f(s) depth = depth + 1 return (s:gsub(".", f)) end
      local ok = pcall(f, "x")
      return { _ok = ok, price = function() return depth, "USD" end }
    ]])
    -- f's 101st call is the one refused: 100 gsub calls are on the stack then.
    assert.are.same({ true, 101, "USD" }, { sandbox.call(p, "price", sandbox.views.offer({}), sandbox.views.req({})) })
  end)

  it("still nest a little, and os.time reads its table in Lua", function()
    load_ok([[
      local function f(s, d)
        if d == 0 then return s end
        return (s:gsub(".", function(c) return f(c, d - 1) end))
      end
      assert(f("ab", 40) == "ab")
      local t = { 3, 1, 2 }
      table.sort(t, function(a, b) return string.format("%s", a) < f(tostring(b), 5) end)
      assert(t[1] == 1 and t[3] == 3)
      local d = setmetatable({}, { __index = function(_, k)
        return ({ year = 2024, month = 1, day = 2, hour = 12 })[k] end })
      assert(os.time(d) == os.time({ year = 2024, month = 1, day = 2, hour = 12 }))
      local r t = setmetatable({}, { __index = function(_, k) if k == "day" then return os.time(r) end end })
      r = t
      local ok, e = pcall(os.time, t)
      assert(not ok and e:find("stack overflow"), e)
      return {}
    ]])
  end)

  it("use the C runtime's check when it gives one", function()
    local calls = 0
    sandbox.set_cstack(function() calls = calls + 1 return false end)
    local ok, err = pcall(load_err, "local s = string.format('%s', 1) return {}")
    sandbox.set_cstack(nil)
    assert(ok, err)
    assert.are.equal(1, calls)
    assert.truthy(err:find("policies/test.lua:1: " .. CSTACK, 1, true), err)
  end)
end)

describe("library functions whose cost follows an argument", function()
  it("refuse table.insert positions outside 1..#t+1", function()
    local t0 = os.clock()
    local err = load_err("local t = { 1, 2, 3 } table.insert(t, -3e8, 0) return {}")
    assert.is_true(os.clock() - t0 < 0.5)
    assert.truthy(err:find("policies/test.lua:1: bad argument #2 to 'insert' (position out of bounds)", 1, true), err)
    assert.truthy(load_err("table.insert({}, 5, 0) return {}"):find("position out of bounds", 1, true))
    load_ok([[
      local t = { 1, 2, 3 }
      table.insert(t, 1, 0) table.insert(t, 5, 4) table.insert(t, "3", 9) table.insert(t, 5)
      assert(table.concat(t, ",") == "0,1,9,2,3,4,5")
      return {}
    ]])
  end)

  it("build big table.concat and string.rep results in steps, with the same bytes", function()
    local got = {}
    local sink = { put = function(k, v) got[k] = v end }
    load_ok([[
      local put = require("sink").put
      local t = {}
      for i = 1, 70000 do t[i] = i % 7 == 0 and "x" or i end
      put("t", t)
      put("c1", table.concat(t, ","))
      put("c2", table.concat(t, "", 3, 69999))
      put("c3", table.concat(t, 7, 5, 40000))
      put("c4", table.concat(t, ",", 5, 4))
      t[50000] = {}
      put("c5", select(2, pcall(function() local r = table.concat(t, ",") return r end)))
      put("r1", string.rep("ab", 300000))
      put("r2", ("abc"):rep(123457, "-"))
      put("r3", string.rep("", 500000, "xy"))
      put("r4", string.rep("x", 1, ","))
      put("r5", string.rep("x", 0, ","))
      return {}
    ]], { modules = { sink = sink } })
    local t = got.t
    t[50000] = nil -- the native calls below see the table as it was
    for i = 1, 70000 do if t[i] == nil then t[i] = i % 7 == 0 and "x" or i end end
    assert.are.equal(table.concat(t, ","), got.c1)
    assert.are.equal(table.concat(t, "", 3, 69999), got.c2)
    assert.are.equal(table.concat(t, 7, 5, 40000), got.c3)
    assert.are.equal("", got.c4)
    assert.truthy(got.c5:find("policies/test.lua:10: invalid value (table) at index 50000 in table for 'concat'", 1, true), got.c5)
    assert.are.equal(string.rep("ab", 300000), got.r1)
    assert.are.equal(string.rep("abc", 123457, "-"), got.r2)
    assert.are.equal(string.rep("", 500000, "xy"), got.r3)
    assert.are.equal("x", got.r4)
    assert.are.equal("", got.r5)
  end)

  it("give os.clock the policy's own time, never the process's", function()
    local p = load_ok([[
      local at_load = os.clock()
      return { skip = function() return at_load == 42 and os.clock() == 42 end }
    ]], { clock = function() return 42 end })
    assert.are.same({ true, true }, { sandbox.call(p, "skip", sandbox.views.req({})) })
    -- Without opts.clock (plain Lua): time since the policy loaded.
    local t0 = os.clock()
    while os.clock() - t0 < 0.05 do end
    local q = load_ok("local c = os.clock() return { _c = c, skip = function() return os.clock() < 0.05 end }")
    assert.are.same({ true, true }, { sandbox.call(q, "skip", sandbox.views.req({})) })
  end)

  it("tell on_call which fixture runs", function()
    local p = load_ok([[return { skip = function() return false end,
      fixtures = { { hook = "skip", expect = { false } }, { name = "b", hook = "skip", expect = { false } } } }]])
    local seen = {}
    assert.is_true(sandbox.run_fixtures(p, { on_call = function(hook, label) seen[#seen + 1] = hook .. "|" .. label end }))
    assert.are.same({ "skip|fixture 1 (skip)", "skip|fixture 2 'b' (skip)" }, seen)
  end)
end)
