"""What client and server connections share: non-blocking writes whose backlog pauses the other side.

The relay loop inlines its own first send for speed (client.py `_handle`, server.py `_relay`);
everything that does not fit goes through `backlog` here.
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
            source.stop_reading()
            self.paused = source
            source.paused_by = self
        self.stream.ww.start(self._on_writable)

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

    def write_failed(self, exc: OSError) -> None:
        raise NotImplementedError
