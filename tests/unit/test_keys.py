"""pgrelay.keys: protocol negotiation as PostgreSQL 18 does it, and server-side version and key checks."""

from __future__ import annotations

import struct

import pytest

from pgrelay import keys
from pgrelay.errors import RejectError, ServerError


@pytest.mark.parametrize("code,minor,reply", [
    (0x30000, 0, b""),
    (0x30001, 1, b""),
    (0x30002, 2, b""),
    (0x30003, 2, b"v" + struct.pack("!III", 12, 0x30002, 0)),
    (0x3270F, 2, b"v" + struct.pack("!III", 12, 0x30002, 0)),  # libpq 19's "grease" 3.9999
])
def test_negotiate_versions(code, minor, reply):
    assert keys.negotiate(code, [("user", "u")]) == (minor, reply, [("user", "u")])


def test_negotiate_reports_pq_options_and_drops_them():
    used, reply, pairs = keys.negotiate(0x30000, [("user", "u"), ("_pq_.a", "1"), ("database", "d"), ("_pq_.b", "")])
    assert used == 0 and pairs == [("user", "u"), ("database", "d")]
    assert reply == b"v" + struct.pack("!III", 4 + 8 + 14, 0x30000, 2) + b"_pq_.a\0_pq_.b\0"


@pytest.mark.parametrize("code,text", [(0x20000, "old V2 protocol not supported"),
                                       (0x40001, "unsupported frontend protocol 4.1: server supports 3.0 to 3.2")])
def test_other_major_versions_are_refused(code, text):
    with pytest.raises(RejectError) as info:
        keys.negotiate(code, [])
    assert (info.value.decision.message, info.value.decision.sqlstate) == (text, "0A000")


def test_secret_lengths():
    assert [keys.secret_length(m) for m in (0, 1, 2)] == [4, 4, 32]


@pytest.mark.parametrize("version,asked,minor", [(0x30000, 0x30002, 0), (0, 0x30002, 0), (0x30001, 0x30002, 1)])
def test_server_version(version, asked, minor):
    assert keys.server_version(struct.pack("!II", version, 0), asked) == minor


@pytest.mark.parametrize("version,asked", [(0x30003, 0x30002), (0x40000, 0x30002), (0x30002, 0x30000)])
def test_server_version_nonsense(version, asked):
    with pytest.raises(ValueError):
        keys.server_version(struct.pack("!II", version, 0), asked)
    with pytest.raises(ValueError):
        keys.server_version(b"\0\0\0", asked)


def test_server_key_lengths():
    assert keys.server_key(b"k" * 8, 0) == b"k" * 8
    assert keys.server_key(b"k" * 36, 2) == b"k" * 36
    assert keys.server_key(b"k" * 260, 2) == b"k" * 260
    for body, minor in ((b"k" * 36, 0), (b"k" * 261, 2), (b"k" * 4, 2), (b"", 0)):
        with pytest.raises(ValueError):
            keys.server_key(body, minor)


def test_refuses_version():
    old_pgbouncer = ServerError("bad packet header", {"S": "FATAL", "C": "08P01", "M": "bad packet header"})
    assert keys.refuses_version(old_pgbouncer, 0x30002)
    assert not keys.refuses_version(old_pgbouncer, 0x30000)  # nothing lower to try
    auth = ServerError("password authentication failed", {"C": "28P01", "M": "password authentication failed"})
    assert not keys.refuses_version(auth, 0x30002)
