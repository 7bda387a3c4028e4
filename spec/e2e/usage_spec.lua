-- ReportUsage against the real binary (core/pipeline/usage.h): an AI system
-- buys offers (ExecuteTransaction, built-in ledger), then reports the tokens
-- it consumed. Unknown transactions, another AI system's, bad counts (JSON and
-- binary proto), the per-1,000-token adjustment debited or credited once, an
-- idempotent second report, a late report, the overdue denial of new
-- purchases, obligations kept across a restart, and the metrics; then, for a
-- tenant billed by a publisher's service (billing type connect, a stub
-- below), the extra charge authorized and captured as "<txid>:usage", a
-- credit left to the publisher, and a refused extra charge.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local PRICE = 15000 -- per 1,000 tokens on news (token_pricing per_1k, payment type "use")

local KEYS = (function()
  local p = assert(io.popen("mktemp -d /tmp/tollgate-e2e-keys-XXXXXX"))
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  h.write_file(dir .. "/news.key", "usage-secret-" .. h.random_hex(8) .. "\n", "600")
  return dir
end)()

local ACCOUNTS = { "acct-a", "acct-b", "acct-late", "acct-over", "acct-restart", "acct-pb", "acct-credit",
  "acct-metrics", "acct-bad" }

local function gw_opts()
  local signer = string.format('{ type = "nginx_secure_link", base_url = "http://cdn.test", key_file = %q, ttl_s = 600 }',
    KEYS .. "/news.key")
  local accts = {}
  for i, name in ipairs(ACCOUNTS) do
    accts[i] = string.format('{ billing_reference = %q, amount = 10000000 }', name)
  end
  return {
    workers = 2,
    tenants = table.concat({
      string.format('{ name = "news", hosts = { "news.example" }, catalog = { source = "news.xml" }, signer = %s, '
        .. 'usage = { report_within_s = 3600, overdue_limit = 0, token_pricing = "per_1k" } },', signer),
      string.format('{ name = "fast", hosts = { "fast.example" }, catalog = { source = "fast.xml" }, signer = %s, '
        .. 'usage = { report_within_s = 1, overdue_limit = 1 } },', signer),
    }, "\n    "),
    extra = "ledger = { accounts = { " .. table.concat(accts, ", ") .. " } },",
    files = {
      ["news.xml"] = h.rsl({ amount = "0.015", type = "use" }),
      ["fast.xml"] = h.rsl({ amount = "0.001" }),
    },
  }
end

local function post(gw, path, ctype, body)
  return assert(h.request(gw.port, h.connect_req(path, ctype, body), { timeout = 10 }))
end

local function json_str(s)
  return require("dkjson").encode(s)
end

local function offer_id(gw, uri)
  local res = post(gw, h.DISCOVER, "json", h.json_discover({ uri }))
  assert.are.equal(200, res.status, res.body)
  local r = h.json_decode(res.body).results[1]
  assert(r.offers and r.offers[1], "no offer for " .. uri .. ": " .. tostring(r.absenceDetail))
  return r.offers[1].id
end

local n_key = 0
-- Buys uri for (ai, ref) with estimated tokens; returns the answer (decoded) and the offer id.
local function buy(gw, ai, ref, uri, tokens)
  local id = offer_id(gw, uri)
  n_key = n_key + 1
  local body = string.format('{"aiSystem":{"id":%s,"billingReference":%s},"idempotencyKey":"usage-%d-%s",'
    .. '"items":[{"offerId":%s,"estimatedTokens":"%d"}]}', json_str(ai), json_str(ref), n_key, h.random_hex(4),
    json_str(id), tokens or 0)
  local res = post(gw, h.EXECUTE, "json", body)
  assert.are.equal(200, res.status, res.body)
  return h.json_decode(res.body), id, res
end

local function bought(gw, ai, ref, uri, tokens)
  local a, id = buy(gw, ai, ref, uri, tokens)
  assert.are.equal("TRANSACTION_STATUS_APPROVED", a.status, require("dkjson").encode(a))
  return a.transactionId, id, a
end

-- A ReportUsageRequest in JSON. usage: { { offer_id, consumed } ... }; consumed may be a string.
local function json_report(ai, ref, txid, usage)
  local parts = {}
  for i, u in ipairs(usage or {}) do
    parts[i] = string.format('{"offerId":%s,"consumedTokens":"%s"}', json_str(u[1]), tostring(u[2]))
  end
  local ai_part = ai and string.format('"aiSystem":{"id":%s,"billingReference":%s},', json_str(ai), json_str(ref))
    or ""
  local tx_part = txid and string.format('"transactionId":%s,', json_str(txid)) or ""
  return string.format('{%s%s"usage":[%s]}', ai_part, tx_part, table.concat(parts, ","))
end

local function report(gw, ai, ref, txid, usage)
  return post(gw, h.REPORT, "json", json_report(ai, ref, txid, usage))
end

-- A signed int64 as a protobuf varint (two's complement for a negative).
local function varint64(n)
  if n >= 0 then
    return h.varint(n)
  end
  local bit = require("bit")
  local ffi = require("ffi")
  local v = ffi.cast("uint64_t", ffi.new("int64_t", n)) -- two's complement, in LuaJIT's FFI integers
  local out = {}
  for _ = 1, 10 do
    local b = tonumber(bit.band(v, 0x7fULL))
    v = bit.rshift(v, 7)
    out[#out + 1] = string.char(v ~= 0ULL and b + 128 or b)
    if v == 0ULL then
      break
    end
  end
  return table.concat(out)
end

-- The same in binary proto (proto/ramp/v1/exchange.proto; AISystem id 3, billing_reference 7).
local function pb_report(ai, ref, txid, usage)
  local parts = { h.pb_bytes(1, h.pb_bytes(3, ai) .. h.pb_bytes(7, ref)), h.pb_bytes(2, txid) }
  for _, u in ipairs(usage) do
    parts[#parts + 1] = h.pb_bytes(3, h.pb_bytes(1, u[1]) .. h.varint(2 * 8) .. varint64(u[2]))
  end
  return table.concat(parts)
end

local function metrics(gw)
  local res = assert(h.admin_get(gw, "/metrics"))
  assert.are.equal(200, res.status)
  return res.body
end

local function metric_value(text, series)
  local at = text:find(series .. " ", 1, true)
  if not at then
    return nil
  end
  return tonumber(text:match("^(%S+)", at + #series + 1))
end

describe("ReportUsage", function()
  local gw

  setup(function()
    gw = h.start(gw_opts())
    assert(h.wait_ready(gw))
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("answers not_found for a transaction this gateway does not know", function()
    local res = report(gw, "bot-a", "acct-a", "tx_00000000000000000000000000", { { "offer", 10 } })
    assert.are.equal(404, res.status, res.body)
    assert.are.equal("not_found", h.connect_code(res))
  end)

  it("refuses another AI system's transaction permission_denied, naming no owner", function()
    local txid, offer = bought(gw, "owner-bot", "acct-a", "https://news.example/perm", 1000)
    for _, who in ipairs({ { "thief-bot", "acct-b" }, { "owner-bot", "acct-b" }, { "thief-bot", "acct-a" },
      { "", "acct-a" } }) do
      local res = report(gw, who[1], who[2], txid, { { offer, 10 } })
      assert.are.equal(403, res.status, res.body)
      assert.are.equal("permission_denied", h.connect_code(res))
      assert.is_nil(res.body:find("owner-bot", 1, true), res.body)
      assert.is_nil(res.body:find("acct-a", 1, true), res.body)
    end
    -- The owner still can.
    local res = report(gw, "owner-bot", "acct-a", txid, { { offer, 1000 } })
    assert.are.equal(200, res.status, res.body)
  end)

  it("refuses bad reports invalid_argument: no ai_system, no transaction, no usage, bad counts, foreign or repeated offers", function()
    local txid, offer = bought(gw, "bad-bot", "acct-bad", "https://news.example/bad", 1000)
    local cases = {
      json_report(nil, nil, txid, { { offer, 1 } }),
      json_report("bad-bot", "acct-bad", nil, { { offer, 1 } }),
      json_report("bad-bot", "acct-bad", txid, {}),
      json_report("bad-bot", "acct-bad", txid, { { offer, -1 } }),
      json_report("bad-bot", "acct-bad", txid, { { offer, "1000000000001" } }),
      json_report("bad-bot", "acct-bad", txid, { { offer, "9223372036854775807" } }),
      json_report("bad-bot", "acct-bad", txid, { { offer, 1 }, { offer, 2 } }),
      json_report("bad-bot", "acct-bad", txid, { { "not-an-offer-of-it", 1 } }),
      json_report("bad-bot", "acct-bad", txid, { { "", 1 } }),
    }
    for i, body in ipairs(cases) do
      local res = post(gw, h.REPORT, "json", body)
      assert.are.equal(400, res.status, "case " .. i .. ": " .. res.body)
      assert.are.equal("invalid_argument", h.connect_code(res), "case " .. i)
    end
    -- Binary proto: a negative and an absurd count.
    for _, n in ipairs({ -5, 1000000000001 }) do
      local res = post(gw, h.REPORT, "proto", pb_report("bad-bot", "acct-bad", txid, { { offer, n } }))
      assert.are.equal(400, res.status, tostring(n))
      assert.are.equal("invalid_argument", h.connect_code(res))
    end
    -- None of them recorded anything: a valid report is still the first.
    local res = report(gw, "bad-bot", "acct-bad", txid, { { offer, 1000 } })
    assert.are.equal(200, res.status, res.body)
    assert.is_nil(h.json_decode(res.body).adjustment.amount) -- 0: omitted in JSON
  end)

  it("answers with the estimates and the per-1k adjustment, debits it once, and is idempotent", function()
    local before = assert(h.balance(gw, "acct-a"))
    local txid, offer = bought(gw, "bot-a", "acct-a", "https://news.example/adj", 1000)
    local after_buy = assert(h.balance(gw, "acct-a"))
    local res = report(gw, "bot-a", "acct-a", txid, { { offer, 2500 } })
    assert.are.equal(200, res.status, res.body)
    local a = h.json_decode(res.body)
    assert.are.equal(txid, a.transactionId)
    assert.is_true(a.accepted)
    assert.are.equal(1, #a.usage)
    assert.are.equal(offer, a.usage[1].offerId)
    assert.are.equal("2500", a.usage[1].consumedTokens)
    assert.are.equal("1000", a.usage[1].estimatedTokens)
    -- ceil(15000 * 2500 / 1000) - ceil(15000 * 1000 / 1000)
    assert.are.same({ currency = "USD", amount = tostring(37500 - 15000) }, a.adjustment)
    assert.are.equal(after_buy - 22500, (assert(h.balance(gw, "acct-a"))))
    assert(before > after_buy)
    -- The same report again: the same answer, byte for byte, nothing charged.
    local again = report(gw, "bot-a", "acct-a", txid, { { offer, 2500 } })
    assert.are.equal(200, again.status, again.body)
    assert.are.equal(res.body, again.body)
    -- Other counts: already_exists.
    local other = report(gw, "bot-a", "acct-a", txid, { { offer, 2501 } })
    assert.are.equal(409, other.status, other.body)
    assert.are.equal("already_exists", h.connect_code(other))
    assert.are.equal(after_buy - 22500, (assert(h.balance(gw, "acct-a"))))
  end)

  it("answers 8 concurrent identical reports alike, debiting once", function()
    local txid, offer = bought(gw, "bot-conc", "acct-b", "https://news.example/conc", 1000)
    local before = assert(h.balance(gw, "acct-b"))
    local raw = h.connect_req(h.REPORT, "json", json_report("bot-conc", "acct-b", txid, { { offer, 1200 } }))
    local socks = {}
    for i = 1, 8 do
      socks[i] = assert(h.connect(gw.port, 10))
    end
    for i = 1, 8 do
      assert(h.send(socks[i], raw))
    end
    local bodies = {}
    for i = 1, 8 do
      local res, err = h.read_response(socks[i], 10)
      socks[i]:close()
      assert(res, "duplicate " .. i .. ": " .. tostring(err))
      assert.are.equal(200, res.status, res.body)
      bodies[i] = res.body
    end
    for i = 2, 8 do
      assert.are.equal(bodies[1], bodies[i])
    end
    assert.are.equal("3000", h.json_decode(bodies[1]).adjustment.amount)
    assert.are.equal(before - 3000, (assert(h.balance(gw, "acct-b"))))
  end)

  it("credits an adjustment below the estimate", function()
    local before = assert(h.balance(gw, "acct-credit"))
    local txid, offer = bought(gw, "bot-c", "acct-credit", "https://news.example/credit", 2000)
    local after_buy = assert(h.balance(gw, "acct-credit"))
    assert.are.equal(2 * PRICE, before - after_buy) -- per 1,000 tokens: the estimate of 2000 charged
    local res = report(gw, "bot-c", "acct-credit", txid, { { offer, 999 } })
    assert.are.equal(200, res.status, res.body)
    -- ceil(15000 * 999 / 1000) - 30000 = 14985 - 30000
    assert.are.same({ currency = "USD", amount = "-15015" }, h.json_decode(res.body).adjustment)
    assert.are.equal(after_buy + 15015, (assert(h.balance(gw, "acct-credit"))))
  end)

  it("takes binary proto, answering in proto, and a JSON retry gets the same report", function()
    local txid, offer = bought(gw, "bot-pb", "acct-pb", "https://news.example/pb", 1000)
    local res = post(gw, h.REPORT, "proto", pb_report("bot-pb", "acct-pb", txid, { { offer, 1500 } }))
    assert.are.equal(200, res.status, h.show(res.body))
    assert.are.equal("application/proto", res.headers["content-type"])
    -- transaction_id (1), accepted (2) = true, the record with consumed 1500 (2: 0xdc 0x0b) and
    -- estimated 1000 (3: 0xe8 0x07), the adjustment 7500 (2: 0xcc 0x3a).
    assert.are.equal(h.pb_bytes(1, txid) .. "\x10\x01", res.body:sub(1, #txid + 4))
    assert(res.body:find("\x10\xdc\x0b\x18\xe8\x07", 1, true), h.show(res.body))
    assert(res.body:find("\x10\xcc\x3a", 1, true), h.show(res.body))
    local j = report(gw, "bot-pb", "acct-pb", txid, { { offer, 1500 } })
    assert.are.equal(200, j.status, j.body)
    assert.are.equal("7500", h.json_decode(j.body).adjustment.amount)
  end)

  it("accepts a report after its deadline, marked late (compliance)", function()
    local txid, offer, a = bought(gw, "late-bot", "acct-late", "https://fast.example/late", 10)
    -- The answer carries the obligation (purchase.c) and the record holds it.
    assert(a.reporting and a.reporting.required, "no reporting obligation in " .. require("dkjson").encode(a))
    local due = tonumber(a.reporting.dueAtUnix)
    assert(due and due >= os.time() - 5 and due <= os.time() + 5, tostring(a.reporting.dueAtUnix))
    h.sleep(2.2)
    local res = report(gw, "late-bot", "acct-late", txid, { { offer, 10 } })
    assert.are.equal(200, res.status, res.body)
    assert.is_true(h.json_decode(res.body).accepted)
    local m = metrics(gw)
    assert.are.equal(1, metric_value(m, 'reporting_obligations_total{tenant_id="fast",state="reported"}'))
    assert.are.equal(0, metric_value(m, 'reporting_compliance_rate{tenant_id="fast"}'))
    assert.are.equal(0, metric_value(m, 'reporting_obligations_open{tenant_id="fast",state="pending"}'))
  end)

  it("denies new purchases of an AI system with more overdue reports than the limit, saying how many and since when", function()
    local t1, o1 = bought(gw, "over-bot", "acct-over", "https://fast.example/o1", 10)
    bought(gw, "over-bot", "acct-over", "https://fast.example/o2", 10)
    h.sleep(2.2)
    local a = buy(gw, "over-bot", "acct-over", "https://fast.example/o3", 10)
    assert.are.equal("TRANSACTION_STATUS_DENIED", a.status, require("dkjson").encode(a))
    assert.are.equal("DENIAL_REASON_USAGE_REPORT_OVERDUE", a.denialReason)
    assert(a.denialDetail:match("^2 usage reports overdue since %d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ"), a.denialDetail)
    -- Another AI system on the same tenant buys.
    bought(gw, "other-bot", "acct-over", "https://fast.example/o4", 10)
    -- One reported (late): 1 overdue, not above the limit of 1, and over-bot buys again.
    local res = report(gw, "over-bot", "acct-over", t1, { { o1, 10 } })
    assert.are.equal(200, res.status, res.body)
    bought(gw, "over-bot", "acct-over", "https://fast.example/o5", 10)
  end)

  it("keeps obligations and reports across a restart (replayed from the log)", function()
    local t1, o1 = bought(gw, "restart-bot", "acct-restart", "https://news.example/r1", 1000)
    local t2, o2 = bought(gw, "restart-bot", "acct-restart", "https://news.example/r2", 1000)
    local first = report(gw, "restart-bot", "acct-restart", t1, { { o1, 3000 } })
    assert.are.equal(200, first.status, first.body)
    local bal = assert(h.balance(gw, "acct-restart"))
    local exited, rc = h.stop_keep(gw)
    assert(exited and rc == 0, "stop before restart: exit " .. tostring(rc))
    h.relaunch(gw)
    assert(h.wait_ready(gw))
    -- The report made before: the same answer, charged once.
    local again = report(gw, "restart-bot", "acct-restart", t1, { { o1, 3000 } })
    assert.are.equal(200, again.status, again.body)
    assert.are.equal(first.body, again.body)
    assert.are.equal(409, report(gw, "restart-bot", "acct-restart", t1, { { o1, 1 } }).status)
    -- The one still owed is known, and reported now.
    local res = report(gw, "restart-bot", "acct-restart", t2, { { o2, 1000 } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal(bal, (assert(h.balance(gw, "acct-restart"))))
    assert.are.equal(403, report(gw, "restart-bot", "acct-a", t2, { { o2, 1000 } }).status)
  end)

  it("shows the reporting metrics on the admin listener", function()
    local txid, offer = bought(gw, "metrics-bot", "acct-metrics", "https://news.example/m1", 1000)
    bought(gw, "metrics-bot", "acct-metrics", "https://news.example/m2", 1000)
    local m0 = metrics(gw)
    local pending0 = metric_value(m0, 'reporting_obligations_open{tenant_id="news",state="pending"}')
    local owed0 = metric_value(m0, 'reporting_obligations_total{tenant_id="news",state="pending"}')
    local reported0 = metric_value(m0, 'reporting_obligations_total{tenant_id="news",state="reported"}') or 0
    assert(pending0 and pending0 >= 2, "no pending obligations on news:\n" .. m0)
    assert(owed0 and owed0 >= pending0, m0)
    local res = report(gw, "metrics-bot", "acct-metrics", txid, { { offer, 1500 } })
    assert.are.equal(200, res.status, res.body)
    local m = metrics(gw)
    assert.are.equal(pending0 - 1, metric_value(m, 'reporting_obligations_open{tenant_id="news",state="pending"}'))
    assert.are.equal(owed0, metric_value(m, 'reporting_obligations_total{tenant_id="news",state="pending"}'))
    assert.are.equal(reported0 + 1, metric_value(m, 'reporting_obligations_total{tenant_id="news",state="reported"}'))
    assert.are.equal(1, metric_value(m, 'reporting_compliance_rate{tenant_id="news"}'))
    -- (1500 - 1000) / 1000 over this reference's reports: the reference redacted.
    assert.are.equal(0.5, metric_value(m, 'reporting_token_deviation_cumulative{tenant_id="news",billing_ref="****rics"}'))
    assert.is_nil(m:find("acct-metrics", 1, true))
    -- Prometheus' own linter takes them (a gauge named *_total would be refused).
    if h.capture("command -v promtool") ~= "" then
      local path = os.tmpname()
      h.write_file(path, m)
      local out = h.capture("promtool check metrics <" .. h.sh_quote(path) .. " 2>&1; echo rc=$?")
      os.remove(path)
      assert(out:match("rc=0"), out)
    end
    assert(metric_value(m, 'reporting_token_deviation_bucket{tenant_id="news",le="0.5"}'), m)
    assert(metric_value(m, 'reporting_token_deviation_count{tenant_id="news"}') >= 1)
  end)
end)

-- A publisher's billing service (proto/billing/v1) for the remote adapter: a
-- test double that approves every Authorize (hold-N) except an extra usage
-- charge (transaction id "<txid>:usage") of the account named DECLINE, and
-- answers Capture, Release and Health ok. Every request is appended to RECORD
-- as "<path>\t<hex of the body>". One connection at a time, each closed after
-- its answer. It exits once process WATCH_PID (the spec's) is gone.
local BILLING_STUB = [==[
local socket = require("socket")
local port, record, decline, watch = tonumber(arg[1]), arg[2], arg[3], tonumber(arg[4])
local srv = assert(socket.bind("127.0.0.1", port))
srv:settimeout(0.2)
local n = 0
local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end
local function field(f, d)
  return string.char(f * 8 + 2, #d) .. d
end
while true do
  local c = srv:accept()
  if not c and watch then
    local alive = io.open("/proc/" .. watch .. "/stat", "rb")
    if not alive then
      os.exit(0)
    end
    alive:close()
  end
  if c then
    c:settimeout(2)
    local line = c:receive("*l") or ""
    local len = 0
    while true do
      local hdr = c:receive("*l")
      if not hdr or hdr == "" then break end
      local v = hdr:lower():match("^content%-length:%s*(%d+)")
      if v then len = tonumber(v) end
    end
    local body = len > 0 and (c:receive(len) or "") or ""
    local path = line:match("^%u+ (%S+)") or "?"
    local f = io.open(record, "a")
    f:write(path, "\t", hex(body), "\n")
    f:close()
    local out = "\8\1"
    if path:find("/Authorize", 1, true) then
      n = n + 1
      if decline ~= "" and body:find(decline, 1, true) and body:find(":usage", 1, true) then
        out = field(4, "refused by the test")
      else
        out = "\8\1" .. field(2, "hold-" .. n)
      end
    end
    c:send("HTTP/1.1 200 OK\r\nContent-Type: application/proto\r\nContent-Length: " .. #out
      .. "\r\nConnection: close\r\n\r\n" .. out)
    c:close()
  end
end
]==]

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

describe("ReportUsage billed by a remote service (billing type connect)", function()
  local gw, stub_pid, record, stub_path

  -- Lines of the record for path (a suffix) whose body holds the bytes of needle.
  local function calls(path, needle)
    local n = 0
    for line in (h.read_file(record) or ""):gmatch("[^\n]+") do
      local p, body = line:match("^(%S+)\t(%x*)$")
      if p and p:sub(-#path) == path and body:find(hex(needle), 1, true) then
        n = n + 1
      end
    end
    return n
  end

  local function wait_calls(path, needle, want)
    local deadline = h.now() + 5
    while calls(path, needle) < want and h.now() < deadline do
      h.sleep(0.02)
    end
    return calls(path, needle)
  end

  setup(function()
    local port = h.free_port()
    record = os.tmpname()
    stub_path = os.tmpname() .. ".lua"
    h.write_file(stub_path, BILLING_STUB)
    local ffi = require("ffi")
    pcall(ffi.cdef, "int getpid(void);")
    local p = assert(io.popen(string.format("luajit %s %d %s acct-declined %d >/dev/null 2>&1 & echo $!",
      h.sh_quote(stub_path), port, h.sh_quote(record), ffi.C.getpid())))
    stub_pid = tonumber(p:read("*l"))
    p:close()
    assert(stub_pid, "could not start the billing stub")
    local deadline = h.now() + 5
    local probe = h.connect(port, 0.2)
    while not probe and h.now() < deadline do
      h.sleep(0.05)
      probe = h.connect(port, 0.2)
    end
    assert(probe, "the billing stub does not listen")
    probe:close()
    h.write_file(KEYS .. "/billing.token", "billing-token-" .. h.random_hex(8) .. "\n", "600")
    local signer = string.format('{ type = "nginx_secure_link", base_url = "http://cdn.test", key_file = %q }',
      KEYS .. "/news.key")
    gw = h.start({
      workers = 1,
      tenants = string.format('{ name = "remote", hosts = { "remote.example" }, catalog = { source = "remote.xml" }, '
        .. 'signer = %s, billing = { type = "connect", url = "http://127.0.0.1:%d", token_file = %q, '
        .. 'deadline_ms = 2000 }, usage = { report_within_s = 3600, token_pricing = "per_1k" } },',
        signer, port, KEYS .. "/billing.token"),
      files = { ["remote.xml"] = h.rsl({ amount = "0.015", type = "use" }) },
    })
    assert(h.wait_ready(gw))
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
    if stub_pid then os.execute("kill " .. stub_pid .. " 2>/dev/null") end
    os.remove(record)
    os.remove(stub_path)
  end)

  it("authorizes the extra charge as <txid>:usage and captures it once", function()
    local txid, offer = bought(gw, "rbot", "acct-r", "https://remote.example/x", 1000)
    assert.are.equal(1, wait_calls("/Capture", txid, 1)) -- the purchase's own
    local res = report(gw, "rbot", "acct-r", txid, { { offer, 2000 } })
    assert.are.equal(200, res.status, res.body)
    assert.are.same({ currency = "USD", amount = "15000" }, h.json_decode(res.body).adjustment)
    assert.are.equal(1, calls("/Authorize", txid .. ":usage"))
    -- amount (3) = 15000 in the Authorize of the usage charge
    local line = (h.read_file(record) or ""):match("[^\n]*/Authorize\t%x*" .. hex(txid .. ":usage") .. "[^\n]*")
    assert(line and line:find(hex("\24" .. h.varint(15000)), 1, true), tostring(line))
    assert.are.equal(2, wait_calls("/Capture", txid, 2))
    assert.are.equal(1, calls("/Capture", txid .. ":usage"))
    -- The same report again: the same answer, no new charge.
    local again = report(gw, "rbot", "acct-r", txid, { { offer, 2000 } })
    assert.are.equal(res.body, again.body)
    h.sleep(0.2)
    assert.are.equal(1, calls("/Authorize", txid .. ":usage"))
    assert.are.equal(1, calls("/Capture", txid .. ":usage"))
  end)

  it("answers a credit and leaves its refund to the publisher: no billing call", function()
    local txid, offer = bought(gw, "rbot", "acct-r", "https://remote.example/y", 2000)
    local res = report(gw, "rbot", "acct-r", txid, { { offer, 500 } })
    assert.are.equal(200, res.status, res.body)
    assert.are.same({ currency = "USD", amount = "-22500" }, h.json_decode(res.body).adjustment)
    h.sleep(0.2)
    assert.are.equal(0, calls("/Authorize", txid .. ":usage"))
    assert.are.equal(0, calls("/Release", txid .. ":usage"))
  end)

  it("accepts the report when billing refuses the extra charge, logged unbilled", function()
    local txid, offer = bought(gw, "rbot", "acct-declined", "https://remote.example/z", 1000)
    local res = report(gw, "rbot", "acct-declined", txid, { { offer, 3000 } })
    assert.are.equal(200, res.status, res.body)
    assert.are.equal("30000", h.json_decode(res.body).adjustment.amount)
    assert.are.equal(1, calls("/Authorize", txid .. ":usage"))
    h.sleep(0.2)
    assert.are.equal(0, calls("/Capture", txid .. ":usage"))
    local lines = h.log_lines(gw, "usage: the adjustment was not authorized (logged as unbilled)")
    assert.are.equal(1, #lines)
    assert.are.equal(txid, lines[1].transaction)
  end)
end)
