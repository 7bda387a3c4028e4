-- The write-ahead log full: with ledger.wal.capacity_bytes at its minimum
-- (1 MiB, segments of 64 KiB), purchases fill it until ExecuteTransaction
-- answers Connect `unavailable` (503) saying the log is full, with a
-- Retry-After. From then on:
--   - every further purchase is unavailable and charges nothing (balance and
--     holds unchanged, no record added);
--   - DiscoverResources still answers 200 with offers;
--   - a replay of an earlier key returns its stored answer byte for byte
--     (idempotency answers come from memory, no append);
--   - the admin /metrics show the log's gauges and histograms and the
--     refused purchases;
--   - `tollgate wal verify` passes and the log stays within its capacity.
-- Restarted with capacity_bytes = 2 MiB on the same data_dir, purchases work
-- again, and the balance is the funds minus every approved purchase (the
-- buyers' count and the log's totals agree), old keys still replay.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local ACCOUNT = "acct-full"
local FUNDS = 1000000000000 -- a million USD: never the limit here
local PRICE = 1000
local CAPACITY = 1048576
local SEGMENT = 65536
local SOCKETS = 16 -- parallel connections, each pipelining its share

local function body(key, offer)
  return string.format(
    '{"aiSystem":{"id":"full-bot","billingReference":"%s"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
    ACCOUNT, key, offer)
end

-- Sends the requests over SOCKETS connections (request i on connection
-- i mod SOCKETS, all of a connection's requests written at once) and returns
-- the responses in request order.
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

local function discover(gw)
  local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover({ "https://news.example/full/1" }))))
  return res, res.status == 200 and res.body:match('"offers":%[{"id":"([^"]+)"')
end

-- The log as `tollgate wal cat` reads it: records, approved ids, their total.
local function read_log(gw)
  local out, err, rc = h.wal_tool(gw, "cat")
  assert(rc == 0, "wal cat: " .. tostring(rc) .. " " .. err)
  local log = { n = 0, approved = 0, total = 0, ids = {} }
  for line in out:gmatch("[^\n]+") do
    log.n = log.n + 1
    if line:find('"kind":"transaction"', 1, true) then
      local id = line:match('"transaction":{"id":"([^"]+)"')
      assert(not log.ids[id], "transaction " .. tostring(id) .. " is in the log twice")
      log.ids[id] = true
      if line:find('"outcome":"approved"', 1, true) then
        log.approved = log.approved + 1
        log.total = log.total + tonumber(line:match('"totals":%[{"currency":"USD","amount":(%d+)}%]'))
      end
    end
  end
  return log
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

describe("the transaction log full", function()
  local gw, offer
  local approved = {}      -- key -> the 200 answer
  local approved_keys = {}
  local n_approved = 0
  local refused_key
  local seq = 0
  local t0

  local function next_key()
    seq = seq + 1
    return string.format("full-%06d", seq) -- one width: every record the same size
  end

  setup(function()
    t0 = h.now()
    gw = h.start({
      workers = 2,
      tenants = [[{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" },
      signer = { type = "nginx_secure_link", key_file = "news.key" }, billing = { type = "builtin" } },]],
      -- No retention: the log fills and stays full (and the checks read all of it).
      extra = string.format([[ledger = { wal = { capacity_bytes = %d, segment_bytes = %d, retention_bytes = 0, retention_age_s = 0 },
    accounts = { { billing_reference = %q, amount = %d } } },]], CAPACITY, SEGMENT, ACCOUNT, FUNDS),
      files = { ["news.xml"] = h.rsl({ amount = "0.001" }), ["news.key"] = "log-full-key-" .. h.random_hex(8) .. "\n" },
    })
    assert(h.wait_ready(gw))
    local res
    res, offer = discover(gw)
    assert(offer, "no offer: " .. res.status .. " " .. res.body)
  end)

  teardown(function()
    if gw then
      h.stop(gw)
      if not gw.stop_result[1] or gw.stop_result[2] ~= 0 then
        print("log_full_spec: gateway folder kept: " .. gw.dir)
      end
    end
  end)

  it("fills up: a purchase is then unavailable (503), says the log is full, and has a Retry-After", function()
    local full, rounds = nil, 0
    while not full do
      rounds = rounds + 1
      assert(rounds <= 20, "not full after " .. n_approved .. " purchases")
      local keys, raws = {}, {}
      for i = 1, 400 do
        keys[i] = next_key()
        raws[i] = h.connect_req(h.EXECUTE, "json", body(keys[i], offer))
      end
      -- Within a round, answers come in each connection's order, not the
      -- log's: approvals and refusals mix in the round that fills the log.
      -- Once a round has seen a refusal, the loop ends; the next test checks
      -- that nothing is approved any more.
      local answers = pipelined(gw.port, raws)
      for i, res in ipairs(answers) do
        if res.status == 200 then
          assert(res.body:find('"status":"TRANSACTION_STATUS_APPROVED"', 1, true), keys[i] .. ": " .. res.body)
          approved[keys[i]] = res
          approved_keys[#approved_keys + 1] = keys[i]
          n_approved = n_approved + 1
        else
          assert(res.status == 503, keys[i] .. ": " .. res.status .. " " .. res.body)
          if not full then
            full = { key = keys[i], res = res }
          end
        end
      end
    end
    local res = full.res
    assert.are.equal("unavailable", h.connect_code(res))
    local msg = h.json_decode(res.body).message
    assert(msg:find("transaction log is full", 1, true), msg)
    assert(msg:find("nothing was charged", 1, true), msg)
    assert(tonumber(res.headers["retry-after"]), "no Retry-After: " .. res.head)
    refused_key = full.key
    print(string.format("\nlog_full_spec: full after %d purchases, %.1f s; %s", n_approved, h.now() - t0,
      h.show(res.head .. res.body, 600)))
  end)

  it("then refuses every purchase and charges nothing", function()
    local bal, held = h.balance(gw, ACCOUNT)
    assert.are.equal(FUNDS - n_approved * PRICE, bal)
    assert.are.equal(0, held)
    local before = read_log(gw)
    assert.are.equal(n_approved, before.approved)
    assert.are.equal(n_approved * PRICE, before.total)
    local raws = {}
    for i = 1, 50 do
      raws[i] = h.connect_req(h.EXECUTE, "json", body(next_key(), offer))
    end
    -- a longer key (a larger record) and the key refused first, again
    raws[#raws + 1] = h.connect_req(h.EXECUTE, "json", body("full-" .. string.rep("x", 60), offer))
    raws[#raws + 1] = h.connect_req(h.EXECUTE, "json", body(refused_key, offer))
    for i, res in ipairs(pipelined(gw.port, raws)) do
      assert(res.status == 503 and h.connect_code(res) == "unavailable", "purchase " .. i .. " with the log full: "
        .. res.status .. " " .. res.body)
      assert(res.headers["retry-after"], "purchase " .. i .. ": no Retry-After")
    end
    local after, held2 = h.balance(gw, ACCOUNT)
    assert.are.equal(bal, after)
    assert.are.equal(0, held2)
    assert.are.equal(before.n, read_log(gw).n)
  end)

  it("still answers DiscoverResources with offers", function()
    local res, id = discover(gw)
    assert(res.status == 200 and id, res.status .. " " .. res.body)
  end)

  it("replays an earlier key's answer byte for byte", function()
    local records = read_log(gw).n
    for _, key in ipairs({ approved_keys[1], approved_keys[math.floor(#approved_keys / 2) + 1], approved_keys[#approved_keys] }) do
      local res = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", body(key, offer))))
      assert(res.status == 200, key .. ": " .. res.status .. " " .. res.body)
      assert(res.body == approved[key].body, key .. ": replay\n" .. res.body .. "\nfirst answer\n" .. approved[key].body)
      -- The same request in binary: the stored answer itself, as many bytes
      -- as the log's record holds.
      local pb = h.pb_bytes(1, h.pb_bytes(3, "full-bot") .. h.pb_bytes(7, ACCOUNT)) .. h.pb_bytes(2, key)
        .. h.pb_bytes(3, h.pb_bytes(1, offer))
      local bin = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "proto", pb)))
      assert(bin.status == 200, key .. " in proto: " .. bin.status .. " " .. h.show(bin.body))
      local id = approved[key].body:match('"transactionId":"([^"]+)"')
      local url = approved[key].body:match('"retrievalUrl":"([^"]+)"')
      assert(bin.body:find(id, 1, true) and bin.body:find(url, 1, true), h.show(bin.body, 400))
      local line = h.wal_tool(gw, "cat", "--tx " .. id)
      local stored = tonumber(line:match('"response":{"bytes":(%d+)'))
      assert(stored == #bin.body, key .. ": the log holds a " .. tostring(stored) .. "-byte answer, the replay is "
        .. #bin.body .. " bytes")
    end
    assert.are.equal(FUNDS - n_approved * PRICE, (h.balance(gw, ACCOUNT)))
    assert.are.equal(records, read_log(gw).n)
  end)

  it("shows the log's state in /metrics", function()
    local res = assert(h.admin_get(gw, "/metrics"))
    assert.are.equal(200, res.status)
    local m = res.body
    for _, name in ipairs({ "txlog_wal_pending_bytes", "txlog_wal_pending_records" }) do
      local v = metric(m, name)
      assert(v, name .. " missing from /metrics")
      assert.are.equal(0, v, name .. " with nothing in flight")
    end
    local batches = metric(m, "txlog_fsync_batch_records_count")
    assert(batches and batches > 0, "txlog_fsync_batch_records_count: " .. tostring(batches))
    local records = metric(m, "txlog_fsync_batch_records_sum")
    assert(records and records >= n_approved, "txlog_fsync_batch_records_sum " .. tostring(records) .. " < "
      .. n_approved .. " approved purchases")
    assert(metric(m, "txlog_flush_duration_seconds_count"), "txlog_flush_duration_seconds missing")
    assert.are.equal(n_approved, metric(m, "exchange_transaction_total", '{tenant_id="news",status="approved"}'))
    local errors = metric(m, "exchange_transaction_total", '{tenant_id="news",status="error"}')
    assert(errors and errors >= 53, "refused purchases counted: " .. tostring(errors))
  end)

  it("keeps the log whole and within its capacity", function()
    local out, err, rc = h.wal_tool(gw, "verify")
    assert(rc == 0 and out:find("^ok: "), out .. err)
    local bytes = tonumber(out:match("(%d+) bytes"))
    assert(bytes <= CAPACITY, "the log holds " .. bytes .. " bytes, capacity " .. CAPACITY)
    assert(bytes > CAPACITY - 2 * SEGMENT, "full at " .. bytes .. " bytes of " .. CAPACITY)
    local ls = h.wal_tool(gw, "ls")
    local segs, total = ls:match("total: (%d+) segments?, %d+ records, (%d+) bytes")
    assert(segs, ls)
    assert.are.equal(bytes, tonumber(total))
    -- every segment but the last is full to within one record (~700 bytes)
    local sizes = {}
    for size in ls:gmatch("%.wal%s+%d+%s+%d+%s+(%d+)") do sizes[#sizes + 1] = tonumber(size) end
    assert.are.equal(tonumber(segs), #sizes)
    for i = 1, #sizes - 1 do
      assert(sizes[i] <= SEGMENT and sizes[i] > SEGMENT - 1024, "segment " .. i .. ": " .. sizes[i] .. " bytes\n" .. ls)
    end
    print("log_full_spec: " .. out:gsub("%s+$", "") .. " (capacity " .. CAPACITY .. ")")
  end)

  it("buys again once restarted with 2 MiB, and the balance is the funds minus every approved purchase", function()
    local exited, rc = h.terminate(gw)
    assert(exited and rc == 0, "SIGTERM: " .. tostring(rc) .. "\n" .. gw.log())
    local records = read_log(gw).n
    local config = h.read_file(gw.config)
    local bigger = config:gsub("capacity_bytes = " .. CAPACITY, "capacity_bytes = " .. 2 * CAPACITY)
    assert(bigger ~= config)
    h.write_file(gw.config, bigger)
    h.relaunch(gw)
    assert(h.wait_ready(gw))
    local rec = h.log_lines(gw, "transaction log recovered")[1]
    assert(rec and tonumber(rec.records) == records, gw.log())
    assert.are.equal(0, tonumber(rec.torn_tail_bytes))
    assert.are.equal(FUNDS - n_approved * PRICE, (h.balance(gw, ACCOUNT)))
    -- an old key still replays (rebuilt from the log), then new purchases
    local old = approved_keys[#approved_keys]
    local res = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", body(old, offer))))
    assert(res.status == 200 and res.body == approved[old].body, "replay after restart: " .. res.body)
    local _, fresh = discover(gw)
    local raws = {}
    for i = 1, 100 do
      raws[i] = h.connect_req(h.EXECUTE, "json", body(next_key(), fresh))
    end
    raws[#raws + 1] = h.connect_req(h.EXECUTE, "json", body(refused_key, offer))
    for i, r in ipairs(pipelined(gw.port, raws)) do
      assert(r.status == 200 and r.body:find('"status":"TRANSACTION_STATUS_APPROVED"', 1, true),
        "purchase " .. i .. " after the restart: " .. r.status .. " " .. r.body)
      n_approved = n_approved + 1
    end
    local bal, held = h.balance(gw, ACCOUNT)
    assert.are.equal(FUNDS - n_approved * PRICE, bal)
    assert.are.equal(0, held)
    local log = read_log(gw)
    assert.are.equal(n_approved, log.approved)
    assert.are.equal(FUNDS - log.total, bal)
    print(string.format("log_full_spec: %d purchases in all, %.1f s", n_approved, h.now() - t0))
    local stopped, code = h.terminate(gw)
    assert(stopped and code == 0, gw.log())
    if not os.getenv("TG_E2E_KEEP") then
      os.execute("rm -rf " .. h.sh_quote(gw.dir))
    end
  end)
end)
