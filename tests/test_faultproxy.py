"""tests/faultproxy.py against a real echo server: each fault does what it says, and heal() undoes it."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from .faultproxy import BUFFER, FaultProxy
from .support import wait_until


class EchoServer:
    """Echoes what each connection sends; on EOF sends b"bye" and closes. Records, per connection,
    the sizes of the chunks it received and how the connection ended ("eof" or "reset")."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[dict] = []
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            record = {"chunks": [], "end": None, "data": b""}
            self.conns.append(record)
            threading.Thread(target=self._serve, args=(conn, record), daemon=True).start()

    def _serve(self, conn, record):
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    record["end"] = "eof"
                    conn.sendall(b"bye")
                    break
                record["chunks"].append(len(data))
                record["data"] += data
                conn.sendall(data)
        except ConnectionResetError:
            record["end"] = "reset"
        except OSError as exc:
            record["end"] = f"error {exc}"
        finally:
            conn.close()

    def conn(self, i: int) -> dict:
        """The record of the i-th connection, once it has been accepted."""
        wait_until(lambda: len(self.conns) > i, timeout=5, message=f"echo connection {i}")
        return self.conns[i]

    def close(self):
        self.running = False
        self.sock.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    p = FaultProxy("127.0.0.1", echo.port)
    yield p
    p.close()


def client(proxy, timeout=5, linked=True):
    """A connection through the proxy; with `linked`, once the proxy is connected to the target."""
    before = len(proxy.open_links())
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    if linked:
        proxy.wait_links(before + 1)
    return sock


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def nothing_within(sock, seconds):
    """True when no byte (and no EOF) arrives within `seconds`."""
    sock.settimeout(seconds)
    try:
        sock.recv(1)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(5)
    return False


def recv_all(sock):
    """Everything until EOF."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def roundtrip(sock, data):
    sender = threading.Thread(target=sock.sendall, args=(data,))
    sender.start()
    got = recv_exact(sock, len(data))
    sender.join()
    return got


def test_forwards_real_bytes_both_ways(proxy, echo):
    payload = bytes(range(256)) * 8192  # 2 MiB: more than the bounded buffers
    with client(proxy) as sock:
        assert roundtrip(sock, payload) == payload
        sock.shutdown(socket.SHUT_WR)
        assert recv_all(sock) == b"bye"
    wait_until(lambda: echo.conn(0)["end"] == "eof")
    assert echo.conn(0)["data"] == payload


def test_stall_holds_bytes_and_keeps_sockets_open_until_heal(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"before") == b"before"
        proxy.stall()
        sock.sendall(b"during")
        assert nothing_within(sock, 0.4)
        assert echo.conn(0)["data"] == b"before"  # not even forwarded up
        with client(proxy, linked=False) as late:  # a new connection is stalled too
            late.sendall(b"late")
            assert nothing_within(late, 0.3)
            proxy.heal()
            assert recv_exact(late, 4) == b"late"
        assert recv_exact(sock, 6) == b"during"
        assert echo.conn(0)["end"] is None


def test_stall_one_direction(proxy, echo):
    with client(proxy) as sock:
        proxy.stall(direction="down")
        sock.sendall(b"up only")
        wait_until(lambda: echo.conn(0)["data"] == b"up only")
        assert nothing_within(sock, 0.3)
        proxy.heal()
        assert recv_exact(sock, 7) == b"up only"


def test_delay_is_transparent_but_late(proxy):
    with client(proxy) as sock:
        proxy.delay(0.3)
        start = time.monotonic()
        assert roundtrip(sock, b"x" * 1000) == b"x" * 1000
        elapsed = time.monotonic() - start
        assert 0.55 <= elapsed < 3, elapsed  # 0.3 s each way
        proxy.heal()
        start = time.monotonic()
        assert roundtrip(sock, b"y") == b"y"
        assert time.monotonic() - start < 0.25


def test_throttle_limits_the_rate_and_keeps_the_bytes(proxy):
    payload = bytes(range(256)) * 80  # 20 KiB
    with client(proxy) as sock:
        proxy.throttle(20000)
        start = time.monotonic()
        assert roundtrip(sock, payload) == payload
        elapsed = time.monotonic() - start
        assert 0.8 <= elapsed < 5, elapsed


def test_drop_closes_both_sides_cleanly(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.drop()
        assert sock.recv(10) == b""  # a FIN, not an RST
        wait_until(lambda: echo.conn(0)["end"] == "eof")
    with client(proxy, linked=False) as late:  # new connections: accepted, closed at once, never forwarded
        assert late.recv(10) == b""
    assert len(echo.conns) == 1


def test_half_close_toward_server(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.half_close("server")
        # The server reads EOF, answers "bye" and closes: that still reaches the client.
        wait_until(lambda: echo.conn(0)["end"] == "eof")
        assert recv_all(sock) == b"bye"


def test_half_close_toward_client(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.half_close("client")
        assert sock.recv(10) == b""  # the client reads EOF
        sock.sendall(b"still up")  # and can still send to the server
        wait_until(lambda: echo.conn(0)["data"] == b"histill up")
        assert echo.conn(0)["end"] is None


def test_reset_sends_rst_both_ways(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        wait_until(lambda: echo.conn(0)["end"] == "reset")


def test_reset_only_existing_connections(proxy):
    with client(proxy) as old:
        assert roundtrip(old, b"a") == b"a"
        proxy.reset(new=False)
        with pytest.raises(ConnectionResetError):
            old.recv(10)
    with client(proxy, linked=False) as fresh:
        assert roundtrip(fresh, b"fine") == b"fine"


def test_truncate_forwards_n_more_bytes_then_closes(proxy, echo):
    with client(proxy) as sock:
        assert roundtrip(sock, b"hi") == b"hi"
        proxy.truncate(5, direction="down")
        sock.sendall(b"0123456789")
        assert recv_all(sock) == b"01234"
        wait_until(lambda: echo.conn(0)["end"] == "eof")


def test_truncate_counts_both_directions(proxy, echo):
    with client(proxy) as sock:
        proxy.truncate(3)
        sock.sendall(b"abcdef")
        assert recv_all(sock) == b""
        wait_until(lambda: echo.conn(0)["end"] == "eof")
        assert echo.conn(0)["data"] == b"abc"


def test_split_sends_every_byte_alone(proxy, echo):
    payload = bytes(range(256)) * 8
    with client(proxy) as sock:
        proxy.split()
        assert roundtrip(sock, payload) == payload
        link = proxy.open_links()[0]
        # One send() per byte each way (the counter moves just after the send: the receiver may see
        # the last byte first). How many reads the receiver needs is the kernel's business: a
        # receiver descheduled on a loaded machine reads the queued bytes at once (CI saw 4 reads).
        wait_until(lambda: link.up.sends == len(payload) and link.down.sends == len(payload), timeout=2)
        proxy.heal()
        before = link.up.sends
        assert roundtrip(sock, payload) == payload
        assert link.up.sends - before < 10


def test_blackhole_accepts_and_never_answers(proxy, echo):
    with client(proxy) as old:
        assert roundtrip(old, b"a") == b"a"
        proxy.blackhole()
        with client(proxy, linked=False) as new:
            new.sendall(b"anyone?")
            assert nothing_within(new, 0.4)
            assert len(echo.conns) == 1  # never forwarded: no connection to the target
        old.sendall(b"lost")
        assert nothing_within(old, 0.3)
        assert echo.conn(0)["data"] == b"a"
        proxy.heal()
        assert roundtrip(old, b"back") == b"back"


def test_buffers_are_bounded(echo):
    """A target that never reads: the sender blocks once the kernel buffers and BUFFER are full."""
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(1)
    proxy = FaultProxy("127.0.0.1", sink.getsockname()[1])
    sent = [0]

    def send_for_a_while(sock):
        chunk = b"z" * 65536
        deadline = time.monotonic() + 1.5
        try:
            while time.monotonic() < deadline:
                sent[0] += sock.send(chunk)
        except OSError:
            pass

    try:
        with client(proxy) as sock:
            held, _ = sink.accept()
            sock.settimeout(0.1)
            send_for_a_while(sock)
            link = proxy.open_links()[0]
            assert link.up.size <= BUFFER
            assert sent[0] < 64 << 20, sent  # backed up, not buffered without bound
            assert link.up.forwarded <= sent[0]
            held.close()
    finally:
        proxy.close()
        sink.close()


def test_close_stops_listening_and_closes_connections(echo):
    proxy = FaultProxy("127.0.0.1", echo.port)
    sock = client(proxy)
    assert roundtrip(sock, b"a") == b"a"
    proxy.close()
    assert sock.recv(10) == b""
    sock.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)
