-- wrk as the load generator of the e2e specs: runs in the background, counts
-- answers by status, and reports errors and the slowest answer. Not a spec
-- (no _spec suffix): required by the specs that need load.
local h = require("helpers")

local M = {}

local WRK_COUNT = [[
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) counts = {} end
function response(status, headers, body) counts[status] = (counts[status] or 0) + 1 end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts")
    for k, v in pairs(c) do total[k] = (total[k] or 0) + v end
  end
  local parts = {}
  for k, v in pairs(total) do parts[#parts + 1] = k .. "=" .. v end
  io.write("STATUS " .. table.concat(parts, " ") .. "\n")
  io.write(string.format("ERRORS connect=%d read=%d write=%d timeout=%d status=%d\n",
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.timeout, summary.errors.status))
  io.write(string.format("LATENCY max_us=%d\n", latency.max))
end
]]

-- Starts wrk against 127.0.0.1:port with Host: host for seconds on conns
-- connections; returns the file its summary goes to (read it with result).
function M.wrk_async(dir, port, host, path, seconds, conns)
  local script = dir .. "/count." .. port .. ".lua"
  h.write_file(script, WRK_COUNT .. string.format('wrk.headers["Host"] = %q\n', host))
  local out = dir .. "/wrk." .. port .. "." .. host .. ".out"
  os.execute(string.format("wrk -t2 -c%d -d%ds -s %s http://127.0.0.1:%d%s > %s 2>&1 &",
    conns or 16, seconds, h.sh_quote(script), port, path, h.sh_quote(out)))
  return out
end

-- Waits (at most wait seconds) for the summary of wrk_async: counts by
-- status, errors by kind (and max_latency in us), and the raw text.
function M.wrk_result(out, wait)
  local deadline = h.now() + wait
  local text
  repeat
    h.sleep(0.2)
    text = h.read_file(out) or ""
  until text:find("ERRORS") or h.now() > deadline
  local counts = {}
  for code, n in (text:match("STATUS ([^\n]*)") or ""):gmatch("(%d+)=(%d+)") do
    counts[tonumber(code)] = tonumber(n)
  end
  local errors = {}
  for k, v in (text:match("ERRORS ([^\n]*)") or ""):gmatch("(%a+)=(%d+)") do
    errors[k] = tonumber(v)
  end
  errors.max_latency = tonumber(text:match("LATENCY max_us=(%d+)") or "")
  return counts, errors, text
end

return M
