"""The console session: who may log in (admin_users, stats_users, the Unix peer `pgbouncer`), parsing a
Query as PgBouncer's admin.c does, and dispatching it to the command table."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from pgrelay import __version__, protocol
from pgrelay.errors import Reject, RejectError
from pgrelay.virtual import VirtualDatabase, same_user

from .commands import FAKE_PARAMS, AdminError, CommandTable, Context, ResultSet, encode_results

if TYPE_CHECKING:
    from pgrelay.client import ClientConnection
    from pgrelay.routing import Login

log = logging.getLogger("pgrelay.admin")

# The names of the console database, as clients ask for it.
NAMES = ("pgbouncer", "pgrelay")
# The user that logs in without a password over the Unix socket when its uid is pgrelay's (PgBouncer).
PEER_USER = "pgbouncer"

# PgBouncer's grammar (admin.c): "CMD [arg];" with identifiers or "quoted" words, or SET key = value.
_WS0, _WS1 = r"[ \t\n\r]*", r"[ \t\n\r]+"
_WORD = r'("(?:[^"]|"")*"|[0-9a-z_]+)'
_STRING = r"('(?:[^']|'')*')"
_FLAGS = re.IGNORECASE | re.ASCII
CMD_RX = re.compile(rf"^{_WS0}{_WORD}(?:{_WS1}{_WORD})?{_WS0}(?:;{_WS0})?$", _FLAGS)
SET_WORD_RX = re.compile(rf"^{_WS0}set{_WS1}{_WORD}{_WS0}(?:=|to){_WS0}{_WORD}{_WS0}(?:;{_WS0})?$", _FLAGS)
SET_STR_RX = re.compile(rf"^{_WS0}set{_WS1}{_WORD}{_WS0}(?:=|to){_WS0}{_STRING}{_WS0}(?:;{_WS0})?$", _FLAGS)
SET_PREFIX_RX = re.compile(rf"^{_WS0}set{_WS1}", _FLAGS)
# PgBouncer's buffers: a command word below 16 bytes, an argument below 64, a SET value below 256.
MAX_CMD, MAX_ARG, MAX_VALUE = 16, 64, 256


def unquote(word: str, quote: str = '"') -> str:
    """A regex group as PgBouncer's copy_arg takes it: quotes removed and doubled quotes undone."""
    if len(word) >= 2 and word[0] == quote and word[-1] == quote:
        return word[1:-1].replace(quote * 2, quote)
    return word


def syntax_error(sql: str) -> AdminError:
    return AdminError(f"invalid command '{sql}', use SHOW HELP;")


class Statement:
    """A parsed console query: `name` is the command's table name, `arg` its argument."""

    __slots__ = ("name", "arg", "fake")

    def __init__(self, name: str, arg: str, fake: str | None = None):
        self.name = name
        self.arg = arg
        self.fake = fake  # SHOW of a fake parameter (client_encoding, ...), answered as PgBouncer

    def __repr__(self) -> str:
        return f"Statement({self.name!r}, {self.arg!r})"


def parse(sql: str) -> Statement:
    """One Query's text as PgBouncer's admin console reads it, or AdminError (its texts)."""
    match = CMD_RX.match(sql)
    if match:
        cmd, arg = match.group(1), match.group(2) or ""
        if len(cmd) >= MAX_CMD or len(arg) >= MAX_ARG:
            raise AdminError("bad arguments")
        verb = unquote(cmd).upper()
        if verb in ("SHOW", "SELECT"):  # PgBouncer takes SELECT x as SHOW x
            what = unquote(arg)
            if what.lower() in FAKE_PARAMS:
                return Statement("SHOW", what, fake=what.lower())
            return Statement("SHOW " + what.upper(), "")
        if verb == "SET":
            raise syntax_error(sql)
        return Statement(verb, arg)  # as written ("quoted" names too): the handler unquotes it
    match = SET_STR_RX.match(sql) or SET_WORD_RX.match(sql)
    if match:
        key, value = match.group(1), match.group(2)
        if not key or len(key) >= MAX_ARG or len(value) >= MAX_VALUE:
            raise AdminError("bad arguments")
        rest = sql[SET_PREFIX_RX.match(sql).end():].strip()
        while rest.endswith(";"):
            rest = rest[:-1].rstrip()
        return Statement("SET", rest)
    raise syntax_error(sql)


class Console(VirtualDatabase):
    """One client's session on the admin console."""

    name = "admin console"

    def __init__(self, relay, table: CommandTable, stats):
        self.relay = relay
        self.table = table
        self.stats = stats
        self.user = ""
        self.is_admin = False

    # -- login -----------------------------------------------------------------------------

    def login(self, client: "ClientConnection", login: "Login") -> None:
        relay = self.relay
        config = relay.config
        user = login.spec.role if login.spec is not None else login.user
        self.user = user
        admins, stats_users = config.admin_users, config.stats_users
        if client.peer == "unix" and user == PEER_USER and same_user(client):
            # As PgBouncer: the Unix user pgrelay runs as logs in as "pgbouncer" without a password.
            self.is_admin = True
            if config.log_connections:
                log.info("%s pgbouncer access from unix socket", client.label)
            return
        if config.auth_type == "any":
            # auth_type = any keeps no user name to check a password against: everyone is let in,
            # admin_users as admins, anyone else as a stats user.
            self.is_admin = user in admins
            return
        relay.authenticate(client, login)
        if user in admins:
            self.is_admin = True
        elif user not in stats_users:
            raise RejectError(Reject("not allowed"))

    def parameters(self, client: "ClientConnection") -> list[tuple[str, str]]:
        # PgBouncer's admin welcome (admin_setup), with pgrelay's version.
        return [("server_version", f"{__version__}/bouncer"), ("client_encoding", "UTF8"),
                ("server_encoding", "UTF8"), ("DateStyle", "ISO"), ("TimeZone", "GMT"),
                ("standard_conforming_strings", "on"), ("is_superuser", "on")]

    # -- queries ---------------------------------------------------------------------------

    def query(self, client: "ClientConnection", sql: str) -> bytes:
        self.stats.query_count += 1
        self.stats.xact_count += 1
        self.stats.bytes_received += len(sql) + 6
        try:
            reply = encode_results(self.run(client, sql))
        except AdminError as exc:
            # As PgBouncer's admin_error: an ERROR (08P01 unless said), the session goes on. The
            # statement is not logged: it may hold a value the user would not want in the log.
            log.warning("%s admin console: %s", client.label,
                        "invalid command" if exc.message.startswith("invalid command") else exc.message)
            reply = protocol.error_response("ERROR", exc.sqlstate, exc.message)
        self.stats.bytes_sent += len(reply) + 6
        return reply

    def run(self, client: "ClientConnection", sql: str):
        statement = parse(sql)
        if statement.fake is not None:
            return ResultSet([(statement.fake, "text")], [(FAKE_PARAMS[statement.fake],)])
        found = self.table.commands.get(statement.name)
        if found is None:
            raise syntax_error(sql)
        if found.admin and not self.is_admin:
            raise AdminError("admin access needed")
        ctx = Context(relay=self.relay, client=client, user=self.user, is_admin=self.is_admin,
                      notice=lambda message: client.stream.sendall(
                          protocol.error_response("NOTICE", "00000", message, kind=b"N")))
        worker = self.relay.worker
        if worker is not None and worker.gathers(found.name):  # workers = N: every worker runs it
            return worker.run_admin(found.name, sql, self.user, self.is_admin,
                                    lambda: found.handler(ctx, statement.arg))
        return found.handler(ctx, statement.arg)

    @staticmethod
    def run_here(relay, table: CommandTable, sql: str, user: str, is_admin: bool):
        """Run a console command in this process only, for a console session of another worker
        (pgrelay.workers): no client of its own here, so notices are dropped."""
        statement = parse(sql)
        found = table.commands.get(statement.name)
        if found is None:
            raise syntax_error(sql)
        if found.admin and not is_admin:
            raise AdminError("admin access needed")
        return found.handler(Context(relay=relay, client=None, user=user, is_admin=is_admin), statement.arg)

    def refuse(self, client: "ClientConnection", kind: int) -> tuple[bytes, str]:
        if kind in b"PBE":
            text = "extended query protocol not supported by admin console"
        else:
            text = f"unsupported packet type for admin console: {kind}"
        log.warning("%s admin console: %s", client.label, text)
        return protocol.error_response("ERROR", "08P01", text) + protocol.READY_IDLE, "bad packet"
