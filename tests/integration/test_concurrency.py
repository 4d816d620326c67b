"""Concurrency: 1,000 asyncpg clients over a transaction-mode pool of 10, and pgbench (select-only and TPC-B-like)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import threading

import asyncpg
import psycopg2
import pytest


def ensure_database(pg, name: str) -> bool:
    """Create `name` on the server if missing; True if it was created now."""
    if pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "1":
        return False
    pg.psql(f"CREATE DATABASE {name}")
    return True


class BackendWatcher:
    """Polls pg_stat_activity directly on PostgreSQL and keeps the highest backend count for a database."""

    def __init__(self, pg, dbname: str):
        self.conn = psycopg2.connect(pg.dsn())
        self.conn.autocommit = True
        self.dbname = dbname
        self.peak = 0
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with self.conn.cursor() as cur:
            while not self.stop.is_set():
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.dbname,))
                self.peak = max(self.peak, cur.fetchone()[0])
                self.samples += 1
                self.stop.wait(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(5)
        self.conn.close()


def test_thousand_concurrent_clients_over_a_pool_of_ten(make_relay, pg):
    ensure_database(pg, "pgrelay_conc")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 10, "max_client_conn": 2000})
    nclients = 1000

    async def run():
        connected = 0
        all_connected = asyncio.Event()

        async def client(n: int):
            conn = await asyncpg.connect(relay.url(dbname="pgrelay_conc"), statement_cache_size=0, timeout=60)
            try:
                nonlocal connected
                connected += 1
                if connected == nclients:
                    all_connected.set()
                await all_connected.wait()  # every client is connected at once before any query runs
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                value = await conn.fetchval("SELECT $1::int * 2", n)
                in_tx = await conn.fetchval("SELECT count(*) FROM generate_series(1, $1::int)", n % 7 + 1)
                return pid, value, in_tx
            finally:
                await conn.close()

        return await asyncio.gather(*(client(n) for n in range(nclients)), return_exceptions=True)

    with BackendWatcher(pg, "pgrelay_conc") as watcher:
        results = asyncio.run(asyncio.wait_for(run(), 120))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} clients failed, first: {failures[:3]!r}"
    assert [r[1] for r in results] == [n * 2 for n in range(nclients)]
    assert [r[2] for r in results] == [n % 7 + 1 for n in range(nclients)]
    pids = {r[0] for r in results}
    assert len(pids) == 10, pids  # the pool filled up to its size and no further
    assert watcher.samples > 0
    assert 1 <= watcher.peak <= 10, watcher.peak


# -- pgbench -----------------------------------------------------------------------------------------

def pgbench_path(pg) -> str:
    path = os.path.join(pg.bindir, "pgbench")
    if os.path.exists(path):
        return path
    found = shutil.which("pgbench")
    assert found, "pgbench is not installed (apt-get install postgresql-client)"
    return found


@pytest.fixture(scope="module")
def bench_db(pg):
    """A database `bench` initialised with `pgbench -i -s 1` directly against PostgreSQL."""
    ensure_database(pg, "bench")
    result = subprocess.run([pgbench_path(pg), "-i", "-s", "1", "-q", "-h", "127.0.0.1", "-p", str(pg.port),
                             "-U", "postgres", "bench"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return "bench"


def run_pgbench(pg, relay, *args: str) -> dict[str, float]:
    result = subprocess.run([pgbench_path(pg), "-n", *args, "-h", "127.0.0.1", "-p", str(relay.port),
                             "-U", "postgres", "bench"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"pgbench failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    out = result.stdout
    processed = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
    failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
    tps = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out, re.M)
    assert processed and failed and tps, out
    return {"processed": int(processed.group(1)), "failed": int(failed.group(1)), "tps": float(tps.group(1))}


def test_pgbench_select_only_100_clients(make_relay, pg, bench_db):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 10})
    stats = run_pgbench(pg, relay, "-S", "-c", "100", "-j", "2", "-T", "5")
    assert stats["failed"] == 0
    assert stats["processed"] > 0
    assert stats["tps"] > 0


def test_pgbench_tpcb_like_50_clients(make_relay, pg, bench_db):
    before = int(pg.psql("SELECT count(*) FROM pgbench_history", dbname="bench"))
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 10})
    stats = run_pgbench(pg, relay, "-c", "50", "-j", "2", "-T", "5")
    assert stats["failed"] == 0
    assert stats["processed"] > 0
    assert stats["tps"] > 0
    # Every processed transaction committed its history row.
    after = int(pg.psql("SELECT count(*) FROM pgbench_history", dbname="bench"))
    assert after - before == stats["processed"]
