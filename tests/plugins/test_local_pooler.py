"""plugins/local_pooler.py: one pool per (database, user), pool_mode and pool_size precedence, unknown databases."""

import pytest

from pgrelay import Listener, Login, Reject, Route
from pgrelay.relay import Relay
from pgrelay_plugins import local_pooler

DATABASES = ("plain = host=h\n"
             "dbmode = host=h pool_mode=statement pool_size=11\n"
             "dbzero = host=h pool_size=0\n"
             "forced = host=h user=svc\n")
USERS = ("umode = pool_mode=session pool_size=5\n"
         "uzero = pool_size=0\n")


def login(database, user):
    return Login(client_id=7, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user=user, database=database)


@pytest.fixture(scope="module")
def relay(tmp_path_factory):
    path = tmp_path_factory.mktemp("local_pooler") / "relay.ini"
    path.write_text("[databases]\n" + DATABASES +
                    "[pgbouncer]\nauth_type = trust\npool_mode = transaction\ndefault_pool_size = 7\nmin_pool_size = 2\n"
                    "[users]\n" + USERS)
    return Relay(str(path), env={})


@pytest.mark.parametrize("database,user,mode,size", [
    ("plain", "someone", "transaction", 7),   # global pool_mode, default_pool_size
    ("dbmode", "someone", "statement", 11),   # database beats global
    ("plain", "umode", "session", 5),         # user beats global
    ("dbmode", "umode", "session", 5),        # the user beats the database, as in PgBouncer (pool_size too)
    ("dbzero", "someone", "transaction", 0),  # pool_size=0 (unlimited) on the database is a value, not "unset"
    ("plain", "uzero", "transaction", 0),     # ... and on the user
])
def test_precedence(relay, database, user, mode, size):
    for decide in (relay.route_client, lambda lg: local_pooler.pgrelay_route_client(relay=relay, login=lg)):
        route = decide(login(database, user))
        assert isinstance(route, Route)
        size_now = relay.config.default_pool_size if route.pool_size is None else route.pool_size
        assert (route.pool_mode, size_now) == (mode, size)
        assert route.min_pool_size == 2


def test_pool_per_database_and_user(relay):
    a = relay.route_client(login("plain", "alice"))
    b = relay.route_client(login("plain", "bob"))
    c = relay.route_client(login("dbmode", "alice"))
    assert len({a.pool_key, b.pool_key, c.pool_key}) == 3
    assert a.pool_key == ("local", "plain", "alice", None, "primary", a.pool_mode) and a.name == "plain/alice"
    assert relay.route_client(login("plain", "alice")) == a
    # A forced user makes one pool for all clients of the database.
    assert relay.route_client(login("forced", "alice")).pool_key == relay.route_client(login("forced", "bob")).pool_key
    assert a.reuse is True and a.dbname == "plain" and a.server_user == "alice"


def test_no_such_database(relay):
    for decide in (relay.route_client, lambda lg: local_pooler.pgrelay_route_client(relay=relay, login=lg)):
        decision = decide(login("x", "alice"))
        assert decision == Reject("no such database: x", "3D000")
        assert decision.severity == "FATAL"
        assert decision.encode() == (b"E\x00\x00\x00\x2fSFATAL\x00VFATAL\x00C3D000\x00Mno such database: x\x00\x00")


def test_is_a_trylast_default():
    impl = local_pooler.pgrelay_route_client.pgrelay_impl
    assert impl["trylast"] is True
