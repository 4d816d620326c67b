"""auth_type = hba: pg_hba.conf-style rules (auth_hba_file) choosing each client's auth method."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pgrelay.errors import INVALID_AUTHORIZATION, ConfigError, Reject

CONNECTION_TYPES = ("local", "host", "hostssl", "hostnossl")
METHODS = {"trust": "trust", "reject": "reject", "md5": "md5", "password": "plain", "plain": "plain",
           "scram-sha-256": "scram-sha-256", "cert": "cert"}


@dataclass(frozen=True)
class Rule:
    kind: str
    databases: tuple[str, ...]
    users: tuple[str, ...]
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    method: str
    where: str


def parse_hba(path: str) -> list[Rule]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read auth_hba_file {path}: {exc.strerror}") from None
    rules = []
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        fields = text.split()
        kind = fields[0]
        if kind not in CONNECTION_TYPES:
            raise ConfigError(f"{where}: invalid connection type {kind!r}")
        need = 4 if kind == "local" else 5
        if len(fields) < need:
            raise ConfigError(f"{where}: expected {'type database user method' if kind == 'local' else 'type database user address method'}")
        databases = tuple(fields[1].split(","))
        users = tuple(fields[2].split(","))
        if any(u.startswith("+") or u.startswith("@") for u in users + databases):
            raise ConfigError(f"{where}: group (+role) and @file entries are not supported")
        network = None
        if kind != "local":
            address = fields[3]
            if address not in ("all", "0.0.0.0/0", "::/0"):
                try:
                    network = ipaddress.ip_network(address, strict=False)
                except ValueError:
                    raise ConfigError(f"{where}: invalid address {address!r} (use CIDR notation or all)") from None
        method = fields[need - 1]
        if method not in METHODS:
            raise ConfigError(f"{where}: unsupported authentication method {method!r}")
        rules.append(Rule(kind, databases, users, network, METHODS[method], where))
    return rules


def choose(rules: list[Rule], login) -> str | Reject:
    """The first matching rule's method; no match (or `reject`) refuses like PostgreSQL does."""
    local = login.peer == "unix"
    user = login.spec.role if login.spec else login.user
    host = None if local else login.peer.rsplit(":", 1)[0].strip("[]")
    for rule in rules:
        if rule.kind == "local" and not local:
            continue
        if rule.kind != "local" and local:
            continue
        if rule.kind == "hostssl" and not login.tls or rule.kind == "hostnossl" and login.tls:
            continue
        if not ("all" in rule.databases or login.database in rule.databases
                or ("sameuser" in rule.databases and login.database == user)):
            continue
        if not ("all" in rule.users or user in rule.users):
            continue
        if rule.network is not None:
            try:
                if ipaddress.ip_address(host) not in rule.network:
                    continue
            except ValueError:
                continue
        encryption = "SSL encryption" if login.tls else "no encryption"
        if rule.method == "reject":
            where = "local connection" if local else f'host "{host}"'
            return Reject(f'pg_hba.conf rejects connection for {where}, user "{user}", database '
                          f'"{login.database}", {encryption}', INVALID_AUTHORIZATION)
        return rule.method
    encryption = "SSL encryption" if login.tls else "no encryption"
    where = "local connection" if local else f'host "{host}"'
    return Reject(f'no pg_hba.conf entry for {where}, user "{user}", database "{login.database}", '
                  f"{encryption}", INVALID_AUTHORIZATION)
