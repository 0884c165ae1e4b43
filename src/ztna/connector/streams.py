"""TCP carried on QUIC streams (docs/protocol.md §5), Connector side.

A stream opens with a header: `RelayedStreamOpen` on a stream the Intermediate opened on
our relay connection, or `StreamOpen` on a stream an Agent opened on a direct P2P
connection. We check the destination (a virtual IP of the service, a TCP port it exposes,
and on a direct connection that the Agent's certificate allows the service), connect to
the backend and answer one status byte (`StreamStatus`); OK is followed by the relayed
bytes both ways, anything else by FIN.

Back-pressure both ways, no unbounded buffers:
* stream → backend: we grant the peer more stream credit (`consume_stream`) only for bytes
  the backend transport accepted below its high-water mark; the QUIC window does the rest.
* backend → stream: we pause reading the backend while the stream's unacknowledged send
  backlog (what QUIC flow control has not let out yet) is above `SEND_HIGH` and re-check
  every `RECHECK` seconds (the transport reports no "drained" event).
FIN ↔ half-close (write_eof / EOF), reset ↔ RST (abort / connection lost with an error).

Once the backend is connected and the status is written, the stream and the backend socket
are spliced natively (`ZtnaConnection.splice`): the bytes, FINs and resets above cross in
the native core with the same bounds, and Python hears once, at the end, with the byte
counts. Parking a resumable flow takes the stream back (`unsplice`); a resumed flow is
spliced again on its new stream. The Python pumps remain for ZTNA_PYTHON_SPLICE=1.

Resumable streams (docs/protocol.md §5.1): an Agent that opens with 0x55 on a direct
connection (Hello heard, so we know its agent id) gets `OK_RESUMABLE` + a random token,
bound to the agent id and certificate fingerprint. We count the payload bytes we took
(`rx`) and sent (`tx`). When that connection dies (`drop_conn`), or a `StreamResume` for
the token arrives while it still looks alive, the flow is *parked*: we copy the stream's
unacknowledged send buffer (`stream_unacked`: an ACK on a direct connection means the Agent
process has the bytes), pause the backend and wait up to `STREAM_RESUME_GRACE`. A resume
with the same agent id (and fingerprint on a direct connection) whose `received` lies in the
retained range gets `RESUMED` + our `rx`; we resend from the Agent's count and carry on on
the new stream (not resumable again). A flow whose backend finished lingers with its token
until its stream data is acknowledged, so a transfer whose tail is still in flight survives.

Named streams (docs/protocol.md §5.2): `NamedStreamOpen` / `RelayedNamedStreamOpen` carry a
DNS name instead of a virtual IP. The name must be covered by the service's patterns (else
NOT_AUTHORIZED: the Agent cannot widen what it may reach), the port must be one the service
offers; then `ztna.connector.resolve` resolves the name here and we connect to its
addresses in turn on the entry's port. No address: NAME_UNRESOLVED. One log line per named
stream records agent, service, name and the address used (or why it failed).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ztna import _native
from ztna.connector import resume
from ztna.connector.backend import WRITE_HIGH, tune_backend_transport
from ztna.errors import DecodeError
from ztna.limits import NATIVE_SPLICE, STREAM_RESUME_GRACE, STREAM_RESUME_PER_AGENT
from ztna.names.patterns import DomainPattern
from ztna.observe import format_address
from ztna.wire.stream_header import (
    ANY_STREAM_HEADER_MAX,
    RESUME_TOKEN_LEN,
    NamedStreamOpen,
    RelayedNamedStreamOpen,
    RelayedStreamOpen,
    RelayedStreamResume,
    StreamOpen,
    StreamResume,
    StreamStatus,
    decode_stream_header,
    encode_stream_reply,
    encode_stream_status,
)

if TYPE_CHECKING:
    from ztna.audit import FlowAudit
    from ztna.connector.flow_audit import ConnectorAudit
    from ztna.connector.resolve import NameResolver
    from ztna.connector.state import ConnectorStats, ServiceState
    from ztna.quic.connection import ZtnaConnection

log = logging.getLogger("ztna.connector")

SEND_HIGH = 512 * 1024
SEND_LOW = 256 * 1024
RECHECK = 0.005
HEADER_LIMIT = ANY_STREAM_HEADER_MAX
LINGER_SWEEP = 1.0


class StreamFlow(asyncio.Protocol):
    def __init__(self, table: StreamTable, conn: ZtnaConnection, sid: int) -> None:
        self.table = table
        self.conn: ZtnaConnection | None = conn    # None while parked
        self.sid = sid
        # resumption state (docs/protocol.md §5.1)
        self.token: bytes | None = None
        self.owner: tuple[int, str] | None = None   # (agent id, certificate fingerprint)
        self.rx = 0                       # payload bytes taken from the stream(s)
        self.tx = 0                       # payload bytes written to the stream(s)
        self.base = 1                     # stream offset of the first payload byte we sent
        self.retained: tuple[int, bytes] = (0, b"")   # (payload offset, unacked bytes) when parked
        self.pending: list[bytes] = []    # backend bytes that arrived while parked
        self.grace: asyncio.TimerHandle | None = None
        self.head = b""
        self.header: StreamOpen | RelayedStreamOpen | NamedStreamOpen | RelayedNamedStreamOpen | None = None
        self.transport: asyncio.Transport | None = None
        self.inbox: list[bytes] = []      # stream bytes not yet written to the backend
        self.unconsumed = 0               # bytes written to the backend, credit not yet given
        self.peer_fin = False
        self.backend_shut = False
        self.backend_eof = False
        self.write_paused = False
        self.read_paused = False
        self.done = False
        self.task: asyncio.Task[Any] | None = None
        self.audit: FlowAudit | None = None
        self.spliced: ZtnaConnection | None = None   # the connection of our native splice
        self.counted = (0, 0)             # that splice's counts already taken into rx/tx

    def count(self, sent: int, received: int) -> None:
        """Take a native splice's cumulative byte counts into rx/tx and the statistics."""
        d_sent, d_received = sent - self.counted[0], received - self.counted[1]
        self.counted = (sent, received)
        self.tx += d_sent
        self.rx += d_received
        self.table.stats.stream_bytes_to_agent += d_sent
        self.table.stats.stream_bytes_to_backend += d_received
        if self.audit is not None:
            self.audit.from_service += d_sent
            self.audit.to_service += d_received

    def sync(self) -> None:
        """Bring a live native splice's counts into rx/tx (the audit's interim lines)."""
        conn = self.spliced
        if conn is not None:
            counts = conn.splice_counts(self.sid)
            if counts is not None:
                self.count(*counts)

    def unsplice(self) -> None:
        conn, self.spliced = self.spliced, None
        if conn is not None:
            counts = conn.unsplice(self.sid)
            if counts is not None:
                self.count(*counts)

    # backend protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        tune_backend_transport(transport)
        if self.audit is not None and self.audit.setup.get("backend_connect_ms") is None:
            self.audit.setup["backend_connect_ms"] = (self.table.loop.time() - self.audit.started) * 1000
        if self.done or self.conn is None:
            transport.abort()
            return
        if self.token is not None:
            reply = encode_stream_reply(StreamStatus.OK_RESUMABLE, self.token)
        else:
            reply = encode_stream_status(StreamStatus.OK)
        self.base = len(reply)
        self.conn.send_stream(self.sid, reply)
        self.table.splice(self)

    def send(self, data: bytes, end: bool = False) -> None:
        """Payload towards the Agent; held while parked (sent again on resume)."""
        if self.conn is None:
            if data:
                self.pending.append(data)
            return
        self.conn.send_stream(self.sid, data, end=end)
        self.tx += len(data)

    def data_received(self, data: bytes) -> None:
        self.send(data)
        self.table.stats.stream_bytes_to_agent += len(data)
        if self.conn is None:
            return
        if self.conn.stream_send_backlog(self.sid) > SEND_HIGH and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            self.table.watch(self)

    def eof_received(self) -> bool:
        self.backend_eof = True
        self.send(b"", end=True)
        self.table.maybe_done(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done:
            return
        if exc is not None or not self.backend_eof:
            if exc is not None:
                if self.conn is not None:
                    self.conn.reset_stream(self.sid)
                self.table.finish(self, forget=True, reason=f"backend reset: {exc}")
                return
            self.backend_eof = True
            self.send(b"", end=True)
        self.table.finish(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.table.flush(self)


class StreamTable:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: ConnectorStats,
                 services: dict[str, ServiceState], *, max_streams: int,
                 connect_timeout: float, resolver: NameResolver | None = None) -> None:
        self.loop = loop
        self.resolver = resolver
        self.patterns: dict[str, tuple[DomainPattern, ...]] = {
            sid: svc.cfg.patterns for sid, svc in services.items()}
        self.stats = stats
        self.services = services
        self.max_streams = max_streams
        self.connect_timeout = connect_timeout
        self.flows: dict[tuple[ZtnaConnection, int], StreamFlow] = {}
        self._watched: set[StreamFlow] = set()
        self._timer: asyncio.TimerHandle | None = None
        # Highest stream id seen per (connection, stream kind): late bytes of a stream we
        # already finished are ignored instead of being parsed as a new header.
        self._highest: dict[tuple[ZtnaConnection, int], int] = {}
        # token -> flow, for resumable flows (live, lingering after the backend finished,
        # or parked); per agent id count for the limit.
        self.resumable: dict[bytes, StreamFlow] = {}
        self._per_agent: dict[int, int] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.token_source: Callable[[int], bytes] = secrets.token_bytes
        self.audit: ConnectorAudit | None = None

    def __len__(self) -> int:
        return len(self.flows)

    def on_stream_data(self, conn: ZtnaConnection, sid: int, data: bytes, end: bool, *,
                       authorize: Callable[[str], bool] | None) -> None:
        """`authorize(service)` for direct connections (the Agent's certificate); None on
        the relay connection (the Intermediate already checked the Agent)."""
        flow = self.flows.get((conn, sid))
        if flow is None:
            kind = (conn, sid & 3)
            if sid <= self._highest.get(kind, -1):
                conn.consume_stream(sid, len(data))
                return
            self._highest[kind] = sid
            if len(self.flows) >= self.max_streams:
                self._refuse(conn, sid, StreamStatus.LIMIT)
                return
            flow = StreamFlow(self, conn, sid)
            self.flows[(conn, sid)] = flow
        if flow.header is None:
            flow.head += data
            try:
                parsed = decode_stream_header(flow.head)
            except DecodeError:
                self.stats.stream_bad_header += 1
                self._drop(flow)
                conn.reset_stream(sid)
                return
            if parsed is None:
                if len(flow.head) > HEADER_LIMIT or end:
                    self._drop(flow)
                    conn.reset_stream(sid)
                return
            header, used = parsed
            conn.consume_stream(sid, used)
            data, flow.head = flow.head[used:], b""
            if isinstance(header, (StreamResume, RelayedStreamResume)):
                self._drop(flow)
                self._resume(conn, sid, header, authorize)
                if data or end:
                    self.on_stream_data(conn, sid, data, end, authorize=authorize)
                return
            flow.header = header
            status = self._check(header, authorize)
            if status is not StreamStatus.OK:
                self._drop(flow)
                self._refuse(conn, sid, status)
                return
            self.stats.streams_opened += 1
            if isinstance(header, (StreamOpen, NamedStreamOpen)) and header.resumable:
                self._make_resumable(flow)
            svc = self.services[header.service_id]
            backend = svc.tcp_backends[header.dst_port]
            if isinstance(header, (NamedStreamOpen, RelayedNamedStreamOpen)):
                flow.task = self.loop.create_task(self._connect_named(flow, conn, header, backend.port))
            else:
                flow.task = self.loop.create_task(self._connect(flow, backend.host, backend.port))
            if self.audit is not None:
                flow.audit = self.audit.open(
                    None, header.service_id, "tcp", header.dst_port, self.loop.time(), conn=conn,
                    agent_id=header.agent_id if isinstance(header, (RelayedStreamOpen, RelayedNamedStreamOpen))
                    else None,
                    name=header.name if isinstance(header, (NamedStreamOpen, RelayedNamedStreamOpen)) else None)
        if data:
            flow.inbox.append(data)
            flow.rx += len(data)
        if end:
            flow.peer_fin = True
        self.flush(flow)

    # ------------------------------------------------------------------ native splice
    def splice(self, flow: StreamFlow) -> None:
        """Hand the stream and the backend socket to the native splice (the Python pumps
        when that is off or impossible)."""
        conn, t = flow.conn, flow.transport
        sock = t.get_extra_info("socket") if t is not None else None
        if not NATIVE_SPLICE or conn is None or t is None or sock is None or flow.done or flow.unconsumed:
            self.flush(flow)
            return
        t.pause_reading()
        flow.read_paused = True
        down = b"".join(flow.inbox)
        flow.rx -= len(down)                # counted again once written to the backend
        flow.counted = (0, 0)
        try:
            conn.splice(flow.sid, sock, functools.partial(self._spliced, flow, conn),
                        down=down, down_fin=flow.peer_fin)
        except ConnectionError:
            flow.rx += len(down)
            flow.read_paused = False
            t.resume_reading()
            self.flush(flow)
            return
        flow.inbox.clear()
        flow.spliced = conn

    def _spliced(self, flow: StreamFlow, conn: ZtnaConnection, how: int, code: int, sent: int,
                 received: int) -> None:
        if flow.spliced is not conn:
            return
        flow.spliced = None
        flow.count(sent, received)
        if how == _native.SPLICE_DONE:
            flow.peer_fin = flow.backend_eof = flow.backend_shut = True
            self.finish(flow)
            return
        if how == _native.SPLICE_RESET:
            self.stats.stream_resets += 1
        if flow.transport is not None:
            flow.transport.abort()
        self.finish(flow, forget=True)

    # ------------------------------------------------------------------ resumption
    def _make_resumable(self, flow: StreamFlow) -> None:
        conn = flow.conn
        assert conn is not None
        agent_id = getattr(conn.user, "agent_id", None)
        ident = conn.identity
        if agent_id is None or ident is None:
            return                          # no Hello yet: a plain stream
        token = self.token_source(RESUME_TOKEN_LEN)
        if not resume.admit(self.resumable, self._per_agent, token, flow, agent_id,
                            limit=STREAM_RESUME_PER_AGENT, token_len=RESUME_TOKEN_LEN):
            return
        flow.token = token
        flow.owner = (agent_id, ident.fingerprint)
        if self._sweep is None:
            self._sweep = self.loop.call_later(LINGER_SWEEP, self._sweep_lingering)

    def _forget_token(self, flow: StreamFlow) -> None:
        token, flow.token = flow.token, None
        if token is None or flow.owner is None:
            return
        if resume.release(self.resumable, self._per_agent, token, flow.owner[0]) is None:
            return
        if flow.grace is not None:
            flow.grace.cancel()
            flow.grace = None

    def _sweep_lingering(self) -> None:
        """Finished flows keep their token until the Agent acknowledged all we sent."""
        self._sweep = None
        for flow in list(self.resumable.values()):
            if flow.done and flow.conn is not None and flow.conn.stream_send_backlog(flow.sid) == 0:
                self._forget_token(flow)
        if self.resumable:
            self._sweep = self.loop.call_later(LINGER_SWEEP, self._sweep_lingering)

    def _park(self, flow: StreamFlow) -> None:
        """Detach a resumable flow from its (dead or abandoned) connection."""
        conn = flow.conn
        if conn is None:
            return
        flow.unsplice()
        unacked = conn.stream_unacked(flow.sid)
        flow.retained = resume.retained_tail(unacked, tx=flow.tx, base=flow.base)
        data = flow.retained[1]
        if self.flows.get((conn, flow.sid)) is flow:
            del self.flows[(conn, flow.sid)]
        if not conn.closed:
            conn.reset_stream(flow.sid)
        flow.conn = None
        self._watched.discard(flow)
        if flow.transport is not None and not flow.read_paused:
            flow.read_paused = True
            flow.transport.pause_reading()
        flow.grace = self.loop.call_later(STREAM_RESUME_GRACE, self._expire, flow)
        log.info("stream %d of agent %s parked (%d bytes retained), waiting %.0fs for a resume",
                 flow.sid, flow.owner[0] if flow.owner else "?", len(data), STREAM_RESUME_GRACE)

    def _expire(self, flow: StreamFlow) -> None:
        flow.grace = None
        if flow.conn is None:
            log.info("stream of agent %s: no resume within %.0fs", flow.owner[0] if flow.owner else "?",
                     STREAM_RESUME_GRACE)
            self._forget_token(flow)
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow, forget=True)

    def _resume(self, conn: ZtnaConnection, sid: int, header: Any,
                authorize: Callable[[str], bool] | None) -> None:
        flow = self.resumable.get(header.token)
        relayed = isinstance(header, RelayedStreamResume)
        ok = flow is not None and flow.owner is not None and relayed == (authorize is None)
        if ok and flow is not None and flow.owner is not None:
            ident = conn.identity
            ok = flow.header is not None and resume.owner_may_resume(
                flow.owner, flow.header.service_id, relayed=relayed,
                claimed_agent=header.agent_id if relayed else getattr(conn.user, "agent_id", None),
                fingerprint=ident.fingerprint if ident is not None else None,
                wanted_service=header.service_id)
        if not ok or flow is None:
            self.stats.stream_resume_refused += 1
            self._refuse(conn, sid, StreamStatus.NO_SUCH_STREAM)
            return
        self._forget_token(flow)            # single use, from here on
        self._park(flow)
        start, data = flow.retained
        tail = resume.resend_from(flow.retained, header.received)
        if tail is None:
            log.warning("stream resume of agent %d refused: agent has %d, we retain %d..%d",
                        flow.owner[0] if flow.owner else -1, header.received, start, start + len(data))
            self.stats.stream_resume_refused += 1
            self._refuse(conn, sid, StreamStatus.NO_SUCH_STREAM)
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow, forget=True)
            return
        self.stats.stream_resumed += 1
        flow.conn, flow.sid = conn, sid
        self.flows[(conn, sid)] = flow
        reply = encode_stream_reply(StreamStatus.RESUMED, flow.rx)
        conn.send_stream(sid, reply)
        flow.base = len(reply) - header.received     # payload offset p is at stream offset base + p
        flow.tx = header.received
        flow.unconsumed = 0
        pending, flow.pending = flow.pending, []
        flow.send(tail + b"".join(pending), end=flow.backend_eof)
        flow.retained = (0, b"")
        log.info("stream of agent %d resumed on %s (%s): resent %d bytes, agent resends from %d",
                 flow.owner[0] if flow.owner else -1, "relay" if relayed else "direct",
                 conn.label or conn.peer_address, flow.tx - header.received, flow.rx)
        if flow.done:                       # the backend had finished: only the tail to deliver
            self.flows.pop((conn, sid), None)
            return
        if NATIVE_SPLICE and flow.transport is not None:
            self.splice(flow)
            return
        if flow.transport is not None and flow.read_paused:
            flow.read_paused = False
            flow.transport.resume_reading()
        self.flush(flow)

    def _check(self, header: Any, authorize: Callable[[str], bool] | None) -> StreamStatus:
        relayed = isinstance(header, (RelayedStreamOpen, RelayedNamedStreamOpen))
        if relayed == (authorize is not None):
            return StreamStatus.NOT_AUTHORIZED       # wrong header kind for this connection
        svc = self.services.get(header.service_id)
        if svc is None or (authorize is not None and not authorize(header.service_id)):
            return StreamStatus.NOT_AUTHORIZED
        if isinstance(header, (NamedStreamOpen, RelayedNamedStreamOpen)):
            if not any(p.matches(header.name) for p in self.patterns.get(header.service_id, ())):
                self.stats.stream_names_outside_patterns += 1
                log.info("named stream refused: %s is outside the patterns of service %s",
                         header.name, header.service_id)
                return StreamStatus.NOT_AUTHORIZED
            return StreamStatus.OK if header.dst_port in svc.tcp_backends else StreamStatus.NO_SUCH_PORT
        if ipaddress.ip_address(header.dst_ip).packed not in svc.vips:
            return StreamStatus.NOT_AUTHORIZED
        backend = svc.tcp_backends.get(header.dst_port)
        if backend is None or not backend.host:     # a name-only entry: no host for an IP
            return StreamStatus.NO_SUCH_PORT
        return StreamStatus.OK

    async def _connect_named(self, flow: StreamFlow, conn: ZtnaConnection,
                             header: NamedStreamOpen | RelayedNamedStreamOpen, port: int) -> None:
        from ztna.connector.resolve import NameResolutionFailed, NameResolver

        agent = header.agent_id if isinstance(header, RelayedNamedStreamOpen) else \
            getattr(conn.user, "agent_id", None)
        where = f"agent {agent} service {header.service_id} name {header.name}:{header.dst_port}"
        if self.resolver is None:
            self.resolver = NameResolver(None, timeout=self.connect_timeout)   # the system resolver
        try:
            addrs = await self.resolver.resolve(header.name)
        except NameResolutionFailed as exc:
            self.stats.stream_names_unresolved += 1
            log.warning("stream %s: cannot resolve via %s: %s", where, self.resolver.describe(), exc)
            self._fail(flow, StreamStatus.NAME_UNRESOLVED)
            return
        status = StreamStatus.UNREACHABLE
        for addr in addrs:
            if flow.done:
                return                      # the Agent gave up (reset) while we resolved
            try:
                await asyncio.wait_for(self.loop.create_connection(lambda: flow, addr, port),
                                       self.connect_timeout)
            except ConnectionRefusedError:
                status = StreamStatus.REFUSED
                continue
            except (TimeoutError, OSError):
                continue
            self.stats.stream_names_opened += 1
            log.info("stream %s -> %s", where, format_address((addr, port)))
            return
        log.info("stream %s: %s (tried %s port %d)", where, status.name.lower(), " ".join(addrs), port)
        self._fail(flow, status)

    async def _connect(self, flow: StreamFlow, host: str, port: int) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: flow, host, port),
                                   self.connect_timeout)
        except ConnectionRefusedError:
            self._fail(flow, StreamStatus.REFUSED)
        except (TimeoutError, OSError):
            self._fail(flow, StreamStatus.UNREACHABLE)

    def _fail(self, flow: StreamFlow, status: StreamStatus) -> None:
        self.stats.stream_backend_failures += 1
        if not flow.done and flow.conn is not None:
            self._refuse(flow.conn, flow.sid, status)
            self.finish(flow, forget=True, reason=f"backend connect failed: {status.name}")

    def _refuse(self, conn: ZtnaConnection, sid: int, status: StreamStatus) -> None:
        self.stats.streams_refused += 1
        conn.send_stream(sid, encode_stream_status(status), end=True)

    def flush(self, flow: StreamFlow) -> None:
        """Move inbox bytes to the backend while it has room; grant credit for them."""
        t = flow.transport
        if t is None or flow.done:
            return
        while flow.inbox and t.get_write_buffer_size() < WRITE_HIGH:
            chunk = flow.inbox.pop(0)
            t.write(chunk)
            flow.unconsumed += len(chunk)
            self.stats.stream_bytes_to_backend += len(chunk)
        if flow.unconsumed and flow.conn is not None and t.get_write_buffer_size() < WRITE_HIGH:
            flow.conn.consume_stream(flow.sid, flow.unconsumed)
            flow.unconsumed = 0
        if flow.peer_fin and not flow.inbox and not flow.backend_shut:
            flow.backend_shut = True
            if t.can_write_eof():
                try:
                    t.write_eof()
                except OSError:
                    # The backend already closed its socket (ENOTCONN): nothing left to
                    # half-close; the flow ends through maybe_done/connection_lost as usual.
                    pass
        self.maybe_done(flow)

    def maybe_done(self, flow: StreamFlow) -> None:
        if flow.backend_shut and flow.backend_eof and flow.transport is not None:
            flow.transport.close()

    def watch(self, flow: StreamFlow) -> None:
        self._watched.add(flow)
        if self._timer is None:
            self._timer = self.loop.call_later(RECHECK, self._recheck)

    def _recheck(self) -> None:
        self._timer = None
        for flow in list(self._watched):
            if flow.done or flow.transport is None or flow.conn is None:
                self._watched.discard(flow)
            elif flow.conn.stream_send_backlog(flow.sid) < SEND_LOW:
                self._watched.discard(flow)
                flow.read_paused = False
                flow.transport.resume_reading()
        if self._watched:
            self._timer = self.loop.call_later(RECHECK, self._recheck)

    def on_stream_reset(self, conn: ZtnaConnection, sid: int) -> None:
        flow = self.flows.get((conn, sid))
        if flow is not None:
            self.stats.stream_resets += 1
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow, forget=True, reason="agent reset the stream")

    def _drop(self, flow: StreamFlow) -> None:
        flow.done = True
        if flow.conn is not None:
            self.flows.pop((flow.conn, flow.sid), None)

    def finish(self, flow: StreamFlow, *, forget: bool = False, reason: str = "closed") -> None:
        """The backend side is over. A resumable flow keeps its token (lingers) unless
        `forget`: its last bytes may still be in flight on a direct path that can die."""
        if forget:
            self._forget_token(flow)
        if flow.done:
            return
        flow.unsplice()
        flow.done = True
        if self.audit is not None and flow.audit is not None:
            flow.audit.to_service, flow.audit.from_service = flow.rx, flow.tx
            self.audit.end(flow.audit, reason, self.loop.time())
        if flow.conn is not None:
            self.flows.pop((flow.conn, flow.sid), None)
        self._watched.discard(flow)
        if flow.task is not None and not flow.task.done():
            flow.task.cancel()
        if flow.transport is not None:
            flow.transport.close()
        self.stats.streams_closed += 1

    def drop_conn(self, conn: ZtnaConnection) -> None:
        for kind in [k for k in self._highest if k[0] is conn]:
            del self._highest[kind]
        for flow in [f for f in self.resumable.values() if f.conn is conn]:
            self._park(flow)                # resumable: wait for the Agent on another path
        for flow in [f for f in self.flows.values() if f.conn is conn]:
            flow.unsplice()                 # the core lets go of the socket before the abort
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow, forget=True, reason="connection closed")

    def close_all(self) -> None:
        for flow in list(self.resumable.values()):
            self._forget_token(flow)
            if flow.conn is None:
                if flow.transport is not None:
                    flow.transport.abort()
                self.finish(flow)
        for flow in list(self.flows.values()):
            flow.unsplice()
            if flow.conn is not None:
                flow.conn.reset_stream(flow.sid)
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow, reason="shutdown")
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
