"""Peering ([peers], peer_id): cancel keys that name the pgrelay owning them, and CancelRequests forwarded there.

Several pgrelay processes or hosts behind one address (so_reuseport, HAProxy, a cloud load
balancer) each see only their own clients, but a client's CancelRequest arrives on a new
connection that may reach any of them. As in PgBouncer 1.19+, each process gets a `peer_id` (1 to
16383) and writes it into every cancel key it hands out; a CancelRequest carrying another peer's
id is forwarded to that peer's `[peers]` entry. Layout of the key's first bytes (the pid part):
byte 0 random with the sign bit clear, bytes 1-2 the peer id (14 bits) and a 2-bit TTL that each
forward lowers, so that a misconfigured ring gives up after three hops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import gevent
from gevent import Timeout
from gevent.lock import BoundedSemaphore

from . import protocol
from .config import ConfigError, parse_options
from .errors import ClientGone
from .routing import HostAddr
from .settings import PEER_KEYS
from .stream import Stream

if TYPE_CHECKING:
    from .relay import Relay

log = logging.getLogger("pgrelay")

MAX_PEER_ID = 16383
MAX_TTL = 3



@dataclass
class Peer:
    """One [peers] entry, with the cancel requests now forwarded to it (SHOW PEER_POOLS)."""

    peer_id: int
    addr: HostAddr
    pool_size: int
    slots: BoundedSemaphore = field(repr=False, default=None)
    waiting: int = 0     # forwards waiting for a slot
    active: int = 0      # forwards in flight
    connecting: int = 0  # of those, still connecting
    forwarded: int = 0   # forwards done since start


def parse(config, old: dict[int, Peer] | None = None) -> dict[int, Peer]:
    """The [peers] section as Peer entries by id (this process's own id left out); ConfigError on a
    bad line. Entries whose address and size a reload keeps are kept, with their counters."""
    peers: dict[int, Peer] = {}
    for entry in config.section("peers"):
        try:
            peer_id = int(entry.key)
        except ValueError:
            raise ConfigError(f"{entry.where}: [peers] key {entry.key!r} is not a peer_id (1 to {MAX_PEER_ID})") from None
        if not 1 <= peer_id <= MAX_PEER_ID:
            raise ConfigError(f"{entry.where}: peer_id {peer_id} is out of range (1 to {MAX_PEER_ID})")
        values = parse_options(entry, PEER_KEYS, "peers")
        if not values["host"]:
            raise ConfigError(f"{entry.where}: [peers] entry {peer_id} has no host")
        if peer_id == config.peer_id:
            continue
        size = values["pool_size"] or config.default_pool_size
        addr = HostAddr(values["host"], values["port"])
        kept = (old or {}).get(peer_id)
        if kept is not None and kept.addr == addr and kept.pool_size == size:
            peers[peer_id] = kept
        else:
            peers[peer_id] = Peer(peer_id, addr, size, BoundedSemaphore(size))
    return peers


def stamp(key: bytes, peer_id: int) -> bytes:
    """`key` with this process's peer id and a full TTL in bytes 1-2 (the sign bit of byte 0 stays clear)."""
    mark = (peer_id << 2) | MAX_TTL
    return bytes((key[0] & 0x7F, mark >> 8, mark & 0xFF)) + key[3:]


def owner(key: bytes) -> tuple[int, int]:
    """The peer id and TTL a cancel key carries."""
    mark = (key[1] << 8) | key[2]
    return mark >> 2, mark & 3


def with_ttl(key: bytes, ttl: int) -> bytes:
    return key[:2] + bytes(((key[2] & 0xFC) | ttl,)) + key[3:]


def route_cancel(relay: "Relay", key: bytes) -> tuple[bytes | None, gevent.Greenlet | None]:
    """Where a CancelRequest's key goes with peering on: (the key to look up here, None), or
    (None, the greenlet forwarding it to its peer), or (None, None) when it is dropped."""
    peer_id, ttl = owner(key)
    if peer_id == relay.config.peer_id:
        return with_ttl(key, MAX_TTL), None
    peer = relay.peers.get(peer_id)
    if peer is None:
        log.warning("cancel request for unknown peer_id %d dropped", peer_id)
        return None, None
    if ttl == 0:
        log.warning("cancel request for peer_id %d dropped: forwarded too often (a loop in [peers]?)", peer_id)
        return None, None
    if relay.config.verbose:
        log.debug("cancel request forwarded to peer %d (%s)", peer_id, peer.addr)
    return None, gevent.spawn(_forward, relay, peer, with_ttl(key, ttl - 1))


def _forward(relay: "Relay", peer: Peer, key: bytes) -> None:
    from .server_login import open_socket
    state = "waiting"
    peer.waiting += 1
    try:
        with Timeout(relay.config.cancel_wait_timeout or None):
            with peer.slots:
                peer.waiting -= 1
                peer.active += 1
                peer.connecting += 1
                state = "connecting"
                stream = Stream(open_socket(peer.addr, relay.config))
                peer.connecting -= 1
                state = "active"
                try:
                    stream.sendall(protocol.cancel_request(key))
                    try:
                        while stream.recv_some():
                            pass
                    except ClientGone:
                        pass  # the peer closes the connection once the cancel is delivered
                finally:
                    stream.close()
                peer.forwarded += 1
    except (Timeout, OSError) as exc:
        log.warning("cancel request to peer %d (%s) failed: %s", peer.peer_id, peer.addr, exc)
    finally:
        if state == "waiting":
            peer.waiting -= 1
        else:
            peer.active -= 1
            if state == "connecting":
                peer.connecting -= 1
