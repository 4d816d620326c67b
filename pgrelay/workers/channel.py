"""The channel between the parent and one worker: JSON messages, each behind a 4-byte length, on a Unix socket pair."""

from __future__ import annotations

import json
import struct

from gevent import socket

from pgrelay.errors import ClientGone

MAX_MESSAGE = 64 << 20  # a SHOW answer of a large pgrelay fits; anything longer is a broken peer
_LENGTH = struct.Struct("!I")


class Channel:
    """One end of the pair. send() may be called from any greenlet (sendall is atomic per message in
    gevent: one greenlet writes at a time); receive() from one reader greenlet only."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = bytearray()
        self.closed = False

    @classmethod
    def from_fd(cls, fd: int) -> "Channel":
        return cls(socket.socket(fileno=fd))

    def send(self, message: dict) -> bool:
        """Send one message; False if the other end is gone."""
        if self.closed:
            return False
        body = json.dumps(message, separators=(",", ":")).encode()
        try:
            self.sock.sendall(_LENGTH.pack(len(body)) + body)
            return True
        except OSError:
            self.close()
            return False

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
