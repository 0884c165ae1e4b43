"""One QUIC connection of a `QuicEndpoint`, as the drivers see it.

The packets, TLS, loss recovery and congestion control are native (`ztna._native`: quinn-proto
with rustls); this object is the connection's Python face: it holds the identity Python
verified, the control-stream plumbing, and forwards every operation to the native endpoint by
handle. What the native core guarantees underneath (see native/src/core.rs):

* **DATAGRAM size comes from the live connection** (`max_datagram_payload()`, which honours the
  peer's limit) and is enforced *before* anything is queued: an oversized DATAGRAM raises
  `DatagramTooLarge` and is counted.
* **A bounded DATAGRAM queue that drops the oldest** (tunnel traffic is unreliable and the
  newest packet is the most useful), every drop counted, and `datagram_budget()` so that
  TCP-in-DATAGRAM applies back-pressure instead of being dropped.
* **Stream receive credit follows consumption**: the native side reads a stream only while the
  application has consumed all but a window of what it was handed (`consume_stream()`), so a
  slow backend slows the sender instead of growing our buffers.
* **The control stream** (docs/protocol.md): the client's first bidirectional stream, id 0.
  The connection owns its decoder and hands the handler typed messages (`on_message`), so
  no program decodes control bytes itself.

The connection never does I/O; `ztna.quic.endpoint` owns the socket and the timer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from ztna.errors import DatagramTooLarge, ProtocolError
from ztna.wire import ControlDecoder

if TYPE_CHECKING:
    import asyncio
    import socket
    from collections.abc import Callable

    from cryptography import x509

    from ztna._native import ClientTls, Endpoint, Event
    from ztna.identity import Identity
    from ztna.wire import ControlMessage

CONTROL_STREAM_ID = 0


class ConnectionOwner(Protocol):
    """What a connection needs from the endpoint that owns it (`ztna.quic.endpoint.
    QuicEndpoint`): the native endpoint, the loop, and a way to ask for a flush.
    A Protocol, so this module never imports the endpoint module that imports it."""

    native: Endpoint
    loop: asyncio.AbstractEventLoop

    def mark_dirty(self, conn: ZtnaConnection | None = None) -> None: ...

    def forget(self, conn: ZtnaConnection) -> None: ...

    def splice_socket(self, conn: ZtnaConnection, sid: int, sock: socket.socket,
                      on_end: Callable[[int, int, int, int], None], *, down: bytes = b"",
                      down_fin: bool = False, up: bytes = b"") -> int: ...

    def unsplice(self, conn: ZtnaConnection, sid: int) -> tuple[int, int] | None: ...

    def flush(self) -> None: ...

# Application close codes (docs/protocol.md, "Connection close codes").
CLOSE_NO_ERROR = 0x0
CLOSE_SHUTDOWN = 0x1
CLOSE_AUTH = 0x2
CLOSE_LIMIT = 0x3
CLOSE_PROTOCOL = 0x4

log = logging.getLogger("ztna.quic")


class ConnectionHandler:
    """What a program does with a connection's events. Drivers subclass it; every method
    is optional. Methods run inside the endpoint's receive loop: keep them short, queue
    work, never block."""

    def on_handshake(self, conn: ZtnaConnection) -> None: ...

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None: ...

    def on_message(self, conn: ZtnaConnection, msg: ControlMessage) -> None:
        """One decoded control message (docs/protocol.md), in stream order. The connection
        owns the control-stream decoder; unknown JSON types arrive as `UnknownMessage`,
        which handlers ignore."""

    def on_control_error(self, conn: ZtnaConnection, error: ProtocolError) -> None:
        """The control stream was corrupt: the connection logged it and is closing."""

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None: ...

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None: ...

    def on_path_changed(self, conn: ZtnaConnection) -> None:
        """Server side: the peer's address changed (NAT rebinding); re-send QAD."""

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None: ...


class ZtnaConnection:
    """A live QUIC connection owned by a `QuicEndpoint` (native handle `handle`)."""

    __slots__ = (
        "endpoint", "handle", "handler", "peer_address", "identity", "handshake_complete",
        "closed", "close_reason", "close_code", "resumed", "early_data_accepted",
        "zero_rtt_attempted", "is_client", "_control_open", "_control_backlog", "_waiters",
        "created_at", "label", "user", "_last_received", "_held", "_authorized", "_retain",
        "_retained", "server_name", "peer_chain", "client_tls", "_control_decoder",
    )

    def __init__(
        self,
        endpoint: ConnectionOwner,
        handle: int,
        handler: ConnectionHandler,
        peer_address: tuple[Any, ...],
        *,
        now: float,
        is_client: bool,
        retain_streams: bool = False,
    ) -> None:
        self.endpoint = endpoint
        self.handle = handle
        self.handler = handler
        self.peer_address = peer_address
        self.identity: Identity | None = None
        self.handshake_complete = False
        self.closed = False
        self.close_reason = ""
        self.close_code: int | None = None
        self.resumed = False
        self.early_data_accepted = False
        self.zero_rtt_attempted = False
        self.is_client = is_client
        self.server_name: str | None = None
        self.peer_chain: list[bytes] = []     # DER, the peer's leaf first (after the handshake)
        self.client_tls: ClientTls | None = None  # client side: the native TLS it was made with
        # Clients write the control stream at once (in 0-RTT when resuming).
        self._control_open = is_client
        self._control_backlog: list[bytes] = []
        self._control_decoder = ControlDecoder()
        self._waiters: list[asyncio.Future[ZtnaConnection]] = []
        self.created_at = now
        # Loop time of the last packet from the peer (liveness checks: a client that hears
        # nothing, not even ACKs of its pings, declares the path dead early).
        self._last_received = now
        self.label = ""
        self.user: Any = None  # the driver's per-connection state
        # Server side: events that arrive before the peer's certificate was checked wait here.
        self._held: list[Event] | None = None if is_client else []
        self._authorized = is_client
        # Streams of direct connections keep their unacknowledged tail (resumable streams).
        self._retain = retain_streams
        self._retained: set[int] = set()

    @property
    def _native(self) -> Endpoint:
        return self.endpoint.native

    @property
    def last_received(self) -> float:
        """Loop time of the peer's latest packet, ACK-only packets included."""
        if not self.closed:
            at = self._native.last_received(self.handle)
            if at is not None and at > self._last_received:
                self._last_received = at
        return self._last_received

    # ------------------------------------------------------------------ sizes
    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload that fits one packet on this connection right now."""
        if self.closed:
            return 0
        return int(self._native.max_datagram_payload(self.handle))

    def datagram_budget(self) -> int:
        """How many more DATAGRAMs can be queued without waiting behind a full congestion
        window. Zero means: hold back (back-pressure), don't drop."""
        if self.closed:
            return 0
        return int(self._native.datagram_budget(self.handle))

    @property
    def dropped_oldest(self) -> int:
        return int(self._conn_stat("dropped_oldest"))

    @property
    def oversize_refused(self) -> int:
        return int(self._conn_stat("oversize_refused"))

    def _conn_stat(self, name: str) -> float:
        if self.closed:
            return 0
        try:
            return self._native.connection_stats(self.handle)[name]
        except ValueError:
            return 0

    def stats(self) -> dict[str, Any]:
        """Live transport numbers (rtt, cwnd, mtu, packets, losses, bytes)."""
        if self.closed:
            return {}
        try:
            return dict(self._native.connection_stats(self.handle))
        except ValueError:
            return {}

    # ------------------------------------------------------------------ sending
    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM. Raises `DatagramTooLarge` (never enqueued) when it cannot fit.
        Returns False when an older queued DATAGRAM had to be dropped to make room (or the
        connection is closed)."""
        if self.closed:
            return False
        # The native core counts refusals and every dropped datagram (endpoint stats).
        status = self._native.send_datagram(self.handle, data)
        if status == 3:
            raise DatagramTooLarge(len(data), self.max_datagram_payload())
        self.endpoint.mark_dirty(self)
        return status == 0

    def send_control(self, frame: bytes) -> None:
        """Send an already-encoded control frame (ztna.wire.encode_control) reliably."""
        if self.closed:
            return
        if not self._control_open:
            # A server may only write on stream 0 once the client opened it.
            self._control_backlog.append(frame)
            return
        self._native.stream_write(self.handle, CONTROL_STREAM_ID, frame, False)
        self.endpoint.mark_dirty(self)

    def _control_data(self, data: bytes) -> None:
        """Bytes from the control stream: decode them and hand each message to the handler.
        A corrupt control stream cannot be resynchronised: it closes the connection
        (CLOSE_PROTOCOL), logs one line and tells the handler (`on_control_error`)."""
        try:
            messages = self._control_decoder.feed(data)
        except ProtocolError as exc:
            log.warning("%s: corrupt control stream (%s); closing the connection",
                        self.label or self.peer_address[0], exc)
            self.close(CLOSE_PROTOCOL, "bad control stream")
            self.handler.on_control_error(self, exc)
            return
        on_message = self.handler.on_message
        for msg in messages:
            if self.closed:
                return
            on_message(self, msg)

    def open_stream(self) -> int:
        if self.closed:
            raise ConnectionError("connection closed")
        sid = self._native.open_bi(self.handle)
        if sid is None:
            raise ConnectionError("no stream credit left on this connection")
        return int(sid)

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if self.closed:
            return
        if self._retain and stream_id not in self._retained:
            self._retained.add(stream_id)
            self._native.set_retain(self.handle, stream_id, True)
        self._native.stream_write(self.handle, stream_id, data, end)
        self.endpoint.mark_dirty(self)

    def stream_send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream that QUIC flow control has not let out yet
        (back-pressure: stop reading the source while this is high)."""
        if self.closed:
            return 0
        return int(self._native.stream_backlog(self.handle, stream_id))

    def stream_unacked(self, stream_id: int) -> tuple[int, bytes] | None:
        """(stream offset, bytes): the stream's tail the peer may not have received yet (at
        least what it has not acknowledged), for resuming the stream elsewhere; None if the
        stream keeps no tail."""
        result = self._native.stream_unacked(self.handle, stream_id)
        if result is None:
            return None
        offset, data = result
        return int(offset), bytes(data)

    def splice(self, stream_id: int, sock: socket.socket, on_end: Callable[[int, int, int, int], None],
               *, down: bytes = b"", down_fin: bool = False, up: bytes = b"") -> int:
        """Hand the stream and the connected TCP socket `sock` to the native splice (see
        `QuicEndpoint.splice_socket`); a resumable stream keeps its tail as before."""
        if self.closed:
            raise ConnectionError("connection closed")
        if self._retain and stream_id not in self._retained:
            self._retained.add(stream_id)
            self._native.set_retain(self.handle, stream_id, True)
        try:
            return self.endpoint.splice_socket(self, stream_id, sock, on_end, down=down,
                                               down_fin=down_fin, up=up)
        except ValueError as exc:
            raise ConnectionError(str(exc)) from None

    def unsplice(self, stream_id: int) -> tuple[int, int] | None:
        """Take a spliced stream back: (bytes sent into it, bytes received from it)."""
        return self.endpoint.unsplice(self, stream_id)

    def splice_counts(self, stream_id: int) -> tuple[int, int] | None:
        """(sent into, received from) a live splice of the stream (to a socket, or a stream
        pair's leg), None if there is none."""
        counts = self._native.splice_counts(self.handle, stream_id)
        return None if counts is None else (int(counts[0]), int(counts[1]))

    def consume_stream(self, stream_id: int, nbytes: int) -> None:
        """The application has taken `nbytes` more from this stream: grant more credit."""
        if not self.closed and nbytes > 0:
            self._native.consume(self.handle, stream_id, nbytes)
            self.endpoint.mark_dirty(self)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.closed:
            return
        self._native.reset_stream(self.handle, stream_id, error_code)
        self.endpoint.mark_dirty(self)

    def ping(self) -> None:
        if not self.closed:
            self._native.ping(self.handle)
            self.endpoint.mark_dirty(self)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if not self.closed:
            self._native.close(self.handle, self.endpoint.loop.time(), error_code, reason)
            self.endpoint.mark_dirty(self)

    # ------------------------------------------------------------------ handshake
    def wait_handshake(self) -> asyncio.Future[ZtnaConnection]:
        """Future resolved when the handshake completes (or fails with ConnectionError)."""
        fut: asyncio.Future[ZtnaConnection] = self.endpoint.loop.create_future()
        if self.handshake_complete:
            fut.set_result(self)
        elif self.closed:
            fut.set_exception(ConnectionError(self.close_reason or "connection closed"))
        else:
            self._waiters.append(fut)
        return fut

    def _resolve_waiters(self, error: str | None) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if error is None:
                fut.set_result(self)
            else:
                fut.set_exception(ConnectionError(error))

    # ------------------------------------------------------------------ events
    def _event(self, ev: Event) -> None:
        """One native event for this connection (see QuicEndpoint._dispatch)."""
        kind = ev[0]
        if self._held is not None and kind in (3, 4, 5):
            self._held.append(ev)  # not yet authorized: wait for the certificate check
            return
        handler = self.handler
        if kind == 3:
            on_datagram = handler.on_datagram
            for data in ev[2]:
                on_datagram(self, data)
        elif kind == 4:
            sid, data, end = ev[2], ev[3], ev[4]
            if sid == CONTROL_STREAM_ID:
                if not self._control_open:
                    self._open_control()
                if data:
                    self._control_data(data)
            else:
                handler.on_stream_data(self, sid, data, end)
        elif kind == 5:
            handler.on_stream_reset(self, ev[2], ev[3])

    def _open_control(self) -> None:
        self._control_open = True
        for frame in self._control_backlog:
            self._native.stream_write(self.handle, CONTROL_STREAM_ID, frame, False)
        self._control_backlog.clear()
        self.endpoint.mark_dirty(self)

    def _release_held(self) -> None:
        held, self._held = self._held, None
        for ev in held or ():
            if self.closed:
                return
            self._event(ev)

    def _terminated(self, reason: str, code: int | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.close_code = code
        self._held = None
        self._resolve_waiters(reason)
        try:
            self.handler.on_closed(self, reason)
        finally:
            self.endpoint.forget(self)

    @property
    def is_established(self) -> bool:
        return self.handshake_complete and not self.closed

    @property
    def state_name(self) -> str:
        if self.closed:
            return "TERMINATED"
        return "CONNECTED" if self.handshake_complete else "HANDSHAKE"

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's leaf certificate (cryptography x509) once it arrived, even when its
        verification failed (client side); None before that. Drivers use it to explain a
        refusal."""
        from cryptography import x509

        der = self.peer_chain[0] if self.peer_chain else None
        if der is None and self.client_tls is not None and self.server_name:
            der = self.client_tls.presented_certificate(self.server_name)
        if der is None:
            return None
        try:
            return x509.load_der_x509_certificate(bytes(der))
        except ValueError:
            return None

    def current_dcid(self) -> bytes:
        """The destination connection ID our packets carry now (b"" before the first one)."""
        if self.closed:
            return b""
        return bytes(self._native.current_dcid(self.handle) or b"")

    def rtt(self) -> float | None:
        if self.closed:
            return None
        value = self._native.rtt(self.handle)
        return float(value) if value is not None else None

    def __repr__(self) -> str:
        return f"<ZtnaConnection {self.label or self.peer_address} {self.state_name}>"


def check_protocol(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)
