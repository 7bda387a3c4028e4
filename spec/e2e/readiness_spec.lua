-- /readyz with a transaction log and remote billing (core/gateway/readiness.h):
-- the log's utilization is in the body; a tenant billed by a remote service
-- that never answers its Health probe (a dead peer on port 1) is reported,
-- and once 10 probes in a row failed for a tenant whose policy rejects on a
-- billing timeout (the default until a decision was made), /readyz answers
-- 503 naming it, while /healthz stays 200.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

describe("/readyz", function()
  local gw

  setup(function()
    gw = h.start_prepared({
      tenants = [[{ name = "news", hosts = { "news.example" }, billing = { type = "builtin" } },
    { name = "shop", hosts = { "shop.example" },
      billing = { type = "connect", url = "http://127.0.0.1:1", token_file = "billing.token",
                  health_interval_ms = 100, call_timeout_ms = 100 } },]],
    }, function(dir)
      h.write_file(dir .. "/billing.token", "tok-" .. h.random_hex(8) .. "\n", "600")
    end)
  end)

  teardown(function()
    if gw then h.stop(gw) end
  end)

  it("reports the log's utilization and the remote billing's health, 503 after 10 failed probes", function()
    local deadline, res, body = h.now() + 15, nil, nil
    repeat
      res = assert(h.request(gw.port, h.get_req("/readyz")))
      body = h.json_decode(res.body)
      if res.status == 503 then break end
      h.sleep(0.1)
    until h.now() > deadline
    assert.are.equal(503, res.status, res.body)
    assert.is_false(body.ready)
    assert(body.log and body.log.capacity_bytes > 0 and body.log.used_bytes > 0, res.body)
    assert(body.log.utilization >= 0 and body.log.utilization < 0.9, res.body)
    assert.is_nil(body.ship, res.body) -- no ledger.ship
    assert(body.billing and #body.billing == 1, res.body) -- only the remote tenant
    local b = body.billing[1]
    assert.are.equal("shop", b.tenant)
    assert.is_false(b.serving)
    assert.is_true(b.rejects)
    assert(b.consecutive_failures >= 10, res.body)
    local named = false
    for _, r in ipairs(body.reasons) do
      if type(r) == "table" and r.tenant == "shop" and tostring(r.billing):find("consecutive health checks failed") then
        named = true
      end
    end
    assert(named, res.body)
    assert(not res.body:find("127.0.0.1:1", 1, true), "the public answer names no URL: " .. res.body)
    local hz = assert(h.request(gw.port, h.get_req("/healthz")))
    assert.are.equal(200, hz.status)
  end)
end)
