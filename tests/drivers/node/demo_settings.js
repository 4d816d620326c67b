// The Neon serverless driver settings `pgrelay demo` prints, pasted as printed (config.settings),
// then one query through neon() (HTTP) and one through Pool (WebSocket).
'use strict';
const { config, emit, done } = require('./lib');
const { neon, neonConfig, Pool } = require('@neondatabase/serverless');
const ws = require('ws');

async function main() {
  eval(config.settings);  // eslint-disable-line no-eval
  const sql = neon(config.url, { arrayMode: true });
  const http = await sql`SELECT pg_is_in_recovery(), current_user`;
  const pool = new Pool({ connectionString: config.url });
  const result = await pool.query({ text: 'SELECT pg_is_in_recovery(), current_user', rowMode: 'array' });
  await pool.end();
  const text = (rows) => rows.map((row) => row.map((v) => (typeof v === 'boolean' ? (v ? 't' : 'f') : v)));
  emit({ event: 'rows', http: text(http), ws: text(result.rows) });
  done();
}

main();
