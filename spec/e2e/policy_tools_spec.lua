-- The tools an operator runs on a policy, against the real binary:
-- `tollgate policy test` (compile, fixtures, busted specs through the
-- embedded harness, outside the repository), `tollgate policy diff`, the dry
-- run of a reload (POST /reload?dry_run=1: nothing published), what /status
-- says about each tenant's policy, and the per-tenant policy metrics.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

-- V1 is live; V2 changes a price (its fixture with it), a skip, a rate-limit
-- burst and the billing-timeout answer, each pinned by a fixture.
local V1 = [[
local P = {}
function P.skip(req) return req.path == "/free" end
function P.rate_limit(req) return "ip:" .. (req.ip or "unknown"), 100000, 100000 end
function P.price(offer, req) return 100, "USD" end
P.fixtures = {
  { name = "flat", hook = "price", offer = { amount = 1, currency = "USD" }, expect = { 100, "USD" } },
}
return P
]]

local V2 = [[
local P = {}
function P.skip(req) return req.path == "/free" or req.path == "/gratis" end
function P.rate_limit(req) return "ip:" .. (req.ip or "unknown"), 100000, 50000 end
function P.price(offer, req) return 200, "USD" end
function P.on_billing_timeout(txn) return "deferred" end
P.fixtures = {
  { name = "flat", hook = "price", offer = { amount = 1, currency = "USD" }, expect = { 200, "USD" } },
  { hook = "rate_limit", req = { ip = "192.0.2.1" }, expect = { "ip:192.0.2.1", 100000, 50000 } },
  { hook = "on_billing_timeout", txn = { amount = 1 }, expect = { "deferred" } },
  { hook = "skip", req = { path = "/gratis" }, expect = { true } },
}
return P
]]

-- The price changed, its fixture did not: a reload refuses it.
local STALE = V1:gsub("return 100, \"USD\" end", "return 300, \"USD\" end")
-- A syntax error on line 3.
local BROKEN = "local P = {}\nfunction P.price(offer, req)\n  return 1 +\nend\nreturn P\n"

local function sha12(text)
  local path = os.tmpname()
  h.write_file(path, text)
  local p = assert(io.popen("sha256sum " .. h.sh_quote(path)))
  local sum = p:read("*l"):sub(1, 12)
  p:close()
  os.remove(path)
  return sum
end

local function mktemp_dir()
  local p = assert(io.popen("mktemp -d /tmp/tollgate-tools-XXXXXX"))
  local dir = p:read("*l")
  p:close()
  return dir
end

-- Runs the binary with args in dir (env: a prefix of NAME=value words);
-- returns its exit status and what it printed (stdout and stderr).
local function tollgate(dir, args, env)
  local cmd = string.format("cd %s && %s %s %s 2>&1; echo \"rc=$?\"", h.sh_quote(dir), env or "",
    h.sh_quote(h.binary()), args)
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  local rc = tonumber(out:match("rc=(%d+)%s*$"))
  return rc, (out:gsub("rc=%d+%s*$", ""))
end

local function has(out, text)
  return out:find(text, 1, true) ~= nil
end

describe("tollgate policy test", function()
  local dir

  setup(function()
    dir = mktemp_dir()
    h.write_file(dir .. "/news.lua", V1)
    h.write_file(dir .. "/stale.lua", STALE)
    h.write_file(dir .. "/broken.lua", BROKEN)
    os.execute("mkdir -p " .. h.sh_quote(dir .. "/spec") .. " " .. h.sh_quote(dir .. "/failing"))
    -- Specs as an operator writes them: the harness by name, the policy from
    -- TOLLGATE_POLICY; the folder is outside the repository.
    h.write_file(dir .. "/spec/news_spec.lua", [[
local harness = require("tollgate.harness")
describe("news", function()
  it("prices flat", function()
    local p = harness.load(os.getenv("TOLLGATE_POLICY"), { tenant = os.getenv("TOLLGATE_TENANT") })
    assert.are.same({ 100, "USD" }, { p:price(harness.offer{}, harness.req{}) })
    assert.are.equal("news", p.tenant)
  end)
end)
]])
    h.write_file(dir .. "/failing/news_spec.lua", [[
local harness = require("tollgate.harness")
describe("news", function()
  it("charges a fortune", function()
    local p = harness.load(os.getenv("TOLLGATE_POLICY"))
    assert.are.same({ 999, "USD" }, { p:price(harness.offer{}, harness.req{}) })
  end)
end)
]])
  end)

  teardown(function()
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)

  it("passes a valid policy and says what it checked", function()
    local rc, out = tollgate(dir, "policy test news.lua")
    assert.are.equal(0, rc, out)
    assert.truthy(has(out, "version   " .. sha12(V1)), out)
    assert.truthy(has(out, "hooks     skip, rate_limit, price"), out)
    assert.truthy(has(out, "fixtures  1 passed"), out)
    assert.truthy(has(out, "ok: news.lua"), out)
  end)

  it("fails a failing fixture, naming the file and the fixture", function()
    local rc, out = tollgate(dir, "policy test stale.lua")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "stale.lua: fixture 1 'flat' (price): expected {100, \"USD\"}, got {300, \"USD\"}"), out)
  end)

  it("fails a syntax error with FILE:LINE", function()
    local rc, out = tollgate(dir, "policy test broken.lua")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "broken.lua:4: unexpected symbol near 'end'"), out)
  end)

  it("fails a file that cannot be read", function()
    local rc, out = tollgate(dir, "policy test nothing-here.lua")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "nothing-here.lua: cannot open"), out)
  end)

  it("exits 2 on bad usage", function()
    for _, args in ipairs({ "policy test", "policy test news.lua --bogus", "policy test news.lua --spec",
                            "policy test news.lua --spec no-such-dir", "policy frobnicate news.lua",
                            "policy" }) do
      local rc, out = tollgate(dir, args)
      assert.are.equal(2, rc, args .. ": " .. out)
      assert.truthy(has(out, "usage") or has(out, "no-such-dir"), out)
    end
  end)

  it("runs busted specs that require the embedded harness, outside the repository", function()
    os.execute("mkdir -p " .. h.sh_quote(dir .. "/tmp"))
    local rc, out = tollgate(dir, "policy test news.lua --spec spec", "TMPDIR=" .. h.sh_quote(dir .. "/tmp"))
    assert.are.equal(0, rc, out)
    assert.truthy(has(out, "1 success / 0 failures"), out)
    assert.truthy(has(out, "specs     passed"), out)
    -- The private copy of lua/ was made there, and is gone afterwards.
    local p = assert(io.popen("ls -A " .. h.sh_quote(dir .. "/tmp")))
    local left = p:read("*a")
    p:close()
    assert.are.equal("", left)
  end)

  it("fails when a spec fails, naming the spec", function()
    local rc, out = tollgate(dir, "policy test news.lua --spec failing")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "news charges a fortune"), out)
    assert.truthy(has(out, "failing/news_spec.lua"), out)
  end)

  it("says how to install busted when it is missing", function()
    local rc, out = tollgate(dir, "policy test news.lua --spec spec", "PATH=/nonexistent")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "busted is not installed"), out)
    assert.truthy(has(out, "apt-get install lua-busted"), out)
  end)
end)

describe("tollgate policy diff", function()
  local dir

  setup(function()
    dir = mktemp_dir()
    h.write_file(dir .. "/news.lua", V1)
    h.write_file(dir .. "/same.lua", V1)
    h.write_file(dir .. "/v2.lua", V2)
    h.write_file(dir .. "/stale.lua", STALE)
    h.write_file(dir .. "/broken.lua", BROKEN)
  end)

  teardown(function()
    os.execute("rm -rf " .. h.sh_quote(dir))
  end)

  it("exits 0 when no decision differs", function()
    local rc, out = tollgate(dir, "policy diff news.lua same.lua")
    assert.are.equal(0, rc, out)
    assert.truthy(has(out, "no decision differs"), out)
  end)

  it("lists each decision that differs, on the fixtures of both files, and exits 1", function()
    local rc, out = tollgate(dir, "policy diff news.lua v2.lua")
    assert.are.equal(1, rc, out)
    assert.truthy(has(out, "old  " .. sha12(V1) .. "  news.lua"), out)
    assert.truthy(has(out, "new  " .. sha12(V2) .. "  v2.lua"), out)
    -- The price fixture is in both files: compared once.
    assert.truthy(has(out, "4 fixture inputs compared (tenant news): 4 decided differently"), out)
    assert.truthy(out:find("old #1 'flat'%s+price%s+100, \"USD\"%s+200, \"USD\""), out)
    assert.truthy(out:find("new #2%s+rate_limit%s+\"ip:192.0.2.1\", 100000, 100000%s+\"ip:192.0.2.1\", 100000, 50000"), out)
    assert.truthy(out:find("new #3%s+on_billing_timeout%s+\"reject\"%s+\"deferred\""), out)
    assert.truthy(out:find("new #4%s+skip%s+false%s+true"), out)
  end)

  it("says a candidate a reload would refuse, with the difference that explains it, and exits 2", function()
    local rc, out = tollgate(dir, "policy diff news.lua stale.lua")
    assert.are.equal(2, rc, out)
    assert.truthy(has(out, "new is invalid, a reload would refuse it: stale.lua: fixture 1 'flat' (price)"), out)
    assert.truthy(out:find("old #1 'flat'%s+price%s+100, \"USD\"%s+300, \"USD\""), out)
  end)

  it("exits 2 on a candidate that does not compile, an unreadable file, bad usage", function()
    local rc, out = tollgate(dir, "policy diff news.lua broken.lua")
    assert.are.equal(2, rc, out)
    assert.truthy(has(out, "broken.lua:4: unexpected symbol near 'end'"), out)
    rc, out = tollgate(dir, "policy diff missing.lua news.lua")
    assert.are.equal(2, rc, out)
    assert.truthy(has(out, "missing.lua: cannot open"), out)
    rc, out = tollgate(dir, "policy diff broken.lua news.lua")
    assert.are.equal(2, rc, out)
    assert.truthy(has(out, "broken.lua:4:"), out)
    rc, out = tollgate(dir, "policy diff news.lua")
    assert.are.equal(2, rc, out)
    rc, out = tollgate(dir, "policy diff news.lua v2.lua --tenant")
    assert.are.equal(2, rc, out)
  end)
end)

describe("dry run, /status and policy metrics", function()
  local gw

  local function admin(method, path)
    local raw = table.concat({ method .. " " .. path .. " HTTP/1.1", "Host: 127.0.0.1",
      "Authorization: Bearer " .. gw.token, "Content-Length: 0", "", "" }, "\r\n")
    return assert(h.request(gw.admin_port, raw, { timeout = 10 }))
  end

  local function json(method, path, want_status)
    local res = admin(method, path)
    assert.are.equal(want_status, res.status, path .. ": " .. res.body)
    return h.json_decode(res.body)
  end

  local function tenant(list, name)
    for _, t in ipairs(list) do
      if (t.tenant or t.name) == name then return t end
    end
    error("no tenant " .. name .. " in the answer")
  end

  local function metrics()
    return admin("GET", "/metrics").body
  end

  -- The sum of a metric's samples whose line holds every needle.
  local function sample_sum(text, name, needles)
    local total = 0
    for line in text:gmatch("[^\n]+") do
      if line:sub(1, #name + 1) == name .. "{" then
        local ok = true
        for _, n in ipairs(needles) do
          if not line:find(n, 1, true) then ok = false end
        end
        if ok then total = total + tonumber(line:match(" (%S+)$")) end
      end
    end
    return total
  end

  local function policy_of(name)
    return tenant(json("GET", "/status", 200).tenants, name).policy
  end

  local function save(text)
    h.write_file(gw.dir .. "/p.lua", text)
  end

  setup(function()
    -- The watch would reload a saved file on its own: not within this spec.
    gw = h.start({
      tenants = '{ name = "news", hosts = { "news.example" }, policy = "p.lua" },\n' ..
                '    { name = "docs", hosts = { "docs.example" } },',
      files = { ["p.lua"] = V1 },
      extra = "policy = { watch_debounce_ms = 60000 },",
    })
  end)

  teardown(function()
    if gw then h.stop_clean(gw) end
  end)

  it("/status: the live version, no reload attempt yet, the file as live", function()
    local st = json("GET", "/status", 200)
    local news, docs = tenant(st.tenants, "news").policy, tenant(st.tenants, "docs").policy
    assert.are.equal(sha12(V1), news.version)
    assert.are.equal("number", type(news.loaded_at))
    assert.are.equal(false, news.file_differs)
    assert.are.equal(sha12(V1), news.file_version)
    assert.is_nil(news.last_reload)
    -- The embedded default policy has no file and never differs.
    assert.are.equal(false, docs.file_differs)
    assert.is_nil(docs.file)
    assert.are.equal(12, #docs.version)
  end)

  it("dry run of an unchanged file: unchanged", function()
    local r = json("POST", "/reload?dry_run=1", 200)
    assert.are.equal(true, r.dry_run)
    local news = tenant(r.tenants, "news")
    assert.are.equal("unchanged", news.result)
    assert.are.equal(sha12(V1), news.live_version)
    assert.are.equal(sha12(V1), news.candidate_version)
    assert.are.equal(0, #news.differences)
    assert.are.equal("unchanged", tenant(r.tenants, "docs").result)
  end)

  it("dry run of a valid change: the differences, and nothing published", function()
    local before = metrics()
    save(V2)
    local r = json("POST", "/reload?dry_run=1&tenant=news", 200)
    assert.are.equal(1, #r.tenants)
    local news = r.tenants[1]
    assert.are.equal("valid", news.result)
    assert.are.equal(sha12(V1), news.live_version)
    assert.are.equal(sha12(V2), news.candidate_version)
    assert.is_nil(news.error)
    assert.are.equal(4, news.compared)
    assert.are.equal(4, news.differing)
    local by_hook = {}
    for _, d in ipairs(news.differences) do by_hook[d.hook] = d end
    assert.are.same({ of = "live", index = 1, name = "flat" }, by_hook.price.fixture)
    assert.are.same({ 100, "USD" }, by_hook.price.live)
    assert.are.same({ 200, "USD" }, by_hook.price.candidate)
    assert.are.same({ of = "candidate", index = 2 }, by_hook.rate_limit.fixture)
    assert.are.same({ "ip:192.0.2.1", 100000, 100000 }, by_hook.rate_limit.live)
    assert.are.same({ "ip:192.0.2.1", 100000, 50000 }, by_hook.rate_limit.candidate)
    assert.are.same({ "reject" }, by_hook.on_billing_timeout.live)
    assert.are.same({ "deferred" }, by_hook.on_billing_timeout.candidate)
    assert.are.same({ false }, by_hook.skip.live)
    assert.are.same({ true }, by_hook.skip.candidate)

    -- Nothing published: the live version, its metrics and the reload
    -- counters are as they were; only the dry-run counter moved.
    local st = policy_of("news")
    assert.are.equal(sha12(V1), st.version)
    assert.are.equal(true, st.file_differs)
    assert.are.equal(sha12(V2), st.file_version)
    assert.is_nil(st.last_reload)
    local after = metrics()
    assert.truthy(has(after, 'policy_version_info{tenant_id="news",version="' .. sha12(V1) .. '"} 1'), after)
    assert.falsy(has(after, sha12(V2)), after)
    assert.are.equal(sample_sum(before, "policy_reloads_total", {}), sample_sum(after, "policy_reloads_total", {}))
    assert.are.equal(1, sample_sum(after, "policy_dry_runs_total", { 'tenant_id="news"', 'result="valid"' }))
    -- The gateway answers from V1 still: the old skip rule.
    local res = assert(h.request(gw.port, h.get_req("/gratis", nil, "news.example"), { timeout = 5 }))
    assert.are_not.equal(200, res.status, res.body)
  end)

  it("dry run of a change a reload would refuse: invalid, FILE:LINE, 422", function()
    save(BROKEN)
    local news = tenant(json("POST", "/reload?dry_run=1", 422).tenants, "news")
    assert.are.equal("invalid", news.result)
    assert.are.equal(sha12(BROKEN), news.candidate_version)
    assert.truthy(news.error:find("p.lua:4: unexpected symbol near 'end'", 1, true), news.error)
    assert.are.equal(0, #news.differences)

    save(STALE)
    news = tenant(json("POST", "/reload?dry_run=1", 422).tenants, "news")
    assert.are.equal("invalid", news.result)
    assert.truthy(news.error:find("p.lua: fixture 1 'flat' (price): expected {100, \"USD\"}, got {300, \"USD\"}", 1, true),
      news.error)
    assert.are.equal(1, news.differing)
    assert.are.same({ 300, "USD" }, news.differences[1].candidate)
    assert.are.equal(sha12(V1), policy_of("news").version)
  end)

  it("dry run: unknown tenant 404, a bad dry_run 400, GET 405", function()
    json("POST", "/reload?dry_run=1&tenant=nobody", 404)
    json("POST", "/reload?dry_run=maybe", 400)
    assert.are.equal(405, admin("GET", "/reload?dry_run=1").status)
  end)

  it("a request that meant to validate never swaps: a bare ?dry_run validates, a typo is refused", function()
    save(V2)
    local r = json("POST", "/reload?dry_run", 200)
    assert.are.equal(true, r.dry_run)
    assert.are.equal("valid", tenant(r.tenants, "news").result)
    local refused = json("POST", "/reload?dryrun=1", 400)
    assert.are.equal("unknown parameter 'dryrun' (known: dry_run, tenant)", refused.error)
    json("POST", "/reload?dry_run=1&tenant", 404)
    assert.are.equal(sha12(V1), policy_of("news").version)
    save(V1)
  end)

  it("/status: a refused reload, with its error and the refused version; then a good one", function()
    save(BROKEN)
    json("POST", "/reload", 422)
    local st = policy_of("news")
    assert.are.equal(sha12(V1), st.version)
    assert.are.equal("error", st.last_reload.result)
    assert.are.equal(sha12(BROKEN), st.last_reload.version)
    assert.truthy(st.last_reload.error:find("p.lua:4: unexpected symbol near 'end'", 1, true), st.last_reload.error)
    assert.are.equal("number", type(st.last_reload.at))
    assert.are.equal(true, st.file_differs)

    save(V2)
    json("POST", "/reload", 200)
    st = policy_of("news")
    assert.are.equal(sha12(V2), st.version)
    assert.are.equal("ok", st.last_reload.result)
    assert.are.equal(sha12(V2), st.last_reload.version)
    assert.is_nil(st.last_reload.error)
    assert.are.equal(false, st.file_differs)

    json("POST", "/reload", 200)
    assert.are.equal("unchanged", policy_of("news").last_reload.result)
  end)

  it("policy_version_info: one series per tenant, the live version", function()
    local m = metrics()
    local n = 0
    for line in m:gmatch("[^\n]+") do
      if line:find('^policy_version_info{tenant_id="news"') then
        n = n + 1
        assert.truthy(has(line, 'version="' .. sha12(V2) .. '"} 1'), line)
      end
    end
    assert.are.equal(1, n, m)
    assert.falsy(has(m, sha12(V1)), m)
    assert.are.equal(1, sample_sum(m, "policy_version_info", { 'tenant_id="docs"' }))
  end)

  it("policy_hook_duration_seconds counts each call by tenant; ratelimit_decisions_total once per decision", function()
    local before = metrics()
    local n = 5
    for _ = 1, n do
      assert(h.request(gw.port, h.get_req("/article", nil, "news.example"), { timeout = 5 }))
    end
    local after = metrics()
    local function count(text, hook)
      return sample_sum(text, "policy_hook_duration_seconds_count", { 'tenant_id="news"', 'hook="' .. hook .. '"' })
    end
    assert.are.equal(n, count(after, "skip") - count(before, "skip"), after)
    assert.are.equal(n, count(after, "rate_limit") - count(before, "rate_limit"), after)
    local function decisions(text)
      return sample_sum(text, "ratelimit_decisions_total", { 'tenant_id="news"' })
    end
    assert.are.equal(n, decisions(after) - decisions(before), after)
  end)
end)
