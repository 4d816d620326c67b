"""Maximum flow with unbounded capacities (Dinic's algorithm), and the minimum cut that explains its value.

The budget is a flow problem: connections leave a database's cap, pass through pools, and reach
a user's cap; the most that can flow is the most server connections the caps and pool sizes allow,
and the saturated edges of a minimum cut are the limits that bound it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Hashable

INF = math.inf


class Network:
    """A directed graph of capacities; `math.inf` means no limit. Edges carry a tag for the cut."""

    def __init__(self) -> None:
        self.index: dict[Hashable, int] = {}
        self.adj: list[list[int]] = []
        # Parallel lists per edge (edge i ^ 1 is its reverse): head, capacity, flow, tag.
        self.head: list[int] = []
        self.cap: list[float] = []
        self.flow: list[float] = []
        self.tags: list[Any] = []
        self.source_side: set[int] = set()

    def node(self, name: Hashable) -> int:
        number = self.index.get(name)
        if number is None:
            number = self.index[name] = len(self.adj)
            self.adj.append([])
        return number

    def add(self, u: Hashable, v: Hashable, capacity: float, tag: Any = None) -> None:
        if capacity < 0:
            raise ValueError(f"negative capacity {capacity}")
        a, b = self.node(u), self.node(v)
        e = len(self.head)  # forward edges have even numbers, their reverses the next odd one
        self.head += [b, a]
        self.cap += [float(capacity), 0.0]
        self.flow += [0.0, 0.0]
        self.tags += [tag, None]
        self.adj[a].append(e)
        self.adj[b].append(e + 1)

    def max_flow(self, source: Hashable, sink: Hashable) -> float:
        """The most that can flow; INF if a path of unlimited edges joins source and sink."""
        s, t = self.node(source), self.node(sink)
        if self._reaches(s, t, lambda e: self.cap[e] == INF):
            self.source_side = set()
            return INF
        finite = sum(c for c in self.cap if c != INF)
        big = finite + 1  # no cut can be that large, so an unlimited edge never binds
        cap = [big if c == INF else c for c in self.cap]
        total = 0.0
        while True:
            level = self._levels(s, cap)
            if level[t] < 0:
                break
            pointer = [0] * len(self.adj)
            while True:
                pushed = self._push(s, t, INF, level, pointer, cap)
                if not pushed:
                    break
                total += pushed
        self.source_side = self._reached(s, lambda e: cap[e] - self.flow[e] > 0)
        return total

    def cut(self) -> list[Any]:
        """Tags of the edges a minimum cut crosses (after max_flow): the limits that bind."""
        out = []
        for u in self.source_side:
            for e in self.adj[u]:
                if e % 2 == 0 and self.head[e] not in self.source_side:
                    out.append(self.tags[e])
        return out

    # -- internals -----------------------------------------------------------------------------

    def _reached(self, s: int, usable) -> set[int]:
        seen = {s}
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.adj[u]:
                v = self.head[e]
                if v not in seen and usable(e):
                    seen.add(v)
                    queue.append(v)
        return seen

    def _reaches(self, s: int, t: int, usable) -> bool:
        return t in self._reached(s, usable)

    def _levels(self, s: int, cap: list[float]) -> list[int]:
        level = [-1] * len(self.adj)
        level[s] = 0
        queue = deque([s])
        while queue:
            u = queue.popleft()
            for e in self.adj[u]:
                v = self.head[e]
                if level[v] < 0 and cap[e] - self.flow[e] > 0:
                    level[v] = level[u] + 1
                    queue.append(v)
        return level

    def _push(self, u: int, t: int, limit: float, level: list[int], pointer: list[int], cap: list[float]) -> float:
        if u == t:
            return limit
        edges = self.adj[u]
        while pointer[u] < len(edges):
            e = edges[pointer[u]]
            v = self.head[e]
            room = cap[e] - self.flow[e]
            if room > 0 and level[v] == level[u] + 1:
                pushed = self._push(v, t, min(limit, room), level, pointer, cap)
                if pushed:
                    self.flow[e] += pushed
                    self.flow[e ^ 1] -= pushed
                    return pushed
            pointer[u] += 1
        return 0.0
