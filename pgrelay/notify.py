"""LISTEN/NOTIFY in transaction and statement pooling: one listening server per pool, whose notifications fan out to the clients that listen.

A client's simple Query that is one LISTEN, UNLISTEN or UNLISTEN * statement, sent while it has no
server linked (between transactions), is answered by pgrelay: the channel is registered with the
pool's listening server (`Listening`), a server connection pgrelay owns that runs LISTEN for the
first listener of a channel and UNLISTEN when the last leaves. The client's CommandComplete is sent
once the listening server's LISTEN has completed, so any NOTIFY committed after the client's
LISTEN returned reaches it, as in PostgreSQL. Every NotificationResponse the listening server gets
(the sender's pid, channel, payload) goes to each client listening on the channel, in the order
the server sent them, written only at a message boundary of what pgrelay sends the client and, as
PostgreSQL does, between transactions: at once when it has no server linked (or a pinned server
owing nothing), else held until the ReadyForQuery that ends its transaction (bounded by
notify_queue_size; past it the client is disconnected).

The extended protocol is served the same way (`extended`): a batch that runs one such statement,
[Parse] [Describe] Bind [Describe] Execute Sync in one read, unnamed and parsed in the batch or
named (pgrelay.prepared), gets PostgreSQL's replies from pgrelay; if a server is linked (asyncpg
sends Parse, Describe, Flush first, which goes to a server), that server gets only the Sync. A
Parse of one read alone (asyncpg may write it apart from its Bind, Execute, Sync) owes no reply,
so it is held until the next read and joins it.

Inside a transaction, a LISTEN of a channel the client has is answered here and an UNLISTEN takes
effect at COMMIT (`linked`, `ended`); a LISTEN of a new channel there, in a multi-statement Query,
or in a Query from a client with named prepared statements reaches the client's server, where
session_state decides (pin, error or allow). The listening server is not
one of the pool's default_pool_size servers; it counts against max_db_connections and
max_user_connections like any server. Lost, it is reconnected and re-LISTENs every channel; what
was notified while it was down is lost (logged).
"""

from __future__ import annotations

import codecs
import collections
import functools
import logging
import time
from typing import TYPE_CHECKING, Callable

import gevent
from gevent.queue import Queue

from . import protocol, server_login
from .errors import CONNECTION_FAILURE, TOO_MANY_CONNECTIONS, ClientGone, ProtocolViolation, Reject, ServerError
from .pool import CL_CLOSED, CL_IDLE, SV_ACTIVE

if TYPE_CHECKING:
    from .client import ClientConnection
    from .pool import Pool

log = logging.getLogger("pgrelay.notify")

# The first byte of a Query body that may begin a LISTEN or UNLISTEN statement: L, U (either
# case), whitespace and the start of a comment. The client hot path checks only this table.
TRIGGER = bytes(1 if b in b"LlUu \t\n\r\f\v-/" else 0 for b in range(256))
NAMEDATALEN = 64
NAME_TOO_LONG = "42622"
PROGRAM_LIMIT_EXCEEDED = "54000"
APPLICATION_NAME = "pgrelay listening server"
RETRY_FLUSH = 0.05  # seconds between checks whether held notifications may go out
MAX_STATEMENT = 16384  # a longer Query is not looked at (a LISTEN that long goes to a server)
MAX_NOTIFY_MESSAGE = 1 << 20  # a NotificationResponse is at most ~8 kB (payload) + 64 (channel)
_I32 = protocol._I32.unpack_from
_READY_IDLE = protocol.READY_IDLE
_IDLE, _IN_TX = 73, 84  # ReadyForQuery status bytes 'I' and 'T'
_COMMIT_TAIL = b"C\x00\x00\x00\x0bCOMMIT\x00" + protocol.READY_IDLE
# Keywords that cannot be a ColId (reserved and type/function-name keywords, PostgreSQL 15 to 18):
# LISTEN select is a syntax error there, so pgrelay lets the server say so.
NOT_COLID = frozenset("""ALL ANALYSE ANALYZE AND ANY ARRAY AS ASC ASYMMETRIC AUTHORIZATION BINARY BOTH CASE CAST
CHECK COLLATE COLLATION COLUMN CONCURRENTLY CONSTRAINT CREATE CROSS CURRENT_CATALOG CURRENT_DATE CURRENT_ROLE
CURRENT_SCHEMA CURRENT_TIME CURRENT_TIMESTAMP CURRENT_USER DEFAULT DEFERRABLE DESC DISTINCT DO ELSE END EXCEPT FALSE
FETCH FOR FOREIGN FREEZE FROM FULL GRANT GROUP HAVING ILIKE IN INITIALLY INNER INTERSECT INTO IS ISNULL JOIN LATERAL
LEADING LEFT LIKE LIMIT LOCALTIME LOCALTIMESTAMP NATURAL NOT NOTNULL NULL OFFSET ON ONLY OR ORDER OUTER OVERLAPS
PLACING PRIMARY REFERENCES RETURNING RIGHT SELECT SESSION_USER SIMILAR SOME SYMMETRIC SYSTEM_USER TABLE TABLESAMPLE
THEN TO TRAILING TRUE UNION UNIQUE USER USING VARIADIC VERBOSE WHEN WHERE WINDOW WITH""".lower().split())
_SPACE = " \t\n\r\f\v"


# -- encodings ------------------------------------------------------------------------------------

_PG_CODECS = {"UTF8": "utf-8", "UNICODE": "utf-8", "SQLASCII": "", "LATIN1": "latin-1", "LATIN2": "iso8859-2",
              "LATIN3": "iso8859-3", "LATIN4": "iso8859-4", "LATIN5": "iso8859-9", "LATIN6": "iso8859-10",
              "LATIN7": "iso8859-13", "LATIN8": "iso8859-14", "LATIN9": "iso8859-15", "LATIN10": "iso8859-16",
              "ISO88595": "iso8859-5", "ISO88596": "iso8859-6", "ISO88597": "iso8859-7", "ISO88598": "iso8859-8",
              "EUCJP": "euc_jp", "EUCKR": "euc_kr", "EUCCN": "gb2312", "SJIS": "shift_jis", "SHIFTJIS": "shift_jis",
              "BIG5": "big5", "GBK": "gbk", "GB18030": "gb18030", "KOI8R": "koi8_r", "KOI8": "koi8_r",
              "KOI8U": "koi8_u", "UHC": "cp949", "JOHAB": "johab"}


@functools.lru_cache(maxsize=64)
def codec(name: str | None) -> str | None:
    """The Python codec of a PostgreSQL encoding name ('' for SQL_ASCII: bytes as they are), or
    None if pgrelay cannot convert it (LISTEN then goes to the client's server)."""
    if not name:
        return "utf-8"
    key = "".join(ch for ch in name.upper() if ch.isalnum())
    if key in _PG_CODECS:
        return _PG_CODECS[key]
    if key.startswith("WIN") and key[3:].isdigit():
        key = "CP" + key[3:]
    try:
        return codecs.lookup(key).name
    except LookupError:
        return None


# -- the statement -------------------------------------------------------------------------------

class Statement:
    """A LISTEN/UNLISTEN statement as PostgreSQL would run it: `channel` is the name after case
    folding and truncation, encoded as the listening server's client_encoding (None: UNLISTEN *);
    `notice` is the truncation NOTICE PostgreSQL's lexer would send, or b""."""

    __slots__ = ("command", "channel", "notice")

    def __init__(self, command: str, channel: bytes | None, notice: bytes):
        self.command, self.channel, self.notice = command, channel, notice


def _skip_space(text: str, pos: int) -> int:
    """Past whitespace and comments (-- to end of line, nested /* */); -1 for an unclosed comment."""
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch in _SPACE:
            pos += 1
        elif text.startswith("--", pos):
            end = text.find("\n", pos)
            pos = n if end < 0 else end + 1
        elif text.startswith("/*", pos):
            depth, pos = 1, pos + 2
            while depth:
                if pos >= n:
                    return -1
                if text.startswith("/*", pos):
                    depth, pos = depth + 1, pos + 2
                elif text.startswith("*/", pos):
                    depth, pos = depth - 1, pos + 2
                else:
                    pos += 1
        else:
            break
    return pos


def _ident_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch == "_") or not ch.isascii()


def _ident_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "_$") or not ch.isascii()


def _word(text: str, pos: int) -> tuple[str, int]:
    end = pos
    if end < len(text) and _ident_start(text[end]):
        end += 1
        while end < len(text) and _ident_char(text[end]):
            end += 1
    return text[pos:end], end


def parse(body: bytes, client_codec: str, db_codec: str, server_codec: str) -> Statement | None:
    """The Query body (text and its NUL) if it is exactly one LISTEN name, UNLISTEN name or
    UNLISTEN * statement (an optional ';', whitespace and comments around it), else None: the
    statement then goes to a server, which runs or refuses it (syntax errors included)."""
    if not body or body[-1] != 0 or 0 in body[:-1]:
        return None
    try:
        text = body[:-1].decode(client_codec or "latin-1")
    except UnicodeDecodeError:
        return None
    pos = _skip_space(text, 0)
    if pos < 0:
        return None
    word, pos = _word(text, pos)
    command = word.upper()
    if command not in ("LISTEN", "UNLISTEN"):
        return None
    pos = _skip_space(text, pos)
    if pos < 0 or pos >= len(text):
        return None
    if text[pos] == "*":
        if command != "UNLISTEN":
            return None
        name, pos = None, pos + 1
    elif text[pos] == '"':
        parts, pos = [], pos + 1
        while True:
            end = text.find('"', pos)
            if end < 0:
                return None
            parts.append(text[pos:end])
            pos = end + 1
            if text.startswith('"', pos):  # "" is a quote inside the name
                parts.append('"')
                pos += 1
                continue
            break
        name = "".join(parts)
        if not name:
            return None  # zero-length delimited identifier: the server's error
    else:
        name, pos = _word(text, pos)
        if not name or name.lower() in NOT_COLID or name.upper() in ("U", "E") and text.startswith("&", pos):
            return None
        if not name.isascii() and db_codec not in ("utf-8", ""):
            return None  # single-byte encodings fold high-bit letters by locale: let the server do it
        name = "".join(ch.lower() if "A" <= ch <= "Z" else ch for ch in name)
    end = _skip_space(text, pos)
    if end >= 0 and end < len(text) and text[end] == ";":
        end = _skip_space(text, end + 1)
    if end != len(text):
        return None  # more statements, or something that is not a name
    notice = b""
    if name is None:
        return Statement(command, None, notice)
    try:
        raw = name.encode(db_codec or "latin-1")
    except UnicodeEncodeError:
        return None
    if len(raw) >= NAMEDATALEN:
        cut, size = [], 0
        for ch in name:  # pg_mbcliplen: whole characters only
            width = len(ch.encode(db_codec or "latin-1"))
            if size + width > NAMEDATALEN - 1:
                break
            cut.append(ch)
            size += width
        short = "".join(cut)
        notice = protocol.message(b"N", b"SNOTICE\x00VNOTICE\x00C" + NAME_TOO_LONG.encode() + b"\x00M"
                                  + f'identifier "{name}" will be truncated to "{short}"'.encode(
                                      client_codec or "latin-1", "replace") + b"\x00\x00")
        name = short
    try:
        channel = name.encode(server_codec or "latin-1")
    except UnicodeEncodeError:
        return None
    return Statement(command, channel, notice)


def _quoted(channel: bytes) -> bytes:
    return b'"' + channel.replace(b'"', b'""') + b'"'


# -- the client side -----------------------------------------------------------------------------

class ClientListen:
    """What one client listens on (channels, as the listening server spells them) and the
    notifications held for it until it is at a message boundary."""

    __slots__ = ("hub", "channels", "queue", "queued", "pending", "retry", "parsed", "held")

    def __init__(self, hub: "Listening"):
        self.hub = hub
        self.channels: set[bytes] = set()
        self.queue: collections.deque[tuple[bytes, bytes]] = collections.deque()  # (channel, message)
        self.queued = 0  # bytes in queue
        self.pending: list[bytes | None] = []  # UNLISTENs (None: *) of an open transaction, applied at COMMIT
        self.retry = False  # a later check of held notifications is due (_retry_flush)
        self.parsed = None  # an unnamed LISTEN/UNLISTEN its linked server was sent alone in its last read (`linked`)
        self.held = None    # a Parse of one, read alone and not yet sent: it goes with the next read (`linked`)


def enabled(client: "ClientConnection") -> bool:
    """Whether this client's LISTEN may be served by the pool's listening server."""
    pool = client.pool
    return bool(pool.mode and pool.reuse and not pool.per_client
                and client.relay.config.values.get("session_state", "pin") != "allow")



def _codecs(client, hub) -> tuple | None:
    """(client, database, server) codecs to read a LISTEN's text with, or None if one is unknown."""
    welcome = dict(client.pool.welcome or ())
    server_codec = hub.codec if hub is not None else codec(welcome.get("client_encoding"))
    db_codec = codec(welcome.get("server_encoding"))
    client_codec = codec(client_encoding(client))
    if client_codec is None or server_codec is None or db_codec is None:
        return None
    return client_codec, db_codec, server_codec

def intercept(client: "ClientConnection", data: bytes, queries: int = 1) -> bool:
    """Client hot path, after the cheap trigger (one simple Query, or an unnamed Parse, starting
    with TRIGGER, no server linked): serve it here if it is a LISTEN/UNLISTEN statement. Returns
    whether it was taken."""
    if data[0] == 80:  # Parse: the extended protocol
        if queries == 1:
            return extended(client, data)
        if not queries:
            parse_only(client, data)
        return False
    if len(data) > MAX_STATEMENT or _I32(data, 1)[0] + 1 != len(data) or not _looks_like_listen(data):
        return False  # not exactly one whole message in this read, or not a LISTEN/UNLISTEN
    if client.state != CL_IDLE or client.server is not None or client.skip or client.carry \
            or client.open_batch or not enabled(client):
        return False
    pool = client.pool
    hub = pool.listening
    codecs = _codecs(client, hub)
    if codecs is None:
        return False
    stmt = parse(bytes(data[5:]), *codecs)
    if stmt is None:
        return False
    if hub is None:
        hub = pool.listening = Listening(pool)
    client.query_start = 0.0  # no server round: nothing for PoolStats to time
    listen = client.listen
    if stmt.command == "UNLISTEN":
        if listen is not None:
            if stmt.channel is None:
                hub.forget(client)
            else:
                hub.unlisten(client, stmt.channel)
        client.write(stmt.notice + b"C\x00\x00\x00\x0dUNLISTEN\x00" + _READY_IDLE)
        return True
    if listen is None:
        listen = client.listen = ClientListen(hub)
    flush(client)
    reply = stmt.notice + b"C\x00\x00\x00\x0bLISTEN\x00" + _READY_IDLE
    client.stop_reading()  # what the client sends next waits until this LISTEN is answered

    def done(error: Reject | None) -> None:
        if client.state == CL_CLOSED:
            return
        if error is not None:
            client.write(stmt.notice + error.encode() + _READY_IDLE)
        else:
            client.write(reply)
        client.start_reading()

    hub.listen(client, stmt.channel, done)
    return True


# -- the extended protocol ---------------------------------------------------------------------------

_SYNC = b"S\x00\x00\x00\x04"
_PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_BIND_COMPLETE = b"2\x00\x00\x00\x04"
_NO_DATA = b"n\x00\x00\x00\x04"
_NO_PARAMS = b"t\x00\x00\x00\x06\x00\x00"
_NO_TYPES = b"\x00\x00"


def _query_of(body: bytes) -> bytes | None:
    """A Parse body after the name (query, NUL, parameter types): the query and its NUL if no
    parameter type is declared (a LISTEN has none), else None."""
    nul = body.find(b"\x00")
    if nul < 0 or body[nul + 1:] != _NO_TYPES:
        return None
    return body[:nul + 1]


def _bind_ok(body: bytes) -> bytes | None:
    """The statement name of a Bind to the unnamed portal with no parameters (any format codes,
    as PostgreSQL ignores result formats of a statement that returns no rows), else None."""
    if not body or body[0] != 0:
        return None
    nul = body.find(b"\x00", 1)
    if nul < 0:
        return None
    pos = nul + 1
    if pos + 2 > len(body):
        return None
    nformats = int.from_bytes(body[pos:pos + 2], "big")
    if nformats > 1:
        return None
    pos += 2 + 2 * nformats
    if body[pos:pos + 2] != b"\x00\x00":
        return None  # parameters: PostgreSQL's error comes from a server
    pos += 2
    if pos + 2 > len(body):
        return None
    pos += 2 + 2 * int.from_bytes(body[pos:pos + 2], "big")
    return body[1:nul] if pos == len(body) else None


def _batch(data: bytes, names, parsed: bytes | None = None):
    """`data` as one extended-protocol batch that runs one LISTEN/UNLISTEN statement and ends with
    its Sync: [Parse ''] [Describe S] Bind [Describe P] Execute Sync (Flushes anywhere), the
    statement unnamed and parsed in this batch (or, `parsed`, alone in the read before), or, with
    `names` (pgrelay.prepared), a named one.
    Returns (query and NUL, whether it was parsed here, the replies before Execute's as a list with
    None where the Parse's NOTICE goes) or None."""
    n = len(data)
    if n > MAX_STATEMENT or data[-5:] != _SYNC:
        return None
    preparsed = parsed
    pos, query, parsed, bound, executed, replies = 0, None, False, None, False, []
    while pos + 5 <= n:
        kind = data[pos]
        end = pos + 1 + _I32(data, pos + 1)[0]
        if end > n or end < pos + 5:
            return None
        body = data[pos + 5:end]
        if kind == 80:  # Parse
            if query is not None or not body or body[0] != 0:
                return None
            query = _query_of(body[1:])
            if query is None:
                return None
            parsed = True
            replies += (None, _PARSE_COMPLETE)
        elif kind == 68 and body[:1] == b"S" and not bound:  # Describe statement
            name = body[1:-1]
            if name:
                stmt = names.get(name) if names is not None else None
                if stmt is None or query is not None and _query_of(stmt.body) != query:
                    return None
                query = _query_of(stmt.body)
            if query is None or body[-1] != 0:
                return None
            replies.append(_NO_PARAMS + _NO_DATA)
        elif kind == 66:  # Bind
            name = _bind_ok(body)
            if name is None or bound is not None:
                return None
            if name:
                stmt = names.get(name) if names is not None else None
                if stmt is None or query is not None and _query_of(stmt.body) != query:
                    return None
                query = _query_of(stmt.body)
            elif not parsed:
                if preparsed is None:
                    return None  # the unnamed statement of an earlier batch is the server's
                query = preparsed
            if query is None:
                return None
            bound = name
            replies.append(_BIND_COMPLETE)
        elif kind == 68 and body == b"P\x00" and bound is not None and not executed:  # Describe portal
            replies.append(_NO_DATA)
        elif kind == 69:  # Execute
            if bound is None or executed or body[:1] != b"\x00" or len(body) != 5:
                return None
            executed = True
        elif kind == 72:  # Flush
            if end != pos + 5:
                return None
        elif kind == 83:  # Sync: the last message
            if end != n or not executed:
                return None
        else:
            return None
        pos = end
    if pos != n or not executed:
        return None
    return query, parsed, replies


def extended(client: "ClientConnection", data: bytes, server=None, names=None, parsed: bytes | None = None) -> bool:
    """An extended-protocol LISTEN/UNLISTEN batch (`_batch`), served by the listening server as the
    simple Query is (`intercept`): with no server linked, every reply comes from pgrelay; with one
    linked (an earlier Parse ... Flush of the batch went there, or inside a transaction), pgrelay
    writes the replies up to the Execute's and the server gets only the Sync, whose ReadyForQuery
    ends the batch as it would have. The server never runs a LISTEN, so nothing pins; an UNLISTEN
    with a server linked runs there as well (as a Query's does).
    Returns whether the batch was taken."""
    if client.skip or client.carry or not enabled(client):
        return False
    if server is None:
        if client.state != CL_IDLE or client.server is not None or client.open_batch:
            return False
        txstatus = _IDLE
    else:
        txstatus = server.txstatus
        if server.state != SV_ACTIVE or server.expect or server.skip or server.carry or server.out is not None \
                or server.pfilter or txstatus not in (_IDLE, _IN_TX):
            return False
    found = _batch(data, names, parsed)
    if found is None:
        return False
    query, parsed, replies = found
    pool = client.pool
    hub = pool.listening
    codecs = _codecs(client, hub)
    if codecs is None:
        return False
    stmt = parse(query, *codecs)
    if stmt is None:
        return False
    listen = client.listen
    if server is not None and stmt.command == "UNLISTEN":
        # As the simple Query: it runs on the server too (a pinned server may listen itself), and
        # ends the listening server's delivery now, or at COMMIT inside a transaction.
        if listen is not None:
            if txstatus == _IDLE:
                _unlisten(client, stmt.channel)
            else:
                listen.pending.append(stmt.channel)
        return False
    if txstatus == _IN_TX and (listen is None or stmt.channel not in listen.channels):
        return False  # a new channel inside a transaction is the server's (session_state), as a Query's
    # The lexer's truncation NOTICE comes with the Parse (none if the statement was parsed earlier).
    head = b"".join((stmt.notice if parsed else b"") if r is None else r for r in replies)

    def finish(tail: bytes) -> None:
        if client.state == CL_CLOSED:
            return
        if server is None or client.server is not server or server.state != SV_ACTIVE:
            client.write(head + tail + _READY_IDLE)
        else:
            client.write(head + tail)
            client.open_batch = 0
            server.expect += 1
            pool.stats.bytes_received += len(data)
            server.write(_SYNC, client)

    if server is None:
        client.query_start = 0.0  # no server round: nothing for PoolStats to time
    if stmt.command == "UNLISTEN":
        if listen is not None:
            _unlisten(client, stmt.channel)
        finish(b"C\x00\x00\x00\x0dUNLISTEN\x00")
        return True
    if txstatus == _IN_TX:  # a channel it has (a no-op in PostgreSQL too): nothing to wait for
        finish(b"C\x00\x00\x00\x0bLISTEN\x00")
        return True
    if hub is None:
        hub = pool.listening = Listening(pool)
    if listen is None:
        listen = client.listen = ClientListen(hub)
    if server is None:
        flush(client)
    client.stop_reading()  # what the client sends next waits until this LISTEN is answered

    def done(error: Reject | None) -> None:
        if client.state == CL_CLOSED:
            return
        finish(error.encode() if error is not None else b"C\x00\x00\x00\x0bLISTEN\x00")
        client.start_reading()

    hub.listen(client, stmt.channel, done)
    return True


def parse_alone(data: bytes) -> bytes | None:
    """The query of a read that is only a Parse of an unnamed LISTEN/UNLISTEN (with a Describe of
    it and a Flush, as asyncpg prepares), else None."""
    if len(data) > MAX_STATEMENT or data[5] != 0:
        return None
    end = 1 + _I32(data, 1)[0]
    query = _query_of(data[6:end]) if end <= len(data) else None
    if query is None or not _looks_like_listen(b"Q\x00\x00\x00\x00" + query):
        return None
    rest = data[end:]
    for tail in (b"D\x00\x00\x00\x06S\x00", b"H\x00\x00\x00\x04"):
        if rest.startswith(tail):
            rest = rest[len(tail):]
    return query if not rest else None


def parse_only(client: "ClientConnection", data: bytes) -> None:
    """A read that parses an unnamed LISTEN/UNLISTEN and leaves its batch open (Parse, Describe,
    Flush: asyncpg's prepare): it goes to a server as usual, and the client counts as a listener
    so that the Bind, Execute and Sync that follow on that server are served here (`linked`)."""
    query = parse_alone(data) if enabled(client) else None
    if query is None:
        if client.listen is not None:
            client.listen.parsed = None
        return
    if client.listen is None:
        pool = client.pool
        hub = pool.listening
        if hub is None:
            hub = pool.listening = Listening(pool)
        client.listen = ClientListen(hub)
    client.listen.parsed = query


def _looks_like_listen(data: bytes) -> bool:
    """LISTEN or UNLISTEN after leading whitespace, or a leading comment (then parse decides)."""
    i, n = 5, len(data)
    while i < n and data[i] in b" \t\n\r\f\v":
        i += 1
    head = data[i:i + 8].upper()
    return head.startswith(b"LISTEN") or head == b"UNLISTEN" or head[:2] in (b"--", b"/*")


def looks_like_listen(text: bytes) -> bool:
    """A statement text (not a message) that may be a LISTEN/UNLISTEN (`_looks_like_listen`)."""
    return _looks_like_listen(b"Q\x00\x00\x00\x00" + text)


def client_encoding(client: "ClientConnection") -> str | None:
    index = client.relay.tracked_index.get("client_encoding")
    if index is None or index >= len(client.pvals):
        return None
    return client.pvals[index]


def at_boundary(client: "ClientConnection") -> bool:
    """Nothing pgrelay relays to the client is half-sent or owed, and it is not inside a transaction
    (PostgreSQL delivers only between transactions): a notification may go now. With a server
    linked (pinned), not while the client has a backlog either (its server's replies are bounded by
    pausing the server; notifications are bounded in the queue instead)."""
    server = client.server
    return server is None or (client.out is None and server.state == SV_ACTIVE and server.txstatus == _IDLE
                              and not server.expect and not server.skip and not server.carry)


def linked(client: "ClientConnection", server, data: bytes, queries: int = 1) -> bool:
    """Client relay path of a listening client whose server is linked (inside a transaction, or
    pinned by session_state): a LISTEN of a channel it listens on already is answered here (a no-op
    in PostgreSQL too, so its server never gets it: no duplicate delivery, no pin); an UNLISTEN goes
    to the server as well (its own channels, if pinned) and ends the listening server's delivery at
    once, or at COMMIT inside a transaction (`ready`). Returns whether the query was taken. An
    extended-protocol batch (a Parse or Bind first) is `extended`'s; a read that only parses an
    unnamed LISTEN (asyncpg may write its Parse apart from the Bind, Execute, Sync that follow) is
    remembered for the next read."""
    listen = client.listen
    parsed, listen.parsed = listen.parsed, None
    held, listen.held = listen.held, None
    if held is not None:
        # The Parse read alone before: with this read it may be one batch (asyncpg writes the Parse
        # apart from its Bind, Execute, Sync); else it goes first, as it came.
        if queries == 1 and data[0] == 66 and extended(client, held + data, server):
            return True
        server.write(held, client)
    elif queries != 1:
        if data[0] == 80:
            query = parse_alone(data)
            if query is not None and _I32(data, 1)[0] + 1 == len(data):
                # A Parse alone owes no reply until what follows: held, so that a Bind, Execute,
                # Sync in the next read are served here and the server never owes its ParseComplete.
                listen.held = bytes(data)
                return True
            listen.parsed = query
        return False
    if queries != 1:
        return False
    if data[0] != 81:
        return (data[0] == 80 or data[0] == 66 and parsed is not None) and extended(client, data, server,
                                                                                     parsed=parsed)
    if len(data) > MAX_STATEMENT or _I32(data, 1)[0] + 1 != len(data) or not _looks_like_listen(data):
        return False
    txstatus = server.txstatus
    if server.state != SV_ACTIVE or server.expect or server.skip or server.carry or server.out is not None \
            or client.skip or client.carry or client.open_batch or txstatus not in (_IDLE, _IN_TX):
        return False  # a failed transaction ('E') refuses it on the server, as PostgreSQL does
    hub = listen.hub
    client_codec = codec(client_encoding(client))
    if client_codec is None or hub.codec is None or hub.db_codec is None:
        return False
    stmt = parse(bytes(data[5:]), client_codec, hub.db_codec, hub.codec)
    if stmt is None:
        return False
    if stmt.command == "LISTEN":
        if stmt.channel not in listen.channels or getattr(client, "ps", None) is not None:
            # A new channel inside a transaction is the server's (session_state); the queries of a
            # client with named statements are tracked per server (pgrelay.prepared): none is taken out.
            return False
        client.query_start = 0.0
        client.write(stmt.notice + b"C\x00\x00\x00\x0bLISTEN\x00" + protocol.ready_for_query(bytes((txstatus,))))
        return True
    if txstatus == _IDLE:
        _unlisten(client, stmt.channel)
    else:
        listen.pending.append(stmt.channel)
    return False


def _unlisten(client: "ClientConnection", channel: bytes | None) -> None:
    listen = client.listen
    if listen is None:
        return
    if channel is None:
        listen.hub.forget(client)
    else:
        listen.hub.unlisten(client, channel)


def ended(client: "ClientConnection", server, data: bytes, zs: int) -> None:
    """Server relay hook of a client with UNLISTENs inside its transaction, for a buffer holding
    ReadyForQuery (before it is relayed): if the transaction is over, they take effect if it
    committed and are forgotten if not."""
    listen = client.listen
    if server.txstatus == _IDLE and server.expect - zs <= 0:
        pending, listen.pending = listen.pending, []
        if _COMMIT_TAIL in data:  # CommandComplete COMMIT, ReadyForQuery idle: not a ROLLBACK
            for channel in pending:
                _unlisten(client, channel)


def ready(client: "ClientConnection", server, data: bytes) -> None:
    """Server relay hook of a listening client, after a buffer holding a ReadyForQuery was relayed:
    held notifications go out if its transaction is over."""
    if server.txstatus == _IDLE:
        flush(client, server)


def flush(client: "ClientConnection", server=None) -> None:
    """Write the client's held notifications (server hook: after a ReadyForQuery was relayed and
    the server's output ends at a message boundary; `server` is that server)."""
    listen = client.listen
    if listen is None or not listen.queue or client.state == CL_CLOSED:
        return
    if server is not None and (server.skip or server.carry):
        return
    data = b"".join(message for _, message in listen.queue)
    listen.queue.clear()
    listen.queued = 0
    client.write(data)


def deliver(client: "ClientConnection", items: list, limit: int) -> None:
    """Notifications (channel, message, ...) for a listening client: now if at a boundary, else
    held (bounded)."""
    listen = client.listen
    if client.state == CL_CLOSED or listen is None:
        return
    queue = listen.queue
    for item in items:
        queue.append((item[0], item[1]))
        listen.queued += len(item[1])
    if at_boundary(client):
        flush(client)
    # What pgrelay still holds for it: with no server linked, `out` is only what pgrelay wrote
    # itself (a server is released only once its replies are flushed); with one linked, its
    # replies are bounded by pausing it, and notifications wait in the queue.
    out = client.out
    if listen.queued + (len(out) if out is not None and client.server is None else 0) > limit:
        reason = "client does not read its notifications (notify_queue_size)"
        client.disconnect(reason, Reject(reason, PROGRAM_LIMIT_EXCEEDED))
        return
    if listen.queue and not listen.retry:
        # Normally the next ReadyForQuery relayed flushes it (`ready`); a server that goes back to
        # the pool or stays linked (pinned) without relaying one is caught by this check.
        listen.retry = True
        gevent.spawn_later(RETRY_FLUSH, _retry_flush, client)


def _retry_flush(client: "ClientConnection") -> None:
    listen = client.listen
    if listen is None or client.state == CL_CLOSED:
        return
    listen.retry = False
    if not listen.queue:
        return
    if at_boundary(client):
        flush(client)
    else:
        listen.retry = True
        gevent.spawn_later(RETRY_FLUSH, _retry_flush, client)


def disconnected(client: "ClientConnection") -> None:
    """Client disconnect hook: it listens no more."""
    listen = client.listen
    if listen is not None:
        listen.hub.forget(client)


# -- the listening server ----------------------------------------------------------------------------

class Listening:
    """The listening server of one pool, and which of the pool's clients listen on what."""

    def __init__(self, pool: "Pool"):
        self.pool = pool
        self.relay = pool.relay
        self.channels: dict[bytes, dict] = {}  # channel -> {client: None}, in LISTEN order
        self.confirmed: set[bytes] = set()     # channels the server's LISTEN has completed for
        self.gen: dict[bytes, int] = {}        # channel -> number of the last LISTEN sent for it
        self.waiters: dict[bytes, list] = {}   # channel -> callbacks awaiting that LISTEN
        self.stream = None
        self.greenlet = None
        self.outq: Queue | None = None         # Query messages for the current connection
        self.inflight: collections.deque = collections.deque()  # a callback per Query sent
        self.error: dict[str, str] | None = None
        self.pid = 0
        self.counted: tuple = ()               # server limit keys it counts against
        self.failures = 0
        self.lost_at = 0.0
        self.next_gen = 0
        welcome = dict(pool.welcome or ())
        self.db_codec = codec(welcome.get("server_encoding"))
        self.codec = codec(welcome.get("client_encoding"))

    @property
    def label(self) -> str:
        return f"listening server of {self.pool.name}" + (f" (pid {self.pid})" if self.pid else "")

    # -- registrations ---------------------------------------------------------------------

    def listen(self, client: "ClientConnection", channel: bytes, done: Callable[[Reject | None], None]) -> None:
        listen = client.listen
        listen.channels.add(channel)
        self.channels.setdefault(channel, {})[client] = None
        if channel in self.confirmed:
            done(None)
            return
        self.waiters.setdefault(channel, []).append((client, done))
        if channel not in self.gen:
            self._send_listen(channel)

    def unlisten(self, client: "ClientConnection", channel: bytes) -> None:
        listen = client.listen
        listen.channels.discard(channel)
        if listen.queue:
            kept = [item for item in listen.queue if item[0] != channel]
            listen.queue = collections.deque(kept)
            listen.queued = sum(len(m) for _, m in kept)
        listeners = self.channels.get(channel)
        if listeners is not None:
            listeners.pop(client, None)
            if not listeners:
                self._drop(channel)
        if not listen.channels and not listen.queue:
            client.listen = None
        self._close_if_unused()

    def forget(self, client: "ClientConnection") -> None:
        """UNLISTEN *, or the client left."""
        listen = client.listen
        client.listen = None
        if listen is None:
            return
        for channel in listen.channels:
            listeners = self.channels.get(channel)
            if listeners is not None:
                listeners.pop(client, None)
                if not listeners:
                    self._drop(channel)
        listen.channels.clear()
        listen.queue.clear()
        self._close_if_unused()

    def _drop(self, channel: bytes) -> None:
        self.channels.pop(channel, None)
        self.waiters.pop(channel, None)
        self.gen.pop(channel, None)
        self.confirmed.discard(channel)
        if self.channels and self.outq is not None:
            self._send(b"UNLISTEN " + _quoted(channel), None)

    # -- talking to the server ---------------------------------------------------------------

    def _send_listen(self, channel: bytes) -> None:
        self.next_gen += 1
        gen = self.gen[channel] = self.next_gen
        self._send(b"LISTEN " + _quoted(channel), lambda error: self._listened(channel, gen, error))

    def _send(self, sql: bytes, callback) -> None:
        if self.greenlet is None:
            self._start()
            return  # the new connection LISTENs every channel that has listeners
        self.inflight.append(callback)
        self.outq.put(b"Q" + protocol.pack_i32(len(sql) + 5) + sql + b"\x00")

    def _listened(self, channel: bytes, gen: int, error: dict[str, str] | None) -> None:
        if self.gen.get(channel) != gen:
            return  # dropped (or re-sent) since
        waiters = self.waiters.pop(channel, [])
        if error is None:
            self.confirmed.add(channel)
            for _, done in waiters:
                done(None)
            return
        reject = Reject.from_fields(error)
        reject = Reject(reject.message, reject.sqlstate, "ERROR", reject.detail, reject.hint)
        log.warning("%s: LISTEN failed: %s; its listeners are dropped", self.label, reject.message)
        self._fail(channel, list(self.channels.get(channel, ())), reject, waiters)

    def _fail(self, channel: bytes, clients, reject: Reject, waiters) -> None:
        """`clients` do not listen on `channel` after all; those whose LISTEN awaited get the error."""
        listeners = self.channels.get(channel, {})
        for client in clients:
            listeners.pop(client, None)
            listen = client.listen
            if listen is not None:
                listen.channels.discard(channel)
                if not listen.channels and not listen.queue:
                    client.listen = None
        if not listeners:
            self._drop(channel)
        for _, done in waiters:
            done(reject)
        self._close_if_unused()

    def _start(self) -> None:
        self.outq = Queue()
        self.inflight.clear()
        self.confirmed.clear()
        self.greenlet = gevent.spawn(self._run)

    def _close_if_unused(self) -> None:
        if not self.channels and self.greenlet is not None:
            greenlet, self.greenlet = self.greenlet, None
            self._close("no client listens")
            if greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)

    def _close(self, reason: str) -> None:
        stream, self.stream = self.stream, None
        self.outq = None
        self.inflight.clear()
        self.confirmed.clear()
        self.gen.clear()
        self.pid = 0
        if stream is not None:
            stream.try_send(protocol.TERMINATE)
            stream.close()
            if self.relay.config.log_disconnections:
                log.info("%s closing because: %s", self.label, reason)
        self._uncount()

    def _count(self) -> bool:
        relay, pool = self.relay, self.pool
        if any(0 < limit.maximum < 2 for limit in pool.route.server_limits):
            return False  # it would leave the pool no server for queries
        if pool.route.server_limits and not relay.server_room(pool):
            spare = pool.spare()  # an unused server of this pool makes way (others' are evicted by server_room)
            if spare is None:
                return False
            spare.close("evicted to make room for the listening server")
            if not relay.server_room(pool, evict=False):
                return False
        self.counted = tuple(limit.key for limit in pool.route.server_limits if limit.maximum)
        for key in self.counted:
            relay.server_counts[key] += 1
        return True

    def _uncount(self) -> None:
        if self.counted:
            for key in self.counted:
                self.relay.server_counts[key] -= 1
            self.counted = ()
            self.relay.group_changed(self.pool)

    def _login(self):
        pool, relay = self.pool, self.relay
        route = pool.route
        if relay.shutting_down:
            raise ServerError("pooler is shutting down")
        if pool.paused:  # PAUSE: no server is opened until RESUME (a waiting LISTEN gets the error)
            raise ServerError("pool is paused", {"S": "ERROR", "C": "57P03", "M": "pool is paused (PAUSE)"})
        if not self._count():
            message = "no server connection available for LISTEN (max_db_connections or max_user_connections)"
            raise ServerError(message, {"S": "ERROR", "C": TOO_MANY_CONNECTIONS, "M": message,
                                        "H": "The listening server counts against max_db_connections and "
                                             "max_user_connections, and leaves the pool at least one server."})
        with gevent.Timeout(relay.config.server_connect_timeout or None,
                            ServerError(f"server connect timeout ({route.name})")):
            chosen = relay.choose_host(pool)
            if isinstance(chosen, Reject):
                raise ServerError(chosen.message, {"S": "ERROR", "C": chosen.sqlstate, "M": chosen.message})
            stream = server_login.connect(relay, chosen)
            try:
                password = route.server_password
                if password is None:
                    password = relay.server_password(route.server_user)
                extra = dict(route.server_params)
                extra.setdefault("application_name", APPLICATION_NAME)  # how it shows in pg_stat_activity
                params, key = server_login.login(relay, stream, route.server_user, route.dbname,
                                                 tuple(extra.items()), password)
                if route.connect_query:
                    server_login.simple_query(stream, route.connect_query, params)
            except BaseException:
                stream.close()
                raise
        self.pid = _I32(key, 0)[0] if len(key) >= 4 else 0
        server_codec = codec(params.get("client_encoding"))
        if server_codec != self.codec:  # the channels' bytes would differ: spell them anew
            raise ServerError(f"listening server's client_encoding changed to {params.get('client_encoding')}")
        return stream

    def _run(self) -> None:
        """One connection: log in, LISTEN every channel with listeners, then read: notifications
        fan out, each ReadyForQuery answers the oldest Query sent."""
        me = gevent.getcurrent()
        try:
            stream = self._login()
        except gevent.GreenletExit:
            self._uncount()
            raise
        except (ServerError, ClientGone, OSError) as exc:
            self._uncount()
            self._login_failed(me, exc)
            return
        except Exception as exc:  # a bug: logged and reported, the listeners get an error
            self.relay.internal_error(exc, "server_login", f"{self.label}: unexpected error during login")
            self._uncount()
            self._login_failed(me, ServerError(f"server login failed: {type(exc).__name__}"))
            return
        if self.greenlet is not me:  # nobody listens any more
            stream.close()
            self._uncount()
            return
        self.stream = stream
        self.failures = 0
        if self.lost_at:
            log.warning("%s is back after %.1fs; notifications sent in between were lost", self.label,
                        time.monotonic() - self.lost_at)
            self.lost_at = 0.0
        elif self.relay.config.log_connections:
            log.info("%s connected", self.label)
        for channel in list(self.channels):
            self._send_listen(channel)
        writer = gevent.spawn(self._write, stream, self.outq)
        try:
            self._read(stream)
        except gevent.GreenletExit:
            raise
        except (ServerError, ClientGone, ProtocolViolation, OSError) as exc:
            if self.greenlet is me:
                self._lost(str(exc))
        except Exception as exc:
            self.relay.internal_error(exc, "relay", f"{self.label}: internal error")
            if self.greenlet is me:
                self._lost("internal error")
        finally:
            writer.kill(block=False)

    def _write(self, stream, outq: Queue) -> None:
        try:
            while True:
                data = outq.get()
                while not outq.empty():
                    data += outq.get()
                stream.sendall(data)
        except (ClientGone, OSError):
            pass  # the reader sees the close

    def _read(self, stream) -> None:
        """Read whole reads, not messages: a burst of notifications in one read goes to each
        client in one write."""
        buf = b""
        while True:
            data = stream.recv_some()
            buf = buf + data if buf else data
            pos, n = 0, len(buf)
            batch: list[bytes] = []
            while pos + 5 <= n:
                kind = buf[pos]
                length = _I32(buf, pos + 1)[0]
                if length < 4 or length > MAX_NOTIFY_MESSAGE:
                    raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
                end = pos + 1 + length
                if end > n:
                    break
                body = buf[pos + 5:end]
                pos = end
                if kind == 65:  # 'A' NotificationResponse
                    batch.append(body)
                    continue
                if batch:
                    self._fan_out(batch)
                    batch = []
                self._message(kind, body)
            if batch:
                self._fan_out(batch)
            buf = buf[pos:]

    def _message(self, kind: int, body: bytes) -> None:
        if kind == 90:  # 'Z': the oldest Query sent is answered
            error, self.error = self.error, None
            callback = self.inflight.popleft() if self.inflight else None
            if callback is not None:
                callback(error)
        elif kind == 69:  # 'E'
            fields = protocol.parse_fields(body)
            if fields.get("S") in ("FATAL", "PANIC"):
                raise ServerError("server sent FATAL: " + fields.get("M", "connection terminated"))
            self.error = fields
            log.warning("%s: %s failed: %s", self.label, "LISTEN", fields.get("M", ""))

    def _fan_out(self, batch: list[bytes]) -> None:
        """Notifications, in the order the server sent them, to each client listening on theirs."""
        per_client: dict = {}
        for body in batch:
            end = body.find(b"\x00", 4)
            if len(body) < 6 or end < 0 or body[-1] != 0:
                raise ProtocolViolation("malformed NotificationResponse")
            channel = body[4:end]
            listeners = self.channels.get(channel)
            if not listeners:
                continue
            raw = b"A" + protocol.pack_i32(len(body) + 4) + body
            for client in listeners:
                items = per_client.get(client)
                if items is None:
                    items = per_client[client] = []
                items.append((channel, raw, body, end))
        limit = self.relay.config.notify_queue_size
        for client, items in per_client.items():
            want = codec(client_encoding(client))
            if want != self.codec and want and self.codec:
                items = [(channel, _convert(body, end, self.codec, want), body, end)
                         for channel, _, body, end in items]
            deliver(client, items, limit)

    def _lost(self, reason: str) -> None:
        log.warning("%s lost: %s; reconnecting, notifications sent until it is back are lost", self.label, reason)
        self.lost_at = self.lost_at or time.monotonic()
        self._close(reason)
        self.greenlet = None
        if self.channels:
            self._start()

    def _login_failed(self, me, exc: BaseException) -> None:
        """Listeners awaiting a LISTEN get the error; confirmed ones stay, and the login is retried
        after server_login_retry while anyone listens."""
        if self.greenlet is not me:
            return
        self.greenlet = None
        self.outq = None
        self.failures += 1
        log.warning("%s: login failed: %s", self.label, exc)
        fields = getattr(exc, "fields", None) or {}
        reject = Reject(fields.get("M") or f"listening server login failed: {exc}",
                        fields.get("C") or CONNECTION_FAILURE, "ERROR", fields.get("D"), fields.get("H"))
        self.gen.clear()
        for channel in list(self.channels):
            waiters = self.waiters.pop(channel, [])
            if waiters:
                self._fail(channel, [client for client, _ in waiters], reject, waiters)
        if self.channels:
            self.lost_at = self.lost_at or time.monotonic()
            gevent.spawn_later(self.relay.config.server_login_retry or 1.0, self._retry)

    def _retry(self) -> None:
        if self.greenlet is None and self.channels:
            self._start()


def _convert(body: bytes, end: int, source: str, target: str) -> bytes:
    """A NotificationResponse re-encoded for a client whose client_encoding differs."""
    try:
        channel = body[4:end].decode(source).encode(target, "replace")
        payload = body[end + 1:-1].decode(source).encode(target, "replace")
    except UnicodeDecodeError:
        return b"A" + protocol.pack_i32(len(body) + 4) + body
    new = body[:4] + channel + b"\x00" + payload + b"\x00"
    return b"A" + protocol.pack_i32(len(new) + 4) + new

