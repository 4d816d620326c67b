"""pgrelay.prepared without sockets: the shared statements, the SQL it understands, and the reply queue's
undo order (the end-to-end behaviour is in tests/integration/test_prepared_statements.py)."""

from __future__ import annotations

import gc
import struct

import pytest

from pgrelay import prepared, protocol
from pgrelay.prepared import (ALL, SYNTH, TFWD, THIDE, ZSKIP, ClientStatements, ServerStatements, _blocked,
                              _fail_batch, _name_used, _pop, classify_query, close_message, parse_message,
                              sql_name, statement)


def body(sql: str, *types: int) -> bytes:
    return sql.encode() + b"\0" + struct.pack("!H", len(types)) + b"".join(struct.pack("!I", t) for t in types)


def test_same_text_and_types_is_one_statement_shared_by_all():
    a = statement(body("SELECT $1", 23))
    b = statement(body("SELECT $1", 23))
    c = statement(body("SELECT $1", 25))
    assert a is b and a is not c
    assert a.sname == b"PGRELAY_%d\0" % a.id
    assert a.id != c.id


def test_statements_no_one_holds_are_forgotten():
    text = body("SELECT 'forgotten'")
    first = statement(text).id
    gc.collect()
    assert statement(text).id != first  # the weak registry let it go; a new one gets a new id


def test_parse_and_close_messages_are_well_formed():
    stmt = statement(body("SELECT 1"))
    msg = parse_message(stmt)
    assert msg[:1] == b"P" and struct.unpack("!I", msg[1:5])[0] == len(msg) - 1
    assert msg[5:].startswith(stmt.sname) and msg.endswith(stmt.body)
    msg = close_message(stmt)
    assert msg == b"C" + struct.pack("!I", 5 + len(stmt.sname)) + b"S" + stmt.sname


@pytest.mark.parametrize("text, expected", [
    (b"DEALLOCATE x", ("one", b"x")),
    (b"  deallocate   prepare Foo ;  ", ("one", b"foo")),
    (b'DEALLOCATE "Mixed""Case"', ("one", b'Mixed"Case')),
    (b"DEALLOCATE _pg3_12", ("one", b"_pg3_12")),
    (b"DEALLOCATE ALL", ("all", None)),
    (b"deallocate prepare all;", ("all", None)),
    (b"DISCARD ALL", ("all", None)),
    (b"discard all ;", ("all", None)),
    (b"DISCARD PLANS", ("watch", None)),
    (b"SELECT 1; DEALLOCATE ALL", ("watch", None)),
    (b"SELECT 'deallocate'", ("watch", None)),
    (b"SELECT 1", None),
    (b"DEALLOCATE " + b"x" * 5000, None),  # too long to be one of ours: passed through
])
def test_classify_query(text, expected):
    assert classify_query(text) == expected


def test_sql_name_folds_like_postgres():
    assert sql_name(b"ABC") == b"abc"
    assert sql_name(b'"ABC"') == b"ABC"
    assert sql_name(b'"a""b"') == b'a"b'


def test_name_used_by_each_message_kind():
    assert _name_used(ord("P"), b"P\0\0\0\0s1\0SELECT 1\0\0\0") == b"s1"
    assert _name_used(ord("P"), b"P\0\0\0\0\0SELECT 1\0\0\0") == b""
    assert _name_used(ord("B"), b"B\0\0\0\0portal\0s2\0\0\0\0\0\0\0") == b"s2"
    assert _name_used(ord("B"), b"B\0\0\0\0\0\0\0\0\0\0\0\0") == b""
    assert _name_used(ord("D"), b"D\0\0\0\0Ss3\0") == b"s3"
    assert _name_used(ord("D"), b"D\0\0\0\0Pportal\0") == b""
    assert _name_used(ord("C"), b"C\0\0\0\0Ss4\0") == b"s4"
    assert _name_used(ord("Q"), protocol.query("DEALLOCATE s5")) == b"s5"
    assert _name_used(ord("E"), b"E\0\0\0\x09\0\0\0\0\0") == b""


def test_an_error_undoes_the_batch_newest_first():
    """Close x, then Parse x again, in a batch that fails before them: x keeps its first text."""
    sps = ServerStatements()
    ps = ClientStatements(10)
    old, new = statement(body("SELECT 'old'")), statement(body("SELECT 'new'"))
    ps.names[b"x"] = new  # the state after both were sent (optimistic)
    order = []

    def undo_close():
        order.append("close")
        ps.names.setdefault(b"x", old)

    def undo_parse():
        order.append("parse")
        if ps.names.get(b"x") is new:
            del ps.names[b"x"]
    sps.queue.extend([[TFWD, 1, None, None, None, 0],          # the message that fails
                      [SYNTH, 1, b"3", undo_close, None, 0],   # Close x
                      [THIDE, 1, None, undo_parse, None, 0],   # Parse x
                      [ZSKIP, 1, None, None, None, 0],         # Sync
                      [TFWD, 1, None, None, None, 0]])         # the next batch: untouched
    _fail_batch(sps)
    assert order == ["parse", "close"]
    assert ps.names[b"x"] is old
    assert [e[0] for e in sps.queue] == [ZSKIP, TFWD]
    assert not sps.dead


def test_an_error_with_no_sync_sent_marks_the_server_dead():
    sps = ServerStatements()
    sps.queue.append([TFWD, 2, None, None, None, 0])
    _fail_batch(sps)
    assert not sps.queue and sps.dead


def test_unsettled_names_block_later_batches_only():
    ps = ClientStatements(10)
    entry = [SYNTH, 1, b"1", None, (ps, b"x"), 0]
    ps.unsettled[b"x"] = entry
    assert not _blocked(ps, b"x")        # same batch: PostgreSQL would see it in order anyway
    ps.batch = 1
    assert _blocked(ps, b"x") and not _blocked(ps, b"y")
    from collections import deque
    queue = deque([entry])
    _pop(queue)
    assert not _blocked(ps, b"x") and not ps.unsettled
    ps.unsettled[ALL] = [ZSKIP, 1, None, None, (ps, ALL), 0]
    assert _blocked(ps, b"anything")     # an unsettled DEALLOCATE ALL holds every name


def test_client_limit_follows_max_prepared_statements():
    assert prepared.CLIENT_LIMIT_FACTOR * 200 >= 10_000
