-- A buyer for crash_spec.lua, run in the background under LuaJIT:
--   luajit buyer.lua PORT ACCOUNT NAME DIR DELAY_S
-- Loops DiscoverResources then ExecuteTransaction (JSON) with a fresh key
-- NAME-<n> each time, and appends one line per outcome to DIR/events.NAME,
-- flushed at once:
--   ACK <transactionId> <key> <amount>   an APPROVED answer received
--   DENIED <key> <reason>                a DENIED answer
--   LOST <key> <offerId>                 sent (or tried), no answer: may or may not be logged
--   ERR <key> <status> <code>            another answer (503 unavailable, ...)
-- Pausing: while DIR/pause exists (holding a number N), the buyer sends
-- nothing and writes N into DIR/paused.NAME once its current request is over.
-- It exits when DIR/stop exists. Connection errors (the gateway is being
-- killed and restarted) are expected: a short sleep, then on.
package.path = (arg[0]:match("^(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local port, account, name, dir, delay = tonumber(arg[1]), arg[2], arg[3], arg[4], tonumber(arg[5] or "0")
assert(port and account and name and dir, "usage: buyer.lua PORT ACCOUNT NAME DIR DELAY_S")

local events = assert(io.open(dir .. "/events." .. name, "a"))
local function event(line)
  events:write(line, "\n")
  events:flush()
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

local n = 0
local n_uri = 0
while not exists(dir .. "/stop") do
  local pause = h.read_file(dir .. "/pause")
  if pause then
    h.write_file(dir .. "/paused." .. name .. ".tmp", pause)
    os.rename(dir .. "/paused." .. name .. ".tmp", dir .. "/paused." .. name)
    while exists(dir .. "/pause") and not exists(dir .. "/stop") do
      h.sleep(0.005)
    end
  else
    n_uri = n_uri + 1
    local uri = "https://news.example/" .. name .. "/" .. n_uri
    local res = h.request(port, h.connect_req(h.DISCOVER, "json", h.json_discover({ uri })), { timeout = 3 })
    local offer = res and res.status == 200 and res.body:match('"offers":%[{"id":"([^"]+)"')
    if offer then
      n = n + 1
      local key = name .. "-" .. n
      local body = string.format(
        '{"aiSystem":{"id":"crash-bot","billingReference":"%s"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
        account, key, offer)
      local r = h.request(port, h.connect_req(h.EXECUTE, "json", body), { timeout = 5 })
      if not r then
        event("LOST " .. key .. " " .. offer)
      elseif r.status == 200 and r.body:find('"status":"TRANSACTION_STATUS_APPROVED"', 1, true) then
        local id = r.body:match('"transactionId":"([^"]+)"')
        local amount = r.body:match('"totalCost":{"currency":"USD","amount":"(%d+)"}')
        event("ACK " .. tostring(id) .. " " .. key .. " " .. tostring(amount))
      elseif r.status == 200 and r.body:find('"status":"TRANSACTION_STATUS_DENIED"', 1, true) then
        event("DENIED " .. key .. " " .. (r.body:match('"denialReason":"([%w_]+)"') or "?"))
      else
        event("ERR " .. key .. " " .. r.status .. " " .. tostring(h.connect_code(r)))
      end
    else
      h.sleep(0.01) -- down (or restarting): no key spent
    end
    if delay > 0 then
      h.sleep(delay)
    end
  end
end
events:close()
