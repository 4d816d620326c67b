"""A fault-injection TCP proxy for tests: forwards real bytes, and on command stalls, delays,
throttles, drops, half-closes, resets, truncates, splits or blackholes them.

    proxy = FaultProxy("127.0.0.1", pg.port)      # listens on 127.0.0.1:proxy.port
    proxy.stall()                                  # every open and every new connection
    proxy.reset(new=False)                         # only the connections open now
    proxy.heal()                                   # back to forwarding
    proxy.close()

Each connection (a Link) is one daemon thread running a select loop over its two sockets; at most
BUFFER bytes wait in each direction (a side is not read while its buffer is full). A fault is
applied to open connections (`existing=True`) and/or to connections accepted later (`new=True`);
the call returns once every open connection's thread has taken the fault on, so after `stall()`
returns no further byte is forwarded. Directions: "up" is client to target, "down" target to
client; a side is "client" or "server" (the target).
"""

from __future__ import annotations

import collections
import select
import socket
import struct
import threading
import time

BUFFER = 65536  # bytes waiting per direction, at most
TICK = 0.02  # how often an idle link looks at its fault

NORMAL, STALL, DELAY, THROTTLE, DROP, HALF_CLOSE, RESET, TRUNCATE, SPLIT, BLACKHOLE = (
    "normal", "stall", "delay", "throttle", "drop", "half_close", "reset", "truncate", "split", "blackhole")


class Fault:
    """What a link does with its bytes: `kind`, its argument, and the direction it applies to."""

    def __init__(self, kind: str, arg=None, direction: str = "both", generation: int = 0):
        self.kind, self.arg, self.direction, self.generation = kind, arg, direction, generation

    def covers(self, direction: str) -> bool:
        return self.direction in ("both", direction)

    def __repr__(self) -> str:
        return f"Fault({self.kind!r}, {self.arg!r}, {self.direction!r})"


class _Pipe:
    """One direction of a link: bytes read from `src`, waiting to be written to `dst`."""

    def __init__(self, name: str, src: socket.socket, dst: socket.socket | None):
        self.name, self.src, self.dst = name, src, dst
        self.chunks: collections.deque[tuple[float, bytes]] = collections.deque()  # (arrival, bytes)
        self.size = 0
        self.eof = False  # src said EOF
        self.shut = False  # dst's write side is shut down
        self.discard = False  # bytes read from src are dropped (half_close, blackhole)
        self.tokens = 0.0
        self.refilled = time.monotonic()
        self.forwarded = 0
        self.sends = 0  # send() calls that wrote something

    def push(self, data: bytes) -> None:
        self.chunks.append((time.monotonic(), data))
        self.size += len(data)

    def ready(self, fault: Fault, now: float) -> int:
        """How many bytes may be written now under `fault` (0: none yet)."""
        if not self.chunks or self.shut:
            return 0
        covered = fault.covers(self.name)
        if covered and fault.kind in (STALL, BLACKHOLE):
            return 0
        arrival, first = self.chunks[0]
        if covered and fault.kind == DELAY and now < arrival + fault.arg:
            return 0
        n = len(first)
        if covered and fault.kind == SPLIT:
            n = 1
        elif covered and fault.kind == THROTTLE:
            rate = float(fault.arg)
            self.tokens = min(max(rate * 0.05, 1.0), self.tokens + (now - self.refilled) * rate)
            self.refilled = now
            n = min(n, int(self.tokens))
        return n

    def consume(self, n: int) -> None:
        arrival, first = self.chunks.popleft()
        if n < len(first):
            self.chunks.appendleft((arrival, first[n:]))
        self.size -= n
        self.forwarded += n
        self.sends += 1
        self.tokens = max(0.0, self.tokens - n)


class Link:
    """One proxied connection: a client's socket and, once connected, the target's."""

    def __init__(self, proxy: "FaultProxy", client: socket.socket, fault: Fault):
        self.proxy = proxy
        self.client = client
        self.server: socket.socket | None = None
        self.fault = fault
        self.applied = -1  # the generation of the fault the loop has taken on
        self.closed = threading.Event()
        self.ready = threading.Event()  # connected to the target (or never will be: drop, blackhole)
        self.how_closed = ""
        self.truncate_left: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"faultproxy-link-{client.fileno()}")

    # -- life -----------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            fault = self.fault
            if fault.kind in (DROP, RESET, BLACKHOLE):
                self.ready.set()
            if fault.kind == DROP:
                return self._close("drop")
            if fault.kind == RESET:
                return self._close("reset", rst=True)
            if fault.kind == BLACKHOLE:
                return self._blackhole()
            try:
                self.server = socket.create_connection((self.proxy.target_host, self.proxy.target_port), timeout=5)
            except OSError:
                return self._close("target unreachable")
            for sock in (self.client, self.server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.up = _Pipe("up", self.client, self.server)
            self.down = _Pipe("down", self.server, self.client)
            self.ready.set()
            self._loop()
        except OSError as exc:
            self._close(f"socket error: {exc}")
        finally:
            self._close("ended")

    def _blackhole(self) -> None:
        """Accepted, never read, never answered, until the proxy closes."""
        self.applied = self.fault.generation
        while not self.closed.is_set() and not self.proxy.closing:
            self.applied = self.fault.generation
            time.sleep(TICK)

    def _loop(self) -> None:
        pipes = (self.up, self.down)
        while not self.closed.is_set():
            fault = self.fault
            if self.applied != fault.generation:
                if not self._take_on(fault):
                    return
                self.applied = fault.generation
            now = time.monotonic()
            readers, writers = [], []
            for pipe in pipes:
                if not pipe.eof and (pipe.discard or (pipe.size < BUFFER and not self._holds(fault, pipe))):
                    readers.append(pipe.src)
                if pipe.ready(fault, now):
                    writers.append(pipe.dst)
            try:
                readable, writable, _ = select.select(readers, writers, [], TICK)
            except (OSError, ValueError):
                return
            for pipe in pipes:
                if pipe.src in readable:
                    try:
                        data = pipe.src.recv(BUFFER - pipe.size if not pipe.discard else BUFFER)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        pipe.eof = True
                    elif not pipe.discard:
                        pipe.push(data)
            fault = self.fault
            for pipe in pipes:
                if pipe.dst in writable:
                    n = pipe.ready(fault, time.monotonic())
                    if fault.kind == TRUNCATE and fault.covers(pipe.name) and self.truncate_left is not None:
                        n = min(n, self.truncate_left)
                    if n <= 0:
                        continue
                    try:
                        sent = pipe.dst.send(pipe.chunks[0][1][:n])
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return self._close("peer gone")
                    pipe.consume(sent)
                    if fault.kind == TRUNCATE and fault.covers(pipe.name) and self.truncate_left is not None:
                        self.truncate_left -= sent
                        if self.truncate_left <= 0:
                            return self._close("truncated")
            for pipe in pipes:
                if pipe.eof and not pipe.chunks and not pipe.shut:
                    _shut_write(pipe.dst)
                    pipe.shut = True
            if all(p.shut or p.discard for p in pipes) and all(p.eof for p in pipes):
                return self._close("both sides done")

    @staticmethod
    def _holds(fault: Fault, pipe: _Pipe) -> bool:
        """Bytes stay in the kernel (not read) while a stall holds this direction."""
        return fault.kind == STALL and fault.covers(pipe.name)

    def _take_on(self, fault: Fault) -> bool:
        """Apply the one-shot part of a new fault; False when the link is closed by it."""
        for pipe in (self.up, self.down):
            pipe.discard = pipe.discard and pipe.shut  # a healed blackhole forwards again
        if fault.kind == DROP:
            self._close("drop")
            return False
        if fault.kind == RESET:
            self._close("reset", rst=True)
            return False
        if fault.kind == TRUNCATE:
            self.truncate_left = int(fault.arg)
            if self.truncate_left <= 0:
                self._close("truncated")
                return False
        if fault.kind == BLACKHOLE:
            for pipe in (self.up, self.down):
                if fault.covers(pipe.name):
                    pipe.discard = True
                    pipe.chunks.clear()
                    pipe.size = 0
        if fault.kind == HALF_CLOSE:
            # side "server": the target's read side sees EOF (what the client sends is dropped);
            # side "client": the client's does (what the target sends is dropped).
            pipe = self.up if fault.arg == "server" else self.down
            _shut_write(pipe.dst)
            pipe.shut = pipe.discard = True
            pipe.chunks.clear()
            pipe.size = 0
        return True

    def _close(self, how: str, rst: bool = False) -> None:
        if self.closed.is_set():
            return
        self.how_closed = how
        for sock in (self.client, self.server):
            if sock is None:
                continue
            if rst:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            else:
                _shut_write(sock)
                _drain(sock)  # closing with unread bytes would send an RST instead of a clean close
            try:
                sock.close()
            except OSError:
                pass
        self.closed.set()

    def bytes_forwarded(self) -> tuple[int, int]:
        """(client to target, target to client) bytes written so far."""
        if self.server is None:
            return 0, 0
        return self.up.forwarded, self.down.forwarded


def _drain(sock: socket.socket, wait: float = 0.2) -> None:
    """Read and drop what the peer sends until its EOF (at most `wait` seconds), so that the close
    that follows is a clean one: bytes that arrive unread after our FIN would turn it into an RST
    (seen: the echo's reply to the last bytes of a truncate landed just after the drain)."""
    deadline = time.monotonic() + wait
    try:
        sock.setblocking(False)
        while True:
            try:
                if not sock.recv(BUFFER):
                    return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                select.select([sock], [], [], left)
    except OSError:
        pass


def _shut_write(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class FaultProxy:
    """A threaded TCP proxy on 127.0.0.1:`port` in front of target_host:target_port."""

    def __init__(self, target_host: str, target_port: int):
        self.target_host, self.target_port = target_host, target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.port = self.listener.getsockname()[1]
        self.links: list[Link] = []
        self.accepted = 0
        self.closing = False
        self._lock = threading.Lock()
        self._generation = 0
        self._new = Fault(NORMAL)
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy-accept")
        self._acceptor.start()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self.closing:
            try:
                readable, _, _ = select.select([self.listener], [], [], 0.1)
                if not readable:
                    continue
                client, _ = self.listener.accept()
            except (OSError, ValueError):
                if self.closing:
                    return
                continue
            with self._lock:
                link = Link(self, client, self._new)
                self.links = [lk for lk in self.links if not lk.closed.is_set()] + [link]
                self.accepted += 1
            link.thread.start()

    # -- faults ------------------------------------------------------------------------------

    def _apply(self, kind: str, arg=None, direction: str = "both", existing: bool = True, new: bool = True,
               timeout: float = 2.0) -> None:
        assert direction in ("both", "up", "down"), direction
        with self._lock:
            self._generation += 1
            fault = Fault(kind, arg, direction, self._generation)
            if new:
                self._new = fault
            links = [lk for lk in self.links if not lk.closed.is_set()] if existing else []
            for link in links:
                link.fault = fault
        deadline = time.monotonic() + timeout
        for link in links:
            while link.applied < fault.generation and not link.closed.is_set():
                if time.monotonic() > deadline:
                    raise AssertionError(f"link did not take on {fault} within {timeout}s")
                time.sleep(0.005)

    def stall(self, direction: str = "both", **which) -> None:
        """Stop forwarding (bytes stay unread in the kernel); sockets stay open."""
        self._apply(STALL, None, direction, **which)

    def delay(self, seconds: float, direction: str = "both", **which) -> None:
        """Forward every chunk `seconds` after it arrived."""
        self._apply(DELAY, float(seconds), direction, **which)

    def throttle(self, bytes_per_sec: int, direction: str = "both", **which) -> None:
        """Forward at most `bytes_per_sec` bytes a second in each direction."""
        self._apply(THROTTLE, int(bytes_per_sec), direction, **which)

    def drop(self, **which) -> None:
        """Close both sides cleanly (FIN); new connections are accepted and closed at once."""
        self._apply(DROP, **which)

    def half_close(self, side: str = "server", **which) -> None:
        """Shut down the write side toward `side` ("server" or "client"); the other way keeps flowing."""
        assert side in ("server", "client"), side
        self._apply(HALF_CLOSE, side, **which)

    def reset(self, **which) -> None:
        """Close both sides with SO_LINGER 0: each peer gets an RST."""
        self._apply(RESET, **which)

    def truncate(self, n: int, direction: str = "both", **which) -> None:
        """Forward `n` more bytes (in `direction`) on each connection, then close both sides cleanly."""
        self._apply(TRUNCATE, int(n), direction, **which)

    def split(self, direction: str = "both", **which) -> None:
        """Forward every byte as a separate 1-byte send (TCP_NODELAY is on)."""
        self._apply(SPLIT, None, direction, **which)

    def blackhole(self, **which) -> None:
        """New connections are accepted and never answered nor forwarded; open ones have what they
        send read and thrown away, and are sent nothing."""
        self._apply(BLACKHOLE, **which)

    def heal(self, **which) -> None:
        """Back to forwarding normally (bytes a blackhole threw away stay lost)."""
        self._apply(NORMAL, **which)

    # -- looking -----------------------------------------------------------------------------

    def open_links(self) -> list[Link]:
        with self._lock:
            return [lk for lk in self.links if not lk.closed.is_set()]

    def wait_links(self, n: int, timeout: float = 10) -> list[Link]:
        """Wait until at least `n` connections are open through the proxy (and connected to the target)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            links = [lk for lk in self.open_links() if lk.ready.is_set()]
            if len(links) >= n:
                return links
            time.sleep(0.01)
        raise AssertionError(f"{len(self.open_links())} of {n} connections open through the proxy")

    def close(self) -> None:
        """Stop listening and close every connection (cleanly)."""
        self.closing = True
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            links = list(self.links)
        for link in links:
            link._close("proxy closed")
        self._acceptor.join(2)
