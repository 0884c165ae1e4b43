"""Per-flow audit log: one JSON line per flow when it ends, and one every `interval` for
flows that live long (docs/connector.md, docs/intermediate.md "Audit log").

* `FlowRecord` (pydantic) is the line; `FlowAudit` is the bookkeeping a flow carries from
  its start (who, what, which path, setup times, byte counters), turned into a record by
  `record()`.
* `AuditLog` writes records without blocking the data path: `emit` only puts the line on
  a queue (`logging.handlers.QueueHandler`); a `QueueListener` thread writes it to a
  `RotatingFileHandler` (size-based rotation). Long flows get an interim line from a
  periodic task that asks the driver for its live flows.
* Which process fills which field is in the docs; a field a process cannot know is null.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import logging.handlers
import queue
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AUDIT_VERSION", "AuditLog", "FlowAudit", "FlowRecord", "SetupTimes", "sans_of"]

AUDIT_VERSION = 1
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5
DEFAULT_INTERVAL = 300.0

log = logging.getLogger("ztna.audit")


class SetupTimes(BaseModel):
    """How long each step of setting the flow up took, in milliseconds (null: not known
    to this process, or not part of this flow's setup)."""

    model_config = ConfigDict(extra="forbid")
    registration_ms: float | None = None     # Agent connection up → its registration for the service
    punch_ms: float | None = None            # hole punch for the direct path (direct flows)
    handshake_ms: float | None = None        # the Agent connection's QUIC handshake
    backend_connect_ms: float | None = None  # flow start → backend (or Connector) answered


class FlowRecord(BaseModel):
    """One line of the audit log."""

    model_config = ConfigDict(extra="forbid")
    v: Literal[1] = 1                # AUDIT_VERSION
    event: Literal["end", "interim"]
    time: str                        # when the line was written, ISO 8601 UTC
    process: Literal["connector", "intermediate"]
    flow: str                        # unique in this process's lifetime
    identity: list[str] | None       # the Agent certificate's SANs (null: not known here)
    agent_id: int | None
    service: str
    protocol: Literal["tcp", "udp"]
    dst_port: int | None = Field(default=None, ge=1, le=65535)
    name: str | None = None          # the DNS name the flow asked for (named streams; else null)
    path: Literal["relay", "direct"]
    connector: str | None = None     # Intermediate: the Connector the flow went to
    started: str                     # ISO 8601 UTC
    setup: SetupTimes
    bytes_to_service: int = Field(ge=0)    # Agent → service payload bytes
    bytes_from_service: int = Field(ge=0)  # service → Agent payload bytes
    duration_s: float = Field(ge=0)
    close_reason: str | None = None        # null in interim lines


def _iso(wall: float) -> str:
    return datetime.datetime.fromtimestamp(wall, datetime.UTC).isoformat(timespec="milliseconds")


_SANS_CACHE: dict[bytes, list[str]] = {}


def sans_of(conn: Any) -> list[str] | None:
    """The SANs (DNS names and URIs) of a connection's peer certificate, or None."""
    chain = getattr(conn, "peer_chain", None)
    if not chain:
        return None
    leaf = chain[0]
    cached = _SANS_CACHE.get(leaf)
    if cached is not None:
        return cached
    try:
        cert = x509.load_der_x509_certificate(leaf)
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in ext.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in ext.get_values_for_type(x509.UniformResourceIdentifier)]
    except (ValueError, x509.ExtensionNotFound):
        names = []
    if len(_SANS_CACHE) > 1024:
        _SANS_CACHE.clear()
    _SANS_CACHE[leaf] = names
    return names


class FlowAudit:
    """What a flow carries for its audit line. The driver bumps the byte counters."""

    __slots__ = ("flow", "identity", "agent_id", "service", "protocol", "dst_port", "name", "path",
                 "connector", "setup", "started_wall", "started", "to_service", "from_service",
                 "last_interim")

    def __init__(self, flow: str, *, service: str, protocol: Literal["tcp", "udp"], path: Literal["relay", "direct"],
                 now: float, agent_id: int | None = None, identity: list[str] | None = None,
                 dst_port: int | None = None, connector: str | None = None,
                 setup: dict[str, float | None] | None = None, wall: float | None = None,
                 name: str | None = None) -> None:
        self.flow = flow
        self.name = name
        self.identity = identity
        self.agent_id = agent_id
        self.service = service
        self.protocol: Literal["tcp", "udp"] = protocol
        self.dst_port = dst_port
        self.path: Literal["relay", "direct"] = path
        self.connector = connector
        self.setup: dict[str, float | None] = dict(setup or {})
        self.started_wall = time.time() if wall is None else wall
        self.started = now
        self.to_service = 0
        self.from_service = 0
        self.last_interim = now

    def record(self, event: Literal["end", "interim"], *, process: Literal["connector", "intermediate"],
               now: float, reason: str | None = None, wall: float | None = None) -> FlowRecord:
        return FlowRecord(
            event=event, time=_iso(time.time() if wall is None else wall), process=process,
            flow=self.flow, identity=self.identity, agent_id=self.agent_id, service=self.service,
            protocol=self.protocol, dst_port=self.dst_port, name=self.name, path=self.path,
            connector=self.connector,
            started=_iso(self.started_wall),
            setup=SetupTimes(**{k: (round(v, 3) if v is not None else None) for k, v in self.setup.items()}),
            bytes_to_service=self.to_service, bytes_from_service=self.from_service,
            duration_s=round(max(0.0, now - self.started), 3),
            close_reason=reason if event == "end" else None)


class AuditLog:
    """The audit log file of one process. `emit` never blocks: the line is queued and a
    listener thread writes and rotates the file."""

    def __init__(self, path: str | Path, *, process: Literal["connector", "intermediate"],
                 max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 interval: float = DEFAULT_INTERVAL) -> None:
        self.process: Literal["connector", "intermediate"] = process
        self.interval = interval
        self.path = Path(path)
        # Opened here, so a path that cannot be written is a start-up error, not a silent loss.
        self._file = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes,
                                                          backupCount=backups, encoding="utf-8")
        self._file.setFormatter(logging.Formatter("%(message)s"))
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, self._file)
        self._listener.start()
        self._logger = logging.Logger(f"ztna.audit.{process}")   # outside the logging tree
        self._logger.propagate = False
        self._logger.addHandler(logging.handlers.QueueHandler(self._queue))
        self._ids = 0
        self.written = 0
        self._task: asyncio.Task[None] | None = None

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}{self._ids:x}"

    def emit(self, record: FlowRecord) -> None:
        self._logger.info(record.model_dump_json())
        self.written += 1

    def end(self, flow: FlowAudit, reason: str, now: float) -> None:
        self.emit(flow.record("end", process=self.process, now=now, reason=reason))

    def start(self, live: Callable[[], Iterable[FlowAudit]]) -> None:
        """Every `interval`, an interim line for each live flow that had none for that long."""
        self._task = asyncio.get_running_loop().create_task(self._interim(live))

    async def _interim(self, live: Callable[[], Iterable[FlowAudit]]) -> None:
        loop = asyncio.get_running_loop()
        tick = min(self.interval / 4, 5.0)   # a line at most a quarter interval late
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            try:
                for flow in list(live()):
                    if now - flow.last_interim >= self.interval:
                        flow.last_interim = now
                        self.emit(flow.record("interim", process=self.process, now=now))
            except Exception:  # noqa: BLE001 - the audit log must never take the process down
                log.exception("audit interim lines failed")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._listener.stop()     # writes what is queued, then stops the thread
        self._file.close()
