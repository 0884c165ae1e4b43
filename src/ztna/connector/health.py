"""Backend health checks: the pure state machine and the thin asyncio prober around it.

Theory of operation
-------------------
* A service has a list of checks (`ztna.connector.config.HealthCheck`): by default one TCP
  connect check per TCP backend; instead an HTTP GET with an expected status, a UDP probe
  (payload sent, exact reply expected), or none at all. UDP backends get no check unless
  one is configured.
* `ztna.connector.health_state` (pure, time passed in) turns outcomes into states: per check
  (down after `fall` failures in a row, up after `rise` successes) and per service (healthy
  while every check is); each service transition is returned once, so the driver reports it
  (a `ServiceHealth` control message to the Intermediate and the direct Agents) and counts it.
* `HealthProber` (this module, the driver) runs one task per check: probe, feed the outcome with the
  loop's clock, sleep the interval. A probe never blocks the data path: it is one more
  coroutine, bounded by its timeout.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11

from ztna.connector.health_state import CheckState, ServiceHealthState
from ztna.observe import format_address

log = logging.getLogger("ztna.connector.health")

__all__ = ["CheckState", "ServiceHealthState", "HealthProber", "probe_tcp", "probe_http", "probe_udp"]


# ---------------------------------------------------------------------- probes (I/O)
# Each returns (ok, detail) and never raises for a backend's failure.

async def probe_tcp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except TimeoutError:
        return False, f"tcp connect {format_address((host, port))}: timed out"
    except OSError as exc:
        return False, f"tcp connect {format_address((host, port))}: {exc.strerror or exc}"
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return True, f"tcp connect {format_address((host, port))}: ok"


async def probe_http(host: str, port: int, path: str, status: int, timeout: float) -> tuple[bool, str]:
    where = f"http GET {format_address((host, port))}{path}"
    try:
        return await asyncio.wait_for(_http_get(host, port, path, status, where), timeout)
    except TimeoutError:
        return False, f"{where}: timed out"
    except OSError as exc:
        return False, f"{where}: {exc.strerror or exc}"
    except h11.ProtocolError as exc:
        return False, f"{where}: bad HTTP response ({exc})"


async def _http_get(host: str, port: int, path: str, status: int, where: str) -> tuple[bool, str]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h11.Connection(our_role=h11.CLIENT)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(conn.send(h11.Request(method="GET", target=path,
                                           headers=[("Host", authority), ("Connection", "close"),
                                                    ("User-Agent", "ztna-health")])))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(4096)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                ok = event.status_code == status
                return ok, f"{where}: {event.status_code}" + ("" if ok else f" (want {status})")
            if isinstance(event, h11.ConnectionClosed):
                return False, f"{where}: closed without a response"
    finally:
        writer.close()


class _UdpProbe(asyncio.DatagramProtocol):
    def __init__(self, expect: bytes) -> None:
        self.expect = expect
        self.done: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if not self.done.done():
            ok = data == self.expect
            self.done.set_result((ok, "reply matches" if ok else f"unexpected reply {data[:32].hex()}"))

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_result((False, getattr(exc, "strerror", None) or str(exc)))


async def probe_udp(host: str, port: int, payload: bytes, expect: bytes, timeout: float) -> tuple[bool, str]:
    where = f"udp probe {format_address((host, port))}"
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UdpProbe(expect), remote_addr=(str(infos[0][4][0]), int(infos[0][4][1])))
    except OSError as exc:
        return False, f"{where}: {exc.strerror or exc}"
    try:
        transport.sendto(payload)
        ok, detail = await asyncio.wait_for(proto.done, timeout)
        return ok, f"{where}: {detail}"
    except TimeoutError:
        return False, f"{where}: no reply"
    finally:
        transport.close()


# ---------------------------------------------------------------------- driver

@dataclass(slots=True)
class _Check:
    service: str
    index: int
    interval: float
    probe: Callable[[], Any]     # a coroutine function returning (ok, detail)


class HealthProber:
    """Runs the checks of every service and calls `on_change(service, healthy, detail)` on
    each service transition (the state machines are the pure cores above)."""

    def __init__(self, on_change: Callable[[str, bool, str], None]) -> None:
        self.on_change = on_change
        self.states: dict[str, ServiceHealthState] = {}
        self._checks: list[_Check] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.transitions: dict[tuple[str, bool], int] = {}

    def add_service(self, service: str) -> ServiceHealthState:
        return self.states.setdefault(service, ServiceHealthState(service))

    def add_check(self, service: str, name: str, *, interval: float, fall: int, rise: int,
                  probe: Callable[[], Any]) -> None:
        state = self.add_service(service)
        state.checks.append(CheckState(name, fall=fall, rise=rise))
        self._checks.append(_Check(service, len(state.checks) - 1, interval, probe))

    def healthy(self, service: str) -> bool:
        state = self.states.get(service)
        return state is None or state.healthy

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(check)) for check in self._checks]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def _run(self, check: _Check) -> None:
        loop = asyncio.get_running_loop()
        state = self.states[check.service]
        while True:
            try:
                ok, detail = await check.probe()
            except Exception as exc:  # noqa: BLE001 - a probe bug counts as a failed check
                ok, detail = False, f"check failed: {exc!r}"
            changed = state.observe(check.index, ok, detail, loop.time())
            if changed is not None:
                key = (check.service, changed)
                self.transitions[key] = self.transitions.get(key, 0) + 1
                text = state.detail()
                if changed:
                    log.info("service %r: backend healthy again (%s)", check.service, detail)
                else:
                    log.warning("service %r: backend unhealthy (%s)", check.service, text)
                self.on_change(check.service, changed, text)
            await asyncio.sleep(check.interval)
