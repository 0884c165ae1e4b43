"""State the Connector's parts share: the hot-path counters and each service's runtime form.

``ConnectorStats`` is counted by the flow tables, the stream table and the P2P server and
exported by ``ztna.connector.metrics``; ``ServiceState`` is a service's packed virtual IPs
and its backends per virtual port. The Connector (``ztna.connector.service``) owns both;
this module imports none of its users, so they need not import the Connector.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, fields
from typing import Any

from ztna.connector.config import ServiceConfig

__all__ = ["Backend", "ConnectorStats", "ServiceState"]


@dataclass
class ConnectorStats:
    """Plain counters on the hot path; exported at scrape time (ztna.connector.metrics)."""

    packets_in: int = 0
    malformed: int = 0
    unknown_service: int = 0
    not_virtual_ip: int = 0
    not_authorized: int = 0
    unsupported_proto: int = 0
    icmp_echo_replies: int = 0
    icmp_dropped: int = 0
    packet_too_big_sent: int = 0
    udp_to_backend: int = 0
    udp_to_agent: int = 0
    udp_backend_drops: int = 0
    udp_agent_drops: int = 0
    udp_backend_refused: int = 0
    udp_no_such_port: int = 0
    udp_flow_limit: int = 0
    udp_unresolved: int = 0
    udp_reply_too_big: int = 0
    udp_flows_opened: int = 0
    udp_flows_expired: int = 0
    tcp_segments_in: int = 0
    tcp_segments_out: int = 0
    tcp_bytes_to_backend: int = 0
    tcp_bytes_to_agent: int = 0
    tcp_rst_unknown: int = 0
    tcp_no_such_port: int = 0
    tcp_session_limit: int = 0
    tcp_syn_rate_limited: int = 0
    tcp_backend_failures: int = 0
    tcp_sessions_opened: int = 0
    tcp_sessions_closed: int = 0
    tcp_resets: int = 0
    streams_opened: int = 0
    streams_closed: int = 0
    streams_refused: int = 0
    stream_resets: int = 0
    stream_bad_header: int = 0
    stream_backend_failures: int = 0
    stream_bytes_to_backend: int = 0
    stream_bytes_to_agent: int = 0
    stream_resumed: int = 0
    stream_resume_refused: int = 0
    stream_names_opened: int = 0             # named streams connected to a resolved address
    stream_names_outside_patterns: int = 0   # named streams refused: not the service's name
    stream_names_unresolved: int = 0         # named streams refused: the name did not resolve

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Backend:
    __slots__ = ("host", "port", "resolved")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.resolved: tuple[int, tuple[Any, ...]] | None = None
        try:
            ip = ipaddress.ip_address(host)
            fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
            self.resolved = (fam, (host, port))
        except ValueError:
            pass


class ServiceState:
    """Runtime form of a ServiceConfig: packed virtual IPs and backends per virtual port."""

    __slots__ = ("cfg", "id", "vips", "tcp_backends", "udp_backends", "icmp", "udp_flows")

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.id = cfg.id
        self.vips = cfg.packed_vips
        self.tcp_backends = {p: Backend(b.host, b.port) for p, b in cfg.tcp.items()}
        self.udp_backends = {p: Backend(b.host, b.port) for p, b in cfg.udp.items()}
        self.icmp = cfg.icmp
        self.udp_flows = 0
