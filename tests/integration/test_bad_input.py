"""Malformed client input (bad lengths, bad startup packets, out-of-order messages, bad options, limits): the offending client is refused or closed and pgrelay keeps serving."""

from __future__ import annotations

import os
import struct
import time

import psycopg2
import pytest

from ..support import RawClient, data_rows, message, query_message, startup_packet, wait_until

PROTOCOL_3_0 = 196608
SSL_REQUEST = struct.pack("!II", 8, 80877103)
CANCEL_REQUEST_CODE = 80877102
OPTIONS_REFUSAL = ("unsupported options startup parameter: only '-c config=val' and '--config=val' "
                   "are allowed")
MAX_CLIENT_CONN_REFUSAL = "no more connections allowed (max_client_conn)"


# -- helpers --------------------------------------------------------------------------------

def assert_serves(relay, **kw) -> None:
    """A fresh psycopg2 client logs in through pgrelay and runs SELECT 1."""
    conn = psycopg2.connect(relay.dsn(**kw), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def assert_refused(raw: RawClient, sqlstate: str, text: str, exact: bool = True) -> dict[str, str]:
    """The client's next message is a FATAL ErrorResponse with this SQLSTATE and text, then a close."""
    fields = raw.read_error()
    assert fields["S"] == "FATAL", fields
    assert fields["C"] == sqlstate, fields
    if exact:
        assert fields["M"] == text, fields
    else:
        assert text in fields["M"], fields
    assert raw.closed(), "pgrelay kept the connection open after a FATAL error"
    raw.close()
    return fields


def logged_in(relay, **params) -> RawClient:
    raw = RawClient(relay.port)
    raw.login(**params)
    return raw


def raw_startup(version: int, body: bytes) -> bytes:
    """A startup packet with a hand-made parameter section (`body` must include any terminators)."""
    payload = struct.pack("!I", version) + body
    return struct.pack("!I", len(payload) + 4) + payload


def backend_pid_raw(raw: RawClient) -> int:
    return int(data_rows(raw.query("SELECT pg_backend_pid()"))[0][0])


# -- message framing after login -------------------------------------------------------------

@pytest.mark.parametrize("in_transaction", [False, True], ids=["no-server", "server-in-transaction"])
def test_message_length_below_4(relay, pg, in_transaction):
    raw = logged_in(relay)
    pid = None
    if in_transaction:
        msgs = raw.query("BEGIN")
        assert msgs[-1] == (b"Z", b"T")
        pid = backend_pid_raw(raw)
    raw.send(b"Q" + struct.pack("!I", 2) + b"xx")
    assert_refused(raw, "08P01", "bad packet header", exact=False)
    assert_serves(relay)
    if in_transaction:
        # The server was inside the client's transaction: it must be closed, not reused.
        wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0",
                   message=f"backend {pid} of the refused client to go away")


@pytest.mark.parametrize("length", [0x7FFFFFF0, 0xFFFFFFFF], ids=hex)
def test_message_length_near_2_31(relay, length):
    raw = logged_in(relay)
    raw.send(b"Q" + struct.pack("!I", length) + b"SELECT 1\0")
    assert_refused(raw, "08P01", "bad packet header", exact=False)
    assert_serves(relay)


@pytest.mark.parametrize("kind,shown", [(b"@", "'@'"), (b"\x01", "0x01")], ids=["at-sign", "0x01"])
def test_unknown_message_type_after_login(relay, kind, shown):
    raw = logged_in(relay)
    raw.send(message(kind, b"hello\0"))
    assert_refused(raw, "08P01", f"unknown pkt from client: {shown}")
    assert_serves(relay)


def test_second_startup_message_after_login(relay):
    raw = logged_in(relay)
    assert data_rows(raw.query("SELECT 7"))[0] == ["7"]
    raw.send(startup_packet())
    assert_refused(raw, "08P01", "client re-sent startup pkt")
    assert_serves(relay)


# -- startup packet framing ------------------------------------------------------------------

@pytest.mark.parametrize("length", [0x7FFFFFF0, 0xFFFFFFFF, 7, 4, 0], ids=lambda n: f"len-{n}")
def test_startup_packet_bad_length(relay, length):
    raw = RawClient(relay.port)
    raw.send(struct.pack("!II", length, PROTOCOL_3_0) + b"user\0postgres\0\0")
    fields = assert_refused(raw, "08P01", "bad packet header", exact=False)
    assert str(length) in fields["M"], fields
    assert_serves(relay)


def test_password_message_before_startup(relay):
    raw = RawClient(relay.port)
    raw.send(message(b"p", b"secret\0"))
    # 'p' 00 00 00 read as a startup length is 0x70000000: refused as a bad header, not waited for.
    fields = assert_refused(raw, "08P01", "bad packet header", exact=False)
    assert str(0x70000000) in fields["M"], fields
    assert_serves(relay)


@pytest.mark.parametrize("secret", [0, 257], ids=["no-secret", "secret-over-256"])
def test_cancel_request_with_bad_length(relay, secret):
    """Protocol 3.2 secrets are 1 to 256 bytes (PostgreSQL 18); outside that the header is bad."""
    raw = RawClient(relay.port)
    raw.send(struct.pack("!II", 12 + secret, CANCEL_REQUEST_CODE) + os.urandom(4 + secret))
    assert_refused(raw, "08P01", f"bad packet header: cancel request of length {12 + secret}")
    assert_serves(relay)


def test_cancel_request_with_unknown_long_key(relay):
    """A 3.2-sized CancelRequest with a key pgrelay never issued: closed without a word."""
    raw = RawClient(relay.port)
    raw.send(struct.pack("!II", 12 + 32, CANCEL_REQUEST_CODE) + os.urandom(4 + 32))
    assert raw.closed() and raw.buf == b""
    raw.close()
    assert_serves(relay)


@pytest.mark.parametrize("body,problem", [
    (b"user\0postgres\0\0oops\0\0", "empty parameter name"),
    (b"user\0postgres\0database\0postgres", "not terminated"),  # no NUL after the last value
    # The last NUL ends the packet, so the name application_name has no terminator of its own.
    (b"user\0postgres\0database\0postgres\0application_name\0", "missing string terminator"),
    (b"user\0postgres\0database\0\0", "key without a value"),
], ids=["empty-name", "no-terminator", "name-without-terminator", "key-without-value"])
def test_startup_packet_bad_layout(relay, body, problem):
    raw = RawClient(relay.port)
    raw.send(raw_startup(PROTOCOL_3_0, body))
    fields = assert_refused(raw, "08P01", "bad startup packet", exact=False)
    assert problem in fields["M"], fields
    assert_serves(relay)


def test_protocol_v2_refused(relay):
    raw = RawClient(relay.port)
    raw.send(raw_startup(0x00020000, b"user\0postgres\0database\0postgres\0\0"))
    assert_refused(raw, "0A000", "old V2 protocol not supported")
    assert_serves(relay)


def test_protocol_v4_refused(relay):
    raw = RawClient(relay.port)
    raw.send(raw_startup(0x00040000, b"user\0postgres\0database\0postgres\0\0"))
    assert_refused(raw, "0A000", "unsupported frontend protocol 4.0: server supports 3.0 to 3.2")
    assert_serves(relay)


@pytest.mark.parametrize("version,params,unknown,offered", [
    (0x00030003, {}, [], 0x00030002),
    (PROTOCOL_3_0, {"_pq_.foo": "bar"}, ["_pq_.foo"], PROTOCOL_3_0),
    (0x00030002, {"_pq_.foo": "bar", "_pq_.baz": "1"}, ["_pq_.foo", "_pq_.baz"], 0x00030002),
], ids=["3.3", "_pq_.foo", "3.2+_pq_"])
def test_negotiate_protocol_version(relay, version, params, unknown, offered):
    """As PostgreSQL 18: the full version offered (3.2 at most, else the one asked) and the unknown
    _pq_ options (test_protocol_32.py compares it with PostgreSQL byte for byte)."""
    raw = RawClient(relay.port)
    raw.send(startup_packet(version=version, **params))
    kind, body = raw.read_message()
    assert kind == b"v", (kind, body)
    version_offered, count = struct.unpack("!II", body[:8])
    assert version_offered == offered
    assert count == len(unknown)
    assert [s.decode() for s in body[8:].split(b"\0")[:-1]] == unknown
    msgs = raw.read_until(b"Z")
    assert msgs[0] == (b"R", b"\0\0\0\0")
    assert msgs[-1] == (b"Z", b"I")
    assert data_rows(raw.query("SELECT 3 * 5"))[0] == ["15"]
    raw.close()
    assert_serves(relay)


# -- SSL negotiation -------------------------------------------------------------------------

@pytest.mark.parametrize("garbage,sqlstate,text", [
    (b"\x00\x00\x00\x08garbage...", "0A000", f"unsupported frontend protocol {0x6761}.{0x7262}: server supports 3.0 to 3.2"),
    # A TLS ClientHello, as sent by a client that ignores the 'N'.
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)), "08P01",
     f"bad packet header: startup packet length {0x16030100}"),
    (SSL_REQUEST, "08P01", "bad packet header: repeated or malformed 8-byte request"),
], ids=["garbage", "tls-client-hello", "second-ssl-request"])
def test_bytes_after_ssl_refusal(relay, garbage, sqlstate, text):
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST)
    assert raw.recv_exact(1) == b"N"
    raw.send(garbage)
    assert_refused(raw, sqlstate, text)
    assert_serves(relay)


def test_ssl_request_then_close_after_refusal(relay):
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST)
    assert raw.recv_exact(1) == b"N"
    raw.close()
    assert_serves(relay)


def test_ssl_request_pipelined_with_startup(relay):
    raw = RawClient(relay.port)
    raw.send(SSL_REQUEST + startup_packet(application_name="pipelined"))
    assert raw.recv_exact(1) == b"N"
    msgs = raw.read_until(b"Z")
    assert msgs[0] == (b"R", b"\0\0\0\0")
    assert msgs[-1] == (b"Z", b"I")
    assert data_rows(raw.query("SELECT current_setting('application_name')"))[0] == ["pipelined"]
    raw.close()
    assert_serves(relay)


# -- truncated packets followed by a disconnect ---------------------------------------------

@pytest.mark.parametrize("sent", [
    b"\x00\x00",                                     # half a length word
    SSL_REQUEST[:6],                                 # half an SSLRequest
    startup_packet()[:20],                           # header plus part of the parameters
], ids=["half-length", "half-ssl-request", "half-startup"])
def test_truncated_startup_then_disconnect(relay, sent):
    raw = RawClient(relay.port)
    raw.send(sent)
    time.sleep(0.1)
    raw.close()
    wait_until(lambda: "client unexpected eof during login" in relay.log(),
               message="pgrelay to log the client's eof during login")
    assert_serves(relay)


def test_truncated_query_then_disconnect(make_relay, pg):
    """Partial messages reach the (single) server; it must be closed, never handed to the next client."""
    relay = make_relay(settings={"default_pool_size": 1})
    full = query_message("SELECT 'complete query' AS q")
    cuts = [
        full[:1],                   # the type byte only
        full[:3],                   # part of the length
        full[:5],                   # a whole header, no body
        full[:12],                  # part of the body
        full[:-1],                  # all but the final NUL
        full + full[:9],            # a whole message, then part of another
    ]
    killed = []
    for cut in cuts:
        raw = logged_in(relay)
        pid = backend_pid_raw(raw)
        assert pid not in killed, f"backend {pid} that received partial bytes was reused"
        raw.send(cut)
        time.sleep(0.05)
        raw.close()
        killed.append(pid)
    for n in range(20):
        conn = psycopg2.connect(relay.dsn(), connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT %s::int, pg_backend_pid()", (n,))
                value, pid = cur.fetchone()
                assert value == n
                assert pid not in killed, f"backend {pid} that received partial bytes was reused"
        finally:
            conn.close()
    for pid in killed:
        wait_until(lambda: pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "0",
                   message=f"backend {pid} that received partial bytes to be closed")


# -- startup parameters ------------------------------------------------------------------------

def test_unknown_startup_parameter_gets_postgresqls_error(relay):
    # Any startup parameter is applied as PostgreSQL applies it (pgrelay.session_state), so an
    # unknown one gets PostgreSQL's own FATAL; replication= is still pgrelay's refusal.
    raw = RawClient(relay.port)
    raw.send(startup_packet(foo="bar"))
    assert_refused(raw, "42704", 'unrecognized configuration parameter "foo"')
    raw = RawClient(relay.port)
    raw.send(startup_packet(replication="true"))
    assert_refused(raw, "08P01", "unsupported startup parameter: replication")
    assert_serves(relay)


def test_ignored_startup_parameter_accepted(make_relay):
    relay = make_relay(settings={"ignore_startup_parameters": "foo, extra_float_digits"})
    raw = RawClient(relay.port)
    msgs = raw.login(foo="bar", extra_float_digits="2")
    assert msgs[-1] == (b"Z", b"I")
    assert data_rows(raw.query("SELECT 2 + 2"))[0] == ["4"]
    raw.close()
    # A parameter that is not in the list goes to the server, which refuses an unknown one.
    raw = RawClient(relay.port)
    raw.send(startup_packet(bar="foo"))
    assert_refused(raw, "42704", 'unrecognized configuration parameter "bar"')
    assert_serves(relay)


@pytest.mark.parametrize("options,zone", [
    ("-c timezone=UTC", "UTC"),
    ("-c TimeZone=Asia/Tokyo", "Asia/Tokyo"),
    ("-ctimezone=America/Lima", "America/Lima"),
    ("--timezone=Europe/Paris", "Europe/Paris"),
])
def test_options_timezone_accepted(make_relay, options, zone):
    relay = make_relay(settings={"default_pool_size": 1})
    plain = psycopg2.connect(relay.dsn())
    with plain.cursor() as cur:
        cur.execute("SHOW TimeZone")
        default_zone = cur.fetchone()[0]
    plain.close()
    conn = psycopg2.connect(relay.dsn(options=options))
    try:
        assert conn.get_parameter_status("TimeZone") == zone
        with conn.cursor() as cur:
            cur.execute("SHOW TimeZone")
            assert cur.fetchone() == (zone,)
    finally:
        conn.close()
    # The same single server goes back to a client without options: it sees its own zone again.
    plain = psycopg2.connect(relay.dsn())
    try:
        with plain.cursor() as cur:
            cur.execute("SHOW TimeZone")
            assert cur.fetchone() == (default_zone,)
    finally:
        plain.close()


@pytest.mark.parametrize("options", ["-c=x", "--", "-x", "-c", "--timezone"])
def test_options_refused(relay, options):
    raw = RawClient(relay.port)
    raw.send(startup_packet(options=options))
    assert_refused(raw, "08P01", OPTIONS_REFUSAL)
    assert_serves(relay)


# -- databases and limits ---------------------------------------------------------------------

def test_no_such_database_without_fallback(make_relay, pg):
    relay = make_relay(databases={"postgres": f"host=127.0.0.1 port={pg.port}"})
    raw = RawClient(relay.port)
    raw.send(startup_packet(database="nope"))
    assert_refused(raw, "3D000", "no such database: nope")
    with pytest.raises(psycopg2.OperationalError, match="no such database: nope"):
        psycopg2.connect(relay.dsn(dbname="nope"), connect_timeout=5)
    assert_serves(relay)


def _try_connect(relay):
    """A connection, or None if pgrelay refused it for max_client_conn (any other error is raised)."""
    try:
        return psycopg2.connect(relay.dsn(), connect_timeout=5)
    except psycopg2.OperationalError as exc:
        if MAX_CLIENT_CONN_REFUSAL in str(exc):
            return None
        raise


def test_max_client_conn(make_relay):
    relay = make_relay(settings={"max_client_conn": 3})
    conns = [psycopg2.connect(relay.dsn(), connect_timeout=5) for _ in range(3)]
    try:
        for conn in conns:
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
        raw = RawClient(relay.port)
        raw.send(startup_packet())
        assert_refused(raw, "53300", MAX_CLIENT_CONN_REFUSAL)
        assert _try_connect(relay) is None
        conns.pop().close()
        admitted = wait_until(lambda: _try_connect(relay), timeout=5, message="a client to be admitted again")
        conns.append(admitted)
        with admitted.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
        # Three clients again: the limit still holds.
        assert _try_connect(relay) is None
    finally:
        for conn in conns:
            conn.close()
