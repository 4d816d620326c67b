"""workers = N: a server asked of the parent is not one of its pool's servers until granted; refused, paused or granted late."""

import logging
import types
import gevent
import pytest
from gevent import socket

from pgrelay import Listener, Login
from pgrelay.admin.show_pgrelay import show_workers
from pgrelay.relay import Relay
from pgrelay.workers.channel import Channel
from pgrelay.workers.link import WorkerLink

INI = """[databases]
app = host=127.0.0.1 port={port} dbname=app
[pgbouncer]
listen_port = 6432
auth_type = trust
default_pool_size = 3
min_pool_size = 3
"""


@pytest.fixture(autouse=True)
def propagate(monkeypatch):
    monkeypatch.setattr(logging.getLogger("pgrelay"), "propagate", True)


class Parent:
    """The test's side of the channel: it answers each acquire only when told to."""

    def __init__(self, sock):
        self.channel = Channel(sock)

    def next_message(self, op):
        with gevent.Timeout(5):
            while True:
                message = self.channel.receive()
                if message["op"] == op:
                    return message


@pytest.fixture
def setup(tmp_path):
    backend = socket.socket()  # stands for PostgreSQL: counts the connections the pool opens
    backend.bind(("127.0.0.1", 0))
    backend.listen(16)
    connects = []
    acceptor = gevent.spawn(lambda: [connects.append(backend.accept()[0]) for _ in iter(int, 1)])
    ini = tmp_path / "w.ini"
    ini.write_text(INI.format(port=backend.getsockname()[1]))
    relay = Relay(str(ini), env={})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    relay.worker = WorkerLink(1, 2, Channel(ours))
    relay.worker.start(relay)
    parent = Parent(theirs)
    assert parent.next_message("ready")
    login = Login(client_id=1, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                  user="alice", database="app")
    pool = relay.get_pool(relay.route_client(login))
    yield relay, parent, pool, connects
    relay.shutdown_requested = True
    acceptor.kill()
    parent.channel.close()
    backend.close()
    for sock in connects:
        sock.close()


def servers_shown(relay):
    (row,) = show_workers(types.SimpleNamespace(relay=relay), "").rows
    return row[4]


def answer(parent, refused=None):
    request = parent.next_message("acquire")
    parent.channel.send({"op": "reply", "id": request["id"], "refused": refused})
    return request


def settle(condition):
    with gevent.Timeout(5):
        while not condition():
            gevent.sleep(0.01)


def test_asked_servers_are_not_the_pools_until_granted(setup):
    relay, parent, pool, connects = setup
    pool.launch_if_needed()  # min_pool_size = 3: three servers asked of the parent
    pool.launch_if_needed()  # asked already: no more
    gevent.sleep(0.05)
    assert not pool.servers and servers_shown(relay) == 0
    assert pool.asking == 3
    assert not connects, "no connection before the parent grants one"

    request = answer(parent)
    assert request["shed"] is True and [key for key, _ in request["items"]] == pool.shared_keys()
    settle(lambda: len(connects) == 1)
    assert pool.asking == 2 and len(pool.servers) == 1 and servers_shown(relay) == 1
    (server,) = pool.servers
    assert server.shared == pool.shared_keys()


def test_a_refused_ask_leaves_no_server_and_caps_the_pool(setup):
    relay, parent, pool, connects = setup
    pool.launch_if_needed()
    for _ in range(3):
        answer(parent, refused=pool.shared_keys()[0])
    settle(lambda: pool.asking == 0)
    assert not pool.servers and servers_shown(relay) == 0 and pool.capped
    pool.launch_if_needed()  # capped: no new ask before RETRY_CAPPED or "room"
    gevent.sleep(0.05)
    assert pool.asking == 0
    gevent.sleep(0.05)
    assert not connects


def test_a_grant_for_a_pool_paused_meanwhile_is_given_back(setup):
    relay, parent, pool, connects = setup
    pool.launch_if_needed()
    gevent.sleep(0.05)
    pool.paused = True  # PAUSE or KILL while the parent was asked
    for _ in range(3):
        answer(parent)
    gevent.sleep(0.1)
    assert not connects and not pool.servers
    for _ in range(3):
        assert parent.next_message("release")["keys"] == pool.shared_keys()
    assert pool.asking == 0
