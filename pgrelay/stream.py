"""A non-blocking socket with its libev watchers, read by greenlets during login phases.

The relay phase does not use these blocking helpers: client.py and server.py start the
watchers with callbacks of their own. An idle client therefore holds no greenlet, only
this object, its socket and two watchers.
"""

from __future__ import annotations

import socket
import ssl

from gevent import get_hub
from gevent.hub import Waiter

from . import protocol
from .errors import ClientGone, ProtocolViolation

RECV_SIZE = 65536
# What a non-blocking recv/send raises when it would block, with or without TLS.
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Stream:
    """One socket. `rbuf` holds bytes read ahead during login, replayed into the relay."""

    __slots__ = ("sock", "rw", "ww", "rbuf", "closed")

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        loop = get_hub().loop
        fd = sock.fileno()
        self.rw = loop.io(fd, 1)
        self.ww = loop.io(fd, 2)
        self.rbuf = b""
        self.closed = False

    # -- greenlet-blocking helpers (login phases only) ------------------------------

    def _wait(self, watcher) -> None:
        get_hub().wait(watcher)

    def recv_some(self) -> bytes:
        """At least one byte, waiting as needed; raises ClientGone on EOF or error."""
        if self.rbuf:
            data, self.rbuf = self.rbuf, b""
            return data
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                self._wait(self.rw)
                continue
            except ssl.SSLWantWriteError:
                self._wait(self.ww)
                continue
            except OSError as exc:
                raise ClientGone(f"read failed: {exc.strerror or exc}") from None
            if not data:
                raise ClientGone("unexpected eof")
            return data

    def read_exact(self, n: int) -> bytes:
        buf = self.rbuf
        while len(buf) < n:
            self.rbuf = b""
            buf += self.recv_some()
        self.rbuf = buf[n:]
        return buf[:n]

    def read_message(self, max_length: int = protocol.MAX_MESSAGE_LENGTH) -> tuple[int, bytes]:
        """One typed message as (type byte, body). Lengths outside 4..max_length are violations."""
        header = self.read_exact(5)
        length = protocol.unpack_i32(header, 1)[0]
        if length < 4 or length > max_length:
            raise ProtocolViolation(f"invalid message length {length} for message type {chr(header[0])!r}")
        return header[0], self.read_exact(length - 4)

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._wait(self.ww)
                continue
            except ssl.SSLWantReadError:
                self._wait(self.rw)
                continue
            except OSError as exc:
                raise ClientGone(f"write failed: {exc.strerror or exc}") from None
            view = view[sent:]

    def peek_byte(self) -> int:
        """The next byte without consuming it; waits as needed."""
        if self.rbuf:
            return self.rbuf[0]
        if self.tls:  # MSG_PEEK would see ciphertext: read through TLS into rbuf instead
            self.rbuf = self.recv_some()
            return self.rbuf[0]
        while True:
            try:
                data = self.sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                self._wait(self.rw)
                continue
            except OSError as exc:
                raise ClientGone(f"read failed: {exc.strerror or exc}") from None
            if not data:
                raise ClientGone("unexpected eof")
            return data[0]

    def start_tls(self, context: ssl.SSLContext, server_side: bool, server_hostname: str | None = None) -> None:
        """Wrap the socket in TLS and complete the handshake (greenlet only).

        Bytes already read ahead would be plaintext from before the handshake: refusing them is
        the CVE-2021-3935 fix, so the caller must check `rbuf` is empty first.
        """
        from .tls import handshake
        assert not self.rbuf, "plaintext read ahead before TLS"
        self.sock = context.wrap_socket(self.sock, server_side=server_side, do_handshake_on_connect=False,
                                        server_hostname=server_hostname)
        try:
            handshake(self.sock, self.rw, self.ww)
        except ssl.SSLCertVerificationError as exc:
            raise ClientGone(f"TLS handshake failed: certificate verify failed: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise ClientGone(f"TLS handshake failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ClientGone(f"TLS handshake failed: {exc.strerror or exc}") from None

    @property
    def tls(self) -> bool:
        return isinstance(self.sock, ssl.SSLSocket)

    def try_send(self, data: bytes) -> None:
        """Best-effort write that never waits: for final error messages before a close."""
        try:
            self.sock.send(data)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket, first waking with ClientGone any greenlet blocked on it."""
        if self.closed:
            return
        self.closed = True
        blocked = []
        for watcher in (self.rw, self.ww):
            if watcher.active and isinstance(getattr(watcher.callback, "__self__", None), Waiter):
                blocked.append(watcher)
            else:
                watcher.stop()
                watcher.close()
        if blocked:
            get_hub().cancel_waits_close_and_then(blocked, ClientGone("connection closed"), self._close_socket)
        else:
            self._close_socket()

    def _close_socket(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            try:
                self.sock.unwrap()  # sends close_notify; the peer's reply is not awaited
            except (OSError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass
