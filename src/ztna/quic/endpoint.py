"""One UDP socket, many QUIC connections: the socket loop of every ztna program.

Theory of operation
-------------------
* The packets are native: `ztna._native.Endpoint` (quinn-proto, quinn-udp, rustls) owns a
  duplicate of the socket. When the socket is readable asyncio calls us once; the native side
  reads a whole batch (recvmmsg, GRO), runs every connection it touched, sends what they
  produced (GSO) and returns the batch's events as one list. Python runs once per batch,
  never once per packet in the QUIC machinery.
* Work that starts elsewhere queues into a connection and calls `mark_dirty(conn)`; one
  native `drive()` then runs at the end of the current loop iteration (`call_soon`), so a
  burst of writes becomes one flush. The native pumps (a TUN read, a UDP flow's backend
  replies) call `flush()` instead: their batch is whole already, and waiting one more pass
  of the loop would add a wake-up to every request/response round trip.
* A wake-up whose native call returns no events (everything was relayed, tapped or pumped
  natively) runs no Python beyond re-checking the timer, and the one connection timer is
  re-armed only when the native deadline moves earlier: an early firing only re-arms.
* With `thread=True` (the Intermediate, the Connector's relay link, the Agent's link, both
  P2P sockets) a native thread owns the socket's reads, the connection timers, the spliced
  sockets and the pumps' sources (the Connector's UDP-flow backends): what the relay
  routes, taps, splices and stream pairs carry never waits for this loop. The loop watches
  only a notify descriptor (a batch left events: `_on_notify`), and after queueing work it
  calls `native.rearm()` instead of arming a timer; the thread runs no batch between our
  taking events and that call, so our answer to an event applies from the next packet on. Off unless `ZTNA_ENDPOINT_THREAD=1`.
* Routing by connection ID, Retry tokens, NEW_TOKEN address tokens, stateless resets (keyed by
  a stable secret, so a restarted server resets its predecessor's connections at once) and
  version negotiation are quinn's. Admission is ours: every new connection attempt is an
  event, and `_on_incoming` answers accept / Retry / refuse / ignore (limits, per-source rate).
* First byte below 0x40 is not QUIC (QUIC always sets the fixed bit; RFC 9443): such datagrams
  go to `raw_handler` (P2P probes share the socket) or are counted and dropped.
* Splices (`splice_socket`, `splice_streams`): once Python has decided about a stream (its
  header, authorization, the backend connected), the native side joins it to a kernel TCP
  socket or to another stream of this endpoint and moves every byte, FIN and reset itself,
  with QUIC flow control as the back-pressure. The spliced sockets sit in a native epoll set
  whose descriptor is in the asyncio loop once (or in the driver thread's epoll set, when
  one runs); one `pump()` per readiness batch serves them all. A splice's end is one event
  with its byte counts, delivered to the callback given.
* Nothing a peer sends and no socket error ends the loop: every failure is counted in `stats`,
  a native panic aborts at most the connection it happened in (counted, one log line), and the
  endpoint goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ztna import _native, limits
from ztna.observe import format_address
from ztna.quic.admission import AdmissionPolicy, Reason, SourceRateLimiter, Verdict
from ztna.quic.config import QuicConfiguration

# The close codes are re-exported for the drivers (`X as X` marks a re-export).
from ztna.quic.connection import CLOSE_AUTH as CLOSE_AUTH
from ztna.quic.connection import CLOSE_LIMIT as CLOSE_LIMIT
from ztna.quic.connection import CLOSE_NO_ERROR as CLOSE_NO_ERROR
from ztna.quic.connection import CLOSE_PROTOCOL as CLOSE_PROTOCOL
from ztna.quic.connection import CLOSE_SHUTDOWN as CLOSE_SHUTDOWN
from ztna.quic.connection import ConnectionHandler, ZtnaConnection

if TYPE_CHECKING:
    from ztna._native import Event
    from ztna.identity import ChainVerifier, Identity
    from ztna.quic.tickets import ServerTicketStore
    from ztna.quic.tokens import AddressTokens

log = logging.getLogger("ztna.quic")

# Native event kinds (native/src/py.rs, Endpoint.events).
EV_INCOMING, EV_HANDSHAKE_DATA, EV_CONNECTED, EV_DATAGRAMS, EV_STREAM, EV_RESET, EV_CLOSED, \
    EV_PATH, EV_RAW, EV_SPLICED = range(10)

# Called once when a splice ends: (how: a SPLICE_* code, error code, bytes sent into the
# stream, bytes received from it).
SpliceEnd = Callable[[int, int, int, int], None]

# Counters the native endpoint keeps, copied into EndpointStats on every read.
_NATIVE_COUNTERS = (
    "datagrams_received", "bytes_received", "datagrams_sent", "bytes_sent", "retry_sent",
    "stateless_resets_received", "socket_send_errors", "socket_recv_errors", "panics",
    "endpoint_responses", "accept_errors", "malformed", "unknown_cid", "oversize_refused",
    "datagrams_dropped_queue",
    "stateless_resets_sent", "version_negotiations",
    "relay_forwarded", "relay_bytes", "relay_dropped_oversize", "relay_dropped_no_target",
)


@dataclass
class EndpointStats:
    """Counters read by the metrics exporters (no per-packet Prometheus calls)."""

    datagrams_received: int = 0
    datagrams_sent: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    malformed: int = 0
    non_quic: int = 0
    unknown_cid: int = 0
    handshakes_started: int = 0
    handshakes_rate_limited: int = 0
    connections_refused_limit: int = 0
    retry_sent: int = 0
    retry_validated: int = 0
    retry_failures: int = 0
    address_tokens_validated: int = 0
    address_tokens_invalid: int = 0
    auth_failures: int = 0
    connection_errors: int = 0
    handler_errors: int = 0
    socket_send_errors: int = 0
    socket_recv_errors: int = 0
    oversize_refused: int = 0
    datagrams_dropped_queue: int = 0
    version_negotiations: int = 0
    stateless_resets_sent: int = 0
    stateless_resets_received: int = 0
    endpoint_responses: int = 0
    accept_errors: int = 0
    panics: int = 0
    # Relayed natively through routes the Intermediate installed (never seen by Python).
    relay_forwarded: int = 0
    relay_bytes: int = 0
    relay_dropped_oversize: int = 0
    relay_dropped_no_target: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ServerOptions:
    configuration: QuicConfiguration
    handler_factory: Callable[[], ConnectionHandler]
    verifier: ChainVerifier | None = None   # None = no client certificates
    retry: bool = True
    max_connections: int = limits.MAX_CONNECTIONS
    handshakes_per_source_per_second: float = limits.HANDSHAKES_PER_SOURCE_PER_SECOND
    ticket_store: ServerTicketStore | None = None   # None: no resumption
    address_tokens: AddressTokens | None = None     # its key keys Retry/NEW_TOKEN
    reset_secret: bytes | None = None  # keys stateless-reset tokens; stable across restarts
    rate_buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    # Asked for every verified client before any of its data is used: None admits it, a
    # string refuses it with that close reason (a revoked certificate or identity).
    admit: Callable[[Identity], str | None] | None = None
    _tls: _native.ServerTls | None = None   # built from the above (shared)

    def admission(self) -> AdmissionPolicy:
        """The admission policy of these options as they are now; the rate buckets are
        shared by every endpoint using them."""
        limiter = SourceRateLimiter(self.handshakes_per_source_per_second, buckets=self.rate_buckets)
        return AdmissionPolicy(retry=self.retry, max_connections=self.max_connections,
                               limiter=limiter)

    def reload_tls(self) -> None:
        """Build the native TLS again from `configuration` (new certificate files)."""
        self._tls = None
        self.native_tls()

    def native_tls(self) -> _native.ServerTls:
        if self._tls is None:
            key = getattr(self.address_tokens, "key", None) or os.urandom(32)
            self._tls = self.configuration.server_tls(
                token_key=key, tickets=self.ticket_store,
                request_client_cert=self.verifier is not None,
            )
        return self._tls


class QuicEndpoint:
    """Owns one UDP socket and every QUIC connection on it (client or server side)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        server: ServerOptions | None = None,
        raw_handler: Callable[[bytes, tuple[Any, ...], float], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        retain_streams: bool = False,
        udp_payload: int | None = None,
        thread: bool = False,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.family = sock.family
        self.loop = loop or asyncio.get_running_loop()
        self.server = server
        self.raw_handler = raw_handler
        self.retain_streams = retain_streams
        self._stats = EndpointStats()
        self.connections: set[ZtnaConnection] = set()
        self._by_handle: dict[int, ZtnaConnection] = {}
        if udp_payload is None:
            udp_payload = server.configuration.udp_payload if server else limits.DEFAULT_QUIC_UDP_PAYLOAD
        reset_key = (server.reset_secret if server and server.reset_secret else None) or os.urandom(32)
        self.native = _native.Endpoint(
            sock.fileno(), self.loop.time(), reset_key=reset_key,
            server=server.native_tls() if server else None,
            udp_payload=udp_payload, recv_batch=limits.RECV_BATCH,
        )
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False
        self._splice_fd: int | None = None
        # (splice id, handle, stream id) -> what to call when that splice ends
        self._splices: dict[tuple[int, int, int], SpliceEnd] = {}
        # With a driver thread the socket and the timers are native; the loop watches only
        # the descriptor that says a batch left events.
        self._notify_fd: int | None = None
        if thread and thread_enabled():
            self._notify_fd = self.native.start_thread()
            self.loop.add_reader(self._notify_fd, self._on_notify)
        else:
            self.loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ public API
    @property
    def stats(self) -> EndpointStats:
        native = self.native.stats()
        s = self._stats
        for name in _NATIVE_COUNTERS:
            if name in native:
                setattr(s, name, int(native[name]))
        return s

    @property
    def local_address(self) -> tuple[Any, ...]:
        address: tuple[Any, ...] = self.sock.getsockname()
        return address

    def connect(
        self,
        address: tuple[Any, ...],
        configuration: QuicConfiguration,
        handler: ConnectionHandler,
    ) -> ZtnaConnection:
        """Start a client connection; await `conn.wait_handshake()` for the result. The
        control stream is writable at once (0-RTT when the native TLS holds a ticket for this
        server; `conn.zero_rtt_attempted` says so). Tickets and address tokens live in the
        native client configuration (one per identity and process)."""
        host, port = normalize_address(address)
        now = self.loop.time()
        server_name = configuration.server_name or host
        client_tls = configuration.client_tls()
        handle, zero_rtt = self.native.connect(client_tls, host, int(port), server_name, now)
        conn = ZtnaConnection(self, handle, handler, (host, int(port)), now=now, is_client=True,
                              retain_streams=self.retain_streams)
        conn.zero_rtt_attempted = bool(zero_rtt)
        conn.server_name = server_name
        conn.client_tls = client_tls
        configuration.session_ticket = True if zero_rtt else None
        self._add(conn)
        self._stats.handshakes_started += 1
        self.mark_dirty(conn)
        return conn

    def blackhole(self, on: bool = True) -> None:
        """Fault injection: send nothing and discard what arrives (the path goes silent)."""
        self.native.set_blackhole(on)

    def server_config_changed(self) -> None:
        """New connections use the server options' current TLS; live ones keep theirs."""
        if self.server is not None:
            self.native.set_server_config(self.server.native_tls())

    def send_raw(self, data: bytes, address: tuple[Any, ...]) -> bool:
        host, port = normalize_address(address)
        try:
            return bool(self.native.send_raw(data, host, int(port)))
        except ValueError:
            self._stats.socket_send_errors += 1
            return False

    def mark_dirty(self, conn: ZtnaConnection | None = None) -> None:
        if not self._flush_scheduled and not self._closed:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    # ------------------------------------------------------------------ splices
    def _splice_reader(self) -> None:
        if self._splice_fd is None:
            self._splice_fd = self.native.splice_fd()
            if self._notify_fd is None:
                # With a driver thread the spliced sockets are in its epoll set instead.
                self.loop.add_reader(self._splice_fd, self._on_splice_ready)

    def splice_socket(self, conn: ZtnaConnection, sid: int, sock: socket.socket, on_end: SpliceEnd, *,
                      down: bytes = b"", down_fin: bool = False, up: bytes = b"") -> int:
        """Join stream `sid` of `conn` to the connected TCP socket `sock` natively, both ways.
        The caller must not read or write `sock` any more (pause its transport) and keeps it
        open until `on_end` runs; then it closes it (or aborts it, when `how` is not
        SPLICE_DONE). `down`/`down_fin`: stream bytes (FIN) already handed to the caller
        and not consumed, written to the socket first; `up`: socket bytes the caller read.
        Raises ValueError if the connection is gone."""
        self._splice_reader()
        splice_id = self.native.splice(conn.handle, sid, sock.fileno(), down, down_fin, up)
        self._splices[(splice_id, conn.handle, sid)] = on_end
        self.mark_dirty(conn)
        return splice_id

    def unsplice(self, conn: ZtnaConnection, sid: int) -> tuple[int, int] | None:
        """End a socket splice without its callback: (sent, received) so far."""
        counts = self.native.unsplice(conn.handle, sid)
        for key in [k for k in self._splices if k[1] == conn.handle and k[2] == sid]:
            del self._splices[key]
        return counts

    def splice_streams(self, a: ZtnaConnection, sid_a: int, b: ZtnaConnection, sid_b: int,
                       on_end: SpliceEnd) -> bool:
        """Join two streams of this endpoint natively, both ways. `on_end` runs once, when
        both legs are over, with the first stream's counts (sent = into `sid_a`, received =
        out of it; the second leg's are the same, mirrored). False if either connection is
        not live."""
        splice_id = self.native.splice_streams(a.handle, sid_a, b.handle, sid_b)
        if splice_id is None:
            return False
        self._splices[(splice_id, a.handle, sid_a)] = on_end
        self._splices[(splice_id, b.handle, sid_b)] = lambda how, code, sent, received: None
        self.mark_dirty(a)
        return True

    def _on_splice_ready(self) -> None:
        if self._closed:
            return
        events = self.native.pump(self.loop.time())
        if events or self.native.busy():
            self._dispatch(events)
            self._flush()
        else:
            self._arm_timer()

    def _spliced(self, ev: Event) -> None:
        _, handle, sid, splice_id, sent, received, how, code = ev
        on_end = self._splices.pop((splice_id, handle, sid), None)
        if on_end is not None:
            on_end(how, code, sent, received)

    def forget(self, conn: ZtnaConnection) -> None:
        self.connections.discard(conn)
        if self._by_handle.get(conn.handle) is conn:
            del self._by_handle[conn.handle]

    def close(self, *, error_code: int = CLOSE_SHUTDOWN, reason: str = "shutting down") -> None:
        for conn in list(self.connections):
            conn.close(error_code, reason)
        self._flush()

    def shutdown_socket(self) -> None:
        """Stop reading and release the socket (after `close()` and a short drain)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.loop.remove_reader(self._notify_fd if self._notify_fd is not None else self.sock.fileno())
        except (ValueError, OSError):
            pass
        if self._timer:
            self._timer.cancel()
        if self._splice_fd is not None:
            try:
                self.loop.remove_reader(self._splice_fd)
            except (ValueError, OSError):
                pass
            self._splice_fd = None
        self.native.shutdown()
        self.sock.close()

    # ------------------------------------------------------------------ loop
    def _on_readable(self) -> None:
        if self._closed:
            return
        events = self.native.recv(self.loop.time())
        if events or self.native.busy():
            self._dispatch(events)
            self._flush()
        else:
            # The batch was processed and sent natively (relayed, tapped, pumped) and no
            # handler ran, so nothing new is queued: another drive would find nothing.
            self._arm_timer()

    def _on_notify(self) -> None:
        if self._closed:
            return
        self._dispatch(self.native.notified(self.loop.time()))
        self._flush()

    @property
    def threaded(self) -> bool:
        """True while a native thread reads the socket and runs the timers."""
        return self._notify_fd is not None and not self._closed

    def flush(self) -> None:
        """Run what connections queued now (instead of at the end of the loop iteration)."""
        self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        # Handlers may queue more work while we dispatch: a few rounds settle it.
        for _ in range(4):
            events = self.native.drive(self.loop.time())
            if not events:
                break
            self._dispatch(events)
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._notify_fd is not None:
            # The driver thread sleeps towards the native deadline; it is woken only when
            # what we just did moved that deadline earlier.
            self.native.rearm()
            return
        deadline = self.native.next_timeout()
        at = self._timer_at
        if self._timer is not None and at is not None and (deadline is None or at <= deadline):
            # The armed timer fires no later than needed. Nearly every packet moves the
            # deadline (ACK delay, loss detection, idle) a little later; re-arming for each
            # cost a cancel and a new heap entry per packet. Firing early is harmless: the
            # native side runs only the timers that are due, and we arm again from there.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        self._dispatch(self.native.timeout(self.loop.time()))
        self._flush()

    def _dispatch(self, events: list[Event]) -> None:
        now = self.loop.time()
        by_handle = self._by_handle
        for ev in events:
            kind = ev[0]
            try:
                if kind == EV_RAW:
                    self._raw(ev[1], ev[2], now)
                    continue
                if kind == EV_INCOMING:
                    self._on_incoming(ev[1], ev[2], ev[3], ev[4], now)
                    continue
                if kind == EV_SPLICED:
                    self._spliced(ev)
                    continue
                conn = by_handle.get(ev[1])
                if conn is None:
                    continue
                if kind in (EV_DATAGRAMS, EV_STREAM, EV_RESET):
                    conn._event(ev)
                elif kind == EV_CONNECTED:
                    self._on_connected(conn, ev[2], ev[3])
                elif kind == EV_HANDSHAKE_DATA:
                    conn.server_name = ev[3]
                    if ev[2] is not None and not conn.is_client:
                        # A resumed session: the chain bound to its ticket is known now, so
                        # its early data is authorized without waiting for the handshake.
                        conn.resumed = True
                        self._authorize(conn, ev[2])
                elif kind == EV_CLOSED:
                    conn._terminated(ev[2], ev[3])
                elif kind == EV_PATH:
                    conn.peer_address = ev[2]
                    conn.handler.on_path_changed(conn)
            except Exception:
                self._stats.handler_errors += 1
                log.exception("handler failed on event %d", kind)

    def _raw(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        if self.raw_handler is None:
            self._stats.non_quic += 1
            return
        try:
            self.raw_handler(data, addr, now)
        except Exception:  # a handler bug must not stop the socket loop
            self._stats.handler_errors += 1
            log.exception("raw datagram handler failed")

    # ------------------------------------------------------------------ server side
    def _on_incoming(self, incoming: int, addr: tuple[str, int], validated: bool, may_retry: bool,
                     now: float) -> None:
        server = self.server
        native = self.native
        if server is None:
            native.ignore(incoming)
            return
        stats = self._stats
        decision = server.admission().decide(source=addr[0], validated=validated,
                                             may_retry=may_retry,
                                             open_connections=len(self.connections), now=now)
        verdict, validation = decision.verdict, decision.validation
        if verdict is Verdict.REFUSE:
            stats.connections_refused_limit += 1
            native.refuse(incoming)
            return
        if verdict is Verdict.RETRY:
            native.retry(incoming)                    # stateless: costs us no state
            return
        if validation is Reason.TOKEN_VALIDATED:
            stats.address_tokens_validated += 1       # a returning client: no Retry round trip
        elif validation is Reason.RETRY_VALIDATED:
            stats.retry_validated += 1
        if verdict is Verdict.IGNORE:
            stats.handshakes_rate_limited += 1
            native.ignore(incoming)
            return
        try:
            handler = server.handler_factory()
        except Exception:
            stats.handler_errors += 1
            log.exception("handler factory failed")
            native.refuse(incoming)
            return
        handle = native.accept(incoming, now)
        if handle is None:
            stats.connection_errors += 1
            return
        conn = ZtnaConnection(self, handle, handler, addr, now=now, is_client=False,
                              retain_streams=self.retain_streams)
        if server.verifier is None:
            conn._authorized = True
            conn._held = None
        self._add(conn)
        stats.handshakes_started += 1

    def _authorize(self, conn: ZtnaConnection, chain: list[bytes] | None) -> bool:
        """Check the client's certificate chain (server side). False = connection closed."""
        if conn._authorized:
            return True
        server = self.server
        if server is None or server.verifier is None:
            conn._authorized = True
            conn._release_held()
            return True
        from ztna.identity import CertificateRejected

        if not chain:
            self._stats.auth_failures += 1
            log.warning("refusing %s: no client certificate", format_address(conn.peer_address))
            conn.close(CLOSE_AUTH, "no client certificate")
            return False
        try:
            from cryptography import x509

            certs = [x509.load_der_x509_certificate(bytes(der)) for der in chain]
            conn.identity = server.verifier.verify_client(
                certs[0], certs[1:], now=datetime.now(UTC),
            )
        except ValueError:
            self._stats.auth_failures += 1
            log.warning("refusing %s: unreadable client certificate", format_address(conn.peer_address))
            conn.close(CLOSE_AUTH, "unreadable client certificate")
            return False
        except CertificateRejected as exc:
            self._stats.auth_failures += 1
            log.warning("refusing %s: %s", format_address(conn.peer_address), exc.reason)
            conn.close(CLOSE_AUTH, exc.reason)
            return False
        refusal = server.admit(conn.identity) if server.admit is not None else None
        if refusal is not None:
            self._stats.auth_failures += 1
            log.warning("refusing %s (%s): %s", format_address(conn.peer_address),
                        conn.identity.common_name, refusal)
            conn.close(CLOSE_AUTH, refusal)
            return False
        conn._authorized = True
        conn._release_held()
        return True

    def _on_connected(self, conn: ZtnaConnection, chain: list[bytes] | None, zero_rtt: bool) -> None:
        conn.early_data_accepted = bool(zero_rtt)
        if chain:
            conn.peer_chain = [bytes(c) for c in chain]
        if conn.is_client:
            conn.resumed = bool(zero_rtt) or conn.resumed
            if not conn._control_open:
                conn._open_control()
        elif not self._authorize(conn, chain):
            return
        conn.handshake_complete = True
        conn._resolve_waiters(None)
        conn.handler.on_handshake(conn)

    # ------------------------------------------------------------------ helpers
    def _add(self, conn: ZtnaConnection) -> None:
        self.connections.add(conn)
        self._by_handle[conn.handle] = conn


def thread_enabled() -> bool:
    """Whether endpoints that ask for a native driver thread get one: only with
    ZTNA_ENDPOINT_THREAD=1 for now (a stream across the cluster mesh still stalls now and
    then on the thread), otherwise every endpoint stays on the asyncio driver."""
    return os.environ.get("ZTNA_ENDPOINT_THREAD", "0") == "1"


def bind_udp(host: str, port: int, *, dual_stack: bool = True) -> socket.socket:
    """A UDP socket for an endpoint: `::` is dual-stack (IPv4 and IPv6 on one socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    size_buffers(sock, limits.UDP_SOCKET_BUFFER)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# Linux's privileged variants, which ignore net.core.rmem_max / wmem_max (Python's socket
# module does not name them).
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform == "linux" else {}
_small_buffers_logged = False


def size_buffers(sock: socket.socket, size: int) -> None:
    """Ask for `size` bytes of receive and send buffer (forced past the kernel's cap when
    we may); one log line per process when the kernel grants less."""
    global _small_buffers_logged
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        for name in (_FORCE.get(opt), opt):
            if name is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, name, size)
                break
            except OSError:
                continue
        # Linux reports twice what it accounts for payload (the rest is bookkeeping).
        granted = sock.getsockopt(socket.SOL_SOCKET, opt) // (2 if sys.platform == "linux" else 1)
        if granted < size and not _small_buffers_logged:
            _small_buffers_logged = True
            log.info("UDP socket buffers are %d KiB, not %d KiB (raise net.core.rmem_max and "
                     "wmem_max, or run as root): bursts beyond that are dropped", granted // 1024,
                     size // 1024)


def normalize_address(address: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) with an IPv4-mapped IPv6 host reported as IPv4."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, address[1]


