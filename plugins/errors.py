"""Error translation: pgrelay's own refusals get PgBouncer's text, a PostgreSQL SQLSTATE and a HINT with
the numbers that matter (MESSAGES); faults map to their SQLSTATE, anything else to XX000 without internals.

MESSAGES is the one table of what pgrelay tells clients when it refuses or ends something itself.
A plugin overrides an entry by implementing ``pgrelay_translate_error`` (it runs before this one)
and returning its own Reject for that message; README.rst lists the table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from pgrelay import hookimpl
from pgrelay.errors import INTERNAL_ERROR, PgRelayError, Reject, RejectError


@dataclass(frozen=True)
class Message:
    """How one refusal is rendered: its SQLSTATE, and a HINT formatted with `facts()`."""

    sqlstate: str
    hint: str | None = None


MESSAGES: dict[str, Message] = {
    "no more connections allowed (max_client_conn)": Message(
        "53300", "max_client_conn is {max_client_conn} and {clients} clients are connected: raise "
                 "max_client_conn, or have the application open fewer connections."),
    "client connections exceeded (max_db_client_connections)": Message(
        "53300", "{db_clients} clients of database {database} are connected: raise max_db_client_connections "
                 "on its [databases] line or globally."),
    "client connections exceeded (max_user_client_connections)": Message(
        "53300", "{user_clients} clients of user {user} are connected: raise max_user_client_connections "
                 "on its [users] line or globally."),
    "query_wait_timeout": Message(
        "57014", "Waited {waited:.0f} s for a server of pool {pool}: {pool_state}"),
    "query_timeout": Message(
        "57014", "Waited longer than query_timeout ({query_timeout:.0f} s) for a server of pool {pool}."),
    "query timeout": Message("57014", "The query ran longer than query_timeout ({query_timeout:.0f} s)."),
    "transaction timeout": Message(
        "25P04", "The transaction was open longer than transaction_timeout ({transaction_timeout:.0f} s)."),
    "idle transaction timeout": Message(
        "25P03", "The session sat idle inside a transaction longer than idle_transaction_timeout "
                 "({idle_transaction_timeout:.0f} s); the transaction was rolled back."),
    "client_idle_timeout": Message(
        "57P05", "The connection was idle longer than client_idle_timeout ({client_idle_timeout:.0f} s)."),
    "server conn crashed?": Message("08006", "The server connection was lost; reconnect and retry."),
    # PostgreSQL's own refusals of a server login (or the direct port's cap, with the same text).
    "sorry, too many clients already": Message("53300", "{too_many_clients}"),
    "remaining connection slots are reserved for roles with the SUPERUSER attribute": Message(
        "53300", "{too_many_clients}"),
    "remaining connection slots are reserved for non-replication superuser connections": Message(
        "53300", "{too_many_clients}"),
}


def facts(relay, client) -> dict:
    """The numbers hints are formatted with (missing ones read as '?')."""
    config = relay.config
    # With workers this process sees its own clients only; the parent refused at the cap, which no
    # count passes (pgrelay.workers.coordinator), so the pgrelay-wide count is the cap itself.
    clients = len(relay.clients) if relay.worker is None else config.max_client_conn
    out: dict = {"max_client_conn": config.max_client_conn, "clients": clients,
                 "database": "?", "user": "?", "pool": "?", "size": "?", "servers": "?", "busy": "?",
                 "waiting": "?", "waited": 0.0, "db_clients": "?", "user_clients": "?", "pool_state": "?"}
    route = client.route if client is not None else None
    for name in ("query_timeout", "transaction_timeout", "idle_transaction_timeout", "client_idle_timeout"):
        value = getattr(route, name, None) if route is not None else None
        out[name] = getattr(config, name) if value is None else value
    if client is None:
        out["too_many_clients"] = "PostgreSQL's max_connections is full."
        return out
    out["database"], out["user"] = client.database, client.user
    counts = relay.client_counts
    out["db_clients"] = counts.get(("max_db_client_connections", client.database), "?")
    out["user_clients"] = counts.get(("max_user_client_connections", client.spec.role if client.spec else client.user),
                                     "?")
    pool = client.pool
    if pool is not None:
        out.update(pool=pool.name, size=pool.size or "unlimited", servers=len(pool.servers),
                   busy=len(pool.servers) - len(pool.idle) - len(pool.used), waiting=len(pool.waiting))
        if client.wait_start:
            out["waited"] = time.monotonic() - client.wait_start
        if getattr(pool, "paused", False):
            out["pool_state"] = "the pool is paused (PAUSE or SIGUSR1 on pgrelay): RESUME it to go on."
        else:
            out["pool_state"] = (f"{out['servers']} of {out['size']} servers open, {out['busy']} busy, "
                                 f"{out['waiting']} clients waiting. Raise default_pool_size (or max_db_connections "
                                 "/ max_user_connections if a cap is reached), or make transactions shorter.")
    if route is not None and not route.reuse:
        out["too_many_clients"] = ("This port gives each client a server connection of its own: use the pooled "
                                   "port, or raise max_direct_connections.")
    else:
        held = sum(len(p.servers) for p in relay.pools.values()
                   if route is not None and set(p.route.hosts) & set(route.hosts))
        out["too_many_clients"] = (f"PostgreSQL's max_connections is full; pgrelay holds {held} server connections "
                                   "to this host. Run `pgrelay check` on the configuration to size pools and caps.")
    return out


def render(relay, decision: Reject, client) -> Reject:
    """`decision` with the table's SQLSTATE and HINT, if its message is one of pgrelay's refusals."""
    message = MESSAGES.get(decision.message)
    if message is None or decision.hint:
        return decision
    hint = None
    if message.hint:
        try:
            hint = message.hint.format(**facts(relay, client))
        except (KeyError, ValueError, TypeError, AttributeError):
            hint = None  # a hint that cannot be filled is left out, never an error
    return replace(decision, sqlstate=message.sqlstate, hint=hint)


@hookimpl(trylast=True)
def pgrelay_translate_error(relay, error, phase, client):
    if isinstance(error, RejectError):
        return render(relay, error.decision, client) if relay is not None else error.decision
    if isinstance(error, PgRelayError):
        return error.reject()
    return Reject("internal error", INTERNAL_ERROR)
