"""Pools of server connections and the state changes that move clients and servers between them.

Every client and server state change goes through change_client_state / change_server_state,
which keep each pool's lists (idle servers, waiting clients) and counters in step. Herding
objects between lists is PgBouncer's objects.c; the names follow it.
"""

from __future__ import annotations

import collections
import time
from bisect import bisect_left
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from .errors import CANNOT_CONNECT_NOW, Reject, ServerError
from .keys import PROTOCOL_3_2
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
# USED: idle longer than server_check_delay, so it runs server_check_query (TESTED) before reuse.
SV_LOGIN, SV_IDLE, SV_ACTIVE, SV_SYNC, SV_RESET, SV_CANCEL_WAIT, SV_CLOSED, SV_DRAIN, SV_USED, SV_TESTED = range(10)
SERVER_STATE_NAMES = ("login", "idle", "active", "sync", "reset", "cancel_wait", "closed", "drain", "used", "tested")
UNLINKED_SPARE = (SV_IDLE, SV_USED)  # states of a server no one uses and that may be closed at once

MODE_CODES = {SESSION: 0, TRANSACTION: 1, STATEMENT: 2}
# workers = N: seconds a pool refused room by the parent waits before asking again, if no "room"
# message came first (pgrelay.workers.link).
RETRY_CAPPED = 0.5
MODE_SESSION, MODE_TRANSACTION, MODE_STATEMENT = 0, 1, 2


# Upper bounds (seconds) of the duration histograms' buckets (queue wait, transaction, query);
# one more bucket counts what is longer than the last.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)


class PoolStats:
    """Totals for one pool since it was made, as PgBouncer's SHOW STATS counts them.

    server_assignment_count: a server was linked to a client (every transaction in transaction
    pooling, once per client in session pooling). query_count: queries answered (each ReadyForQuery
    the client asked for: a Query, an extended-protocol batch up to Sync, a FunctionCall).
    xact_count: transactions completed (a round of queries ending back at idle 'I', so one per
    autocommit statement). query_time: time with queries outstanding; xact_time: time inside a
    transaction, idle in transaction included; wait_time: time queued before a server was
    assigned. bytes_received: from clients; bytes_sent: to clients (their servers' replies).
    The *_hist lists count the same waits, transactions and query rounds by DURATION_BUCKETS
    (not cumulative; the last counts those above the last bound), updated as each one ends.
    """

    __slots__ = ("xact_count", "query_count", "server_assignment_count", "bytes_received", "bytes_sent",
                 "xact_time", "query_time", "wait_time", "server_logins", "server_login_failures",
                 "wait_hist", "xact_hist", "query_hist", "server_rollbacks", "server_rollback_failures",
                 "client_parse_count", "server_parse_count", "bind_count")

    def __init__(self):
        self.xact_count = self.query_count = self.server_assignment_count = 0
        self.bytes_received = self.bytes_sent = 0
        self.xact_time = self.query_time = self.wait_time = 0.0  # seconds
        self.server_logins = self.server_login_failures = 0
        self.server_rollbacks = self.server_rollback_failures = 0  # pgrelay.recovery: reused / closed
        # Named prepared statements (pgrelay.prepared): Parses from clients, Parses pgrelay sent to
        # servers, Binds of named statements (PgBouncer 1.21's total_*_parse_count, total_bind_count).
        self.client_parse_count = self.server_parse_count = self.bind_count = 0
        self.wait_hist = [0] * (len(DURATION_BUCKETS) + 1)
        self.xact_hist = [0] * (len(DURATION_BUCKETS) + 1)
        self.query_hist = [0] * (len(DURATION_BUCKETS) + 1)

    def end_round(self, client: "ClientConnection", idle: bool) -> None:
        """All of the client's queries are answered (a ReadyForQuery with none owed): the round since
        its first query adds to query_time; back at idle a transaction is over, timed from the
        first query of its first round (PgBouncer's server.c). Once per round, never per message:
        one read of the event loop's clock (cached per loop iteration, like PgBouncer's
        get_cached_time), as when the round began (ClientConnection._forward)."""
        start = client.query_start
        if not start:
            return
        now = client.relay.clock()
        client.query_start = 0.0
        took = now - start if now > start else 0.0
        self.query_time += took
        self.query_hist[bisect_left(DURATION_BUCKETS, took)] += 1
        if idle:
            began = client.txn_start or start
            client.txn_start = 0.0
            took = now - began if now > began else 0.0
            self.xact_count += 1
            self.xact_time += took
            self.xact_hist[bisect_left(DURATION_BUCKETS, took)] += 1
        elif not client.txn_start:
            client.txn_start = start


class Pool:
    """Servers that share one route key, and the clients waiting for them (first in, first out)."""

    def __init__(self, relay: "Relay", route: Route, key=None):
        self.relay = relay
        self.key = route.pool_key if key is None else key
        self.name = route.name
        self.per_client = route.per_client
        self.idle: list[ServerConnection] = []  # LIFO: the most recently used server is reused first
        self.used: list[ServerConnection] = []  # idle past server_check_delay: checked before reuse
        self.testing = 0                         # servers running server_check_query
        self.waiting: collections.deque[ClientConnection] = collections.deque()
        self.servers: set[ServerConnection] = set()
        self.logging_in = 0
        self.asking = 0               # workers: servers asked of the parent, not granted yet (Relay.launch_server)
        self.nclients = 0
        self.welcome: list[tuple[str, str]] | None = None
        self.welcome_result = AsyncResult()
        self.login_error: Reject | None = None
        self.login_error_until = 0.0
        self.stats = PoolStats()
        self.next_host = 0
        self.database = route.dbname  # the name its clients log in to (Relay.get_pool); PAUSE db etc.
        self.paused = False           # PAUSE/KILL (pgrelay/control.py): hands out and opens no server
        self.decided_by = ""          # the plugin whose pgrelay_route_client made its route (Relay.get_pool)
        self.listening = None         # its listening server for LISTEN/NOTIFY (pgrelay.notify), once used
        self.pinned = 0               # clients pinned to their server by session state (pgrelay.session_state)
        self.server_protocol = PROTOCOL_3_2  # asked of its servers (a direct client's own, see login_link)
        self.capped = 0.0             # workers: refused room by the parent; no launch before this time or "room"
        self.configure(route)

    def configure(self, route: Route) -> None:
        """Apply a (possibly reloaded) route and settings; existing servers keep running, unless how
        they connect changed (PgBouncer's tag_database_dirty): then each closes when released."""
        old = getattr(self, "route", None)
        if old is not None and _connection(old) != _connection(route):
            for server in list(self.servers):
                server.close_reason = server.close_reason or "database configuration changed"
                if server.state in UNLINKED_SPARE:
                    server.close(server.close_reason)
        self.route = route
        self.mode = MODE_CODES[route.pool_mode]
        self.reuse = route.reuse
        config = self.relay.config
        self.size = config.default_pool_size if route.pool_size is None else route.pool_size
        self.take = 0 if config.server_round_robin else -1  # which idle server the next client gets
        self.reset_query = config.server_reset_query if (
            self.mode == MODE_SESSION or config.server_reset_query_always) else ""

    # -- getting a server ------------------------------------------------------------

    def enqueue(self, client: "ClientConnection") -> None:
        """Queue a client for the next free server and start one if the pool has room."""
        change_client_state(client, CL_WAITING)
        if self.login_error is not None and time.monotonic() < self.login_error_until:
            client.fail_pending(self.cached_login_error())  # an ERROR for its queries, not a disconnect
            return
        if self.used or self.size == 0 or len(self.servers) + self.asking < self.size:
            self.launch_if_needed()  # checks a server due a check, or opens one

    def launch_if_needed(self) -> None:
        """Open servers while clients wait (or min_pool_size is unmet) and size allows."""
        if self.relay.shutting_down or self.paused:
            return
        if self.capped:  # workers: the parent said the pool (or its group) is full pgrelay-wide
            if time.monotonic() < self.capped:
                return
            self.capped = 0.0
        if self.login_error is not None and time.monotonic() < self.login_error_until:
            return
        limited = bool(self.route.server_limits)
        while True:
            wanted = len(self.waiting) - self.logging_in - self.testing - self.asking
            if wanted > 0 and self.used:  # an idle server due a check comes before a new one
                self.used[-1].check(self.relay.config.server_check_query)
                continue
            opened = len(self.servers) + self.asking
            if self.welcome is None and not opened:
                wanted = max(wanted, 1)
            wanted = max(wanted, self.route.min_pool_size - opened)
            allowed = self.allowed_servers()
            if wanted <= 0 or (allowed and opened >= allowed):
                return
            if limited and not self.relay.server_room(self):
                return  # a server limit of the group is reached; group_changed() calls back
            if limited and not self.relay.server_room(self, evict=False):
                continue  # closing an evicted server let a waiting pool (maybe this one) take the room
            self.relay.launch_server(self)

    def shared_keys(self, with_maxima: bool = False) -> list:
        """workers = N: the keys the parent counts this pool's servers under, each with the maximum
        this worker checks it against: the pool's own (its size, plus reserve once due; a pool per
        client has its size to itself) and its server limits (max_db_connections ...)."""
        keys = []
        allowed = 0 if self.per_client else self.allowed_servers()
        if allowed:
            keys.append((server_key(self.key), allowed))
        keys.extend((server_key(limit.key), limit.maximum) for limit in self.route.server_limits if limit.maximum)
        return keys if with_maxima else [key for key, _ in keys]

    def reserve(self) -> int:
        """reserve_pool_size for this pool: its route's ([users], [databases]), else the global one."""
        reserve = self.route.reserve_pool_size
        return self.relay.config.reserve_pool_size if reserve is None else reserve

    def allowed_servers(self) -> int:
        """How many servers the pool may have now (0: no limit): its size, plus reserve_pool_size
        once the first queued client has waited reserve_pool_timeout, as in PgBouncer."""
        if self.size == 0:
            return 0
        reserve = self.reserve()
        if reserve and self.waiting \
                and time.monotonic() - self.waiting[0].wait_start >= self.relay.config.reserve_pool_timeout:
            return self.size + reserve
        return self.size

    def spare(self):
        """An unused server that may be closed to make room (the longest unused), or None."""
        return self.used[0] if self.used else (self.idle[0] if self.idle else None)

    def mark_used(self, now: float) -> None:
        """Janitor: idle servers unused for server_check_delay must pass server_check_query before
        their next client (PgBouncer's used list); checks happen only when a client needs one."""
        config = self.relay.config
        if not config.server_check_query:
            return
        for server in list(self.idle):
            if now - server.idle_since >= config.server_check_delay:
                change_server_state(server, SV_USED)
        for server in list(self.used):  # the idle servers' timeouts apply to them as well
            if config.server_idle_timeout and now - server.idle_since > config.server_idle_timeout \
                    and len(self.servers) > self.route.min_pool_size:
                server.close("server idle timeout")
            elif server.close_reason:
                server.close(server.close_reason)

    def trim(self, now: float) -> None:
        """Close idle servers the pool no longer may have (janitor): beyond size plus reserve (after
        a reload lowered them: PgBouncer's "too many servers in the pool"), and reserve servers once
        no client has waited for reserve_pool_timeout. Busy servers are never closed here."""
        if self.size == 0:
            return
        extra = len(self.servers) - self.size
        if extra <= 0:
            return
        over = len(self.servers) - (self.size + self.reserve())
        quiet = not self.waiting
        for server in self.used + self.idle:
            if extra <= 0:
                break
            if over > 0 or (quiet and now - server.idle_since >= self.relay.config.reserve_pool_timeout):
                server.close("too many servers in the pool" if over > 0 else "reserve pool no longer needed")
                extra -= 1
                over -= 1

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
        self.relay.server_login_failed(self, error)
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
        """An unlinked, clean server: to the first waiting client, else onto the idle list (a paused
        pool closes it instead: PAUSE waits for that)."""
        if self.paused:
            server.close("pause mode")
            return
        if server.shared and self.relay.worker.take_shed(server.shared):
            server.close("released for another worker")  # it waits for room under one of its limits
            return
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
        elif server.extras is None:  # its session state is unknown (pgrelay.session_state): reset first
            from .session_state import RESET_SQL
            server.reset(RESET_SQL)
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
            if server.shared:  # workers: the parent's count for all workers
                self.relay.worker.release(server.shared)
                server.shared = ()


def server_key(key) -> str:
    """A pool key or server limit key as the workers' parent counts it (the same in every worker)."""
    return "s:" + repr(key)


def client_key(key) -> str:
    """A client limit key as the workers' parent counts it."""
    return "c:" + repr(key)


def _connection(route: Route) -> tuple:
    """What a route's servers are connected to and with: a change makes them unfit for reuse."""
    return (route.hosts, route.replicas, route.dbname, route.server_user, route.server_password,
            route.server_params, route.connect_query)


def link(client: "ClientConnection", server: "ServerConnection", state: int = SV_ACTIVE) -> None:
    """Attach a server to a client; both become active. The client's transaction began now, or when
    it was queued for this server (transaction_timeout; the janitor follows later ones in session mode)."""
    client.xact_start = client.wait_start if client.state == CL_WAITING else time.monotonic()
    change_server_state(server, state)
    server.client = client
    client.server = server
    change_client_state(client, CL_ACTIVE)
    client.pool.stats.server_assignment_count += 1


def unlink(client: "ClientConnection", server: "ServerConnection") -> None:
    if server.pfilter:  # replies to named statements still owed (pgrelay.prepared)
        from .prepared import unlinked
        unlinked(server)
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
        if new == CL_ACTIVE:  # as PgBouncer: a wait counts when it ends with a server assigned
            stats = pool.stats
            waited = time.monotonic() - client.wait_start
            stats.wait_time += waited
            stats.wait_hist[bisect_left(DURATION_BUCKETS, waited)] += 1
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
        elif idle and idle[0] is server:
            del idle[0]
        else:
            idle.remove(server)
    elif old == SV_USED:
        pool.used.remove(server)
    elif old == SV_TESTED:
        pool.testing -= 1
    server.state = new
    if new == SV_IDLE:
        server.idle_since = time.monotonic()
        pool.idle.append(server)
    elif new == SV_USED:
        pool.used.append(server)
    elif new == SV_TESTED:
        pool.testing += 1
    elif new == SV_CLOSED:
        pool.remove(server)
