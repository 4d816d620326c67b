"""The kernel file-descriptor limit: raised at startup to what max_client_conn needs, reported in
PgBouncer's words, and running out of descriptors pauses accepts instead of crashing."""
from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time

import psycopg2

from pgrelay.tempdb import free_port

from ..support import wait_until
from .test_command_line import clean_env, stop_pid

FDS_AT_START = 64  # what a pgrelay process holds before any client (measured: ~25) with room to spare


def start(tmp_path, pg, soft, hard, extra=""):
    port = free_port()
    path = tmp_path / "relay.ini"
    path.write_text(f"[databases]\n* = host=127.0.0.1 port={pg.port}\n"
                    f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir = {tmp_path}\n"
                    f"auth_type = trust\npool_mode = transaction\nstats_period = 3600\n{extra}")
    log = tmp_path / "stderr.txt"

    def limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pgrelay", str(path)], stdout=subprocess.DEVNULL,
                                stderr=err, env=clean_env(), preexec_fn=limit)
    wait_until(lambda: proc.poll() is not None or "process up" in log.read_text(), timeout=20,
               message="pgrelay to start")
    assert proc.poll() is None, log.read_text()
    return proc, port, log


def open_files_limit(pid):
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_soft_limit_is_raised_to_the_hard_one_and_reported(tmp_path, pg):
    proc, port, log = start(tmp_path, pg, 256, 4096, "max_client_conn = 1000\ndefault_pool_size = 20\n")
    try:
        assert open_files_limit(proc.pid) == (4096, 4096)
        text = log.read_text()
        assert "raised the kernel file descriptor limit from 256 to 4096" in text
        # max_client_conn + 10 + the * line's pool (default_pool_size 20, no [users] lines)
        assert "kernel file descriptor limit: 4096 (hard: 4096); max_client_conn: 1000, max expected fd use: 1030" \
            in text
        assert "WARNING" not in text.split("kernel file descriptor limit: 4096")[1].split("\n")[0]
    finally:
        stop_pid(proc.pid)


def test_a_soft_limit_that_is_enough_is_left_alone(tmp_path, pg):
    proc, port, log = start(tmp_path, pg, 2048, 4096, "max_client_conn = 100\n")
    try:
        assert open_files_limit(proc.pid) == (2048, 4096)
        text = log.read_text()
        assert "raised the kernel" not in text
        assert "kernel file descriptor limit: 2048 (hard: 4096); max_client_conn: 100, max expected fd use: 130" in text
    finally:
        stop_pid(proc.pid)


def test_a_hard_limit_below_the_need_is_a_warning(tmp_path, pg):
    proc, port, log = start(tmp_path, pg, 128, 512, "max_client_conn = 1000\n"
                            "[users]\nalice = pool_size=5\nbob = pool_size=5\n")
    try:
        assert open_files_limit(proc.pid) == (512, 512)
        text = log.read_text()
        # 1000 + 10 + the * line's default_pool_size (20) times the two [users] lines
        assert "kernel file descriptor limit: 512 (hard: 512); max_client_conn: 1000, max expected fd use: 1050" in text
        assert "kernel file descriptor limit 512 is below the max expected fd use 1050" in text
    finally:
        stop_pid(proc.pid)


def test_with_workers_the_need_is_per_process(tmp_path, pg):
    """workers = 4: the workers share the listening socket, so each process needs max_client_conn / 4 of
    them (plus every server): 60,000 clients fit under a limit of 16,000 per process, no warning.
    (bench/idle.py held 100,000 idle clients this way under a hard limit of 20,000.)"""
    proc, port, log = start(tmp_path, pg, 16000, 16000, "max_client_conn = 60000\nworkers = 4\n")
    try:
        wait_until(lambda: ", 4 workers" in log.read_text(), timeout=20, message="the workers")
        text = log.read_text()
        # 60000 / 4 + 10 + the * line's default_pool_size (20)
        assert "kernel file descriptor limit: 16000 (hard: 16000); max_client_conn: 60000, max expected fd use: " \
               "15030 per worker process (workers = 4)" in text
        assert "is below the max expected fd use" not in text
    finally:
        stop_pid(proc.pid)


def test_running_out_of_descriptors_pauses_accepts_and_recovers(tmp_path, pg):
    """More clients than descriptors: the extra ones wait in the kernel's backlog or fail to
    connect; pgrelay stays up, logs it, and serves normally once they are gone."""
    limit = 96
    proc, port, log = start(tmp_path, pg, limit, limit, "max_client_conn = 1000\n")
    hogs = []
    try:
        for _ in range(limit):  # past the limit: accept() fails with EMFILE inside pgrelay
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"\0\0")  # half a length word: past tcp_defer_accept, still logging in
            hogs.append(sock)
        wait_until(lambda: "accept() failed: Too many open files; pausing accepts for 1s" in log.read_text(),
                   timeout=10, message="pgrelay to log EMFILE")
        assert proc.poll() is None
        for sock in hogs:
            sock.close()
        hogs.clear()
        started = time.monotonic()
        conn = psycopg2.connect(host="127.0.0.1", port=port, dbname="postgres", user="postgres", connect_timeout=10)
        with conn.cursor() as cur:
            cur.execute("SELECT 'served after EMFILE'")
            assert cur.fetchone() == ("served after EMFILE",)
        conn.close()
        assert time.monotonic() - started < 5
        fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
        wait_until(lambda: len(os.listdir(f"/proc/{proc.pid}/fd")) <= FDS_AT_START, timeout=10,
                   message=f"pgrelay to close the hogs' descriptors (holds {fds})")
    finally:
        for sock in hogs:
            sock.close()
        stop_pid(proc.pid)
