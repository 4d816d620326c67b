"""Value types that routing, auth and limit hooks receive and return; frozen, no I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Mapping

if TYPE_CHECKING:
    from .proxy_protocol import ProxyInfo

SESSION, TRANSACTION, STATEMENT = "session", "transaction", "statement"
PRIMARY, REPLICA = "primary", "replica"
DIRECT, POOLED = "direct", "pooled"
POSTGRES = "postgres"


@dataclass(frozen=True)
class HostAddr:
    """A server address. A host starting with '/' is a Unix socket directory."""

    host: str
    port: int = 5432

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def unix_path(self) -> str | None:
        return f"{self.host}/.s.PGSQL.{self.port}" if self.host.startswith("/") else None


@dataclass(frozen=True)
class Listener:
    """A listening endpoint as hooks see it: its name, its role (direct or pooled), its pool mode, and
    the protocol it speaks (`kind`: "postgres", or one a plugin serves, such as "serverless")."""

    name: str
    addr: str
    port: int
    pool_mode: str | None = None
    role: str = POOLED
    suffixes: bool = True
    kind: str = POSTGRES
    options: tuple[tuple[str, str], ...] = ()  # the kind's own keys from its [listeners] line
    proxy_protocol: bool = False  # connections from proxy_protocol_trusted begin with a PROXY header


@dataclass(frozen=True)
class UserSpec:
    """A login user name taken apart: the role, the cluster (`role.cluster`), the suffix (`role|suffix`)."""

    role: str
    cluster: str | None = None
    suffix: str | None = None


@dataclass(frozen=True)
class Login:
    """What a client asked for in its StartupMessage, and where it came from."""

    client_id: int
    listener: Listener
    peer: str
    user: str
    database: str
    params: Mapping[str, str] = field(default_factory=dict)
    tls: bool = False
    spec: UserSpec | None = None
    # The PROXY protocol header the connection began with (pgrelay.proxy_protocol.ProxyInfo: source,
    # destination, v2 TLVs, aws_vpce_id, gcp_psc_connection_id), or None; `peer` is then its source.
    proxy: "ProxyInfo | None" = None


@dataclass(frozen=True)
class Database:
    """A database definition a client's database name resolved to (a [databases] line)."""

    name: str
    hosts: tuple[HostAddr, ...]
    dbname: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    pool_size: int | None = None
    min_pool_size: int | None = None
    pool_mode: str | None = None
    connect_query: str = ""
    server_params: tuple[tuple[str, str], ...] = ()
    replicas: tuple[HostAddr, ...] = ()
    cluster: str | None = None
    # Per-database limits and timeouts ([databases] keys); None means the global setting.
    reserve_pool_size: int | None = None
    max_db_connections: int | None = None
    max_db_client_connections: int | None = None
    server_lifetime: float | None = None
    query_wait_timeout: float | None = None
    auto: bool = False  # made from the * fallback for a database name without a line (autodb_idle_timeout)


@dataclass(frozen=True)
class ClientLimit:
    """At most `maximum` clients at once among routes sharing `key`; past it, `reject` is sent."""

    key: Hashable
    maximum: int
    message: str
    sqlstate: str = "53300"


@dataclass(frozen=True)
class ServerLimit:
    """At most `maximum` server connections at once among pools sharing `key` (0 = no limit)."""

    key: Hashable
    maximum: int


@dataclass(frozen=True)
class Route:
    """Where a client's queries go: the pool (by key) and how its servers log in.

    Pools are shared by every client whose route has the same `pool_key`. `reuse=False` makes
    a direct connection: the server is opened for one client and closed with it; `per_client`
    gives each client a pool of its own (removed when it leaves), so its startup parameters can
    go to its server. `target` tells host selection whether `hosts` hold the primary or the
    route wants one of `replicas`.
    """

    pool_key: Hashable
    name: str
    hosts: tuple[HostAddr, ...]
    dbname: str
    server_user: str
    server_password: str | None = field(default=None, repr=False)
    pool_mode: str = SESSION
    pool_size: int | None = None  # None: default_pool_size, read when used (so a reload applies)
    min_pool_size: int = 0
    connect_query: str = ""
    server_params: tuple[tuple[str, str], ...] = ()
    reuse: bool = True
    target: str = PRIMARY
    replicas: tuple[HostAddr, ...] = ()
    client_limits: tuple[ClientLimit, ...] = ()
    server_limits: tuple[ServerLimit, ...] = ()
    per_client: bool = False
    # Effective per-pool values from [users] and [databases] (the user's wins, as in PgBouncer);
    # None means the global setting of the same name, read when it is used (so a reload applies).
    reserve_pool_size: int | None = None
    query_timeout: float | None = None
    query_wait_timeout: float | None = None
    transaction_timeout: float | None = None
    idle_transaction_timeout: float | None = None
    client_idle_timeout: float | None = None
    server_lifetime: float | None = None
    auto: bool = False  # its database came from the * fallback: freed after autodb_idle_timeout unused
