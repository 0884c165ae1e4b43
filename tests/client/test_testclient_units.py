"""Pure parts of the test client and the Intermediate's config: echo matching never counts
QAD/ACK/unrelated packets, payload patterns, address parsing, config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztna.client.testclient import _Echo, _stats, make_payload, parse_ip_port
from ztna.errors import UsageError
from ztna.intermediate.config import ConfigError, load_config, parse_host_port
from ztna.netstack.packets import build_udp_packet, ip_to_bytes


def pkt(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    return build_udp_packet(ip_to_bytes(src), ip_to_bytes(dst), sport, dport, payload)


def test_echo_matches_byte_exact_from_dst_only() -> None:
    echo = _Echo(("10.0.0.100", 12345), ("10.1.2.3", 9999))
    echo.expected[b"hello"] += 1
    packets = [
        b"\x01\x04\x7f\x00\x00\x01\x00\x35",                     # a QAD-looking datagram
        b"\x12\x04echo",                                         # an ACK-looking datagram
        pkt("10.1.2.4", 9999, "10.0.0.100", 12345, b"hello"),    # wrong source address
        pkt("10.1.2.3", 9998, "10.0.0.100", 12345, b"hello"),    # wrong source port
        pkt("10.1.2.3", 9999, "10.0.0.101", 12345, b"hello"),    # not for our inner source
        pkt("10.1.2.3", 9999, "10.0.0.100", 12345, b"hellO"),    # one byte differs
        pkt("10.1.2.3", 9999, "10.0.0.100", 12345, b"hello"),    # the echo
        pkt("10.1.2.3", 9999, "10.0.0.100", 12345, b"hello"),    # a duplicate is not a 2nd echo
    ]
    echo.take(packets)
    assert echo.matched == 1 and echo.unrelated == 7 and packets == []


def test_echo_ipv6() -> None:
    echo = _Echo(("fd00::100", 1), ("fd00:1::3", 2))
    echo.expected[b"x" * 1000] += 1
    echo.take([pkt("fd00:1::3", 2, "fd00::100", 1, b"x" * 1000)])
    assert echo.matched == 1


def test_payload_patterns() -> None:
    assert make_payload(5, "zeros", 3) == bytes(5)
    a, b = make_payload(64, "seq", 1), make_payload(64, "seq", 2)
    assert len(a) == len(b) == 64 and a != b and a[:4] == b"\x00\x00\x00\x01"
    assert make_payload(2, "seq", 1) == b"\x01\x02"
    assert make_payload(8, "random", 0, rng=lambda n: b"\xaa" * n) == b"\xaa" * 8
    assert make_payload(0, "seq", 9) == b""


def test_stats() -> None:
    assert _stats([]) is None
    s = _stats([float(x) for x in range(1, 101)])
    assert s is not None
    assert (s["min"], s["p50"], s["p95"], s["max"], s["count"]) == (1.0, 50.0, 95.0, 100.0, 100)


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:4433", ("127.0.0.1", 4433)),
    ("[::]:4433", ("::", 4433)),
    ("[::1]:1", ("::1", 1)),
    ("localhost:0", ("localhost", 0)),
])
def test_parse_host_port(text: str, want: tuple[str, int]) -> None:
    assert parse_host_port(text) == want


@pytest.mark.parametrize("text", ["foo", "1.2.3.4:99999", "[::1", "[::1]x", ":80", "a:b", "[zz::]:1"])
def test_parse_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


def test_parse_ip_port_needs_literal() -> None:
    assert parse_ip_port("[fd00::1]:53") == ("fd00::1", 53)
    with pytest.raises(UsageError):
        parse_ip_port("localhost:53")


def test_config_precedence_and_errors(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('pki = "/p"\nudp_payload = 1300\nmetrics = "off"\nlisten = ["0.0.0.0:1"]\n')
    cfg = load_config(f, {"udp_payload": 1400, "listen": None})
    assert cfg.udp_payload == 1400 and cfg.listen_addresses() == [("0.0.0.0", 1)]
    assert cfg.metrics_address() is None
    assert cfg.tls_paths() == (Path("/p/intermediate.pem"), Path("/p/intermediate.key"), Path("/p/ca.pem"))
    with pytest.raises(ConfigError, match=r"^invalid max_connections = 0: "):
        load_config(None, {"pki": "/p", "max_connections": 0})
    with pytest.raises(ConfigError, match="no certificates"):
        load_config(None, {})
    with pytest.raises(ConfigError, match=r"invalid metrics = 'nope'"):
        load_config(None, {"pki": "/p", "metrics": "nope"})
    with pytest.raises(ConfigError, match="not valid TOML"):
        f.write_text("pki = ")
        load_config(f, {})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml", {})
