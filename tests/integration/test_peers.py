"""Peering ([peers], peer_id): a CancelRequest reaching any peer cancels the right query on the peer that owns it."""
from __future__ import annotations

import os
import random
import socket
import struct

import pytest

from pgrelay.config import ConfigError
from pgrelay.peers import owner
from pgrelay.relay import Relay

from ..support import RawClient, data_rows, free_port, query_message, query_running, wait_until

# 1,000 for the figure in the issue note: PGRELAY_TEST_CANCELS=1000 pytest tests/integration/test_peers.py
CANCELS = int(os.environ.get("PGRELAY_TEST_CANCELS", "100"))


def peered(make_relay, mode: str = "transaction", loop: bool = False, workers: int = 1):
    """Two pgrelay processes, peer_id 1 and 2, with one shared [peers] list (each ignores its own line).
    With `loop`, relay 1's entry for peer 2 points back at relay 1 itself: a misconfigured ring.
    With `workers`, each is that many worker processes (pgrelay.workers)."""
    ports = free_port(), free_port()
    relays = []
    for peer_id, port in ((1, ports[0]), (2, ports[1])):
        to_2 = ports[0] if loop and peer_id == 1 else ports[1]
        peers = {"1": f"host=127.0.0.1 port={ports[0]}", "2": f"host=127.0.0.1 port={to_2} pool_size=4"}
        relays.append(make_relay({"listen_port": str(port), "peer_id": str(peer_id), "pool_mode": mode,
                                  "admin_users": "postgres", "workers": str(workers)},
                                 extra_sections="[peers]\n" + "".join(f"{k} = {v}\n" for k, v in peers.items())))
    return relays


def login(relay) -> tuple[RawClient, bytes]:
    client = RawClient(relay.port, timeout=15)
    key = next(body for kind, body in client.login() if kind == b"K")
    return client, key


def cancel(relay, key: bytes) -> None:
    """Send a CancelRequest to `relay` and wait for it to close the cancel connection (delivered)."""
    with socket.create_connection(("127.0.0.1", relay.port), timeout=15) as sock:
        sock.sendall(struct.pack("!II", 8 + len(key), 80877102) + key)
        while sock.recv(100):
            pass


def answer(client: RawClient) -> str:
    """'cancelled' (57014) or the row the query returned."""
    msgs = client.read_until(b"Z")
    errors = [body for kind, body in msgs if kind == b"E"]
    if errors:
        assert b"C57014\0" in errors[0], errors[0]
        return "cancelled"
    return data_rows(msgs)[0][0]


@pytest.mark.parametrize("mode", ["transaction", "session"])
def test_cancel_through_the_other_peer_cancels_that_query_only(make_relay, mode):
    a, b = peered(make_relay, mode)
    victim, key = login(a)
    bystander, _ = login(a)
    assert owner(key) == (1, 3)  # peer id 1, full TTL, in bytes 1-2 of the pid
    assert owner(login(b)[1])[0] == 2
    victim.send(query_message("select pg_sleep(30)"))
    bystander.send(query_message("select 'done' from pg_sleep(1.5)"))
    wait_until(lambda: query_running(a.pg, "pg_sleep(30)"), message="the victim's query to run")
    cancel(b, key)  # reaches peer 2, which forwards it to peer 1
    assert answer(victim) == "cancelled"
    assert answer(bystander) == "done"
    assert victim.query("select 'next'")[-1][0] == b"Z"
    rows = _show(b, "SHOW PEER_POOLS")
    assert rows == [["1", "0", "0", "0", "0"]], rows
    assert _show(a, "SHOW PEERS") == [["2", "127.0.0.1", str(b.port), "4"]]


def test_many_cancels_spread_over_two_peers_each_cancel_its_own_query(make_relay):
    """CANCELS cancels of queries on both peers, each sent to a random peer while a query of another
    client runs on each peer: every cancel stops its own query and no other. Each peer runs two
    workers, so a cancel may also reach the wrong worker of the right peer (or of the wrong one)."""
    a, b = peered(make_relay, workers=2)
    relays = (a, b)
    clients = {relay.port: _on_both_workers(relay) for relay in relays}
    owners = {(owner(key)[0], key[3]) for relay in relays for _, key in clients[relay.port]}
    assert owners == {(1, 0), (1, 1), (2, 0), (2, 1)}, f"clients on every worker of both peers: {owners}"
    rng = random.Random(7)
    seen = set()
    for i in range(CANCELS):
        home = rng.choice(relays)
        (victim, key), (bystander, _) = rng.sample(clients[home.port], 2)
        seen.add((owner(key)[0], key[3]))
        other, _ = rng.choice(clients[(b if home is a else a).port])
        victim.send(query_message(f"select pg_sleep(30) /* {i} */"))
        bystander.send(query_message("select 'b' from pg_sleep(0.2)"))
        other.send(query_message("select 'o' from pg_sleep(0.2)"))
        wait_until(lambda: query_running(home.pg, f"/* {i} */"), message=f"query {i} to run")
        cancel(rng.choice(relays), key)
        assert answer(victim) == "cancelled", i
        assert answer(bystander) == "b", i
        assert answer(other) == "o", i
    assert seen == owners, "victims on every worker of both peers"


def _on_both_workers(relay, each: int = 3) -> list:
    """Clients of `relay` (two workers) until each worker has `each` (the kernel picks the worker;
    key byte 3 says which); the surplus is closed."""
    kept, by_worker = [], {0: 0, 1: 0}
    for _ in range(60):
        client, key = login(relay)
        if by_worker[key[3]] < each:
            by_worker[key[3]] += 1
            kept.append((client, key))
        else:
            client.close()
        if min(by_worker.values()) >= each:
            return kept
    raise AssertionError(f"the kernel gave 60 logins to one worker: {by_worker}")


def test_unknown_peer_is_dropped_and_a_loop_ends_after_three_forwards(make_relay):
    a, b = peered(make_relay, loop=True)
    victim, key = login(b)  # peer 2's client; relay 1 believes peer 2 lives at its own address
    victim.send(query_message("select 'survived' from pg_sleep(2)"))
    stranger = bytes((key[0],)) + struct.pack("!H", (9 << 2) | 3) + key[3:]
    cancel(a, stranger)
    cancel(a, key)  # forwarded by relay 1 to itself, TTL 3, 2, 1, 0: then dropped
    assert answer(victim) == "survived"
    wait_until(lambda: "forwarded too often" in a.log(), message="the loop to be cut")
    assert "cancel request for unknown peer_id 9 dropped" in a.log()


def test_without_peer_id_peers_are_empty(make_relay):
    relay = make_relay({"admin_users": "postgres"})
    assert _show(relay, "SHOW PEERS") == []
    assert _show(relay, "SHOW PEER_POOLS") == []


@pytest.mark.parametrize("lines, error", [
    ({"x": "host=a"}, "[peers] key 'x' is not a peer_id (1 to 16383)"),
    ({"16384": "host=a"}, "peer_id 16384 is out of range (1 to 16383)"),
    ({"3": "port=6432"}, "[peers] entry 3 has no host"),
    ({"3": "host=a colour=red"}, "unknown option 'colour' in [peers] entry '3'"),
    ({"3": "host=a port=0"}, "port: 0 is below the minimum 1"),
])
def test_bad_peers_lines_name_the_line(tmp_path, lines, error):
    path = tmp_path / "p.ini"
    body = "".join(f"{k} = {v}\n" for k, v in lines.items())
    path.write_text(f"[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 1\npeer_id = 1\n[peers]\n{body}")
    with pytest.raises(ConfigError) as raised:
        Relay(str(path), env={})
    assert error in str(raised.value)
    assert f"{path}:7" in str(raised.value)


def test_peer_id_above_16383_is_refused(tmp_path):
    path = tmp_path / "p.ini"
    path.write_text("[databases]\n* = host=127.0.0.1\n[pgbouncer]\nlisten_port = 1\npeer_id = 16384\n")
    with pytest.raises(ConfigError, match="16384 is above the maximum 16383"):
        Relay(str(path), env={})


def _show(relay, command: str) -> list[list[str | None]]:
    admin = RawClient(relay.port)
    admin.login(database="pgbouncer")
    rows = data_rows(admin.query(command))
    admin.close()
    return rows
