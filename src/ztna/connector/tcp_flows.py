"""TCP carried as IP packets in DATAGRAMs: one `ztna.netstack.tcp.TcpEndpoint` per flow,
driven here, relayed to a real backend TCP connection.

Theory of operation
-------------------
* A SYN to a virtual IP and a port the service exposes creates a flow: a `TcpEndpoint`
  (pure state machine; we pass `now`) plus an asyncio connection to the backend. The
  SYN-ACK leaves only once the backend accepted (`accept()`), a refused/unreachable backend
  becomes a RST (`refuse()`). Segments of unknown flows and SYNs to ports the service does
  not expose get RST; SYN floods are limited per (agent, source IP) by a token bucket, and
  concurrent sessions by a total cap.
* Flows are keyed by (agent id, inner 5-tuple), so a connection survives the Agent moving
  the service between the relay and the direct path: segments answer on the path the
  latest segment came from (`ztna.connector.paths`), and a dead path moves its flows to
  the Agent's other live path (retransmissions cover what was lost on the way).
* MSS clamping: the MSS we announce is derived from the path's live DATAGRAM payload
  (`ReplyPath.tcp_mss`), so no segment we send ever needs fragmenting.
* `pump(flow)` is the one place that moves bytes, called after every event:
  - toward the backend we read from the endpoint only as much as the backend transport can
    take below its high-water mark, so the window the endpoint advertises follows the free
    space toward the backend (flow control, seed Phase 2);
  - toward the Agent we `poll()` with the connection's `datagram_budget()`: when the
    DATAGRAM queue/congestion window is full nothing is dropped, the endpoint's send buffer
    fills up and we pause reading the backend (back-pressure). Budget-starved flows are
    re-pumped by a short timer.
* One `call_at` timer per flow follows `next_deadline()`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Any

from ztna.connector.backend import WRITE_HIGH, tune_backend_transport
from ztna.netstack.packets import ACK, RST, SYN, IpHeader, parse_tcp
from ztna.netstack.tcp import TcpEndpoint, TcpState, rst_for_unexpected
from ztna.observe import format_address

if TYPE_CHECKING:
    from ztna.audit import FlowAudit
    from ztna.connector.flow_audit import ConnectorAudit
    from ztna.connector.paths import ReplyPath
    from ztna.connector.state import ConnectorStats, ServiceState

log = logging.getLogger("ztna.connector")

STARVED_RETRY = 0.001        # seconds: re-poll flows that ran out of DATAGRAM budget
BACKEND_BATCH = 64 * 1024    # bytes for the backend written at once, without waiting
UNLIMITED = 1 << 30


class TcpFlow(asyncio.Protocol):
    """One TCP session: the endpoint facing the Agent and the backend connection."""

    def __init__(self, table: TcpFlows, key: tuple[Any, ...], path: ReplyPath,
                 service: ServiceState, ep: TcpEndpoint) -> None:
        self.table = table
        self.key = key
        self.path = path
        self.service = service
        self.ep = ep
        self.transport: asyncio.Transport | None = None
        self.pending = b""            # backend bytes the endpoint could not take yet
        self.backend_eof = False
        self.backend_shut = False     # we sent EOF (write_eof) to the backend
        self.write_paused = False
        self.read_paused = False
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.done = False
        self.connect_task: asyncio.Task[Any] | None = None
        self.audit: FlowAudit | None = None
        self.close_reason: str | None = None

    # ------------------------------------------------------------------ backend protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        tune_backend_transport(transport)
        if self.done:
            transport.abort()
            return
        now = self.table.loop.time()
        if self.audit is not None:
            self.audit.setup["backend_connect_ms"] = (now - self.audit.started) * 1000
        self.ep.accept(now=now)
        self.table.pump(self)

    def data_received(self, data: bytes) -> None:
        if self.pending:
            self.pending += data
        else:
            n = self.ep.send(data)
            if n < len(data):
                self.pending = data[n:]
        self.table.stats.tcp_bytes_to_agent += len(data)
        if self.audit is not None:
            self.audit.from_service += len(data)
        self.table.pump(self)

    def eof_received(self) -> bool:
        self.backend_eof = True
        self.table.pump(self)
        return True           # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done:
            return
        if exc is not None:
            self.close_reason = f"backend reset: {exc}"
            self.ep.abort(now=self.table.loop.time())
        else:
            self.backend_eof = True
        self.table.pump(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.table.pump(self)


class TcpFlows:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: ConnectorStats, *,
                 max_sessions: int, syn_rate: float, connect_timeout: float, buffer: int,
                 flow_control: bool = True, rng: random.Random | None = None) -> None:
        self.loop = loop
        self.stats = stats
        self.max_sessions = max_sessions
        self.syn_rate = syn_rate
        self.connect_timeout = connect_timeout
        self.buffer = buffer
        self.flow_control = flow_control
        self.rng = rng or random.SystemRandom()
        self.flows: dict[tuple[Any, ...], TcpFlow] = {}
        self._syn_buckets: dict[tuple[Any, bytes], tuple[float, float]] = {}
        self._starved: set[TcpFlow] = set()
        self._kick: asyncio.TimerHandle | None = None
        self._backend_due: set[TcpFlow] = set()
        self._backend_scheduled = False
        self.audit: ConnectorAudit | None = None

    def __len__(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------------ Agent → us
    def on_packet(self, path: ReplyPath, service: ServiceState, ip: IpHeader,
                  packet: memoryview, now: float) -> None:
        seg = parse_tcp(packet, ip)
        key = (path.key, ip.src, seg.sport, ip.dst, seg.dport)
        flow = self.flows.get(key)
        if flow is not None and flow.path is not path:
            dead = not flow.path.alive
            self._move(flow, path)        # the Agent switched paths: answer on the new one
            if dead:
                # Back from an outage before the flow was resumed (the Agent's packet came
                # first): the dead path's backed-off timeouts say nothing about this one.
                flow.ep.path_changed(now=now)
        flags = seg.flags
        is_syn = flags & (SYN | ACK | RST) == SYN
        if flow is not None and is_syn and flow.ep.state in (TcpState.TIME_WAIT, TcpState.CLOSED):
            self._finish(flow, "closed")  # port reuse after a close: start over
            flow = None
        if flow is None:
            if not is_syn:
                self.stats.tcp_rst_unknown += 1
                self._rst(path, seg, ip)
                return
            flow = self._open(key, path, service, ip, seg, now)
            if flow is None:
                return
        self.stats.tcp_segments_in += 1
        flow.ep.on_segment(seg, now=now)
        self.pump(flow)

    def _open(self, key: tuple[Any, ...], path: ReplyPath, service: ServiceState,
              ip: IpHeader, seg: Any, now: float) -> TcpFlow | None:
        backend = service.tcp_backends.get(seg.dport)
        if backend is None:
            self.stats.tcp_no_such_port += 1
            self._rst(path, seg, ip)
            return None
        if len(self.flows) >= self.max_sessions:
            self.stats.tcp_session_limit += 1
            self._rst(path, seg, ip)
            return None
        if not self._admit_syn((path.key, ip.src), now):
            self.stats.tcp_syn_rate_limited += 1
            return None                   # silently: a flood must not cost us replies
        ep = TcpEndpoint(local_ip=ip.dst, local_port=seg.dport, remote_ip=ip.src,
                         remote_port=seg.sport, isn=self.rng.getrandbits(32),
                         mss=max(64, path.tcp_mss(ip.version)), now=now,
                         recv_buffer=self.buffer, send_buffer=self.buffer)
        flow = TcpFlow(self, key, path, service, ep)
        self.flows[key] = flow
        path.flows += 1
        self.stats.tcp_sessions_opened += 1
        flow.connect_task = self.loop.create_task(self._connect(flow, backend.host, backend.port))
        if self.audit is not None:
            flow.audit = self.audit.open(path, service.id, "tcp", seg.dport, now)
        return flow

    async def _connect(self, flow: TcpFlow, host: str, port: int) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: flow, host, port),
                                   self.connect_timeout)
        except (TimeoutError, OSError) as exc:
            self.stats.tcp_backend_failures += 1
            log.debug("backend %s refused/unreachable: %s", format_address((host, port)), exc)
            if not flow.done:
                flow.close_reason = f"backend connect failed: {exc or type(exc).__name__}"
                flow.ep.refuse(now=self.loop.time())
                self.pump(flow)

    def _admit_syn(self, key: tuple[Any, bytes], now: float) -> bool:
        rate = self.syn_rate
        tokens, last = self._syn_buckets.get(key, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._syn_buckets[key] = (tokens, now)
            return False
        self._syn_buckets[key] = (tokens - 1.0, now)
        if len(self._syn_buckets) > 65536:
            for k in list(self._syn_buckets)[:16384]:
                del self._syn_buckets[k]
        return True

    def _rst(self, path: ReplyPath, seg: Any, ip: IpHeader) -> None:
        pkt = rst_for_unexpected(seg, ip)
        if pkt is not None:
            path.send(pkt)

    # ------------------------------------------------------------------ the pump
    def pump(self, flow: TcpFlow, *, flush_backend: bool = False) -> None:
        if flow.done:
            return
        ep = flow.ep
        now = self.loop.time()
        transport = flow.transport
        # Toward the backend: only what its transport can take (window follows free space).
        # One write per loop iteration, not one per segment: a send() to a loopback socket
        # per 1.2 kB segment was a third of the Connector's CPU on uploads.
        if (transport is not None and not flush_backend and ep.readable < BACKEND_BATCH
                and not ep.peer_closed):
            if ep.readable:
                self._defer_backend(flow)
        elif transport is not None and not transport.is_closing():
            if self.flow_control:
                # +1: filling the buffer to exactly WRITE_HIGH would never call
                # pause_writing(), hence never resume_writing() — the endpoint's window
                # would stay shut until the Agent's zero-window probe (hundreds of ms).
                room = WRITE_HIGH + 1 - transport.get_write_buffer_size()
                data = ep.read(room) if room > 0 else b""
            else:
                data = ep.read()
            if data:
                transport.write(data)
                self.stats.tcp_bytes_to_backend += len(data)
                if flow.audit is not None:
                    flow.audit.to_service += len(data)
            if ep.peer_closed and not flow.backend_shut:
                flow.backend_shut = True
                if transport.can_write_eof():
                    transport.write_eof()          # Agent's FIN → backend half-close
        # From the backend: what the endpoint's send buffer could not take yet.
        if flow.pending and ep.send_space() > 0:
            n = ep.send(flow.pending)
            flow.pending = flow.pending[n:]
        if flow.backend_eof and not flow.pending and ep.established:
            ep.close(now=now)                      # backend EOF → FIN (after all data)
        # Toward the Agent, within the DATAGRAM budget.
        path = flow.path
        budget = path.budget() if self.flow_control else UNLIMITED
        if budget > 0:
            pkts = ep.poll(now=now, budget=budget)
            for pkt in pkts:
                path.send(pkt)
            self.stats.tcp_segments_out += len(pkts)
            starved = len(pkts) >= budget
        else:
            starved = True
        if starved:
            self._starve(flow)
        # Back-pressure on the backend: stop reading while the endpoint cannot take more.
        if transport is not None:
            want_pause = bool(flow.pending)
            if want_pause != flow.read_paused and not transport.is_closing():
                flow.read_paused = want_pause
                if want_pause:
                    transport.pause_reading()
                else:
                    transport.resume_reading()
        if ep.closed:
            self._finish(flow)
            return
        deadline = ep.next_deadline()
        if deadline != flow.timer_at:
            if flow.timer is not None:
                flow.timer.cancel()
            flow.timer_at = deadline
            flow.timer = self.loop.call_at(deadline, self._on_timer, flow) if deadline else None

    def _defer_backend(self, flow: TcpFlow) -> None:
        self._backend_due.add(flow)
        if not self._backend_scheduled:
            self._backend_scheduled = True
            self.loop.call_soon(self._flush_backends)

    def _flush_backends(self) -> None:
        self._backend_scheduled = False
        due, self._backend_due = self._backend_due, set()
        for flow in due:
            self.pump(flow, flush_backend=True)

    def _on_timer(self, flow: TcpFlow) -> None:
        flow.timer = None
        flow.timer_at = None
        if not flow.done:
            flow.ep.on_timer(now=self.loop.time())
            self.pump(flow)

    def _starve(self, flow: TcpFlow) -> None:
        self._starved.add(flow)
        if self._kick is None:
            self._kick = self.loop.call_later(STARVED_RETRY, self.kick)

    def kick(self) -> None:
        """Re-pump flows that ran out of DATAGRAM budget (the congestion window may have
        opened). Also called when a DATAGRAM arrives on a connection."""
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        starved, self._starved = self._starved, set()
        for flow in starved:
            self.pump(flow)

    @property
    def has_starved(self) -> bool:
        return bool(self._starved)

    # ------------------------------------------------------------------ lifecycle
    def _finish(self, flow: TcpFlow, reason: str | None = None) -> None:
        if flow.done:
            return
        flow.done = True
        if self.audit is not None:
            why = reason or flow.close_reason or ("reset" if flow.ep.reset else "closed")
            self.audit.end(flow.audit, why, self.loop.time())
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            flow.path.flows -= 1
        self._starved.discard(flow)
        self._backend_due.discard(flow)
        if flow.timer is not None:
            flow.timer.cancel()
            flow.timer = None
        if flow.transport is not None:
            if flow.ep.reset:
                flow.transport.abort()
                self.stats.tcp_resets += 1
            else:
                flow.transport.close()
        elif flow.connect_task is not None and not flow.connect_task.done():
            flow.connect_task.cancel()
        self.stats.tcp_sessions_closed += 1

    @staticmethod
    def _move(flow: TcpFlow, path: ReplyPath) -> None:
        flow.path.flows -= 1
        path.flows += 1
        flow.path = path

    def drop_path(self, path: ReplyPath, alternate: ReplyPath | None = None) -> int:
        """`path` died: its flows continue on `alternate` (the Agent's other live path), or
        are aborted when there is none. Returns how many moved."""
        moved = 0
        for flow in [f for f in self.flows.values() if f.path is path]:
            if alternate is not None:
                self._move(flow, alternate)
                flow.ep.path_changed(now=self.loop.time())
                moved += 1
                self.pump(flow)
            else:
                flow.ep.abort(now=self.loop.time())
                self._finish(flow, "agent gone")
        return moved

    def close_all(self) -> None:
        now = self.loop.time()
        for flow in list(self.flows.values()):
            flow.ep.abort(now=now)
            for pkt in flow.ep.poll(now=now, budget=1):
                flow.path.send(pkt)        # tell the Agent (RST) on a graceful shutdown
            self._finish(flow, "shutdown")
