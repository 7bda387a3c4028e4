// A real local chain for the x402/t402 interop suite: anvil (npm @foundry-rs/anvil)
// on a free loopback port, an EIP-3009 test token compiled from contracts/TestUSD.sol
// with solc-js at test time and deployed with viem, Multicall3's runtime code at its
// canonical address (the x402 facilitators diagnose failed simulations through it),
// and funded buyer accounts. Stopped by pid.
//
// Chain id 84532 (Base Sepolia's) by default: version-1 clients and facilitators know
// networks by name only ("base-sepolia" -> 84532) and take the chain id from that name,
// while every RPC call goes to the viem client they are given, so they work unchanged
// against this chain. Nothing here reaches the Internet.
//
// Standalone: node lib/chain.js --demo [--port 8545] [--facilitator-port 4021]
//   starts chain, token and a facilitator (lib/facilitator.js) at fixed ports (token and
//   payTo addresses are then fixed too: DEMO), prints the `payments` section for a tenant
//   and the buyer keys, and runs until Ctrl-C.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync, existsSync, mkdtempSync, openSync, closeSync, renameSync, rmSync } from "node:fs";
import { createRequire } from "node:module";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { createPublicClient, createWalletClient, defineChain, getAddress, http, publicActions, toHex } from "viem";
import { hdKeyToAccount, mnemonicToAccount, nonceManager, privateKeyToAccount } from "viem/accounts";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

// anvil's default accounts (public test keys, funded with ETH on every anvil chain).
export const ANVIL_MNEMONIC = "test test test test test test test test test test test junk";
export const MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11";
export const DEFAULT_CHAIN_ID = 84532;
// What each default account is for, so two facilitators never share a transaction nonce.
export const ROLES = { deployer: 0, facilitator: 1, facilitator2: 2, payTo: 3, firstBuyer: 4 };
export const TOKEN = { name: "USDC", version: "2", symbol: "tUSDC", decimals: 6 };

// The seed derivation (PBKDF2) takes about half a second: done once, then each key is a
// cheap BIP-32 child of the master (m/44'/60'/0'/0/index, as anvil derives them).
let master = null;
export function anvilKey(index) {
  master ??= mnemonicToAccount(ANVIL_MNEMONIC, { path: "m" }).getHdKey();
  return toHex(hdKeyToAccount(master, { addressIndex: index }).getHdKey().privateKey);
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

// The anvil binary of the platform package (an optional dependency of @foundry-rs/anvil,
// which needs no install script); ANVIL_BIN overrides.
export function anvilPath() {
  if (process.env.ANVIL_BIN) return process.env.ANVIL_BIN;
  const arch = { x64: "amd64", arm64: "arm64" }[process.arch] ?? process.arch;
  const pkg = `@foundry-rs/anvil-${process.platform}-${arch}`;
  try {
    return join(dirname(require.resolve(`${pkg}/package.json`)), "bin", "anvil");
  } catch {
    throw new Error(`no ${pkg}: run npm ci in spec/interop (anvil ships as an optional dependency)`);
  }
}

export function viemChain(chainId, rpc) {
  return defineChain({
    id: chainId,
    name: `anvil-${chainId}`,
    nativeCurrency: { name: "Ether", symbol: "ETH", decimals: 18 },
    rpcUrls: { default: { http: [rpc] } },
  });
}

// A wallet client with public actions for one key. nonceManager: concurrent sends from
// one account (a facilitator settling in parallel) take consecutive nonces. Anvil mines
// each transaction at once, so receipts are polled every 50 ms (viem's default is 4 s).
export function walletFor(chain, key) {
  const account = privateKeyToAccount(key, { nonceManager });
  return createWalletClient({ account, chain, transport: http(chain.rpcUrls.default.http[0]), pollingInterval: 50 })
    .extend(publicActions);
}

// ---------------------------------------------------------------- compile

const SOURCES = ["TestUSD.sol", "Multicall3.sol"];

function cacheDir() {
  const inModules = join(here, "..", "node_modules", ".cache", "tollgate-interop");
  try {
    mkdirSync(inModules, { recursive: true });
    return inModules;
  } catch {
    const d = join(tmpdir(), "tollgate-interop-cache");
    mkdirSync(d, { recursive: true });
    return d;
  }
}

// { TestUSD: {abi, bytecode, deployedBytecode}, Multicall3: {...} }, from the cache when
// the sources and the compiler are the ones it was made from.
export function compileContracts() {
  const sources = {};
  for (const f of SOURCES) sources[f] = { content: readFileSync(join(here, "..", "contracts", f), "utf8") };
  const input = {
    language: "Solidity",
    sources,
    settings: {
      optimizer: { enabled: true, runs: 200 },
      evmVersion: "cancun",
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  // solc-js takes a second to load: the cache key names its package version instead.
  const solcVersion = JSON.parse(readFileSync(require.resolve("solc/package.json"), "utf8")).version;
  const key = createHash("sha256").update(solcVersion).update(JSON.stringify(input)).digest("hex").slice(0, 16);
  const cached = join(cacheDir(), `contracts-${key}.json`);
  if (existsSync(cached)) {
    try { return JSON.parse(readFileSync(cached, "utf8")); } catch { /* recompile */ }
  }
  const solc = require("solc");
  const out = JSON.parse(solc.compile(JSON.stringify(input)));
  const errors = (out.errors ?? []).filter((e) => e.severity === "error");
  if (errors.length) throw new Error("solc: " + errors.map((e) => e.formattedMessage).join("\n"));
  const result = {};
  for (const f of SOURCES) {
    for (const [name, c] of Object.entries(out.contracts[f])) {
      result[name] = { abi: c.abi, bytecode: "0x" + c.evm.bytecode.object, deployedBytecode: "0x" + c.evm.deployedBytecode.object };
    }
  }
  // Written aside and renamed: two suites compiling at once never read half a file.
  const tmp = `${cached}.${process.pid}.tmp`;
  writeFileSync(tmp, JSON.stringify(result));
  renameSync(tmp, cached);
  return result;
}

// ---------------------------------------------------------------- anvil

async function rpcCall(rpc, method, params = []) {
  const res = await fetch(rpc, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method, params }),
    signal: AbortSignal.timeout(2000),
  });
  const j = await res.json();
  if (j.error) throw new Error(`${method}: ${j.error.message}`);
  return j.result;
}

// Starts anvil; resolves { rpc, port, pid, stop(), log() } once it answers eth_chainId.
export async function startAnvil({ chainId = DEFAULT_CHAIN_ID, port, accounts = 10 } = {}) {
  port ??= await freePort();
  const dir = mkdtempSync(join(tmpdir(), "tollgate-anvil-"));
  const logPath = join(dir, "anvil.log");
  const fd = openSync(logPath, "w");
  const child = spawn(anvilPath(), [
    "--host", "127.0.0.1", "--port", String(port), "--chain-id", String(chainId),
    "--accounts", String(accounts), "--mnemonic", ANVIL_MNEMONIC,
  ], { stdio: ["ignore", fd, fd] });
  closeSync(fd);
  let dead = null;
  const exited = new Promise((ok) => {
    child.once("exit", (code, signal) => { dead = { code, signal }; ok(dead); });
    child.once("error", (error) => { dead = { error: String(error) }; ok(dead); });
  });
  const rpc = `http://127.0.0.1:${port}`;
  const log = () => { try { return readFileSync(logPath, "utf8"); } catch { return ""; } };
  const node = {
    rpc, port, pid: child.pid, exited, log,
    async stop() {
      if (!dead) {
        try { process.kill(child.pid, "SIGTERM"); } catch { /* gone */ }
        const t = setTimeout(() => { try { process.kill(child.pid, "SIGKILL"); } catch { /* gone */ } }, 3000);
        await exited;
        clearTimeout(t);
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
  const deadline = Date.now() + 15000;
  for (;;) {
    if (dead) throw new Error(`anvil exited at start (${JSON.stringify(dead)}):\n${log()}`);
    try {
      const id = await rpcCall(rpc, "eth_chainId");
      if (Number(id) !== chainId) throw new Error(`anvil answers chain id ${id}, not ${chainId}`);
      break;
    } catch (e) {
      if (/answers chain id/.test(e.message)) { await node.stop(); throw e; }
    }
    if (Date.now() > deadline) { await node.stop(); throw new Error(`anvil did not answer within 15 s:\n${log()}`); }
    await new Promise((ok) => setTimeout(ok, 50));
  }
  return node;
}

// ---------------------------------------------------------------- the chain with its token

/**
 * Starts anvil, deploys TestUSD and Multicall3, mints `fund` atomic units to each buyer.
 * Resolves {
 *   rpc, chainId, network ("eip155:N"), networkV1 ("base-sepolia" for 84532), pid,
 *   chain (viem), publicClient, token: {address, name, version, symbol, decimals, abi},
 *   keys: {deployer, facilitator, facilitator2, payTo}, payTo (address),
 *   buyers: [{key, address}], balanceOf(addr) -> bigint, authorizationState(addr, nonce),
 *   mint(addr, amount), stop()
 * }.
 */
export async function startChain({ chainId = DEFAULT_CHAIN_ID, port, buyers = 4, fund = 1_000_000_000n } = {}) {
  const contracts = compileContracts();
  const node = await startAnvil({ chainId, port, accounts: ROLES.firstBuyer + buyers });
  try {
    const chain = viemChain(chainId, node.rpc);
    const publicClient = createPublicClient({ chain, transport: http(node.rpc), pollingInterval: 50 });
    const keys = {
      deployer: anvilKey(ROLES.deployer),
      facilitator: anvilKey(ROLES.facilitator),
      facilitator2: anvilKey(ROLES.facilitator2),
      payTo: anvilKey(ROLES.payTo),
    };
    const deployer = walletFor(chain, keys.deployer);
    const { abi, bytecode } = contracts.TestUSD;
    const hash = await deployer.deployContract({
      abi, bytecode, args: [TOKEN.name, TOKEN.version, TOKEN.symbol, TOKEN.decimals],
    });
    const receipt = await publicClient.waitForTransactionReceipt({ hash });
    if (receipt.status !== "success" || !receipt.contractAddress) throw new Error("TestUSD deployment failed");
    const address = getAddress(receipt.contractAddress);
    await rpcCall(node.rpc, "anvil_setCode", [MULTICALL3_ADDRESS, contracts.Multicall3.deployedBytecode]);

    const mint = async (to, amount) => {
      const h = await deployer.writeContract({ address, abi, functionName: "mint", args: [to, amount] });
      const r = await publicClient.waitForTransactionReceipt({ hash: h });
      if (r.status !== "success") throw new Error(`mint to ${to} failed`);
    };
    const buyerList = [];
    for (let i = 0; i < buyers; i++) {
      const key = anvilKey(ROLES.firstBuyer + i);
      const acct = privateKeyToAccount(key);
      buyerList.push({ key, address: acct.address });
      if (fund > 0n) await mint(acct.address, fund);
    }
    return {
      rpc: node.rpc,
      port: node.port,
      pid: node.pid,
      chainId,
      network: `eip155:${chainId}`,
      networkV1: chainId === 84532 ? "base-sepolia" : null,
      chain,
      publicClient,
      token: { address, abi, ...TOKEN },
      keys,
      payTo: privateKeyToAccount(keys.payTo).address,
      buyers: buyerList,
      balanceOf: (who) => publicClient.readContract({ address, abi, functionName: "balanceOf", args: [who] }),
      authorizationState: (who, nonce) =>
        publicClient.readContract({ address, abi, functionName: "authorizationState", args: [who, nonce] }),
      mint,
      rpcCall: (method, params) => rpcCall(node.rpc, method, params),
      log: node.log,
      stop: () => node.stop(),
    };
  } catch (e) {
    await node.stop();
    throw e;
  }
}

// The `payments` section of a tenant for this chain, as Lua source for a configuration
// file; extra is more keys of the section, as Lua (e.g. verify = "local", rpc = {...}).
export function paymentsSection(c, { facilitators, serve = "redirect", origin, settle = "sync", extra = "" }) {
  const accept = [
    `network = "${c.network}"`,
    c.networkV1 ? `network_v1 = "${c.networkV1}"` : null,
    `asset = "${c.token.address}"`,
    `name = "${c.token.name}", version = "${c.token.version}"`,
    `pay_to = "${c.payTo}"`,
    `decimals = ${c.token.decimals}`,
  ].filter(Boolean).join(", ");
  return `payments = {
    accepts = { { ${accept} } },
    facilitators = { ${facilitators.map((u) => JSON.stringify(u)).join(", ")} },
    settle = "${settle}",
    serve = "${serve}",${origin ? `\n    origin = ${JSON.stringify(origin)},` : ""}${extra ? `\n    ${extra}` : ""}
  },`;
}

// ---------------------------------------------------------------- demo

// The demo's fixed places: on a fresh anvil the deployer's first contract is always at
// DEMO.asset and payTo is anvil account 3, so a gateway configuration can name them ahead.
export const DEMO = {
  rpcPort: 8545,
  facilitatorPort: 4021,
  asset: "0x5FbDB2315678afecb367f032d93F642f64180aa3",
  payTo: "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
};

// Chain, token and facilitator at the demo's fixed ports; checks the fixed addresses.
export async function startDemo({ rpcPort = DEMO.rpcPort, facilitatorPort = DEMO.facilitatorPort } = {}) {
  const { startFacilitator } = await import("./facilitator.js");
  const c = await startChain({ port: rpcPort });
  try {
    if (c.token.address !== DEMO.asset || c.payTo !== DEMO.payTo) {
      throw new Error(`demo chain: token ${c.token.address} payTo ${c.payTo}, expected ${DEMO.asset} ${DEMO.payTo}`);
    }
    const f = await startFacilitator({ rpc: c.rpc, chainId: c.chainId, key: c.keys.facilitator, port: facilitatorPort });
    return { chain: c, facilitator: f, stop: async () => { await f.stop(); await c.stop(); } };
  } catch (e) {
    await c.stop();
    throw e;
  }
}

async function demo(argv) {
  const opt = (name) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : undefined; };
  const d = await startDemo({
    rpcPort: opt("--port") ? Number(opt("--port")) : DEMO.rpcPort,
    facilitatorPort: opt("--facilitator-port") ? Number(opt("--facilitator-port")) : DEMO.facilitatorPort,
  });
  const c = d.chain;
  const f = d.facilitator;
  const stop = async () => { await d.stop(); process.exit(0); };
  process.on("SIGINT", stop);
  process.on("SIGTERM", stop);
  const lines = [
    `chain      ${c.rpc} (chain id ${c.chainId}, anvil pid ${c.pid})`,
    `token      ${c.token.address} (${c.token.name} v${c.token.version}, ${c.token.decimals} decimals)`,
    `facilitator ${f.url} (x402 v1+v2, t402)`,
    `payTo      ${c.payTo}`,
    ...c.buyers.map((b, i) => `buyer ${i}    ${b.address} key ${b.key} (${Number(1_000_000_000n) / 1e6} tUSDC)`),
    "",
    "-- put this in the tenant's section of the gateway configuration:",
    "  " + paymentsSection(c, { facilitators: [f.url] }),
    "",
    "-- then pay a priced URL of that tenant:",
    `node spec/interop/pay.js http://127.0.0.1:8080/PATH --rpc ${c.rpc} --key ${c.buyers[0].key}`,
    "",
    "(Ctrl-C stops chain and facilitator)",
  ];
  console.log(lines.join("\n"));
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? "").href) {
  if (process.argv.includes("--demo")) {
    demo(process.argv.slice(2)).catch((e) => { console.error(e); process.exit(1); });
  } else {
    console.error("usage: node lib/chain.js --demo [--port 8545] [--facilitator-port 4021]");
    process.exit(2);
  }
}
