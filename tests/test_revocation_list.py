"""The deny-list's pure parsing and matching (ztna.revocation)."""

from __future__ import annotations

import pytest

from ztna.identity import Identity
from ztna.revocation import RevocationFileError, RevocationList, parse_revocations


def _ident(cn: str = "agent-alice", serial: int = 0x5F3C, fp: str = "ab" * 32) -> Identity:
    return Identity(common_name=cn, agent_services=frozenset({"web"}), connector_services=frozenset(),
                    agent_wildcard=False, connector_wildcard=False, fingerprint=fp, serial=serial)


def test_each_kind_matches_with_its_reason() -> None:
    rl = parse_revocations("""
        # comment
        serial 00:5f:3c        # colons and leading zeros
        identity agent-bob
        fingerprint CD""" + "cd" * 31 + "\n", "f.txt")
    assert len(rl) == 3
    assert rl.reason(_ident()) == "certificate revoked (serial 5f3c)"
    assert rl.reason(_ident(cn="agent-bob", serial=1)) == "identity revoked (agent-bob)"
    assert rl.reason(_ident(serial=2, fp="cd" * 32)) == "certificate revoked (sha256 cdcdcdcdcdcdcdcd...)"
    assert rl.reason(_ident(serial=0x5F3D)) is None
    # Identities are exact: a certificate's common name is case-sensitive.
    assert rl.reason(_ident(cn="Agent-Bob", serial=1)) is None


def test_serial_spellings_are_one_number() -> None:
    for text in ("serial 0xAB", "serial ab", "serial 00ab", "serial 0:a:b"):
        assert parse_revocations(text).serials == frozenset({0xAB}), text


def test_empty_list_revokes_nobody() -> None:
    assert RevocationList().reason(_ident()) is None
    assert len(parse_revocations("\n# only comments\n\n")) == 0


@pytest.mark.parametrize(("text", "message"), [
    ("revoke bob", "f:1: expected 'serial HEX'"),
    ("identity", "f:1: expected 'serial HEX'"),
    ("\nserial xyz", "f:2: serial 'xyz' is not hexadecimal"),
    ("serial " + "f" * 41, "is not hexadecimal (up to 20 bytes)"),
    ("fingerprint abcd", "f:1: fingerprint 'abcd' is not 64 hex digits"),
])
def test_bad_lines_name_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(RevocationFileError) as info:
        parse_revocations(text, "f")
    assert message in str(info.value)


def test_identity_equality_ignores_the_serial() -> None:
    assert _ident(serial=1) == _ident(serial=2)
