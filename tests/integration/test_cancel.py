"""Cancel requests through pgrelay: psycopg2 and psql cancels, cancels racing with server release, unknown cancel keys."""

from __future__ import annotations

import os
import queue
import random
import signal
import struct
import subprocess
import threading
import time

import psycopg2
import psycopg2.errors
import pytest

from ..support import RawClient, connect, scalar, wait_until

CANCEL_REQUEST_CODE = 80877102
USER_CANCEL = "canceling statement due to user request"




def active_on_server(pg, application_name: str) -> int:
    """How many backends are running a query for clients with this application_name (asked directly)."""
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                       f"AND application_name = '{application_name}'"))


def read_to_eof(raw: RawClient, timeout: float = 5) -> bytes:
    """Everything the peer sends until it closes the connection."""
    raw.sock.settimeout(timeout)
    data = b""
    while True:
        chunk = raw.sock.recv(65536)
        if not chunk:
            return data
        data += chunk


class Outcome:
    """What a query run in a thread ended with."""

    def __init__(self, conn, sql):
        self.exc: BaseException | None = None
        self.row = None
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(conn, sql), daemon=True)
        self.thread.start()

    def _run(self, conn, sql):
        start = time.monotonic()
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                self.row = cur.fetchone()
        except BaseException as exc:  # recorded, and asserted on by the test
            self.exc = exc
        self.elapsed = time.monotonic() - start

    def wait(self, timeout: float) -> "Outcome":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"query still running after {timeout}s"
        return self


@pytest.mark.smoke
def test_cancel_through_pooler(relay, pg):
    conn = connect(relay, application_name="cancel_basic")
    outcome = Outcome(conn, "SELECT pg_sleep(10)")
    wait_until(lambda: active_on_server(pg, "cancel_basic") == 1, message="the query to run on the server")
    sent = time.monotonic()
    conn.cancel()
    outcome.wait(5)
    assert time.monotonic() - sent < 3
    assert isinstance(outcome.exc, psycopg2.errors.QueryCanceled), outcome.exc
    assert outcome.exc.pgcode == "57014"
    assert USER_CANCEL in str(outcome.exc)
    assert scalar(conn, "SELECT 40 + 2") == 42
    conn.close()


def test_psql_cancel_on_sigint(relay, pg):
    env = dict(os.environ, PGAPPNAME="psql_sigint", PGCONNECT_TIMEOUT="10")
    proc = subprocess.Popen(["psql", "-X", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres",
                             "-d", "postgres", "-c", "select pg_sleep(10)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: active_on_server(pg, "psql_sigint") == 1, message="psql's query to run")
        time.sleep(1)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - sent < 4
    assert proc.returncode == 1, (proc.returncode, out, err)
    assert USER_CANCEL in err, err
    assert active_on_server(pg, "psql_sigint") == 0


@pytest.mark.smoke
def test_cancel_spam_does_not_hit_next_client(make_relay, pg):
    """PgBouncer's test_cancel_race: with one server, 100 cancels for client A are in flight when A's
    query ends and the server goes to client B; none may cancel B's query."""
    relay = make_relay(settings={"default_pool_size": 1})
    conn_a = connect(relay, application_name="spam_a")
    conn_b = connect(relay, application_name="spam_b")
    a = Outcome(conn_a, "SELECT pg_sleep(10)")
    wait_until(lambda: active_on_server(pg, "spam_a") == 1, message="A's query to run")
    b = Outcome(conn_b, "SELECT pg_sleep(0.5), 'b done'")
    time.sleep(0.2)  # B is queued behind A for the only server
    errors = []

    def fire():
        try:
            conn_a.cancel()
        except psycopg2.Error as exc:
            errors.append(exc)

    cancellers = [threading.Thread(target=fire) for _ in range(100)]
    for t in cancellers:
        t.start()
    for t in cancellers:
        t.join(10)
    a.wait(5)
    b.wait(5)
    assert errors == []
    assert isinstance(a.exc, psycopg2.errors.QueryCanceled), a.exc
    assert b.exc is None, f"client B got {b.exc!r} although only A was cancelled"
    assert b.row == ("", "b done")
    assert scalar(conn_a, "SELECT 1") == 1
    assert scalar(conn_b, "SELECT 2") == 2
    conn_a.close()
    conn_b.close()


@pytest.mark.timeout(120)
def test_cancel_race_many_clients(make_relay):
    """50 clients fire cancels at random moments (before, during, right after their short queries)
    while victim clients, which never cancel, run longer queries from the same small pool. Every
    server moves between clients constantly, so a cancel delivered to a server after its client's
    query ended would cancel a victim's query: victims must never see 57014.

    Checked against a pgrelay patched to hand a server out while a cancel for it is still in
    flight (no cancel_wait): victims got 57014 in every run.
    """
    relay = make_relay(settings={"default_pool_size": 5, "max_client_conn": 500})
    duration = 3.0
    stop = threading.Event()
    lock = threading.Lock()
    stats = {"canceller_queries": 0, "canceller_canceled": 0, "cancels_sent": 0, "victim_queries": 0}
    victim_failures: list[str] = []
    canceller_failures: list[str] = []

    def count(key, n=1):
        with lock:
            stats[key] += n

    def canceller(conn, seed):
        rnd = random.Random(seed)
        pending: queue.Queue = queue.Queue()

        def helper():  # fires cancels for this client at a delay, whatever the query is doing by then
            while True:
                item = pending.get()
                if item is None:
                    return
                delay, burst = item
                time.sleep(delay)
                try:
                    for _ in range(burst):
                        conn.cancel()
                except psycopg2.Error as exc:
                    canceller_failures.append(f"cancel failed: {exc!r}")
                    return
                count("cancels_sent", burst)

        helper_thread = threading.Thread(target=helper, daemon=True)
        helper_thread.start()
        cur = conn.cursor()
        latency = 0.05  # running average of this client's query time, queueing included
        try:
            while not stop.is_set():
                choice = rnd.random()
                if choice < 0.5:
                    # Aim at the end of the query, when the server is about to be released: most of
                    # these cancels reach pgrelay while the client is linked and arrive at PostgreSQL
                    # around (or after) the moment the query completes.
                    pending.put((latency * rnd.uniform(0.5, 1.1), rnd.randint(1, 3)))
                start = time.monotonic()
                try:
                    cur.execute("SELECT pg_sleep(0.005)")
                    count("canceller_queries")
                except psycopg2.errors.QueryCanceled:
                    count("canceller_canceled")
                latency = 0.8 * latency + 0.2 * (time.monotonic() - start)
                if choice > 0.7:
                    conn.cancel()  # right after the query finished: the server may already be released
                    count("cancels_sent")
        except Exception as exc:
            canceller_failures.append(repr(exc))
        finally:
            pending.put(None)
            helper_thread.join(10)

    def victim(conn, n):
        cur = conn.cursor()
        while not stop.is_set():
            try:
                cur.execute(f"SELECT pg_sleep(0.02) /* victim {n} */")
                count("victim_queries")
            except Exception as exc:
                victim_failures.append(f"victim {n}: {type(exc).__name__} {getattr(exc, 'pgcode', None)}: {exc}")
                return

    cancellers = [connect(relay, application_name="canceller") for _ in range(50)]
    victims = [connect(relay, application_name="victim") for _ in range(10)]
    threads = [threading.Thread(target=canceller, args=(c, i)) for i, c in enumerate(cancellers)]
    threads += [threading.Thread(target=victim, args=(c, i)) for i, c in enumerate(victims)]
    for t in threads:
        t.start()
    time.sleep(duration)
    stop.set()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    for conn in cancellers + victims:
        conn.close()

    assert victim_failures == [], f"{stats}\n" + "\n".join(victim_failures[:10])
    assert canceller_failures == [], canceller_failures[:10]
    # The run really exercised cancels landing on servers, and victims really ran queries.
    assert stats["canceller_canceled"] >= 10, stats
    assert stats["victim_queries"] >= 50, stats
    conn = connect(relay)
    assert scalar(conn, "SELECT 1") == 1
    conn.close()


def test_unknown_cancel_key_ignored(relay, pg):
    conn = connect(relay, application_name="not_cancelled")
    outcome = Outcome(conn, "SELECT pg_sleep(0.8), 'finished'")
    wait_until(lambda: active_on_server(pg, "not_cancelled") == 1, message="the query to run")
    for _ in range(5):
        raw = RawClient(relay.port)
        raw.send(struct.pack("!II", 16, CANCEL_REQUEST_CODE) + os.urandom(8))
        assert read_to_eof(raw) == b"", "pgrelay must close a cancel connection without answering"
        raw.close()
    outcome.wait(5)
    assert outcome.exc is None, outcome.exc
    assert outcome.row == ("", "finished")
    assert scalar(conn, "SELECT 5") == 5
    conn.close()
    fresh = connect(relay)
    assert scalar(fresh, "SELECT 6") == 6
    fresh.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_cancel_then_next_query_is_never_cancelled(make_relay, mode):
    """libpq's cancel returns once the cancel connection closes; PostgreSQL closes it only after the
    cancel was delivered, so a query sent after that can never be the one cancelled. pgrelay keeps
    the client's cancel connection open until the forwarded cancel is done, to keep that promise."""
    relay = make_relay({"pool_mode": mode, "default_pool_size": "2"})
    conn = connect(relay)
    rng = random.Random(7)
    late = []
    for i in range(80):
        first = Outcome(conn, "select pg_sleep(0.02)")
        time.sleep(rng.uniform(0.0, 0.04))  # before, during or just after the first query ends
        conn.cancel()
        first.wait(5)
        assert first.exc is None or isinstance(first.exc, psycopg2.errors.QueryCanceled), first.exc
        try:
            assert scalar(conn, "select pg_sleep(0.05) is not null")
        except psycopg2.errors.QueryCanceled:
            late.append(i)
    assert late == [], f"a late cancel hit the next query in rounds {late}"
    conn.close()


@pytest.mark.timeout(120)
def test_asyncpg_prepared_statements_stay_on_the_server_after_a_cancel(make_relay):
    """Transaction mode, one asyncpg client with its default statement cache: after a timeout (a
    cancel), the server waiting for the cancel goes back to its own client, so Parse and Bind of
    the next statement land on the same server."""
    import asyncio

    import asyncpg

    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "4"})

    async def run():
        conn = await asyncpg.connect(relay.url())
        try:
            for i in range(40):
                with pytest.raises(asyncio.TimeoutError):
                    await conn.fetchval("select pg_sleep(1)", timeout=0.05)
                assert await conn.fetchval("select $1::int + 0", i) == i
                assert await conn.fetchval("select $1::text || 'x'", str(i)) == f"{i}x"
        finally:
            await conn.close()

    asyncio.run(run())
