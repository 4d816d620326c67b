// Queries per second through pgrelay: neon() over HTTP, a Neon Pool over WebSocket, or a node-postgres Pool over TCP.
'use strict';
const { neon, neonConfig, Pool: NeonPool } = require('@neondatabase/serverless');
const pg = require('pg');
const ws = require('ws');

const config = JSON.parse(process.argv[2]);
neonConfig.fetchEndpoint = () => `http://127.0.0.1:${config.serverless_port}/sql`;
neonConfig.useSecureWebSocket = false;
neonConfig.wsProxy = () => `127.0.0.1:${config.serverless_port}/v2`;
neonConfig.webSocketConstructor = ws;

const url = `postgresql://postgres:secret@localhost:${config.tcp_port}/postgres`;
const SQL = 'SELECT $1::int AS v';

function runner() {
  if (config.mode === 'http') {
    const sql = neon(url);
    return { query: (i) => sql.query(SQL, [i]), end: async () => {} };
  }
  const pool = config.mode === 'ws'
    ? new NeonPool({ connectionString: url, max: config.clients })
    : new pg.Pool({ host: '127.0.0.1', port: config.tcp_port, user: 'postgres', password: 'secret',
      database: 'postgres', max: config.clients });
  return { query: (i) => pool.query(SQL, [i]).then((r) => r.rows), end: () => pool.end() };
}

(async () => {
  const r = runner();
  const latencies = [];
  let errors = 0;
  let measuring = false;
  let stop = false;
  async function loop(id) {
    let i = id * 1000000;
    while (!stop) {
      const t0 = process.hrtime.bigint();
      try {
        const rows = await r.query(i);
        if (rows[0].v !== i) errors += 1;
      } catch (e) {
        errors += 1;
      }
      if (measuring) latencies.push(Number(process.hrtime.bigint() - t0) / 1e6);
      i += 1;
    }
  }
  const loops = Array.from({ length: config.clients }, (_, id) => loop(id));
  await new Promise((resolve) => setTimeout(resolve, config.warmup_ms));
  measuring = true;
  const started = Date.now();
  process.stdout.write(JSON.stringify({ event: 'measuring' }) + '\n');
  await new Promise((resolve) => setTimeout(resolve, config.seconds * 1000));
  measuring = false;
  const elapsed = (Date.now() - started) / 1000;
  const count = latencies.length;
  stop = true;
  await Promise.all(loops);
  await r.end();
  latencies.sort((a, b) => a - b);
  const pct = (p) => (count ? latencies[Math.min(count - 1, Math.floor(p * count))] : null);
  process.stdout.write(JSON.stringify({ event: 'result', mode: config.mode, clients: config.clients, queries: count,
    seconds: elapsed, qps: count / elapsed, p50_ms: pct(0.5), p99_ms: pct(0.99), errors }) + '\n');
  process.exit(0);
})();
