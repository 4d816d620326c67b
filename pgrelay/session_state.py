"""Session state in transaction pooling: parameters follow the client; unmovable state pins it or is refused.

How it stays off the hot path:

* The server's CommandComplete tags are already scanned (``ServerConnection._scan``): a tag whose
  first and third letters are those of SET, RESET, PREPARE, LISTEN, UNLISTEN, DECLARE, DEALLOCATE,
  DISCARD, DROP, DO, CREATE, CLOSE or CALL (``STATE_TAG``, one table lookup) calls ``tag_seen``,
  which flags the client. SELECT, INSERT, UPDATE, DELETE, COMMIT, BEGIN... cost one byte compare.
* The client's statement text is searched (transaction and statement pooling: one ``bytes.lower()``
  and three substring searches per read, in ClientConnection._handle; a case-insensitive regex
  measured 3-4 times slower) only for what a tag cannot show: ``advisory`` (pg_advisory_lock is a
  plain SELECT), ``set_config`` and ``temp`` (SELECT INTO TEMP / CREATE TEMP TABLE AS answer SELECT n).
* A flagged client's transaction ends (ReadyForQuery 'I', nothing owed): the ReadyForQuery is held
  back (``hold``; if it is not whole at the end of the read, the probe runs at release instead) and,
  before the server is released, pgrelay runs one query of its own (``probe_sql``) that reads the session-set
  parameters in the server's own spelling and what cannot move (SQL prepared statements,
  WITH HOLD cursors, LISTEN channels, temporary tables, session advisory locks, SET ROLE /
  SET SESSION AUTHORIZATION). Its reply is swallowed (``swallow``). SET LOCAL and a rolled back
  SET are gone by then, RESET is seen: the snapshot is exact.
* The parameters become the client's ``extras`` (the server's too); a later server whose extras
  differ gets ``RESET name`` / ``set_config(name, value, false)`` in the SET batch that already
  applies the reported parameters (``sync_sql``), before the client's bytes.
* Unmovable state, by ``session_state``: ``pin`` keeps the server linked to the client (it is
  released once a probe finds the state gone); ``error`` holds back the ReadyForQuery, undoes the
  state (``cleanup_sql``) and answers 0A000 (inside a transaction block the transaction is left
  aborted, as an ERROR leaves it in PostgreSQL); ``allow`` ignores it (PgBouncer's behaviour).

LISTEN: ``listen_pins(channel)`` is the one place that decides whether a LISTEN channel found on a
client's server pins it; the shared listening connection (LISTEN in transaction mode) answers LISTEN
itself, so no channel is ever found on a pooled server for it.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from . import protocol
from .errors import FEATURE_NOT_SUPPORTED, ProtocolViolation, Reject
from .pool import CL_CLOSED, SV_ACTIVE, SV_SYNC, change_server_state

if TYPE_CHECKING:
    from .client import ClientConnection
    from .server import ServerConnection

log = logging.getLogger("pgrelay.session_state")

# client.sstate bits
PROBE = 1       # a tag or the statement text says session state may have changed: probe at the end
CANDIDATE = 2   # session_state = error: the change may be unmovable: hold the ReadyForQuery and probe
PINNED = 4      # the client keeps its server (session_state = pin)
SESSION_LOCK = 8  # its text called a session-level advisory lock function (not pg_advisory_xact_lock)
LISTENED = 16   # a LISTEN tag: inside a transaction block, pg_listening_channels() shows it only after COMMIT
STICKY = 32     # it prepared a named statement whose text names them: every transaction is probed
_CLEARED = ~(PROBE | CANDIDATE | SESSION_LOCK | LISTENED)

_Z, _D, _E, _S, _A = 90, 68, 69, 83, 65
_I, _T = 73, 84

# First letter of a CommandComplete tag -> the third letters that make it a state-changing tag.
# SET (S,T) RESET (R,S) PREPARE (P,E) LISTEN (L,S) UNLISTEN (U,L) DECLARE (D,C) DEALLOCATE (D,A)
# DROP (D,O) DISCARD (D,S) DO (D,\0) CREATE (C,E) CLOSE (C,O) CALL (C,L). Not: SELECT (S,L),
# ROLLBACK/RELEASE (R,L), LOCK (L,C), UPDATE (U,D), DELETE (D,L), COMMIT (C,M), COPY (C,P).
STATE_TAG = [b""] * 256
for _first, _thirds in ((b"S", b"T"), (b"R", b"S"), (b"P", b"E"), (b"L", b"S"), (b"U", b"L"),
                        (b"D", b"CAOS\x00"), (b"C", b"EOL")):
    STATE_TAG[_first[0]] = _thirds
STATE_TAG = tuple(STATE_TAG)
# Tags that may create state that cannot move (session_state = error checks them inside a transaction).
_UNMOVABLE_TAGS = (b"PREPARE", b"LISTEN", b"DECLARE", b"CREATE", b"SET", b"DO", b"CALL")

_SESSION_LOCK = re.compile(rb"(?i)advisory_lock")  # pg_advisory_lock, pg_try_advisory_lock(_shared)

_RESETS = re.compile(r"(?i)\b(discard\s+all|reset\s+all)\b")

PIN, ERROR, ALLOW = "pin", "error", "allow"


# -- the hot path's callees -------------------------------------------------------------------

def tag_seen(server: "ServerConnection", tag: bytes) -> None:
    """A state-changing CommandComplete tag (already matched by STATE_TAG) for the server's client."""
    client = server.client
    if client is None:  # drained after its client left: what it changed is unknown, so it is reset
        if server.state != SV_ACTIVE and server.state != SV_SYNC:
            server.extras = None
        return
    client.sstate |= PROBE
    if server.relay.config.session_state == ERROR and tag.startswith(_UNMOVABLE_TAGS):
        client.sstate |= CANDIDATE | (LISTENED if tag.startswith(b"LISTEN") else 0)


def text_seen(client: "ClientConnection", data: bytes) -> None:
    """The client's statement text names advisory locks, set_config or temp. In a named Parse the
    text is not sent again when the statement is executed: that client is probed after every
    transaction from now on (STICKY)."""
    client.sstate |= PROBE
    if _named_parse_with_keyword(data):
        client.sstate |= STICKY
    if client.relay.config.session_state == ERROR:
        client.sstate |= CANDIDATE
        if _SESSION_LOCK.search(data) is not None:
            client.sstate |= SESSION_LOCK


def _named_parse_with_keyword(data: bytes) -> bool:
    pos, n = 0, len(data)
    while pos + 5 <= n:
        kind = data[pos]
        end = pos + 1 + int.from_bytes(data[pos + 1:pos + 5], "big")
        if kind == 80 and pos + 5 < n and data[pos + 5] != 0:  # 'P' with a statement name
            text = data[pos + 5:end].lower()
            if b"advisory" in text or b"set_config" in text or b"temp" in text:
                return True
        pos = end if end > pos else n
    return False


def hold(server: "ServerConnection", client: "ClientConnection", data: bytes, zs: int) -> bool:
    """A flagged transaction ended (or, with session_state = error, a state candidate ran inside a
    transaction block): keep the final ReadyForQuery back and probe first, so that when the client
    hears the outcome its server is already released (or its refusal is ready). True if `data` was
    taken over (forwarded up to the Z)."""
    sstate = client.sstate
    if server.expect - zs > 0 or not (sstate & CANDIDATE and server.txstatus == _T and client.pool.mode == 1
                                      or sstate & (PROBE | CANDIDATE) and server.txstatus == _I):
        return False
    if len(data) < 6 or data[-6] != _Z or data[-5:-1] != b"\x00\x00\x00\x05" or server.skip or server.carry:
        return False  # the ReadyForQuery is not whole at the end of this read: probed at release instead
    if not client.at_boundary():
        # The client is mid-message (a CopyData or Query half sent) or mid-batch: a probe now would
        # land inside its message. release_if_done probes once the client is at a boundary.
        return False
    head = data[:-6]
    stats = client.pool.stats
    stats.bytes_sent += len(data)
    stats.query_count += zs
    server.expect = 0
    if head:
        client.write(head, server)
    probe(server, client, held=data[-6:])
    return True


def at_release(server: "ServerConnection", client: "ClientConnection") -> None:
    """release_if_done found the transaction over but the client flagged: probe, or stay pinned."""
    if client.sstate & PROBE:
        probe(server, client)
    # else: pinned, nothing new seen: the client keeps its server


# -- the probe ----------------------------------------------------------------------------------

def probe_sql(server: "ServerConnection") -> str:
    """The state query. Outside a transaction block the client's statement_timeout is read first
    (a tiny query) and lifted for the rest (SET LOCAL: one implicit transaction), so a short one
    cannot cancel pgrelay's query."""
    user = protocol.quote_literal(server.pool.route.server_user or "")
    head = ("SELECT 'x', name, setting FROM pg_settings WHERE name = 'statement_timeout' AND source = 'session';"
            "SET LOCAL statement_timeout = 0;") if server.txstatus == _I else ""
    return (head + "SELECT 's', name, setting FROM pg_settings WHERE source = 'session'"
            " UNION ALL SELECT 'p', min(name), count(*)::text FROM pg_prepared_statements WHERE from_sql"
            " HAVING count(*) > 0"
            " UNION ALL SELECT 'c', min(name), count(*)::text FROM pg_cursors WHERE is_holdable HAVING count(*) > 0"
            " UNION ALL SELECT 'l', min(c), count(*)::text FROM pg_listening_channels() c HAVING count(*) > 0"
            " UNION ALL SELECT 't', min(relname), count(*)::text FROM pg_class"
            " WHERE relnamespace = pg_my_temp_schema() AND relkind <> 'i' HAVING count(*) > 0"
            " UNION ALL SELECT 'a', NULL, count(*)::text FROM pg_locks"
            " WHERE locktype = 'advisory' AND pid = pg_backend_pid() HAVING count(*) > 0"
            " UNION ALL SELECT 'r', current_user::text, session_user::text"
            f" WHERE current_user <> session_user OR session_user <> {user}")


PROBE_TRIES = 5  # a probe cancelled (57014: the client's cancel, or its statement_timeout hit the
                 # probe's first, pg_settings, statement on a loaded machine) is sent again, this often


def probe(server: "ServerConnection", client: "ClientConnection", held: bytes = b"", retry: int = 0) -> None:
    """Ask the server for the client's session state; the reply is read by `swallow`. `retry`:
    how many times it was cancelled already."""
    client.stop_reading()
    change_server_state(server, SV_SYNC)
    if not retry:  # bytes the client sends meanwhile wait here (ClientConnection._forward)
        server.sync_data = b""
        server.sync_queries = 0
    server.sync_error = None
    server.swallow = bytearray()
    server.probe = (f"probe-again-{retry}" if retry else "probe", held, server.txstatus)
    server.write(protocol.query(probe_sql(server)))


def swallow(server: "ServerConnection", data: bytes) -> None:
    """Read the reply to pgrelay's probe (or to a SET batch that ends with one) whole."""
    buf = server.swallow
    buf += data
    if len(buf) > (1 << 24):
        raise ProtocolViolation("too much output from a pgrelay-issued query")
    rows = server.probe[3] if len(server.probe) > 3 else None
    if rows is None:
        rows = []
        server.probe = server.probe + (rows,)
    pos, n = 0, len(buf)
    while pos + 5 <= n:
        kind = buf[pos]
        length = protocol._I32.unpack_from(buf, pos + 1)[0]
        if length < 4:
            raise ProtocolViolation(f"server message {chr(kind)!r} with length {length}")
        end = pos + 1 + length
        if end > n:
            break
        body = bytes(buf[pos + 5:end])
        start, pos = pos, end
        if kind == _A:  # a NOTIFY for a LISTEN on this (pinned) server: the client's, as it came
            if server.client is not None:
                server.client.write(bytes(buf[start:end]), server)
        elif kind == _D:
            row = tuple(protocol.data_row(body))
            if len(row) == 3:  # the probe's rows (a SET batch's set_config rows have one column)
                rows.append(row)
        elif kind == _S:
            server._parameter_status(body)
        elif kind == _E:
            server.sync_error = Reject.from_fields(protocol.parse_fields(body))
        elif kind == _Z:
            server.txstatus = body[0] if body else _I
            del buf[:pos]
            if buf:
                raise ProtocolViolation("server sent data after ReadyForQuery of a pgrelay query")
            what = server.probe
            server.probe = None
            _done(server, what, rows)
            return
    del buf[:pos]


def _done(server: "ServerConnection", probe: tuple, rows: list) -> None:
    what, held, txstatus = probe[0], probe[1], probe[2]
    client = server.client
    error = server.sync_error
    if what == "sync":  # a SET batch with a probe at its end: learn the server's spellings, then go on
        if error is None and server.txstatus == _I and client is not None:
            settings = _settings(server, rows)
            client.extras = _canonical(client, settings)
            client.baseline_raw = False
        server._swallowed()
        if error is None and client is not None and client.server is server:
            server.extras = client.extras
        return
    if what == "cleanup":
        _cleaned(server, held, txstatus, error, probe[4])
        return
    if client is None:
        server.close("session state probe without a client")
        return
    if error is not None and error.sqlstate == "57014" and what.startswith("probe") and server.txstatus == txstatus:
        tries = int(what[12:]) + 1 if what != "probe" else 1
        if tries < PROBE_TRIES:
            probe(server, client, held, retry=tries)  # a cancel hit pgrelay's query: once more
            return
    if error is not None or server.txstatus != txstatus:
        server.close("session state probe failed")
        client.disconnect("session state probe failed",
                          Reject(f"session state probe failed: {error.message if error else 'transaction status'}",
                                 error.sqlstate if error else "XX000"))
        return
    reasons = _unmovable(rows)
    if txstatus == _T and client.sstate & LISTENED and listen_pins(None) and not any(r.startswith("LISTEN")
                                                                                      for r in reasons):
        reasons.append("LISTEN (at COMMIT)")
    if txstatus == _I:
        settings = _settings(server, rows)
        server.extras = settings
        client.extras = _with_baseline(client, settings)
    mode = server.relay.config.session_state
    if mode == ERROR and reasons and (txstatus == _I or client.sstate & CANDIDATE):
        if txstatus == _T and not client.sstate & SESSION_LOCK:
            # advisory locks held inside a transaction block may be xact-level ones
            reasons = [r for r in reasons if not r.startswith("session advisory")]
        if reasons and held:
            client.sstate &= _CLEARED
            _cleanup(server, reasons, held, txstatus)
            return
        if reasons:  # the outcome was already sent: undo it all the same, and say so in the log
            log.warning("%s session state %s undone after the fact (session_state = error)", client.label,
                        "; ".join(reasons))
            client.sstate &= _CLEARED
            _cleanup(server, reasons, b"", txstatus)
            return
    if txstatus != _I:  # an error-mode check inside a transaction found nothing unmovable: go on
        client.sstate &= ~(CANDIDATE | SESSION_LOCK | LISTENED)
        _resume(server, client, held)
        return
    client.sstate &= _CLEARED
    if client.sstate & STICKY:
        client.sstate |= PROBE
    if mode == PIN and reasons:
        _pin(server, client, reasons)
    elif client.sstate & PINNED:
        _unpin(client, server)
    _resume(server, client, held)


def _settings(server: "ServerConnection", rows: list, lifted: bool = True) -> tuple:
    """The session-set parameters of a probe, in the server's spelling, without those tracked by
    ParameterStatus (pvals) and without the transaction_* ones. `lifted`: the probe's own SET LOCAL
    statement_timeout shows in its 's' rows; the client's value is its 'x' row."""
    relay = server.relay
    reported = relay.tracked_index
    params = server.params
    skip = {name.lower() for name in params if name.lower() in reported}
    out = []
    for row in rows:
        if row[0] == "s" and row[1] == "statement_timeout" and lifted:
            continue  # pgrelay's own SET LOCAL: the 'x' row has the client's value, if any
        if row[0] not in ("s", "x") or row[1] is None:
            continue
        name = row[1].lower()
        if name in skip or name.startswith("transaction_"):
            continue
        out.append((name, row[2] or ""))
    return tuple(sorted(out))


def _canonical(client: "ClientConnection", settings: tuple) -> tuple:
    """The client's startup parameters in the server's spelling (read right after they were set)."""
    have = dict(settings)
    client.baseline = {name: have.get(name, value) for name, value in client.baseline.items()}
    return tuple(sorted({**have, **client.baseline}.items())) if client.baseline else settings


def _with_baseline(client: "ClientConnection", settings: tuple) -> tuple:
    """A startup parameter missing from the session-set ones was RESET: PostgreSQL goes back to the
    startup value, so the client keeps it (re-applied on its next transaction)."""
    baseline = client.baseline
    if not baseline:
        return settings
    names = {name for name, _ in settings}
    missing = [(name, value) for name, value in baseline.items() if name not in names]
    return tuple(sorted(settings + tuple(missing))) if missing else settings


def _unmovable(rows: list) -> list[str]:
    out = []
    for row in rows:
        kind = row[0]
        if kind == "p":
            out.append(f"prepared statement \"{row[1]}\"" + (f" (and {int(row[2]) - 1} more)" if row[2] != "1" else ""))
        elif kind == "c":
            out.append(f"WITH HOLD cursor \"{row[1]}\"" + (f" (and {int(row[2]) - 1} more)" if row[2] != "1" else ""))
        elif kind == "l":
            if listen_pins(row[1]):
                out.append(f"LISTEN \"{row[1]}\"" + (f" (and {int(row[2]) - 1} more)" if row[2] != "1" else ""))
        elif kind == "t":
            out.append(f"temporary table \"{row[1]}\"" + (f" (and {int(row[2]) - 1} more)" if row[2] != "1" else ""))
        elif kind == "a":
            out.append(f"session advisory lock ({row[2]})")
        elif kind == "r":
            out.append(f"SET ROLE / SET SESSION AUTHORIZATION (current_user {row[1]}, session_user {row[2]})")
    return out


def listen_pins(channel: str) -> bool:
    """Whether a LISTEN channel found on a pooled server pins its client. The shared listening
    connection (LISTEN in transaction mode) answers LISTEN without a pooled server, so a channel
    found here was LISTENed on the server itself: it pins."""
    return True


def _pin(server: "ServerConnection", client: "ClientConnection", reasons: list[str]) -> None:
    if not client.sstate & PINNED:
        client.sstate |= PINNED
        client.pool.pinned += 1
        log.info("%s pinned to %s until its session state is gone: %s", client.label, server, "; ".join(reasons))
    client.pinned_by = "; ".join(reasons)


def _unpin(client: "ClientConnection", server: "ServerConnection | None") -> None:
    if client.sstate & PINNED:
        client.sstate &= ~PINNED
        client.pool.pinned -= 1
        client.pinned_by = ""
        if server is not None:
            log.info("%s unpinned from %s: its session state is gone", client.label, server)


def _resume(server: "ServerConnection", client: "ClientConnection", held: bytes) -> None:
    """Back to relaying: the held ReadyForQuery goes out, bytes the client sent meanwhile follow,
    and the server is released unless pinned or busy again."""
    change_server_state(server, SV_ACTIVE)
    if held:
        client.pool.stats.end_round(client, held[-1] == _I)
        client.write(held, server)
        if client.listen is not None:  # notifications held for it go after this ReadyForQuery (notify)
            from . import notify
            notify.ready(client, server, held)
    data, server.sync_data = server.sync_data, b""
    server.expect += server.sync_queries
    server.sync_queries = 0
    if data:
        server.write(data, client)
    client.start_reading()
    if client.leaving:
        client.leave_if_done()
    elif server.client is client and server.state == SV_ACTIVE and not client.sstate:
        server.release_if_done()


# -- session_state = error: undo and refuse -------------------------------------------------------

def cleanup_sql(reasons: list[str] | None = None) -> str:
    """Statements that remove what cannot move (all of it when `reasons` is None), keeping
    protocol-level prepared statements (pgrelay's own, renamed per server)."""
    want = lambda prefix: reasons is None or any(r.startswith(prefix) for r in reasons)  # noqa: E731
    parts = []
    if want("SET ROLE"):
        parts += ["RESET SESSION AUTHORIZATION", "RESET ROLE"]
    if want("WITH HOLD"):
        parts.append("CLOSE ALL")
    if want("LISTEN"):
        parts.append("UNLISTEN *")
    if want("temporary"):
        parts.append("DISCARD TEMP")
    if want("session advisory"):
        parts.append("SELECT pg_advisory_unlock_all()")
    if want("prepared"):
        parts.append("DO $pgrelay$DECLARE r record; BEGIN FOR r IN SELECT name FROM pg_prepared_statements "
                     "WHERE from_sql LOOP EXECUTE 'DEALLOCATE ' || quote_ident(r.name); END LOOP; END$pgrelay$")
    return ";".join(parts)


# A pinned (or possibly dirty) client left: everything of its session goes, as DISCARD ALL would
# do, but protocol-level prepared statements stay (they are pgrelay's, renamed per server).
RESET_SQL = cleanup_sql() + ";DISCARD SEQUENCES;RESET ALL"


def _cleanup(server: "ServerConnection", reasons: list[str], held: bytes, txstatus: int) -> None:
    sql = cleanup_sql(reasons)
    if txstatus != _I:
        # PostgreSQL leaves a transaction block aborted after an ERROR: do the same on the server, so
        # the client's ROLLBACK (or COMMIT, answered ROLLBACK) behaves as it would there.
        sql = ("ROLLBACK;" + sql + ";BEGIN;DO $pgrelay$BEGIN RAISE EXCEPTION "
               "'pgrelay: session state refused (session_state = error)'; END$pgrelay$")
    server.swallow = bytearray()
    server.sync_error = None
    server.probe = ("cleanup", held, txstatus, [], reasons)
    server.write(protocol.query(sql))


def _cleaned(server: "ServerConnection", held: bytes, txstatus: int, error, reasons: list[str]) -> None:
    client = server.client
    expected = _I if txstatus == _I else ord("E")
    if client is None or server.txstatus != expected or (error is not None and txstatus == _I):
        server.close("session state cleanup failed")
        if client is not None:
            client.disconnect("session state cleanup failed", Reject("session state cleanup failed", "XX000"))
        return
    if held:
        client.write(refusal(client, reasons).encode(), server)
        held = held[:-1] + bytes((expected,))
    _resume(server, client, held)


def refusal(client: "ClientConnection", reasons: list[str]) -> Reject:
    """The ERROR a client gets for unmovable state with session_state = error."""
    from .listener import listener_specs
    ports = []
    try:
        for info, _ in listener_specs(client.relay.config):
            if info.role == "direct":
                ports.append(f"the direct port {info.port}")
            elif info.pool_mode == "session":
                ports.append(f"the session port {info.port}")
    except Exception:  # a hint is never worth a failure
        ports = []
    where = " or ".join(ports) if ports else "a session-mode pool (pool_mode = session) or a direct port"
    what = "; ".join(reasons) if reasons else "session state"
    return Reject(f"session state cannot be kept in {('statement' if client.pool.mode == 2 else 'transaction')} "
                  f"pooling: {what}", FEATURE_NOT_SUPPORTED, "ERROR",
                  detail="pgrelay undid it (session_state = error): the next transaction may run on another server.",
                  hint=f"Connect to {where} for session state, or set session_state = pin.")


# -- parameters: login, SET batches, reset ----------------------------------------------------------

def startup(client: "ClientConnection") -> None:
    """At login (pooled ports): startup parameters that are not tracked become the client's
    `extras`, applied with the SET batches (set_config) like the tracked ones."""
    tracked = client.relay.tracked_index
    baseline = {name: value for name, value in client.params.items() if name.lower() not in tracked}
    client.baseline = baseline
    client.baseline_raw = bool(baseline)
    client.extras = tuple(sorted(baseline.items()))


VALIDATED_LIMIT = 256  # startup parameter sets remembered per pool as PostgreSQL accepted them


def validate(client: "ClientConnection", welcome: list[tuple[str, str]]) -> bool:
    """Transaction and statement pooling, at login: startup parameters are checked as PostgreSQL
    checks them, before the welcome, by applying them to a server of the pool (its SET batch, whose
    failure is the client's FATAL with PostgreSQL's SQLSTATE and message); the server's spelling is
    kept, and a set the pool has accepted before is not checked again. False: the client is gone."""
    from . import login_link
    pool = client.pool
    cache = pool.__dict__.setdefault("validated_startup", {})
    key = tuple(sorted(client.baseline.items()))
    known = cache.get(key)
    if known is not None:
        client.baseline = dict(known)
        client.baseline_raw = False
        client.extras = tuple(sorted(known.items()))
        return True
    server = login_link.take_server(client, welcome)
    if server is None:
        return False
    if not client.baseline_raw:
        if len(cache) >= VALIDATED_LIMIT:
            cache.clear()
        cache[key] = dict(client.baseline)
    if server.state == SV_ACTIVE and server.client is client:
        pool.release(server)
    return client.state != CL_CLOSED


def welcome(client: "ClientConnection", defaults: dict[str, str]) -> None:
    """At the welcome: a tracked parameter that the server does not report (statement_timeout in
    track_extra_parameters) cannot be followed by ParameterStatus, so it is an extra too (its
    tracked value stays None, the server's default). Transaction and statement pooling watch
    the statement text (ClientConnection._handle)."""
    relay = client.relay
    reported = {name.lower() for name in defaults}
    pvals = list(client.pvals)
    moved = False
    for lower, index in relay.tracked_index.items():
        if lower not in reported and index < len(pvals):
            value = pvals[index]
            pvals[index] = None
            if value is not None:
                client.baseline[lower] = value
                moved = True
    client.pvals = tuple(pvals)
    base = client.pool.__dict__.get("base_extras") if client.pool is not None else None
    if base:  # connect_query's SETs: the client starts with them, and RESET goes back to them
        for name, value in base:
            if name not in client.baseline:
                client.baseline[name] = value
                moved = True
    if moved:
        client.baseline_raw = True
        client.extras = tuple(sorted({**dict(client.extras), **client.baseline}.items()))
    pool = client.pool
    client.watch = True if pool is not None and pool.mode else None


def sync_sql(client: "ClientConnection", server: "ServerConnection", sql: str | None) -> str | None:
    """Append what makes the server's extras match the client's to a SET batch (or start one)."""
    want = dict(client.extras)
    have = dict(server.extras or ())
    parts = [sql] if sql else []
    for name in have:
        if name not in want:
            parts.append(f"RESET {_ident(name)}")
    for name, value in want.items():
        if have.get(name) != value:
            parts.append(f"SELECT set_config({protocol.quote_literal(name)}, {protocol.quote_literal(value)}, false)")
    if client.baseline_raw:
        parts.append(probe_sql(server))
        server.probe = ("sync", b"", _I)
    return ";".join(parts) if parts else None


def _ident(name: str) -> str:
    return name if re.fullmatch(r"[a-z_][a-z0-9_.]*", name) else '"' + name.replace('"', '""') + '"'


def after_connect_query(server: "ServerConnection") -> None:
    """At server login, after connect_query (blocking, in the login greenlet): the parameters it
    SET are the pool's defaults, which every client of the pool starts with (`welcome`)."""
    from . import server_login
    rows = server_login.simple_query(server.stream, "SELECT name, setting FROM pg_settings WHERE source = 'session'",
                                     server.params)
    server.extras = _settings(server, [("s", name, value) for name, value in rows], lifted=False)
    server.pool.__dict__["base_extras"] = server.extras


def after_reset(server: "ServerConnection") -> None:
    """server_reset_query (or pgrelay's own reset of a server whose session state was unknown)
    succeeded: after DISCARD ALL / RESET ALL the server has its defaults again."""
    if server.extras is None or _RESETS.search(server.pool.reset_query or ""):
        server.extras = ()  # connect_query's SETs are gone too; its clients get them again (welcome)
        server.pvals = server.relay.tracked_values(server.params)


def left(client: "ClientConnection", server: "ServerConnection | None") -> None:
    """A flagged or pinned client leaves its server (disconnect, or the server closes): the pin
    ends, and the server (if it lives on) is reset before anyone else gets it (Pool.release)."""
    if client.sstate & PINNED:
        _unpin(client, None)
        log.info("%s unpinned: it left its server", client.label)
    client.sstate = 0
    if server is not None:
        server.extras = None
