"""An Agent given two members of a cluster (`--intermediate I1,I2`) and a Connector given both
the other way round (`I2,I1`): their TCP goes I1 → mesh → I2 at first. SIGKILL the Agent's
member and the Agent is back within seconds on I2, resumed in 0-RTT with the ticket I1 issued
(shared through Redis); SIGKILL the Connector's member instead and the Connector moves to I1,
where the Agent reaches it without the mesh. Real processes: redis-server, two `ztna
intermediate`, `ztna connector`, `ztna agent` (userspace forward)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from cluster_helpers import RedisProc, echo_through, member
from intermediate_helpers import free_tcp_port

from ztna.certs import init_pki, issue
from ztna.procs import await_until

pytestmark = pytest.mark.timeout(240)

ZTNA = [sys.executable, "-m", "ztna"]


def agent_metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out



@pytest.mark.parametrize("kill", ["agent's member", "connector's member"])
def test_sigkill_member_agent_is_back_on_the_other_in_0rtt(tmp_path: Path, kill: str) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["echo"])
    issue(pki, "member", "member", out_prefix=pki / "member")
    redis = RedisProc(tmp_path / "redis").start()
    i1 = member(pki, redis, tmp_path / "i1.log").start()
    i2 = member(pki, redis, tmp_path / "i2.log").start()
    procs: list[subprocess.Popen[bytes]] = []
    logs = []

    def spawn(name: str, *args: str) -> None:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen([*ZTNA, *args], stdout=log, stderr=subprocess.STDOUT))

    async def main() -> float:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
            w.close()

        backend = await asyncio.start_server(handle, "127.0.0.1", 0)
        bport = backend.sockets[0].getsockname()[1]
        # The Connector prefers I2, the Agent I1: their traffic crosses the mesh at first.
        spawn("connector", "connector", "--intermediate", f"127.0.0.1:{i2.port},127.0.0.1:{i1.port}", "--server-name",
              "localhost", "--pki", str(pki), "--p2p-port", "off", "--metrics", "off",
              "--service", f"echo=10.100.0.2;tcp:7=127.0.0.1:{bport}")
        fwd, mport = free_tcp_port(), free_tcp_port()
        spawn("agent", "agent", "--mode", "userspace", "--intermediate",
              f"127.0.0.1:{i1.port},127.0.0.1:{i2.port}", "--pick", "first", "--server-name", "localhost",
              "--pki", str(pki), "--service", "echo=10.100.0.2", "-L", f"127.0.0.1:{fwd}=echo:7",
              "--metrics", f"127.0.0.1:{mport}", "--state-dir", str(tmp_path / "agent-state"))
        def agent_log() -> str:
            return (tmp_path / "agent.log").read_text()

        await await_until(lambda: echo_through(fwd, 100_000), timeout=30, what="echo through the Agent",
                          interval=0.5, error=AssertionError, detail=agent_log)
        assert i1.metrics()['ztna_mesh_streams_total{direction="forwarded"}'] >= 1  # via the mesh
        before = agent_metrics(mport)
        victim, survivor = (i1, i2) if kill == "agent's member" else (i2, i1)
        victim.signal(signal.SIGKILL)
        killed = time.monotonic()
        # Dead-path detection (8 s of silence) plus a reconnect: seconds, not the 30 s idle timeout.
        await await_until(lambda: echo_through(fwd, 100_000, timeout=2), timeout=20,
                          what="echo back after the SIGKILL", error=AssertionError, detail=agent_log)
        back = time.monotonic() - killed
        after = agent_metrics(mport)
        if kill == "agent's member":
            assert after["ztna_agent_failovers_total"] >= 1
            assert after["ztna_agent_zero_rtt_accepted_total"] > before["ztna_agent_zero_rtt_accepted_total"]
        else:   # the Agent stayed; the Connector moved to I1 (and resumed there in 0-RTT)
            assert after["ztna_agent_failovers_total"] == 0
            assert "failing over to intermediate" in (tmp_path / "connector.log").read_text()
            assert re.search(r"peer connector#\d+ connected from .* \(resumed, 0-RTT\)", survivor.log())
        assert survivor.metrics()["ztna_zero_rtt_resumptions_total"] >= 1
        backend.close()
        return back

    try:
        back = asyncio.run(main())
        print(f"traffic back {back:.1f} s after SIGKILL of the {kill}")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
        i1.stop()
        i2.stop()
        redis.kill()
