"""The admin console: PgBouncer's virtual database `pgbouncer` (also `pgrelay`), a built-in plugin."""

from __future__ import annotations

from dataclasses import dataclass, field

from pgrelay import hookimpl
from pgrelay.settings import LIST, Setting, declare

# Importing the command modules registers their commands (commands.COMMANDS).
from . import control, show_config, show_misc, show_pgrelay, show_pools, show_stats  # noqa: F401
from .commands import CommandTable
from .console import NAMES, Console

SETTINGS = [
    Setting("admin_users", LIST, "", True,
            "Comma-separated users who may run every admin console command (database pgbouncer)."),
    Setting("stats_users", LIST, "", True,
            "Comma-separated users who may log in to the admin console and run its read-only SHOW commands."),
]

pgrelay_add_settings = declare(SETTINGS)


@dataclass
class ConsoleStats:
    """The console's own counters: its database `pgbouncer` in SHOW STATS, as in PgBouncer."""

    xact_count: int = 0
    query_count: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0


@dataclass
class AdminState:
    table: CommandTable
    stats: ConsoleStats = field(default_factory=ConsoleStats)


@hookimpl
def pgrelay_configure(relay):
    """Build the command table: the built-in commands plus those plugins add (pgrelay_admin_commands)."""
    table = CommandTable()
    relay.admin_commands(table)
    old = relay.plugin_data.get("admin")
    relay.plugin_data["admin"] = AdminState(table, old.stats if old is not None else ConsoleStats())
    show_stats.snapshots(relay)  # the averages count from startup, as PgBouncer's stats_setup


@hookimpl(trylast=True)
def pgrelay_virtual_database(relay, login):
    if login.database not in NAMES:
        return None
    state = relay.plugin_data["admin"]
    return Console(relay, state.table, state.stats)


@hookimpl
def pgrelay_report_stats(relay, stats):
    """Each stats_period: turn the snapshots SHOW STATS averages over (PgBouncer's older_stats)."""
    show_stats.snapshots(relay).tick(show_stats.per_database(relay))
