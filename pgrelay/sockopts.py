"""TCP options of client and server sockets: tcp_keepalive, tcp_keepidle, tcp_keepintvl, tcp_keepcnt,
tcp_user_timeout and tcp_socket_buffer, set as PgBouncer's tune_socket() sets them.

`tune()` runs on every new TCP socket: a client's right after accept(), a server's (including
cancel connections) before connect(). Unix sockets are never touched. Each socket gets the values
of the configuration current when it is opened, so a reload applies to new connections only, as in
PgBouncer.

Where PgBouncer drops the connection when the kernel refuses an option (a tcp_keepcnt above
Linux's 127, say), pgrelay keeps it and logs a warning, once per option and value.
"""

from __future__ import annotations

import errno
import logging
import socket

log = logging.getLogger("pgrelay")

# Linux: TCP_KEEPIDLE; macOS: TCP_KEEPALIVE (the idle time, in seconds).
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)

_warned: set[tuple[str, int]] = set()


def tune(sock: socket.socket, config) -> None:
    """Set the tcp_* options of `config` on a TCP socket (call it for TCP sockets only)."""
    if config.tcp_keepalive:
        _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, "tcp_keepalive")
        # 0 leaves the OS default (Linux: net.ipv4.tcp_keepalive_time/intvl/probes).
        if config.tcp_keepidle:
            _set(sock, socket.IPPROTO_TCP, _KEEPIDLE, config.tcp_keepidle, "tcp_keepidle")
        if config.tcp_keepintvl:
            _set(sock, socket.IPPROTO_TCP, _KEEPINTVL, config.tcp_keepintvl, "tcp_keepintvl")
        if config.tcp_keepcnt:
            _set(sock, socket.IPPROTO_TCP, _KEEPCNT, config.tcp_keepcnt, "tcp_keepcnt")
    else:
        _set(sock, socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0, "tcp_keepalive")
    if config.tcp_user_timeout:
        _set(sock, socket.IPPROTO_TCP, _USER_TIMEOUT, config.tcp_user_timeout, "tcp_user_timeout")
    if config.tcp_socket_buffer:
        _set(sock, socket.SOL_SOCKET, socket.SO_SNDBUF, config.tcp_socket_buffer, "tcp_socket_buffer")
        _set(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, config.tcp_socket_buffer, "tcp_socket_buffer")


def _set(sock: socket.socket, level: int, option: int | None, value: int, setting: str) -> None:
    if option is None:
        _warn(setting, value, "not supported on this platform")
        return
    try:
        sock.setsockopt(level, option, value)
    except OverflowError:
        _warn(setting, value, "value out of range")
    except OSError as exc:
        if exc.errno == errno.ENOPROTOOPT:  # as libusual: an option this kernel lacks is no error
            return
        _warn(setting, value, exc.strerror or str(exc))


def _warn(setting: str, value: int, reason: str) -> None:
    if (setting, value) in _warned:
        return
    _warned.add((setting, value))
    log.warning("%s = %s could not be set on a socket (%s); connections go on without it", setting, value, reason)
