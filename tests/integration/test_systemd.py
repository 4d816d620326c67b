"""systemd: the units in contrib/systemd verify, pgrelay speaks sd_notify to a real NOTIFY_SOCKET,
and serves sockets passed by systemd-socket-activate (socket activation)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RelayProcess, assert_served, connect, scalar, stop_relays, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNITS = ROOT / "contrib" / "systemd"
INSTALLED_PGRELAY = "/opt/pgrelay/bin/pgrelay"  # the ExecStart= path the units name
NOTIFY_RELOAD_SINCE = 253                       # systemd release that added Type=notify-reload


# -- the unit files -----------------------------------------------------------------------------

def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd", pytrace=False)
    return path


def systemd_version() -> int:
    out = subprocess.run([systemd_analyze(), "--version"], capture_output=True, text=True, check=True).stdout
    return int(re.match(r"systemd (\d+)", out).group(1))


def unit_copy(tmp_path, *names: str, rename: dict[str, str] | None = None) -> pathlib.Path:
    """Copies of units in a fresh directory with ExecStart's /opt/pgrelay/bin/pgrelay replaced by an
    executable that exists here: `systemd-analyze verify` refuses a unit whose ExecStart binary is
    missing, and the test host need not have pgrelay installed in /opt/pgrelay. Nothing else in
    the text changes (checked)."""
    unitdir = tmp_path / "units"
    unitdir.mkdir(exist_ok=True)
    pgrelay = shutil.which("pgrelay") or pytest.fail("the pgrelay command is not installed", pytrace=False)
    for name in names:
        text = (UNITS / name).read_text()
        rewritten = text.replace(INSTALLED_PGRELAY, pgrelay)
        assert text.count(INSTALLED_PGRELAY) == (1 if name.endswith(".service") else 0), name
        target = unitdir / (rename or {}).get(name, name)
        target.write_text(rewritten)
    return unitdir


def verify(unitdir: pathlib.Path, unit: str) -> None:
    """`systemd-analyze verify` passes and prints nothing: it exits 0 on unknown keys and unparsable
    values (it only warns), so its output must be empty too."""
    result = subprocess.run([systemd_analyze(), "verify", str(unitdir / unit)], capture_output=True, text=True,
                            cwd=unitdir, timeout=60)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and output == "", f"systemd-analyze verify {unit}:\n{output}"


def unit_settings(name: str) -> list[str]:
    """The unit's setting lines, without comments."""
    return [line for line in (UNITS / name).read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_verify_catches_errors(tmp_path):
    """The check below can fail: a bad key and an unknown service type are reported."""
    unitdir = unit_copy(tmp_path, "pgrelay-notify.service")
    unit = unitdir / "pgrelay-notify.service"
    unit.write_text(unit.read_text().replace("KillSignal=SIGINT", "KillSignal=SIGINT\nNoSuchKey=1"))
    with pytest.raises(AssertionError, match="NoSuchKey"):
        verify(unitdir, "pgrelay-notify.service")


@pytest.mark.parametrize("unit, files, rename", [
    ("pgrelay-notify.service", ["pgrelay-notify.service"], {}),
    # The template, for one instance.
    ("pgrelay@main.service", ["pgrelay@.service"], {}),
    # The socket with its service, as the README installs it on systemd < 253.
    ("pgrelay.socket", ["pgrelay.socket", "pgrelay-notify.service"], {"pgrelay-notify.service": "pgrelay.service"}),
])
def test_units_verify(tmp_path, unit, files, rename):
    verify(unit_copy(tmp_path, *files, rename=rename), unit)


@pytest.mark.parametrize("unit, files, rename", [
    ("pgrelay.service", ["pgrelay.service"], {}),
    ("pgrelay.socket", ["pgrelay.socket", "pgrelay.service"], {}),
    ("pgrelay@main.service", ["pgrelay@.service", "notify-reload.conf"],
     {"notify-reload.conf": "pgrelay@.service.d/notify-reload.conf"}),
])
def test_notify_reload_units_verify(tmp_path, unit, files, rename):
    """Type=notify-reload exists since systemd 253. VERSION GATE: an older systemd-analyze (Debian 12
    has 252) rejects that type, so this runs only where systemd-analyze --version is 253 or later;
    test_unit_variants_agree checks on every host that these units differ from the verified
    Type=notify ones in nothing but Type= and ExecReload=."""
    version = systemd_version()
    if version < NOTIFY_RELOAD_SINCE:
        pytest.skip(f"version gate: systemd-analyze {version} < {NOTIFY_RELOAD_SINCE} has no Type=notify-reload")
    (tmp_path / "units" / "pgrelay@.service.d").mkdir(parents=True)
    verify(unit_copy(tmp_path, *files, rename=rename), unit)


def test_unit_variants_agree():
    """pgrelay.service (notify-reload) is pgrelay-notify.service but for Type= and ExecReload=; the
    template is it with the instance's config file, Unix socket directory and name; the drop-in
    turns the template into notify-reload."""
    notify, reload_ = unit_settings("pgrelay-notify.service"), unit_settings("pgrelay.service")
    assert [l for l in notify if not l.startswith("ExecReload=")] == \
        [l.replace("Type=notify-reload", "Type=notify") for l in reload_]
    assert "ExecReload=/bin/kill -HUP $MAINPID" in notify and "Type=notify" in notify
    template = unit_settings("pgrelay@.service")
    expected = [l.replace("/etc/pgrelay/pgrelay.ini", "/etc/pgrelay/%i.ini")
                .replace("=/run/pgrelay", "=/run/pgrelay/%i")
                .replace("RuntimeDirectory=pgrelay", "RuntimeDirectory=pgrelay/%i")
                .replace("Description=pgrelay,", "Description=pgrelay %i,")
                for l in notify if l != "RuntimeDirectoryPreserve=yes"]
    assert template == expected
    assert unit_settings("notify-reload.conf") == ["[Service]", "Type=notify-reload", "ExecReload="]


def test_service_settings():
    """What the brief and PgBouncer's unit ask for, present in the verified unit."""
    settings = dict(line.split("=", 1) for line in unit_settings("pgrelay-notify.service") if "=" in line)
    assert settings["KillSignal"] == "SIGINT"             # safe shutdown, as PgBouncer
    assert int(settings["LimitNOFILE"]) >= 65536
    assert settings["User"] == settings["Group"] == "pgrelay"
    assert settings["RuntimeDirectory"] == "pgrelay"
    assert settings["Environment"] == "PGRELAY_UNIX_SOCKET_DIR=/run/pgrelay"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK"}.items():
        assert settings[key] == value, key
    socket_unit = unit_settings("pgrelay.socket")
    assert "ListenStream=6432" in socket_unit and "ListenStream=/run/pgrelay/.s.PGSQL.6432" in socket_unit


@pytest.mark.parametrize("files, unit, rename", [
    (["pgrelay-notify.service"], "pgrelay-notify.service", {}),
    (["pgrelay@.service"], "pgrelay@.service", {}),
])
def test_units_are_hardened(tmp_path, files, unit, rename):
    """systemd's own review rates the hardening: exposure at most 2.0 (of 10; "OK")."""
    unitdir = unit_copy(tmp_path, *files, rename=rename)
    result = subprocess.run([systemd_analyze(), "security", "--offline=true", "--threshold=20", str(unitdir / unit)],
                            capture_output=True, text=True, cwd=unitdir, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    assert "Overall exposure level" in result.stdout


# -- sd_notify ------------------------------------------------------------------------------------

class NotifyReceiver:
    """The service manager's end of NOTIFY_SOCKET: a real AF_UNIX datagram socket, read by a
    thread that notes when each message arrived."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, dict[str, str]]] = []  # (arrival, fields)
        self.running = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while self.running:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                continue
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            self.messages.append((time.monotonic(), fields))

    def poll(self) -> list[dict[str, str]]:
        return [fields for _, fields in list(self.messages)]

    def wait_for(self, key: str, value: str | None = None, after: int = 0, timeout: float = 10) -> int:
        """The index of the first message from `after` on with `key` (equal to `value`)."""
        def find():
            for i, fields in enumerate(self.poll()[after:], after):
                if key in fields and (value is None or fields[key] == value):
                    return i + 1  # 0 is falsy
            return None
        return wait_until(find, timeout=timeout, message=f"{key}={value or '*'} on NOTIFY_SOCKET") - 1

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def receiver(tmp_path):
    rx = NotifyReceiver(str(tmp_path / "notify.sock"))
    yield rx
    rx.close()


STATUS = re.compile(r"clients: (\d+), servers: (\d+), pools: (\d+)")


def test_notify_sequence(make_relay, receiver, tmp_path):
    """READY=1 with a STATUS= once listening; STATUS= follows the clients; SIGHUP gives RELOADING=1
    with MONOTONIC_USEC, then READY=1; a refused reload still ends in READY=1, its STATUS= says so
    (but not the error text); WATCHDOG=1 every half WATCHDOG_USEC; STOPPING=1 on SIGINT; in order."""
    relay = make_relay(env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "1000000"})
    ready = receiver.wait_for("READY", "1")
    first = receiver.messages[ready][1]
    assert STATUS.fullmatch(first["STATUS"]).groups() == ("0", "0", "0")
    # STATUS= follows: one client, its server and pool.
    conn = connect(relay)
    assert scalar(conn, "SELECT 1") == 1
    busy = receiver.wait_for("STATUS", "clients: 1, servers: 1, pools: 1", after=ready)
    # A reload.
    before_reload = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    relay.send_signal(signal.SIGHUP)
    reloading = receiver.wait_for("RELOADING", "1", after=busy)
    stamp = int(receiver.messages[reloading][1]["MONOTONIC_USEC"])
    assert before_reload <= stamp <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000, "CLOCK_MONOTONIC usec"
    reloaded = receiver.wait_for("READY", "1", after=reloading)
    assert STATUS.fullmatch(receiver.messages[reloaded][1]["STATUS"])
    # A refused reload: RELOADING=1, then READY=1 all the same, with a STATUS= that says it failed.
    good = pathlib.Path(relay.ini_path).read_text()
    pathlib.Path(relay.ini_path).write_text(good.replace("pool_mode = transaction", "pool_mode = s3cr3t-bogus"))
    relay.send_signal(signal.SIGHUP)
    refused_start = receiver.wait_for("RELOADING", "1", after=reloaded + 1)
    refused = receiver.wait_for("READY", "1", after=refused_start)
    status = receiver.messages[refused][1]["STATUS"]
    assert "reload failed" in status and "old configuration kept" in status and "s3cr3t" not in status
    wait_until(lambda: "config reload failed" in relay.log(), message="the refusal in the log")
    assert scalar(conn, "SELECT 2") == 2 and relay.alive(), "the old configuration still serves"
    pathlib.Path(relay.ini_path).write_text(good)
    # WATCHDOG=1 about every 0.5 s (half of WATCHDOG_USEC=1 s).
    time.sleep(2.2)
    receiver.poll()
    beats = [t for t, fields in receiver.messages if fields.get("WATCHDOG") == "1"]
    assert len(beats) >= 4, beats
    gaps = [b - a for a, b in zip(beats, beats[1:])]
    assert max(gaps) < 0.9 and sum(gaps) / len(gaps) > 0.3, gaps
    conn.close()
    # SIGINT: STOPPING=1, and it is the last state change.
    mark = len(receiver.messages)
    assert relay.stop(signal.SIGINT) == 0
    stopping = receiver.wait_for("STOPPING", "1", after=mark)
    assert receiver.messages[stopping][1]["STATUS"].startswith("shutting down (wait_for_servers): ")
    states = [(key, fields[key]) for _, fields in receiver.messages for key in ("READY", "RELOADING", "STOPPING")
              if key in fields]
    assert states == [("READY", "1"), ("RELOADING", "1"), ("READY", "1"), ("RELOADING", "1"), ("READY", "1"),
                      ("STOPPING", "1")]
    assert "NOTIFY_SOCKET" not in relay.log(), "no warning when the socket works"


def test_notify_abstract_socket_and_foreign_watchdog(make_relay):
    """An '@' NOTIFY_SOCKET is an abstract socket name; WATCHDOG_USEC meant for another process
    (WATCHDOG_PID) is not ours to answer."""
    rx = NotifyReceiver(f"@pgrelay-test-{os.getpid()}-{free_port()}")
    try:
        relay = make_relay(env={"NOTIFY_SOCKET": rx.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
        rx.wait_for("READY", "1")
        assert_served(relay)
        time.sleep(1.0)
        assert not any("WATCHDOG" in fields for fields in rx.poll())
        relay.stop(signal.SIGINT)
        rx.wait_for("STOPPING", "1")
    finally:
        rx.close()


def test_watchdog_for_this_process(launch, receiver):
    """WATCHDOG_PID naming pgrelay itself: WATCHDOG=1 is sent. (pgrelay's pid is known only once it
    runs, so a shell exports its own pid and then execs pgrelay in its place.)"""
    relay = launch(["sh", "-c", 'export WATCHDOG_PID=$$; exec "$@"', "sh", sys.executable, "-m", "pgrelay"],
                   env={"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "400000"})
    wait_until(lambda: "process up" in relay.log(), message="pgrelay to start")
    receiver.wait_for("READY", "1")
    first = receiver.wait_for("WATCHDOG", "1")
    receiver.wait_for("WATCHDOG", "1", after=first + 1, timeout=2)
    assert_served(relay)


@pytest.mark.parametrize("kind", ["missing", "not-a-socket", "stream-socket", "relative", "abstract-unbound"])
def test_notify_socket_wrong(make_relay, tmp_path, kind):
    """A NOTIFY_SOCKET that is missing, unreachable or wrong: pgrelay serves as usual and says so in
    one warning line, though it tries again for every notification (reload, status, shutdown)."""
    listener = None
    if kind == "missing":
        address = str(tmp_path / "nowhere" / "notify.sock")
    elif kind == "not-a-socket":
        address = str(tmp_path / "file")
        pathlib.Path(address).write_text("")
    elif kind == "stream-socket":
        address = str(tmp_path / "stream.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen()
    elif kind == "relative":
        address = "notify.sock"
    else:
        address = f"@pgrelay-test-unbound-{os.getpid()}-{free_port()}"
    try:
        relay = make_relay(env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"})
        assert_served(relay)
        relay.reload()
        assert_served(relay)
        time.sleep(0.6)  # watchdog beats and status checks try again
        assert relay.stop(signal.SIGINT) == 0
        warnings = [line for line in relay.log().splitlines() if "NOTIFY_SOCKET" in line]
        assert len(warnings) == 1, warnings
        assert f"cannot notify systemd through NOTIFY_SOCKET={address}" in warnings[0]
        assert "WARNING" in warnings[0] or "warning" in warnings[0].lower()
    finally:
        if listener is not None:
            listener.close()


# -- socket activation ----------------------------------------------------------------------------

@pytest.fixture
def launch(tmp_path, pg):
    """Start pgrelay through a command of the test's choosing (a wrapper that execs
    `COMMAND... CONFIG_FILE`); each is stopped at teardown and its log checked for bugs."""
    started: list[RelayProcess] = []

    def factory(command: list[str], settings=None, env=None, extra_sections="") -> RelayProcess:
        relay = RelayProcess(str(tmp_path), pg, settings, extra_sections=extra_sections,
                             name=f"relay{len(started)}")
        relay.write_ini()
        relay._logf = open(relay.log_path, "ab")
        relay.proc = subprocess.Popen(command + [relay.ini_path], stdout=relay._logf, stderr=subprocess.STDOUT,
                                      env=dict(os.environ, **(env or {})))
        started.append(relay)
        return relay

    yield factory
    stop_relays(started)


def socket_activate(*listen: str, names: str = "") -> list[str]:
    """systemd-socket-activate: it opens the sockets, waits for a first connection, then execs pgrelay
    with LISTEN_FDS, LISTEN_PID and LISTEN_FDNAMES set, as systemd does for pgrelay.socket."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is missing: apt-get install -y systemd", pytrace=False)
    command = [tool]
    for address in listen:
        command += ["-l", address]
    if names:
        command.append(f"--fdname={names}")
    return command + [sys.executable, "-m", "pgrelay"]


def psql(host: str, port: int, sql: str) -> str:
    result = subprocess.run(["psql", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres", "-XAtc", sql],
                            capture_output=True, text=True, timeout=60, env=dict(os.environ, PGCONNECT_TIMEOUT="30"))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def served_psycopg2(host: str, port: int, **kw) -> None:
    conn = psycopg2.connect(host=host, port=port, user="postgres", dbname="postgres", connect_timeout=30, **kw)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 'served', current_setting('port')")
            assert cur.fetchone()[0] == "served"
    finally:
        conn.close()


def test_socket_activation_tcp_and_unix(launch, tmp_path):
    """Both sockets passed: the first client starts pgrelay and is served; pgrelay binds nothing
    itself; TCP and Unix clients (psql, psycopg2) are served; on exit the Unix socket file, which
    belongs to the service manager, stays."""
    port = free_port()
    unix = str(tmp_path / f".s.PGSQL.{port}")
    relay = launch(socket_activate(f"127.0.0.1:{port}", unix, names="pgrelay.socket:pgrelay.socket"),
                   settings={"listen_port": port})
    relay.port = port
    wait_until(lambda: os.path.exists(unix), message="systemd-socket-activate to listen")
    assert "process up" not in relay.log(), "pgrelay starts on the first connection"
    assert psql("127.0.0.1", port, "SELECT 'activated'") == "activated"  # this one starts pgrelay
    log = wait_until(lambda: "process up" in relay.log() and relay.log(), message="pgrelay to start")
    assert f"listening on 127.0.0.1:{port} (main: pooled; passed by the service manager as fd 3, pgrelay.socket)" \
        in log
    assert f"listening on unix:{unix} (main: pooled; passed by the service manager as fd 4, pgrelay.socket)" in log
    assert "could not listen" not in log and log.count("listening on ") == 2
    assert psql(str(tmp_path), port, "SELECT 'over unix'") == "over unix"
    served_psycopg2("127.0.0.1", port)
    served_psycopg2(str(tmp_path), port)
    conns = [connect(relay) for _ in range(5)]
    assert [scalar(c, "SELECT %s", (i,)) for i, c in enumerate(conns)] == list(range(5))
    for conn in conns:
        conn.close()
    with open(f"/proc/{relay.proc.pid}/cmdline", "rb") as f:
        assert b"pgrelay" in f.read(), "systemd-socket-activate exec'd pgrelay in its place"
    assert relay.stop(signal.SIGINT) == 0
    assert os.path.exists(unix), "a passed Unix socket's file is the service manager's to remove"


def test_socket_activation_mixed_with_own_listeners(launch, tmp_path):
    """Only the main port's TCP socket is passed: pgrelay serves it, and binds the main port's Unix
    socket and the [listeners] port (TCP and Unix) itself, removing those files on exit."""
    port, other = free_port(), free_port()
    relay = launch(socket_activate(f"127.0.0.1:{port}"), settings={"listen_port": port},
                   extra_sections=f"[listeners]\nsession = port={other} pool_mode=session\n")
    relay.port = port
    assert psql("127.0.0.1", port, "SELECT 'activated'") == "activated"
    log = wait_until(lambda: "process up" in relay.log() and relay.log(), message="pgrelay to start")
    assert f"listening on 127.0.0.1:{port} (main: pooled; passed by the service manager as fd 3)" in log
    assert f"listening on unix:{tmp_path}/.s.PGSQL.{port} (main: pooled)\n" in log
    assert f"listening on 127.0.0.1:{other} (session: pooled, session pooling)\n" in log
    assert f"listening on unix:{tmp_path}/.s.PGSQL.{other} (session: pooled, session pooling)\n" in log
    assert "could not listen" not in log
    for host in ("127.0.0.1", str(tmp_path)):
        for p in (port, other):
            assert psql(host, p, f"SELECT 'served on {p}'") == f"served on {p}"
            served_psycopg2(host, p)
    # The session listener keeps session state between transactions: it is that listener's socket.
    conn = psycopg2.connect(host="127.0.0.1", port=other, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SET application_name = 'kept'")
        cur.execute("SELECT pg_backend_pid()")
        pid = cur.fetchone()[0]
        cur.execute("SELECT pg_backend_pid(), current_setting('application_name')")
        assert cur.fetchone() == (pid, "kept")
    conn.close()
    assert relay.stop(signal.SIGINT) == 0
    assert not os.path.exists(tmp_path / f".s.PGSQL.{port}") and not os.path.exists(tmp_path / f".s.PGSQL.{other}")


def test_socket_activation_unmatched_port(launch, tmp_path):
    """A passed socket on a port no listener has serves the main listener, with a warning; the main
    port is then bound by pgrelay as usual."""
    port, passed = free_port(), free_port()
    relay = launch(socket_activate(f"127.0.0.1:{passed}"), settings={"listen_port": port})
    assert psql("127.0.0.1", passed, "SELECT 'activated'") == "activated"
    log = wait_until(lambda: "process up" in relay.log() and relay.log(), message="pgrelay to start")
    assert f"socket 127.0.0.1:{passed} passed by the service manager matches no listener port; " \
           "it serves the main listener" in log
    assert f"listening on 127.0.0.1:{port} (main: pooled)\n" in log
    for p in (passed, port):
        served_psycopg2("127.0.0.1", p)
    assert relay.stop(signal.SIGINT) == 0


PASSED_SOCKETS = textwrap.dedent("""
    import json, logging, os, socket, sys
    keep = []
    for kind in sys.argv[1].split(","):  # what to put on fds 3, 4, ...
        if kind == "tcp":
            s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
        elif kind == "unlistened":
            s = socket.socket(); s.bind(("127.0.0.1", 0))
        elif kind == "dgram":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        keep.append(s)
    for fd, s in enumerate(keep, 3):
        if s.fileno() != fd:
            os.dup2(s.fileno(), fd)
    os.environ.update(json.loads(sys.argv[2]))
    os.environ["LISTEN_PID"] = os.environ["LISTEN_PID"].replace("SELF", str(os.getpid()))
    logging.basicConfig(stream=sys.stdout, format="%(levelname)s %(message)s")
    from pgrelay.listener import passed_sockets
    env = dict(os.environ)
    got = passed_sockets(env)
    print(json.dumps({"passed": [[s.fileno(), s.getsockname()[1], name] for s, name in got],
                      "left": sorted(k for k in (*env, *os.environ) if k.startswith("LISTEN_")),
                      "inheritable": [s.get_inheritable() for s, _ in got]}))
""")


@pytest.mark.parametrize("fds, env, passed, warning", [
    ("tcp,tcp", {"LISTEN_PID": "SELF", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}, [[3, "a"], [4, "b"]], None),
    ("tcp", {"LISTEN_PID": "SELF", "LISTEN_FDS": "1"}, [[3, ""]], None),
    # Meant for another process (a parent that was socket-activated): not ours.
    ("tcp", {"LISTEN_PID": "1", "LISTEN_FDS": "1"}, [], None),
    ("tcp", {"LISTEN_PID": "SELF", "LISTEN_FDS": "x"}, [], "ignoring LISTEN_PID="),
    ("dgram,tcp", {"LISTEN_PID": "SELF", "LISTEN_FDS": "2"}, [[4, ""]],
     "ignoring fd 3 passed by the service manager: not a listening TCP or Unix stream socket"),
    ("unlistened", {"LISTEN_PID": "SELF", "LISTEN_FDS": "1"}, [],
     "ignoring fd 3 passed by the service manager: not a listening TCP or Unix stream socket"),
    ("tcp", {"LISTEN_PID": "SELF", "LISTEN_FDS": "2"}, [[3, ""]], "ignoring fd 4 passed by the service manager: "),
])
def test_passed_sockets(fds, env, passed, warning):
    """sd_listen_fds: fds 3.. only when LISTEN_PID is pgrelay's; anything but a listening stream
    socket is refused with a warning; the LISTEN_* variables are removed in every case; adopted
    sockets are not inherited by child processes."""
    import json
    result = subprocess.run([sys.executable, "-c", PASSED_SOCKETS, fds, json.dumps(env)], capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    out = json.loads(lines[-1])
    assert [[fd, name] for fd, _, name in out["passed"]] == passed
    assert out["left"] == [] and out["inheritable"] == [False] * len(passed)
    warnings = [line for line in lines[:-1] if line.startswith("WARNING")]
    assert (warnings == []) if warning is None else (len(warnings) == 1 and warning in warnings[0]), warnings
