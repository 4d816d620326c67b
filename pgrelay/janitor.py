"""Periodic maintenance: queue timeouts, idle and old servers, min_pool_size, statistics."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import gevent

from .errors import Reject

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
        for pool in list(relay.pools.values()):
            if config.query_wait_timeout:
                for client in list(pool.waiting):
                    if now - client.wait_start > config.query_wait_timeout:
                        client.disconnect("query_wait_timeout", Reject("query_wait_timeout"))
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
