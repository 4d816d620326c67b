"""Comments in pgbouncer.ini are read as PgBouncer's parser (libusual cfparser.c) reads them: a line
starting with ; or # is a comment, a value runs to the end of its line in every section, and what
follows a [section] header is read as a line of its own."""

from __future__ import annotations

import pytest

from pgrelay.config import INLINE_COMMENT_HINT, read_ini
from pgrelay.errors import ConfigError
from pgrelay.relay import Relay


def load(tmp_path, text: str) -> Relay:
    path = tmp_path / "c.ini"
    path.write_text(text)
    return Relay(str(path), env={})


def pairs(ini, section):
    return [(e.key, e.value) for e in ini.sections[section]]


def test_a_comment_may_follow_a_section_header():
    ini = read_ini("[databases]   ; the databases\n"
                   "app = host=h\n"
                   "[pgbouncer]# main section\n"
                   "listen_port = 1\n", "f.ini")
    assert pairs(ini, "databases") == [("app", "host=h")]
    assert pairs(ini, "pgbouncer") == [("listen_port", "1")]


def test_what_follows_a_header_is_a_line_of_its_own():
    # PgBouncer reads "[users] u = x" as the header and then the line "u = x".
    ini = read_ini("[users] u = pool_mode=session\n", "f.ini")
    assert pairs(ini, "users") == [("u", "pool_mode=session")]
    with pytest.raises(ConfigError, match=r"^f\.ini:1: syntax error, expected 'key = value': 'junk'$"):
        read_ini("[users] junk\n", "f.ini")
    with pytest.raises(ConfigError, match=r"^f\.ini:2: syntax error, expected '\[section\]': '\[users'$"):
        read_ini("[pgbouncer]\n[users\n", "f.ini")


def test_values_run_to_the_end_of_the_line():
    ini = read_ini("[pgbouncer]\n"
                   "auth_user = pgrelay_auth    ; optional\n"
                   "logfile = /var/log/x.log # rotated daily\n", "f.ini")
    assert pairs(ini, "pgbouncer") == [("auth_user", "pgrelay_auth    ; optional"),
                                       ("logfile", "/var/log/x.log # rotated daily")]


@pytest.mark.parametrize("line,message", [
    ("pool_mode = session ; for reports",
     "c.ini:2: pool_mode: invalid value 'session ; for reports': expected one of session, transaction, statement"),
    ("listen_port = 6432   # main port", "c.ini:2: listen_port: "),
])
def test_a_comment_after_a_setting_is_part_of_its_value(tmp_path, line, message):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[pgbouncer]\n{line}\nauth_type = trust\n")
    assert str(info.value).startswith(str(tmp_path / message)), str(info.value)
    assert str(info.value).endswith(f"; {INLINE_COMMENT_HINT}")


def test_a_comment_after_a_text_setting_is_kept_and_warned_about(tmp_path):
    relay = load(tmp_path, "[pgbouncer]\nauth_type = trust\nauth_user = pgrelay_auth    ; optional\n")
    assert relay.config.auth_user == "pgrelay_auth    ; optional"  # as PgBouncer would have it
    assert relay.config.warnings == (
        f"{tmp_path / 'c.ini'}:3: the value of 'auth_user' includes what looks like a comment: {INLINE_COMMENT_HINT}",)
    plain = load(tmp_path, "[pgbouncer]\nauth_type = trust\nauth_user = pgrelay_auth\n")
    assert plain.config.warnings == ()


@pytest.mark.parametrize("section,line", [
    ("databases", "app = host=127.0.0.1 port=5432   ; the main database"),
    ("listeners", "direct = port=7001 role=direct  # admin port"),
    ("poolers", "reports = target=replica ;read-only work"),
    ("users", "batch = pool_mode=session # nightly jobs"),
])
def test_a_comment_after_options_is_refused_in_every_section(tmp_path, section, line):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, f"[pgbouncer]\nauth_type = trust\n[{section}]\n{line}\n")
    comment = line[line.index(" ;" if " ;" in line else " #") + 1:]
    assert str(info.value) == f"{tmp_path / 'c.ini'}:4: expected key=value in {comment[:40]!r}; {INLINE_COMMENT_HINT}"


def test_semicolons_and_hashes_inside_values_are_not_comments(tmp_path):
    relay = load(tmp_path, "[pgbouncer]\nauth_type = trust\n"
                           "[databases]\napp = host=127.0.0.1 password=a;b#c connect_query='SELECT 1; SELECT 2'\n")
    assert relay.config.warnings == ()
    db = relay.find_database("app", None)
    assert (db.password, db.connect_query) == ("a;b#c", "SELECT 1; SELECT 2")
