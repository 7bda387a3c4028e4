-- Log shipping (ledger.ship, core/ledger/ship.h) to a real redis-server with
-- its append-only file: purchases under load reach the stream
-- tg:txlog:<instance>; Redis killed (SIGKILL, by pid) under load and started
-- again on the same port and data: the stream holds every record of the log
-- exactly once, in order (entry id "<seq>-1" for seq 1..N, each entry the
-- record the log holds at that sequence), and the backlog drains (/readyz
-- ship lag back to 0). With a 1 MiB log and Redis down long enough, the log
-- fills (retention keeps what is not shipped): purchases get the log-full
-- answer (503 unavailable, Retry-After) and /readyz answers 503 over 90%;
-- once Redis is back, the shipped segments are recycled and purchases go
-- through again. `tollgate wal ls` says what is shipped and pending.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local redisc = require("redisc")

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local ACCOUNT = "acct-ship"
local FUNDS = 1000000000000
local CAPACITY = 1048576
local SEGMENT = 65536
local SOCKETS = 8

local tmpdir = h.tmpdir

local redis_call, stream = redisc.call, redisc.stream

-- ---- purchases ----

local function body(key, offer)
  return string.format(
    '{"aiSystem":{"id":"ship-bot","billingReference":"%s"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
    ACCOUNT, key, offer)
end

-- The requests over SOCKETS connections, pipelined; responses in request order.
local function pipelined(port, raws)
  local conns = {}
  for k = 1, math.min(SOCKETS, #raws) do
    conns[k] = { s = assert(h.connect(port, 20)), idx = {} }
  end
  for i = 1, #raws do
    local c = conns[(i - 1) % #conns + 1]
    c.idx[#c.idx + 1] = i
  end
  for _, c in ipairs(conns) do
    local parts = {}
    for j, i in ipairs(c.idx) do parts[j] = raws[i] end
    assert(h.send(c.s, table.concat(parts)))
  end
  local out = {}
  for _, c in ipairs(conns) do
    for _, i in ipairs(c.idx) do
      local res, err = h.read_response(c.s, 20)
      assert(res, "request " .. i .. ": no answer (" .. tostring(err) .. ")")
      out[i] = res
    end
    c.s:close()
  end
  return out
end

local function readyz(gw)
  local res = assert(h.request(gw.port, h.get_req("/readyz")))
  return res.status, h.json_decode(res.body), res.body
end

local function metric(text, name, labels)
  for line in text:gmatch("[^\n]+") do
    local n, l, v = line:match("^([%w_]+)(%b{}) (%S+)$")
    if not n then
      n, v = line:match("^([%w_]+) (%S+)$")
      l = ""
    end
    if n == name and (labels == nil or l == labels) then
      return tonumber(v)
    end
  end
end

describe("log shipping to Redis", function()
  local gw, redis, rdir, offer, key
  local instance = "ship-e2e-" .. h.random_hex(4)
  local n = 0
  local acked = {} -- transaction ids answered APPROVED

  local function next_key()
    n = n + 1
    return string.format("ship-%06d", n)
  end

  -- count purchases; returns the answers
  local function buy(count)
    local raws, keys = {}, {}
    for i = 1, count do
      keys[i] = next_key()
      raws[i] = h.connect_req(h.EXECUTE, "json", body(keys[i], offer))
    end
    local answers = pipelined(gw.port, raws)
    for _, res in ipairs(answers) do
      local id = res.status == 200 and res.body:find('"status":"TRANSACTION_STATUS_APPROVED"', 1, true)
        and res.body:match('"transactionId":"([^"]+)"')
      if id then acked[#acked + 1] = id end
    end
    return answers
  end

  -- The log as `tollgate wal cat` reads it: first and last seq, seq -> tx id.
  local function read_log()
    local out, err, rc = h.wal_tool(gw, "cat")
    assert(rc == 0, "wal cat: " .. tostring(rc) .. " " .. err)
    local log = { tx = {}, n = 0 }
    for line in out:gmatch("[^\n]+") do
      local seq = tonumber(line:match('^{"seq":(%d+)'))
      assert(seq, line)
      log.first = log.first or seq
      assert(not log.last or seq == log.last + 1, "the log skips from " .. tostring(log.last) .. " to " .. seq)
      log.last = seq
      log.n = log.n + 1
      log.tx[seq] = line:match('"transaction":{"id":"([^"]+)"') or line:match('"transaction_id":"([^"]+)"')
    end
    return log
  end

  -- Waits until the shipper has nothing pending and no lag; returns readyz's ship.
  local function drained(seconds)
    local deadline = h.now() + (seconds or 20)
    local ship
    repeat
      local _, r = readyz(gw)
      ship = r.ship
      assert(ship, "no ship in /readyz")
      if ship.pending == 0 and ship.lag_seconds == 0 then return ship end
      h.sleep(0.1)
    until h.now() > deadline
    error("not drained: " .. require("dkjson").encode(ship))
  end

  -- The stream against the log: entries 1..last, consecutive, each the
  -- record the log holds at its sequence; every approved id in it.
  local function check_stream(log)
    local entries = stream(redis.port, key)
    assert.are.equal(log.last, #entries, "stream length against the log's last sequence")
    for i, e in ipairs(entries) do
      assert(e.seq == i, "entry " .. i .. " has sequence " .. e.seq)
    end
    local checked = 0
    for seq = log.first, log.last do
      local id = log.tx[seq]
      if id then
        assert(entries[seq].rec:find(id, 1, true), "stream entry " .. seq .. " is not the log's record (" .. id .. ")")
        checked = checked + 1
      end
    end
    local ids = {}
    for _, e in ipairs(entries) do
      for id in e.rec:gmatch("tx_[0-9a-z]+") do ids[id] = true end
    end
    for _, id in ipairs(acked) do
      assert(ids[id], "approved transaction " .. id .. " is not in the stream")
    end
    return #entries, checked
  end

  setup(function()
    rdir = tmpdir("ship-redis")
    redis = h.redis_start({ dir = rdir })
    key = "tg:txlog:" .. instance
    gw = h.start({
      workers = 2,
      tenants = [[{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" },
      signer = { type = "nginx_secure_link", key_file = "news.key" }, billing = { type = "builtin" } },]],
      -- A small log; retention keeps ~one segment once a snapshot (every 1000
      -- records) covers the rest, it is shipped, and older than the
      -- idempotency TTL (1 s).
      extra = string.format([[redis = { host = "127.0.0.1", port = %d, timeout_ms = 200 },
  instance = %q,
  ledger = { wal = { capacity_bytes = %d, segment_bytes = %d, retention_bytes = %d, retention_age_s = 0 },
             snapshot_every = 1000, idempotency = { ttl_s = 1 },
             ship = { store = "redis", batch = 256, timeout_ms = 500 },
             accounts = { { billing_reference = %q, amount = %d } } },]], redis.port, instance, CAPACITY, SEGMENT,
        SEGMENT, ACCOUNT, FUNDS),
      files = { ["news.xml"] = h.rsl({ amount = "0.001" }), ["news.key"] = "ship-key-" .. h.random_hex(8) .. "\n" },
    })
    assert(h.wait_ready(gw))
    local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover({ "https://news.example/s/1" }))))
    offer = res.status == 200 and res.body:match('"offers":%[{"id":"([^"]+)"')
    assert(offer, "no offer: " .. res.status .. " " .. res.body)
  end)

  teardown(function()
    if gw then
      h.stop(gw)
      if not gw.stop_result[1] or gw.stop_result[2] ~= 0 then
        print("ship_spec: gateway folder kept: " .. gw.dir)
      end
    end
    h.redis_stop(redis)
    if rdir and not os.getenv("TG_E2E_KEEP") then os.execute("rm -rf " .. h.sh_quote(rdir)) end
  end)

  it("checks ledger.ship in the configuration", function()
    local dir = tmpdir("ship-conf")
    local function check(extra)
      local path = dir .. "/c.lua"
      h.write_file(path, string.format('return { listen = { { host = "127.0.0.1", port = 0 } }, data_dir = "d", %s }',
        extra))
      local out = h.capture(string.format("%s check -c %s 2>&1; echo \"rc=$?\"", h.sh_quote(h.binary()), h.sh_quote(path)))
      return tonumber(out:match("rc=(%d+)")), out
    end
    local redis_section = 'redis = { host = "127.0.0.1", port = 1 }, '
    local cases = {
      { 'ledger = { ship = { store = "redis" } }', "needs a top-level redis" },
      { redis_section .. 'ledger = { ship = { store = "kafka" } }', "not one of none, redis" },
      { redis_section .. 'ledger = { ship = { store = "redis", batch = 0 } }', "batch" },
      { redis_section .. 'ledger = { ship = { store = "redis", batch = 65537 } }', "batch" },
      { redis_section .. 'ledger = { ship = { store = "redis", timeout_ms = 60001 } }', "timeout_ms" },
      { redis_section .. 'ledger = { ship = { store = "redis", bogus = 1 } }', "bogus" },
    }
    for _, c in ipairs(cases) do
      local rc, out = check(c[1])
      assert(rc == 1 and out:find(c[2], 1, true), c[1] .. ": " .. out)
      assert(out:find("ledger.ship", 1, true), c[1] .. ": the message names ledger.ship: " .. out)
    end
    for _, ok in ipairs({ 'ledger = { ship = { store = "none" } }',
      redis_section .. 'ledger = { ship = { store = "redis", batch = 65536, timeout_ms = 1 } }' }) do
      local rc, out = check(ok)
      assert(rc == 0, ok .. ": " .. out)
    end
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)

  it("ships every record of purchases under load, in order, and reports it in /readyz", function()
    for _ = 1, 3 do
      for i, res in ipairs(buy(100)) do
        assert(res.status == 200 and res.body:find("APPROVED", 1, true), "purchase " .. i .. ": " .. res.status
          .. " " .. res.body)
      end
    end
    local ship = drained()
    local log = read_log()
    assert.are.equal(log.last, ship.shipped_seq)
    local entries, checked = check_stream(log)
    assert(entries >= 301 and checked >= 300, entries .. " entries, " .. checked .. " checked")
    local status, r, raw = readyz(gw)
    assert.are.equal(200, status)
    print("\nship_spec: /readyz " .. raw)
    assert(r.log and r.log.capacity_bytes == CAPACITY and r.log.used_bytes > 0, require("dkjson").encode(r))
    assert(r.log.utilization > 0 and r.log.utilization < 0.9, tostring(r.log.utilization))
    local m = assert(h.admin_get(gw, "/metrics")).body
    assert(metric(m, "txlog_shipped_records_total") >= 301, "txlog_shipped_records_total")
    assert.are.equal(0, metric(m, "txlog_ship_lag_seconds"))
  end)

  it("keeps every record once, in order, when Redis is killed under load and restarted", function()
    local bdir = gw.dir .. "/buyers"
    assert(os.execute("mkdir -p " .. h.sh_quote(bdir)))
    local pids = {}
    for b = 1, 2 do
      local cmd = string.format("luajit %s %d %s %s %s 0.02 >%s 2>&1 </dev/null & echo $!",
        h.sh_quote(HERE .. "buyer.lua"), gw.port, ACCOUNT, "b" .. b, h.sh_quote(bdir), h.sh_quote(bdir .. "/b" .. b .. ".out"))
      pids[b] = tonumber(h.capture(cmd):match("%d+"))
    end
    h.sleep(1)
    h.redis_stop(redis, true)
    h.sleep(2.5)
    local status, r = readyz(gw)
    assert.are.equal(200, status) -- a lag alone is not a reason to take the gateway out
    assert(r.ship.pending > 0 and r.ship.lag_seconds >= 1, require("dkjson").encode(r.ship))
    redis = h.redis_start({ port = redis.port, dir = rdir })
    h.sleep(1)
    h.write_file(bdir .. "/stop", "")
    for _, pid in ipairs(pids) do
      local deadline = h.now() + 10
      while h.proc_alive(pid) and h.now() < deadline do h.sleep(0.02) end
      assert(not h.proc_alive(pid), "buyer " .. pid .. " did not stop")
    end
    local buyers = 0
    for b = 1, 2 do
      for line in (h.read_file(bdir .. "/events.b" .. b) or ""):gmatch("[^\n]+") do
        local id = line:match("^ACK (%S+)")
        if id then
          acked[#acked + 1] = id
          buyers = buyers + 1
        end
      end
    end
    assert(buyers >= 20, "the buyers bought " .. buyers)
    local ship = drained(30)
    local log = read_log()
    assert.are.equal(log.last, ship.shipped_seq)
    local entries = check_stream(log)
    local m = assert(h.admin_get(gw, "/metrics")).body
    local errors = metric(m, "txlog_store_errors_total", '{store="redis"}')
    assert(errors and errors >= 1, "txlog_store_errors_total: " .. tostring(errors))
    print(string.format("\nship_spec: %d entries after the outage (%d bought by the buyers), %d store errors",
      entries, buyers, errors))
  end)

  it("answers log-full while an outage outlasts the capacity, and buys again once shipped and recycled", function()
    h.redis_stop(redis, true)
    local function fill()
      local full, rounds = nil, 0
      while not full do
        rounds = rounds + 1
        assert(rounds <= 20, "not full after " .. rounds .. " rounds")
        for _, res in ipairs(buy(200)) do
          if res.status ~= 200 then
            assert(res.status == 503, res.status .. " " .. res.body)
            full = full or res
          end
        end
      end
      return full
    end
    fill()
    -- Segments shipped before Redis went down may still be recycled (maintenance
    -- runs every 5 s): wait for that, fill again, and from then on nothing goes.
    h.sleep(6)
    local full = fill()
    local first = read_log().first
    assert.are.equal("unavailable", h.connect_code(full))
    assert(h.json_decode(full.body).message:find("transaction log is full", 1, true), full.body)
    assert(tonumber(full.headers["retry-after"]), "no Retry-After: " .. full.head)
    local status, r, raw = readyz(gw)
    assert.are.equal(503, status, raw)
    assert(r.log.utilization > 0.9, raw)
    assert(raw:find("transaction log %d+%% full"), raw)
    assert(r.ship.pending > 0, raw)
    -- Maintenance runs every 5 s: what is not shipped stays, so the log stays full.
    h.sleep(6)
    local still = buy(1)[1]
    assert(still.status == 503 and h.connect_code(still) == "unavailable", still.status .. " " .. still.body)
    assert.are.equal(first, read_log().first, "segments not shipped were recycled")
    redis = h.redis_start({ port = redis.port, dir = rdir })
    local deadline, ok = h.now() + 40, nil
    repeat
      h.sleep(0.5)
      local res = buy(1)[1]
      ok = res.status == 200 and res.body:find("APPROVED", 1, true)
    until ok or h.now() > deadline
    assert(ok, "no purchase approved 40 s after Redis came back:\n" .. gw.log():sub(-3000))
    local answers = buy(50)
    for i, res in ipairs(answers) do
      assert(res.status == 200, "after recycling, purchase " .. i .. ": " .. res.status .. " " .. res.body)
    end
    drained(30)
    status, r, raw = readyz(gw)
    assert.are.equal(200, status, raw)
    assert(r.log.utilization < 0.9, raw)
    local log = read_log()
    assert(log.first > 1, "nothing was recycled: the log starts at " .. log.first)
    local entries = check_stream(log)
    local ls = h.wal_tool(gw, "ls")
    local shipped, pending = ls:match("shipped through seq (%d+), (%d+) records? pending")
    assert(shipped, ls)
    assert(tonumber(shipped) <= log.last and tonumber(shipped) > 0, ls)
    print(string.format("ship_spec: %d entries; the log holds %d..%d", entries, log.first, log.last))
  end)

  it("ships the last records at a clean stop and `tollgate wal` shows nothing pending", function()
    buy(20)
    local exited, rc = h.terminate(gw)
    assert(exited and rc == 0, "SIGTERM: " .. tostring(rc) .. "\n" .. gw.log())
    local log = read_log()
    check_stream(log)
    local out, err, code = h.wal_tool(gw, "ls")
    assert.are.equal(0, code, err)
    assert(out:find("shipped through seq " .. log.last .. ", 0 records pending", 1, true), out)
    out = h.wal_tool(gw, "verify")
    assert(out:find("shipped through seq " .. log.last .. ", 0 records pending", 1, true), out)
    local cat = h.wal_tool(gw, "cat")
    local _, shipped_lines = cat:gsub('"shipped":true', "")
    assert.are.equal(log.n, shipped_lines)
    h.relaunch(gw)
    assert(h.wait_ready(gw))
  end)
end)
