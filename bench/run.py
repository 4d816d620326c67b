"""Benchmark pgrelay against PgBouncer and direct PostgreSQL: pgbench tps/latency, pooler CPU, idle-client memory."""

from __future__ import annotations

import argparse
import atexit
import concurrent.futures
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from pgrelay.tempdb import TempPostgres, free_port

PG_SETTINGS = {"max_connections": "600"}
PGBENCH_SCALE = 10
POOL_SIZE = 20              # default_pool_size of the transaction-mode poolers
SESSION_POOL_SIZE = 500     # default_pool_size of the session-mode poolers (prepared mode)
MAX_CLIENT_CONN = 6000
ROUNDS = 2
WARMUP_CLIENTS = 100       # idle clients logged in before the "before" RSS reading
WARMUP_SECONDS = 2         # unmeasured pgbench run that connects a fresh pool's servers
LOGIN_THREADS = 50
USER = DATABASE = "postgres"
HOW_TO_GET_PGBOUNCER = "pgbouncer not found: install it with `apt-get install pgbouncer`"

# The targets of issue 12 (one process).
TARGET_TPS_RATIO = 1.0        # pgrelay tps >= PgBouncer's, 50 and 500 clients, transaction mode
TARGET_CPU_RATIO = 1.2        # pgrelay CPU per transaction <= 1.2 x PgBouncer's, 50 clients
TARGET_USER_CPU_RATIO = 2.0   # pgrelay user CPU per transaction <= 2 x PgBouncer's, 50 clients
TARGET_ADDED_LATENCY_MS = 0.01  # one client: pgrelay's added latency over direct within 0.01 ms of PgBouncer's
TARGET_IDLE_BYTES = 10 * 1024  # pgrelay RSS per idle client <= 10 KB
TARGET_CLIENTS = 50
TARGET_MANY_CLIENTS = 500
TARGET_MODES = ("simple", "extended", "prepared-txn")
# prepared-txn: pgbench -M prepared through the transaction-mode poolers (named statements renamed
# per server, pgrelay.prepared; PgBouncer needs 1.21+ and max_prepared_statements for it).
PREPARED_TXN = "prepared-txn"
PGBOUNCER_PREPARED_VERSION = (1, 21)

TARGETS = ("direct", "pgbouncer", "pgrelay")
LABELS = {"direct": "direct", "pgbouncer": "PgBouncer", "pgrelay": "pgrelay"}


# -- command line --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, help="seconds per pgbench run (default 10; 3 with --quick)")
    parser.add_argument("--quick", action="store_true", help="3 s runs and 1000 idle clients")
    parser.add_argument("--clients", default="1,50,500", help="pgbench client counts (default 1,50,500)")
    parser.add_argument("--modes", default="simple,extended,prepared,prepared-txn",
                        help="pgbench query modes (default simple,extended,prepared,prepared-txn; prepared-txn is "
                             "-M prepared in transaction mode)")
    parser.add_argument("--idle-clients", type=int, help="idle clients per pooler for the memory test "
                                                          "(default 5000; 1000 with --quick)")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    parser.add_argument("--workers", type=int, default=1,
                        help="pgrelay runs `workers = N`; PgBouncer runs N processes with so_reuseport = 1 on one "
                             "port, each with default_pool_size / N (the same servers in all); CPU and RSS are "
                             "summed over each pooler's processes (default 1)")
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= 64:
        parser.error("--workers: 1 to 64")
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.idle_clients is None:
        args.idle_clients = 1000 if args.quick else 5000
    args.clients = [int(c) for c in args.clients.split(",") if c.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in args.modes:
        if mode not in ("simple", "extended", "prepared", PREPARED_TXN):
            parser.error(f"unknown query mode {mode!r}")
    if max(args.clients) + 2 * POOL_SIZE + 10 > int(PG_SETTINGS["max_connections"]):
        parser.error(f"at most {int(PG_SETTINGS['max_connections']) - 2 * POOL_SIZE - 10} clients")
    return args


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- /proc ---------------------------------------------------------------------------------------

def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


# -- poolers -------------------------------------------------------------------------------------

def pooler_ini(port: int, pg_port: int, pool_mode: str, pool_size: int, auth_file: str, pidfile: str,
               extra: dict | None = None) -> str:
    """The one pgbouncer.ini both poolers run from (`extra`: more [pgbouncer] settings)."""
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "unix_socket_dir": "",
        "auth_type": "trust",
        "auth_file": auth_file,
        "pool_mode": pool_mode,
        "default_pool_size": pool_size,
        "max_client_conn": MAX_CLIENT_CONN,
        "log_connections": 0,
        "log_disconnections": 0,
        "pidfile": pidfile,
    }
    settings.update(extra or {})
    lines = ["[databases]", f"* = host=127.0.0.1 port={pg_port}", "", "[pgbouncer]"]
    lines += [f"{key} = {value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


@dataclass
class Pooler:
    """One PgBouncer or pgrelay process, run from a generated ini in `workdir`."""

    kind: str                   # "pgbouncer" or "pgrelay"
    pool_mode: str
    pool_size: int
    workdir: str
    pg_port: int
    pgbouncer_bin: str
    owner: tuple[int, int] | None  # (uid, gid) PgBouncer runs as when we are root
    extra: dict = field(default_factory=dict)  # more [pgbouncer] settings
    extra_sections: str = ""                   # more sections, appended to the ini
    processes: int = 1                         # pgrelay: workers; PgBouncer: so_reuseport processes
    port: int = 0
    proc: subprocess.Popen | None = None
    more: list = field(default_factory=list)   # PgBouncer's other so_reuseport processes
    _log: object = None
    _log_start: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.pool_mode}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def path(self, suffix: str) -> str:
        return os.path.join(self.workdir, f"{self.name}.{suffix}")

    def pids(self) -> list[int]:
        """Every process of this pooler: PgBouncer's so_reuseport processes, pgrelay's parent and
        its workers."""
        pids = [self.proc.pid] + [p.pid for p in self.more]
        if self.kind == "pgrelay" and self.processes > 1:
            with contextlib.suppress(OSError), open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
        return pids

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) summed over the pooler's processes."""
        times = [cpu_times(pid) for pid in self.pids()]
        return sum(t[0] for t in times), sum(t[1] for t in times)

    def rss(self) -> int:
        return sum(rss_bytes(pid) for pid in self.pids())

    def command(self, ini: str) -> tuple[list[str], dict]:
        if self.kind == "pgbouncer":
            extra = {"user": self.owner[0], "group": self.owner[1], "extra_groups": []} if self.owner else {}
            return [self.pgbouncer_bin, ini], extra
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
        return [sys.executable, "-m", "pgrelay", ini], {"env": env}

    def start(self) -> "Pooler":
        self.port = free_port()
        settings = dict(self.extra)
        if self.processes > 1 and self.kind == "pgrelay":
            settings["workers"] = self.processes
        elif self.processes > 1:
            settings["so_reuseport"] = 1
        self._log = open(self.path("log"), "ab")
        self._log_start = self._log.tell()  # the log is appended to: a former run's lines come first
        for index in range(self.processes if self.kind == "pgbouncer" else 1):
            suffix = f"-{index}" if index else ""
            ini = self.path(f"ini{suffix}")
            with open(ini, "w") as f:
                f.write(pooler_ini(self.port, self.pg_port, self.pool_mode, self.pool_size,
                                   os.path.join(self.workdir, "userlist.txt"), self.path(f"pid{suffix}"), settings)
                        + self.extra_sections)
            if self.owner:
                os.chown(ini, *self.owner)
            cmd, extra = self.command(ini)
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True, **extra)
            if index:
                self.more.append(proc)
            else:
                self.proc = proc
            self.wait_listening()
        if self.kind == "pgrelay" and self.processes > 1:
            self.wait_workers()
        return self

    def wait_workers(self, timeout: float = 30) -> None:
        """pgrelay's parent logs "process up: ..., N workers" once every worker listens."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), open(self.path("log"), "rb") as f:
                f.seek(self._log_start)
                if f", {self.processes} workers".encode() in f.read():
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: {self.processes} workers not up within {timeout}s:\n{self.log_tail()}")

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not listen on port {self.port} within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        for proc in [self.proc] + self.more:
            if proc is not None and proc.poll() is None:
                # PgBouncer 1.18: SIGTERM is the immediate shutdown; pgrelay: SIGQUIT.
                proc.send_signal(signal.SIGTERM if self.kind == "pgbouncer" else signal.SIGQUIT)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.more = []
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError), open(self.path("log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""


@contextlib.contextmanager
def running(pooler: Pooler):
    try:
        yield pooler.start()
    finally:
        pooler.stop()


def find_pgbouncer() -> str:
    path = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")
    if not path:
        raise SystemExit(HOW_TO_GET_PGBOUNCER)
    return path


def make_workdir(owner: tuple[int, int] | None, stack: contextlib.ExitStack) -> str:
    """A directory for the poolers' ini, log and pid files, writable by the user PgBouncer runs as."""
    workdir = tempfile.mkdtemp(prefix="pgrelay-bench-")
    stack.callback(shutil.rmtree, workdir, ignore_errors=True)
    os.chmod(workdir, 0o755)
    auth_file = os.path.join(workdir, "userlist.txt")
    with open(auth_file, "w") as f:
        f.write(f'"{USER}" ""\n')
    if owner:
        os.chown(workdir, *owner)
        os.chown(auth_file, *owner)
    return workdir


# -- PostgreSQL and pgbench -----------------------------------------------------------------------

def pgbench_path(pg: TempPostgres) -> str:
    local = os.path.join(pg.bindir, "pgbench")
    return local if os.path.exists(local) else (shutil.which("pgbench") or "pgbench")


def init_pgbench(pg: TempPostgres, pgbench: str) -> None:
    result = subprocess.run([pgbench, "-i", "-q", "-s", str(PGBENCH_SCALE), "-h", "127.0.0.1", "-p", str(pg.port),
                             "-U", USER, DATABASE], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"pgbench -i failed:\n{result.stderr}")


def client_backends(pg: TempPostgres) -> int:
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity "
                       "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"))


def wait_for_servers_to_leave(pg: TempPostgres, at_most: int, timeout: float = 30) -> None:
    """Wait until PostgreSQL has room: earlier runs' server connections may still be exiting."""
    deadline = time.monotonic() + timeout
    while client_backends(pg) > at_most:
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL still has more than {at_most} client backends after {timeout}s")
        time.sleep(0.2)


@dataclass
class Run:
    """One pgbench run against one target."""

    tps: float | None = None
    latency_ms: float | None = None
    transactions: int = 0
    cpu_seconds: float | None = None   # the pooler's CPU during the run; None for direct
    user_seconds: float | None = None  # the user-mode part of cpu_seconds
    error: str | None = None

    @property
    def cpu_per_10k(self) -> float | None:
        if self.cpu_seconds is None or not self.transactions:
            return None
        return self.cpu_seconds * 10_000 / self.transactions

    @property
    def user_per_10k(self) -> float | None:
        if self.user_seconds is None or not self.transactions:
            return None
        return self.user_seconds * 10_000 / self.transactions


def parse_pgbench(output: str) -> Run:
    tps = re.search(r"^tps = ([0-9.]+)", output, re.M)
    latency = re.search(r"^latency average = ([0-9.]+) ms", output, re.M)
    transactions = re.search(r"^number of transactions actually processed: (\d+)", output, re.M)
    if not (tps and latency and transactions):
        return Run(error="could not parse pgbench output:\n" + output)
    return Run(tps=float(tps.group(1)), latency_ms=float(latency.group(1)), transactions=int(transactions.group(1)))


def run_pgbench(pgbench: str, port: int, mode: str, clients: int, duration: int,
                pooler: Pooler | None) -> Run:
    cmd = [pgbench, "-n", "-S", "-M", "prepared" if mode == PREPARED_TXN else mode, "-c", str(clients), "-j", "2", "-T", str(duration),
           "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE]
    cpu_before = pooler.cpu_times() if pooler else (0.0, 0.0)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 300)
    cpu_after = pooler.cpu_times() if pooler else (0.0, 0.0)
    if result.returncode != 0:
        log = f"\n{pooler.name} log:\n{pooler.log_tail(5)}" if pooler else ""
        return Run(error=f"pgbench exited with {result.returncode}:\n{result.stderr.strip()[-2000:]}{log}")
    run = parse_pgbench(result.stdout)
    if pooler:
        run.cpu_seconds = sum(cpu_after) - sum(cpu_before)
        run.user_seconds = cpu_after[0] - cpu_before[0]
    return run


# -- the pgbench matrix ----------------------------------------------------------------------------

@dataclass
class Cell:
    """One (query mode, clients) cell: the best of ROUNDS runs of each target."""

    mode: str
    clients: int
    pool_mode: str
    best: dict[str, Run] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def keep(self, target: str, run: Run) -> None:
        if run.error:
            self.errors.append(f"{LABELS[target]}: {run.error}")
        elif target not in self.best or run.tps > self.best[target].tps:
            self.best[target] = run

    def ratio(self, attr: str) -> float | None:
        """pgrelay's value of `attr` over PgBouncer's."""
        ours, theirs = self.best.get("pgrelay"), self.best.get("pgbouncer")
        if not ours or not theirs:
            return None
        a, b = getattr(ours, attr), getattr(theirs, attr)
        return a / b if a is not None and b else None


class Bench:
    """The benchmark's parts: PostgreSQL, the transaction-mode poolers, and how to reach each target."""

    def __init__(self, pg: TempPostgres, pgbench: str, workdir: str, pgbouncer_bin: str, processes: int = 1):
        self.processes = processes
        self.pg = pg
        self.pgbench = pgbench
        self.workdir = workdir
        self.pgbouncer_bin = pgbouncer_bin
        self.transaction_poolers: dict[str, Pooler] = {}

    def pgbouncer_prepares(self) -> bool:
        """Whether this PgBouncer tracks named prepared statements in transaction mode (1.21+)."""
        out = subprocess.run([self.pgbouncer_bin, "--version"], capture_output=True, text=True).stdout
        found = re.search(r"PgBouncer (\d+)\.(\d+)", out)
        return bool(found) and (int(found.group(1)), int(found.group(2))) >= PGBOUNCER_PREPARED_VERSION

    def pooler(self, kind: str, pool_mode: str, pool_size: int) -> Pooler:
        if kind == "pgbouncer" and self.processes > 1:  # its pools are per process: the same servers in all
            pool_size = max(1, pool_size // self.processes)
        return Pooler(kind, pool_mode, pool_size, self.workdir, self.pg.port, self.pgbouncer_bin, self.pg.owner,
                      processes=self.processes)

    def warm_up(self, port: int, mode: str, clients: int) -> None:
        """An unmeasured pgbench run, so the pool's servers are connected before the measured one."""
        run_pgbench(self.pgbench, port, mode, clients, WARMUP_SECONDS, None)

    def start_transaction_poolers(self, stack: contextlib.ExitStack) -> None:
        for kind in ("pgbouncer", "pgrelay"):
            pooler = stack.enter_context(running(self.pooler(kind, "transaction", POOL_SIZE)))
            self.warm_up(pooler.port, "simple", 2 * POOL_SIZE)
            self.transaction_poolers[kind] = pooler

    def stop_transaction_poolers(self) -> None:
        while self.transaction_poolers:
            self.transaction_poolers.popitem()[1].stop()

    @contextlib.contextmanager
    def target(self, name: str, cell: "Cell"):
        """(port, pooler or None) of a target. Session-mode poolers run fresh, and warmed up, for
        each run: their SESSION_POOL_SIZE idle servers would otherwise hold on to max_connections."""
        if name == "direct":
            yield self.pg.port, None
        elif cell.pool_mode == "transaction":
            pooler = self.transaction_poolers[name]
            yield pooler.port, pooler
        else:
            with running(self.pooler(name, "session", SESSION_POOL_SIZE)) as pooler:
                self.warm_up(pooler.port, cell.mode, cell.clients)
                yield pooler.port, pooler

    def run_cell(self, mode: str, clients: int, duration: int) -> Cell:
        cell = Cell(mode, clients, "session" if mode == "prepared" else "transaction")
        for round_ in range(1, ROUNDS + 1):
            for name in TARGETS:
                if name == "pgbouncer" and mode == PREPARED_TXN and not self.pgbouncer_prepares():
                    continue
                wait_for_servers_to_leave(self.pg, 2 * POOL_SIZE + 5)
                with self.target(name, cell) as (port, pooler):
                    run = run_pgbench(self.pgbench, port, mode, clients, duration, pooler)
                cell.keep(name, run)
                progress(f"  {mode:<8} {clients:>4} clients, round {round_}/{ROUNDS}, {LABELS[name]:<9}: "
                         + (f"{run.tps:9.0f} tps" if not run.error else "FAILED: " + run.error.splitlines()[0]))
        return cell


# -- idle clients ------------------------------------------------------------------------------------

def startup_message(user: str, database: str) -> bytes:
    body = struct.pack("!I", 196608) + b"".join(k + b"\0" + v.encode() + b"\0"
                                                for k, v in ((b"user", user), (b"database", database))) + b"\0"
    return struct.pack("!I", len(body) + 4) + body


def recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed during login")
        data += chunk
    return data


def login(port: int) -> socket.socket:
    """A client that logs in and then stays idle: read until ReadyForQuery."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(startup_message(USER, DATABASE))
        while True:
            kind, length = struct.unpack("!cI", recv_exact(sock, 5))
            body = recv_exact(sock, length - 4)
            if kind == b"Z":
                return sock
            if kind == b"E":
                raise ConnectionError("login refused: " + body.replace(b"\0", b" ").decode(errors="replace"))
    except BaseException:
        sock.close()
        raise


def open_clients(port: int, count: int) -> list[socket.socket]:
    """`count` idle clients, logged in by LOGIN_THREADS threads at a time."""
    pool = concurrent.futures.ThreadPoolExecutor(LOGIN_THREADS)
    try:
        futures = [pool.submit(login, port) for _ in range(count)]
        concurrent.futures.wait(futures)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    clients = [f.result() for f in futures if f.exception() is None]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        close_clients(clients)
        raise RuntimeError(f"{len(failures)} of {count} clients could not log in; first: {failures[0]}")
    return clients


def close_clients(clients: list[socket.socket]) -> None:
    for sock in clients:
        with contextlib.suppress(OSError):
            sock.sendall(b"X\0\0\0\4")
        sock.close()


@dataclass
class IdleMemory:
    pooler: str
    clients: int
    rss_before: int
    rss_after: int

    @property
    def per_client(self) -> float:
        return (self.rss_after - self.rss_before) / self.clients


def idle_client_memory(pooler: Pooler, count: int) -> IdleMemory:
    """RSS growth of a freshly started pooler when `count` idle clients log in, after a warm-up."""
    warmup = open_clients(pooler.port, WARMUP_CLIENTS)
    clients: list[socket.socket] = []
    try:
        time.sleep(1)
        before = pooler.rss()
        clients = open_clients(pooler.port, count)
        time.sleep(1)
        after = pooler.rss()
    finally:
        close_clients(warmup + clients)
    return IdleMemory(pooler.kind, count, before, after)


def wait_for_clients_to_leave(pooler: Pooler, timeout: float = 30) -> None:
    """Let the pooler see its clients leave before it is stopped (else it warns about them)."""
    deadline = time.monotonic() + timeout
    while sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pooler.pids()) > POOL_SIZE + 20 * len(pooler.pids()) \
            and time.monotonic() < deadline:
        time.sleep(0.1)


def measure_idle_memory(bench: Bench, count: int) -> dict[str, IdleMemory]:
    results = {}
    for kind in ("pgbouncer", "pgrelay"):
        with running(bench.pooler(kind, "transaction", POOL_SIZE)) as pooler:
            progress(f"  {LABELS[kind]}: {count} idle clients")
            results[kind] = idle_client_memory(pooler, count)
            wait_for_clients_to_leave(pooler)
    return results


# -- pooler logs -------------------------------------------------------------------------------------

LOG_PROBLEMS = (" WARNING ", " ERROR ", " FATAL ", "Traceback (most recent call last)", "internal error")


def log_problems(workdir: str) -> list[str]:
    """Warning and error lines from the poolers' logs: a benchmark of a pooler in trouble means little."""
    problems = []
    for name in sorted(os.listdir(workdir)):
        if name.endswith(".log"):
            with open(os.path.join(workdir, name), errors="replace") as f:
                problems += [f"{name}: {line.rstrip()}" for line in f if any(p in line for p in LOG_PROBLEMS)]
    return problems


# -- report -------------------------------------------------------------------------------------------

def fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def format_table(headers: list[str], rows: list[list[str]], left: int = 1) -> str:
    """Columns padded to fit; the first `left` columns are text, the rest numbers."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def throughput_table(cells: list[Cell]) -> str:
    headers = ["mode", "pool_mode", "clients",
               "direct tps", "lat ms", "PgBouncer tps", "lat ms", "pgrelay tps", "lat ms", "pgrelay/PgB tps",
               "PgB CPU s/10k tx", "pgrelay CPU s/10k tx", "CPU ratio", "user CPU ratio"]
    rows = []
    for cell in cells:
        row = [cell.mode, cell.pool_mode, str(cell.clients)]
        for name in TARGETS:
            run = cell.best.get(name)
            row += [fmt(run.tps, ".0f"), fmt(run.latency_ms, ".3f")] if run else ["FAIL", "-"]
        row.append(fmt(cell.ratio("tps"), ".2f"))
        for name in ("pgbouncer", "pgrelay"):
            run = cell.best.get(name)
            row.append(fmt(run.cpu_per_10k if run else None, ".3f"))
        row.append(fmt(cell.ratio("cpu_per_10k"), ".2f"))
        row.append(fmt(cell.ratio("user_per_10k"), ".2f"))
        rows.append(row)
    return format_table(headers, rows, left=2)


def memory_table(memory: dict[str, IdleMemory]) -> str:
    headers = ["pooler", "idle clients", "RSS before MiB", "RSS after MiB", "bytes per idle client"]
    rows = [[LABELS[kind], str(m.clients), f"{m.rss_before / 2**20:.1f}", f"{m.rss_after / 2**20:.1f}",
             f"{m.per_client:.0f}"] for kind, m in memory.items()]
    return format_table(headers, rows)


def added_latency_gap(cell: Cell) -> float | None:
    """pgrelay's latency over direct minus PgBouncer's latency over direct (ms)."""
    runs = [cell.best.get(name) for name in TARGETS]
    if not all(runs):
        return None
    direct, pgbouncer, pgrelay = (run.latency_ms for run in runs)
    return (pgrelay - direct) - (pgbouncer - direct)


def check_targets(cells: list[Cell], memory: dict[str, IdleMemory]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the issue's targets; met is None when not measured."""
    checks = []
    for mode in TARGET_MODES:
        cell = next((c for c in cells if c.mode == mode and c.clients == TARGET_CLIENTS), None)
        tps = cell.ratio("tps") if cell else None
        cpu = cell.ratio("cpu_per_10k") if cell else None
        checks.append((f"tps >= {TARGET_TPS_RATIO}x PgBouncer, {mode}, {TARGET_CLIENTS} clients, transaction mode",
                       fmt(tps, ".2f", "x"), None if tps is None else tps >= TARGET_TPS_RATIO))
        checks.append((f"CPU per transaction <= {TARGET_CPU_RATIO}x PgBouncer, {mode}, {TARGET_CLIENTS} clients",
                       fmt(cpu, ".2f", "x"), None if cpu is None else cpu <= TARGET_CPU_RATIO))
        user = cell.ratio("user_per_10k") if cell else None
        checks.append((f"user CPU per transaction <= {TARGET_USER_CPU_RATIO}x PgBouncer, {mode}, {TARGET_CLIENTS} clients",
                       fmt(user, ".2f", "x"), None if user is None else user <= TARGET_USER_CPU_RATIO))
        many = next((c for c in cells if c.mode == mode and c.clients == TARGET_MANY_CLIENTS), None)
        many_tps = many.ratio("tps") if many else None
        checks.append((f"tps >= {TARGET_TPS_RATIO}x PgBouncer, {mode}, {TARGET_MANY_CLIENTS} clients, transaction mode",
                       fmt(many_tps, ".2f", "x"), None if many_tps is None else many_tps >= TARGET_TPS_RATIO))
        one = next((c for c in cells if c.mode == mode and c.clients == 1), None)
        added = added_latency_gap(one) if one else None
        checks.append((f"1 client: added latency over direct within {TARGET_ADDED_LATENCY_MS} ms of PgBouncer's, {mode}",
                       fmt(added, "+.3f", " ms"), None if added is None else added <= TARGET_ADDED_LATENCY_MS))
    ours = {c.mode: c.best.get("pgrelay") for c in cells if c.clients == TARGET_CLIENTS}
    prepared, extended = ours.get(PREPARED_TXN), ours.get("extended")
    ratio = prepared.tps / extended.tps if prepared and extended and extended.tps else None
    checks.append((f"pgrelay -M prepared tps >= -M extended tps, {TARGET_CLIENTS} clients, transaction mode",
                   fmt(ratio, ".2f", "x"), None if ratio is None else ratio >= 1.0))
    idle = memory.get("pgrelay")
    per_client = idle.per_client if idle else None
    checks.append((f"RSS per idle client <= {TARGET_IDLE_BYTES // 1024} KB ({TARGET_IDLE_BYTES} bytes)",
                   fmt(per_client, ".0f", " bytes"), None if per_client is None else per_client <= TARGET_IDLE_BYTES))
    return checks


def report(args: argparse.Namespace, pg_version: int, cells: list[Cell], memory: dict[str, IdleMemory],
           problems: list[str]) -> str:
    checks = check_targets(cells, memory)
    verdict = {True: "MET", False: "NOT MET", None: "not measured"}
    lines = [
        f"pgbench -n -S -M <mode> -c <clients> -j 2 -T {args.duration}; scale {PGBENCH_SCALE}; PostgreSQL {pg_version}; "
        f"{os.cpu_count()} CPUs",
        f"Poolers: transaction mode, default_pool_size={POOL_SIZE}, max_client_conn={MAX_CLIENT_CONN}, auth_type=trust, "
        f"127.0.0.1, no Unix socket, no connection logging."
        + (f" Processes: pgrelay workers = {args.workers}; {args.workers} PgBouncer processes with so_reuseport = 1, "
           f"default_pool_size = {max(1, POOL_SIZE // args.workers)} each; CPU and RSS summed over each pooler's "
           f"processes (pgrelay's parent included)." if args.workers > 1 else ""),
        f"prepared mode needs session pooling (named statements): it runs against a second PgBouncer and pgrelay in "
        f"session mode with default_pool_size={SESSION_POOL_SIZE} so clients are not starved; these are started fresh "
        f"for each run (their idle servers would exhaust max_connections={PG_SETTINGS['max_connections']}) and "
        f"warmed up by an unmeasured {WARMUP_SECONDS} s pgbench run first.",
        f"Each cell ran {ROUNDS} rounds, targets interleaved (direct, PgBouncer, pgrelay); the best tps of each target "
        f"is kept (with its CPU) because the machine is shared and noisy.",
        f"{PREPARED_TXN}: -M prepared through the transaction-mode poolers (pgrelay renames named statements per "
        f"server, max_prepared_statements=200; PgBouncer is left out below version "
        f"{'.'.join(map(str, PGBOUNCER_PREPARED_VERSION))}, which cannot run it).",
        "CPU s/10k tx: the pooler's utime+stime during the run per 10,000 transactions; user CPU ratio: "
        "utime alone, pgrelay over PgBouncer.",
        "",
        throughput_table(cells),
        "",
        f"Idle clients (fresh transaction-mode poolers, RSS growth after a warm-up of {WARMUP_CLIENTS} clients):",
        memory_table(memory) if memory else "(not measured)",
        "",
        "Targets:",
    ]
    width = max(len(name) for name, _, _ in checks)
    lines += [f"  {name.ljust(width)}  {measured:>12}  {verdict[met]}" for name, measured, met in checks]
    errors = [f"  {c.mode} {c.clients} clients: {e}" for c in cells for e in c.errors]
    if errors:
        lines += ["", "Failed runs:"] + errors
    lines += ["", f"Pooler logs: {len(problems)} warning/error lines"] + [f"  {p}" for p in problems[:20]]
    return "\n".join(lines)


def write_json(path: str, args: argparse.Namespace, cells: list[Cell], memory: dict[str, IdleMemory],
               problems: list[str]) -> None:
    data = {
        "duration": args.duration, "rounds": ROUNDS, "scale": PGBENCH_SCALE, "pool_size": POOL_SIZE,
        "session_pool_size": SESSION_POOL_SIZE,
        "cells": [{"mode": c.mode, "clients": c.clients, "pool_mode": c.pool_mode, "errors": c.errors,
                   "targets": {name: dict(asdict(run), cpu_per_10k=run.cpu_per_10k) for name, run in c.best.items()}}
                  for c in cells],
        "idle_clients": {kind: dict(asdict(m), per_client=m.per_client) for kind, m in memory.items()},
        "targets": [{"target": name, "measured": measured, "met": met}
                    for name, measured, met in check_targets(cells, memory)],
        "pooler_log_problems": problems,
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# -- main ---------------------------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM, handled like Ctrl-C."""

    signum = signal.SIGTERM


def _interrupt(signum, frame):
    raise Interrupted()


def benchmark(args: argparse.Namespace, stack: contextlib.ExitStack) -> str:
    pgbouncer_bin = find_pgbouncer()
    progress("Starting PostgreSQL and loading pgbench data ...")
    pg = TempPostgres(settings=PG_SETTINGS)
    stack.callback(pg.cleanup)
    pg.start()
    pgbench = pgbench_path(pg)
    init_pgbench(pg, pgbench)
    bench = Bench(pg, pgbench, make_workdir(pg.owner, stack), pgbouncer_bin, args.workers)
    bench.start_transaction_poolers(stack)
    progress(f"pgbench runs ({args.duration} s each):")
    cells = [bench.run_cell(mode, clients, args.duration) for mode in args.modes for clients in args.clients]
    bench.stop_transaction_poolers()
    progress("Idle clients:")
    memory = measure_idle_memory(bench, args.idle_clients)
    problems = log_problems(bench.workdir)
    if args.json:
        write_json(args.json, args, cells, memory, problems)
    return report(args, pg.version, cells, memory, problems)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    stack = contextlib.ExitStack()
    atexit.register(stack.close)
    try:
        print(benchmark(args, stack), flush=True)
    except (KeyboardInterrupt, Interrupted) as exc:
        progress("Interrupted: stopping the poolers and PostgreSQL, removing temporary files")
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        stack.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
