// Pays a paywalled URL with a real, unchanged x402/t402 client and prints what came back.
//
//   node spec/interop/pay.js <url> [--client x402v2|x402v1|t402] [--host news.example]
//        [--rpc URL] [--key 0x..] [--asset 0x..] [--max ATOMIC] [--follow] [--local-chain]
//
//   x402v2  @x402/fetch wrapFetchWithPayment + @x402/evm's exact scheme (v2 and v1
//           registered), spend controls opened for non-default assets (the test token)
//   x402v1  the version 1 client of npm x402 1.2.0 (x402/client: selectPaymentRequirements,
//           createPaymentHeader) around fetch, as x402-fetch 1.x drives it
//   t402    @t402/core t402Client + t402HTTPClient with @t402/evm's exact scheme, and a
//           policy that keeps only --asset (when given) up to --max atomic units
//
// --key defaults to the first buyer of lib/chain.js (an anvil test key). --host sends that
// Host header (Node's fetch cannot), so a gateway tenant is reached on 127.0.0.1. Redirects
// are not followed unless --follow: the gateway serves a paid resource with a 302 to a
// signed CDN URL, which the output shows. --rpc gives the client a public client for its
// reads (the exact EIP-3009 flow signs offline and needs none). --local-chain runs the test
// kit's chain, token and facilitator (lib/chain.js startDemo: anvil on 8545, facilitator on
// 4021, fixed token and payTo addresses) for the length of the run, so a gateway configured
// with those pays in one command; it stays up until the payee's balance moved (a tenant that
// settles after serving settles a moment later) or --linger seconds passed (15), and prints
// the payee's balance before and after. Exit 0 when paid and served.
//
// Importable: payX402v2, payX402v1, payT402 resolve
//   { status, headers, body, paymentResponse, paymentHeader, requests }
// where paymentHeader is the payment header the client sent and requests every request made.
import { request as httpRequest } from "node:http";
import { request as httpsRequest } from "node:https";
import { pathToFileURL } from "node:url";
import { createPublicClient, http } from "viem";
import { privateKeyToAccount } from "viem/accounts";
import { wrapFetchWithPayment, x402Client, decodePaymentResponseHeader } from "@x402/fetch";
import { registerExactEvmScheme } from "@x402/evm/exact/client";
import { toClientEvmSigner } from "@x402/evm";
import { createPaymentHeader, selectPaymentRequirements } from "x402/client";
import { decodeXPaymentResponse } from "x402/shared";
import { t402Client } from "@t402/core/client";
import { t402HTTPClient } from "@t402/core/http";
import { ExactEvmScheme as T402ExactEvmScheme } from "@t402/evm/exact/client";

// anvil's account 4: lib/chain.js funds it as the first buyer.
export const DEFAULT_BUYER_KEY = "0x47e179ec197488593b187f80a00eb0da91f1b9d0b13f8733639f19c30a34926a";

// A fetch that can send a Host header of our choosing (undici's refuses to), built on
// node:http and returning a WHATWG Response, so the clients use it as they use fetch.
export function hostFetch(host) {
  return (input, init = {}) => new Promise((ok, fail) => {
    const req0 = input instanceof Request ? input : null;
    const url = new URL(req0 ? req0.url : String(input));
    const headers = new Headers(req0 ? req0.headers : undefined);
    new Headers(init.headers ?? {}).forEach((v, k) => headers.set(k, v));
    const out = {};
    headers.forEach((v, k) => { out[k] = v; });
    out.host = host;
    const send = url.protocol === "https:" ? httpsRequest : httpRequest;
    const r = send(url, { method: init.method ?? req0?.method ?? "GET", headers: out, signal: init.signal }, (res) => {
      const chunks = [];
      res.on("data", (d) => chunks.push(d));
      res.on("end", () => {
        const h = new Headers();
        for (let i = 0; i < res.rawHeaders.length; i += 2) h.append(res.rawHeaders[i], res.rawHeaders[i + 1]);
        const body = [101, 204, 205, 304].includes(res.statusCode) ? null : Buffer.concat(chunks);
        ok(new Response(body, { status: res.statusCode, statusText: res.statusMessage, headers: h }));
      });
      res.on("error", fail);
    });
    r.on("error", fail);
    if (init.body) r.write(init.body);
    r.end();
  });
}

// Wraps a fetch so every request's URL and headers are kept (to replay a payment).
function recording(fetchImpl, requests) {
  return async (input, init = {}) => {
    const req0 = input instanceof Request ? input : null;
    const headers = new Headers(req0 ? req0.headers : undefined);
    new Headers(init.headers ?? {}).forEach((v, k) => headers.set(k, v));
    const entry = { url: req0 ? req0.url : String(input), headers: Object.fromEntries(headers) };
    requests.push(entry);
    const res = await fetchImpl(input, init);
    entry.status = res.status;
    return res;
  };
}

function baseFetch({ host, follow }) {
  const f = host ? hostFetch(host) : fetch;
  return (input, init = {}) => f(input, { ...init, redirect: follow ? "follow" : "manual" });
}

async function finish(res, requests, paymentHeaderName, decode) {
  const text = await res.text();
  let body = text;
  try { body = JSON.parse(text); } catch { /* not JSON */ }
  const headers = Object.fromEntries(res.headers);
  const prName = ["payment-response", "x-payment-response"].find((n) => headers[n]);
  let paymentResponse = null;
  if (prName) {
    try { paymentResponse = decode(headers[prName]); } catch (e) { paymentResponse = { undecodable: headers[prName], error: String(e) }; }
  }
  const paid = requests.find((r) => r.headers[paymentHeaderName]);
  return { status: res.status, headers, body, paymentResponse, paymentHeader: paid?.headers[paymentHeaderName] ?? null, requests };
}

/** The x402 v2 client: @x402/fetch. */
export async function payX402v2(url, { key = DEFAULT_BUYER_KEY, rpc, host, follow = false, init = {} } = {}) {
  const account = privateKeyToAccount(key);
  const signer = rpc ? toClientEvmSigner(account, createPublicClient({ transport: http(rpc) })) : account;
  const client = new x402Client();
  registerExactEvmScheme(client, { signer });
  client.setSpendControls({ allowedAssets: true });
  const requests = [];
  const paying = wrapFetchWithPayment(recording(baseFetch({ host, follow }), requests), client);
  const res = await paying(url, init);
  return finish(res, requests, "payment-signature", decodePaymentResponseHeader);
}

/** The x402 version 1 client of npm x402 1.2.0, driven like x402-fetch 1.x drives it. */
export async function payX402v1(url, { key = DEFAULT_BUYER_KEY, host, follow = false, init = {} } = {}) {
  const account = privateKeyToAccount(key);
  const requests = [];
  const f = recording(baseFetch({ host, follow }), requests);
  let res = await f(url, init);
  if (res.status === 402) {
    const body = await res.json();
    if (body.x402Version !== 1 || !Array.isArray(body.accepts)) throw new Error(`not a version 1 challenge: ${JSON.stringify(body)}`);
    const selected = selectPaymentRequirements(body.accepts, undefined, "exact");
    const header = await createPaymentHeader(account, body.x402Version, selected);
    res = await f(url, { ...init, headers: { ...(init.headers ?? {}), "X-PAYMENT": header,
      "Access-Control-Expose-Headers": "X-PAYMENT-RESPONSE" } });
  }
  return finish(res, requests, "x-payment", decodeXPaymentResponse);
}

/** The t402 client: @t402/core's t402HTTPClient (there is no @t402/fetch). */
export async function payT402(url, { key = DEFAULT_BUYER_KEY, host, follow = false, asset, max, init = {} } = {}) {
  const account = privateKeyToAccount(key);
  const core = new t402Client().register("eip155:*", new T402ExactEvmScheme(account));
  // The spend control: this token only, at most `max` atomic units a payment.
  if (asset || max !== undefined) {
    core.registerPolicy((_version, reqs) => reqs.filter((r) =>
      (!asset || r.asset.toLowerCase() === asset.toLowerCase()) && (max === undefined || BigInt(r.amount) <= BigInt(max))));
  }
  const client = new t402HTTPClient(core);
  const requests = [];
  const f = recording(baseFetch({ host, follow }), requests);
  let res = await f(url, init);
  if (res.status === 402) {
    const text = await res.text();
    let body;
    try { body = JSON.parse(text); } catch { body = undefined; }
    const required = client.getPaymentRequiredResponse((n) => res.headers.get(n), body);
    const payload = await client.createPaymentPayload(required);
    res = await f(url, { ...init, headers: { ...(init.headers ?? {}), ...client.encodePaymentSignatureHeader(payload) } });
  }
  return finish(res, requests, "payment-signature", (v) => client.getPaymentSettleResponse((n) =>
    (n.toLowerCase() === "payment-response" || n.toLowerCase() === "x-payment-response") ? v : null));
}

export const CLIENTS = { x402v2: payX402v2, x402v1: payX402v1, t402: payT402 };

function decodeB64Json(v) {
  try { return JSON.parse(Buffer.from(v, "base64").toString("utf8")); } catch { return null; }
}

async function main(argv) {
  const opt = (name) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : undefined; };
  const valued = new Set(["--client", "--host", "--rpc", "--key", "--asset", "--max"]);
  const url = argv.find((a, i) => !a.startsWith("--") && !valued.has(argv[i - 1]));
  const which = opt("--client") ?? "x402v2";
  if (!url || !CLIENTS[which]) {
    console.error("usage: node spec/interop/pay.js <url> [--client x402v2|x402v1|t402] [--host H] [--rpc URL] [--key 0x..] [--asset 0x..] [--max N] [--follow] [--local-chain [--linger S]]");
    process.exit(2);
  }
  const host = opt("--host");
  // --local-chain: the test kit's chain, token and facilitator for the length of this run,
  // at the fixed ports and addresses a demo configuration names (lib/chain.js DEMO).
  let demo = null;
  let payee = null;
  if (argv.includes("--local-chain")) {
    const { startDemo, DEMO } = await import("./lib/chain.js");
    payee = DEMO.payTo;
    demo = await startDemo();
    console.log(`local chain ${demo.chain.rpc}, token ${DEMO.asset}, facilitator ${demo.facilitator.url}\n`);
  }
  try {
    const before = demo ? await demo.chain.balanceOf(payee) : 0n;
    await run(url, which, host, opt, argv, demo);
    if (demo) {
      // A tenant that settles after serving (settle = "async") settles from its queue a moment
      // later: keep the chain and the facilitator up until the payee's balance moves (or
      // --linger seconds, 15 by default, pass), and say what moved.
      const until = Date.now() + Number(opt("--linger") ?? 15) * 1000;
      let after = await demo.chain.balanceOf(payee);
      while (after === before && Date.now() < until) {
        await new Promise((r) => setTimeout(r, 250));
        after = await demo.chain.balanceOf(payee);
      }
      console.log(`\npayee ${payee} on chain: ${before} -> ${after} atomic units` +
        (after === before ? " (not settled yet: the gateway's queue retries when the chain is back)" : ""));
    }
  } finally {
    await demo?.stop();
  }
}

async function run(url, which, host, opt, argv, demo) {
  // What the unpaid request is answered with, decoded (the tour's first step).
  const first = await baseFetch({ host, follow: false })(url);
  const required = first.headers.get("payment-required");
  console.log(`unpaid: ${first.status}`);
  if (required) console.log("PAYMENT-REQUIRED (decoded):\n" + JSON.stringify(decodeB64Json(required), null, 2));
  await first.arrayBuffer();

  const r = await CLIENTS[which](url, {
    key: opt("--key") ?? DEFAULT_BUYER_KEY, rpc: opt("--rpc") ?? demo?.chain.rpc, host, follow: argv.includes("--follow"),
    asset: opt("--asset"), max: opt("--max"),
  });
  console.log(`\npaid with ${which}: ${r.status}`);
  for (const [k, v] of Object.entries(r.headers)) console.log(`${k}: ${v}`);
  if (r.paymentResponse) console.log("payment response (decoded):\n" + JSON.stringify(r.paymentResponse, null, 2));
  const body = typeof r.body === "string" ? r.body : JSON.stringify(r.body, null, 2);
  console.log("\n" + (body.length > 2000 ? body.slice(0, 2000) + "..." : body));
  process.exitCode = r.status >= 200 && r.status < 400 && r.paymentHeader ? 0 : 1;
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  main(process.argv.slice(2)).then(() => process.exit()).catch((e) => { console.error(e?.stack ?? String(e)); process.exit(1); });
}
