"""Live protocol fuzzing: a real PostgreSQL and pgrelay, mutated wire-protocol streams over raw sockets, and checker clients that must stay served with their own results.

    python fuzz/live.py [--seconds N] [--attackers N] [--seed N]     (or: python fuzz/run.py --live)

Attackers log in (or not: some streams are mutated startup packets), send a mutated session (valid
messages with bytes flipped, inserted, cut, lengths changed) in random pieces, hang up, and wait
for pgrelay to close; a connection still open CLOSE_TIMEOUT seconds after the hang-up is a hang.
Checkers, meanwhile, each run SELECT '<their token>-<n>' on a kept connection and on fresh ones:
every reply must be their own value. At the end pgrelay's log is checked for internal errors.
Exit status 0 when nothing failed.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import struct
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from pgrelay.tempdb import TempPostgres, embedded_bindir, system_bindir
from tests.support import (
    RawClient,
    RelayProcess,
    data_rows,
    error_fields,
    message,
    query_message,
    startup_packet,
)

CLOSE_TIMEOUT = 10


def _bind(param: bytes) -> bytes:
    return message(b"B", b"\0\0\0\0\0\x01" + struct.pack("!I", len(param)) + param + b"\0\0")


# Sessions the mutations start from: what drivers send.
TEMPLATES = [
    [query_message("SELECT 1")],
    [query_message("BEGIN"), query_message("SELECT 2"), query_message("COMMIT")],
    [message(b"P", b"\0SELECT $1::text\0\0\0"), _bind(b"x"), message(b"D", b"P\0"), message(b"E", b"\0\0\0\0\0"),
     message(b"S")],
    [message(b"P", b"s1\0SELECT 3\0\0\0"), message(b"B", b"\0s1\0\0\0\0\0\0\0"), message(b"E", b"\0\0\0\0\0"),
     message(b"C", b"Ss1\0"), message(b"S")],
    [query_message("COPY (SELECT 1) TO STDOUT"), message(b"H")],
    [query_message("CREATE TEMP TABLE t (a int); COPY t FROM STDIN"), message(b"d", b"1\n"), message(b"c"),
     query_message("SELECT 4")],
    [query_message("SET application_name = 'fuzz'"), message(b"F", b"\0\0\0\0\0\0\0\0\0\0"), message(b"X")],
]


def mutate(rnd: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 6)):
        op = rnd.randrange(7)
        if op == 0 and buf:  # flip a byte
            buf[rnd.randrange(len(buf))] = rnd.randrange(256)
        elif op == 1:  # insert random bytes
            at = rnd.randint(0, len(buf))
            buf[at:at] = os.urandom(rnd.randint(1, 16))
        elif op == 2 and buf:  # cut a range
            at = rnd.randrange(len(buf))
            del buf[at:at + rnd.randint(1, 16)]
        elif op == 3 and len(buf) > 5:  # a lying length field at some offset
            at = rnd.randrange(len(buf) - 4)
            buf[at:at + 4] = struct.pack("!I", rnd.choice([0, 3, 4, 5, 0x7FFFFFFF, 0x40000001, rnd.randrange(1 << 16)]))
        elif op == 4 and buf:  # truncate
            del buf[rnd.randrange(len(buf)):]
        elif op == 5:  # duplicate a stretch
            if buf:
                at = rnd.randrange(len(buf))
                buf[at:at] = buf[at:at + rnd.randint(1, 64)]
        else:  # a random type byte where a message may start
            if buf:
                buf[rnd.randrange(len(buf))] = rnd.choice(b"QPBEDCHSXFdcfpZ\0")
    return bytes(buf)


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.streams = self.bytes = self.checks = 0
        self.hangs: list[str] = []
        self.failures: list[str] = []

    def add(self, **kw):
        with self.lock:
            for k, v in kw.items():
                if isinstance(v, str):
                    getattr(self, k).append(v)
                else:
                    setattr(self, k, getattr(self, k) + v)


def port_of(raw: RawClient) -> int:
    try:
        return raw.sock.getsockname()[1]
    except OSError:
        return 0


def attacker(port: int, rnd: random.Random, deadline: float, stats: Stats) -> None:
    while time.monotonic() < deadline:
        try:
            raw = RawClient(port, timeout=CLOSE_TIMEOUT)
        except OSError as exc:
            stats.add(failures=f"attacker could not connect: {exc}")
            time.sleep(0.5)
            continue
        logged_in = False
        try:
            if rnd.random() < 0.15:  # the startup phase itself
                data = mutate(rnd, startup_packet(application_name="fuzz"))
            else:
                raw.login()
                logged_in = True
                data = mutate(rnd, b"".join(b"".join(rnd.choice(TEMPLATES)) for _ in range(rnd.randint(1, 3))))
            pos = 0
            while pos < len(data):
                step = rnd.randint(1, 64)
                raw.sock.sendall(data[pos:pos + step])
                pos += step
                if rnd.random() < 0.1:
                    time.sleep(0.01)  # let pgrelay read the piece on its own
            raw.sock.shutdown(socket.SHUT_WR)
            raw.sock.settimeout(CLOSE_TIMEOUT)
            while raw.sock.recv(65536):
                pass
            stats.add(streams=1, bytes=len(data))
        except TimeoutError:
            stats.add(streams=1, hangs=f"no close {CLOSE_TIMEOUT}s after the hang-up (client port {port_of(raw)}, "
                                       f"logged_in {logged_in}); stream {data[:160]!r}")
        except (OSError, EOFError, AssertionError):
            stats.add(streams=1)  # refused or reset: what a bad stream may get
        finally:
            raw.close()


def checker(port: int, token: str, deadline: float, stats: Stats) -> None:
    n = 0
    kept = None
    while time.monotonic() < deadline:
        n += 1
        value = f"{token}-{n}"
        fresh = n % 5 == 0
        try:
            if kept is None or fresh:
                conn = RawClient(port, timeout=CLOSE_TIMEOUT)
                conn.login()
                if not fresh:
                    kept = conn
            else:
                conn = kept
            conn.send(query_message(f"SELECT '{value}'"))
            msgs = conn.read_reply(timeout=CLOSE_TIMEOUT)
            if msgs is None:
                stats.add(failures=f"{token}: no reply to query {n} within {CLOSE_TIMEOUT}s")
            else:
                errors = [error_fields(b) for k, b in msgs if k == b"E"]
                rows = data_rows(msgs)
                if errors or rows != [[value]]:
                    stats.add(failures=f"{token}: query {n} got {rows or errors}, not its own {value!r}")
            if fresh:
                conn.close()
            stats.add(checks=1)
        except (OSError, EOFError, AssertionError) as exc:
            stats.add(failures=f"{token}: check {n} failed: {exc!r}")
            if kept is not None:
                kept.close()
            kept = None
        time.sleep(0.05)
    if kept is not None:
        kept.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--attackers", type=int, default=3)
    parser.add_argument("--checkers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    bindir = system_bindir() or embedded_bindir()
    workdir = tempfile.mkdtemp(prefix="pgrelay-live-fuzz-")
    pg = TempPostgres(bindir=bindir, settings={"max_connections": "100"})
    pg.start()
    relay = RelayProcess(workdir, pg, {"default_pool_size": "8", "pool_mode": "transaction"}, name="relay")
    stats, alive = Stats(), False
    try:
        relay.start()
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=attacker, args=(relay.port, random.Random(seed + i), deadline, stats))
                   for i in range(args.attackers)]
        threads += [threading.Thread(target=checker, args=(relay.port, f"check{i}", deadline, stats))
                    for i in range(args.checkers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        alive = relay.alive()
    finally:
        if relay.proc is not None and relay.alive():
            relay.stop()
        bugs = relay.bugs()
        pg.cleanup()
    print(f"live fuzz: seed {seed}, {args.seconds:.0f}s, {stats.streams} streams ({stats.bytes} bytes) from "
          f"{args.attackers} attackers; {stats.checks} checks by {args.checkers} checkers")
    print(f"hangs: {len(stats.hangs)}, checker failures: {len(stats.failures)}, pgrelay alive at the end: {alive}, "
          f"internal errors logged: {len(bugs)}")
    for line in (stats.hangs + stats.failures)[:20] + bugs[:10]:
        print("  " + line)
    print(f"pgrelay log: {relay.log_path}")
    return 0 if alive and not (stats.hangs or stats.failures or bugs) else 1


if __name__ == "__main__":
    sys.exit(main())
