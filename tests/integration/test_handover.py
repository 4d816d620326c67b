"""Hand-overs of a server between clients: no reply reaches the wrong client, no backlog is unbounded.

Each test is a raw-socket sequence from the hostile review (issue 7), sent exactly as described:
several messages in one send(), a Terminate behind queries, clients that stop reading.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import psutil
import pytest

from ..support import RawClient, assert_served, connect, query_message, scalar, startup_packet, wait_until

TERMINATE = b"X\x00\x00\x00\x04"
FLUSH = b"H\x00\x00\x00\x04"


def rows(msgs) -> list[str]:
    """The first column of every DataRow in `msgs`, as text."""
    out = []
    for kind, body in msgs:
        if kind == b"D":
            n = struct.unpack("!I", body[2:6])[0]
            out.append(body[6:6 + n].decode())
    return out


def tags(msgs) -> list[str]:
    return [body.rstrip(b"\0").decode() for kind, body in msgs if kind == b"C"]


def push(sock, chunk: bytes, seconds: float, total: int | None = None, during=None) -> int:
    """Send `chunk` again and again without blocking, never cutting a message, for `seconds` or
    until `total` bytes; returns how many bytes the peer accepted. `during()` runs between sends."""
    sock.setblocking(False)
    view, accepted = memoryview(chunk), 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (total is None or accepted < total):
        try:
            sent = sock.send(view)
        except BlockingIOError:
            time.sleep(0.01)
            sent = 0
        accepted += sent
        view = view[sent:] or memoryview(chunk)
        if during is not None:
            during()
    while 0 < len(view) < len(chunk):  # finish the chunk in flight
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return accepted


def rss_mib(relay) -> float:
    return psutil.Process(relay.proc.pid).memory_info().rss / 2**20


def cpu_seconds(relay) -> float:
    t = psutil.Process(relay.proc.pid).cpu_times()
    return t.user + t.system


# -- 1. a leaving client's replies never reach the next client ----------------------------------

def _leaving_client_sequence(relay, a_user="postgres", b_user="postgres", dbname="postgres"):
    a = RawClient(relay.port)
    a.login(user=a_user, database=dbname)
    assert rows(a.query("select 'A-linked'")) == ["A-linked"]
    b = RawClient(relay.port)
    # B's login and first query queue behind A (session pooling links B's own server at login,
    # so that its welcome carries that server's pid: pgrelay.login_link).
    b.send(startup_packet(b_user, dbname) + query_message("select 'B-first'"))
    time.sleep(0.2)
    a.send(query_message("select pg_sleep(0.3)") + query_message("select 'A-private-row', pg_sleep(0.2)")
           + TERMINATE)
    welcome = b.read_until(b"Z")
    assert welcome[0] == (b"R", b"\0\0\0\0") and welcome[-1] == (b"Z", b"I"), welcome
    first = b.read_until(b"Z")
    assert rows(first) == ["B-first"], first
    second = b.query("select 'B-second'")
    assert rows(second) == ["B-second"] and tags(second) == ["SELECT 1"], second
    third = b.query("select 'B-third'")
    assert rows(third) == ["B-third"], third
    b.close()
    a.close()


def test_session_terminate_behind_queries_in_one_packet_never_reaches_next_client(make_relay):
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1"})
    for _ in range(3):
        _leaving_client_sequence(relay)


def test_leaving_client_across_two_login_users_sharing_a_pool(make_relay, pg):
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1", "auth_type": "trust"},
                       databases={"shared": f"host=127.0.0.1 port={pg.port} dbname=postgres user=postgres"})
    _leaving_client_sequence(relay, a_user="alice", b_user="bob", dbname="shared")


def test_leaving_client_on_a_larger_session_pool_with_other_servers_held(make_relay):
    relay = make_relay({"pool_mode": "session", "default_pool_size": "3"})
    holders = [RawClient(relay.port) for _ in range(2)]
    for h in holders:
        h.login()
        assert rows(h.query("select 'held'")) == ["held"]
    _leaving_client_sequence(relay)
    for h in holders:
        assert rows(h.query("select 'still mine'")) == ["still mine"]
        h.close()


def test_queries_before_terminate_run_even_when_the_server_is_busy(make_relay, pg):
    """Session mode: the queries are forwarded and run; the server is not reused mid-reply."""
    pg.psql("CREATE TABLE IF NOT EXISTS handover_ledger (who text)")
    pg.psql("DELETE FROM handover_ledger")
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1"})
    a = RawClient(relay.port)
    a.login()
    a.query("select 1")
    a.send(query_message("select pg_sleep(0.2)") + query_message("insert into handover_ledger values ('a')")
           + TERMINATE)
    b = connect(relay)
    assert scalar(b, "select count(*) from handover_ledger") == 1
    assert scalar(b, "select 'b'") == "b"
    b.close()


@pytest.mark.parametrize("busy", [False, True], ids=["idle-pool", "queued"])
def test_transaction_mode_query_then_terminate_is_run(make_relay, pg, busy):
    """An idle client's Query + Terminate in one packet runs, as PostgreSQL would run it."""
    pg.psql("CREATE TABLE IF NOT EXISTS handover_ledger (who text)")
    pg.psql("DELETE FROM handover_ledger")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1"})
    holder = None
    if busy:
        holder = connect(relay)
        holder.autocommit = False
        scalar(holder, "select 1")  # holds the only server inside a transaction
    c = RawClient(relay.port)
    c.login()
    c.send(query_message("insert into handover_ledger values ('gone')") + TERMINATE)
    if holder is not None:  # queued: the client stays until its query is with a server
        time.sleep(0.3)
        assert pg.psql("select count(*) from handover_ledger") == "0"
        holder.rollback()
    assert c.closed()
    wait_until(lambda: pg.psql("select count(*) from handover_ledger") == "1", timeout=5,
               message="the query sent before Terminate to run")
    d = connect(relay)
    assert scalar(d, "select 'next'") == "next"
    assert scalar(d, "select count(*) from handover_ledger") == 1
    d.close()
    if holder is not None:
        holder.close()


# -- 2. backpressure survives every hand-over ------------------------------------------------------

def _count_until_ready(sock, want_z: int, timeout: float = 120) -> tuple[int, int]:
    """Read from `sock` until `want_z` ReadyForQuery messages; returns (DataRow bytes, Z count)."""
    sock.settimeout(timeout)
    buf = bytearray()
    data_bytes = zs = 0
    skip = 0
    chunk = bytearray(1 << 20)
    while zs < want_z:
        n = sock.recv_into(chunk)
        if not n:
            raise EOFError(f"closed after {zs} ReadyForQuery")
        view = memoryview(chunk)[:n]
        if skip:
            take = min(skip, n)
            skip -= take
            data_bytes += take
            view = view[take:]
        buf += view
        pos = 0
        while len(buf) - pos >= 5:
            kind = buf[pos]
            length = struct.unpack_from("!I", buf, pos + 1)[0]
            end = pos + 1 + length
            if kind == ord("Z"):
                if end > len(buf):
                    break
                zs += 1
            elif kind == ord("D") and end > len(buf):
                data_bytes += len(buf) - pos - 5
                skip = end - len(buf)
                pos = len(buf)
                break
            elif kind == ord("D"):
                data_bytes += length - 4
            elif end > len(buf):
                break
            pos = end
        del buf[:pos]
    return data_bytes, zs


def test_server_to_client_backlog_is_bounded_for_a_client_that_never_reads(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "2"})
    c = RawClient(relay.port)
    c.login()
    baseline = rss_mib(relay)
    small = query_message("select repeat('s', 2000)")
    sent_small = 4000  # 8 MB of replies: more than the socket buffers between pgrelay and the client
    for _ in range(sent_small):  # one at a time: each reply arrives with its ReadyForQuery
        c.send(small)
        time.sleep(0.0005)
    c.sock.settimeout(30)
    c.send(query_message("select repeat('x', 1000000) from generate_series(1, 1000)"))
    peak = baseline
    for _ in range(30):
        time.sleep(0.1)
        peak = max(peak, rss_mib(relay))
    print(f"1 GB result to a client that does not read: RSS +{peak - baseline:.1f} MiB")
    assert peak - baseline < 24, f"RSS grew from {baseline:.1f} to {peak:.1f} MiB with a non-reading client"
    # The slow client still gets every byte, in order.
    data_bytes, zs = _count_until_ready(c.sock, sent_small + 1)
    assert zs == sent_small + 1
    assert data_bytes == sent_small * (2000 + 6) + 1000 * (1000000 + 6)  # values plus column headers
    assert rss_mib(relay) - baseline < 24
    assert_served(relay)
    c.close()


@pytest.mark.parametrize("feed", ["flush", "aligned-copydata"])
def test_client_to_server_backlog_is_not_handed_to_the_next_client(make_relay, feed):
    """C1's bytes pile up in front of a sleeping server; its query ends while they are unsent. The
    server must not go to C2 until they are, and C2 must be paused like anyone feeding a backlog.
    'flush' is the review's sequence; 'aligned-copydata' sends 64 KiB CopyData messages (ignored by
    PostgreSQL outside COPY) so that C1 is at a message boundary whenever pgrelay reads it."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1"})
    baseline = rss_mib(relay)
    c1 = RawClient(relay.port)
    c1.login()
    c1.send(query_message("select pg_sleep(3)"))
    time.sleep(0.2)  # the query alone in pgrelay's first read
    if feed == "flush":
        chunk, total = FLUSH * 200000, 25 * 1000000  # ~25 MB of Flush
    else:
        chunk, total = b"d" + struct.pack("!I", 65535) + b"f" * 65531, 64 * 2**20
    feeder = threading.Thread(target=push, args=(c1.sock, chunk, 6, total), daemon=True)
    feeder.start()
    time.sleep(1)
    c2 = RawClient(relay.port)
    c2.login()
    c2.send(query_message("select pg_sleep(20)"))
    copy_data = b"d" + struct.pack("!I", (1 << 20) + 4) + b"c" * (1 << 20)
    peak = [baseline]
    accepted = push(c2.sock, copy_data, seconds=12, during=lambda: peak.append(rss_mib(relay)))
    peak = max(peak)
    feeder.join(30)
    assert accepted < 64 * 2**20, f"pgrelay accepted {accepted / 2**20:.0f} MiB from a client whose server sleeps"
    assert peak - baseline < 32, f"RSS grew from {baseline:.1f} to {peak:.1f} MiB"
    c1.close()
    c2.close()
    assert_served(relay)


# -- 5. queued clients: a small bound, no copies, no bytes of gone clients -------------------------

def test_queued_clients_buffer_little_and_gone_clients_send_nothing(make_relay, pg):
    pg.psql("CREATE TABLE IF NOT EXISTS handover_ledger (who text)")
    pg.psql("DELETE FROM handover_ledger")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "query_wait_timeout": "0"})
    holder = connect(relay)
    holder.autocommit = False
    scalar(holder, "select 1")
    baseline = rss_mib(relay)
    payload = query_message("insert into handover_ledger values ('gone')") + query_message("select 1") * 90000
    assert len(payload) > 1260000
    clients = []
    for _ in range(500):
        c = RawClient(relay.port)
        c.login()
        c.sock.setblocking(False)
        try:
            c.sock.send(payload)
        except BlockingIOError:
            pass
        clients.append(c)
    time.sleep(1)
    grown = rss_mib(relay) - baseline
    assert grown < 100, f"500 queued clients cost {grown:.0f} MiB"
    for c in clients:
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    wait_until(lambda: len([ln for ln in relay.log().splitlines() if "closing because" in ln]) >= 500,
               timeout=10, message="pgrelay to notice the queued clients left")
    holder.rollback()
    fresh = connect(relay)
    assert scalar(fresh, "select 'fresh'") == "fresh"
    time.sleep(0.5)
    assert scalar(fresh, "select count(*) from handover_ledger") == 0, "bytes of gone clients were sent"
    fresh.close()
    holder.close()
    assert rss_mib(relay) - baseline < 100


def test_queued_client_trickling_a_large_query_costs_little_cpu(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "query_wait_timeout": "0"})
    holder = connect(relay)
    holder.autocommit = False
    scalar(holder, "select 1")
    c = RawClient(relay.port)
    c.login()
    body = b"select '" + b"t" * 1000000 + b"' is not null\0"
    msg = b"Q" + struct.pack("!I", len(body) + 4) + body
    before = cpu_seconds(relay)
    done = threading.Event()

    def trickle():
        c.sock.settimeout(60)
        for i in range(len(msg)):
            c.sock.send(msg[i:i + 1])
        done.set()

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    done.wait(8)  # pgrelay may stop reading a queued client: then the trickle blocks, as it should
    spent = cpu_seconds(relay) - before
    # Measured: 0.08 s; the unbounded, quadratic pending buffer cost 2.5 s in this window.
    assert spent < 1.0, f"pgrelay spent {spent:.1f} s of CPU on one queued client trickling 1 MB"
    holder.rollback()
    thread.join(60)
    assert done.is_set()
    c.sock.settimeout(30)
    reply = c.read_until(b"Z")
    assert rows(reply) == ["t"], reply[:3]
    c.close()
    holder.close()
