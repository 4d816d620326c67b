"""HTTP responses in Neon's shapes: the JSON error body with every PostgreSQL error field, and CORS."""

from __future__ import annotations

import json

# The keys of Neon's error body, in its order; `message` is PostgreSQL's primary message.
ERROR_KEYS = ("message", "code", "detail", "hint", "position", "internalPosition", "internalQuery", "severity",
              "where", "table", "column", "schema", "dataType", "constraint", "file", "line", "routine")
# PostgreSQL's ErrorResponse field codes for those keys (message M and code C are required).
FIELD_CODES = {"message": "M", "code": "C", "detail": "D", "hint": "H", "position": "P", "internalPosition": "p",
               "internalQuery": "q", "severity": "S", "where": "W", "table": "t", "column": "c", "schema": "s",
               "dataType": "d", "constraint": "n", "file": "F", "line": "L", "routine": "R"}
CORS = [(b"access-control-allow-origin", b"*")]
OPTIONS_HEADERS = CORS + [
    (b"allow", b"OPTIONS, POST"),
    (b"access-control-allow-headers", b"Authorization, Neon-Connection-String, Neon-Raw-Text-Output, Neon-Array-Mode, "
                                      b"Neon-Pool-Opt-In, Neon-Batch-Read-Only, Neon-Batch-Isolation-Level, "
                                      b"Neon-Batch-Deferrable"),
    (b"access-control-max-age", b"86400"),
]


def error_body(message: str, fields: dict[str, str] | None = None) -> bytes:
    """Neon's error JSON: from PostgreSQL's ErrorResponse fields (code -> value), or for an error
    of pgrelay's own (no fields: code and severity "", the rest null)."""
    if fields is None:
        out = {key: None for key in ERROR_KEYS}
        out.update(message=message, code="", severity="")
    else:
        out = {key: fields.get(code) for key, code in FIELD_CODES.items()}
        out["message"] = fields.get("M", message)
    return json.dumps(out, ensure_ascii=False).encode()
