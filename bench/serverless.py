"""Benchmark pgrelay's serverless listener: queries/s of the Neon driver over HTTP and WebSocket against node-postgres over TCP, all through pgrelay."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from pgrelay.tempdb import TempPostgres, free_port
from run import cpu_seconds, progress  # bench/run.py, next to this script

HERE = os.path.dirname(os.path.abspath(__file__))
NODE_PACKAGE = os.path.join(HERE, "..", "tests", "drivers", "node")  # the pinned driver versions
MODES = {"http": "neon() over HTTP (POST /sql)", "ws": "Neon Pool over WebSocket", "tcp": "node-postgres Pool over TCP"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per mode (default 10)")
    parser.add_argument("--warmup", type=float, default=2, help="unmeasured seconds first (default 2)")
    parser.add_argument("--pool-size", type=int, default=20, help="pgrelay's default_pool_size (default 20)")
    parser.add_argument("--modes", default="http,ws,tcp", help="comma-separated: http, ws, tcp")
    parser.add_argument("--json", metavar="PATH", help="also write the results to this JSON file")
    return parser.parse_args(argv)


def install_node(workdir: str) -> str:
    """npm ci of tests/drivers/node's lock file into `workdir`, plus bench/serverless.js."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        sys.exit("node and npm are needed (apt-get install nodejs npm)")
    for name in ("package.json", "package-lock.json"):
        shutil.copy(os.path.join(NODE_PACKAGE, name), workdir)
    shutil.copy(os.path.join(HERE, "serverless.js"), workdir)
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"], cwd=workdir, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)
    return node


def start_relay(workdir: str, pg_port: int, pool_size: int, clients: int) -> tuple[subprocess.Popen, int, int]:
    tcp, serverless = free_port(), free_port()
    ini = os.path.join(workdir, "pgrelay.ini")
    with open(ini, "w") as f:
        f.write(f"[databases]\n* = host=127.0.0.1 port={pg_port}\n[pgbouncer]\nlisten_addr = 127.0.0.1\n"
                f"listen_port = {tcp}\nunix_socket_dir =\nauth_type = trust\npool_mode = transaction\n"
                f"default_pool_size = {pool_size}\nmax_client_conn = {clients * 4 + 100}\n"
                f"log_connections = 0\nlog_disconnections = 0\n"
                f"[listeners]\nserverless = port={serverless} role=serverless\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    log = open(os.path.join(workdir, "pgrelay.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "pgrelay", ini], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 30
    for port in (tcp, serverless):
        while True:
            if proc.poll() is not None:
                sys.exit(f"pgrelay exited with {proc.returncode}; see {log.name}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                sys.exit("pgrelay did not start listening within 30 s")
            time.sleep(0.1)
    return proc, tcp, serverless


def measure(node: str, workdir: str, mode: str, args, relay: subprocess.Popen, tcp: int, serverless: int) -> dict:
    config = {"mode": mode, "clients": args.clients, "seconds": args.seconds, "warmup_ms": int(args.warmup * 1000),
              "tcp_port": tcp, "serverless_port": serverless}
    proc = subprocess.Popen([node, os.path.join(workdir, "serverless.js"), json.dumps(config)], cwd=workdir,
                            stdout=subprocess.PIPE, text=True)
    cpu_before = None
    result = None
    for line in proc.stdout:
        record = json.loads(line)
        if record["event"] == "measuring":
            cpu_before = cpu_seconds(relay.pid)
        elif record["event"] == "result":
            result = record
            result["pgrelay_cpu_s"] = cpu_seconds(relay.pid) - cpu_before  # includes the short drain
    proc.wait(timeout=60)
    if result is None:
        sys.exit(f"the {mode} run printed no result (exit {proc.returncode})")
    result["pgrelay_cpu_pct"] = 100 * result["pgrelay_cpu_s"] / result["seconds"]
    result["pgrelay_us_per_query"] = 1e6 * result["pgrelay_cpu_s"] / max(result["queries"], 1)
    return result


def table(results: list[dict]) -> str:
    head = ("mode", "clients", "queries/s", "p50 ms", "p99 ms", "errors", "pgrelay CPU %", "pgrelay µs/query")
    rows = [(MODES[r["mode"]], str(r["clients"]), f"{r['qps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
             str(r["errors"]), f"{r['pgrelay_cpu_pct']:.0f}", f"{r['pgrelay_us_per_query']:.0f}") for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            sys.exit(f"unknown mode {mode!r}")
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="pgrelay-bench-serverless-"))
        progress("installing the pinned drivers (npm ci)...")
        node = install_node(workdir)
        progress("starting PostgreSQL...")
        pg = TempPostgres(settings={"max_connections": str(args.pool_size + 50)})
        stack.callback(pg.cleanup)
        pg.start()
        relay, tcp, serverless = start_relay(workdir, pg.port, args.pool_size, args.clients)

        def stop_relay():
            if relay.poll() is None:
                relay.send_signal(signal.SIGQUIT)  # pgrelay's immediate shutdown
                with contextlib.suppress(subprocess.TimeoutExpired):
                    relay.wait(10)
                if relay.poll() is None:
                    relay.kill()
        stack.callback(stop_relay)
        results = []
        for mode in modes:
            progress(f"{MODES[mode]}: {args.clients} clients, {args.seconds:g} s...")
            results.append(measure(node, workdir, mode, args, relay, tcp, serverless))
        print(f"pgrelay transaction mode, default_pool_size={args.pool_size}, query `SELECT $1::int`, "
              f"{args.seconds:g} s per mode, {os.cpu_count()} CPUs (the clients run on the same machine)")
        print(table(results))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
