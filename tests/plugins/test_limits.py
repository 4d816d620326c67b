"""plugins/limits.py: max_client_conn counted over the relay's clients, as PgBouncer does."""


import pytest

from pgrelay import Listener, Login, Reject
from pgrelay.relay import Relay
from pgrelay_plugins import limits

MAX_CLIENT_CONN_REJECT = Reject("no more connections allowed (max_client_conn)", "53300")



def login(client_id=1):
    return Login(client_id=client_id, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user="alice", database="db")


def make_relay(tmp_path, extra=""):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\n* = host=h\n[pgbouncer]\nauth_type = trust\nmax_client_conn = 3\n" + extra)
    return Relay(str(path), env={})


def fill(relay, n):
    """Placeholder clients that have sent their StartupMessage: entries of relay.clients that went
    through the limit check (connections that have not sent one do not count)."""
    relay.clients.clear()
    relay.clients.update({i: object() for i in range(n)})
    for i in range(n):
        limits.pgrelay_check_client_limits(relay=relay, login=login(i))


@pytest.mark.parametrize("clients,decision", [
    (0, None), (1, None), (3, None),           # the client being checked is already counted
    (4, MAX_CLIENT_CONN_REJECT), (50, MAX_CLIENT_CONN_REJECT),
])
def test_max_client_conn(tmp_path, clients, decision):
    relay = make_relay(tmp_path)
    fill(relay, clients)
    assert relay.check_client_limits(login()) == decision
    assert limits.pgrelay_check_client_limits(relay=relay, login=login()) == decision


def test_limit_follows_reload(tmp_path):
    relay = make_relay(tmp_path)
    fill(relay, 4)
    assert relay.check_client_limits(login()) == MAX_CLIENT_CONN_REJECT
    (tmp_path / "relay.ini").write_text("[databases]\n* = host=h\n[pgbouncer]\nauth_type = trust\nmax_client_conn = 10\n")
    assert relay.reload() is True
    assert relay.config.max_client_conn == 10
    assert relay.check_client_limits(login()) is None


def test_disabled_limits_plugin_admits_everyone(tmp_path):
    relay = make_relay(tmp_path, "disable_plugins = limits\n")
    fill(relay, 100)
    assert relay.check_client_limits(login()) is None
