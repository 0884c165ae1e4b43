"""The Connector's connection to the Intermediate, kept alive for the life of the process.

Theory of operation
-------------------
* One UDP socket (the relay socket, ephemeral unless `--relay-port`), one QUIC client
  connection at a time. The link's shared parts (``ztna.link``) do the rest: resolve the
  current Intermediate's name, connect with `Hello` first, back off and fail over to the
  next of `--intermediate A,B,...` (``LinkLoop``), keepalive and CID rotation through the one
  upkeep, and register every service through the one registration machine.
* Registration (``ztna.link.registration`` with the Connector's policy): each service is
  re-sent every 2 s until its ACK or NACK arrives (the control stream is reliable, but an
  Intermediate that is busy or just restarted must not leave a service silently
  unregistered). NOT_AUTHORIZED / INVALID_REQUEST / SERVICE_CONFLICT are final for this
  connection (logged as errors); LIMIT_EXCEEDED / SHUTTING_DOWN are retried after 30 s.
* Keepalive: a QUIC PING after `limits.KEEPALIVE_INTERVAL` of silence (the idle timeout is
  30 s); with somewhere to fail over to, every `FAILOVER_PING` s, and an Intermediate silent
  for `FAILOVER_SILENCE` s is left.
* Reconnect: exponential backoff with jitter, awaited with `asyncio.sleep` so it never
  blocks the event loop — the P2P server, open flows and /metrics keep
  running. A connection that lived `STABLE_AFTER` seconds resets the backoff. Every
  reconnect re-registers every service; the flows the outage parked resume on the first ACK.
* `GoAway` closes the connection and reconnects after the backoff; `AgentGone` is handed
  to the sink so that Agent's relay flows are dropped at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable
from typing import Any, Protocol

from ztna import limits
from ztna.identity import server_name_mismatch
from ztna.link import Backoff, LinkState
from ztna.link.driver import LinkEvents, LinkLoop, open_link, resolve, send_due_registers, silence
from ztna.link.registration import (
    ACKED,
    CONNECTOR_POLICY,
    REFUSED,
    ServiceRegistration,
    apply_ack,
    apply_nack,
    connector_label,
    reset_registration,
)
from ztna.link.targets import Targets
from ztna.observe import format_address
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import CLOSE_NO_ERROR, QuicEndpoint
from ztna.quic.maintenance import UpkeepSchedule, run_upkeep
from ztna.wire import (
    PUNCH_MESSAGES,
    AgentGone,
    ControlMessage,
    ErrorMessage,
    GoAway,
    ObservedAddress,
    RegistrationAck,
    RegistrationNack,
    Role,
)

log = logging.getLogger("ztna.connector")

HANDSHAKE_TIMEOUT = 10.0
REGISTER_RETRY = CONNECTOR_POLICY.first_retry
NACK_RETRY = CONNECTOR_POLICY.nack_retry
BACKOFF_BASE = 0.5
FAILOVER_PING = 2.0        # keepalive while other Intermediates are there to fail over to
FAILOVER_SILENCE = 8.0     # nothing heard this long: that Intermediate is gone
BACKOFF_CAP = 30.0
STABLE_AFTER = 10.0


def connector_instance(name: str) -> int:
    """The `Hello.instance` of a Connector: a u64 from its name, so the same Connector
    (same certificate, same name) keeps its peer id across restarts."""
    return int.from_bytes(hashlib.blake2b(b"ztna connector\0" + name.encode(), digest_size=8).digest(), "big")


class LinkSink(Protocol):
    def relay_up(self, conn: ZtnaConnection) -> None: ...     # a registration ACKed on `conn`
    def relay_down(self, conn: ZtnaConnection) -> None: ...
    def relay_datagram(self, conn: ZtnaConnection, data: bytes) -> None: ...
    def relay_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None: ...
    def relay_stream_reset(self, conn: ZtnaConnection, sid: int) -> None: ...
    def agent_gone(self, agent_id: int) -> None: ...


class RelayLink(ConnectionHandler):
    def __init__(self, endpoint: QuicEndpoint, *, host: str, port: int,
                 config_factory: Callable[[], Any], services: list[str], sink: LinkSink,
                 rng: random.Random | None = None, name: str = "connector",
                 alternates: list[tuple[str, int]] | None = None,
                 watch_silence: bool = False) -> None:
        self.endpoint = endpoint
        # Several Intermediates (one cluster): after a lost or failed connection the link moves
        # on to the next; the cluster shares the tickets, so it resumes there in 0-RTT.
        self.targets = Targets(alternates or [], current=(host, port))
        # Leave a silent Intermediate after FAILOVER_SILENCE s: with somewhere to fail over
        # to, or when other links (--attach all) carry the services meanwhile.
        self.watch_silence = watch_silence or self.targets.can_fail_over
        self.events = LinkEvents()
        self.name = name
        self.instance = connector_instance(name)
        self.config_factory = config_factory
        self.services = services
        self.sink = sink
        # Hole-punch signaling (PunchOffer/PunchStart/..., session errors): ztna.connector.punch
        self.on_punch: Callable[[ZtnaConnection, object], None] | None = None
        self.on_registered: Callable[[ZtnaConnection], None] | None = None
        # Each registration ACK (every reconnect too): the Connector reports its health.
        self.on_service_registered: Callable[[ZtnaConnection, str], None] | None = None
        self.rng = rng or random.Random()
        self.conn: ZtnaConnection | None = None
        self.state = LinkState.STARTING
        self.slots = {s: ServiceRegistration(s, retry_delay=REGISTER_RETRY) for s in services}
        self.public_address: ObservedAddress | None = None
        self.connects = 0
        self.reconnects = 0
        self.last_error = ""
        self._name_error: str | None = None
        self._control_handlers = self._control_table()
        self._closed = asyncio.Event()
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ status
    @property
    def host(self) -> str:
        """The Intermediate tried now (given several, they take turns)."""
        return self.targets.current[0]

    @property
    def port(self) -> int:
        return self.targets.current[1]

    @property
    def failovers(self) -> int:
        return self.targets.moves

    @property
    def registration(self) -> dict[str, str]:
        """Each service's registration in the Connector's words (health JSON, metrics)."""
        return {sid: connector_label(slot) for sid, slot in self.slots.items()}

    def registered(self, service: str) -> bool:
        slot = self.slots.get(service)
        return slot is not None and slot.registration is ACKED

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_established

    @property
    def all_registered(self) -> bool:
        return self.connected and all(s.registration is ACKED for s in self.slots.values())

    # ------------------------------------------------------------------ main loop
    async def run(self) -> None:
        backoff = Backoff(initial=BACKOFF_BASE, cap=BACKOFF_CAP, rng=self.rng)
        await LinkLoop(self.targets, backoff, log=log, reset_on_failover=False).run(
            self._attempt, stopping=self._stopping.is_set, sleep=self._sleep,
            on_failure=self._failed, on_retry=self._retry)
        self.state = LinkState.STOPPED

    async def _attempt(self, target: tuple[str, int]) -> bool:
        """One connection; True when it lived long enough to reset the backoff."""
        loop = asyncio.get_running_loop()
        self.state = LinkState.CONNECTING
        started = loop.time()
        conn = await self._connect_once()
        if conn is None:
            return False
        await self._serve(conn)
        return loop.time() - started >= STABLE_AFTER

    def _failed(self, exc: Exception) -> None:
        self.last_error = str(exc) or type(exc).__name__
        log.warning("intermediate %s: %s", format_address((self.host, self.port)), self.last_error)

    def _retry(self, delay: float) -> None:
        self.reconnects += 1
        self.state = LinkState.BACKOFF
        log.info("reconnecting to the intermediate in %.1fs (%s)", delay, self.last_error)

    async def _sleep(self, delay: float) -> None:
        try:
            await asyncio.wait_for(self._stopping.wait(), delay)
        except TimeoutError:
            pass

    async def _connect_once(self) -> ZtnaConnection | None:
        conn = None
        try:
            addr = await resolve(self.endpoint, self.host, self.port)
            self._closed = asyncio.Event()
            # Hello first: who we are among the Connectors sharing our certificate, so this
            # connection replaces the registration a crashed predecessor of ours left behind.
            conn = open_link(self.endpoint, addr, self.config_factory(), self, instance=self.instance)
            await asyncio.wait_for(conn.wait_handshake(), HANDSHAKE_TIMEOUT)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            if self._stopping.is_set():
                return None   # our own shutdown ended the attempt: nothing to report
            log.warning("cannot connect to the intermediate %s: %s", format_address((self.host, self.port)),
                        self.last_error)
            if conn is not None:
                self._explain_name_mismatch(conn)
            if conn is not None:
                conn.close(CLOSE_NO_ERROR, "handshake timeout")
            return None
        return conn

    def _explain_name_mismatch(self, conn: ZtnaConnection) -> None:
        # Retrying never fixes a certificate without the name we verify: one ERROR line
        # (again only if the mismatch changes) naming the expected and the held names.
        config = self.config_factory()
        why = server_name_mismatch(conn.peer_certificate, config.server_name or self.host)
        if why is not None and why != self._name_error:
            self._name_error = why
            log.error("intermediate %s: certificate name mismatch: %s (give --server-name, "
                      "or issue its certificate with `ztna certs init --host`)",
                      format_address((self.host, self.port)), why)

    async def _serve(self, conn: ZtnaConnection) -> None:
        loop = asyncio.get_running_loop()
        self.conn = conn
        self.connects += 1
        self.state = LinkState.CONNECTED
        for slot in self.slots.values():
            reset_registration(slot, CONNECTOR_POLICY)
        log.info("connected to the intermediate %s (%s)", format_address(conn.peer_address), self.host)
        self.events.connected(self.targets.current)
        # With somewhere else to go (several Intermediates), a silent one is left after
        # FAILOVER_SILENCE instead of the 30 s idle timeout; pings are frequent enough for that.
        failover = self.watch_silence
        keepalive = FAILOVER_PING if failover else limits.KEEPALIVE_INTERVAL
        upkeep = UpkeepSchedule(keepalive=keepalive, cid_rotation=limits.CID_ROTATION_INTERVAL,
                                now=loop.time())
        try:
            while not conn.closed and not self._stopping.is_set():
                now = loop.time()
                send_due_registers(conn, self.slots.values(), now=now, policy=CONNECTOR_POLICY,
                                   role=Role.CONNECTOR)
                run_upkeep(conn, upkeep, now=now)    # keepalive PING, CID rotation
                quiet = silence(conn, now=now, limit=FAILOVER_SILENCE if failover else None)
                if quiet is not None:
                    self.last_error = quiet
                    log.warning("intermediate %s silent (%s)", format_address((self.host, self.port)),
                                self.last_error)
                    conn.close(CLOSE_NO_ERROR, "intermediate silent")
                    break
                try:
                    await asyncio.wait_for(self._closed.wait(), 0.5 if failover else 1.0)
                except TimeoutError:
                    pass
        finally:
            if self.conn is conn:
                self.conn = None
            if not conn.closed:
                conn.close(CLOSE_NO_ERROR, "connector stopping")
            self.state = LinkState.DISCONNECTED
            self.sink.relay_down(conn)

    def stop(self) -> None:
        self._stopping.set()
        self._closed.set()
        if self.conn is not None:
            self.conn.close(CLOSE_NO_ERROR, "connector shutting down")

    # ------------------------------------------------------------------ connection events
    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        handler = self._control_handlers.get(type(msg))
        if handler is not None:
            handler(conn, msg)
        # Everything else (pings, unknown types) is ignored by design (forward compatible).

    def _control_table(self) -> dict[type, Callable[[ZtnaConnection, Any], None]]:
        """The Connector's one dispatch table for control messages from the Intermediate."""
        table: dict[type, Callable[[ZtnaConnection, Any], None]] = {
            RegistrationAck: self._registered,
            RegistrationNack: self._refused,
            ObservedAddress: self._observed,
            AgentGone: lambda conn, msg: self.sink.agent_gone(msg.agent),
            GoAway: self._goaway,
            ErrorMessage: self._error,
        }
        for kind in PUNCH_MESSAGES:
            table[kind] = self._punch
        return table

    def _punch(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if self.on_punch is not None:
            self.on_punch(conn, msg)

    def _error(self, conn: ZtnaConnection, msg: ErrorMessage) -> None:
        if msg.session is not None:   # about a punch session: the punch machinery's business
            self._punch(conn, msg)

    def _registered(self, conn: ZtnaConnection, msg: RegistrationAck) -> None:
        slot = self.slots.get(msg.service_id)
        if slot is None:
            return
        if apply_ack(slot, CONNECTOR_POLICY):
            log.info("service %r registered with the intermediate", msg.service_id)
        # Flows parked by an outage go on only now: until the Intermediate knows us as a
        # Connector again it drops what we send its Agents (unauthorized replies), and a
        # resend lost there costs the flow a backed-off timeout.
        self.sink.relay_up(conn)
        if self.on_service_registered is not None:
            self.on_service_registered(conn, msg.service_id)
        if self.on_registered is not None:
            self.on_registered(conn)

    def _refused(self, conn: ZtnaConnection, msg: RegistrationNack) -> None:
        slot = self.slots.get(msg.service_id)
        if slot is None:
            return
        now = asyncio.get_running_loop().time()
        if apply_nack(slot, msg.status, now=now, policy=CONNECTOR_POLICY) is REFUSED:
            log.error("intermediate refused service %r: %s (check the connector "
                      "certificate's ztna SANs)", msg.service_id, msg.status.name)
        else:
            log.warning("intermediate deferred service %r: %s; retrying in %.0fs",
                        msg.service_id, msg.status.name, NACK_RETRY)

    def _observed(self, conn: ZtnaConnection, msg: ObservedAddress) -> None:
        if msg != self.public_address:
            log.info("relay socket public address (QAD): %s", format_address((msg.ip, msg.port)))
        self.public_address = msg

    def _goaway(self, conn: ZtnaConnection, msg: GoAway) -> None:
        log.info("intermediate going away (%s); reconnecting", msg.reason)
        self.last_error = f"goaway: {msg.reason}"
        conn.close(CLOSE_NO_ERROR, "goaway")

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self.sink.relay_datagram(conn, data)

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        self.sink.relay_stream_data(conn, stream_id, data, end)

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        self.sink.relay_stream_reset(conn, stream_id)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        if conn is self.conn or self.conn is None:
            self.last_error = reason
            if reason.startswith("superseded"):
                # Only a live twin does this: another process with our certificate and name.
                log.error("connection to the intermediate closed: %s — another Connector "
                          "with this certificate uses the name %r; give each its own --name",
                          reason, self.name)
            elif not self._stopping.is_set():   # our own shutdown is not news
                log.warning("connection to the intermediate closed: %s", reason)
        self._closed.set()
