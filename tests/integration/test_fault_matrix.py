"""The fault matrix: network faults (tests/faultproxy.py) between pgrelay and PostgreSQL, and
between a client and pgrelay, in each pool mode.

Database "faulty" reaches PostgreSQL through a FaultProxy; every other database ("*") reaches it
directly. Every test checks that the affected client gets PostgreSQL's or PgBouncer's error with
its exact SQLSTATE, or is served correctly where the fault only slows or fragments the bytes
(delay, throttle, split); that nothing waits past the configured timeouts; that clients of the
direct database are served while the fault lasts; and that what was committed before or during
the fault is in PostgreSQL afterwards, and what was not committed is not.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid

import psycopg2
import pytest

from ..faultproxy import FaultProxy
from ..support import (RawClient, assert_served, connect, error_fields, query_message, scalar, startup_packet,
                       wait_until)

MODES = ["session", "transaction", "statement"]
QUERY_TIMEOUT = 2  # seconds; pgrelay's janitor looks every 0.5 s
CONNECT_TIMEOUT = 2
CRASHED = ("FATAL", "08006", "server conn crashed?")


# -- set-up --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def matrix_table(pg):
    pg.psql("CREATE TABLE IF NOT EXISTS fault_matrix (tag text, n int)")
    return "fault_matrix"


@pytest.fixture
def proxy(pg):
    """A FaultProxy in front of PostgreSQL (the server side)."""
    p = FaultProxy("127.0.0.1", pg.port)
    yield p
    p.close()


@pytest.fixture
def tag(matrix_table):
    return uuid.uuid4().hex[:12]


def start(make_relay, pg, proxy, mode, **settings):
    conf = {"pool_mode": mode, "query_timeout": QUERY_TIMEOUT, "server_connect_timeout": CONNECT_TIMEOUT,
            "server_login_retry": 1, "default_pool_size": 2}
    conf.update(settings)
    return make_relay(conf, databases={"faulty": f"host=127.0.0.1 port={proxy.port} dbname=postgres",
                                       "*": f"host=127.0.0.1 port={pg.port}"})


def rows_in_pg(pg, tag: str) -> list[int]:
    """What PostgreSQL itself holds for `tag`, read directly (no pgrelay)."""
    conn = psycopg2.connect(pg.dsn(), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT n FROM fault_matrix WHERE tag = %s ORDER BY n", (tag,))
            return [r[0] for r in cur.fetchall()]
    finally:
        conn.close()


def raw_client(relay, port=None, database="faulty") -> RawClient:
    raw = RawClient(port or relay.port)
    raw.login(database=database)
    return raw


def commit_row(raw: RawClient, tag: str, n: int) -> None:
    kinds = [k for k, _ in raw.query(f"INSERT INTO fault_matrix VALUES ('{tag}', {n})")]
    assert kinds == [b"C", b"Z"], kinds


def send(raw: RawClient, sql: str) -> None:
    try:
        raw.send(query_message(sql))
    except OSError:
        pass  # pgrelay closed it already: what it said first is still there to read


def read_outcome(raw: RawClient, timeout: float) -> tuple[list[tuple[bytes, bytes]], bool, float]:
    """Messages until ReadyForQuery or the close, whether pgrelay closed the connection, and how long
    it took. A misframed stream fails (a header that is not a message's)."""
    start = time.monotonic()
    raw.sock.settimeout(timeout)
    msgs = []
    try:
        while True:
            header = raw.recv_exact(5)
            assert header[:1] in b"123CDEIKNRSTZnstGHWdc", f"misframed: {header!r} after {msgs[:4]}"
            length = int.from_bytes(header[1:], "big")
            assert 4 <= length < 1 << 20, f"misframed: {header!r} after {msgs[:4]}"
            msgs.append((header[:1], raw.recv_exact(length - 4)))
            if msgs[-1][0] == b"Z":
                return msgs, False, time.monotonic() - start
    except EOFError:
        assert raw.buf == b"", f"the close came inside a message: {raw.buf[:40]!r}"
        return msgs, True, time.monotonic() - start
    except ConnectionResetError:
        return msgs, True, time.monotonic() - start


def error_of(msgs) -> tuple[str, str, str]:
    errors = [error_fields(body) for kind, body in msgs if kind == b"E"]
    assert len(errors) == 1, msgs
    return errors[0]["S"], errors[0]["C"], errors[0]["M"]


class Background:
    """Runs `fn` in a thread; `result`/`failure` once done."""

    def __init__(self, fn, *args):
        self.result = self.failure = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as exc:  # asserted on by join()
            self.failure = exc

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"still waiting after {timeout}s"
        if self.failure is not None:
            raise self.failure
        return self.result


def served_meanwhile(relay, while_running: Background, times: int = 3) -> None:
    """Clients of the direct database are served, each promptly, while `while_running` still waits."""
    for _ in range(times):
        start = time.monotonic()
        assert_served(relay)
        assert time.monotonic() - start < 1.5
    assert while_running.thread.is_alive(), "the faulty client was answered before the check ran"


def faulty_served(relay, timeout: float = 5) -> None:
    """A new client of the faulty database is served again (once the proxy is healed)."""
    def attempt():
        try:
            assert_served(relay, dbname="faulty")
            return True
        except psycopg2.OperationalError:
            return False  # within server_login_retry: the cached error
    wait_until(attempt, timeout=timeout, message="the faulty database to be served again")


SERVER_LOSSES = {
    "drop": lambda p: p.drop(new=False),
    "reset": lambda p: p.reset(new=False),
    "half_close_server": lambda p: p.half_close("server", new=False),  # PostgreSQL reads EOF and exits
    "half_close_client": lambda p: p.half_close("client", new=False),  # pgrelay reads EOF
}


# -- server side: the connection is lost -----------------------------------------------------------

@pytest.mark.parametrize("fault", sorted(SERVER_LOSSES))
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_server_lost_mid_transaction(make_relay, pg, proxy, tag, mode, fault):
    relay = start(make_relay, pg, proxy, mode)
    raw = raw_client(relay)
    commit_row(raw, tag, 1)
    assert [k for k, _ in raw.query("BEGIN")] == [b"C", b"Z"]
    commit_row(raw, tag, 2)  # inside the transaction: never committed
    SERVER_LOSSES[fault](proxy)
    # Unasked: a client inside a transaction is told at once, and closed, as PgBouncer does.
    msgs, closed, elapsed = read_outcome(raw, timeout=5)
    assert error_of(msgs) == CRASHED and closed, msgs
    assert elapsed < 2
    assert_served(relay)
    faulty_served(relay)
    assert rows_in_pg(pg, tag) == [1]


@pytest.mark.parametrize("fault", ["drop", "reset"])
@pytest.mark.parametrize("mode", MODES)
def test_server_lost_mid_query(make_relay, pg, proxy, tag, mode, fault):
    relay = start(make_relay, pg, proxy, mode)
    raw = raw_client(relay)
    commit_row(raw, tag, 1)
    raw.send(query_message(f"INSERT INTO fault_matrix SELECT '{tag}', 2 FROM pg_sleep(1)"))
    time.sleep(0.3)
    SERVER_LOSSES[fault](proxy)
    msgs, closed, elapsed = read_outcome(raw, timeout=5)
    assert elapsed < 1
    if mode == "session":
        assert error_of(msgs) == CRASHED and closed, msgs
    else:
        # The client stays: its query fails with 08006 and its next one gets another server.
        severity, code, text = error_of(msgs)
        assert (severity, code) == ("ERROR", "08006") and text.startswith("server connection lost: "), msgs
        # Not "rolled back": PostgreSQL finishes (and commits) a statement whose client has gone.
        assert error_fields(msgs[0][1])["H"] == "The query may or may not have taken effect.", msgs
        assert not closed and msgs[-1] == (b"Z", b"I"), msgs
        commit_row(raw, tag, 3)
    assert_served(relay)
    faulty_served(relay)
    # PostgreSQL only notices the lost client when it writes the result: the INSERT commits.
    wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'INSERT INTO fault_matrix SELECT%'"
                               " AND pid <> pg_backend_pid()") == "0", timeout=5)
    assert rows_in_pg(pg, tag) == ([1, 2] if mode == "session" else [1, 2, 3])


@pytest.mark.parametrize("fault", ["drop", "reset"])
@pytest.mark.parametrize("mode", MODES)
def test_server_lost_between_transactions(make_relay, pg, proxy, tag, mode, fault):
    relay = start(make_relay, pg, proxy, mode)
    raw = raw_client(relay)
    commit_row(raw, tag, 1)
    SERVER_LOSSES[fault](proxy)
    time.sleep(0.3)  # pgrelay notices the idle server's close
    send(raw, f"INSERT INTO fault_matrix VALUES ('{tag}', 2)")
    msgs, closed, elapsed = read_outcome(raw, timeout=5)
    assert elapsed < 1
    if mode == "session":
        assert error_of(msgs) == CRASHED and closed, msgs
        expected = [1]
    else:
        # Between transactions the loss is invisible: the INSERT ran on a new server.
        assert [k for k, _ in msgs] == [b"C", b"Z"] and not closed, msgs
        expected = [1, 2]
    assert_served(relay)
    assert rows_in_pg(pg, tag) == expected


@pytest.mark.parametrize("mode", MODES)
def test_server_cut_mid_message(make_relay, pg, proxy, tag, mode):
    """The server's connection ends inside a DataRow: the client has part of a message, so pgrelay
    must close without writing an ErrorResponse into it (it would be read as the rest of the row)."""
    relay = start(make_relay, pg, proxy, mode)
    raw = raw_client(relay)
    commit_row(raw, tag, 1)
    proxy.truncate(100, direction="down", new=False)  # inside the 1000-byte DataRow
    raw.send(query_message("SELECT repeat('x', 1000)"))
    raw.sock.settimeout(5)
    start_at, got = time.monotonic(), b""
    while True:
        try:
            chunk = raw.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    assert time.monotonic() - start_at < 1
    assert len(got) == 100, f"pgrelay added {len(got) - 100} bytes after the cut: {got[100:160]!r}"
    assert got[:1] == b"T"
    # libpq reports it as a lost connection, not as a corrupted row.
    conn = connect(relay, dbname="faulty")
    assert scalar(conn, "SELECT 1") == 1  # a server of its own (session) or idle in the pool
    proxy.truncate(100, direction="down", new=False)
    with pytest.raises(psycopg2.OperationalError, match="server closed the connection unexpectedly"):
        scalar(conn, "SELECT repeat('y', 1000)")
    assert_served(relay)
    proxy.heal()
    faulty_served(relay)
    assert rows_in_pg(pg, tag) == [1]


# -- server side: the server goes silent -----------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_server_stalled_mid_query(make_relay, pg, proxy, tag, mode):
    relay = start(make_relay, pg, proxy, mode)
    raw = raw_client(relay)
    commit_row(raw, tag, 1)
    proxy.stall()
    started = time.monotonic()
    send(raw, f"INSERT INTO fault_matrix VALUES ('{tag}', 2)")
    waiting = Background(read_outcome, raw, 10)
    served_meanwhile(relay, waiting)
    msgs, closed, _ = waiting.join(10)
    elapsed = time.monotonic() - started
    assert error_of(msgs) == ("FATAL", "57014", "query timeout") and closed, msgs
    assert QUERY_TIMEOUT - 0.1 <= elapsed < QUERY_TIMEOUT + 1.5, elapsed
    assert rows_in_pg(pg, tag) == [1]
    proxy.heal()
    faulty_served(relay)
    # The network still delivers the INSERT pgrelay sent before it gave up, and PostgreSQL commits
    # it: a timeout says nothing about the outcome (nor does pgrelay's FATAL claim a rollback).
    wait_until(lambda: rows_in_pg(pg, tag) == [1, 2], timeout=5, message="the delivered INSERT")


@pytest.mark.parametrize("fault", ["stall", "blackhole"])
def test_server_never_answers_login(make_relay, pg, proxy, tag, fault):
    getattr(proxy, fault)()  # before pgrelay opens any server
    relay = start(make_relay, pg, proxy, "transaction")
    started = time.monotonic()

    def login():
        raw = RawClient(relay.port, timeout=10)
        raw.send(startup_packet(database="faulty"))
        return read_outcome(raw, 10)

    waiting = Background(login)
    served_meanwhile(relay, waiting)
    msgs, closed, _ = waiting.join(10)
    elapsed = time.monotonic() - started
    severity, code, text = error_of(msgs)
    assert (severity, code) == ("FATAL", "08006") and text.startswith("server connect timeout"), msgs
    assert closed
    assert CONNECT_TIMEOUT - 0.1 <= elapsed < CONNECT_TIMEOUT + 1.5, elapsed
    proxy.heal()
    faulty_served(relay)
    conn = connect(relay, dbname="faulty")
    try:
        scalar(conn, "INSERT INTO fault_matrix VALUES (%s, 1) RETURNING n", (tag,))
    finally:
        conn.close()
    assert rows_in_pg(pg, tag) == [1]


# -- server side: slow or fragmented, and transparent ------------------------------------------------

TRANSPARENT = {
    "delay": lambda p: p.delay(0.05),
    "throttle": lambda p: p.throttle(40_000),
    "split": lambda p: p.split(),
}
# The throttled link is slow next to the timeouts: the 100 kB value takes 2.5 s to arrive, longer than
# idle_transaction_timeout (a result still streaming is not idleness) and more than half of
# query_timeout (which counts from the client's request, so it must not fire). With 0.5 s janitor
# ticks, an idle_transaction_timeout of 1 s that wrongly counted the streaming time would fire within
# 2 s of the request; the test's own client would have to stall 1 s to trip it falsely.
SLOW_TIMEOUTS = {"throttle": {"query_timeout": 4, "idle_transaction_timeout": 1}}


def exercise(conn, tag: str, big: int, mode: str) -> None:
    """Inserts (in one transaction but in statement pooling), a committed result read back, and a
    `big`-byte value (inside a transaction too, but in statement pooling)."""
    conn.autocommit = mode == "statement"
    with conn.cursor() as cur:
        for n in range(1, 6):
            cur.execute("INSERT INTO fault_matrix VALUES (%s, %s)", (tag, n))
    if mode != "statement":
        conn.commit()
    conn.autocommit = True
    assert scalar(conn, "SELECT array_agg(n ORDER BY n) FROM fault_matrix WHERE tag = %s", (tag,)) == [1, 2, 3, 4, 5]
    conn.autocommit = mode == "statement"
    value = scalar(conn, "SELECT repeat(md5(%s), %s)", (tag, big // 32))
    if mode != "statement":
        conn.commit()
    conn.autocommit = True
    assert value == hashlib.md5(tag.encode()).hexdigest() * (big // 32)


@pytest.mark.parametrize("fault", sorted(TRANSPARENT))
@pytest.mark.parametrize("mode", MODES)
def test_server_slow_or_split_is_transparent(make_relay, pg, proxy, tag, mode, fault):
    TRANSPARENT[fault](proxy)  # from the first server login on
    timeouts = SLOW_TIMEOUTS.get(fault, {})
    relay = start(make_relay, pg, proxy, mode, default_pool_size=1, **timeouts)
    started = time.monotonic()
    conn = connect(relay, dbname="faulty")  # the server login goes through the fault too
    try:
        exercise(conn, tag, 20_000 if fault == "split" else 100_000, mode)
        pid = scalar(conn, "SELECT pg_backend_pid()")
        if mode != "session":
            # pgrelay found each ReadyForQuery in the fragmented stream: the one server was released.
            other = connect(relay, dbname="faulty")
            try:
                assert scalar(other, "SELECT count(*) FROM fault_matrix WHERE tag = %s", (tag,)) == 5
            finally:
                other.close()
    finally:
        conn.close()
    # ... and it was left clean, so it is reused (not closed as cut mid-message).
    again = connect(relay, dbname="faulty")
    try:
        assert scalar(again, "SELECT pg_backend_pid()") == pid
    finally:
        again.close()
    elapsed = time.monotonic() - started
    assert elapsed < timeouts.get("query_timeout", QUERY_TIMEOUT) + 3
    # The fault was in effect: at least 8 round trips of 0.1 s; 100 kB at 40 kB/s.
    assert elapsed >= {"delay": 0.8, "throttle": 2.4, "split": 0}[fault], elapsed
    links = [link for link in proxy.links if link.server is not None]
    down = sum(link.bytes_forwarded()[1] for link in links)
    assert down > (20_000 if fault == "split" else 100_000)  # it all went through the proxy
    if fault == "split":
        assert all(link.down.sends == link.down.forwarded for link in links)  # one byte at a time
    assert_served(relay)
    assert rows_in_pg(pg, tag) == [1, 2, 3, 4, 5]


# -- client side: a proxy between the client and pgrelay ---------------------------------------------

@pytest.fixture
def client_proxy():
    holder = {}

    def make(relay):
        holder["proxy"] = FaultProxy("127.0.0.1", relay.port)
        return holder["proxy"]

    yield make
    if "proxy" in holder:
        holder["proxy"].close()


@pytest.mark.parametrize("mode", MODES)
def test_client_split_is_transparent(make_relay, pg, proxy, client_proxy, tag, mode):
    relay = start(make_relay, pg, proxy, mode)
    cproxy = client_proxy(relay)
    cproxy.split()
    conn = psycopg2.connect(f"host=127.0.0.1 port={cproxy.port} user=postgres dbname=postgres", connect_timeout=10)
    try:
        exercise(conn, tag, 5_000, mode)
    finally:
        conn.close()
    # The extended protocol too (Parse/Bind/Execute/Sync, binary parameters), one byte at a time.
    import psycopg
    with psycopg.connect(f"host=127.0.0.1 port={cproxy.port} user=postgres dbname=postgres",
                         connect_timeout=10, autocommit=True, prepare_threshold=None) as c3:
        for n in (6, 7):
            c3.execute("INSERT INTO fault_matrix VALUES (%s, %s)", (tag, n), binary=True)
        assert c3.execute("SELECT count(*) FROM fault_matrix WHERE tag = %s", (tag,)).fetchone() == (7,)
    assert cproxy.accepted == 2
    for link in cproxy.links:
        assert link.up.sends == link.up.forwarded > 100 and link.down.sends == link.down.forwarded
    assert rows_in_pg(pg, tag) == [1, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("fault", ["drop", "reset"])
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_lost_mid_transaction(make_relay, pg, proxy, client_proxy, tag, mode, fault):
    """The client's connection goes while it holds a row lock in a transaction, on a pool of one:
    pgrelay rolls the transaction back (or closes the server), and the next client gets the server,
    the lock, and none of the uncommitted rows."""
    relay = start(make_relay, pg, proxy, mode, default_pool_size=1)
    cproxy = client_proxy(relay)
    raw = RawClient(cproxy.port)
    raw.login()
    commit_row(raw, tag, 1)
    assert [k for k, _ in raw.query("BEGIN")] == [b"C", b"Z"]
    commit_row(raw, tag, 2)
    assert b"D" in [k for k, _ in raw.query(f"SELECT n FROM fault_matrix WHERE tag = '{tag}' AND n = 1 FOR UPDATE")]
    getattr(cproxy, fault)(new=False)
    started = time.monotonic()
    conn = connect(relay)  # the same pool: it must get the one server once it is back
    try:
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT n FROM fault_matrix WHERE tag = %s FOR UPDATE NOWAIT", (tag,))
            assert cur.fetchall() == [(1,)]
        conn.commit()
    finally:
        conn.close()
    assert time.monotonic() - started < 6  # server_rollback_timeout (5 s) at most
    assert rows_in_pg(pg, tag) == [1]


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_client_stalled_mid_transaction(make_relay, pg, proxy, client_proxy, tag, mode):
    """A client that stops talking inside a transaction, on a pool of one: idle_transaction_timeout
    ends it (FATAL 25P03, read once the proxy heals) and the waiting client is served."""
    relay = start(make_relay, pg, proxy, mode, default_pool_size=1, query_timeout=0, idle_transaction_timeout=1.5)
    cproxy = client_proxy(relay)
    raw = RawClient(cproxy.port)
    raw.login()
    commit_row(raw, tag, 1)
    assert [k for k, _ in raw.query("BEGIN")] == [b"C", b"Z"]
    commit_row(raw, tag, 2)
    cproxy.stall()
    started = time.monotonic()
    waiter = Background(lambda: scalar(connect(relay), "SELECT count(*) FROM fault_matrix WHERE tag = %s", (tag,)))
    assert waiter.join(6) == 1  # the stalled client's uncommitted row is gone
    assert 1.4 <= time.monotonic() - started < 4
    cproxy.heal()
    msgs, closed, _ = read_outcome(raw, timeout=5)
    assert error_of(msgs) == ("FATAL", "25P03", "idle transaction timeout") and closed, msgs
    assert rows_in_pg(pg, tag) == [1]


def test_client_stops_reading_a_result(make_relay, pg, proxy, client_proxy, tag):
    """A client that stops reading a large result on a pool of one: query_timeout closes it and its
    server, and the waiting client is served."""
    relay = start(make_relay, pg, proxy, "transaction", default_pool_size=1)
    cproxy = client_proxy(relay)
    raw = RawClient(cproxy.port)
    raw.login()
    commit_row(raw, tag, 1)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    cproxy.stall(direction="down")
    raw.send(query_message("SELECT repeat('z', 1000) FROM generate_series(1, 200000)"))
    started = time.monotonic()
    time.sleep(1)  # the waiter queues for less than query_timeout (which also ends a queued client)
    waiter = Background(lambda: scalar(connect(relay), "SELECT count(*) FROM fault_matrix WHERE tag = %s", (tag,)))
    assert waiter.join(QUERY_TIMEOUT + 4) == 1
    assert QUERY_TIMEOUT - 0.1 <= time.monotonic() - started < QUERY_TIMEOUT + 2
    cproxy.close()
    raw.close()
    assert_served(relay)
    assert rows_in_pg(pg, tag) == [1]
