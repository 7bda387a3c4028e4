-- Helpers for the e2e specs: start the real tollgate binary on free loopback
-- ports with a throwaway configuration, talk raw HTTP/1.1 to it over LuaSocket,
-- and stop it. Runs under LuaJIT (busted --lua=luajit).
local socket = require("socket")

local M = {}

M.HOST = "127.0.0.1"
M.TENANT_HOST = "news.example"
M.LIMITS = {
  max_header_bytes = 8192,
  max_body_bytes = 65536,
  header_timeout_ms = 1000,
  body_timeout_ms = 1000,
  idle_timeout_ms = 2000,
}

M.DISCOVER = "/ramp.v1.ExchangeService/DiscoverResources"
M.EXECUTE = "/ramp.v1.ExchangeService/ExecuteTransaction"
M.REPORT = "/ramp.v1.ExchangeService/ReportUsage"

function M.now()
  return socket.gettime()
end

function M.sleep(seconds)
  socket.sleep(seconds)
end

local function sh_quote(s)
  return "'" .. tostring(s):gsub("'", "'\\''") .. "'"
end
M.sh_quote = sh_quote

-- A shell command: true when it exited 0.
function M.sh(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

-- A shell command's standard output.
function M.capture(cmd)
  local p = assert(io.popen(cmd))
  local s = p:read("*a")
  p:close()
  return s
end

local function read_file(path)
  local f = io.open(path, "rb")
  if not f then
    return nil
  end
  local s = f:read("*a")
  f:close()
  return s
end
M.read_file = read_file

local function write_file(path, content, mode)
  local f = assert(io.open(path, "wb"))
  assert(f:write(content))
  f:close()
  if mode then
    os.execute("chmod " .. mode .. " " .. sh_quote(path))
  end
end

-- A port nobody listens on right now: bind port 0, read it back, close.
-- (Another process could take it before the gateway binds; on loopback in a
-- test run that race is rare enough, and start() reports it plainly.)
M.write_file = write_file

-- ---- the suite's log folder and secret registry (spec/e2e/zz_secrets_spec.lua) ----

-- TOLLGATE_LOG_DIR (set by run-suite.sh): every gateway started here logs
-- into it, <its folder's name>.tollgate[.<launch>].log, kept after a clean
-- stop, and every secret the suite hands a gateway is listed, one a line, in
-- its secrets.txt, so the last spec can grep every log line for every one.
M.LOG_DIR = os.getenv("TOLLGATE_LOG_DIR")
if M.LOG_DIR == "" then
  M.LOG_DIR = nil
end

local registered = {}
-- Registers a secret (token, key, password, full billing reference). Strings
-- under 6 bytes are too short to grep for without false alarms: skipped.
function M.secret(value)
  if not M.LOG_DIR or type(value) ~= "string" then
    return
  end
  value = value:gsub("^%s+", ""):gsub("%s+$", "")
  if #value < 6 or registered[value] or value:find("\n") then
    return
  end
  registered[value] = true
  local f = io.open(M.LOG_DIR .. "/secrets.txt", "ab")
  if f then
    f:write(value, "\n")
    f:close()
  end
end

-- The secrets in a secret file's content: the whole of a one-line file, else
-- each line of 16 bytes or more that is not a PEM armor line.
local function secret_content(content)
  if not content then
    return
  end
  local lines = {}
  for line in content:gmatch("[^\r\n]+") do
    lines[#lines + 1] = line
  end
  if #lines == 1 then
    M.secret(lines[1])
  else
    for _, line in ipairs(lines) do
      if #line >= 16 and not line:find("^%-%-%-%-%-") then
        M.secret(line)
      end
    end
  end
end

-- What a configuration in dir hands the gateway: the content of every
-- *_file it names (tokens, keys, passwords), and every billing reference.
local function register_config_secrets(dir, config_path)
  if not M.LOG_DIR then
    return
  end
  local text = read_file(config_path) or ""
  for key, file in text:gmatch("([%w_]+_file)%s*=%s*\"([^\"]+)\"") do
    if key ~= "policy_file" then
      secret_content(read_file(file:sub(1, 1) == "/" and file or (dir .. "/" .. file)))
    end
  end
  for ref in text:gmatch("billing_reference%s*=%s*\"([^\"]+)\"") do
    M.secret(ref)
  end
end
M.register_config_secrets = register_config_secrets

-- Billing references (and ledger accounts) in a JSON request body.
local function register_body_secrets(body)
  if not M.LOG_DIR or not body then
    return
  end
  for _, key in ipairs({ "billingReference", "billing_reference", "account" }) do
    for ref in body:gmatch('"' .. key .. '"%s*:%s*"([^"]+)"') do
      M.secret(ref)
    end
  end
end

-- The log file of a gateway in folder dir, launch n (nil: the first of start()).
local function log_file(dir, n)
  local suffix = n and ("." .. n) or ""
  if M.LOG_DIR then
    return M.LOG_DIR .. "/" .. dir:match("([^/]+)/*$") .. ".tollgate" .. suffix .. ".log"
  end
  return dir .. "/tollgate" .. suffix .. ".log"
end

function M.free_port()
  local s = assert(socket.tcp4())
  assert(s:bind(M.HOST, 0))
  local _, port = s:getsockname()
  s:close()
  return tonumber(port)
end

function M.random_hex(nbytes)
  local f = assert(io.open("/dev/urandom", "rb"))
  local raw = f:read(nbytes)
  f:close()
  return (raw:gsub(".", function(c)
    return string.format("%02x", c:byte())
  end))
end

-- A new folder /tmp/tollgate-e2e-<tag>-XXXXXX (tag default "d"), for a spec's files.
function M.tmpdir(tag)
  local p = assert(io.popen("mktemp -d " .. sh_quote((os.getenv("TMPDIR") or "/tmp") .. "/tollgate-e2e-"
    .. (tag or "d") .. "-XXXXXX")))
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  return dir
end

local function mktemp_dir()
  return M.tmpdir()
end

-- In the suite (TOLLGATE_LOG_DIR) every gateway writes the access log (every
-- error, 5% of the rest: the load specs send 10^5 requests), so the secret
-- grep reads request lines too; a spec that sets its own
-- access_log, or opts.access_log = false, keeps its choice.
local function default_access_log(opts)
  if not M.LOG_DIR or opts.access_log == false or (opts.extra or ""):find("access_log", 1, true) then
    return ""
  end
  local extra = (opts.extra or ""):gsub("%s+$", "")
  local sep = (extra == "" or extra:find("[,;]$")) and "" or ","
  return sep .. "\n  access_log = { sample = 0.05, errors = true },"
end

-- Writes the configuration (format in core/config.h) into dir and returns its
-- path. opts.workers (default 1: one event loop makes "others are served while
-- a slow client trickles" a real check).
function M.write_config(dir, ports, token, opts)
  opts = opts or {}
  M.secret(token)
  write_file(dir .. "/admin.token", token .. "\n", "600")
  os.execute("mkdir -p " .. sh_quote(dir .. "/data"))
  local l = M.LIMITS
  local config = string.format([[
return {
  listen = { { host = %q, port = %d } },
  admin = { host = %q, port = %d, token_file = "admin.token" },
  workers = %d,
  data_dir = "data",
  log_level = "info",
  limits = { max_header_bytes = %d, max_body_bytes = %d,
             header_timeout_ms = %d, body_timeout_ms = %d,
             idle_timeout_ms = %d, shutdown_grace_ms = 2000 },
  tenants = {
    %s
  },
  %s
}
]], M.HOST, ports.public, M.HOST, ports.admin, opts.workers or 1,
    l.max_header_bytes, l.max_body_bytes, l.header_timeout_ms, l.body_timeout_ms,
    l.idle_timeout_ms,
    opts.tenants or string.format("{ name = \"news\", hosts = { %q } },", M.TENANT_HOST),
    (opts.extra or "") .. default_access_log(opts))
  -- Files the configuration refers to (policies), relative to dir.
  for name, content in pairs(opts.files or {}) do
    write_file(dir .. "/" .. name, content)
  end
  local path = dir .. "/tollgate.lua"
  write_file(path, config)
  return path
end

-- An RSL document with one content (url, default "/": every path), for a
-- tenant's catalog file. opts.amount: a decimal string ("0.001" USD is 1000
-- atomic units) in opts.currency (default "USD"), paid by opts.type (default
-- "purchase"); opts.amount = false: a payment without an amount (priced by
-- the policy alone); opts.free: a license without any payment; opts.permits
-- / opts.prohibits: usage tokens; opts.terms: the terms URL; opts.users:
-- permitted user types.
function M.rsl(opts)
  opts = opts or {}
  local license = {}
  if opts.permits then license[#license + 1] = '<permits type="usage">' .. opts.permits .. "</permits>" end
  if opts.users then license[#license + 1] = '<permits type="user">' .. opts.users .. "</permits>" end
  if opts.prohibits then license[#license + 1] = '<prohibits type="usage">' .. opts.prohibits .. "</prohibits>" end
  if not opts.free then
    local amount = opts.amount == false and ""
      or string.format('<amount currency="%s">%s</amount>', opts.currency or "USD", opts.amount or "0.001")
    license[#license + 1] = string.format('<payment type="%s">%s</payment>', opts.type or "purchase", amount)
  end
  return string.format('<?xml version="1.0" encoding="UTF-8"?>\n<rsl xmlns="https://rslstandard.org/rsl">'
    .. '<content url="%s"><license>%s</license>%s</content></rsl>\n', opts.url or "/", table.concat(license),
    opts.terms and ("<terms>" .. opts.terms .. "</terms>") or "")
end

function M.binary()
  local bin = os.getenv("TOLLGATE_BIN")
  assert(bin and bin ~= "", "TOLLGATE_BIN is not set (run through spec/e2e/run-suite.sh)")
  return bin
end

-- State letter of a process from /proc/<pid>/stat, or nil when it is gone.
-- An exited child lingers as a zombie ("Z") until reaped: that counts as exited.
function M.proc_state(pid)
  local stat = read_file("/proc/" .. pid .. "/stat")
  if not stat then
    return nil
  end
  return stat:match("^%d+ %b() (%a)")
end

function M.proc_alive(pid)
  local st = M.proc_state(pid)
  return st ~= nil and st ~= "Z" and st ~= "X"
end

-- Starts the binary in the background. A wrapper shell waits for it and keeps
-- its exit status in a file, so stop() can tell a clean exit from a crash.
-- Returns a gateway table, or raises with the log when it does not come up.
function M.start(opts)
  opts = opts or {}
  local dir = mktemp_dir()
  local gw = {
    dir = dir,
    port = M.free_port(),
    admin_port = M.free_port(),
    token = M.random_hex(16),
  }
  gw.config = M.write_config(dir, { public = gw.port, admin = gw.admin_port }, gw.token, opts)
  register_config_secrets(dir, gw.config)
  gw.log_path = log_file(dir)
  gw.rc_path = dir .. "/exit.rc"
  local cmd = string.format(
    "cd %s && { %s run -c %s >%s 2>&1 </dev/null & pid=$!; echo $pid; wait $pid; echo $? >%s; } &",
    sh_quote(dir), sh_quote(M.binary()), sh_quote(gw.config), sh_quote(gw.log_path),
    sh_quote(gw.rc_path))
  -- The wrapper prints only the pid on popen's pipe; close() waits for the
  -- outer shell, which returns at once (the wrapper runs in the background).
  local p = assert(io.popen(cmd))
  local pid = p:read("*l")
  p:close()
  gw.pid = tonumber(pid)
  assert(gw.pid, "could not start " .. M.binary())

  function gw.log()
    return read_file(gw.log_path) or ""
  end

  local deadline = M.now() + 15
  while true do
    if not M.proc_alive(gw.pid) then
      error("tollgate exited during start-up:\n" .. gw.log())
    end
    local res = M.request(gw.port, M.get_req("/healthz"), { timeout = 1 })
    if res and res.status == 200 then
      break
    end
    if M.now() > deadline then
      M.stop(gw)
      error("tollgate did not answer /healthz within 15 s:\n" .. gw.log())
    end
    M.sleep(0.05)
  end
  return gw
end

-- Waits until /readyz answers 200 (serving, every catalog loaded once):
-- /healthz answers as soon as the listeners are up, before the catalogs.
-- Returns true, or false and the last answer's body.
function M.wait_ready(gw, seconds)
  local deadline = M.now() + (seconds or 10)
  local last
  repeat
    local res = M.request(gw.port, M.get_req("/readyz"), { timeout = 1 })
    if res and res.status == 200 then
      return true
    end
    last = res and res.body
    M.sleep(0.05)
  until M.now() > deadline
  return false, last
end

-- SIGTERM, then waits for the process to exit (SIGKILL after timeout).
-- Returns exited (boolean), the exit status (number, or nil when unknown)
-- and the time taken. The folder is removed after a clean exit unless keep
-- (relaunch() starts a new process on it) or TG_E2E_KEEP.
function M.stop(gw, timeout, keep)
  timeout = timeout or 10
  local t0 = M.now()
  if gw.stopped then
    return gw.stop_result[1], gw.stop_result[2], gw.stop_result[3]
  end
  gw.stopped = true
  os.execute("kill -TERM " .. gw.pid .. " 2>/dev/null")
  local exited = false
  while M.now() - t0 < timeout do
    if not M.proc_alive(gw.pid) then
      exited = true
      break
    end
    M.sleep(0.02)
  end
  if not exited then
    os.execute("kill -KILL " .. gw.pid .. " 2>/dev/null")
  end
  -- The wrapper writes the status once its wait returns.
  local rc
  local t1 = M.now()
  while M.now() - t1 < 3 do
    local s = read_file(gw.rc_path)
    if s and s:match("%d") then
      rc = tonumber(s:match("%d+"))
      break
    end
    M.sleep(0.02)
  end
  local took = M.now() - t0
  gw.stop_result = { exited, rc, took }
  if exited and rc == 0 and not keep and not os.getenv("TG_E2E_KEEP") then
    os.execute("rm -rf " .. sh_quote(gw.dir))
  end
  return exited, rc, took
end

-- Stops gw and asserts it exited 0 on SIGTERM (its log in the message).
function M.stop_clean(gw)
  local exited, rc = M.stop(gw)
  assert(exited, "tollgate did not exit on SIGTERM")
  assert(rc == 0, "tollgate exit status " .. tostring(rc) .. "; log:\n" .. gw.log())
end

-- Raw bytes made readable for an assertion message, cut at max bytes.
function M.show(raw, max)
  max = max or 200
  local s = raw:gsub("\r", "\\r"):gsub("\n", "\\n"):gsub("[%z\1-\8\11\12\14-\31\127-\255]", function(c)
    return string.format("\\x%02x", c:byte())
  end)
  if #s > max then
    s = s:sub(1, max) .. "... (" .. #raw .. " bytes)"
  end
  return s
end

-- ---- raw HTTP ----

function M.get_req(path, headers, host)
  local lines = { "GET " .. path .. " HTTP/1.1", "Host: " .. (host or M.TENANT_HOST) }
  for _, h in ipairs(headers or {}) do
    lines[#lines + 1] = h
  end
  return table.concat(lines, "\r\n") .. "\r\n\r\n"
end

-- A request with a body and a Content-Length. headers: list of "Name: value".
function M.body_req(method, path, headers, body)
  register_body_secrets(body)
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: " .. M.TENANT_HOST }
  for _, h in ipairs(headers or {}) do
    lines[#lines + 1] = h
  end
  lines[#lines + 1] = "Content-Length: " .. #body
  return table.concat(lines, "\r\n") .. "\r\n\r\n" .. body
end

-- A Connect unary POST. ctype "json" or "proto" or a full media type.
function M.connect_req(path, ctype, body, extra)
  local media = ctype == "json" and "application/json"
    or ctype == "proto" and "application/proto" or ctype
  local headers = { "Connect-Protocol-Version: 1" }
  if media then
    headers[#headers + 1] = "Content-Type: " .. media
  end
  for _, h in ipairs(extra or {}) do
    headers[#headers + 1] = h
  end
  return M.body_req("POST", path, headers, body)
end

function M.connect(port, timeout)
  local s = assert(socket.tcp4())
  s:settimeout(timeout or 5)
  local ok, err = s:connect(M.HOST, port)
  if not ok then
    s:close()
    return nil, err
  end
  s:setoption("tcp-nodelay", true)
  return s
end

function M.send(s, data)
  local i = 1
  while i <= #data do
    local n, err, partial = s:send(data, i)
    if not n then
      if partial and partial >= i then
        i = partial + 1
      end
      return nil, err
    end
    i = n + 1
  end
  return true
end

-- Reads one response from s. Returns a table { status, reason, headers
-- (lowercased names), body, raw_head } or nil and the error ("closed",
-- "timeout", ...). 1xx interim answers are skipped.
function M.read_response(s, timeout)
  s:settimeout(timeout or 5)
  while true do
    local line, err = s:receive("*l")
    if not line then
      return nil, err
    end
    local ver, status, reason = line:match("^(HTTP/%d%.%d) (%d%d%d) ?(.*)$")
    if not ver then
      return nil, "bad status line: " .. line
    end
    local res = { status = tonumber(status), reason = reason, headers = {}, head = line .. "\n" }
    while true do
      local h, herr = s:receive("*l")
      if not h then
        return nil, herr
      end
      if h == "" then
        break
      end
      res.head = res.head .. h .. "\n"
      local name, value = h:match("^([^:]+):%s*(.-)%s*$")
      if name then
        res.headers[name:lower()] = value
      end
    end
    if res.status >= 200 then
      local len = tonumber(res.headers["content-length"] or "0")
      if len > 0 then
        local body, berr, partial = s:receive(len)
        if not body then
          return nil, "body: " .. tostring(berr) .. " after " .. #(partial or "") .. " bytes"
        end
        res.body = body
      else
        res.body = ""
      end
      return res
    end
  end
end

-- Sends raw on a fresh connection and reads one response; returns the
-- response (or nil, err) and the still open socket, for checks on what
-- follows. The caller closes the socket.
function M.exchange(port, raw, timeout)
  local s, err = M.connect(port, timeout)
  if not s then
    return nil, err
  end
  local _, serr = M.send(s, raw)
  local res, rerr = M.read_response(s, timeout)
  if not res then
    return nil, rerr or serr, s
  end
  return res, nil, s
end

-- Whatever arrives on s within seconds (without waiting for a close):
-- returns the bytes and "data", "closed", "timeout" or the socket error.
function M.poll_bytes(s, seconds)
  s:settimeout(seconds)
  local data, err, partial = s:receive(65536)
  local got = data or partial or ""
  if data then
    return got, "data"
  end
  if #got > 0 and err == "timeout" then
    return got, "data"
  end
  return got, err
end

-- One request on a fresh connection; returns the response (or nil, err).
function M.request(port, raw, opts)
  opts = opts or {}
  local s, err = M.connect(port, opts.timeout)
  if not s then
    return nil, err
  end
  local ok, serr = M.send(s, raw)
  local res, rerr = M.read_response(s, opts.timeout)
  s:close()
  if not res then
    return nil, rerr or serr
  end
  return res
end

-- Waits until the peer closes or timeout passes. Returns "closed", "timeout"
-- or "reset", the bytes that arrived, and the seconds waited.
function M.wait_close(s, timeout)
  local t0 = M.now()
  local got = {}
  s:settimeout(0.05)
  while M.now() - t0 < timeout do
    local data, err, partial = s:receive(4096)
    local chunk = data or partial
    if chunk and #chunk > 0 then
      got[#got + 1] = chunk
    end
    if err == "closed" then
      return "closed", table.concat(got), M.now() - t0
    elseif err and err ~= "timeout" then
      return "reset", table.concat(got), M.now() - t0
    end
  end
  return "timeout", table.concat(got), M.now() - t0
end

-- The server still serves a normal request on a fresh connection.
function M.alive(port)
  local res, err = M.request(port, M.get_req("/healthz"), { timeout = 3 })
  if not res then
    return false, "no answer to GET /healthz: " .. tostring(err)
  end
  if res.status ~= 200 or res.body ~= "ok\n" then
    return false, "GET /healthz answered " .. res.status .. " " .. res.body
  end
  return true
end

-- ---- message building ----

local function varint(n)
  local out = {}
  repeat
    local b = n % 128
    n = (n - b) / 128
    if n > 0 then
      b = b + 128
    end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end
M.varint = varint

-- A length-delimited field (wire type 2).
function M.pb_bytes(field, data)
  return varint(field * 8 + 2) .. varint(#data) .. data
end

-- DiscoverResourcesRequest { resources = [{ uri = ... }, ...] } in proto.
function M.pb_discover(uris)
  local parts = {}
  for i, uri in ipairs(uris) do
    parts[i] = M.pb_bytes(2, M.pb_bytes(1, uri))
  end
  return table.concat(parts)
end

function M.json_discover(uris)
  local parts = {}
  for i, uri in ipairs(uris) do
    parts[i] = string.format('{"uri":"%s"}', uri)
  end
  return '{"resources":[' .. table.concat(parts, ",") .. "]}"
end

-- Standard base64 (for bodies the test builds; the gateway decodes with mbedTLS).
local b64chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
function M.base64(data, url)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local chars = {}
    for k = 3, 0, -1 do
      local idx = math.floor(n / 64 ^ k) % 64 + 1
      chars[#chars + 1] = b64chars:sub(idx, idx)
    end
    if not b then
      chars[3], chars[4] = "=", "="
    elseif not c then
      chars[4] = "="
    end
    out[#out + 1] = table.concat(chars)
  end
  local s = table.concat(out)
  if url then
    s = s:gsub("+", "-"):gsub("/", "_"):gsub("=", "")
  end
  return s
end

function M.urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c)
    return string.format("%%%02X", c:byte())
  end))
end

-- A JSON body decoded (dkjson, which busted brings), or an assertion failure
-- showing the body: a test that reads a field must first know it is JSON.
function M.json_decode(body)
  local v, pos, err = require("dkjson").decode(body or "", 1, nil)
  assert(v ~= nil and pos == #(body or "") + 1, "not JSON (" .. tostring(err) .. "): " .. M.show(body or "", 300))
  return v
end

-- The Connect error code in a JSON error body, or nil.
function M.connect_code(res)
  return res and res.body and res.body:match('"code"%s*:%s*"([%a_]+)"')
end

-- ---- graceful restarts and admin calls (spec/e2e/purchase_spec.lua) ----

-- Stops gw like stop() (SIGTERM, then waits) but keeps its folder (config,
-- files, data_dir), so relaunch() can start a new process on the same state. Returns exited and
-- the exit status, as stop().
function M.stop_keep(gw, timeout)
  local exited, rc = M.stop(gw, timeout, true)
  return exited, rc
end

-- An admin request (Bearer token) on gw's admin listener; body (a string)
-- makes it carry Content-Length. Returns the response.
function M.admin(gw, method, path, body)
  register_body_secrets(body)
  local lines = { method .. " " .. path .. " HTTP/1.1", "Host: 127.0.0.1", "Authorization: Bearer " .. gw.token }
  if body then
    lines[#lines + 1] = "Content-Type: application/json"
    lines[#lines + 1] = "Content-Length: " .. #body
  elseif method ~= "GET" then
    lines[#lines + 1] = "Content-Length: 0"
  end
  local raw = table.concat(lines, "\r\n") .. "\r\n\r\n" .. (body or "")
  return assert(M.request(gw.admin_port, raw, { timeout = 10 }))
end

-- An int64/uint64 varint field (wire type 0).
function M.pb_varint(field, n)
  return M.varint(field * 8) .. M.varint(n)
end

-- ---- restarts, crashes and the write-ahead log (crash_spec, log_full_spec) ----

-- Starts the binary again for gw (after kill9 or stop), in the same folder
-- with the same configuration file (and so the same data_dir and ports).
-- Each launch logs to its own file, tollgate.<n>.log; gw.log() reads the
-- current one. A port still held a moment after the previous process died is
-- retried for up to 10 s. Returns gw, or raises with the log.
function M.relaunch(gw)
  gw.launches = (gw.launches or 1) + 1
  gw.log_path = log_file(gw.dir, gw.launches)
  register_config_secrets(gw.dir, gw.config)
  gw.rc_path = gw.dir .. "/exit." .. gw.launches .. ".rc"
  gw.stopped, gw.stop_result = nil, nil
  local deadline = M.now() + 10
  while true do
    local cmd = string.format(
      "cd %s && { %s run -c %s >%s 2>&1 </dev/null & pid=$!; echo $pid; wait $pid; echo $? >%s; } 2>/dev/null &",
      sh_quote(gw.dir), sh_quote(M.binary()), sh_quote(gw.config), sh_quote(gw.log_path), sh_quote(gw.rc_path))
    local p = assert(io.popen(cmd))
    gw.pid = tonumber(p:read("*l"))
    p:close()
    assert(gw.pid, "could not start " .. M.binary())
    local up_deadline = M.now() + 15
    local retry = false
    while true do
      if not M.proc_alive(gw.pid) then
        local log = gw.log()
        if log:find("in use", 1, true) and M.now() < deadline then
          retry = true
          break
        end
        error("tollgate exited during start-up (launch " .. gw.launches .. "):\n" .. log)
      end
      local res = M.request(gw.port, M.get_req("/healthz"), { timeout = 1 })
      if res and res.status == 200 then
        return gw
      end
      if M.now() > up_deadline then
        M.stop(gw)
        error("tollgate did not answer /healthz within 15 s (launch " .. gw.launches .. "):\n" .. gw.log())
      end
      M.sleep(0.02)
    end
    if not retry then
      break
    end
    M.sleep(0.1)
  end
end

-- SIGKILL, and waits until the process is gone (and its status written).
-- Returns the seconds it took.
function M.kill9(gw)
  local t0 = M.now()
  os.execute("kill -KILL " .. gw.pid .. " 2>/dev/null")
  while M.proc_alive(gw.pid) and M.now() - t0 < 10 do
    M.sleep(0.005)
  end
  assert(not M.proc_alive(gw.pid), "tollgate pid " .. gw.pid .. " survived SIGKILL")
  while not (read_file(gw.rc_path) or ""):match("%d") and M.now() - t0 < 3 do
    M.sleep(0.005)
  end
  gw.stopped = true
  gw.stop_result = { true, tonumber((read_file(gw.rc_path) or ""):match("%d+")), M.now() - t0 }
  return M.now() - t0
end

-- Runs `tollgate wal <sub> -c <gw.config> [args]`: returns stdout, stderr
-- and the exit status.
function M.wal_tool(gw, sub, args)
  local errf = os.tmpname()
  local p = assert(io.popen(string.format("%s wal %s -c %s %s 2>%s; echo \"rc=$?\"", sh_quote(M.binary()),
    sub, sh_quote(gw.config), args or "", sh_quote(errf))))
  local out = p:read("*a")
  p:close()
  local err = read_file(errf) or ""
  os.remove(errf)
  local rc = tonumber(out:match("rc=(%d+)\n?$"))
  out = out:gsub("rc=%d+\n?$", "")
  return out, err, rc
end

-- GET on the admin listener with the bearer token; the response or nil, err.
function M.admin_get(gw, path)
  return M.request(gw.admin_port, M.get_req(path, { "Authorization: Bearer " .. gw.token }, M.HOST))
end

-- The prepaid balance of account in currency (default USD) from GET
-- /ledger/balance: balance, held (numbers), or nil and the answer.
function M.balance(gw, account, currency)
  local res, err = M.admin_get(gw, "/ledger/balance?account=" .. M.urlencode(account))
  if not res or res.status ~= 200 then
    return nil, res and (res.status .. " " .. res.body) or tostring(err)
  end
  for _, a in ipairs(M.json_decode(res.body).accounts or {}) do
    if a.account == account and a.currency == (currency or "USD") then
      return a.balance, a.held
    end
  end
  return nil, "no " .. account .. " in " .. res.body
end

-- The JSON log lines of the current launch whose msg is msg, decoded.
function M.log_lines(gw, msg)
  local out = {}
  for line in gw.log():gmatch("[^\n]+") do
    if line:find('"msg":"' .. msg .. '"', 1, true) then
      out[#out + 1] = M.json_decode(line)
    end
  end
  return out
end

-- SIGTERM and waits for the exit like stop(), but keeps the folder (for a
-- relaunch). Returns exited and the exit status.
function M.terminate(gw, timeout)
  local exited, rc = M.stop(gw, timeout, true)
  return exited, rc
end

-- ---- several instances on shared state (redis_ledger_spec) ----

-- Like start(), but prepare(dir) runs after the configuration is written and
-- before the process starts, to put files in place (e.g. data/offer.key, which
-- instances behind one load balancer must share). The first launch logs to
-- tollgate.1.log. Returns the gateway table (relaunch/stop/terminate work on it).
function M.start_prepared(opts, prepare)
  opts = opts or {}
  local p = assert(io.popen("mktemp -d " .. sh_quote((os.getenv("TMPDIR") or "/tmp") .. "/tollgate-e2e-XXXXXX")))
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  local gw = { dir = dir, port = M.free_port(), admin_port = M.free_port(), token = M.random_hex(16), launches = 0 }
  gw.config = M.write_config(dir, { public = gw.port, admin = gw.admin_port }, gw.token, opts)
  function gw.log()
    return read_file(gw.log_path) or ""
  end
  if prepare then
    prepare(dir)
  end
  return M.relaunch(gw)
end

-- A redis-server of its own on a free loopback port (or opts.port), its data
-- in opts.dir when given (append-only file, fsync on every write, so a
-- SIGKILL loses nothing); otherwise no persistence. Waits until it answers
-- PING. Returns { pid, port, dir }; stop it with redis_stop.
function M.redis_start(opts)
  opts = opts or {}
  local port = opts.port or M.free_port()
  local persist = opts.dir and string.format("--appendonly yes --appendfsync always --dir %s", sh_quote(opts.dir))
    or "--appendonly no"
  local p = assert(io.popen(string.format(
    "redis-server --port %d --bind 127.0.0.1 --save '' %s --daemonize no >/dev/null 2>&1 & echo $!", port, persist)))
  local pid = tonumber(p:read("*l"))
  p:close()
  assert(pid, "could not start redis-server")
  local deadline = M.now() + 5
  while M.now() < deadline do
    local s = M.connect(port, 0.5)
    if s then
      s:send("PING\r\n")
      s:settimeout(0.5)
      local line = s:receive("*l")
      s:close()
      if line == "+PONG" then
        return { pid = pid, port = port, dir = opts.dir }
      end
    end
    M.sleep(0.02)
  end
  os.execute("kill -KILL " .. pid .. " 2>/dev/null")
  error("redis-server did not answer PING on port " .. port)
end

-- Stops the redis-server of redis_start by its pid (SIGKILL with kill9, else
-- SIGTERM) and waits until it is gone.
function M.redis_stop(r, kill9)
  if not r or not r.pid then
    return
  end
  os.execute("kill -" .. (kill9 and "KILL " or "TERM ") .. r.pid .. " 2>/dev/null")
  local t0 = M.now()
  while M.proc_alive(r.pid) and M.now() - t0 < 10 do
    M.sleep(0.01)
  end
  r.pid = nil
end

return M
