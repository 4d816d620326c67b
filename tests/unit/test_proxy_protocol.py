"""pgrelay.proxy_protocol: PROXY v1/v2 headers, whole, split at every byte, lying and garbage."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from pgrelay import proxy_protocol as pp
from pgrelay.proxy_protocol import NEED_MORE, Header, Malformed, Parsed, Parser, parse

STARTUP = struct.pack("!II", 8, 80877103)  # an SSLRequest: what may follow a header


def v2(command: int = 1, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"", length: int | None = None,
       version: int = 2) -> bytes:
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return pp.V2_SIGNATURE + bytes([(version << 4) | command, family]) + struct.pack("!H", size) + payload


def tcp4(src="192.0.2.10", dst="198.51.100.1", sport=40000, dport=6432) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def tcp6(src="2001:db8::7", dst="2001:db8::1", sport=40001, dport=6432) -> bytes:
    return (socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def header(buf: bytes) -> Header:
    result = parse(buf)
    assert isinstance(result, Header), result
    return result


def test_v1_tcp4_and_what_follows():
    line = b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 6432\r\n"
    got = header(line + STARTUP)
    assert got.length == len(line)
    assert got.info.source == ("192.0.2.10", 40000) and got.info.destination == ("198.51.100.1", 6432)
    assert got.info.peer == "192.0.2.10:40000" and got.info.version == 1 and got.info.tlvs == {}


def test_v1_tcp6_longest_line_fits():
    addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {addr} {addr} 65535 65535\r\n".encode()
    got = header(line)
    assert got.info.source == (addr, 65535) and got.info.peer == f"{addr}:65535"
    longest = b"PROXY UNKNOWN " + b"x" * (pp.V1_MAX - 16) + b"\r\n"  # the spec's worst case: 107 bytes
    assert len(longest) == pp.V1_MAX and header(longest).length == pp.V1_MAX


def test_v1_unknown_keeps_the_socket_address():
    for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
        got = header(line + b"x")
        assert got.length == len(line) and got.info.source is None and got.info.peer is None


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 40000\r\n",          # a port missing
    b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 6432 9\r\n",   # one word too many
    b"PROXY TCP5 192.0.2.10 198.51.100.1 40000 6432\r\n",     # unknown family
    b"PROXY TCP4 2001:db8::1 198.51.100.1 40000 6432\r\n",    # family and address disagree
    b"PROXY TCP6 192.0.2.10 198.51.100.1 40000 6432\r\n",
    b"PROXY TCP4 192.0.2.300 198.51.100.1 40000 6432\r\n",    # not an address
    b"PROXY TCP4 192.0.2.10 198.51.100.1 65536 6432\r\n",     # port out of range
    b"PROXY TCP4 192.0.2.10 198.51.100.1 -1 6432\r\n",
    b"PROXY TCP4 192.0.2.10 198.51.100.1 040000 6432\r\n",    # leading zero
    b"PROXY TCP4  192.0.2.10 198.51.100.1 40000 6432\r\n",    # double space
    b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 6432\n",       # LF only
    b"PROXY \xff\r\n",                                        # not ASCII
    b"PROXY\r\n",
])
def test_v1_malformed(line):
    assert isinstance(parse(line), Malformed), line


def test_v1_bare_lf_before_the_crlf_is_refused_however_the_line_arrives():
    """Found by fuzz/run.py's proxy target: "PROXY UNKNOWN T\nQUIT\n...\r\n" was a header when read
    whole (UNKNOWN ignores the rest of its line) but malformed when the first piece ended after a
    bare LF. A bare LF is never part of a v1 line: refused whole too."""
    line = b"PROXY UNKNOWN T\nQUIT\nP C . \r\n"
    assert isinstance(parse(line), Malformed)
    assert isinstance(Parser().feed(line[:21]), Malformed)
    parser = Parser()
    assert parser.feed(line[:9]) is NEED_MORE and isinstance(parser.feed(line[9:]), Malformed)


def test_v1_line_over_107_bytes_is_refused_without_waiting_for_crlf():
    assert parse(b"PROXY TCP4 " + b"1" * 95) is NEED_MORE  # 106 bytes, no CRLF yet
    assert isinstance(parse(b"PROXY TCP4 " + b"1" * 96), Malformed)  # 107 bytes and no CRLF: refused
    assert isinstance(parse(b"PROXY TCP4 " + b"1" * 200 + b"\r\n"), Malformed)


def test_v2_tcp4_tcp6():
    got = header(v2(addresses=tcp4()) + STARTUP)
    assert got.length == 16 + 12
    assert got.info.source == ("192.0.2.10", 40000) and got.info.destination == ("198.51.100.1", 6432)
    got = header(v2(family=0x21, addresses=tcp6()))
    assert got.info.source == ("2001:db8::7", 40001) and got.info.peer == "2001:db8::7:40001"


def test_v2_unix_and_unspec_keep_the_socket_address_but_report_paths():
    paths = b"/run/client.sock".ljust(108, b"\0") + b"/run/pgrelay.sock".ljust(108, b"\0")
    got = header(v2(family=0x31, addresses=paths))
    assert got.info.source == "/run/client.sock" and got.info.destination == "/run/pgrelay.sock"
    assert got.info.peer is None
    got = header(v2(family=0x00))
    assert got.info.source is None and got.info.peer is None


def test_v2_local_keeps_the_socket_address_whatever_the_family():
    for family, addresses in ((0x00, b""), (0x11, tcp4()), (0x77, b"junk")):
        got = header(v2(command=0, family=family, addresses=addresses) + b"rest")
        assert got.info.source is None and got.info.peer is None
        assert got.length == 16 + len(addresses)


def test_v2_tlvs_aws_gcp_unknown():
    vpce = b"vpce-08d2bf15fac5001c9"
    tlvs = (tlv(pp.PP2_TYPE_AWS, b"\x01" + vpce) + tlv(pp.PP2_TYPE_GCP, struct.pack("!Q", 0x0102030405060708))
            + tlv(0x04, b"") + tlv(0xF1, b"opaque"))
    info = header(v2(addresses=tcp4(), tlvs=tlvs)).info
    assert info.aws_vpce_id == vpce.decode()
    assert info.gcp_psc_connection_id == 0x0102030405060708
    assert info.tlvs[0xF1] == b"opaque" and info.tlvs[0x04] == b""
    assert set(info.tlvs) == {pp.PP2_TYPE_AWS, pp.PP2_TYPE_GCP, 0x04, 0xF1}


def test_v2_aws_other_subtype_and_short_gcp_are_kept_raw_only():
    info = header(v2(addresses=tcp4(), tlvs=tlv(pp.PP2_TYPE_AWS, b"\x02xyz") + tlv(pp.PP2_TYPE_GCP, b"\x01\x02"))).info
    assert info.aws_vpce_id is None and info.gcp_psc_connection_id is None
    assert info.tlvs[pp.PP2_TYPE_AWS] == b"\x02xyz"


@pytest.mark.parametrize("buf,reason", [
    (v2(addresses=tcp4(), tlvs=tlv(0xF1, b"abc")[:-1] + b""), "overruns"),                # TLV longer than the payload
    (v2(addresses=tcp4(), tlvs=b"\xF1\x00"), "cut short"),                                # TLV header cut
    (v2(addresses=tcp4()[:8]), "addresses need"),                                         # TCP4 block too short
    (v2(family=0x21, addresses=tcp4()), "addresses need"),                                # TCP6 with a TCP4 block
    (v2(family=0x12, addresses=tcp4()), "family"),                                        # UDP
    (v2(family=0x41, addresses=tcp4()), "family"),                                        # unknown family
    (v2(command=2, addresses=tcp4()), "command"),
    (v2(version=1, addresses=tcp4()), "version"),
    (v2(addresses=b"", length=pp.V2_MAX_PAYLOAD + 1), "payload"),                         # lying length, too big
    (v2(addresses=b"", length=0xFFFF), "payload"),
])
def test_v2_malformed(buf, reason):
    result = parse(buf)
    assert isinstance(result, Malformed) and reason in result.reason, result


def test_v2_length_beyond_the_sent_bytes_waits_and_too_many_tlvs_are_refused():
    assert parse(v2(addresses=tcp4(), length=100)) is NEED_MORE  # the rest may still come (login timeout bounds it)
    many = b"".join(tlv(0xF0, b"") for _ in range(pp.MAX_TLVS + 1))
    result = parse(v2(addresses=tcp4(), tlvs=many))
    assert isinstance(result, Malformed) and "TLVs" in result.reason


@pytest.mark.parametrize("buf", [
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",   # an SSLRequest
    b"\x16\x03\x01\x02\x00",               # a TLS ClientHello
    b"GET / HTTP/1.1\r\n\r\n",
    b"PROXZ TCP4",
    b"\r\n\r\n\x00\r\nQUIZ\n" + b"\x21\x11\x00\x00",
    b"\r\n\r\x00",
])
def test_garbage_is_not_a_header(buf):
    assert isinstance(parse(buf), Malformed)


def test_could_be_header_matches_only_the_signatures():
    assert pp.could_be_header(b"P") and pp.could_be_header(b"\r") and pp.could_be_header(pp.V2_SIGNATURE + b"!")
    assert not pp.could_be_header(b"\x00") and not pp.could_be_header(b"\x16") and not pp.could_be_header(b"PROXZ")


SPLIT_CASES = [
    b"PROXY TCP4 192.0.2.10 198.51.100.1 40000 6432\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(addresses=tcp4(), tlvs=tlv(pp.PP2_TYPE_AWS, b"\x01vpce-1") + tlv(0xF1, b"x" * 40)),
    v2(family=0x21, addresses=tcp6()),
    v2(command=0),
]


@pytest.mark.parametrize("whole", SPLIT_CASES)
def test_split_at_every_byte_offset(whole):
    expected = header(whole).info
    data = whole + STARTUP
    for cut in range(1, len(data)):
        parser = Parser()
        first = parser.feed(data[:cut])
        if cut < len(whole):
            assert first is NEED_MORE, (cut, first)
            second, end = parser.feed(data[cut:]), len(data)
        else:
            second, end = first, cut  # complete in the first piece: the rest is what it held beyond
        assert isinstance(second, Parsed) and second.info == expected, (cut, second)
        assert second.rest == data[len(whole):end], cut
    parser = Parser()  # one byte at a time
    results = [parser.feed(data[i:i + 1]) for i in range(len(whole))]
    assert all(r is NEED_MORE for r in results[:-1]) and isinstance(results[-1], Parsed)


def test_random_garbage_never_raises():
    rng = random.Random(12)
    seeds = SPLIT_CASES + [pp.V2_SIGNATURE, b"PROXY "]
    for _ in range(5000):
        base = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            if base:
                base[rng.randrange(len(base))] = rng.randrange(256)
        base += bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
        result = parse(bytes(base))
        assert result is NEED_MORE or isinstance(result, (Header, Malformed))
        if isinstance(result, Header):
            assert result.length <= len(base)


def test_trusted_addresses():
    trusted = ("10.0.0.0/8", "::1", "127.0.0.1")
    assert pp.is_trusted("10.1.2.3:5555", trusted) and pp.is_trusted("::1:5555", trusted)
    assert pp.is_trusted("::ffff:127.0.0.1:5555", trusted)
    assert not pp.is_trusted("11.0.0.1:5555", trusted) and not pp.is_trusted("unix", trusted)
    assert not pp.is_trusted("10.1.2.3:5555", ())  # empty: nobody
    with pytest.raises(ValueError, match="not an address"):
        pp.check_trusted(("10.0.0.0/8", "proxy.example"))
