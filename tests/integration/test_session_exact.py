"""Session pooling and direct ports as exact as PostgreSQL: the server's pid in BackendKeyData, its own ParameterStatus spelling, its FATAL and close when a backend is terminated; transaction pooling's errors carry the server's SQLSTATE; a Terminate before the startup packet is a silent close; cancel stays safe."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import asyncpg
import psycopg
import psycopg2
import psycopg2.errors
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, data_rows, error_fields, query_message, wait_until

pytestmark = pytest.mark.smoke  # PostgreSQL 15 ([system]) and 18 ([embedded])

CANCEL_REQUEST_CODE = 80877102
ADMIN_SHUTDOWN = ("57P01", "terminating connection due to administrator command")


@pytest.fixture
def ports(make_relay, pg):
    """Ports of one pgrelay: 'transaction' (its main port), 'session' (pool_mode=session), 'direct'
    (role=direct), and 'pg', PostgreSQL itself, to compare with."""
    session, direct = free_port(), free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 4},
                       extra_sections=f"[listeners]\nsession = port={session} pool_mode=session\n"
                                      f"direct = port={direct} role=direct\n")
    return {"transaction": relay.port, "session": session, "direct": direct, "pg": pg.port, "relay": relay}


def pg2(port: int, **kw):
    conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=10, **kw)
    conn.autocommit = True
    return conn


def pg3(port: int, **kw) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True,
                           connect_timeout=10, prepare_threshold=None, **kw)


def one(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0]


def terminate(pg, pid: int) -> None:
    conn = psycopg2.connect(pg.dsn())
    conn.autocommit = True
    try:
        assert one(conn, "SELECT pg_terminate_backend(%s)", (pid,)) is True
    finally:
        conn.close()


def backend_gone(pg, pid: int) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0"


def key_of(msgs) -> bytes:
    keys = [body for kind, body in msgs if kind == b"K"]
    assert len(keys) == 1, msgs
    return keys[0]


def cancel(port: int, key: bytes) -> None:
    """Send a CancelRequest for `key` (pid and secret) and wait for the close, as libpq does."""
    raw = RawClient(port)
    raw.send(struct.pack("!II", 8 + len(key), CANCEL_REQUEST_CODE) + key)
    assert raw.closed(10)
    raw.close()


# -- the server's pid ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["session", "direct"])
def test_backend_pid_is_the_servers_with_every_driver(ports, mode):
    port = ports[mode]
    conn = pg2(port)
    assert conn.get_backend_pid() == conn.info.backend_pid == one(conn, "SELECT pg_backend_pid()")
    conn.close()
    conn = pg3(port)
    assert conn.info.backend_pid == one(conn, "SELECT pg_backend_pid()")
    conn.close()

    async def with_asyncpg():
        aconn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
        try:
            assert aconn.get_server_pid() == await aconn.fetchval("SELECT pg_backend_pid()")
        finally:
            await aconn.close()
    asyncio.run(with_asyncpg())


@pytest.mark.parametrize("mode", ["session", "direct"])
def test_notify_carries_the_reported_pid(ports, mode):
    conn = pg2(ports[mode])
    with conn.cursor() as cur:
        cur.execute("LISTEN exact_chan")
        cur.execute("NOTIFY exact_chan, 'hello'")
    conn.poll()
    assert [(n.channel, n.payload, n.pid) for n in conn.notifies] == [("exact_chan", "hello", conn.get_backend_pid())]
    conn.close()


def test_transaction_mode_keeps_pgrelays_own_keys(ports):
    """In transaction pooling a client has no server of its own: its backend_pid is pgrelay's."""
    conn = pg2(ports["transaction"])
    servers = {one(conn, "SELECT pg_backend_pid()") for _ in range(3)}
    assert conn.get_backend_pid() not in servers
    conn.close()


def test_session_login_waits_for_a_server_when_the_pool_is_full(make_relay, pg):
    """With every server taken, a session client's login waits for one (as a query would have),
    then gets that server's pid; query_wait_timeout bounds the wait with the usual error."""
    relay = make_relay({"pool_mode": "session", "default_pool_size": 1, "query_wait_timeout": 2})
    holder = pg2(relay.port)
    held_pid = holder.get_backend_pid()
    got = {}

    def login():
        try:
            conn = pg2(relay.port)
            got["pid"] = (conn.get_backend_pid(), one(conn, "SELECT pg_backend_pid()"))
            conn.close()
        except psycopg2.Error as exc:
            got["error"] = exc

    thread = threading.Thread(target=login)
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive() and not got, "the second login did not wait for the only server"
    holder.close()
    thread.join(10)
    assert got.get("pid") == (held_pid, held_pid), got
    # Past query_wait_timeout the waiting login fails, and pgrelay serves the next one.
    holder = pg2(relay.port)
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError, match="query_wait_timeout"):
        pg2(relay.port)
    assert 1.5 < time.monotonic() - started < 8
    holder.close()
    conn = pg2(relay.port)
    assert one(conn, "SELECT 1") == 1
    conn.close()


# -- ParameterStatus as the server spells it ------------------------------------------------------

@pytest.mark.parametrize("spelling,server", [("utf8", "UTF8"), ("unicode", "UTF8"), ("utf-8", "UTF8"),
                                             ("euc-jp", "EUC_JP"), ("LATIN1", "LATIN1")])
@pytest.mark.parametrize("mode", ["session", "direct", "pg"])
def test_client_encoding_reads_as_the_server_spells_it(ports, mode, spelling, server):
    raw = RawClient(ports[mode])
    msgs = raw.login(client_encoding=spelling)
    status = dict(tuple(body.split(b"\0")[:2]) for kind, body in msgs if kind == b"S")
    assert status[b"client_encoding"].decode() == server
    assert data_rows(raw.query("SHOW client_encoding"))[0] == [server]
    raw.close()
    conn = pg3(ports[mode], client_encoding=spelling)
    assert conn.info.parameter_status("client_encoding") == server
    conn.close()


@pytest.mark.parametrize("mode", ["session", "direct"])
def test_welcome_lists_what_postgresql_lists(ports, mode):
    """The same parameter names and values (but for the per-backend ones) as PostgreSQL's own welcome."""
    def welcome(port):
        raw = RawClient(port)
        msgs = raw.login(application_name="exact", DateStyle="iso, dmy", TimeZone="Europe/Paris")
        raw.close()
        return dict(tuple(p.decode() for p in body.split(b"\0")[:2]) for kind, body in msgs if kind == b"S")
    ours, theirs = welcome(ports[mode]), welcome(ports["pg"])
    assert ours == theirs


# -- a terminated backend ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["session", "direct", "pg"])
def test_terminated_backend_gives_its_fatal_and_the_close_only(ports, pg, mode):
    raw = RawClient(ports[mode])
    msgs = raw.login()
    pid = struct.unpack("!I", key_of(msgs)[:4])[0]
    assert int(data_rows(raw.query("SELECT pg_backend_pid()"))[0][0]) == pid
    terminate(pg, pid)
    fields = raw.read_error()
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", *ADMIN_SHUTDOWN), fields
    assert raw.closed() and raw.buf == b"", "more than the server's FATAL came before the close"
    raw.close()


@pytest.mark.parametrize("mode", ["session", "direct"])
def test_drivers_see_one_error_as_when_connected_directly(ports, pg, mode):
    """pg_terminate_backend of the backend a driver reports, during a query and while idle: the
    driver sees exactly what it sees connected to PostgreSQL itself."""
    def with_psycopg2(port, busy):
        conn = pg2(port)
        pid = conn.get_backend_pid()
        if busy:
            timer = threading.Timer(0.5, terminate, (pg, pid))
            timer.start()
        else:
            terminate(pg, pid)
            wait_until(lambda: backend_gone(pg, pid))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_sleep(5)" if busy else "SELECT 1")
            outcome = None
        except psycopg2.Error as exc:
            outcome = (type(exc).__name__, exc.pgcode, str(exc))
        if busy:
            timer.join()
        return outcome, conn.closed

    def with_psycopg3(port, busy):
        conn = pg3(port)
        pid = conn.info.backend_pid
        if busy:
            timer = threading.Timer(0.5, terminate, (pg, pid))
            timer.start()
        else:
            terminate(pg, pid)
            wait_until(lambda: backend_gone(pg, pid))
        try:
            conn.execute("SELECT pg_sleep(5)" if busy else "SELECT 1")
            outcome = None
        except psycopg.Error as exc:
            outcome = (type(exc).__name__, exc.sqlstate, str(exc))
        if busy:
            timer.join()
        return outcome, conn.closed

    for busy in (True, False):
        for probe in (with_psycopg2, with_psycopg3):
            ours, theirs = probe(ports[mode], busy), probe(ports["pg"], busy)
            assert ours == theirs, (probe.__name__, busy)
    # During a query both drivers get the server's 57P01, once.
    outcome, closed = with_psycopg3(ports[mode], True)
    assert outcome[:2] == ("AdminShutdown", "57P01") and closed


def test_transaction_mode_error_carries_the_servers_sqlstate(ports, pg):
    """The client stays connected (by design), and its ERROR is the server's own 57P01 and text."""
    conn = pg2(ports["transaction"])
    pid = one(conn, "SELECT pg_backend_pid()")
    timer = threading.Timer(0.5, terminate, (pg, pid))
    timer.start()
    with pytest.raises(psycopg2.errors.AdminShutdown) as info:
        one(conn, "SELECT pg_sleep(5)")
    timer.join()
    assert info.value.pgcode == ADMIN_SHUTDOWN[0]
    assert info.value.diag.message_primary == ADMIN_SHUTDOWN[1]
    assert info.value.diag.severity == "ERROR"
    assert not conn.closed
    assert one(conn, "SELECT 6 * 7") == 42
    conn.close()
    # The same on the wire.
    raw = RawClient(ports["transaction"])
    raw.login()
    raw.send(query_message("SELECT pg_sleep(5)"))
    time.sleep(0.3)
    server_pid = int(pg.psql("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(5)' "
                             "AND state = 'active'") or 0)
    assert server_pid, "the query did not reach a server"
    terminate(pg, server_pid)
    msgs = raw.read_until(b"Z")
    errors = [error_fields(body) for kind, body in msgs if kind == b"E"]
    assert [(e["S"], e["C"], e["M"]) for e in errors] == [("ERROR", *ADMIN_SHUTDOWN)], msgs
    assert data_rows(raw.query("SELECT 1")) == [["1"]]
    raw.close()


# -- Terminate before the startup packet ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["transaction", "session", "direct", "pg"])
def test_terminate_before_startup_is_a_silent_close(ports, mode):
    for wait in (True, False):  # the client waits for the close, or hangs up at once
        raw = RawClient(ports[mode])
        raw.send(b"X\0\0\0\4")
        if wait:
            raw.sock.settimeout(5)
            assert raw.sock.recv(100) == b"", "something was sent before the close"
        raw.close()
    relay = ports["relay"]
    assert "bad packet header" not in relay.log()
    conn = pg2(ports[mode])
    assert one(conn, "SELECT 1") == 1
    conn.close()


# -- cancel ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["transaction", "session", "direct"])
def test_cancel_works_and_a_forged_secret_does_nothing(ports, mode):
    raw = RawClient(ports[mode])
    key = key_of(raw.login())
    raw.send(query_message("SELECT pg_sleep(1.5), 'slept'"))
    time.sleep(0.3)
    forged = key[:4] + bytes(b ^ 0x5A for b in key[4:])
    cancel(ports[mode], forged)
    msgs = raw.read_until(b"Z")
    assert [row[1] for row in data_rows(msgs)] == ["slept"], msgs
    raw.send(query_message("SELECT pg_sleep(10)"))
    time.sleep(0.3)
    started = time.monotonic()
    cancel(ports[mode], key)
    msgs = raw.read_until(b"Z")
    assert time.monotonic() - started < 5
    errors = [error_fields(body) for kind, body in msgs if kind == b"E"]
    assert [e["C"] for e in errors] == ["57014"], msgs
    raw.close()


def test_session_keys_are_fresh_per_client(make_relay):
    """A session-pooled server serves one client after another: each gets the server's pid with a
    secret of its own, so a departed client's key never cancels its successor's query."""
    relay = make_relay({"pool_mode": "session", "default_pool_size": 1})
    first = RawClient(relay.port)
    old = key_of(first.login())
    first.send(b"X\0\0\0\4")
    first.close()
    second = RawClient(relay.port)
    new = key_of(second.login())
    assert new[:4] == old[:4] and new[4:] != old[4:] and len(new) == 8
    second.send(query_message("SELECT pg_sleep(1.5), 'not canceled'"))
    time.sleep(0.3)
    cancel(relay.port, old)
    assert [r[1] for r in data_rows(second.read_until(b"Z"))] == ["not canceled"]
    second.close()


def test_direct_key_is_the_servers_own(ports, pg):
    """A direct connection's server is the client's alone: its key cancels at PostgreSQL itself."""
    raw = RawClient(ports["direct"])
    key = key_of(raw.login())
    raw.send(query_message("SELECT pg_sleep(10)"))
    time.sleep(0.3)
    cancel(pg.port, key)  # straight to PostgreSQL, not through pgrelay
    msgs = raw.read_until(b"Z")
    assert [error_fields(b)["C"] for k, b in msgs if k == b"E"] == ["57014"], msgs
    raw.close()


def test_psycopg_and_asyncpg_cancel_in_session_and_transaction_mode(ports):
    for mode in ("session", "transaction"):
        conn = pg3(ports[mode])
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join()
        assert conn.execute("SELECT 1").fetchone() == (1,)
        conn.close()

        async def with_asyncpg():
            aconn = await asyncpg.connect(host="127.0.0.1", port=ports[mode], user="postgres",
                                          database="postgres", statement_cache_size=0)
            try:
                started = time.monotonic()
                with pytest.raises(asyncio.TimeoutError):
                    await aconn.execute("SELECT pg_sleep(10)", timeout=0.5)  # asyncpg sends a CancelRequest
                assert time.monotonic() - started < 5
                assert await aconn.fetchval("SELECT 2") == 2
            finally:
                await aconn.close()
        asyncio.run(with_asyncpg())
