"""`ztna.observe.format_address`: the one spelling of a socket address in logs and messages."""

from __future__ import annotations

import re
from pathlib import Path

from ztna.observe import format_address


def test_ipv6_in_brackets_with_port_and_v4_mapped_as_ipv4() -> None:
    assert format_address(("fd00::1", 4433)) == "[fd00::1]:4433"
    assert format_address(("fd00::1", 4433, 0, 0)) == "[fd00::1]:4433"   # a socket's 4-tuple
    assert format_address(("::ffff:1.2.3.4", 4433, 0, 0)) == "1.2.3.4:4433"
    assert format_address(("1.2.3.4", 4433)) == "1.2.3.4:4433"
    assert format_address(("[::1]", 80)) == "[::1]:80"
    assert format_address(("fe80::1%eth0", 5)) == "[fe80::1%eth0]:5"
    assert format_address("::ffff:10.0.0.1") == "10.0.0.1"
    assert format_address("relay.example.com") == "relay.example.com"


def test_no_log_line_spells_an_address_as_host_colon_port_by_hand() -> None:
    """Every log call that prints a peer address goes through format_address: a bare
    `%s:%d` is wrong for IPv6 (no brackets) and for v4-mapped addresses."""
    src = Path(__file__).resolve().parent.parent / "src" / "ztna"
    bad = []
    call = re.compile(r"\blog(?:ger)?\.(?:debug|info|warning|error|exception)\(")
    for path in src.rglob("*.py"):
        text = path.read_text()
        for m in call.finditer(text):
            snippet = text[m.end(): m.end() + 200].split("\n\n")[0]
            if re.match(r'\s*"[^"]*(%s:%d|\[%s\]:%d)', snippet):
                line = text[: m.start()].count("\n") + 1
                bad.append(f"{path.relative_to(src)}:{line}")
    assert not bad, bad
