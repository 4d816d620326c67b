"""sql_over_http's request parsing: connection strings, headers, bodies, and parameters as Neon stringifies them."""

from __future__ import annotations

import pytest

from pgrelay.serverless import sql_over_http as s


def test_connection_string_is_url_decoded():
    o = s.parse_connection_string(b"postgresql://al%40ice:s3cr%40t%3A@db.localtest.me:5432/m%20ain"
                                  b"?sslmode=require&application_name=app%201&options=x")
    assert (o["user"], o["password"], o["database"], o["application_name"]) == ("al@ice", "s3cr@t:", "m ain", "app 1")
    o = s.parse_connection_string(b"postgres://bob@h/db")
    assert (o["password"], o["application_name"]) == ("", s.DEFAULT_APPLICATION_NAME)


@pytest.mark.parametrize("raw", [None, b"", b"mysql://a@h/db", b"postgresql://h/db", b"postgresql://a@h/",
                                 b"postgresql://a@h", b"not a url", b"postgresql://a@h:99999999999x/db\xff",
                                 b"postgresql://a%00b@h/db"])
def test_bad_connection_strings(raw):
    with pytest.raises(s.HttpError) as info:
        s.parse_connection_string(raw)
    assert (info.value.status, info.value.message) == (400, "invalid header: neon-connection-string")


def test_headers():
    o = s.parse_headers([(b"neon-connection-string", b"postgres://a@h/d"), (b"neon-raw-text-output", b"true"),
                         (b"neon-array-mode", b"TRUE"), (b"neon-batch-isolation-level", b"RepeatableRead"),
                         (b"neon-batch-read-only", b"true"), (b"neon-batch-deferrable", b"false"),
                         (b"authorization", b"Bearer tok.en")])
    assert (o["raw_text"], o["array_mode"], o["isolation"], o["read_only"], o["deferrable"], o["bearer"]) == \
        (True, False, "REPEATABLE READ", True, False, "tok.en")
    with pytest.raises(s.HttpError) as info:
        s.parse_headers([(b"neon-connection-string", b"postgres://a@h/d"), (b"neon-batch-isolation-level", b"serializable")])
    assert info.value.message == "invalid isolation level"


def test_payloads():
    assert s.parse_payload(b'{"query":"SELECT 1"}') == {"query": "SELECT 1", "params": [], "arrayMode": None}
    batch = s.parse_payload(b'{"queries":[{"query":"SELECT $1","params":["x"],"arrayMode":false}]}')
    assert batch == {"queries": [{"query": "SELECT $1", "params": ["x"], "arrayMode": False}]}
    assert s.parse_payload(b'{"queries":[]}') == {"queries": []}


@pytest.mark.parametrize("body", [b"", b"not json", b"[1]", b'{"q":1}', b'{"query":1}', b'{"query":"x","params":"a"}',
                                  b'{"query":"x","arrayMode":"yes"}', b'{"queries":{}}', b'{"queries":[1]}',
                                  b'{"query":"x","params":[NaN]}', b'{"query":"a\\u0000"}', b"\xff\xfe"])
def test_bad_payloads(body):
    with pytest.raises(s.HttpError) as info:
        s.parse_payload(body)
    assert info.value.status == 400 and info.value.message.startswith("could not parse the HTTP request body: ")


@pytest.mark.parametrize("value, text", [
    ("x", "x"), (None, None), (True, "true"), (False, "false"), (42, "42"), (1.5, "1.5"),
    ({"a": [1, "b"]}, '{"a":[1,"b"]}'),
    ([1, 2], "{1,2}"), (["a", 'b"c', None], '{"a","b\\"c",NULL}'), ([[1, None], [True]], "{{1,NULL},{true}}"),
    ([{"k": "v"}], '{"{\\"k\\":\\"v\\"}"}'), ([], "{}"),
])
def test_params_are_stringified_as_neon_does(value, text):
    assert s.param_text(value) == text


@pytest.mark.parametrize("tag, expected", [
    (b"SELECT 3\0", ("SELECT", 3)), (b"INSERT 0 5\0", ("INSERT", 5)), (b"CREATE TABLE\0", ("CREATE", None)),
    (b"UPDATE 0\0", ("UPDATE", 0)), (b"BEGIN\0", ("BEGIN", None)), (b"\0", ("", None)),
])
def test_command_tags(tag, expected):
    assert s._command_tag(tag) == expected


class ChunkedStream:
    """recv_some in fixed-size chunks, then ClientGone."""

    def __init__(self, data: bytes, chunk: int):
        self.data, self.chunk = data, chunk

    def recv_some(self) -> bytes:
        from pgrelay.errors import ClientGone
        if not self.data:
            raise ClientGone("eof")
        out, self.data = self.data[:self.chunk], self.data[self.chunk:]
        return out


@pytest.mark.parametrize("chunk", [1, 4999, 65536, 1 << 20])
def test_reader_splits_messages_across_any_chunking(chunk):
    from pgrelay import protocol
    bodies = [bytes([i % 251]) * size for i, size in enumerate([0, 3, 70000, 5, 200000, 65531, 1, 131072])]
    reader = s.Reader(ChunkedStream(b"".join(protocol.message(b"D", b) for b in bodies), chunk))
    assert [reader.message(1 << 30, 1 << 30) for _ in bodies] == [(68, b) for b in bodies]
    with pytest.raises(s.BridgeLost):
        reader.message(1 << 30, 1 << 30)


def test_reader_limits():
    from pgrelay import protocol
    reader = s.Reader(ChunkedStream(protocol.message(b"D", b"x" * 100), 7))
    with pytest.raises(s.ResponseTooLarge):
        reader.message(1000, 99)
    reader = s.Reader(ChunkedStream(protocol.message(b"T", b"x" * 100), 7))
    with pytest.raises(s.BridgeLost):
        reader.message(99, 1000)
