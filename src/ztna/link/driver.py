"""The I/O half of the link to the Intermediate, shared by the Agent's session and the
Connector's relay link (the pure rules are the package's other modules).

* `resolve`: the current Intermediate's name to one address the link's socket can reach.
* `open_link`: a client connection with `Hello` as its first control frame. The
  Intermediate keys the peer id on `Hello.instance`, so a reconnect (or a process on a
  fresh port) replaces the registration its predecessor left behind.
* `send_due_registers`: the Registers the registration machine says are due.
* `LinkLoop`: connect, serve, back off, fail over to the next Intermediate, again, until
  stopped; the program supplies one attempt (connect and serve one connection) and says
  whether it proved useful, which resets the backoff.
* `measure_handshakes`: one handshake with each Intermediate of a list, timed (for
  `targets.pick_by_rtt`), closed at once; no Hello, no registration, no ticket spent.
* `LinkEvents`: what others may follow: `moved` fires when a connection comes up on a
  different Intermediate than the previous one (a failover), so a socket that talks to
  "the Intermediate" (QAD, P2P signaling) can follow.

The programs keep what is theirs: the Agent its 0-RTT flight, packet queue and status,
the Connector its sink of relayed flows. Their control messages reach them through each
program's one dispatch table (`on_message`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ztna.link.backoff import Backoff
from ztna.link.registration import RegistrationPolicy, S, due_registrations
from ztna.link.targets import Address, Targets
from ztna.observe import format_address
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import CLOSE_NO_ERROR, QuicEndpoint
from ztna.wire import Hello, Register, Role, encode_control

__all__ = ["LinkEvents", "LinkLoop", "measure_handshakes", "open_link", "resolve",
           "send_due_registers", "silence"]


async def resolve(endpoint: QuicEndpoint, host: str, port: int) -> Address:
    """The first address of `host` the endpoint's socket can send to (an IPv4-only socket
    skips IPv6 answers)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    if endpoint.family == socket.AF_INET:
        infos = [i for i in infos if i[0] == socket.AF_INET]
    if not infos:
        raise OSError(f"no usable address for {host}")
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


def open_link(endpoint: QuicEndpoint, address: Address, config: Any,
              handler: ConnectionHandler, *, instance: int) -> ZtnaConnection:
    conn = endpoint.connect(address, config, handler)
    conn.send_control(encode_control(Hello(instance=instance)))
    return conn


async def measure_handshakes(endpoint: QuicEndpoint, addresses: Iterable[Address],
                             config_for: Callable[[Address], Any], *,
                             timeout: float) -> dict[Address, float | None]:
    """Seconds each handshake took (resolving excluded), None where it failed or timed out."""
    loop = asyncio.get_running_loop()

    async def one(target: Address) -> float | None:
        conn = None
        try:
            addr = await resolve(endpoint, *target)
            config = config_for(target)
            config.resumption = False        # a probe spends no session ticket
            started = loop.time()
            conn = endpoint.connect(addr, config, ConnectionHandler())
            await asyncio.wait_for(conn.wait_handshake(), timeout)
            return loop.time() - started
        except (TimeoutError, OSError, ConnectionError):
            return None
        finally:
            if conn is not None and not conn.closed:
                conn.close(CLOSE_NO_ERROR, "handshake timing")

    targets = list(dict.fromkeys(addresses))
    times = await asyncio.gather(*(one(t) for t in targets))
    return dict(zip(targets, times, strict=True))


def send_due_registers(conn: ZtnaConnection, slots: Iterable[S], *, now: float,
                       policy: RegistrationPolicy, role: Role) -> list[tuple[S, bool]]:
    due = due_registrations(slots, now=now, policy=policy)
    for slot, _resend in due:
        conn.send_control(encode_control(Register(role=role, service_id=slot.service_id)))
    return due


def silence(conn: ZtnaConnection, *, now: float, limit: float | None) -> str | None:
    """Why the path counts as dead (nothing heard for more than `limit` s), else None."""
    quiet = now - conn.last_received
    if limit is None or quiet <= limit:
        return None
    return f"nothing heard for {quiet:.1f}s"


class LinkEvents:
    """Listeners on one link. `moved(old, new)`: a connection came up on another
    Intermediate than the last one that came up (both are (host, port) as configured)."""

    def __init__(self) -> None:
        self.moved: list[Callable[[Address, Address], None]] = []
        self._last_up: Address | None = None

    def connected(self, target: Address) -> None:
        old, self._last_up = self._last_up, target
        if old is not None and old != target:
            for listener in list(self.moved):
                listener(old, target)


class LinkLoop:
    """Attempt, back off, fail over, until `stopping()`."""

    def __init__(self, targets: Targets, backoff: Backoff, *, log: logging.Logger,
                 reset_on_failover: bool) -> None:
        self.targets = targets
        self.backoff = backoff
        self.log = log
        # The Agent starts afresh on the next Intermediate (it never failed there); the
        # Connector keeps backing off across the list.
        self.reset_on_failover = reset_on_failover

    async def run(self, attempt: Callable[[Address], Awaitable[bool]], *,
                  stopping: Callable[[], bool], sleep: Callable[[float], Awaitable[None]],
                  on_failure: Callable[[Exception], None],
                  on_retry: Callable[[float], None]) -> None:
        """`attempt(target)` runs one connection; True when it proved useful. Its
        exceptions (other than cancellation) go to `on_failure`; `on_retry(delay)` is told
        each wait before the next attempt."""
        while not stopping():
            useful = False
            try:
                useful = await attempt(self.targets.current)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: back off, retry
                on_failure(exc)
            if stopping():
                return
            if self.targets.fail_over():
                self.log.info("failing over to intermediate %s", format_address(self.targets.current))
                if self.reset_on_failover:
                    self.backoff.reset()
            if useful:
                self.backoff.reset()
            delay = self.backoff.next_delay()
            on_retry(delay)
            await sleep(delay)
