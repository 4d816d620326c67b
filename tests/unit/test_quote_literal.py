"""protocol.quote_literal: a literal PostgreSQL reads back unchanged under either standard_conforming_strings."""

from __future__ import annotations

import psycopg2
import pytest

from pgrelay.protocol import quote_literal

VALUES = [
    "", "plain", "it's", "''", "'", "\\", "\\\\", "C:\\temp\\", "x\\y", "a''b\\\\'", "\\'", "\\''",
    "\\'; SELECT 1; --", "E'x'", "$$dollar$$", "line\\nbreak\\t", "\\101\\x42\\u0041", "real\nnewline\ttab",
    "日本語 ✓", "emoji 🐘 and combining é", "".join(chr(c) for c in range(1, 128)),
]


@pytest.fixture(scope="module")
def direct(pg):
    conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="postgres", dbname="postgres", connect_timeout=10)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.mark.parametrize("scs", ["on", "off"])
def test_postgresql_reads_the_literal_back_unchanged(direct, scs):
    with direct.cursor() as cur:
        cur.execute(f"SET standard_conforming_strings = {scs}")
        cur.execute("SET escape_string_warning = on")
        for value in VALUES:
            # Bypass psycopg2's own parameter quoting: the SQL text is exactly what pgrelay sends.
            cur.execute("SELECT " + quote_literal(value))
            assert cur.fetchone()[0] == value, (scs, value)
            assert not direct.notices, direct.notices  # no "nonstandard use of \\ in a string literal"
        # The same in a multi-statement SET batch, the form pgrelay uses.
        cur.execute(";".join(f"SET application_name={quote_literal(v)}" for v in ("C:\\temp\\", "x\\y'z")))
        cur.execute("SHOW application_name")
        assert cur.fetchone()[0] == "x\\y'z"


def test_quoted_form():
    assert quote_literal("C:\\temp\\") == "E'C:\\\\temp\\\\'"
    assert quote_literal("it's") == "E'it''s'"
    assert quote_literal("") == "E''"


def test_nul_is_refused():
    with pytest.raises(ValueError):
        quote_literal("a\x00b")
