"""Limits that protect PostgreSQL: caps shared across pools, client caps, the reserve pool, reloads."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import psycopg2
import pytest

from ..support import RawClient, connect, query_message, scalar, startup_packet, wait_until
from .test_settings_enforced import ensure_role


def backends(pg, users: tuple[str, ...], datname: str = "postgres") -> int:
    names = ",".join(f"'{u}'" for u in users)
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                       f"AND usename IN ({names}) AND datname = '{datname}'"))


class Sampler:
    """The most backends of `users` ever seen in pg_stat_activity while it runs (every 20 ms)."""

    def __init__(self, pg, users: tuple[str, ...]):
        self.pg, self.users, self.peak, self.stop = pg, users, 0, threading.Event()
        self.conn = psycopg2.connect(pg.dsn())
        self.conn.autocommit = True
        names = ",".join(f"'{u}'" for u in users)
        self.sql = (f"SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                    f"AND usename IN ({names})")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        with self.conn.cursor() as cur:
            while not self.stop.is_set():
                cur.execute(self.sql)
                self.peak = max(self.peak, cur.fetchone()[0])
                time.sleep(0.02)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join(5)
        self.conn.close()
        return self.peak


def holders(relay, count: int, **kw) -> list:
    """`count` clients each inside a transaction: in transaction pooling each holds a server."""
    conns = []
    for _ in range(count):
        conn = connect(relay, **kw)
        conn.autocommit = False
        scalar(conn, "select 1")
        conns.append(conn)
    return conns


def in_thread(fn):
    out = {}

    def run():
        start = time.monotonic()
        try:
            out["value"] = fn()
        except BaseException as exc:  # recorded and asserted on
            out["error"] = exc
        out["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def assert_queued_until_released(relay, pg, holder, users: tuple[str, ...], cap: int, **client) -> None:
    """A new client (`client` connection keywords) waits, not refused, while `holder` keeps the last
    server the cap allows, and is served once the holder's transaction ends; PostgreSQL never sees
    more than `cap` backends of `users`."""
    thread, out = in_thread(lambda: scalar(connect(relay, **client), "select 'queued, not refused'"))
    time.sleep(0.8)
    assert "value" not in out and "error" not in out, f"not queued behind the cap: {out}"
    assert backends(pg, users) == cap
    holder.rollback()  # its idle server is reused or evicted to make room
    thread.join(10)
    assert out.get("value") == "queued, not refused", out
    assert backends(pg, users) <= cap


def test_max_db_connections_is_shared_by_users_ports_and_poolers_and_clients_queue(make_relay, pg):
    for name in ("lim_a", "lim_b"):
        ensure_role(pg, name)
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5", "max_db_connections": "3"},
                       extra_sections="[poolers]\nbig = target=primary default_pool_size=5\n")
    held = holders(relay, 1, user="lim_a") + holders(relay, 1, user="lim_b") + holders(relay, 1, user="lim_a|big")
    # lim_a's server, once idle, is evicted to make room for lim_b's pool
    assert_queued_until_released(relay, pg, held[0], ("lim_a", "lim_b"), 3, user="lim_b")
    for conn in held:
        conn.close()


def test_database_line_cap_wins_over_the_global_one(make_relay, pg):
    ensure_role(pg, "lim_c")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5", "max_db_connections": "4"},
                       databases={"capped": f"host=127.0.0.1 port={pg.port} dbname=postgres max_db_connections=1",
                                  "*": f"host=127.0.0.1 port={pg.port}"})
    other = holders(relay, 2, user="lim_c")  # the * database has the global cap of 4
    held = holders(relay, 1, user="lim_c", dbname="capped")
    assert_queued_until_released(relay, pg, held[0], ("lim_c",), 3, user="lim_c", dbname="capped")
    for conn in held + other:
        conn.close()


def test_max_user_connections_spans_databases(make_relay, pg):
    ensure_role(pg, "lim_u")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5"},
                       databases={"d1": f"host=127.0.0.1 port={pg.port} dbname=postgres",
                                  "d2": f"host=127.0.0.1 port={pg.port} dbname=postgres"},
                       users={"lim_u": "max_user_connections=2"})
    held = holders(relay, 1, user="lim_u", dbname="d1") + holders(relay, 1, user="lim_u", dbname="d2")
    assert_queued_until_released(relay, pg, held[0], ("lim_u",), 2, user="lim_u", dbname="d2")
    for conn in held:
        conn.close()


@pytest.mark.parametrize("setting,where", [
    ("max_db_client_connections", "global"), ("max_db_client_connections", "database"),
    ("max_user_client_connections", "global"), ("max_user_client_connections", "user"),
])
def test_client_caps_refuse_with_pgbouncers_error(make_relay, pg, setting, where):
    ensure_role(pg, "lim_k")
    settings = {"pool_mode": "transaction", setting: "2" if where == "global" else "50"}
    databases = users = None
    if where == "database":
        databases = {"*": f"host=127.0.0.1 port={pg.port} {setting}=2"}
    if where == "user":
        users = {"lim_k": f"{setting}=2"}
    relay = make_relay(settings, databases=databases, users=users)
    clients = [connect(relay, user="lim_k") for _ in range(2)]
    raw = RawClient(relay.port)
    raw.send(startup_packet("lim_k", "postgres"))
    error = raw.read_error()
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "53300", f"client connections exceeded ({setting})")
    clients[0].close()
    wait_until(lambda: _can_log_in(relay, "lim_k"), timeout=5, message="a slot to free up")
    clients[1].close()


def _can_log_in(relay, user) -> bool:
    try:
        conn = connect(relay, user=user)
    except psycopg2.OperationalError:
        return False
    conn.close()
    return True


def test_reserve_pool_opens_after_reserve_pool_timeout_and_shrinks_back(make_relay, pg):
    ensure_role(pg, "lim_r")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "20", "reserve_pool_size": "5",
                        "reserve_pool_timeout": "1", "query_wait_timeout": "0"})
    held = holders(relay, 20, user="lim_r")
    assert backends(pg, ("lim_r",)) == 20
    waiters = [in_thread(lambda: scalar(connect(relay, user="lim_r"), "select pg_sleep(1.5) is not null"))
               for _ in range(7)]
    time.sleep(0.6)
    assert backends(pg, ("lim_r",)) == 20, "the reserve opened before reserve_pool_timeout"
    wait_until(lambda: backends(pg, ("lim_r",)) == 25, timeout=3, message="the 5 reserve servers")
    time.sleep(0.3)
    assert backends(pg, ("lim_r",)) == 25  # never past size + reserve
    for thread, out in waiters:
        thread.join(15)
        assert out.get("value") is True, out
        assert out["elapsed"] >= 0.9
    for conn in held:
        conn.rollback()  # all 25 idle now
    wait_until(lambda: backends(pg, ("lim_r",)) == 20, timeout=4, message="the reserve to shrink back")
    time.sleep(1.2)
    assert backends(pg, ("lim_r",)) == 20  # never below the pool size
    for conn in held:
        conn.close()


def test_reload_lowering_the_pool_size_closes_idle_servers_never_busy_ones(make_relay, pg):
    ensure_role(pg, "lim_l")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5"})
    held = holders(relay, 5, user="lim_l")
    for conn in held[3:]:
        conn.rollback()  # two idle, three busy
    relay.settings["default_pool_size"] = "2"
    relay.write_ini()
    relay.reload()
    wait_until(lambda: backends(pg, ("lim_l",)) == 3, timeout=3, message="the idle servers to close")
    for conn in held[:3]:
        assert scalar(conn, "select 'still in my transaction'") == "still in my transaction"
        conn.rollback()
    wait_until(lambda: backends(pg, ("lim_l",)) == 2, timeout=3, message="the pool to shrink to its new size")
    for conn in held:
        conn.close()


@pytest.mark.parametrize("line,error", [
    ("max_db_connections = -1", "max_db_connections: -1 is below the minimum 0"),
    ("max_user_connections = lots", "max_user_connections: invalid integer 'lots'"),
    ("reserve_pool_size = 1e9", "reserve_pool_size: invalid integer '1e9'"),
])
def test_bad_limits_name_file_line_and_setting(tmp_path, line, error):
    ini = tmp_path / "bad.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 6999\n{line}\n")
    result = subprocess.run(["python", "-m", "pgrelay", str(ini)], capture_output=True, text=True, timeout=30,
                            env={k: v for k, v in os.environ.items() if not k.startswith("PGRELAY_")})
    assert result.returncode != 0
    assert f"{ini}:5: {error}" in result.stderr, result.stderr


def test_bad_limit_on_reload_is_refused_and_the_old_one_kept(make_relay, pg):
    ensure_role(pg, "lim_b2")
    relay = make_relay({"pool_mode": "transaction", "max_db_connections": "1"})
    relay.settings["max_db_connections"] = "-5"
    relay.write_ini()
    relay.reload(wait_for="config reload failed")
    assert "max_db_connections: -5 is below the minimum 0" in relay.log()
    held = holders(relay, 1, user="lim_b2")
    waiter, out = in_thread(lambda: scalar(connect(relay, user="lim_b2"), "select 1"))
    time.sleep(0.8)
    assert "value" not in out, "the old cap of 1 was lost"
    held[0].close()
    waiter.join(10)
    assert out.get("value") == 1


@pytest.mark.timeout(240)
def test_thundering_herd_never_exceeds_max_db_connections(make_relay, pg, tmp_path):
    """2,000 clients at once on one database: two users on the local pooler and a dedicated pooler,
    default_pool_size=20 each, max_db_connections=30. PostgreSQL never sees more than 30 of them and
    every client finishes every transaction."""
    for name in ("herd_a", "herd_b"):
        ensure_role(pg, name)
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "20", "max_db_connections": "30",
                        "max_client_conn": "3000", "query_wait_timeout": "120"},
                       extra_sections="[poolers]\nherd = target=primary default_pool_size=20 max_client_conn=1000\n")
    script = tmp_path / "herd.sql"
    script.write_text("BEGIN;\nSELECT 1;\nSELECT pg_sleep(0.002);\nEND;\n")
    pgbench = os.path.join(pg.bindir, "pgbench") if os.path.exists(os.path.join(pg.bindir, "pgbench")) else "pgbench"
    sampler = Sampler(pg, ("herd_a", "herd_b"))
    procs = [subprocess.Popen([pgbench, "-n", "-h", "127.0.0.1", "-p", str(relay.port), "-U", user, "-c", str(n),
                               "-j", "2", "-t", "3", "-f", str(script), "postgres"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for user, n in (("herd_a", 700), ("herd_b", 650), ("herd_a|herd", 650))]
    outputs = [p.communicate(timeout=200) for p in procs]
    peak = sampler.finish()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-2000:]
        assert "number of failed transactions: 0" in out, out
    processed = sum(int(line.split(":")[1].split("/")[0]) for out, _ in outputs for line in out.splitlines()
                    if line.startswith("number of transactions actually processed"))
    assert processed == 3 * 2000
    assert 0 < peak <= 30, f"PostgreSQL saw {peak} connections from pgrelay with max_db_connections=30"


def _served_after(relay, seconds_at_least: float, **kw) -> None:
    """A client queued behind a full pool is served, not before `seconds_at_least`."""
    thread, out = in_thread(lambda: scalar(connect(relay, **kw), "select 'served'"))
    thread.join(10)
    assert out.get("value") == "served", out
    assert out["elapsed"] >= seconds_at_least, out["elapsed"]


@pytest.mark.parametrize("where", ["databases", "databases-old-name", "users", "clusters"])
def test_reserve_pool_size_per_line(make_relay, pg, where):
    """pool_size 1, a reserve of 1 on the line (none globally): a second client gets the reserve
    server after reserve_pool_timeout while the first holds the only regular one."""
    ensure_role(pg, "lim_rl")
    target = f"host=127.0.0.1 port={pg.port}"
    key = "reserve_pool" if where == "databases-old-name" else "reserve_pool_size"
    databases = {"*": target + (f" {key}=1" if where.startswith("databases") else "")}
    users = {"lim_rl": "reserve_pool_size=1"} if where == "users" else None
    extra = f"[clusters]\nrc = {target} reserve_pool_size=1\n" if where == "clusters" else ""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "reserve_pool_timeout": "0.5",
                        "cluster_usernames": "1"}, databases=databases, users=users, extra_sections=extra)
    user = "lim_rl.rc" if where == "clusters" else "lim_rl"
    held = holders(relay, 1, user=user)
    _served_after(relay, 0.4, user=user)
    held[0].close()


def test_max_db_connections_on_a_cluster_line(make_relay, pg):
    ensure_role(pg, "lim_cl")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5", "cluster_usernames": "1"},
                       extra_sections=f"[clusters]\ncc = host=127.0.0.1 port={pg.port} max_db_connections=1\n")
    held = holders(relay, 1, user="lim_cl.cc")
    assert_queued_until_released(relay, pg, held[0], ("lim_cl",), 1, user="lim_cl.cc")
    held[0].close()


@pytest.mark.parametrize("where", ["global", "cluster"])
def test_max_db_client_connections_elsewhere(make_relay, pg, where):
    ensure_role(pg, "lim_dc")
    extra = f"[clusters]\ndc = host=127.0.0.1 port={pg.port} max_db_client_connections=1\n"
    settings = {"pool_mode": "transaction", "cluster_usernames": "1"}
    if where == "global":
        settings["max_db_client_connections"] = "1"
    relay = make_relay(settings, extra_sections=extra)
    user = "lim_dc.dc" if where == "cluster" else "lim_dc"
    first_client = connect(relay, user=user)
    raw = RawClient(relay.port)
    raw.send(startup_packet(user, "postgres"))
    assert raw.read_error()["M"] == "client connections exceeded (max_db_client_connections)"
    first_client.close()


def test_global_max_user_connections(make_relay, pg):
    ensure_role(pg, "lim_gu")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "5", "max_user_connections": "1"},
                       databases={"e1": f"host=127.0.0.1 port={pg.port} dbname=postgres",
                                  "e2": f"host=127.0.0.1 port={pg.port} dbname=postgres"})
    held = holders(relay, 1, user="lim_gu", dbname="e1")
    assert_queued_until_released(relay, pg, held[0], ("lim_gu",), 1, user="lim_gu", dbname="e2")
    held[0].close()


def test_query_wait_timeout_says_what_to_change(make_relay, pg):
    ensure_role(pg, "lim_h")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "query_wait_timeout": "1"})
    held = holders(relay, 1, user="lim_h")
    raw = RawClient(relay.port)
    raw.login(user="lim_h")
    raw.send(query_message("select 1"))
    raw.sock.settimeout(5)
    error = raw.read_error()
    assert (error["S"], error["C"], error["M"]) == ("FATAL", "57014", "query_wait_timeout")
    assert "postgres/lim_h: 1 of 1 servers open, 1 busy, 1 clients waiting" in error["H"], error["H"]
    assert "default_pool_size" in error["H"] and "max_db_connections" in error["H"]
    held[0].close()


def test_postgresql_max_connections_full_gets_a_hint(make_relay, tmp_path):
    """PostgreSQL's own 'sorry, too many clients already' during a server login reaches the client
    with its SQLSTATE and a hint that pgrelay holds the connections and `pgrelay check` sizes them."""
    from pgrelay.tempdb import TempPostgres

    small = TempPostgres(settings={"max_connections": "4", "superuser_reserved_connections": "1"}).start()
    try:
        ensure_role(small, "lim_full")
        relay = make_relay({"pool_mode": "transaction", "default_pool_size": "10", "server_login_retry": "1"},
                           databases={"*": f"host=127.0.0.1 port={small.port}"})
        held = holders(relay, 3, user="lim_full")  # every non-reserved slot
        extra = connect(relay, user="lim_full")
        with pytest.raises(psycopg2.Error) as exc:
            scalar(extra, "select 1")
        assert exc.value.pgcode == "53300", exc.value.pgerror
        assert "pgrelay holds 3 server connections to this host" in exc.value.pgerror
        assert "pgrelay check" in exc.value.pgerror
        for conn in held + [extra]:
            conn.close()
    finally:
        small.cleanup()
