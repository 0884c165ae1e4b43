"""Prometheus metrics and /healthz for the Connector (read at scrape time from counters).

/healthz is honest: 200 only while the relay connection is up and every service is
registered with the Intermediate; otherwise 503 with the reason in the JSON body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sized
from typing import Any, Protocol

from prometheus_client import CollectorRegistry

from ztna.connector.health import HealthProber
from ztna.connector.p2p_server import P2PServer
from ztna.connector.punch import ConnectorPunch
from ztna.connector.relay_link import RelayLink
from ztna.connector.state import ConnectorStats
from ztna.connector.udp_flows import UdpFlows
from ztna.observe import MetricsServer, StatsCollector, format_address
from ztna.quic.endpoint import QuicEndpoint
from ztna.revocation_guard import RevocationGuard


class ConnectorView(Protocol):
    """What the scrape reads of the Connector (``ztna.connector.service.Connector``); a
    Protocol, so that this module does not import the Connector that starts it."""

    @property
    def relay(self) -> RelayLink | None: ...
    @property
    def relays(self) -> list[RelayLink]: ...
    @property
    def relay_endpoint(self) -> QuicEndpoint | None: ...
    @property
    def p2p(self) -> P2PServer | None: ...
    @property
    def punch(self) -> ConnectorPunch | None: ...
    @property
    def stats(self) -> ConnectorStats: ...
    @property
    def tcp(self) -> Sized: ...
    @property
    def udp(self) -> UdpFlows: ...
    @property
    def streams(self) -> Sized: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop | None: ...
    @property
    def started_at(self) -> float: ...
    def health(self) -> tuple[bool, dict[str, Any]]: ...
    @property
    def backend_health(self) -> HealthProber: ...
    @property
    def revocation(self) -> RevocationGuard: ...

Row = tuple[str, str, str, float, "dict[str, str] | None"]


# EndpointStats counters that each count a datagram the P2P socket received and dropped
# (the datagram went no further: not QUIC we can use, no connection for it, or refused
# before a connection existed), exported under the reason on the right.
_ENDPOINT_DROPS = {
    "malformed": "malformed",                       # empty, bad long header, short Initial
    "non_quic": "non_quic",                         # first byte < 0x40 with no probe handler
    "unknown_cid": "unknown_connection_id",         # short or long header for no connection
    "version_negotiations": "unsupported_version",  # answered with Version Negotiation
    "connections_refused_limit": "connection_limit",
    "handshakes_rate_limited": "handshake_rate_limited",
    "retry_failures": "bad_retry_token",
}


def p2p_drops(c: ConnectorView) -> dict[str, int]:
    """Every datagram the P2P socket received and dropped, by reason. Together with the
    datagrams that reached a connection or a live punch session this accounts for all of
    `datagrams_received`, so garbage never disappears without a trace."""
    out: dict[str, int] = {}
    p2p = c.p2p
    if p2p is None or p2p.endpoint is None:
        return out
    stats = p2p.endpoint.stats
    for field, reason in _ENDPOINT_DROPS.items():
        out[reason] = getattr(stats, field)
    out["no_probe_handler"] = p2p.raw_ignored
    if c.punch is not None:
        out.update(c.punch.drops)
    return out


def collect(c: ConnectorView) -> list[Any]:
    out: list[Any] = []
    relay = c.relay
    links = c.relays or ([relay] if relay is not None else [])
    out.append(("ztna_connector_relay_connected", "gauge", "1 while connected to an intermediate",
                1 if any(link.connected for link in links) else 0, None))
    out.append(("ztna_connector_relay_links_connected", "gauge",
                "Relay links up (several with --attach all)", sum(link.connected for link in links), None))
    out.append(("ztna_connector_reconnects_total", "counter", "Reconnect attempts",
                relay.reconnects if relay else 0, None))
    if relay is not None:
        for svc, state in relay.registration.items():
            out.append(("ztna_connector_service_registered", "gauge",
                        "1 if the service is registered", 1 if state == "registered" else 0,
                        {"service": svc}))
    prober = c.backend_health
    for svc, hstate in prober.states.items():
        out.append(("ztna_connector_backend_healthy", "gauge",
                    "1 while every health check of the service's backend passes",
                    1 if hstate.healthy else 0, {"service": svc}))
        for healthy in (False, True):
            out.append(("ztna_connector_health_transitions_total", "counter",
                        "Backend health transitions, by the new state",
                        prober.transitions.get((svc, healthy), 0),
                        {"service": svc, "state": "healthy" if healthy else "unhealthy"}))
        out.append(("ztna_connector_health_checks_total", "counter", "Health checks run",
                    sum(ch.checks for ch in hstate.checks), {"service": svc}))
    out.append(("ztna_connector_tcp_sessions", "gauge", "Open TCP-in-DATAGRAM sessions", len(c.tcp), None))
    out.append(("ztna_connector_udp_flows", "gauge", "Open UDP flows", len(c.udp), None))
    out.append(("ztna_connector_streams", "gauge", "Open TCP streams", len(c.streams), None))
    out.extend(c.revocation.metrics())
    out.append(("ztna_connector_uptime_seconds", "gauge", "Seconds since start",
                c.loop.time() - c.started_at if c.loop else 0, None))
    c.udp.sync_stats()   # what the native UDP flows moved since the last look
    for name, value in c.stats.as_dict().items():
        out.append((f"ztna_connector_{name}_total", "counter", name.replace("_", " "), value, None))
    for reason, value in p2p_drops(c).items():
        out.append(("ztna_connector_p2p_dropped_datagrams_total", "counter",
                    "Datagrams received on the P2P socket and dropped, by reason", value,
                    {"reason": reason}))
    for label, ep in (("relay", c.relay_endpoint), ("p2p", c.p2p.endpoint if c.p2p else None)):
        if ep is None:
            continue
        for k, v in ep.stats.as_dict().items():
            out.append((f"ztna_quic_{k}_total", "counter", f"QUIC endpoint: {k.replace('_', ' ')}",
                        v, {"socket": label}))
    return out


async def start_metrics(c: ConnectorView, host: str, port: int) -> MetricsServer:
    reg = CollectorRegistry()
    reg.register(StatsCollector(lambda: collect(c)))
    server = MetricsServer(reg, c.health)
    await server.start(host, port)
    import logging

    logging.getLogger("ztna.connector").info("metrics on http://%s/metrics",
                                             format_address((host, server.port)))
    return server
