"""Which idle server the next transaction gets: LIFO by default, oldest first with server_round_robin."""

from __future__ import annotations

import time

import pytest

from ..support import connect, scalar, wait_until
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


def test_autodb_idle_timeout_frees_pools_of_star_databases(make_relay, pg):
    from .test_limits import backends
    from .test_settings_enforced import ensure_role

    ensure_role(pg, "reuse_auto")
    relay = make_relay({"pool_mode": "transaction", "autodb_idle_timeout": "1"},
                       databases={"*": f"host=127.0.0.1 port={pg.port}",
                                  "named": f"host=127.0.0.1 port={pg.port} dbname=postgres"})
    for dbname in ("postgres", "named"):
        conn = connect(relay, user="reuse_auto", dbname=dbname)
        scalar(conn, "select 1")
        conn.close()
    assert backends(pg, ("reuse_auto",)) == 2
    wait_until(lambda: backends(pg, ("reuse_auto",)) == 1, timeout=5, message="the * pool to be freed")
    assert "dropping database 'postgres' as it does not exist anymore or inactive auto-database" in relay.log()
    time.sleep(1.5)
    assert backends(pg, ("reuse_auto",)) == 1  # the [databases] line's pool stays
    conn = connect(relay, user="reuse_auto", dbname="postgres")  # a new pool for the next client
    assert scalar(conn, "select 'back'") == "back"
    conn.close()


def test_autodb_idle_timeout_off_keeps_them(make_relay, pg):
    from .test_limits import backends
    from .test_settings_enforced import ensure_role

    ensure_role(pg, "reuse_auto0")
    relay = make_relay({"pool_mode": "transaction", "autodb_idle_timeout": "0"})
    conn = connect(relay, user="reuse_auto0")
    scalar(conn, "select 1")
    conn.close()
    time.sleep(2)
    assert backends(pg, ("reuse_auto0",)) == 1
