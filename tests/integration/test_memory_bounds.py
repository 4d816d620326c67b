"""Memory per connection is bounded: stalled logins, a 1 GB message trickled in, a server's oversized metadata.

The other bounds have their tests where their feature is: a client that never reads a 1 GB result
(test_handover.py::test_server_to_client_backlog_is_bounded_for_a_client_that_never_reads), a
client feeding a sleeping server (::test_client_to_server_backlog_is_not_handed_to_the_next_client),
queued clients (::test_queued_clients_buffer_little_and_gone_clients_send_nothing), a WebSocket
client that stops reading (test_serverless_websocket.py), notifications to a listener that does
not read (test_listen_notify.py, notify_queue_size).
"""
from __future__ import annotations

import os
import resource
import socket
import struct
import threading
import time

import psutil

from ..support import RawClient, assert_served, error_fields, message, query_message, wait_until

STALLED = 10_000
TRICKLE_CAP = 128 * 2**20  # what the fake server sends of its 1 GB tag at most


def rss_mib(relay) -> float:
    return psutil.Process(relay.proc.pid).memory_info().rss / 2**20


def open_fds(relay) -> int:
    return len(os.listdir(f"/proc/{relay.proc.pid}/fd"))


def test_ten_thousand_clients_that_send_a_header_and_stall(make_relay):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= STALLED + 500, f"the test needs {STALLED + 500} descriptors; the hard limit is {hard}"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, STALLED + 500), hard))
    # a backlog for the burst of connects (at 128 the kernel drops SYNs and the clients retry after 1s)
    relay = make_relay({"max_client_conn": str(STALLED + 100), "client_login_timeout": "20", "listen_backlog": "4096"})
    # pgrelay raises its own soft limit to what max_client_conn needs (it inherits ours anyway)
    warm = RawClient(relay.port)
    warm.login()
    baseline = rss_mib(relay)
    stalled = []
    try:
        for i in range(STALLED):
            sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
            # the first 8 bytes of a StartupMessage announcing 10,000 bytes, then nothing
            sock.sendall(struct.pack("!II", 10_000, 196608))
            stalled.append(sock)
        accepted = lambda: open_fds(relay)  # noqa: E731
        try:
            wait_until(lambda: accepted() >= STALLED, timeout=30, message="pgrelay to accept every stalled client")
        except AssertionError as e:
            raise AssertionError(f"{e}: {accepted()} of {STALLED} accepted\n{relay.log()[-3000:]}") from None
        time.sleep(1)
        grown = rss_mib(relay) - baseline
        per_client_kib = grown * 1024 / STALLED
        print(f"{STALLED} stalled logins: RSS +{grown:.1f} MiB, {per_client_kib:.2f} KiB each")
        assert per_client_kib < 12, f"{STALLED} stalled logins cost {grown:.0f} MiB ({per_client_kib:.1f} KiB each)"
        started = time.monotonic()
        assert_served(relay)  # an ordinary client is served next to them, at once
        assert time.monotonic() - started < 2
        assert warm.query("select 'still here'")[-1][0] == b"Z"
    finally:
        for sock in stalled:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        warm.close()
    wait_until(lambda: open_fds(relay) < 100, timeout=30,
               message="pgrelay to close the stalled clients' sockets")
    assert_served(relay)


def test_stalled_logins_are_closed_by_client_login_timeout(make_relay):
    relay = make_relay({"client_login_timeout": "2"})
    socks = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
        sock.sendall(struct.pack("!II", 10_000, 196608))
        socks.append(sock)
    started = time.monotonic()
    for sock in socks:  # each gets PgBouncer's error (or just the close), then EOF
        sock.settimeout(10)
        while sock.recv(65536):
            pass
    elapsed = time.monotonic() - started
    assert 1 < elapsed < 5, f"stalled logins were closed after {elapsed:.1f}s (client_login_timeout = 2)"
    assert relay.log().count("client_login_timeout") >= 200
    for sock in socks:
        sock.close()
    assert_served(relay)


GIB = 1 << 30
COPY_DATA_LENGTH = GIB - 64  # PostgreSQL reads CopyData up to 1 GB - 2 bytes, and ignores it outside COPY


def test_one_client_trickles_a_1_gb_message(make_relay):
    """A CopyData message of almost 1 GB, first a byte at a time, then in 64 KiB pieces: pgrelay
    forwards it as it comes (a transaction-mode server is linked for it) and holds no more than a
    few socket reads; the client is then served as usual, and so is everyone else meanwhile."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "2"})
    c = RawClient(relay.port, timeout=60)
    c.login()
    baseline = rss_mib(relay)
    peak = [baseline]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak.append(rss_mib(relay))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        header = b"d" + struct.pack("!I", COPY_DATA_LENGTH + 4)
        for byte in header:  # trickle: the header split into single bytes
            c.send(bytes([byte]))
            time.sleep(0.01)
        piece = b"t" * 65536
        left = COPY_DATA_LENGTH
        trickled = 0
        while left:
            chunk = piece if left >= len(piece) else piece[:left]
            c.send(chunk)
            left -= len(chunk)
            trickled += 1
            if trickled <= 100:
                time.sleep(0.005)  # the first 6.4 MB slowly
            if trickled == 2000:
                other = RawClient(relay.port)  # served while the message is half in
                other.login()
                assert other.query("select 'other'")[-1] == (b"Z", b"I")
                other.close()
        reply = c.query("select 'after the gigabyte'")
    finally:
        stop.set()
        sampler.join(5)
    assert [m for m in reply if m[0] == b"D"] == [(b"D", b"\0\x01\0\0\0\x12after the gigabyte")]
    grown = max(peak) - baseline
    print(f"1 GB message trickled in: RSS peak +{grown:.1f} MiB")
    assert grown < 32, f"RSS grew by {grown:.0f} MiB while a 1 GB message went through"
    c.close()
    assert_served(relay)


# -- a server that sends oversized metadata ---------------------------------------------------------

class HugeTagServer:
    """A fake PostgreSQL (trust): logs in, then answers any Query with a CommandComplete header
    announcing 1 GB and a trickle of its bytes (pgrelay reads a CommandComplete whole)."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sent = 0
        self.stopping = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(10)
        try:
            length, code = struct.unpack("!II", conn.recv(8, socket.MSG_WAITALL))
            if code == 80877103:  # SSLRequest: no
                conn.sendall(b"N")
                length, code = struct.unpack("!II", conn.recv(8, socket.MSG_WAITALL))
            conn.recv(length - 8, socket.MSG_WAITALL)
            conn.sendall(message(b"R", b"\0\0\0\0") + message(b"S", b"server_version\x0015.0\0")
                         + message(b"S", b"client_encoding\0UTF8\0") + message(b"K", b"\0\0\0\1\0\0\0\2")
                         + message(b"Z", b"I"))
            while not self.stopping.is_set():
                kind = conn.recv(1, socket.MSG_WAITALL)
                if kind != b"Q":
                    return
                length = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))[0]
                conn.recv(length - 4, socket.MSG_WAITALL)
                conn.sendall(b"C" + struct.pack("!I", GIB) + b"SELECT ")
                chunk = b"9" * 65536
                while not self.stopping.is_set() and self.sent < TRICKLE_CAP:
                    conn.sendall(chunk)
                    self.sent += len(chunk)
                self.stopping.wait()  # a pgrelay that buffers it all now waits for the rest: the test times out
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopping.set()
        self.listener.close()


def test_a_server_announcing_a_1_gb_command_tag_is_closed(make_relay, pg):
    fake = HugeTagServer()
    try:
        relay = make_relay({"pool_mode": "transaction"},
                           databases={"fake": f"host=127.0.0.1 port={fake.port}", "*": f"host=127.0.0.1 port={pg.port}"})
        c = RawClient(relay.port, timeout=15)
        c.login(database="fake")
        baseline = rss_mib(relay)
        c.send(query_message("select 1"))
        kind, body = c.read_message()
        assert kind == b"E", (kind, body[:200])
        fields = error_fields(body)
        assert fields["C"] == "08006", fields
        assert fields["M"] == "server connection lost: server protocol violation: oversized CommandComplete", fields
        assert rss_mib(relay) - baseline < 16
        assert fake.sent < 64 * 2**20, f"pgrelay read {fake.sent / 2**20:.0f} MiB of one CommandComplete"
        assert "oversized CommandComplete" in relay.log()
        c.close()
        assert_served(relay)
    finally:
        fake.close()

