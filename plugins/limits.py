"""Client limits: max_client_conn, checked after the StartupMessage as PgBouncer does."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import TOO_MANY_CONNECTIONS, Reject


@hookimpl(trylast=True)
def pgrelay_check_client_limits(relay, login):
    if len(relay.clients) > relay.config.max_client_conn:
        return Reject("no more connections allowed (max_client_conn)", TOO_MANY_CONNECTIONS)
    return None
