// Starts the real tollgate binary on free loopback ports with a throwaway
// configuration (public, TLS and admin listeners, two tenants, the built-in
// ledger with funded accounts), and stops it.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, readFileSync, rmSync, chmodSync, openSync, closeSync, copyFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));

export function binaryPath() {
  const bin = process.env.TOLLGATE_BIN || join(here, "..", "..", "..", "build", "tollgate");
  return resolve(bin);
}

export function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => ok(port));
    });
  });
}

// A test CA and a server certificate for 127.0.0.1 / localhost signed by it,
// made with the openssl CLI so that nothing secret is committed.
function makeCertificates(dir) {
  const ossl = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tollgate interop test CA");
  ossl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost");
  writeFileSync(join(dir, "server.ext"),
    "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n" +
    "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  ossl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
    "-out", "cert.pem", "-days", "2", "-extfile", "server.ext");
  chmodSync(join(dir, "key.pem"), 0o600);
  return readFileSync(join(dir, "ca.pem"));
}

// The shop tenant's catalog: one priced licence for AI input by commercial users.
export const SHOP_HOST = "shop.interop.test";
export const SHOP_PRICE = { currency: "USD", amount: 100000n }; // "0.10" in micro-USD
export const CDN_BASE = "http://cdn.interop.test";
// Prepaid accounts of the built-in ledger (micro-USD).
export const ACCOUNTS = { funded: "acct-interop", poor: "acct-poor" };
const SHOP_RSL = `<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/articles/*">
    <license>
      <permits type="usage">ai-input</permits>
      <permits type="user">commercial</permits>
      <payment type="purchase">
        <amount currency="USD">0.10</amount>
      </payment>
    </license>
    <terms>https://shop.interop.test/terms</terms>
  </content>
</rsl>
`;

function luaString(s) {
  return JSON.stringify(s); // a JSON string of printable ASCII is a valid Lua string
}

export async function startGateway({ workers = 2 } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "tollgate-interop-"));
  const ca = makeCertificates(dir);
  const token = "interop-" + Math.random().toString(36).slice(2) + Date.now().toString(36);
  writeFileSync(join(dir, "admin.token"), token + "\n", { mode: 0o600 });
  mkdirSync(join(dir, "data"));
  // The CDN secret of the nginx_secure_link signers: printable, no white space
  // (the file is trimmed), readable by its owner alone.
  const cdnSecret = "interop-cdn-" + Math.random().toString(36).slice(2);
  writeFileSync(join(dir, "cdn.key"), cdnSecret, { mode: 0o600 });
  mkdirSync(join(dir, "rsl"));
  writeFileSync(join(dir, "rsl", "shop.xml"), SHOP_RSL);
  const [port, tlsPort, adminPort] = [await freePort(), await freePort(), await freePort()];
  const config = `return {
  listen = {
    { host = "127.0.0.1", port = ${port} },
    { host = "127.0.0.1", port = ${tlsPort}, tls_cert = "cert.pem", tls_key = "key.pem" },
  },
  admin = { host = "127.0.0.1", port = ${adminPort}, token_file = "admin.token" },
  workers = ${workers},
  data_dir = "data",
  log_level = "info",
  limits = { shutdown_grace_ms = 2000 },
  ledger = {
    wal = { capacity_bytes = 16777216, segment_bytes = 1048576 },
    accounts = {
      { billing_reference = ${luaString(ACCOUNTS.funded)}, amount = 1000000 },
      { billing_reference = ${luaString(ACCOUNTS.poor)}, amount = 1 },
    },
  },
  tenants = {
    -- No catalog: its implicit offers have no price, so nothing is for sale.
    { name = ${luaString("news")}, hosts = { ${luaString("news.example")} },
      signer = { type = "nginx_secure_link", base_url = ${luaString(CDN_BASE)}, key_file = "cdn.key" },
      billing = { type = "builtin" } },
    -- A catalog with one priced offer: what the purchase tests buy.
    { name = ${luaString("shop")}, hosts = { ${luaString(SHOP_HOST)} },
      catalog = { source = "rsl/shop.xml" },
      signer = { type = "nginx_secure_link", base_url = ${luaString(CDN_BASE)}, key_file = "cdn.key" },
      billing = { type = "builtin" } },
  },
}
`;
  const configPath = join(dir, "tollgate.lua");
  writeFileSync(configPath, config);

  const logPath = join(dir, "tollgate.log");
  const logFd = openSync(logPath, "w");
  const child = spawn(binaryPath(), ["run", "-c", configPath], {
    cwd: dir,
    stdio: ["ignore", logFd, logFd],
  });
  closeSync(logFd);
  const exited = new Promise((ok) => {
    child.once("exit", (code, signal) => ok({ code, signal }));
    child.once("error", (err) => ok({ code: null, signal: null, error: err }));
  });

  const gw = {
    dir,
    ca,
    token,
    cdnSecret,
    port,
    tlsPort,
    adminPort,
    pid: child.pid,
    baseUrl: `http://127.0.0.1:${port}`,
    tlsUrl: `https://127.0.0.1:${tlsPort}`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    exited,
    stopped: false,
    log() {
      try { return readFileSync(logPath, "utf8"); } catch { return ""; }
    },
    // SIGTERM, then wait up to timeoutMs for the exit; resolves { code, signal, ms }.
    async stop(timeoutMs = 10000) {
      const t0 = Date.now();
      if (!gw.stopped) {
        gw.stopped = true;
        try { process.kill(child.pid, "SIGTERM"); } catch { /* already gone */ }
      }
      let timer;
      const timeout = new Promise((ok) => { timer = setTimeout(() => ok(null), timeoutMs); });
      const r = await Promise.race([exited, timeout]);
      clearTimeout(timer);
      if (r === null) {
        try { process.kill(child.pid, "SIGKILL"); } catch { /* gone */ }
        await exited;
        return { code: null, signal: "timeout", ms: Date.now() - t0 };
      }
      return { ...r, ms: Date.now() - t0 };
    },
    // Removes the temp folder; the gateway's log is kept in TOLLGATE_LOG_DIR when set.
    cleanup() {
      if (process.env.TOLLGATE_LOG_DIR) {
        try {
          mkdirSync(process.env.TOLLGATE_LOG_DIR, { recursive: true });
          copyFileSync(logPath, join(process.env.TOLLGATE_LOG_DIR, `tollgate-${child.pid}.log`));
        } catch { /* best effort */ }
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };

  // Ready when the public listener answers /healthz; fail early if the process dies.
  const deadline = Date.now() + 15000;
  let dead = null;
  exited.then((r) => { dead = r; });
  for (;;) {
    if (dead) {
      const log = gw.log();
      gw.cleanup();
      throw new Error(`tollgate exited during start-up (${JSON.stringify(dead)}):\n${log}`);
    }
    try {
      const res = await fetch(`${gw.baseUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      if (res.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) {
      await gw.stop(2000);
      const log = gw.log();
      gw.cleanup();
      throw new Error(`tollgate did not answer /healthz within 15 s:\n${log}`);
    }
    await new Promise((ok) => setTimeout(ok, 50));
  }
  return gw;
}
