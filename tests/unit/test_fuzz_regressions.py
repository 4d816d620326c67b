"""Regression tests for the failures the protocol fuzzer (fuzz/run.py) found, each named after what it broke."""

from __future__ import annotations

import socket

import pytest

from fuzz import targets
from pgrelay import config, protocol
from pgrelay.client import ClientConnection
from pgrelay.errors import ConfigError, ProtocolViolation
from pgrelay.pool import Pool
from pgrelay.relay import Relay
from pgrelay.routing import Listener, Route
from pgrelay.server import ServerConnection


@pytest.fixture
def relay(tmp_path, restore_pgrelay_logger):
    """A real Relay built from a pgbouncer.ini, never started."""
    ini = tmp_path / "r.ini"
    ini.write_text("[databases]\n* = host=127.0.0.1 port=1\n[pgbouncer]\nlisten_port = 1\nauth_type = trust\n")
    return Relay(str(ini), env={})


@pytest.fixture
def server(relay):
    """A ServerConnection of a transaction-pooling pool."""
    route = Route(pool_key="k", name="app", hosts=(), dbname="app", server_user="u", pool_mode="transaction")
    return ServerConnection(relay, Pool(relay, route))


@pytest.fixture
def client(relay):
    """A ClientConnection as login leaves it, on one end of a socketpair."""
    a, b = socket.socketpair()
    yield ClientConnection(relay, a, "127.0.0.1:1", Listener(name="main", addr="127.0.0.1", port=1))
    a.close()
    b.close()


# -- pgrelay/client.py ClientConnection._scan ------------------------------------------------

@pytest.mark.parametrize("first, rest", [
    (b"S", b"\x00\x00\x00\x00"),                 # a Sync's header cut after its type byte, then length 0
    (b"Q\x7f", b"\xff\xff\xff"),                   # a Query's length above max_packet_size
    (protocol.SYNC + b"Q\x00\x00", b"\x00\x02"),      # after a whole message: the next header's half
])
def test_client_scan_violation_in_a_header_begun_by_the_last_read_is_not_a_boundary(client, first, rest):
    """fuzz live/hypothesis, then client_scan: a message header split across two reads goes to the
    server as it comes, so when its second half makes it a protocol violation the server already
    holds half a message. _scan used to drop that carry, at_boundary() said True, and disconnect
    released the server to the next client, whose query PostgreSQL then read as the rest of it
    ("server closed connection", or the next clients' messages swallowed into it)."""
    client._scan(first)
    assert not client.at_boundary()
    with pytest.raises(ProtocolViolation):
        client._scan(rest)
    assert not client.at_boundary()  # disconnect closes the server instead of reusing it


def test_client_scan_violation_in_a_whole_read_stays_a_boundary(client):
    """The other case keeps its server: a violation wholly inside one read sent nothing of it."""
    client._scan(protocol.SYNC)
    with pytest.raises(ProtocolViolation):
        client._scan(b"S\x00\x00\x00\x00")
    assert client.at_boundary()


def test_client_scan_fuzz_input_replays_cleanly():
    targets.client_scan(b"\x00\x01\x01" + b"S\x00\x00\x00\x00")


# -- pgrelay/server.py ServerConnection._scan ------------------------------------------------

def test_server_scan_takes_a_short_command_complete_at_the_end_of_a_read(server):
    """fuzz server_scan, IndexError at server.py _scan: a CommandComplete of length 5 or 4 ending its
    read made the state-tag check index past the buffer (an internal error, the server dropped)."""
    for body in (b"I", b""):
        server.carry, server.skip = b"", 0
        assert server._scan(protocol.message(b"C", b"SET\x00") + protocol.message(b"C", body)) == 0
        assert server._scan(protocol.READY_IDLE) == 1


def test_server_scan_reads_no_state_tag_out_of_the_next_message(server):
    """A one-letter CommandComplete tag ('S') is no SET: the check used to read the next message's
    type byte as the tag's third letter, and a following RowDescription ('T') made it look like 'SET'."""
    assert server.extras == ()
    data = protocol.message(b"C", b"S\x00") + protocol.message(b"T", b"\x00\x00") + protocol.READY_IDLE
    assert server._scan(data) == 1
    assert server.extras == ()  # tag_seen would have marked the unlinked server's state unknown (None)
    assert server._scan(protocol.message(b"C", b"SET\x00")) == 0
    assert server.extras is None  # a real SET still counts


def test_server_scan_fuzz_input_replays_cleanly():
    """The fuzzer's own input for that failure, through its target (which checks the ReadyForQuery count)."""
    targets.server_scan(b"\x01\x02\x03\x05C\x00\x00\x00\x08SET\x00C\x00\x00\x00\x11TimZeZenUo\x00\x03\x05"
                        b"C\x00\x00\x00\x08SET\x00C\x00\x00\x00\x05I")


# -- pgrelay/config.py read_ini --------------------------------------------------------------

def test_read_ini_refuses_an_include_name_with_a_nul_as_a_config_error(tmp_path):
    """fuzz ini, ValueError at config.py read_ini: open() refuses a name with a NUL byte with
    ValueError ('embedded null byte'), which escaped as a traceback instead of a ConfigError."""
    main = tmp_path / "main.ini"
    with pytest.raises(ConfigError, match=r"main\.ini:2: cannot read included file .*embedded null byte"):
        config.read_ini("[pgbouncer]\n%include n\x00pe.ini\n", str(main))


def test_read_ini_refuses_an_included_file_that_is_not_utf8_as_a_config_error(tmp_path):
    """The same path: an included file that is not UTF-8 raised UnicodeDecodeError."""
    (tmp_path / "latin1.ini").write_bytes(b"[pgbouncer]\nadmin_users = jos\xe9\n")
    with pytest.raises(ConfigError, match=r"main\.ini:1: cannot read included file .*latin1\.ini: .*utf-8"):
        config.read_ini("%include latin1.ini\n", str(tmp_path / "main.ini"))


def test_ini_fuzz_input_replays_cleanly():
    targets.ini(b"[databases]\napp =\xe0\x98ost=127.0.0.1 port= dbname='a b' user=x\n[pgbouncer]\n"
                b"iql\x00en_po\x00\x00\x00\x00\x00\x00rt = 643\x00\x00\x00\x002\n; co=mment\n%include n\x00\x00")
