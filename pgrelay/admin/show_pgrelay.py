"""pgrelay's own SHOW commands: LISTENERS, ROUTES, HOSTS, POOLERS, PLUGINS, BUDGET and WORKERS (listed after PgBouncer's)."""

from __future__ import annotations

import datetime
import math
import os
import time
from decimal import Decimal

from pgrelay.plugins import describe_plugins

from .commands import AdminError, ResultSet, command
from .show_pools import pool_database, pool_user

LISTENERS_COLUMNS = [("name", "text"), ("role", "text"), ("addr", "text"), ("port", "int4"), ("pool_mode", "text"),
                     ("suffixes", "text"), ("sockets", "text")]
ROUTES_COLUMNS = [("database", "text"), ("user", "text"), ("plugin", "text"), ("route", "text"),
                  ("pool_mode", "text"), ("target", "text"), ("hosts", "text"), ("replicas", "text"),
                  ("server_user", "text"), ("dbname", "text"), ("pool_size", "int4"), ("reuse", "text"),
                  ("per_client", "text"), ("pinned", "int4")]
HOSTS_COLUMNS = [("host", "text"), ("port", "int4"), ("up", "text"), ("role", "text"), ("lag", "numeric"),
                 ("checked_ago", "numeric"), ("error", "text")]
POOLERS_COLUMNS = [("name", "text"), ("target", "text"), ("pool_mode", "text"), ("default_pool_size", "int4"),
                   ("min_pool_size", "int4"), ("max_db_connections", "int4"), ("max_user_connections", "int4"),
                   ("max_client_conn", "int4"), ("upstream", "text"), ("pools", "int4"), ("clients", "int4"),
                   ("servers", "int4")]
PLUGINS_COLUMNS = [("name", "text"), ("origin", "text"), ("hooks", "text")]
BUDGET_COLUMNS = [("host", "text"), ("kind", "text"), ("pools", "int4"), ("sizes", "text"),
                  ("pool_sizes", "numeric"), ("pooled", "numeric"), ("direct", "numeric"), ("health", "int4"),
                  ("auth", "numeric"), ("worst_case", "numeric"), ("bounds", "text"), ("unbounded", "text")]

WORKERS_COLUMNS = [("worker", "int4"), ("pid", "int4"), ("started", "text"), ("clients", "int4"),
                   ("servers", "int4"), ("pools", "int4")]
_STARTED = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # as SHOW CLIENTS' times


def _number(value: float):
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return None
    return Decimal(str(round(value, 3))) if isinstance(value, float) and not value.is_integer() else Decimal(int(value))


@command("SHOW LISTENERS", doc="Listening ports: role, pool mode, sockets", admin=False, pgrelay=True)
def show_listeners(ctx, arg):
    from pgrelay.listener import listener_specs
    relay = ctx.relay
    bound: dict[int, list[str]] = {}
    for item in getattr(relay.listeners, "bound", ()):
        info = item.info
        where = item.unix_path or "tcp"
        bound.setdefault(info.port, []).append(where if item.unix_path else "tcp")
    rows = []
    for info, addrs in listener_specs(relay.config):
        role = info.role if info.kind == "postgres" else info.kind  # role=serverless as configured
        rows.append((info.name, role, ",".join(addrs), info.port, info.pool_mode,
                     "yes" if info.suffixes else "no", ",".join(bound.get(info.port, []))))
    return ResultSet(LISTENERS_COLUMNS, rows)


@command("SHOW ROUTES", doc="Per pool: the route, the plugin that decided it, clients pinned by session state", admin=False, pgrelay=True)
def show_routes(ctx, arg):
    relay = ctx.relay
    rows = []
    for pool in list(relay.pools.values()):
        route = pool.route
        rows.append((pool_database(pool), pool_user(pool), pool.decided_by, route.name, route.pool_mode,
                     route.target, ",".join(str(h) for h in route.hosts), ",".join(str(h) for h in route.replicas),
                     route.server_user, route.dbname, pool.size, "yes" if route.reuse else "no",
                     "yes" if route.per_client else "no", pool.pinned))
    return ResultSet(ROUTES_COLUMNS, rows)


@command("SHOW HOSTS", doc="Health of the server hosts: up, role, replication lag", admin=False, pgrelay=True)
def show_hosts(ctx, arg):
    now = time.monotonic()
    rows = []
    for addr, state in sorted(ctx.relay.health.states.items(), key=lambda item: str(item[0])):
        role = "unknown" if state.in_recovery is None else ("standby" if state.in_recovery else "primary")
        checked = now - state.checked_at if state.checked_at else None
        rows.append((addr.host, addr.port, "yes" if state.up else "no", role, _number(float(state.lag)),
                     _number(checked) if checked is not None else None, state.error or None))
    return ResultSet(HOSTS_COLUMNS, rows)


@command("SHOW POOLERS", doc="Dedicated poolers ([poolers]) and their pools", admin=False, pgrelay=True)
def show_poolers(ctx, arg):
    relay = ctx.relay
    usage: dict[str, list[int]] = {}
    for pool in relay.pools.values():
        key = pool.route.pool_key
        prefix = key[0] if isinstance(key, tuple) and key and isinstance(key[0], str) else ""
        if prefix.startswith("pooler:"):
            counts = usage.setdefault(prefix[len("pooler:"):], [0, 0, 0])
            counts[0] += 1
            counts[1] += pool.nclients
            counts[2] += len(pool.servers)
    rows = []
    for name, pooler in sorted(relay.plugin_data.get("poolers", {}).items()):
        pools, clients, servers = usage.get(name, [0, 0, 0])
        rows.append((name, pooler.target, pooler.pool_mode, pooler.default_pool_size, pooler.min_pool_size,
                     pooler.max_db_connections, pooler.max_user_connections, pooler.max_client_conn,
                     str(pooler.upstream) if pooler.upstream else None, pools, clients, servers))
    return ResultSet(POOLERS_COLUMNS, rows)


@command("SHOW PLUGINS", doc="Loaded plugins, in call order, and their hooks", admin=False, pgrelay=True)
def show_plugins(ctx, arg):
    rows = [(name, origin, ",".join(hooks)) for name, origin, hooks in describe_plugins(ctx.relay.pm)]
    return ResultSet(PLUGINS_COLUMNS, rows)


@command("SHOW BUDGET", doc="Worst-case server connections per host of the current configuration",
         admin=False, pgrelay=True)
def show_budget(ctx, arg):
    from pgrelay.budget import model
    from pgrelay.errors import ConfigError
    try:
        budget = model.build(ctx.relay)
    except (model.BudgetError, ConfigError) as exc:  # a configuration the model cannot count
        raise AdminError(f"cannot compute the connection budget: {exc}", "0A000") from None
    rows = []
    for addr in list(budget.postgres_hosts) + list(budget.upstream_hosts):
        part = model.host_budget(budget, addr)
        rows.append((str(addr), "postgres" if part.postgres else "upstream", part.pools, part.sizes or None,
                     _number(part.pool_sizes), _number(part.pooled), _number(part.direct), part.health,
                     _number(part.auth), _number(part.per_process), "; ".join(part.combined_bounds
                                                                              or part.pooled_bounds) or None,
                     "; ".join(part.unbounded) or None))
    return ResultSet(BUDGET_COLUMNS, rows)


@command("SHOW WORKERS", doc="The worker processes (workers = N): pid, start, clients, servers, pools", admin=False,
         pgrelay=True)
def show_workers(ctx, arg):
    """One row for this process; with workers, every worker answers its own (pgrelay.workers.console)."""
    relay = ctx.relay
    index = relay.worker.index if relay.worker is not None else 0
    servers = sum(len(pool.servers) for pool in list(relay.pools.values()))
    return ResultSet(WORKERS_COLUMNS, [(index, os.getpid(), _STARTED, len(relay.clients), servers, len(relay.pools))])
