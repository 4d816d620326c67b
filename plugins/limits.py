"""Client limits: max_client_conn, checked after the StartupMessage as PgBouncer does.

A client counts from the moment it has sent its StartupMessage (the check runs then) until it
leaves. Connections that have sent nothing yet do not count: with tcp_defer_accept off, or after
the defer period, silent sockets would otherwise lock real clients out until client_login_timeout.
relay.clients still holds every connection (for shutdown); this plugin keeps the ids of those that
count.

With workers (``workers = N``) the count is the parent's, for all workers together: each login
asks it once (pgrelay.workers.coordinator), and the departure gives the slot back.

Clients of dedicated poolers are not counted here: each pooler has its own max_client_conn
(enforced when the client is routed), so a burst on one cannot take slots from the others.
"""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import TOO_MANY_CONNECTIONS, Reject

SHARED_KEY = "max_client_conn"  # the parent's key for it (workers)


def counted(relay) -> set:
    """Ids of the clients counted against max_client_conn (kept across reloads)."""
    return relay.plugin_data.setdefault("limits", set())


@hookimpl(trylast=True)
def pgrelay_check_client_limits(relay, login):
    poolers = relay.plugin_data.get("poolers", {})
    suffix = login.spec.suffix if login.spec else None
    if suffix in poolers and login.listener.role == "pooled":
        return None
    ids = counted(relay)
    ids.add(login.client_id)
    limit = relay.config.max_client_conn
    if len(ids) > limit:
        # Departures are removed by pgrelay_client_disconnected, which runs a moment later: drop the
        # ids of clients already gone before refusing anyone.
        ids.intersection_update(relay.clients)
        ids.add(login.client_id)
        if len(ids) > limit:
            return Reject("no more connections allowed (max_client_conn)", TOO_MANY_CONNECTIONS)
    if relay.worker is not None:
        if relay.worker.acquire([(SHARED_KEY, limit)]) is not None:
            ids.discard(login.client_id)
            return Reject("no more connections allowed (max_client_conn)", TOO_MANY_CONNECTIONS)
        relay.plugin_data.setdefault("limits_shared", set()).add(login.client_id)
    return None


@hookimpl
def pgrelay_client_disconnected(relay, client, reason):
    ids = relay.plugin_data.get("limits")
    if ids is not None:
        ids.discard(client.id)
    shared = relay.plugin_data.get("limits_shared")
    if shared and client.id in shared:
        shared.discard(client.id)
        relay.worker.release([SHARED_KEY])
