"""COPY FROM STDIN / TO STDOUT through pgrelay in transaction mode (psycopg 3 and psycopg2): 100 MB in, 50 MB out, failures, transactions."""

from __future__ import annotations

import struct
import time

import psycopg
import psycopg2
import psycopg2.errors
import pytest

from ..support import RawClient, error_fields, message, query_message

MB = 1 << 20
PAYLOAD = ("abcdefghijklmnopqrstuvwxyz0123456789" * 40)[:1200]


class RowSource:
    """Rows `id<TAB>payload` generated on the fly in ~1 MB chunks; remembers what it sent."""

    def __init__(self, total_bytes: int, bad_row_at: int | None = None):
        self.total_bytes = total_bytes
        self.bad_row_at = bad_row_at
        self.rows = self.sum_id = self.sum_len = self.bytes = 0

    def chunks(self):
        i = 0
        while self.bytes < self.total_bytes:
            parts = []
            size = 0
            while size < MB and self.bytes + size < self.total_bytes:
                i += 1
                if i == self.bad_row_at:
                    line = "oops\tnot an integer id\n"
                else:
                    length = 800 + (i * 7919) % 400
                    line = f"{i}\t{PAYLOAD[:length]}\n"
                    self.rows += 1
                    self.sum_id += i
                    self.sum_len += length
                parts.append(line)
                size += len(line)
            chunk = "".join(parts).encode()
            self.bytes += len(chunk)
            yield chunk


class GeneratorFile:
    """A read()-able file over a chunk generator, for psycopg2's copy_expert."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.buf = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.buf) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        if size < 0:
            size = len(self.buf)
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


class CountingFile:
    """A write()-able sink that counts bytes and lines (psycopg2 copy_expert TO STDOUT)."""

    def __init__(self):
        self.bytes = self.lines = 0

    def write(self, data) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.bytes += len(data)
        self.lines += data.count(b"\n")


def fresh_table(pg, name: str) -> None:
    pg.psql(f"DROP TABLE IF EXISTS {name}; CREATE UNLOGGED TABLE {name} (id int, payload text)")


def table_stats(conn, name: str) -> tuple:
    return conn.execute(f"SELECT count(*), coalesce(sum(id), 0), coalesce(sum(length(payload)), 0) FROM {name}"
                        ).fetchone()


def out_query(rows: int) -> tuple[str, int]:
    expected = sum(len(f"{i}\t".encode()) + 1000 + 1 for i in range(1, rows + 1))
    return f"COPY (SELECT i, repeat('y', 1000) FROM generate_series(1, {rows}) i) TO STDOUT", expected


def test_copy_in_100mb_psycopg3(make_relay, pg):
    fresh_table(pg, "copy_big3")
    relay = make_relay({"pool_mode": "transaction"})
    source = RowSource(100 * MB)
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY copy_big3 (id, payload) FROM STDIN") as copy:
                for chunk in source.chunks():
                    copy.write(chunk)
            assert cur.rowcount == source.rows
        assert source.bytes >= 100 * MB
        assert table_stats(conn, "copy_big3") == (source.rows, source.sum_id, source.sum_len)
    pg.psql("DROP TABLE copy_big3")


def test_copy_in_100mb_psycopg2(make_relay, pg):
    fresh_table(pg, "copy_big2")
    relay = make_relay({"pool_mode": "transaction"})
    source = RowSource(100 * MB)
    conn = psycopg2.connect(relay.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.copy_expert("COPY copy_big2 (id, payload) FROM STDIN", GeneratorFile(source.chunks()), size=MB)
            assert cur.rowcount == source.rows
            cur.execute("SELECT count(*), sum(id), sum(length(payload)) FROM copy_big2")
            assert cur.fetchone() == (source.rows, source.sum_id, source.sum_len)
    finally:
        conn.close()
    assert source.bytes >= 100 * MB
    pg.psql("DROP TABLE copy_big2")


def test_copy_out_50mb_psycopg3(make_relay):
    relay = make_relay({"pool_mode": "transaction"})
    sql, expected_bytes = out_query(50_000)
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        with conn.cursor() as cur:
            received = lines = 0
            with cur.copy(sql) as copy:
                for data in copy:
                    received += len(data)
                    lines += bytes(data).count(b"\n")
            assert cur.rowcount == 50_000
        assert (lines, received) == (50_000, expected_bytes)
        assert conn.execute("SELECT 'after copy'").fetchone() == ("after copy",)


def test_copy_out_50mb_psycopg2(make_relay):
    relay = make_relay({"pool_mode": "transaction"})
    sql, expected_bytes = out_query(50_000)
    conn = psycopg2.connect(relay.dsn())
    conn.autocommit = True
    try:
        sink = CountingFile()
        with conn.cursor() as cur:
            cur.copy_expert(sql, sink)
            assert cur.rowcount == 50_000
            cur.execute("SELECT 'after copy'")
            assert cur.fetchone() == ("after copy",)
        assert (sink.lines, sink.bytes) == (50_000, expected_bytes)
    finally:
        conn.close()


@pytest.mark.parametrize("bad_row_at", [1, 3000])
def test_copy_in_failing_midway_psycopg3(make_relay, pg, bad_row_at):
    fresh_table(pg, "copy_fail3")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    source = RowSource(8 * MB, bad_row_at=bad_row_at)
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        with pytest.raises(psycopg.errors.InvalidTextRepresentation) as info:
            with conn.cursor() as cur:
                with cur.copy("COPY copy_fail3 (id, payload) FROM STDIN") as copy:
                    for chunk in source.chunks():
                        copy.write(chunk)
        assert info.value.diag.sqlstate == "22P02"
        assert info.value.diag.message_primary == 'invalid input syntax for type integer: "oops"'
        assert info.value.diag.context.startswith("COPY copy_fail3, line")
        # The same connection keeps working, on the same (only) server, and nothing was loaded.
        assert conn.execute("SELECT count(*), pg_backend_pid() FROM copy_fail3").fetchone() == (0, pid)
    with psycopg.connect(relay.dsn(), autocommit=True) as other:
        assert other.execute("SELECT count(*), pg_backend_pid() FROM copy_fail3").fetchone() == (0, pid)


def test_copy_in_failing_midway_psycopg2(make_relay, pg):
    fresh_table(pg, "copy_fail2")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    source = RowSource(8 * MB, bad_row_at=3000)
    conn = psycopg2.connect(relay.dsn())
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            with pytest.raises(psycopg2.errors.InvalidTextRepresentation) as info:
                cur.copy_expert("COPY copy_fail2 (id, payload) FROM STDIN", GeneratorFile(source.chunks()))
            assert info.value.pgcode == "22P02"
            assert info.value.diag.message_primary == 'invalid input syntax for type integer: "oops"'
            cur.execute("SELECT count(*) FROM copy_fail2")
            assert cur.fetchone() == (0,)
    finally:
        conn.close()
    with psycopg.connect(relay.dsn(), autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM copy_fail2").fetchone() == (0,)


@pytest.mark.smoke
def test_copy_inside_explicit_transaction(make_relay, pg):
    fresh_table(pg, "copy_tx")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    source = RowSource(2 * MB)
    with psycopg.connect(relay.dsn()) as conn, psycopg.connect(relay.dsn(), autocommit=True) as other:
        with conn.transaction():
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            with conn.cursor() as cur:
                with cur.copy("COPY copy_tx (id, payload) FROM STDIN") as copy:
                    for chunk in source.chunks():
                        copy.write(chunk)
                assert table_stats(conn, "copy_tx") == (source.rows, source.sum_id, source.sum_len)
                # Not committed: another client (on the other server) sees nothing yet.
                other_pid, other_count = other.execute("SELECT pg_backend_pid(), count(*) FROM copy_tx").fetchone()
                assert other_count == 0 and other_pid != pid
                lines = 0
                with cur.copy("COPY copy_tx TO STDOUT") as copy:
                    for data in copy:
                        lines += bytes(data).count(b"\n")
                assert lines == source.rows
                assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert other.execute("SELECT count(*) FROM copy_tx").fetchone() == (source.rows,)
        # And a COPY rolled back leaves nothing behind.
        with conn.transaction(force_rollback=True):
            with conn.cursor() as cur:
                with cur.copy("COPY copy_tx (id, payload) FROM STDIN") as copy:
                    copy.write(b"-1\tgone\n")
            assert conn.execute("SELECT count(*) FROM copy_tx WHERE id = -1").fetchone() == (1,)
        assert other.execute("SELECT count(*) FROM copy_tx WHERE id = -1").fetchone() == (0,)
    pg.psql("DROP TABLE copy_tx")



def test_copy_error_while_client_is_mid_message_keeps_streams_apart(make_relay, pg):
    """PostgreSQL answers a bad COPY row with ErrorResponse + ReadyForQuery while the client may still be
    in the middle of sending a CopyData message; the rest of that message must reach the same server
    before anyone else's bytes do."""
    fresh_table(pg, "copy_midmsg")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a, b = RawClient(relay.port), RawClient(relay.port)
    a.login()
    b.login()
    a.send(query_message("COPY copy_midmsg (id, payload) FROM STDIN"))
    assert a.read_message()[0] == b"G"
    payload_len = 100_000
    head = b"1\t" + b"x" * 1000
    # One write: a bad row, then the first 1,007 bytes of a 100,005-byte CopyData message.
    a.send(message(b"d", b"oops\tbad\n") + b"d" + struct.pack("!I", payload_len + 4) + head)
    reply = a.read_reply()
    assert reply is not None and [k for k, _ in reply] == [b"E", b"Z"], reply
    fields = error_fields(reply[0][1])
    assert (fields["C"], fields["M"]) == ("22P02", 'invalid input syntax for type integer: "oops"')

    b.send(query_message("SELECT 'b'"))  # another client wants the (only) server now
    time.sleep(0.3)  # let pgrelay read B's query before the rest of A's message arrives
    a.send(b"x" * (payload_len - len(head) - 1) + b"\n" + message(b"c") + query_message("SELECT 'a'"))
    reply_a = a.read_reply()
    reply_b = b.read_reply(5 if reply_a is not None else 0.5)
    assert reply_a is not None, "client A got no reply: its CopyData tail and query are stuck"
    assert reply_b is not None, "client B got no reply: its query went into the middle of A's CopyData"
    assert [body for kind, body in reply_a if kind == b"D"] == [b"\0\x01\0\0\0\x01a"]
    assert [body for kind, body in reply_b if kind == b"D"] == [b"\0\x01\0\0\0\x01b"]
    a.close()
    b.close()
    with psycopg.connect(relay.dsn(), autocommit=True) as fresh:
        assert fresh.execute("SELECT count(*) FROM copy_midmsg").fetchone() == (0,)
