"""delaywire: a userspace delay line between two TAP devices (the kernel has no netem).

    python -m ztna.lab.delaywire --a zt-nata:wan --b zt-inet:nata --delay-ms 10 --jitter-ms 1

One process joins two persistent TAP devices that live in two namespaces. A TAP
device is bound to the namespace current at ``open("/dev/net/tun")``, so the process
enters each namespace in turn (ctypes ``setns``), opens the device, and returns.
Every Ethernet frame read on one side is written to the other after
``delay ± jitter`` (uniform jitter, one way). Departure times are forced to be
monotonic per direction, so frames are never reordered; jitter only compresses or
stretches gaps, like netem with a rate. Each direction's queue is bounded
(``--queue`` frames); an overflow is a drop, as on a real link.

The Lab puts one wire on each NAT's WAN link, so agent<->relay crosses one wire
(RTT ~ 2 x delay) and agent<->connector crosses two (RTT ~ 4 x delay).

Readiness: once both devices are open the process prints ``ready`` on stdout and
then points stdout at /dev/null, so the launching process may exit freely. It runs
until SIGTERM/SIGINT, or until a device disappears (its namespace was deleted).
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import random
import select
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Final

from ztna.lab.netns import NETNS_DIR, setns

TUNSETIFF: Final = 0x400454CA
IFF_TAP: Final = 0x0002
IFF_NO_PI: Final = 0x1000
# Frames held per direction: ~10k x 1.5 kB = 15 MB at worst, plenty for 100 ms at 1 Gbit/s.
DEFAULT_QUEUE: Final = 10_000
READ_BATCH: Final = 64  # frames read per readable fd per loop turn, so both sides get served


class DelayLine:
    """One direction of the wire: a FIFO of (due, frame) with monotonic due times."""

    def __init__(
        self, *, delay: float, jitter: float, limit: int, rng: Callable[[], float]
    ) -> None:
        self.delay = delay
        self.jitter = jitter
        self.limit = limit
        self._rng = rng
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._last_due = 0.0
        self.dropped = 0
        self.forwarded = 0

    def push(self, frame: bytes, *, now: float) -> bool:
        """Queue ``frame``; False (and counted) when the queue is full."""
        if len(self._queue) >= self.limit:
            self.dropped += 1
            return False
        offset = self.delay + (self._rng() * 2 - 1) * self.jitter if self.jitter else self.delay
        due = max(now + max(offset, 0.0), self._last_due)  # never reorder
        self._last_due = due
        self._queue.append((due, frame))
        return True

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def pop_due(self, *, now: float) -> list[bytes]:
        out = []
        while self._queue and self._queue[0][0] <= now:
            out.append(self._queue.popleft()[1])
        self.forwarded += len(out)
        return out


def open_tap(ns: str, ifname: str) -> int:
    """Open TAP ``ifname`` inside namespace ``ns`` (the caller's namespace is restored)."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(os.path.join(NETNS_DIR, ns))
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", ifname.encode(), IFF_TAP | IFF_NO_PI))
        return fd
    finally:
        setns(f"/proc/self/fd/{own}")
        os.close(own)


def _spec(text: str) -> tuple[str, str]:
    ns, sep, ifname = text.partition(":")
    if not sep or not ns or not ifname or len(ifname) > 15:
        raise argparse.ArgumentTypeError(f"expected NETNS:IFNAME, got {text!r}")
    return ns, ifname


def serve(
    fa: int, fb: int, *, delay: float, jitter: float, limit: int, stop: list[bool], wake: int = -1
) -> dict[str, int]:
    """Forward until ``stop[0]``; ``wake`` becomes readable when a signal arrives."""
    rng = random.Random().random
    lines = {fd: DelayLine(delay=delay, jitter=jitter, limit=limit, rng=rng) for fd in (fa, fb)}
    peer = {fa: fb, fb: fa}
    write_errors = 0
    watch = [fa, fb, *([wake] if wake >= 0 else [])]
    while not stop[0]:
        dues = [d for d in (line.next_due() for line in lines.values()) if d is not None]
        timeout = 0.5 if not dues else max(0.0, min(dues) - time.monotonic())
        try:
            readable, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in readable:
            if fd == wake:
                os.read(wake, 512)  # drain; the handler already set stop
                continue
            for _ in range(READ_BATCH):
                try:
                    frame = os.read(fd, 65536)
                except BlockingIOError:
                    break
                except OSError:  # device gone: our namespace was deleted under us
                    stop[0] = True
                    break
                lines[fd].push(frame, now=now)
        now = time.monotonic()
        for src, line in lines.items():
            for frame in line.pop_due(now=now):
                try:
                    os.write(peer[src], frame)
                except OSError:  # peer's queue full or device down: the frame is lost
                    write_errors += 1
    return {
        "forwarded": sum(line.forwarded for line in lines.values()),
        "dropped": sum(line.dropped for line in lines.values()) + write_errors,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m ztna.lab.delaywire",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--a", type=_spec, required=True, metavar="NETNS:TAP")
    ap.add_argument("--b", type=_spec, required=True, metavar="NETNS:TAP")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--queue", type=int, default=DEFAULT_QUEUE)
    args = ap.parse_args(argv)
    stop = [False]
    # select() is retried after a signal (PEP 475): the wakeup pipe makes it return
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__(0, True))
    fa = open_tap(*args.a)
    fb = open_tap(*args.b)
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    delay, jitter = args.delay_ms / 1000, args.jitter_ms / 1000
    serve(fa, fb, delay=delay, jitter=jitter, limit=args.queue, stop=stop, wake=wake_r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
