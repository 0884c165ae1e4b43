"""UDP flows: one connected backend socket per (agent id, inner source, inner destination).

* A flow is created by the first packet of a 5-tuple on a path and owns one non-blocking
  UDP socket `connect()`ed to the service's backend for that virtual port; the loop watches
  it with `add_reader`. Replies are rebuilt as IP packets whose **source is the virtual
  service address and port** the Agent sent to, and go back on the flow's path.
* A backend that refuses (ICMP port unreachable → ECONNREFUSED on the socket) becomes an
  ICMP port unreachable toward the Agent, quoting the flow's last packet.
* Idle flows expire (`sweep`); per-service and total flow limits refuse new flows (counted,
  never an exception). A reply larger than the path's live size is dropped and counted.
* The key holds the agent id, not the path: replies go back on the path the flow's latest
  packet came from, so a flow survives the Agent switching relay ↔ direct; a dead path
  hands its flows to the Agent's other live path (`drop_path(path, alternate)`).
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from ztna.connector import icmp
from ztna.netstack.packets import IpHeader, build_udp_packet, parse_udp

if TYPE_CHECKING:
    from ztna.audit import FlowAudit
    from ztna.connector.flow_audit import ConnectorAudit
    from ztna.connector.paths import ReplyPath
    from ztna.connector.state import ConnectorStats, ServiceState

RECV_BURST = 64
BACKEND_RCVBUF = 1024 * 1024   # bytes, per flow socket (the kernel caps it at rmem_max)


class UdpFlow:
    __slots__ = ("key", "path", "service", "sock", "vip", "vport", "agent_ip", "agent_port",
                 "last_seen", "last_packet", "audit")

    def __init__(self, key: tuple[Any, ...], path: ReplyPath, service: ServiceState,
                 sock: socket.socket, ip: IpHeader, sport: int, dport: int, now: float) -> None:
        self.key = key
        self.path = path
        self.service = service
        self.sock = sock
        self.vip = ip.dst
        self.vport = dport
        self.agent_ip = ip.src
        self.agent_port = sport
        self.last_seen = now
        self.last_packet: memoryview | bytes = b""
        self.audit: FlowAudit | None = None


class UdpFlows:
    def __init__(self, loop: asyncio.AbstractEventLoop, stats: ConnectorStats, *,
                 total_limit: int, per_service_limit: int, idle_timeout: float) -> None:
        self.loop = loop
        self.stats = stats
        self.total_limit = total_limit
        self.per_service_limit = per_service_limit
        self.idle_timeout = idle_timeout
        self.flows: dict[tuple[Any, ...], UdpFlow] = {}
        self.audit: ConnectorAudit | None = None

    def __len__(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------------ Agent → backend
    def on_packet(self, path: ReplyPath, service: ServiceState, ip: IpHeader,
                  packet: memoryview, now: float) -> None:
        udp = parse_udp(packet, ip)
        key = (path.agent_id, ip.src, udp.sport, ip.dst, udp.dport)
        flow = self.flows.get(key)
        if flow is not None and flow.path is not path:
            flow.path.flows -= 1
            path.flows += 1
            flow.path = path
        if flow is None:
            flow = self._open(key, path, service, ip, udp.sport, udp.dport, packet, now)
            if flow is None:
                return
        flow.last_seen = now
        flow.last_packet = packet
        if flow.audit is not None:
            flow.audit.to_service += len(udp.payload)
        try:
            flow.sock.send(udp.payload)
            self.stats.udp_to_backend += 1
        except BlockingIOError:
            self.stats.udp_backend_drops += 1       # backend socket buffer full: UDP may drop
        except ConnectionRefusedError:
            self._refused(flow)
        except OSError:
            self.stats.udp_backend_drops += 1

    def _open(self, key: tuple[Any, ...], path: ReplyPath, service: ServiceState, ip: IpHeader,
              sport: int, dport: int, packet: memoryview, now: float) -> UdpFlow | None:
        backend = service.udp_backends.get(dport)
        if backend is None:
            self.stats.udp_no_such_port += 1
            reply = icmp.port_unreachable(packet, src=ip.dst)
            if reply is not None:
                path.send(reply)
            return None
        if len(self.flows) >= self.total_limit or service.udp_flows >= self.per_service_limit:
            self.stats.udp_flow_limit += 1
            return None
        resolved = backend.resolved
        if resolved is None:
            self.stats.udp_unresolved += 1
            return None
        family, addr = resolved
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            # Replies arrive in bursts while the loop is busy elsewhere: the default ~200 KB
            # receive buffer (a few hundred small datagrams) overflowed at 5k packets/s.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BACKEND_RCVBUF)
        except OSError:
            pass
        try:
            sock.setblocking(False)
            sock.connect(addr)
        except OSError:
            sock.close()
            self.stats.udp_backend_drops += 1
            return None
        flow = UdpFlow(key, path, service, sock, ip, sport, dport, now)
        self.flows[key] = flow
        service.udp_flows += 1
        path.flows += 1
        self.stats.udp_flows_opened += 1
        self.loop.add_reader(sock.fileno(), self._readable, flow)
        if self.audit is not None:
            flow.audit = self.audit.open(path, service.id, "udp", dport, now)
        return flow

    # ------------------------------------------------------------------ backend → Agent
    def _readable(self, flow: UdpFlow) -> None:
        sock = flow.sock
        path = flow.path
        stats = self.stats
        for _ in range(RECV_BURST):
            try:
                data = sock.recv(65535)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self._refused(flow)
                continue
            except OSError:
                return
            flow.last_seen = self.loop.time()
            if flow.audit is not None:
                flow.audit.from_service += len(data)
            pkt = build_udp_packet(flow.vip, flow.agent_ip, flow.vport, flow.agent_port, data)
            if len(pkt) > path.max_packet():
                stats.udp_reply_too_big += 1
                continue
            if path.send(pkt):
                stats.udp_to_agent += 1
            else:
                stats.udp_agent_drops += 1

    def _refused(self, flow: UdpFlow) -> None:
        self.stats.udp_backend_refused += 1
        if flow.last_packet:
            reply = icmp.port_unreachable(flow.last_packet, src=flow.vip)
            if reply is not None and len(reply) <= flow.path.max_packet():
                flow.path.send(reply)

    # ------------------------------------------------------------------ lifecycle
    def close_flow(self, flow: UdpFlow, reason: str = "closed") -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        if self.audit is not None:
            self.audit.end(flow.audit, reason, self.loop.time())
        flow.service.udp_flows -= 1
        flow.path.flows -= 1
        try:
            self.loop.remove_reader(flow.sock.fileno())
        except (ValueError, OSError):
            pass
        flow.sock.close()
        flow.last_packet = b""

    def sweep(self, now: float) -> int:
        """Expire idle flows and flows whose path died. Returns how many were closed."""
        limit = now - self.idle_timeout
        dead = [f for f in self.flows.values() if f.last_seen < limit or not f.path.alive]
        for f in dead:
            self.close_flow(f, "idle timeout" if f.path.alive else "path closed")
        self.stats.udp_flows_expired += len(dead)
        return len(dead)

    def drop_path(self, path: ReplyPath, alternate: ReplyPath | None = None) -> None:
        for f in [f for f in self.flows.values() if f.path is path]:
            if alternate is not None:
                path.flows -= 1
                alternate.flows += 1
                f.path = alternate
            else:
                self.close_flow(f, "agent gone")

    def close_all(self) -> None:
        for f in list(self.flows.values()):
            self.close_flow(f, "shutdown")
