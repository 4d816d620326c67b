"""POST /sql on a serverless listener against a real relay and PostgreSQL: Neon's JSON shapes, typing, batches, errors, routing, limits and bad HTTP input."""

from __future__ import annotations

import json
import socket
import time

import psycopg2
import pytest
import requests

from pgrelay.tempdb import free_port
from tests.support import RawClient, startup_packet, wait_until

CS = "postgresql://postgres@db.localtest.me/postgres"
FIELD_KEYS = ["name", "dataTypeID", "tableID", "columnID", "dataTypeSize", "dataTypeModifier", "format"]
RESULT_KEYS = ["fields", "rows", "command", "rowCount", "rowAsArray"]
ERROR_KEYS = ["message", "code", "detail", "hint", "position", "internalPosition", "internalQuery", "severity",
              "where", "table", "column", "schema", "dataType", "constraint", "file", "line", "routine"]


def start(make_relay, settings=None, sections="", **kw):
    port = free_port()
    relay = make_relay(settings=settings, extra_sections=f"[listeners]\nserverless = port={port} role=serverless\n"
                       + sections, **kw)
    relay.http = port
    return relay


def post(relay, body, cs=CS, raw=True, array=True, headers=None, timeout=20):
    h = {"Neon-Connection-String": cs} if cs is not None else {}
    if raw:
        h["Neon-Raw-Text-Output"] = "true"
    if array:
        h["Neon-Array-Mode"] = "true"
    h.update(headers or {})
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"http://127.0.0.1:{relay.http}/sql", data=data, headers=h, timeout=timeout)


def q(relay, query, params=(), **kw):
    return post(relay, {"query": query, "params": list(params)}, **kw)


def rows(relay, query, params=(), **kw):
    r = q(relay, query, params, **kw)
    assert r.status_code == 200, r.text
    return r.json()["rows"]


def assert_served(relay):
    """Another client is still served after whatever the test did."""
    assert rows(relay, "SELECT $1::int * 2", ["21"]) == [["42"]]


def raw_http(relay, data: bytes, timeout=10) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", relay.http), timeout=timeout)
    if data:
        s.sendall(data)
    return s


def read_response(s: socket.socket, buf: bytes = b""):
    """(status, headers, body, leftover) of one HTTP/1.x response with a Content-Length."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(buf)
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    n = int(headers.get(b"content-length", b"0"))
    while len(rest) < n:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(rest)
        rest += chunk
    return status, headers, rest[:n], rest[n:]


def request_bytes(body: bytes, cs=CS, version=b"1.1", extra=b"") -> bytes:
    return (b"POST /sql HTTP/" + version + b"\r\nHost: db.localtest.me\r\nNeon-Connection-String: " + cs.encode()
            + b"\r\nNeon-Raw-Text-Output: true\r\nNeon-Array-Mode: true\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n" + extra + b"\r\n" + body)


def closed_within(s: socket.socket, seconds: float) -> bytes | None:
    """What the peer sent before closing, or None if it had not closed after `seconds`."""
    s.settimeout(seconds)
    got = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return got
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        return got
    except socket.timeout:
        return None


def console(relay):
    conn = psycopg2.connect(relay.dsn(dbname="pgbouncer"))
    conn.autocommit = True
    return conn


def pool_row(relay, database="postgres", user="postgres"):
    conn = console(relay)
    try:
        cur = conn.cursor()
        cur.execute("SHOW POOLS")
        cols = [d[0] for d in cur.description]
        for r in cur.fetchall():
            row = dict(zip(cols, r))
            if row["database"] == database and row["user"] == user:
                return row
    finally:
        conn.close()
    return None


def released(relay) -> bool:
    row = pool_row(relay)
    return row is not None and row["sv_active"] == 0 and row["cl_active"] == 0 and row["cl_waiting"] == 0


# -- results -----------------------------------------------------------------------------------------


def test_single_query_with_params_in_neons_exact_shape(make_relay):
    relay = start(make_relay)
    r = q(relay, "SELECT $1::int AS a, $2::text AS b", ["42", None])
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["access-control-allow-origin"] == "*"
    body = r.json()
    assert body == {"fields": [{"name": "a", "dataTypeID": 23, "tableID": 0, "columnID": 0, "dataTypeSize": 4,
                                "dataTypeModifier": -1, "format": "text"},
                               {"name": "b", "dataTypeID": 25, "tableID": 0, "columnID": 0, "dataTypeSize": -1,
                                "dataTypeModifier": -1, "format": "text"}],
                    "rows": [["42", None]], "command": "SELECT", "rowCount": 1, "rowAsArray": True}
    assert list(body) == RESULT_KEYS and all(list(f) == FIELD_KEYS for f in body["fields"])
    assert r.content.startswith(b'{"fields":[{"name":"a","dataTypeID":23,"tableID":0,')  # compact, as Neon's
    assert r.content.endswith(b'"rows":[["42",null]],"command":"SELECT","rowCount":1,"rowAsArray":true}')


def test_table_columns_carry_table_and_column_ids_and_modifiers(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_cols; CREATE TABLE http_cols (id int, name varchar(10), amount numeric(8,2))")
    relay = start(make_relay)
    oid = int(rows(relay, "SELECT 'http_cols'::regclass::oid")[0][0])
    r = q(relay, "SELECT id, name, amount FROM http_cols")
    fields = r.json()["fields"]
    assert [(f["tableID"], f["columnID"]) for f in fields] == [(oid, 1), (oid, 2), (oid, 3)]
    assert [f["dataTypeModifier"] for f in fields] == [-1, 14, (8 << 16 | 2) + 4]
    assert r.json()["rows"] == [] and r.json()["rowCount"] == 0


TYPES_SQL = """SELECT 1::int2 AS i2, 2::int4 AS i4, 9223372036854775807::int8 AS i8, 1.50::numeric AS n,
  1.5::float8 AS f8, 'NaN'::float4 AS f4, true AS b, 'txt'::text AS t, '\\x4142'::bytea AS by,
  '{"a": 1}'::json AS j, '{"b": [1, 2]}'::jsonb AS jb, ARRAY[1, NULL, 3] AS ai, ARRAY['a b', 'c"d', NULL] AS at,
  '2024-01-02 03:04:05+00'::timestamptz AS ts, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid AS u,
  NULL::int AS nul, ARRAY['{"x": 1}'::jsonb] AS aj, '[0:1]={2.5,Infinity}'::float8[] AS af,
  ARRAY[true, false] AS ab, ARRAY[10::int8] AS a8, '2024-01-02 03:04:05+00'::timestamptz::text AS ts_text"""
TYPE_OIDS = [21, 23, 20, 1700, 701, 700, 16, 25, 17, 114, 3802, 1007, 1009, 1184, 2950, 23, 3807, 1022, 1000, 1016, 25]


def test_common_types_as_raw_text(make_relay):
    relay = start(make_relay)
    r = q(relay, TYPES_SQL)
    assert [f["dataTypeID"] for f in r.json()["fields"]] == TYPE_OIDS
    row = r.json()["rows"][0]
    assert row[:13] == ["1", "2", "9223372036854775807", "1.50", "1.5", "NaN", "t", "txt", "\\x4142", '{"a": 1}',
                        '{"b": [1, 2]}', "{1,NULL,3}", '{"a b","c\\"d",NULL}']
    assert row[13] == row[20] and row[13].startswith("2024-01-0")
    assert row[14:20] == ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None, '{"{\\"x\\": 1}"}', "[0:1]={2.5,Infinity}",
                          "{t,f}", "{10}"]


def test_common_types_json_typed_when_raw_text_is_off(make_relay):
    relay = start(make_relay)
    r = q(relay, TYPES_SQL, raw=False)
    row = r.json()["rows"][0]
    assert row[:13] == [1, 2, "9223372036854775807", "1.50", 1.5, "NaN", True, "txt", "\\x4142", {"a": 1},
                        {"b": [1, 2]}, [1, None, 3], ["a b", 'c"d', None]]
    assert row[13] == row[20]
    assert row[14:20] == ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", None, [{"x": 1}], [2.5, "Infinity"],
                          [True, False], ["10"]]
    # a header value other than exactly "true" is off too
    r = q(relay, "SELECT 7 AS seven, false AS f", raw=False, headers={"Neon-Raw-Text-Output": "TRUE"})
    assert r.json()["rows"] == [[7, False]]


def test_array_mode_off_gives_objects_and_per_query_array_mode_overrides(make_relay):
    relay = start(make_relay)
    r = q(relay, "SELECT 1 AS a, 'x' AS b", array=False)
    assert r.json()["rows"] == [{"a": "1", "b": "x"}] and r.json()["rowAsArray"] is False
    r = q(relay, "SELECT 1 AS a, true AS b", array=False, raw=False)
    assert r.text.count('"rows":[{"a":1,"b":true}]') == 1
    r = post(relay, {"query": "SELECT 1 AS a", "params": [], "arrayMode": False})  # header says arrays
    assert r.json()["rows"] == [{"a": "1"}] and r.json()["rowAsArray"] is False
    r = post(relay, {"query": "SELECT 1 AS a", "arrayMode": True}, array=False)  # params defaults to []
    assert r.json()["rows"] == [["1"]] and r.json()["rowAsArray"] is True


def test_command_and_row_count(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_cmd")
    relay = start(make_relay)
    for sql, params, command, count in [
        ("CREATE TABLE http_cmd (id int primary key, v text)", [], "CREATE", None),
        ("INSERT INTO http_cmd SELECT g, $1 FROM generate_series(1, 3) g", ["v"], "INSERT", 3),
        ("UPDATE http_cmd SET v = $1 WHERE id > 1", ["w"], "UPDATE", 2),
        ("DELETE FROM http_cmd WHERE id = $1", ["1"], "DELETE", 1),
        ("DO $$ BEGIN RAISE NOTICE 'ignored'; END $$", [], "DO", None),
        ("DROP TABLE http_cmd", [], "DROP", None),
    ]:
        r = q(relay, sql, params)
        assert r.status_code == 200, r.text
        assert (r.json()["command"], r.json()["rowCount"]) == (command, count), sql


def test_non_driver_params_are_stringified_as_neon_does(make_relay):
    relay = start(make_relay)
    r = q(relay, "SELECT $1::int + 1, $2::bool, $3::int[], $4::jsonb ->> 'a', $5::text[], $6::text",
          [41, True, [[1, None], [3, 4]], {"a": "b"}, ["x,y", 'q"'], 1.5])
    assert r.json()["rows"] == [["42", "t", "{{1,NULL},{3,4}}", "b", '{"x,y","q\\""}', "1.5"]]


def test_application_name_comes_from_the_connection_string(make_relay):
    relay = start(make_relay)
    assert rows(relay, "SHOW application_name", cs=CS + "?sslmode=require&application_name=my%20app") == [["my app"]]
    assert rows(relay, "SHOW application_name") == [[""]]


# -- batches ------------------------------------------------------------------------------------------


def test_batch_with_isolation_level_read_only_and_deferrable(make_relay):
    relay = start(make_relay)
    batch = {"queries": [{"query": "SHOW transaction_isolation"}, {"query": "SHOW transaction_read_only"},
                         {"query": "SHOW transaction_deferrable"}, {"query": "SELECT $1::int", "params": ["5"]}]}
    r = post(relay, batch, headers={"Neon-Batch-Isolation-Level": "Serializable", "Neon-Batch-Read-Only": "true",
                                    "Neon-Batch-Deferrable": "true"})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert list(r.json()) == ["results"] and all(list(x) == RESULT_KEYS for x in results)
    assert [x["rows"] for x in results] == [[["serializable"]], [["on"]], [["on"]], [["5"]]]
    assert r.headers["neon-batch-isolation-level"] == "Serializable"
    for level, shown in [("ReadUncommitted", "read uncommitted"), ("ReadCommitted", "read committed"),
                         ("RepeatableRead", "repeatable read")]:
        r = post(relay, {"queries": [{"query": "SHOW transaction_isolation"}, {"query": "SHOW transaction_read_only"}]},
                 headers={"Neon-Batch-Isolation-Level": level, "Neon-Batch-Read-Only": "false"})
        assert [x["rows"] for x in r.json()["results"]] == [[[shown]], [["off"]]]


def test_write_in_a_read_only_batch_fails_with_25006(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_ro; CREATE TABLE http_ro (id int)")
    relay = start(make_relay)
    r = post(relay, {"queries": [{"query": "SELECT 1"}, {"query": "INSERT INTO http_ro VALUES (1)"}]},
             headers={"Neon-Batch-Read-Only": "true"})
    assert r.status_code == 400 and r.json()["code"] == "25006"
    assert r.json()["message"] == "cannot execute INSERT in a read-only transaction"
    assert pg.psql("SELECT count(*) FROM http_ro") == "0"


def test_a_failing_batch_rolls_back_and_returns_the_error(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_tx; CREATE TABLE http_tx (id int)")
    relay = start(make_relay, settings={"default_pool_size": "1"})
    r = post(relay, {"queries": [{"query": "INSERT INTO http_tx VALUES ($1)", "params": ["1"]},
                                 {"query": "SELECT 1 / 0"}, {"query": "INSERT INTO http_tx VALUES (2)"}]})
    assert r.status_code == 400 and r.json()["code"] == "22012" and r.json()["message"] == "division by zero"
    assert pg.psql("SELECT count(*) FROM http_tx") == "0"
    r = post(relay, {"queries": [{"query": "INSERT INTO http_tx VALUES (1)"}, {"query": "SELECT count(*) FROM http_tx"}]})
    assert r.json()["results"][1]["rows"] == [["1"]] and pg.psql("SELECT count(*) FROM http_tx") == "1"
    assert rows(relay, "SHOW transaction_isolation") == [["read committed"]]


def test_empty_batch_still_authenticates(make_relay, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text('"postgres" "Right-pw-9"\n')
    relay = start(make_relay, settings={"auth_type": "scram-sha-256", "auth_file": str(users)})
    r = post(relay, {"queries": []}, cs="postgresql://postgres:Right-pw-9@h/postgres")
    assert r.status_code == 200 and r.json() == {"results": []}
    r = post(relay, {"queries": []}, cs="postgresql://postgres:wrong@h/postgres")
    assert r.status_code == 400 and r.json()["code"] == "28P01"


# -- errors -------------------------------------------------------------------------------------------


def test_a_failing_statement_returns_every_error_field(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_err; CREATE TABLE http_err (id int CONSTRAINT http_err_pk PRIMARY KEY)")
    relay = start(make_relay)
    r = q(relay, "SELECT * FROM nosuch_table")
    assert r.status_code == 400
    e = r.json()
    assert list(e) == ERROR_KEYS
    assert e["message"] == 'relation "nosuch_table" does not exist' and e["code"] == "42P01"
    assert e["position"] == "15" and e["severity"] == "ERROR" and e["detail"] is None
    assert isinstance(e["line"], str) and e["line"].isdigit() and e["file"].endswith(".c") and e["routine"]
    q(relay, "INSERT INTO http_err VALUES (1)")
    e = q(relay, "INSERT INTO http_err VALUES ($1)", ["1"]).json()
    assert (e["code"], e["detail"], e["constraint"], e["table"], e["schema"]) == \
        ("23505", "Key (id)=(1) already exists.", "http_err_pk", "http_err", "public")
    assert_served(relay)


def test_multi_statement_query_fails_as_on_neon(make_relay):
    relay = start(make_relay)
    r = q(relay, "SELECT 1; SELECT 2")
    assert r.status_code == 400 and r.json()["code"] == "42601"
    assert r.json()["message"] == "cannot insert multiple commands into a prepared statement"
    assert_served(relay)


def test_copy_from_stdin_fails_cleanly(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_copy; CREATE TABLE http_copy (id int)")
    relay = start(make_relay, settings={"default_pool_size": "1"})
    r = q(relay, "COPY http_copy FROM STDIN")
    assert r.status_code == 400 and r.json()["message"] == "COPY FROM STDIN is not supported over HTTP", r.text
    assert_served(relay)
    r = post(relay, {"queries": [{"query": "INSERT INTO http_copy VALUES (1)"}, {"query": "COPY http_copy FROM STDIN"}]})
    assert r.status_code == 400 and r.json()["message"] == "COPY FROM STDIN is not supported over HTTP", r.text
    assert rows(relay, "SELECT count(*) FROM http_copy") == [["0"]]
    assert rows(relay, "COPY (SELECT 1) TO STDOUT") == []  # COPY TO's data has no place in the JSON


@pytest.mark.parametrize("auth_type", ["scram-sha-256", "md5"])
def test_wrong_password(make_relay, tmp_path, auth_type):
    users = tmp_path / "users.txt"
    users.write_text('"postgres" "Right-pw-9"\n')
    relay = start(make_relay, settings={"auth_type": auth_type, "auth_file": str(users)})
    r = q(relay, "SELECT 1", cs="postgresql://postgres:wrong@h/postgres")
    assert r.status_code == 400 and r.json()["code"] == "28P01"
    assert r.json()["message"] == 'password authentication failed for user "postgres"'
    r = q(relay, "SELECT 1", cs="postgresql://postgres@h/postgres")  # no password at all
    assert r.status_code == 400 and r.json()["code"] == "28P01"
    r = q(relay, "SELECT current_user", cs="postgresql://postgres:Right%2Dpw%2D9@h/postgres")  # URL-decoded
    assert r.status_code == 200 and r.json()["rows"] == [["postgres"]]
    # a bearer token no plugin accepts: the password decides
    r = q(relay, "SELECT 1", cs="postgresql://postgres:Right-pw-9@h/postgres", headers={"Authorization": "Bearer x.y"})
    assert r.status_code == 200
    r = q(relay, "SELECT 1", cs="postgresql://postgres:nope@h/postgres", headers={"Authorization": "Bearer x.y"})
    assert r.status_code == 400 and r.json()["code"] == "28P01"


def test_unknown_database_is_refused_as_on_the_tcp_port(make_relay, pg):
    relay = start(make_relay, databases={"postgres": f"host=127.0.0.1 port={pg.port}"})
    raw = RawClient(relay.port)
    raw.send(startup_packet("postgres", "nosuch_db"))
    tcp = raw.read_error()
    raw.close()
    r = q(relay, "SELECT 1", cs="postgresql://postgres@h/nosuch_db")
    assert r.status_code == 400
    assert (r.json()["message"], r.json()["code"], r.json()["severity"]) == (tcp["M"], tcp["C"], tcp["S"])
    assert_served(relay)


# -- routing --------------------------------------------------------------------------------------------


def test_replica_suffix_and_dedicated_pooler_route_as_on_the_tcp_port(make_relay, replicated):
    db = f"host=127.0.0.1 port={replicated.primary.port} replicas=127.0.0.1:{replicated.standby.port}"
    relay = start(make_relay, databases={"*": db},
                  sections="[poolers]\nrb = target=replica pool_mode=transaction default_pool_size=1\n")
    where = "SELECT pg_is_in_recovery(), current_setting('port')"
    assert rows(relay, where) == [["f", str(replicated.primary.port)]]
    # |replica is for the direct port: the pooled TCP port and HTTP refuse it alike
    raw = RawClient(relay.port)
    raw.send(startup_packet("postgres|replica", "postgres"))
    tcp = raw.read_error()
    raw.close()
    r = q(relay, where, cs="postgresql://postgres%7Creplica@h/postgres")
    assert r.status_code == 400
    assert (r.json()["message"], r.json()["code"], r.json()["hint"]) == (tcp["M"], tcp["C"], tcp["H"])
    assert rows(relay, where, cs="postgresql://postgres|rb@h/postgres") == [["t", str(replicated.standby.port)]]
    pids = {rows(relay, "SELECT pg_backend_pid()", cs="postgresql://postgres|rb@h/postgres")[0][0] for _ in range(3)}
    assert len(pids) == 1  # the pooler's pool of one server, released after each request
    assert rows(relay, "SELECT current_user", cs="postgresql://postgres|rb@h/postgres") == [["postgres"]]
    r = q(relay, "SELECT 1", cs="postgresql://postgres|nosuchpooler@h/postgres")
    assert r.status_code == 400 and r.json()["code"]


# -- isolation between requests ---------------------------------------------------------------------------


def test_begin_and_set_never_leak_into_the_next_request(make_relay):
    relay = start(make_relay, settings={"default_pool_size": "1", "admin_users": "postgres"})
    pid = rows(relay, "SELECT pg_backend_pid()")[0][0]
    r = q(relay, "BEGIN ISOLATION LEVEL SERIALIZABLE")
    assert r.status_code == 200 and r.json()["command"] == "BEGIN"
    assert rows(relay, "SELECT pg_backend_pid(), current_setting('transaction_isolation')") == [[pid, "read committed"]]
    assert q(relay, "SET statement_timeout = '12345'").json()["command"] == "SET"
    assert q(relay, "SET application_name = 'leaky'").status_code == 200
    assert rows(relay, "SELECT pg_backend_pid(), current_setting('statement_timeout'), "
                       "current_setting('application_name')") == [[pid, "0", ""]]
    wait_until(lambda: released(relay), timeout=5, message="server released")


def test_the_server_is_released_after_each_request(make_relay):
    relay = start(make_relay, settings={"admin_users": "postgres"})
    for body in [{"query": "SELECT 1"}, {"query": "SELECT 1/0"}, {"query": "BEGIN"},
                 {"queries": [{"query": "SELECT 1"}]}, {"queries": [{"query": "SELECT x"}]}]:
        post(relay, body)
        wait_until(lambda: released(relay), timeout=5, message=f"server released after {body}")
        row = pool_row(relay)
        assert row["sv_idle"] + row["sv_used"] >= 1, row


# -- limits ---------------------------------------------------------------------------------------------


def test_huge_response_gets_507_and_the_server_comes_back_clean(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS http_big; CREATE TABLE http_big (id int)")
    relay = start(make_relay, settings={"serverless_max_response_size": "10000", "default_pool_size": "1",
                                        "admin_users": "postgres"})
    started = time.monotonic()
    r = q(relay, "SELECT repeat('x', 100) FROM generate_series(1, 1000)")
    assert r.status_code == 507 and r.json()["message"] == "response is too large (max is 10000 bytes)"
    r = q(relay, "SELECT repeat('x', 100) FROM generate_series(1, 10000) a, generate_series(1, 10000) b")  # cancelled, not read to its end
    assert r.status_code == 507 and time.monotonic() - started < 5
    r = post(relay, {"queries": [{"query": "INSERT INTO http_big VALUES (1)"},
                                 {"query": "SELECT repeat('y', 100000)"}]})  # one row over the limit
    assert r.status_code == 507
    assert rows(relay, "SELECT count(*) FROM http_big") == [["0"]]  # rolled back
    assert rows(relay, "SHOW transaction_isolation") == [["read committed"]]
    assert len(rows(relay, "SELECT repeat('x', 100) FROM generate_series(1, 50)")) == 50  # under the limit
    wait_until(lambda: released(relay), timeout=5, message="server released")
    assert "server_rollback_timeout" not in relay.log()  # cancelled, not drained for 11 GB


def test_body_over_the_request_limit_gets_413(make_relay):
    relay = start(make_relay, settings={"serverless_max_request_size": "100"})
    r = q(relay, "SELECT $1", ["x" * 200])
    assert r.status_code == 413
    s = raw_http(relay, request_bytes(b'{"query":"SELECT 1","params":["' + b"y" * 200 + b'"]}'))
    assert read_response(s)[0] == 413
    s.close()
    assert_served(relay)


def test_content_length_of_a_gigabyte_gets_413_without_the_body(make_relay):
    relay = start(make_relay)
    head = request_bytes(b"")[:-len(b"Content-Length: 0\r\n\r\n")]
    s = raw_http(relay, head + b"Content-Length: 1000000000\r\n\r\n", timeout=3)
    started = time.monotonic()
    status, _, body, _ = read_response(s)
    assert status == 413 and time.monotonic() - started < 2
    assert json.loads(body)["message"].startswith("request is too large")
    s.close()
    assert_served(relay)


# -- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json", b"", b"[1,2]", b'{"query": 5}', b'{"queries": [{"params": []}]}',
                                  b'{"query": "SELECT 1", "params": "x"}', b"\xff\xfe{}"])
def test_bad_bodies_get_400(make_relay, body):
    relay = start(make_relay)
    r = post(relay, body)
    assert r.status_code == 400 and r.json()["code"] == "" and r.json()["severity"] == ""
    assert r.json()["message"].startswith("could not parse the HTTP request body")
    assert_served(relay)


@pytest.mark.parametrize("cs", [None, "", "mysql://postgres@h/postgres", "postgresql://h/postgres",
                                "postgresql://postgres@h", "postgresql://postgres@h/", "garbage"])
def test_missing_or_malformed_connection_string(make_relay, cs):
    relay = start(make_relay)
    r = q(relay, "SELECT 1", cs=cs)
    assert r.status_code == 400 and r.json()["message"] == "invalid header: neon-connection-string"
    assert_served(relay)


def test_bad_isolation_level(make_relay):
    relay = start(make_relay)
    r = post(relay, {"queries": [{"query": "SELECT 1"}]}, headers={"Neon-Batch-Isolation-Level": "serializable"})
    assert r.status_code == 400 and r.json()["message"] == "invalid isolation level"
    assert_served(relay)


def test_truncated_body_then_close(make_relay):
    relay = start(make_relay)
    body = b'{"query":"SELECT 1"}'
    s = raw_http(relay, request_bytes(body)[:-5])
    time.sleep(0.2)
    s.close()
    assert_served(relay)
    s = raw_http(relay, request_bytes(body)[:-5])
    s.shutdown(socket.SHUT_WR)
    got = closed_within(s, 5)
    assert got is not None and b" 200 " not in got[:20]
    s.close()
    assert_served(relay)


def test_http_1_0_request_is_answered_and_closed(make_relay):
    relay = start(make_relay)
    s = raw_http(relay, request_bytes(b'{"query":"SELECT 6*7"}', version=b"1.0"))
    status, _, body, _ = read_response(s)
    assert status == 200 and json.loads(body)["rows"] == [["42"]]
    assert closed_within(s, 5) == b""
    s.close()
    assert_served(relay)


def test_slow_headers_are_cut_off(make_relay):
    relay = start(make_relay, settings={"serverless_request_timeout": "1"})
    s = raw_http(relay, b"POST /sql HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    got = closed_within(s, 4)
    assert got is not None and time.monotonic() - started < 2.5
    assert got == b"" or got.startswith(b"HTTP/1.1 408")
    s.close()
    assert_served(relay)


def test_keep_alive_serves_two_requests_on_one_connection(make_relay):
    relay = start(make_relay)
    s = raw_http(relay, request_bytes(b'{"query":"SELECT 1"}'))
    status, _, body, rest = read_response(s)
    assert status == 200 and json.loads(body)["rows"] == [["1"]]
    s.sendall(request_bytes(b'{"query":"SELECT 2"}') + request_bytes(b'{"query":"SELECT 3"}'))  # pipelined too
    status, _, body, rest = read_response(s, rest)
    assert status == 200 and json.loads(body)["rows"] == [["2"]]
    status, _, body, rest = read_response(s, rest)
    assert status == 200 and json.loads(body)["rows"] == [["3"]]
    s.close()
    with requests.Session() as session:
        for i in range(2):
            r = session.post(f"http://127.0.0.1:{relay.http}/sql", data=json.dumps({"query": f"SELECT {i}"}),
                             headers={"Neon-Connection-String": CS, "Neon-Raw-Text-Output": "true",
                                      "Neon-Array-Mode": "true"}, timeout=10)
            assert r.json()["rows"] == [[str(i)]]


def test_options_cors_and_other_paths(make_relay):
    relay = start(make_relay)
    r = requests.options(f"http://127.0.0.1:{relay.http}/sql", timeout=10)
    assert r.status_code == 200 and r.headers["allow"] == "OPTIONS, POST"
    assert r.headers["access-control-allow-origin"] == "*" and r.headers["access-control-max-age"] == "86400"
    assert "Neon-Connection-String" in r.headers["access-control-allow-headers"]
    assert "Neon-Batch-Deferrable" in r.headers["access-control-allow-headers"]
    for method, path in [("GET", "/"), ("GET", "/sql"), ("POST", "/other")]:
        r = requests.request(method, f"http://127.0.0.1:{relay.http}{path}", headers={"Neon-Connection-String": CS},
                             timeout=10)
        assert r.status_code == 400 and r.json()["message"] == "query is not supported"
    assert_served(relay)


def test_idle_keep_alive_connection_is_closed_after_serverless_idle_timeout(make_relay):
    relay = start(make_relay, settings={"serverless_idle_timeout": "1"})
    s = raw_http(relay, request_bytes(b'{"query":"SELECT 1"}'))
    status, _, _, rest = read_response(s)
    assert status == 200 and rest == b""
    started = time.monotonic()
    assert closed_within(s, 4) == b"" and 0.8 < time.monotonic() - started < 2.5
    s.close()
    assert_served(relay)


def test_query_timeout_answers_pgrelays_error(make_relay):
    relay = start(make_relay, settings={"query_timeout": "1", "default_pool_size": "1"})
    started = time.monotonic()
    r = q(relay, "SELECT pg_sleep(5)")
    assert r.status_code == 400 and r.json()["code"] == "57014" and time.monotonic() - started < 4, r.text
    r = post(relay, {"queries": [{"query": "SELECT 1"}, {"query": "SELECT pg_sleep(5)"}]})
    assert r.status_code == 400 and r.json()["code"] == "57014", r.text
    assert_served(relay)


def test_a_query_running_past_the_request_timeout_is_abandoned(make_relay):
    relay = start(make_relay, settings={"serverless_request_timeout": "1", "default_pool_size": "1",
                                        "admin_users": "postgres"})
    started = time.monotonic()
    r = q(relay, "SELECT pg_sleep(30)")
    assert r.status_code == 408 and time.monotonic() - started < 3
    assert_served(relay)  # the pool's one server: its query was cancelled and it was rolled back
    wait_until(lambda: released(relay), timeout=5, message="server released")
    assert pool_row(relay)["sv_idle"] + pool_row(relay)["sv_used"] == 1
    assert "closing because: server_rollback_timeout" not in relay.log()


def test_concurrent_requests_share_a_small_pool(make_relay):
    from concurrent.futures import ThreadPoolExecutor
    relay = start(make_relay, settings={"default_pool_size": "2", "admin_users": "postgres"})

    def work(i):
        return [rows(relay, "SELECT $1::int + $2::int, pg_sleep(0.01)::text", [str(i), str(j)])[0][0]
                for j in range(5)]

    with ThreadPoolExecutor(20) as pool:
        got = list(pool.map(work, range(20)))
    assert got == [[str(i + j) for j in range(5)] for i in range(20)]
    wait_until(lambda: released(relay), timeout=5, message="servers released")
    assert pool_row(relay)["sv_idle"] + pool_row(relay)["sv_used"] <= 2


def test_a_large_response_under_the_limit(make_relay):
    relay = start(make_relay)
    started = time.monotonic()
    r = q(relay, "SELECT g, repeat('x', 90) FROM generate_series(1, 80000) g")  # about 8.5 MB of JSON
    assert r.status_code == 200 and len(r.content) > 8_000_000, r.text[:200]
    got = r.json()["rows"]
    assert len(got) == 80000 and got[-1] == ["80000", "x" * 90] and time.monotonic() - started < 10
