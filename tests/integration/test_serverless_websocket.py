"""Bad and awkward WebSocket clients of a serverless listener (raw sockets and wsproto): text frames, tiny frames, a missing key, clients that vanish or stop reading, pings, and wss with the listener's own certificate."""

from __future__ import annotations

import socket
import ssl
import struct
import time

import psutil
from wsproto.events import CloseConnection, Ping, Pong, TextMessage

from pgrelay.tempdb import free_port

from ..drivers import listeners
from ..support import WsClient, assert_served, data_rows, local_certificate, query_message, startup_packet

MB = 1 << 20


def password_message(password: str = "secret") -> bytes:
    body = password.encode() + b"\0"
    return b"p" + struct.pack("!I", len(body) + 4) + body


def login(ws: WsClient, sql: str | None = None):
    """The Neon driver's pipelined start: StartupMessage, PasswordMessage (and a query) at once."""
    ws.send(startup_packet("postgres", "postgres") + password_message() + (query_message(sql) if sql else b""))
    welcome = ws.read_until(b"Z")
    assert welcome[0] == (b"R", b"\0\0\0\3") and welcome[1] == (b"R", b"\0\0\0\0"), welcome[:2]
    return welcome


def serverless_relay(make_relay, settings=None, options="", **extra):
    port = free_port()
    relay = make_relay(dict({"pool_mode": "transaction"}, **(settings or {})),
                       extra_sections=listeners(serverless=(port, f"role=serverless {options}"), **extra))
    return relay, port


def served_over_websocket(port: int, sql: str = "SELECT 'still served'") -> list:
    ws = WsClient(port)
    try:
        login(ws)
        return data_rows(ws.query(sql))
    finally:
        ws.close()


def rss_mib(relay) -> float:
    return psutil.Process(relay.proc.pid).memory_info().rss / 2**20


def test_text_frame_is_closed_with_1003_and_others_are_served(make_relay):
    relay, port = serverless_relay(make_relay)
    other = WsClient(port)
    login(other)
    bad = WsClient(port)
    login(bad)
    bad.sock.sendall(bad.ws.send(TextMessage(data="SELECT 1")))
    assert bad.closed(timeout=10)
    # pgrelay's close frame (wsproto adds a 1006 of its own when the TCP connection ends after it)
    closes = [e.code for e in bad.events if isinstance(e, CloseConnection)]
    assert closes[:1] == [1003] and set(closes[1:]) <= {1006}, bad.events
    # A text frame before any login is refused the same way.
    early = WsClient(port)
    early.sock.sendall(early.ws.send(TextMessage(data="hello")))
    assert early.closed(timeout=10)
    assert [e.code for e in early.events if isinstance(e, CloseConnection)][:1] == [1003], early.events
    assert data_rows(other.query("SELECT 'other'")) == [["other"]]
    assert served_over_websocket(port) == [["still served"]]
    assert_served(relay)


def test_startup_and_queries_split_into_one_byte_frames(make_relay):
    relay, port = serverless_relay(make_relay)
    ws = WsClient(port, frame_size=1)
    welcome = login(ws, sql="SELECT 'first', 6 * 7")
    assert welcome[-1][0] == b"Z"
    assert data_rows(ws.read_until(b"Z")) == [["first", "42"]]
    assert data_rows(ws.query("SELECT string_agg(n::text, ',') FROM generate_series(1, 5) n")) == [["1,2,3,4,5"]]
    ws.frame_size = 3  # messages straddling frames of another size
    assert data_rows(ws.query("SELECT 'three'")) == [["three"]]
    ws.send(b"X\0\0\0\4")  # Terminate: pgrelay sends a normal close frame; once answered, the TCP connection ends
    deadline = time.monotonic() + 10
    while not any(isinstance(e, CloseConnection) for e in ws.events):
        assert time.monotonic() < deadline, ws.events
        ws._pump()
    close = next(e for e in ws.events if isinstance(e, CloseConnection))
    assert close.code == 1000, close
    ws.sock.sendall(ws.ws.send(close.response()))
    assert ws.closed(timeout=3)
    assert_served(relay)


def test_upgrade_without_websocket_key_is_400(make_relay):
    relay, port = serverless_relay(make_relay)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(b"GET /v2 HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = raw.recv(65536)
        if not chunk:
            break
        head += chunk
    assert head.startswith(b"HTTP/1.1 400 "), head
    raw.close()
    assert served_over_websocket(port) == [["still served"]]
    assert_served(relay)


def test_client_that_closes_mid_query_releases_its_server(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS ws_gone; CREATE TABLE ws_gone (id int)")
    relay, port = serverless_relay(make_relay, {"default_pool_size": 1})
    gone = WsClient(port)
    login(gone)
    assert gone.query("BEGIN")[-1] == (b"Z", b"T")
    gone.query("INSERT INTO ws_gone VALUES (1)")
    gone.send(query_message("SELECT pg_sleep(1.5)"))
    time.sleep(0.3)  # the query is running on the pool's only server
    gone.sock.close()  # no Terminate, no close frame
    started = time.monotonic()
    ws = WsClient(port)
    login(ws)
    reply = ws.query("SELECT count(*) FROM ws_gone")
    assert data_rows(reply) == [["0"]] and reply[-1] == (b"Z", b"I")  # its transaction was rolled back
    assert time.monotonic() - started < 15
    assert data_rows(ws.query("SELECT 'next'")) == [["next"]]
    assert_served(relay)


def test_client_that_stops_reading_a_huge_result_keeps_memory_bounded(make_relay):
    relay, port = serverless_relay(make_relay, {"default_pool_size": 2})
    ws = WsClient(port, timeout=60)
    login(ws)
    baseline = rss_mib(relay)
    rows = 200
    ws.send(query_message(f"SELECT repeat('x', {MB}) FROM generate_series(1, {rows})"))  # 200 MB, not read
    peak = baseline
    for _ in range(30):
        time.sleep(0.1)
        peak = max(peak, rss_mib(relay))
    assert peak - baseline < 32, f"RSS grew from {baseline:.1f} to {peak:.1f} MiB with a non-reading WebSocket client"
    assert served_over_websocket(port) == [["still served"]]  # the other server of the pool
    # The slow client then gets every byte, in order.
    data_bytes = 0
    while True:
        kind, body = ws.read_message()
        if kind == b"D":
            data_bytes += len(body)
        if kind == b"Z":
            break
        peak = max(peak, rss_mib(relay))
    assert data_bytes == rows * (MB + 6)
    assert peak - baseline < 32, f"RSS peaked at {peak:.1f} MiB (baseline {baseline:.1f})"
    assert_served(relay)


def test_pings_get_pongs_before_and_after_login(make_relay):
    relay, port = serverless_relay(make_relay)
    ws = WsClient(port)

    def ping(payload: bytes) -> None:
        ws.sock.sendall(ws.ws.send(Ping(payload=payload)))
        deadline = time.monotonic() + 10
        while not any(isinstance(e, Pong) and e.payload == payload for e in ws.events):
            assert time.monotonic() < deadline, ws.events
            ws._pump()

    ping(b"before")
    login(ws)
    ping(b"between")
    assert data_rows(ws.query("SELECT 'after ping'")) == [["after ping"]]
    ping(b"")
    assert_served(relay)


def test_wss_with_the_listeners_own_certificate(make_relay, tmp_path):
    ca, cert_path, key_path = local_certificate(str(tmp_path), "ws-cert")
    relay, port = serverless_relay(make_relay, options=f"tls_cert_file={cert_path} tls_key_file={key_path}")
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost")
    ws = WsClient(port, sock=tls, frame_size=7)
    login(ws)
    assert data_rows(ws.query("SELECT 'over wss'")) == [["over wss"]]
    assert tls.version() in ("TLSv1.2", "TLSv1.3")
    # An untrusted client is refused the handshake; the listener goes on.
    untrusting = ssl.create_default_context()
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        untrusting.wrap_socket(raw, server_hostname="localhost")
        raise AssertionError("a client that does not trust the CA completed the handshake")
    except ssl.SSLCertVerificationError:
        pass
    finally:
        raw.close()
    again = WsClient(port, sock=ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                                                 server_hostname="localhost"))
    login(again)
    assert data_rows(again.query("SELECT 2")) == [["2"]]
    assert served_over_websocket(port) == [["still served"]]  # plain ws on the same port (TLS is sniffed)
    assert_served(relay)
