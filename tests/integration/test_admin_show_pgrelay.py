"""pgrelay's own SHOW commands on the admin console (LISTENERS, ROUTES, HOSTS, POOLERS, PLUGINS, BUDGET)
against a real relay: the rows say what the configuration and the live pools are."""

import re
import subprocess
import sys

import psycopg2
import pytest

from tests.support import connect, scalar, wait_until


def rows(relay, sql: str) -> list[dict]:
    conn = psycopg2.connect(relay.dsn(user="postgres", dbname="pgbouncer"), connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
    finally:
        conn.close()


@pytest.fixture
def layered(make_relay, pg):
    """A pooled port, a direct [listeners] port and a dedicated pooler, with one client on each route."""
    from pgrelay.tempdb import free_port
    direct_port = free_port()
    relay = make_relay({"admin_users": "postgres", "pool_mode": "transaction", "max_db_connections": "40"},
                       databases={"postgres": f"host=127.0.0.1 port={pg.port}"},
                       extra_sections=(f"[listeners]\ndirect = port={direct_port} role=direct\n"
                                       "[poolers]\nreports = target=primary default_pool_size=3 max_client_conn=7\n"))
    relay.direct_port = direct_port
    clients = [connect(relay), connect(relay, user="postgres|reports"),
               psycopg2.connect(host="127.0.0.1", port=direct_port, user="postgres", dbname="postgres")]
    for conn in clients:
        assert scalar(conn, "select 1") == 1
    yield relay
    for conn in clients:
        conn.close()


def test_show_listeners_lists_every_port_with_its_role(layered):
    listeners = {row["name"]: row for row in rows(layered, "SHOW LISTENERS")}
    assert listeners["main"]["port"] == layered.port and listeners["main"]["role"] == "pooled"
    assert listeners["direct"]["port"] == layered.direct_port and listeners["direct"]["role"] == "direct"
    assert "tcp" in listeners["main"]["sockets"] and ".s.PGSQL." in listeners["main"]["sockets"]


def test_show_routes_names_the_plugin_that_decided_each_pool(layered):
    routes = rows(layered, "SHOW ROUTES")
    by_plugin = {row["plugin"]: row for row in routes}
    assert {"local_pooler", "dedicated_poolers", "direct"} <= set(by_plugin), routes
    assert by_plugin["dedicated_poolers"]["pool_size"] == 3
    assert by_plugin["direct"]["reuse"] == "no" and by_plugin["direct"]["per_client"] == "yes"
    assert by_plugin["local_pooler"]["pool_mode"] == "transaction"
    for row in routes:
        assert row["dbname"] == "postgres" and row["server_user"] == "postgres"


def test_show_poolers_counts_the_poolers_clients(layered):
    poolers = rows(layered, "SHOW POOLERS")
    assert [(p["name"], p["default_pool_size"], p["max_client_conn"]) for p in poolers] == [("reports", 3, 7)]
    assert poolers[0]["clients"] == 1 and poolers[0]["pools"] == 1


def test_show_plugins_lists_the_built_in_plugins_in_call_order(layered):
    plugins = [row["name"] for row in rows(layered, "SHOW PLUGINS")]
    assert plugins[-1] == "databases" and plugins.index("admin") < plugins.index("databases")
    hooks = {row["name"]: row["hooks"] for row in rows(layered, "SHOW PLUGINS")}
    assert "pgrelay_virtual_database" in hooks["admin"]


def test_show_budget_gives_the_worst_case_per_host(layered, pg):
    budget = rows(layered, "SHOW BUDGET")
    host = [row for row in budget if row["kind"] == "postgres"]
    assert len(host) == 1 and str(pg.port) in host[0]["host"]
    # max_db_connections=40 bounds the pooled servers of the one database (every user, both poolers);
    # the direct port adds its cap, and the health check one session.
    assert host[0]["pooled"] == 40, host[0]
    assert host[0]["bounds"] and "max_db_connections" in host[0]["bounds"], host[0]
    # The same figures as `pgrelay check` on the relay's file.
    check = subprocess.run([sys.executable, "-m", "pgrelay", "check", layered.ini_path, "--max-connections", "500"],
                           capture_output=True, text=True, timeout=60)
    per_process = re.search(r"per pgrelay process\s+(\d+)", check.stdout)
    assert per_process, check.stdout + check.stderr
    assert host[0]["worst_case"] == int(per_process.group(1)), check.stdout
    assert host[0]["worst_case"] >= host[0]["pooled"] + host[0]["health"]
    assert host[0]["unbounded"] is None


def test_show_budget_says_what_is_unbounded(make_relay):
    relay = make_relay({"admin_users": "postgres"})  # the * line: any database name gets pools
    host = [row for row in rows(relay, "SHOW BUDGET") if row["kind"] == "postgres"][0]
    assert host["worst_case"] is None and "database *" in host["unbounded"], host


def test_show_hosts_shows_the_health_of_multi_host_databases(make_relay, pg):
    relay = make_relay({"admin_users": "postgres", "health_check_period": "0.2"},
                       databases={"*": f"host=127.0.0.1,localhost port={pg.port},{pg.port}"})
    assert scalar(connect(relay), "select 1") == 1
    wait_until(lambda: any(row["up"] == "yes" and row["role"] == "primary" for row in rows(relay, "SHOW HOSTS")),
               message="a host seen up as the primary")
    hosts = rows(relay, "SHOW HOSTS")
    assert {row["port"] for row in hosts} == {pg.port}
    assert all(row["lag"] == 0 for row in hosts if row["up"] == "yes")
