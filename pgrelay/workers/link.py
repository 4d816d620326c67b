"""A worker's side of its channel to the parent: shared limits, cancels for other workers, console commands run everywhere.

The core sees it as ``relay.worker`` (None in a single process) and calls acquire/release around
counting a client or opening a server, count_clients when a client comes or goes (the parent
spreads new connections by it), forward_cancel for a key another worker owns, and run_admin for
console commands (pgrelay.workers.console says which). Messages from the parent ("room", "shed",
"hold_back", "cancel", "admin", "ask", "reload") are handled by one reader greenlet, each command
that may wait in a greenlet of its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from typing import TYPE_CHECKING

import gevent
from gevent.event import AsyncResult

from pgrelay.errors import ClientGone

from . import console
from .channel import Channel

if TYPE_CHECKING:
    from pgrelay.relay import Relay

log = logging.getLogger("pgrelay")

REQUEST_TIMEOUT = 10.0  # seconds the parent has to answer (it answers at once unless it is gone)
SHED_FOR = 2.0          # seconds a "shed" request stays valid while no idle server could be closed
RETRY_CAPPED = 0.5      # seconds a pool refused room waits before it asks again (if no "room" came)


def parse_env(value: str) -> tuple[int, int, int]:
    """PGRELAY_WORKER's "index/count/channel fd"."""
    index, count, fd = (int(part) for part in value.split("/"))
    return index, count, fd


class WorkerLink:
    """This worker's index among `count`, and its channel to the parent."""

    def __init__(self, index: int, count: int, channel: Channel):
        self.index = index
        self.count = count
        self.channel = channel
        self.relay: "Relay | None" = None
        self.pending: dict[int, AsyncResult] = {}
        self.ids = itertools.count(1)
        self.shedding: dict[str, float] = {}  # key -> until when a server holding it is given up when released
        self.reader = None
        # What other workers may ask of this one (ask_others): name -> function returning JSON-ready
        # data; plugins add theirs (the metrics plugin: "metrics", its exposition text).
        self.answerers: dict[str, object] = {}

    @classmethod
    def from_env(cls, value: str) -> "WorkerLink":
        index, count, fd = parse_env(value)
        return cls(index, count, Channel.from_fd(fd))

    def start(self, relay: "Relay") -> None:
        self.relay = relay
        self.reader = gevent.spawn(self._read)
        self.channel.send({"op": "ready", "pid": os.getpid()})

    # -- what the core asks --------------------------------------------------------------------

    def request(self, message: dict) -> dict | None:
        """Send a request and wait for its reply (None if the parent did not answer)."""
        number = next(self.ids)
        message["id"] = number
        result = self.pending[number] = AsyncResult()
        try:
            if not self.channel.send(message):
                return None
            return result.get(timeout=REQUEST_TIMEOUT)
        except gevent.Timeout:
            log.error("worker %d: the parent did not answer a %s request", self.index, message["op"])
            return None
        finally:
            self.pending.pop(number, None)

    def acquire(self, items: list[tuple[str, int]], shed: bool = False) -> str | None:
        """Count one of each key for this worker, pgrelay-wide; None when granted, else the key
        whose maximum is reached (or "parent" when the parent is unreachable)."""
        if not items:
            return None
        reply = self.request({"op": "acquire", "items": items, "shed": shed})
        if reply is None:
            return "parent"
        return reply.get("refused")

    def release(self, keys) -> None:
        if keys:
            self.channel.send({"op": "release", "keys": list(keys)})

    def count_clients(self, count: int) -> None:
        """This worker now has `count` clients: the parent holds back the busier workers' accepts."""
        held = self.relay is not None and self.relay.listeners.held_back
        self.channel.send({"op": "clients", "count": count, "held": held})

    def forward_cancel(self, key: bytes, owner: int) -> None:
        self.channel.send({"op": "cancel", "key": key.hex(), "owner": owner})

    def gather(self, forward: dict) -> dict[int, dict] | None:
        """Send `forward` to every other worker (through the parent) and collect their answers by
        worker index; None if the parent did not answer. A worker that dies meanwhile is left out."""
        reply = self.request({"op": "gather", "forward": forward})
        if reply is None:
            return None
        return {int(index): answer for index, answer in reply["answers"].items()}

    def ask_others(self, what: str) -> dict[int, object]:
        """What every other worker's answerer for `what` returns (see `answerers`), by worker index."""
        answers = self.gather({"op": "ask", "what": what}) or {}
        return {index: answer["result"] for index, answer in answers.items() if "result" in answer}

    @staticmethod
    def gathers(name: str) -> bool:
        return console.gathered(name)

    def run_admin(self, name: str, sql: str, user: str, is_admin: bool, here):
        """Run a console command in the other workers (through the parent), then here (`here()`,
        with the console's own client, so that its notices and the order of its reply are as in
        one process: SHUTDOWN stops this worker after the reply), and merge the answers
        (pgrelay.workers.console)."""
        from pgrelay.admin.commands import AdminError
        answers = self.gather({"op": "admin", "sql": sql, "user": user, "is_admin": is_admin})
        if answers is None:
            raise AdminError("the workers' parent did not answer", "58000")
        try:
            answers[self.index] = {"result": console.encode(here())}
        except AdminError as exc:
            answers[self.index] = {"error": {"message": exc.message, "sqlstate": exc.sqlstate}}
        return console.merge(name, sorted(answers.items()))

    def take_shed(self, keys) -> bool:
        """Whether a server holding `keys`, just released, is to be closed because another worker
        waits for room under one of them (one shed request, one server)."""
        if not self.shedding:
            return False
        now = time.monotonic()
        for key in keys:
            until = self.shedding.get(key)
            if until is not None:
                del self.shedding[key]
                if until > now:
                    return True
        return False

    # -- what the parent tells -----------------------------------------------------------------

    def _read(self) -> None:
        try:
            while True:
                message = self.channel.receive()
                op = message.get("op")
                if op == "reply":
                    waiter = self.pending.get(message.get("id"))
                    if waiter is not None:
                        waiter.set(message)
                elif op == "room":
                    self._room(message["key"])
                elif op == "shed":
                    self._shed(message["key"])
                elif op == "hold_back":
                    self.relay.listeners.hold_back(bool(message["held"]))
                elif op == "cancel":
                    self.relay.cancel(bytes.fromhex(message["key"]))
                elif op == "admin":
                    gevent.spawn(self._admin, message)
                elif op == "ask":
                    gevent.spawn(self._ask, message)
                elif op == "reload":
                    gevent.spawn(self._reload, message)
        except ClientGone:
            pass
        except Exception as exc:  # a bug here must not leave the worker running unsupervised
            self.relay.internal_error(exc, "worker channel", "worker channel failed")
        if not self.relay.shutdown_requested:
            log.error("worker %d: lost the channel to the parent; shutting down", self.index)
            self.relay.shutdown("fast")

    def _room(self, key: str) -> None:
        for pool in list(self.relay.pools.values()):
            if pool.capped and key in pool.shared_keys():
                pool.capped = 0.0
                pool.launch_if_needed()

    def _shed(self, key: str) -> None:
        """Another worker waits for room under `key`: close an idle server holding it now, else the
        next one released within SHED_FOR."""
        for pool in self.relay.pools.values():
            for server in pool.used + pool.idle:
                if key in server.shared:
                    server.close("released for another worker")
                    return
        self.shedding[key] = time.monotonic() + SHED_FOR

    def _admin(self, message: dict) -> None:
        from pgrelay.admin.commands import AdminError
        try:
            from pgrelay.admin.console import Console
            state = self.relay.plugin_data.get("admin")
            if state is None:
                raise AdminError("the admin console is disabled in this worker")
            result = Console.run_here(self.relay, state.table, message["sql"], message["user"], message["is_admin"])
            answer = {"result": console.encode(result)}
        except AdminError as exc:
            answer = {"error": {"message": exc.message, "sqlstate": exc.sqlstate}}
        except Exception as exc:
            self.relay.internal_error(exc, "admin", "admin command failed in a worker")
            answer = {"error": {"message": "internal error", "sqlstate": "XX000"}}
        self.channel.send({"op": "admin_result", "id": message["id"], "answer": answer})

    def _ask(self, message: dict) -> None:
        answerer = self.answerers.get(message.get("what"))
        try:
            answer = {"result": answerer()} if answerer is not None else {"error": {"message": "nothing to answer"}}
        except Exception as exc:
            self.relay.internal_error(exc, "worker channel", f"answering {message.get('what')!r} failed")
            answer = {"error": {"message": "internal error"}}
        self.channel.send({"op": "admin_result", "id": message["id"], "answer": answer})

    def _reload(self, message: dict) -> None:
        ok = self.relay.reload()
        self.channel.send({"op": "reloaded", "id": message.get("id"), "ok": bool(ok)})
