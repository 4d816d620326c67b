"""Client limits: max_client_conn, checked after the StartupMessage as PgBouncer does.

Clients of dedicated poolers are not counted here: each pooler has its own max_client_conn
(enforced when the client is routed), so a burst on one cannot take slots from the others.
"""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import TOO_MANY_CONNECTIONS, Reject


@hookimpl(trylast=True)
def pgrelay_check_client_limits(relay, login):
    poolers = relay.plugin_data.get("poolers", {})
    suffix = login.spec.suffix if login.spec else None
    if suffix in poolers and login.listener.role == "pooled":
        return None
    dedicated = sum(count for key, count in relay.client_counts.items() if key[0] == "pooler")
    if len(relay.clients) - dedicated > relay.config.max_client_conn:
        return Reject("no more connections allowed (max_client_conn)", TOO_MANY_CONNECTIONS)
    return None
