"""TUN data plane: kernel IP packets <-> 0x2F DATAGRAMs, one dict lookup per packet.

Theory of operation
-------------------
* `routes` maps the packed destination address (4 or 16 bytes) of every service virtual IP
  to its `ServiceState`, whose `prefix` is the prebuilt 0x2F header, so the up-link hot path
  is: read → slice the destination → dict lookup → `session.send(svc, prefix + packet)`.
* The TUN fd is registered with `loop.add_reader`; each readable event reads up to
  `READ_BATCH` packets (until `BlockingIOError`), and the QUIC endpoint flushes once after
  the batch (its `mark_dirty` schedules one flush per loop iteration).
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
from typing import Any

from ztna.agent.session import ServiceState, Session
from ztna.errors import DecodeError
from ztna.netstack.packets import (
    build_icmp_packet_too_big,
    build_tcp_packet,
    ip_to_bytes,
    may_send_icmp_error,
)
from ztna.wire import to_connector_overhead

log = logging.getLogger("ztna.agent")

READ_BATCH = 64
MAX_READ = 65535
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

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self._on_readable)

    def stop(self) -> None:
        if self._loop is not None:
            try:
                self._loop.remove_reader(self.fd)
            except (ValueError, OSError):
                pass
            self._loop = None

    def set_max_payload(self, max_payload: int) -> int:
        """Live DATAGRAM maximum changed: returns the TUN MTU that fits the worst header."""
        self.max_packet = max_payload - self.overhead
        return self.max_packet

    # ------------------------------------------------------------------ up-link (hot path)
    def _on_readable(self) -> None:
        fd = self.fd
        routes = self.routes
        send = self.session.send
        limit = self.max_packet
        for _ in range(READ_BATCH):
            try:
                packet = os.read(fd, MAX_READ)
            except BlockingIOError:
                return
            except OSError:
                return
            if not packet:
                return
            version = packet[0] >> 4
            if version == 4:
                svc = routes.get(packet[16:20])
            elif version == 6:
                svc = routes.get(packet[24:40])
            else:
                self.dropped_malformed += 1
                continue
            if svc is None:
                self.dropped_no_route += 1
                continue
            if (packet[9] if version == 4 else packet[6]) == 6 and self._track_tcp(packet, version):
                continue
            if limit and len(packet) > limit:
                self._too_big(packet, limit)
                continue
            send(svc, svc.prefix + packet)

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
        flows = list(self.tcp_flows.items())
        if not flows or self._loop is None:
            return 0
        self._resetting = True
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
        return {
            "max_packet": self.max_packet,
            "dropped_no_route": self.dropped_no_route,
            "dropped_too_big": self.dropped_too_big,
            "dropped_write": self.dropped_write,
            "dropped_malformed": self.dropped_malformed,
            "rx_unknown_source": self.rx_unknown_source,
        }
