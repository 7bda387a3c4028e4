// Local verification of x402 "exact" EVM payments (core/pay/eip3009) against viem:
// the EIP-712 digest of an EIP-3009 TransferWithAuthorization must equal viem's
// hashTypedData byte for byte, and the signer recovered from viem's signTypedData
// must be the signing account (EIP-55 spelling included). Keccak-256 (core/base/keccak)
// is compared with viem's keccak256 on random inputs around the 136-byte block.
// The C side is reached through tg_eip3009_verify (spec/e2e/eip3009_verify.c), which
// CMake builds next to the tollgate binary.
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { randomBytes, randomInt } from "node:crypto";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { getAddress, hashTypedData, keccak256, toHex } from "viem";
import { generatePrivateKey, privateKeyToAccount } from "viem/accounts";

const here = dirname(fileURLToPath(import.meta.url));
const VERIFY = process.env.TG_EIP3009_VERIFY ||
  join(dirname(process.env.TOLLGATE_BIN || join(here, "..", "..", "build", "tollgate")), "tg_eip3009_verify");

const types = {
  TransferWithAuthorization: [
    { name: "from", type: "address" },
    { name: "to", type: "address" },
    { name: "value", type: "uint256" },
    { name: "validAfter", type: "uint256" },
    { name: "validBefore", type: "uint256" },
    { name: "nonce", type: "bytes32" },
  ],
};
const N = 0xfffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141n;

function run(args) {
  const r = spawnSync(VERIFY, args, { encoding: "utf8" });
  if (r.error) throw r.error;
  return r;
}

// The CLI's arguments: the x402 wire form of domain, authorization and signature.
function argv(domain, m, sig) {
  return [domain.name, domain.version, String(domain.chainId), domain.verifyingContract,
    m.from, m.to, m.value.toString(), m.validAfter.toString(), m.validBefore.toString(), m.nonce, sig];
}

function parse(stdout) {
  const out = {};
  for (const line of stdout.split("\n").filter(Boolean)) {
    const [k, v] = line.split(" ");
    out[k] = v;
  }
  return out;
}

const randomUint = (bits) => BigInt(toHex(randomBytes(bits / 8)));
const randomAddress = () => getAddress(toHex(randomBytes(20)));

async function randomCase(i) {
  const account = privateKeyToAccount(generatePrivateKey());
  const domain = {
    name: ["USDC", "USD Coin", "EURC", "Token ✓ ünïcode", ""][i % 5],
    version: ["2", "1", "v2.2"][i % 3],
    chainId: [84532, 8453, 1, 31337, 2 ** 53 - 1][i % 5],
    verifyingContract: randomAddress(),
  };
  const message = {
    from: account.address,
    to: randomAddress(),
    // Small amounts as x402 sends them, and the full uint256 range.
    value: i % 2 ? BigInt(randomInt(1, 2 ** 47)) : randomUint(256),
    validAfter: i % 4 ? 0n : randomUint(64),
    validBefore: i % 3 ? BigInt(1767225600 + i) : randomUint(256),
    nonce: toHex(randomBytes(32)),
  };
  const sig = await account.signTypedData({ domain, types, primaryType: "TransferWithAuthorization", message });
  const digest = hashTypedData({ domain, types, primaryType: "TransferWithAuthorization", message });
  return { account, domain, message, sig, digest };
}

describe("eip3009 interop: the helper", () => {
  it("tg_eip3009_verify is built next to the binary", () => {
    assert.ok(existsSync(VERIFY), `no ${VERIFY}: cmake --build builds it (target tg_eip3009_verify)`);
  });
});

describe("eip3009 interop: keccak256 against viem", () => {
  it("equals viem's keccak256 on random inputs, block boundaries and long inputs", () => {
    const lengths = [0, 1, 31, 32, 33, 64, 134, 135, 136, 137, 271, 272, 273, 1000, 1088, 4096 + 17];
    for (let i = 0; i < 20; i++) lengths.push(randomInt(0, 2000));
    for (const n of lengths) {
      const data = randomBytes(n);
      const r = run(["--keccak", data.toString("hex")]);
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, keccak256(data) + "\n", `length ${n}: ${data.toString("hex")}`);
    }
  });
});

describe("eip3009 interop: viem's signTypedData", () => {
  it("20 random authorizations and keys: same digest as hashTypedData, signer recovered", async () => {
    for (let i = 0; i < 20; i++) {
      const c = await randomCase(i);
      const r = run(argv(c.domain, c.message, c.sig));
      const what = JSON.stringify({ i, domain: c.domain, sig: c.sig, m: c.message }, (_, v) =>
        typeof v === "bigint" ? v.toString() : v);
      assert.equal(r.status, 0, `${what}\n${r.stderr}`);
      const out = parse(r.stdout);
      assert.equal(out.digest, c.digest, what);
      assert.equal(out.signer, c.account.address, what);
    }
  });

  it("refuses a tampered authorization, a wrong from, and the high-s twin", async () => {
    const c = await randomCase(0);
    const other = privateKeyToAccount(generatePrivateKey());
    // Another value: another digest, another signer.
    let r = run(argv(c.domain, { ...c.message, value: c.message.value ^ 1n }, c.sig));
    assert.equal(r.status, 1);
    assert.notEqual(parse(r.stdout).digest, c.digest);
    assert.match(r.stderr, /^verify: -1 /);
    // Signed by another key for the same from.
    const forged = await other.signTypedData({ domain: c.domain, types, primaryType: "TransferWithAuthorization",
      message: c.message });
    r = run(argv(c.domain, c.message, forged));
    assert.equal(r.status, 1);
    assert.equal(parse(r.stdout).digest, c.digest);
    assert.equal(parse(r.stdout).signer, other.address);
    // (r, n - s, v flipped): valid ECDSA for the same key, refused as high s (-EBADMSG).
    const s = BigInt("0x" + c.sig.slice(66, 130));
    const v = parseInt(c.sig.slice(130), 16);
    const twin = c.sig.slice(0, 66) + (N - s).toString(16).padStart(64, "0") + (v === 27 ? "1c" : "1b");
    r = run(argv(c.domain, c.message, twin));
    assert.equal(r.status, 1);
    assert.match(r.stderr, /^verify: -74 /);
    // v = 29, and v as a raw recovery id (0/1).
    for (const bad of ["1d", "00", "01"]) {
      r = run(argv(c.domain, c.message, c.sig.slice(0, 130) + bad));
      assert.equal(r.status, 1);
      assert.match(r.stderr, /^verify: -74 /);
    }
  });

  it("takes viem's lowercase addresses, refuses a wrong EIP-55 checksum", async () => {
    const c = await randomCase(1);
    const lower = { ...c.message, from: c.message.from.toLowerCase(), to: c.message.to.toLowerCase() };
    let r = run(argv({ ...c.domain, verifyingContract: c.domain.verifyingContract.toLowerCase() }, lower, c.sig));
    assert.equal(r.status, 0, r.stderr);
    assert.equal(parse(r.stdout).signer, c.account.address);
    // One letter's case swapped in a checksummed address: a mistyped address, refused (exit 2).
    for (const bad of ["0x036CbD53842c5426634e7929541eC2318f3dCF7E", "0x036cBD53842c5426634e7929541eC2318f3dCF7e"]) {
      r = run(argv({ ...c.domain, verifyingContract: bad }, c.message, c.sig));
      assert.equal(r.status, 2, `${bad} should be refused`);
      assert.match(r.stderr, /CONTRACT/);
    }
    r = run(argv({ ...c.domain, verifyingContract: "0x036CbD53842c5426634e7929541eC2318f3dCF7e" }, c.message, c.sig));
    assert.equal(r.status, 1, "the right checksum parses (and is another domain)");
  });
});
