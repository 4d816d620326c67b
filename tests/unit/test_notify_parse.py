"""pgrelay.notify.parse: which Query texts pgrelay serves as LISTEN/UNLISTEN, and the names PostgreSQL would use."""

from __future__ import annotations

import pytest

from pgrelay.notify import codec, parse, TRIGGER


def p(text: str, client: str = "utf-8", db: str = "utf-8", server: str = "utf-8"):
    stmt = parse(text.encode(client or "latin-1") + b"\0", client, db, server)
    return None if stmt is None else (stmt.command, stmt.channel, bool(stmt.notice))


@pytest.mark.parametrize("text, want", [
    ("LISTEN foo", ("LISTEN", b"foo", False)),
    ("listen FOO;", ("LISTEN", b"foo", False)),
    ('LISTEN "FOO"', ("LISTEN", b"FOO", False)),
    ('LISTEN"a""b"', ("LISTEN", b'a"b', False)),
    ("  \n\tLISTEN foo  ;  \n", ("LISTEN", b"foo", False)),
    ("/* a /* nested */ comment */ LISTEN -- here\n foo -- end", ("LISTEN", b"foo", False)),
    ("UNLISTEN *", ("UNLISTEN", None, False)),
    ("unlisten*;", ("UNLISTEN", None, False)),
    ("UNLISTEN Bar", ("UNLISTEN", b"bar", False)),
    ("LISTEN user_1$x", ("LISTEN", b"user_1$x", False)),
    ("LISTEN name", ("LISTEN", b"name", False)),        # an unreserved keyword is a ColId
    ("LISTEN " + "a" * 63, ("LISTEN", b"a" * 63, False)),
    ("LISTEN " + "a" * 64, ("LISTEN", b"a" * 63, True)),
    ('LISTEN "' + "é" * 32 + '"', ("LISTEN", "é".encode() * 31, True)),
    ("LISTEN Ünï", ("LISTEN", "Ünï".encode(), False)),   # only ASCII folds, as PostgreSQL does in UTF8
])
def test_served(text, want):
    assert p(text) == want


@pytest.mark.parametrize("text", [
    "LISTEN", "LISTEN;", "UNLISTEN", "LISTEN *", "LISTEN select", "LISTEN user", "LISTEN join",
    'LISTEN ""', 'LISTEN "open', "LISTEN /* open", "LISTEN a b", "LISTEN a; SELECT 1", "LISTEN a;;",
    "LISTEN 'a'", "LISTEN E'a'", 'LISTEN U&"a"', "LISTEN 1a", "LISTENa", "LISTEN a.b", "SELECT 1",
    "UPDATE t SET a = 1", "NOTIFY a", "LOCK t", "-- LISTEN a", "EXPLAIN LISTEN a",
])
def test_left_to_the_server(text):
    assert p(text) is None


def test_embedded_nul_and_missing_terminator_are_left_to_the_server():
    assert parse(b"LISTEN a\0b\0", "utf-8", "utf-8", "utf-8") is None
    assert parse(b"LISTEN a", "utf-8", "utf-8", "utf-8") is None


def test_encodings():
    # a LATIN1 client's name, in a UTF8 database: converted to the listening server's encoding
    assert p('LISTEN "café"', client=codec("LATIN1")) == ("LISTEN", "café".encode(), False)
    # high-bit letters unquoted in a single-byte database fold by locale: the server decides
    assert p("LISTEN café", client=codec("LATIN1"), db=codec("LATIN1"), server=codec("LATIN1")) is None
    # SQL_ASCII: bytes as they are
    assert codec("SQL_ASCII") == "" and p("LISTEN a", client="", db="", server="") == ("LISTEN", b"a", False)
    assert codec("utf8") == codec("UTF-8") == codec("unicode") == "utf-8"
    assert codec("WIN1252") == "cp1252" and codec("EUC_JP") == "euc_jp"
    assert codec("MULE_INTERNAL") is None  # not convertible: LISTEN goes to the server


def test_trigger_is_only_the_first_byte_of_listen_and_unlisten():
    assert all(TRIGGER[b] for b in b"LlUu \t\n-/")
    assert not any(TRIGGER[b] for b in b"SsIiDdBbCcWwEeAaPpTtRrNnFf(")
