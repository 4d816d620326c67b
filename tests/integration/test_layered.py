"""pgrelay chained behind pgrelay (app-side -> server-side -> PostgreSQL): queries, COPY, cancel, parameter sync, chained dedicated poolers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time

import psycopg
import psycopg.errors

from ..support import wait_until

MB = 1 << 20


def chain(make_relay, pg, settings=None, app_databases=None, server_databases=None, app_extra=""):
    """A server-side pgrelay in front of PostgreSQL and an app-side pgrelay in front of it."""
    server_side = make_relay(settings=settings, databases=server_databases, name="server_side")
    if app_databases is None:
        app_databases = {"*": f"host=127.0.0.1 port={server_side.port}"}
    app_side = make_relay(settings=settings, databases=app_databases, extra_sections=app_extra, name="app_side")
    return app_side, server_side


def connect(relay, **kw) -> psycopg.Connection:
    # prepare_threshold=None: named prepared statements do not survive transaction pooling.
    return psycopg.connect(relay.dsn(**kw), autocommit=True, prepare_threshold=None, connect_timeout=10)


def tcp_local_ports(pid: int) -> set[int]:
    """Local ports of the IPv4 TCP sockets process `pid` holds (from /proc)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    with open(f"/proc/{pid}/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].split(":")[1], 16))
    return ports


def login_attempts(relay, db: str, user: str) -> int:
    return relay.log().count(f"login attempt: db={db} user={user} ")


def test_queries_pass_through_both_relays(make_relay, pg):
    app_side, server_side = chain(make_relay, pg)
    with connect(app_side) as conn:
        # Extended protocol: Parse/Bind/Execute with text and binary parameters, NULLs, many rows.
        row = conn.execute("SELECT %s::int + %s, %s::text, %s::text IS NULL", (40, 2, "héllo wörld", None)).fetchone()
        assert row == (42, "héllo wörld", True)
        blob = bytes(range(256)) * 100
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT %b::bytea, length(%b::bytea)", (blob, blob))
            assert cur.fetchone() == (blob, len(blob))
        rows = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, %s) g", (5000,)).fetchall()
        assert len(rows) == 5000
        assert rows[-1] == (5000, hashlib.md5(b"5000").hexdigest())
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE layered_t (v int)")
            conn.execute("INSERT INTO layered_t SELECT * FROM generate_series(1, 10)")
            assert conn.execute("SELECT sum(v) FROM layered_t WHERE v > %s", (5,)).fetchone() == (40,)
        try:
            conn.execute("SELECT 1 / %s", (0,))
            raise AssertionError("division by zero went through")
        except psycopg.errors.DivisionByZero as exc:
            assert exc.diag.sqlstate == "22012"
        assert conn.execute("SELECT %s::int", (7,)).fetchone() == (7,)
        # The backend is PostgreSQL's, reached from the server-side relay's socket.
        client_port = conn.execute("SELECT inet_client_port()").fetchone()[0]
        assert client_port in tcp_local_ports(server_side.proc.pid)
        assert client_port not in tcp_local_ports(app_side.proc.pid)

    out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                          "-p", str(app_side.port), "-U", "postgres", "-d", "postgres",
                          "-c", "SELECT 'psql ok', 6 * 7", "-c", "SELECT count(*) FROM generate_series(1, 1000)"],
                         capture_output=True, text=True, timeout=30, check=False)
    assert (out.returncode, out.stdout, out.stderr) == (0, "psql ok|42\n1000\n", "")
    bad = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                          "-p", str(app_side.port), "-U", "postgres", "-d", "postgres",
                          "-c", "SELECT no_such_column"], capture_output=True, text=True, timeout=30, check=False)
    assert bad.returncode == 1
    assert 'column "no_such_column" does not exist' in bad.stderr
    assert login_attempts(app_side, "postgres", "postgres") == 3
    assert login_attempts(server_side, "postgres", "postgres") >= 1


def copy_lines(total: int):
    """`id<TAB>payload` lines of varying length, about `total` bytes in ~1 MB chunks."""
    payload = ("0123456789abcdefghijklmnopqrstuvwxyz" * 8)
    size, i, chunk = 0, 0, []
    chunk_size = 0
    while size < total:
        i += 1
        line = f"{i}\t{payload[:100 + i % 150]}\n".encode()
        chunk.append(line)
        chunk_size += len(line)
        size += len(line)
        if chunk_size >= MB:
            yield b"".join(chunk)
            chunk, chunk_size = [], 0
    if chunk:
        yield b"".join(chunk)


def test_copy_in_and_out_through_both_relays(make_relay, pg):
    app_side, _ = chain(make_relay, pg)
    table = f"layered_copy_{os.getpid()}"
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int PRIMARY KEY, payload text NOT NULL)")
    try:
        sent = hashlib.md5()
        sent_bytes = sent_rows = 0
        with connect(app_side) as conn:
            with conn.cursor() as cur:
                with cur.copy(f"COPY {table} (id, payload) FROM STDIN") as copy:
                    for chunk in copy_lines(10 * MB):
                        copy.write(chunk)
                        sent.update(chunk)
                        sent_bytes += len(chunk)
                        sent_rows += chunk.count(b"\n")
                assert cur.rowcount == sent_rows
            assert sent_bytes >= 10 * MB
            # What PostgreSQL stored, asked directly: same rows, same bytes.
            stored = pg.psql(f"SELECT count(*), md5(string_agg(id || E'\\t' || payload || E'\\n', '' ORDER BY id)) "
                             f"FROM {table}")
            assert stored == f"{sent_rows}|{sent.hexdigest()}"

            got = hashlib.md5()
            got_bytes = got_rows = 0
            with conn.cursor() as cur, cur.copy(f"COPY (SELECT id, payload FROM {table} ORDER BY id) "
                                                "TO STDOUT") as copy:
                for data in copy:
                    got.update(data)
                    got_bytes += len(data)
                    got_rows += bytes(data).count(b"\n")
            assert (got_rows, got_bytes, got.hexdigest()) == (sent_rows, sent_bytes, sent.hexdigest())
            # The connection is in a clean state after both COPYs.
            assert conn.execute("SELECT count(*) FROM " + table).fetchone() == (sent_rows,)
    finally:
        pg.psql(f"DROP TABLE IF EXISTS {table}")


class Outcome:
    """A query run in a thread: its result or error, and how long it took."""

    def __init__(self, conn: psycopg.Connection, sql: str):
        self.row = self.exc = None
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self.thread.start()

    def _run(self, conn, sql):
        started = time.monotonic()
        try:
            self.row = conn.execute(sql).fetchone()
        except psycopg.Error as exc:
            self.exc = exc
        self.elapsed = time.monotonic() - started

    def wait(self, timeout: float = 15) -> Outcome:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self


def active(pg, sql: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{sql}'"))


def test_cancel_through_both_relays(make_relay, pg):
    app_side, _ = chain(make_relay, pg)
    victim_sql = "SELECT pg_sleep(10) /* layered victim */"
    bystander_sql = "SELECT 42, pg_sleep(1.5) /* layered bystander */"
    with connect(app_side) as victim, connect(app_side) as bystander:
        assert victim.execute("SELECT 1").fetchone() == (1,)
        slow = Outcome(victim, victim_sql)
        other = Outcome(bystander, bystander_sql)
        wait_until(lambda: active(pg, victim_sql) == 1 and active(pg, bystander_sql) == 1,
                   message="both queries to run on PostgreSQL")
        started = time.monotonic()
        victim.cancel()
        slow.wait()
        assert isinstance(slow.exc, psycopg.errors.QueryCanceled), slow.exc
        assert slow.exc.diag.sqlstate == "57014"
        assert slow.exc.diag.message_primary == "canceling statement due to user request"
        assert time.monotonic() - started < 3
        other.wait()
        assert other.exc is None, other.exc
        assert other.row == (42, "")
        assert other.elapsed >= 1.4
        # Both connections go on working.
        assert victim.execute("SELECT %s::text", ("after cancel",)).fetchone() == ("after cancel",)
        assert bystander.execute("SELECT 2").fetchone() == (2,)
    assert active(pg, victim_sql) == 0


def test_parameters_follow_each_client_on_one_shared_path(make_relay, pg):
    app_side, server_side = chain(make_relay, pg, settings={"default_pool_size": "1", "pool_mode": "transaction"})
    wanted = {
        "one": {"TimeZone": "Europe/Berlin", "application_name": "layered_one"},
        "two": {"TimeZone": "Asia/Tokyo", "application_name": "layered_two"},
    }
    conns = {name: connect(app_side, application_name=v["application_name"], options=f"-c TimeZone={v['TimeZone']}")
             for name, v in wanted.items()}
    try:
        pids = set()

        def check(name):
            conn = conns[name]
            tz, app, pid = conn.execute("SELECT current_setting('TimeZone'), current_setting('application_name'), "
                                        "pg_backend_pid()").fetchone()
            pids.add(pid)
            seen = {"TimeZone": tz, "application_name": app}
            reported = {k: conn.info.parameter_status(k) for k in seen}
            assert (name, seen, reported) == (name, wanted[name], wanted[name])

        for _ in range(5):
            check("one")
            check("two")
        # A client's own SET follows it; the other keeps its values on the same server.
        conns["one"].execute("SET TimeZone = 'America/New_York'")
        wanted["one"]["TimeZone"] = "America/New_York"
        conns["two"].execute("SET application_name = 'layered_two_b'")
        wanted["two"]["application_name"] = "layered_two_b"
        for _ in range(5):
            check("two")
            check("one")
        # Timestamps render in each client's own zone.
        one = conns["one"].execute("SELECT '2024-01-01 12:00:00+00'::timestamptz::text").fetchone()[0]
        two = conns["two"].execute("SELECT '2024-01-01 12:00:00+00'::timestamptz::text").fetchone()[0]
        assert (one, two) == ("2024-01-01 07:00:00-05", "2024-01-01 21:00:00+09")
        # One PostgreSQL backend served both clients all along: one server-side path.
        assert len(pids) == 1
        assert int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pids.pop()}")) == 1
        # The app-side relay logged in to the server-side relay once: one server connection for both.
        assert login_attempts(app_side, "postgres", "postgres") == 2
        assert login_attempts(server_side, "postgres", "postgres") == 1
    finally:
        for conn in conns.values():
            conn.close()


def test_dedicated_pooler_chained_through_server_side_relay(make_relay, pg):
    """[poolers] chained = upstream=<server-side relay>: `postgres|chained` goes app-side -> server-side ->
    PostgreSQL, while plain `postgres` goes straight to PostgreSQL. The server-side relay knows a
    database `chaindb` (PostgreSQL's `postgres`) that PostgreSQL does not: only the chain reaches it."""
    server_side = make_relay(databases={"chaindb": f"host=127.0.0.1 port={pg.port} dbname=postgres",
                                        "*": f"host=127.0.0.1 port={pg.port}"}, name="server_side")
    app_side = make_relay(extra_sections=f"[poolers]\nchained = target=primary upstream=127.0.0.1:{server_side.port}\n",
                          name="app_side")
    with connect(app_side, user="postgres|chained", dbname="chaindb") as conn:
        assert conn.execute("SELECT current_database(), current_user, %s::int * 2", (21,)).fetchone() == \
            ("postgres", "postgres", 42)
        client_port = conn.execute("SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()").fetchone()[0]
        assert client_port in tcp_local_ports(server_side.proc.pid)
        assert client_port not in tcp_local_ports(app_side.proc.pid)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE chained_t AS SELECT 1 AS v")
            assert conn.execute("SELECT count(*) FROM chained_t").fetchone() == (1,)
    assert login_attempts(app_side, "chaindb", "postgres|chained") == 1
    assert login_attempts(server_side, "chaindb", "postgres") == 1

    # Without the suffix the app-side relay goes straight to PostgreSQL, which has no chaindb.
    try:
        connect(app_side, dbname="chaindb").close()
        raise AssertionError("chaindb reached without the chain")
    except psycopg.OperationalError as exc:
        assert 'database "chaindb" does not exist' in str(exc)
    assert login_attempts(server_side, "chaindb", "postgres") == 1
    with connect(app_side) as conn:
        client_port = conn.execute("SELECT inet_client_port()").fetchone()[0]
        assert client_port in tcp_local_ports(app_side.proc.pid)
