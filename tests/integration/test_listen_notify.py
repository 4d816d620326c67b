"""LISTEN/NOTIFY in transaction and statement pooling: the pool's listening server, fan-out, order, faults and bounds."""

from __future__ import annotations

import select
import struct
import threading
import time

import psycopg2
import pytest

from ..support import RawClient, connect, error_fields, query_message, scalar, wait_until


def notifications(conn, want: int, timeout: float = 20) -> list:
    """Poll `conn` until it holds `want` notifications (or the timeout); returns them all."""
    deadline = time.monotonic() + timeout
    while len(conn.notifies) < want and time.monotonic() < deadline:
        select.select([conn], [], [], 0.2)
        conn.poll()
    return list(conn.notifies)


def quiet(conn, seconds: float = 0.7) -> list:
    """What `conn` receives within `seconds` (used to show that nothing arrives)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        select.select([conn], [], [], 0.1)
        conn.poll()
    return list(conn.notifies)


def send(conn, channel: str, payload: str) -> int:
    """NOTIFY through `conn`; returns the pid of the backend that ran it (the sender's pid)."""
    return scalar(conn, "SELECT pg_backend_pid() FROM (SELECT pg_notify(%s, %s)) AS n", (channel, payload))


def listening_backends(pg) -> list[int]:
    """Backends of pgrelay's listening servers."""
    out = pg.psql("SELECT string_agg(pid::text, ',') FROM pg_stat_activity "
                  "WHERE application_name = 'pgrelay listening server'")
    return [int(p) for p in out.split(",") if p]


def raw_notifications(msgs) -> list[tuple[int, str, str]]:
    out = []
    for kind, body in msgs:
        if kind == b"A":
            pid = struct.unpack("!i", body[:4])[0]
            channel, payload = body[4:-1].split(b"\0")
            out.append((pid, channel.decode(), payload.decode()))
    return out


# -- the acceptance run ----------------------------------------------------------------------------

def test_hundred_listeners_ten_senders_none_lost_duplicated_or_misdelivered(make_relay, pg):
    relay = make_relay({"default_pool_size": 2})
    channels = ["alpha", "beta", "Gamma", "delta"]
    listeners, subscribed = [], []
    for i in range(100):
        conn = connect(relay)
        mine = {channels[i % 4]} | ({channels[(i + 1) % 4]} if i % 3 == 0 else set())
        if i % 10 == 9:
            mine = set()  # a tenth listen on nothing: they must get nothing
        with conn.cursor() as cur:
            for ch in sorted(mine):
                cur.execute(f'LISTEN "{ch}"' if ch != ch.lower() else f"LISTEN {ch.upper()}")  # quoted and folded
        listeners.append(conn)
        subscribed.append(mine)
    [listening_pid] = listening_backends(pg)  # one listening server for the whole pool

    per_sender = 30
    sent: dict[str, list] = {ch: [] for ch in channels}
    lock = threading.Lock()
    errors = []

    def sender(s: int) -> None:
        try:
            conn = connect(relay)
            for k in range(per_sender):
                ch = channels[(s + k) % 4]
                payload = f"{s}:{k}"
                pid = send(conn, ch, payload)
                with lock:
                    sent[ch].append((pid, payload))
            conn.close()
        except Exception as exc:  # reported by the main thread
            errors.append(exc)

    def worker(conns) -> None:
        """Listeners keep running transactions while notifications arrive."""
        try:
            for _ in range(10):
                for conn in conns:
                    conn.autocommit = False
                    with conn.cursor() as cur:
                        cur.execute("SELECT count(*) FROM pg_class")
                        cur.execute("SELECT pg_sleep(0.005)")
                    conn.commit()
                    conn.autocommit = True
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(s,)) for s in range(10)]
    threads.append(threading.Thread(target=worker, args=(listeners[:20],)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    total = sum(len(v) for v in sent.values())
    assert total == 10 * per_sender

    for conn, mine in zip(listeners, subscribed):
        want = sum(len(sent[ch]) for ch in mine)
        got = notifications(conn, want) if want else quiet(conn)
        got_tuples = [(n.pid, n.channel, n.payload) for n in got]
        assert len(got_tuples) == want, (mine, len(got_tuples), want)
        assert len(set(got_tuples)) == want  # no duplicates
        assert {n.channel for n in got} <= mine  # nothing it did not listen on
        for ch in mine:
            assert sorted((p, pl) for p, c, pl in got_tuples if c == ch) == sorted(sent[ch])  # with the sender's pid
        # order per sender preserved
        for s in range(10):
            seq = [int(pl.split(":")[1]) for _, _, pl in got_tuples if pl.startswith(f"{s}:")]
            assert seq == sorted(seq)
    # the NOTIFYs ran on the pool's servers, never on the listening server
    assert listening_pid not in {p for v in sent.values() for p, _ in v}
    for conn in listeners:
        conn.close()
    wait_until(lambda: not listening_backends(pg), message="the listening server to close")
    wait_until(lambda: "no client listens" in relay.log(), message="its close logged")


def test_own_notify_arrives_with_the_senders_pid_and_in_statement_mode(make_relay):
    for mode in ("transaction", "statement"):
        relay = make_relay({"pool_mode": mode, "default_pool_size": 1})
        conn = connect(relay)
        with conn.cursor() as cur:
            cur.execute("LISTEN me")
        pid = send(conn, "me", "myself")
        got = notifications(conn, 1)
        assert [(n.pid, n.channel, n.payload) for n in got] == [(pid, "me", "myself")]
        # the answer is PostgreSQL's: LISTEN twice is one registration
        with conn.cursor() as cur:
            cur.execute("LISTEN me")
            assert cur.statusmessage == "LISTEN"
        send(conn, "me", "once")
        assert [n.payload for n in notifications(conn, 2)] == ["myself", "once"]
        assert quiet(conn, 0.3)[2:] == []
        conn.close()


def test_unlisten_and_disconnect_stop_delivery(make_relay, pg):
    relay = make_relay({"default_pool_size": 2})
    a, b, sender = connect(relay), connect(relay), connect(relay)
    with a.cursor() as cur:
        cur.execute("LISTEN x")
        cur.execute("LISTEN y")
        cur.execute("UNLISTEN x")
        assert cur.statusmessage == "UNLISTEN"
    with b.cursor() as cur:
        cur.execute("LISTEN x")
    send(sender, "x", "1")
    send(sender, "y", "2")
    assert [(n.channel, n.payload) for n in notifications(b, 1)] == [("x", "1")]
    assert [(n.channel, n.payload) for n in notifications(a, 1)] == [("y", "2")]
    with a.cursor() as cur:
        cur.execute("UNLISTEN *")
        cur.execute("UNLISTEN nothing_listened")  # as PostgreSQL: not an error
    send(sender, "y", "3")
    send(sender, "x", "4")
    assert [n.payload for n in notifications(b, 2)] == ["1", "4"]
    assert len(quiet(a)) == 1  # nothing after UNLISTEN *
    b.close()  # the last listener leaves: the listening server closes
    wait_until(lambda: not listening_backends(pg), message="the listening server to close")
    send(sender, "x", "5")
    # a new listener brings it back
    with a.cursor() as cur:
        cur.execute("LISTEN x")
    send(sender, "x", "6")
    assert [n.payload for n in notifications(a, 2)][1:] == ["6"]
    for conn in (a, sender):
        conn.close()


def test_notifications_wait_for_the_end_of_what_the_server_sends(make_relay):
    """A listener inside a long query gets its notifications after that query's ReadyForQuery,
    never in the middle of its rows."""
    relay = make_relay({"default_pool_size": 2})
    raw = RawClient(relay.port)
    raw.login()
    assert [k for k, _ in raw.query("LISTEN busy")] == [b"C", b"Z"]
    raw.send(query_message("SELECT g, pg_sleep(0.002) FROM generate_series(1, 300) g"))
    time.sleep(0.1)
    sender = connect(relay)
    pids = [send(sender, "busy", str(i)) for i in range(5)]
    msgs = raw.read_until(b"Z")
    kinds = [k for k, _ in msgs]
    assert b"A" not in kinds  # held while the server answered
    assert kinds.count(b"D") == 300
    raw.sock.settimeout(10)
    got = []
    while len(got) < 5:
        got += raw_notifications([raw.read_message()])
    assert got == [(pid, "busy", str(i)) for i, pid in enumerate(pids)]
    raw.close()
    sender.close()


def test_listening_server_killed_comes_back_and_delivery_resumes(make_relay, pg):
    relay = make_relay({"default_pool_size": 2})
    listener, sender = connect(relay), connect(relay)
    with listener.cursor() as cur:
        cur.execute("LISTEN phoenix")
        cur.execute("LISTEN other")
    send(sender, "phoenix", "before")
    assert [n.payload for n in notifications(listener, 1)] == ["before"]
    [pid] = listening_backends(pg)
    pg.psql(f"SELECT pg_terminate_backend({pid})")
    wait_until(lambda: "notifications sent in between were lost" in relay.log(), timeout=20,
               message="the listening server to come back")
    new = wait_until(lambda: listening_backends(pg), message="a new listening server")
    assert new and new != [pid]
    wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {new[0]} AND state = 'idle' "
                               "AND query LIKE 'LISTEN %'") == "1", message="its LISTENs")
    send(sender, "phoenix", "after")
    send(sender, "other", "too")
    got = notifications(listener, 3)
    assert [(n.channel, n.payload) for n in got] == [("phoenix", "before"), ("phoenix", "after"), ("other", "too")]
    assert "listening server of postgres/postgres (pid" in relay.log() and " lost: " in relay.log()
    listener.close()
    sender.close()


def test_client_that_stops_reading_is_disconnected_and_memory_stays_bounded(make_relay):
    relay = make_relay({"default_pool_size": 2, "notify_queue_size": 262144})
    stuck = RawClient(relay.port)
    stuck.login()
    assert [k for k, _ in stuck.query("LISTEN flood")] == [b"C", b"Z"]
    good = connect(relay)
    with good.cursor() as cur:
        cur.execute("LISTEN flood")

    def rss_kb() -> int:
        with open(f"/proc/{relay.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    before = rss_kb()
    sender = connect(relay)
    payload = "p" * 7900
    count = 4000  # about 32 MB of notifications for a client that reads none
    batch = 20  # 158 kB a statement, under notify_queue_size even if the kernel takes none of it at once
    received = []
    peak = before
    with sender.cursor() as cur:
        for start in range(0, count, batch):
            cur.execute("SELECT count(pg_notify('flood', %s || g)) FROM generate_series(%s, %s) g",
                        (payload, start, start + batch - 1))
            peak = max(peak, rss_kb())
            # The reader keeps up: it has everything sent before the next statement (a reader that
            # falls notify_queue_size behind a burst is disconnected, as documented).
            received = notifications(good, start + batch, timeout=30)
            assert len(received) == start + batch  # the client that reads is not affected
    assert [n.payload for n in received[:2]] == [payload + "0", payload + "1"]
    assert "client does not read its notifications (notify_queue_size)" in relay.log()
    grown = max(peak, rss_kb()) - before
    assert grown < 16 * 1024, f"pgrelay grew by {grown} kB"
    assert stuck.closed(timeout=10)
    sender.close()
    good.close()


# -- names, as PostgreSQL reads them ---------------------------------------------------------------

def _listen_and_notify(conn, sender, listen_sql: str, notify_channel: str):
    conn.notices.clear()
    with conn.cursor() as cur:
        cur.execute(listen_sql)
        status = cur.statusmessage
    notices = list(conn.notices)
    with sender.cursor() as cur:  # NOTIFY, not pg_notify(): its name is truncated as LISTEN's is
        cur.execute('NOTIFY "%s"' % notify_channel.replace('"', '""'))
    got = notifications(conn, 1, timeout=1.5)
    with conn.cursor() as cur:
        cur.execute("UNLISTEN *")
    conn.notifies.clear()
    return status, notices, [n.channel for n in got]


@pytest.mark.parametrize("listen_sql, notify_channel", [
    ("LISTEN " + "a" * 64, "a" * 64),                        # unquoted, 64 bytes: truncated with a NOTICE
    ('LISTEN "' + "B" * 64 + '"', "B" * 64),                 # quoted, 64 bytes
    ("LISTEN " + "c" * 63, "c" * 63),                        # 63 bytes: as is
    ('LISTEN "' + "é" * 32 + '"', "é" * 32),                 # 64 bytes of UTF-8: cut at a character
    ("LISTEN MiXeD", "mixed"),                               # unquoted names fold to lower case
    ('LISTEN "MiXeD"', "MiXeD"),                             # quoted names keep their case
    ('LISTEN "MiXeD"', "mixed"),                             # ...and are another channel
    ('  /* c */ listen -- x\n "with ""quote"""  ;  ', 'with "quote"'),
])
def test_channel_names_behave_as_postgresql(make_relay, pg, listen_sql, notify_channel):
    relay = make_relay({"default_pool_size": 2})
    direct = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    direct.autocommit = True
    pooled, sender = connect(relay), connect(relay)
    try:
        expected = _listen_and_notify(direct, sender, listen_sql, notify_channel)
        assert _listen_and_notify(pooled, sender, listen_sql, notify_channel) == expected
    finally:
        for conn in (direct, pooled, sender):
            conn.close()
    assert "listening server" in relay.log()  # served by pgrelay, not by a pinned server


@pytest.mark.parametrize("sql", ["LISTEN select", 'LISTEN ""', "LISTEN", "UNLISTEN", "LISTEN *", "LISTEN a b",
                                 "LISTEN 'x'", "LISTEN /* open"])
def test_bad_listen_statements_get_postgresqls_error(make_relay, pg, sql):
    relay = make_relay({"default_pool_size": 1})
    direct = RawClient(pg.port)
    direct.login()
    pooled = RawClient(relay.port)
    pooled.login()
    want = error_fields(next(b for k, b in direct.query(sql) if k == b"E"))
    reply = pooled.query(sql)
    got = error_fields(next(b for k, b in reply if k == b"E"))
    assert (got["C"], got["M"]) == (want["C"], want["M"])
    assert reply[-1] == (b"Z", b"I")
    assert data_rows_ok(pooled)
    direct.close()
    pooled.close()


def data_rows_ok(raw) -> bool:
    return any(k == b"D" for k, _ in raw.query("SELECT 1"))


def test_pipelined_bytes_after_listen_wait_for_its_answer(make_relay):
    relay = make_relay({"default_pool_size": 1})
    raw = RawClient(relay.port)
    raw.login()
    raw.send(query_message("LISTEN pipe"))
    time.sleep(0.005)  # read apart (a LISTEN sharing a read with more queries goes to a server)
    raw.send(query_message("SELECT 'after'"))
    first = raw.read_until(b"Z")
    second = raw.read_until(b"Z")
    assert [k for k, _ in first] == [b"C", b"Z"] and first[0][1] == b"LISTEN\0"
    assert [k for k, _ in second][-1] == b"Z" and any(k == b"D" for k, _ in second)
    # LISTEN and a Terminate in one packet: the client leaves, nothing lingers
    raw2 = RawClient(relay.port)
    raw2.login()
    raw2.send(query_message("LISTEN gone") + b"X\0\0\0\4")
    assert raw2.closed()
    raw.close()


def test_listen_refused_when_no_server_may_be_opened(make_relay, pg):
    """max_db_connections counts the listening server: with none allowed, LISTEN gets an ERROR
    (53300) and the client stays usable; an unused server of the pool makes way for it."""
    one = make_relay({"default_pool_size": 1, "max_db_connections": 1}, name="one")
    conn = connect(one)
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as info:
            cur.execute("LISTEN never")  # it would leave the pool no server at all
    assert info.value.pgcode == "53300" and "max_db_connections" in str(info.value)
    assert scalar(conn, "SELECT 'still served'") == "still served"
    conn.close()

    relay = make_relay({"default_pool_size": 2, "max_db_connections": 2})
    busy = [connect(relay), connect(relay)]
    for conn in busy:
        conn.autocommit = False
        scalar(conn, "SELECT 1")  # each holds one of the two servers
    other = connect(relay)
    with other.cursor() as cur:
        with pytest.raises(psycopg2.Error) as info:
            cur.execute("LISTEN nope")
    assert info.value.pgcode == "53300"
    assert not listening_backends(pg)
    for conn in busy:
        conn.commit()
        conn.autocommit = True
    with other.cursor() as cur:
        cur.execute("LISTEN yes")  # an idle server of the pool is closed to make room
    assert len(listening_backends(pg)) == 1
    pids = {send(conn, "yes", "ok") for conn in busy}  # the pool goes on with one server
    assert len(pids) == 1
    assert [(n.pid, n.payload) for n in notifications(other, 2)] == [(pids.pop(), "ok")] * 2
    for conn in busy + [other]:
        conn.close()


def test_session_mode_passes_listen_through(make_relay, pg):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})
    conn, sender = connect(relay), connect(relay)
    with conn.cursor() as cur:
        cur.execute("LISTEN sess")
        cur.execute("SELECT pg_listening_channels()")
        assert cur.fetchall() == [("sess",)]  # its own server listens
    pid = send(sender, "sess", "s")
    assert [(n.pid, n.payload) for n in notifications(conn, 1)] == [(pid, "s")]
    assert "listening server" not in relay.log()
    conn.close()
    sender.close()


def test_listen_and_unlisten_inside_transactions_of_a_listening_client(make_relay, pg):
    """psycopg2 without autocommit: a LISTEN it has is answered by pgrelay (no duplicate, no pin);
    an UNLISTEN takes effect at COMMIT and not at all after ROLLBACK; notifications wait for the
    end of the transaction: all as PostgreSQL does it (a direct connection runs the same steps)."""
    relay = make_relay({"default_pool_size": 2})
    sender = connect(relay)

    def scenario(conn) -> list[str]:
        with conn.cursor() as cur:
            cur.execute("LISTEN tx")
        conn.autocommit = False
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            cur.execute("LISTEN tx")  # again, inside a transaction
            assert cur.statusmessage == "LISTEN"
        conn.commit()
        send(sender, "tx", "1")
        assert [n.payload for n in notifications(conn, 1)] == ["1"]  # once, not twice
        assert len(quiet(conn, 0.3)) == 1
        with conn.cursor() as cur:
            cur.execute("UNLISTEN tx")
            send(sender, "tx", "2")  # held until the transaction ends, then delivered: still listening
            assert len(quiet(conn, 0.3)) == 1
        conn.rollback()  # the UNLISTEN is undone
        send(sender, "tx", "3")
        notifications(conn, 3)
        with conn.cursor() as cur:
            cur.execute("UNLISTEN tx")
            send(sender, "tx", "4")  # committed while its transaction runs: gone with the UNLISTEN
        conn.commit()
        send(sender, "tx", "5")
        quiet(conn)
        with conn.cursor() as cur:
            cur.execute("LISTEN tx")
        conn.commit()
        with conn.cursor() as cur:
            cur.execute("UNLISTEN *")
            cur.execute("SELECT 1")
        conn.commit()
        send(sender, "tx", "6")
        return [n.payload for n in quiet(conn)]

    direct = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    direct.autocommit = True
    pooled = connect(relay)
    try:
        expected = scenario(direct)
        assert expected == ["1", "2", "3"]
        assert scenario(pooled) == expected
        with pooled.cursor() as cur:
            cur.execute("SELECT pg_listening_channels()")
            assert cur.fetchall() == []  # its pooled server never LISTENed
    finally:
        for conn in (direct, pooled, sender):
            conn.close()


def test_a_latin1_client_gets_its_notifications_in_latin1(make_relay, pg):
    relay = make_relay({"default_pool_size": 2})
    direct = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    pooled, sender = connect(relay), connect(relay)
    try:
        for conn in (direct, pooled):
            conn.autocommit = True
            conn.set_client_encoding("LATIN1")
            with conn.cursor() as cur:
                cur.execute('LISTEN "café"')
        pid = send(sender, "café", "olé ü")
        for conn in (direct, pooled):
            assert [(n.pid, n.channel, n.payload) for n in notifications(conn, 1)] == [(pid, "café", "olé ü")]
    finally:
        for conn in (direct, pooled, sender):
            conn.close()


def test_session_state_allow_leaves_listen_to_the_server_as_pgbouncer_does(make_relay):
    relay = make_relay({"default_pool_size": 1, "session_state": "allow"})
    conn = connect(relay)
    with conn.cursor() as cur:
        cur.execute("LISTEN leaks")
        cur.execute("SELECT pg_listening_channels()")
        assert cur.fetchall() == [("leaks",)]  # the pooled server itself listens (unsafe, documented)
    conn.close()
    assert "listening server" not in relay.log()


def test_psycopg3_listens_through_the_transaction_port(make_relay, pg):
    import psycopg
    relay = make_relay({"default_pool_size": 1})
    with psycopg.connect(relay.dsn(), autocommit=True) as conn, psycopg.connect(relay.dsn(), autocommit=True) as sender:
        conn.execute("LISTEN p3")
        pid = sender.execute("SELECT pg_backend_pid() FROM (SELECT pg_notify('p3', 'three')) AS n").fetchone()[0]
        got = [(n.pid, n.channel, n.payload) for n in conn.notifies(timeout=10, stop_after=1)]
        assert got == [(pid, "p3", "three")]
        assert conn.execute("SELECT pg_listening_channels()").fetchall() == []  # not on a pooled server
    wait_until(lambda: not listening_backends(pg), message="the listening server to close")


def test_listening_server_login_failure_is_the_clients_error(make_relay, pg):
    """The listening server cannot log in (the role's CONNECTION LIMIT is taken by the pool's
    server): the LISTEN gets PostgreSQL's error as an ERROR, the client stays usable, and nothing
    is left registered."""
    pg.psql("DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'notify_one') "
            "THEN CREATE ROLE notify_one LOGIN CONNECTION LIMIT 1; END IF; END$$")
    relay = make_relay({"default_pool_size": 1, "server_login_retry": 1})
    conn = connect(relay, user="notify_one")
    assert scalar(conn, "SELECT 1") == 1  # the pool's one server is up and idle
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as info:
            cur.execute("LISTEN limited")
    assert info.value.pgcode == "53300" and "too many connections for role" in str(info.value)
    assert scalar(conn, "SELECT 'still served'") == "still served"
    assert "login failed" in relay.log()
    time.sleep(1.5)  # no retry: nobody listens
    assert relay.log().count("login failed") == 1
    conn.close()


# -- the extended protocol (asyncpg's add_listener) ------------------------------------------------

def _pinned(relay) -> int:
    conn = psycopg2.connect(relay.dsn(dbname="pgbouncer"), connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW ROUTES")
            names = [d[0] for d in cur.description]
            return sum(dict(zip(names, r))["pinned"] for r in cur.fetchall()
                       if dict(zip(names, r))["database"] == "postgres")
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["transaction", "statement"])
def test_asyncpg_add_listener_is_served_without_pinning(make_relay, pg, mode):
    """asyncpg's add_listener (Parse, Describe, Flush, then Bind, Execute, Sync; named with its
    statement cache, unnamed without) on a pool of one server: notifications sent directly to
    PostgreSQL arrive with the sender's pid, neither client is pinned, both keep being served,
    and remove_listener stops delivery."""
    import asyncio

    import asyncpg
    relay = make_relay({"pool_mode": mode, "default_pool_size": 1, "admin_users": "postgres"})
    direct = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    direct.autocommit = True
    sender_pid = scalar(direct, "SELECT pg_backend_pid()")

    async def main():
        kw = dict(host="127.0.0.1", port=relay.port, user="postgres", database="postgres")
        a = await asyncpg.connect(**kw)                          # named statements (its default cache)
        b = await asyncpg.connect(**kw, statement_cache_size=0)  # unnamed statements
        got_a, got_b = asyncio.Queue(), asyncio.Queue()

        def on_a(conn, pid, channel, payload):
            got_a.put_nowait((pid, channel, payload))

        def on_b(conn, pid, channel, payload):
            got_b.put_nowait((pid, channel, payload))

        await a.add_listener("ext_a", on_a)
        await a.add_listener("Ext Both", on_a)
        await b.add_listener("Ext Both", on_b)
        await b.add_listener("ext_b", on_b)
        assert _pinned(relay) == 0
        # one server serves both, in turns: neither holds it
        for _ in range(3):
            assert await asyncio.wait_for(a.fetchval("SELECT 1"), 5) == 1
            assert await asyncio.wait_for(b.fetchval("SELECT 2"), 5) == 2
        assert await a.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0  # not on the pooled server
        for channel, payload in (("ext_a", "1"), ("Ext Both", "2"), ("ext_b", "3")):
            direct.cursor().execute("SELECT pg_notify(%s, %s)", (channel, payload))
        assert [await asyncio.wait_for(got_a.get(), 10) for _ in range(2)] == [
            (sender_pid, "ext_a", "1"), (sender_pid, "Ext Both", "2")]
        assert [await asyncio.wait_for(got_b.get(), 10) for _ in range(2)] == [
            (sender_pid, "Ext Both", "2"), (sender_pid, "ext_b", "3")]
        await a.remove_listener("Ext Both", on_a)
        await b.remove_listener("ext_b", on_b)
        direct.cursor().execute("SELECT pg_notify('Ext Both', '4'), pg_notify('ext_b', '5'), pg_notify('ext_a', '6')")
        assert await asyncio.wait_for(got_b.get(), 10) == (sender_pid, "Ext Both", "4")
        assert await asyncio.wait_for(got_a.get(), 10) == (sender_pid, "ext_a", "6")
        await asyncio.sleep(0.7)
        assert got_a.empty() and got_b.empty()  # nothing after remove_listener
        # listening again after remove_listener (asyncpg binds its cached statement: no Parse)
        await a.add_listener("Ext Both", on_a)
        direct.cursor().execute("SELECT pg_notify('Ext Both', '7')")
        assert await asyncio.wait_for(got_a.get(), 10) == (sender_pid, "Ext Both", "7")
        assert await asyncio.wait_for(got_b.get(), 10) == (sender_pid, "Ext Both", "7")
        assert _pinned(relay) == 0
        await a.close()
        await b.close()

    try:
        asyncio.run(main())
    finally:
        direct.close()
    assert "pinned to" not in relay.log()
    wait_until(lambda: not listening_backends(pg), message="the listening server to close")


def _ext(sql: str, describe: bool = False, name: str = "") -> bytes:
    from ..support import message
    out = message(b"P", name.encode() + b"\0" + sql.encode() + b"\0" + struct.pack("!H", 0))
    if describe:
        out += message(b"D", b"S" + name.encode() + b"\0")
    out += message(b"B", b"\0" + name.encode() + b"\0" + struct.pack("!HH", 0, 0) + struct.pack("!H", 0))
    if describe:
        out += message(b"D", b"P\0")
    return out + message(b"E", b"\0" + struct.pack("!I", 0)) + message(b"S")


@pytest.mark.parametrize("sql, describe", [
    ("LISTEN raw_ext", False),
    ("LISTEN raw_ext", True),
    ('  listen "Raw Ext" ;', True),
    ("LISTEN " + "t" * 70, False),  # truncated: PostgreSQL's NOTICE comes with the Parse
    ("UNLISTEN raw_ext", False),
    ("UNLISTEN *", True),
])
def test_extended_listen_in_one_packet_gets_postgresqls_replies(make_relay, pg, sql, describe):
    relay = make_relay({"default_pool_size": 1, "admin_users": "postgres"})
    direct, pooled = RawClient(pg.port), RawClient(relay.port)
    direct.login()
    pooled.login()
    packet = _ext(sql, describe)
    replies = []
    for raw in (direct, pooled):
        raw.send(packet)
        replies.append(raw.read_until(b"Z"))
    assert [k for k, _ in replies[1]] == [k for k, _ in replies[0]]
    assert [b for k, b in replies[1] if k != b"N"] == [b for k, b in replies[0] if k != b"N"]
    assert [error_fields(b)["M"] for k, b in replies[1] if k == b"N"] == \
        [error_fields(b)["M"] for k, b in replies[0] if k == b"N"]
    if sql.startswith("LISTEN"):
        sender = connect(relay)
        with sender.cursor() as cur:
            cur.execute("NOTIFY " + sql.split(None, 1)[1].rstrip(" ;"))
        pooled.sock.settimeout(10)
        assert raw_notifications([pooled.read_message()])[0][2] == ""
        sender.close()
    assert not any(k == b"D" for k, _ in pooled.query("SELECT 1 FROM pg_listening_channels()"))
    assert _pinned(relay) == 0
    direct.close()
    pooled.close()


def test_extended_listen_prepared_then_bound_gets_postgresqls_replies(make_relay, pg):
    """asyncpg's two steps by hand: Parse (named or unnamed), Describe, Flush; then Bind, Execute,
    Sync (named: no Parse; unnamed: parsed again). Each step's replies are PostgreSQL's; a Bind
    that PostgreSQL refuses (a parameter) gets its error from a server; nothing pins."""
    from ..support import message
    relay = make_relay({"default_pool_size": 1, "admin_users": "postgres"})
    direct, pooled = RawClient(pg.port), RawClient(relay.port)
    direct.login()
    pooled.login()
    flush, sync = message(b"H"), message(b"S")
    exe = message(b"E", b"\0" + struct.pack("!I", 0))

    def bind(name: str, params: int = 0) -> bytes:
        return message(b"B", b"\0" + name.encode() + b"\0" + struct.pack("!HH", 1, 1) + struct.pack("!H", params)
                       + b"\0\0\0\0" * params + struct.pack("!HH", 1, 1))

    def prepare(name: str, sql: str) -> bytes:
        return (message(b"P", name.encode() + b"\0" + sql.encode() + b"\0\0\0")
                + message(b"D", b"S" + name.encode() + b"\0") + flush)

    steps = [
        (prepare("pgl_1", 'LISTEN "two step"'), b"n"), (bind("pgl_1") + exe + sync, b"Z"),
        (prepare("", "LISTEN unnamed_step"), b"n"),
        (message(b"P", b"\0LISTEN unnamed_step\0\0\0") + bind("") + exe + sync, b"Z"),
        (message(b"P", b"\0LISTEN unnamed_step\0\0\0") + bind("", params=1) + exe + sync, b"Z"),  # 08P01 from the server
        (prepare("pgl_2", 'UNLISTEN "two step"'), b"n"), (bind("pgl_2") + exe + sync, b"Z"),
        (bind("pgl_1") + exe + sync, b"Z"),  # LISTEN again through the cached statement
    ]
    kinds = []
    for data, until in steps:
        want, got = [], []
        for raw, out in ((direct, want), (pooled, got)):
            raw.send(data)
            out += raw.read_until(until)
        assert [(k, b if k != b"E" else error_fields(b)["M"]) for k, b in got] == \
            [(k, b if k != b"E" else error_fields(b)["M"]) for k, b in want]
        kinds.append(b"".join(k for k, _ in got))
    assert kinds == [b"1tn", b"2CZ", b"1tn", b"12CZ", b"1EZ", b"1tn", b"2CZ", b"2CZ"]
    # asyncpg may write the Parse apart from the Bind, Execute, Sync that follow: two reads
    for raw in (direct, pooled):
        raw.send(prepare("", "LISTEN split_step"))
        assert [k for k, _ in raw.read_until(b"n")] == [b"1", b"t", b"n"]
    split = []
    for raw in (direct, pooled):
        raw.send(message(b"P", b"\0LISTEN split_step\0\0\0"))
        time.sleep(0.2)
        raw.send(bind("") + exe + sync)
        split.append(raw.read_until(b"Z"))
    assert split[1] == split[0] and [k for k, _ in split[1]] == [b"1", b"2", b"C", b"Z"]
    sender = connect(relay)
    with sender.cursor() as cur:
        cur.execute('NOTIFY "two step", \'a\'')
        cur.execute("NOTIFY unnamed_step, 'b'")
        cur.execute("NOTIFY split_step, 'c'")
    pooled.sock.settimeout(10)
    assert [n[1:] for n in raw_notifications([pooled.read_message() for _ in range(3)])] == [
        ("two step", "a"), ("unnamed_step", "b"), ("split_step", "c")]
    assert not any(k == b"D" for k, _ in pooled.query("SELECT 1 FROM pg_listening_channels()"))
    assert _pinned(relay) == 0 and "pinned to" not in relay.log()
    sender.close()
    direct.close()
    pooled.close()


def test_extended_listen_inside_a_transaction_keeps_postgresqls_semantics(make_relay, pg):
    """Through the extended protocol, as through a Query: inside a transaction a LISTEN of a
    channel the client has is a no-op, an UNLISTEN takes effect at COMMIT and not after ROLLBACK,
    and a LISTEN of a new channel runs on the client's server (session_state = pin); the replies
    are PostgreSQL's, ReadyForQuery 'T' included."""
    relay = make_relay({"default_pool_size": 2, "admin_users": "postgres"})
    direct, pooled = RawClient(pg.port), RawClient(relay.port)
    direct.login()
    pooled.login()
    sender = connect(relay)

    def both(data: bytes) -> list:
        replies = []
        for raw in (direct, pooled):
            raw.send(data)
            replies.append(raw.read_until(b"Z"))
        assert replies[1] == replies[0]
        return replies[1]

    def notified(payload: str) -> list:
        with sender.cursor() as cur:
            cur.execute("SELECT pg_notify('txe', %s), pg_notify('txe_new', %s)", (payload, payload))
        out = []
        for raw in (direct, pooled):
            got = raw_notifications(raw.query("SELECT 1"))  # delivered by the next ReadyForQuery
            raw.sock.settimeout(0.5)
            try:
                while True:
                    got += raw_notifications([raw.read_message()])
            except OSError:
                pass
            raw.sock.settimeout(10)
            out.append(sorted((c, p) for _, c, p in got))
        assert out[1] == out[0]
        return out[1]

    both(query_message("LISTEN txe"))
    both(query_message("BEGIN"))
    assert [k for k, _ in both(_ext("LISTEN txe", True))] == [b"1", b"t", b"n", b"2", b"n", b"C", b"Z"]
    assert both(_ext("UNLISTEN txe"))[-1] == (b"Z", b"T")
    both(query_message("ROLLBACK"))
    assert notified("1") == [("txe", "1")]  # the UNLISTEN was rolled back
    both(query_message("BEGIN"))
    both(_ext("UNLISTEN txe"))
    both(query_message("COMMIT"))
    assert notified("2") == []  # committed: gone
    assert _pinned(relay) == 0
    both(query_message("BEGIN"))
    both(_ext("LISTEN txe_new"))  # a new channel inside a transaction: the server's, at COMMIT
    both(query_message("COMMIT"))
    assert notified("3") == [("txe_new", "3")]
    assert wait_until(lambda: _pinned(relay) == 1)
    both(_ext("UNLISTEN *"))
    assert wait_until(lambda: _pinned(relay) == 0)
    assert notified("4") == []
    for raw in (direct, pooled):
        raw.close()
    sender.close()


def test_extended_listen_refused_gets_its_error_where_postgresql_puts_it(make_relay):
    """No listening server may be opened (max_db_connections = 1): the Execute's error comes after
    ParseComplete and BindComplete, then ReadyForQuery, as an Execute that fails in PostgreSQL; the
    client stays usable and nothing pins."""
    relay = make_relay({"default_pool_size": 1, "max_db_connections": 1, "admin_users": "postgres"})
    raw = RawClient(relay.port)
    raw.login()
    raw.send(_ext("LISTEN refused_ext", True))
    reply = raw.read_until(b"Z")
    assert [k for k, _ in reply] == [b"1", b"t", b"n", b"2", b"n", b"E", b"Z"]
    fields = error_fields(reply[5][1])
    assert (fields["S"], fields["C"]) == ("ERROR", "53300") and "max_db_connections" in fields["M"]
    assert reply[-1] == (b"Z", b"I")
    assert data_rows_ok(raw)
    assert _pinned(relay) == 0
    raw.close()
