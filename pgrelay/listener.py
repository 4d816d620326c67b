"""Listening sockets (TCP and Unix) whose accept callbacks hand new connections to the relay."""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import TYPE_CHECKING

import gevent
from gevent import get_hub

from . import sockopts
from .errors import ConfigError
from .routing import POOLED, POSTGRES, Listener

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger("pgrelay")

ACCEPTS_PER_WAKEUP = 64
# workers = N: a worker held back from accepting waits this long after a connection arrives before
# it accepts; meanwhile a worker that is not held back takes it (then nothing is left: EAGAIN).
HELD_BACK_DELAY = 0.01
# PgBouncer's value for TCP_DEFER_ACCEPT when tcp_defer_accept is on (Linux rounds it up to a
# number of SYN-ACK retransmissions and reports that back as seconds).
DEFER_ACCEPT_SECONDS = 45


class _Bound:
    __slots__ = ("sock", "watcher", "info", "unix_path", "adopted", "paused", "delay")

    def __init__(self, sock, info: Listener, unix_path: str | None, adopted: bool = False):
        self.sock = sock
        self.info = info
        self.unix_path = unix_path
        self.adopted = adopted  # passed by the service manager: its Unix socket file is not ours to remove
        self.watcher = get_hub().loop.io(sock.fileno(), 1)
        self.paused = False  # out of descriptors: accepts resume after a second
        self.delay = None    # held back (workers): the timer of the delayed accept


class ListenerKinds(dict):
    """The listener table: listener kind -> accept(sock, peer, listener), filled by plugins
    (pgrelay_add_listener_kinds); "postgres" is the core's own."""

    def add(self, kind: str, accept) -> None:
        if kind in self:
            raise ConfigError(f"two plugins serve {kind} listeners")
        self[kind] = accept


class Listeners:
    """The relay's listening sockets: listen_addr x listen_port, plus the Unix socket, or the ones
    the service manager passed in their place (systemd socket activation)."""

    def __init__(self, relay: "Relay"):
        self.relay = relay
        self.bound: list[_Bound] = []
        self.watching = True  # False in the workers' parent: it binds and passes the sockets on, never accepts
        # workers = N: whether the parent has told this worker to leave new connections to the
        # others for now (hold_back: it has more clients than the least busy worker).
        self.held_back = False

    def start(self) -> None:
        config = self.relay.config
        errors = []
        specs = listener_specs(config)
        for info, _ in specs:
            if info.kind not in self.relay.accept_kinds:
                raise ConfigError(f"listener {info.name!r}: no plugin serves {info.kind} listeners "
                                  "(is the serverless plugin disabled?)")
        passed_tcp, passed_unix = self._adopt(specs)  # systemd socket activation
        for info, addrs in specs:
            for addr in () if info.port in passed_tcp else addrs:
                try:
                    for family, sockaddr in _resolve(addr, info.port):
                        self._bind_tcp(family, sockaddr, info)
                except OSError as exc:
                    errors.append(f"{addr}:{info.port}: {exc.strerror or exc}")
            if config.unix_socket_dir and info.port not in passed_unix and info.kind == POSTGRES:
                path = os.path.join(config.unix_socket_dir, f".s.PGSQL.{info.port}")
                try:
                    self._bind_unix(path, info)
                except OSError as exc:
                    errors.append(f"{path}: {exc.strerror or exc}")
        for error in errors:
            log.warning("could not listen on %s", error)
        if not self.bound:
            raise ConfigError("no listening socket could be opened: " + "; ".join(errors or ["nothing configured"]))

    def _bind_tcp(self, family, sockaddr, info: Listener) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.relay.config.so_reuseport:  # several processes on one port (rolling restarts)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(sockaddr)
            sock.listen(self.relay.config.listen_backlog)
            defer_accept(sock, self.relay.config.tcp_defer_accept)
        except OSError:
            sock.close()
            raise
        log.info("listening on %s (%s)", _format_addr(sockaddr), _describe(info))
        self._watch(sock, info, None)

    def _bind_unix(self, path: str, info: Listener) -> None:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                probe.close()
                raise OSError(errno.EADDRINUSE, "another process is listening on the Unix socket")
            except ConnectionRefusedError:
                os.unlink(path)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, self.relay.config.unix_socket_mode)
            sock.listen(self.relay.config.listen_backlog)
        except OSError:
            sock.close()
            raise
        log.info("listening on unix:%s (%s)", path, _describe(info))
        self._watch(sock, info, path)

    def _watch(self, sock, info: Listener, unix_path: str | None, adopted: bool = False) -> None:
        sock.setblocking(False)
        bound = _Bound(sock, info, unix_path, adopted)
        if self.watching:
            self._start(bound)
        self.bound.append(bound)

    def _adopt(self, specs) -> tuple[set[int], set[int]]:
        """Serve the sockets the service manager passed (see passed_sockets), as PgBouncer does.

        A passed TCP socket serves the listener with its port, a passed Unix socket the one its
        ``.s.PGSQL.<port>`` name names; that listener then binds no TCP address (or no Unix socket)
        of its own, while listeners and kinds no passed socket covers are bound as usual. A passed
        socket matching no listener port serves the main listener. Returns the ports covered by
        passed TCP and by passed Unix sockets."""
        by_port = {info.port: info for info, _ in specs}
        covered: dict[bool, set[int]] = {False: set(), True: set()}
        for sock, name in passed_sockets(self.relay.env):
            is_unix = sock.family == socket.AF_UNIX
            local = sock.getsockname()
            if is_unix:
                path = local.decode(errors="replace").replace("\0", "@", 1) if isinstance(local, bytes) else local
                where, port = f"unix:{path}", _unix_port(path)
            else:
                path, where, port = None, _format_addr(local), local[1]
                defer_accept(sock, self.relay.config.tcp_defer_accept)
            info = by_port.get(port)
            if info is None:
                info = specs[0][0]
                log.warning("socket %s passed by the service manager matches no listener port; "
                            "it serves the %s listener", where, info.name)
            else:
                covered[is_unix].add(port)
            log.info("listening on %s (%s; passed by the %s as fd %d%s)", where, _describe(info),
                     "workers' parent" if self.relay.worker is not None else "service manager",
                     sock.fileno(), f", {name}" if name else "")
            self._watch(sock, info, (path or "unix") if is_unix else None, adopted=True)
        return covered[False], covered[True]

    def _on_accept(self, bound: _Bound) -> bool | None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                sock, addr = bound.sock.accept()
            except BlockingIOError:
                return True  # nothing more queued
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept() failed: %s; pausing accepts for 1s", exc.strerror)
                    bound.watcher.stop()
                    bound.paused = True
                    gevent.spawn_later(1.0, self._resume, bound)
                else:
                    log.warning("accept() failed: %s", exc.strerror or exc)
                return
            if bound.unix_path:
                peer = "unix"
            else:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sockopts.tune(sock, self.relay.config)  # tcp_keepalive etc., as they are now
                peer = f"{addr[0]}:{addr[1]}"
            try:
                self.relay.accept_kinds[bound.info.kind](sock, peer, bound.info)
            except Exception as exc:
                self.relay.internal_error(exc, "accept", "could not set up a new client connection")
                sock.close()

    def _resume(self, bound: _Bound) -> None:
        bound.paused = False
        if bound in self.bound:
            self._start(bound)

    def _start(self, bound: _Bound) -> None:
        bound.watcher.start(self._on_accept_held if self.held_back else self._on_accept, bound)

    def hold_back(self, held: bool) -> None:
        """workers = N: accept new connections only HELD_BACK_DELAY after they arrive, so that the
        other workers (not held back) take them from the shared sockets; or at once again. The
        parent never holds back every worker, and a connection nobody else took is still accepted."""
        if held == self.held_back:
            return
        self.held_back = held
        for bound in self.bound:
            if bound.watcher.active:
                bound.watcher.stop()
                self._start(bound)

    def _on_accept_held(self, bound: _Bound) -> None:
        bound.watcher.stop()
        bound.delay = get_hub().loop.timer(HELD_BACK_DELAY)
        bound.delay.start(self._accept_held, bound)

    def _accept_held(self, bound: _Bound) -> None:
        bound.delay.close()
        bound.delay = None
        if bound not in self.bound:
            return
        self._on_accept(bound)  # what the others left, if anything (else EAGAIN at once)
        if not bound.paused and not bound.watcher.active:
            self._start(bound)

    def stop(self, drain: bool = False) -> None:
        """Close the listening sockets. With `drain`, connections the kernel already queued are accepted
        first (closing would reset them; with so_reuseport the other processes take the new ones)."""
        for bound in self.bound:
            if bound.delay is not None:
                bound.delay.close()
                bound.delay = None
            bound.watcher.stop()
            for _ in range(100 if drain else 0):
                if self._on_accept(bound):
                    break
            bound.watcher.close()
            bound.sock.close()
            if bound.unix_path and not bound.adopted:
                try:
                    os.unlink(bound.unix_path)
                except OSError:
                    pass
        self.bound = []


def defer_accept(sock, enabled: bool) -> None:
    """tcp_defer_accept on a TCP listening socket: with it, Linux completes the handshake but hands the
    connection to accept() only once the client has sent data (or the defer period, about
    DEFER_ACCEPT_SECONDS, is over), so a socket that sends nothing takes no file descriptor and no
    greenlet meanwhile. Elsewhere (no TCP_DEFER_ACCEPT) the setting has no effect, as in PgBouncer."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS if enabled else 0)


SD_LISTEN_FDS_START = 3
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Listening sockets a parent pgrelay passed to its workers (pgrelay.workers): their fds,
# comma-separated, in place of systemd's 3 .. 3+LISTEN_FDS-1; LISTEN_PID is not needed then.
PARENT_FDS = "PGRELAY_LISTEN_FDS"


def passed_sockets(env: dict[str, str]) -> list[tuple[socket.socket, str]]:
    """sd_listen_fds(3) without libsystemd: the listening sockets systemd (or
    systemd-socket-activate) passed as fds 3 .. 3+LISTEN_FDS-1, with their LISTEN_FDNAMES names,
    when LISTEN_PID is this process. The variables are removed from `env` and os.environ either
    way, so no child process takes the sockets for its own. A passed socket that is not a
    listening TCP or Unix stream socket is closed with a warning."""
    pid, count, names = (env.get(key) for key in LISTEN_VARIABLES)
    from_parent = env.get(PARENT_FDS)
    for key in LISTEN_VARIABLES + (PARENT_FDS,):
        env.pop(key, None)
        os.environ.pop(key, None)
    if from_parent:
        try:
            fds = [int(fd) for fd in from_parent.split(",")]
        except ValueError:
            log.warning("ignoring %s=%s: not numbers", PARENT_FDS, from_parent)
            return []
    else:
        if not pid or not count:
            return []
        try:
            if int(pid) != os.getpid():
                return []
            number = int(count)
        except ValueError:
            log.warning("ignoring LISTEN_PID=%s LISTEN_FDS=%s: not numbers", pid, count)
            return []
        fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + number))
    labels = names.split(":") if names else []
    passed = []
    for index, fd in enumerate(fds):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("ignoring fd %d passed by the service manager: %s", fd, exc.strerror or exc)
            continue
        if sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) or sock.type != socket.SOCK_STREAM \
                or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            log.warning("ignoring fd %d passed by the service manager: not a listening TCP or Unix stream socket", fd)
            sock.close()
            continue
        sock.set_inheritable(False)
        passed.append((sock, labels[index] if index < len(labels) else ""))
    return passed


def _unix_port(path: str) -> int | None:
    """The port a PostgreSQL Unix socket name stands for: 6432 for /run/pgrelay/.s.PGSQL.6432."""
    name = path.rsplit("/", 1)[-1]
    suffix = name[len(".s.PGSQL."):]
    return int(suffix) if name.startswith(".s.PGSQL.") and suffix.isdigit() else None


def listener_specs(config) -> list[tuple[Listener, tuple[str, ...]]]:
    """The main listener plus the [listeners] entries, validated; raises ConfigError naming the line."""
    from .config import parse_options
    from .settings import LISTENER_KEYS
    specs = [(Listener(name="main", addr=",".join(config.listen_addr), port=config.listen_port,
                       proxy_protocol=config.proxy_protocol), tuple(config.listen_addr))]
    ports = {config.listen_port: "listen_port"}
    for entry in config.section("listeners"):
        values = parse_options(entry, LISTENER_KEYS, "listeners")
        if not values["port"]:
            raise ConfigError(f"{entry.where}: listener {entry.key!r} needs port=")
        if values["port"] in ports:
            raise ConfigError(f"{entry.where}: port {values['port']} is already used by {ports[values['port']]}")
        ports[values["port"]] = entry.key
        addrs = values["addr"] or tuple(config.listen_addr)
        role, kind, options = values["role"], POSTGRES, ()
        if role == "serverless":  # Neon's protocols (pgrelay.serverless), routed as a pooled port
            role, kind = POOLED, "serverless"
            options = tuple((key, values[key]) for key in ("tls_cert_file", "tls_key_file") if values[key])
            if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
                raise ConfigError(f"{entry.where}: listener {entry.key!r} needs both tls_cert_file and tls_key_file")
        elif values["tls_cert_file"] or values["tls_key_file"]:
            raise ConfigError(f"{entry.where}: tls_cert_file and tls_key_file apply to role=serverless listeners only "
                              "(PostgreSQL ports use client_tls_*)")
        proxy = values["proxy_protocol"] == "1" if values["proxy_protocol"] else config.proxy_protocol
        if proxy and kind != POSTGRES:
            if values["proxy_protocol"] == "1":
                raise ConfigError(f"{entry.where}: proxy_protocol applies to PostgreSQL ports only, not role={values['role']}")
            proxy = False
        specs.append((Listener(name=entry.key, addr=",".join(addrs), port=values["port"],
                               pool_mode=values["pool_mode"] or None, role=role,
                               suffixes=values["suffixes"], kind=kind, options=options,
                               proxy_protocol=proxy), addrs))
    if not config.proxy_protocol_trusted and any(info.proxy_protocol for info, _ in specs):
        raise ConfigError("proxy_protocol is on but proxy_protocol_trusted is empty: set the addresses "
                          "of the proxies that send PROXY headers")
    return specs


def _describe(info: Listener) -> str:
    mode = f", {info.pool_mode} pooling" if info.pool_mode else ""
    role = info.kind if info.kind != POSTGRES else info.role
    proxy = ", PROXY protocol" if info.proxy_protocol else ""
    return f"{info.name}: {role}{mode}{proxy}"


def _resolve(addr: str, port: int):
    if addr == "*":
        out = [(socket.AF_INET, ("0.0.0.0", port))]
        if socket.has_ipv6:
            out.append((socket.AF_INET6, ("::", port)))
        return out
    infos = socket.getaddrinfo(addr, port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    seen, out = set(), []
    for family, _, _, _, sockaddr in infos:
        if sockaddr not in seen:
            seen.add(sockaddr)
            out.append((family, sockaddr))
    return out


def _format_addr(sockaddr) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
