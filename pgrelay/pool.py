"""Pools of server connections and the state changes that move clients and servers between them.

Every client and server state change goes through change_client_state / change_server_state,
which keep each pool's lists (idle servers, waiting clients) and counters in step. Herding
objects between lists is PgBouncer's objects.c; the names follow it.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from .errors import CANNOT_CONNECT_NOW, Reject, ServerError
from .routing import SESSION, STATEMENT, TRANSACTION, Route

if TYPE_CHECKING:
    from .client import ClientConnection
    from .relay import Relay
    from .server import ServerConnection

# Client states (ints: compared on the hot path).
CL_LOGIN, CL_IDLE, CL_WAITING, CL_ACTIVE, CL_CLOSED = range(5)
CLIENT_STATE_NAMES = ("login", "idle", "waiting", "active", "closed")

# Server states. ACTIVE and SYNC are linked to a client; the others are not. DRAIN: the client
# left while the server still owed replies; they are read and dropped before reuse or close.
SV_LOGIN, SV_IDLE, SV_ACTIVE, SV_SYNC, SV_RESET, SV_CANCEL_WAIT, SV_CLOSED, SV_DRAIN = range(8)
SERVER_STATE_NAMES = ("login", "idle", "active", "sync", "reset", "cancel_wait", "closed", "drain")

MODE_CODES = {SESSION: 0, TRANSACTION: 1, STATEMENT: 2}
MODE_SESSION, MODE_TRANSACTION, MODE_STATEMENT = 0, 1, 2


class PoolStats:
    """Totals for one pool, as PgBouncer's SHOW STATS counts them."""

    __slots__ = ("xact_count", "query_count", "bytes_received", "bytes_sent", "wait_time", "server_logins",
                 "server_login_failures")

    def __init__(self):
        self.xact_count = self.query_count = self.bytes_received = self.bytes_sent = 0
        self.wait_time = 0.0
        self.server_logins = self.server_login_failures = 0


class Pool:
    """Servers that share one route key, and the clients waiting for them (first in, first out)."""

    def __init__(self, relay: "Relay", route: Route, key=None):
        self.relay = relay
        self.key = route.pool_key if key is None else key
        self.name = route.name
        self.per_client = route.per_client
        self.idle: list[ServerConnection] = []  # LIFO: the most recently used server is reused first
        self.waiting: collections.deque[ClientConnection] = collections.deque()
        self.servers: set[ServerConnection] = set()
        self.logging_in = 0
        self.nclients = 0
        self.welcome: list[tuple[str, str]] | None = None
        self.welcome_result = AsyncResult()
        self.login_error: Reject | None = None
        self.login_error_until = 0.0
        self.stats = PoolStats()
        self.next_host = 0
        self.configure(route)

    def configure(self, route: Route) -> None:
        """Apply a (possibly reloaded) route and settings; existing servers keep running."""
        self.route = route
        self.mode = MODE_CODES[route.pool_mode]
        self.reuse = route.reuse
        self.size = route.pool_size
        config = self.relay.config
        self.reset_query = config.server_reset_query if (
            self.mode == MODE_SESSION or config.server_reset_query_always) else ""

    # -- getting a server ------------------------------------------------------------

    def enqueue(self, client: "ClientConnection") -> None:
        """Queue a client for the next free server and start one if the pool has room."""
        change_client_state(client, CL_WAITING)
        if self.login_error is not None and time.monotonic() < self.login_error_until:
            client.fail_pending(self.cached_login_error())  # an ERROR for its queries, not a disconnect
            return
        if self.size == 0 or len(self.servers) < self.size:
            self.launch_if_needed()

    def launch_if_needed(self) -> None:
        """Open servers while clients wait (or min_pool_size is unmet) and size allows."""
        if self.relay.shutting_down:
            return
        if self.login_error is not None and time.monotonic() < self.login_error_until:
            return
        wanted = len(self.waiting) - self.logging_in
        if self.welcome is None and not self.servers:
            wanted = max(wanted, 1)
        wanted = max(wanted, self.route.min_pool_size - len(self.servers))
        while wanted > 0 and (self.size == 0 or len(self.servers) < self.size):
            if self.route.server_limits and not self.relay.server_room(self):
                return  # a server limit of the group is reached; group_changed() calls back
            self.relay.launch_server(self)
            wanted -= 1

    def add_server(self, server: "ServerConnection") -> None:
        self.servers.add(server)
        self.logging_in += 1
        server.limit_keys = tuple(limit.key for limit in self.route.server_limits if limit.maximum)
        for key in server.limit_keys:
            self.relay.server_counts[key] += 1

    def server_ready(self, server: "ServerConnection") -> None:
        """A server finished logging in: remember its parameters for welcomes, then hand it out."""
        self.logging_in -= 1
        self.stats.server_logins += 1
        self.login_error = None
        if self.welcome is None:
            self.welcome = list(server.params.items())
            self.welcome_result.set(self.welcome)
        change_server_state(server, SV_IDLE)
        self.give(server)

    def server_login_failed(self, server: "ServerConnection", error: ServerError) -> None:
        """A login failed: waiting clients get the server's error, unless it is temporary (57P03)."""
        self.logging_in -= 1
        self._forget(server)
        self.stats.server_login_failures += 1
        reject = error.reject()
        if reject.sqlstate == CANNOT_CONNECT_NOW:
            gevent.spawn_later(1.0, self.launch_if_needed)
            return
        if not error.routing:  # host selection refusals are re-decided each time, never cached
            self.login_error = reject
            self.login_error_until = time.monotonic() + self.relay.config.server_login_retry
        if self.welcome is None:
            result, self.welcome_result = self.welcome_result, AsyncResult()
            result.set_exception(error)
        for client in list(self.waiting):
            client.fail_pending(reject)

    def cached_login_error(self) -> Reject:
        error = self.login_error or Reject("server login failed")
        return Reject(f"server login has been failing, cached error: {error.message} (server_login_retry)",
                      error.sqlstate)

    def wait_welcome(self) -> list[tuple[str, str]]:
        """Block the calling login greenlet until one server has logged in; raise its error if it failed."""
        if self.welcome is not None:
            return self.welcome
        if self.login_error is not None and time.monotonic() < self.login_error_until:
            from .errors import RejectError
            raise RejectError(self.cached_login_error())
        result = self.welcome_result
        self.launch_if_needed()
        return result.get()

    # -- giving a server back ----------------------------------------------------------

    def give(self, server: "ServerConnection") -> None:
        """An unlinked, clean server: to the first waiting client, else onto the idle list."""
        while self.waiting:
            client = self.waiting[0]
            if client.state != CL_WAITING:
                self.waiting.popleft()
                continue
            if client.gone():  # its bytes are never sent (it stopped being read at its bound)
                client.disconnect("client unexpected eof")
                continue
            client.take_server(server)
            return
        change_server_state(server, SV_IDLE)
        if self.route.server_limits:
            self.relay.group_changed(self)

    def release(self, server: "ServerConnection") -> None:
        """Unlink a server from its client at the end of a transaction (or session) and recycle it.

        Callers have checked that the server owes no reply and holds no unsent byte either way
        (ServerConnection.release_if_done, is_clean, or the end of a drain).
        """
        client = server.client
        if client is not None:
            unlink(client, server)
        if server.close_reason or not self.reuse:
            server.close(server.close_reason or "released direct connection")
        elif self.reset_query:
            server.reset(self.reset_query)
        elif server.cancels:
            # Withheld from other clients until the cancel is done; its own client may have it back.
            server.cancel_client = client
            if client is not None:
                client.cancel_server = server
            change_server_state(server, SV_CANCEL_WAIT)
        else:
            self.give(server)

    def remove(self, server: "ServerConnection") -> None:
        self._forget(server)
        if self.waiting:
            self.launch_if_needed()
        if self.route.server_limits:
            self.relay.group_changed(self)

    def _forget(self, server: "ServerConnection") -> None:
        if server in self.servers:
            self.servers.discard(server)
            for key in server.limit_keys:
                self.relay.server_counts[key] -= 1


def link(client: "ClientConnection", server: "ServerConnection", state: int = SV_ACTIVE) -> None:
    """Attach a server to a client; both become active."""
    change_server_state(server, state)
    server.client = client
    client.server = server
    change_client_state(client, CL_ACTIVE)
    client.pool.stats.xact_count += 1


def unlink(client: "ClientConnection", server: "ServerConnection") -> None:
    server.client = None
    client.server = None
    if client.state == CL_ACTIVE:
        change_client_state(client, CL_IDLE)
    if server.paused_by is not None:
        server.paused_by.paused = None
        server.paused_by = None
        server.start_reading()


def change_client_state(client: "ClientConnection", new: int) -> None:
    """The one place a client's state changes; keeps its pool's waiting queue and counts."""
    old = client.state
    if old == new:
        return
    pool = client.pool
    if old == CL_WAITING:
        try:
            pool.waiting.remove(client)
        except ValueError:
            pass
        pool.stats.wait_time += time.monotonic() - client.wait_start
    client.state = new
    if pool is None:
        return
    if new == CL_WAITING:
        client.wait_start = time.monotonic()
        pool.waiting.append(client)
    if old == CL_LOGIN and new != CL_CLOSED:
        pool.nclients += 1
    elif new == CL_CLOSED and old != CL_LOGIN:
        pool.nclients -= 1


def change_server_state(server: "ServerConnection", new: int) -> None:
    """The one place a server's state changes; keeps its pool's idle list in step."""
    old = server.state
    if old == new:
        return
    pool = server.pool
    if old == SV_IDLE:
        idle = pool.idle
        if idle and idle[-1] is server:
            idle.pop()
        else:
            idle.remove(server)
    server.state = new
    if new == SV_IDLE:
        server.idle_since = time.monotonic()
        pool.idle.append(server)
    elif new == SV_CLOSED:
        pool.remove(server)
