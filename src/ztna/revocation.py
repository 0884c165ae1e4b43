"""Revocation: a deny-list of certificate serials, identities and fingerprints.

Pure: `parse_revocations` turns the file's text into a `RevocationList`, and
`RevocationList.reason(identity)` says whether (and why) a verified peer is revoked. Reading
the file, reloading it on SIGHUP and closing connections are the drivers' (the Intermediate,
the Connector's P2P server).

File format (`--revoked FILE`), one entry per line; `#` starts a comment, blank lines are
ignored::

    # a lost laptop: its certificate, whatever it is called
    serial 5f3c0a9d2e7b41c8          # as `ztna certs show` prints it (hex; 0x and : allowed)
    # everyone who presents this identity (the certificate's common name)
    identity agent-bob
    # one exact certificate: sha256 of its DER (`ztna certs show`, row sha256)
    fingerprint 9b1d...e4 (64 hex digits)

Serials are compared as numbers (so `0x00ab`, `ab` and `a:b`... all mean the same serial
`0xab` once colons are dropped), identities exactly (common names are case-sensitive in X.509),
fingerprints case-insensitively. Any other line is an error naming the file and the line, so
a typo never silently lets a revoked peer in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from ztna.errors import UsageError
from ztna.identity import Identity

KINDS: Final = ("serial", "identity", "fingerprint")
# RFC 5280 caps serials at 20 octets; a longer hex string is a mistake, not a serial.
_MAX_SERIAL_HEX: Final = 40
_HEX = re.compile(r"[0-9a-f]+")


class RevocationFileError(UsageError):
    """The deny-list cannot be used; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class RevocationList:
    serials: frozenset[int] = frozenset()
    identities: frozenset[str] = frozenset()
    fingerprints: frozenset[str] = frozenset()
    source: str = ""

    def __len__(self) -> int:
        return len(self.serials) + len(self.identities) + len(self.fingerprints)

    def reason(self, identity: Identity) -> str | None:
        """The close reason for a revoked peer, or None when it is not revoked."""
        if identity.serial in self.serials:
            return f"certificate revoked (serial {identity.serial:x})"
        if identity.common_name in self.identities:
            return f"identity revoked ({identity.common_name})"
        if identity.fingerprint.lower() in self.fingerprints:
            return f"certificate revoked (sha256 {identity.fingerprint[:16]}...)"
        return None


def _serial(text: str) -> int | None:
    digits = text.lower().removeprefix("0x").replace(":", "")
    if not digits or len(digits) > _MAX_SERIAL_HEX or not _HEX.fullmatch(digits):
        return None
    return int(digits, 16)


def parse_revocations(text: str, source: str = "revocation list") -> RevocationList:
    """Parse the deny-list's text; `RevocationFileError` names `source` and the line."""
    serials: set[int] = set()
    identities: set[str] = set()
    fingerprints: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, value = line.partition(" ")
        kind, value = kind.lower(), value.strip()
        where = f"{source}:{number}"
        if kind not in KINDS or not value:
            raise RevocationFileError(
                f"{where}: expected 'serial HEX', 'identity NAME' or 'fingerprint SHA256', got {raw.strip()!r}")
        if kind == "serial":
            serial = _serial(value)
            if serial is None:
                raise RevocationFileError(f"{where}: serial {value!r} is not hexadecimal (up to 20 bytes)")
            serials.add(serial)
        elif kind == "identity":
            identities.add(value)
        else:
            fp = value.lower().replace(":", "")
            if len(fp) != 64 or not _HEX.fullmatch(fp):
                raise RevocationFileError(f"{where}: fingerprint {value!r} is not 64 hex digits (sha256)")
            fingerprints.add(fp)
    return RevocationList(frozenset(serials), frozenset(identities), frozenset(fingerprints), source)


def load_revocations(path: str | Path) -> RevocationList:
    """Read and parse the deny-list file (`RevocationFileError` for any problem)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RevocationFileError(f"cannot read revocation list {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RevocationFileError(f"revocation list {path} is not UTF-8 text") from None
    return parse_revocations(text, str(path))

