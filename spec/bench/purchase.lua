-- wrk script for spec/bench/purchase.sh: POSTs one Connect unary call
-- (application/proto) to $BENCH_PATH with the body in $BENCH_BODY, Host
-- $BENCH_HOST (default bench.example), and prints one "BENCHJSON {...}" line
-- at the end (the fields of connect.lua plus the answers it checked),
-- labelled with $BENCH_LABEL (a JSON object's members, no braces).
--
-- $BENCH_PLACEHOLDER (optional): a string inside the body (the idempotency
-- key of an ExecuteTransactionRequest) that every request overwrites with
-- $BENCH_KEY_PREFIX, the wrk thread's number and a per-thread counter,
-- zero-padded to the placeholder's width: the same length, so the protobuf
-- lengths stay right, and every request is a new purchase, never a replay.
-- Without it every request carries the same body (DiscoverResources); both
-- rows build their requests in request() and read their answers in
-- response(), so wrk spends the same per request on both.
--
-- $BENCH_EXPECT: "approved" reads each 200's top-level protobuf fields and
-- counts ExecuteTransactionResponse.status (field 2) APPROVED / other;
-- anything else counts only the statuses. $BENCH_SAMPLE_DIR (optional):
-- each thread writes its first 200 body and its first refused body there
-- (ok-<thread>.bin, bad-<thread>.bin with the status in bad-<thread>.txt).

local function read_file(path)
  local f = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

local path = os.getenv("BENCH_PATH") or "/ramp.v1.ExchangeService/DiscoverResources"
local body = read_file(os.getenv("BENCH_BODY"))
local headers = {
  ["Host"] = os.getenv("BENCH_HOST") or "bench.example",
  ["Content-Type"] = "application/proto",
  ["Connect-Protocol-Version"] = "1",
}
local placeholder = os.getenv("BENCH_PLACEHOLDER") or ""
local prefix = os.getenv("BENCH_KEY_PREFIX") or ""
local expect = os.getenv("BENCH_EXPECT") or ""
local sample_dir = os.getenv("BENCH_SAMPLE_DIR") or ""

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("thread_id", next_id)
  table.insert(threads, thread)
end

-- Per thread (each has its own Lua state).
thread_id = 0
ok200, non200, approved, not_approved = 0, 0, 0, 0
local head, tail, width, counter = nil, nil, 0, 0
local saved_ok, saved_bad = false, false

function init(args)
  if placeholder ~= "" then
    local at = body:find(placeholder, 1, true)
    assert(at, "BENCH_PLACEHOLDER not found in the body")
    head = body:sub(1, at - 1)
    tail = body:sub(at + #placeholder)
    local tag = prefix .. string.format("%02d", thread_id)
    width = #placeholder - #tag
    assert(width >= 8, "placeholder too short for prefix and counter")
    head = head .. tag
  end
end

function request()
  if head == nil then
    return wrk.format("POST", path, headers, body)
  end
  counter = counter + 1
  return wrk.format("POST", path, headers, head .. string.format("%0" .. width .. "d", counter) .. tail)
end

local function save(name, data)
  if sample_dir == "" then return end
  local f = io.open(sample_dir .. "/" .. name, "wb")
  if f then f:write(data); f:close() end
end

-- The varint at position i of s: value, next position (nil on a malformed one).
local function varint(s, i)
  local v, mul = 0, 1
  while i <= #s do
    local b = s:byte(i)
    v = v + (b % 128) * mul
    i = i + 1
    if b < 128 then return v, i end
    mul = mul * 128
  end
  return nil
end

-- ExecuteTransactionResponse.status (field 2, varint); 0 when absent.
local function tx_status(s)
  local i = 1
  while i <= #s do
    local key
    key, i = varint(s, i)
    if key == nil then return -1 end
    local field, wt = math.floor(key / 8), key % 8
    if wt == 0 then
      local v
      v, i = varint(s, i)
      if v == nil then return -1 end
      if field == 2 then return v end
    elseif wt == 2 then
      local n
      n, i = varint(s, i)
      if n == nil then return -1 end
      i = i + n
    elseif wt == 1 then i = i + 8
    elseif wt == 5 then i = i + 4
    else return -1 end
  end
  return 0
end

function response(status, hdrs, resp)
  if status ~= 200 then
    non200 = non200 + 1
    if not saved_bad then
      saved_bad = true
      save("bad-" .. thread_id .. ".bin", resp or "")
      save("bad-" .. thread_id .. ".txt", tostring(status))
    end
    return
  end
  ok200 = ok200 + 1
  if expect == "approved" then
    if tx_status(resp) == 1 then
      approved = approved + 1
    else
      not_approved = not_approved + 1
      if not saved_bad then
        saved_bad = true
        save("bad-" .. thread_id .. ".bin", resp)
        save("bad-" .. thread_id .. ".txt", "200")
      end
    end
  end
  if not saved_ok then
    saved_ok = true
    save("ok-" .. thread_id .. ".bin", resp)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local secs = summary.duration / 1e6
  local n200, nnon, nappr, nnot = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    n200 = n200 + (t:get("ok200") or 0)
    nnon = nnon + (t:get("non200") or 0)
    nappr = nappr + (t:get("approved") or 0)
    nnot = nnot + (t:get("not_approved") or 0)
  end
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_s":%.3f', secs),
    string.format('"rps":%.1f', summary.requests / secs),
    string.format('"bytes":%d', summary.bytes),
    string.format('"p50_us":%d', latency:percentile(50)),
    string.format('"p90_us":%d', latency:percentile(90)),
    string.format('"p99_us":%d', latency:percentile(99)),
    string.format('"p999_us":%d', latency:percentile(99.9)),
    string.format('"mean_us":%.1f', latency.mean),
    string.format('"max_us":%d', latency.max),
    string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
                  e.connect, e.read, e.write, e.status, e.timeout),
    string.format('"status_200":%d,"status_other":%d', n200, nnon),
  }
  if expect == "approved" then
    table.insert(fields, string.format('"approved":%d,"not_approved":%d', nappr, nnot))
  end
  local label = os.getenv("BENCH_LABEL")
  if label and label ~= "" then
    table.insert(fields, 1, label)
  end
  io.write("BENCHJSON {", table.concat(fields, ","), "}\n")
end
