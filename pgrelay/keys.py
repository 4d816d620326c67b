"""Protocol versions 3.0 to 3.2 as PostgreSQL 18 negotiates them, and the cancel keys clients are given."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from . import peers, protocol
from .errors import FEATURE_NOT_SUPPORTED, Reject, RejectError

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

# Minor versions of protocol 3 that pgrelay speaks, as PostgreSQL 18 (3.1 was never used, but
# PostgreSQL accepts it and treats it as 3.0 with a 4-byte secret).
LATEST_MINOR = 2
PROTOCOL_3_2 = (3 << 16) | LATEST_MINOR
# BackendKeyData's secret: 4 bytes up to 3.1; from 3.2 any length up to 256, PostgreSQL 18 uses 32.
SECRET_3_0 = 4
SECRET_3_2 = 32
MAX_SECRET = 256
# A CancelRequest: length, code, pid, then the secret.
CANCEL_HEADER = 12


def check_version(code: int) -> None:
    """Refuse a StartupMessage whose major version is not 3, as PostgreSQL 18 words it."""
    major, minor = code >> 16, code & 0xFFFF
    if major != 3:
        if major < 3:
            raise RejectError(Reject("old V2 protocol not supported", FEATURE_NOT_SUPPORTED))
        raise RejectError(Reject(f"unsupported frontend protocol {major}.{minor}: "
                                 f"server supports 3.0 to 3.{LATEST_MINOR}", FEATURE_NOT_SUPPORTED))


def negotiate(code: int, pairs: list[tuple[str, str]]) -> tuple[int, bytes, list[tuple[str, str]]]:
    """What PostgreSQL 18 does with a StartupMessage's version and its `_pq_.` options.

    Returns (the minor version the session runs with, a NegotiateProtocolVersion to send first or
    b"", the other parameters). Protocol 3.0 to 3.2 is accepted as asked; a higher 3.x gets 3.2
    and a NegotiateProtocolVersion; `_pq_.` options are not refused but reported back (PostgreSQL
    18 knows none of them). The version in the message is the full one (3.0 is 196608), as libpq
    18 checks it.
    """
    check_version(code)
    minor = code & 0xFFFF
    unknown = [k for k, _ in pairs if k.startswith("_pq_.")]
    use = min(minor, LATEST_MINOR)
    reply = protocol.negotiate_protocol_version((3 << 16) | use, unknown) if minor > LATEST_MINOR or unknown else b""
    return use, reply, [(k, v) for k, v in pairs if not k.startswith("_pq_.")]


def secret_length(minor: int) -> int:
    return SECRET_3_2 if minor >= 2 else SECRET_3_0


def issue(client: "ClientConnection", server: "ServerConnection | None" = None) -> bytes:
    """Register and return the BackendKeyData key (pid + secret) `client` is given.

    In transaction and statement pooling (no `server`): pgrelay's own random pid and secret. With
    the client's own server (session pooling, direct connections): the server's pid, so that
    pg_backend_pid(), NOTIFY's sender pid and pg_terminate_backend agree with what the driver
    reports. A direct connection's server is the client's alone and closes with it: the client gets
    its real secret too (when its protocol can carry it). A session-pooled server outlives its
    client and serves the next one: each client gets a fresh secret, so that a key a departed
    client still knows never cancels its successor's query. Either way pgrelay checks each
    CancelRequest against the client holding the key and forwards it with the server's own key.
    With peer_id set, every key is pgrelay's own, stamped with the peer id (as PgBouncer's are).
    """
    relay = client.relay
    keys = relay.cancel_keys
    length = secret_length(client.protocol)
    peer_id = relay.config.peer_id
    worker = relay.worker
    if peer_id or worker is not None:
        # Peering, workers: every key is pgrelay's own and names this process (pgrelay.peers) and
        # this worker (byte 3, pgrelay.workers), wherever the CancelRequest arrives.
        while True:
            key = secrets.token_bytes(4 + length)
            key = peers.stamp(key, peer_id) if peer_id else bytes((key[0] & 0x7F,)) + key[1:]
            if worker is not None:
                key = key[:3] + bytes((worker.index,)) + key[4:]
            if key not in keys:
                keys[key] = client
                return key
    if server is not None and len(server.key) > 4:
        pid = server.key[:4]
        secret = server.key[4:]
        if not server.pool.reuse and (len(secret) == SECRET_3_0 or client.protocol >= 2) \
                and keys.get(server.key) in (None, client):
            keys[server.key] = client
            return server.key
        while True:
            key = pid + secrets.token_bytes(length)
            if key not in keys:
                keys[key] = client
                return key
    while True:
        key = bytearray(secrets.token_bytes(4 + length))
        key[0] &= 0x7F  # a positive pid, as PgBouncer makes it
        key = bytes(key)
        if key not in keys:
            keys[key] = client
            return key


def server_version(body: bytes, asked: int) -> int:
    """The minor version a server's NegotiateProtocolVersion leaves us with (raises on nonsense).

    PostgreSQL sends the full version (196608 for 3.0); older pgrelay releases sent the bare minor.
    """
    if len(body) < 8:
        raise ValueError("short NegotiateProtocolVersion")
    version = protocol.unpack_i32(body, 0)[0]
    major, minor = (version >> 16, version & 0xFFFF) if version >> 16 else (3, version)
    if major != 3 or minor > (asked & 0xFFFF):
        raise ValueError(f"server asked for protocol {major}.{minor}")
    return minor


def refuses_version(error, asked: int) -> bool:
    """Whether a server's login error is a refusal of the protocol version asked (above 3.0) by a
    server that predates NegotiateProtocolVersion: PgBouncer before 1.22 says "bad packet header"."""
    if asked & 0xFFFF == 0:
        return False
    fields = getattr(error, "fields", None) or {}
    message = fields.get("M", "")
    return fields.get("C") in ("08P01", FEATURE_NOT_SUPPORTED) and (
        "bad packet header" in message or "unsupported frontend protocol" in message)


def server_key(body: bytes, minor: int) -> bytes:
    """A server's BackendKeyData body, checked against the protocol version in use."""
    if len(body) != 8 and not (minor >= 2 and 4 < len(body) <= 4 + MAX_SECRET):
        raise ValueError("server sent a BackendKeyData of unexpected size")
    return body
