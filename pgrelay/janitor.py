"""Periodic maintenance: client and queue timeouts, idle, old and draining servers, min_pool_size, statistics."""

from __future__ import annotations

import logging
import select
import time
from typing import TYPE_CHECKING

import gevent

from .errors import Reject
from .pool import CL_ACTIVE, CL_IDLE, SV_ACTIVE, SV_DRAIN

_GONE = select.POLLRDHUP | select.POLLHUP | select.POLLERR

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger("pgrelay")

TICK = 0.5


class Janitor:
    """Runs `tick()` a couple of times a second in its own greenlet (PgBouncer's janitor.c)."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.greenlet = None
        self.last_stats = time.monotonic()
        self.last_totals: dict[str, tuple] = {}

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
            except Exception:
                log.exception("janitor failed")

    def tick(self) -> None:
        relay = self.relay
        config = relay.config
        now = time.monotonic()
        if config.client_idle_timeout or config.idle_transaction_timeout:
            self._idle_clients(now)
        for pool in list(relay.pools.values()):
            if config.query_wait_timeout:
                for client in list(pool.waiting):
                    if now - client.wait_start > config.query_wait_timeout:
                        client.disconnect("query_wait_timeout", Reject("query_wait_timeout"))
            self._reap_stalled_waiting(pool)
            if config.server_drain_timeout:
                for server in list(pool.servers):
                    if server.state == SV_DRAIN and now - server.drain_start > config.server_drain_timeout:
                        server.close("server_drain_timeout")
            for server in list(pool.idle):
                if config.server_idle_timeout and now - server.idle_since > config.server_idle_timeout \
                        and len(pool.servers) > pool.route.min_pool_size:
                    server.close("server idle timeout")
            if config.server_lifetime:
                for server in list(pool.servers):
                    if now - server.connect_time > config.server_lifetime and not server.close_reason:
                        server.close_reason = "server lifetime over"  # busy ones close when released
                        if server in pool.idle:
                            server.close(server.close_reason)
            pool.launch_if_needed()
        if config.stats_period and now - self.last_stats >= config.stats_period:
            elapsed = now - self.last_stats
            self.last_stats = now
            snapshot = relay.stats_snapshot()
            if config.log_stats:
                self._log_stats(snapshot, elapsed)
            relay.report_stats(snapshot)

    def _idle_clients(self, now: float) -> None:
        """client_idle_timeout (no server linked) and idle_transaction_timeout (linked, inside a
        transaction, nothing running), as PgBouncer: quiet time counts from the last time the client
        sent something or its server was busy, as seen by this janitor (within one TICK)."""
        config = self.relay.config
        idle_timeout, idle_tx_timeout = config.client_idle_timeout, config.idle_transaction_timeout
        for client in list(self.relay.clients.values()):
            if client.state != CL_IDLE and client.state != CL_ACTIVE:
                continue
            server = client.server
            if client.touched or (server is not None and (server.expect or server.state != SV_ACTIVE)):
                client.touched = False
                client.quiet_since = now
                continue
            quiet = now - client.quiet_since
            if server is None:
                if idle_timeout and quiet > idle_timeout:
                    client.disconnect("client_idle_timeout", Reject("client_idle_timeout"))
            elif idle_tx_timeout and server.txstatus != 73 and quiet > idle_tx_timeout:  # not 'I'
                server.close("idle transaction timeout")
                client.disconnect("idle transaction timeout", Reject("idle transaction timeout"))

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

    def _log_stats(self, snapshot: dict, elapsed: float) -> None:
        for name, s in snapshot["pools"].items():
            now = (s["xact_count"], s["query_count"], s["bytes_received"], s["bytes_sent"], s["wait_time"])
            before = self.last_totals.get(name, (0, 0, 0, 0, 0.0))
            self.last_totals[name] = now
            d = [a - b for a, b in zip(now, before, strict=True)]
            if not any(d):
                continue
            log.info("stats: %s: %d xacts/s, %d queries/s, in %d B/s, out %d B/s, wait %d us",
                     name, d[0] / elapsed, d[1] / elapsed, d[2] / elapsed, d[3] / elapsed,
                     (d[4] / d[0] * 1e6) if d[0] else 0)
