-- kill -9 under load: a gateway with the built-in prepaid ledger is killed
-- ten times at random moments while buyer processes (spec/e2e/buyer.lua)
-- purchase, and restarted each time on the same data_dir and configuration.
-- ExecuteTransaction answers only once the Transaction record is durable
-- (pipeline/purchase.h), so after every restart, with the buyers paused:
--   - every transaction id a buyer saw APPROVED is in the log exactly once,
--     as an approved transaction with that buyer's key;
--   - no transaction id, and no idempotency key of an approved purchase,
--     is in the log twice; each opening credit is there exactly once;
--   - each account's balance (admin GET /ledger/balance) is its opening
--     credit minus the totals of the approved transactions in the log, never
--     negative, nothing held;
--   - the "transaction log recovered" line counts the records `tollgate wal
--     cat` read from the dead gateway's log, and its torn_tail_bytes what
--     was cut: twice the test tears the tail itself (garbage bytes, then a
--     partial frame) and expects exactly those bytes; `wal verify` passes;
--   - a request that got no answer, sent again with the same key, gets the
--     logged answer when its record made it (same id, balance unchanged,
--     no new record), else is a new purchase (or a denial) with one record.
-- acct-crash (500 purchases) runs out during the run: its balance is sampled
-- during the load too and must never go below 0. acct-plenty keeps records
-- flowing once it has.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local PRICE = 1000
local ACCOUNTS = {
  { ref = "acct-crash", funds = 500000, buyers = 2, delay = 0.01 },
  { ref = "acct-plenty", funds = 1000000000, buyers = 2, delay = 0.005 },
}
local KILLS = 10
-- Cycles that tear the tail themselves, after the kill, before the restart.
local TORN = { [2] = "zeros", [4] = "garbage", [6] = "partial segment", [8] = "partial frame" }

-- "acct-crash" is shown as "****rash" by `wal cat`.
local function redacted(ref)
  return "****" .. ref:sub(-4)
end

local sh, capture = h.sh, h.capture

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

local function list(t, max)
  max = max or 20
  local out = {}
  for i = 1, math.min(#t, max) do
    out[i] = tostring(t[i])
  end
  return table.concat(out, ", ") .. (#t > max and (" ... (" .. #t .. " in all)") or "")
end

-- The log as `tollgate wal cat` prints it, indexed. Raises on a line it
-- cannot read.
local function read_log(gw)
  local out, err, rc = h.wal_tool(gw, "cat")
  assert(rc == 0, "wal cat exited " .. tostring(rc) .. ": " .. err)
  local log = {
    n = 0, warn = err, ids = {}, by_id = {}, by_key = {}, credits = {}, ncredits = {}, approved = {},
    n_tx = 0,
  }
  for line in out:gmatch("[^\n]+") do
    log.n = log.n + 1
    log.last_seq = tonumber(line:match('^{"seq":(%d+)'))
    local kind = line:match('^{"seq":%d+,.-"kind":"([%w_]+)"')
    if kind == "transaction" then
      local id = line:match('"transaction":{"id":"([^"]+)"')
      local outcome = line:match('"outcome":"([%w_]+)"')
      local key = line:match('"idempotency_key":"([^"]*)"')
      local ref = line:match('"billing_reference":"([^"]*)"')
      local total = tonumber(line:match('"totals":%[{"currency":"USD","amount":(%-?%d+)}%]'))
      assert(id and outcome and key and ref, "unreadable transaction line: " .. line)
      log.n_tx = log.n_tx + 1
      log.ids[id] = (log.ids[id] or 0) + 1
      local tx = { id = id, outcome = outcome, key = key, ref = ref, total = total or 0 }
      log.by_id[id] = tx
      if outcome == "approved" then
        assert(total, "an approved transaction without a USD total: " .. line)
        log.approved[ref] = (log.approved[ref] or 0) + total
        local ks = log.by_key[key] or {}
        ks[#ks + 1] = id
        log.by_key[key] = ks
      end
    elseif kind == "ledger_change" then
      local ck = line:match('"ledger_change":{"kind":"([%w_]+)"')
      local ref = line:match('"billing_reference":"([^"]*)"')
      local amount = tonumber(line:match('"amount":(%-?%d+)'))
      assert(ck and ref and amount, "unreadable ledger_change line: " .. line)
      if ck == "credit" then
        log.credits[ref] = (log.credits[ref] or 0) + amount
        log.ncredits[ref] = (log.ncredits[ref] or 0) + 1
      end
    else
      assert(kind, "unreadable record line: " .. line)
    end
  end
  return log
end

-- Every buyer's events so far: acks (id -> key), lost keys (key -> offer),
-- counts per kind.
local function read_events(dir, names)
  local ev = { acks = {}, ack_list = {}, lost = {}, lost_list = {}, count = {}, denied = {}, errs = {} }
  for _, name in ipairs(names) do
    for line in (h.read_file(dir .. "/events." .. name) or ""):gmatch("[^\n]+") do
      local what = line:match("^(%u+)")
      ev.count[what] = (ev.count[what] or 0) + 1
      if what == "ACK" then
        local id, key, amount = line:match("^ACK (%S+) (%S+) (%S+)$")
        assert(id and id ~= "nil", "a buyer got an APPROVED answer without a transaction id: " .. line)
        assert(amount == tostring(PRICE), "an APPROVED answer with total " .. tostring(amount) .. ": " .. line)
        ev.acks[id] = key
        ev.ack_list[#ev.ack_list + 1] = id
      elseif what == "LOST" then
        local key, offer = line:match("^LOST (%S+) (%S+)$")
        ev.lost[key] = offer
        ev.lost_list[#ev.lost_list + 1] = key
      elseif what == "DENIED" then
        local reason = line:match("^DENIED %S+ (%S+)$")
        ev.denied[reason] = (ev.denied[reason] or 0) + 1
      elseif what == "ERR" then
        ev.errs[#ev.errs + 1] = line
      end
    end
  end
  return ev
end

local function account_of(key, buyers)
  return buyers[key:match("^(.-)%-%d+$")]
end

describe("kill -9 under load", function()
  local gw, dir, pids, names, buyer_account, retried_ids, history
  local min_seen = {}

  setup(function()
    local accounts = {}
    for _, a in ipairs(ACCOUNTS) do
      accounts[#accounts + 1] = string.format("{ billing_reference = %q, amount = %d }", a.ref, a.funds)
    end
    -- The signer's key file must be mode 600: h.start writes the files
    -- before it knows a mode, so the first launch only makes the folder.
    gw = h.start({
      workers = 2,
      tenants = [[{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" },
      signer = { type = "nginx_secure_link", key_file = "news.key" }, billing = { type = "builtin" } },]],
      -- The smallest segments and the most frequent balance snapshots, so
      -- that kills land during rotations and snapshot writes too; no
      -- retention: the checks read the whole log.
      extra = "ledger = { wal = { segment_bytes = 65536, retention_bytes = 0, retention_age_s = 0 }, "
        .. "snapshot_every = 1000, accounts = { "
        .. table.concat(accounts, ", ") .. " } },",
      files = { ["news.xml"] = h.rsl({ amount = "0.001" }), ["news.key"] = "crash-test-key-" .. h.random_hex(8) .. "\n" },
    })
    assert(sh("chmod 600 " .. h.sh_quote(gw.dir .. "/news.key")))
    local exited, rc = h.terminate(gw)
    assert(exited and rc == 0, "first launch: exit " .. tostring(rc) .. "\n" .. gw.log())
    h.relaunch(gw)
    assert(h.wait_ready(gw))
    assert(not gw.log():find("chmod 600", 1, true), gw.log())
    dir = gw.dir .. "/buyers"
    assert(sh("mkdir -p " .. h.sh_quote(dir)))
    pids, names, buyer_account, retried_ids, history = {}, {}, {}, {}, {}
    for ai, a in ipairs(ACCOUNTS) do
      for b = 1, a.buyers do
        local name = "b" .. ai .. b
        names[#names + 1] = name
        buyer_account[name] = a
        local cmd = string.format("luajit %s %d %s %s %s %s >%s 2>&1 </dev/null & echo $!",
          h.sh_quote(HERE .. "buyer.lua"), gw.port, a.ref, name, h.sh_quote(dir), tostring(a.delay),
          h.sh_quote(dir .. "/" .. name .. ".out"))
        pids[#pids + 1] = tonumber(capture(cmd):match("%d+"))
      end
    end
  end)

  teardown(function()
    if dir then
      h.write_file(dir .. "/stop", "")
      local deadline = h.now() + 10
      for _, pid in ipairs(pids or {}) do
        while h.proc_alive(pid) and h.now() < deadline do
          h.sleep(0.02)
        end
        if h.proc_alive(pid) then
          os.execute("kill -KILL " .. pid .. " 2>/dev/null")
        end
      end
    end
    if gw then
      -- Kept on failure (stop removes the folder only after a clean exit).
      h.stop(gw)
      if not gw.stop_result[1] or gw.stop_result[2] ~= 0 then
        print("crash_spec: gateway folder kept: " .. gw.dir)
      end
    end
  end)

  -- Stops the buyers (they finish the request in progress first).
  local function pause(n)
    h.write_file(dir .. "/pause.tmp", tostring(n))
    os.rename(dir .. "/pause.tmp", dir .. "/pause")
    local deadline = h.now() + 15
    for _, name in ipairs(names) do
      while (h.read_file(dir .. "/paused." .. name) or "") ~= tostring(n) do
        assert(h.now() < deadline, "buyer " .. name .. " did not pause: " .. (h.read_file(dir .. "/" .. name .. ".out") or ""))
        h.sleep(0.005)
      end
    end
  end

  local function resume()
    os.remove(dir .. "/pause")
  end

  local function check_balances(log, when)
    for _, a in ipairs(ACCOUNTS) do
      local r = redacted(a.ref)
      assert(log.ncredits[r] == 1, when .. ": " .. a.ref .. "'s opening credit is in the log "
        .. tostring(log.ncredits[r]) .. " times")
      assert.are.equal(a.funds, log.credits[r], when .. ": " .. a.ref .. " credited")
      local bal, held = h.balance(gw, a.ref)
      assert(bal, when .. ": " .. tostring(held))
      local expected = a.funds - (log.approved[r] or 0)
      assert(bal == expected, string.format("%s: %s balance %d, but the log says %d - %d = %d", when, a.ref, bal,
        a.funds, log.approved[r] or 0, expected))
      assert(bal >= 0, when .. ": " .. a.ref .. " balance " .. bal .. " is negative")
      assert(held == 0, when .. ": " .. a.ref .. " holds " .. tostring(held) .. " with no purchase running")
    end
  end

  -- The log against what the buyers were told. Returns the log and events.
  local function check_log(when)
    local log = read_log(gw)
    local ev = read_events(dir, names)
    local dups, missing, wrong = {}, {}, {}
    for id, n in pairs(log.ids) do
      if n > 1 then dups[#dups + 1] = id .. " x" .. n end
    end
    for key, ids in pairs(log.by_key) do
      if #ids > 1 then dups[#dups + 1] = "key " .. key .. " approved as " .. table.concat(ids, "+") end
    end
    for _, id in ipairs(ev.ack_list) do
      local tx = log.by_id[id]
      if log.ids[id] ~= 1 then
        missing[#missing + 1] = id .. " (key " .. ev.acks[id] .. ", in the log " .. (log.ids[id] or 0) .. " times)"
      elseif tx.outcome ~= "approved" or tx.key ~= ev.acks[id]
          or tx.ref ~= redacted(account_of(ev.acks[id], buyer_account).ref) then
        wrong[#wrong + 1] = id .. " logged " .. tx.outcome .. " key " .. tx.key .. " ref " .. tx.ref
          .. ", acknowledged for key " .. ev.acks[id]
      end
    end
    for id in pairs(retried_ids) do
      if log.ids[id] ~= 1 then missing[#missing + 1] = id .. " (answered to a retry)" end
    end
    assert(#dups == 0, when .. ": in the log twice: " .. list(dups))
    assert(#missing == 0, when .. ": acknowledged but not in the log exactly once: " .. list(missing)
      .. " (" .. #ev.ack_list .. " acks, " .. log.n_tx .. " transactions logged)")
    assert(#wrong == 0, when .. ": logged differently from the answer: " .. list(wrong))
    assert(#ev.errs == 0, when .. ": answers other than 200: " .. list(ev.errs))
    check_balances(log, when)
    return log, ev
  end

  -- The last segment file of the log.
  local function last_segment()
    local names_ = capture("ls " .. h.sh_quote(gw.dir .. "/data/wal") .. " | grep '\\.wal$' | sort | tail -1")
    return gw.dir .. "/data/wal/" .. names_:gsub("%s+$", "")
  end

  local function le32(n)
    return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
  end

  -- Tears the tail of the log; returns the bytes added. next_seq: the
  -- sequence the next record would get.
  local function tear(how, next_seq)
    local tail
    if how == "partial segment" then
      -- A crash while the next segment was being made: 10 bytes of its header.
      local path = string.format("%s/data/wal/%020d.wal", gw.dir, next_seq)
      h.write_file(path, "TGWALSEG\1\0")
      return 10
    elseif how == "zeros" then
      tail = string.rep("\0", 4096) -- a file extended, its data never written
    elseif how == "garbage" then
      tail = "\255\254torn-tail\1\2\3" -- a length no frame has, then junk
    else
      -- A frame header announcing 700 bytes of payload, then only 200 of them.
      tail = le32(700) .. le32(0x12345678) .. string.rep("\8\1", 100)
    end
    local f = assert(io.open(last_segment(), "ab"))
    assert(f:write(tail))
    f:close()
    return #tail
  end

  -- Requests that got no answer, sent again with the same key.
  local function retry_lost(ev, log, cycle, done)
    local in_log, not_in_log = {}, {}
    for _, key in ipairs(ev.lost_list) do
      if not done[key] then
        if log.by_key[key] then in_log[#in_log + 1] = key else not_in_log[#not_in_log + 1] = key end
      end
    end
    -- At most three per restart: up to two whose record made it (the answer
    -- was lost), the rest from those that never reached the log.
    local picks = {}
    for i = 1, math.min(2, #in_log) do picks[#picks + 1] = in_log[#in_log - i + 1] end
    for i = 1, math.min(3 - #picks, #not_in_log) do picks[#picks + 1] = not_in_log[#not_in_log - i + 1] end
    local summary = {}
    for _, key in ipairs(picks) do
      done[key] = true
      local a = account_of(key, buyer_account)
      local before = h.balance(gw, a.ref)
      local body = string.format(
        '{"aiSystem":{"id":"crash-bot","billingReference":"%s"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
        a.ref, key, ev.lost[key])
      local res = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", body)))
      assert(res.status == 200, "cycle " .. cycle .. ": retry of " .. key .. " -> " .. res.status .. " " .. res.body)
      local id = res.body:match('"transactionId":"([^"]+)"')
      local approved = res.body:find('"status":"TRANSACTION_STATUS_APPROVED"', 1, true) ~= nil
      local after = h.balance(gw, a.ref)
      local logged = log.by_key[key] and log.by_key[key][1]
      if logged then
        assert(approved and id == logged, "cycle " .. cycle .. ": key " .. key .. " is logged as " .. logged
          .. " but its retry answered " .. res.body)
        assert(after == before, "cycle " .. cycle .. ": the retry of logged key " .. key .. " moved "
          .. a.ref .. " from " .. before .. " to " .. after)
        summary[#summary + 1] = key .. ": replayed " .. id
      elseif approved then
        assert(after == before - PRICE, "cycle " .. cycle .. ": key " .. key .. " (not logged before) bought on "
          .. "retry, but " .. a.ref .. " went from " .. before .. " to " .. after)
        summary[#summary + 1] = key .. ": new purchase " .. id
      else
        assert(res.body:find("DENIAL_REASON_INSUFFICIENT_FUNDS", 1, true), "cycle " .. cycle .. ": retry of "
          .. key .. ": " .. res.body)
        assert(after == before, "a denied retry moved the balance")
        summary[#summary + 1] = key .. ": denied (funds)"
      end
      if approved then
        retried_ids[id] = key
        -- Once more: the same answer, nothing charged.
        local again = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", body)))
        assert(again.status == 200 and again.body == res.body, "cycle " .. cycle .. ": second retry of " .. key
          .. " answered " .. again.status .. " " .. again.body .. ", the first " .. res.body)
        assert(h.balance(gw, a.ref) == after, "the second retry of " .. key .. " charged")
      end
    end
    return summary
  end

  it("keeps every acknowledged purchase, once, across " .. KILLS .. " kill -9 and four torn tails", function()
    local t0 = h.now()
    local seed = tonumber(os.getenv("TG_CRASH_SEED") or "") or tonumber(h.random_hex(3), 16)
    math.randomseed(seed)
    history[#history + 1] = "seed " .. seed .. " (TG_CRASH_SEED replays the kill moments)"
    local retried = {}
    for cycle = 1, KILLS do
      resume()
      -- Load for a random 0.2..1.0 s, sampling the balances meanwhile.
      local until_ = h.now() + 0.2 + math.random() * 0.8
      repeat
        for _, a in ipairs(ACCOUNTS) do
          local bal = h.balance(gw, a.ref)
          if bal then
            min_seen[a.ref] = math.min(min_seen[a.ref] or bal, bal)
            assert(bal >= 0, "cycle " .. cycle .. ": " .. a.ref .. " balance " .. bal .. " under load")
          end
        end
        h.sleep(0.03)
      until h.now() >= until_
      h.kill9(gw)
      pause(cycle)

      -- The dead gateway's log, as the tool reads it.
      local _, verr, vrc = h.wal_tool(gw, "verify")
      local clean = vrc == 0
      local empty_last = not clean and #(h.read_file(last_segment()) or "x") == 0
      local before = read_log(gw)
      local expect_torn
      if TORN[cycle] then
        expect_torn = tear(TORN[cycle], before.last_seq + 1)
        local _, terr, trc = h.wal_tool(gw, "verify")
        assert(trc == 1, "cycle " .. cycle .. ": verify passed a torn tail (" .. TORN[cycle] .. "): " .. terr)
        local torn_log = read_log(gw)
        assert(torn_log.n == before.n, "cycle " .. cycle .. ": cat read " .. torn_log.n .. " records of a torn log, "
          .. before.n .. " before the tear")
      end

      h.relaunch(gw)
      local lines = h.log_lines(gw, "transaction log recovered")
      assert(#lines == 1, "cycle " .. cycle .. ": " .. #lines .. " recovery lines:\n" .. gw.log())
      local rec = lines[1]
      assert(tonumber(rec.records) == before.n, string.format("cycle %d: recovery replayed %s records, wal cat "
        .. "read %d from the dead gateway's log", cycle, tostring(rec.records), before.n))
      local torn = tonumber(rec.torn_tail_bytes)
      if expect_torn and clean then
        assert(torn == expect_torn, string.format("cycle %d: tore %d bytes (%s), recovery reports torn_tail_bytes=%s",
          cycle, expect_torn, TORN[cycle], tostring(rec.torn_tail_bytes)))
      elseif expect_torn then
        assert(torn and torn > expect_torn, "cycle " .. cycle .. ": torn_tail_bytes " .. tostring(torn))
      elseif clean then
        assert(torn == 0, "cycle " .. cycle .. ": verify passed the log, recovery cut " .. tostring(torn) .. " bytes")
      elseif empty_last then
        -- Killed between creating the next segment and writing its header:
        -- recovery removes the empty file, 0 bytes cut (the line has no field
        -- for a removed segment).
        assert(torn == 0, "cycle " .. cycle .. ": an empty last segment, torn_tail_bytes " .. tostring(torn))
      else
        assert(torn and torn > 0, "cycle " .. cycle .. ": verify refused the dead log (" .. verr
          .. "), yet recovery reported torn_tail_bytes=" .. tostring(rec.torn_tail_bytes))
      end
      assert(h.wait_ready(gw))
      local out, err, rc = h.wal_tool(gw, "verify")
      assert(rc == 0 and out:find("^ok: "), "cycle " .. cycle .. ": verify after recovery: " .. out .. err)

      local when = "after kill " .. cycle
      local log, ev = check_log(when)
      local summary = retry_lost(ev, log, cycle, retried)
      if #summary > 0 then
        check_log(when .. " and retries")
      end
      history[#history + 1] = string.format("kill %d: %d records (%s), snapshot_seq %s, torn %s, %d acks, %d lost; retries: %s",
        cycle, before.n, clean and "clean" or "torn: " .. (verr:match("[^\n]+") or ""), tostring(rec.snapshot_seq), tostring(torn),
        #ev.ack_list, #ev.lost_list, #summary > 0 and table.concat(summary, "; ") or "none")
      assert(h.now() - t0 < 80, "the kill loop is too slow: " .. (h.now() - t0) .. " s after " .. cycle .. " kills")
    end
    -- Last load, until acct-crash is out (if the kills left it funds), then
    -- everything stops and the final state is checked.
    resume()
    local deadline = h.now() + 15
    repeat
      h.sleep(0.05)
      local bal = h.balance(gw, "acct-crash")
      assert(bal and bal >= 0, "acct-crash balance " .. tostring(bal) .. " under load")
      min_seen["acct-crash"] = math.min(min_seen["acct-crash"] or bal, bal)
    until bal < PRICE or h.now() > deadline
    h.sleep(0.2)
    h.write_file(dir .. "/stop", "")
    for _, pid in ipairs(pids) do
      local deadline = h.now() + 10
      while h.proc_alive(pid) and h.now() < deadline do
        h.sleep(0.01)
      end
      assert(not h.proc_alive(pid), "buyer " .. pid .. " did not stop")
    end
    local log, ev = check_log("at the end")
    print("\ncrash_spec: " .. string.format("%.1f s, %d records", h.now() - t0, log.n))
    for _, line in ipairs(history) do
      print("  " .. line)
    end
    local counts = {}
    for k, v in pairs(ev.count) do counts[#counts + 1] = k .. "=" .. v end
    table.sort(counts)
    print("  events: " .. table.concat(counts, " ") .. "; lowest acct-crash balance sampled: "
      .. tostring(min_seen["acct-crash"]))
  end)

  it("acct-crash ran out without going negative, and a clean restart keeps the balances", function()
    local ev = read_events(dir, names)
    local bal, err = h.balance(gw, "acct-crash")
    assert(bal, err)
    assert(bal < PRICE, "acct-crash still holds " .. bal .. ": the run did not exhaust it (buyers too slow?)")
    assert(bal >= 0, "acct-crash at " .. bal)
    assert((ev.denied.DENIAL_REASON_INSUFFICIENT_FUNDS or 0) > 0, "no purchase was denied for funds")
    local plenty = h.balance(gw, "acct-plenty")
    local exited, rc = h.terminate(gw)
    assert(exited and rc == 0, "SIGTERM: exit " .. tostring(rc) .. "\n" .. gw.log())
    h.relaunch(gw)
    assert.are.equal(bal, h.balance(gw, "acct-crash"))
    assert.are.equal(plenty, h.balance(gw, "acct-plenty"))
    check_log("after a clean restart")
  end)
end)
