"""systemd integration: sd_notify readiness, reload, status and watchdog messages; a built-in plugin.

Under systemd (``Type=notify`` or ``Type=notify-reload``) the service manager names a datagram
socket in ``NOTIFY_SOCKET``; pgrelay sends it, as sd_notify(3) does but without libsystemd:

* ``READY=1`` once the listeners are open (``pgrelay_startup``), with a first ``STATUS=``;
* ``RELOADING=1`` and ``MONOTONIC_USEC=`` when a reload begins, ``READY=1`` when it is over, also
  when it was refused (then ``STATUS=`` says so, and that the old configuration stays);
* ``STOPPING=1`` on shutdown;
* ``STATUS=clients: N, servers: N, pools: N`` with each of these messages, and whenever the
  summary changes (checked every ``STATUS_INTERVAL`` seconds), shown by ``systemctl status``;
* ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` when systemd set one (``WatchdogSec=``) for this
  process (``WATCHDOG_PID``, if given, is ours), from a greenlet: it stops if the event loop hangs.

Without ``NOTIFY_SOCKET`` the plugin does nothing. A socket that is unreachable, missing or
malformed is reported by one warning and otherwise ignored; pgrelay serves as usual.
"""

from __future__ import annotations

import logging
import os
import socket
import time

import gevent

from pgrelay import hookimpl

log = logging.getLogger("pgrelay")

STATUS_INTERVAL = 2.0  # seconds between checks of the STATUS= summary (sent only when it changed)
RELOAD_FAILED = "last reload failed, old configuration kept (see the log)"


class Notifier:
    """One relay's sd_notify channel: datagrams to NOTIFY_SOCKET; the first failure is logged."""

    def __init__(self, address: str):
        self.address = address
        self.sock: socket.socket | None = None
        self.warned = False
        if address.startswith("@"):    # abstract namespace name
            self.target: str | None = "\0" + address[1:]
        elif address.startswith("/"):
            self.target = address
        else:                          # vsock: and anything else: not ours to speak
            self.target = None

    def send(self, *fields: str) -> bool:
        """Send one message of ``KEY=value`` fields; False (and one warning per relay) if it failed."""
        try:
            if self.target is None:
                raise OSError("not an absolute path or @abstract socket name")
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self.sock.setblocking(False)
            self.sock.sendto("\n".join(fields).encode("utf-8", "replace"), self.target)
            return True
        except OSError as exc:
            if not self.warned:
                self.warned = True
                log.warning("cannot notify systemd through NOTIFY_SOCKET=%s: %s; running without its notifications",
                            self.address, exc.strerror or exc)
            return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class SystemdState:
    """The notifier, what STATUS= says besides the summary, and the greenlets sending STATUS= and
    WATCHDOG=1."""

    def __init__(self, notifier: Notifier, watchdog: float | None):
        self.notifier = notifier
        self.watchdog = watchdog  # seconds between WATCHDOG=1 (half of WATCHDOG_USEC), or None
        self.prefix = ""          # "shutting down (mode): " once stopping
        self.note = ""            # "; last reload failed ..." until a reload succeeds
        self.status = ""          # the STATUS= last sent
        self.greenlets: list[gevent.Greenlet] = []


def summary(relay) -> str:
    """The one-line summary: clients (also those logging in), server connections, pools."""
    servers = sum(len(pool.servers) for pool in relay.pools.values())
    return f"clients: {len(relay.clients)}, servers: {servers}, pools: {len(relay.pools)}"


def watchdog_interval(env: dict[str, str]) -> float | None:
    """Half of WATCHDOG_USEC in seconds when it is meant for this process, as sd_watchdog_enabled(3)
    reads it; None without a watchdog."""
    usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%s WATCHDOG_PID=%s: not numbers", usec, pid)
        return None


def _state(relay) -> SystemdState | None:
    return relay.plugin_data.get("systemd")


def _notify(relay, state: SystemdState, *fields: str) -> None:
    """Send `fields` with the current STATUS= line."""
    state.status = state.prefix + summary(relay) + state.note
    state.notifier.send(*fields, f"STATUS={state.status}")


def _status_updates(relay, state: SystemdState) -> None:
    """STATUS= whenever the line changed, checked every STATUS_INTERVAL, until the relay stopped."""
    while not relay.stopped.wait(STATUS_INTERVAL):
        if state.prefix + summary(relay) + state.note != state.status:
            _notify(relay, state)


def _watchdog(relay, state: SystemdState) -> None:
    """WATCHDOG=1 every half WATCHDOG_USEC from the event loop, so a hung loop is noticed."""
    while not relay.stopped.wait(state.watchdog):
        state.notifier.send("WATCHDOG=1")


@hookimpl
def pgrelay_startup(relay):
    address = relay.env.get("NOTIFY_SOCKET")
    if not address:
        return
    state = SystemdState(Notifier(address), watchdog_interval(relay.env))
    relay.plugin_data["systemd"] = state  # kept as it is by reloads (no pgrelay_configure here)
    _notify(relay, state, "READY=1", *(["WATCHDOG=1"] if state.watchdog else []))
    state.greenlets.append(gevent.spawn(_status_updates, relay, state))
    if state.watchdog:
        state.greenlets.append(gevent.spawn(_watchdog, relay, state))


@hookimpl
def pgrelay_reloading(relay):
    state = _state(relay)
    if state is not None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        state.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")
        state.status = "reloading the configuration"


@hookimpl
def pgrelay_reload(relay, changed):
    state = _state(relay)
    if state is not None:
        state.note = ""
        _notify(relay, state, "READY=1")


@hookimpl
def pgrelay_reload_failed(relay, error):
    state = _state(relay)
    if state is not None:
        # Not the error text: it may quote a configured value, and STATUS= is readable by every user.
        state.note = "; " + RELOAD_FAILED
        _notify(relay, state, "READY=1")


@hookimpl
def pgrelay_shutdown(relay, mode):
    state = _state(relay)
    if state is not None:
        state.prefix = f"shutting down ({mode}): "
        _notify(relay, state, "STOPPING=1")
