"""The HAProxy PROXY protocol (v1 text, v2 binary): parse a connection's header into a ProxyInfo, no I/O.

`parse(buf)` looks at the bytes a connection sent first and answers with a value: NEED_MORE (the
header is not complete yet), Header(info, length) (the first `length` bytes are the header), or
Malformed(reason). `Parser` feeds it piece by piece and hands back what follows the header. Every
length is bounded: a v1 line is at most V1_MAX bytes, a v2 payload at most V2_MAX_PAYLOAD.
Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import functools
import ipaddress
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included ("PROXY TCP6 " + two full IPv6 addresses + ports)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/protocol, payload length
V2_MAX_PAYLOAD = 4096  # HAProxy's own tlv buffers are smaller; a longer header is refused
V2_CMD_LOCAL, V2_CMD_PROXY = 0x0, 0x1
# family/transport byte -> (name, address block length); STREAM transports only (pgrelay speaks TCP)
V2_FAMILIES = {0x00: ("UNSPEC", 0), 0x11: ("TCP4", 12), 0x21: ("TCP6", 36), 0x31: ("UNIX", 216)}
PP2_TYPE_AWS = 0xEA          # AWS PrivateLink; subtype 0x01: the VPC endpoint id, ASCII
PP2_SUBTYPE_AWS_VPCE_ID = 0x01
PP2_TYPE_GCP = 0xE0          # GCP Private Service Connect: the PSC connection id, 8 bytes big-endian
MAX_TLVS = 256               # a payload of V2_MAX_PAYLOAD holds at most 1365 empty TLVs; fewer are plenty

Address = tuple[str, int] | str | None


@dataclass(frozen=True)
class ProxyInfo:
    """What a PROXY header said. `source`/`destination`: (host, port) for TCP, a path for v2 UNIX,
    None for v1 UNKNOWN, v2 LOCAL and v2 UNSPEC (then the connection keeps its socket's own
    address). `tlvs`: every v2 TLV by type (the last one of a repeated type), raw value bytes."""

    version: int
    source: Address = None
    destination: Address = None
    tlvs: Mapping[int, bytes] = field(default_factory=dict)
    aws_vpce_id: str | None = None
    gcp_psc_connection_id: int | None = None

    @property
    def peer(self) -> str | None:
        """The client address as pgrelay writes peers ("host:port"), or None to keep the socket's."""
        if isinstance(self.source, tuple):
            return f"{self.source[0]}:{self.source[1]}"
        return None


@dataclass(frozen=True)
class Header:
    info: ProxyInfo
    length: int  # bytes of the buffer the header took


@dataclass(frozen=True)
class Malformed:
    reason: str


@dataclass(frozen=True)
class Parsed:
    """Parser.feed's answer once the header is complete: the info and the bytes after the header."""

    info: ProxyInfo
    rest: bytes


class _NeedMore:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()
Result = _NeedMore | Header | Malformed


def could_be_header(prefix: bytes) -> bool:
    """Whether `prefix` (at least one byte) may begin a PROXY header. No PostgreSQL startup packet,
    SSLRequest or TLS ClientHello can start with these bytes ('P' or CR as a length's first byte
    means a length above 1 GiB)."""
    return any(prefix[:len(sig)] == sig[:len(prefix)] for sig in (V1_PREFIX, V2_SIGNATURE))


def parse(buf: bytes) -> Result:
    """The PROXY header at the start of `buf`: NEED_MORE, Header or Malformed."""
    if not buf:
        return NEED_MORE
    if not could_be_header(buf[:len(V2_SIGNATURE)]):
        return Malformed("no PROXY signature")
    if buf[:1] == b"P":
        return _parse_v1(buf)
    return _parse_v2(buf)


def _parse_v1(buf: bytes) -> Result:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX or b"\n" in buf[:V1_MAX]:
            return Malformed(f"v1 line without CRLF within {V1_MAX} bytes")
        return NEED_MORE
    if b"\n" in buf[:end]:  # as when the line arrives in pieces, whatever follows the bare LF
        return Malformed(f"v1 line without CRLF within {V1_MAX} bytes")
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        return Malformed("v1 line is not ASCII")
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return Header(ProxyInfo(version=1), end + 2)  # the rest of the line is ignored, as the spec says
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        return Malformed("v1 line is not PROXY TCP4|TCP6|UNKNOWN src dst sport dport")
    version = 4 if words[1] == "TCP4" else 6
    try:
        src, dst = (ipaddress.ip_address(w) for w in words[2:4])
        sport, dport = (_v1_port(w) for w in words[4:6])
    except ValueError as exc:
        return Malformed(f"v1 line: {exc}")
    if src.version != version or dst.version != version:
        return Malformed(f"v1 line: addresses are not {words[1]}")
    return Header(ProxyInfo(version=1, source=(str(src), sport), destination=(str(dst), dport)), end + 2)


def _v1_port(word: str) -> int:
    if not word.isdigit() or (len(word) > 1 and word[0] == "0") or int(word) > 65535:
        raise ValueError(f"bad port {word[:8]!r}")
    return int(word)


def _parse_v2(buf: bytes) -> Result:
    if len(buf) < V2_HEADER:
        return NEED_MORE
    ver_cmd, fam, length = buf[12], buf[13], struct.unpack_from("!H", buf, 14)[0]
    if ver_cmd >> 4 != 2:
        return Malformed(f"v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (V2_CMD_LOCAL, V2_CMD_PROXY):
        return Malformed(f"v2 command {command}")
    if length > V2_MAX_PAYLOAD:
        return Malformed(f"v2 payload of {length} bytes (more than {V2_MAX_PAYLOAD})")
    total = V2_HEADER + length
    if len(buf) < total:
        return NEED_MORE
    payload = buf[V2_HEADER:total]
    if command == V2_CMD_LOCAL:  # a health check from the proxy itself: the socket's own address
        tlvs = _tlvs(payload[V2_FAMILIES[fam][1]:]) if fam in V2_FAMILIES and V2_FAMILIES[fam][1] <= length else {}
        return Header(_info(None, None, tlvs if isinstance(tlvs, dict) else {}), total)
    if fam not in V2_FAMILIES:
        return Malformed(f"v2 family/protocol 0x{fam:02x}")
    name, size = V2_FAMILIES[fam]
    if length < size:
        return Malformed(f"v2 {name} payload of {length} bytes (addresses need {size})")
    if name == "TCP4":
        src, dst = socket.inet_ntop(socket.AF_INET, payload[0:4]), socket.inet_ntop(socket.AF_INET, payload[4:8])
        sport, dport = struct.unpack_from("!HH", payload, 8)
        source, destination = (src, sport), (dst, dport)
    elif name == "TCP6":
        src, dst = socket.inet_ntop(socket.AF_INET6, payload[0:16]), socket.inet_ntop(socket.AF_INET6, payload[16:32])
        sport, dport = struct.unpack_from("!HH", payload, 32)
        source, destination = (src, sport), (dst, dport)
    elif name == "UNIX":
        source, destination = _unix_path(payload[:108]), _unix_path(payload[108:216])
    else:
        source = destination = None  # UNSPEC: the receiver ignores the address block
    tlvs = _tlvs(payload[size:])
    if isinstance(tlvs, Malformed):
        return tlvs
    return Header(_info(source, destination, tlvs), total)


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def _tlvs(data: bytes) -> dict[int, bytes] | Malformed:
    out: dict[int, bytes] = {}
    pos, count = 0, 0
    while pos < len(data):
        if len(data) - pos < 3:
            return Malformed(f"v2 TLV header cut short ({len(data) - pos} bytes)")
        kind, size = data[pos], struct.unpack_from("!H", data, pos + 1)[0]
        if pos + 3 + size > len(data):
            return Malformed(f"v2 TLV 0x{kind:02x} of {size} bytes overruns the header")
        count += 1
        if count > MAX_TLVS:
            return Malformed(f"more than {MAX_TLVS} v2 TLVs")
        out[kind] = data[pos + 3:pos + 3 + size]
        pos += 3 + size
    return out


def _info(source: Address, destination: Address, tlvs: dict[int, bytes]) -> ProxyInfo:
    aws = tlvs.get(PP2_TYPE_AWS)
    vpce = None
    if aws and aws[0] == PP2_SUBTYPE_AWS_VPCE_ID:
        vpce = aws[1:].decode("ascii", errors="replace")
    gcp = tlvs.get(PP2_TYPE_GCP)
    psc = int.from_bytes(gcp, "big") if gcp is not None and len(gcp) == 8 else None
    return ProxyInfo(version=2, source=source, destination=destination, tlvs=tlvs, aws_vpce_id=vpce,
                     gcp_psc_connection_id=psc)


class Parser:
    """Incremental: feed the bytes as they arrive; NEED_MORE until Parsed(info, rest) or Malformed.
    Holds at most one header's worth of bytes (V2_HEADER + V2_MAX_PAYLOAD)."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> _NeedMore | Parsed | Malformed:
        self.buf += data
        result = parse(self.buf)
        if isinstance(result, Header):
            rest, self.buf = self.buf[result.length:], b""
            return Parsed(result.info, rest)
        return result


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(word, strict=False) for word in trusted)


def check_trusted(trusted: tuple[str, ...]) -> None:
    """Raise ValueError naming a word of proxy_protocol_trusted that is no address or CIDR."""
    for word in trusted:
        try:
            ipaddress.ip_network(word, strict=False)
        except ValueError:
            raise ValueError(f"proxy_protocol_trusted: {word!r} is not an address or CIDR") from None


def is_trusted(peer: str, trusted: tuple[str, ...]) -> bool:
    """Whether `peer` ("host:port" as the listener writes it, or "unix") may send a PROXY header."""
    if not trusted or peer == "unix":
        return False
    try:
        addr = ipaddress.ip_address(peer.rsplit(":", 1)[0].strip("[]"))
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in net for net in _networks(trusted))
