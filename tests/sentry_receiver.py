"""Test support: a real Sentry envelope receiver on loopback, and endpoints that are down or never answer.

The receiver is an HTTP server in a thread that takes what sentry-sdk posts to
``http://KEY@127.0.0.1:PORT/1`` (``POST /api/1/envelope/``), undoes the Content-Encoding the SDK
used (gzip, or brotli when the Brotli module is installed), and keeps both the raw decoded bytes
(for asserting that no secret appears anywhere in what was sent) and the parsed envelope items.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Envelope:
    path: str
    headers: dict               # HTTP headers of the request
    raw: bytes                  # the envelope as sent, decompressed
    envelope_headers: dict
    items: list[tuple[dict, bytes]] = field(default_factory=list)

    def events(self) -> list[dict]:
        return [json.loads(payload) for header, payload in self.items if header.get("type") == "event"]


def decode_body(body: bytes, encoding: str) -> bytes:
    encoding = (encoding or "").strip().lower()
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    if encoding == "br":
        import brotli  # only sent when the SDK found the module, so it is installed
        return brotli.decompress(body)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"unknown Content-Encoding {encoding!r}")


def parse_envelope(data: bytes) -> tuple[dict, list[tuple[dict, bytes]]]:
    """Sentry's envelope format: a JSON header line, then items (a JSON header line and a payload of
    `length` bytes, or up to the next newline when the header has no length)."""
    newline = data.index(b"\n") if b"\n" in data else len(data)
    headers = json.loads(data[:newline] or b"{}")
    pos = newline + 1
    items = []
    while pos < len(data):
        end = data.find(b"\n", pos)
        end = len(data) if end < 0 else end
        line = data[pos:end]
        pos = end + 1
        if not line.strip():
            continue
        item_header = json.loads(line)
        length = item_header.get("length")
        if length is None:
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end
            payload = data[pos:end]
            pos = end + 1
        else:
            payload = data[pos:pos + length]
            pos += length + 1
        items.append((item_header, payload))
    return headers, items


class SentryReceiver:
    """``with SentryReceiver() as sentry:`` ... ``sentry.dsn`` ... ``sentry.wait_for_events(...)``."""

    def __init__(self, key: str = "publickey", project: str = "1", port: int = 0):
        self.key = key
        self.project = project
        self.envelopes: list[Envelope] = []
        self.requests: list[str] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                receiver._received(self.path, dict(self.headers), body)
                reply = b'{"id": "accepted"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="sentry-receiver", daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://{self.key}@127.0.0.1:{self.port}/{self.project}"

    def __enter__(self) -> "SentryReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _received(self, path: str, headers: dict, body: bytes) -> None:
        raw = decode_body(body, headers.get("Content-Encoding", ""))
        if path.rstrip("/").endswith("/envelope"):
            envelope_headers, items = parse_envelope(raw)
        else:  # the old /store/ endpoint: one event as JSON
            envelope_headers, items = {}, [({"type": "event"}, raw)]
        with self._cond:
            self.requests.append(path)
            self.envelopes.append(Envelope(path, headers, raw, envelope_headers, items))
            self._cond.notify_all()

    # -- what arrived ------------------------------------------------------------------------------

    def events(self) -> list[dict]:
        with self._cond:
            return [event for envelope in self.envelopes for event in envelope.events()]

    def raw(self) -> bytes:
        """Every byte received so far (decoded), for secret checks."""
        with self._cond:
            return b"\n".join(envelope.raw for envelope in self.envelopes)

    def wait_for_events(self, predicate=lambda event: True, count: int = 1, timeout: float = 15,
                        sleep=time.sleep) -> list[dict]:
        """Wait until `count` events matching `predicate` arrived; returns the matching events.
        In-process tests pass ``sleep=gevent.sleep`` so that the relay's greenlets run meanwhile."""
        deadline = time.monotonic() + timeout
        while True:
            found = [event for event in self.events() if predicate(event)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                seen = [(e.get("message") or e.get("logentry", {}).get("message"), e.get("tags"))
                        for e in self.events()]
                raise AssertionError(f"timed out after {timeout}s waiting for {count} matching Sentry "
                                     f"event(s); received: {seen}")
            sleep(0.02)


class Blackhole:
    """A TCP endpoint that accepts connections and reads requests but never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        self.received = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="sentry-blackhole", daemon=True)

    @property
    def dsn(self) -> str:
        return f"http://publickey@127.0.0.1:{self.port}/1"

    def __enter__(self) -> "Blackhole":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self.sock.close()
        for conn in self.accepted:
            conn.close()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                self._drain()
                continue
            except OSError:
                return
            conn.setblocking(False)
            self.accepted.append(conn)
            self._drain()

    def _drain(self) -> None:
        for conn in self.accepted:
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    self.received += len(data)
            except (BlockingIOError, OSError):
                pass


def refused_dsn() -> str:
    """A DSN whose port has nothing listening: every send is refused at once."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://publickey@127.0.0.1:{port}/1"
