-- Message framing against the real binary: one request in, at most one answer
-- out, and bytes the server does not frame as a request are never parsed as
-- one (request smuggling). CONNECT, Upgrade, Transfer-Encoding in HTTP/1.0,
-- transfer codings, obs-fold. RFC 9112 sections 5.2, 6.1, 7, 9.6;
-- RFC 9110 sections 7.8, 9.3.6.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local HOST = "Host: news.example\r\n"
-- Pipelined after each case: a second answer means it was parsed.
local SMUGGLED = "GET /healthz?smuggled HTTP/1.1\r\n" .. HOST .. "\r\n"

describe("framing", function()
  local gw

  setup(function()
    gw = h.start()
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  -- Sends raw .. SMUGGLED; expects exactly one answer with status, then the
  -- connection closed with nothing more on it.
  local function one_answer_then_close(raw, status)
    local res, err, s = h.exchange(gw.port, raw .. SMUGGLED, 5)
    assert(res, "no answer to " .. h.show(raw) .. ": " .. tostring(err))
    assert.are.equal(status, res.status, "request: " .. h.show(raw) .. "\nanswer:\n" .. res.head .. res.body)
    assert.are.equal("close", res.headers["connection"], "Connection header")
    local how, extra = h.wait_close(s, 3)
    s:close()
    assert.are.equal("", extra, "a second answer: the bytes after the request were parsed")
    assert.are.equal("closed", how)
    assert(h.alive(gw.port))
    return res
  end

  describe("CONNECT and Upgrade", function()
    it("CONNECT gets one 405 (with Allow) and the connection closes", function()
      local res = one_answer_then_close("CONNECT news.example:443 HTTP/1.1\r\nHost: news.example:443\r\n\r\n", 405)
      assert.truthy(res.headers["allow"])
    end)

    it("CONNECT to any other authority is refused the same way", function()
      one_answer_then_close("CONNECT 127.0.0.1:22 HTTP/1.1\r\n" .. HOST .. "\r\n", 405)
    end)

    it("Upgrade: websocket is served as plain HTTP once, then the connection closes", function()
      local res = one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST ..
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n" ..
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 200)
      assert.are.equal("ok\n", res.body)
    end)

    it("Upgrade: h2c likewise", function()
      one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST ..
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n", 200)
    end)

    it("Upgrade without Connection: upgrade, and with a body, likewise", function()
      one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST .. "Upgrade: websocket\r\n\r\n", 200)
      one_answer_then_close("POST /healthz HTTP/1.1\r\n" .. HOST ..
        "Connection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc", 200)
    end)
  end)

  describe("Transfer-Encoding", function()
    it("in HTTP/1.0 is faulty framing: 400 and close, even with keep-alive", function()
      one_answer_then_close("POST /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" ..
        "0\r\n\r\n", 400)
      one_answer_then_close("POST /healthz HTTP/1.0\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n" ..
        "Connection: keep-alive\r\n\r\n0\r\n\r\n", 400)
    end)

    it("with Content-Length is 400 and close", function()
      one_answer_then_close("POST /healthz HTTP/1.1\r\n" .. HOST ..
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n", 400)
    end)

    it("a coding we do not decode ahead of chunked is 501 and close", function()
      one_answer_then_close("POST /healthz HTTP/1.1\r\n" .. HOST ..
        "Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501)
    end)

    it("chunked not last, or twice, is 400 and close", function()
      one_answer_then_close("POST /healthz HTTP/1.1\r\n" .. HOST ..
        "Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400)
      one_answer_then_close("POST /healthz HTTP/1.1\r\n" .. HOST ..
        "Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400)
    end)
  end)

  describe("header lines", function()
    it("obs-fold is 400 and close (RFC 9112 5.2)", function()
      one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST .. "X-A: a\r\n b\r\n\r\n", 400)
      one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST .. "X-A: a\r\n\tb\r\n\r\n", 400)
      one_answer_then_close("GET /healthz HTTP/1.1\r\n" .. HOST .. " Transfer-Encoding: chunked\r\n\r\n", 400)
    end)
  end)
end)
