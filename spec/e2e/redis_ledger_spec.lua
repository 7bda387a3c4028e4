-- ledger.mode = "redis" with two gateway instances (A and B, as behind one
-- load balancer: separate data_dirs and ports, the same offer.key) and one
-- real redis-server: opening credits applied once, idempotency keys and
-- balances shared (concurrent duplicates across instances, replays, conflicts,
-- no overspending), fail-closed purchases while Redis is down and recovery
-- after it comes back, top-ups once per reference, and a replay after a
-- restart. core/ledger/prepaid_redis.h and idem.h hold the data model.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local PRICE = 15000
local NEWS_URI = "https://news.example/a/1"
local ACCOUNTS = {
  ["r-open"] = 123456, -- only read: the opening credit, once
  ["r-dup"] = 1000000, -- concurrent duplicates across instances
  ["r-replay"] = 100000, -- A answers, B replays
  ["r-share"] = 5 * PRICE, -- 10 purchases race for 5
  ["r-down"] = 100000, -- Redis stopped and started again
  ["r-topup"] = 1000,
  ["r-restart"] = 100000,
}

local tmpdir = h.tmpdir

local KEYS = tmpdir("rkeys")
h.write_file(KEYS .. "/news.key", "news-secret-" .. h.random_hex(8) .. "\n", "600")
local OFFER_KEY = h.random_hex(32) -- 64 hex digits, shared by A and B

local function gw_opts(redis_port, instance)
  local accts = {}
  local names = {}
  for name in pairs(ACCOUNTS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    accts[#accts + 1] = string.format("{ billing_reference = %q, amount = %d }", name, ACCOUNTS[name])
  end
  return {
    workers = 2,
    tenants = string.format('{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" }, '
      .. 'signer = { type = "nginx_secure_link", base_url = "http://cdn.test", key_file = %q, ttl_s = 600 }, '
      .. 'billing = { type = "builtin" } },', KEYS .. "/news.key"),
    extra = string.format([[redis = { host = "127.0.0.1", port = %d, timeout_ms = 500 },
  instance = %q,
  ledger = { mode = "redis", idempotency = { wait_ms = 3000, pending_ttl_ms = 30000 },
             accounts = { %s } },]], redis_port, instance, table.concat(accts, ", ")),
    files = { ["news.xml"] = h.rsl({ amount = "0.015" }) },
  }
end

local function start_gw(redis_port, instance)
  local gw = h.start_prepared(gw_opts(redis_port, instance), function(dir)
    os.execute("mkdir -p " .. h.sh_quote(dir .. "/data") .. " && chmod 700 " .. h.sh_quote(dir .. "/data"))
    h.write_file(dir .. "/data/offer.key", OFFER_KEY .. "\n", "600")
  end)
  assert(h.wait_ready(gw))
  return gw
end

-- ---- calls ----

local function json_str(s)
  return require("dkjson").encode(s)
end

local function json_exec(ref, key, ids)
  local parts = {}
  for i, id in ipairs(ids) do
    parts[i] = string.format('{"offerId":%s}', json_str(id))
  end
  return string.format('{"aiSystem":{"billingReference":%s},"idempotencyKey":%s,"items":[%s]}', json_str(ref),
    json_str(key), table.concat(parts, ","))
end

local function exec_raw(ref, key, ids)
  return h.connect_req(h.EXECUTE, "json", json_exec(ref, key, ids))
end

local function execute(gw, ref, key, ids, timeout)
  local res, err = h.request(gw.port, exec_raw(ref, key, ids), { timeout = timeout or 10 })
  assert(res, "ExecuteTransaction: " .. tostring(err))
  return res
end

local function discover(gw, uris)
  local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", h.json_discover(uris)), { timeout = 10 }))
  assert.are.equal(200, res.status, res.body)
  local out = {}
  for i, r in ipairs(h.json_decode(res.body).results) do
    assert(r.offers and r.offers[1], "no offer for " .. r.uri .. ": " .. tostring(r.absenceDetail))
    out[i] = r.offers[1].id
  end
  return out
end

local function approved(res)
  assert.are.equal(200, res.status, res.body)
  local a = h.json_decode(res.body)
  assert.are.equal("TRANSACTION_STATUS_APPROVED", a.status, res.body)
  assert.truthy(a.transactionId, res.body)
  return a
end

local function connect_error(res, http_status, code)
  assert.are.equal(http_status, res.status, res.body)
  assert.are.equal(code, h.connect_code(res), res.body)
end

local function balance(gw, ref)
  local bal, held = h.balance(gw, ref)
  assert(bal, held)
  return bal, held
end

-- The balance once no hold is left (captures follow the answers).
local function settled(gw, ref)
  local deadline = h.now() + 3
  local bal, held
  repeat
    bal, held = balance(gw, ref)
    if held == 0 then return bal end
    h.sleep(0.02)
  until h.now() > deadline
  error(string.format("%s: %d still held after 3 s (balance %d)", ref, held, bal))
end

local function key(tag)
  return tag .. "-" .. h.random_hex(8)
end

-- Sends each { gw, raw } on its own connection (all sent before any is
-- read) and returns the responses in order.
local function together(calls, port_of)
  local socks = {}
  for i, c in ipairs(calls) do
    socks[i] = assert(h.connect(port_of and port_of(c) or c[1].port, 10))
  end
  for i, c in ipairs(calls) do
    assert(h.send(socks[i], c[2]))
  end
  local out = {}
  for i = 1, #calls do
    local res, err = h.read_response(socks[i], 15)
    socks[i]:close()
    assert(res, "call " .. i .. ": " .. tostring(err))
    out[i] = res
  end
  return out
end

local function topup(gw, ref, amount, reference)
  return h.admin(gw, "POST", "/ledger/topup",
    string.format('{"account":%s,"amount":%d,"currency":"USD","reference":%s}', json_str(ref), amount,
      json_str(reference)))
end

describe("ledger mode redis, two instances", function()
  local redis, rdir, A, B

  setup(function()
    rdir = tmpdir("redis")
    redis = h.redis_start({ dir = rdir })
    A = start_gw(redis.port, "gw-a")
    B = start_gw(redis.port, "gw-b")
  end)

  teardown(function()
    for _, gw in ipairs({ A, B }) do
      if gw and not gw.stopped then h.stop(gw) end
    end
    h.redis_stop(redis)
    if not os.getenv("TG_E2E_KEEP") then
      if rdir then os.execute("rm -rf " .. h.sh_quote(rdir)) end
      os.execute("rm -rf " .. h.sh_quote(KEYS))
    end
  end)

  it("applies the opening credit once although both instances start with it", function()
    assert.are.equal(ACCOUNTS["r-open"], balance(A, "r-open"))
    assert.are.equal(ACCOUNTS["r-open"], balance(B, "r-open"))
    -- An account nobody credited reads 0 (not an error) in Redis mode.
    assert.are.equal(0, balance(A, "r-nobody"))
  end)

  it("accepts offers of A on B (shared offer.key)", function()
    local id = discover(A, { NEWS_URI })[1]
    local res = execute(B, "r-replay", key("cross"), { id })
    approved(res)
    assert.are.equal(ACCOUNTS["r-replay"] - PRICE, settled(A, "r-replay"))
    ACCOUNTS["r-replay"] = ACCOUNTS["r-replay"] - PRICE
  end)

  it("charges one idempotency key sent to A and B at the same moment once, with one answer", function()
    local id = discover(A, { NEWS_URI })[1]
    local before = balance(A, "r-dup")
    local rounds, waited_out = 6, 0
    for round = 1, rounds do
      local raw = exec_raw("r-dup", key("dup" .. round), { id })
      local res = together({ { A, raw }, { B, raw } })
      local bodies = {}
      for i, r in ipairs(res) do
        if r.status == 200 then
          bodies[#bodies + 1] = r.body
        else
          connect_error(r, 409, "aborted")
          waited_out = waited_out + 1
        end
      end
      assert(#bodies >= 1, "round " .. round .. ": no answer")
      approved({ status = 200, body = bodies[1] })
      if #bodies == 2 then
        assert.are.equal(bodies[1], bodies[2], "round " .. round .. ": the two instances answered differently")
      end
      assert.are.equal(before - round * PRICE, settled(B, "r-dup"), "round " .. round)
    end
    assert.are.equal(0, waited_out, "with wait_ms = 3000 no duplicate should give up waiting")
  end)

  it("replays A's answer on B byte for byte; the key with another body on B is already_exists", function()
    local ids = discover(A, { NEWS_URI, "https://news.example/a/2" })
    local k = key("replay")
    local before = balance(A, "r-replay")
    local first = execute(A, "r-replay", k, { ids[1] })
    approved(first)
    assert.are.equal(before - PRICE, settled(A, "r-replay"))
    local again = execute(B, "r-replay", k, { ids[1] })
    assert.are.equal(200, again.status, again.body)
    assert.are.equal(first.body, again.body)
    assert.are.equal(first.head:match("[Cc]ontent%-[Tt]ype: [^\n]*"), again.head:match("[Cc]ontent%-[Tt]ype: [^\n]*"))
    connect_error(execute(B, "r-replay", k, { ids[2] }), 409, "already_exists")
    connect_error(execute(A, "r-replay", k, { ids[1], ids[2] }), 409, "already_exists")
    assert.are.equal(before - PRICE, settled(B, "r-replay"))
    -- And back on A, still the first answer.
    assert.are.equal(first.body, execute(A, "r-replay", k, { ids[1] }).body)
  end)

  it("shares the money: 10 concurrent purchases (5 per instance) on an account that pays for 5", function()
    local uris = {}
    for i = 1, 10 do uris[i] = "https://news.example/share/" .. i end
    local ids = discover(A, uris)
    assert.are.equal(5 * PRICE, balance(A, "r-share"))
    local calls = {}
    for i = 1, 10 do
      calls[i] = { i % 2 == 1 and A or B, exec_raw("r-share", key("share" .. i), { ids[i] }) }
    end
    local res = together(calls)
    local ok, no = 0, 0
    for i, r in ipairs(res) do
      assert.are.equal(200, r.status, "call " .. i .. ": " .. r.body)
      local a = h.json_decode(r.body)
      if a.status == "TRANSACTION_STATUS_APPROVED" then
        ok = ok + 1
      else
        assert.are.equal("TRANSACTION_STATUS_DENIED", a.status, r.body)
        assert.are.equal("DENIAL_REASON_INSUFFICIENT_FUNDS", a.denialReason, r.body)
        no = no + 1
      end
    end
    assert.are.equal(5, ok, "approved")
    assert.are.equal(5, no, "denied")
    assert.are.equal(0, settled(A, "r-share"))
    local bal, held = balance(B, "r-share")
    assert.are.equal(0, bal)
    assert.are.equal(0, held)
    -- One more is denied, not charged below 0.
    local a = h.json_decode(execute(B, "r-share", key("share-more"), { ids[1] }).body)
    assert.are.equal("DENIAL_REASON_INSUFFICIENT_FUNDS", a.denialReason)
    assert.are.equal(0, balance(A, "r-share"))
  end)

  it("credits a top-up reference once across instances", function()
    local ref = "topup-" .. h.random_hex(4)
    local r1 = topup(A, "r-topup", 500, ref)
    assert.are.equal(200, r1.status, r1.body)
    assert.is_true(h.json_decode(r1.body).applied, r1.body)
    local r2 = topup(B, "r-topup", 500, ref)
    assert.are.equal(200, r2.status, r2.body)
    local j2 = h.json_decode(r2.body)
    assert.is_false(j2.applied, r2.body)
    assert.are.equal(1500, j2.balance, r2.body)
    assert.are.equal(1500, balance(A, "r-topup"))
    -- The same again with both calls in flight together: one applied.
    local ref2 = "topup-" .. h.random_hex(4)
    local body = string.format('{"account":"r-topup","amount":700,"currency":"USD","reference":%s}', json_str(ref2))
    local function raw(gw)
      return table.concat({ "POST /ledger/topup HTTP/1.1", "Host: 127.0.0.1", "Authorization: Bearer " .. gw.token,
        "Content-Type: application/json", "Content-Length: " .. #body }, "\r\n") .. "\r\n\r\n" .. body
    end
    local res = together({ { A, raw(A) }, { B, raw(B) }, { A, raw(A) }, { B, raw(B) } },
      function(c) return c[1].admin_port end)
    local applied = 0
    for _, r in ipairs(res) do
      assert.are.equal(200, r.status, r.body)
      if h.json_decode(r.body).applied then applied = applied + 1 end
    end
    assert.are.equal(1, applied, "answers saying applied:true")
    assert.are.equal(2200, balance(B, "r-topup"))
  end)

  it("answers unavailable promptly while Redis is down, charges nothing, and recovers", function()
    local id = discover(A, { NEWS_URI })[1]
    local before = balance(A, "r-down")
    approved(execute(A, "r-down", key("down-pre"), { id }))
    before = before - PRICE
    assert.are.equal(before, settled(B, "r-down"))

    h.redis_stop(redis, true)
    local k = key("down")
    for _, gw in ipairs({ A, B, A, B }) do
      local t0 = h.now()
      local res = execute(gw, "r-down", k, { id }, 5)
      local took = h.now() - t0
      connect_error(res, 503, "unavailable")
      assert(took < 2, string.format("unavailable took %.2f s", took))
    end
    -- Discovery does not need Redis.
    assert.are.equal(1, #discover(B, { NEWS_URI }))
    -- The balance lives in Redis: the admin says it cannot read it.
    local res = assert(h.admin_get(A, "/ledger/balance?account=r-down"))
    assert.are.equal(503, res.status, res.body)

    redis = h.redis_start({ port = redis.port, dir = rdir })
    local t_up = h.now()
    -- The admin's Redis client reconnects with backoff (up to 2 s).
    local bal, why
    repeat
      bal, why = h.balance(A, "r-down")
      if bal then break end
      h.sleep(0.1)
    until h.now() - t_up > 6
    assert(bal, "no balance 6 s after Redis came back: " .. tostring(why))
    assert.are.equal(before, bal, "the balance survived the Redis restart")
    -- The key that failed while Redis was down is not stuck: it buys once, on either instance.
    local got = {}
    for _, gw in ipairs({ A, B }) do
      local deadline = h.now() + 6
      local r
      repeat
        r = execute(gw, "r-down", k, { id }, 5)
        if r.status == 200 then break end
        connect_error(r, 503, "unavailable")
        h.sleep(0.1)
      until h.now() > deadline
      approved(r)
      got[#got + 1] = r.body
    end
    -- Every worker of both instances back (each connection lands on some
    -- worker): 6 replays in a row answered on each instance.
    for i, gw in ipairs({ A, B }) do
      local deadline, streak = h.now() + 6, 0
      while streak < 6 and h.now() < deadline do
        local r = execute(gw, "r-down", k, { id }, 5)
        if r.status == 200 then
          assert.are.equal(got[1], r.body)
          streak = streak + 1
        else
          connect_error(r, 503, "unavailable")
          streak = 0
          h.sleep(0.1)
        end
      end
      assert.are.equal(6, streak, "instance " .. i .. " not back on every worker")
    end
    print(string.format("redis restart: purchases on both instances again %.2f s after Redis answered PING",
      h.now() - t_up))
    assert.are.equal(got[1], got[2])
    assert.are.equal(before - PRICE, settled(A, "r-down"))
    assert.are.equal(before - PRICE, settled(B, "r-down"))
  end)

  it("replays from Redis after A restarts (SIGTERM)", function()
    local id = discover(A, { NEWS_URI })[1]
    local k = key("restart")
    local first = execute(A, "r-restart", k, { id })
    approved(first)
    local charged = settled(A, "r-restart")
    assert.are.equal(ACCOUNTS["r-restart"] - PRICE, charged)
    local exited, rc = h.stop_keep(A)
    assert(exited and rc == 0, "A's exit on SIGTERM: " .. tostring(rc) .. "\n" .. A.log())
    -- B serves meanwhile, and replays.
    assert.are.equal(first.body, execute(B, "r-restart", k, { id }).body)
    h.relaunch(A)
    assert(h.wait_ready(A))
    assert.are.equal(first.body, execute(A, "r-restart", k, { id }).body)
    -- The opening credit was not applied again at the restart.
    assert.are.equal(charged, balance(A, "r-restart"))
    assert.are.equal(ACCOUNTS["r-open"], balance(A, "r-open"))
    -- And A still sells.
    approved(execute(A, "r-restart", key("restart-new"), { id }))
    assert.are.equal(charged - PRICE, settled(B, "r-restart"))
  end)

  it("both instances exit cleanly on SIGTERM", function()
    h.stop_clean(A)
    h.stop_clean(B)
  end)
end)
