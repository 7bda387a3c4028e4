-- Tracing against the real binary (base/trace.h, rpc/otlp.h): spans
-- exported over OTLP/HTTP (protobuf) to a local receiver
-- (stub_collector.lua), decoded here by field number of the OpenTelemetry
-- protos (proto/opentelemetry/). Checks the span tree of an
-- ExecuteTransaction (server span in the caller's trace, its children, the
-- billing service's call carrying the authorize span's traceparent), of a
-- DiscoverResources, of an HTTP 402 answer, and of an RSL fetch (its
-- traceparent on the origin's request); then that a gateway without a
-- tracing section exports nothing and passes the caller's traceparent to
-- billing unchanged.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local STUB = HERE .. "stub_collector.lua"
local SELF_PID = ((h.read_file("/proc/self/stat") or ""):match("^(%d+)"))

-- ---- a protobuf reader: fields by number, enough for the OTLP subset ----

local function varint(s, i)
  local n, mul = 0, 1
  while true do
    local b = s:byte(i)
    assert(b, "truncated varint")
    i = i + 1
    n = n + (b % 128) * mul
    if b < 128 then return n, i end
    mul = mul * 128
  end
end

-- { [field] = { value, ... } }: bytes for length-delimited fields, numbers for varints,
-- raw bytes for fixed32/fixed64.
local function fields(s)
  local out, i = {}, 1
  while i <= #s do
    local key
    key, i = varint(s, i)
    local f, wt = math.floor(key / 8), key % 8
    local v
    if wt == 0 then
      v, i = varint(s, i)
    elseif wt == 2 then
      local n
      n, i = varint(s, i)
      v = s:sub(i, i + n - 1)
      i = i + n
    elseif wt == 1 then
      v = s:sub(i, i + 7)
      i = i + 8
    elseif wt == 5 then
      v = s:sub(i, i + 3)
      i = i + 4
    else
      error("wire type " .. wt)
    end
    out[f] = out[f] or {}
    table.insert(out[f], v)
  end
  return out
end

local function hex(s)
  return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function first(t, f) return t[f] and t[f][1] end

-- ExportTraceServiceRequest -> list of spans { trace, id, parent, name, kind, attrs, status }.
local function spans_of(body)
  local out = {}
  for _, rs in ipairs(fields(body)[1] or {}) do
    for _, ss in ipairs(fields(rs)[2] or {}) do
      for _, sp in ipairs(fields(ss)[2] or {}) do
        local f = fields(sp)
        local attrs = {}
        for _, kv in ipairs(f[9] or {}) do
          local k = fields(kv)
          local any = fields(first(k, 2) or "")
          attrs[first(k, 1)] = first(any, 1) or first(any, 3)
        end
        local status = f[15] and fields(f[15][1]) or {}
        out[#out + 1] = {
          trace = hex(first(f, 1) or ""), id = hex(first(f, 2) or ""), parent = hex(first(f, 4) or ""),
          name = first(f, 5), kind = first(f, 6) or 0, attrs = attrs, status = first(status, 3) or 0,
        }
      end
    end
  end
  return out
end

-- ---- the receiver ----

local DIR, stub_pid, stub_port, KEYS

local function exports()
  local n = 0
  while h.read_file(DIR .. "/export." .. (n + 1)) do n = n + 1 end
  return n
end

local function all_spans()
  local out = {}
  for i = 1, exports() do
    for _, s in ipairs(spans_of(h.read_file(DIR .. "/export." .. i))) do out[#out + 1] = s end
  end
  return out
end

-- Waits until pred(spans) is true; returns the spans.
local function wait_spans(pred, seconds)
  local deadline = h.now() + (seconds or 5)
  local spans
  repeat
    spans = all_spans()
    if pred(spans) then return spans end
    h.sleep(0.05)
  until h.now() > deadline
  return spans
end

local function requests(path)
  local out = {}
  for line in (h.read_file(DIR .. "/requests") or ""):gmatch("[^\n]+") do
    local m, p, tp = line:match("^(%S+) (%S+)\t(.*)$")
    if p == path then out[#out + 1] = tp end
  end
  return out
end

local function find(spans, pred)
  for _, s in ipairs(spans) do if pred(s) then return s end end
end

local function children(spans, parent)
  local names = {}
  for _, s in ipairs(spans) do
    if s.parent == parent.id then
      assert.are.equal(parent.trace, s.trace)
      names[s.name] = (names[s.name] or 0) + 1
    end
  end
  return names
end

local function gw_opts(tracing)
  local signer = string.format('{ type = "nginx_secure_link", base_url = "http://cdn.test", key_file = %q, ttl_s = 300 }',
    KEYS .. "/news.key")
  local billing = string.format('{ type = "connect", url = "http://127.0.0.1:%d", token_file = %q }', stub_port,
    KEYS .. "/billing.token")
  return {
    workers = 1,
    tenants = string.format('{ name = "news", hosts = { "news.example" }, catalog = { source = '
      .. '"http://127.0.0.1:%d/rsl.xml" }, signer = %s, billing = %s },', stub_port, signer, billing),
    extra = tracing and string.format('tracing = { endpoint = "http://127.0.0.1:%d/v1/traces", flush_ms = 100, '
      .. 'service_name = "tollgate-e2e" },', stub_port) or "",
  }
end

local function post(gw, path, body, extra)
  return assert(h.request(gw.port, h.connect_req(path, "json", body, extra), { timeout = 10 }))
end

local function buy(gw, key, tp)
  local res = post(gw, h.DISCOVER, h.json_discover({ "https://news.example/a" }))
  assert.are.equal(200, res.status, res.body)
  local offer = h.json_decode(res.body).results[1].offers[1]
  local body = string.format('{"aiSystem":{"billingReference":"acct-t"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
    key, offer.id)
  res = post(gw, h.EXECUTE, body, tp and { "traceparent: " .. tp } or nil)
  assert.are.equal(200, res.status, res.body)
  assert.are.equal("TRANSACTION_STATUS_APPROVED", h.json_decode(res.body).status, res.body)
end

describe("tracing", function()
  setup(function()
    local p = assert(io.popen("mktemp -d /tmp/tollgate-e2e-trace-XXXXXX"))
    DIR = p:read("*l")
    p:close()
    KEYS = DIR .. "/keys"
    os.execute("mkdir -p " .. h.sh_quote(KEYS))
    h.write_file(KEYS .. "/news.key", "news-secret-" .. h.random_hex(8) .. "\n", "600")
    h.write_file(KEYS .. "/billing.token", "tok-" .. h.random_hex(8) .. "\n", "600")
    h.write_file(DIR .. "/rsl.xml", h.rsl({ amount = "0.015" }))
    h.write_file(DIR .. "/requests", "")
    stub_port = h.free_port()
    p = assert(io.popen(string.format("luajit %s %d %s %s >%s 2>&1 & echo $!", h.sh_quote(STUB), stub_port,
      h.sh_quote(DIR), SELF_PID or "0", h.sh_quote(DIR .. "/stub.err"))))
    stub_pid = tonumber(p:read("*l"))
    p:close()
    local deadline = h.now() + 5
    while true do
      local s = h.connect(stub_port, 0.2)
      if s then s:close() break end
      assert(h.proc_alive(stub_pid) and h.now() < deadline, "stub did not listen: " .. (h.read_file(DIR .. "/stub.err") or ""))
      h.sleep(0.02)
    end
  end)

  teardown(function()
    if stub_pid then os.execute("kill " .. stub_pid .. " 2>/dev/null") end
    if DIR and not os.getenv("TG_E2E_KEEP") then os.execute("rm -rf " .. h.sh_quote(DIR)) end
  end)

  local TRACE = h.random_hex(16)
  local PARENT = h.random_hex(8)
  local TP = "00-" .. TRACE .. "-" .. PARENT .. "-01"

  it("exports the span tree of an ExecuteTransaction, a DiscoverResources, a 402 and an RSL fetch", function()
    local gw = h.start(gw_opts(true))
    assert(h.wait_ready(gw))
    buy(gw, "k-" .. h.random_hex(6), TP)

    -- The purchase: a server span in the caller's trace, its parts as children.
    local spans = wait_spans(function(s)
      return find(s, function(x) return x.name == "billing.capture" and x.trace == TRACE end) ~= nil
    end)
    local srv = find(spans, function(x) return x.name == "ExecuteTransaction" end)
    assert(srv, "no ExecuteTransaction span; log:\n" .. gw.log())
    assert.are.equal(TRACE, srv.trace)
    assert.are.equal(PARENT, srv.parent)
    assert.are.equal(2, srv.kind) -- SPAN_KIND_SERVER
    assert.are.equal("news", srv.attrs["tenant"])
    assert.are.equal("ok", srv.attrs["rpc.connect.code"])
    local kids = children(spans, srv)
    for _, name in ipairs({ "policy.skip", "catalog.quote", "policy.rate_limit", "billing.authorize", "signer.sign",
      "wal.append", "billing.capture" }) do
      assert(kids[name], "no child span " .. name .. " under ExecuteTransaction")
    end
    -- The billing service's Authorize carried the authorize span's traceparent.
    local auth = find(spans, function(x) return x.name == "billing.authorize" and x.trace == TRACE end)
    assert.are.equal(3, auth.kind) -- SPAN_KIND_CLIENT
    assert.are.equal("connect", auth.attrs["billing.adapter"])
    local sent = requests("/billing.v1.BillingService/Authorize")
    assert.are.equal("00-" .. TRACE .. "-" .. auth.id .. "-01", sent[#sent])

    -- DiscoverResources started its own trace (no traceparent came with it).
    local disc = find(spans, function(x) return x.name == "DiscoverResources" end)
    assert(disc and disc.parent == "" and disc.trace ~= TRACE)
    assert(children(spans, disc)["catalog.quote"])

    -- An HTTP 402, with a traceparent.
    local TRACE2, P2 = h.random_hex(16), h.random_hex(8)
    local res = h.request(gw.port, h.get_req("/a", { "traceparent: 00-" .. TRACE2 .. "-" .. P2 .. "-01" }))
    assert.are.equal(402, res.status)
    spans = wait_spans(function(s) return find(s, function(x) return x.trace == TRACE2 and x.kind == 2 end) ~= nil end)
    local http = find(spans, function(x) return x.trace == TRACE2 and x.kind == 2 end)
    assert(http, "no server span for the 402")
    assert.are.equal(P2, http.parent)
    assert.are.equal(402, http.attrs["http.response.status_code"])
    kids = children(spans, http)
    assert(kids["policy.skip"] and kids["policy.rate_limit"] and kids["catalog.quote"])

    -- An invalid traceparent starts a new trace.
    res = h.request(gw.port, h.get_req("/b", { "traceparent: 00-" .. TRACE2:upper() .. "-" .. P2 .. "-01" }))
    assert.are.equal(402, res.status)

    -- The RSL fetch: a root span whose traceparent the origin received.
    local fetch = find(spans, function(x) return x.name == "catalog.fetch" end)
    assert(fetch, "no catalog.fetch span")
    assert.are.equal("news", fetch.attrs["tenant"])
    local got = requests("/rsl.xml")
    assert.are.equal("00-" .. fetch.trace .. "-" .. fetch.id .. "-01", got[1])

    h.stop_clean(gw) -- the exporter flushes on the way out
    spans = all_spans()
    local b = find(spans, function(x) return x.kind == 2 and x.attrs["url.path"] == "/b" end)
    assert(b, "no span for the request with an invalid traceparent")
    assert.are.equal("", b.parent)
    assert.are_not.equal(TRACE2, b.trace)
    for _, s in ipairs(spans) do
      assert.are.equal(32, #s.trace)
      assert.are.equal(16, #s.id)
    end
  end)

  it("exports nothing without a tracing section, and passes the caller's traceparent to billing", function()
    local before = exports()
    local rsl_before = #requests("/rsl.xml")
    local gw = h.start(gw_opts(false))
    assert(h.wait_ready(gw))
    local tp = "00-" .. h.random_hex(16) .. "-" .. h.random_hex(8) .. "-01"
    buy(gw, "k-" .. h.random_hex(6), tp)
    local res = h.request(gw.port, h.get_req("/a", { "traceparent: " .. tp }))
    assert.are.equal(402, res.status)
    h.sleep(0.5)
    h.stop_clean(gw)
    assert.are.equal(before, exports())
    local sent = requests("/billing.v1.BillingService/Authorize")
    assert.are.equal(tp, sent[#sent])
    local got = requests("/rsl.xml")
    assert(#got > rsl_before)
    assert.are.equal("-", got[#got])
  end)
end)
