"""plugins/metrics.py and the statistics it reads (PoolStats), on in-process Relay objects."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pgrelay import ConfigError, Listener, Login, Reject, hookimpl
from pgrelay.pool import DURATION_BUCKETS, PoolStats
from pgrelay.relay import Relay
from pgrelay_plugins import metrics


def make_relay(tmp_path, extra=""):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\ndb = host=127.0.0.1 port=1\n[pgbouncer]\nauth_type = trust\n" + extra)
    return Relay(str(path), env={})


def login(client_id=1, database="db"):
    return Login(client_id=client_id, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user="alice", database=database)


def collected(relay) -> dict:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.RelayCollector(relay))
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


@pytest.mark.parametrize("text,expected", [
    ("", None), ("  ", None), ("127.0.0.1:9127", ("127.0.0.1", 9127)), ("localhost:1", ("localhost", 1)),
    ("*:9127", ("0.0.0.0", 9127)), ("[::1]:9127", ("::1", 9127)),
])
def test_parse_listen(text, expected):
    assert metrics.parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9127", "host", "host:", ":9127", "host:0", "host:65536", "host:x1", "h:-1"])
def test_parse_listen_refuses(text):
    with pytest.raises(ConfigError, match="expected host:port"):
        metrics.parse_listen(text)


def test_bad_metrics_listen_refuses_the_configuration(tmp_path):
    with pytest.raises(ConfigError, match="metrics_listen = nowhere: expected host:port"):
        make_relay(tmp_path, "metrics_listen = nowhere\n")


def test_metrics_listen_is_off_by_default(tmp_path):
    relay = make_relay(tmp_path)
    assert relay.config.metrics_listen == ""
    assert metrics.state(relay).listen is None
    relay.hook.pgrelay_startup(relay=relay)  # the other plugins' startup hooks need no running relay
    assert metrics.state(relay).server is None


@pytest.mark.parametrize("reason,label", [
    ("client close request", "client close request"),
    ('password authentication failed for user "alice"', "password authentication failed for user"),
    ("no such database: secretdb", "no such database"),
    ("unsupported startup parameter in options: password", "unsupported startup parameter in options"),
    ("host 10.1.2.3:5432 is no longer the primary", "host is no longer the primary"),
    ("client unexpected eof during login (ClientGone)", "client unexpected eof during login"),
    ("bad packet header: message 'x' with length 99999", "bad packet header"),
    ("server sent FATAL: terminating connection due to administrator command", "server sent FATAL"),
    ("password=hunter2", "other"),
    ("closing: user=alice password=hunter", "closing"),
    ("'hunter2'", "other"),
    ("12345", "other"),
])
def test_reason_label(reason, label):
    assert metrics.reason_label(reason) == label


def test_reason_labels_are_bounded(tmp_path):
    relay = make_relay(tmp_path)
    for i in range(metrics.MAX_REASONS + 50):
        relay.disconnects[f"reason {chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676)} x"] += 1
    relay.disconnects["server: server conn crashed?"] += 2
    samples = collected(relay)
    client = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
              if name == "pgrelay_disconnects_total" and dict(labels)["side"] == "client"}
    assert len(client) == metrics.MAX_REASONS + 1
    assert client["other"] == 50
    assert sum(client.values()) == metrics.MAX_REASONS + 50
    server = frozenset({"side": "server", "reason": "server conn crashed?"}.items())
    assert samples["pgrelay_disconnects_total", server] == 2
    # The same reasons keep their labels on the next scrape (a counter never moves to "other").
    assert collected(relay) == samples


class FakeClient:
    def __init__(self, clock):
        self.relay = type("R", (), {"clock": staticmethod(clock)})()
        self.query_start = self.txn_start = 0.0


def test_end_round_counts_as_pgbouncer():
    """A transaction of three rounds (BEGIN; a query; COMMIT) and an autocommit query."""
    now = [100.0]
    client = FakeClient(lambda: now[0])
    stats = PoolStats()

    def round_trip(start, end, idle):
        client.query_start = start
        now[0] = end
        stats.end_round(client, idle)

    round_trip(100.0, 100.001, idle=False)     # BEGIN
    round_trip(100.5, 100.7, idle=False)       # a query, after 0.499 s idle in transaction
    round_trip(101.0, 101.002, idle=True)      # COMMIT
    assert stats.xact_count == 1
    assert stats.xact_time == pytest.approx(1.002)
    assert stats.query_time == pytest.approx(0.001 + 0.2 + 0.002)
    round_trip(200.0, 200.03, idle=True)
    assert stats.xact_count == 2
    assert stats.xact_time == pytest.approx(1.032)
    assert client.query_start == client.txn_start == 0.0
    assert sum(stats.query_hist) == 4 and sum(stats.xact_hist) == 2
    assert stats.xact_hist[DURATION_BUCKETS.index(2.5)] == 1       # 1.002 s: le=2.5
    assert stats.xact_hist[DURATION_BUCKETS.index(0.05)] == 1      # 0.03 s: le=0.05
    # A round that began with no stamp (nothing was sent) counts nothing; a clock step back counts 0 s.
    stats.end_round(client, True)
    assert stats.xact_count == 2
    round_trip(300.0, 299.0, idle=True)
    assert stats.query_hist[0] == 1 and stats.xact_time == pytest.approx(1.032)


def test_collector_reads_pool_stats(tmp_path):
    relay = make_relay(tmp_path, "max_db_connections = 15\n")
    route = relay.route_client(login())
    pool = relay.get_pool(route)
    stats = pool.stats
    stats.query_count, stats.xact_count, stats.server_assignment_count = 30, 20, 10
    stats.bytes_received, stats.bytes_sent = 1000, 5000
    stats.query_time, stats.xact_time, stats.wait_time = 1.5, 2.5, 0.25
    stats.query_hist[0] = 25
    stats.query_hist[-1] = 5               # beyond the last bound
    stats.xact_hist[3] = 20
    stats.wait_hist[1] = 4
    samples = collected(relay)
    db = frozenset({"database": "db"}.items())
    assert samples["pgrelay_stats_queries_pooled_total", db] == 30
    assert samples["pgrelay_stats_sql_transactions_pooled_total", db] == 20
    assert samples["pgrelay_stats_server_assignments_total", db] == 10
    assert samples["pgrelay_stats_received_bytes_total", db] == 1000
    assert samples["pgrelay_stats_sent_bytes_total", db] == 5000
    assert samples["pgrelay_stats_queries_duration_seconds_total", db] == 1.5
    assert samples["pgrelay_stats_server_in_transaction_seconds_total", db] == 2.5
    assert samples["pgrelay_stats_client_wait_seconds_total", db] == 0.25

    def bucket(name, le):
        return samples[name + "_bucket", frozenset({"database": "db", "le": le}.items())]

    assert bucket("pgrelay_query_duration_seconds", "0.0005") == 25
    assert bucket("pgrelay_query_duration_seconds", "300.0") == 25
    assert bucket("pgrelay_query_duration_seconds", "+Inf") == 30
    assert samples["pgrelay_query_duration_seconds_count", db] == 30
    assert samples["pgrelay_query_duration_seconds_sum", db] == 1.5
    assert bucket("pgrelay_transaction_duration_seconds", "0.0025") == 0
    assert bucket("pgrelay_transaction_duration_seconds", "0.005") == 20
    assert bucket("pgrelay_queue_wait_seconds", "0.001") == 4
    assert samples["pgrelay_queue_wait_seconds_sum", db] == 0.25
    pool_labels = frozenset({"database": "db", "user": "alice"}.items())
    assert samples["pgrelay_pools_client_active_connections", pool_labels] == 0
    assert samples["pgrelay_pools", frozenset()] == 1
    assert samples["pgrelay_up", frozenset()] == 1
    routed = frozenset({"plugin": "local_pooler", "outcome": "route"}.items())
    assert samples["pgrelay_route_decisions_total", routed] == 1
    # The worst case of this configuration: max_db_connections of the database's host.
    assert samples["pgrelay_budget_server_connections", frozenset({"host": "127.0.0.1:1"}.items())] == 15


def test_route_decisions_name_the_deciding_plugin(tmp_path):
    relay = make_relay(tmp_path)

    class Router:
        @staticmethod
        @hookimpl
        def pgrelay_route_client(login):
            if login.database == "mine":
                return Reject("not here")
            return None

    relay.pm.register(Router(), name="my_router")
    assert relay.route_client(login(database="mine")).message == "not here"
    assert relay.route_client(login(database="db")).name == "db/alice"
    assert relay.route_client(login(database="nowhere")).message == "no such database: nowhere"
    assert relay.route_decisions == {("my_router", "reject"): 1, ("local_pooler", "route"): 1,
                                     ("local_pooler", "reject"): 1}


def test_auth_failures_counted_by_reason(tmp_path):
    relay = make_relay(tmp_path)
    metrics.pgrelay_auth_failed(relay=relay, login=login(), reason="password")
    metrics.pgrelay_auth_failed(relay=relay, login=login(), reason="password")
    metrics.pgrelay_auth_failed(relay=relay, login=login(), reason="no_method")
    samples = collected(relay)
    assert samples["pgrelay_auth_failures_total", frozenset({"reason": "password"}.items())] == 2
    assert samples["pgrelay_auth_failures_total", frozenset({"reason": "no_method"}.items())] == 1
    # A reload keeps them.
    assert relay.reload() is True
    assert collected(relay)["pgrelay_auth_failures_total", frozenset({"reason": "password"}.items())] == 2


def test_exporter_names_map_one_to_one():
    """Every pgbouncer_exporter family has its pgrelay_ twin, and the collector emits each of them."""
    assert all(theirs.replace("pgbouncer_", "pgrelay_", 1) == ours for theirs, ours in metrics.EXPORTER_NAMES.items())


def test_every_exporter_family_is_emitted(tmp_path):
    relay = make_relay(tmp_path)
    relay.get_pool(relay.route_client(login()))
    names = {name for name, _ in collected(relay)}
    missing = [ours for ours in metrics.EXPORTER_NAMES.values() if ours not in names]
    assert not missing


def test_unbounded_budget_is_inf(tmp_path):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\n* = host=127.0.0.1 port=1\n[pgbouncer]\nauth_type = trust\n")
    relay = Relay(str(path), env={})
    assert collected(relay)["pgrelay_budget_server_connections", frozenset({"host": "127.0.0.1:1"}.items())] \
        == math.inf
