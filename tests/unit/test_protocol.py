"""pgrelay/protocol.py: exact bytes of the message builders, startup/error parsers and the frontend type table."""

import socket
import struct

import pytest

from pgrelay import protocol
from pgrelay.protocol import (
    VALID_FRONTEND, backend_key_data, cancel_request, error_response, negotiate_protocol_version,
    parameter_status, parse_fields, parse_parameter_status, parse_startup_params, startup_message,
)

V30 = b"\x00\x03\x00\x00"  # protocol 3.0 as it appears in a StartupMessage


# -- builders --------------------------------------------------------------------------------

def test_error_response_fields_and_terminator():
    body = b"SFATAL\x00VFATAL\x00C08P01\x00Mbad thing\x00\x00"
    assert error_response("FATAL", "08P01", "bad thing") == b"E" + struct.pack("!I", len(body) + 4) + body
    assert error_response("FATAL", "08P01", "bad thing") == (
        b"E\x00\x00\x00\x25SFATAL\x00VFATAL\x00C08P01\x00Mbad thing\x00\x00")


def test_error_response_detail_hint_and_notice_kind():
    body = b"SNOTICE\x00VNOTICE\x00C00000\x00Mhello\x00Dmore\x00Htry\x00\x00"
    assert error_response("NOTICE", "00000", "hello", "more", "try", kind=b"N") == (
        b"N" + struct.pack("!I", len(body) + 4) + body)
    # Empty detail/hint are left out, not sent as empty fields.
    assert error_response("ERROR", "42000", "x", "", "") == (
        b"E\x00\x00\x00\x1dSERROR\x00VERROR\x00C42000\x00Mx\x00\x00")


def test_error_response_utf8_length_counts_bytes():
    msg = error_response("FATAL", "28000", "rôle")
    (length,) = struct.unpack("!I", msg[1:5])
    assert length == len(msg) - 1
    assert msg.endswith("Mrôle".encode() + b"\x00\x00")


def test_parameter_status_bytes():
    assert parameter_status("client_encoding", "UTF8") == b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00"
    assert parameter_status("application_name", "") == b"S\x00\x00\x00\x16application_name\x00\x00"


def test_backend_key_data_bytes():
    key = b"\x00\x00\x30\x39\x12\x34\x56\x78"
    assert backend_key_data(key) == b"K\x00\x00\x00\x0c" + key


def test_negotiate_protocol_version_bytes():
    assert negotiate_protocol_version(0, ["_pq_.foo", "_pq_.b"]) == (
        b"v\x00\x00\x00\x1c" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x02" + b"_pq_.foo\x00_pq_.b\x00")
    assert negotiate_protocol_version(2, []) == b"v\x00\x00\x00\x0c\x00\x00\x00\x02\x00\x00\x00\x00"


def test_startup_message_bytes():
    assert startup_message({"user": "u", "database": "d"}) == (
        b"\x00\x00\x00\x1b" + V30 + b"user\x00u\x00database\x00d\x00\x00")
    assert startup_message({}) == b"\x00\x00\x00\x09" + V30 + b"\x00"


def test_cancel_request_bytes():
    key = bytes(range(1, 9))
    assert cancel_request(key) == b"\x00\x00\x00\x10\x04\xd2\x16\x2e" + key
    assert struct.unpack("!II", cancel_request(key)[:8]) == (16, 80877102)


def test_fixed_messages():
    assert protocol.READY_IDLE == protocol.ready_for_query(b"I") == b"Z\x00\x00\x00\x05I"
    assert protocol.query("SELECT 1") == b"Q\x00\x00\x00\x0dSELECT 1\x00"
    assert protocol.TERMINATE == b"X\x00\x00\x00\x04"
    assert protocol.SYNC == b"S\x00\x00\x00\x04"
    assert protocol.AUTH_OK == b"R\x00\x00\x00\x08\x00\x00\x00\x00"


def test_builders_understood_by_postgresql(pg):
    """startup_message and query() are accepted by a real PostgreSQL; its replies parse."""
    sock = socket.create_connection(("127.0.0.1", pg.port), timeout=10)
    buf = b""

    def read():
        nonlocal buf
        while True:
            if len(buf) >= 5:
                (length,) = struct.unpack("!I", buf[1:5])
                if len(buf) >= length + 1:
                    kind, body, buf = buf[:1], buf[5:length + 1], buf[length + 1:]
                    return kind, body
            chunk = sock.recv(65536)
            assert chunk, "PostgreSQL closed the connection"
            buf += chunk

    try:
        sock.sendall(startup_message({"user": "postgres", "database": "postgres", "application_name": "t-proto"}))
        params, keys = {}, []
        while True:
            kind, body = read()
            if kind == b"S":
                name, value = parse_parameter_status(body)
                params[name] = value
            elif kind == b"K":
                keys.append(body)
            elif kind == b"Z":
                assert body == b"I"
                break
            else:
                assert kind == b"R" and body == b"\x00\x00\x00\x00", (kind, body)
        assert params["application_name"] == "t-proto"
        assert params["client_encoding"] == "UTF8"
        assert len(keys) == 1 and len(keys[0]) == 8
        sock.sendall(protocol.query("SELECT nonexistent_column_x"))
        kind, body = read()
        assert kind == b"E"
        fields = parse_fields(body)
        assert fields["C"] == "42703"
        assert fields["S"] == "ERROR"
        assert 'column "nonexistent_column_x" does not exist' in fields["M"]
        assert read() == (b"Z", b"I")
        sock.sendall(protocol.TERMINATE)
    finally:
        sock.close()


# -- parse_startup_params ------------------------------------------------------------------

def test_parse_startup_params_valid():
    body = V30 + b"user\x00alice\x00database\x00db1\x00options\x00\x00\x00"
    assert parse_startup_params(body) == [("user", "alice"), ("database", "db1"), ("options", "")]
    assert parse_startup_params(V30 + b"\x00") == []
    assert parse_startup_params(V30 + "application_name\x00été\x00\x00".encode()) == [("application_name", "été")]


def test_parse_startup_params_roundtrip_with_builder():
    params = {"user": "bob", "database": "x y", "DateStyle": "ISO, MDY"}
    packet = startup_message(params)
    assert parse_startup_params(packet[4:]) == list(params.items())


@pytest.mark.parametrize("body", [
    V30 + b"user\x00alice",               # last string not terminated
    V30 + b"user\x00alice\x00",            # list terminator missing (last string terminated)
    V30,                                   # only the version, no terminator at all
    b"",
], ids=["unterminated-string", "no-list-terminator", "version-only", "empty"])
def test_parse_startup_params_no_terminator(body):
    with pytest.raises(ValueError):
        parse_startup_params(body)


def test_parse_startup_params_key_without_value():
    with pytest.raises(ValueError, match="key without a value"):
        parse_startup_params(V30 + b"user\x00alice\x00database\x00\x00")


def test_parse_startup_params_empty_name():
    with pytest.raises(ValueError, match="empty parameter name"):
        parse_startup_params(V30 + b"user\x00alice\x00\x00x\x00\x00")


def test_parse_startup_params_invalid_utf8():
    with pytest.raises(ValueError):
        parse_startup_params(V30 + b"user\x00\xff\xfe\x00\x00")
    with pytest.raises(ValueError):
        parse_startup_params(V30 + b"us\xc3er\x00a\x00\x00")


# -- parse_fields ----------------------------------------------------------------------------

def test_parse_fields_complete():
    body = error_response("ERROR", "42P01", "no table", "d", "h")[5:]
    assert parse_fields(body) == {"S": "ERROR", "V": "ERROR", "C": "42P01", "M": "no table", "D": "d", "H": "h"}


def test_parse_fields_missing_final_terminator():
    assert parse_fields(b"SERROR\x00C42000\x00Mboom\x00") == {"S": "ERROR", "C": "42000", "M": "boom"}
    assert parse_fields(b"SERROR\x00Mcut off") == {"S": "ERROR", "M": "cut off"}
    assert parse_fields(b"") == {}


def test_parse_fields_unknown_codes_and_bad_utf8():
    assert parse_fields(b"Zzed\x00!bang\x00Mm\x00\x00") == {"Z": "zed", "!": "bang", "M": "m"}
    assert parse_fields(b"M\xff\x00\x00") == {"M": "\ufffd"}


# -- the frontend message type table ---------------------------------------------------------

def test_valid_frontend_table():
    assert len(VALID_FRONTEND) == 256
    valid = {chr(t) for t in range(256) if VALID_FRONTEND[t]}
    assert valid == set("QPBEDCHSFdcf")
    for t in (ord("X"), ord("p"), 0, ord("0"), ord("Z"), ord("q"), 255):
        assert VALID_FRONTEND[t] == 0, chr(t)
    assert all(VALID_FRONTEND[t] in (0, 1) for t in range(256))
