"""Protocol-level named prepared statements in transaction and statement pooling (max_prepared_statements).

How it works (PgBouncer 1.21+'s design, with the texts shared between clients):

- A client's named statements live in pgrelay, not on a server: `ClientStatements.names` maps the
  client's name to a `Statement`, one object per distinct Parse text (query and parameter types),
  shared by every client that prepares that text. On a server a Statement is called PGRELAY_<id>.
- Each server remembers which Statements it has (`ServerStatements.cache`, an LRU of at most
  max_prepared_statements; the oldest is closed with a Close whose CloseComplete is hidden).
- A client that never sends a named Parse/Bind/Describe/Close stays on the hot path (client._scan
  only looks at the first body byte of those four). Its first named one raises `Named`, and from
  then on its bytes come here (`client_data`): whole messages are parsed, statement names
  rewritten, a Parse is sent ahead of a Bind/Describe on a server that lacks the statement, and a
  client Parse of a text the server already has is not sent: its ParseComplete is synthesized.
- The replies the client did not ask for (pgrelay's own Parse and Close) and the synthesized ones
  are placed by a queue of what each request will be answered with (`ServerStatements.queue`).
  While that queue is not empty the server's bytes pass through `server_data`, which drops,
  inserts and renames, then hands the result to server._relay; otherwise server._relay runs alone.
  An ErrorResponse makes PostgreSQL skip to Sync: the requests queued up to the next Sync are
  undone in reverse order (a failed or skipped Parse leaves nothing behind), and synthesized
  replies among them are not sent. A message of a later batch that uses a name whose change is
  not answered yet waits for the answer (`ClientStatements.unsettled`).
- A batch that runs a LISTEN/UNLISTEN (a Bind of a statement with that text, an unnamed Parse of
  one) is offered to pgrelay.notify first (`_listen_batch`), which serves it with the pool's
  listening server; a Parse of one read alone waits in inbuf for the Bind, Execute, Sync.
- Outside a transaction, a batch of named Parses of texts a server of the pool already has is
  answered without a server (`_answer_locally`); other bytes of an unlinked client are renamed for
  the idle server client._forward is about to link, then sent with it in one write.
"""

from __future__ import annotations

import collections
import itertools

import gevent
import re
import weakref
from typing import TYPE_CHECKING

from . import notify, protocol
from .errors import ProtocolViolation, Reject
from .pool import CL_IDLE, CL_WAITING, MODE_SESSION, SV_ACTIVE
from .stream import RECV_SIZE

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

_unpack = protocol._I32.unpack_from
_pack = protocol.pack_i32
_CLASS = protocol.FRONTEND_CLASS
PARSE_COMPLETE = b"1\x00\x00\x00\x04"
_SYNC_MESSAGE = b"S\x00\x00\x00\x04"
CLOSE_COMPLETE = b"3\x00\x00\x00\x04"
PREFIX = b"PGRELAY_"
# A client may hold this many times max_prepared_statements named statements (20,000 at the
# default 200): its map is bounded, the servers' LRUs hold at most max_prepared_statements each.
CLIENT_LIMIT_FACTOR = 100
# Server messages the filter reads whole (all small); others stream through.
_WHOLE = frozenset(b"123nCIsEZ")
_TERMINAL = bytes(1 if k in b"123nTCIs" else 0 for k in range(256))  # the one reply ending a P/B/D/E/C
MAX_WHOLE = 1 << 20
_P, _B, _D, _C, _E, _S, _Q, _F, _H, _X, _Z, _T = b"PBDCESQFHXZT"
_STMT = 83  # 'S' in Describe/Close

# Queue entry kinds. Z-kinds wait for ReadyForQuery; T-kinds for the one terminal reply of an
# extended-protocol message (or an ErrorResponse, which skips the rest up to the next Z-kind).
ZSKIP, ZWATCH, TFWD, THIDE, TERR, SYNTH = range(6)


class Named(Exception):
    """Raised by client._scan at the first named Parse/Bind/Describe/Close (or one whose first
    body bytes are not in this read): `at` is its offset in the read, `queries` those before it."""

    def __init__(self, at: int, queries: int):
        self.at = at
        self.queries = queries


class Statement:
    """One distinct Parse text (query, parameter types), shared by all clients and servers."""

    __slots__ = ("id", "body", "sname", "__weakref__")

    def __init__(self, id_: int, body: bytes):
        self.id = id_
        self.body = body                                   # the Parse body after the name
        self.sname = PREFIX + str(id_).encode() + b"\x00"  # its name on servers, NUL-terminated


_statements: "weakref.WeakValueDictionary[bytes, Statement]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)


# Whether any named statement's text may be a LISTEN/UNLISTEN (notify.looks_like_listen, once per text):
# until one is prepared, a Bind is never looked up for pgrelay.notify (`_listen_batch`).
_listen_texts = False


def statement(body: bytes) -> Statement:
    global _listen_texts
    found = _statements.get(body)
    if found is None:
        found = _statements[body] = Statement(next(_ids), body)
        if not _listen_texts and body and notify.TRIGGER[body[0]] and notify.looks_like_listen(body[:64]):
            _listen_texts = True
    return found


def parse_message(stmt: Statement) -> bytes:
    return b"P" + _pack(4 + len(stmt.sname) + len(stmt.body)) + stmt.sname + stmt.body


def close_message(stmt: Statement) -> bytes:
    return b"C" + _pack(5 + len(stmt.sname)) + b"S" + stmt.sname


class ClientStatements:
    """A client's named statements, and its bytes not yet sent (whole messages are needed)."""

    __slots__ = ("names", "inbuf", "limit", "pumping", "unsettled", "batch", "stalled")

    def __init__(self, limit: int):
        self.names: dict[bytes, Statement] = {}
        self.inbuf = bytearray()
        self.limit = limit
        self.pumping = False
        # Names whose Parse, Close or DEALLOCATE is sent but not yet answered: a message of a later
        # batch that uses one waits for the answer (an error would undo the change, and PostgreSQL
        # would then treat the later message differently).
        self.unsettled: dict[bytes, list] = {}
        self.batch = 0        # Sync/Query/FunctionCall messages processed
        self.stalled = b""    # the name the next message waits for


class ServerStatements:
    """What a server has prepared (an LRU), and the queue that places replies while it is not empty."""

    __slots__ = ("cache", "queue", "dead", "fskip", "fcarry", "fsent", "answered")

    def __init__(self):
        self.cache: collections.OrderedDict[Statement, None] = collections.OrderedDict()
        self.queue: collections.deque[list] = collections.deque()
        self.dead = False    # an error was seen and no Sync sent since: the server skips what comes
        self.fskip = 0       # bytes of a streamed message still to come
        self.fcarry = b""    # an incomplete message the filter needs whole
        self.fsent = 0       # leading bytes of fcarry already forwarded (see activate)
        # Messages of the client's open batch (client.open_batch) already answered when the queue
        # last ran empty with no Sync since: a queue started again owes replies to the rest only.
        self.answered = 0


def enabled(client: "ClientConnection") -> bool:
    """Tracking applies to transaction and statement pooling with max_prepared_statements > 0."""
    pool = client.pool
    return (pool is not None and pool.mode != MODE_SESSION and pool.reuse
            and client.relay.config.max_prepared_statements > 0)


def statements_of(server: "ServerConnection") -> ServerStatements:
    sps = server.ps
    if sps is None:
        sps = server.ps = ServerStatements()
    return sps


# -- the client side -------------------------------------------------------------------------------

def enter(client: "ClientConnection", data: bytes, at: int, queries: int) -> None:
    """The hot path met a named message at `at`: what precedes it goes the usual way, the rest here."""
    if at:
        client._forward(data[:at], queries)
        if client.state not in (1, 2, 3):  # CL_IDLE, CL_WAITING, CL_ACTIVE: not closed meanwhile
            return
    config = client.relay.config
    client.ps = ClientStatements(CLIENT_LIMIT_FACTOR * config.max_prepared_statements)
    client_data(client, data[at:])


def client_data(client: "ClientConnection", data: bytes) -> None:
    client.touched = True
    ps = client.ps
    ps.inbuf += data
    pump(client)


def pump(client: "ClientConnection") -> None:
    """Send the client's complete messages to its server, linking one first if needed."""
    ps = client.ps
    if ps.pumping or not ps.inbuf or client.state == 4:  # CL_CLOSED
        return
    ps.pumping = True
    try:
        server = client.server
        first = ps.inbuf[0]
        if (first == _B or first == _P or client.listen is not None) and not ps.unsettled \
                and (server is not None or client.state == CL_IDLE) and _listen_batch(client, server):
            return  # a LISTEN/UNLISTEN batch: the pool's listening server's (pgrelay.notify)
        if server is None and client.state == CL_IDLE:
            if ps.inbuf[0] == _P:
                while ps.inbuf and _answer_locally(client):
                    pass
                if not ps.inbuf:
                    return
            pool = client.pool
            if pool.idle and not pool.waiting and client.cancel_server is None:
                # The server client._forward will link (its choice, made the same way): the
                # messages are renamed for it, then _forward links it and sends them at once.
                _process(client, pool.idle[pool.take], True)
                return
        if server is None:
            if client.state != CL_WAITING:
                # Take a server as the hot path does (idle one, SET batch, or the queue); the
                # unfinished batch flag keeps it from being released before our bytes are sent.
                held = client.open_batch
                client.open_batch = held or 1
                try:
                    client._forward(b"", 0)
                finally:
                    client.open_batch = held
                server = client.server
            if server is None:
                if len(ps.inbuf) >= RECV_SIZE:
                    client.stop_reading()  # as a queued client on the hot path (QUEUED_INPUT_LIMIT)
                return
        if server.state != SV_ACTIVE:
            return  # a SET batch runs first; client.start_reading calls back
        _process(client, server)
        while ps.stalled and not _blocked(ps, ps.stalled) and client.server is server and server.state == SV_ACTIVE:
            _process(client, server)
    except ProtocolViolation as exc:
        # The client's held bytes are bad. Its read handler is not always the caller: a server that
        # becomes ready pumps them too (start_reading, _resume), and must not fail for them.
        client.disconnect(str(exc), client.relay.translate_error(exc, "relay", client))
    finally:
        ps.pumping = False


def _listen_batch(client: "ClientConnection", server) -> bool:
    """notify.extended for a batch that may run a LISTEN/UNLISTEN: a Bind of a named statement
    whose text may be one (one look at its first byte), an unnamed Parse of one, or a Bind of the
    unnamed statement a read of its own parsed just before (notify.parse_only, as for the hot path)."""
    ps = client.ps
    buf = ps.inbuf
    listen = client.listen
    parsed = None
    if listen is not None:
        parsed, listen.parsed = listen.parsed, None
    first = buf[0]
    if not buf.endswith(_SYNC_MESSAGE):
        if first == _P and len(buf) > 6 and buf[5] == 0 and notify.TRIGGER[buf[6]]:
            if _unpack(buf, 1)[0] + 1 == len(buf) and notify.parse_alone(bytes(buf)) is not None \
                    and notify.enabled(client):
                return True  # a Parse alone owes no reply: it waits in inbuf for the Bind, Execute, Sync that follow
            notify.parse_only(client, bytes(buf))
        return False
    if first == _B:
        if parsed is None and not _listen_texts:
            return False
        nul = buf.find(b"\x00", 6)
        if buf[5] != 0 or nul < 6:
            return False
        if nul > 6:
            stmt = ps.names.get(bytes(buf[6:nul]))
            if stmt is None or not notify.TRIGGER[stmt.body[0]]:
                return False
        elif parsed is None:
            return False
    elif first != _P or len(buf) < 7 or buf[5] != 0 or not notify.TRIGGER[buf[6]]:
        return False
    if server is not None and server.ps is not None and (server.ps.queue or server.ps.dead):
        return False
    if not notify.extended(client, bytes(buf), server, ps.names, parsed=parsed):
        return False
    ps.inbuf = bytearray()
    ps.batch += 1
    return True


ALL = b"\x00all"  # the key of an unsettled DEALLOCATE ALL / DISCARD ALL (no name holds a NUL)


def _blocked(ps: ClientStatements, name: bytes) -> bool:
    entry = ps.unsettled.get(name)
    if entry is not None and entry[5] < ps.batch:
        return True
    entry = ps.unsettled.get(ALL)
    return entry is not None and entry[5] < ps.batch


def _known(pool, stmt: Statement) -> bool:
    """Whether a server of the pool has `stmt` (so its text parses in this database, as that user)."""
    for server in pool.servers:
        sps = server.ps
        if sps is not None and stmt in sps.cache:
            return True
    return False


def _answer_locally(client: "ClientConnection") -> bool:
    """A batch of named Parses of texts a server of the pool has already parsed, then Sync, from a
    client outside a transaction: answered by pgrelay, no server is taken. (pgbench -M prepared
    prepares each statement with a blocking PQprepare; waiting for a server there would stall
    the other clients of its thread that hold servers inside transactions.)"""
    ps = client.ps
    buf = ps.inbuf
    n = len(buf)
    pos = 0
    parses = []
    while pos + 5 <= n:
        kind = buf[pos]
        length = _unpack(buf, pos + 1)[0]
        end = pos + 1 + length
        if end > n or length < 4:
            return False
        if kind == _S:
            break
        if kind != _P:
            return False
        nul = buf.find(b"\x00", pos + 5, end)
        if nul <= pos + 5:
            return False
        name = bytes(buf[pos + 5:nul])
        if name in ps.names or any(name == other for other, _ in parses):
            return False
        stmt = _statements.get(bytes(buf[nul + 1:end]))
        if stmt is None or not _known(client.pool, stmt):
            return False
        parses.append((name, stmt))
        pos = end
    else:
        return False
    if not parses or len(ps.names) + len(parses) > ps.limit:
        return False
    del buf[:end]
    for name, stmt in parses:
        ps.names[name] = stmt
    client.pool.stats.client_parse_count += len(parses)
    client.write(PARSE_COMPLETE * len(parses) + protocol.READY_IDLE)
    return True


def _process(client: "ClientConnection", server: "ServerConnection", unlinked: bool = False) -> None:
    ps = client.ps
    sps = server.ps or statements_of(server)
    buf = ps.inbuf
    n = len(buf)
    limit = client.max_length
    stats = client.pool.stats
    names = ps.names
    out = bytearray()
    pass_queries = 0
    open_batch = client.open_batch
    pos = 0
    terminate = False
    queue = sps.queue
    ps.stalled = b""
    unsettled = ps.unsettled
    while pos + 5 <= n:
        kind = buf[pos]
        length = _unpack(buf, pos + 1)[0]
        cls = _CLASS[kind]
        if cls == 0:
            if kind == _X:
                terminate = True
                pos = n
                break
            if kind == 0:
                raise ProtocolViolation("client re-sent startup pkt")
            if kind == 112:
                raise ProtocolViolation("unexpected password packet")
            raise ProtocolViolation(f"unknown pkt from client: {chr(kind)!r}"
                                    if 32 < kind < 127 else f"unknown pkt from client: 0x{kind:02x}")
        if length < 4 or length > limit:
            raise ProtocolViolation(f"bad packet header: message {chr(kind)!r} with length {length}")
        end = pos + 1 + length
        if end > n:
            break
        if kind == _E or kind == _S or cls == 3 or ((kind == _D or kind == _C) and length > 5 and (
                buf[pos + 5] != _STMT or buf[pos + 6] == 0)):  # no statement name: as they came (the common case)
            out += buf[pos:end]
            pos = end
            if cls == 3:  # CopyData/CopyDone/CopyFail, Flush: no reply of their own
                continue
            before = open_batch
            if kind != _S:
                open_batch += 1
                if queue and not sps.dead:
                    _track(sps, server, TFWD, None, None, pass_queries, before)
                continue
            open_batch = 0
            sps.dead = False
            if queue:
                _track(sps, server, ZSKIP, None, None, pass_queries, before)
            else:
                sps.answered = 0
            pass_queries += 1
            ps.batch += 1
            continue
        if kind == _B and not unsettled and not sps.dead:  # a Bind, the other common case: renamed in place
            p = buf.find(0, pos + 5, end)
            q = buf.find(0, p + 1, end) if p >= 0 else -1
            stmt = names.get(bytes(buf[p + 1:q])) if q > p + 1 else None
            before = open_batch
            open_batch += 1
            if stmt is None:
                if q > p + 1:
                    stats.bind_count += 1
                out += buf[pos:end]  # unnamed, or a name the client never prepared: PostgreSQL's 26000 as is
            else:
                stats.bind_count += 1
                cache = sps.cache
                if stmt in cache:
                    cache.move_to_end(stmt)
                else:
                    _ensure(client, server, sps, stmt, out, pass_queries, before)
                sname = stmt.sname
                out += b"B"
                out += _pack(length - (q - p) + len(sname))
                out += buf[pos + 5:p + 1]
                out += sname
                out += buf[q + 1:end]
            pos = end
            if queue:
                _track(sps, server, TFWD, None, None, pass_queries, before)
            continue
        msg = bytes(buf[pos:end])
        if unsettled:
            name = _name_used(kind, msg)
            if name and _blocked(ps, name):
                ps.stalled = name
                break
        pos = end
        if cls == 3:  # CopyData/CopyDone/CopyFail, Flush: no reply of their own
            out += msg
            continue
        if cls == 2:
            if kind != _S and sps.dead:
                # A Query or FunctionCall after an error with no Sync since: PostgreSQL skips it
                # (no ReadyForQuery), so nothing is tracked and the batch stays open until a Sync.
                open_batch += 1
                out += msg
                continue
            before = open_batch
            if kind == _S:  # only a Sync ends a batch (as in ClientConnection._scan)
                open_batch = 0
                if not queue:
                    sps.answered = 0
            zkind = ZSKIP
            undo = None
            owner = None
            if kind == _Q and not sps.dead:
                rewritten, zkind, undo, owner = _query(client, sps, msg)
                if rewritten is not None:
                    msg = rewritten
            elif kind == _S:
                sps.dead = False
            out += msg
            _track(sps, server, zkind, None, undo, pass_queries, before, owner)
            pass_queries += 1
            ps.batch += 1
            continue
        # cls == 1: P B E D C
        if sps.dead:  # the server skips it (an error, no Sync since): as it came, nothing tracked
            open_batch += 1
            out += msg
            continue
        before = open_batch
        open_batch += 1
        if kind == _P:
            nul = msg.find(b"\x00", 5)
            if nul <= 5:  # unnamed (or malformed: PostgreSQL answers it)
                out += msg
                _track(sps, server, TFWD, None, None, pass_queries, before)
                continue
            name = msg[5:nul]
            body = msg[nul + 1:]
            stats.client_parse_count += 1
            old = names.get(name)
            if old is not None:
                # PostgreSQL's own 42P05 for the client's name: the server gets the statement, then
                # a second Parse of the same server name; its error is renamed on the way back.
                _ensure(client, server, sps, old, out, pass_queries, before)
                out += b"P" + _pack(4 + len(old.sname) + len(body)) + old.sname + body
                _track(sps, server, TERR, (b'"' + old.sname[:-1] + b'"', b'"' + name + b'"'), None,
                       pass_queries, before)
                continue
            if len(names) >= ps.limit:
                client.open_batch = before
                if out:  # what came before it is sent, so the server's LRU stays true
                    client._forward(bytes(out), pass_queries)
                client.disconnect("too many prepared statements",
                                  Reject(f"too many prepared statements for this client (limit {ps.limit}, "
                                         "100 x max_prepared_statements)", "53400"))
                return
            stmt = statement(body)
            names[name] = stmt
            if stmt in sps.cache:
                sps.cache.move_to_end(stmt)
                _track(sps, server, SYNTH, PARSE_COMPLETE, _undo_name(names, name, stmt), pass_queries, before,
                       (ps, name))
            else:
                _evict(sps, out, client, server, pass_queries, before)
                out += parse_message(stmt)
                sps.cache[stmt] = None
                stats.server_parse_count += 1
                _track(sps, server, TFWD, None, _undo_parse(names, name, stmt, sps), pass_queries, before,
                       (ps, name))
            continue
        if kind == _B:
            p = msg.find(b"\x00", 5)
            q = msg.find(b"\x00", p + 1) if p >= 0 else -1
            stmt = names.get(msg[p + 1:q]) if q > p + 1 else None
            if q > p + 1:
                stats.bind_count += 1
            if stmt is not None:
                _ensure(client, server, sps, stmt, out, pass_queries, before)
                rest = msg[q + 1:]
                head = msg[5:p + 1]
                out += b"B" + _pack(4 + len(head) + len(stmt.sname) + len(rest)) + head + stmt.sname + rest
            else:
                out += msg  # unnamed, or a name the client never prepared: PostgreSQL's 26000 as is
            _track(sps, server, TFWD, None, None, pass_queries, before)
            continue
        if (kind == _D or kind == _C) and length > 5 and msg[5] == _STMT and msg[6] != 0:
            name = msg[6:-1] if msg[-1] == 0 else None
            stmt = names.get(name) if name else None
            if stmt is not None and kind == _D:
                _ensure(client, server, sps, stmt, out, pass_queries, before)
                out += b"D" + _pack(5 + len(stmt.sname)) + b"S" + stmt.sname
                _track(sps, server, TFWD, None, None, pass_queries, before)
                continue
            if stmt is not None:  # Close: the server keeps the shared statement, the client forgets it
                del names[name]
                _track(sps, server, SYNTH, CLOSE_COMPLETE, _undo_close(names, name, stmt), pass_queries, before,
                       (ps, name))
                continue
        out += msg  # Execute, portal Describe/Close, unnamed, or unknown names (PostgreSQL answers)
        _track(sps, server, TFWD, None, None, pass_queries, before)
    del buf[:pos]
    client.open_batch = open_batch
    # A batch left open across reads is tracked from now on: PostgreSQL may send part of its
    # replies before the rest of it comes, and only the queue can tell where they end.
    if open_batch and not queue and not sps.dead:
        _activate(sps, server, server.expect + pass_queries, open_batch)
    elif not queue:
        sps.answered = open_batch  # nothing tracked: every message of the open batch is answered
    if out:
        client._forward(bytes(out), pass_queries)
    elif unlinked and queue:  # only replies of pgrelay's own (a Close): the server is linked all the same
        held = client.open_batch
        client.open_batch = held or 1
        try:
            client._forward(b"", 0)
        finally:
            client.open_batch = held
    if client.state == 4:  # CL_CLOSED
        return
    if client.server is server:
        if queue:
            kick(server)
    elif unlinked and queue and client.server is None:  # cannot happen: _forward links the idle server
        server.close("prepared statement replies owed to a client that did not take the server")
    if terminate and client.state != 4:
        client._terminate(b"")


def _name_used(kind: int, msg: bytes) -> bytes:
    """The statement name a client message refers to (b"" if none)."""
    if kind == _P:
        nul = msg.find(b"\x00", 5)
        return msg[5:nul] if nul > 5 else b""
    if kind == _B:
        p = msg.find(b"\x00", 5)
        q = msg.find(b"\x00", p + 1) if p >= 0 else -1
        return msg[p + 1:q] if q > p + 1 else b""
    if (kind == _D or kind == _C) and len(msg) > 7 and msg[5] == _STMT:
        return msg[6:-1]
    if kind == _Q:
        found = classify_query(msg[5:-1])
        if found is not None and found[0] == "one":
            return found[1]
    return b""


def _track(sps: ServerStatements, server, kind: int, payload, undo, pass_queries: int, before: int,
           owner=None) -> None:
    """Note what the message just added to `out` is answered with. With an empty queue, plain
    requests are only counted (server.expect, client.open_batch); a special one first queues
    what is owed before it, so its place in the reply stream is known."""
    queue = sps.queue
    if not queue:
        if undo is None and (kind == TFWD or kind == ZSKIP):
            return
        _activate(sps, server, server.expect + pass_queries, before)
    if undo is None and payload is None and (kind == TFWD or kind == ZSKIP):
        tail = queue[-1] if queue else None
        if tail is not None and tail[0] == kind and tail[2] is None and tail[3] is None:
            tail[1] += 1
            return
    if owner is None:
        queue.append([kind, 1, payload, undo, None, 0])
        return
    ps, name = owner
    entry = [kind, 1, payload, undo, owner, ps.batch]
    ps.unsettled[name] = entry
    queue.append(entry)


def _activate(sps: ServerStatements, server, zs: int, terminals: int) -> None:
    """Start the queue with what is owed before the new entry; the filter takes over from the
    server's scanner at its current place (a message cut by the last read is passed through).
    `terminals`: messages of the client's open batch before the new entry, of which the first
    `sps.answered` were answered already (the queue ran empty with the batch still open)."""
    queue = sps.queue
    terminals = max(terminals - sps.answered, 0)
    if not queue:
        if not server.pfilter:
            server.pfilter = True
            sps.fskip = server.skip
            sps.fcarry = bytes(server.carry)
            sps.fsent = len(sps.fcarry)
        if zs:
            queue.append([ZSKIP, zs, None, None, None, 0])
        if terminals:
            queue.append([TFWD, terminals, None, None, None, 0])


def _ensure(client, server, sps: ServerStatements, stmt: Statement, out: bytearray, pass_queries: int,
            before: int) -> None:
    """Have `stmt` on the server: a Parse of its own goes ahead, its ParseComplete hidden."""
    cache = sps.cache
    if stmt in cache:
        cache.move_to_end(stmt)
        return
    _evict(sps, out, client, server, pass_queries, before)
    out += parse_message(stmt)
    cache[stmt] = None
    client.pool.stats.server_parse_count += 1
    _track(sps, server, THIDE, None, _undo_cache(sps, stmt), pass_queries, before)


def _evict(sps: ServerStatements, out: bytearray, client, server, pass_queries: int, before: int) -> None:
    cache = sps.cache
    cap = client.relay.config.max_prepared_statements
    while cache and len(cache) >= max(cap, 1):
        victim, _ = cache.popitem(last=False)
        out += close_message(victim)
        _track(sps, server, THIDE, None, _undo_evict(sps, victim), pass_queries, before)


def _undo_name(names, name, stmt):
    def undo():
        if names.get(name) is stmt:
            del names[name]
    return undo


def _undo_parse(names, name, stmt, sps):
    def undo():
        if names.get(name) is stmt:
            del names[name]
        sps.cache.pop(stmt, None)
    return undo


def _undo_close(names, name, stmt):
    def undo():
        names.setdefault(name, stmt)
    return undo


def _undo_cache(sps, stmt):
    def undo():
        sps.cache.pop(stmt, None)
    return undo


def _undo_evict(sps, stmt):
    def undo():  # the Close was skipped: the server still has it
        if stmt not in sps.cache:
            sps.cache[stmt] = None
            sps.cache.move_to_end(stmt, last=False)
    return undo


# -- SQL that changes what a client or server has prepared -------------------------------------------

_IDENT = rb'(?:[A-Za-z_\x80-\xff][A-Za-z0-9_$\x80-\xff]*|"(?:[^"]|"")+")'
_DEALLOCATE = re.compile(rb"\s*deallocate\s+(?:prepare\s+)?(all|" + _IDENT + rb")\s*;?\s*", re.I | re.S)
_DISCARD_ALL = re.compile(rb"\s*discard\s+all\s*;?\s*", re.I | re.S)
WATCH_WORDS = (b"deallocate", b"discard")
# "DEALLOCATE x" of a client's statement: the server gets an equivalent that has the same tag and
# fails the same way inside an aborted transaction; the PREPARE's CommandComplete is hidden.
DEALLOCATE_STAND_IN = b"PREPARE pgrelay_deallocate AS SELECT; DEALLOCATE pgrelay_deallocate"


def sql_name(token: bytes) -> bytes:
    """An SQL identifier as PostgreSQL reads it: quoted kept (with "" as "), unquoted lower-cased."""
    if token.startswith(b'"'):
        return token[1:-1].replace(b'""', b'"')
    return token.lower()


def classify_query(text: bytes):
    """('all', None) for DEALLOCATE ALL / DISCARD ALL alone, ('one', name) for DEALLOCATE name alone,
    ('watch', None) for other text naming DEALLOCATE or DISCARD, else None."""
    if len(text) > 4096:
        return None
    lower = text.lower()
    if b"deallocate" not in lower and b"discard" not in lower:
        return None
    if _DISCARD_ALL.fullmatch(text):
        return ("all", None)
    m = _DEALLOCATE.fullmatch(text)
    if m:
        token = m.group(1)
        if token.lower() == b"all":
            return ("all", None)
        return ("one", sql_name(token))
    return ("watch", None)


def _query(client, sps: ServerStatements, msg: bytes):
    """A simple Query: (rewritten message or None, queue kind, undo)."""
    text = msg[5:-1] if msg[-1] == 0 else msg[5:]
    found = classify_query(text)
    if found is None:
        return None, ZSKIP, None, None
    what, name = found
    names = client.ps.names
    if what == "one":
        stmt = names.pop(name, None)
        if stmt is None:
            return None, ZSKIP, None, None  # not one of ours: PostgreSQL answers (26000, or its SQL PREPARE)
        return (protocol.message(b"Q", DEALLOCATE_STAND_IN + b"\x00"), ZWATCH,
                _undo_close(names, name, stmt), (client.ps, name))
    if what == "all":
        saved_names, saved_cache = dict(names), collections.OrderedDict(sps.cache)
        names.clear()
        sps.cache.clear()

        def undo():
            for key, value in saved_names.items():
                names.setdefault(key, value)
            for key in saved_cache:
                sps.cache[key] = None
        return None, ZWATCH, undo, (client.ps, ALL)
    return None, ZWATCH, None, None


def _watch(server, entry: list, msg: bytes) -> bool:
    """A CommandComplete while a watched Query runs: False to hide it (the stand-in's PREPARE)."""
    tag = msg[5:-1]
    if tag == b"PREPARE" and entry[3] is not None:
        return False
    if tag in (b"DEALLOCATE ALL", b"DISCARD ALL"):
        server.ps.cache.clear()  # every statement of the server is gone, ours too
        client = server.client
        if client is not None and client.ps is not None and entry[3] is None:
            client.ps.names.clear()  # not a lone statement (undone above otherwise): its effect now
    return True


# -- the server side -------------------------------------------------------------------------------

def kick(server: "ServerConnection") -> None:
    """Send the synthesized replies now due (nothing is owed before them)."""
    sps = server.ps
    queue = sps.queue
    if queue and queue[0][0] == SYNTH and not sps.fskip and not sps.fcarry and not server.skip \
            and not server.carry and server.state == SV_ACTIVE:
        out = bytearray()
        _emit(queue, out)
        client = server.client
        if not queue:
            server.pfilter = False
            sps.answered = client.open_batch if client is not None else 0
        server._relay(bytes(out))
        _resume(client)


def _emit(queue, out: bytearray) -> None:
    while queue and queue[0][0] == SYNTH:
        out += _pop(queue)[2]


def _pop(queue) -> list:
    """The head is answered (or skipped): a name it changed is settled."""
    entry = queue.popleft()
    owner = entry[4]
    if owner is not None:
        ps, name = owner
        if ps.unsettled.get(name) is entry:
            del ps.unsettled[name]
    return entry


def _resume(client) -> None:
    """A client message waiting for a name to settle goes on once it has."""
    if client is not None and client.state != 4:
        ps = client.ps
        if ps is not None and ps.stalled and not ps.pumping and not _blocked(ps, ps.stalled):
            pump(client)


def _clear(sps: ServerStatements) -> None:
    for entry in sps.queue:
        owner = entry[4]
        if owner is not None:
            ps, name = owner
            if ps.unsettled.get(name) is entry:
                del ps.unsettled[name]
    sps.queue.clear()


def server_data(server: "ServerConnection", data: bytes) -> None:
    """The server's bytes while replies are placed: drop, insert, rename, then server._relay."""
    sps = server.ps
    queue = sps.queue
    out = bytearray()
    if sps.fcarry:
        buf = sps.fcarry + data
        sent = sps.fsent
        sps.fcarry = b""
        sps.fsent = 0
    else:
        buf = data
        sent = 0
    n = len(buf)
    pos = 0
    skip = sps.fskip
    if skip:
        take = skip if skip < n else n
        out += buf[:take]
        pos = take
        sps.fskip = skip - take
    if not sps.fskip:
        _emit(queue, out)
        while pos + 5 <= n:
            if not queue:
                out += buf[sent if sent > pos else pos:]
                pos = n
                break
            kind = buf[pos]
            length = _unpack(buf, pos + 1)[0]
            if length < 4:
                raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
            end = pos + 1 + length
            if kind in _WHOLE:
                if length > MAX_WHOLE:
                    raise ProtocolViolation(f"oversized server message {chr(kind)!r}")
                if end > n:
                    break
                msg = buf[pos:end]
                keep = _reply(server, sps, kind, msg)
                if keep is not None:
                    out += keep[sent - pos:] if sent > pos else keep
                pos = end
            else:
                if kind == _T:
                    head = queue[0]
                    if head[0] == TFWD:
                        _done(queue, head)
                start = sent if sent > pos else pos
                if end > n:
                    out += buf[start:]
                    sps.fskip = end - n
                    pos = n
                    break
                out += buf[start:end]
                pos = end
            _emit(queue, out)
    if pos < n:
        sps.fcarry = bytes(buf[pos:])
        sps.fsent = sent - pos if sent > pos else 0
    client = server.client
    if not queue and not sps.fskip and not sps.fcarry:
        server.pfilter = False
        sps.answered = client.open_batch if client is not None else 0  # all of it is answered
    if out:
        server._relay(bytes(out))
    _resume(client)


def _done(queue, head: list) -> None:
    head[1] -= 1
    if head[1] <= 0:
        _pop(queue)


def _reply(server, sps: ServerStatements, kind: int, msg):
    """One whole reply while the queue is not empty: what to forward (None: hidden)."""
    queue = sps.queue
    head = queue[0]
    what = head[0]
    if what == ZSKIP or what == ZWATCH:
        if kind == _Z:
            _done(queue, head)
        elif what == ZWATCH:
            if kind == _C:
                return msg if _watch(server, head, msg) else None
            if kind == 69 and head[3] is not None:  # 'E': the lone DEALLOCATE/DISCARD failed
                undo, head[3] = head[3], None
                undo()
        return msg
    if _TERMINAL[kind]:
        if what == THIDE:
            _pop(queue)
            return None
        if what == TFWD:
            _done(queue, head)
        else:  # TERR answered without error (cannot happen: the name exists); the client sees it
            _pop(queue)
        return msg
    if kind == 69:  # 'E': PostgreSQL skips to Sync
        if what == TERR:
            ours, theirs = head[2]
            msg = bytes(msg)
            if ours in msg:
                body = msg[5:].replace(ours, theirs, 1)
                msg = b"E" + _pack(4 + len(body)) + body
        _fail_batch(sps)
        return msg
    if kind == _Z:  # cannot happen before the Z-kind entry; keep the queue in step
        while queue and queue[0][0] not in (ZSKIP, ZWATCH):
            entry = _pop(queue)
            if entry[3] is not None:
                entry[3]()
        if queue:
            _done(queue, queue[0])
        return msg
    return msg


def _fail_batch(sps: ServerStatements) -> None:
    """An ErrorResponse for the head: it and what follows up to the next Sync are skipped."""
    queue = sps.queue
    undos = []
    while queue and queue[0][0] not in (ZSKIP, ZWATCH):
        entry = _pop(queue)
        if entry[3] is not None:
            undos.append(entry[3])
    if not queue:
        sps.dead = True
    for undo in reversed(undos):
        undo()


def server_closed(server: "ServerConnection") -> None:
    """The server is gone: what its queue owed never happens (undone, newest first)."""
    sps = server.ps
    undos = [entry[3] for entry in sps.queue if entry[3] is not None]
    _clear(sps)
    server.pfilter = False
    for undo in reversed(undos):
        undo()
    client = server.client
    if client is not None and client.ps is not None and client.ps.stalled:
        # Its held messages waited for this server's answers: they go on (to its next server) once
        # the failure has been reported.
        gevent.get_hub().loop.run_callback(pump, client)


def unlinked(server: "ServerConnection") -> None:
    """Its client left while replies were placed: what the server has is no longer certain, so it
    is closed once drained rather than reused."""
    server.close_reason = server.close_reason or "client left while prepared statement replies were owed"
    _clear(server.ps)
    server.ps.answered = 0
    server.pfilter = False


_WIPES = re.compile(rb"discard\s+all|deallocate\s+(?:prepare\s+)?all", re.I)


def reset(server: "ServerConnection", sql: str) -> None:
    """server_reset_query runs: if it may drop protocol-level statements (DISCARD ALL, DEALLOCATE
    ALL), the server's LRU is forgotten. (pgrelay.session_state's own reset keeps them.)"""
    if _WIPES.search(sql.encode()) or "deallocate" in sql.lower() and "from_sql" not in sql:
        server.ps.cache.clear()


def count(server: "ServerConnection") -> int:
    """SHOW SERVERS prepared_statements."""
    return len(server.ps.cache) if server.ps is not None else 0


def client_count(client: "ClientConnection") -> int:
    """SHOW CLIENTS prepared_statements."""
    ps = getattr(client, "ps", None)
    return len(ps.names) if ps is not None else 0
