"""Periodic maintenance: client and queue timeouts, idle, old and draining servers, min_pool_size, statistics."""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING

import gevent

from . import protocol, recovery
from .errors import Reject
from .pool import CL_ACTIVE, CL_CLOSED, CL_IDLE, CL_LOGIN, CL_WAITING, MODE_SESSION, SV_ACTIVE, SV_DRAIN

_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool
    from .relay import Relay
    from .routing import Route
    from .server import ServerConnection

log = logging.getLogger("pgrelay")

TICK = 0.5
_I = 73  # ReadyForQuery status 'I': not inside a transaction block
QUEUED_NOTICE = protocol.error_response(
    "NOTICE", "00000", "No server connection available in postgres backend, client being queued", kind=b"N")


def _client_timeouts(route: "Route") -> bool:
    return bool(route.query_timeout or route.transaction_timeout or route.idle_transaction_timeout
                or route.client_idle_timeout)


class Janitor:
    """Runs `tick()` a couple of times a second in its own greenlet (PgBouncer's janitor.c).

    Per-pool values come from the client's route ([users], [databases]); as in PgBouncer, a [users]
    query_timeout, transaction_timeout, idle_transaction_timeout or client_idle_timeout of 0 means
    "not set" (the global one applies), while query_wait_timeout and server_lifetime take the
    route's value when it is set. Global values are read at each tick, so a reload applies at once.
    """

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.greenlet = None
        self.last_stats = time.monotonic()
        self.last_totals: dict[Pool, tuple] = {}  # stats totals at the last stats line
        self.requests: dict[int, float] = {}   # client id -> the tick that saw its last request
        self.sweeping = False                   # whether the last tick swept the clients
        self.notified: set[int] = set()         # clients sent the query_wait_notify NOTICE
        self.empty_since: dict[Pool, float] = {}  # pools without clients or servers (pool_idle_timeout)
        self.unused_since: dict[Pool, float] = {}  # * pools without clients (autodb_idle_timeout)

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            gevent.sleep(TICK)
            try:
                self.tick()
            except Exception as exc:
                self.relay.internal_error(exc, "janitor", "janitor failed")

    def tick(self) -> None:
        relay = self.relay
        config = relay.config
        now = time.monotonic()
        if self._sweep_needed():
            self._clients(now, fresh=not self.sweeping)
            self.sweeping = True
        else:
            self.sweeping = False
        if self.notified:
            self.notified = {cid for cid in self.notified if cid in relay.clients}
        for pool in list(relay.pools.values()):
            if pool.waiting:
                self._queued(pool, now)
            self._reap_stalled_waiting(pool)
            if config.server_drain_timeout or config.server_rollback_timeout:
                for server in list(pool.servers):
                    if server.state != SV_DRAIN:
                        continue
                    if server.recovery is not None:  # rolling back after its client left
                        if now - server.drain_start > config.server_rollback_timeout:
                            recovery.fail(server, "server_rollback_timeout")
                    elif config.server_drain_timeout and now - server.drain_start > config.server_drain_timeout:
                        server.close("server_drain_timeout")
            for server in list(pool.idle):
                if config.server_idle_timeout and now - server.idle_since > config.server_idle_timeout \
                        and len(pool.servers) > pool.route.min_pool_size:
                    server.close("server idle timeout")
            lifetime = pool.route.server_lifetime or config.server_lifetime  # [databases] 0: not set
            if lifetime:
                for server in list(pool.servers):
                    if now - server.connect_time > lifetime and not server.close_reason:
                        server.close_reason = "server lifetime over"  # busy ones close when released
                        if server in pool.idle:
                            server.close(server.close_reason)
            pool.mark_used(now)
            pool.trim(now)
            pool.launch_if_needed()  # also opens reserve servers once clients waited reserve_pool_timeout
        relay.trim_groups()
        self._free_unused_pools(now)
        self._free_unused_autodb_pools(now)
        if config.stats_period and now - self.last_stats >= config.stats_period:
            elapsed = now - self.last_stats
            self.last_stats = now
            snapshot = relay.stats_snapshot()
            if config.log_stats:
                self._log_stats(elapsed)
            relay.report_stats(snapshot)

    # -- connected clients: query, transaction, idle transaction and client idle timeouts -------------

    def _sweep_needed(self) -> bool:
        """Whether any of the per-client timeouts is set, globally or on a pool's route. (A client
        of a pool shared by several login users, under a forced server user, carries its own route;
        the pool shows the last one that logged in.)"""
        config = self.relay.config
        if config.query_timeout or config.transaction_timeout or config.idle_transaction_timeout \
                or config.client_idle_timeout:
            return True
        return any(_client_timeouts(pool.route) for pool in self.relay.pools.values())

    def _clients(self, now: float, fresh: bool) -> None:
        """The per-client timeouts, as PgBouncer's janitor applies them, on what this janitor saw
        (so within one TICK; an instant is never guessed earlier than it was, so nothing fires early):

        - the client's last request: the first tick that saw it read (`touched`) after it;
        - quiet time (client_idle_timeout, idle_transaction_timeout): since the last request or the
          last tick its server was busy, so a long query's end does not count as idle time;
        - its transaction's start (`xact_start`): set by link() (exact), cleared here when its server
          is seen between transactions, and set to the first tick that sees it in one again (session
          mode, or a transaction pipelined after the last one). A session that runs transactions
          back to back, never seen between two, counts them as one.

        query_timeout: a server that is not idle (a query running, or inside a transaction) and
        the client's last request older than the timeout: PgBouncer's "query timeout" (so, as there,
        it also ends a transaction left idle that long). idle_transaction_timeout: nothing running
        inside a transaction for that long. transaction_timeout: the transaction open that long.
        Each closes the server (PostgreSQL rolls the transaction back) and then the client with
        FATAL 08P01 and PgBouncer's text. client_idle_timeout: no server linked and quiet that long.
        """
        config = self.relay.config
        requests, self.requests = self.requests, {}
        for client in list(self.relay.clients.values()):
            state = client.state
            if state == CL_LOGIN or state == CL_CLOSED:
                continue
            if client.touched:
                client.touched = False
                client.quiet_since = last = now
            else:
                last = requests.get(client.id, client.quiet_since)
            self.requests[client.id] = last
            if state != CL_IDLE and state != CL_ACTIVE:
                continue  # queued: _queued applies the queue timeouts
            route = client.route or client.pool.route
            server = client.server
            if server is None:
                timeout = route.client_idle_timeout or config.client_idle_timeout
                if timeout and now - client.quiet_since > timeout:
                    client.disconnect("client_idle_timeout", Reject("client_idle_timeout"))
                continue
            running = server.expect or server.state != SV_ACTIVE
            if running:
                client.quiet_since = now
            elif server.txstatus == _I:
                client.xact_start = 0.0  # between transactions: the server is ready
                continue
            if not client.xact_start or (fresh and client.pool.mode == MODE_SESSION):
                client.xact_start = now  # first seen inside it (or this sweep just began)
            timeout = route.query_timeout or config.query_timeout
            if timeout and now - last > timeout:
                self._close(client, server, "query timeout")
                continue
            timeout = route.idle_transaction_timeout or config.idle_transaction_timeout
            if timeout and not running and now - client.quiet_since > timeout:
                self._close(client, server, "idle transaction timeout")
                continue
            timeout = route.transaction_timeout or config.transaction_timeout
            if timeout and now - client.xact_start > timeout:
                self._close(client, server, "transaction timeout")

    @staticmethod
    def _close(client: "ClientConnection", server: "ServerConnection", reason: str) -> None:
        """PgBouncer's disconnect_server for a linked server: the server closes, then its client
        gets the reason as FATAL (08P01) and closes too. A server with nothing running (idle in a
        transaction) is rolled back and reused instead when server_rollback_timeout is set."""
        if server.expect or not recovery.abandon(server, client, reason):
            server.close(reason)
        client.disconnect(reason, Reject(reason))

    # -- queued clients -----------------------------------------------------------------------------

    def _queued(self, pool: "Pool", now: float) -> None:
        """Clients waiting for a server, counted from when they were queued: past query_timeout they
        go with "query_timeout", past query_wait_timeout ([users], else [databases], else global)
        with "query_wait_timeout"; past query_wait_notify they get one NOTICE (once per connection)."""
        config = self.relay.config
        notify = config.query_wait_notify
        for client in list(pool.waiting):
            if client.state != CL_WAITING:
                continue
            route = client.route or pool.route
            waited = now - client.wait_start
            query_timeout = route.query_timeout or config.query_timeout
            wait_timeout = config.query_wait_timeout if route.query_wait_timeout is None else route.query_wait_timeout
            if query_timeout and waited > query_timeout:
                client.disconnect("query_timeout", Reject("query_timeout"))
            elif wait_timeout and waited > wait_timeout:
                client.disconnect("query_wait_timeout", Reject("query_wait_timeout"))
            elif notify and waited > notify and client.id not in self.notified and client.welcoming is None:
                # (a session client queued at login, login_link, has no AuthenticationOk yet: no NOTICE)
                self.notified.add(client.id)
                client.write(QUEUED_NOTICE)

    # -- pools nobody uses ----------------------------------------------------------------------------

    def _free_unused_autodb_pools(self, now: float) -> None:
        """autodb_idle_timeout: a pool of a database made from the * fallback that no client has used
        for that long is freed with its idle servers, as PgBouncer drops such a database."""
        relay = self.relay
        timeout = relay.config.autodb_idle_timeout
        if not timeout:
            self.unused_since = {}
            return
        unused, expired = {}, []
        for pool in relay.pools.values():
            if not pool.route.auto or pool.nclients or pool.waiting or pool.per_client \
                    or len(pool.idle) + len(pool.used) != len(pool.servers):
                continue
            since = unused[pool] = self.unused_since.get(pool, now)
            if now - since > timeout:
                expired.append(pool)
        self.unused_since = unused
        held = {id(client.pool) for client in relay.clients.values()} if expired else set()
        for pool in expired:
            if id(pool) in held or relay.pools.get(pool.key) is not pool:
                continue
            for server in pool.used + pool.idle:
                server.close("autodb_idle_timeout")
            del relay.pools[pool.key]
            self.last_totals.pop(pool, None)
            for limit in pool.route.server_limits:
                relay.server_groups.get(limit.key, set()).discard(pool)
            log.info("dropping database '%s' as it does not exist anymore or inactive auto-database",
                     pool.route.dbname)

    def _free_unused_pools(self, now: float) -> None:
        """pool_idle_timeout: a pool with no clients and no servers for that long is forgotten (its
        statistics too); the next client of its route gets a new one."""
        relay = self.relay
        timeout = relay.config.pool_idle_timeout
        if not timeout:
            self.empty_since = {}
            return
        empty, expired = {}, []
        for pool in relay.pools.values():
            if pool.nclients or pool.servers or pool.asking or pool.waiting or pool.per_client:
                continue
            since = empty[pool] = self.empty_since.get(pool, now)
            if now - since > timeout:
                expired.append(pool)
        self.empty_since = empty
        if not expired:
            return
        held = {id(client.pool) for client in relay.clients.values()}  # logging in: not counted yet
        for pool in expired:
            if id(pool) in held or relay.pools.get(pool.key) is not pool:
                continue
            del relay.pools[pool.key]
            self.last_totals.pop(pool, None)  # a new pool of that name counts from zero
            for limit in pool.route.server_limits:
                relay.server_groups.get(limit.key, set()).discard(pool)
            log.info("pool %s freed: no clients and no servers for %ds (pool_idle_timeout)", pool.name,
                     now - empty.pop(pool))

    def _reap_stalled_waiting(self, pool) -> None:
        """Queued clients no longer read (their QUEUED_INPUT_LIMIT is reached) cannot show a close
        by reading: ask the kernel whether they hung up, and let them go with their bytes unsent."""
        stalled = [c for c in pool.waiting if not c.leaving and not c.stream.rw.active]
        if not stalled:
            return
        poller = select.poll()
        for client in stalled:
            poller.register(client.sock.fileno(), _GONE)
        gone = {fd for fd, _ in poller.poll(0)}
        for client in stalled:
            if client.sock.fileno() in gone:
                client.disconnect("client unexpected eof")

    def _log_stats(self, elapsed: float) -> None:
        """PgBouncer's stats line (src/stats.c refresh_stats): one line for the whole process every
        stats_period, with rates per second and average times in microseconds over the period
        (wait: per server assignment). The parse and bind counts come from named prepared
        statement tracking (pgrelay.prepared); 0 with max_prepared_statements = 0, as in PgBouncer."""
        totals: dict = {}
        delta = [0.0] * 11
        for pool in list(self.relay.pools.values()):
            s = pool.stats
            now = (s.xact_count, s.query_count, s.bytes_received, s.bytes_sent, s.xact_time, s.query_time,
                   s.wait_time, s.server_assignment_count, s.client_parse_count, s.server_parse_count, s.bind_count)
            before = self.last_totals.get(pool, (0,) * len(now))  # a pool new in this period: from 0
            totals[pool] = now
            delta = [d + (a - b) for d, a, b in zip(delta, now, before, strict=True)]
        self.last_totals = totals  # pools freed since the last line are forgotten
        xacts, queries, received, sent, xact_time, query_time, wait_time, assigned, cparses, sparses, binds = delta
        rate = (lambda n: n / elapsed) if elapsed > 0 else (lambda n: 0)
        log.info("stats: %d xacts/s, %d queries/s, %d client parses/s, %d server parses/s, %d binds/s, "
                 "in %d B/s, out %d B/s, xact %d us, query %d us, wait %d us",
                 rate(xacts), rate(queries), rate(cparses), rate(sparses), rate(binds), rate(received), rate(sent),
                 xact_time * 1e6 / xacts if xacts else 0, query_time * 1e6 / queries if queries else 0,
                 wait_time * 1e6 / assigned if assigned else 0)
