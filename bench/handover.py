"""Memory of PgBouncer and pgrelay under the hostile review's hand-over sequences (issue 7), in one run.

    python bench/handover.py

Each scenario runs against a fresh transaction-mode PgBouncer and pgrelay started from the same
generated pgbouncer.ini (bench/run.py's), in front of one throwaway PostgreSQL, and reports the
pooler's RSS growth:

- ``non-reading``: a client sends 4,000 small queries one at a time (2 kB rows) and then
  ``select repeat('x', 1000000) from generate_series(1, 1000)`` without ever reading;
- ``queued``: 500 clients queue behind a client holding the only server, each pipelining
  1.26 MB of ``select 1``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (bench/run.py: poolers, PostgreSQL, raw logins)

from pgrelay.tempdb import TempPostgres  # noqa: E402


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!I", len(body) + 4) + body


def peak_growth(pid: int, before: int, seconds: float) -> float:
    """Largest RSS growth (MiB) over `seconds`, sampled every 0.1 s."""
    peak = before
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, run.rss_bytes(pid))
        time.sleep(0.1)
    return (peak - before) / 2**20


def non_reading(pooler: run.Pooler) -> float:
    before = run.rss_bytes(pooler.pid)
    sock = run.login(pooler.port)
    small = query("select repeat('s', 2000)")
    for _ in range(4000):
        sock.sendall(small)
        time.sleep(0.0005)
    sock.settimeout(30)
    sock.sendall(query("select repeat('x', 1000000) from generate_series(1, 1000)"))
    growth = peak_growth(pooler.pid, before, 4)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    return growth


def queued(pooler: run.Pooler) -> float:
    holder = run.login(pooler.port)
    holder.sendall(query("begin"))
    time.sleep(0.3)
    before = run.rss_bytes(pooler.pid)
    payload = query("select 1") * 90000
    clients = run.open_clients(pooler.port, 500)
    for sock in clients:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.send(payload)
    growth = peak_growth(pooler.pid, before, 3)
    for sock in clients:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    holder.close()
    return growth


SCENARIOS = {"non-reading": non_reading, "queued": queued}


def main() -> int:
    pgbouncer_bin = run.find_pgbouncer()
    with contextlib.ExitStack() as stack:
        pg = TempPostgres(settings=run.PG_SETTINGS)
        stack.callback(pg.cleanup)
        pg.start()
        workdir = run.make_workdir(pg.owner, stack)
        rows = []
        for name, scenario in SCENARIOS.items():
            figures = {}
            for kind in ("pgbouncer", "pgrelay"):
                pooler = run.Pooler(kind, "transaction", 1, workdir, pg.port, pgbouncer_bin, pg.owner)
                with run.running(pooler):
                    run.progress(f"{name}: {kind}")
                    figures[kind] = scenario(pooler)
            rows.append([name, f"{figures['pgbouncer']:.1f}", f"{figures['pgrelay']:.1f}"])
        print(run.format_table(["scenario", "PgBouncer RSS growth MiB", "pgrelay RSS growth MiB"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
