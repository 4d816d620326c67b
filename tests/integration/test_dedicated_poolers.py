"""Dedicated poolers ([poolers], user "role|name" on a pooled port): targets, own pool modes and sizes, config errors, isolation from the local pooler."""

from __future__ import annotations

import statistics
import threading
import time

import psycopg
import pytest

from ..support import wait_until
from .test_connection_options import (assert_serving, cluster_db, connect, one, refusal, relays,  # noqa: F401
                                      where)

POOLERS = """[poolers]
rb = target=replica pool_mode=transaction default_pool_size=1
pb = target=primary pool_mode=session default_pool_size=2
iso = target=primary pool_mode=transaction default_pool_size=2 max_client_conn=20
"""


@pytest.fixture(scope="module")
def relay(relays, replicated):
    return relays.start(databases={"*": cluster_db(replicated)}, sections=POOLERS, name="poolers")


def test_replica_pooler_reaches_the_replica(relay, replicated):
    a = connect(relay.port, user="postgres|rb")
    b = connect(relay.port, user="postgres|rb")
    try:
        pids = []
        for _ in range(3):
            for conn in (a, b):
                assert where(conn) == (True, replicated.standby.port)
                pids.append(one(conn, "SELECT pg_backend_pid()")[0])
        # transaction pooling with default_pool_size=1: both clients use the same server
        assert len(set(pids)) == 1, pids
        assert one(a, "SELECT current_user") == ("postgres",)
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(60)
def test_primary_pooler_in_session_mode_with_two_servers(relay, replicated):
    c1 = connect(relay.port, user="postgres|pb")
    c2 = connect(relay.port, user="postgres|pb")
    c3 = None
    try:
        assert where(c1) == (False, replicated.primary.port)
        pid1, pid2 = one(c1, "SELECT pg_backend_pid()")[0], one(c2, "SELECT pg_backend_pid()")[0]
        assert pid1 != pid2
        c1.execute("SET work_mem = '5MB'")
        for _ in range(3):  # session pooling: each keeps its server (and its SET) across transactions
            assert one(c1, "SELECT pg_backend_pid(), current_setting('work_mem')") == (pid1, "5MB")
            assert one(c2, "SELECT pg_backend_pid()") == (pid2,)
        # A local pooler client (same database and user) has a pool of its own.
        with connect(relay.port) as local:
            assert one(local, "SELECT pg_backend_pid()")[0] not in (pid1, pid2)
        # A third session client waits, at login (its welcome carries its server's pid):
        # default_pool_size=2 is reached.
        result = {}

        def third():
            conn = connect(relay.port, user="postgres|pb")
            result.update(conn=conn, pid=one(conn, "SELECT pg_backend_pid()")[0])
        waiter = threading.Thread(target=third)
        waiter.start()
        waiter.join(0.7)
        assert waiter.is_alive() and not result, "a third session client got a server past default_pool_size=2"
        c1.close()
        waiter.join(10)
        c3 = result.get("conn")
        assert result.get("pid") == pid1, result  # the server c1 left, after its reset
        assert c3.info.backend_pid == pid1
        assert one(c3, "SHOW work_mem") != ("5MB",)  # server_reset_query (DISCARD ALL) ran
    finally:
        for conn in (c1, c2, c3):
            if conn is not None:
                conn.close()


def test_unknown_pooler(relay):
    fields = refusal(relay.port, "postgres|x")
    assert (fields["S"], fields["C"], fields["M"], fields["H"]) == (
        "FATAL", "08P01", 'no such pooler: "x"', "Dedicated poolers are declared in [poolers].")
    assert_serving(relay.port)
    assert_serving(relay.port, user="postgres|rb")


NAME_RULE = ("must be 1 to 63 ASCII letters, digits, '-' or '_', starting with a letter or digit "
             "(a user name's parts are limited to 63 bytes, as PostgreSQL's names are)")
BAD_POOLERS = [
    ("primary = target=primary", "pooler name 'primary' is reserved"),
    ("replica = target=replica", "pooler name 'replica' is reserved"),
    ("Replica = target=replica", "pooler name 'Replica' is reserved"),
    ("p" * 64 + " = target=replica", f"pooler name '{'p' * 64}' {NAME_RULE}"),
    ("read.only = target=replica", f"pooler name 'read.only' {NAME_RULE}"),
    ("_hidden = target=replica", f"pooler name '_hidden' {NAME_RULE}"),
    ("ok = target=replica upstream=127.0.0.1:6432", "upstream is only for primary poolers"),
]


@pytest.mark.parametrize("line,message", BAD_POOLERS, ids=[b[0].split()[0] + "-" + str(i)
                                                             for i, b in enumerate(BAD_POOLERS)])
def test_bad_pooler_lines_refuse_to_start(relays, replicated, line, message):
    with pytest.raises(RuntimeError) as info:
        relays.start(databases={"*": cluster_db(replicated)},
                     sections=f"[poolers]\nrb = target=replica\n{line}\n")
    relay = relays.started[-1]
    assert relay.proc.returncode == 1
    with open(relay.ini_path) as f:
        lineno = f.read().splitlines().index(line) + 1
    expected = f"pgrelay: error: {relay.ini_path}:{lineno}: {message}"
    assert expected in relay.log().splitlines(), relay.log()
    assert "exited with 1" in str(info.value)


def test_pooler_names_as_pgbouncer_users_write_them(relays, replicated):
    """Names like write-bouncer, capitals, and up to 63 characters (the longest suffix a user name
    may carry) are accepted and reached; the name is matched exactly."""
    longest = "Reporting_Replica-" + "x" * 45
    assert len(longest) == 63
    relay = relays.start(databases={"*": cluster_db(replicated)},
                         sections=f"[poolers]\nwrite-bouncer = target=primary\n{longest} = target=replica\n")
    with connect(relay.port, user="postgres|write-bouncer") as conn:
        assert where(conn) == (False, replicated.primary.port)
    with connect(relay.port, user=f"postgres|{longest}") as conn:
        assert where(conn) == (True, replicated.standby.port)
    fields = refusal(relay.port, f"postgres|{longest.lower()}")
    assert (fields["C"], fields["M"]) == ("08P01", f'no such pooler: "{longest.lower()}"')


# -- isolation from the local pooler ------------------------------------------------------------------


def _active_sleeps(server) -> int:
    return int(server.psql("SELECT count(*) FROM pg_stat_activity "
                           "WHERE state = 'active' AND query = 'SELECT pg_sleep(0.5)'"))


@pytest.mark.timeout(60)
def test_saturated_pooler_does_not_slow_the_local_pooler(relay, replicated):
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []
    sleepers = [connect(relay.port, user="postgres|iso") for _ in range(10)]

    def loop(conn):
        try:
            while not stop.is_set():
                start = time.monotonic()
                conn.execute("SELECT pg_sleep(0.5)")
                latencies.append(time.monotonic() - start)
        except BaseException as exc:  # reported below
            errors.append(exc)

    quick = connect(relay.port)
    threads = [threading.Thread(target=loop, args=(c,)) for c in sleepers]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: _active_sleeps(replicated.primary) == 2, timeout=5, message="the pooler to saturate")
        quick_times = []
        for _ in range(20):
            start = time.monotonic()
            assert one(quick, "SELECT pg_is_in_recovery()") == (False,)
            quick_times.append(time.monotonic() - start)
        # the dedicated pooler never has more than its default_pool_size=2 servers busy
        assert _active_sleeps(replicated.primary) == 2
        time.sleep(1.0)  # let every sleeper queue up behind the two servers at least once
        assert _active_sleeps(replicated.primary) == 2
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        for conn in sleepers + [quick]:
            conn.close()
    assert not errors, errors
    assert max(quick_times) < 0.5, quick_times
    assert statistics.median(quick_times) < 0.05, quick_times
    # 10 clients on 2 servers: a 0.5 s query waits for about 4 others ahead of it
    assert len(latencies) >= 6
    assert statistics.median(latencies) > 1.2, latencies
    assert max(latencies) > 1.5, latencies


def test_pooler_max_client_conn_is_its_own(relays, replicated):
    relay = relays.start(settings={"max_client_conn": "4"}, databases={"*": cluster_db(replicated)},
                         sections="[poolers]\nfull = target=primary max_client_conn=3\n", name="limits")
    held = [connect(relay.port, user="postgres|full") for _ in range(3)]
    try:
        for conn in held:
            assert where(conn) == (False, replicated.primary.port)
        fields = refusal(relay.port, "postgres|full")
        assert (fields["S"], fields["C"], fields["M"]) == (
            "FATAL", "53300", "no more connections allowed (max_client_conn)")
        # The full pooler takes none of the global max_client_conn=4 slots: 4 local clients fit.
        for _ in range(4):
            held.append(connect(relay.port))
            assert one(held[-1], "SELECT 1") == (1,)
        fields = refusal(relay.port, "postgres")
        assert (fields["S"], fields["C"], fields["M"]) == (
            "FATAL", "53300", "no more connections allowed (max_client_conn)")
        held.pop(0).close()
        newcomer = wait_until(lambda: _try_connect(relay.port, "postgres|full"), timeout=5,
                              message="a free slot in the full pooler")
        held.append(newcomer)
        assert one(newcomer, "SELECT 1") == (1,)
    finally:
        for conn in held:
            conn.close()


def _try_connect(port, user):
    try:
        return connect(port, user=user)
    except psycopg.OperationalError as exc:
        assert "no more connections allowed (max_client_conn)" in str(exc)
        return None
