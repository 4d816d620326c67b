"""Server connections: login, the server-to-client half of the relay, parameter sync, reset and cancel."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING

import gevent
from gevent import Timeout

from . import keys, logs, notify, prepared, protocol, recovery, server_login, session_state
from .errors import CONNECTION_FAILURE, ClientGone, ProtocolViolation, Reject, ServerError
from .peer import Peer
from .pool import (CL_IDLE, MODE_STATEMENT, SERVER_STATE_NAMES, SV_ACTIVE, SV_CANCEL_WAIT, SV_CLOSED, SV_DRAIN,
                   SV_IDLE, SV_LOGIN, SV_RESET, SV_SYNC, SV_TESTED, SV_USED, UNLINKED_SPARE, change_client_state,
                   change_server_state, unlink)
from .routing import HostAddr
from .stream import RECV_SIZE, WOULD_BLOCK, Stream

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool
    from .relay import Relay

log = logging.getLogger("pgrelay.server")

_ids = itertools.count(1)
_unpack = protocol._I32.unpack_from
_Z, _S, _E, _I, _C = 90, 83, 69, 73, 67
_STATE_TAG = session_state.STATE_TAG
_FATAL = (b"SFATAL", b"SPANIC")
FATAL_PASSED = -2  # fatal_at: a FATAL went to a session-pooled client as it came (lost() adds nothing)
MAX_SERVER_META_MESSAGE = 1 << 20  # ParameterStatus / ReadyForQuery bigger than this is a violation


class ServerConnection(Peer):
    """One connection from pgrelay to a PostgreSQL server (or another pooler)."""

    __slots__ = ("relay", "pool", "id", "addr", "stream", "sock", "state", "client", "expect", "txstatus",
                 "skip", "carry", "pvals", "params", "key", "connect_time", "idle_since", "cancels",
                 "close_reason", "out", "paused", "paused_by", "swallow", "sync_data", "sync_queries",
                 "sync_error", "limit_keys", "shared", "fatal_at", "fatal_message", "cancel_client", "drain_start", "recovery",
                 "extras", "probe", "ps", "pfilter", "__weakref__")

    def __init__(self, relay: "Relay", pool: "Pool"):
        self.relay = relay
        self.pool = pool
        self.id = next(_ids)
        self.addr: HostAddr | None = None  # chosen when logging in
        self.limit_keys: tuple = ()
        self.shared: list | tuple = ()  # workers: keys the parent counts this server under (Pool.shared_keys)
        self.fatal_at = -1          # where in the last buffer a FATAL from the server began
        self.fatal_message = b""    # that FATAL, held back unless the client is disconnected
        self.stream: Stream | None = None
        self.sock = None
        self.state = SV_LOGIN
        self.client: ClientConnection | None = None
        self.expect = 0             # ReadyForQuery messages still owed for queries sent
        self.txstatus = _I          # status byte of the last ReadyForQuery
        self.skip = 0               # bytes of the current message that lie beyond the last buffer
        self.carry = b""            # a split header or a message needed whole, awaiting more bytes
        self.pvals: tuple = ()      # tracked parameter values currently set on this server
        self.params: dict[str, str] = {}
        self.key = b""
        self.connect_time = time.monotonic()
        self.idle_since = self.connect_time
        self.cancels = 0            # cancel requests in flight against this server
        self.close_reason = ""
        self.out: bytearray | None = None   # bytes for the server that did not fit its socket
        self.paused = None          # the client whose reading we paused while `out` drains
        self.paused_by = None       # the client that paused our reading while its `out` drains
        self.swallow = bytearray()  # replies to pgrelay's own queries (SET, reset) being read
        self.sync_data = b""        # a client's bytes held back until a SET batch completes
        self.sync_queries = 0
        self.sync_error: Reject | None = None
        self.cancel_client = None   # the client released while a cancel of its query was in flight
        self.drain_start = 0.0      # when the client left this server with replies owed (SV_DRAIN)
        self.recovery = None        # its rollback after the client left mid-transaction (pgrelay.recovery)
        self.extras: tuple = ()     # session-set parameters beyond the tracked ones (session_state; DIRTY: unknown)
        self.probe = None           # pgrelay's session state query being read (session_state.swallow)
        self.ps = None              # the prepared statements it has (pgrelay.prepared), once a client used one
        self.pfilter = False        # replies pass through prepared.server_data (hidden/synthesized ones owed)

    def __repr__(self) -> str:
        return f"S-{self.id}"

    @property
    def state_name(self) -> str:
        return SERVER_STATE_NAMES[self.state]

    # -- login (a greenlet per new server) --------------------------------------------------

    def login(self) -> None:
        """Connect and authenticate; hand the server to its pool or report the failure."""
        route = self.pool.route
        try:
            with Timeout(self.relay.config.server_connect_timeout or None,
                         ServerError(f"server connect timeout ({route.name})")):
                self._choose_and_connect(route)
                if self.state == SV_CLOSED:  # closed while connecting (KILL, a client gone): no login
                    self._discard()
                    return
                self.sock = self.stream.sock
                password = route.server_password
                if password is None:
                    password = self.relay.server_password(route.server_user)
                version = self.pool.server_protocol
                try:
                    self.params, self.key = server_login.login(self.relay, self.stream, route.server_user,
                                                               route.dbname, route.server_params, password, version)
                except ServerError as exc:
                    if not keys.refuses_version(exc, version):
                        raise
                    # A pooler older than NegotiateProtocolVersion (PgBouncer < 1.22) refuses 3.2:
                    # its pool asks for 3.0 from now on, and this server logs in again.
                    log.info("%s refused protocol 3.%d (%s): logging in with 3.0", logs.server_label(self),
                             version & 0xFFFF, exc, extra=logs.fields(self))
                    self.pool.server_protocol = protocol.PROTOCOL_3_0
                    self.stream.close()
                    self._choose_and_connect(route)
                    if self.state == SV_CLOSED:
                        self._discard()
                        return
                    self.sock = self.stream.sock
                    self.params, self.key = server_login.login(self.relay, self.stream, route.server_user,
                                                               route.dbname, route.server_params, password)
                if route.connect_query:
                    try:
                        server_login.simple_query(self.stream, route.connect_query, self.params)
                    except ServerError as exc:
                        raise ServerError(f"connect_query failed: {exc}", exc.fields) from None
                    session_state.after_connect_query(self)  # what it SET is this pool's default
        except ServerError as exc:
            if self.state == SV_CLOSED:  # closed while logging in: its stream went with it, no failure
                self._discard()
                return
            log.warning("%s login failed: %s", logs.server_label(self), exc, extra=logs.fields(self))
            self._discard()
            self.pool.server_login_failed(self, exc)
            return
        except Exception as exc:  # a bug: log it, count it, keep serving
            if self.state == SV_CLOSED and isinstance(exc, (OSError, ClientGone)):
                self._discard()  # closed while logging in: the read failed on its closed stream
                return
            self.relay.internal_error(exc, "server_login", f"S-{self.id}: unexpected error during server login",
                                      server=self)
            self._discard()
            self.pool.server_login_failed(self, ServerError(f"server login failed: {type(exc).__name__}"))
            return
        if self.state == SV_CLOSED:  # closed while logging in
            self._discard()
            return
        self.pvals = self.relay.tracked_values(self.params)
        self.start_reading()
        self.relay.server_connected(self)
        self.pool.server_ready(self)

    def _choose_and_connect(self, route) -> None:
        """Pick the host (the hook may refuse) and connect. With several hosts, a refusal or a failed
        connection triggers one fresh check of all hosts and one more choice: a failover may just
        have happened."""
        candidates = route.hosts + tuple(r for r in route.replicas if r not in route.hosts)
        for attempt in (1, 2):
            chosen = self.relay.choose_host(self.pool)
            if isinstance(chosen, Reject):
                if attempt == 1 and len(candidates) > 1:
                    self.relay.health.check(candidates)
                    continue
                raise ServerError(chosen.message, {"S": "FATAL", "C": chosen.sqlstate, "M": chosen.message,
                                                   **({"H": chosen.hint} if chosen.hint else {}),
                                                   **({"D": chosen.detail} if chosen.detail else {})},
                                  routing=True)
            self.addr = chosen
            log.debug("%s launching new connection to server", logs.server_label(self), extra=logs.fields(self))
            try:
                self.stream = server_login.connect(self.relay, chosen, wanted=self._wanted)
                if self.stream is None:
                    return  # closed while connecting: login() sees SV_CLOSED
                if self.relay.config.log_connections:
                    log.info("%s new connection to server%s", logs.server_label(self), logs.local_addr(self.stream),
                             extra=logs.fields(self))
                return
            except ServerError:
                if attempt == 2 or len(candidates) < 2:
                    raise
                self.relay.health.check(candidates)

    def _wanted(self) -> bool:
        return self.state != SV_CLOSED

    def _discard(self) -> None:
        self.state = SV_CLOSED
        if self.stream is not None:
            self.stream.close()

    # -- the relay: server to client ----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.lost(f"server read failed: {exc.strerror or exc}")
            return
        if not data:
            self.lost("server closed connection")
            return
        try:
            if self.state == SV_ACTIVE:
                if self.pfilter:
                    prepared.server_data(self, data)
                else:
                    self._relay(data)
            elif self.state == SV_SYNC or self.state == SV_RESET or self.state == SV_TESTED:
                self._swallow(data)
            elif self.state == SV_DRAIN:
                self._drain(data)
            else:
                self.close("idle server got data" if self.state in UNLINKED_SPARE
                           else "server sent data while unlinked")
        except ProtocolViolation as exc:
            self.lost(f"server protocol violation: {exc}")
        except Exception as exc:
            self.relay.internal_error(exc, "relay", f"S-{self.id}: internal error while relaying", client=self.client,
                                      server=self)
            self.lost("internal error")

    def _relay(self, data: bytes) -> None:
        """Hot path: scan headers for ReadyForQuery, forward the buffer as it came, release at idle."""
        n = len(data)
        skip = self.skip
        if skip >= n and not self.carry:
            self.skip = skip - n
            zs = 0
        else:
            zs = self._scan(data)
            if self.fatal_at >= 0:
                self._server_fatal(data, zs)
                return
        client = self.client
        if zs and client.listen is not None and client.listen.pending:
            notify.ended(client, self, data, zs)  # UNLISTENs of its transaction apply if it committed
        if zs and client.sstate and session_state.hold(self, client, data, zs):
            return  # session state changed: the ReadyForQuery waits for pgrelay's probe (session_state)
        stats = client.pool.stats
        stats.bytes_sent += n  # PgBouncer's total_sent: what clients are sent
        if client.out is None:
            try:
                sent = client.sock.send(data)
            except WOULD_BLOCK:
                sent = 0
            except OSError:
                client.disconnect("client write failed")
                return
            if sent != n:
                client.backlog(data[sent:], self)
        else:
            client.out += data
            if client.paused is None:
                client.pause(self)
        if zs:
            expect = self.expect - zs
            self.expect = expect if expect > 0 else 0
            stats.query_count += zs
            if client.listen is not None:  # notifications held for it go after this ReadyForQuery
                notify.ready(client, self, data)
            if expect <= 0:
                stats.end_round(client, self.txstatus == _I)
            if expect <= 0 and client.pool.mode:  # transaction or statement pooling
                if self.txstatus == _I:
                    self.release_if_done()
                elif client.pool.mode == MODE_STATEMENT:
                    reject = Reject("transaction blocks not allowed in statement pooling mode")
                    self.close("transaction blocks not allowed in statement pooling mode")
                    client.disconnect("transaction blocks not allowed in statement pooling mode", reject)

    def release_if_done(self) -> None:
        """Transaction and statement pooling: release at the end of a transaction, but only when the
        server owes no reply and no byte is unsent either way, and the client is at a message
        boundary (no split message, no unsynced extended batch). Called again when a backlog drains."""
        client = self.client
        if self.expect == 0 and self.txstatus == _I and self.out is None and not self.skip and not self.carry \
                and client.out is None and not client.skip and not client.carry and not client.open_batch:
            if client.sstate:  # session state seen, or pinned (pgrelay.session_state)
                session_state.at_release(self, client)
                return
            client.pool.release(self)

    def _server_fatal(self, data: bytes, zs: int) -> None:
        """Forward what preceded the server's FATAL, then handle the server as lost."""
        at, self.fatal_at = self.fatal_at, -1
        client = self.client
        if at:
            client.write(data[:at])
        expect = self.expect - zs
        self.expect = expect if expect > 0 else 0
        self.lost(self.close_reason)

    def _scan(self, data: bytes) -> int:
        """Count ReadyForQuery messages (keeping the last status) and apply ParameterStatus."""
        if self.carry:
            buf = self.carry + data
            offset = len(self.carry)
            self.carry = b""
            pos = 0
        else:
            buf = data
            offset = 0
            pos = self.skip
        n = len(buf)
        zs = 0
        while pos + 5 <= n:
            kind = buf[pos]
            length = _unpack(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
            end = pos + 1 + length
            if kind == _Z:
                if length != 5:
                    raise ProtocolViolation(f"ReadyForQuery with length {length}")
                if end > n:
                    break
                zs += 1
                self.txstatus = buf[pos + 5]
            elif kind == _S:
                if length > MAX_SERVER_META_MESSAGE:
                    raise ProtocolViolation("oversized ParameterStatus")
                if end > n:
                    break
                self._parameter_status(buf[pos + 5:end])
            elif kind == _C and (end > n or length > 6 and buf[pos + 7] in _STATE_TAG[buf[pos + 5]]) and self.pool.mode:
                if end > n:  # a CommandComplete is small: read it whole (bounded, as the carry is)
                    if length > MAX_SERVER_META_MESSAGE:
                        raise ProtocolViolation("oversized CommandComplete")
                    break
                session_state.tag_seen(self, bytes(buf[pos + 5:end]))  # SET, PREPARE, LISTEN, CREATE...
            elif kind == _E:
                # A server's FATAL (pg_terminate_backend, an administrator's shutdown). In session
                # pooling it reaches the client as it came, and lost() sends nothing after it. In
                # transaction/statement pooling it must not reach the client: its connection to
                # pgrelay lives on (see _server_fatal).
                if pos + 11 > n:
                    break
                if not self.pool.mode:
                    if buf[pos + 5:pos + 11] in _FATAL:
                        self.fatal_at = FATAL_PASSED
                        if end <= n:
                            fields = protocol.parse_fields(buf[pos + 5:end])
                            self.close_reason = "server sent FATAL: " + fields.get("M", "connection terminated")
                elif buf[pos + 5:pos + 11] in _FATAL and pos >= offset:
                    self.fatal_at = pos - offset
                    self.fatal_message = bytes(buf[pos:end]) if end <= n else b""
                    fields = protocol.parse_fields(buf[pos + 5:end]) if end <= n else {}
                    self.close_reason = "server sent FATAL: " + fields.get("M", "connection terminated")
                    self.skip = 0
                    return zs
            pos = end
        if pos < n:
            self.carry = buf[pos:]
            self.skip = 0
        else:
            self.skip = pos - n
        return zs

    def _parameter_status(self, body: bytes) -> None:
        try:
            name, value = protocol.parse_parameter_status(body)
        except ValueError:
            raise ProtocolViolation("malformed ParameterStatus") from None
        self.params[name] = value
        index = self.relay.tracked_index.get(name.lower())
        if index is not None:
            self.pvals = _replace(self.pvals, index, value)
            client = self.client
            if client is not None:
                client.pvals = _replace(client.pvals, index, value)

    # -- pgrelay's own queries: SET batches and the reset query ------------------------------------

    def begin_sync(self, client: "ClientConnection", sql: str, data: bytes, queries: int) -> None:
        """Apply the client's parameters with one SET batch; its bytes follow once it completes."""
        self.sync_data = data
        self.sync_queries = queries
        self.swallow = bytearray()
        self.sync_error = None
        client.stop_reading()
        self.write(protocol.query(sql))

    def check(self, sql: str) -> None:
        """server_check_query before reuse of a server idle past server_check_delay; _swallowed
        gives it to the next client, or closes it if the query failed."""
        change_server_state(self, SV_TESTED)
        self.swallow = bytearray()
        self.sync_error = None
        self.write(protocol.query(sql))

    def reset(self, sql: str) -> None:
        """Run server_reset_query before the server goes back to the pool."""
        if self.ps is not None:  # DISCARD ALL, DEALLOCATE ALL: what it had prepared may be gone
            prepared.reset(self, sql)
        change_server_state(self, SV_RESET)
        self.swallow = bytearray()
        self.sync_error = None
        self.write(protocol.query(sql))

    def _swallow(self, data: bytes) -> None:
        """Read replies to pgrelay's own query whole; the client never sees them."""
        if self.probe is not None:  # a session state query, whose rows are read (pgrelay.session_state)
            session_state.swallow(self, data)
            return
        buf = self.swallow
        buf += data
        if len(buf) > (1 << 24):
            raise ProtocolViolation("too much output from a pgrelay-issued query")
        pos, n = 0, len(buf)
        while pos + 5 <= n:
            kind = buf[pos]
            length = _unpack(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
            end = pos + 1 + length
            if end > n:
                break
            body = bytes(buf[pos + 5:end])
            pos = end
            if kind == _S:
                self._parameter_status(body)
            elif kind == _E:
                self.sync_error = Reject.from_fields(protocol.parse_fields(body))
            elif kind == _Z:
                self.txstatus = body[0] if body else _I
                del buf[:pos]
                if buf:
                    raise ProtocolViolation("server sent data after ReadyForQuery of a pgrelay query")
                self._swallowed()
                return
        del buf[:pos]

    def _swallowed(self) -> None:
        error = self.sync_error
        if self.state == SV_TESTED:
            if error is not None or self.txstatus != _I:
                self.close("server check failed")  # its pool launches another for the waiting clients
            else:
                self.pool.give(self)
            return
        if self.state == SV_RESET:
            if error is not None or self.txstatus != _I:
                self.close("server_reset_query failed")
                return
            session_state.after_reset(self)  # DISCARD ALL / RESET ALL: the server's defaults again
            if self.cancels:
                change_server_state(self, SV_CANCEL_WAIT)
            else:
                self.pool.give(self)
            return
        client = self.client
        if error is not None or self.txstatus != _I:
            self.close("invalid server parameter")
            client.disconnect("invalid server parameter",  # the client is closed: FATAL, not the server's ERROR
                              Reject(error.message, error.sqlstate, "FATAL", error.detail, error.hint)
                              if error is not None else Reject("invalid server parameter"))
            return
        self.pvals = client.pvals
        self.extras = client.extras
        change_server_state(self, SV_ACTIVE)
        data, self.sync_data = self.sync_data, b""
        self.expect += self.sync_queries
        if data:
            self.write(data, client)
        client.start_reading()
        if client.leaving:
            client.leave_if_done()

    # -- a client left with replies owed: drain them --------------------------------------------

    def drain(self) -> None:
        """The client left at a message boundary while replies were owed (or bytes unsent): keep
        the server, read and drop what it still sends, then reuse it if it is idle, else close it.
        The queries run to completion, as PostgreSQL runs what a client sent before leaving; no
        byte of them ever reaches another client. server_drain_timeout bounds it (janitor)."""
        client = self.client
        if client is not None:
            unlink(client, self)
        if self.paused is not None:  # the client was paused by our backlog; it is leaving
            self.paused.paused_by = None
            self.paused = None
        change_server_state(self, SV_DRAIN)
        self.drain_start = time.monotonic()
        self.start_reading()
        self.finish_drain()

    def _drain(self, data: bytes) -> None:
        if self.recovery is not None:
            recovery.feed(self, data)
            return
        zs = self._scan(data)
        if self.fatal_at >= 0:
            self.fatal_at = -1
            self.close(self.close_reason)
            return
        if zs:
            expect = self.expect - zs
            self.expect = expect if expect > 0 else 0
        self.finish_drain()

    def finish_drain(self) -> None:
        """Once nothing is owed either way: back to the pool if idle, else (inside a transaction,
        or a direct connection) closed, which makes PostgreSQL roll back, unless pgrelay.recovery
        rolls it back for reuse (server_rollback_timeout)."""
        if self.state != SV_DRAIN or self.expect or self.skip or self.carry or self.out is not None \
                or self.recovery is not None:
            return
        if self.txstatus != _I and recovery.begin(self, "client left inside a transaction"):
            return
        if self.txstatus != _I or not self.pool.reuse:
            self.close("client left inside a transaction" if self.txstatus != _I else "direct client left")
        else:
            self.pool.release(self)

    def flushed(self) -> None:
        if self.state == SV_ACTIVE:
            if self.pool.mode:
                self.release_if_done()
        elif self.state == SV_DRAIN:
            self.finish_drain()

    # -- writing to the server (Peer.write / backlog) -------------------------------------------

    def write_failed(self, exc: OSError) -> None:
        self.lost(f"server write failed: {exc.strerror or exc}")

    def start_reading(self) -> None:
        if self.state == SV_CLOSED or self.stream is None or self.stream.rw.active:
            return
        if self.stream.tls:
            self.stream.rw.start(self._on_readable_tls)
            if self.sock.pending():  # decrypted bytes already buffered: the fd will not wake us
                self.stream.rw.loop.run_callback(self._on_readable_tls)
        else:
            self.stream.rw.start(self._on_readable)

    def _on_readable_tls(self) -> None:
        while True:
            self._on_readable()
            if self.state == SV_CLOSED or not self.stream.rw.active or not self.sock.pending():
                return

    def stop_reading(self) -> None:
        self.stream.rw.stop()

    # -- lifecycle ---------------------------------------------------------------------------

    def is_clean(self) -> bool:
        """Nothing outstanding: a client may leave and the server be reused."""
        return (self.state == SV_ACTIVE and self.expect == 0 and self.txstatus == _I and self.out is None
                and not self.carry and self.skip == 0)

    def lost(self, reason: str) -> None:
        """The server failed under us: close it and tell its client.

        In transaction and statement pooling, when nothing was cut mid-message, the client stays
        connected: queries in flight each get an ERROR and ReadyForQuery (the server's own SQLSTATE
        and message when it sent a FATAL, e.g. 57P01; else 08006), and a client whose queries had
        all completed is simply back to idle; its next transaction gets another server (e.g. after
        a failover). A client inside a transaction, or in session pooling, is disconnected: with the
        server's FATAL only when the server sent one, as PostgreSQL does, else with PgBouncer's
        "server conn crashed?".
        """
        client = self.client
        expect, txstatus = self.expect, self.txstatus
        clean_cut = not self.skip and not self.carry and self.state == SV_ACTIVE
        mid_message = self.state == SV_ACTIVE and bool(self.skip or self.carry)  # the client has part of one
        self.close(reason)
        if client is None:
            return
        if client.pool.mode and clean_cut and client.at_boundary() and client.out is None \
                and (expect > 0 or txstatus == _I):
            change_client_state(client, CL_IDLE)
            if expect > 0:
                # The server's own error when it sent one (57P01 for pg_terminate_backend), as an ERROR.
                error = (replace(Reject.from_fields(protocol.parse_fields(self.fatal_message[5:])), severity="ERROR")
                         if self.fatal_message else
                         Reject(f"server connection lost: {reason}", CONNECTION_FAILURE, severity="ERROR",
                                hint="The query may or may not have taken effect."))
                client.fail_queries(error, expect)
        elif self.fatal_message or self.fatal_at == FATAL_PASSED:
            # The server said why (its FATAL, held back or passed on as it came): the client gets
            # that and the close, as from PostgreSQL, and no second FATAL of pgrelay's.
            if self.fatal_message:
                client.write(self.fatal_message)
            if client.out is not None:
                try:
                    client.sock.send(client.out)
                except OSError:
                    pass
            client.disconnect(f"server closed the connection ({self.close_reason or reason})")
        elif mid_message:
            # An ErrorResponse now would be read as the rest of the message the client has part of
            # (a corrupted row): it sees only the close, as from a PostgreSQL that died.
            client.disconnect("server conn crashed?")
        else:
            client.disconnect("server conn crashed?", Reject("server conn crashed?"))

    def close(self, reason: str) -> None:
        if self.state == SV_CLOSED:
            return
        if self.recovery is not None:
            reason = recovery.interrupted(self, reason)
        if self.pfilter:
            prepared.server_closed(self)
        client = self.client
        if client is not None:
            self.client = None
            client.server = None
            if client.sstate:  # its pin (and what it pinned) ends with the server
                session_state.left(client, None)
        if self.paused is not None:
            self.paused.paused_by = None
            self.paused.start_reading()
            self.paused = None
        if self.paused_by is not None:
            self.paused_by.paused = None
            self.paused_by = None
        was = self.state
        change_server_state(self, SV_CLOSED)
        if self.stream is not None:
            if was in (SV_IDLE, SV_USED, SV_CANCEL_WAIT) and self.out is None:
                self.stream.try_send(protocol.TERMINATE)
            self.stream.close()
        if self.relay.config.log_disconnections:
            log.info("%s closing because: %s (age=%ds)", logs.server_label(self), reason,
                     time.monotonic() - self.connect_time, extra=logs.fields(self))
        self.relay.server_disconnected(self, reason)

    # -- cancel -------------------------------------------------------------------------------

    def forward_cancel(self) -> gevent.Greenlet | None:
        """Send a CancelRequest for this server's backend on a new connection (in a greenlet, which
        is returned so that the client's cancel connection can wait for it).

        The server is not handed to another client until the request is done (PgBouncer PR
        #717), so a late cancel can never hit someone else's query.
        """
        if not self.key:
            return None
        self.cancels += 1
        return gevent.spawn(self._cancel)

    def _cancel(self) -> None:
        try:
            with Timeout(self.relay.config.cancel_wait_timeout or None):
                stream = Stream(server_login.open_socket(self.addr, self.relay.config))
                try:
                    stream.sendall(protocol.cancel_request(self.key))
                    try:
                        while stream.recv_some():
                            pass
                    except Exception:
                        pass  # the server closes the cancel connection when done
                finally:
                    stream.close()
        except (Timeout, OSError) as exc:
            log.warning("S-%d: cancel request failed: %s", self.id, exc)
        finally:
            self.cancels -= 1
            if self.cancels == 0 and self.state == SV_CANCEL_WAIT:
                self.cancel_client = None
                self.pool.give(self)


def _replace(values: tuple, index: int, value: str) -> tuple:
    if index >= len(values):
        return values
    return values[:index] + (value,) + values[index + 1:]
