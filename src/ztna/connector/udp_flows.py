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
* Once created, a flow's packets move natively (`ztna._native.UdpFlows`,
  native/src/udpflow.rs): the flow is installed with its key, service, socket and reply
  connection; DATAGRAMs of installed flows go to the backend socket without Python. When
  the reply connection's endpoint has a native driver thread, that thread reads the
  backend socket too and sends the replies in its own wake-up (the loop stops watching the
  socket; a refusal it sees makes `refused_fd` readable). Otherwise `_readable` is one
  native call per readable event that reads a burst and queues the replies, and one flush
  of their endpoint sends them in the same wake-up. What the
  native table does not take (a new 5-tuple, a path switch, a packet too big for its
  reply, anything not UDP) comes here as before, and every move or close of a
  flow here is mirrored there. Counters moved natively are added into the stats by
  `sync_stats` (every sweep and every metrics read); idle time counts native packets too.
"""

from __future__ import annotations

import asyncio
import socket
from typing import TYPE_CHECKING, Any

from ztna import _native
from ztna.connector import icmp
from ztna.netstack.packets import IpHeader, build_udp_packet, parse_udp

if TYPE_CHECKING:
    from ztna.audit import FlowAudit
    from ztna.connector.flow_audit import ConnectorAudit
    from ztna.connector.paths import ReplyPath
    from ztna.connector.state import ConnectorStats, ServiceState
    from ztna.quic.endpoint import QuicEndpoint

RECV_BURST = 64
BACKEND_RCVBUF = 1024 * 1024   # bytes, per flow socket (the kernel caps it at rmem_max)


class UdpFlow:
    __slots__ = ("key", "path", "service", "sock", "vip", "vport", "agent_ip", "agent_port",
                 "last_seen", "last_packet", "native_id", "native_seen", "audit", "watched")

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
        self.native_id: int | None = None   # installed in the native table
        self.watched = False                # our loop watches the backend socket
        # Its native counters (packets and payload bytes each way) at the last look.
        self.native_seen: tuple[int, int, int, int] = (0, 0, 0, 0)
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
        self.native = _native.UdpFlows(recv_burst=RECV_BURST)
        self._endpoints: list[QuicEndpoint] = []          # by native slot
        self._native_keys: dict[tuple[Any, ...], UdpFlow] = {}   # (agent id, 5-tuple) -> flow
        self._native_counted: dict[str, int] = {}
        self._refused_watched = False

    # ------------------------------------------------------------------ native table
    def _target(self, path: ReplyPath) -> tuple[int, int] | None:
        """(slot, handle) of the path's connection, registered with the native table."""
        conn = path.conn
        # A connection without a native endpoint (a test double) stays on the Python path.
        endpoint: QuicEndpoint | None = getattr(conn, "endpoint", None)
        if conn.closed or getattr(endpoint, "native", None) is None:
            return None
        assert endpoint is not None
        slot = next((i for i, known in enumerate(self._endpoints) if known is endpoint), None)
        if slot is None:
            slot = self.native.add_endpoint(endpoint.native)
            self._endpoints.append(endpoint)
        agent = path.agent_id if path.direct else None
        if path.direct and agent is None:
            return None
        if not self.native.add_connection(slot, conn.handle, agent):
            return None
        return slot, conn.handle

    def _install(self, flow: UdpFlow) -> None:
        """Let the flow's packets move natively on its current path (or stop, if it can't)."""
        target = self._target(flow.path)
        if target is None:
            self._uninstall(flow)
            return
        if flow.native_id is None:
            owner, src, sport, dst, dport = flow.key
            # The native table knows agent ids, not the links they came through: a flow whose
            # (agent id, 5-tuple) another link's flow holds there stays on the Python path.
            native_key = (owner & 0xFFFFFFFF, src, sport, dst, dport)
            holder = self._native_keys.get(native_key)
            if holder is not None and holder is not flow:
                return
            flow.native_id = self.native.add_flow(native_key[0], flow.agent_ip, flow.agent_port, flow.vip,
                                                  flow.vport, flow.service.id.encode("ascii"),
                                                  flow.sock.fileno(), *target)
            self._native_keys[native_key] = flow
        else:
            self.native.set_reply(flow.native_id, *target)
        self._watch(flow)

    def _watch(self, flow: UdpFlow) -> None:
        """Watch the backend socket on our loop unless a native driver thread reads it (the
        flow's replies go on a threaded endpoint: they leave in the thread's wake-up)."""
        polled = flow.native_id is not None and self.native.polled(flow.native_id)
        if polled and flow.watched:
            self.loop.remove_reader(flow.sock.fileno())
            flow.watched = False
        elif not polled and not flow.watched:
            self.loop.add_reader(flow.sock.fileno(), self._readable, flow)
            flow.watched = True
        if polled and not self._refused_watched:
            # A refusal the thread saw: answer with ICMP now, not at the next sweep.
            self.loop.add_reader(self.native.refused_fd(), self._take_refused)
            self._refused_watched = True

    def _take_refused(self) -> None:
        by_id = {f.native_id: f for f in self.flows.values() if f.native_id is not None}
        for fid in self.native.take_refused():
            refused = by_id.get(fid)
            if refused is not None:
                self._refused(refused)

    def _uninstall(self, flow: UdpFlow) -> None:
        if flow.native_id is None:
            return
        self.native.remove_flow(flow.native_id)
        flow.native_id = None
        if flow.key in self.flows:
            self._watch(flow)
        owner, src, sport, dst, dport = flow.key
        native_key = (owner & 0xFFFFFFFF, src, sport, dst, dport)
        if self._native_keys.get(native_key) is flow:
            del self._native_keys[native_key]

    def _sync_flow(self, flow: UdpFlow) -> bool:
        """Bring what moved natively into the flow's audit; True if anything moved."""
        counters = self.native.counters(flow.native_id) if flow.native_id is not None else None
        if counters is None or counters == flow.native_seen:
            return False
        seen, flow.native_seen = flow.native_seen, counters
        if flow.audit is not None:
            flow.audit.to_service += counters[2] - seen[2]
            flow.audit.from_service += counters[3] - seen[3]
        return True

    def sync_stats(self) -> None:
        """Add what moved natively since the last call into the stats."""
        native = self.native.stats()
        seen = self._native_counted
        stats = self.stats
        delta = {k: native[k] - seen.get(k, 0) for k in native}
        self._native_counted = dict(native)
        stats.udp_to_backend += delta["to_backend"]
        stats.packets_in += delta["to_backend"] + delta["backend_drops"] + delta["refused"]
        stats.udp_backend_drops += delta["backend_drops"]
        stats.udp_to_agent += delta["to_agent"]
        stats.udp_agent_drops += delta["agent_drops"]
        stats.udp_reply_too_big += delta["reply_too_big"]

    def __len__(self) -> int:
        return len(self.flows)

    # ------------------------------------------------------------------ Agent → backend
    def on_packet(self, path: ReplyPath, service: ServiceState, ip: IpHeader,
                  packet: memoryview, now: float) -> None:
        udp = parse_udp(packet, ip)
        key = (path.key, ip.src, udp.sport, ip.dst, udp.dport)
        flow = self.flows.get(key)
        if flow is not None and flow.path is not path:
            flow.path.flows -= 1
            path.flows += 1
            flow.path = path
            self._install(flow)
        if flow is None:
            flow = self._open(key, path, service, ip, udp.sport, udp.dport, packet, now)
            if flow is None:
                return
            self._install(flow)
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
        self._watch(flow)
        if self.audit is not None:
            flow.audit = self.audit.open(path, service.id, "udp", dport, now)
        return flow

    # ------------------------------------------------------------------ backend → Agent
    def _readable(self, flow: UdpFlow) -> None:
        if flow.native_id is not None:
            sent, refused, _dropped = self.native.recv(flow.native_id)
            if sent:
                flow.last_seen = self.loop.time()
                # Out in this wake-up, not one loop pass later (a request/response flow
                # waits for every reply).
                flow.path.conn.endpoint.flush()
            if refused:
                self._refused(flow)
            return
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
        last = flow.last_packet
        if flow.native_id is not None:
            last = self.native.last_packet(flow.native_id) or last
        if last:
            reply = icmp.port_unreachable(last, src=flow.vip)
            if reply is not None and len(reply) <= flow.path.max_packet():
                flow.path.send(reply)

    # ------------------------------------------------------------------ lifecycle
    def close_flow(self, flow: UdpFlow, reason: str = "closed") -> None:
        if self.flows.pop(flow.key, None) is None:
            return
        self._sync_flow(flow)
        if self.audit is not None:
            self.audit.end(flow.audit, reason, self.loop.time())
        flow.service.udp_flows -= 1
        flow.path.flows -= 1
        self._uninstall(flow)      # before the socket closes: its descriptor may be reused at once
        if flow.watched:
            try:
                self.loop.remove_reader(flow.sock.fileno())
            except (ValueError, OSError):
                pass
            flow.watched = False
        flow.sock.close()
        flow.last_packet = b""

    def sweep(self, now: float) -> int:
        """Expire idle flows and flows whose path died. Returns how many were closed."""
        self.sync_stats()
        self._take_refused()
        for f in [f for f in self.flows.values() if f.native_id is not None]:
            if self._sync_flow(f):
                f.last_seen = now
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
                self._install(f)
            else:
                self.close_flow(f, "agent gone")

    def close_all(self) -> None:
        for f in list(self.flows.values()):
            self.close_flow(f, "shutdown")
        if self._refused_watched:
            self.loop.remove_reader(self.native.refused_fd())
            self._refused_watched = False
