"""The parent-worker channel: messages framed by length, split reads, a closed or lying peer."""

import struct

import pytest
from gevent import socket

from pgrelay.errors import ClientGone
from pgrelay.workers.channel import MAX_MESSAGE, Channel


def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return Channel(a), b


def test_messages_in_one_write_and_split_bytewise():
    chan, peer = pair()
    body = b'{"op":"room","key":"s:1"}'
    framed = struct.pack("!I", len(body)) + body
    peer.sendall(framed * 2)
    assert chan.receive() == {"op": "room", "key": "s:1"}
    assert chan.receive() == {"op": "room", "key": "s:1"}
    for byte in framed:
        peer.sendall(bytes([byte]))
    assert chan.receive()["op"] == "room"


def test_round_trip():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    assert left.send({"op": "acquire", "items": [["k", 3]], "id": 1})
    assert right.receive() == {"op": "acquire", "items": [["k", 3]], "id": 1}


@pytest.mark.parametrize("data", [b"", struct.pack("!I", MAX_MESSAGE + 1), struct.pack("!I", 3) + b"{x}"])
def test_closed_oversized_or_malformed_is_gone(data):
    chan, peer = pair()
    peer.sendall(data)
    peer.close()
    with pytest.raises(ClientGone):
        chan.receive()
    assert chan.closed and not chan.send({"op": "x"})
