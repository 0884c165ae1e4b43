"""The Agent's direct paths: hole punching and a direct QUIC connection per service.

Theory of operation
-------------------
* **One P2P socket** (`ztna.p2p_socket.P2PSocket` on an ephemeral port, separate from the
  relay socket, the same component the Connector uses) carries the probes (raw datagrams,
  first byte < 0x40), a small QUIC connection to the Intermediate whose QAD tells us this
  socket's public address (srflx), and the direct QUIC connections to Connectors — so the
  NAT mapping the probes validate is the one QUIC uses. It owns QAD, the interface refresh
  and probe routing on one timer; this module keeps what is the Agent's own: a path manager
  per service, the punch requests, and the direct connections. When the session fails over
  to another Intermediate, the socket's QAD follows it once the relay is up there.
* Per service, a `ztna.p2p.path.PathManager` decides when to punch. Once the service is
  registered (ACK) and has a Connector, we gather candidates (`ztna.p2p.candidates`) and
  send `PunchRequest` on the relay's control stream; `PunchStart` starts a controlling
  `ztna.p2p.punch.PunchSession`. Relay traffic is untouched meanwhile: nothing waits.
* Nominated (the first validated pair: no settle wait): QUIC to the selected address from
  the P2P socket, mTLS with server name `connector.<service>.ztna` (the Connector's SAN for
  that service; the Connector checks our certificate allows the service). The first flight
  carries `Hello(instance)` (the Connector derives our agent id from it, the same id the
  Intermediate gives us, so our flows keep going when a service changes path) and the
  registration; the Connector sends no Retry, and with a session ticket from an earlier
  direct connection to it (the session's `ClientTicketCache`, state dir) they go in 0-RTT.
  On handshake the service's 0x2F DATAGRAMs go direct; the Connector answers with bare IP
  packets on that connection.
* Liveness: the path manager asks for PINGs (fast while traffic flows, every 5 s when idle);
  any packet heard after a PING answers it; an unanswered PING (≈3·RTT+200 ms, ≤ 1 s) puts
  the service back on the relay and closes the direct connection; after the cooldown the
  path manager wants a new punch (defects 14–16). Failed punches back off.
* Warm-up: phases (QAD → candidates sent → first probe → validated → direct up → first byte
  received on the direct connection) per attempt, as Prometheus histograms and in status.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from prometheus_client import CollectorRegistry, Histogram

from ztna.agent.config import AgentOptions
from ztna.agent.services import ServiceState
from ztna.errors import DatagramTooLarge, error_text
from ztna.link import Backoff
from ztna.link.driver import LinkEvents
from ztna.observe import format_address
from ztna.p2p.candidates import gather
from ztna.p2p.path import PathConfig, PathManager, PathState
from ztna.p2p.punch import PunchConfig, PunchSession, PunchState
from ztna.p2p.router import Progress
from ztna.p2p_socket import P2PSocket
from ztna.quic.config import make_configuration
from ztna.quic.connection import ConnectionHandler, ZtnaConnection
from ztna.quic.endpoint import QuicEndpoint, bind_udp, normalize_address
from ztna.wire import (
    ControlMessage,
    Hello,
    ObservedAddress,
    Register,
    Role,
    encode_control,
)
from ztna.wire.control_messages import (
    ErrorMessage,
    PunchRequest,
    PunchResult,
    PunchStart,
    ServiceHealth,
)


class RelaySession(Protocol):
    """What the direct paths need from the Agent's session (``ztna.agent.session.Session``):
    its options and services, its relay connection, and its packet demux for what arrives
    on a direct path. A Protocol, so that this module does not import the session."""

    options: AgentOptions
    services: list[ServiceState]
    conn: ZtnaConnection | None
    zero_rtt: bool
    instance: int
    events: LinkEvents

    def on_packet(self, data: bytes) -> None: ...

log = logging.getLogger("ztna.agent")

TICK = 0.02
QAD_RETRY = 2.0  # after a failed or closed QAD connection, try again this much later
MAX_PUNCH_SESSIONS = 64
QAD_WAIT = 1.0   # how long a punch waits for the P2P socket's QAD before going without srflx
# The controlling side nominates the first validated pair at once: a better pair still in
# flight would save little, the wait costs every warm-up (settle 0).
PUNCH_CONFIG = PunchConfig(settle_min=0.0, settle_max=0.0)
_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)


@dataclass
class _ServicePath:
    svc: ServiceState
    pm: PathManager
    punch: PunchSession | None = None
    conn: ZtnaConnection | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    streams: dict[int, Any] = field(default_factory=dict)   # TCP-on-stream handlers on `conn`
    backend_healthy: bool = True   # the direct Connector's own report (ServiceHealth)


class _DirectHandler(ConnectionHandler):
    def __init__(self, owner: DirectPaths, sp: _ServicePath) -> None:
        self.owner = owner
        self.sp = sp
        self.heard_at: float | None = None   # first application data, even before direct_up
        # Once the connection is retired (its Connector's backend went unhealthy while
        # another Connector is healthy): the streams still open on it, which stay.
        self.retired_streams: dict[int, Any] | None = None

    def _streams(self, conn: ZtnaConnection) -> dict[int, Any] | None:
        return self.sp.streams if conn is self.sp.conn else self.retired_streams

    def _heard(self) -> None:
        sp = self.sp
        if sp.pm.direct:
            sp.pm.mark("first_byte", now=self.owner.loop.time())
            self.owner.observe(sp)
        elif self.heard_at is None:
            # The Connector's answer to our early Hello/Register can arrive with the
            # handshake, before `_connect` resumes: counted once the path is direct.
            self.heard_at = self.owner.loop.time()

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None:
        self._heard()
        first = data[0] if data else 0
        if 0x45 <= first <= 0x4F or 0x60 <= first <= 0x6F:
            # Counted by whoever takes the packet (TUN write or userspace demux), exactly
            # as for packets from the relay: counting here too counted it twice.
            self.owner.session.on_packet(data)

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        self._heard()   # QAD / registration ACK from the Connector: bytes over the direct path
        if isinstance(msg, ServiceHealth) and msg.service == self.sp.svc.spec.id and conn is self.sp.conn:
            self.owner.backend_health(self.sp, msg.healthy, msg.detail or "")

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None:
        # TCP on streams (the Agent opened them, see `DirectPaths.stream_conn`); stream 0 is
        # the control stream, anything else unknown is refused.
        table = self._streams(conn)
        handler = table.get(stream_id) if table is not None else None
        if handler is not None:
            handler.on_data(data, end)
        elif stream_id != 0:
            conn.reset_stream(stream_id)

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None:
        table = self._streams(conn)
        handler = table.pop(stream_id, None) if table is not None else None
        if handler is not None:
            handler.on_reset(error_code)

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None:
        if conn is self.sp.conn:
            self.owner.abort_streams(self.sp)
        elif self.retired_streams is not None:
            streams, self.retired_streams = self.retired_streams, {}
            for handler in list(streams.values()):
                handler.on_reset(-1)
            return
        self.owner.direct_lost(self.sp, conn, f"direct connection closed: {reason}")


class DirectPaths:
    def __init__(self, session: RelaySession, *, config: PathConfig | None = None) -> None:
        self.session = session
        self.options = session.options
        self.config = config or PathConfig()
        self.loop = asyncio.get_running_loop()
        self.sock: P2PSocket[_ServicePath] | None = None
        self.endpoint: QuicEndpoint | None = None
        self.started_at = self.loop.time()
        now = self.loop.time()
        self.paths = {s.spec.id: _ServicePath(s, PathManager(config=self.config, now=now))
                      for s in session.services}
        # Direct connections left for an unhealthy backend, kept while their streams live.
        self.retired: list[ZtnaConnection] = []
        self.unhealthy_departures = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self.registry = CollectorRegistry()
        self.hist = Histogram("ztna_agent_time_to_direct_seconds",
                              "Seconds from the start of a punch attempt to each phase",
                              ["phase"], buckets=_BUCKETS, registry=self.registry)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        try:
            sock = bind_udp("::", 0)
        except OSError:
            sock = bind_udp("0.0.0.0", 0)
        options = self.options

        def qad_config(host: str) -> Any:
            return make_configuration(is_client=True, tls=options.tls,
                                      server_name=options.server_name or host,
                                      udp_payload=options.udp_payload)

        # QAD goes where the session is (options.intermediate is the Intermediate it is on or
        # trying) and moves with it when it fails over.
        self.sock = P2PSocket(sock, self, intermediate=lambda: options.intermediate, qad_config=qad_config,
                              backoff=Backoff(initial=QAD_RETRY, cap=QAD_RETRY, jitter=(1.0, 1.0),
                                              rng=random.Random()),
                              max_sessions=MAX_PUNCH_SESSIONS, loop=self.loop)
        self.endpoint = self.sock.endpoint
        self.session.events.moved.append(self._link_moved)
        self.sock.start()
        log.info("P2P socket on udp port %d", self.port)
        self._tasks.append(self.loop.create_task(self._tick_loop(), name="ztna-agent-p2p"))

    def _link_moved(self, old: tuple[str, int], new: tuple[str, int]) -> None:
        if self.sock is not None:
            self.sock.follow()

    @property
    def port(self) -> int:
        assert self.sock is not None
        return self.sock.port

    @property
    def observed(self) -> tuple[str, int] | None:
        return self.sock.observed if self.sock is not None else None

    @property
    def observed_at(self) -> float | None:
        return self.sock.observed_at if self.sock is not None else None

    @property
    def addresses(self) -> list[str]:
        return self.sock.addresses if self.sock is not None else []

    @property
    def unknown_probes(self) -> int:
        """Non-QUIC datagrams that belonged to no punch of ours (not a probe, or a probe of
        a session we do not run)."""
        if self.sock is None:
            return 0
        return self.sock.router.not_a_probe + self.sock.router.unknown_session

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        if self.sock is not None:
            self.sock.close(reason="agent shutting down")
            await asyncio.sleep(0.02)
            self.sock.shutdown_socket()

    # The P2P socket's events (ztna.p2p_socket.P2POwner): the Agent reads the public address
    # and the interface list when it gathers candidates, so it only needs the punch steps.
    def on_public_address(self, addr: ObservedAddress) -> None:
        pass

    def on_addresses(self, addresses: list[str]) -> None:
        pass

    # ------------------------------------------------------------------ hot path hook
    def send(self, svc: ServiceState, datagram: bytes) -> bool:
        """Session.send asks us first: True if the datagram went on the direct path."""
        sp = self.paths.get(svc.spec.id)
        if sp is None or sp.conn is None or sp.pm.state is not PathState.DIRECT:
            return False
        try:
            sp.conn.send_datagram(datagram)
        except DatagramTooLarge:
            return False  # the relay may still carry it
        sp.pm.traffic_sent(now=self.loop.time())
        svc.tx_packets += 1
        svc.tx_bytes += len(datagram) - len(svc.prefix)
        return True

    def carrier(self, svc: ServiceState) -> ZtnaConnection | None:
        """The direct connection `send` would put `svc`'s datagrams on now, or None (the
        TUN pump installs it as the service's native route)."""
        sp = self.paths.get(svc.spec.id)
        if sp is None or sp.conn is None or sp.conn.closed or sp.pm.state is not PathState.DIRECT:
            return None
        return sp.conn

    def sent_natively(self, svc: ServiceState) -> None:
        """The TUN pump sent a batch of `svc`'s packets on the direct path."""
        sp = self.paths.get(svc.spec.id)
        if sp is not None:
            sp.pm.traffic_sent(now=self.loop.time())

    def stream_conn(self, service_id: str) -> tuple[ZtnaConnection, dict[int, Any]] | None:
        """The live direct connection of a service and its stream-handler table, for TCP on
        QUIC streams (the opener registers its handler under the new stream id); None when
        the service is on the relay."""
        sp = self.paths.get(service_id)
        if sp is None or sp.conn is None or sp.conn.closed or sp.pm.state is not PathState.DIRECT:
            return None
        return sp.conn, sp.streams

    # ------------------------------------------------------------------ backend health
    def backend_health(self, sp: _ServicePath, healthy: bool, detail: str) -> None:
        """The direct Connector reported its backend's health for this service."""
        sp.backend_healthy = healthy
        self._leave_if_unhealthy(sp, detail)

    def pool_health(self, svc: ServiceState) -> None:
        """The Intermediate told us about the service's pool (ServiceStatus.healthy)."""
        sp = self.paths.get(svc.spec.id)
        if sp is not None:
            self._leave_if_unhealthy(sp, "")

    def _leave_if_unhealthy(self, sp: _ServicePath, detail: str) -> None:
        """A direct path to a Connector whose backend is unhealthy is left for new flows
        while the Intermediate knows a healthy Connector (its ServiceStatus says so): new
        flows go on the relay, which steers them to a healthy one, and the next punch
        (after the cooldown) is brokered to a healthy one too. Streams already open on the
        direct connection stay on it until they end; then it is closed. When no Connector
        is healthy, the direct path is as good as any: it stays."""
        if sp.backend_healthy or sp.svc.healthy is not True:
            return
        conn = sp.conn
        if conn is None or sp.pm.state is not PathState.DIRECT:
            return
        now = self.loop.time()
        reason = "connector backend unhealthy" + (f" ({detail})" if detail else "")
        log.warning("service %s: leaving the direct path: %s; a healthy connector takes new flows "
                    "via the relay", sp.svc.spec.id, reason)
        sp.conn, streams, sp.streams = None, sp.streams, {}
        sp.svc.path = "relay"
        sp.backend_healthy = True     # a new connection hears its own Connector's report
        sp.pm.direct_failed(now=now, reason=reason)
        self.unhealthy_departures += 1
        self._silence_punch(sp)
        handler = conn.handler if isinstance(conn.handler, _DirectHandler) else None
        if handler is not None:
            # From now on its close is a retired connection's, not the service's path failing.
            handler.retired_streams = streams
        if streams and handler is not None and not conn.closed:
            self.retired.append(conn)
        elif not conn.closed:
            conn.close(0, "connector backend unhealthy")

    def _close_idle_retired(self) -> None:
        for conn in list(self.retired):
            handler = conn.handler
            if conn.closed or not (isinstance(handler, _DirectHandler) and handler.retired_streams):
                self.retired.remove(conn)
                if not conn.closed:
                    conn.close(0, "retired direct connection idle")

    def abort_streams(self, sp: _ServicePath) -> None:
        """The direct connection is gone: resumable streams move to the relay (their
        `on_lost` copies what the Connector has not acknowledged), the others are reset."""
        handlers, sp.streams = sp.streams, {}
        for handler in handlers.values():
            lost = getattr(handler, "on_lost", None)
            if lost is None or not lost():
                handler.on_reset(-1)

    # ------------------------------------------------------------------ supervision
    async def _tick_loop(self) -> None:
        while not self._stopping:
            try:
                self._tick()
            except Exception:  # a bug here must not kill the relay path
                log.exception("direct path supervision failed")
            await asyncio.sleep(TICK)

    def _tick(self) -> None:
        now = self.loop.time()
        if self.retired:
            self._close_idle_retired()
        relay = self.session.conn
        for sp in self.paths.values():
            svc, pm = sp.svc, sp.pm
            relay_up = relay is not None and not relay.closed and svc.ready
            if not relay_up and not (pm.direct and sp.conn is not None and not sp.conn.closed):
                # A punch in progress needs the Intermediate's signaling: start over later.
                if pm.state is not PathState.RELAY:
                    self._to_relay(sp, "relay connection lost", close=True)
                    pm.reset(now=now)
                continue
            # An established direct connection does not depend on the Intermediate: it keeps
            # carrying the service (and its own PING supervision goes on) while the relay
            # reconnects. Only its own failure sends the service back to the relay.
            if relay_up and svc.connector_up is False:
                continue
            if pm.direct and sp.conn is not None:
                pm.heard(sp.conn.last_received, now=now, rtt=sp.conn.rtt())
            deadline = pm.next_deadline()
            if deadline is not None and deadline <= now:
                was = pm.state
                for _action in pm.on_timer(now=now):
                    if sp.conn is not None:
                        sp.conn.ping()
                if was is not pm.state:
                    self._state_changed(sp, was)
            if not relay_up:
                continue
            if pm.want_punch(now=now):
                if self.observed is None and now - self.started_at < QAD_WAIT:
                    continue
                assert relay is not None  # relay_up
                self._start_punch(sp, relay, now)

    def _state_changed(self, sp: _ServicePath, was: PathState) -> None:
        pm = sp.pm
        if was is PathState.DIRECT or pm.state is PathState.COOLDOWN:
            self._to_relay(sp, pm.last_reason, close=True)

    def _to_relay(self, sp: _ServicePath, reason: str, *, close: bool) -> None:
        if sp.svc.path != "relay":
            log.warning("service %s: back on the relay (%s); retrying direct in %.0fs",
                        sp.svc.spec.id, reason, self.config.cooldown)
        sp.svc.path = "relay"
        conn, sp.conn = sp.conn, None
        if close and conn is not None and not conn.closed:
            conn.close(0, "direct path abandoned")
        # After the close: we acknowledge nothing more on it, so what the Connector sees as
        # unacknowledged is exactly what resumable streams have not taken yet.
        self.abort_streams(sp)
        self._silence_punch(sp)

    def _silence_punch(self, sp: _ServicePath) -> None:
        # The punch is over for this service: its session still answers late probes, but
        # sends nothing more of its own.
        if sp.punch is not None and self.sock is not None:
            self.sock.silence(sp.punch.session)

    def _start_punch(self, sp: _ServicePath, relay: ZtnaConnection, now: float) -> None:
        pm = sp.pm
        pm.punch_started(now=now, qad_at=self.observed_at)
        addresses = self.addresses
        relay_addr = normalize_address(relay.peer_address)
        try:
            cands = gather(self.port, addresses, observed=self.observed, relay=relay_addr)
        except Exception:  # noqa: BLE001 - e.g. a scoped relay address
            cands = gather(self.port, addresses, observed=self.observed)
        relay.send_control(encode_control(PunchRequest(service=sp.svc.spec.id, candidates=cands)))
        pm.mark("candidates_sent", now=self.loop.time())
        if sp.punch is not None and self.sock is not None:
            self.sock.discard(sp.punch.session)   # its late probes are unknown from now on
        sp.punch = None
        sp.extra["candidates"] = cands
        log.info("service %s: punch requested with %d candidates", sp.svc.spec.id, len(cands))

    # ------------------------------------------------------------------ signaling
    def on_message(self, msg: object) -> None:
        now = self.loop.time()
        if isinstance(msg, PunchStart):
            sp = self.paths.get(msg.service)
            if sp is None or sp.pm.state is not PathState.PUNCHING or sp.punch is not None:
                return
            session = PunchSession(session=msg.session, key=msg.key_bytes,
                                   controlling=msg.role == "controlling",
                                   local=sp.extra.get("candidates", ()), remote=msg.peer_candidates,
                                   rng=secrets.token_bytes, now=now,
                                   start_at=now + msg.start_in_ms / 1000, config=PUNCH_CONFIG)
            sp.punch = session
            assert self.sock is not None
            self.sock.punch(session, sp)
        elif isinstance(msg, ErrorMessage):
            for sp in self.paths.values():
                if sp.pm.state is PathState.PUNCHING and (
                        msg.session is None or (sp.punch is not None and sp.punch.session == msg.session)
                        or msg.code == "no_connector"):
                    sp.pm.punch_failed(now=now, reason=f"{msg.code}: {msg.message}")

    def on_punch(self, progress: Progress[_ServicePath]) -> None:
        """A step of a punch session (the socket sent its probes already)."""
        sp, punch = progress.route.tag, progress.route.session
        if sp.punch is not punch:
            return
        if punch.first_probe_at is not None:
            sp.pm.mark("first_probe", now=punch.first_probe_at)
        if progress.finished and sp.pm.state is PathState.PUNCHING:
            self._punch_done(sp, punch, self.loop.time())

    def _punch_done(self, sp: _ServicePath, punch: PunchSession, now: float) -> None:
        relay = self.session.conn
        if punch.state is PunchState.NOMINATED and punch.selected is not None:
            sp.pm.punch_succeeded(now=punch.nominated_at or now)
            log.info("service %s: punch succeeded, %s (rtt %.1f ms); connecting direct",
                     sp.svc.spec.id, format_address(punch.selected), (punch.selected_rtt or 0) * 1000)
            self.loop.create_task(self._connect(sp, punch.selected))
        else:
            sp.pm.punch_failed(now=now, reason="no candidate pair answered (symmetric NAT or firewall)")
            log.info("service %s: no direct path (%s); staying on the relay, retry in %.0fs",
                     sp.svc.spec.id, sp.pm.last_reason, (sp.pm.retry_at or now) - now)
            if relay is not None:
                relay.send_control(encode_control(PunchResult(session=punch.session, ok=False)))

    async def _connect(self, sp: _ServicePath, addr: tuple[str, int]) -> None:
        assert self.endpoint is not None
        service = sp.svc.spec.id
        server_name = f"connector.{service}.ztna"
        config = make_configuration(is_client=True, tls=self.options.tls,
                                    server_name=server_name,
                                    udp_payload=self.options.udp_payload)
        config.resumption = self.session.zero_rtt
        handler = _DirectHandler(self, sp)
        conn = self.endpoint.connect(addr, config, handler)
        # First flight (0-RTT with a ticket): our agent id, then the registration.
        conn.send_control(encode_control(Hello(instance=self.session.instance)))
        conn.send_control(encode_control(Register(role=Role.AGENT, service_id=service)))
        sp.extra["handshake"] = "0-RTT" if conn.zero_rtt_attempted else "full"
        try:
            await asyncio.wait_for(conn.wait_handshake(), self.config.connect_timeout)
        except (TimeoutError, ConnectionError) as exc:
            conn.close(0, "direct handshake failed")
            sp.pm.direct_failed(now=self.loop.time(), reason=f"direct handshake failed: {error_text(exc)}")
            log.warning("service %s: direct handshake to %s failed", service, format_address(addr))
            return
        if sp.pm.state is not PathState.CONNECTING:
            conn.close(0, "no longer wanted")
            return
        if conn.zero_rtt_attempted:
            sp.extra["handshake"] = "0-RTT" if conn.early_data_accepted else "resumed" if conn.resumed else "full"
        sp.conn = conn
        sp.pm.direct_up(now=self.loop.time(), rtt=conn.rtt())
        sp.svc.path = "direct"
        if handler.heard_at is not None:
            sp.pm.mark("first_byte", now=max(handler.heard_at, self.loop.time()))
            self.observe(sp)
        log.info("service %s: traffic now direct to %s (%s handshake)", service, format_address(addr),
                 sp.extra["handshake"])
        relay = self.session.conn
        if relay is not None and sp.punch is not None:
            relay.send_control(encode_control(PunchResult(session=sp.punch.session, ok=True,
                                                          ip=addr[0], port=addr[1])))

    def direct_lost(self, sp: _ServicePath, conn: ZtnaConnection, reason: str) -> None:
        if sp.conn is not conn and sp.pm.state is not PathState.CONNECTING:
            return
        was = sp.pm.state
        sp.pm.direct_failed(now=self.loop.time(), reason=reason)
        if was is not sp.pm.state:
            self._to_relay(sp, reason, close=False)

    def observe(self, sp: _ServicePath) -> None:
        for phase, seconds in sp.pm.observations:
            self.hist.labels(phase=phase).observe(seconds)
        sp.pm.observations.clear()

    # ------------------------------------------------------------------ status
    def peer_of(self, service_id: str) -> str | None:
        """The Connector a service's direct connection goes to (the TLS name we verified
        and its address), None while the service is on the relay."""
        sp = self.paths.get(service_id)
        if sp is None or sp.conn is None or sp.conn.closed or sp.pm.state is not PathState.DIRECT:
            return None
        host, port = normalize_address(sp.conn.peer_address)[:2]
        return f"connector.{service_id}.ztna at " + (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")

    def _path_snapshot(self, sp: _ServicePath) -> dict[str, Any]:
        snap = sp.pm.snapshot()
        # The path manager keeps monotonic time, meaningless outside this process: status
        # shows when that is on the wall clock (ISO 8601 UTC) and how far away it is.
        retry = cast("float | None", snap.pop("retry_at"))
        now = self.loop.time()
        snap["retry_in_s"] = round(max(0.0, retry - now), 1) if retry is not None else None
        snap["retry_at"] = (datetime.datetime.now(datetime.UTC)
                            + datetime.timedelta(seconds=max(0.0, retry - now))).isoformat(timespec="seconds") \
            if retry is not None else None
        return snap

    def snapshot(self) -> dict[str, Any]:
        services = {sid: {**self._path_snapshot(sp), "punch": sp.punch.summary() if sp.punch else None,
                          "handshake": sp.extra.get("handshake")}
                    for sid, sp in self.paths.items()}
        warm = [s["warmup_ms"] for s in services.values() if s["warmup_ms"] is not None]
        return {
            "socket_port": self.port if self.sock is not None else None,
            "observed": f"{self.observed[0]}:{self.observed[1]}" if self.observed else None,
            "qad": self.sock.qad_snapshot() if self.sock is not None else None,
            "unknown_probes": self.unknown_probes,
            "unhealthy_departures": self.unhealthy_departures,
            "warmup_ms": warm[0] if warm else None,
            "services": services,
        }
