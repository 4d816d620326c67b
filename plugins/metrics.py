"""Prometheus metrics on metrics_listen: a built-in plugin reading pgrelay's pools, clients and servers.

``metrics_listen = host:port`` serves ``/metrics`` from pgrelay's own process, in a greenlet
(gevent's WSGIServer with prometheus_client's WSGI app and a CollectorRegistry of this relay's
own): no thread, and nothing is counted for it on the relay loop. Every figure is read from the
relay's state when Prometheus scrapes (a custom Collector), so the numbers are those SHOW POOLS and
SHOW STATS show at that moment.

Names: the families PgBouncer's prometheus-community exporter derives from SHOW POOLS, SHOW STATS
and SHOW LISTS have the same names with ``pgrelay_`` for ``pgbouncer_`` (the mapping table is
``EXPORTER_NAMES``), so a dashboard for that exporter works after a prefix change. pgrelay's own
families (client and server states, duration histograms, disconnect and authentication failure
reasons, routing decisions, host health, the connection budget) follow.

Labels never carry a secret or text a client chose freely: disconnect reasons are pgrelay's fixed
texts with anything quoted, after a colon or containing a digit cut off, and at most
MAX_REASONS distinct ones (later ones count as "other"); authentication failures carry only
client_auth.FAILURE_REASONS; databases and users are those of pools (which exist only for logins
that were routed).

With workers (``workers = N``) worker 0 serves metrics_listen for all of them: at each scrape it
asks the other workers for their exposition (over the parent, pgrelay.workers.link) and adds the
samples up, label set by label set; the families in SAME_IN_EVERY_WORKER (settings, health,
budget, maxima) take the largest value instead.
"""

from __future__ import annotations

import collections
import logging
import math
import re
import time
from dataclasses import dataclass, field

import gevent
from gevent.pywsgi import WSGIServer
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from pgrelay import hookimpl
from pgrelay.errors import ConfigError
from pgrelay.pool import (CL_LOGIN, CL_WAITING, CLIENT_STATE_NAMES, DURATION_BUCKETS, SERVER_STATE_NAMES, SV_ACTIVE,
                          SV_DRAIN, SV_LOGIN, SV_RESET, SV_SYNC, SV_TESTED)
from pgrelay.settings import STR, Setting, declare

log = logging.getLogger("pgrelay.metrics")

SETTINGS = [
    Setting("metrics_listen", STR, "", False,
            "host:port on which to serve Prometheus metrics at /metrics (e.g. 127.0.0.1:9127; *:9127 for "
            "every address); empty: off, nothing listens."),
]
pgrelay_add_settings = declare(SETTINGS)

# Families of PgBouncer's prometheus-community exporter (pgbouncer_exporter) and the pgrelay family
# of the same figure: the same name with pgrelay_ for pgbouncer_ (its SHOW column in the comment).
EXPORTER_NAMES = {
    "pgbouncer_up": "pgrelay_up",
    "pgbouncer_pools_client_active_connections": "pgrelay_pools_client_active_connections",   # cl_active
    "pgbouncer_pools_client_waiting_connections": "pgrelay_pools_client_waiting_connections",  # cl_waiting
    "pgbouncer_pools_server_active_connections": "pgrelay_pools_server_active_connections",   # sv_active
    "pgbouncer_pools_server_idle_connections": "pgrelay_pools_server_idle_connections",       # sv_idle
    "pgbouncer_pools_server_used_connections": "pgrelay_pools_server_used_connections",       # sv_used
    "pgbouncer_pools_server_testing_connections": "pgrelay_pools_server_testing_connections", # sv_tested
    "pgbouncer_pools_server_login_connections": "pgrelay_pools_server_login_connections",     # sv_login
    "pgbouncer_pools_client_maxwait_seconds": "pgrelay_pools_client_maxwait_seconds",         # maxwait
    "pgbouncer_stats_queries_pooled_total": "pgrelay_stats_queries_pooled_total",             # total_query_count
    "pgbouncer_stats_sql_transactions_pooled_total": "pgrelay_stats_sql_transactions_pooled_total",  # total_xact_count
    "pgbouncer_stats_server_assignments_total":
        "pgrelay_stats_server_assignments_total",                              # total_server_assignment_count
    "pgbouncer_stats_received_bytes_total": "pgrelay_stats_received_bytes_total",             # total_received
    "pgbouncer_stats_sent_bytes_total": "pgrelay_stats_sent_bytes_total",                     # total_sent
    "pgbouncer_stats_queries_duration_seconds_total":
        "pgrelay_stats_queries_duration_seconds_total",                                       # total_query_time
    "pgbouncer_stats_server_in_transaction_seconds_total":
        "pgrelay_stats_server_in_transaction_seconds_total",                                  # total_xact_time
    "pgbouncer_stats_client_wait_seconds_total": "pgrelay_stats_client_wait_seconds_total",   # total_wait_time
    "pgbouncer_config_max_client_connections": "pgrelay_config_max_client_connections",       # max_client_conn
    "pgbouncer_pools": "pgrelay_pools",                                                       # SHOW LISTS pools
    "pgbouncer_used_clients": "pgrelay_used_clients",                                         # SHOW LISTS used_clients
    "pgbouncer_login_clients": "pgrelay_login_clients",                                       # SHOW LISTS login_clients
    "pgbouncer_used_servers": "pgrelay_used_servers",                                         # SHOW LISTS used_servers
}

MAX_REASONS = 100          # distinct disconnect reasons with a label of their own, per side
_QUOTED = re.compile(r"\"[^\"]*\"?|'[^']*'?")
_DIGITS = re.compile(r"\S*\d\S*")
_CUT = re.compile(r"[:(\[{=]")


def reason_label(reason: str) -> str:
    """A disconnect reason as a bounded label: pgrelay's fixed text without what varies (quoted
    names, anything after a colon, bracket or '=', words with digits: addresses, ids, numbers)."""
    text = _DIGITS.sub(" ", _QUOTED.sub(" ", reason))
    text = _CUT.split(text, 1)[0]
    text = " ".join(text.split())[:80].strip(" ,;.-")
    return text or "other"


def _by_state(name: str, doc: str, states, connections) -> GaugeMetricFamily:
    """A gauge of `connections` counted by state name (CLIENT_STATE_NAMES / SERVER_STATE_NAMES), every
    state in `states` present, zero or not."""
    family = GaugeMetricFamily(name, doc, labels=["state"])
    counts = dict.fromkeys(states, 0)
    for conn in connections:
        state = conn.state_name
        if state in counts:
            counts[state] += 1
    for state, value in counts.items():
        family.add_metric([state], value)
    return family


@dataclass
class MetricsState:
    """What outlives a reload: the counters the plugin keeps, the HTTP server, the known limits."""

    auth_failures: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, set[str]] = field(default_factory=lambda: {"client": set(), "server": set()})
    server: WSGIServer | None = None
    listen: tuple[str, int] | None = None
    limits: dict = field(default_factory=dict)          # HostAddr -> ServerLimits read from the host
    budget: tuple | None = None                          # (config object, {HostAddr: worst case})
    reader: gevent.Greenlet | None = None


def state(relay) -> MetricsState:
    current = relay.plugin_data.get("metrics")
    if current is None:
        current = relay.plugin_data["metrics"] = MetricsState()
    return current


def parse_listen(value: str) -> tuple[str, int] | None:
    """'host:port', '[v6]:port' or '*:port' -> (host, port); '' -> None (off)."""
    value = value.strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics_listen = {value}: expected host:port (e.g. 127.0.0.1:9127)")
    return ("0.0.0.0" if host == "*" else host), int(port)


# -- hooks --------------------------------------------------------------------------------------

@hookimpl
def pgrelay_configure(relay):
    listen = parse_listen(relay.config.metrics_listen)
    old = state(relay)
    if old.server is None:  # metrics_listen is read at startup only (reload=False)
        relay.plugin_data["metrics"] = MetricsState(old.auth_failures, old.reasons, None, listen, old.limits)


@hookimpl
def pgrelay_startup(relay):
    current = state(relay)
    if current.listen is None:
        return
    own = CollectorRegistry(auto_describe=False)
    own.register(RelayCollector(relay))
    if relay.worker is not None:
        relay.worker.answerers["metrics"] = lambda: generate_latest(own).decode()
        if relay.worker.index != 0:
            return  # worker 0 serves metrics_listen for every worker
        registry = CollectorRegistry(auto_describe=False)
        registry.register(WorkersCollector(relay, own))
    else:
        registry = own
    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)
        if path in ("", "/"):
            start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"pgrelay: metrics at /metrics\n"]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are at /metrics\n"]

    host, port = current.listen
    server = WSGIServer((host, port), app, log=None, error_log=log)
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(f"metrics_listen = {relay.config.metrics_listen}: cannot listen on {host}:{port}: "
                          f"{exc.strerror or exc}") from None
    current.server = server
    log.info("metrics: listening on http://%s:%d/metrics", host, port)
    _read_limits_later(relay)


@hookimpl
def pgrelay_reload(relay, changed):
    if state(relay).server is not None:
        _read_limits_later(relay)


@hookimpl
def pgrelay_shutdown(relay, mode):
    current = state(relay)
    if current.reader is not None:
        current.reader.kill(block=False)
    if current.server is not None:
        current.server.stop(timeout=0)
        current.server = None


@hookimpl
def pgrelay_auth_failed(relay, login, reason):
    counts = state(relay).auth_failures
    counts[reason] = counts.get(reason, 0) + 1


# -- the connection budget ----------------------------------------------------------------------

def budget(relay) -> dict:
    """{HostAddr: most server connections this configuration lets pgrelay open} (pgrelay check's
    worst case per process), computed once per loaded configuration."""
    current = state(relay)
    cached = current.budget
    if cached is not None and cached[0] is relay.config:
        return cached[1]
    from pgrelay.budget import model
    try:
        built = model.build(relay)
        hosts = {addr: model.host_budget(built, addr).per_process for addr in built.postgres_hosts}
    except Exception as exc:  # a configuration the model cannot count: no budget families
        log.debug("metrics: no connection budget: %s", exc)
        hosts = {}
    current.budget = (relay.config, hosts)
    return hosts


def _read_limits_later(relay) -> None:
    """Read max_connections of each host of the budget in the background (as pgrelay check --live
    does, as health_check_user); hosts that cannot be read have no limit figure."""
    current = state(relay)
    if current.reader is not None:
        current.reader.kill(block=False)

    def read():
        from pgrelay.budget.live import LiveError, read_limits
        for addr in list(budget(relay)):
            try:
                current.limits[addr] = read_limits(relay, addr, timeout=relay.config.health_check_timeout)
            except LiveError as exc:
                log.debug("metrics: %s", exc)

    current.reader = gevent.spawn(read)


# -- the collector ------------------------------------------------------------------------------

def _hist_buckets(counts: list[int]) -> list[tuple[str, float]]:
    """Cumulative buckets from PoolStats' per-bucket counts (the last one is +Inf)."""
    out, total = [], 0
    for bound, count in zip(DURATION_BUCKETS, counts):
        total += count
        out.append((floatToGoString(bound), total))
    out.append(("+Inf", total + counts[-1]))
    return out


# Families every worker reports alike or as a maximum: with workers, the largest value, not the sum.
SAME_IN_EVERY_WORKER = re.compile(r"^pgrelay_(up|config_.*|host_.*|budget_.*|pools_client_maxwait_seconds)$")


class WorkersCollector:
    """workers = N, in worker 0: its own families and every other worker's, added up."""

    def __init__(self, relay, own: CollectorRegistry):
        self.relay = relay
        self.own = own

    def collect(self):
        texts = [generate_latest(self.own).decode()]
        texts += [text for _, text in sorted(self.relay.worker.ask_others("metrics").items())]
        families: dict[str, Metric] = {}
        values: dict[str, dict] = {}
        for text in texts:
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type)
                    values[family.name] = {}
                largest = SAME_IN_EVERY_WORKER.match(family.name) is not None
                samples = values[family.name]
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if key not in samples:
                        samples[key] = sample.value
                    elif largest:
                        samples[key] = max(samples[key], sample.value)
                    else:
                        samples[key] += sample.value
        for name, merged in families.items():
            for (sample_name, labels), value in values[name].items():
                merged.add_sample(sample_name, dict(labels), value)
            yield merged


class RelayCollector:
    """Reads the relay at scrape time (in the scrape's greenlet: nothing else runs meanwhile)."""

    def __init__(self, relay):
        self.relay = relay

    def collect(self):
        from pgrelay.admin.show_pools import pool_database, pool_user
        relay = self.relay
        now = time.monotonic()
        pools = list(relay.pools.values())
        yield GaugeMetricFamily("pgrelay_up", "pgrelay is serving (pgbouncer_up)", value=1)

        # SHOW POOLS, per (database, user)
        labels = ["database", "user"]
        families = {key: GaugeMetricFamily(f"pgrelay_pools_{key}", doc, labels=labels) for key, doc in (
            ("client_active_connections", "Clients linked to a server or idle with no query waiting (cl_active)"),
            ("client_waiting_connections", "Clients that sent queries and wait for a server (cl_waiting)"),
            ("server_active_connections", "Servers linked to a client (sv_active)"),
            ("server_idle_connections", "Servers unused and usable at once (sv_idle)"),
            ("server_used_connections", "Servers idle past server_check_delay, to be checked (sv_used)"),
            ("server_testing_connections", "Servers running server_reset_query or server_check_query (sv_tested)"),
            ("server_login_connections", "Servers logging in (sv_login)"),
            ("client_maxwait_seconds", "How long the oldest waiting client has waited (maxwait)"),
            ("client_pinned_connections", "Clients pinned to their server by session state (session_state = pin)"),
        )}
        logins = CounterMetricFamily("pgrelay_server_logins", "Server connections that logged in", labels=labels)
        failures = CounterMetricFamily("pgrelay_server_login_failures", "Server logins that failed", labels=labels)
        rollbacks = CounterMetricFamily("pgrelay_server_rollbacks", "Servers rolled back and reused after their "
                                        "client left mid-transaction (server_rollback_timeout)", labels=labels)
        rollback_failures = CounterMetricFamily("pgrelay_server_rollback_failures", "Servers closed because their "
                                                "rollback after the client left did not finish", labels=labels)
        per_db: dict[str, list] = {}
        for pool in pools:
            database, user = pool_database(pool), pool_user(pool)
            waiting = [c for c in pool.waiting if c.state == CL_WAITING]
            active = tested = login = 0
            for server in pool.servers:
                s = server.state
                if s in (SV_ACTIVE, SV_SYNC, SV_DRAIN):
                    active += 1
                elif s in (SV_TESTED, SV_RESET):
                    tested += 1
                elif s == SV_LOGIN:
                    login += 1
            values = {
                "client_active_connections": max(pool.nclients - len(waiting), 0),
                "client_waiting_connections": len(waiting),
                "server_active_connections": active,
                "server_idle_connections": len(pool.idle),
                "server_used_connections": len(pool.used),
                "server_testing_connections": tested,
                "server_login_connections": login,
                "client_maxwait_seconds": now - waiting[0].wait_start if waiting else 0.0,
                "client_pinned_connections": pool.pinned,
            }
            for key, value in values.items():
                families[key].add_metric([database, user], value)
            stats = pool.stats
            logins.add_metric([database, user], stats.server_logins)
            failures.add_metric([database, user], stats.server_login_failures)
            rollbacks.add_metric([database, user], stats.server_rollbacks)
            rollback_failures.add_metric([database, user], stats.server_rollback_failures)
            per_db.setdefault(database, []).append(stats)
        yield from families.values()
        yield logins
        yield failures
        yield rollbacks
        yield rollback_failures

        # SHOW STATS, per database
        stat_families = (
            ("queries_pooled", "SQL queries pooled (total_query_count)", "query_count", 1),
            ("sql_transactions_pooled", "SQL transactions pooled (total_xact_count)", "xact_count", 1),
            ("server_assignments", "Times a server was assigned to a client (total_server_assignment_count)",
             "server_assignment_count", 1),
            ("received_bytes", "Bytes received from clients (total_received)", "bytes_received", 1),
            ("sent_bytes", "Bytes sent to clients (total_sent)", "bytes_sent", 1),
            ("queries_duration_seconds", "Seconds with queries running (total_query_time)", "query_time", 1),
            ("server_in_transaction_seconds", "Seconds in transactions, idle in transaction included "
             "(total_xact_time)", "xact_time", 1),
            ("client_wait_seconds", "Seconds clients waited for a server (total_wait_time)", "wait_time", 1),
        )
        for name, doc, attr, _ in stat_families:
            family = CounterMetricFamily(f"pgrelay_stats_{name}", doc, labels=["database"])
            for database, stats_list in per_db.items():
                family.add_metric([database], sum(getattr(s, attr) for s in stats_list))
            yield family
        for name, doc, hist, total in (
                ("pgrelay_queue_wait_seconds", "Time clients waited for a server, per wait that ended with one",
                 "wait_hist", "wait_time"),
                ("pgrelay_transaction_duration_seconds", "Transactions by duration (first query to back at idle)",
                 "xact_hist", "xact_time"),
                ("pgrelay_query_duration_seconds", "Query rounds by duration (sent to last ReadyForQuery)",
                 "query_hist", "query_time")):
            family = HistogramMetricFamily(name, doc, labels=["database"])
            for database, stats_list in per_db.items():
                counts = [sum(column) for column in zip(*(getattr(s, hist) for s in stats_list))]
                family.add_metric([database], _hist_buckets(counts), sum(getattr(s, total) for s in stats_list))
            yield family

        # SHOW LISTS and the configuration
        clients = list(relay.clients.values())
        servers = [server for pool in pools for server in pool.servers]
        yield GaugeMetricFamily("pgrelay_config_max_client_connections", "max_client_conn",
                                value=relay.config.max_client_conn)
        yield GaugeMetricFamily("pgrelay_pools", "Pools (SHOW LISTS pools)", value=len(pools))
        yield GaugeMetricFamily("pgrelay_used_clients", "Client connections (SHOW LISTS used_clients)",
                                value=len(clients))
        yield GaugeMetricFamily("pgrelay_login_clients", "Clients logging in (SHOW LISTS login_clients)",
                                value=sum(1 for c in clients if c.state == CL_LOGIN))
        yield GaugeMetricFamily("pgrelay_used_servers", "Server connections (SHOW LISTS used_servers)",
                                value=len(servers))

        # pgrelay's own
        yield _by_state("pgrelay_clients", "Client connections by state", CLIENT_STATE_NAMES[:4], clients)
        yield _by_state("pgrelay_servers", "Server connections by state",
                        [n for n in SERVER_STATE_NAMES if n != "closed"], servers)

        by_listener = GaugeMetricFamily("pgrelay_listener_clients", "Client connections by listener and transport "
                                        "(postgres, websocket, http)", labels=["listener", "transport"])
        counts = collections.Counter((c.listener.name, c.transport.kind if c.transport is not None else "postgres")
                                     for c in clients)
        for (name, kind), count in sorted(counts.items()):
            by_listener.add_metric([name, kind], count)
        yield by_listener
        requests = CounterMetricFamily("pgrelay_serverless_requests", "Serverless HTTP requests answered, by "
                                       "listener and status (WebSocket upgrades count as 101)",
                                       labels=["listener", "status"])
        for (name, status), count in sorted(relay.plugin_data.get("serverless_requests", {}).items()):
            requests.add_metric([name, str(status)], count)
        yield requests

        yield self._disconnects(relay)
        failures = CounterMetricFamily("pgrelay_auth_failures", "Clients that failed authentication, by reason",
                                       labels=["reason"])
        for reason, count in sorted(state(relay).auth_failures.items()):
            failures.add_metric([reason], count)
        yield failures
        decisions = CounterMetricFamily("pgrelay_route_decisions", "Logins routed, by the plugin that decided "
                                        "(pgrelay_route_client) and the outcome", labels=["plugin", "outcome"])
        for (plugin, outcome), count in sorted(relay.route_decisions.items()):
            decisions.add_metric([plugin, outcome], count)
        yield decisions
        yield from self._health(relay, now)
        yield from self._budget(relay)

    def _disconnects(self, relay):
        family = CounterMetricFamily("pgrelay_disconnects", "Connections closed, by side and reason",
                                     labels=["side", "reason"])
        admitted = state(relay).reasons
        totals: dict[tuple[str, str], int] = {}
        for reason, count in list(relay.disconnects.items()):
            side = "client"
            if reason.startswith("server: "):
                side, reason = "server", reason[len("server: "):]
            label = reason_label(reason)
            known = admitted[side]
            if label not in known:
                if len(known) >= MAX_REASONS:
                    label = "other"
                else:
                    known.add(label)
            totals[side, label] = totals.get((side, label), 0) + count
        for (side, label), count in sorted(totals.items()):
            family.add_metric([side, label], count)
        return family

    def _health(self, relay, now: float):
        up = GaugeMetricFamily("pgrelay_host_up", "The last health check reached the host", labels=["host"])
        primary = GaugeMetricFamily("pgrelay_host_primary", "1: primary, 0: standby (known once a check succeeded)",
                                    labels=["host"])
        lag = GaugeMetricFamily("pgrelay_host_replication_lag_seconds", "Replica lag the last check measured",
                                labels=["host"])
        age = GaugeMetricFamily("pgrelay_host_check_age_seconds", "Seconds since the host was last checked",
                                labels=["host"])
        for addr, host in sorted(relay.health.states.items(), key=lambda item: str(item[0])):
            name = str(addr)
            up.add_metric([name], int(host.up))
            if host.in_recovery is not None:
                primary.add_metric([name], int(not host.in_recovery))
            if host.up:
                lag.add_metric([name], host.lag)
            if host.checked_at:
                age.add_metric([name], now - host.checked_at)
        return up, primary, lag, age

    def _budget(self, relay):
        worst = GaugeMetricFamily("pgrelay_budget_server_connections",
                                  "Most server connections this configuration lets pgrelay open to the host "
                                  "(pgrelay check's worst case; +Inf: unbounded)", labels=["host"])
        limit = GaugeMetricFamily("pgrelay_budget_max_connections", "The host's max_connections (read from it)",
                                  labels=["host"])
        slots = GaugeMetricFamily("pgrelay_budget_available_slots",
                                  "max_connections less superuser_reserved_connections and reserved_connections",
                                  labels=["host"])
        known = state(relay).limits
        for addr, value in sorted(budget(relay).items(), key=lambda item: str(item[0])):
            worst.add_metric([str(addr)], math.inf if value == math.inf else value)
            limits = known.get(addr)
            if limits is not None:
                limit.add_metric([str(addr)], limits.max_connections)
                slots.add_metric([str(addr)], limits.slots)
        return worst, limit, slots
