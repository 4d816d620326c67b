"""Protocol-level named prepared statements in transaction pooling (max_prepared_statements): real drivers,
pgbench, raw protocol, bad inputs and faults, against real PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import struct
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from ..support import RawClient, connect, data_rows, error_fields, message, query_message, scalar, wait_until

CLIENTS = 50


def parse(name: str, sql: str, types: tuple[int, ...] = ()) -> bytes:
    return message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!H", len(types))
                   + b"".join(struct.pack("!I", t) for t in types))


def bind(stmt: str, params: tuple = (), portal: str = "") -> bytes:
    body = portal.encode() + b"\0" + stmt.encode() + b"\0" + struct.pack("!H", 0) + struct.pack("!H", len(params))
    for p in params:
        if p is None:
            body += struct.pack("!i", -1)
        else:
            v = str(p).encode()
            body += struct.pack("!i", len(v)) + v
    return message(b"B", body + struct.pack("!H", 0))


def execute(portal: str = "") -> bytes:
    return message(b"E", portal.encode() + b"\0" + struct.pack("!I", 0))


def describe(kind: bytes, name: str) -> bytes:
    return message(b"D", kind + name.encode() + b"\0")


def close(kind: bytes, name: str) -> bytes:
    return message(b"C", kind + name.encode() + b"\0")


SYNC = message(b"S")
FLUSH = message(b"H")


def read_replies(client: RawClient, syncs: int = 1) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(syncs):
        out += client.read_until(b"Z")
    return out


def kinds(msgs) -> str:
    return "".join(k.decode() for k, _ in msgs)


def raw(port: int) -> RawClient:
    client = RawClient(port)
    client.login()
    return client


def same_as_postgres(pg, relay, script: list[bytes], syncs: int, setup: list[bytes] = ()):
    """Run `script` (after `setup`) directly against PostgreSQL and through pgrelay; both replies."""
    replies = []
    for port in (pg.port, relay.port):
        client = raw(port)
        try:
            for chunk in setup:
                client.send(chunk)
                client.read_until(b"Z")
            client.send(b"".join(script))
            replies.append(read_replies(client, syncs))
        finally:
            client.close()
    return replies


def normalized(msgs):
    """Replies with an ErrorResponse's fields parsed (they are compared field by field)."""
    return [(k, error_fields(b) if k == b"E" else b) for k, b in msgs]


@pytest.fixture
def prelay(make_relay):
    """Transaction pooling with a pool of 2 servers, prepared statements on (the default 200)."""
    return make_relay({"default_pool_size": "2", "max_client_conn": "500", "admin_users": "postgres"})


def show(relay, what: str) -> list[dict]:
    conn = psycopg2.connect(f"host=127.0.0.1 port={relay.port} dbname=pgbouncer user=postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(what)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        conn.close()


def stats(relay) -> dict:
    rows = [r for r in show(relay, "SHOW STATS") if r["database"] == "postgres"]
    return rows[0] if rows else {}


def run_threads(target, count: int, timeout: float = 120) -> list:
    errors: list = []

    def wrap(i):
        try:
            target(i)
        except Exception as exc:  # reported by the test
            errors.append(repr(exc))
    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "clients hung"
    return errors


# -- real drivers -------------------------------------------------------------------------------------

def test_psycopg3_default_prepare_threshold_50_clients(prelay):
    import psycopg

    def client(i):
        with psycopg.connect(prelay.dsn(), autocommit=True) as conn:
            assert conn.prepare_threshold == 5
            for n in range(30):
                assert conn.execute("SELECT %s::int * 2 AS x", (n,)).fetchone()[0] == 2 * n
                assert conn.execute("SELECT %s::text || 'x'", (str(i),)).fetchone()[0] == f"{i}x"
                with conn.transaction():
                    assert conn.execute("SELECT %s::int + %s::int", (n, i)).fetchone()[0] == n + i
                    assert conn.execute("SELECT count(*) FROM generate_series(1, %s::int)",
                                        (n + 1,)).fetchone()[0] == n + 1
    assert run_threads(client, CLIENTS) == []
    s = stats(prelay)
    assert s["total_client_parse_count"] >= CLIENTS * 4  # each client prepared its 4 statements
    # 4 texts (and psycopg's own), 2 servers: parsed once per server, not once per client
    assert s["total_server_parse_count"] <= 2 * 8
    assert s["total_bind_count"] >= CLIENTS * 4 * 25


def test_psycopg3_many_statements_beyond_its_cache(prelay):
    """psycopg keeps 100 prepared statements and DEALLOCATEs the oldest by SQL: that is followed."""
    import psycopg
    with psycopg.connect(prelay.dsn(), autocommit=True, prepare_threshold=0) as conn:
        for n in range(250):
            assert conn.execute(f"SELECT {n} + %s::int", (1,)).fetchone()[0] == n + 1
        for n in range(150, 250):
            assert conn.execute(f"SELECT {n} + %s::int", (2,)).fetchone()[0] == n + 2
        with conn.transaction():
            for n in range(0, 250, 7):
                assert conn.execute(f"SELECT {n} + %s::int", (3,)).fetchone()[0] == n + 3


def test_asyncpg_default_statement_cache_50_clients(prelay):
    import asyncpg

    async def client(i):
        conn = await asyncpg.connect(host="127.0.0.1", port=prelay.port, user="postgres", database="postgres")
        try:
            for n in range(20):
                assert await conn.fetchval("SELECT $1::int * 3", n) == 3 * n
                rows = await conn.fetch("SELECT g, $1::text FROM generate_series(1, $2::int) g", str(i), 3)
                assert [(r[0], r[1]) for r in rows] == [(1, str(i)), (2, str(i)), (3, str(i))]
                async with conn.transaction():
                    await conn.execute("SELECT pg_catalog.set_config('application_name', $1, true)", f"c{i}")
                    assert await conn.fetchval("SELECT current_setting('application_name')") == f"c{i}"
            stmt = await conn.prepare("SELECT $1::int + 100")
            for n in range(10):
                assert await stmt.fetchval(n) == n + 100
            await conn.executemany("SELECT $1::int, $2::text", [(k, str(k)) for k in range(20)])
        finally:
            await conn.close()

    async def main():
        results = await asyncio.gather(*(client(i) for i in range(CLIENTS)), return_exceptions=True)
        return [repr(r) for r in results if isinstance(r, BaseException)]
    assert asyncio.run(asyncio.wait_for(main(), 180)) == []


def _pgbench(pg, port: int, mode: str, seconds: int, clients: int = CLIENTS) -> tuple[float, str]:
    result = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(clients), "-j", "2", "-T", str(seconds),
                             "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "pgbench_ps"],
                            capture_output=True, text=True, timeout=seconds + 120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert re.search(r"number of failed transactions: 0\b", result.stdout), result.stdout
    tps = float(re.search(r"tps = ([\d.]+)", result.stdout).group(1))
    return tps, result.stdout


@pytest.fixture(scope="module")
def pgbench_db(pg):
    if "pgbench_ps" not in pg.psql("SELECT datname FROM pg_database"):
        pg.psql("CREATE DATABASE pgbench_ps")
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres",
                        "pgbench_ps"], check=True, capture_output=True, timeout=300)
    return "pgbench_ps"


def test_pgbench_prepared_50_clients(prelay, pg, pgbench_db):
    prepared, out = _pgbench(pg, prelay.port, "prepared", 4)
    assert prepared > 0
    extended, _ = _pgbench(pg, prelay.port, "extended", 4)
    # The bench (bench/run.py) compares them properly; here only a gross regression fails.
    assert prepared >= 0.5 * extended, (prepared, extended)


def test_pgbench_prepared_full_transactions(prelay, pg, pgbench_db):
    """The TPC-B-like script (updates, inserts, a transaction per run) with -M prepared."""
    result = subprocess.run(["pgbench", "-n", "-M", "prepared", "-c", "20", "-j", "2", "-t", "30",
                             "-h", "127.0.0.1", "-p", str(prelay.port), "-U", "postgres", "pgbench_ps"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "number of transactions actually processed: 600/600" in result.stdout, result.stdout
    assert re.search(r"number of failed transactions: 0\b", result.stdout), result.stdout


# -- one Parse per server ------------------------------------------------------------------------------

def test_same_text_is_parsed_once_per_server(make_relay, pg):
    role = "ps_logged_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE ROLE {role} LOGIN SUPERUSER")
    pg.psql(f"ALTER ROLE {role} SET log_min_duration_statement = 0")
    relay = make_relay({"default_pool_size": "2", "admin_users": "postgres"})
    marker = uuid.uuid4().hex
    text = f"SELECT $1::int + 1 AS {'m' + marker}"
    clients = 40

    def client(i):
        c = RawClient(relay.port)
        c.login(user=role)
        c.send(parse(f"mine_{i}", text) + bind(f"mine_{i}", (i,)) + execute() + SYNC)
        msgs = c.read_until(b"Z")
        assert kinds(msgs) == "12DCZ", msgs
        assert data_rows(msgs) == [[str(i + 1)]]
        c.close()
    assert run_threads(client, clients) == []

    # Server side: PostgreSQL logged every Parse it got of that text (log_min_duration_statement).
    def parses():
        with open(pg.logfile, encoding="utf-8", errors="replace") as f:
            return [line for line in f if marker in line and " parse " in line]
    lines = parses()
    assert 1 <= len(lines) <= 2, lines  # one per server, the pool has 2; 40 clients prepared it
    assert all("parse PGRELAY_" in line for line in lines), lines
    # And each server has it once: both servers, held by two clients in transactions.
    a, b = RawClient(relay.port), RawClient(relay.port)
    for c in (a, b):
        c.login(user=role)
        c.query("BEGIN")
    for c in (a, b):
        rows = data_rows(c.query(f"SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%{marker}%'"))
        assert rows[0][0] in ("0", "1")
        c.query("COMMIT")
        c.close()
    s = stats(relay)
    assert s["total_client_parse_count"] >= clients
    assert s["total_server_parse_count"] <= 2


# -- raw protocol ---------------------------------------------------------------------------------------

def test_parse_bind_execute_sync_in_one_packet_and_on_another_server(prelay):
    a = raw(prelay.port)
    a.send(parse("s1", "SELECT $1::int * 10") + bind("s1", (4,)) + execute() + SYNC)
    msgs = read_replies(a)
    assert kinds(msgs) == "12DCZ" and data_rows(msgs) == [["40"]]
    # Occupy a's server with another client's transaction, then a uses s1 on the other server.
    b = raw(prelay.port)
    b.query("BEGIN")
    b_pid = data_rows(b.query("SELECT pg_backend_pid()"))[0][0]
    a.query("BEGIN")
    a_pid = data_rows(a.query("SELECT pg_backend_pid()"))[0][0]
    assert a_pid != b_pid
    a.send(bind("s1", (5,)) + execute() + SYNC)
    msgs = read_replies(a)
    assert kinds(msgs) == "2DCZ" and data_rows(msgs) == [["50"]]
    a.send(describe(b"S", "s1") + SYNC)
    msgs = read_replies(a)
    assert kinds(msgs) == "tTZ"
    assert struct.unpack("!HI", msgs[0][1]) == (1, 23)  # one parameter, int4
    a.query("COMMIT")
    b.query("COMMIT")
    a.close()
    b.close()


def test_messages_split_across_packets(prelay):
    c = raw(prelay.port)
    data = parse("split", "SELECT $1::text || '!'") + bind("split", ("hi",)) + describe(b"P", "") + execute() + SYNC
    for i in range(len(data)):
        c.send(data[i:i + 1])
        time.sleep(0.001)
    msgs = read_replies(c)
    assert kinds(msgs) == "12TDCZ" and data_rows(msgs) == [["hi!"]]
    data = bind("split", ("yo",)) + execute() + SYNC
    c.send(data[:3])
    time.sleep(0.05)
    c.send(data[3:12])
    time.sleep(0.05)
    c.send(data[12:])
    msgs = read_replies(c)
    assert kinds(msgs) == "2DCZ" and data_rows(msgs) == [["yo!"]]
    c.close()


def test_pipelined_batches(prelay):
    c = raw(prelay.port)
    batch = b""
    for i in range(20):
        batch += parse(f"p{i}", f"SELECT {i} + $1::int") + bind(f"p{i}", (i,)) + execute() + SYNC
    batch += b"".join(bind(f"p{i}", (1,)) + execute() + SYNC for i in range(20))
    batch += b"".join(close(b"S", f"p{i}") for i in range(20)) + SYNC
    c.send(batch)
    msgs = read_replies(c, 41)
    assert kinds(msgs) == "12DCZ" * 20 + "2DCZ" * 20 + "3" * 20 + "Z"
    assert data_rows(msgs) == [[str(2 * i)] for i in range(20)] + [[str(i + 1)] for i in range(20)]
    # many clients sharing the texts, pipelining, with Flush between
    def client(i):
        d = raw(prelay.port)
        d.send(parse("q", "SELECT $1::int") + FLUSH)
        assert d.read_message()[0] == b"1"
        d.send(bind("q", (i,)) + execute() + SYNC + bind("q", (i + 1,)) + execute() + SYNC)
        msgs = read_replies(d, 2)
        assert data_rows(msgs) == [[str(i)], [str(i + 1)]], msgs
        d.close()
    assert run_threads(client, 20) == []
    c.close()


def test_unnamed_statements_pass_through(prelay):
    c = raw(prelay.port)
    c.send(parse("", "SELECT $1::int") + bind("", (7,)) + execute() + SYNC)
    msgs = read_replies(c)
    assert kinds(msgs) == "12DCZ" and data_rows(msgs) == [["7"]]
    s = stats(prelay)
    assert s["total_client_parse_count"] == 0 and s["total_bind_count"] == 0
    c.close()


def test_session_pooling_passes_names_through(make_relay):
    relay = make_relay({"pool_mode": "session"})
    c = raw(relay.port)
    c.send(parse("plain_name", "SELECT 1") + SYNC)
    assert kinds(read_replies(c)) == "1Z"
    rows = data_rows(c.query("SELECT name FROM pg_prepared_statements"))
    assert rows == [["plain_name"]]
    c.close()


def test_max_prepared_statements_zero_is_off(make_relay):
    relay = make_relay({"max_prepared_statements": "0"})
    c = raw(relay.port)
    c.send(parse("plain_name", "SELECT 1") + SYNC)
    assert kinds(read_replies(c)) == "1Z"
    c.query("BEGIN")
    assert data_rows(c.query("SELECT name FROM pg_prepared_statements")) == [["plain_name"]]
    c.query("COMMIT")
    c.close()


# -- bad inputs -------------------------------------------------------------------------------------------

def test_parse_of_an_existing_name_is_postgres_42P05(prelay, pg):
    setup = [parse("dup", "SELECT 1") + SYNC]
    direct, relayed = same_as_postgres(pg, prelay, [parse("dup", "SELECT 2") + bind("dup") + execute() + SYNC],
                                       1, setup)
    assert kinds(relayed) == "EZ"
    assert normalized(relayed) == normalized(direct)
    assert error_fields(relayed[0][1])["M"] == 'prepared statement "dup" already exists'
    assert error_fields(relayed[0][1])["C"] == "42P05"


def test_close_of_unknown_name_and_bind_of_unknown_name(prelay, pg):
    direct, relayed = same_as_postgres(pg, prelay, [close(b"S", "never") + SYNC, bind("never") + execute() + SYNC,
                                                    describe(b"S", "never") + SYNC], 3)
    assert kinds(relayed) == "3ZEZEZ"
    assert normalized(relayed) == normalized(direct)
    assert error_fields(relayed[2][1])["M"] == 'prepared statement "never" does not exist'
    assert error_fields(relayed[2][1])["C"] == "26000"


def test_failed_parse_leaves_nothing(prelay, pg):
    script = [parse("bad", "SELEC 1") + SYNC,
              parse("bad", "SELECT 3") + bind("bad") + execute() + SYNC,
              # an error before a Parse of a text the server has: its ParseComplete is not sent
              parse("known", "SELECT 3") + SYNC,
              bind("nope") + parse("skipped", "SELECT 3") + bind("skipped") + execute() + SYNC,
              bind("skipped") + execute() + SYNC,
              close(b"S", "known") + bind("nope") + parse("known", "SELECT 4") + SYNC,
              bind("known") + execute() + SYNC]
    direct, relayed = same_as_postgres(pg, prelay, script, 7)
    assert normalized(relayed) == normalized(direct)
    assert kinds(relayed) == "EZ" + "12DCZ" + "1Z" + "EZ" + "EZ" + "3EZ" + "EZ"


def test_bind_to_a_statement_evicted_from_the_server(make_relay):
    relay = make_relay({"default_pool_size": "1", "max_prepared_statements": "3"})
    c = raw(relay.port)
    for i in range(8):
        c.send(parse(f"e{i}", f"SELECT {i} * $1::int") + SYNC)
        assert kinds(read_replies(c)) == "1Z"
    c.query("BEGIN")
    names = data_rows(c.query("SELECT name FROM pg_prepared_statements ORDER BY name"))
    c.query("COMMIT")
    assert len(names) <= 3 and all(n[0].startswith("PGRELAY_") for n in names), names
    for i in range(8):  # every one re-prepared as needed, the LRU never above 3
        c.send(bind(f"e{i}", (2,)) + execute() + SYNC)
        msgs = read_replies(c)
        assert kinds(msgs) == "2DCZ" and data_rows(msgs) == [[str(2 * i)]]
    c.send(b"".join(bind(f"e{i}", (3,)) + execute() for i in range(8)) + SYNC)
    msgs = read_replies(c)
    assert data_rows(msgs) == [[str(3 * i)] for i in range(8)] and kinds(msgs) == "2DC" * 8 + "Z"
    c.query("BEGIN")
    assert int(data_rows(c.query("SELECT count(*) FROM pg_prepared_statements"))[0][0]) <= 3
    c.query("COMMIT")
    c.close()


def test_ten_thousand_distinct_statements_from_one_client(make_relay):
    relay = make_relay({"default_pool_size": "1"})
    c = raw(relay.port)
    total = 10_000
    for start in range(0, total, 500):
        c.send(b"".join(parse(f"t{i}", f"SELECT {i}") for i in range(start, start + 500)) + SYNC)
        msgs = read_replies(c)
        assert kinds(msgs) == "1" * 500 + "Z"
    c.send(bind("t7") + execute() + bind(f"t{total - 1}") + execute() + SYNC)
    msgs = read_replies(c)
    assert data_rows(msgs) == [["7"], [str(total - 1)]]
    c.query("BEGIN")
    assert int(data_rows(c.query("SELECT count(*) FROM pg_prepared_statements"))[0][0]) <= 200
    c.query("COMMIT")
    c.close()


def test_client_map_is_bounded(make_relay):
    relay = make_relay({"default_pool_size": "1", "max_prepared_statements": "2"})
    limit = 200  # 100 x max_prepared_statements
    c = raw(relay.port)
    c.send(b"".join(parse(f"b{i}", f"SELECT {i}") for i in range(limit)) + SYNC)
    assert kinds(read_replies(c)) == "1" * limit + "Z"
    c.send(close(b"S", "b0") + parse("again", "SELECT 'again'") + SYNC)  # a Close frees a place
    assert kinds(read_replies(c)) == "31Z"
    c.send(parse("one_too_many", "SELECT 0") + SYNC)
    err = c.read_error()
    assert err["C"] == "53400" and err["S"] == "FATAL", err
    assert c.closed()
    assert "too many prepared statements" in relay.log()
    assert_other_clients_fine(relay)


def assert_other_clients_fine(relay):
    conn = connect(relay)
    assert scalar(conn, "SELECT 1") == 1
    conn.close()


def test_deallocate_and_discard_sent_as_sql(prelay, pg):
    script = [parse("d1", "SELECT 11") + parse("d2", "SELECT 12") + SYNC,
              query_message("DEALLOCATE d1"),
              bind("d1") + execute() + SYNC,  # 26000
              bind("d2") + execute() + SYNC,
              parse("d1", "SELECT 13") + bind("d1") + execute() + SYNC,
              query_message("deallocate prepare \"d1\";"),
              query_message("DEALLOCATE ALL"),
              bind("d2") + execute() + SYNC,
              parse("d2", "SELECT 14") + bind("d2") + execute() + SYNC,
              query_message("DISCARD ALL"),
              bind("d2") + execute() + SYNC,
              query_message("DEALLOCATE nothing_like_it")]
    direct, relayed = same_as_postgres(pg, prelay, script, len(script))
    assert normalized(relayed) == normalized(direct)
    assert data_rows(relayed) == [["12"], ["13"], ["14"]]


def test_deallocate_inside_a_transaction_that_then_fails(prelay, pg):
    script = [parse("x1", "SELECT 21") + parse("x2", "SELECT 22") + SYNC,
              query_message("BEGIN"),
              query_message("DEALLOCATE x1"),
              query_message("SELECT 1/0"),
              query_message("DEALLOCATE x2"),   # 25P02: the transaction is aborted, x2 stays
              query_message("DISCARD ALL"),     # 25P02 as well
              query_message("ROLLBACK"),
              bind("x1") + execute() + SYNC,    # DEALLOCATE is not transactional: x1 is gone
              bind("x2") + execute() + SYNC,
              query_message("BEGIN"),
              query_message("DISCARD ALL"),     # 25001: not inside a transaction block
              query_message("ROLLBACK"),
              bind("x2") + execute() + SYNC]
    direct, relayed = same_as_postgres(pg, prelay, script, len(script))
    assert normalized(relayed) == normalized(direct)
    assert data_rows(relayed) == [["22"], ["22"]]


def test_server_that_dies_mid_batch(prelay, pg):
    c = raw(prelay.port)
    c.send(parse("k1", "SELECT $1::int + 1") + bind("k1", (1,)) + execute() + SYNC)
    assert data_rows(read_replies(c)) == [["2"]]
    c.send(parse("k2", "SELECT pg_sleep(30)") + bind("k2") + execute() + SYNC)
    admin = psycopg2.connect(pg.dsn())
    admin.autocommit = True
    cur = admin.cursor()
    wait_until(lambda: cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")
               or cur.fetchone()[0] == 1, message="the sleep runs")
    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'")
    msgs = read_replies(c)
    assert msgs[-2][0] == b"E" and msgs[-1][0] == b"Z", msgs
    # the client's statements live in pgrelay: they work on the next server
    c.send(bind("k1", (41,)) + execute() + SYNC)
    msgs = read_replies(c)
    assert kinds(msgs) == "2DCZ" and data_rows(msgs) == [["42"]]
    c.send(parse("k3", "SELECT 'k3'") + bind("k3") + execute() + SYNC)
    assert data_rows(read_replies(c)) == [["k3"]]
    admin.close()
    c.close()


def test_describe_and_close_of_named_statements(prelay, pg):
    script = [parse("n1", "SELECT $1::int AS a, 'x'::text AS b", (23,)) + describe(b"S", "n1") + SYNC,
              describe(b"S", "n1") + bind("n1", (5,)) + describe(b"P", "") + execute() + close(b"S", "n1")
              + SYNC,
              describe(b"S", "n1") + SYNC,
              close(b"S", "n1") + parse("n1", "SELECT 2") + bind("n1") + execute() + SYNC]
    direct, relayed = same_as_postgres(pg, prelay, script, len(script))
    assert normalized(relayed) == normalized(direct)


def test_many_clients_share_texts_with_errors_mixed_in(prelay):
    def client(i):
        c = raw(prelay.port)
        for n in range(15):
            name = f"s{n % 4}"
            if n < 4:
                c.send(parse(name, f"SELECT {n % 4} + $1::int") + SYNC)
                assert kinds(read_replies(c)) == "1Z"
            c.send(bind(name, (i,)) + execute() + SYNC)
            msgs = read_replies(c)
            assert data_rows(msgs) == [[str(n % 4 + i)]], msgs
            if n % 5 == 0:
                c.send(bind("missing") + execute() + parse("late", "SELECT 9") + SYNC)
                assert kinds(read_replies(c)) == "EZ"
        c.close()
    assert run_threads(client, 30) == []


def test_show_stats_and_show_servers_count_prepared_statements(prelay):
    c = raw(prelay.port)
    c.send(parse("c1", "SELECT 31") + bind("c1") + execute() + bind("c1") + execute() + SYNC)
    assert data_rows(read_replies(c)) == [["31"], ["31"]]
    s = stats(prelay)
    assert (s["total_client_parse_count"], s["total_server_parse_count"], s["total_bind_count"]) == (1, 1, 2)
    servers = show(prelay, "SHOW SERVERS")
    assert sum(r["prepared_statements"] for r in servers) == 1
    clients = [r for r in show(prelay, "SHOW CLIENTS") if r["database"] == "postgres"]
    assert sum(r["prepared_statements"] for r in clients) == 1
    c.close()


def test_first_named_message_after_unnamed_ones(prelay, pg):
    """The hot path hands over mid-read, and mid-batch: what came before is counted, not lost."""
    script = [parse("", "SELECT 1") + bind("") + execute() + parse("late", "SELECT $1::int", (23,))
              + bind("late", (8,)) + execute() + SYNC]
    for cut in (5, 11, 23, 30, 44, 60):
        data = b"".join(script)
        for port in (pg.port, prelay.port):
            c = raw(port)
            c.send(data[:cut])
            time.sleep(0.05)
            c.send(data[cut:])
            msgs = read_replies(c)
            assert kinds(msgs) == "12DC12DCZ" and data_rows(msgs) == [["1"], ["8"]], (cut, msgs)
            c.close()


def test_named_parse_while_a_large_result_streams(prelay):
    """A Parse whose ParseComplete is synthesized, sent while the server is in the middle of a big
    result of the same batch: it comes after that result, in order."""
    c = raw(prelay.port)
    c.send(parse("known", "SELECT 'k'") + SYNC)
    assert kinds(read_replies(c)) == "1Z"
    d = raw(prelay.port)  # another client makes the text known; c's Parse of it is not sent
    big = "SELECT repeat('x', 1000) FROM generate_series(1, 3000)"
    c.send(parse("", big) + bind("") + execute() + FLUSH)
    first = c.read_message()
    assert first[0] == b"1"
    c.send(parse("again", "SELECT 'k'") + bind("again") + execute() + SYNC)
    msgs = [first] + read_replies(c)
    assert kinds(msgs) == "12" + "D" * 3000 + "C" + "12DCZ", kinds(msgs)[-10:]
    d.close()
    c.close()


def test_named_parse_after_an_open_batch_was_answered_in_full(prelay):
    """A batch without Sync answered in full (the reply queue ran empty), then a Parse whose
    ParseComplete is synthesized: it is owed after nothing of the first batch (it was lost when
    the queue counted the first batch's three messages as still owed)."""
    c = raw(prelay.port)
    c.send(parse("known", "SELECT 'k'") + SYNC)
    assert kinds(read_replies(c)) == "1Z"
    c.send(parse("", "SELECT g FROM generate_series(1, 3) g") + bind("") + execute() + FLUSH)
    got = [c.read_message() for _ in range(6)]
    assert kinds(got) == "12DDDC"
    c.send(parse("again", "SELECT 'k'") + bind("again") + execute() + SYNC)
    assert kinds(read_replies(c)) == "12DCZ"
    c.send(bind("again") + execute() + SYNC)
    assert kinds(read_replies(c)) == "2DCZ"
    c.close()


def test_statement_pooling(make_relay):
    relay = make_relay({"pool_mode": "statement", "default_pool_size": "2"})

    def client(i):
        c = raw(relay.port)
        c.send(parse("st", "SELECT $1::int * 2") + SYNC)
        assert kinds(read_replies(c)) == "1Z"
        for n in range(10):
            c.send(bind("st", (n,)) + execute() + SYNC)
            assert data_rows(read_replies(c)) == [[str(2 * n)]]
        c.close()
    assert run_threads(client, 10) == []


def test_psycopg3_errors_pipelines_and_many_servers(prelay):
    """Prepared statements that fail at execution, inside and outside transactions, and in pipeline
    mode, with clients crossing the pool's two servers: every result is the one PostgreSQL gives."""
    import psycopg

    def client(i):
        with psycopg.connect(prelay.dsn(), autocommit=True, prepare_threshold=1) as conn:
            for n in range(12):
                try:
                    conn.execute("SELECT 10 / %s::int", (n % 3,)).fetchone()
                    assert n % 3 != 0
                except psycopg.errors.DivisionByZero:
                    assert n % 3 == 0
                try:
                    with conn.transaction():
                        assert conn.execute("SELECT %s::int + 1", (n,)).fetchone()[0] == n + 1
                        conn.execute("SELECT 1 / %s::int", (n % 2,))
                except psycopg.errors.DivisionByZero:
                    assert n % 2 == 0
                with conn.pipeline():
                    cursors = [conn.execute("SELECT %s::int * %s::int", (n, k)) for k in range(5)]
                assert [c.fetchone()[0] for c in cursors] == [n * k for k in range(5)]
    assert run_threads(client, 20) == []


def test_asyncpg_errors_and_schema_changes(prelay, pg):
    import asyncpg
    table = "ps_" + uuid.uuid4().hex[:8]
    pg.psql(f"CREATE TABLE {table} (a int)")
    pg.psql(f"INSERT INTO {table} SELECT generate_series(1, 10)")

    async def client(i):
        conn = await asyncpg.connect(host="127.0.0.1", port=prelay.port, user="postgres", database="postgres")
        try:
            for n in range(10):
                with pytest.raises(asyncpg.DivisionByZeroError):
                    await conn.fetchval("SELECT 1 / $1::int", 0)
                assert await conn.fetchval(f"SELECT count(*) FROM {table} WHERE a > $1", n) == 10 - n
                try:
                    async with conn.transaction():
                        await conn.fetchval("SELECT $1::int", n)
                        await conn.fetchval("SELECT 1 / $1::int", n % 2)
                except asyncpg.DivisionByZeroError:
                    assert n % 2 == 0
        finally:
            await conn.close()

    async def main():
        results = await asyncio.gather(*(client(i) for i in range(20)), return_exceptions=True)
        return [repr(r) for r in results if isinstance(r, BaseException)]
    assert asyncio.run(asyncio.wait_for(main(), 120)) == []


def test_server_reset_query_always_discard_all(make_relay):
    """DISCARD ALL after every transaction drops the server's statements: pgrelay prepares again."""
    relay = make_relay({"default_pool_size": "1", "server_reset_query_always": "1"})
    c = raw(relay.port)
    c.send(parse("r1", "SELECT $1::int - 1") + bind("r1", (1,)) + execute() + SYNC)
    assert data_rows(read_replies(c)) == [["0"]]
    for n in range(5):
        c.send(bind("r1", (n,)) + execute() + SYNC)
        msgs = read_replies(c)
        assert kinds(msgs) == "2DCZ" and data_rows(msgs) == [[str(n - 1)]]
    c.close()
