"""Splicing TCP-carrying QUIC streams: Agent stream ↔ Connector stream.

An Agent opens a client bidirectional stream that starts with `StreamOpen` (docs/protocol.md
§5). Once the header is complete we check the Agent is registered for the service, pick the
Connector with `registry.pick(service, key)` (a healthy one while any is), open a server-initiated stream on the
Connector's connection, send `RelayedStreamOpen(agent_id, ...)` and from then on copy bytes
both ways. Refusals here answer the Agent with the Connector's status byte + FIN
(NOT_AUTHORIZED, UNREACHABLE when no Connector, LIMIT).

Back-pressure: bytes read from one leg are credited back to its sender (`consume_stream`)
only while the other leg's unacknowledged send backlog is below `BACKLOG_LIMIT`. We re-check
on every stream event and, while any leg holds uncredited bytes, every `RECHECK` seconds
(the transport reports no "drained" event). FIN ↔ FIN, reset ↔ reset; a peer that goes away resets the
other leg of each of its splices. At most `MAX_SPLICES_PER_PEER` per Agent.

In a cluster (`ztna.cluster.mesh`) a stream for a service without a Connector here goes to the
member its flow is placed on: the other leg is a stream on the mesh link to that member, headed
`RelayedStreamOpen` with this member's Agent id; that member splices it like an Agent's stream,
to one of its Connectors, with its own id for the remote Agent. Named and resumed streams cross
the same way (`RelayedNamedStreamOpen`, `RelayedStreamResume` on the link); a resume is placed
by its token.

Once the Connector's status reply has come through (its arrival is the backend connect
time the audit records), the two streams are joined in the native core
(`QuicEndpoint.splice_streams`) when both connections are on the same endpoint: bytes, FIN
and resets cross there with the same bounds (`PAIR_BACKLOG` in native/src/splice.rs is
`BACKLOG_LIMIT`), and Python hears once when it is over; the admin view and the audit
read its counts as it runs (`splice_counts`). Legs on two endpoints (an IPv4 and an IPv6
socket), or ZTNA_PYTHON_SPLICE=1, keep the Python copy described above.

`StreamResume` (docs/protocol.md §5.1: a stream that was on a direct connection continues
here) is spliced the same way, as `RelayedStreamResume(agent_id, ...)`; the Connector checks
the token against the agent id we vouch for. `NamedStreamOpen` (a DNS name instead of an
IP, §5.2) becomes `RelayedNamedStreamOpen`; the name is the Connector's to check and resolve.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from ztna import _native
from ztna.addresses import format_address
from ztna.errors import DecodeError
from ztna.intermediate.admin.snapshot import FlowView
from ztna.limits import NATIVE_SPLICE
from ztna.wire.stream_header import (
    ANY_STREAM_HEADER_MAX,
    NamedStreamOpen,
    RelayedNamedStreamOpen,
    RelayedStreamOpen,
    RelayedStreamResume,
    StreamOpen,
    StreamResume,
    StreamStatus,
    decode_stream_header,
    decode_stream_reply,
    encode_stream_open,
    encode_stream_status,
)

if TYPE_CHECKING:
    from ztna.audit import FlowAudit
    from ztna.quic.connection import ZtnaConnection

log = logging.getLogger("ztna.intermediate")

BACKLOG_LIMIT = 512 * 1024
RECHECK = 0.005
MAX_SPLICES_PER_PEER = 1024
HEADER_LIMIT = ANY_STREAM_HEADER_MAX
RECENT_FLOWS = 200


class _Leg:
    __slots__ = ("conn", "sid", "peer", "other", "owed", "fin_in", "splice")

    def __init__(self, conn: ZtnaConnection, sid: int, peer: int, splice: _Splice) -> None:
        self.conn = conn
        self.sid = sid
        self.peer = peer
        self.other: _Leg | None = None
        self.owed = 0          # bytes read from this leg and forwarded, not yet credited
        self.fin_in = False
        self.splice = splice


class _Splice:
    __slots__ = ("agent", "connector", "head", "done", "native", "audit", "reply_pending", "service",
                 "destination", "started", "up", "down", "counted")

    def __init__(self) -> None:
        self.agent: _Leg | None = None
        self.connector: _Leg | None = None
        self.head = b""
        self.done = False
        self.native = False     # joined in the native core
        self.audit: FlowAudit | None = None
        # Bytes of the Connector's status reply still to come: not payload in the audit.
        self.reply_pending = True
        # What the admin API shows of the flow (`flows()`), filled in when it is opened.
        self.service = ""
        self.destination = ""
        self.started = 0.0
        self.up = 0      # bytes Agent -> Connector
        self.down = 0
        self.counted = (0, 0)   # the native pair's (sent, received) of the Agent leg, taken in

    def view(self, ended: float | None) -> FlowView:
        # Legs on cluster mesh links are keyed by their link, not by a peer id.
        agent, connector = (self.agent.peer if self.agent is not None else 0,
                            self.connector.peer if self.connector is not None else None)
        return FlowView(agent_id=agent if isinstance(agent, int) else 0,
                        connector_id=connector if isinstance(connector, int) else None,
                        service=self.service, destination=self.destination, bytes_up=self.up,
                        bytes_down=self.down, started_at=self.started, ended_at=ended)


class StreamSplicer:
    def __init__(self, intermediate: Any) -> None:
        self.srv = intermediate
        self.legs: dict[tuple[int, int], _Leg] = {}
        self.per_peer: dict[int, int] = {}
        self.spliced = 0
        self.refused = 0
        # The most recent spliced flows that ended (newest last), for the admin API.
        self.recent: deque[FlowView] = deque(maxlen=RECENT_FLOWS)
        self._owing: set[_Leg] = set()
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ events
    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool) -> None:
        peer = conn.user
        leg = self.legs.get((peer, sid))
        if leg is None:
            if sid & 1:                     # server-initiated stream we do not know: stale
                return
            splice = _Splice()
            leg = _Leg(conn, sid, peer, splice)
            splice.agent = leg
            if self.per_peer.get(peer, 0) >= MAX_SPLICES_PER_PEER:
                self._refuse(leg, StreamStatus.LIMIT)
                return
            self.legs[(peer, sid)] = leg
            self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
        splice = leg.splice
        if splice.done:
            return
        if leg.other is None:               # Agent leg still waiting for its header
            splice.head += data
            try:
                parsed = decode_stream_header(splice.head)
            except DecodeError:
                self._abort(splice)
                return
            if parsed is None:
                if end or len(splice.head) > HEADER_LIMIT:
                    self._abort(splice)
                return
            header, used = parsed
            rest, splice.head = splice.head[used:], b""
            conn.consume_stream(sid, used)
            if not self._open(leg, header, rest):
                return
            data = b""
        if data:
            other = leg.other
            assert other is not None
            other.conn.send_stream(other.sid, data)
            leg.owed += len(data)
            if leg is splice.agent:
                splice.up += len(data)
            else:
                splice.down += len(data)
            if splice.audit is not None:
                self._count(splice, leg, data)
        if end and not leg.fin_in:
            leg.fin_in = True
            assert leg.other is not None
            leg.other.conn.send_stream(leg.other.sid, b"", end=True)
        self._credit(leg)
        if leg.other is not None:
            self._credit(leg.other)
        self._maybe_done(splice)
        if leg is splice.connector and not splice.native:
            self._go_native(splice)

    def _open(self, leg: _Leg, header: Any, rest: bytes) -> bool:
        srv = self.srv
        mesh = getattr(srv, "mesh", None)
        agent_id = leg.peer
        if mesh is not None and not isinstance(agent_id, int):
            # A stream from another member of the cluster, for one of its Agents: our own id
            # for that remote Agent (None: not a mesh peer, or not a mesh stream header).
            agent_id, header = mesh.stream_from_member(leg.conn, header)
        if (agent_id is None or not isinstance(header, (StreamOpen, StreamResume, NamedStreamOpen))
                or not srv.registry.is_agent_of(agent_id, header.service_id)):
            self._refuse(leg, StreamStatus.NOT_AUTHORIZED)
            return False
        if isinstance(header, StreamResume):
            # One Connector per service holds it; with several, a guess, made over the whole
            # pool: a resumption continues an existing flow, which health does not move.
            key = header.token
            target_id = srv.registry.pick(header.service_id, key, healthy_only=False)
        else:
            key = agent_id.to_bytes(4, "big") + leg.sid.to_bytes(8, "big")
            target_id = srv.registry.pick(header.service_id, key)
        target = srv.conns.get(target_id) if target_id is not None else None
        if target is None and mesh is not None:
            target = mesh.stream_link(agent_id, header.service_id, key)   # a Connector elsewhere
            target_id = target.user if target is not None else None
        if target is None:
            self._refuse(leg, StreamStatus.UNREACHABLE)
            return False
        tsid = target.open_stream()
        other = _Leg(target, tsid, target_id, leg.splice)
        leg.other, other.other = other, leg
        splice = leg.splice
        splice.connector = other
        splice.service = header.service_id
        if isinstance(header, StreamOpen):
            splice.destination = format_address((header.dst_ip, header.dst_port))
        elif isinstance(header, NamedStreamOpen):
            splice.destination = f"{header.name}:{header.dst_port}"
        else:
            splice.destination = "(resumed)"
        splice.started = time.time()
        splice.up = len(rest)
        self.legs[(target_id, tsid)] = other
        self.per_peer[target_id] = self.per_peer.get(target_id, 0) + 1
        relayed: RelayedStreamOpen | RelayedStreamResume | RelayedNamedStreamOpen
        if isinstance(header, StreamResume):
            relayed = RelayedStreamResume(agent_id=agent_id, service_id=header.service_id,
                                          token=header.token, received=header.received)
        elif isinstance(header, NamedStreamOpen):
            relayed = RelayedNamedStreamOpen(agent_id=agent_id, service_id=header.service_id,
                                             name=header.name, dst_port=header.dst_port)
        else:
            relayed = RelayedStreamOpen(agent_id=agent_id, service_id=header.service_id,
                                        dst_ip=header.dst_ip, dst_port=header.dst_port)
        target.send_stream(tsid, encode_stream_open(relayed) + rest)
        leg.owed += len(rest)
        self.spliced += 1
        if srv.signaling is not None and isinstance(header, (StreamOpen, NamedStreamOpen)):
            srv.signaling.relayed(agent_id, header.service_id)
        audit = srv.audit
        if audit is not None:
            from ztna.audit import FlowAudit, sans_of

            flow = leg.splice.audit = FlowAudit(
                audit.new_id("i"), service=header.service_id, protocol="tcp", path="relay",
                now=asyncio.get_running_loop().time(), agent_id=agent_id, identity=sans_of(leg.conn),
                dst_port=header.dst_port if isinstance(header, (StreamOpen, NamedStreamOpen)) else None,
                connector=target.label, setup=dict(srv.setup_times.get(leg.conn, {})),
                name=header.name if isinstance(header, NamedStreamOpen) else None)
            flow.to_service += len(rest)
        return True

    def _go_native(self, splice: _Splice) -> None:
        """Join the two legs in the native core, once the Connector's status reply came
        through here (its arrival is the backend connect time the audit records)."""
        a, c = splice.agent, splice.connector
        if (not NATIVE_SPLICE or a is None or c is None or splice.done or c.fin_in
                or a.conn.endpoint is not c.conn.endpoint or not hasattr(c.conn.endpoint, "splice_streams")):
            return
        splice.native = c.conn.endpoint.splice_streams(
            a.conn, a.sid, c.conn, c.sid,
            lambda how, code, sent, received: self._native_end(splice, how, sent, received))
        if splice.native:
            for leg in (a, c):              # what went through here so far is credited now
                if leg.owed:
                    leg.conn.consume_stream(leg.sid, leg.owed)
                    leg.owed = 0
                self._owing.discard(leg)

    def _native_end(self, splice: _Splice, how: int, sent: int, received: int) -> None:
        """A native splice is over (the core passed on the FINs or resets itself); `sent` /
        `received` are the Agent leg's: what went down to the Agent, what came up from it."""
        if splice.done:
            return
        self._take_counts(splice, sent, received)
        reason = {_native.SPLICE_DONE: "closed", _native.SPLICE_RESET: "reset"}.get(how, "connection closed")
        self._remove(splice, reason)

    def _sync(self, splice: _Splice) -> None:
        """Bring a live native pair's byte counts into the view and the audit."""
        leg = splice.agent
        if not splice.native or splice.done or leg is None:
            return
        counts = leg.conn.splice_counts(leg.sid)
        if counts is not None:
            self._take_counts(splice, *counts)

    def _take_counts(self, splice: _Splice, sent: int, received: int) -> None:
        d_sent, d_received = sent - splice.counted[0], received - splice.counted[1]
        if d_sent <= 0 and d_received <= 0:
            return
        splice.up += d_received
        splice.down += d_sent
        flow = splice.audit
        if flow is not None:               # the status reply came through Python, not here
            flow.to_service += d_received
            flow.from_service += d_sent
        splice.counted = (sent, received)

    def _count(self, splice: _Splice, leg: _Leg, data: bytes) -> None:
        flow = splice.audit
        assert flow is not None
        if leg is splice.agent:
            flow.to_service += len(data)
            return
        if splice.reply_pending:
            # The Connector answers with its status (after connecting to the backend):
            # that is the backend connect time as seen here, and not payload.
            splice.reply_pending = False
            flow.setup["backend_connect_ms"] = (asyncio.get_running_loop().time() - flow.started) * 1000
            try:
                parsed = decode_stream_reply(data)
            except DecodeError:
                parsed = None
            if parsed is not None:
                data = data[parsed[2]:]
        flow.from_service += len(data)

    def live_audits(self) -> list[FlowAudit]:
        """The audit state of every live splice (interim lines)."""
        for lg in list(self.legs.values()):
            if lg is lg.splice.agent:
                self._sync(lg.splice)
        return [lg.splice.audit for lg in self.legs.values()
                if lg is lg.splice.agent and lg.splice.audit is not None and not lg.splice.done]

    def close_all(self, reason: str) -> None:
        for leg in list(self.legs.values()):
            if not leg.splice.done:
                self._remove(leg.splice, reason)

    def on_stream_reset(self, conn: ZtnaConnection, sid: int, code: int) -> None:
        leg = self.legs.get((conn.user, sid))
        if leg is None:
            return
        if leg.other is not None:
            leg.other.conn.reset_stream(leg.other.sid, code)
        self._remove(leg.splice, "reset by the agent" if leg is leg.splice.agent else "reset by the connector")

    def peer_gone(self, peer_id: int) -> None:
        for leg in [lg for lg in self.legs.values() if lg.peer == peer_id]:
            if leg.other is not None and not leg.splice.done:
                leg.other.conn.reset_stream(leg.other.sid)
            self._remove(leg.splice, "agent gone" if leg is leg.splice.agent else "connector gone")
        self.per_peer.pop(peer_id, None)

    # ------------------------------------------------------------------ back-pressure
    def _credit(self, leg: _Leg) -> None:
        """Credit `leg`'s sender for what it sent once the other leg has drained enough."""
        other = leg.other
        if not leg.owed or other is None:
            self._owing.discard(leg)
            return
        if other.conn.stream_send_backlog(other.sid) < BACKLOG_LIMIT:
            leg.conn.consume_stream(leg.sid, leg.owed)
            leg.owed = 0
            self._owing.discard(leg)
        else:
            self._owing.add(leg)
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(RECHECK, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        for leg in list(self._owing):
            if leg.splice.done:
                self._owing.discard(leg)
            else:
                self._credit(leg)
                self._maybe_done(leg.splice)

    # ------------------------------------------------------------------ endings
    def _maybe_done(self, splice: _Splice) -> None:
        a, c = splice.agent, splice.connector
        if a is not None and c is not None and a.fin_in and c.fin_in and not a.owed and not c.owed:
            self._remove(splice, "closed")

    def _refuse(self, leg: _Leg, status: StreamStatus) -> None:
        self.refused += 1
        leg.conn.send_stream(leg.sid, encode_stream_status(status), end=True)
        self._remove(leg.splice)

    def _abort(self, splice: _Splice) -> None:
        if splice.agent is not None:
            splice.agent.conn.reset_stream(splice.agent.sid)
        self._remove(splice)

    def flows(self) -> list[FlowView]:
        """Open spliced flows, then the recently ended ones (newest first)."""
        live = {id(leg.splice): leg.splice for leg in self.legs.values()
                if leg.splice.connector is not None and not leg.splice.done}
        for splice in live.values():
            self._sync(splice)
        return [s.view(None) for s in live.values()] + list(reversed(self.recent))

    def _remove(self, splice: _Splice, reason: str = "refused") -> None:
        if not splice.done and splice.connector is not None:
            self.recent.append(splice.view(time.time()))
        if splice.audit is not None and not splice.done and self.srv.audit is not None:
            self.srv.audit.end(splice.audit, reason, asyncio.get_running_loop().time())
        splice.done = True
        for leg in (splice.agent, splice.connector):
            if leg is None:
                continue
            self._owing.discard(leg)
            if self.legs.pop((leg.peer, leg.sid), None) is not None:
                n = self.per_peer.get(leg.peer, 0) - 1
                if n > 0:
                    self.per_peer[leg.peer] = n
                else:
                    self.per_peer.pop(leg.peer, None)
