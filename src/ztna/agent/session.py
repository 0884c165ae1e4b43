"""The Agent's session with the Intermediate: connect, register, keep alive, reconnect.

Theory of operation
-------------------
* One UDP socket (`QuicEndpoint`) lives for the whole Agent; each (re)connection is a new
  QUIC connection on it. A supervisor task (``ztna.link.driver.LinkLoop``, shared with the
  Connector) loops: resolve → connect → handshake → register every service on the control
  stream → watch → on loss, back off (moving on to the next of several Intermediates) and
  start over. Backoff doubles from `backoff_initial` up to `backoff_cap` with full jitter
  (±50 %), and resets once a connection got at least one ACK.
* Registration (``ztna.link.registration``, the Connector's machine with the Agent's
  pacing) is tracked per service by ACK: a service is `pending` until the
  Intermediate answers; unanswered requests are re-sent with doubling delay; a NACK is final
  (`refused`) except SHUTTING_DOWN and LIMIT_EXCEEDED, which are retried later. Only ACKed
  services get traffic: the Intermediate drops 0x2F for unregistered services anyway.
* Packets that arrive while a service is not ready (connecting, reconnecting, pending) wait
  in one small bounded queue (drop-oldest) and are flushed on ACK, so a short outage costs
  latency, not packets; TCP retransmits whatever overflowed.
* Liveness: a QUIC PING when idle for `keepalive` seconds; if nothing at all (not even an
  ACK) arrived for `dead_after` seconds the path is declared dead and we reconnect — much
  sooner than the 30 s QUIC idle timeout. GoAway or CONNECTION_CLOSE reconnect at once.
* Down-link hot path: `on_datagram` checks the first byte for a bare IP packet and hands it
  to `on_packet` (TUN write or userspace demux); QAD and registration DATAGRAMs are decoded,
  anything else counted. One log line per state change, never per packet.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ztna.agent.config import AgentOptions
from ztna.agent.direct import DirectPaths
from ztna.agent.services import (
    ACKED,
    PENDING,
    REFUSED,
    ServiceState,
    apply_ack,
    apply_nack,
    connection_lost,
    reset_registration,
)
from ztna.cert_hints import certificate_problem_hint, is_own_verification_failure
from ztna.errors import DatagramTooLarge, DecodeError, error_text
from ztna.link import AGENT_JITTER, Backoff, LinkState
from ztna.link.driver import (
    LinkEvents,
    LinkLoop,
    measure_handshakes,
    open_link,
    resolve,
    send_due_registers,
    silence,
)
from ztna.link.registration import AGENT_NACK_RETRY, RegistrationPolicy
from ztna.link.targets import Targets
from ztna.observe import format_address
from ztna.p2p.path import PathConfig
from ztna.quic.config import make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp
from ztna.quic.maintenance import UpkeepSchedule, run_upkeep
from ztna.wire import (
    PUNCH_MESSAGES,
    AddressToken,
    ControlMessage,
    DatagramKind,
    ErrorMessage,
    GoAway,
    ObservedAddress,
    RegistrationAck,
    RegistrationNack,
    Role,
    ServiceStatus,
    classify_datagram,
    decode_qad,
    decode_registration,
    encode_control,
    service_datagram_prefix,
    to_connector_overhead,
)

log = logging.getLogger("ztna.agent")

HANDSHAKE_TIMEOUT = 10.0


# Tunnel packets sent in 0-RTT ahead of the registration ACK (the Intermediate holds up to
# 32 per connection until the registration in the same flight is processed).
EARLY_PACKETS = 24


@dataclass
class SessionCounters:
    reconnects: int = 0
    failovers: int = 0              # moves to the next of several Intermediates
    connect_failures: int = 0
    rx_unknown: int = 0
    rx_malformed: int = 0
    queue_dropped: int = 0
    queue_flushed: int = 0
    oversize: int = 0
    dead_paths: int = 0
    goaways: int = 0
    zero_rtt_attempts: int = 0      # connections started with a session ticket
    zero_rtt_accepted: int = 0      # ... whose early data the Intermediate accepted
    resumed: int = 0
    certificate_refusals: int = 0   # connections refused over a certificate (ours or theirs)


@dataclass
class SessionInfo:
    state: LinkState = LinkState.STARTING
    address: str = ""
    connected_since: float | None = None    # wall clock, for humans
    last_change: float = field(default_factory=time.time)
    last_error: str | None = None           # the last failure (kept after recovery), None if none yet
    last_error_at: float | None = None      # wall clock of last_error
    observed: str | None = None
    handshake: str = ""                     # "full", "resumed" or "0-RTT" (last connection)
    connect_ms: float | None = None         # last connect: start -> first registration ACK
    # Several Intermediates, --pick rtt: each one's handshake time at start (ms; None: no answer).
    handshake_ms: dict[str, float | None] = field(default_factory=dict)


class Session(ConnectionHandler):
    """The Intermediate connection and everything that keeps it useful."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        on_packet: Callable[[bytes], None],
        rng: random.Random | None = None,
    ) -> None:
        self.options = options
        self.on_packet = on_packet
        self.rng = rng or random.Random()
        self.services = [
            ServiceState(spec=s, index=i, prefix=service_datagram_prefix(s.id),
                         retry_delay=options.register_retry)
            for i, s in enumerate(options.services)
        ]
        self.by_id = {s.spec.id: s for s in self.services}
        # Unanswered Registers are re-sent after register_retry s, doubling to the backoff cap.
        self.registration_policy = RegistrationPolicy(
            first_retry=options.register_retry, cap=options.backoff_cap, nack_retry=AGENT_NACK_RETRY)
        self.targets = Targets(options.targets(), current=options.intermediate)
        self.events = LinkEvents()
        self._first_attempt = True
        self.counters = SessionCounters()
        self.info = SessionInfo()
        self._handshaken = False   # this connection's TLS handshake completed
        self._accepted = False     # ... and the Intermediate has sent us something since
        self.conn: ZtnaConnection | None = None
        self._name_error: str | None = None   # the last certificate-name mismatch logged
        self.endpoint: QuicEndpoint | None = None
        self.queue: deque[tuple[ServiceState, bytes]] = deque()
        self.stream_handlers: dict[int, Any] = {}     # stream id -> userspace splice
        self.on_ready: list[Callable[[], None]] = []   # called when a connection is (re)usable
        self.on_lost: list[Callable[[], None]] = []    # called when the connection is gone
        self.on_mtu: list[Callable[[int], None]] = []  # live max DATAGRAM payload changed
        self._control_handlers = self._control_table()
        self._closed_event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._max_payload = 0
        self.direct: DirectPaths | None = None         # the P2P paths, when enabled
        # 0-RTT: session tickets and address tokens live in the process's native TLS
        # configuration (in memory); `instance` keeps our agent id stable across reconnects.
        self.instance = int.from_bytes(secrets.token_bytes(8), "big")
        state_dir = getattr(options, "state_dir", None)
        self.zero_rtt = bool(getattr(options, "zero_rtt", True))
        self._token_file = state_dir / "tickets" / "address-token" if state_dir and self.zero_rtt else None
        self.address_token = self._load_token()
        self._connect_started = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        try:
            sock = bind_udp("::", 0)
        except OSError:
            sock = bind_udp("0.0.0.0", 0)
        self.endpoint = QuicEndpoint(sock, thread=True)
        self._task = asyncio.create_task(self._supervise(), name="ztna-agent-session")
        if getattr(self.options, "p2p", True):
            cooldown = float(getattr(self.options, "p2p_cooldown", 30.0))
            self.direct = DirectPaths(self, config=PathConfig(cooldown=cooldown,
                                                              max_cooldown=max(600.0, cooldown)))
            self.direct.start()

    async def stop(self) -> None:
        self._stopping = True
        self._set_state(LinkState.STOPPING)
        if self.direct is not None:
            await self.direct.stop()
        if self.conn is not None and not self.conn.closed:
            self.conn.send_control(encode_control(GoAway(reason="agent shutting down")))
            self.conn.close(0, "agent shutting down")
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self.endpoint is not None:
            self.endpoint.close(reason="agent shutting down")
            await asyncio.sleep(0.05)
            self.endpoint.shutdown_socket()
        self._set_state(LinkState.STOPPED)

    def _error(self, text: str) -> None:
        self.info.last_error = text
        self.info.last_error_at = time.time()

    def _set_state(self, state: LinkState, detail: str = "", *, error: bool = True) -> None:
        """`detail` goes into the log line; it is the new `last_error` unless `error` is
        False (a success has details too, such as which handshake it was)."""
        if state == self.info.state:
            return
        self.info.state = state
        self.info.last_change = time.time()
        if detail and error and detail != self.info.last_error:
            self._error(detail)
        log.info("intermediate %s: %s%s", self.info.address or self._target(), state,
                 f" ({detail})" if detail else "")

    def _target(self) -> str:
        host, port = self.options.intermediate
        return format_address((host, port))

    async def _supervise(self) -> None:
        backoff = Backoff(initial=self.options.backoff_initial, cap=self.options.backoff_cap,
                          rng=self.rng, jitter=AGENT_JITTER)
        self._first_attempt = True
        if self.options.pick == "rtt" and self.targets.can_fail_over:
            await self._pick_nearest()
        await LinkLoop(self.targets, backoff, log=log, reset_on_failover=True).run(
            self._attempt, stopping=lambda: self._stopping, sleep=asyncio.sleep,
            on_failure=self._failed, on_retry=self._retry)

    async def _pick_nearest(self) -> None:
        """Attach first to the nearest of several Intermediates (ztna.link.targets)."""
        assert self.endpoint is not None

        def config_for(target: tuple[str, int]) -> Any:
            return make_configuration(is_client=True, tls=self.options.tls,
                                      server_name=self.options.server_name or target[0],
                                      udp_payload=self.options.udp_payload)

        rtts = await measure_handshakes(self.endpoint, self.targets.addresses, config_for,
                                        timeout=HANDSHAKE_TIMEOUT / 2)
        self.info.handshake_ms = {format_address(t): None if s is None else round(s * 1000, 1)
                                  for t, s in rtts.items()}
        self.targets.choose(rtts)
        self.options.intermediate = self.targets.current
        log.info("handshake times: %s; attaching to %s",
                 ", ".join(f"{t} {'-' if ms is None else f'{ms} ms'}" for t, ms in self.info.handshake_ms.items()),
                 format_address(self.targets.current))

    async def _attempt(self, target: tuple[str, int]) -> bool:
        if not self._first_attempt:
            self.counters.reconnects += 1
            if target != self.options.intermediate:
                self.counters.failovers += 1
        self._first_attempt = False
        # The TLS name and the status follow the Intermediate tried now.
        self.options.intermediate = target
        return await self._one_connection()

    def _failed(self, exc: Exception) -> None:
        self.counters.connect_failures += 1
        self._error(str(exc) or type(exc).__name__)
        self._set_state(LinkState.BACKOFF, self.info.last_error or "")

    def _retry(self, delay: float) -> None:
        self._set_state(LinkState.BACKOFF, self.info.last_error or "", error=False)
        log.info("reconnecting in %.2fs", delay)

    def _explain_name_mismatch(self, conn: ZtnaConnection) -> None:
        """A certificate without the name we verify never starts working by retrying:
        say once, as an ERROR, what we expected and what the certificate holds."""
        # Imported here: cryptography is ~10 MB of RSS the Agent needs only when this fails.
        from ztna.identity import server_name_mismatch

        why = server_name_mismatch(conn.peer_certificate, self.options.tls_name())
        if why is None or why == self._name_error:
            return
        self._name_error = why
        log.error("Intermediate %s: certificate name mismatch: %s (give --server-name, or "
                  "issue its certificate with `ztna certs init --host`)",
                  format_address(self.options.intermediate), why)

    async def _one_connection(self) -> bool:
        """Run one connection until it dies; True if it was ever registered (reset backoff)."""
        assert self.endpoint is not None
        self._set_state(LinkState.CONNECTING)
        assert self.endpoint is not None
        address = await resolve(self.endpoint, *self.options.intermediate)
        self.info.address = format_address(address)
        config = make_configuration(is_client=True, tls=self.options.tls,
                                    server_name=self.options.tls_name(),
                                    udp_payload=self.options.udp_payload)
        self._closed_event = asyncio.Event()
        for svc in self.services:
            # Every new connection registers everything again, refused ones included: the
            # Intermediate's policy may have changed while we were away.
            reset_registration(svc, first_retry=self.options.register_retry)
        config.resumption = self.zero_rtt
        config.token = self.address_token
        self._connect_started = asyncio.get_running_loop().time()
        self.info.connect_ms = None
        self._handshaken = self._accepted = False
        # Hello and the registrations go out at once: in 0-RTT when we hold a ticket (they
        # are idempotent, and a replayed early flight is refused by the single-use ticket).
        conn = open_link(self.endpoint, address, config, self, instance=self.instance)
        self.conn = conn
        now = asyncio.get_running_loop().time()
        self._register_due(conn, now)
        if conn.zero_rtt_attempted:
            self.counters.zero_rtt_attempts += 1
            # Resuming: the first queued tunnel packets ride in 0-RTT right behind the
            # registrations (the Intermediate holds a few until they are processed).
            self._flush_queue(optimistic=EARLY_PACKETS)
        try:
            await asyncio.wait_for(conn.wait_handshake(), HANDSHAKE_TIMEOUT)
        except (TimeoutError, ConnectionError) as exc:
            self._explain_name_mismatch(conn)
            conn.close(0, "handshake failed")
            self.conn = None
            # (a refused certificate was already reported by on_closed -> _lost)
            raise ConnectionError(f"handshake failed: {error_text(exc)}") from None
        self.info.connected_since = time.time()
        if conn.early_data_accepted:
            self.counters.zero_rtt_accepted += 1
        if conn.resumed:
            self.counters.resumed += 1
        self.info.handshake = "0-RTT" if conn.early_data_accepted else ("resumed" if conn.resumed else "full")
        # Our handshake completes before the Intermediate has checked our certificate (TLS
        # 1.3: the client's certificate travels in its last flight), so "connected" waits
        # for the first thing the Intermediate sends once it has accepted us.
        self._handshaken = True
        if self._accepted:
            self._announce_connected()
        self._check_mtu()
        loop = asyncio.get_running_loop()
        useful = False
        # While the Intermediate is silent, ping on every pass (each 0.25 s) until it
        # answers or `dead_after` declares the path dead: one lost PING must not do that.
        upkeep = UpkeepSchedule(keepalive=self.options.keepalive, ping_gap=0.0,
                                cid_rotation=self.options.cid_rotation, now=loop.time())
        try:
            while not conn.closed:
                now = loop.time()
                self._register_due(conn, now)
                if any(s.ready for s in self.services):
                    useful = True
                silent = silence(conn, now=now, limit=self.options.dead_after)
                if silent is not None:
                    self.counters.dead_paths += 1
                    conn.close(0, "peer silent")
                    self._lost(conn, silent)
                    break
                run_upkeep(conn, upkeep, now=now)    # keepalive PING, CID rotation
                self._check_mtu()
                try:
                    await asyncio.wait_for(self._closed_event.wait(), 0.25)
                except TimeoutError:
                    pass
        finally:
            if self.conn is conn:
                self._lost(conn, conn.close_reason or "closed")
        return useful

    def _heard_from(self, conn: ZtnaConnection) -> None:
        if conn is self.conn and not self._accepted:
            self._accepted = True
            if self._handshaken:
                self._announce_connected()

    def _announce_connected(self) -> None:
        self._set_state(LinkState.CONNECTED, f"{self.info.handshake} handshake", error=False)
        self.events.connected(self.targets.current)

    def _certificate_refused(self, reason: str) -> bool:
        """Log a refusal of our certificate (or of the Intermediate's) at ERROR with a hint:
        retrying cannot help until the operator fixes the files, so it must stand out."""
        hint = certificate_problem_hint(reason)
        if hint is None:
            return False
        self.counters.certificate_refusals += 1
        what = ("cannot verify the Intermediate's certificate" if is_own_verification_failure(reason)
                else "the Intermediate refused our certificate")
        log.error("intermediate %s: %s: %s; %s", self.info.address or self._target(), what,
                  reason, hint)
        return True

    def _lost(self, conn: ZtnaConnection, reason: str) -> None:
        if self.conn is not conn:
            return
        if not self._accepted:
            self._certificate_refused(reason)
        self.conn = None
        self.info.connected_since = None
        if not self._stopping:
            self._error(reason)
        connection_lost(self.services)
        self._closed_event.set()
        self._set_state(LinkState.DISCONNECTED, reason, error=False)
        for cb in self.on_lost:
            cb()
        handlers, self.stream_handlers = self.stream_handlers, {}
        for handler in handlers.values():
            handler.on_reset(-1)   # streams die with their connection: abort local sockets

    # ------------------------------------------------------------------ 0-RTT state
    def _load_token(self) -> bytes:
        try:
            return self._token_file.read_bytes() if self._token_file else b""
        except OSError:
            return b""

    def _store_token(self, token: bytes) -> None:
        self.address_token = token
        if self._token_file is None:
            return
        try:
            self._token_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._token_file, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(token)
        except OSError as exc:
            log.debug("cannot store the address token: %s", exc)

    # ------------------------------------------------------------------ registration
    def _register_due(self, conn: ZtnaConnection, now: float) -> None:
        for svc, resend in send_due_registers(conn, self.services, now=now,
                                              policy=self.registration_policy, role=Role.AGENT):
            if resend:
                log.info("service %s: registration unanswered, re-sending (attempt %d)",
                         svc.spec.id, svc.attempts)

    def _registration_reply(self, msg: RegistrationAck | RegistrationNack) -> None:
        svc = self.by_id.get(msg.service_id)
        if isinstance(msg, RegistrationAck):
            if svc is None or not apply_ack(svc, first_retry=self.options.register_retry):
                return
            if self.info.connect_ms is None and self._connect_started:
                self.info.connect_ms = round((asyncio.get_running_loop().time() - self._connect_started) * 1000, 1)
            log.info("service %s: registered (ACK)", svc.spec.id)
            self._flush_queue()
            for cb in self.on_ready:
                cb()
            return
        if svc is None:
            log.warning("registration refused for an unknown request: %s", msg.status.name)
            return
        if apply_nack(svc, msg.status, now=asyncio.get_running_loop().time()) == PENDING:
            log.warning("service %s: registration deferred (%s), retrying in %.1fs",
                        svc.spec.id, msg.status.name, svc.retry_delay)
        else:
            log.error("service %s: registration refused (%s)", svc.spec.id, msg.status.name)
            self.queue = deque(item for item in self.queue if item[0] is not svc)

    # ------------------------------------------------------------------ sending (hot path)
    def send(self, svc: ServiceState, datagram: bytes) -> None:
        """Send one 0x2F DATAGRAM for `svc`, or queue it while the service is not ready."""
        direct = self.direct
        if direct is not None and svc.path == "direct" and direct.send(svc, datagram):
            return
        conn = self.conn
        if conn is not None and svc.registration == ACKED:
            try:
                conn.send_datagram(datagram)
            except DatagramTooLarge:
                self.counters.oversize += 1
                return
            svc.tx_packets += 1
            svc.tx_bytes += len(datagram) - len(svc.prefix)
            return
        if svc.registration == REFUSED:
            svc.queued_dropped += 1
            return
        queue = self.queue
        if len(queue) >= self.options.queue_limit:
            old, _ = queue.popleft()
            old.queued_dropped += 1
            self.counters.queue_dropped += 1
        queue.append((svc, datagram))

    def _flush_queue(self, optimistic: int = 0) -> None:
        """Send queued packets of registered services; with `optimistic` > 0 also up to
        that many packets of services whose registration is still pending (0-RTT)."""
        conn = self.conn
        if conn is None or not self.queue:
            return
        keep: deque[tuple[ServiceState, bytes]] = deque()
        for svc, dgram in self.queue:
            if svc.registration != ACKED:
                if optimistic <= 0 or svc.registration != PENDING:
                    keep.append((svc, dgram))
                    continue
                optimistic -= 1
            try:
                conn.send_datagram(dgram)
            except DatagramTooLarge:
                self.counters.oversize += 1
                continue
            svc.tx_packets += 1
            svc.tx_bytes += len(dgram) - len(svc.prefix)
            self.counters.queue_flushed += 1
        self.queue = keep

    # ------------------------------------------------------------------ sizes
    def max_payload(self) -> int:
        return self._max_payload

    def _check_mtu(self) -> None:
        conn = self.conn
        if conn is None:
            return
        size = conn.max_datagram_payload()
        if size != self._max_payload:
            self._max_payload = size
            for cb in self.on_mtu:
                cb(size)

    # ------------------------------------------------------------------ events
    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self._heard_from(conn)
        first = data[0] if data else 0
        if 0x45 <= first <= 0x4F or 0x60 <= first <= 0x6F:
            self.on_packet(data)
            return
        kind = classify_datagram(first)
        try:
            if kind is DatagramKind.QAD:
                self._observed(decode_qad(data))
            elif kind is DatagramKind.REGISTRATION:
                reply = decode_registration(data)
                if isinstance(reply, (RegistrationAck, RegistrationNack)):  # a Register is not ours
                    self._registration_reply(reply)
            else:
                self.counters.rx_unknown += 1
        except DecodeError:
            self.counters.rx_malformed += 1

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        self._heard_from(conn)
        handler = self._control_handlers.get(type(msg))
        if handler is not None:
            handler(conn, msg)
        # Everything else (pings, unknown types) is ignored by design (forward compatible).

    def _control_table(self) -> dict[type, Callable[[ZtnaConnection, Any], None]]:
        """The Agent's one dispatch table for control messages from the Intermediate."""
        table: dict[type, Callable[[ZtnaConnection, Any], None]] = {
            RegistrationAck: lambda conn, msg: self._registration_reply(msg),
            RegistrationNack: lambda conn, msg: self._registration_reply(msg),
            ObservedAddress: lambda conn, msg: self._observed(msg),
            ServiceStatus: self._service_status,
            AddressToken: lambda conn, msg: self._store_token(msg.token_bytes),
            GoAway: self._goaway,
            ErrorMessage: self._intermediate_error,
        }
        for kind in PUNCH_MESSAGES:
            table[kind] = self._to_direct
        return table

    def _service_status(self, conn: ZtnaConnection, msg: ServiceStatus) -> None:
        svc = self.by_id.get(msg.service)
        if svc is not None:
            label = msg.connector if msg.up else None
            healthy = msg.healthy if msg.up else None
            if msg.up and healthy is False and svc.healthy is not False:
                log.warning("service %s: no healthy connector; new flows go to the "
                            "least-recently-failed one (%s)", msg.service, label or "?")
            elif svc.connector_up != msg.up or svc.connector != label or svc.healthy != healthy:
                log.info("service %s: connector %s", msg.service,
                         (f"up ({label})" if label else "up") if msg.up else "down (no connector)")
            svc.connector_up, svc.connector, svc.healthy = msg.up, label, healthy
            if self.direct is not None:
                self.direct.pool_health(svc)

    def _goaway(self, conn: ZtnaConnection, msg: GoAway) -> None:
        self.counters.goaways += 1
        log.info("intermediate says goaway (%s); reconnecting", msg.reason)
        conn.close(0, "goaway")

    def _to_direct(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        if self.direct is not None:
            self.direct.on_message(msg)

    def _intermediate_error(self, conn: ZtnaConnection, msg: ErrorMessage) -> None:
        # Errors about a punch (or that no Connector is there to punch to) belong to the
        # direct paths; the rest are logged.
        if self.direct is not None and (msg.session is not None or msg.code == "no_connector"):
            self.direct.on_message(msg)
        else:
            log.warning("intermediate error %s: %s", msg.code, msg.message)

    def _observed(self, addr: ObservedAddress) -> None:
        text = format_address((str(addr.ip), addr.port))
        if text != self.info.observed:
            self.info.observed = text
            log.info("intermediate sees us as %s", text)

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        handler = self.stream_handlers.get(stream_id)
        if handler is None:
            if stream_id != 0:
                conn.reset_stream(stream_id)
            return
        handler.on_data(data, end)

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        handler = self.stream_handlers.pop(stream_id, None)
        if handler is not None:
            handler.on_reset(error_code)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        self._lost(conn, reason)

    # ------------------------------------------------------------------ status
    def snapshot(self) -> dict[str, Any]:
        conn = self.conn
        rtt = conn.rtt() if conn is not None else None
        return {
            "intermediate": {
                "target": self._target(),
                "address": self.info.address,
                "state": self.info.state,
                "connected_since": self.info.connected_since,
                "last_change": self.info.last_change,
                "last_error": self.info.last_error,
                "last_error_at": _iso(self.info.last_error_at),
                "rtt_ms": round(rtt * 1000, 3) if rtt is not None else None,
                "observed_address": self.info.observed,
                "max_datagram_payload": self._max_payload if conn is not None else None,
                "reconnects": self.counters.reconnects,
                "failovers": self.counters.failovers,
                "handshake": self.info.handshake,
                "connect_ms": self.info.connect_ms,
                "handshake_ms": self.info.handshake_ms,
                "zero_rtt": {
                    "attempts": self.counters.zero_rtt_attempts,
                    "accepted": self.counters.zero_rtt_accepted,
                },
            },
            "services": [
                {
                    "id": s.spec.id,
                    "virtual_ips": [str(ip) for ip in s.spec.virtual_ips],
                    "domains": [str(p) for p in s.spec.patterns],
                    "registration": s.registration,
                    "nack": s.nack,
                    "connector_up": s.connector_up,
                    "connector": s.connector,
                    "healthy": s.healthy,
                    "direct_peer": self.direct.peer_of(s.spec.id) if self.direct is not None else None,
                    "path": s.path,
                    "tx_packets": s.tx_packets,
                    "tx_bytes": s.tx_bytes,
                    "rx_packets": s.rx_packets,
                    "rx_bytes": s.rx_bytes,
                    "stream_tx_bytes": s.stream_tx_bytes,
                    "stream_rx_bytes": s.stream_rx_bytes,
                    "streams": s.streams,
                    "dropped_while_waiting": s.queued_dropped,
                    "max_packet": max(0, self._max_payload - to_connector_overhead(s.spec.id)) if conn else None,
                }
                for s in self.services
            ],
            "counters": dict(self.counters.__dict__),
            "queued": len(self.queue),
            **self._p2p_snapshot(),
        }

    def _p2p_snapshot(self) -> dict[str, Any]:
        if self.direct is None:
            return {"p2p": None, "warmup_ms": None}
        p2p = self.direct.snapshot()
        return {"p2p": p2p, "warmup_ms": p2p["warmup_ms"]}


def _iso(wall: float | None) -> str | None:
    """Wall-clock seconds as ISO 8601 UTC (what `ztna status --json` prints for times)."""
    if wall is None:
        return None
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="milliseconds")
