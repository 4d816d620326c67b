"""Builds Route values for the built-in connection options from database definitions (no hooks here)."""

from __future__ import annotations

from pgrelay.errors import INVALID_CATALOG_NAME, Reject
from pgrelay.routing import PRIMARY, Database, Route

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


def pool_size(relay, login, db: Database) -> int:
    user = user_settings(relay, role(login))
    return next(v for v in (db.pool_size, user.pool_size, relay.config.default_pool_size) if v is not None)


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
    fields = dict(
        pool_key=key, name=label, hosts=db.hosts, replicas=db.replicas, dbname=db.dbname, server_user=user,
        server_password=db.password, pool_mode=mode, pool_size=pool_size(relay, login, db),
        min_pool_size=db.min_pool_size if db.min_pool_size is not None else relay.config.min_pool_size,
        connect_query=db.connect_query, server_params=db.server_params, target=target,
    )
    fields.update(overrides)
    return Route(**fields)
