// The gateway's CDN URL signers (core/signer) proved byte for byte against the npm
// reference implementations: akamai-edgeauth (Akamai EdgeAuth token v2) and
// @aws-sdk/cloudfront-signer (CloudFront canned policy). The C side is reached through
// tg_sign_url (spec/e2e/sign_url.c), which CMake builds next to the tollgate binary.
// Neither npm package has a verify function; the CloudFront signatures are also checked
// with node:crypto against the public key.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createPublicKey, createVerify } from "node:crypto";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import EdgeAuth from "akamai-edgeauth";
import { getSignedUrl } from "@aws-sdk/cloudfront-signer";

const here = dirname(fileURLToPath(import.meta.url));
const SIGNER = process.env.TG_SIGN_URL ||
  join(dirname(process.env.TOLLGATE_BIN || join(here, "..", "..", "build", "tollgate")), "tg_sign_url");

const EXP = 1767225600; // 2026-01-01T00:00:00Z
const AK_KEY = "52a152a152a152a152a152a1";
const AK_KEY32 = "8f0c3b1e2d4a59687766554433221100ffeeddccbbaa99887766554433221100";

function run(args) {
  return spawnSync(SIGNER, args, { encoding: "utf8" });
}

function cSign(args) {
  const r = run(args);
  if (r.error) throw r.error;
  assert.equal(r.status, 0, `tg_sign_url ${JSON.stringify(args)} failed: ${r.stderr}`);
  assert.ok(r.stdout.endsWith("\n"), "tg_sign_url prints one line");
  return r.stdout.slice(0, -1);
}

function cRefuses(args, why) {
  const r = run(args);
  if (r.error) throw r.error;
  assert.equal(r.status, 1, `tg_sign_url ${JSON.stringify(args)} should refuse (${why}), printed ${r.stdout}`);
  assert.match(r.stderr, /^sign: -22 /, "refused with -EINVAL");
}

// Byte-for-byte: the first differing offset is named, so a one-byte change fails loudly.
function sameBytes(actual, expected, what) {
  if (actual === expected) return;
  let i = 0;
  while (i < actual.length && actual[i] === expected[i]) i++;
  assert.fail(`${what}: differs at offset ${i}\n  C:   ${actual}\n  npm: ${expected}`);
}

describe("signer interop: the helper", () => {
  it("tg_sign_url is built next to the binary", () => {
    assert.ok(existsSync(SIGNER), `no ${SIGNER}: cmake --build builds it (target tg_sign_url)`);
  });

  it("the byte comparison fails on any differing byte", () => {
    const s = "exp=1767225600~acl=/a/*~hmac=0f";
    for (let i = 0; i < s.length; i++) {
      const flipped = s.slice(0, i) + String.fromCharCode(s.charCodeAt(i) ^ 1) + s.slice(i + 1);
      assert.throws(() => sameBytes(flipped, s, "x"), new RegExp(`offset ${i}\\b`));
    }
    assert.throws(() => sameBytes(s + "0", s, "x"), /offset/);
    assert.throws(() => sameBytes(s.slice(0, -1), s, "x"), /offset/);
  });
});

// ---------------------------------------------------------------- Akamai EdgeAuth

// The C options for one npm options object.
function akamaiArgs(o, { urlForm = false, acl, token = false } = {}) {
  const a = ["--kind=akamai"];
  if (token) a.push("--token");
  if (urlForm) a.push("--url-form");
  if (acl !== undefined) a.push(`--acl=${Array.isArray(acl) ? acl.join("!") : acl}`);
  if (o.startTime) a.push(`--start=${o.startTime}`);
  if (o.ip) a.push(`--ip=${o.ip}`);
  if (o.sessionId) a.push(`--id=${o.sessionId}`);
  if (o.payload) a.push(`--data=${o.payload}`);
  if (o.salt) a.push(`--salt=${o.salt}`);
  if (o.escapeEarly) a.push("--escape-early");
  if (o.algorithm) a.push(`--alg=${o.algorithm}`);
  if (o.tokenName) a.push(`--token-name=${o.tokenName}`);
  return a;
}

// The expiry npm put in the token (windowSeconds without startTime counts from now).
function expOf(token) {
  const m = /(?:^|~)exp=(\d+)(?:~|$)/.exec(token);
  assert.ok(m, `no exp= in ${token}`);
  return m[1];
}

const AKAMAI_TOKENS = [
  { name: "acl, endTime", o: { key: AK_KEY, endTime: EXP }, acl: "/videos/*" },
  { name: "acl list, startTime + windowSeconds, id, data", acl: ["/a/*", "/b/*", "/c/d.m3u8"],
    o: { key: AK_KEY, startTime: EXP - 600, windowSeconds: 900, sessionId: "s-1", payload: "p1" } },
  { name: "acl, every field, escapeEarly false, sha1",
    o: { key: AK_KEY32, startTime: EXP - 60, endTime: EXP, ip: "203.0.113.7", sessionId: "sess 42",
      payload: "a=b&c", salt: "pepper", algorithm: "sha1" }, acl: "/live/*" },
  { name: "acl, every field, escapeEarly true, md5",
    o: { key: AK_KEY32, startTime: EXP - 60, endTime: EXP, ip: "2001:db8::1", sessionId: "user 42/é~'*()!",
      payload: "a=b&c=d;e?f#g", salt: "s~alt", escapeEarly: true, algorithm: "md5" }, acl: "/v/*" },
  { name: "acl, escapeEarly true leaves acl raw, sha256",
    o: { key: AK_KEY, endTime: EXP, sessionId: "日本", escapeEarly: true, algorithm: "sha256" },
    acl: ["/a b/*", "/é/*"] },
  { name: "acl, uppercase hex key", o: { key: AK_KEY32.toUpperCase(), endTime: EXP }, acl: "/*" },
  { name: "acl, windowSeconds counted from now", o: { key: AK_KEY, windowSeconds: 300 }, acl: "/now/*" },
  { name: "acl, startTime equal to endTime", o: { key: AK_KEY, startTime: EXP, endTime: EXP }, acl: "/x" },
  { name: "url, endTime", o: { key: AK_KEY, endTime: EXP }, url: "/videos/a.mp4" },
  { name: "url, escapeEarly true, every field",
    o: { key: AK_KEY, startTime: EXP - 600, endTime: EXP, ip: "10.0.0.1", sessionId: "x y~'*(",
      payload: "d/1", salt: "pepper", escapeEarly: true }, url: "/v/a%20b.mp4" },
  { name: "url, escapeEarly true, non-ASCII path, sha1",
    o: { key: AK_KEY32, endTime: EXP, escapeEarly: true, algorithm: "sha1" }, url: "/%C3%A9t%C3%A9/seg-1.ts" },
  { name: "url, escapeEarly false, '~' in the path (hashed, not sent)",
    o: { key: AK_KEY, endTime: EXP, salt: "pepper" }, url: "/~user/clip.mp4" },
  { name: "url, escapeEarly true, '~' in the path, md5",
    o: { key: AK_KEY, endTime: EXP, escapeEarly: true, algorithm: "md5" }, url: "/~user/clip.mp4" },
  { name: "url, escapeEarly false, query-like characters, sha256",
    o: { key: AK_KEY32, endTime: 2000000000, sessionId: "abc", payload: "x=1", algorithm: "sha256" },
    url: "/a/b;c=d/e,f+g$h.mp4" },
];

describe("akamai-edgeauth: the token, byte for byte", () => {
  for (const c of AKAMAI_TOKENS) {
    it(c.name, () => {
      const ea = new EdgeAuth({ ...c.o });
      const npm = c.url !== undefined ? ea.generateURLToken(c.url) : ea.generateACLToken(c.acl);
      const args = akamaiArgs(c.o, { urlForm: c.url !== undefined, acl: c.acl, token: true });
      const ours = cSign([...args, c.o.key, c.url ?? "-", expOf(npm)]);
      sameBytes(ours, npm, "token");
    });
  }

  it("a token with a different input is a different token (the comparison can fail)", () => {
    const o = { key: AK_KEY, endTime: EXP, salt: "pepper" };
    const npm = new EdgeAuth({ ...o }).generateURLToken("/a.mp4");
    for (const [args, path, exp] of [
      [akamaiArgs({ ...o, salt: "peppeR" }, { urlForm: true, token: true }), "/a.mp4", EXP],
      [akamaiArgs(o, { urlForm: true, token: true }), "/a.mp5", EXP],
      [akamaiArgs(o, { urlForm: true, token: true }), "/a.mp4", EXP + 1],
      [akamaiArgs({ ...o, algorithm: "sha1" }, { urlForm: true, token: true }), "/a.mp4", EXP],
    ]) {
      const ours = cSign([...args, AK_KEY, path, String(exp)]);
      assert.throws(() => sameBytes(ours, npm, "token"), /differs at offset/);
    }
  });
});

// The signed URL: npm makes the token for the path of the URL as Node's URL writes it;
// the C signer writes url?name=token (or &name=token after a query).
const AKAMAI_URLS = [
  { name: "acl form, the path as acl", url: "https://cdn.example/videos/a.mp4", o: { key: AK_KEY, endTime: EXP } },
  { name: "acl form, explicit acl, a query", url: "https://cdn.example/videos/a.mp4?q=1",
    acl: "/videos/*", o: { key: AK_KEY, endTime: EXP, tokenName: "hdnts" } },
  { name: "url form, spaces and non-ASCII, escapeEarly, uppercase host",
    url: "https://CDN.Example/v/a b/é.mp4?x=1&y=é", urlForm: true,
    o: { key: AK_KEY32, startTime: EXP - 60, endTime: EXP, ip: "10.0.0.1", sessionId: "s 1",
      escapeEarly: true, tokenName: "hdnts" } },
  { name: "url form, '~' path, escapeEarly false, sha1", url: "https://cdn.example/~user/a.mp4?q=1",
    urlForm: true, o: { key: AK_KEY, endTime: EXP, algorithm: "sha1" } },
  { name: "url form, no path", url: "https://cdn.example", urlForm: true,
    o: { key: AK_KEY, endTime: EXP, escapeEarly: true, algorithm: "md5" } },
];

describe("akamai-edgeauth: the signed URL, byte for byte", () => {
  for (const c of AKAMAI_URLS) {
    it(c.name, () => {
      const u = new URL(c.url);
      const ea = new EdgeAuth({ ...c.o });
      const token = c.urlForm ? ea.generateURLToken(u.pathname) : ea.generateACLToken(c.acl ?? u.pathname);
      const base = u.origin + u.pathname + u.search;
      const npm = `${base}${u.search ? "&" : "?"}${c.o.tokenName ?? "__token__"}=${token}`;
      const ours = cSign([...akamaiArgs(c.o, { urlForm: c.urlForm, acl: c.acl }), c.o.key, c.url, expOf(token)]);
      sameBytes(ours, npm, "signed URL");
    });
  }
});

// Where the two part on purpose: npm writes a token, the C signer refuses. Each is checked
// both ways, so a change of behaviour on either side shows up here.
describe("akamai-edgeauth: inputs the C signer refuses and npm accepts", () => {
  const cases = [
    { why: "'~' in a sent acl splits the token at the edge", o: { key: AK_KEY, endTime: EXP }, acl: "/a~b/*",
      npm: /~acl=\/a~b\/\*~hmac=/ },
    { why: "'~' in a sent id without escapeEarly", o: { key: AK_KEY, endTime: EXP, sessionId: "a~b" },
      acl: "/x", npm: /~id=a~b~hmac=/ },
    { why: "odd-length key (Node's hex decoder drops the last digit)", o: { key: AK_KEY + "f", endTime: EXP },
      acl: "/x", npm: /^exp=\d+~acl=\/x~hmac=[0-9a-f]{64}$/ },
    { why: "non-hex key (Node's hex decoder stops at the first bad digit)", o: { key: "zz" + AK_KEY, endTime: EXP },
      acl: "/x", npm: /^exp=\d+~acl=\/x~hmac=[0-9a-f]{64}$/ },
  ];
  for (const c of cases) {
    it(c.why, () => {
      const npm = new EdgeAuth({ ...c.o }).generateACLToken(c.acl);
      assert.match(npm, c.npm);
      cRefuses([...akamaiArgs(c.o, { acl: c.acl, token: true }), c.o.key, "-", String(EXP)], c.why);
    });
  }

  it("both refuse an expiry before the start time", () => {
    const o = { key: AK_KEY, startTime: EXP + 1, endTime: EXP };
    assert.throws(() => new EdgeAuth({ ...o }).generateACLToken("/x"), /already expired/);
    cRefuses([...akamaiArgs(o, { acl: "/x", token: true }), AK_KEY, "-", String(EXP)], "exp < st");
  });
});

// ---------------------------------------------------------------- CloudFront

const KP = "K2JCJMDEHXQW5F";
const CF_PARAMS = /[?&]Expires=(\d+)&Key-Pair-Id=([A-Za-z0-9]+)&Signature=([A-Za-z0-9~_-]+)$/;

// The canned policy of a signed URL, checked against the public key.
function cfVerify(signed, pem) {
  const m = CF_PARAMS.exec(signed);
  assert.ok(m, `no Expires/Key-Pair-Id/Signature at the end of ${signed}`);
  const resource = signed.slice(0, m.index);
  const policy = `{"Statement":[{"Resource":"${resource}","Condition":{"DateLessThan":{"AWS:EpochTime":${m[1]}}}}]}`;
  const sig = Buffer.from(m[3].replace(/-/g, "+").replace(/_/g, "=").replace(/~/g, "/"), "base64");
  const ok = createVerify("RSA-SHA1").update(policy).verify(createPublicKey(pem), sig);
  assert.ok(ok, `the signature of ${signed} does not verify over ${policy}`);
  return resource;
}

describe("@aws-sdk/cloudfront-signer: canned policy", () => {
  let dir;
  const keys = {};
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "tollgate-interop-cf-"));
    const gen = [
      ["pkcs8", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", join(dir, "pkcs8.pem")]],
      ["pkcs1", ["genrsa", "-traditional", "-out", join(dir, "pkcs1.pem"), "2048"]],
    ];
    for (const [name, args] of gen) {
      const r = spawnSync("openssl", args, { encoding: "utf8" });
      assert.equal(r.status, 0, `openssl ${args.join(" ")}: ${r.stderr}`);
      const file = join(dir, `${name}.pem`);
      keys[name] = { file, pem: readFileSync(file, "utf8") };
    }
    assert.match(keys.pkcs8.pem, /^-----BEGIN PRIVATE KEY-----/);
    assert.match(keys.pkcs1.pem, /^-----BEGIN RSA PRIVATE KEY-----/);
  });
  after(() => { if (dir) rmSync(dir, { recursive: true, force: true }); });

  const npmSign = (url, key, exp) =>
    getSignedUrl({ url, keyPairId: KP, privateKey: key.pem, dateLessThan: new Date(exp * 1000) });
  const cfSign = (url, key, exp) =>
    cSign(["--kind=cloudfront", `--key-pair-id=${KP}`, key.file, url, String(exp)]);

  // Same URL out of both, same signature: compared whole.
  const SAME = [
    ["plain", "https://d111111abcdef8.cloudfront.net/images/image.jpg"],
    ["query (the AWS example)", "https://d111111abcdef8.cloudfront.net/image.jpg?color=red&size=medium"],
    ["encoded space", "https://d111111abcdef8.cloudfront.net/img/a%20b.jpg"],
    ["raw spaces", "https://d111111abcdef8.cloudfront.net/my file/a b.pdf"],
    ["non-ASCII path", "https://d111111abcdef8.cloudfront.net/é/日本語/ü.jpg"],
    ["non-ASCII, space and ' in the query", "https://d111111abcdef8.cloudfront.net/a.jpg?q=a b&name=é's&t=1+2&e="],
    ["default port :443 (kept by both)", "https://d111111abcdef8.cloudfront.net:443/a.jpg"],
    ["http", "http://d111111abcdef8.cloudfront.net/a.jpg?x=1"],
    ["characters a URL may not carry raw", "https://d111111abcdef8.cloudfront.net/a\"<>`{}.jpg"],
    ["unreserved and ! * ' ( ) raw", "https://d111111abcdef8.cloudfront.net/~user/a_b-c.d!*'()"],
    ["uppercase escapes kept", "https://d111111abcdef8.cloudfront.net/a%C3%A9%2F%25.jpg?k=%E6%97%A5"],
    ["dot segments kept (not normalized)", "https://d111111abcdef8.cloudfront.net/a/./b/../c.jpg"],
  ];
  for (const [name, url] of SAME) {
    for (const kind of ["pkcs8", "pkcs1"]) {
      for (const exp of [EXP, 2000000000]) {
        it(`${name} (${kind}, ${exp})`, () => {
          const npm = npmSign(url, keys[kind], exp);
          const ours = cfSign(url, keys[kind], exp);
          sameBytes(ours, npm, "signed URL");
          cfVerify(ours, keys[kind].pem);
        });
      }
    }
  }

  it("a different expiry or key is a different URL (the comparison can fail)", () => {
    const url = SAME[0][1];
    const npm = npmSign(url, keys.pkcs8, EXP);
    assert.throws(() => sameBytes(cfSign(url, keys.pkcs8, EXP + 1), npm, "signed URL"), /differs at offset/);
    assert.throws(() => sameBytes(cfSign(url, keys.pkcs1, EXP), npm, "signed URL"), /differs at offset/);
  });

  // Where the two write the URL differently. CloudFront checks the signature over the URL
  // it receives (the request line, aws-sdk-js-v3#8033), so each side must sign what it
  // writes and what a client then sends: both signatures verify here, and the C URL is
  // already in the form Node's URL (WHATWG) would send. npm 3.1166.0 does not use URL:
  // it re-encodes each path segment with encodeURIComponent(decodeURIComponent(..)) and
  // rebuilds the query (aws-sdk-js-v3#7237, #7763, #8039).
  const DIFFER = [
    { why: "host in uppercase: C lowercases it, as clients send it", url: "https://D111111ABCDEF8.CloudFront.net/a.jpg",
      c: "https://d111111abcdef8.cloudfront.net/a.jpg", npm: "https://D111111ABCDEF8.CloudFront.net/a.jpg" },
    { why: "no path: C signs '/', the path a client requests; npm signs no path",
      url: "https://d111111abcdef8.cloudfront.net", c: "https://d111111abcdef8.cloudfront.net/",
      npm: "https://d111111abcdef8.cloudfront.net" },
    { why: "sub-delims in the path: npm percent-encodes them ('+' becomes %2B), C keeps them",
      url: "https://d111111abcdef8.cloudfront.net/a+b$c,d;e=f:g@h|i^[j].jpg",
      c: "https://d111111abcdef8.cloudfront.net/a+b$c,d;e=f:g@h|i^[j].jpg",
      npm: "https://d111111abcdef8.cloudfront.net/a%2Bb%24c%2Cd%3Be%3Df%3Ag%40h%7Ci%5E%5Bj%5D.jpg" },
    { why: "escapes as written: npm uppercases them and decodes unreserved ones",
      url: "https://d111111abcdef8.cloudfront.net/%7euser/%c3%a9.jpg?x=%2f%c3%a9",
      c: "https://d111111abcdef8.cloudfront.net/%7euser/%c3%a9.jpg?x=%2f%c3%a9",
      npm: "https://d111111abcdef8.cloudfront.net/~user/%C3%A9.jpg?x=%2F%C3%A9" },
    { why: "query rebuilt by npm: 'flag' gets '=', empty pairs go, '=' / ':' '@' '?' in values are encoded",
      url: "https://d111111abcdef8.cloudfront.net/a.jpg?flag&&a=b=c&p=/x:y@z?",
      c: "https://d111111abcdef8.cloudfront.net/a.jpg?flag&&a=b=c&p=/x:y@z?",
      npm: "https://d111111abcdef8.cloudfront.net/a.jpg?flag=&a=b%3Dc&p=%2Fx%3Ay%40z%3F" },
    { why: "empty query: npm drops the '?', C keeps it (and appends '&Expires=')",
      url: "https://d111111abcdef8.cloudfront.net/a.jpg?",
      c: "https://d111111abcdef8.cloudfront.net/a.jpg?", npm: "https://d111111abcdef8.cloudfront.net/a.jpg" },
  ];
  for (const d of DIFFER) {
    it(`differs on purpose: ${d.why}`, () => {
      const npm = npmSign(d.url, keys.pkcs8, EXP);
      const ours = cfSign(d.url, keys.pkcs8, EXP);
      assert.equal(cfVerify(npm, keys.pkcs8.pem), d.npm, "npm's resource");
      assert.equal(cfVerify(ours, keys.pkcs8.pem), d.c, "C's resource");
      assert.equal(new URL(d.c).href, d.c, "the C resource is what a WHATWG client sends");
      // Given the form it writes itself, npm signs the same bytes as C where it keeps them.
      if (npmSign(d.c, keys.pkcs8, EXP).startsWith(d.c + (d.c.includes("?") ? "&" : "?")))
        sameBytes(ours, npmSign(d.c, keys.pkcs8, EXP), "signed URL of the C form");
    });
  }

  it("npm refuses an uppercase scheme, which C writes in lowercase", () => {
    const url = "HTTPS://d111111abcdef8.cloudfront.net/a.jpg";
    assert.throws(() => npmSign(url, keys.pkcs8, EXP), /Invalid URI scheme/);
    const ours = cfSign(url, keys.pkcs8, EXP);
    assert.equal(cfVerify(ours, keys.pkcs8.pem), "https://d111111abcdef8.cloudfront.net/a.jpg");
    sameBytes(ours, npmSign("https://d111111abcdef8.cloudfront.net/a.jpg", keys.pkcs8, EXP), "signed URL");
  });

  it("both refuse what is not an RSA private key", () => {
    assert.throws(() => npmSign("https://d1.cloudfront.net/a.jpg", { pem: "not a key" }, EXP));
    cRefuses(["--kind=cloudfront", `--key-pair-id=${KP}`, join(here, "package.json"),
      "https://d1.cloudfront.net/a.jpg", String(EXP)], "not a key");
  });
});
