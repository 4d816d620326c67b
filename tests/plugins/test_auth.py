"""plugins/auth.py: userlist.txt parsing, auth_type, and trust with auth_file requiring a listed user."""

import logging

import pytest

from pgrelay import ConfigError, Listener, Login, Reject
from pgrelay.relay import Relay
from pgrelay_plugins.auth import parse_auth_file

SCRAM = ("SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$"
         "0J0nSlbWm3kvbXplwk0Mj2jTDn6ZyHrr9i1HIQbMAjs=:LELSxnJ7IWZ2GphSuXXJ0LeoCxq7CJO/hNX0TfkBw1A=")



def login(user):
    return Login(client_id=1, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user=user, database="db")


def make_relay(tmp_path, settings):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\n* = host=h\n[pgbouncer]\n" + settings)
    return Relay(str(path), env={})


def test_parse_auth_file(tmp_path):
    path = tmp_path / "userlist.txt"
    path.write_text('; PgBouncer comment\n'
                    '# hash comment\n'
                    '\n'
                    '"alice" "plain secret"\n'
                    '   "bob"   "md5' + "0" * 32 + '"   \n'
                    '"o""brien" "pa""ss"\n'
                    '"scram" "' + SCRAM + '"\n'
                    '"empty" ""\n'
                    '"extra" "pw" "ignored field"\n'
                    '\t\n')
    assert parse_auth_file(str(path)) == {
        "alice": "plain secret",
        "bob": "md5" + "0" * 32,
        'o"brien': 'pa"ss',
        "scram": SCRAM,
        "empty": "",
        "extra": "pw",
    }


@pytest.mark.parametrize("line", [
    'alice "pw"',          # unquoted user
    '"alice" pw',          # unquoted password
    '"alice"',             # no password
    '"alice" "pw',         # unterminated quote
    '"alice" "pw"x',       # text glued to a closing quote
    '"alice""pw"',         # one field with a doubled quote, no password
])
def test_parse_auth_file_malformed_line(tmp_path, line):
    path = tmp_path / "userlist.txt"
    path.write_text('"ok" "fine"\n; comment\n' + line + '\n"later" "x"\n')
    with pytest.raises(ConfigError) as exc:
        parse_auth_file(str(path))
    assert str(exc.value) == f'{path}:3: expected "user" "password"'


def test_parse_auth_file_missing(tmp_path):
    with pytest.raises(ConfigError, match=f"cannot read auth_file {tmp_path}/none.txt: No such file or directory"):
        parse_auth_file(str(tmp_path / "none.txt"))


def test_malformed_auth_file_refuses_config(tmp_path):
    (tmp_path / "userlist.txt").write_text('"alice" pw\n')
    with pytest.raises(ConfigError, match=r"userlist\.txt:1: expected"):
        make_relay(tmp_path, f"auth_type = trust\nauth_file = {tmp_path / 'userlist.txt'}\n")


def test_trust_without_auth_file_admits_anyone(tmp_path):
    relay = make_relay(tmp_path, "auth_type = trust\n")
    assert relay.choose_auth_method(login("anyone")) == "trust"
    assert relay.get_credentials(login("anyone"), "anyone") is None


def test_trust_with_auth_file_requires_listed_user(tmp_path):
    (tmp_path / "userlist.txt").write_text('"alice" "pw"\n"o""brien" ""\n')
    relay = make_relay(tmp_path, f"auth_type = trust\nauth_file = {tmp_path / 'userlist.txt'}\n")
    assert relay.choose_auth_method(login("alice")) == "trust"
    assert relay.choose_auth_method(login('o"brien')) == "trust"
    assert relay.choose_auth_method(login("mallory")) == Reject(
        'password authentication failed for user "mallory"', "28P01")
    assert relay.choose_auth_method(login("Alice")) == Reject(
        'password authentication failed for user "Alice"', "28P01")


def test_trust_with_missing_auth_file(tmp_path):
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("pgrelay").addHandler(handler)
    try:
        relay = make_relay(tmp_path, f"auth_type = trust\nauth_file = {tmp_path / 'gone.txt'}\n")
    finally:
        logging.getLogger("pgrelay").removeHandler(handler)
    assert [r.getMessage() for r in records] == [f"auth_file {tmp_path / 'gone.txt'} does not exist"]
    assert relay.choose_auth_method(login("alice")) == Reject(
        'password authentication failed for user "alice"', "28P01")


@pytest.mark.parametrize("auth_type", ["md5", "scram-sha-256", "plain", "any"])
def test_auth_type_chosen_for_everyone(tmp_path, auth_type):
    (tmp_path / "userlist.txt").write_text('"alice" "pw"\n')
    relay = make_relay(tmp_path, f"auth_type = {auth_type}\nauth_file = {tmp_path / 'userlist.txt'}\n")
    assert relay.choose_auth_method(login("alice")) == auth_type
    assert relay.choose_auth_method(login("stranger")) == auth_type


def test_credentials_from_auth_file(tmp_path):
    (tmp_path / "userlist.txt").write_text(f'"alice" "pw"\n"svc" "{SCRAM}"\n')
    relay = make_relay(tmp_path, f"auth_type = md5\nauth_file = {tmp_path / 'userlist.txt'}\n")
    assert relay.get_credentials(login("alice"), "alice") == "pw"
    assert relay.get_credentials(None, "svc") == SCRAM
    assert relay.get_credentials(login("alice"), "nobody") is None


def test_auth_file_reread_on_reload(tmp_path):
    userlist = tmp_path / "userlist.txt"
    userlist.write_text('"alice" "pw"\n')
    relay = make_relay(tmp_path, f"auth_type = trust\nauth_file = {userlist}\n")
    assert relay.choose_auth_method(login("bob")) != "trust"
    userlist.write_text('"alice" "pw"\n"bob" "pw2"\n')
    assert relay.reload() is True
    assert relay.choose_auth_method(login("bob")) == "trust"
    assert relay.get_credentials(None, "bob") == "pw2"
    # A broken file on reload keeps the old configuration.
    userlist.write_text('"alice" "pw"\nbob pw3\n')
    assert relay.reload() is False
    assert relay.get_credentials(None, "bob") == "pw2"
