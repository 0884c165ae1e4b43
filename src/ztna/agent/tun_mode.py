"""TUN data plane: kernel IP packets <-> 0x2F DATAGRAMs, moved by the native pump.

Theory of operation
-------------------
* The bytes move natively (`ztna._native.TunPump`, native/src/tunpump.rs): it reads the TUN
  fd, looks each packet's destination up in a table this module installs (per service: its
  virtual IPs, its prebuilt 0x2F header and the connection that carries it now) and queues
  `header + packet` on that connection without Python. The endpoints attached to the pump
  write the bare IP packets of their delivering connections back into the TUN fd, counted
  per service by source address. Python runs once per readable event: one `pump.read()`
  returns the packets the table could not place and the services that sent, and each
  endpoint that got work flushes once, at once (the packets go out in this wake-up).
* Python keeps every decision: `sync_routes` points each service at its current carrier
  (the direct connection while the service is on it, else the relay connection once the
  service is registered, else nothing) whenever the session is ready or lost and every
  `SYNC_INTERVAL`; direct <-> relay switches follow within that interval, and in between a
  closed connection refuses natively, which sends the packet up to Python. Counters moved
  natively are added into the services' counters by `sync_counters` (status, metrics).
* What the pump hands up goes through the Python path below, unchanged: `routes` maps the
  packed destination address (4 or 16 bytes) of every service virtual IP to its
  `ServiceState`, so: slice the destination → dict lookup → `session.send(svc, prefix +
  packet)` (which queues while the service is not registered).
* Packets to non-service destinations (IPv6 MLD / router solicitations to ff02::, stray
  traffic) are counted and dropped silently. A packet bigger than the tunnel can carry is
  answered with ICMP "fragmentation needed" / "packet too big" written back into the TUN,
  so the kernel lowers its path MTU and TCP resegments.
* Down-link: bare IP packets from the session are written to the fd as they are; the source
  address tells which service they belong to (for counters). No per-packet logging.
* Exit: TCP carried as packets ends in the Connector's stack, so when the Agent goes the
  application's socket would wait for a peer that can no longer answer. The up-link keeps,
  per TCP flow to a virtual IP, the last acknowledgment number the application sent (its
  receive point); `reset_tcp_flows` writes an RST from the virtual IP with that sequence
  number into the TUN for each, and for a short while answers every further segment of
  those flows (a challenge ACK when our guess was behind) with an RST at its ack number.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from ztna import _native
from ztna.agent.session import ACKED, ServiceState, Session
from ztna.errors import DecodeError
from ztna.netstack.packets import (
    build_icmp_packet_too_big,
    build_tcp_packet,
    ip_to_bytes,
    may_send_icmp_error,
)
from ztna.quic.endpoint import thread_enabled
from ztna.wire import to_connector_overhead

if TYPE_CHECKING:
    from ztna.quic.connection import ZtnaConnection
    from ztna.quic.endpoint import QuicEndpoint

log = logging.getLogger("ztna.agent")

READ_BATCH = 256          # packets per readable event (native reads)
SYNC_INTERVAL = 0.05      # s between route/counter reconciliations
TCP_FLOWS_MAX = 8192      # tracked for the resets on exit; the oldest is forgotten beyond
RESET_LINGER = 0.3        # s of answering a reset flow's further segments with RST


class TunDataPlane:
    def __init__(self, session: Session, fd: int, *, local_v4: str, local_v6: str) -> None:
        self.session = session
        self.fd = fd
        self.routes: dict[bytes, ServiceState] = {}
        for svc in session.services:
            for ip in svc.spec.virtual_ips:
                self.routes[ip.packed] = svc
        self.local_v4 = ip_to_bytes(local_v4)
        self.local_v6 = ip_to_bytes(local_v6)
        self.max_packet = 0          # largest IP packet the tunnel carries now (per worst id)
        # Packets must fit the Intermediate's 0x30 leg to the Connector (the larger header).
        self.overhead = max(to_connector_overhead(s.spec.id) for s in session.services)
        self.dropped_no_route = 0
        self.dropped_too_big = 0
        self.dropped_write = 0
        self.dropped_malformed = 0
        self.rx_unknown_source = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # (version, app address, virtual address, app port, virtual port) -> last ack sent
        self.tcp_flows: dict[tuple[int, bytes, bytes, int, int], int] = {}
        self._resetting = False
        self.resets_sent = 0
        # The native pump: service i of the session is entry i of its table.
        self.pump = _native.TunPump(fd, read_batch=READ_BATCH)
        for svc in session.services:
            addresses = [(ip.packed, ip.max_prefixlen) for ip in svc.spec.virtual_ips]
            index = self.pump.add_service(svc.prefix, addresses)
            assert index == svc.index
        self._endpoints: list[QuicEndpoint] = []          # by pump slot
        self._counted = [(0, 0, 0, 0)] * len(session.services)   # native counters added
        self._sync_timer: asyncio.TimerHandle | None = None
        # With the reader thread (native): the descriptor that says it left us something.
        self._notify_fd: int | None = None
        session.on_ready.append(self.sync_routes)
        session.on_lost.append(self.sync_routes)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if thread_enabled():
            self._notify_fd = self.pump.start_thread()
            self._loop.add_reader(self._notify_fd, self._on_thread)
        else:
            self._loop.add_reader(self.fd, self._on_readable)
        self._sync_timer = self._loop.call_later(SYNC_INTERVAL, self._on_sync_timer)

    def stop(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self._notify_fd if self._notify_fd is not None else self.fd)
            except (ValueError, OSError):
                pass
            self._loop = None
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        self.sync_counters()
        self.pump.close()

    def set_max_payload(self, max_payload: int) -> int:
        """Live DATAGRAM maximum changed: returns the TUN MTU that fits the worst header."""
        self.max_packet = max_payload - self.overhead
        self.pump.set_max_packet(max(self.max_packet, 0))
        return self.max_packet

    def claim_destinations(self, addresses: list[bytes]) -> None:
        """Down-link packets to these (packed) addresses stay with Python (the userspace
        stack's own source address shares the session)."""
        self.pump.set_claimed(addresses)

    # ------------------------------------------------------------------ native routes
    def _carrier(self, svc: ServiceState) -> ZtnaConnection | None:
        """The connection `session.send` would put this service's packets on now."""
        session = self.session
        direct = session.direct
        if direct is not None and svc.path == "direct":
            conn = direct.carrier(svc)
            if conn is not None:
                return conn
        conn = session.conn
        if conn is not None and not conn.closed and svc.registration == ACKED:
            return conn
        return None

    def _slot(self, endpoint: QuicEndpoint) -> int:
        for slot, known in enumerate(self._endpoints):
            if known is endpoint:
                return slot
        slot = self.pump.add_endpoint(endpoint.native)
        self._endpoints.append(endpoint)
        return slot

    def sync_routes(self) -> None:
        """Point every service at its current carrier (or back at Python)."""
        if self._loop is None:
            return
        pump = self.pump
        for svc in self.session.services:
            conn = self._carrier(svc)
            want = None
            if conn is not None:
                want = (self._slot(conn.endpoint), conn.handle)   # type: ignore[arg-type]
            if pump.target(svc.index) == want:
                continue
            if want is None or not pump.route(svc.index, *want):
                pump.unroute(svc.index)

    def sync_counters(self) -> None:
        """Add what the pump moved since the last call into the services' counters."""
        for svc, now, before in zip(self.session.services, self.pump.counters(), self._counted, strict=True):
            if now != before:
                svc.tx_packets += now[0] - before[0]
                svc.tx_bytes += now[1] - before[1]
                svc.rx_packets += now[2] - before[2]
                svc.rx_bytes += now[3] - before[3]
        self._counted = self.pump.counters()

    def _on_sync_timer(self) -> None:
        if self._loop is None:
            return
        try:
            self.sync_routes()
            self.sync_counters()
            if self._notify_fd is not None:
                self._on_thread()     # services that sent since the thread last told us
        finally:
            self._sync_timer = self._loop.call_later(SYNC_INTERVAL, self._on_sync_timer)

    # ------------------------------------------------------------------ up-link (hot path)
    def _on_thread(self) -> None:
        """The reader thread left packets it could not place, or services that sent (it
        sent and drove their endpoints itself)."""
        packets, touched = self.pump.take()
        direct = self.session.direct
        if touched and direct is not None:
            services = self.session.services
            for index in touched:
                svc = services[index]
                if svc.path == "direct":
                    direct.sent_natively(svc)
        for packet in packets:
            self._up(packet)

    def _on_readable(self) -> None:
        packets, touched = self.pump.read()
        flush: list[QuicEndpoint] = []
        if touched:
            services = self.session.services
            direct = self.session.direct
            for index in touched:
                target = self.pump.target(index)
                if target is not None:
                    endpoint = self._endpoints[target[0]]
                    if endpoint not in flush:
                        flush.append(endpoint)
                svc = services[index]
                if direct is not None and svc.path == "direct":
                    direct.sent_natively(svc)
        for packet in packets:
            self._up(packet)
        # Sent now, not at the end of the loop iteration: a lone packet (an echo, a DNS
        # query) would otherwise wait for one more pass of the loop (another epoll_wait).
        for endpoint in flush:
            endpoint.flush()

    def _up(self, packet: bytes) -> None:
        """One packet the native table could not place: the Python path."""
        if not packet:
            return
        version = packet[0] >> 4
        if version == 4:
            svc = self.routes.get(packet[16:20])
        elif version == 6:
            svc = self.routes.get(packet[24:40])
        else:
            self.dropped_malformed += 1
            return
        if svc is None:
            self.dropped_no_route += 1
            return
        if (packet[9] if version == 4 else packet[6]) == 6 and self._track_tcp(packet, version):
            return
        limit = self.max_packet
        if limit and len(packet) > limit:
            self._too_big(packet, limit)
            return
        self.session.send(svc, svc.prefix + packet)

    def _track_tcp(self, packet: bytes, version: int) -> bool:
        """Remember a TCP flow's receive point; True if the packet is consumed (exiting)."""
        if version == 4:
            if packet[6] & 0x1F or packet[7]:
                return False          # a non-first fragment: no TCP header in it
            off = (packet[0] & 0x0F) * 4
            key = (4, packet[12:16], packet[16:20])
        else:
            off = 40
            key = (6, packet[8:24], packet[24:40])
        if len(packet) < off + 20:
            return False
        flow = key + (int.from_bytes(packet[off:off + 2], "big"), int.from_bytes(packet[off + 2:off + 4], "big"))
        flags = packet[off + 13]
        ack = int.from_bytes(packet[off + 8:off + 12], "big")
        if self._resetting:
            # Nothing goes up any more: every segment but an RST is answered with one.
            if flags & 0x10:
                self._send_rst(flow, ack)
            elif not flags & 0x04:    # a SYN: RST+ACK acknowledging it
                self._send_rst(flow, 0, ack=int.from_bytes(packet[off + 4:off + 8], "big") + 1)
            return True
        if flags & 0x04:
            self.tcp_flows.pop(flow, None)
        elif flags & 0x10:
            flows = self.tcp_flows
            if flow not in flows and len(flows) >= TCP_FLOWS_MAX:
                del flows[next(iter(flows))]
            flows[flow] = ack
        return False

    def _send_rst(self, flow: tuple[int, bytes, bytes, int, int], seq: int, ack: int | None = None) -> None:
        _, app, vip, app_port, vip_port = flow
        try:
            rst = build_tcp_packet(vip, app, vip_port, app_port, seq=seq, ack=ack or 0,
                                   flags=0x04 if ack is None else 0x14, window=0)
        except DecodeError:
            return
        self.resets_sent += 1
        self.write_packet(rst, count=False)

    async def reset_tcp_flows(self) -> int:
        """The Agent is exiting: reset every TCP flow to a virtual IP that the application
        still has (see the module notes). Returns how many flows were reset."""
        # From now on the pump hands every TCP segment up (answered below with an RST).
        self.pump.set_resetting(True)
        self._resetting = True
        known = dict(self.tcp_flows)
        for version, app, vip, app_port, vip_port, ack in self.pump.tcp_flows():
            known[(version, app, vip, app_port, vip_port)] = ack
        flows = list(known.items())
        if not flows or self._loop is None:
            return 0
        for flow, ack in flows:
            self._send_rst(flow, ack)
        log.info("reset %d TCP flow%s through the TUN", len(flows), "" if len(flows) == 1 else "s")
        await asyncio.sleep(RESET_LINGER)
        return len(flows)

    def _too_big(self, packet: bytes, mtu: int) -> None:
        self.dropped_too_big += 1
        if not may_send_icmp_error(packet):
            return
        try:
            # From the virtual IP the packet was headed to: a source on the far side of the
            # TUN passes the reverse-path check (our own address would be a martian).
            src = packet[16:20] if packet[0] >> 4 == 4 else packet[24:40]
            reply = build_icmp_packet_too_big(packet, src=src, mtu=mtu)
        except DecodeError:
            return
        self.write_packet(reply, count=False)

    # ------------------------------------------------------------------ down-link
    def write_packet(self, packet: bytes, count: bool = True) -> None:
        if count:
            version = packet[0] >> 4
            svc = self.routes.get(packet[12:16] if version == 4 else packet[8:24])
            if svc is None:
                self.rx_unknown_source += 1
            else:
                svc.rx_packets += 1
                svc.rx_bytes += len(packet)
        try:
            os.write(self.fd, packet)
        except OSError:
            self.dropped_write += 1

    def snapshot(self) -> dict[str, Any]:
        native = self.pump.stats()
        return {
            "max_packet": self.max_packet,
            "dropped_no_route": self.dropped_no_route,
            "dropped_too_big": self.dropped_too_big,
            "dropped_write": self.dropped_write + native["dropped_write"],
            "dropped_malformed": self.dropped_malformed,
            "rx_unknown_source": self.rx_unknown_source + native["rx_unknown_source"],
            "native": native,
        }
