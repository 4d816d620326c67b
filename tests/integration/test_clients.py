"""Real clients through pgrelay: psql, psycopg2, psycopg 3 (sync and async), asyncpg and node-postgres."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest

NODE_CACHE = "/tmp/pgrelay-node-cache"


# -- psql ------------------------------------------------------------------------------------------

def psql(pg, relay, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(pg.bindir, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                           "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", "-d", "postgres", *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_psql_commands_statements_and_copy(relay, pg, tmp_path):
    result = psql(pg, relay, "-c", "SELECT 40 + 2")
    assert (result.returncode, result.stdout, result.stderr) == (0, "42\n", "")
    # Several statements in one -c string (one simple Query), and several -c options.
    result = psql(pg, relay, "-c", "SELECT 1; SELECT 'two'; SELECT 3")
    assert (result.returncode, result.stdout.split()) == (0, ["1", "two", "3"]), result.stderr
    result = psql(pg, relay, "-c", "DROP TABLE IF EXISTS clients_psql", "-c",
                  "CREATE TABLE clients_psql (id int, name text)", "-c", "SELECT count(*) FROM clients_psql")
    assert (result.returncode, result.stdout.split()) == (0, ["DROP", "TABLE", "CREATE", "TABLE", "0"]), \
        result.stderr

    # \copy from a file and back to a file, and a script on stdin.
    source = tmp_path / "in.csv"
    source.write_text("".join(f"{i},name {i}\n" for i in range(1, 501)))
    target = tmp_path / "out.csv"
    script = (f"\\copy clients_psql FROM '{source}' WITH (FORMAT csv)\n"
              "SELECT count(*), sum(id) FROM clients_psql;\n"
              f"\\copy (SELECT * FROM clients_psql ORDER BY id) TO '{target}' WITH (FORMAT csv)\n")
    result = psql(pg, relay, "-f", "-", stdin=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["COPY", "500", f"500|{sum(range(1, 501))}", "COPY", "500"]
    assert target.read_text() == source.read_text()

    # An error: psql reports PostgreSQL's message and exits 1; the next psql works.
    result = psql(pg, relay, "-c", "SELECT 1/0")
    assert result.returncode == 1
    assert "ERROR:  division by zero" in result.stderr
    result = psql(pg, relay, "-c", "SELECT count(*) FROM clients_psql")
    assert (result.returncode, result.stdout) == (0, "500\n")


# -- psycopg2 --------------------------------------------------------------------------------------

@pytest.mark.smoke
def test_psycopg2(relay):
    conn = psycopg2.connect(relay.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute("DROP TABLE IF EXISTS clients_pg2; CREATE TABLE clients_pg2 (id int, t text)")
            cur.executemany("INSERT INTO clients_pg2 VALUES (%s, %s)", [(i, f"t{i}") for i in range(100)])
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("INSERT INTO clients_pg2 VALUES (-1, 'rolled back')")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*), sum(id) FROM clients_pg2 WHERE t LIKE %s", ("t%",))
            assert cur.fetchone() == (100, sum(range(100)))
            cur.execute("SELECT count(*) FROM clients_pg2 WHERE id = -1")
            assert cur.fetchone() == (0,)
        conn.commit()
        # A server-side (named) cursor lives inside one transaction: one server throughout.
        with conn.cursor(name="clients_named") as named:
            named.itersize = 7
            named.execute("SELECT id FROM clients_pg2 ORDER BY id")
            assert [row[0] for row in named] == list(range(100))
        conn.commit()
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.DivisionByZero) as info:
                cur.execute("SELECT 1/0")
            assert info.value.pgcode == "22012"
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("SELECT %s::text || %s", ("still", " here"))
            assert cur.fetchone() == ("still here",)
        conn.commit()
    finally:
        conn.close()


# -- psycopg 3 -------------------------------------------------------------------------------------

def test_psycopg3_sync(relay):
    # prepare_threshold=None: no named prepared statements, as needed in transaction mode.
    with psycopg.connect(relay.dsn(), prepare_threshold=None) as conn:
        with conn.transaction():
            conn.execute("DROP TABLE IF EXISTS clients_pg3; CREATE TABLE clients_pg3 (id int, t text)")
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO clients_pg3 VALUES (%s, %s)", [(i, f"t{i}") for i in range(50)])
        for i in range(10):
            assert conn.execute("SELECT t FROM clients_pg3 WHERE id = %s", (i,)).fetchone() == (f"t{i}",)
        conn.commit()
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.transaction():
                conn.execute("CREATE UNIQUE INDEX ON clients_pg3 (id)")
                conn.execute("INSERT INTO clients_pg3 VALUES (1, 'dup')")
        assert conn.execute("SELECT count(*) FROM clients_pg3").fetchone() == (50,)
        conn.commit()


def test_psycopg3_prepared_statements_in_session_mode(make_relay):
    relay = make_relay({"pool_mode": "session"})
    with psycopg.connect(relay.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for i in range(10):
            assert conn.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
        prepared = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()[0]
        assert prepared >= 1


def test_psycopg3_async(relay):
    async def client(n: int):
        async with await psycopg.AsyncConnection.connect(relay.dsn(), autocommit=True,
                                                         prepare_threshold=None) as conn:
            values = []
            for i in range(5):
                cur = await conn.execute("SELECT %s::int + %s::int", (n, i))
                values.append((await cur.fetchone())[0])
            async with conn.transaction():
                cur = await conn.execute("SELECT txid_current() = txid_current()")
                assert (await cur.fetchone()) == (True,)
            return values

    async def run():
        return await asyncio.gather(*(client(n) for n in range(20)))

    results = asyncio.run(asyncio.wait_for(run(), 60))
    assert results == [[n + i for i in range(5)] for n in range(20)]


# -- asyncpg ---------------------------------------------------------------------------------------

@pytest.mark.smoke
def test_asyncpg_session_mode_with_prepared_statements(make_relay):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})

    async def run():
        conn = await asyncpg.connect(relay.url())  # default statement cache: named prepared statements
        try:
            values = [await conn.fetchval("SELECT $1::int * 2", i) for i in range(20)]
            stmt = await conn.prepare("SELECT $1::text || '!'")
            shout = await stmt.fetchval("hey")
            async with conn.transaction():
                await conn.execute("CREATE TEMP TABLE clients_apg (n int)")
                await conn.executemany("INSERT INTO clients_apg VALUES ($1)", [(i,) for i in range(30)])
                rows = [r["n"] async for r in conn.cursor("SELECT n FROM clients_apg ORDER BY n", prefetch=4)]
            named = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
            return values, shout, rows, named
        finally:
            await conn.close()

    values, shout, rows, named = asyncio.run(asyncio.wait_for(run(), 60))
    assert values == [i * 2 for i in range(20)]
    assert shout == "hey!"
    assert rows == list(range(30))
    assert named >= 2  # the statement cache really used server-side prepared statements


def test_asyncpg_transaction_mode_without_statement_cache(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})

    async def run():
        a = await asyncpg.connect(relay.url(), statement_cache_size=0)
        b = await asyncpg.connect(relay.url(), statement_cache_size=0)
        try:
            out = []
            for i in range(10):  # alternating on one shared server
                out.append(await a.fetchrow("SELECT $1::int + 1 AS v, pg_backend_pid() AS pid", i))
                out.append(await b.fetchrow("SELECT $1::text AS v, pg_backend_pid() AS pid", f"b{i}"))
            status = await a.execute("SELECT 1")
            return out, status
        finally:
            await a.close()
            await b.close()

    out, status = asyncio.run(asyncio.wait_for(run(), 60))
    assert [r["v"] for r in out] == [v for i in range(10) for v in (i + 1, f"b{i}")]
    assert len({r["pid"] for r in out}) == 1
    assert status == "SELECT 1"


# -- node-postgres ---------------------------------------------------------------------------------

NODE_SCRIPT = """
const { Client } = require('pg');
(async () => {
  const client = new Client({ host: '127.0.0.1', port: Number(process.argv[2]), user: 'postgres',
                              database: 'postgres' });
  await client.connect();
  const a = await client.query('SELECT $1::int + 1 AS n, $2::text AS s', [41, 'node']);
  const b = await client.query('SELECT count(*)::int AS c FROM generate_series(1, $1::int)', [7]);
  const c = await client.query('SELECT 2 AS two');
  console.log(JSON.stringify({ n: a.rows[0].n, s: a.rows[0].s, c: b.rows[0].c, two: c.rows[0].two }));
  await client.end();
})().catch((err) => { console.error(err); process.exit(1); });
"""


def node_pg_modules() -> str:
    """node_modules holding pg@8, installed once into NODE_CACHE."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.fail("node and npm are needed for the node-postgres test (apt-get install nodejs npm)",
                    pytrace=False)
    modules = os.path.join(NODE_CACHE, "node_modules")
    if not os.path.exists(os.path.join(modules, "pg", "package.json")):
        os.makedirs(NODE_CACHE, exist_ok=True)
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", NODE_CACHE, "pg@8"],
                                capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            pytest.fail(f"`npm install pg@8` into {NODE_CACHE} failed (network or registry problem?):\n"
                        f"{result.stderr[-2000:]}", pytrace=False)
    return modules


def test_node_postgres_parameterized_query(relay, tmp_path):
    modules = node_pg_modules()
    script = tmp_path / "client.js"
    script.write_text(NODE_SCRIPT)
    result = subprocess.run(["node", str(script), str(relay.port)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, NODE_PATH=modules))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"n": 42, "s": "node", "c": 7, "two": 2}
