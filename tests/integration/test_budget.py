"""`pgrelay check --live` against the test PostgreSQL (max_connections=400): the limits it reads, the
connections other clients hold, and the verdict they change."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import psycopg2
import pytest

from pgrelay.tempdb import free_port


def write(tmp_path, pg, database_options: str = "", name: str = "relay.ini") -> str:
    path = tmp_path / name
    path.write_text(f"[databases]\npostgres = host=127.0.0.1 port={pg.port} max_db_connections=10 {database_options}\n"
                    "[pgbouncer]\npool_mode = transaction\nauth_type = trust\n")
    return str(path)


def check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")}
    return subprocess.run([sys.executable, "-m", "pgrelay", "check", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def value(out: str, label: str) -> str:
    found = re.findall(rf"^  {re.escape(label)}\s+(\S+)(.*)$", out, re.M)
    assert len(found) == 1, out
    return found[0][0]


def others(out: str) -> int:
    return int(value(out, "- in use now by other clients"))


@pytest.fixture
def connections(pg):
    opened = []

    def connect(**params):
        conn = psycopg2.connect(pg.dsn(), **params)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


def test_live_reads_the_servers_limits(tmp_path, pg):
    result = check(write(tmp_path, pg), "--live")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    version = int(pg.psql("SHOW server_version_num"))
    assert re.search(rf"^  max_connections\s+400  read from the server \(PostgreSQL {version // 10000}\)$", out, re.M)
    superuser = int(pg.psql("SHOW superuser_reserved_connections"))
    assert value(out, "- superuser_reserved_connections") == str(superuser)
    if version >= 160000:
        assert value(out, "- reserved_connections") == pg.psql("SHOW reserved_connections")
    else:
        assert re.search(r"^  - reserved_connections\s+0  not in this PostgreSQL version$", out, re.M)
    assert value(out, "worst case") == "10"
    slots = 400 - superuser - (int(pg.psql("SHOW reserved_connections")) if version >= 160000 else 0)
    assert value(out, "= slots for non-superusers") == str(slots)
    assert value(out, "left for direct and admin connections") == str(slots - 10 - others(out))


def test_live_counts_the_connections_other_clients_hold(tmp_path, pg, connections):
    path = write(tmp_path, pg)
    before = others(check(path, "--live").stdout)
    for _ in range(3):
        connections()
    assert others(check(path, "--live").stdout) == before + 3


def test_live_does_not_count_pgrelays_own_server_logins(tmp_path, pg, connections):
    """A session with the application_name pgrelay gives its server logins ([databases]) is pgrelay's."""
    path = write(tmp_path, pg, "application_name=pgrelay-budget-test")
    before = check(path, "--live").stdout
    connections(application_name="pgrelay-budget-test")
    after = check(path, "--live").stdout
    assert others(after) == others(before)
    assert "(1 more are pgrelay's own, by application_name)" in after


def test_other_clients_can_take_the_room_left(tmp_path, pg, connections):
    """Given a max_connections that leaves exactly the room other clients use now, nothing is left."""
    path = write(tmp_path, pg)
    connections()
    busy = others(check(path, "--live").stdout)
    assert busy >= 1
    # slots = max - 3 (superuser) = 10 (pgrelay) + busy (others), so nothing is left.
    result = check(path, "--live", "--max-connections", str(13 + busy), "--superuser-reserved", "3",
                   "--reserved", "0")
    assert result.returncode == 2, result.stdout
    assert re.search(r"^  max_connections\s+\d+  given \(--max-connections\)", result.stdout, re.M)
    assert f"with the {busy} connections other clients hold now" in result.stdout
    assert "no room left for direct connections" in result.stdout


def test_live_on_an_unreachable_host_is_exit_status_4(tmp_path, pg):
    path = tmp_path / "dead.ini"
    dead = free_port()
    path.write_text(f"[databases]\nlive = host=127.0.0.1 port={pg.port} user=postgres\n"
                    f"dead = host=127.0.0.1 port={dead} user=postgres\n"
                    "[pgbouncer]\ndefault_pool_size = 5\nserver_connect_timeout = 5\n")
    result = check(str(path), "--live")
    assert result.returncode == 4, result.stdout
    assert f"COULD NOT READ THE SERVER: cannot read the settings of 127.0.0.1:{dead}" in result.stdout
    assert re.search(r"^  max_connections\s+400  read from the server", result.stdout, re.M)  # the other host
    assert "result: COULD NOT READ THE SERVER on 1 of 2 hosts (exit status 4)" in result.stdout


def test_the_relay_never_opens_more_than_the_worst_case_with_a_listening_server(make_relay, pg):
    """A transaction pool of 2 with clients that LISTEN: the check counts 2 + the listening server,
    and the real relay, with both servers busy and listeners on several channels, opens exactly that."""
    import threading

    relay = make_relay({"default_pool_size": 2, "pool_mode": "transaction"},
                       databases={"postgres": f"host=127.0.0.1 port={pg.port} user=postgres"})
    result = check(relay.ini_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert value(result.stdout, "worst case") == "3"
    assert re.search(r"^  pools x \(size \+ reserve \+ listening\)\s+3  1 x 3$", result.stdout, re.M)

    def backends() -> int:
        return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                           "AND pid <> pg_backend_pid() "
                           "AND (application_name = 'pgrelay listening server' OR query LIKE '%budget_probe%')"))

    busy = []
    for _ in range(2):
        conn = psycopg2.connect(relay.dsn())
        conn.autocommit = False
        conn.cursor().execute("SELECT 'budget_probe'")  # each holds a server in an open transaction
        busy.append(conn)
    listeners = []
    for channel in ("a", "b", "a"):
        conn = psycopg2.connect(relay.dsn())
        conn.autocommit = True
        conn.cursor().execute(f"LISTEN budget_{channel}")  # served while both servers are busy
        listeners.append(conn)
    waiter = psycopg2.connect(relay.dsn())
    done = threading.Event()

    def wait_for_a_server() -> None:
        waiter.cursor().execute("SELECT 'budget_probe', pg_sleep(0)")
        done.set()

    thread = threading.Thread(target=wait_for_a_server)
    thread.start()
    assert not done.wait(0.7)  # a third query waits in line: no third pooled server
    assert backends() == 3     # 2 pooled servers + the one listening server
    for conn in busy:
        conn.commit()
    thread.join(10)
    assert done.is_set()
    for conn in busy + listeners + [waiter]:
        conn.close()
