"""plugins/sentry.py on in-process Relays: settings, one SDK init per process, a worker thread that never
blocks the gevent hub, scrubbing, aggregation and the pgrelay_sentry_event hook, against a real receiver."""

from __future__ import annotations

import logging
import threading
import time

import gevent
import gevent.monkey
import pytest
import sentry_sdk

from pgrelay import ConfigError, __version__
from pgrelay.auth import ScramSecret
from pgrelay.relay import Relay
from pgrelay_plugins import sentry

from ..sentry_receiver import Blackhole, SentryReceiver, refused_dsn

DB_PASSWORD = "db-line-Pw-93kd1"
MD5_HASH = "md5" + "0123456789abcdef0123456789abcdef"
SCRAM_VERIFIER = ScramSecret.from_password("carol-Pw-1x9", salt=b"0123456789abcdef").encode()
PLAIN_PASSWORD = "plain-Pw-77qq2"


@pytest.fixture(autouse=True)
def sdk_reset():
    """Each test leaves the process without a Sentry client."""
    yield
    sentry.stop()


@pytest.fixture
def receiver():
    with SentryReceiver() as rx:
        yield rx


def write_config(tmp_path, extra: str = "", dsn: str | None = None, auth_file: bool = True) -> str:
    path = tmp_path / "relay.ini"
    users = tmp_path / "userlist.txt"
    users.write_text(f'"alice" "{MD5_HASH}"\n"carol" "{SCRAM_VERIFIER}"\n"dan" "{PLAIN_PASSWORD}"\n')
    text = (f"[databases]\n* = host=127.0.0.1 port=1 password={DB_PASSWORD}\n"
            f"quoted = host=127.0.0.1 port=1 password='{DB_PASSWORD}x y'\n"
            "[pgbouncer]\nauth_type = md5\n"
            + (f"auth_file = {users}\n" if auth_file else "")
            + (f"sentry_dsn = {dsn}\n" if dsn else "") + extra)
    path.write_text(text)
    return str(path)


def started(tmp_path, extra: str = "", dsn: str | None = None, env: dict | None = None) -> Relay:
    relay = Relay(write_config(tmp_path, extra, dsn), env=env or {})
    relay.hook.pgrelay_startup(relay=relay)  # what Relay.start runs, without binding ports
    return relay


def boom(relay, message: str = "boom", phase: str = "relay", settle: float = 0.05, **kw) -> None:
    try:
        raise RuntimeError(message)
    except RuntimeError as exc:
        relay.internal_error(exc, phase, "test: internal error", **kw)
    gevent.sleep(settle)  # the notification runs in a new greenlet


def nothing_arrives(rx: SentryReceiver, seconds: float = 1.0) -> None:
    """No new event within `seconds` (the relay's greenlets run meanwhile)."""
    before = len(rx.events())
    gevent.sleep(seconds)
    assert rx.events()[before:] == []


def wait(rx: SentryReceiver, predicate=lambda event: True, count: int = 1, timeout: float = 15) -> list[dict]:
    return rx.wait_for_events(predicate, count, timeout, sleep=gevent.sleep)


# -- settings ----------------------------------------------------------------------------------------

def test_off_without_dsn(tmp_path, receiver):
    relay = started(tmp_path)
    assert sentry.state(relay).options is None
    assert not sentry_sdk.get_client().is_active()
    boom(relay)
    nothing_arrives(receiver, 0.5)


def test_dsn_setting_reports_with_environment_release_and_defaults(tmp_path, receiver, caplog):
    with caplog.at_level(logging.INFO, logger="pgrelay"):
        relay = started(tmp_path, dsn=receiver.dsn)
    key = receiver.dsn.split("://", 1)[1].split("@", 1)[0]
    assert "sentry: reporting errors to http://127.0.0.1:" in caplog.text
    assert key not in caplog.text  # the DSN's key lets anyone post events: never logged
    boom(relay)
    event = wait(receiver)[0]
    assert event["environment"] == "production"
    assert event["release"] == f"pgrelay@{__version__}"
    assert event["exception"]["values"][0]["type"] == "RuntimeError"
    assert event["tags"]["phase"] == "relay"
    sentry.stop()
    with SentryReceiver() as other:
        relay = started(tmp_path, "sentry_environment = staging\nsentry_release = my-release-7\n", dsn=other.dsn)
        boom(relay)
        event = wait(other)[0]
        assert (event["environment"], event["release"]) == ("staging", "my-release-7")


def test_dsn_from_sentry_dsn_environment_variable(tmp_path, receiver):
    relay = started(tmp_path, env={"SENTRY_DSN": receiver.dsn})
    assert sentry.state(relay).options.dsn == receiver.dsn
    boom(relay, "from the environment")
    event = wait(receiver)[0]
    assert event["exception"]["values"][0]["value"] == "from the environment"


def test_sample_rate(tmp_path, receiver):
    relay = started(tmp_path, "sentry_sample_rate = 0\n", dsn=receiver.dsn)
    for i in range(5):
        boom(relay, f"sampled out {i}", phase=f"p{i}")
    nothing_arrives(receiver, 1.0)
    write_config(tmp_path, "sentry_sample_rate = 1\n", receiver.dsn)
    assert relay.reload() is True
    boom(relay, "sampled in")
    assert wait(receiver)[0]["exception"]["values"][0]["value"] == "sampled in"


@pytest.mark.parametrize("line,message", [
    ("sentry_dsn = not a dsn\n", "invalid sentry_dsn"),
    ("sentry_dsn = http://127.0.0.1:9/1\n", "invalid sentry_dsn"),    # no public key
    ("sentry_sample_rate = 1.5\n", "sentry_sample_rate"),
    ("sentry_sample_rate = often\n", "sentry_sample_rate"),
])
def test_bad_settings_are_refused(tmp_path, line, message):
    with pytest.raises(ConfigError, match=message):
        Relay(write_config(tmp_path, line), env={})


def test_bad_dsn_message_masks_its_password(tmp_path):
    with pytest.raises(ConfigError) as info:
        Relay(write_config(tmp_path, "sentry_dsn = http://key:hunter2-dsn@127.0.0.1:9\n"), env={})
    assert "hunter2-dsn" not in str(info.value)


def test_one_init_per_process_and_a_reload_that_changes_the_dsn_reinits(tmp_path, receiver):
    relay = started(tmp_path, dsn=receiver.dsn)
    client = sentry_sdk.get_client()
    assert client.is_active() and client.dsn == receiver.dsn
    assert relay.reload() is True                      # nothing changed: the same client
    assert sentry_sdk.get_client() is client
    started(tmp_path, dsn=receiver.dsn)                # a second relay with the same options
    assert sentry_sdk.get_client() is client
    with SentryReceiver() as second:
        (tmp_path / "relay.ini").write_text(
            (tmp_path / "relay.ini").read_text().replace(receiver.dsn, second.dsn))
        assert relay.reload() is True
        assert sentry_sdk.get_client() is not client and sentry_sdk.get_client().dsn == second.dsn
        boom(relay, "after the reload")
        assert wait(second)[0]["exception"]["values"][0]["value"] == "after the reload"
        assert receiver.events() == []
        (tmp_path / "relay.ini").write_text(
            (tmp_path / "relay.ini").read_text().replace(f"sentry_dsn = {second.dsn}\n", ""))
        assert relay.reload() is True
        assert not sentry_sdk.get_client().is_active() and sentry.state(relay).options is None
        boom(relay, "after sentry was turned off")
        nothing_arrives(second, 0.5)
        assert len(second.events()) == 1


def test_a_refused_reload_keeps_reporting(tmp_path, receiver):
    relay = started(tmp_path, dsn=receiver.dsn)
    (tmp_path / "relay.ini").write_text((tmp_path / "relay.ini").read_text() + "sentry_sample_rate = 7\n")
    assert relay.reload() is False
    boom(relay, "still reporting")
    assert wait(receiver)[0]["exception"]["values"][0]["value"] == "still reporting"


# -- the transport: a real thread that never blocks the hub ------------------------------------------------

def _max_gap_while(seconds: float, action) -> float:
    """Run `action` while a greenlet measures how late the hub wakes it (every 5 ms)."""
    gaps = []

    def ticker():
        last = time.monotonic()
        end = last + seconds
        while last < end:
            gevent.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = gevent.spawn(ticker)
    action()
    tick.join()
    return max(gaps)


@pytest.mark.parametrize("kind", ["blackhole", "refused"])
def test_a_down_or_silent_endpoint_never_blocks_the_hub(tmp_path, kind):
    assert not gevent.monkey.is_module_patched("threading")
    assert not gevent.monkey.is_module_patched("socket")
    with Blackhole() as hole:
        dsn = hole.dsn if kind == "blackhole" else refused_dsn()
        relay = started(tmp_path, "sentry_event_window = 0\n", dsn=dsn)
        timings = []

        def flood():
            for i in range(250):  # beyond the SDK's queue: the rest is dropped, never waited for
                start = time.monotonic()
                boom(relay, f"flood {i}", phase=f"flood{i}", settle=0.005)
                timings.append(time.monotonic() - start - 0.005)

        gap = _max_gap_while(2.0, flood)
        workers = [t for t in threading.enumerate() if t.name == "sentry-sdk.BackgroundWorker"]
        assert workers, [t.name for t in threading.enumerate()]
        assert all(t.native_id != threading.main_thread().native_id for t in workers)
        assert isinstance(workers[0], threading.Thread) and workers[0].is_alive()
        if kind == "blackhole":
            assert hole.accepted, "the SDK never reached the silent endpoint"
        # A send that waited for the endpoint would take the SDK's 30 s HTTP timeout (or the
        # connection's refusal and retries) per event; queueing takes milliseconds. The bounds are
        # loose because the machine is shared.
        timings.sort()
        assert timings[len(timings) // 2] < 0.05, timings[len(timings) // 2]
        assert timings[-1] < 1.0, timings[-1]
        assert gap < 1.0, f"the hub was blocked for {gap:.3f}s"


def test_a_failed_send_backs_off_and_events_are_not_built_until_it_ends(tmp_path):
    """Refused: the transport backs off 1 s, then 2 s; events meanwhile are counted, not built or
    queued. Sentry back: the next event after the backoff arrives and the backoff resets."""
    dsn = refused_dsn()
    port = int(dsn.rsplit(":", 1)[1].split("/")[0])
    relay = started(tmp_path, "sentry_event_window = 0\n", dsn=dsn)
    transport = sentry_sdk.get_client().transport
    assert isinstance(transport, sentry.BackoffTransport)
    boom(relay, "first", phase="first")
    wait_for(lambda: transport.backoff == sentry.BACKOFF_FIRST, "the first failure to back off")
    assert not transport.sendable()
    for i in range(5):
        boom(relay, f"during backoff {i}", phase=f"during{i}", settle=0)
    assert sentry.state(relay).unsendable == 5
    gevent.sleep(sentry.BACKOFF_FIRST + 0.2)
    assert transport.sendable()
    boom(relay, "second", phase="second")
    wait_for(lambda: transport.backoff == 2 * sentry.BACKOFF_FIRST, "the second failure to double the backoff")
    with SentryReceiver(port=port) as rx:
        gevent.sleep(2 * sentry.BACKOFF_FIRST + 0.2)
        boom(relay, "after", phase="after")
        events = wait(rx)
        assert [e["exception"]["values"][-1]["value"] for e in events] == ["after"]
        wait_for(lambda: transport.backoff == 0.0, "a sent event to reset the backoff")
    assert sentry.state(relay).unsendable == 5


def wait_for(predicate, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        gevent.sleep(0.02)


# -- scrubbing -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,secret", [
    ("host=db password=s3cret-Pw user=x", "s3cret-Pw"),
    ("host=db password='s3cret Pw with space' user=x", "s3cret Pw with space"),
    ('password = "quoted-Secret"', "quoted-Secret"),
    ("PASSWORD=UpperCase-Pw", "UpperCase-Pw"),
    ("login with md5a3556571e93b0d20722ba62be61e8c2d failed", "a3556571e93b0d20722ba62be61e8c2d"),
    (f"secret {SCRAM_VERIFIER} end", SCRAM_VERIFIER.split("$")[2]),
    ("n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF", "rOprNGfwEbeRWgbNEkqO"),
    ("c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=", "v0X8v3Bz2T0CJGbJQyF0X"),
    ("r=fyko+d2lbbFgONRv9qkxdawL,s=QSXCR+Q6sek8bf92,i=4096", "QSXCR+Q6sek8bf92"),
    ("postgresql://bob:url-Secret-9@db.example/app", "url-Secret-9"),
    ("https://public:sentry-secret-key@sentry.example/1", "sentry-secret-key"),
])
def test_scrub_patterns(text, secret):
    scrubbed = sentry.scrub_text(text, set())
    assert secret not in scrubbed
    assert sentry.FILTERED in scrubbed


def test_scrub_keeps_ordinary_text():
    text = 'server login failed: FATAL 28P01 password authentication failed for user "bob" (pool db/bob)'
    assert sentry.scrub_text(text, set()) == text


def test_known_secrets_of_a_relay(tmp_path):
    relay = Relay(write_config(tmp_path), env={})
    relay.login_secrets["eve"] = "auth-query-Secret"
    found = sentry.known_secrets(relay)
    assert {DB_PASSWORD, DB_PASSWORD + "x y", MD5_HASH, SCRAM_VERIFIER, PLAIN_PASSWORD, "auth-query-Secret"} <= found
    event = {"message": f"a {PLAIN_PASSWORD} b {DB_PASSWORD}x y c auth-query-Secret",
             "extra": {"nested": [{"deep": f"({PLAIN_PASSWORD})"}], "sys.argv": ["pgrelay", "--x"]},
             "request": {"data": "anything"}, "breadcrumbs": {"values": [{"message": "SELECT 1"}]},
             "exception": {"values": [{"stacktrace": {"frames": [{"vars": {"password": PLAIN_PASSWORD}}]}}]}}
    scrubbed = sentry.scrub_event(event, found)
    text = repr(scrubbed)
    for secret in (PLAIN_PASSWORD, DB_PASSWORD, "auth-query-Secret", "SELECT 1", "sys.argv", "anything"):
        assert secret not in text, secret
    assert "vars" not in text


def test_events_are_scrubbed_before_they_leave(tmp_path, receiver):
    relay = started(tmp_path, dsn=receiver.dsn)
    boom(relay, f"cannot use {PLAIN_PASSWORD} / {MD5_HASH} / {SCRAM_VERIFIER} / password={DB_PASSWORD}")
    event = wait(receiver)[0]
    assert event["exception"]["values"][0]["value"].count(sentry.FILTERED) == 4
    raw = receiver.raw()
    for secret in (PLAIN_PASSWORD, MD5_HASH, SCRAM_VERIFIER, DB_PASSWORD, SCRAM_VERIFIER.split("$")[2]):
        assert secret.encode() not in raw, secret
    for frame in event["exception"]["values"][0]["stacktrace"]["frames"]:
        assert "vars" not in frame
    assert "breadcrumbs" not in event or not event["breadcrumbs"].get("values")


def test_databases_entry_is_masked(tmp_path):
    relay = Relay(write_config(tmp_path), env={})
    assert sentry.databases_entry(relay, "quoted") == f"quoted = host=127.0.0.1 port=1 password={sentry.FILTERED}"
    assert sentry.databases_entry(relay, "other") == f"* = host=127.0.0.1 port=1 password={sentry.FILTERED}"


# -- aggregation -----------------------------------------------------------------------------------------------

def test_repeats_within_the_window_become_one_event_with_a_count(tmp_path, receiver):
    relay = started(tmp_path, "sentry_event_window = 1\n", dsn=receiver.dsn)
    start = time.monotonic()
    for _ in range(6):
        sentry.report_message(relay, ("test", "pool-a", "why"), "pool-a failed", "error", {"pool": "pool-a"}, {},
                              "test")
    sentry.report_message(relay, ("test", "pool-b", "why"), "pool-b failed", "error", {"pool": "pool-b"}, {}, "test")
    first = wait(receiver, count=2)
    assert sorted((e["tags"]["pool"], e["extra"]["count"]) for e in first) == [("pool-a", 1), ("pool-b", 1)]
    assert time.monotonic() - start < 0.9  # the first one of each key goes at once
    later = wait(receiver, lambda e: e["extra"]["count"] > 1, timeout=5)
    assert [(e["tags"]["pool"], e["extra"]["count"]) for e in later] == [("pool-a", 5)]
    assert later[0]["message"] == "pool-a failed (5 times in the last 1 s)"
    assert later[0]["fingerprint"] == ["pgrelay", "test", "pool-a", "why"]
    gevent.sleep(1.5)
    assert len(receiver.events()) == 3  # nothing more: pool-b had no repeats
    sentry.report_message(relay, ("test", "pool-a", "why"), "pool-a failed", "error", {"pool": "pool-a"}, {}, "test")
    assert wait(receiver, count=4)[-1]["extra"]["count"] == 1  # a quiet window later: at once again


def test_window_zero_sends_every_occurrence(tmp_path, receiver):
    relay = started(tmp_path, "sentry_event_window = 0\n", dsn=receiver.dsn)
    for _ in range(3):
        sentry.report_message(relay, ("test", "p", "r"), "again", "error", {}, {}, "test")
    assert [e["extra"]["count"] for e in wait(receiver, count=3)] == [1, 1, 1]


# -- internal errors and the plugin tag -------------------------------------------------------------------------

BROKEN_NOTIFIER = """
from pgrelay import hookimpl

@hookimpl
def pgrelay_reload(relay, changed):
    raise ValueError("notifier bug")
"""


def test_a_failing_notification_hook_is_an_internal_error_tagged_with_its_plugin(tmp_path, receiver):
    plugin = tmp_path / "broken_notifier.py"
    plugin.write_text(BROKEN_NOTIFIER)
    relay = started(tmp_path, f"plugins = {plugin}\n", dsn=receiver.dsn)
    relay._notify("pgrelay_reload", changed=frozenset())
    event = wait(receiver)[0]
    assert event["tags"]["plugin"] == "broken_notifier"
    assert event["tags"]["phase"] == "plugin"
    assert event["exception"]["values"][0]["value"] == "notifier bug"


def test_a_failing_internal_error_hook_does_not_loop(tmp_path, receiver):
    plugin = tmp_path / "broken_reporter.py"
    plugin.write_text("from pgrelay import hookimpl\n\ncalls = []\n\n"
                      "@hookimpl\ndef pgrelay_internal_error(relay, error, phase, client, server):\n"
                      "    calls.append(phase)\n    raise RuntimeError('reporter bug')\n")
    relay = started(tmp_path, f"plugins = {plugin}\n", dsn=receiver.dsn)
    boom(relay, "the first bug")
    gevent.sleep(0.5)
    module = relay.pm.get_plugin(str(plugin))
    assert module.calls == ["relay"]
    assert [e["exception"]["values"][0]["value"] for e in wait(receiver)] == ["the first bug"]


def test_internal_errors_repeating_at_one_place_are_aggregated(tmp_path, receiver):
    relay = started(tmp_path, "sentry_event_window = 1\n", dsn=receiver.dsn)
    for _ in range(4):
        boom(relay, "the same bug")
    wait(receiver)
    events = wait(receiver, count=2, timeout=5)
    assert [e["extra"]["count"] for e in events] == [1, 3]
    assert all(e["exception"]["values"][0]["value"] == "the same bug" for e in events)


# -- the pgrelay_sentry_event hook -------------------------------------------------------------------------------

HOOK_PLUGINS = """
from pgrelay import hookimpl, Reject

@hookimpl
def pgrelay_sentry_event(relay, event, hint):
    if "drop me" in str(event.get("exception")):
        return Reject("not worth reporting")
    event.setdefault("tags", {})["team"] = "db-oncall"
    event["tags"]["kind"] = hint["pgrelay"]["kind"]
    event.setdefault("extra", {})["leak"] = "password=added-by-plugin-9"
    return None
"""


def test_a_plugin_adds_a_tag_or_drops_an_event(tmp_path, receiver):
    plugin = tmp_path / "sentry_policy.py"
    plugin.write_text(HOOK_PLUGINS)
    relay = started(tmp_path, f"plugins = {plugin}\n", dsn=receiver.dsn)
    boom(relay, "drop me please", phase="a")
    boom(relay, "keep me", phase="b")
    event = wait(receiver)[0]
    assert event["exception"]["values"][0]["value"] == "keep me"
    assert event["tags"]["team"] == "db-oncall" and event["tags"]["kind"] == "internal_error"
    assert event["extra"]["leak"] == f"password={sentry.FILTERED}"  # what a plugin adds is scrubbed too
    gevent.sleep(0.5)
    assert len(receiver.events()) == 1
    assert b"drop me" not in receiver.raw() and b"added-by-plugin-9" not in receiver.raw()


def test_a_failing_sentry_event_hook_still_sends_the_scrubbed_event(tmp_path, receiver):
    plugin = tmp_path / "broken_policy.py"
    plugin.write_text("from pgrelay import hookimpl\n\n"
                      "@hookimpl\ndef pgrelay_sentry_event(relay, event, hint):\n    raise KeyError('policy bug')\n")
    relay = started(tmp_path, f"plugins = {plugin}\n", dsn=receiver.dsn)
    boom(relay, f"sent anyway {PLAIN_PASSWORD}")
    event = wait(receiver)[0]
    assert event["exception"]["values"][0]["value"] == f"sent anyway {sentry.FILTERED}"


# -- what the notification hooks report ------------------------------------------------------------------------

def test_reported_kinds_and_their_tags(tmp_path, receiver):
    from pgrelay.errors import ServerError
    from pgrelay.health import HostState
    from pgrelay.routing import HostAddr, Listener, Login, Route

    relay = started(tmp_path, dsn=receiver.dsn)
    route = Route(pool_key=("local", "app", "bob"), name="app/bob", hosts=(HostAddr("127.0.0.1", 1),), dbname="appdb",
                  server_user="bob", server_password=DB_PASSWORD, pool_mode="transaction")
    pool = relay.get_pool(route)
    sentry.pgrelay_server_login_failed(relay=relay, pool=pool, error=ServerError(
        'password authentication failed for user "bob"', {"S": "FATAL", "C": "28P01"}))
    login = Login(client_id=1, listener=Listener("main", "127.0.0.1", 6432), peer="127.0.0.1:5", user="bob",
                  database="app")
    sentry.pgrelay_auth_failed(relay=relay, login=login, reason="password")
    host = HostAddr("10.0.0.9", 5433)
    sentry.pgrelay_host_changed(relay=relay, host=host, state=HostState(host, up=False, error="connection refused"))
    events = {e["fingerprint"][1]: e for e in wait(receiver, count=3)}
    login_failed = events["server_login_failed"]
    assert login_failed["tags"] == {"database": "app", "user": "bob", "pool": "app/bob", "route": "primary",
                                    "pool_mode": "transaction", "host": "127.0.0.1:1"}
    assert login_failed["extra"]["sqlstate"] == "28P01"
    assert login_failed["extra"]["databases_entry"] == f"* = host=127.0.0.1 port=1 password={sentry.FILTERED}"
    assert login_failed["level"] == "error"
    assert events["auth_failed"]["tags"] == {"database": "app", "user": "bob", "listener": "main"}
    assert events["auth_failed"]["level"] == "warning"
    assert events["host_changed"]["message"] == "host 10.0.0.9:5433 is now down: connection refused"
    assert events["host_changed"]["tags"] == {"host": "10.0.0.9:5433"}
    assert DB_PASSWORD.encode() not in receiver.raw()
