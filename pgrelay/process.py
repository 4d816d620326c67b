"""Process chores of PgBouncer's command line: the pidfile check, the file-descriptor limit,
daemonizing (-d) and switching the Unix user (-u / user)."""

from __future__ import annotations

import errno
import logging
import os
import re
import resource
import sys

from .errors import ConfigError

log = logging.getLogger("pgrelay")


def check_pidfile(path: str) -> None:
    """Refuse to start if `path` names a running process; remove a stale one (PgBouncer's
    check_pidfile)."""
    if not path:
        return
    try:
        with open(path) as f:
            text = f.read(128)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"could not open pidfile '{path}': {exc.strerror}") from None
    try:
        pid = int(text.strip() or "0")
    except ValueError:
        pid = 0
    if pid > 0:
        try:
            os.kill(pid, 0)
        except OSError as exc:
            if exc.errno == errno.ESRCH:  # no such process: the pidfile is stale
                log.info("stale pidfile, removing")
                try:
                    os.unlink(path)
                except OSError as exc2:
                    raise ConfigError(f"could not remove stale pidfile: {exc2.strerror}") from None
                return
    raise ConfigError(f"pidfile '{path}' exists, another instance running?")


FD_SPARE = 10  # PgBouncer's "+10 is just in case": listeners, log file, pidfile, the event loop
POOL_SIZE = re.compile(r"(?:^|\s)pool_size\s*=\s*'?(\d+)")
FORCED_USER = re.compile(r"(?:^|\s)user\s*=")


def expected_fd_use(config) -> int:
    """PgBouncer's check_limits estimate: max_client_conn + 10, plus for each [databases] line its
    pool_size (else default_pool_size) times the [users] lines (one more for a forced user). With
    workers, per process: they accept from one shared socket, so each holds about max_client_conn /
    workers of the clients, but any one may hold every server."""
    users = len(config.section("users"))
    workers = max(1, int(getattr(config, "workers", 1) or 1))
    total = -(-config.max_client_conn // workers) + FD_SPARE
    for entry in config.section("databases"):
        size = POOL_SIZE.search(entry.value)
        per_pool = int(size.group(1)) if size else config.default_pool_size
        total += per_pool * max(1, users + (1 if FORCED_USER.search(entry.value) else 0))
    return total


def check_fd_limit(config) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit when it is below what `config` may use, and
    log PgBouncer's line about it (a warning when even the hard limit is too low). Returns the
    (soft, hard) limit in force afterwards."""
    expected = expected_fd_use(config)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = resource.RLIM_INFINITY
    target = expected if hard == infinite else hard
    if soft != infinite and soft < expected and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("raised the kernel file descriptor limit from %d to %d", soft, target)
            soft = target
        except (OSError, ValueError) as exc:
            log.warning("could not raise the kernel file descriptor limit from %d to %d: %s", soft, target, exc)
    shown_hard = -1 if hard == resource.RLIM_INFINITY else hard
    workers = max(1, int(getattr(config, "workers", 1) or 1))
    log.info("kernel file descriptor limit: %d (hard: %d); max_client_conn: %d, max expected fd use: %d%s",
             soft, shown_hard, config.max_client_conn, expected,
             f" per worker process (workers = {workers})" if workers > 1 else "")
    if soft != resource.RLIM_INFINITY and soft < expected:
        log.warning("kernel file descriptor limit %d is below the max expected fd use %d: clients beyond it "
                    "are refused; raise LimitNOFILE= (systemd) or ulimit -Hn, or lower max_client_conn",
                    soft, expected)
    return soft, hard


def remove_pidfile(path: str) -> None:
    """Remove the pidfile at shutdown (quietly: it may be gone already)."""
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def daemonize() -> int:
    """Detach as PgBouncer's go_daemon does: fork, setsid, fork again; stdin, stdout and stderr go
    to /dev/null. Returns, in the daemon, the write end of a pipe whose reader is the original
    process: `report_started` on it makes that process exit 0 (or 1 with the error message), so
    `pgrelay -d` still reports a failure to start. The original process never returns."""
    import gevent

    read_fd, write_fd = os.pipe()
    if gevent.fork() > 0:  # the original process: wait for the daemon's word, then exit
        os.close(write_fd)
        chunks = []
        while True:
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
        message = b"".join(chunks).decode(errors="replace")
        if message == "ok":
            os._exit(0)
        sys.stderr.write(message or "pgrelay: error: the daemon exited during startup\n")
        sys.stderr.flush()
        os._exit(1)
    os.close(read_fd)
    os.setsid()
    if gevent.fork() > 0:  # the session leader: its child must not be able to get a terminal
        os._exit(0)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)
    return write_fd


def report_started(fd: int | None, error: str | None = None) -> None:
    """Tell the process that ran `pgrelay -d` whether the daemon is up (see daemonize)."""
    if fd is None:
        return
    try:
        os.write(fd, b"ok" if error is None else error.encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def change_user(name: str) -> None:
    """Become Unix user `name` (its uid, primary gid and supplementary groups), as PgBouncer's
    -u / user does. A ConfigError says why it cannot."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfigError(f"could not find user '{name}' to switch to") from None
    if os.geteuid() == entry.pw_uid and os.getegid() == entry.pw_gid:
        return  # already that user
    _preload()
    try:
        os.initgroups(name, entry.pw_gid)
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
    except OSError as exc:
        raise ConfigError(f"could not switch to user '{name}': {exc.strerror}") from None
    log.info("switched to user %s (uid %d, gid %d)", name, entry.pw_uid, entry.pw_gid)
    stdlib = os.path.dirname(os.__file__)
    if not os.access(stdlib, os.R_OK | os.X_OK):
        log.warning("user %s cannot read the Python installation (%s): what pgrelay or a plugin has not "
                    "loaded yet cannot be loaded; install pgrelay where that user can read it", name, stdlib)


def _preload() -> None:
    """Load, while the installation is surely readable, what serving needs later: the modules
    pgrelay imports on first use and gevent's resolver (the user switched to may not be able to
    read the Python installation, e.g. one under /root)."""
    import encodings.idna  # noqa: F401  (getaddrinfo of a host name)
    import stringprep  # noqa: F401  (SCRAM's SASLprep)
    import unicodedata  # noqa: F401

    import gevent

    from . import auth, client, client_auth, janitor, server, server_login  # noqa: F401
    hub = gevent.get_hub()
    hub.resolver  # noqa: B018  (imports and builds it)
    hub.threadpool  # noqa: B018
