"""Every published PgBouncer and Odyssey CVE replayed against pgrelay, one regression test named after each.

Each test sends the CVE's trigger (from a raw client socket towards a real pgrelay in front of a real
PostgreSQL, or from a tiny fake PostgreSQL server for the server-side ones) and checks that pgrelay
answers with a clear error or closes, logs nobody in as someone else, and is not left crashed or
spinning: a new ordinary client is served within 1 s afterwards and pgrelay's CPU is not pegged.

CVEs whose trigger an older test already replays exactly are listed here instead of duplicated:

===================  =============================================================================
CVE                  existing test
===================  =============================================================================
CVE-2015-4054        test_bad_input.py::test_password_message_before_startup,
                     test_auth.py::test_password_message_before_startup
CVE-2015-6817        test_auth_query.py::test_unknown_user_looks_exactly_like_a_wrong_password
CVE-2021-3935        test_tls.py::test_cve_2021_3935_plaintext_after_ssl_request_never_reaches_a_server
CVE-2021-43766       (Odyssey; same trigger as CVE-2021-3935) the test above
CVE-2021-43767       (Odyssey) test_tls.py::test_server_plaintext_after_accepting_tls_is_refused
CVE-2025-2291        test_auth_query.py::test_expired_role_is_refused_like_a_wrong_password
CVE-2025-12819       test_auth_query.py::test_client_search_path_never_reaches_auth_query
CVE-2026-6667        test_admin_control.py::test_stats_users_may_not_run_control_commands
===================  =============================================================================

The others have a test below (some also have an older sibling; these add the crash/spin checks).
"""
from __future__ import annotations

import base64
import os
import socket
import struct
import threading
import time

import psycopg2
import pytest

from ..support import RawClient, error_fields, message, startup_packet, wait_until

PASSWORDS = {"postgres": "pg-Pw-cve1", "alice": "alice-Pw-cve2"}
SSL_REQUEST = struct.pack("!II", 8, 80877103)


# -- helpers -------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def assert_healthy(relay) -> None:
    """pgrelay is alive, serves a new ordinary client within 1 s, and is not spinning a core."""
    assert relay.alive(), "pgrelay died"
    started = time.monotonic()
    conn = psycopg2.connect(relay.dsn(password=PASSWORDS["postgres"]), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user")
            assert cur.fetchone() == ("postgres",)
    finally:
        conn.close()
    elapsed = time.monotonic() - started
    assert elapsed < 1.0, f"a new client took {elapsed:.2f}s to be served"
    before = cpu_seconds(relay.proc.pid)
    time.sleep(0.5)
    used = cpu_seconds(relay.proc.pid) - before
    assert used < 0.25, f"pgrelay used {used:.2f}s of CPU in 0.5s while idle: spinning"


def refused(raw: RawClient, timeout: float = 5) -> dict[str, str] | None:
    """Read until the connection closes; never an AuthenticationOk. Returns the FATAL error, if one came."""
    raw.sock.settimeout(timeout)
    error = None
    try:
        while True:
            kind, body = raw.read_message()
            assert (kind, body[:4]) != (b"R", b"\0\0\0\0"), "pgrelay logged the client in"
            assert kind != b"Z", "pgrelay sent ReadyForQuery to a refused client"
            if kind == b"E":
                error = error_fields(body)
                assert error["S"] == "FATAL", error
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return error
    except TimeoutError:
        raise AssertionError("pgrelay neither refused nor closed the connection") from None
    finally:
        raw.close()


def sasl_initial(first: bytes, declared: int | None = None) -> bytes:
    mech = b"SCRAM-SHA-256\0"
    return message(b"p", mech + struct.pack("!I", len(first) if declared is None else declared) + first)


@pytest.fixture
def scram_relay(make_relay, tmp_path, pg):
    """pgrelay asking clients for SCRAM, with a 'fake' database served by a malicious FakeServer."""
    fake = FakeServer()
    users = tmp_path / "cve-users.txt"
    users.write_text("".join(f'"{u}" "{p}"\n' for u, p in PASSWORDS.items()))
    relay = make_relay(
        settings={"auth_type": "scram-sha-256", "auth_file": str(users), "server_login_retry": "0"},
        databases={"postgres": f"host=127.0.0.1 port={pg.port}",
                   "fake": f"host=127.0.0.1 port={fake.port} dbname=postgres"})
    relay.fake = fake
    yield relay
    fake.close()


def scram_started(relay, user: str = "alice", database: str = "postgres") -> RawClient:
    """A raw client that sent its StartupMessage and got AuthenticationSASL."""
    raw = RawClient(relay.port)
    raw.send(startup_packet(user, database))
    kind, body = raw.read_message()
    assert (kind, body[:4]) == (b"R", struct.pack("!I", 10)), (kind, body)
    return raw


# -- a malicious PostgreSQL server ---------------------------------------------------------------

class FakeServer:
    """Speaks just enough of the backend protocol to start a SCRAM login, then misbehaves.

    What it does is chosen by `scenario` (set before pgrelay connects): the server-first-message it
    sends, or an ErrorResponse without SQLSTATE. It records whether pgrelay answered.
    """

    def __init__(self):
        self.scenario = "?"
        self.events: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _recv(conn, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _read_message(self, conn) -> bytes:
        header = self._recv(conn, 5)
        return self._recv(conn, struct.unpack("!I", header[1:])[0] - 4)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            length, code = struct.unpack("!II", self._recv(conn, 8))
            if (length, code) == (8, 80877103):
                conn.sendall(b"N")
                length, code = struct.unpack("!II", self._recv(conn, 8))
            self._recv(conn, length - 8)
            if self.scenario == "nosqlstate":
                conn.sendall(message(b"E", b"SFATAL\0Mno sqlstate here\0\0"))
                self.events.append("error sent")
                return
            conn.sendall(message(b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0"))
            client_nonce = self._read_message(conn).split(b"r=", 1)[1].decode()
            salt = base64.b64encode(b"0123456789abcdef").decode()
            suffix, iterations = {"longnonce": ("N" * 100_000, 4096)}.get(self.scenario, ("FAKE", 0))
            if self.scenario.startswith("iterations="):
                iterations = int(self.scenario.split("=")[1])
            first = f"r={client_nonce}{suffix},s={salt},i={iterations}"
            conn.sendall(message(b"R", struct.pack("!I", 11) + first.encode()))
            try:
                self._read_message(conn)
                self.events.append("answered")
            except EOFError:
                self.events.append("closed")
        except (EOFError, OSError) as exc:
            self.events.append(f"ended: {exc!r}")
        finally:
            conn.close()

    def close(self) -> None:
        self.stopping = True
        self.thread.join(2)
        self.listener.close()


def login_to_fake(relay, scenario: str) -> dict[str, str]:
    """Log in (SCRAM) to the fake database as postgres; returns the FATAL error pgrelay sent."""
    relay.fake.scenario = scenario
    relay.fake.events.clear()
    started = time.monotonic()
    with pytest.raises(psycopg2.OperationalError) as info:
        psycopg2.connect(relay.dsn(dbname="fake", password=PASSWORDS["postgres"]), connect_timeout=10)
    elapsed = time.monotonic() - started
    assert elapsed < 2, f"refusing the fake server took {elapsed:.1f}s"
    # The client may hear the refusal before the fake server's thread has noted what pgrelay did.
    wait_until(lambda: relay.fake.events, timeout=5, message="the fake server to note the outcome")
    return str(info.value)


# -- client-side triggers ------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["database", "user"])
def test_cve_2012_4575_huge_database_or_user_name(scram_relay, field):
    # PgBouncer hit fatal() (a remote shutdown) on a too-long database name with autodb '*'.
    for size in (64, 9000, 200_000):
        raw = RawClient(scram_relay.port)
        name = "x" * size
        try:
            raw.send(startup_packet(**{"user": "alice", "database": "postgres", field: name}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # pgrelay stopped reading a packet over its limit; its error may still be readable
        if size < 10_000:  # a packet within the startup limit: asked for a password, never logged in
            kind, body = raw.read_message()
            assert kind in (b"R", b"E") and body[:4] != b"\0\0\0\0", (kind, body)
            raw.close()
        else:
            error = refused(raw)
            assert error is not None and error["C"] == "08P01", error
    assert_healthy(scram_relay)


def test_cve_2026_6664_sasl_initial_response_length_ffffffff(scram_relay):
    # Both the message length and the SASL data length as 0xFFFFFFFF (a 32-bit read_pos+len overflow).
    first = b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"
    raw = scram_started(scram_relay)
    raw.send(b"p" + struct.pack("!I", 0xFFFFFFFF) + b"SCRAM-SHA-256\0" + first)
    error = refused(raw)
    assert error is not None and error["C"] == "08P01", error
    raw = scram_started(scram_relay)
    raw.send(sasl_initial(first, declared=0xFFFFFFFF))
    error = refused(raw)
    assert error is not None and error["C"] == "08P01", error
    assert "length" in error["M"], error
    assert_healthy(scram_relay)


def test_cve_2026_19888_scram_client_final_without_nonce(scram_relay):
    raw = scram_started(scram_relay)
    raw.send(sasl_initial(b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"))
    kind, body = raw.read_message()
    assert (kind, body[:4]) == (b"R", struct.pack("!I", 11)), (kind, body)
    proof = base64.b64encode(os.urandom(32)).decode()
    for final in (f"c=biws,p={proof}", "c=biws", "", "r=", f"c=biws,r=,p={proof}"):
        raw.send(message(b"p", final.encode()))
        error = refused(raw)
        assert error is not None and error["C"] in ("08P01", "28P01"), (final, error)
        raw = scram_started(scram_relay)
        raw.send(sasl_initial(b"n,,n=,r=fyko+d2lbbFgONRv9qkxdawL"))
        raw.read_message()
    raw.close()
    assert_healthy(scram_relay)


@pytest.mark.parametrize("length", [0x7FFFFFFF, 0x80000000, 0xFFFFFFFB, 0xFFFFFFFF], ids=hex)
def test_cve_2026_6668_length_that_overflows_buffer_growth(scram_relay, length):
    # A message header claiming a length near 2^31 or 2^32 (the after-login case with a query is
    # test_bad_input.py::test_message_length_near_2_31): refused at once, never grown towards.
    raw = scram_started(scram_relay, user="postgres")
    raw.send(b"p" + struct.pack("!I", length) + b"SCRAM-SHA-256\0")
    error = refused(raw)
    assert error is not None and error["C"] == "08P01", error
    assert_healthy(scram_relay)


def test_cve_2026_107350_second_startup_during_scram_to_missing_database(scram_relay, pg):
    # PgBouncer logged the client in as the second StartupMessage's user.
    for database in ("no_such_db", "postgres"):
        raw = RawClient(scram_relay.port)
        raw.send(startup_packet("alice", database))
        kind, body = raw.read_message()
        if kind == b"E":  # refused outright: nothing to smuggle a second StartupMessage into
            assert error_fields(body)["S"] == "FATAL"
            raw.close()
            continue
        assert (kind, body[:4]) == (b"R", struct.pack("!I", 10)), (kind, body)
        raw.send(startup_packet("postgres", "postgres"))
        error = refused(raw)
        assert error is not None and error["C"] == "08P01", error
    backends = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'alice'")
    assert backends == "0", "a server was opened for the refused client"
    assert_healthy(scram_relay)


@pytest.mark.parametrize("options", ["-c=", "-c =", "-c=x", "--=", "-c"])
def test_cve_2026_107349_empty_option_name(scram_relay, options):
    raw = RawClient(scram_relay.port)
    raw.send(startup_packet("alice", "postgres", options=options))
    error = refused(raw)
    assert error is not None, "no error for a bad options value"
    assert error["C"] in ("08P01", "42704", "22023", "0A000"), error
    assert_healthy(scram_relay)


@pytest.mark.parametrize("length", [0x80000000, 0x80000001, 0xFFFFFFF8], ids=hex)
def test_cve_2026_107348_startup_length_over_2_31(scram_relay, length):
    raw = RawClient(scram_relay.port)
    raw.send(struct.pack("!II", length, 196608) + b"user\0alice\0\0")
    error = refused(raw)
    assert error is not None and error["C"] == "08P01", error
    assert_healthy(scram_relay)


# -- server-side triggers (a malicious PostgreSQL) -------------------------------------------------

def test_cve_2026_6665_long_server_nonce(scram_relay):
    # Also Odyssey 140a9a77 (SCRAM result overflow with a large server nonce).
    text = login_to_fake(scram_relay, "longnonce")
    assert "server login failed: server nonce does not extend the client nonce" in text, text
    assert scram_relay.fake.events == ["closed"], scram_relay.fake.events
    assert_healthy(scram_relay)


def test_cve_2026_6666_error_response_without_sqlstate(scram_relay):
    text = login_to_fake(scram_relay, "nosqlstate")
    assert "no sqlstate here" in text, text
    assert scram_relay.fake.events == ["error sent"], scram_relay.fake.events
    assert_healthy(scram_relay)


def test_cve_2026_6669_server_scram_iteration_count_capped(scram_relay):
    for iterations in (100_001, 10 ** 9, 2 ** 63):
        text = login_to_fake(scram_relay, f"iterations={iterations}")
        assert (f"server login failed: unacceptable SCRAM iteration count {iterations}: over pgrelay's "
                "limit of 100000, refused as a CPU denial of service") in text, text
        assert scram_relay.fake.events == ["closed"], scram_relay.fake.events  # no PBKDF2, no proof
    # At the cap, pgrelay computes and sends its proof (the fake server then hangs up).
    login_to_fake(scram_relay, "iterations=100000")
    assert scram_relay.fake.events == ["answered"], scram_relay.fake.events
    assert_healthy(scram_relay)
