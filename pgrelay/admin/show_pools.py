"""SHOW DATABASES, POOLS, CLIENTS, SERVERS, USERS, PEERS and PEER_POOLS: pgrelay's pools, clients and servers
in PgBouncer 1.25/1.26's columns."""

from __future__ import annotations

import socket
import time

from pgrelay.pool import (CL_ACTIVE, CL_CLOSED, CL_IDLE, CL_LOGIN, CL_WAITING, SV_ACTIVE, SV_CANCEL_WAIT, SV_DRAIN,
                          SV_IDLE, SV_LOGIN, SV_RESET, SV_SYNC, SV_TESTED, SV_USED)
from pgrelay import prepared
from pgrelay.routing import PRIMARY
from pgrelay.virtual import peer_pid

from .commands import ResultSet, command

ADMIN_DB = "pgbouncer"

DATABASES_COLUMNS = [
    ("name", "text"), ("host", "text"), ("port", "int4"), ("database", "text"), ("force_user", "text"),
    ("pool_size", "int4"), ("min_pool_size", "int4"), ("reserve_pool_size", "int4"), ("server_lifetime", "int4"),
    ("pool_mode", "text"), ("load_balance_hosts", "text"), ("max_connections", "int4"),
    ("current_connections", "int4"), ("max_client_connections", "int4"), ("current_client_connections", "int4"),
    ("paused", "int4"), ("disabled", "int4"),
]
POOLS_COLUMNS = [
    ("database", "text"), ("user", "text"), ("cl_active", "int4"), ("cl_waiting", "int4"),
    ("cl_active_cancel_req", "int4"), ("cl_waiting_cancel_req", "int4"), ("sv_active", "int4"),
    ("sv_active_cancel", "int4"), ("sv_being_canceled", "int4"), ("sv_idle", "int4"), ("sv_used", "int4"),
    ("sv_tested", "int4"), ("sv_login", "int4"), ("maxwait", "int4"), ("maxwait_us", "int4"),
    ("pool_mode", "text"), ("load_balance_hosts", "text"),
]
# SHOW CLIENTS and SHOW SERVERS (PgBouncer's socket_header, SKF_STD); timestamps are sent as text.
SOCKET_COLUMNS = [
    ("type", "text"), ("user", "text"), ("database", "text"), ("replication", "text"), ("state", "text"),
    ("addr", "text"), ("port", "int4"), ("local_addr", "text"), ("local_port", "int4"),
    ("connect_time", "text"), ("request_time", "text"), ("wait", "int4"), ("wait_us", "int4"),
    ("close_needed", "int4"), ("ptr", "text"), ("link", "text"), ("remote_pid", "int4"), ("tls", "text"),
    ("application_name", "text"), ("prepared_statements", "int4"), ("id", "int4"),
]
USERS_COLUMNS = [
    ("name", "text"), ("pool_size", "text"), ("reserve_pool_size", "text"), ("pool_mode", "text"),
    ("max_user_connections", "int4"), ("current_connections", "int4"), ("max_user_client_connections", "int4"),
    ("current_client_connections", "int4"),
]
PEERS_COLUMNS = [("peer_id", "int4"), ("host", "text"), ("port", "int4"), ("pool_size", "int4")]
PEER_POOLS_COLUMNS = [("peer_id", "int4"), ("cl_active_cancel_req", "int4"), ("cl_waiting_cancel_req", "int4"),
                      ("sv_active_cancel", "int4"), ("sv_login", "int4")]

# PgBouncer's server list names for pgrelay's server states.
SERVER_STATE = {SV_LOGIN: "new", SV_IDLE: "idle", SV_ACTIVE: "active", SV_SYNC: "active", SV_DRAIN: "active",
                SV_RESET: "tested", SV_TESTED: "tested", SV_USED: "used", SV_CANCEL_WAIT: "being_canceled"}


# -- helpers shared with show_stats and show_pgrelay ------------------------------------------------

def pool_database(pool) -> str:
    """The database name a pool's clients logged in with."""
    name = getattr(pool, "database", None)
    key = pool.route.pool_key
    if isinstance(key, tuple) and len(key) >= 2 and isinstance(key[1], str):
        return key[1]
    return name or pool.route.dbname or pool.name


def pool_user(pool) -> str:
    """The pool's user: its server user, with the suffix the clients used for pools PgBouncer has no
    counterpart of (role.cluster, role|pooler, role|replica, and #<client id> for a direct
    connection), so that (database, user) names one pool, as exporters expect."""
    route = pool.route
    user = route.server_user
    key = route.pool_key
    prefix = key[0] if isinstance(key, tuple) and key else "local"
    cluster = key[3] if isinstance(key, tuple) and len(key) >= 4 else None
    if cluster:
        user += f".{cluster}"
    if isinstance(prefix, str) and prefix.startswith("pooler:"):
        user += "|" + prefix[len("pooler:"):]
    elif route.target != PRIMARY:
        user += "|replica"
    if route.per_client and isinstance(pool.key, tuple) and len(pool.key) == 2:
        user += f"#{pool.key[1]}"
    return user


def wall(monotonic_stamp: float) -> str:
    """A time.monotonic() stamp as PgBouncer prints times: local time with the zone name."""
    stamp = time.time() - (time.monotonic() - monotonic_stamp)
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(stamp))


def split_peer(peer: str, relay) -> tuple[str, int]:
    if peer == "unix":
        return "unix", relay.config.listen_port
    host, _, port = peer.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0


def local_addr(sock, relay) -> tuple[str, int]:
    try:
        name = sock.getsockname()
    except (OSError, AttributeError):
        return "", 0
    if getattr(sock, "family", None) == socket.AF_UNIX or isinstance(name, (str, bytes)):
        return "unix", relay.config.listen_port
    return name[0], name[1]


def tls_info(sock) -> str:
    """PgBouncer's tls column: protocol/cipher, or empty without TLS."""
    version = getattr(sock, "version", None)
    cipher = getattr(sock, "cipher", None)
    if not callable(version) or not callable(cipher):
        return ""
    try:
        described = cipher()
        return f"{version()}/{described[0]}" if described else str(version() or "")
    except (OSError, ValueError):
        return ""


def ptr(obj) -> str:
    return f"0x{id(obj):x}" if obj is not None else ""


def database_table(relay) -> dict:
    data = relay.plugin_data.get("databases")
    return dict(getattr(data, "databases", {}) or {})


def user_table(relay) -> dict:
    data = relay.plugin_data.get("databases")
    return dict(getattr(data, "users", {}) or {})


def database_flag(relay, method: str, name: str) -> int:
    control = getattr(relay, "control", None)
    check = getattr(control, method, None)
    return int(bool(check(name))) if check is not None else 0


def console_clients(relay) -> list:
    return [c for c in relay.clients.values() if getattr(c, "virtual", None) is not None and c.state != CL_CLOSED]


def first(*values):
    for value in values:
        if value is not None:
            return value
    return None


# -- SHOW DATABASES ------------------------------------------------------------------------------------

@command("SHOW DATABASES", doc="Configured databases", admin=False)
def show_databases(ctx, arg):
    relay = ctx.relay
    config = relay.config
    entries = {name: db for name, db in database_table(relay).items() if name != "*"}
    servers: dict[str, int] = {}
    clients: dict[str, int] = {}
    autos = {}
    for pool in relay.pools.values():
        name = pool_database(pool)
        servers[name] = servers.get(name, 0) + len(pool.servers)
        clients[name] = clients.get(name, 0) + pool.nclients
        if pool.route.auto and name not in entries:
            autos[name] = pool
    rows = []
    for name, db in entries.items():
        host = ",".join(h.host for h in db.hosts) if db.hosts else None
        rows.append((
            name, host, db.hosts[0].port if db.hosts else None, db.dbname or name, db.user,
            first(db.pool_size, config.default_pool_size), first(db.min_pool_size, config.min_pool_size),
            first(db.reserve_pool_size, config.reserve_pool_size),
            int(first(db.server_lifetime, config.server_lifetime) or 0), db.pool_mode,
            "disable" if len(db.hosts) > 1 else None,
            first(db.max_db_connections, config.max_db_connections), servers.get(name, 0),
            first(db.max_db_client_connections, config.max_db_client_connections), clients.get(name, 0),
            database_flag(relay, "database_paused", name), database_flag(relay, "database_disabled", name)))
    for name, pool in sorted(autos.items()):
        route = pool.route
        rows.append((
            name, ",".join(h.host for h in route.hosts), route.hosts[0].port if route.hosts else None,
            route.dbname, None, pool.size, route.min_pool_size, pool.reserve(),
            int(first(route.server_lifetime, config.server_lifetime) or 0), None, None, config.max_db_connections,
            servers.get(name, 0), config.max_db_client_connections, clients.get(name, 0),
            database_flag(relay, "database_paused", name), database_flag(relay, "database_disabled", name)))
    # The console's own database, as PgBouncer lists it (pool_size 2, statement mode, forced user).
    rows.append((ADMIN_DB, None, config.listen_port, ADMIN_DB, "pgbouncer", 2, 0, 0,
                 int(config.server_lifetime or 0), "statement", None, 0, 0, 0, len(console_clients(relay)), 0, 0))
    return ResultSet(DATABASES_COLUMNS, rows)


# -- SHOW POOLS ----------------------------------------------------------------------------------------

@command("SHOW POOLS", doc="Pools: clients and servers by state", admin=False)
def show_pools(ctx, arg):
    relay = ctx.relay
    now = time.monotonic()
    rows = []
    for pool in list(relay.pools.values()):
        counts = dict.fromkeys(("active", "tested", "login", "being_canceled"), 0)
        for server in pool.servers:
            state = SERVER_STATE.get(server.state)
            if state == "active":
                counts["active"] += 1
            elif state == "tested":
                counts["tested"] += 1
            elif state == "new":
                counts["login"] += 1
            elif state == "being_canceled":
                counts["being_canceled"] += 1
        waiting = [c for c in pool.waiting if c.state == CL_WAITING]
        wait = now - waiting[0].wait_start if waiting else 0.0
        route = pool.route
        rows.append((
            pool_database(pool), pool_user(pool), max(pool.nclients - len(waiting), 0), len(waiting), 0, 0,
            counts["active"], 0, counts["being_canceled"], len(pool.idle), len(pool.used), counts["tested"],
            counts["login"], int(wait), int((wait % 1) * 1_000_000), route.pool_mode,
            "disable" if len(route.hosts) > 1 else None))
    rows.append((ADMIN_DB, "pgbouncer", len(console_clients(relay)), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                 "statement", None))
    return ResultSet(POOLS_COLUMNS, rows)


# -- SHOW CLIENTS / SHOW SERVERS -----------------------------------------------------------------------

def client_row(relay, client, now: float):
    addr, port = split_peer(client.peer, relay)
    if client.transport is not None:  # bridged (serverless): where its HTTP or WebSocket connection came in
        laddr, lport = client.transport.local
    else:
        laddr, lport = local_addr(client.sock, relay)
    if client.state == CL_WAITING:
        state, wait = "waiting", now - client.wait_start
    else:
        state, wait = ("active" if client.server is not None else "idle"), 0.0
    last = max(client.connect_time, client.quiet_since or 0.0)
    return ("C", client.user or "(nouser)", client.database or "(nodb)", "none", state, addr, port, laddr, lport,
            wall(client.connect_time), wall(last), int(wait), int((wait % 1) * 1_000_000), 0, ptr(client),
            ptr(client.server), peer_pid(client), tls_info(client.sock),
            client.params.get("application_name", ""), prepared.client_count(client), client.id)


@command("SHOW CLIENTS", doc="Client connections", admin=False)
def show_clients(ctx, arg):
    relay = ctx.relay
    now = time.monotonic()
    rows = []
    for client in list(relay.clients.values()):
        if client.state == CL_CLOSED:
            continue
        if client.state == CL_LOGIN and getattr(client, "virtual", None) is None:
            continue  # still logging in: PgBouncer lists those in SHOW SOCKETS only
        if client.state not in (CL_LOGIN, CL_IDLE, CL_ACTIVE, CL_WAITING):
            continue
        rows.append(client_row(relay, client, now))
    return ResultSet(SOCKET_COLUMNS, rows)


def backend_pid(server) -> int:
    key = server.key or b""
    return int.from_bytes(key[:4], "big") if len(key) >= 4 else 0


def server_row(relay, pool, server, state: str):
    addr = server.addr
    laddr, lport = local_addr(server.sock, relay) if server.sock is not None else ("", 0)
    if addr is not None and addr.unix_path:
        laddr, lport = "unix", addr.port
    client = server.client
    request = server.idle_since if server.state in (SV_IDLE, SV_USED) else time.monotonic()
    return ("S", pool.route.server_user, pool_database(pool), "none", state, addr.host if addr else None,
            addr.port if addr else 0, laddr, lport, wall(server.connect_time), wall(request), 0, 0,
            1 if server.close_reason else 0, ptr(server), ptr(client), backend_pid(server), tls_info(server.sock),
            client.params.get("application_name", "") if client is not None else "", prepared.count(server),
            server.id)


@command("SHOW SERVERS", doc="Server connections", admin=False)
def show_servers(ctx, arg):
    relay = ctx.relay
    rows = []
    for pool in list(relay.pools.values()):
        for server in list(pool.servers):
            state = SERVER_STATE.get(server.state)
            if state is not None:
                rows.append(server_row(relay, pool, server, state))
    return ResultSet(SOCKET_COLUMNS, rows)


# -- SHOW SOCKETS / ACTIVE_SOCKETS: clients and servers with PgBouncer's buffer columns ----------------

SOCKETS_COLUMNS = SOCKET_COLUMNS + [(name, "int4") for name in (
    "recv_pos", "pkt_pos", "pkt_remain", "send_pos", "send_remain", "pkt_avail", "send_avail")]


def _sockets(relay, only_busy: bool):
    now = time.monotonic()
    rows = []
    for client in list(relay.clients.values()):
        if client.state == CL_CLOSED:
            continue
        pending = len(client.out or b"")
        if only_busy and not pending and not client.pending:
            continue
        row = list(client_row(relay, client, now))
        virtual = getattr(client, "virtual", None) is not None
        row[4] = {CL_LOGIN: "cl_active" if virtual else "cl_login", CL_WAITING: "cl_waiting"}.get(
            client.state, "cl_active")
        rows.append(tuple(row) + (0, 0, 0, 0, 0, len(client.pending), pending))
    for pool in list(relay.pools.values()):
        for server in list(pool.servers):
            state = SERVER_STATE.get(server.state)
            pending = len(server.out or b"")
            if state is None or (only_busy and not pending):
                continue
            name = {"new": "sv_login", "being_canceled": "sv_active"}.get(state, "sv_" + state)
            rows.append(server_row(relay, pool, server, name) + (0, 0, 0, 0, 0, 0, pending))
    return ResultSet(SOCKETS_COLUMNS, rows)


@command("SHOW SOCKETS", doc="Client and server connections with buffer details", admin=False)
def show_sockets(ctx, arg):
    return _sockets(ctx.relay, only_busy=False)


@command("SHOW ACTIVE_SOCKETS", doc="SHOW SOCKETS for connections with buffered data", admin=False)
def show_active_sockets(ctx, arg):
    return _sockets(ctx.relay, only_busy=True)


# -- SHOW USERS ----------------------------------------------------------------------------------------

@command("SHOW USERS", doc="Users: their settings and connection counts", admin=False)
def show_users(ctx, arg):
    relay = ctx.relay
    config = relay.config
    users = user_table(relay)
    servers: dict[str, int] = {}
    clients: dict[str, int] = {}
    for pool in relay.pools.values():
        name = pool.route.server_user
        servers[name] = servers.get(name, 0) + len(pool.servers)
    for client in relay.clients.values():
        if client.state != CL_CLOSED and client.user:
            role = client.spec.role if client.spec is not None else client.user
            clients[role] = clients.get(role, 0) + 1
    auth = relay.plugin_data.get("auth")
    names = set(users) | set(servers) | set(getattr(auth, "users", {}) or {}) | {"pgbouncer"}
    rows = []
    for name in sorted(names):
        spec = users.get(name)
        pool_size = getattr(spec, "pool_size", None)
        reserve = getattr(spec, "reserve_pool_size", None)
        rows.append((
            name, "%9d" % pool_size if pool_size is not None else "",
            "%9d" % reserve if reserve is not None else "", getattr(spec, "pool_mode", None),
            first(getattr(spec, "max_user_connections", None), config.max_user_connections), servers.get(name, 0),
            first(getattr(spec, "max_user_client_connections", None), config.max_user_client_connections),
            clients.get(name, 0)))
    return ResultSet(USERS_COLUMNS, rows)


# -- SHOW PEERS / PEER_POOLS: the [peers] entries (pgrelay.peers) ------------------------------------

@command("SHOW PEERS", doc="The [peers] entries cancel requests are forwarded to", admin=False)
def show_peers(ctx, arg):
    peers = sorted(ctx.relay.peers.values(), key=lambda p: p.peer_id)
    return ResultSet(PEERS_COLUMNS, [(p.peer_id, p.addr.host, p.addr.port, p.pool_size) for p in peers])


@command("SHOW PEER_POOLS", doc="Cancel requests being forwarded to each peer", admin=False)
def show_peer_pools(ctx, arg):
    peers = sorted(ctx.relay.peers.values(), key=lambda p: p.peer_id)
    return ResultSet(PEER_POOLS_COLUMNS, [(p.peer_id, p.active, p.waiting, p.active - p.connecting, p.connecting)
                                          for p in peers])
