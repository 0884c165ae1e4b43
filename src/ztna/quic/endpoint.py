"""One UDP socket, many QUIC connections: the canonical socket loop of every ztna program.

Theory of operation
-------------------
* The socket is non-blocking and registered with `loop.add_reader`. When it is readable we
  read a **batch** (up to `limits.RECV_BATCH` datagrams), feed each to its connection, let
  the handlers react, and only then **flush once**: every connection touched in the batch
  is asked for its outgoing packets. The library's own asyncio protocol flushes after every
  datagram, which measured 2.5–4× slower.
* Work that starts elsewhere (a TUN read, a backend socket) calls `mark_dirty(conn)`; the
  flush then runs once at the end of the current loop iteration (`call_soon`), so a burst
  of packets from a TUN read becomes one flush too.
* Routing is by destination connection ID. Every CID a connection issues is routed
  (`ConnectionIdIssued`/`Retired`), and the client's original DCID stays routed until the
  connection ends, so a retransmitted Initial never creates a second connection (defect 30).
* First byte below 0x40 is not QUIC (QUIC always sets the fixed bit; RFC 9443): such
  datagrams go to `raw_handler` (P2P probes) or are counted and dropped.
* Nothing a peer sends and no socket error ends the loop (defect 32): every failure is
  counted in `stats` and the loop goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import (
    QuicPacketType,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.retry import QuicRetryTokenHandler

from ztna.observe import format_address
from ztna import limits
from ztna.quic.connection import (  # noqa: F401 - close codes re-exported for the drivers
    CLOSE_AUTH,
    CLOSE_LIMIT,
    CLOSE_NO_ERROR,
    CLOSE_PROTOCOL,
    CLOSE_SHUTDOWN,
    ConnectionHandler,
    ZtnaConnection,
    ZtnaQuic,
)
from ztna.quic.tokens import MARKER as ADDRESS_TOKEN_MARKER

log = logging.getLogger("ztna.quic")


_CID_LEN = limits.CONNECTION_ID_LENGTH
RETRY_TOKEN_MARKER = b"R"


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

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ServerOptions:
    configuration: QuicConfiguration
    handler_factory: Callable[[], ConnectionHandler]
    verifier: Any = None            # ztna.identity.ChainVerifier, or None = no client certs
    retry: bool = True
    max_connections: int = limits.MAX_CONNECTIONS
    handshakes_per_source_per_second: float = limits.HANDSHAKES_PER_SOURCE_PER_SECOND
    ticket_store: Any = None        # ztna.quic.tickets.ServerTicketStore or None (no resumption)
    address_tokens: Any = None      # ztna.quic.tokens.AddressTokens: lets returning clients skip Retry
    reset_secret: bytes | None = None  # keys stateless-reset tokens; stable across restarts
    connection_factory: Callable[..., ZtnaQuic] = ZtnaQuic
    rate_buckets: dict[str, tuple[float, float]] = field(default_factory=dict)


class QuicEndpoint:
    """Owns one UDP socket and every QUIC connection on it (client or server side)."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        server: ServerOptions | None = None,
        raw_handler: Callable[[bytes, tuple[Any, ...], float], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.family = sock.family
        self.loop = loop or asyncio.get_running_loop()
        self.server = server
        self.raw_handler = raw_handler
        self.stats = EndpointStats()
        self.connections: set[ZtnaConnection] = set()
        self._cids: dict[bytes, ZtnaConnection] = {}
        self._conn_cids: dict[ZtnaConnection, set[bytes]] = {}
        self._dirty: set[ZtnaConnection] = set()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._retry = QuicRetryTokenHandler() if server and server.retry else None
        self._closed = False
        self._reset_budget = (100.0, 0.0)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    # ------------------------------------------------------------------ public API
    @property
    def local_address(self) -> tuple[Any, ...]:
        return self.sock.getsockname()

    def connect(
        self,
        address: tuple[Any, ...],
        configuration: QuicConfiguration,
        handler: ConnectionHandler,
        *,
        session_ticket_handler: Callable[[Any], None] | None = None,
        no_retry: bool = False,
    ) -> ZtnaConnection:
        """Start a client connection; await `conn.wait_handshake()` for the result.
        `no_retry`: the server never sends Retry (the Connector's P2P server), so control
        frames may go in 0-RTT even without an address token."""
        address = self._sendable(address)
        now = self.loop.time()
        quic = ZtnaQuic(configuration=configuration, session_ticket_handler=session_ticket_handler)
        conn = ZtnaConnection(quic, self, handler, address, now=now)
        if no_retry:
            conn._control_open = True
        quic.connect(address, now=now)
        self._add(conn, [quic.host_cid])
        # Client CIDs the library issues later arrive as events; the first ones are
        # already in its table.
        for cid in quic._host_cids:
            self.route_cid(cid.cid, conn)
        self.stats.handshakes_started += 1
        self.mark_dirty(conn)
        return conn

    def send_raw(self, data: bytes, address: tuple[Any, ...]) -> bool:
        try:
            self.sock.sendto(data, self._sendable(address))
            return True
        except OSError:
            self.stats.socket_send_errors += 1
            return False

    def mark_dirty(self, conn: ZtnaConnection) -> None:
        self._dirty.add(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def route_cid(self, cid: bytes, conn: ZtnaConnection) -> None:
        self._cids[cid] = conn
        self._conn_cids.setdefault(conn, set()).add(cid)

    def unroute_cid(self, cid: bytes, conn: ZtnaConnection) -> None:
        if self._cids.get(cid) is conn:
            del self._cids[cid]
        self._conn_cids.get(conn, set()).discard(cid)

    def forget(self, conn: ZtnaConnection) -> None:
        for cid in self._conn_cids.pop(conn, ()):
            if self._cids.get(cid) is conn:
                del self._cids[cid]
        self.connections.discard(conn)

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
            self.loop.remove_reader(self.sock.fileno())
        except (ValueError, OSError):
            pass
        if self._timer:
            self._timer.cancel()
        self.sock.close()

    # ------------------------------------------------------------------ receive
    def _on_readable(self) -> None:
        sock = self.sock
        now = self.loop.time()
        stats = self.stats
        for _ in range(limits.RECV_BATCH):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                # ICMP errors surface here on Linux (ECONNREFUSED ...): count, go on.
                stats.socket_recv_errors += 1
                continue
            stats.datagrams_received += 1
            stats.bytes_received += len(data)
            self._datagram_received(data, addr, now)
        self._flush()

    def _datagram_received(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        if not data:
            self.stats.malformed += 1
            return
        first = data[0]
        if first < 0x40:
            if self.raw_handler is not None:
                try:
                    self.raw_handler(data, addr, now)
                except Exception:  # a handler bug must not stop the socket loop
                    self.stats.handler_errors += 1
                    log.exception("raw datagram handler failed")
            else:
                self.stats.non_quic += 1
            return
        if first & 0x80 == 0:
            conn = self._cids.get(data[1 : 1 + _CID_LEN])
            if conn is None:
                self.stats.unknown_cid += 1
                self._unknown_short_packet(data, addr, now)
                return
        else:
            try:
                header = pull_quic_header(Buffer(data=data), host_cid_length=_CID_LEN)
            except Exception:
                self.stats.malformed += 1
                return
            conn = self._cids.get(header.destination_cid)
            if conn is None:
                if self.server is None or header.packet_type != QuicPacketType.INITIAL:
                    self.stats.unknown_cid += 1
                    return
                conn = self._accept(header, data, addr, now)
                if conn is None:
                    return
        self._feed(conn, data, addr, now)

    def _feed(self, conn: ZtnaConnection, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        quic = conn.quic
        conn.last_received = now
        try:
            quic.receive_datagram(data, addr, now)
        except Exception:
            self.stats.connection_errors += 1
            log.exception("connection %r failed on receive; closing it", conn)
            self._abort(conn, "internal error on receive")
            return
        if not quic._is_client and quic._network_paths:
            active = quic._network_paths[0].addr
            if active != conn.peer_address:
                conn.peer_address = active
                self._safe(conn.handler.on_path_changed, conn)
        try:
            conn.process_events()
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler for %r failed", conn)
        self._dirty.add(conn)

    # ------------------------------------------------------------------ stateless reset
    def _unknown_short_packet(self, data: bytes, addr: tuple[Any, ...], now: float) -> None:
        """A short-header packet for no connection we know: either a Stateless Reset for
        one of our client connections (its last 16 bytes are the token the server gave
        us; aioquic does not check these itself), or — on a server — a packet for a
        connection a previous process of ours had: answer with a Stateless Reset so the
        client reconnects now instead of after its idle timeout."""
        if len(data) >= 21:
            tail = data[-16:]
            for conn in list(self.connections):
                quic = conn.quic
                if not quic._is_client:
                    continue
                tokens = [quic._peer_cid.stateless_reset_token]
                tokens += [c.stateless_reset_token for c in quic._peer_cid_available]
                if tail in tokens:
                    self.stats.stateless_resets_received += 1
                    log.info("stateless reset from %s: the peer lost our connection", format_address(addr))
                    self._abort(conn, "stateless reset (peer restarted)")
                    return
        server = self.server
        if server is None or server.reset_secret is None or len(data) < 1 + _CID_LEN + 18:
            return
        budget, last = self._reset_budget
        budget = min(100.0, budget + (now - last) * 100.0)  # at most ~100 resets per second
        if budget < 1.0:
            self._reset_budget = (budget, now)
            return
        self._reset_budget = (budget - 1.0, now)
        from ztna.quic.connection import reset_token

        token = reset_token(server.reset_secret, data[1 : 1 + _CID_LEN])
        # Shorter than the packet that triggered it (no reset loops, RFC 9000 §10.3.3).
        size = len(data) - 1
        filler = os.urandom(size - 16)
        packet = bytes([0x40 | (filler[0] & 0x3F)]) + filler[1:] + token
        self.stats.stateless_resets_sent += 1
        self.send_raw(packet, addr)

    # ------------------------------------------------------------------ server side
    def _accept(self, header: Any, data: bytes, addr: tuple[Any, ...], now: float) -> ZtnaConnection | None:
        server = self.server
        assert server is not None
        stats = self.stats
        if len(data) < 1200:
            stats.malformed += 1  # RFC 9000 §14.1: client Initials are padded to 1200
            return None
        config = server.configuration
        if header.version not in config.supported_versions:
            stats.version_negotiations += 1
            self.send_raw(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=config.supported_versions,
                ),
                addr,
            )
            return None
        if len(self.connections) >= server.max_connections:
            stats.connections_refused_limit += 1
            return None
        original_dcid = header.destination_cid
        retry_scid = None
        token = header.token
        address_token = bool(token) and token[0] == ADDRESS_TOKEN_MARKER
        if address_token and server.address_tokens is not None and server.address_tokens.validate(token, addr[0]):
            stats.address_tokens_validated += 1  # a returning client: no Retry round trip
        elif self._retry is not None:
            if address_token:
                # An address token we cannot validate (another or a restarted server, or
                # expired): RFC 9000 §8.1.3 — carry on as if there were none, i.e. Retry.
                stats.address_tokens_invalid += 1
                token = b""
            if not token:
                scid = os.urandom(_CID_LEN)
                # Our own first byte, so a Retry token is never mistaken for an address token.
                token = RETRY_TOKEN_MARKER + self._retry.create_token(
                    address=addr,
                    original_destination_connection_id=header.destination_cid,
                    retry_source_connection_id=scid,
                    now=time.time(),
                )
                self.send_raw(
                    encode_quic_retry(
                        version=header.version,
                        source_cid=scid,
                        destination_cid=header.source_cid,
                        original_destination_cid=header.destination_cid,
                        retry_token=token,
                    ),
                    addr,
                )
                stats.retry_sent += 1
                return None
            try:
                if token[:1] != RETRY_TOKEN_MARKER:
                    raise ValueError("not a retry token")
                original_dcid = self._retry.validate_token(
                    address=addr, destination_cid=header.destination_cid,
                    token=token[1:], now=time.time(),
                )
            except ValueError:
                stats.retry_failures += 1
                return None
            stats.retry_validated += 1
            retry_scid = header.destination_cid

        # Charge the per-source budget only for Initials that will create a connection
        # (Retry answers are stateless and cheap; counting them halved the real rate).
        if not self._admit_handshake(addr[0], now):
            stats.handshakes_rate_limited += 1
            return None
        holder: list[ZtnaConnection] = []
        store = server.ticket_store
        quic = server.connection_factory(
            configuration=config,
            original_destination_connection_id=original_dcid,
            retry_source_connection_id=retry_scid,
            session_ticket_fetcher=(lambda label: store.take(label, holder)) if store else None,
            session_ticket_handler=(lambda ticket: store.issue(ticket, holder)) if store else None,
            reset_secret=server.reset_secret,
        )
        quic.request_client_certificate = server.verifier is not None
        try:
            handler = server.handler_factory()
        except Exception:
            stats.handler_errors += 1
            log.exception("handler factory failed")
            return None
        conn = ZtnaConnection(quic, self, handler, addr, now=now)
        holder.append(conn)
        self._add(conn, [header.destination_cid, quic.host_cid])
        stats.handshakes_started += 1
        return conn

    def _admit_handshake(self, source: str, now: float) -> bool:
        """Token bucket per source IP (bounded table: oldest entries are evicted)."""
        server = self.server
        assert server is not None
        rate = server.handshakes_per_source_per_second
        buckets = server.rate_buckets
        tokens, last = buckets.get(source, (rate, now))
        tokens = min(rate, tokens + (now - last) * rate)
        if tokens < 1.0:
            buckets[source] = (tokens, now)
            return False
        buckets[source] = (tokens - 1.0, now)
        if len(buckets) > 65536:
            for key in list(buckets)[:16384]:
                del buckets[key]
        return True

    def on_handshake_completed(self, conn: ZtnaConnection) -> bool:
        """Check the client's certificate chain (server side). False = connection closed."""
        server = self.server
        if conn.quic._is_client or server is None or server.verifier is None:
            return True
        from ztna.identity import CertificateRejected

        if conn.resumed:
            # A resumed session presents no certificate: the identity was bound to the
            # ticket when it was issued (ztna.quic.tickets).
            if conn.identity is None:
                self.stats.auth_failures += 1
                conn.close(CLOSE_AUTH, "resumed session without identity")
                return False
            return True
        tls = conn.quic.tls
        try:
            conn.identity = server.verifier.verify_client(
                tls._peer_certificate,
                list(tls._peer_certificate_chain),
                now=datetime.now(timezone.utc),
            )
        except CertificateRejected as exc:
            self.stats.auth_failures += 1
            log.warning("refusing %s: %s", format_address(conn.peer_address), exc.reason)
            conn.close(CLOSE_AUTH, exc.reason)
            return False
        if server.ticket_store is not None:
            server.ticket_store.bind_identity(conn)
        return True

    # ------------------------------------------------------------------ send side
    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        now = self.loop.time()
        dirty, self._dirty = self._dirty, set()
        sock = self.sock
        stats = self.stats
        for conn in dirty:
            try:
                datagrams = conn.quic.datagrams_to_send(now)
            except Exception:
                stats.connection_errors += 1
                log.exception("connection %r failed while sending; closing it", conn)
                self._abort(conn, "internal error on send")
                continue
            for data, addr in datagrams:
                try:
                    sock.sendto(data, self._sendable(addr))
                except (BlockingIOError, InterruptedError):
                    stats.socket_send_errors += 1  # QUIC recovers the loss
                    continue
                except OSError:
                    stats.socket_send_errors += 1
                    continue
                stats.datagrams_sent += 1
                stats.bytes_sent += len(data)
            if conn.quic._close_event is not None or conn.quic._state.name in ("CLOSING", "DRAINING", "TERMINATED"):
                self._safe(conn.process_events)
            conn._timer_at = conn.quic.get_timer()
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = None
        for conn in self.connections:
            at = conn._timer_at
            if at is not None and (deadline is None or at < deadline):
                deadline = at
        if deadline == self._timer_at and self._timer is not None:
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
        now = self.loop.time()
        for conn in list(self.connections):
            at = conn._timer_at
            if at is not None and at <= now:
                try:
                    conn.quic.handle_timer(now)
                    conn.process_events()
                except Exception:
                    self.stats.connection_errors += 1
                    log.exception("timer of %r failed", conn)
                    self._abort(conn, "internal error on timer")
                    continue
                self._dirty.add(conn)
        self._flush()

    # ------------------------------------------------------------------ helpers
    def _add(self, conn: ZtnaConnection, cids: list[bytes]) -> None:
        self.connections.add(conn)
        for cid in cids:
            self.route_cid(cid, conn)

    def _abort(self, conn: ZtnaConnection, reason: str) -> None:
        self._dirty.discard(conn)
        try:
            conn._terminated(reason)
        except Exception:
            log.exception("on_closed handler failed")
        self.forget(conn)

    def _safe(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.stats.handler_errors += 1
            log.exception("handler failed")

    def _sendable(self, address: tuple[Any, ...]) -> tuple[Any, ...]:
        """A dual-stack IPv6 socket needs IPv4 destinations in ::ffff: form."""
        if self.family == socket.AF_INET6:
            host = address[0]
            if ":" not in host:
                return ("::ffff:" + host, address[1], 0, 0)
            if len(address) == 2:
                return (host, address[1], 0, 0)
        return address


def bind_udp(host: str, port: int, *, dual_stack: bool = True) -> socket.socket:
    """A UDP socket for an endpoint: `::` is dual-stack (IPv4 and IPv6 on one socket)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
        except OSError:
            pass
    sock.bind((host, port))
    sock.setblocking(False)
    return sock


def normalize_address(address: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) with an IPv4-mapped IPv6 host reported as IPv4."""
    host = address[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, address[1]
