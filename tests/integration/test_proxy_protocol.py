"""PROXY protocol listeners with a real pgrelay and PostgreSQL: the header's address everywhere, refusals, HAProxy."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, connect, data_rows, query_running, startup_packet, wait_until
from ..unit.test_proxy_protocol import tcp4, tcp6, tlv, v2

TRUSTED = "127.0.0.2"  # the "proxy" connects from here; plain clients from 127.0.0.1
V1 = b"PROXY TCP4 203.0.113.5 198.51.100.1 4242 6432\r\n"


def raw(port: int, source: str | None = TRUSTED) -> RawClient:
    client = RawClient.__new__(RawClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                           source_address=(source, 0) if source else None)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.buf = b""
    return client


def proxied(port: int, header: bytes, **params) -> RawClient:
    client = raw(port)
    client.send(header)
    client.login(**params)
    return client


def show_clients(relay) -> list[dict]:
    admin = connect(relay, dbname="pgbouncer")  # from 127.0.0.1: untrusted, a plain startup
    try:
        with admin.cursor() as cur:
            cur.execute("SHOW CLIENTS")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        admin.close()


def value(client: RawClient, sql: str) -> str:
    return data_rows(client.query(sql))[0][0]


@pytest.fixture
def proxy_relay(make_relay):
    return make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": f"{TRUSTED},10.9.9.0/24",
                       "admin_users": "postgres", "application_name_add_host": "1"})


def test_v1_and_v2_headers_give_the_real_address_to_show_clients_logs_and_application_name(proxy_relay):
    one = proxied(proxy_relay.port, V1, application_name="app")
    two = proxied(proxy_relay.port, v2(family=0x21, addresses=tcp6()), application_name="app")
    local = proxied(proxy_relay.port, v2(command=0))  # LOCAL: the socket's own address
    assert value(one, "SHOW application_name") == "app - 203.0.113.5:4242"
    assert value(two, "SHOW application_name") == "app - 2001:db8::7:40001"
    assert value(local, "SHOW application_name").startswith(f" - {TRUSTED}:")
    rows = [(r["addr"], r["port"]) for r in show_clients(proxy_relay) if r["database"] == "postgres"]
    assert ("203.0.113.5", 4242) in rows and ("2001:db8::7", 40001) in rows
    assert [a for a, _ in rows if a not in ("203.0.113.5", "2001:db8::7")] == [TRUSTED]
    assert "@203.0.113.5:4242 login attempt" in proxy_relay.log()
    for client in (one, two, local):
        client.close()


def test_untrusted_sender_of_a_header_is_refused_and_plain_clients_are_served(proxy_relay):
    for header in (V1, v2(addresses=tcp4())):
        client = raw(proxy_relay.port, source="127.0.0.1")
        client.send(header + startup_packet())
        assert client.closed()
    wait_until(lambda: proxy_relay.log().count("closing because: PROXY header from untrusted address") == 2)
    plain = raw(proxy_relay.port, source="127.0.0.1")
    plain.login()
    assert value(plain, "SELECT 'served'") == "served"
    assert any(r["addr"] == "127.0.0.1" for r in show_clients(proxy_relay))


@pytest.mark.parametrize("data,reason", [
    (startup_packet(), "no PROXY signature"),                              # a trusted proxy must send one
    (b"PROXY TCP4 " + b"1" * 120 + b"\r\n", "without CRLF"),              # v1 over 107 bytes
    (b"PROXY TCP4 203.0.113.5 198.51.100.1 4242\r\n", "v1 line"),
    (v2(addresses=b"", length=5000), "payload of 5000"),                  # lying length beyond the bound
    (v2(addresses=tcp4(), tlvs=b"\xea\x00\x40abc"), "overruns"),         # TLV lies about its length
    (v2(family=0x12, addresses=tcp4()), "family"),                        # UDP
    (v2(command=7, addresses=tcp4()), "command"),
    (b"\r\n\r\n\x00\r\nQUIZ\n!\x11\x00\x0c" + tcp4(), "no PROXY signature"),
])
def test_malformed_header_from_a_trusted_address_is_refused(proxy_relay, data, reason):
    client = raw(proxy_relay.port)
    client.send(data + startup_packet())
    assert client.closed()
    wait_until(lambda: "closing because: bad PROXY header: " in proxy_relay.log(), message="the refusal")
    assert reason in proxy_relay.log()
    after = proxied(proxy_relay.port, V1)
    assert value(after, "SELECT 'still served'") == "still served"


def test_stalled_header_is_cut_by_client_login_timeout(make_relay):
    relay = make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": TRUSTED, "client_login_timeout": "1"})
    for partial in (V1[:20], v2(addresses=tcp4())[:20], v2(addresses=tcp4(), length=200)):
        client = raw(relay.port)
        client.send(partial)
        started = time.monotonic()
        assert client.closed(timeout=5)
        assert time.monotonic() - started < 4
    # (the client may see its close before pgrelay has written the line)
    wait_until(lambda: relay.log().count("closing because: client_login_timeout") == 3, timeout=5,
               message="three client_login_timeout closes logged")


def test_header_split_over_packets_and_pipelined_with_the_startup(proxy_relay):
    header = v2(addresses=tcp4(src="10.20.30.40", sport=5555), tlvs=tlv(0xF1, b"x" * 100))
    client = raw(proxy_relay.port)
    for i in range(len(header)):  # one byte per packet
        client.send(header[i:i + 1])
        time.sleep(0.002)
    client.login(application_name="split")
    assert value(client, "SHOW application_name") == "split - 10.20.30.40:5555"
    coalesced = raw(proxy_relay.port)  # header and startup in one packet: the startup is not lost
    coalesced.send(V1 + startup_packet(application_name="one"))
    coalesced.read_until(b"Z")
    assert value(coalesced, "SHOW application_name") == "one - 203.0.113.5:4242"
    client.close()
    coalesced.close()


HBA = """\
host    all     all     203.0.113.0/24  trust
host    all     all     127.0.0.1/32    reject
"""


def test_hba_judges_the_real_address(make_relay, tmp_path):
    hba = tmp_path / "hba.conf"
    hba.write_text(HBA)
    relay = make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": TRUSTED, "auth_type": "hba",
                        "auth_hba_file": str(hba)})
    allowed = proxied(relay.port, V1)
    assert value(allowed, "SELECT 'allowed'") == "allowed"
    denied = raw(relay.port)
    denied.send(b"PROXY TCP4 198.51.100.9 198.51.100.1 4242 6432\r\n" + startup_packet())
    assert 'no pg_hba.conf entry for host "198.51.100.9"' in denied.read_error()["M"]
    # The proxy's own address (127.0.0.2) has no rule either: only the header's address counts.
    local = raw(relay.port)
    local.send(v2(command=0) + startup_packet())
    assert 'no pg_hba.conf entry for host "127.0.0.2"' in local.read_error()["M"]
    plain = raw(relay.port, source="127.0.0.1")  # untrusted, no header: its own address, rejected
    plain.send(startup_packet())
    assert "rejects connection" in plain.read_error()["M"]


PLUGIN = '''\
"""Test plugin: only clients that came through one AWS PrivateLink endpoint may connect."""
from pgrelay import Reject, hookimpl


@hookimpl
def pgrelay_route_client(relay, login):
    proxy = login.proxy
    if proxy is None or proxy.aws_vpce_id != "vpce-0allowed":
        return Reject(f"endpoint {proxy.aws_vpce_id if proxy else None} is not allowed")
    return None
'''


def test_routing_plugin_refuses_by_aws_vpc_endpoint_id(make_relay, tmp_path):
    plugin = tmp_path / "vpce_gate.py"
    plugin.write_text(PLUGIN)
    relay = make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": TRUSTED, "plugins": str(plugin)})

    def header(vpce: bytes) -> bytes:
        return v2(addresses=tcp4(), tlvs=tlv(0xEA, b"\x01" + vpce) + tlv(0xE0, struct.pack("!Q", 77)))

    allowed = proxied(relay.port, header(b"vpce-0allowed"))
    assert value(allowed, "SELECT 'through the endpoint'") == "through the endpoint"
    other = raw(relay.port)
    other.send(header(b"vpce-0other") + startup_packet())
    assert other.read_error()["M"] == "endpoint vpce-0other is not allowed"
    v1 = raw(relay.port)
    v1.send(V1 + startup_packet())
    assert v1.read_error()["M"] == "endpoint None is not allowed"


def test_listener_key_and_required_trusted_list(make_relay, pg, tmp_path):
    port = free_port()
    relay = make_relay({"proxy_protocol_trusted": TRUSTED, "admin_users": "postgres"},
                       extra_sections=f"[listeners]\nproxied = port={port} proxy_protocol=1\n")
    on_main = raw(relay.port)  # the main listener has proxy_protocol off: a plain startup from the proxy address
    on_main.login()
    on_main.close()
    header_on_main = raw(relay.port)
    header_on_main.send(V1 + startup_packet())
    assert header_on_main.closed()  # no PROXY listener: the header is a bad startup length
    through = proxied(port, V1)
    assert value(through, "SELECT 'proxied port'") == "proxied port"
    assert "proxied: pooled, PROXY protocol" in relay.log()
    with pytest.raises(RuntimeError, match="proxy_protocol_trusted is empty"):
        make_relay({"proxy_protocol": "1"})
    with pytest.raises(RuntimeError, match="not an address or CIDR"):
        make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": "proxy.example"})


# -- HAProxy in front of two pgrelays ----------------------------------------------------------

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def test_haproxy_send_proxy_v2_fails_over_between_two_pgrelays(make_relay, pg, tmp_path):
    # Each pgrelay maps every database to another PostgreSQL database, so a query tells which one served.
    # They are peered: a cancel that haproxy hands to the other pgrelay still cancels the query.
    ports = free_port(), free_port()
    # Peers reach each other on the Unix socket: the TCP ports want a PROXY header from 127.0.0.1.
    peers = f"[peers]\n1 = host={tmp_path} port={ports[0]}\n2 = host={tmp_path} port={ports[1]}\n"
    settings = {"proxy_protocol": "1", "proxy_protocol_trusted": "127.0.0.1", "pool_mode": "transaction",
                "verbose": "1"}
    a = make_relay({**settings, "listen_port": ports[0], "peer_id": "1"}, extra_sections=peers,
                   databases={"*": f"host=127.0.0.1 port={pg.port} dbname=postgres"}, name="a")
    b = make_relay({**settings, "listen_port": ports[1], "peer_id": "2"}, extra_sections=peers,
                   databases={"*": f"host=127.0.0.1 port={pg.port} dbname=template1"}, name="b")
    front = free_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""\
global
    maxconn 200
defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    retries 3
    option redispatch
listen pg
    bind 127.0.0.1:{front}
    balance roundrobin
    server a 127.0.0.1:{a.port} send-proxy-v2 check inter 200ms fall 1 rise 1
    server b 127.0.0.1:{b.port} send-proxy-v2 check inter 200ms fall 1 rise 1
""")
    haproxy = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        dsn = f"host=127.0.0.1 port={front} user=postgres dbname=appdb connect_timeout=5"

        def served_by(conn) -> str:
            with conn.cursor() as cur:
                cur.execute("SELECT current_database()")
                return {"postgres": "a", "template1": "b"}[cur.fetchone()[0]]

        # Long-lived sessions through haproxy: roundrobin spreads them over both pgrelays.
        sessions = []
        for _ in range(6):
            conn = wait_until(lambda: _try_connect(dsn), timeout=10, message="haproxy up")
            conn.autocommit = True
            sessions.append((served_by(conn), conn))
        assert {who for who, _ in sessions} == {"a", "b"}
        # A query on each session, cancelled through haproxy (roundrobin: the cancel connection often
        # reaches the other pgrelay, which forwards it to its peer). Rounds 1 and 2 are shifted
        # by one connection, so that each session's cancel reaches each pgrelay once.
        for shift in range(2):
            if shift:
                psycopg2.connect(dsn).close()
            for n, (who, conn) in enumerate(sessions):
                tag = f"/* cancel {shift}.{n} */"
                canceller = threading.Thread(target=_cancel_once_running, args=(pg, conn, tag))
                canceller.start()
                with pytest.raises(psycopg2.errors.QueryCanceled), conn.cursor() as cur:
                    cur.execute(f"SELECT pg_sleep(20) {tag}")
                canceller.join()
                assert served_by(conn) == who
        forwarded = (a.log() + b.log()).count("cancel request forwarded to peer")
        assert forwarded >= 4, forwarded
        # Reconnecting clients (a new connection per query, as pgbench -C), running across the kill.
        outcomes: list[tuple[float, str]] = []
        stop = threading.Event()

        def reconnecting():
            while not stop.is_set():
                try:
                    conn = psycopg2.connect(dsn)
                    try:
                        outcomes.append((time.monotonic(), served_by(conn)))
                    finally:
                        conn.close()
                except psycopg2.Error as exc:
                    outcomes.append((time.monotonic(), f"error: {exc}".strip()))

        threads = [threading.Thread(target=reconnecting) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        killed = time.monotonic()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(10)
        before = [who for at, who in outcomes if at < killed]
        after = [(at - killed, who) for at, who in outcomes if at >= killed]
        assert {"a", "b"} <= set(before), before[:20]
        assert not [w for w in before if w.startswith("error")], before
        # Past the health check's detection (inter 200ms, fall 1), every new connection reaches b.
        late = [who for at, who in after if at > 1.0]
        assert late and set(late) == {"b"}, after
        # Errors only for connections on a when it died, or sent to it before haproxy's check took it
        # out (at most two per reconnecting client; none after that, as `late` shows).
        assert len([w for _, w in after if w.startswith("error")]) <= 2 * len(threads), after
        # Sessions of the surviving pgrelay saw nothing; those of the killed one are gone.
        for who, conn in sessions:
            if who == "b":
                assert served_by(conn) == "b"
            else:
                with pytest.raises(psycopg2.Error):
                    served_by(conn)
        # pgbench through haproxy, a new connection per transaction: all served by b, none failed.
        script = tmp_path / "select.sql"
        script.write_text("SELECT 1;\n")
        bench = subprocess.run(["pgbench", "-n", "-C", "-c", "4", "-T", "3", "-f", str(script),
                                "-h", "127.0.0.1", "-p", str(front), "-U", "postgres", "appdb"],
                               capture_output=True, text=True, timeout=30)
        assert bench.returncode == 0, bench.stdout + bench.stderr
        done = int(bench.stdout.split("number of transactions actually processed: ")[1].split()[0])
        assert done > 20, bench.stdout
        assert "number of failed transactions: 0" in bench.stdout, bench.stdout
        assert b.log().count("login attempt") >= done
    finally:
        haproxy.terminate()
        out = haproxy.communicate(timeout=10)[0].decode(errors="replace")
    assert "is DOWN" in out, out


def _cancel_once_running(pg, conn, tag: str) -> None:
    """conn.cancel() once PostgreSQL runs the query marked `tag` (a cancel before it would be dropped)."""
    wait_until(lambda: query_running(pg, tag), timeout=15, message=f"the query {tag} to run")
    conn.cancel()


def _try_connect(dsn: str):
    try:
        return psycopg2.connect(dsn)
    except psycopg2.Error:
        return None


def test_tls_after_the_header_both_ways(make_relay, tmp_path):
    """The header is read without reading past it: an SSLRequest or a ClientHello sent in the same
    packet is still the TLS handshake's, and client_tls_sslmode=require counts TLS inside the proxy."""
    import ssl

    from ..support import local_certificate
    ca, cert, key = local_certificate(str(tmp_path))
    relay = make_relay({"proxy_protocol": "1", "proxy_protocol_trusted": TRUSTED, "client_tls_sslmode": "require",
                        "client_tls_cert_file": cert, "client_tls_key_file": key, "application_name_add_host": "1"})
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.set_alpn_protocols(["postgresql"])
    for direct in (False, True):
        client = raw(relay.port)
        if direct:
            client.sock = _coalesced_tls(client.sock, V1, context)
        else:
            client.send(V1 + struct.pack("!II", 8, 80877103))
            assert client.recv_exact(1) == b"S"
            client.sock = context.wrap_socket(client.sock, server_hostname="127.0.0.1")
        client.login(application_name="tls")
        assert value(client, "SHOW application_name") == "tls - 203.0.113.5:4242"
        client.close()
    plain = raw(relay.port)
    plain.send(V1 + startup_packet())
    assert "SSL required" in plain.read_error()["M"]


def _coalesced_tls(sock, header: bytes, context):
    """Direct TLS whose ClientHello leaves in the same send as the PROXY header."""
    import ssl
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    sock.sendall(header + outgoing.read())  # header and ClientHello in one packet
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            data = sock.recv(65536)
            if not data:
                raise EOFError("closed during the TLS handshake")
            incoming.write(data)
    sock.sendall(outgoing.read())
    return _BioSocket(sock, tls, incoming, outgoing)


class _BioSocket:
    """Just enough of a socket over an SSLObject for RawClient (sendall, recv, settimeout, close)."""

    def __init__(self, sock, tls, incoming, outgoing):
        self.sock, self.tls, self.incoming, self.outgoing = sock, tls, incoming, outgoing

    def sendall(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())

    def recv(self, n: int) -> bytes:
        import ssl
        while True:
            try:
                return self.tls.read(n)
            except ssl.SSLWantReadError:
                data = self.sock.recv(65536)
                if not data:
                    return b""
                self.incoming.write(data)

    def settimeout(self, t) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        self.sock.close()
