"""The channel between the parent and one worker: JSON messages, each behind a 4-byte length, on a Unix socket pair."""

from __future__ import annotations

import json
import struct

import gevent
from gevent import socket

from pgrelay.errors import ClientGone

MAX_MESSAGE = 64 << 20  # a SHOW answer of a large pgrelay fits; anything longer is a broken peer
MAX_QUEUED = 64 << 20   # unsent bytes; beyond them the other end is taken for stuck and the channel closed
_LENGTH = struct.Struct("!I")


class Channel:
    """One end of the pair. send() never blocks, so it may be called from a libev callback (a
    client's disconnect releases its limits there) as well as from any greenlet: messages are
    queued in order and written by one writer greenlet. receive() is for one reader greenlet only."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.outq = bytearray()
        self.writer = None
        self.closed = False

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def send(self, message: dict) -> bool:
        """Queue one message for the writer; False if the other end is gone (or stuck)."""
        if self.closed:
            return False
        body = json.dumps(message, separators=(",", ":")).encode()
        self.outq += _LENGTH.pack(len(body))
        self.outq += body
        if len(self.outq) > MAX_QUEUED:
            self.close()
            return False
        if self.writer is None:
            self.writer = gevent.spawn(self._write)
        return True

    def _write(self) -> None:
        try:
            while self.outq and not self.closed:
                data, self.outq = self.outq, bytearray()
                self.sock.sendall(data)
        except OSError:
            self.close()
        finally:
            self.writer = None

    def receive(self) -> dict:
        """The next message; ClientGone when the other end closed (or sent something malformed)."""
        while True:
            if len(self.buffer) >= 4:
                (length,) = _LENGTH.unpack_from(self.buffer)
                if length > MAX_MESSAGE:
                    self.close()
                    raise ClientGone("channel message too long")
                if len(self.buffer) >= 4 + length:
                    body = bytes(self.buffer[4:4 + length])
                    del self.buffer[:4 + length]
                    try:
                        return json.loads(body)
                    except ValueError:
                        self.close()
                        raise ClientGone("malformed channel message") from None
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                self.close()
                raise ClientGone("channel closed")
            self.buffer += chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass
