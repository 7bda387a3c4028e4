// The TLS listener, driven by the real Connect client over https with a test CA
// made by the openssl CLI at start-up.
import { describe, it, before, after } from "node:test";
import assert from "node:assert/strict";
import { connect as tlsConnect } from "node:tls";
import { createClient, ConnectError, Code } from "@connectrpc/connect";
import { createConnectTransport } from "@connectrpc/connect-node";
import { ExchangeService, AbsenceReason } from "./gen/ramp/v1/exchange_pb.js";
import { startGateway } from "./lib/gateway.js";

function tlsClient(gw, opts = {}) {
  return createClient(ExchangeService, createConnectTransport({
    baseUrl: gw.tlsUrl,
    httpVersion: "1.1",
    nodeOptions: { ca: gw.ca },
    ...opts,
  }));
}

describe("TLS listener", () => {
  let gw;
  before(async () => { gw = await startGateway(); });
  after(async () => {
    if (gw && !gw.stopped) await gw.stop();
    if (gw) gw.cleanup();
  });

  for (const [mode, opts] of [
    ["binary", { useBinaryFormat: true }],
    ["JSON", { useBinaryFormat: false }],
    ["GET", { useHttpGet: true }],
  ]) {
    it(`DiscoverResources over https in ${mode} mode`, async () => {
      const res = await tlsClient(gw, opts).discoverResources({
        resources: [{ uri: "https://news.example/a" }, { uri: "https://unknown.example/x" }],
      });
      assert.equal(res.results.length, 2);
      assert.equal(res.results[0].uri, "https://news.example/a");
      assert.equal(res.results[0].absenceReason, AbsenceReason.NOT_FOR_SALE);
      assert.equal(res.results[1].absenceReason, AbsenceReason.TENANT_UNKNOWN);
    });
  }

  it("Connect errors arrive intact over https", async () => {
    await assert.rejects(tlsClient(gw).executeTransaction({ idempotencyKey: "" }), (err) => {
      assert.ok(err instanceof ConnectError);
      assert.equal(Code[err.code], Code[Code.InvalidArgument]);
      return true;
    });
  });

  it("a client that does not trust the CA refuses the certificate", async () => {
    await assert.rejects(
      createClient(ExchangeService, createConnectTransport({ baseUrl: gw.tlsUrl, httpVersion: "1.1" }))
        .discoverResources({ resources: [{ uri: "https://news.example/a" }] }),
      (err) => {
        assert.ok(err instanceof ConnectError);
        assert.match(String(err.cause?.code ?? err.message), /CERT|VERIFY|certificate|self.signed|issuer/i);
        return true;
      });
  });

  it("the handshake offers the configured certificate for 127.0.0.1", async () => {
    const peer = await new Promise((ok, fail) => {
      const s = tlsConnect({ host: "127.0.0.1", port: gw.tlsPort, ca: gw.ca, ALPNProtocols: ["http/1.1"] }, () => {
        const cert = s.getPeerCertificate();
        const info = { authorized: s.authorized, subject: cert.subject, protocol: s.getProtocol() };
        s.end();
        ok(info);
      });
      s.on("error", fail);
    });
    assert.equal(peer.authorized, true);
    assert.equal(peer.subject.CN, "localhost");
    assert.match(peer.protocol, /^TLSv1\.[23]$/);
  });

  it("plain HTTP on the TLS port is not served", async () => {
    const got = await fetch(`http://127.0.0.1:${gw.tlsPort}/healthz`, { signal: AbortSignal.timeout(3000) })
      .then((r) => r.status, () => "refused");
    assert.ok(got === "refused" || got >= 400, `got ${got}`);
  });

  it("SIGTERM stops the gateway with exit code 0", async () => {
    const r = await gw.stop(5000);
    assert.equal(r.code, 0, `exit ${JSON.stringify(r)}; log:\n${gw.log().slice(-2000)}`);
  });
});
