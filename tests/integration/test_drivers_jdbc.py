"""pgjdbc (Debian's libpostgresql-jdbc-java) through pgrelay, compared with pgjdbc on PostgreSQL directly: default prepareThreshold from 50 threads on 2 servers, prepared statements, batches and cancel on both ports."""

from __future__ import annotations

import pytest

from pgrelay.tempdb import free_port

from ..drivers import jdbc_driver, listeners  # noqa: F401  (session fixture)
from ..support import assert_served

THREADS = 50
ITERATIONS = 40
CHECKS_PER_THREAD = 2 * ITERATIONS + ITERATIONS // 4  # q1 and q3 each iteration, a transaction every 4th


def concurrent(jdbc_driver, port: int, url_extra: str = "") -> dict:
    run = jdbc_driver.run("Concurrent", {"port": port, "clients": THREADS, "iterations": ITERATIONS,
                                         "url_extra": url_extra}, timeout=150).check()
    return run.one("summary")


def assert_clean(summary: dict, where: str, servers: int | None = None) -> None:
    assert (summary["failed_clients"], summary["query_errors"], summary["wrong"], summary["errors"]) \
        == ([], 0, 0, []), f"pgjdbc {where}: {summary}"
    assert summary["ok"] == THREADS * CHECKS_PER_THREAD, summary
    # Every thread went past prepareThreshold: its statements ran as named server-side statements.
    assert summary["server_prepared"] == THREADS, summary
    if servers is not None:
        # The trap was sprung: both servers served the statements, and clients moved between them.
        assert summary["servers"] == servers and summary["moved_clients"] > 0, summary


@pytest.mark.smoke
def test_default_prepare_threshold_from_50_threads_on_a_transaction_pool_of_2(make_relay, pg, jdbc_driver):
    assert_clean(concurrent(jdbc_driver, pg.port), "on PostgreSQL directly")  # the program itself is right
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    assert_clean(concurrent(jdbc_driver, relay.port), "through a transaction pool of 2", servers=2)
    assert_served(relay)


@pytest.mark.parametrize("url_extra", ["&prepareThreshold=1&preparedStatementCacheQueries=1",
                                       "&prepareThreshold=-1", "&preferQueryMode=extendedCacheEverything"],
                         ids=["named-at-once-cache-of-1", "binary-at-once", "cache-everything"])
def test_other_prepare_modes_from_50_threads_on_a_transaction_pool_of_2(make_relay, jdbc_driver, url_extra):
    """Named statements from the first execution (and closed as pgjdbc's cache of one evicts them),
    binary transfer from the first execution, every statement cached."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    assert_clean(concurrent(jdbc_driver, relay.port, url_extra), f"with {url_extra}", servers=2)
    assert_served(relay)


# -- basics on the session and the transaction port ---------------------------------------------------

def basics(jdbc_driver, port: int, table: str) -> dict[str, list[dict]]:
    run = jdbc_driver.run("Basic", {"port": port, "table": table, "iterations": 25}, timeout=120).check()
    return {event: run.of(event) for event in ("connected", "prepared", "batch", "cancel", "cancel_failed")}


@pytest.fixture
def two_ports(make_relay):
    """One pgrelay: its main port in transaction mode, a [listeners] port in session mode."""
    session = free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2},
                       extra_sections=listeners(session=(session, "pool_mode=session")))
    return relay, {"transaction": relay.port, "session": session}


@pytest.mark.parametrize("port", ["transaction", "session"])
def test_prepared_statements_batches_and_cancel(two_ports, pg, jdbc_driver, port):
    direct = basics(jdbc_driver, pg.port, "jdbc_basic")
    # What pgjdbc does on PostgreSQL itself: past the threshold, all rows, both cancels 57014.
    assert direct["prepared"] == [{"event": "prepared", "iterations": 25, "ok": 25, "threshold": 5,
                                   "server_prepared_before": False, "server_prepared_after": True}]
    assert (direct["batch"][0]["rows"], direct["batch"][0]["duplicate"]["code"]) == (600, "23505"), direct
    assert [c["error"]["code"] for c in direct["cancel"]] == ["57014", "57014"], direct

    relay, ports = two_ports
    through = basics(jdbc_driver, ports[port], "jdbc_basic")  # the same name: messages compare equal
    assert through["prepared"] == direct["prepared"], through
    assert through["batch"] == direct["batch"], f"through the {port} port {through['batch']}, directly {direct['batch']}"
    assert through["cancel_failed"] == [], through
    for got in through["cancel"]:
        assert (got["error"], got["after"]) == ({"code": "57014",
                                                 "message": "ERROR: canceling statement due to user request"}, 42), got
        assert got["ms"] < 10_000, got  # cancelled after 0.7s, not the 30s pg_sleep
    assert_served(relay)


def test_session_mode_backend_pid_is_the_servers(make_relay, pg, jdbc_driver):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})
    connected = basics(jdbc_driver, relay.port, "jdbc_basic_pid")["connected"][0]
    assert connected["backend_pid"] == connected["pid"], connected  # BackendKeyData carries the server's pid


# -- startup parameters: currentSchema (search_path) and options=-c ... ---------------------------------

PARAMS_A = "&currentSchema=drv_a,public&options=-c%20statement_timeout%3D1500%20-c%20default_transaction_isolation%3Dserializable"


def parameters_seen(jdbc_driver, port: int) -> dict[str, dict]:
    run = jdbc_driver.run("Params", {"port": port, "transactions": 20, "url_a": PARAMS_A, "url_b": "-"},
                          timeout=60).check()
    return {record["label"]: record for record in run.of("connection")}


@pytest.mark.parametrize("port", ["transaction", "session"])
def test_startup_parameters_are_in_force_on_every_transaction(two_ports, pg, jdbc_driver, port):
    """Two connections take turns, one with search_path, statement_timeout and an isolation level
    from its URL, one with none: each sees its own values in every transaction, as directly."""
    pg.psql("CREATE SCHEMA IF NOT EXISTS drv_a")
    direct = parameters_seen(jdbc_driver, pg.port)
    assert direct["a"]["seen"] == {'["drv_a,public","1500ms","serializable","serializable"]': 20}, direct
    assert list(direct["b"]["seen"].values()) == [20] and direct["b"]["errors"] == [], direct

    relay, ports = two_ports
    through = parameters_seen(jdbc_driver, ports[port])
    for label in ("a", "b"):
        assert (through[label]["errors"], through[label]["seen"]) == ([], direct[label]["seen"]), \
            f"connection {label} through the {port} port: {through[label]}, directly {direct[label]}"
    assert_served(relay)
