"""Error translation: pgrelay faults to their SQLSTATE, anything else to XX000 without internals."""

from __future__ import annotations

from pgrelay import hookimpl
from pgrelay.errors import INTERNAL_ERROR, PgRelayError, Reject, RejectError


@hookimpl(trylast=True)
def pgrelay_translate_error(relay, error, phase, client):
    if isinstance(error, RejectError):
        return error.decision
    if isinstance(error, PgRelayError):
        return error.reject()
    return Reject("internal error", INTERNAL_ERROR)
