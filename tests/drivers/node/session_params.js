// node-postgres clients with startup parameters (statement_timeout, options -c ...): what every
// transaction sees (SHOW), and whether statement_timeout is enforced (pg_sleep past it).
'use strict';
const { pg, config, emit, clientConfig, describe, done, fail } = require('./lib');

async function one(spec) {
  const client = new pg.Client(clientConfig(config.port, spec.settings));
  const errors = [];
  client.on('error', (err) => errors.push(describe(err)));
  await client.connect();
  const seen = {};
  for (let i = 0; i < config.transactions; i++) {
    try {
      await client.query('BEGIN');
      const r = await client.query(
        "SELECT current_setting('statement_timeout') AS st, current_setting('default_transaction_isolation') AS dti, "
        + "current_setting('transaction_isolation') AS ti, pg_backend_pid() AS pid");
      const st = (await client.query('SHOW statement_timeout')).rows[0].statement_timeout;
      const dti = (await client.query('SHOW default_transaction_isolation')).rows[0].default_transaction_isolation;
      await client.query('COMMIT');
      const out = (await client.query('SHOW statement_timeout')).rows[0].statement_timeout;  // outside a transaction
      const row = r.rows[0];
      const key = JSON.stringify([row.st, row.dti, row.ti, st, dti, out]);
      seen[key] = (seen[key] || 0) + 1;
    } catch (err) {
      errors.push(describe(err));
      try { await client.query('ROLLBACK'); } catch (e) { /* gone */ }
    }
    // Let the other clients' transactions run in between, on the same servers.
    await new Promise((resolve) => setImmediate(resolve));
  }
  let sleep = null;
  if (spec.sleep) {
    const t0 = Date.now();
    try {
      await client.query(`SELECT pg_sleep(${Number(spec.sleep)})`);
      sleep = { code: null, ms: Date.now() - t0 };
    } catch (err) {
      sleep = Object.assign(describe(err), { ms: Date.now() - t0 });
    }
  }
  await client.end();
  emit({ event: 'client', label: spec.label, seen, errors, sleep });
}

(async () => {
  await Promise.all(config.clients.map(one));
  done();
})().catch(fail);
