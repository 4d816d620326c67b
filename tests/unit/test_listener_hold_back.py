"""Listeners.hold_back (workers = N): a held-back worker leaves new connections to the others, yet still takes one that waits."""

from __future__ import annotations

import socket
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


def test_held_back_takes_a_waiting_connection_only_at_its_tick(bound):
    listeners, dial, accepted = bound
    listeners.hold_back(True)
    assert not any(b.watcher.active for b in listeners.bound)
    dialled = dial()
    gevent.sleep(0.05)
    assert accepted == [], "a held-back worker leaves a new connection to the others"
    gevent.sleep(listener.HELD_BACK_ACCEPT_EVERY + 0.1)
    assert len(accepted) == 1, "one nobody else takes is accepted at the next tick"
    assert accepted[0] - dialled >= 0.05
    listeners.hold_back(False)
    assert all(b.watcher.active for b in listeners.bound)
    dial()
    gevent.sleep(0.05)
    assert len(accepted) == 2


def test_one_accept_per_wakeup_when_set(bound):
    listeners, dial, accepted = bound
    listeners.accepts_per_wakeup = 1
    for _ in range(3):
        dial()
    gevent.sleep(0.1)
    assert len(accepted) == 3, "level-triggered: the rest are taken at the next wakeups"
