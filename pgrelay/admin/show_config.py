"""SHOW CONFIG: every [pgbouncer] setting with its value, default and whether a reload changes it; secrets masked."""

from __future__ import annotations

import re

from .commands import ResultSet, command

CONFIG_COLUMNS = [("key", "text"), ("value", "text"), ("default", "text"), ("changeable", "text")]
MASK = "****"
# Settings whose whole value is a secret, and secrets inside values: a libpq password=..., a URL's
# user:password@ (a DSN such as sentry_dsn's key@host).
_SECRET_NAME = re.compile(r"password|secret|token", re.IGNORECASE)
_PASSWORD_OPTION = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def render(value) -> str:
    """A loaded setting value as PgBouncer prints it: booleans 1/0, lists comma-separated, whole
    seconds without a fraction."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def mask(name: str, text: str) -> str:
    """The value with any secret in it replaced by ****."""
    if not text:
        return text
    if _SECRET_NAME.search(name):
        return MASK
    text = _PASSWORD_OPTION.sub(lambda m: m.group(1) + MASK, text)
    return _URL_USERINFO.sub(lambda m: m.group(1) + MASK + "@", text)


@command("SHOW CONFIG", doc="Settings: value, default, changeable", admin=False)
def show_config(ctx, arg):
    relay = ctx.relay
    values = relay.config.values
    rows = []
    for name in sorted(relay.registry.settings):
        setting = relay.registry.settings[name]
        value = render(values.get(name, setting.default_value if not setting.planned else setting.default))
        rows.append((name, mask(name, value), mask(name, setting.default), "yes" if setting.reload else "no"))
    return ResultSet(CONFIG_COLUMNS, rows)
