-- nginx's secure_link module as the real verifier of the nginx signer
-- (core/signer/nginx.c): URLs signed by the C code, checked by the nginx
-- Debian ships, on a free loopback port. Valid -> 200, tampered -> 403,
-- expired -> 410. The C signer is reached through tg_sign_url
-- (spec/e2e/sign_url.c), which CMake builds next to the binary with the same
-- flags (the gateway does not sign yet: wiring comes with ExecuteTransaction).
package.path = (debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "?.lua;" .. package.path
local h = require("helpers")

local SECRET = "e2e-s3cr3t-" .. h.random_hex(8)
local CUSTOM = "$uri|$secure_link_expires|$secret"


local sh, capture = h.sh, h.capture

describe("nginx secure_link verifies the nginx signer", function()
  local dir, port, pid, signer

  setup(function()
    assert(capture("nginx -V 2>&1"):find("--with-http_secure_link_module", 1, true),
      "this nginx has no secure_link module")
    dir = capture("mktemp -d /tmp/tollgate-e2e-signer-XXXXXX"):gsub("%s+$", "")
    assert(dir ~= "", "mktemp -d failed")
    local build = h.binary():match("^(.*)/[^/]*$")
    -- Built next to the binary by CMake (spec/e2e/sign_url.c), with its flags.
    signer = build .. "/tg_sign_url"
    assert(sh("test -x " .. h.sh_quote(signer)), "no signing helper at " .. signer .. " (cmake --build builds it)")

    port = h.free_port()
    for _, d in ipairs({ "tmp", "logs" }) do
      assert(sh("mkdir -p " .. h.sh_quote(dir .. "/" .. d)))
    end
    local conf = table.concat({
      "daemon off;",
      "master_process off;",
      "worker_processes 1;",
      "error_log " .. dir .. "/logs/error.log warn;",
      "pid " .. dir .. "/nginx.pid;",
      "events { worker_connections 64; }",
      "http {",
      "  access_log off;",
      "  client_body_temp_path " .. dir .. "/tmp/body;",
      "  proxy_temp_path " .. dir .. "/tmp/proxy;",
      "  fastcgi_temp_path " .. dir .. "/tmp/fastcgi;",
      "  uwsgi_temp_path " .. dir .. "/tmp/uwsgi;",
      "  scgi_temp_path " .. dir .. "/tmp/scgi;",
      "  server {",
      "    listen 127.0.0.1:" .. port .. ";",
      "    location /videos/ {",
      "      secure_link $arg_md5,$arg_expires;",
      '      secure_link_md5 "$secure_link_expires$uri ' .. SECRET .. '";',
      '      if ($secure_link = "") { return 403; }',
      '      if ($secure_link = "0") { return 410; }',
      '      return 200 "ok $uri\\n";',
      "    }",
      "    location /custom/ {",
      "      secure_link $arg_md5,$arg_expires;",
      '      secure_link_md5 "' .. CUSTOM:gsub("%$secret", SECRET) .. '";',
      '      if ($secure_link = "") { return 403; }',
      '      if ($secure_link = "0") { return 410; }',
      '      return 200 "ok $uri\\n";',
      "    }",
      "  }",
      "}",
    }, "\n")
    h.write_file(dir .. "/nginx.conf", conf .. "\n")
    local p = assert(io.popen("nginx -p " .. h.sh_quote(dir) .. " -e " .. h.sh_quote(dir .. "/logs/error.log") .. " -c " .. h.sh_quote(dir .. "/nginx.conf")
      .. " >" .. h.sh_quote(dir .. "/logs/stderr") .. " 2>&1 & echo $!"))
    pid = tonumber(p:read("*l"))
    p:close()
    assert(pid, "nginx did not start")
    local deadline = h.now() + 5
    local function listening()
      local c = require("socket").tcp4()
      c:settimeout(0.2)
      local ok = c:connect("127.0.0.1", port)
      c:close()
      return ok
    end
    while not listening() do
      assert(h.now() < deadline, "nginx did not listen on " .. port .. ": "
        .. (h.read_file(dir .. "/logs/stderr") or "") .. (h.read_file(dir .. "/logs/error.log") or ""))
      h.sleep(0.05)
    end
  end)

  teardown(function()
    if pid then
      os.execute("kill " .. pid .. " 2>/dev/null")
      local deadline = h.now() + 5
      while h.proc_alive(pid) and h.now() < deadline do
        h.sleep(0.05)
      end
    end
    if dir and dir:match("^/tmp/tollgate%-e2e%-signer%-") then
      os.execute("rm -rf " .. h.sh_quote(dir))
    end
  end)

  local function sign(url, expires, expr)
    local out = capture(table.concat({ h.sh_quote(signer), h.sh_quote(SECRET), h.sh_quote(expr or "-"),
      h.sh_quote(url), tostring(expires), "2>&1" }, " "))
    local signed = out:gsub("%s+$", "")
    assert(signed:sub(1, 1) == "/", "signing failed: " .. out)
    return signed
  end

  local function get(target)
    local res = assert(h.request(port, h.get_req(target, nil, "127.0.0.1")))
    return res
  end

  local function soon()
    return math.floor(h.now()) + 300
  end

  it("a signed URL -> 200", function()
    local res = get(sign("/videos/a.mp4", soon()))
    assert.are.equal(200, res.status, res.head .. res.body)
    assert.are.equal("ok /videos/a.mp4\n", res.body)
  end)

  it("a path with bytes to escape and a query -> 200, hashed as nginx's decoded $uri", function()
    local url = sign("/videos/a b/\195\169t\195\169.mp4?lang=fr", soon())
    assert.truthy(url:find("/videos/a%20b/%C3%A9t%C3%A9.mp4?lang=fr&md5=", 1, true), url)
    local res = get(url)
    assert.are.equal(200, res.status, res.head .. res.body)
    assert.are.equal("ok /videos/a b/\195\169t\195\169.mp4\n", res.body)
  end)

  it("a configured secure_link_md5 expression -> 200", function()
    local res = get(sign("/custom/x.bin", soon(), CUSTOM))
    assert.are.equal(200, res.status, res.head .. res.body)
  end)

  it("a tampered hash, path or expiry -> 403", function()
    local url = sign("/videos/a.mp4", soon())
    local md5 = url:match("md5=([^&]+)")
    local flipped = (md5:sub(1, 1) == "A" and "B" or "A") .. md5:sub(2)
    local res = get((url:gsub("md5=[^&]+", "md5=" .. flipped)))
    assert.are.equal(403, res.status, res.head)
    res = get((url:gsub("^/videos/a%.mp4", "/videos/b.mp4")))
    assert.are.equal(403, res.status, res.head)
    res = get((url:gsub("expires=(%d+)", function(e)
      return "expires=" .. (tonumber(e) + 1)
    end)))
    assert.are.equal(403, res.status, res.head)
    -- signed with another secret
    local other = capture(table.concat({ h.sh_quote(signer), "other-secret -", "/videos/a.mp4",
      tostring(soon()) }, " ")):gsub("%s+$", "")
    res = get(other)
    assert.are.equal(403, res.status, res.head)
  end)

  it("an expired URL -> 410", function()
    local res = get(sign("/videos/a.mp4", math.floor(h.now()) - 10))
    assert.are.equal(410, res.status, res.head)
  end)
end)
