"""pgrelay's log as PgBouncer writes it, on a real process: the stats line with real traffic,
connection lines, log_format = json, syslog to a real Unix datagram socket, and no secrets."""

import json
import os
import re
import socket
import tempfile
import time

import psycopg2
import pytest

from ..support import connect, scalar, wait_until

STATS = re.compile(r" LOG stats: (\d+) xacts/s, (\d+) queries/s, (\d+) client parses/s, (\d+) server parses/s, "
                   r"(\d+) binds/s, in (\d+) B/s, out (\d+) B/s, xact (\d+) us, query (\d+) us, wait (\d+) us$")
PREFIX = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} UTC \[(\d+)\] (LOG|WARNING|ERROR|FATAL|DEBUG) ")


def stats_lines(relay):
    return [m for m in (STATS.search(line) for line in relay.log().splitlines()) if m]


def test_stats_line_in_pgbouncer_wording_with_real_traffic(make_relay):
    relay = make_relay({"stats_period": "1", "pool_mode": "transaction"})
    wait_until(lambda: stats_lines(relay), timeout=5, message="an idle stats line")
    idle = stats_lines(relay)[-1]
    assert [int(g) for g in idle.groups()] == [0] * 10, "no traffic: every figure is 0, as PgBouncer logs it"
    conn = connect(relay)
    try:
        for _ in range(30):
            assert scalar(conn, "SELECT 1") == 1
            with conn.cursor() as cur:
                cur.execute("BEGIN")
                cur.execute("SELECT pg_sleep(0.02)")
                cur.execute("COMMIT")
    finally:
        conn.close()
    busy = wait_until(lambda: [m for m in stats_lines(relay) if int(m.group(1)) > 0], timeout=5,
                      message="a stats line with traffic")[0]
    xacts, queries, cparses, sparses, binds, received, sent, xact_us, query_us, wait_us = map(int, busy.groups())
    assert xacts > 0 and queries >= xacts and received > 0 and sent > 0
    assert (cparses, sparses, binds) == (0, 0, 0)  # no prepared statement tracking
    assert query_us > 0 and xact_us > 0
    assert xact_us >= 10000 or query_us >= 10000, busy.group(0)  # the pg_sleep(0.02) transactions
    # Each line is one for the whole process, PgBouncer's prefix, no database name in it.
    line = next(line for line in relay.log().splitlines() if busy.group(0) in line)
    assert PREFIX.match(line) and int(PREFIX.match(line).group(1)) == relay.proc.pid


def test_log_stats_off_writes_no_stats_line(make_relay):
    relay = make_relay({"stats_period": "1", "log_stats": "0"})
    conn = connect(relay)
    scalar(conn, "SELECT 1")
    conn.close()
    wait_until(lambda: "closing because" in relay.log(), timeout=5)
    time.sleep(2.2)
    assert " stats: " not in relay.log()


def test_connection_lines_in_pgbouncer_wording(make_relay):
    relay = make_relay()
    conn = connect(relay, application_name="logcheck")
    scalar(conn, "SELECT 1")
    conn.close()
    wait_until(lambda: "client close request" in relay.log(), timeout=5)
    lines = relay.log().splitlines()
    login = next(line for line in lines if "login attempt" in line)
    assert re.search(r" LOG C-\d+: postgres/postgres@127\.0\.0\.1:\d+ login attempt: db=postgres user=postgres "
                     r"tls=no replication=no$", login), login
    new_server = next(line for line in lines if "new connection to server" in line)
    assert re.search(rf" LOG S-\d+: postgres/postgres@127\.0\.0\.1:{relay.pg.port} new connection to server "
                     r"\(from 127\.0\.0\.1:\d+\)$", new_server), new_server
    closing = next(line for line in lines if "closing because" in line)
    assert re.search(r" LOG C-\d+: postgres/postgres@127\.0\.0\.1:\d+ closing because: client close request "
                     r"\(age=\d+s\)$", closing), closing


def test_json_log_lines(make_relay, tmp_path):
    logfile = tmp_path / "json.log"
    relay = make_relay({"log_format": "json", "logfile": str(logfile)})
    conn = connect(relay)
    scalar(conn, "SELECT 1")
    conn.close()
    try:
        psycopg2.connect(relay.dsn(dbname="no_such_db_xyz"), connect_timeout=5).close()
    except psycopg2.Error:
        pass
    wait_until(lambda: "no_such_db_xyz" in logfile.read_text() and "client close request" in logfile.read_text(),
               timeout=5)
    for text in (logfile.read_text(), relay.log()):  # the logfile and stderr alike
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        assert records
        for record in records:
            assert {"time", "level", "pid", "message"} <= record.keys()
            assert record["pid"] == relay.proc.pid
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
            assert record["level"] in ("LOG", "WARNING", "ERROR", "FATAL", "DEBUG")
        up = next(r for r in records if r["message"].startswith("process up: pgrelay"))
        assert up["level"] == "LOG" and "client" not in up
        login = next(r for r in records if "login attempt: db=postgres" in r["message"])
        assert login["client"].startswith("C-") and login["db"] == "postgres" and login["user"] == "postgres"
        assert login["addr"].startswith("127.0.0.1:")
        assert login["message"].startswith(f"{login['client']}: postgres/postgres@{login['addr']} login attempt")
        server = next(r for r in records if "new connection to server" in r["message"])
        assert server["server"].startswith("S-") and server["addr"] == f"127.0.0.1:{relay.pg.port}"
        refused = next(r for r in records if r["level"] == "WARNING" and "no_such_db_xyz" in r["message"])
        assert refused["db"] == "no_such_db_xyz"


def test_log_format_bad_value_is_a_config_error(tmp_path, pg):
    from ..support import RelayProcess
    relay = RelayProcess(str(tmp_path), pg, {"log_format": "xml"})
    with pytest.raises(RuntimeError, match=r"log_format: invalid value 'xml': expected one of text, json"):
        relay.start()


class SyslogReceiver:
    """A real Unix datagram socket standing where syslogd would."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pgrelay-syslog-")
        self.path = os.path.join(self.dir, "log")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[bytes] = []

    def drain(self) -> list[bytes]:
        while True:
            try:
                self.messages.append(self.sock.recv(65536))
            except socket.timeout:
                return self.messages

    def close(self):
        self.sock.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


@pytest.fixture
def syslog_receiver():
    receiver = SyslogReceiver()
    yield receiver
    receiver.close()


def test_syslog_lines_carry_ident_and_facility(make_relay, syslog_receiver):
    relay = make_relay({"syslog": "1", "syslog_ident": "myrelay", "syslog_facility": "local3"},
                       env={"PGRELAY_SYSLOG_SOCKET": syslog_receiver.path})
    try:
        psycopg2.connect(relay.dsn(dbname="no_such_db_xyz"), connect_timeout=5).close()
    except psycopg2.Error:
        pass
    pid = relay.proc.pid

    def received():
        return [m.decode() for m in syslog_receiver.drain()]
    messages = wait_until(lambda: (lambda ms: ms if any("no_such_db_xyz" in m for m in ms) else None)(received()),
                          timeout=5, message="syslog messages")
    local3 = 19
    up = next(m for m in messages if "process up" in m)
    # RFC 3164 as syslog(3) sends it: <facility*8+severity>ident[pid]: LEVEL message
    assert re.fullmatch(rf"<{local3 * 8 + 6}>myrelay\[{pid}\]: LOG process up: pgrelay .*\x00", up), up
    warning = next(m for m in messages if "no_such_db_xyz" in m and "pooler error" in m)
    assert warning.startswith(f"<{local3 * 8 + 4}>myrelay[{pid}]: WARNING C-"), warning
    assert "UTC [" not in up  # syslog stamps its own time


def test_syslog_default_ident_and_facility(make_relay, syslog_receiver):
    relay = make_relay({"syslog": "1"}, env={"PGRELAY_SYSLOG_SOCKET": syslog_receiver.path})
    messages = wait_until(lambda: [m.decode() for m in syslog_receiver.drain() if b"process up" in m], timeout=5)
    daemon = 3
    assert messages[0].startswith(f"<{daemon * 8 + 6}>pgbouncer[{relay.proc.pid}]: LOG process up")


def test_syslog_off_sends_nothing(make_relay, syslog_receiver):
    relay = make_relay({"syslog": "0"}, env={"PGRELAY_SYSLOG_SOCKET": syslog_receiver.path})
    scalar(connect(relay), "SELECT 1")
    assert syslog_receiver.drain() == []


def test_syslog_without_a_receiver_warns_and_serves(make_relay, tmp_path):
    relay = make_relay({"syslog": "1"}, env={"PGRELAY_SYSLOG_SOCKET": str(tmp_path / "nobody-listens")})
    assert "WARNING cannot log to syslog through" in relay.log()
    assert scalar(connect(relay), "SELECT 'served'") == "served"


def test_syslog_facility_bad_value_is_a_config_error(tmp_path, pg):
    from ..support import RelayProcess
    relay = RelayProcess(str(tmp_path), pg, {"syslog": "1", "syslog_facility": "local9"})
    with pytest.raises(RuntimeError, match=r"syslog_facility: invalid value 'local9'"):
        relay.start()


# -- no secrets in the log ------------------------------------------------------------------------

DSN_SECRET = "dsnSecret-8f3a1c"
FILE_SECRET = "fileSecret-27b9e4"
WRONG_SECRET = "wrongGuess-5d0c77"


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_in_the_log(make_relay, tmp_path, pg, log_format):
    auth_file = tmp_path / "users.txt"
    auth_file.write_text(f'"postgres" "{FILE_SECRET}"\n')
    relay = make_relay({"auth_type": "md5", "auth_file": str(auth_file), "verbose": "2", "log_format": log_format,
                        "stats_period": "1"},
                       databases={"*": f"host=127.0.0.1 port={pg.port} password={DSN_SECRET}"})
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(relay.dsn(password=WRONG_SECRET), connect_timeout=5)
    conn = psycopg2.connect(relay.dsn(password=FILE_SECRET), connect_timeout=5)
    with conn.cursor() as cur:
        cur.execute("SELECT %s", ("param-value-3e1f",))
    conn.close()
    wait_until(lambda: relay.log().count("closing because") >= 2 and "stats: " in relay.log(), timeout=5)
    log = relay.log()
    assert "password authentication failed" in log
    for secret in (DSN_SECRET, FILE_SECRET, WRONG_SECRET, "param-value-3e1f"):
        assert secret not in log
