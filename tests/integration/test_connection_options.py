"""Connection options end to end on a real primary + standby: direct port, |replica, local pooler, session/transaction ports, bad user names, a pip-installed routing plugin."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg
import psycopg2
import pytest

from pgrelay.tempdb import free_port

from ..support import RawClient, RelayProcess, startup_packet, wait_until

# -- helpers shared with test_dedicated_poolers.py and test_clusters.py ------------------------


class Relays:
    """pgrelay processes for one test module (module-scoped: several tests share one relay).

    `listeners` maps a [listeners] name to its options without port=; each gets a free port,
    found afterwards in relay.ports[name]. At teardown every log is checked for bugs.
    """

    def __init__(self, workdir: str, pg):
        self.workdir = workdir
        self.pg = pg
        self.started: list[RelayProcess] = []

    def start(self, settings=None, databases=None, listeners=None, sections: str = "", env=None,
              name: str | None = None) -> RelayProcess:
        ports = {}
        extra = ""
        if listeners:
            extra += "[listeners]\n"
            for key, options in listeners.items():
                ports[key] = free_port()
                extra += f"{key} = port={ports[key]} {options}\n"
        extra += sections
        relay = RelayProcess(self.workdir, self.pg, settings, databases, extra_sections=extra, env=env,
                             name=name or f"relay{len(self.started)}")
        relay.ports = ports
        self.started.append(relay)
        return relay.start()

    def stop(self, relay: RelayProcess) -> None:
        relay.stop()

    def finish(self) -> list[str]:
        problems = []
        for relay in self.started:
            if relay.alive():
                relay.stop()
            bugs = relay.bugs()
            if bugs:
                problems.append(f"{relay.name}: " + "\n".join(bugs[:10]))
        return problems


@pytest.fixture(scope="module")
def relays(tmp_path_factory, replicated):
    factory = Relays(str(tmp_path_factory.mktemp("relays")), replicated.primary)
    yield factory
    problems = factory.finish()
    if problems:
        pytest.fail("pgrelay logged internal errors:\n" + "\n".join(problems), pytrace=False)


def connect(port: int, user: str = "postgres", dbname: str = "postgres", autocommit: bool = True,
            **params) -> psycopg.Connection:
    """A psycopg 3 client connection to 127.0.0.1:port (no automatic server-side prepares, as
    transaction pooling needs)."""
    return psycopg.connect(host="127.0.0.1", port=port, user=user, dbname=dbname, autocommit=autocommit,
                           connect_timeout=10, prepare_threshold=None, **params)


def one(conn, sql: str, args=None):
    """The first row of a query's result, as a tuple."""
    return conn.execute(sql, args).fetchone()


def refusal(port: int, user: str, database: str = "postgres", **params) -> dict[str, str]:
    """Log in with a raw client; the first message must be an ErrorResponse, then the connection closes."""
    raw = RawClient(port)
    try:
        raw.send(startup_packet(user, database, **params))
        fields = raw.read_error()
        assert raw.closed(), "the refused client was not disconnected"
        return fields
    finally:
        raw.close()


def assert_serving(*ports: int, user: str = "postgres") -> None:
    """A fresh client on each port logs in and runs a query."""
    for port in ports:
        with connect(port, user=user) as conn:
            assert one(conn, "SELECT 6 * 7") == (42,)


def where(conn) -> tuple[bool, int]:
    """(in recovery, server port) of the server this client's query ran on."""
    return one(conn, "SELECT pg_is_in_recovery(), current_setting('port')::int")


def cluster_db(replicated) -> str:
    """The [databases] line for the replicated pair: the primary, with the standby as replica."""
    return f"host=127.0.0.1 port={replicated.primary.port} replicas=127.0.0.1:{replicated.standby.port}"


def backend_exists(server, pid: int) -> bool:
    return server.psql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}") == "1"


# -- this module's relays -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def main(relays, replicated):
    """Main port pooled (transaction, pool size 1), a direct port, a session port, a port without suffixes."""
    replicated.primary.psql("CREATE TABLE IF NOT EXISTS ro_probe (id int)")
    replicated.wait_caught_up()
    return relays.start(
        settings={"default_pool_size": "1"},
        databases={"*": cluster_db(replicated)},
        listeners={"direct": "role=direct", "session": "pool_mode=session", "nosfx": "suffixes=0"},
    )


# -- the direct port --------------------------------------------------------------------------------


def test_direct_port_behaves_like_postgresql(main, replicated):
    port = main.ports["direct"]
    with connect(port, autocommit=False) as conn:
        assert where(conn) == (False, replicated.primary.port)
        pid = one(conn, "SELECT pg_backend_pid()")[0]
        conn.execute("SET work_mem = '7MB'")
        conn.execute("CREATE TEMP TABLE scratch (v int)")
        conn.execute("PREPARE twice(int) AS SELECT $1 * 2")
        conn.commit()
        conn.execute("INSERT INTO scratch VALUES (1), (2)")
        conn.commit()
        conn.execute("INSERT INTO scratch VALUES (3)")
        conn.commit()
        assert one(conn, "SHOW work_mem") == ("7MB",)
        assert one(conn, "SELECT sum(v) FROM scratch") == (6,)
        assert one(conn, "EXECUTE twice(21)") == (42,)
        assert one(conn, "SELECT pg_backend_pid()") == (pid,)
        conn.commit()
    wait_until(lambda: not backend_exists(replicated.primary, pid), timeout=5,
               message="the direct client's backend to go away")
    assert_serving(port)


def test_direct_listen_notify_reaches_the_client(main):
    port = main.ports["direct"]
    with connect(port) as listener, connect(port) as notifier:
        listener.execute("LISTEN relay_chan")
        notifier_pid = one(notifier, "SELECT pg_backend_pid()")[0]
        notifier.execute("NOTIFY relay_chan, 'hello from the other client'")
        got = [(n.channel, n.payload, n.pid) for n in listener.notifies(timeout=5, stop_after=1)]
        assert got == [("relay_chan", "hello from the other client", notifier_pid)]


def test_direct_clients_have_their_own_backends(main, replicated):
    port = main.ports["direct"]
    conns = [connect(port) for _ in range(3)]
    try:
        pids = [one(c, "SELECT pg_backend_pid()")[0] for c in conns]
        assert len(set(pids)) == 3
        for c, pid in zip(conns, pids):  # each keeps its own across transactions
            assert one(c, "SELECT pg_backend_pid()") == (pid,)
        conns[0].close()
        wait_until(lambda: not backend_exists(replicated.primary, pids[0]), timeout=5,
                   message="the closed direct client's backend to exit")
        assert all(backend_exists(replicated.primary, pid) for pid in pids[1:])
    finally:
        for c in conns:
            c.close()


def test_direct_startup_parameters_reach_the_server(main):
    with connect(main.ports["direct"], options="-c statement_timeout=1234",
                 application_name="direct-app") as conn:
        assert one(conn, "SHOW statement_timeout") == ("1234ms",)
        assert one(conn, "SELECT current_setting('application_name')") == ("direct-app",)


def test_max_direct_connections(relays, replicated):
    relay = relays.start(settings={"max_direct_connections": "3"}, databases={"*": cluster_db(replicated)},
                         listeners={"direct": "role=direct"})
    port = relay.ports["direct"]
    held = [connect(port) for _ in range(3)]
    try:
        for c in held:
            assert one(c, "SELECT 1") == (1,)
        fields = refusal(port, "postgres")
        assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "53300", "sorry, too many clients already")
        assert fields["H"] == ("This port gives each client a server connection of its own: use the pooled "
                               "port, or raise max_direct_connections."), fields
        # the pooled port is not capped by max_direct_connections
        assert_serving(relay.port)
        held.pop(0).close()

        def admitted():
            try:
                conn = connect(port)
            except psycopg.OperationalError as exc:
                assert "sorry, too many clients already" in str(exc)
                return None
            return conn

        newcomer = wait_until(admitted, timeout=5, message="a free direct slot")
        held.append(newcomer)
        assert where(newcomer) == (False, replicated.primary.port)
    finally:
        for c in held:
            c.close()


def test_direct_replica_suffix(main, replicated):
    port = main.ports["direct"]
    with connect(port, user="postgres|replica") as conn:
        assert where(conn) == (True, replicated.standby.port)
        assert one(conn, "SELECT current_user") == ("postgres",)
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as info:
            conn.execute("INSERT INTO ro_probe VALUES (1)")
        assert info.value.sqlstate == "25006"
        assert info.value.diag.message_primary == "cannot execute INSERT in a read-only transaction"
        assert one(conn, "SELECT 1") == (1,)  # still connected after the error
    # The URL form, with the | escaped as %7C, through psql.
    url = f"postgresql://postgres%7Creplica@127.0.0.1:{port}/postgres"
    out = subprocess.run(["psql", "-X", "-A", "-t", "-c", "SELECT pg_is_in_recovery(), current_setting('port')",
                          url], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"t|{replicated.standby.port}"
    conn = psycopg2.connect(url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), current_setting('port')::int")
            assert cur.fetchone() == (True, replicated.standby.port)
    finally:
        conn.close()


# -- the local pooler -----------------------------------------------------------------------------------


def test_local_pooler_only_reaches_the_primary(main, replicated):
    seen = []
    conns = [connect(main.port, autocommit=False) for _ in range(5)]
    try:
        for _ in range(10):
            for conn in conns:
                seen.append(where(conn))
                conn.commit()
    finally:
        for conn in conns:
            conn.close()
    assert seen == [(False, replicated.primary.port)] * 50


def test_local_pooler_refuses_replica_suffix(main):
    fields = refusal(main.port, "postgres|replica")
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01")
    assert fields["M"] == "the local pooler only connects to the primary; |replica is not accepted on this port"
    assert fields["H"] == ('Pool to replicas with a dedicated replica pooler (user "role|<pooler name>"), '
                           'or connect to the direct port with "role|replica".')
    assert_serving(main.port)


def test_local_pooler_replicas_setting(relays, replicated):
    relay = relays.start(settings={"local_pooler_replicas": "1"}, databases={"*": cluster_db(replicated)})
    with connect(relay.port, user="postgres|replica") as replica, connect(relay.port) as primary:
        for _ in range(3):
            assert where(replica) == (True, replicated.standby.port), "a |replica client ran on the primary"
            assert where(primary) == (False, replicated.primary.port), "a plain client ran on the replica"


# -- session and transaction ports side by side ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_session_port_next_to_transaction_port(main):
    """On the session port a client keeps its server and SET; on the transaction port (pool size 1)
    two alternating clients share one server, while the session client holds its own."""
    session = connect(main.ports["session"], autocommit=False)
    a = connect(main.port)
    b = connect(main.port)
    try:
        session.execute("SET work_mem = '3MB'")
        session_pid = one(session, "SELECT pg_backend_pid()")[0]
        session.commit()
        tx_pids = []
        for _ in range(3):
            tx_pids.append(one(a, "SELECT pg_backend_pid()")[0])
            tx_pids.append(one(b, "SELECT pg_backend_pid()")[0])
            assert one(session, "SELECT pg_backend_pid(), current_setting('work_mem')") == (session_pid, "3MB")
            session.commit()
        assert len(set(tx_pids)) == 1, tx_pids
        assert tx_pids[0] != session_pid, "transaction-port clients were given the session client's server"
    finally:
        for conn in (session, a, b):
            conn.close()


# -- bad user names ---------------------------------------------------------------------------------------


def _startup_length(user: str) -> int:
    return len(startup_packet(user, "postgres"))


BAD_NAMES = [
    # (listener, user, sqlstate, message)
    ("main", "postgres|", "28000",
     'user name "postgres|" ends with "|": expected a pooler name or "replica" after it'),
    ("direct", "postgres|", "28000",
     'user name "postgres|" ends with "|": expected a pooler name or "replica" after it'),
    ("main", "postgres||x", "28000", 'user name "postgres||x" has more than one "|"'),
    ("direct", "postgres|replica|x", "28000", 'user name "postgres|replica|x" has more than one "|"'),
    ("main", "postgres|unknown", "08P01", 'no such pooler: "unknown"'),
    ("direct", "postgres|unknown", "08P01",
     'unknown user name suffix "|unknown" on a direct port: only |replica is accepted here'),
    ("main", "u" * 10240, "08P01", f"bad packet header: startup packet length {_startup_length('u' * 10240)}"),
    ("main", "u" * 100, "42622", "user name is too long (100 bytes; the limit is 63)"),
    ("direct", "u" * 100 + "|replica", "42622", "user name is too long (100 bytes; the limit is 63)"),
    ("nosfx", "postgres|replica", "28000", 'user name suffixes ("|replica") are not accepted on port {port}'),
]


@pytest.mark.parametrize("listener,user,sqlstate,message", BAD_NAMES,
                         ids=[f"{b[0]}-{b[1][:20]}-{len(b[1])}" for b in BAD_NAMES])
def test_bad_user_names(main, listener, user, sqlstate, message):
    port = main.port if listener == "main" else main.ports[listener]
    fields = refusal(port, user)
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", sqlstate, message.format(port=port))
    assert_serving(main.port, main.ports["direct"], main.ports["nosfx"])


def test_nosfx_port_serves_plain_names(main, replicated):
    with connect(main.ports["nosfx"]) as conn:
        assert where(conn) == (False, replicated.primary.port)


# -- a third-party routing plugin installed with pip ---------------------------------------------------------

PLUGIN_SOURCE = '''
"""Test routing plugin: report clients go to the replica; database closed_db is refused."""
import dataclasses

from pgrelay import Reject, hookimpl
from pgrelay.routing import PRIMARY, REPLICA, Route


@hookimpl(wrapper=True)
def pgrelay_route_client(relay, login):
    decision = yield
    if login.database == "closed_db":
        return Reject('database "closed_db" is closed by pgrelay_test_router', "55000",
                      hint="Try again after the maintenance window.")
    app = login.params.get("application_name", "")
    if isinstance(decision, Route) and decision.target == PRIMARY and app.startswith("report"):
        return dataclasses.replace(decision, target=REPLICA, pool_key=("report",) + tuple(decision.pool_key),
                                   name=decision.name + " (report)")
    return decision
'''

PLUGIN_DIST = "pgrelay_test_router-0.1.0"
PLUGIN_FILES = {
    "pgrelay_test_router/__init__.py": PLUGIN_SOURCE,
    f"{PLUGIN_DIST}.dist-info/METADATA": "Metadata-Version: 2.1\nName: pgrelay-test-router\nVersion: 0.1.0\n",
    f"{PLUGIN_DIST}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: pgrelay-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n",
    # What `[project.entry-points.pgrelay] test_router = "pgrelay_test_router"` in a pyproject.toml becomes.
    f"{PLUGIN_DIST}.dist-info/entry_points.txt": "[pgrelay]\ntest_router = pgrelay_test_router\n",
}


def build_wheel(out_dir) -> str:
    """The plugin as a wheel (a zip with a dist-info), written without needing the `wheel` package."""
    import base64
    import hashlib
    import zipfile
    path = os.path.join(out_dir, f"{PLUGIN_DIST}-py3-none-any.whl")
    record = []
    with zipfile.ZipFile(path, "w") as whl:
        for name, text in PLUGIN_FILES.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{name},sha256={digest},{len(data)}")
            whl.writestr(name, data)
        record.append(f"{PLUGIN_DIST}.dist-info/RECORD,,")
        whl.writestr(f"{PLUGIN_DIST}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def test_pip_installed_plugin_overrides_routing(relays, main, replicated, tmp_path):
    # setuptools here has no bdist_wheel (the `wheel` package is not installed), so the wheel is
    # assembled directly; pip installs it like any wheel from an index.
    wheel = build_wheel(str(tmp_path))
    site = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                          "--target", str(site), wheel], capture_output=True, text=True, timeout=120)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / "pgrelay_test_router" / "__init__.py").exists()
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)}

    relay = relays.start(databases={"*": cluster_db(replicated)}, env=env, name="plugin_relay")
    listed = subprocess.run(["pgrelay", "--list-plugins", relay.ini_path], capture_output=True, text=True,
                            timeout=60, env=relay.env)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    row = [i for i, line in enumerate(lines) if line.split()[:1] == ["test_router"]]
    assert len(row) == 1, listed.stdout
    assert lines[row[0]].split()[1:] == ["pgrelay-test-router", "0.1.0"]
    assert lines[row[0] + 1].split() == ["hooks:", "pgrelay_route_client"]
    # Without the install on the path it is not there.
    plain_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    unlisted = subprocess.run(["pgrelay", "--list-plugins", relay.ini_path], capture_output=True, text=True,
                              timeout=60, env=plain_env)
    assert unlisted.returncode == 0, unlisted.stderr
    assert "test_router" not in unlisted.stdout

    # The built-in local pooler sends every client to the primary; the plugin sends reports to the replica.
    with connect(main.port, application_name="report-daily") as builtin:
        assert where(builtin) == (False, replicated.primary.port)
    with connect(relay.port, application_name="report-daily") as report, \
            connect(relay.port, application_name="web") as web:
        for _ in range(3):
            assert where(report) == (True, replicated.standby.port)
            assert where(web) == (False, replicated.primary.port)
    fields = refusal(relay.port, "postgres", "closed_db")
    assert (fields["S"], fields["C"], fields["M"], fields["H"]) == (
        "FATAL", "55000", 'database "closed_db" is closed by pgrelay_test_router',
        "Try again after the maintenance window.")
    assert_serving(relay.port)
