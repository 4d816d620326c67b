"""The admin console's SHOW commands against a real relay: PgBouncer 1.26's columns (names, order, types,
as exporters read them by name) and the values that matter."""

import struct
import subprocess
import sys
import threading
import time

import psycopg2
import pytest

from tests.support import RawClient, connect, data_rows, wait_until

# Type oids as PgBouncer's pktbuf_write_RowDescription sends them: 's' and 'T' (timestamps) text,
# 'i' int4, 'q' int8, 'N' numeric.
TEXT, INT4, INT8, NUMERIC = 25, 23, 20, 1700


def cols(spec: str, names: str):
    types = {"s": TEXT, "T": TEXT, "i": INT4, "q": INT8, "N": NUMERIC}
    names = names.split()
    assert len(spec) == len(names)
    return [(name, types[t]) for t, name in zip(spec, names)]


SOCKET = ("type user database replication state addr port local_addr local_port connect_time request_time "
          "wait wait_us close_needed ptr link remote_pid tls application_name prepared_statements id")
STATS_TOTALS = ("server_assignment_count xact_count query_count bytes_received bytes_sent xact_time query_time "
                "wait_time client_parse_count server_parse_count bind_count")
# The reference: PgBouncer 1.26 src/admin.c and src/stats.c (RowDescription format strings), doc/usage.md.
REFERENCE = {
    "SHOW DATABASES": cols("ssissiiiissiiiiii",
                           "name host port database force_user pool_size min_pool_size reserve_pool_size "
                           "server_lifetime pool_mode load_balance_hosts max_connections current_connections "
                           "max_client_connections current_client_connections paused disabled"),
    "SHOW POOLS": cols("ssiiiiiiiiiiiiiss",
                       "database user cl_active cl_waiting cl_active_cancel_req cl_waiting_cancel_req sv_active "
                       "sv_active_cancel sv_being_canceled sv_idle sv_used sv_tested sv_login maxwait maxwait_us "
                       "pool_mode load_balance_hosts"),
    "SHOW CLIENTS": cols("ssssssisiTTiiississii", SOCKET),
    "SHOW SERVERS": cols("ssssssisiTTiiississii", SOCKET),
    "SHOW SOCKETS": cols("ssssssisiTTiiississiiiiiiiii",
                         SOCKET + " recv_pos pkt_pos pkt_remain send_pos send_remain pkt_avail send_avail"),
    "SHOW ACTIVE_SOCKETS": cols("ssssssisiTTiiississiiiiiiiii",
                                SOCKET + " recv_pos pkt_pos pkt_remain send_pos send_remain pkt_avail send_avail"),
    "SHOW USERS": cols("ssssiiii", "name pool_size reserve_pool_size pool_mode max_user_connections "
                                   "current_connections max_user_client_connections current_client_connections"),
    "SHOW STATS": cols("s" + "N" * 22,
                       "database total_server_assignment_count total_xact_count total_query_count total_received "
                       "total_sent total_xact_time total_query_time total_wait_time total_client_parse_count "
                       "total_server_parse_count total_bind_count avg_server_assignment_count avg_xact_count "
                       "avg_query_count avg_recv avg_sent avg_xact_time avg_query_time avg_wait_time "
                       "avg_client_parse_count avg_server_parse_count avg_bind_count"),
    "SHOW STATS_TOTALS": cols("s" + "N" * 11, "database " + STATS_TOTALS),
    "SHOW STATS_AVERAGES": cols("s" + "N" * 11,
                                "database server_assignment_count xact_count query_count bytes_received bytes_sent "
                                "xact_time query_time wait_time avg_client_parse_count avg_server_parse_count "
                                "avg_bind_count"),
    "SHOW TOTALS": cols("sN", "name value"),
    "SHOW LISTS": cols("si", "list items"),
    "SHOW MEM": cols("siiii", "name size used free memtotal"),
    "SHOW STATE": cols("ss", "key value"),
    "SHOW CONFIG": cols("ssss", "key value default changeable"),
    "SHOW VERSION": cols("s", "version"),
    "SHOW DNS_HOSTS": cols("sqs", "hostname ttl addrs"),
    "SHOW DNS_ZONES": cols("sqi", "zonename serial count"),
    "SHOW PEERS": cols("isii", "peer_id host port pool_size"),
    "SHOW PEER_POOLS": cols("iiiii", "peer_id cl_active_cancel_req cl_waiting_cancel_req sv_active_cancel sv_login"),
}
LISTS = ["databases", "users", "peers", "pools", "peer_pools", "free_clients", "used_clients", "login_clients",
         "free_servers", "used_servers", "dns_names", "dns_zones", "dns_queries", "dns_pending"]
TOTALS = ["server_assignment_count", "xact_count", "query_count", "client_bytes", "server_bytes", "xact_time",
          "query_time", "wait_time", "ps_client_parse_count", "ps_server_parse_count", "ps_bind_count"]


def row_description(msgs):
    """(name, type oid) of each column of the RowDescription in `msgs`."""
    body = next(body for kind, body in msgs if kind == b"T")
    count = struct.unpack("!h", body[:2])[0]
    out, pos = [], 2
    for _ in range(count):
        end = body.index(b"\0", pos)
        name = body[pos:end].decode()
        oid = struct.unpack("!I", body[end + 7:end + 11])[0]
        out.append((name, oid))
        pos = end + 19
    return out


def console(relay, user="postgres"):
    client = RawClient(relay.port)
    client.login(user=user, database="pgbouncer")
    return client


@pytest.fixture
def admin_relay(make_relay):
    return make_relay({"admin_users": "postgres", "stats_period": "1"})


def dict_rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_every_show_has_pgbouncers_columns_and_types(admin_relay):
    """Each SHOW's RowDescription: PgBouncer's names, order and type oids; and psycopg2 reads them."""
    app = connect(admin_relay)  # some pools, clients and servers, so the rows are not empty
    app.cursor().execute("SELECT 1")
    raw = console(admin_relay)
    conn = connect(admin_relay, dbname="pgbouncer")
    try:
        for command, expected in REFERENCE.items():
            msgs = raw.query(command)
            assert not [m for m in msgs if m[0] == b"E"], (command, msgs)
            assert row_description(msgs) == expected, command
            assert msgs[-2][0] == b"C" and msgs[-2][1] == b"SHOW\0", command
            with conn.cursor() as cur:
                cur.execute(command)
                assert [d[0] for d in cur.description] == [name for name, _ in expected], command
                for row in cur.fetchall():
                    assert len(row) == len(expected), command
        assert [r[0] for r in data_rows(raw.query("SHOW LISTS"))] == LISTS
        assert [r[0] for r in data_rows(raw.query("SHOW TOTALS"))] == \
            [f"total_{n}" for n in TOTALS] + [f"avg_{n}" for n in TOTALS]
        state = dict(data_rows(raw.query("SHOW STATE")))
        assert state == {"active": "yes", "paused": "no", "suspended": "no"}
    finally:
        raw.close()
        conn.close()
        app.close()


def test_show_pools_counts_clients_and_servers_under_load(make_relay, pg):
    """cl_active, cl_waiting, sv_active, sv_idle while clients hold and wait for the pool's servers."""
    relay = make_relay({"admin_users": "postgres", "default_pool_size": "2", "pool_mode": "session"})
    admin = connect(relay, dbname="pgbouncer")
    holders = [connect(relay) for _ in range(2)]
    for conn in holders:
        conn.cursor().execute("SELECT 1")  # session mode: each holds a server now
    waiters, done = [], []

    def wait_for_server():
        conn = psycopg2.connect(relay.dsn(), connect_timeout=10)
        conn.autocommit = True
        waiters.append(conn)
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
        done.append(conn)

    threads = [threading.Thread(target=wait_for_server) for _ in range(2)]
    for thread in threads:
        thread.start()

    def pool():
        rows = [r for r in dict_rows(admin, "SHOW POOLS") if r["database"] == "postgres"]
        return rows[0] if rows else None

    row = wait_until(lambda: (p := pool()) and p["cl_waiting"] == 2 and p, message="two waiting clients")
    assert row["user"] == "postgres"
    assert (row["cl_active"], row["sv_active"], row["sv_idle"], row["pool_mode"]) == (2, 2, 0, "session")
    assert row["maxwait"] >= 0 and 0 <= row["maxwait_us"] < 1_000_000
    clients = [r for r in dict_rows(admin, "SHOW CLIENTS") if r["database"] == "postgres"]
    assert sorted(r["state"] for r in clients) == ["active", "active", "waiting", "waiting"]
    servers = dict_rows(admin, "SHOW SERVERS")
    pids = {r["remote_pid"] for r in servers if r["state"] == "active"}
    assert len(pids) == 2 and 0 not in pids
    real = {int(p) for p in pg.psql("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend'")
            .split()}
    assert pids <= real, "remote_pid is the backend pid from BackendKeyData"
    for conn in holders:
        conn.close()
    for thread in threads:
        thread.join(10)
    assert len(done) == 2
    for conn in waiters:
        conn.close()
    row = wait_until(lambda: (p := pool()) and p["cl_active"] == 0 and p["sv_active"] == 0 and p,
                     message="everyone gone")
    assert (row["cl_waiting"], row["sv_idle"]) == (0, 2)
    admin.close()


def test_show_clients_lists_connected_clients(admin_relay):
    apps = [connect(admin_relay, application_name=f"app{i}") for i in range(3)]
    admin = connect(admin_relay, dbname="pgbouncer")
    try:
        rows = dict_rows(admin, "SHOW CLIENTS")
        mine = [r for r in rows if r["database"] == "postgres"]
        assert sorted(r["application_name"] for r in mine) == ["app0", "app1", "app2"]
        assert all(r["type"] == "C" and r["user"] == "postgres" and r["state"] == "idle" for r in mine)
        assert all(r["addr"] == "127.0.0.1" and r["port"] > 0 and r["local_port"] == admin_relay.port for r in mine)
        assert len({r["id"] for r in rows}) == len(rows)
        me = [r for r in rows if r["database"] == "pgbouncer"]
        assert len(me) == 1 and me[0]["state"] == "idle"   # the console lists itself, as PgBouncer
        apps[0].close()
        wait_until(lambda: len([r for r in dict_rows(admin, "SHOW CLIENTS") if r["database"] == "postgres"]) == 2)
    finally:
        for conn in apps:
            conn.close()
        admin.close()


def test_show_databases_lists_the_databases_section(make_relay, pg):
    relay = make_relay({"admin_users": "postgres", "max_db_connections": "7"},
                       databases={"appdb": f"host=127.0.0.1 port={pg.port} dbname=postgres pool_size=3",
                                  "other": f"host=127.0.0.1 port={pg.port} dbname=template1 user=postgres "
                                           "pool_mode=session"})
    admin = connect(relay, dbname="pgbouncer")
    app = connect(relay, dbname="appdb")
    try:
        app.cursor().execute("SELECT 1")
        rows = {r["name"]: r for r in dict_rows(admin, "SHOW DATABASES")}
        assert set(rows) == {"appdb", "other", "pgbouncer"}
        appdb, other = rows["appdb"], rows["other"]
        assert (appdb["host"], appdb["port"], appdb["database"], appdb["pool_size"]) == \
            ("127.0.0.1", pg.port, "postgres", 3)
        assert (appdb["force_user"], appdb["pool_mode"], appdb["max_connections"]) == (None, None, 7)
        assert appdb["current_connections"] == 1 and appdb["current_client_connections"] == 1
        assert (appdb["paused"], appdb["disabled"]) == (0, 0)
        assert (other["database"], other["force_user"], other["pool_mode"], other["pool_size"]) == \
            ("template1", "postgres", "session", 10)
        assert rows["pgbouncer"]["current_client_connections"] == 1
        pools = {(r["database"], r["user"]) for r in dict_rows(admin, "SHOW POOLS")}
        assert ("appdb", "postgres") in pools and ("pgbouncer", "pgbouncer") in pools
        stats = {r["database"]: r for r in dict_rows(admin, "SHOW STATS")}
        assert stats["appdb"]["total_query_count"] >= 1 and stats["appdb"]["total_xact_count"] >= 1
        assert stats["appdb"]["total_received"] > 0 and stats["appdb"]["total_sent"] > 0
    finally:
        app.close()
        admin.close()


def test_show_version_is_pgrelay_dash_v(admin_relay):
    first_line = subprocess.run([sys.executable, "-m", "pgrelay", "-V"], capture_output=True, text=True,
                                check=True).stdout.splitlines()[0]
    admin = connect(admin_relay, dbname="pgbouncer")
    try:
        assert dict_rows(admin, "SHOW VERSION") == [{"version": first_line}]
        assert first_line.startswith("pgrelay ")
        assert admin.get_parameter_status("server_version").endswith("/bouncer")  # as PgBouncer's console
    finally:
        admin.close()


def test_show_config_masks_secrets_and_shows_defaults(make_relay):
    relay = make_relay({"admin_users": "postgres",
                        "sentry_dsn": "http://abcdef123456@127.0.0.1:9/1"})
    admin = connect(relay, dbname="pgbouncer")
    try:
        rows = {r["key"]: r for r in dict_rows(admin, "SHOW CONFIG")}
        assert rows["admin_users"]["value"] == "postgres" and rows["admin_users"]["changeable"] == "yes"
        assert rows["listen_port"] == {"key": "listen_port", "value": str(relay.port), "default": "6432",
                                       "changeable": "no"}
        assert rows["default_pool_size"]["value"] == "10"
        assert "abcdef123456" not in rows["sentry_dsn"]["value"]
        assert rows["sentry_dsn"]["value"] == "http://****@127.0.0.1:9/1"
    finally:
        admin.close()


def test_stats_averages_follow_stats_period(admin_relay):
    """avg_* are per second over the last stats_period, as PgBouncer's older_stats (stats_period=1)."""
    app = connect(admin_relay)
    admin = connect(admin_relay, dbname="pgbouncer")
    try:
        for _ in range(20):
            app.cursor().execute("SELECT 1")
        time.sleep(2.5)  # two ticks: the period with the queries is behind the older snapshot now
        wait_until(lambda: next(r for r in dict_rows(admin, "SHOW STATS") if r["database"] == "postgres")
                   ["avg_query_count"] == 0, timeout=5, message="averages to fall back to 0")
        row = next(r for r in dict_rows(admin, "SHOW STATS") if r["database"] == "postgres")
        assert row["total_query_count"] >= 20
    finally:
        app.close()
        admin.close()
