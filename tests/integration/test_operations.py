"""Running pgrelay: logfile, pidfile, stats lines, log switches, and PgBouncer's signal meanings."""

import os
import re
import signal
import threading
import time

import psycopg2

from ..support import wait_until


def run_queries(relay, n=20):
    with psycopg2.connect(relay.dsn()) as conn, conn.cursor() as cur:
        for i in range(n):
            cur.execute("SELECT %s", (i,))
            assert cur.fetchone() == (i,)


def test_logfile_pidfile_and_stats_lines(make_relay, tmp_path):
    logfile, pidfile = tmp_path / "pgrelay.log", tmp_path / "pgrelay.pid"
    relay = make_relay({"logfile": str(logfile), "pidfile": str(pidfile), "stats_period": "1"})
    assert pidfile.read_text().strip() == str(relay.proc.pid)
    run_queries(relay)
    # PgBouncer's stats line (src/stats.c), one for the whole process each stats_period; the exact
    # wording and the numbers are checked in test_logging.py.
    line = wait_until(lambda: next((l for l in logfile.read_text().splitlines() if " LOG stats: " in l),
                                   None), timeout=5, message="a stats line")
    assert re.search(r" LOG stats: \d+ xacts/s, \d+ queries/s, \d+ client parses/s, \d+ server parses/s, "
                     r"\d+ binds/s, in \d+ B/s, out \d+ B/s, xact \d+ us, query \d+ us, wait \d+ us$", line), line
    text = logfile.read_text()
    assert "LOG process up: pgrelay" in text and "login attempt: db=postgres user=postgres" in text
    assert relay.stop(signal.SIGINT) == 0
    assert not pidfile.exists(), "the pidfile is removed on exit"


def test_log_connections_and_disconnections_can_be_switched_off(make_relay):
    relay = make_relay({"log_connections": "0", "log_disconnections": "0"})
    run_queries(relay, 2)
    relay.stop(signal.SIGINT)
    log = relay.log()
    assert "process up" in log
    assert "login attempt" not in log and "closing because" not in log


def test_sigint_waits_for_running_queries_then_exits(make_relay):
    """SIGINT is PgBouncer's safe shutdown: no new clients; a running query is allowed to finish."""
    relay = make_relay({"pool_mode": "transaction"})
    result = {}

    def slow():
        with psycopg2.connect(relay.dsn()) as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_sleep(1.5), 'finished'")
            result["row"] = cur.fetchone()

    worker = threading.Thread(target=slow)
    worker.start()
    wait_until(lambda: "login attempt" in relay.log(), timeout=5)
    time.sleep(0.3)
    started = time.monotonic()
    relay.send_signal(signal.SIGINT)
    worker.join(10)
    assert result.get("row") == ("", "finished")
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - started >= 1.0  # it waited for the query
    assert "shutdown requested (wait_for_servers)" in relay.log()


def test_sigterm_waits_for_clients_to_leave(make_relay):
    relay = make_relay()
    conn = psycopg2.connect(relay.dsn())
    relay.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutdown requested (wait_for_clients)" in relay.log(), timeout=5)
    time.sleep(0.5)
    assert relay.alive(), "pgrelay must wait for the connected client"
    with conn.cursor() as cur:  # the connected client is still served
        cur.execute("SELECT 7")
        assert cur.fetchone() == (7,)
    conn.close()
    assert relay.proc.wait(10) == 0


def test_second_signal_stops_at_once(make_relay):
    relay = make_relay()
    conn = psycopg2.connect(relay.dsn())
    relay.send_signal(signal.SIGTERM)
    wait_until(lambda: "shutdown requested (wait_for_clients)" in relay.log(), timeout=5)
    relay.send_signal(signal.SIGTERM)
    assert relay.proc.wait(10) == 0
    conn.close()


def test_sighup_reloads_settings(make_relay):
    relay = make_relay({"default_pool_size": "1", "application_name_add_host": "0"})
    relay.settings["application_name_add_host"] = "1"
    relay.write_ini()
    relay.reload()
    with psycopg2.connect(relay.dsn(application_name="app")) as conn, conn.cursor() as cur:
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0].startswith("app - 127.0.0.1:")
    assert os.path.exists(relay.ini_path)
