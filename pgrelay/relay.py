"""The Relay: one pgrelay instance, owning its configuration, plugins, listeners, pools and clients.

Every hook has exactly one call site, a method of this class named after the hook.
"""

from __future__ import annotations

import collections
import logging
import os
import secrets
import signal
import time
from typing import Any, Iterable

import gevent
from gevent.event import Event

from . import client_auth, logs, peers, process
from .auth import DerivedSecrets, ScramClient, ScramSecret
from .config import Config, load_config
from .control import Control, ControlError
from .errors import ADMIN_SHUTDOWN, ConfigError, INTERNAL_ERROR, PgRelayError, ProtocolViolation, Reject, RejectError
from .listener import ListenerKinds, Listeners, listener_specs
from .plugins import make_plugin_manager
from .pool import CL_CLOSED, RETRY_CAPPED, SV_ACTIVE, SV_DRAIN, UNLINKED_SPARE, Pool, client_key
from .protocol import quote_literal
from .health import HealthMonitor
from .routing import POSTGRES, PRIMARY, Database, HostAddr, Login, Route, UserSpec
from .settings import SettingsRegistry, core_registry
from .tls import client_tls, server_tls

log = logging.getLogger("pgrelay")

BUILTIN_TRACKED = ("client_encoding", "DateStyle", "TimeZone", "standard_conforming_strings", "application_name")
# Parameters whose reported value is already a quoted list; they are SET without re-quoting.
LIST_QUOTED = {"search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries"}


class Relay:
    """A pooler instance. Build it from argv/env, then ``start()``; ``shutdown()`` stops it."""

    def __init__(self, config_path: str | None = None, args: Iterable[str] = (), env: dict[str, str] | None = None):
        self.config_path = config_path
        self.args = list(args)
        self.env = dict(os.environ if env is None else env)
        bootstrap = load_config(core_registry(), config_path, self.args, self.env, lenient=True)
        self.pm = make_plugin_manager(extra=bootstrap.plugins, disabled=bootstrap.disable_plugins)
        self.hook = self.pm.hook
        self.registry = self.declared_settings(self.pm)
        self.config: Config = load_config(self.registry, config_path, self.args, self.env)
        self.plugin_data: dict[str, Any] = {}  # per-relay state of plugins, keyed by plugin
        self.pools: dict[Any, Pool] = {}
        self.clients: dict[int, Any] = {}
        self.cancel_keys: dict[bytes, Any] = {}
        self.disconnects: collections.Counter[str] = collections.Counter()
        # (plugin that answered pgrelay_route_client, "route" or "reject") -> logins (route_client)
        self.route_decisions: collections.Counter[tuple[str, str]] = collections.Counter()
        self.shutting_down = False     # no new server connections are opened
        self.shutdown_requested = False
        self.stopped = Event()
        # The event loop's time, cached per loop iteration (PgBouncer's get_cached_time): query and
        # transaction times (PoolStats) are measured with it, so the relay loop reads no clock itself.
        self.clock = gevent.get_hub().loop.now
        self.listeners = Listeners(self)
        self.health = HealthMonitor(self)
        self.control = Control(self)  # PAUSE, RESUME, KILL, DISABLE... (pgrelay/control.py)
        self.client_counts: collections.Counter = collections.Counter()  # ClientLimit key -> clients
        self.server_counts: collections.Counter = collections.Counter()  # ServerLimit key -> servers
        self.server_groups: dict[Any, set[Pool]] = collections.defaultdict(set)
        self.mock_key = secrets.token_bytes(32)  # salts mock SCRAM exchanges for unknown users
        self.scram_keys: dict[str, tuple[ScramSecret, bytes]] = {}  # user -> (verifier, ClientKey)
        self.login_secrets: dict[str, str] = {}  # user -> secret its clients authenticated against
        self._janitor = None
        # workers = N: this process's link to the parent (pgrelay.workers.link), which keeps the
        # counts behind every limit pgrelay-wide and passes cancels on; None in a single process.
        self.worker = None
        self._apply_config()
        self.configure()
        self.accept_kinds = self.listener_kinds()  # listener kind -> accept(sock, peer, listener)

    def _apply_config(self, tls=None) -> None:
        """Derived state of the current config: tracked parameters and TLS contexts (re-read on reload)."""
        config = self.config
        self.client_tls, self.server_tls = tls or (client_tls(config), server_tls(config))
        if tls is None:
            listener_specs(config)  # validate [listeners] now, with file and line
        self.scram_iterations = config.scram_iterations
        # SCRAM verifiers derived from plaintext secrets: a reload starts afresh, so no password
        # replaced in auth_file lingers in memory (a changed password is never served stale anyway).
        self.derived_secrets = DerivedSecrets()
        self.tracked = BUILTIN_TRACKED + tuple(p for p in config.track_extra_parameters
                                               if p.lower() not in {t.lower() for t in BUILTIN_TRACKED})
        self.tracked_index = {name.lower(): i for i, name in enumerate(self.tracked)}
        self.ignored_startup_parameters = {p.lower() for p in config.ignore_startup_parameters}
        self.peers = peers.parse(config, getattr(self, "peers", None))  # [peers], validated on load and reload

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind listeners, write the pidfile, start the janitor and signal handlers."""
        from .janitor import Janitor
        logs.setup(self.config)
        for warning in self.config.warnings:
            log.warning("%s", warning)
        process.check_fd_limit(self.config)
        self.listeners.start()
        if self.config.user:  # -u / user: after binding (ports below 1024), before the pidfile
            process.change_user(self.config.user)
        if self.config.pidfile:
            with open(self.config.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        self._janitor = Janitor(self)
        self._janitor.start()
        self.health.start()
        self.hook.pgrelay_startup(relay=self)
        if self.worker is None:
            log.info("process up: pgrelay %s, gevent %s", _version(), gevent.__version__)
        else:  # the parent says "process up" once every worker is (pgrelay.workers.supervisor)
            log.info("worker %d up: pgrelay %s, gevent %s", self.worker.index, _version(), gevent.__version__)

    def install_signal_handlers(self) -> None:
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self.shutdown, "wait_for_servers"))
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.shutdown, "wait_for_clients"))
        gevent.signal_handler(signal.SIGQUIT, lambda: gevent.spawn(self.shutdown, "fast"))
        gevent.signal_handler(signal.SIGUSR1, self.control.signal_pause)   # PAUSE (all), as PgBouncer
        gevent.signal_handler(signal.SIGUSR2, self.control.signal_resume)  # RESUME (all)

    def serve_forever(self) -> None:
        self.stopped.wait()

    def reload(self) -> bool:
        """Re-read the configuration; keep the old one if the new one is invalid."""
        log.info("got SIGHUP, re-reading config")
        self.reloading()
        try:
            new = load_config(self.registry, self.config_path, self.args, self.env)
        except (ConfigError, OSError) as exc:
            log.error("config reload failed, keeping the old configuration: %s", exc)
            self.reload_failed(exc)
            return False
        changed = new.changed(self.config)
        fixed = {name for name in changed if name in self.registry.settings
                 and not self.registry.settings[name].reload}
        sections = dict(new.sections)
        if "[listeners]" in changed:  # ports are bound at startup
            fixed.add("[listeners]")
            sections["listeners"] = self.config.section("listeners")
        for name in sorted(fixed):
            log.warning("setting %s cannot be changed by a reload; restart pgrelay to apply it", name)
        values = dict(new.values)
        for name in fixed:
            if name in values:
                values[name] = self.config.values[name]
        old, old_state = self.config, dict(self.plugin_data)
        self.config = Config(values=values, sections=sections, path=new.path, warnings=new.warnings)
        try:
            tls = client_tls(self.config), server_tls(self.config)  # refuse unreadable certificates now
            listener_specs(new)  # a bad [listeners] line is refused even though ports wait for a restart
            peers.parse(self.config)  # a bad [peers] line is refused with file and line
            self.configure()
        except ConfigError as exc:
            log.error("config reload failed, keeping the old configuration: %s", exc)
            self.config, self.plugin_data = old, old_state
            self.reload_failed(exc)
            return False
        self._apply_config(tls)
        for pool in list(self.pools.values()):
            pool.configure(pool.route)
        logs.setup(self.config)
        for warning in new.warnings:
            log.warning("%s", warning)
        self.hook.pgrelay_reload(relay=self, changed=changed - fixed)
        return True

    def set_setting(self, name: str, text: str) -> Any:
        """The console's SET: one reloadable [pgbouncer] setting takes `text` now, applied as a reload
        that changed only it (plugins reconfigure; the next reload reads the file again). Raises
        ControlError saying why not: unknown, not reloadable, or an invalid value. Returns the value."""
        setting = self.registry.settings.get(name.lower())
        if setting is None:
            raise ControlError(f"unknown setting: {name}", "42704")
        if setting.planned:
            raise ControlError(f"setting {setting.name} is not implemented by pgrelay yet", "0A000")
        if not setting.reload:
            raise ControlError(f"setting {setting.name} cannot be changed while pgrelay runs; change it in the "
                               "configuration file and restart pgrelay", "55P02")
        try:
            value = setting.parse(text)
        except ValueError as exc:
            raise ControlError(f"{setting.name}: {exc}", "22023") from None
        old, old_state = self.config, dict(self.plugin_data)
        self.config = Config(values={**old.values, setting.name: value}, sections=old.sections, path=old.path,
                             warnings=old.warnings)
        try:
            tls = client_tls(self.config), server_tls(self.config)
            self.configure()
        except ConfigError as exc:
            self.config, self.plugin_data = old, old_state
            raise ControlError(f"{setting.name}: {exc}", "22023") from None
        self._apply_config(tls)
        for pool in list(self.pools.values()):
            pool.configure(pool.route)
        logs.setup(self.config)
        log.info("SET command issued: %s changed", setting.name)  # never the value: it may be a secret
        return value

    def shutdown(self, mode: str = "fast") -> None:
        """Stop accepting; then stop at once, after active servers are released, or after clients leave.

        As in PgBouncer: SIGINT (wait_for_servers) lets running transactions finish but gives no
        new server to anyone; SIGTERM (wait_for_clients) serves connected clients normally until
        the last one leaves; a second signal, or SIGQUIT (fast), stops at once.
        """
        if self.shutdown_requested:
            mode = "fast"
        self.shutdown_requested = True
        log.info("shutdown requested (%s)", mode)
        self.listeners.stop(drain=mode == "wait_for_clients")  # queued connections are served, not reset
        if mode != "wait_for_clients":  # SIGTERM keeps serving connected clients until they leave
            self.shutting_down = True
            for pool in list(self.pools.values()):
                for server in list(pool.servers):
                    server.close_reason = "pooler is shutting down"
                    if server.state in UNLINKED_SPARE:
                        server.close(server.close_reason)
        self.hook.pgrelay_shutdown(relay=self, mode=mode)
        if mode == "wait_for_servers":
            while any(s.state == SV_ACTIVE for p in self.pools.values() for s in p.servers) \
                    and self.shutting_down and not self.stopped.is_set():
                gevent.sleep(0.1)
        elif mode == "wait_for_clients":
            while self.clients and not self.stopped.is_set():
                gevent.sleep(0.1)
        if self.stopped.is_set():
            return
        self.shutting_down = True
        for client in list(self.clients.values()):
            client.disconnect("server shutting down", Reject("server shutting down", ADMIN_SHUTDOWN))
        for pool in list(self.pools.values()):
            for server in list(pool.servers):
                server.close("pooler is shutting down")
        if self._janitor:
            self._janitor.stop()
        self.health.stop()
        process.remove_pidfile(self.config.pidfile)
        log.info("shutdown complete")
        self.stopped.set()

    # -- clients and servers ------------------------------------------------------------------------

    def accept(self, sock, peer: str, listener, transport=None) -> None:
        """A new PostgreSQL client on `sock`. `transport` describes what carries it when that is not
        the socket itself (a WebSocket or HTTP request bridged in by pgrelay.serverless)."""
        from .client import ClientConnection
        client = ClientConnection(self, sock, peer, listener, transport)
        self.clients[client.id] = client
        if self.worker is not None:  # the parent spreads new connections by these counts
            self.worker.count_clients(len(self.clients))
        gevent.spawn(client.run_login)

    def register_client(self, client) -> bytes:
        """A fresh random cancel key (sign bit cleared, as PgBouncer does) mapped to the client."""
        while True:
            key = bytearray(secrets.token_bytes(8))
            key[0] &= 0x7F
            if self.worker is not None:  # the owning worker, as keys.issue stamps it
                key[3] = self.worker.index
            key = bytes(key)
            if key not in self.cancel_keys:
                self.cancel_keys[key] = client
                return key

    def forget_client(self, client) -> None:
        if self.clients.pop(client.id, None) is not None and self.worker is not None:
            self.worker.count_clients(len(self.clients))
        if client.key and self.cancel_keys.get(client.key) is client:
            del self.cancel_keys[client.key]
        for limit in client.limits:
            self.client_counts[limit.key] -= 1
            if not self.client_counts[limit.key]:
                del self.client_counts[limit.key]
        client.limits = ()
        if client.shared:
            self.worker.release(client.shared)
            client.shared = ()
        pool = client.pool
        if pool is not None and pool.per_client:
            for limit in pool.route.server_limits:
                self.server_groups.get(limit.key, set()).discard(pool)
            for server in list(pool.servers):
                if server.state != SV_DRAIN:  # a draining server closes once its replies are in
                    server.close("direct client left")
            self.pools.pop(pool.key, None)

    def admit(self, client, route: Route) -> Reject | None:
        """Count the client against its route's client limits, or say which limit refuses it.
        With workers, the counts are the parent's, for all workers together (blocks this greenlet
        for one round trip)."""
        for limit in route.client_limits:
            if limit.maximum and self.client_counts[limit.key] >= limit.maximum:
                return Reject(limit.message, limit.sqlstate)
        if self.worker is not None:
            shared = [(client_key(limit.key), limit.maximum) for limit in route.client_limits if limit.maximum]
            refused = self.worker.acquire(shared)
            if refused is not None:
                limit = next((limit for limit in route.client_limits if client_key(limit.key) == refused), None)
                return Reject(limit.message, limit.sqlstate) if limit else Reject(
                    "no more connections allowed (workers' parent unreachable)", "53300")
            client.shared = [key for key, _ in shared]
        for limit in route.client_limits:
            self.client_counts[limit.key] += 1
        client.limits = route.client_limits
        return None

    def cancel(self, key: bytes):
        """A CancelRequest: forward it only to the server currently running this client's query.
        With peer_id set, a key naming another peer goes to that peer (pgrelay.peers).
        Returns the greenlet forwarding it (None if nothing was forwarded)."""
        if self.config.peer_id:
            key, forwarding = peers.route_cancel(self, key)
            if key is None:
                return forwarding
        if self.worker is not None and key[3] != self.worker.index:  # another worker's client
            if key[3] < self.worker.count:
                self.worker.forward_cancel(key, key[3])
            return None
        client = self.cancel_keys.get(key)
        if client is None or client.state == CL_CLOSED:
            return None
        server = client.server
        if server is not None and server.state == SV_ACTIVE:
            return server.forward_cancel()
        return None

    def get_pool(self, route: Route, client=None) -> Pool:
        """The pool for a route; a per-client route gets a pool of its own, removed when it leaves."""
        key = (route.pool_key, client.id) if route.per_client and client is not None else route.pool_key
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = Pool(self, route, key)
            if client is not None:
                pool.database = client.database
                pool.decided_by = client.decided_by
            pool.paused = self.control.pool_paused(pool)
        elif pool.route != route:
            pool.configure(route)
        for limit in route.server_limits:  # a reload may have added a cap to an existing pool
            if limit.maximum:
                self.server_groups[limit.key].add(pool)
        return pool

    def launch_server(self, pool: Pool) -> None:
        if self.worker is None:
            self._open_server(pool, ())
        else:
            pool.asking += 1
            gevent.spawn(self._launch_shared, pool)

    def _launch_shared(self, pool: Pool) -> None:
        """workers = N: a server opens only once the parent counts it under the pool's size and its
        server limits for all workers together; refused, the pool waits for room (Pool.capped).
        Until the answer the server is only asked for (Pool.asking), not one of the pool's servers."""
        shared = pool.shared_keys(with_maxima=True)
        try:
            refused = self.worker.acquire(shared, shed=True)
        finally:
            pool.asking -= 1
        if refused is not None:
            pool.capped = time.monotonic() + RETRY_CAPPED
            return
        keys = [key for key, _ in shared]
        if self.shutting_down or pool.paused or self.pools.get(pool.key) is not pool:
            self.worker.release(keys)  # stopped, paused (KILL) or forgotten while the parent was asked
            return
        self._open_server(pool, keys)

    def _open_server(self, pool: Pool, shared) -> None:
        from .server import ServerConnection
        server = ServerConnection(self, pool)
        pool.add_server(server)
        server.shared = shared
        gevent.spawn(server.login)

    def server_room(self, pool: Pool, evict: bool = True) -> bool:
        """Whether `pool` may open another server under its server limits; with `evict`, an idle
        server of another pool of the group is closed if that makes room (the close may hand the
        room to another waiting pool at once: callers check again without evicting)."""
        for limit in pool.route.server_limits:
            if limit.maximum and self.server_counts[limit.key] >= limit.maximum:
                if not evict or not self._evict_idle(limit.key, pool):
                    return False
        return True

    def _evict_idle(self, key, wanting: Pool) -> bool:
        """Close an idle server of the group's pool that has the most servers (fair across pools),
        as PgBouncer evicts for max_db_connections and max_user_connections."""
        candidates = [other for other in self.server_groups.get(key, ()) if other is not wanting and other.spare()]
        if not candidates:
            return False
        fullest = max(candidates, key=lambda pool: len(pool.servers))
        fullest.spare().close("evicted to make room for another pool of its group")
        return True

    def trim_groups(self) -> None:
        """A reload lowered a shared cap below its count: close idle servers of the group (never
        busy ones) until it fits (janitor)."""
        for key, pools in list(self.server_groups.items()):
            maximum = next((limit.maximum for pool in pools for limit in pool.route.server_limits
                            if limit.key == key), 0)
            while maximum and self.server_counts[key] > maximum:
                idle = [pool for pool in pools if pool.spare()]
                if not idle:
                    break
                max(idle, key=lambda pool: len(pool.servers)).spare().close("too many servers for the group")

    def group_changed(self, pool: Pool) -> None:
        """A server of `pool`'s groups closed or went idle: let waiting pools of those groups launch."""
        for limit in pool.route.server_limits:
            for other in list(self.server_groups.get(limit.key, ())):
                if other is not pool and other.waiting:
                    other.launch_if_needed()

    def hosts_changed(self) -> None:
        """A host changed role or reachability (health monitor): servers of primary pools on a host
        that is no longer the one chosen are closed (idle now, busy ones when released), and failed
        logins are retried now rather than after server_login_retry."""
        for pool in list(self.pools.values()):
            pool.login_error = None
            route = pool.route
            if route.target == PRIMARY and len(route.hosts) > 1:
                chosen = self.choose_host(pool)
                if isinstance(chosen, HostAddr):
                    for server in list(pool.servers):
                        if server.addr is not None and server.addr != chosen and not server.close_reason:
                            server.close_reason = f"host {server.addr} is no longer the primary"
                            if server.state in UNLINKED_SPARE:
                                server.close(server.close_reason)
            pool.launch_if_needed()

    def tracked_values(self, defaults: dict[str, str], overrides: dict[str, str] | None = None) -> tuple:
        """Tracked parameter values in `tracked` order: the client's own, else the server's."""
        lowered = {k.lower(): v for k, v in defaults.items()}
        if overrides:
            lowered.update({k.lower(): v for k, v in overrides.items()})
        return tuple(lowered.get(name.lower()) for name in self.tracked)

    def set_params_sql(self, want: tuple, have: tuple) -> str | None:
        """One SET batch that makes a server's tracked values match a client's, or None if they do."""
        if want is have:
            return None
        parts = []
        for name, value, current in zip(self.tracked, want, have, strict=True):
            if value is None or (current is not None and value.lower() == current.lower()):
                continue
            rendered = value if name.lower() in LIST_QUOTED else quote_literal(value)
            parts.append(f"SET {name}={rendered}")
        return ";".join(parts) if parts else None

    def remember_secret(self, user: str, secret: str | None) -> None:
        """Keep the secret a client authenticated against (in memory only) for server logins as that
        user, as PgBouncer keeps what auth_query returned."""
        if secret:
            self.login_secrets[user] = secret

    def remember_scram_keys(self, user: str, secret: ScramSecret, client_key: bytes) -> None:
        """Keep a SCRAM client's ClientKey (in memory only) so servers can log in as that user."""
        self.scram_keys[user] = (secret, client_key)

    def scram_client(self, user: str, password: str | None, cbind: bytes | None) -> ScramClient | None:
        """How pgrelay logs in to a SCRAM server: with a plaintext password, or by pass-through.

        Pass-through needs the server's verifier to be the one the client authenticated against
        (same salt and iterations), as with PgBouncer.
        """
        secret = ScramSecret.parse(password) if password else None
        if password and secret is None and not (password.startswith("md5") and len(password) == 35):
            return ScramClient(password=password, channel_binding=cbind)
        cached = self.scram_keys.get(user)
        if cached is None or (secret is not None and cached[0] != secret):
            return None
        verifier, client_key = cached
        return ScramClient(client_key=client_key, server_key=verifier.server_key, channel_binding=cbind,
                           expect=verifier)

    def server_password(self, user: str) -> str | None:
        """The secret for a server login as `user` when the database line has no password: the
        credentials plugins' answer, else what a client of that user authenticated against."""
        secret = self.get_credentials(None, user)
        return secret if secret is not None else self.login_secrets.get(user)

    # -- hook call sites (one per hook) -----------------------------------------------------------

    @staticmethod
    def declared_settings(pm) -> SettingsRegistry:
        """The core settings plus those the plugins of `pm` declare (also used by --help and docs)."""
        registry = core_registry()
        pm.hook.pgrelay_add_settings(settings=registry)
        return registry

    def configure(self) -> None:
        self.hook.pgrelay_configure(relay=self)

    def reloading(self) -> None:
        self.hook.pgrelay_reloading(relay=self)

    def reload_failed(self, error: BaseException) -> None:
        self.hook.pgrelay_reload_failed(relay=self, error=error)

    def choose_auth_method(self, login: Login) -> str | Reject:
        method = self.hook.pgrelay_choose_auth_method(relay=self, login=login)
        if method is None:
            return Reject("no authentication method configured", "28000")
        return method

    def authenticate(self, client, login: Login) -> None:
        """Run the client's authentication exchange; raise RejectError to refuse it."""
        method = self.choose_auth_method(login)
        if isinstance(method, Reject):
            self.auth_failed(login, "no_method")
            raise RejectError(method)
        try:
            client_auth.authenticate(self, client, login, method)
        except (RejectError, ProtocolViolation) as exc:
            self.auth_failed(login, client_auth.failure_reason(exc))
            raise

    def get_credentials(self, login: Login | None, user: str) -> str | None:
        return self.hook.pgrelay_get_credentials(relay=self, login=login, user=user)

    def check_password(self, login: Login, password: str) -> bool | None:
        return self.hook.pgrelay_check_password(relay=self, login=login, password=password)

    def parse_username(self, login: Login) -> UserSpec | Reject:
        spec = self.hook.pgrelay_parse_username(relay=self, login=login)
        return UserSpec(login.user) if spec is None else spec

    def find_database(self, name: str, cluster: str | None = None) -> Database | None:
        return self.hook.pgrelay_find_database(relay=self, name=name, cluster=cluster)

    def route_client(self, login: Login) -> Route | Reject:
        """The routing decision; which plugin made it is counted in route_decisions and kept as
        the client's decided_by (SHOW ROUTES, metrics)."""
        impls = self.hook.pgrelay_route_client.get_hookimpls()
        decided_by = "(none)"
        if any(impl.hookwrapper or impl.wrapper for impl in impls):  # let pluggy run the wrappers
            decision = self.hook.pgrelay_route_client(relay=self, login=login)
            decided_by = "(wrapped)" if decision is not None else decided_by
        else:  # pluggy's firstresult order (last registered, tryfirst first), noting who answered
            decision, kwargs = None, {"relay": self, "login": login}
            for impl in reversed(impls):
                decision = impl.function(*[kwargs[name] for name in impl.argnames])
                if decision is not None:
                    decided_by = impl.plugin_name
                    break
        self.route_decisions[decided_by, "reject" if not isinstance(decision, Route) else "route"] += 1
        client = self.clients.get(login.client_id)
        if client is not None:
            client.decided_by = decided_by
        if decision is None:
            return Reject(f"no such database: {login.database}")
        if self.control.disabled_dbs and not isinstance(decision, Reject):
            return self.control.login_refusal(login.database) or decision  # DISABLE db
        return decision

    def choose_host(self, pool: Pool) -> HostAddr | Reject:
        route = pool.route
        hosts = route.hosts + tuple(r for r in route.replicas if r not in route.hosts)
        chosen = self.hook.pgrelay_choose_host(relay=self, route=route, hosts=hosts)
        if chosen is None:
            chosen = route.hosts[pool.next_host % len(route.hosts)]
            pool.next_host += 1
        return chosen

    def check_client_limits(self, login: Login) -> Reject | None:
        return self.hook.pgrelay_check_client_limits(relay=self, login=login)

    def listener_kinds(self) -> "ListenerKinds":
        """The listener table: PostgreSQL's own protocol, plus the kinds plugins serve."""
        kinds = ListenerKinds({POSTGRES: self.accept})
        self.hook.pgrelay_add_listener_kinds(relay=self, kinds=kinds)
        return kinds

    def check_bearer_token(self, login: Login, token: str) -> bool | None:
        return self.hook.pgrelay_check_bearer_token(relay=self, login=login, token=token)

    def virtual_database(self, login: Login):
        """The VirtualDatabase (pgrelay.virtual) that serves this login itself, or None."""
        return self.hook.pgrelay_virtual_database(relay=self, login=login)

    def admin_commands(self, commands) -> None:
        """Let plugins add their commands to the admin console's command table."""
        self.hook.pgrelay_admin_commands(relay=self, commands=commands)

    def translate_error(self, error: BaseException, phase: str, client) -> Reject:
        """What the client is told: a fault, or (RejectError) one of pgrelay's own refusals, which the
        built-in errors plugin renders with its SQLSTATE and HINT from its message table."""
        try:
            decision = self.hook.pgrelay_translate_error(relay=self, error=error, phase=phase, client=client)
        except Exception as exc:
            self.internal_error(exc, "translate_error", "pgrelay_translate_error failed", client=client)
            decision = None
        if decision is None:
            if isinstance(error, PgRelayError):  # RejectError included: the decision as it is
                return error.reject()
            return Reject("internal error", INTERNAL_ERROR)
        return decision

    def _notify(self, hook_name: str, **kwargs) -> None:
        caller = getattr(self.hook, hook_name)
        if caller.get_hookimpls():
            gevent.spawn(self._run_notification, caller, kwargs)

    def _run_notification(self, caller, kwargs) -> None:
        try:
            caller(relay=self, **kwargs)
        except Exception as exc:
            if caller.name == "pgrelay_internal_error":  # never report a failed report (a loop)
                log.exception("plugin failed in %s", caller.name)
            else:
                self.internal_error(exc, "plugin", f"plugin failed in {caller.name}",
                                    client=kwargs.get("client"), server=kwargs.get("server"))

    def internal_error(self, error: BaseException, phase: str, message: str, client=None, server=None) -> None:
        """A bug that pgrelay survived (see the hook for `phase`): log `message` with the traceback,
        as log.exception did at each place, then tell the plugins (e.g. Sentry)."""
        log.error("%s", message, exc_info=(type(error), error, error.__traceback__))
        self._notify("pgrelay_internal_error", error=error, phase=phase, client=client, server=server)

    def sentry_event(self, event: dict[str, Any], hint: dict[str, Any]) -> Reject | None:
        """Plugins may enrich an error report in place, or drop it by returning a Reject."""
        return self.hook.pgrelay_sentry_event(relay=self, event=event, hint=hint)

    def client_connected(self, client) -> None:
        self._notify("pgrelay_client_connected", client=client)

    def client_disconnected(self, client, reason: str) -> None:
        self.disconnects[reason] += 1
        self._notify("pgrelay_client_disconnected", client=client, reason=reason)

    def server_connected(self, server) -> None:
        self._notify("pgrelay_server_connected", server=server)

    def server_disconnected(self, server, reason: str) -> None:
        self.disconnects["server: " + reason] += 1
        self._notify("pgrelay_server_disconnected", server=server, reason=reason)

    def server_login_failed(self, pool: Pool, error) -> None:
        self._notify("pgrelay_server_login_failed", pool=pool, error=error)

    def auth_failed(self, login: Login, reason: str) -> None:
        self._notify("pgrelay_auth_failed", login=login, reason=reason)

    def host_changed(self, host: HostAddr, state) -> None:
        self._notify("pgrelay_host_changed", host=host, state=state)

    def report_stats(self, stats: dict[str, Any]) -> None:
        self._notify("pgrelay_report_stats", stats=stats)

    # -- introspection ------------------------------------------------------------------------------

    def stats_snapshot(self) -> dict[str, Any]:
        pools = {}
        for pool in self.pools.values():
            s = pool.stats
            pools[pool.name] = {
                "xact_count": s.xact_count, "query_count": s.query_count, "bytes_received": s.bytes_received,
                "bytes_sent": s.bytes_sent, "wait_time": s.wait_time, "clients": pool.nclients,
                "server_assignment_count": s.server_assignment_count, "xact_time": s.xact_time,
                "query_time": s.query_time,
                "waiting": len(pool.waiting), "servers": len(pool.servers), "idle_servers": len(pool.idle),
                "server_logins": s.server_logins, "server_login_failures": s.server_login_failures,
            }
        return {"pools": pools, "clients": len(self.clients),
                "servers": sum(len(p.servers) for p in self.pools.values()),
                "disconnects": dict(self.disconnects), "time": time.time()}


def _version() -> str:
    from . import __version__
    return __version__
