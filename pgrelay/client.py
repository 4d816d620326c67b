"""Client connections: login (startup, auth, routing, welcome) and the client-to-server half of the relay."""

from __future__ import annotations

import itertools
import logging
import select
import socket
import time
from dataclasses import replace
from typing import TYPE_CHECKING

from gevent import Timeout

from . import keys, login_link, logs, notify, prepared, protocol, proxy_protocol, recovery, session_state, virtual
from .errors import (QUERY_CANCELED, ClientGone, LoginTimeout, PgRelayError, ProtocolViolation,
                     Reject, RejectError)
from .peer import Peer
from .pool import (CL_ACTIVE, CL_CLOSED, CL_IDLE, CL_LOGIN, CL_WAITING, CLIENT_STATE_NAMES, SV_ACTIVE, SV_CANCEL_WAIT,
                   SV_SYNC,
                   change_client_state, link)
from .routing import Login, Route
from .stream import RECV_SIZE, WOULD_BLOCK, Stream

if TYPE_CHECKING:
    from .pool import Pool
    from .relay import Relay
    from .routing import Listener
    from .server import ServerConnection

log = logging.getLogger("pgrelay.client")

_ids = itertools.count(1)
_unpack = protocol._I32.unpack_from
_II = protocol._I32I32.unpack_from
# protocol.FRONTEND_CLASS, with Parse/Bind/Describe/Close (class 1) apart as 4: only they may name a
# statement (pgrelay.prepared), so Execute keeps its one compare.
_CLASS = bytes(4 if t in b"PBDC" else c for t, c in enumerate(protocol.FRONTEND_CLASS))
_X = 88
# PostgreSQL refuses any message above 1 GiB, so no longer one can be valid.
PG_MAX_MESSAGE = 0x40000000
# Bytes a queued client may send before pgrelay stops reading it (one read's worth, as PgBouncer
# holds one packet buffer); the rest waits in the kernel until a server is linked.
QUEUED_INPUT_LIMIT = RECV_SIZE
_LISTEN_TRIGGER = notify.TRIGGER
_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR


def number_clients(first: int, step: int) -> None:
    """Number the clients first, first + step, ... (workers: ids that no other worker gives out,
    so that SHOW CLIENTS and KILL_CLIENT name one client pgrelay-wide)."""
    global _ids
    _ids = itertools.count(first, step)


class ClientConnection(Peer):
    """One client connected to pgrelay."""

    __slots__ = ("relay", "id", "listener", "peer", "stream", "sock", "state", "server", "pool", "route",
                 "user", "database", "params", "pvals", "key", "skip", "carry", "open_batch", "pending", "pending_queries",
                 "out", "paused", "paused_by", "connect_time", "wait_start", "max_length", "tls",
                 "close_reason", "spec", "limits", "shared", "leaving", "term_queries", "cancel_server", "touched",
                 "quiet_since", "xact_start", "virtual", "query_start", "txn_start", "decided_by", "protocol", "welcoming",
                 "listen", "extras", "baseline", "baseline_raw", "sstate", "pinned_by", "watch", "ps", "prep",
                 "transport", "proxy", "__weakref__")

    def __init__(self, relay: "Relay", sock, peer: str, listener: "Listener", transport=None):
        self.relay = relay
        self.id = next(_ids)
        self.listener = listener
        self.peer = peer
        self.stream = Stream(sock)
        self.sock = sock
        self.state = CL_LOGIN
        self.server: ServerConnection | None = None
        self.pool: Pool | None = None
        self.route: Route | None = None
        self.user = self.database = ""
        self.params: dict[str, str] = {}
        self.pvals: tuple = ()
        self.key = b""
        self.skip = 0                # bytes of the current message that lie beyond the last buffer
        self.carry = b""             # a split message header, awaiting more bytes
        self.open_batch = 0          # extended-protocol messages sent since the last Sync
        self.pending = bytearray()   # bytes read while queued for a server (QUEUED_INPUT_LIMIT)
        self.pending_queries = 0
        self.leaving = False         # sent Terminate; stays until what came before it is with a server
        self.term_queries = 0        # queries before the Terminate in the buffer that held it
        self.cancel_server = None    # our last server, withheld from others while our cancel is in flight
        self.touched = False         # read since the janitor last looked (client_idle_timeout etc.)
        self.quiet_since = 0.0       # when the janitor last saw this client or its server busy
        self.xact_start = 0.0        # when its transaction began (link; janitor); 0: none (transaction_timeout)
        self.query_start = 0.0       # event-loop time its outstanding queries began; 0: none (PoolStats)
        self.txn_start = 0.0         # event-loop time its open transaction's first query began (PoolStats)
        self.decided_by = ""         # the plugin whose pgrelay_route_client answered (Relay.route_client)
        self.out: bytearray | None = None
        self.paused = None           # the server whose reading we paused while `out` drains
        self.paused_by = None        # the server that paused our reading while its `out` drains
        self.connect_time = time.monotonic()
        self.wait_start = 0.0
        self.max_length = min(relay.config.max_packet_size, PG_MAX_MESSAGE)
        self.tls = False
        self.close_reason = ""
        self.spec = None             # the user name taken apart (role, cluster, suffix)
        self.limits: tuple = ()      # client limits this client counts against
        self.shared: list | tuple = ()  # workers: client limit keys the parent counts it under (Relay.admit)
        self.virtual = None          # the VirtualDatabase serving it (pgrelay.virtual), if any
        self.protocol = 0            # minor version of protocol 3 it speaks (keys.negotiate)
        self.welcoming = None        # session pooling: set once its own server is ready (login_link)
        self.listen = None           # its LISTEN channels and held notifications (pgrelay.notify), if any
        self.extras: tuple = ()      # session-set parameters beyond the tracked ones, sorted (pgrelay.session_state)
        self.baseline: dict = {}     # its startup parameters among them (RESET goes back to these)
        self.baseline_raw = False    # baseline still in the client's spelling, not yet the server's
        self.sstate = 0              # session_state bits: PROBE, CANDIDATE, PINNED (0: nothing to do)
        self.pinned_by = ""          # what pins it to its server (session_state = pin)
        self.watch = None            # True: transaction/statement pooling, the text is searched (session_state)
        self.ps = None               # its named prepared statements, once it sent one (pgrelay.prepared)
        self.prep = False            # max_prepared_statements applies (transaction/statement pooling)
        # What carries it when `sock` is a bridge, not the client's own socket (pgrelay.serverless):
        # has .kind ("websocket", "http"), .tls (the outer connection's), .cleartext (it answers a
        # cleartext password request, whatever the auth method) and .bearer (a token, or "").
        self.transport = transport
        self.proxy = None            # the PROXY header it began with (pgrelay.proxy_protocol), if any

    def __repr__(self) -> str:
        return f"C-{self.id}"

    @property
    def state_name(self) -> str:
        return CLIENT_STATE_NAMES[self.state]

    @property
    def secure(self) -> bool:
        """Whether the client's bytes reach pgrelay over TLS (its own, or its transport's)."""
        return self.tls or (self.transport is not None and self.transport.tls)

    @property
    def label(self) -> str:
        return f"C-{self.id}: {self.database or '(nodb)'}/{self.user or '(nouser)'}@{self.peer}"

    # -- login (one greenlet per client, ending once the client is logged in) -----------------

    def run_login(self) -> None:
        relay = self.relay
        try:
            timeout = relay.config.client_login_timeout or None
            with Timeout(timeout, LoginTimeout("client_login_timeout")):
                pairs = self._read_startup()
                if pairs is None:
                    return  # a cancel request, or a close after SSL/GSS negotiation
                login = self._parse_startup(pairs)
                if relay.client_tls.required and not self.secure:
                    raise RejectError(Reject("SSL required"))
                spec = relay.parse_username(login)
                if isinstance(spec, Reject):
                    raise RejectError(spec)
                login = replace(login, spec=spec)
                self.spec = spec
                if relay.config.log_connections:
                    log.info("%s login attempt: db=%s user=%s tls=%s replication=%s", self.label, self.database,
                             self.user, logs.tls_info(self.sock) if self.tls else "no",
                             logs.replication(self.params), extra=logs.fields(self))
                # A database served inside pgrelay (the admin console): no client limits, routing
                # or pool; it authenticates the client and answers it in this greenlet (serve).
                self.virtual = relay.virtual_database(login)
                if self.virtual is not None:
                    self.virtual.login(self, login)
                    virtual.welcome(self, self.virtual)
                else:
                    decision = relay.check_client_limits(login)
                    if decision is not None:
                        raise RejectError(decision)
                    relay.authenticate(self, login)
                    decision = relay.route_client(login)
                    if isinstance(decision, Reject):
                        raise RejectError(decision)
                    self.route = decision  # before admit: a refusal's hint may name the route
                    refusal = relay.admit(self, decision)
                    if refusal is not None:
                        raise RejectError(refusal)
                    self.pool = relay.get_pool(decision, self)
                    if login_link.wanted(self):
                        login_link.before_servers(self)
                    welcome = self.pool.wait_welcome()
                    if not login_link.wanted(self):
                        if self.baseline and not session_state.validate(self, welcome):
                            return  # a startup parameter PostgreSQL refused: its FATAL was sent
                        self._welcome(welcome)
            if login_link.wanted(self):
                # Session pooling, direct ports: the client's own server first, so that the welcome
                # carries its pid and values; the wait is a queued client's (query_wait_timeout).
                server = login_link.take_server(self, welcome)
                if server is None:
                    return
                self._welcome(list(server.params.items()), server)
        except (ClientGone, OSError) as exc:
            self.disconnect(f"client unexpected eof during login ({exc})" if not isinstance(exc, OSError)
                            else "client unexpected eof during login")
            return
        except LoginTimeout:
            self.disconnect("client_login_timeout", Reject("client_login_timeout"))
            return
        except Exception as exc:
            if not isinstance(exc, PgRelayError):  # a bug, e.g. in a routing or auth plugin
                relay.internal_error(exc, "login", f"{self.label} internal error during login", client=self)
            self.disconnect(getattr(exc, "message", None) or str(exc) or type(exc).__name__,
                            relay.translate_error(exc, "login", self))
            return
        if self.state == CL_CLOSED:
            return
        if self.virtual is not None:  # stays in CL_LOGIN: in no pool, unseen by the janitor's timeouts
            relay.client_connected(self)
            virtual.serve(self, self.virtual)
            return
        if self.server is None:
            change_client_state(self, CL_IDLE)
        self.prep = prepared.enabled(self)
        self.quiet_since = time.monotonic()
        relay.client_connected(self)
        if self.stream.rbuf:  # bytes the client pipelined after its startup packet
            data, self.stream.rbuf = self.stream.rbuf, b""
            self._handle_safely(data)
        if self.state == CL_IDLE or self.state == CL_ACTIVE:
            self.start_reading()

    def _read_startup(self) -> list[tuple[str, str]] | None:
        stream = self.stream
        negotiated = set()
        tls = self.relay.client_tls
        if self.listener.proxy_protocol and self.transport is None and not self._read_proxy_header():
            return None
        if tls.enabled and stream.peek_byte() == 0x16:
            self._start_tls(direct=True)  # libpq 17+ sslnegotiation=direct: a ClientHello first
        while True:
            head = stream.read_exact(4)
            if head == b"X\x00\x00\x00":
                # A Terminate before any StartupMessage (node-postgres closing early): PostgreSQL
                # reads it as a bad length, logs it and closes without a word.
                self.disconnect("client sent Terminate before the startup packet")
                return None
            header = head + stream.read_exact(4)
            length, code = _II(header, 0)
            if code == protocol.CANCEL_REQUEST_CODE:
                if not keys.CANCEL_HEADER < length <= keys.CANCEL_HEADER + keys.MAX_SECRET:
                    raise ProtocolViolation(f"bad packet header: cancel request of length {length}")
                forwarding = self.relay.cancel(stream.read_exact(length - 8))
                if forwarding is not None:
                    # As PostgreSQL: the cancel connection closes once the cancel has been
                    # delivered, so a client that waits for the close never races its own cancel.
                    forwarding.join()
                self.disconnect("cancel request", log_it=False)
                return None
            if code in (protocol.SSL_REQUEST_CODE, protocol.GSSENC_REQUEST_CODE):
                if length != 8 or code in negotiated or self.tls:
                    raise ProtocolViolation(f"bad packet header: repeated or malformed {length}-byte request")
                negotiated.add(code)
                if code == protocol.SSL_REQUEST_CODE and tls.enabled:
                    if stream.rbuf:
                        # Plaintext pipelined after SSLRequest would be read as if it came over
                        # TLS (CVE-2021-3935): a protocol violation, never forwarded.
                        raise ProtocolViolation("unencrypted data after SSL request")
                    stream.sendall(b"S")
                    self._start_tls(direct=False)
                    continue
                stream.sendall(protocol.SSL_NO)
                continue
            if length < 8 or length > protocol.MAX_STARTUP_PACKET:
                raise ProtocolViolation(f"bad packet header: startup packet length {length}")
            keys.check_version(code)
            body = header[4:] + stream.read_exact(length - 8)
            try:
                pairs = protocol.parse_startup_params(body)
            except ValueError as exc:
                raise ProtocolViolation(f"bad startup packet: {exc}") from None
            self.protocol, reply, pairs = keys.negotiate(code, pairs)  # 3.0 to 3.2, as PostgreSQL 18
            if reply:
                stream.sendall(reply)
            return pairs

    def _read_proxy_header(self) -> bool:
        """A proxy_protocol listener: a trusted address's connection begins with a PROXY header, whose
        source becomes our peer; any other's may not. Reads no byte past the header (what follows may
        be a TLS ClientHello), so it peeks first and consumes only header bytes. False: closed."""
        trusted = proxy_protocol.is_trusted(self.peer, self.relay.config.proxy_protocol_trusted)
        stream = self.stream
        if not trusted:
            if self.peer != "unix" and proxy_protocol.could_be_header(bytes([stream.peek_byte()])):
                self.disconnect("PROXY header from untrusted address")
                return False
            return True
        sock, got = self.sock, b""
        limit = proxy_protocol.V2_HEADER + proxy_protocol.V2_MAX_PAYLOAD
        while True:
            try:
                peeked = sock.recv(limit - len(got), socket.MSG_PEEK)
            except WOULD_BLOCK:
                stream._wait(stream.rw)
                continue
            if not peeked:
                raise ClientGone("unexpected eof in the PROXY header")
            result = proxy_protocol.parse(got + peeked)
            if isinstance(result, proxy_protocol.Header):
                got += sock.recv(result.length - len(got))  # present: peeked just now
                break
            if isinstance(result, proxy_protocol.Malformed):
                self.disconnect(f"bad PROXY header: {result.reason}")
                return False
            got += sock.recv(len(peeked))  # all of it header: take it, wait for the rest
            if len(got) >= limit:
                self.disconnect("bad PROXY header: too long")
                return False
        info = result.info
        self.proxy = info
        if info.peer is not None:
            if self.relay.config.verbose:
                log.debug("%s PROXY header: client address %s", self.label, info.peer)
            self.peer = info.peer
        return True

    def _start_tls(self, direct: bool) -> None:
        stream = self.stream
        stream.start_tls(self.relay.client_tls.context, server_side=True)
        if direct and stream.sock.selected_alpn_protocol() != "postgresql":
            raise ProtocolViolation("direct TLS connection without ALPN protocol \"postgresql\"")
        self.sock = stream.sock
        self.tls = True

    def _parse_startup(self, pairs: list[tuple[str, str]]) -> Login:
        relay = self.relay
        ignore = relay.ignored_startup_parameters
        tracked = relay.tracked_index
        direct = self.listener.role == "direct"
        params: dict[str, str] = {}
        for key, value in pairs:
            lower = key.lower()
            if lower == "user":
                self.user = value
            elif lower == "database":
                self.database = value
            elif direct:
                # A direct connection has a server of its own: its startup parameters go there.
                params[relay.tracked[tracked[lower]] if lower in tracked else key] = value
            elif lower == "options":
                if lower in ignore:
                    continue
                for name, val in _parse_options(value):
                    if name.lower() in tracked:
                        params[relay.tracked[tracked[name.lower()]]] = val
                    elif name.lower() not in ignore:
                        params[name.lower()] = val  # applied with SET batches (pgrelay.session_state)
            elif lower in tracked:
                params[relay.tracked[tracked[lower]]] = value
            elif lower in ignore:
                continue
            elif lower == "replication":
                raise RejectError(Reject(f"unsupported startup parameter: {key}"))
            else:
                params[lower] = value  # any other parameter: applied with SET batches (pgrelay.session_state)
        if not self.user:
            raise RejectError(Reject("no username supplied", "08P01"))
        if not self.database:
            self.database = self.user
        if relay.config.application_name_add_host:
            name = params.get("application_name", "")
            params["application_name"] = f"{name} - {self.peer}"
        self.params = params
        if not direct:
            session_state.startup(self)
        return Login(client_id=self.id, listener=self.listener, peer=self.peer, user=self.user,
                     database=self.database, params=dict(params), tls=self.secure, proxy=self.proxy)

    def _welcome(self, server_params: list[tuple[str, str]], server: "ServerConnection | None" = None) -> None:
        """AuthenticationOk, ParameterStatus, BackendKeyData, ReadyForQuery. With the client's own
        `server` (login_link), its values are the server's as it reports them, and its key the
        server's pid (keys.issue); else the pool's first server's values with the client's own."""
        relay = self.relay
        defaults = dict(server_params)
        self.pvals = relay.tracked_values(defaults, self.params)
        session_state.welcome(self, defaults)
        tracked = relay.tracked_index
        out = [protocol.AUTH_OK]
        notice = relay.config.login_notify_message
        if notice:  # as PgBouncer: a NOTICE (SQLSTATE 00000) right after AuthenticationOk
            out.append(protocol.error_response("NOTICE", "00000", notice, kind=b"N"))
        for name, value in server_params:
            index = tracked.get(name.lower())
            if server is None and index is not None and self.pvals[index] is not None:
                value = self.pvals[index]
            elif server is None and self.baseline and name.lower() in self.baseline:  # reported, not tracked
                value = self.baseline[name.lower()]
            out.append(protocol.parameter_status(name, value))
        self.key = keys.issue(self, server)
        out.append(protocol.backend_key_data(self.key))
        out.append(protocol.READY_IDLE)
        self.stream.sendall(b"".join(out))

    # -- the relay: client to server -----------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except WOULD_BLOCK:
            return
        except OSError:
            self.disconnect("client read failed")
            return
        if not data:
            self.disconnect("client unexpected eof")
            return
        try:  # _handle_safely, inlined: this runs for every read on the hot path
            self._handle(data)
        except ProtocolViolation as exc:
            self.disconnect(str(exc), self.relay.translate_error(exc, "relay", self))
        except Exception as exc:
            self.relay.internal_error(exc, "relay", f"{self.label} internal error while relaying", client=self)
            self.disconnect("internal error", self.relay.translate_error(exc, "relay", self))

    def _handle_safely(self, data: bytes) -> None:
        try:
            self._handle(data)
        except ProtocolViolation as exc:
            self.disconnect(str(exc), self.relay.translate_error(exc, "relay", self))
        except Exception as exc:
            self.relay.internal_error(exc, "relay", f"{self.label} internal error while relaying", client=self)
            self.disconnect("internal error", self.relay.translate_error(exc, "relay", self))

    def _handle(self, data: bytes) -> None:
        """Hot path: scan headers, take a server if none is linked, forward the buffer as it came."""
        self.touched = True
        if self.watch is not None:  # transaction pooling: text a CommandComplete tag cannot show (session_state)
            low = data.lower()
            if b"advisory" in low or b"set_config" in low or b"temp" in low:
                session_state.text_seen(self, data)
        n = len(data)
        skip = self.skip
        if skip >= n and not self.carry:
            self.skip = skip - n
            queries = 0
        else:
            if self.ps is not None:  # it sent a named statement: whole messages, renamed (pgrelay.prepared)
                prepared.client_data(self, data)
                return
            try:
                queries = self._scan(data)
            except prepared.Named as named:
                prepared.enter(self, data, named.at, named.queries)
                return
            if queries < 0:  # Terminate: what came before it is run, then the client leaves
                self._terminate(data[:-queries - 1])
                return
        self._forward(data, queries)

    def _forward(self, data, queries: int) -> None:
        """Send scanned bytes to the linked server, or link one, or queue for one."""
        if queries and not self.query_start:  # a round of queries begins (PoolStats.end_round ends it)
            self.query_start = self.relay.clock()
        server = self.server
        if server is None:
            pool = self.pool
            if self.state == CL_WAITING:  # more bytes while queued: keep them in order
                pending = self.pending
                pending += data
                self.pending_queries += queries
                if not queries and len(data) > 6 and data[0] == 80 and _LISTEN_TRIGGER[data[5] or data[6]] \
                        and pool.mode:
                    notify.parse_only(self, data)  # an unnamed LISTEN's Parse ... Flush (pgrelay.notify)
                if len(pending) >= QUEUED_INPUT_LIMIT:
                    self.stop_reading()  # the rest waits in the kernel; gone() notices a close
                return
            if len(data) > 6 and (data[0] == 81 and queries == 1 or data[0] == 80) \
                    and _LISTEN_TRIGGER[data[5] or data[6]] and pool.mode and notify.intercept(self, data, queries):
                return  # LISTEN/UNLISTEN (a Query, or an unnamed Parse), served by the pool's listening server (pgrelay.notify)
            owned = self.cancel_server
            if owned is not None:  # our own server, withheld from others while our cancel runs
                self.cancel_server = None
                if owned.state == SV_CANCEL_WAIT and owned.cancel_client is self:
                    owned.cancel_client = None
                    self.deliver(owned, data, queries)
                    return
            idle = pool.idle
            if idle and not pool.waiting:
                server = idle[pool.take]  # -1: LIFO; 0: server_round_robin
                if server.pvals is not self.pvals and server.pvals != self.pvals \
                        or server.extras is not self.extras and server.extras != self.extras:
                    self.deliver(server, data, queries)
                    return
                link(self, server)
            else:
                # Reading stays on while queued (no watcher churn) up to QUEUED_INPUT_LIMIT.
                self.pending = bytearray(data)
                self.pending_queries = queries
                pool.enqueue(self)
                if len(self.pending) >= QUEUED_INPUT_LIMIT and self.state == CL_WAITING:
                    self.stop_reading()
                return
        elif server.state == SV_SYNC:
            # Only reachable for bytes already read when a SET batch started; keep order.
            server.sync_data += data
            server.sync_queries += queries
            self.pool.stats.bytes_received += len(data)
            return
        elif self.listen is not None and notify.linked(self, server, data, queries):
            return  # a LISTEN it has already, or an extended-protocol one (pgrelay.notify)
        server.expect += queries
        n = len(data)
        pool = self.pool
        pool.stats.bytes_received += n  # PgBouncer's total_received: what clients send
        if server.out is None:
            try:
                sent = server.sock.send(data)
            except WOULD_BLOCK:
                sent = 0
            except OSError as exc:
                server.lost(f"server write failed: {exc.strerror or exc}")
                return
            if sent != n:
                server.backlog(data[sent:], self)
        else:
            server.out += data
            if server.paused is None:
                server.pause(self)
        if not queries and not server.expect and pool.mode:
            # The server went idle while this client was still mid-message (e.g. the tail of a
            # CopyData after a COPY error, which PostgreSQL drops): now the message may be complete.
            server.release_if_done()

    def _scan(self, data: bytes) -> int:
        """Count messages that end in ReadyForQuery (Q, S, F) and note an unsynced extended batch.

        Returns -(offset+1) if a Terminate is found at `offset` of `data`.
        """
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
        queries = 0
        open_batch = self.open_batch
        limit = self.max_length
        prep = self.prep
        while pos + 5 <= n:
            kind = buf[pos]
            cls = _CLASS[kind]
            if cls == 2:
                queries += 1
                if kind == 83:
                    # Only a Sync ends a batch: a Query or FunctionCall inside one is skipped by
                    # PostgreSQL if the batch failed, so its ReadyForQuery may never come.
                    open_batch = 0
            elif cls == 1:
                open_batch += 1
            elif cls == 4:
                # A named Parse/Bind/Describe/Close (its first body bytes) leaves the hot path.
                if prep and (pos + 7 > n or (buf[pos + 5] if kind == 80 else (
                        buf[pos + 5] or buf[pos + 6]) if kind == 66 else buf[pos + 5] == 83 and buf[pos + 6])):
                    self.open_batch = open_batch
                    self.skip = 0
                    raise prepared.Named(pos - offset, queries)
                open_batch += 1
            elif cls == 0:
                self.open_batch = open_batch
                if kind == _X:
                    self.skip = 0
                    self.term_queries = queries
                    if pos < offset:
                        # The Terminate's first bytes went out with the previous buffer: the server
                        # holds a partial message, so it is not at a boundary and will be closed.
                        self.carry = b"X"
                    return -(max(pos - offset, 0) + 1)
                if offset:
                    # The last read ended in a split header, which went out; this read does not: the
                    # server holds part of a message, so it is closed, never reused.
                    self.carry = buf[:offset]
                if kind == 0:
                    raise ProtocolViolation("client re-sent startup pkt")
                if kind == 112:  # 'p'
                    raise ProtocolViolation("unexpected password packet")
                raise ProtocolViolation(f"unknown pkt from client: {chr(kind)!r}"
                                        if 32 < kind < 127 else f"unknown pkt from client: 0x{kind:02x}")
            length = _unpack(buf, pos + 1)[0]
            if length < 4 or length > limit:
                if offset:  # as above: not at a boundary, so the server is closed, never reused
                    self.carry = buf[:offset]
                raise ProtocolViolation(f"bad packet header: message {chr(kind)!r} with length {length}")
            pos += 1 + length
        self.open_batch = open_batch
        if pos < n:
            if prep and buf[pos] in b"PBDC":  # its name is in the next read: prepared decides
                self.skip = 0
                raise prepared.Named(pos - offset, queries)
            self.carry = buf[pos:]
            self.skip = 0
        else:
            self.skip = pos - n
        return queries

    def at_boundary(self) -> bool:
        """Nothing of the client's is half-sent: no split message and no unsynced batch."""
        return not self.skip and not self.carry and not self.open_batch

    def _terminate(self, head: bytes) -> None:
        """Terminate: forward what came before it as usual (the server runs it, as PostgreSQL
        would), stop reading, and leave once those bytes are with a server (`leave_if_done`).
        A server left owing replies is drained by `disconnect`, never handed over mid-reply."""
        self.leaving = True
        self.stop_reading()
        if head:
            self._forward(head, self.term_queries)
        if self.state != CL_CLOSED:
            self.leave_if_done()

    def leave_if_done(self) -> None:
        """A leaving client goes once nothing it sent waits for a server or a SET batch."""
        if self.state == CL_WAITING and self.pending_queries:
            return  # take_server delivers the queued queries, then calls back
        server = self.server
        if server is not None and server.state == SV_SYNC:
            return  # the SET batch completes, the queries follow, then _swallowed calls back
        self.disconnect("client close request")

    def gone(self) -> bool:
        """Whether a queued client that is no longer read (its bound is reached) has hung up."""
        if self.leaving or self.stream.rw.active or self.state == CL_CLOSED:
            return False
        poller = select.poll()
        poller.register(self.sock.fileno(), _GONE)
        return bool(poller.poll(0))

    def take_server(self, server: "ServerConnection") -> None:
        """Called by the pool when a server frees up for this waiting client."""
        data, queries = self.pending, self.pending_queries
        self.pending = bytearray()
        self.pending_queries = 0
        self.deliver(server, data, queries)
        if self.leaving:
            self.leave_if_done()

    def deliver(self, server: "ServerConnection", data: bytes, queries: int) -> None:
        """Link `server`, apply tracked parameters if they differ, then send `data`."""
        sql = None if server.pvals == self.pvals else self.relay.set_params_sql(self.pvals, server.pvals)
        if server.extras != self.extras or self.baseline_raw:
            sql = session_state.sync_sql(self, server, sql)
        if sql:
            link(self, server, SV_SYNC)
            self.pool.stats.bytes_received += len(data)
            server.begin_sync(self, sql, data, queries)
            return
        server.pvals = self.pvals
        server.extras = self.extras
        link(self, server)
        server.expect += queries
        if data:
            self.pool.stats.bytes_received += len(data)
            server.write(data, self)
        self.start_reading()

    # -- writing to the client (Peer.write / backlog) -------------------------------------------

    def write_failed(self, exc: OSError) -> None:
        self.disconnect("client write failed")

    def flushed(self) -> None:
        server = self.server
        if server is not None and server.state == SV_ACTIVE and self.pool.mode:
            server.release_if_done()

    def start_reading(self) -> None:
        if self.welcoming is not None:  # logging in: its server is ready, the welcome goes first (login_link)
            self.welcoming.set()
            return
        if self.ps is not None and self.ps.inbuf:  # bytes held until a server was linked (pgrelay.prepared)
            prepared.pump(self)
        rw = self.stream.rw
        if not rw.active and self.state in (CL_IDLE, CL_ACTIVE) and self.paused_by is None \
                and not self.leaving and (self.server is None or self.server.state != SV_SYNC):
            if self.tls:
                rw.start(self._on_readable_tls)
                if self.sock.pending():  # decrypted bytes already buffered: the fd will not wake us
                    rw.loop.run_callback(self._on_readable_tls)
            else:
                rw.start(self._on_readable)

    def _on_readable_tls(self) -> None:
        """TLS may hold decrypted bytes beyond one recv; drain them while reading is on."""
        while True:
            self._on_readable()
            if self.state == CL_CLOSED or not self.stream.rw.active or not self.sock.pending():
                return

    def stop_reading(self) -> None:
        self.stream.rw.stop()

    # -- failing queries without leaving --------------------------------------------------------

    def fail_pending(self, error: Reject) -> None:
        """No server could be had for the queued bytes: fail their queries, or disconnect."""
        if self.state != CL_WAITING:
            self.disconnect(error.message, error)
            return
        if self.pool.mode and self.pending_queries and self.at_boundary():
            queries = self.pending_queries
            self.pending = bytearray()
            self.pending_queries = 0
            change_client_state(self, CL_IDLE)
            self.fail_queries(replace(error, severity="ERROR"), queries)
            self.start_reading()
        else:
            self.disconnect(error.message, error)

    def fail_queries(self, error: Reject, count: int) -> None:
        """Answer `count` outstanding queries with an ERROR each and ReadyForQuery, staying connected."""
        if self.relay.config.log_pooler_errors:
            log.warning("%s pooler error: %s", self.label, error.message, extra=logs.fields(self))
        error = self.relay.translate_error(RejectError(error), "relay", self)
        self.query_start = self.txn_start = 0.0  # the round ends here, not counted (no server answered)
        self.write((error.encode() + protocol.READY_IDLE) * max(count, 1))

    # -- leaving -------------------------------------------------------------------------------

    def disconnect(self, reason: str, error: Reject | None = None, log_it: bool = True) -> None:
        """Close the client; its server is reused if clean, else closed. Every close has a reason."""
        if self.state == CL_CLOSED:
            return
        relay = self.relay
        self.close_reason = reason
        if self.welcoming is not None:  # its login greenlet waits for a server (login_link)
            self.welcoming.set()
        if error is not None:
            if relay.config.log_pooler_errors and error.sqlstate != QUERY_CANCELED:
                log.warning("%s pooler error: %s", self.label, error.message, extra=logs.fields(self))
            data = relay.translate_error(RejectError(error), "disconnect", self).encode()
            if self.out is not None:
                self.out += data
                try:
                    self.sock.send(self.out)
                except OSError:
                    pass
            else:
                self.stream.try_send(data)
        server = self.server
        if server is not None:
            if self.sstate or server.expect and self.pool.mode:
                # pinned, flagged, or queries still running whose effect is unknown: the server is
                # reset before anyone else gets it (pgrelay.session_state)
                session_state.left(self, server)
            if server.is_clean() and self.at_boundary():
                if server.pool.reuse:
                    server.pool.release(server)
                else:
                    server.close("direct client left")
            elif self.leaving and server.state == SV_ACTIVE and self.at_boundary():
                # Terminate after queries: they run to the end, as in PostgreSQL; the replies are
                # read and dropped, then the server is reused or closed. A client that vanished
                # without Terminate gets its server closed instead, as PgBouncer does (PostgreSQL
                # finishes what it was running either way), so no large result is drained, unless
                # server_rollback_timeout is set: then pgrelay.recovery drains it and rolls it back
                # (only for a client that went away: after a refusal, e.g. a protocol violation,
                # where the server's stream stands is not trusted, so the server is closed).
                if server.expect:
                    # PostgreSQL ends a COPY FROM STDIN when the Terminate arrives; the server never
                    # gets ours, so a CopyFail does it (ignored outside COPY, after what runs). A
                    # failed write shows up as the drain's read error.
                    recovery.copy_fail(server)
                server.drain()
            elif error is not None or not recovery.abandon(server, self, reason):
                server.close("client disconnect while server was not ready")
        if self.paused is not None:
            self.paused.paused_by = None
            self.paused.start_reading()
            self.paused = None
        change_client_state(self, CL_CLOSED)
        self.pending = bytearray()
        self.stream.close()
        if self.listen is not None:
            notify.disconnected(self)
        relay.forget_client(self)
        if log_it and relay.config.log_disconnections:
            log.info("%s closing because: %s (age=%ds)", self.label, reason, time.monotonic() - self.connect_time,
                     extra=logs.fields(self))
        relay.client_disconnected(self, reason)


def _parse_options(text: str) -> list[tuple[str, str]]:
    """The `options` startup parameter: only '-c name=value' and '--name=value' are allowed."""
    words, word, escape = [], [], False
    for ch in text:
        if escape:
            word.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch.isspace():
            if word:
                words.append("".join(word))
                word = []
        else:
            word.append(ch)
    if word:
        words.append("".join(word))
    out = []
    i = 0
    bad = Reject("unsupported options startup parameter: only '-c config=val' and '--config=val' are allowed")
    while i < len(words):
        w = words[i]
        if w == "-c" and i + 1 < len(words):
            setting = words[i + 1]
            i += 2
        elif w.startswith("-c") and len(w) > 2:
            setting = w[2:]
            i += 1
        elif w.startswith("--"):
            setting = w[2:]
            i += 1
        else:
            raise RejectError(bad)
        name, eq, value = setting.partition("=")
        if not eq or not name.strip():
            raise RejectError(bad)
        out.append((name.replace("-", "_"), value))
    return out

