-- tollgate.harness: test a policy with busted before the gateway loads it.
--
-- A policy is loaded through the very sandbox the gateway embeds
-- (tollgate.sandbox): same environment, same views, same return-type rules,
-- same fixtures. Each call is bounded in time and memory like a gateway hook
-- call. Run specs under LuaJIT: `busted --lua=luajit`.
--
--   local harness = require("tollgate.harness")
--   local p = harness.load("policies/news.lua", { now = 1700000000 })
--   assert.same({ 60000, "USD" },
--     { p:price(harness.offer{}, harness.connect{ purpose = "ai-train" }) })
--
-- Any folder: the harness reads tollgate.sandbox, tollgate.money and the
-- default policy from its own folder (lua/tollgate/, lua/), so it needs only
-- itself on package.path; it registers them in package.loaded, so a spec's
-- require("tollgate.sandbox") gets the same copy (one already loaded is
-- reused). Nothing depends on the working directory but relative paths:
--
--   harness.load(path, opts) -> policy handle; raises "FILE:LINE: reason"
--     A relative path that does not open from the working directory is
--     looked up from the folder of the spec file that called harness.load,
--     then from each folder above it, nearest first: the first file found
--     is loaded (and named so in messages). A spec in spec/policies/ may so
--     name "policies/news.lua" from the project root and still run from
--     anywhere. When nothing is found the error lists where it looked.
--   harness.load_string(source, name, opts) -> the same for source text
--   harness.check(path, opts) -> true | false, err   (what `tollgate check`
--     decides; path found as for load)
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
--       settle_default  "sync" or "async": what p:settle answers when the policy
--                     has no settle hook (the gateway: the tenant's configured
--                     mode; default "sync")
--
--   p:skip(req) -> true | false
--   p:rate_limit(req) -> key, rate, burst | nothing
--   p:price(offer, req) -> amount, currency | nothing
--   p:on_billing_timeout(txn) -> "reject" | "deferred"
--   p:on_settle_failure(txn) -> nothing
--   p:settle(req, sale) -> "sync" | "async"
--     Arguments are plain tables (the builders below, or any table of view
--     fields, checked as sandbox.views checks them) or nil (an empty one).
--     Results are what the gateway uses. A runtime error, a timeout, a
--     memory hit or a wrong return type raises
--     "policy <tenant>: <hook>: <reason>", the message the gateway logs;
--     p.last_error then holds { hook =, kind =, message = }, kind one of
--     "error", "timeout", "memory", "type" (the policy_errors_total kinds).
--     A hook the policy does not define answers as in the gateway: the
--     default policy's answer (skip false, no rate limit, the catalog price,
--     billing timeout "reject"; settle: opts.settle_default).
--   p:call(hook, ...) -> true, results... | false, message, kind  (no raise)
--   p:has(hook)       -> true when the policy defines the hook itself
--   p:fixtures()      -> number of fixtures run; raises on the first failure
--   p:set_now(n)      p:clear_logs()      p.logs = { { level =, message = }, ... }
--
-- Requests, as the gateway builds them (every field set as it would be;
-- see policies/README.md "Views"). Each returns a plain table; anything the
-- gateway never produces raises at once, with sandbox.views' reason
-- ("harness.http: req.path: ...").
--
--   harness.http{...}      a request for the tenant's resource over HTTP.
--     Defaults: method "GET", host "example.com", path "/", no query,
--     ip "192.0.2.10", user_agent "ExampleBot/1.0", tls = false. uri is
--     derived (scheme "https" when tls, else "http"), or given instead of
--     host/path/query (they are then taken from it; tls, if given, must
--     agree). headers: as given, plus User-Agent (= user_agent) and Host
--     (= host) when absent. Refused: ai, ai_id, ai_name, user_type, country,
--     purpose(s), rpc, any kind but "http".
--   harness.connect{...}   one resource of a Connect call.
--     Defaults: uri "https://example.com/" (or composed as "https://" ..
--     host .. path .. ["?" query] when those are given without uri),
--     rpc "DiscoverResources", method "GET", ip "192.0.2.10" (the API
--     caller). The AI system flat (ai_id, ai_name, user_type, country,
--     purposes or purpose, user_agent) or as ai = { id =, name =,
--     user_type =, country =, purposes =, purpose =, user_agent = } (not
--     both for one field); without them the call is anonymous. headers: the
--     Connect call's. Refused: tls, a method other than "GET", an unknown
--     rpc, user_type or purpose, any kind but "connect".
--   harness.req{...}       generic: harness.DEFAULTS.req (method "GET",
--     path "/", host "example.com", ip, user_agent) under the fields given;
--     kind inferred as the sandbox does ("connect" when an AI-system field
--     or rpc is given, else "http"). A given uri replaces the default host
--     and path; a given User-Agent header, the default user_agent.
--   harness.offer{...} / harness.txn{...} / harness.sale{...} -> plain tables
--     with harness.DEFAULTS filled in, checked against the view's fields.
--     harness.sale is an x402/t402 payment of 15000 micro-USD in USDC on
--     Base Sepolia, scheme "exact".
--   harness.NONE as a value removes a default (not uri, host, path, method
--     or rpc of http/connect: the gateway always sets them).
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

local M = {}

---------------------------------------------------------------------------
-- Where things are: this file's folder, and the caller's
---------------------------------------------------------------------------

local function cwd()
  local ok, lfs = pcall(require, "lfs")
  if ok and type(lfs) == "table" and lfs.currentdir then
    local d = lfs.currentdir()
    if d then return d end
  end
  local okp, p = pcall(io.popen, "pwd")
  if okp and p then
    local d = p:read("*l")
    p:close()
    if d and d ~= "" then return d end
  end
  return os.getenv("PWD")
end

local function absolute(path)
  if path:sub(1, 1) == "/" then return path end
  local dir = cwd()
  if not dir then return path end
  path = path:gsub("^%./", "")
  if path == "." then return dir end
  return dir .. "/" .. path
end

local function dirname(path)
  return path:match("^(.*)/[^/]*$") or "."
end

local THIS = debug.getinfo(1, "S").source
-- lua/tollgate/, absolute (nil when this file was not loaded from a file).
local HERE = THIS:sub(1, 1) == "@" and absolute(dirname(THIS:sub(2))) or nil

-- A module next to this file: the one in package.loaded if any, else read
-- from this folder (and registered), else whatever require finds.
local function sibling(name, file)
  local m = package.loaded[name]
  if m ~= nil then return m end
  if HERE then
    local path = HERE .. "/" .. file
    local chunk = loadfile(path)
    if chunk then
      m = chunk(name, path)
      if m == nil then m = true end
      package.loaded[name] = m
      return m
    end
  end
  return require(name)
end

local money = sibling("tollgate.money", "money.lua")
local sandbox = sibling("tollgate.sandbox", "sandbox.lua")

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The folder of the nearest Lua function on the stack outside this file:
-- the spec that called harness.load or harness.check.
local function caller_dir()
  for level = 3, 64 do
    local info = debug.getinfo(level, "S")
    if not info then return nil end
    local src = info.source
    if src ~= THIS and src:sub(1, 1) == "@" then return absolute(dirname(src:sub(2))) end
  end
end

-- path itself when absolute or found from the working directory; else the
-- nearest of caller_dir()/path and the same below each folder above it.
-- nil and the places tried when none exists.
local function resolve(path)
  if type(path) ~= "string" or path:sub(1, 1) == "/" or exists(path) then return path end
  local dir = caller_dir()
  if dir == nil then return nil, "the working directory" end
  local start = dir
  while true do
    local candidate = (dir == "/" and "" or dir) .. "/" .. path
    if exists(candidate) then return candidate end
    if dir == "/" or not dir:find("/", 1, true) then break end
    dir = dir:match("^(.*)/[^/]+$")
    if dir == "" then dir = "/" end
  end
  return nil, "the working directory, " .. start .. " and the folders above it"
end

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
  -- No kind: inferred from the fields (sandbox.views.req).
  req = { method = "GET", path = "/", host = "example.com", ip = "192.0.2.10",
          user_agent = "ExampleBot/1.0" },
  http = { method = "GET", host = "example.com", path = "/", ip = "192.0.2.10",
           user_agent = "ExampleBot/1.0", tls = false },
  connect = { uri = "https://example.com/", rpc = "DiscoverResources", method = "GET",
              ip = "192.0.2.10" },
  offer = { uri = "https://example.com/articles/1", model = "purchase", amount = 15000,
            currency = "USD" },
  txn = { id = "txn-test-1", amount = 15000, currency = "USD", ai_id = "ai-test",
          billing_ref = "****1234", items = 1, attempts = 1, reason = "timeout" },
  sale = { amount = 15000, currency = "USD", network = "eip155:84532",
           asset = "0x036CbD53842c5426634e7929541eC2318f3dCF7e",
           payer = "0x857b06519E91e3A54538791bDbb0E22373e36b66", scheme = "exact" },
}

local function copy(t)
  local out = {}
  for k, v in pairs(t) do
    out[k] = type(v) == "table" and copy(v) or v
  end
  return out
end

local function fields_of(name, fields, level)
  if fields ~= nil and type(fields) ~= "table" then
    error("harness." .. name .. ": expected a table, got " .. type(fields), level + 1)
  end
  return fields or {}
end

-- defaults under fields; harness.NONE removes a default.
local function merge(defaults, fields)
  local t = copy(defaults)
  for k, v in pairs(fields) do
    if v == M.NONE then t[k] = nil else t[k] = type(v) == "table" and copy(v) or v end
  end
  return t
end

local function has_header(headers, name)
  if type(headers) ~= "table" then return false end
  for k in pairs(headers) do
    if type(k) == "string" and k:lower() == name then return true end
  end
  return false
end

-- Defaults that fields given by the caller make moot.
local function drop_moot(t, fields)
  if fields.uri ~= nil and fields.uri ~= M.NONE then
    for _, k in ipairs({ "host", "path", "query" }) do
      if fields[k] == nil then t[k] = nil end
    end
  end
  if fields.user_agent == nil and has_header(fields.headers, "user-agent") then t.user_agent = nil end
end

-- sandbox.req_table, its message prefixed with the builder's name and its
-- hint pointing at the builder that makes the other kind.
local function req_table(name, t, level)
  local ok, res = pcall(sandbox.req_table, t)
  if ok then return res end
  local msg = sandbox.errstr(res)
  if name ~= "req" then
    local function swap(from, to)
      local i = msg:find(from, 1, true)
      if i then msg = msg:sub(1, i - 1) .. to .. msg:sub(i + #from) end
    end
    swap('(kind = "connect")', "(harness.connect{...})")
    swap('(kind = "http")', "(harness.http{...})")
  end
  error("harness." .. name .. ": " .. msg, level + 1)
end

local function builder(kind)
  return function(fields)
    local t = merge(M.DEFAULTS[kind], fields_of(kind, fields, 2))
    -- Building a view raises now, at the spec line that made the mistake.
    local ok, err = pcall(sandbox.views[kind], t)
    if not ok then error("harness." .. kind .. ": " .. sandbox.errstr(err), 2) end
    return t
  end
end

function M.req(fields)
  fields = fields_of("req", fields, 2)
  local t = merge(M.DEFAULTS.req, fields)
  drop_moot(t, fields)
  local out = req_table("req", t, 2) -- not a tail call: the error level counts this frame
  return out
end

local ALWAYS = { "uri", "host", "path", "method", "rpc", "kind" }

local function refuse_none(name, fields, level)
  for _, k in ipairs(ALWAYS) do
    if fields[k] == M.NONE then
      error("harness." .. name .. ": " .. k .. " cannot be removed: the gateway always sets it", level + 1)
    end
  end
end

local function compose_uri(scheme, t)
  if type(t.host) == "string" and type(t.path) == "string" and
     (t.query == nil or type(t.query) == "string") then
    return scheme .. "://" .. t.host .. t.path .. (t.query and ("?" .. t.query) or "")
  end
end

function M.http(fields)
  fields = fields_of("http", fields, 2)
  refuse_none("http", fields, 2)
  if fields.kind ~= nil and fields.kind ~= "http" then
    error('harness.http: kind is always "http" here; a Connect call is harness.connect{...}', 2)
  end
  if fields.ai ~= nil then
    error("harness.http: ai: only Connect calls carry an AI system; use harness.connect{...}", 2)
  end
  local t = merge(M.DEFAULTS.http, fields)
  drop_moot(t, fields)
  local tls = t.tls
  t.tls = nil
  if type(tls) ~= "boolean" then error("harness.http: tls must be true or false, got " .. type(tls), 2) end
  if t.uri ~= nil then
    local scheme = type(t.uri) == "string" and t.uri:match("^(%a+)://")
    if fields.tls ~= nil and (scheme == "https") ~= tls and (scheme == "http" or scheme == "https") then
      error("harness.http: tls = " .. tostring(tls) .. " disagrees with uri " .. string.format("%q", t.uri) ..
        ": an " .. scheme .. " uri means tls = " .. tostring(scheme == "https") .. "; give one or the other", 2)
    end
  else
    t.uri = compose_uri(tls and "https" or "http", t)
  end
  t.kind = "http"
  local out = req_table("http", t, 2)
  if out.host ~= nil and not has_header(out.headers, "host") then out.headers.Host = out.host end
  return out
end

-- ai = { ... } field -> flat req field.
local AI_FIELDS = { id = "ai_id", name = "ai_name", user_type = "user_type", country = "country",
                    purposes = "purposes", purpose = "purpose", user_agent = "user_agent" }

function M.connect(fields)
  local given = fields_of("connect", fields, 2)
  fields = {}
  for k, v in pairs(given) do fields[k] = v end -- shallow: harness.NONE must stay itself
  refuse_none("connect", fields, 2)
  if fields.kind ~= nil and fields.kind ~= "connect" then
    error('harness.connect: kind is always "connect" here; a plain HTTP request is harness.http{...}', 2)
  end
  if fields.tls ~= nil then
    error('harness.connect: tls: a Connect resource\'s scheme is in its uri ("https://..." or "http://...")', 2)
  end
  local ai = fields.ai
  fields.ai = nil
  if ai ~= nil then
    if type(ai) ~= "table" then error("harness.connect: ai must be a table, got " .. type(ai), 2) end
    for k, v in pairs(ai) do
      local flat = AI_FIELDS[k]
      if not flat then
        error("harness.connect: ai." .. tostring(k) .. ": unknown field (the AI system has id, name, " ..
          "user_type, country, purposes or purpose, user_agent)", 2)
      end
      if fields[flat] ~= nil then
        error("harness.connect: ai." .. k .. " and " .. flat .. " both given: give one", 2)
      end
      if v ~= M.NONE then fields[flat] = v end
    end
  end
  local t = merge(M.DEFAULTS.connect, fields)
  if fields.uri == nil and (fields.host ~= nil or fields.path ~= nil or fields.query ~= nil) then
    t.uri = compose_uri("https", { host = t.host or "example.com", path = t.path or "/", query = t.query })
      or t.uri
  else
    drop_moot(t, fields)
  end
  t.kind = "connect"
  local out = req_table("connect", t, 2)
  return out
end

M.offer = builder("offer")
M.txn = builder("txn")
M.sale = builder("sale")

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
local DEFAULT_POLICY_PATH = (HERE or ".") .. "/../default_policy.lua"
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
  local settle_default = opts.settle_default
  if settle_default == nil then settle_default = "sync" end
  if settle_default ~= "sync" and settle_default ~= "async" then
    error('harness: settle_default must be "sync" or "async"', 3)
  end
  self.settle_default = settle_default
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
    modules = opts.modules or { ["tollgate.money"] = money },
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

-- The policy file at path (see resolve): its source and the name it goes by.
local function read_policy(path)
  local found, where = resolve(path)
  if not found then
    return nil, "cannot read " .. tostring(path) .. ": not found (looked in " .. where .. ")"
  end
  local source, err = read_file(found)
  if not source then return nil, "cannot read " .. tostring(found) .. ": " .. tostring(err) end
  return source, found
end

function M.load(path, opts)
  local source, name = read_policy(path)
  if not source then error("harness: " .. name, 2) end
  local p, cerr = compile(source, name, opts)
  if not p then error(cerr, 2) end
  return p
end

function M.check(path, opts)
  local source, name = read_policy(path)
  if not source then return false, name end
  path = name
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
  settle = function() end, -- stands for the policy's settle_default (Policy:call)
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
  if fn == NO_HOOK.settle then
    local mode = self.settle_default
    fn = function() return mode end
  end

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

function Policy:settle(req, sale)
  return raise_or_return(self:call("settle", req, sale))
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
