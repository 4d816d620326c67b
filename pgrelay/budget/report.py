"""Formats the connection budget as text: one table per host, its verdict, and a closing result line."""

from __future__ import annotations

from dataclasses import dataclass

from .flow import INF
from .model import Budget, HostBudget
from .verdict import CAN_EXCEED, FITS, LIVE_FAILED, NO_ROOM, ServerLimits, Verdict

LABEL_WIDTH = 40
VALUE_WIDTH = 9


@dataclass
class HostReport:
    """One host: its worst case and, for PostgreSQL hosts, its limits and verdict (or why --live failed)."""

    budget: HostBudget
    limits: ServerLimits | None = None
    verdict: Verdict | None = None
    error: str = ""

    @property
    def status(self) -> int | None:
        if self.error:
            return LIVE_FAILED
        return self.verdict.status if self.verdict else None


def n(value: float) -> str:
    return "unbounded" if value == INF else str(int(value))


def row(label: str, value, comment: str = "") -> str:
    text = value if isinstance(value, str) else n(value)
    line = f"  {label:<{LABEL_WIDTH}}{text:>{VALUE_WIDTH}}"
    return f"{line}  {comment}" if comment else line


def render(path: str, processes: int, budget: Budget, hosts: list[HostReport], status: int) -> str:
    processes_text = f"{processes} pgrelay process{'es' if processes != 1 else ''}"
    out = [f"pgrelay check: {path}, {processes_text}"]
    out += [f"note: {note}" for note in budget.notes]
    if not hosts:
        out += ["", "no server host is configured ([databases] is empty): pgrelay opens no server connection"]
    for host in hosts:
        out.append("")
        out += _host(host, budget)
    out += ["", _result(hosts, status)]
    return "\n".join(out) + "\n"


def _host(report: HostReport, budget: Budget) -> list[str]:
    b = report.budget
    if b.postgres:
        out = [f"PostgreSQL {b.addr}"]
    else:
        out = [f"upstream pooler {b.addr} (not PostgreSQL: these are client connections there, "
               "counted against its max_client_conn)"]
    formula = b.sizes
    if b.uncounted:
        formula = " + ".join(x for x in [formula, "pools of " + " and of ".join(b.uncounted)] if x)
    # each transaction/statement pool's size includes its listening server (LISTEN, pgrelay.notify)
    out.append(row("pools x (size + reserve + listening)", b.pool_sizes, formula))
    out.append(row("pools under their caps", b.pooled, "; ".join(b.pooled_bounds) if b.pooled != b.pool_sizes
                   else ""))
    if not b.postgres:
        pass  # direct ports connect to PostgreSQL only
    elif not budget.direct_port:
        out.append(row("direct connections", 0, "no direct listener"))
    elif b.direct == INF:
        out.append(row("direct connections", b.direct, "max_direct_connections = 0 (no limit)"))
    else:
        sets = f"{b.direct_sets} host set{'s' if b.direct_sets != 1 else ''}"
        out.append(row("direct connections", b.direct, f"max_direct_connections for {sets}"))
    if b.combined_bounds:
        out.append(row("pools and direct, under shared caps", b.combined, "; ".join(b.combined_bounds)))
    if b.postgres:
        out.append(row("health checks", b.health, "this host is health-checked" if b.health else ""))
        out.append(row("auth_query sessions", b.auth))
    out.append(row("per pgrelay process", b.per_process))
    out.append(row("pgrelay processes", f"x {b.processes}"))
    out.append(row("worst case", b.total))
    if b.unbounded:
        out.append("  unbounded because:")
        shown = b.unbounded[:10]
        out += [f"    - {reason}" for reason in shown]
        if len(b.unbounded) > len(shown):
            out.append(f"    - and {len(b.unbounded) - len(shown)} more of the same kind")
    if not b.postgres:
        return out
    if report.error:
        out.append(f"  COULD NOT READ THE SERVER: {report.error}")
        return out
    limits, verdict = report.limits, report.verdict
    assert limits is not None and verdict is not None
    version = f" (PostgreSQL {limits.version // 10000})" if limits.version else ""
    out.append(row("max_connections", limits.max_connections, limits.sources[0] + version))
    out.append(row("- superuser_reserved_connections", limits.superuser_reserved, limits.sources[1]))
    out.append(row("- reserved_connections", limits.reserved, limits.sources[2]))
    out.append(row("= slots for non-superusers", limits.slots))
    if limits.in_use is not None:
        own = f" ({limits.pgrelay_own} more are pgrelay's own, by application_name)" if limits.pgrelay_own else ""
        out.append(row("- in use now by other clients", limits.others,
                       f"client backends, this check's own not counted{own}"))
    if verdict.left < 0:
        short = f"{n(-verdict.left)} too many" if verdict.left != -INF else ""
        out.append(row("left for direct and admin connections", "none", short))
    else:
        out.append(row("left for direct and admin connections", verdict.left))
    out.append(f"  {verdict.headline}")
    out += [f"    {note}" for note in verdict.notes]
    return out


def _result(hosts: list[HostReport], status: int) -> str:
    judged = [h for h in hosts if h.budget.postgres]
    words = {FITS: "fits", CAN_EXCEED: "CAN EXCEED", NO_ROOM: "FITS BUT LEAVES NOTHING",
             LIVE_FAILED: "COULD NOT READ THE SERVER"}
    if not judged:
        return f"result: nothing to check (exit status {status})"
    if status == FITS:
        return f"result: fits on {_hosts(len(judged))} (exit status {status})"
    count = sum(1 for h in judged if h.status == status)
    return f"result: {words[status]} on {count} of {_hosts(len(judged))} (exit status {status})"


def _hosts(count: int) -> str:
    return f"{count} host{'s' if count != 1 else ''}"
