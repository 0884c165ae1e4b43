"""Userspace mode (no root): local TCP/UDP forwards and a SOCKS5 server.

Theory of operation
-------------------
* **TCP** (`-L 127.0.0.1:8080=web:80`, or `=git.corp.test:80` for a name a service's DNS
  patterns cover, SOCKS5 CONNECT): each accepted local connection
  opens one QUIC stream (on the service's direct P2P connection when it has one, else on
  the Intermediate connection) and writes a `StreamOpen` header
  (service, virtual IP, port). The Connector's first byte is a `StreamStatus`; OK means the
  backend is connected and raw bytes follow. Then two pumps splice the sockets with
  back-pressure both ways: local→QUIC stops reading while the stream's unacknowledged
  backlog exceeds `SEND_BACKLOG_MAX`; QUIC→local grants the peer more stream credit
  (`consume_stream`) only after the local socket's write buffer drained, so a slow local
  reader slows the backend instead of growing our memory. FIN is a half-close, a reset or a
  lost Intermediate connection aborts the local socket.
* **Resumable streams** (docs/protocol.md §5.1): on a direct connection we open with 0x55 and
  the Connector answers `OK_RESUMABLE` + a token. We count the payload bytes taken from the
  stream (`rx`) and sent (`tx`). When the direct connection is abandoned, `DirectPaths`
  calls the sink's `on_lost()`: we copy the stream's unacknowledged send buffer, keep the
  local socket, and open a `StreamResume(token, rx)` stream on the Intermediate connection;
  the Connector answers `RESUMED` + its count, we resend from there and splice on. Anything
  else (refusal, no relay within `READY_WAIT`) aborts the local socket as before.
* **UDP** (`-U 127.0.0.1:5353=dns:53`): every local client address gets a synthetic source
  port; its datagrams become real IPv4/IPv6 UDP packets from the Agent's synthetic address
  (100.64.0.2 / fd00:64::2) to the service's virtual IP, carried as 0x2F DATAGRAMs. Replies
  arrive as bare IP packets; the destination port finds the client. The mapping is bounded
  (least recently used entry evicted).
* **SOCKS5** (RFC 1928, no authentication): CONNECT to `web:80`, `web.ztna:80` or a virtual
  IP; replies map the Connector's status to SOCKS codes. A domain name (`--socks5-hostname`)
  that a service's DNS patterns cover opens a `NamedStreamOpen` for that service: the
  Connector checks and resolves the name. Any other name is refused (host unreachable).
* **SOCKS5 UDP ASSOCIATE** (RFC 1928 §7): the control connection gets its own UDP relay
  socket on the local address the client reached us on (BND.ADDR/BND.PORT) and one synthetic
  source port, like a `-U` client. Encapsulated datagrams (RSV FRAG ATYP DST.ADDR DST.PORT
  data) to a service's virtual IP become UDP packets through the tunnel; replies come back
  encapsulated with the virtual IP:port as source. Only the control connection's peer IP may
  use the relay (and only from one port: the one the request named, else the first seen);
  only replies from destinations this association sent to are passed back. We do not
  reassemble, so FRAG != 0 is dropped; a destination that is not a virtual IP is dropped too
  (we are no open proxy). Closing the control connection ends the association.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import struct
from collections import OrderedDict
from typing import Any

from ztna.agent.config import AgentOptions, Forward, IpAddress, ServiceSpec
from ztna.agent.session import ACKED, REFUSED, ServiceState, Session
from ztna.errors import DecodeError, UsageError, error_text
from ztna.netstack.packets import PROTO_UDP, build_udp_packet, parse_ip, parse_udp
from ztna.observe import format_address
from ztna.startup import bind_error
from ztna.wire import (
    NamedStreamOpen,
    StreamOpen,
    StreamResume,
    StreamStatus,
    decode_stream_reply,
    encode_stream_open,
    to_connector_overhead,
)

log = logging.getLogger("ztna.agent")

SEND_BACKLOG_MAX = 1024 * 1024
READ_CHUNK = 64 * 1024
READY_WAIT = 10.0
_NO_STATUS = f"timeout: no status from the Connector within {READY_WAIT:.0f} s"
UDP_MAPPINGS_MAX = 4096
UDP_PORT_FIRST, UDP_PORT_LAST = 20000, 60999
SOCKS_UDP_MAX = 256          # open UDP associations (each holds a socket)
SOCKS_UDP_DESTS_MAX = 256    # destinations remembered per association (reply filter)

_SOCKS_REPLY = {
    StreamStatus.OK: 0x00, StreamStatus.REFUSED: 0x05, StreamStatus.UNREACHABLE: 0x04,
    StreamStatus.NOT_AUTHORIZED: 0x02, StreamStatus.NO_SUCH_PORT: 0x05, StreamStatus.LIMIT: 0x01,
    StreamStatus.NAME_UNRESOLVED: 0x04,
}


def reset_writer(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the application sees 'connection reset' at once."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


class StreamFailed(Exception):
    def __init__(self, status: StreamStatus | None, text: str) -> None:
        super().__init__(text)
        self.status = status


_LOST = (b"", False)   # queue marker: the direct connection is gone, resume on the relay


class _StreamSink:
    """What the session calls for one QUIC stream: queue the events for the pump task.
    Also the stream's place (conn, sid), which changes when a resumable stream moves."""

    def __init__(self, handlers: dict[int, Any], conn: Any, sid: int, spec: ServiceSpec) -> None:
        self.queue: asyncio.Queue[tuple[bytes, bool] | None] = asyncio.Queue()
        self.handlers = handlers   # the table this sink is registered in (relay or direct)
        self.conn: Any = conn      # None while a resume is under way
        self.sid = sid
        self.spec = spec
        self.token: bytes | None = None
        self.base = 0              # stream offset of our first payload byte (header length)
        self.rx = 0                # payload bytes taken from the stream (+ reply bytes until parsed)
        self.tx = 0                # payload bytes handed to QUIC
        self.fin_sent = False
        self.retained: tuple[int, bytes] = (0, b"")
        self.attached = asyncio.Event()
        self.attached.set()
        self.failed = False

    def on_data(self, data: bytes, end: bool) -> None:
        self.rx += len(data)
        self.queue.put_nowait((data, end))

    def on_reset(self, error_code: int) -> None:
        self.queue.put_nowait(None)

    def on_lost(self) -> bool:
        """The direct connection is abandoned (already closed, so no more ACKs from us).
        True if this stream will resume on the relay, False: treat as reset."""
        conn = self.conn
        if self.token is None or conn is None:
            return False
        unacked = conn.stream_unacked(self.sid)
        offset, data = unacked if unacked is not None else (self.base + self.tx, b"")
        if offset < self.base:
            data, offset = data[self.base - offset:], self.base
        self.retained = (offset - self.base, data)
        self.conn = None
        self.attached.clear()
        self.queue.put_nowait(_LOST)
        return True


class Userspace:
    def __init__(self, session: Session, options: AgentOptions) -> None:
        self.session = session
        self.options = options
        # One above the TUN's own addresses, so that in TUN mode replies for userspace UDP
        # forwards are told apart from the kernel's traffic by destination address alone.
        self.src_v4 = (options.tun_v4 + 1).packed
        self.src_v6 = (options.tun_v6 + 1).packed
        self.servers: list[asyncio.AbstractServer] = []
        self.udp_transports: list[asyncio.DatagramTransport] = []
        self.listeners: list[str] = []
        # synthetic source port -> (transport, client address, forward, service, packed vip)
        self.udp_by_port: OrderedDict[int, tuple[Any, Any, Forward, ServiceState, bytes]] = OrderedDict()
        self.udp_by_client: dict[tuple[int, Any], int] = {}
        self._next_port = UDP_PORT_FIRST
        self.tasks: set[asyncio.Task[None]] = set()
        # Accepted application sockets we proxy (forwards, SOCKS, the TUN redirect): reset
        # on exit, so no application waits on a tunnel that is gone.
        self.app_writers: set[asyncio.StreamWriter] = set()
        # synthetic source port -> SOCKS5 UDP association (same port space as `udp_by_port`)
        self.socks_udp: dict[int, _SocksUdp] = {}
        self.stats = {"tcp_opened": 0, "tcp_failed": 0, "tcp_active": 0, "tcp_direct": 0,
                      "tcp_resumed": 0, "tcp_resume_failed": 0, "udp_dropped_too_big": 0,
                      "udp_dropped_unknown": 0, "socks_failed": 0,
                      "socks_udp_associations": 0, "socks_udp_active": 0, "socks_udp_sent": 0,
                      "socks_udp_received": 0, "socks_udp_dropped_frag": 0, "socks_udp_dropped_foreign": 0,
                      "socks_udp_dropped_malformed": 0, "socks_udp_refused": 0}

    def claims(self, packet: bytes) -> bool:
        """True if a down-link packet is addressed to our synthetic UDP source."""
        if packet[0] >> 4 == 4:
            return packet[16:20] == self.src_v4
        return packet[24:40] == self.src_v6

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for fwd in self.options.forwards:
            self._tcp_target(fwd.target)   # fail fast on unknown targets
            try:
                srv = await asyncio.start_server(
                    # mypy cannot type a lambda whose extra parameter has a default (binding fwd)
                    lambda r, w, f=fwd: self._spawn(self._tcp_forward(r, w, f)),  # type: ignore[misc]
                    fwd.listen_host, fwd.listen_port)
            except OSError as exc:
                raise bind_error(f"-L forward to {fwd.target}:{fwd.target_port}", "tcp",
                                 fwd.listen_host, fwd.listen_port, exc) from None
            self.servers.append(srv)
            self._listening("tcp", srv.sockets[0].getsockname(), f"{fwd.target}:{fwd.target_port}")
        for index, fwd in enumerate(self.options.udp_forwards):
            self._resolve(fwd.target)
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_UdpListener, self, fwd, index),
                    local_addr=(fwd.listen_host, fwd.listen_port))
            except OSError as exc:
                raise bind_error(f"-U forward to {fwd.target}:{fwd.target_port}", "udp",
                                 fwd.listen_host, fwd.listen_port, exc) from None
            self.udp_transports.append(transport)
            self._listening("udp", transport.get_extra_info("sockname"), f"{fwd.target}:{fwd.target_port}")
        if self.options.socks is not None:
            host, port = self.options.socks
            try:
                srv = await asyncio.start_server(lambda r, w: self._spawn(self._socks(r, w)),
                                                 host, port)
            except OSError as exc:
                raise bind_error("SOCKS5 server", "tcp", host, port, exc) from None
            self.servers.append(srv)
            self._listening("socks5", srv.sockets[0].getsockname(), "any service")

    def _listening(self, kind: str, addr: Any, target: str) -> None:
        text = f"{kind} {format_address(addr)} -> {target}"
        self.listeners.append(text)
        log.info("listening: %s", text)

    def bound_port(self, kind: str, index: int = 0) -> int:
        """Port actually bound by the index-th listener of a kind (tests use port 0)."""
        return int([t for t in self.listeners if t.startswith(kind + " ")][index].split(" ")[1].rsplit(":", 1)[1])

    def reset_all(self) -> int:
        """RST every proxied application connection (SO_LINGER 0, then close): the Agent
        is going away and none of them can continue. Returns how many."""
        writers, self.app_writers = self.app_writers, set()
        for writer in writers:
            reset_writer(writer)
        if writers:
            log.info("reset %d proxied TCP connection%s", len(writers), "" if len(writers) == 1 else "s")
        return len(writers)

    async def stop(self) -> None:
        self.reset_all()
        for srv in self.servers:
            srv.close()
        for tr in self.udp_transports:
            tr.close()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _resolve(self, target: str) -> tuple[ServiceSpec, IpAddress]:
        return self.options.service_for_target(target)

    def _tcp_target(self, target: str) -> tuple[ServiceSpec, IpAddress | None, str | None]:
        """(service, virtual IP, None) or, for a name a service's DNS patterns cover,
        (service, None, name); UsageError otherwise."""
        try:
            spec, vip = self._resolve(target)
            return spec, vip, None
        except UsageError:
            named = self.options.service_for_name(target)
            if named is None:
                raise
            return named[0], None, named[1]

    async def _ready(self, svc: ServiceState) -> None:
        deadline = asyncio.get_running_loop().time() + 3 * READY_WAIT   # > a whole _resume
        direct = self.session.direct
        while self.session.conn is None or svc.registration != ACKED:
            if direct is not None and svc.path == "direct" and direct.stream_conn(svc.spec.id) is not None:
                return   # a live direct connection needs no Intermediate (it may be restarting)
            if svc.registration == REFUSED:
                raise StreamFailed(StreamStatus.NOT_AUTHORIZED, f"service {svc.spec.id} refused")
            if asyncio.get_running_loop().time() > deadline:
                raise StreamFailed(StreamStatus.UNREACHABLE, "Intermediate not connected")
            await asyncio.sleep(0.02)

    # ------------------------------------------------------------------ TCP over streams
    def _stream_conn(self, svc: ServiceState) -> tuple[Any, dict[int, Any], bool]:
        """The connection a new stream for `svc` goes on: the service's live direct P2P
        connection when it has one (the Connector accepts `StreamOpen` there), else the
        Intermediate connection. A stream stays on the connection it was opened on."""
        direct = self.session.direct
        if direct is not None and svc.path == "direct":
            picked = direct.stream_conn(svc.spec.id)
            if picked is not None:
                self.stats["tcp_direct"] += 1
                return picked[0], picked[1], True
        conn = self.session.conn
        assert conn is not None
        return conn, self.session.stream_handlers, False

    async def _reply(self, sink: _StreamSink, conn: Any) -> tuple[StreamStatus, Any, bytes, bool]:
        """Wait for the Connector's status (+ its tail); returns (status, extra, rest, end)."""
        buf = b""
        while True:
            item = await asyncio.wait_for(sink.queue.get(), READY_WAIT)
            if item is None or item is _LOST:
                raise StreamFailed(None, "stream reset before status")
            data, end = item
            buf += data
            try:
                parsed = decode_stream_reply(buf)
            except DecodeError:
                conn.reset_stream(sink.sid)
                raise StreamFailed(None, f"bad status byte {buf[0]}") from None
            if parsed is not None:
                status, extra, used = parsed
                sink.rx -= used
                conn.consume_stream(sink.sid, used)
                return status, extra, buf[used:], end
            if end:
                raise StreamFailed(None, "stream closed before status")

    async def _open(self, spec: ServiceSpec, vip: IpAddress | None, port: int,
                    name: str | None = None) -> tuple[Any, int, _StreamSink, bytes]:
        """Open a stream to a virtual IP, or by `name` (DNS-pattern services), and wait for
        the Connector's status; returns (conn, sid, sink, early payload)."""
        svc = self.session.by_id[spec.id]
        await self._ready(svc)
        conn, handlers, direct = self._stream_conn(svc)
        sid = conn.open_stream()
        sink = _StreamSink(handlers, conn, sid, spec)
        handlers[sid] = sink
        if name is not None:
            header = encode_stream_open(NamedStreamOpen(service_id=spec.id, name=name, dst_port=port,
                                                        resumable=direct))
        else:
            header = encode_stream_open(StreamOpen(service_id=spec.id, dst_ip=str(vip), dst_port=port,
                                                   resumable=direct))
        sink.base = len(header)
        conn.send_stream(sid, header)
        status, extra, rest, end = await self._reply(sink, conn)
        if status is StreamStatus.OK_RESUMABLE and direct:
            sink.token = extra
        elif status is not StreamStatus.OK:
            handlers.pop(sid, None)
            if status is StreamStatus.NAME_UNRESOLVED:
                raise StreamFailed(status, f"NAME_UNRESOLVED: the Connector could not resolve {name}")
            raise StreamFailed(status, status.name)
        if end:
            sink.queue.put_nowait((b"", True))
        return conn, sid, sink, rest

    async def _resume(self, sink: _StreamSink) -> bytes | None:
        """Continue a stream whose direct connection died on the Intermediate connection.
        Returns the first payload bytes, or None if the resume failed."""
        token, sink.token = sink.token, None       # single use
        start, data = sink.retained
        svc = self.session.by_id[sink.spec.id]
        try:
            assert token is not None
            await self._ready(svc)
            conn = self.session.conn
            assert conn is not None
            sid = conn.open_stream()
            sink.handlers = self.session.stream_handlers
            sink.handlers[sid] = sink
            sink.sid = sid
            received = sink.rx
            conn.send_stream(sid, encode_stream_open(StreamResume(sink.spec.id, token, received)))
            status, peer_rx, rest, end = await self._reply(sink, conn)
            if status is not StreamStatus.RESUMED:
                raise StreamFailed(status, status.name)
            if not start <= peer_rx <= start + len(data):
                conn.reset_stream(sid)
                raise StreamFailed(None, f"connector has {peer_rx}, we retain {start}..{start + len(data)}")
        except (TimeoutError, StreamFailed) as exc:
            self.stats["tcp_resume_failed"] += 1
            log.warning("tcp stream to %s could not resume on the relay: %s", sink.spec.id, error_text(exc, _NO_STATUS))
            sink.failed = True
            sink.attached.set()
            return None
        conn.send_stream(sid, data[peer_rx - start:], end=sink.fin_sent)
        sink.conn = conn
        sink.retained = (0, b"")
        sink.attached.set()
        self.stats["tcp_resumed"] += 1
        log.info("tcp stream to %s resumed on the relay: resent %d bytes, connector resends from %d",
                 sink.spec.id, start + len(data) - peer_rx, received)
        if end:
            sink.queue.put_nowait((b"", True))
        return rest

    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: Any, sid: int, sink: _StreamSink, early: bytes) -> None:
        self.stats["tcp_active"] += 1
        self.app_writers.add(writer)
        svc = self.session.by_id[sink.spec.id]
        svc.streams += 1
        up = asyncio.ensure_future(self._pump_up(reader, sink))
        try:
            if early:
                writer.write(early)
                svc.rx_bytes += len(early)
                svc.stream_rx_bytes += len(early)
                await writer.drain()
                if sink.conn is not None:
                    sink.conn.consume_stream(sink.sid, len(early))
            while True:
                item = await sink.queue.get()
                if item is _LOST:       # the direct connection died: continue on the relay
                    resumed = await self._resume(sink) if not sink.failed else None
                    if resumed is None:
                        writer.transport.abort()
                        break
                    item = (resumed, False)
                if item is None:        # reset, or the Intermediate connection is gone
                    writer.transport.abort()
                    break
                data, end = item
                if data:
                    writer.write(data)
                    svc.rx_bytes += len(data)
                    svc.stream_rx_bytes += len(data)
                    await writer.drain()            # back-pressure: credit after the drain
                    if sink.conn is not None:
                        sink.conn.consume_stream(sink.sid, len(data))
                if end:
                    if writer.can_write_eof():
                        writer.write_eof()
                    await up
                    break
        except (ConnectionError, OSError):
            if sink.conn is not None:
                sink.conn.reset_stream(sink.sid)
        finally:
            self.stats["tcp_active"] -= 1
            self.app_writers.discard(writer)
            up.cancel()
            sink.handlers.pop(sink.sid, None)
            writer.close()

    async def _attached(self, sink: _StreamSink) -> Any:
        """The stream's live connection, waiting out a resume; None when it is over."""
        deadline = asyncio.get_running_loop().time() + 3 * READY_WAIT   # > a whole _resume
        while True:
            conn = sink.conn
            if conn is not None and not conn.closed:
                return conn
            if asyncio.get_running_loop().time() > deadline:
                return None
            if sink.failed:
                return None
            if conn is not None and sink.token is None:
                return None             # not resumable: the stream died with its connection
            try:
                await asyncio.wait_for(sink.attached.wait(), 0.05)
            except TimeoutError:
                pass

    async def _pump_up(self, reader: asyncio.StreamReader, sink: _StreamSink) -> None:
        svc = self.session.by_id[sink.spec.id]
        try:
            while True:
                data = await reader.read(READ_CHUNK)
                conn = await self._attached(sink)
                if conn is None:
                    return
                if not data:
                    sink.fin_sent = True
                    conn.send_stream(sink.sid, b"", end=True)
                    return
                conn.send_stream(sink.sid, data)
                sink.tx += len(data)
                # Payload bytes, once: a resume resends from the retained buffer uncounted.
                svc.tx_bytes += len(data)
                svc.stream_tx_bytes += len(data)
                while True:
                    conn = sink.conn
                    if conn is None or conn.closed or conn.stream_send_backlog(sink.sid) <= SEND_BACKLOG_MAX:
                        break
                    await asyncio.sleep(0.005)
        except (ConnectionError, OSError):
            if sink.conn is not None:
                sink.conn.reset_stream(sink.sid)

    async def _tcp_forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, fwd: Forward) -> None:
        spec, vip, name = self._tcp_target(fwd.target)
        try:
            conn, sid, sink, early = await self._open(spec, vip, fwd.target_port, name)
        except (TimeoutError, StreamFailed) as exc:
            self.stats["tcp_failed"] += 1
            log.warning("forward to %s failed: %s", format_address((fwd.target, fwd.target_port)), error_text(exc, _NO_STATUS))
            writer.close()
            return
        self.stats["tcp_opened"] += 1
        await self._splice(reader, writer, conn, sid, sink, early)

    # ------------------------------------------------------------------ SOCKS5
    async def _socks(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(2)
            if head[0] != 5:
                raise ValueError("not SOCKS5")
            methods = await reader.readexactly(head[1])
            if 0 not in methods:
                writer.write(b"\x05\xff")
                raise ValueError("client offers no 'no authentication' method")
            writer.write(b"\x05\x00")
            ver, cmd, _, atyp = await reader.readexactly(4)
            if atyp == 1:
                host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
            elif atyp == 4:
                host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
            elif atyp == 3:
                n = (await reader.readexactly(1))[0]
                host = (await reader.readexactly(n)).decode("ascii", "replace")
            else:
                self._socks_reply(writer, 0x08)
                raise ValueError(f"address type {atyp}")
            port = struct.unpack("!H", await reader.readexactly(2))[0]
            if cmd == 3:
                await self._socks_udp_associate(reader, writer, port)
                return
            if cmd != 1:
                self._socks_reply(writer, 0x07)
                raise ValueError(f"command {cmd} not supported")
            vip: IpAddress | None = None
            name: str | None = None
            try:
                spec, vip = self._resolve(host)
            except UsageError:
                named = self.options.service_for_name(host) if atyp == 3 else None
                if named is None:
                    self._socks_reply(writer, 0x04)
                    raise ValueError(f"{host} is not a service (nor a name its DNS patterns cover)") from None
                spec, name = named
            try:
                conn, sid, sink, early = await self._open(spec, vip, port, name)
            except (TimeoutError, StreamFailed) as exc:
                status = getattr(exc, "status", None)
                self._socks_reply(writer, _SOCKS_REPLY.get(status, 0x01) if status is not None else 0x01)
                raise ValueError(f"{host}:{port}: {error_text(exc, _NO_STATUS)}") from None
        except (ValueError, asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            self.stats["socks_failed"] += 1
            log.info("socks: %s", exc)
            writer.close()
            return
        self.stats["tcp_opened"] += 1
        self._socks_reply(writer, 0x00, vip, port)
        await self._splice(reader, writer, conn, sid, sink, early)

    @staticmethod
    def _socks_reply(writer: asyncio.StreamWriter, code: int, ip: IpAddress | None = None, port: int = 0) -> None:
        addr = ip or ipaddress.IPv4Address(0)
        atyp = 1 if addr.version == 4 else 4
        writer.write(bytes((5, code, 0, atyp)) + addr.packed + struct.pack("!H", port))

    async def _socks_udp_associate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                   client_port: int) -> None:
        """RFC 1928 §7: open the relay socket, answer with its address, and keep the
        association exactly as long as the control connection. `client_port` is the
        request's DST.PORT: the port the client will send from, 0 if it does not know yet.
        (Its DST.ADDR is not trusted: the control connection's peer IP is the client.)"""
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        if len(self.socks_udp) >= SOCKS_UDP_MAX:
            self._socks_reply(writer, 0x01)
            raise ValueError(f"UDP ASSOCIATE refused: {SOCKS_UDP_MAX} associations open")
        bind_ip = _plain_ip(local[0])
        try:
            transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
                _SocksUdpProtocol, local_addr=(str(bind_ip), 0))
        except OSError as exc:
            self._socks_reply(writer, 0x01)
            raise ValueError(f"UDP ASSOCIATE: cannot bind a relay socket on {bind_ip}: {exc}") from None
        assoc = _SocksUdp(self, transport, self._alloc_port(), _plain_ip(peer[0]), client_port or None)
        proto.assoc = assoc
        self.socks_udp[assoc.sport] = assoc
        self.stats["socks_udp_associations"] += 1
        self.stats["socks_udp_active"] += 1
        bound = transport.get_extra_info("sockname")
        log.info("socks: UDP associate for %s on %s", format_address(peer[0]), format_address(bound))
        try:
            self._socks_reply(writer, 0x00, bind_ip, bound[1])
            await writer.drain()
            # Nothing more is expected on the control connection; reading until EOF is how
            # we learn that the client is done with the association.
            while await reader.read(4096):
                pass
        except (ConnectionError, OSError):
            pass
        finally:
            self.socks_udp.pop(assoc.sport, None)
            self.stats["socks_udp_active"] -= 1
            transport.close()
            writer.close()
            log.info("socks: UDP associate for %s ended with its control connection", peer[0])

    def socks_udp_from_client(self, assoc: _SocksUdp, data: bytes, addr: Any) -> None:
        """One encapsulated datagram on an association's relay socket."""
        if self.socks_udp.get(assoc.sport) is not assoc:
            return
        if _plain_ip(addr[0]) != assoc.client_ip or (assoc.client_port is not None and addr[1] != assoc.client_port):
            self.stats["socks_udp_dropped_foreign"] += 1
            log.debug("socks udp: datagram from %s is not from the association's client", format_address(addr))
            return
        try:
            frag, host, port, payload = _parse_socks_udp(data)
        except ValueError as exc:
            self.stats["socks_udp_dropped_malformed"] += 1
            log.debug("socks udp: malformed datagram from %s: %s", format_address(addr), exc)
            return
        if assoc.client_port is None:
            assoc.client_port = addr[1]   # pinned: from now on only this port is the client
        assoc.client = addr
        if frag != 0:
            # We do not reassemble (RFC 1928 allows that); a fragment alone is useless.
            self.stats["socks_udp_dropped_frag"] += 1
            return
        try:
            spec, vip = self._resolve(host)
        except UsageError:
            self.stats["socks_udp_refused"] += 1
            log.debug("socks udp: %s is not a service's virtual IP, dropped", format_address((host, port)))
            return
        svc = self.session.by_id[spec.id]
        dests = assoc.dests
        key = (vip.packed, port)
        dests[key] = svc
        dests.move_to_end(key)
        if len(dests) > SOCKS_UDP_DESTS_MAX:
            dests.popitem(last=False)
        src = self.src_v4 if vip.version == 4 else self.src_v6
        if self._send_udp(svc, build_udp_packet(src, vip.packed, assoc.sport, port, payload)):
            self.stats["socks_udp_sent"] += 1

    # ------------------------------------------------------------------ UDP over DATAGRAMs
    def udp_from_client(self, transport: Any, index: int, fwd: Forward, data: bytes, client: Any) -> None:
        spec, vip = self._resolve(fwd.target)
        svc = self.session.by_id[spec.id]
        key = (index, client)
        sport = self.udp_by_client.get(key)
        if sport is None:
            sport = self._alloc_port()
            self.udp_by_client[key] = sport
            self.udp_by_port[sport] = (transport, client, fwd, svc, vip.packed)
        else:
            self.udp_by_port.move_to_end(sport)
        src = self.src_v4 if vip.version == 4 else self.src_v6
        self._send_udp(svc, build_udp_packet(src, vip.packed, sport, fwd.target_port, data))

    def _send_udp(self, svc: ServiceState, packet: bytes) -> bool:
        """Send one IP packet for `svc` unless it exceeds what the relay can carry (the
        worst case: the direct path takes at least as much)."""
        max_payload = self.session.max_payload()
        if max_payload and len(packet) > max_payload - to_connector_overhead(svc.spec.id):
            self.stats["udp_dropped_too_big"] += 1
            return False
        self.session.send(svc, svc.prefix + packet)
        return True

    def _alloc_port(self) -> int:
        if len(self.udp_by_port) >= UDP_MAPPINGS_MAX:
            old, (_, client, _, _, _) = self.udp_by_port.popitem(last=False)
            self.udp_by_client = {k: v for k, v in self.udp_by_client.items() if v != old}
        while True:
            port = self._next_port
            self._next_port = port + 1 if port < UDP_PORT_LAST else UDP_PORT_FIRST
            if port not in self.udp_by_port and port not in self.socks_udp:
                return port

    def on_packet(self, packet: bytes) -> None:
        """A bare IP packet from the Intermediate: a UDP reply for one of our clients."""
        try:
            ip = parse_ip(packet)
            if ip.proto != PROTO_UDP or ip.dst not in (self.src_v4, self.src_v6):
                raise DecodeError("not for a UDP forward")
            udp = parse_udp(packet, ip)
        except DecodeError:
            self.stats["udp_dropped_unknown"] += 1
            return
        assoc = self.socks_udp.get(udp.dport)
        if assoc is not None:
            self._socks_udp_reply(assoc, packet, ip.src, udp.sport, udp.payload)
            return
        entry = self.udp_by_port.get(udp.dport)
        if entry is None or entry[4] != ip.src:
            self.stats["udp_dropped_unknown"] += 1
            return
        transport, client, _, svc, _ = entry
        svc.rx_packets += 1
        svc.rx_bytes += len(packet)
        transport.sendto(bytes(udp.payload), client)

    def _socks_udp_reply(self, assoc: _SocksUdp, packet: bytes, src: bytes, sport: int, payload: memoryview) -> None:
        svc = assoc.dests.get((bytes(src), sport))
        if svc is None or assoc.client is None:
            # Only destinations this association sent to may answer through it.
            self.stats["udp_dropped_unknown"] += 1
            return
        svc.rx_packets += 1
        svc.rx_bytes += len(packet)
        self.stats["socks_udp_received"] += 1
        atyp = b"\x01" if len(src) == 4 else b"\x04"
        assoc.transport.sendto(b"\x00\x00\x00" + atyp + bytes(src) + struct.pack("!H", sport) + payload,
                               assoc.client)

    def snapshot(self) -> dict[str, Any]:
        return {"listeners": list(self.listeners), "udp_mappings": len(self.udp_by_port), **self.stats}


def _plain_ip(text: str) -> IpAddress:
    """An address as a socket names it, IPv4-mapped IPv6 (dual-stack listeners) unmapped."""
    ip = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse_socks_udp(data: bytes) -> tuple[int, str, int, bytes]:
    """RFC 1928 §7 request header -> (FRAG, DST.ADDR as text, DST.PORT, DATA)."""
    if len(data) < 4:
        raise ValueError("shorter than the header")
    frag, atyp = data[2], data[3]
    if atyp == 1:
        end = 8
        host = str(ipaddress.IPv4Address(data[4:8])) if len(data) >= end else ""
    elif atyp == 4:
        end = 20
        host = str(ipaddress.IPv6Address(data[4:20])) if len(data) >= end else ""
    elif atyp == 3:
        n = data[4] if len(data) > 4 else 0
        end = 5 + n
        host = data[5:end].decode("ascii", "replace")
    else:
        raise ValueError(f"address type {atyp}")
    if len(data) < end + 2 or not host:
        raise ValueError("truncated address")
    port = struct.unpack_from("!H", data, end)[0]
    if port == 0:
        raise ValueError("port 0")
    return frag, host, port, data[end + 2:]


class _SocksUdp:
    """One UDP association: its relay socket, its synthetic source port, the client."""

    def __init__(self, owner: Userspace, transport: Any, sport: int, client_ip: IpAddress,
                 client_port: int | None) -> None:
        self.owner = owner
        self.transport = transport
        self.sport = sport
        self.client_ip = client_ip
        self.client_port = client_port
        self.client: Any = None            # the full address replies go to (after the first datagram)
        # (packed virtual IP, port) -> service, for destinations this association sent to
        self.dests: OrderedDict[tuple[bytes, int], ServiceState] = OrderedDict()


class _SocksUdpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.assoc: _SocksUdp | None = None

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.assoc is not None:
            self.assoc.owner.socks_udp_from_client(self.assoc, data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


class _UdpListener(asyncio.DatagramProtocol):
    def __init__(self, owner: Userspace, fwd: Forward, index: int) -> None:
        self.owner, self.fwd, self.index = owner, fwd, index
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner.udp_from_client(self.transport, self.index, self.fwd, data, addr)

    def error_received(self, exc: Exception) -> None:
        pass


