"""Prometheus metrics and /healthz for the Connector (read at scrape time from counters).

/healthz is honest: 200 only while the relay connection is up and every service is
registered with the Intermediate; otherwise 503 with the reason in the JSON body.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from ztna.observe import MetricsServer, StatsCollector

if TYPE_CHECKING:
    from ztna.connector.service import Connector

Row = tuple[str, str, str, float, "dict[str, str] | None"]


def collect(c: Connector) -> list[Any]:
    out: list[Any] = []
    relay = c.relay
    out.append(("ztna_connector_relay_connected", "gauge", "1 while connected to the intermediate",
                1 if relay is not None and relay.connected else 0, None))
    out.append(("ztna_connector_reconnects_total", "counter", "Reconnect attempts",
                relay.reconnects if relay else 0, None))
    if relay is not None:
        for svc, state in relay.registration.items():
            out.append(("ztna_connector_service_registered", "gauge",
                        "1 if the service is registered", 1 if state == "registered" else 0,
                        {"service": svc}))
    out.append(("ztna_connector_tcp_sessions", "gauge", "Open TCP-in-DATAGRAM sessions", len(c.tcp), None))
    out.append(("ztna_connector_udp_flows", "gauge", "Open UDP flows", len(c.udp), None))
    out.append(("ztna_connector_streams", "gauge", "Open TCP streams", len(c.streams), None))
    out.append(("ztna_connector_uptime_seconds", "gauge", "Seconds since start",
                c.loop.time() - c.started_at if c.loop else 0, None))
    for name, value in c.stats.as_dict().items():
        out.append((f"ztna_connector_{name}_total", "counter", name.replace("_", " "), value, None))
    for label, ep in (("relay", c.relay_endpoint), ("p2p", c.p2p.endpoint if c.p2p else None)):
        if ep is None:
            continue
        for k, v in ep.stats.as_dict().items():
            out.append((f"ztna_quic_{k}_total", "counter", f"QUIC endpoint: {k.replace('_', ' ')}",
                        v, {"socket": label}))
    return out


async def start_metrics(c: Connector, host: str, port: int) -> MetricsServer:
    reg = CollectorRegistry()
    reg.register(StatsCollector(lambda: collect(c)))  # type: ignore[arg-type]
    server = MetricsServer(reg, c.health)
    await server.start(host, port)
    import logging

    logging.getLogger("ztna.connector").info("metrics on http://%s:%d/metrics", host, server.port)
    return server
