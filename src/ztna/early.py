"""The one bounded buffer for what a peer sends before it can be served.

The Intermediate keeps 0-RTT data that arrives before the peer's identity is known, and
tunnel packets that overtook the registration they depend on; the Connector's direct server
keeps packets that overtook the Hello. All three hold a few items in arrival order, bounded
in count, bytes or time, and hand them over when the peer is ready.

Pure: the caller's clock comes in as `now`.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class EarlyHold(Generic[T]):
    """Items kept until their peer can be served, in arrival order: at most `max_items`, at
    most `max_bytes` in total (sizes given to `hold`), and none offered after `until` (a
    time on the caller's clock). `release()` hands them over and takes no more."""

    __slots__ = ("max_items", "max_bytes", "until", "_items", "_bytes", "sealed")

    def __init__(self, max_items: int | None = None, *, max_bytes: int | None = None,
                 until: float | None = None) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.until = until
        self._items: list[T] = []
        self._bytes = 0
        self.sealed = False

    def hold(self, item: T, *, size: int = 0, now: float | None = None) -> bool:
        """Keep `item`; False (not kept) when sealed, full or past `until`."""
        if self.sealed or (self.until is not None and now is not None and now > self.until):
            return False
        if self.max_items is not None and len(self._items) >= self.max_items:
            return False
        if self.max_bytes is not None and self._bytes + size > self.max_bytes:
            return False
        self._items.append(item)
        self._bytes += size
        return True

    def take(self) -> list[T]:
        """Everything held so far; more may be held afterwards."""
        items, self._items, self._bytes = self._items, [], 0
        return items

    def release(self) -> list[T]:
        """Everything held; nothing more is kept after this."""
        self.sealed = True
        return self.take()

    def __len__(self) -> int:
        return len(self._items)
