"""pgjson: PostgreSQL text values to JSON as Neon's json.rs does (raw text output off)."""

from __future__ import annotations

import json

import pytest

from pgrelay.serverless import pgjson


def as_json(text, oid):
    return json.loads(pgjson.dumps(pgjson.to_json(text, oid)))


@pytest.mark.parametrize("text, oid, expected", [
    ("t", 16, True), ("f", 16, False),
    ("-32768", 21, -32768), ("2147483647", 23, 2147483647),
    ("9223372036854775807", 20, "9223372036854775807"),  # int8 stays a string (JS numbers lose it)
    ("1.50", 1700, "1.50"),                               # numeric too
    ("1.5", 701, 1.5), ("-0.25", 700, -0.25), ("1e+100", 701, 1e100),
    ("NaN", 701, "NaN"), ("Infinity", 700, "Infinity"), ("-Infinity", 701, "-Infinity"),
    ('{"a": [1, "x"]}', 3802, {"a": [1, "x"]}), ("[1, null]", 114, [1, None]), ('"s"', 114, "s"),
    ("hello", 25, "hello"), ("\\x4142", 17, "\\x4142"), ("2024-01-02 03:04:05+00", 1184, "2024-01-02 03:04:05+00"),
    (None, 23, None), (None, 1007, None),
])
def test_scalars(text, oid, expected):
    assert as_json(text, oid) == expected


def test_json_is_embedded_as_the_server_wrote_it():
    assert pgjson.dumps(pgjson.to_json('{"b": 1, "a": 2}', 3802)) == '{"b": 1, "a": 2}'


@pytest.mark.parametrize("text, oid, expected", [
    ("{}", 1007, []),
    ("{1,NULL,3}", 1007, [1, None, 3]),
    ("{{1,2},{3,4}}", 1005, [[1, 2], [3, 4]]),
    ("[0:1]={7,8}", 1007, [7, 8]),                          # bounds dropped
    ("[1:1][-1:0]={{1,2}}", 1007, [[1, 2]]),
    ("{t,f,NULL}", 1000, [True, False, None]),
    ("{1,9223372036854775807}", 1016, ["1", "9223372036854775807"]),
    ("{1.5,NaN,-Infinity}", 1022, [1.5, "NaN", "-Infinity"]),
    ("{1.10,NULL}", 1231, ["1.10", None]),
    ('{"a b","c,d","e\\"f","g\\\\h","NULL",NULL,""}', 1009, ["a b", "c,d", 'e"f', "g\\h", "NULL", None, ""]),
    ('{x,"{}"}', 1015, ["x", "{}"]),
    ('{"{\\"a\\": 1}",NULL,"[2]"}', 3807, [{"a": 1}, None, [2]]),
    ('{"{\\"k\\": \\"v\\"}"}', 199, [{"k": "v"}]),
    ('{ 1 , 2 }', 1007, [1, 2]),                             # input-style whitespace
    ("{(1,1),(0,0);(3,3),(2,2)}", 1020, ["(1,1),(0,0)", "(3,3),(2,2)"]),  # box[]: ';' delimits
    ('{"2024-01-02 03:04:05+00"}', 1185, ["2024-01-02 03:04:05+00"]),
    ("{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}", 2951, ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"]),
])
def test_arrays(text, oid, expected):
    assert as_json(text, oid) == expected


@pytest.mark.parametrize("text", ["{1,2", "1,2}", '{"a}', "{1,2}x", "[1:2]{1,2}", "{{1},", "{1 2 ,}x"])
def test_malformed_arrays_raise(text):
    with pytest.raises(ValueError):
        pgjson.to_json(text, 1007)


def test_unknown_array_type_stays_a_string():
    assert pgjson.to_json("{happy,sad}", 99999) == "{happy,sad}"  # an enum[]: OID of its database


def test_dumps_object_rows_in_column_order():
    row = {"b": pgjson.to_json("1", 23), "a": pgjson.to_json('{"x":1}', 3802), "c": None}
    assert pgjson.dumps(row) == '{"b":1,"a":{"x":1},"c":null}'
