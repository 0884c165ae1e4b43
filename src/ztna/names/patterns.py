"""Domain names and the patterns that say which names a service covers.

A pattern is an exact name (`git.corp.test`) or a wildcard (`*.corp.test`). A wildcard
covers every name *below* its suffix at any depth (`a.corp.test`, `a.b.corp.test`), never
the suffix itself: a service that should also answer for `corp.test` lists it too. Names
are compared in lower case without the trailing dot; only host names are accepted
(letters, digits and hyphens, labels of 1..63 bytes, at most 253 bytes in all), because a
name travels to the Connector, which resolves it, and anything else there is a smuggling
attempt rather than an app.

When several services' patterns cover one name, the most specific wins: an exact name
before any wildcard, a longer wildcard suffix before a shorter one. Two services may not
list the same pattern (`check_disjoint`), so the winner is always unique.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from ztna.errors import DecodeError

__all__ = ["NAME_MAX", "DomainPattern", "best_service", "check_disjoint", "is_name_like",
           "normalize_name", "parse_patterns"]

NAME_MAX: Final = 253
LABEL_MAX: Final = 63
_LDH: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def normalize_name(name: str) -> str:
    """Lower case, no trailing dot; DecodeError unless it is a valid host name."""
    if not isinstance(name, str):
        raise DecodeError(f"domain name must be text, got {type(name).__name__}")
    text = name.lower()
    if text.endswith("."):
        text = text[:-1]
    if not text or len(text) > NAME_MAX:
        raise DecodeError(f"domain name {name!r}: length {len(text)} outside 1..{NAME_MAX}")
    labels = text.split(".")
    for label in labels:
        if not 1 <= len(label) <= LABEL_MAX:
            raise DecodeError(f"domain name {name!r}: empty or over-long label")
        if not set(label) <= _LDH or label[0] == "-" or label[-1] == "-":
            raise DecodeError(f"domain name {name!r}: label {label!r} is not letters, digits, hyphens")
    if labels[-1].isdigit():
        # "10.0.0.1" is an address, not a name: it must not match a pattern by accident.
        raise DecodeError(f"domain name {name!r}: the last label is numeric")
    return text


def is_name_like(text: str) -> bool:
    """True if a service entry is meant as a pattern (has a letter or '*'), not an address."""
    return "*" in text or (any(c.isalpha() for c in text) and ":" not in text)


@dataclass(frozen=True, slots=True)
class DomainPattern:
    """`suffix` is the name itself (exact) or what follows `*.` (wildcard)."""

    suffix: str
    wildcard: bool

    @classmethod
    def parse(cls, text: str) -> DomainPattern:
        raw = text.strip()
        wildcard = raw.startswith("*.")
        body = raw[2:] if wildcard else raw
        if "*" in body:
            raise DecodeError(f"pattern {text!r}: '*' only as the whole first label ('*.corp.test')")
        suffix = normalize_name(body)
        if wildcard and "." not in suffix:
            raise DecodeError(f"pattern {text!r}: a wildcard needs at least two labels after '*.'")
        return cls(suffix, wildcard)

    def matches(self, name: str) -> bool:
        """`name` must already be normalized."""
        if self.wildcard:
            return name.endswith("." + self.suffix)
        return name == self.suffix

    def rank(self) -> tuple[int, int]:
        """Larger is more specific."""
        return (0 if self.wildcard else 1, self.suffix.count(".") + 1)

    @property
    def domain(self) -> str:
        """The DNS domain this pattern lives under (for resolver routing)."""
        return self.suffix

    def __str__(self) -> str:
        return f"*.{self.suffix}" if self.wildcard else self.suffix


def parse_patterns(items: Iterable[str]) -> tuple[DomainPattern, ...]:
    out: list[DomainPattern] = []
    for item in items:
        pat = DomainPattern.parse(item)
        if pat in out:
            raise DecodeError(f"pattern {item!r} given twice")
        out.append(pat)
    return tuple(out)


def check_disjoint(services: Mapping[str, Iterable[DomainPattern]]) -> None:
    """DecodeError if two services list the same pattern (the match would be ambiguous)."""
    owner: dict[DomainPattern, str] = {}
    for sid, pats in services.items():
        for pat in pats:
            if pat in owner and owner[pat] != sid:
                raise DecodeError(f"pattern {pat} given to two services ({owner[pat]}, {sid})")
            owner[pat] = sid


def best_service(name: str, services: Mapping[str, Iterable[DomainPattern]]) -> str | None:
    """The service whose most specific pattern covers `name` (normalized), or None."""
    best: tuple[tuple[int, int], str] | None = None
    for sid, pats in services.items():
        for pat in pats:
            if pat.matches(name) and (best is None or pat.rank() > best[0]):
                best = (pat.rank(), sid)
    return None if best is None else best[1]
