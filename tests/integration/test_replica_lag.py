"""A replica that lags more than max_replica_lag leaves the rotation, and comes back once it catches up."""

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import wait_until


def replica_answer(relay, port):
    try:
        with psycopg2.connect(relay.dsn(user="postgres|replica", port=port, connect_timeout=5)) as conn, \
                conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery()")
            return cur.fetchone()[0]
    except psycopg2.OperationalError as exc:
        return str(exc)


def test_lagging_replica_leaves_rotation_and_returns(make_relay, replicated):
    direct = free_port()
    relay = make_relay({"health_check_period": "0.3", "max_replica_lag": "1"},
                       databases={"postgres": f"host=127.0.0.1 port={replicated.primary.port} "
                                              f"replicas=127.0.0.1:{replicated.standby.port}"},
                       extra_sections=f"[listeners]\ndirect = port={direct} role=direct\n")
    assert replica_answer(relay, direct) is True
    replicated.standby.psql("SELECT pg_wal_replay_pause()")
    try:
        replicated.primary.psql("CREATE TABLE IF NOT EXISTS lag_probe (x int); INSERT INTO lag_probe VALUES (1)")
        # The standby receives WAL but does not replay it: its lag grows past max_replica_lag.
        answer = wait_until(lambda: (lambda a: a if isinstance(a, str) else None)(replica_answer(relay, direct)),
                            timeout=10, interval=0.3, message="the lagging replica to leave the rotation")
        assert "no healthy replica available for" in answer
    finally:
        replicated.standby.psql("SELECT pg_wal_replay_resume()")
    assert wait_until(lambda: replica_answer(relay, direct) is True, timeout=10, interval=0.3,
                      message="the replica to return once it caught up")
    replicated.wait_caught_up()


@pytest.fixture(autouse=True)
def _no_leftover_pause(replicated):
    yield
    replicated.standby.psql("SELECT pg_wal_replay_resume()")
