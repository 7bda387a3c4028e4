-- ExecuteTransaction against the real binary (core/pipeline/purchase.h): an
-- agent discovers offers, buys them from its prepaid account (the built-in
-- ledger) and gets nginx secure_link retrieval URLs. Approval, byte-exact
-- replays (JSON and proto, across a restart), key conflicts, concurrent
-- duplicates, denials that charge nothing, bad offers, limits, several
-- tenants in one call, a tenant that cannot sign, metrics, and an offer
-- withdrawn by a policy reload. Balances come from the admin /ledger routes.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local NEWS_SECRET = "news-secret-" .. h.random_hex(8)
local BLOG_SECRET = "blog-secret-" .. h.random_hex(8)
local NEWS_PRICE, BLOG_PRICE = 15000, 20000
local SIGN_TTL = 600

-- The signer keys, mode 600, in a folder of their own that every gateway of
-- this file names by absolute path (the signer reads them at start).
local KEYS = (function()
  local p = assert(io.popen("mktemp -d /tmp/tollgate-e2e-keys-XXXXXX"))
  local dir = p:read("*l")
  p:close()
  assert(dir and dir ~= "", "mktemp -d failed")
  h.write_file(dir .. "/news.key", NEWS_SECRET .. "\n", "600")
  h.write_file(dir .. "/blog.key", BLOG_SECRET .. "\n", "600")
  return dir
end)()

local ACCOUNTS = {
  ["acct-a"] = 100000, -- approval, replays
  ["acct-b"] = 100000, -- the same key under another billing reference
  ["acct-conflict"] = 100000,
  ["acct-conc"] = 100000,
  ["acct-poor"] = 10000,
  ["acct-bad"] = 100000, -- bad offers: never charged
  ["acct-items"] = 2000000,
  ["acct-keys"] = 1000000,
  ["acct-multi"] = 100000,
  ["acct-multi-short"] = 25000, -- one of news/blog, not both
  ["acct-nosign"] = 20000, -- one news item, if the failed call's hold went back
  ["acct-metrics"] = 1000000,
  ["acct-policy"] = 100000,
  ["acct-restart"] = 100000,
  ["acct-expire"] = 100000,
  ["acct-drop"] = 100000,
  ["acct-topup"] = 1000,
  ["acct-misc"] = 1000000,
  ["acct-race"] = 40000, -- two of eight concurrent 15000 purchases
}

local function tenants_lua(opts)
  opts = opts or {}
  local signer = '{ type = "nginx_secure_link", base_url = "%s", key_file = %q, ttl_s = %d }'
  local news_hosts = opts.news_moved and '"news-old.example"' or '"news.example"'
  local list = {
    string.format('{ name = "news", hosts = { %s }, catalog = { source = "news.xml" }, signer = %s, '
      .. 'billing = { type = "builtin" } },', news_hosts, string.format(signer, "http://cdn.test", KEYS .. "/news.key", SIGN_TTL)),
    string.format('{ name = "blog", hosts = { "blog.example" }, catalog = { source = "blog.xml" }, signer = %s, '
      .. 'billing = { type = "builtin" } },', string.format(signer, "http://cdn-blog.test", KEYS .. "/blog.key", SIGN_TTL)),
    '{ name = "eur", hosts = { "eur.example" }, catalog = { source = "eur.xml" }, signer = '
      .. string.format(signer, "http://cdn-eur.test", KEYS .. "/news.key", SIGN_TTL) .. ' },',
    '{ name = "nosign", hosts = { "nosign.example" }, catalog = { source = "news.xml" } },',
    string.format('{ name = "pol", hosts = { "pol.example" }, catalog = { source = "news.xml" }, policy = "pol.lua", '
      .. 'signer = %s },', string.format(signer, "http://cdn.test", KEYS .. "/news.key", SIGN_TTL)),
  }
  if opts.news_moved then
    -- news.example now belongs to another tenant: news's old offers name a host it no longer serves.
    list[#list + 1] = '{ name = "other", hosts = { "news.example" }, catalog = { source = "news.xml" } },'
  end
  return table.concat(list, "\n    ")
end

local function extra_lua(opts)
  opts = opts or {}
  local accts = {}
  local names = {}
  for name in pairs(ACCOUNTS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    accts[#accts + 1] = string.format('{ billing_reference = %q, amount = %d }', name, ACCOUNTS[name])
  end
  local s = "ledger = { accounts = { " .. table.concat(accts, ", ") .. " } },"
  if opts.offer_ttl_s then
    s = s .. string.format("\n  exchange = { offer_ttl_s = %d },", opts.offer_ttl_s)
  end
  return s
end

local function gw_opts(opts)
  opts = opts or {}
  return {
    workers = opts.workers or 2,
    tenants = tenants_lua(opts),
    extra = extra_lua(opts),
    files = {
      ["news.xml"] = h.rsl({ amount = "0.015" }),
      ["blog.xml"] = h.rsl({ amount = "0.02" }),
      ["eur.xml"] = h.rsl({ amount = "0.01", currency = "EUR" }),
      ["pol.lua"] = "return {}\n",
    },
  }
end

local function start(opts)
  local gw = h.start(gw_opts(opts))
  assert(h.wait_ready(gw))
  return gw
end

-- Rewrites gw's configuration from opts (when given; same ports, token and
-- data_dir) and starts a new process on it, after a graceful stop that keeps
-- the folder.
local function restart(gw, opts)
  local exited, rc = h.stop_keep(gw)
  assert(exited and rc == 0, "stop before restart: exit " .. tostring(rc) .. "\n" .. gw.log())
  if opts then
    h.write_config(gw.dir, { public = gw.port, admin = gw.admin_port }, gw.token, gw_opts(opts))
  end
  h.relaunch(gw)
  assert(h.wait_ready(gw))
  return gw
end

-- ---- calls ----

local function post(gw, path, ctype, body)
  return assert(h.request(gw.port, h.connect_req(path, ctype, body), { timeout = 10 }))
end

-- The first offer for each URI, from one DiscoverResources call (JSON).
local function discover(gw, uris)
  local res = post(gw, h.DISCOVER, "json", h.json_discover(uris))
  assert.are.equal(200, res.status, res.body)
  local out = {}
  for i, r in ipairs(h.json_decode(res.body).results) do
    assert.are.equal(uris[i], r.uri)
    assert(r.offers and r.offers[1], "no offer for " .. r.uri .. ": " .. tostring(r.absenceDetail))
    out[i] = r.offers[1]
  end
  return out
end

local function offer_id(gw, uri)
  return discover(gw, { uri })[1].id
end

local function json_str(s)
  return require("dkjson").encode(s)
end

-- An ExecuteTransactionRequest in JSON. items: offer ids, or { id, tokens }.
local function json_exec(ref, key, items)
  local parts = {}
  for i, it in ipairs(items) do
    if type(it) == "table" then
      parts[i] = string.format('{"offerId":%s,"estimatedTokens":"%d"}', json_str(it[1]), it[2])
    else
      parts[i] = string.format('{"offerId":%s}', json_str(it))
    end
  end
  local ai = ref and string.format('"aiSystem":{"billingReference":%s},', json_str(ref)) or ""
  return string.format('{%s"idempotencyKey":%s,"items":[%s]}', ai, json_str(key), table.concat(parts, ","))
end

-- The same in binary proto (field numbers of proto/ramp/v1/exchange.proto).
local function pb_exec(ref, key, items)
  local parts = {}
  if ref then
    parts[#parts + 1] = h.pb_bytes(1, h.pb_bytes(7, ref))
  end
  parts[#parts + 1] = h.pb_bytes(2, key)
  for _, it in ipairs(items) do
    if type(it) == "table" then
      parts[#parts + 1] = h.pb_bytes(3, h.pb_bytes(1, it[1]) .. h.pb_varint(2, it[2]))
    else
      parts[#parts + 1] = h.pb_bytes(3, h.pb_bytes(1, it))
    end
  end
  return table.concat(parts)
end

local function execute(gw, ref, key, items)
  return post(gw, h.EXECUTE, "json", json_exec(ref, key, items))
end

local function execute_pb(gw, ref, key, items)
  return post(gw, h.EXECUTE, "proto", pb_exec(ref, key, items))
end

-- A JSON ExecuteTransactionResponse, status 200 asserted.
local function answer(res)
  assert.are.equal(200, res.status, res.body)
  return h.json_decode(res.body)
end

local function approved(res)
  local a = answer(res)
  assert.are.equal("TRANSACTION_STATUS_APPROVED", a.status, res.body)
  return a
end

local function denied(res, reason, detail_has)
  local a = answer(res)
  assert.are.equal("TRANSACTION_STATUS_DENIED", a.status, res.body)
  assert.are.equal(reason, a.denialReason, res.body)
  for _, s in ipairs(detail_has or {}) do
    assert(a.denialDetail and a.denialDetail:find(s, 1, true), "denialDetail lacks '" .. s .. "': " .. res.body)
  end
  assert.is_nil(a.transactionId, res.body)
  assert.is_nil(a.items, res.body)
  return a
end

local function connect_error(res, http_status, code, msg_has)
  assert.are.equal(http_status, res.status, res.body)
  assert.are.equal(code, h.connect_code(res), res.body)
  if msg_has then
    local msg = h.json_decode(res.body).message or ""
    assert(msg:find(msg_has, 1, true), "message lacks '" .. msg_has .. "': " .. res.body)
  end
end

local function balance(gw, ref)
  local bal, held = h.balance(gw, ref)
  assert(bal, held)
  return bal, held
end

local function key(tag)
  return (tag or "k") .. "-" .. h.random_hex(8)
end

-- Top-level fields of a protobuf message: { [field] = { values... } } (varints
-- as numbers, length-delimited as strings). Enough to read an answer.
local function pb_fields(data)
  local out, i = {}, 1
  local function varint()
    local n, mul = 0, 1
    while true do
      local b = data:byte(i)
      i = i + 1
      n = n + (b % 128) * mul
      mul = mul * 128
      if b < 128 then return n end
    end
  end
  while i <= #data do
    local k = varint()
    local field, wt = math.floor(k / 8), k % 8
    local v
    if wt == 0 then
      v = varint()
    elseif wt == 2 then
      local n = varint()
      v = data:sub(i, i + n - 1)
      i = i + n
    else
      error("wire type " .. wt)
    end
    out[field] = out[field] or {}
    table.insert(out[field], v)
  end
  return out
end

-- nginx secure_link_md5 "$secure_link_expires$uri $secret", computed apart
-- from the gateway (openssl): base64url of the MD5, no padding.
local function nginx_md5(expires, path, secret)
  local tmp = os.tmpname()
  h.write_file(tmp, expires .. path .. " " .. secret)
  local p = assert(io.popen("openssl md5 -binary < " .. h.sh_quote(tmp)))
  local digest = p:read("*a")
  p:close()
  os.remove(tmp)
  assert.are.equal(16, #digest)
  return (h.base64(digest, true))
end

local function assert_signed(item, base, path, secret)
  local url = item.retrievalUrl
  assert.are.equal(base .. path, url:match("^([^?]*)"), url)
  local md5 = url:match("[?&]md5=([%w_-]+)")
  local expires = url:match("[?&]expires=(%d+)")
  assert(md5 and expires, "no md5/expires in " .. url)
  assert.are.equal(item.expiresAtUnix, expires, "expiresAtUnix is not the URL's expiry")
  local now = os.time()
  assert(math.abs(tonumber(expires) - (now + SIGN_TTL)) <= 5, "expires " .. expires .. " is not now + ttl_s")
  assert.are.equal(nginx_md5(expires, path, secret), md5, "md5 of " .. url)
end

local function metric(text, tenant, status)
  local pat = 'exchange_transaction_total{tenant_id="' .. tenant .. '",status="' .. status .. '"} '
  local at = text:find(pat, 1, true)
  if not at then
    return 0
  end
  return tonumber(text:match("^(%d+)", at + #pat))
end

local function metrics(gw)
  local res = assert(h.admin_get(gw, "/metrics"))
  assert.are.equal(200, res.status)
  return res.body
end

-- ---- the specs ----

describe("ExecuteTransaction", function()
  local gw
  local NEWS_URI = "https://news.example/a/1"
  local NEWS_PATH = "/a/1"

  setup(function()
    gw = start()
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("approves a purchase: a transaction id, the cost, a URL nginx accepts, the balance debited once", function()
    local before = balance(gw, "acct-a")
    assert.are.equal(100000, before)
    local offer = discover(gw, { NEWS_URI })[1]
    assert.are.equal("15000", offer.pricing.price.amount)
    local res = execute(gw, "acct-a", key("approve"), { offer.id })
    local a = approved(res)
    assert.truthy(a.transactionId:match("^tx_[0-9a-hjkmnp-tv-z]+$"), a.transactionId)
    assert.are.equal(3 + 26, #a.transactionId, a.transactionId)
    assert.are.same({ currency = "USD", amount = tostring(NEWS_PRICE) }, a.totalCost)
    assert.are.equal(1, #a.items)
    local it1 = a.items[1]
    assert.are.equal(NEWS_URI, it1.uri)
    assert.are.equal(offer.id, it1.offerId)
    assert.are.same({ currency = "USD", amount = tostring(NEWS_PRICE) }, it1.cost)
    assert.truthy(it1.retrievalUrl:find("http://cdn.test/", 1, true) == 1, it1.retrievalUrl)
    assert_signed(it1, "http://cdn.test", NEWS_PATH, NEWS_SECRET)
    assert.is_nil(a.denialReason)
    local after, held = balance(gw, "acct-a")
    assert.are.equal(before - NEWS_PRICE, after)
    -- The hold is captured right after the answer: nothing stays held.
    local deadline = h.now() + 2
    while held ~= 0 and h.now() < deadline do
      h.sleep(0.02)
      after, held = balance(gw, "acct-a")
    end
    assert.are.equal(0, held)
  end)

  it("replays the same request byte for byte (JSON and proto), charging once", function()
    local id = offer_id(gw, NEWS_URI)
    local k = key("replay")
    local before = balance(gw, "acct-a")
    local first = execute(gw, "acct-a", k, { { id, 500 } })
    local a = approved(first)
    for _ = 1, 3 do
      local again = execute(gw, "acct-a", k, { { id, 500 } })
      assert.are.equal(200, again.status)
      assert.are.equal(first.body, again.body)
    end
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-a"))

    -- Binary proto: a new key, then the same bytes twice.
    local kp = key("replay-pb")
    local p1 = execute_pb(gw, "acct-a", kp, { id })
    assert.are.equal(200, p1.status, h.show(p1.body))
    assert.are.equal("application/proto", p1.headers["content-type"])
    local f = pb_fields(p1.body)
    assert.are.equal(1, f[2][1], "status is not APPROVED: " .. h.show(p1.body))
    assert.truthy(f[1][1]:match("^tx_"), h.show(p1.body))
    assert.are_not.equal(a.transactionId, f[1][1])
    local p2 = execute_pb(gw, "acct-a", kp, { id })
    assert.are.equal(200, p2.status)
    assert.are.equal(p1.body, p2.body)
    -- The same content in JSON under the proto call's key is the same request: its answer.
    local pj = approved(execute(gw, "acct-a", kp, { id }))
    assert.are.equal(f[1][1], pj.transactionId)
    assert.are.equal(before - 2 * NEWS_PRICE, balance(gw, "acct-a"))
  end)

  it("scopes a key by billing reference: the same key on another account is another purchase", function()
    local id = offer_id(gw, NEWS_URI)
    local k = key("scope")
    local a1 = approved(execute(gw, "acct-a", k, { id }))
    local b_before = balance(gw, "acct-b")
    local b1 = approved(execute(gw, "acct-b", k, { id }))
    assert.are_not.equal(a1.transactionId, b1.transactionId)
    assert.are.equal(b_before - NEWS_PRICE, balance(gw, "acct-b"))
  end)

  it("refuses the same key with another request already_exists, charging nothing", function()
    local ids = discover(gw, { NEWS_URI, "https://news.example/a/2" })
    local k = key("conflict")
    local before = balance(gw, "acct-conflict")
    local first = execute(gw, "acct-conflict", k, { { ids[1].id, 100 } })
    approved(first)
    local charged = balance(gw, "acct-conflict")
    assert.are.equal(before - NEWS_PRICE, charged)
    -- Another offer, other estimated tokens, an extra item: each a different request.
    for _, items in ipairs({ { { ids[2].id, 100 } }, { { ids[1].id, 101 } }, { ids[1].id },
                             { { ids[1].id, 100 }, ids[2].id } }) do
      local res = execute(gw, "acct-conflict", k, items)
      connect_error(res, 409, "already_exists", "idempotency_key")
    end
    assert.are.equal(charged, balance(gw, "acct-conflict"))
    -- The original request still replays.
    assert.are.equal(first.body, execute(gw, "acct-conflict", k, { { ids[1].id, 100 } }).body)
  end)

  it("answers 8 concurrent duplicates with one charge and the same answer", function()
    local id = offer_id(gw, NEWS_URI)
    local raw = h.connect_req(h.EXECUTE, "json", json_exec("acct-conc", key("conc"), { id }))
    local before = balance(gw, "acct-conc")
    local socks = {}
    for i = 1, 8 do
      socks[i] = assert(h.connect(gw.port, 10))
    end
    for i = 1, 8 do
      assert(h.send(socks[i], raw))
    end
    local bodies, aborted = {}, 0
    for i = 1, 8 do
      local res, err = h.read_response(socks[i], 10)
      socks[i]:close()
      assert(res, "duplicate " .. i .. ": " .. tostring(err))
      if res.status == 200 then
        bodies[#bodies + 1] = res.body
      else
        connect_error(res, 409, "aborted")
        aborted = aborted + 1
      end
    end
    assert(#bodies >= 1, "no answer among the duplicates")
    assert.are.equal(0, aborted, "with a 2 s wait every duplicate should get the answer")
    local a = approved({ status = 200, body = bodies[1] })
    for i = 2, #bodies do
      assert.are.equal(bodies[1], bodies[i])
    end
    assert.truthy(a.transactionId)
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-conc"))
  end)

  it("denies a purchase above the balance, names the account redacted, remembers nothing", function()
    local id = offer_id(gw, NEWS_URI)
    local k = key("poor")
    assert.are.equal(10000, balance(gw, "acct-poor"))
    local res = execute(gw, "acct-poor", k, { id })
    local a = denied(res, "DENIAL_REASON_INSUFFICIENT_FUNDS", { "****poor", "10000", "15000" })
    assert.falsy(a.denialDetail:find("acct-poor", 1, true), "full billing reference in " .. res.body)
    assert.falsy(res.body:find("acct-poor", 1, true), "full billing reference in " .. res.body)
    -- Denied again (not a replay of a remembered denial: the same answer, computed again).
    denied(execute(gw, "acct-poor", k, { id }), "DENIAL_REASON_INSUFFICIENT_FUNDS")
    local bal, held = balance(gw, "acct-poor")
    assert.are.equal(10000, bal)
    assert.are.equal(0, held)

    -- An account never credited has nothing available.
    denied(execute(gw, "acct-nobody", key(), { id }), "DENIAL_REASON_INSUFFICIENT_FUNDS", { "****body", " 0 USD" })

    -- A top-up, once per reference.
    local ref = "topup-" .. h.random_hex(4)
    local body = string.format('{"account":"acct-poor","amount":10000,"currency":"USD","reference":"%s"}', ref)
    local t1 = h.admin(gw, "POST", "/ledger/topup", body)
    assert.are.equal(200, t1.status, t1.body)
    local j1 = h.json_decode(t1.body)
    assert.are.equal(true, j1.applied, t1.body)
    assert.are.equal(20000, j1.balance)
    local t2 = h.admin(gw, "POST", "/ledger/topup", body)
    assert.are.equal(200, t2.status, t2.body)
    local j2 = h.json_decode(t2.body)
    assert.are.equal(false, j2.applied, t2.body)
    assert.are.equal(20000, j2.balance)
    assert.are.equal(20000, balance(gw, "acct-poor"))

    -- The key of the denied call now buys.
    approved(execute(gw, "acct-poor", k, { id }))
    assert.are.equal(20000 - NEWS_PRICE, balance(gw, "acct-poor"))
  end)

  it("denies forged, truncated, garbage and foreign offer ids, and names the item", function()
    local id = offer_id(gw, NEWS_URI)
    local good = offer_id(gw, "https://news.example/a/3")
    local before = balance(gw, "acct-bad")
    local mid = math.floor(#id / 2)
    local c = id:sub(mid, mid)
    local forged = id:sub(1, mid - 1) .. (c == "A" and "B" or "A") .. id:sub(mid + 1)
    -- Another gateway (another data_dir) signs with another offer key.
    local other = start({ workers = 1 })
    local foreign = offer_id(other, NEWS_URI)
    h.stop_clean(other)
    assert.are_not.equal(foreign, id)
    for name, bad in pairs({ forged = forged, truncated = id:sub(1, -2), shortened = id:sub(1, 40),
                             garbage = "not-an-offer", empty = "", foreign = foreign,
                             padded = id .. "=", spaced = " " .. id }) do
      local res = execute(gw, "acct-bad", key(name), { good, bad })
      local ok, err = pcall(denied, res, "DENIAL_REASON_OFFER_INVALID", { "items[1]" })
      assert(ok, name .. ": " .. tostring(err))
    end
    assert.are.equal(before, balance(gw, "acct-bad"))
    -- The good offer alone still buys: the denials held nothing.
    approved(execute(gw, "acct-bad", key(), { good }))
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-bad"))
  end)

  it("refuses 0, 101 and 10,000 items, and the same offer twice", function()
    local id = offer_id(gw, NEWS_URI)
    local id2 = offer_id(gw, "https://news.example/a/4")
    local before = balance(gw, "acct-items")
    connect_error(execute(gw, "acct-items", key(), {}), 400, "invalid_argument", "items")
    local many = {}
    for i = 1, 101 do many[i] = id end
    connect_error(execute(gw, "acct-items", key(), many), 400, "invalid_argument", "items: 101")
    -- 10,000 items in proto fit the 64 KiB body limit (5 bytes each): refused by count.
    local tiny = {}
    for i = 1, 10000 do tiny[i] = "x" end
    local body = pb_exec("acct-items", key(), tiny)
    assert(#body < h.LIMITS.max_body_bytes, #body)
    connect_error(post(gw, h.EXECUTE, "proto", body), 400, "invalid_argument", "items: 10000")
    -- 10,000 real items in JSON pass the body limit: refused before parsing.
    local big = {}
    for i = 1, 10000 do big[i] = id end
    local jbody = json_exec("acct-items", key(), big)
    assert(#jbody > h.LIMITS.max_body_bytes)
    local s = assert(h.connect(gw.port, 10))
    h.send(s, h.connect_req(h.EXECUTE, "json", jbody))
    local big_res = h.read_response(s, 10)
    s:close()
    assert(big_res, "no answer to a body over the limit")
    -- The HTTP layer refuses it before Connect sees it, in the error shape a
    -- Connect client reads: 413 with {"code":"resource_exhausted"}.
    assert.are.equal(413, big_res.status, big_res.body)
    assert.are.equal("resource_exhausted", h.connect_code(big_res), big_res.body)
    assert.truthy(big_res.body:find("too large", 1, true), big_res.body)
    assert(h.alive(gw.port))
    -- The same offer twice in one call.
    denied(execute(gw, "acct-items", key(), { id, id2, id }), "DENIAL_REASON_OFFER_INVALID",
      { "items[2]", "items[0]" })
    assert.are.equal(before, balance(gw, "acct-items"))
    -- 100 distinct offers is the most a call takes, and it buys them all.
    local uris = {}
    for i = 1, 100 do uris[i] = "https://news.example/many/" .. i end
    local offers = discover(gw, uris)
    local ids = {}
    for i, o in ipairs(offers) do ids[i] = o.id end
    local a = approved(execute(gw, "acct-items", key(), ids))
    assert.are.equal(100, #a.items)
    assert.are.equal(tostring(100 * NEWS_PRICE), a.totalCost.amount)
    assert.are.equal(before - 100 * NEWS_PRICE, balance(gw, "acct-items"))
  end)

  it("takes idempotency keys of 1 to 128 bytes of UTF-8 only", function()
    local id = offer_id(gw, NEWS_URI)
    local before = balance(gw, "acct-keys")
    connect_error(execute(gw, "acct-keys", "", { id }), 400, "invalid_argument", "idempotency_key")
    connect_error(execute(gw, "acct-keys", string.rep("k", 129), { id }), 400, "invalid_argument",
      "idempotency_key")
    local pb = post(gw, h.EXECUTE, "proto", pb_exec("acct-keys", "key-\255-" .. h.random_hex(4), { id }))
    connect_error(pb, 400, "invalid_argument", "idempotency_key")
    -- A NUL would cut the key short in C: refused, not truncated.
    connect_error(post(gw, h.EXECUTE, "json",
      '{"aiSystem":{"billingReference":"acct-keys"},"idempotencyKey":"ab\\u0000cd","items":[{"offerId":"' .. id .. '"}]}'),
      400, "invalid_argument")
    local pbnul = post(gw, h.EXECUTE, "proto", pb_exec("acct-keys", "ab\0" .. h.random_hex(4), { id }))
    connect_error(pbnul, 400, "invalid_argument", "idempotency_key")
    assert.are.equal(before, balance(gw, "acct-keys"))
    local k128 = string.rep("k", 128 - 17) .. "-" .. h.random_hex(8)
    assert.are.equal(128, #k128)
    approved(execute(gw, "acct-keys", k128, { id }))
    -- 128 bytes of multibyte UTF-8 (64 two-byte characters) count as 128.
    local k_utf8 = string.rep("\195\169", 60) .. h.random_hex(4)
    assert.are.equal(128, #k_utf8)
    approved(execute(gw, "acct-keys", k_utf8, { id }))
    connect_error(execute(gw, "acct-keys", k_utf8 .. "x", { id }), 400, "invalid_argument")
    assert.are.equal(before - 2 * NEWS_PRICE, balance(gw, "acct-keys"))
  end)

  it("buys offers of two tenants in one transaction, all or nothing", function()
    local offers = discover(gw, { NEWS_URI, "https://blog.example/p/9" })
    assert.are.equal("20000", offers[2].pricing.price.amount)
    local before = balance(gw, "acct-multi")
    local a = approved(execute(gw, "acct-multi", key("multi"), { offers[1].id, offers[2].id }))
    assert.are.same({ currency = "USD", amount = tostring(NEWS_PRICE + BLOG_PRICE) }, a.totalCost)
    assert.are.equal(2, #a.items)
    assert.are.equal(NEWS_URI, a.items[1].uri)
    assert.are.equal("https://blog.example/p/9", a.items[2].uri)
    assert.are.equal(tostring(BLOG_PRICE), a.items[2].cost.amount)
    assert_signed(a.items[1], "http://cdn.test", NEWS_PATH, NEWS_SECRET)
    assert_signed(a.items[2], "http://cdn-blog.test", "/p/9", BLOG_SECRET)
    assert.are.equal(before - NEWS_PRICE - BLOG_PRICE, balance(gw, "acct-multi"))

    -- 25000 pays either, not both: the whole call is denied, nothing charged.
    assert.are.equal(25000, balance(gw, "acct-multi-short"))
    denied(execute(gw, "acct-multi-short", key(), { offers[1].id, offers[2].id }),
      "DENIAL_REASON_INSUFFICIENT_FUNDS", { "25000", "35000" })
    local bal, held = balance(gw, "acct-multi-short")
    assert.are.equal(25000, bal)
    assert.are.equal(0, held)
    approved(execute(gw, "acct-multi-short", key(), { offers[2].id }))
    assert.are.equal(25000 - BLOG_PRICE, balance(gw, "acct-multi-short"))
  end)

  it("fails internal for a tenant without a signer, charges nothing and releases the hold", function()
    local offers = discover(gw, { "https://nosign.example/x", NEWS_URI })
    assert.are.equal(20000, balance(gw, "acct-nosign"))
    local res = execute(gw, "acct-nosign", key("nosign"), { offers[1].id })
    connect_error(res, 500, "internal", "could not sign")
    local msg = h.json_decode(res.body).message
    assert.truthy(msg:find("nosign", 1, true), msg)
    assert.truthy(msg:find("nothing was charged", 1, true), msg)
    local bal, held = balance(gw, "acct-nosign")
    assert.are.equal(20000, bal)
    assert.are.equal(0, held)
    -- 20000 pays one 15000 item only if the failed call's hold went back.
    approved(execute(gw, "acct-nosign", key(), { offers[2].id }))
    assert.are.equal(20000 - NEWS_PRICE, balance(gw, "acct-nosign"))
  end)

  it("requires a billing reference", function()
    local id = offer_id(gw, NEWS_URI)
    connect_error(execute(gw, nil, key(), { id }), 400, "invalid_argument", "billing_reference")
    connect_error(execute(gw, "", key(), { id }), 400, "invalid_argument", "billing_reference")
    connect_error(execute(gw, string.rep("r", 257), key(), { id }), 400, "invalid_argument", "billing_reference")
  end)

  it("counts approved, replayed and denied transactions per tenant on the admin listener", function()
    local id = offer_id(gw, NEWS_URI)
    local m0 = metrics(gw)
    local k = key("metrics")
    approved(execute(gw, "acct-metrics", k, { id }))
    execute(gw, "acct-metrics", k, { id })
    execute(gw, "acct-metrics", k, { id })
    denied(execute(gw, "acct-poor-nobody", key(), { id }), "DENIAL_REASON_INSUFFICIENT_FUNDS")
    local m1 = metrics(gw)
    assert.are.equal(metric(m0, "news", "approved") + 1, metric(m1, "news", "approved"))
    assert.are.equal(metric(m0, "news", "replayed") + 2, metric(m1, "news", "replayed"))
    assert.are.equal(metric(m0, "news", "denied") + 1, metric(m1, "news", "denied"))
    assert.are.equal(metric(m0, "blog", "approved"), metric(m1, "blog", "approved"))
  end)

  it("denies an offer the tenant's policy withdrew after a reload, DENIAL_REASON_POLICY", function()
    local id = offer_id(gw, "https://pol.example/w")
    local before = balance(gw, "acct-policy")
    h.write_file(gw.dir .. "/pol.lua", "return { price = function(offer, req) return nil end }\n")
    local rl = h.admin(gw, "POST", "/reload?tenant=pol")
    assert.are.equal(200, rl.status, rl.body)
    denied(execute(gw, "acct-policy", key("policy"), { id }), "DENIAL_REASON_POLICY",
      { "items[0]", "pol", "no longer offers" })
    assert.are.equal(before, balance(gw, "acct-policy"))
    -- Put back: the same offer id buys again (the quote stands until it expires).
    h.write_file(gw.dir .. "/pol.lua", "return {}\n")
    assert.are.equal(200, h.admin(gw, "POST", "/reload?tenant=pol").status)
    approved(execute(gw, "acct-policy", key(), { id }))
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-policy"))
  end)

  it("signs the decoded path and keeps the query of a percent-encoded URI", function()
    local uri = "https://news.example/caf%C3%A9/a%20b?x=1"
    local res = execute(gw, "acct-misc", key("pct"), { offer_id(gw, uri) })
    local a = approved(res)
    assert.are.equal(uri, a.items[1].uri)
    local url = a.items[1].retrievalUrl
    assert.are.equal("http://cdn.test/caf%C3%A9/a%20b", url:match("^([^?]*)"), url)
    assert.truthy(url:find("?x=1&md5=", 1, true), url)
    local md5, expires = url:match("md5=([%w_-]+)&expires=(%d+)$")
    assert(md5, url)
    assert.are.equal(nginx_md5(expires, "/caf\195\169/a b", NEWS_SECRET), md5)
  end)

  it("charges once when the client leaves before the answer and retries", function()
    local id = offer_id(gw, NEWS_URI)
    local raw = h.connect_req(h.EXECUTE, "json", json_exec("acct-drop", key("drop"), { id }))
    local before = balance(gw, "acct-drop")
    for _ = 1, 3 do
      local s = assert(h.connect(gw.port, 5))
      assert(h.send(s, raw))
      s:close()
    end
    local a = approved(assert(h.request(gw.port, raw, { timeout = 10 })))
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-drop"))
    assert.are.equal(a.transactionId, approved(assert(h.request(gw.port, raw, { timeout = 10 }))).transactionId)
    assert(h.alive(gw.port))
  end)

  it("refuses a negative estimatedTokens and mixed currencies, charging nothing", function()
    local id = offer_id(gw, NEWS_URI)
    local before = balance(gw, "acct-misc")
    local res = execute(gw, "acct-misc", key("neg"), { { id, -1 } })
    assert(res.status == 400 or res.status == 200, res.body)
    if res.status == 200 then
      denied(res, "DENIAL_REASON_OFFER_INVALID", { "items[0].estimated_tokens" })
    else
      connect_error(res, 400, "invalid_argument", "estimated_tokens")
    end
    local eur = offer_id(gw, "https://eur.example/x")
    denied(execute(gw, "acct-misc", key("eur"), { id, eur }), "DENIAL_REASON_OFFER_INVALID",
      { "items[1]", "EUR", "USD" })
    assert.are.equal(before, balance(gw, "acct-misc"))
  end)

  it("never overspends: 8 concurrent purchases with distinct keys on an account that pays for 2", function()
    local uris = {}
    for i = 1, 8 do uris[i] = "https://news.example/race/" .. i end
    local offers = discover(gw, uris)
    local socks = {}
    for i = 1, 8 do socks[i] = assert(h.connect(gw.port, 10)) end
    for i = 1, 8 do
      assert(h.send(socks[i], h.connect_req(h.EXECUTE, "json", json_exec("acct-race", key("race"), { offers[i].id }))))
    end
    local ok, no = 0, 0
    for i = 1, 8 do
      local res = assert(h.read_response(socks[i], 10))
      socks[i]:close()
      local a = answer(res)
      if a.status == "TRANSACTION_STATUS_APPROVED" then
        ok = ok + 1
      else
        assert.are.equal("DENIAL_REASON_INSUFFICIENT_FUNDS", a.denialReason, res.body)
        no = no + 1
      end
    end
    assert.are.equal(2, ok)
    assert.are.equal(6, no)
    -- A hold is dropped just after its answer is sent (core/pipeline/purchase.h):
    -- give the gateway a moment to get there before reading it.
    local bal, held = balance(gw, "acct-race")
    local deadline = h.now() + 5
    while held ~= 0 and h.now() < deadline do
      h.sleep(0.05)
      bal, held = balance(gw, "acct-race")
    end
    assert.are.equal(40000 - 2 * NEWS_PRICE, bal)
    assert.are.equal(0, held)
  end)

  it("credits a top-up reference once and says so, even with 4 calls in flight together", function()
    local ref = "dup-" .. h.random_hex(4)
    local body = string.format('{"account":"acct-topup","amount":500,"currency":"USD","reference":"%s"}', ref)
    local lines = { "POST /ledger/topup HTTP/1.1", "Host: 127.0.0.1", "Authorization: Bearer " .. gw.token,
      "Content-Type: application/json", "Content-Length: " .. #body }
    local raw = table.concat(lines, "\r\n") .. "\r\n\r\n" .. body
    local socks = {}
    for i = 1, 4 do socks[i] = assert(h.connect(gw.admin_port, 10)) end
    for i = 1, 4 do assert(h.send(socks[i], raw)) end
    local applied = 0
    for i = 1, 4 do
      local res = assert(h.read_response(socks[i], 10))
      socks[i]:close()
      assert.are.equal(200, res.status, res.body)
      if h.json_decode(res.body).applied then applied = applied + 1 end
    end
    assert.are.equal(1500, balance(gw, "acct-topup"))
    assert.are.equal(1, applied, "answers saying applied:true for one credit")
  end)
end)

describe("ExecuteTransaction with offers that expire in 1 s", function()
  local gw

  setup(function()
    gw = start({ workers = 1, offer_ttl_s = 1 })
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  local first, k, offers

  it("denies an expired offer DENIAL_REASON_OFFER_EXPIRED, naming the item, charging nothing", function()
    offers = discover(gw, { "https://news.example/e/1", "https://news.example/e/2" })
    local now = os.time()
    assert(math.abs(tonumber(offers[1].expiresAtUnix) - (now + 1)) <= 1, offers[1].expiresAtUnix)
    local before = balance(gw, "acct-expire")
    -- Bought while valid (the retry below comes back to it).
    k = key("expiring")
    first = execute(gw, "acct-expire", k, { offers[2].id })
    approved(first)
    h.sleep(2.1)
    local fresh = offer_id(gw, "https://news.example/e/3")
    local res = execute(gw, "acct-expire", key("expired"), { fresh, offers[1].id })
    denied(res, "DENIAL_REASON_OFFER_EXPIRED", { "items[1]", "expired" })
    assert.are.equal(before - NEWS_PRICE, balance(gw, "acct-expire"))
  end)

  -- purchase.h step 2: "A key already answered replays that answer byte for
  -- byte". The agent was charged; a retry (its first answer lost) after the
  -- offer's expiry must not read DENIED, or it believes nothing was bought.
  it("replays a charged purchase to a retry that comes after its offer expired", function()
    assert(first, "needs the previous test")
    local charged = balance(gw, "acct-expire")
    local retry = execute(gw, "acct-expire", k, { offers[2].id })
    assert.are.equal(first.body, retry.body, "a retry of a charged purchase after its offer expired got: " .. retry.body)
    assert.are.equal(charged, balance(gw, "acct-expire"))
  end)
end)

describe("ExecuteTransaction across a restart", function()
  local gw

  setup(function()
    gw = start({ workers = 1 })
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  local offers, kj, j1, charged

  it("replays byte for byte (JSON and proto) after a restart on the same data_dir", function()
    offers = discover(gw, { "https://news.example/r/1", "https://news.example/r/2" })
    kj = key("restart-json")
    local kp = key("restart-pb")
    j1 = execute(gw, "acct-restart", kj, { offers[1].id })
    approved(j1)
    local p1 = execute_pb(gw, "acct-restart", kp, { offers[1].id })
    assert.are.equal(200, p1.status)
    charged = balance(gw, "acct-restart")
    assert.are.equal(100000 - 2 * NEWS_PRICE, charged)

    restart(gw)
    assert.are.equal(charged, balance(gw, "acct-restart"))
    assert.are.equal(j1.body, execute(gw, "acct-restart", kj, { offers[1].id }).body)
    assert.are.equal(p1.body, execute_pb(gw, "acct-restart", kp, { offers[1].id }).body)
    connect_error(execute(gw, "acct-restart", kj, { offers[2].id }), 409, "already_exists")
    assert.are.equal(charged, balance(gw, "acct-restart"))
    -- A restart does not apply the opening credit again.
    assert.are.equal(100000, balance(gw, "acct-a"))
  end)

  it("denies an offer whose host moved to another tenant, OFFER_INVALID 'no longer serves'", function()
    assert(offers, "needs the previous test")
    -- news.example now belongs to tenant "other": news's offers for it are void.
    restart(gw, { workers = 1, news_moved = true })
    denied(execute(gw, "acct-restart", key("moved"), { offers[2].id }), "DENIAL_REASON_OFFER_INVALID",
      { "items[0]", "tenant news no longer serves" })
    assert.are.equal(charged, balance(gw, "acct-restart"))
  end)

  -- As after an expiry: the purchase was charged before the move; its retry gets its answer.
  it("replays a charged purchase to a retry after its host moved to another tenant", function()
    assert(j1, "needs the previous tests")
    local retry = execute(gw, "acct-restart", kj, { offers[1].id })
    assert.are.equal(j1.body, retry.body, "a retry of a charged purchase got: " .. retry.body)
    assert.are.equal(charged, balance(gw, "acct-restart"))
  end)
end)

-- The keys folder goes once the last gateway of the file stopped.
describe("cleanup", function()
  it("removes the signer keys", function()
    assert(KEYS:match("^/tmp/tollgate%-e2e%-keys%-"))
    os.execute("rm -rf " .. h.sh_quote(KEYS))
  end)
end)
