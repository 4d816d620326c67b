// node-postgres named queries ({name, text, values}) from many concurrent clients, results checked.
'use strict';
const { pg, config, emit, clientConfig, describe, done, fail } = require('./lib');

const Q1 = 'SELECT $1::int * 2 AS v, $2::text AS who, pg_backend_pid() AS pid';
const Q2 = 'SELECT $1::int + 1 AS v';
const Q3 = 'SELECT n FROM generate_series(1, $1::int) AS n';

let ok = 0;
let wrong = 0;
const errors = [];
const servers = new Set();  // every server pid any client's q1 ran on
let movedClients = 0;  // clients whose q1 ran on more than one server

function check(cond, what) {
  if (cond) { ok += 1; return; }
  wrong += 1;
  if (errors.length < 20) errors.push({ code: 'WRONG', message: what });
}

async function one(id) {
  const client = new pg.Client(clientConfig(config.port));
  client.on('error', (err) => { if (errors.length < 20) errors.push(describe(err)); });
  await client.connect();
  const who = `c${id}`;
  const mine = new Set();
  for (let i = 0; i < config.iterations; i++) {
    try {
      const r1 = await client.query({ name: 'q1', text: Q1, values: [i, who] });
      check(r1.rows.length === 1 && r1.rows[0].v === 2 * i && r1.rows[0].who === who, `q1 ${who} ${i}: ${JSON.stringify(r1.rows)}`);
      mine.add(r1.rows[0].pid);
      servers.add(r1.rows[0].pid);
      const want = (i % 5) + 1;
      const r3 = await client.query({ name: 'q3', text: Q3, values: [want] });
      check(r3.rows.length === want && r3.rows[want - 1].n === want, `q3 ${who} ${i}: ${JSON.stringify(r3.rows)}`);
      if (i % 4 === 3) {
        await client.query('BEGIN');
        const r2 = await client.query({ name: 'q2', text: Q2, values: [i] });
        const r1b = await client.query({ name: 'q1', text: Q1, values: [i + 1, who] });
        await client.query('COMMIT');
        check(r2.rows[0].v === i + 1 && r1b.rows[0].v === 2 * (i + 1), `tx ${who} ${i}`);
      }
    } catch (err) {
      if (errors.length < 20) errors.push(describe(err));
      errors.count = (errors.count || 0) + 1;
      try { await client.query('ROLLBACK'); } catch (e) { /* the connection may be gone */ }
    }
  }
  if (mine.size > 1) movedClients += 1;
  await client.end();
}

(async () => {
  const started = Date.now();
  const results = await Promise.allSettled(Array.from({ length: config.clients }, (_, id) => one(id)));
  const failedClients = results.filter((r) => r.status === 'rejected').map((r) => describe(r.reason));
  emit({
    event: 'summary', clients: config.clients, iterations: config.iterations, ok, wrong,
    query_errors: errors.count || 0, errors, servers: servers.size, moved_clients: movedClients, failed_clients: failedClients, ms: Date.now() - started,
  });
  done();
})().catch(fail);
