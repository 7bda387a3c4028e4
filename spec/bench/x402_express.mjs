// The reference x402 seller for spec/bench/x402.sh: express 5 with @x402/express 2.27's
// paymentMiddleware (x402ResourceServer + @x402/evm's exact scheme, an HTTPFacilitatorClient
// on the test kit's facilitator), all from spec/interop/node_modules, unchanged. One route,
// GET PATH_PATTERN, priced like the gateway's tenant: the same network, asset (with the
// token's EIP-712 name and version as `extra`), amount, payTo and maxTimeoutSeconds. A paid
// request would get 200 {"paid":true}; the benchmark only sends unpaid ones.
//
//   node spec/bench/x402_express.mjs --port N --facilitator URL --network eip155:84532
//        --asset 0x.. --amount 1000 --name USDC --version 2 --pay-to 0x.. [--max-timeout 60]
//        [--route "/articles/*"] [--workers 1]
//
// --workers N > 1 runs N processes with node:cluster (the primary hands out connections).
// The middleware asks the facilitator's /supported when it starts (syncFacilitatorOnStart);
// each process prints "ready <pid>" once it listens and that has been done.
import cluster from "node:cluster";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const interop = createRequire(join(here, "..", "interop", "package.json"));
const express = interop("express");
const { paymentMiddleware, x402ResourceServer } = interop("@x402/express");
const { HTTPFacilitatorClient } = interop("@x402/core/server");
const { ExactEvmScheme } = interop("@x402/evm/exact/server");

const argv = process.argv.slice(2);
const opt = (name, def) => { const i = argv.indexOf(name); return i >= 0 ? argv[i + 1] : def; };
const port = Number(opt("--port"));
const workers = Number(opt("--workers", "1"));
const need = ["--port", "--facilitator", "--network", "--asset", "--amount", "--name", "--version", "--pay-to"];
for (const n of need) {
  if (opt(n) === undefined) {
    console.error(`x402_express: ${n} is required`);
    process.exit(2);
  }
}

async function serve() {
  const facilitator = new HTTPFacilitatorClient({ url: opt("--facilitator") });
  const network = opt("--network");
  const server = new x402ResourceServer(facilitator).register(network, new ExactEvmScheme());
  const route = opt("--route", "/articles/*");
  const routes = {
    [`GET ${route}`]: {
      accepts: {
        scheme: "exact",
        network,
        payTo: opt("--pay-to"),
        price: { amount: opt("--amount"), asset: opt("--asset"), extra: { name: opt("--name"), version: opt("--version") } },
        maxTimeoutSeconds: Number(opt("--max-timeout", "60")),
      },
    },
  };
  const app = express();
  app.disable("x-powered-by");
  app.disable("etag");
  // The middleware starts its sync with the facilitator (GET /supported) when it is made;
  // the resource server's own initialize() below is awaited, so that "ready" comes after the
  // facilitator has answered (the script's first request also waits for the middleware's).
  app.use(paymentMiddleware(routes, server));
  app.get(route.replace(/\*$/, ":id"), (req, res) => res.json({ paid: true }));
  await server.initialize();
  await new Promise((ok, fail) => {
    const srv = app.listen(port, "127.0.0.1", ok);
    srv.once("error", fail);
    srv.keepAliveTimeout = 600000;
    srv.headersTimeout = 610000;
  });
  process.stdout.write(`ready ${process.pid}\n`);
}

if (workers > 1 && cluster.isPrimary) {
  let ready = 0;
  for (let i = 0; i < workers; i++) {
    const w = cluster.fork();
    w.on("message", (m) => { if (m === "ready" && ++ready === workers) process.stdout.write(`ready ${process.pid}\n`); });
  }
  cluster.on("exit", (w, code, signal) => {
    console.error(`x402_express: worker ${w.process.pid} exited (${code ?? signal})`);
    process.exit(1);
  });
  const stop = () => { cluster.removeAllListeners("exit"); for (const w of Object.values(cluster.workers)) w.kill("SIGTERM"); process.exit(0); };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
} else {
  serve().then(() => { if (cluster.isWorker) process.send("ready"); })
    .catch((e) => { console.error(e?.stack ?? String(e)); process.exit(1); });
}
