"""User names: `role|suffix` always, and `role.cluster` (PlanetScale's role.branch, Supavisor's user.tenant)."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import INVALID_AUTHORIZATION, Reject
from pgrelay.routing import UserSpec
from pgrelay.settings import BOOL, Setting, declare

# PostgreSQL's identifiers hold at most NAMEDATALEN - 1 bytes.
MAX_NAME_BYTES = 63
NAME_TOO_LONG = "42622"

SETTINGS = [
    Setting("cluster_usernames", BOOL, "0", True,
            "Read user names as role.cluster: the part after the first dot picks a [clusters] entry and "
            "the role is the server user."),
]


pgrelay_add_settings = declare(SETTINGS)


def _too_long(what: str, name: str) -> Reject | None:
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        return Reject(f"{what} is too long ({len(name.encode('utf-8'))} bytes; the limit is {MAX_NAME_BYTES})",
                      NAME_TOO_LONG)
    return None


@hookimpl(trylast=True)
def pgrelay_parse_username(relay, login):
    name = login.user
    base, bar, suffix = name.partition("|")
    if bar:
        if not suffix:
            return Reject(f'user name "{_clip(name)}" ends with "|": expected a pooler name or "replica" after it',
                          INVALID_AUTHORIZATION)
        if "|" in suffix:
            return Reject(f'user name "{_clip(name)}" has more than one "|"', INVALID_AUTHORIZATION)
        if not login.listener.suffixes:
            return Reject(f'user name suffixes ("|{_clip(suffix)}") are not accepted on port {login.listener.port}',
                          INVALID_AUTHORIZATION)
        problem = _too_long("pooler name", suffix)
        if problem:
            return problem
    if not base:
        return Reject("empty user name", INVALID_AUTHORIZATION)
    cluster = None
    if relay.config.cluster_usernames:
        role, dot, cluster = base.partition(".")
        if not dot:
            cluster = None
        elif not role or not cluster:
            return Reject(f'user name "{_clip(base)}" must look like role.cluster', INVALID_AUTHORIZATION)
        base = role
        if cluster is not None:
            problem = _too_long("cluster name", cluster)
            if problem:
                return problem
    problem = _too_long("user name", base)
    if problem:
        return problem
    return UserSpec(role=base, cluster=cluster, suffix=suffix or None)


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
