"""Runs a client's authentication exchange (trust, cert, cleartext, md5, SCRAM-SHA-256[-PLUS]).

Policy (which method, which secret, whether a cleartext password is good) comes from hooks;
this module only speaks the protocol. Every failure, including an unknown user, ends with the
same message and SQLSTATE as a wrong password.
"""

from __future__ import annotations

import hmac
import os
import ssl
from typing import TYPE_CHECKING

from . import protocol
from .auth import (SCRAM_MECHANISM, SCRAM_PLUS_MECHANISM, ScramError, ScramSecret, ScramServer, md5_expected,
                   mock_salt, verify_plain)
from .errors import INVALID_AUTHORIZATION, INVALID_PASSWORD, ProtocolViolation, Reject, RejectError

if TYPE_CHECKING:
    from .client import ClientConnection
    from .relay import Relay
    from .routing import Login

# PostgreSQL's limit on an authentication message (PG_MAX_AUTH_TOKEN_LENGTH).
MAX_AUTH_MESSAGE = 65535
METHODS = ("trust", "any", "plain", "password", "md5", "scram-sha-256", "cert")
# What observers (pgrelay_auth_failed) are told about a failed authentication: fixed names only,
# never the message (it names the user) nor anything the client sent.
FAILURE_REASONS = ("no_method", "password", "certificate", "channel_binding", "unsupported_method", "protocol")


def role(login: "Login") -> str:
    return login.spec.role if login.spec is not None else login.user


def failed(user: str) -> RejectError:
    return RejectError(Reject(f'password authentication failed for user "{user}"', INVALID_PASSWORD))


def failure_reason(exc: BaseException) -> str:
    """The FAILURE_REASONS name of a RejectError or ProtocolViolation raised by `authenticate`."""
    if not isinstance(exc, RejectError):
        return "protocol"
    decision = exc.decision
    if decision.sqlstate == INVALID_PASSWORD:
        return "password"
    if decision.message.startswith("certificate authentication failed"):
        return "certificate"
    if "channel binding" in decision.message:
        return "channel_binding"
    return "unsupported_method"


def _auth_request(code: int, payload: bytes = b"") -> bytes:
    return protocol.message(b"R", protocol.pack_i32(code) + payload)


def _read_password_message(client: "ClientConnection") -> bytes:
    # The type byte is checked before the length is trusted, as PostgreSQL does: a StartupMessage
    # here would otherwise have its version read as a length and the login would stall.
    kind = client.stream.peek_byte()
    if kind != ord("p"):
        if kind == 0:
            raise ProtocolViolation("client re-sent startup pkt during authentication")
        raise ProtocolViolation(f"expected password response, got message type {chr(kind)!r}"
                                if 32 < kind < 127 else f"expected password response, got 0x{kind:02x}")
    kind, body = client.stream.read_message(MAX_AUTH_MESSAGE + 4)
    return body


def authenticate(relay: "Relay", client: "ClientConnection", login: "Login", method: str) -> None:
    """Authenticate `client` with `method`; raises RejectError on any failure.

    The role authenticated is `login.spec.role` (the user name without cluster or suffix).
    """
    user = role(login)
    transport = client.transport
    if transport is not None and transport.cleartext and method != "cert":
        # The Neon driver pipelines a cleartext PasswordMessage after its StartupMessage, so its
        # transport is always asked for one (PostgreSQL's AuthenticationCleartextPassword).
        _bridged(relay, client, login, method)
        return
    if method in ("trust", "any"):
        return
    if method == "cert":
        _cert(client, user)
    elif method in ("plain", "password"):
        _cleartext(relay, client, login)
    elif method == "md5":
        _md5(relay, client, login)
    elif method == "scram-sha-256":
        _scram(relay, client, login)
    else:
        raise RejectError(Reject(f"authentication method {method!r} is not supported", INVALID_AUTHORIZATION))


def _cert(client: "ClientConnection", user: str) -> None:
    sock = client.stream.sock
    cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    if not cert:
        raise RejectError(Reject(f'certificate authentication failed for user "{user}"', INVALID_AUTHORIZATION))
    common_names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    if user not in common_names:
        raise RejectError(Reject(f'certificate authentication failed for user "{user}"', INVALID_AUTHORIZATION,
                                 detail="The certificate's common name does not match the user name."))


def _cleartext(relay: "Relay", client: "ClientConnection", login: "Login") -> None:
    client.stream.sendall(_auth_request(3))
    body = _read_password_message(client)
    if not body or body[-1] != 0 or b"\x00" in body[:-1]:
        raise ProtocolViolation("malformed password packet")
    try:
        password = body[:-1].decode("utf-8")
    except UnicodeDecodeError:
        raise failed(role(login)) from None
    user = role(login)
    if not password:
        raise failed(user)  # PostgreSQL refuses empty passwords too
    verdict = relay.check_password(login, password)
    if verdict is None:
        secret = relay.get_credentials(login, user)
        verdict = verify_plain(password, secret, user, relay.derived_secrets)
    if not verdict:
        raise failed(user)
    relay.remember_secret(user, password)


def _bridged(relay: "Relay", client: "ClientConnection", login: "Login", method: str) -> None:
    """A bridged client (pgrelay.serverless): a cleartext password is requested whatever `method`
    says; trust takes it unread, a bearer token a plugin accepts stands in for it, and any other
    method checks it against the user's secret, which works for plaintext, md5 and SCRAM secrets."""
    if method in ("trust", "any"):
        client.stream.sendall(_auth_request(3))
        _read_password_message(client)
        return
    token = client.transport.bearer
    verdict = relay.check_bearer_token(login, token) if token else None
    if verdict is None:
        _cleartext(relay, client, login)
        return
    client.stream.sendall(_auth_request(3))
    _read_password_message(client)
    if not verdict:
        raise failed(role(login))


def _md5(relay: "Relay", client: "ClientConnection", login: "Login") -> None:
    salt = os.urandom(4)
    user = role(login)
    secret = relay.get_credentials(login, user)
    if secret is not None and ScramSecret.parse(secret) is not None:
        _scram(relay, client, login, secret)  # as in PostgreSQL: md5 means SCRAM for SCRAM secrets
        return
    client.stream.sendall(_auth_request(5, salt))
    body = _read_password_message(client)
    expected = md5_expected(secret, user, salt)
    answer = body[:-1] if body.endswith(b"\x00") else body
    if expected is None or len(answer) != 35 or not hmac.compare_digest(answer, expected):
        raise failed(user)
    relay.remember_secret(user, secret)


def _scram_failure(exc: ScramError) -> Exception:
    """Channel-binding failures are authorization errors as PostgreSQL reports them; the rest are
    malformed messages."""
    if "channel binding" in str(exc):
        return RejectError(Reject(str(exc), INVALID_AUTHORIZATION))
    return ProtocolViolation(f"malformed SCRAM message: {exc}")


def _scram(relay: "Relay", client: "ClientConnection", login: "Login", secret_text: str | None = None) -> None:
    user = role(login)
    if secret_text is None:
        secret_text = relay.get_credentials(login, user)
    secret = None
    if secret_text is not None:
        secret = ScramSecret.parse(secret_text)
        if secret is None and not (secret_text.startswith("md5") and len(secret_text) == 35) and secret_text:
            # Derived once per (user, password, salt, iterations), not on every attempt (issue 7).
            secret = relay.derived_secrets.get(user, secret_text, mock_salt(relay.mock_key, "plain:" + user),
                                               relay.scram_iterations)
    cbind = relay.client_tls.cbind if client.tls else None
    mechanisms = [SCRAM_PLUS_MECHANISM, SCRAM_MECHANISM] if cbind is not None else [SCRAM_MECHANISM]
    client.stream.sendall(_auth_request(10, b"".join(protocol.cstr(m) for m in mechanisms) + b"\x00"))
    server = ScramServer(secret, mock_salt(relay.mock_key, user), relay.scram_iterations, cbind)
    body = _read_password_message(client)
    nul = body.find(b"\x00")
    if nul <= 0 or nul + 5 > len(body):
        raise ProtocolViolation("malformed SASLInitialResponse")
    mechanism = body[:nul].decode("ascii", "replace")
    length = protocol.unpack_i32(body, nul + 1)[0]
    data = body[nul + 5:]
    if length == 0xFFFFFFFF or length != len(data):
        raise ProtocolViolation("SASLInitialResponse length does not match its data")
    if mechanism not in mechanisms:
        raise ProtocolViolation("client selected an invalid SASL authentication mechanism")
    try:
        server_first = server.first(mechanism, data)
    except ScramError as exc:
        raise _scram_failure(exc) from None
    client.stream.sendall(_auth_request(11, server_first))
    final = _read_password_message(client)
    try:
        server_final = server.final(final)
    except ScramError as exc:
        if "password authentication failed" in str(exc):
            raise failed(user) from None
        raise _scram_failure(exc) from None
    client.stream.sendall(_auth_request(12, server_final))
    relay.remember_secret(user, secret_text)
    if secret is not None and secret_text is not None and ScramSecret.parse(secret_text) is not None:
        relay.remember_scram_keys(user, secret, server.client_key)
