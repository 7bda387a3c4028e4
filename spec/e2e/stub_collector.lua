-- A stand-in for the peers of spec/e2e/tracing_spec.lua, one process on one
-- port: an OTLP/HTTP collector, an RSL origin, and a publisher's billing
-- service (Connect, binary proto) that approves everything. A test double
-- on purpose: what the spec checks is what the gateway sends each of them
-- (the spans, and the traceparent header of each call).
--
--   luajit stub_collector.lua PORT DIR [WATCH_PID]
--
--   POST /v1/traces                        body saved as DIR/export.<n> (raw
--                                          protobuf); 200, empty protobuf
--   GET  /rsl.xml                          DIR/rsl.xml, application/rsl+xml
--   POST /billing.v1.BillingService/Authorize  AuthorizeResponse{approved, hold_id "h1"}
--   POST /billing.v1.BillingService/Capture    CaptureResponse{ok}
--   anything else                          200, empty body
-- Every request is appended to DIR/requests as "<METHOD> <PATH>\t<traceparent or ->".
-- Answers close their connection. Runs until killed, or until WATCH_PID is gone.
local socket = require("socket")

local port, dir, watch = tonumber(arg[1]), arg[2], tonumber(arg[3] or "")
assert(port and dir, "usage: stub_collector.lua PORT DIR [WATCH_PID]")

local server = assert(socket.bind("127.0.0.1", port))
server:settimeout(0.2)

local exports = 0

local function append(name, data, mode)
  local f = assert(io.open(dir .. "/" .. name, mode or "ab"))
  f:write(data)
  f:close()
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function answer(c, status, ctype, body)
  c:send(string.format("HTTP/1.1 %d OK\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
    status, ctype, #body) .. body)
end

local function serve(c)
  c:settimeout(2)
  local line = c:receive("*l")
  if not line then return end
  local method, path = line:match("^(%S+) (%S+)")
  local headers = {}
  while true do
    local l = c:receive("*l")
    if not l or l == "" then break end
    local k, v = l:match("^([^:]+):%s*(.-)%s*$")
    if k then headers[k:lower()] = v end
  end
  local body = ""
  local n = tonumber(headers["content-length"] or "0")
  if n and n > 0 then
    body = c:receive(n) or ""
  end
  append("requests", string.format("%s %s\t%s\n", method, path, headers["traceparent"] or "-"))
  if method == "POST" and path == "/v1/traces" then
    exports = exports + 1
    append("export." .. exports, body, "wb")
    answer(c, 200, "application/x-protobuf", "")
  elseif path == "/rsl.xml" then
    answer(c, 200, "application/rsl+xml", read_file(dir .. "/rsl.xml") or "")
  elseif path == "/billing.v1.BillingService/Authorize" then
    answer(c, 200, "application/proto", "\8\1\18\2h1") -- approved = true, hold_id = "h1"
  elseif path == "/billing.v1.BillingService/Capture" then
    answer(c, 200, "application/proto", "\8\1") -- ok = true
  else
    answer(c, 200, "application/proto", "")
  end
end

while true do
  local c = server:accept()
  if c then
    pcall(serve, c)
    c:close()
  end
  if watch and watch > 0 then
    local f = io.open("/proc/" .. watch .. "/stat")
    if not f then os.exit(0) end
    f:close()
  end
end
