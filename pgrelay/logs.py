"""Log output as PgBouncer writes it: `2026-01-01 12:00:00.000 UTC [pid] LOG message` lines (or JSON
objects, log_format = json) to stderr, the logfile and syslog."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import socket
import sys
import time

LOGGER = "pgrelay"
_FORMAT = "%(asctime)s.%(msecs)03d UTC [%(process)d] %(levelname)s %(message)s"
# PgBouncer's level names: INFO is LOG and CRITICAL is FATAL (what die() prints).
LEVEL_NAMES = {"INFO": "LOG", "CRITICAL": "FATAL"}
# Where syslog() writes on Linux; PGRELAY_SYSLOG_SOCKET names another socket (macOS: /var/run/syslog).
SYSLOG_SOCKET = "/dev/log"
SYSLOG_FACILITIES = ("auth", "authpriv", "daemon", "user") + tuple(f"local{i}" for i in range(8))
# Fields a log call may pass in `extra` (see fields()); JSON lines carry them.
FIELDS = ("client", "server", "db", "user", "addr")

log = logging.getLogger(LOGGER)

# Command-line switches (-q, -d): no log to stderr. Set before Relay.start(), kept across reloads.
quiet = False


def _level_name(record: logging.LogRecord) -> str:
    return LEVEL_NAMES.get(record.levelname, record.levelname)


class TextFormatter(logging.Formatter):
    """PgBouncer's line: time in UTC with milliseconds, [pid], level, message."""

    converter = time.gmtime

    def __init__(self):
        super().__init__(_FORMAT, "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record = logging.makeLogRecord(record.__dict__)  # other handlers see the original
        record.levelname = _level_name(record)
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line for log shippers: time (ISO 8601, UTC), level, pid, message, and the
    client/server/db/user/addr fields of the connection the line is about, when it has them."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out = {"time": f"{stamp}.{int(record.msecs):03d}Z", "level": _level_name(record),
               "pid": record.process, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class SyslogFormatter(logging.Formatter):
    """What PgBouncer hands syslog(): the level and the message; syslog adds time and host."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{_level_name(record)} {record.getMessage()}"
        if record.exc_info:
            text += " " + " | ".join(self.formatException(record.exc_info).splitlines())
        return text


def fields(conn) -> dict[str, str]:
    """The `extra` of a log call about a client or server connection (JSON fields)."""
    if hasattr(conn, "peer"):  # a client
        return {"client": f"C-{conn.id}", "db": conn.database or "(nodb)", "user": conn.user or "(nouser)",
                "addr": conn.peer}
    route = conn.pool.route
    return {"server": f"S-{conn.id}", "db": route.dbname, "user": route.server_user,
            "addr": server_addr(conn.addr)}


def tls_info(sock) -> str:
    """A TLS connection as PgBouncer's login line shows it (tls_get_connection_info):
    protocol/cipher, e.g. TLSv1.3/TLS_AES_256_GCM_SHA384."""
    try:
        cipher = sock.cipher()
        return f"{sock.version() or '-'}/{cipher[0] if cipher else '-'}"
    except (AttributeError, OSError, ValueError):
        return "-/-"


def replication(params: dict[str, str]) -> str:
    """The replication= of PgBouncer's login line: no, yes (physical) or database (logical)."""
    value = next((v for k, v in params.items() if k.lower() == "replication"), "").strip().lower()
    if value == "database":
        return "database"
    return "yes" if value in ("1", "on", "yes", "true") else "no"


def server_addr(addr) -> str:
    """A server address as PgBouncer's log prefix shows it: host:port, [v6]:port, unix:port."""
    if addr is None:
        return "(noaddr)"
    if addr.host.startswith("/"):
        return f"unix:{addr.port}"
    if ":" in addr.host:
        return f"[{addr.host}]:{addr.port}"
    return f"{addr.host}:{addr.port}"


def local_addr(stream) -> str:
    """The " (from ip:port)" of PgBouncer's "new connection to server" line; empty over a Unix socket."""
    try:
        sock = stream.sock
        if sock.family == socket.AF_INET:
            host, port = sock.getsockname()[:2]
            return f" (from {host}:{port})"
        if sock.family == socket.AF_INET6:
            host, port = sock.getsockname()[:2]
            return f" (from [{host}]:{port})"
    except OSError:
        pass
    return ""


def server_label(server) -> str:
    """PgBouncer's prefix of a line about a server: S-<id>: db/user@host:port."""
    route = server.pool.route
    return f"S-{server.id}: {route.dbname}/{route.server_user}@{server_addr(server.addr)}"


class _SyslogHandler(logging.handlers.SysLogHandler):
    """syslog(3) drops what syslogd does not take; so does this (no "Logging error" on stderr).
    Each message tries the socket again, so a restarted syslogd gets the next lines."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _syslog_handler(config) -> logging.Handler | None:
    path = os.environ.get("PGRELAY_SYSLOG_SOCKET") or SYSLOG_SOCKET
    facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:  # Python 3.11+ would fail quietly
            probe.connect(path)
        handler = _SyslogHandler(address=path, facility=facility, socktype=socket.SOCK_DGRAM)
    except OSError as exc:
        log.warning("cannot log to syslog through %s: %s", path, exc.strerror or exc)
        return None
    handler.ident = f"{config.syslog_ident}[{os.getpid()}]: "  # openlog(ident, LOG_PID, facility)
    handler.setFormatter(SyslogFormatter())
    return handler


class _LogFile(logging.handlers.WatchedFileHandler):
    """The logfile, reopened when logrotate moves it. If its directory cannot be searched any more
    (after -u switched to a user who may not), lines go on to the file already open."""

    def reopenIfNeeded(self) -> None:
        try:
            super().reopenIfNeeded()
        except PermissionError:
            pass


def _file_handler(path: str, formatter: logging.Formatter, old: list[logging.Handler]) -> logging.Handler:
    for handler in old:  # a reload keeps the open file (it is reopened if rotated)
        if isinstance(handler, _LogFile) and handler.baseFilename == os.path.abspath(path):
            old.remove(handler)
            handler.setFormatter(formatter)
            return handler
    return _LogFile(path)


def setup(config) -> None:
    """(Re)configure pgrelay's logger from verbose, logfile, syslog* and log_format; called at
    start and on every reload. An unwritable logfile raises OSError at start; on a reload the
    error is logged and the other outputs go on."""
    logger = logging.getLogger(LOGGER)
    old = [h for h in logger.handlers if getattr(h, "_pgrelay", False)]
    formatter: logging.Formatter = JsonFormatter() if config.log_format == "json" else TextFormatter()
    handlers: list[logging.Handler] = []
    if not quiet:
        handlers.append(logging.StreamHandler(sys.stderr))
    file_error = None
    if config.logfile:
        try:
            handlers.append(_file_handler(config.logfile, formatter, old))
        except OSError as exc:
            if not old:
                raise
            file_error = f"cannot open logfile {config.logfile}: {exc.strerror or exc}"
    for handler in old:
        logger.removeHandler(handler)
        handler.close()
    if not handlers:  # -q without a logfile: nothing, not logging's last-resort stderr output
        handlers.append(logging.NullHandler())
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._pgrelay = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if config.verbose else logging.INFO)
    logger.propagate = False
    if config.syslog:
        handler = _syslog_handler(config)
        if handler is not None:
            handler._pgrelay = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
    if file_error:
        log.error("%s", file_error)
