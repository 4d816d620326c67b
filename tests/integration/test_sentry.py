"""Sentry reporting end to end: pgrelay as a process, a real PostgreSQL, a real envelope receiver on loopback.

Each test checks the events and their tags, and that no secret (client password, auth_file md5 hash
and SCRAM verifier, [databases] passwords, the text and bind parameter of a failing query) is in any
byte the receiver got; and that a Sentry endpoint that is down or never answers does not slow clients.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time

import psycopg
import psycopg2
import pytest

from pgrelay.auth import ScramSecret
from pgrelay.tempdb import TempPostgres

from ..sentry_receiver import Blackhole, SentryReceiver, refused_dsn
from ..support import scalar, wait_until

ALICE_PW = "alice-Client-Pw-5k2"
ALICE_MD5 = "md5" + hashlib.md5((ALICE_PW + "alice").encode()).hexdigest()
CAROL_VERIFIER = ScramSecret.from_password("carol-Client-Pw-8u1").encode()
DAN_PW = "dan-Plain-Pw-3j7"
DSN_PW = "dsn-Line-Pw-6h4"            # on the [databases] lines that work (the server trusts postgres)
WRONG_DB_PW = "wrong-Db-Pw-2m9"       # on the lines whose server refuses the login
BOB_REAL_PW = "bob-Real-Pw-4t0"
QUERY_MARKER = "qmarker-Sentry-71"
BIND_VALUE = "bind-Secret-Value-55"
SECRETS = (ALICE_PW, ALICE_MD5, CAROL_VERIFIER, *CAROL_VERIFIER.split("$")[2].split(":"), DAN_PW, DSN_PW,
           WRONG_DB_PW, BOB_REAL_PW, QUERY_MARKER, BIND_VALUE)

PG_HBA = """\
local all all trust
host all sentry_bob 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""

BOOM_ROUTER = """
from pgrelay import hookimpl

@hookimpl
def pgrelay_route_client(relay, login):
    if login.database == "boomdb":
        # A careless bug report: everything the plugin can see, secrets included.
        auth = relay.plugin_data["auth"]
        lines = [entry.value for entry in relay.config.section("databases")]
        raise RuntimeError(f"cannot route {login.database}: lines={lines} users={auth.users}")
"""

POLICY = """
from pgrelay import hookimpl, Reject

@hookimpl
def pgrelay_sentry_event(relay, event, hint):
    if event.get("tags", {}).get("database") == "dropdb":
        return Reject("dropdb is known to be broken")
    event.setdefault("tags", {})["team"] = "dba"
    return None
"""


@pytest.fixture(scope="module")
def refusing_pg():
    """A PostgreSQL that trusts everyone on loopback except sentry_bob, who needs his SCRAM password."""
    server = TempPostgres(name="sentrypg")
    server.initdb()
    with open(os.path.join(server.datadir, "pg_hba.conf"), "w") as f:
        f.write(PG_HBA)
    server.start()
    try:
        server.psql(f"CREATE ROLE sentry_bob LOGIN PASSWORD '{BOB_REAL_PW}'")
    except BaseException:
        server.cleanup()
        raise
    yield server
    server.cleanup()


@pytest.fixture
def receiver():
    with SentryReceiver() as rx:
        yield rx


def no_proxy_env() -> dict:
    """The relay must reach the receiver directly, whatever proxy the machine has configured."""
    return {name: "" for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy",
                                  "ALL_PROXY")} | {"no_proxy": "*", "NO_PROXY": "*"}


def start(make_relay, tmp_path, pg, dsn: str | None, settings: dict | None = None, plugins=(), name=None,
          extra_sections: str = ""):
    users = tmp_path / f"{name or 'relay'}-users.txt"
    users.write_text(f'"alice" "{ALICE_MD5}"\n"carol" "{CAROL_VERIFIER}"\n"dan" "{DAN_PW}"\n')
    conf = {"auth_type": "md5", "auth_file": str(users), "server_login_retry": "1", "sentry_event_window": "2"}
    if dsn:
        conf["sentry_dsn"] = dsn
    paths = []
    for index, source in enumerate(plugins):
        path = tmp_path / f"{source[0]}.py"
        path.write_text(source[1])
        paths.append(str(path))
    if paths:
        conf["plugins"] = ", ".join(paths)
    conf.update(settings or {})
    base = f"host=127.0.0.1 port={pg.port} dbname=postgres"
    databases = {
        "*": f"{base} user=postgres password={DSN_PW}",
        "baddb": f"{base} user=sentry_bob password={WRONG_DB_PW}",
        "dropdb": f"{base} user=sentry_bob password='{WRONG_DB_PW}'",
    }
    kw = {"name": name} if name else {}
    return make_relay(settings=conf, databases=databases, env=no_proxy_env(), extra_sections=extra_sections, **kw)


def alice(relay, dbname="postgres", password=ALICE_PW):
    return psycopg2.connect(relay.dsn(user="alice", dbname=dbname, password=password), connect_timeout=10)


def assert_no_secret(receiver: SentryReceiver) -> None:
    raw = receiver.raw()
    assert raw, "nothing was received"
    for secret in SECRETS:
        assert secret.encode() not in raw, f"{secret!r} was sent to Sentry"


def failing_query_with_a_bind_parameter(relay) -> None:
    """A query that fails on the server, sent with the extended protocol (Parse/Bind with a parameter)."""
    with psycopg.connect(relay.dsn(user="alice", password=ALICE_PW), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"SELECT '{QUERY_MARKER}' || %s::text, 1 / (length(%s::text) - length(%s::text))",
                         [BIND_VALUE, BIND_VALUE, BIND_VALUE])


def by_kind(kind: str):
    return lambda event: event.get("fingerprint", [None, None])[1] == kind


# -- internal errors ------------------------------------------------------------------------------------------

def test_a_serverless_clients_error_is_tagged_with_its_listener_and_transport(make_relay, tmp_path, refusing_pg,
                                                                              receiver):
    """A WebSocket client of a serverless listener sends its password in clear text (the Neon
    driver's pipelined login): the event names the listener and transport, and holds no secret."""
    from pgrelay.tempdb import free_port
    from tests.support import WsClient, startup_packet
    port = free_port()
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn, plugins=[("boom_router", BOOM_ROUTER)],
                  extra_sections=f"[listeners]\nserverless = port={port} role=serverless\n")
    relay.expected_bugs = ("internal error during login", "pooler error: internal error",
                           "Traceback (most recent call last)")
    ws = WsClient(port)
    password = ALICE_PW.encode() + b"\0"
    ws.send(startup_packet("alice", "boomdb") + b"p" + (len(password) + 4).to_bytes(4, "big") + password)
    assert ws.read_message() == (b"R", b"\0\0\0\3")
    assert ws.read_error()["M"] == "internal error"
    event = receiver.wait_for_events()[0]
    tags = event["tags"]
    assert (tags["phase"], tags["listener"], tags["transport"], tags["user"]) == \
        ("login", "serverless", "websocket", "alice")
    assert_no_secret(receiver)


def test_a_plugin_bug_during_login_is_reported_with_its_tags_and_no_secret(make_relay, tmp_path, refusing_pg,
                                                                         receiver):
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn, plugins=[("boom_router", BOOM_ROUTER)])
    relay.expected_bugs = ("internal error during login", "pooler error: internal error",
                           "Traceback (most recent call last)")
    failing_query_with_a_bind_parameter(relay)
    with pytest.raises(psycopg2.Error) as info:
        alice(relay, "boomdb")
    assert "FATAL:  internal error" in str(info.value)
    conn = alice(relay)  # the relay serves on
    assert scalar(conn, "SELECT 'served'") == "served"
    conn.close()
    event = receiver.wait_for_events()[0]
    assert event["level"] == "error"
    assert event["exception"]["values"][0]["type"] == "RuntimeError"
    assert event["exception"]["values"][0]["value"].startswith("cannot route boomdb: lines=")
    tags = event["tags"]
    assert (tags["phase"], tags["plugin"], tags["database"], tags["user"], tags["listener"]) == \
        ("login", "boom_router", "boomdb", "alice", "main")
    frames = event["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "pgrelay_route_client"
    assert all("vars" not in frame for frame in frames)
    assert not event.get("breadcrumbs", {}).get("values")
    assert "internal error during login" in relay.log()
    assert_no_secret(receiver)


# -- server logins, client timeouts, lost servers ------------------------------------------------------------------

def test_a_server_refusing_logins_is_reported_per_pool_with_a_count(make_relay, tmp_path, refusing_pg, receiver):
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn, plugins=[("policy", POLICY)])
    failing_query_with_a_bind_parameter(relay)
    deadline = time.monotonic() + 4
    refused = 0
    while time.monotonic() < deadline:
        for dbname in ("baddb", "dropdb"):
            with pytest.raises(psycopg2.Error) as info:
                alice(relay, dbname)
            assert "password authentication failed" in str(info.value) or "server login" in str(info.value)
        refused += 1
        time.sleep(0.3)
    first = receiver.wait_for_events(by_kind("server_login_failed"))[0]
    assert first["tags"] == {"database": "baddb", "user": "sentry_bob", "pool": "baddb/sentry_bob",
                             "route": "primary", "pool_mode": "transaction", "host": f"127.0.0.1:{refusing_pg.port}",
                             "team": "dba"}
    assert first["message"] == ('server login failed for pool baddb/sentry_bob: '
                                'password authentication failed for user "sentry_bob"')
    assert first["extra"]["sqlstate"] == "28P01"
    assert first["extra"]["databases_entry"] == (f"baddb = host=127.0.0.1 port={refusing_pg.port} dbname=postgres "
                                                 "user=sentry_bob password=[Filtered]")
    # The repeats (one login attempt per server_login_retry) come as one event with their count.
    repeated = receiver.wait_for_events(lambda e: by_kind("server_login_failed")(e) and e["extra"]["count"] > 1,
                                        timeout=10)[0]
    assert repeated["tags"]["pool"] == "baddb/sentry_bob"
    events = [e for e in receiver.events() if by_kind("server_login_failed")(e)]
    assert len(events) < refused, (len(events), refused)   # not one event per client
    assert all(e["tags"]["database"] != "dropdb" for e in receiver.events())  # dropped by the policy plugin
    assert_no_secret(receiver)


def test_client_authentication_failures_are_reported_without_the_password(make_relay, tmp_path, refusing_pg,
                                                                          receiver):
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn)
    for _ in range(3):
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            alice(relay, password=DAN_PW)
    event = receiver.wait_for_events(by_kind("auth_failed"))[0]
    assert event["tags"] == {"database": "postgres", "user": "alice", "listener": "main"}
    assert event["message"] == "client authentication failed on listener main (password)"
    assert event["extra"]["reason"] == "password" and event["level"] == "warning"
    receiver.wait_for_events(lambda e: by_kind("auth_failed")(e) and e["extra"]["count"] == 2, timeout=10)
    assert_no_secret(receiver)


def test_clients_timed_out_by_a_pool_are_reported_as_one_event_with_a_count(make_relay, tmp_path, refusing_pg,
                                                                           receiver):
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn,
                  {"default_pool_size": "1", "query_wait_timeout": "1", "sentry_event_window": "3"})
    holder = alice(relay)
    holder.autocommit = False
    scalar(holder, "SELECT 1")  # inside a transaction: the pool's only server is taken
    errors = []

    def waiter():
        conn = alice(relay)
        try:
            conn.autocommit = True
            scalar(conn, "SELECT 1")
        except psycopg2.Error as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(errors) == 3, errors
    assert relay.log().count("pooler error: query_wait_timeout") == 3
    holder.rollback()
    holder.close()
    events = receiver.wait_for_events(by_kind("client_timeout"))
    assert events[0]["tags"] == {"database": "postgres", "user": "alice", "listener": "main",
                                 "pool": "postgres/postgres", "route": "primary", "pool_mode": "transaction",
                                 "host": f"127.0.0.1:{refusing_pg.port}"}
    assert events[0]["message"] == "pool postgres/postgres timed clients out waiting for a server (query_wait_timeout)"
    wait_until(lambda: sum(e["extra"]["count"] for e in receiver.events() if by_kind("client_timeout")(e)) == 3,
               timeout=10, message="the timed-out clients counted")
    assert len([e for e in receiver.events() if by_kind("client_timeout")(e)]) <= 2
    assert_no_secret(receiver)


def test_lost_servers_are_reported_per_pool_and_host(make_relay, tmp_path, refusing_pg, receiver):
    relay = start(make_relay, tmp_path, refusing_pg, receiver.dsn)
    conns, pids = [], []
    for _ in range(3):
        conn = alice(relay)
        pids.append(scalar(conn, "SELECT pg_backend_pid()"))  # psycopg2 opened a transaction: server held
        conns.append(conn)
    refusing_pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN ({','.join(map(str, pids))})")
    for conn in conns:
        with pytest.raises(psycopg2.Error):
            scalar(conn, "SELECT 1")
        conn.close()
    first = receiver.wait_for_events(by_kind("server_lost"))[0]
    assert first["tags"] == {"pool": "postgres/postgres", "route": "primary", "pool_mode": "transaction",
                             "database": "postgres", "user": "postgres", "host": f"127.0.0.1:{refusing_pg.port}"}
    assert first["message"].startswith("server connection lost in pool postgres/postgres: server ")
    wait_until(lambda: sum(e["extra"]["count"] for e in receiver.events() if by_kind("server_lost")(e)) >= 3,
               timeout=10, message="the lost servers counted")
    assert len([e for e in receiver.events() if by_kind("server_lost")(e)]) < 3
    conn = alice(relay)  # the pool serves on with new servers
    assert scalar(conn, "SELECT 'served'") == "served"
    conn.close()
    assert_no_secret(receiver)


# -- an endpoint down or silent never slows clients -------------------------------------------------------------------

def _latencies(conn, n: int) -> list[float]:
    out = []
    with conn.cursor() as cur:
        for _ in range(n):
            start = time.perf_counter()
            cur.execute("SELECT 1")
            cur.fetchone()
            out.append(time.perf_counter() - start)
    return out


@pytest.mark.parametrize("endpoint", ["blackhole", "refused"])
def test_a_down_or_silent_sentry_endpoint_does_not_slow_queries(make_relay, tmp_path, refusing_pg, endpoint):
    with Blackhole() as hole:
        dsn = hole.dsn if endpoint == "blackhole" else refused_dsn()
        plain = start(make_relay, tmp_path, refusing_pg, None, plugins=[("boom_router", BOOM_ROUTER)], name="plain")
        reporting = start(make_relay, tmp_path, refusing_pg, dsn, {"sentry_event_window": "0"},
                          plugins=[("boom_router", BOOM_ROUTER)], name="reporting")
        for relay in (plain, reporting):
            relay.expected_bugs = ("internal error during login", "pooler error: internal error",
                                   "Traceback (most recent call last)")
        stop = threading.Event()

        def make_events():
            """Internal errors at ever new places and failed logins, to both relays alike: on the
            reporting one, a stream of events the SDK cannot deliver."""
            i = 0
            while not stop.is_set():
                i += 1
                for relay in (plain, reporting):
                    for dbname, password in (("boomdb", ALICE_PW), (f"nodb{i}", "wrong")):
                        try:
                            alice(relay, dbname, password).close()
                        except psycopg2.Error:
                            pass

        producer = threading.Thread(target=make_events)
        producer.start()
        try:
            time.sleep(1)  # the SDK's queue fills; its worker is stuck (blackhole) or failing (refused)
            base_conn, conn = alice(plain), alice(reporting)
            base_conn.autocommit = conn.autocommit = True
            base, with_sentry = [], []
            try:
                for _ in range(10):  # interleaved rounds, so machine noise hits both alike
                    base += _latencies(base_conn, 30)
                    with_sentry += _latencies(conn, 30)
            finally:
                base_conn.close()
                conn.close()
        finally:
            stop.set()
            producer.join(20)
        if endpoint == "blackhole":
            assert hole.accepted, "the SDK never reached the silent endpoint"
        if endpoint == "refused":
            assert "sentry: could not send events" in reporting.log()
            assert reporting.log().count("sentry: could not send events") == 1  # once a minute, not per event
        base_p50, sentry_p50 = statistics.median(base), statistics.median(with_sentry)
        base_p90 = sorted(base)[int(len(base) * 0.9)]
        sentry_p90 = sorted(with_sentry)[int(len(with_sentry) * 0.9)]
        assert sentry_p50 < base_p50 * 2 + 0.002, (sentry_p50, base_p50)
        assert sentry_p90 < base_p90 * 3 + 0.005, (sentry_p90, base_p90)
        assert max(with_sentry) < 0.5, max(with_sentry)  # a send that waited would take seconds
        assert "Retrying" not in reporting.log().replace("sentry: could not send events: Retrying", "")
