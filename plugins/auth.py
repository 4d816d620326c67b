"""Client authentication policy: auth_type (or hba rules), and user secrets from auth_file or auth_query."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from pgrelay import hookimpl
from pgrelay.backend import BackendSession
from pgrelay.errors import INVALID_PASSWORD, ConfigError, Reject, ServerError
from pgrelay.settings import STR, Enum, Setting, declare

from . import hba

log = logging.getLogger("pgrelay")

AUTH_TYPES = ("scram-sha-256", "md5", "plain", "trust", "hba", "cert", "any")
DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END "
                      "FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin")

SETTINGS = [
    Setting("auth_type", Enum(*AUTH_TYPES), "scram-sha-256", True,
            "How clients authenticate: scram-sha-256 (SCRAM-SHA-256-PLUS over TLS), md5, plain (cleartext), "
            "trust, hba (per auth_hba_file), cert (client certificate CN = user), any."),
    Setting("auth_file", STR, "", True,
            "userlist.txt file: one \"user\" \"secret\" per line; the secret is a password, md5... or SCRAM-SHA-256$..."),
    Setting("auth_hba_file", STR, "", True, "pg_hba.conf-style rules used when auth_type = hba."),
    Setting("auth_user", STR, "", True,
            "User that runs auth_query to look up users missing from auth_file; its own password comes "
            "from auth_file or a database line with user= it."),
    Setting("auth_query", STR, DEFAULT_AUTH_QUERY, True,
            "Query returning (user name, secret) for $1; the default refuses roles past rolvaliduntil."),
    Setting("auth_dbname", STR, "", True, "Database (a [databases] entry) auth_query runs in; default: the client's."),
]


def parse_auth_file(path: str) -> dict[str, str]:
    """PgBouncer's userlist.txt: one `"user" "secret"` per line; doubled quotes escape a quote."""
    users: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read auth_file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text[0] in ";#":
            continue
        fields = _quoted_fields(text)
        if fields is None or len(fields) < 2:
            raise ConfigError(f"{path}:{number}: expected \"user\" \"password\"")
        users[fields[0]] = fields[1]
    return users


def _quoted_fields(text: str) -> list[str] | None:
    fields, pos = [], 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        if text[pos] != '"':
            return None
        pos += 1
        value = []
        while True:
            if pos >= len(text):
                return None
            if text[pos] == '"':
                if pos + 1 < len(text) and text[pos + 1] == '"':
                    value.append('"')
                    pos += 2
                    continue
                pos += 1
                break
            value.append(text[pos])
            pos += 1
        fields.append("".join(value))
    return fields


@dataclass
class AuthState:
    users: dict[str, str]
    rules: list | None
    sessions: dict  # (database, auth_user) -> BackendSession running auth_query


def state(relay) -> AuthState:
    return relay.plugin_data["auth"]


pgrelay_add_settings = declare(SETTINGS)


@hookimpl
def pgrelay_configure(relay):
    config = relay.config
    path = config.auth_file
    if path and not os.path.exists(path):
        log.warning("auth_file %s does not exist", path)
    users = parse_auth_file(path) if path and os.path.exists(path) else {}
    rules = None
    if config.auth_type == "hba":
        if not config.auth_hba_file:
            raise ConfigError("auth_type = hba needs auth_hba_file")
        rules = hba.parse_hba(config.auth_hba_file)
    old = relay.plugin_data.get("auth")
    sessions = old.sessions if old is not None else {}
    for session in sessions.values():
        session.close()  # credentials may have changed: reconnect on next use
    relay.plugin_data["auth"] = AuthState(users, rules, {})


@hookimpl(trylast=True)
def pgrelay_choose_auth_method(relay, login):
    config = relay.config
    method = config.auth_type
    if method == "hba":
        return hba.choose(state(relay).rules or [], login)
    if method == "trust" and config.auth_file:
        # PgBouncer: with trust, the user must still be listed in auth_file.
        role = login.spec.role if login.spec else login.user
        if role not in state(relay).users:
            return Reject(f'password authentication failed for user "{role}"', INVALID_PASSWORD)
    return method


@hookimpl(trylast=True)
def pgrelay_get_credentials(relay, login, user):
    auth = state(relay)
    secret = auth.users.get(user)
    if secret is not None or not relay.config.auth_user:
        return secret
    return _auth_query(relay, auth, login, user)


def _auth_query(relay, auth: AuthState, login, user: str) -> str | None:
    """Look the user up with auth_query on a dedicated connection as auth_user."""
    config = relay.config
    dbname = config.auth_dbname or (login.database if login is not None else "")
    if not dbname:
        return None
    db = relay.find_database(dbname)
    if db is None:
        return None
    auth_user = config.auth_user
    password = db.password if db.user == auth_user else auth.users.get(auth_user)
    key = (db.name, db.dbname, auth_user)
    session = auth.sessions.get(key)
    if session is None:
        session = auth.sessions[key] = BackendSession(relay, db.hosts[0], db.dbname, auth_user, password)
    try:
        rows = session.query(config.auth_query, [user])
    except ServerError as exc:
        log.warning("auth_query as %s in %s failed: %s", auth_user, db.dbname, exc)
        return None
    if not rows or len(rows[0]) < 2 or rows[0][0] != user:
        return None
    return rows[0][1]
