"""The real @neondatabase/serverless 1.2.0 driver (HTTP neon() and WebSocket Pool/Client over ws 8.23.0) through pgrelay's serverless listeners, compared with node-postgres over TCP."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..drivers import listeners, node_driver  # noqa: F401  (session fixture)
from ..support import assert_served

# One query per common type; each compared between the transports (values as the drivers parse them).
TYPE_QUERIES = {
    "int2": "SELECT 32767::int2 AS v, (-5)::int2 AS n",
    "int4": "SELECT 2147483647::int4 AS v",
    "int8": "SELECT 9223372036854775807::int8 AS v",
    "numeric": "SELECT 12345678901234567890.0123456789::numeric AS v, 'NaN'::numeric AS nan",
    "float": "SELECT 1.5::float4 AS f4, 3.141592653589793::float8 AS f8, 'Infinity'::float8 AS inf",
    "bool": "SELECT true AS t, false AS f",
    "text": "SELECT 'héllo \"wörld\"\\n' AS v, ''::text AS empty",
    "bytea": "SELECT '\\x00ff4142'::bytea AS v",
    "json": """SELECT '{"a": [1, 2.5, null], "b": "x"}'::json AS j, '{"k": {"n": true}}'::jsonb AS jb""",
    "arrays": "SELECT ARRAY[1, 2, NULL]::int[] AS ints, ARRAY['a', 'b,c', NULL]::text[] AS texts, "
              "'{{1,2},{3,4}}'::int8[] AS nested, '{}'::int[] AS empty",
    "timestamptz": "SELECT '2024-02-29 12:34:56.789+02'::timestamptz AS v, "
                   "'2024-02-29 12:34:56.789'::timestamp AS naive, '2024-02-29'::date AS d",
    "uuid": "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS v",
    "null": "SELECT NULL AS v, NULL::int AS i, NULL::text AS t",
    "rows": "SELECT n, n::text AS s FROM generate_series(1, 5) AS n",
    "empty": "SELECT 1 AS v WHERE false",
}

PARAM_QUERIES = {
    "params": ("SELECT $1::int + 1 AS a, $2::text AS b, $3::bool AS c, $4::text IS NULL AS d",
               [41, "it's", True, None]),
    "param_array": ("SELECT $1::int[] AS a", [[1, 2, 3]]),
    "param_json": ("SELECT $1::jsonb -> 'k' AS a", [{"k": [1, "two"]}]),
}


@pytest.fixture
def endpoint(make_relay, tmp_path):
    """pgrelay with its TCP port in transaction mode, a serverless listener (transaction mode) and a
    session-mode serverless listener."""
    txn, session = free_port(), free_port()
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 5},
                       extra_sections=listeners(serverless=(txn, "role=serverless"),
                                                serverless_session=(session, "role=serverless pool_mode=session")))
    return relay, txn, session


def run(node_driver, relay, port, tasks, timeout=120, **config) -> dict:
    """Run neon.js `tasks` against `relay` (HTTP and WebSocket on serverless `port`); {id: record}."""
    config = dict({"http_port": port, "ws_port": port, "tcp_port": relay.port, "tasks": tasks}, **config)
    out = node_driver.run("neon.js", config, timeout=timeout).check()
    assert out.one("done")["neon"] == "1.2.0" and out.one("done")["ws"] == "8.23.0"
    return {r["id"]: r for r in out.of("task")}


def ok(record) -> object:
    assert record["ok"], record
    return record["result"]


def test_http_types_and_parameters_are_node_postgres_over_tcp(endpoint, node_driver):
    relay, port, _ = endpoint
    tasks = []
    for via in ("http", "tcp"):
        for mode in (True, False):
            for name, sql in TYPE_QUERIES.items():
                tasks.append({"id": f"{via}:{mode}:{name}", "op": "query", "via": via, "text": sql, "array_mode": mode})
            for name, (sql, params) in PARAM_QUERIES.items():
                tasks.append({"id": f"{via}:{mode}:{name}", "op": "query", "via": via, "text": sql, "params": params,
                              "array_mode": mode})
    got = run(node_driver, relay, port, tasks)
    for mode in (True, False):
        for name in list(TYPE_QUERIES) + list(PARAM_QUERIES):
            http, tcp = ok(got[f"http:{mode}:{name}"]), ok(got[f"tcp:{mode}:{name}"])
            assert http == tcp, f"{name} (arrayMode={mode}): HTTP {http}\nTCP {tcp}"
    # The oracle itself parsed what we think it did.
    assert ok(got["tcp:True:params"])["rows"] == [[42, "it's", True, True]]
    assert ok(got["tcp:True:int8"])["rows"] == [["9223372036854775807"]]
    assert ok(got["tcp:True:bytea"])["rows"] == [[{"bytea": "00ff4142"}]]
    assert ok(got["tcp:True:json"])["rows"][0][1] == {"object": {"k": {"object": {"n": True}}}}
    assert ok(got["tcp:True:null"])["rows"] == [[None, None, None]]
    assert ok(got["tcp:False:rows"])["rows"][0] == {"object": {"n": 1, "s": "1"}}
    assert [f["dataTypeID"] for f in ok(got["http:True:timestamptz"])["fields"]] == [1184, 1114, 1082]
    assert_served(relay)


def test_http_default_results_array_mode_batches_and_errors(endpoint, node_driver, pg):
    relay, port, _ = endpoint
    pg.psql("DROP TABLE IF EXISTS neon_http_t; CREATE TABLE neon_http_t (id int PRIMARY KEY, note text)")
    tasks = [
        {"id": "plain", "op": "plain", "text": "SELECT $1::int AS a, $2::text AS b", "params": [7, "x"]},
        {"id": "plain_array", "op": "plain", "text": "SELECT $1::int AS a, $2::text AS b", "params": [7, "x"],
         "array_mode": True},
        {"id": "batch", "op": "transaction", "isolation": "Serializable", "read_only": True, "queries": [
            {"text": "SELECT current_setting('transaction_isolation') AS iso"},
            {"text": "SELECT current_setting('transaction_read_only') AS ro, $1::int AS n", "params": [3]}]},
        {"id": "batch_rr", "op": "transaction", "isolation": "RepeatableRead", "read_only": False, "queries": [
            {"text": "INSERT INTO neon_http_t VALUES (1, 'one'), (2, 'two')"},
            {"text": "SELECT current_setting('transaction_isolation') AS iso, count(*) AS n FROM neon_http_t"}]},
        {"id": "batch_ro_write", "op": "transaction", "read_only": True, "queries": [
            {"text": "INSERT INTO neon_http_t VALUES (3, 'three')"}]},
        {"id": "batch_fails", "op": "transaction", "queries": [
            {"text": "INSERT INTO neon_http_t VALUES (4, 'four')"},
            {"text": "INSERT INTO neon_http_t VALUES (1, 'again')"}]},
        {"id": "after", "op": "plain", "text": "SELECT id FROM neon_http_t ORDER BY id"},
        {"id": "empty_batch", "op": "transaction", "queries": []},
        {"id": "error", "op": "query", "via": "http", "text": "SELECT 1 FROM neon_http_t WHERE nosuchcol = 1"},
        {"id": "error_tcp", "op": "query", "via": "tcp", "text": "SELECT 1 FROM neon_http_t WHERE nosuchcol = 1"},
        {"id": "dup", "op": "query", "via": "http", "text": "INSERT INTO neon_http_t VALUES (1, 'x')"},
        {"id": "dup_tcp", "op": "query", "via": "tcp", "text": "INSERT INTO neon_http_t VALUES (1, 'x')"},
        {"id": "ddl", "op": "query", "via": "http", "text": "CREATE TEMP TABLE neon_tmp (a int)"},
    ]
    got = run(node_driver, relay, port, tasks)
    assert ok(got["plain"]) == [{"object": {"a": 7, "b": "x"}}]
    assert ok(got["plain_array"]) == [[7, "x"]]
    iso, ro = ok(got["batch"])
    assert iso["rows"] == [{"object": {"iso": "serializable"}}]
    assert ro["rows"] == [{"object": {"ro": "on", "n": 3}}]
    insert, count = ok(got["batch_rr"])
    assert (insert["command"], insert["rowCount"]) == ("INSERT", 2)
    assert count["rows"] == [{"object": {"iso": "repeatable read", "n": "2"}}]
    assert got["batch_ro_write"]["error"]["code"] == "25006", got["batch_ro_write"]
    assert got["batch_fails"]["error"]["code"] == "23505", got["batch_fails"]
    assert ok(got["after"]) == [{"object": {"id": 1}}, {"object": {"id": 2}}]  # the failed batch left nothing
    assert ok(got["empty_batch"]) == []
    error = got["error"]["error"]
    assert error["name"] == "NeonDbError" and error["code"] == "42703" and error["position"] == "33", error
    tcp = got["error_tcp"]["error"]
    assert {k: error[k] for k in ("message", "code", "position", "severity")} == \
        {k: tcp[k] for k in ("message", "code", "position", "severity")}
    dup, dup_tcp = got["dup"]["error"], got["dup_tcp"]["error"]
    assert dup["code"] == "23505" and dup["detail"] == "Key (id)=(1) already exists.", dup
    for key in ("message", "code", "detail", "schema", "table", "constraint"):
        assert dup[key] == dup_tcp[key], (key, dup, dup_tcp)
    assert (ok(got["ddl"])["command"], ok(got["ddl"])["rowCount"]) == ("CREATE", None)
    assert_served(relay)


@pytest.mark.parametrize("via", ["ws_pool", "ws_client"])
def test_websocket_queries_and_rolled_back_transaction(endpoint, node_driver, pg, via):
    relay, port, _ = endpoint
    pg.psql(f"DROP TABLE IF EXISTS neon_ws_{via}; CREATE TABLE neon_ws_{via} (id int)")
    tasks = [{"id": f"{via}:{name}", "op": "query", "via": via, "text": sql, "array_mode": True}
             for name, sql in TYPE_QUERIES.items()]
    tasks += [{"id": f"tcp:{name}", "op": "query", "via": "tcp", "text": sql, "array_mode": True}
              for name, sql in TYPE_QUERIES.items()]
    tasks += [{"id": f"{via}:{name}", "op": "query", "via": via, "text": sql, "params": params}
              for name, (sql, params) in PARAM_QUERIES.items()]
    tasks += [{"id": f"tcp:{name}", "op": "query", "via": "tcp", "text": sql, "params": params}
              for name, (sql, params) in PARAM_QUERIES.items()]
    tasks.append({"id": "rollback", "op": "rollback", "via": via, "statements": [
        f"INSERT INTO neon_ws_{via} VALUES (1), (2)", f"SELECT count(*)::int AS n FROM neon_ws_{via}"],
        "after": f"SELECT count(*)::int AS n FROM neon_ws_{via}"})
    got = run(node_driver, relay, port, tasks)
    for name in list(TYPE_QUERIES) + list(PARAM_QUERIES):
        assert ok(got[f"{via}:{name}"]) == ok(got[f"tcp:{name}"]), name
    insert, inside, after = ok(got["rollback"])
    assert (insert["command"], insert["rowCount"]) == ("INSERT", 2)
    assert inside["rows"] == [{"object": {"n": 2}}] and after["rows"] == [{"object": {"n": 0}}]
    assert pg.psql(f"SELECT count(*) FROM neon_ws_{via}").strip() == "0"
    assert_served(relay)


def test_parity_http_websocket_and_tcp(endpoint, node_driver):
    """The driver's own check (tests/cli/http.test.ts, ws.test.ts): the same queries give the same
    fields and rows over HTTP (fullResults), WebSocket and node-postgres over TCP."""
    relay, port, _ = endpoint
    queries = dict(TYPE_QUERIES, **{k: v[0] for k, v in PARAM_QUERIES.items()})
    params = {k: v[1] for k, v in PARAM_QUERIES.items()}
    vias = ("http", "ws_pool", "ws_client", "tcp")
    tasks = [{"id": f"{via}:{name}", "op": "query", "via": via, "text": sql, "params": params.get(name, [])}
             for via in vias for name, sql in queries.items()]
    got = run(node_driver, relay, port, tasks)
    for name in queries:
        results = {via: ok(got[f"{via}:{name}"]) for via in vias}
        for via in vias[:-1]:
            assert (results[via]["fields"], results[via]["rows"], results[via]["command"], results[via]["rowCount"]) == \
                (results["tcp"]["fields"], results["tcp"]["rows"], results["tcp"]["command"], results["tcp"]["rowCount"]), \
                f"{name}: {via} {results[via]}\ntcp {results['tcp']}"


def _backends_sampler(pg, since: float, stop: threading.Event, seen: list[int]):
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        while not stop.is_set():
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'postgres' AND usename = 'postgres' "
                        "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                        "AND backend_start >= to_timestamp(%s)", (since,))
            seen.append(cur.fetchone()[0])
            time.sleep(0.02)
    conn.close()


def test_200_websocket_clients_share_5_servers_in_transaction_mode(endpoint, node_driver, pg):
    relay, port, _ = endpoint
    seen: list[int] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_backends_sampler, args=(pg, relay.started_at - 1, stop, seen), daemon=True)
    sampler.start()
    try:
        got = run(node_driver, relay, port, [{"id": "many", "op": "concurrent", "clients": 200, "iterations": 3}],
                  timeout=180)
    finally:
        stop.set()
        sampler.join(10)
    summary = ok(got["many"])
    assert (summary["error_count"], summary["ok"]) == (0, 600), summary
    assert 1 <= len(summary["pids"]) <= 5, summary["pids"]
    assert seen and max(seen) <= 5, max(seen)
    assert max(seen) >= 1
    assert_served(relay)


def test_listen_notify_on_a_session_mode_listener(endpoint, node_driver):
    relay, _, session = endpoint
    got = run(node_driver, relay, session, [{"id": "n", "op": "listen", "channel": "neon_chan",
                                             "payload": "hello, wörld"}])
    assert ok(got["n"]) == {"channel": "neon_chan", "payload": "hello, wörld"}


@pytest.fixture
def scram_endpoint(make_relay, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text('"postgres" "right-Pw-1"\n')
    txn = free_port()
    relay = make_relay({"auth_type": "scram-sha-256", "auth_file": str(users)},
                       extra_sections=listeners(serverless=(txn, "role=serverless")))
    return relay, txn


def test_wrong_password_and_unknown_database_match_the_tcp_errors(scram_endpoint, node_driver):
    relay, port = scram_endpoint
    cases = {"wrong_password": {"password": "wrong"}, "unknown_database": {"password": "right-Pw-1",
                                                                           "database": "neon_nosuchdb"}}
    tasks = []

    def creds_for(name, via):
        # Each transport asks for its own unknown database: pgrelay caches a failed server login
        # (server_login_retry), and the first failure is what is compared.
        creds = dict(cases[name])
        if "database" in creds:
            creds["database"] += "_" + via
        return creds

    for name in cases:
        tasks.append(dict(creds_for(name, "http"), id=f"http:{name}", op="query", via="http", text="SELECT 1"))
        tasks.append(dict(creds_for(name, "ws"), id=f"ws:{name}", op="connect", via="ws_client"))
        tasks.append(dict(creds_for(name, "pool"), id=f"pool:{name}", op="query", via="ws_pool", text="SELECT 1"))
        tasks.append(dict(creds_for(name, "tcp"), id=f"tcp:{name}", op="connect", via="tcp"))
    tasks.append({"id": "good", "op": "query", "via": "http", "text": "SELECT current_user AS u", "password": "right-Pw-1"})
    got = run(node_driver, relay, port, tasks)
    want_code = {"wrong_password": "28P01", "unknown_database": "3D000"}
    for name in cases:
        tcp = got[f"tcp:{name}"]
        assert not tcp["ok"] and tcp["error"]["code"] == want_code[name], tcp
        assert tcp["error"]["message"] == {"wrong_password": 'password authentication failed for user "postgres"',
                                           "unknown_database": 'database "neon_nosuchdb_tcp" does not exist'}[name]
        for via in ("http", "ws", "pool"):
            rec = got[f"{via}:{name}"]
            assert not rec["ok"], rec
            message = rec["error"]["message"].replace(f"neon_nosuchdb_{via}", "neon_nosuchdb_tcp")
            assert (message, rec["error"]["code"], rec["error"]["severity"]) == \
                (tcp["error"]["message"], tcp["error"]["code"], tcp["error"]["severity"]), \
                f"{via} {name}: {rec['error']}\ntcp {tcp['error']}"
        assert got[f"http:{name}"]["error"]["name"] == "NeonDbError"
    assert ok(got["good"])["rows"] == [{"object": {"u": "postgres"}}]


def test_pipeline_connect_false_with_scram(scram_endpoint, node_driver):
    """pipelineConnect=false: the driver waits for the server's request and answers it; pgrelay asks
    a bridged client for a cleartext password (R 3), whatever auth_type says."""
    relay, port = scram_endpoint
    tasks = [{"id": "client", "op": "connect", "via": "ws_client", "password": "right-Pw-1"},
             {"id": "pool", "op": "query", "via": "ws_pool", "text": "SELECT 40 + 2 AS v", "password": "right-Pw-1"},
             {"id": "wrong", "op": "connect", "via": "ws_client", "password": "nope"}]
    got = run(node_driver, relay, port, tasks, pipeline_connect=False)
    assert ok(got["client"])["rows"] == [{"object": {"u": "postgres"}}]
    assert ok(got["pool"])["rows"] == [{"object": {"v": 42}}]
    assert got["wrong"]["error"]["code"] == "28P01", got["wrong"]


def test_dedicated_replica_pooler_user_routes_as_on_the_tcp_port(make_relay, replicated, node_driver):
    """`user|pooler` in the driver's connection string, over HTTP and WebSocket, lands where the same
    user name lands on the pooled TCP port."""
    port = free_port()
    relay = make_relay({"pool_mode": "transaction"},
                       databases={"*": f"host=127.0.0.1 port={replicated.primary.port} "
                                       f"replicas=127.0.0.1:{replicated.standby.port}"},
                       extra_sections="[poolers]\nrb = target=replica pool_mode=transaction default_pool_size=1\n"
                       + listeners(serverless=(port, "role=serverless")))
    where = "SELECT pg_is_in_recovery() AS standby, current_setting('port') AS port, current_user AS u"
    vias = ("http", "ws_pool", "ws_client", "tcp")
    tasks = [{"id": f"{via}:{user}", "op": "query", "via": via, "text": where, "user": user}
             for via in vias for user in ("postgres|rb", "postgres")]
    got = run(node_driver, relay, port, tasks)
    for via in vias:
        assert ok(got[f"{via}:postgres|rb"])["rows"] == \
            [{"object": {"standby": True, "port": str(replicated.standby.port), "u": "postgres"}}], via
        assert ok(got[f"{via}:postgres"])["rows"] == \
            [{"object": {"standby": False, "port": str(replicated.primary.port), "u": "postgres"}}], via
