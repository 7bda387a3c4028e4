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
--   harness.load(path, opts) -> policy handle (raises "FILE:LINE: reason")
--   harness.load_string(source, name, opts) -> the same for source text
--   harness.check(path, opts) -> true | false, err   (what `tollgate check` says)
--     opts (all optional):
--       tenant        tollgate.tenant and the views' tenant (default: file name
--                     without ".lua")
--       now           number, or function returning unix seconds: tollgate.now()
--                     (default os.time); p:set_now(n) changes it later
--       version       tollgate.version (default harness.VERSION)
--       log           function(level, msg); messages are also kept in p.logs
--       time_limit    seconds per hook call (default 0.050, as the gateway)
--       load_time_limit  seconds for the top level and the fixtures (default 1)
--       memory_limit  bytes a call may grow the heap by (default 32 MiB)
--       fixtures      false: do not run the policy's fixtures on load (the
--                     gateway always does, and refuses the policy when one fails)
--       modules       what require() may return (default: tollgate.money)
--
--   p:skip(req) -> boolean
--   p:rate_limit(req) -> key, rate, burst | nil
--   p:price(offer, req) -> amount, currency | nil
--   p:on_billing_timeout(txn) -> "reject" | "deferred"
--   p:on_settle_failure(txn) -> nothing
--     Arguments are plain tables (harness.req{...}, or any table with view
--     fields) or nil (an empty request, offer or transaction). Results are
--     what the gateway would use. A runtime error, a timeout, a memory hit or
--     a wrong return type raises "policy <tenant>: <hook>: <reason>", as the
--     gateway logs it; p.last_error then holds { hook, kind, message } with
--     kind "error", "timeout", "memory" or "type". A hook the policy does not
--     define answers as the gateway does: the default policy's result
--     (skip false, no rate limit, the catalog price, billing timeout "reject").
--   p:call(hook, ...) -> true, results... | false, message, kind  (never raises)
--   p:has(hook) -> true when the policy defines the hook itself
--   p:fixtures() -> number of fixtures run (raises on the first failing one)
--   p:set_now(n)  p:clear_logs()   p.logs = { { level = , message = }, ... }
--
--   harness.req{...} / harness.offer{...} / harness.txn{...} -> plain tables
--     with defaults filled in (see DEFAULTS below) and the fields checked
--     against the view's field list. harness.NONE as a value removes a default.
--
-- Differences from the gateway, all on the side of caution or convenience:
--   - The clock for time limits is CPU time (os.clock), so a busy test
--     machine does not make a spec flaky; the gateway uses wall-clock time.
--   - The memory limit applies to what one call allocates (the heap's growth
--     during the call); the gateway caps the whole state of the tenant.
--   - The JIT is turned off for the whole busted process on the first call:
--     LuaJIT's count hook, which enforces the time limit, does not fire inside
--     compiled traces (the gateway runs policy states with the JIT off, too).
--   - Views stay readable after the call; in the gateway a view kept past its
--     call raises an error when read.
--   - Each harness.load is a fresh policy state, like one worker of the
--     gateway after a reload: module locals start anew.

local sandbox = require("tollgate.sandbox")

local M = {}

M.VERSION = "harness"
M.NONE = setmetatable({}, { __tostring = function() return "harness.NONE" end })

-- Limits of the C runtime (core/policy.h: TG_POLICY_DEFAULT_*).
M.TIME_LIMIT = 0.050
M.LOAD_TIME_LIMIT = 1.0
M.MEMORY_LIMIT = 32 * 1024 * 1024
M.MAX_SOURCE = 1024 * 1024

local TIMEOUT_MSG = "policy exceeded its time limit"
local MEMORY_MSG = "not enough memory"

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
    -- A view over it raises now, at the line that built it, on unknown or mistyped fields.
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

local function guard()
  local b = active
  if b == nil then return end
  if b.hit then error(b.hit, 0) end
  if os.clock() > b.deadline then
    b.hit = TIMEOUT_MSG
    error(TIMEOUT_MSG, 0)
  end
end

local bounded, finish

-- Checked every 1000 instructions of Lua code. Once a limit is hit it keeps
-- raising, so a policy that catches the error (pcall, xpcall handler) is
-- stopped again at once; it stays quiet in our own frames.
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
    end
    if b.hit then
      debug.sethook(hook, "", 1)
      error(b.hit, 0)
    end
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

finish = function(b, ok, ...)
  debug.sethook(b.saved_hook, b.saved_mask, b.saved_count)
  active = b.outer
  if b.hit then return false, b.hit, b.hit == TIMEOUT_MSG and "timeout" or "memory" end
  if not ok then
    local msg = sandbox.errstr((...))
    return false, msg, msg:find(MEMORY_MSG, 1, true) and "memory" or "error"
  end
  return true, ...
end

-- Runs fn(...) within the limits: true, results... | false, message, kind.
bounded = function(limits, seconds, fn, ...)
  jit_off()
  local b = { cap_kb = limits.memory_limit / 1024, outer = active }
  b.saved_hook, b.saved_mask, b.saved_count = debug.gethook()
  restart(b, seconds)
  active = b
  debug.sethook(make_hook(b), "", 1000)
  return finish(b, pcall(fn, ...))
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

local function here()
  local src = debug.getinfo(1, "S").source
  return src:sub(1, 1) == "@" and src:sub(2):match("^(.*)/[^/]*$") or "."
end

local DEFAULT_POLICY_PATH = here() .. "/../default_policy.lua"

local function tenant_from(name)
  return (name:match("([^/]+)%.lua$") or name:match("([^/]+)$") or "test")
end

local function num_or(v, default, what)
  if v == nil then return default end
  if type(v) ~= "number" or not (v > 0) then error("harness: " .. what .. " must be a number > 0", 3) end
  return v
end

local function compile(source, name, opts)
  opts = opts or {}
  if type(source) ~= "string" then return nil, name .. ": source must be a string" end
  if #source > M.MAX_SOURCE then return nil, name .. ": larger than " .. M.MAX_SOURCE .. " bytes" end
  local self = setmetatable({
    name = name,
    tenant = opts.tenant or tenant_from(name),
    logs = {},
    last_error = nil,
    time_limit = num_or(opts.time_limit, M.TIME_LIMIT, "time_limit"),
    load_time_limit = num_or(opts.load_time_limit, M.LOAD_TIME_LIMIT, "load_time_limit"),
    memory_limit = num_or(opts.memory_limit, M.MEMORY_LIMIT, "memory_limit"),
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
  if not ok then return nil, name .. ": " .. policy end
  if not policy then return nil, err end
  self.policy = policy

  if name ~= DEFAULT_POLICY_PATH then
    local dsrc, rerr = read_file(DEFAULT_POLICY_PATH)
    if not dsrc then return nil, "harness: cannot read the default policy: " .. tostring(rerr) end
    local dflt, derr = compile(dsrc, DEFAULT_POLICY_PATH, { tenant = self.tenant, now = sopts.now,
                                                           fixtures = false })
    if not dflt then return nil, "harness: the default policy does not load: " .. derr end
    self.default = dflt.policy
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
  local p, cerr = compile(source, path, opts)
  if not p then return false, cerr end
  return true
end

---------------------------------------------------------------------------
-- Hook calls
---------------------------------------------------------------------------

local NO_HOOK = {
  skip = function() return false end,
  rate_limit = function() return nil end,
  price = function(offer) -- as core/policy.h describes the default answer
    if offer.model == "free" then return 0, offer.currency or "USD" end
    if offer.currency == nil then return nil end
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

local function view(self, kind, v)
  if v == nil then v = {} end
  if type(v) == "userdata" then return v end -- already a view
  return sandbox.views[kind](v, { tenant = self.tenant })
end

local function failed(self, hook, reason, kind)
  local msg = "policy " .. self.tenant .. ": " .. hook .. ": " .. tostring(reason)
  self.last_error = { hook = hook, kind = kind, message = msg }
  return false, msg, kind
end

function Policy:call(hook, a, b)
  local args = sandbox.HOOK_ARGS[hook]
  if not args then error("unknown hook '" .. tostring(hook) .. "'", 2) end
  local vok, va, vb = pcall(function()
    return view(self, args[1], a), args[2] and view(self, args[2], b) or nil
  end)
  if not vok then error("harness: " .. hook .. ": " .. sandbox.errstr(va), 2) end
  local fn = self.policy[hook] or (self.default and self.default[hook]) or NO_HOOK[hook]
  -- bounded: (true, invoke's results) or (false, message, kind); invoke:
  -- (true, results...) or (false, reason) for a wrong return type.
  local function outcome(ok, ...)
    if not ok then return failed(self, hook, ...) end
    if not (...) then return failed(self, hook, select(2, ...), "type") end
    self.last_error = nil
    return ...
  end
  return outcome(bounded(self, self.time_limit, sandbox.invoke, hook, fn, va, vb))
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
  local b_limits = self
  local current -- the bound of this run, to restart its clock per fixture
  local n = #(self.policy.fixtures or {})
  local ok, res, err = bounded(b_limits, self.load_time_limit, function()
    current = active
    return sandbox.run_fixtures(self.policy, {
      tenant = self.tenant,
      guard = guard,
      on_call = function() restart(current, self.time_limit) end,
    })
  end)
  if not ok then error(self.name .. ": fixtures: " .. tostring(res), 0) end
  if not res then error(self.name .. ": " .. tostring(err), 0) end
  return n
end

return M
