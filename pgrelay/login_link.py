"""Session pooling and direct connections: link the client's own server at login, before the welcome.

PostgreSQL's welcome (ParameterStatus values, BackendKeyData) describes the backend the client
talks to. A session-pooled or direct client keeps one server for its whole session, so pgrelay
takes that server first: the client's parameters are applied to it (one SET batch, if any
differs), and the welcome then carries the server's own values, as it spells them
(client_encoding 'UTF8' for 'utf8'), and the server's pid (keys.issue). An idle server is taken
at once; otherwise the client queues as a client with a query would, bounded by
query_wait_timeout, and a server failure reaches it as its login error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gevent.event import Event

from .pool import CL_CLOSED, MODE_SESSION

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection


def wanted(client: "ClientConnection") -> bool:
    """Whether the client's welcome waits for a server of its own (session pooling, direct ports)."""
    pool = client.pool
    return pool is not None and client.virtual is None and pool.mode == MODE_SESSION


def before_servers(client: "ClientConnection") -> None:
    """A direct client's server is its alone: it is asked for the client's protocol version, so
    that the client's BackendKeyData can be the server's own."""
    pool = client.pool
    if pool.per_client and not pool.servers:
        pool.server_protocol = (3 << 16) | client.protocol


def take_server(client: "ClientConnection", welcome: list[tuple[str, str]]) -> "ServerConnection | None":
    """Link a server to the logging-in client and wait until it is ready for the client's bytes
    (ClientConnection.start_reading sets `welcoming`); None if the client was closed meanwhile."""
    pool = client.pool
    client.pvals = client.relay.tracked_values(dict(welcome), client.params)
    waiter = client.welcoming = Event()
    try:
        idle = pool.idle
        if idle and not pool.waiting:
            client.deliver(idle[pool.take], b"", 0)
        else:
            client.pending = bytearray()
            client.pending_queries = 0
            pool.enqueue(client)
        if client.state != CL_CLOSED and client.welcoming is not None and not waiter.is_set():
            waiter.wait()
    finally:
        client.welcoming = None
    if client.state == CL_CLOSED or client.server is None:
        return None
    return client.server
