"""Client authentication policy: auth_type, and user secrets from auth_file."""

from __future__ import annotations

import logging
import os

from pgrelay import hookimpl
from pgrelay.errors import INVALID_PASSWORD, ConfigError, Reject

log = logging.getLogger("pgrelay")


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


@hookimpl
def pgrelay_configure(relay):
    path = relay.config.auth_file
    relay.plugin_data["auth_file"] = parse_auth_file(path) if path and os.path.exists(path) else {}
    if path and not os.path.exists(path):
        log.warning("auth_file %s does not exist", path)


@hookimpl(trylast=True)
def pgrelay_choose_auth_method(relay, login):
    method = relay.config.auth_type
    if method == "trust" and relay.config.auth_file:
        # PgBouncer: with trust, the user must still be listed in auth_file.
        if login.user not in relay.plugin_data.get("auth_file", {}):
            return Reject(f'password authentication failed for user "{login.user}"', INVALID_PASSWORD)
    return method


@hookimpl(trylast=True)
def pgrelay_get_credentials(relay, login, user):
    return relay.plugin_data.get("auth_file", {}).get(user)
