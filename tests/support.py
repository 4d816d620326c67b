"""Test helpers: pgrelay as a real subprocess, and a raw wire-protocol client for bad-input tests."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time

from pgrelay.tempdb import free_port

# The SQLSTATE of each of pgrelay's own refusals, as issue 8 asks (PgBouncer sends 08P01 for all).
POOLER_SQLSTATE = {
    "no more connections allowed (max_client_conn)": "53300",
    "client connections exceeded (max_db_client_connections)": "53300",
    "client connections exceeded (max_user_client_connections)": "53300",
    "query_wait_timeout": "57014", "query_timeout": "57014", "query timeout": "57014",
    "transaction timeout": "25P04", "idle transaction timeout": "25P03", "client_idle_timeout": "57P05",
    "server conn crashed?": "08006",
}

# Log lines that mean pgrelay hit a bug; every relay's log is checked for them at teardown.
BUG_MARKERS = ("Traceback (most recent call last)", "internal error", "janitor failed")


class RelayProcess:
    """pgrelay running from a generated pgbouncer.ini, as users run it."""

    def __init__(self, workdir: str, pg, settings: dict | None = None, databases: dict | None = None,
                 users: dict | None = None, extra_sections: str = "", env: dict | None = None,
                 args: list[str] | None = None, name: str = "relay"):
        self.workdir = workdir
        self.pg = pg
        self.port = free_port()
        self.name = name
        self.ini_path = os.path.join(workdir, f"{name}.ini")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": workdir,
            "auth_type": "trust",
            "pool_mode": "transaction",
            "default_pool_size": "10",
            "max_client_conn": "2000",
            "stats_period": "3600",
        }
        self.settings.update({k: str(v) for k, v in (settings or {}).items()})
        self.port = int(self.settings["listen_port"])  # a test may choose it (peers that name each other)
        if databases is None:
            databases = {"*": f"host=127.0.0.1 port={pg.port}"}
        self.databases = databases
        self.users = users or {}
        self.extra_sections = extra_sections
        self.env = dict(os.environ, **(env or {}))
        self.args = args or []
        self.proc: subprocess.Popen | None = None
        self.expected_bugs: tuple[str, ...] = ()

    def write_ini(self) -> None:
        lines = ["[databases]"]
        lines += [f"{k} = {v}" for k, v in self.databases.items()]
        lines.append("[pgbouncer]")
        lines += [f"{k} = {v}" for k, v in self.settings.items()]
        if self.users:
            lines.append("[users]")
            lines += [f"{k} = {v}" for k, v in self.users.items()]
        with open(self.ini_path, "w") as f:
            f.write("\n".join(lines) + "\n" + self.extra_sections)

    def start(self, timeout: float = 20) -> "RelayProcess":
        self.write_ini()
        self._logf = open(self.log_path, "ab")
        self.started_at = time.time()  # wall clock: PostgreSQL's backend_start of its servers is later
        self.proc = subprocess.Popen([sys.executable, "-m", "pgrelay", self.ini_path] + self.args,
                                     stdout=self._logf, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgrelay exited with {self.proc.returncode}:\n{self.log()}")
            if "process up" in self.log():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"pgrelay did not start in {timeout}s:\n{self.log()}")

    def dsn(self, user: str = "postgres", dbname: str = "postgres", **extra) -> str:
        parts = {"host": "127.0.0.1", "port": str(self.port), "user": user, "dbname": dbname}
        parts.update({k: str(v) for k, v in extra.items()})
        return " ".join(f"{k}={_q(v)}" for k, v in parts.items())

    def url(self, user: str = "postgres", dbname: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def reload(self, wait_for: str = "got SIGHUP") -> None:
        before = self.log().count(wait_for)
        self.send_signal(signal.SIGHUP)
        wait_until(lambda: self.log().count(wait_for) > before, timeout=10)
        time.sleep(0.2)

    def stop(self, sig: int = signal.SIGQUIT, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pgrelay did not stop within {timeout}s after signal {sig}")
        finally:
            self._logf.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def bugs(self) -> list[str]:
        return [line for line in self.log().splitlines()
                if any(marker in line for marker in BUG_MARKERS)
                and not any(e in line for e in self.expected_bugs)]


def _q(value: str) -> str:
    if value == "" or any(c in value for c in " '\\"):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return value


def wait_until(predicate, timeout: float = 10, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


# -- psycopg2 shortcuts ----------------------------------------------------------------------

def connect(relay: RelayProcess, **kw):
    """A psycopg2 connection through `relay`, in autocommit mode."""
    import psycopg2
    conn = psycopg2.connect(relay.dsn(**kw), connect_timeout=10)
    conn.autocommit = True
    return conn


def assert_served(relay: RelayProcess, **kw) -> None:
    """A new client of `relay` (connect() keywords) is served normally."""
    conn = connect(relay, **kw)
    try:
        assert scalar(conn, "SELECT 'served'") == "served"
    finally:
        conn.close()


def query_running(pg, marker: str) -> bool:
    """Whether exactly one backend of `pg` is running a query containing `marker` (asked directly)."""
    import psycopg2
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                        "AND pid <> pg_backend_pid()", (f"%{marker}%",))
            return cur.fetchone()[0] == 1
    finally:
        conn.close()


def row(conn, sql: str, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def scalar(conn, sql: str, args=None):
    return row(conn, sql, args)[0]


# -- a raw protocol client -------------------------------------------------------------------

def startup_packet(user: str = "postgres", database: str = "postgres", version: int = 196608, **params) -> bytes:
    body = struct.pack("!I", version)
    for k, v in {"user": user, "database": database, **params}.items():
        body += k.encode() + b"\0" + v.encode() + b"\0"
    body += b"\0"
    return struct.pack("!I", len(body) + 4) + body


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query_message(sql: str) -> bytes:
    return message(b"Q", sql.encode() + b"\0")


class RawClient:
    """Speaks bytes to pgrelay directly, to send what real drivers never would."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed with {len(self.buf)} of {n} bytes")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_message(self) -> tuple[bytes, bytes]:
        header = self.recv_exact(5)
        length = struct.unpack("!I", header[1:])[0]
        return header[:1], self.recv_exact(length - 4)

    def read_until(self, kind: bytes) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            msg = self.read_message()
            out.append(msg)
            if msg[0] == kind:
                return out

    def login(self, user: str = "postgres", database: str = "postgres", **params) -> list[tuple[bytes, bytes]]:
        self.send(startup_packet(user, database, **params))
        msgs = self.read_until(b"Z")
        assert msgs[0] == (b"R", b"\0\0\0\0"), msgs[0]
        return msgs

    def query(self, sql: str) -> list[tuple[bytes, bytes]]:
        self.send(query_message(sql))
        return self.read_until(b"Z")

    def read_reply(self, timeout: float = 5) -> list[tuple[bytes, bytes]] | None:
        """Messages up to ReadyForQuery, or None if none came within `timeout` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.read_until(b"Z")
        except TimeoutError:
            return None

    def read_error(self) -> dict[str, str]:
        """The next message, which must be an ErrorResponse; returns its fields."""
        kind, body = self.read_message()
        assert kind == b"E", (kind, body)
        return error_fields(body)

    def closed(self, timeout: float = 5) -> bool:
        """True once the peer has closed the connection (any pending bytes are discarded)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def local_certificate(directory, name: str = "cert"):
    """A trustme CA and a certificate it issued for localhost and 127.0.0.1, written to
    directory/<name>.pem and <name>-key.pem; returns (ca, cert_path, key_path)."""
    import trustme
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_path, key_path = os.path.join(directory, f"{name}.pem"), os.path.join(directory, f"{name}-key.pem")
    cert.cert_chain_pems[0].write_to_path(cert_path)
    cert.private_key_pem.write_to_path(key_path)
    return ca, cert_path, key_path


class WsClient(RawClient):
    """A RawClient whose bytes travel in binary WebSocket frames (a serverless listener), as the
    Neon driver sends them: `frame_size` splits what it sends into frames of that many bytes."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10, target: str = "/v2",
                 frame_size: int = 0, sock=None):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request
        self.sock = sock or socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.frame_size = frame_size
        self.events: list = []  # events other than data, as they came (CloseConnection, Pong ...)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target=target)))
        while not any(isinstance(e, AcceptConnection) for e in self.events):
            self._pump()

    def _pump(self) -> None:
        from wsproto.events import BytesMessage, Ping
        chunk = self.sock.recv(65536)
        self.ws.receive_data(chunk or None)
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.buf += event.data
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            else:
                self.events.append(event)
        if not chunk:
            raise EOFError(f"connection closed with {len(self.buf)} bytes buffered")

    def send(self, data: bytes) -> None:
        from wsproto.events import BytesMessage
        size = self.frame_size or len(data) or 1
        for i in range(0, len(data), size):
            self.sock.sendall(self.ws.send(BytesMessage(data=data[i:i + size])))

    def recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._pump()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def closed(self, timeout: float = 10) -> bool:
        """True once pgrelay closed the connection. This client does not answer a close frame, so
        pgrelay waits its CLOSE_GRACE (5 s, pgrelay.serverless.websocket) first: the default wait is
        longer than that (5 s exactly lost the race under load)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self._pump()
        except (EOFError, ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def error_fields(body: bytes) -> dict[str, str]:
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def data_rows(msgs, encoding: str = "utf-8") -> list[list[str | None]]:
    """The values of every DataRow in `msgs` (from RawClient.query), as text; NULL is None."""
    rows = []
    for kind, body in msgs:
        if kind == b"D":
            count = struct.unpack("!H", body[:2])[0]
            pos, values = 2, []
            for _ in range(count):
                size = struct.unpack("!i", body[pos:pos + 4])[0]
                pos += 4
                if size < 0:
                    values.append(None)
                else:
                    values.append(body[pos:pos + size].decode(encoding))
                    pos += size
            rows.append(values)
    return rows


def stop_relays(started) -> None:
    """Fixture teardown: stop the relays a test started and fail it if any logged an internal error."""
    import pytest
    problems = []
    for relay in started:
        if relay.alive():
            relay.stop()
        bugs = relay.bugs()
        if bugs:
            problems.append(f"{relay.name}: " + "\n".join(bugs[:10]))
    if problems:
        pytest.fail("pgrelay logged internal errors:\n" + "\n".join(problems), pytrace=False)
