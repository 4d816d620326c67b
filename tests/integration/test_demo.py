"""`pgrelay demo`: a primary and its streaming replica behind pgrelay; every printed psql line runs as printed
and reaches the server it names, and Ctrl-C removes everything."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from pgrelay.tempdb import find_bindir

from ..drivers import node_driver  # noqa: F401  (session fixture)

# "  <label> -> primary|replica" then "    psql '<uri>'"
OPTION = re.compile(r"^  (?P<label>\S.*) -> (?P<reaches>primary|replica)\n    (?P<line>psql .+)$", re.M)
# The serverless listener's lines: a curl command and the Neon driver's settings.
SERVERLESS_OPTION = re.compile(r"^  (?P<label>\S.*) -> (?P<reaches>primary)\n    (?P<line>(curl|neonConfig\.).+)$", re.M)
QUERY = "SELECT pg_is_in_recovery(), current_user, current_setting('port'), current_database()"


def _postgres_processes(path: str) -> list[str]:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if path in line and "postgres" in line]


def _run_as_printed(psql: str, line: str) -> subprocess.CompletedProcess:
    """The printed line through the shell's word splitting, with psql's options for one query appended."""
    argv = shlex.split(line)
    assert argv[0] == "psql" and len(argv) == 2, line
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return subprocess.run([psql, argv[1], "-X", "-Atc", QUERY], capture_output=True, text=True, env=env,
                          timeout=30)


def _run_neon_settings(node_driver, settings: str) -> None:
    """The printed driver settings, pasted into a Node program that queries through neon() and Pool."""
    from pgrelay.demo import NEON_URL
    run = node_driver.run("demo_settings.js", {"settings": settings, "url": NEON_URL}, timeout=60).check()
    rows = run.one("rows")
    assert rows["http"] == rows["ws"] == [["f", "postgres"]], run.describe()


def _read_until_ready(proc, lines: list[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, "demo exited early:\n" + "".join(lines)
        lines.append(line)
        if line.startswith("Press Ctrl-C"):
            return "".join(lines)
    raise AssertionError("demo did not get ready in time:\n" + "".join(lines))


@pytest.mark.parametrize("postgres", ["system", "embedded"])
def test_demo_prints_every_option_serves_each_and_cleans_up_on_ctrl_c(postgres, node_driver):
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "pgrelay", "demo", "--listen_port", "0", "--postgres", postgres],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        output = _read_until_ready(proc, lines, 50)
        servers = re.search(r"PostgreSQL (\d+): the primary on port (\d+), its streaming replica on port (\d+)\.",
                            output)
        assert servers, output
        version, primary_port, replica_port = servers.groups()
        assert version == ("15" if postgres == "system" else "18"), output
        ports = dict((name, port) for port, name in
                     re.findall(r"(\d+) \((main|direct|session|serverless)[,)]", output.split("pgrelay's ports:")[1]))
        assert set(ports) == {"main", "direct", "session", "serverless"}, output
        workdir = re.search(r"Config: (\S+)/pgrelay.ini", output).group(1)
        assert os.path.isdir(workdir) and os.path.basename(workdir).startswith("pgrelay-demo-")

        options = [m.groupdict() for m in OPTION.finditer(output)]
        assert len(options) == output.count("\n    psql ") == 10, output
        reached = {}
        for option in options:
            uri = shlex.split(option["line"])[1]
            tcp = re.fullmatch(r"postgresql://([^@/]+)@127\.0\.0\.1:(\d+)/postgres", uri)
            unix = re.fullmatch(r"postgresql://([^@/]+)@/postgres\?host=(/[^&]+)&port=(\d+)", uri)
            assert tcp or unix, uri
            key = tcp.groups() + ("tcp",) if tcp else (unix.group(1), unix.group(3), unix.group(2))
            assert key not in reached, output
            reached[key] = option["reaches"]
        main, direct, session = ports["main"], ports["direct"], ports["session"]
        # Every connection option, with the | suffix percent-encoded in the URI.
        assert reached == {
            ("postgres", main, "tcp"): "primary",                       # local pooler
            ("postgres", main, workdir): "primary",                     # the same on the Unix socket
            ("postgres%7Cwrite-bouncer", main, "tcp"): "primary",       # dedicated primary pooler
            ("postgres%7Cread-bouncer", main, "tcp"): "replica",        # dedicated replica pooler
            ("postgres.demo", main, "tcp"): "primary",                  # cluster user names
            ("postgres.demo%7Cread-bouncer", main, "tcp"): "replica",
            ("postgres", direct, "tcp"): "primary",                     # direct
            ("postgres%7Creplica", direct, "tcp"): "replica",
            ("postgres.demo%7Creplica", direct, "tcp"): "replica",
            ("postgres", session, "tcp"): "primary",                    # session port
        }, output

        psql = os.path.join(find_bindir(postgres), "psql")
        for option in options:
            result = _run_as_printed(psql, option["line"])
            assert result.returncode == 0, (option, result.stderr)
            on_replica = option["reaches"] == "replica"
            assert result.stdout.strip() == "|".join(
                ["t" if on_replica else "f", "postgres", replica_port if on_replica else primary_port, "postgres"]
            ), (option, result.stdout)
        serverless = [m.groupdict() for m in SERVERLESS_OPTION.finditer(output)]
        assert [o["line"].split()[0] for o in serverless] == ["curl", "neonConfig.fetchEndpoint"], output
        curl = serverless[0]["line"]
        assert f"http://127.0.0.1:{ports['serverless']}/sql" in curl
        reply = subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=30)
        assert reply.returncode == 0, reply
        # Without Neon-Raw-Text-Output and Neon-Array-Mode (the driver sends both): JSON-typed objects.
        assert json.loads(reply.stdout)["rows"] == [{"pg_is_in_recovery": False, "current_user": "postgres"}], \
            reply.stdout
        _run_neon_settings(node_driver, serverless[1]["line"])
        assert len(_postgres_processes(workdir)) == 2  # the primary's postmaster and the replica's

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C sends: to the terminal's foreground group
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
        assert "demo cleaned up" in rest, rest
        assert not os.path.exists(workdir)
        time_left = time.monotonic() + 10
        while _postgres_processes(workdir) and time.monotonic() < time_left:
            time.sleep(0.1)
        assert _postgres_processes(workdir) == []
        assert time.monotonic() - started < 60
    finally:
        if proc.poll() is None:  # a failed assertion: let the demo clean up before it is killed
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_demo_without_postgres_binaries_says_so_and_leaves_nothing(tmp_path):
    env = dict(os.environ, PGRELAY_PG_BINDIR=str(tmp_path / "no-such-bindir"), TMPDIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-m", "pgrelay", "demo", "--listen_port", "0"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 1, result
    assert "pgrelay demo: PostgreSQL did not start:" in result.stderr
    assert "no-such-bindir/postgres" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(tmp_path) == []  # the work dir is gone


def test_ctrl_c_while_the_replica_starts_leaves_nothing_behind():
    proc = subprocess.Popen([sys.executable, "-m", "pgrelay", "demo", "--listen_port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("starting its streaming replica"):
                break
        workdir = re.search(r"^starting PostgreSQL \d+ from \S+ in (\S+) \.\.\.$", "".join(lines), re.M).group(1)
        # pg_basebackup has copied the primary; press Ctrl-C as soon as the replica's server writes
        # its postmaster.pid, while `pg_ctl start -w` still waits for it.
        pidfile = os.path.join(workdir, "replica", "postmaster.pid")
        while not os.path.exists(pidfile) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert os.path.exists(pidfile)
        assert _postgres_processes(workdir)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 130
        rest = proc.stdout.read()
        assert "interrupted; stopping ..." in rest and "demo cleaned up" in rest, rest
        assert "Traceback" not in rest, rest
        assert not os.path.exists(workdir)
        time_left = time.monotonic() + 10
        while _postgres_processes(workdir) and time.monotonic() < time_left:
            time.sleep(0.1)
        assert _postgres_processes(workdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
