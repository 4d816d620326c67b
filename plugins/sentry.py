"""Sentry error reporting (sentry_dsn): a built-in plugin on notification hooks; secrets are scrubbed.

What is reported, each event tagged with what is known of database, user, pool, listener, route,
host, pool_mode and plugin:

* internal errors (``pgrelay_internal_error``): bugs pgrelay survived, with their stack trace;
* server logins that fail (``pgrelay_server_login_failed``), servers lost under their clients
  (``pgrelay_server_disconnected`` with a failure reason), clients a pool timed out waiting for a
  server (``pgrelay_client_disconnected`` with ``query_wait_timeout`` or ``query_timeout``), client
  authentication failures (``pgrelay_auth_failed``) and health changes of hosts
  (``pgrelay_host_changed``).

Nothing is reported per query and nothing on the relay loop. Repeats are aggregated: the first
occurrence of a (kind, pool or host, reason) is sent at once, later ones within
``sentry_event_window`` are counted and sent as one event with the count when the window ends.
Whatever the keys, a relay sends at most MAX_EVENTS events a minute (the rest are counted and logged).

Sending never slows the relay: sentry-sdk queues events for its own background worker, a real OS
thread (pgrelay does not monkey-patch threading), which does the HTTP; a full queue drops events.
A send that fails (Sentry refusing or unreachable) backs the transport off, 1 s doubling up to
60 s: while it is backed off or its queue is full, events are neither built nor queued, so a
failing endpoint costs neither the event loop nor, through the GIL, the worker thread.

Scrubbing: no local variables, request bodies, breadcrumbs or default PII are collected, and
``before_send`` replaces every known secret (passwords and hashes from auth_file, [databases]
passwords, secrets clients logged in with, SCRAM keys) and anything shaped like one
(``password=...``, ``md5`` + 32 hex digits, SCRAM verifiers and exchange attributes, a URL's
password) with ``[Filtered]``. Then ``pgrelay_sentry_event`` lets plugins enrich or drop the event,
and what they added is scrubbed too.
"""

from __future__ import annotations

import logging
import os
import re
import time
import weakref
from datetime import datetime, timedelta, timezone
from dataclasses import dataclass, field
from typing import Any

import gevent
import sentry_sdk
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.excepthook import ExcepthookIntegration
from sentry_sdk.transport import HttpTransport
from sentry_sdk.utils import BadDsn, Dsn, event_from_exception

from pgrelay import __version__, hookimpl
from pgrelay.errors import ConfigError, Reject
from pgrelay.settings import SECONDS, STR, Setting, SettingType, declare

log = logging.getLogger("pgrelay")

NAME = "sentry"
FILTERED = "[Filtered]"
MIN_SECRET = 4              # shorter known secrets are left to the patterns (they would garble text)
MAX_TAG = 200               # Sentry's limit for a tag value
QUEUE_SIZE = 100            # events waiting for the worker thread; more are dropped, never waited for
SHUTDOWN_TIMEOUT = 2.0      # seconds the exit waits for queued events
MAX_EVENTS = 150            # events one relay sends per minute at most (more than the SDK's queue holds)
BACKOFF_FIRST = 1.0         # seconds no event is sent after a failed send; doubles per failure in a row
BACKOFF_MAX = 60.0
TIMEOUT_REASONS = ("query_wait_timeout", "query_timeout")
# Reasons of pgrelay_server_disconnected that mean a server was lost (not closed by pgrelay's choice).
LOST_REASONS = ("server read failed", "server write failed", "server closed connection", "server protocol violation",
                "server sent FATAL", "server check failed", "server_reset_query failed", "invalid server parameter")


class Rate(SettingType):
    """A fraction from 0 to 1."""

    name = "rate"

    def parse(self, text: str) -> float:
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError(f"invalid rate {text!r} (a number from 0 to 1)") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{value} is not between 0 and 1")
        return value


SETTINGS = [
    Setting("sentry_dsn", STR, "", True,
            "Sentry DSN to report pgrelay's errors to (also read from the SENTRY_DSN environment variable); "
            "empty: no reporting."),
    Setting("sentry_environment", STR, "production", True, "Sentry environment of the events."),
    Setting("sentry_release", STR, f"pgrelay@{__version__}", True, "Sentry release of the events."),
    Setting("sentry_sample_rate", Rate(), "1.0", True, "Fraction of error events sent to Sentry (0 to 1)."),
    Setting("sentry_event_window", SECONDS, "60", True,
            "Repeats of one kind of event (per pool or host and reason) within this window are sent as one "
            "event with a count."),
]

pgrelay_add_settings = declare(SETTINGS)


# -- configuration -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """What sentry_sdk.init runs with; a change (on reload) re-initializes the SDK."""

    dsn: str
    environment: str
    release: str
    sample_rate: float


@dataclass
class Pending:
    """One (kind, where, reason) key: when its last event went out, and what came since."""

    sent_at: float
    count: int = 0
    build: Any = None               # () -> (event, hint) for the latest occurrence
    timer: Any = None


@dataclass
class SentryState:
    options: Options | None
    window: float
    pending: dict = field(default_factory=dict)
    budget_start: float = -60.0     # the minute MAX_EVENTS counts in
    budget_used: int = 0
    over_budget: int = 0
    unsendable: int = 0             # events not built this minute: the transport backed off or full


def state(relay) -> SentryState | None:
    return relay.plugin_data.get(NAME)


@hookimpl
def pgrelay_configure(relay):
    config = relay.config
    dsn = config.sentry_dsn.strip() or relay.env.get("SENTRY_DSN", "").strip()
    options = None
    if dsn:
        try:
            Dsn(dsn)
        except BadDsn as exc:
            raise ConfigError(f"invalid sentry_dsn {mask(dsn)!r}: {exc}") from None
        options = Options(dsn, config.sentry_environment, config.sentry_release, config.sentry_sample_rate)
    old = state(relay)
    new = SentryState(options, config.sentry_event_window)
    if old is not None:  # repeats and the rate budget carry over a reload
        new.pending, new.budget_start, new.budget_used, new.over_budget = \
            old.pending, old.budget_start, old.budget_used, old.over_budget
    relay.plugin_data[NAME] = new


@hookimpl
def pgrelay_startup(relay):
    apply(relay)


@hookimpl
def pgrelay_reload(relay, changed):
    apply(relay)


# -- the SDK, once per process -------------------------------------------------------------------

_active: Options | None = None      # what sentry_sdk.init last ran with in this process
_owner: Any = None                  # weakref to the relay whose settings those are


class BackoffTransport(HttpTransport):
    """sentry-sdk's HTTP transport without urllib3's retries, backing off after a failed send: for
    BACKOFF_FIRST seconds, doubling with each failure in a row up to BACKOFF_MAX, the SDK's own
    rate-limit mechanism drops envelopes before they are serialized. A refusing endpoint would
    otherwise keep the worker thread busy (serializing, compressing, failing four times per event)
    and, holding the GIL, make the event loop wait for it."""

    def __init__(self, options):
        super().__init__(options)
        self.backoff = 0.0

    def _get_pool_options(self):
        return {**super()._get_pool_options(), "retries": False}

    def _send_request(self, body, headers, endpoint_type, envelope=None):
        try:
            super()._send_request(body, headers, endpoint_type, envelope)
        except Exception as exc:
            self.backoff = min(BACKOFF_MAX, self.backoff * 2 or BACKOFF_FIRST)
            self._disabled_until[None] = datetime.now(timezone.utc) + timedelta(seconds=self.backoff)
            _transport_failed(f"{type(exc).__name__}: {exc}")
            raise
        self.backoff = 0.0

    def sendable(self) -> bool:
        """Whether an event queued now would be sent: not backed off or rate-limited, queue not full."""
        return self.is_healthy()


_last_transport_log = -60.0


def _transport_failed(text: str) -> None:
    """One line in pgrelay's log at most once a minute, whatever fails in the worker thread."""
    global _last_transport_log
    now = time.monotonic()
    if now - _last_transport_log < 60:
        return
    _last_transport_log = now
    log.warning("sentry: could not send events: %s (not logged again for 60 s)", _clip(mask(text)))


def apply(relay) -> None:
    """Initialize sentry-sdk for this relay's options, unless it already runs with them; a change
    re-initializes it, no DSN turns it off."""
    global _active, _owner
    st = state(relay)
    options = st.options if st is not None else None
    _owner = weakref.ref(relay)
    if options == _active:
        return
    if _active is not None:
        stop()
    if options is None:
        return
    _quiet_sdk_log()
    sentry_sdk.init(
        # Explicit values (an empty release stays empty: the SDK would otherwise run git to guess one).
        dsn=options.dsn, environment=options.environment, release=options.release,
        sample_rate=options.sample_rate,
        # Only what pgrelay reports, nothing collected behind its back: no logging integration
        # (log lines may carry query text), no breadcrumbs, no argv, no local variables.
        default_integrations=False, auto_enabling_integrations=False,
        integrations=[AtexitIntegration(callback=_at_exit), DedupeIntegration(), ExcepthookIntegration()],
        include_local_variables=False, max_request_body_size="never", **privacy_options(),
        max_breadcrumbs=0, before_breadcrumb=lambda crumb, hint: None, attach_stacktrace=False,
        before_send=_before_send, before_send_transaction=lambda event, hint: None, traces_sample_rate=None,
        transport_queue_size=QUEUE_SIZE, shutdown_timeout=SHUTDOWN_TIMEOUT, send_client_reports=False,
        transport=BackoffTransport,
    )
    _active = options
    log.info("sentry: reporting errors to %s (environment %s, release %s, sample rate %s)",
             dsn_target(options.dsn), options.environment, options.release, options.sample_rate)


def privacy_options() -> dict:
    """No default PII, in the spelling this sentry-sdk knows: ``data_collection`` with everything off
    where it exists (it supersedes ``send_default_pii``, deprecated there), else send_default_pii=False."""
    import inspect
    if "data_collection" not in inspect.signature(sentry_sdk.consts.ClientConstructor.__init__).parameters:
        return {"send_default_pii": False}
    off = {"mode": "off"}
    return {"data_collection": {
        "user_info": False, "cookies": off, "http_headers": {"request": off}, "http_bodies": [],
        "url_query_params": off, "graphql": {"document": False, "variables": False},
        "gen_ai": {"inputs": False, "outputs": False}, "database_query_data": False, "queues": False,
        "stack_frame_variables": False}}


class _TransportLog(logging.Handler):
    """What the HTTP library of sentry-sdk's worker thread says (urllib3's warnings): through
    _transport_failed, not as lines per event on stderr. (The SDK's own error log stays silent
    unless it runs in debug mode.)"""

    def __init__(self):
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        _transport_failed(f"{type(exc).__name__}: {exc}" if exc is not None else record.getMessage())


def _quiet_sdk_log() -> None:
    transport_log = logging.getLogger("urllib3")  # used by sentry-sdk only, in pgrelay's process
    if not any(isinstance(h, _TransportLog) for h in transport_log.handlers):
        transport_log.addHandler(_TransportLog())
    transport_log.propagate = False


def stop() -> None:
    """Close the SDK's client without waiting for its queue (used on a DSN change and by tests)."""
    global _active
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close(timeout=0)
    sentry_sdk.get_global_scope().set_client(None)  # a non-recording client: capturing does nothing
    _active = None


def active(relay) -> bool:
    st = state(relay)
    return st is not None and st.options is not None and st.options == _active


def _at_exit(pending: int, timeout: float) -> None:
    log.info("sentry: sending %d pending event(s), waiting up to %.0f s", pending, timeout)


# -- what is reported ------------------------------------------------------------------------------

@hookimpl(tryfirst=True)  # before other plugins: one of them failing here must not stop the report
def pgrelay_internal_error(relay, error, phase, client, server):
    if not active(relay):
        return
    tags = tags_for(client=client, server=server)
    plugin = plugin_of(relay, error)
    if plugin:
        tags["plugin"] = plugin
    where = _location(error)
    exc_info = (type(error), error, error.__traceback__)

    def build(count: int):
        event, hint = event_from_exception(exc_info, client_options=sentry_sdk.get_client().options,
                                           mechanism={"type": "pgrelay", "handled": True})
        event.update(level="error", logger="pgrelay", transaction=f"pgrelay.{phase}")
        event["tags"] = dict(tags, phase=phase)
        return event, hint

    report(relay, ("internal_error", phase, type(error).__name__, where), build,
           {"kind": "internal_error", "phase": phase})


@hookimpl
def pgrelay_server_login_failed(relay, pool, error):
    if not active(relay):
        return
    reason = _clip(str(error) or type(error).__name__)
    tags = tags_for(pool=pool)
    extra = {"sqlstate": error.fields.get("C") or error.sqlstate}
    entry = databases_entry(relay, tags.get("database"))
    if entry is not None:
        extra["databases_entry"] = entry
    message = f"server login failed for pool {pool.name}: {reason}"
    report_message(relay, ("server_login_failed", pool.name, reason), message, "error", tags, extra,
                   "server_login_failed")


@hookimpl
def pgrelay_server_disconnected(relay, server, reason):
    if not active(relay) or not reason.startswith(LOST_REASONS):
        return
    tags = tags_for(server=server)
    reason = _clip(reason)
    message = f"server connection lost in pool {server.pool.name}: {reason}"
    report_message(relay, ("server_lost", server.pool.name, tags.get("host"), reason), message, "error", tags, {},
                   "server_lost")


@hookimpl
def pgrelay_client_disconnected(relay, client, reason):
    if reason not in TIMEOUT_REASONS or not active(relay):
        return
    tags = tags_for(client=client)
    pool = tags.get("pool", "?")
    message = f"pool {pool} timed clients out waiting for a server ({reason})"
    report_message(relay, ("client_timeout", pool, reason), message, "warning", tags, {}, "client_timeout")


@hookimpl
def pgrelay_auth_failed(relay, login, reason):
    if not active(relay):
        return
    # Keyed by listener and reason only: user and database names come from the client, and a
    # scanner trying many of them must not make as many events. The tags show the latest one.
    tags = {"database": login.database, "user": login.user, "listener": login.listener.name}
    message = f"client authentication failed on listener {login.listener.name} ({reason})"
    report_message(relay, ("auth_failed", login.listener.name, reason), message, "warning",
                   _tags(tags), {"reason": reason}, "auth_failed")


@hookimpl
def pgrelay_host_changed(relay, host, state):
    if not active(relay):
        return
    label = "down" if not state.up else ("standby" if state.in_recovery else "primary")
    message = f"host {host} is now {label}" + (f": {state.error}" if state.error and not state.up else "")
    extra = {"lag": state.lag} if state.up and state.in_recovery else {}
    report_message(relay, ("host_changed", str(host), label), _clip(message), "warning" if not state.up else "info",
                   _tags({"host": str(host)}), extra, "host_changed")


# -- aggregation -----------------------------------------------------------------------------------------

def report_message(relay, key, message: str, level: str, tags: dict, extra: dict, kind: str) -> None:
    def build(count: int):
        event = {"message": message, "level": level, "logger": "pgrelay", "tags": dict(tags),
                 "extra": dict(extra), "fingerprint": ["pgrelay", *[str(part) for part in key]]}
        return event, {}

    report(relay, key, build, {"kind": kind})


def report(relay, key: tuple, build, info: dict) -> None:
    """Send now if this key sent nothing within the window; else count it for one event at the window's end."""
    st = state(relay)
    now = time.monotonic()
    entry = st.pending.get(key)
    if entry is None or (entry.count == 0 and now - entry.sent_at >= st.window):
        if len(st.pending) > 1000:  # forget keys that went quiet
            for old in [k for k, e in st.pending.items() if not e.count and now - e.sent_at >= st.window]:
                del st.pending[old]
        st.pending[key] = Pending(sent_at=now)
        _send(relay, build, 1, info, st.window)
        return
    entry.count += 1
    entry.build = build
    if entry.timer is None:
        entry.timer = gevent.spawn_later(max(0.0, entry.sent_at + st.window - now), _flush, relay, key, info)


def _flush(relay, key: tuple, info: dict) -> None:
    st = state(relay)
    entry = st.pending.get(key) if st is not None else None
    if entry is None:
        return
    entry.timer = None
    if entry.count and active(relay):
        count, build = entry.count, entry.build
        entry.count, entry.build, entry.sent_at = 0, None, time.monotonic()
        _send(relay, build, count, info, st.window)


def _may_send(st: SentryState, now: float) -> bool:
    """At most MAX_EVENTS per minute leave a relay, whatever the keys: building an event costs the hub
    a few milliseconds, and an endless variety of failures must not add up to a slower relay. Nor is
    an event built while the transport could not send it. What was not sent is logged each minute."""
    if now - st.budget_start >= 60:
        if st.over_budget:
            log.warning("sentry: %d event(s) were not sent: more than %d in a minute", st.over_budget, MAX_EVENTS)
        if st.unsendable:
            log.warning("sentry: %d event(s) were not sent: Sentry could not be reached or its queue was full",
                        st.unsendable)
        st.budget_start, st.budget_used, st.over_budget, st.unsendable = now, 0, 0, 0
    transport = sentry_sdk.get_client().transport
    if isinstance(transport, BackoffTransport) and not transport.sendable():
        st.unsendable += 1
        return False
    if st.budget_used >= MAX_EVENTS:
        st.over_budget += 1
        return False
    st.budget_used += 1
    return True


def _send(relay, build, count: int, info: dict, window: float) -> None:
    if not _may_send(state(relay), time.monotonic()):
        return
    event, hint = build(count)
    event.setdefault("extra", {})
    event["extra"]["count"] = count
    event["extra"]["window_seconds"] = window
    if count > 1 and isinstance(event.get("message"), str):
        event["message"] += f" ({count} times in the last {window:.0f} s)"
    hint["pgrelay"] = dict(info)
    hint["_pgrelay_relay"] = relay
    try:
        sentry_sdk.capture_event(event, hint=hint)
    except Exception:  # reporting must never break what it reports on
        log.exception("sentry: could not queue an event")


# -- before_send: scrub, then the plugins' say -------------------------------------------------------

def _before_send(event: dict, hint: dict) -> dict | None:
    relay = hint.pop("_pgrelay_relay", None) if hint else None
    if relay is None and _owner is not None:
        relay = _owner()
    secrets = known_secrets(relay) if relay is not None else set()
    event = scrub_event(event, secrets)
    if relay is None:
        return event
    hint = hint if hint is not None else {}
    hint.setdefault("pgrelay", {"kind": "uncaught"})
    try:
        decision = relay.sentry_event(event, hint)
    except Exception:
        log.exception("sentry: plugin failed in pgrelay_sentry_event; sending the event as it was")
        decision = None
    if isinstance(decision, Reject):
        log.debug("sentry: event dropped by a plugin: %s", decision.message)
        return None
    return scrub_event(event, secrets)


_QUOTED = r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""
PASSWORD_RE = re.compile(rf"(?i)(\bpassword\s*=\s*)({_QUOTED}|[^\s,;&]+)")
PATTERNS = (
    (PASSWORD_RE, r"\1" + FILTERED),
    (re.compile(r"(?i)md5[0-9a-f]{32}"), FILTERED),
    (re.compile(r"SCRAM-SHA-256\$[^\s'\",;]*"), FILTERED),
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*):[^\s@/]+@"), r"\1:" + FILTERED + "@"),
    # SCRAM exchange attributes: nonce, salt, proof, server signature (base64, long).
    (re.compile(r"\b([rspv])=[A-Za-z0-9+/]{16,}={0,2}"), r"\1=" + FILTERED),
)
DROPPED_KEYS = ("request", "user", "breadcrumbs", "modules")


def scrub_text(text: str, secrets: set[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, FILTERED)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def scrub(value: Any, secrets: set[str]) -> Any:
    if isinstance(value, str):
        return scrub_text(value, secrets)
    if isinstance(value, dict):
        return {scrub(k, secrets) if isinstance(k, str) else k: scrub(v, secrets) for k, v in value.items()
                if k != "vars"}
    if isinstance(value, (list, tuple)):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return scrub_text(bytes(value).decode("utf-8", "replace"), secrets)
    return value


def scrub_event(event: dict, secrets: set[str]) -> dict:
    for key in DROPPED_KEYS:
        event.pop(key, None)
    extra = event.get("extra")
    if isinstance(extra, dict):
        extra.pop("sys.argv", None)
    return scrub(event, secrets)


def known_secrets(relay) -> set[str]:
    """Every secret this relay holds that could end up in an error message."""
    found: set[str] = set()
    for entry in relay.config.section("databases"):
        for match in PASSWORD_RE.finditer(entry.value or ""):
            found.add(_unquote(match.group(2)))
    auth = relay.plugin_data.get("auth")
    found.update(str(s) for s in (getattr(auth, "users", None) or {}).values())
    found.update(relay.login_secrets.values())
    for pool in list(relay.pools.values()):
        if pool.route.server_password:
            found.add(pool.route.server_password)
    import base64
    for verifier, client_key in list(relay.scram_keys.values()):
        found.add(verifier.encode())
        found.update(base64.b64encode(key).decode() for key in (verifier.stored_key, verifier.server_key, client_key))
    for secret in list(found):
        if secret.startswith("SCRAM-SHA-256$"):  # its parts may be quoted apart
            found.update(part for part in re.split(r"[$:]", secret) if len(part) >= 16)
    return {s for s in found if len(s) >= MIN_SECRET}


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", text[1:-1])
    return text


def dsn_target(dsn: str) -> str:
    """Where a DSN sends events, without its key (the key lets anyone post events to the project)."""
    scheme, _, rest = dsn.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}" if rest else "(unparsable DSN)"


def mask(text: str) -> str:
    """A config value (a DSN, a [databases] line) with its passwords replaced."""
    return scrub_text(text, set())


def databases_entry(relay, database: str | None) -> str | None:
    """The [databases] line of `database` (else the * fallback), passwords masked."""
    entries = {entry.key: entry.value for entry in relay.config.section("databases")}
    value = entries.get(database) if database else None
    if value is None:
        value = entries.get("*")
    return None if value is None else f"{database if database in entries else '*'} = {mask(value)}"


# -- tags ------------------------------------------------------------------------------------------------

def tags_for(client=None, server=None, pool=None) -> dict[str, str]:
    """database, user, pool, listener, transport, route, host and pool_mode, as far as they are known."""
    tags: dict[str, Any] = {}
    if client is not None:
        tags.update(database=client.database, user=client.user,
                    listener=getattr(client.listener, "name", None))
        transport = getattr(client, "transport", None)
        if transport is not None:  # carried by a serverless listener: "websocket" or "http"
            tags["transport"] = transport.kind
        if server is None:
            server = client.server
        if pool is None:
            pool = client.pool
    if server is not None:
        if server.addr is not None:
            tags["host"] = str(server.addr)
        if pool is None:
            pool = server.pool
    if pool is not None:
        route = pool.route
        tags["pool"] = pool.name
        tags["route"] = route.target
        tags["pool_mode"] = route.pool_mode
        tags.setdefault("database", pool_database(pool))
        tags.setdefault("user", route.server_user)
        if "host" not in tags and route.hosts:
            tags["host"] = ",".join(str(h) for h in route.hosts)
    return _tags(tags)


def pool_database(pool) -> str:
    """The client-side database name of a pool, from its name ``[prefix:]database/user[@cluster][|replica]``."""
    name = pool.name.rsplit("/", 1)[0]
    return name.split(":", 1)[1] if ":" in name else name


def _tags(tags: dict) -> dict[str, str]:
    return {k: _clip(str(v)) for k, v in tags.items() if v not in (None, "")}


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TAG else text[:MAX_TAG - 3] + "..."


def plugin_of(relay, error: BaseException) -> str | None:
    """The plugin whose code raised `error`: the innermost traceback frame in a plugin's module."""
    modules = {}
    for name, plugin in relay.pm.list_name_plugin():
        module = getattr(plugin, "__name__", None)
        if plugin is not None and module:
            short = os.path.splitext(os.path.basename(name))[0] if os.sep in name or name.endswith(".py") else name
            modules[module] = short
    found = None
    tb = error.__traceback__
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "")
        for prefix, name in modules.items():
            if module == prefix or module.startswith(prefix + "."):
                found = name
        tb = tb.tb_next
    return found


def _location(error: BaseException) -> str:
    tb = error.__traceback__
    last = None
    while tb is not None:
        last = tb
        tb = tb.tb_next
    if last is None:
        return "?"
    return f"{last.tb_frame.f_code.co_filename}:{last.tb_lineno}"
