"""Real SCRAM-SHA-256 exchanges against an in-process Relay whose auth_file holds a plaintext password:
the verifier is derived once, not per login attempt, and a reload with a new password takes effect
(issue 7, item 7). PBKDF2 runs are counted through pgrelay.auth's reference to hashlib."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import socket
import struct

import pytest
from gevent import socket as gsocket

import pgrelay.auth as auth
from pgrelay import Listener
from pgrelay.relay import Relay

from ..support import message, startup_packet

REAL_PBKDF2 = hashlib.pbkdf2_hmac


class CountingHashlib:
    """pgrelay.auth's view of hashlib, counting PBKDF2 runs (the test's own client uses the real one)."""

    def __init__(self):
        self.pbkdf2_calls = 0

    def pbkdf2_hmac(self, *args, **kwargs):
        self.pbkdf2_calls += 1
        return REAL_PBKDF2(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(hashlib, name)


@pytest.fixture
def counting(monkeypatch) -> CountingHashlib:
    fake = CountingHashlib()
    monkeypatch.setattr(auth, "hashlib", fake)
    return fake


LISTENER = Listener("main", "127.0.0.1", 6432)


def read_message(sock) -> tuple[bytes, bytes]:
    def exact(n):
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return data
    header = exact(5)
    return header[:1], exact(struct.unpack("!I", header[1:])[0] - 4)


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def login_attempt(relay: Relay, password: str, full: bool = True) -> tuple[list[int], dict[str, str] | None]:
    """A SCRAM login as alice to database "nope" (not configured: a successful exchange ends with
    FATAL 3D000 after AuthenticationSASLFinal). Returns the authentication codes and the error."""
    theirs, ours = socket.socketpair()
    client = gsocket.socket(ours.family, ours.type, ours.proto, fileno=ours.detach())
    client.settimeout(10)
    relay.accept(theirs, "unix", LISTENER)
    codes = []
    try:
        client.sendall(startup_packet("alice", "nope"))
        kind, body = read_message(client)
        assert (kind, body) == (b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\0\0")
        codes.append(10)
        if not full:
            return codes, None
        nonce = base64.b64encode(os.urandom(18)).decode()
        first_bare = f"n=,r={nonce}"
        data = ("n,," + first_bare).encode()
        client.sendall(message(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(data)) + data))
        kind, body = read_message(client)
        assert kind == b"R" and body[:4] == struct.pack("!I", 11)
        codes.append(11)
        server_first = body[4:].decode()
        attrs = dict(part.split("=", 1) for part in server_first.split(","))
        without_proof = f"c={base64.b64encode(b'n,,').decode()},r={attrs['r']}"
        auth_message = f"{first_bare},{server_first},{without_proof}".encode()
        salted = REAL_PBKDF2("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
        client_key = _hmac(salted, b"Client Key")
        proof = bytes(a ^ b for a, b in zip(client_key, _hmac(hashlib.sha256(client_key).digest(), auth_message)))
        client.sendall(message(b"p", f"{without_proof},p={base64.b64encode(proof).decode()}".encode()))
        kind, body = read_message(client)
        if kind == b"R":
            assert body[:4] == struct.pack("!I", 12)
            signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
            assert body[4:] == f"v={base64.b64encode(signature).decode()}".encode(), "bad server signature"
            codes.append(12)
            kind, body = read_message(client)
        assert kind == b"E", (kind, body)
        fields = {chr(part[0]): part[1:].decode() for part in body.split(b"\0") if part}
        return codes, fields
    finally:
        client.close()


def write_users(path, password: str) -> None:
    path.write_text(f'"alice" "{password}"\n')


@pytest.fixture
def relay(tmp_path, restore_pgrelay_logger):
    write_users(tmp_path / "users.txt", "Old-Plain-Pw-1")
    (tmp_path / "r.ini").write_text(
        "[databases]\nother = host=127.0.0.1 port=1\n[pgbouncer]\nauth_type = scram-sha-256\n"
        f"auth_file = {tmp_path / 'users.txt'}\nlog_connections = 1\nlog_disconnections = 1\n")
    yield Relay(str(tmp_path / "r.ini"), env={})


NO_DB = ("FATAL", "3D000", "no such database: nope")
FAILED = ("FATAL", "28P01", 'password authentication failed for user "alice"')


def outcome(result):
    codes, fields = result
    return codes, (fields["S"], fields["C"], fields["M"])


def test_repeated_exchanges_derive_the_verifier_once(relay, counting, tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("pgrelay"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="pgrelay")
    for _ in range(20):
        assert login_attempt(relay, "Old-Plain-Pw-1", full=False) == ([10], None)
    for _ in range(5):
        assert outcome(login_attempt(relay, "Old-Plain-Pw-1")) == ([10, 11, 12], NO_DB)
        assert outcome(login_attempt(relay, "Wrong-Pw")) == ([10, 11], FAILED)
    assert counting.pbkdf2_calls == 1
    # A new password in auth_file and a reload: the new one works, the old one no longer does.
    write_users(tmp_path / "users.txt", "New-Plain-Pw-2")
    assert relay.reload() is True
    monkeypatch.setattr(logging.getLogger("pgrelay"), "propagate", True)
    for _ in range(3):
        assert outcome(login_attempt(relay, "Old-Plain-Pw-1")) == ([10, 11], FAILED)
        assert outcome(login_attempt(relay, "New-Plain-Pw-2")) == ([10, 11, 12], NO_DB)
    assert counting.pbkdf2_calls == 2
    assert len(relay.derived_secrets) == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "login attempt" in logged  # the log was captured...
    assert "Plain-Pw" not in logged  # ...and holds no password
