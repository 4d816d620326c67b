"""TLS towards clients and servers: negotiation, sslmodes, certificates, SCRAM-SHA-256-PLUS, CVE-2021-3935, reload, bad TLS input."""

from __future__ import annotations

import ctypes
import glob
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from types import SimpleNamespace

import psycopg
import psycopg2
import pytest
import trustme

from pgrelay.tempdb import TempPostgres

from ..support import RawClient, error_fields, query_message, startup_packet, wait_until

SSL_REQUEST = struct.pack("!II", 8, 80877103)
PG_PASSWORD = "pgpw"           # every role's password on the TLS-only PostgreSQL
CLIENT_PASSWORD = "s3cret"     # the password clients use towards pgrelay (auth_file)


# -- certificates ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """Two CAs; pgrelay's and PostgreSQL's certificates for 127.0.0.1; client certificates (CN = role)."""
    d = tmp_path_factory.mktemp("pki")
    ca, ca2 = trustme.CA(), trustme.CA()
    files = {}

    def write(name, blob, mode=0o644):
        path = str(d / name)
        blob.write_to_path(path)
        os.chmod(path, mode)
        files[name] = path
        return path

    def leaf(name, authority, *identities, common_name=None):
        cert = authority.issue_cert(*identities, common_name=common_name)
        write(f"{name}.crt", cert.cert_chain_pems[0])
        write(f"{name}.key", cert.private_key_pem, 0o600)
        return cert

    write("ca.pem", ca.cert_pem)
    write("ca2.pem", ca2.cert_pem)
    leaf("relay", ca, "127.0.0.1", "localhost")
    leaf("relay2", ca2, "127.0.0.1", "localhost")        # for certificate rotation
    leaf("pgserver", ca, "127.0.0.1")                    # PostgreSQL's: an IP only, no 'localhost'
    leaf("client_postgres", ca, "client.test", common_name="postgres")
    leaf("client_alice", ca, "client.test", common_name="alice")
    leaf("wrongca_postgres", ca2, "client.test", common_name="postgres")
    mitm_cert = ca.issue_cert("127.0.0.1", "localhost")  # a man in the middle with a valid certificate
    return SimpleNamespace(mitm_cert=mitm_cert,
                           **{k.replace(".", "_"): v for k, v in files.items()})


def client_tls(pki, mode="prefer", **extra) -> dict:
    settings = {"client_tls_sslmode": mode, "client_tls_cert_file": pki.relay_crt,
                "client_tls_key_file": pki.relay_key}
    settings.update(extra)
    return settings


# -- a PostgreSQL that accepts only TLS logins -------------------------------------------------

@pytest.fixture(scope="module")
def tls_pg(pki):
    server = TempPostgres(settings={"max_connections": "60", "log_connections": "on"}, name="tlspg")
    crt, key = os.path.join(server.base, "server.crt"), os.path.join(server.base, "server.key")
    shutil.copy(pki.pgserver_crt, crt)
    shutil.copy(pki.pgserver_key, key)
    os.chmod(key, 0o600)
    if server.owner:
        for path in (crt, key):
            os.chown(path, *server.owner)
    server.settings.update({"ssl": "on", "ssl_cert_file": f"'{crt}'", "ssl_key_file": f"'{key}'"})
    try:
        server.start()
        server.psql(f"ALTER ROLE postgres PASSWORD '{PG_PASSWORD}'")
        server.psql(f"CREATE ROLE tls_cve LOGIN PASSWORD '{PG_PASSWORD}'")
        server.psql("CREATE TABLE cve_target (note text); GRANT SELECT, INSERT ON cve_target TO tls_cve")
        with open(os.path.join(server.datadir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "hostssl all all 127.0.0.1/32 scram-sha-256\n"
                    "hostnossl all all 127.0.0.1/32 reject\n")
        server.reload()

        def plaintext_rejected():
            try:
                psycopg.connect(server.dsn(sslmode="disable", password=PG_PASSWORD), connect_timeout=5).close()
            except psycopg.OperationalError as exc:
                return "no encryption" in str(exc)
            return False
        wait_until(plaintext_rejected, message="pg_hba.conf reload")
        yield server
    finally:
        server.cleanup()


def tls_pg_db(tls_pg) -> dict:
    return {"*": f"host=127.0.0.1 port={tls_pg.port} password={PG_PASSWORD}"}


# -- clients -----------------------------------------------------------------------------------

def connect3(relay, **kw) -> psycopg.Connection:
    return psycopg.connect(relay.dsn(**kw), autocommit=True, connect_timeout=5)


def ssl_attribute(conn: psycopg.Connection, name: str) -> str | None:
    """libpq's PQsslAttribute (psycopg does not wrap it), called in the libpq psycopg itself uses."""
    lib = _bundled_libpq()
    value = lib.PQsslAttribute(ctypes.c_void_p(conn.pgconn.pgconn_ptr), name.encode())
    return value.decode() if value is not None else None


def _bundled_libpq():
    import psycopg_binary
    libs = os.path.join(os.path.dirname(psycopg_binary.__file__), os.pardir, "psycopg_binary.libs")
    lib = ctypes.CDLL(glob.glob(os.path.join(libs, "libpq-*.so*"))[0])
    lib.PQsslAttribute.restype = ctypes.c_char_p
    lib.PQsslAttribute.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


def select_one(conn) -> None:
    assert conn.execute("SELECT 1").fetchone() == (1,)


def assert_login_fails(relay, text: str, **kw) -> str:
    with pytest.raises(psycopg.OperationalError) as exc:
        connect3(relay, **kw).close()
    assert text in str(exc.value), str(exc.value)
    return str(exc.value)


def client_context(cafile=None, alpn=("postgresql",), max_version=None, min_version=None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    if max_version:
        ctx.maximum_version = max_version
    if min_version:
        ctx.minimum_version = min_version
    return ctx


class TLSClient(RawClient):
    """RawClient over TLS: SSLRequest then a handshake, or (direct) a ClientHello as the first bytes."""

    def __init__(self, port: int, context: ssl.SSLContext, direct: bool = False):
        super().__init__(port)
        if not direct:
            self.send(SSL_REQUEST)
            assert self.recv_exact(1) == b"S"
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")


def read_to_eof(sock, timeout: float = 5) -> bytes:
    """Everything the peer sends until it closes; fails if it keeps the connection open."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError, BrokenPipeError):
            return data
        except (socket.timeout, TimeoutError):
            raise AssertionError(f"pgrelay kept the connection open (received {data!r})") from None
        if not chunk:
            return data
        data += chunk


def read_fatal_then_eof(client: RawClient) -> dict[str, str]:
    """The client's next message is a FATAL ErrorResponse, and then the connection is closed."""
    fields = client.read_error()
    assert fields["S"] == "FATAL", fields
    assert read_to_eof(client.sock) == b""
    client.close()
    return fields


def write_auth_file(tmp_path, users: dict) -> str:
    path = tmp_path / "userlist.txt"
    path.write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
    return str(path)


class TLSInterceptor:
    """A man in the middle holding a valid certificate of its own: it answers the SSLRequest,
    terminates the TLS, and opens its own TLS connection upstream. Plain SCRAM cannot see it;
    SCRAM-SHA-256-PLUS (channel binding to the certificate) must."""

    def __init__(self, upstream_port: int, cert: trustme.LeafCert):
        self.upstream_port = upstream_port
        self.server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.server_ctx)
        self.server_ctx.set_alpn_protocols(["postgresql"])
        self.client_ctx = client_context()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.sessions = 0
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        up = None
        try:
            conn.settimeout(5)
            head = b""
            while len(head) < 8:
                chunk = conn.recv(8 - len(head))
                if not chunk:
                    return
                head += chunk
            assert head == SSL_REQUEST, head
            conn.sendall(b"S")
            down = self.server_ctx.wrap_socket(conn, server_side=True)
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            up.sendall(SSL_REQUEST)
            assert up.recv(1) == b"S"
            up = self.client_ctx.wrap_socket(up, server_hostname="127.0.0.1")
            self.sessions += 1
            self._pump(down, up)
        except (OSError, AssertionError):
            pass  # the session ends; the test asserts on what the client saw
        finally:
            conn.close()
            if up is not None:
                up.close()

    def _pump(self, a, b) -> None:
        for s in (a, b):
            s.settimeout(0.05)  # TLS 1.3 tickets make a socket readable without application data
        while not self.stopped.is_set():
            ready = [s for s in (a, b) if s.pending()] or select.select([a, b], [], [], 0.5)[0]
            for src in ready:
                try:
                    data = src.recv(65536)
                except (socket.timeout, TimeoutError, ssl.SSLWantReadError):
                    continue
                if not data:
                    return
                (b if src is a else a).sendall(data)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(2)
        self.listener.close()


# == 1. TLS towards clients =====================================================================

def test_scram_over_direct_and_classic_tls_negotiation(make_relay, tmp_path, pki):
    auth_file = write_auth_file(tmp_path, {"postgres": CLIENT_PASSWORD})
    relay = make_relay(settings=client_tls(pki, "prefer", auth_type="scram-sha-256", auth_file=auth_file))
    common = dict(sslmode="verify-full", sslrootcert=pki.ca_pem, password=CLIENT_PASSWORD)

    with connect3(relay, sslnegotiation="direct", **common) as conn:
        assert conn.pgconn.ssl_in_use
        assert ssl_attribute(conn, "alpn") == "postgresql"
        assert ssl_attribute(conn, "protocol") == "TLSv1.3"
        assert conn.execute("SELECT current_user, 41 + 1").fetchone() == ("postgres", 42)

    with connect3(relay, sslnegotiation="postgres", **common) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)

    # The SCRAM exchange is real: a wrong password over the same TLS is refused.
    assert_login_fails(relay, 'password authentication failed for user "postgres"',
                       sslnegotiation="direct", **dict(common, password="wrong"))
    # PgBouncer's tls=<protocol>/<cipher> (tls_get_connection_info)
    assert relay.log().count("login attempt: db=postgres user=postgres tls=TLSv1.3/TLS_") == 3


def test_psql_and_psycopg2_over_tls(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    out = subprocess.run(["psql", "-X", "-c", r"\conninfo", relay.dsn(sslmode="require")],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "SSL connection (protocol: TLSv1.3" in out.stdout, out.stdout
    out = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT 7 * 6", relay.dsn(sslmode="require")],
                         capture_output=True, text=True, timeout=20)
    assert (out.returncode, out.stdout.strip()) == (0, "42"), out.stderr

    conn = psycopg2.connect(relay.dsn(sslmode="verify-ca", sslrootcert=pki.ca_pem), connect_timeout=5)
    try:
        assert conn.info.ssl_in_use
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()
    # verify-ca checks the chain: psycopg2 trusting only the other CA is refused.
    with pytest.raises(psycopg2.OperationalError, match="certificate verify failed"):
        psycopg2.connect(relay.dsn(sslmode="verify-ca", sslrootcert=pki.ca2_pem), connect_timeout=5)


def test_client_tls_require_refuses_plaintext(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "require"))
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    fields = read_fatal_then_eof(raw)
    assert (fields["C"], fields["M"]) == ("08P01", "SSL required")
    assert_login_fails(relay, "FATAL:  SSL required", sslmode="disable")
    with connect3(relay, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        select_one(conn)


@pytest.mark.parametrize("mode", ["prefer", "allow"])
def test_client_tls_optional_modes_accept_both(make_relay, pki, mode):
    relay = make_relay(settings=client_tls(pki, mode))
    with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem) as tls_conn, \
            connect3(relay, sslmode="disable") as plain_conn:
        assert tls_conn.pgconn.ssl_in_use
        assert not plain_conn.pgconn.ssl_in_use
        select_one(tls_conn)
        select_one(plain_conn)
    log = relay.log()
    assert "tls=TLSv1.3/TLS_" in log and "tls=no replication=no" in log


def test_client_tls_disable_answers_no(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "disable"))
    assert_login_fails(relay, "server does not support SSL, but SSL was required", sslmode="require")
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST)
    assert raw.recv_exact(1) == b"N"
    raw.login()
    raw.close()
    with connect3(relay, sslmode="prefer") as conn:
        assert not conn.pgconn.ssl_in_use
        select_one(conn)


@pytest.mark.parametrize("mode", ["verify-ca", "verify-full"])
def test_client_certificate_required(make_relay, pki, mode):
    relay = make_relay(settings=client_tls(pki, mode, client_tls_ca_file=pki.ca_pem))
    server_check = dict(sslmode="verify-full", sslrootcert=pki.ca_pem)
    # No certificate: the handshake is refused.
    assert_login_fails(relay, "failed: SSL error: tlsv13 alert certificate required", **server_check)
    # A certificate from another CA: refused.
    assert_login_fails(relay, "failed: SSL error: tlsv1 alert unknown ca", sslcert=pki.wrongca_postgres_crt,
                       sslkey=pki.wrongca_postgres_key, **server_check)
    # A plaintext client: refused as in require mode.
    assert_login_fails(relay, "FATAL:  SSL required", sslmode="disable")
    # A certificate from the configured CA: accepted.
    with connect3(relay, sslcert=pki.client_postgres_crt, sslkey=pki.client_postgres_key, **server_check) as conn:
        assert conn.pgconn.ssl_in_use
        select_one(conn)
    assert relay.alive()


def test_cert_auth_matches_common_name(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "require", client_tls_ca_file=pki.ca_pem, auth_type="cert"))
    cert = dict(sslmode="verify-full", sslrootcert=pki.ca_pem, sslcert=pki.client_postgres_crt,
                sslkey=pki.client_postgres_key)
    with connect3(relay, **cert) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    # CN=postgres logging in as x.
    assert_login_fails(relay, 'FATAL:  certificate authentication failed for user "x"\nDETAIL:  The certificate\'s '
                       'common name does not match the user name.', user="x", **cert)
    # CN=alice logging in as postgres.
    assert_login_fails(relay, 'certificate authentication failed for user "postgres"',
                       **dict(cert, sslcert=pki.client_alice_crt, sslkey=pki.client_alice_key))
    # No certificate at all.
    assert_login_fails(relay, 'certificate authentication failed for user "postgres"',
                       sslmode="verify-full", sslrootcert=pki.ca_pem)
    # SQLSTATE of the refusal.
    client = TLSClient(relay.port, client_context(pki.ca_pem))
    client.send(startup_packet(user="x"))
    fields = read_fatal_then_eof(client)
    assert (fields["C"], fields["M"]) == ("28000", 'certificate authentication failed for user "x"')


def test_scram_plus_channel_binding_towards_clients(make_relay, tmp_path, pki):
    auth_file = write_auth_file(tmp_path, {"postgres": CLIENT_PASSWORD})
    relay = make_relay(settings=client_tls(pki, "prefer", auth_type="scram-sha-256", auth_file=auth_file))
    # libpq's channel_binding=require fails unless the server offered and completed SCRAM-SHA-256-PLUS.
    with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem, password=CLIENT_PASSWORD,
                  channel_binding="require") as conn:
        assert conn.pgconn.ssl_in_use
        select_one(conn)
    # Default channel_binding=prefer picks PLUS too: a client doing raw SCRAM sees it offered first.
    raw = TLSClient(relay.port, client_context(pki.ca_pem))
    raw.send(startup_packet())
    kind, body = raw.read_message()
    assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10
    assert body[4:] == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    raw.close()
    # On plaintext only SCRAM-SHA-256 is offered.
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    assert raw.read_message() == (b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")
    raw.close()
    assert_login_fails(relay, "channel binding required, but SSL not in use", sslmode="disable",
                       password=CLIENT_PASSWORD, channel_binding="require")


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    body = mechanism.encode() + b"\0" + struct.pack("!I", len(data)) + data
    return b"p" + struct.pack("!I", len(body) + 4) + body


def scram_first_answer(client: RawClient, mechanism: str, gs2: bytes) -> dict[str, str]:
    """Log in, take the SASL offer, answer with `mechanism` and a client-first-message with header `gs2`."""
    client.send(startup_packet())
    kind, body = client.read_message()
    assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10, (kind, body)
    client.send(sasl_initial_response(mechanism, gs2 + b"n=,r=rOprNGfwEbeRWgbNEkqO"))
    return read_fatal_then_eof(client)


def test_scram_channel_binding_downgrade_answered_as_postgresql_does(make_relay, tmp_path, pki, tls_pg):
    # Over TLS the server offered PLUS; a client claiming 'y' (it supports binding but believes the
    # server does not) reveals a stripped offer. PostgreSQL's own answer is the reference.
    expected = scram_first_answer(TLSClient(tls_pg.port, client_context(pki.ca_pem)), "SCRAM-SHA-256", b"y,,")
    assert (expected["C"], expected["M"]) == ("28000", "SCRAM channel binding negotiation error"), expected
    auth_file = write_auth_file(tmp_path, {"postgres": CLIENT_PASSWORD})
    relay = make_relay(settings=client_tls(pki, "prefer", auth_type="scram-sha-256", auth_file=auth_file))
    # PLUS chosen on a plaintext connection, where it was not offered.
    fields = scram_first_answer(RawClient(relay.port), "SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,")
    assert (fields["C"], fields["M"]) == ("08P01", "client selected an invalid SASL authentication mechanism")
    with connect3(relay, sslmode="require", password=CLIENT_PASSWORD) as conn:
        select_one(conn)
    fields = scram_first_answer(TLSClient(relay.port, client_context(pki.ca_pem)), "SCRAM-SHA-256", b"y,,")
    assert (fields["C"], fields["M"]) == (expected["C"], expected["M"]), fields


def test_channel_binding_exposes_man_in_the_middle_towards_clients(make_relay, tmp_path, pki):
    auth_file = write_auth_file(tmp_path, {"postgres": CLIENT_PASSWORD})
    relay = make_relay(settings=client_tls(pki, "prefer", auth_type="scram-sha-256", auth_file=auth_file))
    # A man in the middle with a certificate the client trusts: SCRAM alone cannot see it ...
    mitm = TLSInterceptor(relay.port, pki.mitm_cert)
    try:
        via_mitm = f"host=127.0.0.1 port={mitm.port} user=postgres dbname=postgres password={CLIENT_PASSWORD} " \
                   f"sslmode=verify-full sslrootcert={pki.ca_pem}"
        with psycopg.connect(via_mitm + " channel_binding=disable", connect_timeout=5, autocommit=True) as conn:
            select_one(conn)
        # ... channel binding does: pgrelay checks the binding against its own certificate.
        with pytest.raises(psycopg.OperationalError) as exc:
            psycopg.connect(via_mitm + " channel_binding=require", connect_timeout=5).close()
        # PostgreSQL's answer here is FATAL 28000 "SCRAM channel binding check failed".
        assert str(exc.value).endswith('failed: FATAL:  SCRAM channel binding check failed'), str(exc.value)
        assert mitm.sessions == 2
    finally:
        mitm.close()
    with connect3(relay, sslmode="require", password=CLIENT_PASSWORD) as conn:
        select_one(conn)


@pytest.mark.parametrize("alpn", [None, ("http/1.1",)], ids=["no-alpn", "other-alpn"])
def test_direct_tls_without_postgresql_alpn_is_closed(make_relay, pki, alpn):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    client = TLSClient(relay.port, client_context(pki.ca_pem, alpn=alpn), direct=True)
    assert client.sock.selected_alpn_protocol() is None
    try:
        client.send(startup_packet())
    except (ssl.SSLError, OSError):
        pass  # pgrelay may already have closed
    # No login: an ErrorResponse at most, never AuthenticationOk, then the close.
    data = read_to_eof(client.sock)
    assert data[:1] == b"E" and struct.unpack("!I", data[1:5])[0] == len(data) - 1, data
    assert error_fields(data[5:]) == {"S": "FATAL", "V": "FATAL", "C": "08P01",
                                      "M": 'direct TLS connection without ALPN protocol "postgresql"'}
    client.close()
    assert 'direct TLS connection without ALPN protocol "postgresql"' in relay.log()
    assert "login attempt" not in relay.log()
    with connect3(relay, sslmode="require", sslnegotiation="direct") as conn:
        assert ssl_attribute(conn, "alpn") == "postgresql"
        select_one(conn)


def test_client_tls_protocols_tlsv13_only(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer", client_tls_protocols="tlsv1.3"))
    with pytest.raises(ssl.SSLError) as exc:
        TLSClient(relay.port, client_context(pki.ca_pem, max_version=ssl.TLSVersion.TLSv1_2))
    assert "TLSV1_ALERT_PROTOCOL_VERSION" in str(exc.value), exc.value
    client = TLSClient(relay.port, client_context(pki.ca_pem, min_version=ssl.TLSVersion.TLSv1_3))
    assert client.sock.version() == "TLSv1.3"
    client.login()
    assert client.query("SELECT 1")[-1] == (b"Z", b"I")
    client.close()
    assert_login_fails(relay, "failed: SSL error: tlsv1 alert protocol version", sslmode="require",
                       ssl_max_protocol_version="TLSv1.2")
    # Control: with the default protocols the same TLS 1.2 client gets in.
    relay.settings["client_tls_protocols"] = "secure"
    relay.write_ini()
    relay.reload()
    client = TLSClient(relay.port, client_context(pki.ca_pem, max_version=ssl.TLSVersion.TLSv1_2))
    assert client.sock.version() == "TLSv1.2"
    client.login()
    client.close()


def test_cve_2021_3935_plaintext_after_ssl_request_never_reaches_a_server(make_relay, pki, tls_pg):
    relay = make_relay(settings=client_tls(pki, "prefer"), databases=tls_pg_db(tls_pg))
    injected = (startup_packet(user="tls_cve", database="postgres")
                + query_message("INSERT INTO cve_target VALUES ('injected')"))
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST + injected)  # one packet: the plaintext rides behind the SSLRequest
    fields = read_fatal_then_eof(raw)
    assert (fields["C"], fields["M"]) == ("08P01", "unencrypted data after SSL request")
    time.sleep(0.3)  # anything forwarded would have arrived by now
    assert tls_pg.psql("SELECT count(*) FROM cve_target") == "0"
    assert tls_pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'tls_cve'") == "0"
    assert "user=tls_cve" not in relay.log()
    with open(tls_pg.logfile) as f:
        assert "user=tls_cve" not in f.read()

    # Control: the same bytes sent properly, inside the TLS session, do insert the row.
    client = TLSClient(relay.port, client_context(pki.ca_pem))
    client.send(injected)
    msgs = client.read_until(b"Z")
    assert msgs[0] == (b"R", b"\0\0\0\0")
    msgs = client.read_until(b"Z")
    assert (b"C", b"INSERT 0 1\0") in msgs, msgs
    client.close()
    assert tls_pg.psql("SELECT note FROM cve_target") == "injected"
    assert "login attempt: db=postgres user=tls_cve tls=TLSv1." in relay.log()
    tls_pg.psql("DELETE FROM cve_target")


# == 2. TLS towards servers =====================================================================

def backend_ssl(tls_pg, conn) -> str:
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    return tls_pg.psql(f"SELECT ssl, version FROM pg_stat_ssl WHERE pid = {pid}")


def test_server_tls_require(make_relay, tls_pg):
    relay = make_relay(settings={"server_tls_sslmode": "require"}, databases=tls_pg_db(tls_pg))
    with connect3(relay) as conn:
        assert not conn.pgconn.ssl_in_use  # client side plaintext, server side TLS
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)


def test_server_tls_verify_full(make_relay, tls_pg, pki):
    relay = make_relay(settings={"server_tls_sslmode": "verify-full", "server_tls_ca_file": pki.ca_pem},
                       databases=tls_pg_db(tls_pg))
    with connect3(relay) as conn:
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"


def test_server_tls_verify_full_wrong_ca(make_relay, tls_pg, pki):
    relay = make_relay(settings={"server_tls_sslmode": "verify-full", "server_tls_ca_file": pki.ca2_pem,
                                 "server_login_retry": "0"},
                       databases=tls_pg_db(tls_pg))
    assert_login_fails(relay, f"FATAL:  TLS with server 127.0.0.1:{tls_pg.port} failed: TLS handshake failed: "
                              "certificate verify failed: unable to get local issuer certificate")
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    fields = read_fatal_then_eof(raw)
    assert fields["C"] == "08006", fields
    assert relay.alive()
    # pgrelay keeps running: with the right CA after a reload, clients get in.
    relay.settings["server_tls_ca_file"] = pki.ca_pem
    relay.write_ini()
    relay.reload()
    with connect3(relay) as conn:
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"


def test_server_tls_verify_full_host_name_mismatch(make_relay, tls_pg, pki):
    # The certificate names 127.0.0.1 only; 'localhost' reaches the same server but does not match.
    relay = make_relay(settings={"server_tls_sslmode": "verify-full", "server_tls_ca_file": pki.ca_pem,
                                 "server_login_retry": "0"},
                       databases={"bad": f"host=localhost port={tls_pg.port} dbname=postgres password={PG_PASSWORD}",
                                  "good": f"host=127.0.0.1 port={tls_pg.port} dbname=postgres "
                                          f"password={PG_PASSWORD}"})
    assert_login_fails(relay, f"FATAL:  TLS with server localhost:{tls_pg.port} failed: TLS handshake failed: "
                              "certificate verify failed: Hostname mismatch, certificate is not valid for "
                              "'localhost'.", dbname="bad")
    with connect3(relay, dbname="good") as conn:
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"
    # verify-ca does not check the name: the same host is accepted.
    relay.settings["server_tls_sslmode"] = "verify-ca"
    relay.write_ini()
    relay.reload()
    with connect3(relay, dbname="bad") as conn:
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"


def test_server_tls_disable_gets_pg_hba_refusal(make_relay, tls_pg):
    relay = make_relay(settings={"server_tls_sslmode": "disable"}, databases=tls_pg_db(tls_pg))
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    fields = read_fatal_then_eof(raw)
    assert fields["C"] == "28000", fields
    assert fields["M"] == ('pg_hba.conf rejects connection for host "127.0.0.1", user "postgres", '
                           'database "postgres", no encryption'), fields
    assert relay.alive()


def test_server_tls_require_against_server_without_ssl(make_relay, pg):
    assert pg.psql("SHOW ssl") == "off"
    relay = make_relay(settings={"server_tls_sslmode": "require", "server_login_retry": "0"})
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    fields = read_fatal_then_eof(raw)
    assert (fields["C"], fields["M"]) == (
        "08006", f"server 127.0.0.1:{pg.port} does not support TLS (server_tls_sslmode=require)"), fields
    # prefer falls back to plaintext with the same server.
    relay.settings["server_tls_sslmode"] = "prefer"
    relay.write_ini()
    relay.reload()
    with connect3(relay) as conn:
        select_one(conn)


class FakeServer:
    """Answers an SSLRequest with 'S' followed, in the same packet, by plaintext protocol messages."""

    def __init__(self, injected: bytes):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.injected = injected
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except (socket.timeout, TimeoutError):
            return
        with conn:
            conn.settimeout(5)
            self.received = conn.recv(8)
            conn.sendall(b"S" + self.injected)
            try:
                while True:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    self.received += chunk
            except OSError:
                pass

    def close(self):
        self.thread.join(5)
        self.listener.close()


def test_server_plaintext_after_accepting_tls_is_refused(make_relay, pg):
    # The server side of the same attack (CVE-2021-23222 in libpq): a man in the middle answers 'S'
    # and appends plaintext (AuthenticationOk, ReadyForQuery) before any handshake.
    fake = FakeServer(b"R\0\0\0\x08\0\0\0\0" + b"Z\0\0\0\x05I")
    try:
        relay = make_relay(settings={"server_tls_sslmode": "prefer", "server_login_retry": "0"},
                           databases={"fake": f"host=127.0.0.1 port={fake.port} dbname=postgres",
                                      "*": f"host=127.0.0.1 port={pg.port}"})
        raw = RawClient(relay.port)
        raw.send(startup_packet(database="fake"))
        fields = read_fatal_then_eof(raw)
        assert (fields["C"], fields["M"]) == (
            "08006", f"server 127.0.0.1:{fake.port} sent unencrypted data after accepting TLS"), fields
    finally:
        fake.close()
    assert fake.received == SSL_REQUEST  # nothing after the SSLRequest: no StartupMessage, no password
    with connect3(relay, dbname="postgres") as conn:
        select_one(conn)


def test_server_scram_plus_channel_binding(make_relay, tls_pg, pki):
    # Through pgrelay, a login to the TLS-only server works with SCRAM (PostgreSQL offers PLUS).
    relay = make_relay(settings={"server_tls_sslmode": "require"}, databases=tls_pg_db(tls_pg))
    with connect3(relay) as conn:
        select_one(conn)
    # A man in the middle between pgrelay and PostgreSQL is transparent to plain SCRAM ...
    mitm = TLSInterceptor(tls_pg.port, pki.mitm_cert)
    try:
        direct = f"host=127.0.0.1 port={mitm.port} user=postgres dbname=postgres password={PG_PASSWORD} " \
                 "sslmode=require channel_binding=disable"
        with psycopg.connect(direct, connect_timeout=5) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        # ... but pgrelay binds its SCRAM login to the certificate it saw: PostgreSQL refuses it.
        relay.databases = dict(tls_pg_db(tls_pg), viamitm=f"host=127.0.0.1 port={mitm.port} dbname=postgres "
                                                         f"password={PG_PASSWORD}")
        relay.write_ini()
        relay.reload()
        raw = RawClient(relay.port)
        raw.send(startup_packet(database="viamitm"))
        fields = read_fatal_then_eof(raw)
        assert (fields["C"], fields["M"]) == ("28000", "SCRAM channel binding check failed"), fields
        assert mitm.sessions == 2
    finally:
        mitm.close()
    assert relay.alive()


def test_scram_pass_through_to_tls_server_with_channel_binding(make_relay, tmp_path, pki, tls_pg):
    # auth_file holds PostgreSQL's own verifier: pgrelay logs in to the server with the client's SCRAM keys,
    # and binds that login to the server's certificate (PLUS) while the client binds to pgrelay's.
    verifier = tls_pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
    assert verifier.startswith("SCRAM-SHA-256$")
    auth_file = write_auth_file(tmp_path, {"postgres": verifier})
    relay = make_relay(settings=client_tls(pki, "require", auth_type="scram-sha-256", auth_file=auth_file,
                                          server_tls_sslmode="verify-full", server_tls_ca_file=pki.ca_pem),
                       databases={"*": f"host=127.0.0.1 port={tls_pg.port}"})
    with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem, password=PG_PASSWORD,
                  channel_binding="require") as conn:
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"
    assert_login_fails(relay, 'FATAL:  password authentication failed for user "postgres"',
                       sslmode="require", password="not-" + PG_PASSWORD)


def test_large_transfers_over_tls_on_both_sides(make_relay, pki, tls_pg):
    relay = make_relay(settings=client_tls(pki, "require", server_tls_sslmode="verify-full",
                                          server_tls_ca_file=pki.ca_pem),
                       databases=tls_pg_db(tls_pg))
    with connect3(relay, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use
        assert backend_ssl(tls_pg, conn) == "t|TLSv1.3"
        big = conn.execute("SELECT repeat('x', 8000000)").fetchone()[0]
        assert len(big) == 8000000 and big.count("x") == 8000000
        payload = "".join(chr(97 + i % 26) for i in range(6_000_000))
        assert conn.execute("SELECT length(%s::text), md5(%s::text)", (payload, payload)).fetchone() == (
            6_000_000, __import__("hashlib").md5(payload.encode()).hexdigest())
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE tls_copy (n int, s text) ON COMMIT DROP")
            with conn.cursor().copy("COPY tls_copy FROM STDIN") as copy:
                for i in range(30000):
                    copy.write_row((i, "z" * 100))
            assert conn.execute("SELECT count(*), sum(n), sum(length(s)) FROM tls_copy").fetchone() == (
                30000, sum(range(30000)), 3_000_000)
        rows = conn.execute("SELECT g, md5(g::text) FROM generate_series(1, 100000) g").fetchall()
        assert len(rows) == 100000 and rows[-1][0] == 100000
        with conn.pipeline():
            cursors = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(300)]
        assert [c.fetchone()[0] for c in cursors] == [i * 2 for i in range(300)]


def test_cancel_over_tls_on_both_sides(make_relay, pki, tls_pg):
    relay = make_relay(settings=client_tls(pki, "verify-full", client_tls_ca_file=pki.ca_pem,
                                          server_tls_sslmode="verify-full", server_tls_ca_file=pki.ca_pem),
                       databases=tls_pg_db(tls_pg))
    with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem, sslcert=pki.client_postgres_crt,
                  sslkey=pki.client_postgres_key) as conn:
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        # libpq 17+ opens the cancel connection with the same TLS settings (and client certificate),
        # and reports whether the cancel connection ended cleanly.
        cancel_errors = []

        def cancel():
            try:
                conn.cancel_safe(timeout=5)
            except psycopg.OperationalError as exc:
                cancel_errors.append(str(exc))

        timer = threading.Timer(0.5, cancel)
        timer.start()
        started = time.monotonic()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
        finally:
            timer.join()
        assert time.monotonic() - started < 5
        assert conn.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        # PostgreSQL ends a TLS cancel connection with close_notify; libpq reports an abrupt end.
        assert cancel_errors == []
    # libpq's old cancel API (psycopg2) sends the CancelRequest in plaintext, even for a TLS session,
    # and even though client_tls_sslmode refuses plaintext logins.
    conn2 = psycopg2.connect(relay.dsn(sslmode="verify-full", sslrootcert=pki.ca_pem, sslcert=pki.client_postgres_crt,
                                       sslkey=pki.client_postgres_key), connect_timeout=5)
    try:
        conn2.autocommit = True
        timer = threading.Timer(0.5, conn2.cancel)
        timer.start()
        try:
            with conn2.cursor() as cur, pytest.raises(psycopg2.errors.QueryCanceled):
                cur.execute("SELECT pg_sleep(10)")
        finally:
            timer.join()
        with conn2.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn2.close()
    assert relay.alive()


def test_hba_hostssl_and_hostnossl_follow_the_client_tls(make_relay, tmp_path, pki):
    hba = tmp_path / "hba.conf"
    hba.write_text("hostssl all postgres 127.0.0.1/32 cert\n"
                   "hostnossl all postgres 127.0.0.1/32 reject\n"
                   "hostnossl all alice 127.0.0.1/32 trust\n")
    relay = make_relay(settings=client_tls(pki, "prefer", client_tls_ca_file=pki.ca_pem, auth_type="hba",
                                          auth_hba_file=str(hba)))
    verify = dict(sslmode="verify-full", sslrootcert=pki.ca_pem)
    with connect3(relay, sslcert=pki.client_postgres_crt, sslkey=pki.client_postgres_key, **verify) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert_login_fails(relay, 'FATAL:  certificate authentication failed for user "postgres"', **verify)
    assert_login_fails(relay, 'FATAL:  no pg_hba.conf entry for host "127.0.0.1", user "alice", '
                              'database "postgres", SSL encryption', user="alice", **verify)
    # alice over plaintext matches the trust line (the server login as alice fails: no such role)
    raw = RawClient(relay.port)
    raw.send(startup_packet(user="alice"))
    fields = read_fatal_then_eof(raw)
    assert (fields["C"], fields["M"]) == ("28000", 'role "alice" does not exist'), fields
    # An explicit reject line: PostgreSQL's own wording for it, as PostgreSQL itself sent it earlier
    # (test_server_tls_disable_gets_pg_hba_refusal).
    raw = RawClient(relay.port)
    raw.send(startup_packet())
    fields = read_fatal_then_eof(raw)
    assert (fields["C"], fields["M"]) == ("28000", 'pg_hba.conf rejects connection for host "127.0.0.1", '
                                                   'user "postgres", database "postgres", no encryption'), fields


# == 3. Reload ==================================================================================

def test_reload_rotates_client_certificate(make_relay, tmp_path, pki):
    crt, key = str(tmp_path / "current.crt"), str(tmp_path / "current.key")
    shutil.copy(pki.relay_crt, crt)
    shutil.copy(pki.relay_key, key)
    relay = make_relay(settings=client_tls(pki, "prefer", client_tls_cert_file=crt, client_tls_key_file=key))
    old_ca = dict(sslmode="verify-full", sslrootcert=pki.ca_pem)
    new_ca = dict(sslmode="verify-full", sslrootcert=pki.ca2_pem)
    with connect3(relay, **old_ca) as before:
        select_one(before)
        assert_login_fails(relay, "failed: SSL error: certificate verify failed", **new_ca)
        shutil.copy(pki.relay2_crt, crt)
        shutil.copy(pki.relay2_key, key)
        relay.reload()
        assert "config reload failed" not in relay.log()
        # The connected client keeps its TLS session.
        assert before.execute("SELECT 2").fetchone() == (2,)
        with connect3(relay, **new_ca) as after:
            assert after.pgconn.ssl_in_use
            select_one(after)
        assert_login_fails(relay, "failed: SSL error: certificate verify failed", **old_ca)
        assert before.execute("SELECT 3").fetchone() == (3,)


def test_reload_turns_client_tls_on_and_off(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "disable"))
    with connect3(relay, sslmode="disable") as plain:
        relay.settings["client_tls_sslmode"] = "require"
        relay.write_ini()
        relay.reload()
        select_one(plain)  # established plaintext clients continue
        assert_login_fails(relay, "FATAL:  SSL required", sslmode="disable")
        with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem, sslnegotiation="direct") as tls:
            assert tls.pgconn.ssl_in_use
            select_one(tls)
            relay.settings["client_tls_sslmode"] = "disable"
            relay.write_ini()
            relay.reload()
            select_one(tls)  # and so do established TLS clients
            select_one(plain)
        assert_login_fails(relay, "server does not support SSL, but SSL was required", sslmode="require")


def test_many_concurrent_tls_logins(make_relay, tmp_path, pki):
    auth_file = write_auth_file(tmp_path, {"postgres": CLIENT_PASSWORD})
    relay = make_relay(settings=client_tls(pki, "require", auth_type="scram-sha-256", auth_file=auth_file))
    results, errors = [], []

    def one(i):
        try:
            with connect3(relay, sslmode="verify-full", sslrootcert=pki.ca_pem, password=CLIENT_PASSWORD,
                          sslnegotiation="direct" if i % 2 else "postgres") as conn:
                results.append(conn.execute("SELECT %s::int", (i,)).fetchone()[0])
        except psycopg.Error as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert sorted(results) == list(range(40))


def test_reload_with_missing_certificate_keeps_old_tls(make_relay, tmp_path, pki):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    verify = dict(sslmode="verify-full", sslrootcert=pki.ca_pem)
    with connect3(relay, **verify) as before:
        missing = str(tmp_path / "missing.crt")
        relay.settings["client_tls_cert_file"] = missing
        relay.write_ini()
        relay.reload()
        wait_until(lambda: "config reload failed, keeping the old configuration: cannot load "
                           "client_tls_cert_file/client_tls_key_file" in relay.log(), message="reload refusal")
        select_one(before)
        with connect3(relay, **verify) as after:
            assert after.pgconn.ssl_in_use
            select_one(after)


# == 4. Bad TLS input ===========================================================================

def test_garbage_instead_of_client_hello(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST)
    assert raw.recv_exact(1) == b"S"
    raw.send(startup_packet() + query_message("SELECT 1"))  # plaintext where a ClientHello belongs
    data = read_to_eof(raw.sock)
    assert data == b"", data  # no TLS alert, and above all no protocol message
    raw.close()
    assert "login attempt" not in relay.log()
    with connect3(relay, sslmode="require") as conn:
        select_one(conn)


def test_second_ssl_request_inside_tls(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    client = TLSClient(relay.port, client_context(pki.ca_pem))
    client.send(SSL_REQUEST)
    fields = read_fatal_then_eof(client)
    assert fields["C"] == "08P01", fields
    assert fields["M"] == "bad packet header: repeated or malformed 8-byte request", fields
    with connect3(relay, sslmode="require") as conn:
        select_one(conn)


def test_stalled_tls_handshake_hits_client_login_timeout(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer", client_login_timeout="1"))
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST)
    assert raw.recv_exact(1) == b"S"
    raw.send(b"\x16\x03\x01")  # the first bytes of a ClientHello, then silence
    started = time.monotonic()
    data = read_to_eof(raw.sock, timeout=5)
    assert 0.5 < time.monotonic() - started < 4
    assert data == b"", data  # the login timeout's ErrorResponse cannot be sent in plaintext mid-handshake
    raw.close()
    assert "client_login_timeout" in relay.log()
    with connect3(relay, sslmode="require") as conn:
        select_one(conn)


def test_disconnect_right_after_handshake(make_relay, pki):
    relay = make_relay(settings=client_tls(pki, "prefer"))
    for direct in (False, True):
        client = TLSClient(relay.port, client_context(pki.ca_pem), direct=direct)
        assert client.sock.version() == "TLSv1.3"
        client.close()
    wait_until(lambda: relay.log().count("client unexpected eof during login") >= 2, message="two eof closes")
    assert relay.alive()
    with connect3(relay, sslmode="require") as conn:
        select_one(conn)
