"""Serverless listeners: one greenlet per HTTP connection, dispatching POST /sql, OPTIONS and WebSocket upgrades."""

from __future__ import annotations

import collections
import logging
import ssl
from dataclasses import replace

import gevent
import h11
from gevent import Timeout

from pgrelay.errors import ClientGone
from pgrelay.routing import TRANSACTION
from pgrelay.stream import Stream

from . import responses

log = logging.getLogger("pgrelay.serverless")

MAX_HEAD = 16384          # request line and headers (h11's default); larger gets 431
TLS_HANDSHAKE = 0x16      # first byte of a TLS ClientHello: HTTPS and WSS are told from HTTP by it


class RequestTooLarge(Exception):
    """A request body over serverless_max_request_size."""


class RequestTimeout(Exception):
    """serverless_request_timeout passed while a request was arriving."""


def accept(relay, sock, peer: str, listener) -> None:
    """The listener table's entry for role=serverless (from the event loop)."""
    gevent.spawn(HttpConnection(relay, sock, peer, listener).run)


def tls_context(relay, listener) -> ssl.SSLContext | None:
    """The listener's TLS context: its own tls_cert_file, else client_tls_cert_file; None: plain only."""
    cache = relay.plugin_data.setdefault("serverless_tls", {})
    options = dict(listener.options)
    cert = options.get("tls_cert_file") or relay.config.client_tls_cert_file
    key = options.get("tls_key_file") or relay.config.client_tls_key_file
    if not cert or not key:
        return None
    if (cert, key) not in cache:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.options |= ssl.OP_NO_COMPRESSION
        cache[(cert, key)] = ctx
    return cache[(cert, key)]


class HttpConnection:
    """One TCP (or TLS) connection to a serverless listener: HTTP/1.1 with keep-alive, until it
    closes, times out, or becomes a WebSocket."""

    def __init__(self, relay, sock, peer: str, listener):
        self.relay = relay
        self.peer = peer
        self.listener = listener
        # POST /sql always runs in transaction mode: a request never holds a server after it.
        self.http_listener = replace(listener, pool_mode=TRANSACTION)
        self.stream = Stream(sock)
        self.h = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.tls = False
        self.request: h11.Request | None = None
        self.requests = relay.plugin_data.setdefault("serverless_requests", collections.Counter())
        try:
            self.local = sock.getsockname()[:2]  # SHOW CLIENTS' local address of its bridged clients
        except OSError:
            self.local = ("", 0)

    @property
    def config(self):
        return self.relay.config

    def run(self) -> None:
        try:
            self._serve()
        except (ClientGone, OSError, RequestTimeout):
            pass
        except Exception as exc:
            self.relay.internal_error(exc, "serverless", f"serverless connection from {self.peer}: internal error")
            self._try_respond(500, responses.error_body("internal error"))
        finally:
            self.stream.close()

    def _serve(self) -> None:
        with Timeout(self.config.serverless_request_timeout or None, RequestTimeout()):
            first = self.stream.peek_byte()
            ctx = tls_context(self.relay, self.listener)
            if first == TLS_HANDSHAKE and ctx is not None:
                self.stream.start_tls(ctx, server_side=True)
                self.tls = True
        while True:
            if self.h.our_state is h11.MUST_CLOSE or self.h.their_state is h11.MUST_CLOSE:
                return
            try:
                with Timeout(self.config.serverless_idle_timeout or None, RequestTimeout()):
                    event = self.h.next_event()  # a pipelined request may be buffered already
                    if event is h11.NEED_DATA:
                        self.h.receive_data(self._recv())  # the next request's first bytes
                        event = None
                with Timeout(self.config.serverless_request_timeout or None, RequestTimeout()):
                    request = event or self.next_event()
                    if isinstance(request, h11.ConnectionClosed):
                        return
                    assert isinstance(request, h11.Request), request
                    self.request = request
                    if not self.tls and self.relay.client_tls.required:
                        self.respond(400, responses.error_body("SSL required"), close=True)
                        return
                    if _is_upgrade(request):
                        self.next_event()  # EndOfMessage: an upgrade request has no body
                        upgrade = request
                    else:
                        upgrade = None
                        handled = self._dispatch(request)
                if upgrade is not None:
                    # The connection is the WebSocket's now, for as long as its client stays: no
                    # request timeout (client_idle_timeout and the others apply to its client).
                    from . import websocket
                    websocket.serve(self, upgrade)
                    return
            except RequestTimeout:
                if self.h.our_state is h11.SEND_RESPONSE and self.h.their_state is not h11.IDLE:
                    self.respond(408, responses.error_body("request timed out"), close=True)
                return
            except h11.RemoteProtocolError as exc:
                if self.h.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    self.respond(exc.error_status_hint, responses.error_body(f"bad HTTP request: {exc}"), close=True)
                return
            except RequestTooLarge:
                limit = self.config.serverless_max_request_size
                self.respond(413, responses.error_body(f"request is too large (max is {limit} bytes)"), close=True)
                return
            if not handled or self.h.our_state is h11.MUST_CLOSE:  # HTTP/1.0, Connection: close
                return
            self.h.start_next_cycle()

    def _dispatch(self, request: h11.Request) -> bool:
        """Answer one request; False when the connection must close after it."""
        path = request.target.split(b"?", 1)[0]
        if path == b"/sql" and request.method == b"OPTIONS":
            self.read_body()
            self.respond(200, b"", headers=responses.OPTIONS_HEADERS, content_type=None)
            return True
        if path != b"/sql" or request.method != b"POST":
            self.read_body()
            self.respond(400, responses.error_body("query is not supported"))
            return True
        from . import sql_over_http
        status, headers, body = sql_over_http.handle(self, request)
        self.respond(status, body, headers=responses.CORS + headers)
        return True

    # -- reading ------------------------------------------------------------------------------------

    def next_event(self):
        """The next h11 event, reading as needed (the caller holds a Timeout)."""
        while True:
            event = self.h.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self.h.they_are_waiting_for_100_continue:
                self._send(self.h.send(h11.InformationalResponse(status_code=100, headers=[])))
            self.h.receive_data(self._recv())

    def _recv(self) -> bytes:
        try:
            return self.stream.recv_some()
        except ClientGone:
            return b""  # h11 tells a clean close between requests from a truncated one

    def read_body(self) -> bytes:
        """The current request's body; RequestTooLarge past serverless_max_request_size (checked
        on Content-Length before a byte of it is read)."""
        limit = self.config.serverless_max_request_size
        length = _header(self.request.headers, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestTooLarge()
        chunks, size = [], 0
        while True:
            event = self.next_event()
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise RequestTooLarge()
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone("closed in the middle of a request body")

    # -- writing ------------------------------------------------------------------------------------

    def respond(self, status: int, body: bytes, headers=None, content_type: bytes | None = b"application/json",
                close: bool = False) -> None:
        head = list(responses.CORS if headers is None else headers)
        if content_type is not None:
            head.append((b"content-type", content_type))
        head.append((b"content-length", str(len(body)).encode()))
        if close:
            head.append((b"connection", b"close"))
        self.requests[(self.listener.name, status)] += 1  # pgrelay_serverless_requests (metrics plugin)
        data = self.h.send(h11.Response(status_code=status, headers=head))
        data += self.h.send(h11.Data(data=body)) if body else b""
        data += self.h.send(h11.EndOfMessage())
        self._send(data)

    def _try_respond(self, status: int, body: bytes) -> None:
        if self.h.our_state is h11.SEND_RESPONSE and not self.stream.closed:
            try:
                self.respond(status, body, close=True)
            except Exception:
                pass

    def _send(self, data: bytes) -> None:
        self.stream.sendall(data)


def _header(headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _is_upgrade(request: h11.Request) -> bool:
    upgrade = _header(request.headers, b"upgrade")
    return request.method == b"GET" and upgrade is not None and upgrade.lower() == b"websocket"
