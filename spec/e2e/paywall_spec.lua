-- The HTTP 402 paywall (core/pipeline/paywall.h) end to end against the real
-- binary, for everything that needs no blockchain: the challenge
-- (PAYMENT-REQUIRED and the v1 body: fields, amounts per decimals, ASCII
-- only, cached byte for byte, changed by a policy reload), free paths and
-- tenants without payments as before, strict refusals with t402 bodies
-- (PROTOCOLS.md section 2's status per code), the local checks (payTo,
-- amount, validity window, EIP-712 signature), replay protection (one
-- authorization serves once, also when two copies race), and the
-- facilitator's misbehaviour: down, failing over, refusing, answering
-- garbage, redirecting (never followed), stalling, a failed or pending
-- settlement; asynchronous settlement (by configuration and by the policy's
-- settle hook), also across a SIGKILL and restart.
--
-- Facilitators here are spec/e2e/stub_facilitator.lua processes (a test
-- double: the real facilitator cannot be made to misbehave on demand; the
-- real one, real clients and a real chain are spec/interop's). Payments that
-- must pass the local signature check are signed with viem (EIP-712
-- TransferWithAuthorization) by node from spec/interop/node_modules; without
-- it those cases are reported pending.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local dkjson = require("dkjson")
local socket = require("socket")

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local STUB = HERE .. "stub_facilitator.lua"
local INTEROP = HERE .. "../interop"

-- Anvil's well-known test accounts: no value anywhere.
local PAYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
local PAYER = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
local PAY_TO = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
local OTHER = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"
-- Base Sepolia USDC, configured in lower case: the challenge must show its EIP-55 form.
local USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
local TOKEN18 = "0x4200000000000000000000000000000000000006"
local NETWORK = "eip155:84532"
local CHAIN_ID = 84532
-- 0.001 USD in the catalog: 1000 micro-USD.
local AMOUNT6, AMOUNT18 = "1000", "1000000000000000"
local DESCRIPTION = "Caf\195\169 \230\151\165\230\156\172 news" -- "Café 日本 news"
local SECRET = "paywall-secret-" .. h.random_hex(8)
local CDN = "http://cdn.test"

local sh_quote = h.sh_quote

-- ---- signing (viem through node) ----

local SIGNER = (function()
  if not h.sh("command -v node >/dev/null 2>&1") then
    return false
  end
  return h.read_file(INTEROP .. "/node_modules/viem/package.json") ~= nil
end)()
local NO_SIGNER = "needs node and spec/interop/node_modules/viem (cd spec/interop && npm ci) to sign EIP-3009 authorizations"

-- it(), or pending() with the reason when nothing can sign.
local function it_signed(name, fn)
  if SIGNER then
    it(name, fn)
  else
    pending(name .. " [" .. NO_SIGNER .. "]")
  end
end

local SIGN_JS = [[
const { privateKeyToAccount } = require("viem/accounts");
const fs = require("fs");
const acct = privateKeyToAccount(process.argv[1]);
const jobs = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const types = { TransferWithAuthorization: [
  { name: "from", type: "address" }, { name: "to", type: "address" }, { name: "value", type: "uint256" },
  { name: "validAfter", type: "uint256" }, { name: "validBefore", type: "uint256" }, { name: "nonce", type: "bytes32" } ] };
(async () => {
  for (const j of jobs) {
    const m = j.message;
    const sig = await acct.signTypedData({ domain: j.domain, types, primaryType: "TransferWithAuthorization",
      message: { from: m.from, to: m.to, value: BigInt(m.value), validAfter: BigInt(m.validAfter),
                 validBefore: BigInt(m.validBefore), nonce: m.nonce } });
    console.log(sig);
  }
})().catch((e) => { console.error(String(e)); process.exit(1); });
]]

-- Signs each item's authorization (item.auth) for its requirement
-- (item.req: the token's EIP-712 domain from extra and asset) in one node
-- run; sets item.sig. Returns items.
local function sign_all(items)
  local jobs = {}
  for i, it in ipairs(items) do
    jobs[i] = {
      domain = { name = it.req.extra.name, version = it.req.extra.version, chainId = CHAIN_ID,
        verifyingContract = it.req.asset },
      message = it.auth,
    }
  end
  local f = os.tmpname()
  h.write_file(f, dkjson.encode(jobs))
  local out = h.capture("cd " .. sh_quote(INTEROP) .. " && node -e " .. sh_quote(SIGN_JS) .. " " .. PAYER_KEY
    .. " " .. sh_quote(f) .. " 2>&1")
  os.remove(f)
  local n = 0
  for line in out:gmatch("[^\n]+") do
    if line:match("^0x%x+$") and #line == 132 then
      n = n + 1
      items[n].sig = line
    end
  end
  assert(n == #items, "signing with viem failed: " .. out)
  return items
end

-- ---- base64 and JSON ----

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64V = {}
for i = 1, 64 do
  B64V[B64:sub(i, i)] = i - 1
end

-- Standard base64 with padding, canonical (re-encodes to the same text);
-- an assertion failure otherwise.
local function unbase64(s, what)
  assert(type(s) == "string" and #s > 0 and #s % 4 == 0 and s:match("^[A-Za-z0-9+/]+=?=?$"),
    (what or "value") .. " is not padded standard base64: " .. h.show(tostring(s), 120))
  local out = {}
  local body = s:gsub("=+$", "")
  local bits, nbits = 0, 0
  for i = 1, #body do
    bits = bits * 64 + B64V[body:sub(i, i)]
    nbits = nbits + 6
    if nbits >= 8 then
      nbits = nbits - 8
      local byte = math.floor(bits / 2 ^ nbits)
      out[#out + 1] = string.char(byte)
      bits = bits - byte * 2 ^ nbits
    end
  end
  local raw = table.concat(out)
  assert(h.base64(raw) == s, (what or "value") .. " is not canonical base64")
  return raw
end

local function ascii_only(raw, what)
  local pos = raw:find("[\128-\255]")
  assert(pos == nil, what .. " has a byte >= 0x80 at " .. tostring(pos) .. ": " .. h.show(raw, 300))
end

local function encode(v)
  return h.base64(dkjson.encode(v))
end

local function deep_copy(v)
  if type(v) ~= "table" then
    return v
  end
  local out = {}
  for k, x in pairs(v) do
    out[k] = deep_copy(x)
  end
  return setmetatable(out, getmetatable(v))
end

-- PROTOCOLS.md section 2: 1xxx 400, 2005 429, other 2xxx 500, 3001/3005 422,
-- other 3xxx 500, 4xxx 502.
local function t402_status(code)
  if code >= 1000 and code < 2000 then
    return 400
  elseif code == 2005 then
    return 429
  elseif code >= 2000 and code < 3000 then
    return 500
  elseif code == 3001 or code == 3005 then
    return 422
  elseif code >= 3000 and code < 4000 then
    return 500
  elseif code >= 4000 and code < 5000 then
    return 502
  end
  error("not a t402 code: " .. tostring(code))
end

-- ---- the gateway and its stubs ----

local DIR, gw
local stubs = {}
-- A facilitator that is down: a port held bound but never listening for the
-- whole spec, so connecting is refused and no stub started later can be
-- given the same port (a port only probed free could be).
local closed_port, closed_sock

-- This process's id (busted's LuaJIT): the stubs exit when it is gone.
local SELF_PID = ((h.read_file("/proc/self/stat") or ""):match("^(%d+)"))

local function stub_start(name, mode, target, delay)
  local port = h.free_port()
  local rec = DIR .. "/stub-" .. name .. ".log"
  h.write_file(rec, "")
  local p = assert(io.popen(string.format("luajit %s %d %s %s %s %s %s >%s 2>&1 & echo $!", sh_quote(STUB), port, mode,
    sh_quote(rec), tostring(target or 0), tostring(delay or 0), SELF_PID or "0",
    sh_quote(DIR .. "/stub-" .. name .. ".err"))))
  local pid = tonumber(p:read("*l"))
  p:close()
  assert(pid, "could not start the stub facilitator " .. name)
  local deadline = h.now() + 5
  while true do
    local s = h.connect(port, 0.2)
    if s then
      s:close()
      break
    end
    assert(h.proc_alive(pid) and h.now() < deadline, "stub facilitator " .. name .. " did not listen: "
      .. (h.read_file(DIR .. "/stub-" .. name .. ".err") or ""))
    h.sleep(0.02)
  end
  local st = { name = name, pid = pid, port = port, rec = rec, url = "http://127.0.0.1:" .. port }
  stubs[name] = st
  return st
end

local function stub_stop(st)
  if st and st.pid then
    os.execute("kill " .. st.pid .. " 2>/dev/null")
    local deadline = h.now() + 5
    while h.proc_alive(st.pid) and h.now() < deadline do
      h.sleep(0.02)
    end
    st.pid = nil
  end
end

-- The POST bodies a stub received on path ("/verify", "/settle").
local function calls(st, path)
  local out = {}
  for line in (h.read_file(st.rec) or ""):gmatch("[^\n]+") do
    local method, p, body = line:match("^(%u+) (%S+)\t(.*)$")
    if method == "POST" and p == path then
      out[#out + 1] = body
    end
  end
  return out
end

local function counts(st)
  return { verify = #calls(st, "/verify"), settle = #calls(st, "/settle") }
end

local function pay_policy(price_expr, more)
  return string.format([[
local P = {}
%s
function P.skip(req) return req.path == "/free" end
function P.price(offer, req)
  if req.path == "/zero" then return 0, "USD" end
  return %s
end
return P
]], more or "", price_expr)
end

local function accepts_lua()
  return string.format([[{
      { network = %q, network_v1 = "base-sepolia", asset = %q, name = "USDC", version = "2",
        pay_to = %q, decimals = 6, max_timeout_s = 60 },
      { network = %q, asset = %q, name = "Test Token", version = "1", pay_to = %q, currency = "usd",
        decimals = 18, max_timeout_s = 120 },
    }]], NETWORK, USDC:lower(), PAY_TO, NETWORK, TOKEN18, PAY_TO)
end

local function tenant_lua(name, facilitators, extra_payments, opts)
  opts = opts or {}
  local urls = {}
  for i, u in ipairs(facilitators) do
    urls[i] = string.format("%q", u)
  end
  return string.format([[
    { name = %q, hosts = { %q }, catalog = { source = "pay.xml" }, policy = %q,
      signer = { type = "nginx_secure_link", base_url = %q, key_file = %q, ttl_s = 600 },
      payments = {
        accepts = %s,
        facilitators = { %s },
        description = %q, mime_type = "text/html",
        %s
      } },]], name, name .. ".example", opts.policy or "pay.lua", CDN, DIR .. "/signer.key", accepts_lua(),
    table.concat(urls, ", "), DESCRIPTION, extra_payments or "")
end

local function gateway_opts()
  local t = {
    tenant_lua("pay", { stubs.valid.url }),
    tenant_lua("pol", { stubs.valid.url }, nil, { policy = "pol.lua" }),
    tenant_lua("down", { "http://127.0.0.1:" .. closed_port }),
    tenant_lua("failover", { "http://127.0.0.1:" .. closed_port, stubs.second.url }),
    tenant_lua("invalid", { stubs.invalid.url }),
    tenant_lua("garbage", { stubs.garbage.url }),
    tenant_lua("redirect", { stubs.redirect.url }),
    tenant_lua("slow", { stubs.slow.url }, "facilitator_timeout_ms = 300,"),
    tenant_lua("settlefail", { stubs.settle_fail.url }),
    tenant_lua("pending", { stubs.pending.url }),
    tenant_lua("async", { stubs.async.url }, 'settle = "async",'),
    -- The policy's settle hook chooses per request; the facilitator refuses
    -- every settlement, so "sync" serves nothing and "async" serves first.
    tenant_lua("hook", { stubs.hook.url }, nil, { policy = "hook.lua" }),
    -- No payments section: the 402 JSON body of before the paywall.
    '    { name = "plain", hosts = { "plain.example" }, catalog = { source = "pay.xml" }, policy = "pay.lua" },',
  }
  return {
    workers = 2,
    tenants = table.concat(t, "\n"),
    files = {
      ["pay.xml"] = h.rsl({ amount = "0.001" }),
      ["pay.lua"] = pay_policy("offer.amount, offer.currency"),
      ["pol.lua"] = pay_policy('2500, "USD"'),
      ["hook.lua"] = pay_policy("offer.amount, offer.currency",
        'function P.settle(req, sale) if req.path == "/later" then return "async" end return "sync" end'),
    },
  }
end

local function get(host, path, headers)
  return assert(h.request(gw.port, h.get_req(path, headers, host), { timeout = 15 }))
end

-- The decoded PAYMENT-REQUIRED of res (asserting its form) and its JSON text.
local function required(res)
  local v = res.headers["payment-required"]
  assert(v, "no PAYMENT-REQUIRED header:\n" .. res.head)
  local raw = unbase64(v, "PAYMENT-REQUIRED")
  ascii_only(raw, "PAYMENT-REQUIRED's JSON")
  return h.json_decode(raw), raw
end

local function metrics()
  local res = assert(h.admin_get(gw, "/metrics"))
  assert.are.equal(200, res.status)
  return res.body
end

-- The value of the first series of name whose labels include want (a
-- 'k="v"' string), or 0.
local function metric(body, name, want)
  for line in body:gmatch("[^\n]+") do
    local n, labels, v = line:match("^([%w_]+){(.-)} (%S+)$")
    if n == name and labels:find(want, 1, true) then
      return tonumber(v)
    end
  end
  return 0
end

-- ---- payments ----

-- An authorization paying requirement req, with fields from over.
local function authorization(req, over)
  over = over or {}
  local now = os.time()
  return {
    from = over.from or PAYER,
    to = over.to or req.payTo,
    value = over.value or req.amount or req.maxAmountRequired,
    validAfter = over.validAfter or "0",
    validBefore = over.validBefore or tostring(now + (req.maxTimeoutSeconds or 60) - 5),
    nonce = over.nonce or ("0x" .. h.random_hex(32)),
  }
end

-- A signature of the right form that signs nothing: r and s random below
-- n/2 (so no parser refuses it as high-s), v = 27.
local function junk_signature()
  return "0x3f" .. h.random_hex(31) .. "3f" .. h.random_hex(31) .. "1b"
end

-- A version 2 PaymentPayload as the x402 2.x client sends it.
local function payload_v2(url, accepted, auth, sig)
  return {
    x402Version = 2,
    resource = { url = url },
    accepted = accepted,
    payload = { signature = sig or junk_signature(), authorization = auth },
  }
end

local function payload_t402(accepted, auth, sig)
  return { t402Version = 2, accepted = accepted, payload = { signature = sig or junk_signature(), authorization = auth } }
end

local function payload_v1(network, auth, sig)
  return { x402Version = 1, scheme = "exact", network = network,
    payload = { signature = sig or junk_signature(), authorization = auth } }
end

local function with_payment(value, v1)
  return { (v1 and "X-PAYMENT: " or "PAYMENT-SIGNATURE: ") .. value }
end

-- The challenge for host/path: response, decoded v2 and its text.
local function challenge(host, path)
  local res = get(host, path)
  assert.are.equal(402, res.status, res.head .. res.body)
  local pr, raw = required(res)
  return res, pr, raw
end

-- A refusal: a T402 body whose code is one of codes, its PROTOCOLS.md
-- status (or status when given), the challenge again, nothing served.
local function refused(res, codes, status, what)
  what = what or ""
  if type(codes) == "number" then
    codes = { codes }
  end
  local body = h.json_decode(res.body)
  assert(type(body.code) == "string", what .. ": no code in " .. res.body)
  local code = tonumber(body.code:match("^T402%-(%d%d%d%d)$"))
  assert(code, what .. ": code is not T402-NNNN: " .. res.body)
  local listed = false
  for _, c in ipairs(codes) do
    listed = listed or c == code
  end
  assert(listed, what .. ": got " .. body.code .. ", want T402-" .. table.concat(codes, " or T402-") .. "\n"
    .. res.head .. res.body)
  assert.are.equal(status or t402_status(code), res.status, what .. ": " .. res.head .. res.body)
  assert(type(body.message) == "string" and #body.message > 0, what .. ": no message: " .. res.body)
  assert(res.headers["payment-required"], what .. ": no PAYMENT-REQUIRED with the refusal:\n" .. res.head)
  required(res)
  assert.is_nil(res.headers["location"], what .. ": a Location on a refusal")
  assert.are.equal("no-store", res.headers["cache-control"], what)
  assert.truthy((res.headers["content-type"] or ""):find("application/json", 1, true), what)
  return code, body
end

local function not_served(res, what)
  assert(res.status ~= 302 and res.status ~= 200, (what or "") .. ": served: " .. res.head .. res.body)
  assert.is_nil(res.headers["location"], (what or "") .. ": a Location:\n" .. res.head)
end

-- nginx secure_link: md5 = base64url (no padding) of MD5("<expires><uri> <secret>").
local function secure_link_md5(expires, path)
  local out = h.capture(string.format("printf '%%s' %s | openssl md5 -binary | base64", sh_quote(expires .. path
    .. " " .. SECRET)))
  return (out:gsub("%s+$", ""):gsub("+", "-"):gsub("/", "_"):gsub("=", ""))
end

-- A served answer: 302 to the tenant signer's URL for path, signed right.
local function served(res, path, what)
  what = what or ""
  assert.are.equal(302, res.status, what .. ": " .. res.head .. res.body)
  local loc = res.headers["location"]
  assert(loc, what .. ": no Location")
  local prefix = CDN .. path .. "?"
  assert.are.equal(prefix, loc:sub(1, #prefix), what .. ": Location " .. loc)
  local md5, expires = loc:match("[?&]md5=([%w_%-]+)"), loc:match("[?&]expires=(%d+)")
  assert(md5 and expires, what .. ": Location without md5 and expires: " .. loc)
  assert.are.equal(secure_link_md5(expires, path), md5, what .. ": md5 of " .. loc)
  assert(tonumber(expires) > os.time(), what .. ": expired link " .. loc)
  return loc
end

-- The decoded PAYMENT-RESPONSE (or X-PAYMENT-RESPONSE with v1) of res.
local function payment_response(res, v1)
  local v = res.headers[v1 and "x-payment-response" or "payment-response"]
  assert(v, "no " .. (v1 and "X-" or "") .. "PAYMENT-RESPONSE:\n" .. res.head)
  local raw = unbase64(v, "PAYMENT-RESPONSE")
  ascii_only(raw, "PAYMENT-RESPONSE's JSON")
  return h.json_decode(raw)
end

-- A signed version 2 payment for host/path's first (or index) requirement:
-- the header value, the requirement and the authorization.
local function signed_v2(host, path, over, index)
  local _, pr = challenge(host, path)
  local req = pr.accepts[index or 1]
  local item = sign_all({ { req = req, auth = authorization(req, over) } })[1]
  return encode(payload_v2(pr.resource.url, req, item.auth, item.sig)), req, item.auth, pr
end

local function wait_for(fn, seconds)
  local deadline = h.now() + (seconds or 10)
  repeat
    local v = fn()
    if v then
      return v
    end
    h.sleep(0.05)
  until h.now() > deadline
  return nil
end

-- A gateway of one tenant selling with settle = "async" through facilitator
-- url, in a folder of its own (h.start).
local function async_gateway(url)
  local g = h.start({
    workers = 1,
    tenants = tenant_lua("durable", { url }, 'settle = "async",'),
    files = { ["pay.xml"] = h.rsl({ amount = "0.001" }), ["pay.lua"] = pay_policy("offer.amount, offer.currency") },
  })
  assert(h.wait_ready(g))
  return g
end

describe("x402/t402 paywall", function()
  local saved_limits

  setup(function()
    local p = assert(io.popen("mktemp -d /tmp/tollgate-e2e-paywall-XXXXXX"))
    DIR = p:read("*l")
    p:close()
    assert(DIR and DIR ~= "", "mktemp -d failed")
    h.write_file(DIR .. "/signer.key", SECRET .. "\n", "600")
    assert(h.sh("command -v openssl >/dev/null 2>&1"), "openssl is needed to check the nginx secure_link hashes")
    closed_sock = assert(socket.tcp4())
    assert(closed_sock:bind(h.HOST, 0))
    local _, port = closed_sock:getsockname()
    closed_port = tonumber(port)
    stub_start("valid", "valid")
    stub_start("second", "valid")
    stub_start("invalid", "invalid")
    stub_start("garbage", "garbage")
    stub_start("target", "valid") -- where the redirecting one points: must never be asked
    stub_start("redirect", "redirect", stubs.target.port)
    stub_start("slow", "slow", 0, 3)
    stub_start("settle_fail", "settle_fail")
    stub_start("pending", "pending")
    stub_start("async", "valid")
    stub_start("hook", "settle_fail")
    -- A payment header may be 8192 bytes: the request's header limit must
    -- let a larger one through for the paywall to judge it.
    saved_limits = h.LIMITS
    h.LIMITS = setmetatable({ max_header_bytes = 65536 }, { __index = saved_limits })
    gw = h.start(gateway_opts())
    h.LIMITS = saved_limits
    assert(h.wait_ready(gw))
  end)

  teardown(function()
    h.LIMITS = saved_limits or h.LIMITS
    if gw and not gw.stopped then
      local exited, rc = h.stop(gw, 10, true)
      assert(exited, "tollgate did not exit on SIGTERM")
      assert(rc == 0, "tollgate exit status " .. tostring(rc) .. "; log:\n" .. gw.log())
    end
    for _, st in pairs(stubs) do
      stub_stop(st)
    end
    if closed_sock then
      closed_sock:close()
    end
    if DIR and DIR:match("^/tmp/tollgate%-e2e%-paywall%-") and not os.getenv("TG_E2E_KEEP") then
      os.execute("rm -rf " .. sh_quote(DIR))
      if gw then
        os.execute("rm -rf " .. sh_quote(gw.dir))
      end
    end
  end)

  -- ---- the challenge ----

  describe("an unpaid request", function()
    it("-> 402 with PAYMENT-REQUIRED (v2 and t402), no-store, JSON, the v1 body", function()
      local res = get("pay.example", "/article")
      assert.are.equal(402, res.status, res.head .. res.body)
      assert.are.equal("no-store", res.headers["cache-control"])
      assert.truthy((res.headers["content-type"] or ""):find("^application/json"), res.head)
      local pr, raw = required(res)
      assert(#res.headers["payment-required"] < 3000, "PAYMENT-REQUIRED is " .. #res.headers["payment-required"]
        .. " bytes: clients have failed on 3.5 KB")
      assert.are.equal(2, pr.x402Version, raw)
      assert.are.equal(2, pr.t402Version, raw)
      assert.are.equal("http://pay.example/article", pr.resource.url, raw)
      assert.are.equal(DESCRIPTION, pr.resource.description, raw)
      assert.are.equal("text/html", pr.resource.mimeType, raw)
      assert.are.equal(2, #pr.accepts, raw)
      assert.are.same({
        scheme = "exact", network = NETWORK, amount = AMOUNT6, asset = USDC, payTo = PAY_TO,
        maxTimeoutSeconds = 60, extra = { name = "USDC", version = "2" },
      }, pr.accepts[1])
      assert.are.same({
        scheme = "exact", network = NETWORK, amount = AMOUNT18, asset = TOKEN18, payTo = PAY_TO,
        maxTimeoutSeconds = 120, extra = { name = "Test Token", version = "1" },
      }, pr.accepts[2])

      -- The body: version 1, only the offer with a v1 network name.
      ascii_only(res.body, "the v1 body")
      local v1 = h.json_decode(res.body)
      assert.are.equal(1, v1.x402Version, res.body)
      assert.is_nil(v1.t402Version, res.body)
      assert.are.equal(1, #v1.accepts, res.body)
      local a = v1.accepts[1]
      assert.are.equal("exact", a.scheme, res.body)
      assert.are.equal("base-sepolia", a.network, res.body)
      assert.are.equal(AMOUNT6, a.maxAmountRequired, res.body)
      assert.are.equal("http://pay.example/article", a.resource, res.body)
      assert.are.equal(PAY_TO, a.payTo, res.body)
      assert.are.equal(USDC, a.asset, res.body)
      assert.are.equal(DESCRIPTION, a.description, res.body)
      assert.are.equal("text/html", a.mimeType, res.body)
      assert.are.equal(60, a.maxTimeoutSeconds, res.body)
      assert.are.same({ name = "USDC", version = "2" }, a.extra, res.body)
    end)

    it("non-ASCII text is \\u-escaped in the header's JSON and in the body", function()
      local res = get("pay.example", "/article")
      local _, raw = required(res)
      for _, text in ipairs({ raw, res.body }) do
        local lower = text:lower()
        assert.truthy(lower:find("caf\\u00e9 \\u65e5\\u672c news", 1, true), "no \\u escapes in " .. text)
      end
    end)

    it("resource.url is the request's URL, query included", function()
      local _, pr, raw = challenge("pay.example", "/a/b.html?x=1&y=2")
      assert.are.equal("http://pay.example/a/b.html?x=1&y=2", pr.resource.url, raw)
    end)

    it("is stable: byte-identical answers, served from the cache", function()
      local before = metric(metrics(), "t402_requirements_cache_total", 'result="hit"')
      local first = get("pay.example", "/stable")
      -- Two workers, each with its own cache: of 6 requests, at most 2 miss.
      for _ = 1, 5 do
        local again = get("pay.example", "/stable")
        assert.are.equal(402, again.status)
        assert.are.equal(first.headers["payment-required"], again.headers["payment-required"])
        assert.are.equal(first.body, again.body)
      end
      local after = metric(metrics(), "t402_requirements_cache_total", 'result="hit"')
      assert(after - before >= 4, "t402_requirements_cache_total{result=\"hit\"} went from " .. before .. " to "
        .. after .. " over 6 requests for one resource")
    end)

    it("a policy reload that changes the price changes the challenge", function()
      local _, pr = challenge("pol.example", "/article")
      assert.are.equal("2500", pr.accepts[1].amount)
      assert.are.equal("2500000000000000", pr.accepts[2].amount)
      h.write_file(gw.dir .. "/pol.lua", pay_policy('4000, "USD"'))
      local res = h.admin(gw, "POST", "/reload?tenant=pol")
      assert.are.equal(200, res.status, res.body)
      local changed = wait_for(function()
        local _, now = challenge("pol.example", "/article")
        return now.accepts[1].amount == "4000" and now
      end, 5)
      assert(changed, "the challenge kept its old price after the reload")
      assert.are.equal("4000000000000000", changed.accepts[2].amount)
      -- Both workers: every answer has the new price.
      for _ = 1, 4 do
        local _, now = challenge("pol.example", "/article")
        assert.are.equal("4000", now.accepts[1].amount)
      end
    end)

    it("free paths are served without payment: the skip hook and a price of 0", function()
      for _, path in ipairs({ "/free", "/zero" }) do
        local res = get("pay.example", path)
        assert.are.equal(200, res.status, path .. ": " .. res.head .. res.body)
        assert.is_nil(res.headers["payment-required"], path)
        local body = h.json_decode(res.body)
        assert.are.equal("free", body.access, res.body)
        assert.are.equal("pay", body.tenant, res.body)
      end
    end)

    it("a tenant without payments keeps the old 402 JSON body", function()
      local res = get("plain.example", "/article")
      assert.are.equal(402, res.status, res.body)
      assert.is_nil(res.headers["payment-required"], res.head)
      local body = h.json_decode(res.body)
      assert.are.equal("payment required", body.error, res.body)
      assert.are.equal("/article", body.resource, res.body)
      assert.are.equal("http://plain.example/article", body.uri, res.body)
      assert.are.same({ amount = "1000", currency = "USD" }, body.price, res.body)
      assert.is_nil(body.x402Version, res.body)
    end)
  end)

  -- ---- refusals before anything reaches a facilitator ----

  describe("a malformed or wrong payment", function()
    local req, url, req_header, before

    setup(function()
      local res, pr = challenge("pay.example", "/article")
      req, url, req_header = pr.accepts[1], pr.resource.url, res.headers["payment-required"]
      before = counts(stubs.valid)
    end)

    teardown(function()
      local after = counts(stubs.valid)
      assert.are.same(before, after, "a refused payment reached the facilitator")
    end)

    local function send(value, v1)
      return get("pay.example", "/article", with_payment(value, v1))
    end

    local function good_json(over_accepted, over_auth)
      local accepted = deep_copy(req)
      for k, v in pairs(over_accepted or {}) do
        accepted[k] = v
      end
      return dkjson.encode(payload_v2(url, accepted, authorization(req, over_auth)))
    end

    local function good(over_accepted, over_auth)
      return h.base64(good_json(over_accepted, over_auth))
    end

    local function refused_with(value, codes, what, v1)
      local res = send(value, v1)
      refused(res, codes, nil, what)
      assert.are.equal(req_header, res.headers["payment-required"], what .. ": the refusal's challenge differs")
      return res
    end

    it("not base64 -> T402-1001", function()
      refused_with("!!!not base64!!!", 1001, "not base64")
    end)

    it("base64 of something that is not JSON -> T402-1001", function()
      refused_with(h.base64("this is not json at all"), 1001, "not JSON")
      refused_with(h.base64("[1,2,3]"), 1001, "a JSON array")
    end)

    it("the base64url alphabet -> T402-1001", function()
      -- ASCII JSON rarely has + or / in its base64: '?' runs (0x3f) give
      -- 6-bit groups of ones at some alignment; try the three.
      local p = payload_v2(url, deep_copy(req), authorization(req))
      p.resource.description = "??????"
      local json
      for pad = 0, 2 do
        p.resource.description = string.rep(" ", pad) .. "??????"
        json = dkjson.encode(p)
        if h.base64(json):find("[+/]") then
          break
        end
      end
      assert(h.base64(json):find("[+/]"), "no + or / in " .. h.base64(json))
      local url_alpha = h.base64(json):gsub("+", "-"):gsub("/", "_")
      refused_with(url_alpha, 1001, "base64url")
    end)

    it("missing padding -> T402-1001", function()
      local json = good_json()
      while #json % 3 == 0 do
        json = json .. " "
      end
      local unpadded = h.base64(json):gsub("=", "")
      refused_with(unpadded, 1001, "unpadded")
    end)

    it("an empty PAYMENT-SIGNATURE -> T402-1002 (or 1001)", function()
      local res = get("pay.example", "/article", { "PAYMENT-SIGNATURE: " })
      -- An empty header value may also be a malformed request to the HTTP layer.
      if res.status == 400 and not res.headers["payment-required"] then
        return
      end
      refused(res, { 1002, 1001 }, nil, "empty")
    end)

    it("a value over 8192 bytes -> T402-1001 (not 431: the request limit is raised here)", function()
      local p = payload_v2(url, deep_copy(req), authorization(req))
      p.resource.description = string.rep("x", 7000)
      local value = encode(p)
      assert(#value > 8192)
      local res = send(value)
      assert(res.status ~= 431, "431: the test's max_header_bytes did not apply")
      refused(res, 1001, nil, "over 8192 bytes")
    end)

    it("both x402Version and t402Version -> T402-1001", function()
      local p = payload_v2(url, deep_copy(req), authorization(req))
      p.t402Version = 2
      refused_with(encode(p), 1001, "both versions")
    end)

    it("a version 1 payload in PAYMENT-SIGNATURE -> T402-1001", function()
      refused_with(encode(payload_v1("base-sepolia", authorization(req))), 1001, "v1 in PAYMENT-SIGNATURE")
    end)

    it("a version 2 payload in X-PAYMENT -> T402-1001", function()
      refused_with(encode(payload_v2(url, deep_copy(req), authorization(req))), 1001, "v2 in X-PAYMENT", true)
    end)

    it("duplicate keys in the JSON -> T402-1001", function()
      local json = good_json()
      refused_with(h.base64('{"x402Version":2,' .. json:sub(2)), 1001, "duplicate x402Version")
    end)

    it("JSON with bytes that are not UTF-8 -> T402-1001", function()
      local p = payload_v2(url, deep_copy(req), authorization(req))
      p.resource.description = "AB"
      local json = dkjson.encode(p):gsub("AB", "A\255B")
      refused_with(h.base64(json), 1001, "not UTF-8")
    end)

    it("x402Version 3 -> T402-1001", function()
      local p = payload_v2(url, deep_copy(req), authorization(req))
      p.x402Version = 3
      refused_with(encode(p), 1001, "x402Version 3")
    end)

    it("scheme \"upto\" -> T402-1008 or T402-3005", function()
      refused_with(encode(payload_v2(url, (function()
        local a = deep_copy(req)
        a.scheme = "upto"
        return a
      end)(), authorization(req))), { 1008, 3005 }, "upto")
    end)

    local MISMATCH = {
      { "amount", { amount = "1001" } },
      { "payTo", { payTo = OTHER } },
      { "asset", { asset = TOKEN18 } },
      { "network", { network = "eip155:8453" } },
      { "extra.name", { extra = { name = "USD Coin", version = "2" } } },
      { "maxTimeoutSeconds", { maxTimeoutSeconds = 61 } },
    }
    for _, m in ipairs(MISMATCH) do
      it("accepted differing from the offer in " .. m[1] .. " -> T402-3005 (422)", function()
        local res = refused_with(good(m[2]), 3005, "accepted." .. m[1])
        assert.are.equal(422, res.status)
      end)
    end

    it("accepted with a field more in extra -> T402-3005", function()
      refused_with(good({ extra = { name = "USDC", version = "2", paymentFlow = "upfront" } }), 3005,
        "extra.paymentFlow")
    end)

    it("the authorization paying another address -> T402-1010", function()
      refused_with(good(nil, { to = OTHER }), 1010, "to")
    end)

    it("a value below the amount -> T402-1009", function()
      refused_with(good(nil, { value = "999" }), 1009, "value 999")
    end)

    it("x402: a value above the amount -> T402-1009 (x402 pays the exact amount)", function()
      refused_with(good(nil, { value = "1001" }), 1009, "value 1001")
    end)

    it("expired (validBefore = now) -> T402-1011", function()
      refused_with(good(nil, { validBefore = tostring(os.time()) }), 1011, "validBefore now")
    end)

    it("not valid yet (validAfter in the future) -> T402-1011", function()
      refused_with(good(nil, { validAfter = tostring(os.time() + 600) }), 1011, "validAfter future")
    end)

    it("a signature that signs nothing (random r, s; v = 27) -> T402-1006", function()
      refused_with(good(), 1006, "junk signature")
    end)

    it_signed("a real signature over other values -> T402-1006", function()
      local item = sign_all({ { req = req, auth = authorization(req) } })[1]
      local auth = deep_copy(item.auth)
      auth.nonce = "0x" .. h.random_hex(32)
      refused_with(encode(payload_v2(url, deep_copy(req), auth, item.sig)), 1006, "signature of another nonce")
    end)
  end)

  -- ---- paid ----

  describe("a valid payment", function()
    it_signed("sync: 302 to the signer's URL with PAYMENT-RESPONSE, after /verify and /settle", function()
      local before = counts(stubs.valid)
      local value, req, auth = signed_v2("pay.example", "/article")
      local res = get("pay.example", "/article", with_payment(value))
      served(res, "/article", "sync")
      local pr = payment_response(res)
      assert.is_true(pr.success, dkjson.encode(pr))
      assert.truthy((pr.transaction or ""):match("^0x" .. string.rep("%x", 64) .. "$"), dkjson.encode(pr))
      assert.are.equal(NETWORK, pr.network, dkjson.encode(pr))
      assert.are.equal(PAYER, pr.payer, dkjson.encode(pr))
      local after = counts(stubs.valid)
      assert.are.equal(before.verify + 1, after.verify)
      assert.are.equal(before.settle + 1, after.settle)
      -- What the facilitator was asked.
      local body = h.json_decode(calls(stubs.valid, "/settle")[after.settle])
      assert.are.equal(2, body.x402Version)
      assert.are.same(req, body.paymentRequirements)
      assert.are.same(auth, body.paymentPayload.payload.authorization)
      assert.are.same(req, body.paymentPayload.accepted)
    end)

    it_signed("the 18-decimals asset: its amount, its domain", function()
      local value = signed_v2("pay.example", "/article18", nil, 2)
      local res = get("pay.example", "/article18", with_payment(value))
      served(res, "/article18", "18 decimals")
      assert.is_true(payment_response(res).success)
    end)

    it_signed("t402: a value above the amount is accepted; the facilitator body carries t402Version", function()
      local _, pr = challenge("pay.example", "/t402")
      local req = pr.accepts[1]
      local item = sign_all({ { req = req, auth = authorization(req, { value = "1500" }) } })[1]
      local res = get("pay.example", "/t402", with_payment(encode(payload_t402(req, item.auth, item.sig))))
      served(res, "/t402", "t402")
      local settles = calls(stubs.valid, "/settle")
      local body = h.json_decode(settles[#settles])
      assert.are.equal(2, body.t402Version, settles[#settles])
      assert.is_nil(body.x402Version, settles[#settles])
    end)

    it_signed("version 1 in X-PAYMENT: served with X-PAYMENT-RESPONSE", function()
      local res0 = get("pay.example", "/v1")
      local req = h.json_decode(res0.body).accepts[1]
      local item = sign_all({ { req = req, auth = authorization(req) } })[1]
      local res = get("pay.example", "/v1", with_payment(encode(payload_v1("base-sepolia", item.auth, item.sig)), true))
      served(res, "/v1", "v1")
      assert.is_true(payment_response(res, true).success)
      local settles = calls(stubs.valid, "/settle")
      local body = h.json_decode(settles[#settles])
      assert.are.equal(1, body.x402Version, settles[#settles])
      assert.are.equal(AMOUNT6, body.paymentRequirements.maxAmountRequired, settles[#settles])
    end)

    it_signed("async: 302 at once, then the settlement reaches the facilitator", function()
      local before = counts(stubs.async)
      local value = signed_v2("async.example", "/article")
      local res = get("async.example", "/article", with_payment(value))
      served(res, "/article", "async")
      local settled = wait_for(function()
        return counts(stubs.async).settle > before.settle
      end, 15)
      assert(settled, "no /settle reached the facilitator within 15 s of an async sale; log:\n" .. gw.log())
    end)
  end)

  describe("a replayed payment", function()
    it_signed("the same PAYMENT-SIGNATURE twice: served once, then T402-3006 without asking the facilitator",
      function()
        local value = signed_v2("pay.example", "/replay")
        served(get("pay.example", "/replay", with_payment(value)), "/replay", "first")
        local before = counts(stubs.valid)
        local res = get("pay.example", "/replay", with_payment(value))
        refused(res, 3006, nil, "replay")
        assert.are.same(before, counts(stubs.valid), "the replay reached the facilitator")
      end)

    it_signed("the same authorization in other JSON bytes -> T402-3006", function()
      local value, _, _, pr = signed_v2("pay.example", "/replay2")
      served(get("pay.example", "/replay2", with_payment(value)), "/replay2", "first")
      local json = h.json_decode(unbase64(value))
      json.resource = { url = pr.resource.url, description = "another spelling" }
      local res = get("pay.example", "/replay2", with_payment(encode(json)))
      refused(res, 3006, nil, "re-encoded replay")
      -- and on another resource of the same price
      res = get("pay.example", "/elsewhere", with_payment(value))
      refused(res, 3006, nil, "replay on another path")
    end)

    it_signed("two copies at once: exactly one is served", function()
      local value = signed_v2("pay.example", "/race")
      local before = counts(stubs.valid)
      local raw = h.get_req("/race", with_payment(value), "pay.example")
      local a = assert(h.connect(gw.port, 15))
      local b = assert(h.connect(gw.port, 15))
      assert(h.send(a, raw))
      assert(h.send(b, raw))
      local ra = assert(h.read_response(a, 15))
      local rb = assert(h.read_response(b, 15))
      a:close()
      b:close()
      local ok, no = ra, rb
      if rb.status == 302 then
        ok, no = rb, ra
      end
      served(ok, "/race", "race winner")
      refused(no, 3006, nil, "race loser")
      local after = counts(stubs.valid)
      assert.are.equal(before.settle + 1, after.settle, "settled more than once")
    end)
  end)

  -- ---- facilitators misbehaving ----

  describe("the facilitator", function()
    it_signed("down (nothing listening) -> T402-2006, nothing served", function()
      local value = signed_v2("down.example", "/article")
      local t0 = h.now()
      local res = get("down.example", "/article", with_payment(value))
      refused(res, 2006, nil, "down")
      not_served(res, "down")
      assert(h.now() - t0 < 12, "took " .. (h.now() - t0) .. " s")
    end)

    it_signed("the first down, the second up: served through the second", function()
      local before = counts(stubs.second)
      local value = signed_v2("failover.example", "/article")
      local res = get("failover.example", "/article", with_payment(value))
      served(res, "/article", "failover")
      local after = counts(stubs.second)
      assert.are.equal(before.verify + 1, after.verify)
      assert.are.equal(before.settle + 1, after.settle)
    end)

    it_signed("isValid false -> T402-3001/3003, no settlement", function()
      local before = counts(stubs.invalid)
      local value = signed_v2("invalid.example", "/article")
      local res = get("invalid.example", "/article", with_payment(value))
      refused(res, { 3001, 3003 }, nil, "invalid")
      not_served(res)
      local after = counts(stubs.invalid)
      assert.are.equal(before.verify + 1, after.verify)
      assert.are.equal(before.settle, after.settle)
    end)

    it_signed("garbage (200 \"not json\") -> 502, nothing served", function()
      local value = signed_v2("garbage.example", "/article")
      local res = get("garbage.example", "/article", with_payment(value))
      refused(res, { 2001, 4001, 3001 }, 502, "garbage")
      not_served(res)
      assert.are.equal(0, counts(stubs.garbage).settle)
    end)

    it_signed("a 308 redirect is not followed -> 502, nothing served", function()
      local value = signed_v2("redirect.example", "/article")
      local res = get("redirect.example", "/article", with_payment(value))
      assert.are.equal(502, res.status, res.head .. res.body)
      refused(res, { 2001, 4001, 3001 }, 502, "redirect")
      not_served(res)
      assert.are.same({ verify = 0, settle = 0 }, counts(stubs.target), "the redirect was followed")
      assert(#calls(stubs.redirect, "/verify") >= 1, "the redirecting facilitator was never asked")
      assert.are.equal(0, #calls(stubs.redirect, "/settle"), "settled after a redirected verification")
    end)

    it_signed("slower than facilitator_timeout_ms -> T402-2006 in time, nothing served", function()
      local value = signed_v2("slow.example", "/article")
      local t0 = h.now()
      local res = get("slow.example", "/article", with_payment(value))
      local took = h.now() - t0
      refused(res, 2006, nil, "slow")
      not_served(res)
      assert(took < 2.9, "answered after " .. took .. " s: the 300 ms facilitator timeout was not applied")
    end)

    it_signed("settlement refused after a good verification -> 402, PAYMENT-RESPONSE success false, nothing served",
      function()
        local before = counts(stubs.settle_fail)
        local value = signed_v2("settlefail.example", "/article")
        local res = get("settlefail.example", "/article", with_payment(value))
        assert.are.equal(402, res.status, res.head .. res.body)
        not_served(res)
        local pr = payment_response(res)
        assert.is_false(pr.success, dkjson.encode(pr))
        local body = h.json_decode(res.body)
        assert.truthy(type(body.code) == "string" and body.code:match("^T402%-%d%d%d%d$"), res.body)
        local after = counts(stubs.settle_fail)
        assert.are.equal(before.verify + 1, after.verify)
        assert.are.equal(before.settle + 1, after.settle)
      end)

    it_signed("settlement pending -> served (queued), PAYMENT-RESPONSE names the transaction, asked again later",
      function()
        local before = counts(stubs.pending)
        local value = signed_v2("pending.example", "/article")
        local res = get("pending.example", "/article", with_payment(value))
        served(res, "/article", "pending")
        local pr = payment_response(res)
        assert.truthy((pr.transaction or ""):match("^0x" .. string.rep("%x", 64) .. "$"), dkjson.encode(pr))
        assert(counts(stubs.pending).settle >= before.settle + 1, "served before any /settle")
        -- settlement_pending is not final: the queue asks again (it may have already).
        assert(wait_for(function()
          return counts(stubs.pending).settle > before.settle + 1
        end, 15), "a pending settlement was never asked about again")
      end)

    it_signed("the policy's settle hook: \"sync\" settles first (refused: not served), \"async\" serves first",
      function()
        local before = counts(stubs.hook)
        local value = signed_v2("hook.example", "/now")
        local res = get("hook.example", "/now", with_payment(value))
        assert.are.equal(402, res.status, "sync by the hook: " .. res.head .. res.body)
        not_served(res, "sync by the hook")
        assert.is_false(payment_response(res).success)
        assert.are.equal(before.settle + 1, counts(stubs.hook).settle)

        value = signed_v2("hook.example", "/later")
        res = get("hook.example", "/later", with_payment(value))
        served(res, "/later", "async by the hook")
        local settled = wait_for(function()
          return counts(stubs.hook).settle > before.settle + 1
        end, 15)
        assert(settled, "no /settle within 15 s of a sale the hook made async")
      end)

    it("the gateway is still healthy", function()
      assert(h.alive(gw.port))
      for name, st in pairs(stubs) do
        assert(h.proc_alive(st.pid), "stub " .. name .. " died")
      end
    end)
  end)
end)

describe("an async sale and a crash", function()
  local g, st

  setup(function()
    local p = assert(io.popen("mktemp -d /tmp/tollgate-e2e-paywall-XXXXXX"))
    DIR = p:read("*l")
    p:close()
    assert(DIR and DIR ~= "", "mktemp -d failed")
    h.write_file(DIR .. "/signer.key", SECRET .. "\n", "600")
    -- Settles answer after 2 s: the gateway dies with its first one in flight.
    st = stub_start("durable", "slow_settle", 0, 2)
    g = async_gateway(st.url)
  end)

  teardown(function()
    if g and not g.stopped then
      local exited, rc = h.stop(g, 10, true)
      assert(exited and rc == 0, "tollgate exit status " .. tostring(rc) .. "; log:\n" .. g.log())
    end
    stub_stop(st)
    if not os.getenv("TG_E2E_KEEP") then
      for _, d in ipairs({ DIR, g and g.dir }) do
        if d and d:match("^/tmp/tollgate%-e2e%-") then
          os.execute("rm -rf " .. sh_quote(d))
        end
      end
    end
  end)

  it_signed("served, SIGKILLed before the settlement finished: settled after the restart", function()
    local res0 = assert(h.request(g.port, h.get_req("/article", nil, "durable.example"), { timeout = 10 }))
    assert.are.equal(402, res0.status, res0.body)
    local pr = required(res0)
    local req = pr.accepts[1]
    local item = sign_all({ { req = req, auth = authorization(req) } })[1]
    local value = encode(payload_v2(pr.resource.url, req, item.auth, item.sig))
    local res = assert(h.request(g.port, h.get_req("/article", with_payment(value), "durable.example"),
      { timeout = 10 }))
    served(res, "/article", "async before the crash")
    h.kill9(g)
    local at_restart = counts(st).settle
    h.relaunch(g)
    assert(h.wait_ready(g))
    local asked = wait_for(function()
      return counts(st).settle > at_restart
    end, 20)
    assert(asked, "no /settle after the restart (" .. at_restart .. " before it); log:\n" .. g.log())
    local settled = wait_for(function()
      return #h.log_lines(g, "settlement settled") > 0
    end, 10)
    assert(settled, "the settlement was not settled after the restart; log:\n" .. g.log())
  end)
end)
