-- Slow and abusive clients against the real binary, with one worker so that a
-- blocked event loop would show: slowloris, silent connections, half bodies,
-- idle keep-alive, and a burst of 100 connections sending garbage.
-- Limits (helpers.LIMITS): header_timeout_ms 1000, body_timeout_ms 1000,
-- idle_timeout_ms 2000.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local HEAD_S = h.LIMITS.header_timeout_ms / 1000
local BODY_S = h.LIMITS.body_timeout_ms / 1000
local IDLE_S = h.LIMITS.idle_timeout_ms / 1000
-- Timers fire on the server's loop clock; allow for a loaded 2-core machine.
local LATE_S = 1.0

local function status_of(bytes)
  return tonumber(bytes:match("^HTTP/1%.1 (%d%d%d) "))
end

describe("slow and abusive clients", function()
  local gw

  setup(function()
    gw = h.start({ workers = 1 })
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  it("slowloris: one header byte every 200 ms gets 408 at header_timeout_ms, others are served meanwhile", function()
    local head = "GET /healthz HTTP/1.1\r\nHost: news.example\r\nX-Slow: " .. string.rep("s", 200)
    local slow = assert(h.connect(gw.port))
    local t0 = h.now()
    local got, how = "", nil
    local fast_s
    for i = 1, #head do
      local ok = h.send(slow, head:sub(i, i))
      if not ok then
        break -- the server already closed: what it sent is in the socket
      end
      got, how = h.poll_bytes(slow, 0.2)
      if #got > 0 or how == "closed" then
        break
      end
      if i == 3 then
        -- Midway, a normal client on a fresh connection is answered at once.
        local t1 = h.now()
        local res = assert(h.request(gw.port, h.get_req("/healthz"), { timeout = 3 }))
        fast_s = h.now() - t1
        assert.are.equal(200, res.status)
      end
    end
    if #got == 0 then
      got = select(2, h.wait_close(slow, 2)) or ""
    end
    local took = h.now() - t0
    local rest = select(2, h.wait_close(slow, 2))
    slow:close()
    got = got .. (rest or "")
    assert.is_not_nil(fast_s, "the fast client never ran")
    assert.is_true(fast_s < HEAD_S / 2,
      string.format("the other client waited %.3f s (header timeout %.1f s)", fast_s, HEAD_S))
    assert.are.equal(408, status_of(got), "slow client got: " .. got)
    assert.truthy(got:find("\r\nConnection: close\r\n", 1, true), got)
    -- The head deadline does not move with each byte.
    assert.is_true(took >= HEAD_S * 0.9 and took < HEAD_S + LATE_S,
      string.format("408 after %.3f s, header timeout %.1f s", took, HEAD_S))
    assert(h.alive(gw.port))
  end)

  it("a connection that sends nothing is closed after header_timeout_ms without an answer", function()
    local s = assert(h.connect(gw.port))
    local how, bytes, took = h.wait_close(s, HEAD_S + LATE_S + 2)
    s:close()
    assert.are.equal("closed", how)
    assert.are.equal("", bytes)
    assert.is_true(took >= HEAD_S * 0.9 and took < HEAD_S + LATE_S,
      string.format("closed after %.3f s, header timeout %.1f s", took, HEAD_S))
    assert(h.alive(gw.port))
  end)

  it("half a body then silence gets 408 after body_timeout_ms", function()
    local body = h.json_discover({ "https://news.example/a" })
    local half = body:sub(1, math.floor(#body / 2))
    local raw = "POST " .. h.DISCOVER .. " HTTP/1.1\r\nHost: news.example\r\nContent-Type: application/json\r\n"
      .. "Content-Length: " .. #body .. "\r\n\r\n" .. half
    local s = assert(h.connect(gw.port))
    local t0 = h.now()
    assert(h.send(s, raw))
    local res, err = h.read_response(s, BODY_S + LATE_S + 2)
    local took = h.now() - t0
    assert(res, "no answer: " .. tostring(err))
    assert.are.equal(408, res.status, res.head .. res.body)
    assert.are.equal("close", res.headers["connection"])
    assert.are.equal("closed", (h.wait_close(s, 2)))
    s:close()
    assert.is_true(took >= BODY_S * 0.9 and took < BODY_S + LATE_S,
      string.format("408 after %.3f s, body timeout %.1f s", took, BODY_S))
    assert(h.alive(gw.port))
  end)

  it("a head cut off mid-header gets 408 after header_timeout_ms", function()
    local s = assert(h.connect(gw.port))
    local t0 = h.now()
    assert(h.send(s, "GET /healthz HTTP/1.1\r\nHost: news.exa"))
    local res, err = h.read_response(s, HEAD_S + LATE_S + 2)
    local took = h.now() - t0
    s:close()
    assert(res, "no answer: " .. tostring(err))
    assert.are.equal(408, res.status)
    assert.is_true(took >= HEAD_S * 0.9 and took < HEAD_S + LATE_S, string.format("%.3f s", took))
    assert(h.alive(gw.port))
  end)

  it("an idle keep-alive connection is closed after idle_timeout_ms", function()
    local s = assert(h.connect(gw.port))
    assert(h.send(s, h.get_req("/healthz")))
    local res = assert(h.read_response(s, 3))
    assert.are.equal(200, res.status)
    assert.is_nil(res.headers["connection"])
    local how, bytes, took = h.wait_close(s, IDLE_S + LATE_S + 2)
    s:close()
    assert.are.equal("closed", how)
    assert.are.equal("", bytes)
    assert.is_true(took >= IDLE_S * 0.9 and took < IDLE_S + LATE_S, string.format("closed after %.3f s", took))
  end)

  it("100 connections opened at once, each sending garbage, all get 400", function()
    local conns = {}
    for i = 1, 100 do
      conns[i] = assert(h.connect(gw.port))
    end
    for i = 1, 100 do
      assert(h.send(conns[i], "GARBAGE " .. i .. " \1\2\3\r\n\r\n"))
    end
    local statuses = {}
    for i = 1, 100 do
      local res, err = h.read_response(conns[i], 5)
      statuses[i] = res and res.status or tostring(err)
      conns[i]:close()
    end
    for i = 1, 100 do
      assert.are.equal(400, statuses[i], "connection " .. i)
    end
    assert(h.alive(gw.port))
    -- Nothing leaked: soon readiness counts only the connection asking (the
    -- server may still be closing the health check's connection).
    local body, n
    for _ = 1, 20 do
      local res = assert(h.request(gw.port, h.get_req("/readyz")))
      assert.are.equal(200, res.status)
      body = res.body
      n = tonumber(body:match('"connections":(%d+)'))
      if n and n <= 1 then
        break
      end
      h.sleep(0.05)
    end
    assert.is_true(n ~= nil and n <= 1, "open connections after the burst: " .. body)
  end)

  it("100 slow clients at once do not delay a normal request", function()
    local conns = {}
    for i = 1, 100 do
      conns[i] = assert(h.connect(gw.port))
      assert(h.send(conns[i], "POST /healthz HTTP/1.1\r\nHost: news.example\r\nContent-Length: 10\r\n\r\nabc"))
    end
    local t0 = h.now()
    local res = assert(h.request(gw.port, h.get_req("/healthz"), { timeout = 3 }))
    local took = h.now() - t0
    assert.are.equal(200, res.status)
    assert.is_true(took < HEAD_S / 2, string.format("normal request took %.3f s", took))
    for i = 1, 100 do
      local r = h.read_response(conns[i], BODY_S + LATE_S + 2)
      conns[i]:close()
      assert.are.equal(408, r and r.status, "slow client " .. i)
    end
    assert(h.alive(gw.port))
  end)
end)
