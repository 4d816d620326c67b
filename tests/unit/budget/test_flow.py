"""The maximum flow the budget rests on, against brute force: pools between database caps and user caps."""

from __future__ import annotations

import itertools
import random

import pytest

from pgrelay.budget.flow import INF, Network


def brute_force(pools, db_caps, user_caps) -> int:
    """The most connections pools (db, user, size) can hold with every cap respected, by trying all."""
    best = 0
    for counts in itertools.product(*(range(size + 1) for _, _, size in pools)):
        per_db, per_user = {}, {}
        for (db, user, _), count in zip(pools, counts, strict=True):
            per_db[db] = per_db.get(db, 0) + count
            per_user[user] = per_user.get(user, 0) + count
        if all(per_db[d] <= db_caps[d] for d in per_db) and all(per_user[u] <= user_caps[u] for u in per_user):
            best = max(best, sum(counts))
    return best


def network(pools, db_caps, user_caps) -> Network:
    net = Network()
    for db, cap in db_caps.items():
        net.add("S", ("db", db), cap, ("db", db))
    for user, cap in user_caps.items():
        net.add(("user", user), "T", cap, ("user", user))
    for i, (db, user, size) in enumerate(pools):
        net.add(("db", db), ("user", user), size, ("pool", i))
    return net


@pytest.mark.parametrize("seed", range(60))
def test_max_flow_is_the_most_the_caps_allow(seed):
    rng = random.Random(seed)
    dbs, users = rng.sample(["a", "b", "c"], rng.randint(1, 3)), rng.sample(["x", "y", "z"], rng.randint(1, 3))
    pairs = rng.sample([(d, u) for d in dbs for u in users], rng.randint(1, min(5, len(dbs) * len(users))))
    pools = [(d, u, rng.randint(0, 4)) for d, u in pairs]
    db_caps = {d: rng.randint(0, 6) for d in dbs}
    user_caps = {u: rng.randint(0, 6) for u in users}
    net = network(pools, db_caps, user_caps)
    assert net.max_flow("S", "T") == brute_force(pools, db_caps, user_caps)


def test_the_cut_names_the_limits_that_bind():
    # Database a (cap 4) feeds two pools of 3; user y (cap 1) also has a pool of database b (no cap).
    net = network([("a", "x", 3), ("a", "y", 3), ("b", "y", 5)], {"a": 4, "b": INF}, {"x": INF, "y": 1})
    assert net.max_flow("S", "T") == 4  # a/x 3 and one for y: pool a/x and user y bind, not database a
    assert sorted(net.cut()) == [("pool", 0), ("user", "y")]
    net = network([("a", "x", 3), ("a", "y", 3), ("b", "y", 5)], {"a": 4, "b": INF}, {"x": INF, "y": 2})
    assert net.max_flow("S", "T") == 5
    assert sorted(net.cut()) == [("pool", 0), ("user", "y")]
    net = network([("a", "x", 3), ("a", "y", 3)], {"a": 4}, {"x": INF, "y": INF})
    assert net.max_flow("S", "T") == 4
    assert net.cut() == [("db", "a")]
    # Without caps the pools themselves bind.
    net = network([("a", "x", 3), ("b", "y", 5)], {"a": INF, "b": INF}, {"x": INF, "y": INF})
    assert net.max_flow("S", "T") == 8
    assert sorted(net.cut()) == [("pool", 0), ("pool", 1)]


def test_an_unlimited_path_is_infinite_and_a_finite_edge_on_it_is_not():
    net = network([("a", "x", INF)], {"a": INF}, {"x": INF})
    assert net.max_flow("S", "T") == INF
    assert net.cut() == []
    net = network([("a", "x", INF), ("a", "y", INF)], {"a": INF}, {"x": 7, "y": 2})
    assert net.max_flow("S", "T") == 9
    assert sorted(net.cut()) == [("user", "x"), ("user", "y")]


def test_negative_capacity_is_refused():
    with pytest.raises(ValueError):
        Network().add("S", "T", -1)
