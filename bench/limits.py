"""The limits' load checks of issue 8 against PgBouncer in one run: a thundering herd under max_db_connections, and the reserve pool.

    python bench/limits.py [--clients 2000] [--workers N]

Both poolers run from the same generated pgbouncer.ini (bench/run.py's) in front of one throwaway
PostgreSQL, each in transaction mode with default_pool_size=20 and max_db_connections=30:

- ``herd``: 2,000 clients (pgbench, three users at once) each run 3 transactions of
  ``BEGIN; SELECT 1; SELECT pg_sleep(0.002); END``. A sampler reads pg_stat_activity every 20 ms.
  Reported: the peak of server connections, failed transactions, and the wall time.
  pgrelay runs it a second time with one of the three users on a dedicated pooler (``user|herd``),
  the issue's scenario, which PgBouncer cannot express.
- ``reserve``: reserve_pool_size=5, reserve_pool_timeout=1: 20 clients hold every server in a
  transaction, 7 more each run ``select pg_sleep(1.5)``. Reported: after how long the pool grew to
  25, its peak, and how long after every transaction ended (the clients staying connected) it
  was back at 20 servers.

With ``--workers N`` pgrelay runs ``workers = N`` and PgBouncer N processes with so_reuseport = 1,
each from the same ini: PgBouncer's limits hold per process (its peak may reach N x 30), pgrelay's
for the whole pgrelay (its peak must stay at 30).

Figures are seconds and connection counts of one run; the machine is noisy, so compare the two
poolers of the same run, not runs of different days.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (bench/run.py: poolers, PostgreSQL, tables)

import psycopg2  # noqa: E402

from pgrelay.tempdb import TempPostgres  # noqa: E402

USERS = ("herd_a", "herd_b", "herd_c")
LIMITS = {"default_pool_size": 20, "max_db_connections": 30, "max_client_conn": 3000, "query_wait_timeout": 120}
RESERVE = {"default_pool_size": 20, "reserve_pool_size": 5, "reserve_pool_timeout": 1, "query_wait_timeout": 120}


class Sampler:
    """Counts PostgreSQL's client backends of `users` every 20 ms until finish(); keeps the peak and a timeline."""

    def __init__(self, pg: TempPostgres, users: tuple[str, ...]):
        self.conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
        self.conn.autocommit = True
        self.users = list(users)
        self.peak = 0
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def count(self) -> int:
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                        "AND usename = ANY(%s)", (self.users,))
            return cur.fetchone()[0]

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.count()
            self.peak = max(self.peak, n)
            self.timeline.append((time.monotonic(), n))
            time.sleep(0.02)

    def first_time(self, since: float, predicate) -> float | None:
        return next((t - since for t, n in list(self.timeline) if t >= since and predicate(n)), None)

    def finish(self) -> int:
        self._stop.set()
        self._thread.join()
        self.conn.close()
        return self.peak


def herd(pg: TempPostgres, pooler: run.Pooler, clients: int, users: tuple[str, ...], script: str) -> list[str]:
    pgbench = run.pgbench_path(pg)
    sampler = Sampler(pg, USERS)
    share = [clients // len(users) + (1 if i < clients % len(users) else 0) for i in range(len(users))]
    start = time.monotonic()
    procs = [subprocess.Popen([pgbench, "-n", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", user, "-c", str(n),
                               "-j", "2", "-t", "3", "-f", script, "postgres"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for user, n in zip(users, share, strict=True)]
    outputs = [p.communicate(timeout=600) for p in procs]
    elapsed = time.monotonic() - start
    peak = sampler.finish()
    failed = done = 0
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            failed += 1
            run.progress(f"  pgbench failed: {err.strip().splitlines()[-1:] or proc.returncode}")
        for line in out.splitlines():
            if line.startswith("number of transactions actually processed"):
                done += int(line.split(":")[1].split("/")[0])
            if line.startswith("number of failed transactions"):
                failed += int(line.split(":")[1].split()[0])
    return [str(clients), str(peak), str(done), str(failed), f"{elapsed:.1f}"]


def reserve(pg: TempPostgres, pooler: run.Pooler) -> list[str]:
    def connect():
        return psycopg2.connect(host="127.0.0.1", port=pooler.port, user="herd_a", dbname="postgres")

    sampler = Sampler(pg, ("herd_a",))
    holders = [connect() for _ in range(20)]
    for conn in holders:
        with conn.cursor() as cur:
            cur.execute("select 1")  # in a transaction now: the server stays with it
    errors: list[str] = []

    def wait_one():
        try:
            with contextlib.closing(connect()) as conn:
                conn.autocommit = True  # a client that leaves inside a transaction takes its server along
                with conn.cursor() as cur:
                    cur.execute("select pg_sleep(1.5)")
        except psycopg2.Error as exc:
            errors.append(str(exc).strip())

    start = time.monotonic()
    waiters = [threading.Thread(target=wait_one) for _ in range(7)]
    for thread in waiters:
        thread.start()
    for thread in waiters:
        thread.join(60)
    for conn in holders:
        conn.rollback()  # every server idle now, the holders still connected
    released = time.monotonic()
    deadline = released + 30
    while time.monotonic() < deadline and sampler.count() > 20:
        time.sleep(0.05)
    time.sleep(0.2)
    peak = sampler.finish()
    for conn in holders:
        conn.close()
    for error in sorted(set(errors)):
        run.progress(f"  reserve: {errors.count(error)} x {error}")
    grew = sampler.first_time(start, lambda n: n >= 25)
    back = sampler.first_time(released, lambda n: n <= 20)
    return [f"{grew:.2f}" if grew is not None else "never", str(peak),
            f"{back:.2f}" if back is not None else "> 30", str(len(errors))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=2000, help="clients of the herd (default 2000)")
    parser.add_argument("--workers", type=int, default=1,
                        help="pgrelay `workers = N`, PgBouncer N so_reuseport processes (default 1)")
    args = parser.parse_args(argv)
    n = args.workers
    pgbouncer_bin = run.find_pgbouncer()
    with contextlib.ExitStack() as stack:
        pg = TempPostgres(settings={"max_connections": "200"})
        stack.callback(pg.cleanup)
        pg.start()
        for user in USERS:
            pg.psql(f"CREATE ROLE {user} LOGIN")
        workdir = run.make_workdir(pg.owner, stack)
        with open(os.path.join(workdir, "userlist.txt"), "a") as f:  # PgBouncer's trust needs the users listed
            f.writelines(f'"{user}" ""\n' for user in USERS)
        script = os.path.join(workdir, "herd.sql")
        with open(script, "w") as f:
            f.write("BEGIN;\nSELECT 1;\nSELECT pg_sleep(0.002);\nEND;\n")
        herd_rows, reserve_rows = [], []
        for kind in ("pgbouncer", "pgrelay"):
            pooler = run.Pooler(kind, "transaction", 20, workdir, pg.port, pgbouncer_bin, pg.owner, extra=LIMITS,
                                processes=n)
            with run.running(pooler):
                run.progress(f"herd: {kind}")
                herd_rows.append([run.LABELS[kind]] + herd(pg, pooler, args.clients, USERS, script))
            run.wait_for_servers_to_leave(pg, 0)
            if kind == "pgrelay":
                pooler = run.Pooler(kind, "transaction", 20, workdir, pg.port, pgbouncer_bin, pg.owner, extra=LIMITS,
                                    extra_sections="\n[poolers]\nherd = target=primary default_pool_size=20 max_client_conn=3000\n",
                                    processes=n)
                with run.running(pooler):
                    run.progress("herd: pgrelay with a dedicated pooler")
                    herd_rows.append(["pgrelay, herd_c|herd on a dedicated pooler"]
                                     + herd(pg, pooler, args.clients, ("herd_a", "herd_b", "herd_c|herd"), script))
            run.wait_for_servers_to_leave(pg, 0)
            pooler = run.Pooler(kind, "transaction", 20, workdir, pg.port, pgbouncer_bin, pg.owner, extra=RESERVE,
                                processes=n)
            with run.running(pooler):
                run.progress(f"reserve: {kind}")
                reserve_rows.append([run.LABELS[kind]] + reserve(pg, pooler))
            run.wait_for_servers_to_leave(pg, 0)
        if n > 1:
            print(f"Processes: pgrelay workers = {n}; PgBouncer {n} processes with so_reuseport = 1, each from the "
                  f"same ini (PgBouncer's pool sizes and limits are per process)")
        print("Thundering herd: default_pool_size=20, max_db_connections=30, 3 transactions per client")
        print(run.format_table(["pooler", "clients", "peak servers", "transactions", "failed", "seconds"], herd_rows))
        print()
        print("Reserve pool: default_pool_size=20, reserve_pool_size=5, reserve_pool_timeout=1")
        print(run.format_table(["pooler", "grew to 25 after s", "peak servers", "back to 20 after s", "errors"],
                               reserve_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
