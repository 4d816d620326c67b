"""Prometheus metrics (plugins/metrics.py) on a running pgrelay: /metrics parses, and its figures are
what the relay and PostgreSQL show, under real concurrent load."""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request

import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgrelay.tempdb import free_port

from ..support import RawClient, connect, query_message, wait_until

DB = "metricsdb"


@pytest.fixture(scope="module")
def metrics_db(pg):
    if pg.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DB}'").strip() != "1":
        pg.psql(f"CREATE DATABASE {DB}")
    return DB


def start(make_relay, pg, **settings):
    port = free_port()
    relay = make_relay({"metrics_listen": f"127.0.0.1:{port}", **settings},
                       databases={DB: f"host=127.0.0.1 port={pg.port} dbname={DB}",
                                  "*": f"host=127.0.0.1 port={pg.port}"})
    relay.metrics_url = f"http://127.0.0.1:{port}/metrics"
    return relay


def scrape_text(relay) -> str:
    with urllib.request.urlopen(relay.metrics_url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def scrape(relay) -> dict:
    """{family name: {(sample name, frozenset(labels)): value}} of one scrape."""
    out: dict[str, dict] = {}
    for family in text_string_to_metric_families(scrape_text(relay)):
        samples = out.setdefault(family.name, {})
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def value(metrics, family, sample=None, **labels):
    return metrics[family][sample or family, frozenset(labels.items())]


def pool_labels(user="postgres"):
    return {"database": DB, "user": user}


def backends(pg) -> int:
    """pgrelay's server connections to DB, as PostgreSQL sees them."""
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{DB}' "
                       "AND backend_type = 'client backend'").strip())


def test_counts_match_pg_stat_activity_and_the_pool(make_relay, pg, metrics_db):
    """Clients inside transactions hold servers; more clients wait: /metrics shows exactly that, and
    PostgreSQL sees as many backends as /metrics says the pool has servers."""
    relay = start(make_relay, pg, pool_mode="transaction", default_pool_size="3")
    holders = [connect(relay, dbname=DB) for _ in range(3)]
    for conn in holders:
        conn.autocommit = False
        conn.cursor().execute("SELECT 1")  # psycopg2 opened a transaction: the server stays linked
    waits = value(scrape(relay), "pgrelay_queue_wait_seconds", "pgrelay_queue_wait_seconds_count", database=DB)
    waiters = [RawClient(relay.port) for _ in range(2)]
    for client in waiters:
        client.login(database=DB)
        client.send(query_message("SELECT 42"))
    idle = connect(relay, dbname=DB)  # logged in, no query: active in PgBouncer's sense, no server
    wait_until(lambda: value(scrape(relay), "pgrelay_pools_client_waiting_connections", **pool_labels()) == 2,
               message="two clients waiting")
    m = scrape(relay)
    assert value(m, "pgrelay_pools_client_active_connections", **pool_labels()) == 4  # 3 holders + idle
    assert value(m, "pgrelay_pools_server_active_connections", **pool_labels()) == 3
    assert value(m, "pgrelay_pools_server_idle_connections", **pool_labels()) == 0
    assert value(m, "pgrelay_pools_server_login_connections", **pool_labels()) == 0
    assert value(m, "pgrelay_pools_client_maxwait_seconds", **pool_labels()) > 0
    assert value(m, "pgrelay_clients", state="waiting") == 2
    assert value(m, "pgrelay_clients", state="active") == 3
    assert value(m, "pgrelay_clients", state="idle") == 1
    assert value(m, "pgrelay_used_clients") == 6
    assert value(m, "pgrelay_servers", state="active") == 3
    assert backends(pg) == 3 == value(m, "pgrelay_used_servers")
    for conn in holders:
        conn.commit()
    for client in waiters:  # each gets a server as a holder's transaction ends
        assert any(kind == b"Z" for kind, _ in client.read_until(b"Z"))
    m = scrape(relay)
    assert value(m, "pgrelay_pools_client_waiting_connections", **pool_labels()) == 0
    assert value(m, "pgrelay_pools_server_idle_connections", **pool_labels()) == 3
    # Both waits ended with a server (holders 2 and 3 waited before, for the servers opened for them).
    assert value(m, "pgrelay_queue_wait_seconds", "pgrelay_queue_wait_seconds_count", database=DB) == waits + 2
    assert value(m, "pgrelay_queue_wait_seconds", "pgrelay_queue_wait_seconds_sum", database=DB) > 0
    assert backends(pg) == 3
    for conn in holders + [idle]:
        conn.close()
    for client in waiters:
        client.close()


def test_pgbouncer_counting(make_relay, pg, metrics_db):
    """PgBouncer's own test_show_stats: in session pooling, 4 clients with one autocommit query
    each and one client with two transactions of 3 queries: 5 server assignments, 6
    transactions, 4 + 2 x (BEGIN + 3 + COMMIT) = 14 queries."""
    relay = start(make_relay, pg, pool_mode="session")
    for _ in range(4):
        conn = connect(relay, dbname=DB)  # autocommit
        conn.cursor().execute("SELECT 1")
        conn.close()
    conn = connect(relay, dbname=DB)
    conn.autocommit = True
    cur = conn.cursor()
    for _ in range(2):
        cur.execute("BEGIN")
        for _ in range(3):
            cur.execute("SELECT pg_sleep(0.01)")
        cur.execute("COMMIT")
    m = scrape(relay)
    assert value(m, "pgrelay_stats_server_assignments", "pgrelay_stats_server_assignments_total", database=DB) == 5
    assert value(m, "pgrelay_stats_sql_transactions_pooled",
                 "pgrelay_stats_sql_transactions_pooled_total", database=DB) == 6
    assert value(m, "pgrelay_stats_queries_pooled", "pgrelay_stats_queries_pooled_total", database=DB) == 14
    # Each transaction took at least its three 10 ms queries, and so did the query rounds.
    xact = value(m, "pgrelay_stats_server_in_transaction_seconds",
                 "pgrelay_stats_server_in_transaction_seconds_total", database=DB)
    query = value(m, "pgrelay_stats_queries_duration_seconds",
                  "pgrelay_stats_queries_duration_seconds_total", database=DB)
    assert xact >= 0.06 and query >= 0.06
    assert xact >= query * 0.9
    assert value(m, "pgrelay_transaction_duration_seconds", "pgrelay_transaction_duration_seconds_count",
                 database=DB) == 6
    slow = [v for (name, labels), v in m["pgrelay_transaction_duration_seconds"].items()
            if name.endswith("_bucket") and dict(labels)["le"] == "0.025"]
    assert slow == [4]  # the autocommit SELECT 1s; the two transactions took longer than 25 ms
    assert value(m, "pgrelay_query_duration_seconds", "pgrelay_query_duration_seconds_count", database=DB) == 14
    conn.close()


def _load(relay, threads: int, queries: int, errors: list):
    def work():
        try:
            conn = connect(relay, dbname=DB)
            conn.autocommit = True
            cur = conn.cursor()
            for i in range(queries):
                cur.execute("SELECT %s, pg_sleep(0.002)", (i,))
                cur.fetchall()
            conn.close()
        except Exception as exc:  # reported by the test
            errors.append(exc)
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return workers


def test_counters_under_load(make_relay, pg, metrics_db):
    """12 threads x 40 queries through 3 servers in transaction pooling: every query, transaction and
    assignment is counted, counters only grow while load runs, histograms are cumulative and their
    count and sum are the counters'."""
    relay = start(make_relay, pg, pool_mode="transaction", default_pool_size="3")
    errors: list = []
    workers = _load(relay, 12, 40, errors)
    previous = None
    while any(w.is_alive() for w in workers):
        m = scrape(relay)
        if DB in str(m.get("pgrelay_stats_queries_pooled", {})):
            now = value(m, "pgrelay_stats_queries_pooled", "pgrelay_stats_queries_pooled_total", database=DB)
            assert previous is None or now >= previous
            previous = now
            active = value(m, "pgrelay_pools_server_active_connections", **pool_labels())
            idle = value(m, "pgrelay_pools_server_idle_connections", **pool_labels())
            login = value(m, "pgrelay_pools_server_login_connections", **pool_labels())
            assert active + idle + login <= 3
        time.sleep(0.05)
    for worker in workers:
        worker.join()
    assert not errors, errors
    m = scrape(relay)
    total = 12 * 40
    for family in ("queries_pooled", "sql_transactions_pooled", "server_assignments"):
        assert value(m, f"pgrelay_stats_{family}", f"pgrelay_stats_{family}_total", database=DB) == total, family
    assert value(m, "pgrelay_stats_received_bytes", "pgrelay_stats_received_bytes_total", database=DB) > 0
    sent = value(m, "pgrelay_stats_sent_bytes", "pgrelay_stats_sent_bytes_total", database=DB)
    assert sent > value(m, "pgrelay_stats_received_bytes", "pgrelay_stats_received_bytes_total", database=DB)
    assert value(m, "pgrelay_stats_queries_duration_seconds", "pgrelay_stats_queries_duration_seconds_total",
                 database=DB) >= total * 0.002
    assert value(m, "pgrelay_stats_client_wait_seconds", "pgrelay_stats_client_wait_seconds_total",
                 database=DB) > 0  # 12 clients on 3 servers queued
    for hist, count in (("pgrelay_query_duration_seconds", total), ("pgrelay_transaction_duration_seconds", total),
                        ("pgrelay_queue_wait_seconds", None)):
        buckets = sorted(((float(dict(labels)["le"]), v) for (name, labels), v in m[hist].items()
                          if name == hist + "_bucket" and dict(labels)["database"] == DB))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{hist} buckets are not cumulative: {buckets}"
        assert buckets[-1][0] == float("inf")
        assert buckets[-1][1] == value(m, hist, hist + "_count", database=DB)
        if count is not None:
            assert buckets[-1][1] == count
        assert value(m, hist, hist + "_sum", database=DB) > 0
    assert value(m, "pgrelay_queue_wait_seconds", "pgrelay_queue_wait_seconds_sum", database=DB) == pytest.approx(
        value(m, "pgrelay_stats_client_wait_seconds", "pgrelay_stats_client_wait_seconds_total", database=DB))
    assert value(m, "pgrelay_route_decisions", "pgrelay_route_decisions_total", plugin="local_pooler",
                 outcome="route") == 12
    assert value(m, "pgrelay_disconnects", "pgrelay_disconnects_total", side="client",
                 reason="client close request") == 12
    # Servers: what PostgreSQL sees.
    assert backends(pg) == value(m, "pgrelay_pools_server_idle_connections", **pool_labels()) == 3


def test_auth_failures_and_secrets_never_in_metrics(make_relay, pg, tmp_path, metrics_db):
    """A client's password (right or wrong) and other text it sends never reach /metrics; failed
    logins are counted by their fixed reason."""
    secret = "S3cr3t-" + os.urandom(6).hex()
    wrong = "Wr0ng-" + os.urandom(6).hex()
    auth_file = tmp_path / "userlist.txt"
    auth_file.write_text(f'"postgres" "{secret}"\n')
    relay = start(make_relay, pg, auth_type="plain", auth_file=str(auth_file))
    conn = psycopg2.connect(relay.dsn(dbname=DB, password=secret, application_name=f"app-{secret}"))
    conn.cursor().execute("SELECT 1")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(relay.dsn(dbname=DB, password=wrong))
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(relay.dsn(user=f"nobody{wrong}", dbname=DB, password=wrong))
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(relay.dsn(dbname=DB, password=secret, options=f"-c {wrong}=x"))
    wait_until(lambda: 'reason="password"' in scrape_text(relay), message="auth failures counted")
    text = scrape_text(relay)
    assert secret not in text and wrong not in text
    assert secret[7:] not in text and wrong[6:] not in text
    m = scrape(relay)
    assert value(m, "pgrelay_auth_failures", "pgrelay_auth_failures_total", reason="password") == 2
    reasons = {dict(labels)["reason"] for (_, labels) in m["pgrelay_disconnects"]}
    assert "password authentication failed for user" in reasons
    assert all(not any(ch.isdigit() for ch in r) for r in reasons), reasons
    conn.close()


def test_metrics_listen_that_cannot_bind_is_a_startup_error(make_relay, pg):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(RuntimeError) as failure:
            make_relay({"metrics_listen": f"127.0.0.1:{port}"})
        message = str(failure.value)
        assert "exited with 1" in message
        assert f"metrics_listen = 127.0.0.1:{port}: cannot listen on 127.0.0.1:{port}: Address already in use" \
            in message
    finally:
        taken.close()


@pytest.mark.parametrize("bad", ["9127", "localhost", "127.0.0.1:port", "127.0.0.1:70000", ":9127"])
def test_malformed_metrics_listen_is_refused(make_relay, bad):
    with pytest.raises(RuntimeError) as failure:
        make_relay({"metrics_listen": bad})
    assert f"metrics_listen = {bad}: expected host:port" in str(failure.value)


def _listening_ports(pid: int) -> set[int]:
    """TCP ports the process listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_listen_off_nothing_listens(make_relay):
    relay = make_relay()
    assert _listening_ports(relay.proc.pid) == {relay.port}
    assert "metrics: listening" not in relay.log()


def test_metrics_served_only_at_metrics_path_and_stopped_at_shutdown(make_relay, pg):
    relay = start(make_relay, pg)
    port = int(relay.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert _listening_ports(relay.proc.pid) == {relay.port, port}
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(relay.metrics_url.replace("/metrics", "/other"), timeout=5)
    assert missing.value.code == 404
    assert "pgrelay_up 1.0" in scrape_text(relay)
    assert relay.stop() == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(relay.metrics_url, timeout=5)
