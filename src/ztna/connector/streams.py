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
  backlog is above `SEND_HIGH` and re-check every `RECHECK` seconds (aioquic reports no
  "acked" event).
FIN ↔ half-close (write_eof / EOF), reset ↔ RST (abort / connection lost with an error).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ztna.errors import DecodeError
from ztna.wire.stream_header import (
    RelayedStreamOpen,
    StreamOpen,
    StreamStatus,
    decode_stream_header,
    encode_stream_status,
)

if TYPE_CHECKING:
    from ztna.connector.service import ConnectorStats, ServiceState
    from ztna.quic.connection import ZtnaConnection

log = logging.getLogger("ztna.connector")

SEND_HIGH = 512 * 1024
SEND_LOW = 256 * 1024
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
RECHECK = 0.005
HEADER_LIMIT = 128


class StreamFlow(asyncio.Protocol):
    def __init__(self, table: StreamTable, conn: ZtnaConnection, sid: int) -> None:
        self.table = table
        self.conn = conn
        self.sid = sid
        self.head = b""
        self.header: StreamOpen | RelayedStreamOpen | None = None
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

    # backend protocol
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        if self.done:
            transport.abort()
            return
        self.conn.send_stream(self.sid, encode_stream_status(StreamStatus.OK))
        self.table.flush(self)

    def data_received(self, data: bytes) -> None:
        self.conn.send_stream(self.sid, data)
        self.table.stats.stream_bytes_to_agent += len(data)
        if self.conn.stream_send_backlog(self.sid) > SEND_HIGH and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()
            self.table.watch(self)

    def eof_received(self) -> bool:
        self.backend_eof = True
        self.conn.send_stream(self.sid, b"", end=True)
        self.table.maybe_done(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.done:
            return
        if exc is not None or not self.backend_eof:
            if exc is not None:
                self.conn.reset_stream(self.sid)
                self.table.finish(self)
                return
            self.backend_eof = True
            self.conn.send_stream(self.sid, b"", end=True)
        self.table.finish(self)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.table.flush(self)


class StreamTable:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: ConnectorStats,
                 services: dict[str, ServiceState], *, max_streams: int,
                 connect_timeout: float) -> None:
        self.loop = loop
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
            flow.header = header
            status = self._check(header, authorize)
            if status is not StreamStatus.OK:
                self._drop(flow)
                self._refuse(conn, sid, status)
                return
            self.stats.streams_opened += 1
            svc = self.services[header.service_id]
            backend = svc.tcp_backends[header.dst_port]
            flow.task = self.loop.create_task(self._connect(flow, backend.host, backend.port))
        if data:
            flow.inbox.append(data)
        if end:
            flow.peer_fin = True
        self.flush(flow)

    def _check(self, header: Any, authorize: Callable[[str], bool] | None) -> StreamStatus:
        relayed = isinstance(header, RelayedStreamOpen)
        if relayed == (authorize is not None):
            return StreamStatus.NOT_AUTHORIZED       # wrong header kind for this connection
        svc = self.services.get(header.service_id)
        if svc is None or (authorize is not None and not authorize(header.service_id)):
            return StreamStatus.NOT_AUTHORIZED
        if ipaddress.ip_address(header.dst_ip).packed not in svc.vips:
            return StreamStatus.NOT_AUTHORIZED
        if header.dst_port not in svc.tcp_backends:
            return StreamStatus.NO_SUCH_PORT
        return StreamStatus.OK

    async def _connect(self, flow: StreamFlow, host: str, port: int) -> None:
        try:
            await asyncio.wait_for(self.loop.create_connection(lambda: flow, host, port),
                                   self.connect_timeout)
        except ConnectionRefusedError:
            self._fail(flow, StreamStatus.REFUSED)
        except (OSError, asyncio.TimeoutError):
            self._fail(flow, StreamStatus.UNREACHABLE)

    def _fail(self, flow: StreamFlow, status: StreamStatus) -> None:
        self.stats.stream_backend_failures += 1
        if not flow.done:
            self._refuse(flow.conn, flow.sid, status)
            self.finish(flow)

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
        if flow.unconsumed and t.get_write_buffer_size() < WRITE_HIGH:
            flow.conn.consume_stream(flow.sid, flow.unconsumed)
            flow.unconsumed = 0
        if flow.peer_fin and not flow.inbox and not flow.backend_shut:
            flow.backend_shut = True
            if t.can_write_eof():
                t.write_eof()
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
            if flow.done or flow.transport is None:
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
            self.finish(flow)

    def _drop(self, flow: StreamFlow) -> None:
        flow.done = True
        self.flows.pop((flow.conn, flow.sid), None)

    def finish(self, flow: StreamFlow) -> None:
        if flow.done:
            return
        flow.done = True
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
        for flow in [f for f in self.flows.values() if f.conn is conn]:
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow)

    def close_all(self) -> None:
        for flow in list(self.flows.values()):
            flow.conn.reset_stream(flow.sid)
            if flow.transport is not None:
                flow.transport.abort()
            self.finish(flow)
