// Checks deploy/: the Kubernetes manifests against the Kubernetes API schemas (kubernetes-models,
// whose validators are compiled from the API's OpenAPI document) and against what the gateway
// needs; compose.yaml against the Compose specification's JSON schema; the configurations they
// carry with the real binary (`tollgate check`); the Prometheus rules with promtool; the Grafana
// dashboard's metrics against the ones the code declares; and that a policy in a Kubernetes
// ConfigMap volume hot-reloads when the kubelet swaps the volume's ..data symlink.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { createServer } from "node:net";
import {
  mkdtempSync, mkdirSync, writeFileSync, readFileSync, readdirSync, rmSync, symlinkSync, renameSync, chmodSync,
  existsSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseAllDocuments, parse as parseYaml } from "yaml";
import Ajv from "ajv";
import addFormats from "ajv-formats";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const deploy = join(root, "deploy");
const bin = resolve(process.env.TOLLGATE_BIN || join(root, "build", "tollgate"));
const logDir = process.env.TOLLGATE_LOG_DIR || mkdtempSync(join(tmpdir(), "tg-deploy-logs-"));
mkdirSync(logDir, { recursive: true });

// --- helpers -------------------------------------------------------------------------------

function loadDocs(file) {
  const docs = parseAllDocuments(readFileSync(file, "utf8"));
  const out = [];
  for (const d of docs) {
    assert.deepEqual(d.errors.map(String), [], `${file}: YAML errors`);
    const v = d.toJS({ maxAliasCount: 100 });
    if (v != null) out.push(v);
  }
  return out;
}

const k8sDir = join(deploy, "k8s");
const k8sFiles = readdirSync(k8sDir).filter((f) => f.endsWith(".yaml")).sort();
const k8s = k8sFiles.flatMap((f) => loadDocs(join(k8sDir, f)).map((doc) => ({ file: f, doc })));
const byKind = (kind, name) => k8s.filter((m) => m.doc.kind === kind && (!name || m.doc.metadata?.name === name))
  .map((m) => m.doc);
const one = (kind, name) => {
  const all = byKind(kind, name);
  assert.equal(all.length, 1, `exactly one ${kind} ${name || ""}`);
  return all[0];
};

// Every metric family the C code declares: tg_metric_new(TYPE, "name", ...).
function declaredMetrics() {
  const names = new Map();
  const walk = (d) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (p.endsWith(".c")) {
        const src = readFileSync(p, "utf8");
        for (const m of src.matchAll(/tg_metric_new\(\s*TG_METRIC_(\w+),\s*"([a-zA-Z_:][a-zA-Z0-9_:]*)"/g))
          names.set(m[2], m[1].toLowerCase());
      }
    }
  };
  walk(join(root, "core"));
  return names;
}

// Metric names in a PromQL expression: identifiers followed by { or [ or a space/paren, minus
// functions and keywords; histogram/summary suffixes map back to their family.
const PROMQL_WORDS = new Set(["sum", "by", "without", "rate", "irate", "increase", "histogram_quantile", "max",
  "min", "avg", "count", "time", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
  "min_over_time", "max_over_time", "avg_over_time", "clamp_min", "clamp_max", "changes", "deriv", "abs",
  "label_values", "bool", "offset", "topk", "bottomk", "absent", "vector", "scalar", "le"]);
function metricsIn(expr) {
  const cleaned = expr.replace(/\blabel_values\(([^,]*),\s*\w+\)/g, "$1") // grafana: label_values(metric, label)
    .replace(/"(?:[^"\\]|\\.)*"/g, '""')                 // label values
    .replace(/\{[^}]*\}/g, "{}")                            // matchers
    .replace(/\[[^\]]*\]/g, "[]")                            // ranges
    .replace(/\$\w+/g, "")                                   // grafana variables
    .replace(/\bby\s*\([^)]*\)/g, "").replace(/\bwithout\s*\([^)]*\)/g, "")
    .replace(/\bon\s*\([^)]*\)/g, "").replace(/\bignoring\s*\([^)]*\)/g, "");
  const out = new Set();
  for (const m of cleaned.matchAll(/(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w(])/g)) {
    if (!PROMQL_WORDS.has(m[1]) && !/^\d/.test(m[1])) out.add(m[1]);
  }
  return [...out];
}
function family(name, declared) {
  if (declared.has(name)) return name;
  for (const suf of ["_bucket", "_sum", "_count"]) {
    if (name.endsWith(suf) && declared.get(name.slice(0, -suf.length)) === "histogram") return name.slice(0, -suf.length);
  }
  return null;
}

function freePort() {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => { const { port } = srv.address(); srv.close(() => ok(port)); });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const policyVersion = (src) => createHash("sha256").update(src).digest("hex").slice(0, 12);

async function startGateway(configPath, label) {
  const logFile = join(logDir, `${label}.log`);
  const chunks = [];
  const child = spawn(bin, ["run", "-c", configPath], { stdio: ["ignore", "pipe", "pipe"] });
  child.stdout.on("data", (c) => chunks.push(c));
  child.stderr.on("data", (c) => chunks.push(c));
  let exited = null;
  child.on("exit", (code, signal) => { exited = { code, signal }; });
  const gw = {
    log: () => Buffer.concat(chunks).toString("utf8"),
    async stop() {
      if (exited == null) {
        child.kill("SIGTERM");
        for (let i = 0; i < 100 && exited == null; i++) await sleep(50);
        if (exited == null) child.kill("SIGKILL");
      }
      writeFileSync(logFile, gw.log());
    },
    exited: () => exited,
  };
  return gw;
}

async function waitFor(fn, ms, what) {
  const until = Date.now() + ms;
  let last;
  while (Date.now() < until) {
    try { last = await fn(); if (last.ok) return last; } catch (e) { last = { error: String(e) }; }
    await sleep(100);
  }
  assert.fail(`${what} within ${ms} ms; last: ${JSON.stringify(last).slice(0, 400)}`);
}

const RSL = `<?xml version="1.0" encoding="UTF-8"?>
<rsl xmlns="https://rslstandard.org/rsl">
  <content url="/articles/*">
    <license><permits type="usage">ai-input</permits>
      <payment type="purchase"><amount currency="USD">0.10</amount></payment></license>
  </content>
</rsl>
`;

// --- Kubernetes ----------------------------------------------------------------------------

describe("kubernetes manifests (deploy/k8s)", () => {
  it("every document parses and validates against its Kubernetes API schema", async () => {
    assert.ok(k8s.length >= 9, `found ${k8s.length} documents`);
    for (const { file, doc } of k8s) {
      assert.ok(doc.apiVersion && doc.kind, `${file}: apiVersion and kind`);
      const [group, version] = doc.apiVersion.includes("/") ? doc.apiVersion.split("/") : [null, doc.apiVersion];
      const mod = await import(`kubernetes-models/${group ? `${group}/` : ""}${version}/${doc.kind}`)
        .catch(() => assert.fail(`${file}: no schema for ${doc.apiVersion} ${doc.kind}`));
      const Model = mod[doc.kind];
      try {
        new Model(doc).validate();
      } catch (e) {
        assert.fail(`${file}: ${doc.kind} ${doc.metadata?.name}: ${e.message}`);
      }
    }
  });

  it("the schema check catches a broken manifest (the check can fail)", async () => {
    const { Deployment } = await import("kubernetes-models/apps/v1/Deployment");
    const d = structuredClone(one("Deployment", "tollgate"));
    d.spec.template.spec.containers[0].ports[0].containerPort = "8080";
    assert.throws(() => new Deployment(d).validate(), /containerPort/);
  });

  it("no unknown field anywhere (kubectl's strict field validation would refuse it)", async () => {
    const { unknownFields } = await import("./strict.js");
    for (const { file, doc } of k8s) {
      const bad = unknownFields(doc);
      assert.deepEqual(bad, [], `${file}: ${doc.kind} ${doc.metadata?.name}: unknown fields`);
    }
    const d = structuredClone(one("Deployment", "tollgate"));
    d.spec.template.spec.containers[0].readinessprobe = {};
    assert.deepEqual((await import("./strict.js")).unknownFields(d),
      [".spec.template.spec.containers[0].readinessprobe"]);
  });

  const workloads = () => [one("Deployment", "tollgate"), one("StatefulSet", "tollgate")];
  const cfgText = () => one("ConfigMap", "tollgate-config").data["tollgate.lua"];
  const luaNumber = (key) => {
    const m = cfgText().match(new RegExp(`\\b${key}\\s*=\\s*(\\d+)`));
    assert.ok(m, `tollgate.lua sets ${key}`);
    return Number(m[1]);
  };

  it("probes: liveness /healthz and readiness /readyz on the public listener's port", () => {
    const publicPort = Number(cfgText().match(/listen\s*=\s*\{\s*\{[^}]*port\s*=\s*(\d+)/)[1]);
    const adminPort = Number(cfgText().match(/admin\s*=\s*\{[^}]*port\s*=\s*(\d+)/)[1]);
    for (const w of workloads()) {
      const c = w.spec.template.spec.containers[0];
      const portOf = (name) => c.ports.find((p) => p.name === name).containerPort;
      assert.equal(portOf("http"), publicPort, `${w.kind}: http port is tollgate.lua's listen port`);
      assert.equal(portOf("admin"), adminPort, `${w.kind}: admin port is tollgate.lua's admin port`);
      assert.equal(c.livenessProbe.httpGet.path, "/healthz");
      assert.equal(c.readinessProbe.httpGet.path, "/readyz");
      for (const p of [c.livenessProbe, c.readinessProbe, c.startupProbe])
        assert.equal(p.httpGet.port, "http", `${w.kind}: probes go to the public listener (health is not on admin)`);
    }
  });

  it("terminationGracePeriodSeconds covers preStop + limits.shutdown_grace_ms + the log's ship drain", () => {
    const graceMs = luaNumber("shutdown_grace_ms");
    for (const w of workloads()) {
      const spec = w.spec.template.spec;
      const pre = spec.containers[0].lifecycle.preStop.exec.command;
      assert.deepEqual(pre.slice(0, 1), ["sleep"]);
      const need = Number(pre[1]) + graceMs / 1000 + 3 /* SHIP_DRAIN_MS */;
      assert.ok(spec.terminationGracePeriodSeconds >= need + 2,
        `${w.kind}: ${spec.terminationGracePeriodSeconds} s < ${need} s + margin`);
    }
  });

  it("non-root uid 10001, read-only root filesystem, no privilege escalation, every container", () => {
    for (const w of workloads()) {
      const spec = w.spec.template.spec;
      assert.equal(spec.securityContext.runAsUser, 10001);
      assert.equal(spec.securityContext.runAsNonRoot, true);
      for (const c of [...spec.initContainers, ...spec.containers]) {
        assert.equal(c.image, "tollgate:latest");
        assert.equal(c.securityContext.readOnlyRootFilesystem, true, `${w.kind}/${c.name}`);
        assert.equal(c.securityContext.allowPrivilegeEscalation, false, `${w.kind}/${c.name}`);
      }
    }
  });

  it("policies are a whole ConfigMap volume (no subPath) at the folder tollgate.lua names", () => {
    const policyPaths = [...cfgText().matchAll(/policy\s*=\s*"([^"]+)"/g)].map((m) => m[1]);
    assert.ok(policyPaths.length > 0);
    for (const p of policyPaths) assert.ok(p.startsWith("/"), `policy path ${p} is absolute (see configmap-config.yaml)`);
    const pm = one("ConfigMap", "tollgate-policies");
    for (const w of workloads()) {
      const spec = w.spec.template.spec;
      const vol = spec.volumes.find((v) => v.configMap?.name === "tollgate-policies");
      assert.ok(vol, `${w.kind}: a volume of tollgate-policies`);
      const mount = spec.containers[0].volumeMounts.find((m) => m.name === vol.name);
      assert.equal(mount.subPath, undefined, `${w.kind}: a subPath mount never updates`);
      for (const p of policyPaths) {
        assert.equal(dirname(p), mount.mountPath, `${w.kind}: ${p} is in the mounted folder`);
        assert.ok(pm.data[p.split("/").pop()], `tollgate-policies has ${p.split("/").pop()}`);
      }
      for (const m of spec.containers[0].volumeMounts) assert.equal(m.subPath, undefined, `${w.kind}: ${m.name} no subPath`);
    }
    assert.equal(pm.data["news.lua"], readFileSync(join(root, "policies", "news_publisher.lua"), "utf8"),
      "tollgate-policies news.lua is policies/news_publisher.lua");
  });

  it("every file tollgate.lua names is mounted, every secret comes from the Secret", () => {
    const secret = one("Secret", "tollgate-secrets");
    const cm = one("ConfigMap", "tollgate-config");
    const files = [...cfgText().matchAll(/(?:_file|source|policy)\s*=\s*"(\/[^"]+)"/g)].map((m) => m[1]);
    assert.ok(files.length >= 5, files.join(" "));
    const spec = one("Deployment", "tollgate").spec.template.spec;
    for (const f of files) {
      const mount = spec.containers[0].volumeMounts.find((m) => dirname(f) === m.mountPath);
      assert.ok(mount, `${f} is under a mount`);
      const vol = spec.volumes.find((v) => v.name === mount.name);
      const key = f.split("/").pop();
      const data = vol.secret ? secret.stringData : vol.configMap?.name === "tollgate-config" ? cm.data
        : one("ConfigMap", vol.configMap.name).data;
      assert.ok(data[key] != null, `${f}: key ${key} in ${vol.secret ? "the Secret" : vol.configMap.name}`);
      if (/_file\s*=/.test(cfgText().split(f)[0].split("\n").pop())) assert.ok(vol.secret, `${f}: a secret lives in the Secret`);
    }
    assert.ok(secret.stringData["offer.key"], "offer.key (shared by every instance) is in the Secret");
  });

  it("the StatefulSet keeps /var/lib/tollgate on a volumeClaimTemplate; the Deployment on an emptyDir", () => {
    const sts = one("StatefulSet", "tollgate");
    assert.equal(sts.spec.volumeClaimTemplates[0].metadata.name, "data");
    assert.ok(sts.spec.template.spec.containers[0].volumeMounts.some((m) => m.name === "data" && m.mountPath === "/var/lib/tollgate"));
    assert.ok(!sts.spec.template.spec.volumes.some((v) => v.name === "data"), "data comes from the claim, not a pod volume");
    assert.equal(sts.spec.serviceName, one("Service", "tollgate-headless").metadata.name);
    const dep = one("Deployment", "tollgate");
    assert.ok(dep.spec.template.spec.volumes.some((v) => v.name === "data" && v.emptyDir));
    assert.ok(/data_dir\s*=\s*"\/var\/lib\/tollgate"/.test(cfgText()));
  });

  it("Services, HPA and PDB select the pods the workloads make; the HPA scales on CPU the pods request", () => {
    const dep = one("Deployment", "tollgate");
    const podLabels = dep.spec.template.metadata.labels;
    const matches = (sel) => Object.entries(sel).every(([k, v]) => podLabels[k] === v);
    for (const s of byKind("Service")) {
      assert.ok(matches(s.spec.selector), `Service ${s.metadata.name}`);
      for (const p of s.spec.ports) assert.ok(dep.spec.template.spec.containers[0].ports.some((c) => c.name === p.targetPort),
        `Service ${s.metadata.name} targets a named container port`);
    }
    assert.ok(matches(one("PodDisruptionBudget", "tollgate").spec.selector.matchLabels));
    assert.ok(matches(dep.spec.selector.matchLabels));
    const hpa = one("HorizontalPodAutoscaler", "tollgate");
    assert.equal(hpa.spec.scaleTargetRef.kind, "Deployment");
    assert.equal(hpa.spec.scaleTargetRef.name, dep.metadata.name);
    assert.equal(hpa.spec.metrics[0].resource.name, "cpu");
    assert.ok(dep.spec.template.spec.containers[0].resources.requests.cpu, "CPU utilization needs a CPU request");
    assert.ok(hpa.spec.minReplicas >= 2 && one("PodDisruptionBudget", "tollgate").spec.maxUnavailable < hpa.spec.minReplicas);
  });

  it("tollgate check accepts the ConfigMap's tollgate.lua with the ConfigMaps and Secret laid out as mounted", () => {
    const dir = mkdtempSync(join(tmpdir(), "tg-k8s-check-"));
    try {
      const put = (mount, data) => {
        mkdirSync(join(dir, mount), { recursive: true });
        for (const [k, v] of Object.entries(data)) {
          const p = join(dir, mount, k);
          writeFileSync(p, v.replaceAll("/etc/tollgate/", `${dir}/etc/tollgate/`).replaceAll("/var/lib/tollgate", `${dir}/var/lib/tollgate`));
          chmodSync(p, 0o600);
        }
      };
      put("etc/tollgate/config", one("ConfigMap", "tollgate-config").data);
      put("etc/tollgate/policies", one("ConfigMap", "tollgate-policies").data);
      put("etc/tollgate/secrets", one("Secret", "tollgate-secrets").stringData);
      mkdirSync(join(dir, "var/lib/tollgate"), { recursive: true });
      const r = spawnSync(bin, ["check", "-c", join(dir, "etc/tollgate/config/tollgate.lua")], { encoding: "utf8" });
      assert.equal(r.status, 0, `tollgate check: ${r.stdout}${r.stderr}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// --- hot reload through a ConfigMap volume --------------------------------------------------

// The kubelet's AtomicWriter: files live in a hidden timestamped folder, ..data points at it, and
// each visible name is a symlink through ..data. An update writes a new folder, points ..data_tmp
// at it, renames ..data_tmp over ..data (one atomic step) and removes the old folder.
function projected(dir, files, stamp) {
  const ts = `..2026_12_06_00_00_0${stamp}.000000001`;
  mkdirSync(join(dir, ts), { recursive: true });
  for (const [k, v] of Object.entries(files)) {
    mkdirSync(dirname(join(dir, ts, k)), { recursive: true });
    writeFileSync(join(dir, ts, k), v);
  }
  return ts;
}
function atomicWrite(dir, files, stamp) {
  const ts = projected(dir, files, stamp);
  const old = existsSync(join(dir, "..data")) ? readdirSync(dir).filter((n) => n.startsWith("..20") && n !== ts) : [];
  symlinkSync(ts, join(dir, "..data_tmp"));
  renameSync(join(dir, "..data_tmp"), join(dir, "..data"));
  for (const top of new Set(Object.keys(files).map((k) => k.split("/")[0]))) {
    if (!existsSync(join(dir, top))) symlinkSync(join("..data", top), join(dir, top));
  }
  for (const o of old) rmSync(join(dir, o), { recursive: true, force: true });
}

async function reloadThroughSwap(layout) {
  const dir = mkdtempSync(join(tmpdir(), "tg-projected-"));
  const [port, adminPort] = [await freePort(), await freePort()];
  const token = "deploy-spec-admin-token-1234";
  const v1 = readFileSync(join(root, "policies", "strict.lua"), "utf8");
  const v2 = `${v1}\n-- edited through the ConfigMap\n`;
  writeFileSync(join(dir, "admin.token"), `${token}\n`);
  writeFileSync(join(dir, "news.xml"), RSL);
  chmodSync(join(dir, "admin.token"), 0o600);
  const config = (policy) => `return {
    listen = { { host = "127.0.0.1", port = ${port} } },
    admin = { host = "127.0.0.1", port = ${adminPort}, token_file = "${dir}/admin.token" },
    workers = 1, log_level = "debug",
    policy = { watch_debounce_ms = 50 },
    tenants = { { name = "news", hosts = { "news.example" },
                  catalog = { source = "${dir}/news.xml" }, policy = "${policy}" } },
  }\n`;
  let configPath, write;
  if (layout === "policies volume, absolute path") {
    mkdirSync(join(dir, "policies"));
    writeFileSync(join(dir, "tollgate.lua"), config(`${dir}/policies/news.lua`));
    configPath = join(dir, "tollgate.lua");
    write = (src, n) => atomicWrite(join(dir, "policies"), { "news.lua": src }, n);
  } else if (layout === "policy folder through ..data") {
    // The policies ConfigMap projected with items path "policies/news.lua": the folder the gateway
    // watches, cm/policies, is itself a symlink through ..data (tollgate.lua outside the volume).
    mkdirSync(join(dir, "cm"));
    writeFileSync(join(dir, "tollgate.lua"), config(`${dir}/cm/policies/news.lua`));
    configPath = join(dir, "tollgate.lua");
    write = (src, n) => atomicWrite(join(dir, "cm"), { "policies/news.lua": src }, n);
  } else {
    // tollgate.lua and the policy in one ConfigMap (items path "policies/news.lua"), relative path.
    mkdirSync(join(dir, "cm"));
    configPath = join(dir, "cm", "tollgate.lua");
    write = (src, n) => atomicWrite(join(dir, "cm"), { "tollgate.lua": config("policies/news.lua"), "policies/news.lua": src }, n);
  }
  write(v1, 1);
  const gw = await startGateway(configPath, `projected-${layout.replace(/\W+/g, "-")}`);
  try {
    const status = async () => {
      const res = await fetch(`http://127.0.0.1:${adminPort}/status`, { headers: { Authorization: `Bearer ${token}` } });
      const j = await res.json();
      const t = j.tenants.find((x) => x.name === "news");
      return t.policy;
    };
    await waitFor(async () => ({ ok: (await status()).version === policyVersion(v1) }), 15000, "the gateway serves v1");
    write(v2, 2);
    await waitFor(async () => {
      const p = await status();
      return { ok: p.version === policyVersion(v2), policy: p };
    }, 10000, `the edited policy (${policyVersion(v2)}) is live after the ..data swap`);
    // A second edit: the watch must survive the first swap (the old folder is gone by now).
    const v3 = `${v2}-- edited again\n`;
    write(v3, 3);
    await waitFor(async () => {
      const p = await status();
      return { ok: p.version === policyVersion(v3), policy: p };
    }, 10000, `the second edit (${policyVersion(v3)}) is live after another ..data swap`);
  } finally {
    await gw.stop();
    rmSync(dir, { recursive: true, force: true });
  }
}

describe("policy hot reload through a ConfigMap volume (..data symlink swap)", () => {
  it("policies in their own ConfigMap, absolute path (deploy/k8s layout): each edit goes live", async () => {
    await reloadThroughSwap("policies volume, absolute path");
  });
  it("the policy's folder is a symlink through ..data (ConfigMap items with a sub-path): each edit goes live", async () => {
    await reloadThroughSwap("policy folder through ..data");
  });
  it("tollgate.lua and the policy in one ConfigMap, relative policy path: each edit goes live", async () => {
    await reloadThroughSwap("one volume, relative path");
  });
});

// --- compose ---------------------------------------------------------------------------------

describe("compose (deploy/compose.yaml)", () => {
  const file = join(deploy, "compose.yaml");
  const compose = () => parseYaml(readFileSync(file, "utf8"));

  it("validates against the Compose specification's JSON schema", () => {
    // compose-spec's schema (draft-07), as the dclint package ships it; dclint's own style rules
    // are not applied.
    const schema = JSON.parse(readFileSync(join(here, "node_modules/dclint/schemas/compose.schema.json"), "utf8"));
    delete schema.$schema; // "https://json-schema.org/draft-07/schema": Ajv knows draft-07 as http://...#
    const ajv = new Ajv({ strict: false, allErrors: true });
    addFormats(ajv);
    const validate = ajv.compile(schema);
    const ok = validate(compose());
    assert.ok(ok, JSON.stringify(validate.errors, null, 1));
    const broken = compose();
    broken.services.redis.healtcheck = broken.services.redis.healthcheck; // a typo
    assert.equal(validate(broken), false, "the schema catches an unknown key");
  });

  it("the gateway, Redis with appendonly yes / appendfsync everysec, a labelled billing stand-in, healthchecks", () => {
    const c = compose();
    assert.deepEqual(Object.keys(c.services).sort(), ["billing", "redis", "tollgate"]);
    assert.equal(c.services.tollgate.image, "tollgate:latest");
    const rc = c.services.redis.command.join(" ");
    assert.match(rc, /--appendonly yes/);
    assert.match(rc, /--appendfsync everysec/);
    assert.match(c.services.billing.command.join(" "), /lib\/billing_service\.js/);
    assert.match(JSON.stringify(c.services.billing.labels), /stand-in/i);
    for (const [name, s] of Object.entries(c.services)) assert.ok(s.healthcheck?.test, `${name} has a healthcheck`);
    assert.match(c.services.tollgate.healthcheck.test.join(" "), /\/readyz/);
    for (const [name, s] of Object.entries(c.services)) {
      for (const v of s.volumes || []) {
        if (v.type === "bind") assert.ok(existsSync(resolve(deploy, v.source)), `${name}: ${v.source} exists`);
        if (v.type === "volume") assert.ok(c.volumes && v.source in c.volumes, `${name}: volume ${v.source} declared`);
      }
    }
    assert.ok(c.services.tollgate.depends_on.redis && c.services.tollgate.depends_on.billing);
  });

  it("tollgate check accepts the gateway's configuration with the files mounted as compose mounts them", () => {
    const c = compose();
    const dir = mkdtempSync(join(tmpdir(), "tg-compose-check-"));
    try {
      let cfg = null;
      for (const v of c.services.tollgate.volumes.filter((x) => x.type === "bind")) {
        const target = join(dir, v.target);
        mkdirSync(dirname(target), { recursive: true });
        symlinkSync(resolve(deploy, v.source), target);
        if (v.target.endsWith("tollgate.lua")) cfg = target;
      }
      mkdirSync(join(dir, "var/lib/tollgate"), { recursive: true });
      assert.ok(cfg);
      const text = readFileSync(cfg, "utf8").replace(/"\/var\/lib\/tollgate"/, `"${dir}/var/lib/tollgate"`);
      rmSync(cfg);
      writeFileSync(cfg, text);
      const r = spawnSync(bin, ["check", "-c", cfg], { encoding: "utf8" });
      assert.equal(r.status, 0, `tollgate check: ${r.stdout}${r.stderr}`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

// --- Prometheus and Grafana ------------------------------------------------------------------

describe("prometheus rules and grafana dashboard", () => {
  const promtool = (...args) => {
    const r = spawnSync("promtool", args, { cwd: join(deploy, "prometheus"), encoding: "utf8" });
    assert.equal(r.error, undefined, `promtool (Debian package prometheus) could not run: ${r.error}`);
    return r;
  };

  it("promtool check rules alerts.yml", () => {
    const r = promtool("check", "rules", "alerts.yml");
    assert.equal(r.status, 0, r.stdout + r.stderr);
    assert.match(r.stdout, /SUCCESS: \d+ rules found/);
  });

  it("promtool test rules alerts_test.yml: every alert fires, and does not fire, when it should", () => {
    const r = promtool("test", "rules", "alerts_test.yml");
    assert.equal(r.status, 0, r.stdout + r.stderr);
    const rules = parseYaml(readFileSync(join(deploy, "prometheus/alerts.yml"), "utf8"));
    const tests = parseYaml(readFileSync(join(deploy, "prometheus/alerts_test.yml"), "utf8"));
    const cases = tests.tests.flatMap((t) => t.alert_rule_test);
    for (const g of rules.groups) for (const rule of g.rules) {
      const mine = cases.filter((c) => c.alertname === rule.alert);
      assert.ok(mine.some((c) => c.exp_alerts.length > 0), `${rule.alert} is tested firing`);
      assert.ok(mine.some((c) => c.exp_alerts.length === 0), `${rule.alert} is tested not firing`);
    }
  });

  it("the alerts cover the promised areas and use only metrics the gateway declares", () => {
    const declared = declaredMetrics();
    const rules = parseYaml(readFileSync(join(deploy, "prometheus/alerts.yml"), "utf8"));
    const used = new Set();
    for (const g of rules.groups) for (const r of g.rules) {
      for (const m of metricsIn(r.expr)) {
        assert.ok(family(m, declared), `${r.alert}: ${m} is not declared by any tg_metric_new in core/`);
        used.add(family(m, declared));
      }
    }
    for (const m of ["catalog_last_refresh_timestamp", "billing_timeout_total", "txlog_wal_used_bytes",
      "txlog_ship_lag_seconds", "t402_unsettled_amount", "t402_settlements_total", "policy_errors_total",
      "reporting_obligations_open", "reporting_compliance_rate"]) assert.ok(used.has(m), `an alert on ${m}`);
  });

  it("the Grafana dashboard parses, has a tenant variable, RED panels, and only declared metrics", () => {
    const declared = declaredMetrics();
    const dash = JSON.parse(readFileSync(join(deploy, "grafana/tollgate.json"), "utf8"));
    assert.ok(dash.templating.list.some((v) => v.name === "tenant"), "a tenant variable");
    const exprs = [];
    for (const p of dash.panels) for (const t of p.targets || []) exprs.push(t.expr);
    for (const v of dash.templating.list) if (v.type === "query") exprs.push(v.definition);
    for (const a of dash.annotations.list) if (a.expr) exprs.push(a.expr);
    assert.ok(exprs.length >= 15);
    const used = new Set();
    for (const e of exprs) for (const m of metricsIn(e)) {
      assert.ok(family(m, declared), `dashboard: ${m} is not declared by any tg_metric_new in core/ (${e})`);
      used.add(family(m, declared));
    }
    for (const m of ["exchange_rpc_total", "exchange_rpc_duration_seconds", "policy_decisions_total"])
      assert.ok(used.has(m), `RED: ${m}`);
    assert.ok(dash.panels.filter((p) => p.targets).every((p) => p.targets.every((t) => t.expr.includes("$tenant") || t.expr.includes("$instance"))),
      "every panel follows the variables");
    assert.deepEqual(metricsIn('sum by (le) (rate(no_such_metric_bucket{tenant_id=~"$tenant"}[5m]))'), ["no_such_metric_bucket"]);
    assert.equal(family("no_such_metric_bucket", declared), null, "an unknown metric is caught");
  });
});

// --- the live exposition ---------------------------------------------------------------------

describe("metrics exposition", () => {
  let gw, dir, adminPort, token;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "tg-metrics-"));
    const port = await freePort();
    adminPort = await freePort();
    token = "deploy-spec-admin-token-5678";
    writeFileSync(join(dir, "admin.token"), `${token}\n`);
    writeFileSync(join(dir, "billing.token"), "deploy-spec-billing-token\n");
    writeFileSync(join(dir, "signer.key"), "deploy-spec-signer-key\n");
    writeFileSync(join(dir, "news.xml"), RSL);
    for (const f of ["admin.token", "billing.token", "signer.key"]) chmodSync(join(dir, f), 0o600);
    writeFileSync(join(dir, "tollgate.lua"), `return {
      listen = { { host = "127.0.0.1", port = ${port} } },
      admin = { host = "127.0.0.1", port = ${adminPort}, token_file = "admin.token" },
      workers = 1, data_dir = "data",
      tenants = {
        -- HTTP 402 payments (facilitator and chain down: port 1) on the built-in ledger
        { name = "local", hosts = { "local.example" }, catalog = { source = "news.xml" },
          policy = "${root}/policies/strict.lua", billing = { type = "builtin" },
          signer = { type = "nginx_secure_link", base_url = "http://cdn.local.example", key_file = "signer.key" },
          payments = { accepts = { { network = "eip155:84532", asset = "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                                     name = "USDC", version = "2", pay_to = "0x90F79bf6EB2c4f870365E785982E1f101E93b906",
                                     decimals = 6 } },
                       facilitators = { "http://127.0.0.1:1" }, rpc = { "http://127.0.0.1:1" }, settle = "async" } },
        -- a remote billing service that is down (port 1): its metrics still appear
        { name = "remote", hosts = { "remote.example" }, catalog = { source = "news.xml" },
          policy = "${root}/policies/strict.lua",
          billing = { type = "connect", url = "http://127.0.0.1:1", token_file = "billing.token" } },
      },
    }\n`);
    gw = await startGateway(join(dir, "tollgate.lua"), "metrics");
  });
  after(async () => {
    await gw?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("promtool check metrics is clean, and every family the code declares is in it", async () => {
    const res = await waitFor(async () => {
      const r = await fetch(`http://127.0.0.1:${adminPort}/metrics`, { headers: { Authorization: `Bearer ${token}` } });
      return { ok: r.status === 200, text: await r.text() };
    }, 15000, "/metrics answers");
    const r = spawnSync("promtool", ["check", "metrics"], { input: res.text, encoding: "utf8" });
    assert.equal(r.error, undefined, `promtool: ${r.error}`);
    assert.equal(r.status, 0, `promtool check metrics: ${r.stdout}${r.stderr}`);
    const exposed = new Set([...res.text.matchAll(/^# TYPE (\S+) /gm)].map((m) => m[1]));
    for (const m of ["t402_unsettled_amount", "t402_settlements_total", "billing_timeout_total", "billing_circuit_state", "billing_authorize_total", "txlog_wal_used_bytes",
      "catalog_last_refresh_timestamp", "policy_errors_total", "reporting_compliance_rate", "exchange_rpc_total"])
      assert.ok(exposed.has(m), `${m} exposed`);
    // Families that need a configuration section this gateway does not have.
    const OPTIONAL = [/^txlog_(ship_lag_seconds|ship_pending_records|shipped_records_total|store_errors_total)$/ /* ledger.ship */,
      /^trace_/ /* tracing */];
    for (const m of declaredMetrics().keys()) {
      if (OPTIONAL.some((re) => re.test(m))) continue;
      assert.ok(exposed.has(m), `${m} is declared in core/ but not rendered by a gateway with a data_dir, payments and ` +
        "remote billing (if it needs another configuration section, add it to OPTIONAL here)");
    }
    for (const line of res.text.split("\n").filter((l) => l.startsWith("# HELP "))) {
      const [, name, help] = line.match(/^# HELP (\S+) ?(.*)$/);
      assert.ok(help.length >= 20, `${name}: a HELP text an operator can act on, not "${help}"`);
    }
  });
});
