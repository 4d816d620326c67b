"""Builds Route values for the built-in connection options from database definitions (no hooks here)."""

from __future__ import annotations

from pgrelay.errors import INVALID_CATALOG_NAME, TOO_MANY_CONNECTIONS, Reject
from pgrelay.routing import PRIMARY, ClientLimit, Database, Route, ServerLimit

from .databases import user_settings


def resolve(relay, login) -> Database | Reject:
    """The login's database (in its cluster, for role.cluster user names), or the error to send."""
    cluster = login.spec.cluster if login.spec else None
    db = relay.find_database(login.database, cluster)
    if db is not None:
        return db
    if cluster is not None:
        return Reject(f'no such cluster: "{cluster}"', INVALID_CATALOG_NAME)
    return Reject(f"no such database: {login.database}", INVALID_CATALOG_NAME)


def role(login) -> str:
    return login.spec.role if login.spec else login.user


def server_user(db: Database, login) -> str:
    return db.user or role(login)


def pool_mode(relay, login, db: Database) -> str:
    """The listener's mode if it has one (a session port), else [users], else [databases], else global."""
    return (login.listener.pool_mode or user_settings(relay, role(login)).pool_mode or db.pool_mode
            or relay.config.pool_mode)


def first(*values):
    """The first value that is set (not None): PgBouncer's "the user's, else the database's, else global"."""
    return next((v for v in values if v is not None), None)


def pool_size(relay, login, db: Database) -> int | None:
    """[users] pool_size, else [databases] pool_size, else None: default_pool_size at use time."""
    user = user_settings(relay, role(login))
    return first(user.pool_size, db.pool_size)


def limits(relay, login, db: Database, server_user_name: str, target: str):
    """The database and user caps every pool reaching `db` or `server_user_name` shares, whatever the
    port, pooler or cluster: (client limits, server limits). A cap of 0 is no cap."""
    config = relay.config
    login_user = user_settings(relay, role(login))
    server_user_cfg = user_settings(relay, server_user_name)
    clients = (
        ClientLimit(("max_db_client_connections", db.name), first(db.max_db_client_connections,
                                                                  config.max_db_client_connections),
                    "client connections exceeded (max_db_client_connections)", TOO_MANY_CONNECTIONS),
        ClientLimit(("max_user_client_connections", role(login)), first(login_user.max_user_client_connections,
                                                                        config.max_user_client_connections),
                    "client connections exceeded (max_user_client_connections)", TOO_MANY_CONNECTIONS),
    )
    servers = (
        ServerLimit(("max_db_connections", db.name, target), first(db.max_db_connections, config.max_db_connections)),
        ServerLimit(("max_user_connections", server_user_name, target),
                    first(server_user_cfg.max_user_connections, config.max_user_connections)),
    )
    return tuple(c for c in clients if c.maximum), tuple(s for s in servers if s.maximum)


def build(relay, login, db: Database, prefix: str, target: str = PRIMARY, **overrides) -> Route:
    """A route to `db` for `login`; pools are keyed by (prefix, database, server user[, cluster])."""
    user = server_user(db, login)
    mode = overrides.get("pool_mode") or pool_mode(relay, login, db)
    # Clients share a pool only if everything about its servers agrees: where they go and how
    # they are released (a session port and a transaction port never share servers).
    key = (prefix, login.database, user, db.cluster, target, mode)
    label = f"{login.database}/{user}" + (f"@{db.cluster}" if db.cluster else "")
    if prefix != "local":
        label = f"{prefix}:{label}"
    if target != PRIMARY:
        label += "|replica"
    login_user = user_settings(relay, role(login))
    client_limits, server_limits = limits(relay, login, db, user, target)
    fields = dict(
        pool_key=key, name=label, hosts=db.hosts, replicas=db.replicas, dbname=db.dbname, server_user=user,
        server_password=db.password, pool_mode=mode, pool_size=pool_size(relay, login, db),
        min_pool_size=db.min_pool_size if db.min_pool_size is not None else relay.config.min_pool_size,
        connect_query=db.connect_query, server_params=db.server_params, target=target,
        reserve_pool_size=first(login_user.reserve_pool_size, db.reserve_pool_size),
        query_timeout=login_user.query_timeout,
        query_wait_timeout=first(login_user.query_wait_timeout, db.query_wait_timeout),
        transaction_timeout=login_user.transaction_timeout,
        idle_transaction_timeout=login_user.idle_transaction_timeout,
        client_idle_timeout=login_user.client_idle_timeout,
        server_lifetime=db.server_lifetime, auto=db.auto,
    )
    # The caller's own limits (a port's or a pooler's) come on top of the shared ones.
    client_limits += tuple(overrides.pop("client_limits", ()))
    server_limits += tuple(overrides.pop("server_limits", ()))
    fields.update(overrides)
    return Route(client_limits=client_limits, server_limits=server_limits, **fields)
