"""The observation hooks (pgrelay_server_login_failed, pgrelay_auth_failed, pgrelay_host_changed) fire
from their call sites with what their specs promise, in a greenlet of their own."""

from __future__ import annotations

import gevent
import pytest

from pgrelay import Listener, Login, hookimpl
from pgrelay.client_auth import FAILURE_REASONS, failed, failure_reason
from pgrelay.errors import ProtocolViolation, Reject, RejectError, ServerError
from pgrelay.relay import Relay
from pgrelay.routing import HostAddr


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def pgrelay_server_login_failed(self, relay, pool, error):
        self.calls.append(("server_login_failed", pool, error))

    @hookimpl
    def pgrelay_auth_failed(self, relay, login, reason):
        self.calls.append(("auth_failed", login, reason))

    @hookimpl
    def pgrelay_host_changed(self, relay, host, state):
        self.calls.append(("host_changed", host, state))


@pytest.fixture
def relay(tmp_path):
    path = tmp_path / "relay.ini"
    path.write_text("[databases]\ndb = host=127.0.0.1 port=1\n[pgbouncer]\nauth_type = trust\n")
    relay = Relay(str(path), env={})
    relay.recorder = Recorder()
    relay.pm.register(relay.recorder, name="recorder")
    return relay


def login():
    return Login(client_id=1, listener=Listener("test", "127.0.0.1", 6432), peer="127.0.0.1:40000",
                 user="alice", database="db")


def test_server_login_failed_from_the_pool(relay):
    pool = relay.get_pool(relay.route_client(login()))
    pool.logging_in = 1
    error = ServerError("server login failed: boom", {"C": "28P01", "M": "boom"})
    pool.server_login_failed(object(), error)
    assert relay.recorder.calls == []  # not in the caller's greenlet
    gevent.sleep(0)
    assert relay.recorder.calls == [("server_login_failed", pool, error)]
    assert pool.stats.server_login_failures == 1


def test_auth_failed_when_no_method_allows_the_client(relay):
    class Refuse:
        @staticmethod
        @hookimpl(tryfirst=True)
        def pgrelay_choose_auth_method(login):
            return Reject("no pg_hba.conf entry", "28000")

    relay.pm.register(Refuse(), name="refuse")
    with pytest.raises(RejectError):
        relay.authenticate(None, login())
    gevent.sleep(0)
    assert relay.recorder.calls == [("auth_failed", login(), "no_method")]


@pytest.mark.parametrize("error,reason", [
    (failed("alice"), "password"),
    (RejectError(Reject('certificate authentication failed for user "alice"', "28000")), "certificate"),
    (RejectError(Reject("channel binding is required", "28000")), "channel_binding"),
    (RejectError(Reject("authentication method 'x' is not supported", "28000")), "unsupported_method"),
    (ProtocolViolation("malformed SCRAM message"), "protocol"),
])
def test_failure_reasons(error, reason):
    assert failure_reason(error) == reason
    assert reason in FAILURE_REASONS


def test_host_changed_from_the_health_monitor(relay):
    addr = HostAddr("127.0.0.1", 1)
    monitor = relay.health
    relay.hosts_changed = lambda: None  # no pools to re-check here
    assert monitor._publish(addr, True, False, 0.0, "") is False  # a first result is no change
    gevent.sleep(0)
    assert relay.recorder.calls == []
    assert monitor._publish(addr, False, None, 0.0, "connection refused") is True
    gevent.sleep(0)
    assert monitor._publish(addr, True, True, 1.5, "") is True   # back, now a standby
    gevent.sleep(0)
    calls = relay.recorder.calls
    assert [(kind, host, state.up, state.in_recovery) for kind, host, state in calls] == [
        ("host_changed", addr, False, False), ("host_changed", addr, True, True)]
    assert calls[0][2].error == "connection refused"
    assert calls[0][2] is not monitor.states[addr]  # a copy, not the live state
