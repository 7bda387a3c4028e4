// Summarises spec/bench/run.sh's measurements: prints the tables and writes
// the JSON result. Usage: node report.js RESULTS.jsonl META.json OUT.json
// Each line of RESULTS.jsonl is one wrk run or one idle measurement. Peak runs
// belong to a row ("row": "empty", the cheapest path, or "catalog", a loaded
// catalog priced by a Lua policy; META.json's rows say what each measures);
// half-load and idle runs are of the empty row.
'use strict';
const fs = require('fs');

const [resultsPath, metaPath, outPath] = process.argv.slice(2);
if (!outPath) {
  console.error('usage: node report.js RESULTS.jsonl META.json OUT.json');
  process.exit(2);
}
const meta = JSON.parse(fs.readFileSync(metaPath, 'utf8'));
const rows = fs.readFileSync(resultsPath, 'utf8').split('\n').filter((l) => l.trim())
  .map((l) => JSON.parse(l));

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const round = (x, d = 2) => Math.round(x * 10 ** d) / 10 ** d;
const errorsOf = (r) => Object.values(r.errors || {}).reduce((a, b) => a + b, 0);

// Medians are taken per metric: the run with the median rate need not be
// the one with the median p99.
function summarise(runs) {
  if (runs.length === 0) return null;
  return {
    runs: runs.length,
    rps: round(median(runs.map((r) => r.rps)), 1),
    p50_us: median(runs.map((r) => r.p50_us)),
    p90_us: median(runs.map((r) => r.p90_us)),
    p99_us: median(runs.map((r) => r.p99_us)),
    p999_us: median(runs.map((r) => r.p999_us)),
    // The least disturbed run: on a shared machine, the closest to what the server alone does.
    p99_best_us: Math.min(...runs.map((r) => r.p99_us)),
    sent_p99_us: runs[0].sent_p99_us === undefined ? undefined : median(runs.map((r) => r.sent_p99_us)),
    cpu_us_per_req: median(runs.map((r) => r.cpu_us_per_req)),
    runq_wait_ms: median(runs.map((r) => r.server_runq_wait_ms)),
    steal_pct: median(runs.map((r) => r.steal_pct)),
    errors: runs.reduce((a, r) => a + errorsOf(r), 0),
    bytes_per_response: round(median(runs.map((r) => r.bytes / Math.max(r.requests, 1))), 1),
    target_rps: runs[0].target_rps,
    each: runs.map((r) => ({ rps: r.rps, p50_us: r.p50_us, p99_us: r.p99_us, p999_us: r.p999_us,
      cpu_us_per_req: r.cpu_us_per_req, runq_wait_ms: r.server_runq_wait_ms, steal_pct: r.steal_pct,
      errors: errorsOf(r),
      load1_before: r.load1_before })),
  };
}

const servers = ['tollgate', 'nginx_lua'];
const rowOf = (r) => r.row || 'empty';
// Rows in the order run.sh describes them, then any other row found in the results.
const rowNames = [...new Set([...Object.keys(meta.rows || {}),
  ...rows.filter((r) => r.kind === 'peak').map(rowOf)])];
const workerSets = [...new Set(rows.filter((r) => r.kind === 'peak').map((r) => r.workers))];
const result = {
  generated_at: new Date().toISOString(),
  ...meta,
  // peak[row][workers]: { tollgate, nginx_lua, ratio_rps, ratio_p99, ratio_cpu_per_req }
  peak: {},
  // half_load[workers], half_load_wrk_paced[workers] and idle: the empty row only
  half_load: {},
  half_load_wrk_paced: {},
  idle: {},
  // goals[row][workers]
  goals: {},
};

for (const row of rowNames) {
  result.peak[row] = {};
  result.goals[row] = {};
  for (const w of workerSets) {
    const pick = (s) => rows.filter((r) => r.kind === 'peak' && rowOf(r) === row && r.workers === w && r.server === s);
    const peak = Object.fromEntries(servers.map((s) => [s, summarise(pick(s))]));
    if (peak.tollgate && peak.nginx_lua) {
      peak.ratio_rps = round(peak.tollgate.rps / peak.nginx_lua.rps, 3);
      peak.ratio_p99 = round(peak.tollgate.p99_us / peak.nginx_lua.p99_us, 3);
      peak.ratio_cpu_per_req = round(peak.tollgate.cpu_us_per_req / peak.nginx_lua.cpu_us_per_req, 3);
    }
    result.peak[row][w] = peak;
    result.goals[row][w] = {
      rps_at_least_nginx_lua: peak.ratio_rps !== undefined ? peak.ratio_rps >= 1.0 : null,
      cpu_per_req_at_most_nginx_lua: peak.ratio_cpu_per_req !== undefined ? peak.ratio_cpu_per_req <= 1.0 : null,
    };
  }
}
for (const w of workerSets) {
  const pick = (kind, s) => rows.filter((r) => r.kind === kind && r.workers === w && r.server === s);
  const half = Object.fromEntries(servers.map((s) => [s, summarise(pick('half', s))]));
  result.half_load[w] = half;
  result.half_load_wrk_paced[w] = Object.fromEntries(servers.map((s) => [s, summarise(pick('half_wrk', s))]));
  if (result.goals.empty && result.goals.empty[w]) {
    Object.assign(result.goals.empty[w], {
      p99_under_1ms_at_half_load: half.tollgate ? half.tollgate.p99_us < 1000 : null,
      p99_under_1ms_at_half_load_best_run: half.tollgate ? half.tollgate.p99_best_us < 1000 : null,
    });
  }
}
for (const r of rows.filter((x) => x.kind === 'idle')) {
  const grown = (r.rss_after_kb - r.rss_before_kb) * 1024;
  result.idle[r.server] = {
    connections: r.conns,
    open_at_measurement: r.open,
    rss_before_kb: r.rss_before_kb,
    rss_after_kb: r.rss_after_kb,
    rss_after_close_kb: r.rss_closed_kb,
    bytes_per_connection: r.open > 0 ? Math.round(grown / r.open) : null,
  };
}

// Tables.
const pad = (s, n) => String(s).padEnd(n);
const lpad = (s, n) => String(s).padStart(n);
const ms = (us) => (us === undefined || us === null ? '-' : (us / 1000).toFixed(3) + ' ms');
const num = (x) => (x === undefined || x === null ? '-' : Math.round(x).toLocaleString('en-US'));
const label = (w) => (w === 'all' ? `all (${meta.machine.cores})` : w);
const s = meta.settings;

console.log('');
console.log(`Peak: wrk -t${s.threads} -c${s.connections} -d${s.duration_s}s, ${s.runs} run(s) per server and row ` +
  'alternating, medians; nginx+lua answers the bytes captured from tollgate for the same row');
const pct = (x) => (x === undefined || x === null ? '-' : x.toFixed(1) + '%');
const us = (x) => (x === undefined || x === null ? '-' : x.toFixed(1) + ' us');
for (const row of rowNames) {
  const info = (meta.rows || {})[row] || {};
  const req = info.request || {};
  console.log('');
  console.log(`Row "${row}": ${info.measures || '(no description)'}`);
  if (req.body_bytes)
    console.log(`  request ${req.body_bytes} B (${req.body}), answer ${req.response_body_bytes} B ${req.response_content_type}`);
  console.log(pad('workers', 10) + pad('server', 12) + lpad('req/s', 12) + lpad('p50', 12) + lpad('p99', 12) +
    lpad('CPU/req', 12) + lpad('steal', 8) + lpad('errors', 8));
  for (const w of workerSets) {
    const p = result.peak[row][w];
    for (const name of servers) {
      const x = p[name];
      if (!x) continue;
      console.log(pad(label(w), 10) + pad(name === 'nginx_lua' ? 'nginx+lua' : name, 12) + lpad(num(x.rps), 12) +
        lpad(ms(x.p50_us), 12) + lpad(ms(x.p99_us), 12) + lpad(us(x.cpu_us_per_req), 12) + lpad(pct(x.steal_pct), 8) +
        lpad(x.errors, 8));
    }
    if (p.ratio_rps !== undefined)
      console.log(pad(label(w), 10) + pad('ratio', 12) + lpad(p.ratio_rps.toFixed(2) + 'x', 12) +
        lpad('', 12) + lpad(p.ratio_p99.toFixed(2) + 'x', 12) + lpad(p.ratio_cpu_per_req.toFixed(2) + 'x', 12) +
        '   (tollgate / nginx+lua)');
  }
}

function halfTable(title, table, sentColumn) {
  console.log('');
  console.log(title);
  console.log(pad('workers', 10) + pad('server', 12) + lpad('target/s', 12) + lpad('got/s', 12) + lpad('p50', 12) +
    lpad('p99', 12) + lpad('p99.9', 12) + (sentColumn ? lpad('p99 (sent)', 12) : '') + lpad('best p99', 12) +
    lpad('CPU/req', 12) + lpad('runq wait', 12) + lpad('steal', 8));
  for (const w of workerSets) {
    for (const name of servers) {
      const x = table[w] && table[w][name];
      if (!x) continue;
      console.log(pad(label(w), 10) + pad(name === 'nginx_lua' ? 'nginx+lua' : name, 12) +
        lpad(num(x.target_rps), 12) + lpad(num(x.rps), 12) + lpad(ms(x.p50_us), 12) + lpad(ms(x.p99_us), 12) +
        lpad(ms(x.p999_us), 12) + (sentColumn ? lpad(ms(x.sent_p99_us), 12) : '') + lpad(ms(x.p99_best_us), 12) +
        lpad(us(x.cpu_us_per_req), 12) + lpad(x.runq_wait_ms === undefined ? '-' : x.runq_wait_ms + ' ms', 12) +
        lpad(pct(x.steal_pct), 8) +
        (x.errors ? `  errors ${x.errors}` : ''));
    }
  }
}
halfTable(`Half load, row "empty": 0.5 x nginx+lua's median peak req/s, open-loop (pace.c, -c${s.connections}), ` +
  'latency from the intended send time', result.half_load, true);
halfTable('Half load, row "empty", cross-check: same rate paced by wrk\'s delay() hook (1 ms timer: requests leave ' +
  'in 1 ms bursts)', result.half_load_wrk_paced, false);

if (Object.keys(result.idle).length) {
  console.log('');
  console.log('Idle keep-alive connections (row "empty"; one request each, then idle; worker count 1; RSS from /proc)');
  console.log(pad('server', 12) + lpad('conns', 8) + lpad('open', 8) + lpad('RSS before', 14) + lpad('RSS after', 14) +
    lpad('after close', 14) + lpad('per conn', 12));
  for (const name of servers) {
    const x = result.idle[name];
    if (!x) continue;
    const kb = (v) => (v === undefined || v === null ? '-' : num(v) + ' KiB');
    console.log(pad(name === 'nginx_lua' ? 'nginx+lua' : name, 12) + lpad(x.connections, 8) +
      lpad(x.open_at_measurement, 8) + lpad(kb(x.rss_before_kb), 14) + lpad(kb(x.rss_after_kb), 14) +
      lpad(kb(x.rss_after_close_kb), 14) + lpad(num(x.bytes_per_connection) + ' B', 12));
  }
}

console.log('');
console.log('Goals (issue): tollgate req/s >= 1.0x nginx+lua at the same worker count; p99 < 1 ms at half load ' +
  '(empty row)');
const yn = (v) => (v === null || v === undefined ? 'n/a' : v ? 'met' : 'NOT met');
for (const row of rowNames) {
  for (const w of workerSets) {
    const g = result.goals[row][w];
    const half = g.p99_under_1ms_at_half_load === undefined ? '' :
      `half-load p99 ${yn(g.p99_under_1ms_at_half_load)} (best run: ${yn(g.p99_under_1ms_at_half_load_best_run)}); `;
    console.log(`  row ${pad(row, 8)} workers ${label(w)}: throughput ${yn(g.rps_at_least_nginx_lua)}, ${half}` +
      `CPU per request <= nginx+lua's (load-independent proxy for throughput) ${yn(g.cpu_per_req_at_most_nginx_lua)}`);
  }
}
const steals = rows.filter((r) => r.steal_pct !== undefined && r.steal_pct !== null).map((r) => r.steal_pct);
result.machine.steal_pct_median = steals.length ? median(steals) : null;
if (steals.length && median(steals) > 2) {
  console.log(`  NOTE: the hypervisor took a median ${median(steals).toFixed(1)}% of this VM\u2019s CPU time during the ` +
    'runs (steal): stalls it causes are invisible to the guest and land in the latency tails.');
}
if (parseFloat(meta.machine.load_average_start) > 0.5) {
  console.log(`  NOTE: load average was ${meta.machine.load_average_start} at start: other processes shared the ` +
    'cores, so req/s and tail latency are noisy; CPU/req is the steadier comparison.');
}

fs.writeFileSync(outPath, JSON.stringify(result, null, 2) + '\n');
