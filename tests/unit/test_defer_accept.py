"""tcp_defer_accept: TCP_DEFER_ACCEPT is set on every TCP listening socket when on (the default, as in
PgBouncer on Linux), cleared when off, and never touches the Unix socket (issue 7, item 6)."""

from __future__ import annotations

import logging
import socket

import pytest

from pgrelay.relay import Relay
from pgrelay.settings import core_registry
from pgrelay.tempdb import free_port

pytestmark = [pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="TCP_DEFER_ACCEPT is Linux only"),
              pytest.mark.usefixtures("restore_pgrelay_logger")]


def bound_relay(tmp_path, setting: str | None) -> Relay:
    main, extra = free_port(), free_port()
    text = (f"[databases]\n* = host=127.0.0.1\n[listeners]\ndirect = port={extra} role=direct\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {main}\nunix_socket_dir = {tmp_path}\n"
            "auth_type = trust\n")
    if setting is not None:
        text += f"tcp_defer_accept = {setting}\n"
    (tmp_path / "r.ini").write_text(text)
    relay = Relay(str(tmp_path / "r.ini"), env={})
    relay.listeners.start()
    return relay


def defer_values(relay: Relay) -> tuple[list[int], int]:
    tcp = [b.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT)
           for b in relay.listeners.bound if b.unix_path is None]
    unix = [b for b in relay.listeners.bound if b.unix_path is not None]
    return tcp, len(unix)


@pytest.mark.parametrize("setting", [None, "1", "on"])
def test_set_on_tcp_listeners_when_on(tmp_path, setting):
    relay = bound_relay(tmp_path, setting)
    try:
        tcp, unix = defer_values(relay)
        assert len(tcp) == 2 and unix == 2
        # Linux stores the 45 s as SYN-ACK retransmissions and reports them back as seconds (>= 45).
        assert all(value >= 45 for value in tcp), tcp
    finally:
        relay.listeners.stop()


@pytest.mark.parametrize("setting", ["0", "off"])
def test_not_set_when_off(tmp_path, setting):
    relay = bound_relay(tmp_path, setting)
    try:
        tcp, unix = defer_values(relay)
        assert tcp == [0, 0] and unix == 2
    finally:
        relay.listeners.stop()


def test_is_a_core_setting_with_pgbouncers_default():
    setting = core_registry().settings["tcp_defer_accept"]
    assert not setting.planned
    assert setting.default_value is True
    assert setting.reload is False  # listening sockets are set up at startup


def test_reload_keeps_the_value_and_warns(tmp_path, caplog):
    relay = bound_relay(tmp_path, "1")
    try:
        text = (tmp_path / "r.ini").read_text().replace("tcp_defer_accept = 1", "tcp_defer_accept = 0")
        (tmp_path / "r.ini").write_text(text)
        logging.getLogger("pgrelay").propagate = True
        with caplog.at_level(logging.WARNING, logger="pgrelay"):
            assert relay.reload() is True
        assert relay.config.tcp_defer_accept is True
        assert "setting tcp_defer_accept cannot be changed by a reload; restart pgrelay to apply it" in \
            [r.getMessage() for r in caplog.records]
        tcp, _ = defer_values(relay)
        assert all(value >= 45 for value in tcp), tcp
    finally:
        relay.listeners.stop()
