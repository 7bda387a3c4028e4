-- Three gateway instances as one: one real redis-server (idempotency keys,
-- balances, rate limits and the log's streams), and a real nginx in front
-- running deploy/nginx/tollgate.conf as shipped (consistent hashing on the
-- tenant's Host; only its ports are this test's), all on loopback:
--  - each tenant host lands on one instance, and the tenants spread;
--  - one idempotency key sent to two instances at once charges once;
--  - a rate limit shared through Redis holds within 10% across the three;
--  - the Redis streams receive every transaction exactly once;
--  - a policy edit in the shared folder reaches all three;
--  - killing one instance (SIGKILL) loses nothing acknowledged: its purchases
--    replay from any instance, its tenants move to the others through nginx,
--    and its log reaches its stream once it is back.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local loadgen = require("loadgen")
local redisc = require("redisc")

local HERE = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local NTENANTS = 9
local ACCOUNT = "acct-scale"
local FUNDS = 1000000000000
local RATE, BURST = 50, 10

local tmpdir = h.tmpdir

local function policy(price)
  return string.format([[
local P = {}
-- /rl/...: one bucket for the whole fleet (Redis), RATE/s, burst BURST
function P.rate_limit(req)
  if req.path:sub(1, 4) == "/rl/" then return "fleet", %d, %d end
  return nil
end
function P.price(offer, req) return %d, "USD" end
return P
]], RATE, BURST, price)
end

local function host(i) return "t" .. i .. ".example" end

-- ---- requests with a chosen Host ----

local function post(hostname, path, body)
  h.secret(ACCOUNT)
  return table.concat({ "POST " .. path .. " HTTP/1.1", "Host: " .. hostname, "Connect-Protocol-Version: 1",
    "Content-Type: application/json", "Content-Length: " .. #body, "", body }, "\r\n")
end

local function call(port, raw)
  local res, err = h.request(port, raw, { timeout = 20 })
  assert(res, "no answer: " .. tostring(err))
  return res
end

local function discover(port, hostname, path)
  local res = call(port, post(hostname, h.DISCOVER, h.json_discover({ "https://" .. hostname .. (path or "/a/1") })))
  assert.are.equal(200, res.status, res.body)
  local r = h.json_decode(res.body).results[1]
  assert(r.offers and r.offers[1], "no offer: " .. res.body)
  return r.offers[1].id, tonumber(r.offers[1].pricing.price.amount)
end

local function buy_raw(hostname, key, offer)
  return post(hostname, h.EXECUTE, string.format(
    '{"aiSystem":{"id":"scale-bot","billingReference":"%s"},"idempotencyKey":"%s","items":[{"offerId":"%s"}]}',
    ACCOUNT, key, offer))
end

local function approved(res)
  assert.are.equal(200, res.status, res.body)
  local a = h.json_decode(res.body)
  assert.are.equal("TRANSACTION_STATUS_APPROVED", a.status, res.body)
  return a.transactionId
end

local function metrics(gw)
  local res = assert(h.request(gw.admin_port, h.get_req("/metrics", { "Authorization: Bearer " .. gw.token },
    "127.0.0.1")))
  assert.are.equal(200, res.status)
  return res.body
end

-- Sum of the samples of name whose labels contain every "k=\"v\"" of want.
local function metric_sum(text, name, want)
  local sum = 0
  for line in text:gmatch("[^\n]+") do
    local n, l, v = line:match("^([%w_]+)(%b{}) (%S+)$")
    if n == name then
      local ok = true
      for _, w in ipairs(want) do
        ok = ok and l:find(w, 1, true) ~= nil
      end
      if ok then sum = sum + tonumber(v) end
    end
  end
  return sum
end

local function balance(gw)
  local deadline = h.now() + 5
  repeat
    local bal, held = h.balance(gw, ACCOUNT)
    assert(bal, held)
    if held == 0 then return bal end
    h.sleep(0.05)
  until h.now() > deadline
  error("holds left on " .. ACCOUNT)
end

-- ---- nginx running deploy/nginx/tollgate.conf ----

local function nginx_start(dir, port, upstreams)
  local conf = assert(h.read_file(HERE .. "../../deploy/nginx/tollgate.conf"), "no deploy/nginx/tollgate.conf")
  local n = 0
  conf = conf:gsub("server 127%.0%.0%.1:%d+", function()
    n = n + 1
    return "server 127.0.0.1:" .. upstreams[n]
  end)
  assert(n == #upstreams, "deploy/nginx/tollgate.conf names " .. n .. " servers, the test runs " .. #upstreams)
  local listens
  conf, listens = conf:gsub("listen 80;", "listen 127.0.0.1:" .. port .. ";")
  assert(listens == 1, "deploy/nginx/tollgate.conf: no 'listen 80;' line")
  os.execute("mkdir -p " .. h.sh_quote(dir .. "/tmp") .. " " .. h.sh_quote(dir .. "/logs"))
  local main = table.concat({
    "daemon off;", "master_process off;", "worker_processes 1;",
    "error_log " .. dir .. "/logs/error.log warn;", "pid " .. dir .. "/nginx.pid;",
    "events { worker_connections 1024; }",
    "http {", "  access_log off;",
    "  client_body_temp_path " .. dir .. "/tmp/body;", "  proxy_temp_path " .. dir .. "/tmp/proxy;",
    "  fastcgi_temp_path " .. dir .. "/tmp/fastcgi;", "  uwsgi_temp_path " .. dir .. "/tmp/uwsgi;",
    "  scgi_temp_path " .. dir .. "/tmp/scgi;",
    conf, "}" }, "\n")
  h.write_file(dir .. "/nginx.conf", main .. "\n")
  local p = assert(io.popen("nginx -p " .. h.sh_quote(dir) .. " -e " .. h.sh_quote(dir .. "/logs/error.log")
    .. " -c " .. h.sh_quote(dir .. "/nginx.conf") .. " >" .. h.sh_quote(dir .. "/logs/stderr") .. " 2>&1 & echo $!"))
  local pid = tonumber(p:read("*l"))
  p:close()
  assert(pid, "nginx did not start")
  local deadline = h.now() + 5
  while not h.alive(port) do
    assert(h.now() < deadline and h.proc_alive(pid), "nginx did not listen: "
      .. (h.read_file(dir .. "/logs/stderr") or "") .. (h.read_file(dir .. "/logs/error.log") or ""))
    h.sleep(0.05)
  end
  return pid
end

describe("three instances behind nginx, one Redis", function()
  local redis, rdir, keys, shared, ndir, nginx_pid, nginx_port
  local gws = {}
  local owner = {} -- tenant index -> gateway index serving it through nginx
  local offer_key = h.random_hex(32)

  setup(function()
    rdir, keys, shared, ndir = tmpdir("scale-redis"), tmpdir("scale-keys"), tmpdir("scale-policy"), tmpdir("scale-nginx")
    redis = h.redis_start({ dir = rdir })
    local cdn_key = "scale-cdn-" .. h.random_hex(8)
    h.secret(cdn_key)
    h.write_file(keys .. "/cdn.key", cdn_key .. "\n", "600")
    h.write_file(shared .. "/tenant.lua", policy(1000))
    local tenants = {}
    for i = 1, NTENANTS do
      tenants[i] = string.format('{ name = "t%d", hosts = { %q }, catalog = { source = "t.xml" }, policy = %q, '
        .. 'signer = { type = "nginx_secure_link", base_url = "http://cdn.test", key_file = %q, ttl_s = 600 } },',
        i, host(i), shared .. "/tenant.lua", keys .. "/cdn.key")
    end
    for g = 1, 3 do
      local extra = string.format([[redis = { host = "127.0.0.1", port = %d, timeout_ms = 500 },
  rate_limit = { mode = "redis" },
  instance = "scale-%d",
  policy = { watch_debounce_ms = 50 },
  ledger = { mode = "redis", idempotency = { wait_ms = 5000 }, ship = { store = "redis" },
             accounts = { { billing_reference = %q, amount = %d } } },]], redis.port, g, ACCOUNT, FUNDS)
      gws[g] = h.start_prepared({ workers = 1, tenants = table.concat(tenants, "\n    "), extra = extra,
        files = { ["t.xml"] = h.rsl({ amount = "0.001" }) } }, function(dir)
        os.execute("mkdir -p " .. h.sh_quote(dir .. "/data") .. " && chmod 700 " .. h.sh_quote(dir .. "/data"))
        h.write_file(dir .. "/data/offer.key", offer_key .. "\n", "600")
      end)
      assert(h.wait_ready(gws[g]))
    end
    nginx_port = h.free_port()
    nginx_pid = nginx_start(ndir, nginx_port, { gws[1].port, gws[2].port, gws[3].port })
  end)

  teardown(function()
    if nginx_pid then
      os.execute("kill " .. nginx_pid .. " 2>/dev/null")
      local deadline = h.now() + 5
      while h.proc_alive(nginx_pid) and h.now() < deadline do h.sleep(0.05) end
    end
    for _, gw in ipairs(gws) do
      if gw and not gw.stopped then h.stop(gw) end
    end
    h.redis_stop(redis)
    if not os.getenv("TG_E2E_KEEP") then
      for _, d in ipairs({ rdir, keys, shared, ndir }) do
        if d then os.execute("rm -rf " .. h.sh_quote(d)) end
      end
    end
  end)

  it("routes each tenant host to one instance, and the tenants spread over them", function()
    for i = 1, NTENANTS do
      for _ = 1, 3 do discover(nginx_port, host(i)) end
    end
    local used = {}
    for i = 1, NTENANTS do
      local seen = {}
      for g = 1, 3 do
        local n = metric_sum(metrics(gws[g]), "policy_decisions_total",
          { 'tenant_id="t' .. i .. '"', 'front="connect"' })
        if n > 0 then seen[#seen + 1] = g end
      end
      assert.are.equal(1, #seen, host(i) .. " was served by instances " .. table.concat(seen, ","))
      owner[i] = seen[1]
      used[seen[1]] = true
    end
    local n = 0
    for _ in pairs(used) do n = n + 1 end
    assert.is_true(n >= 2, "every tenant went to one instance")
  end)

  it("charges one idempotency key sent to two instances at the same moment once", function()
    local offer = discover(gws[1].port, host(1))
    local before = balance(gws[1])
    local key = "scale-dup-" .. h.random_hex(6)
    local s1 = assert(h.connect(gws[1].port, 10))
    local s2 = assert(h.connect(gws[2].port, 10))
    assert(h.send(s1, buy_raw(host(1), key, offer)))
    assert(h.send(s2, buy_raw(host(1), key, offer)))
    local r1 = assert(h.read_response(s1, 20))
    local r2 = assert(h.read_response(s2, 20))
    s1:close()
    s2:close()
    assert.are.equal(approved(r1), approved(r2))
    assert.are.equal(r1.body, r2.body)
    assert.are.equal(before - 1000, balance(gws[3]))
  end)

  it("holds a rate limit shared through Redis within 10% across the three", function()
    h.sleep(0.5) -- the bucket refills after the discovery calls above (they are not under /rl/)
    local seconds = 4
    local outs = {}
    for g = 1, 3 do
      outs[g] = loadgen.wrk_async(gws[g].dir, gws[g].port, host(1), "/rl/x", seconds, 6)
    end
    local allowed, limited = 0, 0
    for g = 1, 3 do
      local counts, _, text = loadgen.wrk_result(outs[g], seconds + 15)
      allowed = allowed + (counts[402] or 0)
      limited = limited + (counts[429] or 0)
      assert.is_true((counts[402] or 0) > 0, "instance " .. g .. ": " .. text)
    end
    local expected = RATE * seconds + BURST
    print(string.format("fleet limit: %d allowed, %d limited, expected about %d", allowed, limited, expected))
    assert.is_true(limited > allowed, "the load did not exceed the limit")
    assert.is_true(math.abs(allowed - expected) <= expected * 0.10,
      string.format("allowed %d, expected %d +-10%%", allowed, expected))
  end)

  it("ships every transaction to the Redis streams exactly once", function()
    local keys_bought = {}
    for i = 1, NTENANTS do
      local offer = discover(nginx_port, host(i), "/s/" .. i)
      for k = 1, 4 do
        local key = string.format("scale-ship-%d-%d-%s", i, k, h.random_hex(4))
        approved(call(nginx_port, buy_raw(host(i), key, offer)))
        keys_bought[#keys_bought + 1] = key
      end
    end
    -- Shipped: nothing pending on any instance.
    local deadline = h.now() + 15
    for g = 1, 3 do
      while true do
        local res = call(gws[g].port, h.get_req("/readyz"))
        local body = h.json_decode(res.body)
        if body.ship and body.ship.pending == 0 then break end
        assert(h.now() < deadline, "instance " .. g .. " still ships: " .. res.body)
        h.sleep(0.1)
      end
    end
    local entries = {}
    for g = 1, 3 do
      for _, e in ipairs(redisc.stream(redis.port, "tg:txlog:scale-" .. g)) do
        entries[#entries + 1] = e.rec
      end
    end
    for _, key in ipairs(keys_bought) do
      local n = 0
      for _, rec in ipairs(entries) do
        if rec:find(key, 1, true) then n = n + 1 end
      end
      assert.are.equal(1, n, key .. " is in " .. n .. " stream entries")
    end
  end)

  it("brings a policy edit in the shared folder to all three", function()
    for g = 1, 3 do
      local _, price = discover(gws[g].port, host(2))
      assert.are.equal(1000, price)
    end
    h.write_file(shared .. "/tenant.lua.new", policy(2500))
    assert(os.rename(shared .. "/tenant.lua.new", shared .. "/tenant.lua"))
    for g = 1, 3 do
      local deadline = h.now() + 10
      while true do
        local _, price = discover(gws[g].port, host(2))
        if price == 2500 then break end
        assert(h.now() < deadline, "instance " .. g .. " still quotes " .. price)
        h.sleep(0.1)
      end
    end
  end)

  it("loses nothing acknowledged when one instance is killed; its tenants move to the others", function()
    -- A tenant of instance X, bought through nginx.
    local victim = owner[1]
    local tenant
    for i = 1, NTENANTS do
      if owner[i] == victim then tenant = i end
    end
    local X = gws[victim]
    local offer = discover(nginx_port, host(tenant), "/k/1")
    local acked = {}
    for k = 1, 10 do
      local key = "scale-kill-" .. k .. "-" .. h.random_hex(4)
      acked[key] = approved(call(nginx_port, buy_raw(host(tenant), key, offer)))
    end
    local other = gws[victim % 3 + 1]
    local before = balance(other)
    h.kill9(X)
    -- Every acknowledged purchase replays (the same transaction) through nginx,
    -- now served by another instance, and charges nothing more.
    for key, txid in pairs(acked) do
      assert.are.equal(txid, approved(call(nginx_port, buy_raw(host(tenant), key, offer))))
    end
    -- New purchases of its tenant go through.
    approved(call(nginx_port, buy_raw(host(tenant), "scale-after-" .. h.random_hex(4), offer)))
    assert.are.equal(before - 2500, balance(other))
    -- Back up, X ships what it had acknowledged (its log was on disk).
    h.relaunch(X)
    assert(h.wait_ready(X))
    local deadline = h.now() + 15
    local missing
    repeat
      local entries = redisc.stream(redis.port, "tg:txlog:scale-" .. victim)
      missing = {}
      for key in pairs(acked) do
        local found = false
        for _, e in ipairs(entries) do
          found = found or e.rec:find(key, 1, true) ~= nil
        end
        if not found then missing[#missing + 1] = key end
      end
      if #missing == 0 then break end
      h.sleep(0.2)
    until h.now() > deadline
    assert.are.equal(0, #missing, "not in the stream: " .. table.concat(missing, ", "))
  end)
end)
