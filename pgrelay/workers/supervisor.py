"""The workers' parent: binds the listeners, runs N worker processes on them, restarts the dead, forwards signals, speaks to systemd.

The parent serves no client itself. It binds every listening socket the configuration names (or
adopts those systemd passed), switches user, writes the pidfile, then starts each worker as
``python -m pgrelay`` with the same configuration, the sockets (PGRELAY_LISTEN_FDS) and one end
of a channel (PGRELAY_WORKER = index/count/fd). Over the channels it runs the coordinator
(coordinator.py), passes cancel requests to the worker owning the key, gathers console answers,
and spreads new connections: every worker accepts from the same sockets, and one with
ACCEPT_SPREAD clients more than the least busy is held back (it accepts only after a delay,
pgrelay.listener) until the others catch up.
A worker that exits while pgrelay is not stopping is started again (after RESTART_DELAY, longer
if it keeps dying at once); its counts are given back first. SIGHUP reloads every worker;
SIGINT, SIGTERM and SIGQUIT are forwarded and the parent exits once every worker has; SIGUSR1 and
SIGUSR2 are forwarded. Under systemd the parent alone sends READY=1 (once every worker is up),
RELOADING=1 / READY=1 around a reload, and STOPPING=1.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time

import gevent
from gevent import subprocess
from gevent.event import AsyncResult, Event

from pgrelay import process
from pgrelay.errors import ClientGone

from . import LISTEN_FDS_ENV, WORKER_ENV
from .channel import Channel
from .coordinator import Coordinator

log = logging.getLogger("pgrelay")

RESTART_DELAY = 1.0      # seconds before a dead worker is started again
RESTART_BACKOFF = 5.0    # ... when it died within FLAPPING seconds of starting
FLAPPING = 5.0
GATHER_TIMEOUT = 60.0    # seconds a console command may take in the workers (PAUSE waits for servers)
# A worker with this many clients more than the least busy one is held back from accepting, so
# that new connections from the shared listening sockets go to the others.
ACCEPT_SPREAD = 2
ACCEPT_SPREAD_FRACTION = 8  # ... or an eighth of the least busy worker's clients, if more (login bursts)


class Worker:
    """One worker process as the parent sees it."""

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self.ready = False
        self.started = 0.0
        self.restarts = 0
        self.clients = 0         # as the worker last said
        self.held_back = False   # told to leave new connections to the others


class Supervisor:
    def __init__(self, relay, config_path: str | None, args: list[str], quiet: bool):
        self.relay = relay
        self.config = relay.config
        self.count = relay.config.workers
        self.worker_argv = [sys.executable, "-m", "pgrelay"] + (["-q"] if quiet else []) + list(args) + \
            ["--pidfile="] + ([config_path] if config_path else [])
        self.workers = [Worker(i) for i in range(self.count)]
        self.coordinator = Coordinator(self._tell)
        self.stopping = False
        self.stop_signal = signal.SIGTERM
        self.notify_socket = relay.env.get("NOTIFY_SOCKET") or os.environ.get("NOTIFY_SOCKET")
        self.announced = False
        self.gathers: dict[int, dict] = {}
        self.gather_ids = itertools.count(1)
        self.fds: list[int] = []
        self.names: list[str] = []
        self.done = Event()

    # -- start ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind (in the parent's process, before any worker exists), switch user, write the pidfile."""
        from pgrelay import logs
        relay = self.relay
        logs.setup(self.config)
        for warning in self.config.warnings:
            log.warning("%s", warning)
        process.check_fd_limit(self.config)
        relay.listeners.watching = False
        relay.listeners.start()
        if self.config.user:
            process.change_user(self.config.user)
        if self.config.pidfile:
            with open(self.config.pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        for bound in relay.listeners.bound:
            self.fds.append(bound.sock.fileno())
            self.names.append(bound.info.name)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)  # the parent speaks to systemd, not the workers
        for worker in self.workers:
            self._spawn(worker)

    def install_signal_handlers(self) -> None:
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self.reload))
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            gevent.signal_handler(sig, self.stop, sig)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            gevent.signal_handler(sig, self._forward, sig)

    def serve_forever(self) -> None:
        self.done.wait()

    def _spawn(self, worker: Worker) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env[WORKER_ENV] = f"{worker.index}/{self.count}/{child_end.fileno()}"
        env[LISTEN_FDS_ENV] = ",".join(str(fd) for fd in self.fds)
        env["LISTEN_FDNAMES"] = ":".join(self.names)
        try:
            worker.proc = subprocess.Popen(self.worker_argv, env=env, stdin=subprocess.DEVNULL,
                                           pass_fds=self.fds + [child_end.fileno()])
        except OSError as exc:
            log.error("could not start worker %d: %s", worker.index, exc.strerror or exc)
            parent_end.close()
            child_end.close()
            gevent.spawn_later(RESTART_BACKOFF, self._respawn, worker)
            return
        finally:
            if not child_end._closed:
                child_end.close()
        from gevent import socket as gsocket
        worker.channel = Channel(gsocket.socket(fileno=parent_end.detach()))
        worker.ready = False
        worker.clients = 0
        worker.held_back = False
        worker.started = time.monotonic()
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)
        gevent.spawn(self._serve, worker, worker.channel)
        gevent.spawn(self._wait, worker, worker.proc)

    def _respawn(self, worker: Worker) -> None:
        if not self.stopping:
            worker.restarts += 1
            self._spawn(worker)

    def _wait(self, worker: Worker, proc) -> None:
        code = proc.wait()
        if worker.proc is not proc:
            return
        if worker.channel is not None:
            worker.channel.close()
        self.coordinator.worker_gone(worker.index)
        self._worker_left_gathers(worker.index)
        worker.ready = False
        self._spread_accepts()
        worker.proc = None
        how = f"signal {-code}" if code < 0 else f"code {code}"
        if self.stopping:
            log.info("worker %d (pid %d) exited with %s", worker.index, proc.pid, how)
        elif code == 0:
            # A clean exit nobody asked the parent for: SHUTDOWN on the console (run in every worker).
            log.info("worker %d (pid %d) shut down; stopping pgrelay", worker.index, proc.pid)
            self.stop(None)
        else:
            delay = RESTART_BACKOFF if time.monotonic() - worker.started < FLAPPING else RESTART_DELAY
            log.error("worker %d (pid %d) exited with %s; starting it again in %.0f s",
                      worker.index, proc.pid, how, delay)
            gevent.spawn_later(delay, self._respawn, worker)
        if self.stopping and all(w.proc is None for w in self.workers):
            self._finish()

    # -- signals -------------------------------------------------------------------------------

    def stop(self, sig) -> None:
        """SIGINT / SIGTERM / SIGQUIT: pass it on to every worker, exit once all have. None: the
        workers are stopping on their own (SHUTDOWN)."""
        if not self.stopping:
            self.stopping = True
            self._tell_systemd("STOPPING=1")
            log.info("got signal %s, stopping the workers", sig if sig is None else signal.Signals(sig).name)
        if sig is not None:
            self._forward(sig)
        if all(w.proc is None for w in self.workers):
            self._finish()

    def _forward(self, sig) -> None:
        for worker in self.workers:
            if worker.proc is not None:
                try:
                    os.kill(worker.proc.pid, sig)
                except ProcessLookupError:
                    pass

    def reload(self) -> None:
        log.info("got SIGHUP, reloading the workers")
        self._tell_systemd("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        waiters = []
        for worker in self.workers:
            if worker.proc is not None and worker.channel is not None:
                worker.reloaded = AsyncResult()
                if worker.channel.send({"op": "reload"}):
                    waiters.append(worker.reloaded)
        gevent.wait(waiters, timeout=GATHER_TIMEOUT)
        failed = sum(1 for w in waiters if w.ready() and not w.value)
        self._tell_systemd("READY=1", "STATUS=" + ("reload failed in %d workers, old configuration kept" % failed
                                             if failed else f"{self.count} workers"))

    def _finish(self) -> None:
        if self.done.is_set():
            return
        self.relay.listeners.stop()
        process.remove_pidfile(self.config.pidfile)
        log.info("shutdown complete")
        self.done.set()

    # -- the channels --------------------------------------------------------------------------

    def _tell(self, index: int, message: dict) -> None:
        worker = self.workers[index]
        if worker.channel is not None:
            worker.channel.send(message)

    def _serve(self, worker: Worker, channel: Channel) -> None:
        index = worker.index
        try:
            while True:
                message = channel.receive()
                op = message.get("op")
                if op == "acquire":
                    refused = self.coordinator.acquire(index, [(k, int(m)) for k, m in message["items"]],
                                                       bool(message.get("shed")))
                    channel.send({"op": "reply", "id": message["id"], "refused": refused})
                elif op == "release":
                    self.coordinator.release(index, message["keys"])
                elif op == "clients":
                    worker.clients = int(message["count"])
                    worker.held_back = bool(message.get("held"))
                    self._spread_accepts()
                elif op == "cancel":
                    owner = int(message["owner"])
                    if 0 <= owner < self.count:
                        self._tell(owner, {"op": "cancel", "key": message["key"]})
                elif op == "gather":
                    self._gather(index, message)
                elif op == "admin_result":
                    self._gathered(index, message)
                elif op == "reloaded":
                    waiter = getattr(worker, "reloaded", None)
                    if waiter is not None and not waiter.ready():
                        waiter.set(bool(message.get("ok")))
                elif op == "ready":
                    worker.ready = True
                    self._spread_accepts()
                    log.info("worker %d ready (pid %s)", index, message.get("pid"))
                    if not self.announced and all(w.ready for w in self.workers):
                        self.announced = True
                        log.info("process up: pgrelay %s, %d workers", _version(), self.count)
                        self._tell_systemd("READY=1", f"STATUS={self.count} workers", f"MAINPID={os.getpid()}")
        except ClientGone:
            pass

    def _spread_accepts(self) -> None:
        """Hold back the accepts of every ready worker with ACCEPT_SPREAD clients (or an
        ACCEPT_SPREAD_FRACTION of the least busy one's, if more) more than the least busy ready
        one; let the others accept at once. The least busy is never held back, and a held-back
        worker still takes a connection the others leave (Listeners.hold_back)."""
        live = [w for w in self.workers if w.ready and w.channel is not None]
        if not live:
            return
        low = min(w.clients for w in live)
        spread = max(ACCEPT_SPREAD, low // ACCEPT_SPREAD_FRACTION)
        for worker in live:
            held = worker.clients >= low + spread
            if held != worker.held_back:
                worker.held_back = held
                worker.channel.send({"op": "hold_back", "held": held})

    def _gather(self, requester: int, message: dict) -> None:
        gid = next(self.gather_ids)
        live = [w for w in self.workers
                if w.proc is not None and w.channel is not None and w.ready and w.index != requester]
        state = {"requester": requester, "id": message["id"], "answers": {}, "expected": {w.index for w in live}}
        self.gathers[gid] = state
        forward = dict(message["forward"], id=gid)  # {"op": "admin", ...} or {"op": "ask", ...}
        for worker in live:
            if not worker.channel.send(forward):
                state["expected"].discard(worker.index)
        gevent.spawn_later(GATHER_TIMEOUT, self._gather_done, gid)
        if not state["expected"]:
            self._gather_done(gid)

    def _gathered(self, index: int, message: dict) -> None:
        state = self.gathers.get(message.get("id"))
        if state is None:
            return
        state["answers"][str(index)] = message["answer"]
        state["expected"].discard(index)
        if not state["expected"]:
            self._gather_done(message["id"])

    def _worker_left_gathers(self, index: int) -> None:
        for gid, state in list(self.gathers.items()):
            state["expected"].discard(index)
            if not state["expected"]:
                self._gather_done(gid)

    def _gather_done(self, gid: int) -> None:
        state = self.gathers.pop(gid, None)
        if state is not None:
            self._tell(state["requester"], {"op": "reply", "id": state["id"], "answers": state["answers"]})

    # -- systemd -------------------------------------------------------------------------------

    def _tell_systemd(self, *fields: str) -> None:
        address = self.notify_socket
        if not address or not (address.startswith("/") or address.startswith("@")):
            return
        target = "\0" + address[1:] if address.startswith("@") else address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), target)
        except OSError as exc:
            log.warning("could not notify the service manager: %s", exc.strerror or exc)


def _version() -> str:
    from pgrelay import __version__
    return __version__


def run(relay, config_path: str | None, args: list[str], quiet: bool, started_fd) -> int:
    """`pgrelay` with workers > 1: the parent's life. `started_fd` is daemonize()'s pipe (or None)."""
    from pgrelay.errors import ConfigError
    supervisor = Supervisor(relay, config_path, args, quiet)
    try:
        supervisor.start()
    except (ConfigError, OSError) as exc:
        message = str(exc) if isinstance(exc, ConfigError) else (exc.strerror or str(exc))
        process.report_started(started_fd, f"pgrelay: error: {message}\n")
        if started_fd is None:
            print(f"pgrelay: error: {message}", file=sys.stderr)
        return 1
    process.report_started(started_fd)
    supervisor.install_signal_handlers()
    supervisor.serve_forever()
    return 0
