"""Abandoned transactions: a client left mid-transaction, so its server is drained, rolled back and reused.

PgDog's connection recovery, bounded by server_rollback_timeout (0: the server is closed, as before).
A client that leaves (its socket closes, it is killed, a timeout disconnects it, or it sends
Terminate) while its server is inside a transaction, owes replies, or holds an unsynced
extended-protocol batch no longer costs a server login: pgrelay sends, after what is in flight,

- CopyFail, if a query is outstanding (it may be a COPY FROM STDIN waiting for data; PostgreSQL
  ignores CopyFail outside COPY),
- Parse/Bind/Execute of ROLLBACK and Sync, if a query is outstanding or a batch is unsynced (a bare
  Sync would commit the implicit transaction of a batch the client never synced; an extended-protocol
  COPY's own Sync is ignored by PostgreSQL, so one is needed after CopyFail),
- one Query "ROLLBACK; SELECT '<marker>'", the marker being random, so its DataRow can only be ours.

Every reply up to the marker's ReadyForQuery is read and dropped (ParameterStatus is applied: a
ROLLBACK restores reported parameters); the marker ends the recovery whatever the client had left in
flight, so no reply count has to be exact. Then the server must be idle ('I') and goes through
Pool.release as any released server does (server_reset_query in session mode, close_reason, a paused
pool's close). A server that is already marked to close (server_lifetime, RECONNECT, a changed
database), mid-message, with a cancel in flight, a SET batch running or replies owed to pgrelay's
own bookkeeping (pgrelay.prepared, pgrelay.session_state) is closed at once, as before; so is the
server of a client disconnected for a refusal (a protocol violation: where its stream stands is
not trusted).
The server waits in SV_DRAIN (shown as active) with `server.recovery` set; the janitor closes it
with "server_rollback_timeout" once it has taken longer than that.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

from . import logs, protocol
from .errors import ProtocolViolation
from .pool import SV_ACTIVE, SV_DRAIN
from .stream import WOULD_BLOCK

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

log = logging.getLogger("pgrelay.server")

_unpack = protocol._I32.unpack_from
_D, _E, _S, _Z, _I = 68, 69, 83, 90, 73
_FATAL = (b"SFATAL", b"SPANIC")
MAX_KEPT_MESSAGE = 1 << 20  # ParameterStatus or marker row bigger than this is a violation

COPY_FAIL = protocol.message(b"f", protocol.cstr("client left"))
ROLLBACK_BATCH = (protocol.message(b"P", b"\x00" + protocol.cstr("ROLLBACK") + b"\x00\x00")  # unnamed, no types
                  + protocol.message(b"B", b"\x00\x00" + b"\x00\x00" + b"\x00\x00" + b"\x00\x00")
                  + protocol.message(b"E", b"\x00" + b"\x00\x00\x00\x00")
                  + protocol.SYNC)


def copy_fail(server: "ServerConnection") -> None:
    """Queue a CopyFail for the server without calling back into its client (which is leaving)."""
    if server.out is not None:
        server.out += COPY_FAIL
        return
    try:
        sent = server.sock.send(COPY_FAIL)
    except WOULD_BLOCK:
        sent = 0
    except OSError:
        return
    if sent != len(COPY_FAIL):
        server.backlog(COPY_FAIL[sent:], None)


class Recovery:
    """One server's rollback in progress: why, its marker row, and where the reply scan stands."""

    __slots__ = ("reason", "marker", "seen", "skip", "carry", "started")

    def __init__(self, reason: str, marker: bytes, skip: int, carry: bytes):
        self.reason = reason
        self.marker = marker        # the whole DataRow message the final SELECT returns
        self.seen = False           # the marker row has arrived: the next ReadyForQuery ends it
        self.skip = skip            # bytes of the current reply that lie beyond the last buffer
        self.carry = carry          # a split header, or a message needed whole, awaiting more bytes
        self.started = time.monotonic()


def enabled(server: "ServerConnection") -> bool:
    return bool(server.relay.config.server_rollback_timeout) and server.pool.reuse


def _refusal(server: "ServerConnection") -> str:
    """Why this server cannot be rolled back and reused ('' if it can)."""
    relay = server.relay
    if relay.shutting_down:
        return "pooler is shutting down"
    if server.close_reason:
        return server.close_reason
    lifetime = server.pool.route.server_lifetime or relay.config.server_lifetime
    if lifetime and time.monotonic() - server.connect_time > lifetime:
        return "server lifetime over"
    if server.cancels:
        return "cancel request in flight"
    if getattr(server, "pfilter", False) or getattr(server, "probe", None) is not None:
        return "pgrelay's own replies owed"  # prepared statements or session state being read
    if relay.pools.get(server.pool.key) is not server.pool:
        return "pool removed"
    return ""


def abandon(server: "ServerConnection", client: "ClientConnection", reason: str) -> bool:
    """The client left its linked server in any state but clean: start the rollback and return
    True, or return False (the caller closes the server, as before)."""
    if not enabled(server) or server.state != SV_ACTIVE or client.skip or client.carry:
        return False  # mid-message the server holds a partial message: only a close ends it
    refusal = _refusal(server)
    if refusal:
        log.debug("%s not rolled back: %s", logs.server_label(server), refusal, extra=logs.fields(server))
        return False
    prefix = b""
    if server.expect:
        prefix = COPY_FAIL + ROLLBACK_BATCH
    elif client.open_batch:
        prefix = ROLLBACK_BATCH
    _start(server, reason, prefix)
    return True


def begin(server: "ServerConnection", reason: str) -> bool:
    """finish_drain: a drained server (nothing owed either way) is inside a transaction. Start its
    rollback and return True, or return False (it is closed, as before)."""
    if not enabled(server):
        return False
    refusal = _refusal(server)
    if refusal:
        log.debug("%s not rolled back: %s", logs.server_label(server), refusal, extra=logs.fields(server))
        return False
    _start(server, reason, b"")
    return True


def _start(server: "ServerConnection", reason: str, prefix: bytes) -> None:
    """Take over the reply scan, put the server in SV_DRAIN (unlinked, read on) and send the rollback."""
    text = "pgrelay rollback " + os.urandom(12).hex()
    value = text.encode()
    marker = protocol.message(b"D", b"\x00\x01" + protocol.pack_i32(len(value)) + value)
    server.recovery = Recovery(reason, marker, server.skip, server.carry)
    server.skip, server.carry = 0, b""
    if server.state != SV_DRAIN:
        server.drain()  # unlinks the client; finish_drain leaves a server with `recovery` set alone
    server.drain_start = time.monotonic()  # server_rollback_timeout counts from here
    server.write(prefix + protocol.query(f"ROLLBACK; SELECT '{text}'"))


def feed(server: "ServerConnection", data: bytes) -> None:
    """Replies of a server being rolled back: drop them, apply ParameterStatus, find the marker."""
    r = server.recovery
    if r.carry:
        buf = r.carry + data
        r.carry = b""
        pos = 0
    else:
        buf = data
        pos = r.skip
    n = len(buf)
    marker_length = len(r.marker) - 1
    while pos + 5 <= n:
        kind = buf[pos]
        length = _unpack(buf, pos + 1)[0]
        if length < 4:
            raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
        end = pos + 1 + length
        if kind == _Z or kind == _S or (kind == _D and length == marker_length):
            if length > MAX_KEPT_MESSAGE:
                raise ProtocolViolation("oversized ParameterStatus")
            if end > n:
                break
            if kind == _S:
                server._parameter_status(buf[pos + 5:end])
            elif kind == _D:
                if buf[pos:end] == r.marker:
                    r.seen = True
            else:
                server.txstatus = buf[pos + 5]
                if r.seen:
                    if end < n:
                        raise ProtocolViolation("server sent data after the rollback's ReadyForQuery")
                    _finish(server)
                    return
        elif kind == _E:
            if pos + 11 > n:
                break
            if buf[pos + 5:pos + 11] in _FATAL:
                fields = protocol.parse_fields(bytes(buf[pos + 5:end])) if end <= n else {}
                fail(server, "server sent FATAL during rollback: " + fields.get("M", "connection terminated"))
                return
        pos = end
    if pos < n:
        r.carry = bytes(buf[pos:])
        r.skip = 0
    else:
        r.skip = pos - n


def _finish(server: "ServerConnection") -> None:
    r, server.recovery = server.recovery, None
    server.expect = 0
    server.skip, server.carry = 0, b""
    stats = server.pool.stats
    if server.txstatus != _I or server.out is not None:
        stats.server_rollback_failures += 1
        server.close("rollback left the server inside a transaction" if server.txstatus != _I
                     else "rollback finished with bytes unsent")
        return
    stats.server_rollbacks += 1
    if server.relay.config.log_disconnections:
        log.info("%s server rolled back after client left (%s) in %d ms", logs.server_label(server), r.reason,
                 (time.monotonic() - r.started) * 1000, extra=logs.fields(server))
    server.pool.release(server)


def fail(server: "ServerConnection", reason: str) -> None:
    """The rollback did not finish (timeout, the server failed): count it and close the server."""
    if server.recovery is not None:
        server.recovery = None
        server.pool.stats.server_rollback_failures += 1
    server.close(reason)


def interrupted(server: "ServerConnection", reason: str) -> str:
    """ServerConnection.close of a server being rolled back, by anything else (the server lost,
    KILL, shutdown): counted as a failed rollback; the reason says it happened during one."""
    server.recovery = None
    server.pool.stats.server_rollback_failures += 1
    return f"{reason} (during rollback after client left)"
