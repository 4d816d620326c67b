"""The admin console against a real relay: who may log in, the simple-query-only session, PgBouncer's errors,
refused input, plugin commands and the console's exemption from client limits."""

import os
import socket
import struct
import subprocess

import psycopg
import psycopg2
import pytest

from tests.support import (RawClient, connect, data_rows, error_fields, message, query_message, scalar,
                           startup_packet, wait_until)

EXAMPLE_PLUGIN = os.path.join(os.path.dirname(__file__), "..", "unit", "admin", "example_plugin.py")


def write_userlist(tmp_path, users: dict) -> str:
    path = tmp_path / "userlist.txt"
    path.write_text("".join(f'"{u}" "{p}"\n' for u, p in users.items()))
    return str(path)


@pytest.fixture
def auth_relay(make_relay, tmp_path):
    """Cleartext passwords from an auth_file: adm is an admin, stat a stats user, nobody neither."""
    userlist = write_userlist(tmp_path, {"adm": "adm-pw", "stat": "stat-pw", "nobody": "nobody-pw",
                                         "postgres": "pg-pw"})
    return make_relay({"auth_type": "plain", "auth_file": userlist, "admin_users": "adm, postgres",
                       "stats_users": "stat", "log_disconnections": "1"})


def login_plain(relay, user: str, password: str, database: str = "pgbouncer") -> tuple[RawClient, list]:
    """Log in with a cleartext password; returns the client and what came after the password."""
    client = RawClient(relay.port)
    client.send(startup_packet(user, database))
    kind, body = client.read_message()
    assert (kind, struct.unpack("!I", body[:4])[0]) == (b"R", 3), (kind, body)
    client.send(message(b"p", password.encode() + b"\0"))
    msgs = []
    while True:
        msg = client.read_message()
        msgs.append(msg)
        if msg[0] in (b"Z", b"E"):
            return client, msgs


def errors(msgs):
    return [error_fields(body) for kind, body in msgs if kind == b"E"]


def test_admin_and_stats_users_and_everyone_else(auth_relay):
    admin, msgs = login_plain(auth_relay, "adm", "adm-pw")
    params = dict(tuple(body.split(b"\0")[:2]) for kind, body in msgs if kind == b"S")
    assert params[b"server_version"].endswith(b"/bouncer") and params[b"client_encoding"] == b"UTF8"
    assert [kind for kind, _ in msgs][-2:] == [b"K", b"Z"]
    assert not errors(admin.query("RELOAD")), "an admin runs control commands"
    assert data_rows(admin.query("SHOW STATE"))

    stats, _ = login_plain(auth_relay, "stat", "stat-pw")
    assert data_rows(stats.query("SHOW POOLS"))
    refused = errors(stats.query("RELOAD"))
    assert refused == [{"S": "ERROR", "V": "ERROR", "C": "08P01", "M": "admin access needed"}]
    refused = errors(stats.query("PAUSE"))
    assert refused[0]["M"] == "admin access needed"
    assert data_rows(stats.query("SHOW STATE")) == [["active", "yes"], ["paused", "no"], ["suspended", "no"]]

    other, msgs = login_plain(auth_relay, "nobody", "nobody-pw")
    assert errors(msgs) == [{"S": "FATAL", "V": "FATAL", "C": "08P01", "M": "not allowed"}]
    assert other.closed()

    wrong, msgs = login_plain(auth_relay, "adm", "not-the-password")
    assert errors(msgs)[0]["C"] == "28P01"
    assert wrong.closed()
    for client in (admin, stats):
        client.close()
    assert "closing because: not allowed" in auth_relay.log()
    assert "nobody-pw" not in auth_relay.log() and "adm-pw" not in auth_relay.log()


def test_auth_type_any_lets_everyone_in_as_stats_user(make_relay):
    relay = make_relay({"auth_type": "any", "admin_users": "boss"})
    boss = RawClient(relay.port)
    boss.login(user="boss", database="pgbouncer")
    assert not errors(boss.query("RELOAD"))
    guest = RawClient(relay.port)
    guest.login(user="guest", database="pgbouncer")
    assert data_rows(guest.query("SHOW VERSION"))
    assert errors(guest.query("RELOAD"))[0]["M"] == "admin access needed"
    boss.close()
    guest.close()


def test_unix_socket_peer_pgbouncer_logs_in_without_password(auth_relay):
    """The user pgbouncer over the Unix socket, from pgrelay's own Unix user: no password, admin."""
    conn = psycopg2.connect(host=auth_relay.workdir, port=auth_relay.port, user="pgbouncer", dbname="pgbouncer",
                            connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("RELOAD")   # an admin command
        cur.execute("SHOW CLIENTS")
        names = [d[0] for d in cur.description]
        me = [dict(zip(names, r)) for r in cur.fetchall() if r[names.index("user")] == "pgbouncer"]
    assert me and me[0]["addr"] == "unix" and me[0]["remote_pid"] == os.getpid()
    conn.close()
    # Over TCP the same name is an ordinary user: not in auth_file, so its login fails.
    client, msgs = login_plain(auth_relay, "pgbouncer", "")
    assert errors(msgs)[0]["C"] == "28P01"
    client.close()
    # Over the Unix socket, a user other than pgbouncer still needs its password.
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(os.path.join(auth_relay.workdir, f".s.PGSQL.{auth_relay.port}"))
    sock.sendall(startup_packet("adm", "pgbouncer"))
    assert sock.recv(5)[:1] == b"R"
    sock.close()


def test_extended_protocol_is_refused_with_pgbouncers_text(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    client = RawClient(relay.port)
    client.login(database="pgbouncer")
    client.send(message(b"P", b"\0SHOW POOLS\0\0\0") + message(b"S"))
    first = client.read_error()
    assert (first["S"], first["C"], first["M"]) == \
        ("ERROR", "08P01", "extended query protocol not supported by admin console")
    assert client.read_message()[0] == b"Z"
    assert client.read_error()["M"] == "bad packet"
    assert client.closed()
    with psycopg.connect(relay.dsn(dbname="pgbouncer"), autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="extended query protocol not supported by admin console"):
            conn.execute("SHOW POOLS", prepare=True)
    assert "closing because: bad packet" in relay.log()


def test_unknown_removed_and_malformed_commands(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    conn = connect(relay, dbname="pgbouncer")
    with conn.cursor() as cur:
        for sql in ("SUSPEND", "SHOW FDS", "FOO", "SHOW NOTHING", "SELECT 1", "SHOW POOLS; SHOW CLIENTS"):
            with pytest.raises(psycopg2.Error) as info:
                cur.execute(sql)
            assert info.value.pgcode == "08P01"
            assert info.value.diag.message_primary == f"invalid command '{sql}', use SHOW HELP;"
        with pytest.raises(psycopg2.Error, match="bad arguments"):
            cur.execute("PAUSE " + "x" * 100)
        cur.execute("SHOW VERSION")  # the session goes on after each error
        assert cur.fetchone()[0].startswith("pgrelay ")
    conn.close()
    client = RawClient(relay.port)
    client.login(database="pgbouncer")
    client.send(message(b"Q", b"SHOW POOLS"))  # no terminating NUL
    assert client.read_error()["M"] == "incomplete query"
    assert client.closed()


def test_sql_injection_in_arguments_runs_nothing(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    app = connect(relay)
    app.cursor().execute("SELECT 1")
    admin = connect(relay, dbname="pgbouncer")
    attempts = ["PAUSE x'; KILL --", "SHOW POOLS; KILL", "SHOW HELP; SHUTDOWN", "RESUME \"a\"; PAUSE",
                "KILL_CLIENT 1 OR 1=1", "SHOW \"pools; kill\"", "SET log_connections = '1'; KILL",
                "SHOW CLIENTS -- comment", "PAUSE $$x$$", "SHOW\x00 POOLS"]
    with admin.cursor() as cur:
        for sql in attempts:
            if "\x00" in sql:
                continue  # psycopg2 cannot send a NUL: RawClient does below
            with pytest.raises(psycopg2.Error):
                cur.execute(sql)
        cur.execute("SHOW STATE")
        assert dict(cur.fetchall()) == {"active": "yes", "paused": "no", "suspended": "no"}
        cur.execute("SHOW DATABASES")
        assert all(row[-2:] == (0, 0) for row in cur.fetchall())
    raw = RawClient(relay.port)
    raw.login(database="pgbouncer")
    raw.send(message(b"Q", b"SHOW\0 POOLS\0"))   # a NUL inside: the query ends there, as PgBouncer reads it
    assert raw.read_error()["M"] == "invalid command 'SHOW', use SHOW HELP;"
    assert raw.read_message()[0] == b"Z"
    raw.close()
    assert scalar(app, "SELECT 'untouched'") == "untouched"  # the application's connection was not touched
    app.close()
    admin.close()


def test_console_is_exempt_from_max_client_conn(make_relay):
    relay = make_relay({"admin_users": "postgres", "max_client_conn": "1"})
    app = connect(relay)
    with pytest.raises(psycopg2.OperationalError, match="max_client_conn"):
        connect(relay)
    for _ in range(3):  # several consoles, all past the limit
        admin = connect(relay, dbname="pgbouncer")
        with admin.cursor() as cur:
            cur.execute("SHOW CLIENTS")
            assert len(cur.fetchall()) == 2  # the application and this console
        admin.close()
    with pytest.raises(psycopg2.OperationalError, match="max_client_conn"):
        connect(relay)  # consoles took no slot from the applications, and gave none back
    app.close()
    wait_until(lambda: _served(relay), message="a client slot after the application left")


def _served(relay) -> bool:
    try:
        connect(relay).close()
        return True
    except psycopg2.OperationalError:
        return False


def test_console_client_is_listed_and_cleaned_up_with_a_reason(make_relay):
    relay = make_relay({"admin_users": "postgres", "log_disconnections": "1"})
    watcher = connect(relay, dbname="pgbouncer")

    def consoles():
        with watcher.cursor() as cur:
            cur.execute("SHOW CLIENTS")
            return [r for r in cur.fetchall() if r[2] == "pgbouncer"]

    polite = RawClient(relay.port)
    polite.login(database="pgbouncer")
    rude = RawClient(relay.port)
    rude.login(database="pgbouncer")
    assert len(consoles()) == 3
    polite.send(message(b"X"))
    assert polite.closed()
    rude.close()  # no Terminate
    wait_until(lambda: len(consoles()) == 1, message="the consoles to be forgotten")
    log = relay.log()
    assert "closing because: client close request" in log
    assert "closing because: client unexpected eof" in log
    watcher.close()


def test_pipelined_queries_each_get_a_reply(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    client = RawClient(relay.port)
    client.send(startup_packet(database="pgbouncer") + query_message("SHOW VERSION") + query_message("FOO")
                + query_message("SHOW STATE"))
    client.read_until(b"Z")  # the welcome
    assert data_rows(client.read_until(b"Z"))[0][0].startswith("pgrelay ")
    assert errors(client.read_until(b"Z"))[0]["M"].startswith("invalid command 'FOO'")
    assert len(data_rows(client.read_until(b"Z"))) == 3
    client.close()


def test_show_help_lists_pgbouncers_commands_then_pgrelays(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    client = RawClient(relay.port)
    client.login(database="pgbouncer")
    msgs = client.query("SHOW HELP")
    notice = error_fields(next(body for kind, body in msgs if kind == b"N"))
    assert (notice["S"], notice["C"], notice["M"]) == ("NOTICE", "00000", "Console usage")
    detail = notice["D"]
    assert detail.startswith("\n\tSHOW HELP|CONFIG|DATABASES|POOLS|CLIENTS|SERVERS|USERS|VERSION\n")
    assert "FDS" not in detail and "SUSPEND" not in detail
    pgbouncer_end = detail.index("WAIT_CLOSE [<db>]")
    assert detail.index("SHOW LISTENERS|ROUTES|HOSTS|POOLERS|PLUGINS|BUDGET") > pgbouncer_end
    assert msgs[-2] == (b"C", b"SHOW\0")
    client.close()


def test_psql_works_with_the_console(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", "-d",
                          "pgbouncer", "-c", "SHOW HELP", "-c", "SHOW POOLS", "-c", "SHOW VERSION"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "Console usage" in out.stderr
    assert "cl_active" in out.stdout and "pgrelay " in out.stdout
    out = subprocess.run(["psql", "-X", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", "-d",
                          "pgrelay", "-tA", "-c", "SHOW STATE"], capture_output=True, text=True, env=env,
                         timeout=30)
    assert out.returncode == 0 and "active|yes" in out.stdout, out.stderr


def test_plugin_commands(make_relay, tmp_path):
    userlist = write_userlist(tmp_path, {"adm": "a", "stat": "s"})
    relay = make_relay({"plugins": os.path.abspath(EXAMPLE_PLUGIN), "auth_type": "plain", "auth_file": userlist,
                        "admin_users": "adm", "stats_users": "stat"})
    admin, _ = login_plain(relay, "adm", "a")
    assert data_rows(admin.query("show widgets")) == [["sprocket", "3"], ["gear", None]]
    msgs = admin.query("FROB gear")
    assert data_rows(msgs) == [["gear"]] and (b"C", b"FROB\0") in msgs
    assert errors(admin.query("FROB"))[0]["M"] == "FROB needs a widget"
    detail = error_fields(next(b for k, b in admin.query("SHOW HELP") if k == b"N"))["D"]
    assert "|WIDGETS" in detail and "\tFROB <widget>" in detail
    stats, _ = login_plain(relay, "stat", "s")
    assert data_rows(stats.query("SHOW WIDGETS"))
    assert errors(stats.query("FROB gear"))[0]["M"] == "admin access needed"
    admin.close()
    stats.close()
