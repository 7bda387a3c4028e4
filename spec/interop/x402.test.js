// HTTP 402 payments (x402 v1 and v2, t402) end to end with other people's code: a real
// chain (anvil), an EIP-3009 token compiled from contracts/TestUSD.sol, the real x402
// and t402 facilitators (lib/facilitator.js) and the real clients, unchanged (pay.js).
//
// First the kit against the reference middleware (@x402/express 2.27, x402-express 1.2),
// which proves chain, token, facilitator and clients without the gateway. Then the real
// tollgate binary: two instances sharing a Redis, a tenant whose `payments` section points
// at the chain and the facilitator and proxies paid requests to a small origin server
// (which counts what it served), and a tenant that redirects to a signed CDN URL.
// Each client pays and gets the content and the chain moves exactly once; replays (also
// concurrent, at both instances), an empty wallet, a wrong payTo, an expired or tampered
// authorization and a requirement never offered are refused with their t402 code and the
// status PROTOCOLS.md gives it; a facilitator that is down serves nothing, a second one
// takes over; a gateway killed between serving and settling settles after its restart,
// exactly once.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, readFileSync, rmSync, openSync, closeSync, copyFileSync } from "node:fs";
import { createServer } from "node:http";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import express from "express";
import { getAddress, parseEventLogs, toHex } from "viem";
import { generatePrivateKey, privateKeyToAccount } from "viem/accounts";
import { x402Client, x402HTTPClient } from "@x402/core/client";
import { decodePaymentRequiredHeader, encodePaymentSignatureHeader } from "@x402/core/http";
import { HTTPFacilitatorClient } from "@x402/core/server";
import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { ExactEvmScheme as ExactEvmServerScheme } from "@x402/evm/exact/server";
import { paymentMiddleware as x402Middleware, x402ResourceServer } from "@x402/express";
import { paymentMiddleware as x402v1Middleware } from "x402-express";
import { t402Client } from "@t402/core/client";
import { t402HTTPClient } from "@t402/core/http";
import { ExactEvmScheme as T402ExactEvmScheme } from "@t402/evm/exact/client";
import { binaryPath, freePort } from "./lib/gateway.js";
import { startChain, paymentsSection, walletFor } from "./lib/chain.js";
import { startFacilitator } from "./lib/facilitator.js";
import { payX402v1, payX402v2, payT402 } from "./pay.js";

const PRICE = "0.001";       // USD in the catalog
const AMOUNT = "1000";       // atomic units of the 6-decimal test token
const CDN_BASE = "http://cdn.x402.test";

const TYPES = {
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
};

// PROTOCOLS.md section 2: the HTTP status of a t402 code.
function t402Status(code) {
  if (code >= 1000 && code < 2000) return 400;
  if (code === 2005) return 429;
  if (code === 3001 || code === 3005) return 422;
  if (code >= 4000 && code < 5000) return 502;
  return 500;
}

const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

async function waitFor(what, fn, ms = 10000, every = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(every);
  }
}

// ---------------------------------------------------------------- processes

// redis-server on a free loopback port, in memory only; stopped by pid.
async function startRedis() {
  const port = await freePort();
  const child = spawn("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: "ignore" });
  const exited = new Promise((ok) => child.once("exit", ok));
  child.once("error", () => {});
  await waitFor("redis", () => new Promise((ok) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => { s.destroy(); ok(true); });
    s.once("error", () => ok(false));
  }), 5000);
  return { port, pid: child.pid, async stop() { try { process.kill(child.pid, "SIGTERM"); } catch { /* gone */ } await exited; } };
}

// The origin a proxying tenant forwards paid requests to; counts what it served.
async function startOrigin() {
  const hits = new Map();
  const srv = createServer((req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    hits.set(path, (hits.get(path) ?? 0) + 1);
    const body = JSON.stringify({ article: path, secret: "paid content" });
    res.writeHead(200, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
    res.end(body);
  });
  await new Promise((ok) => srv.listen(0, "127.0.0.1", ok));
  return {
    url: `http://127.0.0.1:${srv.address().port}`,
    hits: (path) => hits.get(path) ?? 0,
    stop: () => new Promise((ok) => { srv.closeAllConnections?.(); srv.close(() => ok()); }),
  };
}

const RSL = `<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/articles/*">
    <license>
      <permits type="usage">all</permits>
      <payment type="purchase">
        <amount currency="USD">${PRICE}</amount>
      </payment>
    </license>
  </content>
</rsl>
`;

// Writes a configuration for the tollgate binary in dir (kept across restarts) and
// starts it; { port, baseUrl, pid, kill(sig), stop(), log(), exited }.
async function startTollgate({ dir, port, adminPort, chain, facilitators, settle = "sync", origin, redisPort, workers = 2, extra = "" }) {
  mkdirSync(join(dir, "data"), { recursive: true });
  mkdirSync(join(dir, "rsl"), { recursive: true });
  writeFileSync(join(dir, "rsl", "pay.xml"), RSL);
  writeFileSync(join(dir, "cdn.key"), "x402-interop-cdn-secret", { mode: 0o600 });
  const token = "x402-admin-" + randomBytes(8).toString("hex");
  writeFileSync(join(dir, "admin.token"), token + "\n", { mode: 0o600 });
  port ??= await freePort();
  adminPort ??= await freePort();
  const config = `return {
  listen = { { host = "127.0.0.1", port = ${port} } },
  admin = { host = "127.0.0.1", port = ${adminPort}, token_file = "admin.token" },
  workers = ${workers},
  data_dir = "data",
  log_level = "info",
  limits = { shutdown_grace_ms = 1000 },${redisPort ? `\n  redis = { host = "127.0.0.1", port = ${redisPort} },` : ""}
  tenants = {
    { name = "shop", hosts = { "127.0.0.1" },
      catalog = { source = "rsl/pay.xml" },
      ${paymentsSection(chain, { facilitators, settle, serve: "proxy", origin, extra })} },
    { name = "cdnshop", hosts = { "redirect.test" },
      catalog = { source = "rsl/pay.xml" },
      signer = { type = "nginx_secure_link", base_url = "${CDN_BASE}", key_file = "cdn.key" },
      ${paymentsSection(chain, { facilitators, settle, serve: "redirect", extra })} },
  },
}
`;
  writeFileSync(join(dir, "tollgate.lua"), config);
  const logPath = join(dir, `tollgate-${Date.now()}.log`);
  const fd = openSync(logPath, "w");
  const child = spawn(binaryPath(), ["run", "-c", join(dir, "tollgate.lua")], { cwd: dir, stdio: ["ignore", fd, fd] });
  closeSync(fd);
  let dead = null;
  let killedOnPurpose = false;
  const exited = new Promise((ok) => {
    child.once("exit", (code, signal) => {
      dead = { code, signal };
      try { writeFileSync(logPath, `\n[x402.test.js] tollgate ${child.pid} exited: ${JSON.stringify(dead)}\n`, { flag: "a" }); } catch { /* gone */ }
      ok(dead);
    });
    child.once("error", (error) => { dead = { error: String(error) }; ok(dead); });
  });
  const gw = {
    port, adminPort, pid: child.pid, exited, dir,
    // The sum of a Prometheus series over the lines whose labels include `labels`.
    async metric(name, labels = {}) {
      const res = await fetch(`http://127.0.0.1:${adminPort}/metrics`, { headers: { authorization: `Bearer ${token}` } });
      const text = await res.text();
      assert.equal(res.status, 200, text);
      let sum = 0;
      for (const line of text.split("\n")) {
        const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)/.exec(line);
        if (!m || m[1] !== name) continue;
        if (Object.entries(labels).every(([k, v]) => (m[2] ?? "").includes(`${k}="${v}"`))) sum += Number(m[3]);
      }
      return sum;
    },
    // null while it runs, else how it ended; crashed: ended without being asked to.
    get dead() { return dead; },
    get crashed() { return dead !== null && !killedOnPurpose; },
    baseUrl: `http://127.0.0.1:${port}`,
    log: () => { try { return readFileSync(logPath, "utf8"); } catch { return ""; } },
    kill(sig = "SIGKILL") { killedOnPurpose = true; try { process.kill(child.pid, sig); } catch { /* gone */ } return exited; },
    async stop() {
      if (!dead) {
        killedOnPurpose = true;
        try { process.kill(child.pid, "SIGTERM"); } catch { /* gone */ }
        const t = setTimeout(() => { try { process.kill(child.pid, "SIGKILL"); } catch { /* gone */ } }, 5000);
        await exited;
        clearTimeout(t);
      }
      if (process.env.TOLLGATE_LOG_DIR) {
        try {
          mkdirSync(process.env.TOLLGATE_LOG_DIR, { recursive: true });
          copyFileSync(logPath, join(process.env.TOLLGATE_LOG_DIR, `x402-tollgate-${child.pid}.log`));
        } catch { /* best effort */ }
      }
    },
  };
  const deadline = Date.now() + 15000;
  for (;;) {
    if (dead) throw new Error(`tollgate exited during start-up (${JSON.stringify(dead)}):\n${gw.log()}`);
    try {
      const res = await fetch(`${gw.baseUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
      await res.arrayBuffer();
      if (res.status === 200) break;
    } catch { /* not yet */ }
    if (Date.now() > deadline) { await gw.stop(); throw new Error(`tollgate did not answer /healthz in 15 s:\n${gw.log()}`); }
    await sleep(50);
  }
  return gw;
}

// ---------------------------------------------------------------- payments by hand

// The offered requirements of an unpaid request: the decoded PAYMENT-REQUIRED.
async function challenge(url) {
  const res = await fetch(url, { redirect: "manual" });
  const text = await res.text();
  const header = res.headers.get("payment-required");
  assert.equal(res.status, 402, `unpaid ${url}: ${res.status} ${text}`);
  assert.ok(header, `no PAYMENT-REQUIRED on the 402 of ${url}`);
  return { required: decodePaymentRequiredHeader(header), header, body: text, res };
}

// A v2 PAYMENT-SIGNATURE signed with viem; `auth` and `accepted` override the honest values
// (a client tampering with its own payload), `sign` overrides the signed message.
async function handMadePayment(required, { key, auth = {}, accepted = {}, sign = {}, tamper } = {}) {
  const account = privateKeyToAccount(key);
  const offer = { ...required.accepts[0], ...accepted };
  const now = Math.floor(Date.now() / 1000);
  const authorization = {
    from: account.address,
    to: getAddress(offer.payTo),
    value: offer.amount,
    validAfter: "0",
    validBefore: String(now + 60),
    nonce: toHex(randomBytes(32)),
    ...auth,
  };
  const message = { ...authorization, ...sign };
  const domain = { name: offer.extra.name, version: offer.extra.version,
    chainId: Number(offer.network.split(":")[1]), verifyingContract: getAddress(offer.asset) };
  let signature = await account.signTypedData({
    domain, types: TYPES, primaryType: "TransferWithAuthorization",
    message: { ...message, value: BigInt(message.value), validAfter: BigInt(message.validAfter),
      validBefore: BigInt(message.validBefore) },
  });
  if (tamper) signature = tamper(signature);
  const payload = { x402Version: 2, resource: required.resource, accepted: offer, payload: { signature, authorization } };
  return { header: encodePaymentSignatureHeader(payload), payload };
}

// A payment made by the real x402 v2 client for a challenge, not sent.
async function clientPayment(required, key) {
  const client = new x402Client();
  registerExactEvmScheme(client, { signer: privateKeyToAccount(key) });
  client.setSpendControls({ allowedAssets: true });
  const payload = await client.createPaymentPayload(required);
  return { header: new x402HTTPClient(client).encodePaymentSignatureHeader(payload)["PAYMENT-SIGNATURE"], payload };
}

async function sendPayment(url, header, name = "PAYMENT-SIGNATURE") {
  const res = await fetch(url, { headers: { [name]: header }, redirect: "manual" });
  const text = await res.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  return { status: res.status, headers: Object.fromEntries(res.headers), body, text };
}

function decodeB64(v) {
  return JSON.parse(Buffer.from(v, "base64").toString("utf8"));
}

// ---------------------------------------------------------------- the suite

let chain;
let facil;

before(async () => {
  chain = await startChain({ buyers: 4 });
  facil = await startFacilitator({ rpc: chain.rpc, chainId: chain.chainId, key: chain.keys.facilitator });
});

after(async () => {
  await facil?.stop();
  await chain?.stop();
});

// Balances of the buyer and the seller around fn; the Transfer events of the token in
// the blocks mined meanwhile.
async function ledgerAround(buyer, fn) {
  const b0 = await chain.balanceOf(buyer);
  const s0 = await chain.balanceOf(chain.payTo);
  // cacheTime 0: viem would answer a block number up to its polling interval old.
  const block0 = await chain.publicClient.getBlockNumber({ cacheTime: 0 });
  const result = await fn();
  const moves = async () => {
    // anvil refuses a range that starts past its head: nothing mined is no logs.
    const head = await chain.publicClient.getBlockNumber({ cacheTime: 0 });
    const logs = head > block0 ? await chain.publicClient.getLogs({ address: chain.token.address, fromBlock: block0 + 1n }) : [];
    const transfers = parseEventLogs({ abi: chain.token.abi, eventName: "Transfer", logs })
      .filter((l) => getAddress(l.args.from) === getAddress(buyer));
    return {
      buyer: (await chain.balanceOf(buyer)) - b0,
      seller: (await chain.balanceOf(chain.payTo)) - s0,
      transfers,
    };
  };
  return { result, moves };
}

async function assertPaidOnce(buyer, moves, what) {
  const m = await moves();
  assert.equal(m.buyer, -BigInt(AMOUNT), `${what}: buyer paid ${-m.buyer}, expected ${AMOUNT}`);
  assert.equal(m.seller, BigInt(AMOUNT), `${what}: seller got ${m.seller}`);
  assert.equal(m.transfers.length, 1, `${what}: ${m.transfers.length} transfers from the buyer`);
  assert.equal(getAddress(m.transfers[0].args.to), getAddress(chain.payTo));
  return m;
}

describe("x402 kit: the reference middleware, the real clients and facilitators", () => {
  let v2srv;
  let v1srv;
  let v2url;
  let v1url;

  before(async () => {
    const extra = { name: chain.token.name, version: chain.token.version };
    const rs = new x402ResourceServer(new HTTPFacilitatorClient({ url: facil.url }))
      .register(chain.network, new ExactEvmServerScheme());
    const app2 = express();
    app2.use(x402Middleware({
      "GET /article": { accepts: { scheme: "exact", network: chain.network, payTo: chain.payTo,
        price: { amount: AMOUNT, asset: chain.token.address, extra } }, description: "an article" },
    }, rs));
    app2.get("/article", (_req, res) => res.json({ article: "v2 content" }));
    const app1 = express();
    app1.use(x402v1Middleware(chain.payTo, {
      "GET /article": { price: { amount: AMOUNT, asset: { address: chain.token.address, decimals: 6, eip712: extra } },
        network: chain.networkV1 },
    }, { url: facil.url }));
    app1.get("/article", (_req, res) => res.json({ article: "v1 content" }));
    v2srv = app2.listen(0, "127.0.0.1");
    v1srv = app1.listen(0, "127.0.0.1");
    await Promise.all([v2srv, v1srv].map((s) => new Promise((ok) => (s.listening ? ok() : s.once("listening", ok)))));
    v2url = `http://127.0.0.1:${v2srv.address().port}/article`;
    v1url = `http://127.0.0.1:${v1srv.address().port}/article`;
  });

  after(async () => {
    for (const s of [v2srv, v1srv]) { s?.closeAllConnections?.(); s?.close(); }
  });

  it("@x402/fetch (v2) pays @x402/express through the facilitator; the chain moves once", async () => {
    const buyer = chain.buyers[0];
    const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v2(v2url, { key: buyer.key, rpc: chain.rpc }));
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body, { article: "v2 content" });
    assert.equal(r.paymentResponse.success, true);
    assert.equal(r.paymentResponse.network, chain.network);
    await assertPaidOnce(buyer.address, moves, "x402 v2 baseline");
  });

  it("the x402 1.2 client pays x402-express 1.2 on base-sepolia (the local chain 84532)", async () => {
    const buyer = chain.buyers[1];
    const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v1(v1url, { key: buyer.key }));
    assert.equal(r.status, 200, JSON.stringify(r.body));
    assert.deepEqual(r.body, { article: "v1 content" });
    assert.equal(r.paymentResponse.success, true);
    assert.equal(r.paymentResponse.network, "base-sepolia");
    await assertPaidOnce(buyer.address, moves, "x402 v1 baseline");
  });

  it("the t402 client's payment for a challenge with both version fields settles through the t402 facilitator", async () => {
    const buyer = chain.buyers[2];
    const { required } = await challenge(v2url);
    // What the gateway sends: the same PaymentRequired with t402Version beside x402Version.
    const both = { ...required, t402Version: 2 };
    const client = new t402HTTPClient(new t402Client().register("eip155:*", new T402ExactEvmScheme(privateKeyToAccount(buyer.key))));
    const payload = await client.createPaymentPayload(both);
    assert.equal(payload.t402Version, 2);
    assert.equal(payload.x402Version, undefined, "the t402 payload carries only its own version field");
    const body = { t402Version: 2, paymentPayload: payload, paymentRequirements: payload.accepted };
    const post = async (path) => (await fetch(facil.url + path, { method: "POST",
      headers: { "content-type": "application/json" }, body: JSON.stringify(body) })).json();
    const { result, moves } = await ledgerAround(buyer.address, async () => {
      const v = await post("/verify");
      assert.equal(v.isValid, true, JSON.stringify(v));
      return post("/settle");
    });
    assert.equal(result.success, true, JSON.stringify(result));
    await assertPaidOnce(buyer.address, moves, "t402 baseline");
    // The x402 v2 client takes the same two-field challenge too.
    const p2 = await clientPayment(both, chain.buyers[3].key);
    assert.equal(p2.payload.x402Version, 2);
    assert.equal(p2.payload.t402Version, undefined);
  });

  it("the hand-made bad payments of the gateway cases are bad for the real facilitator too", async () => {
    const { required } = await challenge(v2url);
    const key = chain.buyers[3].key;
    const now = Math.floor(Date.now() / 1000);
    const flip = (sig) => sig.slice(0, 10) + (parseInt(sig[10], 16) ^ 1).toString(16) + sig.slice(11);
    const cases = [
      [{ key }, null],
      [{ key: generatePrivateKey() }, /insufficient_balance/],
      [{ key, auth: { to: privateKeyToAccount(generatePrivateKey()).address } }, /recipient_mismatch/],
      [{ key, auth: { validAfter: String(now - 600), validBefore: String(now - 5) } }, /valid_before/],
      [{ key, tamper: flip }, /signature/],
      [{ key, sign: { value: "1" } }, /signature/],
    ];
    for (const [opts, reason] of cases) {
      const p = await handMadePayment(required, opts);
      const res = await fetch(facil.url + "/verify", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ x402Version: 2, paymentPayload: p.payload, paymentRequirements: required.accepts[0] }) });
      const v = await res.json();
      if (reason === null) assert.equal(v.isValid, true, JSON.stringify(v));
      else assert.match(String(v.invalidReason), reason, JSON.stringify(v));
    }
  });

  it("the facilitator refuses a replayed authorization (the kit can fail)", async () => {
    const { required } = await challenge(v2url);
    const p = await handMadePayment(required, { key: chain.buyers[3].key });
    const body = { x402Version: 2, paymentPayload: p.payload, paymentRequirements: p.payload.accepted };
    const post = async (path) => (await fetch(facil.url + path, { method: "POST",
      headers: { "content-type": "application/json" }, body: JSON.stringify(body) })).json();
    assert.equal((await post("/settle")).success, true);
    const again = await post("/verify");
    assert.equal(again.isValid, false);
    assert.match(again.invalidReason, /nonce_already_used/);
  });
});

describe("x402 gateway: the real binary with the real clients", () => {
  let redis;
  let origin;
  let dir1;
  let dir2;
  let gw1;
  let gw2;

  // A new buyer with 10 tokens and no ETH (EIP-3009 is gasless for the payer), so each
  // case reads balances nobody else moves.
  async function freshBuyer(fund = 10_000_000n) {
    const key = generatePrivateKey();
    const address = privateKeyToAccount(key).address;
    await chain.mint(address, fund);
    return { key, address };
  }

  before(async () => {
    redis = await startRedis();
    origin = await startOrigin();
    dir1 = mkdtempSync(join(tmpdir(), "tollgate-x402-a-"));
    dir2 = mkdtempSync(join(tmpdir(), "tollgate-x402-b-"));
    const common = { chain, facilitators: [facil.url], origin: origin.url, redisPort: redis.port };
    // The second instance verifies locally (balance and nonce from the chain's JSON-RPC).
    [gw1, gw2] = await Promise.all([
      startTollgate({ dir: dir1, ...common }),
      startTollgate({ dir: dir2, ...common, extra: `verify = "local", rpc = { "${chain.rpc}" },` }),
    ]);
  });

  after(async () => {
    await gw1?.stop();
    await gw2?.stop();
    await origin?.stop();
    await redis?.stop();
    for (const d of [dir1, dir2]) if (d) rmSync(d, { recursive: true, force: true });
  });

  it("an unpaid request: 402, PAYMENT-REQUIRED (v2 with t402Version) and the v1 body, no-store", async () => {
    const url = `${gw1.baseUrl}/articles/unpaid`;
    const { required, body, res } = await challenge(url);
    assert.equal(required.x402Version, 2);
    assert.equal(required.t402Version, 2);
    assert.ok(required.resource?.url, "resource.url is required by the 2.27 clients");
    assert.equal(required.accepts.length, 1);
    const a = required.accepts[0];
    assert.equal(a.scheme, "exact");
    assert.equal(a.network, chain.network);
    assert.equal(a.amount, AMOUNT);
    assert.equal(getAddress(a.asset), getAddress(chain.token.address));
    assert.equal(getAddress(a.payTo), getAddress(chain.payTo));
    assert.deepEqual({ name: a.extra?.name, version: a.extra?.version }, { name: chain.token.name, version: chain.token.version });
    assert.match(res.headers.get("cache-control") ?? "", /no-store/);
    const v1 = JSON.parse(body);
    assert.equal(v1.x402Version, 1);
    assert.equal(v1.accepts[0].network, "base-sepolia");
    assert.equal(v1.accepts[0].maxAmountRequired, AMOUNT);
    assert.equal(origin.hits("/articles/unpaid"), 0, "nothing served unpaid");
  });

  for (const [name, pay, header] of [
    ["@x402/fetch (x402 v2)", payX402v2, "payment-response"],
    ["the x402 1.2 client (x402 v1, base-sepolia)", payX402v1, "x-payment-response"],
    ["the t402 client (@t402/core)", payT402, "payment-response"],
  ]) {
    it(`${name} pays, gets the content, and the chain moves exactly once`, async () => {
      const buyer = await freshBuyer();
      const path = `/articles/paid-${name.replace(/[^a-z0-9]+/gi, "-")}`;
      const { result: r, moves } = await ledgerAround(buyer.address, () =>
        pay(gw1.baseUrl + path, { key: buyer.key, rpc: chain.rpc, asset: chain.token.address, max: AMOUNT }));
      assert.equal(r.status, 200, `${r.status} ${JSON.stringify(r.body)}\n${gw1.log().slice(-3000)}`);
      assert.equal(r.body.article, path);
      assert.equal(origin.hits(path), 1);
      assert.ok(r.headers[header], `no ${header} header: ${JSON.stringify(r.headers)}`);
      assert.equal(r.paymentResponse.success, true, JSON.stringify(r.paymentResponse));
      assert.match(r.paymentResponse.transaction, /^0x[0-9a-f]{64}$/);
      const m = await assertPaidOnce(buyer.address, moves, name);
      assert.equal(m.transfers[0].transactionHash, r.paymentResponse.transaction);
    });
  }

  it("a paid request to a redirecting tenant answers 302 to the signed CDN URL, paid once", async () => {
    const buyer = await freshBuyer();
    const { result: r, moves } = await ledgerAround(buyer.address, () =>
      payX402v2(`${gw1.baseUrl}/articles/cdn-1`, { key: buyer.key, host: "redirect.test" }));
    assert.equal(r.status, 302, `${r.status} ${JSON.stringify(r.body)}`);
    assert.ok(r.headers.location.startsWith(`${CDN_BASE}/articles/cdn-1`), r.headers.location);
    assert.equal(r.paymentResponse?.success, true);
    await assertPaidOnce(buyer.address, moves, "redirect");
  });

  // A refusal: its code in the t402 body, its status, the challenge again, nothing served.
  function assertRefused(r, codes, path, what) {
    const got = typeof r.body === "object" ? r.body.code : undefined;
    assert.ok(codes.map((c) => `T402-${c}`).includes(got), `${what}: expected ${codes.join("/")} got ${r.status} ${r.text}`);
    assert.equal(r.status, t402Status(Number(got.slice(5))), `${what}: status for ${got}`);
    assert.ok(r.headers["payment-required"], `${what}: no PAYMENT-REQUIRED on the refusal`);
    assert.match(r.headers["cache-control"] ?? "", /no-store/, `${what}: cacheable refusal`);
    if (path) assert.equal(origin.hits(path), 0, `${what}: served anyway`);
  }

  it("a replayed PAYMENT-SIGNATURE is refused (T402-3006) and pays nothing twice", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/replay";
    const { result: first, moves } = await ledgerAround(buyer.address, () => payX402v2(gw1.baseUrl + path, { key: buyer.key }));
    assert.equal(first.status, 200, JSON.stringify(first.body));
    assert.ok(first.paymentHeader);
    for (const gw of [gw1, gw2]) {
      const again = await sendPayment(gw.baseUrl + path, first.paymentHeader);
      assertRefused(again, [3006], null, `replay at ${gw === gw1 ? "the same" : "the other"} instance`);
    }
    assert.equal(origin.hits(path), 1);
    await assertPaidOnce(buyer.address, moves, "replay");
  });

  it("a replayed X-PAYMENT (v1) and a replayed t402 payment are refused (T402-3006)", async () => {
    for (const [pay, name, hdr] of [[payX402v1, "v1", "X-PAYMENT"], [payT402, "t402", "PAYMENT-SIGNATURE"]]) {
      const buyer = await freshBuyer();
      const path = `/articles/replay-${name}`;
      const { result: first, moves } = await ledgerAround(buyer.address, () => pay(gw1.baseUrl + path, { key: buyer.key }));
      assert.equal(first.status, 200, `${name}: ${first.status} ${JSON.stringify(first.body)}`);
      assert.ok(first.paymentHeader, `${name}: no payment header recorded`);
      const again = await sendPayment(gw2.baseUrl + path, first.paymentHeader, hdr);
      assertRefused(again, [3006], null, `${name} replay at the other instance`);
      assert.equal(origin.hits(path), 1);
      await assertPaidOnce(buyer.address, moves, `${name} replay`);
    }
  });

  it("a malformed payment header is refused (T402-1001), and a v2 payload in X-PAYMENT too", async () => {
    const path = "/articles/malformed";
    for (const [hdr, value] of [["PAYMENT-SIGNATURE", "not base64!"], ["PAYMENT-SIGNATURE", Buffer.from("{\"x402Version\":2").toString("base64")],
      ["X-PAYMENT", Buffer.from(JSON.stringify({ x402Version: 2 })).toString("base64")]]) {
      assertRefused(await sendPayment(gw1.baseUrl + path, value, hdr), [1001], path, `${hdr}: ${value}`);
    }
  });

  it("one payment sent concurrently to two instances sharing Redis is served once", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/concurrent";
    const { required } = await challenge(gw1.baseUrl + path);
    const { header } = await clientPayment(required, buyer.key);
    const { result: rs, moves } = await ledgerAround(buyer.address, () =>
      Promise.all([sendPayment(gw1.baseUrl + path, header), sendPayment(gw2.baseUrl + path, header)]));
    const ok = rs.filter((r) => r.status === 200);
    const refused = rs.filter((r) => r.status !== 200);
    assert.equal(ok.length, 1, rs.map((r) => `${r.status} ${r.text}`).join("\n"));
    assertRefused(refused[0], [3006], null, "the concurrent copy");
    assert.equal(origin.hits(path), 1);
    await assertPaidOnce(buyer.address, moves, "concurrent replay");
  });

  it("an empty wallet is refused (insufficient balance), nothing served", async () => {
    const key = generatePrivateKey();
    const path = "/articles/empty-wallet";
    const { required } = await challenge(gw1.baseUrl + path);
    const { header } = await clientPayment(required, key);
    const r = await sendPayment(gw1.baseUrl + path, header);
    assertRefused(r, [3003, 3001], path, "empty wallet");
  });

  it("verify = \"local\" (JSON-RPC to the chain): @x402/fetch pays through the second instance, once", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/local-verify";
    const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v2(gw2.baseUrl + path, { key: buyer.key }));
    assert.equal(r.status, 200, `${r.status} ${JSON.stringify(r.body)}\n${gw2.log().slice(-3000)}`);
    assert.equal(r.paymentResponse?.success, true);
    assert.equal(origin.hits(path), 1);
    await assertPaidOnce(buyer.address, moves, "local verify");
  });

  it("verify = \"local\": an empty wallet is refused from the chain's balance (T402-3003)", async () => {
    const path = "/articles/local-empty-wallet";
    const { required } = await challenge(gw2.baseUrl + path);
    const { header } = await clientPayment(required, generatePrivateKey());
    const verifies = facil.counts().verify;
    assertRefused(await sendPayment(gw2.baseUrl + path, header), [3003], path, "local verify, empty wallet");
    assert.equal(facil.counts().verify, verifies, "local verification asked no facilitator");
  });

  it("a payTo other than the offered one is refused (T402-1010)", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/wrong-payto";
    const { required } = await challenge(gw1.baseUrl + path);
    const thief = privateKeyToAccount(generatePrivateKey()).address;
    const { header } = await handMadePayment(required, { key: buyer.key, auth: { to: thief } });
    const { result: r, moves } = await ledgerAround(buyer.address, () => sendPayment(gw1.baseUrl + path, header));
    assertRefused(r, [1010], path, "wrong payTo");
    assert.equal((await moves()).buyer, 0n);
  });

  it("an expired authorization is refused (T402-1011)", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/expired";
    const { required } = await challenge(gw1.baseUrl + path);
    const now = Math.floor(Date.now() / 1000);
    const { header } = await handMadePayment(required, { key: buyer.key, auth: { validAfter: String(now - 600), validBefore: String(now - 5) } });
    assertRefused(await sendPayment(gw1.baseUrl + path, header), [1011], path, "expired");
  });

  it("a tampered signature is refused (T402-1006)", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/tampered";
    const { required } = await challenge(gw1.baseUrl + path);
    // One bit of r flipped: still well-formed, signs for someone else.
    const flip = (sig) => sig.slice(0, 10) + (parseInt(sig[10], 16) ^ 1).toString(16) + sig.slice(11);
    const { header } = await handMadePayment(required, { key: buyer.key, tamper: flip });
    assertRefused(await sendPayment(gw1.baseUrl + path, header), [1006], path, "tampered signature");
    // A signature over another value than the authorization says: also 1006.
    const other = await handMadePayment(required, { key: buyer.key, sign: { value: "1" } });
    assertRefused(await sendPayment(gw1.baseUrl + path, other.header), [1006], path, "signature over another value");
  });

  it("a requirement that was never offered is refused (T402-3005)", async () => {
    const buyer = await freshBuyer();
    const path = "/articles/never-offered";
    const { required } = await challenge(gw1.baseUrl + path);
    const { header } = await handMadePayment(required, { key: buyer.key, accepted: { amount: "1" } });
    const { result: r, moves } = await ledgerAround(buyer.address, () => sendPayment(gw1.baseUrl + path, header));
    assertRefused(r, [3005], path, "never offered");
    assert.equal((await moves()).buyer, 0n);
  });

  describe("facilitators down, misbehaving, failing over", () => {
    let dir;
    let gw;
    let flaky;
    let deadUrl;

    before(async () => {
      flaky = await startFacilitator({ rpc: chain.rpc, chainId: chain.chainId, key: chain.keys.facilitator2 });
      // Nothing listens on port 1 (tcpmux), and no test binds it: a port only probed free
      // could be handed to the next server a test starts.
      deadUrl = "http://127.0.0.1:1";
      dir = mkdtempSync(join(tmpdir(), "tollgate-x402-c-"));
      gw = await startTollgate({ dir, chain, facilitators: [flaky.url], origin: origin.url });
    });

    after(async () => {
      await gw?.stop();
      await flaky?.stop();
      if (dir) rmSync(dir, { recursive: true, force: true });
    });

    it("a facilitator answering a 308 redirect is a 502 and serves nothing (x402 #605)", async () => {
      const buyer = await freshBuyer();
      const path = "/articles/redirecting-facilitator";
      flaky.behavior = "redirect";
      try {
        const { required } = await challenge(gw.baseUrl + path);
        const { header } = await clientPayment(required, buyer.key);
        const { result: r, moves } = await ledgerAround(buyer.address, () => sendPayment(gw.baseUrl + path, header));
        assert.equal(r.status, 502, `${r.status} ${r.text}`);
        assert.equal(origin.hits(path), 0);
        assert.equal((await moves()).buyer, 0n);
      } finally {
        flaky.behavior = null;
      }
    });

    it("a facilitator answering garbage is a 502 and serves nothing", async () => {
      const buyer = await freshBuyer();
      const path = "/articles/garbage-facilitator";
      flaky.behavior = "garbage";
      try {
        const { required } = await challenge(gw.baseUrl + path);
        const { header } = await clientPayment(required, buyer.key);
        const r = await sendPayment(gw.baseUrl + path, header);
        assert.equal(r.status, 502, `${r.status} ${r.text}`);
        assert.equal(origin.hits(path), 0);
      } finally {
        flaky.behavior = null;
      }
    });

    it("sync: a settlement refused after verification answers 402 with success false and serves nothing", async () => {
      const buyer = await freshBuyer(BigInt(AMOUNT));
      const path = "/articles/settle-refused";
      const { required } = await challenge(gw.baseUrl + path);
      const { header } = await clientPayment(required, buyer.key);
      flaky.settleDelayMs = 1500;
      const block0 = await chain.publicClient.getBlockNumber({ cacheTime: 0 });
      try {
        const pending = sendPayment(gw.baseUrl + path, header);
        // Verified, the settle is held: the buyer spends the money elsewhere meanwhile.
        await waitFor("the settle request", () => flaky.events.some((e) => e.path === "/settle" && e.body?.paymentPayload?.payload?.authorization?.from === buyer.address), 5000);
        await chain.rpcCall("anvil_setBalance", [buyer.address, "0xde0b6b3a7640000"]);
        const w = walletFor(chain.chain, buyer.key);
        const h = await w.writeContract({ address: chain.token.address, abi: chain.token.abi, functionName: "transfer",
          args: [privateKeyToAccount(generatePrivateKey()).address, BigInt(AMOUNT)] });
        await chain.publicClient.waitForTransactionReceipt({ hash: h });
        const r = await pending;
        assert.equal(r.status, 402, `${r.status} ${r.text}`);
        assert.ok(r.headers["payment-response"], "PAYMENT-RESPONSE with success false");
        assert.equal(decodeB64(r.headers["payment-response"]).success, false);
        assert.equal(origin.hits(path), 0, "served although not paid");
        const logs = await chain.publicClient.getLogs({ address: chain.token.address, fromBlock: block0 + 1n });
        const paid = parseEventLogs({ abi: chain.token.abi, eventName: "Transfer", logs })
          .filter((l) => getAddress(l.args.to) === getAddress(chain.payTo));
        assert.equal(paid.length, 0, "the seller was paid");
      } finally {
        flaky.settleDelayMs = 0;
      }
    });

    it("every facilitator down: a clear error (T402-2006), nothing served, nothing paid", async () => {
      const buyer = await freshBuyer();
      const path = "/articles/facilitator-down";
      const { required } = await challenge(gw.baseUrl + path);
      await flaky.stop();
      const { header } = await clientPayment(required, buyer.key);
      const { result: r, moves } = await ledgerAround(buyer.address, () => sendPayment(gw.baseUrl + path, header));
      assertRefused(r, [2006], path, "facilitator down");
      assert.ok(r.body.message, "the error says what went wrong");
      assert.equal((await moves()).buyer, 0n);
    });

    it("with a second facilitator, a dead first one fails over and the payment is served once", async () => {
      const d = mkdtempSync(join(tmpdir(), "tollgate-x402-d-"));
      const g = await startTollgate({ dir: d, chain, facilitators: [deadUrl, facil.url], origin: origin.url });
      try {
        const buyer = await freshBuyer();
        const path = "/articles/failover";
        const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v2(g.baseUrl + path, { key: buyer.key }));
        assert.equal(r.status, 200, `${r.status} ${JSON.stringify(r.body)}\n${g.log().slice(-2000)}`);
        assert.equal(r.paymentResponse?.success, true);
        assert.equal(origin.hits(path), 1);
        await assertPaidOnce(buyer.address, moves, "failover");
      } finally {
        await g.stop();
        rmSync(d, { recursive: true, force: true });
      }
    });
  });

  it("neither instance crashed along the way", () => {
    for (const [name, gw] of [["first", gw1], ["second (verify local)", gw2]]) {
      assert.equal(gw.crashed, false, `the ${name} instance died: ${JSON.stringify(gw.dead)}\n${gw.log().slice(-3000)}`);
    }
  });

  it("a gateway killed between serving and settling (async) settles after restart, exactly once", async () => {
    const slow = await startFacilitator({ rpc: chain.rpc, chainId: chain.chainId, key: chain.keys.facilitator2, settleDelayMs: 3000 });
    const d = mkdtempSync(join(tmpdir(), "tollgate-x402-e-"));
    const cfg = { dir: d, chain, facilitators: [slow.url], origin: origin.url, settle: "async" };
    let g = await startTollgate(cfg);
    try {
      const buyer = await freshBuyer();
      const path = "/articles/killed";
      const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v2(g.baseUrl + path, { key: buyer.key }));
      assert.equal(r.status, 200, `${r.status} ${JSON.stringify(r.body)}\n${g.log().slice(-2000)}`);
      assert.equal(origin.hits(path), 1, "served before settling");
      // The settlement is on its way to the (slow) facilitator: kill the gateway now.
      await waitFor("the settle request", () => slow.events.some((e) => e.path === "/settle"), 5000);
      assert.equal((await moves()).buyer, 0n, "not settled yet");
      await g.kill("SIGKILL");
      slow.settleDelayMs = 0;
      g = await startTollgate({ ...cfg, port: g.port });
      await waitFor("the settlement after restart", async () => (await moves()).buyer !== 0n, 15000, 100);
      // Every settle request the facilitator got has ended (the one held when the gateway
      // died is abandoned once its delay passes), so none can still land.
      await waitFor("the held settle to end", () => slow.events.every((e) => e.path !== "/settle" || e.status !== 0), 6000, 100);
      await assertPaidOnce(buyer.address, moves, "killed and restarted");
      const c = slow.counts();
      assert.ok(c.settle >= 2, `the facilitator saw ${c.settle} settle requests`);
      assert.ok(c.abandoned >= 1, "the settle held at the kill was abandoned");
      assert.equal(c.settled, 1, `settled ${c.settled} times: ${JSON.stringify(slow.events.map((e) => [e.path, e.status, e.result]))}`);
      assert.equal(origin.hits(path), 1);
      await waitFor("t402_settlements_total{status=settled}", async () => (await g.metric("t402_settlements_total", { status: "settled" })) === 1, 5000);
      assert.equal(await g.metric("t402_settlements_total", { status: "failed" }), 0);
      assert.equal(await g.metric("t402_unsettled_amount"), 0, "nothing left unsettled");
    } finally {
      await g.stop();
      await slow.stop();
      rmSync(d, { recursive: true, force: true });
    }
  });

  it("killed after the facilitator settled (the gateway never heard): the restart asks the chain, records it settled, sends nothing again", async () => {
    const slow = await startFacilitator({ rpc: chain.rpc, chainId: chain.chainId, key: chain.keys.facilitator2, settleDelayMs: 1500 });
    slow.abandonOnHangup = false;
    const d = mkdtempSync(join(tmpdir(), "tollgate-x402-f-"));
    // rpc: the settlement queue's probe asks the chain whether the nonce was used (pay/settleq.h).
    const cfg = { dir: d, chain, facilitators: [slow.url], origin: origin.url, settle: "async", extra: `rpc = { "${chain.rpc}" },` };
    let g = await startTollgate(cfg);
    try {
      const buyer = await freshBuyer();
      const path = "/articles/killed-after-settling";
      const { result: r, moves } = await ledgerAround(buyer.address, () => payX402v2(g.baseUrl + path, { key: buyer.key }));
      assert.equal(r.status, 200, `${r.status} ${JSON.stringify(r.body)}\n${g.log().slice(-2000)}`);
      await waitFor("the settle request", () => slow.events.some((e) => e.path === "/settle"), 5000);
      await g.kill("SIGKILL");
      await waitFor("the facilitator's settlement", async () => (await moves()).buyer !== 0n, 10000, 100);
      g = await startTollgate({ ...cfg, port: g.port, adminPort: g.adminPort });
      await waitFor("t402_settlements_total{status=settled} after restart",
        async () => (await g.metric("t402_settlements_total", { status: "settled" })) === 1, 10000, 100);
      await sleep(1000);
      await assertPaidOnce(buyer.address, moves, "settled by the facilitator before the restart");
      assert.equal(slow.counts().settle, 1, `the restart sent the settlement again: ${JSON.stringify(slow.events.map((e) => [e.path, e.status]))}`);
      assert.equal(await g.metric("t402_settlements_total", { status: "failed" }), 0, "recorded failed although the money came");
      assert.doesNotMatch(g.log(), /settlement failed/);
      assert.equal(await g.metric("t402_unsettled_amount"), 0);
    } finally {
      await g.stop();
      await slow.stop();
      rmSync(d, { recursive: true, force: true });
    }
  });
});
