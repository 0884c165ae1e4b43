"""SACK bookkeeping for the userspace TCP (RFC 2018 blocks, RFC 6675-style scoreboard).

Theory of operation. Sequence numbers are absolute (unwrapped) ints, as in `tcp.py`.

Sender side: `SackScoreboard` keeps the byte ranges above SND.UNA the peer reported as
received, as a sorted list of disjoint, non-adjacent `[start, end)` ranges. Blocks outside
(SND.UNA, SND.MAX] are clipped or ignored (a peer cannot SACK what was never sent); the
list is pruned as SND.UNA advances. `TcpEndpoint` treats every hole below the highest
SACKed byte as lost (FACK-like; right for a path without reordering), retransmits the holes
in order — each once per recovery, remembered by HighRxt — and estimates the data in flight
("pipe", RFC 6675 §4) as: bytes above the highest SACK + retransmitted hole bytes.
The range count is capped (`MAX_RANGES`); extra ranges are ignored, which only costs some
needless retransmissions.

Receiver side: `ReceiveBuffer` reports its out-of-order fragments; `receiver_blocks`
turns them into the blocks to put in an ACK, the one holding the most recently received
segment first (RFC 2018 §4).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Final

__all__ = ["SackScoreboard", "receiver_blocks", "MAX_RANGES"]

MAX_RANGES: Final = 64


class SackScoreboard:
    def __init__(self) -> None:
        self._ranges: list[tuple[int, int]] = []
        self.sacked = 0                   # bytes SACKed above SND.UNA

    def __bool__(self) -> bool:
        return bool(self._ranges)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return list(self._ranges)

    @property
    def high(self) -> int:
        """End of the highest SACKed range (0 when empty)."""
        return self._ranges[-1][1] if self._ranges else 0

    def clear(self) -> None:
        self._ranges.clear()
        self.sacked = 0

    def update(self, blocks: Iterable[tuple[int, int]], una: int, snd_max: int) -> int:
        """Record reported blocks; returns how many bytes became newly SACKed."""
        before = self.sacked
        for start, end in blocks:
            start, end = max(start, una), min(end, snd_max)
            if start < end:
                self._add(start, end)
        return self.sacked - before

    def advance(self, una: int) -> None:
        """SND.UNA moved: forget everything below it."""
        ranges = self._ranges
        while ranges and ranges[0][0] < una:
            start, end = ranges[0]
            if end <= una:
                ranges.pop(0)
                self.sacked -= end - start
            else:
                ranges[0] = (una, end)
                self.sacked -= una - start
                break

    def _add(self, start: int, end: int) -> None:
        ranges = self._ranges
        i = bisect.bisect_left(ranges, (start, start))
        if i > 0 and ranges[i - 1][1] >= start:      # touches or overlaps the one before
            i -= 1
        j = i
        while j < len(ranges) and ranges[j][0] <= end:
            start, end = min(start, ranges[j][0]), max(end, ranges[j][1])
            self.sacked -= ranges[j][1] - ranges[j][0]
            j += 1
        if i == j and len(ranges) >= MAX_RANGES:
            return
        ranges[i:j] = [(start, end)]
        self.sacked += end - start

    def hole_at(self, seq: int) -> tuple[int, int] | None:
        """The first un-SACKed range at or after `seq` that lies below `high`, or None."""
        for start, end in self._ranges:
            if end <= seq:
                continue
            if start > seq:
                return seq, start
            seq = end
        return None

    def sacked_between(self, lo: int, hi: int) -> int:
        total = 0
        for start, end in self._ranges:
            if start >= hi:
                break
            total += max(0, min(end, hi) - max(start, lo))
        return total


def receiver_blocks(ranges: list[tuple[int, int]], latest: int | None,
                    limit: int) -> tuple[tuple[int, int], ...]:
    """Up to `limit` blocks from the receiver's out-of-order `ranges`: the one containing
    `latest` (the most recently received segment) first, then the highest ones."""
    if not ranges or limit <= 0:
        return ()
    first = [r for r in ranges if latest is not None and r[0] <= latest < r[1]]
    rest = [r for r in reversed(ranges) if r not in first]
    return tuple((first + rest)[:limit])
