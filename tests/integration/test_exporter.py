"""Acceptance: what a PgBouncer exporter reads from pgrelay's admin console agrees with SHOW POOLS, and
pgrelay's own /metrics agrees with SHOW POOLS and SHOW STATS, under load.

The exporter is Debian's prometheus-pgbouncer-exporter (1.7, `apt-get install
prometheus-pgbouncer-exporter`), run from its installed package: its collectors connect with psycopg2
to the `pgbouncer` database, as its command does. Of its four collectors, POOLS and LISTS read
columns PgBouncer 1.26 still has; STATS reads `total_requests` (dropped in PgBouncer 1.8) and
DATABASES `reserve_pool` (now `reserve_pool_size`), so those two fail with KeyError against
PgBouncer 1.26 as they do against pgrelay, which has PgBouncer 1.26's columns; that version has no
`pgbouncer_up` family either (the prometheus-community exporter's `pgbouncer_up` maps to pgrelay's
`pgrelay_up`, checked below on /metrics).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import psycopg2
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ..support import connect, query_message, RawClient
from .test_metrics import DB, scrape, start, value

EXPORTER_PACKAGE = "/usr/lib/python3/dist-packages/prometheus_pgbouncer_exporter"


def exporter_module():
    """Debian's exporter package, installed with apt (CI installs it: see .ci/run), loaded from its
    directory without putting Debian's dist-packages on sys.path (its other modules stay out)."""
    import importlib.util
    name = "prometheus_pgbouncer_exporter"
    if name not in sys.modules:
        init = f"{EXPORTER_PACKAGE}/__init__.py"
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[EXPORTER_PACKAGE])
        if spec is None or not os.path.exists(init):
            pytest.fail("Debian's prometheus-pgbouncer-exporter is not installed: "
                        "apt-get install -y prometheus-pgbouncer-exporter", pytrace=False)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    from prometheus_pgbouncer_exporter import collectors, utils
    return collectors, utils


def console(relay):
    conn = psycopg2.connect(relay.dsn(user="stats", dbname="pgbouncer"), connect_timeout=10)
    conn.autocommit = True
    return conn


def show(conn, what: str) -> list[dict]:
    with conn.cursor() as cur:
        cur.execute(f"SHOW {what}")
        names = [c.name for c in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def families(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


@pytest.fixture(scope="module")
def metrics_db(pg):
    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'").strip() != "1":
        pg.psql(f"CREATE DATABASE {DB}")
    return DB


@pytest.fixture
def loaded(make_relay, pg, metrics_db):
    """pgrelay with /metrics and the console (stats_users), 3 servers, 3 clients holding them in
    transactions and 2 more waiting, after a burst of load from 8 threads."""
    relay = start(make_relay, pg, pool_mode="transaction", default_pool_size="3", stats_users="stats")
    errors = []

    def work():
        try:
            conn = connect(relay, dbname=DB)
            for i in range(30):
                conn.cursor().execute("SELECT %s, pg_sleep(0.001)", (i,))
            conn.close()
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    holders = [connect(relay, dbname=DB) for _ in range(3)]
    for conn in holders:
        conn.autocommit = False
        conn.cursor().execute("SELECT 1")
    waiters = []
    for _ in range(2):
        client = RawClient(relay.port)
        client.login(database=DB)
        client.send(query_message("SELECT 1"))
        waiters.append(client)
    deadline = time.monotonic() + 10
    while value(scrape(relay), "pgrelay_pools_client_waiting_connections", database=DB, user="postgres") < 2:
        assert time.monotonic() < deadline, "clients did not queue"
        time.sleep(0.05)
    yield relay
    for conn in holders:
        conn.close()
    for client in waiters:
        client.close()


def test_debian_exporter_reads_show_pools(loaded):
    collectors, utils = exporter_module()
    conn = utils.get_connection("stats", loaded.port, "127.0.0.1")
    try:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collectors.PoolsCollector(connection=conn, databases=None))
        registry.register(collectors.ListsCollector(connection=conn))
        exported = families(generate_latest(registry).decode())
        pools = {(row["database"], row["user"]): row for row in show(conn, "POOLS")}
        lists = dict((row["list"], row["items"]) for row in show(conn, "LISTS"))
    finally:
        conn.close()
    pool = pools[DB, "postgres"]
    assert (pool["cl_active"], pool["cl_waiting"]) == (3, 2)
    labels = frozenset({"database": DB, "user": "postgres"}.items())
    assert exported["pgbouncer_active_clients", labels] == pool["cl_active"]
    assert exported["pgbouncer_waiting_clients", labels] == pool["cl_waiting"]
    for (database, user), row in pools.items():
        key = frozenset({"database": database, "user": user}.items())
        assert exported["pgbouncer_active_clients", key] == row["cl_active"]
    assert exported["pgbouncer_used_clients", frozenset()] == lists["used_clients"]
    assert exported["pgbouncer_pools", frozenset()] == lists["pools"]
    # Against PgBouncer 1.26 and pgrelay alike, its STATS collector fails on a column PgBouncer dropped.
    conn = utils.get_connection("stats", loaded.port, "127.0.0.1")
    try:
        with pytest.raises(KeyError, match="total_requests"):
            list(collectors.StatsCollector(connection=conn, databases=None).collect())
    finally:
        conn.close()


def test_metrics_agree_with_show_pools_and_show_stats(loaded):
    conn = console(loaded)
    try:
        m = scrape(loaded)
        pools = {(row["database"], row["user"]): row for row in show(conn, "POOLS")}
        stats = {row["database"]: row for row in show(conn, "STATS")}
        m2 = scrape(loaded)
    finally:
        conn.close()
    assert m["pgrelay_up"]["pgrelay_up", frozenset()] == 1
    columns = {"cl_active": "client_active_connections", "cl_waiting": "client_waiting_connections",
               "sv_active": "server_active_connections", "sv_idle": "server_idle_connections",
               "sv_used": "server_used_connections", "sv_tested": "server_testing_connections",
               "sv_login": "server_login_connections"}
    row = pools[DB, "postgres"]
    assert (row["cl_active"], row["cl_waiting"], row["sv_active"]) == (3, 2, 3)
    for (database, user), row in pools.items():
        if database == "pgbouncer":
            continue  # the console's own pseudo-pool: no servers, not a pool of pgrelay's
        for column, family in columns.items():
            assert value(m, f"pgrelay_pools_{family}", database=database, user=user) == row[column], column
        maxwait = row["maxwait"] + row["maxwait_us"] / 1e6
        assert value(m, "pgrelay_pools_client_maxwait_seconds", database=database, user=user) \
            == pytest.approx(maxwait, abs=0.5)
    # The console's own queries are counted under its database "pgbouncer"; the pool's are stable
    # while no query runs (holders sit idle in transaction, waiters are queued).
    mapping = {"total_query_count": ("queries_pooled", 1), "total_xact_count": ("sql_transactions_pooled", 1),
               "total_server_assignment_count": ("server_assignments", 1),
               "total_received": ("received_bytes", 1), "total_sent": ("sent_bytes", 1),
               "total_query_time": ("queries_duration_seconds", 1e-6),
               "total_xact_time": ("server_in_transaction_seconds", 1e-6),
               "total_wait_time": ("client_wait_seconds", 1e-6)}
    row = stats[DB]
    assert row["total_query_count"] >= 8 * 30 + 3
    assert row["total_xact_count"] >= 8 * 30
    for column, (family, scale) in mapping.items():
        ours = value(m, f"pgrelay_stats_{family}", f"pgrelay_stats_{family}_total", database=DB)
        assert ours == value(m2, f"pgrelay_stats_{family}", f"pgrelay_stats_{family}_total", database=DB)
        assert float(row[column]) * scale == pytest.approx(ours, rel=1e-6, abs=2e-6), column
