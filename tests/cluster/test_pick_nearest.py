"""Of several Intermediates the Agent attaches first to the nearest by a timed handshake
(`ztna.link.targets.pick_by_rtt`): the rule in memory, then a real Agent given a slow path
(a UDP hop adding 100 ms each way) first and a direct one second attaches to the direct
one, and with `--pick first` to the slow one."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster_helpers import IntermediateProc
from intermediate_helpers import Forwarder

from ztna.certs import init_pki
from ztna.link.targets import Targets, pick_by_rtt
from ztna.procs import await_until

pytestmark = pytest.mark.timeout(120)

A, B, C = ("i1", 4433), ("i2", 4433), ("i3", 4433)


def test_the_list_order_decides_among_the_about_as_near() -> None:
    assert pick_by_rtt([A, B], {A: 0.004, B: 0.002}) == A            # within 20 ms: A
    assert pick_by_rtt([A, B], {A: 0.030, B: 0.002}) == B            # 28 ms slower: B
    assert pick_by_rtt([A, B], {A: 0.140, B: 0.100}) == A            # within 1.5x of a slow best
    assert pick_by_rtt([A, B], {A: 0.160, B: 0.100}) == B
    assert pick_by_rtt([A, B, C], {A: None, B: 0.300, C: 0.010}) == C
    assert pick_by_rtt([A, B, C], {A: None, B: 0.015, C: 0.010}) == B
    assert pick_by_rtt([A, B], {A: None, B: None}) is None
    assert pick_by_rtt([A, B], {}) is None


def test_targets_choose_moves_only_to_a_pick() -> None:
    targets = Targets([A, B, C])
    assert not targets.choose({A: None, B: None, C: None}) and targets.current == A
    assert targets.choose({A: 0.2, B: 0.01, C: None}) and targets.current == B
    assert targets.moves == 0                       # a pick is not a failover
    assert targets.fail_over() and targets.current == C


class SlowHop(Forwarder):
    """The Forwarder, holding every datagram `delay` seconds in each direction."""

    delay = 0.1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.get_running_loop().call_later(self.delay, super().datagram_received, data, addr)

    def _from_server(self) -> None:
        assert self.upstream is not None and self.transport is not None
        while True:
            try:
                data, _ = self.upstream.recvfrom(65535)
            except BlockingIOError:
                return
            if self.client is not None:
                asyncio.get_running_loop().call_later(self.delay, self.transport.sendto, data, self.client)


def status(state: Path) -> dict[str, Any] | None:
    res = subprocess.run([sys.executable, "-m", "ztna", "status", "--json", "--state-dir", str(state),
                          "--name", "pick"], capture_output=True, text=True, timeout=30)
    return json.loads(res.stdout) if res.returncode == 0 else None


@pytest.mark.parametrize("pick", ["rtt", "first"])
def test_the_agent_attaches_to_the_nearest(tmp_path: Path, pick: str) -> None:
    pki = tmp_path / "pki"
    init_pki(pki, ["echo"])
    inter = IntermediateProc(["--pki", str(pki)], tmp_path / "i.log").start()

    async def main() -> dict[str, Any]:
        hop = SlowHop(inter.port)
        slow = await hop.start()
        agent = subprocess.Popen(
            [sys.executable, "-m", "ztna", "agent", "--mode", "userspace", "--name", "pick",
             "--intermediate", f"127.0.0.1:{slow},127.0.0.1:{inter.port}", "--pick", pick,
             "--server-name", "localhost", "--pki", str(pki), "--service", "echo=10.100.0.2",
             "--metrics", "off", "--state-dir", str(tmp_path / "state")],
            stdout=open(tmp_path / "agent.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
        try:
            async def connected() -> dict[str, Any] | None:
                snap = await asyncio.to_thread(status, tmp_path / "state")
                return snap if snap is not None and snap["intermediate"]["state"] == "connected" else None

            return await await_until(connected, timeout=30, what="the Agent connected", interval=0.3,
                                     error=AssertionError,
                                     detail=lambda: (tmp_path / "agent.log").read_text())
        finally:
            agent.terminate()
            agent.wait(10)

    try:
        snap = asyncio.run(main())
    finally:
        inter.stop()
    info = snap["intermediate"]
    slow_ms, fast_ms = info["handshake_ms"].values() if pick == "rtt" else (None, None)
    if pick == "rtt":
        assert fast_ms is not None and slow_ms is not None and slow_ms > fast_ms + 150, info
        assert info["address"] == f"127.0.0.1:{inter.port}", info
        print(f"handshake times: through the hop {slow_ms} ms, direct {fast_ms} ms")
    else:
        assert info["handshake_ms"] == {}
        assert info["address"] != f"127.0.0.1:{inter.port}", info     # the hop, first in the list
    assert info["failovers"] == 0
