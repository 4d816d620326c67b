"""Soak pgrelay for a bounded time under writes and seeded chaos, then check that nothing was lost, doubled or crossed.

    python bench/soak.py [--minutes 10 | --seconds 30] [--seed 1] [--json]

Starts a real primary and its streaming standby (pg_basebackup -R, tests.conftest.Replicated) and
pgrelay (tests.support.RelayProcess) with four ports: the main pooled port (transaction mode), a
session port, a statement port and a direct port; the standby is the database's ``replicas=`` and is
read through ``postgres|replica`` on the direct port. Clients log in with cleartext passwords
(auth_type = plain) so that wrong passwords can be tried.

Workload: pgbench (a custom script inserting into the ``ledger`` table, restarted whenever chaos
ends it) and psycopg2 worker threads: explicit transactions on the pooled, session and direct ports,
autocommit statements on the statement port, and reads of the standby. Every query selects the
worker's own token and the worker counts any other token it gets back (a cross-client result).
Each write inserts a unique token; a worker records which commits were acknowledged, which failed
before COMMIT was sent (they must not be in the ledger) and which are unknown (COMMIT or an autocommit
statement was cut off). Workers reconnect after every error and count errors by kind.

Chaos, at seeded random intervals from the end of warm-up to 85% of the run (each kind at least
once): abrupt client disconnects (worker sockets shut down; raw clients that send BEGIN and an
INSERT, then reset the connection), pg_terminate_backend of random backends, ``pg_ctl restart -m
fast`` of the primary, SIGHUP and the admin console's RELOAD, and floods of bad connections
(garbage bytes, half startup packets, wrong passwords). At 80% the standby is promoted: pgrelay must
keep serving the primary, and reads of ``|replica`` either still work or get a clear error. The
last 15% is quiet: every write path must complete transactions again.

The report (``--json`` for JSON) lists the checks; the exit code is 1 if any fails:
lost acknowledged writes, duplicated tokens, writes present that failed before COMMIT, cross-client
results, RSS after warm-up flat (last within 10% or 5 MiB of the median), pgrelay's open file
descriptors back to the start value once clients are gone and idle servers closed, pgrelay alive
throughout with no bug marker in its log, transactions on every path, and each chaos kind done.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg2

from pgrelay.tempdb import TempPostgres, free_port
from tests.conftest import Replicated
from tests.support import RelayProcess, startup_packet

PASSWORD = "soak-pw"
CHAOS_KINDS = ("kill_clients", "terminate_backends", "restart_primary", "reload", "bad_connections")
WRITE_PATHS = ("pooled/transaction", "session/session", "statement/statement", "direct/direct")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="run time in minutes (default 10)")
    parser.add_argument("--seconds", type=float, help="run time in seconds (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the chaos schedule (default 1)")
    parser.add_argument("--workers", type=int, default=2, help="worker threads per path (default 2)")
    parser.add_argument("--pgbench-clients", type=int, default=4, help="pgbench clients (default 4)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args(argv)
    args.duration = args.seconds if args.seconds is not None else args.minutes * 60
    if args.duration < 20:
        parser.error("the run must last at least 20 seconds")
    return args


def error_kind(exc: BaseException) -> str:
    """A short, stable name for an error: class and SQLSTATE, or the first line without numbers."""
    code = getattr(exc, "pgcode", None)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}", "<token>", text)
    text = re.sub(r"\d+", "N", text)[:90]
    return f"{type(exc).__name__}[{code}] {text}" if code else f"{type(exc).__name__} {text}"


class Stats:
    """Everything the threads record, behind one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.acked: set[str] = set()
        self.failed: set[str] = set()      # failed before COMMIT: must be absent
        self.unknown: set[str] = set()     # COMMIT (or the autocommit statement) cut off
        self.done = collections.Counter()  # path -> transactions
        self.done_after: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.errors: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.cross = 0
        self.stale_replica = 0  # |replica logins made well after the promotion, answered by the promoted node
        self.cross_examples: list[str] = []
        self.chaos = collections.Counter()
        self.chaos_detail = collections.Counter()
        self.marks: dict[str, float] = {}  # event name -> monotonic time

    def txn(self, path: str) -> None:
        now = time.monotonic()
        with self.lock:
            self.done[path] += 1
            for mark, at in self.marks.items():
                if now > at:
                    self.done_after[mark][path] += 1

    def error(self, path: str, exc: BaseException) -> None:
        with self.lock:
            self.errors[path][error_kind(exc)] += 1

    def crossed(self, path: str, want, got) -> None:
        with self.lock:
            self.cross += 1
            if len(self.cross_examples) < 10:
                self.cross_examples.append(f"{path}: wanted {want!r}, got {got!r}")


class Worker(threading.Thread):
    """One client of one path; reconnects after every error."""

    def __init__(self, soak: Soak, path: str, dsn: str, name: str):
        super().__init__(daemon=True, name=name)
        self.soak, self.path, self.dsn = soak, path, dsn
        self.kind = path.split("/")[1]
        self.conn = None
        self.token = ""
        self.seq = 0
        self.killed = False  # chaos shut this worker's socket down

    def connect(self):
        conn = psycopg2.connect(self.dsn, connect_timeout=10, application_name=self.name)
        self.connected_at = time.monotonic()
        self.token = str(uuid.uuid4())
        if self.kind in ("session", "direct", "replica"):
            conn.autocommit = True
            with conn.cursor() as cur:  # session state that must stay with this client
                cur.execute("SELECT set_config('soak.session', %s, false)", (self.token,))
        conn.autocommit = self.kind in ("statement", "replica")
        return conn

    def run(self) -> None:
        stats = self.soak.stats
        while not self.soak.stopping.is_set():
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = self.connect()
                self.step()
                stats.txn(self.path)
            except (psycopg2.Error, OSError) as exc:
                if self.killed:
                    with stats.lock:
                        stats.errors[self.path]["(own socket shut down by chaos) " + error_kind(exc)] += 1
                else:
                    stats.error(self.path, exc)
                self.drop()
                time.sleep(self.soak.rng_for(self.name).uniform(0.05, 0.3))
        self.drop()

    def drop(self) -> None:
        self.killed = False
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg2.Error:
                pass

    def check(self, want, got) -> None:
        if want != got:
            self.soak.stats.crossed(self.path, want, got)

    def step(self) -> None:
        stats = self.soak.stats
        self.seq += 1
        token = f"{self.name}-{self.seq}-{uuid.uuid4()}"
        cur = self.conn.cursor()
        if self.kind == "replica":
            cur.execute("SELECT %s::text AS token, pg_is_in_recovery(), pg_last_wal_replay_lsn()", (token,))
            got = cur.fetchone()
            self.check(token, got[0])
            if not got[1]:
                promoted = stats.marks.get("promotion")
                late = promoted is not None and self.connected_at > promoted + 5  # health_check_period = 1
                with stats.lock:
                    stats.chaos_detail["replica reads answered by a promoted standby"] += 1
                    stats.stale_replica += late
            if self.seq % 20 == 0:
                self.drop()  # new logins, so that routing after the promotion is exercised
            return
        if self.kind == "statement":
            with stats.lock:
                stats.unknown.add(token)
            cur.execute("INSERT INTO ledger (token, worker, seq) VALUES (%s, %s, %s) RETURNING token, %s::text",
                        (token, self.name, self.seq, token))
            got = cur.fetchone()
            self.check((token, token), got)
            with stats.lock:
                stats.unknown.discard(token)
                stats.acked.add(token)
            return
        with stats.lock:
            stats.failed.add(token)
        cur.execute("INSERT INTO ledger (token, worker, seq) VALUES (%s, %s, %s) RETURNING token",
                    (token, self.name, self.seq))
        self.check(token, cur.fetchone()[0])
        if self.kind in ("session", "direct"):
            cur.execute("SELECT %s::text AS token, current_setting('soak.session', true)", (token,))
            self.check((token, self.token), cur.fetchone())
        else:
            cur.execute("SELECT %s::text AS token, txid_current_if_assigned() IS NOT NULL", (token,))
            self.check((token, True), cur.fetchone())
        with stats.lock:
            stats.failed.discard(token)
            stats.unknown.add(token)
        self.conn.commit()
        with stats.lock:
            stats.unknown.discard(token)
            stats.acked.add(token)


PGBENCH_SCRIPT = """\\set r random(1, 1000000000)
INSERT INTO ledger (token, worker, seq) VALUES ('pgbench-' || :client_id || '-' || :r || '-' || md5(random()::text), 'pgbench', :client_id);
SELECT :r::text AS token;
"""


class Soak:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.stopping = threading.Event()
        self.workdir = tempfile.mkdtemp(prefix="pgrelay-soak-")
        self.rss: list[tuple[float, int]] = []
        self.relay_died_at: float | None = None
        self.workers: list[Worker] = []
        self.pgbench_txns = 0
        self.pgbench_runs = 0
        self.pgbench_failures = collections.Counter()
        self._rngs: dict[str, random.Random] = {}
        self.cluster: Replicated | None = None
        self.relay: RelayProcess | None = None

    def rng_for(self, name: str) -> random.Random:
        if name not in self._rngs:
            self._rngs[name] = random.Random(f"{self.args.seed}-{name}")
        return self._rngs[name]

    # -- setup -------------------------------------------------------------------------------

    def start(self) -> None:
        primary = TempPostgres(settings={"max_connections": "300", "wal_level": "replica",
                                         "synchronous_commit": "on", "fsync": "off"},
                               base_dir=None).start()
        try:
            standby = primary.make_replica()
        except BaseException:
            primary.cleanup()
            raise
        self.cluster = Replicated(primary, standby)
        primary.psql("CREATE TABLE ledger (token text NOT NULL, worker text NOT NULL, seq int NOT NULL, "
                     "at timestamptz NOT NULL DEFAULT clock_timestamp())")
        primary.psql("CREATE INDEX ledger_token ON ledger (token)")  # not unique: duplicates must show
        self.cluster.wait_caught_up()
        userlist = os.path.join(self.workdir, "userlist.txt")
        with open(userlist, "w") as f:
            f.write(f'"postgres" "{PASSWORD}"\n')
        self.ports = {"session": free_port(), "statement": free_port(), "direct": free_port()}
        listeners = ("[listeners]\n"
                     f"session = port={self.ports['session']} pool_mode=session\n"
                     f"statement = port={self.ports['statement']} pool_mode=statement\n"
                     f"direct = port={self.ports['direct']} role=direct\n")
        self.relay = RelayProcess(
            self.workdir, primary,
            settings={"auth_type": "plain", "auth_file": userlist, "admin_users": "postgres",
                      "default_pool_size": "8", "server_idle_timeout": "5", "health_check_period": "1",
                      "max_direct_connections": "100", "log_connections": "0", "log_disconnections": "0"},
            databases={"postgres": f"host=127.0.0.1 port={primary.port} "
                                   f"replicas=127.0.0.1:{standby.port}"},
            extra_sections=listeners, name="soak-relay")
        self.relay.start()
        self.ports["pooled"] = self.relay.port
        # One login per path makes pgrelay watch both hosts (health checks keep a session to each);
        # the baseline is taken once those servers have gone idle and been closed.
        for port, user in (("pooled", "postgres"), ("session", "postgres"), ("statement", "postgres"),
                           ("direct", "postgres"), ("direct", "postgres|replica")):
            conn = psycopg2.connect(self.dsn(port, user), connect_timeout=10)
            conn.autocommit = True
            conn.cursor().execute("SELECT 1")
            conn.close()
        self.wait_no_servers(30)
        self.fd_start = self.fd_count()
        self.fd_start_table = self.fd_table()

    def dsn(self, port: str, user: str = "postgres", password: str = PASSWORD) -> str:
        return (f"host=127.0.0.1 port={self.ports[port]} dbname=postgres user={user} "
                f"password={password}")

    def servers_open(self) -> int:
        conn = psycopg2.connect(self.dsn("pooled").replace("dbname=postgres", "dbname=pgbouncer"),
                                connect_timeout=10)
        conn.autocommit = True
        try:
            cur = conn.cursor()
            cur.execute("SHOW SERVERS")
            return len(cur.fetchall())
        finally:
            conn.close()

    def wait_no_servers(self, timeout: float) -> int:
        """Wait until pgrelay holds no server connection (server_idle_timeout = 5); returns how many remain."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.servers_open()
            if left == 0 or time.monotonic() > deadline:
                time.sleep(0.3)  # the admin client's own descriptor is gone
                return left
            time.sleep(0.5)

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.relay.proc.pid}/fd"))

    def fd_table(self) -> list[str]:
        """pgrelay's descriptors, sockets named by their TCP ports (for the report when they leak)."""
        tcp = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                for line in list(f)[1:]:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
                    tcp[inode] = (f"tcp {int(local.split(':')[1], 16)}->{int(remote.split(':')[1], 16)} "
                                  f"state {state}")
        out = []
        base = f"/proc/{self.relay.proc.pid}/fd"
        for fd in sorted(os.listdir(base), key=int):
            try:
                target = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            inode = target[8:-1] if target.startswith("socket:[") else None
            out.append(f"{fd}: {tcp.get(inode, target) if inode else target}")
        return out

    def rss_kib(self) -> int:
        with open(f"/proc/{self.relay.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    # -- workload ----------------------------------------------------------------------------

    def start_workers(self) -> None:
        plan = [("pooled/transaction", "pooled", "postgres"), ("session/session", "session", "postgres"),
                ("statement/statement", "statement", "postgres"), ("direct/direct", "direct", "postgres"),
                ("direct/replica", "direct", "postgres|replica")]
        for path, port, user in plan:
            for n in range(self.args.workers):
                worker = Worker(self, path, self.dsn(port, user), f"{path.replace('/', '-')}-{n}")
                self.workers.append(worker)
                worker.start()
        threading.Thread(target=self.pgbench_loop, daemon=True, name="pgbench").start()

    def pgbench_loop(self) -> None:
        script = os.path.join(self.workdir, "ledger.sql")
        with open(script, "w") as f:
            f.write(PGBENCH_SCRIPT)
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        pgbench = self.cluster.primary._cmd("pgbench")
        while not self.stopping.is_set():
            left = self.end_at - time.monotonic() - 2
            if left < 2:
                break
            cmd = [pgbench, "-n", "-h", "127.0.0.1", "-p", str(self.ports["pooled"]), "-U", "postgres",
                   "-c", str(self.args.pgbench_clients), "-j", "1", "-T", str(int(min(left, 30))),
                   "-M", "extended", "-f", script, "postgres"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            self.pgbench_runs += 1
            done = re.search(r"number of transactions actually processed: (\d+)", out.stdout)
            self.pgbench_txns += int(done.group(1)) if done else 0
            if out.returncode != 0:
                first = next((line for line in out.stderr.splitlines() if "error" in line.lower()
                              or "fatal" in line.lower()), out.stderr.strip()[:90])
                self.pgbench_failures[re.sub(r"\d+", "N", first)[:100]] += 1
                time.sleep(0.5)

    # -- chaos -------------------------------------------------------------------------------

    def chaos(self, kind: str) -> None:
        getattr(self, f"chaos_{kind}")()
        with self.stats.lock:
            self.stats.chaos[kind] += 1

    def chaos_kill_clients(self) -> None:
        rng = self.rng
        victims = rng.sample(self.workers, k=min(len(self.workers), rng.randint(1, 3)))
        for worker in victims:
            conn = worker.conn
            if conn is None or conn.closed:
                continue
            try:
                worker.killed = True
                sock = socket.socket(fileno=os.dup(conn.fileno()))
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                self.stats.chaos_detail["worker sockets shut down"] += 1
            except (OSError, psycopg2.Error):
                pass
        # Raw clients that open a transaction, insert, and vanish with a TCP reset.
        for _ in range(rng.randint(1, 3)):
            port = rng.choice(["pooled", "session", "direct"])
            token = f"raw-{port}-{uuid.uuid4()}"
            with self.stats.lock:
                self.stats.failed.add(token)
            try:
                self.raw_abandon(self.ports[port], token)
                self.stats.chaos_detail["raw clients reset mid-transaction"] += 1
            except OSError as exc:
                self.stats.chaos_detail[f"raw client failed: {error_kind(exc)}"] += 1

    def raw_login(self, port: int, password: str = PASSWORD) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(startup_packet("postgres", "postgres"))
        buf = b""
        while True:
            while len(buf) < 5 or len(buf) < 1 + struct.unpack("!I", buf[1:5])[0]:
                data = sock.recv(65536)
                if not data:
                    raise OSError("closed during login")
                buf += data
            length = struct.unpack("!I", buf[1:5])[0]
            kind, body, buf = buf[:1], buf[5:1 + length], buf[1 + length:]
            if kind == b"R" and struct.unpack("!I", body[:4])[0] == 3:
                pw = password.encode() + b"\0"
                sock.sendall(b"p" + struct.pack("!I", 4 + len(pw)) + pw)
            elif kind == b"E":
                raise OSError("login refused: " + body.decode(errors="replace")[:80])
            elif kind == b"Z":
                return sock

    def raw_abandon(self, port: int, token: str) -> None:
        sock = self.raw_login(port)
        sql = f"BEGIN; INSERT INTO ledger (token, worker, seq) VALUES ('{token}', 'raw', 0);".encode() + b"\0"
        sock.sendall(b"Q" + struct.pack("!I", 4 + len(sql)) + sql)
        time.sleep(self.rng.uniform(0, 0.05))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def chaos_terminate_backends(self) -> None:
        n = self.rng.randint(1, 4)
        out = self.cluster.primary.psql(
            "SELECT count(pg_terminate_backend(pid)) FROM (SELECT pid FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() "
            f"ORDER BY random() LIMIT {n}) s")
        self.stats.chaos_detail["backends terminated"] += int(out or 0)

    def chaos_restart_primary(self) -> None:
        primary = self.cluster.primary
        primary.run(primary._cmd("pg_ctl"), "-D", primary.datadir, "-m", "fast", "-w", "-t", "60", "restart",
                    "-l", primary.logfile)

    def chaos_reload(self) -> None:
        if self.rng.random() < 0.5:
            self.relay.send_signal(signal.SIGHUP)
            self.stats.chaos_detail["SIGHUP"] += 1
        else:
            conn = psycopg2.connect(self.dsn("pooled").replace("dbname=postgres", "dbname=pgbouncer"),
                                    connect_timeout=10)
            conn.autocommit = True
            try:
                conn.cursor().execute("RELOAD")
            finally:
                conn.close()
            self.stats.chaos_detail["admin RELOAD"] += 1

    def chaos_bad_connections(self) -> None:
        rng = self.rng
        held = []
        for _ in range(rng.randint(10, 40)):
            port = self.ports[rng.choice(["pooled", "session", "statement", "direct"])]
            what = rng.choice(["garbage", "half_startup", "wrong_password", "silent"])
            try:
                if what == "wrong_password":
                    try:
                        psycopg2.connect(self.dsn("pooled", password="wrong").replace(
                            f"port={self.ports['pooled']}", f"port={port}"), connect_timeout=10).close()
                        self.stats.chaos_detail["wrong password ACCEPTED"] += 1
                    except psycopg2.OperationalError as exc:
                        key = "password authentication failed" in str(exc)
                        self.stats.chaos_detail["wrong password refused" if key else
                                                f"wrong password: {error_kind(exc)}"] += 1
                    continue
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if what == "garbage":
                    sock.sendall(rng.randbytes(rng.randint(1, 300)))
                elif what == "half_startup":
                    packet = startup_packet("postgres", "postgres")
                    sock.sendall(packet[:rng.randint(1, len(packet) - 1)])
                self.stats.chaos_detail[f"bad connection: {what}"] += 1
                if rng.random() < 0.5:
                    held.append(sock)
                else:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.close()
            except OSError as exc:
                self.stats.chaos_detail[f"bad connection {what}: {error_kind(exc)}"] += 1
        time.sleep(rng.uniform(0.1, 1.0))
        for sock in held:
            sock.close()

    def promote(self) -> None:
        self.cluster.standby.promote()
        with self.stats.lock:
            self.stats.marks["promotion"] = time.monotonic()
            self.stats.chaos["promote_replica"] += 1

    # -- the run -----------------------------------------------------------------------------

    def sample(self) -> None:
        if self.relay.alive():
            self.rss.append((time.monotonic() - self.started, self.rss_kib()))
        elif self.relay_died_at is None:
            self.relay_died_at = time.monotonic() - self.started

    def run(self) -> dict:
        duration = self.args.duration
        self.started = time.monotonic()
        self.end_at = self.started + duration
        warmup = min(60.0, duration * 0.15)
        chaos_end = self.started + duration * 0.85
        promote_at = self.started + duration * 0.80
        self.start_workers()
        kinds = list(CHAOS_KINDS)
        self.rng.shuffle(kinds)  # each kind once first, then at random
        gap = max(1.0, min(6.0, duration / 100))
        next_chaos = self.started + warmup
        next_sample = self.started
        promoted = False
        while time.monotonic() < self.end_at:
            now = time.monotonic()
            if now >= next_sample:
                self.sample()
                next_sample = now + max(1.0, duration / 200)
            if not promoted and now >= promote_at:
                self.promote()
                promoted = True
            elif now >= next_chaos and now < chaos_end:
                kind = kinds.pop(0) if kinds else self.rng.choices(
                    CHAOS_KINDS, weights=(4, 3, 1, 2, 3))[0]
                if kind == "restart_primary" and now > self.started + duration * 0.75:
                    kind = "terminate_backends"  # leave the primary time to come back before the quiet part
                try:
                    self.chaos(kind)
                except Exception as exc:  # noqa: BLE001 (a failed chaos action is reported, the run goes on)
                    self.stats.chaos_detail[f"{kind} failed: {error_kind(exc)}"] += 1
                next_chaos = time.monotonic() + self.rng.uniform(0.5, 1.5) * gap
            if now >= chaos_end and "quiet" not in self.stats.marks:
                with self.stats.lock:
                    self.stats.marks["quiet"] = time.monotonic()
            time.sleep(0.2)
        self.sample()
        self.stopping.set()
        for worker in self.workers:
            worker.join(30)
        return self.finish()

    def finish(self) -> dict:
        stats = self.stats
        alive = self.relay.alive()
        # Once clients are gone and idle servers closed (server_idle_timeout = 5), the descriptors
        # must be back where they started.
        fd_end = servers_left = None
        if alive:
            servers_left = self.wait_no_servers(30)
            fd_end = self.fd_count()
            self.fd_end_table = self.fd_table()
        self.cluster.primary.run(self.cluster.primary._cmd("pg_isready"), "-h", "127.0.0.1",
                                 "-p", str(self.cluster.primary.port), "-t", "30", check=False)
        conn = psycopg2.connect(self.cluster.primary.dsn())
        cur = conn.cursor()
        cur.execute("SELECT token, count(*) FROM ledger WHERE worker <> 'pgbench' GROUP BY token")
        present = dict(cur.fetchall())
        cur.execute("SELECT count(*) FROM (SELECT token FROM ledger GROUP BY token HAVING count(*) > 1) d")
        duplicated = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM ledger")
        rows = cur.fetchone()[0]
        conn.close()
        # What PostgreSQL says about connections pgrelay still holds beyond its start (a leak).
        leaked_ports = [int(m.group(1)) for line in set(getattr(self, "fd_end_table", [])) - set(self.fd_start_table)
                        if (m := re.search(r"tcp (\d+)->(\d+)", line))]
        leaked_backends = []
        if fd_end is not None and fd_end > self.fd_start and leaked_ports:
            conn = psycopg2.connect(self.cluster.primary.dsn())
            cur = conn.cursor()
            cur.execute("SELECT client_port, application_name, usename, datname, state, backend_start, "
                        "state_change, left(query, 80) FROM pg_stat_activity WHERE client_port = ANY(%s)",
                        (leaked_ports,))
            leaked_backends = [[str(v) for v in row] for row in cur.fetchall()]
            conn.close()
        lost = sorted(t for t in stats.acked if t not in present)
        phantom = sorted(t for t in stats.failed if t in present)
        unknown_committed = sum(1 for t in stats.unknown if t in present)

        warm = [kib for at, kib in self.rss if at >= min(60.0, self.args.duration * 0.15)] or \
            [kib for _, kib in self.rss]
        median = statistics.median(warm) if warm else 0
        rss_flat = bool(warm) and abs(warm[-1] - median) <= max(0.10 * median, 5 * 1024)
        bugs = self.relay.bugs()
        promo = stats.done_after.get("promotion", {})
        quiet = stats.done_after.get("quiet", {})
        checks = {
            "no acknowledged write lost": not lost,
            "no token duplicated": duplicated == 0,
            "no write present that failed before COMMIT": not phantom,
            "no cross-client result": stats.cross == 0,
            "RSS flat after warm-up": rss_flat,
            "no file descriptor leaked": fd_end is not None and fd_end <= self.fd_start,
            "pgrelay never exited": alive and self.relay_died_at is None,
            "no bug marker in pgrelay's log": not bugs,
            "no |replica login routed to the promoted standby": stats.stale_replica == 0,
            "transactions on every path": all(stats.done[p] > 0 for p in WRITE_PATHS)
            and stats.done["direct/replica"] > 0 and self.pgbench_txns > 0,
            "primary served after promotion": all(promo.get(p, 0) > 0 for p in WRITE_PATHS),
            "every write path recovered after chaos": all(quiet.get(p, 0) > 0 for p in WRITE_PATHS),
            "every chaos kind done": all(stats.chaos[k] > 0 for k in CHAOS_KINDS + ("promote_replica",)),
        }
        rss_mib = [round(kib / 1024, 1) for _, kib in self.rss]
        return {
            "ok": all(checks.values()),
            "checks": checks,
            "seconds": self.args.duration, "seed": self.args.seed,
            "writes": {"acknowledged": len(stats.acked), "lost": len(lost), "duplicated": duplicated,
                       "failed_before_commit": len(stats.failed), "present_after_failure": len(phantom),
                       "unknown_outcome": len(stats.unknown), "unknown_committed": unknown_committed,
                       "ledger_rows": rows, "lost_examples": lost[:5], "phantom_examples": phantom[:5]},
            "stale_replica_reads": stats.stale_replica,
            "cross_client": stats.cross, "cross_examples": stats.cross_examples,
            "transactions": dict(sorted(stats.done.items())) | {"pgbench/transaction": self.pgbench_txns},
            "after_promotion": dict(sorted(promo.items())), "after_chaos": dict(sorted(quiet.items())),
            "pgbench": {"runs": self.pgbench_runs, "failed_runs": dict(self.pgbench_failures)},
            "errors": {p: dict(c.most_common()) for p, c in sorted(stats.errors.items())},
            "chaos": dict(sorted(stats.chaos.items())), "chaos_detail": dict(sorted(stats.chaos_detail.items())),
            "rss_mib": {"samples": len(rss_mib), "first": rss_mib[0] if rss_mib else None,
                        "after_warmup_first": round(warm[0] / 1024, 1) if warm else None,
                        "median": round(median / 1024, 1), "last": rss_mib[-1] if rss_mib else None,
                        "max": max(rss_mib) if rss_mib else None},
            "fds": {"start": self.fd_start, "end": fd_end, "servers_left": servers_left,
                    "leaked_backends": leaked_backends,
                    "opened": sorted(set(getattr(self, "fd_end_table", [])) - set(self.fd_start_table))
                    if fd_end is None or fd_end > self.fd_start else [],
                    "ports": {k: v for k, v in self.ports.items()},
                    "postgres": {"primary": self.cluster.primary.port, "standby": self.cluster.standby.port}},
            "pgrelay": {"alive": alive, "died_at_s": self.relay_died_at, "bug_lines": bugs[:5]},
            "workdir": self.workdir,
        }

    def cleanup(self) -> None:
        self.stopping.set()
        if self.relay is not None and self.relay.proc is not None:
            try:
                self.relay.stop()
            except AssertionError:
                pass
        if self.cluster is not None:
            self.cluster.standby.stop("immediate")
            self.cluster.primary.cleanup()
        if not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def print_report(report: dict) -> None:
    w = report["writes"]
    print(f"soak: {report['seconds']:.0f} s, seed {report['seed']}: {'OK' if report['ok'] else 'FAILED'}")
    for name, ok in report["checks"].items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    print(f"writes: {w['acknowledged']} acknowledged, {w['lost']} lost, {w['duplicated']} duplicated, "
          f"{w['failed_before_commit']} failed before COMMIT ({w['present_after_failure']} present), "
          f"{w['unknown_outcome']} unknown outcome ({w['unknown_committed']} committed); "
          f"ledger {w['ledger_rows']} rows")
    print(f"cross-client results: {report['cross_client']} {report['cross_examples'] or ''}")
    print("transactions: " + ", ".join(f"{k} {v}" for k, v in report["transactions"].items()))
    print("after promotion: " + ", ".join(f"{k} {v}" for k, v in report["after_promotion"].items()))
    print("after chaos: " + ", ".join(f"{k} {v}" for k, v in report["after_chaos"].items()))
    print(f"pgbench: {report['pgbench']}")
    print("chaos: " + ", ".join(f"{k} {v}" for k, v in report["chaos"].items()))
    print("chaos detail: " + ", ".join(f"{k} {v}" for k, v in report["chaos_detail"].items()))
    print("errors:")
    for path, kinds in report["errors"].items():
        for kind, n in kinds.items():
            print(f"  {path}: {n} x {kind}")
    r = report["rss_mib"]
    print(f"RSS MiB: first {r['first']}, after warm-up {r['after_warmup_first']}, median {r['median']}, "
          f"last {r['last']}, max {r['max']} ({r['samples']} samples)")
    print(f"fds: start {report['fds']['start']}, end {report['fds']['end']}, opened {report['fds']['opened']} "
          f"(ports {report['fds']['ports']}, postgres {report['fds']['postgres']})")
    if report["fds"]["leaked_backends"]:
        print(f"fds: PostgreSQL's view of the extra connections: {report['fds']['leaked_backends']}")
    print(f"|replica reads on logins made 5 s after the promotion, answered by the promoted node: "
          f"{report['stale_replica_reads']}")
    print(f"pgrelay: {report['pgrelay']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up (finally) on SIGTERM too
    soak = Soak(args)
    try:
        soak.start()
        report = soak.run()
    finally:
        soak.cleanup()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=False))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
