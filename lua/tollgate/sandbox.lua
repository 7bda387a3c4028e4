-- tollgate.sandbox: loads a tenant policy into an allow-listed environment
-- and holds the rules for what its hooks may return. The gateway embeds this
-- very file (core/policy.c), `tollgate check` validates with it, and the
-- busted harness for operators (tollgate.harness) loads policies through it,
-- so a policy behaves the same in all three.
--
--   local sandbox = require("tollgate.sandbox")
--
--   sandbox.load(source, chunkname, opts) -> policy | nil, err
--     Compiles source (text only: bytecode is refused) with chunkname (e.g.
--     "@policies/news.lua"), runs its top level in a fresh environment and
--     validates what it returns. err is "FILE:LINE: reason" for syntax and
--     runtime errors, "FILE: reason" for a bad return value. The caller
--     bounds time and memory (the C runtime does; in plain Lua see
--     sandbox.with_deadline). opts (all optional):
--       tenant  = "news"                      tollgate.tenant
--       version = "0.1.0"                     tollgate.version
--       log     = function(level, msg) end    behind tollgate.log
--       now     = function() return secs end  behind tollgate.now (default os.time)
--       clock   = function() return secs end  behind os.clock: the seconds this
--                                             policy's state has spent running (the C
--                                             runtime); default: os.clock() minus its
--                                             value at load
--       modules = { ["tollgate.money"] = M }  what require() may return
--                                             (default: tollgate.money if `require` finds it)
--       guard   = function() end              called after every pcall/xpcall inside the
--                                             policy; raises to abort the hook (the C
--                                             runtime raises once the deadline passed or
--                                             the allocator refused memory, so a policy
--                                             cannot swallow its own timeout)
--     The returned policy is a new plain table: the hook functions found
--     (skip, rate_limit, price, on_billing_timeout, on_settle_failure,
--     settle) and `fixtures` (a list, possibly empty). Later changes the
--     policy makes to its own table do not reach it.
--
--   sandbox.views.req(t, opts) / .offer(t, opts) / .txn(t, opts) / .sale(t, opts) -> view
--     Read-only views over plain tables shaped like the fields the gateway
--     passes (see VIEW_FIELDS below); writing any field raises. req also takes
--     `purpose` (shorthand for purposes = { purpose }) and `headers` (a map,
--     looked up case-insensitively by req:header(name) or req.header(name)).
--     Unknown or mistyped fields raise, so a typo in a fixture is caught.
--     The C runtime builds its own views from C structs; these serve the
--     fixtures and the harness, so views.req also refuses a req the gateway
--     never produces ("req.<field>: why; what to write instead"):
--       kind       "http" or "connect"; absent: "connect" when ai_id, ai_name,
--                  user_type, country, rpc or a purpose is given, else "http"
--       http       no ai_id, ai_name, user_type, country, purpose(s), rpc;
--                  method an upper-case token; user_agent and the User-Agent
--                  header agree (either one fills in the other)
--       connect    rpc DiscoverResources (default) or ExecuteTransaction;
--                  method "GET" (default); no "" for user_agent or identity
--       user_type  one of sandbox.USER_TYPES; purposes: each one of sandbox.PURPOSES;
--                  purpose, when given with purposes, is purposes[1]
--       path       in core/net/target.c's normal form (default "/"); query
--                  printable ASCII without "#"; host lower-case, without the
--                  scheme's default port (80 http, 443 https)
--       uri        absolute "http(s)://host/path[?query]", lower-case scheme,
--                  no userinfo, no fragment; host, path and query are derived
--                  from it (given alongside, they must agree); without uri,
--                  a host gives uri = "http://" (http) or "https://" (connect)
--                  .. host .. path .. ["?" query]
--
--   sandbox.req_table(t, opts) -> plain table
--     The fields views.req would expose, derived ones included (plus
--     `purpose` and `headers` as given, with User-Agent added on http).
--     Raises as views.req; views.req accepts the result unchanged.
--
--   sandbox.normal_path(path) -> normalized | nil, reason
--     The gateway's normal form of a path (core/net/target.c), in Lua.
--
--   sandbox.check_result(hook, ...) -> normalized values | nil, err
--     The return-type rules, the same the C runtime applies to every call:
--       skip               -> true | false            (nil counts as false)
--       rate_limit         -> key, rate, burst | nil  (key non-empty string <= 256 bytes,
--                                                      rate a finite number > 0,
--                                                      burst an integer 1..2^31-1)
--       price              -> amount, currency | nil  (amount an integer 0..2^53,
--                                                      currency [A-Za-z][A-Za-z0-9]{0,15})
--       on_billing_timeout -> "reject" | "deferred"
--       on_settle_failure  -> (nothing; the value is ignored)
--       settle             -> "sync" | "async"        (nil too is an error: the gateway
--                                                      then settles first)
--     Values are returned normalized; an error is (nil, message) and is the
--     only case where the first value is nil and a second one follows.
--
--   sandbox.invoke(hook, fn, ...) -> true, values... | false, type_err
--     Calls fn(...) and checks its results. Runtime errors propagate (the C
--     runtime calls this inside lua_pcall and classifies them).
--
--   sandbox.call(policy, hook, ...) -> true, values... | false, err
--     invoke() for a loaded policy, catching runtime errors too (harness use).
--
--   sandbox.run_fixtures(policy, opts) -> true | false, err
--     Runs every fixture of the policy. opts: tenant (default tenant of the
--     views), on_call(hook, label) called before each fixture builds its
--     views and calls its hook (the C runtime resets the deadline there, and
--     names the fixture, e.g. "fixture 2 'slow' (price)", when a limit hits),
--     guard (as for load). A fixture is
--       { hook = "price", offer = {...}, req = {...}, txn = {...}, sale = {...},
--         expect = { 15000, "USD" },   -- the normalized results, in order
--         error = "substring",         -- instead of expect: the call must fail so
--         now = 1700000000,            -- tollgate.now() during this fixture
--         name = "label" }             -- used in messages
--
--   sandbox.with_deadline(seconds, fn, ...) -> fn's results (or raises)
--     Plain-Lua (busted) only: bounds fn with a debug count hook and the JIT
--     off, the way the C runtime bounds every hook. Needs `debug` and `jit`.
--
--   sandbox.harden()
--     Points the string metatable's __index at the sandbox's string table
--     (no dump, pattern functions bounded) so that s:find(...) inside a
--     policy is as safe as string.find. Idempotent; load() calls it. The C
--     runtime also hides the string metatable (its states are private).
--
--   sandbox.set_cstack(fn)
--     fn() -> false once library functions that call back into Lua (gsub
--     with a function or table, format of a value with __tostring, sort) are
--     nested too deep to go on; they then raise "C stack overflow (...)".
--     The C runtime gives one that measures its C stack; nil (the default)
--     counts nested calls with the debug library, up to MAX_NESTED.
--
-- The environment is an allowlist: assert error ipairs next pairs pcall
-- select tonumber tostring type unpack xpcall rawequal getmetatable (tables
-- only) setmetatable (tables only) _G _VERSION, copies of string (no dump),
-- table and math, os.{time,clock,date,difftime}, the tollgate API table and
-- require() of opts.modules; every table handed over is a frozen proxy.
-- Differences a policy author may notice: string.find/match/gmatch/gsub
-- switch to a slower Lua matcher when a call's worst case is large (results
-- are identical); table.sort of more than 64 elements uses a Lua comparator;
-- table.concat and string.rep build big results in steps (same bytes);
-- table.insert takes positions 1..#t+1 only (as Lua 5.3); library calls that
-- call back into Lua nest at most about 100 deep; os.clock counts the
-- policy's own time; xpcall runs its message handler after the stack unwound
-- (there is no traceback in the sandbox, so nothing visible is lost).
--
-- State: a policy's upvalues and module locals live in the Lua state that
-- loaded it. In the gateway that is one state per tenant per worker thread,
-- rebuilt on every reload: nothing is shared across workers or survives a
-- reload.

local M = {}

local type, pairs, next, select, tostring, tonumber, error, pcall, xpcall =
  type, pairs, next, select, tostring, tonumber, error, pcall, xpcall
local setmetatable, getmetatable, rawget, rawequal, ipairs, assert, unpack =
  setmetatable, getmetatable, rawget, rawequal, ipairs, assert, unpack
local load, loadstring, setfenv = load, loadstring, setfenv
local newproxy = newproxy
local floor, huge = math.floor, math.huge
local sbyte, ssub, schar, sfind, smatch, sgmatch, sgsub, slower, sformat =
  string.byte, string.sub, string.char, string.find, string.match, string.gmatch,
  string.gsub, string.lower, string.format
local supper = string.upper
local tconcat = table.concat
local os_time, os_clock = os.time, os.clock

M.HOOKS = { "skip", "rate_limit", "price", "on_billing_timeout", "on_settle_failure", "settle" }
local IS_HOOK = {}
for _, h in ipairs(M.HOOKS) do IS_HOOK[h] = true end

-- Arguments each hook receives, by view kind.
local HOOK_ARGS = {
  skip = { "req" },
  rate_limit = { "req" },
  price = { "offer", "req" },
  on_billing_timeout = { "txn" },
  on_settle_failure = { "txn" },
  settle = { "req", "sale" },
}
M.HOOK_ARGS = HOOK_ARGS

local MAX_INT = 9007199254740992 -- 2^53: the largest integer a Lua number holds exactly

local function errstr(e)
  -- Never call __tostring here: an error object's metamethod could loop.
  if type(e) == "string" then return e end
  if type(e) == "number" then return tostring(e) end
  return "(error object is a " .. type(e) .. " value)"
end
M.errstr = errstr

local function show(v)
  if type(v) == "string" then return sformat("%q", v) end
  if type(v) == "number" or type(v) == "boolean" or v == nil then return tostring(v) end
  return type(v)
end

local function is_integer(v)
  return type(v) == "number" and v == floor(v) and v >= -MAX_INT and v <= MAX_INT
end

-- Library functions that call back into Lua.
--
-- string.gsub (a function or table replacement), string.format ("%s" of a
-- value with __tostring) and table.sort (its comparator, __lt) run those
-- callbacks on the C stack, and LuaJIT bounds only the Lua stack: a policy
-- recursing through them would overflow the C stack and take the process
-- down. Each of them first asks cstack_ok(): the C runtime answers from its
-- C stack (set_cstack); plain Lua counts the nested calls.

local MAX_NESTED = 100
local CSTACK_MSG = "C stack overflow (library functions calling back into Lua nested too deeply)"
local CALLS_BACK = { [sgsub] = true, [sformat] = true, [table.sort] = true }
local getinfo = (rawget(_G, "debug") or {}).getinfo

local function count_nested()
  -- Each level is at least a C frame and a Lua one: a shallower stack is fine.
  if not getinfo or not getinfo(2 * MAX_NESTED, "l") then return true end
  local n, level = 0, 2
  while true do
    local info = getinfo(level, "f")
    if not info then return true end
    if CALLS_BACK[info.func] then
      n = n + 1
      if n >= MAX_NESTED then return false end
    end
    level = level + 1
  end
end

local cstack_ok = count_nested

-- The C runtime's check (a state holds one policy, and the string metatable
-- serves every policy of the state alike); nil restores the count above.
function M.set_cstack(fn)
  cstack_ok = fn or count_nested
end

-- Bounded pattern matching.
--
-- string.find/match/gmatch/gsub run in C, where no instruction hook fires, so
-- a backtracking pattern such as ".-.-.-.-b" over a long subject would run
-- for hours past any deadline. Calls whose worst case is small run natively;
-- the others run on the Lua port of the same matcher below, where the hook
-- (and so the time limit) does fire. Semantics follow LuaJIT's lib_string.c.

local NATIVE_BUDGET = 2e6 -- worst-case match steps we let C run unchecked
local GSUB_BUDGET = 4e6   -- bytes x (8 + #replacement) of a native gsub (~10 ms)
local MAX_CAPTURES = 32
local MAX_DEPTH = 200     -- LuaJIT's LJ_MAX_XLEVEL: "pattern too complex"
local CAP_UNFINISHED, CAP_POSITION = -1, -2
local C_PCT, C_LBRACK, C_RBRACK, C_CARET, C_DOLLAR = 37, 91, 93, 94, 36
local C_LPAR, C_RPAR, C_DOT, C_DASH = 40, 41, 46, 45
local C_STAR, C_PLUS, C_QUEST = 42, 43, 63

-- Byte sets of the classes (%a, %A, ...), built on first use: most states
-- never run the port, and building them all costs a millisecond.
local CLASS = {}
local CLASS_LETTERS = {}
for _, l in ipairs({ "a", "c", "d", "g", "l", "p", "s", "u", "w", "x", "z" }) do
  CLASS_LETTERS[sbyte(l)] = l
  CLASS_LETTERS[sbyte(string.upper(l))] = l
end

local function class_set(cl)
  local set = CLASS[cl]
  if set then return set end
  local l = CLASS_LETTERS[cl]
  if not l then return nil end
  local yes, no = {}, {}
  local pat = "%" .. l
  for c = 0, 255 do
    if sfind(schar(c), pat) then yes[c] = true else no[c] = true end
  end
  CLASS[sbyte(l)] = yes
  CLASS[sbyte(string.upper(l))] = no
  return CLASS[cl]
end

local function match_class(c, cl)
  local set = CLASS[cl] or class_set(cl)
  if set then return set[c] == true end
  return cl == c
end

-- The matcher keeps its state in a small table: src, slen, pat, plen,
-- level, cap_init[], cap_len[], depth.
local function class_end(ms, pi)
  local p, plen = ms.pat, ms.plen
  local c = sbyte(p, pi)
  pi = pi + 1
  if c == C_PCT then
    if pi > plen then error("malformed pattern (ends with '%')", 0) end
    return pi + 1
  elseif c == C_LBRACK then
    if sbyte(p, pi) == C_CARET then pi = pi + 1 end
    repeat
      if pi > plen then error("malformed pattern (missing ']')", 0) end
      local cc = sbyte(p, pi)
      pi = pi + 1
      if cc == C_PCT and pi <= plen then pi = pi + 1 end
    until sbyte(p, pi) == C_RBRACK
    return pi + 1
  end
  return pi
end

-- pi at '[', ec at the closing ']'.
local function match_bracket(ms, c, pi, ec)
  local p = ms.pat
  local sig = true
  if sbyte(p, pi + 1) == C_CARET then
    sig = false
    pi = pi + 1
  end
  pi = pi + 1
  while pi < ec do
    local pc = sbyte(p, pi)
    if pc == C_PCT then
      pi = pi + 1
      if match_class(c, sbyte(p, pi)) then return sig end
    elseif sbyte(p, pi + 1) == C_DASH and pi + 2 < ec then
      if pc <= c and c <= sbyte(p, pi + 2) then return sig end
      pi = pi + 2
    elseif pc == c then
      return sig
    end
    pi = pi + 1
  end
  return not sig
end

local function single_match(ms, si, pi, ep)
  if si > ms.slen then return false end
  local c = sbyte(ms.src, si)
  local pc = sbyte(ms.pat, pi)
  if pc == C_DOT then return true end
  if pc == C_PCT then return match_class(c, sbyte(ms.pat, pi + 1)) end
  if pc == C_LBRACK then return match_bracket(ms, c, pi, ep - 1) end
  return pc == c
end

local do_match

local function match_balance(ms, si, pi)
  if pi + 1 > ms.plen then error("unbalanced pattern", 0) end
  local src = ms.src
  local b, e = sbyte(ms.pat, pi), sbyte(ms.pat, pi + 1)
  if sbyte(src, si) ~= b then return nil end
  local cont = 1
  si = si + 1
  while si <= ms.slen do
    local c = sbyte(src, si)
    if c == e then
      cont = cont - 1
      if cont == 0 then return si + 1 end
    elseif c == b then
      cont = cont + 1
    end
    si = si + 1
  end
  return nil
end

local function max_expand(ms, si, pi, ep)
  local i = 0
  while single_match(ms, si + i, pi, ep) do i = i + 1 end
  while i >= 0 do
    local res = do_match(ms, si + i, ep + 1)
    if res then return res end
    i = i - 1
  end
  return nil
end

local function min_expand(ms, si, pi, ep)
  while true do
    local res = do_match(ms, si, ep + 1)
    if res then return res end
    if single_match(ms, si, pi, ep) then si = si + 1 else return nil end
  end
end

local function start_capture(ms, si, pi, what)
  local level = ms.level + 1
  if level > MAX_CAPTURES then error("too many captures", 0) end
  ms.cap_init[level] = si
  ms.cap_len[level] = what
  ms.level = level
  local res = do_match(ms, si, pi)
  if not res then ms.level = ms.level - 1 end
  return res
end

local function end_capture(ms, si, pi)
  local l
  for i = ms.level, 1, -1 do
    if ms.cap_len[i] == CAP_UNFINISHED then l = i break end
  end
  if not l then error("invalid pattern capture", 0) end
  ms.cap_len[l] = si - ms.cap_init[l]
  local res = do_match(ms, si, pi)
  if not res then ms.cap_len[l] = CAP_UNFINISHED end
  return res
end

local function match_capture(ms, si, digit)
  local l = digit - 48 -- '0'
  if l < 1 or l > ms.level or ms.cap_len[l] == CAP_UNFINISHED then
    error("invalid capture index", 0)
  end
  local len = ms.cap_len[l]
  if ms.slen - si + 1 >= len and
     ssub(ms.src, ms.cap_init[l], ms.cap_init[l] + len - 1) == ssub(ms.src, si, si + len - 1) then
    return si + len
  end
  return nil
end

do_match = function(ms, si, pi)
  ms.depth = ms.depth + 1
  if ms.depth > MAX_DEPTH then error("pattern too complex", 0) end
  local p, plen = ms.pat, ms.plen
  local res
  while true do
    if pi > plen then res = si break end
    local pc = sbyte(p, pi)
    local dflt = false
    if pc == C_LPAR then
      if sbyte(p, pi + 1) == C_RPAR then
        res = start_capture(ms, si, pi + 2, CAP_POSITION)
      else
        res = start_capture(ms, si, pi + 1, CAP_UNFINISHED)
      end
      break
    elseif pc == C_RPAR then
      res = end_capture(ms, si, pi + 1)
      break
    elseif pc == C_PCT then
      local nc = sbyte(p, pi + 1)
      if nc == 98 then -- %b
        si = match_balance(ms, si, pi + 2)
        if not si then res = nil break end
        pi = pi + 4
      elseif nc == 102 then -- %f
        pi = pi + 2
        if sbyte(p, pi) ~= C_LBRACK then error("missing '[' after '%f' in pattern", 0) end
        local ep = class_end(ms, pi)
        local prev = si == 1 and 0 or sbyte(ms.src, si - 1)
        local cur = sbyte(ms.src, si) or 0
        if match_bracket(ms, prev, pi, ep - 1) or not match_bracket(ms, cur, pi, ep - 1) then
          res = nil
          break
        end
        pi = ep
      elseif nc and nc >= 48 and nc <= 57 then
        si = match_capture(ms, si, nc)
        if not si then res = nil break end
        pi = pi + 2
      else
        dflt = true
      end
    elseif pc == C_DOLLAR and pi == plen then
      res = (si == ms.slen + 1) and si or nil
      break
    else
      dflt = true
    end
    if dflt then
      local ep = class_end(ms, pi)
      local m = single_match(ms, si, pi, ep)
      local epc = sbyte(p, ep)
      if epc == C_QUEST then
        if m then
          local r = do_match(ms, si + 1, ep + 1)
          if r then res = r break end
        end
        pi = ep + 1
      elseif epc == C_STAR then
        res = max_expand(ms, si, pi, ep)
        break
      elseif epc == C_PLUS then
        res = m and max_expand(ms, si + 1, pi, ep) or nil
        break
      elseif epc == C_DASH then
        res = min_expand(ms, si, pi, ep)
        break
      else
        if not m then res = nil break end
        si = si + 1
        pi = ep
      end
    end
  end
  ms.depth = ms.depth - 1
  return res
end

local function new_state(s, p, pstart)
  -- LuaJIT's matcher reads the pattern as a C string: it ends at a NUL.
  local plen = #p
  local nul = sfind(p, "\0", 1, true)
  if nul then plen = nul - 1 end
  return { src = s, slen = #s, pat = p, plen = plen, level = 0, depth = 0,
           cap_init = {}, cap_len = {}, pstart = pstart }
end

local function get_capture(ms, i, s, e)
  if i > ms.level then
    if i == 1 then return ssub(ms.src, s, e - 1) end
    error("invalid capture index", 0)
  end
  local len = ms.cap_len[i]
  if len == CAP_UNFINISHED then error("unfinished capture", 0) end
  if len == CAP_POSITION then return ms.cap_init[i] end
  return ssub(ms.src, ms.cap_init[i], ms.cap_init[i] + len - 1)
end

local function push_captures(ms, s, e, whole)
  local n = (ms.level == 0 and whole) and 1 or ms.level
  if n == 0 then return end
  local out = {}
  for i = 1, n do out[i] = get_capture(ms, i, s, e) end
  return unpack(out, 1, n)
end

local function to_int(v)
  if v >= 0 then return floor(v) end
  return -floor(-v)
end

local function lua_find(s, p, init, find)
  local ls = #s
  if init < 0 then init = ls + init + 1 end
  if init < 1 then init = 1 elseif init > ls + 1 then init = ls + 1 end
  local pstart, anchor = 1, false
  if sbyte(p, 1) == C_CARET then pstart, anchor = 2, true end
  local ms = new_state(s, p, pstart)
  local si = init
  repeat
    ms.level, ms.depth = 0, 0
    local e = do_match(ms, si, pstart)
    if e then
      if find then return si, e - 1, push_captures(ms, si, e, false) end
      return push_captures(ms, si, e, true)
    end
    si = si + 1
  until si > ls + 1 or anchor
  return nil
end

local function lua_gmatch(s, p)
  local ms = new_state(s, p, 1)
  local si = 1
  return function()
    while si <= ms.slen + 1 do
      ms.level, ms.depth = 0, 0
      local e = do_match(ms, si, 1)
      if e then
        local start = si
        si = (e == si) and e + 1 or e
        return push_captures(ms, start, e, true)
      end
      si = si + 1
    end
    return nil
  end
end

local function add_value(ms, parts, s, e, repl, rt)
  local v
  if rt == "string" then
    local out, i, rl = {}, 1, #repl
    while i <= rl do
      local c = sbyte(repl, i)
      if c ~= C_PCT then
        out[#out + 1] = schar(c)
      else
        i = i + 1
        local d = sbyte(repl, i)
        if d == nil then
          out[#out + 1] = "\0"
        elseif d < 48 or d > 57 then
          out[#out + 1] = schar(d)
        elseif d == 48 then
          out[#out + 1] = ssub(ms.src, s, e - 1)
        else
          out[#out + 1] = tostring(get_capture(ms, d - 48, s, e))
        end
      end
      i = i + 1
    end
    parts[#parts + 1] = tconcat(out)
    return
  elseif rt == "function" then
    v = repl(push_captures(ms, s, e, true))
  else
    v = repl[get_capture(ms, 1, s, e)]
  end
  if not v then
    v = ssub(ms.src, s, e - 1)
  elseif type(v) ~= "string" and type(v) ~= "number" then
    error("invalid replacement value (a " .. type(v) .. ")", 0)
  end
  parts[#parts + 1] = tostring(v)
end

local function lua_gsub(s, p, repl, max_n)
  local rt = type(repl)
  if rt == "number" then repl, rt = tostring(repl), "string" end
  local pstart, anchor = 1, false
  if sbyte(p, 1) == C_CARET then pstart, anchor = 2, true end
  local ms = new_state(s, p, pstart)
  local parts, si, n, ls = {}, 1, 0, #s
  while n < max_n do
    ms.level, ms.depth = 0, 0
    local e = do_match(ms, si, pstart)
    if e then
      n = n + 1
      add_value(ms, parts, si, e, repl, rt)
    end
    if e and e > si then
      si = e
    elseif si <= ls then
      parts[#parts + 1] = ssub(s, si, si)
      si = si + 1
    else
      break
    end
    if anchor then break end
  end
  parts[#parts + 1] = ssub(s, si)
  return tconcat(parts), n
end

-- Worst-case steps of matching a pattern over n subject bytes: every
-- quantified item, %b and back-reference may try each of n+1 lengths, every
-- '?' doubles, and an unanchored search restarts at each position. The
-- shape of a pattern is computed once and cached, so the check costs one
-- table lookup for the literal patterns policies use.
local function pattern_shape(p)
  local plen = #p
  local i, exp, doubles = 1, 0, 0
  local anchored = sbyte(p, 1) == C_CARET
  if anchored then i = 2 end
  while i <= plen do
    local c = sbyte(p, i)
    local nexti
    if c == C_PCT then
      local d = sbyte(p, i + 1)
      if d == 98 then exp, nexti = exp + 1, i + 4
      elseif d == 102 then
        nexti = i + 2
        if sbyte(p, nexti) == C_LBRACK then
          local ok, ep = pcall(class_end, { pat = p, plen = plen }, nexti)
          nexti = ok and ep or plen + 1
        end
      elseif d and d >= 49 and d <= 57 then exp, nexti = exp + 1, i + 2
      else nexti = i + 2 end
    elseif c == C_LBRACK then
      local ok, ep = pcall(class_end, { pat = p, plen = plen }, i)
      nexti = ok and ep or plen + 1
    else
      nexti = i + 1
    end
    if c ~= C_LPAR and c ~= C_RPAR then
      local q = sbyte(p, nexti)
      if q == C_STAR or q == C_PLUS or q == C_DASH then
        exp, nexti = exp + 1, nexti + 1
      elseif q == C_QUEST then
        doubles, nexti = doubles + 1, nexti + 1
      end
    end
    i = nexti
  end
  -- The largest subject length whose worst case fits the budget, where '^'
  -- anchors (find, match, gsub) and where it does not (gmatch).
  local base = NATIVE_BUDGET / (2 ^ doubles * math.ceil((plen + 1) / 16))
  local function nmax(e)
    if base < 1 then return -1 end
    if e == 0 then return huge end
    return floor(base ^ (1 / e)) - 1
  end
  return {
    specials = sfind(p, "[%^%$%*%+%?%.%(%[%%%-]") ~= nil,
    nmax_anchor = nmax(anchored and exp or exp + 1),
    nmax_free = nmax(exp + 1),
  }
end

local shape_cache, shape_count = {}, 0
local function shape_of(p)
  local s = shape_cache[p]
  if s then return s end
  s = pattern_shape(p)
  if #p <= 256 then
    if shape_count >= 512 then shape_cache, shape_count = {}, 0 end
    shape_cache[p] = s
    shape_count = shape_count + 1
  end
  return s
end

-- Arguments the Lua port cannot take as they are go to the native function,
-- which raises the usual "bad argument" error before matching anything.
local function str_arg(v)
  if type(v) == "number" then return tostring(v) end
  return v
end

local function int_arg(v, default)
  if v == nil then return default end
  if type(v) == "string" then v = tonumber(v) end
  if type(v) ~= "number" then return nil end
  return to_int(v)
end

-- Plain search costs #s * #p in the worst case: done natively in windows
-- small enough that the hook runs between them.
local function plain_find(s, p, init)
  local ls, lp = #s, #p
  if init < 0 then init = ls + init + 1 end
  if init < 1 then init = 1 elseif init > ls + 1 then init = ls + 1 end
  if (ls - init + 1) * lp <= NATIVE_BUDGET or lp == 0 then return sfind(s, p, init, true) end
  local w = floor(NATIVE_BUDGET / lp)
  if w < 1 then w = 1 end
  local i = init
  while i + lp - 1 <= ls do
    local a, b = sfind(ssub(s, i, i + w + lp - 2), p, 1, true)
    if a then return i + a - 1, i + b - 1 end
    i = i + w
  end
  return nil
end

local function safe_find(s, p, init, plain)
  local ss, ps, ii = str_arg(s), str_arg(p), int_arg(init, 1)
  if type(ss) ~= "string" or type(ps) ~= "string" or not ii then return sfind(s, p, init, plain) end
  if plain then return plain_find(ss, ps, ii) end
  local sh = shape_of(ps)
  if not sh.specials then return plain_find(ss, ps, ii) end
  if #ss <= sh.nmax_anchor then return sfind(ss, ps, ii) end
  return lua_find(ss, ps, ii, true)
end

local function safe_match(s, p, init)
  local ss, ps, ii = str_arg(s), str_arg(p), int_arg(init, 1)
  if type(ss) ~= "string" or type(ps) ~= "string" or not ii then return smatch(s, p, init) end
  if #ss <= shape_of(ps).nmax_anchor then return smatch(ss, ps, ii) end
  return lua_find(ss, ps, ii, false)
end

local function safe_gmatch(s, p)
  local ss, ps = str_arg(s), str_arg(p)
  if type(ss) ~= "string" or type(ps) ~= "string" then return sgmatch(s, p) end
  if #ss <= shape_of(ps).nmax_free then return sgmatch(ss, ps) end
  return lua_gmatch(ss, ps)
end

local function safe_gsub(s, p, repl, n)
  local ss, ps = str_arg(s), str_arg(p)
  local rt = type(repl)
  local nn = int_arg(n, type(ss) == "string" and #ss + 1 or 0)
  if type(ss) ~= "string" or type(ps) ~= "string" or not nn or
     (rt ~= "string" and rt ~= "number" and rt ~= "table" and rt ~= "function") then
    return sgsub(s, p, repl, n)
  end
  if (rt == "function" or rt == "table") and not cstack_ok() then error(CSTACK_MSG, 2) end
  -- Besides matching, each match appends its replacement: linear in #s.
  local per_match = 8 + (rt == "string" and #repl or 0)
  if #ss <= shape_of(ps).nmax_anchor and #ss * per_match <= GSUB_BUDGET then
    return sgsub(ss, ps, repl, nn)
  end
  return lua_gsub(ss, ps, repl, nn)
end

-- The Lua port, exposed for the differential specs.
M.pattern = {
  find = function(s, p, init, plain)
    if plain or not shape_of(p).specials then return plain_find(s, p, init or 1) end
    return lua_find(s, p, init or 1, true)
  end,
  match = function(s, p, init) return lua_find(s, p, init or 1, false) end,
  gmatch = lua_gmatch,
  gsub = function(s, p, r, n) return lua_gsub(s, p, r, n or #s + 1) end,
  shape = pattern_shape,
  plain_find = plain_find,
  NATIVE_BUDGET = NATIVE_BUDGET,
}

-- The string table policies see (and, after harden(), s:method() too).
local safe_string = {}
for k, v in pairs(string) do
  if k ~= "dump" then safe_string[k] = v end
end
safe_string.find, safe_string.match = safe_find, safe_match
safe_string.gmatch, safe_string.gsub = safe_gmatch, safe_gsub
if safe_string.gfind then safe_string.gfind = safe_gmatch end

safe_string.format = function(fmt, ...)
  if not cstack_ok() then error(CSTACK_MSG, 2) end
  return sformat(fmt, ...)
end

-- string.rep appends one copy at a time: millions of small copies in one C
-- call can outlast the time limit. A big result is built from 64 KiB blocks
-- (the same bytes, one C call per step, so the limit can stop it between).
local srep = string.rep
local REP_BLOCK = 65536
safe_string.rep = function(s, n, sep)
  if type(s) == "string" and type(n) == "number" and n > 1 and n == floor(n) and
     n < 2147483648 and (sep == nil or type(sep) == "string") then
    sep = sep or ""
    local unit = #s + #sep
    if unit > 0 and unit < REP_BLOCK and unit * n > 4 * REP_BLOCK then
      local u = s .. sep
      local k = floor(REP_BLOCK / unit)
      -- n copies of s with n-1 separators: (s..sep) n-1 times, then s.
      return srep(srep(u, k), floor((n - 1) / k)) .. srep(u, (n - 1) % k) .. s
    end
  end
  return srep(s, n, sep)
end

local hardened = false
function M.harden(hide)
  local mt = getmetatable("")
  if type(mt) == "table" then
    if not hardened then
      mt.__index = safe_string
      hardened = true
    end
    if hide then mt.__metatable = false end
  end
end

-- Frozen proxies

local original_of = setmetatable({}, { __mode = "k" }) -- proxy -> original
local proxy_of = setmetatable({}, { __mode = "k" })    -- original -> proxy

local function freeze(t, name)
  if type(t) ~= "table" then return t end
  if original_of[t] then return t end
  local p = proxy_of[t]
  if p then return p end
  -- Nested tables are frozen on first read, so no path leads to an original.
  local mt = {
    __index = function(_, k)
      local v = t[k]
      if type(v) == "table" then return freeze(v, name and (name .. "." .. tostring(k))) end
      return v
    end,
    __newindex = function(_, k)
      error("attempt to modify read-only table " .. (name and ("'" .. name .. "' ") or "") ..
            "(field '" .. tostring(k) .. "')", 2)
    end,
    __metatable = false,
  }
  -- Functions and other non-table values are copied into an __index table
  -- for speed (string.find through a proxy must cost one table lookup).
  local flat, nested = {}, false
  for k, v in pairs(t) do
    if type(v) == "table" then nested = true else flat[k] = v end
  end
  if not nested then mt.__index = flat end
  p = setmetatable({}, mt)
  original_of[p] = nested and t or flat
  proxy_of[t] = p
  return p
end
M.freeze = freeze

local function safe_next_iter(orig)
  return function(_, k)
    local nk, v = next(orig, k)
    if type(v) == "table" then v = freeze(v) end
    return nk, v
  end
end

local function sandbox_pairs(t)
  local orig = original_of[t]
  if orig then return safe_next_iter(orig), t, nil end
  return pairs(t)
end

local function sandbox_ipairs(t)
  local orig = original_of[t]
  if orig then
    return function(_, i)
      i = i + 1
      local v = orig[i]
      if v == nil then return nil end
      if type(v) == "table" then v = freeze(v) end
      return i, v
    end, t, 0
  end
  return ipairs(t)
end

local function sandbox_next(t, k)
  local orig = original_of[t]
  if orig then return safe_next_iter(orig)(t, k) end
  return next(t, k)
end

local function sandbox_getmetatable(v)
  -- Only tables: the metatables of strings and views stay out of reach.
  if type(v) ~= "table" then return nil end
  return getmetatable(v)
end

local function sandbox_setmetatable(t, mt)
  if type(t) ~= "table" then
    error("bad argument #1 to 'setmetatable' (table expected, got " .. type(t) .. ")", 2)
  end
  return setmetatable(t, mt)
end

-- Views

-- Field name -> expected type ("string", "number", "integer", "list").
local VIEW_FIELDS = {
  req = { method = "string", path = "string", query = "string", host = "string",
          tenant = "string", ip = "string", user_agent = "string", purposes = "list",
          ai_id = "string", ai_name = "string", user_type = "string", country = "string",
          kind = "string", uri = "string", rpc = "string" },
  offer = { uri = "string", model = "string", amount = "integer", currency = "string",
            purposes = "list", lastmod = "integer", license_url = "string" },
  txn = { id = "string", tenant = "string", amount = "integer", currency = "string",
          ai_id = "string", billing_ref = "string", items = "integer", attempts = "integer",
          reason = "string", network = "string", payer = "string", transaction = "string",
          error = "string", failing_ms = "integer" },
  -- An x402/t402 payment about to be settled (the settle hook).
  sale = { amount = "integer", currency = "string", network = "string", asset = "string",
           payer = "string", scheme = "string" },
}
M.VIEW_FIELDS = VIEW_FIELDS

-- What the gateway can put in a req view (policies/README.md "Views"; the
-- C side: core/pipeline/view.c). Fixtures and the harness are held to it.
local REQ_KINDS = { "http", "connect" }
local RPCS = { "DiscoverResources", "ExecuteTransaction" }
local USER_TYPES = { "commercial", "non-commercial", "education", "government", "personal" }
local PURPOSES = { "all", "ai-all", "ai-train", "ai-input", "ai-index", "search" }
-- From the AI system message of a Connect call: always nil on http.
local CONNECT_ONLY = { "ai_id", "ai_name", "user_type", "country" }
M.REQ_KINDS, M.RPCS, M.USER_TYPES, M.PURPOSES = REQ_KINDS, RPCS, USER_TYPES, PURPOSES

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end
local IS_KIND, IS_RPC = set_of(REQ_KINDS), set_of(RPCS)
local IS_USER_TYPE, IS_PURPOSE = set_of(USER_TYPES), set_of(PURPOSES)
local DEFAULT_PORT = { http = 80, https = 443 }

local function check_field(kind, k, v, want)
  local ok
  if want == "integer" then ok = is_integer(v)
  elseif want == "list" then
    ok = type(v) == "table"
    if ok then
      for i, s in ipairs(v) do
        if type(s) ~= "string" then
          error(sformat("%s.%s[%d]: expected string, got %s", kind, k, i, type(s)), 0)
        end
      end
    end
  else ok = type(v) == want end
  if not ok then
    error(sformat("%s.%s: expected %s, got %s", kind, k, want, show(v)), 0)
  end
end

local function req_error(field, msg)
  error("req." .. field .. ": " .. msg, 0)
end

local function unreserved(c)
  return (c >= 48 and c <= 57) or (c >= 65 and c <= 90) or (c >= 97 and c <= 122) or
    c == 45 or c == 46 or c == 95 or c == 126
end

-- core/net/target.c tg_target_path in Lua: the normal form the gateway
-- gives a path, or nil and what makes the gateway refuse the request.
local function normal_path(p)
  if sbyte(p, 1) ~= 47 then return nil, 'no leading "/"' end
  local out, n, i, len, prev_slash = {}, 0, 1, #p, false
  while i <= len do
    local c, piece = sbyte(p, i), nil
    if c == 37 then -- '%'
      local hex = ssub(p, i + 1, i + 2)
      if not sfind(hex, "^%x%x$") then return nil, "an invalid percent-encoding" end
      local v = tonumber(hex, 16)
      if v == 0 then return nil, "an encoded NUL (%00)" end
      if v == 47 or v == 92 then return nil, "an encoded slash (%2F or %5C)" end
      piece = unreserved(v) and schar(v) or ("%" .. supper(hex))
      i = i + 3
    else
      if c < 0x21 or c > 0x7e then return nil, "a space, control or non-ASCII byte (percent-encode it)" end
      if c == 92 then return nil, "a backslash" end
      if c == 35 then return nil, 'a "#" (a fragment never reaches a hook)' end
      if c == 63 then return nil, 'a "?" (the query goes in req.query, without "?")' end
      piece = schar(c)
      i = i + 1
    end
    if not (piece == "/" and prev_slash) then
      n = n + 1
      out[n] = piece
    end
    prev_slash = piece == "/"
  end
  -- Dot segments (RFC 3986 5.2.4); only the last segment can be empty here.
  local segs, stack = {}, {}
  for seg in sgmatch(ssub(tconcat(out), 2) .. "/", "([^/]*)/") do segs[#segs + 1] = seg end
  for k, seg in ipairs(segs) do
    local last = k == #segs
    if seg == "." then
      if last then stack[#stack + 1] = "" end
    elseif seg == ".." then
      if #stack == 0 then return nil, 'a ".." that climbs above the root' end
      stack[#stack] = nil
      if last then stack[#stack + 1] = "" end
    elseif sfind(seg, "^%.%.?;") then
      return nil, 'a dot segment with parameters (".;" or "..;")'
    else
      stack[#stack + 1] = seg
    end
  end
  return "/" .. tconcat(stack, "/")
end
M.normal_path = normal_path

-- What is wrong with a path a hook is given, or nil.
local function path_problem(p)
  local norm, why = normal_path(p)
  if not norm then return "has " .. why .. ": the gateway refuses such requests, so no hook sees it" end
  if norm ~= p then return "is not in the gateway's normal form: a hook would see " .. show(norm) .. "; write that" end
end

-- core/net/target.c tg_target_host in Lua: the gateway's spelling of a host
-- and its port (or nil), or nil and what makes the gateway refuse it.
local function normal_host(h)
  if h == "" then return nil, "nothing in it" end
  local name, rest
  if sbyte(h, 1) == 91 then -- '['
    local close = sfind(h, "]", 2, true)
    local lit = close and ssub(h, 2, close - 1) or ""
    if not close or not sfind(lit, "^[%x:.]+$") or not sfind(lit, ":", 1, true) then
      return nil, "an invalid IPv6 literal"
    end
    name, rest = "[" .. slower(lit) .. "]", ssub(h, close + 1)
  else
    local colon = sfind(h, ":", 1, true)
    name = colon and ssub(h, 1, colon - 1) or h
    rest = colon and ssub(h, colon) or ""
    if sfind(name, "@", 1, true) then return nil, 'userinfo ("user@")' end
    if not sfind(name, "^[%w%-_.]+$") then return nil, "a character other than letters, digits, '-', '_' and '.'" end
    if sfind(name, "^%.") or sfind(name, "%.%.") then return nil, "an empty label" end
    name = slower(name)
    if sbyte(name, -1) == 46 then name = ssub(name, 1, -2) end
    if #name > 253 then return nil, "more than 253 bytes" end
  end
  local port
  if rest ~= "" then
    local digits = ssub(rest, 2)
    if sfind(digits, "@", 1, true) then return nil, 'userinfo ("user:password@")' end
    if sbyte(rest, 1) ~= 58 then return nil, "something after the host that is not a port" end
    if digits ~= "" then
      if #digits > 5 or not sfind(digits, "^%d+$") then return nil, "an invalid port" end
      port = tonumber(digits)
      if port > 65535 then return nil, "a port out of range" end
      name = name .. ":" .. port
    end
  end
  return name, port
end

local function host_problem(h, scheme)
  local norm, port = normal_host(h)
  if not norm then return "has " .. port .. ": the gateway refuses such requests, so no hook sees it" end
  if port ~= nil and port == DEFAULT_PORT[scheme] then
    return "carries " .. scheme .. "'s default port " .. port .. ", which the gateway drops: write " ..
      show(ssub(norm, 1, #norm - #tostring(port) - 1))
  end
  if norm ~= h then
    return "is not how the gateway writes it (lower-case, no empty port, no trailing dot): write " .. show(norm)
  end
end

local function query_problem(q)
  if sfind(q, "#", 1, true) then
    return 'holds "#": a fragment never reaches the gateway (it refuses such requests); drop it, or write %23'
  end
  if sfind(q, "[^\33-\126]") then
    return "holds a space, control or non-ASCII byte: the gateway refuses such requests; percent-encode it"
  end
end

-- scheme, authority, path, query (nil: no '?') of an absolute http(s) URI
-- as the gateway writes it, or nil and what is wrong with it.
local function split_uri(u)
  local scheme, rest = smatch(u, "^([%a][%w+.%-]*)://(.*)$")
  if not scheme then
    return nil, 'is not an absolute URI: write scheme "://" host path, e.g. "https://example.com/a"'
  end
  if scheme ~= "http" and scheme ~= "https" then
    local l = slower(scheme)
    if l == "http" or l == "https" then
      return nil, "has an upper-case scheme: the gateway writes " .. show(l .. "://" .. rest)
    end
    return nil, "has the scheme " .. show(scheme) .. ': the gateway only produces "http" and "https"'
  end
  local hash = sfind(rest, "#", 1, true)
  if hash then
    return nil, "has a fragment (" .. show(ssub(rest, hash)) .. "): the gateway never passes one; drop it"
  end
  local auth_end = sfind(rest, "[/?]") or #rest + 1
  local auth, tail = ssub(rest, 1, auth_end - 1), ssub(rest, auth_end)
  local userinfo = smatch(auth, "^(.*@)")
  if userinfo then
    return nil, "carries userinfo (" .. show(userinfo) .. "): the gateway refuses such URIs; drop it"
  end
  if auth == "" then return nil, "has no host" end
  local qm = sfind(tail, "?", 1, true)
  local path = qm and ssub(tail, 1, qm - 1) or tail
  local query = qm and ssub(tail, qm + 1) or nil
  if path == "" then
    return nil, "has no path: the gateway writes " ..
      show(scheme .. "://" .. auth .. "/" .. (query and ("?" .. query) or ""))
  end
  return scheme, auth, path, query
end

-- Checks a req given as plain fields (type-checked already) against what
-- the gateway produces, and fills in what it derives. data: the fields;
-- purpose: the shorthand, if given; hdrs: headers as given (name -> value),
-- hmap: the same by lower-case name. Raises "req.<field>: reason".
local function finish_req(data, purpose, hdrs, hmap, opts)
  if purpose ~= nil then
    if data.purposes ~= nil and data.purposes[1] ~= purpose then
      req_error("purpose", show(purpose) .. " disagrees with purposes[1] (" .. show(data.purposes[1]) ..
        "): purpose is the first of purposes; give one or the other")
    end
    if data.purposes == nil then data.purposes = { purpose } end
  end
  if data.purposes == nil then data.purposes = {} end

  local kind = data.kind
  if kind == nil then
    kind = (data.rpc ~= nil or #data.purposes > 0) and "connect" or "http"
    for _, k in ipairs(CONNECT_ONLY) do
      if data[k] ~= nil then kind = "connect" end
    end
    data.kind = kind
  elseif not IS_KIND[kind] then
    req_error("kind", show(kind) .. ' is not a kind the gateway produces: write "http" (a request ' ..
      'for a tenant\'s resource) or "connect" (a Connect call about it)')
  end

  if data.user_type ~= nil and not IS_USER_TYPE[data.user_type] then
    req_error("user_type", "unknown user type " .. show(data.user_type) .. ": write one of " ..
      tconcat(USER_TYPES, ", "))
  end
  for i, p in ipairs(data.purposes) do
    if not IS_PURPOSE[p] then
      local field = (i == 1 and purpose ~= nil and purpose == p) and "purpose" or ("purposes[" .. i .. "]")
      req_error(field, "unknown usage purpose " .. show(p) .. ": write one of " .. tconcat(PURPOSES, ", ") ..
        " (the gateway passes no other)")
    end
  end

  if data.method == nil then data.method = "GET" end
  if kind == "http" then
    for _, k in ipairs(CONNECT_ONLY) do
      if data[k] ~= nil then
        req_error(k, "only Connect calls carry the AI system's identity (ai_id, ai_name, user_type, " ..
          'country, purposes); on kind "http" it is always nil: remove it, or make this a Connect ' ..
          'call (kind = "connect")')
      end
    end
    if #data.purposes > 0 then
      req_error(purpose ~= nil and "purpose" or "purposes", "only Connect calls carry usage purposes " ..
        '(from the AI system); on kind "http" purpose is always nil and purposes empty: remove it, ' ..
        'or make this a Connect call (kind = "connect")')
    end
    if data.rpc ~= nil then
      req_error("rpc", show(data.rpc) .. ' on kind "http": only Connect calls have an rpc (always nil ' ..
        'on http): remove it, or make this a Connect call (kind = "connect")')
    end
    if not sfind(data.method, "^[A-Z][A-Z%-]*$") then
      req_error("method", show(data.method) .. " is not an HTTP method as the gateway spells it: " ..
        "upper-case, e.g. " .. show(supper(data.method)))
    end
  else
    if data.rpc == nil then data.rpc = "DiscoverResources" end
    if not IS_RPC[data.rpc] then
      req_error("rpc", show(data.rpc) .. " is not an RPC whose hooks see a req: write " ..
        '"DiscoverResources" or "ExecuteTransaction"')
    end
    if data.method ~= "GET" then
      req_error("method", show(data.method) .. ' on kind "connect": a Connect call names resources ' ..
        'that are fetched with GET, so method is always "GET" there: remove it, or make this ' ..
        'an HTTP request (kind = "http")')
    end
    if data.user_agent == "" then
      req_error("user_agent", 'never "" on a Connect call: the gateway passes an empty user_agent as nil; remove it')
    end
  end
  for _, k in ipairs(CONNECT_ONLY) do
    if data[k] == "" then
      req_error(k, 'never "": the gateway passes an empty ' .. k .. " as nil; remove it")
    end
  end

  -- The resource: uri, or host + path + query.
  local uri, scheme, u_host, u_path, u_query = data.uri, nil, nil, nil, nil
  if uri ~= nil then
    scheme, u_host, u_path, u_query = split_uri(uri)
    if not scheme then req_error("uri", show(uri) .. " " .. u_host) end
  else
    if data.path == nil then data.path = "/" end
    if data.host ~= nil then scheme = kind == "connect" and "https" or "http" end
  end
  local why
  if data.host ~= nil then
    why = host_problem(data.host, scheme)
    if why then req_error("host", show(data.host) .. " " .. why) end
  end
  if data.path ~= nil then
    why = path_problem(data.path)
    if why then req_error("path", show(data.path) .. " " .. why) end
  end
  if data.query ~= nil then
    why = query_problem(data.query)
    if why then req_error("query", show(data.query) .. " " .. why) end
  end
  if uri ~= nil then
    why = host_problem(u_host, scheme)
    if why then req_error("uri", "the host of " .. show(uri) .. " " .. why) end
    why = path_problem(u_path)
    if why then req_error("uri", "the path of " .. show(uri) .. " " .. why) end
    if u_query ~= nil then
      why = query_problem(u_query)
      if why then req_error("uri", "the query of " .. show(uri) .. " " .. why) end
    end
    local function agree(field, given, derived, part)
      if given ~= nil and given ~= derived then
        req_error(field, show(given) .. " disagrees with uri " .. show(uri) .. " (" .. part .. "): " ..
          "give the uri alone, or make them agree")
      end
    end
    agree("host", data.host, u_host, "whose host is " .. show(u_host))
    agree("path", data.path, u_path, "whose path is " .. show(u_path))
    agree("query", data.query, u_query, u_query and ("whose query is " .. show(u_query)) or 'which has no "?"')
    data.host, data.path, data.query = u_host, u_path, u_query
  elseif data.host ~= nil then
    data.uri = scheme .. "://" .. data.host .. data.path .. (data.query and ("?" .. data.query) or "")
  end

  -- On http, user_agent is the User-Agent header: one implies the other.
  if kind == "http" then
    local h = hmap["user-agent"]
    if data.user_agent ~= nil and h ~= nil and h ~= data.user_agent then
      req_error("user_agent", show(data.user_agent) .. " disagrees with the User-Agent header (" .. show(h) ..
        '): on kind "http" user_agent is that header; give one, or make them agree')
    end
    if data.user_agent == nil then
      data.user_agent = h
    elseif h == nil then
      hdrs["User-Agent"], hmap["user-agent"] = data.user_agent, data.user_agent
    end
  end
  if data.tenant == nil then data.tenant = opts.tenant end
end

local function readonly_error(kind)
  return function(_, k)
    error("attempt to modify read-only view '" .. kind .. "' (field '" .. tostring(k) .. "')", 2)
  end
end

local function make_view(kind, index)
  local mt
  local v
  if newproxy then
    v = newproxy(true)
    mt = getmetatable(v)
  else
    v, mt = {}, {}
    setmetatable(v, mt)
  end
  mt.__index = index
  mt.__newindex = readonly_error(kind)
  mt.__metatable = false
  mt.__tostring = function() return kind end
  return v
end

local function copy_list(l)
  local out = {}
  for i = 1, #l do out[i] = l[i] end
  return out
end

-- The fields of a view from a plain table: data (checked, derived), and for
-- req the headers as given and by lower-case name.
local function view_data(kind, t, opts)
  if t == nil then t = {} end
  if type(t) ~= "table" then error(kind .. ": expected a table, got " .. type(t), 0) end
  local fields = VIEW_FIELDS[kind]
  local data, hdrs, hmap = {}, {}, {}
  for k, v in pairs(t) do
    if kind == "req" and k == "purpose" then
      if type(v) ~= "string" then error("req.purpose: expected string, got " .. show(v), 0) end
    elseif kind == "req" and k == "headers" then
      if type(v) ~= "table" then error("req.headers: expected a table, got " .. type(v), 0) end
      for hk, hv in pairs(v) do
        if type(hk) ~= "string" or type(hv) ~= "string" then
          error("req.headers: names and values must be strings", 0)
        end
        local lk = slower(hk)
        if hmap[lk] ~= nil then
          error("req.headers: two entries name the header " .. show(lk) .. " (names are case-insensitive)", 0)
        end
        hdrs[hk], hmap[lk] = hv, hv
      end
    elseif fields[k] then
      check_field(kind, k, v, fields[k])
      data[k] = fields[k] == "list" and copy_list(v) or v
    else
      error(kind .. ": unknown field '" .. tostring(k) .. "'", 0)
    end
  end
  opts = opts or {}
  if kind == "req" then
    finish_req(data, rawget(t, "purpose"), hdrs, hmap, opts)
  elseif kind == "offer" then
    if data.purposes == nil then data.purposes = {} end
  elseif kind == "txn" then
    if data.tenant == nil then data.tenant = opts.tenant end
  end
  return data, hdrs, hmap
end

local function build_view(kind, t, opts)
  local data, _, headers = view_data(kind, t, opts)
  local self
  local function header(a, b)
    local name = rawequal(a, self) and b or a
    if type(name) ~= "string" then
      error("bad argument to 'header' (string expected, got " .. type(name) .. ")", 2)
    end
    return headers[slower(name)]
  end
  self = make_view(kind, function(_, k)
    if k == "purposes" then return copy_list(data.purposes) end
    if kind == "req" then
      if k == "purpose" then return data.purposes[1] end
      if k == "header" then return header end
    end
    return data[k]
  end)
  return self
end

M.views = {
  req = function(t, opts) return build_view("req", t, opts) end,
  offer = function(t, opts) return build_view("offer", t, opts) end,
  txn = function(t, opts) return build_view("txn", t, opts) end,
  sale = function(t, opts) return build_view("sale", t, opts) end,
}

-- A req as the gateway would hand it over, as a plain table: every field
-- views.req derives filled in (kind, rpc, method, uri or host/path/query,
-- purposes and purpose, the User-Agent header on http), headers under the
-- names given. views.req accepts the result unchanged.
function M.req_table(t, opts)
  local data, hdrs = view_data("req", t, opts)
  local out = {}
  for k, v in pairs(data) do out[k] = v end
  out.purpose = data.purposes[1]
  out.headers = hdrs
  return out
end

-- Return-type rules

local FINISH = {}

function FINISH.skip(v)
  if v == nil or v == false then return true, false end
  if v == true then return true, true end
  return false, "expected boolean, got " .. show(v)
end

function FINISH.rate_limit(key, rate, burst)
  if key == nil then return true end
  if type(key) ~= "string" or #key == 0 or #key > 256 then
    return false, "expected key string (1-256 bytes), got " .. show(key)
  end
  if type(rate) ~= "number" or not (rate > 0) or rate == huge then
    return false, "expected rate number > 0, got " .. show(rate)
  end
  if not is_integer(burst) or burst < 1 or burst > 2147483647 then
    return false, "expected integer burst >= 1, got " .. show(burst)
  end
  return true, key, rate, burst
end

local currency_ok, currency_count = {}, 0 -- codes seen valid (bounded memo)

function FINISH.price(amount, currency)
  if amount == nil then return true end
  if type(amount) ~= "number" or amount ~= floor(amount) or amount < 0 or amount > MAX_INT then
    return false, "expected integer amount, got " .. show(amount)
  end
  if not currency_ok[currency] then
    if type(currency) ~= "string" or #currency > 16 or not sfind(currency, "^[A-Za-z][A-Za-z0-9]*$") then
      return false, "expected currency code, got " .. show(currency)
    end
    if currency_count >= 64 then currency_ok, currency_count = {}, 0 end
    currency_ok[currency] = true
    currency_count = currency_count + 1
  end
  return true, amount, currency
end

function FINISH.on_billing_timeout(v)
  if v == "reject" or v == "deferred" then return true, v end
  return false, 'expected "reject" or "deferred", got ' .. show(v)
end

function FINISH.on_settle_failure()
  return true
end

function FINISH.settle(v)
  if v == "sync" or v == "async" then return true, v end
  return false, 'expected "sync" or "async", got ' .. show(v)
end

M.finish = FINISH

local function check_hook_name(hook)
  if not IS_HOOK[hook] then error("unknown hook '" .. tostring(hook) .. "'", 3) end
end

local function strip_status(ok, ...)
  if ok then return ... end
  return nil, (...)
end

function M.check_result(hook, ...)
  check_hook_name(hook)
  return strip_status(FINISH[hook](...))
end

-- One invoker per hook so the C runtime's hot path does no dispatch by name.
M.invokers = {
  skip = function(fn, req) return FINISH.skip(fn(req)) end,
  rate_limit = function(fn, req) return FINISH.rate_limit(fn(req)) end,
  price = function(fn, offer, req) return FINISH.price(fn(offer, req)) end,
  on_billing_timeout = function(fn, txn) return FINISH.on_billing_timeout(fn(txn)) end,
  on_settle_failure = function(fn, txn) fn(txn) return true end,
  settle = function(fn, req, sale) return FINISH.settle(fn(req, sale)) end,
}

function M.invoke(hook, fn, ...)
  check_hook_name(hook)
  return M.invokers[hook](fn, ...)
end

-- Time bounds in plain Lua (busted); the C runtime has its own.

local lua_deadline -- os.clock() value, or nil when no with_deadline is active

local function lua_guard()
  if lua_deadline and os_clock() > lua_deadline then
    error("policy exceeded its time limit", 0)
  end
end

local finish_deadline, with_deadline

finish_deadline = function(saved, ok, ...)
  local dbg, jit = debug, rawget(_G, "jit")
  dbg.sethook(saved.hook, saved.mask, saved.count)
  lua_deadline = saved.deadline
  if jit and not saved.deadline then jit.on() end
  if not ok then error((...), 0) end
  return ...
end

with_deadline = function(seconds, fn, ...)
  local dbg, jit = rawget(_G, "debug"), rawget(_G, "jit")
  assert(dbg and dbg.sethook, "with_deadline needs the debug library")
  if jit then jit.off() jit.flush() end
  local h, mask, count = dbg.gethook()
  local saved = { deadline = lua_deadline, hook = h, mask = mask, count = count }
  local deadline = os_clock() + seconds
  if lua_deadline and lua_deadline < deadline then deadline = lua_deadline end
  lua_deadline = deadline
  local function hook()
    if os_clock() > deadline then
      -- Not inside our own cleanup: the error must end fn, not escape past it.
      local f = dbg.getinfo(2, "f")
      if f and (f.func == finish_deadline or f.func == with_deadline) then return end
      dbg.sethook(hook, "", 1) -- from now on fire at every instruction
      error("policy exceeded its time limit", 0)
    end
  end
  dbg.sethook(hook, "", 1000)
  return finish_deadline(saved, pcall(fn, ...))
end
M.with_deadline = with_deadline

-- Environment and loading

local contexts = setmetatable({}, { __mode = "k" }) -- policy -> ctx

-- Library functions whose cost in C follows an argument, or that call back
-- into Lua, get wrappers: no single C call may outlast the time limit by much
-- (the hook cannot fire inside one), and none may nest without bound.

-- table.sort runs in C: an array of more than a few elements gets a Lua
-- comparator, so the time limit can stop it between two comparisons.
local tsort = table.sort
local SORT_NATIVE = 64
local function less(a, b) return a < b end
local function safe_sort(t, comp)
  if not cstack_ok() then error(CSTACK_MSG, 2) end
  if comp == nil and type(t) == "table" and #t > SORT_NATIVE then comp = less end
  return tsort(t, comp)
end

-- table.insert(t, pos, v) shifts every element from #t down to pos, however
-- far below 1 pos is: positions are 1..#t+1, as in Lua 5.3.
local tinsert = table.insert
local function safe_insert(...)
  if select("#", ...) == 3 then
    local t, pos = ...
    if type(pos) == "string" then pos = tonumber(pos) end
    if type(t) == "table" and type(pos) == "number" and not (pos >= 1 and pos <= #t + 1) then
      error("bad argument #2 to 'insert' (position out of bounds)", 2)
    end
  end
  return tinsert(...)
end

-- table.concat over a long range is done in blocks, one C call each.
local CONCAT_BLOCK = 16384
local function safe_concat(t, sep, i, j)
  if type(t) == "table" and (sep == nil or type(sep) == "string" or type(sep) == "number") then
    local a = i == nil and 1 or tonumber(i)
    local b = j == nil and #t or tonumber(j)
    if a and b and a == floor(a) and b == floor(b) and b - a >= CONCAT_BLOCK and
       a > -2147483648 and b < 2147483648 then
      local parts, k = {}, a
      while k <= b do
        local e = k + CONCAT_BLOCK - 1
        if e > b then e = b end
        local ok, part = pcall(tconcat, t, sep, k, e)
        if not ok then error(part, 2) end -- "invalid value ... for 'concat'", at the caller
        parts[#parts + 1] = part
        k = e + 1
      end
      return tconcat(parts, sep)
    end
  end
  return tconcat(t, sep, i, j)
end

-- os.time reads the fields of its table from C, through __index: copied
-- here, in Lua, so no metamethod runs on the C stack.
local TIME_FIELDS = { "year", "month", "day", "hour", "min", "sec", "isdst" }
local function safe_time(t)
  if type(t) ~= "table" then return os_time(t) end
  local plain = {}
  for _, k in ipairs(TIME_FIELDS) do plain[k] = t[k] end
  return os_time(plain)
end

local LOG_LEVELS = { debug = true, info = true, warn = true, error = true }

local function make_env(opts, ctx)
  local guard = opts.guard or lua_guard

  local function after(...)
    guard()
    return ...
  end

  local env = {
    assert = assert, error = error, ipairs = sandbox_ipairs, next = sandbox_next,
    pairs = sandbox_pairs, select = select, tonumber = tonumber, tostring = tostring,
    type = type, unpack = unpack, rawequal = rawequal,
    getmetatable = sandbox_getmetatable, setmetatable = sandbox_setmetatable,
    _VERSION = _VERSION,
  }
  -- The message handler runs after the stack unwound, as a plain protected
  -- call: a handler that errors or recurses (xpcall(f, f)) would otherwise
  -- run inside LuaJIT's error machinery, where each nested error costs a C
  -- unwind and a timeout would take minutes to get out. There is no
  -- traceback in the sandbox, so the handler loses nothing it could see.
  local function after_x(h, ok, ...)
    guard()
    if ok then return true, ... end
    return false, select(2, after(pcall(h, (...))))
  end
  env.pcall = function(f, ...) return after(pcall(f, ...)) end
  env.xpcall = function(f, h, ...) return after_x(h, pcall(f, ...)) end

  local string_copy = {}
  for k, v in pairs(safe_string) do string_copy[k] = v end
  env.string = freeze(string_copy, "string")
  local table_copy = {}
  for k, v in pairs(table) do table_copy[k] = v end
  table_copy.sort, table_copy.insert, table_copy.concat = safe_sort, safe_insert, safe_concat
  env.table = freeze(table_copy, "table")
  local math_copy = {}
  for k, v in pairs(math) do math_copy[k] = v end
  env.math = freeze(math_copy, "math")
  -- os.clock of the process would tell a policy how busy the other tenants
  -- keep the gateway: it counts this policy's own time instead.
  local clock = opts.clock
  if clock == nil then
    local base = os_clock()
    clock = function() return os_clock() - base end
  end
  env.os = freeze({ time = safe_time, clock = function() return clock() end, date = os.date,
                    difftime = os.difftime }, "os")

  local log = opts.log
  local now = opts.now or os_time
  env.tollgate = freeze({
    tenant = opts.tenant,
    version = opts.version,
    now = function()
      if ctx.now_override then return ctx.now_override end
      return now()
    end,
    log = function(level, msg)
      if not LOG_LEVELS[level] then
        error("tollgate.log: level must be debug, info, warn or error, got " .. show(level), 2)
      end
      if type(msg) ~= "string" and type(msg) ~= "number" then
        error("tollgate.log: message must be a string, got " .. type(msg), 2)
      end
      msg = tostring(msg)
      if #msg > 1024 then msg = ssub(msg, 1, 1024) .. "..." end
      if log then log(level, msg) end
    end,
  }, "tollgate")

  local modules = opts.modules
  if modules == nil then
    modules = {}
    local req = rawget(_G, "require")
    if req then
      local ok, money = pcall(req, "tollgate.money")
      if ok then modules["tollgate.money"] = money end
    end
  end
  local frozen_modules = {}
  env.require = function(name)
    if type(name) ~= "string" then error("require: module name must be a string", 2) end
    local m = frozen_modules[name]
    if m ~= nil then return m end
    m = modules[name]
    if m == nil then error("module '" .. name .. "' is not allowed in a policy", 2) end
    m = freeze(m, name)
    frozen_modules[name] = m
    return m
  end
  env._G = env
  return env
end

local function display_name(chunkname)
  local c = sbyte(chunkname, 1)
  if c == 64 or c == 61 then return ssub(chunkname, 2) end -- '@' or '='
  return chunkname
end

local FIXTURE_KEYS = { hook = true, req = true, offer = true, txn = true, sale = true,
                       expect = true, error = true, now = true, name = true }

local function validate_fixtures(list)
  if list == nil then return {} end
  if type(list) ~= "table" then return nil, "fixtures must be a list, got " .. type(list) end
  local n = 0
  for k in next, list do
    if not is_integer(k) or k < 1 then return nil, "fixtures must be a list (key " .. show(k) .. ")" end
    n = n + 1
  end
  local out = {}
  for i = 1, n do
    local f = rawget(list, i)
    if type(f) ~= "table" then return nil, "fixture " .. i .. ": expected a table, got " .. type(f) end
    for k in next, f do
      if not FIXTURE_KEYS[k] then return nil, "fixture " .. i .. ": unknown field '" .. tostring(k) .. "'" end
    end
    local hook = rawget(f, "hook")
    if not IS_HOOK[hook] then
      return nil, "fixture " .. i .. ": hook must be one of " .. tconcat(M.HOOKS, ", ") .. ", got " .. show(hook)
    end
    for _, k in ipairs({ "req", "offer", "txn", "sale", "expect" }) do
      local v = rawget(f, k)
      if v ~= nil and type(v) ~= "table" then
        return nil, "fixture " .. i .. ": " .. k .. " must be a table, got " .. type(v)
      end
    end
    local e, now, name = rawget(f, "error"), rawget(f, "now"), rawget(f, "name")
    if e ~= nil and type(e) ~= "string" then return nil, "fixture " .. i .. ": error must be a string" end
    if e ~= nil and rawget(f, "expect") ~= nil then
      return nil, "fixture " .. i .. ": give expect or error, not both"
    end
    if now ~= nil and type(now) ~= "number" then return nil, "fixture " .. i .. ": now must be a number" end
    if name ~= nil and type(name) ~= "string" then return nil, "fixture " .. i .. ": name must be a string" end
    out[i] = f
  end
  return out
end

local function validate_policy(res)
  if type(res) ~= "table" then
    return nil, "the policy must return a table of hooks, got " .. type(res)
  end
  local policy = {}
  for k, v in next, res do
    if IS_HOOK[k] then
      if type(v) ~= "function" then
        return nil, "hook '" .. k .. "' must be a function, got " .. type(v)
      end
      policy[k] = v
    elseif k == "fixtures" then
      -- checked below
    elseif type(k) == "string" and sbyte(k, 1) == 95 then -- '_': the policy's own data
      -- not kept
    else
      return nil, "unknown field '" .. tostring(k) .. "' (hooks are " .. tconcat(M.HOOKS, ", ") ..
        "; fixtures; names starting with '_' are free)"
    end
  end
  local fixtures, err = validate_fixtures(rawget(res, "fixtures"))
  if not fixtures then return nil, err end
  policy.fixtures = fixtures
  return policy
end

function M.load(source, chunkname, opts)
  opts = opts or {}
  chunkname = chunkname or "=policy"
  local name = display_name(chunkname)
  if type(source) ~= "string" then return nil, name .. ": source must be a string" end
  if sbyte(source, 1) == 27 then return nil, name .. ": bytecode chunks are not allowed" end
  M.harden()
  local ctx = { opts = opts, name = name }
  local env = make_env(opts, ctx)
  local fn, err
  if load then
    fn, err = load(source, chunkname, "t", env)
  else
    fn, err = loadstring(source, chunkname)
    if fn then setfenv(fn, env) end
  end
  if not fn then return nil, errstr(err) end
  local ok, res = pcall(fn)
  ;(opts.guard or lua_guard)()
  if not ok then
    local msg = errstr(res)
    if not sfind(msg, name, 1, true) then msg = name .. ": " .. msg end
    return nil, msg
  end
  local policy, verr = validate_policy(res)
  if not policy then return nil, name .. ": " .. verr end
  contexts[policy] = ctx
  return policy
end

function M.call(policy, hook, ...)
  check_hook_name(hook)
  local fn = policy[hook]
  if type(fn) ~= "function" then return false, "policy has no hook '" .. hook .. "'" end
  local function result(ok, ...)
    local ctx = contexts[policy]
    ;((ctx and ctx.opts.guard) or lua_guard)()
    if not ok then return false, errstr((...)) end
    return ...
  end
  return result(pcall(M.invokers[hook], fn, ...))
end

local function show_list(t, n)
  local parts = {}
  for i = 1, n do parts[i] = show(t[i]) end
  return "{" .. tconcat(parts, ", ") .. "}"
end

local function maxn(t)
  local n = 0
  for k in pairs(t) do
    if type(k) == "number" and k > n then n = k end
  end
  return n
end

function M.run_fixtures(policy, opts)
  opts = opts or {}
  local ctx = contexts[policy] or {}
  local guard = opts.guard or (ctx.opts and ctx.opts.guard) or lua_guard
  local view_opts = { tenant = opts.tenant or (ctx.opts and ctx.opts.tenant) }
  for i, f in ipairs(policy.fixtures or {}) do
    local label = "fixture " .. i .. (f.name and (" '" .. f.name .. "'") or "") .. " (" .. f.hook .. ")"
    local fn = policy[f.hook]
    if not fn then return false, label .. ": the policy has no hook '" .. f.hook .. "'" end
    if opts.on_call then opts.on_call(f.hook, label) end
    local args = {}
    for j, kind in ipairs(HOOK_ARGS[f.hook]) do
      local ok, v = pcall(build_view, kind, f[kind], view_opts)
      if not ok then return false, label .. ": " .. errstr(v) end
      args[j] = v
    end
    ctx.now_override = f.now
    local r = { pcall(M.invokers[f.hook], fn, args[1], args[2]) }
    ctx.now_override = nil
    guard()
    if not r[1] then
      local msg = errstr(r[2])
      if not f.error then return false, label .. ": " .. msg end
      if not sfind(msg, f.error, 1, true) then
        return false, label .. ": expected an error containing " .. show(f.error) .. ", got " .. show(msg)
      end
    elseif not r[2] then
      local msg = r[3]
      if not f.error then return false, label .. ": " .. msg end
      if not sfind(msg, f.error, 1, true) then
        return false, label .. ": expected an error containing " .. show(f.error) .. ", got " .. show(msg)
      end
    elseif f.error then
      return false, label .. ": expected an error containing " .. show(f.error) .. ", got none"
    elseif f.expect then
      local got, n = {}, 0
      for j = 3, maxn(r) do got[j - 2] = r[j] end
      n = maxn(got)
      local en = maxn(f.expect)
      if en > n then n = en end
      for j = 1, n do
        if got[j] ~= f.expect[j] then
          return false, label .. ": expected " .. show_list(f.expect, n) .. ", got " .. show_list(got, n)
        end
      end
    end
  end
  return true
end

return M
