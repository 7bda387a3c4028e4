-- A minimal Redis client for the e2e specs (RESP over luasocket): the log's
-- stream entries are binary, which redis-cli does not print as they are.
-- Not a spec (no _spec suffix).
local h = require("helpers")

local M = {}

local function resp_cmd(args)
  local parts = { "*" .. #args .. "\r\n" }
  for _, a in ipairs(args) do
    a = tostring(a)
    parts[#parts + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return table.concat(parts)
end

local function resp_read(s)
  local line, err = s:receive("*l")
  assert(line, "redis: " .. tostring(err))
  local t, rest = line:sub(1, 1), line:sub(2)
  if t == "+" or t == ":" then
    return t == ":" and tonumber(rest) or rest
  elseif t == "-" then
    error("redis error: " .. rest)
  elseif t == "$" then
    local n = tonumber(rest)
    if n < 0 then return nil end
    local data = assert(s:receive(n + 2))
    return data:sub(1, n)
  elseif t == "*" then
    local n = tonumber(rest)
    if n < 0 then return nil end
    local out = {}
    for i = 1, n do out[i] = resp_read(s) end
    return out
  end
  error("redis: unexpected reply " .. line)
end

function M.call(port, ...)
  local s = assert(h.connect(port, 10))
  assert(h.send(s, resp_cmd({ ... })))
  local r = resp_read(s)
  s:close()
  return r
end

-- The stream: { {seq, payload}, ... } in stream order.
function M.stream(port, key)
  local out = {}
  for _, e in ipairs(M.call(port, "XRANGE", key, "-", "+")) do
    local seq, sub = e[1]:match("^(%d+)%-(%d+)$")
    assert(seq and sub == "1", "entry id " .. tostring(e[1]))
    assert(e[2][1] == "rec", "entry " .. e[1] .. ": field " .. tostring(e[2][1]))
    out[#out + 1] = { seq = tonumber(seq), rec = e[2][2] }
  end
  return out
end


return M
