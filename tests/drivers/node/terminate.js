// What node-postgres sees when its backend is terminated (idle, or in a query), and when it ends a
// client right after connect() (it then sends Terminate before the StartupMessage).
'use strict';
const { pg, config, emit, clientConfig, describe, done, fail } = require('./lib');

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function waitFor(predicate, ms) {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    if (await predicate()) return true;
    await sleep(20);
  }
  return false;
}

async function terminated(mode, killer) {
  const victim = new pg.Client(clientConfig(config.port));
  const events = [];
  let ended = false;
  victim.on('error', (err) => events.push(Object.assign({ kind: 'error event' }, describe(err))));
  victim.on('end', () => { ended = true; events.push({ kind: 'end' }); });
  await victim.connect();
  const pid = (await victim.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
  let running = null;
  if (mode === 'busy') {
    running = victim.query('SELECT pg_sleep(20)').then(
      () => events.push({ kind: 'query result' }),
      (err) => events.push(Object.assign({ kind: 'query error' }, describe(err))));
    await waitFor(async () => (await killer.query(
      "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active' AND query LIKE '%pg_sleep%'", [pid])).rows.length > 0, 10000);
  }
  const killed = (await killer.query('SELECT pg_terminate_backend($1) AS t', [pid])).rows[0].t;
  // In transaction mode pgrelay keeps the client connected: no end to wait for.
  await waitFor(() => ended, config.stays_connected ? 1000 : 10000);
  if (running) await running;
  await sleep(300);  // anything that comes after the close would be seen by now
  let after;
  try {
    await victim.query('SELECT 1');
    after = { kind: 'query result' };
  } catch (err) {
    after = Object.assign({ kind: 'query error' }, describe(err));
  }
  const seen = events.slice();  // not the 'end' of the end() below
  await victim.end().catch(() => {});
  emit({ event: 'terminate', mode, pid, process_id: victim.processID, killed, events: seen, after });
}

async function quick(n) {
  // connect() then end() at once: node-postgres writes Terminate while the socket is still
  // connecting, so it goes out before the StartupMessage, and its connect() promise never settles.
  const outcomes = {};
  for (let i = 0; i < n; i++) {
    const client = new pg.Client(clientConfig(config.port));
    const errors = [];
    let connecting = 'pending';
    let ended = false;
    client.on('error', (err) => errors.push(describe(err)));
    client.on('end', () => { ended = true; });
    client.connect().then(() => { connecting = 'connected'; }, (err) => { connecting = `connect error: ${err.message}`; });
    const ending = await client.end().then(() => 'ended', (err) => `end error: ${err.message}`);
    await waitFor(() => ended, 5000);
    await sleep(50);  // a late ErrorResponse or connect outcome would show by now
    const key = JSON.stringify([connecting, ending, ended ? 'end event' : 'no end event', errors]);
    outcomes[key] = (outcomes[key] || 0) + 1;
  }
  emit({ event: 'quick', outcomes });
}

(async () => {
  if (!config.no_killer) {
    const killer = new pg.Client(clientConfig(config.pg_port));
    await killer.connect();
    for (const mode of config.modes || []) await terminated(mode, killer);
    await killer.end();
  }
  if (config.quick) await quick(config.quick);
  done();
})().catch(fail);
