"""One way to write a metrics table, for every program and every part that exports counters.

A part that has something to show builds its rows with a `MetricTable` at scrape time, from
the plain ints it keeps on its hot path; `ztna.observe.StatsCollector` turns the rows into
Prometheus families and `ztna.observe.serve_metrics` serves them. Pure: no clock, no I/O,
so a table can be checked in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# (name, "counter" | "gauge", help, value, labels or None): what StatsCollector reads.
MetricRow = tuple[str, str, str, float, dict[str, str] | None]


class MetricTable:
    """Rows of one scrape. Rows of one name must share kind, help and label names (the
    collector makes one family of them), which the helpers below keep true by construction."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows: list[MetricRow] = []

    def counter(self, name: str, help_text: str, value: float,
                labels: dict[str, str] | None = None) -> None:
        self.rows.append((name, "counter", help_text, value, labels))

    def gauge(self, name: str, help_text: str, value: float,
              labels: dict[str, str] | None = None) -> None:
        self.rows.append((name, "gauge", help_text, value, labels))

    def counters_by(self, name: str, help_text: str, label: str,
                    values: Mapping[str, float] | Iterable[tuple[str, float]],
                    extra: dict[str, str] | None = None) -> None:
        """One counter family with one row per value of `label` (a drop reason, a state)."""
        items = values.items() if isinstance(values, Mapping) else values
        for key, value in items:
            self.counter(name, help_text, value, {**(extra or {}), label: key})

    def endpoint(self, stats: Mapping[str, int], labels: dict[str, str] | None = None) -> None:
        """A QUIC endpoint's counters (EndpointStats.as_dict()) as ztna_quic_<name>_total."""
        for key, value in stats.items():
            self.counter(f"ztna_quic_{key}_total", f"QUIC endpoint: {key.replace('_', ' ')}", value,
                         dict(labels) if labels else None)

    def extend(self, rows: Iterable[MetricRow]) -> None:
        self.rows.extend(rows)
