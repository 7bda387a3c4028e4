// A test double of a publisher's billing system: the BillingService of
// proto/billing/v1/billing.proto, which the gateway's remote billing adapter
// (billing type "connect", core/billing/connect.c) calls. It is not part of
// the gateway; it stands for the customer's system in the interop tests
// (billing.test.js) and the benchmark (spec/bench/billing.sh).
//
// Served by @connectrpc/connect-node (http.createServer + connectNodeAdapter,
// HTTP/1.1) with the code protoc-gen-es generates into ../gen (run-suite.sh).
// Accounts hold integer balances (BigInt). Authorize is idempotent by
// transaction_id (the same hold again; a new one once that hold was released),
// Capture by billing_id (charges once, already_done on repeats), Release by
// hold. An unknown account or too little money is approved=false. The Connect-Timeout-Ms
// header is recorded but not obeyed: a slow answer comes late, as from a
// system that does not honour deadlines, so the gateway's own deadline is
// what is tested.
//
// Injectable from the test process: a latency per method (ms) and a mode per
// method (setMode(method, mode, times): for ever, or the next times calls): "ok"; "error" (Connect error unavailable, nothing done); "refuse"
// (Authorize approved=false, Capture/Release ok=false, Health serving=false);
// "lost" (the work is done, then the answer is an unavailable error: a reply
// lost on the way back). And down()/up(): the listener closes (every open
// connection dropped, the port held bound without listening by a helper
// process, so connections are refused and nobody else takes it) and comes
// back on the same port.
//
// Counters for the tests: calls (each with its request fields, headers and result), counts per
// method, authorizes/captures/releases per id, charges per billing_id (never above 1), TCP
// connections.
//
// Standalone: node lib/billing_service.js --port N --token-file F [--balance ref=amount ...]
//   [--latency method=ms]
//   prints "billing service listening on http://127.0.0.1:PORT"; SIGUSR1 goes down, SIGUSR2
//   comes back up ("down"/"up" once done); SIGHUP prints one line "BILLINGJSON {...}" with the
//   counters (totals()), SIGTERM/SIGINT too, then exits.
import { createServer } from "node:http";
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { resolve } from "node:path";
import { ConnectError, Code } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { BillingService } from "../gen/billing/v1/billing_pb.js";

const METHODS = ["authorize", "capture", "release", "health"];
const sleep = (ms) => new Promise((ok) => setTimeout(ok, ms));

// Holds the TCP port bound without listening (connections to it are refused) in a small
// python3 process until release() is called.
async function holdPort(host, port) {
  const code = "import socket,sys\n" +
    "s=socket.socket(socket.AF_INET,socket.SOCK_STREAM)\n" +
    "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n" +
    `s.bind((${JSON.stringify(host)},${port}))\n` +
    "print('held',flush=True)\n" +
    "sys.stdin.read()\n";
  const child = spawn("python3", ["-c", code], { stdio: ["pipe", "pipe", "pipe"] });
  let err = "";
  child.stderr.on("data", (d) => { err += d; });
  const exited = new Promise((ok) => child.once("exit", ok));
  await new Promise((ok, fail) => {
    child.stdout.once("data", () => ok());
    child.once("error", fail);
    exited.then((c) => fail(new Error(`cannot hold port ${port} (exit ${c}): ${err}`)));
  });
  return {
    async release() {
      child.stdin.end();
      await exited;
    },
  };
}

// Starts the service. token: the bearer token it wants (null: none checked).
// balances: { ref: amount } (number, string or bigint); an unknown account is refused.
// keepCalls false keeps the counters but not the call list (long benchmark runs).
export async function startBillingService({ host = "127.0.0.1", port = 0, token = null, balances = {}, keepCalls = true } = {}) {
  const accounts = new Map(); // ref -> { balance: bigint, held: bigint }
  for (const [ref, amt] of Object.entries(balances)) accounts.set(ref, { balance: BigInt(amt), held: 0n });
  const holds = new Map(); // hold id -> { id, tx, ref, currency, amount, state: held|captured|released }
  const holdByTx = new Map(); // transaction_id -> hold id
  let holdSeq = 0;
  const latency = Object.fromEntries(METHODS.map((m) => [m, 0]));
  const mode = Object.fromEntries(METHODS.map((m) => [m, "ok"]));
  const modeLeft = Object.fromEntries(METHODS.map((m) => [m, 0])); // calls left in mode; 0: for ever

  const svc = {
    host,
    port: 0,
    url: "",
    // Every call as it arrived: { method, at (ms), ... request fields, headers, result }.
    calls: [],
    counts: Object.fromEntries(METHODS.map((m) => [m, 0])), // calls per method
    authorizes: new Map(), // transaction_id -> Authorize calls (incl. errors and refusals)
    captures: new Map(), // billing_id -> Capture calls that reached the handler
    charges: new Map(), // billing_id -> distinct charges (must never exceed 1)
    releases: new Map(), // billing_id -> Release calls
    holds,
    unauthenticated: 0,
    connections: 0, // TCP connections accepted (the gateway's client pools them)
    isDown: false,
    setLatency(method, ms) { for (const m of pick(method)) latency[m] = ms; },
    // times: only for the next times calls of the method, then "ok" again.
    setMode(method, m, times = 0) {
      if (!["ok", "error", "refuse", "lost"].includes(m)) throw new Error(`mode ${m}`);
      for (const x of pick(method)) { mode[x] = m; modeLeft[x] = times; }
    },
    reset() { // behaviour only; counters stay
      for (const m of METHODS) { latency[m] = 0; mode[m] = "ok"; modeLeft[m] = 0; }
    },
    setBalance(ref, amount) { accounts.set(ref, { balance: BigInt(amount), held: 0n }); },
    balance(ref) { return accounts.get(ref)?.balance; },
    held(ref) { return accounts.get(ref)?.held; },
    count(method) { return svc.counts[method]; },
    totals() {
      let charges = 0, chargedTwice = 0;
      for (const n of svc.charges.values()) { charges += n; if (n > 1) chargedTwice++; }
      return {
        authorize: svc.count("authorize"), capture: svc.count("capture"), release: svc.count("release"),
        health: svc.count("health"), charged_ids: svc.charges.size, charges, charged_twice: chargedTwice,
        unauthenticated: svc.unauthenticated, connections: svc.connections,
      };
    },
    down, up, stop,
  };

  function pick(method) {
    if (method === "*") return METHODS;
    if (!METHODS.includes(method)) throw new Error(`method ${method}`);
    return [method];
  }
  function bump(map, key) { map.set(key, (map.get(key) ?? 0) + 1); }

  // The token, the mode as the call arrives, the latency; "error" then fails before any work.
  async function enter(method, ctx, fields) {
    const call = {
      method, at: Date.now(), ...fields,
      authorization: ctx.requestHeader.get("authorization"),
      timeoutMs: ctx.requestHeader.get("connect-timeout-ms"),
      traceparent: ctx.requestHeader.get("traceparent"),
      result: "pending",
    };
    svc.counts[method]++;
    if (keepCalls) svc.calls.push(call);
    if (token !== null && call.authorization !== `Bearer ${token}`) {
      svc.unauthenticated++;
      call.result = "unauthenticated";
      throw new ConnectError("bad bearer token", Code.Unauthenticated);
    }
    const m = mode[method];
    if (modeLeft[method] > 0 && --modeLeft[method] === 0) mode[method] = "ok";
    if (latency[method] > 0) await sleep(latency[method]);
    if (m === "error") {
      call.result = "error";
      throw new ConnectError("billing test double: injected failure", Code.Unavailable);
    }
    return { call, m };
  }
  function leave(call, m, result, answer) {
    call.result = result;
    if (m === "lost") {
      call.result = result + "+lost";
      throw new ConnectError("billing test double: answer lost", Code.Unavailable);
    }
    return answer;
  }

  const impl = {
    async authorize(req, ctx) {
      bump(svc.authorizes, req.transactionId);
      const { call, m } = await enter("authorize", ctx, {
        tx: req.transactionId, ref: req.billingReference, amount: req.amount, currency: req.currency,
        tenant: req.tenant, aiSystemId: req.aiSystemId,
      });
      if (m === "refuse") {
        return leave(call, m, "refused", { approved: false, available: -1n, declineReason: "refused by the test" });
      }
      // The same hold again; once that hold was released (e.g. a late approval the gateway
      // gave back), a new Authorize of the transaction holds anew.
      const again = holdByTx.get(req.transactionId);
      if (again !== undefined && holds.get(again).state !== "released") {
        return leave(call, m, "approved-again", { approved: true, holdId: again });
      }
      const acct = accounts.get(req.billingReference);
      if (acct === undefined) {
        return leave(call, m, "declined", { approved: false, available: -1n, declineReason: "unknown account" });
      }
      const avail = acct.balance - acct.held;
      if (req.amount < 0n || req.amount > avail) {
        return leave(call, m, "declined", { approved: false, available: avail, declineReason: "insufficient funds" });
      }
      const id = `hold-${++holdSeq}`;
      holds.set(id, { id, tx: req.transactionId, ref: req.billingReference, currency: req.currency, amount: req.amount, state: "held" });
      holdByTx.set(req.transactionId, id);
      acct.held += req.amount;
      return leave(call, m, "approved", { approved: true, holdId: id });
    },
    async capture(req, ctx) {
      bump(svc.captures, req.billingId);
      const { call, m } = await enter("capture", ctx, { holdId: req.holdId, billingId: req.billingId, amount: req.amount });
      if (m === "refuse") return leave(call, m, "refused", { ok: false });
      if (svc.charges.has(req.billingId)) return leave(call, m, "already", { ok: true, alreadyDone: true });
      const h = holds.get(req.holdId);
      if (h === undefined || h.state !== "held") return leave(call, m, "unknown-hold", { ok: false });
      const amount = req.amount > 0n && req.amount <= h.amount ? req.amount : h.amount;
      const acct = accounts.get(h.ref);
      acct.held -= h.amount;
      acct.balance -= amount;
      h.state = "captured";
      h.charged = amount;
      h.billingId = req.billingId;
      bump(svc.charges, req.billingId);
      return leave(call, m, "charged", { ok: true, alreadyDone: false });
    },
    async release(req, ctx) {
      bump(svc.releases, req.billingId);
      const { call, m } = await enter("release", ctx, { holdId: req.holdId, billingId: req.billingId, amount: req.amount });
      if (m === "refuse") return leave(call, m, "refused", { ok: false });
      const h = holds.get(req.holdId);
      if (h === undefined) return leave(call, m, "unknown-hold", { ok: false });
      if (h.state !== "held") return leave(call, m, "already", { ok: true, alreadyDone: true });
      accounts.get(h.ref).held -= h.amount;
      h.state = "released";
      return leave(call, m, "released", { ok: true, alreadyDone: false });
    },
    async health(req, ctx) {
      const { call, m } = await enter("health", ctx, { tenant: req.tenant });
      return leave(call, m, m === "refuse" ? "not-serving" : "serving", { serving: m !== "refuse" });
    },
  };

  const handler = connectNodeAdapter({ routes: (router) => router.service(BillingService, impl) });
  let server = null;
  let holder = null;

  function listen(p) {
    return new Promise((ok, fail) => {
      const s = createServer(handler);
      s.keepAliveTimeout = 60000;
      s.on("connection", () => { svc.connections++; });
      s.once("error", fail);
      s.listen(p, host, () => { s.off("error", fail); ok(s); });
    });
  }
  async function down() {
    if (svc.isDown) return;
    svc.isDown = true;
    const s = server;
    server = null;
    await new Promise((ok) => { s.close(() => ok()); s.closeAllConnections(); });
    holder = await holdPort(host, svc.port);
  }
  async function up() {
    if (!svc.isDown) return;
    await holder.release();
    holder = null;
    server = await listen(svc.port);
    svc.isDown = false;
  }
  async function stop() {
    if (holder) { await holder.release(); holder = null; }
    if (server) {
      const s = server;
      server = null;
      await new Promise((ok) => { s.close(() => ok()); s.closeAllConnections(); });
    }
  }

  server = await listen(port);
  svc.port = server.address().port;
  svc.url = `http://${host}:${svc.port}`;
  return svc;
}

// Standalone, for the benchmark and manual runs.
const pending = [];
async function main(argv) {
  let port = 0, tokenFile = null, host = "127.0.0.1";
  const balances = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--port") port = Number(argv[++i]);
    else if (a === "--host") host = argv[++i];
    else if (a === "--token-file") tokenFile = argv[++i];
    else if (a === "--balance") {
      const [ref, amt] = String(argv[++i]).split("=");
      balances[ref] = BigInt(amt);
    } else if (a === "--latency") { // method=ms
      const [m, ms] = String(argv[++i]).split("=");
      pending.push((s) => s.setLatency(m, Number(ms)));
    } else {
      process.stderr.write("usage: node lib/billing_service.js --port N --token-file F [--balance ref=amount ...] [--latency method=ms]\n");
      process.exit(2);
    }
  }
  const token = tokenFile ? readFileSync(tokenFile, "utf8").trim() : null;
  const svc = await startBillingService({ host, port, token, balances, keepCalls: false });
  for (const f of pending) f(svc);
  process.on("SIGUSR1", () => { svc.down().then(() => process.stdout.write("down\n")); });
  process.on("SIGUSR2", () => { svc.up().then(() => process.stdout.write("up\n")); });
  process.on("SIGHUP", () => { process.stdout.write(`BILLINGJSON ${JSON.stringify(svc.totals())}\n`); });
  const quit = async () => {
    await svc.stop();
    process.stdout.write(`BILLINGJSON ${JSON.stringify(svc.totals())}\n`);
    process.exit(0);
  };
  process.on("SIGTERM", quit);
  process.on("SIGINT", quit);
  process.stdout.write(`billing service listening on ${svc.url}\n`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).catch((e) => { process.stderr.write(`billing service: ${e.stack || e}\n`); process.exit(1); });
}
