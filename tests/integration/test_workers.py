"""workers = N: processes sharing the listeners, limits held pgrelay-wide, cancels across workers, a console for all, restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from tests.support import connect, query_running, scalar, wait_until

MANY_CANCELS = int(os.environ.get("PGRELAY_TEST_WORKER_CANCELS", "40"))


def workers_relay(make_relay, **settings):
    base = {"workers": "2", "admin_users": "postgres"}
    base.update({k: str(v) for k, v in settings.items()})
    relay = make_relay(base)
    wait_until(lambda: "2 workers" in relay.log(), timeout=20, message="both workers up")
    return relay


def admin(relay):
    return connect(relay, dbname="pgbouncer")


def show(conn, what):
    with conn.cursor() as cur:
        cur.execute(f"SHOW {what}")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def spread_clients(relay, count, **kw):
    """`count` connections, each given by the kernel to one worker or the other; checked to have
    reached both (else the test would not show anything pgrelay-wide)."""
    conns = [connect(relay, **kw) for _ in range(count)]
    console = admin(relay)
    try:
        per_worker = {w["worker"]: w["clients"] for w in show(console, "WORKERS")}
    finally:
        console.close()
    assert len(per_worker) == 2 and min(per_worker.values()) >= 2, f"clients by worker: {per_worker}"
    return conns


def backends(pg, marker):
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (marker,))
            return cur.fetchone()[0]
    finally:
        conn.close()


def test_workers_serve_clients_and_the_console_shows_all_of_them(make_relay, pg):
    relay = workers_relay(make_relay)
    console = admin(relay)
    workers = show(console, "WORKERS")
    assert [w["worker"] for w in workers] == [0, 1]
    assert len({w["pid"] for w in workers}) == 2 and relay.proc.pid not in {w["pid"] for w in workers}
    conns = spread_clients(relay, 30)
    for conn in conns:
        assert scalar(conn, "SELECT 41 + 1") == 42
    wait_until(lambda: len(show(console, "CLIENTS")) == 31, timeout=5, message="the checking console gone")
    clients = show(console, "CLIENTS")
    assert len(clients) == 31  # the 30 and the console itself, from both workers
    assert {c["worker"] for c in clients} <= {0, 1}
    assert len({c["id"] for c in clients}) == 31, "client ids are unique pgrelay-wide"
    per_worker = {w["worker"]: w["clients"] for w in show(console, "WORKERS")}
    assert sum(per_worker.values()) == 31
    pools = [p for p in show(console, "POOLS") if p["database"] == "postgres"]
    assert len(pools) == 1, "one row per pool, added up over the workers"
    assert pools[0]["cl_active"] + pools[0]["cl_waiting"] == 30
    totals = {row["database"]: row for row in show(console, "STATS_TOTALS")}
    assert totals["postgres"]["query_count"] >= 30
    for conn in conns:
        conn.close()


def test_pool_size_and_max_db_connections_hold_for_all_workers(make_relay, pg):
    relay = workers_relay(make_relay, default_pool_size=4, max_db_connections=5, application_name_add_host=0)
    marker = "workers_cap"
    errors, peak, stop = [], [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], backends(pg, marker))
            time.sleep(0.02)

    def client(n):
        try:
            conn = connect(relay, application_name=marker)
            for _ in range(5):
                assert scalar(conn, "SELECT %s FROM pg_sleep(0.02)", (n,)) == n
            conn.close()
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    sampler = threading.Thread(target=sample)
    sampler.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sampler.join()
    assert not errors, errors[:3]
    assert 1 <= peak[0] <= 4, f"pool of 4 across 2 workers had {peak[0]} servers"
    console = admin(relay)
    servers = show(console, "SERVERS")
    assert len([s for s in servers if s["database"] == "postgres"]) <= 4


def _workers_of(console, conns):
    """The worker serving each of `conns` (psycopg2 connections over TCP), by SHOW CLIENTS' port."""
    import socket
    by_port = {c["port"]: c["worker"] for c in show(console, "CLIENTS")}
    ports = []
    for conn in conns:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        try:
            ports.append(sock.getsockname()[1])
        finally:
            sock.close()
    return [by_port[port] for port in ports]


def test_new_connections_go_to_the_less_busy_worker(make_relay):
    """Both workers accept from one socket; the busier one (by ACCEPT_SPREAD clients) is held back."""
    relay = workers_relay(make_relay)
    console = admin(relay)
    conns = [connect(relay) for _ in range(20)]
    workers = _workers_of(console, conns)
    assert abs(workers.count(0) - workers.count(1)) <= 3, f"20 connections went {workers.count(0)}/{workers.count(1)}"
    for conn, worker in zip(conns, workers):
        if worker == 1:
            conn.close()
    kept = [conn for conn, worker in zip(conns, workers) if worker == 0]
    wait_until(lambda: {w["worker"]: w["clients"] for w in show(console, "WORKERS")}[1] <= 1, timeout=5,
               message="worker 1's clients gone")
    fresh = [connect(relay) for _ in range(12)]
    went = _workers_of(console, fresh)
    assert went.count(0) <= 3, f"worker 0 had {len(kept)} clients and worker 1 none, yet 0 took {went.count(0)} of 12"
    for conn in kept + fresh:
        assert scalar(conn, "SELECT 1") == 1
        conn.close()


def test_a_busy_pool_is_split_between_workers_without_trading_servers(make_relay, pg):
    """Clients of both workers keep one pool of 10 busy: each worker ends with about half of it, and
    once split, no worker gives a server up for the other (no churn of server logins)."""
    relay = workers_relay(make_relay, default_pool_size=10, application_name_add_host=0)
    marker = "workers_split"
    conns = spread_clients(relay, 30, application_name=marker)
    stop, errors = threading.Event(), []

    def client(conn):
        try:
            while not stop.is_set():
                scalar(conn, "SELECT pg_sleep(0.01)")
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    def backend_pids():
        direct = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
        try:
            with direct.cursor() as cur:
                cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (marker,))
                return {row[0] for row in cur.fetchall()}
        finally:
            direct.close()

    threads = [threading.Thread(target=client, args=(conn,)) for conn in conns]
    for t in threads:
        t.start()
    try:
        console = admin(relay)
        wait_until(lambda: sorted(w["servers"] for w in show(console, "WORKERS")) in ([5, 5], [4, 6]),
                   timeout=15, message="the pool of 10 split between the workers")
        seen = backend_pids()
        time.sleep(3)
        seen_later = backend_pids()
        split = sorted(w["servers"] for w in show(console, "WORKERS"))
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors, errors[:3]
    assert split in ([5, 5], [4, 6]), f"servers by worker after 3 s: {split}"
    assert len(seen_later - seen) <= 1, f"{len(seen_later - seen)} new server connections in 3 s of steady load"
    assert len(seen_later) <= 10


def test_max_client_conn_counts_clients_of_every_worker(make_relay):
    relay = workers_relay(make_relay, max_client_conn=12)
    conns = [connect(relay) for _ in range(12)]
    with pytest.raises(psycopg2.OperationalError, match=r"no more connections allowed \(max_client_conn\)") as refused:
        connect(relay)
    assert "max_client_conn is 12 and 12 clients are connected" in str(refused.value), "the pgrelay-wide count"
    conns.pop().close()
    wait_until(lambda: _can_connect(relay), timeout=10, message="a slot given back")
    for conn in conns:
        conn.close()


def _can_connect(relay):
    try:
        conn = connect(relay)
    except psycopg2.OperationalError:
        return False
    conn.close()
    return True


def test_cancel_reaching_another_worker_cancels_the_right_query(make_relay, pg):
    relay = workers_relay(make_relay, default_pool_size=20)
    console = admin(relay)
    cancelled, wrong = 0, []
    bystander = connect(relay)
    result = {}

    def bystand():
        try:
            result["value"] = scalar(bystander, "SELECT count(*) FROM pg_sleep(3)")
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
    spread = set()
    for round_ in range(MANY_CANCELS):
        if round_ == MANY_CANCELS // 2:
            guard = threading.Thread(target=bystand)
            guard.start()
        conn = connect(relay, application_name=f"victim{round_}")
        worker = next(c["worker"] for c in show(console, "CLIENTS") if c["application_name"] == f"victim{round_}")
        spread.add(worker)
        errors = []

        def run():
            try:
                scalar(conn, f"SELECT pg_sleep(30), 'victim{round_}'")
            except psycopg2.errors.QueryCanceled:
                errors.append("cancelled")
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
        t = threading.Thread(target=run)
        t.start()
        wait_until(lambda: query_running(pg, f"victim{round_}'"), timeout=10, message="query running")
        conn.cancel()  # a new connection: the kernel gives it to either worker
        t.join(10)
        if errors == ["cancelled"]:
            cancelled += 1
        else:
            wrong.append(errors)
        conn.close()
    guard.join(10)
    assert cancelled == MANY_CANCELS, wrong[:3]
    assert result.get("value") == 1, f"the bystander's query was hit: {result}"
    assert spread == {0, 1}, "victims on both workers"


def test_a_sigkilled_worker_is_restarted_and_its_counts_given_back(make_relay, pg):
    """SIGKILL of one worker under load: its clients get an error, the other worker's clients see
    nothing, the parent starts it again, and what it held (clients under max_client_conn, servers
    under the pool size) counts no more."""
    relay = workers_relay(make_relay, max_client_conn=20, default_pool_size=4)
    console = admin(relay)
    conns = []
    while True:  # fill max_client_conn (does the console count? either way, up to the refusal)
        try:
            conns.append(connect(relay, application_name=f"c{len(conns)}"))
        except psycopg2.OperationalError as exc:
            assert "max_client_conn" in str(exc)
            break
    assert len(conns) in (19, 20)
    clients = show(console, "CLIENTS")
    console_worker = next(c["worker"] for c in clients if c["database"] == "pgbouncer")
    victim = next(w for w in show(console, "WORKERS") if w["worker"] != console_worker)
    on_victim = {c["application_name"] for c in clients if c["worker"] == victim["worker"]}
    assert on_victim and len(on_victim) < len(conns), f"clients on both workers: {len(on_victim)} of {len(conns)}"
    victims = [conn for n, conn in enumerate(conns) if f"c{n}" in on_victim]
    others = [conn for n, conn in enumerate(conns) if f"c{n}" not in on_victim]
    _concurrently(victims[:4] + others[:4], "SELECT pg_sleep(0.2)")  # servers opened by both workers, held idle

    def victim_servers():
        return {w["worker"]: w["servers"] for w in show(console, "WORKERS")}[victim["worker"]]
    for _ in range(5):
        # Under contention the last shed may have left all four with the other worker: a query of
        # a victim's client alone makes room for one (the other worker's are idle) and keeps it.
        if victim_servers():
            break
        assert scalar(victims[0], "SELECT 1") == 1
    assert victim_servers() >= 1
    # Load: every client queries in a loop while the victim is killed.
    stop, outcome = threading.Event(), {}

    def load(n, conn):
        done = 0
        try:
            while not stop.is_set():
                assert scalar(conn, "SELECT %s", (n,)) == n
                done += 1
            outcome[n] = ("ok", done)
        except psycopg2.Error as exc:
            outcome[n] = ("error", str(exc).strip().splitlines()[0])
    threads = [threading.Thread(target=load, args=(n, conn)) for n, conn in enumerate(conns)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(10)
    for n in range(len(conns)):
        if f"c{n}" in on_victim:
            assert outcome[n][0] == "error", f"c{n} was on the killed worker: {outcome[n]}"
        else:
            assert outcome[n][0] == "ok" and outcome[n][1] > 0, f"c{n} was on the other worker: {outcome[n]}"
    wait_until(lambda: len(show(console, "WORKERS")) == 2 and victim["pid"] not in
               {w["pid"] for w in show(console, "WORKERS")}, timeout=20, message="the worker restarted")
    assert f"worker {victim['worker']} (pid {victim['pid']}) exited with signal 9" in relay.log()
    # The dead worker's clients no longer count: as many new ones fit as were lost, and no more.
    survivors = [conn for n, conn in enumerate(conns) if f"c{n}" not in on_victim]
    fresh = [connect(relay) for _ in range(len(on_victim))]
    with pytest.raises(psycopg2.OperationalError, match="max_client_conn"):
        connect(relay)
    # Nor its servers: the pool reaches its size of 4 again, and not more.
    peak = _concurrently(survivors[:4] + fresh[:4], "SELECT pg_sleep(0.5), 'killcheck'", pg=pg, marker="killcheck")
    assert peak == 4, f"pool of 4 after the kill had {peak} servers busy at most"
    for conn in fresh + conns:
        conn.close()
    relay.expected_bugs = ("exited with signal 9",)


def _concurrently(conns, sql, pg=None, marker=None):
    """Run `sql` on each connection at once; with `marker`, the most backends of `pg` seen running it."""
    errors, peak, stop = [], [0], threading.Event()

    def run(conn):
        try:
            scalar(conn, sql)
        except psycopg2.Error as exc:
            errors.append(exc)

    def sample():
        while not stop.is_set():
            probe = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
            with probe.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s "
                            "AND pid <> pg_backend_pid()", (f"%'{marker}'%",))
                peak[0] = max(peak[0], cur.fetchone()[0])
            probe.close()
            time.sleep(0.02)
    sampler = threading.Thread(target=sample) if marker else None
    if sampler:
        sampler.start()
    threads = [threading.Thread(target=run, args=(conn,)) for conn in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stop.set()
    if sampler:
        sampler.join()
    assert not errors, errors[:3]
    return peak[0]


def test_pause_resume_and_reload_reach_every_worker(make_relay):
    relay = workers_relay(make_relay)
    console = admin(relay)
    conns = spread_clients(relay, 10)
    with console.cursor() as cur:
        cur.execute("PAUSE postgres")
    rows = {r["name"]: r for r in show(console, "DATABASES")}
    assert rows["postgres"]["paused"] == 1
    with console.cursor() as cur:
        cur.execute("RESUME postgres")
    rows = {r["name"]: r for r in show(console, "DATABASES")}
    assert rows["postgres"]["paused"] == 0
    for conn in conns:
        assert scalar(conn, "SELECT 1") == 1
    before = relay.log().count("got SIGHUP, re-reading config")
    relay.send_signal(signal.SIGHUP)
    wait_until(lambda: relay.log().count("got SIGHUP, re-reading config") >= before + 2, timeout=15,
               message="both workers reloaded")
    with console.cursor() as cur:
        cur.execute("SET default_pool_size = 7")
    assert {r["key"]: r["value"] for r in show(console, "CONFIG")}["default_pool_size"] == "7"
    for conn in conns:
        conn.close()


def test_sigterm_stops_every_worker_and_the_parent(make_relay):
    relay = workers_relay(make_relay)
    pids = [w["pid"] for w in show(admin(relay), "WORKERS")]
    socket_path = os.path.join(relay.workdir, f".s.PGSQL.{relay.port}")
    assert os.path.exists(socket_path)
    assert relay.stop(signal.SIGTERM) == 0
    for pid in pids:
        wait_until(lambda: not _alive(pid), timeout=10, message=f"worker {pid} gone")
    assert not os.path.exists(socket_path)
    assert "shutdown complete" in relay.log()


def test_shutdown_on_the_console_stops_pgrelay(make_relay):
    relay = workers_relay(make_relay)
    console = admin(relay)
    with console.cursor() as cur:
        cur.execute("SHUTDOWN")
    wait_until(lambda: not relay.alive(), timeout=15, message="pgrelay stopped")
    assert relay.proc.returncode == 0


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("value, message", [("0", "out of range"), ("65", "out of range"),
                                             ("lots", "expected a number of processes or auto")])
def test_bad_workers_values_are_refused(tmp_path, value, message):
    ini = tmp_path / "bad.ini"
    ini.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 1\nworkers = {value}\n")
    out = subprocess.run([sys.executable, "-m", "pgrelay", str(ini)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "workers" in out.stderr and message in out.stderr


def test_workers_auto_is_one_per_core(tmp_path):
    from pgrelay.settings import Workers
    assert Workers().parse("auto") == len(os.sched_getaffinity(0))


def test_metrics_add_up_every_worker(make_relay):
    import urllib.request
    from tests.support import free_port
    port = free_port()
    relay = workers_relay(make_relay, metrics_listen=f"127.0.0.1:{port}", max_client_conn=500)
    console = admin(relay)
    conns = spread_clients(relay, 24)
    for conn in conns:
        assert scalar(conn, "SELECT 1") == 1
    per_worker = {w["worker"]: w["clients"] for w in show(console, "WORKERS")}
    assert sum(per_worker.values()) == 25 and min(per_worker.values()) >= 2

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            return response.read().decode()

    def sample(text, name):
        return [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
                or line.startswith(name + "{")]
    text = scrape()
    assert sample(text, "pgrelay_used_clients") == [25.0]
    assert sample(text, "pgrelay_config_max_client_connections") == [500.0], "a setting is not added up"
    assert sample(text, "pgrelay_up") == [1.0]
    assert text.count("# TYPE pgrelay_used_clients ") == 1
    for conn in conns:
        conn.close()
    wait_until(lambda: sample(scrape(), "pgrelay_used_clients") == [1.0], timeout=10, message="clients gone")


def test_systemd_hears_the_parent_only(make_relay, tmp_path):
    """Under systemd (NOTIFY_SOCKET): READY=1 once both workers are up, from the parent (MAINPID);
    SIGHUP to the parent gives RELOADING=1 then READY=1 after every worker reloaded; STOPPING=1 on
    SIGTERM. The workers themselves send nothing."""
    from tests.integration.test_systemd import NotifyReceiver
    receiver = NotifyReceiver(str(tmp_path / "notify.sock"))
    try:
        relay = make_relay({"workers": "2", "admin_users": "postgres"},
                           env={"NOTIFY_SOCKET": receiver.address})
        ready = receiver.wait_for("READY", "1")
        assert "2 workers" in relay.log()
        assert receiver.poll()[ready]["MAINPID"] == str(relay.proc.pid)
        relay.send_signal(signal.SIGHUP)
        reloading = receiver.wait_for("RELOADING", "1", after=ready)
        receiver.wait_for("READY", "1", after=reloading)
        assert relay.log().count("got SIGHUP, re-reading config") == 2, "each worker reloaded once"
        assert relay.stop(signal.SIGTERM) == 0
        receiver.wait_for("STOPPING", "1", after=reloading)
        states = [(key, fields[key]) for fields in receiver.poll() for key in ("READY", "RELOADING", "STOPPING")
                  if key in fields]
        assert states == [("READY", "1"), ("RELOADING", "1"), ("READY", "1"), ("STOPPING", "1")]
    finally:
        receiver.close()


def test_socket_activated_workers(tmp_path, pg):
    """systemd-socket-activate passes the TCP socket to the parent, which hands it to both workers."""
    from tests.integration.test_systemd import psql, socket_activate
    from tests.support import RelayProcess, free_port, stop_relays
    port = free_port()
    relay = RelayProcess(str(tmp_path), pg, {"listen_port": port, "workers": 2, "admin_users": "postgres"})
    relay.write_ini()
    relay._logf = open(relay.log_path, "ab")
    relay.proc = subprocess.Popen(socket_activate(f"127.0.0.1:{port}") + [relay.ini_path], stdout=relay._logf,
                                  stderr=subprocess.STDOUT)
    try:
        assert psql("127.0.0.1", port, "SELECT 'activated'") == "activated"
        log = wait_until(lambda: "2 workers" in relay.log() and relay.log(), message="workers up")
        assert f"listening on 127.0.0.1:{port} (main: pooled; passed by the service manager as fd 3)" in log
        assert log.count(f"listening on 127.0.0.1:{port} (main: pooled; passed by the workers' parent") == 2
        spread_clients(relay, 20)
    finally:
        stop_relays([relay])
