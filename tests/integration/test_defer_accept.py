"""tcp_defer_accept and max_client_conn: sockets that never send a byte do not lock real clients out
(issue 7, item 6). With TCP_DEFER_ACCEPT (the default on Linux, as in PgBouncer) the kernel does not
even hand them to pgrelay; without it they are accepted but do not count against max_client_conn
until they send a StartupMessage."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import psutil
import psycopg2
import pytest

from ..support import RawClient, connect, scalar, startup_packet, wait_until

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_DEFER_ACCEPT"), reason="TCP_DEFER_ACCEPT is Linux only")

REFUSAL = "no more connections allowed (max_client_conn)"
SILENT = 60
MAX_CLIENT_CONN = 50


def silent_sockets(port: int, n: int = SILENT) -> list[socket.socket]:
    """TCP connections that complete the handshake and then send nothing."""
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]


def accepted(relay) -> int:
    """Connections to the relay's port that pgrelay has accept()ed (they are among its open sockets)."""
    conns = psutil.Process(relay.proc.pid).net_connections(kind="tcp")
    return sum(1 for c in conns if c.laddr and c.laddr.port == relay.port and c.status == psutil.CONN_ESTABLISHED)


def syn_recv(port: int) -> int | None:
    """Server-side connections to `port` the kernel holds in SYN-RECV (deferred), per ss; None without ss."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-Htn", "state", "syn-recv", f"( sport = :{port} )"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    return len(out.splitlines())


def start(make_relay, defer: str):
    return make_relay({"max_client_conn": MAX_CLIENT_CONN, "tcp_defer_accept": defer,
                       "pool_mode": "transaction", "default_pool_size": 5})


def hold_silent(relay, defer: str) -> list[socket.socket]:
    silent = silent_sockets(relay.port)
    if defer == "1":
        time.sleep(0.5)
        assert accepted(relay) == 0, "with tcp_defer_accept, silent sockets must stay in the kernel"
        assert syn_recv(relay.port) in (SILENT, None)
    else:
        wait_until(lambda: accepted(relay) == SILENT, timeout=10, message="pgrelay to accept the silent sockets")
        assert syn_recv(relay.port) in (0, None)
    return silent


@pytest.mark.parametrize("defer", ["1", "0"])
def test_silent_sockets_do_not_lock_out_a_real_client(make_relay, defer):
    relay = start(make_relay, defer)
    silent = hold_silent(relay, defer)
    try:
        conn = connect(relay)
        try:
            assert scalar(conn, "SELECT 1") == 1
        finally:
            conn.close()
        # A silent socket that finally speaks is served like any client.
        raw = RawClient.__new__(RawClient)
        raw.sock, raw.buf = silent.pop(), b""
        raw.sock.sendall(startup_packet())
        raw.read_until(b"Z")
        assert any(kind == b"D" for kind, _ in raw.query("SELECT 1"))
        raw.close()
    finally:
        for sock in silent:
            sock.close()
    assert REFUSAL not in relay.log()


@pytest.mark.parametrize("defer", ["1", "0"])
def test_max_client_conn_counts_clients_that_sent_a_startup_message(make_relay, defer):
    relay = start(make_relay, defer)
    silent = hold_silent(relay, defer)
    conns = []
    try:
        for _ in range(MAX_CLIENT_CONN):
            conns.append(connect(relay))
            assert scalar(conns[-1], "SELECT 1") == 1
        raw = RawClient(relay.port)
        raw.send(startup_packet())
        fields = raw.read_error()
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "53300", REFUSAL), fields
        assert raw.closed()
        raw.close()
        with pytest.raises(psycopg2.OperationalError, match=r"no more connections allowed \(max_client_conn\)"):
            connect(relay)
        # One leaves: its slot is free again, and only one.
        conns.pop().close()
        conns.append(wait_until(lambda: _try_connect(relay), timeout=5, message="a free slot"))
        assert scalar(conns[-1], "SELECT 1") == 1
        assert _try_connect(relay) is None
    finally:
        for conn in conns:
            conn.close()
        for sock in silent:
            sock.close()


def _try_connect(relay):
    try:
        return connect(relay)
    except psycopg2.OperationalError as exc:
        assert REFUSAL in str(exc)
        return None
