"""role.cluster user names and [clusters], replica balancing over two standbys, and a replica stopped and restarted under health checks."""

from __future__ import annotations

import shutil
import time

import psycopg
import pytest

from ..support import RawClient, error_fields, startup_packet, wait_until
from .test_connection_options import (assert_serving, cluster_db, connect, one, refusal, relays,  # noqa: F401
                                      where)

N_CLUSTERS = 100


def cluster_sections(replicated) -> str:
    p, s = replicated.primary.port, replicated.standby.port
    lines = ["[clusters]", f"c1 = host=127.0.0.1 port={p} replicas=127.0.0.1:{s}"]
    # cNN: forced server user rNN; even clusters on the primary, odd ones on the standby.
    for n in range(N_CLUSTERS):
        lines.append(f"c{n:02d} = host=127.0.0.1 port={p if n % 2 == 0 else s} user=r{n:02d}")
    lines += ["[poolers]", "rb = target=replica"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def relay(relays, replicated, pg):
    """cluster_usernames=1; plain user names go to the shared test server `pg`, clusters to the pair."""
    replicated.primary.psql(
        f"DO $$BEGIN FOR i IN 0..{N_CLUSTERS - 1} LOOP "
        "EXECUTE format('CREATE ROLE %I LOGIN', 'r' || lpad(i::text, 2, '0')); END LOOP; END$$")
    replicated.wait_caught_up()
    return relays.start(settings={"cluster_usernames": "1"}, databases={"*": f"host=127.0.0.1 port={pg.port}"},
                        listeners={"direct": "role=direct"}, sections=cluster_sections(replicated),
                        name="clusters")


def test_cluster_user_names_route_to_the_cluster(relay, replicated, pg):
    p, s = replicated.primary.port, replicated.standby.port
    cases = [
        (relay.port, "postgres", (False, pg.port)),
        (relay.port, "postgres.c1", (False, p)),
        (relay.ports["direct"], "postgres.c1", (False, p)),
        (relay.ports["direct"], "postgres.c1|replica", (True, s)),
        (relay.port, "postgres.c1|rb", (True, s)),
    ]
    for port, user, expected in cases:
        with connect(port, user=user) as conn:
            assert where(conn) == expected, (port, user)
            assert one(conn, "SELECT current_user, current_database()") == ("postgres", "postgres"), user


def test_hundred_clusters(relay, replicated):
    p, s = replicated.primary.port, replicated.standby.port
    conns = []
    try:
        for n in range(N_CLUSTERS):
            conns.append(connect(relay.port, user=f"postgres.c{n:02d}"))
        seen = [one(conn, "SELECT current_user, pg_is_in_recovery(), current_setting('port')::int")
                for conn in conns]
    finally:
        for conn in conns:
            conn.close()
    assert seen == [(f"r{n:02d}", n % 2 == 1, s if n % 2 else p) for n in range(N_CLUSTERS)]


BAD_CLUSTER_NAMES = [
    ("main", "postgres.nope", "3D000", 'no such cluster: "nope"'),
    ("direct", "postgres.nope|replica", "3D000", 'no such cluster: "nope"'),
    ("main", "postgres.nope|rb", "3D000", 'no such cluster: "nope"'),
    ("main", "postgres.", "28000", 'user name "postgres." must look like role.cluster'),
    ("direct", ".c1", "28000", 'user name ".c1" must look like role.cluster'),
    ("main", "postgres." + "c" * 64, "42622", "cluster name is too long (64 bytes; the limit is 63)"),
]


@pytest.mark.parametrize("listener,user,sqlstate,message", BAD_CLUSTER_NAMES,
                         ids=[f"{b[0]}-{b[1][:24]}" for b in BAD_CLUSTER_NAMES])
def test_bad_cluster_names(relay, listener, user, sqlstate, message):
    port = relay.port if listener == "main" else relay.ports["direct"]
    fields = refusal(port, user)
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", sqlstate, message)
    assert_serving(relay.port, relay.ports["direct"])
    assert_serving(relay.port, relay.ports["direct"], user="postgres.c1")


# -- balancing over two replicas ----------------------------------------------------------------------


@pytest.fixture
def standby2(replicated):
    replica = replicated.primary.make_replica(name="standby2")
    try:
        replicated.wait_caught_up()
        yield replica
    finally:
        replica.stop("immediate")
        shutil.rmtree(replica.datadir, ignore_errors=True)


def _replica_port(port: int, **params) -> tuple[object, int]:
    conn = connect(port, user="postgres|replica", **params)
    recovery, server_port = where(conn)
    assert recovery is True
    return conn, server_port


def test_replica_balancing(relays, replicated, standby2):
    s1, s2 = replicated.standby.port, standby2.port
    databases = {"*": f"host=127.0.0.1 port={replicated.primary.port} replicas=127.0.0.1:{s1},127.0.0.1:{s2}"}

    rr = relays.start(settings={"replica_balance": "round_robin"}, databases=databases,
                      listeners={"direct": "role=direct"}, name="round_robin")
    ports = []
    for _ in range(6):
        conn, port = _replica_port(rr.ports["direct"])
        ports.append(port)
        conn.close()
    assert ports == [s1, s2] * 3

    lc = relays.start(settings={"replica_balance": "least_connections"}, databases=databases,
                      listeners={"direct": "role=direct"}, name="least_connections")
    held = []
    try:
        for _ in range(3):
            held.append(_replica_port(lc.ports["direct"], application_name="lc-test"))
        assert [port for _, port in held] == [s1, s2, s1]
        held.pop(1)[0].close()  # s2 now has no client, s1 has two
        wait_until(lambda: standby2.psql("SELECT count(*) FROM pg_stat_activity "
                                         "WHERE application_name = 'lc-test'") == "0",
                   timeout=5, message="the closed client's backend on standby2 to exit")
        more = []
        for _ in range(3):
            held.append(_replica_port(lc.ports["direct"], application_name="lc-test"))
            more.append(held[-1][1])
        assert more == [s2, s2, s1]
    finally:
        for conn, _ in held:
            conn.close()
    relays.stop(rr)
    relays.stop(lc)


# -- a replica stopped and restarted ----------------------------------------------------------------------


def _replica_outcome(port: int):
    """What a new direct |replica client gets: ('ok', (in recovery, port)) or ('refused', fields)."""
    raw = RawClient(port)
    try:
        raw.send(startup_packet("postgres|replica", "postgres"))
        kind, body = raw.read_message()
        if kind == b"E":
            return "refused", error_fields(body)
        assert (kind, body) == (b"R", b"\0\0\0\0")
        raw.read_until(b"Z")
        rows = [m for m in raw.query("SELECT pg_is_in_recovery(), current_setting('port')") if m[0] == b"D"]
        assert len(rows) == 1
        body = rows[0][1]
        values, pos = [], 2
        for _ in range(2):
            size = int.from_bytes(body[pos:pos + 4], "big")
            values.append(body[pos + 4:pos + 4 + size].decode())
            pos += 4 + size
        return "ok", (values[0] == "t", int(values[1]))
    finally:
        raw.close()


def _pooled_replica_port(port: int, refusals: list[str]) -> int | None:
    """The standby port a `postgres|rb` client's query ran on, or None if it was refused."""
    try:
        with connect(port, user="postgres|rb") as conn:
            recovery, server_port = where(conn)
    except psycopg.OperationalError as exc:
        refusals.append(str(exc).strip())
        return None
    assert recovery is True
    return server_port


@pytest.mark.timeout(120)
def test_replica_stopped_and_restarted(relays, replicated):
    p, s = replicated.primary.port, replicated.standby.port
    common = {"health_check_period": "0.5"}
    strict = relays.start(settings=common, databases={"*": cluster_db(replicated)},
                          listeners={"direct": "role=direct"}, sections="[poolers]\nrb = target=replica\n",
                          name="strict")
    fallback = relays.start(settings=dict(common, replica_fallback_to_primary="1"),
                            databases={"*": cluster_db(replicated)}, listeners={"direct": "role=direct"},
                            name="fallback")
    for relay in (strict, fallback):
        assert _replica_outcome(relay.ports["direct"]) == ("ok", (True, s))
    try:
        replicated.standby.stop()
        stopped = time.monotonic()
        def refused():
            outcome, details = _replica_outcome(strict.ports["direct"])
            return details if outcome == "refused" else None

        fields = wait_until(refused, timeout=5, interval=0.1, message="a |replica client to be refused")
        assert time.monotonic() - stopped < 3
        assert (fields["S"], fields["C"], fields["M"], fields["H"]) == (
            "FATAL", "08006", "no healthy replica available for direct:postgres/postgres|replica",
            "All replicas are down or lag more than max_replica_lag.")
        time.sleep(1.2)  # a few health checks later, still refused; the primary still serves
        assert _replica_outcome(strict.ports["direct"]) == ("refused", fields)
        assert_serving(strict.port, strict.ports["direct"])
        # with replica_fallback_to_primary=1 the client lands on the primary
        assert _replica_outcome(fallback.ports["direct"]) == ("ok", (False, p))
        # a dedicated replica pooler's first client is refused the same way
        fields = refusal(strict.port, "postgres|rb")
        assert (fields["S"], fields["C"], fields["M"]) == (
            "FATAL", "08006", "no healthy replica available for rb:postgres/postgres|replica")

        replicated.standby.start()
        started = time.monotonic()
        for relay in (strict, fallback):
            wait_until(lambda: _replica_outcome(relay.ports["direct"]) == ("ok", (True, s)), timeout=10,
                       interval=0.1, message="|replica clients to reach the restarted standby")
        assert time.monotonic() - started < 5
        # ... and the replica pooler serves again once the standby is back, without waiting out
        # server_login_retry (15 s) on its cached login error
        refusals: list[str] = []
        try:
            wait_until(lambda: _pooled_replica_port(strict.port, refusals) == s, timeout=10, interval=0.2,
                       message="the replica pooler to reach the restarted standby")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it kept refusing clients with: {refusals[-1:]}") from None
        assert time.monotonic() - started < 5
    finally:
        if not replicated.standby.running:
            replicated.standby.start()
    assert replicated.standby.in_recovery()
    with connect(strict.ports["direct"], user="postgres|replica") as conn:
        assert where(conn) == (True, s)
