-- The container image's default configuration (deploy/image.sh, deploy/Dockerfile):
-- /etc/tollgate/tollgate.lua in the image. Format: core/config.h; paths are relative
-- to this folder.
--
-- It starts a gateway that answers: one example tenant, its catalog and a policy
-- from the example policies, no payments, no signer. Operators mount their own
-- /etc/tollgate (this file, admin.token, keys, catalogs, policies) over it:
--   docker run -v /srv/tollgate/etc:/etc/tollgate:ro -v tollgate-data:/var/lib/tollgate \
--     -p 8080:8080 -p 9090:9090 tollgate:latest
-- The gateway runs as uid 10001: secret files it reads (token_file, key_file,
-- password_file) must be readable by that uid and by nobody else (mode 0600).
-- The image's own admin.token is made at random when the image is built: anyone who
-- has the image can read it, so a real deployment brings its own.
return {
  listen = { { host = "0.0.0.0", port = 8080 } },
  admin = { host = "0.0.0.0", port = 9090, token_file = "admin.token" },
  workers = 0,                    -- one per core
  data_dir = "/var/lib/tollgate", -- the write-ahead log: a volume of the image
  log_level = "info",             -- JSON lines on stdout

  tenants = {
    { name = "example",
      hosts = { "localhost", "news.example" },
      catalog = { source = "rsl/example.xml", refresh_s = 300 },
      -- The example policies are in the image at /usr/share/tollgate/policies/.
      policy = "/usr/share/tollgate/policies/news_publisher.lua",
      billing = { type = "builtin" } },
  },
}
