"""Refusals as values (Reject) and pgrelay's fault exceptions, with their SQLSTATEs."""

from __future__ import annotations

from dataclasses import dataclass

from . import protocol

# SQLSTATE codes pgrelay uses itself.
PROTOCOL_VIOLATION = "08P01"
CONNECTION_FAILURE = "08006"
CONNECTION_EXCEPTION = "08000"
INVALID_AUTHORIZATION = "28000"
INVALID_PASSWORD = "28P01"
TOO_MANY_CONNECTIONS = "53300"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_CATALOG_NAME = "3D000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
INTERNAL_ERROR = "XX000"
CONFIG_FILE_ERROR = "F0000"


@dataclass(frozen=True)
class Reject:
    """A refusal sent to the client as an ErrorResponse.

    Severity FATAL closes the client connection after sending; ERROR keeps it.
    PgBouncer sends its own errors as FATAL 08P01 unless a code is given.
    """

    message: str
    sqlstate: str = PROTOCOL_VIOLATION
    severity: str = "FATAL"
    detail: str | None = None
    hint: str | None = None

    def encode(self) -> bytes:
        return protocol.error_response(self.severity, self.sqlstate, self.message,
                                       self.detail, self.hint)

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Reject":
        """A Reject that relays a server's ErrorResponse fields (SQLSTATE defaults to XX000)."""
        return cls(message=fields.get("M", "unknown server error"),
                   sqlstate=fields.get("C") or INTERNAL_ERROR,
                   severity=fields.get("S", "FATAL") if fields.get("S") in ("ERROR", "FATAL", "PANIC") else "FATAL",
                   detail=fields.get("D"), hint=fields.get("H"))


class PgRelayError(Exception):
    """Base of pgrelay's faults. `reject` is what a client is told by default."""

    sqlstate = PROTOCOL_VIOLATION

    def reject(self) -> Reject:
        return Reject(str(self), self.sqlstate)


class ConfigError(PgRelayError):
    """The configuration cannot be loaded; the message names the file and line."""

    sqlstate = CONFIG_FILE_ERROR


class ProtocolViolation(PgRelayError):
    """A peer broke the wire protocol (bad length, unknown type, out-of-order message)."""


class ClientGone(PgRelayError):
    """The client closed its socket or failed while pgrelay was talking to it."""


class LoginTimeout(PgRelayError):
    """The client did not finish logging in within client_login_timeout."""


class ServerError(PgRelayError):
    """A server connection failed: connect, login, or I/O. `fields` holds its ErrorResponse, if any."""

    sqlstate = CONNECTION_FAILURE

    def __init__(self, message: str, fields: dict[str, str] | None = None, routing: bool = False):
        super().__init__(message)
        self.fields = fields or {}
        self.routing = routing  # no usable host was chosen: nothing to back off from

    def reject(self) -> Reject:
        if self.fields:
            return Reject.from_fields(self.fields)
        return Reject(str(self), self.sqlstate)


class RejectError(PgRelayError):
    """Carries a Reject decision out of a deep call (raised only by the core, never by hooks)."""

    def __init__(self, decision: Reject):
        super().__init__(decision.message)
        self.decision = decision

    def reject(self) -> Reject:
        return self.decision
