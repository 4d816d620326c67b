"""Database definitions from [databases] (with the * fallback) and per-user settings from [users]."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pgrelay import hookimpl
from pgrelay.config import parse_connstr
from pgrelay.errors import ConfigError
from pgrelay.routing import Database, HostAddr
from pgrelay.settings import INT, POOL_MODE, STR, LIST, Int, Setting

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
]
PLANNED_DATABASE_KEYS = {"auth_user", "auth_query", "auth_dbname", "reserve_pool", "reserve_pool_size",
                         "max_db_connections", "max_db_client_connections", "server_lifetime",
                         "query_wait_timeout", "load_balance_hosts", "target_session_attrs"}
USER_KEYS = [
    Setting("pool_mode", POOL_MODE, "", True, "Pool mode for this user's pools.", section="users"),
    Setting("pool_size", Int(0), "", True, "Pool size for this user's pools.", section="users"),
]
PLANNED_USER_KEYS = {"reserve_pool_size", "max_user_connections", "query_timeout", "query_wait_timeout",
                     "idle_transaction_timeout", "transaction_timeout", "client_idle_timeout",
                     "max_user_client_connections"}
SERVER_PARAM_KEYS = {"client_encoding": "client_encoding", "datestyle": "DateStyle", "timezone": "TimeZone",
                     "application_name": "application_name"}


@dataclass(frozen=True)
class UserSettings:
    pool_mode: str | None = None
    pool_size: int | None = None


def default_socket_dir() -> str:
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def parse_database(entry, warnings: list[str]) -> Database:
    keys = {k.name: k for k in DATABASE_KEYS}
    raw = parse_connstr(entry.value, entry.where)
    values = {}
    for key, text in raw.items():
        if key in PLANNED_DATABASE_KEYS:
            warnings.append(f"{entry.where}: database option '{key}' is not implemented by pgrelay yet and is ignored")
            continue
        if key not in keys:
            raise ConfigError(f"{entry.where}: unknown database option '{key}' in [databases] entry {entry.key!r}")
        try:
            values[key] = keys[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"{entry.where}: {key}: {exc}") from None
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
    return Database(
        name=entry.key, hosts=tuple(HostAddr(h, p) for h, p in zip(hosts, ports)),
        dbname=values.get("dbname") or ("" if entry.key == "*" else entry.key),
        user=values.get("user") or None, password=values.get("password") or None,
        pool_size=values.get("pool_size"), min_pool_size=values.get("min_pool_size"),
        pool_mode=values.get("pool_mode") or None, connect_query=values.get("connect_query", ""),
        server_params=server_params,
    )


def parse_user(entry, warnings: list[str]) -> UserSettings:
    keys = {k.name: k for k in USER_KEYS}
    values = {}
    for key, text in parse_connstr(entry.value, entry.where).items():
        if key in PLANNED_USER_KEYS:
            warnings.append(f"{entry.where}: user option '{key}' is not implemented by pgrelay yet and is ignored")
            continue
        if key not in keys:
            raise ConfigError(f"{entry.where}: unknown user option '{key}' in [users] entry {entry.key!r}")
        try:
            values[key] = keys[key].parse(text)
        except ValueError as exc:
            raise ConfigError(f"{entry.where}: {key}: {exc}") from None
    return UserSettings(pool_mode=values.get("pool_mode") or None, pool_size=values.get("pool_size"))


@dataclass(frozen=True)
class Tables:
    databases: dict
    users: dict


def tables(relay) -> Tables:
    return relay.plugin_data["databases"]


def user_settings(relay, user: str) -> UserSettings:
    return tables(relay).users.get(user) or UserSettings()


@hookimpl
def pgrelay_add_settings(settings):
    settings.add_section("databases", "One line per database: name = libpq-style key=value options.")
    settings.add_section("users", "One line per user: name = key=value options.")
    for key in DATABASE_KEYS + USER_KEYS:
        settings.add(key)


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
    for warning in warnings:
        logging.getLogger("pgrelay").warning("%s", warning)
    relay.plugin_data["databases"] = Tables(databases, users)


@hookimpl(trylast=True)
def pgrelay_find_database(relay, name):
    table = tables(relay).databases
    db = table.get(name)
    if db is not None:
        return db
    fallback = table.get("*")
    if fallback is not None:
        from dataclasses import replace
        return replace(fallback, name=name, dbname=fallback.dbname or name)
    return None
