"""so_reuseport: a second pgrelay on the same port takes new connections while the first, sent SIGTERM, serves
its clients until they leave (a rolling restart under pgbench with zero failed transactions)."""

from __future__ import annotations

import signal
import time

import pytest

from ..support import connect, scalar, wait_until
from .test_signals import finish_pgbench, init_pgbench, start_pgbench


def test_rolling_restart_with_so_reuseport_loses_no_transaction(make_relay, pg):
    init_pgbench(pg)
    old = make_relay({"so_reuseport": "1", "unix_socket_dir": "", "pool_mode": "transaction"}, name="old")
    port = old.port
    bench = start_pgbench(port, clients=4, seconds=12, connect_each=True)  # -C: load follows new processes
    try:
        time.sleep(3)
        new = make_relay({"so_reuseport": "1", "unix_socket_dir": "", "pool_mode": "transaction",
                          "listen_port": str(port)}, name="new")
        new.port = port
        wait_until(lambda: new.log().count("login attempt") >= 5, timeout=10,
                   message="the kernel sends new connections to the new process too")
        old.send_signal(signal.SIGTERM)  # waits for its clients: each leaves after one transaction
        assert old.proc.wait(20) == 0
        served_before = new.log().count("login attempt")
        processed, failed, out = finish_pgbench(bench)
    finally:
        if bench.poll() is None:
            bench.kill()
    assert failed == 0, out
    assert processed > 50, out
    assert "shutdown requested (wait_for_clients)" in old.log()
    assert new.log().count("login attempt") > served_before, "after the old process left, the new one serves all"
    conn = connect(new)
    assert scalar(conn, "SELECT 'still served'") == "still served"
    conn.close()


def test_second_relay_on_the_port_needs_so_reuseport(make_relay):
    """Without so_reuseport the port is taken: a second process cannot listen on it (and says so)."""
    first = make_relay({"unix_socket_dir": ""}, name="first")
    with pytest.raises(RuntimeError) as failure:
        make_relay({"unix_socket_dir": "", "listen_port": str(first.port)}, name="second")
    assert "Address already in use" in str(failure.value)
    # With it on in only one of them, the kernel still refuses: every socket on the port must set it.
    other = make_relay({"unix_socket_dir": "", "so_reuseport": "1"}, name="other")
    with pytest.raises(RuntimeError):
        make_relay({"unix_socket_dir": "", "listen_port": str(other.port)}, name="plain")
    assert_served = connect(first)
    assert scalar(assert_served, "SELECT 1") == 1
    assert_served.close()
