"""PgBouncer's command line on a real pgrelay process: -d daemonizes, -q silences stderr, -v adds debug
lines, -u switches user, -R is refused as PgBouncer 1.26 refuses it, and pidfile checks."""

import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from pgrelay.tempdb import free_port

from ..support import wait_until


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    env.update(extra)
    return env


def pgrelay(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "pgrelay", *args], capture_output=True, text=True,
                          timeout=timeout, env=clean_env())


def write_config(directory, pg, extra=""):
    port = free_port()
    path = os.path.join(directory, "relay.ini")
    with open(path, "w") as f:
        f.write(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n"
                f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {directory}\n"
                f"auth_type = trust\npool_mode = transaction\nstats_period = 3600\n{extra}")
    return path, port


def psql(port, sql="SELECT 'served'", host="127.0.0.1"):
    result = subprocess.run(["psql", "-X", "-At", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres",
                             "-c", sql], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is not alive
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid, sig=signal.SIGQUIT):
    if alive(pid):
        os.kill(pid, sig)
        wait_until(lambda: not alive(pid), timeout=15, message=f"process {pid} to exit")


class Foreground:
    """pgrelay in the foreground with its stdout and stderr captured apart."""

    def __init__(self, directory, *args):
        self.out_path = os.path.join(directory, "stdout.txt")
        self.err_path = os.path.join(directory, "stderr.txt")
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pgrelay", *args], stdout=out, stderr=err,
                                         env=clean_env())

    def stderr(self):
        with open(self.err_path) as f:
            return f.read()

    def wait_up(self, marker_file=None):
        path = marker_file or self.err_path

        def up():
            assert self.proc.poll() is None, f"pgrelay exited {self.proc.returncode}: {self.stderr()}"
            if not os.path.exists(path):
                return False
            with open(path) as f:
                return "process up" in f.read()
        wait_until(up, timeout=20, message="pgrelay to start")
        return self

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
        return self.proc.wait(15)


# -- -R / --reboot ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,line", [("-R", "pgrelay: invalid option -- 'R'"),
                                       ("--reboot", "pgrelay: unrecognized option '--reboot'"),
                                       ("-dR", "pgrelay: invalid option -- 'R'")])
def test_reboot_is_refused_as_pgbouncer_1_26_refuses_it(tmp_path, pg, flag, line):
    """PgBouncer 1.26 removed online restart (-R, the takeover): its getopt refuses the switch, with
    getopt's message and PgBouncer's hint, exit status 1. Nothing starts."""
    path, port = write_config(str(tmp_path), pg)
    result = pgrelay(flag, path)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f'{line}\nTry "pgrelay --help" for more information.\n'
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_version_and_help_exit_at_once(tmp_path, pg):
    path, _ = write_config(str(tmp_path), pg)
    version = pgrelay("-V", path)
    assert version.returncode == 0 and version.stdout.startswith("pgrelay ") and version.stderr == ""
    helped = pgrelay("-h", path)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: pgrelay") and helped.stderr == ""


# -- -d / --daemon ------------------------------------------------------------------------------

def test_daemon_detaches_and_serves(tmp_path, pg):
    pidfile, logfile = tmp_path / "relay.pid", tmp_path / "relay.log"
    path, port = write_config(str(tmp_path), pg, f"pidfile = {pidfile}\nlogfile = {logfile}\n")
    started = time.monotonic()
    result = pgrelay("-d", path)
    # The command returns once the daemon is up, with nothing on its terminal.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert time.monotonic() - started < 20
    pid = int(pidfile.read_text())
    try:
        assert alive(pid)
        assert os.getsid(pid) != os.getsid(0), "the daemon runs in a session of its own"
        assert os.getsid(pid) != pid, "the daemon is not a session leader (it forked twice)"
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert psql(port) == "served"
        assert psql(port, host=str(tmp_path)) == "served"  # its Unix socket too
        log = logfile.read_text()
        assert "LOG process up: pgrelay" in log and "login attempt: db=postgres user=postgres" in log
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(pid), timeout=15, message="the daemon to exit")
    finally:
        stop_pid(pid)
    assert not pidfile.exists(), "the daemon removes its pidfile"
    assert "LOG shutdown complete" in logfile.read_text()


def test_daemon_reports_a_failed_start(tmp_path, pg):
    """PgBouncer's daemon exits 0 before binding; pgrelay's -d waits for the daemon to be up, so a
    port already in use is an error on the terminal and exit status 1."""
    pidfile, logfile = tmp_path / "relay.pid", tmp_path / "relay.log"
    path, port = write_config(str(tmp_path), pg, f"pidfile = {pidfile}\nlogfile = {logfile}\nunix_socket_dir =\n")
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    busy.bind(("127.0.0.1", port))
    busy.listen()
    try:
        result = pgrelay("-d", path)
    finally:
        busy.close()
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.startswith("pgrelay: error: ") and "127.0.0.1" in result.stderr, result.stderr
    assert not pidfile.exists()
    assert "FATAL " in logfile.read_text()  # the daemon's log says why too


def test_daemon_needs_pidfile(tmp_path, pg):
    path, _ = write_config(str(tmp_path), pg)
    result = pgrelay("-d", path)
    assert (result.returncode, result.stdout, result.stderr) == (1, "", "pgrelay: error: daemon needs pidfile configured\n")


def test_second_daemon_refused_by_the_pidfile(tmp_path, pg):
    pidfile = tmp_path / "relay.pid"
    path, port = write_config(str(tmp_path), pg, f"pidfile = {pidfile}\nlogfile = {tmp_path / 'relay.log'}\n")
    assert pgrelay("-d", path).returncode == 0
    pid = int(pidfile.read_text())
    try:
        again = pgrelay("-d", path)
        assert again.returncode == 1
        assert again.stderr == f"pgrelay: error: pidfile '{pidfile}' exists, another instance running?\n"
        assert int(pidfile.read_text()) == pid and alive(pid)
        assert psql(port) == "served"
    finally:
        stop_pid(pid)


def test_stale_pidfile_is_removed(tmp_path, pg):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pidfile = tmp_path / "relay.pid"
    pidfile.write_text(f"{dead.pid}\n")
    path, port = write_config(str(tmp_path), pg, f"pidfile = {pidfile}\n")
    relay = Foreground(str(tmp_path), path).wait_up()
    try:
        assert pidfile.read_text() == f"{relay.proc.pid}\n"
        assert "LOG stale pidfile, removing" in relay.stderr()
    finally:
        assert relay.stop() == 0
    assert not pidfile.exists()


# -- -q / --quiet, -v / --verbose -----------------------------------------------------------------

@pytest.mark.parametrize("flag", ["-q", "--quiet"])
def test_quiet_logs_nothing_to_stderr(tmp_path, pg, flag):
    logfile = tmp_path / "relay.log"
    path, port = write_config(str(tmp_path), pg, f"logfile = {logfile}\n")
    relay = Foreground(str(tmp_path), flag, path).wait_up(marker_file=str(logfile))
    try:
        assert psql(port) == "served"
        wait_until(lambda: "closing because" in logfile.read_text(), timeout=5)
    finally:
        assert relay.stop() == 0
    assert relay.stderr() == ""
    assert "login attempt" in logfile.read_text() and "shutdown complete" in logfile.read_text()


def test_without_quiet_stderr_gets_the_log(tmp_path, pg):
    path, port = write_config(str(tmp_path), pg)
    relay = Foreground(str(tmp_path), path).wait_up()
    try:
        assert psql(port) == "served"
    finally:
        assert relay.stop() == 0
    assert "login attempt" in relay.stderr()


@pytest.mark.parametrize("flags,debug", [((), False), (("-v",), True), (("--verbose",), True), (("-vv",), True)])
def test_verbose_shows_debug_lines(tmp_path, pg, flags, debug):
    path, port = write_config(str(tmp_path), pg, "verbose = 0\n")
    relay = Foreground(str(tmp_path), *flags, path).wait_up()
    try:
        assert psql(port) == "served"
    finally:
        assert relay.stop() == 0
    lines = relay.stderr().splitlines()
    launching = [line for line in lines if line.endswith("launching new connection to server")]
    if debug:
        assert launching and all(" DEBUG S-" in line for line in launching), lines
    else:
        assert launching == [] and not any(" DEBUG " in line for line in lines)
    assert any(" LOG S-" in line and "new connection to server (from 127.0.0.1:" in line for line in lines), lines


# -- -u / --user ------------------------------------------------------------------------------

def _uid(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Uid:"))


@pytest.mark.parametrize("how", [("-u", "nobody"), ("--user=nobody",), ("user-setting",)])
def test_user_switch_to_an_unprivileged_user(pg, tmp_path, how):
    import pwd
    nobody = pwd.getpwnam("nobody")
    # A directory nobody may write: the pidfile is written and removed after the switch.
    directory = tempfile.mkdtemp(prefix="pgrelay-u-")
    os.chmod(directory, 0o777)
    try:
        pidfile = os.path.join(directory, "relay.pid")
        logfile = tmp_path / "relay.log"  # in a directory only root may enter: written through the open file
        extra = f"pidfile = {pidfile}\nlogfile = {logfile}\n" + ("user = nobody\n" if how == ("user-setting",) else "")
        path, port = write_config(directory, pg, extra)
        args = () if how == ("user-setting",) else how
        if os.geteuid() != 0:  # an unprivileged test run: the switch is refused, clearly
            result = pgrelay(*args, path)
            assert result.returncode == 1
            assert result.stderr.endswith("pgrelay: error: could not switch to user 'nobody': "
                                          "Operation not permitted\n"), result.stderr
            return
        relay = Foreground(directory, *args, path).wait_up()
        try:
            assert _uid(relay.proc.pid) == nobody.pw_uid
            with open(f"/proc/{relay.proc.pid}/status") as f:
                status = f.read()
            assert f"\nGid:\t{nobody.pw_gid}\t{nobody.pw_gid}\t{nobody.pw_gid}\t{nobody.pw_gid}\n" in status
            assert os.stat(pidfile).st_uid == nobody.pw_uid  # written after the switch
            assert psql(port) == "served"
            assert psql(port, host=directory) == "served"
            assert "LOG switched to user nobody" in relay.stderr()
        finally:
            assert relay.stop() == 0
        assert not os.path.exists(pidfile)
        assert "login attempt: db=postgres" in logfile.read_text() and "shutdown complete" in logfile.read_text()
        assert "Logging error" not in relay.stderr() and "Traceback" not in relay.stderr()
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_user_switch_binds_first(pg):
    """The listening sockets are bound before the switch (PgBouncer's -u keeps the port): the Unix
    socket file belongs to the user that started pgrelay."""
    if os.geteuid() != 0:
        pytest.fail("this check needs root (CI runs the tests as root)")
    directory = tempfile.mkdtemp(prefix="pgrelay-u-")
    os.chmod(directory, 0o777)
    try:
        path, port = write_config(directory, pg)
        relay = Foreground(directory, "-u", "nobody", path).wait_up()
        try:
            sock = os.path.join(directory, f".s.PGSQL.{port}")
            assert stat.S_ISSOCK(os.stat(sock).st_mode) and os.stat(sock).st_uid == 0
            assert psql(port) == "served"
        finally:
            assert relay.stop() == 0
    finally:
        for name in os.listdir(directory):
            os.unlink(os.path.join(directory, name))
        os.rmdir(directory)


def test_unknown_user_refuses_start(tmp_path, pg):
    path, port = write_config(str(tmp_path), pg)
    result = pgrelay("-u", "no-such-user-pgrelay", path)
    assert result.returncode == 1
    assert result.stderr.endswith("pgrelay: error: could not find user 'no-such-user-pgrelay' to switch to\n")
