"""Logging and metrics shared by the three programs.

* `RateLimitedLog`: one line per reason per interval, with the count of what was
  suppressed — a flood of bad packets costs a counter increment, not a log line each.
* `MetricsServer`: a small asyncio HTTP server for `/metrics` (Prometheus text from
  prometheus-client) and `/healthz` (200 only when the program says it is ready). It reads
  the whole request line before answering (the original dropped slow clients).
* `StatsCollector`: exposes plain-int counters (kept on hot paths without locks) as
  Prometheus metrics at scrape time, from the rows of a `ztna.metrics.MetricTable`;
  `serve_metrics` starts the server for one program's rows and health.
* `format_address`: the one spelling of a socket address in every log line and message:
  `[fd00::1]:4433` for IPv6, `1.2.3.4:4433` for IPv4 and for IPv4-mapped IPv6.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ztna.addresses import format_address
from ztna.metrics import MetricRow


class RateLimitedLog:
    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, reason: str, detail: str = "") -> None:
        now = time.monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self.interval:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        suppressed = self._suppressed.pop(reason, 0)
        self._last[reason] = now
        extra = f" ({suppressed} more since last report)" if suppressed else ""
        self.logger.warning("%s%s%s", reason, f": {detail}" if detail else "", extra)


class StatsCollector:
    """Turns `source()` -> {name: (kind, help, value)} into metric families at scrape time."""

    def __init__(self, source: Callable[[], Iterable[MetricRow]]) -> None:
        self.source = source

    def collect(self) -> Iterable[Any]:
        families: dict[str, Any] = {}
        for name, kind, help_text, value, labels in self.source():
            fam = families.get(name)
            if fam is None:
                label_names = sorted(labels) if labels else []
                if kind == "counter":
                    fam = CounterMetricFamily(name, help_text, labels=label_names)
                else:
                    fam = GaugeMetricFamily(name, help_text, labels=label_names)
                families[name] = fam
            fam.add_metric([labels[k] for k in sorted(labels)] if labels else [], value)
        return list(families.values())


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], tuple[bool, dict[str, Any]]],
        extra_routes: dict[str, Callable[[], tuple[int, str, bytes]]] | None = None,
    ) -> None:
        self.registry = registry
        self.health = health
        self.extra_routes = extra_routes or {}
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        try:
            self.server = await asyncio.start_server(self._serve, host, port)
        except OSError as exc:
            from ztna.startup import bind_error

            raise bind_error("metrics and /healthz", "tcp", host, port, exc) from None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5.0)
            while True:  # skip headers
                h = await asyncio.wait_for(reader.readline(), timeout=5.0)
                if h in (b"\r\n", b"\n", b""):
                    break
            parts = line.decode("latin-1").split()
            path = parts[1] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = 200, "text/plain; version=0.0.4", generate_latest(self.registry)
            elif path == "/healthz":
                ok, detail = self.health()
                status = 200 if ok else 503
                ctype = "application/json"
                body = (json.dumps({"ok": ok, **detail}) + "\n").encode()
            elif path in self.extra_routes:
                status, ctype, body = self.extra_routes[path]()
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}.get(status, "OK")
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()


def collector_registry(source: Callable[[], Iterable[MetricRow]],
                       registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """A Prometheus registry (a new one unless given) that reads `source` at every scrape."""
    registry = registry if registry is not None else CollectorRegistry()
    registry.register(StatsCollector(source))
    return registry


async def serve_metrics(source: Callable[[], Iterable[MetricRow]],
                        health: Callable[[], tuple[bool, dict[str, Any]]], host: str, port: int, *,
                        logger: logging.Logger, registry: CollectorRegistry | None = None) -> MetricsServer:
    """/metrics (the rows of `source`, plus whatever `registry` already holds) and /healthz
    on host:port, with the one log line that says where."""
    server = MetricsServer(collector_registry(source, registry), health)
    await server.start(host, port)
    logger.info("metrics on http://%s/metrics", format_address((host, server.port)))
    return server


def setup_logging(level: str = "info", json_lines: bool = False) -> None:
    import sys

    lvl = getattr(logging, level.upper(), logging.INFO)
    if sys.stderr.isatty() and not json_lines:
        from rich.logging import RichHandler  # only for people watching: ~1 MB we can skip

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=True)
        fmt = "%(name)s: %(message)s"
    else:
        handler = logging.StreamHandler()
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(lvl)
    logging.getLogger("quic").setLevel(logging.WARNING)  # a QUIC library's own chatter (test peers)
