"""The local pooler: each client goes to the (database, user) pool of its database, in the configured mode."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import INVALID_CATALOG_NAME, Reject
from pgrelay.routing import Route

from .databases import user_settings


@hookimpl(trylast=True)
def pgrelay_route_client(relay, login):
    db = relay.find_database(login.database)
    if db is None:
        return Reject(f"no such database: {login.database}", INVALID_CATALOG_NAME)
    user = user_settings(relay, login.user)
    config = relay.config
    server_user = db.user or login.user
    pool_size = next(v for v in (db.pool_size, user.pool_size, config.default_pool_size) if v is not None)
    return Route(
        pool_key=(login.database, server_user),
        name=f"{login.database}/{server_user}",
        hosts=db.hosts,
        dbname=db.dbname,
        server_user=server_user,
        server_password=db.password,
        pool_mode=user.pool_mode or db.pool_mode or config.pool_mode,
        pool_size=pool_size,
        min_pool_size=db.min_pool_size if db.min_pool_size is not None else config.min_pool_size,
        connect_query=db.connect_query,
        server_params=db.server_params,
    )
