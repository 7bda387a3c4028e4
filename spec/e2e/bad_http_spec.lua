-- Malformed HTTP/1.1 against the real binary: request lines, header limits,
-- body limits and framing. Every case checks the exact status, that the
-- connection ends after a server-made error, and that the gateway still
-- answers a normal request on a fresh connection.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local HOST = "Host: news.example\r\n"

-- Request-line cases. RFC 9112 section 3: an invalid request-line gets 400; a
-- major version we do not speak gets 505 (RFC 9110 section 15.6.6). A request
-- line without a version is an HTTP/0.9 simple request: 505 as well.
local request_lines = {
  { "garbage instead of a request line", "GARBAGE\r\n\r\n", 400 },
  { "binary bytes", "\1\2\3\4\255\254\253\r\n\r\n", 400 },
  { "missing HTTP version (an HTTP/0.9 simple request)", "GET /healthz\r\n\r\n", 505 },
  { "unknown method token", "FOO /healthz HTTP/1.1\r\n" .. HOST .. "\r\n", 400 },
  { "lowercase method (methods are case-sensitive)", "get /healthz HTTP/1.1\r\n" .. HOST .. "\r\n", 400 },
  { "HTTP/9.9", "GET /healthz HTTP/9.9\r\n" .. HOST .. "\r\n", 505 },
  { "HTTP/0.9 spelled out", "GET /healthz HTTP/0.9\r\n" .. HOST .. "\r\n", 505 },
  { "NUL byte in the request target", "GET /heal\0thz HTTP/1.1\r\n" .. HOST .. "\r\n", 400 },
  { "NUL byte in a header value", "GET /healthz HTTP/1.1\r\n" .. HOST .. "X-A: a\0b\r\n\r\n", 400 },
  { "NUL byte in a header name", "GET /healthz HTTP/1.1\r\n" .. HOST .. "X-\0A: b\r\n\r\n", 400 },
  { "header line without a colon", "GET /healthz HTTP/1.1\r\n" .. HOST .. "Bad Header\r\n\r\n", 400 },
  { "bare LF line endings throughout", "GET /healthz HTTP/1.1\nHost: news.example\nX-A: b\n\n", 400 },
  -- RFC 9112 section 5.1: whitespace between a field name and the colon MUST be 400.
  { "whitespace between header name and colon", "GET /healthz HTTP/1.1\r\nHost : news.example\r\n\r\n", 400 },
  -- RFC 9112 section 3.2: an HTTP/1.1 request without Host, or with two, MUST be 400.
  { "HTTP/1.1 request without Host", "GET /healthz HTTP/1.1\r\n\r\n", 400 },
  { "two Host headers", "GET /healthz HTTP/1.1\r\n" .. HOST .. "Host: other.example\r\n\r\n", 400 },
  -- RFC 9112 section 3: a request-target longer than we parse MUST be 414.
  { "request target over max_header_bytes", "GET /" .. string.rep("a", 9000) .. " HTTP/1.1\r\n" .. HOST .. "\r\n", 414 },
}

local function many_headers(n)
  local t = { "GET /healthz HTTP/1.1\r\n", HOST }
  for i = 1, n do
    t[#t + 1] = "X-H" .. i .. ": v\r\n"
  end
  t[#t + 1] = "\r\n"
  return table.concat(t)
end

local limits = {
  { "one header over max_header_bytes (8192)",
    "GET /healthz HTTP/1.1\r\n" .. HOST .. "X-Big: " .. string.rep("a", 8200) .. "\r\n\r\n", 431 },
  { "the whole head over max_header_bytes in many small headers",
    "GET /healthz HTTP/1.1\r\n" .. HOST .. string.rep("X-Pad: " .. string.rep("p", 80) .. "\r\n", 95) .. "\r\n", 431 },
  { "101 headers (over the 100-header cap, well under the byte limit)", many_headers(100), 431 },
  { "Content-Length over max_body_bytes (65536)",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Content-Length: 65537\r\n\r\n", 413 },
  { "Content-Length of 2^64 and more",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Content-Length: 99999999999999999999999\r\n\r\n", 400 },
  { "negative Content-Length", "POST /healthz HTTP/1.1\r\n" .. HOST .. "Content-Length: -1\r\n\r\n", 400 },
  { "two different Content-Length headers",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello", 400 },
  -- Exactly one byte over, so nothing is left unread when the server closes
  -- (unread bytes would turn the close into a reset that can eat the answer).
  { "chunked body over max_body_bytes",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked\r\n\r\n10001\r\n" .. string.rep("b", 65537), 413 },
  { "chunked body over max_body_bytes in many chunks",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked\r\n\r\n"
      .. string.rep("1000\r\n" .. string.rep("c", 4096) .. "\r\n", 16) .. "1\r\nc", 413 },
}

local framing = {
  { "chunk size that is not hex",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400 },
  { "chunk size overflowing 64 bits",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFFFFF\r\n", 400 },
  -- RFC 9112 section 7.1: chunk-data is followed by CRLF; other bytes there
  -- are a framing error (accepting them is a request-smuggling vector).
  { "chunk data not followed by CRLF",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", 400 },
  { "Content-Length together with Transfer-Encoding",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400 },
  { "Transfer-Encoding that does not end in chunked",
    "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400 },
  { "unknown Transfer-Encoding", "POST /healthz HTTP/1.1\r\n" .. HOST .. "Transfer-Encoding: gzip\r\n\r\n", 400 },
  { "HTTP/2 preface on an HTTP/1.1 port", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400 },
}

local show = h.show

describe("bad HTTP input", function()
  local gw

  setup(function()
    gw = h.start()
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  local function check(case)
    local name, raw, status = case[1], case[2], case[3]
    it(name .. " -> " .. status, function()
      local res, err, s = h.exchange(gw.port, raw, 5)
      assert(res, "no answer to " .. show(raw) .. ": " .. tostring(err))
      assert.are.equal(status, res.status,
        "request: " .. show(raw) .. "\nanswer:\n" .. res.head .. res.body)
      -- A server-made error ends the connection: nothing after the bad
      -- bytes may be read as a new request.
      assert.are.equal("close", res.headers["connection"], "Connection header of the error")
      local how, extra = h.wait_close(s, 3)
      s:close()
      assert.are.equal("closed", how, "connection after the error")
      assert.are.equal("", extra, "bytes after the error answer")
      assert(h.alive(gw.port))
    end)
  end

  describe("request lines and headers", function()
    for _, case in ipairs(request_lines) do
      check(case)
    end
  end)

  describe("limits", function()
    for _, case in ipairs(limits) do
      check(case)
    end
  end)

  describe("body framing", function()
    for _, case in ipairs(framing) do
      check(case)
    end
  end)

  describe("tolerated forms", function()
    -- RFC 9112 section 2.2 lets a recipient take a bare LF as a line end; the
    -- head's last line is the one llhttp takes. It must be one request, served.
    it("a bare LF ending the head is served as one request", function()
      local res, err, s = h.exchange(gw.port, "GET /healthz HTTP/1.1\r\n" .. HOST .. "\n", 3)
      assert(res, tostring(err))
      assert.are.equal(200, res.status)
      assert.are.equal("ok\n", res.body)
      local extra = h.poll_bytes(s, 0.3)
      s:close()
      assert.are.equal("", extra, "a second answer appeared")
    end)

    it("empty lines before the request line are skipped (RFC 9112 section 2.2)", function()
      local res = assert(h.request(gw.port, "\r\n\r\nGET /healthz HTTP/1.1\r\n" .. HOST .. "\r\n"))
      assert.are.equal(200, res.status)
    end)

    it("a valid request after a good one on the same connection still works", function()
      local s = assert(h.connect(gw.port))
      assert(h.send(s, h.get_req("/healthz") .. h.get_req("/readyz")))
      local a = assert(h.read_response(s, 3))
      local b = assert(h.read_response(s, 3))
      s:close()
      assert.are.equal(200, a.status)
      assert.are.equal(200, b.status)
      assert.truthy(b.body:find('"ready":true', 1, true))
    end)

    it("a bad request pipelined after a good one: the good one is answered, then 400", function()
      local s = assert(h.connect(gw.port))
      assert(h.send(s, h.get_req("/healthz") .. "GARBAGE\r\n\r\n"))
      local a = assert(h.read_response(s, 3))
      local b = assert(h.read_response(s, 3))
      local how = h.wait_close(s, 3)
      s:close()
      assert.are.equal(200, a.status)
      assert.are.equal(400, b.status)
      assert.are.equal("closed", how)
    end)
  end)
end)
