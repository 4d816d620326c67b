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
    for _ in range(3):
        c.acquire(1, [("pool", 3)])
    assert c.acquire(0, [("pool", 3)], shed=True) == "pool"
    assert told == [(1, {"op": "shed", "key": "pool"})]
    c.release(1, ["pool"])
    assert told[-1] == (0, {"op": "room", "key": "pool"})
    assert c.acquire(0, [("pool", 3)]) is None


def test_an_even_split_is_not_shed():
    """Two busy workers each asking for more must not trade servers back and forth: a holder is
    asked to shed only when it holds at least two more than the asking worker."""
    c, told = make()
    for worker in (0, 1, 0, 1):
        assert c.acquire(worker, [("pool", 4)]) is None
    assert c.acquire(0, [("pool", 4)], shed=True) == "pool"
    assert c.acquire(1, [("pool", 4)], shed=True) == "pool"
    c.acquire(1, [("pool", 5)])  # 2 against 3 (a reload raised the maximum)
    assert c.acquire(0, [("pool", 5)], shed=True) == "pool"
    assert told == [] and c.sheds == 0


def test_a_released_count_is_held_for_the_waiting_worker_not_taken_back():
    c, told = make()
    for _ in range(4):
        c.acquire(1, [("pool", 4)])
    assert c.acquire(0, [("pool", 4)], shed=True) == "pool"
    assert told == [(1, {"op": "shed", "key": "pool"})]
    c.release(1, ["pool"])  # worker 1 shed one, and its own clients still wait for a server
    assert c.acquire(1, [("pool", 4)], shed=True) == "pool", "the count is held for worker 0"
    assert told[-1] == (0, {"op": "room", "key": "pool"}) and len(told) == 2, "1 holds more: no shed for it"
    assert c.acquire(0, [("pool", 4)]) is None
    assert c.held[0]["pool"] == 1 and c.held[1]["pool"] == 3 and "pool" not in c.reserved


def test_a_held_count_lapses_if_the_waiting_worker_does_not_take_it():
    c, told = make()
    now = [100.0]
    c.clock = lambda: now[0]
    c.acquire(1, [("pool", 1)])
    assert c.acquire(0, [("pool", 1)], shed=True) == "pool"
    c.release(1, ["pool"])
    assert told[-1] == (0, {"op": "room", "key": "pool"})
    assert c.acquire(1, [("pool", 1)]) == "pool"
    now[0] += 1.5  # RESERVE_FOR passed: worker 0 no longer needs it
    assert c.acquire(1, [("pool", 1)]) is None


def test_room_goes_to_the_waiting_worker_holding_fewest():
    c, told = make()
    c.acquire(0, [("pool", 4)])
    for _ in range(3):
        c.acquire(2, [("pool", 4)])
    assert c.acquire(0, [("pool", 4)], shed=True) == "pool"
    assert c.acquire(1, [("pool", 4)], shed=True) == "pool"
    c.release(2, ["pool"])
    assert told[-1] == (1, {"op": "room", "key": "pool"}), "worker 1 holds none, worker 0 one"
    c.release(2, ["pool"])
    assert told[-1] == (0, {"op": "room", "key": "pool"})


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


def test_a_worker_that_stopped_asking_is_not_offered_room():
    """A refusal keeps a worker waiting for WAITING_FOR seconds; one that no longer asks (its
    clients left) is not offered a count that the releasing worker then could not take back."""
    c, told = make()
    now = [100.0]
    c.clock = lambda: now[0]
    c.acquire(1, [("pool", 1)])
    assert c.acquire(0, [("pool", 1)], shed=True) == "pool"
    now[0] += 2.5
    c.release(1, ["pool"])
    assert (0, {"op": "room", "key": "pool"}) not in told
    assert c.acquire(1, [("pool", 1)]) is None
    assert not c.waiting and not c.reserved
