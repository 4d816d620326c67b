"""Serverless listeners as listeners: configuration, the core's bridged clients (pipelined cleartext login, pool mode per listener, TLS), and how the console and metrics show them."""

from __future__ import annotations

import socket
import urllib.request

import psycopg2
import pytest

from pgrelay.tempdb import free_port
from tests.support import WsClient, data_rows, local_certificate, query_message, startup_packet


def password_message(password: str) -> bytes:
    body = password.encode() + b"\0"
    return b"p" + (len(body) + 4).to_bytes(4, "big") + body


def serverless(name="serverless", port=None, extra="") -> tuple[int, str]:
    port = port or free_port()
    return port, f"{name} = port={port} role=serverless {extra}\n"


def pipelined_login(ws: WsClient, user="postgres", database="postgres", password="secret", sql=None):
    """What @neondatabase/serverless sends on open (pipelineConnect = "password"): StartupMessage,
    PasswordMessage and the first query in one frame, before pgrelay has said a word."""
    ws.send(startup_packet(user, database) + password_message(password) + (query_message(sql) if sql else b""))
    return ws.read_until(b"Z")


def test_pipelined_startup_is_answered_in_the_contracts_order(make_relay):
    port, line = serverless()
    relay = make_relay(extra_sections="[listeners]\n" + line)
    ws = WsClient(port)
    welcome = pipelined_login(ws, sql="SELECT 41 + 1")
    kinds = [k for k, _ in welcome]
    # R3 (cleartext request, even under auth_type = trust), R0, ParameterStatus..., K, Z
    assert welcome[0] == (b"R", b"\0\0\0\3") and welcome[1] == (b"R", b"\0\0\0\0"), welcome[:2]
    assert kinds[-2:] == [b"K", b"Z"] and set(kinds[2:-2]) == {b"S"}, kinds
    reply = ws.read_until(b"Z")
    assert data_rows(reply) == [["42"]]
    assert relay.log().count("ERROR") == 0


def test_startup_split_into_one_byte_frames_logs_in(make_relay):
    port, line = serverless()
    make_relay(extra_sections="[listeners]\n" + line)
    ws = WsClient(port, frame_size=1)
    pipelined_login(ws)
    assert data_rows(ws.query("SELECT current_user"))[0] == ["postgres"]


def test_pool_mode_is_the_listeners(make_relay):
    """Session pooling on one serverless listener keeps a client's server; transaction pooling on
    another shares one server between two clients."""
    session_port, session_line = serverless("ws_session", extra="pool_mode=session")
    txn_port, txn_line = serverless("ws_txn", extra="pool_mode=transaction")
    make_relay(settings={"default_pool_size": "1"}, extra_sections="[listeners]\n" + session_line + txn_line)
    a, b = WsClient(txn_port), WsClient(txn_port)
    pipelined_login(a), pipelined_login(b)
    pid_a = data_rows(a.query("SELECT pg_backend_pid()"))[0][0]
    pid_b = data_rows(b.query("SELECT pg_backend_pid()"))[0][0]
    assert pid_a == pid_b  # one server, two clients
    s = WsClient(session_port)
    pipelined_login(s)
    s.query("SET application_name = 'kept'")
    assert data_rows(s.query("SHOW application_name")) == [["kept"]]
    t = WsClient(session_port)
    # A second session client waits for the pool's one server (session pooling links it at login).
    t.send(startup_packet("postgres", "postgres") + password_message("secret") + query_message("SELECT 1"))
    assert t.read_reply(timeout=1) is None
    s.send(b"X\0\0\0\4")
    assert t.read_reply(timeout=10)[-1][0] == b"Z"  # the welcome
    assert data_rows(t.read_reply(timeout=10)) == [["1"]]


def test_wrong_password_and_the_unix_peer_rule_do_not_apply_through_a_bridge(make_relay, tmp_path):
    """A bridged client's socket is pgrelay's own socketpair (AF_UNIX, pgrelay's uid): the console's
    peer rule (user pgbouncer without a password on the Unix socket) must not let it in."""
    users = tmp_path / "users.txt"
    users.write_text('"postgres" "right-Pw-1"\n')
    port, line = serverless()
    make_relay(settings={"auth_type": "scram-sha-256", "auth_file": str(users), "admin_users": "pgbouncer,postgres"},
               extra_sections="[listeners]\n" + line)
    ws = WsClient(port)
    ws.send(startup_packet("pgbouncer", "pgbouncer") + password_message("anything"))
    assert ws.read_message() == (b"R", b"\0\0\0\3")
    fields = ws.read_error()
    assert fields["C"] == "28P01" and fields["M"] == 'password authentication failed for user "pgbouncer"'
    assert ws.closed()
    bad = WsClient(port)
    bad.send(startup_packet("postgres", "postgres") + password_message("wrong"))
    assert bad.read_message()[0] == b"R" and bad.read_error()["C"] == "28P01"
    good = WsClient(port)
    pipelined_login(good, password="right-Pw-1")
    assert data_rows(good.query("SELECT 1")) == [["1"]]
    console = WsClient(port)
    pipelined_login(console, database="pgbouncer", password="right-Pw-1")
    assert console.query("SHOW VERSION")[0][0] == b"T"


def test_console_and_metrics_show_bridged_clients_with_their_listener(make_relay):
    port, line = serverless()
    metrics_port = free_port()
    relay = make_relay(settings={"admin_users": "postgres", "metrics_listen": f"127.0.0.1:{metrics_port}"},
                       extra_sections="[listeners]\n" + line)
    ws = WsClient(port)
    pipelined_login(ws)
    ws.query("SELECT 1")
    conn = psycopg2.connect(relay.dsn(dbname="pgbouncer"))
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("SHOW CLIENTS")
    cols = [d[0] for d in cur.description]
    rows = [dict(zip(cols, r)) for r in cur.fetchall()]
    bridged = [r for r in rows if r["local_port"] == port]
    assert len(bridged) == 1 and bridged[0]["addr"] == "127.0.0.1" and bridged[0]["local_addr"] == "127.0.0.1"
    cur.execute("SHOW LISTENERS")
    listeners = {r[0]: r for r in cur.fetchall()}
    assert listeners["serverless"][1] == "serverless" and listeners["serverless"][3] == port
    conn.close()
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'pgrelay_listener_clients{listener="serverless",transport="websocket"} 1.0' in text
    assert 'pgrelay_serverless_requests_total{listener="serverless",status="101"} 1.0' in text


def test_no_unix_socket_for_a_serverless_port(make_relay, tmp_path):
    port, line = serverless()
    relay = make_relay(extra_sections="[listeners]\n" + line)
    found = [p for p in tmp_path.rglob(f".s.PGSQL.{port}")]
    assert not found, found
    assert f"listening on 127.0.0.1:{port} (serverless: serverless)" in relay.log()


@pytest.mark.parametrize("line, message", [
    ("ws = port={port} role=serverless tls_cert_file=/nonexistent.pem",
     "needs both tls_cert_file and tls_key_file"),
    ("plain = port={port} tls_cert_file=/a.pem tls_key_file=/a.key",
     "apply to role=serverless listeners only"),
    ("ws = port={port} role=websocket", "role"),
])
def test_bad_serverless_listener_lines_are_refused(make_relay, line, message):
    with pytest.raises(RuntimeError) as info:
        make_relay(extra_sections="[listeners]\n" + line.format(port=free_port()) + "\n")
    assert message in str(info.value)


def test_tls_required_refuses_plain_websocket_and_serves_wss(make_relay, tmp_path):
    import ssl
    ca, cert_path, key_path = local_certificate(str(tmp_path))
    port, line = serverless()
    make_relay(settings={"client_tls_sslmode": "require", "client_tls_cert_file": str(cert_path),
                         "client_tls_key_file": str(key_path)},
               extra_sections="[listeners]\n" + line)
    plain = socket.create_connection(("127.0.0.1", port), timeout=5)
    plain.sendall(b"GET /v2 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = plain.recv(65536)
    assert head.startswith(b"HTTP/1.1 400") and b"SSL required" in head, head
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5), server_hostname="localhost")
    ws = WsClient(port, sock=tls)
    pipelined_login(ws)
    assert data_rows(ws.query("SELECT 7")) == [["7"]]


def test_a_websocket_session_outlives_serverless_request_timeout(make_relay):
    """serverless_request_timeout bounds an HTTP request (and the upgrade), not the WebSocket after it."""
    import time
    port, line = serverless()
    make_relay(settings={"serverless_request_timeout": "1"}, extra_sections="[listeners]\n" + line)
    ws = WsClient(port)
    pipelined_login(ws)
    time.sleep(2.5)
    assert data_rows(ws.query("SELECT 'still here'")) == [["still here"]]
