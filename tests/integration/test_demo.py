"""`pgrelay demo`: prints a psql connection string per listener, serves them, and Ctrl-C removes everything."""

import os
import re
import signal
import subprocess
import sys
import time

import psycopg2


def _postgres_processes(path: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if path in line and "postgres" in line]


def test_demo_prints_strings_serves_them_and_cleans_up_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "pgrelay", "demo", "--listen_port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "demo exited early:\n" + "".join(lines)
            lines.append(line)
            if line.startswith("Press Ctrl-C"):
                break
        output = "".join(lines)
        strings = re.findall(r'psql "([^"]+)"', output)
        assert len(strings) == 4, output  # pooled, session, direct, Unix socket
        workdir = re.search(r"Config: (\S+)/pgrelay.ini", output).group(1)
        assert os.path.isdir(workdir)
        pids = set()
        for dsn in strings:
            with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
                cur.execute("SELECT 40 + 2, pg_backend_pid()")
                answer, pid = cur.fetchone()
                assert answer == 42
                pids.add(pid)
        assert _postgres_processes(workdir)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert proc.wait(30) == 0
        rest = proc.stdout.read()
        assert "demo cleaned up" in rest
        assert not os.path.exists(workdir)
        time_left = time.monotonic() + 10
        while _postgres_processes(workdir) and time.monotonic() < time_left:
            time.sleep(0.1)
        assert _postgres_processes(workdir) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
