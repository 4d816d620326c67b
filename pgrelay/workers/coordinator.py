"""The parent's counts behind every limit, for all workers together: grants, releases, and who waits for room.

A worker asks before it counts a client against a limit or opens a server: acquire(worker,
[(key, maximum), ...]) grants all of the keys or none, so no key's count ever passes its
maximum, whichever worker asks. Keys are strings the workers derive from the same configuration
(a pool, a database's max_db_connections, max_client_conn ...); each request carries the maximum
it is checked against, as the asking worker's configuration has it. A refused server request is
remembered: the coordinator asks the worker holding most of the key to give one up (close an idle
server or the next one released: "shed"), and tells the waiting worker when a release makes room
("room"). A worker that dies gives back everything it held.
"""

from __future__ import annotations

import collections
from typing import Callable


class Coordinator:
    """Counts by key, and by worker (so that a dead worker's share is given back)."""

    def __init__(self, tell: Callable[[int, dict], None]):
        self.tell = tell  # tell(worker index, message): send a message to a worker
        self.counts: collections.Counter[str] = collections.Counter()
        self.held: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.waiting: dict[str, set[int]] = collections.defaultdict(set)  # key -> workers refused room
        self.refusals = 0
        self.grants = 0

    def acquire(self, worker: int, items: list, shed: bool = False) -> str | None:
        """Count one of each key for `worker` if every key is below its maximum (0: no limit).
        Returns None when granted, else the first key at its maximum; with `shed`, the worker holding
        most of it is asked to give one up, and `worker` hears "room" when any is released."""
        for key, maximum in items:
            if maximum and self.counts[key] >= maximum:
                self.refusals += 1
                if shed:
                    self.waiting[key].add(worker)
                    holder = self._largest_holder(key, worker)
                    if holder is not None:
                        self.tell(holder, {"op": "shed", "key": key})
                return key
        for key, _ in items:
            self.counts[key] += 1
            self.held[worker][key] += 1
        self.grants += 1
        return None

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
            waiters.discard(worker)
        for key, number in held.items():
            self.counts[key] -= number
            if self.counts[key] <= 0:
                del self.counts[key]
            self._room(key)

    def _room(self, key: str) -> None:
        waiters = self.waiting.pop(key, None)
        for worker in waiters or ():
            self.tell(worker, {"op": "room", "key": key})

    def _largest_holder(self, key: str, asking: int) -> int | None:
        best, best_count = None, 0
        for worker, held in self.held.items():
            if worker != asking and held.get(key, 0) > best_count:
                best, best_count = worker, held[key]
        return best
