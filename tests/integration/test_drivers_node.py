"""node-postgres through pgrelay, compared with node-postgres on PostgreSQL directly: named queries from 50 clients on 2 servers, startup parameters in force, terminated backends, quick disconnects."""

from __future__ import annotations

import socket
import threading

import pytest

from pgrelay.tempdb import free_port

from ..drivers import listeners, node_driver  # noqa: F401  (session fixture)
from ..support import assert_served

CLIENTS = 50
ITERATIONS = 40
CHECKS_PER_CLIENT = 2 * ITERATIONS + ITERATIONS // 4  # q1 and q3 each iteration, a transaction every 4th


def named_queries(node_driver, port: int) -> dict:
    run = node_driver.run("named_queries.js", {"port": port, "clients": CLIENTS, "iterations": ITERATIONS},
                          timeout=150).check()
    return run.one("summary")


def assert_clean(summary: dict, where: str, servers: int | None = None) -> None:
    assert (summary["failed_clients"], summary["query_errors"], summary["wrong"], summary["errors"]) \
        == ([], 0, 0, []), f"node-postgres named queries {where}: {summary}"
    assert summary["ok"] == CLIENTS * CHECKS_PER_CLIENT, summary
    if servers is not None:
        # The trap was sprung: both servers served the statements, and clients moved between them.
        assert summary["servers"] == servers and summary["moved_clients"] > 0, summary


@pytest.mark.smoke
def test_named_queries_from_50_clients_on_a_transaction_pool_of_2(make_relay, pg, node_driver):
    assert_clean(named_queries(node_driver, pg.port), "on PostgreSQL directly")  # the program itself is right
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    assert_clean(named_queries(node_driver, relay.port), "through a transaction pool of 2", servers=2)
    assert_served(relay)


# -- startup parameters: statement_timeout and options=-c ... ------------------------------------------

PARAMETER_CLIENTS = [
    {"label": "timeout+serializable", "sleep": 2,
     "settings": {"statement_timeout": 700, "options": "-c default_transaction_isolation=serializable"}},
    {"label": "defaults", "sleep": 0.2, "settings": {}},
    {"label": "options only", "settings": {"options": r"-c default_transaction_isolation=repeatable\ read "
                                                        "-c statement_timeout=1500"}},
    {"label": "timeout only", "settings": {"statement_timeout": 2500}},
]
TRANSACTIONS = 30


def parameters_seen(node_driver, port: int) -> dict[str, dict]:
    run = node_driver.run("session_params.js", {"port": port, "clients": PARAMETER_CLIENTS,
                                                "transactions": TRANSACTIONS}, timeout=180).check()
    return {record["label"]: record for record in run.of("client")}


@pytest.fixture
def two_ports(make_relay):
    """One pgrelay: its main port in transaction mode, a [listeners] port in session mode; 2 servers each,
    so four clients share and reuse servers on both."""
    session = free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2},
                       extra_sections=listeners(session=(session, "pool_mode=session")))
    return relay, {"transaction": relay.port, "session": session}


@pytest.mark.smoke
@pytest.mark.parametrize("port", ["transaction", "session"])
def test_startup_parameters_are_in_force_on_every_transaction(two_ports, pg, node_driver, port):
    direct = parameters_seen(node_driver, pg.port)
    for spec in PARAMETER_CLIENTS:  # the expectation, from PostgreSQL itself
        record = direct[spec["label"]]
        assert record["errors"] == [] and list(record["seen"].values()) == [TRANSACTIONS], record
    assert direct["timeout+serializable"]["sleep"]["code"] == "57014"
    assert direct["defaults"]["sleep"]["code"] is None
    assert list(direct["timeout+serializable"]["seen"]) == ['["700ms","serializable","serializable","700ms",'
                                                            '"serializable","700ms"]']

    relay, ports = two_ports
    through = parameters_seen(node_driver, ports[port])
    for spec in PARAMETER_CLIENTS:
        label = spec["label"]
        got, want = through[label], direct[label]
        # Every one of the client's transactions saw exactly what it sees on PostgreSQL directly.
        assert (got["errors"], got["seen"]) == ([], want["seen"]), f"{label} through the {port} port: {got}"
        if spec.get("sleep"):
            assert (got["sleep"]["code"], got["sleep"].get("message")) == \
                (want["sleep"]["code"], want["sleep"].get("message")), (label, got["sleep"], want["sleep"])
    assert_served(relay)


# -- a terminated backend, quick disconnects ---------------------------------------------------------------

def terminations(node_driver, pg, port: int) -> dict[str, dict]:
    run = node_driver.run("terminate.js", {"port": port, "pg_port": pg.port, "modes": ["idle", "busy"]},
                          timeout=120).check()
    return {record["mode"]: record for record in run.of("terminate")}


def server_errors(record: dict) -> list[str]:
    """The SQLSTATEs of the errors node-postgres raised from ErrorResponses (its own "Connection
    terminated unexpectedly" on the close has none)."""
    return [e["code"] for e in record["events"] if e["kind"] != "end" and e["code"] is not None]


def test_terminated_backend_of_a_session_client_is_one_57P01_as_on_postgresql(make_relay, pg, node_driver):
    direct = terminations(node_driver, pg, pg.port)
    for mode in ("idle", "busy"):  # what node-postgres does on PostgreSQL directly
        assert server_errors(direct[mode]) == ["57P01"], direct[mode]

    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})
    through = terminations(node_driver, pg, relay.port)
    for mode in ("idle", "busy"):
        got, want = through[mode], direct[mode]
        assert got["killed"] is True, got
        assert server_errors(got) == ["57P01"], f"{mode}: node-postgres saw {got['events']}"
        assert (got["events"], got["after"]) == (want["events"], want["after"]), \
            f"{mode}: through pgrelay {got}\ndirectly {want}"
    assert_served(relay)


def test_terminated_backend_in_transaction_mode_is_the_servers_error_and_the_client_stays(make_relay, pg, node_driver):
    """pgrelay keeps a transaction-mode client connected by design: the query in flight fails with
    PostgreSQL's own SQLSTATE and text, then the client goes on on another server."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    run = node_driver.run("terminate.js", {"port": relay.port, "pg_port": pg.port, "modes": ["busy"],
                                           "stays_connected": True}, timeout=60).check()
    got = run.one("terminate")
    assert got["killed"] is True, got
    assert got["events"] == [{"kind": "query error", "code": "57P01", "severity": "ERROR",
                              "message": "terminating connection due to administrator command"}], got
    assert got["after"] == {"kind": "query result"}, got
    assert_served(relay)


def test_session_mode_backend_pid_is_the_servers(make_relay, pg, node_driver):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})
    run = node_driver.run("terminate.js", {"port": relay.port, "pg_port": pg.port, "modes": ["idle"]},
                          timeout=60).check()
    record = run.one("terminate")
    assert record["process_id"] == record["pid"], record  # BackendKeyData is the server's own pid


def test_node_postgres_quick_end_sends_terminate_before_the_startup_packet(node_driver):
    """The premise of the next test, checked on a plain socket: the first bytes are Terminate."""
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(20)

        def serve():
            for _ in range(3):
                try:
                    conn, _ = server.accept()
                except OSError:
                    return
                with conn:
                    conn.settimeout(5)
                    data = b""
                    try:
                        while chunk := conn.recv(65536):
                            data += chunk
                    except OSError:
                        pass
                    received.append(data)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        node_driver.run("terminate.js", {"port": server.getsockname()[1], "pg_port": 0, "quick": 3,
                                         "no_killer": True}, timeout=60).check()
        thread.join(20)
    assert len(received) == 3 and all(data.startswith(b"X\0\0\0\4") for data in received), received


@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_quick_connect_and_end_is_a_silent_close(make_relay, pg, node_driver, mode):
    """node-postgres's end() right after connect() writes Terminate before the StartupMessage."""
    quick = 20
    direct = node_driver.run("terminate.js", {"port": pg.port, "pg_port": pg.port, "quick": quick},
                             timeout=60).check().one("quick")["outcomes"]
    relay = make_relay({"pool_mode": mode, "default_pool_size": 2})
    start = len(relay.log())
    through = node_driver.run("terminate.js", {"port": relay.port, "pg_port": pg.port, "quick": quick},
                              timeout=60).check().one("quick")["outcomes"]
    assert through == direct, f"through pgrelay {through}, directly {direct}"
    assert_served(relay)
    noisy = [line for line in relay.log()[start:].splitlines()
             if "bad packet header" in line or " WARNING " in line or " ERROR " in line]
    assert noisy == [], "\n".join(noisy[:20])
