"""Reads a PostgreSQL host's connection limits and the client connections in use, with pgrelay's own login code.

The check logs in as pgrelay's health checks do: health_check_user in health_check_dbname, with
the password pgrelay would use (auth_file), over server_tls_sslmode, through a BackendSession
(pgrelay/backend.py). That session blocks only its greenlet, and works from the main greenlet
outside the relay's event loop, so no other driver is needed.
"""

from __future__ import annotations

from ..backend import BackendSession
from ..errors import ServerError
from ..routing import HostAddr
from .verdict import ServerLimits

READ = "read from the server"
QUERY = ("SELECT pg_catalog.current_setting('server_version_num'), "
         "pg_catalog.current_setting('max_connections'), "
         "pg_catalog.current_setting('superuser_reserved_connections'), "
         "pg_catalog.current_setting('reserved_connections', true)")
# Sessions that hold a connection slot, other than this one (background workers, walsenders and
# autovacuum have slots of their own).
IN_USE = ("SELECT application_name FROM pg_catalog.pg_stat_activity "
          "WHERE backend_type = 'client backend' AND pid <> pg_catalog.pg_backend_pid()")


class LiveError(Exception):
    """A host's settings could not be read."""


def pgrelay_application_names(relay) -> frozenset[str]:
    """The application_name values pgrelay itself gives its server logins ([databases] and [clusters]
    lines): sessions with these names are counted as pgrelay's own, not as other clients'."""
    tables = relay.plugin_data.get("databases")
    names = set()
    for table in (tables.databases, tables.clusters) if tables else ():
        for db in table.values():
            names |= {value for key, value in db.server_params if key == "application_name" and value}
    return frozenset(names)


def read_limits(relay, addr: HostAddr, timeout: float | None = None) -> ServerLimits:
    config = relay.config
    user = config.health_check_user
    session = BackendSession(relay, addr, config.health_check_dbname, user, relay.server_password(user))
    try:
        version, max_connections, superuser, reserved = session.query(QUERY, [], timeout=timeout)[0]
        names = [row[0] for row in session.query(IN_USE, [], timeout=timeout)]
    except ServerError as exc:
        raise LiveError(f"cannot read the settings of {addr} as {user} in {config.health_check_dbname}: "
                        f"{exc}") from None
    finally:
        session.close()
    own = pgrelay_application_names(relay)
    return ServerLimits(
        max_connections=int(max_connections), superuser_reserved=int(superuser),
        reserved=int(reserved) if reserved is not None else 0, in_use=len(names),
        pgrelay_own=sum(1 for name in names if name in own), version=int(version),
        sources=(READ, READ, READ if reserved is not None else "not in this PostgreSQL version"))
