"""Sessions pgrelay opens for its own queries (auth_query, health checks); never shared with clients.

Such a session logs in with only `user` and `database` in its StartupMessage and never runs a
client's SET, so nothing a client sends can change how its queries resolve (CVE-2025-12819).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gevent import Timeout
from gevent.lock import Semaphore

from . import server_login
from .errors import ServerError

if TYPE_CHECKING:
    from .relay import Relay
    from .routing import HostAddr


class BackendSession:
    """One lazily opened server connection, used by one greenlet at a time, reopened after errors."""

    def __init__(self, relay: "Relay", addr: "HostAddr", dbname: str, user: str, password: str | None):
        self.relay = relay
        self.addr = addr
        self.dbname = dbname
        self.user = user
        self.password = password
        self.stream = None
        self.lock = Semaphore()

    def query(self, sql: str, args: list[str | None], timeout: float | None = None) -> list[list[str | None]]:
        """Run a parameterised query; raises ServerError (the session is closed and reopened next time)."""
        timeout = timeout if timeout is not None else (self.relay.config.server_connect_timeout or None)
        with self.lock:
            try:
                with Timeout(timeout, ServerError(f"query on {self.addr} timed out")):
                    if self.stream is None:
                        stream = server_login.connect(self.relay, self.addr)
                        try:
                            server_login.login(self.relay, stream, self.user, self.dbname, (), self.password)
                        except BaseException:
                            stream.close()
                            raise
                        self.stream = stream
                    return server_login.extended_query(self.stream, sql, args)
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
