"""Prometheus metrics and /healthz for the Connector (read at scrape time from counters).

/healthz is honest: 200 only while the relay connection is up and every service is
registered with the Intermediate; otherwise 503 with the reason in the JSON body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sized
from typing import Any, Protocol

from ztna.connector.health import HealthProber
from ztna.connector.p2p_server import P2PServer
from ztna.connector.punch import ConnectorPunch
from ztna.connector.relay_link import RelayLink
from ztna.connector.state import ConnectorStats
from ztna.connector.udp_flows import UdpFlows
from ztna.metrics import MetricRow, MetricTable
from ztna.observe import MetricsServer, serve_metrics
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
    if c.punch is not None:
        out.update(c.punch.drops)
    return out


def collect(c: ConnectorView) -> list[MetricRow]:
    t = MetricTable()
    relay = c.relay
    links = c.relays or ([relay] if relay is not None else [])
    t.gauge("ztna_connector_relay_connected", "1 while connected to an intermediate",
            1 if any(link.connected for link in links) else 0)
    t.gauge("ztna_connector_relay_links_connected", "Relay links up (several with --attach all)",
            sum(link.connected for link in links))
    t.counter("ztna_connector_reconnects_total", "Reconnect attempts", relay.reconnects if relay else 0)
    if relay is not None:
        for svc, state in relay.registration.items():
            t.gauge("ztna_connector_service_registered", "1 if the service is registered",
                    1 if state == "registered" else 0, {"service": svc})
    prober = c.backend_health
    for svc, hstate in prober.states.items():
        t.gauge("ztna_connector_backend_healthy", "1 while every health check of the service's backend passes",
                1 if hstate.healthy else 0, {"service": svc})
        t.counters_by("ztna_connector_health_transitions_total", "Backend health transitions, by the new state",
                      "state", [("healthy" if healthy else "unhealthy", prober.transitions.get((svc, healthy), 0))
                                for healthy in (False, True)], extra={"service": svc})
        t.counter("ztna_connector_health_checks_total", "Health checks run",
                  sum(ch.checks for ch in hstate.checks), {"service": svc})
    t.gauge("ztna_connector_tcp_sessions", "Open TCP-in-DATAGRAM sessions", len(c.tcp))
    t.gauge("ztna_connector_udp_flows", "Open UDP flows", len(c.udp))
    t.gauge("ztna_connector_streams", "Open TCP streams", len(c.streams))
    t.extend(c.revocation.metrics())
    t.gauge("ztna_connector_uptime_seconds", "Seconds since start", c.loop.time() - c.started_at if c.loop else 0)
    c.udp.sync_stats()   # what the native UDP flows moved since the last look
    for name, value in c.stats.as_dict().items():
        t.counter(f"ztna_connector_{name}_total", name.replace("_", " "), value)
    t.counters_by("ztna_connector_p2p_dropped_datagrams_total",
                  "Datagrams received on the P2P socket and dropped, by reason", "reason", p2p_drops(c))
    for label, ep in (("relay", c.relay_endpoint), ("p2p", c.p2p.endpoint if c.p2p else None)):
        if ep is not None:
            t.endpoint(ep.stats.as_dict(), {"socket": label})
    return t.rows


async def start_metrics(c: ConnectorView, host: str, port: int) -> MetricsServer:
    return await serve_metrics(lambda: collect(c), c.health, host, port, logger=logging.getLogger("ztna.connector"))
