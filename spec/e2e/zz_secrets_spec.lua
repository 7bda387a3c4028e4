-- Runs last (file order): every log line written by every gateway the e2e
-- suite started (helpers.lua logs them all into TOLLGATE_LOG_DIR) is grepped
-- for every secret the suite handed a gateway (helpers.lua lists them in
-- TOLLGATE_LOG_DIR/secrets.txt: admin tokens, the content of every token,
-- key and password file, every full billing reference of a configuration or
-- a request). None may appear.
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local function lines_of(path)
  local out = {}
  for line in (h.read_file(path) or ""):gmatch("[^\n]+") do
    out[#out + 1] = line
  end
  return out
end

local function log_files(dir)
  local out = {}
  local p = assert(io.popen("find " .. h.sh_quote(dir) .. " -maxdepth 1 -type f -name '*.log' | sort"))
  for f in p:lines() do
    out[#out + 1] = f
  end
  p:close()
  return out
end

-- Every "file:line: text" where a secret appears, at most 20: grep -F (one
-- pass over the logs for all the secrets at once; they are 10^6 lines).
local function leaks(secrets, files)
  local found = {}
  if #files == 0 or #secrets == 0 then
    return found
  end
  local pat = os.tmpname()
  h.write_file(pat, table.concat(secrets, "\n") .. "\n")
  local args = {}
  for i, f in ipairs(files) do
    args[i] = h.sh_quote(f)
  end
  local p = assert(io.popen("grep -n -H -F -f " .. h.sh_quote(pat) .. " " .. table.concat(args, " ")
    .. " | head -20"))
  for line in p:lines() do
    found[#found + 1] = h.show(line, 400)
  end
  p:close()
  os.remove(pat)
  return found
end

describe("secrets in the e2e suite's logs", function()
  local dir = h.LOG_DIR

  it("the grep finds a secret where there is one (self-check)", function()
    local tmp = h.capture("mktemp -d"):gsub("%s+$", "")
    local secret = "canary-" .. h.random_hex(12)
    h.write_file(tmp .. "/a.log", '{"msg":"x"}\n{"msg":"y","v":"..' .. secret .. '.."}\n')
    local found = leaks({ secret, "absent-" .. h.random_hex(8) }, { tmp .. "/a.log" })
    os.execute("rm -rf " .. h.sh_quote(tmp))
    assert.are.equal(1, #found)
    assert.truthy(found[1]:find("a.log:2:", 1, true), found[1])
  end)

  it("no log line of any gateway holds any secret the suite used", function()
    if not dir then
      pending("TOLLGATE_LOG_DIR is not set: run the whole suite through spec/e2e/run-suite.sh")
      return
    end
    local secrets = lines_of(dir .. "/secrets.txt")
    local files = log_files(dir)
    -- The suite really ran through the helpers: logs and secrets are there.
    assert.is_true(#files >= 5, "only " .. #files .. " gateway logs in " .. dir)
    assert.is_true(#secrets >= 10, "only " .. #secrets .. " secrets registered in " .. dir .. "/secrets.txt")
    local total = 0
    for _, f in ipairs(files) do
      total = total + #lines_of(f)
    end
    assert.is_true(total > 100, "only " .. total .. " log lines")
    local found = leaks(secrets, files)
    assert.are.equal(0, #found, #secrets .. " secrets, " .. #files .. " logs, " .. total .. " lines; leaks:\n"
      .. table.concat(found, "\n"))
  end)
end)
