"""Backend health checks: the pure state machines, the `check=` syntax, and the probes
against real local servers (TCP, HTTP, UDP) and a dead port."""

from __future__ import annotations

import asyncio
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ztna.connector.config import HealthCheck, ServiceConfig, parse_service_flag
from ztna.connector.health import HealthProber, probe_http, probe_tcp, probe_udp
from ztna.connector.health_state import CheckState, ServiceHealthState


def test_check_goes_down_after_fall_failures_and_up_after_rise_successes() -> None:
    c = CheckState("tcp 80")
    assert c.healthy
    assert c.observe(False, "refused", 0.0) is None
    assert c.observe(False, "refused", 2.0) is None
    assert c.observe(True, "ok", 4.0) is None            # a success resets the failure run
    assert [c.observe(False, "refused", t) for t in (6.0, 8.0, 10.0)] == [None, None, False]
    assert not c.healthy and c.last_change == 10.0 and c.last_detail == "refused"
    assert c.observe(True, "ok", 12.0) is None
    assert c.observe(False, "refused", 14.0) is None     # still down; the success run restarts
    assert c.observe(True, "ok", 16.0) is None
    assert c.observe(True, "ok", 18.0) is True
    assert c.healthy and c.last_change == 18.0 and c.checks == 10


def test_service_is_healthy_while_every_check_is() -> None:
    s = ServiceHealthState("web", [CheckState("tcp 80", fall=1, rise=1), CheckState("udp 53", fall=1, rise=1)])
    assert s.observe(0, True, "ok", 0.0) is None
    assert s.observe(1, False, "no reply", 1.0) is False
    assert s.detail() == "udp 53: no reply"
    assert s.observe(0, False, "refused", 2.0) is None    # already down
    assert s.observe(1, True, "ok", 3.0) is None          # tcp still down
    assert s.observe(0, True, "ok", 4.0) is True
    assert s.transitions == 2 and s.detail() == "ok"
    assert ServiceHealthState("none").healthy             # no checks: always healthy


def _svc(flag: str) -> ServiceConfig:
    return ServiceConfig.model_validate(parse_service_flag(flag))


def test_check_syntax_and_defaults() -> None:
    svc = _svc("web=10.0.0.1;tcp:80=127.0.0.1:8080;tcp:443=127.0.0.1:8443;udp:53=127.0.0.1:53")
    assert svc.checks is None
    assert [(c.kind, c.port) for c in svc.health_checks()] == [("tcp", 80), ("tcp", 443)]   # UDP unchecked
    assert _svc("web=10.0.0.1;tcp:80=127.0.0.1:8080;check=none").health_checks() == []
    svc = _svc("web=10.0.0.1;tcp:80=127.0.0.1:8080;udp:53=127.0.0.1:53;check=http:80/healthz=204;"
               "check=udp:53:70696E67=706f6e67;check=tcp")
    checks = svc.health_checks()
    assert checks[0] == HealthCheck(kind="http", port=80, path="/healthz", status=204)
    assert checks[1] == HealthCheck(kind="udp", port=53, probe="70696e67", expect="706f6e67")
    assert checks[2] == HealthCheck(kind="tcp", port=80)
    assert _svc("web=10.0.0.1;tcp:80=127.0.0.1:8080;check=http:80").health_checks()[0].path == "/"
    for bad in ("check=http:81/x", "check=udp:80:00=01", "check=http:80/a b", "check=udp:53:0=01",
                "check=ping", "check=http:80/x=99"):
        with pytest.raises(ValueError):
            _svc(f"web=10.0.0.1;tcp:80=127.0.0.1:8080;udp:53=127.0.0.1:53;{bad}")


class _Http(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code = 200 if self.path == "/ok" else 503
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_probes_against_real_servers() -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    hport = http.server_address[1]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    uport = udp.getsockname()[1]

    def answer() -> None:
        while True:
            try:
                data, addr = udp.recvfrom(100)
            except OSError:
                return
            udp.sendto(b"pong" if data == b"ping" else b"what", addr)
    threading.Thread(target=answer, daemon=True).start()

    async def main() -> None:
        dead = _dead_port()
        assert (await probe_tcp("127.0.0.1", hport, 1.0))[0] is True
        ok, detail = await probe_tcp("127.0.0.1", dead, 1.0)
        assert not ok and f":{dead}" in detail
        assert await probe_http("127.0.0.1", hport, "/ok", 200, 1.0) == (True, f"http GET 127.0.0.1:{hport}/ok: 200")
        ok, detail = await probe_http("127.0.0.1", hport, "/sick", 200, 1.0)
        assert not ok and detail.endswith("503 (want 200)")
        assert not (await probe_http("127.0.0.1", dead, "/ok", 200, 1.0))[0]
        assert (await probe_udp("127.0.0.1", uport, b"ping", b"pong", 1.0))[0] is True
        ok, detail = await probe_udp("127.0.0.1", uport, b"hello", b"pong", 1.0)
        assert not ok and "unexpected reply" in detail
        assert not (await probe_udp("127.0.0.1", dead, b"ping", b"pong", 0.3))[0]

        # The prober reports each service transition once.
        changes: list[tuple[str, bool]] = []
        prober = HealthProber(lambda svc, healthy, detail: changes.append((svc, healthy)))
        port = {"p": hport}
        prober.add_check("web", "tcp 80", interval=0.02, fall=2, rise=2,
                         probe=lambda: probe_tcp("127.0.0.1", port["p"], 0.5))
        prober.start()
        await asyncio.sleep(0.2)
        assert changes == [] and prober.healthy("web")
        port["p"] = dead
        for _ in range(100):
            if changes:
                break
            await asyncio.sleep(0.02)
        port["p"] = hport
        for _ in range(100):
            if len(changes) == 2:
                break
            await asyncio.sleep(0.02)
        await prober.stop()
        assert changes == [("web", False), ("web", True)]
        assert prober.transitions == {("web", False): 1, ("web", True): 1}
    try:
        asyncio.run(main())
    finally:
        http.shutdown()
        udp.close()
