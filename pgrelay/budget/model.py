"""Computes, from a loaded configuration, the most server connections pgrelay can open to each host (no I/O).

What pgrelay may open is read from the same objects pgrelay routes with: the [databases],
[users] and [clusters] tables of the databases plugin, the [poolers] of the dedicated_poolers
plugin, the listeners (main and [listeners]) and the settings. The semantics are PgBouncer's,
as plugins/routes.py enforces them:

* a pool is one (route, database, server user, target, pool mode); its size is the client
  role's [users] pool_size, else the database's pool_size, else default_pool_size (a dedicated
  pooler: its default_pool_size), 0 meaning unlimited; plus reserve_pool_size ([users], else
  [databases] reserve_pool_size or reserve_pool, else the global one); plus, in transaction and
  statement pooling, the pool's one listening server (LISTEN, pgrelay.notify), unless
  session_state = allow;
* max_db_connections ([databases], else global) caps every pool of a database, and
  max_user_connections ([users] of the server user, else global) every pool of a server user,
  whatever the port, pooler or cluster, primary and replica pools apart; a [poolers] entry's own
  caps come on top; 0 is no cap;
* a * database, a [clusters] entry (the client picks the database) and users not listed in
  [users] stand for pools nobody can count: each such name gets a pool, and caps of its own;
* direct ports open one server per client, at most max_direct_connections per host set
  (and under the caps above); each health-checked host takes one connection, each auth_query
  database one.

The worst case of a host is a maximum flow through those caps (flow.py), times the number of
pgrelay processes, which share nothing. It is exact but for one case: a direct limit several
database entries share (same hosts) crosses their caps, and then the smallest of relaxed flows
is taken, which may be more than can really be opened, never less.
"""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field, replace
from typing import Any

from ..config import parse_connstr
from ..errors import ConfigError
from ..listener import listener_specs
from ..routing import DIRECT, POOLED, PRIMARY, REPLICA, HostAddr
from .flow import INF, Network

OTHERS = None  # the server user of clients whose user has no [users] line
BUILTIN_ROUTING = ("databases", "local_pooler", "direct", "dedicated_poolers", "usernames", "hosts")
ROUTING_HOOKS = ("pgrelay_route_client", "pgrelay_find_database", "pgrelay_parse_username", "pgrelay_choose_host")


class BudgetError(Exception):
    """The configuration cannot be budgeted (reported as bad input)."""


def first(*values):
    """The first value that is set: "the user's, else the database's, else the global one"."""
    return next((v for v in values if v is not None), None)


def cap_value(maximum: int | None) -> float:
    return INF if not maximum else maximum


@dataclass(frozen=True)
class Cap:
    """A limit a group of pools shares: at most `maximum` server connections (INF: none)."""

    key: tuple
    maximum: float
    kind: str = ""      # "db", "user", "pooler-db", "pooler-user"; "" passes everything
    subject: str = ""   # what it limits, for messages: "database main"
    setting: str = ""   # the setting that sets it


@dataclass(frozen=True)
class Family:
    """The pools of one route kind for one (database entry, server user, target)."""

    kind: str              # "pool" (local pooler), "pooler" (dedicated), "direct"
    route: str             # "local pooler (transaction)", "pooler reports", "direct port"
    database: str          # the entry, for messages: "main", "*", "cluster acme"
    user: str              # the server user, for messages
    target: str
    pools: int | None      # how many pools; None: one per name a client picks (uncountable)
    size: float            # servers per pool, reserve included; INF: pool size 0 (unlimited)
    caps: tuple            # (database, pooler's database, pooler's user, user) Caps
    reach: frozenset       # hosts its servers may go to
    postgres: bool = True  # False: an upstream pooler, not PostgreSQL
    db_known: bool = True
    user_known: bool = True
    direct_key: tuple | None = None  # direct families: the max_direct_connections group

    @property
    def capacity(self) -> float:
        if self.pools == 0:
            return 0
        if self.pools is None or self.size == INF:
            return INF
        return self.pools * self.size

    @property
    def unbounded(self) -> bool:
        return self.capacity == INF and all(c.maximum == INF for c in self.caps)


@dataclass
class Budget:
    """Everything pgrelay may open, per kind, for one process."""

    families: list[Family]
    # ("direct", target, hosts) -> [max_direct_connections, hosts reached, database entries sharing it]
    direct_limits: dict[tuple, list]
    health_checked: set[HostAddr]
    auth_sessions: dict[HostAddr, float]
    direct_port: bool
    notes: list[str] = field(default_factory=list)

    @functools.cached_property
    def postgres_hosts(self) -> list[HostAddr]:
        hosts = set(self.health_checked) | set(self.auth_sessions)
        for family in self.families:
            if family.postgres:
                hosts |= family.reach
        return sorted(hosts, key=str)

    @functools.cached_property
    def upstream_hosts(self) -> list[HostAddr]:
        hosts = set()
        for family in self.families:
            if not family.postgres:
                hosts |= family.reach
        return sorted(hosts - set(self.postgres_hosts), key=str)


@dataclass
class HostBudget:
    """The worst case for one host: each part, what bounds it, and why it may be unbounded."""

    addr: HostAddr
    postgres: bool
    processes: int
    pools: int                   # pools that can be counted
    uncounted: list[str]         # kinds of pools that cannot ("users not in [users]", ...)
    sizes: str                   # "3 x 30", the pools x sizes term of the formula
    pool_sizes: float            # sum of pools x (size + reserve), before any cap
    pooled: float                # local and dedicated pools under their caps
    pooled_bounds: list[str]     # the limits that bind them
    direct: float                # direct ports: sum of max_direct_connections (0: no direct port)
    direct_sets: int             # host sets the direct limit counts for
    combined: float              # pools and direct connections together, under the shared caps
    combined_bounds: list[str]
    health: int
    auth: float
    unbounded: list[str]         # what is unbounded, and which setting would bound it

    @property
    def per_process(self) -> float:
        return self.combined + self.health + self.auth

    @property
    def total(self) -> float:
        return self.per_process * self.processes if self.per_process else 0


class _Reader:
    """Option values as pgrelay reads them, with the raw ini value as a fallback for keys the
    plugins do not parse (yet): counted as pgrelay will enforce them, with a note saying so."""

    def __init__(self, relay):
        self.config = relay.config
        self.registry = relay.registry
        self.entries = {s: {e.key: e for e in relay.config.section(s)} for s in ("databases", "users", "clusters")}
        self.notes: list[str] = []

    def setting(self, name: str) -> int:
        value = self.config.values.get(name) or 0
        declared = self.registry.settings.get(name)
        if value and declared is not None and declared.planned:
            self.notes.append(f"setting {name} is not enforced by this pgrelay build yet; counted as if it were")
        return value

    def option(self, section: str, name: str | None, obj: Any, attr: str, raw_keys: tuple[str, ...] = ()) -> Any:
        if obj is not None and hasattr(obj, attr):
            return getattr(obj, attr)
        entry = self.entries[section].get(name) if name is not None else None
        if entry is None:
            return None
        raw = parse_connstr(entry.value, entry.where)
        for key in raw_keys or (attr,):
            if key in raw:
                try:
                    value = int(raw[key])
                except ValueError:
                    raise ConfigError(f"{entry.where}: {key}: invalid integer {raw[key]!r}") from None
                if value < 0:
                    raise ConfigError(f"{entry.where}: {key}: {value} is below the minimum 0")
                self.notes.append(f"{entry.where}: {key} is not enforced by this pgrelay build yet; "
                                  "counted as if it were")
                return value
        return None


@dataclass(frozen=True)
class _Slot:
    """One server user of one database entry, and the client roles whose pools it holds."""

    section: str          # "databases" or "clusters"
    name: str             # the entry's name
    db: Any               # its Database
    db_known: bool        # False: * or a cluster, any database name
    db_label: str
    server_user: Any      # a name, or OTHERS
    user_known: bool
    roles: tuple          # client roles (names, or OTHERS) whose routes lead here
    max_db: int | None
    max_user: int | None
    db_reserve: int | None
    passing_caps: dict = field(default_factory=dict, compare=False, repr=False)  # target -> caps, computed once

    @property
    def countable(self) -> bool:
        return self.db_known and self.user_known

    @property
    def user_label(self) -> str:
        return self.server_user if self.server_user is not OTHERS else "(users not in [users])"

    def db_cap(self, target: str) -> Cap:
        side = " (replica pools)" if target == REPLICA else ""
        subject = f"database {self.db_label}{side}" if self.db_known \
            else f"each database name under {self.db_label}{side}"
        return Cap(("db", self.section, self.name, target), cap_value(self.max_db) if self.db_known else INF,
                   "db", subject, "max_db_connections")

    def user_cap(self, target: str) -> Cap:
        side = " (replica pools)" if target == REPLICA else ""
        subject = f"user {self.server_user}{side}" if self.user_known else f"each user not in [users]{side}"
        return Cap(("user", self.server_user, target), cap_value(self.max_user) if self.user_known else INF,
                   "user", subject, "max_user_connections")

    def passing(self, target: str) -> tuple:
        """The caps of a local pool or direct connection: the database's and the user's only."""
        cached = self.passing_caps.get(target)
        if cached is None:
            db, user = self.db_cap(target), self.user_cap(target)
            cached = self.passing_caps[target] = (db, Cap(("pass-db", db.key), INF), Cap(("pass-user", user.key), INF),
                                                  user)
        return cached

    def reach(self, target: str) -> frozenset:
        """Hosts a route may connect to: the primary among the hosts; for replicas any of them
        (a host in recovery is a replica too, and replica_fallback_to_primary may pick the primary)."""
        hosts = frozenset(self.db.hosts)
        return hosts | frozenset(self.db.replicas) if target == REPLICA else hosts


class _Builder:
    """Walks databases x server users x routes as the routing plugins would decide them."""

    def __init__(self, relay):
        self.relay = relay
        self.config = config = relay.config
        self.tables = relay.plugin_data.get("databases")
        if self.tables is None:
            raise BudgetError("the databases plugin is disabled (disable_plugins): no database is known to budget")
        self.reader = _Reader(relay)
        self.blocked = {name for name in BUILTIN_ROUTING if relay.pm.is_blocked(name)}
        self.notes = [f"built-in plugin {name} is disabled: its routes are not counted"
                      for name in sorted(self.blocked)]
        for hook in ROUTING_HOOKS:
            for impl in getattr(relay.pm.hook, hook).get_hookimpls():
                if impl.plugin_name not in BUILTIN_ROUTING + ("limits", "errors", "auth"):
                    self.notes.append(f"plugin {impl.plugin_name} implements {hook}: pools it creates are not counted")
        self.poolers = relay.plugin_data.get("poolers", {}) if "dedicated_poolers" not in self.blocked else {}
        specs = [spec for spec, _ in listener_specs(config)]
        self.pooled_listeners = [spec for spec in specs if spec.role == POOLED]
        self.direct_port = any(spec.role == DIRECT for spec in specs) and "direct" not in self.blocked \
            and "max_direct_connections" in config.values
        self.local = "local_pooler" not in self.blocked
        self.local_replicas = self.local and bool(config.values.get("local_pooler_replicas"))
        self.max_direct = cap_value(config.values.get("max_direct_connections", 0))
        self.reserve = self.reader.setting("reserve_pool_size")
        self.max_db = self.reader.setting("max_db_connections")
        self.max_user = self.reader.setting("max_user_connections")
        self.users = dict(self.tables.users)
        self.families: list[Family] = []
        self.direct_limits: dict[tuple, list] = {}

    def entries(self) -> list[tuple[str, str, Any, bool, str]]:
        """(section, name, Database, countable, label) of every database a client can reach."""
        out = [("databases", name, db, name != "*", name) for name, db in self.tables.databases.items()]
        if self.config.values.get("cluster_usernames"):
            out += [("clusters", name, db, False, f"cluster {name}") for name, db in self.tables.clusters.items()]
        elif self.tables.clusters:
            self.notes.append("[clusters] entries are not reachable: cluster_usernames is off")
        return out

    def slots(self, section: str, name: str, db, db_known: bool, db_label: str) -> list[_Slot]:
        max_db = first(self.reader.option(section, name, db, "max_db_connections"), self.max_db)
        reserve = self.reader.option(section, name, db, "reserve_pool_size", ("reserve_pool_size", "reserve_pool"))
        if db.user:  # a forced user: clients of every role share its pools
            users = [(db.user, True, tuple(self.users) + (OTHERS,))]
        else:
            users = [(user, True, (user,)) for user in self.users] + [(OTHERS, False, (OTHERS,))]
        out = []
        for server_user, user_known, roles in users:
            max_user = None
            if user_known:
                max_user = first(self.reader.option("users", server_user, self.users.get(server_user),
                                                    "max_user_connections"), self.max_user)
            out.append(_Slot(section, name, db, db_known, db_label, server_user, user_known, roles,
                             max_db, max_user, reserve))
        return out

    def settings(self, role):
        return self.users.get(role) if role is not OTHERS else None

    def per_pool(self, slot: _Slot, role, base: int | None) -> float:
        """Servers one pool may have: its size plus its reserve; INF for a size of 0 (unlimited)."""
        reserve = first(self.reader.option("users", role, self.settings(role), "reserve_pool_size"),
                        slot.db_reserve, self.reserve)
        return INF if not base else base + (reserve or 0)

    def listening(self, mode: str) -> int:
        """The listening server a transaction or statement pool opens, beyond its size and reserve,
        once a client LISTENs (pgrelay.notify; none with session_state = allow)."""
        return int(mode != "session" and self.config.values.get("session_state", "pin") != "allow")

    def add(self, slot: _Slot, kind: str, route: str, target: str, size: float, caps: tuple, reach: frozenset,
            postgres: bool = True, direct_key: tuple | None = None) -> None:
        pools = 1 if slot.countable and kind != "direct" else None  # direct: one server per client
        self.families.append(Family(kind, route, slot.db_label, slot.user_label, target, pools, size, caps, reach,
                                    postgres, slot.db_known, slot.user_known, direct_key))

    def local_pools(self, slot: _Slot) -> None:
        """One pool per pool mode the pooled ports give (a session port never shares a transaction
        port's pool); its size is the client role's [users] pool_size, else the database's, else global."""
        modes: dict[str, float] = {}
        for role in slot.roles:
            settings = self.settings(role)
            size = self.per_pool(slot, role, first(getattr(settings, "pool_size", None), slot.db.pool_size,
                                                   self.config.default_pool_size))
            for listener in self.pooled_listeners:
                mode = first(listener.pool_mode, getattr(settings, "pool_mode", None), slot.db.pool_mode,
                             self.config.pool_mode)
                modes[mode] = max(modes.get(mode, 0), size + self.listening(mode))
        for target in [PRIMARY] + ([REPLICA] if self.local_replicas else []):
            for mode, size in sorted(modes.items()):
                self.add(slot, "pool", f"local pooler ({mode})", target, size, slot.passing(target), slot.reach(target))

    def pooler_pools(self, slot: _Slot, pooler) -> None:
        """A dedicated pooler: its own pool size, its own caps under the shared ones."""
        target = REPLICA if pooler.target == "replica" else PRIMARY
        db, user = slot.db_cap(target), slot.user_cap(target)
        caps = (db,
                Cap(("pooler-db", pooler.name, slot.section, slot.name),
                    cap_value(pooler.max_db_connections) if slot.db_known else INF, "pooler-db",
                    f"pooler {pooler.name}, {db.subject}", f"max_db_connections of [poolers] {pooler.name}"),
                Cap(("pooler-user", pooler.name, slot.server_user),
                    cap_value(pooler.max_user_connections) if slot.user_known else INF, "pooler-user",
                    f"pooler {pooler.name}, {user.subject}", f"max_user_connections of [poolers] {pooler.name}"),
                user)
        size = max(self.per_pool(slot, role, pooler.default_pool_size) for role in slot.roles)
        size += self.listening(pooler.pool_mode)
        if pooler.upstream is not None:
            self.add(slot, "pooler", f"pooler {pooler.name}", target, size, caps, frozenset([pooler.upstream]),
                     postgres=False)
        else:
            self.add(slot, "pooler", f"pooler {pooler.name}", target, size, caps, slot.reach(target))

    def direct_connections(self, slot: _Slot) -> None:
        """A direct port: one server per client, max_direct_connections per (target, hosts)."""
        for target in (PRIMARY, REPLICA):
            db = slot.db
            key = ("direct", target, tuple(db.replicas or db.hosts) if target == REPLICA else tuple(db.hosts))
            self.add(slot, "direct", "direct port", target, 1, slot.passing(target), slot.reach(target),
                     direct_key=key)
            limit = self.direct_limits.setdefault(key, [self.max_direct, frozenset(), set()])
            limit[1] |= slot.reach(target)
            limit[2].add((slot.section, slot.name))

    def health_checked(self, entries) -> set[HostAddr]:
        """Hosts the health monitor watches: those of a database with several hosts or replicas, and
        every host once a replica route exists (|replica on a direct port, local_pooler_replicas,
        a replica pooler)."""
        if "hosts" in self.blocked:
            return set()
        replica_routes = self.direct_port or self.local_replicas or any(
            p.target == "replica" and p.upstream is None for p in self.poolers.values())
        out: set[HostAddr] = set()
        for _, _, db, _, _ in entries:
            if len(db.hosts) > 1 or db.replicas:
                out |= set(db.hosts)
            if replica_routes:
                out |= set(db.hosts) | set(db.replicas)
        return out

    def build(self) -> Budget:
        entries = self.entries()
        for entry in entries:
            for slot in self.slots(*entry):
                if self.local:
                    self.local_pools(slot)
                for pooler in self.poolers.values():
                    self.pooler_pools(slot, pooler)
                if self.direct_port:
                    self.direct_connections(slot)
        auth = _auth_sessions(self.relay, self.tables) if "auth" not in self.blocked else {}
        return Budget(self.families, self.direct_limits, self.health_checked(entries), auth, self.direct_port,
                      self.notes + _dedupe(self.reader.notes))


def build(relay) -> Budget:
    """The families of pools, direct limits, health checks and auth_query sessions of a Relay
    built from the configuration (not started)."""
    return _Builder(relay).build()


def _dedupe(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _auth_sessions(relay, tables) -> dict[HostAddr, float]:
    """auth_query's dedicated sessions: one per database it runs in (auth_dbname, else the client's)."""
    config = relay.config
    if not config.values.get("auth_user"):
        return {}
    out: dict[HostAddr, float] = collections.defaultdict(float)
    if config.values.get("auth_dbname"):
        db = relay.find_database(config.auth_dbname)
        if db is not None:
            out[db.hosts[0]] += 1
        return dict(out)
    for name, db in tables.databases.items():
        out[db.hosts[0]] = INF if name == "*" else out[db.hosts[0]] + 1
    return dict(out)


# -- one host ----------------------------------------------------------------------------------


def _network(families: list[Family]) -> Network:
    """Source -> database cap -> pooler's database cap -> pools -> pooler's user cap -> user cap -> sink."""
    net = Network()
    added: set = set()
    for family in families:
        db, pooler_db, pooler_user, user = family.caps
        for tail, head, cap in (("S", db.key, db), (db.key, pooler_db.key, pooler_db),
                                (pooler_user.key, user.key, pooler_user), (user.key, "T", user)):
            if (tail, head) not in added:
                added.add((tail, head))
                net.add(tail, head, cap.maximum, cap)
        net.add(pooler_db.key, pooler_user.key, family.capacity, family)
    return net


def _flow(families: list[Family]) -> tuple[float, list[str]]:
    if not families:
        return 0, []
    net = _network(families)
    value = net.max_flow("S", "T")
    return value, explain(net.cut()) if value != INF else []


def explain(tags: list) -> list[str]:
    """The binding limits of a cut, grouped by setting: "max_db_connections = 40 for database main"."""
    caps = collections.defaultdict(list)
    pools = []
    for tag in tags:
        if isinstance(tag, Cap):
            caps[tag.setting].append(tag)
        elif isinstance(tag, Family):
            pools.append(tag)
    out = []
    for setting, group in caps.items():
        if len(group) == 1:
            out.append(f"{setting} = {_n(group[0].maximum)} for {group[0].subject}")
        else:
            values = sorted({c.maximum for c in group})
            each = f"{_n(values[0])} each" if len(values) == 1 else "various"
            total = sum(c.maximum for c in group)
            out.append(f"{setting} for {len(group)} {_plural(group[0].kind)} ({each}, {_n(total)} in all)")
    if pools:
        count = sum(f.pools or 0 for f in pools)
        out.append(f"pool sizes of {count} pool{'s' if count != 1 else ''} ({_n(sum(f.capacity for f in pools))})")
    return out


def _plural(kind: str) -> str:
    return {"db": "databases", "user": "users", "pooler-db": "pooler databases", "pooler-user": "pooler users",
            "direct": "direct host sets"}[kind]


def _n(value: float) -> str:
    return "unbounded" if value == INF else str(int(value))


def _sizes(pooled: list[Family]) -> str:
    counts: collections.Counter = collections.Counter()
    for family in pooled:
        if family.pools:
            counts[family.size] += family.pools
    if not counts:
        return ""
    terms = [f"{n} x {_n(size)}" for size, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    if len(terms) > 3:
        return f"{sum(counts.values())} pools of {len(terms)} sizes"
    return " + ".join(terms)


def _uncounted(pooled: list[Family]) -> list[str]:
    out = []
    for family in pooled:
        if family.pools is not None:
            continue
        if not family.db_known:
            out.append(f"database names under {family.database}")
        if not family.user_known:
            out.append("users not in [users]")
    return _dedupe(out)


def _why_unbounded(family: Family) -> str:
    where = f"{family.route}, database {family.database}"
    pooler = family.kind == "pooler"
    if family.kind == "direct":
        db = f"max_db_connections for {family.database}" if family.db_known else ""
        user = f"max_user_connections for {family.user}" if family.user_known else ""
        also = " or ".join(x for x in (db, user) if x)
        return (f"{where}: one server per client and max_direct_connections = 0 (no limit): set "
                f"max_direct_connections{' (or ' + also + ')' if also else ''}")
    if not family.db_known and not family.user_known:
        return (f"{where}, users not in [users]: every (database, user) pair a client names gets a pool "
                f"of its own and no cap spans them: give the {family.database} line a user= (then that "
                f"user's max_user_connections caps it) or list the databases instead")
    if not family.user_known:
        extra = " or the pooler's max_db_connections" if pooler else ""
        return (f"{where}, users not in [users]: each gets a pool of its own: set max_db_connections "
                f"(on the {family.database} line or globally){extra}")
    if not family.db_known:
        extra = " or the pooler's max_user_connections" if pooler else ""
        return (f"{where}, user {family.user}: each database name gets a pool of its own: set "
                f"max_user_connections (for {family.user} in [users] or globally){extra}")
    size = "the pooler's default_pool_size" if pooler else "default_pool_size (or pool_size in [databases]/[users])"
    return (f"{where}, user {family.user}: pool size 0 means unlimited: set {size}, "
            f"or max_db_connections or max_user_connections")


def _direct_bounds(budget: Budget, pooled: list[Family], direct: list[Family]) -> list[list[Family]]:
    """Pools and direct connections together, as flow problems that bound their sum.

    A direct limit shared by one database entry nests under that database's cap: exact. One that
    several entries share (same hosts) crosses their caps, which a flow cannot hold at once; then
    two relaxations each bound the sum: without that direct limit, and with it but without the
    databases' caps on direct connections. The check takes the smallest of all bounds."""
    if not direct:
        return []
    caps: dict[tuple, Cap] = {}

    def limit(family: Family) -> Cap:
        cap = caps.get(family.direct_key)
        if cap is None:
            maximum, _, _ = budget.direct_limits[family.direct_key]
            _, target, hosts = family.direct_key
            side = " (replicas)" if target == REPLICA else ""
            cap = caps[family.direct_key] = Cap(
                family.direct_key, maximum, "direct", f"direct connections to {','.join(str(h) for h in hosts)}{side}",
                "max_direct_connections")
        return cap

    def shared(family: Family) -> bool:
        return len(budget.direct_limits[family.direct_key][2]) > 1

    nested = [f if shared(f) else replace(f, caps=(f.caps[0], limit(f), f.caps[2], f.caps[3])) for f in direct]
    out = [pooled + nested]
    if any(shared(f) for f in direct):
        above = [replace(f, caps=(limit(f), Cap(("pass-db", f.direct_key), INF), f.caps[2], f.caps[3]))
                 if shared(f) else f for f in nested]
        out.append(pooled + above)
    return out


def host_budget(budget: Budget, addr: HostAddr, processes: int = 1) -> HostBudget:
    postgres = addr in budget.postgres_hosts
    families = [f for f in budget.families if addr in f.reach and f.postgres == postgres]
    pooled = [f for f in families if f.kind != "direct"]
    direct = [f for f in families if f.kind == "direct"]
    pooled_value, pooled_bounds = _flow(pooled)
    direct_value: float = 0
    direct_sets = 0
    if direct:
        for maximum, reach, _ in budget.direct_limits.values():
            if addr in reach:
                direct_value += maximum
                direct_sets += 1
    combined, combined_bounds = pooled_value + direct_value, []
    for bound in _direct_bounds(budget, pooled, direct):
        together, bounds = _flow(bound)
        if together < combined:
            combined, combined_bounds = together, bounds
    health = 1 if postgres and addr in budget.health_checked else 0
    auth = budget.auth_sessions.get(addr, 0) if postgres else 0
    unbounded: list[str] = []
    if pooled_value == INF:
        unbounded += [_why_unbounded(f) for f in pooled if f.unbounded]
    elif combined == INF:
        unbounded += [_why_unbounded(f) for f in direct if f.unbounded]
    if auth == INF:
        unbounded.append("auth_query: one session per database name under *: set auth_dbname")
    return HostBudget(
        addr=addr, postgres=postgres, processes=processes, pools=sum(f.pools or 0 for f in pooled),
        uncounted=_uncounted(pooled), sizes=_sizes(pooled), pool_sizes=sum(f.capacity for f in pooled),
        pooled=pooled_value, pooled_bounds=pooled_bounds, direct=direct_value, direct_sets=direct_sets,
        combined=combined, combined_bounds=combined_bounds, health=health, auth=auth,
        unbounded=_dedupe(unbounded))
