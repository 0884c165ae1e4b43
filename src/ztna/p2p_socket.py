"""The P2P socket of the Agent and of the Connector: one UDP socket for direct paths.

Theory of operation
-------------------
* **One socket, three users.** A `QuicEndpoint` on the P2P port carries the direct QUIC
  connections (the Agent dials them, the Connector serves them), the probes of hole
  punching (raw datagrams, first byte < 0x40), and a small QUIC client connection to the
  Intermediate whose QAD (``ObservedAddress``) tells us this socket's public address, the
  server-reflexive candidate. The NAT mapping the probes validate is the one QUIC uses.
* **QAD.** The QAD connection never registers anything: it opens the control stream with a
  Ping (the Intermediate may only write stream 0 after us, and ignores pings) so that its
  QAD frame reaches us, and is pinged every `limits.NAT_KEEPALIVE_INTERVAL`, which also keeps
  the NAT mapping alive. The Intermediate's name resolves to IPv4 and IPv6 alike; on an
  IPv4-only socket only IPv4 is tried, a dual-stack socket takes the first. After a failure
  or a close it reconnects after the program's backoff.
* **Following the link.** QAD goes to the Intermediate the program's relay link is on (or
  trying): `intermediate()` is read at every connect. With several Intermediates the link may
  fail over; the program hands the link's `moved` event to `follow()`, which moves the QAD
  connection there at once (the old one closed, no backoff), so the public address and the
  NAT mapping's keepalive belong to the Intermediate that now carries the punch signaling.
* **Interface refresh.** The host's addresses (netlink in a thread: it runs its own loop)
  every `ADDRESS_REFRESH` seconds, handed to the program's `on_addresses`.
* **Probe routing.** A `ztna.p2p.router.ProbeRouter` holds the punch sessions; each probe
  goes to its session, and what a session wants sent leaves from this socket. The program
  hears each step through `on_punch(progress)`.
* **One timer.** All of it (QAD connect, handshake timeout and pings, interface refresh,
  probe retransmits) is scheduled by one pure `ztna.p2p.schedule.P2PSchedule`; a single
  `call_at` handle is re-armed at its `next_due()`. Work that waits (name resolution, the
  handshake, netlink) runs in tasks that report back to the schedule.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from ztna import limits
from ztna.errors import DecodeError
from ztna.link import Backoff
from ztna.observe import format_address
from ztna.p2p.candidates import interface_addresses
from ztna.p2p.punch import PunchSession
from ztna.p2p.router import ProbeRouter, Progress
from ztna.p2p.schedule import Job, P2PSchedule
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import CLOSE_NO_ERROR, QuicEndpoint, ServerOptions
from ztna.wire import (
    ControlMessage,
    DatagramKind,
    ObservedAddress,
    Ping,
    classify_datagram,
    decode_qad,
    encode_control,
)

__all__ = ["ADDRESS_REFRESH", "QAD_HANDSHAKE_TIMEOUT", "P2POwner", "P2PSocket"]

log = logging.getLogger("ztna.p2p")

ADDRESS_REFRESH = 10.0          # seconds between interface listings
QAD_HANDSHAKE_TIMEOUT = 10.0    # a QAD connection not up by then is dropped and retried

T = TypeVar("T")


class P2POwner(Protocol[T]):
    """What the program (Agent or Connector) hears from its P2P socket."""

    def on_public_address(self, addr: ObservedAddress) -> None: ...
    def on_addresses(self, addresses: list[str]) -> None: ...
    def on_punch(self, progress: Progress[T]) -> None: ...


class _QadHandler(ConnectionHandler):
    def __init__(self, sock: P2PSocket[Any]) -> None:
        self.sock = sock

    def on_handshake(self, conn: ZtnaConnection) -> None:
        self.sock._qad_up(conn)

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        if data and classify_datagram(data[0]) is DatagramKind.QAD:
            try:
                self.sock.set_public_address(decode_qad(data))
            except DecodeError:
                pass

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if isinstance(msg, ObservedAddress):
            self.sock.set_public_address(msg)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self.sock._qad_down(conn, reason)


class P2PSocket(Generic[T]):
    """The driver: owns the endpoint, the QAD connection, the interface list, the probe
    router and the one timer. `T` is the program's tag for a punch session."""

    def __init__(self, sock: socket.socket, owner: P2POwner[T], *,
                 intermediate: Callable[[], tuple[str, int]],
                 qad_config: Callable[[str], Any], backoff: Backoff, max_sessions: int,
                 linger: float | None = None, server: ServerOptions | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.owner = owner
        self.intermediate = intermediate       # where the link is: QAD goes there
        self.qad_config = qad_config           # the client configuration for a host name
        self.backoff = backoff
        self.router: ProbeRouter[T] = ProbeRouter(max_sessions=max_sessions, linger=linger)
        self.endpoint = QuicEndpoint(sock, server=server, raw_handler=self._raw, loop=self.loop,
                                     retain_streams=True, thread=True)
        self.schedule = P2PSchedule(now=self.loop.time(), keepalive=limits.NAT_KEEPALIVE_INTERVAL,
                                    interface_refresh=ADDRESS_REFRESH,
                                    handshake_timeout=QAD_HANDSHAKE_TIMEOUT)
        self.public_address: ObservedAddress | None = None
        self.observed_at: float | None = None
        self.addresses: list[str] = []
        self.qad_conn: ZtnaConnection | None = None
        self.qad_target: tuple[str, int] | None = None   # where `qad_conn` went
        self.qad_connects = 0
        self.moves = 0
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0    # bumped by each connect and move: stale attempts stand down
        self._started = False
        self._stopping = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        return int(self.endpoint.local_address[1])

    def start(self) -> None:
        self._started = True
        self._arm()

    def close(self, reason: str) -> None:
        """Stop the timer and the tasks and close every connection (the socket stays open
        until `shutdown_socket`, so the closes can leave)."""
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in list(self._tasks):
            task.cancel()
        self.endpoint.close(reason=reason)

    def shutdown_socket(self) -> None:
        self.endpoint.shutdown_socket()

    def send_raw(self, data: bytes, addr: tuple[Any, ...]) -> bool:
        return self.endpoint.send_raw(data, addr)

    # ------------------------------------------------------------------ the timer
    def _arm(self) -> None:
        if self._stopping or not self._started:
            return
        self.schedule.probes_at(self.router.next_deadline(now=self.loop.time()))
        due = self.schedule.next_due()
        if self._timer is not None:
            if due is not None and self._timer.when() == due:
                return
            self._timer.cancel()
            self._timer = None
        if due is not None:
            self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.loop.time()
        for job in self.schedule.due(now):
            try:
                self._run(job, now)
            except Exception:  # a bug in one job must not stop the others for good
                log.exception("P2P socket: %s failed", job)
        self._arm()

    def _run(self, job: Job, now: float) -> None:
        if job is Job.PROBES:
            for progress in self.router.on_timer(now=now):
                self._progressed(progress)
        elif job is Job.QAD_CONNECT:
            self._generation += 1
            self.schedule.qad_connecting(now)
            self._spawn(self._qad_connect(self._generation), "ztna-p2p-qad")
        elif job is Job.QAD_TIMEOUT:
            self._generation += 1      # a name resolution still under way stands down
            conn = self.qad_conn
            log.debug("P2P QAD connection: no handshake within %.0fs", QAD_HANDSHAKE_TIMEOUT)
            if conn is not None:
                conn.close(CLOSE_NO_ERROR, "qad retry")
            self._qad_failed(conn, "handshake timeout")
        elif job is Job.QAD_PING:
            conn = self.qad_conn
            if conn is not None and not conn.closed:
                conn.ping()
                self.schedule.qad_pinged(now)
        elif job is Job.INTERFACES:
            self.schedule.interfaces_listing()
            self._spawn(self._list_interfaces(), "ztna-p2p-addr")

    def _spawn(self, coro: Any, name: str) -> None:
        task = self.loop.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ interfaces
    async def _list_interfaces(self) -> None:
        try:
            self.addresses = await asyncio.to_thread(interface_addresses)
        except Exception as exc:  # noqa: BLE001 - srflx alone may still work
            log.warning("cannot list interface addresses: %s", exc)
        if self._stopping:
            return
        self.schedule.interfaces_listed(self.loop.time())
        self._arm()
        self.owner.on_addresses(self.addresses)

    # ------------------------------------------------------------------ QAD
    def set_public_address(self, addr: ObservedAddress) -> None:
        if addr != self.public_address:
            log.info("P2P socket public address (QAD): %s", format_address((addr.ip, addr.port)))
        self.public_address = addr
        if self.observed_at is None:
            self.observed_at = self.loop.time()
        self.owner.on_public_address(addr)

    @property
    def observed(self) -> tuple[str, int] | None:
        pa = self.public_address
        return (str(pa.ip), pa.port) if pa is not None else None

    def qad_snapshot(self) -> dict[str, Any]:
        """Where the QAD connection goes and whether it is up (status output)."""
        conn = self.qad_conn
        target = self.qad_target if self.qad_target is not None else self.intermediate()
        return {"intermediate": format_address(target),
                "up": conn is not None and conn.is_established, "moves": self.moves}

    def follow(self) -> None:
        """The program's link moved to another Intermediate: QAD goes there now. A no-op
        when the QAD connection is there already."""
        target = self.intermediate()
        if target == self.qad_target:
            return
        log.info("P2P socket follows the link to intermediate %s", format_address(target))
        self.moves += 1
        self._generation += 1
        conn, self.qad_conn, self.qad_target = self.qad_conn, None, None
        if conn is not None and not conn.closed:
            conn.close(CLOSE_NO_ERROR, "link moved to another intermediate")
        self.backoff.reset()
        self.schedule.qad_moved(self.loop.time())
        self._arm()

    async def _qad_connect(self, generation: int) -> None:
        conn = None
        host, port = target = self.intermediate()
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            if self.endpoint.family == socket.AF_INET:
                infos = [i for i in infos if i[0] == socket.AF_INET]
            if not infos:
                raise OSError(f"no usable address for {host}")
            if generation != self._generation or self._stopping:
                return
            conn = self.endpoint.connect(infos[0][4][:2], self.qad_config(host), _QadHandler(self))
            self.qad_conn, self.qad_target = conn, target
            self.qad_connects += 1
            conn.send_control(encode_control(Ping(id=0)))
        except (OSError, ConnectionError, ValueError) as exc:
            if generation == self._generation:
                self._qad_failed(conn, str(exc) or type(exc).__name__)

    def _qad_up(self, conn: ZtnaConnection) -> None:
        if conn is not self.qad_conn:
            return
        self.backoff.reset()
        self.schedule.qad_up(self.loop.time())
        self._arm()

    def _qad_down(self, conn: ZtnaConnection, reason: str) -> None:
        if conn is self.qad_conn:
            self._qad_failed(conn, reason)

    def _qad_failed(self, conn: ZtnaConnection | None, reason: str) -> None:
        if conn is not None and conn is not self.qad_conn:
            return
        self.qad_conn = None
        if self._stopping:
            return
        delay = self.backoff.next_delay()
        log.debug("P2P QAD connection to %s: %s; again in %.1fs",
                  format_address(self.qad_target or self.intermediate()), reason, delay)
        self.schedule.qad_down(self.loop.time(), delay)
        self._arm()

    # ------------------------------------------------------------------ probes
    def punch(self, session: PunchSession, tag: T) -> None:
        """Hold a new punch session: its probes route to it, its timers run on ours."""
        self._progressed(self.router.add(session, tag, now=self.loop.time()))
        self._arm()

    def discard(self, session_id: int) -> None:
        self.router.discard(session_id)
        self._arm()

    def silence(self, session_id: int) -> None:
        self.router.silence(session_id)
        self._arm()

    def _raw(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        progress = self.router.route(data, addr, now=now)
        if progress is not None:
            self._progressed(progress)
            self._arm()

    def _progressed(self, progress: Progress[T]) -> None:
        for s in progress.sends:
            self.endpoint.send_raw(s.data, s.addr)
        self.owner.on_punch(progress)
