"""Faults: clients killed mid-transaction or mid-result, backends terminated, servers unreachable or silent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, connect, query_message, row, startup_packet, wait_until

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A client in its own process: runs its statements in one transaction, prints its backend pid,
# then waits to be killed.
TRANSACTION_CLIENT = r"""
import sys, time, psycopg2
conn = psycopg2.connect(sys.argv[1])
cur = conn.cursor()
cur.execute(sys.argv[2])
cur.fetchall() if cur.description else None
cur.execute("SELECT pg_backend_pid()")
print(cur.fetchone()[0], flush=True)
time.sleep(60)
"""

# A raw client in its own process: starts a big result, reads 100 rows, prints its backend pid
# (found in the first row), then stops reading and waits to be killed.
BIG_RESULT_CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[2])
from tests.support import RawClient, query_message
raw = RawClient(int(sys.argv[1]))
raw.login()
raw.send(query_message("SELECT pg_backend_pid(), g, repeat('x', 500) FROM generate_series(1, 1000000) g"))
rows, pid = 0, None
while rows < 100:
    kind, body = raw.read_message()
    if kind == b"D":
        if pid is None:
            size = int.from_bytes(body[2:6], "big")
            pid = int(body[6:6 + size])
        rows += 1
print(pid, flush=True)
time.sleep(60)
"""




def row_values(body: bytes) -> list[str]:
    """The text values of a DataRow body."""
    count, pos, out = int.from_bytes(body[:2], "big"), 2, []
    for _ in range(count):
        size = int.from_bytes(body[pos:pos + 4], "big")
        out.append(body[pos + 4:pos + 4 + size].decode())
        pos += 4 + size
    return out


def read_reply(raw: RawClient, limit: int = 10) -> list[tuple[bytes, bytes]]:
    """Messages up to ReadyForQuery; fails (instead of reading on) on a stray or misframed stream."""
    msgs = []
    while len(msgs) < limit:
        header = raw.recv_exact(5)
        length = int.from_bytes(header[1:], "big")
        assert 4 <= length <= 4096, f"misframed reply: {header!r} after {msgs[:5]}"
        msgs.append((header[:1], raw.recv_exact(length - 4)))
        if msgs[-1][0] == b"Z":
            return msgs
    raise AssertionError(f"more than {limit} messages in reply to a one-row query: {msgs[:5]}")


def backend_exists(pg, pid: int) -> bool:
    return pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


def start_client(script: str, *args: str) -> tuple[subprocess.Popen, int]:
    """Run a client script in a subprocess; return it and the backend pid it printed."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        proc.kill()
        raise AssertionError(f"client failed: {line!r} {proc.stderr.read()}")
    return proc, int(line)


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


@pytest.fixture(scope="module")
def fault_table(pg):
    pg.psql("CREATE TABLE IF NOT EXISTS fault_lock (id int PRIMARY KEY, v text); "
            "INSERT INTO fault_lock VALUES (1, 'one') ON CONFLICT DO NOTHING")
    return "fault_lock"


# -- clients that die -------------------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "LOCK TABLE fault_lock IN ACCESS EXCLUSIVE MODE",
    "SELECT * FROM fault_lock WHERE id = 1 FOR UPDATE",
], ids=["lock-table", "select-for-update"])
@pytest.mark.smoke
def test_client_killed_mid_transaction(make_relay, pg, fault_table, statement):
    # server_rollback_timeout = 0: the server is closed, as PgBouncer does (the default rolls it
    # back and reuses it: tests/integration/test_abandoned_transactions.py).
    relay = make_relay(settings={"default_pool_size": 1, "server_rollback_timeout": "0"})
    proc, killed_pid = start_client(TRANSACTION_CLIENT, relay.dsn(), statement)
    assert pg.psql(f"SELECT state FROM pg_stat_activity WHERE pid = {killed_pid}") == "idle in transaction"
    kill(proc)
    conn = connect(relay)
    try:
        pid, fresh_xact, no_xid = row(conn, "SELECT pg_backend_pid(), now() = statement_timestamp(), "
                                            "txid_current_if_assigned() IS NULL")
        # The killed client's server was closed, not reused: the one server of the pool is new.
        assert pid != killed_pid
        assert fresh_xact is True, "the next client ran inside the killed client's transaction"
        assert no_xid is True
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SET LOCAL lock_timeout = '3s'")
            cur.execute("LOCK TABLE fault_lock IN ACCESS EXCLUSIVE MODE")
            cur.execute("SELECT v FROM fault_lock WHERE id = 1 FOR UPDATE NOWAIT")
            assert cur.fetchone() == ("one",)
        conn.commit()
    finally:
        conn.close()
    wait_until(lambda: not backend_exists(pg, killed_pid), message=f"backend {killed_pid} to be closed")


def test_client_killed_mid_result(make_relay, pg):
    # server_rollback_timeout = 0: closed, not drained (test_abandoned_transactions.py drains one).
    relay = make_relay(settings={"default_pool_size": 1, "server_rollback_timeout": "0"})
    proc, killed_pid = start_client(BIG_RESULT_CLIENT, str(relay.port), REPO)
    # A client queued for the only server while the killed client's result is still streaming.
    waiter = RawClient(relay.port)
    waiter.login()
    waiter.send(query_message("SELECT pg_backend_pid(), 'after the kill'"))
    time.sleep(0.2)
    kill(proc)
    msgs = read_reply(waiter)
    assert [kind for kind, _ in msgs] == [b"T", b"D", b"C", b"Z"], msgs[:5]
    pid, value = row_values(msgs[1][1])
    assert value == "after the kill"
    assert int(pid) != killed_pid
    assert msgs[2] == (b"C", b"SELECT 1\0")
    waiter.close()
    conn = connect(relay)
    try:
        assert row(conn, "SELECT count(*) FROM generate_series(1, 10)") == (10,)
        assert row(conn, "SELECT pg_backend_pid()")[0] != killed_pid
    finally:
        conn.close()
    wait_until(lambda: not backend_exists(pg, killed_pid), message=f"backend {killed_pid} to be closed")


# -- servers that die ---------------------------------------------------------------------------

def terminate(pg, pid: int) -> None:
    direct = psycopg2.connect(pg.dsn())
    direct.autocommit = True
    try:
        assert row(direct, "SELECT pg_terminate_backend(%s)", (pid,)) == (True,)
    finally:
        direct.close()
    wait_until(lambda: not backend_exists(pg, pid), message=f"the terminated backend {pid} to exit")


def test_backend_terminated_in_session_mode(make_relay, pg):
    relay = make_relay(settings={"pool_mode": "session", "default_pool_size": 5})
    victim = connect(relay)
    raw_victim = RawClient(relay.port)
    raw_victim.login()
    other = connect(relay)
    victim_pid = row(victim, "SELECT pg_backend_pid()")[0]
    raw_pid = int(row_values(raw_victim.query("SELECT pg_backend_pid()")[1][1])[0])
    other_pid = row(other, "SELECT pg_backend_pid()")[0]
    assert len({victim_pid, raw_pid, other_pid}) == 3
    terminate(pg, victim_pid)
    terminate(pg, raw_pid)
    # What pgrelay tells the client is what PostgreSQL does: its own FATAL, then the close, and no
    # second FATAL of pgrelay's (issue 10 item 5; PgBouncer adds "server conn crashed?").
    first = raw_victim.read_error()
    assert (first["S"], first["C"], first["M"]) == \
        ("FATAL", "57P01", "terminating connection due to administrator command"), first
    assert raw_victim.buf == b"" and raw_victim.closed()
    raw_victim.close()
    # libpq may only report the closed socket (it can lose the FATAL messages on a reset), but it errs.
    with pytest.raises(psycopg2.OperationalError):
        row(victim, "SELECT 1")
    assert victim.closed
    # The other client keeps its own server.
    assert row(other, "SELECT pg_backend_pid()") == (other_pid,)
    fresh = connect(relay)
    try:
        pid, value = row(fresh, "SELECT pg_backend_pid(), 1 + 1")
        assert value == 2
        assert pid not in (victim_pid, raw_pid, other_pid)
    finally:
        fresh.close()
    other.close()


@pytest.mark.smoke
def test_idle_server_terminated_in_transaction_mode(make_relay, pg):
    relay = make_relay(settings={"default_pool_size": 1})
    conn = connect(relay)
    dead_pid = row(conn, "SELECT pg_backend_pid()")[0]  # the server is now idle in the pool
    closes_before = len(re.findall(r"S-\d+: .* closing because", relay.log()))
    terminate(pg, dead_pid)
    wait_until(lambda: len(re.findall(r"S-\d+: .* closing because", relay.log())) > closes_before,
               message="pgrelay to drop the dead idle server")
    # The same client, and new ones, keep working on a new server.
    pid, value = row(conn, "SELECT pg_backend_pid(), 'still here'")
    assert value == "still here"
    assert pid != dead_pid
    for n in range(10):
        fresh = connect(relay)
        try:
            assert row(fresh, "SELECT %s::int", (n,)) == (n,)
        finally:
            fresh.close()
    conn.close()


# -- servers that cannot be reached ----------------------------------------------------------------

def test_server_refuses_connections(make_relay, pg):
    dead_port = free_port()  # nothing listens there
    relay = make_relay(databases={
        "dead": f"host=127.0.0.1 port={dead_port} dbname=postgres",
        "postgres": f"host=127.0.0.1 port={pg.port}",
    })
    start = time.monotonic()
    raw = RawClient(relay.port)
    raw.send(startup_packet(database="dead"))
    fields = raw.read_error()
    assert time.monotonic() - start < 3
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006", fields
    assert fields["M"].startswith(f"could not connect to server 127.0.0.1:{dead_port}"), fields
    assert "refused" in fields["M"].lower() or "ECONNREFUSED" in fields["M"], fields
    assert raw.closed()
    raw.close()
    # Within server_login_retry the next client gets the cached error at once.
    with pytest.raises(psycopg2.OperationalError, match=r"server login has been failing, cached error: "
                                                        r"could not connect to server"):
        psycopg2.connect(relay.dsn(dbname="dead"), connect_timeout=5)
    assert time.monotonic() - start < 5
    # The other database is served all along.
    conn = connect(relay)
    try:
        assert row(conn, "SELECT current_database()") == ("postgres",)
    finally:
        conn.close()


def test_server_connect_timeout(make_relay, pg):
    """A server that accepts TCP but never answers the StartupMessage: the client gets an error after
    server_connect_timeout, and the other database is served meanwhile."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nobody ever reads them
    silent_port = silent.getsockname()[1]
    try:
        relay = make_relay(settings={"server_connect_timeout": 2},
                           databases={"silent": f"host=127.0.0.1 port={silent_port} dbname=postgres",
                                      "postgres": f"host=127.0.0.1 port={pg.port}"})
        result = {}

        def login_to_silent():
            start = time.monotonic()
            raw = RawClient(relay.port, timeout=15)
            raw.send(startup_packet(database="silent"))
            try:
                result["fields"] = raw.read_error()
                result["closed"] = raw.closed()
            finally:
                result["elapsed"] = time.monotonic() - start
                raw.close()

        waiter = threading.Thread(target=login_to_silent)
        waiter.start()
        time.sleep(0.3)
        assert waiter.is_alive()
        served = time.monotonic()
        conn = connect(relay)
        try:
            assert row(conn, "SELECT 'served meanwhile'") == ("served meanwhile",)
        finally:
            conn.close()
        assert time.monotonic() - served < 1.5
        waiter.join(15)
        assert not waiter.is_alive()
        fields = result["fields"]
        assert fields["S"] == "FATAL"
        assert fields["C"] == "08006", fields
        assert fields["M"].startswith("server connect timeout"), fields
        assert result["closed"]
        assert 1.8 <= result["elapsed"] < 5, result
    finally:
        silent.close()


def test_server_closed_while_its_connect_is_pending_never_logs_in(make_relay):
    """A direct client leaves (KILL) while its server's TCP connect waits in a full accept queue:
    once the connect completes, pgrelay closes that socket without logging in, and keeps no server
    outside its pools (found by bench/soak.py: a server that logged in after its close, in no pool,
    leaked a descriptor)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))  # the accept queue is now full
    direct = free_port()
    relay = make_relay({"admin_users": "postgres", "server_connect_timeout": "30"},
                       databases={"postgres": f"host=127.0.0.1 port={port}"},
                       extra_sections=f"[listeners]\ndirect = port={direct} role=direct\n")
    admin = RawClient(relay.port)
    admin.login(database="pgbouncer")
    client = socket.create_connection(("127.0.0.1", direct))
    client.sendall(startup_packet("postgres", "postgres"))
    time.sleep(0.3)  # the server's connect is now pending
    admin.query("KILL postgres")
    wait_until(lambda: "closing because" in relay.log().split("KILL")[-1], message="the kill")
    listener.settimeout(10)
    queued, _ = listener.accept()  # the filler: the queue has room, and pgrelay's SYN is retransmitted
    queued.close()
    filler.close()
    conn, _ = listener.accept()  # pgrelay's connect completes now
    conn.settimeout(10)
    assert conn.recv(100) == b"", "pgrelay sent a StartupMessage for a server it had closed"
    conn.close()
    client.close()
    time.sleep(1)
    assert "new connection to server" not in relay.log()
    rows = admin.query("SHOW SERVERS")
    assert not [m for m in rows if m[0] == b"D"], rows
    admin.close()
    listener.close()
