"""What client and server connections share: non-blocking writes whose backlog pauses the other side.

The rule for every buffer of output: while a connection's `out` holds bytes, whoever feeds it (the
other side of the link) does not read. `write` and `backlog` apply it; the relay loop inlines its
own first send for speed (client.py `_forward`, server.py `_relay`) and applies it the same way.
A server is only released or handed over once both `out`s are empty (server.py `release_if_done`),
so a pause never outlives the link that made it.
"""

from __future__ import annotations

from .stream import WOULD_BLOCK


class Peer:
    """Base of ClientConnection and ServerConnection; subclasses hold the slots used here."""

    __slots__ = ()

    def write(self, data: bytes, source=None) -> None:
        """Send without waiting; what does not fit is kept and `source` stops reading until it drains."""
        if self.out is not None:
            self.out += data
            if source is not None and self.paused is None:
                self.pause(source)
            return
        try:
            sent = self.sock.send(data)
        except WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            self.write_failed(exc)
            return
        if sent != len(data):
            self.backlog(data[sent:], source)

    def backlog(self, rest: bytes, source) -> None:
        """Our socket is full: keep `rest` and pause `source` (the other side) until it drains."""
        self.out = bytearray(rest)
        if source is not None:
            self.pause(source)
        self.stream.ww.start(self._on_writable)

    def pause(self, source) -> None:
        """`source` feeds our non-empty `out`: it stops reading until `out` drains."""
        source.stop_reading()
        self.paused = source
        source.paused_by = self

    def _on_writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except WOULD_BLOCK:
            return
        except OSError as exc:
            self.write_failed(exc)
            return
        del self.out[:sent]
        if self.out:
            return
        self.out = None
        self.stream.ww.stop()
        source, self.paused = self.paused, None
        if source is not None:
            source.paused_by = None
            source.start_reading()
        self.flushed()

    def flushed(self) -> None:
        """`out` has just drained: a server may now be releasable."""

    def write_failed(self, exc: OSError) -> None:
        raise NotImplementedError
