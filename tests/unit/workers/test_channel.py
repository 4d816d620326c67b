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


def test_send_never_blocks_even_from_an_event_loop_callback():
    """Found by bench/idle.py: 100,000 clients closing at once each release their max_client_conn
    count from a libev callback (the client's disconnect); once the socket buffer was full, the
    blocking sendall raised there ("plugin failed in pgrelay_client_disconnected"). send() queues,
    in order, and one writer greenlet writes once the peer reads."""
    import gevent
    from gevent import get_hub

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    left, right = Channel(a), Channel(b)
    count = 50_000  # about 2 MB: far past the socket pair's buffer, with nobody reading yet
    results = []
    done = gevent.event.Event()

    def from_the_loop():
        results.extend(left.send({"op": "release", "keys": ["c:max_client_conn"], "n": n}) for n in range(count))
        done.set()

    get_hub().loop.run_callback(from_the_loop)
    done.wait(10)
    assert results == [True] * count  # all queued, nothing raised
    assert left.writer is not None  # the writer waits for the reader
    got = [right.receive()["n"] for _ in range(count)]
    assert got == list(range(count))
    gevent.sleep(0)
    assert not left.outq and left.writer is None
