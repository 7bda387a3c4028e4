-- The sandbox runs expensive pattern calls on a Lua port of LuaJIT's
-- matcher (so the time limit can interrupt them). Here the port is checked
-- against the native functions on a corpus of patterns and subjects: same
-- results, same errors.

local sandbox = require("tollgate.sandbox")
local port = sandbox.pattern

local native = { find = string.find, match = string.match, gmatch = string.gmatch, gsub = string.gsub }

local subjects = {
  "", "a", "hello world", "  padded  ", "/articles/2024/01/title-of-thing.html",
  "key=value; other=thing; x=1", "(nested (parens) here)", "THE Quick brown FOX 123",
  "a.b.c", "aaa", "abcabcabc", "line1\nline2\0nul", "tabs\tand\rcr", "%percent%",
  "[brackets]", "ai-train,ai-input", "GET /free/robots.txt HTTP/1.1", "éàü utf8", "x$y^z",
}

local patterns = {
  "a", "^a", "a$", "^$", "", ".", "%a+", "%d+", "%s*", "%w-", "[%w_]+", "[^%s]+", "[a-c]+",
  "[]]", "[^]]", "[%]]", "(%w+)=(%w+)", "()a()", "(a)(b)(c)", "%((.-)%)", "%b()", "%f[%w]%w+",
  "%f[%W]", "^/free/", "/(%d+)/", "(.)%1", "a?b?c", "x*", "[%a%d]+", "%.", "%%", "[%-]", "-",
  "[a-]", "[-a]", "^(%w+)", "(%w+)$", ".-", ".*", "(h)(e)(l)(l)(o)", "%u%l+", "%p", "%c", "%x+",
  "%z", "[%z]", "\0", "%S+", "%A+", "%D+", "%L", "%U", "%W", "%P", "%C", "%X", "%g+", "%G",
  "^.-(%d)", "(%s*)$", "[^%.]+$", "%$", "%^", "$x", "x^", "()", "(()a)", "[a%-z]+", "[%a-]+",
}

local bad_patterns = { "%", "[a", "[", "(", ")", "%b", "%ba", "%f", "%fx", "(()", "%1", "(a)%2",
                       "[%", "a)(" }

local function pack(...) return { n = select("#", ...), ... } end

local function same(a, b)
  if a.n ~= b.n then return false end
  for i = 1, a.n do
    if a[i] ~= b[i] then return false end
  end
  return true
end

local function show(t)
  local parts = {}
  for i = 1, t.n do parts[i] = type(t[i]) == "string" and string.format("%q", t[i]) or tostring(t[i]) end
  return "{" .. table.concat(parts, ", ") .. "}"
end

local function compare(name, f_native, f_port, ...)
  local a = pack(pcall(f_native, ...))
  local b = pack(pcall(f_port, ...))
  if not same(a, b) then
    local args = pack(...)
    error(string.format("%s(%s): native %s, port %s", name, show(args), show(a), show(b)), 0)
  end
end

local function gmatch_all(gm)
  return function(s, p)
    local out = {}
    for a, b, c in gm(s, p) do
      out[#out + 1] = tostring(a) .. "|" .. tostring(b) .. "|" .. tostring(c)
    end
    return table.concat(out, ",")
  end
end

describe("the Lua port of the pattern matcher", function()
  it("finds what string.find finds", function()
    for _, s in ipairs(subjects) do
      for _, p in ipairs(patterns) do
        for _, init in ipairs({ 1, 2, -3, 0, 100 }) do
          compare("find", native.find, port.find, s, p, init)
        end
      end
    end
  end)

  it("matches what string.match matches", function()
    for _, s in ipairs(subjects) do
      for _, p in ipairs(patterns) do
        compare("match", native.match, port.match, s, p)
        compare("match", native.match, port.match, s, p, 3)
      end
    end
  end)

  it("iterates as string.gmatch does", function()
    for _, s in ipairs(subjects) do
      for _, p in ipairs(patterns) do
        compare("gmatch", gmatch_all(native.gmatch), gmatch_all(port.gmatch), s, p)
      end
    end
  end)

  it("substitutes as string.gsub does", function()
    local repls = { "<%0>", "%1-%1", "x", "%%", "", 7, { a = "A", hello = false, key = 1 },
                    function(a, b) if a == "a" then return nil end return (a or "") .. "!" .. tostring(b) end }
    for _, s in ipairs(subjects) do
      for _, p in ipairs(patterns) do
        for _, r in ipairs(repls) do
          compare("gsub", native.gsub, port.gsub, s, p, r)
          compare("gsub", native.gsub, port.gsub, s, p, r, 1)
        end
      end
    end
  end)

  it("raises the same errors on malformed patterns", function()
    for _, p in ipairs(bad_patterns) do
      compare("find", native.find, port.find, "abc(a)", p)
      compare("gsub", native.gsub, port.gsub, "abc(a)", p, "x")
    end
    compare("gsub", native.gsub, port.gsub, "abc", "(b)", "%2")
    compare("gsub", native.gsub, port.gsub, "abc", "b", { b = true })
  end)

  it("sends only cheap calls to C", function()
    local shape = port.shape("^/free/")
    assert.are.equal(math.huge, shape.nmax_anchor)
    shape = port.shape(".-.-.-.-b")
    assert.is_true(shape.nmax_free < 100)
    shape = port.shape("(%w+)=(%w+)")
    assert.is_true(shape.nmax_free >= 100 and shape.nmax_free < 200)
  end)
end)

describe("the sandbox string functions", function()
  local s = string.rep("ab", 2e5) -- long enough to take the Lua port

  it("agree with the natives on long subjects", function()
    sandbox.harden()
    local safe = getmetatable("").__index
    assert.are_not.equal(string, safe)
    assert.are.same({ native.find(s, "(a)(b)b") }, { safe.find(s, "(a)(b)b") })
    assert.are.same({ native.find(s, "b(a-)b", 399990) }, { safe.find(s, "b(a-)b", 399990) })
    assert.are.same({ native.match(s, "^(ab)(.-)$") and true }, { safe.match(s, "^(ab)(.-)$") and true })
    assert.are.same({ native.gsub(s, "(a)b", "%1") }, { safe.gsub(s, "(a)b", "%1") })
    assert.are.same({ native.find(s, "ba", 1, true) }, { port.plain_find(s, "ba", 1) })
    local needle = string.rep("ab", 2000) .. "x"
    assert.are.same({ native.find(s .. "x", needle, 1, true) }, { port.plain_find(s .. "x", needle, 1) })
    assert.is_nil(port.plain_find(s, needle, 1))
  end)

  it("keep argument errors and coercions of the natives", function()
    local safe = getmetatable("").__index
    assert.are.same({ native.find(12345, 3) }, { safe.find(12345, 3) })
    assert.are.same({ native.find("abc", "b", "2") }, { safe.find("abc", "b", "2") })
    assert.has_error(function() safe.find({}, "x") end)
    assert.has_error(function() safe.gsub("x", "x", true) end)
    assert.has_error(function() safe.match("x", {}) end)
  end)
end)
