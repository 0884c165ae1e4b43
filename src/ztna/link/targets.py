"""The Intermediates a link may use (`--intermediate A,B,...`, one cluster) and which one
it uses now (pure).

After a lost or failed connection the link moves on to the next in the list; the cluster
shares session tickets, so it resumes there in 0-RTT. With one Intermediate there is
nowhere to move and the link reconnects to the same one.

Which one to attach to first (`pick_by_rtt`): the Agent times a handshake with each and
takes the first in the list whose handshake took at most the best one's plus
`PICK_MARGIN` (20 ms) or `PICK_RATIO` (1.5×) times the best, whichever allows more. So
the list's order stays the preference among members about as near (noise never reorders
them), and a member clearly nearer wins; one that did not answer is never picked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["PICK_MARGIN", "PICK_RATIO", "Address", "Targets", "pick_by_rtt"]

Address = tuple[str, int]

PICK_MARGIN = 0.020    # seconds of handshake time within which the list's order decides
PICK_RATIO = 1.5       # ... or this multiple of the best, for slow handshakes everywhere


def pick_by_rtt(addresses: Sequence[Address], rtts: Mapping[Address, float | None]) -> Address | None:
    """The Intermediate to attach to, given each one's handshake time in seconds (None: no
    answer). None when none answered."""
    measured = [t for a in addresses if (t := rtts.get(a)) is not None]
    if not measured:
        return None
    best = min(measured)
    limit = max(best + PICK_MARGIN, best * PICK_RATIO)
    return next(a for a in addresses if (t := rtts.get(a)) is not None and t <= limit)


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

    def choose(self, rtts: Mapping[Address, float | None]) -> bool:
        """Attach to the one `pick_by_rtt` picks (no answer from any: stay). True if moved."""
        best = pick_by_rtt(self.addresses, rtts)
        if best is None or best == self.current:
            return False
        self.current = best
        return True

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
