"""After a failover the Connector's P2P socket follows its relay link: QAD and punch
signaling go to the Intermediate it is attached to now, and a new punch there goes direct.

Real processes: redis-server, two `ztna intermediate` members, `ztna connector`
(`--intermediate I1,I2`, P2P on a known UDP port) and `ztna agent` (userspace forward). An
Agent punches via I1 and goes direct; SIGKILL I1; the Connector fails over to I2, and I2 sees
a QUIC connection from the Connector's P2P port (its QAD, which before stayed aimed at the
dead member). A new Agent (also told I1 first) fails over to I2 and punches there: the punch is signaled there (I2 counts the
direct result), the service goes direct, and bytes cross it unchanged."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import RedisProc, echo_through, member
from intermediate_helpers import free_tcp_port, free_udp_port

from ztna.agent.control import query
from ztna.certs import init_pki, issue
from ztna.procs import await_until

pytestmark = pytest.mark.timeout(240)

ZTNA = [sys.executable, "-m", "ztna"]


def healthz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:   # 503 while not registered: the body is the same JSON
        return dict(json.loads(e.read()))


def agent_status(state_dir: Path) -> dict[str, Any] | None:
    socks = sorted(state_dir.glob("*.sock"))
    try:
        return query(socks[0]) if socks else None
    except OSError:
        return None



def test_connector_p2p_socket_follows_failover_and_a_new_punch_goes_direct(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["echo"])
    issue(pki, "member", "member", out_prefix=pki / "member")
    redis = RedisProc(tmp_path / "redis").start()
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs = []

    def spawn(name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        logs.append(log)
        procs[name] = subprocess.Popen([*ZTNA, *args], stdout=log, stderr=subprocess.STDOUT)
        return procs[name]

    def text(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text(errors="replace")

    def from_p2p_port(log: str, port: int) -> bool:
        # The Intermediate logs every connection with its source: the QAD connection of the
        # Connector's P2P socket comes from the P2P port (the relay link from another one).
        return re.search(rf"peer \S+ connected from \S*:{port}\b", log) is not None

    async def until(what: str, check: Any, limit: float, dump: str) -> None:
        await await_until(check, timeout=limit, what=what, interval=0.3, error=AssertionError,
                          detail=lambda: text(dump))

    def start_agent(name: str, fwd: int, *intermediates: int) -> Path:
        state = tmp_path / f"{name}-state"
        spawn(name, "agent", "--mode", "userspace", "--intermediate",
              ",".join(f"127.0.0.1:{p}" for p in intermediates), "--server-name", "localhost",
              "--pki", str(pki), "--service", "echo=10.100.0.2", "-L", f"127.0.0.1:{fwd}=echo:7",
              "--metrics", "off", "--state-dir", str(state))
        return state

    def path_of(state: Path) -> str | None:
        snap = agent_status(state)
        return snap["services"][0]["path"] if snap else None

    async def main() -> None:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        backend = await asyncio.start_server(handle, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        p2p_port, cmetrics = free_udp_port(), free_tcp_port()
        spawn("connector", "connector", "--intermediate", f"127.0.0.1:{i1.port},127.0.0.1:{i2.port}",
              "--server-name", "localhost", "--pki", str(pki), "--p2p-port", str(p2p_port),
              "--metrics", f"127.0.0.1:{cmetrics}",
              "--service", f"echo=10.100.0.2;tcp:7=127.0.0.1:{bport}")

        # An Agent on I1 punches via I1 and goes direct.
        fwd1 = free_tcp_port()
        state1 = start_agent("agent1", fwd1, i1.port, i2.port)

        async def direct1() -> bool:
            return path_of(state1) == "direct" and await echo_through(fwd1, 50_000)

        await until("first agent direct via I1", direct1, 40, "agent1")
        assert from_p2p_port(i1.log(), p2p_port)
        assert not from_p2p_port(i2.log(), p2p_port)
        procs.pop("agent1").terminate()

        i1.signal(signal.SIGKILL)
        killed = time.monotonic()

        async def followed() -> bool:
            qad = healthz(cmetrics).get("p2p_qad") or {}
            return (from_p2p_port(i2.log(), p2p_port) and bool(qad.get("up"))
                    and qad.get("intermediate") == f"127.0.0.1:{i2.port}")

        # With the link: seconds after its 8 s silence detection, not the QAD connection's own
        # 30 s idle timeout.
        await until("the Connector's P2P QAD on I2", followed, 20, "connector")
        followed_after = time.monotonic() - killed
        assert "failing over to intermediate" in text("connector")
        assert str(healthz(cmetrics)["p2p_public"]).endswith(f":{p2p_port}")

        # A new Agent fails over from the dead I1 to I2 and punches there, where the Connector is.
        before = i2.metrics().get('ztna_signaling_results_total{outcome="direct"}', 0.0)
        fwd2 = free_tcp_port()
        state2 = start_agent("agent2", fwd2, i1.port, i2.port)   # I1 first: it fails over too

        async def direct2() -> bool:
            return path_of(state2) == "direct"

        started2 = time.monotonic()
        await until("second agent direct via I2", direct2, 40, "agent2")
        direct_after = time.monotonic() - started2
        for size in (1, 70_000, 300_000):
            assert await echo_through(fwd2, size), text("agent2")
        assert path_of(state2) == "direct"                  # still direct after the bytes

        async def agent_qad_on_i2() -> bool:
            # The Agent's P2P socket started towards I1 like its session; it reads where the
            # session is at each QAD attempt, so it lands on I2 after one handshake timeout.
            qad = (agent_status(state2) or {}).get("p2p", {}).get("qad") or {}
            return bool(qad.get("up")) and qad.get("intermediate") == f"127.0.0.1:{i2.port}"

        await until("the Agent's P2P QAD on I2", agent_qad_on_i2, 30, "agent2")
        after = i2.metrics()['ztna_signaling_results_total{outcome="direct"}']
        assert after >= before + 1
        backend.close()
        print(f"Connector's QAD on the survivor {followed_after:.1f} s after SIGKILL; "
              f"new Agent direct {direct_after:.1f} s after its start")

    try:
        asyncio.run(main())
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
        i1.stop()
        i2.stop()
        redis.kill()
