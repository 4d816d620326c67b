"""The console's control commands against a real pgrelay and real clients: PAUSE, RESUME, RECONNECT,
WAIT_CLOSE, KILL, KILL_CLIENT, DISABLE, ENABLE, RELOAD, SET and SHUTDOWN; refusals and bad input."""

from __future__ import annotations

import subprocess
import time

import psycopg2
import pytest

from ..support import RawClient, connect, error_fields, scalar, startup_packet, wait_until
from .test_signals import end_sleepers, pause_restart_resume_under_pgbench, relay_servers, run_in_thread

SETTINGS = {"admin_users": "admin", "stats_users": "watcher", "pool_mode": "transaction"}


def databases(pg) -> dict:
    return {"p1": f"host=127.0.0.1 port={pg.port} dbname=postgres",
            "p2": f"host=127.0.0.1 port={pg.port} dbname=postgres"}


@pytest.fixture
def console_relay(make_relay, pg):
    return make_relay(SETTINGS, databases=databases(pg))


def admin(relay, user: str = "admin"):
    conn = psycopg2.connect(relay.dsn(user=user, dbname="pgbouncer"), connect_timeout=10)
    conn.autocommit = True
    return conn


def run(conn, sql: str):
    """(command tag, rows or None)."""
    with conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall() if cur.description else None
        return cur.statusmessage, rows


def refused(conn, sql: str) -> psycopg2.Error:
    with pytest.raises(psycopg2.Error) as failure:
        run(conn, sql)
    assert not conn.closed, "a refused command keeps the console connection"
    return failure.value


def show(conn, what: str) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(f"SHOW {what}")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def client_of(relay, db: str, **kw):
    return connect(relay, dbname=db, **kw)


# -- PAUSE and RESUME -------------------------------------------------------------------------------

def test_pause_waits_for_transactions_then_resume_lets_queued_clients_go_on(console_relay, pg):
    relay = console_relay
    console = admin(relay)
    worker = psycopg2.connect(relay.dsn(dbname="p1"))  # a transaction stays open
    with worker.cursor() as cur:
        cur.execute("SELECT 1")
    thread, result = run_in_thread(lambda: run(admin(relay), "PAUSE"))
    thread.join(1.0)
    assert thread.is_alive(), "PAUSE returns only once every server is released"
    with worker.cursor() as cur:
        cur.execute("SELECT 2")
    worker.commit()
    thread.join(10)
    assert result.get("value") == ("PAUSE", None), result
    # pgrelay has closed them; PostgreSQL's backends take a moment to exit
    wait_until(lambda: relay_servers(pg, relay) == 0, timeout=3, message="after PAUSE no server connection is left")
    assert [r["value"] for r in show(console, "STATE") if r["key"] == "paused"] == ["yes"]
    # Clients stay connected; their queries wait.
    waiting, answer = run_in_thread(lambda: scalar(worker, "SELECT 'resumed'"))
    waiting.join(1.0)
    assert waiting.is_alive() and not answer
    assert "already suspended/paused" in str(refused(console, "PAUSE"))
    assert "already suspended/paused" in str(refused(console, "PAUSE p1"))
    assert run(console, "RESUME") == ("RESUME", None)
    waiting.join(10)
    assert answer == {"value": "resumed"}
    worker.rollback()
    worker.close()
    error = refused(console, "RESUME")
    assert "pooler is not paused/suspended" in str(error) and error.pgcode == "55000"


def test_pause_one_database_leaves_the_others_served(console_relay, pg):
    relay = console_relay
    console = admin(relay)
    one, two = client_of(relay, "p1"), client_of(relay, "p2")
    assert scalar(one, "SELECT 1") == 1 and scalar(two, "SELECT 2") == 2
    assert run(console, "PAUSE p1") == ("PAUSE", None)
    rows = {r["name"]: r for r in show(console, "DATABASES")}
    assert (rows["p1"]["paused"], rows["p2"]["paused"]) == (1, 0)
    waiting, answer = run_in_thread(lambda: scalar(one, "SELECT 'p1 again'"))
    waiting.join(1.0)
    assert waiting.is_alive(), "p1 is paused"
    assert scalar(two, "SELECT 'p2 served'") == "p2 served"
    error = refused(console, "RESUME p2")
    assert "database p2 is not paused" in str(error)
    assert run(console, 'RESUME "p1"') == ("RESUME", None)  # a "quoted" name, as PgBouncer's grammar
    waiting.join(10)
    assert answer == {"value": "p1 again"}
    assert {r["name"]: r["paused"] for r in show(console, "DATABASES")}["p1"] == 0


def test_pause_restart_postgres_resume_under_pgbench_loses_nothing(make_relay, pg):
    """The acceptance test, through the console: PAUSE; PostgreSQL restart; RESUME under pgbench in
    transaction mode gives zero failed transactions (clients only see a delay). PAUSE returns only
    once the servers are closed, so they are gone within moments of it."""
    relay = make_relay({**SETTINGS, "default_pool_size": "4"})
    console = admin(relay)
    pause_restart_resume_under_pgbench(relay, pg, lambda: assert_ok(run(console, "PAUSE"), "PAUSE"),
                                       lambda: assert_ok(run(console, "RESUME"), "RESUME"), settle=3)
    console.close()


def assert_ok(result, tag: str) -> None:
    assert result == (tag, None), result


# -- RECONNECT and WAIT_CLOSE -----------------------------------------------------------------------

def test_reconnect_replaces_servers_and_wait_close_waits_for_busy_ones(console_relay, pg):
    relay = console_relay
    console = admin(relay)
    idle = client_of(relay, "p1")
    before = scalar(idle, "SELECT pg_backend_pid()")
    busy = psycopg2.connect(relay.dsn(dbname="p1"))
    with busy.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")
        busy_pid = cur.fetchone()[0]
    assert run(console, "RECONNECT p1") == ("RECONNECT", None)
    thread, result = run_in_thread(lambda: run(admin(relay), "WAIT_CLOSE p1"))
    thread.join(1.0)
    assert thread.is_alive(), "WAIT_CLOSE waits for the server still inside a transaction"
    with busy.cursor() as cur:  # the transaction is not disturbed
        cur.execute("SELECT pg_backend_pid()")
        assert cur.fetchone()[0] == busy_pid
    busy.commit()
    thread.join(10)
    assert result.get("value") == ("WAIT_CLOSE", None), result
    assert scalar(idle, "SELECT pg_backend_pid()") not in (before, busy_pid), "a new server after RECONNECT"
    assert "closing because: database configuration changed" in relay.log()
    assert run(console, "RECONNECT") == ("RECONNECT", None)
    assert run(console, "WAIT_CLOSE") == ("WAIT_CLOSE", None)
    assert scalar(idle, "SELECT 'served'") == "served"
    busy.close()


def test_reload_with_a_changed_database_line_replaces_its_servers(console_relay, pg):
    """As PgBouncer's tag_database_dirty: servers of a database whose connect string changed are not
    reused; WAIT_CLOSE waits for the busy ones."""
    relay = console_relay
    console = admin(relay)
    busy = psycopg2.connect(relay.dsn(dbname="p1"))  # holds one server inside a transaction
    with busy.cursor() as cur:
        cur.execute("SELECT 1")
    idle = client_of(relay, "p1")  # leaves a second one idle in the pool
    assert scalar(idle, "SELECT current_database()") == "postgres"
    relay.databases["p1"] = f"host=127.0.0.1 port={pg.port} dbname=template1"
    relay.write_ini()
    assert run(console, "RELOAD") == ("RELOAD", None)
    assert scalar(client_of(relay, "p1"), "SELECT current_database()") == "template1"
    assert scalar(idle, "SELECT current_database()") == "template1", "no server of the old line is reused"
    thread, result = run_in_thread(lambda: run(admin(relay), "WAIT_CLOSE p1"))
    thread.join(1.0)
    assert thread.is_alive(), "the server inside a transaction closes only when released"
    busy.commit()
    thread.join(10)
    assert result.get("value") == ("WAIT_CLOSE", None), result
    busy.close()


# -- KILL and KILL_CLIENT ---------------------------------------------------------------------------

def test_kill_drops_the_database_clients_and_leaves_it_paused(console_relay, pg):
    relay = console_relay
    console = admin(relay)
    victims = [client_of(relay, "p1") for _ in range(2)]
    bystander = client_of(relay, "p2")
    for conn in victims + [bystander]:
        assert scalar(conn, "SELECT 1") == 1
    assert run(console, "KILL p1") == ("KILL", None)
    for conn in victims:
        with pytest.raises(psycopg2.OperationalError):
            scalar(conn, "SELECT 1")
    assert "closing because: database removed" in relay.log()
    assert scalar(bystander, "SELECT 'p2 untouched'") == "p2 untouched"
    assert {r["name"]: r["paused"] for r in show(console, "DATABASES")}["p1"] == 1
    late = client_of(relay, "p1")  # logins go on; queries wait for RESUME
    waiting, answer = run_in_thread(lambda: scalar(late, "SELECT 'after kill'"))
    waiting.join(1.0)
    assert waiting.is_alive()
    assert run(console, "RESUME p1") == ("RESUME", None)
    waiting.join(10)
    assert answer == {"value": "after kill"}
    run(console, "PAUSE")
    assert "already suspended/paused" in str(refused(console, "KILL p2"))
    run(console, "RESUME")


def test_kill_client_drops_exactly_that_client(console_relay):
    relay = console_relay
    console = admin(relay)
    target = client_of(relay, "p1", application_name="target")
    other = client_of(relay, "p1", application_name="other")
    assert scalar(target, "SELECT 1") == 1
    ids = [r["id"] for r in show(console, "CLIENTS") if r["application_name"] == "target"]
    assert len(ids) == 1, show(console, "CLIENTS")
    assert run(console, f"KILL_CLIENT {ids[0]}") == ("KILL_CLIENT", None)
    with pytest.raises(psycopg2.OperationalError) as failure:
        scalar(target, "SELECT 1")
    assert "admin forced disconnect" in str(failure.value) or target.closed
    assert scalar(other, "SELECT 'still here'") == "still here"
    assert "closing because: admin forced disconnect" in relay.log()
    # Bad ids and injection attempts: refused, nothing else happens.
    for bad in ("abc", "-1", "1.5", "''", "1 OR 1=1", f"{ids[0]}; KILL"):
        refused(console, f"KILL_CLIENT {bad}")
    error = refused(console, "KILL_CLIENT abc")
    assert "invalid client pointer supplied" in str(error)
    error = refused(console, "KILL_CLIENT 987654321")
    assert "client not found" in str(error)
    assert scalar(other, "SELECT 'never killed'") == "never killed"
    assert {r["name"]: r["paused"] for r in show(console, "DATABASES")}["p1"] == 0


# -- DISABLE and ENABLE -----------------------------------------------------------------------------

def test_disable_refuses_new_logins_and_enable_lets_them_in(console_relay):
    relay = console_relay
    console = admin(relay)
    connected = client_of(relay, "p1")
    assert run(console, "DISABLE p1") == ("DISABLE", None)
    assert {r["name"]: r["disabled"] for r in show(console, "DATABASES")}["p1"] == 1
    with pytest.raises(psycopg2.OperationalError) as failure:
        client_of(relay, "p1")
    assert "database does not allow connections: p1" in str(failure.value)
    assert scalar(connected, "SELECT 'stays'") == "stays", "connected clients are not affected"
    assert scalar(client_of(relay, "p2"), "SELECT 1") == 1
    assert run(console, "ENABLE p1") == ("ENABLE", None)
    assert scalar(client_of(relay, "p1"), "SELECT 'back'") == "back"
    assert "a database is required" in str(refused(console, "DISABLE"))
    assert "a database is required" in str(refused(console, "ENABLE"))


def test_disabled_database_refusal_has_its_sqlstate(console_relay):
    relay = console_relay
    console = admin(relay)
    run(console, "DISABLE p2")
    raw = RawClient(relay.port)
    raw.send(startup_packet(database="p2"))
    error = raw.read_error()
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "55000", "database does not allow connections: p2")
    assert raw.closed()
    run(console, "ENABLE p2")


# -- refusals for every command ---------------------------------------------------------------------

CONTROL = ["PAUSE", "PAUSE p1", "RESUME", "RESUME p1", "RECONNECT", "WAIT_CLOSE", "KILL", "KILL p1",
           "KILL_CLIENT 1", "DISABLE p1", "ENABLE p1", "RELOAD", "SHUTDOWN", "SET default_pool_size = 3"]


def test_stats_users_may_not_run_control_commands(console_relay):
    relay = console_relay
    watcher = admin(relay, user="watcher")
    assert show(watcher, "STATE")  # stats_users may look
    for sql in CONTROL:
        error = refused(watcher, sql)
        assert "admin access needed" in str(error), sql
    assert relay.alive()
    assert scalar(client_of(relay, "p1"), "SELECT 1") == 1, "nothing was paused, killed or shut down"


def test_unknown_and_admin_database_names_are_refused(console_relay):
    console = admin(console_relay)
    for verb in ("PAUSE", "RESUME", "RECONNECT", "WAIT_CLOSE", "KILL", "DISABLE", "ENABLE"):
        error = refused(console, f"{verb} nosuch")
        assert "no such database: nosuch" in str(error) and error.pgcode == "3D000", verb
        assert "admin db" in str(refused(console, f"{verb} pgbouncer")), verb
    for garbage in ("PAUSE p1 p2", "PAUSE 'p1'", "RESUME p1; KILL", "SHUTDOWN NOW", "RELOAD now"):
        assert "invalid command" in str(refused(console, garbage)), garbage
    assert {r["name"]: (r["paused"], r["disabled"]) for r in show(console, "DATABASES")}["p1"] == (0, 0)


# -- RELOAD and SET ---------------------------------------------------------------------------------

def test_reload_applies_the_file_and_reports_its_errors(console_relay):
    relay = console_relay
    console = admin(relay)
    relay.settings["application_name_add_host"] = "1"
    relay.settings["listen_backlog"] = "77"  # not reloadable: a NOTICE says so
    relay.write_ini()
    assert run(console, "RELOAD") == ("RELOAD", None)
    assert any("listen_backlog cannot be changed by a reload" in n for n in console.notices)
    app = client_of(relay, "p1", application_name="app")
    assert scalar(app, "SHOW application_name").startswith("app - 127.0.0.1:")
    with open(relay.ini_path, "a") as f:
        f.write("default_pool_size = lots\n")
    console.notices.clear()
    error = refused(console, "RELOAD")
    assert error.pgcode == "F0000" and "RELOAD failed, see logs for additional details" in str(error)
    assert any("default_pool_size" in n and "lots" in n for n in console.notices), console.notices
    assert scalar(app, "SELECT 'old config kept'") == "old config kept"


def test_set_changes_a_reloadable_setting_now(console_relay):
    relay = console_relay
    console = admin(relay)
    assert run(console, "SET application_name_add_host = 1") == ("SET application_name_add_host=1", None)
    app = client_of(relay, "p1", application_name="app")
    assert scalar(app, "SHOW application_name").startswith("app - 127.0.0.1:")
    assert run(console, "SET login_notify_message = 'it''s pgrelay; welcome'")[0] \
        == "SET login_notify_message=it's pgrelay; welcome"
    greeted = RawClient(relay.port)
    notices = [error_fields(body)["M"] for kind, body in greeted.login(database="p2") if kind == b"N"]
    assert notices == ["it's pgrelay; welcome"]
    greeted.close()
    assert run(console, "set DEFAULT_POOL_SIZE to 3")[0] == "SET default_pool_size=3"
    assert [r["value"] for r in show(console, "CONFIG") if r["key"] == "default_pool_size"] == ["3"]
    assert run(console, "SET client_encoding = 'UTF8'")[0] == "SET"  # drivers' SETs: "SET ignored"
    assert "SET ignored" in console.notices[-1]


def test_set_refuses_what_cannot_change_and_garbage(console_relay):
    relay = console_relay
    console = admin(relay)
    bystander = client_of(relay, "p1")
    cases = {
        "SET listen_port = 7000": "55P02",              # not reloadable
        "SET no_such_setting = 1": "42704",             # unknown
        "SET default_pool_size = lots": "22023",        # invalid value
        "SET so_reuseport = 1": "55P02",
    }
    for sql, code in cases.items():
        console.notices.clear()
        error = refused(console, sql)
        assert "SET failed" in str(error) and error.pgcode == code, (sql, error.pgcode, str(error))
        assert console.notices, f"{sql}: the reason is told in a NOTICE"
    for garbage in ("SET default_pool_size = 'x'; KILL", "SET default_pool_size = 5 6", "SET = 5",
                    "SET default_pool_size", "SET default_pool_size = 'unterminated",
                    "SET a = 'x'; SHUTDOWN", "SET log_connections = '1'; KILL"):
        error = refused(console, garbage)
        assert "invalid command" in str(error) or "bad arguments" in str(error), garbage
    assert relay.alive()
    assert scalar(bystander, "SELECT 'not killed'") == "not killed"
    assert [r["value"] for r in show(console, "CONFIG") if r["key"] == "default_pool_size"] == ["10"]
    assert "invalid command" in str(refused(console, "SHOW HELP; KILL"))
    assert scalar(bystander, "SELECT 'still not killed'") == "still not killed"


# -- SHUTDOWN -----------------------------------------------------------------------------------------

def test_shutdown_wait_for_clients_serves_them_until_they_leave(console_relay):
    relay = console_relay
    console = admin(relay)
    client = client_of(relay, "p1")
    assert run(console, "SHUTDOWN WAIT_FOR_CLIENTS") == ("SHUTDOWN", None)
    wait_until(lambda: "shutdown requested (wait_for_clients)" in relay.log())
    with pytest.raises(psycopg2.OperationalError):
        client_of(relay, "p1")
    assert scalar(client, "SELECT 'served'") == "served"
    client.close()
    console.close()
    assert relay.proc.wait(10) == 0


def test_shutdown_stops_at_once(console_relay, pg):
    relay = console_relay
    console = admin(relay)
    client = client_of(relay, "p1")
    thread, result = run_in_thread(lambda: scalar(client, "SELECT pg_sleep(30)"))
    time.sleep(0.5)
    started = time.monotonic()
    try:
        run(console, "SHUTDOWN")
    except psycopg2.Error:
        pass  # the reply may race the close
    assert relay.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    thread.join(5)
    assert "error" in result
    end_sleepers(pg)


def test_psql_runs_control_commands(console_relay):
    """psql, as operators use it."""
    relay = console_relay
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "admin", "-d", "pgbouncer",
                          "-c", "PAUSE p2", "-c", "SHOW DATABASES", "-c", "RESUME p2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "PAUSE" and out.stdout.strip().splitlines()[-1] == "RESUME"
    bad = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "admin", "-d", "pgbouncer",
                          "-c", "PAUSE nosuch"], capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "no such database: nosuch" in bad.stderr
