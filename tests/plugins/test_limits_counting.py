"""plugins/limits.py: only clients past their StartupMessage count against max_client_conn (issue 7, item 6)."""

from types import SimpleNamespace

from pgrelay import Listener, Login, Reject
from pgrelay.relay import Relay
from pgrelay_plugins import limits

REFUSED = Reject("no more connections allowed (max_client_conn)", "53300")


def login(client_id):
    return Login(client_id=client_id, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user="alice", database="db")


def make_relay(tmp_path):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\n* = host=h\n[pgbouncer]\nauth_type = trust\nmax_client_conn = 3\n")
    return Relay(str(path), env={})


def arrive(relay, client_id):
    """A client connects (relay.clients) and sends its StartupMessage (the limit check runs)."""
    relay.clients[client_id] = SimpleNamespace(id=client_id)
    return relay.check_client_limits(login(client_id))


def leave(relay, client_id, notified=True):
    client = relay.clients.pop(client_id)
    if notified:
        limits.pgrelay_client_disconnected(relay=relay, client=client, reason="client close request")


def test_connections_without_a_startup_message_do_not_count(tmp_path):
    relay = make_relay(tmp_path)
    relay.clients.update({i: SimpleNamespace(id=i) for i in range(100)})  # accepted, silent
    assert [arrive(relay, i) for i in (1000, 1001, 1002)] == [None, None, None]
    assert arrive(relay, 1003) == REFUSED


def test_a_client_that_left_frees_its_slot(tmp_path):
    relay = make_relay(tmp_path)
    for i in range(3):
        assert arrive(relay, i) is None
    assert arrive(relay, 3) == REFUSED
    leave(relay, 3)
    leave(relay, 0)
    assert arrive(relay, 4) is None
    assert arrive(relay, 5) == REFUSED
    leave(relay, 5)
    # A departure whose notification has not run yet is not counted either.
    leave(relay, 1, notified=False)
    assert arrive(relay, 6) is None
    assert arrive(relay, 7) == REFUSED
    assert limits.counted(relay) - {7} == {2, 4, 6}


def test_counting_survives_a_reload(tmp_path):
    relay = make_relay(tmp_path)
    for i in range(3):
        assert arrive(relay, i) is None
    assert relay.reload() is True
    assert arrive(relay, 3) == REFUSED
