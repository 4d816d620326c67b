"""Failover across a [databases] entry's hosts: promotion of a standby, pooled, in-flight and direct clients."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psycopg2
import pytest

from pgrelay.tempdb import TempPostgres, free_port

from ..support import RawClient, error_fields, wait_until

CLIENTS = 100


class Pair:
    """A primary and its streaming standby, built for one test (failover destroys them)."""

    def __init__(self, primary: TempPostgres, standby: TempPostgres):
        self.primary = primary
        self.standby = standby

    def wait_caught_up(self, timeout: float = 30) -> None:
        lsn = self.primary.psql("SELECT pg_current_wal_lsn()")
        wait_until(lambda: self.standby.psql(f"SELECT pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn") == "t",
                   timeout=timeout, message="the standby to catch up")

    def fail_over(self) -> None:
        """Promote the standby once it has everything, then stop the old primary (fast shutdown)."""
        self.wait_caught_up()
        self.standby.promote()
        assert not self.standby.in_recovery()
        stop_now(self.primary)


def stop_now(server: TempPostgres, mode: str = "fast") -> None:
    """Stop PostgreSQL and return as soon as it is gone (pg_ctl -w polls only every 100 ms)."""
    pidfile = os.path.join(server.datadir, "postmaster.pid")
    server.run(server._cmd("pg_ctl"), "-D", server.datadir, "-m", mode, "-W", "stop")
    wait_until(lambda: not os.path.exists(pidfile), timeout=30, interval=0.002,
               message="PostgreSQL to stop")
    server.running = False


@pytest.fixture
def pair():
    primary = TempPostgres(settings={"wal_level": "replica", "synchronous_commit": "on",
                                     "max_connections": "200"}).start()
    try:
        primary.psql("CREATE TABLE writes (client int NOT NULL, round int NOT NULL, port int NOT NULL, "
                     "PRIMARY KEY (client, round))")
        standby = primary.make_replica()
    except BaseException:
        primary.cleanup()
        raise
    try:
        yield Pair(primary, standby)
    finally:
        standby.stop("immediate")
        primary.cleanup()


def both_hosts(first: TempPostgres, second: TempPostgres) -> str:
    return f"host=127.0.0.1,127.0.0.1 port={first.port},{second.port}"


def start_relay(make_relay, pair: Pair, extra_sections: str = "", order=None, **settings):
    first, second = order or (pair.primary, pair.standby)
    return make_relay(settings={"health_check_period": "0.5", **settings},
                      databases={"postgres": both_hosts(first, second)}, extra_sections=extra_sections)


def connect(dsn: str):
    conn = psycopg2.connect(dsn, connect_timeout=10)
    conn.autocommit = True
    return conn


def write(conn, client: int, rnd: int) -> int:
    """INSERT one row; returns the port of the server that took it (as that server reports it)."""
    with conn.cursor() as cur:
        cur.execute("INSERT INTO writes VALUES (%s, %s, inet_server_port()) RETURNING port, "
                    "current_setting('port')::int", (client, rnd))
        port, setting = cur.fetchone()
        assert port == setting
        return port


def rows(server: TempPostgres, where: str = "true") -> list[tuple[int, int, int]]:
    out = server.psql(f"SELECT client, round, port FROM writes WHERE {where} ORDER BY client, round")
    return [tuple(int(v) for v in line.split("|")) for line in out.splitlines()]


def outcome(exc: psycopg2.Error) -> str:
    """How a write failed, in one line: error class, SQLSTATE, message."""
    message = exc.diag.message_primary or str(exc).strip().splitlines()[0]
    return f"{type(exc).__name__} {exc.pgcode}: {message}"


def test_idle_pooled_clients_follow_the_promoted_standby(make_relay, pair):
    """100 idle clients wrote to the old primary; after promotion + stop, all write at once, each lands
    on the new primary with no error, and no committed write is lost or doubled. The pool may open a
    server per client, so many server logins choose a host while pgrelay re-checks the hosts."""
    relay = start_relay(make_relay, pair, default_pool_size=CLIENTS)
    clients = [connect(relay.dsn()) for _ in range(CLIENTS)]
    try:
        first = [write(conn, i, 1) for i, conn in enumerate(clients)]
        assert first == [pair.primary.port] * CLIENTS

        pair.fail_over()

        # All 100 clients write at once: the pool's new servers must all find the new primary.
        def second_write(i):
            try:
                return write(clients[i], i, 2)
            except psycopg2.Error as exc:
                return outcome(exc)

        with ThreadPoolExecutor(20) as ex:
            second = list(ex.map(second_write, range(CLIENTS)))
        assert Counter(second) == {pair.standby.port: CLIENTS}, f"second-round writes: {Counter(second)}"
        got = rows(pair.standby)
        # Every committed first-round write survived, none was applied twice, and every second-round
        # write went to the new primary.
        assert len(got) == 2 * CLIENTS
        assert got == sorted([(i, 1, pair.primary.port) for i in range(CLIENTS)]
                             + [(i, 2, pair.standby.port) for i in range(CLIENTS)])
        assert all(conn.closed == 0 for conn in clients)
    finally:
        for conn in clients:
            conn.close()
    # A fresh client after the failover also lands on the new primary.
    fresh = connect(relay.dsn())
    assert write(fresh, CLIENTS, 1) == pair.standby.port
    fresh.close()
    assert f"host 127.0.0.1:{pair.standby.port} is now primary" in relay.log()


def test_clients_recover_when_the_standby_is_promoted_after_the_primary_died(make_relay, pair):
    """Unplanned failover: the primary crashes, pgrelay sees it down, and only then is the standby
    promoted. During the outage each write gets ERROR 08006 "no primary found" and its client stays
    connected; once pgrelay has seen the new primary, every client's next write lands there."""
    relay = start_relay(make_relay, pair)
    clients = [connect(relay.dsn()) for _ in range(10)]
    try:
        assert [write(conn, i, 1) for i, conn in enumerate(clients)] == [pair.primary.port] * 10
        pair.wait_caught_up()
        stop_now(pair.primary, "immediate")
        wait_until(lambda: f"host 127.0.0.1:{pair.primary.port} is now down" in relay.log(),
                   message="pgrelay to see the primary down")

        def attempt(i):
            try:
                return write(clients[i], i, 2)
            except psycopg2.Error as exc:
                return outcome(exc)

        outage = [attempt(i) for i in range(3)]
        outage_closed = [clients[i].closed for i in range(3)]
        pair.standby.promote()
        wait_until(lambda: f"host 127.0.0.1:{pair.standby.port} is now primary" in relay.log(),
                   message="pgrelay to see the promoted standby")
        after = [attempt(i) for i in range(10)]
        no_primary = "ConnectionFailure 08006: no primary found for postgres/postgres"
        assert (outage, outage_closed, after) == ([no_primary] * 3, [0] * 3, [pair.standby.port] * 10), \
            f"during the outage: {outage}, closed: {outage_closed}; after the promotion: {after}"
        assert rows(pair.standby, "round = 2") == [(i, 2, pair.standby.port) for i in range(10)]
    finally:
        for conn in clients:
            conn.close()


# -- a transaction in flight when the primary goes away --------------------------------------

IN_TX_INSERT = "INSERT INTO writes VALUES ({k}, 1, inet_server_port())"
NEXT_TX_INSERT = "INSERT INTO writes VALUES ({k}, 2, inet_server_port()) RETURNING port"
SLEEP = "SELECT pg_sleep(5)"


def via_psycopg2(dsn: str, k: int, out: dict) -> None:
    conn = connect(dsn)
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(IN_TX_INSERT.format(k=k))
        try:
            cur.execute(SLEEP)
            out["error"] = None
        except psycopg2.Error as exc:
            out["error"] = (exc.pgcode, exc.diag.message_primary)
        try:
            cur.execute("BEGIN")
            cur.execute(NEXT_TX_INSERT.format(k=k))
            out["next_port"] = cur.fetchone()[0]
            cur.execute("COMMIT")
        except psycopg2.Error as exc:
            out["next_port"] = outcome(exc)
    conn.close()


def via_psycopg3(dsn: str, k: int, out: dict) -> None:
    import psycopg
    with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
        conn.execute("BEGIN")
        conn.execute(IN_TX_INSERT.format(k=k))
        try:
            conn.execute(SLEEP)
            out["error"] = None
        except psycopg.Error as exc:
            out["error"] = (exc.sqlstate, exc.diag.message_primary)
        try:
            with conn.transaction():
                out["next_port"] = conn.execute(NEXT_TX_INSERT.format(k=k)).fetchone()[0]
        except psycopg.Error as exc:
            out["next_port"] = f"{type(exc).__name__} {exc.sqlstate}: {exc.diag.message_primary or exc}"


def via_asyncpg(port: int, k: int, out: dict) -> None:
    import asyncio

    import asyncpg

    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres",
                                     statement_cache_size=0)
        try:
            await conn.execute("BEGIN")
            await conn.execute(IN_TX_INSERT.format(k=k))
            try:
                await conn.fetchval(SLEEP)
                out["error"] = None
            except asyncpg.PostgresError as exc:
                out["error"] = (exc.sqlstate, exc.message)
            try:
                await conn.execute("BEGIN")
                out["next_port"] = await conn.fetchval(NEXT_TX_INSERT.format(k=k))
                await conn.execute("COMMIT")
            except asyncpg.PostgresError as exc:
                out["next_port"] = f"{type(exc).__name__} {exc.sqlstate}: {exc.message}"
        finally:
            await conn.close()

    asyncio.run(run())


def via_wire(port: int, k: int, out: dict) -> None:
    """Every ErrorResponse (severity, SQLSTATE, message) the client receives up to ReadyForQuery."""
    raw = RawClient(port, timeout=15)
    raw.login()
    assert raw.query("BEGIN")[-1] == (b"Z", b"T")
    assert raw.query(IN_TX_INSERT.format(k=k))[-1] == (b"Z", b"T")
    replies = raw.query(SLEEP)
    errors = [error_fields(body) for kind, body in replies if kind == b"E"]
    out["wire"] = [(e["S"], e["C"], e["M"]) for e in errors]
    out["status"] = replies[-1][1]
    out["error"] = (errors[-1]["C"], errors[-1]["M"]) if errors else None
    replies = []
    try:
        for sql in ("BEGIN", NEXT_TX_INSERT.format(k=k), "COMMIT"):
            replies += raw.query(sql)
    except EOFError:
        replies.append((b"closed", b""))
    errors = [error_fields(body) for kind, body in replies if kind == b"E"]
    if errors:
        out["next_port"] = f"{errors[0]['S']} {errors[0]['C']}: {errors[0]['M']}"
    else:
        out["next_port"] = int(next(body for kind, body in replies if kind == b"D")[6:])
    raw.close()


@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
def test_transaction_in_flight_gets_08006_and_the_client_stays(make_relay, pair, stop_mode):
    """Each client is inside BEGIN with an uncommitted row and pg_sleep(5) running when the primary
    stops: it gets one ERROR, stays connected, and its next transaction commits on the new primary.
    fast = planned switchover: PostgreSQL sends FATAL 57P01 to its backends' clients first, and the
    ERROR carries that SQLSTATE and message (issue 10 item 5); immediate = crash-like (a WARNING
    notice only): ERROR 08006 "server connection lost: ..."."""
    relay = start_relay(make_relay, pair)
    runners = {
        "psycopg2": (via_psycopg2, relay.dsn()),
        "psycopg3": (via_psycopg3, relay.dsn()),
        "asyncpg": (via_asyncpg, relay.port),
        "wire": (via_wire, relay.port),
    }
    outcomes = {name: {} for name in runners}
    threads = []
    for k, (name, (fn, target)) in enumerate(runners.items(), start=1):
        thread = threading.Thread(target=fn, args=(target, k, outcomes[name]), daemon=True)
        thread.start()
        threads.append(thread)
    wait_until(lambda: pair.primary.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                         f"AND query = '{SLEEP}'") == str(len(runners)),
               message="every client's pg_sleep to run on the primary")
    started = time.monotonic()
    pair.wait_caught_up()
    pair.standby.promote()
    stop_now(pair.primary, stop_mode)
    for thread in threads:
        thread.join(15)
    assert not any(t.is_alive() for t in threads), outcomes
    assert time.monotonic() - started < 4.5, "the errors came only when pg_sleep would have ended"

    errors = {name: o.get("error") for name, o in outcomes.items()}
    assert all(e is not None for e in errors.values()), outcomes
    if stop_mode == "fast":
        got = {name: (e[0], e[1] == ADMIN_SHUTDOWN[2]) for name, e in errors.items()}
        sqlstate = "57P01"
    else:
        got = {name: (e[0], e[1].startswith("server connection lost")) for name, e in errors.items()}
        sqlstate = "08006"
    # On the wire: exactly one error for the in-flight query, an ERROR (the client stays), then
    # ReadyForQuery idle (the transaction is gone).
    got["wire errors"] = [(s, c) for s, c, _ in outcomes["wire"]["wire"]]
    expected = {name: (sqlstate, True) for name in runners}
    expected["wire errors"] = [("ERROR", sqlstate)]
    assert got == expected, f"errors seen: {errors}; on the wire: {outcomes['wire']['wire']}"
    assert outcomes["wire"]["status"] == b"I"

    next_ports = {name: o.get("next_port") for name, o in outcomes.items()}
    assert next_ports == {name: pair.standby.port for name in runners}, f"next transactions: {next_ports}"
    # The uncommitted first-round rows never reached the new primary; the next transactions did.
    assert rows(pair.standby) == [(k, 2, pair.standby.port) for k in range(1, len(runners) + 1)]
    assert f"host 127.0.0.1:{pair.standby.port} is now primary" in relay.log()


def read_errors_to_eof(raw: RawClient) -> list[tuple[str, str, str]]:
    """(severity, SQLSTATE, message) of each ErrorResponse until the peer closes the connection."""
    out = []
    while True:
        try:
            kind, body = raw.read_message()
        except (EOFError, ConnectionResetError):
            return out
        if kind == b"E":
            fields = error_fields(body)
            out.append((fields["S"], fields["C"], fields["M"]))


ADMIN_SHUTDOWN = ("FATAL", "57P01", "terminating connection due to administrator command")


def test_idle_in_transaction_client_is_disconnected(make_relay, pair):
    """Nothing in flight to answer with an ERROR: a client idle inside BEGIN loses its session and is
    disconnected with the server's own FATAL only, as PostgreSQL does (no second "server conn
    crashed?", issue 10 item 5); its row never reaches the new primary."""
    relay = start_relay(make_relay, pair)
    conn = connect(relay.dsn())
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(IN_TX_INSERT.format(k=1))
    raw = RawClient(relay.port)
    raw.login()
    raw.query("BEGIN")
    assert raw.query(IN_TX_INSERT.format(k=2))[-1] == (b"Z", b"T")

    pair.fail_over()

    # PostgreSQL's own FATAL (relayed as it came), then the connection closes.
    assert read_errors_to_eof(raw) == [ADMIN_SHUTDOWN]
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")
    assert conn.closed != 0
    assert rows(pair.standby) == []
    fresh = connect(relay.dsn())
    assert write(fresh, 3, 1) == pair.standby.port
    fresh.close()


# -- direct clients ------------------------------------------------------------------------------

def test_direct_clients_are_disconnected_and_reconnect_to_the_new_primary(make_relay, pair):
    direct_port = free_port()
    relay = start_relay(make_relay, pair, extra_sections=f"[listeners]\ndirect = port={direct_port} role=direct\n")
    direct = psycopg2.connect(relay.dsn(), port=direct_port, connect_timeout=10)
    direct.autocommit = True
    assert write(direct, 1, 1) == pair.primary.port
    raw = RawClient(direct_port)
    raw.login()
    replies = raw.query("SELECT inet_server_port()")
    assert int(next(body for kind, body in replies if kind == b"D")[6:]) == pair.primary.port

    pair.fail_over()

    # The session is gone with the server: the client gets the server's FATAL and the close, as from
    # PostgreSQL itself (no second "server conn crashed?").
    assert read_errors_to_eof(raw) == [ADMIN_SHUTDOWN]
    with pytest.raises(psycopg2.OperationalError), direct.cursor() as cur:
        cur.execute("SELECT 1")
    assert direct.closed != 0
    assert "closing because: server closed the connection (server sent FATAL: terminating connection due " \
        "to administrator command)" in relay.log()

    after = psycopg2.connect(relay.dsn(), port=direct_port, connect_timeout=10)
    after.autocommit = True
    assert write(after, 2, 1) == pair.standby.port
    after.close()
    assert rows(pair.standby) == [(1, 1, pair.primary.port), (2, 1, pair.standby.port)]


# -- promotion while the old primary still runs ---------------------------------------------------

def transaction(conn, k: int, rnd: int) -> int:
    """A write transaction held open briefly, so that concurrent clients need several servers."""
    with conn.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("INSERT INTO writes VALUES (%s, %s, inet_server_port()) RETURNING port", (k, rnd))
        port = cur.fetchone()[0]
        cur.execute("SELECT pg_sleep(0.2)")
        cur.execute("COMMIT")
        return port


def promote_without_stop(make_relay, pair: Pair, order) -> tuple[list[int], list[int]]:
    """Three clients write (so the pool holds servers to the old primary), the standby is promoted
    while the old primary keeps running, and once pgrelay has seen it, ten clients write at once."""
    relay = start_relay(make_relay, pair, order=order)
    clients = [connect(relay.dsn()) for _ in range(10)]
    try:
        with ThreadPoolExecutor(10) as ex:
            before = list(ex.map(lambda k: transaction(clients[k], k, 1), range(3)))
        pair.wait_caught_up()
        pair.standby.promote()
        wait_until(lambda: f"host 127.0.0.1:{pair.standby.port} is now primary" in relay.log(),
                   message="pgrelay to see the promotion")
        assert pair.primary.psql("SELECT pg_is_in_recovery()") == "f"  # two primaries now
        with ThreadPoolExecutor(10) as ex:
            after = list(ex.map(lambda k: transaction(clients[k], k, 2), range(10)))
    finally:
        for conn in clients:
            conn.close()
    return before, after


def test_promotion_without_stop_keeps_writes_on_the_first_listed_primary(make_relay, pair):
    """pgrelay takes the first listed host that is not in recovery: with the old primary listed
    first, every write stays there and the promoted standby gets none."""
    before, after = promote_without_stop(make_relay, pair, order=(pair.primary, pair.standby))
    assert before == [pair.primary.port] * 3
    assert after == [pair.primary.port] * 10
    assert len(rows(pair.primary, "round = 2")) == 10
    assert rows(pair.standby, "round = 2") == []


def test_promotion_without_stop_never_splits_writes_between_primaries(make_relay, pair):
    """With the standby listed first, the promoted standby becomes pgrelay's primary: every later
    transaction must go there, none to the old primary through servers left in the pool (writes
    split between two primaries are lost on whichever is discarded)."""
    before, after = promote_without_stop(make_relay, pair, order=(pair.standby, pair.primary))
    assert before == [pair.primary.port] * 3
    assert sorted(after) == [pair.standby.port] * 10, (
        f"writes went to both primaries: {after.count(pair.primary.port)} to the old one "
        f"({pair.primary.port}), {after.count(pair.standby.port)} to the new one ({pair.standby.port})")
    assert rows(pair.primary, "round = 2") == []
