// The remote billing adapter (billing type "connect", proto/billing/v1) end to end: the real
// gateway calls a BillingService written with @connectrpc/connect-node (lib/billing_service.js,
// a test double of the publisher's billing system) while an unmodified Connect client buys.
// For a tenant policy that rejects and one that defers when billing fails: billing fast, slow
// (over the deadline), erroring, down and back up; the answer, the log (`tollgate wal cat`), the
// calls the billing service received (each transaction charged exactly once) and the metrics.
// Then the deferred cap, the circuit breaker, kill -9 during reconciliation, and /readyz from the
// Health probe. Tenants use workers = 1, so that one adapter (and its circuit) sees every call.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync, execFileSync } from "node:child_process";
import { mkdtempSync, writeFileSync, mkdirSync, readFileSync, rmSync, openSync, closeSync, copyFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import { createClient, ConnectError, Code } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import {
  ExchangeService, TransactionStatus, DenialReason, ExecuteTransactionResponseSchema,
  ExecuteTransactionRequestSchema,
} from "./gen/ramp/v1/exchange_pb.js";
import { UsagePurpose, UserType } from "./gen/comp/v1/ai_system_pb.js";
import { freePort, binaryPath } from "./lib/gateway.js";
import { startBillingService } from "./lib/billing_service.js";

const HOST = "shop.billing.test";
const PRICE = 100000n; // 0.10 USD in micro-USD, the RSL below
const CDN = "http://cdn.billing.test";
const RICH = "acct-billing-rich";
const POOR = "acct-billing-poor";
const TENANT = "shop";
const DEADLINE_MS = 200; // generous: a loaded 2-core machine must not time out a fast answer
const SLOW_MS = 600; // over the deadline, under the adapter's 2 s grace for late holds
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

const RSL = `<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/articles/*">
    <license>
      <permits type="usage">ai-input</permits>
      <payment type="purchase"><amount currency="USD">0.10</amount></payment>
    </license>
  </content>
</rsl>
`;

// The tenant's policy: the billing hook's answer, and one log line per call with the txn fields
// the hook saw, so that the test can check the reason the gateway gives.
function policy(answer) {
  return `local P = {}
function P.on_billing_timeout(txn)
  tollgate.log("info", "billing-hook id=" .. tostring(txn.id) .. " reason=" .. tostring(txn.reason) ..
    " failing_ms=" .. tostring(txn.failing_ms) .. " amount=" .. tostring(txn.amount) ..
    " ref=" .. tostring(txn.billing_ref) .. " answer=${answer}")
  return "${answer}"
end
function P.on_settle_failure(txn)
  tollgate.log("info", "settle-failure id=" .. tostring(txn.id) .. " reason=" .. tostring(txn.reason))
end
P.fixtures = {
  { hook = "on_billing_timeout", txn = { amount = 1, reason = "timeout" }, expect = { "${answer}" } },
}
return P
`;
}

const aiSystem = {
  name: "Billing Interop Agent",
  id: "agent-billing-1",
  usagePurposes: [UsagePurpose.AI_INPUT],
  userType: UserType.COMMERCIAL,
  billingReference: RICH,
};

// A gateway with one tenant billed by the service at billingUrl. Returns start/kill9/restart
// on the same configuration, data_dir and ports.
async function makeGateway({ billingUrl, billingToken, answer, billing = {}, workers = 1 }) {
  const dir = mkdtempSync(join(tmpdir(), "tollgate-billing-"));
  const adminToken = "admin-" + Math.random().toString(36).slice(2);
  writeFileSync(join(dir, "admin.token"), adminToken + "\n", { mode: 0o600 });
  writeFileSync(join(dir, "billing.token"), billingToken + "\n", { mode: 0o600 });
  writeFileSync(join(dir, "cdn.key"), "billing-cdn-" + Math.random().toString(36).slice(2), { mode: 0o600 });
  writeFileSync(join(dir, "policy.lua"), policy(answer));
  mkdirSync(join(dir, "rsl"));
  writeFileSync(join(dir, "rsl", "shop.xml"), RSL);
  mkdirSync(join(dir, "data"));
  const [port, adminPort] = [await freePort(), await freePort()];
  const b = {
    deadline_ms: DEADLINE_MS, call_timeout_ms: 2000, breaker_failures: 5, breaker_cooldown_ms: 1000,
    health_interval_ms: 500, deferred_cap: 100000000, reconcile_backoff_ms: 100, reconcile_max_backoff_ms: 500,
    ...billing,
  };
  const extra = Object.entries(b).map(([k, v]) => `${k} = ${v}`).join(", ");
  const config = `return {
  listen = { { host = "127.0.0.1", port = ${port} } },
  admin = { host = "127.0.0.1", port = ${adminPort}, token_file = "admin.token" },
  workers = ${workers},
  data_dir = "data",
  log_level = "info",
  limits = { shutdown_grace_ms = 2000 },
  ledger = { wal = { capacity_bytes = 16777216, segment_bytes = 1048576 } },
  tenants = {
    { name = "${TENANT}", hosts = { "${HOST}" },
      catalog = { source = "rsl/shop.xml" },
      policy = "policy.lua",
      signer = { type = "nginx_secure_link", base_url = "${CDN}", key_file = "cdn.key" },
      billing = { type = "connect", url = "${billingUrl}", token_file = "billing.token", ${extra} } },
  },
}
`;
  const configPath = join(dir, "tollgate.lua");
  writeFileSync(configPath, config);
  const logPath = join(dir, "tollgate.log");
  let child = null, exited = null, runs = 0;

  const gw = {
    dir, configPath, port, adminPort, adminToken,
    baseUrl: `http://127.0.0.1:${port}`,
    adminUrl: `http://127.0.0.1:${adminPort}`,
    get pid() { return child?.pid; },
    log() { try { return readFileSync(logPath, "utf8"); } catch { return ""; } },
    async start() {
      const fd = openSync(logPath, runs++ === 0 ? "w" : "a");
      child = spawn(binaryPath(), ["run", "-c", configPath], { cwd: dir, stdio: ["ignore", fd, fd] });
      closeSync(fd);
      exited = new Promise((ok) => {
        child.once("exit", (code, signal) => ok({ code, signal }));
        child.once("error", (error) => ok({ code: null, signal: null, error }));
      });
      let dead = null;
      exited.then((r) => { dead = r; });
      const deadline = Date.now() + 15000;
      for (;;) {
        if (dead) throw new Error(`tollgate exited during start-up (${JSON.stringify(dead)}):\n${gw.log()}`);
        try {
          const res = await fetch(`${gw.baseUrl}/healthz`, { signal: AbortSignal.timeout(1000) });
          await res.arrayBuffer();
          if (res.status === 200) return;
        } catch { /* not yet */ }
        if (Date.now() > deadline) {
          try { process.kill(child.pid, "SIGKILL"); } catch { /* gone */ }
          await exited;
          throw new Error(`tollgate did not answer /healthz within 15 s:\n${gw.log()}`);
        }
        await sleep(50);
      }
    },
    async kill9() {
      const c = child;
      process.kill(c.pid, "SIGKILL");
      return exited;
    },
    async stop() {
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      try { process.kill(child.pid, "SIGTERM"); } catch { return; }
      const t = setTimeout(() => { try { process.kill(child.pid, "SIGKILL"); } catch { /* gone */ } }, 10000);
      await exited;
      clearTimeout(t);
    },
    cleanup() {
      if (process.env.TOLLGATE_LOG_DIR) {
        try {
          mkdirSync(process.env.TOLLGATE_LOG_DIR, { recursive: true });
          copyFileSync(logPath, join(process.env.TOLLGATE_LOG_DIR, `tollgate-billing-${port}.log`));
        } catch { /* best effort */ }
      }
      rmSync(dir, { recursive: true, force: true });
    },
    client() {
      return createClient(ExchangeService, createConnectTransport({
        baseUrl: gw.baseUrl, httpVersion: "1.1", useBinaryFormat: true,
      }));
    },
    // `tollgate wal cat` of this gateway's log, parsed; --tx ID when given.
    wal(tx) {
      const args = ["wal", "cat", "-c", configPath];
      if (tx) args.push("--tx", tx);
      const out = execFileSync(binaryPath(), args, { cwd: dir, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
      return out.split("\n").filter((l) => l.trim() !== "").map((l) => JSON.parse(l));
    },
    async metrics() {
      const res = await fetch(`${gw.adminUrl}/metrics`, { headers: { Authorization: `Bearer ${adminToken}` } });
      assert.equal(res.status, 200, "admin /metrics");
      return parseMetrics(await res.text());
    },
    // The policy hook's log lines: [{ id, reason, failing_ms, ref, answer }].
    hookCalls() {
      const out = [];
      for (const m of gw.log().matchAll(/billing-hook id=(\S+) reason=(\S+) failing_ms=(\S+) amount=(\S+) ref=(\S+) answer=(\w+)/g)) {
        // id=nil: the policy's own fixture, run when it loads
        if (m[1] !== "nil") out.push({ id: m[1], reason: m[2], failing_ms: m[3], amount: m[4], ref: m[5], answer: m[6] });
      }
      return out;
    },
  };
  return gw;
}

// Prometheus text -> [{ name, labels: {..}, value }].
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[2] ?? "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    out.push({ name: m[1], labels, value: Number(m[3]) });
  }
  out.text = text;
  return out;
}
// The sum of the series of name whose labels include want; undefined when there is none.
function metric(ms, name, want = {}) {
  let sum, found = false;
  for (const s of ms) {
    if (s.name !== name) continue;
    if (!Object.entries(want).every(([k, v]) => s.labels[k] === v)) continue;
    found = true;
    sum = (sum ?? 0) + s.value;
  }
  return found ? sum : undefined;
}
const m0 = (ms, name, want) => metric(ms, name, want) ?? 0;

let keySeq = 0;
const newKey = (label) => `billing-${label}-${process.pid}-${Date.now().toString(36)}-${++keySeq}`;

async function offerFor(gw, path) {
  const res = await gw.client().discoverResources({ aiSystem, resources: [{ uri: `https://${HOST}${path}` }] });
  assert.equal(res.results.length, 1);
  assert.equal(res.results[0].offers.length, 1, `offer for ${path}: ${res.results[0].absenceDetail}`);
  return res.results[0].offers[0].id;
}

// One purchase: { res, key } when answered, { err, key } for a Connect error.
async function buy(gw, offerId, { label = "buy", ref = RICH, headers, key = newKey(label) } = {}) {
  try {
    const res = await gw.client().executeTransaction({
      aiSystem: { ...aiSystem, billingReference: ref }, idempotencyKey: key, items: [{ offerId }],
    }, { headers });
    return { res, key };
  } catch (err) {
    if (!(err instanceof ConnectError)) throw err;
    return { err, key };
  }
}

const statusName = (s) => TransactionStatus[s];
function assertApproved(r, what) {
  assert.ok(r.res, `${what}: answered (got ${r.err?.code !== undefined ? Code[r.err.code] : ""} ${r.err?.rawMessage ?? ""})`);
  assert.equal(statusName(r.res.status), "APPROVED", `${what}: ${DenialReason[r.res.denialReason]} ${r.res.denialDetail}`);
  assert.match(r.res.transactionId, /^tx_/);
  assert.equal(r.res.items.length, 1);
  assert.ok(r.res.items[0].retrievalUrl.startsWith(CDN + "/articles/"), r.res.items[0].retrievalUrl);
  return r.res.transactionId;
}
function assertDeferred(r, what) {
  assert.ok(r.res, `${what}: answered (got ${r.err?.code !== undefined ? Code[r.err.code] : ""} ${r.err?.rawMessage ?? ""})`);
  assert.equal(statusName(r.res.status), "DEFERRED", `${what}: ${DenialReason[r.res.denialReason]} ${r.res.denialDetail}`);
  assert.match(r.res.transactionId, /^tx_/);
  assert.equal(r.res.items.length, 1, "served now: the item is in the answer");
  const url = new URL(r.res.items[0].retrievalUrl);
  assert.equal(url.origin, CDN, r.res.items[0].retrievalUrl);
  assert.ok(url.searchParams.get("md5") && url.searchParams.get("expires"), "a signed retrieval URL");
  assert.equal(r.res.totalCost?.amount, PRICE);
  return r.res.transactionId;
}
// unavailable, DENIAL_REASON_BILLING_UNAVAILABLE in the message, one ExecuteTransactionResponse
// detail (DENIED, BILLING_UNAVAILABLE). Returns the detail.
function assertRejected(r, what) {
  assert.ok(r.err, `${what}: a Connect error, got ${r.res ? statusName(r.res.status) + " " + r.res.transactionId : "?"}`);
  assert.equal(Code[r.err.code], Code[Code.Unavailable], `${what}: code (${r.err.rawMessage})`);
  assert.match(r.err.rawMessage, /DENIAL_REASON_BILLING_UNAVAILABLE/, `${what}: message`);
  const details = r.err.findDetails(ExecuteTransactionResponseSchema);
  assert.equal(details.length, 1, `${what}: one ramp.v1.ExecuteTransactionResponse detail (${r.err.details.length} details)`);
  assert.equal(statusName(details[0].status), "DENIED", `${what}: detail status`);
  assert.equal(DenialReason[details[0].denialReason], "BILLING_UNAVAILABLE", `${what}: detail denial_reason`);
  assert.equal(details[0].items.length, 0, `${what}: nothing served`);
  return details[0];
}

async function waitFor(what, fn, ms = 10000, step = 50) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) assert.fail(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(step);
  }
}

// The transaction record(s) of tx in the log.
function txRecords(gw, tx) {
  return gw.wal(tx).filter((r) => r.kind === "transaction" && r.transaction?.id === tx);
}
function assertLogged(gw, tx, outcome) {
  const recs = txRecords(gw, tx);
  assert.ok(recs.length >= 1, `a Transaction record for ${tx} in the log: ${JSON.stringify(gw.wal(tx))}`);
  assert.match(String(recs[0].transaction.outcome), new RegExp(`^(TRANSACTION_OUTCOME_)?${outcome}$`, "i"), `outcome of ${tx}: ${JSON.stringify(recs[0])}`);
  assert.equal(recs[0].transaction.billing_type, "connect");
  assert.doesNotMatch(JSON.stringify(recs), new RegExp(RICH), "the billing reference is redacted in the log");
}

// The LedgerChange records of tx of the given kind (CAPTURE, REFUSED, ...).
function changes(gw, tx, kind) {
  return gw.wal(tx).filter((r) => r.kind === "ledger_change" && r.ledger_change?.transaction_id === tx &&
    new RegExp(`^(LEDGER_CHANGE_KIND_)?${kind}$`, "i").test(String(r.ledger_change.kind)));
}
async function waitRecorded(gw, txs, kind) {
  for (const tx of txs) {
    await waitFor(`a ${kind} record of ${tx} in the log`, () => changes(gw, tx, kind).length >= 1, 10000, 100);
    assert.equal(changes(gw, tx, kind).length, 1, `one ${kind} record of ${tx}`);
  }
}

// Each id in txs charged exactly once, no charge for any other id of this gateway.
function assertChargedOnce(svc, txs, what) {
  for (const tx of txs) assert.equal(svc.charges.get(tx) ?? 0, 1, `${what}: charges for ${tx}`);
  for (const [id, n] of svc.charges) assert.ok(n === 1, `${what}: ${id} charged ${n} times`);
}

async function waitCharged(svc, txs, what, ms = 15000) {
  await waitFor(`${what}: ${txs.join(", ")} captured`, () => txs.every((t) => (svc.charges.get(t) ?? 0) >= 1), ms);
  assertChargedOnce(svc, txs, what);
}

for (const answer of ["reject", "deferred"]) {
  describe(`billing through a Connect service, policy answers "${answer}"`, () => {
    const token = "billing-token-" + Math.random().toString(36).slice(2);
    let svc, gw, offer;
    const deferred = []; // transaction ids answered DEFERRED
    const approved = [];

    before(async () => {
      svc = await startBillingService({ token, balances: { [RICH]: 1000n * PRICE, [POOR]: 1n } });
      gw = await makeGateway({ billingUrl: svc.url, billingToken: token, answer });
      await gw.start();
      offer = await offerFor(gw, `/articles/${answer}`);
    });
    after(async () => {
      if (gw) { await gw.stop(); gw.cleanup(); }
      if (svc) await svc.stop();
    });

    it("billing fast: APPROVED, Authorize then one Capture with billing_id = the transaction id", async () => {
      const before = await gw.metrics();
      const traceId = "4bf92f3577b34da6a3ce929d0e0e" + Math.random().toString(16).slice(2, 6).padEnd(4, "0");
      const tp = `00-${traceId}-00f067aa0ba902b7-01`;
      const tx = assertApproved(await buy(gw, offer, { label: "fast", headers: { traceparent: tp } }), "fast");
      approved.push(tx);
      await waitCharged(svc, [tx], "fast");
      const auth = svc.calls.filter((c) => c.method === "authorize" && c.tx === tx);
      assert.equal(auth.length, 1, "one Authorize");
      assert.equal(auth[0].ref, RICH, "the full billing reference reaches the publisher");
      assert.equal(auth[0].amount, PRICE);
      assert.equal(auth[0].currency, "USD");
      assert.equal(auth[0].tenant, TENANT);
      assert.equal(auth[0].aiSystemId, aiSystem.id);
      assert.equal(auth[0].authorization, `Bearer ${token}`);
      const tmo = Number(auth[0].timeoutMs);
      assert.ok(tmo > 0 && tmo <= DEADLINE_MS, `Connect-Timeout-Ms ${auth[0].timeoutMs} within the deadline`);
      const cap = svc.calls.filter((c) => c.method === "capture" && c.billingId === tx);
      assert.equal(cap.length, 1, "one Capture");
      assert.equal(svc.holds.get(cap[0].holdId)?.tx, tx, "the hold Authorize gave for this transaction");
      assert.equal(svc.balance(RICH), 1000n * PRICE - PRICE, "charged the price once");
      assert.equal(svc.unauthenticated, 0);
      assertLogged(gw, tx, "APPROVED");
      const after = await gw.metrics();
      const lab = { tenant_id: TENANT };
      assert.equal(m0(after, "billing_authorize_total", { ...lab, result: "approved" }) -
        m0(before, "billing_authorize_total", { ...lab, result: "approved" }), 1, "billing_authorize_total{result=approved}");
      assert.equal(m0(after, "billing_authorize_duration_seconds_count", { ...lab, approved: "true" }) -
        m0(before, "billing_authorize_duration_seconds_count", { ...lab, approved: "true" }), 1, "billing_authorize_duration_seconds{approved=true}: one observation");
      await waitRecorded(gw, [tx], "CAPTURE");
      assert.equal(metric(after, "billing_circuit_state", lab), 0, "circuit closed");
      assert.equal(m0(after, "billing_timeout_total", lab), 0, "no timeout yet");
      assert.match(auth[0].traceparent ?? "", new RegExp(`^00-${traceId}-[0-9a-f]{16}-0[01]$`),
        `the caller's traceparent passed along to Authorize: ${auth[0].traceparent}`);
    });

    it("declined: DENIED, DENIAL_REASON_INSUFFICIENT_FUNDS, nothing captured", async () => {
      const before = await gw.metrics();
      const r = await buy(gw, offer, { label: "poor", ref: POOR });
      assert.ok(r.res, `answered: ${r.err?.rawMessage}`);
      assert.equal(statusName(r.res.status), "DENIED");
      assert.equal(DenialReason[r.res.denialReason], "INSUFFICIENT_FUNDS", r.res.denialDetail);
      assert.equal(r.res.items.length, 0);
      const auth = svc.calls.filter((c) => c.method === "authorize" && c.ref === POOR);
      assert.equal(auth.length, 1);
      assert.equal(svc.captures.get(auth[0].tx), undefined, "no Capture");
      assert.equal(svc.balance(POOR), 1n);
      const after = await gw.metrics();
      assert.equal(m0(after, "billing_authorize_total", { tenant_id: TENANT, result: "declined" }) -
        m0(before, "billing_authorize_total", { tenant_id: TENANT, result: "declined" }), 1);
      assert.equal(gw.hookCalls().length, 0, "a refusal is not a billing failure: the hook does not run");
    });

    it("a Capture whose answer is lost is sent again and charges once", async () => {
      svc.setMode("capture", "lost", 1);
      const tx = assertApproved(await buy(gw, offer, { label: "lost" }), "lost capture");
      approved.push(tx);
      await waitFor(`Capture of ${tx} sent again`, () => (svc.captures.get(tx) ?? 0) >= 2, 15000);
      await waitRecorded(gw, [tx], "CAPTURE");
      const n = svc.captures.get(tx);
      await sleep(500);
      assert.equal(svc.captures.get(tx), n, "no more Captures once one was answered");
      assertChargedOnce(svc, [tx], "lost capture");
      assert.deepEqual(svc.calls.filter((c) => c.method === "capture" && c.billingId === tx).map((c) => c.result).slice(0, 2),
        ["charged+lost", "already"], "the second Capture was answered already_done");
    });

    it(`billing slow (over the deadline): ${answer === "reject" ? "unavailable, the late hold released" : "DEFERRED, then reconciled once"}`, async () => {
      const before = await gw.metrics();
      const from = svc.calls.length;
      svc.setLatency("authorize", SLOW_MS);
      const r = await buy(gw, offer, { label: "slow" });
      svc.setLatency("authorize", 0);
      const call = svc.calls.slice(from).find((c) => c.method === "authorize");
      assert.ok(call, "the service was asked");
      assert.equal(call.result, "pending", "answered at the deadline, before billing answered");
      const tx = call.tx;
      const hook = gw.hookCalls().find((h) => h.id === tx);
      assert.ok(hook, `the policy hook ran for ${tx}: ${JSON.stringify(gw.hookCalls())}`);
      assert.equal(hook.reason, "timeout");
      assert.equal(hook.ref, "****" + RICH.slice(-4), "the hook sees the reference redacted");
      assert.equal(hook.amount, String(PRICE));
      if (answer === "reject") {
        const d = assertRejected(r, "slow");
        assert.equal(d.transactionId === "" || d.transactionId === tx, true, `detail transaction id ${d.transactionId}`);
        // The approval comes after the deadline: the adapter gives the hold back.
        await waitFor(`Release of the late hold of ${tx}`, () => svc.calls.some((c) => c.method === "release" && c.billingId === tx && c.result === "released"), 5000);
        assert.equal(svc.captures.get(tx), undefined, "no Capture");
        assert.equal(svc.held(RICH), 0n, "no hold left");
        assert.equal(txRecords(gw, tx).filter((x) => /APPROVED$|DEFERRED$/i.test(x.transaction.outcome)).length, 0,
          "no sale in the log");
      } else {
        const id = assertDeferred(r, "slow");
        assert.equal(id, tx, "the deferred transaction is the one billing was asked about");
        deferred.push(tx);
        assertLogged(gw, tx, "DEFERRED");
        await waitCharged(svc, [tx], "slow, reconciled");
        const auths = svc.calls.filter((c) => c.method === "authorize" && c.tx === tx);
        assert.ok(auths.length >= 2, "the reconciler authorized again");
        assert.equal(svc.held(RICH), 0n, "no hold left");
      }
      const after = await gw.metrics();
      const lab = { tenant_id: TENANT };
      assert.ok(m0(after, "billing_timeout_total", lab) - m0(before, "billing_timeout_total", lab) >= 1, "billing_timeout_total");
      assert.ok(m0(after, "billing_authorize_total", { ...lab, result: "timeout" }) -
        m0(before, "billing_authorize_total", { ...lab, result: "timeout" }) >= 1, "billing_authorize_total{result=timeout}");
      if (answer === "reject") {
        assert.equal(m0(after, "billing_timeout_total", lab) - m0(before, "billing_timeout_total", lab), 1, "one timeout");
      }
    });

    it(`billing erroring: ${answer === "reject" ? "unavailable, nothing captured" : "DEFERRED, reconciled once it answers"}`, async () => {
      const before = await gw.metrics();
      const from = svc.calls.length;
      svc.setMode("authorize", "error");
      const r = await buy(gw, offer, { label: "error" });
      const call = svc.calls.slice(from).find((c) => c.method === "authorize");
      assert.ok(call, "the service was asked");
      assert.equal(call.result, "error");
      const tx = call.tx;
      const hook = gw.hookCalls().find((h) => h.id === tx);
      assert.ok(hook, `the policy hook ran for ${tx}`);
      assert.equal(hook.reason, "error");
      if (answer === "reject") {
        svc.setMode("authorize", "ok");
        assertRejected(r, "error");
        assert.equal(svc.captures.get(tx), undefined);
      } else {
        assert.equal(assertDeferred(r, "error"), tx);
        deferred.push(tx);
        assertLogged(gw, tx, "DEFERRED");
        // The reconciler keeps trying while billing fails, and charges nothing.
        await waitFor("the reconciler retrying", () => svc.calls.filter((c) => c.method === "authorize" && c.tx === tx).length >= 2, 5000);
        assert.equal(svc.charges.get(tx), undefined);
        svc.setMode("authorize", "ok");
        await waitCharged(svc, [tx], "error, reconciled");
      }
      const after = await gw.metrics();
      assert.ok(m0(after, "billing_authorize_total", { tenant_id: TENANT, result: "unavailable" }) -
        m0(before, "billing_authorize_total", { tenant_id: TENANT, result: "unavailable" }) >= 1, "billing_authorize_total{result=unavailable}");
    });

    it(`billing down: ${answer === "reject" ? "503 unavailable with the denial as a detail" : "DEFERRED, in the log, captured once back up"}`, async () => {
      await svc.down();
      const before = await gw.metrics();
      const rs = [];
      for (let i = 0; i < 2; i++) rs.push(await buy(gw, offer, { label: `down${i}` }));
      if (answer === "reject") {
        for (const r of rs) assertRejected(r, "down");
        // The same over raw HTTP: status 503, the Connect error body with its detail.
        const body = toBinary(ExecuteTransactionRequestSchema, create(ExecuteTransactionRequestSchema, {
          aiSystem, idempotencyKey: newKey("raw"), items: [{ offerId: offer }],
        }));
        const res = await fetch(`${gw.baseUrl}/ramp.v1.ExchangeService/ExecuteTransaction`, {
          method: "POST", body, headers: { "Content-Type": "application/proto", "Connect-Protocol-Version": "1" },
        });
        assert.equal(res.status, 503);
        const j = await res.json();
        assert.equal(j.code, "unavailable");
        assert.match(j.message, /DENIAL_REASON_BILLING_UNAVAILABLE/);
        assert.equal(j.details?.length, 1, JSON.stringify(j));
        assert.equal(j.details[0].type, "ramp.v1.ExecuteTransactionResponse");
        const d = fromBinary(ExecuteTransactionResponseSchema, Buffer.from(j.details[0].value, "base64"));
        assert.equal(DenialReason[d.denialReason], "BILLING_UNAVAILABLE");
      } else {
        const txs = rs.map((r) => assertDeferred(r, "down"));
        // A retry with the same key replays the DEFERRED answer; nothing more is owed.
        const again = await buy(gw, offer, { key: rs[0].key });
        assert.deepEqual(again.res, rs[0].res, "the same answer again");
        for (const tx of txs) assertLogged(gw, tx, "DEFERRED");
        deferred.push(...txs);
        const hooks = gw.hookCalls().filter((h) => txs.includes(h.id));
        assert.equal(hooks.length, 2, "the hook ran for each");
        assert.ok(hooks.every((h) => ["error", "circuit_open"].includes(h.reason)), JSON.stringify(hooks));
        // failing_ms: how long billing has been failing, growing.
        const f = hooks.map((h) => Number(h.failing_ms));
        assert.ok(f.every((x) => Number.isFinite(x) && x >= 0), `failing_ms ${hooks.map((h) => h.failing_ms)}`);
        assert.ok(f[1] >= f[0], `failing_ms grows while billing stays down: ${f}`);
      }
      const after = await gw.metrics();
      assert.ok(m0(after, "billing_authorize_total", { tenant_id: TENANT, result: "unavailable" }) -
        m0(before, "billing_authorize_total", { tenant_id: TENANT, result: "unavailable" }) >= 2, "counted unavailable");
      assert.equal(svc.totals().charged_twice, 0);
    });

    it("billing back up: the next purchase is APPROVED and every deferred one charged exactly once", async () => {
      await svc.up();
      svc.reset();
      if (answer === "deferred") await waitCharged(svc, deferred, "back up", 20000);
      // The circuit may have opened while billing was down: it closes after a probe.
      let tx;
      await waitFor("an APPROVED purchase", async () => {
        const r = await buy(gw, offer, { label: "up" });
        if (r.res && statusName(r.res.status) === "APPROVED") { tx = r.res.transactionId; return true; }
        if (r.res && statusName(r.res.status) === "DEFERRED") deferred.push(r.res.transactionId);
        return false;
      }, 8000, 300);
      approved.push(tx);
      await waitCharged(svc, [tx], "back up");
      const after = await gw.metrics();
      assert.equal(metric(after, "billing_circuit_state", { tenant_id: TENANT }), 0, "circuit closed");
      // Settle: every sale charged once, nothing else charged, no hold left behind.
      if (answer === "deferred") await waitCharged(svc, deferred, "all deferred");
      await sleep(300);
      assertChargedOnce(svc, [...approved, ...deferred], "all");
      assert.equal(svc.charges.size, approved.length + deferred.length, "no charge for a rejected purchase");
      assert.equal(svc.balance(RICH), 1000n * PRICE - BigInt(approved.length + deferred.length) * PRICE);
      assert.equal(svc.held(RICH), 0n, "no hold left behind");
      assert.equal(svc.unauthenticated, 0);
      for (const tx of deferred) assertLogged(gw, tx, "DEFERRED");
      await waitRecorded(gw, [...approved, ...deferred], "CAPTURE");
      // The Health probe reaches the service, with the token, for the tenant.
      assert.ok(svc.calls.some((c) => c.method === "health" && c.tenant === TENANT && c.result === "serving"), "Health probed");
      await waitFor("billing_health_up 1", async () => metric(await gw.metrics(), "billing_health_up", { tenant_id: TENANT }) === 1, 3000, 100);
      const m = await gw.metrics();
      const lab = { tenant_id: TENANT };
      assert.equal(m0(m, "billing_deferred_total", { ...lab, result: "deferred" }), deferred.length, "billing_deferred_total{result=deferred}");
      assert.equal(m0(m, "billing_deferred_total", { ...lab, result: "captured" }), deferred.length, "billing_deferred_total{result=captured}");
      assert.equal(m0(m, "billing_deferred_outstanding", lab), 0, "nothing outstanding");
      assert.equal(m0(m, "billing_owed_charges", lab), 0, "nothing owed");
      const check = spawnSync("promtool", ["check", "metrics"], { input: m.text, encoding: "utf8" });
      assert.equal(check.status, 0, `promtool check metrics: ${check.stdout}${check.stderr}`);
      // Secrets: neither the bearer token nor a full billing reference reaches the gateway's log.
      const log = gw.log();
      assert.ok(!log.includes(token), "the billing token is not logged");
      assert.ok(!log.includes(RICH) && !log.includes(POOR), "billing references are logged redacted only");
    });

    if (answer === "deferred") {
      it("a deferred charge that billing finally refuses: logged REFUSED, counted, on_settle_failure told, never charged", async () => {
        await svc.down();
        const tx = assertDeferred(await buy(gw, offer, { label: "refused", ref: POOR }), "deferred, poor account");
        await svc.up();
        await waitRecorded(gw, [tx], "REFUSED");
        assert.ok(svc.calls.some((c) => c.method === "authorize" && c.tx === tx && c.result === "declined"), "billing declined it");
        assert.equal(svc.captures.get(tx), undefined, "no Capture");
        assert.equal(changes(gw, tx, "CAPTURE").length, 0);
        await waitFor("on_settle_failure", () => gw.log().includes(`settle-failure id=${tx} reason=billing_refused`), 5000, 100);
        const m = await gw.metrics();
        assert.equal(m0(m, "billing_deferred_total", { tenant_id: TENANT, result: "refused" }), 1, "billing_deferred_total{result=refused}");
        assert.equal(m0(m, "billing_deferred_outstanding", { tenant_id: TENANT }), 0);
        // Not retried any more.
        const n = svc.authorizes.get(tx);
        await sleep(700);
        assert.equal(svc.authorizes.get(tx), n, "no Authorize after the refusal");
      });
    }
  });
}

describe("billing: the deferred cap", () => {
  const token = "billing-token-cap";
  let svc, gw, offer;
  before(async () => {
    svc = await startBillingService({ token, balances: { [RICH]: 1000n * PRICE } });
    // Two purchases fit under the cap, the third does not.
    gw = await makeGateway({ billingUrl: svc.url, billingToken: token, answer: "deferred", billing: { deferred_cap: 250000 } });
    await gw.start();
    offer = await offerFor(gw, "/articles/cap");
  });
  after(async () => {
    if (gw) { await gw.stop(); gw.cleanup(); }
    if (svc) await svc.stop();
  });

  it("money outstanding beyond deferred_cap is rejected; once reconciled, deferring resumes", async () => {
    await svc.down();
    const a = assertDeferred(await buy(gw, offer, { label: "cap1" }), "first under the cap");
    const b = assertDeferred(await buy(gw, offer, { label: "cap2" }), "second under the cap");
    assertRejected(await buy(gw, offer, { label: "cap3" }), "over the cap");
    let m = await gw.metrics();
    assert.equal(m0(m, "billing_deferred_total", { tenant_id: TENANT, result: "over_cap" }), 1, "billing_deferred_total{result=over_cap}");
    assert.equal(m0(m, "billing_deferred_outstanding", { tenant_id: TENANT }), 2 * Number(PRICE), "billing_deferred_outstanding");
    const hooks = gw.hookCalls();
    assert.equal(hooks.length, 3, "the policy said deferred three times");
    await svc.up();
    await waitCharged(svc, [a, b], "cap");
    // Nothing outstanding any more: a failing billing defers again.
    svc.setMode("authorize", "error");
    const c = assertDeferred(await buy(gw, offer, { label: "cap4" }), "under the cap again");
    svc.setMode("authorize", "ok");
    await waitCharged(svc, [a, b, c], "cap");
    assert.equal(svc.charges.size, 3);
    await waitRecorded(gw, [a, b, c], "CAPTURE");
    m = await gw.metrics();
    assert.equal(m0(m, "billing_deferred_outstanding", { tenant_id: TENANT }), 0, "nothing outstanding");
  });
});

describe("billing: the circuit breaker", () => {
  const token = "billing-token-breaker";
  const N = 3, COOLDOWN = 2500;
  let svc, gw, offer;
  before(async () => {
    svc = await startBillingService({ token, balances: { [RICH]: 1000n * PRICE } });
    gw = await makeGateway({
      billingUrl: svc.url, billingToken: token, answer: "reject",
      billing: { breaker_failures: N, breaker_cooldown_ms: COOLDOWN, health_interval_ms: 60000 },
    });
    await gw.start();
    offer = await offerFor(gw, "/articles/breaker");
  });
  after(async () => {
    if (gw) { await gw.stop(); gw.cleanup(); }
    if (svc) await svc.stop();
  });

  it(`opens after ${N} failures, fails fast during the cool-down, then lets one probe through`, async () => {
    svc.setMode("authorize", "error");
    const a0 = svc.count("authorize");
    for (let i = 0; i < N; i++) assertRejected(await buy(gw, offer, { label: `fail${i}` }), `failure ${i + 1}`);
    assert.equal(svc.count("authorize") - a0, N, "each failure reached the service");
    let m = await gw.metrics();
    assert.equal(metric(m, "billing_circuit_state", { tenant_id: TENANT }), 1, "open");
    const openedAt = Date.now();
    // Open: refused without asking billing.
    for (let i = 0; i < 3; i++) assertRejected(await buy(gw, offer, { label: `fast${i}` }), `open ${i + 1}`);
    assert.ok(Date.now() - openedAt < COOLDOWN, "the fast failures came within the cool-down (machine too slow otherwise)");
    assert.equal(svc.count("authorize") - a0, N, "no Authorize while open");
    const reasons = gw.hookCalls().slice(-3).map((h) => h.reason);
    assert.deepEqual(reasons, ["circuit_open", "circuit_open", "circuit_open"], "the hook is told why");
    // After the cool-down one probe goes out; it fails: open again, no further call.
    await sleep(COOLDOWN - (Date.now() - openedAt) + 200);
    assertRejected(await buy(gw, offer, { label: "probe1" }), "failed probe");
    assert.equal(svc.count("authorize") - a0, N + 1, "exactly one probe");
    assertRejected(await buy(gw, offer, { label: "after-probe" }), "open again");
    assert.equal(svc.count("authorize") - a0, N + 1, "no Authorize after the failed probe");
    m = await gw.metrics();
    assert.equal(metric(m, "billing_circuit_state", { tenant_id: TENANT }), 1, "open again");
    // Billing recovers: after the cool-down the probe succeeds and the circuit closes.
    svc.setMode("authorize", "ok");
    await sleep(COOLDOWN + 200);
    const tx = assertApproved(await buy(gw, offer, { label: "probe2" }), "successful probe");
    assert.equal(svc.count("authorize") - a0, N + 2);
    await waitCharged(svc, [tx], "after the breaker");
    m = await gw.metrics();
    assert.equal(metric(m, "billing_circuit_state", { tenant_id: TENANT }), 0, "closed");
    assert.equal(svc.charges.size, 1, "only the approved purchase was charged");
  });
});

describe("billing: kill -9 during reconciliation", () => {
  const token = "billing-token-crash";
  const COUNT = 16;
  let svc, gw, offer;
  before(async () => {
    svc = await startBillingService({ token, balances: { [RICH]: 1000n * PRICE } });
    gw = await makeGateway({ billingUrl: svc.url, billingToken: token, answer: "deferred" });
    await gw.start();
    offer = await offerFor(gw, "/articles/crash");
  });
  after(async () => {
    if (gw) { await gw.stop(); gw.cleanup(); }
    if (svc) await svc.stop();
  });

  it("every deferred transaction is captured exactly once across the crash and restart", async () => {
    await svc.down();
    const rs = await Promise.all(Array.from({ length: COUNT }, (_, i) => buy(gw, offer, { label: `crash${i}` })));
    const txs = rs.map((r, i) => assertDeferred(r, `deferred ${i}`));
    assert.equal(new Set(txs).size, COUNT);
    // Back up, slowly: captures take a while, and some of their answers are lost, so the
    // gateway dies with captures in flight, charged or not.
    svc.setLatency("capture", 150);
    svc.setMode("capture", "lost");
    await svc.up();
    await waitFor("reconciliation under way", () => svc.count("capture") >= 3, 15000, 20);
    // Purchases approved now: their captures (answers lost) are still owed at the kill.
    for (let i = 0; i < 3; i++) txs.push(assertApproved(await buy(gw, offer, { label: `crash-approved${i}` }), "approved"));
    svc.setMode("capture", "ok");
    // The captures whose success the gateway heard before it died.
    const acked = new Set(svc.calls.filter((c) => c.method === "capture" && ["charged", "already"].includes(c.result)).map((c) => c.billingId));
    const r = await gw.kill9();
    assert.equal(r.signal, "SIGKILL");
    await sleep(300); // captures in flight finish on the service's side
    assert.ok(acked.size < COUNT, `killed mid-way: ${acked.size} of ${COUNT} captures acknowledged (${svc.charges.size} charged)`);
    svc.setLatency("capture", 0);
    await gw.start();
    await waitCharged(svc, txs, "after the restart", 30000);
    await sleep(500);
    assertChargedOnce(svc, txs, "after the restart");
    assert.equal(svc.charges.size, txs.length, "nothing else charged");
    assert.equal(svc.balance(RICH), 1000n * PRICE - BigInt(txs.length) * PRICE);
    const repeats = [...svc.captures.values()].filter((n) => n > 1).length;
    assert.ok(repeats >= 1, "some captures were sent again (their answers were lost): the service charged once");
    for (const tx of txs.slice(0, COUNT)) assertLogged(gw, tx, "DEFERRED");
    for (const tx of txs.slice(COUNT)) assertLogged(gw, tx, "APPROVED");
    await waitRecorded(gw, txs, "CAPTURE");
  });
});

for (const answer of ["reject", "deferred"]) {
  describe(`billing: readiness from the Health probe, policy answers "${answer}"`, () => {
    const token = `billing-token-ready-${answer}`;
    let svc, gw;
    before(async () => {
      svc = await startBillingService({ token, balances: { [RICH]: 1000n * PRICE } });
      gw = await makeGateway({ billingUrl: svc.url, billingToken: token, answer, billing: { health_interval_ms: 100 } });
      await gw.start();
    });
    after(async () => {
      if (gw) { await gw.stop(); gw.cleanup(); }
      if (svc) await svc.stop();
    });
    const readyz = async () => {
      const res = await fetch(`${gw.baseUrl}/readyz`);
      return { status: res.status, body: await res.json() };
    };

    it(answer === "reject"
      ? "10 failed Health checks in a row make /readyz 503 for a rejecting tenant; a good one makes it ready again"
      : "failed Health checks leave /readyz 200 for a deferring tenant (it still sells)", async () => {
      await waitFor("billing in /readyz", async () => (await readyz()).body.billing?.[0]?.serving === true, 5000, 100);
      let r = await readyz();
      assert.equal(r.status, 200, JSON.stringify(r.body));
      assert.equal(r.body.billing[0].tenant, TENANT);
      svc.setMode("health", "error");
      await waitFor("10 failed Health checks", async () => (await readyz()).body.billing?.[0]?.consecutive_failures >= 10, 10000, 100);
      r = await readyz();
      assert.equal(r.body.billing[0].serving, false, JSON.stringify(r.body));
      if (answer === "reject") {
        assert.equal(r.status, 503, JSON.stringify(r.body));
        assert.match(JSON.stringify(r.body), /consecutive health checks failed/);
      } else {
        assert.equal(r.status, 200, `a deferring tenant keeps the instance ready: ${JSON.stringify(r.body)}`);
      }
      svc.setMode("health", "ok");
      await waitFor("ready again, billing serving", async () => {
        const x = await readyz();
        return x.status === 200 && x.body.billing?.[0]?.serving === true;
      }, 5000, 100);
      r = await readyz();
      assert.equal(r.body.billing[0].serving, true);
      assert.equal(r.body.billing[0].consecutive_failures, 0);
      const m = await gw.metrics();
      assert.equal(metric(m, "billing_health_up", { tenant_id: TENANT }), 1);
    });
  });
}
