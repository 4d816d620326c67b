"""Parameter sync quoting: the SET batch that gives a shared server a client's tracked values reads
the same whatever standard_conforming_strings another client left on that server (issue 7, item 4),
and a value the server refuses ends the client's connection with a FATAL."""

from __future__ import annotations

import os
import subprocess

import psycopg
import psycopg2
import pytest

from ..support import RawClient, connect, query_message, scalar

# application_name values that plain '...' quoting gets wrong once standard_conforming_strings is off:
# a trailing backslash ends the literal early (42601 unterminated quoted string), a backslash
# before a letter is dropped (x\y becomes xy), \' ends nothing, and so on.
VALUES = {
    "windows_path": "C:\\temp\\",
    "backslash_letter": "x\\y",
    "quote": "it's",
    "doubled_quotes_and_backslashes": "a''b\\\\'",
    "backslash_quote": "\\'; SELECT 1; --",
    "backslash_n": "line\\nbreak\\t",
    "octal_escape": "\\101\\x42",
    "only_backslashes": "\\\\\\",
    "unicode": "日本語 ✓",
}


def direct_value(pg, application_name: str) -> str:
    """What PostgreSQL itself makes of this application_name (it keeps only printable ASCII)."""
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres",
                            application_name=application_name, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW application_name")
            return cur.fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("scs", ["off", "on"])
@pytest.mark.parametrize("name", sorted(VALUES))
def test_application_name_survives_standard_conforming_strings_left_by_another_client(make_relay, pg, scs, name):
    value = VALUES[name]
    expected = direct_value(pg, value)
    if value.isascii():
        assert expected == value  # PostgreSQL keeps these values as they are
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a = connect(relay, application_name="a")
    b = None
    try:
        pid = scalar(a, "SELECT pg_backend_pid()")
        with a.cursor() as cur:
            cur.execute(f"SET standard_conforming_strings = {scs}")
        assert scalar(a, "SHOW standard_conforming_strings") == scs
        # B logs in and gets the one server, where A left standard_conforming_strings as set above.
        b = connect(relay, application_name=value)
        assert scalar(b, "SELECT pg_backend_pid()") == pid
        assert scalar(b, "SHOW application_name") == expected
        assert scalar(b, "SELECT current_setting('application_name')") == expected
        assert scalar(b, "SHOW standard_conforming_strings") == "on"  # B's own value came back too
        # Back and forth: each client keeps its own values on the shared server.
        for _ in range(2):
            assert (scalar(a, "SELECT current_setting('application_name') || '/' || "
                              "current_setting('standard_conforming_strings')")) == f"a/{scs}"
            assert scalar(b, "SELECT current_setting('application_name')") == expected
            assert scalar(b, "SELECT pg_backend_pid()") == pid
        # B turns it off itself: its own value must still be quoted right when A has the server between.
        with b.cursor() as cur:
            cur.execute("SET standard_conforming_strings = off")
        assert scalar(a, "SELECT current_setting('standard_conforming_strings')") == scs
        assert scalar(b, "SELECT current_setting('application_name') || '|' || "
                         "current_setting('standard_conforming_strings')") == f"{expected}|off"
    finally:
        a.close()
        if b is not None:
            b.close()
    assert "invalid server parameter" not in relay.log()


@pytest.mark.parametrize("scs", ["off", "on"])
def test_client_that_set_a_backslash_value_itself_keeps_it(make_relay, scs):
    """A value the client SET (reported back by the server) is re-applied exactly too."""
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a = connect(relay, application_name="a")
    b = connect(relay, application_name="b")
    try:
        with b.cursor() as cur:
            cur.execute("SET application_name = %s", (r"D:\data\ 'x' \\",))
        with a.cursor() as cur:
            cur.execute(f"SET standard_conforming_strings = {scs}")
        assert scalar(b, "SHOW application_name") == r"D:\data\ 'x' \\"
        assert scalar(a, "SHOW application_name") == "a"
        assert scalar(b, "SHOW application_name") == r"D:\data\ 'x' \\"
    finally:
        a.close()
        b.close()


REFUSED = {
    # startup parameter -> (parameter named in the server's error, value)
    "client_encoding": ({"client_encoding": "bogus"}, "client_encoding"),
    "DateStyle": ({"options": "-c DateStyle=bogus"}, "DateStyle"),
    "TimeZone": ({"options": "-c TimeZone=Nowhere/Bogus"}, "TimeZone"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_value_the_server_refuses_is_a_fatal_error(make_relay, case):
    params, parameter = REFUSED[case]
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    raw = RawClient(relay.port)
    try:
        raw.login(**params)
        raw.send(query_message("SELECT 1"))
        fields = raw.read_error()
        # The connection is closed after it, so the error is FATAL (libpq would otherwise report
        # an ERROR followed by "server closed the connection unexpectedly").
        assert (fields["S"], fields["V"], fields["C"]) == ("FATAL", "FATAL", "22023"), fields
        assert fields["M"].startswith(f'invalid value for parameter "{parameter}"'), fields
        assert raw.closed(), "pgrelay kept the connection open after FATAL"
    finally:
        raw.close()
    # Other clients are not affected: the next one gets a fresh server and is served.
    ok = connect(relay)
    try:
        assert scalar(ok, "SELECT 1") == 1
    finally:
        ok.close()


def test_refused_value_reaches_libpq_clients_as_fatal(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    conn = psycopg.connect(relay.dsn(options="-c TimeZone=Nowhere/Bogus"), autocommit=True, connect_timeout=10)
    try:
        with pytest.raises(psycopg.errors.InvalidParameterValue) as exc:
            conn.execute("SELECT 1")
        assert exc.value.diag.severity == "FATAL"
        assert str(exc.value) == 'invalid value for parameter "TimeZone": "Nowhere/Bogus"'
        assert conn.closed
    finally:
        conn.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGOPTIONS="-c TimeZone=Nowhere/Bogus", PGCONNECT_TIMEOUT="10")
    result = subprocess.run(["psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres",
                             "-d", "postgres", "-c", "SELECT 1"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result
    assert result.stderr.startswith('FATAL:  invalid value for parameter "TimeZone": "Nowhere/Bogus"\n'), result.stderr
