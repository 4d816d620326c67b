"""SHOW HELP, VERSION, LISTS, MEM, STATE, DNS_HOSTS and DNS_ZONES, as PgBouncer answers them."""

from __future__ import annotations

import sys

from pgrelay import version_string
from pgrelay.pool import CL_CLOSED, CL_LOGIN

from .commands import ResultSet, command
from .show_pools import database_table, user_table

# PgBouncer 1.26's SHOW HELP (admin.c admin_show_help); SHOW FDS and SUSPEND went with online restart.
PGBOUNCER_HELP = (
    "\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n"
    "\tSHOW PEERS|PEER_POOLS\n"
    "\tSHOW SOCKETS|ACTIVE_SOCKETS|LISTS|MEM|STATE\n"
    "\tSHOW DNS_HOSTS|DNS_ZONES\n"
    "\tSHOW STATS|STATS_TOTALS|STATS_AVERAGES|TOTALS\n"
    "\tSET key = arg\n"
    "\tRELOAD\n"
    "\tPAUSE [<db>]\n"
    "\tRESUME [<db>]\n"
    "\tDISABLE <db>\n"
    "\tENABLE <db>\n"
    "\tRECONNECT [<db>]\n"
    "\tKILL [<db>]\n"
    "\tKILL_CLIENT <client_id>\n"
    "\tSHUTDOWN\n"
    "\tSHUTDOWN WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS\n"
    "\tWAIT_CLOSE [<db>]"
)

VERSION_COLUMNS = [("version", "text")]
LISTS_COLUMNS = [("list", "text"), ("items", "int4")]
MEM_COLUMNS = [("name", "text"), ("size", "int4"), ("used", "int4"), ("free", "int4"), ("memtotal", "int4")]
STATE_COLUMNS = [("key", "text"), ("value", "text")]
DNS_HOSTS_COLUMNS = [("hostname", "text"), ("ttl", "int8"), ("addrs", "text")]
DNS_ZONES_COLUMNS = [("zonename", "text"), ("serial", "int8"), ("count", "int4")]


def help_text(table) -> str:
    """PgBouncer's usage, then pgrelay's own commands and those plugins added."""
    extra = [c for c in table if c.pgrelay]
    shows = [c.name.split(" ", 1)[1] for c in extra if c.name.startswith("SHOW ")]
    lines = [PGBOUNCER_HELP]
    if shows:
        lines.append("\tSHOW " + "|".join(shows))
    for c in extra:
        if not c.name.startswith("SHOW "):
            lines.append(f"\t{c.name} {c.args}".rstrip())
    return "\n".join(lines)


@command("SHOW HELP", doc="This list", admin=False)
def show_help(ctx, arg):
    from pgrelay import protocol
    table = ctx.relay.plugin_data["admin"].table
    body = (b"S" + protocol.cstr("NOTICE") + b"V" + protocol.cstr("NOTICE") + b"C" + protocol.cstr("00000")
            + b"M" + protocol.cstr("Console usage") + b"D" + protocol.cstr(help_text(table)) + b"\x00")
    ctx.client.stream.sendall(protocol.message(b"N", body))
    return "SHOW"


@command("SHOW VERSION", doc="pgrelay's version (as pgrelay -V)", admin=False)
def show_version(ctx, arg):
    return ResultSet(VERSION_COLUMNS, [(version_string(),)])


@command("SHOW LISTS", doc="Counts of internal lists", admin=False)
def show_lists(ctx, arg):
    relay = ctx.relay
    clients = [c for c in relay.clients.values() if c.state != CL_CLOSED]
    login = [c for c in clients if c.state == CL_LOGIN and getattr(c, "virtual", None) is None]
    databases = {name for name in database_table(relay) if name != "*"}
    databases |= {pool.route.dbname for pool in relay.pools.values() if pool.route.auto}
    users = set(user_table(relay)) | {pool.route.server_user for pool in relay.pools.values()}
    rows = [
        ("databases", len(databases) + 1),  # + the console's own
        ("users", len(users)),
        ("peers", 0),
        ("pools", len(relay.pools) + 1),
        ("peer_pools", 0),
        ("free_clients", 0),
        ("used_clients", len(clients)),
        ("login_clients", len(login)),
        ("free_servers", 0),
        ("used_servers", sum(len(p.servers) for p in relay.pools.values())),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ]
    return ResultSet(LISTS_COLUMNS, rows)


@command("SHOW MEM", doc="Memory held by connections and pools (estimates)", admin=False)
def show_mem(ctx, arg):
    relay = ctx.relay
    clients = list(relay.clients.values())
    servers = [s for p in relay.pools.values() for s in p.servers]
    pools = list(relay.pools.values())
    rows = []
    for name, objects in (("client_cache", clients), ("server_cache", servers), ("pool_cache", pools)):
        size = sys.getsizeof(objects[0]) if objects else 0
        rows.append((name, size, len(objects), 0, size * len(objects)))
    return ResultSet(MEM_COLUMNS, rows)


@command("SHOW STATE", doc="Whether pgrelay is active, paused or suspended", admin=False)
def show_state(ctx, arg):
    control = getattr(ctx.relay, "control", None)
    paused = bool(getattr(control, "paused_all", False))
    return ResultSet(STATE_COLUMNS, [("active", "no" if paused else "yes"), ("paused", "yes" if paused else "no"),
                                     ("suspended", "no")])


@command("SHOW DNS_HOSTS", doc="Host names in the DNS cache (pgrelay keeps none)", admin=False)
def show_dns_hosts(ctx, arg):
    return ResultSet(DNS_HOSTS_COLUMNS, [])


@command("SHOW DNS_ZONES", doc="DNS zones in the cache (pgrelay keeps none)", admin=False)
def show_dns_zones(ctx, arg):
    return ResultSet(DNS_ZONES_COLUMNS, [])
