"""A client that leaves mid-transaction: its server is drained, rolled back and reused (server_rollback_timeout).

Each test kills a client (its socket closes under pgrelay, as when the process dies) in some state
(holding a row lock, inside COPY, mid extended-protocol batch, in a failed transaction, idle in a
transaction past idle_transaction_timeout) and checks, against the real PostgreSQL, that the next
client gets the same backend (no server login: pgrelay's "new connection to server" lines and the
backend pid) with no transaction open, no locks held and no stray results; that a rollback that
hangs (its backend SIGSTOPped) closes the server after the timeout; and that 0 closes as before.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, connect, data_rows, message, query_message, scalar, wait_until
from .test_settings_enforced import ensure_role

USER = "abandoner"
ROLLED_BACK = "server rolled back after client left"
TERMINATE = b"X\x00\x00\x00\x04"
FLUSH = message(b"H")


@pytest.fixture(scope="module")
def tables(pg):
    ensure_role(pg, USER)
    pg.psql("DROP TABLE IF EXISTS abandoned_rows, abandoned_copy, abandoned_batch; "
            "CREATE TABLE abandoned_rows (id int PRIMARY KEY, v int NOT NULL); "
            "CREATE TABLE abandoned_copy (line text); CREATE TABLE abandoned_batch (id int); "
            f"GRANT ALL ON abandoned_rows, abandoned_copy, abandoned_batch TO {USER}; "
            f"GRANT CREATE, TEMP ON DATABASE postgres TO {USER}")
    return pg


@pytest.fixture
def clean(tables):
    tables.psql("TRUNCATE abandoned_copy, abandoned_batch; DELETE FROM abandoned_rows; "
                "INSERT INTO abandoned_rows SELECT g, 0 FROM generate_series(1, 100) g")
    return tables


def start(make_relay, pg, mode="transaction", size=1, **settings):
    port = free_port()
    relay = make_relay({"pool_mode": mode, "default_pool_size": str(size), "metrics_listen": f"127.0.0.1:{port}",
                        **settings})
    relay.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return relay


def logins(relay) -> int:
    """Server logins pgrelay made (log_connections logs each)."""
    return relay.log().count("new connection to server")


def metric(relay, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(relay.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return sum(s.value for s in family.samples if s.labels.get("user") == USER and s.name.endswith("_total"))
    raise AssertionError(f"no metric {name}")


def direct(pg):
    conn = psycopg2.connect(host=pg.socket_dir, port=pg.port, user=pg.user, dbname="postgres")
    conn.autocommit = True
    return conn


def client(relay) -> RawClient:
    raw = RawClient(relay.port)
    raw.login(user=USER)
    return raw


def backend_pid(raw: RawClient) -> int:
    return int(data_rows(raw.query("select pg_backend_pid()"))[0][0])


def kill(raw: RawClient) -> None:
    """The client process dies: its socket closes, with a reset, without Terminate."""
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.sock.close()


def assert_clean_reuse(relay, pg, pid: int, logins_before: int, prepared: str | None = "0") -> None:
    """The next client gets backend `pid` again, without a server login, and finds it clean: no
    transaction, no locks, nothing left to read; every row of abandoned_rows is free to lock.
    `prepared`: the server's pg_prepared_statements count (None: pgrelay.prepared's per-server
    cache keeps what it prepared there, hidden from clients, so any count)."""
    wait_until(lambda: ROLLED_BACK in relay.log(), timeout=10, message="the rollback")
    raw = client(relay)
    try:
        msgs = raw.query("select pg_backend_pid(), txid_current_if_assigned() is null, "
                         "(select count(*) from pg_prepared_statements)")
        assert [m[0] for m in msgs] == [b"T", b"D", b"C", b"Z"], msgs  # nothing stale before our reply
        found = data_rows(msgs)
        assert found[0][:2] == [str(pid), "t"] and (prepared is None or found[0][2] == prepared), found
        assert msgs[-1] == (b"Z", b"I")
        assert [m[0] for m in raw.query("select 42")] == [b"T", b"D", b"C", b"Z"]
        with direct(pg) as conn, conn.cursor() as cur:
            cur.execute("select state, backend_xid, (select count(*) from pg_locks l where l.pid = a.pid) "
                        "from pg_stat_activity a where pid = %s", (pid,))
            assert cur.fetchone() == ("idle", None, 0)
            cur.execute("set lock_timeout = '2s'; begin; select id from abandoned_rows for update nowait; "
                        "rollback")
    finally:
        raw.send(TERMINATE)
        raw.close()
    assert logins(relay) == logins_before
    assert "closing because: server_rollback_timeout" not in relay.log()


@pytest.mark.smoke
@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_killed_client_holding_a_row_lock(make_relay, clean, mode):
    relay = start(make_relay, clean, mode)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    assert raw.query("UPDATE abandoned_rows SET v = v + 1 WHERE id = 1")[-1] == (b"Z", b"T")
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 1") == "0"  # the update was rolled back
    assert metric(relay, "pgrelay_server_rollbacks") == 1
    assert metric(relay, "pgrelay_server_rollback_failures") == 0


def test_killed_session_client_with_a_temp_table(make_relay, clean):
    """Session mode: after the rollback the server goes through server_reset_query (DISCARD ALL)
    as any released session server does, so the temp table and the SET are gone too."""
    relay = start(make_relay, clean, "session")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("CREATE TEMP TABLE abandoned_temp (id int)")
    raw.query("SET work_mem = '7MB'")
    raw.query("BEGIN")
    raw.query("INSERT INTO abandoned_temp VALUES (1)")
    raw.query("SELECT * FROM abandoned_rows WHERE id = 2 FOR UPDATE")
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") == pid
        assert scalar(conn, "select count(*) from pg_tables where tablename = 'abandoned_temp'") == 0
        assert scalar(conn, "show work_mem") != "7MB"
    finally:
        conn.close()


@pytest.mark.parametrize("in_transaction", [False, True])
def test_killed_client_inside_copy_from_stdin(make_relay, clean, in_transaction):
    """CopyFail ends the COPY first: no row of it is kept, even in autocommit."""
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    if in_transaction:
        raw.query("BEGIN")
        raw.query("UPDATE abandoned_rows SET v = 5 WHERE id = 3")
    raw.send(query_message("COPY abandoned_copy FROM STDIN"))
    kind, _ = raw.read_message()
    assert kind == b"G"
    raw.send(b"".join(message(b"d", f"line {i}\n".encode()) for i in range(1000)))
    time.sleep(0.3)  # the rows reach the server
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT count(*) FROM abandoned_copy") == "0"
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 3") == "0"


def _batch(sql: str) -> bytes:
    return (message(b"P", b"\x00" + sql.encode() + b"\x00\x00\x00") + message(b"B", b"\x00\x00" + b"\x00" * 6)
            + message(b"E", b"\x00" + b"\x00" * 4) + FLUSH)


def test_killed_client_mid_batch_without_sync_commits_nothing(make_relay, clean):
    """An INSERT executed in an unsynced batch is rolled back, never committed by a Sync pgrelay sends."""
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.send(_batch("INSERT INTO abandoned_batch VALUES (1)"))
    assert [raw.read_message()[0] for _ in range(3)] == [b"1", b"2", b"C"]  # ran, not yet committed
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT count(*) FROM abandoned_batch") == "0"


def test_killed_client_mid_batch_inside_a_transaction(make_relay, clean):
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.send(_batch("UPDATE abandoned_rows SET v = 9 WHERE id = 4"))
    assert [raw.read_message()[0] for _ in range(3)] == [b"1", b"2", b"C"]
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 4") == "0"


def test_killed_client_in_a_failed_transaction(make_relay, clean):
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("SELECT * FROM abandoned_rows WHERE id = 5 FOR UPDATE")
    assert raw.query("SELECT 1/0")[-1] == (b"Z", b"E")
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)


def test_killed_client_with_queries_in_flight(make_relay, clean):
    """What was in flight runs to its end and is dropped, then the rollback; none of it reaches
    the next client."""
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.send(query_message("UPDATE abandoned_rows SET v = 1 WHERE id = 6")
             + query_message("SELECT g FROM pg_sleep(0.8), generate_series(1, 20000) g"))
    time.sleep(0.2)
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 6") == "0"


def test_killed_client_mid_result_is_drained_for_the_waiting_client(make_relay, clean):
    """Autocommit, killed while a big result streams: the rest is read and dropped, then the one
    server of the pool serves the queued client, its reply framed exactly, without a login."""
    relay = start(make_relay, clean, server_rollback_timeout="30")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.send(query_message("SELECT g, repeat('x', 100) FROM generate_series(1, 200000) g"))
    rows = 0
    while rows < 100:
        rows += raw.read_message()[0] == b"D"
    waiter = client(relay)
    waiter.send(query_message("SELECT pg_backend_pid(), 'after the kill'"))
    time.sleep(0.2)
    before = logins(relay)
    kill(raw)
    waiter.sock.settimeout(30)
    msgs = waiter.read_until(b"Z")
    assert [m[0] for m in msgs] == [b"T", b"D", b"C", b"Z"], msgs[:5]
    assert data_rows(msgs) == [[str(pid), "after the kill"]]
    waiter.close()
    assert logins(relay) == before
    assert ROLLED_BACK in relay.log()


def test_killed_psycopg2_process_mid_transaction(make_relay, clean):
    """A real driver in a real process, killed with SIGKILL while holding a row lock."""
    relay = start(make_relay, clean)
    first = connect(relay, user=USER)
    pid = scalar(first, "select pg_backend_pid()")
    first.close()
    script = ("import psycopg2, sys, time\n"
              f"c = psycopg2.connect({relay.dsn(user=USER)!r})\n"
              "cur = c.cursor()\n"
              "cur.execute('UPDATE abandoned_rows SET v = 7 WHERE id = 7')\n"
              "print('locked', flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"locked"
        before = logins(relay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert_clean_reuse(relay, clean, pid, before)
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 7") == "0"


def test_terminate_inside_a_transaction(make_relay, clean):
    """psycopg2's close() with a transaction open sends Terminate: rolled back and reused too."""
    relay = start(make_relay, clean)
    conn = psycopg2.connect(relay.dsn(user=USER))
    pid = scalar(conn, "select pg_backend_pid()")  # psycopg2 began a transaction
    scalar(conn, "SELECT v FROM abandoned_rows WHERE id = 8 FOR UPDATE")
    before = logins(relay)
    conn.close()
    assert_clean_reuse(relay, clean, pid, before)


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_idle_transaction_timeout_rolls_back_and_reuses(make_relay, clean, mode):
    relay = start(make_relay, clean, mode, idle_transaction_timeout="1")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("SELECT * FROM abandoned_rows WHERE id = 9 FOR UPDATE")
    before = logins(relay)
    raw.sock.settimeout(5)
    error = raw.read_error()
    assert (error["S"], error["M"]) == ("FATAL", "idle transaction timeout")
    assert raw.closed()
    assert_clean_reuse(relay, clean, pid, before)
    assert "(idle transaction timeout)" in relay.log()


def test_rollback_that_hangs_closes_the_server_after_server_rollback_timeout(make_relay, clean):
    relay = start(make_relay, clean, server_rollback_timeout="1")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("SELECT * FROM abandoned_rows WHERE id = 10 FOR UPDATE")
    os.kill(pid, signal.SIGSTOP)  # the backend cannot run the ROLLBACK
    try:
        left = time.monotonic()
        kill(raw)
        wait_until(lambda: "closing because: server_rollback_timeout" in relay.log(), timeout=10,
                   message="server_rollback_timeout")
        waited = time.monotonic() - left
        assert 1.0 <= waited < 4.0, waited
    finally:
        os.kill(pid, signal.SIGCONT)  # it reads EOF and exits; PostgreSQL rolls the transaction back
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") != pid
        assert scalar(conn, "select count(*) from abandoned_rows") == 100
    finally:
        conn.close()
    wait_until(lambda: clean.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0", timeout=10)
    assert ROLLED_BACK not in relay.log()
    assert metric(relay, "pgrelay_server_rollbacks") == 0
    assert metric(relay, "pgrelay_server_rollback_failures") == 1


def test_server_that_dies_during_the_rollback_is_closed(make_relay, clean):
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("SELECT * FROM abandoned_rows WHERE id = 11 FOR UPDATE")
    os.kill(pid, signal.SIGSTOP)
    try:
        kill(raw)
        time.sleep(0.3)  # the rollback is sent and waits
        os.kill(pid, signal.SIGTERM)  # pg_terminate_backend, delivered once it runs again
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "(during rollback after client left)" in relay.log()
               or "server sent FATAL during rollback" in relay.log(), timeout=10, message="the close")
    assert ROLLED_BACK not in relay.log()
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") != pid
    finally:
        conn.close()
    assert metric(relay, "pgrelay_server_rollback_failures") == 1


def test_pool_paused_during_the_rollback_closes_the_server_once_rolled_back(make_relay, clean):
    relay = start(make_relay, clean)
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    os.kill(pid, signal.SIGSTOP)
    try:
        kill(raw)
        time.sleep(0.3)
        relay.send_signal(signal.SIGUSR1)  # PAUSE
        wait_until(lambda: "SIGUSR1" in relay.log(), timeout=5)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: "closing because: pause mode" in relay.log(), timeout=10, message="the close")
    assert ROLLED_BACK in relay.log()  # it was rolled back first: PostgreSQL saw a clean Terminate
    relay.send_signal(signal.SIGUSR2)  # RESUME
    wait_until(lambda: "SIGUSR2" in relay.log(), timeout=5)
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") != pid
    finally:
        conn.close()


def test_server_over_server_lifetime_is_closed_instead(make_relay, clean):
    relay = start(make_relay, clean, server_lifetime="1")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    time.sleep(2)  # the janitor marks the busy server: it closes when released
    kill(raw)
    wait_until(lambda: "server lifetime over" in relay.log()
               or "client disconnect while server was not ready" in relay.log(), timeout=10)
    assert ROLLED_BACK not in relay.log()
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") != pid
    finally:
        conn.close()


def test_server_rollback_timeout_0_closes_as_before(make_relay, clean):
    relay = start(make_relay, clean, server_rollback_timeout="0")
    raw = client(relay)
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("UPDATE abandoned_rows SET v = 3 WHERE id = 12")
    before = logins(relay)
    kill(raw)
    wait_until(lambda: "closing because: client disconnect while server was not ready" in relay.log(), timeout=10)
    conn = connect(relay, user=USER)
    try:
        assert scalar(conn, "select pg_backend_pid()") != pid
    finally:
        conn.close()
    assert logins(relay) == before + 1
    assert ROLLED_BACK not in relay.log()
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 12") == "0"


@pytest.mark.parametrize("timeout", ["5", "0"])
def test_reconnect_storm_costs_no_server_logins(make_relay, clean, timeout):
    """50 clients, each inside a transaction, are killed at once; 50 new ones connect and run a
    transaction each at once: with server_rollback_timeout they reuse the 50 servers (no login),
    with 0 every server is closed and logged in again, as in PgBouncer."""
    count = 50
    relay = start(make_relay, clean, size=count, server_rollback_timeout=timeout)
    old = []
    for i in range(count):
        raw = client(relay)
        raw.query("BEGIN")
        raw.query(f"UPDATE abandoned_rows SET v = v + 1 WHERE id = {i + 1}")
        old.append(raw)
    pids = {int(data_rows(raw.query("select pg_backend_pid()"))[0][0]) for raw in old}
    assert len(pids) == count
    before = logins(relay)
    assert before == count
    for raw in old:
        kill(raw)
    results, errors = [], []

    def work(i):
        try:
            conn = psycopg2.connect(relay.dsn(user=USER), connect_timeout=20)
            try:
                with conn.cursor() as cur:
                    cur.execute("UPDATE abandoned_rows SET v = v + 10 WHERE id = %s RETURNING pg_backend_pid()",
                                (i + 1,))
                    results.append(cur.fetchone()[0])
                conn.commit()
            finally:
                conn.close()
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[:3]
    assert len(results) == count
    assert clean.psql("SELECT sum(v) FROM abandoned_rows") == str(10 * count)  # none of the killed updates
    if timeout == "0":
        assert logins(relay) > before
        assert not set(results) & pids
    else:
        assert logins(relay) == before, relay.log()[-3000:]
        assert set(results) <= pids
        wait_until(lambda: relay.log().count(ROLLED_BACK) == count, timeout=10)


def test_database_removed_by_reload_during_the_rollback(make_relay, clean):
    """The rollback finishes on the old route's server and nothing breaks: the server is rolled
    back (PostgreSQL sees no abandoned transaction), new clients of the removed database are refused."""
    port = free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "metrics_listen": f"127.0.0.1:{port}"},
                       databases={"gone": f"host=127.0.0.1 port={clean.port} dbname=postgres",
                                  "kept": f"host=127.0.0.1 port={clean.port} dbname=postgres"})
    relay.metrics_url = f"http://127.0.0.1:{port}/metrics"
    raw = RawClient(relay.port)
    raw.login(user=USER, database="gone")
    pid = backend_pid(raw)
    raw.query("BEGIN")
    raw.query("UPDATE abandoned_rows SET v = 4 WHERE id = 13")
    os.kill(pid, signal.SIGSTOP)
    try:
        kill(raw)
        time.sleep(0.3)
        relay.databases = {"kept": f"host=127.0.0.1 port={clean.port} dbname=postgres"}
        relay.write_ini()
        relay.reload()
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: ROLLED_BACK in relay.log(), timeout=10, message="the rollback")
    assert clean.psql(f"SELECT coalesce(state, 'gone') FROM pg_stat_activity WHERE pid = {pid}") in ("idle", "")
    assert clean.psql("SELECT v FROM abandoned_rows WHERE id = 13") == "0"
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(relay.dsn(user=USER, dbname="gone"), connect_timeout=5)
    conn = connect(relay, user=USER, dbname="kept")
    try:
        assert scalar(conn, "select 1") == 1
    finally:
        conn.close()
    assert metric(relay, "pgrelay_server_rollbacks") == 1


def test_server_rollback_timeout_is_reloadable(make_relay, clean):
    relay = start(make_relay, clean, server_rollback_timeout="0")
    raw = client(relay)
    first = backend_pid(raw)
    raw.query("BEGIN")
    kill(raw)
    wait_until(lambda: "client disconnect while server was not ready" in relay.log(), timeout=10)
    relay.settings["server_rollback_timeout"] = "5"
    relay.write_ini()
    relay.reload()
    raw = client(relay)
    pid = backend_pid(raw)
    assert pid != first  # closed while the setting was 0
    raw.query("BEGIN")
    raw.query("UPDATE abandoned_rows SET v = 2 WHERE id = 14")
    before = logins(relay)
    kill(raw)
    assert_clean_reuse(relay, clean, pid, before)


def test_killed_psycopg3_process_with_prepared_statements(make_relay, clean):
    """psycopg 3 preparing every statement (prepare_threshold=0), killed inside its transaction:
    the server is rolled back and reused, and the same prepared query works for the next client."""
    relay = start(make_relay, clean)
    query = "SELECT v FROM abandoned_rows WHERE id = %s FOR UPDATE"
    script = ("import psycopg, time\n"
              f"c = psycopg.connect({relay.dsn(user=USER)!r}, prepare_threshold=0)\n"
              f"c.execute({query!r}, (15,)).fetchall()\n"
              "print(c.execute('select pg_backend_pid()').fetchone()[0], flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        pid = int(proc.stdout.readline())
        before = logins(relay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert_clean_reuse(relay, clean, pid, before, prepared=None)
    import psycopg
    with psycopg.connect(relay.dsn(user=USER), prepare_threshold=0) as conn:
        assert conn.execute(query, (15,)).fetchall() == [(0,)]
        assert conn.execute("select pg_backend_pid()").fetchone()[0] == pid
