"""Timeouts on connected clients: idle_transaction_timeout, client_idle_timeout, server_drain_timeout."""

from __future__ import annotations

import time

import pytest

from ..support import POOLER_SQLSTATE, RawClient, assert_served, connect, query_message, scalar, wait_until

TERMINATE = b"X\x00\x00\x00\x04"


def lock_is_free(pg, table: str) -> bool:
    """Whether a direct connection can take the lock within a second."""
    try:
        pg.psql(f"SET lock_timeout = '1s'; BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; COMMIT")
        return True
    except Exception:
        return False


def assert_closed_with(raw: RawClient, message: str, since: float, timeout: float) -> None:
    """The next thing `raw` gets is FATAL `message` (its SQLSTATE: POOLER_SQLSTATE) and a hint,
    between `timeout` and one janitor period (plus slack) after `since`, and then the close."""
    raw.sock.settimeout(5)
    error = raw.read_error()
    waited = time.monotonic() - since
    assert (error["S"], error["C"], error["M"]) == ("FATAL", POOLER_SQLSTATE[message], message)
    assert error.get("H"), error
    assert timeout <= waited < timeout + 1.5, waited
    assert raw.closed()


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_idle_transaction_timeout_closes_the_client_and_frees_its_locks(make_relay, pg, mode):
    pg.psql("CREATE TABLE IF NOT EXISTS timeout_locked (id int)")
    relay = make_relay({"pool_mode": mode, "default_pool_size": "1", "idle_transaction_timeout": "1"})
    c = RawClient(relay.port)
    c.login()
    c.query("BEGIN")
    c.query("LOCK TABLE timeout_locked IN ACCESS EXCLUSIVE MODE")
    assert_closed_with(c, "idle transaction timeout", time.monotonic(), 1.0)
    assert lock_is_free(pg, "timeout_locked")
    assert "idle transaction timeout" in relay.log()
    assert_served(relay)


def test_idle_transaction_timeout_spares_running_queries_and_busy_transactions(make_relay):
    relay = make_relay({"pool_mode": "transaction", "idle_transaction_timeout": "1"})
    conn = connect(relay)
    conn.autocommit = False
    assert scalar(conn, "select pg_sleep(2.5) is not null")  # running, not idle
    for _ in range(6):  # a transaction that keeps working is not idle either
        assert scalar(conn, "select 1") == 1
        time.sleep(0.4)
    conn.commit()
    conn.autocommit = True
    time.sleep(1.6)  # idle outside a transaction: idle_transaction_timeout does not apply
    assert scalar(conn, "select 'still here'") == "still here"
    conn.close()


def test_idle_transaction_timeout_off_by_default(make_relay):
    relay = make_relay({"pool_mode": "transaction"})
    conn = connect(relay)
    conn.autocommit = False
    scalar(conn, "select 1")
    time.sleep(1.6)
    assert scalar(conn, "select 2") == 2
    conn.rollback()
    conn.close()


def test_client_idle_timeout_closes_an_idle_client(make_relay):
    relay = make_relay({"pool_mode": "transaction", "client_idle_timeout": "1"})
    idle = RawClient(relay.port)
    idle.login()
    busy = connect(relay)
    start = time.monotonic()
    for _ in range(6):  # a client that keeps sending queries is not idle
        assert scalar(busy, "select 1") == 1
        time.sleep(0.3)
    assert_closed_with(idle, "client_idle_timeout", start, 1.0)
    assert scalar(busy, "select 'busy stays'") == "busy stays"
    busy.close()
    assert_served(relay)


def test_client_idle_timeout_off_keeps_idle_clients(make_relay):
    relay = make_relay({"pool_mode": "transaction", "client_idle_timeout": "0"})
    conn = connect(relay)
    time.sleep(1.6)
    assert scalar(conn, "select 1") == 1
    conn.close()


def test_client_idle_timeout_reaches_a_libpq_client(make_relay):
    """psycopg 3 reads the FATAL that arrived while it was idle (psycopg2 only says the server
    closed the connection)."""
    import psycopg

    relay = make_relay({"pool_mode": "transaction", "client_idle_timeout": "1"})
    conn = psycopg.connect(relay.dsn(), autocommit=True)
    time.sleep(2.2)
    with pytest.raises(psycopg.OperationalError, match="client_idle_timeout"):
        conn.execute("select 1")


def _pid_of_next_client(relay) -> int:
    conn = connect(relay)
    try:
        return scalar(conn, "select pg_backend_pid()")
    finally:
        conn.close()


def _leave_with(relay, sql: str) -> float:
    """A linked session-mode client sends `sql` and a Terminate in one packet; returns when."""
    c = RawClient(relay.port)
    c.login()
    c.query("select 1")
    c.send(query_message(sql) + TERMINATE)
    return time.monotonic()


def test_drained_server_is_reused_once_its_replies_are_in(make_relay):
    """Session mode, pool of one: Query + Terminate keeps the server until the query is done, then
    reuses it (same backend), rather than closing it or giving it away mid-reply."""
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1"})
    first = _pid_of_next_client(relay)
    start = _leave_with(relay, "select pg_sleep(1.5)")
    assert _pid_of_next_client(relay) == first
    assert time.monotonic() - start >= 1.2  # it waited for the drain
    assert "server_drain_timeout" not in relay.log()


def test_server_drain_timeout_closes_a_server_that_takes_too_long(make_relay):
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1", "server_drain_timeout": "1"})
    first = _pid_of_next_client(relay)
    start = _leave_with(relay, "select pg_sleep(6)")
    pid = _pid_of_next_client(relay)
    assert time.monotonic() - start < 4
    assert pid != first
    wait_until(lambda: "closing because: server_drain_timeout" in relay.log(), timeout=5)
