"""The admin console's command registry: commands by verb, their results, and how results are encoded."""

from __future__ import annotations

import datetime
import re
import struct
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from pgrelay import protocol

if TYPE_CHECKING:
    from pgrelay.relay import Relay

# PostgreSQL type names a column may have -> (type oid, typlen) for RowDescription.
TYPES = {
    "text": (25, -1),
    "int4": (23, 4),
    "int8": (20, 8),
    "numeric": (1700, -1),
    "timestamptz": (1184, 8),
    "bool": (16, 1),
    "float8": (701, 8),
}

_NAME = re.compile(r"^[A-Z][A-Z0-9_]*( [A-Z][A-Z0-9_]*)?$")


class AdminError(Exception):
    """A refusal: the console sends an ERROR with this text and SQLSTATE and keeps the connection."""

    def __init__(self, message: str, sqlstate: str = "08P01"):
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


@dataclass
class ResultSet:
    """Rows to send: ``columns`` are (name, PostgreSQL type name) pairs; ``tag`` the command tag."""

    columns: Sequence[tuple[str, str]]
    rows: Iterable[Sequence[Any]] = ()
    tag: str = "SHOW"

    def __post_init__(self):
        for name, kind in self.columns:
            if kind not in TYPES:
                raise ValueError(f"column {name}: unknown type {kind!r}")


@dataclass
class Context:
    """What a command handler gets besides its argument."""

    relay: "Relay"
    client: Any                      # the ClientConnection running the console
    user: str
    is_admin: bool
    notice: Callable[[str], None] = field(default=lambda message: None)


Handler = Callable[[Context, str], "str | ResultSet | list[str | ResultSet]"]


@dataclass(frozen=True)
class Command:
    name: str                        # upper-case verb, one or two words: "PAUSE", "SHOW POOLS"
    handler: Handler
    args: str = ""                   # argument synopsis for SHOW HELP, e.g. "[db]"
    doc: str = ""
    admin: bool = True               # False: stats_users may run it too
    pgrelay: bool = False            # pgrelay's own addition (listed after PgBouncer's in SHOW HELP)
    plugin: str = ""                 # the plugin that added it through pgrelay_admin_commands


def _check_name(name: str) -> str:
    upper = " ".join(name.split()).upper()
    if not _NAME.match(upper):
        raise ValueError(f"admin command name must be one or two words of [A-Z0-9_]: {name!r}")
    return upper


# Parameters some clients SHOW or SET on any database: PgBouncer fakes them on its console
# (admin.c fake_param_list): SHOW answers the value, SET answers NOTICE "SET ignored".
FAKE_PARAMS = {
    "client_encoding": "UTF-8",
    "default_transaction_isolation": "read committed",
    "standard_conforming_strings": "on",
    "datestyle": "ISO",
    "timezone": "GMT",
    "extra_float_digits": "2",
}

_SET_RX = re.compile(r'^("(?:[^"]|"")*"|[0-9a-z_]+)[ \t\n\r]*(?:=|to)[ \t\n\r]*'
                     r"""('(?:[^']|'')*'|"(?:[^"]|"")*"|[0-9a-z_]+)$""", re.IGNORECASE | re.ASCII)


def parse_set(arg: str) -> tuple[str, str]:
    """The key and value of a SET command's argument ("key = value", "key TO 'text'"), unquoted as
    PgBouncer does (a "quoted" key keeps its case, a 'string' value its text). The console only
    dispatches SET statements that match PgBouncer's grammar; AdminError("bad arguments") otherwise."""
    match = _SET_RX.match(arg.strip())
    if not match:
        raise AdminError("bad arguments")
    key, value = match.group(1), match.group(2)
    if key.startswith('"'):
        key = key[1:-1].replace('""', '"')
    if value.startswith("'"):
        value = value[1:-1].replace("''", "'")
    elif value.startswith('"'):
        value = value[1:-1].replace('""', '"')
    return key, value


# Commands registered at import time by the admin package's modules (the @command decorator).
COMMANDS: dict[str, Command] = {}


def command(name: str, args: str = "", doc: str = "", admin: bool = True, pgrelay: bool = False):
    """Decorator: register ``handler(ctx, arg)`` as the console command ``name``."""
    upper = _check_name(name)

    def register(handler: Handler) -> Handler:
        COMMANDS[upper] = Command(upper, handler, args, doc, admin, pgrelay)
        return handler
    return register


class CommandTable:
    """One relay's commands: the built-in ones plus those plugins add via ``pgrelay_admin_commands``."""

    def __init__(self, base: dict[str, Command] | None = None):
        self.commands: dict[str, Command] = dict(COMMANDS if base is None else base)

    def add(self, name: str, handler: Handler, args: str = "", doc: str = "", admin: bool = True,
            pgrelay: bool = True, plugin: str = "") -> None:
        """Add a command (a plugin's: ``pgrelay`` defaults to True, listed after PgBouncer's).
        Replacing a built-in command is refused: plugins add, they do not redefine."""
        upper = _check_name(name)
        if upper in self.commands and upper in COMMANDS:
            raise ValueError(f"admin command {upper} is built in and cannot be replaced")
        self.commands[upper] = Command(upper, handler, args, doc, admin, pgrelay, plugin)

    def find(self, statement: str) -> tuple[Command, str] | None:
        """The command a statement names (two-word names first) and its argument, or None."""
        words = statement.split(None, 2)
        if not words:
            return None
        first = words[0].upper()
        if len(words) >= 2:
            found = self.commands.get(first + " " + words[1].upper())
            if found is not None:
                return found, words[2].strip() if len(words) > 2 else ""
        found = self.commands.get(first)
        if found is not None:
            return found, statement.strip()[len(words[0]):].strip()
        return None

    def __iter__(self):
        return iter(self.commands.values())

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.commands


# -- encoding results ---------------------------------------------------------------------------

def render(value: Any, kind: str) -> bytes | None:
    """A value as PostgreSQL text: None -> NULL; bool -> t/f in a bool column, else PgBouncer's yes/no."""
    if value is None:
        return None
    if isinstance(value, bool):
        if kind == "bool":
            return b"t" if value else b"f"
        return b"yes" if value else b"no"
    if isinstance(value, float):
        if kind in ("int4", "int8"):
            return str(int(value)).encode()
        return repr(value).encode()
    if isinstance(value, Decimal):
        return format(value, "f").encode()
    if isinstance(value, datetime.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S %Z").strip().encode()
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


_ROWDESC_FIELD = struct.Struct("!IhIhih")


def row_description(columns: Sequence[tuple[str, str]]) -> bytes:
    body = [struct.pack("!h", len(columns))]
    for name, kind in columns:
        oid, size = TYPES[kind]
        body.append(protocol.cstr(name) + _ROWDESC_FIELD.pack(0, 0, oid, size, -1, 0))
    return protocol.message(b"T", b"".join(body))


def data_row(values: Sequence[bytes | None]) -> bytes:
    parts = [struct.pack("!h", len(values))]
    for value in values:
        if value is None:
            parts.append(b"\xff\xff\xff\xff")
        else:
            parts.append(protocol.pack_i32(len(value)) + value)
    return protocol.message(b"D", b"".join(parts))


def command_complete(tag: str) -> bytes:
    return protocol.message(b"C", protocol.cstr(tag))


def encode_result(result: "str | ResultSet") -> bytes:
    """RowDescription, DataRows and CommandComplete of a ResultSet (tag "SHOW" as PgBouncer), or
    only CommandComplete for a tag."""
    if isinstance(result, str):
        return command_complete(result)
    kinds = [kind for _, kind in result.columns]
    out = [row_description(result.columns)]
    for row in result.rows:
        if len(row) != len(kinds):
            raise ValueError(f"row has {len(row)} values for {len(kinds)} columns")
        out.append(data_row([render(v, k) for v, k in zip(row, kinds)]))
    out.append(command_complete(result.tag))
    return b"".join(out)


def encode_results(results: "str | ResultSet | list[str | ResultSet] | None") -> bytes:
    if results is None:
        return b""
    if isinstance(results, (str, ResultSet)):
        return encode_result(results)
    return b"".join(encode_result(r) for r in results)
