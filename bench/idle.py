"""100,000 idle clients on one PgBouncer and one pgrelay, in one run: login rate, RSS, and a query afterwards.

    python bench/idle.py [--clients 100000] [--queries 1000] [--in-flight 500] [--workers N] [--client-processes K]

Both poolers run in transaction mode from the same generated pgbouncer.ini (bench/run.py's, with
max_client_conn raised) in front of one throwaway PostgreSQL. One client process (this script,
non-blocking sockets on epoll) keeps `--in-flight` logins running until `--clients` clients are
logged in (StartupMessage, trust, read up to ReadyForQuery), spreading them over the source
addresses 127.0.0.2-127.0.0.9 so that ephemeral ports do not run out. Reported per pooler:

- logins per second over the whole ramp, and the slowest login;
- RSS before (after 100 warm-up clients) and with every client logged in, and per client;
- then `--queries` of the idle clients, picked evenly, each send ``SELECT 1`` at once: how many got
  their row, and how long the burst took.

The script raises its own RLIMIT_NOFILE (root: to clients + 1,000) so that the poolers inherit
it; pgrelay reports the limit it runs with in its log (``kernel file descriptor limit``). Where
the hard limit is below that (a container without CAP_SYS_RESOURCE), ``--workers N`` spreads the
clients over processes: pgrelay runs ``workers = N`` and PgBouncer N processes with
so_reuseport = 1, and the clients come from ``--client-processes`` forked client processes (by
default as many as the limit needs); RSS is then summed over each pooler's processes. The
machine is noisy and the client shares its 2 cores with the pooler: compare the two poolers of
the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import multiprocessing
import os
import resource
import selectors
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run  # noqa: E402  (bench/run.py: poolers, PostgreSQL, tables)

from pgrelay.tempdb import TempPostgres  # noqa: E402

SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the source port at connect(), per 4-tuple
STARTUP = run.startup_message(run.USER, run.DATABASE)
SELECT_1 = b"Q" + struct.pack("!I", 13) + b"SELECT 1\0"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=100_000, help="idle clients per pooler (default 100000)")
    parser.add_argument("--queries", type=int, default=1000, help="idle clients that then query (default 1000)")
    parser.add_argument("--in-flight", type=int, default=500, help="logins running at once (default 500)")
    parser.add_argument("--poolers", default="pgbouncer,pgrelay", help="which poolers, comma list")
    parser.add_argument("--workers", type=int, default=1,
                        help="pgrelay `workers = N`; PgBouncer N so_reuseport processes (default 1)")
    parser.add_argument("--client-processes", type=int, default=0,
                        help="client processes holding the clients (default: as many as RLIMIT_NOFILE needs)")
    return parser.parse_args(argv)


def raise_fd_limit(need: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < need:
        with open("/proc/sys/fs/nr_open") as f:
            hard = min(need, int(f.read()))
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Login:
    __slots__ = ("sock", "started", "buf", "sent")

    def __init__(self, sock):
        self.sock, self.started, self.buf, self.sent = sock, time.monotonic(), b"", False


def ready_for_query(buf: bytes) -> tuple[bool, bytes | None]:
    """(done, error text) after scanning whole messages of `buf` for 'Z' or 'E'."""
    pos = 0
    while len(buf) - pos >= 5:
        kind = buf[pos:pos + 1]
        (length,) = struct.unpack_from("!I", buf, pos + 1)
        if len(buf) - pos - 1 < length:
            break
        if kind == b"E":
            return True, buf[pos + 5:pos + 1 + length].replace(b"\0", b" ")
        if kind == b"Z":
            return True, None
        pos += 1 + length
    return False, None


def open_idle_clients(port: int, count: int, in_flight: int) -> tuple[list[socket.socket], float, float, list]:
    """`count` logged-in clients; returns them, the ramp's seconds, the slowest login and errors."""
    selector = selectors.EpollSelector()
    done: list[socket.socket] = []
    errors: list = []
    running = 0
    started_ramp = time.monotonic()
    slowest = 0.0
    next_source = 0
    while len(done) + len(errors) < count:
        while running < in_flight and len(done) + len(errors) + running < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((SOURCES[next_source % len(SOURCES)], 0))
            next_source += 1
            sock.setblocking(False)
            err = sock.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                errors.append(os.strerror(err))
                continue
            selector.register(sock, selectors.EVENT_WRITE, Login(sock))
            running += 1
        for key, events in selector.select(timeout=10):
            login = key.data
            sock = login.sock
            if not login.sent:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    selector.unregister(sock)
                    sock.close()
                    running -= 1
                    errors.append(os.strerror(err))
                    continue
                sock.send(STARTUP)  # 41 bytes into an empty send buffer
                login.sent = True
                selector.modify(sock, selectors.EVENT_READ, login)
                continue
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                chunk, login.buf = b"", str(exc).encode()
            finished, error = ready_for_query(login.buf + chunk) if chunk else (True, b"closed during login")
            login.buf += chunk
            if not finished:
                continue
            selector.unregister(sock)
            running -= 1
            if error is not None:
                sock.close()
                errors.append(error.decode(errors="replace"))
                continue
            slowest = max(slowest, time.monotonic() - login.started)
            done.append(sock)
    selector.close()
    return done, time.monotonic() - started_ramp, slowest, errors


def query_burst(clients: list[socket.socket], count: int) -> tuple[int, float, list]:
    """`count` clients picked evenly each send SELECT 1 at once; (rows received, seconds, errors)."""
    step = max(1, len(clients) // max(1, count))
    picked = clients[::step][:count]
    selector = selectors.EpollSelector()
    buffers = {}
    started = time.monotonic()
    for sock in picked:
        sock.send(SELECT_1)
        buffers[sock] = b""
        selector.register(sock, selectors.EVENT_READ)
    ok, errors = 0, []
    deadline = started + 60
    while buffers and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=5):
            sock = key.fileobj
            chunk = sock.recv(65536)
            buffers[sock] += chunk
            finished, error = ready_for_query(buffers[sock]) if chunk else (True, b"closed")
            if finished:
                selector.unregister(sock)
                data = buffers.pop(sock)
                if error is None and b"D" in data:
                    ok += 1
                else:
                    errors.append((error or b"no row").decode(errors="replace"))
    errors += ["no answer"] * len(buffers)
    selector.close()
    return ok, time.monotonic() - started, errors


def close_all(clients: list[socket.socket]) -> None:
    for sock in clients:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def client_process(port: int, count: int, in_flight: int, queries: int, conn) -> None:
    """A forked client process: log in `count` idle clients, report, then query and close on command."""
    clients: list[socket.socket] = []
    try:
        clients, seconds, slowest, errors = open_idle_clients(port, count, in_flight)
        conn.send((len(clients), seconds, slowest, errors[:5], len(errors)))
        conn.recv()  # "query"
        conn.send(query_burst(clients, queries))
        conn.recv()  # "close"
    finally:
        close_all(clients)
        conn.close()


def open_in_processes(port: int, count: int, in_flight: int, queries: int, processes: int):
    """`count` clients over `processes` forked client processes; the same figures as open_idle_clients,
    then a `burst()` that runs the query burst in all of them, and a `close()`."""
    ctx = multiprocessing.get_context("fork")
    shares = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    asks = [queries // processes + (1 if i < queries % processes else 0) for i in range(processes)]
    pipes, procs = [], []
    started = time.monotonic()
    for share, ask in zip(shares, asks, strict=True):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=client_process, args=(port, share, max(1, in_flight // processes), ask, child))
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)
    reports = [pipe.recv() for pipe in pipes]
    seconds = time.monotonic() - started
    logged_in = sum(r[0] for r in reports)
    errors = [e for r in reports for e in r[3]]
    errors += ["(more)"] * (sum(r[4] for r in reports) - len(errors))

    def burst():
        for pipe in pipes:
            pipe.send("query")
        results = [pipe.recv() for pipe in pipes]
        return (sum(r[0] for r in results), max(r[1] for r in results), [e for r in results for e in r[2]])

    def close():
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("close")
        for proc in procs:
            proc.join(60)

    return logged_in, seconds, max(r[2] for r in reports), errors, burst, close


def measure(pooler: run.Pooler, args) -> dict:
    warmup, _, _, warm_errors = open_idle_clients(pooler.port, 100, 50)
    if warm_errors:
        raise RuntimeError(f"{pooler.name}: warm-up logins failed: {warm_errors[0]}")
    time.sleep(1)
    before = pooler.rss()
    if args.client_processes > 1:
        logged_in, seconds, slowest, errors, burst, close = open_in_processes(
            pooler.port, args.clients, args.in_flight, args.queries, args.client_processes)
        try:
            time.sleep(2)
            after = pooler.rss()
            ok, burst_seconds, query_errors = burst()
        finally:
            close()
            close_all(warmup)
    else:
        clients, seconds, slowest, errors = open_idle_clients(pooler.port, args.clients, args.in_flight)
        logged_in = len(clients)
        time.sleep(2)
        after = pooler.rss()
        try:
            ok, burst_seconds, query_errors = query_burst(clients, args.queries)
        finally:
            close_all(clients + warmup)
    return {"logged_in": logged_in, "login_errors": len(errors), "first_error": errors[0] if errors else "",
            "logins_per_s": logged_in / seconds, "slowest_login": slowest, "rss_before": before,
            "rss_after": after, "per_client": (after - before) / max(1, logged_in), "queries_ok": ok,
            "query_seconds": burst_seconds, "query_errors": len(query_errors),
            "first_query_error": query_errors[0] if query_errors else ""}


def main(argv=None) -> int:
    args = parse_args(argv)
    limit = raise_fd_limit(args.clients + 1000)
    if not args.client_processes:
        args.client_processes = -(-(args.clients + 200) // max(1000, limit - 1000)) if limit < args.clients + 200 else 1
    per_process = -(-args.clients // args.client_processes)
    per_worker = -(-args.clients // args.workers)  # (SO_REUSEPORT spreads them about evenly: 1,000 to spare)
    fits = args.clients + 200 <= limit or (args.workers > 1 and per_process + 1000 <= limit
                                           and per_worker + 1000 <= limit)
    if not fits:
        raise SystemExit(f"RLIMIT_NOFILE is {limit} and cannot be raised (root without CAP_SYS_RESOURCE, or not "
                         f"root): raise ulimit -Hn above {args.clients + 1000}, run with --clients "
                         f"{max(0, limit - 1000)}, or spread them with --workers {-(-args.clients // (limit - 1000))}")
    pgbouncer_bin = run.find_pgbouncer()
    results = {}
    with contextlib.ExitStack() as stack:
        pg = TempPostgres(settings=run.PG_SETTINGS)
        stack.callback(pg.cleanup)
        pg.start()
        workdir = run.make_workdir(pg.owner, stack)
        extra = {"max_client_conn": args.clients + 500}
        for kind in args.poolers.split(","):
            pooler = run.Pooler(kind, "transaction", run.POOL_SIZE, workdir, pg.port, pgbouncer_bin, pg.owner, extra,
                                processes=args.workers)
            with run.running(pooler):
                run.progress(f"{run.LABELS[kind]}: {args.clients} idle clients, {args.in_flight} logins in flight"
                             + (f", {args.workers} processes, {args.client_processes} client processes"
                                if args.workers > 1 or args.client_processes > 1 else ""))
                results[kind] = measure(pooler, args)
                run.wait_for_clients_to_leave(pooler, timeout=60)
                if kind == "pgrelay":
                    results[kind]["fd_line"] = next((line.split(" LOG ", 1)[-1].strip() for line in
                                                     pooler.log_tail(400).splitlines()
                                                     if "kernel file descriptor limit:" in line), "")
        problems = run.log_problems(workdir)
    rows = []
    for kind, r in results.items():
        rows.append([run.LABELS[kind], f"{r['logged_in']:,}", f"{r['login_errors']}", f"{r['logins_per_s']:,.0f}",
                     f"{r['slowest_login'] * 1000:.0f}", f"{r['rss_before'] / 2**20:.0f}",
                     f"{r['rss_after'] / 2**20:.0f}", f"{r['per_client'] / 1024:.2f}",
                     f"{r['queries_ok']}/{args.queries}", f"{r['query_seconds'] * 1000:.0f}"])
    print(run.format_table(["pooler", "idle clients", "login errors", "logins/s", "slowest login ms",
                            "RSS before MiB", "RSS after MiB", "KiB/client", "queries ok", "burst ms"], rows))
    for kind, r in results.items():
        if r["first_error"] or r["first_query_error"]:
            print(f"{run.LABELS[kind]}: first login error: {r['first_error']!r}; "
                  f"first query error: {r['first_query_error']!r}")
    if "pgrelay" in results and results["pgrelay"].get("fd_line"):
        print(f"pgrelay: {results['pgrelay']['fd_line']}")
    if "pgbouncer" in results and "pgrelay" in results:
        print(f"login rate pgrelay/PgBouncer: "
              f"{results['pgrelay']['logins_per_s'] / results['pgbouncer']['logins_per_s']:.2f}x")
    if "pgrelay" in results:
        r = results["pgrelay"]
        within = r["rss_after"] <= 2**30 and r["logged_in"] == args.clients and r["queries_ok"] == args.queries
        print(f"target (all {args.clients:,} logged in within 1 GiB RSS, every query answered): "
              f"{'met' if within else 'NOT met'}")
    for line in problems[:10]:
        print("log:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
