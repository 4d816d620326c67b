"""Which idle server the next transaction gets: LIFO by default, oldest first with server_round_robin."""

from __future__ import annotations

import pytest

from ..support import connect, scalar
from .test_limits import holders


@pytest.mark.parametrize("round_robin", [False, True])
def test_server_round_robin(make_relay, round_robin):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "3",
                        "server_round_robin": "1" if round_robin else "0"})
    held = holders(relay, 3)
    for conn in held:  # three servers, then all idle
        conn.rollback()
    client = connect(relay)
    pids = [scalar(client, "select pg_backend_pid()") for _ in range(6)]
    client.close()
    for conn in held:
        conn.close()
    if round_robin:
        assert len(set(pids)) == 3 and pids[:3] == pids[3:], pids  # each server in turn
    else:
        assert len(set(pids)) == 1, pids  # the most recently used server every time
