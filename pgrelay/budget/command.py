"""The `pgrelay check` command: its arguments, its exit statuses, and the steps from config file to verdict."""

from __future__ import annotations

import sys

from ..errors import ConfigError
from ..relay import Relay
from . import model
from .live import LiveError, read_limits
from .report import HostReport, render
from .verdict import BAD_INPUT, ServerLimits, judge, overall, validate

USAGE = """usage: pgrelay check [-c] CONFIG_FILE [--live] [--processes N] [--max-connections N]
                     [--superuser-reserved N] [--reserved N] [--SETTING VALUE ...]

The connection budget: for each PostgreSQL host, the most server connections pgrelay can open
(pools x pool sizes plus reserves, bounded by max_db_connections and max_user_connections,
plus direct ports, health checks and auth_query sessions, times the pgrelay processes), set
against max_connections minus superuser_reserved_connections and reserved_connections.

options:
  --live                    read max_connections, superuser_reserved_connections,
                            reserved_connections and the connections in use from each host,
                            logging in as health_check_user to health_check_dbname (each
                            within server_connect_timeout)
  --processes N             pgrelay processes running this configuration (default 1)
  --max-connections N       PostgreSQL's max_connections (default 100)
  --superuser-reserved N    PostgreSQL's superuser_reserved_connections (default 3)
  --reserved N              PostgreSQL's reserved_connections, 16 and later (default 0)
  --SETTING VALUE           any pgrelay setting, as for `pgrelay FILE` (PGRELAY_<NAME> too)
  -h, --help                this text

With --live, a limit given as an option replaces the value read from the server.

exit status:
  0  fits on every host, with room left for direct and admin connections
  1  can exceed on some host: pgrelay can open more than the server allows, or has no bound
  2  fits, but on some host pgrelay can take every slot: no room left for direct connections
  3  bad input: no or unreadable config file, unknown setting, bad option value
  4  --live could not read some host's settings (the others are still reported)
"""

FLAGS = {"--live", "-h", "--help"}
OPTIONS = {"--processes": 1, "--max-connections": 1, "--superuser-reserved": 0, "--reserved": 0}  # -> minimum


class UsageError(Exception):
    pass


def parse(argv: list[str]) -> tuple[str | None, dict, list[str], set[str]]:
    """(config path, check options, pgrelay --setting arguments, flags), like pgrelay's own command line:
    the check's numeric options are taken out first, the rest is split as `pgrelay FILE` splits it."""
    from ..cli import split_args

    options, remaining = {}, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        if name not in OPTIONS:
            remaining.append(arg)
            i += 1
            continue
        if eq:
            text = inline
            i += 1
        elif i + 1 < len(argv):
            text = argv[i + 1]
            i += 2
        else:
            raise UsageError(f"{name} needs a number")
        try:
            value = int(text)
        except ValueError:
            raise UsageError(f"{name}: invalid integer {text!r}") from None
        if value < OPTIONS[name]:
            raise UsageError(f"{name}: {value} is below the minimum {OPTIONS[name]}")
        options[name] = value

    def error(message: str):
        raise UsageError(message)

    path, rest, flags = split_args(remaining, FLAGS, error)
    return path, options, rest, flags


def given_limits(options: dict, base: ServerLimits | None = None) -> ServerLimits:
    """The server limits: the options given, else what --live read, else PostgreSQL's defaults."""
    base = base or ServerLimits(sources=("PostgreSQL's default",) * 3)
    values, sources = [], []
    for option, current, source in zip(("--max-connections", "--superuser-reserved", "--reserved"),
                                       (base.max_connections, base.superuser_reserved, base.reserved),
                                       base.sources, strict=True):
        if option in options:
            values.append(options[option])
            sources.append(f"given ({option})")
        else:
            values.append(current)
            sources.append(source)
    return ServerLimits(values[0], values[1], values[2], base.in_use, base.pgrelay_own, base.version, tuple(sources))


def main(argv: list[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)

    def fail(message: str) -> int:
        print(f"pgrelay check: error: {message}", file=err)
        return BAD_INPUT

    try:
        path, options, rest, flags = parse(argv)
    except UsageError as exc:
        return fail(f"{exc}\n{USAGE.splitlines()[0]}")
    if flags & {"-h", "--help"}:
        print(USAGE, end="", file=out)
        return 0
    if not path:
        return fail(f"no configuration file given\n{USAGE.splitlines()[0]}")
    defaults = given_limits(options)
    problem = validate(defaults)
    if problem:
        return fail(problem)
    try:
        relay = Relay(path, rest)
        budget = model.build(relay)
    except (ConfigError, model.BudgetError) as exc:
        return fail(str(exc))
    except OSError as exc:
        return fail(f"{path}: {exc.strerror or exc}")
    for warning in relay.config.warnings:
        print(f"pgrelay check: warning: {warning}", file=err)
    processes = options.get("--processes", 1)
    reports = []
    hosts = budget.postgres_hosts + budget.upstream_hosts
    for addr in hosts:
        host = model.host_budget(budget, addr, processes)
        report = HostReport(host)
        if host.postgres:
            limits = defaults
            if "--live" in flags:
                try:
                    limits = given_limits(options, read_limits(relay, addr))
                except LiveError as exc:
                    report.error = str(exc)
                problem = validate(limits)
                if problem and not report.error:
                    report.error = problem
            if not report.error:
                report.limits, report.verdict = limits, judge(host.total, limits)
        reports.append(report)
    statuses = [r.status for r in reports if r.status is not None]
    status = overall(statuses)
    print(render(path, processes, budget, reports, status), end="", file=out)
    return status
