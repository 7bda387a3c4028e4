// The real x402 and t402 facilitators behind an HTTP server on loopback, for the
// interop suite: x402Facilitator (@x402/core) with the "exact" EVM scheme of
// @x402/evm (version 2 for the chain's CAIP-2 network, version 1 for the named
// networks), and t402Facilitator (@t402/core) with @t402/evm's. A request body that
// carries t402Version goes to the t402 facilitator, any other to the x402 one (which
// routes v1/v2 by the payload's x402Version). The signer is an anvil account through viem.
//
//   POST /verify    {x402Version | t402Version, paymentPayload, paymentRequirements}
//                   -> {isValid, invalidReason?, payer?}
//   POST /settle    same body -> {success, transaction, network, payer?, errorReason?}
//   GET  /supported -> {kinds: [...], extensions: [], signers: {...}}: the x402 kinds
//                      (v2 for eip155:N, v1 for the named networks); ?protocol=t402 the t402 ones
//
// Test knobs: settleDelayMs holds each settle that long before it runs, and a settle
// whose client hung up meanwhile is abandoned (never reaches the chain), as a gateway
// killed mid-request leaves it (abandonOnHangup = false: it settles all the same); `behavior` makes the server misbehave on demand
// ("redirect": 308 to itself, "garbage": 200 with a non-JSON body, "error": 500).
// `events` records every request with its outcome.
//
// Standalone: node lib/facilitator.js --rpc URL [--port N] [--key 0x..] [--settle-delay-ms N]
import { createServer } from "node:http";
import { pathToFileURL } from "node:url";
import { createPublicClient, http } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { x402Facilitator } from "@x402/core/facilitator";
import { registerExactEvmScheme as registerX402 } from "@x402/evm/exact/facilitator";
import { toFacilitatorEvmSigner } from "@x402/evm";
import { t402Facilitator } from "@t402/core/facilitator";
import { registerExactEvmScheme as registerT402 } from "@t402/evm/exact/facilitator";
import { anvilKey, ROLES, viemChain, walletFor } from "./chain.js";

const MAX_BODY = 1 << 20;

function readBody(req) {
  return new Promise((ok, fail) => {
    const parts = [];
    let n = 0;
    req.on("data", (d) => {
      n += d.length;
      if (n > MAX_BODY) { fail(new Error("body too large")); req.destroy(); return; }
      parts.push(d);
    });
    req.on("end", () => ok(Buffer.concat(parts).toString("utf8")));
    req.on("error", fail);
  });
}

function send(res, status, obj) {
  const body = JSON.stringify(obj, (_, v) => (typeof v === "bigint" ? v.toString() : v));
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

/**
 * Starts a facilitator. Options: rpc (required), chainId (read from the node when absent),
 * key (default: anvil account ROLES.facilitator), port (default: a free one),
 * settleDelayMs (0). Resolves { url, port, address, events, counts(), behavior, settleDelayMs,
 * stop() } ; `behavior` and `settleDelayMs` may be changed while it runs.
 */
export async function startFacilitator({ rpc, chainId, key, port = 0, settleDelayMs = 0 } = {}) {
  if (!rpc) throw new Error("startFacilitator: rpc is required");
  if (chainId === undefined) {
    chainId = await createPublicClient({ transport: http(rpc) }).getChainId();
  }
  key ??= anvilKey(ROLES.facilitator);
  const chain = viemChain(chainId, rpc);
  const wallet = walletFor(chain, key);
  const address = privateKeyToAccount(key).address;
  const network = `eip155:${chainId}`;

  const x402Signer = toFacilitatorEvmSigner({
    address,
    readContract: (a) => wallet.readContract(a),
    verifyTypedData: (a) => wallet.verifyTypedData(a),
    writeContract: (a) => wallet.writeContract(a),
    sendTransaction: (a) => wallet.sendTransaction(a),
    waitForTransactionReceipt: (a) => wallet.waitForTransactionReceipt(a),
    getCode: (a) => wallet.getCode(a),
  });
  const x402 = registerX402(new x402Facilitator(), { signer: x402Signer, networks: [network] });
  const t402Signer = {
    getAddresses: () => [address],
    readContract: (a) => wallet.readContract(a),
    verifyTypedData: (a) => wallet.verifyTypedData(a),
    writeContract: (a) => wallet.writeContract(a),
    sendTransaction: (a) => wallet.sendTransaction(a),
    waitForTransactionReceipt: (a) => wallet.waitForTransactionReceipt(a),
    getCode: (a) => wallet.getCode(a),
  };
  const t402 = registerT402(new t402Facilitator(), { signer: t402Signer, networks: [network] });

  const events = [];
  const state = { behavior: null, settleDelayMs, abandonOnHangup: true };

  // The x402 clients validate every kind and refuse one without x402Version, so the
  // t402 kinds (same schemes and networks, t402Version instead) are listed apart.
  const supported = (protocol) => (protocol === "t402" ? t402 : x402).getSupported();

  async function handle(req, res) {
    const t0 = Date.now();
    const ev = { at: t0, method: req.method, path: req.url, protocol: null, version: null, status: 0, result: null };
    events.push(ev);
    const path = new URL(req.url, "http://x").pathname;
    if (state.behavior === "redirect") {
      ev.status = 308;
      res.writeHead(308, { location: `http://127.0.0.1:${srv.address().port}${req.url}`, "content-length": 0 });
      res.end();
      return;
    }
    if (state.behavior === "garbage") {
      ev.status = 200;
      res.writeHead(200, { "content-type": "application/json" });
      res.end("<html>not json</html>");
      return;
    }
    if (state.behavior === "error") {
      ev.status = 500;
      send(res, 500, { error: "facilitator failing on purpose" });
      return;
    }
    if (req.method === "GET" && path === "/supported") {
      ev.status = 200;
      send(res, 200, supported(new URL(req.url, "http://x").searchParams.get("protocol")));
      return;
    }
    if (req.method !== "POST" || (path !== "/verify" && path !== "/settle")) {
      ev.status = 404;
      send(res, 404, { error: "not found" });
      return;
    }
    let body;
    try {
      body = JSON.parse(await readBody(req));
    } catch (e) {
      ev.status = 400;
      send(res, 400, { error: `bad request body: ${e.message}` });
      return;
    }
    const { paymentPayload, paymentRequirements } = body ?? {};
    if (!paymentPayload || typeof paymentPayload !== "object" || !paymentRequirements || typeof paymentRequirements !== "object") {
      ev.status = 400;
      send(res, 400, { error: "paymentPayload and paymentRequirements are required" });
      return;
    }
    const isT402 = body.t402Version !== undefined;
    ev.protocol = isT402 ? "t402" : "x402";
    ev.version = isT402 ? body.t402Version : body.x402Version;
    ev.body = body;
    const f = isT402 ? t402 : x402;
    try {
      if (path === "/verify") {
        ev.result = await f.verify(paymentPayload, paymentRequirements);
      } else {
        if (state.settleDelayMs > 0) {
          let gone = false;
          const onClose = () => { gone = !res.writableFinished; };
          res.once("close", onClose);
          await new Promise((ok) => setTimeout(ok, state.settleDelayMs));
          res.off("close", onClose);
          if (state.abandonOnHangup && (gone || req.socket.destroyed)) {
            ev.status = -1;
            ev.result = { abandoned: true };
            return; // the client hung up: nothing reaches the chain
          }
        }
        ev.result = await f.settle(paymentPayload, paymentRequirements);
      }
      ev.status = 200;
      send(res, 200, ev.result);
    } catch (e) {
      ev.status = 500;
      ev.result = { error: e instanceof Error ? e.message : String(e) };
      send(res, 500, ev.result);
    } finally {
      ev.ms = Date.now() - t0;
    }
  }

  const srv = createServer((req, res) => {
    handle(req, res).catch((e) => {
      try { send(res, 500, { error: String(e) }); } catch { /* closed */ }
    });
  });
  srv.keepAliveTimeout = 5000;
  await new Promise((ok, fail) => {
    srv.once("error", fail);
    srv.listen(port, "127.0.0.1", ok);
  });
  const boundPort = srv.address().port;
  const f = {
    url: `http://127.0.0.1:${boundPort}`,
    port: boundPort,
    address,
    network,
    events,
    get behavior() { return state.behavior; },
    set behavior(v) { state.behavior = v; },
    get settleDelayMs() { return state.settleDelayMs; },
    set settleDelayMs(v) { state.settleDelayMs = v; },
    // false: a held settle runs even when its client hung up (the gateway never hears of it).
    get abandonOnHangup() { return state.abandonOnHangup; },
    set abandonOnHangup(v) { state.abandonOnHangup = v; },
    // Requests per path ("/verify", "/settle", "/supported"), and settles that ran.
    counts() {
      const c = { verify: 0, settle: 0, supported: 0, settled: 0, abandoned: 0 };
      for (const e of events) {
        const p = new URL(e.path, "http://x").pathname.slice(1);
        if (p in c) c[p]++;
        if (p === "settle" && e.result?.success === true) c.settled++;
        if (e.result?.abandoned) c.abandoned++;
      }
      return c;
    },
    async stop() {
      srv.closeAllConnections?.();
      await new Promise((ok) => srv.close(() => ok()));
    },
  };
  return f;
}

async function main(argv) {
  const opt = (name) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : undefined; };
  const rpc = opt("--rpc");
  if (!rpc) {
    console.error("usage: node lib/facilitator.js --rpc URL [--port N] [--key 0x..] [--chain-id N] [--settle-delay-ms N]");
    process.exit(2);
  }
  const f = await startFacilitator({
    rpc,
    chainId: opt("--chain-id") ? Number(opt("--chain-id")) : undefined,
    key: opt("--key"),
    port: opt("--port") ? Number(opt("--port")) : 0,
    settleDelayMs: opt("--settle-delay-ms") ? Number(opt("--settle-delay-ms")) : 0,
  });
  console.log(`facilitator ${f.url} (signer ${f.address}, ${f.network}; x402 v1+v2, t402 v2)`);
  const stop = async () => { await f.stop(); process.exit(0); };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main(process.argv.slice(2)).catch((e) => { console.error(e); process.exit(1); });
}
