-- Paths where a secret is used and could slip into a log: a Redis password
-- (right and wrong), a billing service token, wrong admin tokens, a query
-- string. Each gateway here logs into the suite's log folder, and its secrets
-- are registered (helpers.lua), so zz_secrets_spec.lua greps these lines too.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")
local socket = require("socket")

describe("secret-bearing paths", function()
  local redis, pass

  setup(function()
    pass = "redis-pass-" .. h.random_hex(10)
    local port = h.free_port()
    local p = assert(io.popen(string.format(
      "redis-server --port %d --bind 127.0.0.1 --save '' --appendonly no --requirepass %s --daemonize no "
        .. ">/dev/null 2>&1 & echo $!", port, pass)))
    redis = { pid = tonumber(p:read("*l")), port = port }
    p:close()
    local deadline = h.now() + 5
    while h.now() < deadline do
      local s = h.connect(port, 0.5)
      if s then
        s:send("AUTH " .. pass .. "\r\nPING\r\n")
        s:settimeout(0.5)
        local a, b = s:receive("*l"), s:receive("*l")
        s:close()
        if a == "+OK" and b == "+PONG" then
          return
        end
      end
      h.sleep(0.02)
    end
    error("redis-server with a password did not come up")
  end)

  teardown(function()
    h.redis_stop(redis)
  end)

  local function gateway(password, billing_port)
    return h.start_prepared({
      tenants = string.format([[{ name = "news", hosts = { "news.example" },
      billing = { type = "connect", url = "http://127.0.0.1:%d", token_file = "billing.token",
                  health_interval_ms = 100, call_timeout_ms = 200 } },]], billing_port),
      extra = string.format([[redis = { host = "127.0.0.1", port = %d, password_file = "redis.pass" },
  rate_limit = { mode = "redis" },
  access_log = { sample = 1.0, errors = true },]], redis.port),
    }, function(dir)
      h.write_file(dir .. "/redis.pass", password .. "\n", "600")
      h.write_file(dir .. "/billing.token", "billing-secret-" .. h.random_hex(10) .. "\n", "600")
    end)
  end

  it("the right and a wrong Redis password, a billing token, bad admin tokens: logged without them", function()
    -- A billing service that refuses every connection: port 1 (nothing listens there).
    local good = gateway(pass, 1)
    local wrong = "wrong-pass-" .. h.random_hex(10)
    local bad = gateway(wrong, 1)
    for _, gw in ipairs({ good, bad }) do
      local res = assert(h.request(gw.port, h.get_req("/a?api_key=" .. gw.token, { "Authorization: Bearer " .. gw.token })))
      assert.truthy(res.status >= 200, res.head)
      local r401 = assert(h.request(gw.admin_port, h.get_req("/status", { "Authorization: Bearer " .. gw.token .. "x" },
        "127.0.0.1")))
      assert.are.equal(401, r401.status)
      h.secret(gw.token .. "x")
    end
    -- The wrong password is refused by Redis, and the gateway says so.
    local deadline = h.now() + 5
    while not bad.log():lower():find("redis", 1, true) and h.now() < deadline do
      h.sleep(0.05)
    end
    h.sleep(0.5) -- a few failed billing health probes
    h.stop_clean(good)
    h.stop_clean(bad)
    local log = bad.log()
    assert.truthy(log:lower():find("redis", 1, true), log)
    for _, gw in ipairs({ good, bad }) do
      local l = gw.log()
      assert.truthy(l:find('"msg":"access"', 1, true), l)
      assert.falsy(l:find(pass, 1, true), "the Redis password is in the log")
      assert.falsy(l:find(wrong, 1, true), "the wrong Redis password is in the log")
      assert.falsy(l:find(gw.token, 1, true), "the admin token is in the log")
    end
  end)
end)
