"""Each implemented setting has an observable effect: these tests fail if pgrelay ignores the setting.

Issue 7, item 3. tests/test_settings_coverage.py maps every implemented setting to the tests that prove
it is enforced (here or elsewhere). Each test below sets a non-default value and asserts what a client,
PostgreSQL (pg_stat_activity, pg_stat_ssl), the filesystem, the kernel (ss) or pgrelay's log shows;
with the default value the assertion would not hold. Where a test also needs a control (the same
probe with the setting off), it runs it, so the probe is known to be able to see the difference.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import threading
import time
from types import SimpleNamespace

import psycopg
import psycopg2
import pytest
import trustme

from pgrelay.tempdb import TempPostgres, free_port

from ..support import RawClient, connect, data_rows, query_message, row, startup_packet, wait_until

CANCEL_REQUEST_CODE = 80877102


# -- helpers ------------------------------------------------------------------------------------------

def ensure_role(pg, name: str, password: str | None = None) -> None:
    pw = f" PASSWORD '{password}'" if password else ""
    pg.psql(f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') "
            f"THEN CREATE ROLE {name} LOGIN{pw}; END IF; END$$")


def ensure_database(pg, name: str) -> None:
    if pg.psql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0":
        pg.psql(f"CREATE DATABASE {name}")


def backends(pg, user: str) -> list[int]:
    """Backend pids of client connections logged in as `user` (pgrelay's servers, in these tests)."""
    out = pg.psql(f"SELECT pid FROM pg_stat_activity WHERE usename = '{user}' ORDER BY pid")
    return [int(p) for p in out.split()]


def data_rows_latin1(msgs):
    return data_rows(msgs, "latin-1")


def run_query(relay, sql: str = "SELECT 1", **kw):
    conn = connect(relay, **kw)
    try:
        return row(conn, sql)
    finally:
        conn.close()


def holding(relay, **kw):
    """A client inside a transaction: in transaction pooling it holds its server until commit."""
    conn = connect(relay, **kw)
    conn.autocommit = False
    row(conn, "SELECT 1")
    return conn


class Background:
    """Connect and run one query in a thread (so a test can see it wait for a server)."""

    def __init__(self, relay, sql: str = "SELECT 1", **kw):
        self.row = None
        self.exc: BaseException | None = None
        self.done_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(relay, sql, kw), daemon=True)
        self.thread.start()

    def _run(self, relay, sql, kw):
        try:
            conn = connect(relay, **kw)
            try:
                self.row = row(conn, sql)
            finally:
                conn.close()
        except BaseException as exc:  # asserted on by the test
            self.exc = exc
        self.done_at = time.monotonic()

    def waiting(self, seconds: float = 0.8) -> bool:
        self.thread.join(seconds)
        return self.thread.is_alive()

    def finish(self, timeout: float = 10):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"query still waiting after {timeout}s"
        assert self.exc is None, self.exc
        return self.row


def assert_third_client_waits(relay, holders: list[dict], waiter: dict) -> None:
    """Clients described by `holders` each hold a server; the `waiter` client must queue until one
    of them commits, then be served."""
    held = [holding(relay, **kw) for kw in holders]
    try:
        late = Background(relay, **waiter)
        assert late.waiting(0.8), "the client got a server past the limit"
        held[0].commit()
        assert late.finish() == (1,)
    finally:
        for conn in held:
            conn.close()


def parameter_status(msgs) -> dict[str, str]:
    out = {}
    for kind, body in msgs:
        if kind == b"S":
            name, value = body.split(b"\0")[:2]
            out[name.decode()] = value.decode()
    return out


def wait_for_query(pg, pid: int, query: str, timeout: float = 5) -> None:
    wait_until(lambda: pg.psql(f"SELECT query FROM pg_stat_activity WHERE pid = {pid}") == query,
               timeout=timeout, message=f"backend {pid} to run {query!r}")


def reconfigure(relay, **settings) -> None:
    relay.settings.update({k: str(v) for k, v in settings.items()})
    relay.write_ini()
    relay.reload()


def ss_backlog(args: list[str]) -> int:
    """The backlog the kernel holds for a listening socket: ss shows it as Send-Q of LISTEN sockets."""
    out = subprocess.run(["ss", "-lH"] + args, capture_output=True, text=True, timeout=10, check=True).stdout
    lines = [line.split() for line in out.splitlines() if "LISTEN" in line.split()]
    assert len(lines) == 1, out
    parts = lines[0]
    return int(parts[parts.index("LISTEN") + 2])


# == process, logging and listening ===================================================================

def test_log_stats_off_silences_stats_lines(make_relay):
    relay = make_relay({"stats_period": "1", "log_stats": "0"})
    deadline = time.monotonic() + 2.5  # two stats periods or more
    while time.monotonic() < deadline:
        run_query(relay)
        time.sleep(0.1)
    assert " stats: " not in relay.log()
    # Control: the same traffic with log_stats on gives stats lines.
    reconfigure(relay, log_stats=1)
    wait_until(lambda: run_query(relay) and " LOG stats: " in relay.log(), timeout=5, interval=0.2,
               message="a stats line once log_stats is on")


def test_log_pooler_errors_off_keeps_refusals_out_of_the_log(make_relay):
    def refused_client():
        raw = RawClient(relay.port)
        raw.send(startup_packet(replication="true"))  # pgrelay's own refusal (other parameters go to PostgreSQL)
        assert raw.read_error()["M"] == "unsupported startup parameter: replication"
        raw.close()

    relay = make_relay({"log_pooler_errors": "0"})
    refused_client()
    wait_until(lambda: "closing because: unsupported startup parameter" in relay.log(), message="the close")
    assert "pooler error" not in relay.log()
    # Control: with log_pooler_errors on, the same refusal is logged.
    reconfigure(relay, log_pooler_errors=1)
    refused_client()
    wait_until(lambda: "pooler error: unsupported startup parameter: replication" in relay.log(),
               message="the pooler error line")


def test_verbose_logs_debug_lines(make_relay, pg):
    relay = make_relay({"verbose": "0"})
    run_query(relay)
    assert "DEBUG" not in relay.log()
    reconfigure(relay, verbose=1)
    run_query(relay, dbname="template1")  # a new pool, so a new server connection
    wait_until(lambda: "DEBUG" in relay.log(), message="a DEBUG line")
    line = next(line for line in relay.log().splitlines() if " DEBUG " in line)
    assert f"template1/postgres@127.0.0.1:{pg.port} launching new connection to server" in line, line


def test_listen_addr_and_listener_addr(make_relay):
    side = free_port()
    relay = make_relay({"listen_addr": "127.0.0.2"},
                       extra_sections=f"[listeners]\nside = port={side} addr=127.0.0.3\n")
    for host, port in (("127.0.0.2", relay.port), ("127.0.0.3", side)):
        raw = RawClient(port, host=host)
        raw.login()
        assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
        raw.close()
    for host, port in (("127.0.0.1", relay.port), ("127.0.0.2", side), ("127.0.0.1", side)):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, port), timeout=3).close()


def test_listen_backlog_reaches_listen(make_relay):
    # getsockopt() cannot read a listen backlog back; the kernel reports it to ss as Send-Q.
    relay = make_relay({"listen_backlog": "37"})
    assert ss_backlog(["-tn", f"sport = :{relay.port}"]) == 37
    assert ss_backlog(["-x", "src", os.path.join(relay.workdir, f".s.PGSQL.{relay.port}")]) == 37


def test_unix_socket_dir(make_relay, tmp_path):
    sockdir = tmp_path / "sockets"
    sockdir.mkdir()
    relay = make_relay({"unix_socket_dir": str(sockdir)})
    path = sockdir / f".s.PGSQL.{relay.port}"
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not os.path.exists(f"/tmp/.s.PGSQL.{relay.port}")
    conn = psycopg2.connect(host=str(sockdir), port=relay.port, user="postgres", dbname="postgres", connect_timeout=5)
    try:
        assert row(conn, "SELECT 1") == (1,)
    finally:
        conn.close()
    # Empty: no Unix socket at all.
    quiet = make_relay({"unix_socket_dir": ""})
    assert "listening on unix:" not in quiet.log()
    assert not os.path.exists(f"/tmp/.s.PGSQL.{quiet.port}")
    assert not os.path.exists(os.path.join(quiet.workdir, f".s.PGSQL.{quiet.port}"))


def test_unix_socket_mode(make_relay):
    relay = make_relay({"unix_socket_mode": "0640"})
    path = os.path.join(relay.workdir, f".s.PGSQL.{relay.port}")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    conn = psycopg2.connect(host=relay.workdir, port=relay.port, user="postgres", dbname="postgres", connect_timeout=5)
    conn.close()


# == client limits and timeouts ==========================================================================

def test_client_login_timeout(make_relay):
    relay = make_relay({"client_login_timeout": "1"})
    raw = RawClient(relay.port, timeout=5)
    # Half a startup packet header, then silence (bytes, so tcp_defer_accept hands the socket over).
    raw.send(startup_packet()[:4])
    started = time.monotonic()
    fields = raw.read_error()
    elapsed = time.monotonic() - started
    assert (fields["S"], fields["M"]) == ("FATAL", "client_login_timeout"), fields
    assert 0.8 <= elapsed < 3, elapsed
    assert raw.closed()
    raw.close()


def test_query_wait_timeout(make_relay):
    relay = make_relay({"default_pool_size": "1", "query_wait_timeout": "1"})
    holder = holding(relay)
    try:
        raw = RawClient(relay.port, timeout=5)
        raw.login()
        raw.send(query_message("SELECT 1"))
        started = time.monotonic()
        fields = raw.read_error()
        elapsed = time.monotonic() - started
        assert (fields["S"], fields["M"]) == ("FATAL", "query_wait_timeout"), fields
        assert 0.8 <= elapsed < 3, elapsed
        assert raw.closed()
        raw.close()
    finally:
        holder.close()


def test_max_packet_size(make_relay):
    relay = make_relay({"max_packet_size": "1000"})
    raw = RawClient(relay.port)
    raw.login()
    small = "SELECT '" + "a" * 900 + "'"
    assert data_rows_latin1(raw.query(small)) == [["a" * 900]]
    big = query_message("SELECT '" + "b" * 2000 + "'")
    raw.send(big)
    fields = raw.read_error()
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
    assert fields["M"] == f"bad packet header: message 'Q' with length {len(big) - 1}", fields
    assert raw.closed()
    raw.close()


# == server connections ===================================================================================

def test_min_pool_size(make_relay, pg):
    ensure_role(pg, "se_min")
    relay = make_relay({"min_pool_size": "3", "default_pool_size": "5"})
    assert run_query(relay, user="se_min") == (1,)
    wait_until(lambda: len(backends(pg, "se_min")) == 3, timeout=5, message="three servers for the pool")
    time.sleep(0.7)  # and no more
    assert len(backends(pg, "se_min")) == 3


def test_server_idle_timeout(make_relay, pg):
    ensure_role(pg, "se_idle")
    relay = make_relay({"server_idle_timeout": "1"})
    conn = connect(relay, user="se_idle")
    try:
        pid = row(conn, "SELECT pg_backend_pid()")[0]
        assert backends(pg, "se_idle") == [pid]
        released = time.monotonic()
        wait_until(lambda: backends(pg, "se_idle") == [], timeout=5, message="the idle server to be closed")
        assert time.monotonic() - released >= 0.7
        assert "server idle timeout" in relay.log()
        assert row(conn, "SELECT 1") == (1,)  # the client stays and gets a new server
    finally:
        conn.close()


def test_server_lifetime(make_relay, pg):
    ensure_role(pg, "se_life")
    relay = make_relay({"server_lifetime": "1", "default_pool_size": "1"})
    conn = connect(relay, user="se_life")
    try:
        pids = []
        deadline = time.monotonic() + 2.8
        while time.monotonic() < deadline:  # never idle for long: server_idle_timeout plays no part
            pids.append(row(conn, "SELECT pg_backend_pid()")[0])
            time.sleep(0.05)
    finally:
        conn.close()
    assert len(set(pids)) >= 2, "the server outlived server_lifetime"
    assert pids[0] not in backends(pg, "se_life")
    assert "server lifetime over" in relay.log()


def test_server_reset_query(make_relay, pg):
    ensure_role(pg, "se_reset")
    custom = "SELECT 'pgrelay-custom-reset'"
    relay = make_relay({"pool_mode": "session", "default_pool_size": "1", "server_reset_query": custom})
    conn = connect(relay, user="se_reset")
    pid = row(conn, "SELECT pg_backend_pid()")[0]
    conn.close()
    wait_for_query(pg, pid, custom)
    # Empty disables it: session state survives into the next client of the same server.
    ensure_role(pg, "se_noreset")
    bare = make_relay({"pool_mode": "session", "default_pool_size": "1", "server_reset_query": ""})
    conn = connect(bare, user="se_noreset")
    pid = row(conn, "SELECT pg_backend_pid()")[0]
    row(conn, "SELECT set_config('myapp.leak', 'kept', false)")
    conn.close()
    conn = connect(bare, user="se_noreset")
    try:
        assert row(conn, "SELECT pg_backend_pid(), current_setting('myapp.leak', true)") == (pid, "kept")
    finally:
        conn.close()


def test_server_login_retry(make_relay, pg):
    pg.psql("DROP DATABASE IF EXISTS se_late_db")
    relay = make_relay({"server_login_retry": "1"},
                       databases={"late": f"host=127.0.0.1 port={pg.port} dbname=se_late_db",
                                  "*": f"host=127.0.0.1 port={pg.port}"})
    try:
        with pytest.raises(psycopg2.OperationalError, match='database "se_late_db" does not exist'):
            connect(relay, dbname="late")
        failed = time.monotonic()
        pg.psql("CREATE DATABASE se_late_db")
        # Within server_login_retry the cached error is answered without asking the server ...
        with pytest.raises(psycopg2.OperationalError, match="server login has been failing, cached error"):
            connect(relay, dbname="late")
        # ... and once it has passed, a new login is tried and succeeds.
        def served():
            try:
                return run_query(relay, "SELECT current_database()", dbname="late")
            except psycopg2.OperationalError as exc:
                assert "cached error" in str(exc)
                return None
        assert wait_until(served, timeout=5, interval=0.1, message="a login retry") == ("se_late_db",)
        assert time.monotonic() - failed < 3
    finally:
        relay.stop()
        pg.psql("DROP DATABASE IF EXISTS se_late_db WITH (FORCE)")


class CancelSwallowingProxy:
    """Forwards TCP connections to PostgreSQL, except cancel requests: those it accepts and then
    neither answers nor closes, like a server that does not get round to them."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.sockets: list[socket.socket] = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def _accept_loop(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        self.sockets.append(conn)
        head = b""
        while len(head) < 8:
            chunk = conn.recv(8 - len(head))
            if not chunk:
                conn.close()
                return
            head += chunk
        if struct.unpack("!II", head)[1] == CANCEL_REQUEST_CODE:
            self.held.append(conn)
            return
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.sockets.append(up)
        up.sendall(head)
        threading.Thread(target=self._pump, args=(up, conn), daemon=True).start()
        self._pump(conn, up)

    @staticmethod
    def _pump(src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stopped.set()
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_cancel_wait_timeout(make_relay, pg):
    """A server whose cancel request hangs is handed to the next client once cancel_wait_timeout ends
    the attempt (PgBouncer keeps such a server out of use until its cancels are done)."""
    proxy = CancelSwallowingProxy(pg.port)
    try:
        relay = make_relay({"cancel_wait_timeout": "1", "default_pool_size": "1"},
                           databases={"*": f"host=127.0.0.1 port={proxy.port}"})
        conn = connect(relay, application_name="se_cancel")
        slow = threading.Thread(target=lambda: row(conn, "SELECT pg_sleep(0.6)"), daemon=True)
        slow.start()
        wait_until(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                                   "AND application_name = 'se_cancel'") == "1", message="the slow query")
        sent = time.monotonic()
        # In a thread: pgrelay may hold the cancel connection open until its own attempt is over.
        threading.Thread(target=conn.cancel, daemon=True).start()
        wait_until(lambda: len(proxy.held) == 1, message="the cancel request to reach the proxy")
        slow.join(5)
        assert not slow.is_alive()  # it ran to its end: the proxy swallowed the cancel
        next_client = Background(relay, "SELECT 'served'")
        assert next_client.finish(8) == ("served",)
        assert 0.8 <= next_client.done_at - sent < 3.5, next_client.done_at - sent
        assert "cancel request failed" in relay.log()
        conn.close()
    finally:
        proxy.close()


# == startup parameters ===================================================================================

def test_track_extra_parameters_adds_a_parameter(make_relay):
    relay = make_relay({"track_extra_parameters": "IntervalStyle, search_path", "default_pool_size": "1"})
    a = psycopg.connect(relay.dsn(options="-c search_path=se_alpha"), autocommit=True)
    b = psycopg.connect(relay.dsn(options="-c search_path=se_beta"), autocommit=True)
    try:
        pids = set()
        for _ in range(3):
            for conn, expected in ((a, "se_alpha"), (b, "se_beta")):
                shown, pid = conn.execute("SELECT current_setting('search_path'), pg_backend_pid()").fetchone()
                assert shown == expected
                pids.add(pid)
        assert len(pids) == 1  # one shared server, re-set for each client
    finally:
        a.close()
        b.close()


# == authentication ===========================================================================================

def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    body = mechanism.encode() + b"\0" + struct.pack("!I", len(data)) + data
    return b"p" + struct.pack("!I", len(body) + 4) + body


def test_scram_iterations(make_relay, pg, tmp_path):
    ensure_role(pg, "se_scram")
    users = tmp_path / "users.txt"
    users.write_text('"se_scram" "se-scram-pw"\n')
    relay = make_relay({"auth_type": "scram-sha-256", "auth_file": str(users), "scram_iterations": "1234"})
    raw = RawClient(relay.port)
    raw.send(startup_packet(user="se_scram"))
    kind, body = raw.read_message()
    assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 10, (kind, body)
    raw.send(sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=se-client-nonce"))
    kind, body = raw.read_message()
    assert kind == b"R" and struct.unpack("!I", body[:4])[0] == 11, (kind, body)
    server_first = dict(part.split("=", 1) for part in body[4:].decode().split(","))
    assert server_first["i"] == "1234", server_first
    raw.close()
    # A real client computes its proof with that count, and gets in.
    with psycopg.connect(relay.dsn(user="se_scram", password="se-scram-pw"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("se_scram",)


def test_auth_query_is_the_query_that_runs(make_relay, pg):
    """A custom auth_query that makes up the secret: only that made-up password works."""
    ensure_role(pg, "se_aq")  # no password in pg_authid: the default auth_query would find none
    relay = make_relay({"auth_type": "scram-sha-256", "auth_user": "postgres",
                        "auth_query": "SELECT $1::text, 'alt-pw-' || $1::text"})
    with psycopg.connect(relay.dsn(user="se_aq", password="alt-pw-se_aq"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("se_aq",)
    with pytest.raises(psycopg.OperationalError, match='password authentication failed for user "se_aq"'):
        psycopg.connect(relay.dsn(user="se_aq", password="alt-pw-wrong")).close()


# == server health ===========================================================================================

def health_watched_db(pg) -> str:
    """A database line whose host has a replica (the same server): host selection health-checks it."""
    return f"host=127.0.0.1 port={pg.port} dbname=postgres replicas=127.0.0.1:{pg.port}"


def test_health_check_user_and_dbname(make_relay, pg):
    ensure_role(pg, "se_hc")
    ensure_database(pg, "se_hc_db")
    relay = make_relay({"health_check_user": "se_hc", "health_check_dbname": "se_hc_db"},
                       databases={"*": health_watched_db(pg)})
    assert run_query(relay) == (1,)
    assert pg.psql("SELECT usename || '@' || datname FROM pg_stat_activity WHERE usename = 'se_hc'") \
        == "se_hc@se_hc_db"


def test_health_check_period(make_relay, pg):
    ensure_role(pg, "se_hcp")
    relay = make_relay({"health_check_user": "se_hcp", "health_check_period": "0.2"},
                       databases={"*": health_watched_db(pg)})
    assert run_query(relay) == (1,)
    starts = set()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        starts.add(pg.psql("SELECT query_start FROM pg_stat_activity WHERE usename = 'se_hcp'"))
        time.sleep(0.05)
    starts.discard("")
    assert len(starts) >= 4, f"{len(starts)} health checks seen in 2 s"  # the default period would give 1 or 2


def test_health_check_timeout(make_relay, pg):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections complete in the backlog; nobody answers them
    try:
        relay = make_relay({"health_check_timeout": "0.5"}, databases={
            "*": f"host=127.0.0.1 port={silent.getsockname()[1]} dbname=postgres replicas=127.0.0.1:{pg.port}"})
        raw = RawClient(relay.port, timeout=15)
        started = time.monotonic()
        raw.send(startup_packet())
        fields = raw.read_error()
        elapsed = time.monotonic() - started
        raw.close()
    finally:
        silent.close()
    assert fields["M"] == "no primary found for postgres/postgres", fields
    # Two checks (the first choice, then one fresh look at all hosts), 0.5 s each; the default is 3 s each.
    assert 0.8 <= elapsed < 3, elapsed


def test_max_replica_lag(make_relay, replicated):
    primary, standby = replicated.primary, replicated.standby
    direct = {}

    def start(max_lag):
        port = free_port()
        relay = make_relay({"health_check_period": "0.2", "max_replica_lag": max_lag},
                           databases={"postgres": f"host=127.0.0.1 port={primary.port} "
                                                  f"replicas=127.0.0.1:{standby.port}"},
                           extra_sections=f"[listeners]\ndirect = port={port} role=direct\n")
        direct[relay] = port
        return relay

    def on_replica(relay):
        """True if a |replica client ran on the standby, else the refusal."""
        try:
            conn = psycopg2.connect(relay.dsn(user="postgres|replica", port=direct[relay]), connect_timeout=5)
        except psycopg2.OperationalError as exc:
            return str(exc)
        try:
            return row(conn, "SELECT pg_is_in_recovery()")[0]
        finally:
            conn.close()

    primary.psql("CREATE TABLE IF NOT EXISTS se_lag (x int)")
    strict, loose = start("1"), start("60")
    primary.psql("INSERT INTO se_lag VALUES (1)")
    replicated.wait_caught_up()  # the last replayed commit is from just now: the lag starts at 0
    assert on_replica(strict) is True and on_replica(loose) is True
    standby.psql("SELECT pg_wal_replay_pause()")
    try:
        primary.psql("INSERT INTO se_lag VALUES (2)")  # received, not replayed: the lag grows
        refusal = wait_until(lambda: (lambda a: a if isinstance(a, str) else None)(on_replica(strict)),
                             timeout=4, interval=0.2, message="the replica to leave max_replica_lag=1's rotation")
        assert "no healthy replica available for direct:postgres/postgres|replica" in refusal
        assert on_replica(loose) is True  # a few seconds of lag are within max_replica_lag=60
    finally:
        standby.psql("SELECT pg_wal_replay_resume()")
    replicated.wait_caught_up()


# == TLS ==============================================================================================================

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("se-pki")
    ca = trustme.CA()
    files = {}

    def write(name, blob, mode=0o644):
        path = str(d / name)
        blob.write_to_path(path)
        os.chmod(path, mode)
        files[name.replace(".", "_")] = path

    write("ca.pem", ca.cert_pem)
    for name, cert in (("server", ca.issue_cert("127.0.0.1", "localhost")),
                       ("certuser", ca.issue_cert("client.test", common_name="se_certuser"))):
        write(f"{name}.crt", cert.cert_chain_pems[0])
        write(f"{name}.key", cert.private_key_pem, 0o600)
    return SimpleNamespace(**files)


TLS_PG_HBA = """\
local    all  all          trust
hostssl  all  se_certuser  127.0.0.1/32  cert
host     all  se_pwuser    127.0.0.1/32  scram-sha-256
hostssl  all  all          127.0.0.1/32  trust
host     all  all          127.0.0.1/32  reject
"""
PW = "se-pw-secret"


@pytest.fixture(scope="module")
def tls_pg(pki):
    """PostgreSQL with TLS: client certificates for se_certuser, a password for se_pwuser, TLS for all."""
    server = TempPostgres(settings={"max_connections": "60"}, name="setlspg")
    try:
        names = {}
        for src, dst in ((pki.server_crt, "server.crt"), (pki.server_key, "server.key"), (pki.ca_pem, "ca.pem")):
            names[dst] = os.path.join(server.base, dst)
            shutil.copy(src, names[dst])
            os.chmod(names[dst], 0o600 if dst.endswith(".key") else 0o644)
            if server.owner:
                os.chown(names[dst], *server.owner)
        server.settings.update({"ssl": "on", "ssl_cert_file": f"'{names['server.crt']}'",
                                "ssl_key_file": f"'{names['server.key']}'", "ssl_ca_file": f"'{names['ca.pem']}'"})
        server.initdb()
        with open(os.path.join(server.datadir, "pg_hba.conf"), "w") as f:
            f.write(TLS_PG_HBA)
        server.start()
        server.psql(f"CREATE ROLE se_certuser LOGIN; CREATE ROLE se_pwuser LOGIN PASSWORD '{PW}'")
        yield server
    finally:
        server.cleanup()


def pg_ssl(tls_pg, conn) -> str:
    """version|cipher|client_dn of the server connection this client's query ran on."""
    pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    return tls_pg.psql(f"SELECT version || '|' || cipher || '|' || coalesce(client_dn, '') "
                       f"FROM pg_stat_ssl WHERE pid = {pid}")


def tls_client(port: int, ctx: ssl.SSLContext) -> RawClient:
    raw = RawClient(port)
    raw.send(struct.pack("!II", 8, 80877103))
    assert raw.recv_exact(1) == b"S"
    raw.sock = ctx.wrap_socket(raw.sock, server_hostname="127.0.0.1")
    return raw


def tls12_context(pki, ciphers: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(pki.ca_pem)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(ciphers)
    return ctx


CHOSEN = "ECDHE-ECDSA-AES128-GCM-SHA256"
OTHER = "ECDHE-ECDSA-AES256-GCM-SHA384"


def test_client_tls_ciphers(make_relay, pki):
    relay = make_relay({"client_tls_sslmode": "prefer", "client_tls_cert_file": pki.server_crt,
                        "client_tls_key_file": pki.server_key, "client_tls_ciphers": CHOSEN})
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|handshake failure|NO_SHARED_CIPHER"):
        tls_client(relay.port, tls12_context(pki, OTHER))
    raw = tls_client(relay.port, tls12_context(pki, CHOSEN))
    assert (raw.sock.version(), raw.sock.cipher()[0]) == ("TLSv1.2", CHOSEN)
    raw.login()
    assert raw.query("SELECT 1")[-1] == (b"Z", b"I")
    raw.close()


def test_server_tls_cert_and_key_file(make_relay, tls_pg, pki):
    db = {"*": f"host=127.0.0.1 port={tls_pg.port}"}
    relay = make_relay({"server_tls_sslmode": "require", "server_tls_cert_file": pki.certuser_crt,
                        "server_tls_key_file": pki.certuser_key}, databases=db)
    with psycopg.connect(relay.dsn(user="se_certuser"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("se_certuser",)
        assert "/CN=se_certu" in pg_ssl(tls_pg, conn).split("|")[2]  # client_dn, cut at NAMEDATALEN
    # Control: without a client certificate PostgreSQL refuses the same login.
    plain = make_relay({"server_tls_sslmode": "require", "server_login_retry": "0"}, databases=db)
    with pytest.raises(psycopg.OperationalError, match="connection requires a valid client certificate"):
        psycopg.connect(plain.dsn(user="se_certuser")).close()


def test_server_tls_protocols(make_relay, tls_pg):
    relay = make_relay({"server_tls_sslmode": "require", "server_tls_protocols": "tlsv1.2"},
                       databases={"*": f"host=127.0.0.1 port={tls_pg.port}"})
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        assert pg_ssl(tls_pg, conn).startswith("TLSv1.2|")
    # Control: the default protocols give TLS 1.3 with the same server.
    default = make_relay({"server_tls_sslmode": "require"}, databases={"*": f"host=127.0.0.1 port={tls_pg.port}"})
    with psycopg.connect(default.dsn(), autocommit=True) as conn:
        assert pg_ssl(tls_pg, conn).startswith("TLSv1.3|")


def test_server_tls_ciphers(make_relay, tls_pg):
    db = {"*": f"host=127.0.0.1 port={tls_pg.port}"}
    tls12 = {"server_tls_sslmode": "require", "server_tls_protocols": "tlsv1.2"}
    relay = make_relay(dict(tls12, server_tls_ciphers=CHOSEN), databases=db)
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        assert pg_ssl(tls_pg, conn).split("|")[:2] == ["TLSv1.2", CHOSEN]
    # Control: with the default cipher list PostgreSQL picks another cipher.
    default = make_relay(tls12, databases=db)
    with psycopg.connect(default.dsn(), autocommit=True) as conn:
        assert pg_ssl(tls_pg, conn).split("|")[1] != CHOSEN


def test_database_and_cluster_password(make_relay, tls_pg):
    relay = make_relay({"cluster_usernames": "1"},
                       databases={"pwdb": f"host=127.0.0.1 port={tls_pg.port} dbname=postgres user=se_pwuser "
                                          f"password={PW}"},
                       extra_sections=f"[clusters]\npwc = host=127.0.0.1 port={tls_pg.port} password={PW}\n")
    with psycopg.connect(relay.dsn(dbname="pwdb"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("se_pwuser",)
    with psycopg.connect(relay.dsn(user="se_pwuser.pwc"), autocommit=True) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == ("se_pwuser", "postgres")


# == [databases] and [users] keys ===========================================================================

def test_database_host_port_dbname_user(make_relay, pg):
    ensure_role(pg, "se_forced")
    ensure_database(pg, "se_realdb")
    relay = make_relay(databases={"aliased": f"host={pg.socket_dir} port={pg.port} dbname=se_realdb user=se_forced"})
    conn = connect(relay, dbname="aliased")
    try:
        # A Unix socket directory as host: PostgreSQL sees no client address.
        assert row(conn, "SELECT current_database(), current_user, inet_client_addr() IS NULL") == \
            ("se_realdb", "se_forced", True)
    finally:
        conn.close()


def test_database_pool_size(make_relay, pg):
    relay = make_relay({"default_pool_size": "10"},
                       databases={"small": f"host=127.0.0.1 port={pg.port} dbname=postgres pool_size=1"})
    assert_third_client_waits(relay, [{"dbname": "small"}], {"dbname": "small"})


def test_users_pool_size(make_relay, pg):
    ensure_role(pg, "se_upool")
    relay = make_relay({"default_pool_size": "10"}, users={"se_upool": "pool_size=1"})
    assert_third_client_waits(relay, [{"user": "se_upool"}], {"user": "se_upool"})


def test_database_min_pool_size(make_relay, pg):
    ensure_role(pg, "se_dbmin")
    relay = make_relay(databases={"mindb": f"host=127.0.0.1 port={pg.port} dbname=postgres min_pool_size=3"})
    assert run_query(relay, user="se_dbmin", dbname="mindb") == (1,)
    wait_until(lambda: len(backends(pg, "se_dbmin")) == 3, timeout=5, message="three servers for the pool")


def test_database_connect_query(make_relay, pg):
    pg.psql("CREATE TABLE IF NOT EXISTS se_connect_log (pid int, db text)")
    relay = make_relay(databases={"cq": f"host=127.0.0.1 port={pg.port} dbname=postgres "
                                        "connect_query='INSERT INTO se_connect_log SELECT pg_backend_pid(), ''cq'''"})
    pid = run_query(relay, "SELECT pg_backend_pid()", dbname="cq")[0]
    assert pg.psql(f"SELECT db FROM se_connect_log WHERE pid = {pid}") == "cq"


STARTUP_KEYS = "client_encoding=LATIN1 datestyle='SQL, DMY' timezone=Asia/Tokyo application_name=se-srvapp"
STARTUP_SQL = ("SELECT current_setting('client_encoding'), current_setting('DateStyle'), "
               "current_setting('TimeZone'), current_setting('application_name'), pg_backend_pid()::text")
STARTUP_VALUES = ["LATIN1", "SQL, DMY", "Asia/Tokyo", "se-srvapp"]


def assert_server_startup_parameters(relay, pg, **login) -> None:
    """A client that asks for nothing gets the line's values, and so does its server."""
    raw = RawClient(relay.port)
    welcome = parameter_status(raw.login(**login))
    assert [welcome[k] for k in ("client_encoding", "DateStyle", "TimeZone", "application_name")] == STARTUP_VALUES
    values = data_rows_latin1(raw.query(STARTUP_SQL))[0]
    raw.close()
    assert values[:4] == STARTUP_VALUES
    assert pg.psql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {values[4]}") == "se-srvapp"


def test_database_startup_parameters(make_relay, pg):
    relay = make_relay(databases={"sp": f"host=127.0.0.1 port={pg.port} dbname=postgres {STARTUP_KEYS}"})
    assert_server_startup_parameters(relay, pg, database="sp")


# == [clusters] keys ===============================================================================================

def test_cluster_keys(make_relay, pg):
    """The [databases] keys on [clusters] lines (host, port, user and replicas: test_clusters.py)."""
    ensure_role(pg, "se_clmin")
    pg.psql("CREATE TABLE IF NOT EXISTS se_connect_log (pid int, db text)")
    target = f"host=127.0.0.1 port={pg.port}"
    clusters = "\n".join([
        "[clusters]",
        f"cmode = {target} pool_mode=session",
        f"csize = {target} pool_size=1",
        f"cmin = {target} user=se_clmin min_pool_size=3",
        f"ccq = {target} connect_query='INSERT INTO se_connect_log SELECT pg_backend_pid(), ''ccq'''",
        f"cparams = {target} {STARTUP_KEYS}",
    ]) + "\n"
    relay = make_relay({"cluster_usernames": "1", "default_pool_size": "10"}, extra_sections=clusters)
    # pool_mode=session (the global mode is transaction): the server is reset when its client leaves.
    conn = connect(relay, user="postgres.cmode")
    pid = row(conn, "SELECT pg_backend_pid()")[0]
    conn.close()
    wait_for_query(pg, pid, "DISCARD ALL")
    # pool_size=1
    assert_third_client_waits(relay, [{"user": "postgres.csize"}], {"user": "postgres.csize"})
    # min_pool_size=3
    assert run_query(relay, user="postgres.cmin") == (1,)
    wait_until(lambda: len(backends(pg, "se_clmin")) == 3, timeout=5, message="three servers for the cluster pool")
    # connect_query
    pid = run_query(relay, "SELECT pg_backend_pid()", user="postgres.ccq")[0]
    assert pg.psql(f"SELECT db FROM se_connect_log WHERE pid = {pid}") == "ccq"
    # client_encoding, datestyle, timezone, application_name
    assert_server_startup_parameters(relay, pg, user="postgres.cparams")


# == [poolers] keys ================================================================================================

def test_pooler_min_pool_size(make_relay, pg):
    ensure_role(pg, "se_pmin")
    relay = make_relay(extra_sections="[poolers]\npmin = target=primary min_pool_size=3 default_pool_size=5\n")
    assert run_query(relay, user="se_pmin|pmin") == (1,)
    wait_until(lambda: len(backends(pg, "se_pmin")) == 3, timeout=5, message="three servers for the pooler pool")


def test_pooler_max_db_connections(make_relay, pg):
    for role in ("se_pdb1", "se_pdb2", "se_pdb3"):
        ensure_role(pg, role)
    relay = make_relay(extra_sections="[poolers]\npdb = default_pool_size=5 max_db_connections=2\n")
    # Three users, one database: the third user's client waits although its own pool is empty.
    assert_third_client_waits(relay, [{"user": "se_pdb1|pdb"}, {"user": "se_pdb2|pdb"}], {"user": "se_pdb3|pdb"})


def test_pooler_max_user_connections(make_relay, pg):
    dbs = {name: f"host=127.0.0.1 port={pg.port} dbname=postgres" for name in ("se_d1", "se_d2", "se_d3")}
    relay = make_relay(databases=dbs, extra_sections="[poolers]\npusr = default_pool_size=5 max_user_connections=2\n")
    # One user, three databases: the client of the third database waits.
    assert_third_client_waits(relay, [{"user": "postgres|pusr", "dbname": "se_d1"},
                                      {"user": "postgres|pusr", "dbname": "se_d2"}],
                              {"user": "postgres|pusr", "dbname": "se_d3"})
