"""server_check_query and server_check_delay: a server idle for a while is checked before reuse."""

from __future__ import annotations

import time

import psycopg2

from ..support import connect, scalar, wait_until


def log_table(pg) -> None:
    pg.psql("CREATE TABLE IF NOT EXISTS server_check_log (pid int)")
    pg.psql("DELETE FROM server_check_log")


CHECK = "insert into server_check_log select pg_backend_pid()"


def test_idle_server_is_checked_before_its_next_client(make_relay, pg):
    log_table(pg)
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "server_check_delay": "0.5",
                        "server_check_query": CHECK})
    conn = connect(relay)
    pid = scalar(conn, "select pg_backend_pid()")
    assert scalar(conn, "select count(*) from server_check_log") == 0  # in use: no check
    time.sleep(1.3)  # idle past server_check_delay, seen by the janitor
    start = time.monotonic()
    assert scalar(conn, "select pg_backend_pid()") == pid
    assert time.monotonic() - start < 0.3  # checked at once, not at the next janitor tick
    assert pg.psql("select string_agg(pid::text, ',') from server_check_log") == str(pid)
    assert scalar(conn, "select 1") == 1  # just used again: not checked again
    assert pg.psql("select count(*) from server_check_log") == "1"
    conn.close()


def test_no_check_within_the_delay_or_when_disabled(make_relay, pg):
    log_table(pg)
    for settings in ({"server_check_delay": "30", "server_check_query": CHECK},
                     {"server_check_delay": "0.2", "server_check_query": ""}):
        relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", **settings})
        conn = connect(relay)
        scalar(conn, "select 1")
        time.sleep(1.2)
        assert scalar(conn, "select 2") == 2
        conn.close()
        relay.stop()
    assert pg.psql("select count(*) from server_check_log") == "0"


def test_failing_check_replaces_the_server_and_the_client_never_sees_it(make_relay, pg):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "server_check_delay": "0.3",
                        "server_check_query": "select 1/0"})
    conn = connect(relay)
    first = scalar(conn, "select pg_backend_pid()")
    time.sleep(1.2)
    second = scalar(conn, "select pg_backend_pid()")
    assert second != first
    assert "closing because: server check failed" in relay.log()
    conn.close()


def test_backend_terminated_while_idle_is_replaced_before_reuse(make_relay, pg):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "server_check_delay": "0.2"})
    conn = connect(relay)
    for _ in range(3):
        pid = scalar(conn, "select pg_backend_pid()")
        time.sleep(0.8)  # idle, due a check
        direct = psycopg2.connect(pg.dsn())
        direct.autocommit = True
        with direct.cursor() as cur:
            cur.execute("select pg_terminate_backend(%s)", (pid,))
        direct.close()
        assert scalar(conn, "select 'never an error'") == "never an error"
        wait_until(lambda: pg.psql(f"select count(*) from pg_stat_activity where pid = {pid}") == "0", timeout=5)
    conn.close()
