"""Database definitions from [databases] (with the * fallback) and per-user settings from [users]."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pgrelay import hookimpl
from pgrelay.config import parse_options
from pgrelay.errors import ConfigError
from pgrelay.routing import Database, HostAddr
from pgrelay.settings import INT, LIST, POOL_MODE, SECONDS, STR, Int, Setting, declare

# Keys of a [databases] line: declared data, like the [pgbouncer] settings.
DATABASE_KEYS = [
    Setting("host", LIST, "", True, "Server host name, IP or Unix socket directory; a comma list for several hosts.",
            section="databases"),
    Setting("port", STR, "5432", True, "Server port (a comma list to match several hosts).", section="databases"),
    Setting("dbname", STR, "", True, "Database name on the server; defaults to the client-side name.", section="databases"),
    Setting("user", STR, "", True, "Server user for every client of this database (forced user).", section="databases"),
    Setting("password", STR, "", True, "Password of the forced user.", section="databases"),
    Setting("pool_size", INT, "", True, "Pool size for this database, instead of default_pool_size.", section="databases"),
    Setting("min_pool_size", INT, "", True, "min_pool_size for this database.", section="databases"),
    Setting("pool_mode", POOL_MODE, "", True, "Pool mode for this database.", section="databases"),
    Setting("connect_query", STR, "", True, "Query run on each new server connection.", section="databases"),
    Setting("client_encoding", STR, "", True, "client_encoding requested from the server at login.", section="databases"),
    Setting("datestyle", STR, "", True, "DateStyle requested from the server at login.", section="databases"),
    Setting("timezone", STR, "", True, "TimeZone requested from the server at login.", section="databases"),
    Setting("application_name", STR, "", True, "application_name used for server logins.", section="databases"),
    Setting("replicas", LIST, "", True,
            "Replica servers as host or host:port, comma-separated; reached with the |replica suffix and "
            "by dedicated replica poolers.", section="databases"),
    Setting("reserve_pool_size", INT, "", True, "reserve_pool_size for this database's pools (alias reserve_pool).",
            section="databases"),
    Setting("reserve_pool", INT, "", True, "Old name of reserve_pool_size.", section="databases"),
    Setting("max_db_connections", INT, "", True,
            "Most server connections to this database across all its pools (users, ports, poolers); 0: no limit.",
            section="databases"),
    Setting("max_db_client_connections", INT, "", True, "Most client connections to this database; 0: no limit.",
            section="databases"),
    Setting("server_lifetime", SECONDS, "", True, "server_lifetime for this database's servers.", section="databases"),
    Setting("query_wait_timeout", SECONDS, "", True, "query_wait_timeout for this database's clients.",
            section="databases"),
]
CLUSTER_KEYS = [Setting(k.name, k.type, k.default, k.reload, k.doc, section="clusters")
                for k in DATABASE_KEYS if k.name != "dbname"]
PLANNED_DATABASE_KEYS = {"auth_user", "auth_query", "auth_dbname", "load_balance_hosts", "target_session_attrs"}
USER_KEYS = [
    Setting("pool_mode", POOL_MODE, "", True, "Pool mode for this user's pools.", section="users"),
    Setting("pool_size", Int(0), "", True, "Pool size for this user's pools (wins over the database's).",
            section="users"),
    Setting("reserve_pool_size", Int(0), "", True, "reserve_pool_size for this user's pools.", section="users"),
    Setting("max_user_connections", Int(0), "", True,
            "Most server connections as this user across all pools (databases, ports, poolers); 0: no limit.",
            section="users"),
    Setting("max_user_client_connections", Int(0), "", True, "Most client connections of this user; 0: no limit.",
            section="users"),
    Setting("query_timeout", SECONDS, "", True, "query_timeout for this user.", section="users"),
    Setting("query_wait_timeout", SECONDS, "", True, "query_wait_timeout for this user.", section="users"),
    Setting("idle_transaction_timeout", SECONDS, "", True, "idle_transaction_timeout for this user.", section="users"),
    Setting("transaction_timeout", SECONDS, "", True, "transaction_timeout for this user.", section="users"),
    Setting("client_idle_timeout", SECONDS, "", True, "client_idle_timeout for this user.", section="users"),
]
PLANNED_USER_KEYS: frozenset = frozenset()
SERVER_PARAM_KEYS = {"client_encoding": "client_encoding", "datestyle": "DateStyle", "timezone": "TimeZone",
                     "application_name": "application_name"}


@dataclass(frozen=True)
class UserSettings:
    """A [users] line; None means not set there."""

    pool_mode: str | None = None
    pool_size: int | None = None
    reserve_pool_size: int | None = None
    max_user_connections: int | None = None
    max_user_client_connections: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    transaction_timeout: float | None = None
    client_idle_timeout: float | None = None


def default_socket_dir() -> str:
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _parse_hosts(text_hosts, default_port: int, where: str) -> tuple[HostAddr, ...]:
    out = []
    for item in text_hosts:
        host, colon, port = item.rpartition(":") if not item.startswith("/") else (item, "", "")
        if not colon:
            host, port = item, str(default_port)
        try:
            out.append(HostAddr(host, int(port)))
        except ValueError:
            raise ConfigError(f"{where}: bad replica address {item!r} (use host or host:port)") from None
    return tuple(out)


def parse_database(entry, warnings: list[str], cluster: bool = False) -> Database:
    keys, section, kind = (CLUSTER_KEYS, "clusters", "cluster") if cluster else (DATABASE_KEYS, "databases", "database")
    values = parse_options(entry, keys, section, kind, PLANNED_DATABASE_KEYS, warnings, defaults=False)
    hosts = values.get("host") or (default_socket_dir(),)
    ports = [p.strip() for p in values.get("port", "5432").split(",") if p.strip()]
    if len(ports) not in (1, len(hosts)):
        raise ConfigError(f"{entry.where}: {len(ports)} ports given for {len(hosts)} hosts")
    try:
        ports = [int(p) for p in ports]
    except ValueError:
        raise ConfigError(f"{entry.where}: port: invalid integer") from None
    if len(ports) == 1:
        ports = ports * len(hosts)
    server_params = tuple((SERVER_PARAM_KEYS[k], values[k]) for k in SERVER_PARAM_KEYS if values.get(k))
    replicas = _parse_hosts(values.get("replicas", ()), ports[0], entry.where)
    return Database(
        name=entry.key, hosts=tuple(HostAddr(h, p) for h, p in zip(hosts, ports, strict=True)),
        dbname="" if cluster else (values.get("dbname") or ("" if entry.key == "*" else entry.key)),
        replicas=replicas, cluster=entry.key if cluster else None,
        user=values.get("user") or None, password=values.get("password") or None,
        pool_size=values.get("pool_size"), min_pool_size=values.get("min_pool_size"),
        pool_mode=values.get("pool_mode") or None, connect_query=values.get("connect_query", ""),
        server_params=server_params,
        reserve_pool_size=values.get("reserve_pool_size", values.get("reserve_pool")),
        max_db_connections=values.get("max_db_connections"),
        max_db_client_connections=values.get("max_db_client_connections"),
        server_lifetime=values.get("server_lifetime"), query_wait_timeout=values.get("query_wait_timeout"),
    )


def parse_user(entry, warnings: list[str]) -> UserSettings:
    values = parse_options(entry, USER_KEYS, "users", "user", PLANNED_USER_KEYS, warnings, defaults=False)
    values["pool_mode"] = values.get("pool_mode") or None
    return UserSettings(**values)


@dataclass(frozen=True)
class Tables:
    databases: dict
    users: dict
    clusters: dict


def tables(relay) -> Tables:
    return relay.plugin_data["databases"]


def user_settings(relay, user: str) -> UserSettings:
    return tables(relay).users.get(user) or UserSettings()


pgrelay_add_settings = declare(DATABASE_KEYS + USER_KEYS + CLUSTER_KEYS, {
    "databases": "One line per database: name = libpq-style key=value options.",
    "users": "One line per user: name = key=value options.",
    "clusters": "One line per cluster (role.cluster user names): name = the [databases] options but dbname; "
                "clients pick the database.",
})


@hookimpl
def pgrelay_configure(relay):
    import logging
    warnings: list[str] = []
    databases = {}
    for entry in relay.config.section("databases"):
        if entry.key in databases:
            raise ConfigError(f"{entry.where}: database {entry.key!r} is defined twice")
        databases[entry.key] = parse_database(entry, warnings)
    users = {entry.key: parse_user(entry, warnings) for entry in relay.config.section("users")}
    clusters = {}
    for entry in relay.config.section("clusters"):
        if entry.key in clusters:
            raise ConfigError(f"{entry.where}: cluster {entry.key!r} is defined twice")
        clusters[entry.key] = parse_database(entry, warnings, cluster=True)
    for warning in warnings:
        logging.getLogger("pgrelay").warning("%s", warning)
    relay.plugin_data["databases"] = Tables(databases, users, clusters)


@hookimpl(trylast=True)
def pgrelay_find_database(relay, name, cluster):
    from dataclasses import replace
    if cluster is not None:
        definition = tables(relay).clusters.get(cluster)
        if definition is None:
            return None
        return replace(definition, name=f"{name}@{cluster}", dbname=name)
    table = tables(relay).databases
    db = table.get(name)
    if db is not None:
        return db
    fallback = table.get("*")
    if fallback is not None:
        return replace(fallback, name=name, dbname=fallback.dbname or name, auto=True)
    return None
