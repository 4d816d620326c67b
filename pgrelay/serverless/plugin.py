"""The serverless built-in plugin: its settings and the "serverless" listener kind."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.settings import INT, SECONDS, Setting, declare

SETTINGS = [
    Setting("serverless_max_request_size", INT, "10485760", True,
            "Largest POST /sql body in bytes on serverless listeners; a larger one gets 413."),
    Setting("serverless_max_response_size", INT, "10485760", True,
            "Largest POST /sql response in bytes; a larger one gets 507 (response is too large)."),
    Setting("serverless_request_timeout", SECONDS, "15", True,
            "Seconds a serverless HTTP request may take, from its first byte to its answer (a WebSocket "
            "upgrade: until it is accepted); past it a running query is cancelled and the client gets 408."),
    Setting("serverless_idle_timeout", SECONDS, "60", True,
            "Seconds an idle HTTP keep-alive connection stays open between requests."),
]

pgrelay_add_settings = declare(SETTINGS)


@hookimpl
def pgrelay_add_listener_kinds(relay, kinds):
    from . import endpoint
    kinds.add("serverless", lambda sock, peer, listener: endpoint.accept(relay, sock, peer, listener))
