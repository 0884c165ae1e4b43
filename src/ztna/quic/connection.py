"""One QUIC connection: aioquic's sans-IO `QuicConnection` plus the guard rails ztna needs.

What this adds on top of aioquic (traps measured in the shared quic-libraries notes):

* **DATAGRAM size is computed from the live connection** (`max_datagram_payload()`) and
  enforced *before* enqueueing: aioquic accepts any size and an oversized frame then blocks
  its whole DATAGRAM queue forever.
* **Bounded DATAGRAM queue gated on the congestion window**: aioquic only writes DATAGRAM
  frames while the congestion window has room, so its pending deque *is* the "waiting for
  cwnd" queue. We bound it (drop-oldest: tunnel traffic is unreliable and the newest packet
  is the most useful) and expose `datagram_budget()` so TCP-in-DATAGRAM can apply
  back-pressure instead of being dropped.
* **Server-side mTLS**: aioquic only requests a client certificate behind a private flag
  and never checks the chain; the endpoint checks it with `ztna.identity` after the
  handshake and closes the connection otherwise.
* **Stream receive back-pressure**: aioquic raises MAX_STREAM_DATA as data *arrives*; we
  raise it as the application *consumes* (`consume_stream()`), so a slow backend slows the
  sender down instead of growing our buffers.
* **The control stream** (docs/protocol.md): the client's first bidirectional stream.

The connection never does I/O; `ztna.quic.endpoint` owns the socket and the timer.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import deque
from typing import TYPE_CHECKING, Any

from aioquic.quic import events
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet_builder import QuicDeliveryState
from aioquic.quic.recovery import K_MICRO_SECOND, K_SECOND, QuicPacketPacer
from aioquic.quic.stream import QuicStream

from ztna import limits
from ztna.errors import DatagramTooLarge, ProtocolError

if TYPE_CHECKING:
    from ztna.identity import Identity
    from ztna.quic.endpoint import QuicEndpoint

CONTROL_STREAM_ID = 0

# Application close codes (docs/protocol.md, "Connection close codes").
CLOSE_NO_ERROR = 0x0
CLOSE_SHUTDOWN = 0x1
CLOSE_AUTH = 0x2
CLOSE_LIMIT = 0x3
CLOSE_PROTOCOL = 0x4

log = logging.getLogger("ztna.quic")
# Per-stream receive window granted beyond what the application consumed.
STREAM_RECEIVE_WINDOW = 1024 * 1024
# Datagrams allowed to wait beyond what the congestion window can take right now, so the
# pipe does not run dry between two flushes.
DATAGRAM_BURST_SLACK = 32


def reset_token(secret: bytes, cid: bytes) -> bytes:
    """Stateless reset token of a connection ID (RFC 9000 §10.3.2: a keyed function of the
    CID), so a restarted server can still reset its predecessor's connections."""
    return hmac.new(secret, cid, hashlib.sha256).digest()[:16]


# Pacing (see ZtnaPacer): rate = PACING_GAIN x cwnd / srtt, and the bucket may hold up to
# PACING_BURST_SECONDS of sending (at most half the window).
PACING_GAIN = 1.25
PACING_BURST_SECONDS = 0.002


class ZtnaPacer(QuicPacketPacer):
    """aioquic's pacer with a gain and a bucket sized for an asyncio loop.

    aioquic paces at exactly cwnd/srtt and lets at most 16 packets (or a quarter of the
    window) go in one burst. Our socket loop waits for the next pacing slot in epoll, whose
    timeout asyncio rounds *up* to whole milliseconds, so every pacing wait costs >= 1 ms
    plus one trip through the timer path (handle_timer, a flush, call_at): a connection
    then moves at most one bucket per millisecond and burns CPU per bucket. Measured with
    bench/datapath.py this, not CPU, capped relay TCP (no process saturated). We pace at
    1.25 x cwnd/srtt (RFC 9002 §7.7: N > 1 so pacing alone never keeps the window from
    filling) and size the bucket for 2 ms of sending (so one wake-up refills what the
    rounding cost), never more than half the window nor less than aioquic's own."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        mds = self._max_datagram_size
        rate = PACING_GAIN * congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        self.packet_time = max(K_MICRO_SECOND, min(mds / rate, K_SECOND))
        aioquic_burst = max(2 * mds, min(congestion_window // 4, 16 * mds))
        burst = max(aioquic_burst, min(congestion_window // 2, rate * PACING_BURST_SECONDS))
        self.bucket_max = burst / rate
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


class ZtnaQuic(QuicConnection):
    """aioquic connection with the behaviours we must change in the library itself."""

    request_client_certificate = False

    def __init__(self, *args: Any, reset_secret: bytes | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss._pacer = ZtnaPacer(max_datagram_size=self._max_datagram_size)
        self.reset_secret = reset_secret
        if reset_secret is not None and not self._is_client:
            for cid in self._host_cids:
                cid.stateless_reset_token = reset_token(reset_secret, cid.cid)

    def _connect(self, now: float) -> None:
        # After a Retry, aioquic starts the handshake again with fresh packet spaces and
        # silently forgets the packets already sent — including 0-RTT packets carrying
        # stream data, which then never arrives (the stream stalls at that offset). Declare
        # those packets lost first, so their stream data is sent again.
        if self._retry_count and getattr(self, "_spaces", None):
            for space in self._loss.spaces:
                for packet in list(space.sent_packets.values()):
                    for handler, args in packet.delivery_handlers:
                        try:
                            handler(QuicDeliveryState.LOST, *args)
                        except Exception:  # a handler of a torn-down crypto stream
                            pass
                space.sent_packets.clear()
        super()._connect(now)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        secret = self.reset_secret
        if secret is not None and not self._is_client:
            for cid in self._host_cids:
                if not cid.was_sent:
                    cid.stateless_reset_token = reset_token(secret, cid.cid)

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client and self.request_client_certificate:
            # aioquic only sends a CertificateRequest behind this "test" flag; the chain
            # itself is verified by ztna.identity once the handshake completes.
            self.tls._request_client_certificate = True

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        consumed = getattr(stream, "ztna_consumed", None)
        if consumed is not None and stream.max_stream_data_local:
            # Credit what the application consumed, not what merely arrived.
            wanted = consumed + STREAM_RECEIVE_WINDOW
            if wanted > stream.max_stream_data_local:
                stream.max_stream_data_local = wanted
            if stream.max_stream_data_local_sent != stream.max_stream_data_local:
                super()._write_stream_limits(builder, space, stream)
            return
        super()._write_stream_limits(builder, space, stream)


class ConnectionHandler:
    """What a program does with a connection's events. Drivers subclass it; every method
    is optional. Methods run inside the endpoint's receive loop: keep them short, queue
    work, never block."""

    def on_handshake(self, conn: ZtnaConnection) -> None: ...

    def on_datagram(self, conn: ZtnaConnection, data: bytes) -> None: ...

    def on_control(self, conn: ZtnaConnection, data: bytes) -> None:
        """Raw bytes read from the control stream (decode with ztna.wire.ControlDecoder)."""

    def on_stream_data(self, conn: ZtnaConnection, stream_id: int, data: bytes, end: bool) -> None: ...

    def on_stream_reset(self, conn: ZtnaConnection, stream_id: int, error_code: int) -> None: ...

    def on_path_changed(self, conn: ZtnaConnection) -> None:
        """Server side: the peer's address changed (NAT rebinding); re-send QAD."""

    def on_closed(self, conn: ZtnaConnection, reason: str) -> None: ...


class ZtnaConnection:
    """A live QUIC connection owned by a `QuicEndpoint`."""

    __slots__ = (
        "quic", "endpoint", "handler", "peer_address", "identity", "handshake_complete",
        "closed", "close_reason", "resumed", "early_data_accepted", "dropped_oldest",
        "oversize_refused", "_pending", "_queue_limit", "_control_open", "_control_backlog",
        "_waiters", "created_at", "label", "user", "_timer_at", "last_received",
        "_payload_key", "_payload_max",
    )

    def __init__(
        self,
        quic: ZtnaQuic,
        endpoint: QuicEndpoint,
        handler: ConnectionHandler,
        peer_address: tuple[Any, ...],
        *,
        now: float,
        queue_limit: int = limits.DATAGRAM_QUEUE_LIMIT,
    ) -> None:
        self.quic = quic
        self.endpoint = endpoint
        self.handler = handler
        self.peer_address = peer_address
        self.identity: Identity | None = None
        self.handshake_complete = False
        self.closed = False
        self.close_reason = ""
        self.resumed = False
        self.early_data_accepted = False
        self.dropped_oldest = 0
        self.oversize_refused = 0
        self._pending: deque[bytes] = quic._datagrams_pending
        self._queue_limit = queue_limit
        # Clients write the control stream at once (in 0-RTT when resuming; data lost to a
        # Retry is re-sent, see ZtnaQuic._connect).
        self._control_open = quic._is_client
        self._control_backlog: list[bytes] = []
        self._waiters: list[Any] = []
        self.created_at = now
        # Loop time of the last datagram from the peer (liveness checks: a client that
        # hears nothing, not even ACKs of its pings, declares the path dead early).
        self.last_received = now
        self.label = ""
        self.user: Any = None  # the driver's per-connection state
        self._timer_at: float | None = None
        self._payload_key: tuple[int, int, int | None] | None = None
        self._payload_max = 0

    # ------------------------------------------------------------------ sizes
    def max_datagram_payload(self) -> int:
        """Largest DATAGRAM payload that fits one packet on this connection right now."""
        quic = self.quic
        # Called for every tunnelled packet (sometimes twice): cached, keyed by the three
        # inputs, which only change on a CID switch or when transport parameters arrive.
        key = (quic._max_datagram_size, len(quic._peer_cid.cid), quic._remote_max_datagram_frame_size)
        if key == self._payload_key:
            return self._payload_max
        size = limits.max_datagram_payload(key[0], key[1])
        remote = key[2]
        if remote is not None:
            # aioquic (every ztna peer) refuses a frame whose size equals the advertised
            # limit, hence the extra byte.
            size = min(size, remote - limits.DATAGRAM_FRAME_OVERHEAD - 1)
        self._payload_key = key
        self._payload_max = size
        return size

    def datagram_budget(self) -> int:
        """How many more DATAGRAMs can be queued without waiting behind a full congestion
        window. Zero means: hold back (back-pressure), don't drop."""
        loss = self.quic._loss
        free = loss.congestion_window - loss.bytes_in_flight
        room = max(0, free) // max(1, self.quic._max_datagram_size) + DATAGRAM_BURST_SLACK
        return max(0, room - len(self._pending))

    # ------------------------------------------------------------------ sending
    def send_datagram(self, data: bytes) -> bool:
        """Queue one DATAGRAM. Raises `DatagramTooLarge` (never enqueued) when it cannot fit.
        Returns False when an older queued DATAGRAM had to be dropped to make room."""
        limit = self.max_datagram_payload()
        if len(data) > limit:
            self.oversize_refused += 1
            self.endpoint.stats.oversize_refused += 1
            raise DatagramTooLarge(len(data), limit)
        if self.closed:
            return False
        pending = self._pending
        dropped = False
        if len(pending) >= self._queue_limit:
            pending.popleft()
            self.dropped_oldest += 1
            self.endpoint.stats.datagrams_dropped_queue += 1
            dropped = True
        pending.append(data)
        self.endpoint.mark_dirty(self)
        return not dropped

    def send_control(self, frame: bytes) -> None:
        """Send an already-encoded control frame (ztna.wire.encode_control) reliably."""
        if self.closed:
            return
        if not self._control_open:
            # A server may only write on stream 0 once the client opened it.
            self._control_backlog.append(frame)
            return
        self.quic.send_stream_data(CONTROL_STREAM_ID, frame)
        self.endpoint.mark_dirty(self)

    def read_control(self, decoder: Any, data: bytes) -> list[Any] | None:
        """Feed control-stream bytes to `decoder` (a `ztna.wire.ControlDecoder`). A corrupt
        control stream cannot be resynchronised: it closes the connection (CLOSE_PROTOCOL),
        logs one line and returns None."""
        try:
            return decoder.feed(data)  # type: ignore[no-any-return]
        except ProtocolError as exc:
            log.warning("%s: corrupt control stream (%s); closing the connection",
                        self.label or self.peer_address[0], exc)
            self.close(CLOSE_PROTOCOL, "bad control stream")
            return None

    def open_stream(self) -> int:
        stream_id = self.quic.get_next_available_stream_id()
        self._stream_for_receive(stream_id)
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, end: bool = False) -> None:
        if self.closed:
            return
        self.quic.send_stream_data(stream_id, data, end_stream=end)
        self.endpoint.mark_dirty(self)

    def stream_send_backlog(self, stream_id: int) -> int:
        """Bytes written to a stream but not yet acknowledged by the peer (back-pressure)."""
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return 0
        sender = stream.sender
        return sender._buffer_stop - sender._buffer_start

    def stream_unacked(self, stream_id: int) -> tuple[int, bytes] | None:
        """(stream offset, bytes) written but not yet acknowledged by the peer, i.e. what a
        resumed stream may have to send again; None if the stream is gone."""
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return None
        sender = stream.sender
        return sender._buffer_start, bytes(sender._buffer)

    def consume_stream(self, stream_id: int, nbytes: int) -> None:
        """The application has taken `nbytes` more from this stream: grant more credit."""
        stream = self.quic._streams.get(stream_id)
        if stream is None:
            return
        before = getattr(stream, "ztna_consumed", 0)
        stream.ztna_consumed = before + nbytes
        # Only bother flushing when the grant moved by a meaningful amount.
        if stream.ztna_consumed + STREAM_RECEIVE_WINDOW - stream.max_stream_data_local > STREAM_RECEIVE_WINDOW // 4:
            self.endpoint.mark_dirty(self)

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        if self.closed:
            return
        try:
            self.quic.reset_stream(stream_id, error_code)
            self.quic.stop_stream(stream_id, error_code)
        except (ValueError, AssertionError):
            pass
        self.endpoint.mark_dirty(self)

    def ping(self) -> None:
        if not self.closed:
            self.quic.send_ping(0)
            self.endpoint.mark_dirty(self)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        if not self.closed:
            self.quic.close(error_code=error_code, reason_phrase=reason)
            self.endpoint.mark_dirty(self)

    # ------------------------------------------------------------------ internals
    def _stream_for_receive(self, stream_id: int) -> None:
        stream = self.quic._get_or_create_stream_for_send(stream_id)
        if stream_id != CONTROL_STREAM_ID:
            stream.ztna_consumed = 0

    def wait_handshake(self) -> Any:
        """Future resolved when the handshake completes (or fails with ConnectionError)."""
        fut = self.endpoint.loop.create_future()
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

    def process_events(self) -> None:
        """Drain aioquic's events and hand them to the handler."""
        quic = self.quic
        handler = self.handler
        while True:
            event = quic.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is events.DatagramFrameReceived:
                handler.on_datagram(self, event.data)
            elif kind is events.StreamDataReceived:
                sid = event.stream_id
                if sid == CONTROL_STREAM_ID:
                    if not self._control_open:
                        self._control_open = True
                        for frame in self._control_backlog:
                            quic.send_stream_data(CONTROL_STREAM_ID, frame)
                        self._control_backlog.clear()
                        self.endpoint.mark_dirty(self)
                    if event.data:
                        handler.on_control(self, event.data)
                else:
                    stream = quic._streams.get(sid)
                    if stream is not None and not hasattr(stream, "ztna_consumed"):
                        stream.ztna_consumed = 0
                    handler.on_stream_data(self, sid, event.data, event.end_stream)
            elif kind is events.HandshakeCompleted:
                self.resumed = event.session_resumed
                self.early_data_accepted = event.early_data_accepted
                if quic._is_client and not self._control_open:
                    self._control_open = True
                    for frame in self._control_backlog:
                        quic.send_stream_data(CONTROL_STREAM_ID, frame)
                    self._control_backlog.clear()
                    self.endpoint.mark_dirty(self)
                if self.endpoint.on_handshake_completed(self):
                    self.handshake_complete = True
                    self._resolve_waiters(None)
                    handler.on_handshake(self)
            elif kind is events.StreamReset:
                handler.on_stream_reset(self, event.stream_id, event.error_code)
            elif kind is events.ConnectionIdIssued:
                self.endpoint.route_cid(event.connection_id, self)
            elif kind is events.ConnectionIdRetired:
                self.endpoint.unroute_cid(event.connection_id, self)
            elif kind is events.ConnectionTerminated:
                self._terminated(event.reason_phrase or f"error 0x{event.error_code:x}")

    def _terminated(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
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
        state = self.quic._state
        return state.name if isinstance(state, QuicConnectionState) else str(state)

    @property
    def peer_certificate(self) -> Any:
        """The peer's leaf certificate (cryptography x509) once it arrived, even when its
        verification failed; None before that. Drivers use it to explain a refusal."""
        tls = getattr(self.quic, "tls", None)
        return getattr(tls, "_peer_certificate", None) if tls is not None else None

    def rtt(self) -> float | None:
        loss = self.quic._loss
        return loss._rtt_smoothed if loss._rtt_initialized else None

    def __repr__(self) -> str:
        return f"<ZtnaConnection {self.label or self.peer_address} {self.state_name}>"


def check_protocol(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)
