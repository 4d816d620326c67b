"""Direct connections: on a direct port each client gets its own server, on the primary or (|replica) a replica."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import TOO_MANY_CONNECTIONS, Reject
from pgrelay.routing import DIRECT, PRIMARY, REPLICA, SESSION, ClientLimit
from pgrelay.settings import Int, Setting, declare

from . import routes

SETTINGS = [
    Setting("max_direct_connections", Int(0), "100", True,
            "Most direct connections at once to one database's primary (and to its replicas), like "
            "PostgreSQL's max_connections; past it clients get \"sorry, too many clients already\". 0: no limit."),
]


pgrelay_add_settings = declare(SETTINGS)


@hookimpl(trylast=True)
def pgrelay_route_client(relay, login):
    if login.listener.role != DIRECT:
        return None
    suffix = login.spec.suffix if login.spec else None
    if suffix not in (None, "replica"):
        return Reject(f'unknown user name suffix "|{suffix}" on a direct port: only |replica is accepted here',
                      hint="Dedicated poolers are reached on a pooled port.")
    db = routes.resolve(relay, login)
    if isinstance(db, Reject):
        return db
    target = REPLICA if suffix == "replica" else PRIMARY
    hosts = db.replicas if target == REPLICA and db.replicas else db.hosts
    limit = relay.config.max_direct_connections
    limits = (ClientLimit(("direct", target, hosts), limit, "sorry, too many clients already",
                          TOO_MANY_CONNECTIONS),) if limit else ()
    # The client's own startup parameters go to its own server, as if it had connected directly.
    params = tuple(login.params.items()) + tuple(p for p in db.server_params if p[0] not in login.params)
    return routes.build(relay, login, db, "direct", target=target, pool_mode=SESSION, pool_size=1,
                        min_pool_size=0, reuse=False, per_client=True, server_params=params,
                        client_limits=limits)
