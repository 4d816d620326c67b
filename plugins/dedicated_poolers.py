"""Dedicated poolers: `role|name` on a pooled port reaches the [poolers] entry `name`, isolated from the rest."""

from __future__ import annotations

import re
from dataclasses import dataclass

from pgrelay import hookimpl
from pgrelay.config import parse_options
from pgrelay.errors import ConfigError, Reject
from pgrelay.routing import POOLED, PRIMARY, REPLICA, ClientLimit, HostAddr, ServerLimit
from pgrelay.settings import POOL_MODE, STR, Enum, Int, Setting, declare

from . import routes
from .usernames import MAX_NAME_BYTES

# A pooler is reached with the user name "role|name": the name is the suffix after the "|", which
# pgrelay_parse_username refuses past MAX_NAME_BYTES (PostgreSQL's NAMEDATALEN - 1), so a longer
# [poolers] name could never be reached. ASCII only, so that characters and bytes agree.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,%d}" % (MAX_NAME_BYTES - 1))
NAME_RULE = (f"must be 1 to {MAX_NAME_BYTES} ASCII letters, digits, '-' or '_', starting with a letter or digit "
             f"(a user name's parts are limited to {MAX_NAME_BYTES} bytes, as PostgreSQL's names are)")
# "role|replica" means the direct or local-pooler replica route; "primary" is kept for symmetry.
RESERVED = {"primary", "replica"}
KEYS = [
    Setting("target", Enum("primary", "replica"), "primary", True,
            "primary: pool to the primary; replica: pool across the healthy replicas.", section="poolers"),
    Setting("pool_mode", POOL_MODE, "transaction", True, "This pooler's pool mode.", section="poolers"),
    Setting("default_pool_size", Int(0), "20", True, "Server connections per (database, user).", section="poolers"),
    Setting("min_pool_size", Int(0), "0", True, "Server connections kept open per (database, user).", section="poolers"),
    Setting("max_db_connections", Int(0), "0", True, "Server connections per database across users; 0: no limit.",
            section="poolers"),
    Setting("max_user_connections", Int(0), "0", True, "Server connections per user across databases; 0: no limit.",
            section="poolers"),
    Setting("max_client_conn", Int(1), "100", True, "Clients this pooler accepts; they do not count against "
            "the global max_client_conn.", section="poolers"),
    Setting("upstream", STR, "", True, "host:port of another pooler (the local pooler or another pgrelay) to "
            "chain through, instead of the database's hosts (primary target only).", section="poolers"),
]


@dataclass(frozen=True)
class Pooler:
    name: str
    target: str
    pool_mode: str
    default_pool_size: int
    min_pool_size: int
    max_db_connections: int
    max_user_connections: int
    max_client_conn: int
    upstream: HostAddr | None


def parse_pooler(entry) -> Pooler:
    if entry.key.lower() in RESERVED:
        raise ConfigError(f"{entry.where}: pooler name {entry.key!r} is reserved")
    if not NAME.fullmatch(entry.key):
        raise ConfigError(f"{entry.where}: pooler name {entry.key!r} {NAME_RULE}")
    values = parse_options(entry, KEYS, "poolers")
    upstream = None
    if values["upstream"]:
        host, colon, port = values["upstream"].rpartition(":")
        if not colon or not port.isdigit() or not host:
            raise ConfigError(f"{entry.where}: upstream must be host:port")
        if values["target"] != "primary":
            raise ConfigError(f"{entry.where}: upstream is only for primary poolers")
        upstream = HostAddr(host, int(port))
    return Pooler(entry.key, values["target"], values["pool_mode"], values["default_pool_size"],
                  values["min_pool_size"], values["max_db_connections"], values["max_user_connections"],
                  values["max_client_conn"], upstream)


pgrelay_add_settings = declare(KEYS, {"poolers": "One line per dedicated pooler: name = key=value options. "
                                                   "Clients reach it with user name role|name on a pooled port."})


@hookimpl
def pgrelay_configure(relay):
    poolers = {}
    for entry in relay.config.section("poolers"):
        if entry.key in poolers:
            raise ConfigError(f"{entry.where}: pooler {entry.key!r} is defined twice")
        poolers[entry.key] = parse_pooler(entry)
    relay.plugin_data["poolers"] = poolers


@hookimpl(trylast=True)
def pgrelay_route_client(relay, login):
    suffix = login.spec.suffix if login.spec else None
    if login.listener.role != POOLED or suffix in (None, "replica"):
        return None
    pooler = relay.plugin_data["poolers"].get(suffix)
    if pooler is None:
        return Reject(f'no such pooler: "{suffix}"', hint="Dedicated poolers are declared in [poolers].")
    db = routes.resolve(relay, login)
    if isinstance(db, Reject):
        return db
    user = routes.server_user(db, login)
    limits = dict(
        pool_key=(f"pooler:{pooler.name}", login.database, user, db.cluster, pooler.target, pooler.pool_mode),
        pool_mode=pooler.pool_mode, pool_size=pooler.default_pool_size, min_pool_size=pooler.min_pool_size,
        client_limits=(ClientLimit(("pooler", pooler.name), pooler.max_client_conn,
                                   "no more connections allowed (max_client_conn)"),),
        server_limits=(ServerLimit(("pooler-db", pooler.name, db.name), pooler.max_db_connections),
                       ServerLimit(("pooler-user", pooler.name, user), pooler.max_user_connections)),
    )
    if pooler.upstream is not None:
        # Chained: the upstream pooler resolves the client's database name itself.
        return routes.build(relay, login, db, pooler.name, hosts=(pooler.upstream,), replicas=(),
                            dbname=login.database, **limits)
    target = REPLICA if pooler.target == "replica" else PRIMARY
    return routes.build(relay, login, db, pooler.name, target=target, **limits)
