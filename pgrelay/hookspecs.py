"""The plugin contract: every hook pgrelay calls, what it receives, returns, and where it is called from.

Conventions
-----------
* Hooks are called with keyword arguments only; an implementation may accept a subset of them.
* "First result" hooks stop at the first implementation that returns something other than None.
  None always means "no opinion: ask the next plugin". Built-in defaults are registered first
  and marked ``trylast``, so third-party plugins are asked before them.
* Decisions are values: a hook refuses a client by returning a ``Reject``.
  Raising is a fault; the core logs it and the client gets the translated error.
* Each hook has exactly one call site, a method of ``Relay`` named after it.
* No hook is called per message or per query: the relay loop never calls plugins.
* Hooks run in a greenlet and may block on gevent-friendly I/O, except where a docstring says
  "event loop": those run inside libev callbacks and must return quickly without blocking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .client import ClientConnection
    from .errors import Reject, ServerError
    from .health import HostState
    from .listener import ListenerKinds
    from .pool import Pool
    from .relay import Relay
    from .routing import Database, HostAddr, Login, Route, UserSpec
    from .server import ServerConnection
    from .settings import SettingsRegistry
    from .virtual import VirtualDatabase

hookspec = pluggy.HookspecMarker("pgrelay")


# -- configuration and lifecycle -------------------------------------------------------------

@hookspec
def pgrelay_add_settings(settings: "SettingsRegistry") -> None:
    """Declare a plugin's settings and claim its INI sections.

    :param settings: add ``Setting`` objects with ``settings.add()`` and
        claim sections such as ``[databases]`` with ``settings.add_section(name, doc)``.

    Called from: ``Relay.declared_settings``, once per relay before its configuration is read (and
    by ``pgrelay --help``), so that the file, ``PGRELAY_*`` variables, ``--flags`` and the help
    all know them.
    """


@hookspec
def pgrelay_configure(relay: "Relay") -> None:
    """Validate the loaded configuration and build the plugin's state.

    :param relay: ``relay.config`` holds setting values and the raw lines of claimed sections.

    Raise ``ConfigError`` (naming file and line) to refuse the configuration:
    at startup pgrelay exits; on reload the old configuration stays in force. Keep all state in
    ``relay.plugin_data[<plugin name>]`` and replace it in one assignment at the end, so a
    refused reload leaves the previous state intact.

    Called from: ``Relay.configure``, at startup and again on each successful reload.
    """


@hookspec
def pgrelay_reload(relay: "Relay", changed: frozenset[str]) -> None:
    """React to a reload (SIGHUP) after ``pgrelay_configure`` accepted the new configuration.

    :param changed: names of changed settings, and ``[section]`` names of changed sections.

    Called from: ``Relay.reload``.
    """


@hookspec
def pgrelay_reloading(relay: "Relay") -> None:
    """A reload (SIGHUP, or the admin console's RELOAD) begins: the configuration is about to be
    re-read. Exactly one of ``pgrelay_reload`` (accepted) or ``pgrelay_reload_failed`` (refused)
    follows, in the same greenlet.

    Called from: ``Relay.reloading``, at the start of ``Relay.reload``.
    """


@hookspec
def pgrelay_reload_failed(relay: "Relay", error: BaseException) -> None:
    """A reload was refused and the old configuration stays in force.

    :param error: the ``ConfigError`` or ``OSError`` that refused it (already logged; its text
        names the file and line, so do not publish it where a configured value must not appear).

    Called from: ``Relay.reload_failed``, by ``Relay.reload``.
    """


@hookspec
def pgrelay_startup(relay: "Relay") -> None:
    """pgrelay is listening; runs before it reports readiness. Called from: ``Relay.start``."""


@hookspec
def pgrelay_shutdown(relay: "Relay", mode: str) -> None:
    """pgrelay is stopping; ``mode`` is ``"fast"``, ``"wait_for_servers"`` or ``"wait_for_clients"``.

    Called from: ``Relay.shutdown``.
    """


@hookspec
def pgrelay_add_listener_kinds(relay: "Relay", kinds: "ListenerKinds") -> None:
    """Serve listeners that speak something other than PostgreSQL's protocol (the listener table).

    :param kinds: the relay's listener table (``pgrelay.listener.ListenerKinds``): call
        ``kinds.add(kind, accept)``. ``accept(sock, peer, listener)`` takes each connection accepted
        on a ``[listeners]`` line of that kind (``listener.kind``), from the event loop, and must
        return at once (spawn a greenlet). To serve PostgreSQL clients the connection carries, it
        passes them to ``relay.accept(sock, peer, listener, transport)``. A kind may be served by
        one plugin only; ``postgres`` is the core's own.

    Called from: ``Relay.listener_kinds``, once, when the relay is built.
    """


# -- authentication ---------------------------------------------------------------------------

@hookspec(firstresult=True)
def pgrelay_choose_auth_method(relay: "Relay", login: "Login") -> "str | Reject | None":
    """Choose how this client must authenticate.

    :returns: one of ``"trust"``, ``"plain"``, ``"md5"``, ``"scram-sha-256"``, ``"cert"``, or a
        Reject to refuse the client; None to let the next plugin decide. The built-in default
        follows ``auth_type`` (and ``auth_hba_file`` for ``hba``).

    Called from: ``Relay.choose_auth_method``, during login, after the StartupMessage.
    """


@hookspec(firstresult=True)
def pgrelay_get_credentials(relay: "Relay", login: "Login", user: str) -> "str | None":
    """Look up the stored secret for ``user``: a plaintext password, ``md5...`` or ``SCRAM-SHA-256$...``.

    :returns: the secret, or None if this plugin does not know the user (the next plugin is asked;
        if none knows it, the login fails exactly like a wrong password).

    Called from: ``Relay.get_credentials``, during client login and server login.
    """


@hookspec(firstresult=True)
def pgrelay_check_password(relay: "Relay", login: "Login", password: str) -> "bool | None":
    """Check a cleartext password the client sent (auth methods that receive one).

    :returns: True to accept, False to refuse, None to fall back to the stored secret.

    Called from: ``Relay.check_password``, during login, for the ``plain`` method.
    """


@hookspec(firstresult=True)
def pgrelay_check_bearer_token(relay: "Relay", login: "Login", token: str) -> "bool | None":
    """Check an ``Authorization: Bearer`` token sent with a serverless HTTP request (a JWT, say).

    :returns: True to accept the login without a password, False to refuse it (the client gets
        ``password authentication failed``), None to ignore the token and check the password
        from the connection string as usual. No plugin implements it by default: README shows a
        JWT example.

    Called from: ``Relay.check_bearer_token``, during login, for clients whose transport carries
        a token (``pgrelay.serverless``), before the password is checked.
    """


# -- routing ----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def pgrelay_parse_username(relay: "Relay", login: "Login") -> "UserSpec | Reject | None":
    """Take a login user name apart into the server role, a cluster and a suffix.

    :param login: ``login.user`` is the name as sent (``role``, ``role|suffix``, ``role.cluster``,
        ``role.cluster|suffix``; libpq's ``%7C`` arrives already decoded as ``|``);
        ``login.listener`` tells which port it came in on.
    :returns: a ``UserSpec``, a Reject for a malformed name (``user|``, ``user||x``, a name too
        long, a suffix where the listener allows none), or None to let the next plugin decide.
        The built-in default splits ``|suffix`` always and ``.cluster`` when
        ``cluster_usernames`` is on.

    Called from: ``Relay.parse_username``, during login, before authentication; authentication
    and routing then see the result as ``login.spec`` (and authenticate ``login.spec.role``).
    """


@hookspec(firstresult=True)
def pgrelay_find_database(relay: "Relay", name: str, cluster: "str | None") -> "Database | None":
    """Resolve a client-side database name (in a cluster, for ``role.cluster`` user names).

    :returns: a ``Database``, or None if unknown to this plugin. The built-in defaults read
        ``[databases]`` (with the ``*`` fallback entry) when ``cluster`` is None, and ``[clusters]``
        (the client's database name on that cluster's hosts) otherwise.

    Called from: ``Relay.find_database``, used by routing plugins.
    """


@hookspec(firstresult=True)
def pgrelay_route_client(relay: "Relay", login: "Login") -> "Route | Reject | None":
    """Decide which pool serves this client and how its servers log in.

    :returns: a ``Route``, a Reject (e.g. ``no such database: x``), or None
        to let the next plugin decide. The built-in default is the local pooler: one pool per
        (database, user) to the database's host, in the configured pool mode.

    Called from: ``Relay.route_client``, during login, after authentication.
    """


@hookspec(firstresult=True)
def pgrelay_choose_host(relay: "Relay", route: "Route", hosts: "tuple[HostAddr, ...]") -> "HostAddr | Reject | None":
    """Pick the address for a new server connection of ``route``.

    :param hosts: the candidates: ``route.hosts`` (where the primary is) followed by
        ``route.replicas``; ``route.target`` says whether the primary or a replica is wanted.
    :returns: one of ``hosts``, a Reject when none is usable (e.g. no healthy replica: the
        waiting clients get it), or None to let the next plugin decide. The built-in default
        finds the primary among several hosts with ``pg_is_in_recovery()``, balances replicas
        round robin or by least connections, and leaves out replicas that are down or lag.

    Called from: ``Relay.choose_host``, in the login greenlet of each new server connection
    (so it may block briefly, e.g. for a first health check).
    """


@hookspec(firstresult=True)
def pgrelay_virtual_database(relay: "Relay", login: "Login") -> "VirtualDatabase | None":
    """Claim a login for a database served inside pgrelay (the admin console ``pgbouncer``).

    :param login: ``login.database`` is the name the client asked for; ``login.spec`` is set.
    :returns: a ``pgrelay.virtual.VirtualDatabase`` that authenticates the client, checks its access
        and answers its queries in its own greenlet; or None for an ordinary database (routing,
        client limits and pools then apply as usual). A claimed client is exempt from client
        limits (max_client_conn and the like), as PgBouncer's console is.

    Called from: ``Relay.virtual_database``, during login, after ``pgrelay_parse_username`` and
    before ``pgrelay_check_client_limits``.
    """


@hookspec
def pgrelay_admin_commands(relay: "Relay", commands: Any) -> None:
    """Add commands to the admin console.

    :param commands: the console's command table (``pgrelay.admin.commands.CommandTable``): call
        ``commands.add(name, handler, args="", doc="", admin=True)``; ``handler(ctx, arg)`` returns
        a command tag, a ``ResultSet`` or a list of them, or raises ``AdminError``. Commands added
        here are listed after PgBouncer's in ``SHOW HELP``; built-in ones cannot be replaced.

    Called from: ``Relay.admin_commands``, once per configuration, when the console builds its
    command table.
    """


# -- limits -----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def pgrelay_check_client_limits(relay: "Relay", login: "Login") -> "Reject | None":
    """Admit or refuse a client before authentication.

    :returns: a Reject to refuse (PgBouncer's ``no more connections allowed (max_client_conn)``),
        or None to admit as far as this plugin is concerned.

    Called from: ``Relay.check_client_limits``, after the StartupMessage is parsed.
    """


# -- errors -----------------------------------------------------------------------------------

@hookspec(firstresult=True)
def pgrelay_translate_error(relay: "Relay", error: BaseException, phase: str,
                            client: "ClientConnection | None") -> "Reject | None":
    """Turn a fault, or one of pgrelay's own refusals, into what the client is told.

    :param error: an exception; ``RejectError`` carries a refusal pgrelay decided (``error.decision``:
        a limit, a timeout, a lost server), to be rendered.
    :param phase: ``"login"``, ``"relay"`` or ``"disconnect"``.
    :returns: the Reject to send, or None to let the next plugin decide. The built-in default
        renders refusals from its message table (PgBouncer's text, a PostgreSQL SQLSTATE, a HINT
        with the numbers that matter; plugins/errors.py ``MESSAGES``), maps pgrelay's exception
        classes to their SQLSTATEs and anything else to XX000, without exposing internals.
        A plugin overrides any entry by returning its own Reject for that message.

    Called from: ``Relay.translate_error``, whenever pgrelay sends a client an error of its own:
    a disconnect with an error, or the ERRORs of queries it fails.
    """


@hookspec
def pgrelay_internal_error(relay: "Relay", error: BaseException, phase: str,
                           client: "ClientConnection | None", server: "ServerConnection | None") -> None:
    """A bug: an exception nobody handled, in the relay, a plugin, a login or a periodic task.

    It has already been logged with its traceback; the client or server it hit has been
    disconnected (a client gets ``internal error``, XX000) and pgrelay keeps serving.

    :param error: the exception (``error.__traceback__`` is intact).
    :param phase: where it happened: ``"login"`` (a client's login, including the routing and auth
        plugins it calls), ``"relay"`` (the relay loop), ``"server_login"``, ``"janitor"``,
        ``"health"`` (a health check), ``"accept"``, ``"translate_error"`` or ``"plugin"`` (a
        notification hook failed).
    :param client: the client it hit, or None. :param server: the server it hit, or None.

    Called from: ``Relay.internal_error`` (in a new greenlet), which every such place calls.
    """


@hookspec(firstresult=True)
def pgrelay_sentry_event(relay: "Relay", event: dict[str, Any], hint: dict[str, Any]) -> "Reject | None":
    """See, enrich or drop an error report before the sentry plugin sends it to Sentry.

    :param event: the Sentry event, already scrubbed of secrets; change it in place to add
        ``tags``, ``contexts``, ``extra`` or a ``fingerprint`` (what a plugin adds is scrubbed too).
    :param hint: ``hint["pgrelay"]`` says what is reported: ``"kind"`` (``"internal_error"``,
        ``"server_login_failed"``, ``"server_lost"``, ``"client_timeout"``, ``"auth_failed"``,
        ``"host_changed"``), and for internal errors ``"phase"``; ``hint["exc_info"]`` holds the
        exception of an internal error.
    :returns: a Reject to drop the event (its message says why; logged at debug level), or None
        to keep it (with any changes made) and let the next plugin see it.

    Called from: ``Relay.sentry_event``, by the sentry plugin just before an event is queued for
    sending (in the greenlet that reports it; it must not block).
    """


# -- observability (notifications; return values are ignored) ---------------------------------

@hookspec
def pgrelay_client_connected(relay: "Relay", client: "ClientConnection") -> None:
    """A client finished logging in. Called from: ``Relay.client_connected`` (in a new greenlet)."""


@hookspec
def pgrelay_client_disconnected(relay: "Relay", client: "ClientConnection", reason: str) -> None:
    """A client left; ``reason`` is the logged disconnect reason.

    Called from: ``Relay.client_disconnected`` (in a new greenlet).
    """


@hookspec
def pgrelay_server_connected(relay: "Relay", server: "ServerConnection") -> None:
    """A server connection logged in. Called from: ``Relay.server_connected`` (in a new greenlet)."""


@hookspec
def pgrelay_server_disconnected(relay: "Relay", server: "ServerConnection", reason: str) -> None:
    """A server connection closed. Called from: ``Relay.server_disconnected`` (in a new greenlet)."""


@hookspec
def pgrelay_server_login_failed(relay: "Relay", pool: "Pool", error: "ServerError") -> None:
    """A new server connection of ``pool`` could not log in (connect, authentication, connect_query,
    or no usable host).

    :param error: ``error.fields`` holds the server's ErrorResponse fields (``C`` SQLSTATE, ``M``
        message) when the server sent one; ``error.routing`` is True when host selection refused.

    Called from: ``Relay.server_login_failed`` (in a new greenlet), from ``Pool.server_login_failed``.
    """


@hookspec
def pgrelay_auth_failed(relay: "Relay", login: "Login", reason: str) -> None:
    """A client failed authentication and is being refused.

    :param reason: one of the fixed strings in ``client_auth.FAILURE_REASONS``: ``"no_method"``
        (no method allowed, e.g. an hba reject), ``"password"`` (wrong password or unknown user),
        ``"certificate"``, ``"channel_binding"``, ``"unsupported_method"``, ``"protocol"``
        (a malformed authentication exchange). Never the secret: ``login`` has the user, database
        and peer, no password.

    Called from: ``Relay.auth_failed`` (in a new greenlet), from ``Relay.authenticate``.
    """


@hookspec
def pgrelay_host_changed(relay: "Relay", host: "HostAddr", state: "HostState") -> None:
    """The health monitor saw a host change: up or down, or its role (primary, standby).

    :param state: a copy of what the check found (``up``, ``in_recovery``, ``lag``, ``error``).

    Called from: ``Relay.host_changed`` (in a new greenlet), by the health monitor.
    """


@hookspec
def pgrelay_report_stats(relay: "Relay", stats: dict[str, Any]) -> None:
    """Periodic statistics, every ``stats_period`` seconds.

    :param stats: ``{"pools": {name: {...counters...}}, "clients": n, "servers": n, "disconnects":
        {reason: count}}``; counters are totals since start.

    Called from: ``Relay.report_stats``, by the janitor.
    """
