"""The Intermediate's metrics table (what /metrics shows), read at scrape time.

The relay totals count both paths, native routes and Python (ztna_quic_relay_* has the
native share alone). Parts that keep their own counters (cluster, mesh, signaling,
revocation, admin API) add their rows after the relay's.

Pure: `now` (the loop clock) comes in for the uptime.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from ztna.intermediate.registry import Registry
from ztna.intermediate.relay import DropReason, RelayStats
from ztna.metrics import MetricRow, MetricTable


class RowSource(Protocol):
    def metrics(self) -> Iterable[MetricRow]: ...


class IntermediateView(Protocol):
    """What the scrape reads of the Intermediate (``ztna.intermediate.server``)."""

    @property
    def stats(self) -> RelayStats: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def connection_count(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    def endpoint_totals(self) -> Mapping[str, int]: ...
    @property
    def ticket_stats(self) -> Any: ...
    def row_sources(self) -> Iterable[RowSource]: ...


RELAY_DROPS = "Relay drops by reason"
TICKETS_REFUSED = "Tickets refused (unknown = already used or never issued: replay protection)"
TICKET_REFUSALS = ("unknown", "expired", "rotated", "store_down")


def intermediate_metrics(view: IntermediateView, now: float) -> list[MetricRow]:
    t = MetricTable()
    s, reg = view.stats, view.registry
    totals = view.endpoint_totals()
    t.gauge("ztna_active_connections", "Established QUIC connections", view.connection_count)
    t.counter("ztna_relay_bytes_total", "Bytes relayed", s.relayed_bytes + totals.get("relay_bytes", 0))
    t.counter("ztna_datagrams_relayed_total", "DATAGRAMs relayed",
              s.relayed_datagrams + totals.get("relay_forwarded", 0))
    t.counter("ztna_registrations_total", "Acknowledged registrations", reg.registrations)
    t.counter("ztna_registration_rejections_total", "NACKed registrations", reg.rejections)
    t.counters_by("ztna_connector_health_transitions_total",
                  "Connector health reports that changed its state, by the new state", "state",
                  (("unhealthy", reg.health_transitions[False]), ("healthy", reg.health_transitions[True])))
    t.counter("ztna_connector_health_reports_ignored_total",
              "Health reports for a service the Connector does not serve", reg.health_ignored)
    unhealthy = sum(1 for peer in reg.peers.values()
                    for service in peer.connector_services if not peer.health.get(service, True))
    t.gauge("ztna_unhealthy_connectors", "(Connector, service) pairs reported unhealthy", unhealthy)
    t.gauge("ztna_services_without_healthy_connector",
            "Services whose Connectors are all unhealthy (new flows go to the least-recently-failed)",
            sum(1 for service in reg.connectors if not reg.pool_healthy(service)))
    t.gauge("ztna_relay_flow_pins", "Relayed datagram flows pinned to a Connector", len(reg.pins))
    t.gauge("ztna_uptime_seconds", "Seconds since start", now - view.started_at)
    # The native core drops oversize DATAGRAMs on its routes, and those without a target.
    native = {DropReason.OVERSIZE: totals.get("relay_dropped_oversize", 0)}
    t.counters_by("ztna_relay_dropped_total", RELAY_DROPS, "reason",
                  [(r.value, s.dropped(r) + native.get(r, 0)) for r in DropReason])
    t.counter("ztna_relay_dropped_total", RELAY_DROPS, totals.get("relay_dropped_no_target", 0),
              {"reason": "no_target"})
    t.endpoint(totals)
    t.counter("ztna_retry_tokens_validated", "Valid retry tokens", totals.get("retry_validated", 0))
    t.counter("ztna_retry_token_failures", "Invalid retry tokens", totals.get("retry_failures", 0))
    tickets = view.ticket_stats
    if tickets is not None:
        t.counter("ztna_session_tickets_issued_total", "Session tickets issued", tickets.issued)
        t.counter("ztna_zero_rtt_resumptions_total",
                  "Resumptions (0-RTT) accepted with a single-use ticket", tickets.resumed)
        t.counters_by("ztna_session_tickets_refused_total", TICKETS_REFUSED, "reason",
                      [(r, getattr(tickets, f"refused_{r}")) for r in TICKET_REFUSALS
                       if hasattr(tickets, f"refused_{r}")])
    t.counter("ztna_relay_held_until_registered_total",
              "Tunnel packets held until the registration in the same flight", s.held_until_registered)
    for source in view.row_sources():
        t.extend(source.metrics())
    return t.rows
