"""tcp_keepalive, tcp_keepidle, tcp_keepintvl, tcp_keepcnt, tcp_user_timeout, tcp_socket_buffer and
login_notify_message, against a real pgrelay process and a real PostgreSQL (issue 8, item 2).

The options are read back from the very sockets pgrelay uses: pidfd_getfd(2) copies a descriptor of
the pgrelay process (our child) into the test, and getsockopt() on the copy reads the socket's own
options. The client socket is found by its port (our end's local port is pgrelay's remote port), the
server socket by the port PostgreSQL reports for it in pg_stat_activity.client_port.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys

import psutil
import psycopg2
import pytest

from pgrelay.config import load_config
from pgrelay.errors import ConfigError
from pgrelay.settings import core_registry

from ..support import RawClient, connect, data_rows, error_fields, scalar

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
                                reason="reads another process's sockets with pidfd_getfd (Linux 5.6+)")

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture but alpha
_libc = ctypes.CDLL(None, use_errno=True)


def steal(pid: int, fd: int) -> socket.socket:
    """A copy, in this process, of descriptor `fd` of process `pid` (same socket, same options)."""
    pidfd = os.pidfd_open(pid)
    try:
        new = _libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
        if new < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd: {os.strerror(err)}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=new)


def relay_tcp_socket(relay, *, local_port: int | None = None, remote_port: int | None = None) -> socket.socket:
    """pgrelay's TCP socket with that local or remote port (exactly one must match)."""
    conns = [c for c in psutil.Process(relay.proc.pid).net_connections(kind="tcp")
             if c.fd >= 0 and c.raddr and (local_port is None or c.laddr.port == local_port)
             and (remote_port is None or c.raddr.port == remote_port)]
    assert len(conns) == 1, conns
    return steal(relay.proc.pid, conns[0].fd)


def options(sock: socket.socket) -> dict[str, int]:
    tcp = socket.IPPROTO_TCP
    return {
        "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        "keepidle": sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
        "keepintvl": sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
        "keepcnt": sock.getsockopt(tcp, socket.TCP_KEEPCNT),
        "user_timeout": sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
        "sndbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
        "rcvbuf": sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
    }


def sysctl(name: str) -> int:
    with open(f"/proc/sys/net/ipv4/{name}") as f:
        return int(f.read())


def os_default() -> dict[str, int]:
    """What a TCP socket nobody tuned reports: the kernel's keepalive defaults, no user timeout."""
    return {"keepidle": sysctl("tcp_keepalive_time"), "keepintvl": sysctl("tcp_keepalive_intvl"),
            "keepcnt": sysctl("tcp_keepalive_probes"), "user_timeout": 0}


class Session:
    """A raw client logged in through pgrelay, holding a server (it is inside a transaction), with
    pgrelay's sockets on both sides of it."""

    def __init__(self, relay):
        self.client = RawClient(relay.port)
        self.client.login()
        assert self.client.query("BEGIN")[-1] == (b"Z", b"T")
        self.server_port = int(data_rows(self.client.query(
            "SELECT client_port FROM pg_stat_activity WHERE pid = pg_backend_pid()"))[0][0])
        self.client_side = relay_tcp_socket(relay, remote_port=self.client.sock.getsockname()[1])
        self.server_side = relay_tcp_socket(relay, local_port=self.server_port, remote_port=relay.pg.port)

    def both(self) -> list[dict[str, int]]:
        return [options(self.client_side), options(self.server_side)]

    def close(self) -> None:
        for sock in (self.client_side, self.server_side):
            sock.close()
        self.client.close()


@pytest.fixture
def sessions():
    opened: list[Session] = []

    def open_session(relay) -> Session:
        opened.append(Session(relay))
        return opened[-1]

    yield open_session
    for session in opened:
        session.close()


def test_tcp_keepalive_is_on_by_default_with_the_os_timing(make_relay, sessions):
    relay = make_relay()
    for side, opts in zip(("client", "server"), sessions(relay).both()):
        assert opts["keepalive"] == 1, f"{side} socket: SO_KEEPALIVE is off"
        assert {k: opts[k] for k in os_default()} == os_default(), side


def test_tcp_keepalive_off_also_ignores_the_timing_settings(make_relay, sessions):
    # As PgBouncer: tcp_keepidle/intvl/cnt only tune keepalive when it is on.
    relay = make_relay({"tcp_keepalive": "0", "tcp_keepidle": "17", "tcp_keepintvl": "7", "tcp_keepcnt": "3"})
    for side, opts in zip(("client", "server"), sessions(relay).both()):
        assert opts["keepalive"] == 0, side
        assert {k: opts[k] for k in os_default()} == os_default(), side


def test_keepalive_timing_user_timeout_and_buffers_on_both_sides(make_relay, sessions):
    relay = make_relay({"tcp_keepidle": "17", "tcp_keepintvl": "7", "tcp_keepcnt": "3",
                        "tcp_user_timeout": "4321", "tcp_socket_buffer": "32768"})
    session = sessions(relay)
    for side, opts in zip(("client", "server"), session.both()):
        assert opts["keepalive"] == 1, side
        assert (opts["keepidle"], opts["keepintvl"], opts["keepcnt"]) == (17, 7, 3), side
        assert opts["user_timeout"] == 4321, side
        # Linux doubles SO_SNDBUF/SO_RCVBUF for its bookkeeping and reports the doubled value.
        assert (opts["sndbuf"], opts["rcvbuf"]) == (65536, 65536), side
    assert data_rows(session.client.query("SELECT 42"))[0] == ["42"]


def test_each_timing_setting_alone(make_relay, sessions):
    """Each option is applied on its own (no setting borrows another's value)."""
    cases = {"tcp_keepidle": ("keepidle", 23), "tcp_keepintvl": ("keepintvl", 11), "tcp_keepcnt": ("keepcnt", 5),
             "tcp_user_timeout": ("user_timeout", 999)}
    for setting, (option, value) in cases.items():
        relay = make_relay({setting: str(value)}, name=setting)
        for side, opts in zip(("client", "server"), sessions(relay).both()):
            expected = dict(os_default(), **{option: value})
            assert {k: opts[k] for k in expected} == expected, (setting, side)
        relay.stop()


def test_reload_applies_to_new_connections_only(make_relay, sessions):
    relay = make_relay({"pool_mode": "session", "tcp_keepidle": "17", "tcp_user_timeout": "1000"})
    before = sessions(relay)
    relay.settings.update({"tcp_keepidle": "29", "tcp_user_timeout": "2000"})
    relay.write_ini()
    relay.reload()
    after = sessions(relay)
    assert after.server_port != before.server_port  # a server of its own, opened after the reload
    assert [(o["keepidle"], o["user_timeout"]) for o in before.both()] == [(17, 1000), (17, 1000)]
    assert [(o["keepidle"], o["user_timeout"]) for o in after.both()] == [(29, 2000), (29, 2000)]
    assert "cannot be changed by a reload" not in relay.log()


def test_unix_sockets_are_left_alone(make_relay, pg):
    # Client over pgrelay's Unix socket, server over PostgreSQL's: keepalive and buffers untouched,
    # and no failed TCP-only setsockopt() is logged.
    relay = make_relay({"tcp_keepidle": "17", "tcp_user_timeout": "4321", "tcp_socket_buffer": "32768"},
                       databases={"*": f"host={pg.socket_dir} port={pg.port}"})
    conn = psycopg2.connect(host=relay.workdir, port=relay.port, user="postgres", dbname="postgres",
                            connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("BEGIN; SELECT client_addr IS NULL FROM pg_stat_activity WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (True,), "the server connection should be over a Unix socket"
            proc = psutil.Process(relay.proc.pid)
            stolen = [steal(proc.pid, c.fd) for c in proc.net_connections(kind="unix") if c.fd >= 0]
            try:
                connected = [s for s in stolen if not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)]
                assert len(connected) >= 2, "expected the client's and the server's Unix sockets"
                for sock in connected:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) != 65536
            finally:
                for sock in stolen:
                    sock.close()
    finally:
        conn.close()
    assert "could not be set on a socket" not in relay.log()


def test_a_value_the_kernel_refuses_is_logged_once_and_connections_go_on(make_relay, sessions):
    # Linux caps TCP_KEEPCNT at 127. PgBouncer drops such connections; pgrelay warns and keeps them.
    relay = make_relay({"tcp_keepcnt": "500", "tcp_keepidle": "17"})
    first, second = sessions(relay), sessions(relay)
    for session in (first, second):
        assert [(o["keepalive"], o["keepidle"], o["keepcnt"]) for o in session.both()] == \
            [(1, 17, os_default()["keepcnt"])] * 2
        assert data_rows(session.client.query("SELECT 1"))[0] == ["1"]
    assert relay.log().count("tcp_keepcnt = 500 could not be set on a socket (Invalid argument)") == 1


# -- bad values ------------------------------------------------------------------------------

INT_SETTINGS = ["tcp_keepcnt", "tcp_keepidle", "tcp_keepintvl", "tcp_user_timeout", "tcp_socket_buffer"]


@pytest.mark.parametrize("name", INT_SETTINGS)
@pytest.mark.parametrize("value", ["-1", "ten", "1.5", "5s", ""])
def test_bad_numbers_are_refused_with_file_and_line(tmp_path, name, value):
    path = tmp_path / "bad.ini"
    path.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 6432\n{name} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(core_registry(), str(path), env={})
    assert str(info.value).startswith(f"{path}:5: {name}: "), str(info.value)


@pytest.mark.parametrize("value", ["2", "maybe", "-1"])
def test_bad_tcp_keepalive_is_refused_with_file_and_line(tmp_path, value):
    path = tmp_path / "bad.ini"
    path.write_text(f"[pgbouncer]\ntcp_keepalive = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(core_registry(), str(path), env={})
    assert str(info.value).startswith(f"{path}:2: tcp_keepalive: invalid boolean"), str(info.value)


def test_pgrelay_refuses_to_start_with_a_negative_keepidle(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 6432\ntcp_keepidle = -5\n")
    done = subprocess.run([sys.executable, "-m", "pgrelay", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"{path}:5: tcp_keepidle: -5 is below the minimum 0" in done.stderr + done.stdout


def test_values_and_defaults_are_pgbouncers():
    settings = core_registry().settings
    defaults = {name: settings[name].default_value for name in ["tcp_keepalive"] + INT_SETTINGS}
    assert defaults == {"tcp_keepalive": True, "tcp_keepcnt": 0, "tcp_keepidle": 0, "tcp_keepintvl": 0,
                        "tcp_user_timeout": 0, "tcp_socket_buffer": 0}
    assert all(settings[name].reload and not settings[name].planned
               for name in ["tcp_keepalive", "login_notify_message"] + INT_SETTINGS)


# -- login_notify_message --------------------------------------------------------------------

MESSAGE = "Welcome to pgrelay; queries here are pooled (ünïcode, 100%)"


def test_login_notify_message_follows_authentication_ok(make_relay):
    relay = make_relay({"login_notify_message": MESSAGE})
    client = RawClient(relay.port)
    try:
        msgs = client.login()
        assert msgs[1][0] == b"N", msgs[:3]
        assert error_fields(msgs[1][1]) == {"S": "NOTICE", "V": "NOTICE", "C": "00000", "M": MESSAGE}
        assert [kind for kind, _ in msgs].count(b"N") == 1
        assert msgs[-1] == (b"Z", b"I")
        assert data_rows(client.query("SELECT 7"))[0] == ["7"]
    finally:
        client.close()


def test_no_login_notice_by_default(make_relay):
    relay = make_relay()
    client = RawClient(relay.port)
    try:
        assert b"N" not in [kind for kind, _ in client.login()]
    finally:
        client.close()


def test_psql_and_psycopg2_show_the_login_notice(make_relay, capfd):
    relay = make_relay({"login_notify_message": MESSAGE})
    done = subprocess.run(["psql", relay.dsn(), "-Atc", "SELECT 1"], capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, PGCLIENTENCODING="UTF8"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n"
    assert f"NOTICE:  {MESSAGE}" in done.stderr
    # libpq hands notices that arrive during connect to its default processor, which prints them
    # on stderr (psycopg2's conn.notices only collects those after connect).
    capfd.readouterr()
    conn = connect(relay)
    try:
        assert scalar(conn, "SELECT 1") == 1
    finally:
        conn.close()
    assert f"NOTICE:  {MESSAGE}" in capfd.readouterr().err


def test_reload_changes_the_login_notice_for_new_logins(make_relay):
    relay = make_relay({"login_notify_message": "first"})
    before = RawClient(relay.port)
    try:
        assert error_fields(before.login()[1][1])["M"] == "first"
        relay.settings["login_notify_message"] = "second"
        relay.write_ini()
        relay.reload()
        after = RawClient(relay.port)
        try:
            assert error_fields(after.login()[1][1])["M"] == "second"
        finally:
            after.close()
        assert data_rows(before.query("SELECT 1"))[0] == ["1"]  # no notice replayed to old clients
    finally:
        before.close()


def test_steal_fails_loudly_for_a_descriptor_that_is_not_there(make_relay):
    # The helper above must not quietly read some other socket.
    relay = make_relay()
    with pytest.raises(OSError) as info:
        steal(relay.proc.pid, 100000)
    assert info.value.errno == errno.EBADF
