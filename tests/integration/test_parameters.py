"""ParameterStatus tracking: per-client TimeZone/DateStyle/application_name/IntervalStyle on shared servers, the welcome packet."""

from __future__ import annotations

import pytest
import socket

import psycopg

from ..support import RawClient, error_fields, startup_packet

SETTINGS_SQL = ("SELECT current_setting('TimeZone'), current_setting('DateStyle'), "
                "current_setting('application_name'), pg_backend_pid()")


def connect(relay, **kw) -> psycopg.Connection:
    # psycopg 3: unlike psycopg2 it does not SET DateStyle to ISO behind the client's back.
    return psycopg.connect(relay.dsn(**kw), autocommit=True)


def one(conn, sql):
    return conn.execute(sql).fetchone()


def status(conn, name):
    return conn.info.parameter_status(name)


@pytest.mark.smoke
def test_clients_with_different_settings_share_one_server(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a = connect(relay, options=r"-c TimeZone=UTC -c DateStyle=ISO,\ DMY", application_name="a")
    b = connect(relay, options=r"-c TimeZone=America/New_York -c DateStyle=SQL,\ MDY", application_name="b")
    try:
        assert (status(a, "TimeZone"), status(a, "DateStyle")) == ("UTC", "ISO, DMY")
        assert (status(b, "TimeZone"), status(b, "DateStyle")) == \
            ("America/New_York", "SQL, MDY")
        pids = set()
        for round_ in range(4):
            ta, tb = one(a, SETTINGS_SQL), one(b, SETTINGS_SQL)
            assert ta[:3] == ("UTC", "ISO, DMY", "a"), round_
            assert tb[:3] == ("America/New_York", "SQL, MDY", "b"), round_
            pids |= {ta[3], tb[3]}
            # The settings also govern how values are rendered, not just what SHOW says.
            assert one(a, "SELECT '2024-03-05 12:00+00'::timestamptz::text")[0] == "2024-03-05 12:00:00+00"
            assert one(b, "SELECT '2024-03-05 12:00+00'::timestamptz::text")[0] == "03/05/2024 07:00:00 EST"
        # Inside an explicit transaction too.
        with a.transaction():
            assert one(a, SETTINGS_SQL)[:3] == ("UTC", "ISO, DMY", "a")
        assert one(b, SETTINGS_SQL)[:3] == ("America/New_York", "SQL, MDY", "b")
        assert len(pids) == 1, pids
        # Neither client was told about the other's values.
        assert status(a, "TimeZone") == "UTC"
        assert status(b, "application_name") == "b"
    finally:
        a.close()
        b.close()


def test_a_clients_own_set_follows_it_across_transactions(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    a = connect(relay, options="-c TimeZone=UTC")
    b = connect(relay, options="-c TimeZone=America/New_York")
    try:
        pid = one(a, "SELECT pg_backend_pid()")[0]
        a.execute("SET TimeZone = 'Asia/Tokyo'")
        assert status(a, "TimeZone") == "Asia/Tokyo"
        assert one(b, "SELECT current_setting('TimeZone'), pg_backend_pid()") == ("America/New_York", pid)
        assert one(a, "SELECT current_setting('TimeZone'), pg_backend_pid()") == ("Asia/Tokyo", pid)
        # A SET rolled back leaves the client's earlier value in place.
        a.execute("BEGIN")
        a.execute("SET TimeZone = 'Europe/Paris'")
        assert one(a, "SHOW TimeZone") == ("Europe/Paris",)
        a.execute("ROLLBACK")
        assert one(b, "SHOW TimeZone") == ("America/New_York",)
        assert one(a, "SELECT current_setting('TimeZone'), pg_backend_pid()") == ("Asia/Tokyo", pid)
        assert one(b, "SHOW TimeZone") == ("America/New_York",)
        assert status(a, "TimeZone") == "Asia/Tokyo"
    finally:
        a.close()
        b.close()


def test_welcome_packet_reports_client_values_and_server_version(make_relay, pg):
    relay = make_relay()
    server_version = pg.psql("SHOW server_version")
    with psycopg.connect(relay.dsn(options="-c TimeZone=Europe/Berlin"), autocommit=True) as conn:
        assert conn.info.parameter_status("TimeZone") == "Europe/Berlin"
        assert conn.info.parameter_status("server_version") == server_version
        assert conn.info.server_version // 10000 == pg.version
        assert conn.execute("SHOW TimeZone").fetchone() == ("Europe/Berlin",)
    with psycopg.connect(relay.dsn(), autocommit=True) as conn:
        default_tz = pg.psql("SHOW TimeZone")
        assert conn.info.parameter_status("TimeZone") == default_tz
        assert conn.execute("SHOW TimeZone").fetchone() == (default_tz,)


def test_application_name_add_host(make_relay, pg):
    relay = make_relay({"application_name_add_host": 1})
    with psycopg.connect(relay.dsn(application_name="myapp"), autocommit=True) as conn:
        with socket.socket(fileno=socket.dup(conn.fileno())) as sock:
            host, port = sock.getsockname()[:2]
        expected = f"myapp - {host}:{port}"
        assert host == "127.0.0.1"
        assert conn.info.parameter_status("application_name") == expected
        pid, shown = conn.execute("SELECT pg_backend_pid(), current_setting('application_name')").fetchone()
        assert shown == expected
        assert pg.psql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {pid}") == expected


def test_interval_style_is_tracked_by_default(make_relay, pg):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    sql = "SELECT current_setting('IntervalStyle'), interval '1 day 2 hours'::text, pg_backend_pid()"
    a = connect(relay, options="-c IntervalStyle=iso_8601")
    b = connect(relay, options="-c IntervalStyle=postgres_verbose")
    c = connect(relay)
    try:
        assert status(a, "IntervalStyle") == "iso_8601"
        pids = set()
        for _ in range(3):
            ra, rb, rc = one(a, sql), one(b, sql), one(c, sql)
            assert ra[:2] == ("iso_8601", "P1DT2H")
            assert rb[:2] == ("postgres_verbose", "@ 1 day 2 hours")
            assert rc[:2] == ("postgres", "1 day 02:00:00")
            pids |= {ra[2], rb[2], rc[2]}
        c.execute("SET IntervalStyle = 'sql_standard'")
        assert one(a, sql)[:2] == ("iso_8601", "P1DT2H")
        assert one(c, sql)[:2] == ("sql_standard", "1 2:00:00")
        assert len(pids) == 1
    finally:
        a.close()
        b.close()
        c.close()


def test_untracked_startup_parameter_is_applied(make_relay):
    """Any startup parameter is applied and follows its client (pgrelay.session_state), tracked by
    ParameterStatus or not; ignore_startup_parameters drops those it names, as before."""
    relay = make_relay({"track_extra_parameters": "", "default_pool_size": 1,
                        "ignore_startup_parameters": "extra_float_digits, lock_timeout"})
    a = connect(relay, options="-c IntervalStyle=iso_8601 -c lock_timeout=5s")
    b = connect(relay, options="-c TimeZone=UTC")
    try:
        assert status(a, "IntervalStyle") == "iso_8601"
        for _ in range(3):
            assert one(a, "SELECT current_setting('IntervalStyle'), current_setting('lock_timeout')") == \
                ("iso_8601", "0")  # lock_timeout is ignored: dropped, the server's default
            assert one(b, "SELECT current_setting('IntervalStyle'), current_setting('TimeZone')") == ("postgres", "UTC")
    finally:
        a.close()
        b.close()
    raw = RawClient(relay.port)
    raw.send(startup_packet(options="--no-such-thing=1"))
    kind, body = raw.read_message()
    while kind in (b"R", b"S"):
        kind, body = raw.read_message()
    fields = error_fields(body)
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "42704",
                                                      'unrecognized configuration parameter "no_such_thing"')
    assert raw.closed()
    raw.close()


def test_client_encoding_follows_each_client_on_a_shared_server(make_relay):
    relay = make_relay({"pool_mode": "transaction", "default_pool_size": 1})
    latin = connect(relay, client_encoding="LATIN1")
    utf8 = connect(relay, client_encoding="UTF8")
    try:
        assert status(latin, "client_encoding") == "LATIN1"
        sql = "SELECT current_setting('client_encoding'), %s::text, length(%s::text), pg_backend_pid()"
        pids = set()
        for _ in range(3):
            # psycopg encodes 'é' as one byte for LATIN1 and two for UTF8; the server must agree.
            enc, text, length, pid = latin.execute(sql, ("é", "café")).fetchone()
            assert (enc, text, length) == ("LATIN1", "é", 4)
            pids.add(pid)
            enc, text, length, pid = utf8.execute(sql, ("é", "café")).fetchone()
            assert (enc, text, length) == ("UTF8", "é", 4)
            pids.add(pid)
        assert len(pids) == 1
    finally:
        latin.close()
        utf8.close()
