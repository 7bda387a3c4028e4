-- tollgate.diff: how a candidate version of a policy decides, next to the
-- live one, on the fixtures of both. The gateway embeds this file and runs it
-- in a throwaway Lua state for a dry run of a reload (POST /reload?dry_run=1)
-- and for `tollgate policy diff OLD NEW` (core/policy/state.c), each hook call
-- bounded like any other.
--
--   local diff = require("tollgate.diff")
--   diff.compare(sandbox, opts) -> report | raises "FILE:LINE: reason"
--     Loads opts.live and opts.candidate ({ source =, chunkname = }) through
--     sandbox.load, each in its own environment (their fixtures are not run
--     here: validating the candidate is the caller's part). Then, for every
--     fixture of the live version and then of the candidate (an input that
--     both hold is compared once, under the first name), calls the fixture's
--     hook of both versions with the fixture's views and its `now`, and
--     compares the checked results. A hook a version does not define answers
--     as in the gateway: opts.default's hook (the default policy), else the C
--     runtime's answer (skip false, no rate limit, nothing; settle "default":
--     the tenant's configured mode, which is not known here).
--       opts.tenant, opts.version  tollgate.tenant and .version of both
--       opts.default               { source =, chunkname = } or nil
--       opts.now()                 the clock for fixtures without `now`: read
--                                  once, so both versions see the same time
--       opts.guard                 as for sandbox.load
--       opts.on_load(label)        before each load (the C runtime arms the
--                                  load time limit)
--       opts.on_call(hook, label)  before each hook call (arms the hook limit,
--                                  and names the call should a limit hit)
--       opts.modules               what require() may return in both
--       opts.max                   differences listed at most (default 500);
--                                  `differing` counts them all
--     report = { compared = N, differing = N, differences = { d, ... } }
--     d = { from = "live" | "candidate", index = i, name = "..." or nil,
--           hook = "price", live = outcome, candidate = outcome }
--     outcome = { values = { ... }, n = count }   the checked results
--             | { error = "message" }             the call failed (fails closed)
--     Two failed calls are the same decision (the request fails closed
--     either way), whatever their messages say. Logs of tollgate.log are
--     dropped.

local M = {}

local type, pairs, next, ipairs, select, tostring, error, pcall =
  type, pairs, next, ipairs, select, tostring, error, pcall
local sformat, tconcat, tsort = string.format, table.concat, table.sort

M.MAX_LISTED = 500
local MAX_DEPTH = 16 -- nesting of a fixture's tables that tells inputs apart

-- A canonical text of a fixture's input, to find the same input in both
-- files. Keys are sorted; tables nested deeper than MAX_DEPTH (or cycles)
-- collapse to one marker, which can only merge inputs that differ that deep.
local function canon(v, depth, out)
  local t = type(v)
  if t == "string" then
    out[#out + 1] = sformat("%q", v)
  elseif t == "number" or t == "boolean" or t == "nil" then
    out[#out + 1] = tostring(v)
  elseif t == "table" then
    if depth >= MAX_DEPTH then
      out[#out + 1] = "{...}"
      return
    end
    local keys = {}
    for k in next, v do keys[#keys + 1] = k end
    tsort(keys, function(a, b)
      local ta, tb = type(a), type(b)
      if ta ~= tb then return ta < tb end
      if ta == "number" or ta == "string" then return a < b end
      return false
    end)
    out[#out + 1] = "{"
    for _, k in ipairs(keys) do
      canon(k, depth + 1, out)
      out[#out + 1] = "="
      canon(v[k], depth + 1, out)
      out[#out + 1] = ","
    end
    out[#out + 1] = "}"
  else
    out[#out + 1] = "<" .. t .. ">"
  end
end

local function input_key(f)
  local out = {}
  canon({ f.hook, f.req, f.offer, f.txn, f.now, f.sale }, 0, out)
  return tconcat(out)
end

-- The C runtime's answers when even the default policy lacks a hook
-- (core/policy/policy.h, TG_POLICY_ERR_NOHOOK).
local NO_HOOK = {
  skip = function() return false end,
  rate_limit = function() end,
  price = function(offer)
    if offer.currency == nil then return nil end
    if offer.model == "free" then return 0, offer.currency end
    return offer.amount, offer.currency
  end,
  on_billing_timeout = function() return "reject" end,
  on_settle_failure = function() end,
  -- The gateway settles as the tenant's configuration says: a decision of
  -- its own, apart from "sync" and "async".
  settle = function() return "default" end,
}

local function pack(...)
  return { n = select("#", ...), ... }
end

local function outcome(ok, ...)
  if not ok then
    local e = ...
    return { error = type(e) == "string" and e or "(error object is a " .. type(e) .. " value)" }
  end
  return { values = pack(...), n = select("#", ...) }
end

local function same(a, b)
  if a.error or b.error then return a.error ~= nil and b.error ~= nil end
  if a.n ~= b.n then return false end
  for i = 1, a.n do
    if a.values[i] ~= b.values[i] then return false end
  end
  return true
end

function M.compare(sandbox, opts)
  local start = (opts.now or os.time)()
  local now_at = start -- what tollgate.now() answers: a fixture's `now` during its calls
  local function load(which, src)
    if opts.on_load then opts.on_load("loading the " .. which .. " version") end
    local p, err = sandbox.load(src.source, src.chunkname, {
      tenant = opts.tenant, version = opts.version, guard = opts.guard, modules = opts.modules,
      now = function() return now_at end,
    })
    if not p then error(err, 0) end
    return p
  end
  local live = load("live", opts.live)
  local cand = load("candidate", opts.candidate)
  local default = opts.default and load("default", opts.default) or {}
  local view_opts = { tenant = opts.tenant }
  local max = opts.max or M.MAX_LISTED

  local function run(policy, f, label)
    local hook = f.hook
    local args = {}
    for j, kind in ipairs(sandbox.HOOK_ARGS[hook]) do
      local ok, v = pcall(sandbox.views[kind], f[kind], view_opts)
      if not ok then return { error = label .. ": " .. sandbox.errstr(v) } end
      args[j] = v
    end
    now_at = f.now or start
    if opts.on_call then opts.on_call(hook, label) end
    local r
    if policy[hook] then
      r = outcome(sandbox.call(policy, hook, args[1], args[2]))
    elseif default[hook] then
      r = outcome(sandbox.call(default, hook, args[1], args[2]))
    else
      r = outcome(pcall(NO_HOOK[hook], args[1], args[2]))
    end
    now_at = start
    return r
  end

  local report = { compared = 0, differing = 0, differences = {} }
  local seen = {}
  for _, side in ipairs({ { "live", live }, { "candidate", cand } }) do
    local from, policy = side[1], side[2]
    for i, f in ipairs(policy.fixtures or {}) do
      local key = input_key(f)
      if not seen[key] then
        seen[key] = true
        report.compared = report.compared + 1
        local name = type(f.name) == "string" and f.name or nil
        local label = from .. " fixture " .. i .. (name and (" '" .. name .. "'") or "") ..
          " (" .. f.hook .. ")"
        local a = run(live, f, label .. " on the live version")
        local b = run(cand, f, label .. " on the candidate")
        if not same(a, b) then
          report.differing = report.differing + 1
          if #report.differences < max then
            report.differences[#report.differences + 1] = {
              from = from, index = i, name = name, hook = f.hook, live = a, candidate = b,
            }
          end
        end
      end
    end
  end
  return report
end

return M
