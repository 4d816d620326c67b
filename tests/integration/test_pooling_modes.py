"""Pool modes (session, transaction, statement), per-database/per-user pool_mode, FIFO waiting and no lost clients."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from ..support import RawClient, connect, error_fields, query_message, scalar, wait_until

STATEMENT_REFUSAL = "transaction blocks not allowed in statement pooling mode"




def backend_pid(conn) -> int:
    return scalar(conn, "SELECT pg_backend_pid()")


def ensure_role(pg, name: str) -> None:
    pg.psql(f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{name}') "
            f"THEN CREATE ROLE {name} LOGIN SUPERUSER; END IF; END$$")


def fresh_client_works(relay, **kw) -> None:
    conn = connect(relay, **kw)
    try:
        assert scalar(conn, "SELECT 6 * 7") == 42
    finally:
        conn.close()


def refused_begin(relay, **kw) -> dict[str, str]:
    """Send BEGIN from a raw client; return the ErrorResponse fields it got before being closed."""
    raw = RawClient(relay.port)
    raw.login(**kw)
    raw.send(query_message("BEGIN"))
    msgs = []
    try:
        while True:
            msgs.append(raw.read_message())
    except (EOFError, ConnectionResetError):
        pass
    finally:
        raw.close()
    errors = [body for kind, body in msgs if kind == b"E"]
    assert len(errors) == 1, msgs
    assert msgs[-1][0] == b"E", msgs  # the refusal is the last thing the client hears
    return error_fields(errors[0])


# -- session mode ---------------------------------------------------------------------------------

@pytest.mark.smoke
def test_session_mode_keeps_one_server_and_resets_it_for_the_next_client(make_relay, pg):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 1})
    first = connect(relay)
    pid = backend_pid(first)
    first.autocommit = False
    for _ in range(3):  # several transactions, one server
        assert backend_pid(first) == pid
        first.commit()
    first.autocommit = True
    with first.cursor() as cur:
        cur.execute("SET myapp.x = '1'")
    assert scalar(first, "SELECT current_setting('myapp.x', true)") == "1"
    assert scalar(first, "SHOW myapp.x") == "1"  # a SET persists across statements in session mode
    first.close()

    # server_reset_query (DISCARD ALL) ran on the released server before it went back to the pool.
    wait_until(lambda: pg.psql(f"SELECT state || '|' || query FROM pg_stat_activity WHERE pid = {pid}")
               == "idle|DISCARD ALL", message="DISCARD ALL on the released server")

    second = connect(relay)
    try:
        assert backend_pid(second) == pid  # the same server was reused...
        # ...after the reset: the placeholder exists ('' after RESET) but the value is gone.
        assert scalar(second, "SELECT current_setting('myapp.x', true)") == ""
    finally:
        second.close()


def test_session_mode_clients_hold_distinct_servers(make_relay):
    relay = make_relay({"pool_mode": "session", "default_pool_size": 2})
    a, b = connect(relay), connect(relay)
    try:
        pids_a = [backend_pid(a), None, None]
        pids_b = [backend_pid(b), None, None]
        for i in (1, 2):
            pids_a[i] = backend_pid(a)
            pids_b[i] = backend_pid(b)
        assert len(set(pids_a)) == 1 and len(set(pids_b)) == 1
        assert pids_a[0] != pids_b[0]
    finally:
        a.close()
        b.close()


# -- transaction mode ------------------------------------------------------------------------------

@pytest.mark.smoke
def test_transaction_mode_alternating_clients_share_one_server(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a, b = connect(relay), connect(relay)
    try:
        pids = []
        for _ in range(5):
            pids.append(backend_pid(a))
            pids.append(backend_pid(b))
        assert len(set(pids)) == 1, pids
    finally:
        a.close()
        b.close()


def test_transaction_mode_transaction_block_keeps_one_server(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    a, b = connect(relay), connect(relay)
    try:
        with a.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT pg_backend_pid()")
            held = cur.fetchone()[0]
            cur.execute("SET LOCAL myapp.tx = 'inside'")
            others = {backend_pid(b) for _ in range(4)}  # b gets the other server meanwhile
            assert held not in others and len(others) == 1
            cur.execute("SELECT pg_backend_pid(), current_setting('myapp.tx')")
            assert cur.fetchone() == (held, "inside")
            cur.execute("COMMIT")
        # After COMMIT the server is back in the pool; idle servers are reused LIFO, so b gets it now.
        assert backend_pid(b) == held
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("reset_always", [False, True], ids=["no_reset", "reset_always"])
def test_transaction_mode_server_reset_query_only_with_reset_always(make_relay, pg, reset_always):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1,
                        "server_reset_query_always": int(reset_always)})
    a = connect(relay, options="-c TimeZone=Asia/Tokyo")
    pid = backend_pid(a)
    with a.cursor() as cur:
        cur.execute("SET myapp.x = '1'")  # session-level, outside a transaction
    if reset_always:
        wait_until(lambda: pg.psql(f"SELECT query FROM pg_stat_activity WHERE pid = {pid}") == "DISCARD ALL",
                   message="DISCARD ALL after the transaction")
    # The client's own tracked parameter is re-applied even after a reset.
    assert scalar(a, "SHOW TimeZone") == "Asia/Tokyo"
    a.close()

    b = connect(relay)
    try:
        assert backend_pid(b) == pid
        seen = scalar(b, "SELECT current_setting('myapp.x', true)")
        if reset_always:
            assert seen == ""
        else:
            assert seen == "1"  # documented PgBouncer behaviour: session state leaks in transaction mode
        assert scalar(b, "SHOW TimeZone") == pg.psql("SHOW TimeZone")
    finally:
        b.close()


# -- statement mode --------------------------------------------------------------------------------

@pytest.mark.smoke
def test_statement_mode_single_statements_work_and_begin_is_refused(make_relay):
    relay = make_relay({"pool_mode": "statement", "default_pool_size": 1})
    a, b = connect(relay), connect(relay)
    try:
        pids = {backend_pid(a), backend_pid(b), backend_pid(a)}
        assert len(pids) == 1
        assert scalar(a, "SELECT count(*) FROM generate_series(1, 100)") == 100
    finally:
        a.close()
        b.close()

    fields = refused_begin(relay)
    assert fields["M"] == STATEMENT_REFUSAL
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08P01"
    fresh_client_works(relay)
    assert STATEMENT_REFUSAL in relay.log()


# -- per-database and per-user pool_mode -----------------------------------------------------------

def test_pool_mode_per_database_and_per_user(make_relay, pg):
    ensure_role(pg, "pgrelay_sess_user")
    ensure_role(pg, "pgrelay_stmt_user")
    target = f"host=127.0.0.1 port={pg.port}"
    relay = make_relay(
        {"pool_mode": "transaction", "default_pool_size": 2},
        databases={"sessdb": f"{target} dbname=postgres pool_mode=session", "*": target},
        users={"pgrelay_sess_user": "pool_mode=session", "pgrelay_stmt_user": "pool_mode=statement"})

    def pids_of_two_clients(**kw):
        a, b = connect(relay, **kw), connect(relay, **kw)
        try:
            return [backend_pid(a), backend_pid(b), backend_pid(a), backend_pid(b)]
        finally:
            a.close()
            b.close()

    # Global transaction mode: alternating clients reuse the most recently used server.
    p = pids_of_two_clients()
    assert len(set(p)) == 1, p
    # [databases] pool_mode=session: each client keeps its own server.
    p = pids_of_two_clients(dbname="sessdb")
    assert p[0] == p[2] and p[1] == p[3] and p[0] != p[1], p
    # [users] pool_mode=session overrides the global transaction mode.
    p = pids_of_two_clients(user="pgrelay_sess_user")
    assert p[0] == p[2] and p[1] == p[3] and p[0] != p[1], p
    # [users] pool_mode=statement overrides the database's session mode.
    fields = refused_begin(relay, user="pgrelay_stmt_user", database="sessdb")
    assert fields["M"] == STATEMENT_REFUSAL
    # The session-mode database allows transaction blocks.
    conn = connect(relay, dbname="sessdb")
    try:
        conn.autocommit = False
        assert scalar(conn, "SELECT 1") == 1
        conn.commit()
    finally:
        conn.close()
    fresh_client_works(relay, user="pgrelay_stmt_user", dbname="sessdb")


# -- waiting clients -------------------------------------------------------------------------------

def test_waiting_clients_are_served_first_in_first_out(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS modes_fifo; CREATE TABLE modes_fifo (id serial PRIMARY KEY, name text, pid int)")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    holder = psycopg2.connect(relay.dsn())
    with holder.cursor() as cur:
        cur.execute("SELECT pg_backend_pid()")  # psycopg2 opened a transaction: the server is held
        held = cur.fetchone()[0]
    waiters = {}
    for name in "ABC":
        raw = RawClient(relay.port)
        raw.login()
        raw.send(query_message(f"INSERT INTO modes_fifo (name, pid) VALUES ('{name}', pg_backend_pid())"))
        waiters[name] = raw
        time.sleep(0.3)  # let pgrelay read the query and queue the client before the next one
    assert pg.psql("SELECT count(*) FROM modes_fifo") == "0"
    holder.commit()
    for name, raw in waiters.items():
        msgs = raw.read_until(b"Z")
        assert (b"C", b"INSERT 0 1\0") in msgs, msgs
        assert msgs[-1] == (b"Z", b"I")
        raw.close()
    holder.close()
    rows = pg.psql("SELECT name || ':' || pid FROM modes_fifo ORDER BY id").splitlines()
    assert rows == [f"A:{held}", f"B:{held}", f"C:{held}"]


def test_thirty_waiting_clients_on_two_servers_lose_nothing(make_relay, pg):
    pg.psql("DROP TABLE IF EXISTS modes_many; CREATE TABLE modes_many (n int PRIMARY KEY, pid int)")
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 2})
    barrier = threading.Barrier(30)
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            conn = connect(relay)
            try:
                barrier.wait(timeout=30)
                with conn.cursor() as cur:
                    cur.execute("INSERT INTO modes_many SELECT %s, pg_backend_pid() FROM pg_sleep(0.02)", (n,))
                    assert cur.rowcount == 1
            finally:
                conn.close()
        except BaseException as exc:  # reported below, with the client number
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert pg.psql("SELECT count(*) FROM modes_many") == "30"
    assert pg.psql("SELECT sum(n) FROM modes_many") == str(sum(range(30)))
    assert pg.psql("SELECT count(DISTINCT pid) FROM modes_many") == "2"
