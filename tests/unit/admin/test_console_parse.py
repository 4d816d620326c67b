"""pgrelay/admin: the console's statement grammar (PgBouncer's admin.c regexes), SET parsing, the command
table and result encoding."""

import struct
from decimal import Decimal

import pytest

from pgrelay.admin.commands import (COMMANDS, AdminError, CommandTable, ResultSet, encode_result, parse_set,
                                    render)
from pgrelay.admin.console import parse


@pytest.mark.parametrize("sql, name, arg", [
    ("SHOW POOLS", "SHOW POOLS", ""),
    ("show pools;", "SHOW POOLS", ""),
    ("  Show\tClients ;  ", "SHOW CLIENTS", ""),
    ('SHOW "stats"', "SHOW STATS", ""),
    ("select version", "SHOW VERSION", ""),      # PgBouncer takes SELECT x as SHOW x
    ("PAUSE", "PAUSE", ""),
    ("pause mydb;", "PAUSE", "mydb"),
    ('PAUSE "my db"', "PAUSE", '"my db"'),        # as written: the handler unquotes it
    ("KILL_CLIENT 12", "KILL_CLIENT", "12"),
    ("SET log_connections = 1", "SET", "log_connections = 1"),
    ("set server_check_query to 'select 2';", "SET", "server_check_query to 'select 2'"),
])
def test_parse_accepts_pgbouncer_grammar(sql, name, arg):
    statement = parse(sql)
    assert (statement.name, statement.arg) == (name, arg)


@pytest.mark.parametrize("sql", [
    "SHOW POOLS; SHOW CLIENTS",          # one statement per Query, as PgBouncer
    "SHOW HELP; KILL",
    "SET log_connections = '1'; KILL",
    "SELECT 1",                           # becomes SHOW 1: no such command, but parses
    "PAUSE db1 db2",
    "PAUSE db'; KILL --",
    "SHOW",
    "",
    "SET foo",
    "pause db;;",
    "SHOW ſtats",                         # no Unicode case folding into ASCII keywords
])
def test_parse_refuses_everything_else_with_pgbouncers_text(sql):
    try:
        statement = parse(sql)
    except AdminError as exc:
        assert exc.message == f"invalid command '{sql}', use SHOW HELP;"
        assert exc.sqlstate == "08P01"
        return
    # "SELECT 1" and "SHOW" parse, and name no command: the console answers them the same way.
    assert statement.name not in COMMANDS, statement


def test_parse_refuses_overlong_words_as_bad_arguments():
    with pytest.raises(AdminError, match="^bad arguments$"):
        parse("PAUSE " + "d" * 64)
    with pytest.raises(AdminError, match="^bad arguments$"):
        parse("abcdefghijklmnopq")
    with pytest.raises(AdminError, match="^bad arguments$"):
        parse("SET x = '" + "v" * 300 + "'")
    assert parse("PAUSE " + "d" * 63).arg == "d" * 63


def test_fake_parameters_answer_show():
    statement = parse("SHOW client_encoding")
    assert statement.fake == "client_encoding"
    assert parse("show TimeZone").fake == "timezone"


def test_parse_set_unquotes_as_pgbouncer():
    assert parse_set("log_connections = 1") == ("log_connections", "1")
    assert parse_set("server_check_query TO 'select ''x'''") == ("server_check_query", "select 'x'")
    assert parse_set('"Odd""Key" = v') == ('Odd"Key', "v")
    with pytest.raises(AdminError):
        parse_set("a = b c")


def test_command_table_adds_plugin_commands_and_keeps_built_ins():
    table = CommandTable()
    table.add("show widgets", lambda ctx, arg: "SHOW", doc="widgets", admin=False)
    command, arg = table.find("SHOW WIDGETS")
    assert command.name == "SHOW WIDGETS" and command.pgrelay and not command.admin and arg == ""
    with pytest.raises(ValueError):
        table.add("SHOW POOLS", lambda ctx, arg: "SHOW")
    with pytest.raises(ValueError):
        table.add("drop table x", lambda ctx, arg: "X")
    assert "SHOW WIDGETS" not in CommandTable()  # other relays' tables are not touched


def test_result_encoding_types_and_nulls():
    result = ResultSet([("name", "text"), ("n", "int4"), ("v", "numeric"), ("flag", "text")],
                       [("a", 1, Decimal(5), True), (None, 2, Decimal("1.5"), False)])
    data = encode_result(result)
    assert data[:1] == b"T"
    length = struct.unpack("!I", data[1:5])[0]
    body = data[5:1 + length]
    assert struct.unpack("!h", body[:2])[0] == 4
    oids = []
    pos = 2
    for _ in range(4):
        pos = body.index(b"\0", pos) + 1
        oids.append(struct.unpack("!IhIhih", body[pos:pos + 18])[2])
        pos += 18
    assert oids == [25, 23, 1700, 25]
    assert b"\xff\xff\xff\xff" in data            # NULL
    assert data.endswith(b"C\x00\x00\x00\x09SHOW\x00")
    assert render(True, "text") == b"yes" and render(False, "bool") == b"f"
    with pytest.raises(ValueError):
        ResultSet([("x", "blob")])
    with pytest.raises(ValueError):
        encode_result(ResultSet([("x", "text")], [("a", "b")]))
