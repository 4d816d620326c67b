"""Session state in transaction pooling: parameters follow the client, unmovable state pins it (or is refused), never leaks."""

from __future__ import annotations

import asyncio

import asyncpg
import psycopg
import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, data_rows, error_fields, query_message, startup_packet, wait_until

ROLE = "pgrelay_state_role"


def ports_relay(make_relay, settings=None, **kw):
    """pgrelay in transaction mode with a session port and a direct port."""
    session, direct = free_port(), free_port()
    base = {"pool_mode": "transaction", "default_pool_size": 2, "admin_users": "postgres"}
    base.update(settings or {})
    relay = make_relay(base, extra_sections=f"[listeners]\nsession = port={session} pool_mode=session\n"
                                            f"direct = port={direct} role=direct\n", **kw)
    relay.session_port, relay.direct_port = session, direct
    return relay


def connect(relay, port=None, **kw) -> psycopg.Connection:
    # prepare_threshold=None: protocol-level prepared statements are another feature's tests.
    extra = {"port": port} if port else {}
    return psycopg.connect(relay.dsn(**extra, **kw), autocommit=True, prepare_threshold=None)


def one(conn, sql):
    return conn.execute(sql).fetchone()


def admin_rows(relay, sql):
    conn = psycopg2.connect(relay.dsn(dbname="pgbouncer"), connect_timeout=10)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
    finally:
        conn.close()


def pinned(relay) -> int:
    return sum(r["pinned"] for r in admin_rows(relay, "SHOW ROUTES") if r["database"] == "postgres")


@pytest.fixture(scope="module")
def state_role(pg):
    pg.psql(f"DO $$BEGIN CREATE ROLE {ROLE}; EXCEPTION WHEN duplicate_object THEN NULL; END$$")
    pg.psql(f"GRANT {ROLE} TO postgres")
    return ROLE


# -- parameters ----------------------------------------------------------------------------------

SHOW3 = ("SELECT current_setting('search_path'), current_setting('statement_timeout'), "
         "current_setting('default_transaction_isolation'), pg_backend_pid()")


@pytest.mark.parametrize("port_kind", ["transaction", "session"])
def test_startup_options_are_in_force_on_every_transaction(make_relay, pg, port_kind):
    # session pooling: a server per client (a queued client would only wait)
    relay = ports_relay(make_relay, {"default_pool_size": 3 if port_kind == "session" else 2})
    port = relay.session_port if port_kind == "session" else None
    a = connect(relay, port, options="-c search_path=alpha,public -c statement_timeout=3s "
                                     "-c default_transaction_isolation=serializable")
    b = connect(relay, port, options="-c search_path=beta -c statement_timeout=1min")
    c = connect(relay, port)
    default_path = pg.psql("SHOW search_path")
    try:
        pids = set()
        for _ in range(15):
            for conn, want in ((a, ("alpha,public", "3s", "serializable")), (b, ("beta", "1min", "read committed")),
                               (c, (default_path, "0", "read committed"))):
                got = one(conn, SHOW3)
                assert got[:3] == want
                pids.add(got[3])
                with conn.transaction():  # inside explicit transactions too
                    assert one(conn, SHOW3)[:3] == want
                    assert one(conn, "SELECT current_setting('transaction_isolation')")[0] == want[2]
        if port_kind == "transaction":
            assert len(pids) <= 2  # three clients shared the pool's two servers
    finally:
        a.close()
        b.close()
        c.close()


def test_startup_parameters_of_drivers_psycopg2_and_asyncpg(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    p2 = psycopg2.connect(relay.dsn(options="-c statement_timeout=2500 -c idle_in_transaction_session_timeout=7s"))
    p2.autocommit = True

    async def run():
        conn = await asyncpg.connect(host="127.0.0.1", port=relay.port, user="postgres", database="postgres",
                                     statement_cache_size=0,
                                     server_settings={"search_path": "gamma", "default_transaction_read_only": "on"})
        try:
            out = []
            for _ in range(5):
                out.append(await conn.fetchrow("SELECT current_setting('search_path'), "
                                               "current_setting('default_transaction_read_only')"))
                with p2.cursor() as cur:
                    cur.execute("SELECT current_setting('statement_timeout'), "
                                "current_setting('idle_in_transaction_session_timeout'), "
                                "current_setting('default_transaction_read_only')")
                    out.append(cur.fetchone())
            return out
        finally:
            await conn.close()

    try:
        out = asyncio.run(run())
        assert [tuple(r) for r in out[0::2]] == [("gamma", "on")] * 5
        assert out[1::2] == [("2500ms", "7s", "off")] * 5
    finally:
        p2.close()


def login_error(port, **params) -> dict:
    raw = RawClient(port)
    try:
        raw.send(startup_packet(**params))
        kind, body = raw.read_message()
        while kind in (b"R", b"S"):  # PostgreSQL applies options after AuthenticationOk
            kind, body = raw.read_message()
        assert kind == b"E", (kind, body)
        fields = error_fields(body)
        assert raw.closed()
        return {k: fields.get(k) for k in "SVCMDH"}
    finally:
        raw.close()


@pytest.mark.parametrize("port_kind", ["transaction", "session"])
def test_bad_startup_parameter_gets_postgresql_own_error(make_relay, pg, port_kind):
    relay = ports_relay(make_relay)
    port = relay.session_port if port_kind == "session" else relay.port
    for params, sqlstate in (({"options": "-c no_such_parameter=1"}, "42704"),
                             ({"options": "-c statement_timeout=banana"}, "22023"),
                             ({"work_mem": "lots"}, "22023"), ({"options": "-c no_such.thing2=x -c lock_timeout=1s"}, None)):
        want = login_error(pg.port, **params) if sqlstate else None
        if sqlstate is None:  # a custom (dotted) name is accepted, as by PostgreSQL
            with connect(relay, None if port_kind == "transaction" else port, **params) as conn:
                assert one(conn, "SELECT current_setting('no_such.thing2'), current_setting('lock_timeout')") == \
                    ("x", "1s")
            continue
        assert want["C"] == sqlstate and want["S"] == "FATAL"
        assert login_error(port, **params) == want
    assert one(connect(relay), "SELECT 1") == (1,)  # the pool is fine


def test_ignore_startup_parameters_still_drops(make_relay):
    relay = ports_relay(make_relay, {"ignore_startup_parameters": "extra_float_digits, statement_timeout"})
    with connect(relay, options="-c statement_timeout=5s") as conn:
        assert one(conn, "SHOW statement_timeout") == ("0",)
    raw = RawClient(relay.port)
    raw.send(startup_packet(replication="database"))
    assert raw.read_error()["M"] == "unsupported startup parameter: replication"
    raw.close()


def test_set_follows_its_client_and_is_never_seen_by_another(make_relay, pg):
    relay = ports_relay(make_relay, {"default_pool_size": 2})
    a, b, c = connect(relay), connect(relay), connect(relay)
    default_path = pg.psql("SHOW search_path")
    try:
        a.execute("SET search_path = mine, public")
        a.execute("SET work_mem = '7MB'")
        a_pids, others = set(), set()
        for i in range(20):
            # b holds a server inside a transaction now and then, so a moves between servers
            if i % 2:
                b.execute("BEGIN")
                b.execute("SELECT 1")
            got = one(a, "SELECT current_setting('search_path'), current_setting('work_mem'), pg_backend_pid()")
            assert got[:2] == ("mine, public", "7MB")
            a_pids.add(got[2])
            got = one(c, "SELECT current_setting('search_path'), current_setting('work_mem'), pg_backend_pid()")
            assert got[:2] == (default_path, "4MB")
            others.add(got[2])
            if i % 2:
                assert one(b, "SHOW search_path") == (default_path,)
                b.execute("COMMIT")
        assert len(a_pids) == 2 and others & a_pids  # a ran on both servers; c shared them
        # SET LOCAL and a rolled back SET do not follow the client; RESET does.
        with a.transaction():
            a.execute("SET LOCAL work_mem = '9MB'")
            assert one(a, "SHOW work_mem") == ("9MB",)
        a.execute("BEGIN")
        a.execute("SET search_path = rolled_back")
        a.execute("ROLLBACK")
        for _ in range(4):
            assert one(a, "SELECT current_setting('search_path'), current_setting('work_mem')") == \
                ("mine, public", "7MB")
            assert one(c, "SHOW work_mem") == ("4MB",)
        a.execute("RESET work_mem")
        a.execute("SELECT set_config('statement_timeout', '4s', false)")  # no SET tag: seen in the text
        for _ in range(4):
            assert one(a, "SELECT current_setting('work_mem'), current_setting('statement_timeout')") == ("4MB", "4s")
            assert one(c, "SELECT current_setting('statement_timeout')") == ("0",)
        a.execute("RESET ALL")
        for _ in range(4):
            assert one(a, "SELECT current_setting('search_path'), current_setting('statement_timeout')") == \
                (default_path, "0")
    finally:
        a.close()
        b.close()
        c.close()


def test_reset_goes_back_to_the_startup_value(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    a, b = connect(relay, options="-c statement_timeout=3s"), connect(relay)
    try:
        a.execute("SET statement_timeout = '9s'")
        assert one(b, "SHOW statement_timeout") == ("0",)
        assert one(a, "SHOW statement_timeout") == ("9s",)
        a.execute("RESET statement_timeout")
        assert one(b, "SHOW statement_timeout") == ("0",)
        assert one(a, "SHOW statement_timeout") == ("3s",)  # as PostgreSQL: RESET goes to the startup value
    finally:
        a.close()
        b.close()


# -- item 5: tracked values never go stale -----------------------------------------------------------

@pytest.mark.parametrize("mode", ["session", "transaction"])
def test_tracked_statement_timeout_never_stale_on_reused_servers(make_relay, mode):
    relay = make_relay({"pool_mode": mode, "default_pool_size": 1,
                        "track_extra_parameters": "IntervalStyle, statement_timeout"})
    pids = set()
    for round_ in range(3):
        # the same value twice in a row (the server's old record of it must not skip the SET), none
        # after some (the previous client's must not stay), another value, none again
        for options, want in (("-c statement_timeout=3s", "3s"), ("-c statement_timeout=3s", "3s"), ("", "0"),
                              ("-c statement_timeout=5s", "5s"), ("", "0")):
            kw = {"options": options} if options else {}
            with connect(relay, **kw) as conn:
                for _ in range(3):
                    got = one(conn, "SELECT current_setting('statement_timeout'), pg_backend_pid()")
                    assert got[0] == want, (round_, options)
                    pids.add(got[1])
    assert len(pids) == 1  # always the same, reused server
    if mode == "transaction":  # concurrent clients on one shared server
        a, b = connect(relay, options="-c statement_timeout=3s"), connect(relay)
        try:
            for _ in range(5):
                assert one(a, "SHOW statement_timeout") == ("3s",)
                assert one(b, "SHOW statement_timeout") == ("0",)
        finally:
            a.close()
            b.close()


# -- state that cannot move ----------------------------------------------------------------------------

# name: (create it, use it -> expected first column, clear it)
STATES = {
    "prepare": ("PREPARE st_p AS SELECT 42", "EXECUTE st_p", 42, "DEALLOCATE st_p"),
    "temp_table": ("CREATE TEMP TABLE st_t (x int)", "SELECT count(*) FROM st_t", 0, "DROP TABLE st_t"),
    "temp_table_as": ("CREATE TEMP TABLE st_t2 AS SELECT 42 AS x", "SELECT x FROM st_t2", 42, "DROP TABLE st_t2"),
    "advisory_lock": ("SELECT pg_advisory_lock(4242)",
                      "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()", 1,
                      "SELECT pg_advisory_unlock_all()"),
    "with_hold_cursor": ("DECLARE st_c CURSOR WITH HOLD FOR SELECT generate_series(1, 1000)", "FETCH 1 FROM st_c",
                         None, "CLOSE st_c"),
    # LISTEN outside a transaction block is served by the pool's listening server (no pin); inside
    # one it runs on the client's server, which then pins it
    "listen": (["BEGIN", "LISTEN st_channel", "COMMIT"], "SELECT count(*) FROM pg_listening_channels()", 1,
               "UNLISTEN st_channel"),
    "set_role": (f"SET ROLE {ROLE}", "SELECT current_user::text", ROLE, "RESET ROLE"),
    "session_authorization": (f"SET SESSION AUTHORIZATION {ROLE}", "SELECT session_user::text", ROLE,
                              "RESET SESSION AUTHORIZATION"),
    "discard_all": ("PREPARE st_d AS SELECT 42", "EXECUTE st_d", 42, "DISCARD ALL"),
}

CLEAN_SQL = ("SELECT (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), "
             "(SELECT count(*) FROM pg_cursors), (SELECT count(*) FROM pg_listening_channels()), "
             "(SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()), "
             "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
             "current_user::text = session_user::text AND session_user::text = 'postgres', pg_backend_pid()")
CLEAN = (0, 0, 0, 0, 0, True)


def run(conn, sql):
    for statement in sql if isinstance(sql, list) else [sql]:
        conn.execute(statement)


@pytest.mark.parametrize("state", list(STATES))
def test_pin_keeps_the_state_working_and_ends_when_cleared(make_relay, state_role, state):
    create, use, expected, clear = STATES[state]
    relay = ports_relay(make_relay, {"default_pool_size": 2})
    a, b, c = connect(relay), connect(relay), connect(relay)
    try:
        run(a, create)
        pid = one(a, "SELECT pg_backend_pid()")[0]
        assert wait_until(lambda: pinned(relay) == 1)
        for _ in range(10):
            got = one(a, use)
            if expected is not None:
                assert got[0] == expected
            assert one(a, "SELECT pg_backend_pid()") == (pid,)
            # the others are served by the other server, and see none of a's state
            other = one(b, CLEAN_SQL)
            assert other[:6] == CLEAN and other[6] != pid
            assert one(c, CLEAN_SQL)[:6] == CLEAN
        if state == "listen":
            b.execute("NOTIFY st_channel, 'hello'")
            one(a, "SELECT 1")
            assert [n.payload for n in a.notifies(timeout=2, stop_after=1)] == ["hello"]
        a.execute(clear)
        assert wait_until(lambda: pinned(relay) == 0)
        assert one(a, CLEAN_SQL)[:6] == CLEAN
        # unpinned: b may get a's former server again, and it is clean
        seen = {one(b, CLEAN_SQL) for _ in range(6)}
        assert all(row[:6] == CLEAN for row in seen)
    finally:
        a.close()
        b.close()
        c.close()
    assert "pinned to" in relay.log() and "unpinned" in relay.log()


def test_pinned_client_leaving_leaves_a_clean_server(make_relay, state_role):
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    a = connect(relay)
    for state in ("prepare", "temp_table", "advisory_lock", "with_hold_cursor", "listen", "set_role"):
        run(a, STATES[state][0])
    a.execute("SET work_mem = '9MB'")
    assert wait_until(lambda: pinned(relay) == 1)
    a.close()
    assert wait_until(lambda: pinned(relay) == 0)
    with connect(relay) as b:
        assert one(b, CLEAN_SQL)[:6] == CLEAN
        assert one(b, "SHOW work_mem") == ("4MB",)


def pinned_metric(relay) -> float:
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(relay.metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "pgrelay_pools_client_pinned_connections":
            return sum(s.value for s in family.samples if s.labels.get("database") == "postgres")
    raise AssertionError("no pgrelay_pools_client_pinned_connections metric")


def test_pinned_pool_serves_others_and_counts_the_pin(make_relay, state_role):
    port = free_port()
    relay = ports_relay(make_relay, {"default_pool_size": 2, "metrics_listen": f"127.0.0.1:{port}"})
    relay.metrics_url = f"http://127.0.0.1:{port}/metrics"
    pinned_clients = [connect(relay) for _ in range(1)]
    others = [connect(relay) for _ in range(5)]
    try:
        pinned_clients[0].execute("PREPARE hold_it AS SELECT 1")
        assert wait_until(lambda: pinned(relay) == 1)
        for _ in range(10):
            for conn in others:
                assert one(conn, "SELECT 1") == (1,)
        pools = [r for r in admin_rows(relay, "SHOW POOLS") if r["database"] == "postgres"]
        assert "pinned" not in pools[0]  # PgBouncer's SHOW POOLS keeps its columns
        assert pinned_metric(relay) == 1
        pinned_clients[0].execute("DEALLOCATE hold_it")
        assert wait_until(lambda: pinned(relay) == 0 and pinned_metric(relay) == 0)
    finally:
        for conn in pinned_clients + others:
            conn.close()


def test_server_dying_under_a_pinned_client(make_relay, pg):
    relay = ports_relay(make_relay, {"default_pool_size": 2})
    a = connect(relay)
    try:
        a.execute("PREPARE gone AS SELECT 1")
        pid = one(a, "SELECT pg_backend_pid()")[0]
        assert wait_until(lambda: pinned(relay) == 1)
        pg.psql(f"SELECT pg_terminate_backend({pid})")
        assert wait_until(lambda: pinned(relay) == 0)
        # transaction pooling keeps the idle client: its next query runs on another server, where
        # its prepared statement is gone with the server, as after a PostgreSQL restart
        assert one(a, "SELECT pg_backend_pid()")[0] != pid
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            a.execute("EXECUTE gone")
        assert one(a, "SELECT 1") == (1,)
    finally:
        a.close()


# -- session_state = error and allow --------------------------------------------------------------------

@pytest.mark.parametrize("state", [s for s in STATES if s != "discard_all"])
def test_error_refuses_and_leaves_the_server_clean(make_relay, state_role, state):
    create = STATES[state][0]
    relay = ports_relay(make_relay, {"default_pool_size": 1, "session_state": "error"})
    a, b = connect(relay), connect(relay)
    try:
        with pytest.raises(psycopg.errors.FeatureNotSupported) as info:
            run(a, create)
        if a.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            a.execute("ROLLBACK")
        diag = info.value.diag
        assert "session state cannot be kept in transaction pooling" in diag.message_primary
        assert f"session port {relay.session_port}" in diag.message_hint
        assert f"direct port {relay.direct_port}" in diag.message_hint
        assert one(b, CLEAN_SQL)[:6] == CLEAN
        assert one(a, CLEAN_SQL)[:6] == CLEAN
        assert pinned(relay) == 0
        # inside a transaction block: the transaction is aborted, as by an ERROR in PostgreSQL
        a.execute("BEGIN")
        a.execute("SELECT 1")
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            run(a, [sql for sql in (create if isinstance(create, list) else [create])
                    if sql not in ("BEGIN", "COMMIT")])
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            a.execute("SELECT 1")
        a.execute("ROLLBACK")
        assert one(b, CLEAN_SQL)[:6] == CLEAN
        assert one(a, "SELECT 1") == (1,)
    finally:
        a.close()
        b.close()
    # the same statements work on the session port
    with connect(relay, relay.session_port) as s:
        run(s, create)


def test_error_mode_keeps_movable_settings(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1, "session_state": "error"})
    a, b = connect(relay), connect(relay)
    try:
        a.execute("BEGIN")
        a.execute("SET LOCAL work_mem = '9MB'")
        a.execute("CREATE TABLE IF NOT EXISTS st_plain (x int)")  # not temporary: fine
        a.execute("COMMIT")
        a.execute("SET work_mem = '8MB'")
        assert one(a, "SHOW work_mem") == ("8MB",)
        assert one(b, "SHOW work_mem") == ("4MB",)
        assert one(a, "SHOW work_mem") == ("8MB",)
        a.execute("DROP TABLE st_plain")
    finally:
        a.close()
        b.close()


def test_allow_is_pgbouncers_unsafe_behaviour(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1, "session_state": "allow"})
    a, b = connect(relay), connect(relay)
    try:
        a.execute("PREPARE leaks AS SELECT 1")
        assert pinned(relay) == 0
        # documented as unsafe: the next client of that server sees it
        assert one(b, "SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaks'") == (1,)
        a.execute("DEALLOCATE leaks")
        a.execute("SET work_mem = '6MB'")  # parameters still follow their client
        assert one(b, "SHOW work_mem") == ("4MB",)
        assert one(a, "SHOW work_mem") == ("6MB",)
    finally:
        a.close()
        b.close()


def test_session_state_setting_is_reloadable(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    conn = psycopg2.connect(relay.dsn(dbname="pgbouncer"))
    conn.autocommit = True
    conn.cursor().execute("SET session_state = 'error'")
    with pytest.raises(psycopg2.Error):
        conn.cursor().execute("SET session_state = 'sometimes'")
    conn.close()
    with connect(relay) as a:
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            a.execute("PREPARE nope AS SELECT 1")


def test_connect_query_settings_are_the_pools_defaults(make_relay, pg):
    relay = ports_relay(make_relay, {"default_pool_size": 1},
                        databases={"*": f"host=127.0.0.1 port={pg.port} "
                                        "connect_query='SET search_path = from_connect, public'"})
    a, b = connect(relay), connect(relay)
    try:
        a.execute("SET work_mem = '5MB'")  # a probe of the shared server sees connect_query's SET too
        for _ in range(4):
            assert one(b, "SELECT current_setting('search_path'), current_setting('work_mem')") == \
                ("from_connect, public", "4MB")
            assert one(a, "SELECT current_setting('search_path'), current_setting('work_mem')") == \
                ("from_connect, public", "5MB")
        a.execute("SET search_path = own")
        assert one(b, "SHOW search_path") == ("from_connect, public",)
        assert one(a, "SHOW search_path") == ("own",)
    finally:
        a.close()
        b.close()


def test_probe_is_not_cancelled_by_a_short_statement_timeout(make_relay):
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    a, b = connect(relay, options="-c statement_timeout=30ms"), connect(relay)
    try:
        for i in range(10):
            a.execute(f"SET work_mem = '{5 + i}MB'")  # each one probed, under a's 30 ms timeout lifted
            assert one(a, "SELECT current_setting('statement_timeout'), current_setting('work_mem')") == \
                ("30ms", f"{5 + i}MB")
            assert one(b, "SELECT current_setting('statement_timeout'), current_setting('work_mem')") == ("0", "4MB")
        with pytest.raises(psycopg.errors.QueryCanceled):
            a.execute("SELECT pg_sleep(1)")  # a's own timeout is in force
        a.execute("SET statement_timeout = '40ms'")
        assert one(b, "SHOW statement_timeout") == ("0",)
        assert one(a, "SHOW statement_timeout") == ("40ms",)
    finally:
        a.close()
        b.close()


def test_statement_pooling_and_pipelined_queries(make_relay):
    relay = ports_relay(make_relay, {"pool_mode": "statement", "default_pool_size": 1})
    a, b = connect(relay), connect(relay)
    try:
        a.execute("SET search_path = stmt_mode")
        assert one(b, "SHOW search_path") != ("stmt_mode",)
        assert one(a, "SHOW search_path") == ("stmt_mode",)
        a.execute("PREPARE in_statement_mode AS SELECT 7")
        assert one(a, "EXECUTE in_statement_mode") == (7,)
        a.execute("DEALLOCATE in_statement_mode")
        assert one(b, CLEAN_SQL)[:6] == CLEAN
    finally:
        a.close()
        b.close()
    # a SET and a query pipelined in one read: the probe waits for the last ReadyForQuery
    relay = ports_relay(make_relay, {"default_pool_size": 1})
    raw = RawClient(relay.port)
    raw.login()
    raw.send(query_message("SET work_mem = '3MB'") + query_message("SHOW work_mem"))
    raw.read_until(b"Z")
    assert data_rows(raw.read_until(b"Z")) == [["3MB"]]
    with connect(relay) as other:
        assert one(other, "SHOW work_mem") == ("4MB",)
    assert data_rows(raw.query("SHOW work_mem")) == [["3MB"]]
    raw.close()


def test_advisory_lock_in_a_named_prepared_statement_is_seen_on_every_execution(make_relay):
    """asyncpg prepares its statements: the text is sent once, executions are Bind/Execute only."""
    relay = ports_relay(make_relay, {"default_pool_size": 2})

    async def run():
        a = await asyncpg.connect(host="127.0.0.1", port=relay.port, user="postgres", database="postgres")
        b = await asyncpg.connect(host="127.0.0.1", port=relay.port, user="postgres", database="postgres")
        try:
            lock = await a.prepare("SELECT pg_advisory_lock($1)")
            unlock_all = await a.prepare("SELECT pg_advisory_unlock_all()")
            # the checks' own text must not name what is watched for ('advis' || 'ory')
            count = "SELECT count(*) FROM pg_locks WHERE locktype = 'advis' || 'ory' AND pid = pg_backend_pid()"
            for key in (1, 2, 3):
                await unlock_all.fetchval()
                await lock.fetchval(key)  # Bind/Execute of a statement prepared earlier
                for _ in range(4):
                    assert await b.fetchval(count) == 0  # never on b's server
                assert await a.fetchval(count) == 1
            await unlock_all.fetchval()
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())
    assert wait_until(lambda: pinned(relay) == 0)
