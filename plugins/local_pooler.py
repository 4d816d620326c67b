"""The local pooler: clients on a pooled port without a pooler suffix, pooled to the primary."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import Reject
from pgrelay.routing import POOLED, REPLICA
from pgrelay.settings import BOOL, Setting, declare

from . import routes

SETTINGS = [
    Setting("local_pooler_replicas", BOOL, "0", True,
            "Let |replica on a pooled port pool to the replicas, instead of refusing it with a hint."),
]


pgrelay_add_settings = declare(SETTINGS)


@hookimpl(trylast=True)
def pgrelay_route_client(relay, login):
    if login.listener.role != POOLED:
        return None
    suffix = login.spec.suffix if login.spec else None
    if suffix not in (None, "replica"):
        return None  # a dedicated pooler's name
    db = routes.resolve(relay, login)
    if isinstance(db, Reject):
        return db
    if suffix == "replica":
        if not relay.config.local_pooler_replicas:
            return Reject("the local pooler only connects to the primary; |replica is not accepted on this port",
                          hint='Pool to replicas with a dedicated replica pooler (user "role|<pooler name>"), '
                               'or connect to the direct port with "role|replica".')
        return routes.build(relay, login, db, "local", target=REPLICA)
    return routes.build(relay, login, db, "local")
