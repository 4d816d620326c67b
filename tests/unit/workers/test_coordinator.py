"""The workers' coordinator: all-or-nothing grants, releases, room and shed messages, a dead worker's share given back."""

from pgrelay.workers.coordinator import Coordinator


def make():
    told = []
    return Coordinator(lambda worker, message: told.append((worker, message))), told


def test_grants_stop_at_the_maximum_whichever_worker_asks():
    c, _ = make()
    assert c.acquire(0, [("pool", 3)]) is None
    assert c.acquire(1, [("pool", 3)]) is None
    assert c.acquire(1, [("pool", 3)]) is None
    assert c.acquire(0, [("pool", 3)]) == "pool"
    assert c.counts["pool"] == 3


def test_a_grant_is_all_or_nothing():
    c, _ = make()
    assert c.acquire(0, [("db", 1)]) is None
    assert c.acquire(1, [("pool", 5), ("db", 1)]) == "db"
    assert c.counts["pool"] == 0, "the pool key is not counted when the group refuses"


def test_zero_means_no_limit():
    c, _ = make()
    for _ in range(100):
        assert c.acquire(0, [("k", 0)]) is None


def test_refused_with_shed_asks_the_largest_holder_and_room_follows_a_release():
    c, told = make()
    c.acquire(0, [("pool", 3)])
    c.acquire(1, [("pool", 3)])
    c.acquire(1, [("pool", 3)])
    assert c.acquire(0, [("pool", 3)], shed=True) == "pool"
    assert told == [(1, {"op": "shed", "key": "pool"})]
    c.release(1, ["pool"])
    assert told[-1] == (0, {"op": "room", "key": "pool"})
    assert c.acquire(0, [("pool", 3)]) is None


def test_release_of_what_was_never_granted_changes_nothing():
    c, _ = make()
    c.acquire(0, [("pool", 2)])
    c.release(1, ["pool"])
    c.release(0, ["other"])
    assert c.counts["pool"] == 1


def test_a_dead_workers_share_is_given_back():
    c, told = make()
    c.acquire(0, [("pool", 2), ("clients", 10)])
    c.acquire(1, [("pool", 2)])
    assert c.acquire(1, [("pool", 2)], shed=True) == "pool"
    c.worker_gone(0)
    assert c.counts["pool"] == 1 and "clients" not in c.counts
    assert (1, {"op": "room", "key": "pool"}) in told
    assert c.acquire(1, [("pool", 2)]) is None
