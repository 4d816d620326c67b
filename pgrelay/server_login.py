"""Opening server connections: connect (TCP or Unix), negotiate TLS, and log in with any auth method."""

from __future__ import annotations

import errno
import socket
import ssl
from typing import TYPE_CHECKING

from gevent import get_hub
from gevent import socket as gsocket

from . import keys, protocol, sockopts
from .auth import SCRAM_MECHANISM, SCRAM_PLUS_MECHANISM, ScramError, md5_from_secret, md5_password
from .errors import ClientGone, ProtocolViolation, ServerError
from .stream import Stream
from .tls import peer_cbind

if TYPE_CHECKING:
    from .relay import Relay
    from .routing import HostAddr

_unpack = protocol._I32.unpack_from


def open_socket(addr: "HostAddr", config=None) -> socket.socket:
    """A connected, non-blocking socket to a server address (TCP or Unix); waits in the greenlet.

    With `config`, a TCP socket gets its tcp_* options (sockopts.tune) before connecting, as in
    PgBouncer: tcp_user_timeout then also bounds the handshake, tcp_socket_buffer the window scale.
    """
    path = addr.unix_path
    if path:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = path
    else:
        infos = gsocket.getaddrinfo(addr.host, addr.port, 0, socket.SOCK_STREAM)
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        if config is not None and not path:
            sockopts.tune(sock, config)
        err = sock.connect_ex(target)
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            watcher = get_hub().loop.io(sock.fileno(), 2)
            try:
                get_hub().wait(watcher)
            finally:
                watcher.close()
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, errno.errorcode.get(err, str(err)))
    except BaseException:
        sock.close()
        raise
    if not path:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(relay: "Relay", addr: "HostAddr", wanted=None) -> Stream | None:
    """A Stream to the server, TLS-wrapped as server_tls_sslmode asks (Unix sockets stay plain).
    With `wanted`, asked once the TCP connect completes: False closes the socket at once, sends
    nothing and returns None (the server was closed while its connect was pending)."""
    try:
        sock = open_socket(addr, relay.config)
    except OSError as exc:
        raise ServerError(f"could not connect to server {addr}: {exc.strerror or exc}") from None
    if wanted is not None and not wanted():
        sock.close()
        return None
    stream = Stream(sock)
    try:
        tls = relay.server_tls
        if tls.context is not None and not addr.unix_path:
            send(stream, protocol._I32I32.pack(8, protocol.SSL_REQUEST_CODE))
            answer = read_exact(stream, 1)
            if answer == b"S":
                if stream.rbuf:  # bytes before the handshake could only come from a man in the middle
                    raise ServerError(f"server {addr} sent unencrypted data after accepting TLS")
                hostname = addr.host if tls.mode == "verify-full" else None
                try:
                    stream.start_tls(tls.context, server_side=False, server_hostname=hostname)
                except ClientGone as exc:
                    raise ServerError(f"TLS with server {addr} failed: {exc}") from None
            elif answer == b"N":
                if tls.required:
                    raise ServerError(f"server {addr} does not support TLS (server_tls_sslmode={tls.mode})")
            else:
                raise ServerError(f"server {addr} sent an invalid answer to SSLRequest")
    except BaseException:
        stream.close()
        raise
    return stream


def read(stream: Stream) -> tuple[int, bytes]:
    try:
        return stream.read_message(protocol.MAX_MESSAGE_LENGTH)
    except ProtocolViolation as exc:
        raise ServerError(f"server sent a bad message: {exc}") from None
    except ClientGone as exc:
        raise ServerError(f"server closed the connection ({exc})") from None


def read_exact(stream: Stream, n: int) -> bytes:
    try:
        return stream.read_exact(n)
    except ClientGone as exc:
        raise ServerError(f"server closed the connection ({exc})") from None


def send(stream: Stream, data: bytes) -> None:
    try:
        stream.sendall(data)
    except ClientGone as exc:
        raise ServerError(f"server connection lost ({exc})") from None


def login(relay: "Relay", stream: Stream, user: str, dbname: str, extra: tuple[tuple[str, str], ...],
          password: str | None, version: int = protocol.PROTOCOL_3_0) -> tuple[dict[str, str], bytes]:
    """Send the StartupMessage and authenticate; returns (ParameterStatus values, BackendKeyData).

    `password` is a plaintext password, an md5 secret, or a SCRAM verifier (usable only with
    pass-through keys a client's SCRAM login left behind). Only `user`, `database` and the
    database definition's own parameters are sent: never anything a client asked for.
    `version` is the protocol asked for: a server that speaks less (PostgreSQL before 18 for 3.2)
    answers NegotiateProtocolVersion and the login goes on in the version it offers.
    """
    params = {"user": user, "database": dbname}
    params.update(extra)
    send(stream, protocol.startup_message(params, version))
    minor = version & 0xFFFF
    scram = None
    server_params: dict[str, str] = {}
    key = b""
    while True:
        kind, body = read(stream)
        if kind == 82:  # 'R'
            if len(body) < 4:
                raise ServerError("server sent a short authentication request")
            code = _unpack(body, 0)[0]
            if code == 0:
                continue
            if code == 3:
                if password is None:
                    raise ServerError("server asked for a password and none is configured")
                if (password.startswith("md5") and len(password) == 35) or password.startswith("SCRAM-SHA-256$"):
                    # A stored hash must never go out as a cleartext password: for md5 servers it is
                    # as good as the password, and a man in the middle can ask for cleartext.
                    raise ServerError("server asked for a cleartext password, but only a hashed secret "
                                      "is known for this user")
                send(stream, protocol.password_message(protocol.cstr(password)))
            elif code == 5:
                if password is None or len(body) < 8:
                    raise ServerError("server asked for an md5 password and none is configured")
                if password.startswith("md5") and len(password) == 35:
                    payload = md5_from_secret(password, body[4:8])
                else:
                    payload = md5_password(password, user, body[4:8])
                send(stream, protocol.password_message(payload + b"\x00"))
            elif code == 10:
                mechanisms = body[4:].split(b"\x00")
                if SCRAM_MECHANISM.encode() not in mechanisms:
                    raise ServerError("server offers no supported SASL mechanism")
                cbind = None
                if SCRAM_PLUS_MECHANISM.encode() in mechanisms and isinstance(stream.sock, ssl.SSLSocket):
                    cbind = peer_cbind(stream.sock)
                scram = relay.scram_client(user, password, cbind)
                if scram is None:
                    raise ServerError("server asked for SCRAM and there is no password, and no SCRAM keys "
                                      "from a client login to pass through")
                send(stream, protocol.sasl_initial_response(scram.mechanism, scram.first_message()))
            elif code == 11:
                if scram is None:
                    raise ServerError("server sent SASLContinue out of order")
                try:
                    send(stream, protocol.password_message(scram.final_message(body[4:])))
                except ScramError as exc:
                    raise ServerError(f"server login failed: {exc}") from None
            elif code == 12:
                if scram is None:
                    raise ServerError("server sent SASLFinal out of order")
                try:
                    scram.verify_final(body[4:])
                except ScramError as exc:
                    raise ServerError(f"server login failed: {exc}") from None
            else:
                raise ServerError(f"server asked for an unsupported authentication method ({code})")
        elif kind == 83:  # 'S'
            try:
                name, value = protocol.parse_parameter_status(body)
            except ValueError:
                raise ServerError("server sent a bad ParameterStatus") from None
            server_params[name] = value
        elif kind == 75:  # 'K'
            try:
                key = keys.server_key(body, minor)
            except ValueError as exc:
                raise ServerError(str(exc)) from None
        elif kind == 90:  # 'Z'
            return server_params, key
        elif kind == 69:  # 'E'
            fields = protocol.parse_fields(body)
            raise ServerError(fields.get("M", "server login failed"), fields)
        elif kind == 118:  # NegotiateProtocolVersion: an older server, or options it does not know
            try:
                minor = keys.server_version(body, version)
            except ValueError as exc:
                raise ServerError(f"server sent a bad NegotiateProtocolVersion: {exc}") from None
        elif kind == 78:  # NoticeResponse
            continue
        else:
            raise ServerError(f"server sent unexpected message {chr(kind)!r} during login")


def simple_query(stream: Stream, sql: str, params: dict[str, str] | None = None) -> list[list[str | None]]:
    """Run one simple Query; returns its rows as text. ParameterStatus updates go to `params`."""
    send(stream, protocol.query(sql))
    return _collect(stream, params)


def extended_query(stream: Stream, sql: str, args: list[str | None]) -> list[list[str | None]]:
    """Run one parameterised query (unnamed statement, text format); returns its rows."""
    bind_args = b"".join(protocol.pack_i32(0xFFFFFFFF) if a is None else
                         protocol.pack_i32(len(a.encode())) + a.encode() for a in args)
    data = (protocol.message(b"P", b"\x00" + protocol.cstr(sql) + b"\x00\x00")
            + protocol.message(b"B", b"\x00\x00\x00\x00" + len(args).to_bytes(2, "big") + bind_args + b"\x00\x00")
            + protocol.message(b"E", b"\x00" + protocol.pack_i32(0))
            + protocol.SYNC)
    send(stream, data)
    return _collect(stream, None)


def _collect(stream: Stream, params: dict[str, str] | None) -> list[list[str | None]]:
    rows: list[list[str | None]] = []
    error = None
    while True:
        kind, body = read(stream)
        if kind == 68:  # 'D'
            count = int.from_bytes(body[:2], "big")
            pos, row = 2, []
            for _ in range(count):
                length = _unpack(body, pos)[0]
                pos += 4
                if length == 0xFFFFFFFF:
                    row.append(None)
                else:
                    row.append(body[pos:pos + length].decode("utf-8", "replace"))
                    pos += length
            rows.append(row)
        elif kind == 69:
            error = protocol.parse_fields(body)
        elif kind == 83 and params is not None:
            name, value = protocol.parse_parameter_status(body)
            params[name] = value
        elif kind == 90:
            if error is not None:
                raise ServerError(error.get("M", "query failed"), error)
            return rows
