"""Sets a host's worst case against its PostgreSQL connection limits: what is left, the verdict, its exit status.

PostgreSQL lets non-superusers use max_connections minus superuser_reserved_connections minus
reserved_connections (16+, kept for roles with pg_use_reserved_connections) slots. Whatever
pgrelay cannot take of those is what direct clients and administrators can still use.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flow import INF

# Exit statuses of `pgrelay check`.
FITS = 0          # fits, with room left for direct and admin connections
CAN_EXCEED = 1    # pgrelay can open more than PostgreSQL allows (or has no bound at all)
NO_ROOM = 2       # fits, but pgrelay can take every slot: nothing is left for direct connections
BAD_INPUT = 3     # the command line or the configuration is wrong: nothing was checked
LIVE_FAILED = 4   # --live could not read a host's settings (other hosts are still reported)

DEFAULT_MAX_CONNECTIONS = 100   # PostgreSQL's defaults
DEFAULT_SUPERUSER_RESERVED = 3
DEFAULT_RESERVED = 0


@dataclass(frozen=True)
class ServerLimits:
    """A host's connection limits, and (with --live) its client connections in use now."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    superuser_reserved: int = DEFAULT_SUPERUSER_RESERVED
    reserved: int = DEFAULT_RESERVED
    in_use: int | None = None      # client backends other than the check's own (live only)
    pgrelay_own: int = 0           # of those, recognised as pgrelay's by application_name
    version: int | None = None     # server_version_num (live only)
    sources: tuple[str, str, str] = ("PostgreSQL's default",) * 3

    @property
    def slots(self) -> int:
        """Connection slots non-superusers may use."""
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def others(self) -> int:
        return max(0, (self.in_use or 0) - self.pgrelay_own)


def validate(limits: ServerLimits) -> str | None:
    """What PostgreSQL itself would refuse to start with, or None."""
    if limits.max_connections < 1:
        return f"max_connections must be 1 or more (got {limits.max_connections})"
    if limits.superuser_reserved < 0 or limits.reserved < 0:
        return "superuser_reserved_connections and reserved_connections must be 0 or more"
    if limits.superuser_reserved + limits.reserved >= limits.max_connections:
        return (f"superuser_reserved_connections ({limits.superuser_reserved}) plus reserved_connections "
                f"({limits.reserved}) must be less than max_connections ({limits.max_connections}), "
                "as PostgreSQL requires")
    return None


@dataclass(frozen=True)
class Verdict:
    status: int
    headline: str
    notes: tuple[str, ...]
    left: float    # slots left for direct and admin connections (negative: short by that many)


def judge(total: float, limits: ServerLimits) -> Verdict:
    """The verdict for a host that pgrelay can open `total` connections to."""
    slots, su, others = limits.slots, limits.superuser_reserved, limits.others
    busy = f", with the {others} connections other clients hold now" if others else ""
    full = ("past them, logins fail with \"remaining connection slots are reserved for ...\"; past "
            f"max_connections ({limits.max_connections}), with \"sorry, too many clients already\"")
    if total == INF:
        return Verdict(CAN_EXCEED, "UNBOUNDED: nothing limits pgrelay's server connections to this host",
                       ("no room is guaranteed for direct connections or for superuser connections",), -INF)
    left = slots - total - others
    if left < 0:
        notes = [f"no room left for direct connections: pgrelay{busy} can take all {slots} slots "
                 "non-superusers have", full]
        if total + others >= limits.max_connections:
            notes.append("no room left for superuser connections either if pgrelay's server users are "
                         f"superusers: they can also take the {su} superuser_reserved_connections slots"
                         if su else "no room left for superuser connections: superuser_reserved_connections is 0")
        return Verdict(CAN_EXCEED, f"CAN EXCEED: {_n(total)} server connections{busy} for {slots} slots, "
                                   f"{_n(-left)} too many", tuple(notes), left)
    if left == 0:
        notes = [f"no room left for direct connections: pgrelay{busy} can take all {slots} slots non-superusers have"]
        if su:
            notes.append(f"only the {su} superuser_reserved_connections slots remain, for superusers")
        else:
            notes.append("no room left for superuser connections: superuser_reserved_connections is 0")
        return Verdict(NO_ROOM, f"FITS BUT LEAVES NOTHING: {_n(total)} server connections{busy} "
                                f"for {slots} slots", tuple(notes), left)
    notes = []
    if su:
        notes.append(f"superusers also keep the {su} superuser_reserved_connections slots")
    else:
        notes.append("superuser_reserved_connections is 0: superusers have no slot of their own and compete "
                     "for what is left")
    if limits.reserved:
        notes.append(f"roles with pg_use_reserved_connections also keep {limits.reserved} reserved_connections slots")
    return Verdict(FITS, f"FITS: {_n(left)} connection{'s' if left != 1 else ''} left for direct and admin "
                         "connections", tuple(notes), left)


def overall(statuses: list[int]) -> int:
    """One exit status for several hosts: can exceed, else unreadable, else no room, else fits."""
    for status in (CAN_EXCEED, LIVE_FAILED, NO_ROOM):
        if status in statuses:
            return status
    return FITS


def _n(value: float) -> str:
    return "unbounded" if value == INF else str(int(value))
