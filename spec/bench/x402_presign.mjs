// Pre-signs payments for spec/bench/x402.sh: COUNT version 2 PAYMENT-SIGNATURE header
// values for one challenge, one per line, each a fresh EIP-3009 TransferWithAuthorization
// (random 32-byte nonce) signed with viem by the test kit's funded buyers in turn
// (spec/interop/lib/chain.js: anvil accounts 4.., funded by its demo). The EIP-712 digest is
// computed here and signed with @noble/curves (what viem signs with); the first payment of
// each thread is checked against viem's signTypedData.
//
//   node spec/bench/x402_presign.mjs --required B64 --count K --out FILE
//        [--buyers 4] [--valid-s S] [--jobs N]
//
// --required  the PAYMENT-REQUIRED value of the gateway's 402 (base64 JSON PaymentRequired v2);
//             each payload's `accepted` is its first offered requirement, unchanged, and its
//             `resource` the challenge's resource (PROTOCOLS.md section 2)
// --valid-s   validBefore = now + S (default: the requirement's maxTimeoutSeconds); validAfter 0
// --jobs      worker threads signing in parallel (default: the number of cores)
// Prints "signed K in S s" on stderr.
import { randomBytes } from "node:crypto";
import { createWriteStream } from "node:fs";
import { createRequire } from "node:module";
import { availableParallelism } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { Worker, isMainThread, parentPort, workerData } from "node:worker_threads";

const here = dirname(fileURLToPath(import.meta.url));
const interop = createRequire(join(here, "..", "interop", "package.json"));
const { privateKeyToAccount } = interop("viem/accounts");
const { getAddress } = interop("viem");
const { secp256k1 } = interop("@noble/curves/secp256k1");
const { keccak_256 } = interop("@noble/hashes/sha3");

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

const enc = (s) => Buffer.from(s, "utf8");
const word = (v) => Buffer.from(BigInt(v).toString(16).padStart(64, "0"), "hex");
const addr = (a) => Buffer.concat([Buffer.alloc(12), Buffer.from(a.slice(2), "hex")]);
const TYPE_HASH = keccak_256(enc("TransferWithAuthorization(address from,address to,uint256 value," +
  "uint256 validAfter,uint256 validBefore,bytes32 nonce)"));
const DOMAIN_TYPE_HASH = keccak_256(enc("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"));

// The EIP-712 digest of a TransferWithAuthorization, by hand (viem's hashTypedData costs
// as much as the signature): keccak256(0x1901 || domainSeparator || structHash).
function digest(separator, a) {
  const struct = keccak_256(Buffer.concat([TYPE_HASH, addr(a.from), addr(a.to), word(a.value), word(a.validAfter),
    word(a.validBefore), Buffer.from(a.nonce.slice(2), "hex")]));
  return keccak_256(Buffer.concat([Buffer.from([0x19, 0x01]), separator, struct]));
}

// Signs n payments (buyers in turn, starting at buyer index `first`): base64 header values.
// The first one is also signed by viem's signTypedData and must come out identical.
async function sign({ required, keys, n, first, validS }) {
  const offer = required.accepts[0];
  const accounts = keys.map((k) => ({ key: k.slice(2), account: privateKeyToAccount(k) }));
  const domain = {
    name: offer.extra.name,
    version: offer.extra.version,
    chainId: Number(offer.network.split(":")[1]),
    verifyingContract: getAddress(offer.asset),
  };
  const separator = keccak_256(Buffer.concat([DOMAIN_TYPE_HASH, keccak_256(enc(domain.name)), keccak_256(enc(domain.version)),
    word(domain.chainId), addr(domain.verifyingContract)]));
  const to = getAddress(offer.payTo);
  const validBefore = String(Math.floor(Date.now() / 1000) + validS);
  const out = [];
  for (let i = 0; i < n; i++) {
    const { key, account } = accounts[(first + i) % accounts.length];
    const authorization = {
      from: account.address, to, value: offer.amount, validAfter: "0", validBefore,
      nonce: "0x" + randomBytes(32).toString("hex"),
    };
    const sig = secp256k1.sign(digest(separator, authorization), key); // RFC 6979, low s
    const signature = "0x" + sig.r.toString(16).padStart(64, "0") + sig.s.toString(16).padStart(64, "0") +
      (27 + sig.recovery).toString(16);
    if (i === 0) {
      const viemSig = await account.signTypedData({
        domain, types: TYPES, primaryType: "TransferWithAuthorization",
        message: { ...authorization, value: BigInt(authorization.value), validAfter: 0n, validBefore: BigInt(validBefore) },
      });
      if (viemSig !== signature) throw new Error(`signature differs from viem's: ${signature} vs ${viemSig}`);
    }
    const payload = { x402Version: 2, resource: required.resource, accepted: offer, payload: { signature, authorization } };
    out.push(Buffer.from(JSON.stringify(payload), "utf8").toString("base64"));
  }
  return out;
}

async function main(argv) {
  const opt = (name, def) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : def; };
  const b64 = opt("--required");
  const count = Number(opt("--count", "0"));
  const outPath = opt("--out");
  if (!b64 || !outPath || !(count > 0)) {
    console.error("usage: node x402_presign.mjs --required B64 --count K --out FILE [--buyers 4] [--valid-s S] [--jobs N]");
    process.exit(2);
  }
  const required = JSON.parse(Buffer.from(b64, "base64").toString("utf8"));
  if (required.x402Version !== 2 || !Array.isArray(required.accepts) || !required.accepts[0]?.extra) {
    throw new Error("not a version 2 PaymentRequired with an offered requirement");
  }
  const { anvilKey, ROLES } = await import("../interop/lib/chain.js");
  const nbuyers = Number(opt("--buyers", "4"));
  const keys = Array.from({ length: nbuyers }, (_, i) => anvilKey(ROLES.firstBuyer + i));
  const validS = Number(opt("--valid-s", String(required.accepts[0].maxTimeoutSeconds)));
  const jobs = Math.max(1, Math.min(Number(opt("--jobs", String(availableParallelism()))), count));
  const t0 = process.hrtime.bigint();
  const per = Math.ceil(count / jobs);
  const parts = await Promise.all(Array.from({ length: jobs }, (_, j) => {
    const n = Math.max(0, Math.min(per, count - j * per));
    return new Promise((ok, fail) => {
      const w = new Worker(fileURLToPath(import.meta.url), { workerData: { required, keys, n, first: j * per, validS } });
      w.once("message", ok);
      w.once("error", fail);
      w.once("exit", (code) => { if (code !== 0) fail(new Error(`signer worker exited ${code}`)); });
    });
  }));
  const out = createWriteStream(outPath);
  for (const part of parts) for (const v of part) out.write(v + "\n");
  await new Promise((ok, fail) => out.end((e) => (e ? fail(e) : ok())));
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.error(`signed ${count} payments in ${s.toFixed(1)} s (${jobs} threads, ${nbuyers} buyers)`);
}

if (isMainThread) {
  main(process.argv.slice(2)).catch((e) => { console.error(e?.stack ?? String(e)); process.exit(1); });
} else {
  sign(workerData).then((v) => parentPort.postMessage(v));
}
