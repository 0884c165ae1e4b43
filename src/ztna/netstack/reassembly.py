"""Receive side of the userspace TCP: in-order delivery from out-of-order segments.

Theory of operation: sequence numbers here are *absolute* (unwrapped) integers, so
comparisons need no modular arithmetic. `rcv_nxt` is the next byte expected. In-order bytes
wait in `_ready` (a bytearray; CPython deletes from its front in O(1)) until the driver
`read()`s them. Bytes beyond a hole wait in `_ooo`, a sorted list of non-overlapping
`(start, bytes)` fragments. Every byte accepted lies inside the receive window
[rcv_nxt, rcv_nxt + capacity − unread), so `_ready` plus `_ooo` never exceed `capacity`;
the fragment count is capped too (`MAX_FRAGMENTS`) so a peer sending 1-byte segments with
holes cannot build a long list. Each byte is delivered exactly once and in order: overlap
with data already held is trimmed away before storing.

A FIN is remembered by its sequence number and consumed only when `rcv_nxt` reaches it,
so a FIN that overtakes data (reordering) is neither lost nor applied early.
"""

from __future__ import annotations

import bisect
from typing import Final

__all__ = ["ReceiveBuffer", "MAX_FRAGMENTS"]

# 1 fragment per 512 bytes of a 256 KiB buffer: far above what real reordering produces.
MAX_FRAGMENTS: Final = 512


def _start(frag: tuple[int, bytes]) -> int:
    return frag[0]


class ReceiveBuffer:
    def __init__(self, rcv_nxt: int, capacity: int) -> None:
        self.rcv_nxt = rcv_nxt
        self.capacity = capacity
        self.fin_seq: int | None = None
        self.fin_received = False
        self._ready = bytearray()
        self._ooo: list[tuple[int, bytes]] = []

    @property
    def unread(self) -> int:
        return len(self._ready)

    @property
    def has_gaps(self) -> bool:
        return bool(self._ooo)

    def ooo_ranges(self) -> list[tuple[int, int]]:
        """The out-of-order data held, as merged [start, end) ranges (for SACK blocks)."""
        out: list[tuple[int, int]] = []
        for start, data in self._ooo:
            end = start + len(data)
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        return out

    def window(self) -> int:
        return self.capacity - len(self._ready)

    def read(self, max_bytes: int = -1) -> bytes:
        n = len(self._ready) if max_bytes < 0 else min(max_bytes, len(self._ready))
        out = bytes(self._ready[:n])
        del self._ready[:n]
        return out

    def insert(self, seq: int, payload: bytes | bytearray | memoryview, fin: bool) -> int:
        """Store a segment starting at absolute `seq`; returns how far `rcv_nxt` advanced."""
        before = self.rcv_nxt
        end = seq + len(payload)
        right = self.rcv_nxt + self.window()
        if self.fin_seq is not None:
            right = min(right, self.fin_seq)   # nothing exists after the peer's FIN
        if end > right:
            payload = memoryview(payload)[:max(0, right - seq)]
            end = seq + len(payload)
            fin = False
        if fin and self.fin_seq is None:
            self.fin_seq = end
        if seq < self.rcv_nxt:
            payload = memoryview(payload)[min(len(payload), self.rcv_nxt - seq):]
            seq = self.rcv_nxt
        if payload:
            if seq == self.rcv_nxt:
                self._ready += payload
                self.rcv_nxt = end
                self._drain_ooo()
            else:
                self._store_ooo(seq, payload)
        if self.fin_seq is not None and not self.fin_received and self.rcv_nxt == self.fin_seq:
            self.fin_received = True
            self.rcv_nxt += 1
        return self.rcv_nxt - before

    def _drain_ooo(self) -> None:
        ooo = self._ooo
        while ooo and ooo[0][0] <= self.rcv_nxt:
            start, data = ooo.pop(0)
            end = start + len(data)
            if end > self.rcv_nxt:
                self._ready += memoryview(data)[self.rcv_nxt - start:]
                self.rcv_nxt = end

    def _store_ooo(self, start: int, data: bytes | bytearray | memoryview) -> None:
        ooo = self._ooo
        end = start + len(data)
        i = bisect.bisect_right(ooo, start, key=_start)
        if i > 0:
            pstart, pdata = ooo[i - 1]
            pend = pstart + len(pdata)
            if pend >= end:
                return                       # duplicate: fully held already
            if pend > start:
                data = memoryview(data)[pend - start:]
                start = pend
        while i < len(ooo):
            sstart, sdata = ooo[i]
            if sstart >= end:
                break
            if sstart + len(sdata) <= end:
                del ooo[i]                   # the new segment covers it
                continue
            data = memoryview(data)[:sstart - start]
            end = sstart
            break
        if data and len(ooo) < MAX_FRAGMENTS:
            ooo.insert(i, (start, bytes(data)))
