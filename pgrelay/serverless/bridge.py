"""Hands a PostgreSQL client that HTTP or WebSocket carries to the core, over a socketpair.

The core's end is an ordinary client socket: the same login, auth, routing, limits, pools and
relay as a TCP client, with `transport` telling it what carries the bytes. pgrelay's end is a
Stream the serverless code reads and writes from its greenlet. Both ends are bounded by the
kernel's socket buffers, so a side that stops reading pauses the other.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from pgrelay.stream import Stream


@dataclass(frozen=True)
class Transport:
    """What carries a bridged client (ClientConnection.transport)."""

    kind: str                 # "websocket" or "http"
    tls: bool                 # the outer connection is TLS (HTTPS, WSS)
    cleartext: bool = True    # the Neon driver answers a cleartext password request, whatever the method
    bearer: str = field(default="", repr=False)  # Authorization: Bearer token (HTTP), "" if none
    local: tuple = ("", 0)    # the listener's address the outer connection reached (SHOW CLIENTS)


def open_bridge(relay, peer: str, listener, transport: Transport) -> Stream:
    """A new client of `listener` from `peer`; returns pgrelay's end of its socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        relay.accept(theirs, peer, listener, transport)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    return Stream(ours)
