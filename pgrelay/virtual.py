"""Virtual databases: databases pgrelay answers itself (the admin console), and their session loop.

A plugin claims a login with ``pgrelay_virtual_database`` by returning a fresh ``VirtualDatabase``
for it. The client then skips routing, client limits and pools: its login greenlet authenticates
it (``login``), sends the welcome, and keeps reading its messages (``serve``) until it leaves. Only
the simple query protocol is served; each Query gets the subclass's reply and a ReadyForQuery.
"""

from __future__ import annotations

import os
import socket
import struct
from typing import TYPE_CHECKING

from . import protocol
from .errors import ClientGone, ProtocolViolation, Reject

if TYPE_CHECKING:
    from .client import ClientConnection
    from .routing import Login

_Q, _X = ord("Q"), ord("X")
_PEERCRED = struct.Struct("3i")


def peer_uid(client: "ClientConnection") -> int | None:
    """The Unix user id of a client on a Unix socket (SO_PEERCRED), else None. A bridged client
    (client.transport: its socket is pgrelay's own socketpair) has none."""
    sock = client.sock
    if client.transport is not None or getattr(sock, "family", None) != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _pid, uid, _gid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return uid


def peer_pid(client: "ClientConnection") -> int:
    """The process id of a client on a Unix socket (SO_PEERCRED), else 0 (PgBouncer's remote_pid)."""
    sock = client.sock
    if client.transport is not None or getattr(sock, "family", None) != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return 0
    try:
        return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[0]
    except OSError:
        return 0


def same_user(client: "ClientConnection") -> bool:
    """Whether a Unix-socket client runs as pgrelay's own Unix user."""
    return peer_uid(client) == os.getuid()


class VirtualDatabase:
    """One client's session with a database served inside pgrelay. Subclasses override the hooks below."""

    name = "virtual"

    def login(self, client: "ClientConnection", login: "Login") -> None:
        """Authenticate and admit the client; raise RejectError to refuse it. Runs under
        client_login_timeout. The default authenticates per auth_type (``Relay.authenticate``)."""
        client.relay.authenticate(client, login)

    def parameters(self, client: "ClientConnection") -> list[tuple[str, str]]:
        """ParameterStatus pairs of the welcome."""
        return []

    def query(self, client: "ClientConnection", sql: str) -> bytes:
        """The reply to one Query message, without its ReadyForQuery."""
        return Reject("this database answers no queries", severity="ERROR").encode()

    def refuse(self, client: "ClientConnection", kind: int) -> tuple[bytes, str]:
        """A message other than Query and Terminate: (the reply, the reason the client is closed for)."""
        return Reject(f"unsupported message type {kind}").encode(), "bad packet"

    def closed(self, client: "ClientConnection", reason: str) -> None:
        """The session ended (called once, after the client is closed)."""


def welcome(client: "ClientConnection", virtual: VirtualDatabase) -> None:
    """AuthenticationOk, login_notify_message, ParameterStatus, BackendKeyData and ReadyForQuery."""
    relay = client.relay
    out = [protocol.AUTH_OK]
    notice = relay.config.login_notify_message
    if notice:
        out.append(protocol.error_response("NOTICE", "00000", notice, kind=b"N"))
    out.extend(protocol.parameter_status(name, value) for name, value in virtual.parameters(client))
    client.key = relay.register_client(client)
    out.append(protocol.backend_key_data(client.key))
    out.append(protocol.READY_IDLE)
    client.stream.sendall(b"".join(out))


def serve(client: "ClientConnection", virtual: VirtualDatabase) -> None:
    """Answer the client's messages in its own greenlet until it leaves or is closed."""
    from .pool import CL_CLOSED
    stream = client.stream
    relay = client.relay
    reason = "client close request"
    try:
        while client.state != CL_CLOSED:
            try:
                kind, body = stream.read_message(client.max_length)
            except ProtocolViolation as exc:
                reason = str(exc)
                client.disconnect(reason, relay.translate_error(exc, "relay", client))
                return
            except (ClientGone, OSError):
                reason = "client unexpected eof"
                client.disconnect(reason)
                return
            client.touched = True
            if kind == _X:
                client.disconnect(reason)
                return
            if kind != _Q:
                reply, reason = virtual.refuse(client, kind)
                stream.try_send(reply)
                client.disconnect(reason, Reject(reason))
                return
            end = body.find(b"\0")
            if end < 0:
                reason = "incomplete query"
                client.disconnect(reason, Reject(reason))
                return
            try:
                sql = body[:end].decode("utf-8")  # up to the first NUL, as PgBouncer reads a query
            except UnicodeDecodeError:
                reply = Reject("invalid byte sequence for encoding \"UTF8\"", "22021", severity="ERROR").encode()
            else:
                try:
                    reply = virtual.query(client, sql)
                except (ClientGone, OSError):
                    if client.state != CL_CLOSED:
                        reason = "client unexpected eof"
                        client.disconnect(reason)
                    return
                except Exception as exc:  # a bug in a command: reported, the session goes on
                    relay.internal_error(exc, "relay", f"{client.label} internal error in {virtual.name}",
                                         client=client)
                    reply = Reject("internal error", "XX000", severity="ERROR").encode()
            if client.state == CL_CLOSED:
                return
            try:
                stream.sendall(reply + protocol.READY_IDLE)
            except (ClientGone, OSError):
                reason = "client write failed"
                client.disconnect(reason)
                return
        reason = client.close_reason or reason
    finally:
        try:
            virtual.closed(client, client.close_reason or reason)
        except Exception as exc:
            relay.internal_error(exc, "relay", f"{client.label}: {virtual.name} failed to clean up", client=client)
