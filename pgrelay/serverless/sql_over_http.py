"""POST /sql: one Neon-style HTTP query or batch, run as a pgrelay client over a bridge and answered in JSON."""

from __future__ import annotations

import json
import struct
from urllib.parse import parse_qsl, unquote, urlsplit

import gevent

from pgrelay import protocol
from pgrelay.errors import ClientGone

from . import pgjson, responses
from .bridge import Transport, open_bridge

# What @neondatabase/serverless 1.2.0 appends to its connection strings; used when one has none.
DEFAULT_APPLICATION_NAME = ""  # the driver names itself in its connection string; curl and others need not
ISOLATION_LEVELS = {"Serializable": "SERIALIZABLE", "ReadUncommitted": "READ UNCOMMITTED",
                    "ReadCommitted": "READ COMMITTED", "RepeatableRead": "REPEATABLE READ"}
MAX_PARAMS = 65535          # Bind's parameter count is an int16
LOGIN_MESSAGE_LIMIT = 1 << 20  # no login message of pgrelay's is near this
CONTROL_MESSAGE_LIMIT = 1 << 24  # RowDescription, CommandComplete, errors, notices
CANCEL_WAIT = 2            # seconds to wait for pgrelay to deliver a cancel of an abandoned query
_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_FIELD = struct.Struct("!IhIhih")  # table OID, column number, type OID, type size, type modifier, format
DESCRIBE_PORTAL = protocol.message(b"D", b"P\x00")
EXECUTE_ALL = protocol.message(b"E", b"\x00" + _I32.pack(0))


class HttpError(Exception):
    """An answer other than 200: status, message and PostgreSQL's error fields (None: pgrelay's own)."""

    def __init__(self, status: int, message: str, fields: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.fields = status, message, fields


class Abandoned(HttpError):
    """An HttpError after which the bridge is closed without Terminate, mid-reply."""


class ResponseTooLarge(Exception):
    pass


class BridgeLost(Exception):
    """The bridged client's connection ended without an ErrorResponse."""


def handle(conn, request) -> tuple[int, list, bytes]:
    """Answer one POST /sql (called by endpoint.HttpConnection)."""
    body = conn.read_body()  # first: a keep-alive connection must have the whole request read
    limit = conn.relay.config.serverless_max_response_size
    try:
        options = parse_headers(request.headers)
        payload = parse_payload(body)
        out = run(conn, options, payload, limit)
    except HttpError as exc:
        return exc.status, [], responses.error_body(exc.message, exc.fields)
    except ResponseTooLarge:
        return 507, [], responses.error_body(f"response is too large (max is {limit} bytes)")
    except BridgeLost as exc:
        return 500, [], responses.error_body(str(exc))
    headers = []
    if "queries" in payload:  # Neon echoes the batch options (the driver ignores them)
        for name in (b"neon-batch-isolation-level", b"neon-batch-read-only", b"neon-batch-deferrable"):
            value = _header(request.headers, name)
            if value is not None:
                headers.append((name, value))
    return 200, headers, out


# -- request --------------------------------------------------------------------------------------

def _header(headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def parse_headers(headers) -> dict:
    """The Neon-* and Authorization headers; HttpError 400 for a bad one."""
    raw = _header(headers, b"neon-connection-string")
    options = parse_connection_string(raw)
    options["raw_text"] = _header(headers, b"neon-raw-text-output") == b"true"
    options["array_mode"] = _header(headers, b"neon-array-mode") == b"true"
    level = _header(headers, b"neon-batch-isolation-level")
    if level is not None:
        level = ISOLATION_LEVELS.get(level.decode("latin-1"))
        if level is None:
            raise HttpError(400, "invalid isolation level")
    options["isolation"] = level
    options["read_only"] = _header(headers, b"neon-batch-read-only") == b"true"
    options["deferrable"] = _header(headers, b"neon-batch-deferrable") == b"true"
    auth = _header(headers, b"authorization") or b""
    bearer = ""
    if auth[:7].lower() == b"bearer ":
        bearer = auth[7:].strip().decode("latin-1")
    options["bearer"] = bearer
    return options


def parse_connection_string(raw: bytes | None) -> dict:
    """user, password, database and application_name of a postgres:// or postgresql:// URL."""
    bad = HttpError(400, "invalid header: neon-connection-string")
    if not raw:
        raise bad
    try:
        url = urlsplit(raw.decode("utf-8"))
        user, password = url.username, url.password
    except (UnicodeDecodeError, ValueError):
        raise bad from None
    if url.scheme not in ("postgres", "postgresql") or not user:
        raise bad
    database = unquote(url.path[1:].split("/", 1)[0]) if url.path.startswith("/") else ""
    if not database:
        raise bad
    params = dict(parse_qsl(url.query, keep_blank_values=True))
    out = {"user": unquote(user), "password": unquote(password or ""), "database": database,
           "application_name": params.get("application_name") or DEFAULT_APPLICATION_NAME}
    if any("\x00" in out[k] for k in ("user", "password", "database", "application_name")):
        raise bad
    return out


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_payload(body: bytes) -> dict:
    """{"query", "params", "arrayMode"} or {"queries": [...]}, params already PostgreSQL text."""
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, f"could not parse the HTTP request body: {exc}") from None
    if isinstance(data, dict) and "query" in data:
        return _query(data)
    if isinstance(data, dict) and "queries" in data:
        queries = data["queries"]
        if not isinstance(queries, list):
            raise _shape("`queries` must be an array")
        return {"queries": [_query(q) for q in queries]}
    raise _shape('expected {"query": ..., "params": [...]} or {"queries": [...]}')


def _shape(why: str) -> HttpError:
    return HttpError(400, f"could not parse the HTTP request body: {why}")


def _query(data) -> dict:
    if not isinstance(data, dict) or not isinstance(data.get("query"), str):
        raise _shape("`query` must be a string")
    if "\x00" in data["query"]:
        raise _shape("`query` contains a NUL character")
    params = data.get("params", [])
    if not isinstance(params, list):
        raise _shape("`params` must be an array")
    if len(params) > MAX_PARAMS:
        raise _shape(f"more than {MAX_PARAMS} parameters")
    mode = data.get("arrayMode")
    if mode is not None and not isinstance(mode, bool):
        raise _shape("`arrayMode` must be a boolean")
    return {"query": data["query"], "params": [param_text(p) for p in params], "arrayMode": mode}


def param_text(value) -> str | None:
    """A JSON parameter as PostgreSQL text, as Neon's json_to_pg_text: strings as they are, null as
    NULL, numbers/bools/objects as JSON text, arrays as a {...} array literal."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _array_literal(value)
    return _compact(value)


def _array_literal(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, list):
        return "{" + ",".join(_array_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return _compact(_compact(value))  # an object is a quoted JSON string in the literal
    return _compact(value)  # strings quoted and escaped as JSON, numbers and booleans bare


_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


# -- execution ------------------------------------------------------------------------------------

class Reader:
    """Backend messages from the bridge, buffered (a bytearray: big rows are not copied over and over)."""

    def __init__(self, stream):
        self.stream = stream
        self.buf = bytearray()
        self.pos = 0

    def _fill(self) -> None:
        try:
            self.buf += self.stream.recv_some()
        except ClientGone:
            raise BridgeLost("the connection to the database was closed") from None

    def message(self, limit: int, row_limit: int) -> tuple[int, bytes]:
        """One message (type, body); ResponseTooLarge for a DataRow over `row_limit` bytes."""
        if self.pos > 65536:  # between messages only: offsets below are relative to pos
            del self.buf[:self.pos]
            self.pos = 0
        while len(self.buf) - self.pos < 5:
            self._fill()
        kind = self.buf[self.pos]
        length = protocol.unpack_i32(self.buf, self.pos + 1)[0]
        if length < 4:
            raise BridgeLost(f"invalid message length {length} from the database")
        if length - 4 > (row_limit if kind == 68 else limit):
            if kind == 68:
                raise ResponseTooLarge()
            raise BridgeLost(f"message of {length} bytes from the database is too long")
        end = self.pos + 1 + length
        while len(self.buf) < end:
            self._fill()
        body = bytes(self.buf[self.pos + 5:end])
        self.pos = end
        return kind, body


def run(conn, options: dict, payload: dict, limit: int) -> bytes:
    """Log in over a new bridge, run the payload and return the response body; the bridge is
    always closed (Terminate first, unless a query was abandoned mid-reply and cancelled)."""
    bridge = open_bridge(conn.relay, conn.peer, conn.http_listener,
                         Transport("http", conn.tls, bearer=options["bearer"], local=conn.local))
    session = Session(bridge, options, limit)
    terminate = True
    try:
        session.login()
        if "queries" in payload:
            results = session.batch(payload["queries"])
            return b'{"results":[' + b",".join(results) + b"]}"
        return session.query(payload)
    except BridgeLost:
        terminate = False
        raise
    except BaseException:  # too large, COPY FROM STDIN, the request timed out, a bug...
        if session.in_flight and session.key:
            # Abandoned mid-reply: cancel what runs, then pgrelay's recovery rolls the server back.
            terminate = False
            cancel(conn, session.key)
        raise
    finally:
        if terminate:
            try:
                bridge.sendall(protocol.TERMINATE)
            except ClientGone:
                pass
        bridge.close()


def cancel(conn, key: bytes) -> None:
    """Send pgrelay a CancelRequest for a bridged client's key and wait (a little) until it is
    delivered: pgrelay closes a cancel connection then, as PostgreSQL does."""
    try:
        stream = open_bridge(conn.relay, conn.peer, conn.http_listener, Transport("http", conn.tls, local=conn.local))
    except OSError:
        return
    try:
        with gevent.Timeout(CANCEL_WAIT, False):
            stream.sendall(protocol.cancel_request(key))
            while True:
                stream.recv_some()
    except ClientGone:
        pass
    finally:
        stream.close()


class Session:
    """One bridged client: login, then queries with the extended protocol (text in, text out)."""

    def __init__(self, bridge, options: dict, limit: int):
        self.bridge = bridge
        self.options = options
        self.reader = Reader(bridge)
        self.limit = limit
        self.size = 0  # bytes of response built so far
        self.key = b""  # BackendKeyData: pgrelay's cancel key for this client
        self.in_flight = False  # a query is sent and its ReadyForQuery has not come

    def send(self, data: bytes) -> None:
        try:
            self.bridge.sendall(data)
        except ClientGone:
            raise BridgeLost("the connection to the database was closed") from None

    def next(self, limit: int, row_limit: int, error: dict | None) -> tuple[int, bytes]:
        """The next message; a bridge that closes after an ErrorResponse (a FATAL one: query_timeout,
        a crashed server...) answers that error."""
        try:
            return self.reader.message(limit, row_limit)
        except BridgeLost:
            if error is None:
                raise
            self.in_flight = False  # nothing to cancel: the client is gone
            raise Abandoned(400, error.get("M", ""), error) from None

    def login(self) -> None:
        o = self.options
        self.send(protocol.startup_message({"user": o["user"], "database": o["database"],
                                            "application_name": o["application_name"],
                                            "client_encoding": "UTF8"}))
        while True:
            kind, body = self.reader.message(LOGIN_MESSAGE_LIMIT, LOGIN_MESSAGE_LIMIT)
            if kind == 82:  # 'R'
                code = protocol.unpack_i32(body)[0] if len(body) >= 4 else -1
                if code == 3:
                    self.send(protocol.password_message(protocol.cstr(o["password"])))
                elif code != 0:
                    raise BridgeLost(f"unexpected authentication request {code} from pgrelay")
            elif kind == 69:  # 'E'
                fields = protocol.parse_fields(body)
                raise HttpError(400, fields.get("M", "login failed"), fields)
            elif kind == 75:  # 'K'
                self.key = body
            elif kind == 90:  # 'Z'
                return
            # S (ParameterStatus), N (notices), v: nothing to keep

    def simple(self, sql: str) -> dict | None:
        """Run BEGIN/COMMIT/ROLLBACK; the error's fields, or None."""
        self.send(protocol.query(sql))
        self.in_flight = True
        error = None
        while True:
            kind, body = self.next(CONTROL_MESSAGE_LIMIT, CONTROL_MESSAGE_LIMIT, error)
            if kind == 69:
                error = protocol.parse_fields(body)
            elif kind == 90:
                self.in_flight = False
                return error

    def batch(self, queries: list[dict]) -> list[bytes]:
        if not queries:
            return []
        o = self.options
        begin = "BEGIN"
        if o["isolation"]:
            begin += " ISOLATION LEVEL " + o["isolation"]
        if o["read_only"]:
            begin += " READ ONLY"
        if o["deferrable"]:
            begin += " DEFERRABLE"
        error = self.simple(begin)
        if error is not None:
            raise HttpError(400, error.get("M", ""), error)
        results = []
        for q in queries:
            try:
                results.append(self.query(q))
            except Abandoned:
                raise
            except HttpError:
                self.simple("ROLLBACK")
                raise
        error = self.simple("COMMIT")
        if error is not None:
            raise HttpError(400, error.get("M", ""), error)
        return results

    def query(self, q: dict) -> bytes:
        """One query's result JSON (fields, rows, command, rowCount, rowAsArray)."""
        params = q["params"]
        bind = [b"\x00\x00", _I16.pack(0), _I16.pack(len(params))]
        for p in params:
            if p is None:
                bind.append(b"\xff\xff\xff\xff")
            else:
                data = p.encode("utf-8", "surrogatepass")
                bind.append(_I32.pack(len(data)) + data)
        bind.append(_I16.pack(0))
        self.send(protocol.message(b"P", b"\x00" + protocol.cstr(q["query"]) + b"\x00\x00")
                  + protocol.message(b"B", b"".join(bind)) + DESCRIBE_PORTAL + EXECUTE_ALL + protocol.SYNC)
        self.in_flight = True
        array_mode = self.options["array_mode"] if q["arrayMode"] is None else q["arrayMode"]
        raw_text = self.options["raw_text"]
        fields: list[dict] = []
        names: list[str] = []
        types: list[int] = []
        rows: list[str] = []
        command, row_count, error = "", None, None
        while True:
            # The wire size only guards the read; the JSON built is what counts against the limit.
            kind, body = self.next(CONTROL_MESSAGE_LIMIT, 2 * max(self.limit - self.size, 0) + 65536, error)
            if kind == 68:  # 'D'
                values = protocol.data_row(body)
                if not raw_text:
                    values = [pgjson.to_json(v, t) for v, t in zip(values, types)]
                    row = values if array_mode else dict(zip(names, values))
                    text = pgjson.dumps(row)
                else:
                    row = values if array_mode else dict(zip(names, values))
                    text = _compact(row)
                self.size += len(text) + 1
                if self.size > self.limit:
                    raise ResponseTooLarge()
                rows.append(text)
            elif kind == 84:  # 'T'
                fields, names, types = _row_description(body)
                self.size += len(_compact(fields))
            elif kind == 67:  # 'C'
                command, row_count = _command_tag(body)
            elif kind == 69:  # 'E'
                error = protocol.parse_fields(body)
            elif kind == 71:  # 'G' CopyInResponse: the bridge is abandoned (the Sync sent already
                # is ignored in copy-in mode); pgrelay's recovery cleans the server up.
                raise Abandoned(400, "COPY FROM STDIN is not supported over HTTP")
            elif kind == 90:  # 'Z'
                self.in_flight = False
                break
            # 1 2 n (Parse/Bind complete, NoData), I (empty query), s, N, S, A, H, d, c: ignored
        if error is not None:
            raise HttpError(400, error.get("M", ""), error)
        if self.size > self.limit:
            raise ResponseTooLarge()
        head = '{"fields":' + _compact(fields) + ',"rows":['
        tail = ('],"command":' + _compact(command) + ',"rowCount":' + _compact(row_count)
                + ',"rowAsArray":' + _compact(array_mode) + "}")
        return (head + ",".join(rows) + tail).encode("utf-8", "surrogatepass")


def _row_description(body: bytes) -> tuple[list[dict], list[str], list[int]]:
    count = _I16.unpack_from(body)[0]
    pos = 2
    fields, names, types = [], [], []
    for _ in range(count):
        nul = body.index(b"\x00", pos)
        name = body[pos:nul].decode("utf-8", "replace")
        table, column, type_oid, size, modifier, _fmt = _FIELD.unpack_from(body, nul + 1)
        pos = nul + 1 + _FIELD.size
        fields.append({"name": name, "dataTypeID": type_oid, "tableID": table, "columnID": column,
                       "dataTypeSize": size, "dataTypeModifier": modifier, "format": "text"})
        names.append(name)
        types.append(type_oid)
    return fields, names, types


def _command_tag(body: bytes) -> tuple[str, int | None]:
    """CommandComplete's first word, and its last number (INSERT 0 5 -> 5) or None."""
    words = body.rstrip(b"\x00").decode("utf-8", "replace").split()
    if not words:
        return "", None
    last = words[-1]
    return words[0], (int(last) if len(words) > 1 and last.isdigit() else None)
