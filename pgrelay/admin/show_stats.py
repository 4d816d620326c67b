"""SHOW STATS, STATS_TOTALS, STATS_AVERAGES and TOTALS: pool statistics per database, as PgBouncer's stats.c.

Totals are since start; averages cover the time since the stats_period tick before the last one
(PgBouncer's older_stats), so they are rates per second and mean times in microseconds.
"""

from __future__ import annotations

import time
from decimal import Decimal

from .commands import ResultSet, command
from .show_pools import ADMIN_DB, pool_database

# The counters, in PgBouncer's order (PgBouncer 1.25/1.26 SHOW STATS); parse and bind counts come from
# named prepared statement tracking (pgrelay.prepared, max_prepared_statements).
FIELDS = ("server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent",
          "xact_time", "query_time", "wait_time", "client_parse_count", "server_parse_count", "bind_count")
STATS_COLUMNS = [("database", "text")] + [(name, "numeric") for name in (
    "total_server_assignment_count", "total_xact_count", "total_query_count", "total_received", "total_sent",
    "total_xact_time", "total_query_time", "total_wait_time", "total_client_parse_count",
    "total_server_parse_count", "total_bind_count", "avg_server_assignment_count", "avg_xact_count",
    "avg_query_count", "avg_recv", "avg_sent", "avg_xact_time", "avg_query_time", "avg_wait_time",
    "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count")]
STATS_TOTALS_COLUMNS = [("database", "text")] + [(name, "numeric") for name in FIELDS]
STATS_AVERAGES_COLUMNS = [("database", "text")] + [(name, "numeric") for name in (
    "server_assignment_count", "xact_count", "query_count", "bytes_received", "bytes_sent", "xact_time",
    "query_time", "wait_time", "avg_client_parse_count", "avg_server_parse_count", "avg_bind_count")]
TOTALS_COLUMNS = [("name", "text"), ("value", "numeric")]
# SHOW TOTALS row names: PgBouncer's WTOTAL/WAVG macros over its PgStats fields.
TOTALS_NAMES = ("server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes",
                "xact_time", "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count",
                "ps_bind_count")


def counters(stats) -> list[int]:
    """A PoolStats (or the console's) as PgBouncer's integers: times in microseconds."""
    return [int(getattr(stats, "server_assignment_count", 0)), int(stats.xact_count), int(stats.query_count),
            int(stats.bytes_received), int(stats.bytes_sent), int(getattr(stats, "xact_time", 0) * 1_000_000),
            int(getattr(stats, "query_time", 0) * 1_000_000), int(getattr(stats, "wait_time", 0) * 1_000_000),
            int(getattr(stats, "client_parse_count", 0)), int(getattr(stats, "server_parse_count", 0)),
            int(getattr(stats, "bind_count", 0))]


class Snapshots:
    """PgBouncer's newer_stats/older_stats per database, turned at each stats_period tick."""

    def __init__(self):
        now = time.monotonic()
        self.new_stamp, self.old_stamp = now, now - 1.0
        self.newer: dict[str, list[int]] = {}
        self.older: dict[str, list[int]] = {}

    def tick(self, current: dict[str, list[int]]) -> None:
        self.older, self.newer = self.newer, current
        self.old_stamp, self.new_stamp = self.new_stamp, time.monotonic()


def snapshots(relay) -> Snapshots:
    return relay.plugin_data.setdefault("admin_stats", Snapshots())


def per_database(relay) -> dict[str, list[int]]:
    """Totals summed per database name, the console's own `pgbouncer` last, as PgBouncer lists them."""
    totals: dict[str, list[int]] = {}
    for pool in list(relay.pools.values()):
        values = counters(pool.stats)
        name = pool_database(pool)
        if name in totals:
            totals[name] = [a + b for a, b in zip(totals[name], values)]
        else:
            totals[name] = values
    console = relay.plugin_data.get("admin")
    if console is not None:
        totals[ADMIN_DB] = counters(console.stats)
    return totals


def averages(current: list[int], old: list[int], seconds: float) -> list[int]:
    """PgBouncer's calc_average: counts and bytes per second; times per transaction, query, assignment."""
    if seconds <= 0:
        return [0] * len(FIELDS)
    delta = [a - b for a, b in zip(current, old)]
    assigned, xacts, queries = delta[0], delta[1], delta[2]
    rate = lambda n: int(n / seconds)  # noqa: E731
    return [rate(assigned), rate(xacts), rate(queries), rate(delta[3]), rate(delta[4]),
            delta[5] // xacts if xacts > 0 else 0, delta[6] // queries if queries > 0 else 0,
            delta[7] // assigned if assigned > 0 else 0, rate(delta[8]), rate(delta[9]), rate(delta[10])]


def _rows(relay):
    snap = snapshots(relay)
    seconds = time.monotonic() - snap.old_stamp
    for name, values in per_database(relay).items():
        old = snap.older.get(name, [0] * len(FIELDS))
        yield name, values, averages(values, old, seconds)


def _n(values):
    return [Decimal(v) for v in values]


@command("SHOW STATS", doc="Statistics per database: totals and averages", admin=False)
def show_stats(ctx, arg):
    return ResultSet(STATS_COLUMNS, [(name, *_n(total), *_n(avg)) for name, total, avg in _rows(ctx.relay)])


@command("SHOW STATS_TOTALS", doc="Statistics per database: totals", admin=False)
def show_stats_totals(ctx, arg):
    return ResultSet(STATS_TOTALS_COLUMNS, [(name, *_n(total)) for name, total, _ in _rows(ctx.relay)])


@command("SHOW STATS_AVERAGES", doc="Statistics per database: averages", admin=False)
def show_stats_averages(ctx, arg):
    return ResultSet(STATS_AVERAGES_COLUMNS, [(name, *_n(avg)) for name, _, avg in _rows(ctx.relay)])


@command("SHOW TOTALS", doc="Statistics of all databases together", admin=False)
def show_totals(ctx, arg):
    relay = ctx.relay
    snap = snapshots(relay)
    current = per_database(relay)
    total = [sum(values[i] for values in current.values()) for i in range(len(FIELDS))]
    old = [sum(values[i] for values in snap.older.values()) for i in range(len(FIELDS))]
    avg = averages(total, old, time.monotonic() - snap.old_stamp)
    rows = [(f"total_{name}", Decimal(value)) for name, value in zip(TOTALS_NAMES, total)]
    rows += [(f"avg_{name}", Decimal(value)) for name, value in zip(TOTALS_NAMES, avg)]
    return ResultSet(TOTALS_COLUMNS, rows)
