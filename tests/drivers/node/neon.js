// @neondatabase/serverless (HTTP neon() and WebSocket Pool/Client with ws) and node-postgres over TCP, run task by task.
'use strict';
const fs = require('fs');
const path = require('path');
const { pg, config, emit, done, fail } = require('./lib');
const { neon, neonConfig, Pool, Client } = require('@neondatabase/serverless');
const ws = require('ws');

// The contract's section 3: a local pgrelay without TLS.
neonConfig.fetchEndpoint = () => `${config.https ? 'https' : 'http'}://127.0.0.1:${config.http_port}/sql`;
neonConfig.useSecureWebSocket = !!config.wss;
neonConfig.wsProxy = (host, port) => `127.0.0.1:${config.ws_port}/v2`;
neonConfig.webSocketConstructor = ws;
if (config.pipeline_connect !== undefined) neonConfig.pipelineConnect = config.pipeline_connect;

function url(task) {
  const user = encodeURIComponent(task.user || config.user || 'postgres');
  const password = encodeURIComponent(task.password !== undefined ? task.password : (config.password || 'secret'));
  const database = encodeURIComponent(task.database || config.database || 'postgres');
  return `postgresql://${user}:${password}@localhost:${config.tcp_port}/${database}`;
}

// A JS value as JSON that tells Buffers, Dates and bigints apart (what a test compares).
function value(v) {
  if (v === null || v === undefined) return v === null ? null : { undefined: true };
  if (Buffer.isBuffer(v) || v instanceof Uint8Array) return { bytea: Buffer.from(v).toString('hex') };
  if (v instanceof Date) return { date: v.toISOString() };
  if (typeof v === 'bigint') return { bigint: v.toString() };
  if (Array.isArray(v)) return v.map(value);
  if (typeof v === 'object') return { object: Object.fromEntries(Object.entries(v).map(([k, x]) => [k, value(x)])) };
  return v;
}

function result(r) {
  const rows = r.rows.map((row) => (Array.isArray(row) ? row.map(value) : { object: Object.fromEntries(Object.entries(row).map(([k, x]) => [k, value(x)])) }));
  const fields = (r.fields || []).map((f) => ({ name: f.name, dataTypeID: f.dataTypeID, tableID: f.tableID, columnID: f.columnID,
    dataTypeSize: f.dataTypeSize, dataTypeModifier: f.dataTypeModifier, format: f.format }));
  return { command: r.command, rowCount: r.rowCount, fields, rows };
}

const ERROR_FIELDS = ['severity', 'code', 'detail', 'hint', 'position', 'internalPosition', 'internalQuery', 'where',
  'schema', 'table', 'column', 'dataType', 'constraint'];

function error(err) {
  const out = { name: err && err.constructor && err.constructor.name, message: String(err && err.message) };
  for (const k of ERROR_FIELDS) if (err && err[k] !== undefined && err[k] !== null) out[k] = err[k];
  return out;
}

// One query through `via`: http (neon() fullResults), ws_pool, ws_client, tcp (node-postgres).
async function query(via, task, text, params, arrayMode) {
  if (via === 'http') {
    const sql = neon(url(task), { fullResults: true, arrayMode: !!arrayMode });
    return sql.query(text, params || []);
  }
  const q = { text, values: params || [], rowMode: arrayMode ? 'array' : undefined };
  if (via === 'ws_pool') {
    const pool = new Pool({ connectionString: url(task) });
    try { return await pool.query(q); } finally { await pool.end(); }
  }
  const client = via === 'tcp'
    ? new pg.Client({ host: '127.0.0.1', port: config.tcp_port, user: task.user || config.user || 'postgres',
      password: task.password !== undefined ? task.password : (config.password || 'secret'),
      database: task.database || config.database || 'postgres', connectionTimeoutMillis: 10000 })
    : new Client(url(task));
  client.on('error', () => {});
  await client.connect();
  try { return await client.query(q); } finally { await client.end(); }
}

const ops = {
  // {via, text, params, array_mode}
  async query(t) { return result(await query(t.via, t, t.text, t.params, t.array_mode)); },

  // neon() with its default options (no fullResults): what an application gets
  async plain(t) {
    const sql = neon(url(t), { arrayMode: !!t.array_mode });
    return (await sql.query(t.text, t.params || [])).map((row) => value(row));
  },

  // sql.transaction([...], {isolationLevel, readOnly, deferrable}) over HTTP
  async transaction(t) {
    const sql = neon(url(t), { fullResults: true, arrayMode: !!t.array_mode });
    const opts = {};
    if (t.isolation) opts.isolationLevel = t.isolation;
    if (t.read_only !== undefined) opts.readOnly = t.read_only;
    if (t.deferrable !== undefined) opts.deferrable = t.deferrable;
    const results = await sql.transaction(t.queries.map((q) => sql.query(q.text, q.params || [])), opts);
    return results.map(result);
  },

  // BEGIN; statements; ROLLBACK on one WebSocket connection (Pool client or Client)
  async rollback(t) {
    let client, release;
    if (t.via === 'ws_pool') {
      const pool = new Pool({ connectionString: url(t) });
      client = await pool.connect();
      release = async () => { client.release(); await pool.end(); };
    } else {
      client = new Client(url(t));
      await client.connect();
      release = () => client.end();
    }
    const seen = [];
    try {
      await client.query('BEGIN');
      for (const s of t.statements) seen.push(result(await client.query(s)));
      await client.query('ROLLBACK');
      seen.push(result(await client.query(t.after)));
    } finally { await release(); }
    return seen;
  },

  // `clients` WebSocket Clients connected at once, each running transactions; the server pids they saw
  async concurrent(t) {
    const pids = new Set();
    let ok = 0;
    const errors = [];
    const clients = Array.from({ length: t.clients }, () => new Client(url(t)));
    await Promise.all(clients.map(async (c) => { c.on('error', (e) => errors.push(error(e))); await c.connect(); }));
    await Promise.all(clients.map(async (c, i) => {
      try {
        for (let k = 0; k < t.iterations; k++) {
          await c.query('BEGIN');
          const r = await c.query('SELECT pg_backend_pid() AS pid, $1::int * 2 AS v', [i * 100 + k]);
          await c.query('SELECT pg_sleep(0.005)');
          await c.query('COMMIT');
          pids.add(r.rows[0].pid);
          if (r.rows[0].v === 2 * (i * 100 + k)) ok += 1; else errors.push({ message: `wrong ${JSON.stringify(r.rows)}` });
        }
      } catch (e) { errors.push(error(e)); } finally { await c.end(); }
    }));
    return { ok, errors: errors.slice(0, 20), error_count: errors.length, pids: [...pids] };
  },

  // LISTEN on a WebSocket Client; NOTIFY from another one; the notification it got
  async listen(t) {
    const listener = new Client(url(t));
    await listener.connect();
    const got = new Promise((resolve) => listener.on('notification', (n) => resolve({ channel: n.channel, payload: n.payload })));
    await listener.query(`LISTEN ${t.channel}`);
    const sender = new Client(url(t));
    await sender.connect();
    await sender.query('SELECT pg_notify($1, $2)', [t.channel, t.payload]);
    await sender.end();
    const n = await Promise.race([got, new Promise((resolve) => setTimeout(() => resolve(null), 10000))]);
    await listener.end();
    return n;
  },

  // connect only (errors are data)
  async connect(t) {
    if (t.via === 'tcp') return result(await query('tcp', t, 'SELECT current_user AS u'));
    const client = new Client(url(t));
    client.on('error', () => {});
    await client.connect();
    const r = await client.query('SELECT current_user AS u');
    await client.end();
    return result(r);
  },
};

(async () => {
  for (const t of config.tasks) {
    try {
      emit({ event: 'task', id: t.id, ok: true, result: await ops[t.op](t) });
    } catch (err) {
      emit({ event: 'task', id: t.id, ok: false, error: error(err) });
    }
  }
  const installed = (name) => JSON.parse(fs.readFileSync(path.join(__dirname, 'node_modules', name, 'package.json'))).version;
  done({ neon: installed('@neondatabase/serverless'), ws: installed('ws') });
})().catch(fail);
