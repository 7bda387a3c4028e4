-- wrk script for spec/bench/run.sh: POSTs the benchmark's Connect unary call
-- (the protobuf body in $BENCH_BODY) and prints one "BENCHJSON {...}" line at
-- the end, labelled with $BENCH_LABEL (a JSON object's members, no braces).
--
-- With $BENCH_RATE set (requests/s for the whole run, split evenly over
-- $BENCH_THREADS), requests are paced: wrk has no rate control, so delay()
-- hands each request the next free slot of a fixed per-thread schedule.
-- wrk's timers have 1 ms granularity, so slots inside one millisecond go out
-- together: arrivals are bursty at 1 ms, never faster than the target on
-- average, and no slot is skipped while a connection is free.

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.path = "/ramp.v1.ExchangeService/DiscoverResources"
wrk.body = read_file(os.getenv("BENCH_BODY"))
wrk.headers["Host"] = os.getenv("BENCH_HOST") or "bench.example"
wrk.headers["Content-Type"] = "application/proto"
wrk.headers["Connect-Protocol-Version"] = "1"

local rate = tonumber(os.getenv("BENCH_RATE") or "")
if rate and rate > 0 then
  local ffi = require("ffi")
  ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
    int clock_gettime(int clock, bench_timespec_t *ts);
  ]]
  local ts = ffi.new("bench_timespec_t")
  local CLOCK_MONOTONIC = 1
  local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
  end
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  local interval = 1000 * threads / rate -- ms between two requests of this thread
  local next_slot = nil

  function delay()
    local now = now_ms()
    -- A schedule that fell behind by more than the timer granularity (all
    -- connections busy) restarts from now instead of firing a catch-up burst.
    if next_slot == nil or next_slot < now - 1 then
      next_slot = now
    end
    local wait = next_slot - now
    next_slot = next_slot + interval
    return math.floor(wait)
  end
end

local function p(latency, q)
  return latency:percentile(q)
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_s":%.3f', secs),
    string.format('"rps":%.1f', summary.requests / secs),
    string.format('"bytes":%d', summary.bytes),
    string.format('"p50_us":%d', p(latency, 50)),
    string.format('"p90_us":%d', p(latency, 90)),
    string.format('"p99_us":%d', p(latency, 99)),
    string.format('"p999_us":%d', p(latency, 99.9)),
    string.format('"mean_us":%.1f', latency.mean),
    string.format('"max_us":%d', latency.max),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                  e.connect, e.read, e.write, e.status, e.timeout),
  }
  if rate then
    table.insert(fields, string.format('"target_rps":%.1f', rate))
  end
  local label = os.getenv("BENCH_LABEL")
  if label and label ~= "" then
    table.insert(fields, 1, label)
  end
  io.write("BENCHJSON {", table.concat(fields, ","), "}\n")
end
