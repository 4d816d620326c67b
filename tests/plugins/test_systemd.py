"""plugins/systemd.py on in-process Relays: which sd_notify messages each hook sends, the watchdog
variables, STATUS= updates, and a NOTIFY_SOCKET that does not work."""

from __future__ import annotations

import logging
import os
import socket
import time

import gevent
import pytest

from pgrelay.relay import Relay
from pgrelay_plugins import systemd

GOOD = "[databases]\n* = host=h\n[pgbouncer]\nauth_type = trust\npool_mode = transaction\n"


class Receiver:
    """A real AF_UNIX datagram socket standing for the service manager."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)

    def read(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n") if line))


@pytest.fixture
def receiver(tmp_path):
    rx = Receiver(str(tmp_path / "notify.sock"))
    yield rx
    rx.sock.close()


@pytest.fixture
def warnings():
    """WARNING records of the 'pgrelay' logger (a handler of its own: in-process Relays switch off
    propagation)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("pgrelay")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def make_relay(tmp_path, env) -> Relay:
    path = tmp_path / "relay.ini"
    path.write_text(GOOD)
    return Relay(str(path), env=env)


def started(tmp_path, env) -> Relay:
    """A relay whose startup hook ran (nothing is bound: the test calls the hook, not Relay.start)."""
    relay = make_relay(tmp_path, env)
    relay.hook.pgrelay_startup(relay=relay)
    return relay


def stop(relay) -> None:
    relay.stopped.set()
    state = relay.plugin_data.get("systemd")
    if state is not None:
        gevent.joinall(state.greenlets, timeout=5)
        assert all(g.dead for g in state.greenlets), "the greenlets end with the relay"
        state.notifier.close()


def test_without_notify_socket_nothing_happens(tmp_path):
    relay = started(tmp_path, {})
    assert "systemd" not in relay.plugin_data
    relay.reload()  # the reload hooks have nothing to do
    relay.hook.pgrelay_shutdown(relay=relay, mode="fast")


def test_ready_then_reload_messages(tmp_path, receiver):
    """Relay.reload sends RELOADING=1 (with CLOCK_MONOTONIC in usec) then READY=1; a refused reload
    READY=1 too, with a STATUS= saying so (without the error text) until a reload succeeds."""
    relay = started(tmp_path, {"NOTIFY_SOCKET": receiver.address})
    try:
        assert receiver.read() == [{"READY": "1", "STATUS": "clients: 0, servers: 0, pools: 0"}]
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert relay.reload() is True
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        reloading, ready = receiver.read()
        assert reloading["RELOADING"] == "1" and before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert ready == {"READY": "1", "STATUS": "clients: 0, servers: 0, pools: 0"}
        # Refused: a bad value, and (second case) a file that cannot be read.
        (tmp_path / "relay.ini").write_text(GOOD.replace("pool_mode = transaction", "pool_mode = pa55word"))
        assert relay.reload() is False
        reloading, ready = receiver.read()
        assert reloading["RELOADING"] == "1"
        assert ready == {"READY": "1", "STATUS": "clients: 0, servers: 0, pools: 0; " + systemd.RELOAD_FAILED}
        assert "pa55word" not in str(ready)
        (tmp_path / "relay.ini").unlink()
        assert relay.reload() is False
        assert [m.get("READY") for m in receiver.read()] == [None, "1"]
        (tmp_path / "relay.ini").write_text(GOOD)
        assert relay.reload() is True
        assert receiver.read()[-1] == {"READY": "1", "STATUS": "clients: 0, servers: 0, pools: 0"}
        relay.hook.pgrelay_shutdown(relay=relay, mode="wait_for_servers")
        assert receiver.read() == [{"STOPPING": "1",
                                    "STATUS": "shutting down (wait_for_servers): clients: 0, servers: 0, pools: 0"}]
    finally:
        stop(relay)


def test_status_follows_the_summary(tmp_path, receiver, monkeypatch):
    """STATUS= is sent when the summary changed, and only then."""
    monkeypatch.setattr(systemd, "STATUS_INTERVAL", 0.05)
    relay = started(tmp_path, {"NOTIFY_SOCKET": receiver.address})
    try:
        receiver.read()
        gevent.sleep(0.3)
        assert receiver.read() == [], "nothing changed: nothing sent"
        relay.clients.update({1: object(), 2: object()})
        gevent.sleep(0.3)
        assert receiver.read() == [{"STATUS": "clients: 2, servers: 0, pools: 0"}]
        relay.clients.clear()
        gevent.sleep(0.3)
        assert receiver.read() == [{"STATUS": "clients: 0, servers: 0, pools: 0"}]
    finally:
        stop(relay)


def test_watchdog_beats(tmp_path, receiver):
    relay = started(tmp_path, {"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000",
                               "WATCHDOG_PID": str(os.getpid())})
    try:
        first = receiver.read()
        assert first[0]["READY"] == "1" and first[0]["WATCHDOG"] == "1"
        gevent.sleep(0.55)
        beats = [m for m in receiver.read() if m.get("WATCHDOG") == "1"]
        assert 3 <= len(beats) <= 6, beats  # every 0.1 s
    finally:
        stop(relay)


@pytest.mark.parametrize("usec, pid, interval", [
    (None, None, None), ("", None, None), ("0", None, None),
    ("1000000", None, 0.5), ("30000000", "SELF", 15.0),
    ("1000000", "1", None),          # for another process
    ("soon", None, None), ("1000000", "me", None),
])
def test_watchdog_interval(usec, pid, interval, warnings):
    env = {key: value.replace("SELF", str(os.getpid()))
           for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)) if value is not None}
    assert systemd.watchdog_interval(env) == interval
    assert len(warnings) == (1 if (usec, pid) in (("soon", None), ("1000000", "me")) else 0)


@pytest.mark.parametrize("address", ["/nonexistent/notify.sock", "@pgrelay-nobody-listens-here", "relative.sock",
                                     "vsock:2:9999"])
def test_notifier_warns_once(address, warnings):
    notifier = systemd.Notifier(address)
    try:
        assert [notifier.send("READY=1"), notifier.send("STATUS=x"), notifier.send("STOPPING=1")] == [False] * 3
        assert len(warnings) == 1
        assert warnings[0].getMessage().startswith(f"cannot notify systemd through NOTIFY_SOCKET={address}: ")
    finally:
        notifier.close()


def test_notifier_recovers_without_a_second_warning(tmp_path, warnings):
    """The socket appears later (a receiver restarted): messages go through again, still one warning."""
    path = str(tmp_path / "late.sock")
    notifier = systemd.Notifier(path)
    try:
        assert notifier.send("READY=1") is False
        rx = Receiver(path)
        assert notifier.send("STATUS=up") is True
        assert rx.read() == [{"STATUS": "up"}]
        rx.sock.close()
        assert notifier.send("STATUS=gone") is False
        assert len(warnings) == 1
    finally:
        notifier.close()


def test_abstract_address():
    rx = Receiver(f"@pgrelay-plugin-test-{os.getpid()}")
    notifier = systemd.Notifier(rx.address)
    try:
        assert notifier.send("READY=1", "STATUS=a b c") is True
        assert rx.read() == [{"READY": "1", "STATUS": "a b c"}]
    finally:
        notifier.close()
        rx.sock.close()
