"""WebSocket connections: binary frames carrying the PostgreSQL protocol, bridged to a core client.

The frames are one byte stream in each direction (message boundaries are not frame boundaries):
what the driver sends goes to the client's bridge as it arrives, what pgrelay answers goes back
as binary frames. A text frame is refused with close code 1003. Two greenlets pump, each
blocking on the side it writes to, so a peer that stops reading stops the other side too.
"""

from __future__ import annotations

import gevent
from gevent.lock import Semaphore
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, Request,
                            TextMessage)
from wsproto.utilities import RemoteProtocolError

from pgrelay.errors import ClientGone

from . import responses
from .bridge import Transport, open_bridge

UNSUPPORTED_DATA = 1003   # RFC 6455: a text frame where only binary is accepted
PROTOCOL_ERROR = 1002
NORMAL_CLOSURE = 1000
CLOSE_GRACE = 5.0         # seconds the driver has to answer our close frame


def serve(conn, request) -> None:
    """Accept the upgrade `request` of HttpConnection `conn` and relay until either side ends."""
    ws = WSConnection(ConnectionType.SERVER)
    headers = [(name, value) for name, value in request.headers]
    try:
        ws.initiate_upgrade_connection(headers, request.target)
        events = list(ws.events())
    except RemoteProtocolError as exc:
        conn.respond(400, responses.error_body(f"bad WebSocket upgrade: {exc}"), close=True)
        return
    if not events or not isinstance(events[0], Request):
        conn.respond(400, responses.error_body("bad WebSocket upgrade"), close=True)
        return
    try:
        conn.requests[(conn.listener.name, 101)] += 1
        conn.stream.sendall(ws.send(AcceptConnection()))
    except RemoteProtocolError as exc:  # e.g. no Sec-WebSocket-Key
        conn.respond(400, responses.error_body(f"bad WebSocket upgrade: {exc}"), close=True)
        return
    trailing = conn.h.trailing_data[0]
    bridge = open_bridge(conn.relay, conn.peer, conn.listener, Transport("websocket", conn.tls, local=conn.local))
    Pump(conn, ws, bridge).run(trailing)


class Pump:
    """Frames from the driver into the bridge (this greenlet), bytes from the bridge out as frames
    (a second greenlet)."""

    def __init__(self, conn, ws: WSConnection, bridge):
        self.conn = conn
        self.ws = ws
        self.bridge = bridge
        self.write_lock = Semaphore()  # one frame at a time on the TCP connection
        self.closing = False

    def run(self, trailing: bytes) -> None:
        outbound = gevent.spawn(self._outbound)
        try:
            if trailing:
                self._feed(trailing)
            while not self.closing:
                try:
                    data = self.conn.stream.recv_some()
                except ClientGone:
                    data = None
                self.ws.receive_data(data)
                self._events()
                if data is None:
                    break
        except RemoteProtocolError:
            self._close(PROTOCOL_ERROR, "bad frame")
        except ClientGone:
            pass
        finally:
            self.bridge.close()  # the core client sees EOF and disconnects
            outbound.join(timeout=1)
            outbound.kill()

    def _feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self._events()

    def _events(self) -> None:
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                if event.data:
                    self.bridge.sendall(event.data)  # blocks while the core client does not read
            elif isinstance(event, TextMessage):
                self._close(UNSUPPORTED_DATA, "binary frames only: they carry the PostgreSQL protocol")
                return
            elif isinstance(event, Ping):
                self._write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                was_closing, self.closing = self.closing, True
                if not was_closing and self.ws.state is ConnectionState.REMOTE_CLOSING:  # not a bare EOF
                    self._write(self.ws.send(event.response()))
                return
            elif isinstance(event, RejectConnection):
                self.closing = True
                return

    def _outbound(self) -> None:
        try:
            while True:
                data = self.bridge.recv_some()
                if self.closing:
                    return
                self._write(self.ws.send(BytesMessage(data=data)))
        except ClientGone:  # the core closed the client (Terminate, an error, a timeout)
            self._close(NORMAL_CLOSURE, "")
        except Exception:
            pass

    def _close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        try:
            self._write(self.ws.send(CloseConnection(code=code, reason=reason)))
        except Exception:
            pass
        if code == NORMAL_CLOSURE:  # the driver's close frame in reply ends the reading loop sooner
            gevent.spawn_later(CLOSE_GRACE, self.conn.stream.close)
        else:
            self.conn.stream.close()

    def _write(self, data: bytes) -> None:
        with self.write_lock:
            self.conn.stream.sendall(data)
