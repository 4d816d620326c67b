// Shared by the node-postgres driver programs: JSON-line output, the watchdog and client settings.
'use strict';
const pg = require('pg');

const config = JSON.parse(process.argv[2] || '{}');

function emit(record) {
  process.stdout.write(JSON.stringify(record) + '\n');
}

// A bounded run: if the program has not finished by deadline_ms it says so and exits non-zero.
const watchdog = setTimeout(() => {
  emit({ event: 'watchdog', deadline_ms: config.deadline_ms });
  process.exit(3);
}, config.deadline_ms || 60000);
watchdog.unref();

// node-postgres settings for one client of 127.0.0.1:port, with bounded connect and query times.
function clientConfig(port, extra) {
  return Object.assign({
    host: '127.0.0.1', port, user: config.user || 'postgres', database: config.database || 'postgres',
    connectionTimeoutMillis: 10000, query_timeout: 30000,
  }, extra || {});
}

// An error as data: what a test compares between pgrelay and PostgreSQL.
function describe(err) {
  return { code: err.code || null, severity: err.severity || null, message: String(err.message) };
}

function done(extra) {
  emit(Object.assign({ event: 'done', pg: require('pg/package.json').version }, extra || {}));
  process.exit(0);
}

function fail(err) {
  emit({ event: 'crash', error: describe(err), stack: String(err && err.stack) });
  process.exit(2);
}

process.on('unhandledRejection', fail);

module.exports = { pg, config, emit, clientConfig, describe, done, fail };
