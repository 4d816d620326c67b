"""PostgreSQL v3 wire-protocol constants, message builders and parsers (no I/O)."""

from __future__ import annotations

import struct

# Protocol version codes found where a StartupMessage carries its version.
PROTOCOL_3_0 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

# Limits. PostgreSQL refuses startup packets above 10000 bytes.
MAX_STARTUP_PACKET = 10000
MAX_MESSAGE_LENGTH = 0x7FFFFFFF

_I32 = struct.Struct("!I")
_I32I32 = struct.Struct("!II")
pack_i32 = _I32.pack
unpack_i32 = _I32.unpack_from

# Frontend (client -> server) message types valid after the startup phase.
FRONTEND_TYPES = frozenset(b"QPBEDCHSXFdcfp")
# FRONTEND_CLASS[t]: how the relay's scanner treats a client message type.
#   0 = not forwarded (unknown, or X/p which are handled), 1 = part of an extended-protocol batch
#   that only a Sync completes (P B E D C), 2 = ends in ReadyForQuery (Q S F), 3 = neutral: COPY
#   data (d c f) and Flush (H), which leave nothing unsynced on the server.
FC_INVALID, FC_BATCH, FC_SYNC, FC_NEUTRAL = 0, 1, 2, 3
FRONTEND_CLASS = bytes(FC_BATCH if t in b"PBEDC" else FC_SYNC if t in b"QSF" else FC_NEUTRAL if t in b"dcfH"
                       else FC_INVALID for t in range(256))
# VALID_FRONTEND[t] is 1 for a type byte the relay forwards as is (Terminate and password are handled).
VALID_FRONTEND = bytes(1 if cls else 0 for cls in FRONTEND_CLASS)

READY_IDLE = b"Z\x00\x00\x00\x05I"
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"
SSL_NO = b"N"
TERMINATE = b"X\x00\x00\x00\x04"
SYNC = b"S\x00\x00\x00\x04"


def message(kind: bytes, body: bytes) -> bytes:
    """One typed message: kind byte, length, body."""
    return kind + pack_i32(len(body) + 4) + body


def cstr(text: str) -> bytes:
    return text.encode("utf-8") + b"\x00"


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstr(name) + cstr(value))


def backend_key_data(key: bytes) -> bytes:
    return message(b"K", key)


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def query(sql: str) -> bytes:
    return message(b"Q", cstr(sql))


def negotiate_protocol_version(version: int, unrecognized: list[str]) -> bytes:
    """NegotiateProtocolVersion: the full version offered (196608 for 3.0), as PostgreSQL sends it."""
    body = _I32I32.pack(version, len(unrecognized)) + b"".join(cstr(o) for o in unrecognized)
    return message(b"v", body)


def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = pack_i32(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return pack_i32(len(body) + 4) + body


def cancel_request(key: bytes) -> bytes:
    """A CancelRequest for a BackendKeyData key (pid and secret; the secret is longer from 3.2)."""
    return _I32I32.pack(8 + len(key), CANCEL_REQUEST_CODE) + key


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(b"p", cstr(mechanism) + pack_i32(len(data)) + data)


def error_response(severity: str, sqlstate: str, text: str, detail: str | None = None,
                   hint: str | None = None, kind: bytes = b"E") -> bytes:
    """An ErrorResponse (or NoticeResponse with kind=b'N') built from its fields."""
    body = b"S" + cstr(severity) + b"V" + cstr(severity) + b"C" + cstr(sqlstate) + b"M" + cstr(text)
    if detail:
        body += b"D" + cstr(detail)
    if hint:
        body += b"H" + cstr(hint)
    return message(kind, body + b"\x00")


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body; tolerant of missing terminators."""
    fields: dict[str, str] = {}
    pos, end = 0, len(body)
    while pos < end and body[pos] != 0:
        code = chr(body[pos])
        nul = body.find(b"\x00", pos + 1)
        if nul < 0:
            nul = end
        fields[code] = body[pos + 1:nul].decode("utf-8", "replace")
        pos = nul + 1
    return fields


def parse_cstrings(body: bytes, start: int = 0) -> list[str]:
    """Split a run of NUL-terminated strings; raises ValueError on bad framing or encoding."""
    out = []
    pos, end = start, len(body)
    while pos < end:
        nul = body.find(b"\x00", pos)
        if nul < 0:
            raise ValueError("missing string terminator")
        out.append(body[pos:nul].decode("utf-8"))
        pos = nul + 1
    return out


def parse_startup_params(body: bytes) -> list[tuple[str, str]]:
    """Key/value pairs of a StartupMessage body (after the version); ValueError if malformed."""
    if len(body) < 5 or body[-1] != 0:
        raise ValueError("startup packet is not terminated")
    items = parse_cstrings(body[4:-1])
    if len(items) % 2:
        raise ValueError("startup packet has a key without a value")
    pairs = []
    for i in range(0, len(items), 2):
        if not items[i]:
            raise ValueError("startup packet has an empty parameter name")
        pairs.append((items[i], items[i + 1]))
    return pairs


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    parts = parse_cstrings(body)
    if len(parts) != 2:
        raise ValueError("bad ParameterStatus")
    return parts[0], parts[1]


def quote_literal(value: str) -> str:
    """`value` as an escape string constant, E'...' with quotes and backslashes doubled, as PgBouncer
    quotes the values of its SET batches.

    It reads the same whatever standard_conforming_strings is on the server: a plain '...' would
    take backslashes as escapes when another client left it off (C:\\temp\\ then ends the string
    early). A NUL can never be in a PostgreSQL string and would cut the query short: ValueError.
    """
    if "\x00" in value:
        raise ValueError("a NUL cannot be quoted as a PostgreSQL literal")
    return "E'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def data_row(body: bytes) -> list[str | None]:
    """The values of a DataRow in text format (NULL is None), decoded as UTF-8."""
    count = int.from_bytes(body[:2], "big")
    pos, out = 2, []
    for _ in range(count):
        length = int.from_bytes(body[pos:pos + 4], "big", signed=True)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos:pos + length].decode("utf-8", "replace"))
            pos += length
    return out
