-- wrk script for spec/bench/x402.sh. Prints one "BENCHJSON {...}" line at the end,
-- labelled with $BENCH_LABEL (a JSON object's members, no braces).
--
-- $BENCH_MODE=unpaid (default): GET $BENCH_PATH with Host $BENCH_HOST, no hooks on the
--   answers (wrk parses nothing for Lua, so it costs the same against every server). wrk
--   counts every status above 399 as a "status error": against a paywall all of them
--   should be, so "status_4xx5xx" is printed next to "requests" (the script checks the
--   status of one answer of each server with curl beforehand).
--
-- $BENCH_MODE=paid: the same GET, each request with its own PAYMENT-SIGNATURE header, one
--   per line of $BENCH_PAYMENTS, each sent exactly once: wrk thread t (1-based, of
--   $BENCH_THREADS) sends lines t, t + threads, t + 2 threads, ... Once a thread has sent
--   all of its lines its delay() hook parks every connection (a delay of 10^9 ms), and once
--   all of them are answered it stops (wrk.thread:stop()) and writes
--   $BENCH_DONE_DIR/done-<t>: the shell then ends wrk with SIGINT (wrk's main thread sleeps
--   for the whole -d otherwise). req/s is answers over the time from the first request to
--   the last answer (wrk's own figure divides by -d). 302 answers are counted as served;
--   every other status is counted apart, and each thread's first such answer is written to
--   $BENCH_DONE_DIR/bad-<t>-<status>.txt. Latency percentiles are wrk's, over every answer:
--   a parked connection's wait is not in them (wrk starts a request's clock after its delay).

local mode = os.getenv("BENCH_MODE") or "unpaid"
local path = os.getenv("BENCH_PATH") or "/"
local host = os.getenv("BENCH_HOST") or "bench.example"
local nthreads = tonumber(os.getenv("BENCH_THREADS") or "2")
local done_dir = os.getenv("BENCH_DONE_DIR") or ""

wrk.method = "GET"
wrk.path = path
wrk.headers["Host"] = host

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } x402_timespec_t;
  int clock_gettime(int clock, x402_timespec_t *ts);
]]
local ts = ffi.new("x402_timespec_t")
local function now_us()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}
local next_id = 0
function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

-- Per thread (each has its own Lua state).
thread_id = 0
sent, answered, served, other, reserved = 0, 0, 0, 0, 0
statuses = ""     -- "status=count,..." of the answers that are not 302
t_first, t_last = 0, 0
local payments = {}
local counts = {}
local finished = false

if mode == "paid" then
  function init(args)
    local f = assert(io.open(os.getenv("BENCH_PAYMENTS"), "r"), "cannot open BENCH_PAYMENTS")
    local i = 0
    for line in f:lines() do
      if line ~= "" then
        if i % nthreads == thread_id - 1 then
          payments[#payments + 1] = line
        end
        i = i + 1
      end
    end
    f:close()
  end

  -- wrk calls delay() before each request() of a connection, and the request follows
  -- after a timer: a payment is taken here, so that two connections whose timers are both
  -- running never take the last one twice.
  function delay()
    if reserved >= #payments then
      return 1000000000 -- parked: nothing left to send on this connection
    end
    reserved = reserved + 1
    return 0
  end

  function request()
    if sent >= reserved then
      -- No payment taken by delay(): wrk's own call on the first thread's state at start
      -- (script_verify_request counts the requests in what request() returns; nothing is
      -- sent). An unpaid request, so that no payment is used up by it.
      return wrk.format("GET", path, { ["Host"] = host })
    end
    sent = sent + 1
    if sent == 1 then t_first = now_us() end
    return wrk.format("GET", path, { ["Host"] = host, ["PAYMENT-SIGNATURE"] = payments[sent] })
  end

  local function save(name, data)
    if done_dir == "" then return end
    local f = io.open(done_dir .. "/" .. name, "wb")
    if f then f:write(data); f:close() end
  end

  function response(status, headers, body)
    answered = answered + 1
    if status == 302 then
      served = served + 1
    else
      other = other + 1
      local k = tostring(status)
      if counts[k] == nil then
        counts[k] = 0
        save("bad-" .. thread_id .. "-" .. k .. ".txt", (body or ""))
      end
      counts[k] = counts[k] + 1
      local parts = {}
      for s, n in pairs(counts) do parts[#parts + 1] = s .. "=" .. n end
      statuses = table.concat(parts, ",")
    end
    if answered >= #payments and not finished then
      finished = true
      t_last = now_us()
      save("done-" .. thread_id, tostring(answered) .. "\n")
      wrk.thread:stop()
    end
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"p50_us":%d', latency:percentile(50)),
    string.format('"p90_us":%d', latency:percentile(90)),
    string.format('"p99_us":%d', latency:percentile(99)),
    string.format('"max_us":%d', latency.max),
    string.format('"mean_us":%.1f', latency.mean),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d}',
                  e.connect, e.read, e.write, e.timeout),
    string.format('"status_4xx5xx":%d', e.status),
  }
  if mode == "paid" then
    local t0, t1, nsent, nans, nserved, nother, parts = nil, 0, 0, 0, 0, 0, {}
    for _, t in ipairs(threads) do
      local a, b = t:get("t_first") or 0, t:get("t_last") or 0
      if a > 0 and (t0 == nil or a < t0) then t0 = a end
      if b > t1 then t1 = b end
      nsent = nsent + (t:get("sent") or 0)
      nans = nans + (t:get("answered") or 0)
      nserved = nserved + (t:get("served") or 0)
      nother = nother + (t:get("other") or 0)
      local s = t:get("statuses") or ""
      if s ~= "" then parts[#parts + 1] = s end
    end
    local secs = (t0 and t1 > t0) and (t1 - t0) / 1e6 or summary.duration / 1e6
    table.insert(fields, string.format('"sent":%d,"answered":%d,"served_302":%d,"other":%d', nsent, nans, nserved, nother))
    table.insert(fields, string.format('"other_statuses":"%s"', table.concat(parts, ",")))
    table.insert(fields, string.format('"duration_s":%.3f,"rps":%.1f', secs, nans / secs))
  else
    local secs = summary.duration / 1e6
    table.insert(fields, string.format('"duration_s":%.3f,"rps":%.1f', secs, summary.requests / secs))
  end
  local label = os.getenv("BENCH_LABEL")
  if label and label ~= "" then
    table.insert(fields, 1, label)
  end
  io.write("BENCHJSON {", table.concat(fields, ","), "}\n")
end
