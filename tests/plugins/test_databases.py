"""plugins/databases.py: [databases] and [users] parsing, the * fallback, forced users, through an in-process Relay."""

import logging
import os

import pytest

from pgrelay import ConfigError, Database, HostAddr, Listener, Login, Reject, Route
from pgrelay.relay import Relay


def make_relay(tmp_path, databases, users="", settings="", name="relay.ini"):
    """A Relay built from a pgbouncer.ini (config and plugins only: nothing is started)."""
    path = tmp_path / name
    text = "[databases]\n" + databases + "[pgbouncer]\nauth_type = trust\npool_mode = transaction\n" + settings
    if users:
        text += "[users]\n" + users
    path.write_text(text)
    return Relay(str(path), env={}), str(path)


def login(database, user="alice"):
    return Login(client_id=1, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user=user, database=database)


@pytest.fixture
def warnings_logged():
    """Messages of WARNING and above logged on the 'pgrelay' logger during the test."""
    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("pgrelay")
    logger.addHandler(handler)
    try:
        yield lambda: [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    finally:
        logger.removeHandler(handler)


def test_hosts_and_ports(tmp_path):
    relay, _ = make_relay(tmp_path, "three = host=h1,h2,h3 port=5001,5002,5003\n"
                                    "shared = host=a,b port=6000\n"
                                    "plain = host=db.example\n")
    assert relay.find_database("three").hosts == (HostAddr("h1", 5001), HostAddr("h2", 5002), HostAddr("h3", 5003))
    assert relay.find_database("shared").hosts == (HostAddr("a", 6000), HostAddr("b", 6000))
    assert relay.find_database("plain").hosts == (HostAddr("db.example", 5432),)
    route = relay.route_client(login("three"))
    assert route.hosts == (HostAddr("h1", 5001), HostAddr("h2", 5002), HostAddr("h3", 5003))


def test_port_count_mismatch(tmp_path):
    with pytest.raises(ConfigError) as exc:
        make_relay(tmp_path, "ok = host=a\nbad = host=a,b,c port=1,2\n")
    assert str(exc.value) == f"{tmp_path / 'relay.ini'}:3: 2 ports given for 3 hosts"
    with pytest.raises(ConfigError, match=r"relay\.ini:2: port: invalid integer$"):
        make_relay(tmp_path, "bad = host=a port=fivefour\n")


def test_unix_socket_directory_host(tmp_path):
    relay, _ = make_relay(tmp_path, "sock = host=/var/run/postgresql port=5433\nnohost = dbname=x\n")
    db = relay.find_database("sock")
    assert db.hosts == (HostAddr("/var/run/postgresql", 5433),)
    assert db.hosts[0].unix_path == "/var/run/postgresql/.s.PGSQL.5433"
    assert HostAddr("127.0.0.1", 5433).unix_path is None
    (default,) = relay.find_database("nohost").hosts
    expected_dir = "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"
    assert default == HostAddr(expected_dir, 5432)
    assert default.unix_path == f"{expected_dir}/.s.PGSQL.5432"


def test_dbname_defaults_to_entry_name(tmp_path):
    relay, _ = make_relay(tmp_path, "appdb = host=h\nalias = host=h dbname=realdb\n")
    assert relay.find_database("appdb").dbname == "appdb"
    assert relay.find_database("alias").dbname == "realdb"
    assert relay.find_database("alias").name == "alias"
    route = relay.route_client(login("alias"))
    assert (route.dbname, route.name, route.pool_key) == ("realdb", "alias/alice", ("local", "alias", "alice", None, "primary", "transaction"))


def test_star_fallback(tmp_path):
    relay, _ = make_relay(tmp_path, "named = host=h1 dbname=other\n* = host=h2 port=6543\n")
    db = relay.find_database("anything_at_all")
    assert db == Database(name="anything_at_all", hosts=(HostAddr("h2", 6543),), dbname="anything_at_all",
                          auto=True)  # made from *: autodb_idle_timeout frees its pools
    assert relay.find_database("named").dbname == "other"  # an explicit entry wins over *
    assert relay.find_database("named").auto is False
    route = relay.route_client(login("some_db", user="bob"))
    assert (route.dbname, route.server_user, route.hosts, route.pool_key) == (
        "some_db", "bob", (HostAddr("h2", 6543),), ("local", "some_db", "bob", None, "primary", "transaction"))
    assert relay.route_client(login("another")).dbname == "another"


def test_no_fallback_unknown_database(tmp_path):
    relay, _ = make_relay(tmp_path, "only = host=h\n")
    assert relay.find_database("other") is None
    assert relay.route_client(login("other")) == Reject("no such database: other", "3D000")


def test_forced_user_and_password(tmp_path):
    relay, _ = make_relay(tmp_path, "forced = host=h user=svc password='p w''s'\nfree = host=h\n")
    db = relay.find_database("forced")
    assert (db.user, db.password) == ("svc", "p w's")
    assert "p w" not in repr(db)
    route = relay.route_client(login("forced", user="alice"))
    assert (route.server_user, route.server_password, route.pool_key, route.name) == (
        "svc", "p w's", ("local", "forced", "svc", None, "primary", "transaction"), "forced/svc")
    # Every client of a forced-user database shares one pool.
    assert relay.route_client(login("forced", user="bob")).pool_key == ("local", "forced", "svc", None, "primary", "transaction")
    route = relay.route_client(login("free", user="bob"))
    assert (route.server_user, route.server_password) == ("bob", None)


def test_pool_size_and_mode_per_database(tmp_path):
    relay, _ = make_relay(tmp_path, "big = host=h pool_size=50 pool_mode=Session min_pool_size=3\nsmall = host=h\n",
                          settings="default_pool_size = 7\n")
    db = relay.find_database("big")
    assert (db.pool_size, db.pool_mode, db.min_pool_size) == (50, "session", 3)
    route = relay.route_client(login("big"))
    assert (route.pool_size, route.pool_mode, route.min_pool_size) == (50, "session", 3)
    route = relay.route_client(login("small"))
    # No pool_size on the line or the user: default_pool_size, read when the pool is sized (reloads apply).
    assert (route.pool_size, route.pool_mode, route.min_pool_size) == (None, "transaction", 0)
    assert relay.get_pool(route).size == 7


def test_server_params_and_connect_query(tmp_path):
    relay, _ = make_relay(tmp_path, "p = host=h client_encoding=LATIN1 datestyle='ISO, DMY' timezone=UTC "
                                    "application_name=app connect_query='SELECT 1'\n")
    route = relay.route_client(login("p"))
    assert route.server_params == (("client_encoding", "LATIN1"), ("DateStyle", "ISO, DMY"),
                                   ("TimeZone", "UTC"), ("application_name", "app"))
    assert route.connect_query == "SELECT 1"


def test_unknown_database_option(tmp_path):
    with pytest.raises(ConfigError) as exc:
        make_relay(tmp_path, "a = host=h\nb = hots=h\n")
    assert str(exc.value) == f"{tmp_path / 'relay.ini'}:3: unknown database option 'hots' in [databases] entry 'b'"


def test_bad_database_option_value(tmp_path):
    with pytest.raises(ConfigError) as exc:
        make_relay(tmp_path, "a = host=h pool_size=lots\n")
    assert str(exc.value) == f"{tmp_path / 'relay.ini'}:2: pool_size: invalid integer 'lots'"
    with pytest.raises(ConfigError, match=r"relay\.ini:2: pool_mode: invalid value 'sometimes'"):
        make_relay(tmp_path, "a = host=h pool_mode=sometimes\n")
    with pytest.raises(ConfigError, match=r"relay\.ini:2: unterminated quoted value for password"):
        make_relay(tmp_path, "a = host=h password='x\n")


def test_database_defined_twice(tmp_path):
    with pytest.raises(ConfigError, match=r"relay\.ini:3: database 'a' is defined twice"):
        make_relay(tmp_path, "a = host=h\na = host=i\n")


def test_planned_database_option_warns(tmp_path, warnings_logged):
    relay, path = make_relay(tmp_path, "a = host=h load_balance_hosts=disable pool_size=4\n")
    assert warnings_logged() == [
        f"{path}:2: database option 'load_balance_hosts' is not implemented by pgrelay yet and is ignored"]
    db = relay.find_database("a")
    assert (db.hosts, db.pool_size) == ((HostAddr("h", 5432),), 4)


def test_users_pool_mode(tmp_path):
    relay, _ = make_relay(tmp_path, "a = host=h\n", users="bob = pool_mode=session\ncarol = pool_size=3\n")
    assert relay.route_client(login("a", user="bob")).pool_mode == "session"
    assert relay.route_client(login("a", user="alice")).pool_mode == "transaction"
    route = relay.route_client(login("a", user="carol"))
    assert (route.pool_mode, route.pool_size) == ("transaction", 3)


def test_users_errors_and_planned(tmp_path, warnings_logged):
    with pytest.raises(ConfigError) as exc:
        make_relay(tmp_path, "a = host=h\n", users="bob = pool_mdoe=session\n")
    assert str(exc.value) == f"{tmp_path / 'relay.ini'}:7: unknown user option 'pool_mdoe' in [users] entry 'bob'"
    with pytest.raises(ConfigError, match=r"relay\.ini:7: pool_mode: invalid value 'always'"):
        make_relay(tmp_path, "a = host=h\n", users="bob = pool_mode=always\n")
    relay, path = make_relay(tmp_path, "a = host=h\n", users="bob = max_user_connections=2 pool_mode=statement\n")
    assert warnings_logged() == []  # every [users] key of PgBouncer 1.26 is implemented
    route = relay.route_client(login("a", user="bob"))
    assert route.pool_mode == "statement"
    assert [(limit.key, limit.maximum) for limit in route.server_limits] == [
        (("max_user_connections", "bob", "primary"), 2)]


def test_route_is_a_route(tmp_path):
    relay, _ = make_relay(tmp_path, "a = host=h\n")
    route = relay.route_client(login("a"))
    assert isinstance(route, Route)
    assert route == Route(pool_key=("local", "a", "alice", None, "primary", "transaction"), name="a/alice", hosts=(HostAddr("h", 5432),), dbname="a",
                          server_user="alice", server_password=None, pool_mode="transaction", pool_size=None,
                          min_pool_size=0, connect_query="", server_params=(), reuse=True)
