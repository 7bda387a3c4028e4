-- tollgate.harness: test a policy with busted before the gateway loads it.
--
-- A policy is loaded through the very sandbox the gateway embeds
-- (tollgate.sandbox): same environment, same views, same return-type rules,
-- same fixtures. Each call is bounded in time and memory like a gateway hook
-- call. Run specs under LuaJIT: `busted --lua=luajit`.
--
--   local harness = require("tollgate.harness")
--   local p = harness.load("policies/news.lua", { now = 1700000000 })
--   assert.same({ 60000, "USD" }, { p:price(harness.offer{}, harness.req{ purpose = "ai-train" }) })
--
--   harness.load(path, opts) -> policy handle; raises "FILE:LINE: reason"
--   harness.load_string(source, name, opts) -> the same for source text
--   harness.check(path, opts) -> true | false, err   (what `tollgate check` decides)
--     opts (all optional):
--       tenant        tollgate.tenant and the views' tenant (default: the file
--                     name without ".lua")
--       now           number, or function returning unix seconds: what
--                     tollgate.now() returns (default os.time); p:set_now(n)
--       version       tollgate.version (default harness.VERSION)
--       log           function(level, msg), besides keeping them in p.logs
--       time_limit    seconds per hook call (default 0.050, as the gateway)
--       load_time_limit  seconds for the top level (default 1, as the gateway)
--       memory_limit  bytes one call may add to the heap (default 32 MiB)
--       fixtures      false: do not run the policy's fixtures on load (the
--                     gateway always does, and refuses the policy if one fails)
--       modules       what require() may return (default: tollgate.money)
--
--   p:skip(req) -> true | false
--   p:rate_limit(req) -> key, rate, burst | nothing
--   p:price(offer, req) -> amount, currency | nothing
--   p:on_billing_timeout(txn) -> "reject" | "deferred"
--   p:on_settle_failure(txn) -> nothing
--     Arguments are plain tables (harness.req{...} or any table of view
--     fields) or nil (an empty one). Results are what the gateway uses. A
--     runtime error, a timeout, a memory hit or a wrong return type raises
--     "policy <tenant>: <hook>: <reason>", the message the gateway logs;
--     p.last_error then holds { hook =, kind =, message = }, kind one of
--     "error", "timeout", "memory", "type" (the policy_errors_total kinds).
--     A hook the policy does not define answers as in the gateway: the
--     default policy's answer (skip false, no rate limit, the catalog price,
--     billing timeout "reject").
--   p:call(hook, ...) -> true, results... | false, message, kind  (no raise)
--   p:has(hook)       -> true when the policy defines the hook itself
--   p:fixtures()      -> number of fixtures run; raises on the first failure
--   p:set_now(n)      p:clear_logs()      p.logs = { { level =, message = }, ... }
--
--   harness.req{...} / harness.offer{...} / harness.txn{...} -> plain tables
--     with harness.DEFAULTS filled in, checked against the view's fields (a
--     typo raises at once). harness.NONE as a value removes a default.
--
-- Where the harness differs from the gateway (on the side of caution):
--   - Time limits use CPU time (os.clock), so a busy machine does not make a
--     spec flaky; the gateway uses wall-clock time.
--   - The memory limit applies to what one call adds to the heap; the
--     gateway caps the tenant's whole Lua state.
--   - os.clock() in the policy is the CPU time since it loaded; in the
--     gateway, the time its own state has spent running.
--   - The JIT is turned off for the rest of the busted process on the first
--     call: LuaJIT's count hook, which enforces the time limit, does not fire
--     inside compiled traces (the gateway runs policy states with the JIT off).
--   - Views are new for every call (the gateway reuses one per kind); both
--     refuse to be read after their call.
--   - Each load is a fresh Lua environment, like one worker's state after a
--     reload: module locals start anew.

local sandbox = require("tollgate.sandbox")

local M = {}

M.VERSION = "harness"
M.NONE = setmetatable({}, { __tostring = function() return "harness.NONE" end })

-- The C runtime's defaults (core/policy.h: TG_POLICY_DEFAULT_*, TG_POLICY_MAX_SOURCE).
M.TIME_LIMIT = 0.050
M.LOAD_TIME_LIMIT = 1.0
M.MEMORY_LIMIT = 32 * 1024 * 1024
M.MAX_SOURCE = 1024 * 1024

-- What a policy that catches its own interruption sees (as in core/policy/state.c).
local TIMEOUT_MSG = "policy exceeded its time limit"
local MEMORY_MSG = "policy exceeded its memory limit"

M.DEFAULTS = {
  req = { method = "GET", path = "/", host = "example.com", ip = "192.0.2.10",
          user_agent = "ExampleBot/1.0", kind = "http" },
  offer = { uri = "https://example.com/articles/1", model = "purchase", amount = 15000,
            currency = "USD" },
  txn = { id = "txn-test-1", amount = 15000, currency = "USD", ai_id = "ai-test",
          billing_ref = "****1234", items = 1, attempts = 1, reason = "timeout" },
}

local function copy(t)
  local out = {}
  for k, v in pairs(t) do
    out[k] = type(v) == "table" and copy(v) or v
  end
  return out
end

local function builder(kind)
  return function(fields)
    if fields ~= nil and type(fields) ~= "table" then
      error("harness." .. kind .. ": expected a table, got " .. type(fields), 2)
    end
    local t = copy(M.DEFAULTS[kind])
    for k, v in pairs(fields or {}) do
      if v == M.NONE then t[k] = nil else t[k] = type(v) == "table" and copy(v) or v end
    end
    -- Building a view raises now, at the spec line that made the mistake.
    local ok, err = pcall(sandbox.views[kind], t)
    if not ok then error("harness." .. kind .. ": " .. sandbox.errstr(err), 2) end
    return t
  end
end

M.req = builder("req")
M.offer = builder("offer")
M.txn = builder("txn")

---------------------------------------------------------------------------
-- Bounds: time by a count hook, memory by the heap's growth
---------------------------------------------------------------------------

local active -- the bound of the call in progress, or nil

-- sandbox opts.guard: runs after every pcall/xpcall inside the policy, so a
-- policy cannot swallow its own interruption.
local function guard()
  local b = active
  if b == nil then return end
  if not b.hit and os.clock() > b.deadline then b.hit = TIMEOUT_MSG end
  if b.hit then error(b.hit, 0) end
end

local bounded, finish

-- Every 1000 instructions. Once a limit is hit it raises at every
-- instruction of the policy, so code that catches the error is stopped again
-- at once; it stays quiet in our own frames.
local function make_hook(b)
  local function hook()
    local f = debug.getinfo(2, "f")
    if f and (f.func == bounded or f.func == finish) then return end
    if not b.hit then
      if os.clock() > b.deadline then
        b.hit = TIMEOUT_MSG
      elseif collectgarbage("count") - b.base_kb > b.cap_kb then
        collectgarbage("collect")
        if collectgarbage("count") - b.base_kb > b.cap_kb then b.hit = MEMORY_MSG end
      end
      if not b.hit then return end
      debug.sethook(hook, "", 1)
    end
    error(b.hit, 0)
  end
  return hook
end

local function jit_off()
  local jit = rawget(_G, "jit")
  if jit and jit.status() then
    jit.off()
    jit.flush()
  end
end

local function restart(b, seconds)
  b.deadline = os.clock() + seconds
  b.base_kb = collectgarbage("count")
end

-- -> true, fn's results... | false, message, kind
finish = function(b, ok, ...)
  debug.sethook(b.saved_hook, b.saved_mask, b.saved_count)
  active = b.outer
  if b.hit == TIMEOUT_MSG then return false, TIMEOUT_MSG, "timeout" end
  if b.hit == MEMORY_MSG then
    collectgarbage("collect")
    return false, MEMORY_MSG, "memory"
  end
  if not ok then
    local msg = sandbox.errstr((...))
    if msg == "not enough memory" then return false, MEMORY_MSG, "memory" end -- LuaJIT's own
    return false, msg, "error"
  end
  return true, ...
end

bounded = function(limits, seconds, fn, ...)
  jit_off()
  local b = { cap_kb = limits.memory_limit / 1024, outer = active }
  b.saved_hook, b.saved_mask, b.saved_count = debug.gethook()
  restart(b, seconds)
  active = b
  debug.sethook(make_hook(b), "", 1000)
  return finish(b, pcall(fn, ...))
end

-- The reasons the gateway gives for a limit hit (core/policy/state.c).
local function limit_reason(self, kind, loading)
  if kind == "timeout" then
    local ms = math.floor((loading and self.load_time_limit or self.time_limit) * 1000 + 0.5)
    return loading and ("loading ran past its time limit (" .. ms .. " ms)")
                    or ("exceeded its time limit (" .. ms .. " ms)")
  end
  return (loading and "loading exceeded the memory limit (" or "exceeded its memory limit (") ..
    string.format("%d", self.memory_limit) .. " bytes)"
end

---------------------------------------------------------------------------
-- Views that expire with their call, as the gateway's do
---------------------------------------------------------------------------

local function expiring_view(kind, inner)
  local live = true
  local v = newproxy(true)
  local mt = getmetatable(v)
  local function dead()
    error("view '" .. kind .. "' used outside its hook call", 3)
  end
  local function header(a, b)
    if not live then dead() end
    if rawequal(a, v) then a = b end
    return inner.header(a)
  end
  mt.__index = function(_, k)
    if not live then dead() end
    if kind == "req" and k == "header" then return header end
    return inner[k]
  end
  mt.__newindex = function(_, k)
    error("attempt to modify read-only view '" .. kind .. "' (field '" .. tostring(k) .. "')", 2)
  end
  mt.__tostring = function() return kind end
  mt.__metatable = false
  return v, function() live = false end
end

---------------------------------------------------------------------------
-- Loading
---------------------------------------------------------------------------

local Policy = {}
Policy.__index = Policy

local function read_file(path)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local s = f:read("*a")
  f:close()
  return s
end

-- lua/default_policy.lua, next to this file's folder.
local DEFAULT_POLICY_PATH = (function()
  local src = debug.getinfo(1, "S").source
  local dir = src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or "."
  return dir .. "/../default_policy.lua"
end)()
local default_source

local function tenant_from(name)
  return name:match("([^/]+)%.lua$") or name:match("([^/]+)$") or "test"
end

local function positive(v, default, what)
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) or v == math.huge then
    error("harness: " .. what .. " must be a number > 0", 4)
  end
  return v
end

local compile

local function load_default(self, sopts)
  if default_source == nil then
    local src, err = read_file(DEFAULT_POLICY_PATH)
    if not src then return nil, "harness: cannot read the default policy: " .. tostring(err) end
    default_source = src
  end
  local d, err = compile(default_source, "default_policy.lua",
    { tenant = self.tenant, now = sopts.now, fixtures = false, default = false })
  if not d then return nil, "harness: the default policy does not load: " .. err end
  return d.policy
end

compile = function(source, name, opts)
  opts = opts or {}
  if type(source) ~= "string" then return nil, name .. ": source must be a string" end
  if #source > M.MAX_SOURCE then
    return nil, name .. ": larger than " .. M.MAX_SOURCE .. " bytes"
  end
  local self = setmetatable({
    name = name,
    tenant = opts.tenant or tenant_from(name),
    logs = {},
    time_limit = positive(opts.time_limit, M.TIME_LIMIT, "time_limit"),
    load_time_limit = positive(opts.load_time_limit, M.LOAD_TIME_LIMIT, "load_time_limit"),
    memory_limit = positive(opts.memory_limit, M.MEMORY_LIMIT, "memory_limit"),
  }, Policy)
  local now = opts.now
  if type(now) == "number" then
    self.now = now
  elseif now ~= nil and type(now) ~= "function" then
    error("harness: now must be a number or a function", 3)
  end
  local user_log = opts.log
  local sopts = {
    tenant = self.tenant,
    version = opts.version or M.VERSION,
    modules = opts.modules,
    guard = guard,
    now = function()
      if self.now ~= nil then return self.now end
      if type(now) == "function" then return now() end
      return os.time()
    end,
    log = function(level, msg)
      self.logs[#self.logs + 1] = { level = level, message = msg }
      if user_log then user_log(level, msg) end
    end,
  }
  local ok, policy, err = bounded(self, self.load_time_limit, sandbox.load, source, "@" .. name, sopts)
  if not ok then
    local kind = err
    if kind == "error" then return nil, name .. ": " .. policy end
    return nil, name .. ": " .. limit_reason(self, kind, true)
  end
  if not policy then return nil, err end
  self.policy = policy

  if opts.default ~= false then
    local d, derr = load_default(self, sopts)
    if not d then return nil, derr end
    self.default = d
  end
  if opts.fixtures ~= false then
    local fok, ferr = pcall(self.fixtures, self)
    if not fok then return nil, ferr end
  end
  return self
end

function M.load_string(source, name, opts)
  local p, err = compile(source, name or "policy", opts)
  if not p then error(err, 2) end
  return p
end

function M.load(path, opts)
  local source, err = read_file(path)
  if not source then error("harness: cannot read " .. tostring(path) .. ": " .. tostring(err), 2) end
  local p, cerr = compile(source, path, opts)
  if not p then error(cerr, 2) end
  return p
end

function M.check(path, opts)
  local source, err = read_file(path)
  if not source then return false, "cannot read " .. tostring(path) .. ": " .. tostring(err) end
  local ok, p, cerr = pcall(compile, source, path, opts)
  if not ok then return false, sandbox.errstr(p) end
  if not p then return false, cerr end
  return true
end

---------------------------------------------------------------------------
-- Hook calls
---------------------------------------------------------------------------

-- Used only when even the default policy lacks a hook: the answers
-- core/policy.h gives for TG_POLICY_ERR_NOHOOK.
local NO_HOOK = {
  skip = function() return false end,
  rate_limit = function() return nil end,
  price = function(offer)
    if offer.model == "free" then return 0, offer.currency or "USD" end
    if offer.amount == nil or offer.currency == nil then return nil end
    return offer.amount, offer.currency
  end,
  on_billing_timeout = function() return "reject" end,
  on_settle_failure = function() end,
}

function Policy:has(hook)
  return type(self.policy[hook]) == "function"
end

function Policy:set_now(n)
  if n ~= nil and type(n) ~= "number" then error("set_now: expected a number or nil", 2) end
  self.now = n
end

function Policy:clear_logs()
  self.logs = {}
end

local function failed(self, hook, reason, kind)
  if kind == "timeout" or kind == "memory" then reason = limit_reason(self, kind, false) end
  local msg = "policy " .. self.tenant .. ": " .. hook .. ": " .. tostring(reason)
  self.last_error = { hook = hook, kind = kind, message = msg }
  return false, msg, kind
end

function Policy:call(hook, a, b)
  local kinds = sandbox.HOOK_ARGS[hook]
  if not kinds then error("unknown hook '" .. tostring(hook) .. "'", 2) end
  local views, expire = {}, {}
  for i, kind in ipairs(kinds) do
    local v = i == 1 and a or b
    if v == nil then v = {} end
    if type(v) == "table" then
      local ok, res = pcall(sandbox.views[kind], v, { tenant = self.tenant })
      if not ok then error("harness: " .. hook .. ": " .. sandbox.errstr(res), 2) end
      v = res
    elseif type(v) ~= "userdata" then
      error("harness: " .. hook .. ": " .. kind .. " must be a table, got " .. type(v), 2)
    end
    views[i], expire[i] = expiring_view(kind, v)
  end
  local fn = self.policy[hook] or (self.default and self.default[hook]) or NO_HOOK[hook]

  -- bounded: (true, invoke's results) or (false, message, kind); invoke:
  -- (true, results...) or (false, reason) for a wrong return type.
  local function outcome(ok, ...)
    for _, e in ipairs(expire) do e() end
    if not ok then return failed(self, hook, ...) end
    if not (...) then return failed(self, hook, select(2, ...), "type") end
    self.last_error = nil
    return ...
  end
  return outcome(bounded(self, self.time_limit, sandbox.invoke, hook, fn, views[1], views[2]))
end

local function raise_or_return(ok, ...)
  if not ok then error((...), 0) end
  return ...
end

function Policy:skip(req)
  return raise_or_return(self:call("skip", req))
end

function Policy:rate_limit(req)
  return raise_or_return(self:call("rate_limit", req))
end

function Policy:price(offer, req)
  return raise_or_return(self:call("price", offer, req))
end

function Policy:on_billing_timeout(txn)
  return raise_or_return(self:call("on_billing_timeout", txn))
end

function Policy:on_settle_failure(txn)
  raise_or_return(self:call("on_settle_failure", txn))
end

function Policy:fixtures()
  local list = self.policy.fixtures or {}
  local current, index = nil, 0 -- this run's bound, restarted for each fixture
  local ok, res, err = bounded(self, self.load_time_limit, function()
    current = active
    return sandbox.run_fixtures(self.policy, {
      tenant = self.tenant,
      guard = guard,
      on_call = function()
        index = index + 1
        restart(current, self.time_limit)
      end,
    })
  end)
  if not ok then
    -- A limit hit ends the whole run: name the fixture it stopped in.
    local f = list[index]
    local where = f and ("fixture " .. index .. (f.name and (" '" .. f.name .. "'") or "") ..
                         " (" .. f.hook .. ")") or "fixtures"
    local reason = err == "error" and res or limit_reason(self, err, false)
    error(self.name .. ": " .. where .. ": " .. tostring(reason), 0)
  end
  if not res then error(self.name .. ": " .. tostring(err), 0) end
  return #list
end

return M
