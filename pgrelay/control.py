"""Pausing, resuming, reconnecting, killing and disabling databases, as PgBouncer's console commands and signals do.

The mechanisms behind PAUSE, RESUME, RECONNECT, WAIT_CLOSE, KILL, KILL_CLIENT, DISABLE, ENABLE and RELOAD
(the admin console calls them; SIGUSR1 and SIGUSR2 pause and resume everything). A database here is the
name clients log in to (``Pool.database``). State lives in ``relay.control``:

* ``paused_all``: PAUSE without a database, or SIGUSR1 (PgBouncer's pause mode);
* ``paused_dbs``: PAUSE db and KILL (PgBouncer's ``db_paused``, SHOW DATABASES' ``paused``);
* ``disabled_dbs``: DISABLE db (``db_disabled``, SHOW DATABASES' ``disabled``).

A paused pool (``Pool.paused``) gives no server to anyone and opens none: idle servers close at once
("pause mode"), busy ones when released (transaction mode: at the end of the transaction; session mode:
when the client leaves). Clients stay connected; their queries queue until RESUME, with
query_wait_timeout applying to them as in PgBouncer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gevent

from .errors import Reject
from .pool import SV_LOGIN, UNLINKED_SPARE

if TYPE_CHECKING:
    from .pool import Pool
    from .relay import Relay

log = logging.getLogger("pgrelay")

# SQLSTATEs of the refusals below (PgBouncer sends 08P01 for all of them).
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
INVALID_CATALOG_NAME = "3D000"
PAUSE_POLL = 0.05
DISABLED_MESSAGE = "database does not allow connections: {}"
RECONNECT_REASON = "database configuration changed"


class ControlError(Exception):
    """A control request refused with PgBouncer's text (the console sends it as an ERROR)."""

    def __init__(self, message: str, sqlstate: str = OBJECT_NOT_IN_PREREQUISITE_STATE):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class Control:
    """One relay's pause, disable and reconnect state, and the operations on it."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.paused_all = False
        self.paused_dbs: set[str] = set()
        self.disabled_dbs: set[str] = set()

    # -- state, as SHOW DATABASES and SHOW STATE show it ---------------------------------------------

    def database_paused(self, name: str) -> bool:
        """PgBouncer's db_paused: PAUSE db or KILL (a global PAUSE is ``paused_all``)."""
        return name in self.paused_dbs

    def database_disabled(self, name: str) -> bool:
        return name in self.disabled_dbs

    def pool_paused(self, pool: "Pool") -> bool:
        return self.paused_all or pool.database in self.paused_dbs

    def pools_of(self, database: str | None = None) -> list["Pool"]:
        return [pool for pool in self.relay.pools.values() if database is None or pool.database == database]

    def login_refusal(self, database: str) -> Reject | None:
        """DISABLE db: new logins to it are refused (clients already connected stay)."""
        if database in self.disabled_dbs:
            return Reject(DISABLED_MESSAGE.format(database), OBJECT_NOT_IN_PREREQUISITE_STATE)
        return None

    # -- PAUSE and RESUME ----------------------------------------------------------------------------

    def pause(self, database: str | None = None) -> None:
        """Stop handing out servers (all databases, or one); close the idle ones now. Returns at once:
        ``wait_paused`` waits until the busy ones are released and closed too."""
        if self.paused_all:
            raise ControlError("already suspended/paused")
        if database is None:
            self.paused_all = True
        else:
            self.paused_dbs.add(database)
        self._apply()

    def wait_paused(self, database: str | None = None) -> bool:
        """Block until no server of the paused pools is left (True), or until they are resumed (False)."""
        while True:
            pools = [pool for pool in self.pools_of(database) if pool.paused]
            if not pools and not (self.paused_all if database is None else database in self.paused_dbs):
                return False
            if not any(pool.servers for pool in pools):
                return True
            gevent.sleep(PAUSE_POLL)

    def resume(self, database: str | None = None) -> None:
        if database is None:
            if self.relay.shutdown_requested:
                raise ControlError("pooler is shutting down")
            if not self.paused_all:
                raise ControlError("pooler is not paused/suspended")
            self.paused_all = False
        else:
            if database not in self.paused_dbs:
                raise ControlError(f"database {database} is not paused")
            self.paused_dbs.discard(database)
        self._apply()

    def _apply(self) -> None:
        """Bring every pool's ``paused`` flag in line; paused pools lose their idle servers, resumed
        pools with queued clients open servers for them."""
        for pool in list(self.relay.pools.values()):
            paused = self.pool_paused(pool)
            if paused == pool.paused:
                continue
            pool.paused = paused
            if paused:
                for server in list(pool.used) + list(pool.idle):
                    server.close("pause mode")
            elif pool.waiting:
                pool.launch_if_needed()

    # -- signals -------------------------------------------------------------------------------------

    def signal_pause(self) -> None:
        """SIGUSR1: PAUSE of all databases (without waiting)."""
        if self.paused_all:
            log.info("got SIGUSR1, but already paused/suspended")
            return
        log.info("got SIGUSR1, pausing all activity")
        self.pause()

    def signal_resume(self) -> None:
        """SIGUSR2: RESUME of all databases."""
        if self.relay.shutdown_requested:
            log.info("got SIGUSR2 while shutting down, ignoring")
        elif self.paused_all:
            log.info("got SIGUSR2, continuing from PAUSE")
            self.resume()
        else:
            log.info("got SIGUSR2, but not paused/suspended")

    # -- RECONNECT and WAIT_CLOSE --------------------------------------------------------------------

    def reconnect(self, database: str | None = None) -> int:
        """Mark every server (of a database) to be closed: idle ones now, busy ones when released, one
        logging in once it is ready. New servers replace them as clients need them. Returns how many
        were marked."""
        marked = 0
        for pool in self.pools_of(database):
            for server in list(pool.servers):
                if not server.close_reason:
                    server.close_reason = RECONNECT_REASON
                    marked += 1
                if server.state in UNLINKED_SPARE:
                    server.close(server.close_reason)
        return marked

    def waiting_close(self, database: str | None = None) -> int:
        """Servers marked to close (RECONNECT, a reload, server_lifetime) that are still open."""
        return sum(1 for pool in self.pools_of(database) for server in pool.servers if server.close_reason)

    def wait_close(self, database: str | None = None) -> None:
        """WAIT_CLOSE: block until every marked server (of a database) is closed."""
        while self.waiting_close(database):
            gevent.sleep(PAUSE_POLL)

    # -- KILL and KILL_CLIENT ------------------------------------------------------------------------

    def kill(self, database: str | None = None) -> tuple[int, int]:
        """Drop every client and server (of a database) at once, FATAL "database removed", and leave
        the database(s) paused (RESUME db continues), as PgBouncer's KILL. A server still logging in
        is closed once ready. Returns (clients, servers) dropped."""
        if self.paused_all:
            raise ControlError("already suspended/paused")
        pools = self.pools_of(database)
        if database is not None:
            self.paused_dbs.add(database)
        else:
            self.paused_dbs.update(pool.database for pool in pools)
        self._apply()
        reason = "database removed"
        ids = {id(pool) for pool in pools}
        clients = [c for c in self.relay.clients.values() if c.pool is not None and id(c.pool) in ids]
        for client in clients:
            client.disconnect(reason, Reject(reason))
        closed = 0
        for pool in pools:
            for server in list(pool.servers):
                server.close_reason = reason
                if server.state != SV_LOGIN:  # one logging in closes once ready (paused pool)
                    server.close(reason)
                    closed += 1
        return len(clients), closed

    def kill_client(self, client_id: int) -> None:
        """Disconnect one client (the id SHOW CLIENTS shows) with FATAL "admin forced disconnect"."""
        client = self.relay.clients.get(client_id)
        if client is None or client.pool is None:
            raise ControlError("client not found", "42704")
        client.disconnect("admin forced disconnect", Reject("admin forced disconnect"))

    # -- DISABLE and ENABLE --------------------------------------------------------------------------

    def disable(self, database: str) -> None:
        self.disabled_dbs.add(database)

    def enable(self, database: str) -> None:
        self.disabled_dbs.discard(database)

    # -- RELOAD --------------------------------------------------------------------------------------

    def reload(self) -> tuple[bool, list[str], list[str]]:
        """Re-read the configuration as SIGHUP does. Returns (accepted, errors, warnings): the lines the
        reload logged at ERROR and WARNING level, for the console to show."""
        capture = _Capture()
        logger = logging.getLogger("pgrelay")
        logger.addHandler(capture)
        try:
            accepted = self.relay.reload()
        finally:
            logger.removeHandler(capture)
        errors = [r.getMessage() for r in capture.records if r.levelno >= logging.ERROR]
        warnings = [r.getMessage() for r in capture.records if logging.WARNING <= r.levelno < logging.ERROR]
        return accepted, errors, warnings


class _Capture(logging.Handler):
    """Collects the records one synchronous call logs (WARNING and above)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
