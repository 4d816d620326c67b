"""Property-based protocol fuzzing of a live pgrelay: arbitrary bytes and startup packets, and interleaved clients that must each get their own results."""

from __future__ import annotations

import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from fuzz.targets import _reference_client

from ..support import (
    RawClient,
    assert_served,
    data_rows,
    error_fields,
    message,
    query_message,
    startup_packet,
)

PG_MAX_MESSAGE = 0x40000000  # max_packet_size's default caps at PostgreSQL's 1 GiB
FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
CLOSE_TIMEOUT = 10  # seconds pgrelay may take to close after the client's EOF: longer is a hang

FRONTEND = b"QPBEDCHSXFdcfp"
# A message of a real frontend type with a random body (some cut short, some with a lying length),
# or raw bytes: most of a stream stays framed, so the fuzzer gets past the first header.
frontend_message = st.one_of(
    st.builds(lambda k, body: message(bytes([k]), body), st.sampled_from(FRONTEND), st.binary(max_size=64)),
    st.builds(lambda k, n, body: bytes([k]) + struct.pack("!I", n) + body, st.sampled_from(FRONTEND),
              st.integers(0, 300), st.binary(max_size=64)),
    st.binary(min_size=1, max_size=32),
)
cuts = st.lists(st.integers(1, 64), max_size=6)


def pieces(data: bytes, steps: list[int]) -> list[bytes]:
    out, pos = [], 0
    for step in steps:
        if pos >= len(data):
            break
        out.append(data[pos:pos + step])
        pos += step
    return out + ([data[pos:]] if pos < len(data) else [])


def send_in_pieces(raw: RawClient, data: bytes, steps: list[int]) -> None:
    for piece in pieces(data, steps):
        try:
            raw.send(piece)
        except (BrokenPipeError, ConnectionResetError):
            return  # pgrelay closed already (it refused an earlier piece)


def read_to_close(raw: RawClient, timeout: float = CLOSE_TIMEOUT) -> bytes:
    """Everything pgrelay sends until it closes; fails if it neither closes nor answers in time."""
    raw.sock.settimeout(timeout)
    got = raw.buf
    try:
        while True:
            chunk = raw.sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    except TimeoutError:
        pytest.fail(f"pgrelay neither closed nor finished within {timeout}s (hang); got {got[:200]!r}")


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split what pgrelay sent into messages; it must be well framed (a cut-off tail is not allowed)."""
    out, pos = [], 0
    while pos < len(data):
        assert pos + 5 <= len(data), f"pgrelay sent a cut-off message header: {data[pos:pos + 16]!r}"
        length = struct.unpack_from("!I", data, pos + 1)[0]
        assert 4 <= length and pos + 1 + length <= len(data), f"bad framing from pgrelay: {data[pos:pos + 16]!r}"
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


@FUZZ
@given(parts=st.lists(frontend_message, min_size=1, max_size=8), steps=cuts)
def test_arbitrary_bytes_after_login_are_refused_or_served_and_never_hang(relay, parts, steps):
    """After a valid login, any byte stream, cut into any sends: a stream with a protocol violation
    gets FATAL 08P01 and a close without the client's EOF; any other stream is served (or waits for
    the rest of a message) and pgrelay closes once the client hangs up. A fresh client is served after."""
    data = b"".join(parts)
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    try:
        raw.login()
        raw.buf = b""
        send_in_pieces(raw, data, steps)
        verdict, _, _ = _reference_client(data, PG_MAX_MESSAGE)
        if verdict == "violation":
            got = messages(read_to_close(raw))  # no EOF from us: pgrelay must refuse and close by itself
            fatal = [error_fields(body) for kind, body in got if kind == b"E"]
            assert fatal and fatal[-1]["S"] == "FATAL" and fatal[-1]["C"] == "08P01", (data, got)
        else:
            try:
                raw.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            for kind, body in messages(read_to_close(raw)):
                if kind == b"E":
                    assert {"S", "C", "M"} <= set(error_fields(body)), body
    finally:
        raw.close()
    assert_served(relay)


def test_violation_in_a_split_header_closes_the_half_sent_server(make_relay):
    """Found by the test above: a Sync's type byte in one read (forwarded: the client is linked to a
    server) and a length of 0 in the next. pgrelay refused the client but released the server with
    the stray 'S' in it, so the next client's query reached PostgreSQL as garbage. With one server in
    the pool the next client gets that very server: it must be served, on a new server."""
    relay = make_relay({"default_pool_size": "1"})
    assert_served(relay)  # the pool's one server exists and is idle
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(b"S")
    time.sleep(0.2)  # its own read: the byte goes out to the server
    raw.send(b"\0\0\0\0")
    fields = raw.read_error()
    assert (fields["S"], fields["C"]) == ("FATAL", "08P01"), fields
    assert fields["M"] == "bad packet header: message 'S' with length 0", fields
    assert raw.closed()
    raw.close()
    for _ in range(3):
        assert_served(relay)
    assert "closing because: client disconnect while server was not ready" in relay.log()


def _served_within(relay, seconds: float = 5) -> None:
    """A new client's query is answered within `seconds` (a raw client: a stuck server fails fast)."""
    check = RawClient(relay.port, timeout=seconds)
    try:
        check.login()
        check.send(query_message("SELECT 'served'"))
        msgs = check.read_reply(timeout=seconds)
        assert msgs is not None, f"no reply within {seconds}s"
        assert data_rows(msgs) == [["served"]], msgs
    finally:
        check.close()


def test_violation_after_a_split_header_closes_the_half_sent_server(make_relay):
    """Found by fuzz/live.py: a Sync's first four bytes in one read (forwarded), then a read with its
    last length byte and an unknown message type. pgrelay refused the client without forwarding
    that read, but counted the client at a boundary and released the server holding "S\0\0\0":
    the next client's first byte completed the Sync's length and PostgreSQL read its query as the
    Sync's body, so it never got an answer (or worse, another client's bytes). The pool's one
    server must serve the next client, on a new server."""
    relay = make_relay({"default_pool_size": "1"})
    _served_within(relay)
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(b"S\0\0\0")
    time.sleep(0.2)  # its own read: the four bytes go out to the server
    raw.send(b"\x04" + b"\xb4\0\0\0\x04")
    fields = raw.read_error()
    assert (fields["S"], fields["C"], fields["M"]) == ("FATAL", "08P01", "unknown pkt from client: 0xb4"), fields
    assert raw.closed()
    raw.close()
    for _ in range(3):
        _served_within(relay)
    assert "closing because: client disconnect while server was not ready" in relay.log()


@pytest.mark.parametrize("describe", [b"P\0", b"Snosuch\0"], ids=["portal", "named-statement"])
def test_function_call_after_a_failed_unsynced_batch_does_not_hold_the_server(make_relay, describe):
    """Found by fuzz/live.py: a Describe that fails, then a FunctionCall and a Terminate, with no
    Sync. PostgreSQL skips everything up to a Sync after an extended-protocol error, so the
    FunctionCall's ReadyForQuery never comes; pgrelay counted the FunctionCall as ending the batch,
    drained the server for a reply that never came, and the pool's one server was lost to everyone
    for server_drain_timeout (30 s). Only a Sync ends a batch: the client leaves mid-batch and its
    server is rolled back (a Sync ends the skipping) or closed, and serves the next client at once.
    `named-statement` goes through pgrelay.prepared, `portal` through the relay's scanner."""
    relay = make_relay({"default_pool_size": "1", "server_drain_timeout": "30"})
    _served_within(relay)
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(message(b"D", describe) + message(b"F", b"\0\0\0\0" + b"\0\0" + b"\0\0" + b"\0\0") + message(b"X"))
    read_to_close(raw)  # pgrelay leaves at the Terminate once the bytes are with the server
    raw.close()
    for _ in range(3):
        _served_within(relay)


def test_terminate_during_copy_from_stdin_ends_the_copy_and_frees_the_server(make_relay):
    """Found by fuzz/live.py: COPY ... FROM STDIN, some CopyData, then Terminate. PostgreSQL ends the
    COPY when the Terminate arrives, but pgrelay keeps the Terminate and drains the server for the
    replies owed, so PostgreSQL waited for more data and the pool's one server was lost to everyone
    for server_drain_timeout. Now the drain starts with a CopyFail: the COPY fails (nothing of it
    is written, as in PostgreSQL) and the server serves the next client at once."""
    relay = make_relay({"default_pool_size": "1", "server_drain_timeout": "30"})
    setup = RawClient(relay.port)
    setup.login()
    assert [k for k, _ in setup.query("CREATE TABLE copy_left (a int)")][-1] == b"Z"
    setup.close()
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(query_message("COPY copy_left FROM STDIN") + message(b"d", b"1\n") + message(b"X"))
    read_to_close(raw)
    raw.close()
    started = time.monotonic()
    _served_within(relay)
    assert time.monotonic() - started < 5
    check = RawClient(relay.port)
    check.login()
    assert data_rows(check.query("SELECT count(*) FROM copy_left")) == [["0"]]
    check.query("DROP TABLE copy_left")
    check.close()


def test_query_inside_an_unsynced_batch_is_answered_and_the_sync_releases_the_server(make_relay):
    """What PostgreSQL does with a Query inside a batch that did not fail (some drivers send one
    before their Sync): it runs it and answers with a ReadyForQuery; the batch's Sync gets another.
    The server stays with the client until that Sync, then goes back to the pool's one slot."""
    relay = make_relay({"default_pool_size": "1"})
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(message(b"P", b"\0SELECT 1\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
             + message(b"E", b"\0\0\0\0\0") + query_message("SELECT 2"))
    msgs = raw.read_reply(timeout=5)
    assert msgs is not None and [k for k, _ in msgs] == [b"1", b"2", b"D", b"C", b"T", b"D", b"C", b"Z"], msgs
    assert data_rows(msgs) == [["1"], ["2"]]
    raw.send(message(b"S"))
    msgs = raw.read_reply(timeout=5)
    assert msgs is not None and [k for k, _ in msgs] == [b"Z"], msgs
    _served_within(relay)  # released at the Sync: the one server serves another client
    raw.send(query_message("SELECT 3"))
    msgs = raw.read_reply(timeout=5)
    assert msgs is not None and data_rows(msgs) == [["3"]], msgs
    raw.close()


def test_session_state_probe_waits_until_the_client_is_between_messages(make_relay):
    """Found by fuzz/live.py: a SET (which makes pgrelay probe the session state once the transaction
    ends) followed, in the same send, by the start of a long CopyData. The ReadyForQuery was held
    back and pgrelay's probe query written to the server inside the client's half-sent message:
    PostgreSQL read it as CopyData and never answered, the client stopped being read (its close
    went unnoticed) and the server was lost to the pool for good. Now the ReadyForQuery goes to the
    client as it came and the probe waits for a boundary; the pool's one server serves others after."""
    relay = make_relay({"default_pool_size": "1"})
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    raw.login()
    raw.send(query_message("SET application_name = 'fuzz'") + b"d" + struct.pack("!I", 100000) + b"partial")
    msgs = raw.read_reply(timeout=5)
    assert msgs is not None and (b"C", b"SET\0") in msgs, msgs  # the ReadyForQuery was not held back
    raw.sock.shutdown(socket.SHUT_WR)
    read_to_close(raw)  # the client's close is noticed
    raw.close()
    for _ in range(3):
        assert_served(relay)


# A startup-phase packet: a real startup packet with random parameters, a real version code with a
# random length and body, or raw bytes.
startup_codes = st.sampled_from([196608, 196609, 196610, 196700, 131072, 262144, 80877103, 80877104, 80877102, 0])
text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20)
startup_like = st.one_of(
    st.builds(lambda user, params: startup_packet(user=user, **params), text,
              st.dictionaries(st.sampled_from(["options", "application_name", "_pq_.x", "replication", "search_path",
                                               "DateStyle", "database", "client_encoding"]), text, max_size=4)),
    st.builds(lambda n, code, body: struct.pack("!II", n, code) + body, st.integers(0, 12000), startup_codes,
              st.binary(max_size=200)),
    st.binary(min_size=1, max_size=200),
)


@FUZZ
@given(packets=st.lists(startup_like, min_size=1, max_size=3), steps=cuts)
def test_arbitrary_startup_packets_are_refused_or_logged_in_and_never_hang(relay, packets, steps):
    """Any startup-phase bytes, cut into any sends, then the client's EOF: pgrelay answers with
    well-framed messages (after at most one 'N' per SSL/GSS request) and closes within the limit."""
    data = b"".join(packets)
    raw = RawClient(relay.port, timeout=CLOSE_TIMEOUT)
    try:
        send_in_pieces(raw, data, steps)
        try:
            raw.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        got = read_to_close(raw)
        refusals = 0
        while got[:1] == b"N" and refusals < 2 and (len(got) == 1 or got[1:2] in b"ERNvZSK"):
            got, refusals = got[1:], refusals + 1  # SSLRequest / GSSENCRequest answered "no"
        logged_in = False
        for kind, body in messages(got):
            # Until its first ReadyForQuery only the startup phase's messages; after it, bytes that
            # followed the startup packet were read as queries and may be answered with anything.
            assert logged_in or kind in b"ERNvZSK", (kind, body)
            logged_in = logged_in or kind == b"Z"
            if kind == b"E":
                assert {"S", "C", "M"} <= set(error_fields(body)), body
    finally:
        raw.close()
    assert_served(relay)


# -- interleaved clients in transaction pooling ------------------------------------------------

def parse_bind_execute(sql: str, param: str) -> bytes:
    return (message(b"P", b"\0" + sql.encode() + b"\0\0\0")
            + message(b"B", b"\0\0\0\0\0\x01" + struct.pack("!I", len(param)) + param.encode() + b"\0\0")
            + message(b"E", b"\0\0\0\0\0"))


SYNC = message(b"S")


class InterleavedClients(RuleBasedStateMachine):
    """Three raw clients of one transaction-pooling pgrelay, each with its own token, interleaving
    simple queries, extended batches (Sync sent later, after other clients ran), and transactions
    that keep a session setting. Every reply must carry the asking client's token."""

    relay = None  # set by the test before the machine runs
    CLIENTS = 3

    def __init__(self):
        super().__init__()
        self.clients = []
        for i in range(self.CLIENTS):
            raw = RawClient(self.relay.port, timeout=CLOSE_TIMEOUT)
            raw.login()
            self.clients.append({"raw": raw, "token": f"tok{i}", "n": 0, "in_txn": False, "batch": [], "pid": None})

    def teardown(self):
        for c in self.clients:
            c["raw"].close()

    def _next(self, c) -> str:
        c["n"] += 1
        return f"{c['token']}-{c['n']}"

    def _reply(self, c) -> list:
        msgs = c["raw"].read_reply(timeout=CLOSE_TIMEOUT)
        assert msgs is not None, f"{c['token']}: no reply within {CLOSE_TIMEOUT}s"
        errors = [error_fields(body) for kind, body in msgs if kind == b"E"]
        assert not errors, (c["token"], errors)
        return msgs

    @rule(i=st.integers(0, CLIENTS - 1))
    def simple_query(self, i):
        c = self.clients[i]
        if c["batch"]:
            return  # its batch's Sync comes first
        value = self._next(c)
        c["raw"].send(query_message(f"SELECT '{value}', current_setting('pgrelay.token', true), pg_backend_pid()"))
        rows = data_rows(self._reply(c))
        assert rows[0][0] == value, (value, rows)
        self._check_txn(c, rows[0][1], rows[0][2])

    @rule(i=st.integers(0, CLIENTS - 1))
    def extended_unsynced(self, i):
        """Parse/Bind/Execute with no Sync yet: the client keeps its server until the Sync."""
        c = self.clients[i]
        value = self._next(c)
        c["raw"].send(parse_bind_execute("SELECT $1::text, current_setting('pgrelay.token', true), "
                                         "pg_backend_pid()::text", value))
        c["batch"].append(value)

    @rule(i=st.integers(0, CLIENTS - 1))
    def sync(self, i):
        c = self.clients[i]
        if not c["batch"]:
            return
        c["raw"].send(SYNC)
        rows = data_rows(self._reply(c))
        assert [r[0] for r in rows] == c["batch"], (c["batch"], rows)
        for r in rows:
            self._check_txn(c, r[1], int(r[2]))
        c["batch"] = []

    @rule(i=st.integers(0, CLIENTS - 1))
    def begin(self, i):
        c = self.clients[i]
        if c["in_txn"] or c["batch"]:
            return
        c["raw"].send(query_message(f"BEGIN; SET LOCAL pgrelay.token = '{c['token']}'; SELECT pg_backend_pid()"))
        c["pid"] = int(data_rows(self._reply(c))[0][0])
        c["in_txn"] = True

    @rule(i=st.integers(0, CLIENTS - 1))
    def commit(self, i):
        c = self.clients[i]
        if not c["in_txn"] or c["batch"]:
            return
        c["raw"].send(query_message("COMMIT"))
        self._reply(c)
        c["in_txn"], c["pid"] = False, None

    def _check_txn(self, c, token, pid) -> None:
        """Inside its transaction a client sees its own SET LOCAL and keeps its server; outside it,
        no other client's transaction-local setting can reach it."""
        if c["in_txn"]:
            assert token == c["token"] and int(pid) == c["pid"], (c["token"], token, pid, c["pid"])
        else:
            assert token in (None, ""), (c["token"], token)

    @invariant()
    def tokens_are_distinct(self):
        assert len({c["token"] for c in self.clients}) == self.CLIENTS


def test_interleaved_clients_get_their_own_results(make_relay):
    relay = make_relay({"default_pool_size": "4"})
    InterleavedClients.relay = relay
    state_machine = InterleavedClients.TestCase
    state_machine.settings = settings(max_examples=15, stateful_step_count=25, deadline=None, derandomize=True,
                                      database=None, suppress_health_check=[HealthCheck.too_slow])
    try:
        state_machine().runTest()
    finally:
        InterleavedClients.relay = None
    assert_served(relay)
