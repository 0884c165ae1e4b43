"""The Intermediates a link may use (`--intermediate A,B,...`, one cluster) and which one
it uses now (pure).

After a lost or failed connection the link moves on to the next in the list; the cluster
shares session tickets, so it resumes there in 0-RTT. With one Intermediate there is
nowhere to move and the link reconnects to the same one.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Address", "Targets"]

Address = tuple[str, int]


class Targets:
    __slots__ = ("addresses", "current", "moves")

    def __init__(self, addresses: Sequence[Address], current: Address | None = None) -> None:
        if not addresses and current is None:
            raise ValueError("a link needs at least one Intermediate")
        self.addresses: tuple[Address, ...] = tuple(addresses) or (current,)  # type: ignore[assignment]
        self.current: Address = current if current is not None else self.addresses[0]
        self.moves = 0

    @property
    def can_fail_over(self) -> bool:
        return len(self.addresses) > 1

    def fail_over(self) -> bool:
        """Move to the next Intermediate in the list (after the last: the first again).
        False when there is only one (nothing changes)."""
        if not self.can_fail_over:
            return False
        try:
            at = self.addresses.index(self.current)
        except ValueError:
            at = -1
        self.current = self.addresses[(at + 1) % len(self.addresses)]
        self.moves += 1
        return True
