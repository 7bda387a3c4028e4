-- A stub x402 facilitator for spec/e2e/paywall_spec.lua: a test double, on
-- purpose. The real facilitator (@x402/evm's, driven in spec/interop against
-- a real chain) cannot be made to misbehave on demand: answer garbage,
-- redirect, stall, refuse a settlement after a good verification. The
-- paywall's handling of those answers is what this stands in for; the
-- happy path against the real facilitator is spec/interop's.
--
--   luajit stub_facilitator.lua PORT MODE RECORD_FILE [TARGET_PORT] [DELAY_S] [WATCH_PID]
--
-- Listens on 127.0.0.1:PORT. GET /supported answers the kinds it "supports"
-- (x402 v1 and v2, t402 v2, scheme exact) in every mode, so the pool's probe
-- sees a healthy facilitator; POST /verify and POST /settle answer per MODE:
--   valid        verify {isValid:true, payer}; settle {success:true,
--                transaction: 0x + 64 hex, network, payer}
--   invalid      verify {isValid:false, invalidReason:"insufficient_funds"}
--   garbage      200 "not json" (text/plain) to both
--   redirect     308, Location: http://127.0.0.1:TARGET_PORT/<same path>
--   slow         as valid, but each answer waits DELAY_S seconds (default 3)
--   slow_settle  as valid, but /settle answers wait DELAY_S seconds
--   settle_fail  verify as valid; settle {success:false,
--                errorReason:"insufficient_funds", transaction:"", network}
--   pending      verify as valid; settle {success:false,
--                errorReason:"settlement_pending", transaction: 0x..., network}
-- Every request is appended to RECORD_FILE as one line:
--   <METHOD> <PATH>\t<body, newlines replaced by spaces>
-- so the spec counts /verify and /settle calls and reads their bodies.
-- Each answer closes its connection (Connection: close). Connections are
-- served concurrently (socket.select), so a slow answer delays no other.
-- Runs until killed, or until process WATCH_PID (the spec's, when given and
-- not 0) is gone: a spec killed before its teardown leaves no stub behind.
local socket = require("socket")

local port, mode, record, target, delay = tonumber(arg[1]), arg[2], arg[3], tonumber(arg[4] or ""), tonumber(arg[5] or "")
local watch = tonumber(arg[6] or "")
assert(port and mode and record, "usage: stub_facilitator.lua PORT MODE RECORD_FILE [TARGET_PORT] [DELAY_S]")
local MODES = { valid = true, invalid = true, garbage = true, redirect = true, slow = true, settle_fail = true,
  pending = true, slow_settle = true }
assert(MODES[mode], "unknown mode " .. mode)
assert(mode ~= "redirect" or target, "redirect needs TARGET_PORT")
delay = delay or 3

local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0)

local function log_request(method, path, body)
  local f = io.open(record, "ab")
  if f then
    f:write(method, " ", path, "\t", (body:gsub("[\r\n]", " ")), "\n")
    f:close()
  end
end

local seq = 0
local function tx_hash()
  seq = seq + 1
  -- 0x + 64 hex: distinct per answer, recognisable in assertions.
  return string.format("0x%016x%016x%016x%016x", port, seq, os.time(), 0xabcdef)
end

-- A JSON string literal (the stub only echoes printable ASCII it read from
-- hex or CAIP-2 fields; anything else is dropped).
local function jstr(s)
  return '"' .. tostring(s or ""):gsub('[^%w%-:_%.]', "") .. '"'
end

-- Fields of the gateway's request body the answers echo: the payer (the
-- authorization's from) and the requirement's network. Plain pattern reads:
-- the stub needs no JSON library.
local function fields(body)
  local from = body:match('"from"%s*:%s*"(0x%x+)"')
  local reqs = body:match('"paymentRequirements"%s*:%s*(%b{})') or ""
  local network = reqs:match('"network"%s*:%s*"([^"]*)"') or ""
  return from, network
end

local function response(status, reason, ctype, body, extra)
  return table.concat({
    "HTTP/1.1 " .. status .. " " .. reason,
    "Content-Type: " .. ctype,
    "Content-Length: " .. #body,
    "Connection: close",
    extra,
  }, "\r\n") .. "\r\n\r\n" .. body
end

local function json(body)
  return response(200, "OK", "application/json", body)
end

local SUPPORTED = '{"kinds":['
  .. '{"x402Version":2,"scheme":"exact","network":"eip155:84532"},'
  .. '{"x402Version":1,"scheme":"exact","network":"base-sepolia"},'
  .. '{"t402Version":2,"scheme":"exact","network":"eip155:84532"}'
  .. '],"extensions":[],"signers":{}}'

-- The answer to one request: the bytes and the seconds to wait before them.
local function answer(method, path, body)
  log_request(method, path, body)
  if method == "GET" and path == "/supported" then
    return json(SUPPORTED), 0
  end
  if method ~= "POST" or (path ~= "/verify" and path ~= "/settle") then
    return response(404, "Not Found", "application/json", '{"error":"not found"}'), 0
  end
  local from, network = fields(body)
  -- payer only when known: a facilitator leaves it out rather than send "".
  local payer = from and (',"payer":' .. jstr(from)) or ""
  local wait = (mode == "slow" or (mode == "slow_settle" and path == "/settle")) and delay or 0
  if mode == "garbage" then
    return response(200, "OK", "text/plain", "not json"), 0
  end
  if mode == "redirect" then
    return response(308, "Permanent Redirect", "application/json", "{}",
      "Location: http://127.0.0.1:" .. target .. path), 0
  end
  if path == "/verify" then
    if mode == "invalid" then
      return json('{"isValid":false,"invalidReason":"insufficient_funds"' .. payer .. "}"), 0
    end
    return json('{"isValid":true' .. payer .. "}"), wait
  end
  if mode == "settle_fail" then
    return json('{"success":false,"errorReason":"insufficient_funds","transaction":"","network":' .. jstr(network)
      .. payer .. "}"), 0
  end
  if mode == "pending" then
    return json('{"success":false,"errorReason":"settlement_pending","transaction":"' .. tx_hash()
      .. '","network":' .. jstr(network) .. payer .. "}"), 0
  end
  return json('{"success":true,"transaction":"' .. tx_hash() .. '","network":' .. jstr(network) .. payer .. "}"),
    wait
end

-- A complete request in buf: method, path, body, or nil (need more bytes),
-- or false (unparsable: the connection is dropped).
local function parse(buf)
  local head_end = buf:find("\r\n\r\n", 1, true)
  if not head_end then
    return nil
  end
  local head = buf:sub(1, head_end - 1)
  local method, path = head:match("^(%u+) (%S+) HTTP/1%.%d")
  if not method then
    return false
  end
  local len = tonumber(head:lower():match("\r\ncontent%-length:%s*(%d+)") or "0")
  if #buf < head_end + 3 + len then
    return nil
  end
  return method, path, buf:sub(head_end + 4, head_end + 3 + len)
end

local conns = {} -- socket -> { buf, out, due }
local next_watch = 0

while true do
  local now = socket.gettime()
  if watch and watch > 0 and now >= next_watch then
    local f = io.open("/proc/" .. watch .. "/stat", "rb")
    if not f then
      os.exit(0)
    end
    f:close()
    next_watch = now + 0.5
  end
  local wait = 0.2
  local readers = { server }
  for c, st in pairs(conns) do
    if st.out then
      if st.due <= now then
        c:settimeout(2)
        c:send(st.out)
        c:close()
        conns[c] = nil
      else
        wait = math.min(wait, st.due - now)
      end
    else
      readers[#readers + 1] = c
    end
  end
  local ready = socket.select(readers, nil, math.max(wait, 0.001))
  for _, c in ipairs(ready) do
    if c == server then
      while true do
        local nc = server:accept()
        if not nc then
          break
        end
        nc:settimeout(0)
        conns[nc] = { buf = "" }
      end
    elseif conns[c] then
      local st = conns[c]
      local data, err, partial = c:receive(65536)
      st.buf = st.buf .. (data or partial or "")
      local method, path, body = parse(st.buf)
      if method then
        local out, secs = answer(method, path, body)
        st.out, st.due = out, socket.gettime() + secs
      elseif method == false or err == "closed" then
        c:close()
        conns[c] = nil
      end
    end
  end
end
