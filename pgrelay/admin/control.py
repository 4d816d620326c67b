"""The console's control commands: PAUSE, RESUME, RECONNECT, WAIT_CLOSE, KILL, KILL_CLIENT, DISABLE, ENABLE,
RELOAD, SHUTDOWN and SET, with PgBouncer's texts (the mechanisms are the core's pgrelay/control.py)."""

from __future__ import annotations

import logging
import re

import gevent

from pgrelay.control import INVALID_CATALOG_NAME, ControlError

from .commands import AdminError, Context, command

log = logging.getLogger("pgrelay.admin")

# The console's own database names (PgBouncer: "cannot pause admin db").
ADMIN_DATABASES = ("pgbouncer", "pgrelay")
SYNTAX_ERROR = "42601"
CONFIG_FILE_ERROR = "F0000"

# PgBouncer's console grammar (admin.c): a WORD is [0-9a-z_]+ or a "double-quoted" name ("" inside
# for a quote); a STRING is 'single-quoted' ('' inside for a quote). Nothing may follow but one ';'.
_WORD = r'"(?:[^"]|"")+"|[0-9a-zA-Z_]+'
_STRING = r"'(?:[^']|'')*'"
_ARG = re.compile(rf"^(?:{_WORD})?$")
_SET = re.compile(rf"^\s*({_WORD})\s*(?:=|\s[tT][oO]\s)\s*({_STRING}|{_WORD})\s*;?\s*$")
MAX_NAME, MAX_VALUE = 63, 255  # PgBouncer's buffers (arg[64], val[256])

# Parameters drivers SET on connect: PgBouncer answers them with a NOTICE "SET ignored".
FAKE_PARAMETERS = ("client_encoding", "default_transaction_isolation", "standard_conforming_strings",
                   "datestyle", "timezone", "extra_float_digits")


def _unquote(text: str, quote: str) -> str:
    if len(text) >= 2 and text[0] == quote and text[-1] == quote:
        return text[1:-1].replace(quote * 2, quote)
    return text


def _database(verb: str, arg: str, required: bool = False) -> str | None:
    """The optional database argument: one WORD, unquoted (None when absent)."""
    arg = arg.strip().rstrip(";").strip()
    if not arg:
        if required:
            raise AdminError("a database is required", SYNTAX_ERROR)
        return None
    if not _ARG.match(arg) or len(arg) > MAX_NAME + 2:
        raise AdminError(f"invalid command '{verb} {arg}', use SHOW HELP;", SYNTAX_ERROR)
    return _unquote(arg, '"')


def _known(ctx: Context, name: str, what: str) -> str:
    """`name` must be a database pgrelay knows (a [databases] line or the * fallback) and not the console's."""
    if name.lower() in ADMIN_DATABASES:
        raise AdminError(f"cannot {what} admin db: {name}", "0A000")
    if ctx.relay.find_database(name) is None and not ctx.relay.control.pools_of(name):
        raise AdminError(f"no such database: {name}", INVALID_CATALOG_NAME)
    return name


def _no_arg(verb: str, arg: str) -> None:
    if arg.strip().rstrip(";").strip():
        raise AdminError(f"invalid command '{verb} {arg}', use SHOW HELP;", SYNTAX_ERROR)


def _run(call, *args):
    try:
        return call(*args)
    except ControlError as exc:
        raise AdminError(exc.message, exc.sqlstate) from None


def _target(ctx: Context, verb: str, arg: str, what: str) -> str | None:
    """The optional database of PAUSE, RESUME, RECONNECT, WAIT_CLOSE and KILL, checked, and the log line
    PgBouncer writes for the command."""
    database = _database(verb, arg)
    if database is not None:
        _known(ctx, database, what)
    log.info(f"{verb} command issued" if database is None else f"{verb} '{database}' command issued")
    return database


@command("PAUSE", args="[<db>]", doc="Wait until the servers (of a database) are released, then close them; "
         "clients queue until RESUME.")
def pause(ctx: Context, arg: str):
    database = _target(ctx, "PAUSE", arg, "pause")
    _run(ctx.relay.control.pause, database)
    ctx.relay.control.wait_paused(database)
    return "PAUSE"


@command("RESUME", args="[<db>]", doc="Resume work after PAUSE or KILL.")
def resume(ctx: Context, arg: str):
    database = _target(ctx, "RESUME", arg, "resume")
    _run(ctx.relay.control.resume, database)
    return "RESUME"


@command("RECONNECT", args="[<db>]", doc="Close each server (of a database) when it is next released; "
         "new ones replace them.")
def reconnect(ctx: Context, arg: str):
    database = _target(ctx, "RECONNECT", arg, "reconnect")
    ctx.relay.control.reconnect(database)
    return "RECONNECT"


@command("WAIT_CLOSE", args="[<db>]", doc="Wait until the servers RECONNECT or a reload marked are closed.")
def wait_close(ctx: Context, arg: str):
    database = _target(ctx, "WAIT_CLOSE", arg, "wait in")
    ctx.relay.control.wait_close(database)
    return "WAIT_CLOSE"


@command("KILL", args="[<db>]", doc="Drop every client and server (of a database) at once; it stays paused.")
def kill(ctx: Context, arg: str):
    database = _target(ctx, "KILL", arg, "kill")
    _run(ctx.relay.control.kill, database)
    return "KILL"


@command("KILL_CLIENT", args="<client_id>", doc="Drop one client, by the id SHOW CLIENTS shows.")
def kill_client(ctx: Context, arg: str):
    text = arg.strip().rstrip(";").strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise AdminError("invalid client pointer supplied", "22023")
    target = int(text)
    if ctx.client is not None and target == getattr(ctx.client, "id", None):
        gevent.spawn(_run, ctx.relay.control.kill_client, target)  # its own connection: after the reply
        return "KILL_CLIENT"
    _run(ctx.relay.control.kill_client, target)
    log.info("KILL_CLIENT %d command issued", target)
    return "KILL_CLIENT"


@command("DISABLE", args="<db>", doc="Refuse new client logins to a database (connected clients stay).")
def disable(ctx: Context, arg: str):
    database = _known(ctx, _database("DISABLE", arg, required=True), "disable")
    log.info(f"DISABLE '{database}' command issued")
    ctx.relay.control.disable(database)
    return "DISABLE"


@command("ENABLE", args="<db>", doc="Allow new client logins to a database again after DISABLE.")
def enable(ctx: Context, arg: str):
    database = _known(ctx, _database("ENABLE", arg, required=True), "enable")
    log.info(f"ENABLE '{database}' command issued")
    ctx.relay.control.enable(database)
    return "ENABLE"


@command("RELOAD", doc="Re-read the configuration file (as SIGHUP).")
def reload(ctx: Context, arg: str):
    _no_arg("RELOAD", arg)
    log.info("RELOAD command issued")
    accepted, errors, warnings = ctx.relay.control.reload()
    for line in warnings:  # e.g. a setting that needs a restart: the console is told, not only the log
        ctx.notice(line)
    if not accepted:
        for line in errors:
            ctx.notice(line)
        raise AdminError("RELOAD failed, see logs for additional details", CONFIG_FILE_ERROR)
    return "RELOAD"


@command("SHUTDOWN", args="[WAIT_FOR_SERVERS|WAIT_FOR_CLIENTS]",
         doc="Stop pgrelay: at once, once servers are released (as SIGINT), or once clients leave (as SIGTERM).")
def shutdown(ctx: Context, arg: str):
    word = arg.strip().rstrip(";").strip().upper()
    modes = {"": "fast", "WAIT_FOR_SERVERS": "wait_for_servers", "WAIT_FOR_CLIENTS": "wait_for_clients"}
    if word not in modes:
        raise AdminError(f"invalid command 'SHUTDOWN {arg}', use SHOW HELP;", SYNTAX_ERROR)
    log.info("SHUTDOWN%s command issued", f" {word}" if word else "")
    gevent.spawn(ctx.relay.shutdown, modes[word])  # after this reply is sent
    return "SHUTDOWN"


@command("SET", args="<name> = <value>", doc="Change a reloadable setting until the next reload; "
         "the value is a word or 'quoted'.")
def set_(ctx: Context, arg: str):
    match = _SET.match(arg)
    if match is None:
        raise AdminError(f"invalid command 'SET {arg}', use SHOW HELP;", SYNTAX_ERROR)
    name = _unquote(match.group(1), '"')
    raw = match.group(2)
    value = _unquote(raw, "'") if raw.startswith("'") else _unquote(raw, '"')
    if not name or len(name) > MAX_NAME or len(value) > MAX_VALUE:
        raise AdminError("bad arguments", "22023")
    if name.lower() in FAKE_PARAMETERS:
        ctx.notice("SET ignored")
        return "SET"
    try:
        ctx.relay.set_setting(name, value)
    except ControlError as exc:
        ctx.notice(exc.message)  # why, before PgBouncer's "SET failed"
        raise AdminError("SET failed", exc.sqlstate) from None
    return f"SET {name.lower()}={value}"
