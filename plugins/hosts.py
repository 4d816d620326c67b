"""Host selection: the primary among a cluster's hosts, and a healthy replica, round robin or least used."""

from __future__ import annotations

import itertools

from pgrelay import hookimpl
from pgrelay.errors import CONNECTION_FAILURE, Reject
from pgrelay.routing import PRIMARY
from pgrelay.settings import BOOL, SECONDS, Enum, Setting, declare

SETTINGS = [
    Setting("replica_balance", Enum("round_robin", "least_connections"), "round_robin", True,
            "How a replica is chosen for a new server connection."),
    Setting("max_replica_lag", SECONDS, "10", True,
            "A replica lagging more than this leaves the rotation until it catches up; 0 disables the check."),
    Setting("replica_fallback_to_primary", BOOL, "0", True,
            "With no healthy replica, use the primary instead of refusing the client."),
]


pgrelay_add_settings = declare(SETTINGS)


@hookimpl
def pgrelay_configure(relay):
    relay.plugin_data.setdefault("hosts", {"counters": {}})


def primary(relay, route):
    """The one host of route.hosts that is up and not in recovery, or a Reject."""
    hosts = route.hosts
    if len(hosts) == 1 and not route.replicas:
        return hosts[0]
    states = [relay.health.watch(addr) for addr in hosts]
    found = [state.addr for state in states if state.is_primary]
    if found:
        return found[0]
    detail = "; ".join(f"{s.addr}: {'standby' if s.is_standby else (s.error or 'down')}" for s in states)
    return Reject(f"no primary found for {route.name}", CONNECTION_FAILURE, detail=detail)


def healthy_replicas(relay, route):
    max_lag = relay.config.max_replica_lag
    candidates = list(route.replicas) + [a for a in route.hosts if a not in route.replicas]
    out = []
    for addr in candidates:
        state = relay.health.watch(addr)
        if state.is_standby and (not max_lag or state.lag <= max_lag):
            out.append(addr)
    return out


@hookimpl(trylast=True)
def pgrelay_choose_host(relay, route, hosts):
    if route.target == PRIMARY:
        return primary(relay, route)
    replicas = healthy_replicas(relay, route)
    if not replicas:
        if relay.config.replica_fallback_to_primary:
            return primary(relay, route)
        return Reject(f"no healthy replica available for {route.name}", CONNECTION_FAILURE,
                      hint="All replicas are down or lag more than max_replica_lag.")
    if relay.config.replica_balance == "least_connections":
        used = {addr: 0 for addr in replicas}
        for pool in relay.pools.values():
            for server in pool.servers:
                if server.addr in used:
                    used[server.addr] += 1
        return min(replicas, key=lambda addr: used[addr])
    counters = relay.plugin_data["hosts"]["counters"]
    counter = counters.setdefault(route.pool_key, itertools.count())
    return replicas[next(counter) % len(replicas)]
