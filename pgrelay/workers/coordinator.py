"""The parent's counts behind every limit, for all workers together: grants, releases, and who waits for room.

A worker asks before it counts a client against a limit or opens a server: acquire(worker,
[(key, maximum), ...]) grants all of the keys or none, so no key's count ever passes its
maximum, whichever worker asks. Keys are strings the workers derive from the same configuration
(a pool, a database's max_db_connections, max_client_conn ...); each request carries the maximum
it is checked against, as the asking worker's configuration has it. A refused server request is
remembered: if the worker holding most of the key holds at least two more than the asking one, the
coordinator asks it to give one up (close an idle server or the next one released: "shed"), so
that busy workers end up with even shares rather than trading servers back and forth. A release
under a key that workers wait for (refused within WAITING_FOR seconds) is held for the waiting
worker with the fewest, for RESERVE_FOR seconds so the releasing worker cannot take it straight
back, and that worker hears "room". A worker that dies gives back everything it held.
"""

from __future__ import annotations

import collections
import time
from typing import Callable

RESERVE_FOR = 1.0  # seconds a released count is held for the waiting worker it was offered to
# Seconds a refusal keeps a worker waiting for room: a pool whose clients still wait asks again at
# least this often (the janitor's tick, pgrelay.janitor), one that no longer needs room stops asking.
WAITING_FOR = 2.0


class Coordinator:
    """Counts by key, and by worker (so that a dead worker's share is given back)."""

    def __init__(self, tell: Callable[[int, dict], None]):
        self.tell = tell  # tell(worker index, message): send a message to a worker
        self.counts: collections.Counter[str] = collections.Counter()
        self.held: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.waiting: dict[str, dict[int, float]] = {}  # key -> {worker refused room: when}
        self.reserved: dict[str, dict[int, float]] = {}  # key -> {worker offered a released count: until}
        self.refusals = 0
        self.grants = 0
        self.sheds = 0
        self.clock = time.monotonic

    def acquire(self, worker: int, items: list, shed: bool = False) -> str | None:
        """Count one of each key for `worker` if every key is below its maximum (0: no limit).
        Counts held for other workers (see `_room`) are taken as used. Returns None when granted,
        else the first key at its maximum; with `shed`, a worker holding at least two more of it
        is asked to give one up, and `worker` is offered the next one released ("room")."""
        for key, maximum in items:
            if maximum and self.counts[key] + self._held_for_others(key, worker) >= maximum:
                self.refusals += 1
                if shed:
                    self.waiting.setdefault(key, {})[worker] = self.clock()
                    holder = self._largest_holder(key, worker)
                    if holder is not None:
                        self.sheds += 1
                        self.tell(holder, {"op": "shed", "key": key})
                return key
        for key, _ in items:
            self.counts[key] += 1
            self.held[worker][key] += 1
            offers = self.reserved.get(key)
            if offers and offers.pop(worker, None) is not None and not offers:
                del self.reserved[key]
        self.grants += 1
        return None

    def _held_for_others(self, key: str, worker: int) -> int:
        """How many released counts of `key` are still offered to workers other than `worker`."""
        offers = self.reserved.get(key)
        if not offers:
            return 0
        now = self.clock()
        for other in [other for other, until in offers.items() if until <= now]:
            del offers[other]
        if not offers:
            del self.reserved[key]
            return 0
        return len(offers) - (worker in offers)

    def release(self, worker: int, keys: list[str]) -> None:
        held = self.held.get(worker)
        for key in keys:
            if held is None or held[key] <= 0:
                continue  # never granted to this worker (or given back already): counts stay right
            held[key] -= 1
            if not held[key]:
                del held[key]
            self.counts[key] -= 1
            if self.counts[key] <= 0:
                del self.counts[key]
            self._room(key)

    def worker_gone(self, worker: int) -> None:
        """Give back everything a dead worker held."""
        held = self.held.pop(worker, collections.Counter())
        for waiters in self.waiting.values():
            waiters.pop(worker, None)
        for key in list(self.reserved):
            self.reserved[key].pop(worker, None)
            if not self.reserved[key]:
                del self.reserved[key]
        for key, number in held.items():
            self.counts[key] -= number
            if self.counts[key] <= 0:
                del self.counts[key]
            for _ in range(number):
                self._room(key)

    def _room(self, key: str) -> None:
        """A count of `key` was given back: offer it to the waiting worker holding the fewest, and
        hold it for that worker for RESERVE_FOR seconds (one offer per worker at a time)."""
        waiters = self.waiting.get(key)
        if not waiters:
            return
        now = self.clock()
        for worker in [worker for worker, since in waiters.items() if now - since > WAITING_FOR]:
            del waiters[worker]  # it stopped asking: its clients no longer wait
        offers = self.reserved.get(key, {})
        candidates = [worker for worker in waiters if worker not in offers]
        if not candidates:
            if not waiters:
                del self.waiting[key]
            return
        chosen = min(candidates, key=lambda worker: (self.held.get(worker, {}).get(key, 0), worker))
        del waiters[chosen]
        if not waiters:
            del self.waiting[key]
        self.reserved.setdefault(key, {})[chosen] = now + RESERVE_FOR
        self.tell(chosen, {"op": "room", "key": key})

    def _largest_holder(self, key: str, asking: int) -> int | None:
        """The worker to give up a count of `key` for `asking`: the one holding the most, if that is
        at least two more than `asking` holds (an even split is left alone)."""
        best, best_count = None, self.held.get(asking, {}).get(key, 0) + 1
        for worker, held in self.held.items():
            if worker != asking and held.get(key, 0) > best_count:
                best, best_count = worker, held[key]
        return best
