"""plugins/errors.py: faults translated to what the client is told, without leaking internals."""

import logging
import textwrap

import pytest

from pgrelay import Reject
from pgrelay.errors import (
    ClientGone, ConfigError, LoginTimeout, PgRelayError, ProtocolViolation, RejectError, ServerError,
)
from pgrelay.relay import Relay
from pgrelay_plugins import errors as errors_plugin

SECRET = "password=hunter2 at /srv/secret/path.py line 42"


def make_relay(tmp_path, extra=""):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\n* = host=h\n[pgbouncer]\nauth_type = trust\n" + extra)
    return Relay(str(path), env={})


CASES = [
    (RejectError(Reject("too many", "53300", detail="d")), Reject("too many", "53300", detail="d")),
    (ProtocolViolation("invalid message type 'x'"), Reject("invalid message type 'x'", "08P01")),
    (ConfigError("f.ini:3: bad"), Reject("f.ini:3: bad", "F0000")),
    (ServerError("server login failed"), Reject("server login failed", "08006")),
    (ServerError("ignored", {"S": "FATAL", "C": "28P01", "M": "password authentication failed for user \"x\"",
                             "H": "hint"}),
     Reject('password authentication failed for user "x"', "28P01", "FATAL", None, "hint")),
    (ServerError("ignored", {"S": "NOTICE", "M": "odd"}), Reject("odd", "XX000", "FATAL")),
    (LoginTimeout("client_login_timeout"), Reject("client_login_timeout", "08P01")),
    (ClientGone("client closed"), Reject("client closed", "08P01")),
    (PgRelayError("generic"), Reject("generic", "08P01")),
]
CASE_IDS = ["reject", "protocol", "config", "server", "server-fields", "server-notice", "timeout", "gone", "base"]


@pytest.mark.parametrize("error,expected", CASES, ids=CASE_IDS)
def test_plugin_maps_pgrelay_errors(error, expected):
    for phase in ("login", "relay"):
        assert errors_plugin.pgrelay_translate_error(relay=None, error=error, phase=phase, client=None) == expected


@pytest.mark.parametrize("error", [ValueError(SECRET), KeyError(SECRET), RuntimeError(SECRET), OSError(5, SECRET),
                                   ZeroDivisionError(SECRET)], ids=lambda e: type(e).__name__)
def test_other_exceptions_are_internal_error_without_text(tmp_path, error):
    relay = make_relay(tmp_path)
    for decision in (errors_plugin.pgrelay_translate_error(relay=relay, error=error, phase="relay", client=None),
                     relay.translate_error(error, "login", None)):
        assert decision == Reject("internal error", "XX000")
        assert decision.detail is None and decision.hint is None
        wire = decision.encode()
        assert b"hunter2" not in wire and b"secret" not in wire and type(error).__name__.encode() not in wire


@pytest.mark.parametrize("error,expected", CASES, ids=CASE_IDS)
def test_relay_translate_error(tmp_path, error, expected):
    relay = make_relay(tmp_path)
    assert relay.translate_error(error, "relay", None) == expected


def test_core_fallback_without_plugin(tmp_path):
    relay = make_relay(tmp_path, "disable_plugins = errors\n")
    assert relay.pm.get_plugin("errors") is None
    for error, expected in CASES:
        assert relay.translate_error(error, "login", None) == expected
    assert relay.translate_error(ValueError(SECRET), "relay", None) == Reject("internal error", "XX000")


def test_failing_translate_plugin_falls_back(tmp_path):
    plugin = tmp_path / "broken_errors.py"
    plugin.write_text("from pgrelay import hookimpl\n\n"
                      "@hookimpl\ndef pgrelay_translate_error(relay, error, phase, client):\n"
                      "    raise RuntimeError('plugin bug')\n")
    relay = make_relay(tmp_path, f"plugins = {plugin}\n")
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("pgrelay").addHandler(handler)
    try:
        assert relay.translate_error(ValueError(SECRET), "relay", None) == Reject("internal error", "XX000")
        assert relay.translate_error(ProtocolViolation("bad"), "relay", None) == Reject("bad", "08P01")
    finally:
        logging.getLogger("pgrelay").removeHandler(handler)
    assert [r.getMessage() for r in records] == ["pgrelay_translate_error failed"] * 2
    assert all(r.exc_info and str(r.exc_info[1]) == "plugin bug" for r in records)


def test_third_party_translation_wins(tmp_path):
    plugin = tmp_path / "friendly_errors.py"
    plugin.write_text("from pgrelay import hookimpl, Reject\n\n"
                      "@hookimpl\ndef pgrelay_translate_error(relay, error, phase, client):\n"
                      "    if isinstance(error, ValueError):\n"
                      "        return Reject('try again later', '57P03')\n")
    relay = make_relay(tmp_path, f"plugins = {plugin}\n")
    assert relay.translate_error(ValueError(SECRET), "relay", None) == Reject("try again later", "57P03")
    assert relay.translate_error(ProtocolViolation("bad"), "relay", None) == Reject("bad", "08P01")
    # A RejectError is the core's own decision: plugins are not asked.
    assert relay.translate_error(RejectError(Reject("no", "28000")), "login", None) == Reject("no", "28000")


# -- pgrelay's own refusals: the message table ---------------------------------------------------

def test_every_refusal_in_the_table_has_the_sqlstate_issue_8_asks_for():
    from ..support import POOLER_SQLSTATE
    for message, sqlstate in POOLER_SQLSTATE.items():
        assert errors_plugin.MESSAGES[message].sqlstate == sqlstate, message
    assert errors_plugin.MESSAGES["sorry, too many clients already"].sqlstate == "53300"


def test_table_entries_are_rendered_with_sqlstate_and_a_hint_with_numbers(tmp_path):
    relay = make_relay(tmp_path, "max_client_conn = 7\n")
    decision = relay.translate_error(RejectError(Reject("no more connections allowed (max_client_conn)")),
                                     "login", None)
    assert (decision.severity, decision.sqlstate) == ("FATAL", "53300")
    assert decision.hint == ("max_client_conn is 7 and 0 clients are connected: raise max_client_conn, "
                             "or have the application open fewer connections.")
    # Not in the table: unchanged; already hinted: unchanged.
    other = Reject("something else", "08P01")
    assert relay.translate_error(RejectError(other), "login", None) == other
    hinted = Reject("query_wait_timeout", "08P01", hint="mine")
    assert relay.translate_error(RejectError(hinted), "disconnect", None) == hinted


def test_every_table_hint_formats_with_the_facts(tmp_path):
    relay = make_relay(tmp_path)
    for message in errors_plugin.MESSAGES:
        rendered = relay.translate_error(RejectError(Reject(message)), "disconnect", None)
        assert rendered.hint and "{" not in rendered.hint, message


def test_a_plugin_overrides_a_table_entry(tmp_path):
    plugin = tmp_path / "my_errors.py"
    plugin.write_text(textwrap.dedent("""
        from pgrelay import Reject, hookimpl
        from pgrelay.errors import RejectError

        @hookimpl
        def pgrelay_translate_error(relay, error, phase, client):
            if isinstance(error, RejectError) and error.decision.message == "query_wait_timeout":
                return Reject("all servers are busy, try again", "53400", hint="call us")
            return None
    """))
    relay = make_relay(tmp_path, f"plugins = {plugin}\n")
    assert relay.translate_error(RejectError(Reject("query_wait_timeout")), "disconnect", None) == \
        Reject("all servers are busy, try again", "53400", hint="call us")
    # The other entries still come from the table.
    assert relay.translate_error(RejectError(Reject("idle transaction timeout")), "disconnect", None).sqlstate == "25P03"

