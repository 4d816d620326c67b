"""query_timeout, transaction_timeout, query_wait_notify, pool_idle_timeout, and the [users] and
[databases] (and [clusters]) values of every timeout winning over the global ones.

As in PgBouncer 1.26, a timeout on a linked server closes the server and then the client, with
a FATAL with PgBouncer's text, the SQLSTATE of POOLER_SQLSTATE and a hint; a queued client just
goes. Timing: pgrelay's janitor looks every 0.5 s, so a timeout fires no earlier than its time and
within about one period after it.
"""

from __future__ import annotations

import threading
import time

import pytest

from ..support import (POOLER_SQLSTATE, RawClient, assert_served, connect, error_fields, query_message, scalar,
                       wait_until)
from .test_settings_enforced import ensure_role

QUEUED = "No server connection available in postgres backend, client being queued"


class Watch:
    """Reads `raw` in a thread until an ErrorResponse comes; keeps its fields and arrival time.
    With `busy`, the client sends `SELECT 1` every 0.2 s meanwhile (a transaction that keeps working)."""

    def __init__(self, raw: RawClient, busy: bool = False):
        self.raw, self.busy = raw, busy
        self.fields: dict[str, str] | None = None
        self.at = 0.0
        self.replies = 0
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        raw = self.raw
        raw.sock.settimeout(15)
        try:
            while True:
                if self.busy:
                    try:
                        raw.send(query_message("SELECT 1"))
                    except OSError:
                        pass  # closed already: the FATAL is waiting to be read
                while True:
                    kind, body = raw.read_message()
                    if kind == b"E":
                        self.fields, self.at = error_fields(body), time.monotonic()
                        return
                    if kind == b"Z":
                        self.replies += 1
                        break
                if self.busy:
                    time.sleep(0.2)
        except BaseException as exc:  # recorded and asserted on
            self.failure = exc

    def assert_fatal(self, message: str, since: float, timeout: float) -> None:
        """FATAL `message` with its SQLSTATE (POOLER_SQLSTATE) and a hint, `timeout` to one janitor
        period (plus slack) after `since`, then the close."""
        self.thread.join(timeout + 8)
        assert self.fields is not None, f"no error ({self.failure!r})"
        assert (self.fields["S"], self.fields["C"], self.fields["M"]) == ("FATAL", POOLER_SQLSTATE[message], message), \
            self.fields
        assert self.fields.get("H"), f"no hint with {message!r}"
        waited = self.at - since
        assert timeout <= waited < timeout + 1.5, (message, waited)
        assert self.raw.closed()

    def assert_quiet(self) -> None:
        assert self.fields is None and self.failure is None, (self.fields, self.failure)


def raw_client(relay, user: str = "postgres", database: str = "postgres") -> RawClient:
    raw = RawClient(relay.port)
    raw.login(user=user, database=database)
    return raw


def in_transaction(relay, **kw):
    """A psycopg2 client inside a transaction (in transaction pooling it holds its server)."""
    conn = connect(relay, **kw)
    conn.autocommit = False
    scalar(conn, "SELECT 1")
    return conn


# -- query_timeout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_query_timeout_closes_a_long_query_and_spares_fast_work(make_relay, mode):
    relay = make_relay({"pool_mode": mode, "default_pool_size": "1", "query_timeout": "1"})
    conn = connect(relay)
    conn.autocommit = False
    for _ in range(5):  # a transaction of fast queries, longer than query_timeout: each request is recent
        assert scalar(conn, "SELECT 1") == 1
        time.sleep(0.3)
    conn.commit()
    conn.autocommit = True
    assert scalar(conn, "SELECT pg_sleep(0.6) IS NOT NULL")  # a query under the timeout
    conn.close()  # (session mode: it had the pool's one server)
    raw = raw_client(relay)
    since = time.monotonic()
    raw.send(query_message("SELECT pg_sleep(4)"))
    Watch(raw).assert_fatal("query timeout", since, 1.0)
    assert "closing because: query timeout" in relay.log()
    assert_served(relay)  # the pool's one server was closed: the next client gets a new one


def test_query_timeout_off_lets_long_queries_run(make_relay):
    relay = make_relay({"pool_mode": "transaction", "query_timeout": "0"})
    conn = connect(relay)
    assert scalar(conn, "SELECT pg_sleep(1.6) IS NOT NULL")
    conn.close()


def test_queued_client_past_query_timeout_and_user_value_beating_the_global(make_relay, pg):
    """Global query_timeout 1; the holder's [users] query_timeout=30 wins, so its transaction (idle,
    which PgBouncer's query_timeout also counts) lives on, while a client queued behind it for the
    pool's one server goes after 1 s with "query_timeout". Both share one pool (forced server user)."""
    target = f"host=127.0.0.1 port={pg.port} dbname=postgres user=postgres"
    relay = make_relay({"pool_mode": "transaction", "query_timeout": "1"},
                       databases={"qt_shared": f"{target} pool_size=1"}, users={"qt_holder": "query_timeout=30"})
    holder = in_transaction(relay, user="qt_holder", dbname="qt_shared")
    waiter = raw_client(relay, user="qt_waiter", database="qt_shared")
    since = time.monotonic()
    waiter.send(query_message("SELECT 1"))
    Watch(waiter).assert_fatal("query_timeout", since, 1.0)
    time.sleep(0.6)  # the holder has now been idle in its transaction for over 2 s
    assert scalar(holder, "SELECT 'holder lives'") == "holder lives"
    holder.commit()
    holder.close()
    assert_served(relay, user="qt_waiter", dbname="qt_shared")


# -- transaction_timeout ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_transaction_timeout_closes_a_long_transaction_and_spares_short_ones(make_relay, mode):
    relay = make_relay({"pool_mode": mode, "default_pool_size": "2", "transaction_timeout": "1"})
    raw = raw_client(relay)
    since = time.monotonic()
    raw.query("BEGIN")
    busy = Watch(raw, busy=True)  # working all along: neither idle nor a slow query
    other = connect(relay)  # short transactions back to back for longer than the timeout
    deadline = time.monotonic() + 1.8
    while time.monotonic() < deadline:
        assert scalar(other, "SELECT 1") == 1
        time.sleep(0.05)
    # A janitor tick (0.5 s) must see `other` between transactions: one that saw it mid-SELECT and
    # none since would count the next transaction as begun then (back-to-back ones count as one).
    time.sleep(0.6)
    other.autocommit = False  # and a short one that the janitor sees, long after its server was linked
    assert scalar(other, "SELECT 2") == 2
    time.sleep(0.7)
    other.commit()
    other.autocommit = True
    busy.assert_fatal("transaction timeout", since, 1.0)
    assert busy.replies >= 3
    assert scalar(other, "SELECT 'still here'") == "still here"
    other.close()
    assert "closing because: transaction timeout" in relay.log()
    assert_served(relay)


# -- [users] values with the global ones off -------------------------------------------------------------

def test_user_values_apply_with_the_global_timeouts_off(make_relay, pg):
    users = {"to_query": "query_timeout=1", "to_xact": "transaction_timeout=1",
             "to_idlex": "idle_transaction_timeout=1", "to_idle": "client_idle_timeout=1"}
    for name in (*users, "to_plain"):
        ensure_role(pg, name)
    relay = make_relay({"pool_mode": "transaction"}, users=users)
    query, xact, idlex, plain_idle = (raw_client(relay, user=u)
                                      for u in ("to_query", "to_xact", "to_idlex", "to_plain"))
    since = {"client_idle_timeout": time.monotonic()}
    idle = raw_client(relay, user="to_idle")
    since["query timeout"] = time.monotonic()
    query.send(query_message("SELECT pg_sleep(4)"))
    since["transaction timeout"] = time.monotonic()
    xact.query("BEGIN")
    since["idle transaction timeout"] = time.monotonic()
    idlex.query("BEGIN")
    watches = {"query timeout": Watch(query), "transaction timeout": Watch(xact, busy=True),
               "idle transaction timeout": Watch(idlex), "client_idle_timeout": Watch(idle)}
    plain = in_transaction(relay, user="to_plain")  # none of it applies to a user without values
    assert scalar(plain, "SELECT pg_sleep(1.8) IS NOT NULL")
    time.sleep(0.3)
    for message, watch in watches.items():
        watch.assert_fatal(message, since[message], 1.0)
    assert scalar(plain, "SELECT 'plain lives'") == "plain lives"
    plain.commit()
    plain.close()
    assert plain_idle.query("SELECT 1")[-1][0] == b"Z"  # idle all along, no client_idle_timeout
    assert_served(relay, user="to_query")


# -- query_wait_timeout per database, per user, per cluster ---------------------------------------------------

def test_query_wait_timeout_of_the_database_the_cluster_and_the_user(make_relay, pg):
    """Global query_wait_timeout 120: the [databases] and [clusters] lines' 1 s apply; a [users] 30 s
    wins over the database's. query_wait_notify=0: the patient client queued 1.8 s gets no NOTICE."""
    for name in ("qw_a", "qw_patient"):
        ensure_role(pg, name)
    target = f"host=127.0.0.1 port={pg.port}"
    relay = make_relay({"pool_mode": "transaction", "cluster_usernames": "1", "query_wait_notify": "0"},
                       databases={"qw_db": f"{target} dbname=postgres pool_size=1 query_wait_timeout=1"},
                       users={"qw_patient": "query_wait_timeout=30"},
                       extra_sections=f"[clusters]\nqw_cl = {target} pool_size=1 query_wait_timeout=1\n")
    holders = [in_transaction(relay, user=u, dbname=d)
               for u, d in (("qw_a", "qw_db"), ("qw_patient", "qw_db"), ("qw_a.qw_cl", "postgres"))]
    db_waiter = raw_client(relay, user="qw_a", database="qw_db")
    cluster_waiter = raw_client(relay, user="qw_a.qw_cl", database="postgres")
    patient = connect(relay, user="qw_patient", dbname="qw_db")
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=scalar(patient, "SELECT 'patient served'")),
                              daemon=True)
    since = time.monotonic()
    db_waiter.send(query_message("SELECT 1"))
    cluster_waiter.send(query_message("SELECT 1"))
    thread.start()
    watches = [Watch(db_waiter), Watch(cluster_waiter)]
    for watch in watches:
        watch.assert_fatal("query_wait_timeout", since, 1.0)
    time.sleep(max(0.0, since + 1.8 - time.monotonic()))
    assert "value" not in result and thread.is_alive()  # still queued, past the database's 1 s
    holders[1].commit()
    thread.join(5)
    assert result.get("value") == "patient served"
    assert patient.notices == []
    for conn in holders:
        conn.close()
    patient.close()
    assert_served(relay, user="qw_a", dbname="qw_db")


# -- server_lifetime per database and cluster ----------------------------------------------------------------

def test_server_lifetime_of_the_database_and_the_cluster(make_relay, pg):
    ensure_role(pg, "sl_user")
    target = f"host=127.0.0.1 port={pg.port} dbname=postgres"
    relay = make_relay({"pool_mode": "transaction", "cluster_usernames": "1", "server_lifetime": "3600"},
                       databases={"sl_short": f"{target} server_lifetime=1", "sl_long": target},
                       extra_sections=f"[clusters]\nsl_cl = host=127.0.0.1 port={pg.port} server_lifetime=1\n")
    conns = {"short": connect(relay, user="sl_user", dbname="sl_short"),
             "long": connect(relay, user="sl_user", dbname="sl_long"),
             "cluster": connect(relay, user="sl_user.sl_cl", dbname="postgres")}
    pids: dict[str, set[int]] = {name: set() for name in conns}
    deadline = time.monotonic() + 2.8
    while time.monotonic() < deadline:  # never idle for long: server_idle_timeout plays no part
        for name, conn in conns.items():
            pids[name].add(scalar(conn, "SELECT pg_backend_pid()"))
        time.sleep(0.05)
    for conn in conns.values():
        conn.close()
    assert len(pids["short"]) >= 2 and len(pids["cluster"]) >= 2, pids
    assert len(pids["long"]) == 1, pids
    assert "server lifetime over" in relay.log()


# -- query_wait_notify -----------------------------------------------------------------------------------

def test_query_wait_notify_reaches_a_queued_client_once(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": "1", "query_wait_notify": "1"})
    holder = in_transaction(relay)
    waiter = raw_client(relay)
    since = time.monotonic()
    waiter.send(query_message("SELECT 'queued'"))
    waiter.sock.settimeout(4)
    kind, body = waiter.read_message()
    waited = time.monotonic() - since
    fields = error_fields(body)
    assert kind == b"N" and (fields["S"], fields["C"], fields["M"]) == ("NOTICE", "00000", QUEUED), (kind, fields)
    assert 1.0 <= waited < 2.5, waited
    waiter.sock.settimeout(1.6)
    with pytest.raises(TimeoutError):  # still queued, and no second NOTICE
        waiter.read_message()
    holder.commit()
    reply = waiter.read_reply(timeout=5)
    assert reply is not None and [k for k, _ in reply] == [b"T", b"D", b"C", b"Z"], reply
    holder.close()
    assert waiter.query("SELECT 1")[-1][0] == b"Z"
    waiter.close()


# -- pool_idle_timeout -------------------------------------------------------------------------------------

def test_pool_idle_timeout_frees_a_pool_without_clients_or_servers(make_relay, pg):
    ensure_role(pg, "pi_user")
    relay = make_relay({"pool_mode": "transaction", "pool_idle_timeout": "1", "server_idle_timeout": "0.5"})
    conn = connect(relay, user="pi_user")
    assert scalar(conn, "SELECT 1") == 1
    time.sleep(2.2)  # its server idles out, but a client is connected: the pool stays
    assert "freed" not in relay.log()
    conn.close()
    left = time.monotonic()
    wait_until(lambda: "pool postgres/pi_user freed" in relay.log(), timeout=5, message="the pool freed")
    assert time.monotonic() - left >= 1.0
    assert_served(relay, user="pi_user")  # a new pool for the next client
