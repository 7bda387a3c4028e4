-- Bad Connect requests against the real binary (PROTOCOLS.md section 1):
-- broken protobuf and JSON, wrong media types and methods, bad compression,
-- bad GET parameters, bad Connect headers, too many resources. Every case
-- checks the exact status (and Connect code when the answer is a Connect
-- error), then that the gateway still serves a fresh connection.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local URI = "https://news.example/a"
local GOOD_JSON = h.json_discover({ URI })
local GOOD_PROTO = h.pb_discover({ URI })
-- ExecuteTransaction bodies carry no idempotency key: once decoded, such a
-- request is refused by the validator ("idempotency_key: required", checked
-- in the controls below), whatever ExecuteTransaction does with a valid one.
-- So a bad value that the decoder wrongly accepted would show as that answer:
-- every invalid_argument below must be another one, the decoder's.
local EXEC_JSON = '{"idempotencyKey":"","items":[{"offerId":"o1","estimatedTokens":"%s"}]}'
local VALIDATOR = "^idempotency_key: "
local function exec_pb(item_tail)
  return h.pb_bytes(3, h.pb_bytes(1, "o1") .. item_tail)
end

local function uris(n)
  local t = {}
  for i = 1, n do
    t[i] = "https://news.example/r" .. i
  end
  return t
end

-- A proto TransactionItem field 2 (int64) as an 11-byte varint: longer than
-- any 64-bit varint may be.
local overlong_varint = "\16" .. string.rep("\255", 10) .. "\1"

local cases = {
  -- protobuf
  { "truncated protobuf body", h.connect_req(h.DISCOVER, "proto", GOOD_PROTO:sub(1, -4)), 400, "invalid_argument" },
  { "garbage protobuf", h.connect_req(h.DISCOVER, "proto", string.rep("\255", 16)), 400, "invalid_argument" },
  { "protobuf field number 0", h.connect_req(h.DISCOVER, "proto", "\0\1"), 400, "invalid_argument" },
  { "message field sent as varint (wrong wire type)", h.connect_req(h.DISCOVER, "proto", "\16\1"), 400, "invalid_argument" },
  { "message field sent as fixed32 (wrong wire type)", h.connect_req(h.DISCOVER, "proto", "\21\0\0\0\0"), 400, "invalid_argument" },
  { "string field sent as varint inside a nested message",
    h.connect_req(h.DISCOVER, "proto", h.pb_bytes(2, "\8\1")), 400, "invalid_argument" },
  { "length prefix past the end of the body",
    h.connect_req(h.DISCOVER, "proto", "\18\255\255\255\255\15abc"), 400, "invalid_argument" },
  -- proto3 strings are UTF-8 (protobuf-go and connect-go refuse others);
  -- protobuf-c does not check, so the gateway must, or it echoes bad bytes.
  { "invalid UTF-8 in a proto string field",
    h.connect_req(h.DISCOVER, "proto", h.pb_discover({ "https://news.example/\255\254" })), 400, "invalid_argument" },
  { "invalid UTF-8 in a nested proto string field",
    h.connect_req(h.DISCOVER, "proto", h.pb_bytes(1, h.pb_bytes(1, "Acme \192\175")) .. GOOD_PROTO), 400, "invalid_argument" },
  -- protobuf-c strings end at NUL: "a\0b" would be read as "a", silently. The
  -- JSON codec refuses \u0000 already; proto must not be the way around it.
  { "NUL inside a proto string field",
    h.connect_req(h.DISCOVER, "proto", h.pb_discover({ "https://news.example/a\0.other.example" })), 400, "invalid_argument" },
  { "varint longer than 10 bytes (64-bit overflow)",
    h.connect_req(h.EXECUTE, "proto", exec_pb(overlong_varint)),
    400, "invalid_argument" },
  -- JSON
  { "invalid JSON", h.connect_req(h.DISCOVER, "json", '{"resources":['), 400, "invalid_argument" },
  { "empty JSON body", h.connect_req(h.DISCOVER, "json", ""), 400, "invalid_argument" },
  { "JSON array at the top level", h.connect_req(h.DISCOVER, "json", "[]"), 400, "invalid_argument" },
  { "JSON with trailing garbage", h.connect_req(h.DISCOVER, "json", GOOD_JSON .. "}"), 400, "invalid_argument" },
  { "repeated field given a string", h.connect_req(h.DISCOVER, "json", '{"resources":"x"}'), 400, "invalid_argument" },
  { "string field given a number", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":5}]}'), 400, "invalid_argument" },
  { "string field given an object", h.connect_req(h.EXECUTE, "json", '{"idempotencyKey":{},"items":[{"offerId":"o1"}]}'), 400, "invalid_argument" },
  { "int64 field given a boolean", h.connect_req(h.EXECUTE, "json", (EXEC_JSON:gsub('"%%s"', "true"))), 400, "invalid_argument" },
  { "int64 field given a fraction", h.connect_req(h.EXECUTE, "json", EXEC_JSON:format("1.5")), 400, "invalid_argument" },
  { "enum field given an unknown name",
    h.connect_req(h.DISCOVER, "json", '{"aiSystem":{"userType":"USER_TYPE_MARTIAN"},"resources":[{"uri":"' .. URI .. '"}]}'),
    400, "invalid_argument" },
  -- Unknown JSON fields are skipped, as connect-go's codec (DiscardUnknown)
  -- and binary protobuf do, so clients on a newer schema keep working.
  { "unknown field is ignored", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"' .. URI .. '"}],"bogus":1}'), 200 },
  { "unknown field in a nested message is ignored",
    h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"' .. URI .. '","bogus":{"x":[1,2]}}]}'), 200 },
  { "unknown field holding a nesting bomb",
    h.connect_req(h.DISCOVER, "json", '{"bogus":' .. string.rep("[", 30000) .. string.rep("]", 30000) .. ',"resources":[{"uri":"' .. URI .. '"}]}'),
    400, "invalid_argument" },
  { "NUL escape in a JSON string", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"https://news.example/a\\u0000b"}]}'), 400, "invalid_argument" },
  { "duplicate key", h.connect_req(h.DISCOVER, "json", '{"resources":[],"resources":[{"uri":"' .. URI .. '"}]}'), 400, "invalid_argument" },
  { "invalid UTF-8 in a string", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"https://news.example/\255\254"}]}'), 400, "invalid_argument" },
  { "overlong UTF-8 encoding of '/'", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"https://news.example\192\175a"}]}'), 400, "invalid_argument" },
  { "lone UTF-16 surrogate escape", h.connect_req(h.DISCOVER, "json", '{"resources":[{"uri":"https://news.example/\\ud800"}]}'), 400, "invalid_argument" },
  { "nesting bomb (30000 arrays deep)",
    h.connect_req(h.DISCOVER, "json", '{"aiSystem":' .. string.rep("[", 30000) .. string.rep("]", 30000) .. "}"), 400, "invalid_argument" },
  { "nesting bomb of objects",
    h.connect_req(h.DISCOVER, "json", string.rep('{"aiSystem":', 5000) .. "{}" .. string.rep("}", 5000)), 400, "invalid_argument" },
  { "int64 above 2^63-1 as a string", h.connect_req(h.EXECUTE, "json", EXEC_JSON:format("9223372036854775808")), 400, "invalid_argument" },
  { "int64 below -2^63 as a string", h.connect_req(h.EXECUTE, "json", EXEC_JSON:format("-9223372036854775809")), 400, "invalid_argument" },
  { "int64 of 20 digits as a JSON number",
    h.connect_req(h.EXECUTE, "json", (EXEC_JSON:gsub('"%%s"', "99999999999999999999"))), 400, "invalid_argument" },
  -- media types and methods
  { "text/plain body", h.connect_req(h.DISCOVER, "text/plain", "x"), 415, nil, { ["accept-post"] = "application/json, application/proto" } },
  { "application/json with another charset", h.connect_req(h.DISCOVER, "application/json; charset=latin1", GOOD_JSON), 415, nil,
    { ["accept-post"] = "application/json, application/proto" } },
  { "gRPC media type", h.connect_req(h.DISCOVER, "application/grpc", "\0\0\0\0\0"), 415, nil,
    { ["accept-post"] = "application/json, application/proto" } },
  { "no Content-Type", h.connect_req(h.DISCOVER, nil, GOOD_JSON), 415, nil, { ["accept-post"] = "application/json, application/proto" } },
  { "PUT on a method that allows GET", h.body_req("PUT", h.DISCOVER, { "Content-Type: application/json" }, GOOD_JSON), 405, nil,
    { allow = "GET, POST" } },
  { "DELETE", h.body_req("DELETE", h.DISCOVER, { "Content-Type: application/json" }, ""), 405, nil, { allow = "GET, POST" } },
  { "PUT on a side-effect method", h.body_req("PUT", h.EXECUTE, { "Content-Type: application/json" }, "{}"), 405, nil, { allow = "POST" } },
  { "GET on a side-effect method", h.get_req(h.EXECUTE .. "?encoding=json&message=" .. h.urlencode("{}")), 405, nil, { allow = "POST" } },
  -- compression
  { "Content-Encoding gzip with garbage", h.connect_req(h.DISCOVER, "json", "this is not gzip at all", { "Content-Encoding: gzip" }),
    400, "invalid_argument" },
  { "gzip header then garbage",
    h.connect_req(h.DISCOVER, "json", "\31\139\8\0\0\0\0\0\0\3" .. string.rep("\255", 20), { "Content-Encoding: gzip" }),
    400, "invalid_argument" },
  { "unknown Content-Encoding br", h.connect_req(h.DISCOVER, "json", GOOD_JSON, { "Content-Encoding: br" }), 501, "unimplemented" },
  -- GET parameters
  { "bad base64 in a GET message", h.get_req(h.DISCOVER .. "?encoding=proto&base64=1&message=%21%21%21%21"), 400, "invalid_argument" },
  { "base64 of impossible length in a GET message", h.get_req(h.DISCOVER .. "?encoding=proto&base64=1&message=QUJDR"), 400, "invalid_argument" },
  { "bad percent escape in a GET message", h.get_req(h.DISCOVER .. "?encoding=json&message=%ZZ"), 400, "invalid_argument" },
  { "GET without a message", h.get_req(h.DISCOVER .. "?encoding=json"), 400, "invalid_argument" },
  { "GET with an unknown encoding", h.get_req(h.DISCOVER .. "?encoding=xml&message=x"), 415, nil },
  { "GET with connect=v2", h.get_req(h.DISCOVER .. "?encoding=json&connect=v2&message=" .. h.urlencode(GOOD_JSON)), 400, "invalid_argument" },
  { "GET with an unknown compression", h.get_req(h.DISCOVER .. "?encoding=json&compression=br&message=" .. h.urlencode(GOOD_JSON)),
    501, "unimplemented" },
  -- Connect headers
  { "Connect-Protocol-Version: 2", h.body_req("POST", h.DISCOVER, { "Content-Type: application/json", "Connect-Protocol-Version: 2" }, GOOD_JSON),
    400, "invalid_argument" },
  { "Connect-Timeout-Ms: abc", h.connect_req(h.DISCOVER, "json", GOOD_JSON, { "Connect-Timeout-Ms: abc" }), 400, "invalid_argument" },
  { "Connect-Timeout-Ms of 11 digits", h.connect_req(h.DISCOVER, "json", GOOD_JSON, { "Connect-Timeout-Ms: 12345678901" }), 400, "invalid_argument" },
  { "negative Connect-Timeout-Ms", h.connect_req(h.DISCOVER, "json", GOOD_JSON, { "Connect-Timeout-Ms: -5" }), 400, "invalid_argument" },
  -- semantic limits
  { "257 resources in JSON", h.connect_req(h.DISCOVER, "json", h.json_discover(uris(257))), 400, "invalid_argument" },
  { "257 resources in proto", h.connect_req(h.DISCOVER, "proto", h.pb_discover(uris(257))), 400, "invalid_argument" },
  { "no resources", h.connect_req(h.DISCOVER, "json", "{}"), 400, "invalid_argument" },
  { "a resource that is not an absolute URL", h.connect_req(h.DISCOVER, "json", h.json_discover({ "/relative" })), 400, "invalid_argument" },
  -- routing
  { "unknown procedure", h.connect_req("/ramp.v1.ExchangeService/Nope", "json", "{}"), 404, nil },
}

local show = h.show

describe("bad Connect input", function()
  local gw

  setup(function()
    gw = h.start()
  end)

  teardown(function()
    if gw then
      h.stop_clean(gw)
    end
  end)

  describe("controls (valid requests are served)", function()
    it("DiscoverResources in JSON -> 200", function()
      local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "json", GOOD_JSON)))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("application/json", res.headers["content-type"])
      assert.truthy(res.body:find('"uri":"' .. URI .. '"', 1, true))
    end)

    it("DiscoverResources in proto -> 200", function()
      local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "proto", GOOD_PROTO)))
      assert.are.equal(200, res.status, res.body)
      assert.are.equal("application/proto", res.headers["content-type"])
      assert.truthy(res.body:find(URI, 1, true))
    end)

    it("DiscoverResources by GET with base64url proto -> 200", function()
      local q = "?encoding=proto&base64=1&connect=v1&message=" .. h.base64(GOOD_PROTO, true)
      local res = assert(h.request(gw.port, h.get_req(h.DISCOVER .. q)))
      assert.are.equal(200, res.status, res.body)
    end)

    it("256 resources (the maximum) -> 200", function()
      local res = assert(h.request(gw.port, h.connect_req(h.DISCOVER, "proto", h.pb_discover(uris(256)))))
      assert.are.equal(200, res.status, res.body)
    end)

    -- The good twins of the ExecuteTransaction cases: decoded, then refused
    -- by the validator for the missing key.
    it("ExecuteTransaction without a key, JSON -> decoded, 400 from the validator", function()
      local res = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "json", EXEC_JSON:format("5"))))
      assert.are.equal(400, res.status, res.body)
      assert.are.equal("invalid_argument", h.connect_code(res), res.body)
      assert.truthy(h.json_decode(res.body).message:find(VALIDATOR), res.body)
    end)

    it("ExecuteTransaction without a key, proto -> decoded, 400 from the validator", function()
      local res = assert(h.request(gw.port, h.connect_req(h.EXECUTE, "proto", exec_pb("\16\5"))))
      assert.are.equal(400, res.status, res.body)
      assert.are.equal("invalid_argument", h.connect_code(res), res.body)
      assert.truthy(h.json_decode(res.body).message:find(VALIDATOR), res.body)
    end)
  end)

  for _, case in ipairs(cases) do
    local name, raw, status, code, headers = case[1], case[2], case[3], case[4], case[5]
    it(name .. " -> " .. status .. (code and " " .. code or ""), function()
      local res, err = h.request(gw.port, raw)
      assert(res, "no answer to " .. show(raw) .. ": " .. tostring(err))
      local detail = "request: " .. show(raw) .. "\nanswer:\n" .. res.head .. res.body
      assert.are.equal(status, res.status, detail)
      if code then
        assert.are.equal("application/json", res.headers["content-type"], detail)
        assert.are.equal(code, h.connect_code(res), detail)
        assert.truthy(res.body:match('^{"code":"[a-z_]+"'), detail)
        -- Refused before validation: not the answer the good twin gets.
        assert.falsy(tostring(h.json_decode(res.body).message):find(VALIDATOR), detail)
      end
      for name_, value in pairs(headers or {}) do
        assert.are.equal(value, res.headers[name_], name_ .. " header; " .. detail)
      end
      assert(h.alive(gw.port))
    end)
  end
end)
