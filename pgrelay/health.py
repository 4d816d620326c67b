"""Server host health: reachability, role (primary or standby) and replication lag, checked periodically.

Hosts are watched from the first time host selection asks about them. Checks run on dedicated
sessions (backend.py) as health_check_user in health_check_dbname.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import gevent

from .backend import BackendSession
from .errors import ServerError

if TYPE_CHECKING:
    from .relay import Relay
    from .routing import HostAddr

log = logging.getLogger("pgrelay")

# Lag is 0 on a primary, and on a standby that has replayed all it received (an idle primary
# must not make its standbys look late); otherwise the age of the last replayed transaction.
HEALTH_QUERY = (
    "SELECT pg_catalog.pg_is_in_recovery(), "
    "CASE WHEN NOT pg_catalog.pg_is_in_recovery() THEN 0 "
    "WHEN pg_catalog.pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_catalog.pg_last_wal_replay_lsn() THEN 0 "
    "ELSE COALESCE(EXTRACT(EPOCH FROM pg_catalog.now() - pg_catalog.pg_last_xact_replay_timestamp()), 0) END"
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
            self.check(addr)
        return state

    def _run(self) -> None:
        while True:
            gevent.sleep(self.relay.config.health_check_period)
            jobs = [gevent.spawn(self.check, addr) for addr in list(self.states)]
            gevent.joinall(jobs, timeout=self.relay.config.health_check_period * 2 + 1)

    def check(self, addr: "HostAddr") -> HostState:
        state = self.states.setdefault(addr, HostState(addr))
        config = self.relay.config
        session = self.sessions.get(addr)
        if session is None:
            user = config.health_check_user
            session = self.sessions[addr] = BackendSession(self.relay, addr, config.health_check_dbname, user,
                                                           self.relay.server_password(user))
        was = (state.up, state.in_recovery)
        try:
            rows = session.query(HEALTH_QUERY, [], timeout=config.health_check_timeout)
            state.up = True
            state.in_recovery = rows[0][0] == "t"
            state.lag = float(rows[0][1] or 0)
            state.error = ""
        except ServerError as exc:
            state.up = False
            state.error = str(exc)
        except Exception as exc:  # a bug: never let the monitor die
            log.exception("health check of %s failed", addr)
            state.up = False
            state.error = type(exc).__name__
        state.checked_at = time.monotonic()
        now = (state.up, state.in_recovery)
        if now != was and was != (False, None):
            role = "down" if not state.up else ("standby" if state.in_recovery else "primary")
            log.info("host %s is now %s%s", addr, role, f" ({state.error})" if state.error else "")
            self.relay.hosts_changed()
        return state
