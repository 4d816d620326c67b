"""pgrelay: a PostgreSQL connection pooler that runs PgBouncer configurations, extensible with pluggy.

Public surface for plugin authors: `hookimpl`, and the value types in pgrelay.routing and pgrelay.errors.
"""

import pluggy

__version__ = "0.1.0"


def version_string() -> str:
    """What `pgrelay -V` prints first and SHOW VERSION answers, as PgBouncer's "PgBouncer 1.26.0"."""
    return f"pgrelay {__version__}"


hookimpl = pluggy.HookimplMarker("pgrelay")

from .errors import ConfigError, Reject  # noqa: E402
from .routing import Database, HostAddr, Listener, Login, Route  # noqa: E402

__all__ = ["hookimpl", "Reject", "ConfigError", "Database", "HostAddr", "Listener", "Login", "Route", "__version__",
           "version_string"]
