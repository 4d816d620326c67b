"""Merging the workers' console answers: rows concatenated with a worker column, counts added up, settings kept."""

import datetime
from decimal import Decimal

import pytest

from pgrelay.admin.commands import AdminError, ResultSet
from pgrelay.workers import console

POOLS = [("database", "text"), ("user", "text"), ("cl_active", "int4"), ("maxwait", "int4"), ("pool_size", "int4"),
         ("avg_query_time", "int8")]


def answer(*results):
    return {"result": console.encode(list(results))}


def test_counts_add_up_per_identity_and_settings_do_not():
    a = answer(ResultSet(POOLS, [("db", "u", 3, 2, 20, 100), ("other", "u", 1, 0, 20, 10)]))
    b = answer(ResultSet(POOLS, [("db", "u", 4, 5, 20, 300)]))
    [merged] = console.merge("SHOW POOLS", [(0, a), (1, b)])
    rows = {row[0]: row for row in merged.rows}
    assert rows["db"] == ["db", "u", 7, 5, 20, 200]
    assert rows["other"] == ["other", "u", 1, 0, 20, 10]


def test_connection_lists_get_a_worker_column():
    columns = [("type", "text"), ("id", "int4")]
    a = answer(ResultSet(columns, [("C", 1), ("C", 3)]))
    b = answer(ResultSet(columns, [("C", 2)]))
    [merged] = console.merge("SHOW CLIENTS", [(0, a), (1, b)])
    assert merged.columns[-1] == ("worker", "int4")
    assert [list(r) for r in merged.rows] == [["C", 1, 0], ["C", 3, 0], ["C", 2, 1]]


def test_control_commands_succeed_if_one_worker_did():
    ok = answer("KILL_CLIENT")
    refused = {"error": {"message": "client not found", "sqlstate": "08P01"}}
    assert console.merge("KILL_CLIENT", [(0, refused), (1, ok)]) == ["KILL_CLIENT"]
    with pytest.raises(AdminError, match="client not found"):
        console.merge("KILL_CLIENT", [(0, refused), (1, refused)])


def test_values_survive_the_channel():
    stamp = datetime.datetime(2026, 12, 3, 11, 0, tzinfo=datetime.timezone.utc)
    columns = [("n", "numeric"), ("t", "timestamptz"), ("s", "text"), ("z", "int4")]
    [result] = console.decode(console.encode(ResultSet(columns, [(Decimal("1.5"), stamp, "x", None)])))
    assert list(result.rows[0]) == [Decimal("1.5"), stamp, "x", None]


def test_which_commands_are_gathered():
    assert console.gathered("SHOW POOLS") and console.gathered("PAUSE") and console.gathered("SHOW WORKERS")
    assert not console.gathered("SHOW CONFIG") and not console.gathered("SHOW HELP")
