"""Large query texts (1 MB via psycopg2 and psql -f) and pipelined extended protocol (psycopg 3, asyncpg, raw)."""

from __future__ import annotations

import pytest
import asyncio
import hashlib
import os
import struct
import subprocess
import time

import asyncpg
import psycopg
import psycopg2

from ..support import RawClient, message, query_message

MB = 1 << 20


def psql_path(pg) -> str:
    return os.path.join(pg.bindir, "psql")


def test_one_megabyte_query_text_psycopg2(relay):
    literal = "x" * MB
    conn = psycopg2.connect(relay.dsn())
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT length('{literal}'), md5('{literal}')")
            assert cur.fetchone() == (MB, hashlib.md5(literal.encode()).hexdigest())
            cur.execute("SELECT repeat('y', %s)", (MB,))  # and a 1 MB value back
            assert cur.fetchone()[0] == "y" * MB
    finally:
        conn.close()
    with psycopg2.connect(relay.dsn()) as fresh, fresh.cursor() as cur:
        cur.execute("SELECT 1")
        assert cur.fetchone() == (1,)
    fresh.close()


def test_one_megabyte_query_text_psql_file(relay, pg, tmp_path):
    script = tmp_path / "big.sql"
    script.write_text(f"SELECT length('{'z' * MB}');\nSELECT 'second statement';\n")
    result = subprocess.run([psql_path(pg), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                             "-p", str(relay.port), "-U", "postgres", "-d", "postgres", "-f", str(script)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(MB), "second", "statement"]


@pytest.mark.smoke
def test_psycopg3_pipeline_of_200_statements(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    with psycopg.connect(relay.dsn(), autocommit=True, prepare_threshold=None) as conn, \
            psycopg.connect(relay.dsn(), autocommit=True) as other:
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int * 2, txid_current(), pg_backend_pid()", (i,))
                       for i in range(200)]
        rows = [cur.fetchone() for cur in cursors]
        assert [r[0] for r in rows] == [i * 2 for i in range(200)]
        # Everything before the one Sync ran in one implicit transaction on one server.
        assert len({r[1] for r in rows}) == 1
        assert len({r[2] for r in rows}) == 1
        # The server went back to the pool afterwards, clean.
        assert other.execute("SELECT pg_backend_pid()").fetchone()[0] == rows[0][2]
        assert conn.execute("SELECT 'after pipeline'").fetchone() == ("after pipeline",)


def test_asyncpg_executemany_and_prepared_statement_in_session_mode(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS pipelined_many; CREATE TABLE pipelined_many (n int PRIMARY KEY, t text)")
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})

    async def run():
        conn = await asyncpg.connect(relay.url())
        try:
            await conn.executemany("INSERT INTO pipelined_many VALUES ($1, $2)",
                                   [(i, f"row{i}") for i in range(2000)])
            stmt = await conn.prepare("SELECT $1::int * 3 AS v, pg_backend_pid() AS pid")
            values = [await stmt.fetchrow(i) for i in range(100)]
            total = await conn.fetchrow("SELECT count(*), sum(n), sum(length(t)) FROM pipelined_many")
            return values, tuple(total)
        finally:
            await conn.close()

    values, total = asyncio.run(asyncio.wait_for(run(), 60))
    assert [v["v"] for v in values] == [i * 3 for i in range(100)]
    assert len({v["pid"] for v in values}) == 1
    assert total == (2000, sum(range(2000)), sum(len(f"row{i}") for i in range(2000)))


def test_asyncpg_executemany_in_transaction_mode_without_statement_cache(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS pipelined_many_tx; CREATE TABLE pipelined_many_tx (n int PRIMARY KEY)")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})

    async def run():
        conn = await asyncpg.connect(relay.url(), statement_cache_size=0)
        try:
            await conn.executemany("INSERT INTO pipelined_many_tx VALUES ($1)", [(i,) for i in range(1000)])
            return tuple(await conn.fetchrow("SELECT count(*), sum(n) FROM pipelined_many_tx"))
        finally:
            await conn.close()

    assert asyncio.run(asyncio.wait_for(run(), 60)) == (1000, sum(range(1000)))


# -- raw extended protocol -------------------------------------------------------------------------

def cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def parse_bind_execute(sql: str) -> bytes:
    """Parse/Bind/Execute of a parameterless query (unnamed statement and portal), no Sync."""
    return (message(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0))
            + message(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
            + message(b"E", cstr("") + struct.pack("!i", 0)))


def extended_batch(sql: str, values: list[int]) -> bytes:
    """Parse/Bind/Execute per value (unnamed statement and portal), then one Sync."""
    out = []
    for v in values:
        param = str(v).encode()
        out.append(message(b"P", cstr("") + cstr(sql) + struct.pack("!h", 0)))
        out.append(message(b"B", cstr("") + cstr("") + struct.pack("!hh", 0, 1) + struct.pack("!i", len(param))
                           + param + struct.pack("!h", 0)))
        out.append(message(b"E", cstr("") + struct.pack("!i", 0)))
    out.append(message(b"S"))
    return b"".join(out)


def datarow_value(body: bytes) -> str:
    ncols, length = struct.unpack("!hi", body[:6])
    assert ncols == 1
    return body[6:6 + length].decode()


def test_raw_parse_bind_execute_many_before_one_sync(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    n = 1000
    first, second = RawClient(relay.port), RawClient(relay.port)
    first.login()
    second.login()
    # Both batches are in flight at once; with one server, the second waits for the first's Sync.
    first.send(extended_batch("SELECT $1::int + 1", list(range(n))))
    second.send(extended_batch("SELECT $1::int * 10", list(range(n))))
    for raw, expected in ((first, [str(i + 1) for i in range(n)]), (second, [str(i * 10) for i in range(n)])):
        msgs = raw.read_until(b"Z")
        kinds = [k for k, _ in msgs]
        assert kinds.count(b"1") == n and kinds.count(b"2") == n and kinds.count(b"C") == n
        assert b"E" not in kinds
        assert [datarow_value(body) for kind, body in msgs if kind == b"D"] == expected
        assert kinds.count(b"Z") == 1 and msgs[-1] == (b"Z", b"I")
        raw.send(query_message("SELECT 'still here'"))
        msgs = raw.read_until(b"Z")
        assert [datarow_value(body) for kind, body in msgs if kind == b"D"] == ["still here"]
        raw.close()



@pytest.mark.smoke
def test_messages_pipelined_after_a_sync_stay_with_their_client(make_relay):
    """A client may send the next batch (Parse/Bind/Execute) before the ReadyForQuery of the previous
    Sync arrives. Those messages are outstanding on the server: it must not be handed to another
    client, who would otherwise receive this client's results."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a, b = RawClient(relay.port), RawClient(relay.port)
    a.login()
    b.login()
    a.send(parse_bind_execute("SELECT 'first batch of A'") + message(b"S")
           + parse_bind_execute("SELECT 'second batch of A'"))
    reply = a.read_reply()
    assert reply is not None
    assert [datarow_value(body) for kind, body in reply if kind == b"D"] == ["first batch of A"]
    time.sleep(0.3)  # the first Sync's ReadyForQuery has passed through pgrelay
    b.send(query_message("SELECT 'b'"))
    time.sleep(0.3)
    a.send(message(b"S"))
    reply_a = a.read_reply()
    reply_b = b.read_reply()
    assert reply_b is not None, "client B got no reply"
    assert [datarow_value(body) for kind, body in reply_b if kind == b"D"] == ["b"], \
        f"client B received another client's results: {reply_b}"
    assert [kind for kind, _ in reply_b] == [b"T", b"D", b"C", b"Z"]
    assert reply_a is not None, "client A got no reply to its second Sync"
    assert [kind for kind, _ in reply_a] == [b"1", b"2", b"D", b"C", b"Z"], reply_a
    assert [datarow_value(body) for kind, body in reply_a if kind == b"D"] == ["second batch of A"]
    a.close()
    b.close()
