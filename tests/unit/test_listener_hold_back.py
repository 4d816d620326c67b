"""Listeners.hold_back (workers = N): a held-back worker leaves new connections to the others, yet still takes one that waits."""

from __future__ import annotations

import os
import select
import socket
import threading
import time

import gevent
import pytest

from pgrelay import listener
from pgrelay.relay import Relay
from pgrelay.tempdb import free_port

pytestmark = pytest.mark.usefixtures("restore_pgrelay_logger")


@pytest.fixture
def bound(tmp_path):
    port = free_port()
    (tmp_path / "r.ini").write_text(
        f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
        "unix_socket_dir =\nauth_type = trust\ntcp_defer_accept = 0\n")
    relay = Relay(str(tmp_path / "r.ini"), env={})
    accepted = []

    def accept(sock, peer, info):
        accepted.append(time.monotonic())
        sock.close()

    relay.accept_kinds["postgres"] = accept
    relay.listeners.start()
    clients = []

    def dial():
        sock = socket.create_connection(("127.0.0.1", port))
        clients.append(sock)
        return time.monotonic()

    yield relay.listeners, dial, accepted
    relay.listeners.stop()
    for sock in clients:
        sock.close()


def test_not_held_back_accepts_at_once(bound):
    listeners, dial, accepted = bound
    dial()
    gevent.sleep(0.05)
    assert len(accepted) == 1


def test_held_back_accepts_only_after_the_delay(bound):
    listeners, dial, accepted = bound
    listeners.hold_back(True)
    dialled = dial()
    gevent.sleep(listener.HELD_BACK_DELAY + 0.1)
    assert len(accepted) == 1, "a connection nobody else takes is still accepted"
    assert accepted[0] - dialled >= listener.HELD_BACK_DELAY * 0.9
    listeners.hold_back(False)
    assert all(b.watcher.active for b in listeners.bound)
    dial()
    gevent.sleep(0.05)
    assert len(accepted) == 2


def test_held_back_leaves_the_connection_to_a_worker_that_is_not(bound):
    """Another process accepting from the same socket at once (here: a thread with a blocking
    accept on a duplicate of the listening fd) gets every connection; the held-back one none."""
    listeners, dial, accepted = bound
    listeners.hold_back(True)
    other = socket.socket(fileno=os.dup(listeners.bound[0].sock.fileno()))  # non-blocking, as the original
    taken = []

    def take():
        poller = select.poll()
        poller.register(other.fileno(), select.POLLIN)
        deadline = time.monotonic() + 5
        while len(taken) < 5 and time.monotonic() < deadline:
            if poller.poll(100):
                try:
                    taken.append(other.accept()[0])
                except BlockingIOError:
                    pass

    thread = threading.Thread(target=take)
    thread.start()
    try:
        for _ in range(5):
            dial()
            gevent.sleep(0.03)
        thread.join(5)
        assert len(taken) == 5 and accepted == []
    finally:
        for conn in taken:
            conn.close()
        other.close()
