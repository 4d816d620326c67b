"""Fuzz targets: pgrelay's parsers fed arbitrary bytes, each allowing only the exceptions it raises on purpose."""

from __future__ import annotations

import os
import socket
import struct
import tempfile

from pgrelay import auth, config, keys, prepared, protocol, proxy_protocol
from pgrelay.client import ClientConnection, _parse_options
from pgrelay.errors import ConfigError, ProtocolViolation, RejectError
from pgrelay.pool import Pool
from pgrelay.relay import Relay
from pgrelay.routing import Listener, Route
from pgrelay.server import ServerConnection

_I32 = struct.Struct("!I")


class Mismatch(AssertionError):
    """A target's own check failed: the parser answered differently from the reference reading."""


class Chunks:
    """Cuts fuzz input into (control, payload) parts: the first bytes choose options and split points."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def rest(self) -> bytes:
        return self.data[self.pos:]


def split(data: bytes, cuts: bytes) -> list[bytes]:
    """`data` cut at the offsets `cuts` names (each byte: the next piece's length, 0 meaning 1)."""
    out, pos = [], 0
    for c in cuts:
        if pos >= len(data):
            break
        step = c or 1
        out.append(data[pos:pos + step])
        pos += step
    if pos < len(data):
        out.append(data[pos:])
    return out


# -- a real Relay (built from an INI file, never started) for the scanners' instances -------------

_relay: Relay | None = None
_workdir = tempfile.mkdtemp(prefix="pgrelay-fuzz-")


def relay() -> Relay:
    global _relay
    if _relay is None:
        ini = os.path.join(_workdir, "fuzz.ini")
        with open(ini, "w") as f:
            f.write("[databases]\n* = host=127.0.0.1 port=1\n[pgbouncer]\nlisten_port = 1\nauth_type = trust\n"
                    "max_packet_size = 65536\n")
        _relay = Relay(ini, env={})
    return _relay


_LISTENER = Listener(name="fuzz", addr="127.0.0.1", port=1)
_socks: list = []


def new_client(prep: bool) -> ClientConnection:
    """A ClientConnection as login leaves it (on one end of a socketpair), ready for `_scan`."""
    if not _socks:
        _socks.extend(socket.socketpair())
    client = ClientConnection(relay(), _socks[0], "127.0.0.1:1", _LISTENER)
    client.prep = prep
    return client


_pools: dict[str, Pool] = {}


def new_server(mode: str) -> ServerConnection:
    pool = _pools.get(mode)
    if pool is None:
        route = Route(pool_key=("fuzz", mode), name="fuzz", hosts=(), dbname="fuzz", server_user="fuzz",
                      pool_mode=mode)
        pool = _pools[mode] = Pool(relay(), route)
    return ServerConnection(relay(), pool)


# -- targets ----------------------------------------------------------------------------------

def startup(data: bytes) -> None:
    """A startup-phase packet as ClientConnection._read_startup takes it apart: header, version,
    parameters, _pq_ options, and the options parameter. Refusals are RejectError, bad framing ValueError."""
    if len(data) < 8:
        return
    length, code = struct.unpack_from("!II", data)
    if code in (protocol.CANCEL_REQUEST_CODE, protocol.SSL_REQUEST_CODE, protocol.GSSENC_REQUEST_CODE):
        return
    if length < 8 or length > protocol.MAX_STARTUP_PACKET:
        return  # refused on the length alone
    body = data[4:length]
    try:
        keys.check_version(code)
        pairs = protocol.parse_startup_params(body)
        minor, reply, pairs = keys.negotiate(code, pairs)
        if not 0 <= minor <= keys.LATEST_MINOR:
            raise Mismatch(f"negotiated minor {minor}")
        for key, value in pairs:
            if key.lower() == "options":
                _parse_options(value)
    except (RejectError, ValueError):
        pass


def _reference_client(stream: bytes, limit: int) -> tuple[str, int, int]:
    """How the client stream reads, message by message: (end, queries, where) with end 'ok',
    'terminate' (a Terminate at `where`) or 'violation'. Counts Q/S/F headers, as the scanner does."""
    pos, n, queries = 0, len(stream), 0
    while pos + 5 <= n:
        kind = stream[pos]
        cls = protocol.FRONTEND_CLASS[kind]
        if kind == 88:
            return "terminate", queries, pos
        if cls == protocol.FC_INVALID:
            return "violation", queries, pos
        if cls == protocol.FC_SYNC:
            queries += 1
        length = _I32.unpack_from(stream, pos + 1)[0]
        if length < 4 or length > limit:
            return "violation", queries, pos
        pos += 1 + length
    return "ok", queries, pos


def _message_starts(stream: bytes, limit: int) -> set[int]:
    """Where each message of a plain reading of the client stream begins (up to a violation)."""
    pos, n, starts = 0, len(stream), {0}
    while pos + 5 <= n:
        if protocol.FRONTEND_CLASS[stream[pos]] == protocol.FC_INVALID:
            break
        length = _I32.unpack_from(stream, pos + 1)[0]
        if length < 4 or length > limit:
            break
        pos += 1 + length
        starts.add(pos)
    return starts


def client_scan(data: bytes) -> None:
    """ClientConnection._scan over the input cut into reads (as _handle calls it), checked against a
    plain reading of the whole stream. Allowed: ProtocolViolation; prepared.Named when named statements
    are tracked (prepared then takes the rest)."""
    c = Chunks(data)
    prep = bool(c.byte() & 1)
    cuts = bytes(c.byte() for _ in range(c.byte() & 15))
    stream = c.rest()
    client = new_client(prep)
    queries, consumed, outcome = 0, 0, "ok"
    for piece in split(stream, cuts):
        n = len(piece)
        try:
            if client.skip >= n and not client.carry:
                client.skip -= n
            else:
                got = client._scan(piece)
                if got < 0:
                    outcome = "terminate"
                    queries += client.term_queries
                    consumed += -got - 1
                    break
                queries += got
        except ProtocolViolation:
            outcome = "violation"
            _, _, where = _reference_client(stream, client.max_length)
            mid_message = where < consumed or consumed not in _message_starts(stream, client.max_length)
            if mid_message and client.at_boundary():
                # the refused read is not forwarded, but an earlier one sent the first bytes of a
                # message (the refused one, or one this read completes): a client at a "boundary"
                # would have its half-sent server reused by the next client
                raise Mismatch(f"violation at {where} after {consumed} bytes forwarded mid-message, yet at a "
                               "boundary") from None
            break
        except prepared.Named:
            if not prep:
                raise Mismatch("prepared.Named raised while named statements are not tracked") from None
            return
        consumed += n
    want, want_queries, where = _reference_client(stream, client.max_length)
    if outcome != want:
        raise Mismatch(f"scanner said {outcome}, reference {want} at {where}")
    if outcome == "terminate" and client.carry != b"X" and consumed != where:
        raise Mismatch(f"Terminate found at {consumed}, reference {where}")
    if outcome != "violation" and queries != want_queries:
        raise Mismatch(f"scanner counted {queries} queries, reference {want_queries}")


def _reference_server(stream: bytes) -> int:
    """Complete ReadyForQuery messages in a server stream, up to the first bad length."""
    pos, n, zs = 0, len(stream), 0
    while pos + 5 <= n:
        kind = stream[pos]
        length = _I32.unpack_from(stream, pos + 1)[0]
        if length < 4 or kind == 90 and length != 5:
            return zs
        if pos + 1 + length > n:
            return zs
        zs += kind == 90
        pos += 1 + length
    return zs


def server_scan(data: bytes) -> None:
    """ServerConnection._scan (ReadyForQuery counting, ParameterStatus, CommandComplete tags, FATAL)
    over the input cut into reads. Allowed: ProtocolViolation."""
    c = Chunks(data)
    mode = ("session", "transaction", "statement")[c.byte() % 3]
    cuts = bytes(c.byte() for _ in range(c.byte() & 15))
    stream = c.rest()
    server = new_server(mode)
    zs = 0
    for piece in split(stream, cuts):
        n = len(piece)
        try:
            if server.skip >= n and not server.carry:
                server.skip -= n
                continue
            zs += server._scan(piece)
        except ProtocolViolation:
            return
        if server.fatal_at >= 0:
            return  # _server_fatal: the server is lost
    if server.fatal_at == -1 and zs != _reference_server(stream):
        raise Mismatch(f"scanner counted {zs} ReadyForQuery, reference {_reference_server(stream)}")


_SECRET = auth.ScramSecret.from_password("fuzz", iterations=1, salt=b"fuzzsalt")


def scram(data: bytes) -> None:
    """Both ends of a SCRAM-SHA-256 exchange: the SASLInitialResponse framing pgrelay checks, client-first,
    client-final (ScramServer), server-first and server-final (ScramClient, with pass-through keys so no
    PBKDF2 runs), and stored verifiers. `%N` in the input stands for the other side's nonce. Allowed: ScramError."""
    c = Chunks(data)
    which = c.byte() % 5
    text = c.rest()
    try:
        if which == 0:  # SASLInitialResponse body, as client_auth._scram reads it, then client-first
            nul = text.find(b"\x00")
            if nul <= 0 or nul + 5 > len(text):
                return
            text[:nul].decode("ascii", "replace")
            length = protocol.unpack_i32(text, nul + 1)[0]
            if length == 0xFFFFFFFF or length != len(text) - nul - 5:
                return
            auth.ScramServer(_SECRET, b"salt", 1, b"cb" if text[0] & 1 else None).first(
                auth.SCRAM_MECHANISM, text[nul + 5:])
        elif which == 1:  # client-final after a good client-first
            server = auth.ScramServer(_SECRET if text[:1] != b"u" else None, b"salt", 1)
            server.first(auth.SCRAM_MECHANISM, b"n,,n=,r=clientnonce")
            server.final(text.replace(b"%N", server.nonce.encode()))
        elif which == 2:  # server-first
            client = auth.ScramClient(client_key=b"k" * 32, server_key=b"s" * 32)
            client.final_message(text.replace(b"%N", client.nonce.encode()))
        elif which == 3:  # server-final
            client = auth.ScramClient(client_key=b"k" * 32, server_key=b"s" * 32)
            client.expected_signature = b"v" * 32 if text[:1] == b"v" else None
            client.verify_final(text)
        else:  # a stored verifier, as userlist.txt or auth_query gives it
            auth.ScramSecret.parse(text.decode("utf-8", "replace"))
    except auth.ScramError:
        pass


def _safe_includes(text: str) -> str:
    """%include targets made relative names in the fuzzer's own empty directory (no /dev/zero)."""
    lines = []
    for line in text.splitlines():
        if line.strip().lower().startswith("%include"):
            line = line.replace("/", "_").replace("\\", "_")
        lines.append(line)
    return "\n".join(lines)


def ini(data: bytes) -> None:
    """read_ini on PgBouncer INI text, then parse_connstr and parse_options on every [databases]
    line, as the databases plugin reads them. Allowed: ConfigError."""
    text = _safe_includes(data.decode("utf-8", "replace"))
    try:
        parsed = config.read_ini(text, os.path.join(_workdir, "fuzz.ini"))
    except ConfigError:
        return
    for entries in parsed.sections.values():
        for entry in entries:
            try:
                config.parse_connstr(entry.value, entry.where)
            except ConfigError:
                pass


def connstr(data: bytes) -> None:
    """parse_connstr on one libpq-style line: every value it returns is a str. Allowed: ConfigError."""
    text = data.decode("utf-8", "replace")
    try:
        out = config.parse_connstr(text, "fuzz:1")
    except ConfigError:
        return
    for key, value in out.items():
        if not key or any(ch.isspace() for ch in key) or not isinstance(value, str):
            raise Mismatch(f"parse_connstr gave {key!r}={value!r}")


def proxy(data: bytes) -> None:
    """proxy_protocol.parse on the whole input, and Parser fed the same bytes piece by piece: both must
    agree, and a header's length lies within the input. parse raises nothing: any exception is a crash."""
    c = Chunks(data)
    cuts = bytes(c.byte() for _ in range(c.byte() & 7))
    buf = c.rest()
    whole = proxy_protocol.parse(buf)
    if isinstance(whole, proxy_protocol.Header) and not 0 < whole.length <= len(buf):
        raise Mismatch(f"header length {whole.length} of a {len(buf)}-byte input")
    parser, result = proxy_protocol.Parser(), proxy_protocol.NEED_MORE
    for piece in split(buf, cuts):
        result = parser.feed(piece)
        if result is not proxy_protocol.NEED_MORE:
            break
    if isinstance(whole, proxy_protocol.Header):
        if not isinstance(result, proxy_protocol.Parsed) or result.info != whole.info:
            raise Mismatch(f"parse gave {whole}, Parser {result}")
    elif isinstance(whole, proxy_protocol.Malformed) and isinstance(result, proxy_protocol.Parsed):
        raise Mismatch(f"parse gave {whole}, Parser {result}")
    if isinstance(whole, proxy_protocol.Header):
        info = whole.info
        _ = info.peer


TARGETS = {
    "startup": startup,
    "client_scan": client_scan,
    "server_scan": server_scan,
    "scram": scram,
    "ini": ini,
    "connstr": connstr,
    "proxy": proxy,
}

# Seed inputs: one well-formed example (or a few) per target, so the fuzzer starts inside the format.
_q = protocol.query("SELECT 1")
SEEDS = {
    "startup": [protocol.startup_message({"user": "u", "database": "d", "options": "-c a=b --c=d"}),
                protocol.startup_message({"user": "u", "_pq_.x": "1"}, version=(3 << 16) | 2)],
    "client_scan": [b"\x00\x03" + _q + protocol.message(b"P", b"\x00SELECT 1\x00\x00\x00") +
                    protocol.message(b"B", b"\x00\x00" + b"\x00" * 6) + protocol.message(b"E", b"\x00\x00\x00\x00\x00")
                    + protocol.SYNC + protocol.TERMINATE,
                    b"\x01\x02\x03\x07" + protocol.message(b"P", b"s1\x00SELECT 1\x00\x00\x00") + protocol.SYNC],
    "server_scan": [b"\x01\x02\x03\x05" + protocol.message(b"C", b"SET\x00") + protocol.parameter_status("TimeZone", "UTC")
                    + protocol.error_response("FATAL", "57P01", "bye") + protocol.READY_IDLE,
                    b"\x00\x00" + protocol.message(b"C", b"SELECT 1\x00") + protocol.ready_for_query(b"T")],
    "scram": [b"\x00n\x00\x00\x00\x00\x13n,,n=,r=clientnonce".replace(b"n\x00\x00", b"SCRAM-SHA-256\x00\x00"),
              b"\x01c=biws,r=%N,p=" + b"A" * 43 + b"=",
              b"\x02r=%Nxyz,s=c2FsdA==,i=4096",
              b"\x03v=dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnZ2dnY=",
              b"\x04" + _SECRET.encode().encode()],
    "ini": [b"[databases]\napp = host=127.0.0.1 port=5432 dbname='a b' user=x\n[pgbouncer]\nlisten_port = 6432\n"
            b"; comment\n%include other.ini\n"],
    "connstr": [b"host=127.0.0.1 port=5432 password='it''s \\'quoted\\'' dbname=x"],
    "proxy": [b"\x00PROXY TCP4 192.0.2.1 192.0.2.2 5000 6432\r\n",
              b"\x02\x05\x07" + proxy_protocol.V2_SIGNATURE + b"\x21\x11\x00\x0f" + bytes([192, 0, 2, 1, 192, 0, 2, 2])
              + b"\x13\x88\x19\x20" + b"\xea\x00\x04\x01abc"[:0] + b"\xe0\x00\x00"],
}
