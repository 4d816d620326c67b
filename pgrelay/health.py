"""Server host health: reachability, role (primary or standby) and replication lag, checked periodically.

Hosts are watched from the first time host selection asks about them. Checks run on dedicated
sessions (backend.py) as health_check_user in health_check_dbname.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import gevent
from gevent.event import Event

from .backend import BackendSession
from .errors import ServerError

if TYPE_CHECKING:
    from .relay import Relay
    from .routing import HostAddr

log = logging.getLogger("pgrelay")

# Lag is 0 on a primary, and on a standby that has replayed all it received (an idle primary
# must not make its standbys look late); otherwise the age of the last replayed transaction, or
# UNKNOWN_LAG if it has received WAL but replayed no transaction yet.
UNKNOWN_LAG = 86400.0
HEALTH_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), "
    "CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN 0 "
    "WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()), "
    f"{UNKNOWN_LAG}) END"
)


@dataclass
class HostState:
    """What the last check found. `in_recovery` is None until a check succeeded."""

    addr: "HostAddr"
    up: bool = False
    in_recovery: bool | None = None
    lag: float = 0.0
    checked_at: float = 0.0
    error: str = ""

    @property
    def is_primary(self) -> bool:
        return self.up and self.in_recovery is False

    @property
    def is_standby(self) -> bool:
        return self.up and self.in_recovery is True


class HealthMonitor:
    """Keeps a HostState per watched host, refreshed every health_check_period seconds."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.states: dict[HostAddr, HostState] = {}
        self.sessions: dict[HostAddr, BackendSession] = {}
        self._running: dict[frozenset, Event] = {}
        self.greenlet = None

    def start(self) -> None:
        self.greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(block=False)
        for session in self.sessions.values():
            session.close()

    def watch(self, addr: "HostAddr") -> HostState:
        """The host's state, checking it right away (blocking this greenlet) the first time."""
        state = self.states.get(addr)
        if state is None:
            state = self.states[addr] = HostState(addr)
            self.check([addr])
        return state

    def _run(self) -> None:
        while True:
            gevent.sleep(self.relay.config.health_check_period)
            self.check(list(self.states))

    def check(self, addrs) -> None:
        """Check hosts concurrently and publish all results at once, so host selection never sees
        the old primary already down while the promoted standby still looks like a standby.
        A check already running for the same hosts is joined rather than repeated."""
        key = frozenset(addrs)
        running = self._running.get(key)
        if running is not None:
            running.wait()
            return
        done = self._running[key] = Event()
        try:
            timeout = self.relay.config.health_check_timeout
            jobs = {addr: gevent.spawn(self._probe, addr) for addr in key}
            gevent.joinall(list(jobs.values()), timeout=timeout + 1)
            changed = False
            for addr, job in jobs.items():
                result = job.value if job.successful() else (False, None, 0.0, "health check did not finish")
                changed |= self._publish(addr, *result)
            if changed:
                self.relay.hosts_changed()
        finally:
            del self._running[key]
            done.set()

    def _probe(self, addr: "HostAddr") -> tuple[bool, bool | None, float, str]:
        config = self.relay.config
        session = self.sessions.get(addr)
        if session is None:
            user = config.health_check_user
            session = self.sessions[addr] = BackendSession(self.relay, addr, config.health_check_dbname, user,
                                                           self.relay.server_password(user))
        try:
            rows = session.query(HEALTH_QUERY, [], timeout=config.health_check_timeout)
            return True, rows[0][0] == "t", float(rows[0][1] or 0), ""
        except ServerError as exc:
            return False, None, 0.0, str(exc)
        except Exception as exc:  # a bug: never let the monitor die
            self.relay.internal_error(exc, "health", f"health check of {addr} failed")
            return False, None, 0.0, type(exc).__name__

    def _publish(self, addr: "HostAddr", up: bool, in_recovery: bool | None, lag: float, error: str) -> bool:
        """Store a result; True if the host's role or reachability changed."""
        state = self.states.setdefault(addr, HostState(addr))
        was = (state.up, state.in_recovery)
        state.up, state.lag, state.error = up, lag, error
        if up:
            state.in_recovery = in_recovery
        state.checked_at = time.monotonic()
        if (state.up, state.in_recovery) == was or was == (False, None):
            return False
        role = "down" if not up else ("standby" if in_recovery else "primary")
        log.info("host %s is now %s%s", addr, role, f" ({error})" if error else "")
        self.relay.host_changed(addr, replace(state))  # a copy: the next check updates `state`
        return True
