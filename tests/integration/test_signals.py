"""PgBouncer's signals: SIGUSR1 pauses and SIGUSR2 resumes everything (a PostgreSQL restart in between costs
clients nothing but a delay), SIGHUP reloads, SIGINT, SIGTERM and SIGQUIT shut down; pgbench helpers."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time

import psycopg2
import pytest

from ..support import RawClient, connect, query_message, scalar, wait_until


# -- pgbench, shared by the control and rolling-restart tests ------------------------------------------

def init_pgbench(pg) -> None:
    """pgbench's tables (scale 1) in the session's PostgreSQL, once per session."""
    if pg.psql("SELECT to_regclass('pgbench_accounts') IS NOT NULL") == "t":
        return
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", "-h", pg.socket_dir, "-p", str(pg.port), "-U", "postgres",
                    "postgres"], check=True, capture_output=True, text=True, timeout=120)


def start_pgbench(port: int, clients: int = 8, seconds: int = 12, connect_each: bool = False) -> subprocess.Popen:
    """pgbench's TPC-B-like transactions through pgrelay on 127.0.0.1:`port` (-C: a new connection per
    transaction, so new connections go wherever the kernel sends them)."""
    args = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", str(clients),
            "-j", "2", "-T", str(seconds), "-P", "1"]
    if connect_each:
        args.append("-C")
    return subprocess.Popen(args + ["postgres"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_pgbench(bench: subprocess.Popen, timeout: float = 90) -> tuple[int, int, str]:
    """Wait for pgbench; returns (transactions processed, failed transactions, its output). Asserts that no
    client aborted (pgbench exits non-zero then)."""
    out, _ = bench.communicate(timeout=timeout)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    assert bench.returncode == 0 and processed, f"pgbench failed (exit {bench.returncode}):\n{out}"
    return int(processed.group(1)), int(failed.group(1)) if failed else 0, out


def relay_servers(pg, relay) -> int:
    """Server connections `relay` holds: TCP backends (pg.psql uses the Unix socket) that started
    after it did, so connections an earlier test's relay left behind on the shared server do not count."""
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE client_addr IS NOT NULL "
                       f"AND backend_start >= to_timestamp({relay.started_at - 0.5})"))


def end_sleepers(pg) -> None:
    """Backends still sleeping for a client pgrelay dropped (PostgreSQL notices only when it writes)."""
    pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'SELECT pg_sleep(30)%' AND pid <> pg_backend_pid()")


def run_in_thread(fn):
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


# -- SIGUSR1 / SIGUSR2 -------------------------------------------------------------------------------

def test_sigusr1_pauses_queries_until_sigusr2(make_relay, pg):
    relay = make_relay({"pool_mode": "transaction"})
    conn = connect(relay)
    assert scalar(conn, "SELECT 1") == 1
    wait_until(lambda: relay_servers(pg, relay) >= 1, message="a server connection")
    relay.send_signal(signal.SIGUSR1)
    wait_until(lambda: "got SIGUSR1, pausing all activity" in relay.log(), message="the pause")
    # The idle server is closed at once ("pause mode"); the client stays connected.
    wait_until(lambda: relay_servers(pg, relay) == 0, message="servers closed by the pause")
    assert "closing because: pause mode" in relay.log()
    thread, result = run_in_thread(lambda: scalar(conn, "SELECT 'after resume'"))
    thread.join(1.5)
    assert thread.is_alive() and not result, "a query must wait while pgrelay is paused"
    assert relay_servers(pg, relay) == 0, "no server is opened while paused"
    # A second SIGUSR1 changes nothing; SIGUSR2 resumes and the queued query runs.
    relay.send_signal(signal.SIGUSR1)
    wait_until(lambda: "got SIGUSR1, but already paused/suspended" in relay.log())
    relay.send_signal(signal.SIGUSR2)
    thread.join(10)
    assert result == {"value": "after resume"}
    assert "got SIGUSR2, continuing from PAUSE" in relay.log()
    relay.send_signal(signal.SIGUSR2)
    wait_until(lambda: "got SIGUSR2, but not paused/suspended" in relay.log())
    assert scalar(conn, "SELECT 2") == 2
    conn.close()


def test_pause_waits_for_the_running_transaction(make_relay, pg):
    """A transaction in progress when the pause begins runs to its end; then its server is closed."""
    relay = make_relay({"pool_mode": "transaction"})
    conn = psycopg2.connect(relay.dsn())  # not autocommit: a transaction stays open
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
    relay.send_signal(signal.SIGUSR1)
    wait_until(lambda: "pausing all activity" in relay.log())
    time.sleep(0.5)
    assert relay_servers(pg, relay) == 1, "the server of an open transaction is not taken away"
    with conn.cursor() as cur:  # the transaction goes on normally
        cur.execute("SELECT 2")
        assert cur.fetchone() == (2,)
    conn.commit()  # released at its end, and closed since pgrelay is paused
    wait_until(lambda: relay_servers(pg, relay) == 0, message="the released server closed")
    relay.send_signal(signal.SIGUSR2)
    with conn.cursor() as cur:
        cur.execute("SELECT 3")
        assert cur.fetchone() == (3,)
    conn.close()


def test_query_wait_timeout_applies_while_paused(make_relay):
    """As in PgBouncer, a client queued during a pause is still bound by query_wait_timeout."""
    relay = make_relay({"pool_mode": "transaction", "query_wait_timeout": "1"})
    raw = RawClient(relay.port)
    raw.login()
    relay.send_signal(signal.SIGUSR1)
    wait_until(lambda: "pausing all activity" in relay.log())
    started = time.monotonic()
    raw.send(query_message("SELECT 1"))
    raw.sock.settimeout(10)
    error = raw.read_error()
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "57014", "query_wait_timeout")
    assert "the pool is paused (PAUSE or SIGUSR1 on pgrelay): RESUME it" in error["H"], error["H"]
    assert 0.9 <= time.monotonic() - started < 5
    assert raw.closed()
    relay.send_signal(signal.SIGUSR2)
    wait_until(lambda: "continuing from PAUSE" in relay.log())
    fresh = connect(relay)
    assert scalar(fresh, "SELECT 4") == 4
    fresh.close()


def pause_restart_resume_under_pgbench(relay, pg, pause, resume, settle: float = 20) -> None:
    """The acceptance scenario: under pgbench in transaction mode, `pause()`, wait until every server is
    released and closed, restart PostgreSQL, `resume()`: zero failed transactions, clients only wait."""
    init_pgbench(pg)
    bench = start_pgbench(relay.port, clients=8, seconds=12)
    try:
        time.sleep(3)
        pause()
        wait_until(lambda: relay_servers(pg, relay) == 0, timeout=settle, message="every server released and closed")
        pg.restart()
        resume()
        processed, failed, out = finish_pgbench(bench)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert failed == 0, out
    assert processed > 100, out
    assert "closing because: pause mode" in relay.log()
    assert "server conn crashed" not in relay.log()


def test_pause_restart_postgres_resume_under_pgbench_loses_nothing(make_relay, pg):
    """SIGUSR1, PostgreSQL restart, SIGUSR2 under pgbench in transaction mode: zero failed transactions."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "4"})
    pause_restart_resume_under_pgbench(relay, pg, lambda: relay.send_signal(signal.SIGUSR1),
                                       lambda: relay.send_signal(signal.SIGUSR2))


# -- SIGHUP, SIGINT, SIGTERM, SIGQUIT ---------------------------------------------------------------

def test_sighup_reloads_and_keeps_clients(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5"})
    conn = connect(relay)
    assert scalar(conn, "SELECT 1") == 1
    relay.settings["application_name_add_host"] = "1"
    relay.write_ini()
    relay.reload()
    assert scalar(conn, "SELECT 2") == 2, "a reload keeps connected clients"
    fresh = connect(relay, application_name="app")
    assert scalar(fresh, "SHOW application_name").startswith("app - 127.0.0.1:")
    # A broken file is refused; the running configuration stays.
    with open(relay.ini_path, "a") as f:
        f.write("default_pool_size = lots\n")
    relay.reload(wait_for="config reload failed")
    assert scalar(conn, "SELECT 3") == 3
    fresh.close()
    conn.close()


def test_sigquit_stops_at_once(make_relay, pg):
    """SIGQUIT is PgBouncer's immediate shutdown: a running query does not hold it up."""
    relay = make_relay({"pool_mode": "transaction"})
    conn = connect(relay)
    thread, result = run_in_thread(lambda: scalar(conn, "SELECT pg_sleep(30)"))
    wait_until(lambda: "login attempt" in relay.log())
    time.sleep(0.3)
    started = time.monotonic()
    relay.send_signal(signal.SIGQUIT)
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    thread.join(5)
    assert isinstance(result.get("error"), psycopg2.Error), result
    assert "shutdown requested (fast)" in relay.log()
    end_sleepers(pg)


def test_sigint_refuses_new_clients_while_waiting_for_servers(make_relay):
    """SIGINT (SHUTDOWN WAIT_FOR_SERVERS): the listening socket closes at once; the running query ends."""
    relay = make_relay({"pool_mode": "transaction"})
    conn = connect(relay)
    thread, result = run_in_thread(lambda: scalar(conn, "SELECT pg_sleep(1.5)::text || 'done'"))
    wait_until(lambda: "login attempt" in relay.log())
    time.sleep(0.3)
    relay.send_signal(signal.SIGINT)
    wait_until(lambda: "shutdown requested (wait_for_servers)" in relay.log())
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(relay.dsn(), connect_timeout=3)
    thread.join(10)
    assert result.get("value") == "done"
    assert relay.proc.wait(10) == 0


def test_sigterm_serves_connected_clients_until_they_leave(make_relay):
    relay = make_relay({"pool_mode": "transaction"})
    conn = connect(relay)
    relay.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutdown requested (wait_for_clients)" in relay.log())
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(relay.dsn(), connect_timeout=3)
    for i in range(3):
        assert scalar(conn, "SELECT %s", (i,)) == i
    assert relay.alive()
    conn.close()
    assert relay.proc.wait(10) == 0
